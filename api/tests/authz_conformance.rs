//! Conformance of the evaluator with Istio's documented AuthorizationPolicy semantics.
//!
//! Each case is a policy set (YAML as users write it), a request at the destination workload
//! `httpbin` (namespace `foo`, labels `app: httpbin`, `version: v1`) and the decision Istio's
//! documentation gives (security concepts "Authorization policy", the reference of
//! AuthorizationPolicy, and the TCP, deny and ingress tasks).

use std::collections::BTreeMap;
use std::net::IpAddr;

use causeway_api::policy::authz::WorkloadPolicies;
use causeway_api::policy::validate::validate;
use causeway_api::policy::{
    HttpAttributes, PolicySet, Request, Resource, Workload, decode_documents,
};

const SLEEP: &str = "causeway.local/ns/foo/sa/sleep";
const OTHER_NS: &str = "causeway.local/ns/bar/sa/client";

fn policies(yaml: &str) -> PolicySet {
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

fn labels() -> BTreeMap<String, String> {
    [
        ("app", "httpbin"),
        ("version", "v1"),
        ("causeway.io/group", "httpbin"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn selected(set: &PolicySet, ns: &str) -> WorkloadPolicies {
    let labels = labels();
    set.for_workload(Workload {
        namespace: ns,
        labels: &labels,
    })
}

struct Req {
    principal: Option<&'static str>,
    ip: &'static str,
    port: u16,
    http: Option<(&'static str, &'static str, &'static str)>,
    headers: Vec<(String, String)>,
    request_principal: Option<&'static str>,
}

fn tcp(principal: Option<&'static str>, ip: &'static str, port: u16) -> Req {
    Req {
        principal,
        ip,
        port,
        http: None,
        headers: Vec::new(),
        request_principal: None,
    }
}

fn http(principal: Option<&'static str>, method: &'static str, path: &'static str) -> Req {
    Req {
        principal,
        ip: "10.0.0.5",
        port: 8000,
        http: Some(("httpbin.foo:8000", method, path)),
        headers: Vec::new(),
        request_principal: None,
    }
}

fn decide(set: &PolicySet, r: &Req) -> (bool, Option<String>) {
    decide_in(set, "foo", r)
}

fn decide_in(set: &PolicySet, ns: &str, r: &Req) -> (bool, Option<String>) {
    let w = selected(set, ns);
    let req = Request {
        principal: r.principal,
        source_ip: r.ip.parse::<IpAddr>().unwrap(),
        remote_ip: None,
        destination_ip: "10.0.0.9".parse().unwrap(),
        destination_port: r.port,
        sni: None,
        http: r.http.map(|(host, method, path)| HttpAttributes {
            host,
            method,
            path,
            headers: &r.headers,
            request_principal: r.request_principal,
            claims: None,
        }),
    };
    let v = w.decide(&req);
    let explained = w.explain(&req);
    assert_eq!(
        explained.decision == "allow",
        v.allow,
        "decide and explain disagree"
    );
    assert_eq!(explained.policy, v.policy.map(|p| p.id()));
    (v.allow, v.policy.map(|p| p.id()))
}

fn ap(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n"
    )
}

const ALLOW: (bool, Option<&str>) = (true, None);

fn expect(got: (bool, Option<String>), allow: bool, policy: Option<&str>, case: &str) {
    assert_eq!((got.0, got.1.as_deref()), (allow, policy), "case: {case}");
}

#[test]
fn no_policy_allows_everything() {
    let set = policies("");
    assert_eq!(decide(&set, &tcp(None, "10.0.0.5", 80)).0, ALLOW.0);
    assert_eq!(decide(&set, &http(Some(SLEEP), "GET", "/")).0, ALLOW.0);
}

#[test]
fn allow_nothing_spec_empty_denies_everything() {
    // Istio: `spec: {}` is "allow-nothing": an ALLOW policy with no rules matches nothing.
    let set = policies(&ap("allow-nothing", "foo", "  {}"));
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 80)),
        false,
        None,
        "tcp",
    );
    expect(
        decide(&set, &http(Some(SLEEP), "GET", "/")),
        false,
        None,
        "http",
    );
}

#[test]
fn allow_all_with_empty_rule() {
    let set = policies(&ap("allow-all", "foo", "  rules:\n  - {}"));
    expect(
        decide(&set, &tcp(None, "10.0.0.5", 80)),
        true,
        Some("foo/allow-all"),
        "",
    );
}

#[test]
fn deny_all_with_empty_rule() {
    let set = policies(&ap("deny-all", "foo", "  action: DENY\n  rules:\n  - {}"));
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 80)),
        false,
        Some("foo/deny-all"),
        "",
    );
}

