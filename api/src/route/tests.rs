use std::time::Duration;

use super::validate::{check_subsets, parse_duration, service_of_host};
use super::*;

fn decode(yaml: &str) -> Result<RouteResource, (String, String)> {
    let v: serde_json::Value = serde_yaml_ng::from_str(yaml).expect("yaml");
    decode_value(v)
}

fn vs(yaml: &str) -> VirtualService {
    match decode(yaml).unwrap_or_else(|e| panic!("decode: {e:?}")) {
        RouteResource::VirtualService(v) => *v,
        other => panic!("not a VirtualService: {other:?}"),
    }
}

fn dr(yaml: &str) -> DestinationRule {
    match decode(yaml).unwrap_or_else(|e| panic!("decode: {e:?}")) {
        RouteResource::DestinationRule(d) => *d,
        other => panic!("not a DestinationRule: {other:?}"),
    }
}

/// Problems as `path: message` lines.
fn problems(r: &RouteResource) -> Vec<String> {
    validate(r)
        .into_iter()
        .map(|p| format!("{}: {}", p.path, p.message))
        .collect()
}

fn has(problems: &[String], path: &str, words: &str) {
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with(&format!("{path}: ")) && p.contains(words)),
        "no problem at {path} containing {words:?} in {problems:#?}"
    );
}

// Istio's documented examples (reviews canary, ratings retries/fault, DR subsets), as users
// paste them.
const REVIEWS_VS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews-route
  namespace: shop
  resourceVersion: "123"
spec:
  hosts:
  - reviews.shop.svc.cluster.local
  http:
  - name: "reviews-v2-routes"
    match:
    - uri:
        prefix: "/wpcatalog"
    - uri:
        prefix: "/consumercatalog"
    - headers:
        x-canary:
          exact: "1"
    rewrite:
      uri: "/newcatalog"
    route:
    - destination:
        host: reviews.shop.svc.cluster.local
        subset: v2
  - name: "reviews-v1-route"
    route:
    - destination:
        host: reviews.shop.svc.cluster.local
        subset: v1
      weight: 90
    - destination:
        host: reviews
        subset: v2
      weight: 10
    timeout: 10s
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: gateway-error,connect-failure,refused-stream,503
    fault:
      delay:
        percentage:
          value: 0.1
        fixedDelay: 5s
      abort:
        percentage:
          value: 50
        httpStatus: 503
    mirror:
      host: reviews
      subset: v1
    mirrorPercentage:
      value: 25.0
    headers:
      request:
        set:
          x-routed: "yes"
        remove: [x-debug]
"#;

const REVIEWS_DR: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: reviews-destination
  namespace: shop
spec:
  host: reviews.shop.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
      localityLbSetting:
        enabled: true
        failover:
        - from: us-east
          to: us-west
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 30ms
      http:
        http1MaxPendingRequests: 64
        http2MaxRequests: 1000
    outlierDetection:
      consecutive5xxErrors: 7
      consecutiveGatewayErrors: 5
      interval: 5m
      baseEjectionTime: 15m
      maxEjectionPercent: 50
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpCookie:
            name: user
            ttl: 0s
"#;

#[test]
fn istio_examples_decode_and_validate_clean() {
    let v = vs(REVIEWS_VS);
    assert_eq!(v.metadata.namespace(), "shop");
    assert_eq!(v.spec.http.len(), 2);
    assert_eq!(v.spec.http[0].matches.len(), 3);
    assert_eq!(
        v.spec.http[1].mirror_percentage.as_ref().map(|p| p.value),
        Some(25.0)
    );
    assert_eq!(
        problems(&RouteResource::VirtualService(Box::new(v.clone()))),
        Vec::<String>::new()
    );
    let d = dr(REVIEWS_DR);
    assert_eq!(d.spec.subsets.len(), 2);
    assert_eq!(
        problems(&RouteResource::DestinationRule(Box::new(d.clone()))),
        Vec::<String>::new()
    );
    assert!(check_subsets(&v, &[&d]).is_empty());
}

#[test]
fn every_accepted_version_decodes_and_others_are_named() {
    for version in ["v1", "v1beta1", "v1alpha3"] {
        let y = REVIEWS_DR.replace(
            "networking.istio.io/v1beta1",
            &format!("networking.istio.io/{version}"),
        );
        dr(&y);
    }
    let (path, msg) = decode(&REVIEWS_DR.replace("networking.istio.io/v1beta1", "v1")).unwrap_err();
    assert_eq!(path, "apiVersion");
    assert!(msg.contains("networking.istio.io/v1"), "{msg}");
}

#[test]
fn typos_are_refused_with_the_field_path() {
    let (path, msg) = decode(&REVIEWS_VS.replace("perTryTimeout", "perTryTimout")).unwrap_err();
    assert_eq!(path, "spec.http[1].retries.perTryTimout");
    assert!(
        msg.contains("unknown field") && msg.contains("perTryTimeout"),
        "{msg}"
    );
    let (path, _) =
        decode(&REVIEWS_DR.replace("maxEjectionPercent", "maxEjectPercent")).unwrap_err();
    assert_eq!(path, "spec.trafficPolicy.outlierDetection.maxEjectPercent");
}

