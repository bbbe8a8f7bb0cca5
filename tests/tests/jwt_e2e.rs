//! End-user authentication and request-level authorization end to end, in network
//! namespaces created by the test: a controller, a client VM and a server VM with agents
//! (capture on), the server's application on an HTTP port. Tokens are minted by PyJWT
//! (`api/tests/jwt/mint.py`, `scripts/install-deps-jwt.sh`); the issuer's key set is
//! served over HTTPS (`node-agent/tests/jwks/serve.py`, a certificate from an rcgen test
//! CA that the server's agent trusts through `[jwt] ca_file`) inside the server VM. Needs
//! root; fails loudly without it.
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use causeway_api::push::MeshState;
use causeway_tests::netns::{Lab, Proc, require_root};
use causeway_tests::{bin, describe, wait_for};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "cart";

/// The application: answers every request 200 with what it received that the agent may
/// change: `METHOD PATH auth=<Authorization> team=<X-Team>`.
const APP_PY: &str = r#"
import sys
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n: self.rfile.read(n)
        body = ("%s %s auth=%s team=%s" % (self.command, self.path,
                self.headers.get("Authorization", "-")[:16], self.headers.get("X-Team", "-"))).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = answer
    def log_message(self, *a): pass
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

/// Client: `URL METHOD TOKEN` (`-`: no token). Prints the status, the `WWW-Authenticate`
/// header (or `-`) and the body, one per line.
const CLIENT_PY: &str = r#"
import sys, urllib.request, urllib.error
url, method, token = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request(url, method=method, data=b"" if method in ("POST", "PUT") else None)
if token != "-": req.add_header("Authorization", "Bearer " + token)
try:
    r = urllib.request.urlopen(req, timeout=20); status, headers, body = r.status, r.headers, r.read()
except urllib.error.HTTPError as e:
    status, headers, body = e.code, e.headers, e.read()
print(status); print(headers.get("WWW-Authenticate", "-")); print(body.decode())
"#;

/// Raw client for request heads too large for `urllib`'s argv: `HOST PORT FILE` sends
/// `GET /public/x` with `Authorization: <FILE's bytes>` and prints the status line. The
/// agent may answer and close before it has read the whole head, so a failed send is not
/// an error: the answer is read all the same.
const RAW_PY: &str = r#"
import socket, sys
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
auth = open(path, "rb").read()
s = socket.create_connection((host, port), timeout=20)
req = b"GET /public/x HTTP/1.1\r\nHost: web\r\nAuthorization: " + auth + b"\r\nConnection: close\r\n\r\n"
try:
    s.sendall(req)
except OSError:
    pass
data = b""
try:
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
except OSError:
    pass
print(data.split(b"\r\n")[0].decode(errors="replace"))
"#;

/// The algorithms `mint.py` signs with (every one the agent accepts but PS384/PS512).
const ALGORITHMS: [&str; 7] = [
    "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA",
];

/// A key whose material is malformed (`x` is not base64url, `y` too short), in the same
/// key set as the good ones: the agent leaves it out and keeps the others.
const BROKEN_KEY: &str = r#"{"kty":"EC","crv":"P-256","kid":"k-broken","x":"!!","y":"AAAA"}"#;

/// One key set with the public key of every algorithm's issuer key and [`BROKEN_KEY`].
fn combined_jwks(minted: &Value) -> String {
    let mut keys: Vec<Value> = Vec::new();
    for alg in ALGORITHMS {
        let set: Value = serde_json::from_str(minted[alg]["jwks"].as_str().unwrap()).unwrap();
        keys.extend(set["keys"].as_array().unwrap().iter().cloned());
    }
    keys.insert(3, serde_json::from_str(BROKEN_KEY).unwrap());
    serde_json::json!({ "keys": keys }).to_string()
}

/// `len` bytes of printable garbage (no space, so the agent sees one long token).
fn garbage(len: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 94) as u8)
        })
        .collect()
}

fn mint() -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../api/tests/jwt/mint.py");
    let out = Command::new("/usr/bin/python3")
        .args([script, ISSUER, AUDIENCE])
        .output()
        .expect("run /usr/bin/python3 (scripts/install-deps-jwt.sh installs it)");
    assert!(
        out.status.success(),
        "mint.py failed (PyJWT and cryptography come from scripts/install-deps-jwt.sh): {}",
        describe(&out)
    );
    serde_json::from_slice(&out.stdout).expect("mint.py prints JSON")
}