#[test]
fn deny_without_rules_denies_nothing() {
    let set = policies(&ap("deny-none", "foo", "  action: DENY"));
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 80)),
        true,
        None,
        "",
    );
}

#[test]
fn deny_takes_precedence_over_allow() {
    let set = policies(&format!(
        "{}{}",
        ap("allow-all", "foo", "  rules:\n  - {}"),
        ap(
            "deny-sleep",
            "foo",
            &format!(
                "  action: DENY\n  rules:\n  - from:\n    - source: {{principals: [\"{SLEEP}\"]}}"
            )
        )
    ));
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 80)),
        false,
        Some("foo/deny-sleep"),
        "sleep",
    );
    expect(
        decide(&set, &tcp(Some(OTHER_NS), "10.0.0.5", 80)),
        true,
        Some("foo/allow-all"),
        "other",
    );
}

#[test]
fn allow_by_principal_denies_others_and_plaintext() {
    let set = policies(&ap(
        "allow-sleep",
        "foo",
        &format!("  rules:\n  - from:\n    - source: {{principals: [\"{SLEEP}\"]}}"),
    ));
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 80)),
        true,
        Some("foo/allow-sleep"),
        "sleep",
    );
    expect(
        decide(&set, &tcp(Some(OTHER_NS), "10.0.0.5", 80)),
        false,
        None,
        "other",
    );
    expect(
        decide(&set, &tcp(None, "10.0.0.5", 80)),
        false,
        None,
        "plaintext",
    );
}

#[test]
fn principal_spiffe_prefix_is_accepted() {
    let set = policies(&ap(
        "p",
        "foo",
        "  rules:\n  - from:\n    - source: {principals: [\"spiffe://causeway.local/ns/foo/sa/sleep\"]}",
    ));
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 80)),
        true,
        Some("foo/p"),
        "",
    );
}

#[test]
fn principal_star_means_any_authenticated() {
    let set = policies(&ap(
        "authn",
        "foo",
        "  rules:\n  - from:\n    - source: {principals: [\"*\"]}",
    ));
    expect(
        decide(&set, &tcp(Some(OTHER_NS), "10.0.0.5", 80)),
        true,
        Some("foo/authn"),
        "mtls",
    );
    expect(
        decide(&set, &tcp(None, "10.0.0.5", 80)),
        false,
        None,
        "plaintext",
    );
}

#[test]
fn not_principals_star_matches_plaintext_only() {
    let set = policies(&ap(
        "deny-plain",
        "foo",
        "  action: DENY\n  rules:\n  - from:\n    - source: {notPrincipals: [\"*\"]}",
    ));
    expect(
        decide(&set, &tcp(None, "10.0.0.5", 80)),
        false,
        Some("foo/deny-plain"),
        "plaintext",
    );
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 80)),
        true,
        None,
        "mtls",
    );
}

#[test]
fn principal_prefix_and_suffix_wildcards() {
    let set = policies(&ap(
        "p",
        "foo",
        "  rules:\n  - from:\n    - source: {principals: [\"causeway.local/ns/foo/*\", \"*/sa/client\"]}",
    ));
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 80)),
        true,
        Some("foo/p"),
        "prefix",
    );
    expect(
        decide(&set, &tcp(Some(OTHER_NS), "10.0.0.5", 80)),
        true,
        Some("foo/p"),
        "suffix",
    );
    expect(
        decide(
            &set,
            &tcp(Some("causeway.local/ns/baz/sa/x"), "10.0.0.5", 80),
        ),
        false,
        None,
        "neither",
    );
}

