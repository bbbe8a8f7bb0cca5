use super::*;
use crate::PortSpec;
use crate::push::{AgentFrame, agent_frame};

const NOW: i64 = 1_000_000;

fn group(name: &str, ns: &str, sa: &str, port: u16) -> WorkloadGroup {
    WorkloadGroup {
        name: name.into(),
        namespace: ns.into(),
        service_account: sa.into(),
        service: Some(name.into()),
        ports: vec![PortSpec {
            name: "http".into(),
            port,
        }],
        labels: BTreeMap::new(),
        allowed_cidrs: Vec::new(),
        mtls: crate::MtlsMode::Permissive,
        registry_source: None,
    }
}

fn agent(id: &str, group: &str, addr: &str) -> AgentFacts {
    AgentFacts {
        id: id.into(),
        group: group.into(),
        address: Some(addr.parse().unwrap()),
        joined_at: NOW - 100,
        not_after: NOW + 86_400,
        connected: true,
        session_since: Some(NOW - 50),
        acked_version: Some(10),
        agent_version: Some("0.1.0".into()),
        ..AgentFacts::default()
    }
}

/// A clean mesh: groups web and client, one agent each, synced sources.
fn clean() -> Snapshot {
    Snapshot {
        routes: Vec::new(),
        live: true,
        now: NOW,
        controller_started: NOW - 1000,
        controller_version: "0.1.0".into(),
        trust_domain: "causeway.local".into(),
        mesh_version: 10,
        vip_range: "240.240.0.0/16".into(),
        vips_total: 65534,
        vips_used: 2,
        sources: vec![SourceFacts {
            name: "agents".into(),
            kind: "agents".into(),
            state: "synced".into(),
            endpoints: 2,
            ..SourceFacts::default()
        }],
        services: vec![
            svc(
                "web",
                &[("10.0.0.2", "agents", "http", 8080, Some("a-web"))],
            ),
            svc(
                "client",
                &[("10.0.0.1", "agents", "http", 7070, Some("a-client"))],
            ),
        ],
        agents: vec![
            agent("a-web", "web", "10.0.0.2"),
            agent("a-client", "client", "10.0.0.1"),
        ],
        groups: vec![
            group("web", "default", "web", 8080),
            group("client", "default", "client", 7070),
        ],
        tokens: vec![TokenFacts {
            id: "t1".into(),
            group: "web".into(),
            expires_at: NOW - 10,
            uses_total: 1,
            uses_left: 0,
            revoked: false,
        }],
        policies: Vec::new(),
    }
}

fn svc(name: &str, eps: &[(&str, &str, &str, u16, Option<&str>)]) -> ServiceFacts {
    ServiceFacts {
        namespace: "default".into(),
        name: name.into(),
        endpoints: eps
            .iter()
            .map(|(addr, source, port, number, agent)| EndpointFacts {
                address: (*addr).into(),
                source: (*source).into(),
                ports: [((*port).to_owned(), *number)].into(),
                stale: false,
                agent: agent.map(str::to_owned),
                labels: BTreeMap::new(),
            })
            .collect(),
    }
}

fn policies(yaml: &str) -> Vec<PolicyFacts> {
    crate::policy::decode_documents("test.yaml", yaml)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, resource)| PolicyFacts {
            seq: i as u64,
            resource,
            origin: None,
        })
        .collect()
}

fn run(s: &Snapshot) -> Report {
    analyze(s, &Thresholds::default())
}

/// The (code, level, resource) of every message.
fn found(r: &Report) -> Vec<(String, Level, String)> {
    r.messages
        .iter()
        .map(|m| (m.code.clone(), m.level, m.resource.clone()))
        .collect()
}

fn has(r: &Report, code: &str, level: Level, resource: &str) {
    assert!(
        r.messages
            .iter()
            .any(|m| m.code == code && m.level == level && m.resource == resource),
        "expected {code} {level} for {resource}, got {:#?}",
        r.messages
    );
}

#[test]
fn a_clean_mesh_has_no_message() {
    assert_eq!(found(&run(&clean())), vec![]);
}

