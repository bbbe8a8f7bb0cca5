//! The merged-registry model: services and endpoints as Causeway sees them, whatever
//! registry (Consul, Eureka, Kubernetes, a file, an agent) they came from.
//!
//! What it holds:
//! - [`ServiceKey`] (namespace, name) and [`Endpoint`] with its [`Provenance`];
//! - [`NamespaceMapping`]: the per-source rules that put native names into namespaces;
//! - [`SourceSnapshot`] and [`SourceChange`]: what a source reports;
//! - [`Registry`]: the pure merge of all sources — union by key with provenance,
//!   [`Conflict`]s recorded, stale marking of a failed source, and minimal
//!   [`RegistryDelta`]s with a registry version.
//!
//! What it does not: talk to any registry, read a clock or persist anything. Callers pass
//! times in (milliseconds since the Unix epoch) where they matter.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// The name of a service in the mesh: a namespace and a name, both DNS labels.
///
/// Serialized as the string `namespace/name`, so that it can key a JSON object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceKey {
    /// The mesh namespace (for example `default`).
    pub namespace: String,
    /// The service name inside the namespace (for example `reviews`).
    pub name: String,
}

impl ServiceKey {
    /// Builds a key from already-normalized parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl From<ServiceKey> for String {
    fn from(key: ServiceKey) -> String {
        key.to_string()
    }
}

impl TryFrom<String> for ServiceKey {
    type Error = RegistryError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        match text.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ServiceKey::new(ns, name))
            }
            _ => Err(RegistryError::BadKey(text)),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The kind of registry an endpoint came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SourceKind {
    /// A Consul catalog.
    Consul,
    /// A Eureka server.
    Eureka,
    /// A Kubernetes API server.
    Kubernetes,
    /// A TOML file of external services.
    File,
    /// Causeway node agents registering their own workload.
    Agents,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::Consul => "consul",
            SourceKind::Eureka => "eureka",
            SourceKind::Kubernetes => "kubernetes",
            SourceKind::File => "file",
            SourceKind::Agents => "agents",
        })
    }
}

/// Where an endpoint came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The configured name of the source (for example `consul-dc1`).
    pub source: String,
    /// The kind of the source.
    pub kind: SourceKind,
    /// The source's own id of this endpoint (Consul `node/service-id`, Eureka instanceId…).
    pub native_id: String,
    /// The source's revision of this endpoint (Consul ModifyIndex, Eureka lastDirtyTimestamp…).
    pub revision: String,
}

/// Health of an endpoint as its source reports it. Only [`Health::Passing`] routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// All checks pass (Consul passing, Eureka UP, Kubernetes ready).
    Passing,
    /// Unknown or starting (Eureka STARTING/UNKNOWN).
    Unknown,
    /// A check warns.
    Warning,
    /// A check fails, or the instance is down or out of service.
    Critical,
}

impl Health {
    /// Whether traffic may be sent to an endpoint in this state.
    pub fn routes(self) -> bool {
        self == Health::Passing
    }

    /// The worse of two health values (critical > warning > unknown > passing).
    pub fn worst(self, other: Health) -> Health {
        self.max(other)
    }
}

/// The well-known label of a Kubernetes node's region; an agent group carrying it places
/// its workloads (and their agents) in that region.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The well-known label of a Kubernetes node's zone; an agent group carrying it places
/// its workloads (and their agents) in that zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Where an endpoint runs, as far as its source knows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Locality {
    /// Region or datacenter (Consul datacenter, Eureka/AWS region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Zone (Eureka `zone` metadata or availability-zone, Kubernetes zone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Node or host name where the source places it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// One address that serves a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// IP address or host name to connect to.
    pub address: String,
    /// Named ports (`http` → 8080).
    pub ports: SortedMap<String, u16>,
    /// Health as the source reports it.
    pub health: Health,
    /// Region, zone, node.
    #[serde(default)]
    pub locality: Locality,
    /// Labels (Kubernetes labels; key/value tags elsewhere).
    #[serde(default)]
    pub labels: SortedMap<String, String>,
    /// Plain tags (Consul tags).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Free-form metadata (Consul Meta, Eureka metadata).
    #[serde(default)]
    pub metadata: SortedMap<String, String>,
    /// Extra DNS names that resolve to this service (Eureka vipAddress, file hosts).
    #[serde(default)]
    pub hostnames: SortedSet<String>,
    /// SPIFFE identity, when the endpoint runs a Causeway agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Set when this copy was synced into its source from another registry
    /// (consul-k8s `external-source=kubernetes` gives `Some(Kubernetes)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_from: Option<SourceKind>,
    /// Where it came from.
    pub provenance: Provenance,
    /// In the merged view only: the agents' workloads folded into this registration
    /// (an agent bound to it by [`BIND_SOURCE_METADATA`]). Empty in source data.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bound: Vec<Provenance>,
    /// True while its source is failing and this is the last known good copy.
    #[serde(default)]
    pub stale: bool,
}

impl Endpoint {
    /// A passing endpoint with no ports and empty metadata; fill in the rest by field.
    pub fn new(address: impl Into<String>, provenance: Provenance) -> Self {
        Self {
            address: address.into(),
            ports: SortedMap::new(),
            health: Health::Passing,
            locality: Locality::default(),
            labels: SortedMap::new(),
            tags: Vec::new(),
            metadata: SortedMap::new(),
            hostnames: SortedSet::new(),
            identity: None,
            synced_from: None,
            provenance,
            bound: Vec::new(),
            stale: false,
        }
    }

    /// Whether traffic may be sent here.
    pub fn healthy(&self) -> bool {
        self.health.routes()
    }

    /// The id of this endpoint in the merged registry: `(source, native id)`.
    pub fn id(&self) -> EndpointId {
        EndpointId {
            source: self.provenance.source.clone(),
            native_id: self.provenance.native_id.clone(),
        }
    }
}

/// Identifies an endpoint across the merged registry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EndpointId {
    /// Source name.
    pub source: String,
    /// The source's native id.
    pub native_id: String,
}

/// Errors of this module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A native name has no character that can make a DNS label.
    #[error(
        "service name {0:?} has no letter or digit to make a DNS label from; rename it in its registry or map it explicitly"
    )]
    EmptyName(String),
    /// A service key in text form is not `namespace/name`.
    #[error("service key {0:?} is not of the form namespace/name; write it as e.g. default/web")]
    BadKey(String),
}

/// Turns a native service name (`REVIEWS`, `web_api`, `Billing.V2`) into a DNS label:
/// lower case, every run of other characters replaced by one `-`, trimmed, at most 63
/// characters.
pub fn normalize_name(native: &str) -> Result<String, RegistryError> {
    let mut out = String::with_capacity(native.len());
    for c in native.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    out.truncate(63);
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        return Err(RegistryError::EmptyName(native.to_string()));
    }
    Ok(out)
}

