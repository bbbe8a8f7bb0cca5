#!/usr/bin/env bash
# VM tier: the packaged Causeway rolled out with Ansible onto booted systemd VMs.
#
#   tests/vm/run.sh            (root; run by tests/tests/vm_rollout.rs)
#
# One controller VM and two agent VMs (systemd-nspawn, systemd as PID 1, one cached
# Debian base image, overlay per VM) on a private bridge in its own network namespace;
# ansible-playbook runs over ssh from that namespace. Asserts: rollout active and ready,
# second run changed=0, a version bump restarts through the handler, VM 1 reaches VM 2's
# STRICT service through the mTLS tunnel (by address, VIP and mesh name), stop leaves
# no rule, SIGKILL + start recovers,
# systemd-analyze verify/security, apt purge removes user, state and rules.
#
# Environment:
#   CAUSEWAY_DEB_PROFILE / CAUSEWAY_DEB_BIN_DIR / CAUSEWAY_DEB_SKIP_CARGO: passed to
#     packaging/deb/build (the Rust test packages the binaries it was built with).
#   VM_KEEP_WORK=1: keep the work directory (logs) after the run.
set -euo pipefail
T0=$(date +%s)
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

[ "$(id -u)" = 0 ] || { echo "error: the VM tier needs root (network namespaces, mounts, systemd-nspawn)" >&2; exit 1; }
for t in systemd-nspawn debootstrap ansible-playbook zstd ssh-keygen nsenter dpkg-deb; do
  command -v "$t" >/dev/null || { echo "error: $t not found; run scripts/install-deps-vm.sh" >&2; exit 1; }
done

# shellcheck source=tests/vm/lib.sh
source "$here/lib.sh"
cleanup() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    for n in "${VM_NAMES[@]}"; do
      echo "---- $n: journal of causeway units (last 40 lines)"
      vm_exec "$n" journalctl -u causeway-agent -u causeway-controller --no-pager -n 40 2>/dev/null || true
    done
  fi
  log "tearing down"
  vm_teardown
  log "total time $(( $(date +%s) - T0 ))s (exit $rc)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ssh_opts=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=10)

# 1. Packages: version 1 for the rollout, version 2 for the upgrade.
mkdir -p "$VM_WORK"
# Fast compression: these packages only travel over a veth (xz of debug binaries costs minutes).
export CAUSEWAY_DEB_COMPRESS=${CAUSEWAY_DEB_COMPRESS:--Zgzip -z1}
log "building packages"
pstart=$(date +%s)
CAUSEWAY_DEB_OUT="$VM_WORK/debs1" CAUSEWAY_DEB_VERSION=0.1.0-1 bash "$repo/packaging/deb/build" | sed 's/^/    /'
CAUSEWAY_DEB_OUT="$VM_WORK/debs2" CAUSEWAY_DEB_VERSION=0.1.0-2 CAUSEWAY_DEB_SKIP_CARGO=1 CAUSEWAY_DEB_NO_LINTIAN=1 \
  bash "$repo/packaging/deb/build" | sed 's/^/    /'
log "packages built in $(( $(date +%s) - pstart ))s"

if command -v ansible-lint >/dev/null; then
  (cd "$repo" && ansible-lint -q --offline ansible/site.yml >"$VM_WORK/ansible-lint.log" 2>&1) \
    || { cat "$VM_WORK/ansible-lint.log"; die "ansible-lint ansible/site.yml reports problems"; }
  log "OK ansible-lint ansible/site.yml: clean"
else
  die "ansible-lint not found; run scripts/install-deps-vm.sh"
fi

# 2. VMs.
vm_base
log "base image ready: $VM_BASE"
ssh-keygen -q -t ed25519 -N '' -C causeway-vm-test -f "$VM_WORK/id_ed25519"
vm_net_up
vm_create ctl 10
vm_create a1 11
vm_create a2 12
for n in ctl a1 a2; do vm_boot "$n"; done
for n in ctl a1 a2; do vm_wait_booted "$n"; done
log "3 VMs booted"

