#!/usr/bin/env bash
# Builds (once) and prints the path of the cached Debian base image for VM tests:
# a debootstrap minbase bookworm root with systemd, sshd, python3-apt and iptables,
# packed as a zstd tarball. The cache key is the suite, mirror and package list, so a
# change to any of them builds a new image; old images are removed.
set -euo pipefail
CACHE=${CAUSEWAY_VM_CACHE:-/var/cache/causeway-vm}
SUITE=bookworm
MIRROR=${CAUSEWAY_VM_MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PKGS=systemd,systemd-sysv,dbus,iproute2,iptables,nftables,openssh-server,python3,python3-apt,iputils-ping,curl,libcap2-bin,procps
key=$(printf '%s\n' "$SUITE" "$MIRROR" "$PKGS" v1 | sha256sum | cut -c1-16)
img="$CACHE/base-$key.tar.zst"
# Earlier versions kept an unpacked copy and the downloaded .debs here (~270 MB more).
rm -rf "$CACHE"/base-*.root "$CACHE"/base-*.unpack.lock "$CACHE/debs" 2>/dev/null || true
if [ -s "$img" ]; then echo "$img"; exit 0; fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [ -s "$img" ]; then echo "$img"; exit 0; fi
start=$(date +%s)
root=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "building VM base image $img (first run only, ~2 min)" >&2
debootstrap --variant=minbase --include="$PKGS" \
  "$SUITE" "$root/rootfs" "$MIRROR" >"$root/debootstrap.log" 2>&1 || {
  tail -30 "$root/debootstrap.log" >&2; echo "error: debootstrap failed (log above)" >&2; exit 1; }
r="$root/rootfs"
# Root may log in with the test's key only; no DNS outside; a quiet console.
sed -i 's/^#\?PermitRootLogin.*/PermitRootLogin prohibit-password/' "$r/etc/ssh/sshd_config"
echo 'UseDNS no' >>"$r/etc/ssh/sshd_config"
rm -f "$r"/etc/ssh/ssh_host_*            # per VM, generated at boot
ln -sf /lib/systemd/system/ssh.service "$r/etc/systemd/system/multi-user.target.wants/ssh.service"
cat >"$r/etc/systemd/system/ssh-keygen-host.service" <<'UNIT'
[Unit]
Description=Generate SSH host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/ssh-keygen-host.service "$r/etc/systemd/system/multi-user.target.wants/ssh-keygen-host.service"
for u in systemd-timesyncd apt-daily.timer apt-daily-upgrade.timer; do
  rm -f "$r/etc/systemd/system/"*.wants/"$u"* 2>/dev/null || true
done
apt_clean() { rm -rf "$r/var/cache/apt/archives/"*.deb "$r/var/lib/apt/lists/"*; }
apt_clean
rm -f "$CACHE"/base-*.tar.zst
tar -C "$r" --numeric-owner -cf - . | zstd -q -T0 -3 -o "$img.tmp"
mv "$img.tmp" "$img"
echo "base image built in $(( $(date +%s) - start ))s ($(du -h "$img" | cut -f1))" >&2
echo "$img"
