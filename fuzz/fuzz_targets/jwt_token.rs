//! The JWT request path on arbitrary input: token extraction from headers, query and
//! cookies, the unverified peek (`alg`, `kid`, `iss`), key selection and verification never
//! panic; no input without a valid signature is accepted; a refusal always has a reason.
//!
//! Input: arbitrary text, used at once as the `Authorization` header (after `Bearer `), a
//! query string, a cookie header and a bare token; the rules accept issuer `fuzz` with one
//! inline Ed25519 key (whose private half the fuzzer does not have).
#![no_main]

use causeway_api::policy::JwtRule;
use causeway_api::policy::jwt::{self, KeySet, TokenRequest};
use causeway_api::policy::resource::JwtHeader;
use libfuzzer_sys::fuzz_target;

const JWKS: &str = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

fuzz_target!(|text: &str| {
    let set = KeySet::from_json(JWKS).expect("the fixed key set parses");
    let rules = [
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
    ];
    let bearer = format!("Bearer {text}");
    let headers = [
        ("authorization", bearer.as_str()),
        ("x-jwt", text),
        ("cookie", text),
    ];
    let req = TokenRequest {
        headers: &headers,
        query: Some(text),
    };
    match jwt::authenticate(&rules, &req, |_| Some(&set)) {
        Ok(None) => {}
        Ok(Some(a)) => panic!("accepted a token the fuzzer could not sign: {a:?}"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    // Any text as a bare token: refused (never accepted, never a panic).
    assert!(jwt::verify(&rules, text, |_| Some(&set)).is_err());
    // Any text as a key set: parses or is refused with a reason.
    if let Err(e) = KeySet::from_json(text) {
        assert!(!e.is_empty());
    }
    let _ = jwt::www_authenticate(text);
});
