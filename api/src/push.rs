//! Config push: the messages on the subscription stream (schemas in
//! `api/proto/push.proto`, generated code in [`crate::wire::proto`]) and the agent's
//! applied state.
//!
//! The agent opens a bidirectional stream and sends [`crate::wire::ClientRequest`] with
//! `Subscribe(Hello)` (its last applied version and its workload address). The
//! controller then sends [`PushFrame`]s: a [`ConfigUpdate`] (a full snapshot, or the
//! services changed since the agent's version) and [`Heartbeat`]s. The agent answers each
//! update with an [`AgentFrame`]: `Ack` or `Nack`. One update is in flight per agent: the
//! next is sent after the answer, so a slow agent's pending changes coalesce into one
//! update and never hold back the others. Frames are length-prefixed (see
//! [`crate::wire`]) with [`MAX_PUSH_FRAME`] as the limit.
//!
//! Evolution: unknown fields are skipped; an unknown frame kind decodes to `kind: None`
//! and is ignored; an update that lists a `required_features` entry the agent does not
//! know is NACKed (the agent keeps its last good state) rather than half-applied.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Largest push frame either side reads.
pub const MAX_PUSH_FRAME: usize = 16 * 1024 * 1024;
/// Protocol revision spoken by this build.
pub const PROTOCOL: u32 = 1;
/// The feature an update requires when it carries policy resources: an agent that cannot
/// enforce policies must refuse the update rather than silently allow everything.
pub const FEATURE_POLICY: &str = "policy/v1";
/// The feature an update requires when it carries a `RequestAuthentication`: an agent that
/// does not validate JWTs on the request path must refuse it (agents before it stored such
/// resources and ignored them, so a token rule would silently not apply).
pub const FEATURE_REQUEST_AUTHN: &str = "request-authn/v1";
/// The feature an update requires when it carries routing resources (VirtualService,
/// DestinationRule): an agent that cannot route must refuse the update rather than send
/// canary traffic to every version.
pub const FEATURE_ROUTE: &str = "route/v1";
/// Features this build understands when an update marks them required.
pub const KNOWN_FEATURES: &[&str] = &[FEATURE_POLICY, FEATURE_REQUEST_AUTHN, FEATURE_ROUTE];

pub use crate::wire::proto::{
    Ack, AgentFacts, AgentFrame, ConfigUpdate, Denial, DenialReport, EndpointMsg, Goodbye,
    Heartbeat, Hello, Nack, PolicyMsg, PushFrame, Registration, ServiceMsg, ServiceRef,
    ServiceRejection, TrafficEdge, TrafficReport, agent_frame, push_frame,
};

/// Most edges one [`TrafficReport`] carries (the busiest; the rest are counted in
/// `dropped`).
pub const MAX_EDGES_PER_REPORT: usize = 256;

/// Upper bounds (milliseconds) of a [`TrafficEdge`]'s latency buckets; one more bucket
/// holds the slower requests.
pub const LATENCY_BOUNDS_MS: [u64; 11] = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

/// Most denials one [`DenialReport`] carries.
pub const MAX_DENIALS_PER_REPORT: usize = 32;

/// Why an update was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// A delta built on another version than the agent's.
    #[error(
        "update {version} applies on version {base}, but this agent is at {current}; a full snapshot is needed"
    )]
    BaseMismatch {
        /// The update's version.
        version: u64,
        /// Its base.
        base: u64,
        /// The agent's version.
        current: u64,
    },
    /// The update needs something this agent does not know.
    #[error(
        "update {version} requires feature {feature:?}, which this agent does not support: upgrade causeway-agent"
    )]
    Feature {
        /// The update's version.
        version: u64,
        /// The unknown feature.
        feature: String,
    },
    /// The content is invalid.
    #[error("update {version} is invalid: {reason}")]
    Invalid {
        /// The update's version.
        version: u64,
        /// What is wrong.
        reason: String,
    },
}

/// One service as the agent holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    /// Virtual IP.
    pub vip: Option<Ipv4Addr>,
    /// Endpoints by id.
    pub endpoints: BTreeMap<String, EndpointState>,
    /// Extra DNS names.
    pub hostnames: Vec<String>,
    /// Contributing source kinds.
    pub source_kinds: Vec<String>,
    /// Consul tags (union over the Consul endpoints).
    #[serde(default)]
    pub consul_tags: Vec<String>,
    /// Consul datacenters.
    #[serde(default)]
    pub consul_datacenters: Vec<String>,
    /// Eureka VIP and secure VIP names.
    #[serde(default)]
    pub eureka_vips: Vec<String>,
}

