//! The decision's fast path (integer guards on ports, namespaces and addresses checked
//! before any string) decides exactly as the explained path, which checks every field:
//! edge cases of the guards with their expected decisions, then a cross product of policies
//! and requests where `decide` and `explain` must agree.

use std::collections::BTreeMap;
use std::net::IpAddr;

use causeway_api::policy::validate::validate;
use causeway_api::policy::{PolicySet, Request, Resource, Workload, decode_documents};

fn set(yaml: &str) -> PolicySet {
    let docs = decode_documents("case.yaml", yaml).unwrap_or_else(|e| panic!("{e:?}"));
    for d in &docs {
        let problems = validate(d);
        assert!(problems.is_empty(), "{}: {problems:?}", d.display_name());
    }
    let aps: Vec<_> = docs
        .iter()
        .filter_map(|d| match d {
            Resource::AuthorizationPolicy(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    PolicySet::new(aps.iter())
}

fn ap(name: &str, action: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  action: {action}\n  rules:\n{rules}\n"
    )
}

/// (allowed, deciding policy) for `principal` at `ip` to `port`, after checking that
/// `decide` and `explain` agree.
fn decide(set: &PolicySet, principal: Option<&str>, ip: &str, port: u16) -> (bool, Option<String>) {
    let labels: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
    let w = set.for_workload(Workload {
        namespace: "shop",
        labels: &labels,
    });
    let req = Request {
        principal,
        source_ip: ip.parse::<IpAddr>().unwrap(),
        remote_ip: None,
        destination_ip: "10.0.0.9".parse().unwrap(),
        destination_port: port,
        sni: None,
        http: None,
    };
    let v = w.decide(&req);
    let e = w.explain(&req);
    assert_eq!(
        (e.decision == "allow", e.policy.clone()),
        (v.allow, v.policy.map(|p| p.id())),
        "decide and explain disagree on {principal:?} {ip}:{port}: {e:?}"
    );
    (v.allow, v.policy.map(|p| p.id()))
}

#[test]
fn guards_never_refuse_what_the_full_check_admits() {
    // A principal whose `spiffe://` form has another namespace first: the exact value
    // still matches (its namespace guard is taken from the principal as written).
    let s = set(&ap(
        "odd",
        "ALLOW",
        "  - from:\n    - source: {principals: [\"ns/a/ns/b/sa/c\"]}",
    ));
    assert!(decide(&s, Some("spiffe://ns/a/ns/b/sa/c"), "10.0.0.1", 80).0);
    assert!(decide(&s, Some("ns/a/ns/b/sa/c"), "10.0.0.1", 80).0);
    assert!(!decide(&s, Some("spiffe://ns/a/ns/x/sa/c"), "10.0.0.1", 80).0);

    // Prefixes past the namespace fix it; shorter ones do not.
    let s = set(&format!(
        "{}{}",
        ap(
            "fixed",
            "ALLOW",
            "  - from:\n    - source: {principals: [\"causeway.local/ns/shop/sa/*\"]}"
        ),
        ap(
            "open",
            "ALLOW",
            "  - from:\n    - source: {principals: [\"causeway.local/ns/te*\"]}"
        )
    ));
    let web = "spiffe://causeway.local/ns/shop/sa/web";
    assert_eq!(
        decide(&s, Some(web), "10.0.0.1", 80),
        (true, Some("shop/fixed".into()))
    );
    assert!(
        !decide(
            &s,
            Some("spiffe://causeway.local/ns/shopx/sa/web"),
            "10.0.0.1",
            80
        )
        .0
    );
    assert_eq!(
        decide(&s, Some("causeway.local/ns/team-1/sa/x"), "10.0.0.1", 80),
        (true, Some("shop/open".into()))
    );
    assert!(
        !decide(&s, None, "10.0.0.1", 80).0,
        "plaintext has no principal"
    );

    // Namespaces, address blocks (an IPv4-mapped source counts as IPv4), ports.
    let s = set(&format!(
        "{}{}{}",
        ap(
            "by-ns",
            "ALLOW",
            "  - from:\n    - source: {namespaces: [\"shop\", \"ops\"]}"
        ),
        ap(
            "by-ip",
            "ALLOW",
            "  - from:\n    - source: {ipBlocks: [\"192.0.2.0/24\"]}\n    to:\n    - operation: {ports: [\"80\"]}\n    - operation: {ports: [\"443\"]}"
        ),
        ap(
            "deny-port",
            "DENY",
            "  - to:\n    - operation: {ports: [\"22\"]}\n    - operation: {methods: [\"GET\"]}\n    from:\n    - source: {remoteIpBlocks: [\"198.51.100.0/24\"]}"
        )
    ));
    assert!(decide(&s, Some("spiffe://td/ns/ops/sa/x"), "10.0.0.1", 80).0);
    assert!(!decide(&s, Some("spiffe://td/ns/dev/sa/x"), "10.0.0.1", 80).0);
    assert_eq!(
        decide(&s, None, "192.0.2.7", 443),
        (true, Some("shop/by-ip".into()))
    );
    assert!(decide(&s, None, "::ffff:192.0.2.7", 80).0);
    assert!(!decide(&s, None, "192.0.2.7", 8080).0);
    // DENY on TCP: the `methods` entry is applied without its HTTP field, so it matches
    // every port (no port guard may hide it).
    assert_eq!(
        decide(&s, None, "198.51.100.3", 8080),
        (false, Some("shop/deny-port".into()))
    );
}

#[test]
fn decide_agrees_with_explain_across_policies_and_requests() {
    let rules = [
        "  - from:\n    - source: {principals: [\"causeway.local/ns/shop/sa/web\", \"causeway.local/ns/ops/sa/b*\"]}\n    - source: {namespaces: [\"dev\"]}\n    to:\n    - operation: {ports: [\"8080\", \"9090\"]}",
        "  - from:\n    - source: {ipBlocks: [\"10.1.0.0/16\"], notPrincipals: [\"*/sa/bad\"]}",
        "  - from:\n    - source: {notNamespaces: [\"shop\"]}\n    to:\n    - operation: {notPorts: [\"22\"]}",
        "  - from:\n    - source: {principals: [\"*\"]}\n    when:\n    - key: source.ip\n      values: [\"10.2.0.0/16\"]",
        "  - from:\n    - source: {principals: [\"causeway.local/ns/ops/*\"], remoteIpBlocks: [\"10.0.0.0/8\"]}",
        "  - to:\n    - operation: {ports: [\"22\"]}",
        "  - {}",
    ];
    let principals = [
        None,
        Some("spiffe://causeway.local/ns/shop/sa/web"),
        Some("spiffe://causeway.local/ns/ops/sa/batch-1"),
        Some("causeway.local/ns/dev/sa/x"),
        Some("spiffe://causeway.local/ns/ops/sa/bad"),
        Some("spiffe://other/sa/none"),
    ];
    let ips = ["10.1.2.3", "10.2.0.9", "192.0.2.1", "::ffff:10.1.0.1"];
    let ports = [22u16, 8080, 9090, 443];
    let mut decided = 0;
    for (i, a) in rules.iter().enumerate() {
        for (j, b) in rules.iter().enumerate() {
            for (action_a, action_b) in [("ALLOW", "ALLOW"), ("DENY", "ALLOW"), ("ALLOW", "DENY")] {
                let s = set(&format!(
                    "{}{}",
                    ap(&format!("a{i}"), action_a, a),
                    ap(&format!("b{j}"), action_b, b)
                ));
                for p in principals {
                    for ip in ips {
                        for port in ports {
                            decide(&s, p, ip, port);
                            decided += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(decided, 7 * 7 * 3 * 6 * 4 * 4);
}

#[test]
fn more_rules_than_the_index_holds_are_walked_with_the_same_result() {
    let rules: String = (0..1100)
        .map(|i| {
            format!(
                "  - from:\n    - source: {{ipBlocks: [\"10.{}.{}.0/24\"]}}\n",
                i / 256,
                i % 256
            )
        })
        .collect();
    let s = set(&format!(
        "{}{}",
        ap("many", "ALLOW", rules.trim_end()),
        ap(
            "deny-one",
            "DENY",
            "  - from:\n    - source: {ipBlocks: [\"10.4.1.0/24\"]}"
        )
    ));
    assert_eq!(
        decide(&s, None, "10.4.0.9", 80),
        (true, Some("shop/many".into()))
    );
    assert_eq!(
        decide(&s, None, "10.4.1.9", 80),
        (false, Some("shop/deny-one".into()))
    );
    assert_eq!(decide(&s, None, "10.9.0.1", 80), (false, None));
}