#[test]
fn ports_that_differ_between_sources() {
    let mut s = clean();
    s.services.push(svc(
        "cart",
        &[
            ("10.1.0.1", "consul-dc1", "http", 8080, None),
            ("10.1.0.2", "eureka", "http", 9090, None),
            ("10.1.0.3", "consul-dc1", "grpc", 7000, None),
            ("10.1.0.4", "file", "web", 7000, None),
        ],
    ));
    let r = run(&s);
    has(&r, "CW0101", Level::Warning, "service default/cart");
    has(&r, "CW0102", Level::Warning, "service default/cart");
    let m = r.messages.iter().find(|m| m.code == "CW0101").unwrap();
    assert!(
        m.message.contains("8080 in consul-dc1") && m.message.contains("9090 in eureka"),
        "{}",
        m.message
    );
    // The same disagreement inside one source is that source's own business.
    let mut s = clean();
    s.services.push(svc(
        "cart",
        &[
            ("10.1.0.1", "consul-dc1", "http", 8080, None),
            ("10.1.0.2", "consul-dc1", "http", 9090, None),
        ],
    ));
    assert_eq!(found(&run(&s)), vec![]);
}

#[test]
fn a_failing_source_and_its_stale_endpoints() {
    let mut s = clean();
    s.sources.push(SourceFacts {
        name: "consul-dc1".into(),
        kind: "consul".into(),
        state: "stale".into(),
        last_error: Some("connection refused".into()),
        stale_since: Some(NOW - 60),
        endpoints: 3,
    });
    let r = run(&s);
    has(&r, "CW0104", Level::Error, "source consul-dc1");
    assert!(
        !r.messages.iter().any(|m| m.code == "CW0103"),
        "under the threshold"
    );
    s.sources[1].stale_since = Some(NOW - 301);
    let r = run(&s);
    has(&r, "CW0103", Level::Warning, "source consul-dc1");
    assert!(r.messages.iter().any(|m| m.message.contains("3 endpoints")));
}

#[test]
fn vip_range_nearly_exhausted_then_full() {
    let mut s = clean();
    s.vips_total = 14;
    s.vips_used = 13;
    has(&run(&s), "CW0105", Level::Warning, "mesh.vip_range");
    s.vips_used = 14;
    has(&run(&s), "CW0105", Level::Error, "mesh.vip_range");
    s.vips_used = 12;
    assert_eq!(found(&run(&s)), vec![]);
}

#[test]
fn certificates_expiring_and_expired() {
    let mut s = clean();
    s.agents[0].not_after = NOW + 3600;
    has(&run(&s), "CW0201", Level::Warning, "agent a-web");
    s.agents[0].not_after = NOW - 1;
    has(&run(&s), "CW0201", Level::Error, "agent a-web");
    s.agents[0].removed = true;
    assert!(
        !run(&s).messages.iter().any(|m| m.code == "CW0201"),
        "removed agents are ignored"
    );
}

#[test]
fn agents_disconnected_too_long() {
    let mut s = clean();
    s.agents[1].connected = false;
    s.agents[1].session_since = Some(NOW - 599);
    assert!(!run(&s).messages.iter().any(|m| m.code == "CW0202"));
    s.agents[1].session_since = Some(NOW - 601);
    has(&run(&s), "CW0202", Level::Warning, "agent a-client");
    // No session since the controller started: counted from the start.
    s.agents[1].session_since = None;
    s.controller_started = NOW - 700;
    s.agents[1].joined_at = NOW - 5000;
    has(&run(&s), "CW0202", Level::Warning, "agent a-client");
    // ... or from its join, when it joined after the controller started.
    s.agents[1].joined_at = NOW - 100;
    assert!(!run(&s).messages.iter().any(|m| m.code == "CW0202"));
}

#[test]
fn groups_without_agents_and_unused_expired_tokens() {
    let mut s = clean();
    s.groups.push(group("batch", "default", "batch", 9000));
    s.tokens.push(TokenFacts {
        id: "t2".into(),
        group: "batch".into(),
        expires_at: NOW - 5,
        uses_total: 2,
        uses_left: 2,
        revoked: false,
    });
    let r = run(&s);
    has(&r, "CW0203", Level::Info, "group batch");
    has(&r, "CW0204", Level::Warning, "token t2");
    s.tokens[1].revoked = true;
    assert!(!run(&s).messages.iter().any(|m| m.code == "CW0204"));
}

