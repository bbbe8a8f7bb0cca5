//! The request path's decisions: policies and JWT rules as the mesh state carries them,
//! tokens signed with the `jsonwebtoken` crate (Ed25519 keys from ring), inline key sets
//! (no fetch).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use causeway_api::push::MeshState;

use super::*;
use crate::jwks::JwksOptions;

const ME: &str = "spiffe://causeway.local/ns/shop/sa/web";
const CLIENT: &str = "spiffe://causeway.local/ns/shop/sa/client";
const ISSUER: &str = "https://idp.test";

/// A signing key and its public JWKS (`kid` `k1`).
struct Signer {
    pkcs8: Vec<u8>,
    jwks: String,
}

impl Signer {
    fn new() -> Signer {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(ring::signature::KeyPair::public_key(&pair).as_ref());
        Signer {
            pkcs8: pkcs8.as_ref().to_vec(),
            jwks:
                serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": x}]})
                    .to_string(),
        }
    }

    fn token(&self, claims: serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_der(&self.pkcs8),
        )
        .unwrap()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str, groups: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "iss": ISSUER, "sub": sub, "aud": "shop", "exp": now() + 600,
        "groups": groups, "org": {"team": "payments"},
    })
}

/// The policies (JSON documents, which YAML reads as they are) in a mesh state.
fn view(docs: &[serde_json::Value]) -> LocalAuthz {
    let yaml = docs
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n---\n");
    let state = MeshState {
        policies: crate::dataplane::authz::policies_from_yaml(&yaml),
        ..MeshState::default()
    };
    LocalAuthz::build(&state, ME, "web")
}

fn request_authn(jwks: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut rule = serde_json::json!({"issuer": ISSUER, "audiences": ["shop"], "jwks": jwks});
    if let (Some(r), Some(e)) = (rule.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "shop"},
        "spec": {"jwtRules": [rule]},
    })
}

fn policy(name: &str, spec: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"}, "spec": spec,
    })
}

fn guard(view: LocalAuthz) -> RequestAuthz {
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(view));
    // The receiver keeps the last value when the sender is gone.
    drop(tx);
    let opts = JwksOptions {
        refresh_interval: Duration::from_secs(60),
        unknown_kid_interval: Duration::from_secs(1),
        fetch_timeout: Duration::from_secs(1),
        attempts: 1,
        backoff_base: Duration::from_millis(1),
        backoff_cap: Duration::from_millis(1),
    };
    RequestAuthz {
        authz: rx,
        jwks: Arc::new(JwksCache::new(None, opts).unwrap()),
        peer: Arc::from(CLIENT),
        source: "10.0.0.1".parse::<IpAddr>().unwrap(),
        destination: "10.0.0.2".parse::<IpAddr>().unwrap(),
        port: 8080,
    }
}

