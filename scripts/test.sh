#!/usr/bin/env bash
# Installs what the tests need, builds every binary, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
start=$(date +%s)
bash scripts/install-test-deps.sh
echo "==> cargo build --workspace --bins"
cargo build --workspace --bins
echo "==> cargo test --workspace"
cargo test --workspace
echo "==> all tests passed in $(( $(date +%s) - start ))s"
