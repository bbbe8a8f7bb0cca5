//! Identity end to end: the real controller, agent and CLI on 127.0.0.1:0.

#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_agent::client::{self, ClientError};
use causeway_api::wire::{self, ClientRequest, ErrorCode, JoinRequest, client_request};
use causeway_api::{JoinToken, pem};
use causeway_tests::*;
use prost::Message as _;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

fn rt() -> tokio::runtime::Runtime {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A controller running in this process, with every control request body it receives
/// (after TLS, before decoding) kept in memory: what agents send, seen from the inside.
struct Observed {
    ctl: Controller,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    handle: Option<causeway_controller::app::Handle>,
    rt: tokio::runtime::Runtime,
}

impl Observed {
    fn start(data_dir: &Path) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let hooks = causeway_controller::app::Hooks {
            control_requests: Some(Arc::new(move |body: &[u8]| {
                seen.lock().unwrap().push(body.to_vec());
            })),
        };
        let mut cfg = causeway_controller::config::Config {
            data_dir: data_dir.to_owned(),
            ..Default::default()
        };
        cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
        cfg.control.listen = "127.0.0.1:0".parse().unwrap();
        cfg.metrics.listen = "127.0.0.1:0".parse().unwrap();
        let handle = rt
            .block_on(causeway_controller::app::start_with(cfg, hooks))
            .expect("controller starts");
        let ctl = Controller::attached(
            data_dir,
            &handle.admin_url,
            &handle.control_addr.to_string(),
            &format!("http://{}", handle.metrics_addr),
            &handle.ca_fingerprint,
        );
        Self {
            ctl,
            requests,
            handle: Some(handle),
            rt,
        }
    }

    /// The raw request bodies so far, in arrival order.
    fn raw(&self) -> Vec<Vec<u8>> {
        self.requests.lock().unwrap().clone()
    }

    /// The requests so far, decoded.
    fn requests(&self) -> Vec<ClientRequest> {
        self.raw()
            .iter()
            .map(|body| wire::decode_body(body).expect("a recorded request decodes"))
            .collect()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.rt.block_on(h.shutdown());
        }
    }
}

