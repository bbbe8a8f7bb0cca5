//! Config push: the messages on the subscription stream and the agent's applied state.
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
/// Features this build understands when an update marks them required.
pub const KNOWN_FEATURES: &[&str] = &[FEATURE_POLICY];

/// First message of a subscription: who the agent is and where it stands.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    /// The last config version the agent applied (0: none).
    #[prost(uint64, tag = "1")]
    pub last_version: u64,
    /// The workload address to register (empty: the connection's source address).
    #[prost(string, tag = "2")]
    pub address: String,
    /// The agent's software version.
    #[prost(string, tag = "3")]
    pub agent_version: String,
    /// The protocol revision ([`PROTOCOL`]).
    #[prost(uint32, tag = "4")]
    pub protocol: u32,
}

/// Controller → agent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PushFrame {
    /// The frame's content.
    #[prost(oneof = "push_frame::Kind", tags = "1, 2, 3")]
    pub kind: Option<push_frame::Kind>,
}

/// Kinds of [`PushFrame`].
pub mod push_frame {
    /// What the controller sends.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// A config update.
        #[prost(message, tag = "1")]
        Update(super::ConfigUpdate),
        /// Liveness and the controller's current version.
        #[prost(message, tag = "2")]
        Heartbeat(super::Heartbeat),
        /// The subscription is refused or ends.
        #[prost(message, tag = "3")]
        Error(crate::wire::ErrorReply),
    }
}

/// Agent → controller, after the hello.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AgentFrame {
    /// The frame's content.
    #[prost(oneof = "agent_frame::Kind", tags = "1, 2, 3")]
    pub kind: Option<agent_frame::Kind>,
}

/// Kinds of [`AgentFrame`].
pub mod agent_frame {
    /// What the agent sends.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// The update was applied.
        #[prost(message, tag = "1")]
        Ack(super::Ack),
        /// The update was refused; the agent keeps its last good state.
        #[prost(message, tag = "2")]
        Nack(super::Nack),
        /// The agent is shutting down on purpose: deregister its workload now.
        #[prost(message, tag = "3")]
        Goodbye(super::Goodbye),
    }
}

/// An applied version.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    /// The version now applied.
    #[prost(uint64, tag = "1")]
    pub version: u64,
}

/// A refused version.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Nack {
    /// The refused version.
    #[prost(uint64, tag = "1")]
    pub version: u64,
    /// Why, for operators.
    #[prost(string, tag = "2")]
    pub error: String,
    /// The version the agent stays on (its last good state).
    #[prost(uint64, tag = "3")]
    pub current_version: u64,
}

/// Graceful shutdown.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Goodbye {}

/// Liveness.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Heartbeat {
    /// The controller's current config version.
    #[prost(uint64, tag = "1")]
    pub version: u64,
}

/// A config update: a full snapshot or the services changed since `base_version`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConfigUpdate {
    /// The version this update brings the agent to.
    #[prost(uint64, tag = "1")]
    pub version: u64,
    /// The version it applies on (ignored when `full`).
    #[prost(uint64, tag = "2")]
    pub base_version: u64,
    /// A full snapshot: services not listed are gone.
    #[prost(bool, tag = "3")]
    pub full: bool,
    /// Services to add or replace (each carries its whole endpoint list).
    #[prost(message, repeated, tag = "4")]
    pub services: Vec<ServiceMsg>,
    /// Services that are gone.
    #[prost(message, repeated, tag = "5")]
    pub removed: Vec<ServiceRef>,
    /// The trust bundle (DER roots), when `bundle_set`.
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub trust_bundle_der: Vec<Vec<u8>>,
    /// Whether `trust_bundle_der` replaces the agent's bundle.
    #[prost(bool, tag = "7")]
    pub bundle_set: bool,
    /// Serials (hex) of certificates no agent may accept, when `deny_set`.
    #[prost(string, repeated, tag = "8")]
    pub deny_serials: Vec<String>,
    /// Whether `deny_serials` replaces the agent's deny list.
    #[prost(bool, tag = "9")]
    pub deny_set: bool,
    /// The VIP range, e.g. "240.240.0.0/16" (set in full snapshots).
    #[prost(string, tag = "10")]
    pub vip_cidr: String,
    /// Features the agent must understand to apply this update.
    #[prost(string, repeated, tag = "11")]
    pub required_features: Vec<String>,
    /// Policy resources to add or replace (in a full snapshot: all of them).
    #[prost(message, repeated, tag = "12")]
    pub policies: Vec<PolicyMsg>,
    /// Keys (`Kind/namespace/name`) of policy resources that are gone.
    #[prost(string, repeated, tag = "13")]
    pub removed_policies: Vec<String>,
}