#[test]
fn namespaces_and_not_namespaces() {
    let set = policies(&ap(
        "ns",
        "foo",
        "  rules:\n  - from:\n    - source: {namespaces: [\"foo\"]}",
    ));
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 80)),
        true,
        Some("foo/ns"),
        "same",
    );
    expect(
        decide(&set, &tcp(Some(OTHER_NS), "10.0.0.5", 80)),
        false,
        None,
        "other",
    );
    expect(
        decide(&set, &tcp(None, "10.0.0.5", 80)),
        false,
        None,
        "plaintext has no namespace",
    );
    let set = policies(&ap(
        "notns",
        "foo",
        "  action: DENY\n  rules:\n  - from:\n    - source: {notNamespaces: [\"foo\"]}",
    ));
    expect(
        decide(&set, &tcp(Some(OTHER_NS), "10.0.0.5", 80)),
        false,
        Some("foo/notns"),
        "other denied",
    );
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 80)),
        true,
        None,
        "same allowed",
    );
    expect(
        decide(&set, &tcp(None, "10.0.0.5", 80)),
        false,
        Some("foo/notns"),
        "plaintext is not in foo",
    );
}

#[test]
fn ip_blocks_admit_plaintext() {
    let set = policies(&ap(
        "ip",
        "foo",
        "  rules:\n  - from:\n    - source: {ipBlocks: [\"192.168.1.0/24\", \"10.9.9.9\"]}",
    ));
    expect(
        decide(&set, &tcp(None, "192.168.1.7", 80)),
        true,
        Some("foo/ip"),
        "cidr",
    );
    expect(
        decide(&set, &tcp(None, "10.9.9.9", 80)),
        true,
        Some("foo/ip"),
        "single",
    );
    expect(
        decide(&set, &tcp(None, "10.9.9.8", 80)),
        false,
        None,
        "outside",
    );
}

#[test]
fn ip_blocks_match_ipv4_mapped_ipv6_sources_and_host_bits_are_ignored() {
    // A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d; the block still applies.
    // A block written with host bits set (192.168.1.9/24) means its network.
    let set = policies(&ap(
        "ip",
        "foo",
        "  rules:\n  - from:\n    - source: {ipBlocks: [\"192.168.1.9/24\", \"fd00::/64\"]}",
    ));
    for (ip, allow, case) in [
        ("::ffff:192.168.1.7", true, "mapped inside"),
        ("::ffff:192.168.2.7", false, "mapped outside"),
        ("192.168.1.200", true, "host bits"),
        ("fd00::1234", true, "v6 inside"),
        ("fd00:0:0:1::1", false, "v6 outside"),
    ] {
        let got = decide(&set, &tcp(None, ip, 80));
        expect(got, allow, allow.then_some("foo/ip"), case);
    }
}

#[test]
fn not_ip_blocks() {
    let set = policies(&ap(
        "ip",
        "foo",
        "  action: DENY\n  rules:\n  - from:\n    - source: {notIpBlocks: [\"10.0.0.0/8\"]}",
    ));
    expect(
        decide(&set, &tcp(None, "192.168.1.7", 80)),
        false,
        Some("foo/ip"),
        "outside denied",
    );
    expect(
        decide(&set, &tcp(None, "10.1.1.1", 80)),
        true,
        None,
        "inside allowed",
    );
}

#[test]
fn remote_ip_blocks_default_to_the_peer_address() {
    let set = policies(&ap(
        "rip",
        "foo",
        "  rules:\n  - from:\n    - source: {remoteIpBlocks: [\"10.1.0.0/16\"]}",
    ));
    expect(
        decide(&set, &tcp(None, "10.1.2.3", 80)),
        true,
        Some("foo/rip"),
        "",
    );
    expect(decide(&set, &tcp(None, "10.2.2.3", 80)), false, None, "");
}