#[test]
fn join_issues_group_identity_and_the_key_never_leaves_the_host() {
    let t = tmp();
    let observed = Observed::start(&t.path().join("c"));
    let ctl = &observed.ctl;
    ctl.create_web_group();
    let token = ctl.token("web", &[]);
    let state = t.path().join("agent");
    let out = join_ok(&token, &state);
    assert!(
        out.contains("spiffe://causeway.local/ns/default/sa/web"),
        "{out}"
    );

    // The certificate carries the group's SPIFFE ID and nothing else.
    let facts = cert_of(&state);
    assert_eq!(
        facts.spiffe_id.to_string(),
        "spiffe://causeway.local/ns/default/sa/web"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let life = facts.not_after - now;
    assert!(
        (23 * 3600..=24 * 3600 + 60).contains(&life),
        "default lifetime is 24h, got {life}s"
    );

    // key.pem is 0600 and the state dir 0700.
    let mode = std::fs::metadata(state.join("key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "key.pem mode");
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "state dir mode");

    // What the controller received: one join with a CSR, and no trace of the private key.
    let key_pem = std::fs::read_to_string(state.join("key.pem")).unwrap();
    let key_der = pem::decode_all(&key_pem, "PRIVATE KEY").remove(0);
    let requests = observed.requests();
    assert_eq!(requests.len(), 1);
    let Some(client_request::Kind::Join(join)) = &requests[0].kind else {
        panic!("expected a join request, got {:?}", requests[0]);
    };
    assert!(!join.csr_der.is_empty());
    for raw in observed.raw() {
        // The PKCS#8 body holds the private scalar: neither the whole DER nor its
        // trailing 32+ bytes (the public part is allowed) nor its PEM text appear.
        assert!(!raw.windows(key_der.len()).any(|w| w == key_der.as_slice()));
        let private_scalar = &key_der[36..68];
        assert!(
            !raw.windows(32).any(|w| w == private_scalar),
            "private key bytes sent to the controller"
        );
        let b64_line = key_pem.lines().nth(1).unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains(b64_line));
    }

    // The controller lists the agent with its identity.
    let agents = ctl.ctl_json(&["agent", "list"]);
    let agents = agents.as_array().unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(
        agents[0]["identity"],
        "spiffe://causeway.local/ns/default/sa/web"
    );
    assert_eq!(agents[0]["serial"], facts.serial.as_str());
}

#[test]
fn renewal_uses_mutual_tls_and_no_token() {
    let t = tmp();
    let observed = Observed::start(&t.path().join("c"));
    let ctl = &observed.ctl;
    ctl.create_web_group();
    let state = t.path().join("agent");
    join_ok(&ctl.token("web", &[]), &state);
    let before = cert_of(&state);
    let key_before = std::fs::read(state.join("key.pem")).unwrap();

    let out = agent(&["renew", "--state-dir", state.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let after = cert_of(&state);
    assert_ne!(after.serial, before.serial, "a new certificate");
    assert_eq!(after.spiffe_id, before.spiffe_id, "same identity");
    assert_ne!(
        std::fs::read(state.join("key.pem")).unwrap(),
        key_before,
        "a fresh key each renewal"
    );

    let requests = observed.requests();
    assert_eq!(requests.len(), 2);
    let Some(client_request::Kind::Renew(renew)) = &requests[1].kind else {
        panic!("expected a renewal, got {:?}", requests[1]);
    };
    assert!(!renew.csr_der.is_empty());
    // The renewal frame carries no join-token field at all.
    assert!(matches!(
        requests[1].kind,
        Some(client_request::Kind::Renew(_))
    ));
    let certs = ctl.ctl_json(&["agent", "list"]);
    assert_eq!(certs[0]["renewals"], 1);
}

#[test]
fn agent_service_renews_across_agent_and_controller_restarts() {
    let t = tmp();
    let mut ctl =
        Controller::start_with_config(&t.path().join("c"), "[ca]\nworkload_cert_ttl = \"1m\"\n");
    ctl.create_web_group();
    let state = t.path().join("agent");
    join_ok(&ctl.token("web", &[]), &state);
    let fingerprint = ctl.fingerprint.clone();
    // Renew after ~10 % of a one-minute certificate: every few seconds.
    let cfg =
        "[identity]\nrenew_at = 0.1\njitter = 0.02\nretry_min = \"200ms\"\nretry_max = \"1s\"\n";
    let serial_changes = |from: &str, what: &str| {
        let from = from.to_owned();
        wait_for(what, Duration::from_secs(40), || {
            let s = cert_of(&state).serial;
            (s != from).then_some(s)
        })
    };

    let mut a = AgentProcess::start(&state, cfg);
    let s0 = cert_of(&state).serial;
    let s1 = serial_changes(&s0, "a renewal by the running agent");
    let status = wait_for("controller_connected", Duration::from_secs(20), || {
        let st = a.status();
        (st["controller_connected"] == true).then_some(st)
    });
    assert_eq!(
        status["identity"],
        "spiffe://causeway.local/ns/default/sa/web"
    );
    assert!(status["expires_in_secs"].as_i64().unwrap() > 0);
    assert!(status.get("config_version").is_some());

    // Agent killed and started again: it renews from its files, without a token.
    a.kill();
    let mut a = AgentProcess::start(&state, cfg);
    let s2 = serial_changes(&s1, "a renewal after the agent restarted");

    // Controller killed: the agent keeps its certificate and reports the loss.
    ctl.kill();
    let st = wait_for(
        "controller_connected = false",
        Duration::from_secs(40),
        || {
            let st = a.status();
            (st["controller_connected"] == false).then_some(st)
        },
    );
    assert!(
        st["expires_in_secs"].as_i64().unwrap() > 0,
        "still serving with a valid certificate"
    );
    // Controller back on the same data dir and port: same CA, renewals resume.
    ctl.restart();
    assert_eq!(
        ctl.fingerprint, fingerprint,
        "a restart never changes the CA"
    );
    let s3 = serial_changes(&s2, "a renewal after the controller restarted");
    let certs: Vec<String> = ctl.ctl_json(&["agent", "list"])[0]["serial"]
        .as_str()
        .map(|s| vec![s.to_owned()])
        .unwrap();
    // The controller's record follows the agent (it may have renewed once more since).
    let current = cert_of(&state).serial;
    assert!(
        certs[0] == current || certs[0] == s3,
        "controller record {certs:?} vs agent {current}"
    );
    a.stop();
    let st = a.status();
    assert_eq!(st["running"], false);
}

#[test]
fn sigkill_during_a_burst_of_joins_loses_nothing() {
    let t = tmp();
    let mut ctl = Controller::start(&t.path().join("c"), &[]);
    ctl.create_web_group();
    let fingerprint = ctl.fingerprint.clone();
    const N: usize = 24;
    let tokens: Vec<String> = (0..N).map(|_| ctl.token("web", &[])).collect();
    let dirs: Vec<_> = (0..N).map(|i| t.path().join(format!("a{i}"))).collect();
    let children: Vec<_> = tokens
        .iter()
        .zip(&dirs)
        .map(|(tok, dir)| {
            std::process::Command::new(bin("causeway-agent"))
                .args(["join", tok, "--state-dir", dir.to_str().unwrap()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // Kill the controller once a few joins have landed, with others in flight.
    wait_for("first joins", Duration::from_secs(60), || {
        (dirs
            .iter()
            .filter(|d| d.join("agent.json").exists())
            .count()
            >= 3)
            .then_some(())
    });
    ctl.kill();
    for mut c in children {
        let _ = c.wait();
    }
    ctl.restart();
    assert_eq!(ctl.fingerprint, fingerprint, "CA unchanged after SIGKILL");

    let agents = ctl.ctl_json(&["agent", "list"]);
    let agents = agents.as_array().unwrap();
    let issued = ctl.api("/v1/certificates");
    let serials: Vec<&str> = issued
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["serial"].as_str().unwrap())
        .collect();
    // Every certificate an agent received is recorded.
    let mut joined = 0;
    for d in &dirs {
        if d.join("cert.pem").exists() {
            joined += 1;
            let s = cert_of(d).serial;
            assert!(
                serials.contains(&s.as_str()),
                "certificate {s} received by an agent but not recorded"
            );
        }
    }
    assert!(joined >= 3);
    // Every token was spent at most once, and a spent token has its agent recorded.
    let token_list = ctl.ctl_json(&["token", "list"]);
    for tok in token_list.as_array().unwrap() {
        let id = tok["id"].as_str().unwrap();
        let uses = agents.iter().filter(|a| a["token_id"] == id).count();
        assert!(uses <= 1, "token {id} used {uses} times");
        let spent = tok["uses_left"] == 0;
        assert_eq!(
            spent,
            uses == 1,
            "token {id}: spent={spent} but {uses} agent(s) recorded"
        );
    }
    // Tokens not spent still work; spent ones are refused.
    for (tok, dir) in tokens.iter().zip(&dirs) {
        let retry = t.path().join(format!(
            "{}-retry",
            dir.file_name().unwrap().to_str().unwrap()
        ));
        let id = JoinToken::decode(tok).unwrap().id;
        let spent = token_list
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == id.as_str() && t["uses_left"] == 0);
        if spent {
            assert!(join_err(tok, &retry).contains("already been used"));
        } else {
            join_ok(tok, &retry);
        }
    }
}

#[test]
fn admin_api_requires_the_credential() {
    let t = tmp();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    let token_file = ctl.data_dir.join("admin.token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    rt().block_on(async {
        let http = reqwest::Client::new();
        let r = http
            .get(format!("{}/v1/agents", ctl.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("admin credential"));
        let r = http
            .get(format!("{}/v1/agents", ctl.admin))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
        let r = http
            .get(format!("{}/healthz", ctl.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    });
    // causewayctl without a readable credential says what to do.
    let out = std::process::Command::new(bin("causewayctl"))
        .args([
            "agent",
            "list",
            "--controller",
            &ctl.admin,
            "--admin-token-file",
            "/nonexistent/admin.token",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--admin-token-file"));
}

#[test]
fn refused_reused_single_use_token() {
    let t = tmp();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    ctl.create_web_group();
    let token = ctl.token("web", &[]);
    join_ok(&token, &t.path().join("a1"));
    let err = join_err(&token, &t.path().join("a2"));
    assert!(err.contains("already been used"), "{err}");
    assert!(
        !t.path().join("a2/key.pem").exists(),
        "no identity written on refusal"
    );
    // A multi-use token allows exactly its count.
    let multi = ctl.token("web", &["--uses", "2"]);
    join_ok(&multi, &t.path().join("m1"));
    join_ok(&multi, &t.path().join("m2"));
    assert!(join_err(&multi, &t.path().join("m3")).contains("already been used"));
}

#[test]
fn refused_expired_token() {
    let t = tmp();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    ctl.create_web_group();
    let token = ctl.token("web", &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    let err = join_err(&token, &t.path().join("a"));
    assert!(err.contains("expired"), "{err}");
}

#[test]
fn refused_source_outside_token_cidr() {
    let t = tmp();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    ctl.create_web_group();
    let token = ctl.token("web", &["--cidr", "10.99.0.0/16"]);
    let err = join_err(&token, &t.path().join("a"));
    assert!(
        err.contains("127.0.0.1") && err.contains("10.99.0.0/16"),
        "{err}"
    );
    // The refusal did not spend it: the same token from an allowed source still has its use.
    let tokens = ctl.ctl_json(&["token", "list"]);
    assert_eq!(tokens[0]["uses_left"], 1);
    let ok = ctl.token("web", &["--cidr", "127.0.0.0/8"]);
    join_ok(&ok, &t.path().join("b"));
}

#[test]
fn refused_wrong_secret() {
    let t = tmp();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    ctl.create_web_group();
    let mut token = JoinToken::decode(&ctl.token("web", &[])).unwrap();
    token.secret[0] ^= 1;
    let err = join_err(&token.encode(), &t.path().join("a"));
    assert!(err.contains("not valid"), "{err}");
    let garbage = join_err("cwt1.bm90IGEgdG9rZW4", &t.path().join("b"));
    assert!(garbage.contains("corrupted"), "{garbage}");
}

fn raw_join(
    token: &JoinToken,
    csr_der: Vec<u8>,
) -> Result<causeway_api::wire::Issued, ClientError> {
    rt().block_on(async {
        let conn = client::connect_pinned(token).await?;
        let req = ClientRequest {
            kind: Some(client_request::Kind::Join(JoinRequest {
                token_id: token.id.clone(),
                secret: token.secret.to_vec(),
                csr_der,
                hostname: "test".into(),
            })),
        };
        client::request(&conn, &req).await
    })
}

#[test]
fn csr_names_are_ignored() {
    let t = tmp();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    ctl.create_web_group();
    let token = JoinToken::decode(&ctl.token("web", &[])).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example.com".to_owned()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://causeway.local/ns/kube-system/sa/admin"
            .try_into()
            .unwrap(),
    ));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let issued = raw_join(&token, csr).expect("join with a greedy CSR still succeeds");
    let (_, cert) = x509_parser::parse_x509_certificate(&issued.cert_chain_der[0]).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        names,
        vec!["URI(spiffe://causeway.local/ns/default/sa/web)".to_owned()]
    );
    assert!(!cert.is_ca(), "a CSR cannot ask for a CA certificate");
    assert!(cert.subject().iter_common_name().next().is_none());
}

#[test]
fn refused_malformed_csr_without_spending_the_token() {
    let t = tmp();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    ctl.create_web_group();
    let text = ctl.token("web", &[]);
    let token = JoinToken::decode(&text).unwrap();
    match raw_join(&token, b"this is not a CSR".to_vec()) {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::CsrInvalid);
            assert!(message.contains("CSR"), "{message}");
        }
        other => panic!("expected a CSR refusal, got {other:?}"),
    }
    // A P-384 key is refused by name.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    match raw_join(&token, csr) {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::CsrInvalid);
            assert!(message.contains("P-256"), "{message}");
        }
        other => panic!("expected a key-type refusal, got {other:?}"),
    }
    // Nothing was lost: the token still works.
    join_ok(&text, &t.path().join("a"));
}

#[test]
fn refused_oversized_request() {
    let t = tmp();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    ctl.create_web_group();
    let text = ctl.token("web", &[]);
    let token = JoinToken::decode(&text).unwrap();
    match raw_join(&token, vec![0x30; 200 * 1024]) {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::TooLarge);
            assert!(message.contains("65536"), "{message}");
        }
        other => panic!("expected an oversized refusal, got {other:?}"),
    }
    // A malformed frame (not protobuf) gets a clear error too.
    let err = rt().block_on(async {
        let conn = client::connect_pinned(&token).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        send.finish().unwrap();
        let buf = recv.read_to_end(1 << 20).await.unwrap();
        let resp: causeway_api::wire::ServerResponse = wire::decode_frame(&buf, 1 << 20).unwrap();
        resp
    });
    let Some(causeway_api::wire::server_response::Kind::Error(e)) = err.kind else {
        panic!("expected an error reply")
    };
    assert_eq!(e.code, ErrorCode::Malformed as i32);
    join_ok(&text, &t.path().join("a"));
    let _ = JoinRequest::default().encode_to_vec();
}

#[test]
fn refused_when_the_pinned_ca_differs() {
    let t = tmp();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    ctl.create_web_group();
    let mut token = JoinToken::decode(&ctl.token("web", &[])).unwrap();
    token.ca_fingerprint[0] ^= 0xff;
    let err = join_err(&token.encode(), &t.path().join("a"));
    assert!(err.contains("does not match the join token"), "{err}");
    // Nothing was sent: the token is still unspent.
    assert_eq!(ctl.ctl_json(&["token", "list"])[0]["uses_left"], 1);
}

#[test]
fn refused_renewal_with_a_certificate_from_another_ca() {
    let t = tmp();
    let a = Controller::start(&t.path().join("ca"), &[]);
    let b = Controller::start(&t.path().join("cb"), &[]);
    b.create_web_group();
    let state = t.path().join("agent");
    join_ok(&b.token("web", &[]), &state);
    // Point the agent at controller A, whose CA never signed its certificate.
    let info_path = state.join("agent.json");
    let mut info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&info_path).unwrap()).unwrap();
    info["controller"] = a.control.clone().into();
    // Trust A's server (so only the client certificate can fail).
    let ca = a.ctl_json(&["ca", "show"]);
    std::fs::write(&info_path, serde_json::to_vec(&info).unwrap()).unwrap();
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(state.join("bundle.pem")).unwrap(),
        ca["trust_bundle_pem"][0].as_str().unwrap()
    );
    std::fs::write(state.join("bundle.pem"), bundle).unwrap();
    let before = cert_of(&state).serial;
    let out = agent(&["renew", "--state-dir", state.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not accept this host's certificate")
            || err.contains("not issued by this controller"),
        "{err}"
    );
    assert_eq!(
        cert_of(&state).serial,
        before,
        "the old certificate is kept"
    );
}

