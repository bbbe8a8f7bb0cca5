//! Authorization at the destination agent.
//!
//! [`LocalAuthz`] is built from the applied mesh state whenever it changes (not per
//! connection): the AuthorizationPolicies that select this agent's workload (its namespace,
//! its group's labels and the implicit `causeway.io/group` label), compiled, and the
//! PeerAuthentications. [`LocalAuthz::decide`] then decides one accepted stream or
//! connection with the shared evaluator ([`causeway_api::policy`]), without allocating.
//! Decisions are counted per decision and policy for `causeway_agent_authz_decisions_total`
//! ([`decisions`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};

use causeway_api::policy::authz::WorkloadPolicies;
use causeway_api::policy::{
    GROUP_LABEL, HttpAttributes, JwtRule, PeerAuthentication, PeerMode, PolicySet, Request,
    Resource, Workload, effective_mode,
};
use causeway_api::push::MeshState;

/// The AuthorizationPolicies that apply to this agent's workload.
#[derive(Debug, Default)]
pub struct LocalAuthz {
    labels: BTreeMap<String, String>,
    selected: WorkloadPolicies,
    /// The `jwtRules` of the RequestAuthentications that select this workload, in key
    /// order (checked on the request path of HTTP ports).
    jwt_rules: Vec<JwtRule>,
    /// The identity of `jwt_rules` for the verified-token cache ([`crate::jwks::rules_id`]).
    jwt_rules_id: u64,
    /// Lower-case names of the headers AuthorizationPolicy conditions read
    /// (`request.headers[...]`): only those are handed to the evaluator per request.
    header_names: Vec<String>,
    /// The policy resources it was built from (to rebuild only when they change).
    source: BTreeMap<String, causeway_api::push::PolicyState>,
}

/// The namespace of a SPIFFE ID (`spiffe://td/ns/NS/sa/SA`), `default` if it has none.
fn workload_namespace(spiffe_id: &str) -> &str {
    spiffe_id
        .find("/ns/")
        .map(|i| &spiffe_id[i + 4..])
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("default")
}