/// How one source places its names into mesh namespaces.
///
/// Rules are tried in order: an explicit service rule, then the source's own namespace
/// (Consul namespace, Kubernetes namespace) through `by_native_namespace`, then the
/// datacenter through `by_datacenter`, then the source's native namespace as-is when
/// `keep_native_namespace` is set, else `default_namespace`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceMapping {
    /// Namespace for everything no rule matches.
    pub default_namespace: String,
    /// Native service name → namespace.
    #[serde(default)]
    pub by_service: BTreeMap<String, String>,
    /// Native namespace (Consul/Kubernetes) → mesh namespace.
    #[serde(default)]
    pub by_native_namespace: BTreeMap<String, String>,
    /// Datacenter → mesh namespace.
    #[serde(default)]
    pub by_datacenter: BTreeMap<String, String>,
    /// Use the native namespace itself when no rule matches (Kubernetes does).
    #[serde(default)]
    pub keep_native_namespace: bool,
}

impl NamespaceMapping {
    /// Everything into one namespace.
    pub fn fixed(namespace: impl Into<String>) -> Self {
        Self {
            default_namespace: namespace.into(),
            by_service: BTreeMap::new(),
            by_native_namespace: BTreeMap::new(),
            by_datacenter: BTreeMap::new(),
            keep_native_namespace: false,
        }
    }

    /// The key of a native service. `native_namespace` and `datacenter` are what the
    /// source reports, if anything.
    pub fn key(
        &self,
        native_name: &str,
        native_namespace: Option<&str>,
        datacenter: Option<&str>,
    ) -> Result<ServiceKey, RegistryError> {
        let name = normalize_name(native_name)?;
        let ns = if let Some(ns) = self.by_service.get(native_name) {
            ns.clone()
        } else if let Some(ns) = native_namespace.and_then(|n| self.by_native_namespace.get(n)) {
            ns.clone()
        } else if let Some(ns) = datacenter.and_then(|d| self.by_datacenter.get(d)) {
            ns.clone()
        } else if let (true, Some(ns)) = (self.keep_native_namespace, native_namespace) {
            normalize_name(ns)?
        } else {
            self.default_namespace.clone()
        };
        Ok(ServiceKey::new(ns, name))
    }
}

/// The endpoints of one service from one source, by native id.
pub type ServiceEndpoints = BTreeMap<String, Endpoint>;

/// Everything one source knows, by service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceSnapshot {
    /// Services and their endpoints (keyed by native id). A service with no endpoints is absent.
    pub services: BTreeMap<ServiceKey, ServiceEndpoints>,
}

impl SourceSnapshot {
    /// Number of endpoints across all services.
    pub fn endpoint_count(&self) -> usize {
        self.services.values().map(BTreeMap::len).sum()
    }
}

/// What a source reports about its data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SourceChange {
    /// Its complete state (initial sync, full re-fetch): services not in it are gone.
    Full(SourceSnapshot),
    /// Only these services changed; each map replaces that service's endpoints from this
    /// source, and an empty map removes the service from this source.
    Services(BTreeMap<ServiceKey, ServiceEndpoints>),
}

/// The health of a source itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SourceStatus {
    /// Not synced yet.
    Syncing,
    /// Synced; its endpoints are current.
    Synced,
    /// Failing; its endpoints are the last known good, marked stale.
    Stale,
}

/// A source's state as shown to operators (`causewayctl registry sources`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceState {
    /// Synced, syncing or stale.
    pub status: SourceStatus,
    /// The last error, kept until the next success.
    pub last_error: Option<String>,
    /// When it went stale (ms since the Unix epoch), while stale.
    pub stale_since_ms: Option<u64>,
}

impl SourceState {
    /// Not synced yet.
    pub fn syncing() -> Self {
        Self {
            status: SourceStatus::Syncing,
            last_error: None,
            stale_since_ms: None,
        }
    }

    /// Synced, no error.
    pub fn synced() -> Self {
        Self {
            status: SourceStatus::Synced,
            last_error: None,
            stale_since_ms: None,
        }
    }

    /// Failing with `error` since `since_ms`.
    pub fn stale(error: impl Into<String>, since_ms: u64) -> Self {
        Self {
            status: SourceStatus::Stale,
            last_error: Some(error.into()),
            stale_since_ms: Some(since_ms),
        }
    }

    /// Whether its endpoints are to be shown as stale.
    pub fn is_stale(&self) -> bool {
        self.status == SourceStatus::Stale
    }
}

/// The changes to one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDelta {
    /// The service.
    pub key: ServiceKey,
    /// New endpoints.
    pub added: Vec<Endpoint>,
    /// Endpoints whose data changed (ports, health, stale flag, metadata…).
    pub updated: Vec<Endpoint>,
    /// Endpoints gone.
    pub removed: Vec<EndpointId>,
}

impl ServiceDelta {
    /// An empty delta for `key`.
    pub fn new(key: ServiceKey) -> Self {
        Self {
            key,
            added: Vec::new(),
            updated: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// No change at all.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty()
    }
}

/// The changes of one registry step, with the version they lead to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryDelta {
    /// The registry version after this delta (unchanged when the delta is empty).
    pub version: u64,
    /// Per-service changes, only for services that changed.
    pub services: Vec<ServiceDelta>,
}

impl RegistryDelta {
    /// No service changed.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// The minimal delta between two versions of one service's endpoints.
pub fn diff_endpoints(
    key: &ServiceKey,
    old: &BTreeMap<EndpointId, Endpoint>,
    new: &BTreeMap<EndpointId, Endpoint>,
) -> ServiceDelta {
    let mut delta = ServiceDelta::new(key.clone());
    for (id, ep) in new {
        match old.get(id) {
            None => delta.added.push(ep.clone()),
            Some(prev) if prev != ep => delta.updated.push(ep.clone()),
            Some(_) => {}
        }
    }
    for id in old.keys() {
        if !new.contains_key(id) {
            delta.removed.push(id.clone());
        }
    }
    delta
}

/// A map keyed by port number, read from JSON (whose keys are strings). serde reads
/// number keys from strings itself, but not inside an internally tagged enum like
/// [`Conflict`], which buffers the keys as strings first.
fn port_keyed<'de, D: serde::Deserializer<'de>, V: Deserialize<'de>>(
    d: D,
) -> Result<BTreeMap<u16, V>, D::Error> {
    BTreeMap::<String, V>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| {
            k.parse::<u16>().map(|k| (k, v)).map_err(|_| {
                serde::de::Error::custom(format!("port {k:?} is not a number 0..=65535"))
            })
        })
        .collect()
}