# VM 2 runs an application the mesh will carry: HTTP on 8080.
vm_exec a2 bash -c 'mkdir -p /var/tmp/www && echo "hello from a2" >/var/tmp/www/index.html'
vm_exec a2 systemd-run --quiet --unit=web-app python3 -m http.server 8080 --bind 0.0.0.0 --directory /var/tmp/www

# 3. Ansible inventory for these VMs.
inv="$VM_WORK/inventory"
mkdir -p "$inv/group_vars"
cat >"$inv/hosts.ini" <<EOF
[causeway_controller]
ctl ansible_host=${VM_IP[ctl]}

[causeway_agents]
a1 ansible_host=${VM_IP[a1]} causeway_agent_group=client
a2 ansible_host=${VM_IP[a2]} causeway_agent_group=web

[all:vars]
ansible_user=root
ansible_become=false
ansible_python_interpreter=/usr/bin/python3
ansible_ssh_private_key_file=$VM_WORK/id_ed25519
EOF
cat >"$inv/group_vars/causeway_controller.yml" <<'EOF'
---
causeway_groups:
  - name: web
    service: web
    ports: ["http:8080"]
    mtls: strict
  - name: client
    service: client
    ports: ["http:8081"]
EOF
cat >"$inv/group_vars/causeway_agents.yml" <<'EOF'
---
causeway_agent_serial: 1
EOF

playbook() { # playbook DEB_DIR LOG
  local rc=0
  ip netns exec "$VM_BR_NS" env ANSIBLE_HOST_KEY_CHECKING=False ANSIBLE_PIPELINING=True \
    ANSIBLE_SSH_ARGS="${ssh_opts[*]} -o ControlMaster=auto -o ControlPersist=120s -o ControlPath=$VM_WORK/ssh-%C" \
    ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 ANSIBLE_RETRY_FILES_ENABLED=0 ANSIBLE_STDOUT_CALLBACK=default \
    ansible-playbook -i "$inv/hosts.ini" "$repo/ansible/site.yml" -e "causeway_deb_dir=$1" >"$2" 2>&1 || rc=$?
  sed -n '/PLAY RECAP/,$p' "$2" | sed 's/^/    /'
  [ $rc -eq 0 ] || { tail -40 "$2"; die "ansible-playbook failed (rc $rc); log above"; }
}
recap() { # recap LOG HOST FIELD
  sed -n "/PLAY RECAP/,\$p" "$1" | awk -v h="$2" -v f="$3=" '$1==h { for (i=1;i<=NF;i++) if (index($i,f)==1) { sub(f,"",$i); s+=$i } } END { print s+0 }'
}

# 4. Rollout.
log "ansible-playbook: first run"
playbook "$VM_WORK/debs1" "$VM_WORK/ansible-1.log"
for n in a1 a2; do
  s=$(vm_exec "$n" systemctl is-active causeway-agent || true)
  [ "$s" = active ] || die "causeway-agent on $n is '$s', not active"
  vm_exec "$n" curl -fsS --max-time 5 http://127.0.0.1:15020/healthz/ready >/dev/null || die "agent on $n not ready"
