#!/usr/bin/env bash
# Local mesh demo on the embedded store: a controller on a temporary sled directory,
# a workload group, a join token, and an agent that joins, renews and reports status;
# as root, then two "VMs" (network namespaces) talking through their agents, and an
# AuthorizationPolicy refusing a call (with `why` and the decision metric).
#
# Usage: scripts/demo.sh [--preflight]
#   --preflight  only check (and install, as root) what the demo needs, then exit.
# CAUSEWAY_NO_INSTALL=1 installs nothing: a missing tool stops the demo with its name.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

# What each part needs, as command:Debian package (the same install function as
# scripts/install-deps-*.sh, which the tests use).
BASE_TOOLS=(python3:python3)
VM_TOOLS=(ip:iproute2 iptables:iptables iptables-save:iptables nft:nftables getent:libc-bin python3:python3)
two_vms() { [ "$(id -u)" = 0 ]; }
preflight() {
  command -v cargo >/dev/null 2>&1 || {
    echo "error: cargo not found on PATH; install the Rust toolchain (https://rustup.rs)" >&2
    return 1
  }
  ensure_tools "${BASE_TOOLS[@]}" || { echo "error: the demo cannot run without the tools above" >&2; return 1; }
  if [ "${1:-}" = all ] || two_vms; then
    ensure_tools "${VM_TOOLS[@]}" || {
      echo "error: the demo's two-VM part (network namespaces, capture rules, DNS capture) cannot run without the tools above" >&2
      return 1
    }
  fi
}
if [ "${1:-}" = --preflight ]; then
  preflight all
  echo "==> preflight: everything the demo needs is present"
  exit 0
fi
preflight
two_vms || echo "==> not root: the demo will skip its two-VM part (network namespaces need root)"