/// One policy resource (AuthorizationPolicy or PeerAuthentication).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PolicyMsg {
    /// `Kind/namespace/name`.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Creation order (lower is older).
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    /// The resource in Istio's shape, as JSON.
    #[prost(bytes = "vec", tag = "3")]
    pub json: Vec<u8>,
}

/// Names a service.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, prost::Message)]
pub struct ServiceRef {
    /// Namespace.
    #[prost(string, tag = "1")]
    pub namespace: String,
    /// Name.
    #[prost(string, tag = "2")]
    pub name: String,
}

/// A service with its VIP and every endpoint.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServiceMsg {
    /// Namespace.
    #[prost(string, tag = "1")]
    pub namespace: String,
    /// Name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Virtual IP ("" if none).
    #[prost(string, tag = "3")]
    pub vip: String,
    /// Endpoints.
    #[prost(message, repeated, tag = "4")]
    pub endpoints: Vec<EndpointMsg>,
    /// Extra DNS names (Eureka VIP names, file-source hosts).
    #[prost(string, repeated, tag = "5")]
    pub hostnames: Vec<String>,
    /// Kinds of the sources that contribute ("consul", "eureka", ...).
    #[prost(string, repeated, tag = "6")]
    pub source_kinds: Vec<String>,
    /// Tags of the service's Consul endpoints (union), for `<tag>.<svc>.service.consul`.
    #[prost(string, repeated, tag = "7")]
    pub consul_tags: Vec<String>,
    /// Datacenters of the service's Consul endpoints, for `<svc>.service.<dc>.consul`.
    #[prost(string, repeated, tag = "8")]
    pub consul_datacenters: Vec<String>,
    /// Eureka `vipAddress` and `secureVipAddress` names of the service's Eureka instances.
    #[prost(string, repeated, tag = "9")]
    pub eureka_vips: Vec<String>,
}

/// One endpoint.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EndpointMsg {
    /// Stable id: `<source>/<native id>`.
    #[prost(string, tag = "1")]
    pub id: String,
    /// IP address or host name.
    #[prost(string, tag = "2")]
    pub address: String,
    /// Named ports.
    #[prost(btree_map = "string, uint32", tag = "3")]
    pub ports: BTreeMap<String, u32>,
    /// Whether it may receive traffic.
    #[prost(bool, tag = "4")]
    pub healthy: bool,
    /// Zone, if known.
    #[prost(string, tag = "5")]
    pub zone: String,
    /// SPIFFE ID if it runs an agent ("" otherwise).
    #[prost(string, tag = "6")]
    pub identity: String,
    /// The source's name.
    #[prost(string, tag = "7")]
    pub source: String,
    /// Whether its source is failing (last known good).
    #[prost(bool, tag = "8")]
    pub stale: bool,
    /// Labels.
    #[prost(btree_map = "string, string", tag = "9")]
    pub labels: BTreeMap<String, String>,
    /// The endpoint's workload group is in STRICT mTLS mode (agent workloads only):
    /// plaintext from off-host to its ports is dropped.
    #[prost(bool, tag = "10")]
    pub mtls_strict: bool,
}

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

