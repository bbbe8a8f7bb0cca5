//! The JWKS cache against a real HTTPS server the test starts (Python's http.server with a
//! certificate from a test CA made with rcgen), with tokens minted by PyJWT
//! (`api/tests/jwt/mint.py`; `scripts/install-deps-jwt.sh` installs both): first fetch,
//! key rotation picked up on an unknown `kid` without a restart, the last good set kept
//! when the endpoint serves garbage and when it is down, and the CA file required.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use causeway_agent::jwks::{JwksCache, JwksOptions};
use causeway_api::policy::JwtRule;
use causeway_api::policy::jwt::TokenRequest;

const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "cart";

fn mint() -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../api/tests/jwt/mint.py");
    let out = Command::new("/usr/bin/python3")
        .args([script, ISSUER, AUDIENCE])
        .output()
        .expect("run /usr/bin/python3 (scripts/install-deps-jwt.sh installs it)");
    assert!(
        out.status.success(),
        "mint.py failed (PyJWT and cryptography come from scripts/install-deps-jwt.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A test CA and a server certificate for 127.0.0.1 and localhost; returns the CA's PEM
/// path and writes cert.pem/key.pem into `dir`.
fn make_ca(dir: &Path) -> std::path::PathBuf {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    ca_path
}

/// The HTTPS server; killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/jwks/serve.py");
        let www = dir.join("www");
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .arg(&www)
            .arg(dir.join("cert.pem"))
            .arg(dir.join("key.pem"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the HTTPS server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("serve.py prints its port");
        Server { child, port }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn options() -> JwksOptions {
    JwksOptions {
        // Every lookup is due for a fetch, so the outage cases really fetch.
        refresh_interval: Duration::from_millis(1),
        unknown_kid_interval: Duration::ZERO,
        fetch_timeout: Duration::from_secs(5),
        attempts: 2,
        backoff_base: Duration::from_millis(1),
        backoff_cap: Duration::from_millis(1),
    }
}

async fn check(
    cache: &JwksCache,
    rules: &[JwtRule],
    token: &str,
) -> Result<Option<causeway_api::policy::jwt::Authenticated>, causeway_api::policy::jwt::JwtError> {
    let auth = format!("Bearer {token}");
    let headers = [("authorization", auth.as_str())];
    cache
        .authenticate(
            rules,
            &TokenRequest {
                headers: &headers,
                query: None,
            },
        )
        .await
}

#[tokio::test]
async fn keys_are_fetched_rotated_and_kept_through_an_outage() {
    let minted = mint();
    let es = &minted["ES256"];
    let t = |k: &str| es[k].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("www")).unwrap();
    let ca = make_ca(dir.path());
    let jwks_path = dir.path().join("www/jwks.json");
    std::fs::write(&jwks_path, t("jwks")).unwrap();
    let server = Server::start(dir.path());
    let rules = [JwtRule {
        issuer: ISSUER.to_owned(),
        audiences: vec![AUDIENCE.to_owned()],
        jwks_uri: Some(format!("https://127.0.0.1:{}/jwks.json", server.port)),
        ..JwtRule::default()
    }];

    // Without the CA file the server's certificate is not trusted: no keys, refused.
    let untrusting = JwksCache::new(None, options()).unwrap();
    let e = check(&untrusting, &rules, &t("valid")).await.unwrap_err();
    assert!(e.to_string().contains("not available"), "{e}");
    let e = untrusting
        .keys(rules[0].jwks_uri.as_deref().unwrap())
        .await
        .unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    let cache = JwksCache::new(Some(&ca), options()).unwrap();
    let ok = check(&cache, &rules, &t("valid")).await.unwrap().unwrap();
    assert_eq!(ok.request_principal, t("principal"));
    let e = check(&cache, &rules, &t("expired")).await.unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
    assert_eq!(check(&cache, &rules, "").await, Ok(None));

    // Rotation: the issuer now publishes the key under a new kid; a token with that kid
    // makes the cache fetch again, without a restart.
    let e = check(&cache, &rules, &t("unknown_kid")).await.unwrap_err();
    assert_eq!(e.unknown_kid(), Some("k-rotated"), "{e}");
    std::fs::write(
        &jwks_path,
        t("jwks").replace("\"k-es256\"", "\"k-rotated\""),
    )
    .unwrap();
    let ok = check(&cache, &rules, &t("unknown_kid")).await.unwrap();
    assert!(ok.is_some());

    // The endpoint serves garbage: the last good set stays.
    std::fs::write(&jwks_path, "{\"keys\": [{\"kty\": \"EC\"}]}").unwrap();
    assert!(
        check(&cache, &rules, &t("unknown_kid"))
            .await
            .unwrap()
            .is_some()
    );

    // The endpoint is down: the last good set stays.
    drop(server);
    assert!(
        check(&cache, &rules, &t("unknown_kid"))
            .await
            .unwrap()
            .is_some()
    );
    let e = check(&cache, &rules, &t("bad_signature"))
        .await
        .unwrap_err();
    // A token under the retired kid: refreshing cannot help while the endpoint is down,
    // and it stays refused.
    assert_eq!(e.unknown_kid(), Some("k-es256"), "{e}");
}

/// A token verified and cached is refused once the fetched key set no longer has its key
/// (the issuer rotated to a new `kid` and dropped the old one): the refresh that finds the
/// changed set drops the cached verifications.
#[tokio::test]
async fn a_cached_token_is_refused_after_its_key_is_rotated_out() {
    let minted = mint();
    let es = &minted["ES256"];
    let t = |k: &str| es[k].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("www")).unwrap();
    let ca = make_ca(dir.path());
    let jwks_path = dir.path().join("www/jwks.json");
    std::fs::write(&jwks_path, t("jwks")).unwrap();
    let server = Server::start(dir.path());
    let rules = [JwtRule {
        issuer: ISSUER.to_owned(),
        audiences: vec![AUDIENCE.to_owned()],
        jwks_uri: Some(format!("https://127.0.0.1:{}/jwks.json", server.port)),
        ..JwtRule::default()
    }];
    let id = causeway_agent::jwks::rules_id(&rules);
    // Every lookup of the set is due for a fetch (the refresh below really fetches).
    let opts = JwksOptions {
        refresh_interval: Duration::ZERO,
        ..options()
    };
    let cache = JwksCache::new(Some(&ca), opts).unwrap();
    let valid = t("valid");
    for _ in 0..3 {
        let ok = cache.verify_token_cached(&rules, id, &valid).await.unwrap();
        assert_eq!(ok.request_principal, t("principal"));
    }
    assert_eq!(cache.verified().stats().0, 2, "served from the cache");

    // The issuer publishes the key under a new kid only; the agent's refresh (the tunnel
    // warms the rules' key sets every refresh_interval) fetches it.
    std::fs::write(
        &jwks_path,
        t("jwks").replace("\"k-es256\"", "\"k-rotated\""),
    )
    .unwrap();
    cache.prefetch(&rules).await;
    let e = cache
        .verify_token_cached(&rules, id, &valid)
        .await
        .unwrap_err();
    assert_eq!(e.unknown_kid(), Some("k-es256"), "{e}");
    assert_eq!(cache.verified().stats().0, 2);
    assert!(
        cache
            .verify_token_cached(&rules, id, &t("unknown_kid"))
            .await
            .is_ok()
    );
}

#[test]
fn a_bad_ca_file_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let e = JwksCache::new(Some(&missing), options()).err().unwrap();
    assert!(
        e.to_string().contains("jwt.ca_file") && e.to_string().contains("nope.pem"),
        "{e}"
    );
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let e = JwksCache::new(Some(&empty), options()).err().unwrap();
    assert!(e.to_string().contains("no certificate"), "{e}");
}
