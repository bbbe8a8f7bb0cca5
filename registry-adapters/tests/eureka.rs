//! The Eureka source against the fake Eureka.

mod common;

use std::time::Duration;

use causeway_api::registry::{Health, SourceChange};
use causeway_fakes::{EurekaInstance, FakeEureka, Fault};
use causeway_registry::{EurekaSource, EurekaSourceConfig};
use common::{Harness, eps, fast_options, stale_of, synced};

const NAME: &str = "eureka";

async fn started(url: String) -> (Harness, tokio::task::JoinHandle<()>) {
    let (mut h, tx) = Harness::new();
    let cfg = EurekaSourceConfig {
        name: NAME.into(),
        url,
        namespace: Some("apps".into()),
    };
    let task = tokio::spawn(EurekaSource::new(&cfg, &fast_options()).unwrap().run(tx));
    h.until("initial sync", |r| {
        eps(r, "apps", "foo").len() == 1 && eps(r, "apps", "discoverableclient").len() == 1
    })
    .await;
    (h, task)
}

#[tokio::test]
async fn initial_sync_from_spring_cloud_base_path() {
    let fake = FakeEureka::start().await.unwrap();
    let (h, task) = started(fake.url()).await;
    assert!(matches!(h.updates[0].change, Some(SourceChange::Full(_))));
    let first = &h.endpoints("apps", "foo")[0];
    assert_eq!(first.address, "192.168.56.1");
    assert_eq!(first.ports["http"], 8080);
    assert!(
        !first.ports.contains_key("https"),
        "securePort disabled in the fixture"
    );
    assert!(first.hostnames.contains("foo"), "vipAddress kept");
    assert!(first.healthy());
    let dc = &h.endpoints("apps", "discoverableclient")[0];
    assert_eq!(dc.ports.get("https"), Some(&10012));
    assert_eq!(
        dc.metadata["apiml.service.title"],
        "Service Integration Test Client"
    );
    assert!(
        fake.requests()
            .iter()
            .all(|r| r.path.starts_with("/eureka/apps"))
    );
    assert!(fake.requests().iter().all(|r| {
        r.headers
            .iter()
            .any(|(k, v)| k == "accept" && v.contains("json"))
    }));
    task.abort();
}

#[tokio::test]
async fn netflix_v2_path_and_single_objects() {
    let fake = FakeEureka::start_empty().await.unwrap();
    fake.set_compact_singletons(true);
    let mut inst = EurekaInstance::new("solo", "solo-1", "10.1.0.1", 9000);
    inst.metadata.insert("zone".into(), "zone-a".into());
    fake.register(&inst);
    let (mut h, tx) = Harness::new();
    let cfg = EurekaSourceConfig {
        name: NAME.into(),
        url: fake.url_v2(),
        namespace: None,
    };
    let task = tokio::spawn(EurekaSource::new(&cfg, &fast_options()).unwrap().run(tx));
    h.until("solo", |r| eps(r, "default", "solo").len() == 1)
        .await;
    let e = &h.endpoints("default", "solo")[0];
    assert_eq!(e.locality.zone.as_deref(), Some("zone-a"));
    assert!(
        fake.requests()
            .iter()
            .all(|r| r.path.starts_with("/eureka/v2/apps"))
    );
    task.abort();
}

#[tokio::test]
async fn add_health_flip_and_removal_become_minimal_deltas() {
    let fake = FakeEureka::start().await.unwrap();
    let (mut h, task) = started(fake.url()).await;

    fake.register(&EurekaInstance::new(
        "reviews",
        "reviews-1",
        "10.0.0.1",
        9080,
    ));
    let d = h
        .until("reviews added", |r| eps(r, "apps", "reviews").len() == 1)
        .await;
    let changed: Vec<_> = d.iter().flat_map(|d| d.services.iter()).collect();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].key.name, "reviews");
    assert_eq!(changed[0].added.len(), 1);

    fake.register(&EurekaInstance::new(
        "reviews",
        "reviews-2",
        "10.0.0.2",
        9080,
    ));
    h.until("second instance", |r| eps(r, "apps", "reviews").len() == 2)
        .await;

    assert!(fake.set_status("reviews", "reviews-2", "DOWN"));
    let d = h
        .until("reviews-2 down", |r| {
            eps(r, "apps", "reviews")
                .iter()
                .any(|e| e.health == Health::Critical)
        })
        .await;
    let updated: Vec<_> = d
        .iter()
        .flat_map(|d| d.services.iter())
        .flat_map(|s| s.updated.iter())
        .collect();
    assert_eq!(updated.len(), 1);
    assert_eq!(updated[0].provenance.native_id, "reviews-2");
    assert!(!updated[0].healthy(), "only UP routes");

    assert!(fake.deregister("reviews", "reviews-1"));
    let d = h
        .until("reviews-1 removed", |r| {
            eps(r, "apps", "reviews").len() == 1
        })
        .await;
    let removed: Vec<_> = d
        .iter()
        .flat_map(|d| d.services.iter())
        .flat_map(|s| s.removed.iter())
        .collect();
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].native_id, "reviews-1");
    assert_eq!(h.endpoints("apps", "foo").len(), 1, "other apps untouched");
    assert!(synced(&h.registry, NAME));
    task.abort();
}

