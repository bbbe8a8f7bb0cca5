#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
ensure_tools curl:curl python3:python3

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
