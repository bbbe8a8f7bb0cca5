//! `causewayctl why` explains routing (issue 21, item 4), and DestinationRule subsets
//! select endpoints by registry metadata (issue 21, "Must show": subsets from a Consul tag
//! and from a Kubernetes label). The real controller with the fake Consul (services
//! registered with `version=…` tags and `version` service meta) and the fake Kubernetes
//! API server (the recorded EndpointSlice whose endpoints name their Pods, and the
//! recorded Pods `web-v1-abcde` / `web-v2-fghij` with `version` labels) as sources: the
//! merged registry's labels are what the agents match subsets against, and `why` shows
//! the VirtualService, route, subset, DestinationRule policy and endpoints chosen; the
//! agent's route table, compiled from the same files over the same registry, picks the
//! same endpoints.
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway_agent::dataplane::route::{RouteTable, SourceFacts};
use causeway_api::push::{EndpointState, MeshState, RouteState, ServiceState};
use causeway_api::route::{AnyResource, decode_documents_indexed};
use causeway_fakes::{ConsulRegistration, FakeConsul, FakeKubernetes, KubeKind};
use causeway_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(45);

const ROUTES: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: shop, namespace: default}
spec:
  host: shop
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 15s}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: default}
spec:
  hosts: [shop]
  http:
  - name: canary
    match:
    - headers: {x-canary: {exact: \"1\"}}
    route: [{destination: {host: shop, subset: v2}}]
  - route:
    - {destination: {host: shop, subset: v1}, weight: 90}
    - {destination: {host: shop, subset: v2}, weight: 10}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: demo}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: demo}
spec:
  hosts: [web.demo.causeway]
  http:
  - match: [{uri: {prefix: /v2}}]
    route: [{destination: {host: web, subset: v2}}]
  - route: [{destination: {host: web, subset: v1}}]
";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn endpoints(ctl: &Controller, ns: &str, name: &str) -> Vec<Value> {
    ctl.ctl_json(&["registry", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["namespace"] == ns && s["name"] == name)
        .map(|s| s["endpoints"].as_array().cloned().unwrap())
        .unwrap_or_default()
}

