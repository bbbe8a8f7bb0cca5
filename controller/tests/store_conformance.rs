//! The same assertions against both [`Store`] backends: sled (embedded) and etcd (a real
//! etcd member, Debian's `etcd-server`; the test-deps script installs it). Then what only
//! etcd has to show: two controllers racing on one token never overspend it, large mesh
//! writes fit etcd's limits, and the CA key is kept sealed under the key-encryption key.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_api::WorkloadGroup;
use causeway_api::registry::{
    Endpoint, Provenance, ServiceEndpoints, ServiceKey, SourceKind, SourceState,
};
use causeway_controller::etcd::{Etcd, EtcdOptions};
use causeway_controller::store::{
    AgentRecord, CaRecord, CertRecord, Enrollment, GroupRecord, HistoryRecord, LiveCert, MeshWrite,
    PolicyRecord, RouteRecord, SledStore, SourceRecord, Store, StoreError, TokenRecord,
};
use causeway_controller::store_etcd::{EtcdStore, Kek};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .unwrap()
        .port()
}

/// One etcd member on loopback, stopped and removed on drop.
struct Member {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_etcd() -> Member {
    start_etcd_with(None)
}

/// Certificates for an etcd that requires client certificates.
struct Tls {
    ca: std::path::PathBuf,
    client_cert: std::path::PathBuf,
    client_key: std::path::PathBuf,
    server_cert: std::path::PathBuf,
    server_key: std::path::PathBuf,
}

fn make_tls(dir: &std::path::Path) -> Tls {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |name: &str, san: Vec<String>, usage: Vec<ExtendedKeyUsagePurpose>| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(san).unwrap();
        params.extended_key_usages = usage;
        let cert = params.signed_by(&key, &ca).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    };
    let (server_cert, server_key) = leaf(
        "server",
        vec!["127.0.0.1".into(), "localhost".into()],
        // etcd's own gateway dials its gRPC server with this certificate as a client.
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    let (client_cert, client_key) = leaf(
        "client",
        vec!["controller".into()],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    );
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    Tls {
        ca: ca_path,
        client_cert,
        client_key,
        server_cert,
        server_key,
    }
}

#[allow(
    clippy::disallowed_methods,
    reason = "test support: a synchronous wait for etcd to answer"
)]
fn start_etcd_with(tls: Option<&Tls>) -> Member {
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
    let mut tls_args = Vec::new();
    if let Some(t) = tls {
        tls_args = vec![
            "--cert-file".to_owned(),
            t.server_cert.to_str().unwrap().to_owned(),
            "--key-file".to_owned(),
            t.server_key.to_str().unwrap().to_owned(),
            "--client-cert-auth".to_owned(),
            "--trusted-ca-file".to_owned(),
            t.ca.to_str().unwrap().to_owned(),
        ];
    }
    let child = Command::new("etcd")
        .args(tls_args)
        .args([
            "--name",
            "m1",
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("m1={peer_url}"),
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start etcd ({e}); install it with: apt-get install etcd-server (scripts/install-test-deps.sh does)")
        });
    let member = Member { child, url, dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    let health = format!("{}/health", member.url);
    loop {
        let ready = match tls {
            // Through the client under test (curl and this etcd disagree on TLS records).
            Some(t) => {
                let etcd = Etcd::new(&EtcdOptions {
                    ca_file: Some(t.ca.clone()),
                    cert_file: Some(t.client_cert.clone()),
                    key_file: Some(t.client_key.clone()),
                    ..options(&member.url)
                })
                .unwrap();
                block(etcd.get(b"/ready")).is_ok()
            }
            None => Command::new("curl")
                .args(["-fsS", "-m", "1", &health])
                .output()
                .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("true")),
        };
        if ready {
            return member;
        }
        assert!(
            Instant::now() < deadline,
            "etcd at {} not healthy after 30 s; its log:\n{}",
            member.url,
            std::fs::read_to_string(member.dir.path().join("etcd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn options(url: &str) -> EtcdOptions {
    EtcdOptions {
        endpoints: vec![url.to_owned()],
        request_timeout: Duration::from_secs(10),
        dial_timeout: Duration::from_secs(1),
        ..EtcdOptions::default()
    }
}

const KEK: &[u8] = b"0123456789abcdef0123456789abcdef-test-kek";

fn etcd_store(m: &Member, prefix: &str) -> EtcdStore {
    EtcdStore::open(
        &options(&m.url),
        prefix,
        Kek::from_bytes(KEK, "test").unwrap(),
    )
    .unwrap()
}

fn raw_client(m: &Member) -> Etcd {
    Etcd::new(&options(&m.url)).unwrap()
}

/// Runs an etcd request from a synchronous test.
fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn group(name: &str, id: &str) -> GroupRecord {
    GroupRecord {
        group: WorkloadGroup {
            name: name.into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            service: None,
            ports: vec![],
            labels: Default::default(),
            allowed_cidrs: vec![],
            mtls: Default::default(),
            registry_source: None,
        },
        id: id.into(),
        created_at: 0,
    }
}

fn token(id: &str, uses: u32) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        secret_sha256: "00".into(),
        group: "g".into(),
        group_id: "g-1".into(),
        revoked_at: None,
        created_at: 0,
        expires_at: 100,
        uses_total: uses,
        uses_left: uses,
        cidrs: vec![],
    }
}

fn agent(id: &str) -> AgentRecord {
    AgentRecord {
        id: id.into(),
        group: "g".into(),
        spiffe_id: "spiffe://td/ns/ns/sa/sa".into(),
        hostname: "h".into(),
        address: "127.0.0.1".parse().unwrap(),
        token_id: "t".into(),
        joined_at: 0,
        serial: format!("s-{id}"),
        not_after: 10,
        renewed_at: None,
        renewals: 0,
        removed_at: None,
        live_certs: vec![LiveCert {
            serial: format!("s-{id}"),
            not_after: 10,
        }],
    }
}

fn cert(serial: &str, agent: &str) -> CertRecord {
    CertRecord {
        serial: serial.into(),
        agent_id: agent.into(),
        spiffe_id: "spiffe://td/ns/ns/sa/sa".into(),
        not_before: 0,
        not_after: 10,
        reason: "join".into(),
    }
}

fn join(t: &str, a: &str, serial: &str) -> Enrollment {
    Enrollment::Join {
        token_id: t.into(),
        agent: agent(a),
        cert: cert(serial, a),
    }
}

fn renew(a: &str, serial: &str) -> Enrollment {
    let mut c = cert(serial, a);
    c.not_after = 100;
    Enrollment::Renewal {
        agent_id: a.into(),
        cert: c,
        now: 9,
    }
}

fn ca(fingerprint: &str) -> CaRecord {
    CaRecord {
        cert_pem: format!("CERT {fingerprint}"),
        key_pem: format!(
            "-----BEGIN PRIVATE KEY-----\nSECRET-{fingerprint}\n-----END PRIVATE KEY-----\n"
        ),
        fingerprint: fingerprint.into(),
        mode: "generated".into(),
        trust_bundle: vec![format!("CERT {fingerprint}")],
        created_at: 1,
    }
}

fn endpoint(source: &str, id: &str, addr: &str) -> Endpoint {
    let mut e = Endpoint::new(
        addr,
        Provenance {
            source: source.into(),
            kind: SourceKind::File,
            native_id: id.into(),
            revision: "1".into(),
        },
    );
    e.ports.insert("http".into(), 8080);
    e
}

fn route(seq: u64) -> RouteRecord {
    let json = r#"{"apiVersion":"networking.istio.io/v1","kind":"DestinationRule","metadata":{"name":"x","namespace":"a"},"spec":{"host":"web","subsets":[{"name":"v1","labels":{"version":"v1"}}]}}"#;
    RouteRecord {
        seq,
        version: seq,
        resource: serde_json::from_str(json).unwrap(),
    }
}

fn policy(seq: u64) -> PolicyRecord {
    let json = r#"{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"x","namespace":"a"},"spec":{"action":"DENY","rules":[{}]}}"#;
    PolicyRecord {
        seq,
        version: seq,
        resource: serde_json::from_str(json).unwrap(),
    }
}

/// The assertions every backend must pass, on an empty store.
fn conformance(s: &dyn Store) {
    // CA: created once, never replaced.
    assert_eq!(s.ca().unwrap(), None);
    assert_eq!(s.init_ca(&ca("f1")).unwrap(), ca("f1"));
    assert_eq!(s.init_ca(&ca("f2")).unwrap(), ca("f1"), "create-if-absent");
    assert_eq!(s.ca().unwrap(), Some(ca("f1")));

    // Groups.
    s.create_group(&group("g", "g-1")).unwrap();
    s.create_group(&group("other", "o-1")).unwrap();
    let err = s.create_group(&group("g", "g-2")).unwrap_err();
    assert!(matches!(err, StoreError::Exists { .. }), "{err}");
    assert_eq!(s.group("g").unwrap().unwrap().id, "g-1");
    assert_eq!(s.group("nope").unwrap(), None);
    let names: Vec<String> = s
        .groups()
        .unwrap()
        .into_iter()
        .map(|g| g.group.name)
        .collect();
    assert_eq!(names, ["g", "other"]);

    // Tokens with uses, spent in one batch with mixed outcomes.
    s.create_token(&token("t", 1)).unwrap();
    s.commit_join("t", &agent("gone"), &cert("s0", "gone"))
        .unwrap();
    let err = s
        .commit_join("t", &agent("late"), &cert("s-late", "late"))
        .unwrap_err();
    assert!(matches!(err, StoreError::TokenSpent(_)), "{err}");
    assert!(s.agent("late").unwrap().is_none() && s.cert("s-late").unwrap().is_none());
    s.remove_agent("gone", 1).unwrap();
    assert_eq!(s.remove_agent("gone", 5).unwrap().removed_at, Some(1));
    let err = s
        .commit_renewal("gone", &cert("s-r", "gone"), 2)
        .unwrap_err();
    assert!(matches!(err, StoreError::AgentRemoved(_)), "{err}");
    assert!(s.cert("s-r").unwrap().is_none());
    s.create_token(&token("t2", 2)).unwrap();
    let out = s
        .commit_enrollments(&[
            join("t2", "a1", "s1"),
            join("t2", "a2", "s2"),
            join("t2", "a3", "s3"), // both uses went just before
            renew("gone", "s4"),
            renew("a1", "s5"), // a1 exists only in this batch so far
            join("nope", "a6", "s6"),
            renew("ghost", "s7"),
        ])
        .unwrap();
    assert!(out[0].is_ok() && out[1].is_ok(), "{out:?}");
    assert!(
        matches!(out[2], Err(StoreError::TokenSpent(_))),
        "{:?}",
        out[2]
    );
    assert!(
        matches!(out[3], Err(StoreError::AgentRemoved(_))),
        "{:?}",
        out[3]
    );
    let a1 = out[4].as_ref().unwrap();
    assert_eq!((a1.serial.as_str(), a1.renewals), ("s5", 1));
    assert!(
        matches!(out[5], Err(StoreError::NotFound { .. })),
        "{:?}",
        out[5]
    );
    assert!(
        matches!(out[6], Err(StoreError::NotFound { .. })),
        "{:?}",
        out[6]
    );
    s.flush().unwrap();
    assert_eq!(s.token("t2").unwrap().unwrap().uses_left, 0);
    assert!(s.agent("a3").unwrap().is_none() && s.cert("s3").unwrap().is_none());
    assert!(s.cert("s4").unwrap().is_none() && s.cert("s6").unwrap().is_none());
    let a1 = s.agent("a1").unwrap().unwrap();
    let serials: Vec<&str> = a1.live_certs.iter().map(|c| c.serial.as_str()).collect();
    assert_eq!(serials, ["s-a1", "s5"], "both certificates are live at 9");
    let mut agents: Vec<String> = s.agents().unwrap().into_iter().map(|a| a.id).collect();
    agents.sort();
    assert_eq!(agents, ["a1", "a2", "gone"]);
    let mut certs: Vec<String> = s.certs().unwrap().into_iter().map(|c| c.serial).collect();
    certs.sort();
    assert_eq!(certs, ["s0", "s1", "s2", "s5"]);

    // Revocation: kept at its first time; a revoked token joins nothing.
    s.create_token(&token("t3", 5)).unwrap();
    assert_eq!(s.revoke_token("t3", 7).unwrap().revoked_at, Some(7));
    assert_eq!(s.revoke_token("t3", 9).unwrap().revoked_at, Some(7));
    let err = s
        .commit_join("t3", &agent("a9"), &cert("s9", "a9"))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::TokenRevoked { revoked_at: 7, .. }),
        "{err}"
    );
    let err = s.revoke_token("none", 1).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    let err = s.remove_agent("none", 1).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");

    // A group with active agents is kept; without, it goes with its tokens.
    let err = s.delete_group("g").unwrap_err();
    assert!(
        err.to_string().contains("a1") && err.to_string().contains("a2"),
        "{err}"
    );
    s.remove_agent("a1", 10).unwrap();
    s.remove_agent("a2", 10).unwrap();
    assert_eq!(s.delete_group("g").unwrap(), 3);
    assert!(s.tokens().unwrap().is_empty());
    assert!(s.group("g").unwrap().is_none() && s.group("other").unwrap().is_some());
    let err = s.delete_group("g").unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");

    // A group with more tokens than one etcd transaction takes goes with all of them.
    s.create_group(&group("big", "b-1")).unwrap();
    for i in 0..130 {
        let mut t = token(&format!("big-{i:03}"), 1);
        t.group = "big".into();
        t.group_id = "b-1".into();
        s.create_token(&t).unwrap();
    }
    assert_eq!(s.delete_group("big").unwrap(), 130);
    assert!(s.tokens().unwrap().is_empty() && s.group("big").unwrap().is_none());

    // The mesh: an empty store loads as version 0.
    let empty = s.load_mesh().unwrap();
    assert_eq!(empty.version, 0);
    assert!(empty.sources.is_empty() && empty.data.is_empty() && empty.history.is_empty());

    // A write larger than one etcd transaction (ops and history size) round-trips.
    let keys: Vec<ServiceKey> = (0..250)
        .map(|i| ServiceKey::new("shop", format!("svc-{i:04}")))
        .collect();
    let eps: BTreeMap<ServiceKey, ServiceEndpoints> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let e = endpoint(
                "files",
                &format!("e{i}"),
                &format!("10.0.{}.{}", i / 200, i % 200),
            );
            (k.clone(), [(format!("e{i}"), e)].into_iter().collect())
        })
        .collect();
    let mut big_history = HistoryRecord {
        deny: true,
        ..HistoryRecord::default()
    };
    // ~14 000 service names: over 256 KiB encoded, so several history keys in etcd.
    big_history.services = (0..14_000)
        .map(|i| ServiceKey::new("bulk", format!("a-rather-long-service-name-{i:06}")))
        .collect();
    big_history
        .policies
        .insert("AuthorizationPolicy/a/x".into());
    let vips: Vec<(ServiceKey, Ipv4Addr)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            (
                k.clone(),
                Ipv4Addr::new(240, 240, (i / 250) as u8, (i % 250) as u8),
            )
        })
        .collect();
    let source = SourceRecord {
        kind: SourceKind::File,
        state: SourceState::syncing(),
    };
    let w1 = MeshWrite {
        version: 1,
        sources: vec![("files".into(), source.clone())],
        data: keys.iter().map(|k| ("files", k, eps.get(k))).collect(),
        vips: vips.clone(),
        history: &big_history,
        history_keep_from: 0,
        policies: vec![("AuthorizationPolicy/a/x".into(), Some(policy(1)))],
        routes: vec![("DestinationRule/a/x".into(), Some(route(1)))],
    };
    s.save_mesh(&w1.encode()).unwrap();
    assert_eq!(
        s.load_mesh().unwrap().routes["DestinationRule/a/x"],
        route(1)
    );
    // Version 2 drops one service, deletes the policy and forgets history below 2.
    let small = HistoryRecord {
        services: [keys[0].clone()].into_iter().collect(),
        deny: false,
        policies: ["AuthorizationPolicy/a/x".to_owned()].into_iter().collect(),
        routes: ["DestinationRule/a/x".to_owned()].into_iter().collect(),
    };
    let w2 = MeshWrite {
        version: 2,
        sources: vec![],
        data: vec![("files", &keys[0], None)],
        vips: vec![],
        history: &small,
        history_keep_from: 2,
        policies: vec![("AuthorizationPolicy/a/x".into(), None)],
        routes: vec![("DestinationRule/a/x".into(), None)],
    };
    s.save_mesh(&w2.encode()).unwrap();
    let d = s.load_mesh().unwrap();
    assert_eq!(d.version, 2);
    assert_eq!(
        d.sources,
        [("files".to_owned(), source)].into_iter().collect()
    );
    let mut want = eps.clone();
    want.remove(&keys[0]);
    assert_eq!(d.data.len(), 1);
    assert_eq!(d.data["files"], want);
    assert_eq!(d.vips, vips.into_iter().collect());
    assert_eq!(d.history.keys().copied().collect::<Vec<_>>(), [2]);
    assert_eq!(d.history[&2], small);
    assert!(d.policies.is_empty());
    assert!(d.routes.is_empty());
    // History below keep_from goes, what is kept comes back whole (all its parts).
    let w3 = MeshWrite {
        version: 3,
        sources: vec![],
        data: vec![],
        vips: vec![],
        history: &big_history,
        history_keep_from: 2,
        policies: vec![("AuthorizationPolicy/a/x".into(), Some(policy(3)))],
        routes: vec![],
    };
    s.save_mesh(&w3.encode()).unwrap();
    let d = s.load_mesh().unwrap();
    assert_eq!(d.history.keys().copied().collect::<Vec<_>>(), [2, 3]);
    assert_eq!(d.history[&3], big_history);
    assert_eq!(d.policies["AuthorizationPolicy/a/x"], policy(3));
}

