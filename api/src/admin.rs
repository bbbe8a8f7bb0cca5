//! The admin HTTP API's requests and answers, shared by the controller's handlers and
//! `causewayctl`: one definition, so a field renamed on one side fails to compile or to
//! decode instead of printing "-".
//!
//! Answers decode strictly on the client: every field a type declares must be present
//! (an `Option` may be `null`, not missing), except the collections marked as added
//! later, which default to empty. Fields the client does not know are ignored, so a newer
//! controller may add some. Policy resources and `why` are in [`crate::policy::api`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

use crate::WorkloadGroup;
use crate::push::{Denial, ServiceRejection};
use crate::registry::SourceKind;

/// Makes an `Option` field required: present, possibly `null` (serde otherwise reads a
/// missing `Option` field as `None`, hiding a renamed field).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

/// Every error answer: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and what to do.
    pub error: String,
}

/// `GET /v1/ca`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaView {
    /// Hex SHA-256 of the root certificate (what join tokens pin).
    pub fingerprint: String,
    /// "root" (generated) or "intermediate" (operator-provided).
    pub mode: String,
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// The signing chain, leaf (the CA's own certificate) first.
    pub certificate_chain_pem: Vec<String>,
    /// The roots agents trust.
    pub trust_bundle_pem: Vec<String>,
}

/// Body of `POST /v1/groups`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupCreate {
    /// The group's name.
    pub name: String,
    /// Mesh namespace.
    pub namespace: String,
    /// Service account (last segment of the SPIFFE ID).
    pub service_account: String,
    /// The service its VMs offer.
    #[serde(default)]
    pub service: Option<String>,
    /// Named ports, `NAME:PORT`.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Labels of the VMs' endpoints.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Networks allowed to join.
    #[serde(default)]
    pub allowed_cidrs: Vec<IpNet>,
    /// `strict` or `permissive`; given, it also writes the equivalent PeerAuthentication.
    #[serde(default)]
    pub mtls: Option<String>,
    /// The registry source the service is already registered in.
    #[serde(default)]
    pub registry_source: Option<String>,
}

/// A group as the API shows it (`POST /v1/groups`, `GET /v1/groups[/{name}]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    /// The group.
    #[serde(flatten)]
    pub group: WorkloadGroup,
    /// Its immutable id (what join tokens are bound to).
    pub id: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// Body of `POST /v1/tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    /// The group to join.
    pub group: String,
    /// Lifetime in seconds (the controller's `tokens.default_ttl` if not given).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// How many joins it allows (1 if not given).
    #[serde(default)]
    pub uses: Option<u32>,
    /// Source networks it may be used from (any if empty).
    #[serde(default)]
    pub cidrs: Vec<IpNet>,
}

/// Answer of `POST /v1/tokens`: the token text, shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The token (`cwt1.…`).
    pub token: String,
    /// Its id.
    pub id: String,
    /// Its group.
    pub group: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Joins it allows.
    pub uses: u32,
    /// Source networks it may be used from.
    pub cidrs: Vec<IpNet>,
    /// `host:port` of the controller written into it.
    pub controller: String,
}

/// A token's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenState {
    /// Usable.
    Active,
    /// No use left.
    Spent,
    /// Past its expiry.
    Expired,
    /// Revoked by an operator.
    Revoked,
    /// Its group was deleted (or re-created: a new group under the same name).
    Orphaned,
}

impl std::fmt::Display for TokenState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Active => "active",
            Self::Spent => "spent",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Orphaned => "orphaned",
        })
    }
}

/// A token as the API shows it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    /// Its id.
    pub id: String,
    /// Its group's name.
    pub group: String,
    /// The id of the group it was created for.
    pub group_id: String,
    /// Its state.
    pub state: TokenState,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds, when revoked.
    #[serde(deserialize_with = "present")]
    pub revoked_at: Option<i64>,
    /// Joins it allowed at first.
    pub uses_total: u32,
    /// Joins left.
    pub uses_left: u32,
    /// Source networks it may be used from.
    pub cidrs: Vec<IpNet>,
}

/// A certificate that may still be valid: its serial and expiry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveCertView {
    /// Serial, hex.
    pub serial: String,
    /// Expiry, Unix seconds.
    pub not_after: i64,
}

