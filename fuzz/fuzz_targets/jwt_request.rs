//! The agent's JWT request path on arbitrary bytes: `causeway_agent::dataplane::http::
//! authz::authenticate`, the function the destination agent calls for each request on an
//! HTTP port (find the token where the rules say, peek at it, pick the key, verify with
//! the agent's `JwksCache`), never panics, never accepts a token the fuzzer could not
//! sign, always gives a refusal a reason, and with inline keys never waits.
//!
//! Input: arbitrary bytes, used as the `Authorization` header (after `Bearer ` and as
//! is), as an `x-jwt` header, a cookie and the query string, each in its own request
//! head (a value `http` refuses as a header value or a URI is left out, as the agent never
//! sees it). The rules accept issuer `fuzz` with a fixed inline key set of ES256, RS256
//! and Ed25519 public keys (whose private halves the fuzzer does not have) and issuer
//! `other` with its own locations.
#![no_main]

use std::future::Future;
use std::sync::LazyLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use causeway_agent::dataplane::http::authz::authenticate;
use causeway_agent::jwks::{JwksCache, JwksOptions};
use causeway_api::policy::JwtRule;
use causeway_api::policy::resource::JwtHeader;
use libfuzzer_sys::fuzz_target;

const JWKS: &str = r#"{"keys":[
{"kty":"EC","crv":"P-256","kid":"es","x":"G0IDLNN_TrBlkLISXmj-SFQ_dvN0NK2fAk6_m0yLNJw","y":"v1Zr_tZ8FZ6YqtTge0k2MCWTAL8eX6AZuoMyfTUUO_Q"},
{"kty":"RSA","kid":"rs","e":"AQAB","n":"kus7HV4BzITIjfZq50gV9lVVEjCzsJo4op0DS1Kb6QSlGzb3DlfGSL_5KR2OAqnG7hJDNlyRuOZ8RaqixmAhcYgKa7rGELsjFQRdaK-2POAn_HyxgPq7PuJ8t0Yi4RcWKCedVCs9_0TGvYZsOK9aWgGl5IajVcSOT_za-piOAMjMt76H2Hr2_XtiBPcyzmx59jhDUEVK7IyFxwfUthbj49yyDIDXn1o4FooTuRCQOiMzslVDUdjYDq_a0VkIb8iFvfjslPTj5-LjkLCORpxhKTSvOlvdqidnzSl3lFJxsMHbq-HtEol2ivK055zcT-QwrOZKOGlCNhh2VqChXwgrsQ"},
{"kty":"OKP","crv":"Ed25519","kid":"ed","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

static CACHE: LazyLock<JwksCache> = LazyLock::new(|| {
    JwksCache::new(
        None,
        JwksOptions {
            refresh_interval: Duration::from_secs(3600),
            unknown_kid_interval: Duration::from_secs(3600),
            fetch_timeout: Duration::from_secs(1),
            attempts: 1,
            backoff_base: Duration::from_millis(1),
            backoff_cap: Duration::from_millis(1),
        },
    )
    .expect("a cache without a CA file builds")
});

static RULES: LazyLock<[JwtRule; 2]> = LazyLock::new(|| {
    [
        JwtRule {
            issuer: "fuzz".to_owned(),
            audiences: vec!["a".to_owned()],
            jwks: Some(JWKS.to_owned()),
            ..JwtRule::default()
        },
        JwtRule {
            issuer: "other".to_owned(),
            jwks: Some(JWKS.to_owned()),
            from_headers: vec![JwtHeader {
                name: "x-jwt".to_owned(),
                prefix: String::new(),
            }],
            from_params: vec!["t".to_owned()],
            from_cookies: vec!["s".to_owned()],
            ..JwtRule::default()
        },
    ]
});

static RULES_ID: LazyLock<u64> = LazyLock::new(|| causeway_agent::jwks::rules_id(&*RULES));

/// Polls `f` once: with inline keys only, the request path has nothing to wait for.
fn at_once<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the request path waited although every key set is inline"),
    }
}

fn check(head: http::request::Parts) {
    match at_once(authenticate(&*RULES, *RULES_ID, &CACHE, &head)) {
        Ok(None) => {}
        Ok(Some((a, _))) => panic!("accepted a token the fuzzer could not sign: {a:?}"),
        Err(e) => assert!(!e.to_string().is_empty(), "a refusal without a reason"),
    }
}

fn with_header(name: &str, value: &[u8]) {
    let Ok(v) = http::HeaderValue::from_bytes(value) else {
        return;
    };
    let (head, ()) = http::Request::builder()
        .uri("/api")
        .header(name, v)
        .body(())
        .expect("a fixed request")
        .into_parts();
    check(head);
}

fuzz_target!(|data: &[u8]| {
    let mut bearer = b"Bearer ".to_vec();
    bearer.extend_from_slice(data);
    with_header("authorization", &bearer);
    with_header("authorization", data);
    with_header("x-jwt", data);
    let mut cookie = b"s=".to_vec();
    cookie.extend_from_slice(data);
    with_header("cookie", &cookie);
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(uri) = format!("/api?{text}").parse::<http::Uri>()
    {
        let (head, ()) = http::Request::builder()
            .uri(uri)
            .body(())
            .expect("a parsed URI")
            .into_parts();
        check(head);
    }
});