/// One endpoint as the agent holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointState {
    /// IP address or host name.
    pub address: String,
    /// Named ports.
    pub ports: BTreeMap<String, u16>,
    /// Whether it may receive traffic.
    pub healthy: bool,
    /// Zone.
    pub zone: Option<String>,
    /// SPIFFE ID if it runs an agent.
    pub identity: Option<String>,
    /// Source name.
    pub source: String,
    /// Whether its source is stale.
    pub stale: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Its group is in STRICT mTLS mode.
    #[serde(default)]
    pub mtls_strict: bool,
    /// Region (locality load balancing; the zone is `zone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// The config an agent has applied (what it persists and serves from).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshState {
    /// The applied version (0: nothing yet).
    pub version: u64,
    /// Services by "namespace/name".
    pub services: BTreeMap<String, ServiceState>,
    /// Trust bundle, DER.
    pub trust_bundle_der: Vec<Vec<u8>>,
    /// Denied certificate serials.
    pub deny_serials: BTreeSet<String>,
    /// The VIP range.
    pub vip_cidr: Option<Ipv4Net>,
    /// Policy resources by `Kind/namespace/name`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policies: BTreeMap<String, PolicyState>,
    /// Routing resources by `Kind/namespace/name`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, RouteState>,
}

/// One routing resource as the agent holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteState {
    /// Creation order (lower is older; Istio merges VirtualServices of one host oldest
    /// first).
    pub seq: u64,
    /// The resource.
    pub resource: crate::route::RouteResource,
}

/// Decodes and validates one pushed routing resource.
fn decode_route(p: &PolicyMsg) -> Result<RouteState, String> {
    let value: serde_json::Value =
        serde_json::from_slice(&p.json).map_err(|e| format!("route {}: not JSON: {e}", p.key))?;
    let resource = crate::route::decode_value(value)
        .map_err(|(path, msg)| format!("route {}: {path}: {msg}", p.key))?;
    let key = resource.key();
    if key != p.key {
        return Err(format!("route {}: the resource inside is {key}", p.key));
    }
    if let Some(first) = crate::route::validate(&resource).first() {
        return Err(format!(
            "route {}: {}: {}",
            p.key, first.path, first.message
        ));
    }
    Ok(RouteState {
        seq: p.seq,
        resource,
    })
}

/// One policy resource as the agent holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyState {
    /// Creation order (lower is older).
    pub seq: u64,
    /// The resource.
    pub resource: crate::policy::Resource,
}

/// Decodes and validates one pushed policy resource.
fn decode_policy(p: &PolicyMsg) -> Result<PolicyState, String> {
    let value: serde_json::Value =
        serde_json::from_slice(&p.json).map_err(|e| format!("policy {}: not JSON: {e}", p.key))?;
    let resource = crate::policy::resource::decode_value(value)
        .map_err(|(path, msg)| format!("policy {}: {path}: {msg}", p.key))?;
    let m = resource.metadata();
    let key = format!("{}/{}/{}", resource.kind(), m.namespace(), m.name);
    if key != p.key {
        return Err(format!("policy {}: the resource inside is {key}", p.key));
    }
    let problems = crate::policy::validate::validate(&resource);
    if let Some(first) = problems.first() {
        return Err(format!(
            "policy {}: {}: {}",
            p.key, first.path, first.message
        ));
    }
    Ok(PolicyState {
        seq: p.seq,
        resource,
    })
}

fn service_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The outcome of [`MeshState::apply`]: the new state, and the services of the update
/// that were refused (the state keeps its last good copy of each, if it had one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The new state, at the update's version.
    pub state: MeshState,
    /// Services refused, with the reason; empty when everything applied.
    pub rejected: Vec<ServiceRejection>,
}

impl Applied {
    /// One line naming every refused service and why, for logs, status and the NACK.
    pub fn rejection_summary(&self) -> Option<String> {
        if self.rejected.is_empty() {
            return None;
        }
        let parts: Vec<String> = self
            .rejected
            .iter()
            .map(|r| format!("{}/{}: {}", r.namespace, r.name, r.error))
            .collect();
        Some(format!(
            "update {} applied except {} refused service(s), which keep their last good config: {}",
            self.state.version,
            self.rejected.len(),
            parts.join("; ")
        ))
    }
}

