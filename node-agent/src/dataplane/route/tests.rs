use super::*;
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

fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = ::http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

const ROUTES: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web.default.causeway]
  http:
  - name: canary
    match:
    - headers:
        x-canary: {exact: "1"}
    - uri: {regex: "/v2/[0-9]+"}
    - queryParams:
        canary: {exact: "yes"}
    route:
    - destination: {host: web, subset: v2}
  - name: api
    match:
    - uri: {prefix: /api/}
      method: {exact: POST}
    rewrite: {uri: /v1/}
    headers:
      request:
        set: {x-route: api}
        remove: [x-drop]
    timeout: 2s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "gateway-error,409"}
    route:
    - destination: {host: web, subset: v1}
  - name: split
    match:
    - sourceLabels: {app: other}
    route:
    - destination: {host: web, subset: v1}
  - name: default
    fault:
      abort: {httpStatus: 503, percentage: {value: 50}}
    route:
    - destination: {host: web.default, subset: v1}
      weight: 90
    - destination: {host: web, subset: v2}
      weight: 10
  tcp:
  - match:
    - port: 5432
    route:
    - destination: {host: db, port: {number: 6432}}
      weight: 100
"#;

fn table() -> RouteTable {
    let own = SourceFacts {
        labels: [("app".to_owned(), "client".to_owned())].into(),
        namespace: Some("default".into()),
    };
    RouteTable::compile(&state(ROUTES), &own)
}

fn counter() -> impl FnMut() -> u64 {
    let mut n = 0u64;
    move || {
        n = n.wrapping_add(1);
        n
    }
}

#[test]
fn header_regex_and_query_matches_go_to_the_canary_subset() {
    let t = table();
    let web = t.service("default/web").expect("routes for web");
    for r in [
        req("GET", "/x", &[("x-canary", "1")]),
        req("GET", "/v2/42", &[]),
        req("GET", "/p?a=1&canary=yes", &[]),
    ] {
        let p = web.plan(&r, 80, counter()).expect("a route");
        assert_eq!(p.route.name, "default/web canary");
        assert_eq!(p.dest.subset.as_deref(), Some("v2"));
        assert_eq!(p.dest.labels["version"], "v2");
        assert!(p.abort.is_none());
    }
    // Near misses fall through to the default route.
    for r in [
        req("GET", "/x", &[("x-canary", "2")]),
        req("GET", "/v2/4a", &[]),
        req("GET", "/p?canary=no", &[]),
    ] {
        let p = web.plan(&r, 80, counter()).expect("a route");
        assert_eq!(p.route.name, "default/web default");
    }
}

#[test]
fn prefix_and_method_rewrite_headers_timeout_and_retries() {
    let t = table();
    let web = t.service("default/web").unwrap();
    let p = web
        .plan(
            &req("POST", "/api/items?id=3", &[("x-drop", "1")]),
            80,
            counter(),
        )
        .unwrap();
    assert_eq!(p.route.name, "default/web api");
    assert_eq!(p.path.as_deref(), Some("/v1/items?id=3"));
    assert_eq!(p.route.timeout, Some(Duration::from_secs(2)));
    assert_eq!(p.route.retry.attempts, 3);
    assert_eq!(p.route.retry.per_try, Some(Duration::from_millis(500)));
    assert!(p.route.retry.on.status(StatusCode::BAD_GATEWAY));
    assert!(p.route.retry.on.status(StatusCode::CONFLICT));
    assert!(!p.route.retry.on.status(StatusCode::INTERNAL_SERVER_ERROR));
    let mut parts = req("POST", "/api/items?id=3", &[("x-drop", "1")]);
    p.apply_request(&mut parts);
    assert_eq!(parts.uri.path(), "/v1/items");
    assert_eq!(parts.uri.query(), Some("id=3"));
    assert_eq!(parts.headers["x-route"], "api");
    assert!(!parts.headers.contains_key("x-drop"));
    // GET does not match the POST route.
    let p = web
        .plan(&req("GET", "/api/items", &[]), 80, counter())
        .unwrap();
    assert_eq!(p.route.name, "default/web default");
}

