//! JWT validation against tokens minted by a JWT library outside the project: PyJWT with
//! `cryptography` on Debian's python3 (`scripts/install-deps-jwt.sh`), one key per
//! algorithm, through `causeway_api::policy::jwt` and on into the authorization evaluator.

use std::collections::BTreeMap;
use std::process::Command;

use causeway_api::policy::jwt::{self, KeySet, TokenRequest};
use causeway_api::policy::{
    HttpAttributes, JwtRule, PolicySet, Request, Resource, Workload, decode_documents,
};

const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "cart";
const ALGORITHMS: [&str; 7] = [
    "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA",
];

fn mint() -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/jwt/mint.py");
    let out = Command::new("/usr/bin/python3")
        .args([script, ISSUER, AUDIENCE])
        .output()
        .expect("run /usr/bin/python3 (install it with scripts/install-deps-jwt.sh)");
    assert!(
        out.status.success(),
        "mint.py failed (PyJWT and cryptography come from scripts/install-deps-jwt.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("mint.py prints JSON")
}

fn rule() -> JwtRule {
    JwtRule {
        issuer: ISSUER.to_owned(),
        audiences: vec![AUDIENCE.to_owned()],
        jwks_uri: Some("https://idp.test/jwks".to_owned()),
        ..JwtRule::default()
    }
}

fn check(
    rules: &[JwtRule],
    set: &KeySet,
    token: &str,
) -> Result<Option<jwt::Authenticated>, jwt::JwtError> {
    let auth = format!("Bearer {token}");
    let headers = [("authorization", auth.as_str())];
    jwt::authenticate(
        rules,
        &TokenRequest {
            headers: &headers,
            query: None,
        },
        |_| Some(set),
    )
}

#[test]
fn every_algorithm_accepts_valid_tokens_and_refuses_bad_ones() {
    let minted = mint();
    let rules = [rule()];
    for alg in ALGORITHMS {
        let m = &minted[alg];
        let t = |k: &str| m[k].as_str().unwrap().to_owned();
        let set = KeySet::from_json(&t("jwks")).unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert!(set.skipped().is_empty(), "{alg}: {:?}", set.skipped());

        let ok = check(&rules, &set, &t("valid"))
            .unwrap_or_else(|e| panic!("{alg}: valid token refused: {e}"))
            .expect("a token was present");
        assert_eq!(ok.request_principal, t("principal"), "{alg}");
        assert_eq!(ok.audiences, [AUDIENCE, "other"], "{alg}");
        assert_eq!(ok.presenter.as_deref(), Some("web-app"), "{alg}");
        assert_eq!(ok.claims["org"]["team"], "payments", "{alg}");
        assert_eq!(ok.claims["groups"][1], "admin", "{alg}");
        // Expired 30 s ago: inside the 60 s clock-skew allowance.
        assert!(check(&rules, &set, &t("within_skew")).is_ok(), "{alg}");

        for (case, want) in [
            ("expired", "the token expired"),
            ("future_nbf", "not valid yet"),
            (
                "wrong_issuer",
                "issuer \"https://evil.example\" is not accepted",
            ),
            ("wrong_audience", "audience \"someone-else\" not accepted"),
            ("bad_signature", "the signature does not verify"),
        ] {
            let e =
                check(&rules, &set, &t(case)).expect_err(&format!("{alg}: {case} must be refused"));
            assert!(e.to_string().contains(want), "{alg} {case}: {e}");
            assert!(e.unknown_kid().is_none(), "{alg} {case}");
        }
        let e = check(&rules, &set, &t("unknown_kid")).unwrap_err();
        assert_eq!(e.unknown_kid(), Some("k-rotated"), "{alg}: {e}");
        // Rotation: the key under the new id verifies once the new set is known.
        let rotated = t("jwks").replace(&format!("k-{}", alg.to_lowercase()), "k-rotated");
        let rotated = KeySet::from_json(&rotated).unwrap();
        assert!(
            check(&rules, &rotated, &t("unknown_kid"))
                .unwrap()
                .is_some()
        );
    }
}