#[tokio::test]
async fn hashcode_mismatch_triggers_a_full_fetch() {
    let fake = FakeEureka::start().await.unwrap();
    let (mut h, task) = started(fake.url()).await;
    let full_before = fake.full_fetches();
    // a change the deltas never mention: only the hashcode can reveal it
    fake.register_without_delta(&EurekaInstance::new("ghost", "ghost-1", "10.9.9.9", 80));
    h.until("ghost found through a full fetch", |r| {
        eps(r, "apps", "ghost").len() == 1
    })
    .await;
    assert!(
        fake.full_fetches() > full_before,
        "a full GET /apps after the mismatch"
    );
    task.abort();
}

#[tokio::test]
async fn wrong_hashcode_in_deltas_keeps_refetching_without_losing_data() {
    let fake = FakeEureka::start().await.unwrap();
    let (mut h, task) = started(fake.url()).await;
    let full_before = fake.full_fetches();
    fake.set_fault(Fault::WrongHashcode);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while fake.full_fetches() < full_before + 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no full fetch after hashcode mismatches"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fake.clear_fault();
    fake.register(&EurekaInstance::new("later", "later-1", "10.0.0.5", 80));
    h.until("later", |r| eps(r, "apps", "later").len() == 1)
        .await;
    assert_eq!(h.endpoints("apps", "foo").len(), 1);
    task.abort();
}

async fn fault_keeps_last_known_good_then_recovers(fault: Fault, expect_in_error: &str) {
    let fake = FakeEureka::start().await.unwrap();
    let (mut h, task) = started(fake.url()).await;
    fake.set_fault(fault.clone());
    h.until("source stale", |r| stale_of(r, NAME)).await;
    let err = h.last_error(NAME);
    assert!(
        err.contains(expect_in_error),
        "{fault:?}: error {err:?} should mention {expect_in_error:?}"
    );
    let foo_eps = h.endpoints("apps", "foo");
    assert_eq!(foo_eps.len(), 1, "{fault:?}: last known good kept");
    assert!(foo_eps[0].stale, "{fault:?}: marked stale");
    assert_eq!(h.endpoints("apps", "discoverableclient").len(), 1);

    fake.clear_fault();
    fake.register(&EurekaInstance::new("foo", "foo-2", "10.0.0.2", 8080));
    h.until("recovered with the change", |r| {
        synced(r, NAME) && eps(r, "apps", "foo").len() == 2
    })
    .await;
    assert!(h.endpoints("apps", "foo").iter().all(|e| !e.stale));
    task.abort();
}

#[tokio::test]
async fn server_errors_keep_last_known_good() {
    fault_keeps_last_known_good_then_recovers(Fault::ServerError, "HTTP 500").await;
}

#[tokio::test]
async fn truncated_json_keeps_last_known_good() {
    fault_keeps_last_known_good_then_recovers(Fault::TruncatedJson, "not JSON").await;
}

#[tokio::test]
async fn malformed_json_keeps_last_known_good() {
    fault_keeps_last_known_good_then_recovers(Fault::MalformedJson, "not JSON").await;
}

#[tokio::test]
async fn huge_response_is_refused_and_keeps_last_known_good() {
    fault_keeps_last_known_good_then_recovers(Fault::Huge(512 * 1024), "larger than").await;
}

#[tokio::test]
async fn timeout_keeps_last_known_good() {
    fault_keeps_last_known_good_then_recovers(
        Fault::Delay(Duration::from_secs(5)),
        "no answer within",
    )
    .await;
}

#[tokio::test]
async fn wrong_base_path_is_reported() {
    let fake = FakeEureka::start().await.unwrap();
    let (mut h, tx) = Harness::new();
    let url = fake.url().replace("/eureka", "/nothing-here");
    let cfg = EurekaSourceConfig {
        name: NAME.into(),
        url,
        namespace: None,
    };
    let task = tokio::spawn(EurekaSource::new(&cfg, &fast_options()).unwrap().run(tx));
    h.until("stale", |r| stale_of(r, NAME)).await;
    assert!(
        h.last_error(NAME).contains("HTTP 404"),
        "{}",
        h.last_error(NAME)
    );
    assert!(h.registry.merged().is_empty());
    task.abort();
}