#[test]
fn sled_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    conformance(&s);
}

#[test]
fn etcd_store_conforms() {
    let m = start_etcd();
    let s = etcd_store(&m, "/causeway/");
    conformance(&s);
    // Another prefix is another store: nothing leaks between them.
    let other = etcd_store(&m, "/other/");
    assert_eq!(other.ca().unwrap(), None);
    assert!(other.agents().unwrap().is_empty());
}

/// Two controllers (two stores on one etcd) race 200 joins on a token with 100 uses,
/// in batches from several threads each: exactly 100 succeed, the others are refused
/// as spent, and etcd holds exactly 100 agents and a token with no use left.
#[test]
fn two_controllers_never_spend_a_token_more_than_its_uses() {
    let m = start_etcd();
    let a = Arc::new(etcd_store(&m, "/causeway/"));
    let b = Arc::new(etcd_store(&m, "/causeway/"));
    a.create_token(&token("multi", 100)).unwrap();
    let mut threads = Vec::new();
    for t in 0..8 {
        let store = if t % 2 == 0 { a.clone() } else { b.clone() };
        threads.push(std::thread::spawn(move || {
            let mut ok = 0;
            let mut spent = 0;
            // 25 joins per thread, in batches of 1 to 5 as the group commit makes them.
            let mut n = 0;
            while n < 25 {
                let size = 1 + (n + t) % 5;
                let batch: Vec<Enrollment> = (n..(n + size).min(25))
                    .map(|i| {
                        let id = format!("agent-{t}-{i}");
                        join("multi", &id, &format!("serial-{t}-{i}"))
                    })
                    .collect();
                n += batch.len();
                for out in store.commit_enrollments(&batch).unwrap() {
                    match out {
                        Ok(_) => ok += 1,
                        Err(StoreError::TokenSpent(_)) => spent += 1,
                        Err(e) => panic!("a join failed otherwise than spent: {e}"),
                    }
                }
            }
            (ok, spent)
        }));
    }
    let (mut ok, mut spent) = (0, 0);
    for t in threads {
        let (o, s) = t.join().unwrap();
        ok += o;
        spent += s;
    }
    assert_eq!((ok, spent), (100, 100));
    // Counted from etcd itself, not from either store.
    let etcd = raw_client(&m);
    let agents = block(etcd.get_prefix(b"/causeway/agents/", 0, 0)).unwrap();
    assert_eq!(agents.count, 100);
    let certs = block(etcd.get_prefix(b"/causeway/certs/", 0, 0)).unwrap();
    assert_eq!(certs.count, 100);
    let raw = block(etcd.get(b"/causeway/tokens/multi")).unwrap().unwrap();
    let t: TokenRecord = serde_json::from_slice(&raw.value).unwrap();
    assert_eq!(t.uses_left, 0);
}