#[test]
fn refused_renewal_by_a_removed_agent() {
    let t = tmp();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    ctl.create_web_group();
    let state = t.path().join("agent");
    join_ok(&ctl.token("web", &[]), &state);
    let id = ctl.ctl_json(&["agent", "list"])[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = ctl.ctl_ok(&["agent", "remove", &id]);
    assert!(out.contains("removed"), "{out}");
    let out = agent(&["renew", "--state-dir", state.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("was removed"), "{err}");
    let agents = ctl.ctl_json(&["agent", "list"]);
    assert_eq!(agents[0]["removed"], true);
    assert_eq!(agents[0]["renewals"], 0);
    // The group cannot be deleted while agents are active, but can once they are removed.
    ctl.ctl_ok(&["group", "delete", "web"]);
}

#[test]
fn group_delete_refused_while_agents_are_active() {
    let t = tmp();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    ctl.create_web_group();
    join_ok(&ctl.token("web", &[]), &t.path().join("a"));
    let out = ctl.ctl(&["group", "delete", "web"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("agent remove"),
        "{}",
        describe(&out)
    );
    // Bad group input is refused with every problem named.
    let out = ctl.ctl(&[
        "group",
        "create",
        "Bad",
        "--namespace",
        "NS",
        "--service-account",
        "sa",
        "--port",
        "http:0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("group name") && err.contains("namespace") && err.contains("port"),
        "{err}"
    );
}

#[test]
fn admin_api_over_https_with_the_operator_certificate() {
    let t = tmp();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (t.path().join("admin.crt"), t.path().join("admin.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let ctl = Controller::start_with_config(
        &t.path().join("c"),
        &format!(
            "[admin]\nlisten = \"127.0.0.1:15080\"\ntls_cert = {:?}\ntls_key = {:?}\n",
            cert_path.to_str().unwrap(),
            key_path.to_str().unwrap()
        ),
    );
    assert!(ctl.admin.starts_with("https://"), "{}", ctl.admin);
    let run = |extra: &[&str]| {
        std::process::Command::new(bin("causewayctl"))
            .args(["ca", "show", "--output", "json"])
            .args(extra)
            .env("CAUSEWAY_CONTROLLER", &ctl.admin)
            .env(
                "CAUSEWAY_ADMIN_TOKEN_FILE",
                ctl.data_dir.join("admin.token"),
            )
            .output()
            .unwrap()
    };
    // Trusting the operator's certificate: works.
    let out = run(&["--ca-file", cert_path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["fingerprint"], ctl.fingerprint.as_str());
    // Without trusting it: a clear failure, not a silent downgrade.
    let out = run(&[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("answered, but its TLS certificate is not trusted"),
        "{}",
        describe(&out)
    );
    // Plain HTTP to the HTTPS admin API: reachable, the wrong protocol, and the fix.
    let out = std::process::Command::new(bin("causewayctl"))
        .args(["ca", "show"])
        .env(
            "CAUSEWAY_CONTROLLER",
            ctl.admin.replacen("https:", "http:", 1),
        )
        .env(
            "CAUSEWAY_ADMIN_TOKEN_FILE",
            ctl.data_dir.join("admin.token"),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is reachable, but did not answer in HTTP") && err.contains("use https://"),
        "{}",
        describe(&out)
    );
    // Shell completions are generated without a controller.
    let out = std::process::Command::new(bin("causewayctl"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("causewayctl"));
}