#[test]
fn nacks_lag_and_version_skew() {
    let mut s = clean();
    s.agents[0].last_nack = Some(NackFacts {
        version: 10,
        error: "update 10 requires feature \"x\"".into(),
    });
    s.agents[1].acked_version = Some(8);
    let r = run(&s);
    has(&r, "CW0301", Level::Error, "agent a-web");
    assert!(
        r.messages[0].message.contains("requires feature"),
        "{:?}",
        r.messages[0]
    );
    has(&r, "CW0302", Level::Warning, "agent a-client");
    // One version behind is a push in flight, not a problem.
    s.agents[1].acked_version = Some(9);
    assert!(!run(&s).messages.iter().any(|m| m.code == "CW0302"));

    assert!(!unsupported_skew("1.4.0", "1.3.9"));
    assert!(unsupported_skew("1.4.0", "1.2.0"));
    assert!(unsupported_skew("2.0.0", "1.9.0"));
    assert!(!unsupported_skew("1.4.0", "1.5.0"));
    assert!(!unsupported_skew("1.4.0", "unknown"));
    let mut s = clean();
    s.controller_version = "0.3.0".into();
    s.agents[0].agent_version = Some("0.1.2".into());
    s.agents[1].agent_version = Some("0.2.0".into());
    let r = run(&s);
    has(&r, "CW0303", Level::Error, "agent a-web");
    assert!(!r.messages.iter().any(|m| m.resource == "agent a-client"));
}

const ALLOW_CLIENT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: default}
spec:
  selector: {matchLabels: {causeway.io/group: web}}
  rules:
  - from:
    - source: {principals: ["causeway.local/ns/default/sa/client"]}
"#;

#[test]
fn a_policy_that_fits_the_mesh_has_no_message() {
    let mut s = clean();
    s.policies = policies(ALLOW_CLIENT);
    assert_eq!(found(&run(&s)), vec![]);
}

#[test]
fn policies_selecting_nothing() {
    let mut s = clean();
    s.policies = policies(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: default}
spec:
  selector: {matchLabels: {causeway.io/group: wbe}}
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: shop-wide, namespace: shop}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: causeway-system}
spec:
  action: AUDIT
  rules: [{}]
"#,
    );
    let r = run(&s);
    has(
        &r,
        "CW0401",
        Level::Warning,
        "AuthorizationPolicy default/typo",
    );
    has(
        &r,
        "CW0401",
        Level::Warning,
        "PeerAuthentication shop/shop-wide",
    );
    assert_eq!(r.messages.len(), 2, "{:#?}", r.messages);
}

#[test]
fn principals_and_namespaces_no_group_has() {
    let mut s = clean();
    s.policies = policies(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: default}
spec:
  selector: {matchLabels: {causeway.io/group: web}}
  rules:
  - from:
    - source: {principals: ["causeway.local/ns/default/sa/client", "causeway.local/ns/default/sa/frontend"]}
    - source: {namespaces: ["defau*", "shop"]}
"#,
    );
    let r = run(&s);
    has(
        &r,
        "CW0402",
        Level::Warning,
        "AuthorizationPolicy default/allow",
    );
    let m = r.messages.iter().find(|m| m.code == "CW0402").unwrap();
    assert!(
        m.message.contains("sa/frontend") && m.message.contains("\"shop\""),
        "{}",
        m.message
    );
    assert!(!m.message.contains("sa/client\""), "{}", m.message);
}

#[test]
fn allow_policies_that_leave_a_service_unreachable() {
    let mut s = clean();
    s.policies = policies(&ALLOW_CLIENT.replace("sa/client", "sa/frontend"));
    let r = run(&s);
    has(
        &r,
        "CW0403",
        Level::Warning,
        "AuthorizationPolicy default/allow-client",
    );
    // HTTP-only rules cannot be judged at the connection level: no message.
    s.policies = policies(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: default}
spec:
  selector: {matchLabels: {causeway.io/group: web}}
  rules:
  - to:
    - operation: {methods: ["GET"]}
"#,
    );
    assert!(!run(&s).messages.iter().any(|m| m.code == "CW0403"));
}