/// A test CA and a certificate for 127.0.0.1 in `dir` (cert.pem, key.pem); returns the
/// CA's PEM path.
fn make_ca(dir: &Path) -> PathBuf {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    ca_path
}

fn config(state: &Path) -> MeshState {
    std::fs::read(state.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// One answer of [`CLIENT_PY`].
#[derive(Debug)]
struct Answer {
    status: u16,
    www_authenticate: String,
    body: String,
}

/// Requests, the JWT rules and the policies, in order of the issue's list; see the
/// module docs for the setup.
#[test]
fn jwt_and_request_attributes_are_enforced_on_http_ports() {
    require_root("the JWT end-to-end test");
    let minted = mint();
    let es = &minted["ES256"];
    let tok = |k: &str| es[k].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let lab = Lab::new(&["ctl", "vm1", "vm2"]);
    let (ctl, vm1, vm2) = (lab.node("ctl"), lab.node("vm1"), lab.node("vm2"));
    let mut procs: Vec<Proc> = Vec::new();

    // The controller and the groups: web serves HTTP on 8080.
    let data = root.join("controller");
    procs.push(Proc::spawn(
        ctl,
        &root.join("controller.log"),
        bin("causeway-controller"),
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--admin-listen",
            "127.0.0.1:0",
            "--control-listen",
            &format!("{}:15012", ctl.addr),
        ],
    ));
    let endpoints: Value = wait_for("controller endpoints.json", WAIT, || {
        serde_json::from_str(&std::fs::read_to_string(data.join("endpoints.json")).ok()?).ok()
    });
    let admin = endpoints["admin"].as_str().unwrap().to_owned();
    let ctl_ok = |args: &[&str]| ctl.causewayctl(&admin, &data, args);
    for (group, port) in [("web", "http:8080"), ("client", "http:7070")] {
        ctl_ok(&[
            "group",
            "create",
            group,
            "--namespace",
            "default",
            "--service-account",
            group,
            "--service",
            group,
            "--port",
            port,
        ]);
    }
    let join = |vm: &causeway_tests::netns::Node, group: &str| {
        let token = ctl_ok(&["token", "create", "--group", group]);
        let state = root.join(group);
        let out = vm
            .cmd(bin("causeway-agent"))
            .args(["join", token.trim(), "--state-dir", state.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "join {group}: {}", describe(&out));
        state
    };
    let s1 = join(vm1, "client");
    let s2 = join(vm2, "web");

    // The issuer's key set over HTTPS inside vm2, where its agent fetches it.
    std::fs::create_dir(root.join("www")).unwrap();
    let ca = make_ca(&root);
    let jwks_path = root.join("www/jwks.json");
    // Every algorithm's key and one malformed key in one set.
    let jwks = combined_jwks(&minted);
    std::fs::write(&jwks_path, &jwks).unwrap();
    let serve = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../node-agent/tests/jwks/serve.py"
    );
    let jwks_log = root.join("jwks-server.log");
    let mut jwks_server = Proc::spawn(
        vm2,
        &jwks_log,
        "/usr/bin/python3",
        &[
            serve,
            root.join("www").to_str().unwrap(),
            root.join("cert.pem").to_str().unwrap(),
            root.join("key.pem").to_str().unwrap(),
        ],
    );
    let jwks_port: u16 = jwks_server.wait_for("the JWKS server's port", WAIT, || {
        std::fs::read_to_string(&jwks_log)
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    });
    // Kept apart from `procs`: it is stopped later to show the last good key set is kept.

    // The application and the agents; vm2's trusts the test CA for the key set.
    procs.push(Proc::spawn(
        vm2,
        &root.join("app.log"),
        "python3",
        &["-c", APP_PY, "8080"],
    ));
    let agent_cfg = root.join("vm2.agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            // A short refresh_interval: after the JWKS server stops, the agent's fetches
            // fail within the test and the last good set must carry the requests.
            "[jwt]\nca_file = {:?}\nunknown_kid_interval = \"0s\"\nrefresh_interval = \"1s\"\n",
            ca.to_str().unwrap()
        ),
    )
    .unwrap();
    let vm2_log = root.join("vm2.agent.log");
    let vm1_log = root.join("vm1.agent.log");
    let v2addr = vm2.addr.to_string();
    procs.push(Proc::spawn(
        vm2,
        &vm2_log,
        bin("causeway-agent"),
        &[
            "run",
            "--config",
            agent_cfg.to_str().unwrap(),
            "--state-dir",
            s2.to_str().unwrap(),
            "--address",
            &v2addr,
        ],
    ));
    let v1addr = vm1.addr.to_string();
    procs.push(Proc::spawn(
        vm1,
        &vm1_log,
        bin("causeway-agent"),
        &[
            "run",
            "--state-dir",
            s1.to_str().unwrap(),
            "--address",
            &v1addr,
        ],
    ));
    let vip = wait_for("web routed at vm1", WAIT, || {
        let s = config(&s1);
        let svc = s.services.get("default/web")?;
        svc.endpoints.values().find(|e| e.address == v2addr)?;
        let rules = std::fs::read_to_string(s1.join("capture.rules")).ok()?;
        rules.contains(&format!("-d {v2addr}/32 ")).then_some(())?;
        svc.vip.map(|v| v.to_string())
    });
    let logs = || {
        procs
            .iter()
            .map(|p| format!("== {}\n{}", p.log.display(), p.log()))
            .collect::<String>()
    };
    let call = |method: &str, path: &str, token: &str| -> Answer {
        let out = vm1
            .cmd("python3")
            .args([
                "-c",
                CLIENT_PY,
                &format!("http://{vip}:8080{path}"),
                method,
                token,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "client {method} {path}: {}\n{}",
            describe(&out),
            logs()
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.splitn(3, '\n');
        Answer {
            status: lines.next().unwrap().trim().parse().unwrap(),
            www_authenticate: lines.next().unwrap_or_default().trim().to_owned(),
            body: lines.next().unwrap_or_default().trim().to_owned(),
        }
    };

    // The JWT rule and the policies.
    let yaml = format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: idp, namespace: default}}
spec:
  selector: {{matchLabels: {{causeway.io/group: web}}}}
  jwtRules:
  - issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwksUri: https://127.0.0.1:{jwks_port}/jwks.json
    outputClaimToHeaders:
    - {{header: x-team, claim: org.team}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: web-requests, namespace: default}}
