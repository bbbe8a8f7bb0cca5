#!/usr/bin/env bash
# Local mesh demo on the embedded store: a controller on a temporary sled directory,
# a workload group, a join token, and an agent that joins, renews and reports status.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
echo "==> building (cargo build --workspace --bins)"
cargo build --workspace --bins --quiet
B="$CARGO_TARGET_DIR/debug"
work=$(mktemp -d -t causeway-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "==> starting causeway-controller (data dir $work/controller)"
"$B/causeway-controller" --data-dir "$work/controller" --admin-listen 127.0.0.1:0 \
  --control-listen 127.0.0.1:0 2>"$work/controller.log" &
pids+=($!)
for _ in $(seq 100); do [ -f "$work/controller/endpoints.json" ] && break; sleep 0.1; done
[ -f "$work/controller/endpoints.json" ] || { cat "$work/controller.log"; exit 1; }
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
echo "==> demo done; everything under $work is removed"