#[test]
fn bad_input_names_the_field() {
    // A regex that does not compile, weights not summing to 100, a negative timeout.
    let bad = REVIEWS_VS
        .replace("prefix: \"/consumercatalog\"", "regex: \"/cat[alog\"")
        .replace("weight: 10", "weight: 20")
        .replace("timeout: 10s", "timeout: -1s");
    let p = problems(&RouteResource::VirtualService(Box::new(vs(&bad))));
    has(&p, "spec.http[0].match[1].uri.regex", "does not compile");
    has(&p, "spec.http[1].route", "sum to 110");
    has(&p, "spec.http[1].timeout", "negative");
    assert_eq!(p.len(), 3, "{p:#?}");

    let more = REVIEWS_VS
        .replace("httpStatus: 503", "httpStatus: 700")
        .replace("value: 25.0", "value: 125.0")
        .replace("attempts: 3", "attempts: -1")
        .replace("gateway-error,", "gateway-eror,")
        .replace("x-canary:", "X-Canary:")
        .replace("fixedDelay: 5s", "fixedDelay: 5 seconds");
    let p = problems(&RouteResource::VirtualService(Box::new(vs(&more))));
    has(&p, "spec.http[1].fault.abort.httpStatus", "700");
    has(&p, "spec.http[1].mirrorPercentage.value", "125");
    has(&p, "spec.http[1].retries.attempts", "negative");
    has(&p, "spec.http[1].retries.retryOn", "gateway-eror");
    has(&p, "spec.http[0].match[2].headers", "x-canary");
    has(&p, "spec.http[1].fault.delay.fixedDelay", "unknown unit");
}

#[test]
fn unsupported_istio_fields_are_refused_by_name_not_ignored() {
    let y = REVIEWS_VS.replace(
        "    timeout: 10s\n",
        "    timeout: 10s\n    corsPolicy:\n      allowOrigins: [{exact: \"https://a\"}]\n",
    );
    let p = problems(&RouteResource::VirtualService(Box::new(vs(&y))));
    has(&p, "spec.http[1].corsPolicy", "not supported");
    let y = REVIEWS_DR.replace(
        "  subsets:\n",
        "  workloadSelector:\n    matchLabels: {app: x}\n  subsets:\n",
    );
    let p = problems(&RouteResource::DestinationRule(Box::new(dr(&y))));
    has(&p, "spec.workloadSelector", "not supported");
}

#[test]
fn destination_rule_rules() {
    let y = REVIEWS_DR
        .replace("simple: LEAST_REQUEST", "simple: FASTEST")
        .replace("maxEjectionPercent: 50", "maxEjectionPercent: 150")
        .replace("    - name: v2\n", "    - name: v1\n")
        .replace("  - name: v2\n", "  - name: v1\n")
        .replace("interval: 5m", "interval: 0s");
    let p = problems(&RouteResource::DestinationRule(Box::new(dr(&y))));
    has(&p, "spec.trafficPolicy.loadBalancer.simple", "FASTEST");
    has(
        &p,
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
        "150",
    );
    has(&p, "spec.subsets[1].name", "defined twice");
    has(
        &p,
        "spec.trafficPolicy.outlierDetection.interval",
        "shorter",
    );

    let both = REVIEWS_DR.replace(
        "        failover:\n",
        "        distribute:\n        - from: us-east/*\n          to: {\"us-east/a/*\": 60, \"us-west/*\": 30}\n        failover:\n",
    );
    let p = problems(&RouteResource::DestinationRule(Box::new(dr(&both))));
    has(
        &p,
        "spec.trafficPolicy.loadBalancer.localityLbSetting",
        "not both",
    );
    has(
        &p,
        "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to",
        "sum to 90",
    );
}

#[test]
fn a_subset_no_destination_rule_defines_names_both() {
    let v = vs(&REVIEWS_VS.replace(
        "subset: v1\n      weight: 90",
        "subset: v3\n      weight: 90",
    ));
    let d = dr(REVIEWS_DR);
    let p = check_subsets(&v, &[&d]);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].path, "spec.http[1].route[0].destination.subset");
    assert!(
        p[0].message.contains("\"v3\"")
            && p[0]
                .message
                .contains("DestinationRule shop/reviews-destination"),
        "{}",
        p[0].message
    );
    // No DestinationRule at all for the host.
    let p = check_subsets(&v, &[]);
    assert!(
        p.iter().all(|p| p.message.contains("no DestinationRule")),
        "{p:?}"
    );
    assert_eq!(p.len(), 4, "every route and the mirror: {p:?}");
}

#[test]
fn host_forms_name_the_same_service() {
    for host in [
        "web",
        "web.shop",
        "web.shop.causeway",
        "web.shop.svc.cluster.local",
        "WEB.shop.causeway.",
    ] {
        assert_eq!(
            service_of_host(host, "shop"),
            ("shop".to_owned(), "web".to_owned()),
            "{host}"
        );
    }
    assert_eq!(
        service_of_host("web.service.consul", "shop"),
        ("default".to_owned(), "web".to_owned())
    );
    assert_eq!(
        service_of_host("web.service.dc1.consul", "shop"),
        ("default".to_owned(), "web".to_owned())
    );
}

#[test]
fn durations_in_istio_syntax() {
    for (text, want) in [
        ("10s", Duration::from_secs(10)),
        ("1.5s", Duration::from_millis(1500)),
        ("250ms", Duration::from_millis(250)),
        ("1m30s", Duration::from_secs(90)),
        ("1h", Duration::from_secs(3600)),
        ("0s", Duration::ZERO),
    ] {
        assert_eq!(parse_duration(text).unwrap(), want, "{text}");
    }
    for bad in ["", "-1s", "10", "5 seconds", "1d", "s"] {
        assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
    }
}
