#!/usr/bin/env bash
# What the metrics test needs: promtool (Debian package prometheus), which checks the
# controller's and the agent's /metrics expositions (tests/tests/metrics.rs). The package
# also ships a Prometheus server; if systemd started it, it is stopped and disabled (the
# tests need only the tool).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ensure_tools promtool:prometheus
if systemctl list-unit-files prometheus.service >/dev/null 2>&1 \
    && systemctl is-enabled prometheus.service >/dev/null 2>&1; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