#[test]
fn a_deny_that_shadows_an_allow_completely() {
    let deny_all = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: default}
spec:
  action: DENY
  rules: [{}]
"#;
    let mut s = clean();
    s.policies = policies(&format!("{ALLOW_CLIENT}{deny_all}"));
    let r = run(&s);
    has(
        &r,
        "CW0404",
        Level::Warning,
        "AuthorizationPolicy default/allow-client",
    );
    // Works offline too (selectors only).
    s.live = false;
    let r = run(&s);
    assert_eq!(
        found(&r),
        vec![(
            "CW0404".into(),
            Level::Warning,
            "AuthorizationPolicy default/allow-client".into()
        )]
    );
    // A DENY of a narrower selector, or of other principals, shadows nothing.
    let mut s = clean();
    s.policies = policies(&format!(
        "{ALLOW_CLIENT}{}",
        deny_all.replace(
            "spec:\n",
            "spec:\n  selector: {matchLabels: {causeway.io/group: web, tier: x}}\n"
        )
    ));
    assert!(!run(&s).messages.iter().any(|m| m.code == "CW0404"));
}

#[test]
fn strict_with_agentless_clients() {
    let strict = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: causeway-system}
spec:
  mtls: {mode: STRICT}
"#;
    let mut s = clean();
    s.policies = policies(strict);
    assert_eq!(
        found(&run(&s)),
        vec![],
        "STRICT with agent clients only is fine"
    );
    s.services.push(svc(
        "legacy",
        &[("10.2.0.1", "consul-dc1", "http", 80, None)],
    ));
    let r = run(&s);
    has(
        &r,
        "CW0405",
        Level::Warning,
        "PeerAuthentication causeway-system/default",
    );
}

#[test]
fn dataplane_facts_reported_by_agents() {
    let mut s = clean();
    s.agents[0].dataplane = Some(crate::push::AgentFacts {
        agent_version: "0.1.0".into(),
        capture_enabled: true,
        capture_problems: vec!["missing: -A CAUSEWAY_OUTPUT ...".into()],
        dns_enabled: true,
        dns_problems: vec!["table ip causeway_dns is missing".into()],
    });
    s.agents[1].dataplane = Some(crate::push::AgentFacts {
        agent_version: "0.1.0".into(),
        capture_enabled: true,
        ..crate::push::AgentFacts::default()
    });
    let r = run(&s);
    has(&r, "CW0601", Level::Error, "agent a-web");
    has(&r, "CW0602", Level::Error, "agent a-web");
    assert_eq!(r.messages.len(), 2, "{:#?}", r.messages);
}

#[test]
fn files_report_the_file_and_document() {
    let files = vec![
        ("p/a.yaml".to_owned(), ALLOW_CLIENT.to_owned()),
        (
            "p/b.yaml".to_owned(),
            format!(
                "{ALLOW_CLIENT}---\n{}",
                ALLOW_CLIENT.replace("rules:", "action: ALLOW\n  rulez:")
            ),
        ),
    ];
    let (ok, messages) = analyze_files(&files);
    assert_eq!(ok.len(), 1, "a file with a broken document gives nothing");
    assert_eq!(messages.len(), 1, "{messages:#?}");
    assert_eq!(messages[0].code, "CW0001");
    assert_eq!(messages[0].resource, "p/b.yaml doc 2");
    assert!(
        messages[0].message.contains("rulez"),
        "{}",
        messages[0].message
    );
}

#[test]
fn overlay_replaces_the_stored_resource_of_the_same_name() {
    let mut s = clean();
    s.policies = policies(ALLOW_CLIENT);
    let (ok, _) = analyze_files(&[(
        "new.yaml".into(),
        ALLOW_CLIENT.replace("sa/client", "sa/frontend"),
    )]);
    s.overlay(ok);
    assert_eq!(s.policies.len(), 1);
    let r = run(&s);
    let m = r
        .messages
        .iter()
        .find(|m| m.code == "CW0403")
        .expect("CW0403");
    assert!(m.message.contains("from new.yaml doc 1"), "{}", m.message);
}