/// A disagreement between sources, reported rather than hidden.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Conflict {
    /// One port name maps to different numbers across the endpoints of a service.
    PortMismatch {
        /// The service.
        service: ServiceKey,
        /// The port name.
        port: String,
        /// Each number with the sources that use it.
        #[serde(deserialize_with = "port_keyed")]
        numbers: BTreeMap<u16, BTreeSet<String>>,
    },
    /// One address is an endpoint of the service in several sources.
    DuplicateAddress {
        /// The service.
        service: ServiceKey,
        /// The address.
        address: String,
        /// The sources that list it.
        sources: BTreeSet<String>,
    },
    /// An endpoint was refused before it entered the merged registry (an address inside
    /// the VIP range, no address, a port 0): it is not pushed to agents, and the rest of
    /// its source's data is used as usual.
    InvalidEndpoint {
        /// The service.
        service: ServiceKey,
        /// The source that reported it.
        source: String,
        /// The source's own id of the endpoint.
        native_id: String,
        /// Its address.
        address: String,
        /// What is wrong, and what to fix at the source.
        reason: String,
    },
    /// A copy synced from another registry (consul-k8s) was dropped in favour of the original.
    SyncedCopy {
        /// The service.
        service: ServiceKey,
        /// The address.
        address: String,
        /// The source holding the synced copy.
        copy_source: String,
        /// The source of the original.
        original_source: String,
    },
}

/// One source as the registry holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceEntry {
    /// Its kind.
    pub kind: SourceKind,
    /// Its state.
    pub state: SourceState,
    /// Its last known good data (endpoints carry `stale: false` here; staleness is
    /// applied when merging).
    pub snapshot: SourceSnapshot,
}

/// The merged registry: every source's last known good data, merged by service key.
///
/// Pure and deterministic. Each call that changes something returns the minimal
/// [`RegistryDelta`] over the merged view and bumps [`Registry::version`] once. The
/// cost of a change is proportional to the services it touches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    version: u64,
    sources: BTreeMap<String, SourceEntry>,
    /// Which sources hold each service (index for merging one service).
    holders: BTreeMap<ServiceKey, BTreeSet<String>>,
}

impl Registry {
    /// An empty registry at version 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current version; it grows by one with each non-empty delta.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Sources by name.
    pub fn sources(&self) -> &BTreeMap<String, SourceEntry> {
        &self.sources
    }

    /// Applies what a source reported. `Full` replaces its data; `Services` replaces
    /// only the services it names. Marks the source synced.
    pub fn apply(&mut self, source: &str, kind: SourceKind, change: SourceChange) -> RegistryDelta {
        self.apply_with_state(source, kind, change, SourceState::synced())
    }

    /// Applies data and sets the source's state in one step, giving one delta. With a
    /// stale state (a source that got some answers while others failed) the new data is
    /// kept as last known good and shown stale; the first stale time is kept.
    pub fn apply_with_state(
        &mut self,
        source: &str,
        kind: SourceKind,
        change: SourceChange,
        state: SourceState,
    ) -> RegistryDelta {
        let mut services = Vec::new();
        let version =
            self.apply_with_state_into(source, kind, change, state, &mut |d| services.push(d));
        RegistryDelta { version, services }
    }

    /// [`Registry::apply_with_state`], handing each service's delta to `sink` as soon as
    /// it is known instead of collecting them; returns the new version. The change is
    /// applied service by service, so at no time is more than one service's old and new
    /// merged view held: a full snapshot of 100k endpoints costs no second copy of it.
    pub fn apply_with_state_into(
        &mut self,
        source: &str,
        kind: SourceKind,
        change: SourceChange,
        state: SourceState,
        sink: &mut dyn FnMut(ServiceDelta),
    ) -> u64 {
        let entry = self.entry(source, kind);
        let old_stale = entry.state.is_stale();
        let new_stale = state.is_stale();
        let mut touched: BTreeSet<ServiceKey> = BTreeSet::new();
        let full = matches!(change, SourceChange::Full(_));
        if old_stale != new_stale || full {
            // a full snapshot may drop any service; a stale flag flip touches every endpoint
            touched.extend(entry.snapshot.services.keys().cloned());
        }
        let mut incoming = match change {
            SourceChange::Full(snapshot) => snapshot.services,
            SourceChange::Services(services) => services,
        };
        touched.extend(incoming.keys().cloned());
        let mut changed = false;
        for key in touched {
            let old = self.service_with(&key, Some((source, old_stale)));
            let entry = self.entry(source, kind);
            match incoming.remove(&key) {
                Some(eps) if !eps.is_empty() => {
                    entry.snapshot.services.insert(key.clone(), eps);
                }
                Some(_) => {
                    entry.snapshot.services.remove(&key);
                }
                None if full => {
                    entry.snapshot.services.remove(&key);
                }
                None => {}
            }
            self.update_holder(source, &key);
            let new = self.service_with(&key, Some((source, new_stale)));
            let delta = diff_endpoints(&key, &old, &new);
            if !delta.is_empty() {
                changed = true;
                sink(delta);
            }
        }
        let entry = self.entry(source, kind);
        entry.state = if new_stale {
            SourceState {
                stale_since_ms: entry.state.stale_since_ms.or(state.stale_since_ms),
                ..state
            }
        } else {
            state
        };
        entry.kind = kind;
        if changed {
            self.version += 1;
        }
        self.version
    }

    /// Marks a source failing: its endpoints stay, flagged stale. `now_ms` is kept as
    /// the start of staleness if it was not stale already. The error is kept either way.
    pub fn mark_stale(
        &mut self,
        source: &str,
        kind: SourceKind,
        error: &str,
        now_ms: u64,
    ) -> RegistryDelta {
        let mut services = Vec::new();
        let version = self.mark_stale_into(source, kind, error, now_ms, &mut |d| services.push(d));
        RegistryDelta { version, services }
    }

    /// [`Registry::mark_stale`] with each service's delta handed to `sink`.
    pub fn mark_stale_into(
        &mut self,
        source: &str,
        kind: SourceKind,
        error: &str,
        now_ms: u64,
        sink: &mut dyn FnMut(ServiceDelta),
    ) -> u64 {
        let since = self
            .entry(source, kind)
            .state
            .stale_since_ms
            .unwrap_or(now_ms);
        self.apply_with_state_into(
            source,
            kind,
            SourceChange::Services(BTreeMap::new()),
            SourceState::stale(error, since),
            sink,
        )
    }

    /// Removes a source and everything it contributed (the source was deleted from the
    /// configuration; a failing source is never removed this way).
    pub fn remove_source(&mut self, source: &str) -> RegistryDelta {
        let mut services = Vec::new();
        let version = self.remove_source_into(source, &mut |d| services.push(d));
        RegistryDelta { version, services }
    }

    /// [`Registry::remove_source`] with each service's delta handed to `sink`.
    pub fn remove_source_into(&mut self, source: &str, sink: &mut dyn FnMut(ServiceDelta)) -> u64 {
        let Some(entry) = self.sources.get(source) else {
            return self.version;
        };
        let touched: Vec<ServiceKey> = entry.snapshot.services.keys().cloned().collect();
        let mut changed = false;
        for key in touched {
            let old = self.service(&key);
            self.unhold(&key, source);
            let new = self.service(&key);
            let delta = diff_endpoints(&key, &old, &new);
            if !delta.is_empty() {
                changed = true;
                sink(delta);
            }
        }
        self.sources.remove(source);
        if changed {
            self.version += 1;
        }
        self.version
    }