/// A refused update, as the agent reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NackView {
    /// The refused version.
    pub version: u64,
    /// The agent's reason.
    pub error: String,
    /// The services the agent refused while applying the rest of the update.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<ServiceRejection>,
}

/// An agent's push session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    /// Whether a subscription is open.
    pub connected: bool,
    /// The last version the agent acknowledged.
    pub acked_version: u64,
    /// The last version sent.
    pub sent_version: u64,
    /// The last refusal, if the agent refused an update.
    #[serde(deserialize_with = "present")]
    pub last_nack: Option<NackView>,
    /// The workload address the agent asked for (registered unless
    /// `registration_error` says why not).
    pub address: String,
    /// Why the controller refused to register the workload at `address`.
    #[serde(deserialize_with = "present")]
    pub registration_error: Option<String>,
    /// Session generation (grows with every new session).
    pub generation: u64,
    /// The latest connections the agent refused by policy, newest last.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub recent_denials: VecDeque<Denial>,
    /// The agent's software version (from its hello).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_version: String,
    /// When `connected` last changed, Unix milliseconds.
    #[serde(default)]
    pub since_ms: u64,
    /// What the agent last reported of its data plane (for `causewayctl analyze`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<crate::push::AgentFacts>,
}

/// An agent as the API shows it (`/v1/agents`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    /// Its id.
    pub id: String,
    /// Its SPIFFE ID.
    pub identity: String,
    /// Its group.
    pub group: String,
    /// The host name it reported.
    pub hostname: String,
    /// The address it joined from.
    pub address: IpAddr,
    /// The token it joined with.
    pub token_id: String,
    /// Unix seconds.
    pub joined_at: i64,
    /// Serial (hex) of its newest certificate.
    pub serial: String,
    /// Expiry of its newest certificate, Unix seconds.
    pub not_after: i64,
    /// Unix seconds of the last renewal.
    #[serde(deserialize_with = "present")]
    pub renewed_at: Option<i64>,
    /// Renewals so far.
    pub renewals: u64,
    /// Whether an operator removed it.
    pub removed: bool,
    /// When it was removed, Unix seconds.
    #[serde(deserialize_with = "present")]
    pub removed_at: Option<i64>,
    /// Its unexpired certificates (oldest first): what removal denies.
    pub certificates: Vec<LiveCertView>,
    /// Whether its push session is open.
    pub connected: bool,
    /// The last version it acknowledged, if it has subscribed since the controller started.
    #[serde(deserialize_with = "present")]
    pub acked_version: Option<u64>,
    /// Its push session, if it has subscribed since the controller started.
    #[serde(deserialize_with = "present")]
    pub session: Option<SessionView>,
}

/// A certificate the CA issued (`/v1/certificates`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertView {
    /// Serial, hex.
    pub serial: String,
    /// The agent it was issued to.
    pub agent_id: String,
    /// The SPIFFE ID in it.
    pub spiffe_id: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// "join" or "renew".
    pub reason: String,
}

/// A service of the merged registry (`/v1/registry`, `/v1/registry/{ns}/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// VIP, when allocated.
    #[serde(deserialize_with = "present")]
    pub vip: Option<Ipv4Addr>,
    /// Merged endpoints.
    pub endpoints: Vec<EndpointView>,
    /// Names of the sources that contribute.
    pub sources: BTreeSet<String>,
}

/// An endpoint of a merged service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointView {
    /// Address.
    pub address: String,
    /// Named ports.
    pub ports: BTreeMap<String, u16>,
    /// Whether it routes.
    pub healthy: bool,
    /// Source name.
    pub source: String,
    /// Source kind.
    pub kind: SourceKind,
    /// The source's own id.
    pub native_id: String,
    /// The source's revision.
    pub revision: String,
    /// Whether its source is failing.
    pub stale: bool,
    /// SPIFFE ID, when it runs an agent.
    #[serde(deserialize_with = "present")]
    pub identity: Option<String>,
    /// Zone.
    #[serde(deserialize_with = "present")]
    pub zone: Option<String>,
    /// Region (absent from controllers before locality load balancing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Every source that knows this endpoint: its own `source` first, then the agent
    /// whose workload is bound to it (`agents`), when joined from an existing registry.
    pub sources: Vec<String>,
    /// The id of the Causeway agent running there, if one is (its own registration or
    /// one bound to a registry's): traffic to it goes through the mTLS tunnel.
    #[serde(deserialize_with = "present")]
    pub agent: Option<String>,
    /// Labels (agent workloads carry `causeway.io/group`).
    pub labels: BTreeMap<String, String>,
}

