use std::collections::BTreeMap;

use http::HeaderMap;

use super::*;
use crate::admin::EndpointView;
use crate::registry::SourceKind;
use crate::route::{AnyResource, decode_documents_indexed};

const ROUTES: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web.default.causeway
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 10s}
    connectionPool: {tcp: {maxConnections: 50}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - name: canary
    match:
    - headers: {x-canary: {exact: \"1\"}}
    route: [{destination: {host: web, subset: v2}}]
  - name: batch-only
    match:
    - sourceLabels: {app: batch}
    route: [{destination: {host: web, subset: v1}}]
  - match:
    - uri: {prefix: /api}
    route:
    - {destination: {host: web, subset: v1}, weight: 90}
    - {destination: {host: web, subset: v2}, weight: 10}
    mirror: {host: web, subset: v2}
    mirrorPercentage: {value: 25}
  tcp:
  - match: [{port: 9000}]
    route: [{destination: {host: web, subset: v2, port: {number: 9000}}}]
";

fn resources() -> Vec<(u64, RouteResource)> {
    decode_documents_indexed("t", ROUTES)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, (_, r))| match r {
            AnyResource::Route(r) => (i as u64, r),
            AnyResource::Policy(_) => panic!("a policy"),
        })
        .collect()
}

fn endpoint(address: &str, version: &str, healthy: bool) -> EndpointView {
    EndpointView {
        address: address.into(),
        ports: [("http".to_owned(), 8080), ("tcp".to_owned(), 9000)].into(),
        healthy,
        source: "consul-dc1".into(),
        kind: SourceKind::Consul,
        native_id: address.into(),
        revision: "1".into(),
        stale: false,
        identity: None,
        zone: None,
        region: None,
        sources: vec!["consul-dc1".into()],
        agent: None,
        labels: [("version".to_owned(), version.to_owned())].into(),
    }
}

fn services() -> Vec<ServiceView> {
    vec![ServiceView {
        namespace: "default".into(),
        name: "web".into(),
        vip: None,
        endpoints: vec![
            endpoint("10.0.0.1", "v1", true),
            endpoint("10.0.0.2", "v2", true),
            endpoint("10.0.0.3", "v2", false),
        ],
        sources: ["consul-dc1".to_owned()].into(),
    }]
}

fn ask(path: &str, headers: &[(&str, &str)], labels: &[(&str, &str)]) -> RouteWhy {
    let owned = resources();
    let routes: Vec<(u64, &RouteResource)> = owned.iter().map(|(s, r)| (*s, r)).collect();
    let services = services();
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(
            http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let ns = "default".to_owned();
    explain(&WhyInput {
        routes: &routes,
        services: &services,
        service: "default/web",
        source_labels: &labels,
        source_namespace: Some(&ns),
        port: 8080,
        http: Some(RequestAttrs {
            path,
            query: "",
            method: "GET",
            authority: "web",
            headers: &h,
            port: 8080,
        }),
    })
}

#[test]
fn a_header_match_takes_the_canary_route_to_the_subset_and_its_policy() {
    let w = ask("/", &[("x-canary", "1")], &[]);
    assert_eq!(w.virtual_service.as_deref(), Some("default/web"));
    assert_eq!(w.route.as_deref(), Some("canary"));
    assert_eq!(w.protocol, "http");
    assert_eq!(w.candidates.len(), 1);
    assert!(w.candidates[0].matched);
    let d = &w.destinations[0];
    assert_eq!(d.subset.as_deref(), Some("v2"));
    assert_eq!(d.weight, 100);
    assert_eq!(d.destination_rule.as_deref(), Some("default/web"));
    // The subset's balancing overrides the rule's; outlier and pool come from the rule.
    assert_eq!(d.load_balancer, "ROUND_ROBIN");
    assert_eq!(
        d.outlier_detection.as_ref().unwrap().consecutive_5xx_errors,
        Some(3)
    );
    assert_eq!(
        d.connection_pool
            .as_ref()
            .unwrap()
            .tcp
            .as_ref()
            .unwrap()
            .max_connections,
        Some(50)
    );
    assert_eq!(d.endpoints, vec!["10.0.0.2:8080"]);
    assert_eq!(
        d.excluded,
        vec![
            "10.0.0.1:8080: lacks version=v2",
            "10.0.0.3:8080: unhealthy"
        ]
    );
    assert!(
        w.summary
            .starts_with("VirtualService default/web route canary: default/web subset v2"),
        "{}",
        w.summary
    );
}

#[test]
fn routes_not_taken_name_their_first_failing_condition() {
    let w = ask("/api/items", &[("x-canary", "0")], &[("app", "web")]);
    assert_eq!(w.route.as_deref(), Some("http[2]"));
    let reasons: Vec<(&str, bool, &str)> = w
        .candidates
        .iter()
        .map(|c| (c.route.as_str(), c.matched, c.reason.as_str()))
        .collect();
    assert_eq!(reasons[0].0, "canary");
    assert!(!reasons[0].1);
    assert_eq!(
        reasons[0].2,
        "match[0]: headers.x-canary: \"0\" does not match exact \"1\""
    );
    assert_eq!(reasons[1].0, "batch-only");
    assert!(
        reasons[1].2.contains("sourceLabels {\"app\": \"batch\"}")
            && reasons[1].2.contains("never applies here"),
        "{}",
        reasons[1].2
    );
    assert!(reasons[2].1);
    let split: Vec<(Option<&str>, u32)> = w
        .destinations
        .iter()
        .map(|d| (d.subset.as_deref(), d.weight))
        .collect();
    assert_eq!(split, vec![(Some("v1"), 90), (Some("v2"), 10)]);
    assert_eq!(w.total_weight, 100);
    // The subset without its own policy gets the rule's default balancing.
    assert_eq!(w.destinations[0].load_balancer, "LEAST_REQUEST (default)");
    assert_eq!(w.destinations[0].endpoints, vec!["10.0.0.1:8080"]);
    assert_eq!(w.mirror.as_deref(), Some("default/web subset v2 at 25%"));
}

#[test]
fn a_source_with_the_labels_takes_its_route() {
    let w = ask("/", &[], &[("app", "batch")]);
    assert_eq!(w.route.as_deref(), Some("batch-only"));
    assert_eq!(w.destinations[0].subset.as_deref(), Some("v1"));
}

#[test]
fn no_route_matching_goes_to_the_whole_service() {
    let w = ask("/other", &[], &[]);
    assert_eq!(w.route, None);
    assert_eq!(w.virtual_service, None);
    assert_eq!(w.candidates.len(), 3);
    assert!(w.candidates.iter().all(|c| !c.matched));
    assert_eq!(
        w.candidates[2].reason,
        "match[0]: uri: \"/other\" does not match prefix \"/api\""
    );
    assert_eq!(w.destinations.len(), 1);
    assert_eq!(w.destinations[0].service, "default/web");
    assert_eq!(w.destinations[0].subset, None);
    assert_eq!(
        w.destinations[0].endpoints,
        vec!["10.0.0.1:8080", "10.0.0.2:8080"]
    );
    assert!(
        w.summary.starts_with("no route of default/web matched"),
        "{}",
        w.summary
    );
    // A VirtualService exists for the host: the agent's no-route path does not apply
    // the DestinationRule.
    assert_eq!(w.destinations[0].destination_rule, None);
    assert!(
        w.summary.ends_with("with the default balancing"),
        "{}",
        w.summary
    );
}

#[test]
fn a_destination_rule_without_a_virtual_service_applies_its_policy() {
    let owned: Vec<(u64, RouteResource)> = resources()
        .into_iter()
        .filter(|(_, r)| matches!(r, RouteResource::DestinationRule(_)))
        .collect();
    let routes: Vec<(u64, &RouteResource)> = owned.iter().map(|(s, r)| (*s, r)).collect();
    let services = services();
    let labels = BTreeMap::new();
    let h = HeaderMap::new();
    let w = explain(&WhyInput {
        routes: &routes,
        services: &services,
        service: "default/web",
        source_labels: &labels,
        source_namespace: None,
        port: 8080,
        http: Some(RequestAttrs {
            path: "/",
            query: "",
            method: "GET",
            authority: "web",
            headers: &h,
            port: 8080,
        }),
    });
    assert_eq!(w.route, None);
    assert_eq!(
        w.destinations[0].destination_rule.as_deref(),
        Some("default/web")
    );
    assert!(
        w.summary
            .contains("under DestinationRule default/web's traffic policy"),
        "{}",
        w.summary
    );
}

#[test]
fn tcp_connections_take_the_tcp_route_of_their_port() {
    let owned = resources();
    let routes: Vec<(u64, &RouteResource)> = owned.iter().map(|(s, r)| (*s, r)).collect();
    let services = services();
    let labels = BTreeMap::new();
    let input = |port| WhyInput {
        routes: &routes,
        services: &services,
        service: "default/web",
        source_labels: &labels,
        source_namespace: None,
        port,
        http: None,
    };
    let w = explain(&input(9000));
    assert_eq!(w.protocol, "tcp");
    assert_eq!(w.route.as_deref(), Some("tcp[0]"));
    assert_eq!(w.destinations[0].endpoints, vec!["10.0.0.2:9000"]);
    let w = explain(&input(8080));
    assert_eq!(w.route, None);
    assert_eq!(w.candidates[0].reason, "no match is for port 8080");
}