/// The CA key is sealed in etcd: its PEM is not in the raw value, a controller with the
/// same key-encryption key reads it back, one with another key gets a clear error, and a
/// key-encryption key file that is too short is refused before anything starts.
#[test]
fn the_ca_key_is_sealed_under_the_kek() {
    let m = start_etcd();
    let first = etcd_store(&m, "/causeway/");
    assert_eq!(first.init_ca(&ca("f1")).unwrap(), ca("f1"));
    let raw = block(raw_client(&m).get(b"/causeway/ca/current"))
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw.value);
    assert!(text.contains("CERT f1"), "{text}");
    assert!(
        !text.contains("SECRET-f1") && !text.contains("PRIVATE KEY"),
        "the CA key must not be readable in etcd: {text}"
    );

    // A second controller with the same KEK: create-if-absent returns the first CA.
    let second = etcd_store(&m, "/causeway/");
    assert_eq!(second.init_ca(&ca("f2")).unwrap(), ca("f1"));

    // Another KEK: refused, naming the fix.
    let wrong = EtcdStore::open(
        &options(&m.url),
        "/causeway/",
        Kek::from_bytes(b"another-key-another-key-another-key!", "other").unwrap(),
    )
    .unwrap();
    let err = wrong.ca().unwrap_err().to_string();
    assert!(
        err.contains("cannot be decrypted") && err.contains("same kek_file"),
        "{err}"
    );
    let err = wrong.init_ca(&ca("f3")).unwrap_err().to_string();
    assert!(err.contains("cannot be decrypted"), "{err}");

    // Short or missing KEK files.
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("kek");
    std::fs::write(&short, "tooshort\n").unwrap();
    let err = Kek::from_file(&short).unwrap_err().to_string();
    assert!(
        err.contains("holds 8 bytes") && err.contains("at least 32") && err.contains("kek"),
        "{err}"
    );
    let err = Kek::from_file(&dir.path().join("absent"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read it") && err.contains("absent"),
        "{err}"
    );
    // 32 random bytes are taken whole, even when the last one is a newline.
    let mut raw = vec![0x9c_u8; 31];
    raw.push(b'\n');
    Kek::from_bytes(&raw, "raw").unwrap();
    // Hex with or without a trailing newline is the same key.
    let hex = dir.path().join("hex");
    std::fs::write(&hex, format!("{}\n", "ab".repeat(32))).unwrap();
    let from_file =
        EtcdStore::open(&options(&m.url), "/hex/", Kek::from_file(&hex).unwrap()).unwrap();
    from_file.init_ca(&ca("h")).unwrap();
    let same = EtcdStore::open(
        &options(&m.url),
        "/hex/",
        Kek::from_bytes("ab".repeat(32).as_bytes(), "inline").unwrap(),
    )
    .unwrap();
    assert_eq!(same.ca().unwrap(), Some(ca("h")));
}

