#!/usr/bin/env bash
# What the DNS tests and benchmark need: dig (dnsutils), dnsmasq (the upstream resolver
# the tests start in a namespace, and the benchmark's baseline), dnsperf, nft (the agent's
# fail-open DNS capture, ip and ip6 tables), taskset (util-linux), ip (iproute2: the
# namespaces, and the IPv6 addresses of the IPv6-resolver test), python3. dnsmasq-base,
# not dnsmasq: the latter ships a service that would start on the host and take port 53.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ensure_tools dig:dnsutils dnsmasq:dnsmasq-base dnsperf:dnsperf nft:nftables taskset:util-linux python3:python3-minimal ip:iproute2
# If a full dnsmasq package is installed anyway, its service must not hold port 53.
if systemctl list-unit-files dnsmasq.service >/dev/null 2>&1 \
    && systemctl is-enabled dnsmasq.service >/dev/null 2>&1; then
    systemctl disable --now dnsmasq.service >/dev/null 2>&1 || true
fi