#[test]
fn fields_in_one_source_are_anded_entries_are_ored() {
    let set = policies(&ap(
        "and",
        "foo",
        &format!(
            "  rules:\n  - from:\n    - source: {{principals: [\"{SLEEP}\"], ipBlocks: [\"10.0.0.0/24\"]}}"
        ),
    ));
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 80)),
        true,
        Some("foo/and"),
        "both",
    );
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.1.5", 80)),
        false,
        None,
        "ip fails",
    );
    let set = policies(&ap(
        "or",
        "foo",
        &format!(
            "  rules:\n  - from:\n    - source: {{principals: [\"{SLEEP}\"]}}\n    - source: {{ipBlocks: [\"10.0.1.0/24\"]}}"
        ),
    ));
    expect(
        decide(&set, &tcp(None, "10.0.1.5", 80)),
        true,
        Some("foo/or"),
        "second entry",
    );
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.7.0.5", 80)),
        true,
        Some("foo/or"),
        "first entry",
    );
}

#[test]
fn from_to_and_when_are_anded() {
    let set = policies(&ap(
        "r",
        "foo",
        &format!(
            "  rules:\n  - from:\n    - source: {{principals: [\"{SLEEP}\"]}}\n    to:\n    - operation: {{ports: [\"80\"]}}\n    when:\n    - key: source.ip\n      values: [\"10.0.0.0/24\"]"
        ),
    ));
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 80)),
        true,
        Some("foo/r"),
        "all",
    );
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 81)),
        false,
        None,
        "port",
    );
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.9.5", 80)),
        false,
        None,
        "when",
    );
}

#[test]
fn rules_are_ored() {
    let set = policies(&ap(
        "r",
        "foo",
        "  rules:\n  - to:\n    - operation: {ports: [\"80\"]}\n  - to:\n    - operation: {ports: [\"443\"]}",
    ));
    expect(
        decide(&set, &tcp(None, "10.0.0.5", 443)),
        true,
        Some("foo/r"),
        "",
    );
    expect(decide(&set, &tcp(None, "10.0.0.5", 22)), false, None, "");
}

#[test]
fn ports_and_not_ports() {
    let set = policies(&ap(
        "np",
        "foo",
        "  rules:\n  - to:\n    - operation: {notPorts: [\"22\"]}",
    ));
    expect(
        decide(&set, &tcp(None, "10.0.0.5", 80)),
        true,
        Some("foo/np"),
        "",
    );
    expect(decide(&set, &tcp(None, "10.0.0.5", 22)), false, None, "");
}

#[test]
fn http_fields_in_allow_never_match_on_tcp() {
    // Istio TCP task: an ALLOW policy with methods on a TCP port matches nothing, so the
    // workload (which has an ALLOW policy) refuses all TCP traffic.
    let set = policies(&ap(
        "get",
        "foo",
        "  rules:\n  - to:\n    - operation: {methods: [\"GET\"], ports: [\"9000\"]}",
    ));
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 9000)),
        false,
        None,
        "tcp",
    );
    let mut r = http(Some(SLEEP), "GET", "/");
    r.port = 9000;
    expect(decide(&set, &r), true, Some("foo/get"), "http");
}

#[test]
fn http_fields_in_deny_are_dropped_on_tcp() {
    // Istio TCP task: a DENY policy with methods on a TCP port is applied without them, so it
    // denies all TCP traffic on that port.
    let set = policies(&ap(
        "deny-get",
        "foo",
        "  action: DENY\n  rules:\n  - to:\n    - operation: {methods: [\"GET\"], ports: [\"9000\"]}",
    ));
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 9000)),
        false,
        Some("foo/deny-get"),
        "port matches",
    );
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 9001)),
        true,
        None,
        "other port",
    );
    let mut r = http(Some(SLEEP), "POST", "/");
    r.port = 9000;
    expect(decide(&set, &r), true, None, "http POST");
}

