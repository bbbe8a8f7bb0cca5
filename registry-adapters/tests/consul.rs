//! The Consul source against the fake Consul.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use causeway_api::registry::{Health, SourceChange, SourceKind};
use causeway_fakes::{ConsulRegistration, FakeConsul, Fault};
use causeway_registry::{ConsulSource, ConsulSourceConfig};
use common::{Harness, eps, fast_options, stale_of, synced};

fn config(fake: &FakeConsul) -> ConsulSourceConfig {
    ConsulSourceConfig {
        name: "consul-dc1".into(),
        address: fake.url(),
        datacenter: Some("dc1".into()),
        token_file: None,
        namespace: Some("default".into()),
        consul_namespace: None,
        partition: None,
        ca_file: None,
        ..Default::default()
    }
}

async fn started(fake: &FakeConsul) -> (Harness, tokio::task::JoinHandle<()>) {
    let (mut h, tx) = Harness::new();
    let src = ConsulSource::new(&config(fake), &fast_options()).unwrap();
    let task = tokio::spawn(src.run(tx));
    h.until("initial sync", |r| {
        eps(r, "default", "web").len() == 2 && eps(r, "default", "api").len() == 1
    })
    .await;
    (h, task)
}

#[tokio::test]
async fn initial_sync_reflects_the_recorded_catalog() {
    let fake = FakeConsul::start().await.unwrap();
    let (h, task) = started(&fake).await;
    assert!(
        matches!(h.updates[0].change, Some(SourceChange::Full(_))),
        "first update is a full snapshot: {:?}",
        h.updates[0]
    );
    let web = h.endpoints("default", "web");
    let w1 = web
        .iter()
        .find(|e| e.provenance.native_id == "realsrv-server/web-1")
        .unwrap();
    assert_eq!(w1.address, "127.0.0.1");
    assert_eq!(w1.ports["tcp"], 8080);
    assert!(w1.healthy());
    assert_eq!(w1.provenance.source, "consul-dc1");
    assert_eq!(w1.provenance.kind, SourceKind::Consul);
    let w2 = web
        .iter()
        .find(|e| e.provenance.native_id == "realsrv-server/web-2")
        .unwrap();
    assert_eq!(w2.health, Health::Critical);
    assert!(synced(&h.registry, "consul-dc1"));
    // the `consul` service itself is not imported
    assert!(h.endpoints("default", "consul").is_empty());
    // every read was a blocking query in the configured datacenter
    for r in fake.requests().iter().filter(|r| r.method == "GET") {
        assert!(
            r.param("index").is_some() && r.param("wait").is_some(),
            "{r:?}"
        );
        assert_eq!(r.param("dc").as_deref(), Some("dc1"));
    }
    task.abort();
}

#[tokio::test]
async fn add_change_health_flip_and_removal_become_minimal_deltas() {
    let fake = FakeConsul::start().await.unwrap();
    let (mut h, task) = started(&fake).await;

    // add an instance
    let mut reg = ConsulRegistration::new("web-3", "web", "10.0.0.3", 8082);
    reg.meta = BTreeMap::from([("external-source".into(), "kubernetes".into())]);
    fake.register(&reg);
    let d = h
        .until("web-3 added", |r| eps(r, "default", "web").len() == 3)
        .await;
    let added: Vec<_> = d
        .iter()
        .flat_map(|d| d.services.iter())
        .flat_map(|s| s.added.iter())
        .collect();
    assert_eq!(added.len(), 1);
    assert_eq!(added[0].address, "10.0.0.3");
    assert_eq!(
        added[0].synced_from,
        Some(SourceKind::Kubernetes),
        "consul-k8s marker recognised"
    );
    assert!(
        d.iter()
            .flat_map(|d| d.services.iter())
            .all(|s| s.key.name == "web")
    );

    // health flip: web-2's TTL check passes (as in the recorded 06/07 sequence)
    assert!(fake.set_check_status("web-2-ttl", "passing"));
    let d = h
        .until("web-2 passing", |r| {
            eps(r, "default", "web").iter().all(|e| e.healthy())
        })
        .await;
    let updated: Vec<_> = d
        .iter()
        .flat_map(|d| d.services.iter())
        .flat_map(|s| s.updated.iter())
        .collect();
    assert_eq!(updated.len(), 1);
    assert_eq!(updated[0].provenance.native_id, "realsrv-server/web-2");
    assert!(
        d.iter()
            .flat_map(|d| d.services.iter())
            .all(|s| s.added.is_empty() && s.removed.is_empty())
    );

    // removal of the last instance of a service
    assert!(fake.deregister("api-1"));
    let d = h
        .until("api gone", |r| eps(r, "default", "api").is_empty())
        .await;
    let removed: Vec<_> = d
        .iter()
        .flat_map(|d| d.services.iter())
        .flat_map(|s| s.removed.iter())
        .collect();
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].native_id, "realsrv-server/api-1");
    assert_eq!(
        h.endpoints("default", "web").len(),
        3,
        "other services untouched"
    );
    task.abort();
}

