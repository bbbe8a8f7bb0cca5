//! A mesh-sized set of AuthorizationPolicies for the issue-19 benchmarks
//! (`policy_push`, and the data-plane benchmark's `DATAPLANE_POLICIES` mode).
//!
//! `total` policies, `selecting` of them select one workload (the group `group` in
//! namespace `namespace`, by the implicit `causeway.io/group` label, a tenth from the
//! root namespace `causeway-system`), each ALLOWing `allowed` (a principal, Istio's form
//! without `spiffe://`) among other sources, so that workload still admits `allowed`
//! however many of them are evaluated. The rest select other workloads: a third in
//! `namespace` with a selector no workload has, the others in 100 other namespaces
//! without a selector. Rules vary (principals with wildcards, namespaces, ip blocks,
//! ports, conditions) like a real mesh's.

/// The policies as multi-document YAML.
pub fn yaml(total: usize, selecting: usize, namespace: &str, group: &str, allowed: &str) -> String {
    (0..total)
        .map(|i| one(i, i < selecting, namespace, group, allowed, 0))
        .collect()
}

/// Policy `i` of [`yaml`] as one YAML document; `revision` > 0 changes its rules (one more
/// principal), as an edit of that one policy would.
pub fn one(
    i: usize,
    selecting: bool,
    namespace: &str,
    group: &str,
    allowed: &str,
    revision: usize,
) -> String {
    let (ns, selector) = if selecting {
        let ns = if i.is_multiple_of(10) {
            "causeway-system".to_owned()
        } else {
            namespace.to_owned()
        };
        (
            ns,
            format!("  selector:\n    matchLabels: {{causeway.io/group: {group}}}\n"),
        )
    } else if i.is_multiple_of(3) {
        (
            namespace.to_owned(),
            format!("  selector:\n    matchLabels: {{app: other-{i}}}\n"),
        )
    } else {
        (format!("team-{}", i % 100), String::new())
    };
    let extra = if revision > 0 {
        format!(", \"causeway.local/ns/team-{i}/sa/rev-{revision}\"")
    } else {
        String::new()
    };
    let body = match (selecting, i % 3) {
        (true, 0) => format!(
            "  rules:\n  - from:\n    - source: {{principals: [\"causeway.local/ns/team-{i}/sa/client-{i}\", \"{allowed}\"{extra}]}}\n"
        ),
        (true, 1) => format!(
            "  rules:\n  - from:\n    - source: {{namespaces: [\"team-{i}\"]}}\n    - source: {{principals: [\"{allowed}\", \"causeway.local/ns/team-{i}/sa/batch*\"{extra}]}}\n  - from:\n    - source: {{ipBlocks: [\"172.{}.0.0/16\"]}}\n",
            16 + i % 16
        ),
        (true, _) => format!(
            "  rules:\n  - from:\n    - source: {{principals: [\"{allowed}\"{extra}]}}\n    when:\n    - key: source.namespace\n      notValues: [\"team-{i}\"]\n"
        ),
        (false, _) => format!(
            "  rules:\n  - from:\n    - source: {{principals: [\"causeway.local/ns/team-{i}/sa/client-{i}\", \"causeway.local/ns/team-{i}/sa/batch*\"{extra}]}}\n    - source: {{namespaces: [\"ns-{i}\"]}}\n    to:\n    - operation: {{ports: [\"8080\", \"9090\"]}}\n  - from:\n    - source: {{ipBlocks: [\"172.{}.0.0/16\"]}}\n",
            16 + i % 16
        ),
    };
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bench-p-{i}, namespace: {ns}}}\nspec:\n{selector}{body}"
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use causeway_api::policy::{PolicySet, Request, Resource, Workload, decode_documents};

    const CLIENT: &str = "causeway.local/ns/default/sa/client";

    /// The set decodes, `selecting` of it select the workload, and the workload admits the
    /// allowed principal and no other.
    #[test]
    fn the_set_decodes_and_selects_and_admits_as_described() {
        let docs = decode_documents("bench", &super::yaml(1_000, 50, "default", "web", CLIENT))
            .expect("the generated policies decode");
        assert_eq!(docs.len(), 1_000);
        let aps: Vec<_> = docs
            .iter()
            .filter_map(|r| match r {
                Resource::AuthorizationPolicy(ap) => Some(ap),
                _ => None,
            })
            .collect();
        let labels = BTreeMap::from([("causeway.io/group".to_owned(), "web".to_owned())]);
        let selected = PolicySet::new(aps.iter().copied()).for_workload(Workload {
            namespace: "default",
            labels: &labels,
        });
        assert_eq!(selected.len(), 50);
        let req = |principal| Request {
            principal: Some(principal),
            source_ip: "10.0.0.1".parse().unwrap(),
            remote_ip: None,
            destination_ip: "10.0.0.2".parse().unwrap(),
            destination_port: 8080,
            sni: None,
            http: None,
        };
        assert!(selected.decide(&req(CLIENT)).allow);
        assert!(
            !selected
                .decide(&req("causeway.local/ns/default/sa/other"))
                .allow
        );
        let changed =
            decode_documents("bench", &super::one(0, true, "default", "web", CLIENT, 1)).unwrap();
        assert_ne!(changed[0], docs[0]);
        assert_eq!(changed[0].metadata().name, docs[0].metadata().name);
    }
}