/// The labels of the workload `spiffe_id` of `group`: those of its endpoints in the
/// registry, plus the group label.
fn workload_labels(state: &MeshState, spiffe_id: &str, group: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    for ep in state.services.values().flat_map(|s| s.endpoints.values()) {
        if ep.identity.as_deref() == Some(spiffe_id) {
            labels.extend(ep.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    labels.insert(GROUP_LABEL.to_owned(), group.to_owned());
    labels
}

/// The PeerAuthentications as they apply to this agent's workload (capture rules).
#[derive(Debug)]
pub struct PeerView {
    namespace: String,
    labels: BTreeMap<String, String>,
    peer: Vec<(u64, PeerAuthentication)>,
}

impl PeerView {
    /// Builds the view of the workload `spiffe_id` of `group`.
    pub fn build(state: &MeshState, spiffe_id: &str, group: &str) -> PeerView {
        PeerView {
            namespace: workload_namespace(spiffe_id).to_owned(),
            labels: workload_labels(state, spiffe_id, group),
            peer: state
                .policies
                .values()
                .filter_map(|p| match &p.resource {
                    Resource::PeerAuthentication(pa) => Some((p.seq, pa.clone())),
                    _ => None,
                })
                .collect(),
        }
    }

    /// The mode of `port` when a PeerAuthentication applies to this workload (`None`: none
    /// does, and the group's `--mtls` / the agent's `inbound_mode` decide).
    pub fn mode_from_policy(&self, port: u16) -> Option<PeerMode> {
        let (mode, from) = effective_mode(
            self.peer.iter().map(|(s, p)| (*s, p)),
            Workload {
                namespace: &self.namespace,
                labels: &self.labels,
            },
            port,
        );
        from.map(|_| mode)
    }
}

/// One decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzDecision {
    /// Allowed or denied.
    pub allow: bool,
    /// `namespace/name` of the deciding policy (`None`: no policy decided: allowed for
    /// lack of ALLOW policies, or denied because none matched).
    pub policy: Option<String>,
}

impl AuthzDecision {
    /// The `policy` label value.
    pub fn policy_label(&self) -> &str {
        self.policy
            .as_deref()
            .unwrap_or(if self.allow { "none" } else { "no-allow-match" })
    }
}

impl LocalAuthz {
    /// Builds the view of the workload `spiffe_id` (`spiffe://td/ns/NS/sa/SA`) of `group`:
    /// its labels are those of its endpoints in the registry plus the group label.
    pub fn build(state: &MeshState, spiffe_id: &str, group: &str) -> LocalAuthz {
        let labels = workload_labels(state, spiffe_id, group);
        let aps: Vec<_> = state
            .policies
            .values()
            .filter_map(|p| match &p.resource {
                Resource::AuthorizationPolicy(ap) => Some(ap),
                _ => None,
            })
            .collect();
        let namespace = workload_namespace(spiffe_id);
        let selected = PolicySet::new(aps.iter().copied()).for_workload(Workload {
            namespace,
            labels: &labels,
        });
        let mut header_names: Vec<String> = aps
            .iter()
            .flat_map(|ap| ap.spec.rules.iter().flatten())
            .flat_map(|r| r.when.iter().flatten())
            .filter_map(|c| {
                let name = c.key.strip_prefix("request.headers[")?.strip_suffix(']')?;
                Some(name.to_ascii_lowercase())
            })
            .collect();
        header_names.sort();
        header_names.dedup();
        let jwt_rules = causeway_api::policy::jwt::rules_for(
            state.policies.values().filter_map(|p| match &p.resource {
                Resource::RequestAuthentication(ra) => Some(ra),
                _ => None,
            }),
            Workload {
                namespace,
                labels: &labels,
            },
        )
        .into_iter()
        .map(|(_, rule)| rule)
        .collect::<Vec<_>>();
        LocalAuthz {
            labels,
            selected,
            jwt_rules_id: crate::jwks::rules_id(&jwt_rules),
            jwt_rules,
            header_names,
            source: state.policies.clone(),
        }
    }

    /// The `jwtRules` of the RequestAuthentications that select this workload.
    pub fn jwt_rules(&self) -> &[JwtRule] {
        &self.jwt_rules
    }

    /// The identity of [`Self::jwt_rules`] for the verified-token cache.
    pub fn jwt_rules_id(&self) -> u64 {
        self.jwt_rules_id
    }

    /// The (lower-case) request header names AuthorizationPolicy conditions read.
    pub fn header_names(&self) -> &[String] {
        &self.header_names
    }

    /// Whether `state` carries other policies or labels than this view was built from.
    pub fn is_current(&self, state: &MeshState, spiffe_id: &str, group: &str) -> bool {
        self.source == state.policies && workload_labels(state, spiffe_id, group) == self.labels
    }

    /// How many AuthorizationPolicies select this workload.
    pub fn selected(&self) -> usize {
        self.selected.len()
    }

    /// Decides a connection from `principal` (`None`: plaintext) at `source` to
    /// `destination:port`, and counts it.
    pub fn decide(
        &self,
        principal: Option<&str>,
        source: IpAddr,
        destination: IpAddr,
        port: u16,
    ) -> AuthzDecision {
        self.decide_with(principal, source, destination, port, None)
    }

    /// Decides one HTTP request (on a port the agent parses as HTTP) with its attributes,
    /// and counts it; a denial is remembered for the controller like a connection's.
    pub fn decide_request(
        &self,
        principal: Option<&str>,
        source: IpAddr,
        destination: IpAddr,
        port: u16,
        http: HttpAttributes<'_>,
    ) -> AuthzDecision {
        self.decide_with(principal, source, destination, port, Some(http))
    }

    fn decide_with(
        &self,
        principal: Option<&str>,
        source: IpAddr,
        destination: IpAddr,
        port: u16,
        http: Option<HttpAttributes<'_>>,
    ) -> AuthzDecision {
        let v = self.selected.decide(&Request {
            principal: principal.map(|p| p.strip_prefix("spiffe://").unwrap_or(p)),
            source_ip: source,
            remote_ip: None,
            destination_ip: destination,
            destination_port: port,
            sni: None,
            http,
        });
        let d = AuthzDecision {
            allow: v.allow,
            policy: v.policy.map(|p| p.id()),
        };
        decisions().count(&d);
        if !d.allow {
            decisions().remember(principal, source, port, d.policy_label());
        }
        d
    }
}

/// Counts of decisions by (decision, policy label), and the recent denials not yet
/// reported to the controller.
#[derive(Debug, Default)]
pub struct Decisions {
    /// Per policy label: denials (`[0]`) and admissions (`[1]`).
    counts: Mutex<[BTreeMap<String, u64>; 2]>,
    unreported: Mutex<std::collections::VecDeque<causeway_api::push::Denial>>,
}

impl Decisions {
    /// Remembers a refusal for the next report (the oldest go first past the bound).
    fn remember(&self, principal: Option<&str>, source: IpAddr, port: u16, policy: &str) {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut q = self.unreported.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= causeway_api::push::MAX_DENIALS_PER_REPORT {
            q.pop_front();
        }
        q.push_back(causeway_api::push::Denial {
            unix_ms,
            source_principal: principal.unwrap_or_default().to_owned(),
            source_address: source.to_string(),
            port: u32::from(port),
            policy: policy.to_owned(),
        });
    }

    /// The refusals since the last call (at most [`causeway_api::push::MAX_DENIALS_PER_REPORT`],
    /// the newest).
    pub fn take_unreported(&self) -> Vec<causeway_api::push::Denial> {
        self.unreported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect()
    }

    fn count(&self, d: &AuthzDecision) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let by_policy = &mut c[usize::from(d.allow)];
        // Looked up by `&str`: no allocation once a label was counted.
        match by_policy.get_mut(d.policy_label()) {
            Some(n) => *n += 1,
            None => {
                by_policy.insert(d.policy_label().to_owned(), 1);
            }
        }
    }

    /// `(decision, policy, count)` rows, `decision` being `allow` or `deny`.
    pub fn snapshot(&self) -> Vec<(&'static str, String, u64)> {
        let c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c[0].iter()
            .map(|(policy, n)| ("deny", policy.clone(), *n))
            .chain(c[1].iter().map(|(policy, n)| ("allow", policy.clone(), *n)))
            .collect()
    }
}

/// The process's decision counters.
pub fn decisions() -> &'static Decisions {
    static D: OnceLock<Decisions> = OnceLock::new();
    D.get_or_init(Decisions::default)
}