/// A store whose etcd is gone answers with an error naming etcd and the config key.
#[test]
fn an_unreachable_etcd_is_a_clear_error() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let err = EtcdStore::open(
        &options(&dead),
        "/causeway/",
        Kek::from_bytes(KEK, "test").unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("etcd is unreachable") && err.contains("[store] endpoints"),
        "{err}"
    );
}

/// `migrate`: a populated sled store is copied into etcd; the check then finds nothing
/// different, a second run copies nothing, a change in etcd is reported by the check, and
/// etcd holding another CA is refused.
#[test]
fn a_sled_store_migrates_into_etcd_idempotently() {
    let dir = tempfile::tempdir().unwrap();
    let sled = SledStore::open(dir.path()).unwrap();
    sled.init_ca(&ca("f1")).unwrap();
    sled.create_group(&group("g", "g-1")).unwrap();
    sled.create_token(&token("t", 3)).unwrap();
    sled.commit_join("t", &agent("a1"), &cert("s1", "a1"))
        .unwrap();
    sled.commit_renewal("a1", &cert("s2", "a1"), 5).unwrap();
    let key = ServiceKey::new("shop", "web");
    let eps: ServiceEndpoints = [("e1".to_owned(), endpoint("files", "e1", "10.0.0.1"))]
        .into_iter()
        .collect();
    let history = HistoryRecord {
        services: [key.clone()].into_iter().collect(),
        deny: false,
        policies: ["AuthorizationPolicy/a/x".to_owned()].into_iter().collect(),
        routes: ["DestinationRule/a/x".to_owned()].into_iter().collect(),
    };
    sled.save_mesh(
        &MeshWrite {
            version: 7,
            sources: vec![(
                "files".into(),
                SourceRecord {
                    kind: SourceKind::File,
                    state: SourceState::syncing(),
                },
            )],
            data: vec![("files", &key, Some(&eps))],
            vips: vec![(key.clone(), Ipv4Addr::new(240, 240, 0, 1))],
            history: &history,
            history_keep_from: 0,
            policies: vec![("AuthorizationPolicy/a/x".into(), Some(policy(1)))],
            routes: vec![("DestinationRule/a/x".into(), Some(route(1)))],
        }
        .encode(),
    )
    .unwrap();

    let m = start_etcd();
    let etcd = etcd_store(&m, "/causeway/");
    let first = etcd.import_from(&sled).unwrap();
    for (kind, n) in [
        ("ca", 1),
        ("groups", 1),
        ("tokens", 1),
        ("agents", 1),
        ("certs", 2),
        ("mesh", 1),
    ] {
        assert_eq!(first.copied.get(kind), Some(&n), "{kind}: {first:?}");
    }
    assert!(first.present.is_empty(), "{first:?}");
    assert_eq!(etcd.differences_from(&sled).unwrap(), Vec::<String>::new());
    let d = etcd.load_mesh().unwrap();
    assert_eq!(
        (d.version, d.data["files"][&key]["e1"].address.as_str()),
        (7, "10.0.0.1")
    );
    assert_eq!(
        etcd.ca().unwrap(),
        Some(ca("f1")),
        "the CA key comes back unsealed"
    );

    // Again: nothing copied, nothing changed.
    let second = etcd.import_from(&sled).unwrap();
    assert!(second.copied.is_empty(), "{second:?}");
    assert_eq!(second.present.get("certs"), Some(&2));
    // The etcd side moves on (a join spends a use): the check names the token; a new
    // import does not roll it back.
    etcd.commit_join("t", &agent("a2"), &cert("s3", "a2"))
        .unwrap();
    let diffs = etcd.differences_from(&sled).unwrap();
    assert!(
        diffs.iter().any(|d| d.starts_with("token \"t\" differs"))
            && diffs
                .iter()
                .any(|d| d == "agent \"a2\": in etcd, not in sled"),
        "{diffs:#?}"
    );
    etcd.import_from(&sled).unwrap();
    assert_eq!(etcd.token("t").unwrap().unwrap().uses_left, 1);

    // etcd holding another CA: refused, naming both fingerprints.
    let other = etcd_store(&m, "/other/");
    other.init_ca(&ca("f9")).unwrap();
    let err = other.import_from(&sled).unwrap_err().to_string();
    assert!(err.contains("f9") && err.contains("f1"), "{err}");
}