spec:
  selector: {{matchLabels: {{causeway.io/group: web}}}}
  rules:
  - from: [{{source: {{requestPrincipals: ["*"]}}}}]
    to: [{{operation: {{methods: [GET], paths: ["/public/*"]}}}}]
  - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
    to: [{{operation: {{paths: ["/admin/*"]}}}}]
    when: [{{key: "request.auth.claims[groups]", values: [admin]}}]
  - to: [{{operation: {{paths: ["/sales/*"]}}}}]
    when: [{{key: "request.auth.claims[org][team]", values: [sales]}}]
"#
    );
    let file = root.join("policies.yaml");
    std::fs::write(&file, yaml).unwrap();
    ctl_ok(&["apply", "-f", file.to_str().unwrap()]);
    wait_for("the policies at vm2's agent", WAIT, || {
        let held: Vec<String> = config(&s2).policies.keys().cloned().collect();
        (held
            == [
                "AuthorizationPolicy/default/web-requests",
                "RequestAuthentication/default/idp",
            ])
        .then_some(())
    });

    // A valid token: 200; the token is not forwarded (forwardOriginalToken false) and the
    // claim header is. The first request may race the agent's view: wait for it.
    let valid = tok("valid");
    let a = wait_for("a valid token's GET /public/x to pass", WAIT, || {
        let a = call("GET", "/public/x", &valid);
        (a.status == 200).then_some(a)
    });
    assert_eq!(a.body, "GET /public/x auth=- team=payments", "{a:?}");
    let in_log = |log: &Path, what: &str, needles: &[&str]| {
        wait_for(&format!("{what} in {}", log.display()), WAIT, || {
            let text = std::fs::read_to_string(log).ok()?;
            text.lines()
                .any(|l| needles.iter().all(|n| l.contains(n)))
                .then_some(())
        });
    };
    // The malformed key of the set is left out, with its reason, and the good keys of the
    // same set serve: a token of every algorithm passes, and a wrong issuer or audience is
    // 401 under every algorithm.
    in_log(
        &vm2_log,
        "the malformed key left out",
        &[
            "JWKS key left out",
            "key \"k-broken\": malformed key material",
        ],
    );
    for alg in ALGORITHMS {
        let m = &minted[alg];
        let a = call("GET", "/public/x", m["valid"].as_str().unwrap());
        assert_eq!(a.status, 200, "{alg}: {a:?}\n{}", logs());
        for case in ["wrong_issuer", "wrong_audience"] {
            let a = call("GET", "/public/x", m[case].as_str().unwrap());
            assert_eq!(
                (a.status, a.body.as_str()),
                (401, "Jwt verification fails"),
                "{alg} {case}: {a:?}"
            );
        }
    }
    for reason in [
        "issuer \"https://evil.example\" is not accepted",
        "audience \"someone-else\" not accepted",
    ] {
        in_log(
            &vm2_log,
            reason,
            &["request refused: invalid JWT (401)", reason],
        );
    }
    // Expired or badly signed: 401 with WWW-Authenticate, never reaching the app.
    for case in ["expired", "bad_signature"] {
        let a = call("GET", "/public/x", &tok(case));
        assert_eq!(a.status, 401, "{case}: {a:?}\n{}", logs());
        assert_eq!(a.body, "Jwt verification fails", "{case}");
        assert!(
            a.www_authenticate.starts_with("Bearer realm=")
                && a.www_authenticate.contains("error=\"invalid_token\""),
            "{case}: {a:?}"
        );
    }
    // No token where the policy wants a request principal: 403.
    let a = call("GET", "/public/x", "-");
    assert_eq!((a.status, a.body.as_str()), (403, "RBAC: access denied"));
    // methods [GET] + paths [/public/*]: POST and another path are denied.
    for (m, p) in [("POST", "/public/x"), ("GET", "/private")] {
        let a = call(m, p, &valid);
        assert_eq!(
            (a.status, a.body.as_str()),
            (403, "RBAC: access denied"),
            "{m} {p}"
        );
    }
    // Claims: the token's groups hold admin (allowed), its org.team is not sales.
    let a = call("PUT", "/admin/users", &valid);
    assert_eq!(a.status, 200, "{a:?}");
    let a = call("GET", "/sales/report", &valid);
    assert_eq!((a.status, a.body.as_str()), (403, "RBAC: access denied"));

    // Bad input: each a 401 with its reason in the agent's log.
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let hs256 = format!(
        "{}.{}.c2ln",
        b64(r#"{"alg":"HS256","typ":"JWT"}"#),
        b64(&format!(
            r#"{{"iss":"{ISSUER}","sub":"x","aud":"{AUDIENCE}"}}"#
        ))
    );
    let oversized = format!("{}.{}.c2ln", b64(r#"{"alg":"ES256"}"#), "a".repeat(20_000));
    for (token, reason) in [
        ("abc.def".to_owned(), "a JWT has 3 dot-separated parts"),
        (oversized, "over the 16384-byte limit"),
        (hs256, "algorithm \"HS256\" is not accepted"),
        (
            minted["none"].as_str().unwrap().to_owned(),
            "alg \"none\" is refused",
        ),
    ] {
        let a = call("GET", "/public/x", &token);
        assert_eq!(a.status, 401, "{reason}: {a:?}");
        wait_for(&format!("{reason:?} in vm2's agent log"), WAIT, || {
            let log = std::fs::read_to_string(&vm2_log).ok()?;
            log.lines()
                .any(|l| l.contains("request refused: invalid JWT (401)") && l.contains(reason))
                .then_some(())
        });
    }

    // Request heads past the HTTP limit: 64 KiB of garbage in `Authorization` and a
    // PyJWT token with 10,000 claims (170 KB). Both are over the agents' request-head
    // limit (`max_header_bytes`, 60 KiB, Envoy's default), so the client's agent answers
    // 431 before any token parsing and logs why; neither reaches vm2 (a 401 is only for a
    // token that fits in a request). Each time the agents serve the next request.
    for (what, auth) in [
        (
            "64 KiB of garbage",
            format!("Bearer {}", garbage(64 * 1024)),
        ),
        (
            "a token with 10,000 claims",
            format!("Bearer {}", tok("many_claims")),
        ),
    ] {
        let file = root.join("auth.bin");
        std::fs::write(&file, &auth).unwrap();
        let out = vm1
            .cmd("python3")
            .args(["-c", RAW_PY, &vip, "8080", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{what}: {}", describe(&out));
        let status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            status.starts_with("HTTP/1.1 431"),
            "{what}: {status:?}\n{}",
            logs()
        );
        let a = call("GET", "/public/x", &valid);
        assert_eq!(a.status, 200, "after {what}: {a:?}");
    }
    in_log(
        &vm1_log,
        "the 431 and its reason",
        &[
            "request refused: malformed or oversized request head",
            "status=431",
            "message head is too large",
        ],
    );

    // Key rotation: the issuer signs with a new kid; once its key set publishes the key
    // under it, the agent (not restarted) fetches it on the unknown kid.
    let rotated = tok("unknown_kid");
    let a = call("GET", "/public/x", &rotated);
    assert_eq!(a.status, 401, "before the key set has the new kid: {a:?}");
    std::fs::write(&jwks_path, jwks.replace("\"k-es256\"", "\"k-rotated\"")).unwrap();
    let a = call("GET", "/public/x", &rotated);
    assert_eq!(a.status, 200, "after the rotation: {a:?}\n{}", logs());

    // The JWKS server goes down: the agent's fetches fail (logged, the last good set
    // kept) and valid tokens of every algorithm still pass.
    jwks_server.kill();
    wait_for(
        "a failed JWKS fetch that kept the last good set",
        WAIT,
        || {
            for alg in ALGORITHMS {
                let token = if alg == "ES256" {
                    rotated.clone()
                } else {
                    minted[alg]["valid"].as_str().unwrap().to_owned()
                };
                let a = call("GET", "/public/x", &token);
                assert_eq!(a.status, 200, "{alg}, JWKS server down: {a:?}\n{}", logs());
            }
            let log = std::fs::read_to_string(&vm2_log).ok()?;
            log.lines()
                .any(|l| l.contains("JWKS fetch failed") && l.contains("kept_last_good=true"))
                .then_some(())
        },
    );
    // Once more after the failure is logged: the requests did not just beat the fetch.
    for alg in ALGORITHMS.iter().filter(|a| **a != "ES256") {
        let a = call("GET", "/public/x", minted[*alg]["valid"].as_str().unwrap());
        assert_eq!(a.status, 200, "{alg}, JWKS server down: {a:?}");
    }

    // `why` with the token: the RequestAuthentication step (signature not checked: the
    // keys are at a jwksUri) and the deciding policy; with claims only.
    let why = |extra: &[&str]| -> Value {
        let mut args = vec![
            "why", "--from", "client", "--to", "web:8080", "--output", "json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&ctl_ok(&args)).unwrap()
    };
    let v = why(&["--path", "/public/x", "--jwt", &valid]);
    assert_eq!(v["decision"], "allow", "{v}");
    assert_eq!(v["policy"], "default/web-requests", "{v}");
    let steps = v["steps"].as_array().unwrap();
    assert!(
        steps.iter().any(|s| s["step"] == "request-authentication"
            && s["detail"]
                .as_str()
                .unwrap()
                .contains("signature NOT checked")
            && s["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("{ISSUER}/user-es256"))),
        "{v}"
    );
    let v = why(&["--path", "/public/x", "--jwt", &tok("expired")]);
    assert_eq!(v["decision"], "deny", "{v}");
    assert_eq!(v["policy"], "default/idp", "{v}");
    let v = why(&["--method", "POST", "--path", "/public/x", "--jwt", &valid]);
    assert_eq!(
        (v["decision"].as_str(), v["policy"].as_str()),
        (Some("deny"), None),
        "{v}"
    );
    let claims = [
        "--claim",
        "iss=https://idp.test",
        "--claim",
        "sub=bob",
        "--path",
        "/admin/x",
    ];
    let v = why(&[&claims[..], &["--claim", "groups=admin"]].concat());
    assert_eq!(v["decision"], "allow", "{v}");
    let v = why(&[&claims[..], &["--claim", "groups=dev"]].concat());
    assert_eq!(v["decision"], "deny", "{v}");
    // The agent's real denials of requests reach `why`.
    let start = std::time::Instant::now();
    loop {
        let v = why(&[]);
        if v["recent_denials"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["policy"] == "no-allow-match"))
        {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "no request denial reached `why`: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(procs);
}