fn head(method: &str, path: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = ::http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web.shop:8080");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

async fn admit(g: &RequestAuthz, h: &mut Parts) -> Result<(), (u16, &'static str, String)> {
    g.admit(h).await.map_err(|r| {
        let www = r
            .headers
            .iter()
            .find(|(k, _)| *k == header::WWW_AUTHENTICATE)
            .map(|(_, v)| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (r.status.as_u16(), r.body, www)
    })
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[test]
fn paths_are_normalised_like_envoy() {
    for (path, want) in [
        ("/a/b", None),
        ("/a/b/../c", Some("/a/c")),
        ("/public/../private/x", Some("/private/x")),
        ("/a/./b/", Some("/a/b/")),
        ("/a/..", Some("/")),
        ("/..", Some("/")),
        ("/public/%2E%2e/private", Some("/private")),
        ("/a/.%2e/b", Some("/b")),
        ("/a/..b/c", None),
        ("*", None),
    ] {
        assert_eq!(normalize_path(path).as_deref(), want, "{path}");
    }
}

/// Operation fields, request principals and claims decide each request; the token is
/// removed before the application unless the rule forwards it; claims become headers.
#[tokio::test]
async fn requests_are_decided_with_their_http_attributes_and_token() {
    let signer = Signer::new();
    let g = guard(view(&[
        request_authn(
            &signer.jwks,
            serde_json::json!({"outputClaimToHeaders": [{"header": "x-team", "claim": "org.team"}]}),
        ),
        // Public reads for any authenticated user; /admin only with the admin group;
        // everything needs a token; a header rule for /debug.
        policy(
            "public",
            serde_json::json!({"rules": [
                {"from": [{"source": {"requestPrincipals": ["*"]}}],
                 "to": [{"operation": {"methods": ["GET"], "paths": ["/public/*"]}}]},
                {"from": [{"source": {"requestPrincipals": [format!("{ISSUER}/*")]}}],
                 "to": [{"operation": {"paths": ["/admin/*"]}}],
                 "when": [{"key": "request.auth.claims[groups]", "values": ["admin"]}]},
                {"to": [{"operation": {"paths": ["/team"], "hosts": ["web.shop"]}}],
                 "when": [{"key": "request.auth.claims[org][team]", "values": ["payments"]}]},
                {"to": [{"operation": {"paths": ["/debug"]}}],
                 "when": [{"key": "request.headers[X-Debug]", "values": ["on"]}]},
            ]}),
        ),
        policy(
            "no-delete",
            serde_json::json!({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}),
        ),
    ]));
    let user = bearer(&signer.token(claims("alice", &["dev"])));
    let admin = bearer(&signer.token(claims("root", &["dev", "admin"])));
    let forbidden = Err((403, RBAC_DENIED_BODY, String::new()));

    // Allowed: GET /public/x with a token; the token is removed, the claim header set.
    let mut h = head("GET", "/public/x", &[("authorization", &user)]);
    assert_eq!(admit(&g, &mut h).await, Ok(()));
    assert!(h.headers.get("authorization").is_none(), "{h:?}");
    assert_eq!(h.headers["x-team"], "payments");
    // Not the method, not the path, or no token: 403.
    for (m, p, auth) in [
        ("POST", "/public/x", Some(&user)),
        ("GET", "/private", Some(&user)),
        ("GET", "/public/x", None),
        // The normalised path is what is decided (and forwarded).
        ("GET", "/public/../private/x", Some(&user)),
        ("GET", "/admin/users", Some(&user)),
        ("DELETE", "/public/x", Some(&admin)),
    ] {
        let headers: Vec<(&str, &str)> = auth
            .map(|a| ("authorization", a.as_str()))
            .into_iter()
            .collect();
        let mut h = head(m, p, &headers);
        assert_eq!(
            admit(&g, &mut h).await,
            forbidden,
            "{m} {p} token {}",
            auth.is_some()
        );
    }
    let mut h = head("GET", "/public/a/../b", &[("authorization", &user)]);
    assert_eq!(admit(&g, &mut h).await, Ok(()));
    assert_eq!(
        h.uri.path(),
        "/public/b",
        "the application gets the normalised path"
    );
    // A claim with a list value, a nested claim, a header condition.
    let mut h = head("PUT", "/admin/users", &[("authorization", &admin)]);
    assert_eq!(admit(&g, &mut h).await, Ok(()));
    let mut h = head("GET", "/team", &[("authorization", &user)]);
    assert_eq!(admit(&g, &mut h).await, Ok(()));
    let mut h = head("GET", "/debug", &[("x-debug", "on")]);
    assert_eq!(admit(&g, &mut h).await, Ok(()));
    let mut h = head("GET", "/debug", &[("x-debug", "off")]);
    assert_eq!(admit(&g, &mut h).await, forbidden);
    // Denials are counted and reported like a connection's.
    let denied = crate::dataplane::authz::decisions().snapshot();
    assert!(
        denied
            .iter()
            .any(|(d, p, n)| *d == "deny" && p == "shop/no-delete" && *n > 0),
        "{denied:?}"
    );
}

/// A token present but invalid is answered 401 with `WWW-Authenticate`, whatever the
/// policies say; no token passes authentication and is left to authorization; a rule
/// with `forwardOriginalToken: true` keeps it.
#[tokio::test]
async fn invalid_tokens_get_401_and_a_missing_one_is_left_to_authorization() {
    let signer = Signer::new();
    let other = Signer::new();
    let g = guard(view(&[request_authn(
        &signer.jwks,
        serde_json::json!({"forwardOriginalToken": true, "outputPayloadToHeader": "x-jwt-payload"}),
    )]));
    let expired = {
        let mut c = claims("alice", &[]);
        c["exp"] = (now() - 3600).into();
        signer.token(c)
    };
    let wrong_audience = {
        let mut c = claims("alice", &[]);
        c["aud"] = "elsewhere".into();
        signer.token(c)
    };
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let hs256 = format!(
        "{}.{}.c2ln",
        b64(r#"{"alg":"HS256","typ":"JWT"}"#),
        b64(&claims("alice", &[]).to_string())
    );
    let huge = format!("{}.{}.c2ln", b64(r#"{"alg":"EdDSA"}"#), "a".repeat(20_000));
    for token in [
        expired,
        wrong_audience,
        other.token(claims("alice", &[])),
        hs256,
        huge,
        "not-a-token".to_owned(),
    ] {
        let mut h = head("GET", "/x?y=1", &[("authorization", &bearer(&token))]);
        let (status, body, www) = admit(&g, &mut h).await.unwrap_err();
        assert_eq!((status, body), (401, JWT_FAILED_BODY), "{token:.40}");
        assert_eq!(
            www,
            "Bearer realm=\"http://web.shop:8080/x\", error=\"invalid_token\""
        );
    }
    // No policy: a request without a token passes, with one it is authenticated.
    let mut h = head("GET", "/x", &[]);
    assert_eq!(admit(&g, &mut h).await, Ok(()));
    let valid = bearer(&signer.token(claims("alice", &[])));
    let mut h = head("GET", "/x", &[("authorization", &valid)]);
    assert_eq!(admit(&g, &mut h).await, Ok(()));
    assert_eq!(
        h.headers["authorization"],
        valid.as_str(),
        "forwarded as asked"
    );
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h.headers["x-jwt-payload"].as_bytes())
        .unwrap();
    let payload: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(payload["sub"], "alice");
}

/// Through the inbound proxy over HTTP/2: a gRPC request refused by a policy gets Envoy's
/// gRPC answer (HTTP 200, `grpc-status` 7 PERMISSION_DENIED, the text in `grpc-message`),
/// one with an invalid token `grpc-status` 16 UNAUTHENTICATED; nothing reaches the
/// application (none listens: a forwarded request would be 503 / `grpc-status` 14).
#[tokio::test]
async fn grpc_requests_get_grpc_refusals() {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let signer = Signer::new();
    let g = guard(view(&[
        request_authn(&signer.jwks, serde_json::json!({})),
        policy(
            "deny-admin",
            serde_json::json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/pkg.Admin/*"]}}]}]}),
        ),
    ]));
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app = crate::dataplane::http::LocalApp {
        addr: unused.local_addr().unwrap(),
        connect_timeout: Duration::from_secs(2),
    };
    drop(unused);
    let proxy = crate::dataplane::http::inbound_proxy(
        app,
        crate::dataplane::http::HttpSettings::default(),
        Arc::new(crate::dataplane::outbound::LogObserver),
    );
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let admission: Arc<dyn Admission> = Arc::new(g);
    tokio::spawn(async move { proxy.serve_admitted(server_io, Some(admission)).await });
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let bad = bearer("not-a-token");
    for (path, token, want) in [
        ("/pkg.Admin/Drop", None, "7"),
        ("/pkg.Shop/Buy", Some(bad.as_str()), "16"),
        ("/pkg.Shop/Buy", None, "14"),
    ] {
        let mut req = ::http::Request::post(format!("http://web.shop{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(t) = token {
            req = req.header("authorization", t);
        }
        let resp = sender
            .send_request(req.body(Empty::<bytes::Bytes>::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["grpc-status"], want, "{path}: {resp:?}");
    }
}

/// A JWKS cache whose verified-token cache reads the clock `t` (seconds since the epoch).
fn cache_with_clock(entries: usize, t: &Arc<std::sync::atomic::AtomicU64>) -> JwksCache {
    let opts = JwksOptions {
        refresh_interval: Duration::from_secs(3600),
        unknown_kid_interval: Duration::from_secs(3600),
        fetch_timeout: Duration::from_secs(1),
        attempts: 1,
        backoff_base: Duration::from_millis(1),
        backoff_cap: Duration::from_millis(1),
    };
    let t = t.clone();
    JwksCache::new(None, opts).unwrap().with_verified_tokens(
        entries,
        Arc::new(move || t.load(std::sync::atomic::Ordering::SeqCst)),
    )
}

fn clock_now() -> Arc<std::sync::atomic::AtomicU64> {
    Arc::new(std::sync::atomic::AtomicU64::new(now()))
}

async fn verify(
    jwks: &JwksCache,
    view: &LocalAuthz,
    token: &str,
) -> Result<Arc<Authenticated>, JwtError> {
    let h = head("GET", "/", &[("authorization", &bearer(token))]);
    authenticate(view.jwt_rules(), view.jwt_rules_id(), jwks, &h)
        .await
        .map(|a| a.expect("the token is found").0)
}

/// A verified token is taken from the cache on the next request, but never at or past its
/// `exp`: then it is verified again, and refused once the clock is past `exp` + skew.
#[tokio::test]
async fn a_cached_token_is_not_used_past_its_exp() {
    let signer = Signer::new();
    let v = view(&[request_authn(&signer.jwks, serde_json::json!({}))]);
    let t = clock_now();
    let jwks = cache_with_clock(100, &t);
    let exp = now() + 600;
    let token =
        signer.token(serde_json::json!({"iss": ISSUER, "sub": "alice", "aud": "shop", "exp": exp}));
    let hits = || jwks.verified().stats().0;

    let first = verify(&jwks, &v, &token).await.unwrap();
    assert_eq!(first.request_principal, format!("{ISSUER}/alice"));
    assert_eq!(hits(), 0);
    let again = verify(&jwks, &v, &token).await.unwrap();
    assert_eq!(again, first);
    assert_eq!(hits(), 1, "the second request is served from the cache");

    // At exp: not from the cache (verified again, and still within the clock skew).
    t.store(exp, std::sync::atomic::Ordering::SeqCst);
    verify(&jwks, &v, &token).await.unwrap();
    assert_eq!(hits(), 1, "a cached token was used at its exp");

    // Past exp + skew by the cache's clock: refused, not served from the cache.
    t.store(
        exp + causeway_api::policy::jwt::CLOCK_SKEW_SECS + 1,
        std::sync::atomic::Ordering::SeqCst,
    );
    let e = verify(&jwks, &v, &token).await.unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
    assert_eq!(hits(), 1);
}

/// Rotation of a fetched key set (the same `kid`, another key) and a changed inline key
/// set both refuse a token verified and cached under the old key; removing the
/// RequestAuthentication leaves no cached principal behind.
#[tokio::test]
async fn a_token_cached_under_a_rotated_or_removed_key_is_refused_after_the_change() {
    let old = Signer::new();
    let new = Signer::new();
    let t = clock_now();
    let token = old.token(claims("alice", &["dev"]));

    // A fetched set (the fetch stood in for): rotated to another key under the same kid.
    let uri = "https://idp.test/jwks.json";
    let fetched = view(&[request_authn_uri(uri)]);
    let jwks = cache_with_clock(100, &t);
    jwks.store_fetched_json(uri, &old.jwks);
    verify(&jwks, &fetched, &token).await.unwrap();
    verify(&jwks, &fetched, &token).await.unwrap();
    assert_eq!(jwks.verified().stats().0, 1);
    // The same body fetched again changes nothing.
    jwks.store_fetched_json(uri, &old.jwks);
    verify(&jwks, &fetched, &token).await.unwrap();
    assert_eq!(jwks.verified().stats().0, 2);
    jwks.store_fetched_json(uri, &new.jwks);
    let e = verify(&jwks, &fetched, &token).await.unwrap_err();
    assert!(e.to_string().contains("signature"), "{e}");
    assert_eq!(
        jwks.verified().stats().0,
        2,
        "served from the cache after rotation"
    );
    let fresh = new.token(claims("alice", &["dev"]));
    verify(&jwks, &fetched, &fresh).await.unwrap();

    // Inline keys: the RequestAuthentication now carries the new key only.
    let jwks = cache_with_clock(100, &t);
    let before = view(&[request_authn(&old.jwks, serde_json::json!({}))]);
    verify(&jwks, &before, &token).await.unwrap();
    verify(&jwks, &before, &token).await.unwrap();
    assert_eq!(jwks.verified().stats().0, 1);
    let after = view(&[request_authn(&new.jwks, serde_json::json!({}))]);
    assert_ne!(before.jwt_rules_id(), after.jwt_rules_id());
    let e = verify(&jwks, &after, &token).await.unwrap_err();
    assert!(e.to_string().contains("signature"), "{e}");
    // Another audience list: the cached verification (which checked "shop") is not used.
    let other_aud = view(&[request_authn(
        &old.jwks,
        serde_json::json!({"audiences": ["billing"]}),
    )]);
    let e = verify(&jwks, &other_aud, &token).await.unwrap_err();
    assert!(e.to_string().contains("audience"), "{e}");
    assert_eq!(jwks.verified().stats().0, 1);

    // The RequestAuthentication removed: the token is not looked at (no principal).
    let none = view(&[]);
    let h = head("GET", "/", &[("authorization", &bearer(&token))]);
    let a = authenticate(none.jwt_rules(), none.jwt_rules_id(), &jwks, &h)
        .await
        .unwrap();
    assert!(a.is_none());
}

/// A token with the same claims as a cached one but another signature is verified, and
/// refused.
#[tokio::test]
async fn a_token_with_cached_claims_but_a_bad_signature_is_refused() {
    let signer = Signer::new();
    let forger = Signer::new();
    let v = view(&[request_authn(&signer.jwks, serde_json::json!({}))]);
    let t = clock_now();
    let jwks = cache_with_clock(100, &t);
    let c = claims("alice", &["admin"]);
    let good = signer.token(c.clone());
    verify(&jwks, &v, &good).await.unwrap();
    verify(&jwks, &v, &good).await.unwrap();
    assert_eq!(jwks.verified().stats().0, 1);

    let forged = forger.token(c);
    assert_ne!(forged, good);
    let e = verify(&jwks, &v, &forged).await.unwrap_err();
    assert!(e.to_string().contains("signature"), "{e}");
    // The good token's header and payload with its signature altered.
    let (body, sig) = good.rsplit_once('.').unwrap();
    let mut sig = sig.as_bytes().to_vec();
    sig[0] = if sig[0] == b'A' { b'B' } else { b'A' };
    let tampered = format!("{body}.{}", String::from_utf8(sig).unwrap());
    assert!(verify(&jwks, &v, &tampered).await.is_err());
    // Still refused the second time (refusals are not cached as anything else).
    assert!(verify(&jwks, &v, &forged).await.is_err());
    assert_eq!(jwks.verified().stats().0, 1);
}

/// The cache holds at most `[jwt] verified_tokens` entries, and none with 0.
#[tokio::test]
async fn the_verified_token_cache_stays_within_its_bound() {
    let signer = Signer::new();
    let v = view(&[request_authn(&signer.jwks, serde_json::json!({}))]);
    let t = clock_now();
    for cap in [0, 5] {
        let jwks = cache_with_clock(cap, &t);
        // Five shards of one entry each, chosen by the token's hash: 200 tokens leave one
        // of them empty with a probability of 5 × 0.8^200 (20 tokens did 6 % of the time).
        for i in 0..200 {
            let token = signer.token(claims(&format!("user-{i}"), &[]));
            verify(&jwks, &v, &token).await.unwrap();
            assert!(
                jwks.verified().len() <= cap,
                "{} > {cap}",
                jwks.verified().len()
            );
        }
        assert_eq!(jwks.verified().len(), cap);
    }
}

fn request_authn_uri(uri: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "shop"},
        "spec": {"jwtRules": [{"issuer": ISSUER, "audiences": ["shop"], "jwksUri": uri}]},
    })
}
