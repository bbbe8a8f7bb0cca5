//! A DestinationRule's policies in the compiled table: locality load balancing,
//! connection pool limits, a rule without a VirtualService.

use super::*;
use crate::dataplane::locality::LocalityMode;
use causeway_api::push::RouteState;

fn state(yaml: &str) -> MeshState {
    let mut s = MeshState::default();
    for (i, doc) in yaml.split("\n---\n").enumerate() {
        let v: serde_json::Value = serde_yaml_ng::from_str(doc).expect("yaml");
        let r = causeway_api::route::decode_value(v).expect("decodes");
        assert!(causeway_api::route::validate(&r).is_empty(), "{r:?}");
        s.routes.insert(
            r.key(),
            RouteState {
                seq: u64::try_from(i).unwrap(),
                resource: r,
            },
        );
    }
    s
}

fn get(uri: &str) -> Parts {
    ::http::Request::get(uri).body(()).unwrap().into_parts().0
}

const RULES: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting:
        failover:
        - {from: r1, to: r2}
    outlierDetection: {consecutive5xxErrors: 1}
    connectionPool:
      tcp: {maxConnections: 1, connectTimeout: 2s}
      http: {http1MaxPendingRequests: 1, idleTimeout: 5m}
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool:
        http: {http2MaxRequests: 7}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: default}
spec:
  host: db
  trafficPolicy:
    loadBalancer:
      localityLbSetting: {distribute: [{from: "r1/*", to: {"r1/*": 100}}]}"#;

#[test]
fn a_rule_without_a_virtual_service_routes_every_request_under_its_policy() {
    let t = RouteTable::compile(&state(RULES), &SourceFacts::default());
    let web = t.service("default/web").expect("web has a route");
    let p = web.plan(&get("/x"), 8080, lb_random).expect("a plan");
    assert_eq!(p.dest.service, "default/web");
    assert!(p.dest.subset.is_none() && p.dest.labels.is_empty());
    assert!(matches!(p.dest.lb, LbKind::RoundRobin));
    assert!(p.dest.outlier.is_some());
    assert!(matches!(p.dest.locality, LocalityMode::On(_)));
    let limits = p.dest.limits.as_ref().expect("limits");
    assert_eq!(limits.max_connections(), 1);
    assert_eq!(limits.connect_timeout, Some(Duration::from_secs(2)));
    assert_eq!(
        p.route.retry,
        Retry::default(),
        "one try, as without the rule"
    );
    let tcp = web.tcp_dest(5432, 3).expect("a TCP route too");
    assert_eq!(tcp.service, "default/web");
    // No outlierDetection: the locality setting is ignored, as in Istio, and said so.
    let db = t.service("default/db").unwrap();
    let p = db.plan(&get("/"), 80, lb_random).unwrap();
    assert_eq!(p.dest.locality, LocalityMode::Off);
    assert!(
        t.unenforced
            .iter()
            .any(|u| u.contains("DestinationRule default/db")
                && u.contains("localityLbSetting is ignored without outlierDetection")),
        "{:?}",
        t.unenforced
    );
    assert!(
        t.unenforced
            .iter()
            .any(|u| u.contains("spec.trafficPolicy.connectionPool.http.idleTimeout")),
        "{:?}",
        t.unenforced
    );
    assert_eq!(t.unenforced.len(), 2, "{:?}", t.unenforced);
}

#[test]
fn a_subsets_policy_overrides_the_rules_field_by_field() {
    let yaml = format!(
        "{RULES}\n---\n{}",
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - route:
    - destination: {host: web, subset: v2}"#
    );
    let t = RouteTable::compile(&state(&yaml), &SourceFacts::default());
    let p = t
        .service("default/web")
        .unwrap()
        .plan(&get("/"), 80, lb_random)
        .unwrap();
    assert_eq!(p.dest.subset.as_deref(), Some("v2"));
    // Its own connectionPool (no maxConnections), the rule's balancing and outliers.
    let limits = p.dest.limits.as_ref().unwrap();
    assert_eq!(limits.max_connections(), u32::MAX);
    assert!(matches!(p.dest.lb, LbKind::RoundRobin));
    assert!(matches!(p.dest.locality, LocalityMode::On(_)));
}

fn lb_random() -> u64 {
    crate::dataplane::lb::random()
}

/// The limits of `default/web`'s service-level policy in `t`.
fn web_limits(t: &RouteTable) -> Arc<crate::dataplane::pool::PoolLimits> {
    t.service("default/web")
        .unwrap()
        .plan(&get("/"), 80, lb_random)
        .unwrap()
        .dest
        .limits
        .clone()
        .expect("limits")
}

/// Every registry or routing push compiles a new route table. The connections and
/// requests in flight must still count against `maxConnections` after it: a push that
/// leaves the destination's `connectionPool` as it was keeps its counters; one that
/// changes the settings starts new ones.
#[test]
fn pool_counters_survive_a_push_that_leaves_the_pool_settings_as_they_were() {
    use crate::dataplane::pool::{Overflow, PoolCache};
    let facts = SourceFacts::default();
    let mut pools = PoolCache::default();
    let t1 = RouteTable::compile_with(&state(RULES), &facts, &mut pools);
    let held = web_limits(&t1)
        .admit_connection()
        .expect("the one connection maxConnections allows");

    // Another rule added: web's settings are unchanged.
    let other = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: default}
spec:
  host: api
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 5}"#;
    let t2 = RouteTable::compile_with(
        &state(&format!("{RULES}\n---\n{other}")),
        &facts,
        &mut pools,
    );
    drop(t1);
    pools.prune();
    assert!(
        matches!(
            web_limits(&t2).admit_connection(),
            Err(Overflow::MaxConnections)
        ),
        "the connection admitted before the push still counts"
    );
    drop(held);
    drop(
        web_limits(&t2)
            .admit_connection()
            .expect("its end frees the place"),
    );

    // Changed settings: new counters; what is in flight finishes under the old ones.
    let held = web_limits(&t2).admit_connection().unwrap();
    let changed = RULES.replace("maxConnections: 1,", "maxConnections: 2,");
    let t3 = RouteTable::compile_with(&state(&changed), &facts, &mut pools);
    drop(t2);
    pools.prune();
    let limits = web_limits(&t3);
    assert_eq!(limits.max_connections(), 2);
    let (_a, _b) = (
        limits.admit_connection().unwrap(),
        limits.admit_connection().unwrap(),
    );
    assert!(limits.admit_connection().is_err());
    drop(held);
    // The old limits went with the old tables: only those of a destination in a live
    // table are kept (web's; api's went with t2, and subset v2 is in no route).
    assert_eq!(pools.len(), 1, "{pools:?}");
}