done
s=$(vm_exec ctl systemctl is-active causeway-controller || true)
[ "$s" = active ] || die "causeway-controller is '$s', not active"
log "OK rollout: controller and both agents active and ready"
m=$(vm_exec a1 curl -fsS --max-time 5 http://127.0.0.1:15020/metrics) || die "no /metrics on a1"
grep -qx 'causeway_agent_ready 1' <<<"$m" || die "a1 metrics do not say ready: $m"
grep -qx 'causeway_agent_controller_connected 1' <<<"$m" || die "a1 metrics: not connected: $m"
grep -Eq '^causeway_agent_config_version [1-9]' <<<"$m" || die "a1 metrics: no config version: $m"
log "OK /metrics on a1: ready, connected, config version $(sed -n 's/^causeway_agent_config_version //p' <<<"$m")"

log "ansible-playbook: second run (must change nothing)"
playbook "$VM_WORK/debs1" "$VM_WORK/ansible-2.log"
for h in ctl a1 a2; do
  c=$(recap "$VM_WORK/ansible-2.log" "$h" changed)
  [ "$c" = 0 ] || die "second run changed $c task(s) on $h (log: $VM_WORK/ansible-2.log)"
done
log "OK second run: changed=0 on every host"

# 5. The mesh: VM 1 -> VM 2's STRICT service through the tunnel.
vip=""
for i in $(seq 1 60); do
  vip=$(vm_exec a1 python3 - <<EOF 2>/dev/null || true
import json
s = json.load(open("/var/lib/causeway/config.json"))
svc = s["services"]["default/web"]
assert any(e["address"] == "${VM_IP[a2]}" for e in svc["endpoints"].values())
assert "-d ${VM_IP[a2]}/32 " in open("/var/lib/causeway/capture.rules").read()
print(svc["vip"])
EOF
)
  [ -n "$vip" ] && break
  sleep 0.5
done
[ -n "$vip" ] || die "VM 1's agent never routed default/web at ${VM_IP[a2]}"
out=$(vm_exec a1 curl -fsS --max-time 10 "http://${VM_IP[a2]}:8080/") || die "VM 1 cannot reach VM 2 by address"
[ "$out" = "hello from a2" ] || die "VM 1 got '$out' by address"
out=$(vm_exec a1 curl -fsS --max-time 10 "http://$vip:8080/") || die "VM 1 cannot reach VM 2 by VIP $vip"
[ "$out" = "hello from a2" ] || die "VM 1 got '$out' by VIP"
# The group is STRICT: plaintext from a host without an agent is refused, so the
# successful requests above went through the mTLS tunnel.
if ip netns exec "$VM_BR_NS" curl -fsS --max-time 3 "http://${VM_IP[a2]}:8080/" >/dev/null 2>&1; then
  die "VM 2's STRICT service answered plaintext from off-host"
fi
log "OK VM 1 -> VM 2 (STRICT) by address and by VIP $vip through the tunnel; plaintext refused"
# By mesh name: the application's ordinary lookup (resolv.conf untouched) is captured
# by the agent's DNS, answered with the VIP, and the connection goes through the tunnel.
out=$(vm_exec a1 curl -fsS --max-time 10 "http://web.default.causeway:8080/") || die "VM 1 cannot reach web.default.causeway"
[ "$out" = "hello from a2" ] || die "VM 1 got '$out' by mesh name"
log "OK VM 1 -> VM 2 by mesh name web.default.causeway (agent DNS, capture, tunnel)"

# 6. Upgrade: a new package version restarts the agents through the handler.
pid1=$(vm_exec a1 systemctl show -P MainPID causeway-agent)
log "ansible-playbook: upgrade to 0.1.0-2"
playbook "$VM_WORK/debs2" "$VM_WORK/ansible-3.log"
grep -q "RUNNING HANDLER \[causeway_agent : Restart causeway-agent\]" "$VM_WORK/ansible-3.log" \
  || die "upgrade did not run the restart handler (log: $VM_WORK/ansible-3.log)"
for n in a1 a2; do
  v=$(vm_exec "$n" dpkg-query -W -f='${Version}' causeway-agent)
  [ "$v" = 0.1.0-2 ] || die "$n has causeway-agent $v after the upgrade"
  s=$(vm_exec "$n" systemctl is-active causeway-agent || true)
  [ "$s" = active ] || die "causeway-agent on $n is '$s' after the upgrade"
done
pid2=$(vm_exec a1 systemctl show -P MainPID causeway-agent)
[ "$pid1" != "$pid2" ] || die "agent on a1 was not restarted by the upgrade (pid $pid1)"
log "OK upgrade: 0.1.0-2 installed, agents restarted by the handler (pid $pid1 -> $pid2), active"

# 7. Unit checks inside a VM.
vm_exec a1 systemd-analyze verify /usr/lib/systemd/system/causeway-agent.service \
  || die "systemd-analyze verify causeway-agent.service failed"
vm_exec ctl systemd-analyze verify /usr/lib/systemd/system/causeway-controller.service \
  || die "systemd-analyze verify causeway-controller.service failed"
for u in a1:causeway-agent ctl:causeway-controller; do
  score=$(vm_exec "${u%%:*}" systemd-analyze security --no-pager "${u#*:}.service" | tail -1)
  log "systemd-analyze security ${u#*:}.service: ${score#*exposure level for }"
done
caps=$(vm_exec a1 bash -c 'grep -E "^Cap(Eff|Amb)" /proc/$(systemctl show -P MainPID causeway-agent)/status')
log "agent runs as $(vm_exec a1 ps -o user= -p "$pid2") with $(echo $caps)"
vm_exec a1 causeway-agent doctor --state-dir /var/lib/causeway >/dev/null || die "doctor reports drift on a1"
vm_exec a1 iptables-save | grep CAUSEWAY >/dev/null || die "no CAUSEWAY rules on a1 while the agent runs"
log "OK verify, security, capture installed by the non-root agent (doctor: no drift)"
# Priorities reach the journal: "agent ready" is info, so -p warning must not show it.
# (Whole output first: `grep -q` would stop reading early, and journalctl's SIGPIPE
# fails the pipeline under pipefail.)
journal_info=$(vm_exec a1 journalctl -u causeway-agent -p info --no-pager -o cat)
journal_warn=$(vm_exec a1 journalctl -u causeway-agent -p warning --no-pager -o cat)
grep -q "agent ready" <<<"$journal_info" || die "the agent's info messages are not in the journal"
if grep -q "agent ready" <<<"$journal_warn"; then
  die "journalctl -p warning shows info messages: priorities are not set"
fi
echo "    journalctl -u causeway-agent -p warning on a1:"
vm_exec a1 journalctl -u causeway-agent -p warning --no-pager -o short -n 10 | sed 's/^/      /' || true

# 8. Stop leaves nothing; SIGKILL then start recovers.
vm_exec a1 systemctl stop causeway-agent
if vm_exec a1 iptables-save | grep CAUSEWAY >/dev/null; then die "rules left after systemctl stop"; fi
log "OK systemctl stop: no CAUSEWAY rule left"
vm_exec a1 systemctl start causeway-agent
vm_exec a1 systemctl kill -s KILL causeway-agent
for i in $(seq 1 40); do
  st=$(vm_exec a1 systemctl show -P ActiveState causeway-agent)
  [ "$st" != active ] && break
  sleep 0.25
done
vm_exec a1 systemctl start causeway-agent
for i in $(seq 1 60); do
  vm_exec a1 curl -fsS --max-time 2 http://127.0.0.1:15020/healthz/ready >/dev/null 2>&1 && break
  sleep 0.5
done
vm_exec a1 curl -fsS --max-time 2 http://127.0.0.1:15020/healthz/ready >/dev/null || die "agent not ready after SIGKILL + start"
vm_exec a1 causeway-agent doctor --state-dir /var/lib/causeway >/dev/null || die "doctor reports drift after SIGKILL + start"
out=$(vm_exec a1 curl -fsS --max-time 10 "http://$vip:8080/") || die "VM 1 cannot reach VM 2 after SIGKILL + start"
[ "$out" = "hello from a2" ] || die "VM 1 got '$out' after SIGKILL + start"
log "OK systemctl kill -s KILL + start: ready, rules as expected, traffic flows"

# 9. Purge removes the user, the state and the rules.
vm_exec a1 env DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq causeway-agent >/dev/null
vm_exec a1 getent passwd causeway >/dev/null && die "user causeway left after purge"
vm_exec a1 test -e /var/lib/causeway && die "/var/lib/causeway left after purge"
vm_exec a1 test -e /etc/causeway/agent.toml && die "/etc/causeway/agent.toml left after purge"
if vm_exec a1 iptables-save | grep CAUSEWAY >/dev/null; then die "rules left after purge"; fi
log "OK apt purge: no user, no state, no config, no rules"
log "PASS"