#[test]
fn http_when_condition_dropped_for_deny_on_tcp() {
    let set = policies(&ap(
        "deny-hdr",
        "foo",
        "  action: DENY\n  rules:\n  - when:\n    - key: request.headers[x-token]\n      values: [\"bad\"]",
    ));
    expect(
        decide(&set, &tcp(None, "10.0.0.5", 80)),
        false,
        Some("foo/deny-hdr"),
        "",
    );
}

#[test]
fn methods_paths_hosts() {
    let set = policies(&ap(
        "m",
        "foo",
        "  rules:\n  - to:\n    - operation: {methods: [\"GET\", \"HEAD\"], paths: [\"/info*\", \"*.png\", \"/exact\"], hosts: [\"httpbin.foo*\"]}",
    ));
    expect(
        decide(&set, &http(None, "GET", "/info/x")),
        true,
        Some("foo/m"),
        "prefix",
    );
    expect(
        decide(&set, &http(None, "HEAD", "/a/b.png")),
        true,
        Some("foo/m"),
        "suffix",
    );
    expect(
        decide(&set, &http(None, "GET", "/exact")),
        true,
        Some("foo/m"),
        "exact",
    );
    expect(
        decide(&set, &http(None, "GET", "/exact/no")),
        false,
        None,
        "exact only",
    );
    expect(
        decide(&set, &http(None, "POST", "/info")),
        false,
        None,
        "method",
    );
}

#[test]
fn hosts_are_case_insensitive_and_port_is_ignored() {
    let set = policies(&ap(
        "h",
        "foo",
        "  rules:\n  - to:\n    - operation: {hosts: [\"HTTPBIN.foo\"]}",
    ));
    expect(
        decide(&set, &http(None, "GET", "/")),
        true,
        Some("foo/h"),
        "",
    );
}

#[test]
fn not_paths_and_not_methods() {
    let set = policies(&ap(
        "n",
        "foo",
        "  rules:\n  - to:\n    - operation: {notPaths: [\"/admin*\"], notMethods: [\"DELETE\"]}",
    ));
    expect(
        decide(&set, &http(None, "GET", "/ok")),
        true,
        Some("foo/n"),
        "",
    );
    expect(
        decide(&set, &http(None, "GET", "/admin/x")),
        false,
        None,
        "",
    );
    expect(decide(&set, &http(None, "DELETE", "/ok")), false, None, "");
}

#[test]
fn path_templates() {
    let set = policies(&ap(
        "t",
        "foo",
        "  rules:\n  - to:\n    - operation: {paths: [\"/store/{*}/items/{**}\"]}",
    ));
    expect(
        decide(&set, &http(None, "GET", "/store/a/items/b/c")),
        true,
        Some("foo/t"),
        "",
    );
    expect(
        decide(&set, &http(None, "GET", "/store/a/b/items/c")),
        false,
        None,
        "",
    );
    expect(
        decide(&set, &http(None, "GET", "/store/a/items/")),
        false,
        None,
        "",
    );
}

#[test]
fn header_conditions_values_and_not_values() {
    let set = policies(&ap(
        "hdr",
        "foo",
        "  rules:\n  - when:\n    - key: request.headers[X-User]\n      values: [\"alice\", \"bob*\"]\n      notValues: [\"bobby\"]",
    ));
    let mut r = http(None, "GET", "/");
    r.headers = vec![("x-user".into(), "alice".into())];
    expect(decide(&set, &r), true, Some("foo/hdr"), "alice");
    r.headers = vec![("x-user".into(), "bobby".into())];
    expect(decide(&set, &r), false, None, "bobby");
    r.headers = vec![("x-user".into(), "bob2".into())];
    expect(decide(&set, &r), true, Some("foo/hdr"), "bob2");
    r.headers = Vec::new();
    expect(decide(&set, &r), false, None, "absent");
}

