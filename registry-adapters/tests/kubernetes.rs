//! The Kubernetes source (kube-rs watchers) against the fake Kubernetes API.

mod common;

use causeway_api::registry::{Health, SourceChange, SourceKind};
use causeway_fakes::{FakeKubernetes, Fault, KubeKind};
use causeway_registry::{KubernetesSource, KubernetesSourceConfig};
use common::{Harness, eps, fast_options, stale_of, synced};
use serde_json::json;

const NAME: &str = "k8s";

fn source(fake: &FakeKubernetes, dir: &tempfile::TempDir, token: &str) -> KubernetesSource {
    let path = dir.path().join(format!("kubeconfig-{token}"));
    std::fs::write(&path, fake.kubeconfig(token)).unwrap();
    KubernetesSource::new(
        &KubernetesSourceConfig {
            name: NAME.into(),
            kubeconfig: Some(path),
        },
        &fast_options(),
    )
}

async fn started(
    fake: &FakeKubernetes,
    dir: &tempfile::TempDir,
) -> (Harness, tokio::task::JoinHandle<()>) {
    let (mut h, tx) = Harness::new();
    let task = tokio::spawn(source(fake, dir, "t0k3n").run(tx));
    h.until("initial sync", |r| {
        eps(r, "demo", "web").len() == 2 && eps(r, "demo", "api").len() == 2
    })
    .await;
    (h, task)
}

fn web2_slice() -> serde_json::Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "web-klmno", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": [{"addresses": ["192.0.2.13"], "conditions": {"ready": true}}]})
}

#[tokio::test]
async fn initial_sync_add_change_health_flip_and_removal() {
    let fake = FakeKubernetes::start().await.unwrap();
    fake.require_token(Some("t0k3n"));
    let dir = tempfile::tempdir().unwrap();
    let (mut h, task) = started(&fake, &dir).await;
    assert!(matches!(
        h.updates
            .iter()
            .find(|u| u.change.is_some())
            .unwrap()
            .change,
        Some(SourceChange::Full(_))
    ));
    let web = h.endpoints("demo", "web");
    assert!(web.iter().all(|e| e.ports["http"] == 8080
        && e.healthy()
        && e.provenance.kind == SourceKind::Kubernetes));
    let api = h.endpoints("demo", "api");
    assert_eq!(
        api.iter().filter(|e| e.healthy()).count(),
        1,
        "192.0.2.22 is not ready"
    );
    assert_eq!(h.endpoints("default", "kubernetes").len(), 1);
    assert!(synced(&h.registry, NAME));

    // add a slice
    fake.apply(KubeKind::EndpointSlice, web2_slice());
    let d = h
        .until("web-klmno", |r| eps(r, "demo", "web").len() == 3)
        .await;
    let added: Vec<_> = d
        .iter()
        .flat_map(|d| d.services.iter())
        .flat_map(|s| s.added.iter())
        .collect();
    assert_eq!(added.len(), 1);
    assert_eq!(added[0].address, "192.0.2.13");

    // health flip: 192.0.2.22 becomes ready (as the recorded PATCH)
    let mut api_slice = fake
        .get(KubeKind::EndpointSlice, "demo", "api-fghij")
        .unwrap();
    api_slice["endpoints"] = json!([{"addresses": ["192.0.2.21"], "conditions": {"ready": true}},
                                    {"addresses": ["192.0.2.22"], "conditions": {"ready": true, "serving": true, "terminating": false}}]);
    fake.apply(KubeKind::EndpointSlice, api_slice);
    let d = h
        .until("api all ready", |r| {
            eps(r, "demo", "api")
                .iter()
                .all(|e| e.health == Health::Passing)
        })
        .await;
    let changed: Vec<_> = d.iter().flat_map(|d| d.services.iter()).collect();
    assert_eq!(changed.len(), 1);
    assert!(changed[0].updated.iter().any(|e| e.address == "192.0.2.22"));
    assert!(changed[0].added.is_empty() && changed[0].removed.is_empty());

    // removal of a slice, then of a service
    assert!(fake.delete(KubeKind::EndpointSlice, "demo", "web-abcde"));
    let d = h
        .until("web-abcde gone", |r| eps(r, "demo", "web").len() == 1)
        .await;
    let removed: Vec<_> = d
        .iter()
        .flat_map(|d| d.services.iter())
        .flat_map(|s| s.removed.iter())
        .collect();
    assert_eq!(removed.len(), 2);
    assert!(fake.delete(KubeKind::Service, "demo", "api"));
    h.until("service api gone", |r| eps(r, "demo", "api").is_empty())
        .await;
    assert_eq!(h.endpoints("demo", "web").len(), 1);
    task.abort();
}