#[test]
fn suppressions_and_order() {
    let mut s = clean();
    s.groups.push(group("batch", "default", "batch", 9000));
    s.agents[0].last_nack = Some(NackFacts::default());
    let mut r = run(&s);
    assert_eq!(r.messages[0].level, Level::Error, "errors first");
    r.suppress(&["CW0203=group batch".parse().unwrap()]);
    assert!(!r.messages.iter().any(|m| m.code == "CW0203"));
    r.suppress(&["cw0301=*".parse().unwrap()]);
    assert!(r.messages.is_empty());
    assert!(
        "CW9999=x"
            .parse::<Suppression>()
            .unwrap_err()
            .contains("unknown code")
    );
    assert!(
        "CW0301"
            .parse::<Suppression>()
            .unwrap_err()
            .contains("CODE=RESOURCE")
    );
}

#[test]
fn the_json_shape_is_the_contract() {
    let r = Report {
        messages: vec![Message {
            code: "CW0401".into(),
            level: Level::Warning,
            resource: "AuthorizationPolicy default/x".into(),
            message: "m".into(),
            fix: "f".into(),
        }],
    };
    assert_eq!(
        serde_json::to_value(&r).unwrap(),
        serde_json::json!({"messages": [{"code": "CW0401", "level": "Warning", "resource": "AuthorizationPolicy default/x", "message": "m", "fix": "f"}]})
    );
}

#[test]
fn every_code_is_documented_with_an_example() {
    let doc = include_str!("../../../docs/analyze.md");
    for c in CODES {
        assert!(
            doc.contains(&format!("### {}", c.code)),
            "docs/analyze.md has no section for {}",
            c.code
        );
    }
    let mut codes: Vec<&str> = CODES.iter().map(|c| c.code).collect();
    codes.dedup();
    assert_eq!(codes.len(), CODES.len(), "codes are unique and sorted");
}

#[test]
fn facts_round_trip_as_an_agent_frame() {
    let frame = AgentFrame {
        kind: Some(agent_frame::Kind::Facts(crate::push::AgentFacts {
            agent_version: "0.1.0".into(),
            capture_enabled: true,
            capture_problems: vec!["missing: x".into()],
            dns_enabled: true,
            dns_problems: Vec::new(),
        })),
    };
    let bytes = crate::wire::encode_frame(&frame);
    let back: AgentFrame = crate::wire::decode_body(&bytes[4..]).unwrap();
    assert_eq!(back, frame);
}

/// Routing resources from YAML (decoded without validation, as the checks must also see
/// what validation would refuse, e.g. from `-f`).
fn routes(yaml: &str) -> Vec<RouteFacts> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .enumerate()
        .map(|(i, v)| RouteFacts {
            seq: i as u64,
            resource: crate::route::decode_value(v).unwrap(),
            origin: None,
        })
        .collect()
}

/// web with two endpoints labelled version v1 and v2.
fn versioned() -> Snapshot {
    let mut s = clean();
    let web = s.services.iter_mut().find(|x| x.name == "web").unwrap();
    let mut v2 = web.endpoints[0].clone();
    v2.address = "10.0.0.3".into();
    v2.agent = None;
    web.endpoints[0].labels = [("version".to_owned(), "v1".to_owned())].into();
    v2.labels = [("version".to_owned(), "v2".to_owned())].into();
    web.endpoints.push(v2);
    s
}

const GOOD_ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web.default.causeway]
  http:
  - match: [{headers: {x-canary: {exact: "1"}}}]
    route: [{destination: {host: web, subset: v2}}]
  - route:
    - {destination: {host: web, subset: v1}, weight: 90}
    - {destination: {host: web.default, subset: v2}, weight: 10}
"#;

#[test]
fn routes_that_fit_the_mesh_have_no_message() {
    let mut s = versioned();
    s.routes = routes(GOOD_ROUTES);
    let r = run(&s);
    assert!(r.messages.is_empty(), "{:#?}", r.messages);
}