#[test]
fn when_source_namespace_and_principal_and_destination_port() {
    let set = policies(&ap(
        "w",
        "foo",
        "  rules:\n  - when:\n    - key: source.namespace\n      values: [\"bar\"]\n    - key: source.principal\n      values: [\"*/sa/client\"]\n    - key: destination.port\n      notValues: [\"22\"]",
    ));
    expect(
        decide(&set, &tcp(Some(OTHER_NS), "10.0.0.5", 80)),
        true,
        Some("foo/w"),
        "",
    );
    expect(
        decide(&set, &tcp(Some(OTHER_NS), "10.0.0.5", 22)),
        false,
        None,
        "",
    );
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 80)),
        false,
        None,
        "",
    );
}

#[test]
fn when_destination_ip() {
    let set = policies(&ap(
        "d",
        "foo",
        "  action: DENY\n  rules:\n  - when:\n    - key: destination.ip\n      values: [\"10.0.0.0/24\"]",
    ));
    expect(
        decide(&set, &tcp(None, "1.1.1.1", 80)),
        false,
        Some("foo/d"),
        "",
    );
}

#[test]
fn request_principals_match_only_with_a_jwt() {
    let set = policies(&ap(
        "jwt",
        "foo",
        "  rules:\n  - from:\n    - source: {requestPrincipals: [\"*\"]}",
    ));
    let mut r = http(None, "GET", "/");
    expect(decide(&set, &r), false, None, "no token");
    r.request_principal = Some("https://issuer/alice");
    expect(decide(&set, &r), true, Some("foo/jwt"), "token");
    expect(decide(&set, &tcp(None, "10.0.0.5", 80)), false, None, "tcp");
}

#[test]
fn selector_scopes_the_policy() {
    let set = policies(&ap(
        "other-app",
        "foo",
        "  selector:\n    matchLabels: {app: productpage}\n  rules: []",
    ));
    expect(
        decide(&set, &tcp(None, "10.0.0.5", 80)),
        true,
        None,
        "not selected",
    );
    let set = policies(&ap(
        "this-app",
        "foo",
        "  selector:\n    matchLabels: {app: httpbin, version: v1}",
    ));
    expect(
        decide(&set, &tcp(None, "10.0.0.5", 80)),
        false,
        None,
        "selected, allow-nothing",
    );
    let set = policies(&ap(
        "by-group",
        "foo",
        "  selector:\n    matchLabels: {causeway.io/group: httpbin}\n  action: DENY\n  rules: [{}]",
    ));
    expect(
        decide(&set, &tcp(None, "10.0.0.5", 80)),
        false,
        Some("foo/by-group"),
        "implicit group label",
    );
}

#[test]
fn other_namespace_policy_does_not_apply() {
    let set = policies(&ap("deny-all", "bar", "  action: DENY\n  rules: [{}]"));
    expect(decide(&set, &tcp(None, "10.0.0.5", 80)), true, None, "");
}

#[test]
fn root_namespace_policy_applies_mesh_wide() {
    let set = policies(&ap(
        "mesh-deny",
        "causeway-system",
        "  action: DENY\n  rules:\n  - from:\n    - source: {notPrincipals: [\"*\"]}",
    ));
    expect(
        decide(&set, &tcp(None, "10.0.0.5", 80)),
        false,
        Some("causeway-system/mesh-deny"),
        "foo",
    );
    expect(
        decide_in(&set, "bar", &tcp(None, "10.0.0.5", 80)),
        false,
        Some("causeway-system/mesh-deny"),
        "bar",
    );
}

#[test]
fn root_namespace_with_selector_applies_across_namespaces() {
    let set = policies(&ap(
        "mesh-sel",
        "causeway-system",
        "  selector:\n    matchLabels: {app: httpbin}\n  action: DENY\n  rules: [{}]",
    ));
    expect(
        decide_in(&set, "bar", &tcp(None, "10.0.0.5", 80)),
        false,
        Some("causeway-system/mesh-sel"),
        "",
    );
}