#[tokio::test]
async fn gone_410_triggers_a_relist_and_syncing_goes_on() {
    let fake = FakeKubernetes::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut h, task) = started(&fake, &dir).await;
    let lists = fake.lists(KubeKind::EndpointSlice);
    fake.expire_watches();
    // a change made while the watch is down is found by the re-list
    fake.apply(KubeKind::EndpointSlice, web2_slice());
    h.until("web-klmno after re-list", |r| {
        eps(r, "demo", "web").len() == 3
    })
    .await;
    assert!(
        fake.lists(KubeKind::EndpointSlice) > lists,
        "a new LIST after 410"
    );
    assert!(
        fake.expired_answers() >= 1,
        "the resumed watch was answered 410 Expired"
    );
    assert!(synced(&h.registry, NAME));
    task.abort();
}

#[tokio::test]
async fn server_errors_keep_last_known_good_and_recover() {
    let fake = FakeKubernetes::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut h, task) = started(&fake, &dir).await;
    fake.set_fault(Fault::ServerError);
    h.until("stale", |r| stale_of(r, NAME)).await;
    let web = h.endpoints("demo", "web");
    assert_eq!(web.len(), 2, "last known good kept");
    assert!(web.iter().all(|e| e.stale));
    fake.clear_fault();
    fake.apply(KubeKind::EndpointSlice, web2_slice());
    h.until("recovered", |r| {
        synced(r, NAME) && eps(r, "demo", "web").len() == 3
    })
    .await;
    assert!(h.endpoints("demo", "web").iter().all(|e| !e.stale));
    task.abort();
}

#[tokio::test]
async fn truncated_and_malformed_lists_keep_last_known_good() {
    for fault in [Fault::TruncatedJson, Fault::MalformedJson] {
        let fake = FakeKubernetes::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (mut h, task) = started(&fake, &dir).await;
        fake.set_fault(fault.clone());
        // history is gone too, so the watchers must list again and meet the broken body
        fake.expire_watches();
        h.until("stale", |r| stale_of(r, NAME)).await;
        assert_eq!(h.endpoints("demo", "web").len(), 2, "{fault:?}");
        fake.clear_fault();
        h.until("recovered", |r| synced(r, NAME)).await;
        task.abort();
    }
}

#[tokio::test]
async fn wrong_token_is_reported() {
    let fake = FakeKubernetes::start().await.unwrap();
    fake.require_token(Some("right"));
    let dir = tempfile::tempdir().unwrap();
    let (mut h, tx) = Harness::new();
    let task = tokio::spawn(source(&fake, &dir, "wrong").run(tx));
    h.until("stale", |r| stale_of(r, NAME)).await;
    let err = h.last_error(NAME);
    assert!(err.contains("401") || err.contains("Unauthorized"), "{err}");
    assert!(h.registry.merged().is_empty());
    task.abort();
}

#[tokio::test]
async fn missing_kubeconfig_is_reported() {
    let (mut h, tx) = Harness::new();
    let cfg = KubernetesSourceConfig {
        name: NAME.into(),
        kubeconfig: Some("/nonexistent/kubeconfig".into()),
    };
    let task = tokio::spawn(KubernetesSource::new(&cfg, &fast_options()).run(tx));
    h.until("stale", |r| stale_of(r, NAME)).await;
    assert!(
        h.last_error(NAME).contains("/nonexistent/kubeconfig"),
        "{}",
        h.last_error(NAME)
    );
    task.abort();
}

#[tokio::test]
async fn two_clusters_at_once_merge_by_namespace_and_name() {
    let a = FakeKubernetes::start().await.unwrap();
    let b = FakeKubernetes::start().await.unwrap();
    b.delete(KubeKind::EndpointSlice, "demo", "web-abcde");
    b.apply(KubeKind::EndpointSlice, web2_slice());
    let dir = tempfile::tempdir().unwrap();
    let (mut h, tx) = Harness::new();
    for (name, fake) in [("cluster-a", &a), ("cluster-b", &b)] {
        let path = dir.path().join(name);
        std::fs::write(&path, fake.kubeconfig("t")).unwrap();
        let cfg = KubernetesSourceConfig {
            name: name.into(),
            kubeconfig: Some(path),
        };
        tokio::spawn(KubernetesSource::new(&cfg, &fast_options()).run(tx.clone()));
    }
    drop(tx);
    h.until("both clusters", |r| eps(r, "demo", "web").len() == 3)
        .await;
    let web = h.endpoints("demo", "web");
    assert_eq!(
        web.iter()
            .filter(|e| e.provenance.source == "cluster-a")
            .count(),
        2
    );
    let from_b: Vec<_> = web
        .iter()
        .filter(|e| e.provenance.source == "cluster-b")
        .collect();
    assert_eq!(from_b.len(), 1);
    assert_eq!(from_b[0].address, "192.0.2.13");
}

