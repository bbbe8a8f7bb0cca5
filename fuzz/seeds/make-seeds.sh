#!/usr/bin/env bash
# Regenerates the seed inputs under fuzz/seeds/ (needs openssl and python3).
# The files are committed; run this only to refresh them.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p token_decode csr_intake frame_decode
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A CSR as an agent sends it: P-256 key, DER. One asks for a SAN (ignored by the
# controller), one is bare.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$tmp/k1.pem" \
    -subj "/CN=vm-1.example" -addext "subjectAltName=DNS:vm-1.example,URI:spiffe://evil/ns/x/sa/y" \
    -outform DER -out csr_intake/p256-with-san.der 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$tmp/k2.pem" \
    -subj "/" -outform DER -out csr_intake/p256-bare.der 2>/dev/null
# A key type the controller refuses (P-384), to seed the refusal paths.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -keyout "$tmp/k3.pem" \
    -subj "/CN=p384" -outform DER -out csr_intake/p384.der 2>/dev/null

python3 - <<'PY'
import base64, struct

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)

def field(tag, payload):  # length-delimited field
    return varint(tag << 3 | 2) + varint(len(payload)) + payload

# Join token: cwt1. + base64url(TokenBody{controller, ca_fingerprint, id, secret}).
body = (field(1, b"10.0.0.1:15012") + field(2, bytes(range(32)))
        + field(3, b"0123456789abcdef") + field(4, bytes([0xA5] * 32)))
text = "cwt1." + base64.urlsafe_b64encode(body).decode().rstrip("=")
open("token_decode/valid.txt", "w").write(text + "\n")
ipv6 = (field(1, b"[2001:db8::1]:15012") + field(2, bytes([7] * 32))
        + field(3, b"t") + field(4, bytes([9] * 32)))
open("token_decode/ipv6.txt", "w").write("cwt1." + base64.urlsafe_b64encode(ipv6).decode().rstrip("="))
open("token_decode/not-a-token.txt", "w").write("cwt1.AAAA_w")

# Frames: 4-byte big-endian length + protobuf ClientRequest.
def frame(msg):
    return struct.pack(">I", len(msg)) + msg

csr = open("csr_intake/p256-with-san.der", "rb").read()
join = field(1, b"0123456789abcdef") + field(2, bytes([0xA5] * 32)) + field(3, csr) + field(4, b"vm-1")
open("frame_decode/join.bin", "wb").write(frame(field(1, join)))
open("frame_decode/renew.bin", "wb").write(frame(field(2, field(1, csr))))
# A future request kind (tag 9): decodes to no kind.
open("frame_decode/unknown-kind.bin", "wb").write(frame(bytes([0x4A, 0x02, 0x08, 0x01])))
# A ServerResponse carrying an ErrorReply{code: TokenSpent, message}.
err = bytes([0x08, 5]) + field(2, b"join token t has already been used")
open("frame_decode/error-reply.bin", "wb").write(frame(field(2, err)))
PY

# DNS queries as an application's libc or dig sends them (dns_query).
mkdir -p dns_query
python3 - <<'PY'
import struct
def q(name, qtype=1, qid=0x1234, edns=False):
    hdr = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0)
    b = hdr + b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", qtype, 1)
    if edns:
        b += b"\0" + struct.pack(">HHIH", 41, 1232, 0, 0)
    return b
seeds = {
  "a-consul.bin": q("web.service.consul"),
  "aaaa-edns-k8s.bin": q("web.default.svc.cluster.local", 28, edns=True),
  "srv-k8s-port.bin": q("_http._tcp.web.default.svc.cluster.local", 33),
  "nxdomain-causeway.bin": q("nope.default.causeway"),
  "forward-outside.bin": q("example.com"),
  "formerr-garbage.bin": struct.pack(">HHHHHH", 0x0bad, 0x0100, 1, 0, 0, 0) + b"\xc0\xff\xff",
}
for n, b in seeds.items():
    open("dns_query/" + n, "wb").write(b)
PY
# JWTs (PyJWT and cryptography for /usr/bin/python3: scripts/install-deps-jwt.sh): a token
# signed by a key the target does not trust, an unsigned one, and a query string.
mkdir -p jwt_token
/usr/bin/python3 - <<'PY'
import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519
k = ed25519.Ed25519PrivateKey.generate()
open("jwt_token/ed25519-other-key.txt", "w").write(
    jwt.encode({"iss": "fuzz", "sub": "s", "aud": "a"}, k, algorithm="EdDSA", headers={"kid": "k"}))
open("jwt_token/alg-none.txt", "w").write(jwt.encode({"iss": "fuzz", "sub": "s"}, None, algorithm="none"))
open("jwt_token/query.txt", "w").write("t=a.b.c&access_token=x.y.z")
PY
# The agent's request path (jwt_request): tokens under each key id of the target's key set,
# signed by other keys (the signature check is reached, and fails), and a query string.
mkdir -p jwt_request
/usr/bin/python3 - <<'PY'
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
claims = {"iss": "fuzz", "sub": "s", "aud": "a", "exp": 4102444800}
for alg, kid, key in [
    ("ES256", "es", ec.generate_private_key(ec.SECP256R1())),
    ("RS256", "rs", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    ("EdDSA", "ed", ed25519.Ed25519PrivateKey.generate()),
]:
    open("jwt_request/%s-other-key.txt" % kid, "w").write(
        jwt.encode(claims, key, algorithm=alg, headers={"kid": kid}))
open("jwt_request/alg-none.txt", "w").write(jwt.encode(claims, None, algorithm="none"))
open("jwt_request/query.txt", "w").write("access_token=a.b.c&t=x.y.z")
PY
ls -l token_decode csr_intake frame_decode dns_query jwt_token jwt_request
