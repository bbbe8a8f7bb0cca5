#!/usr/bin/env bash
# Runs every fuzz target for a short while: fuzz/run-briefly.sh [SECONDS] (default 20).
# Exits 0 with a message when cargo-fuzz is not installed, so CI can call it unconditionally.
# Each target starts from its committed seeds (fuzz/seeds/<target>) plus whatever
# fuzz/corpus/<target> (gitignored) holds from earlier runs. A crash fails the script;
# the input is left in fuzz/artifacts/<target>/.
set -euo pipefail
secs=${1:-20}
if ! [[ $secs =~ ^[0-9]+$ ]] || [ "$secs" -eq 0 ]; then
    echo "usage: $0 [SECONDS]   (seconds per target, default 20)" >&2
    exit 2
fi
cd "$(dirname "$0")"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: skipping the fuzz targets."
    echo "install it with: cargo install cargo-fuzz   (then re-run $0)"
    exit 0
fi
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address, ...). On a stable toolchain
# RUSTC_BOOTSTRAP=1 lets rustc accept them; on nightly it is harmless.
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-fuzz}
targets=$(cargo fuzz list)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in $targets; do
    mkdir -p "corpus/$t"
    echo "== $t: ${secs}s"
    rc=0
    nice -n "${FUZZ_NICE:-10}" cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1 || rc=$?
    # libFuzzer is chatty: show the summary lines only, or the tail on failure.
    grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb|Done [0-9]+ runs)' "$log" || true
    if [ "$rc" -ne 0 ]; then
        tail -n 40 "$log" >&2
        echo "!! $t failed (exit $rc): the input is in fuzz/artifacts/$t/;" \
            "reproduce with: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $t fuzz/artifacts/$t/<file>" >&2
        exit 1
    fi
done
echo "all fuzz targets ran ${secs}s each without a crash"