/// The recorded EndpointSlice whose endpoints carry `targetRef` (pods web-v1-abcde on
/// node-a, web-v2-fghij on node-b); the second endpoint's `zone` is dropped so that its
/// zone comes from its Node.
fn targetref_slice() -> serde_json::Value {
    let f =
        causeway_fakes::read_http_fixture("kubernetes/12-create-endpointslice-web-targetref.http");
    let mut slice: serde_json::Value = serde_json::from_str(&f.body).unwrap();
    slice["endpoints"][1]
        .as_object_mut()
        .unwrap()
        .remove("zone");
    slice
}

fn by_address(h: &Harness, address: &str) -> causeway_api::registry::Endpoint {
    h.endpoints("demo", "web")
        .into_iter()
        .find(|e| e.address == address)
        .unwrap_or_else(|| panic!("no endpoint {address}"))
}

#[tokio::test]
async fn pod_labels_and_node_topology_reach_the_endpoints_and_follow_changes() {
    let fake = FakeKubernetes::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut h, task) = started(&fake, &dir).await;
    fake.apply(KubeKind::EndpointSlice, targetref_slice());
    h.until("labelled endpoints", |r| {
        eps(r, "demo", "web")
            .iter()
            .any(|e| e.address == "10.244.2.12" && e.labels.get("version").is_some())
    })
    .await;
    let v1 = by_address(&h, "10.244.1.11");
    assert_eq!(v1.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(v1.labels.get("version").map(String::as_str), Some("v1"));
    assert_eq!(
        v1.locality.region.as_deref(),
        Some("eu-west"),
        "from node-a"
    );
    assert_eq!(
        v1.locality.zone.as_deref(),
        Some("eu-west-1a"),
        "the slice's zone"
    );
    assert_eq!(
        v1.metadata.get("k8s-pod").map(String::as_str),
        Some("web-v1-abcde")
    );
    let v2 = by_address(&h, "10.244.2.12");
    assert_eq!(v2.labels.get("version").map(String::as_str), Some("v2"));
    assert_eq!(
        v2.locality.zone.as_deref(),
        Some("eu-west-1b"),
        "node-b's zone label"
    );
    // Endpoints without a targetRef keep no labels.
    assert!(by_address(&h, "192.0.2.11").labels.is_empty());

    // A pod's labels change (as the recorded patch: version v1 → v1-canary).
    let mut pod = fake.get(KubeKind::Pod, "demo", "web-v1-abcde").unwrap();
    pod["metadata"]["labels"]["version"] = json!("v1-canary");
    fake.apply(KubeKind::Pod, pod);
    h.until("canary label", |r| {
        eps(r, "demo", "web").iter().any(|e| {
            e.address == "10.244.1.11"
                && e.labels.get("version").map(String::as_str) == Some("v1-canary")
        })
    })
    .await;

    // node-b moves to another zone (the recorded patch): the endpoint without a slice zone
    // follows it.
    let mut node = fake.get(KubeKind::Node, "", "node-b").unwrap();
    node["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("eu-west-1c");
    fake.apply(KubeKind::Node, node);
    h.until("new zone", |r| {
        eps(r, "demo", "web")
            .iter()
            .any(|e| e.address == "10.244.2.12" && e.locality.zone.as_deref() == Some("eu-west-1c"))
    })
    .await;

    // The pod is deleted: its endpoint (still listed by the slice) loses the labels.
    assert!(fake.delete(KubeKind::Pod, "demo", "web-v2-fghij"));
    h.until("labels gone", |r| {
        eps(r, "demo", "web")
            .iter()
            .any(|e| e.address == "10.244.2.12" && e.labels.is_empty())
    })
    .await;
    // Pods and nodes were listed and watched as metadata only.
    let requests = fake.requests();
    let label_requests: Vec<_> = requests
        .iter()
        .filter(|r| r.path.ends_with("/pods") || r.path.ends_with("/nodes"))
        .collect();
    assert!(label_requests.len() >= 2, "pods and nodes were requested");
    for r in label_requests {
        let accept = r
            .headers
            .iter()
            .find(|(k, _)| k == "accept")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        assert!(
            accept.contains("as=PartialObjectMetadata"),
            "{} asked for {accept:?}",
            r.path
        );
    }
    task.abort();
}

#[tokio::test]
async fn endpoints_sync_without_labels_when_pods_and_nodes_are_forbidden() {
    let fake = FakeKubernetes::start().await.unwrap();
    fake.set_path_status("/api/v1/pods", 403);
    fake.set_path_status("/api/v1/nodes", 403);
    let dir = tempfile::tempdir().unwrap();
    let (mut h, task) = started(&fake, &dir).await;
    fake.apply(KubeKind::EndpointSlice, targetref_slice());
    h.until("targetref slice", |r| eps(r, "demo", "web").len() == 4)
        .await;
    assert!(synced(&h.registry, NAME), "the source is healthy");
    assert!(by_address(&h, "10.244.1.11").labels.is_empty());
    task.abort();
}
