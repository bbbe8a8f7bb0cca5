#!/usr/bin/env bash
# Installs what the VM tier (tests/vm/) and the Debian packaging need (idempotent):
# debootstrap and systemd-nspawn to boot Debian VMs, ansible + ssh to roll out,
# dpkg-dev/lintian/fakeroot to build and check the .debs, zstd for the image cache.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
export DEBIAN_FRONTEND=noninteractive
pkgs=(debootstrap systemd-container ansible lintian dpkg-dev fakeroot binutils zstd openssh-client iproute2 iptables util-linux python3 curl ca-certificates)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  # Without recommends (apt_install): systemd-container would otherwise pull
  # libnss-mymachines, which edits this host's /etc/nsswitch.conf.
  apt_install "${missing[@]}"
fi
# ansible-lint: Debian's package when it exists, else pip into a private venv.
if ! command -v ansible-lint >/dev/null; then
  if apt-cache show ansible-lint >/dev/null 2>&1; then
    apt_install ansible-lint
  fi
fi
echo "==> VM tier dependencies installed"