    /// The merged endpoints of one service, by id; synced copies whose original is
    /// present are left out, endpoints of stale sources carry `stale: true`, and an
    /// agent's workload bound to a registry registration (see [`BIND_SOURCE_METADATA`])
    /// is folded into that registration's endpoint instead of being listed twice.
    pub fn service(&self, key: &ServiceKey) -> BTreeMap<EndpointId, Endpoint> {
        self.service_with(key, None)
    }

    /// [`Registry::service`], with `stale_of` overriding one source's stale flag (the
    /// view just before or just after a state change).
    fn service_with(
        &self,
        key: &ServiceKey,
        stale_of: Option<(&str, bool)>,
    ) -> BTreeMap<EndpointId, Endpoint> {
        let mut out = BTreeMap::new();
        let Some(holders) = self.holders.get(key) else {
            return out;
        };
        let mut all: Vec<(&str, &SourceEntry, &Endpoint)> = Vec::new();
        for name in holders {
            let Some(entry) = self.sources.get(name) else {
                continue;
            };
            if let Some(eps) = entry.snapshot.services.get(key) {
                all.extend(eps.values().map(|e| (name.as_str(), entry, e)));
            }
        }
        let stale = |name: &str, entry: &SourceEntry| match stale_of {
            Some((s, flag)) if s == name => flag,
            _ => entry.state.is_stale(),
        };
        let originals: BTreeSet<(SourceKind, &str)> = all
            .iter()
            .filter(|(_, _, e)| e.synced_from.is_none())
            .map(|(_, entry, e)| (entry.kind, e.address.as_str()))
            .collect();
        // Agents' workloads that name a registry source, by (source, address).
        let binds: BTreeMap<(&str, &str), &Endpoint> = all
            .iter()
            .filter(|(_, entry, _)| entry.kind == SourceKind::Agents)
            .filter_map(|(_, _, e)| {
                let bind = e.metadata.get(BIND_SOURCE_METADATA)?;
                Some(((bind.as_str(), e.address.as_str()), *e))
            })
            .collect();
        let mut bound: BTreeSet<(&str, &str)> = BTreeSet::new();
        for &(name, entry, orig) in &all {
            if let Some(origin) = orig.synced_from
                && originals.contains(&(origin, orig.address.as_str()))
            {
                continue;
            }
            let mut ep = orig.clone();
            ep.stale = stale(name, entry);
            if entry.kind != SourceKind::Agents
                && let Some(agent) = binds.get(&(name, orig.address.as_str()))
            {
                bound.insert((name, agent.address.as_str()));
                bind_agent(&mut ep, agent);
            }
            out.insert(ep.id(), ep);
        }
        // A bound workload is shown once, as its registration; unmatched ones stand alone.
        out.retain(|_, ep| {
            ep.provenance.kind != SourceKind::Agents
                || !ep
                    .metadata
                    .get(BIND_SOURCE_METADATA)
                    .is_some_and(|b| bound.contains(&(b.as_str(), ep.address.as_str())))
        });
        out
    }

    /// Every service key known, in order.
    pub fn service_keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.holders.keys()
    }

    /// The merged services' keys after `after` (all of them with `None`), in order: a
    /// page's start found by the tree, not by walking the keys before it.
    pub fn service_keys_after(
        &self,
        after: Option<&ServiceKey>,
    ) -> impl Iterator<Item = &ServiceKey> {
        use std::ops::Bound;
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.holders
            .range::<ServiceKey, _>((lower, Bound::Unbounded))
            .map(|(k, _)| k)
    }

    /// The whole merged registry: service → endpoints.
    pub fn merged(&self) -> BTreeMap<ServiceKey, Vec<Endpoint>> {
        self.holders
            .keys()
            .map(|k| (k.clone(), self.service(k).into_values().collect()))
            .filter(|(_, v): &(ServiceKey, Vec<Endpoint>)| !v.is_empty())
            .collect()
    }

    /// The whole merged registry as one delta of additions (what a new subscriber gets).
    pub fn snapshot_delta(&self) -> RegistryDelta {
        RegistryDelta {
            version: self.version,
            services: self
                .merged()
                .into_iter()
                .map(|(key, added)| ServiceDelta {
                    added,
                    ..ServiceDelta::new(key)
                })
                .collect(),
        }
    }

    /// Disagreements between sources, for every service.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let mut out = Vec::new();
        for key in self.holders.keys() {
            out.extend(self.service_conflicts(key));
        }
        out
    }

    /// Disagreements between sources for one service.
    pub fn service_conflicts(&self, key: &ServiceKey) -> Vec<Conflict> {
        let mut out = Vec::new();
        let Some(holders) = self.holders.get(key) else {
            return out;
        };
        let mut all: Vec<(&str, SourceKind, &Endpoint)> = Vec::new();
        for name in holders {
            let Some(entry) = self.sources.get(name) else {
                continue;
            };
            if let Some(eps) = entry.snapshot.services.get(key) {
                all.extend(eps.values().map(|e| (name.as_str(), entry.kind, e)));
            }
        }
        // An agent's workload bound to a registration is that registration, not a
        // second endpoint at its address: no conflict with it.
        all.retain(|(_, kind, ep)| {
            *kind != SourceKind::Agents
                || !ep.metadata.get(BIND_SOURCE_METADATA).is_some_and(|bind| {
                    all_bound_to(holders, &self.sources, key, bind, &ep.address)
                })
        });
        let mut ports: BTreeMap<&str, BTreeMap<u16, BTreeSet<String>>> = BTreeMap::new();
        let mut addresses: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for (source, _, ep) in &all {
            let original = ep.synced_from.and_then(|origin| {
                all.iter().find(|(_, k, o)| {
                    *k == origin && o.synced_from.is_none() && o.address == ep.address
                })
            });
            if let Some((orig, _, _)) = original {
                out.push(Conflict::SyncedCopy {
                    service: key.clone(),
                    address: ep.address.clone(),
                    copy_source: source.to_string(),
                    original_source: orig.to_string(),
                });
                continue;
            }
            for (name, number) in &ep.ports {
                ports
                    .entry(name.as_str())
                    .or_default()
                    .entry(*number)
                    .or_default()
                    .insert(source.to_string());
            }
            addresses
                .entry(ep.address.as_str())
                .or_default()
                .insert(source.to_string());
        }
        for (port, numbers) in ports {
            if numbers.len() > 1 {
                out.push(Conflict::PortMismatch {
                    service: key.clone(),
                    port: port.to_string(),
                    numbers,
                });
            }
        }
        for (address, sources) in addresses {
            if sources.len() > 1 {
                out.push(Conflict::DuplicateAddress {
                    service: key.clone(),
                    address: address.to_string(),
                    sources,
                });
            }
        }
        out
    }

    fn unhold(&mut self, key: &ServiceKey, source: &str) {
        if let Some(h) = self.holders.get_mut(key) {
            h.remove(source);
            if h.is_empty() {
                self.holders.remove(key);
            }
        }
    }

    fn entry(&mut self, source: &str, kind: SourceKind) -> &mut SourceEntry {
        self.sources
            .entry(source.to_string())
            .or_insert_with(|| SourceEntry {
                kind,
                state: SourceState::syncing(),
                snapshot: SourceSnapshot::default(),
            })
    }

    fn update_holder(&mut self, source: &str, key: &ServiceKey) {
        let held = self
            .sources
            .get(source)
            .is_some_and(|e| e.snapshot.services.contains_key(key));
        if held {
            let holders = self.holders.entry(key.clone()).or_default();
            if !holders.contains(source) {
                holders.insert(source.to_string());
            }
        } else {
            self.unhold(key, source);
        }
    }
}

