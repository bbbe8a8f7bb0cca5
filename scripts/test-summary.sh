#!/usr/bin/env bash
# Usage: scripts/test-summary.sh LOG
# Reads the output of `cargo test` (LOG) and prints the failed tests, one per line with
# the test binary they ran in, then one closing line over all test binaries:
#   N passed, N failed, N ignored
# A test binary that started but printed no result (it crashed or was killed) counts as
# one failure. Exit status 1 when anything failed, else 0.
set -euo pipefail
log=${1:?usage: scripts/test-summary.sh LOG}
awk '
  function close_target() {
    if (target != "" && !has_result) { crashed[++ncrashed] = target; failed++ }
  }
  /^ *Running / {
    close_target()
    target = $0; sub(/^ *Running /, "", target); has_result = 0; next
  }
  /^ *Doc-tests / {
    close_target()
    target = $0; sub(/^ *Doc-tests /, "doc-tests ", target); has_result = 0; next
  }
  /^test .* \.\.\. FAILED$/ {
    name = $0; sub(/^test /, "", name); sub(/ \.\.\. FAILED$/, "", name)
    names[++nnames] = name " (" target ")"; next
  }
  /^test result: / {
    has_result = 1
    for (i = 1; i <= NF; i++) {
      v = $i; gsub(/[^0-9]/, "", v)
      if ($(i + 1) ~ /^passed/) passed += v
      else if ($(i + 1) ~ /^failed/) failed += v
      else if ($(i + 1) ~ /^ignored/) ignored += v
    }
    next
  }
  END {
    close_target()
    if (nnames + ncrashed > 0) print "failed:"
    for (i = 1; i <= nnames; i++) print "  " names[i]
    for (i = 1; i <= ncrashed; i++) print "  " crashed[i] " (no result: the test binary crashed or was killed)"
    printf "%d passed, %d failed, %d ignored\n", passed, failed, ignored
    exit (failed > 0 ? 1 : 0)
  }
' "$log"