/// The merged registry as pushed to agents, and the routing resources of [`ROUTES`].
fn mesh_state(ctl: &Controller) -> MeshState {
    let mut state = MeshState::default();
    for svc in ctl.ctl_json(&["registry", "list"]).as_array().unwrap() {
        let key = format!(
            "{}/{}",
            svc["namespace"].as_str().unwrap(),
            svc["name"].as_str().unwrap()
        );
        let entry = state.services.entry(key).or_insert_with(|| ServiceState {
            vip: None,
            endpoints: Default::default(),
            hostnames: Vec::new(),
            source_kinds: Vec::new(),
            consul_tags: Vec::new(),
            consul_datacenters: Vec::new(),
            eureka_vips: Vec::new(),
        });
        for (i, e) in svc["endpoints"].as_array().unwrap().iter().enumerate() {
            entry.endpoints.insert(
                i.to_string(),
                EndpointState {
                    address: e["address"].as_str().unwrap().to_owned(),
                    ports: serde_json::from_value(e["ports"].clone()).unwrap(),
                    healthy: e["healthy"].as_bool().unwrap(),
                    zone: e["zone"].as_str().map(str::to_owned),
                    region: e["region"].as_str().map(str::to_owned),
                    identity: None,
                    source: e["source"].as_str().unwrap().to_owned(),
                    stale: false,
                    labels: serde_json::from_value(e["labels"].clone()).unwrap(),
                    mtls_strict: false,
                },
            );
        }
    }
    for (seq, (_, doc)) in decode_documents_indexed("routes", ROUTES)
        .unwrap()
        .into_iter()
        .enumerate()
    {
        let AnyResource::Route(r) = doc else {
            panic!("a policy in ROUTES")
        };
        state.routes.insert(
            r.key(),
            RouteState {
                seq: seq as u64,
                resource: r,
            },
        );
    }
    state
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

fn shop(id: &str, address: &str) -> ConsulRegistration {
    let mut r = ConsulRegistration::new(id, "shop", address, 8080);
    r.meta.insert("protocol".into(), "http".into());
    r
}

#[test]
fn why_explains_routes_and_subsets_select_by_consul_tags_and_pod_labels() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let consul = rt.block_on(FakeConsul::start_empty()).unwrap();
    let kube = rt.block_on(FakeKubernetes::start()).unwrap();
    // shop: v1 by a `version=v1` tag, v2 by a `version=v2` tag and by service meta.
    let mut s1 = shop("shop-1", "127.0.0.51");
    s1.tags = vec!["version=v1".into(), "primary".into()];
    let mut s2 = shop("shop-2", "127.0.0.52");
    s2.tags = vec!["version=v2".into()];
    let mut s3 = shop("shop-3", "127.0.0.53");
    s3.meta.insert("version".into(), "v2".into());
    for r in [&s1, &s2, &s3] {
        consul.register(r);
    }
    // demo/web: the recorded slice whose endpoints name the Pods web-v1-abcde
    // (10.244.1.11, version v1) and web-v2-fghij (10.244.2.12, version v2).
    let f =
        causeway_fakes::read_http_fixture("kubernetes/12-create-endpointslice-web-targetref.http");
    kube.apply(
        KubeKind::EndpointSlice,
        serde_json::from_str(&f.body).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = write(dir.path(), "kubeconfig", &kube.kubeconfig("t"));
    let ctl = Controller::start_with_config(
        &dir.path().join("c"),
        &format!(
            "[[sources.consul]]\nname = \"consul-dc1\"\naddress = \"{}\"\ndatacenter = \"dc1\"\nnamespace = \"default\"\n\n[[sources.kubernetes]]\nname = \"cluster-a\"\nkubeconfig = \"{}\"\n",
            consul.url(),
            kubeconfig.display()
        ),
    );
    wait_for("shop and the pods' labels in the registry", WAIT, || {
        let labelled = endpoints(&ctl, "demo", "web")
            .iter()
            .filter(|e| e["labels"]["version"].is_string())
            .count();
        (endpoints(&ctl, "default", "shop").len() == 3 && labelled == 2).then_some(())
    });
    let file = write(dir.path(), "routes.yaml", ROUTES);
    ctl.ctl_ok(&["apply", "-f", file.to_str().unwrap()]);

    // The canary header: route `canary`, subset v2 = the endpoints tagged `version=v2`
    // or with `version: v2` service meta; the subset's own balancing, the rule's outlier
    // detection.
    let why = |to: &str, extra: &[&str]| {
        let mut args = vec!["why", "--from", "192.0.2.99", "--to", to];
        args.extend(extra);
        let v = ctl.ctl_json(&args);
        assert!(v["routing"].is_object(), "{v}");
        v["routing"].clone()
    };
    let r = why("shop:8080", &["--header", "x-canary=1"]);
    assert_eq!(r["protocol"], "http", "{r}");
    assert_eq!(r["virtual_service"], "default/shop", "{r}");
    assert_eq!(r["route"], "canary", "{r}");
    let d = &r["destinations"][0];
    assert_eq!(d["subset"], "v2", "{r}");
    assert_eq!(d["destination_rule"], "default/shop", "{r}");
    assert_eq!(d["load_balancer"], "ROUND_ROBIN", "{r}");
    assert_eq!(d["outlier_detection"]["consecutive5xxErrors"], 3, "{r}");
    assert_eq!(
        strings(&d["endpoints"]),
        vec!["127.0.0.52:8080", "127.0.0.53:8080"],
        "{r}"
    );
    assert_eq!(
        strings(&d["excluded"]),
        vec!["127.0.0.51:8080: lacks version=v2"],
        "{r}"
    );

    // Without the header: the canary route's first failing condition, then the split.
    let r = why("shop:8080", &["--path", "/cart"]);
    assert_eq!(r["candidates"][0]["matched"], false, "{r}");
    assert_eq!(
        r["candidates"][0]["reason"],
        "match[0]: headers.x-canary: absent does not match exact \"1\"",
        "{r}"
    );
    assert_eq!(r["route"], "http[1]", "{r}");
    assert_eq!(r["total_weight"], 100, "{r}");
    let split: Vec<(String, u64, Vec<String>)> = r["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["subset"].as_str().unwrap().to_owned(),
                d["weight"].as_u64().unwrap(),
                strings(&d["endpoints"]),
            )
        })
        .collect();
    assert_eq!(
        split,
        vec![
            ("v1".to_owned(), 90, vec!["127.0.0.51:8080".to_owned()]),
            (
                "v2".to_owned(),
                10,
                vec!["127.0.0.52:8080".to_owned(), "127.0.0.53:8080".to_owned()]
            ),
        ],
        "{r}"
    );

    // Kubernetes: the subsets select by the Pods' labels.
    let r = why("web.demo:8080", &["--path", "/v2/items"]);
    assert_eq!(r["virtual_service"], "demo/web", "{r}");
    assert_eq!(r["destinations"][0]["subset"], "v2", "{r}");
    assert_eq!(
        strings(&r["destinations"][0]["endpoints"]),
        vec!["10.244.2.12:8080"],
        "{r}"
    );
    let r = why("web.demo:8080", &["--path", "/"]);
    assert_eq!(
        r["candidates"][0]["reason"], "match[0]: uri: \"/\" does not match prefix \"/v2\"",
        "{r}"
    );
    assert_eq!(
        strings(&r["destinations"][0]["endpoints"]),
        vec!["10.244.1.11:8080"],
        "{r}"
    );

    // The agents' own code on the same labels: the controller's merged registry as an
    // agent receives it, the route table compiled from the same files, the request planned,
    // the subset's endpoints chosen as the agent chooses its upstreams.
    let state = mesh_state(&ctl);
    let table = RouteTable::compile(&state, &SourceFacts::default());
    let agent_picks = |service: &str, path: &str, headers: &[(&str, &str)]| {
        let mut b = http::Request::builder().uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let parts = b.body(()).unwrap().into_parts().0;
        let plan = table
            .service(service)
            .and_then(|r| r.plan(&parts, 8080, || 0))
            .unwrap_or_else(|| panic!("no route for {service} {path}"));
        let mut picked: Vec<String> = state.services[service]
            .endpoints
            .values()
            .filter(|e| e.healthy && plan.dest.selects(&e.labels))
            .map(|e| e.address.clone())
            .collect();
        picked.sort();
        (plan.dest.subset.clone(), picked)
    };
    assert_eq!(
        agent_picks("default/shop", "/", &[("x-canary", "1")]),
        (
            Some("v2".to_owned()),
            vec!["127.0.0.52".to_owned(), "127.0.0.53".to_owned()]
        )
    );
    assert_eq!(
        agent_picks("demo/web", "/v2/items", &[]),
        (Some("v2".to_owned()), vec!["10.244.2.12".to_owned()])
    );
    assert_eq!(
        agent_picks("demo/web", "/", &[]),
        (Some("v1".to_owned()), vec!["10.244.1.11".to_owned()])
    );

    // The text form.
    let text = ctl.ctl_ok(&[
        "why",
        "--from",
        "192.0.2.99",
        "--to",
        "shop:8080",
        "--header",
        "x-canary=1",
    ]);
    assert!(
        text.contains("[taken]    default/shop canary match[0] holds"),
        "{text}"
    );
    assert!(
        text.contains("endpoints: 127.0.0.52:8080, 127.0.0.53:8080"),
        "{text}"
    );
    assert!(
        text.contains("ROUND_ROBIN (DestinationRule default/shop)"),
        "{text}"
    );
    // A bad header name is named.
    let out = ctl.ctl(&[
        "why",
        "--from",
        "192.0.2.99",
        "--to",
        "shop:8080",
        "--header",
        "bad header=1",
    ]);
    assert!(!out.status.success());
    assert!(
        describe(&out).contains("\"bad header\" is not a header name"),
        "{}",
        describe(&out)
    );
    drop(rt);
}
