#!/usr/bin/env bash
# What the metrics tests need (Debian package prometheus): promtool, which checks the
# controller's and the agent's /metrics expositions (tests/tests/metrics.rs), and the
# Prometheus server, which tests/tests/telemetry.rs starts itself (its own config and
# storage in a temporary directory). If systemd started the packaged service, it is
# stopped and disabled.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ensure_tools promtool:prometheus prometheus:prometheus
if systemctl list-unit-files prometheus.service >/dev/null 2>&1 \
    && systemctl is-enabled prometheus.service >/dev/null 2>&1; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
