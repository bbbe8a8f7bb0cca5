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
    pub ports: BTreeMap<String, u16>,
    /// Health as the source reports it.
    pub health: Health,
    /// Region, zone, node.
    #[serde(default)]
    pub locality: Locality,
    /// Labels (Kubernetes labels; key/value tags elsewhere).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Plain tags (Consul tags).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Free-form metadata (Consul Meta, Eureka metadata).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Extra DNS names that resolve to this service (Eureka vipAddress, file hosts).
    #[serde(default)]
    pub hostnames: BTreeSet<String>,
    /// SPIFFE identity, when the endpoint runs a Causeway agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Set when this copy was synced into its source from another registry
    /// (consul-k8s `external-source=kubernetes` gives `Some(Kubernetes)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_from: Option<SourceKind>,
    /// Where it came from.
    pub provenance: Provenance,
    /// True while its source is failing and this is the last known good copy.
    #[serde(default)]
    pub stale: bool,
}

impl Endpoint {
    /// A passing endpoint with no ports and empty metadata; fill in the rest by field.
    pub fn new(address: impl Into<String>, provenance: Provenance) -> Self {
        Self {
            address: address.into(),
            ports: BTreeMap::new(),
            health: Health::Passing,
            locality: Locality::default(),
            labels: BTreeMap::new(),
            tags: Vec::new(),
            metadata: BTreeMap::new(),
            hostnames: BTreeSet::new(),
            identity: None,
            synced_from: None,
            provenance,
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
        let entry = self.entry(source, kind);
        let mut touched: BTreeSet<ServiceKey> = BTreeSet::new();
        let flips = entry.state.is_stale() != state.is_stale();
        if flips || matches!(change, SourceChange::Full(_)) {
            // a full snapshot may drop any service; a stale flag flip touches every endpoint
            touched.extend(entry.snapshot.services.keys().cloned());
        }
        match &change {
            SourceChange::Full(s) => touched.extend(s.services.keys().cloned()),
            SourceChange::Services(s) => touched.extend(s.keys().cloned()),
        }
        let old = self.merged_many(&touched);
        let entry = self.entry(source, kind);
        match change {
            SourceChange::Full(mut snapshot) => {
                snapshot.services.retain(|_, eps| !eps.is_empty());
                entry.snapshot = snapshot;
            }
            SourceChange::Services(services) => {
                for (key, eps) in services {
                    if eps.is_empty() {
                        entry.snapshot.services.remove(&key);
                    } else {
                        entry.snapshot.services.insert(key, eps);
                    }
                }
            }
        }
        entry.state = if state.is_stale() {
            SourceState {
                stale_since_ms: entry.state.stale_since_ms.or(state.stale_since_ms),
                ..state
            }
        } else {
            state
        };
        entry.kind = kind;
        self.update_holders(source, &touched);
        self.delta_from(old, touched)
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
        let entry = self.entry(source, kind);
        let was_stale = entry.state.is_stale();
        let since = entry.state.stale_since_ms.unwrap_or(now_ms);
        let touched: BTreeSet<ServiceKey> = if was_stale {
            BTreeSet::new()
        } else {
            entry.snapshot.services.keys().cloned().collect()
        };
        let old = self.merged_many(&touched);
        self.entry(source, kind).state = SourceState::stale(error, since);
        self.delta_from(old, touched)
    }

    /// Removes a source and everything it contributed (the source was deleted from the
    /// configuration; a failing source is never removed this way).
    pub fn remove_source(&mut self, source: &str) -> RegistryDelta {
        let Some(entry) = self.sources.get(source) else {
            return self.empty_delta();
        };
        let touched: BTreeSet<ServiceKey> = entry.snapshot.services.keys().cloned().collect();
        let old = self.merged_many(&touched);
        self.sources.remove(source);
        for key in &touched {
            self.unhold(key, source);
        }
        self.delta_from(old, touched)
    }

    /// The merged endpoints of one service, by id; synced copies whose original is
    /// present are left out, and endpoints of stale sources carry `stale: true`.
    pub fn service(&self, key: &ServiceKey) -> BTreeMap<EndpointId, Endpoint> {
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
        let originals: BTreeSet<(SourceKind, &str)> = all
            .iter()
            .filter(|(_, _, e)| e.synced_from.is_none())
            .map(|(_, entry, e)| (entry.kind, e.address.as_str()))
            .collect();
        for (_, entry, ep) in &all {
            if let Some(origin) = ep.synced_from
                && originals.contains(&(origin, ep.address.as_str()))
            {
                continue;
            }
            let mut ep = (*ep).clone();
            ep.stale = entry.state.is_stale();
            out.insert(ep.id(), ep);
        }
        out
    }

    /// Every service key known, in order.
    pub fn service_keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.holders.keys()
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

    fn empty_delta(&self) -> RegistryDelta {
        RegistryDelta {
            version: self.version,
            services: Vec::new(),
        }
    }

    fn unhold(&mut self, key: &ServiceKey, source: &str) {
        if let Some(h) = self.holders.get_mut(key) {
            h.remove(source);
            if h.is_empty() {
                self.holders.remove(key);
            }
        }
    }

    fn merged_many(
        &self,
        keys: &BTreeSet<ServiceKey>,
    ) -> BTreeMap<ServiceKey, BTreeMap<EndpointId, Endpoint>> {
        keys.iter().map(|k| (k.clone(), self.service(k))).collect()
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

    fn update_holders(&mut self, source: &str, touched: &BTreeSet<ServiceKey>) {
        for key in touched {
            let held = self
                .sources
                .get(source)
                .is_some_and(|e| e.snapshot.services.contains_key(key));
            if held {
                self.holders
                    .entry(key.clone())
                    .or_default()
                    .insert(source.to_string());
            } else {
                self.unhold(key, source);
            }
        }
    }

    fn delta_from(
        &mut self,
        old: BTreeMap<ServiceKey, BTreeMap<EndpointId, Endpoint>>,
        touched: BTreeSet<ServiceKey>,
    ) -> RegistryDelta {
        let mut services = Vec::new();
        let empty = BTreeMap::new();
        for key in touched {
            let new = self.service(&key);
            let delta = diff_endpoints(&key, old.get(&key).unwrap_or(&empty), &new);
            if !delta.is_empty() {
                services.push(delta);
            }
        }
        if !services.is_empty() {
            self.version += 1;
        }
        RegistryDelta {
            version: self.version,
            services,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