echo "==> building (cargo build --workspace --bins; a cold build takes about 13 minutes on 2 cores)"
cargo build --workspace --bins
B="$CARGO_TARGET_DIR/debug"
work=$(mktemp -d -t causeway-demo.XXXXXX)
pids=()
netns=()
# On failure, the last lines of every log before cleanup removes them.
show_logs() {
  local f
  for f in "$work"/*.log; do
    [ -s "$f" ] || continue
    echo "---- last lines of $(basename "$f") ----" >&2
    tail -n 25 "$f" >&2
  done
}
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    echo "==> the demo failed (exit $rc); the logs:" >&2
    show_logs
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for n in "${netns[@]}"; do
    for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$n" 2>/dev/null || true
    rm -rf "/etc/netns/$n"
  done
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

echo "==> starting causeway-controller (data dir $work/controller)"
"$B/causeway-controller" --data-dir "$work/controller" --admin-listen 127.0.0.1:0 \
  --control-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 2>"$work/controller.log" &
pids+=($!)
for _ in $(seq 100); do [ -f "$work/controller/endpoints.json" ] && break; sleep 0.1; done
[ -f "$work/controller/endpoints.json" ] || { echo "error: the controller did not start" >&2; exit 1; }
admin=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin"])' "$work/controller/endpoints.json")
export CAUSEWAY_CONTROLLER="$admin" CAUSEWAY_ADMIN_TOKEN_FILE="$work/controller/admin.token"
"$B/causewayctl" ca show

echo "==> causewayctl group create web --namespace default --service-account web --service web --port http:8080"
"$B/causewayctl" group create web --namespace default --service-account web --service web --port http:8080
token=$("$B/causewayctl" token create --group web --ttl 10m)
echo "==> join token: ${token:0:24}..."

echo "==> causeway-agent join (the key is generated here and never sent)"
"$B/causeway-agent" join "$token" --state-dir "$work/vm1"
ls -l "$work/vm1"

echo "==> causeway-agent run (service mode; --no-capture: the demo leaves this host's iptables alone), then status"
"$B/causeway-agent" run --state-dir "$work/vm1" --no-capture 2>"$work/agent.log" &
pids+=($!)
for _ in $(seq 50); do
  "$B/causeway-agent" status --state-dir "$work/vm1" --output json 2>/dev/null | grep -q '"controller_connected": true' && break
  sleep 0.1
done
"$B/causeway-agent" status --state-dir "$work/vm1"
echo "==> causeway-agent renew (over mutual TLS, no token)"
"$B/causeway-agent" renew --state-dir "$work/vm1"
echo "==> causewayctl agent list"
"$B/causewayctl" agent list
echo "==> causewayctl registry list (the agent registered its workload, with a VIP)"
"$B/causewayctl" registry list
echo "==> causewayctl ui --print-url (the controller's web UI: a one-time login link, valid 60 s)"
"$B/causewayctl" ui --print-url

if ! two_vms; then
  echo "==> skipping the two-VM part: it needs root (network namespaces, capture rules)"
  echo "==> demo done; everything under $work is removed"
  exit 0
fi

echo
echo "==> two VMs: network namespaces ctl, vm1, vm2 on a private bridge (10.99.0.0/24)"
id=cwdemo$$
for n in hub ctl vm1 vm2; do ip netns add "$id-$n"; netns+=("$id-$n"); done
# Each VM's own resolv.conf (ip netns exec bind-mounts /etc/netns/<ns>/resolv.conf): a
# resolver address on the bridge; the agent's DNS capture answers mesh names for it.
for n in vm1 vm2; do
  mkdir -p "/etc/netns/$id-$n"
  echo "nameserver 10.99.0.1" >"/etc/netns/$id-$n/resolv.conf"
done
ip netns exec "$id-hub" sh -c 'ip link set lo up; ip link add br0 type bridge; ip link set br0 up'
i=10
for n in ctl vm1 vm2; do
  ip link add name eth0 netns "$id-$n" type veth peer name "p$n" netns "$id-hub"
  ip netns exec "$id-hub" sh -c "ip link set p$n master br0; ip link set p$n up"
  ip netns exec "$id-$n" sh -c "ip link set lo up; ip addr add 10.99.0.$i/24 dev eth0; ip link set eth0 up; ip route add default dev eth0"
  eval "addr_$n=10.99.0.$i"
  i=$((i + 1))
done
in_ns() { local n=$1; shift; ip netns exec "$id-$n" "$@"; }
echo "==> controller in ctl ($addr_ctl:15012)"
in_ns ctl "$B/causeway-controller" --data-dir "$work/mesh" --admin-listen 127.0.0.1:15080 \
  --control-listen "$addr_ctl:15012" 2>"$work/mesh-controller.log" &
pids+=($!)
for _ in $(seq 100); do [ -f "$work/mesh/endpoints.json" ] && break; sleep 0.1; done
[ -f "$work/mesh/endpoints.json" ] || { echo "error: the controller in ctl did not start" >&2; exit 1; }
ctl() { in_ns ctl env CAUSEWAY_CONTROLLER=http://127.0.0.1:15080 CAUSEWAY_ADMIN_TOKEN_FILE="$work/mesh/admin.token" "$B/causewayctl" "$@"; }
ctl group create web --namespace default --service-account web --service web --port http:8080 >/dev/null
ctl group create client --namespace default --service-account client --service client --port http:7070 >/dev/null
for vm in vm1 vm2; do
  group=client; [ "$vm" = vm2 ] && group=web
  in_ns "$vm" "$B/causeway-agent" join "$(ctl token create --group "$group" --ttl 10m)" --state-dir "$work/$vm-mesh" >/dev/null
  eval "a=\$addr_$vm"
  echo "==> agent in $vm (group $group, capture on, address $a)"
  in_ns "$vm" "$B/causeway-agent" run --state-dir "$work/$vm-mesh" --address "$a" 2>"$work/$vm-agent.log" &
  pids+=($!)
done
echo "==> an application in vm2: python3 -m http.server 8080"
in_ns vm2 python3 -m http.server 8080 --bind 0.0.0.0 >"$work/vm2-app.log" 2>&1 &
pids+=($!)
vip=""
for _ in $(seq 100); do
  vip=$(python3 -c 'import json,sys
try: print(json.load(open(sys.argv[1]))["services"]["default/web"]["vip"] or "")
except Exception: pass' "$work/vm1-mesh/config.json" 2>/dev/null)
  [ -n "$vip" ] && grep -q -- "-d $addr_vm2/32 " "$work/vm1-mesh/capture.rules" 2>/dev/null && break
  sleep 0.1
done
[ -n "$vip" ] || { echo "error: vm1's agent did not get the web service's VIP and capture rules" >&2; exit 1; }
fetch='import sys, urllib.request; r = urllib.request.urlopen(sys.argv[1], timeout=10); print(r.status, r.reason, len(r.read()), "bytes")'
echo "==> from vm1: GET http://$vip:8080/ (the web service's VIP)"
in_ns vm1 python3 -c "$fetch" "http://$vip:8080/"
echo "==> from vm1: GET http://$addr_vm2:8080/ (its real address: captured too)"
in_ns vm1 python3 -c "$fetch" "http://$addr_vm2:8080/"
echo "==> from vm1: GET http://web.default.causeway:8080/ (an ordinary lookup, answered by vm1's agent)"
in_ns vm1 getent hosts web.default.causeway
in_ns vm1 python3 -c "$fetch" "http://web.default.causeway:8080/"
echo "==> vm2's application saw its local agent, not vm1:"
tail -n 3 "$work/vm2-app.log"
echo "==> vm2's agent knew the client's identity (mutual TLS over the tunnel):"
grep -o 'inbound tunnel stream.*' "$work/vm2-agent.log" | head -n 3
echo
echo "==> zero-trust policy: web admits only the principal causeway.local/ns/default/sa/frontend"
cat >"$work/policy.yaml" <<'YAML'
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: web-allow-frontend
  namespace: default
spec:
  selector:
    matchLabels:
      causeway.io/group: web
  rules:
  - from:
    - source:
        principals: ["causeway.local/ns/default/sa/frontend"]
YAML
ctl apply -f "$work/policy.yaml"
echo "==> causewayctl why --from client --to web:8080"
ctl why --from client --to web:8080
for _ in $(seq 100); do
  grep -q web-allow-frontend "$work/vm2-mesh/config.json" 2>/dev/null && break
  sleep 0.1
done
# The agent publishes a new state to its tunnel before it writes config.json, so the
# policy is in force once the file shows it.
echo "==> from vm1 (principal .../sa/client): GET http://$vip:8080/ is refused by vm2's agent (403 RBAC: access denied: an HTTP port, decided per request)"
if in_ns vm1 python3 -c "$fetch" "http://$vip:8080/" 2>"$work/refused.txt"; then
  echo "error: the policy did not refuse vm1's request" >&2
  exit 1
fi
echo "    refused: $(tail -n 1 "$work/refused.txt")"
grep -o 'request denied by policy.*' "$work/vm2-agent.log" | tail -n 1 | sed 's/^/    vm2 agent: /'
echo "==> vm2's agent counted the decisions (curl 127.0.0.1:15020/metrics):"
in_ns vm2 python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:15020/metrics").read().decode())' |
  grep '^causeway_agent_authz_decisions_total'
echo "==> the controller's own metrics (127.0.0.1:15014/metrics in ctl): agents connected, joins, push lag"
in_ns ctl python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:15014/metrics").read().decode())' |
  grep -E '^causeway_controller_(connected_agents|joins_total|push_lag_seconds_count)'
echo "==> causewayctl delete ap web-allow-frontend: access is back"
ctl delete ap web-allow-frontend -n default
for _ in $(seq 100); do
  grep -q web-allow-frontend "$work/vm2-mesh/config.json" 2>/dev/null || break
  sleep 0.1
done
in_ns vm1 python3 -c "$fetch" "http://$vip:8080/"
echo "==> causewayctl analyze (registries, agents, config push, policies, each agent's capture and DNS)"
ctl analyze
echo "==> causewayctl analyze -f policy.yaml (the same policy, checked before it is applied again)"
ctl analyze -f "$work/policy.yaml" || echo "    (analyze exit status $?)"
echo "==> vm1's capture rules (removed when the agent stops):"
in_ns vm1 iptables-save -t nat | grep CAUSEWAY
echo "==> demo done; the namespaces and everything under $work are removed"
