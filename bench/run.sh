#!/usr/bin/env bash
# Builds the benchmark programs in release mode and runs them one after another in one
# run, each next to its own baselines, printing their tables (with ratios) and the peak
# RSS of each process. Results go to BENCH_OUT (default: a temporary directory) as JSON.
#
#   bench/run.sh [PROGRAM...]   default: every program in bench/src/bin
#
# Environment:
#   <PROGRAM>_ARGS   extra arguments for one program, e.g. CA_THROUGHPUT_ARGS="--count 5000"
#   BENCH_PIN=0      do not pin ca_throughput to one CPU (default: taskset -c 0 when
#                    available, so "one core" holds for every thread of it, the fsync and
#                    sled threads included; the other programs are never pinned)
#   BENCH_OUT=DIR    keep the JSON results there
# ha_bench needs etcd (Debian etcd-server; installed here with apt-get when missing).
# The dataplane program needs root (network namespaces), stunnel4 and haproxy (installed
# here with apt-get when missing; without haproxy its two rows are skipped) and prlimit.
#   ZTUNNEL_BIN=PATH   dataplane runs Istio's ztunnel (a build with rustls + ring and its
#                    `testing` feature's fake CA) beside every path, in DATAPLANE_ROUNDS
#                    rounds (3 by default), and gives every figure as a ratio to it; it
#                    needs curl and iptables (see bench/src/bin/dataplane/versus.rs)
#   CARGO_TARGET_DIR as usual
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
target_dir=${CARGO_TARGET_DIR:-$repo/target}
out=${BENCH_OUT:-$(mktemp -d -t causeway-bench.XXXXXX)}
mkdir -p "$out"

# The data-plane benchmark's baselines are stunnel4 and haproxy: install them when missing
# and this is a Debian/Ubuntu host run as root (the tests do not need them, so no test
# script does).
wants_dataplane=1
if [ $# -gt 0 ]; then
    wants_dataplane=0
    for p in "$@"; do [ "$p" = dataplane ] && wants_dataplane=1; done
fi
if [ "$wants_dataplane" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || missing+=(stunnel4)
    command -v haproxy >/dev/null || missing+=(haproxy)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing ${missing[*]} (the data-plane baselines)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
            || echo "(could not install ${missing[*]}; the dataplane program will say what is missing)"
        # The package starts its own haproxy service; the bench runs its own processes.
        if [[ " ${missing[*]} " == *" haproxy "* ]] && command -v systemctl >/dev/null; then
            systemctl disable --now haproxy >/dev/null 2>&1 || true
        fi
    fi
fi

# ha_bench runs three etcd members (Debian's etcd-server); the package also starts its own
# etcd service, which the bench does not use.
wants_ha=1
if [ $# -gt 0 ]; then
    wants_ha=0
    for p in "$@"; do [ "$p" = ha_bench ] && wants_ha=1; done
fi
if [ "$wants_ha" = 1 ] && ! command -v etcd >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing etcd-server (ha_bench)"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server >/dev/null; then
        command -v systemctl >/dev/null && systemctl disable --now etcd >/dev/null 2>&1 || true
    else
        echo "(could not install etcd-server; ha_bench will say what is missing)"
    fi
fi

echo "== building (release)"
# One invocation (one feature set): the data-plane benchmark runs the real controller,
# agents and causewayctl next to the bench programs.
cargo build --release -p causeway-bench -p causeway-controller -p causeway-agent -p causewayctl --bins
export CAUSEWAY_BIN_DIR="$target_dir/release"

programs=("$@")
if [ ${#programs[@]} -eq 0 ]; then
    for src in bench/src/bin/*.rs; do
        programs+=("$(basename "$src" .rs)")
    done
fi

# Programs whose target is stated "on one core" run pinned to CPU 0.
pinned_programs=" ca_throughput "
pin_cmd=()
if [ "${BENCH_PIN:-1}" != 0 ] && command -v taskset >/dev/null; then
    pin_cmd=(taskset -c 0)
fi
timev=()
if [ -x /usr/bin/time ]; then
    timev=(/usr/bin/time -v -o "$out/time.txt")
else
    echo "(no /usr/bin/time: peak RSS comes from the programs' own VmHWM; apt-get install time)"
fi

echo "== machine"
echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "cpu:     $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n1) ($(nproc) CPUs online)"
echo "memory:  $(free -h 2>/dev/null | awk '/^Mem:/ {print $2}')"
echo "kernel:  $(uname -r)"
echo "rustc:   $(rustc --version)"
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min; other work on the box skews results)"
echo "temp fs: $(df -T "${TMPDIR:-/tmp}" | awk 'NR==2 {print $2 " on " $1}') (${TMPDIR:-/tmp}; the stores live there unless --dir is given)"

status=0
for p in "${programs[@]}"; do
    if [ ! -x "$target_dir/release/$p" ]; then
        echo "!! no program $p (have: $(cd bench/src/bin && ls -- *.rs | sed 's/\.rs$//' | tr '\n' ' '))" >&2
        status=1
        continue
    fi
    args_var="$(echo "$p" | tr '[:lower:]-' '[:upper:]_')_ARGS"
    read -r -a extra <<<"${!args_var:-}"
    pin=()
    case "$pinned_programs" in *" $p "*) pin=("${pin_cmd[@]}") ;; esac
    echo
    echo "== $p ${extra[*]} (pinned: ${pin[*]:-no})"
    rc=0
    "${timev[@]}" "${pin[@]}" "$target_dir/release/$p" --json "$out/$p.json" "${extra[@]}" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "!! $p exited with $rc" >&2
        status=1
        continue
    fi
    if [ -f "$out/time.txt" ]; then
        rss=$(sed -n 's/^[[:space:]]*Maximum resident set size (kbytes): //p' "$out/time.txt")
        user=$(sed -n 's/^[[:space:]]*User time (seconds): //p' "$out/time.txt")
        sys=$(sed -n 's/^[[:space:]]*System time (seconds): //p' "$out/time.txt")
        wall=$(sed -n 's/^[[:space:]]*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$out/time.txt")
        echo "process: peak RSS $((rss / 1024)) MiB (/usr/bin/time -v), user ${user}s, sys ${sys}s, wall ${wall} (setup included)"
        mv "$out/time.txt" "$out/$p.time.txt"
    fi
done
echo
echo "JSON results in $out"
exit "$status"