/// The current authorization view, replaced whenever the policies or the workload's labels
/// change.
pub type SharedAuthz = Arc<std::sync::RwLock<Arc<LocalAuthz>>>;

/// The policy resources of `yaml`, keyed as the mesh state keys them (tests).
#[cfg(test)]
pub(crate) fn policies_from_yaml(yaml: &str) -> BTreeMap<String, causeway_api::push::PolicyState> {
    causeway_api::policy::decode_documents("test", yaml)
        .expect("test policies decode")
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let m = r.metadata();
            let key = format!("{}/{}/{}", r.kind(), m.namespace(), m.name);
            let seq = u64::try_from(i).expect("few policies");
            (key, causeway_api::push::PolicyState { seq, resource: r })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_api::push::{EndpointState, ServiceState};

    fn state(yaml: &str) -> MeshState {
        let mut s = MeshState {
            policies: policies_from_yaml(yaml),
            ..MeshState::default()
        };
        let ep = EndpointState {
            address: "10.0.0.2".into(),
            ports: [("http".to_owned(), 8080)].into(),
            healthy: true,
            zone: None,
            identity: Some("spiffe://causeway.local/ns/shop/sa/web".into()),
            source: "agents".into(),
            stale: false,
            labels: [("app".to_owned(), "web".to_owned())].into(),
            mtls_strict: false,
            region: None,
        };
        s.services.insert(
            "shop/web".into(),
            ServiceState {
                vip: None,
                endpoints: [("agents/a1".to_owned(), ep)].into(),
                hostnames: vec![],
                source_kinds: vec![],
                consul_tags: vec![],
                consul_datacenters: vec![],
                eureka_vips: vec![],
            },
        );
        s
    }

    const ME: &str = "spiffe://causeway.local/ns/shop/sa/web";

    #[test]
    fn selects_by_registry_labels_and_group_label_and_counts() {
        let s = state(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: by-app, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  rules:\n  - from:\n    - source: {principals: [\"causeway.local/ns/shop/sa/client\"]}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: by-group, namespace: shop}\nspec:\n  selector: {matchLabels: {causeway.io/group: webgroup}}\n  action: DENY\n  rules:\n  - to:\n    - operation: {ports: [\"22\"]}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: elsewhere, namespace: other}\nspec: {}\n",
        );
        let a = LocalAuthz::build(&s, ME, "webgroup");
        assert_eq!(a.selected(), 2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let before = decisions().snapshot();
        let d = a.decide(
            Some("spiffe://causeway.local/ns/shop/sa/client"),
            ip("10.0.0.1"),
            ip("10.0.0.2"),
            8080,
        );
        assert_eq!(
            d,
            AuthzDecision {
                allow: true,
                policy: Some("shop/by-app".into())
            }
        );
        let d = a.decide(
            Some("spiffe://causeway.local/ns/shop/sa/client"),
            ip("10.0.0.1"),
            ip("10.0.0.2"),
            22,
        );
        assert_eq!(
            d,
            AuthzDecision {
                allow: false,
                policy: Some("shop/by-group".into())
            }
        );
        let d = a.decide(None, ip("10.0.0.1"), ip("10.0.0.2"), 8080);
        assert_eq!(d.policy_label(), "no-allow-match");
        let after = decisions().snapshot();
        let count = |rows: &[(&str, String, u64)], dec: &str, pol: &str| {
            rows.iter()
                .find(|r| r.0 == dec && r.1 == pol)
                .map_or(0, |r| r.2)
        };
        assert!(count(&after, "deny", "shop/by-group") > count(&before, "deny", "shop/by-group"));
        assert!(a.is_current(&s, ME, "webgroup"));
        assert!(!a.is_current(&MeshState::default(), ME, "webgroup"));
    }

    #[test]
    fn peer_mode_resolves_port_level_exceptions() {
        let s = state(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: ns, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: w, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n",
        );
        let v = PeerView::build(&s, ME, "g");
        assert_eq!(v.mode_from_policy(8080), Some(PeerMode::Permissive));
        assert_eq!(v.mode_from_policy(9090), Some(PeerMode::Strict));
        let none = PeerView::build(&state(""), ME, "g");
        assert_eq!(none.mode_from_policy(8080), None);
    }
}
