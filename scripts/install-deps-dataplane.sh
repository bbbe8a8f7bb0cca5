#!/usr/bin/env bash
# Tools the data-plane end-to-end tests (tests/tests/dataplane.rs) and the demo's two-VM
# part need: network namespaces and veth (iproute2), capture rules (iptables, legacy or
# nft backend; nft for the agent's DNS capture), a packet capture on the veth (tcpdump),
# and small servers/clients (python3, socat).
# Idempotent: installs only what is missing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ensure_tools ip:iproute2 iptables-restore:iptables nft:nftables tcpdump:tcpdump socat:socat python3:python3
echo "==> data-plane test tools present: $(command -v ip iptables-restore nft tcpdump socat python3 | tr '\n' ' ')"
