#!/usr/bin/env bash
# The HA store's tests run real etcd members (Debian's etcd-server, v3 API).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_tools etcd:etcd-server