#[tokio::test]
async fn index_going_backwards_resets_to_zero_and_keeps_syncing() {
    let fake = FakeConsul::start().await.unwrap();
    let (mut h, task) = started(&fake).await;
    let before = fake.requests().len();
    fake.rewind_index(2);
    fake.register(&ConsulRegistration::new("web-9", "web", "10.0.0.9", 8089));
    h.until("web-9 after the rewind", |r| {
        eps(r, "default", "web")
            .iter()
            .any(|e| e.address == "10.0.0.9")
    })
    .await;
    // wait for the reset request to show up (the watch issues it right after the rewound answer)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reset = fake.requests()[before..].iter().any(|r| {
            r.path == "/v1/health/service/web" && r.param("index").as_deref() == Some("0")
        });
        if reset {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no blocking query with index=0 after the index went backwards: {:#?}",
            &fake.requests()[before..]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(synced(&h.registry, "consul-dc1"));
    task.abort();
}

async fn fault_keeps_last_known_good_then_recovers(fault: Fault, expect_in_error: &str) {
    let fake = FakeConsul::start().await.unwrap();
    let (mut h, task) = started(&fake).await;
    fake.set_fault(fault.clone());
    h.until("source stale", |r| stale_of(r, "consul-dc1")).await;
    let err = h.last_error("consul-dc1");
    assert!(
        err.contains(expect_in_error),
        "{fault:?}: error {err:?} should mention {expect_in_error:?}"
    );
    let web = h.endpoints("default", "web");
    assert_eq!(web.len(), 2, "{fault:?}: last known good kept");
    assert!(web.iter().all(|e| e.stale), "{fault:?}: marked stale");
    assert_eq!(h.endpoints("default", "api").len(), 1);

    fake.clear_fault();
    fake.register(&ConsulRegistration::new("web-4", "web", "10.0.0.4", 8084));
    h.until("recovered with the change", |r| {
        synced(r, "consul-dc1") && eps(r, "default", "web").len() == 3
    })
    .await;
    assert!(h.endpoints("default", "web").iter().all(|e| !e.stale));
    task.abort();
}

#[tokio::test]
async fn server_errors_keep_last_known_good() {
    fault_keeps_last_known_good_then_recovers(Fault::ServerError, "HTTP 500").await;
}

#[tokio::test]
async fn truncated_json_keeps_last_known_good() {
    fault_keeps_last_known_good_then_recovers(Fault::TruncatedJson, "JSON").await;
}

#[tokio::test]
async fn malformed_json_keeps_last_known_good() {
    fault_keeps_last_known_good_then_recovers(Fault::MalformedJson, "JSON").await;
}

#[tokio::test]
async fn huge_response_is_refused_and_keeps_last_known_good() {
    fault_keeps_last_known_good_then_recovers(Fault::Huge(512 * 1024), "larger than").await;
}

#[tokio::test]
async fn timeout_keeps_last_known_good() {
    fault_keeps_last_known_good_then_recovers(
        Fault::Delay(Duration::from_secs(6)),
        "no answer within",
    )
    .await;
}

#[tokio::test]
async fn unreachable_consul_is_stale_with_a_clear_error() {
    let fake = FakeConsul::start().await.unwrap();
    let url = fake.url();
    drop(fake);
    let (mut h, tx) = Harness::new();
    let mut cfg = ConsulSourceConfig {
        name: "gone".into(),
        address: url,
        datacenter: None,
        token_file: None,
        namespace: None,
        consul_namespace: None,
        partition: None,
        ca_file: None,
        ..Default::default()
    };
    cfg.namespace = None;
    let task = tokio::spawn(ConsulSource::new(&cfg, &fast_options()).unwrap().run(tx));
    h.until("stale", |r| stale_of(r, "gone")).await;
    assert!(
        h.last_error("gone").contains("cannot connect"),
        "{}",
        h.last_error("gone")
    );
    task.abort();
}

#[tokio::test]
async fn acl_token_from_file_is_sent_and_a_wrong_one_is_reported() {
    let fake = FakeConsul::start().await.unwrap();
    fake.require_token(Some("s3cret"));
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.token");
    std::fs::write(&good, "s3cret\n").unwrap();
    let bad = dir.path().join("bad.token");
    std::fs::write(&bad, "nope").unwrap();

    let (mut h, tx) = Harness::new();
    let mut cfg = config(&fake);
    cfg.token_file = Some(good);
    let t1 = tokio::spawn(
        ConsulSource::new(&cfg, &fast_options())
            .unwrap()
            .run(tx.clone()),
    );
    cfg.name = "consul-bad-token".into();
    cfg.token_file = Some(bad);
    let t2 = tokio::spawn(ConsulSource::new(&cfg, &fast_options()).unwrap().run(tx));
    h.until("good token syncs, bad token stale", |r| {
        eps(r, "default", "web").len() == 2 && stale_of(r, "consul-bad-token")
    })
    .await;
    let err = h.last_error("consul-bad-token");
    assert!(err.contains("403") && err.contains("token"), "{err}");

    let missing = ConsulSourceConfig {
        token_file: Some(dir.path().join("missing")),
        ..config(&fake)
    };
    let e = ConsulSource::new(&missing, &fast_options())
        .unwrap_err()
        .to_string();
    assert!(e.contains("token_file") && e.contains("missing"), "{e}");
    t1.abort();
    t2.abort();
}

#[tokio::test]
async fn enterprise_namespace_and_partition_are_sent_and_a_missing_ca_file_is_named() {
    let fake = FakeConsul::start().await.unwrap();
    let mut cfg = config(&fake);
    cfg.consul_namespace = Some("team-a".into());
    cfg.partition = Some("part-1".into());
    let (mut h, tx) = Harness::new();
    let task = tokio::spawn(ConsulSource::new(&cfg, &fast_options()).unwrap().run(tx));
    h.until("initial sync", |r| eps(r, "default", "web").len() == 2)
        .await;
    let reqs = fake.requests();
    assert!(!reqs.is_empty());
    for r in &reqs {
        assert_eq!(r.param("ns").as_deref(), Some("team-a"), "{r:?}");
        assert_eq!(r.param("partition").as_deref(), Some("part-1"), "{r:?}");
    }
    task.abort();
    cfg.ca_file = Some("/nonexistent/consul-ca.pem".into());
    let err = ConsulSource::new(&cfg, &fast_options()).err().unwrap();
    let text = err.to_string();
    assert!(
        text.contains("ca_file") && text.contains("/nonexistent/consul-ca.pem"),
        "{text}"
    );
}

/// A "Consul" that answers every request at once with 200, an index and a body that is
/// not JSON (a proxy's error page); returns its URL and the arrival time of each request.
async fn garbage_consul() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                log.lock().unwrap().push(tokio::time::Instant::now());
                let body = "<html><body>502 Bad Gateway</body></html>";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nX-Consul-Index: 7\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn an_answer_that_does_not_parse_is_retried_with_growing_intervals() {
    let (url, seen) = garbage_consul().await;
    let cfg = ConsulSourceConfig {
        name: "consul-dc1".into(),
        address: url,
        // Short on purpose: without backoff this watch would ask every 5 ms.
        min_interval: Some(Duration::from_millis(5)),
        retry_initial: Some(Duration::from_millis(10)),
        retry_max: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let (mut h, tx) = Harness::new();
    let task = tokio::spawn(ConsulSource::new(&cfg, &fast_options()).unwrap().run(tx));
    h.until("source stale", |r| stale_of(r, "consul-dc1")).await;
    assert!(
        h.last_error("consul-dc1").contains("JSON"),
        "{}",
        h.last_error("consul-dc1")
    );
    // Count requests: in the first second after the first one, and in the six seconds
    // from the second to the eighth. Backoff makes the later rate far lower (expected
    // ~8 vs ~1 per second; the bound only needs half); asking again at once would be
    // ~200 per second throughout.
    let start = wait_first(&seen).await;
    tokio::time::sleep_until(start + Duration::from_secs(8)).await;
    let times = seen.lock().unwrap().clone();
    let count = |from: u64, to: u64| {
        times
            .iter()
            .filter(|t| {
                **t >= start + Duration::from_secs(from) && **t < start + Duration::from_secs(to)
            })
            .count()
    };
    let (early, late) = (count(0, 1), count(2, 8));
    assert!(early >= 3, "requests in the first second: {early}");
    assert!(
        late * 2 < early * 6,
        "the retry rate must fall: {early} requests in the first second, {late} in the six from the second on"
    );
    task.abort();
}

async fn wait_first(seen: &std::sync::Mutex<Vec<tokio::time::Instant>>) -> tokio::time::Instant {
    loop {
        if let Some(t) = seen.lock().unwrap().first().copied() {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