/// Converts one pushed service, checking it against the VIP range.
fn service_state(s: &ServiceMsg, range: Option<Ipv4Net>) -> Result<ServiceState, String> {
    let vip = if s.vip.is_empty() {
        None
    } else {
        let ip: Ipv4Addr = s
            .vip
            .parse()
            .map_err(|_| format!("VIP {:?} is not an IPv4 address", s.vip))?;
        if let Some(range) = range
            && !range.contains(&ip)
        {
            return Err(format!("VIP {ip} is outside the VIP range {range}"));
        }
        Some(ip)
    };
    let mut endpoints = BTreeMap::new();
    for e in &s.endpoints {
        if let Some(reason) = endpoint_problem(&e.address, range) {
            return Err(format!("endpoint {}: {reason}", e.id));
        }
        let mut ports = BTreeMap::new();
        for (name, p) in &e.ports {
            let port = u16::try_from(*p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("endpoint {} port {name} = {p} is not 1..65535", e.id))?;
            ports.insert(name.clone(), port);
        }
        endpoints.insert(
            e.id.clone(),
            EndpointState {
                address: e.address.clone(),
                ports,
                healthy: e.healthy,
                zone: (!e.zone.is_empty()).then(|| e.zone.clone()),
                identity: (!e.identity.is_empty()).then(|| e.identity.clone()),
                source: e.source.clone(),
                stale: e.stale,
                labels: e.labels.clone(),
                mtls_strict: e.mtls_strict,
                region: (!e.region.is_empty()).then(|| e.region.clone()),
            },
        );
    }
    Ok(ServiceState {
        vip,
        endpoints,
        hostnames: s.hostnames.clone(),
        source_kinds: s.source_kinds.clone(),
        consul_tags: s.consul_tags.clone(),
        consul_datacenters: s.consul_datacenters.clone(),
        eureka_vips: s.eureka_vips.clone(),
    })
}

/// Why an endpoint address cannot be used in a mesh with VIP range `range`, if it cannot:
/// inside the VIP range (traffic to it would loop through the mesh).
pub fn endpoint_problem(address: &str, range: Option<Ipv4Net>) -> Option<String> {
    if let (Ok(IpAddr::V4(ip)), Some(range)) = (address.parse::<IpAddr>(), range)
        && range.contains(&ip)
    {
        return Some(format!(
            "address {ip} is inside the VIP range {range}; traffic to it would loop through the mesh"
        ));
    }
    None
}

/// Whether a held service still holds in VIP range `range`.
fn service_problem(s: &ServiceState, range: Option<Ipv4Net>) -> Option<String> {
    if let (Some(vip), Some(range)) = (s.vip, range)
        && !range.contains(&vip)
    {
        return Some(format!("VIP {vip} is outside the VIP range {range}"));
    }
    s.endpoints.iter().find_map(|(id, e)| {
        endpoint_problem(&e.address, range).map(|r| format!("endpoint {id}: {r}"))
    })
}

impl MeshState {
    /// Applies an update, returning the new state; `self` is untouched.
    ///
    /// The whole update is refused (an error) when it cannot be placed: a delta on another
    /// version, a required feature this build does not know, an unreadable VIP range, or
    /// a version that does not advance. Otherwise it is applied service by service: a
    /// service with an invalid VIP, an endpoint inside the VIP range, a bad port, or a VIP
    /// another service holds is refused on its own and keeps its last good copy (if the
    /// state had one), and everything else — other services, removals, the trust bundle
    /// and the deny list — is applied. So one bad record never stops the rest.
    pub fn apply(&self, u: &ConfigUpdate) -> Result<Applied, ApplyError> {
        self.apply_with_features(u, KNOWN_FEATURES)
    }

