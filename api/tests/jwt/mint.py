#!/usr/bin/python3
"""Mints test JWTs with PyJWT and `cryptography` (a JWT library outside the project).

Usage: mint.py ISSUER AUDIENCE
Prints one JSON object: for each algorithm, the JWKS holding its public key and tokens:
valid, expired, wrong_issuer, wrong_audience, bad_signature (signed by another key under
the same kid), future_nbf, unknown_kid, within_skew (expired 30 s ago); for ES256 also many_claims (valid,
with 10,000 extra claims); and one `alg: none` token for the whole run.
"""
import json
import sys
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

issuer, audience = sys.argv[1], sys.argv[2]
now = int(time.time())


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


KEYS = {
    "RS256": (rsa_key, RSAAlgorithm),
    "RS384": (rsa_key, RSAAlgorithm),
    "RS512": (rsa_key, RSAAlgorithm),
    "PS256": (rsa_key, RSAAlgorithm),
    "ES256": (lambda: ec.generate_private_key(ec.SECP256R1()), ECAlgorithm),
    "ES384": (lambda: ec.generate_private_key(ec.SECP384R1()), ECAlgorithm),
    "EdDSA": (ed25519.Ed25519PrivateKey.generate, OKPAlgorithm),
}

out = {}
for alg, (make, algo) in KEYS.items():
    key, other = make(), make()
    kid = "k-" + alg.lower()
    jwk = json.loads(algo.to_jwk(key.public_key()))
    jwk["kid"] = kid
    base = {
        "iss": issuer,
        "sub": "user-" + alg.lower(),
        "aud": [audience, "other"],
        "azp": "web-app",
        "iat": now,
        "exp": now + 600,
        "groups": ["dev", "admin"],
        "org": {"team": "payments", "level": 3},
    }

    def tok(claims=None, signer=key, kid=kid, **changes):
        c = dict(base if claims is None else claims)
        c.update(changes)
        return jwt.encode(c, signer, algorithm=alg, headers={"kid": kid})

    out[alg] = {
        "jwks": json.dumps({"keys": [jwk]}),
        "valid": tok(),
        "expired": tok(exp=now - 3600),
        "within_skew": tok(exp=now - 30),
        "future_nbf": tok(nbf=now + 3600),
        "wrong_issuer": tok(iss="https://evil.example"),
        "wrong_audience": tok(aud="someone-else"),
        "bad_signature": tok(signer=other),
        "unknown_kid": tok(kid="k-rotated"),
        "principal": issuer + "/user-" + alg.lower(),
    }
    if alg == "ES256":
        out[alg]["many_claims"] = tok(**{"c%d" % i: i for i in range(10000)})

out["none"] = jwt.encode(
    {"iss": issuer, "sub": "x", "aud": audience, "exp": now + 600}, None, algorithm="none"
)
print(json.dumps(out))