#[test]
fn source_labels_of_another_workload_drop_the_match() {
    let t = table();
    let web = t.service("default/web").unwrap();
    // The "split" route selects app=other; this agent is app=client.
    for _ in 0..10 {
        let p = web.plan(&req("GET", "/", &[]), 80, counter()).unwrap();
        assert_ne!(p.route.name, "default/web split");
    }
    let other = RouteTable::compile(
        &state(ROUTES),
        &SourceFacts {
            labels: [("app".to_owned(), "other".to_owned())].into(),
            namespace: None,
        },
    );
    let p = other
        .service("default/web")
        .unwrap()
        .plan(&req("GET", "/", &[]), 80, counter())
        .unwrap();
    assert_eq!(p.route.name, "default/web split");
}

#[test]
fn weights_split_and_fault_percentages_hold() {
    let t = table();
    let web = t.service("default/web").unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = move || {
        // xorshift: deterministic, evenly spread.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut v2, mut aborted) = (0, 0);
    let n = 20_000;
    for _ in 0..n {
        let p = web.plan(&req("GET", "/", &[]), 80, &mut rnd).unwrap();
        if p.dest.subset.as_deref() == Some("v2") {
            v2 += 1;
        }
        if p.abort == Some(StatusCode::SERVICE_UNAVAILABLE) {
            aborted += 1;
        }
    }
    let share = f64::from(v2) / f64::from(n);
    assert!((0.08..0.12).contains(&share), "v2 share {share}");
    let ab = f64::from(aborted) / f64::from(n);
    assert!((0.47..0.53).contains(&ab), "abort share {ab}");
}

#[test]
fn tcp_routes_pick_by_port_and_default_retries_are_istios() {
    let t = table();
    let web = t.service("default/web").unwrap();
    let d = web.tcp_dest(5432, 7).expect("tcp route");
    assert_eq!(d.service, "default/db");
    assert_eq!(d.port, Some(6432));
    assert!(web.tcp_dest(80, 7).is_none());
    let r = Retry::compile(None);
    assert_eq!(r.attempts, 2);
    assert!(r.on.status(StatusCode::SERVICE_UNAVAILABLE));
    assert!(!r.on.status(StatusCode::INTERNAL_SERVER_ERROR));
    assert!(r.on.connect_failure());
    assert!(t.service("default/other").is_none());
}

#[test]
fn load_balancing_comes_from_the_rule_and_the_subset_overrides_it() {
    let yaml = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: sticky
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpHeaderName: x-user}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - match:
    - uri: {prefix: /sticky}
    route:
    - destination: {host: web, subset: sticky}
    mirror: {host: web, subset: v1}
    mirrorPercentage: {value: 0.0}
  - route:
    - destination: {host: web, subset: v1}
"#;
    let t = RouteTable::compile(&state(yaml), &SourceFacts::default());
    let web = t.service("default/web").unwrap();
    let p = web.plan(&req("GET", "/", &[]), 80, counter()).unwrap();
    assert!(matches!(p.dest.lb, LbKind::RoundRobin), "{:?}", p.dest.lb);
    assert!(p.hash.is_none());
    let a = web
        .plan(&req("GET", "/sticky", &[("x-user", "ann")]), 80, counter())
        .unwrap();
    let b = web
        .plan(
            &req("GET", "/sticky/x", &[("x-user", "ann")]),
            80,
            counter(),
        )
        .unwrap();
    let c = web
        .plan(&req("GET", "/sticky", &[("x-user", "bob")]), 80, counter())
        .unwrap();
    assert!(matches!(a.dest.lb, LbKind::Hash(HashOn::Header(_))));
    assert!(a.hash.is_some() && a.hash == b.hash && a.hash != c.hash);
    assert!(a.mirror.is_none(), "a 0% mirror never fires");
    let none = web
        .plan(&req("GET", "/sticky", &[]), 80, counter())
        .unwrap();
    assert!(none.hash.is_none(), "no header: a random choice");
    assert!(t.unenforced.is_empty(), "{:?}", t.unenforced);
}