    /// [`Self::apply`] for a build that understands only the features `known` (what an
    /// older agent does with an update, for compatibility tests).
    pub fn apply_with_features(
        &self,
        u: &ConfigUpdate,
        known: &[&str],
    ) -> Result<Applied, ApplyError> {
        let invalid = |reason: String| ApplyError::Invalid {
            version: u.version,
            reason,
        };
        if let Some(f) = u
            .required_features
            .iter()
            .find(|f| !known.contains(&f.as_str()))
        {
            return Err(ApplyError::Feature {
                version: u.version,
                feature: f.clone(),
            });
        }
        if !u.full && u.base_version != self.version {
            return Err(ApplyError::BaseMismatch {
                version: u.version,
                base: u.base_version,
                current: self.version,
            });
        }
        if u.version <= self.version && !u.full {
            return Err(invalid(format!(
                "version does not advance past {}",
                self.version
            )));
        }
        let mut next = if u.full {
            MeshState::default()
        } else {
            self.clone()
        };
        next.version = u.version;
        if u.full || !u.vip_cidr.is_empty() {
            next.vip_cidr = if u.vip_cidr.is_empty() {
                None
            } else {
                Some(u.vip_cidr.parse().map_err(|_| {
                    invalid(format!("VIP range {:?} is not an IPv4 CIDR", u.vip_cidr))
                })?)
            };
        }
        if u.full || u.bundle_set {
            next.trust_bundle_der = u.trust_bundle_der.clone();
        } else if !self.trust_bundle_der.is_empty() {
            next.trust_bundle_der = self.trust_bundle_der.clone();
        }
        if u.full || u.deny_set {
            next.deny_serials = u.deny_serials.iter().cloned().collect();
        }
        for r in &u.removed {
            next.services.remove(&service_key(&r.namespace, &r.name));
        }
        let range = next.vip_cidr;
        // Each service listed, converted and checked on its own (the last listing of a
        // name wins).
        let mut incoming: BTreeMap<String, ServiceState> = BTreeMap::new();
        let mut rejected: BTreeMap<String, (String, String, String)> = BTreeMap::new();
        for s in &u.services {
            let key = service_key(&s.namespace, &s.name);
            match service_state(s, range) {
                Ok(state) => {
                    rejected.remove(&key);
                    incoming.insert(key, state);
                }
                Err(reason) => {
                    incoming.remove(&key);
                    rejected.insert(key, (s.namespace.clone(), s.name.clone(), reason));
                }
            }
        }
        // A refused service keeps its last good copy, if that still holds.
        let restore = |next: &mut MeshState, key: &str| {
            next.services.remove(key);
            if let Some(old) = self.services.get(key)
                && service_problem(old, range).is_none()
                && (u.full
                    || !u
                        .removed
                        .iter()
                        .any(|r| service_key(&r.namespace, &r.name) == key))
            {
                next.services.insert(key.to_owned(), old.clone());
            }
        };
        for key in rejected.keys() {
            restore(&mut next, key);
        }
        for (key, state) in &incoming {
            next.services.insert(key.clone(), state.clone());
        }
        // A delta that moves the VIP range: copies held from before must still hold.
        if !u.full && range != self.vip_cidr {
            let broken: Vec<(String, String)> = next
                .services
                .iter()
                .filter(|(k, _)| !incoming.contains_key(*k))
                .filter_map(|(k, s)| service_problem(s, range).map(|p| (k.clone(), p)))
                .collect();
            for (key, problem) in broken {
                next.services.remove(&key);
                let (ns, name) = key.split_once('/').unwrap_or(("", key.as_str()));
                rejected.insert(
                    key.clone(),
                    (
                        ns.to_owned(),
                        name.to_owned(),
                        format!("dropped, no longer valid in the new VIP range: {problem}"),
                    ),
                );
            }
        }
        for key in &u.removed_policies {
            next.policies.remove(key);
        }
        // Policies are all or nothing: a policy that does not decode refuses the whole
        // update (the agent keeps enforcing its last good set) rather than enforce a
        // partial one. The controller validates them, so this only meets version skew.
        for p in &u.policies {
            let state = decode_policy(p).map_err(invalid)?;
            next.policies.insert(p.key.clone(), state);
        }
        // Routes likewise: the last good route table stays until a whole new one decodes.
        for key in &u.removed_routes {
            next.routes.remove(key);
        }
        for r in &u.routes {
            let state = decode_route(r).map_err(invalid)?;
            next.routes.insert(r.key.clone(), state);
        }
        // One VIP, one service: a new service taking a VIP held by another is refused.
        loop {
            let mut holders: BTreeMap<Ipv4Addr, Vec<&String>> = BTreeMap::new();
            for (key, s) in &next.services {
                if let Some(vip) = s.vip {
                    holders.entry(vip).or_default().push(key);
                }
            }
            let Some((vip, keys)) = holders.into_iter().find(|(_, k)| k.len() > 1) else {
                break;
            };
            let keys: Vec<String> = keys.into_iter().cloned().collect();
            let mut refuse: Vec<String> = keys
                .iter()
                .filter(|k| incoming.contains_key(*k))
                .cloned()
                .collect();
            let kept_only = refuse.is_empty();
            if kept_only {
                // Only copies kept from before (a state that was already inconsistent):
                // keep the first, drop the others.
                refuse = keys[1..].to_vec();
            }
            for key in refuse {
                let others: Vec<&str> = keys
                    .iter()
                    .filter(|k| **k != key)
                    .map(String::as_str)
                    .collect();
                let (ns, name) = key.split_once('/').unwrap_or(("", key.as_str()));
                rejected.insert(
                    key.clone(),
                    (
                        ns.to_owned(),
                        name.to_owned(),
                        format!("VIP {vip} is also given to {}", others.join(", ")),
                    ),
                );
                incoming.remove(&key);
                if kept_only {
                    next.services.remove(&key);
                } else {
                    restore(&mut next, &key);
                }
            }
        }
        Ok(Applied {
            state: next,
            rejected: rejected
                .into_values()
                .map(|(namespace, name, error)| ServiceRejection {
                    namespace,
                    name,
                    error,
                })
                .collect(),
        })
    }