impl MeshState {
    /// Applies an update all-or-nothing, returning the new state; `self` is untouched on error.
    pub fn apply(&self, u: &ConfigUpdate) -> Result<MeshState, ApplyError> {
        let invalid = |reason: String| ApplyError::Invalid {
            version: u.version,
            reason,
        };
        if let Some(f) = u
            .required_features
            .iter()
            .find(|f| !KNOWN_FEATURES.contains(&f.as_str()))
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
        for s in &u.services {
            let key = service_key(&s.namespace, &s.name);
            let vip = if s.vip.is_empty() {
                None
            } else {
                let ip: Ipv4Addr = s.vip.parse().map_err(|_| {
                    invalid(format!(
                        "service {key}: VIP {:?} is not an IPv4 address",
                        s.vip
                    ))
                })?;
                if let Some(range) = next.vip_cidr
                    && !range.contains(&ip)
                {
                    return Err(invalid(format!(
                        "service {key}: VIP {ip} is outside the VIP range {range}"
                    )));
                }
                Some(ip)
            };
            let mut endpoints = BTreeMap::new();
            for e in &s.endpoints {
                if let (Ok(IpAddr::V4(ip)), Some(range)) =
                    (e.address.parse::<IpAddr>(), next.vip_cidr)
                    && range.contains(&ip)
                {
                    return Err(invalid(format!(
                        "service {key}: endpoint {} has address {ip} inside the VIP range {range}; traffic to it would loop through the mesh",
                        e.id
                    )));
                }
                let mut ports = BTreeMap::new();
                for (name, p) in &e.ports {
                    let port = u16::try_from(*p).ok().filter(|p| *p != 0).ok_or_else(|| {
                        invalid(format!(
                            "service {key}: endpoint {} port {name} = {p} is not 1..65535",
                            e.id
                        ))
                    })?;
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
                    },
                );
            }
            next.services.insert(
                key,
                ServiceState {
                    vip,
                    endpoints,
                    hostnames: s.hostnames.clone(),
                    source_kinds: s.source_kinds.clone(),
                    consul_tags: s.consul_tags.clone(),
                    consul_datacenters: s.consul_datacenters.clone(),
                    eureka_vips: s.eureka_vips.clone(),
                },
            );
        }
        for key in &u.removed_policies {
            next.policies.remove(key);
        }
        for p in &u.policies {
            let state = decode_policy(p).map_err(invalid)?;
            next.policies.insert(p.key.clone(), state);
        }
        let mut seen: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
        for (key, s) in &next.services {
            if let Some(vip) = s.vip
                && let Some(other) = seen.insert(vip, key)
            {
                return Err(invalid(format!(
                    "VIP {vip} is given to both {other} and {key}"
                )));
            }
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            .unwrap();
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
        let s2 = s1.apply(&delta).unwrap();
        assert_eq!(s2.version, 5);
        assert!(!s2.services.contains_key("default/web"));
        assert_eq!(s2.services["default/api"].endpoints.len(), 2);
        assert_eq!(s2.vip_cidr, s1.vip_cidr, "a delta keeps the VIP range");
    }

    #[test]
    fn refusals_keep_the_old_state() {
        let s1 = MeshState::default()
            .apply(&full(1, vec![svc("web", "240.240.0.1", &["10.0.0.1"])]))
            .unwrap();
        let wrong_base = ConfigUpdate {
            version: 3,
            base_version: 2,
            ..ConfigUpdate::default()
        };
        assert!(matches!(
            s1.apply(&wrong_base),
            Err(ApplyError::BaseMismatch { .. })
        ));
        let looped = ConfigUpdate {
            version: 2,
            base_version: 1,
            services: vec![svc("bad", "240.240.0.9", &["240.240.0.77"])],
            ..ConfigUpdate::default()
        };
        let err = s1.apply(&looped).unwrap_err();
        assert!(err.to_string().contains("inside the VIP range"), "{err}");
        let dup = ConfigUpdate {
            version: 2,
            base_version: 1,
            services: vec![svc("api", "240.240.0.1", &["10.0.0.2"])],
            ..ConfigUpdate::default()
        };
        assert!(s1.apply(&dup).unwrap_err().to_string().contains("both"));
        let future = ConfigUpdate {
            version: 2,
            base_version: 1,
            required_features: vec!["l7-routes".into()],
            ..ConfigUpdate::default()
        };
        assert!(matches!(s1.apply(&future), Err(ApplyError::Feature { .. })));
        let mut bad_port = svc("p", "", &["10.0.0.9"]);
        bad_port.endpoints[0].ports.insert("x".into(), 70000);
        let u = ConfigUpdate {
            version: 2,
            base_version: 1,
            services: vec![bad_port],
            ..ConfigUpdate::default()
        };
        assert!(s1.apply(&u).is_err());
        assert_eq!(s1.version, 1);
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
        let s1 = MeshState::default().apply(&full).unwrap();
        assert_eq!(s1.services["ext/web"].endpoints["f/1"].ports["http"], 80);
        let delta: PushFrame =
            crate::wire::decode_frame(&read("update-delta.bin"), MAX_PUSH_FRAME).unwrap();
        let Some(push_frame::Kind::Update(delta)) = delta.kind else {
            panic!("delta seed")
        };
        let s2 = s1.apply(&delta).unwrap();
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