/// Metadata key on an agent's workload endpoint naming the registry source (Consul,
/// Eureka…) whose registration of the same service at the same address is this
/// workload: the merged registry then shows one endpoint, the registration's, carrying
/// the agent's identity (see ARCHITECTURE.md, "Joining from existing registries").
pub const BIND_SOURCE_METADATA: &str = "causeway.io/registry-source";

/// Whether source `bind` (one of `holders`) has an endpoint of `key` at `address`.
fn all_bound_to(
    holders: &BTreeSet<String>,
    sources: &BTreeMap<String, SourceEntry>,
    key: &ServiceKey,
    bind: &str,
    address: &str,
) -> bool {
    holders.contains(bind)
        && sources
            .get(bind)
            .and_then(|e| e.snapshot.services.get(key))
            .is_some_and(|eps| eps.values().any(|e| e.address == address))
}

/// Folds an agent's workload into the registry endpoint it is bound to: the identity,
/// the agent's `causeway.io/*` metadata (mTLS mode) and its provenance in `bound`.
fn bind_agent(ep: &mut Endpoint, agent: &Endpoint) {
    ep.identity.clone_from(&agent.identity);
    for (k, v) in &agent.metadata {
        if k.starts_with("causeway.io/") && k != BIND_SOURCE_METADATA {
            ep.metadata.insert(k.clone(), v.clone());
        }
    }
    ep.bound.push(agent.provenance.clone());
}

/// A small map kept as one sorted `Vec` of pairs.
///
/// Endpoints carry a handful of ports, labels and metadata entries each; a `BTreeMap`
/// allocates a whole 11-slot node for even one entry, this allocates exactly what it
/// holds (see BENCHMARKS.md, merged registry at scale). Lookups are binary searches; it
/// iterates in key order and serializes as a map, like the `BTreeMap` it replaces.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SortedMap<K, V> {
    entries: Vec<(K, V)>,
}

impl<K, V> Default for SortedMap<K, V> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for SortedMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.entries.iter().map(|(k, v)| (k, v)))
            .finish()
    }
}

impl<K: Ord, V> SortedMap<K, V> {
    /// An empty map (allocates nothing).
    pub fn new() -> Self {
        Self::default()
    }

    fn find<Q>(&self, key: &Q) -> Result<usize, usize>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.entries.binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    /// Inserts or replaces; returns the previous value.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (key, value));
                None
            }
        }
    }

    /// The value of `key`.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    /// The value of `key`, mutable.
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.find(key).ok().map(|i| &mut self.entries[i].1)
    }

    /// Whether `key` is present.
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.find(key).is_ok()
    }

    /// Removes `key`; returns its value.
    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.find(key).ok().map(|i| self.entries.remove(i).1)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> + ExactSizeIterator {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    /// Keys in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &K> + ExactSizeIterator {
        self.entries.iter().map(|(k, _)| k)
    }

    /// Values in key order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + ExactSizeIterator {
        self.entries.iter().map(|(_, v)| v)
    }

    /// Builds from pairs in any order; a later pair wins over an earlier one with the
    /// same key (as collecting into a `BTreeMap` does).
    fn from_pairs(mut entries: Vec<(K, V)>) -> Self {
        // stable sort keeps input order among equal keys; keep the last of each run
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(K, V)> = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            match out.last_mut() {
                Some(last) if last.0 == k => last.1 = v,
                _ => out.push((k, v)),
            }
        }
        out.shrink_to_fit();
        Self { entries: out }
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for SortedMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self::from_pairs(iter.into_iter().collect())
    }
}

impl<K: Ord, V, const N: usize> From<[(K, V); N]> for SortedMap<K, V> {
    fn from(pairs: [(K, V); N]) -> Self {
        Self::from_pairs(pairs.into())
    }
}

impl<K: Ord, V> From<BTreeMap<K, V>> for SortedMap<K, V> {
    fn from(map: BTreeMap<K, V>) -> Self {
        let mut entries: Vec<(K, V)> = map.into_iter().collect();
        entries.shrink_to_fit();
        Self { entries }
    }
}

impl<K: Ord + Clone, V: Clone> From<&SortedMap<K, V>> for BTreeMap<K, V> {
    fn from(map: &SortedMap<K, V>) -> Self {
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl<K: Ord, V> Extend<(K, V)> for SortedMap<K, V> {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        let mut all = std::mem::take(&mut self.entries);
        all.extend(iter);
        *self = Self::from_pairs(all);
    }
}

impl<K, V> IntoIterator for SortedMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl<'a, K, V> IntoIterator for &'a SortedMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}

impl<K, V, Q> std::ops::Index<&Q> for SortedMap<K, V>
where
    K: Ord + std::borrow::Borrow<Q>,
    Q: Ord + ?Sized,
{
    type Output = V;
    fn index(&self, key: &Q) -> &V {
        self.get(key)
            .expect("no entry for this key in the SortedMap")
    }
}

impl<K: Serialize, V: Serialize> Serialize for SortedMap<K, V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.entries.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> Deserialize<'de> for SortedMap<K, V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<K, V>::deserialize(d)?;
        Ok(map.into())
    }
}

/// A small set kept as one sorted `Vec` (see [`SortedMap`]); serializes as a sequence.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SortedSet<T> {
    items: Vec<T>,
}

impl<T> Default for SortedSet<T> {
    fn default() -> Self {
        Self { items: Vec::new() }
    }
}

impl<T: fmt::Debug> fmt::Debug for SortedSet<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.items.iter()).finish()
    }
}

impl<T: Ord> SortedSet<T> {
    /// An empty set (allocates nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `item`; false when it was present.
    pub fn insert(&mut self, item: T) -> bool {
        match self.items.binary_search(&item) {
            Ok(_) => false,
            Err(i) => {
                self.items.insert(i, item);
                true
            }
        }
    }