/// A registry source's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceStateView {
    /// Configured, no complete answer yet in this run.
    Pending,
    /// Its last answer was complete.
    Synced,
    /// It is failing; its last known data is kept, flagged stale.
    Stale,
}

impl std::fmt::Display for SourceStateView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pending => "pending",
            Self::Synced => "synced",
            Self::Stale => "stale",
        })
    }
}

/// A registry source (`/v1/registry/sources`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceView {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: SourceKind,
    /// Its state.
    pub state: SourceStateView,
    /// The last error.
    #[serde(deserialize_with = "present")]
    pub last_error: Option<String>,
    /// Services it holds.
    pub services: usize,
    /// Endpoints it holds.
    pub endpoints: usize,
}

/// `GET /v1/mesh`: the mesh's version and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshStatus {
    /// The current mesh version.
    pub version: u64,
    /// The newest version known to be flushed to disk.
    pub durable_version: u64,
    /// Services in the merged registry.
    pub services: usize,
    /// Agents with an open push session.
    pub agents_connected: usize,
}

/// `GET /v1/traffic`: the traffic between workloads and services, merged from the
/// agents' latest per-edge summaries. When both sides report an edge, only the
/// destination's view counts (as Kiali does); else the source's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrafficView {
    /// The edges, busiest first.
    pub edges: Vec<TrafficEdgeView>,
    /// Agents whose summaries are included.
    pub agents_reporting: usize,
    /// Edges the agents left out of their latest reports (beyond their bound).
    pub dropped: u64,
}

/// One edge of [`TrafficView`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrafficEdgeView {
    /// The source workload, `namespace/name`.
    pub source: String,
    /// The destination service, `namespace/name` (or `PassthroughCluster`).
    pub destination: String,
    /// "http", "grpc" or "tcp".
    pub protocol: String,
    /// Through mutual TLS (else plaintext).
    pub mtls: bool,
    /// "destination" or "source": whose view this is.
    pub reporter: String,
    /// Requests per second.
    pub request_rate: f64,
    /// Share of requests answered 5xx, 0 to 1.
    pub error_rate: f64,
    /// 99th percentile latency, milliseconds (the upper bound of its bucket); `None`
    /// without requests or above the highest bound.
    pub p99_ms: Option<u64>,
    /// Bytes per second (TCP).
    pub bytes_rate: f64,
    /// Requests in the reports.
    pub requests: u64,
    /// Bytes in the reports.
    pub bytes: u64,
}

/// `POST /v1/ui/login-codes`: a one-time login code for the web UI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginCode {
    /// The code (valid once).
    pub code: String,
    /// Seconds it stays valid.
    pub expires_in_secs: u64,
    /// The login page's path with the code in its fragment (`/ui/login#code=…`).
    pub path: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service_json() -> serde_json::Value {
        serde_json::json!({
            "namespace": "default", "name": "web", "vip": null, "sources": ["file"],
            "endpoints": [{
                "address": "10.0.0.1", "ports": {"http": 8080}, "healthy": true,
                "source": "file", "kind": "file", "native_id": "w1", "revision": "1",
                "stale": false, "identity": null, "zone": null, "sources": ["file"],
                "agent": null, "labels": {}
            }]
        })
    }

    #[test]
    fn answers_round_trip_and_new_fields_are_ignored() {
        let mut v = service_json();
        let s: ServiceView = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(serde_json::to_value(&s).unwrap(), v);
        v["added_later"] = true.into();
        serde_json::from_value::<ServiceView>(v).unwrap();
    }

    #[test]
    fn a_missing_field_is_an_error_even_when_optional() {
        for field in ["vip", "name", "endpoints"] {
            let mut v = service_json();
            v.as_object_mut().unwrap().remove(field);
            let err = serde_json::from_value::<ServiceView>(v).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
        let mut v = service_json();
        v["endpoints"][0]
            .as_object_mut()
            .unwrap()
            .remove("identity");
        let err = serde_json::from_value::<ServiceView>(v).unwrap_err();
        assert!(err.to_string().contains("identity"), "{err}");
    }
}