#[test]
fn root_namespace_allow_and_namespace_allow_combine() {
    let set = policies(&format!(
        "{}{}",
        ap(
            "mesh-allow",
            "causeway-system",
            &format!("  rules:\n  - from:\n    - source: {{principals: [\"{SLEEP}\"]}}")
        ),
        ap(
            "ns-allow",
            "foo",
            "  rules:\n  - from:\n    - source: {ipBlocks: [\"192.168.0.0/16\"]}"
        )
    ));
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 80)),
        true,
        Some("causeway-system/mesh-allow"),
        "",
    );
    expect(
        decide(&set, &tcp(None, "192.168.3.3", 80)),
        true,
        Some("foo/ns-allow"),
        "",
    );
    expect(decide(&set, &tcp(None, "10.0.0.5", 80)), false, None, "");
}

#[test]
fn audit_does_not_change_the_decision() {
    let set = policies(&ap("audit", "foo", "  action: AUDIT\n  rules: [{}]"));
    let w = selected(&set, "foo");
    let labels = labels();
    let _ = labels;
    let req = Request {
        principal: None,
        source_ip: "10.0.0.5".parse().unwrap(),
        remote_ip: None,
        destination_ip: "10.0.0.9".parse().unwrap(),
        destination_port: 80,
        sni: None,
        http: None,
    };
    let v = w.decide(&req);
    assert!(v.allow);
    assert_eq!(v.audit.map(|p| p.id()).as_deref(), Some("foo/audit"));
}

#[test]
fn service_accounts_field() {
    let set = policies(&ap(
        "sa",
        "foo",
        "  rules:\n  - from:\n    - source: {serviceAccounts: [\"sleep\", \"bar/client\"]}",
    ));
    expect(
        decide(&set, &tcp(Some(SLEEP), "10.0.0.5", 80)),
        true,
        Some("foo/sa"),
        "same ns short form",
    );
    expect(
        decide(&set, &tcp(Some(OTHER_NS), "10.0.0.5", 80)),
        true,
        Some("foo/sa"),
        "ns/sa form",
    );
    expect(
        decide(
            &set,
            &tcp(Some("causeway.local/ns/bar/sa/sleep"), "10.0.0.5", 80),
        ),
        false,
        None,
        "",
    );
}

#[test]
fn first_deny_in_name_order_is_reported() {
    let set = policies(&format!(
        "{}{}",
        ap("b-deny", "foo", "  action: DENY\n  rules: [{}]"),
        ap("a-deny", "foo", "  action: DENY\n  rules: [{}]")
    ));
    expect(
        decide(&set, &tcp(None, "10.0.0.5", 80)),
        false,
        Some("foo/a-deny"),
        "",
    );
}

#[test]
fn explain_names_each_policy_and_the_first_reason() {
    let set = policies(&format!(
        "{}{}",
        ap(
            "allow-sleep",
            "foo",
            &format!("  rules:\n  - from:\n    - source: {{principals: [\"{SLEEP}\"]}}")
        ),
        ap(
            "deny-ssh",
            "foo",
            "  action: DENY\n  rules:\n  - to:\n    - operation: {ports: [\"22\"]}"
        )
    ));
    let w = selected(&set, "foo");
    let req = Request {
        principal: Some(OTHER_NS),
        source_ip: "10.0.0.5".parse().unwrap(),
        remote_ip: None,
        destination_ip: "10.0.0.9".parse().unwrap(),
        destination_port: 80,
        sni: None,
        http: None,
    };
    let d = w.explain(&req);
    assert_eq!(d.decision, "deny");
    assert_eq!(d.policy, None);
    assert_eq!(d.steps.len(), 2);
    assert_eq!(d.steps[0].policy, "foo/deny-ssh");
    assert_eq!(d.steps[0].reason, "operation ports did not match");
    assert_eq!(d.steps[1].reason, "source principals did not match");
    assert!(d.reason.contains("none matched"), "{}", d.reason);
}