/// Two controllers writing the mesh: the one whose view is stale is refused, and stays
/// refused (it does not overwrite the other's versions and VIPs with its stale view).
#[test]
fn a_stale_mesh_writer_is_refused() {
    let m = start_etcd();
    let a = etcd_store(&m, "/causeway/");
    let b = etcd_store(&m, "/causeway/");
    assert_eq!(a.load_mesh().unwrap().version, 0);
    assert_eq!(b.load_mesh().unwrap().version, 0);
    let key = ServiceKey::new("shop", "web");
    let h = HistoryRecord {
        services: [key.clone()].into_iter().collect(),
        ..HistoryRecord::default()
    };
    let write = |version: u64, ip: u8| MeshWrite {
        version,
        sources: vec![],
        data: vec![],
        vips: vec![(key.clone(), Ipv4Addr::new(240, 240, 0, ip))],
        history: &h,
        history_keep_from: 0,
        policies: vec![],
        routes: vec![],
    };
    a.save_mesh(&write(1, 1).encode()).unwrap();
    a.save_mesh(&write(2, 1).encode()).unwrap();
    for _ in 0..2 {
        let err = b.save_mesh(&write(1, 2).encode()).unwrap_err().to_string();
        assert!(err.contains("changed by another writer"), "{err}");
    }
    let d = a.load_mesh().unwrap();
    assert_eq!(
        (d.version, d.vips[&key]),
        (2, Ipv4Addr::new(240, 240, 0, 1))
    );
    // Reloaded, b writes on top.
    assert_eq!(b.load_mesh().unwrap().version, 2);
    b.save_mesh(&write(3, 1).encode()).unwrap();
    assert_eq!(a.load_mesh().unwrap().version, 3);
}