    /// The deny list of an update that was refused as a whole, applied on its own: a
    /// removed agent must be refused at once even when the rest of the update cannot be
    /// placed. Only a newer version's list replaces the held one. `None`: nothing to do.
    pub fn apply_deny_only(&self, u: &ConfigUpdate) -> Option<MeshState> {
        if !(u.full || u.deny_set) || u.version <= self.version {
            return None;
        }
        let deny: BTreeSet<String> = u.deny_serials.iter().cloned().collect();
        if deny == self.deny_serials {
            return None;
        }
        let mut next = self.clone();
        next.deny_serials = deny;
        Some(next)
    }

    /// Checks what every applied state must satisfy: each VIP inside the VIP range and
    /// given to one service, no endpoint inside the VIP range, every port non-zero.
    pub fn check(&self) -> Result<(), String> {
        let mut seen: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
        for (key, s) in &self.services {
            if let Some(problem) = service_problem(s, self.vip_cidr) {
                return Err(format!("service {key}: {problem}"));
            }
            if let Some(vip) = s.vip
                && let Some(other) = seen.insert(vip, key)
            {
                return Err(format!("VIP {vip} is given to both {other} and {key}"));
            }
            for (id, e) in &s.endpoints {
                if e.ports.values().any(|p| *p == 0) {
                    return Err(format!("service {key}: endpoint {id} has port 0"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denial_report_round_trips_as_an_agent_frame() {
        let frame = AgentFrame {
            kind: Some(agent_frame::Kind::Denials(DenialReport {
                denials: vec![Denial {
                    unix_ms: 1,
                    source_principal: "spiffe://causeway.local/ns/a/sa/b".into(),
                    source_address: "10.0.0.1".into(),
                    port: 8080,
                    policy: "a/deny".into(),
                }],
            })),
        };
        let bytes = crate::wire::encode_frame(&frame);
        let back: AgentFrame = crate::wire::decode_body(&bytes[4..]).unwrap();
        assert_eq!(back, frame);
    }

    fn svc(name: &str, vip: &str, addrs: &[&str]) -> ServiceMsg {
        ServiceMsg {
            namespace: "default".into(),
            name: name.into(),
            vip: vip.into(),
            endpoints: addrs
                .iter()
                .enumerate()
                .map(|(i, a)| EndpointMsg {
                    id: format!("file/{i}"),
                    address: (*a).into(),
                    ports: [("http".to_owned(), 80u32)].into(),
                    healthy: true,
                    source: "file".into(),
                    ..EndpointMsg::default()
                })
                .collect(),
            ..ServiceMsg::default()
        }
    }

    fn full(version: u64, services: Vec<ServiceMsg>) -> ConfigUpdate {
        ConfigUpdate {
            version,
            full: true,
            services,
            vip_cidr: "240.240.0.0/16".into(),
            ..ConfigUpdate::default()
        }
    }

    #[test]
    fn snapshot_then_delta() {
        let s0 = MeshState::default();
        let s1 = s0
            .apply(&full(3, vec![svc("web", "240.240.0.1", &["10.0.0.1"])]))
            .unwrap()
            .state;
        assert_eq!(s1.version, 3);
        assert_eq!(
            s1.services["default/web"].vip,
            Some("240.240.0.1".parse().unwrap())
        );
        let delta = ConfigUpdate {
            version: 5,
            base_version: 3,
            services: vec![svc("api", "240.240.0.2", &["10.0.0.2", "10.0.0.3"])],
            removed: vec![ServiceRef {
                namespace: "default".into(),
                name: "web".into(),
            }],
            ..ConfigUpdate::default()
        };
        let s2 = s1.apply(&delta).unwrap().state;
        assert_eq!(s2.version, 5);
        assert!(!s2.services.contains_key("default/web"));
        assert_eq!(s2.services["default/api"].endpoints.len(), 2);
        assert_eq!(s2.vip_cidr, s1.vip_cidr, "a delta keeps the VIP range");
    }

    #[test]
    fn a_request_authentication_travels_to_the_agent() {
        let ra = serde_json::json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "jwt", "namespace": "shop"},
            "spec": {"jwtRules": [{"issuer": "https://idp", "jwksUri": "https://idp/jwks"}]},
        });
        let msg = |json: &serde_json::Value| PolicyMsg {
            key: "RequestAuthentication/shop/jwt".into(),
            seq: 7,
            json: serde_json::to_vec(json).unwrap(),
        };
        let update = ConfigUpdate {
            policies: vec![msg(&ra)],
            required_features: vec![FEATURE_POLICY.into(), FEATURE_REQUEST_AUTHN.into()],
            ..full(2, vec![])
        };
        // An agent that knows policies but not RequestAuthentication on the request path
        // (the builds before it) refuses the update instead of ignoring the token rules.
        let old = MeshState::default()
            .apply_with_features(&update, &[FEATURE_POLICY])
            .unwrap_err();
        assert_eq!(
            old,
            ApplyError::Feature {
                version: 2,
                feature: FEATURE_REQUEST_AUTHN.into()
            }
        );
        assert!(old.to_string().contains("upgrade causeway-agent"), "{old}");
        let s = MeshState::default().apply(&update).unwrap().state;
        let got = &s.policies["RequestAuthentication/shop/jwt"];
        assert_eq!(got.seq, 7);
        let crate::policy::Resource::RequestAuthentication(r) = &got.resource else {
            panic!("{:?}", got.resource)
        };
        assert_eq!(r.spec.jwt_rules[0].issuer, "https://idp");
        // An invalid one (plain-HTTP key set) refuses the update, naming the field.
        let mut bad = ra.clone();
        bad["spec"]["jwtRules"][0]["jwksUri"] = "http://idp/jwks".into();
        let update = ConfigUpdate {
            policies: vec![msg(&bad)],
            required_features: vec![FEATURE_POLICY.into()],
            ..full(3, vec![])
        };
        let e = s.apply(&update).unwrap_err().to_string();
        assert!(e.contains("spec.jwtRules[0].jwksUri"), "{e}");
    }

    #[test]
    fn whole_refusals_keep_the_old_state() {
        let s1 = MeshState::default()
            .apply(&full(1, vec![svc("web", "240.240.0.1", &["10.0.0.1"])]))
            .unwrap()
            .state;
        let wrong_base = ConfigUpdate {
            version: 3,
            base_version: 2,
            ..ConfigUpdate::default()
        };
        assert!(matches!(
            s1.apply(&wrong_base),
            Err(ApplyError::BaseMismatch { .. })
        ));
        let future = ConfigUpdate {
            version: 2,
            base_version: 1,
            required_features: vec!["l7-routes".into()],
            ..ConfigUpdate::default()
        };
        assert!(matches!(s1.apply(&future), Err(ApplyError::Feature { .. })));
        assert_eq!(s1.version, 1);
    }

    fn delta(version: u64, base: u64, services: Vec<ServiceMsg>) -> ConfigUpdate {
        ConfigUpdate {
            version,
            base_version: base,
            services,
            ..ConfigUpdate::default()
        }
    }

    #[test]
    fn one_bad_service_is_refused_alone_and_keeps_its_last_good_copy() {
        let s1 = MeshState::default()
            .apply(&full(
                1,
                vec![
                    svc("web", "240.240.0.1", &["10.0.0.1"]),
                    svc("api", "240.240.0.2", &["10.0.0.2"]),
                ],
            ))
            .unwrap()
            .state;
        // web gets an endpoint inside the VIP range; api and a new service are fine.
        let mut u = delta(
            2,
            1,
            vec![
                svc("web", "240.240.0.1", &["10.0.0.1", "240.240.0.77"]),
                svc("api", "240.240.0.2", &["10.0.0.3"]),
                svc("new", "240.240.0.3", &["10.0.0.4"]),
            ],
        );
        u.deny_set = true;
        u.deny_serials = vec!["abcd".into()];
        let applied = s1.apply(&u).unwrap();
        let s2 = &applied.state;
        assert_eq!(s2.version, 2);
        assert_eq!(applied.rejected.len(), 1, "{:?}", applied.rejected);
        assert_eq!(applied.rejected[0].name, "web");
        assert!(
            applied.rejected[0].error.contains("inside the VIP range"),
            "{:?}",
            applied.rejected
        );
        assert_eq!(
            s2.services["default/web"], s1.services["default/web"],
            "the refused service keeps its last good copy"
        );
        assert_eq!(
            s2.services["default/api"].endpoints["file/0"].address,
            "10.0.0.3"
        );
        assert!(s2.services.contains_key("default/new"));
        assert!(s2.deny_serials.contains("abcd"), "the deny list is applied");
        let summary = applied.rejection_summary().unwrap();
        assert!(
            summary.contains("default/web") && summary.contains("240.240.0.77"),
            "{summary}"
        );
        s2.check().unwrap();

        // A bad port and a VIP taken by another service: each refused on its own; a
        // brand-new bad service is simply absent.
        let mut bad_port = svc("p", "", &["10.0.0.9"]);
        bad_port.endpoints[0].ports.insert("x".into(), 70000);
        let applied = s2
            .apply(&delta(
                3,
                2,
                vec![bad_port, svc("thief", "240.240.0.2", &["10.0.0.8"])],
            ))
            .unwrap();
        let names: Vec<&str> = applied.rejected.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["p", "thief"]);
        assert!(
            applied.rejected[1]
                .error
                .contains("also given to default/api")
        );
        assert!(!applied.state.services.contains_key("default/p"));
        assert!(!applied.state.services.contains_key("default/thief"));
        assert_eq!(
            applied.state.services["default/api"],
            s2.services["default/api"]
        );
        applied.state.check().unwrap();

        // Two services swapping VIPs in one update is not a conflict.
        let swapped = s2
            .apply(&delta(
                3,
                2,
                vec![
                    svc("api", "240.240.0.3", &["10.0.0.3"]),
                    svc("new", "240.240.0.2", &["10.0.0.4"]),
                ],
            ))
            .unwrap();
        assert!(swapped.rejected.is_empty(), "{:?}", swapped.rejected);
        swapped.state.check().unwrap();

        // In a full snapshot too, the refused service keeps its last good copy.
        let applied = s2
            .apply(&full(
                4,
                vec![
                    svc("web", "240.240.0.1", &["240.240.9.9"]),
                    svc("api", "240.240.0.2", &["10.0.0.3"]),
                ],
            ))
            .unwrap();
        assert_eq!(
            applied.state.services["default/web"],
            s2.services["default/web"]
        );
        assert!(!applied.state.services.contains_key("default/new"));
        applied.state.check().unwrap();
    }

    /// The fuzz target's property over many generated updates (deterministic): whatever
    /// an update holds, the result is valid and no refused or unnamed service loses its
    /// previous good copy.
    #[test]
    fn generated_updates_never_lose_the_last_good_config() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let vips = [
            "",
            "240.240.0.1",
            "240.240.0.2",
            "240.240.0.3",
            "10.9.9.9",
            "bad",
        ];
        let addrs = ["10.0.0.1", "10.0.0.2", "240.240.7.7", "db.example.com"];
        let names = ["web", "api", "db", "new"];
        let good = MeshState::default()
            .apply(&full(
                5,
                vec![
                    svc("web", "240.240.0.1", &["10.0.0.1"]),
                    svc("api", "240.240.0.2", &["10.0.0.2"]),
                ],
            ))
            .unwrap()
            .state;
        for _ in 0..5000 {
            let mut u = ConfigUpdate {
                version: 6,
                base_version: 5,
                full: next(5) == 0,
                vip_cidr: if next(2) == 0 {
                    "240.240.0.0/16".into()
                } else {
                    String::new()
                },
                deny_set: next(2) == 0,
                deny_serials: vec![format!("{:x}", next(3))],
                ..ConfigUpdate::default()
            };
            for _ in 0..next(4) {
                let n = names[next(4) as usize];
                let mut s = svc(n, vips[next(6) as usize], &[addrs[next(4) as usize]]);
                if next(6) == 0 {
                    s.endpoints[0]
                        .ports
                        .insert("x".into(), [0, 70000][next(2) as usize]);
                }
                u.services.push(s);
            }
            if next(3) == 0 {
                u.removed.push(ServiceRef {
                    namespace: "default".into(),
                    name: names[next(4) as usize].into(),
                });
            }
            let Ok(applied) = good.apply(&u) else {
                continue;
            };
            let st = &applied.state;
            st.check().unwrap_or_else(|e| panic!("{e}: {u:?}"));
            let named: BTreeSet<String> = u
                .services
                .iter()
                .map(|s| service_key(&s.namespace, &s.name))
                .chain(u.removed.iter().map(|r| service_key(&r.namespace, &r.name)))
                .collect();
            for r in &applied.rejected {
                let k = service_key(&r.namespace, &r.name);
                let held = st.services.get(&k);
                assert!(
                    held.is_none() || held == good.services.get(&k),
                    "{k}: {u:?}"
                );
                let removed = u
                    .removed
                    .iter()
                    .any(|x| service_key(&x.namespace, &x.name) == k);
                if !u.full && !removed {
                    assert_eq!(held, good.services.get(&k), "{k} lost its copy: {u:?}");
                }
            }
            if !u.full {
                for (k, s) in &good.services {
                    if !named.contains(k) {
                        assert_eq!(st.services.get(k), Some(s), "{k} changed: {u:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_refused_update_still_brings_a_newer_deny_list() {
        let s1 = MeshState::default()
            .apply(&full(1, vec![svc("web", "240.240.0.1", &["10.0.0.1"])]))
            .unwrap()
            .state;
        let u = ConfigUpdate {
            version: 5,
            base_version: 3,
            deny_set: true,
            deny_serials: vec!["beef".into()],
            ..ConfigUpdate::default()
        };
        assert!(s1.apply(&u).is_err());
        let s2 = s1.apply_deny_only(&u).unwrap();
        assert_eq!(s2.version, 1);
        assert!(s2.deny_serials.contains("beef"));
        assert_eq!(s2.services, s1.services);
        let older = ConfigUpdate {
            version: 1,
            ..u.clone()
        };
        assert!(
            s1.apply_deny_only(&older).is_none(),
            "an older list never replaces"
        );
    }

    #[test]
    fn unknown_frame_kinds_and_fields_are_tolerated() {
        use prost::Message as _;
        // Tag 9 does not exist in PushFrame: decodes to no kind.
        let frame = PushFrame::decode(&[0x4a, 0x00][..]).unwrap();
        assert!(frame.kind.is_none());
        // An unknown field inside an update is skipped.
        let mut bytes = ConfigUpdate {
            version: 7,
            ..ConfigUpdate::default()
        }
        .encode_to_vec();
        bytes.extend_from_slice(&[0xf8, 0x01, 0x05]); // field 31, varint 5
        assert_eq!(ConfigUpdate::decode(bytes.as_slice()).unwrap().version, 7);
    }

    #[test]
    fn fuzz_seeds_decode_and_apply() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/push_decode");
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        let full: PushFrame =
            crate::wire::decode_frame(&read("update-full.bin"), MAX_PUSH_FRAME).unwrap();
        let Some(push_frame::Kind::Update(full)) = full.kind else {
            panic!("update seed")
        };
        let s1 = MeshState::default().apply(&full).unwrap().state;
        assert_eq!(s1.services["ext/web"].endpoints["f/1"].ports["http"], 80);
        let delta: PushFrame =
            crate::wire::decode_frame(&read("update-delta.bin"), MAX_PUSH_FRAME).unwrap();
        let Some(push_frame::Kind::Update(delta)) = delta.kind else {
            panic!("delta seed")
        };
        let s2 = s1.apply(&delta).unwrap().state;
        assert_eq!(s2.version, 3);
        let ack: AgentFrame = crate::wire::decode_frame(&read("ack.bin"), MAX_PUSH_FRAME).unwrap();
        assert!(matches!(
            ack.kind,
            Some(agent_frame::Kind::Ack(Ack { version: 3 }))
        ));
        let hb: PushFrame =
            crate::wire::decode_frame(&read("heartbeat.bin"), MAX_PUSH_FRAME).unwrap();
        assert!(matches!(
            hb.kind,
            Some(push_frame::Kind::Heartbeat(Heartbeat { version: 9 }))
        ));
    }
}
