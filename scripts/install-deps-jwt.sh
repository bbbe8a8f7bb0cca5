#!/usr/bin/env bash
# Installs what the JWT tests (api/tests/jwt.rs, node-agent/tests/jwks.rs) need: PyJWT and
# cryptography for Debian's python3 (/usr/bin/python3) to mint tokens with a JWT library
# outside the project, and openssl for the JWKS server's test CA.
# Idempotent and quiet (apt's output only on failure).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

want=()
if ! { [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import jwt, cryptography' 2>/dev/null; }; then
    want+=(python3 python3-jwt python3-cryptography)
fi
command -v openssl >/dev/null || want+=(openssl)
if [ "${#want[@]}" -eq 0 ]; then
    echo "install-deps-jwt: python3-jwt, python3-cryptography and openssl already installed"
    exit 0
fi
apt_install "${want[@]}"
echo "install-deps-jwt: installed ${want[*]}"