/// An etcd that requires client certificates: the store with `ca_file`, `cert_file` and
/// `key_file` works; without a client certificate, or trusting another CA, it fails with
/// an error; a missing certificate file is named.
#[test]
fn etcd_with_client_certificates() {
    let certs = tempfile::tempdir().unwrap();
    let tls = make_tls(certs.path());
    let m = start_etcd_with(Some(&tls));
    let with = |ca: bool, client: bool| EtcdOptions {
        ca_file: ca.then(|| tls.ca.clone()),
        cert_file: client.then(|| tls.client_cert.clone()),
        key_file: client.then(|| tls.client_key.clone()),
        ..options(&m.url)
    };
    let kek = || Kek::from_bytes(KEK, "test").unwrap();
    let s = EtcdStore::open(&with(true, true), "/causeway/", kek()).unwrap();
    s.create_group(&group("g", "g-1")).unwrap();
    assert_eq!(s.group("g").unwrap().unwrap().id, "g-1");

    let err = EtcdStore::open(&with(true, false), "/causeway/", kek())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("etcd is unreachable") && err.contains("BadCertificate"),
        "no client certificate: {err}"
    );
    let err = EtcdStore::open(&with(false, true), "/causeway/", kek())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("etcd is unreachable") && err.contains("UnknownIssuer"),
        "server not trusted: {err}"
    );
    let mut missing = with(true, true);
    missing.key_file = Some(certs.path().join("nope.pem"));
    let err = EtcdStore::open(&missing, "/causeway/", kek())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[store] key_file") && err.contains("nope.pem"),
        "{err}"
    );
    let mut half = with(true, true);
    half.key_file = None;
    let err = EtcdStore::open(&half, "/causeway/", kek())
        .unwrap_err()
        .to_string();
    assert!(err.contains("go together"), "{err}");
}
