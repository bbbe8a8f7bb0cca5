#!/usr/bin/env bash
# Installs what the tests need, builds every binary, and runs every test: the whole
# suite runs even when a crate fails (--no-fail-fast), and the last line sums up all
# test binaries as "N passed, N failed, N ignored" (the failed tests are listed above it).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
start=$(date +%s)
bash scripts/install-test-deps.sh
echo "==> cargo build --workspace --bins"
cargo build --workspace --bins
echo "==> cargo test --workspace --no-fail-fast"
log=$(mktemp -t causeway-test.XXXXXX)
trap 'rm -f "$log"' EXIT
rc=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || rc=$?
echo "==> tests finished in $(( $(date +%s) - start ))s (cargo test exit status $rc)"
summary_rc=0
bash scripts/test-summary.sh "$log" || summary_rc=$?
# A build error runs no test at all: the summary alone would read as a pass.
[ "$rc" = 0 ] && [ "$summary_rc" = 0 ] || exit 1