#[test]
fn route_hosts_and_destinations_missing_from_the_registry() {
    let mut s = versioned();
    s.routes = routes(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: default}
spec:
  hosts: [shop]
  http:
  - route: [{destination: {host: cart.default}}]
"#,
    );
    let r = run(&s);
    has(&r, "CW0501", Level::Warning, "VirtualService default/shop");
    has(&r, "CW0502", Level::Error, "VirtualService default/shop");
    let m = r.messages.iter().find(|m| m.code == "CW0502").unwrap();
    assert!(
        m.message.contains("spec.http[0].route[0].destination.host"),
        "{}",
        m.message
    );
    assert!(m.message.contains("cart"), "{}", m.message);
    // Offline (files alone) there is no registry to compare with.
    s.live = false;
    assert!(
        run(&s)
            .messages
            .iter()
            .all(|m| m.code != "CW0501" && m.code != "CW0502")
    );
}

#[test]
fn undefined_and_empty_subsets() {
    let mut s = versioned();
    s.routes = routes(&GOOD_ROUTES.replace("subset: v2}}]", "subset: v3}}]"));
    let r = run(&s);
    has(&r, "CW0503", Level::Error, "VirtualService default/web");
    let m = r.messages.iter().find(|m| m.code == "CW0503").unwrap();
    assert!(
        m.message.contains("v3") && m.message.contains("DestinationRule default/web"),
        "{}",
        m.message
    );

    // A subset whose labels match no endpoint.
    let mut s = versioned();
    s.routes = routes(&GOOD_ROUTES.replace("labels: {version: v2}", "labels: {version: v9}"));
    let r = run(&s);
    has(&r, "CW0504", Level::Warning, "DestinationRule default/web");
    assert!(
        r.messages.iter().all(|m| m.code != "CW0503"),
        "{:#?}",
        r.messages
    );
}

#[test]
fn weights_not_summing_to_100() {
    let mut s = versioned();
    s.routes = routes(&GOOD_ROUTES.replace("weight: 10", "weight: 20"));
    let r = run(&s);
    has(&r, "CW0505", Level::Error, "VirtualService default/web");
    let m = r.messages.iter().find(|m| m.code == "CW0505").unwrap();
    assert!(
        m.message.contains("spec.http[1].route") && m.message.contains("110"),
        "{}",
        m.message
    );
    // Files alone: still found.
    s.live = false;
    has(
        &run(&s),
        "CW0505",
        Level::Error,
        "VirtualService default/web",
    );
}

#[test]
fn two_virtual_services_for_one_host_conflict() {
    let mut s = versioned();
    let mut rs = routes(GOOD_ROUTES);
    rs.extend(routes(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-canary, namespace: default}
spec:
  hosts: [web]
  http:
  - route: [{destination: {host: web, subset: v2}}]
"#,
    ));
    rs[2].seq = 5;
    s.routes = rs;
    let r = run(&s);
    has(
        &r,
        "CW0506",
        Level::Warning,
        "VirtualService default/web-canary",
    );
    assert_eq!(
        r.messages.iter().filter(|m| m.code == "CW0506").count(),
        1,
        "only the younger one is reported: {:#?}",
        r.messages
    );
}

#[test]
fn a_locality_setting_without_outlier_detection_is_reported() {
    let mut s = versioned();
    s.routes = routes(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy:
    loadBalancer:
      localityLbSetting: {failover: [{from: r1, to: r2}]}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer:
        localityLbSetting: {enabled: true}
      outlierDetection: {consecutive5xxErrors: 3}
"#,
    );
    let r = run(&s);
    has(&r, "CW0507", Level::Warning, "DestinationRule default/web");
    let m: Vec<_> = r.messages.iter().filter(|m| m.code == "CW0507").collect();
    assert_eq!(
        m.len(),
        1,
        "the subset has its own outlierDetection: {m:#?}"
    );
    assert!(
        m[0].message.contains("spec.trafficPolicy.loadBalancer"),
        "{m:#?}"
    );
    // With outlierDetection on the rule, nothing.
    s.routes = routes(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy:
    loadBalancer:
      localityLbSetting: {failover: [{from: r1, to: r2}]}
    outlierDetection: {consecutive5xxErrors: 3}
"#,
    );
    assert!(run(&s).messages.iter().all(|m| m.code != "CW0507"));
}
