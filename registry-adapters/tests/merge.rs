//! Several sources at once through `spawn_sources`, merged by the registry.

mod common;

use causeway_api::registry::{Conflict, SourceKind};
use causeway_fakes::{ConsulRegistration, EurekaInstance, FakeConsul, FakeEureka};
use causeway_registry::{
    ConsulSourceConfig, EurekaSourceConfig, FileSourceConfig, SourcesConfig, spawn_sources,
};
use common::{Harness, eps, fast_options, stale_of};

#[tokio::test]
async fn same_service_from_consul_eureka_and_file_merges_with_provenance_and_conflicts() {
    let consul = FakeConsul::start().await.unwrap();
    let eureka = FakeEureka::start_empty().await.unwrap();
    // eureka's WEB on a port that clashes with nothing (http), consul's web is "tcp"
    eureka.register(&EurekaInstance::new("web", "web-e1", "10.2.0.1", 8080));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ext.toml");
    std::fs::write(
        &path,
        "[[services]]\nname = \"web\"\nports = { http = 9999 }\n[[services.endpoints]]\naddress = \"127.0.0.2\"\n",
    )
    .unwrap();
    let config = SourcesConfig {
        consul: vec![ConsulSourceConfig {
            name: "consul".into(),
            address: consul.url(),
            datacenter: None,
            token_file: None,
            namespace: None,
            consul_namespace: None,
            partition: None,
            ca_file: None,
            ..Default::default()
        }],
        eureka: vec![EurekaSourceConfig {
            name: "eureka".into(),
            url: eureka.url(),
            namespace: None,
        }],
        kubernetes: vec![],
        file: vec![FileSourceConfig {
            name: "file".into(),
            path,
        }],
    };
    let (mut h, tx) = Harness::new();
    let tasks = spawn_sources(&config, &fast_options(), tx).unwrap();
    h.until("all three sources in default/web", |r| {
        eps(r, "default", "web").len() == 4
    })
    .await;
    let web = h.endpoints("default", "web");
    let mut sources: Vec<&str> = web.iter().map(|e| e.provenance.source.as_str()).collect();
    sources.sort();
    assert_eq!(sources, vec!["consul", "consul", "eureka", "file"]);
    let conflicts = h.registry.conflicts();
    assert!(
        conflicts
            .iter()
            .any(|c| matches!(c, Conflict::PortMismatch { port, .. } if port == "http")),
        "eureka http 8080 vs file http 9999: {conflicts:?}"
    );
    assert!(
        conflicts.iter().any(
            |c| matches!(c, Conflict::DuplicateAddress { address, .. } if address == "127.0.0.2")
        ),
        "consul web-2 and the file both list 127.0.0.2: {conflicts:?}"
    );

    // a consul-k8s synced copy with no Kubernetes original is kept, and flagged
    let mut copy = ConsulRegistration::new("web-k8s", "web", "10.3.0.1", 8080);
    copy.meta
        .insert("external-source".into(), "kubernetes".into());
    consul.register(&copy);
    h.until("synced copy", |r| eps(r, "default", "web").len() == 5)
        .await;
    let c = h
        .endpoints("default", "web")
        .into_iter()
        .find(|e| e.address == "10.3.0.1")
        .unwrap();
    assert_eq!(c.synced_from, Some(SourceKind::Kubernetes));

    // one source failing does not touch the others
    drop(eureka);
    h.until("eureka stale", |r| stale_of(r, "eureka")).await;
    let web = h.endpoints("default", "web");
    assert_eq!(web.len(), 5);
    assert!(
        web.iter()
            .filter(|e| e.provenance.source == "eureka")
            .all(|e| e.stale)
    );
    assert!(
        web.iter()
            .filter(|e| e.provenance.source != "eureka")
            .all(|e| !e.stale)
    );
    for t in tasks {
        t.abort();
    }
}

#[tokio::test]
async fn spawn_refuses_a_bad_config_with_every_problem() {
    let config: SourcesConfig = toml::from_str(
        r#"
        [[consul]]
        name = "x"
        address = "not a url"
        [[eureka]]
        name = "x"
        url = "http://127.0.0.1:1/eureka"
        namespace = "Not_A_Label"
    "#,
    )
    .unwrap();
    let (_h, tx) = Harness::new();
    let err = spawn_sources(&config, &fast_options(), tx).unwrap_err();
    assert_eq!(err.problems.len(), 3, "{err}");
}

#[tokio::test]
async fn consul_and_kubernetes_merge_without_double_counting_consul_k8s_copies() {
    use causeway_fakes::FakeKubernetes;
    use causeway_registry::KubernetesSourceConfig;

    let consul = FakeConsul::start().await.unwrap();
    let kube = FakeKubernetes::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, kube.kubeconfig("t")).unwrap();
    // a VM instance of demo/web whose http port disagrees with the pods' 8080
    let mut vm = ConsulRegistration::new("web-vm", "web", "10.5.0.1", 8081);
    vm.meta.insert("protocol".into(), "http".into());
    consul.register(&vm);
    // consul-k8s synced the pod 192.0.2.11 into Consul
    let mut copy = ConsulRegistration::new("web-abcde-pod", "web", "192.0.2.11", 8080);
    copy.meta
        .insert("external-source".into(), "kubernetes".into());
    copy.meta.insert("protocol".into(), "http".into());
    consul.register(&copy);

    let config = SourcesConfig {
        consul: vec![ConsulSourceConfig {
            name: "consul".into(),
            address: consul.url(),
            datacenter: None,
            token_file: None,
            namespace: Some("demo".into()),
            consul_namespace: None,
            partition: None,
            ca_file: None,
            ..Default::default()
        }],
        kubernetes: vec![KubernetesSourceConfig {
            name: "cluster-a".into(),
            kubeconfig: Some(kubeconfig),
        }],
        ..SourcesConfig::default()
    };
    let (mut h, tx) = Harness::new();
    let tasks = spawn_sources(&config, &fast_options(), tx).unwrap();
    h.until("both sources in demo/web", |r| {
        let web = eps(r, "demo", "web");
        web.iter().any(|e| e.provenance.source == "cluster-a")
            && web.iter().any(|e| e.address == "10.5.0.1")
    })
    .await;
    let web = h.endpoints("demo", "web");
    let from = |s: &str| web.iter().filter(|e| e.provenance.source == s).count();
    assert_eq!(from("cluster-a"), 2, "{web:#?}");
    assert_eq!(
        from("consul"),
        3,
        "web-1, web-2, web-vm; the synced copy is not counted: {web:#?}"
    );
    assert_eq!(web.iter().filter(|e| e.address == "192.0.2.11").count(), 1);
    let conflicts = h.registry.conflicts();
    assert!(
        conflicts.iter().any(
            |c| matches!(c, Conflict::SyncedCopy { address, copy_source, original_source, .. }
            if address == "192.0.2.11" && copy_source == "consul" && original_source == "cluster-a")
        ),
        "{conflicts:?}"
    );
    assert!(
        conflicts
            .iter()
            .any(|c| matches!(c, Conflict::PortMismatch { port, numbers, .. }
            if port == "http" && numbers.contains_key(&8080) && numbers.contains_key(&8081))),
        "{conflicts:?}"
    );
    for t in tasks {
        t.abort();
    }
}