#[test]
fn unsigned_missing_and_oversized_tokens() {
    let minted = mint();
    let rules = [rule()];
    let set = KeySet::from_json(minted["ES256"]["jwks"].as_str().unwrap()).unwrap();
    let e = check(&rules, &set, minted["none"].as_str().unwrap()).unwrap_err();
    assert!(e.to_string().contains("alg \"none\" is refused"), "{e}");
    // No token: passes authentication, left to authorization.
    let none: [(&str, &str); 0] = [];
    let got = jwt::authenticate(
        &rules,
        &TokenRequest {
            headers: &none,
            query: None,
        },
        |_| Some(&set),
    );
    assert_eq!(got, Ok(None));
    // 64 KiB of garbage in Authorization.
    let garbage = "x".repeat(64 * 1024);
    let e = check(&rules, &set, &garbage).unwrap_err();
    assert!(e.to_string().contains("over the 16384-byte limit"), "{e}");
    // A token with 10,000 claims.
    use base64::Engine as _;
    let b = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    let claims: serde_json::Map<String, serde_json::Value> = (0..10_000)
        .map(|i| (format!("c{i}"), serde_json::Value::from(i)))
        .chain([("iss".to_owned(), ISSUER.into())])
        .collect();
    let huge = format!(
        "{}.{}.c2ln",
        b(&serde_json::json!({"alg": "ES256", "kid": "k-es256"})),
        b(&claims.into())
    );
    let e = check(&rules, &set, &huge).unwrap_err();
    assert!(e.to_string().contains("over the 16384-byte limit"), "{e}");
    // A key set not fetched yet: the token is refused, not waved through.
    let e = jwt::authenticate(
        &rules,
        &TokenRequest {
            headers: &[(
                "authorization",
                &format!("Bearer {}", minted["ES256"]["valid"].as_str().unwrap()),
            )],
            query: None,
        },
        |_| None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not available"), "{e}");
}

#[test]
fn a_validated_token_feeds_claims_based_authorization() {
    let minted = mint();
    let rules = [rule()];
    let set = KeySet::from_json(minted["RS256"]["jwks"].as_str().unwrap()).unwrap();
    let ok = check(&rules, &set, minted["RS256"]["valid"].as_str().unwrap())
        .unwrap()
        .unwrap();
    let policy = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: admins, namespace: shop}}\nspec:\n  rules:\n  - from:\n    - source: {{requestPrincipals: ['{ISSUER}/*']}}\n    when:\n    - key: request.auth.claims[groups]\n      values: [admin]\n    - key: request.auth.claims[org][team]\n      values: [payments]\n    - key: request.auth.audiences\n      values: [{AUDIENCE}]\n"
    );
    let aps: Vec<_> = decode_documents("p", &policy)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Resource::AuthorizationPolicy(p) => Some(p),
            _ => None,
        })
        .collect();
    let labels = BTreeMap::new();
    let set_for = PolicySet::new(aps.iter()).for_workload(Workload {
        namespace: "shop",
        labels: &labels,
    });
    let decide = |principal: Option<&str>, claims: Option<&serde_json::Value>| {
        let http = HttpAttributes {
            host: "cart",
            method: "GET",
            path: "/",
            headers: &[],
            request_principal: principal,
            claims,
        };
        let req = Request {
            principal: None,
            source_ip: "10.0.0.1".parse().unwrap(),
            remote_ip: None,
            destination_ip: "10.0.0.2".parse().unwrap(),
            destination_port: 8080,
            sni: None,
            http: Some(http),
        };
        set_for.decide(&req).allow
    };
    assert!(decide(Some(&ok.request_principal), Some(&ok.claims)));
    // No token: no request principal, denied by the ALLOW policy.
    assert!(!decide(None, None));
}
