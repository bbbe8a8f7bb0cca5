#!/usr/bin/env bash
# Installs what the web UI's browser test (tests/tests/ui.rs, tests/ui/browse.py) needs:
# Debian's chromium, its chromedriver, and selenium for Debian's python3 (/usr/bin/python3).
# Idempotent and quiet (apt's output only on failure).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

want=()
[ -x /usr/bin/chromium ] || want+=(chromium)
[ -x /usr/bin/chromedriver ] || want+=(chromium-driver)
if ! { [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import selenium' 2>/dev/null; }; then
    want+=(python3 python3-selenium)
fi
if [ "${#want[@]}" -eq 0 ]; then
    echo "install-deps-ui: chromium, chromium-driver and python3-selenium already installed"
    exit 0
fi
apt_install "${want[@]}"
echo "install-deps-ui: installed ${want[*]}"
