# Booted systemd "VMs" for tests: a network namespace + systemd-nspawn running real
# systemd as PID 1 over an overlay of one cached Debian base image. Sourced by run.sh.
# Facts and workarounds: tests/vm/README.md (nspawn needs --register=no --keep-unit,
# CAP_NET_ADMIN, its own cgroup; /tmp is fresh inside; nsenter, not machinectl).
#
# Everything created is recorded and removed by vm_teardown (run it from a trap).

VM_ID=${VM_ID:-cw$$}
VM_WORK=${VM_WORK:-/var/tmp/causeway-vm-$VM_ID}
VM_BR_NS="${VM_ID}br"
VM_SUBNET=10.231.0
VM_NAMES=()
declare -A VM_IP VM_NSPAWN_PID

log() { printf '[%s +%3ss] %s\n' "$(date +%T)" "$(( $(date +%s) - ${T0:-$(date +%s)} ))" "$*"; }
die() { log "FAIL: $*"; exit 1; }

# The unpacked base image (read-only lower layer of every VM's overlay), unpacked into
# this run's work dir: the cache keeps only the compressed image, and vm_teardown removes
# the unpacked copy with the rest of the work dir.
vm_base() {
  local img
  img=$(bash "$(dirname "${BASH_SOURCE[0]}")/base-image.sh") || die "base image"
  VM_BASE="$VM_WORK/base"
  rm -rf "$VM_BASE" && mkdir -p "$VM_BASE"
  zstd -dc "$img" | tar -C "$VM_BASE" --numeric-owner -xf - || die "cannot unpack $img"
}

vm_net_up() {
  mkdir -p "$VM_WORK"
  ip netns add "$VM_BR_NS"
  ip -n "$VM_BR_NS" link set lo up
  ip -n "$VM_BR_NS" link add br0 type bridge
  ip -n "$VM_BR_NS" addr add "$VM_SUBNET.1/24" dev br0
  ip -n "$VM_BR_NS" link set br0 up
}

# vm_create NAME HOST_OCTET
vm_create() {
  local name=$1 ip="$VM_SUBNET.$2" d="$VM_WORK/$1" ns="${VM_ID}$1"
  VM_NAMES+=("$name"); VM_IP[$name]=$ip
  mkdir -p "$d/upper" "$d/work" "$d/root"
  mount -t overlay overlay -o "lowerdir=$VM_BASE,upperdir=$d/upper,workdir=$d/work" "$d/root"
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add "v$ns" type veth peer name eth0 netns "$ns"
  ip link set "v$ns" netns "$VM_BR_NS"
  ip -n "$VM_BR_NS" link set "v$ns" master br0 up
  ip -n "$ns" addr add "$ip/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via "$VM_SUBNET.1"
  local r="$d/root"
  echo "$name" >"$r/etc/hostname"
  od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$r/etc/machine-id"; echo >>"$r/etc/machine-id"
  printf '127.0.0.1 localhost\n%s %s\n' "$ip" "$name" >"$r/etc/hosts"
  for n in "${!VM_IP[@]}"; do echo "${VM_IP[$n]} $n" >>"$r/etc/hosts"; done
  # A resolver address on the private bridge (nothing answers there): queries fail fast
  # instead of leaving the VM, and the agent's DNS capture (port 53) has a target.
  echo "nameserver $VM_SUBNET.1" >"$r/etc/resolv.conf"
  install -d -m 0700 "$r/root/.ssh"
  install -m 0600 "$VM_WORK/id_ed25519.pub" "$r/root/.ssh/authorized_keys"
}

# vm_boot NAME: starts systemd-nspawn in its own cgroup, in the background.
vm_boot() {
  local name=$1 d="$VM_WORK/$1" ns="${VM_ID}$1" cg="causeway-vm-${VM_ID}-$1"
  (
    for h in unified systemd; do
      if [ -d "/sys/fs/cgroup/$h" ]; then
        mkdir -p "/sys/fs/cgroup/$h/$cg"
        echo "$BASHPID" >"/sys/fs/cgroup/$h/$cg/cgroup.procs"
      fi
    done
    exec systemd-nspawn -q -b -D "$d/root" -M "${VM_ID}-$name" --register=no --keep-unit \
      --network-namespace-path="/run/netns/$ns" --capability=CAP_NET_ADMIN \
      --console=passive --link-journal=no
  ) >"$d/console.log" 2>&1 &
  VM_NSPAWN_PID[$name]=$!
}

# PID (in this PID namespace) of the VM's systemd.
vm_init_pid() {
  local p=${VM_NSPAWN_PID[$1]} c
  for c in $(pgrep -P "$p" 2>/dev/null); do
    if [ "$(cat "/proc/$c/comm" 2>/dev/null)" = systemd ]; then echo "$c"; return 0; fi
  done
  return 1
}

# vm_exec NAME CMD...: runs a command inside the VM (all its namespaces).
vm_exec() {
  local name=$1 pid; shift
  pid=$(vm_init_pid "$name") || die "VM $name is not running (console: $VM_WORK/$name/console.log)"
  nsenter -t "$pid" -a -- "$@"
}

vm_wait_booted() {
  local name=$1 i state
  for i in $(seq 1 120); do
    if vm_init_pid "$name" >/dev/null; then
      state=$(vm_exec "$name" systemctl is-system-running 2>/dev/null || true)
      case "$state" in running|degraded) break ;; esac
    fi
    kill -0 "${VM_NSPAWN_PID[$name]}" 2>/dev/null || { tail -20 "$VM_WORK/$name/console.log"; die "VM $name exited during boot"; }
    sleep 0.5
  done
  [ "$state" = running ] || [ "$state" = degraded ] || die "VM $name did not boot (state: ${state:-none})"
  for i in $(seq 1 60); do
    ip netns exec "$VM_BR_NS" bash -c "exec 3<>/dev/tcp/${VM_IP[$name]}/22" 2>/dev/null && return 0
    sleep 0.5
  done
  die "sshd in VM $name does not answer"
}

vm_teardown() {
  local name ns cg p i h
  for name in "${VM_NAMES[@]}"; do
    p=${VM_NSPAWN_PID[$name]:-}
    [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true
  done
  for name in "${VM_NAMES[@]}"; do
    p=${VM_NSPAWN_PID[$name]:-}
    [ -n "$p" ] || continue
    for i in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$p" 2>/dev/null; then
      kill -KILL "$p" 2>/dev/null || true
      # Anything left in the VM's cgroup (its systemd and services).
      for h in unified systemd; do
        for i in $(cat "/sys/fs/cgroup/$h/causeway-vm-${VM_ID}-$name/cgroup.procs" 2>/dev/null); do kill -KILL "$i" 2>/dev/null || true; done
      done
      wait "$p" 2>/dev/null || true
    fi
  done
  for name in "${VM_NAMES[@]}"; do
    ns="${VM_ID}$name"; cg="causeway-vm-${VM_ID}-$name"
    umount -l "$VM_WORK/$name/root" 2>/dev/null || true
    for h in unified systemd; do
      # systemd inside created sub-cgroups; remove the deepest first.
      [ -d "/sys/fs/cgroup/$h/$cg" ] && find "/sys/fs/cgroup/$h/$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
    rm -rf "/run/systemd/nspawn/propagate/${VM_ID}-$name"
    ip netns del "$ns" 2>/dev/null || true
  done
  ip netns del "$VM_BR_NS" 2>/dev/null || true
  [ "${VM_KEEP_WORK:-0}" = 1 ] || rm -rf "$VM_WORK"
}
