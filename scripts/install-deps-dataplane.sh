#!/usr/bin/env bash
# Tools the data-plane end-to-end tests (tests/tests/dataplane.rs) need: network
# namespaces and veth (iproute2), capture rules (iptables, legacy or nft backend),
# a packet capture on the veth (tcpdump), and small servers/clients (python3, socat).
# Idempotent: installs only what is missing.
set -euo pipefail

need=()
command -v ip >/dev/null || need+=(iproute2)
command -v iptables-restore >/dev/null || need+=(iptables)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v socat >/dev/null || need+=(socat)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
echo "==> data-plane test tools present: $(command -v ip iptables-restore tcpdump socat python3 | tr '\n' ' ')"