    /// Whether `item` is present.
    pub fn contains<Q>(&self, item: &Q) -> bool
    where
        T: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.items
            .binary_search_by(|x| x.borrow().cmp(item))
            .is_ok()
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// No items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Items in order.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.items.iter()
    }

    fn from_items(mut items: Vec<T>) -> Self {
        items.sort();
        items.dedup();
        items.shrink_to_fit();
        Self { items }
    }
}

impl<T: Ord> FromIterator<T> for SortedSet<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        Self::from_items(iter.into_iter().collect())
    }
}

impl<T: Ord, const N: usize> From<[T; N]> for SortedSet<T> {
    fn from(items: [T; N]) -> Self {
        Self::from_items(items.into())
    }
}

impl<T: Ord> Extend<T> for SortedSet<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, iter: I) {
        let mut all = std::mem::take(&mut self.items);
        all.extend(iter);
        *self = Self::from_items(all);
    }
}

impl<T> IntoIterator for SortedSet<T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

impl<'a, T> IntoIterator for &'a SortedSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.iter()
    }
}

impl<T: Serialize> Serialize for SortedSet<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.items.iter())
    }
}

impl<'de, T: Deserialize<'de> + Ord> Deserialize<'de> for SortedSet<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::from_items(Vec::<T>::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The admin API sends conflicts as JSON and causewayctl reads them back: a port
    /// mismatch (keyed by port number) could not be read.
    #[test]
    fn conflicts_round_trip_through_json() {
        let c = Conflict::PortMismatch {
            service: ServiceKey::new("default", "web"),
            port: "http".into(),
            numbers: BTreeMap::from([
                (8080, BTreeSet::from(["consul".to_owned()])),
                (9090, BTreeSet::from(["file".to_owned()])),
            ]),
        };
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""9090":["file"]"#), "{json}");
        assert_eq!(serde_json::from_str::<Conflict>(&json).unwrap(), c);
        let bad = json.replace("9090", "99999");
        let err = serde_json::from_str::<Conflict>(&bad).unwrap_err();
        assert!(err.to_string().contains("99999"), "{err}");
    }

    fn ep(source: &str, kind: SourceKind, id: &str, addr: &str, port: u16) -> Endpoint {
        let mut e = Endpoint::new(
            addr,
            Provenance {
                source: source.into(),
                kind,
                native_id: id.into(),
                revision: "1".into(),
            },
        );
        e.ports.insert("http".into(), port);
        e
    }

    fn svc(eps: Vec<Endpoint>) -> ServiceEndpoints {
        eps.into_iter()
            .map(|e| (e.provenance.native_id.clone(), e))
            .collect()
    }

    fn full(services: Vec<(ServiceKey, Vec<Endpoint>)>) -> SourceChange {
        SourceChange::Full(SourceSnapshot {
            services: services.into_iter().map(|(k, v)| (k, svc(v))).collect(),
        })
    }

    fn web() -> ServiceKey {
        ServiceKey::new("default", "web")
    }

    #[test]
    fn normalize_names() {
        assert_eq!(normalize_name("REVIEWS").unwrap(), "reviews");
        assert_eq!(normalize_name("web_api").unwrap(), "web-api");
        assert_eq!(
            normalize_name("TESTENG.METRICSD").unwrap(),
            "testeng-metricsd"
        );
        assert_eq!(normalize_name("--a__b--").unwrap(), "a-b");
        assert_eq!(normalize_name(&"x".repeat(80)).unwrap().len(), 63);
        assert!(matches!(
            normalize_name("__"),
            Err(RegistryError::EmptyName(_))
        ));
    }

    #[test]
    fn namespace_mapping_rules_in_order() {
        let mut m = NamespaceMapping::fixed("default");
        m.by_datacenter.insert("dc2".into(), "east".into());
        m.by_native_namespace.insert("team-a".into(), "a".into());
        m.by_service.insert("legacy".into(), "old".into());
        assert_eq!(
            m.key("WEB", None, Some("dc1")).unwrap(),
            ServiceKey::new("default", "web")
        );
        assert_eq!(
            m.key("web", None, Some("dc2")).unwrap(),
            ServiceKey::new("east", "web")
        );
        assert_eq!(
            m.key("web", Some("team-a"), Some("dc2")).unwrap(),
            ServiceKey::new("a", "web")
        );
        assert_eq!(
            m.key("legacy", Some("team-a"), None).unwrap(),
            ServiceKey::new("old", "legacy")
        );
        m.keep_native_namespace = true;
        assert_eq!(
            m.key("web", Some("Team_B"), None).unwrap(),
            ServiceKey::new("team-b", "web")
        );
    }

    #[test]
    fn service_key_serializes_as_string_and_rejects_garbage() {
        let mut snap = SourceSnapshot::default();
        snap.services.insert(
            web(),
            svc(vec![ep("c", SourceKind::Consul, "n/web-1", "10.0.0.1", 80)]),
        );
        let json = serde_json::to_string(&snap).unwrap();
        assert!(json.contains("\"default/web\""), "{json}");
        let back: SourceSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        assert!(serde_json::from_str::<ServiceKey>("\"noslash\"").is_err());
        assert!(serde_json::from_str::<ServiceKey>("\"/x\"").is_err());
    }

    #[test]
    fn registry_round_trips_through_json() {
        let mut r = Registry::new();
        r.apply(
            "c",
            SourceKind::Consul,
            full(vec![(
                web(),
                vec![ep("c", SourceKind::Consul, "1", "10.0.0.1", 80)],
            )]),
        );
        r.mark_stale("c", SourceKind::Consul, "boom", 5);
        let back: Registry = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert!(back.merged()[&web()][0].stale);
    }

    #[test]
    fn health_worst_and_routes() {
        assert_eq!(Health::Passing.worst(Health::Warning), Health::Warning);
        assert_eq!(Health::Critical.worst(Health::Warning), Health::Critical);
        assert!(Health::Passing.routes());
        assert!(!Health::Unknown.routes());
    }

    #[test]
    fn initial_sync_add_change_remove_give_minimal_deltas() {
        let mut r = Registry::new();
        let a = ep("c", SourceKind::Consul, "1", "10.0.0.1", 80);
        let b = ep("c", SourceKind::Consul, "2", "10.0.0.2", 80);
        let d = r.apply(
            "c",
            SourceKind::Consul,
            full(vec![(web(), vec![a.clone()])]),
        );
        assert_eq!(d.version, 1);
        assert_eq!(d.services.len(), 1);
        assert_eq!(d.services[0].added, vec![a.clone()]);

        // same data again: nothing, version unchanged
        let d = r.apply(
            "c",
            SourceKind::Consul,
            full(vec![(web(), vec![a.clone()])]),
        );
        assert!(d.is_empty());
        assert_eq!(d.version, 1);

        // add
        let d = r.apply(
            "c",
            SourceKind::Consul,
            SourceChange::Services([(web(), svc(vec![a.clone(), b.clone()]))].into()),
        );
        assert_eq!(d.version, 2);
        assert_eq!(d.services[0].added, vec![b.clone()]);
        assert!(d.services[0].updated.is_empty() && d.services[0].removed.is_empty());

        // health flip
        let mut b2 = b.clone();
        b2.health = Health::Critical;
        let d = r.apply(
            "c",
            SourceKind::Consul,
            SourceChange::Services([(web(), svc(vec![a.clone(), b2.clone()]))].into()),
        );
        assert_eq!(d.services[0].updated, vec![b2.clone()]);
        assert!(
            !r.merged()[&web()]
                .iter()
                .find(|e| e.address == "10.0.0.2")
                .unwrap()
                .healthy()
        );

        // removal of one, then of the service
        let d = r.apply(
            "c",
            SourceKind::Consul,
            SourceChange::Services([(web(), svc(vec![a.clone()]))].into()),
        );
        assert_eq!(d.services[0].removed, vec![b.id()]);
        let d = r.apply(
            "c",
            SourceKind::Consul,
            SourceChange::Services([(web(), BTreeMap::new())].into()),
        );
        assert_eq!(d.services[0].removed, vec![a.id()]);
        assert!(r.merged().is_empty());
        assert_eq!(r.version(), 5);
    }

    #[test]
    fn one_service_change_touches_only_that_service() {
        let mut r = Registry::new();
        let services: Vec<(ServiceKey, Vec<Endpoint>)> = (0..50)
            .map(|i| {
                (
                    ServiceKey::new("default", format!("s{i}")),
                    vec![ep("c", SourceKind::Consul, &format!("{i}"), "10.0.0.1", 80)],
                )
            })
            .collect();
        r.apply("c", SourceKind::Consul, full(services));
        let key = ServiceKey::new("default", "s7");
        let d = r.apply(
            "c",
            SourceKind::Consul,
            SourceChange::Services(
                [(
                    key.clone(),
                    svc(vec![ep("c", SourceKind::Consul, "7", "10.0.0.9", 80)]),
                )]
                .into(),
            ),
        );
        assert_eq!(d.services.len(), 1);
        assert_eq!(d.services[0].key, key);
        assert_eq!(d.services[0].updated.len(), 1);
    }

    #[test]
    fn stale_source_keeps_endpoints_and_recovers() {
        let mut r = Registry::new();
        let a = ep("c", SourceKind::Consul, "1", "10.0.0.1", 80);
        r.apply(
            "c",
            SourceKind::Consul,
            full(vec![(web(), vec![a.clone()])]),
        );
        let d = r.mark_stale("c", SourceKind::Consul, "HTTP 500 from consul", 1000);
        assert_eq!(d.services[0].updated.len(), 1);
        assert!(d.services[0].updated[0].stale);
        assert_eq!(r.merged()[&web()].len(), 1);
        let st = &r.sources()["c"].state;
        assert_eq!(st.status, SourceStatus::Stale);
        assert_eq!(st.last_error.as_deref(), Some("HTTP 500 from consul"));
        assert_eq!(st.stale_since_ms, Some(1000));

        // still failing: no delta, first stale time kept, newest error kept
        let d = r.mark_stale("c", SourceKind::Consul, "timeout", 2000);
        assert!(d.is_empty());
        assert_eq!(r.sources()["c"].state.stale_since_ms, Some(1000));
        assert_eq!(
            r.sources()["c"].state.last_error.as_deref(),
            Some("timeout")
        );

        // recovery with a partial update flips every endpoint back
        let other = ServiceKey::new("default", "api");
        let d = r.apply(
            "c",
            SourceKind::Consul,
            SourceChange::Services(
                [(
                    other.clone(),
                    svc(vec![ep("c", SourceKind::Consul, "9", "10.0.0.9", 90)]),
                )]
                .into(),
            ),
        );
        assert_eq!(d.services.len(), 2);
        assert!(r.merged().values().flatten().all(|e| !e.stale));
        assert_eq!(r.sources()["c"].state, SourceState::synced());
    }

    #[test]
    fn data_from_a_partly_failing_source_stays_stale_in_one_delta() {
        let mut r = Registry::new();
        let a = ep("c", SourceKind::Consul, "1", "10.0.0.1", 80);
        r.apply(
            "c",
            SourceKind::Consul,
            full(vec![(web(), vec![a.clone()])]),
        );
        r.mark_stale("c", SourceKind::Consul, "one watch fails", 10);
        let b = ep("c", SourceKind::Consul, "2", "10.0.0.2", 80);
        let d = r.apply_with_state(
            "c",
            SourceKind::Consul,
            SourceChange::Services([(web(), svc(vec![a.clone(), b.clone()]))].into()),
            SourceState::stale("one watch fails", 20),
        );
        assert_eq!(d.services.len(), 1);
        assert_eq!(d.services[0].added.len(), 1);
        assert!(d.services[0].added[0].stale);
        assert!(
            d.services[0].updated.is_empty(),
            "no stale flip back and forth"
        );
        assert_eq!(r.sources()["c"].state.stale_since_ms, Some(10));
    }

    #[test]
    fn same_service_from_two_sources_merges_with_provenance_and_conflicts() {
        let mut r = Registry::new();
        r.apply(
            "consul",
            SourceKind::Consul,
            full(vec![(
                web(),
                vec![ep(
                    "consul",
                    SourceKind::Consul,
                    "n/web-1",
                    "10.0.0.1",
                    8080,
                )],
            )]),
        );
        r.apply(
            "k8s",
            SourceKind::Kubernetes,
            full(vec![(
                web(),
                vec![ep(
                    "k8s",
                    SourceKind::Kubernetes,
                    "slice/0",
                    "10.0.0.2",
                    8081,
                )],
            )]),
        );
        let merged = &r.merged()[&web()];
        assert_eq!(merged.len(), 2);
        let sources: BTreeSet<&str> = merged
            .iter()
            .map(|e| e.provenance.source.as_str())
            .collect();
        assert_eq!(sources, BTreeSet::from(["consul", "k8s"]));
        let conflicts = r.conflicts();
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        match &conflicts[0] {
            Conflict::PortMismatch { port, numbers, .. } => {
                assert_eq!(port, "http");
                assert_eq!(
                    numbers.keys().copied().collect::<Vec<_>>(),
                    vec![8080, 8081]
                );
            }
            other => panic!("expected a port mismatch, got {other:?}"),
        }
    }

    #[test]
    fn one_address_from_two_sources_is_a_conflict() {
        let mut r = Registry::new();
        r.apply(
            "c1",
            SourceKind::Consul,
            full(vec![(
                web(),
                vec![ep("c1", SourceKind::Consul, "a", "10.0.0.1", 80)],
            )]),
        );
        r.apply(
            "e1",
            SourceKind::Eureka,
            full(vec![(
                web(),
                vec![ep("e1", SourceKind::Eureka, "b", "10.0.0.1", 80)],
            )]),
        );
        assert_eq!(r.merged()[&web()].len(), 2);
        assert!(matches!(
            &r.conflicts()[..],
            [Conflict::DuplicateAddress { address, sources, .. }] if address == "10.0.0.1" && sources.len() == 2
        ));
    }

    #[test]
    fn consul_k8s_synced_copy_is_not_double_counted() {
        let mut r = Registry::new();
        let mut copy = ep(
            "consul",
            SourceKind::Consul,
            "k8s-sync/web-abc",
            "10.1.0.5",
            8080,
        );
        copy.synced_from = Some(SourceKind::Kubernetes);
        r.apply(
            "consul",
            SourceKind::Consul,
            full(vec![(web(), vec![copy.clone()])]),
        );
        // without the original, the copy is the only knowledge: keep it
        assert_eq!(r.merged()[&web()].len(), 1);
        let d = r.apply(
            "k8s",
            SourceKind::Kubernetes,
            full(vec![(
                web(),
                vec![ep(
                    "k8s",
                    SourceKind::Kubernetes,
                    "web-abc/0",
                    "10.1.0.5",
                    8080,
                )],
            )]),
        );
        // the original arrives, the copy leaves
        assert_eq!(d.services[0].added.len(), 1);
        assert_eq!(d.services[0].removed, vec![copy.id()]);
        let merged = &r.merged()[&web()];
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].provenance.kind, SourceKind::Kubernetes);
        assert!(
            matches!(&r.conflicts()[..], [Conflict::SyncedCopy { copy_source, .. }] if copy_source == "consul")
        );
    }

    #[test]
    fn removing_a_source_removes_only_its_endpoints() {
        let mut r = Registry::new();
        r.apply(
            "a",
            SourceKind::File,
            full(vec![(
                web(),
                vec![ep("a", SourceKind::File, "1", "10.0.0.1", 80)],
            )]),
        );
        r.apply(
            "b",
            SourceKind::File,
            full(vec![(
                web(),
                vec![ep("b", SourceKind::File, "1", "10.0.0.2", 80)],
            )]),
        );
        let d = r.remove_source("a");
        assert_eq!(d.services[0].removed.len(), 1);
        assert_eq!(r.merged()[&web()].len(), 1);
        assert!(r.remove_source("nope").is_empty());
    }

    #[test]
    fn agent_bound_to_a_registration_is_one_endpoint_with_both() {
        let mut r = Registry::new();
        let reg = ep("consul", SourceKind::Consul, "n1/web-1", "10.0.0.5", 8080);
        let other = ep("consul", SourceKind::Consul, "n2/web-2", "10.0.0.6", 8080);
        r.apply(
            "consul",
            SourceKind::Consul,
            full(vec![(web(), vec![reg.clone(), other.clone()])]),
        );
        let mut agent = ep("agents", SourceKind::Agents, "agent-1", "10.0.0.5", 8080);
        agent.identity = Some("spiffe://td/ns/default/sa/web".into());
        agent
            .metadata
            .insert(BIND_SOURCE_METADATA.into(), "consul".into());
        agent
            .metadata
            .insert("causeway.io/mtls".into(), "strict".into());
        let d = r.apply(
            "agents",
            SourceKind::Agents,
            SourceChange::Services([(web(), svc(vec![agent.clone()]))].into()),
        );
        // the registration gains the identity; no second endpoint appears
        assert_eq!(d.services.len(), 1);
        assert!(d.services[0].added.is_empty(), "{d:?}");
        assert_eq!(d.services[0].updated.len(), 1);
        let merged = &r.merged()[&web()];
        assert_eq!(merged.len(), 2, "{merged:#?}");
        let bound = merged.iter().find(|e| e.address == "10.0.0.5").unwrap();
        assert_eq!(bound.provenance.source, "consul");
        assert_eq!(bound.provenance.native_id, "n1/web-1");
        assert_eq!(
            bound.identity.as_deref(),
            Some("spiffe://td/ns/default/sa/web")
        );
        assert_eq!(bound.metadata["causeway.io/mtls"], "strict");
        assert!(!bound.metadata.contains_key(BIND_SOURCE_METADATA));
        assert_eq!(bound.bound, vec![agent.provenance.clone()]);
        let unbound = merged.iter().find(|e| e.address == "10.0.0.6").unwrap();
        assert_eq!(unbound.identity, None);
        assert!(
            r.conflicts().is_empty(),
            "a bound workload is no duplicate address: {:?}",
            r.conflicts()
        );

        // the registration goes away: the agent's workload stands alone
        r.apply(
            "consul",
            SourceKind::Consul,
            full(vec![(web(), vec![other.clone()])]),
        );
        let merged = &r.merged()[&web()];
        let alone = merged.iter().find(|e| e.address == "10.0.0.5").unwrap();
        assert_eq!(alone.provenance.kind, SourceKind::Agents);
        assert!(alone.bound.is_empty());

        // an agent naming another source, or at another address, is not folded
        let mut r2 = Registry::new();
        r2.apply("consul", SourceKind::Consul, full(vec![(web(), vec![reg])]));
        let mut wrong = agent.clone();
        wrong
            .metadata
            .insert(BIND_SOURCE_METADATA.into(), "eureka".into());
        r2.apply(
            "agents",
            SourceKind::Agents,
            SourceChange::Services([(web(), svc(vec![wrong]))].into()),
        );
        assert_eq!(r2.merged()[&web()].len(), 2);
    }

    #[test]
    fn sorted_map_behaves_like_a_btree_map() {
        let m: SortedMap<String, u16> = [
            ("b".to_owned(), 2),
            ("a".to_owned(), 1),
            ("b".to_owned(), 3),
        ]
        .into();
        assert_eq!(m.len(), 2);
        assert_eq!(m["b"], 3, "the later pair wins, as in a BTreeMap");
        assert_eq!(m.keys().cloned().collect::<Vec<_>>(), vec!["a", "b"]);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"a":1,"b":3}"#);
        let back: SortedMap<String, u16> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        let mut m2 = SortedMap::new();
        assert_eq!(m2.insert("z".to_owned(), 1), None);
        assert_eq!(m2.insert("z".to_owned(), 2), Some(1));
        m2.extend([("a".to_owned(), 0)]);
        assert_eq!(m2.remove("z"), Some(2));
        assert!(m2.contains_key("a") && !m2.contains_key("z"));
        let s: SortedSet<&str> = ["x", "a", "x"].into();
        assert_eq!(s.iter().copied().collect::<Vec<_>>(), vec!["a", "x"]);
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"["a","x"]"#);
    }

    #[test]
    fn snapshot_delta_lists_everything() {
        let mut r = Registry::new();
        r.apply(
            "a",
            SourceKind::File,
            full(vec![(
                web(),
                vec![ep("a", SourceKind::File, "1", "10.0.0.1", 80)],
            )]),
        );
        let s = r.snapshot_delta();
        assert_eq!(s.version, 1);
        assert_eq!(s.services[0].added.len(), 1);
    }
}
