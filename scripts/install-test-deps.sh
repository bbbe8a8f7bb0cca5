#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
command -v python3 >/dev/null || need_apt+=(python3)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

for tool in cargo rustfmt cargo-clippy; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found; install the Rust toolchain with rustfmt and clippy (rustup component add rustfmt clippy)" >&2; exit 1; }
done

# Each subsystem's own installs (real client libraries, network tools, ...).
for extra in scripts/install-deps-*.sh; do
  [ -e "$extra" ] || continue
  echo "==> $extra"
  bash "$extra"
done
echo "==> test dependencies installed"
