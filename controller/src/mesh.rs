//! The mesh hub: the merged registry, VIP allocation, the versioned change history,
//! and the agents' sessions and leases.
//!
//! Every change (a source update, an agent registering or leaving, an agent removed)
//! goes through `Mesh::commit`: the services it touched get VIPs if new, the change is
//! written to the store in one transaction, the mesh version grows by one, the history
//! records which services changed, and subscribers are woken through a watch channel.
//! Subscribers pull what changed since their own version ([`Mesh::update_since`]), so a
//! slow agent's changes coalesce and nothing waits for it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use causeway_api::WorkloadGroup;
use causeway_api::policy::{GROUP_LABEL, Resource};
use causeway_api::push::{
    ConfigUpdate, EndpointMsg, FEATURE_POLICY, PolicyMsg, ServiceMsg, ServiceRef,
};
use causeway_api::registry::{
    BIND_SOURCE_METADATA, Conflict, Endpoint, Provenance, Registry, RegistryDelta, ServiceKey,
    SourceChange, SourceKind, SourceSnapshot, SourceState,
};
use causeway_registry::{SourceUpdate, apply_update_into};
use ipnet::{IpNet, Ipv4Net};
use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::address::{AddressPolicy, AddressRefused};
use crate::store::{
    AgentRecord, HistoryRecord, LiveCert, MeshWrite, PolicyRecord, SourceRecord, Store, StoreError,
};

/// Metadata key carrying an agent workload's group mTLS mode.
pub const MTLS_METADATA: &str = "causeway.io/mtls";

/// The source name under which agents register their workloads.
pub const AGENTS_SOURCE: &str = "agents";

/// Mesh settings.
#[derive(Debug, Clone)]
pub struct MeshSettings {
    /// Range VIPs are allocated from.
    pub vip_range: Ipv4Net,
    /// How long an agent's workload stays registered after its connection is gone.
    pub agent_grace: Duration,
    /// How many versions of history are kept for resuming agents.
    pub history_len: u64,
    /// The control endpoint listens on loopback, so every agent runs on this host and
    /// may register a loopback address (demos, tests, benchmarks).
    pub control_on_loopback: bool,
}

/// An agent's session as operators see it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    /// Whether a subscription is open.
    pub connected: bool,
    /// The last version the agent acknowledged.
    pub acked_version: u64,
    /// The last version sent.
    pub sent_version: u64,
    /// The last refusal, if the agent refused an update.
    pub last_nack: Option<NackView>,
    /// The workload address the agent asked for (registered unless
    /// `registration_error` says why not).
    pub address: String,
    /// Why the controller refused to register the workload at `address`.
    pub registration_error: Option<String>,
    /// Session generation (grows with every new session).
    pub generation: u64,
    /// The latest connections the agent refused by policy, newest last (at most
    /// [`RECENT_DENIALS`]).
    #[serde(skip_serializing_if = "std::collections::VecDeque::is_empty")]
    pub recent_denials: std::collections::VecDeque<causeway_api::push::Denial>,
    /// The agent's software version (from its hello).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub agent_version: String,
    /// When `connected` last changed, Unix milliseconds.
    pub since_ms: u64,
    /// What the agent last reported of its data plane (for `causewayctl analyze`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub facts: Option<causeway_api::push::AgentFacts>,
}

/// How many refusals the controller keeps per agent.
pub const RECENT_DENIALS: usize = 64;

/// A refused update.
#[derive(Debug, Clone, Serialize)]
pub struct NackView {
    /// The refused version.
    pub version: u64,
    /// The agent's reason.
    pub error: String,
    /// The services the agent refused while applying the rest of the update.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<causeway_api::push::ServiceRejection>,
}

struct Session {
    view: SessionView,
    kick: Arc<Notify>,
}

/// What applying one policy resource did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyOutcome {
    /// It did not exist.
    Created,
    /// It existed with another content.
    Configured,
    /// It existed with this content.
    Unchanged,
}

/// The result of [`Mesh::apply_policies`].
#[derive(Debug, Clone)]
pub struct PolicyApplied {
    /// The mesh version that carries the change (the current one if nothing changed).
    pub version: u64,
    /// Each resource's key and outcome, in input order.
    pub results: Vec<(String, PolicyOutcome)>,
}

/// A stored policy as pushed to agents.
fn policy_msg((key, rec): (&String, &PolicyRecord)) -> PolicyMsg {
    PolicyMsg {
        key: key.clone(),
        seq: rec.seq,
        json: serde_json::to_vec(&rec.resource).expect("a policy resource serialises"),
    }
}

/// What a session task holds.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// The agent.
    pub agent_id: String,
    /// This session's generation.
    pub generation: u64,
    /// Notified when the session must end (replaced by a newer one, or agent removed).
    pub kick: Arc<Notify>,
}

struct Inner {
    /// The last update built, shared by every session asking for the same versions.
    last_update: Option<(u64, u64, Arc<Vec<u8>>)>,
    version: u64,
    registry: Registry,
    vips: BTreeMap<ServiceKey, Ipv4Addr>,
    used_vips: BTreeSet<Ipv4Addr>,
    vip_cursor: u32,
    history: BTreeMap<u64, HistoryRecord>,
    /// Denied certificate serials with their expiry (Unix seconds): every unexpired
    /// certificate of every removed agent. An entry is dropped once its certificate has
    /// expired (TLS refuses it then anyway), so the list stays bounded.
    deny: BTreeMap<String, i64>,
    sessions: BTreeMap<String, Session>,
    next_generation: u64,
    /// Policy resources by `Kind/namespace/name`.
    policies: BTreeMap<String, PolicyRecord>,
    /// Endpoints refused at the door, by (source, service), shown as conflicts.
    invalid: BTreeMap<(String, ServiceKey), Vec<Conflict>>,
}

/// Drops the endpoints of a source's change that cannot enter the registry (see
/// [`crate::address::endpoint_problem`]), recording each as a conflict in place of what
/// was recorded for the services the change covers. One bad record then never reaches
/// the agents, and the source's other endpoints go on as usual.
fn screen(
    invalid: &mut BTreeMap<(String, ServiceKey), Vec<Conflict>>,
    source: &str,
    change: &mut SourceChange,
    range: Ipv4Net,
) {
    let services = match change {
        SourceChange::Full(snapshot) => {
            invalid.retain(|(s, _), _| s != source);
            &mut snapshot.services
        }
        SourceChange::Services(services) => {
            for key in services.keys() {
                invalid.remove(&(source.to_owned(), key.clone()));
            }
            services
        }
        _ => return,
    };
    for (key, eps) in services.iter_mut() {
        let mut found = Vec::new();
        eps.retain(|native_id, ep| {
            let Some(reason) = crate::address::endpoint_problem(ep, range) else {
                return true;
            };
            tracing::warn!(%source, service = %key, %native_id, address = %ep.address, %reason, "endpoint refused; fix it in its source");
            found.push(Conflict::InvalidEndpoint {
                service: key.clone(),
                source: source.to_owned(),
                native_id: native_id.clone(),
                address: ep.address.clone(),
                reason: format!("{reason}; it is left out of the mesh until fixed in source {source}"),
            });
            false
        });
        if !found.is_empty() {
            invalid.insert((source.to_owned(), key.clone()), found);
        }
    }
}

/// The hub.
pub struct Mesh {
    store: Arc<dyn Store>,
    settings: MeshSettings,
    bundle: Vec<Vec<u8>>,
    inner: Mutex<Inner>,
    version_tx: watch::Sender<u64>,
    /// Wakes the flusher after a commit.
    flush: Arc<Notify>,
    /// The newest version known to be on disk.
    durable: Arc<std::sync::atomic::AtomicU64>,
    /// Wakes the deny-list pruner when entries were added.
    deny_added: Arc<Notify>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A service as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// VIP, when allocated.
    pub vip: Option<Ipv4Addr>,
    /// Merged endpoints.
    pub endpoints: Vec<EndpointView>,
    /// Names of the sources that contribute.
    pub sources: BTreeSet<String>,
}

/// An endpoint as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
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
    pub identity: Option<String>,
    /// Zone.
    pub zone: Option<String>,
    /// Every source that knows this endpoint: its own `source` first, then the agent
    /// whose workload is bound to it (`agents`), when joined from an existing registry.
    pub sources: Vec<String>,
    /// The id of the Causeway agent running there, if one is (its own registration or
    /// one bound to a registry's): traffic to it goes through the mTLS tunnel.
    pub agent: Option<String>,
    /// Labels (agent workloads carry `causeway.io/group`).
    pub labels: BTreeMap<String, String>,
}

/// A source as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SourceView {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: SourceKind,
    /// "pending" (configured, no complete answer yet in this run), "synced" or "stale".
    pub state: String,
    /// The last error.
    pub last_error: Option<String>,
    /// Services it holds.
    pub services: usize,
    /// Endpoints it holds.
    pub endpoints: usize,
}

/// The services some deltas touched.
fn touched_keys(deltas: impl IntoIterator<Item = RegistryDelta>) -> BTreeSet<ServiceKey> {
    deltas
        .into_iter()
        .flat_map(|d| d.services.into_iter().map(|s| s.key))
        .collect()
}

fn endpoint_msg(ep: &Endpoint) -> EndpointMsg {
    EndpointMsg {
        id: format!("{}/{}", ep.provenance.source, ep.provenance.native_id),
        address: ep.address.clone(),
        ports: ep
            .ports
            .iter()
            .map(|(k, v)| (k.clone(), u32::from(*v)))
            .collect(),
        healthy: ep.healthy(),
        zone: ep.locality.zone.clone().unwrap_or_default(),
        identity: ep.identity.clone().unwrap_or_default(),
        source: ep.provenance.source.clone(),
        stale: ep.stale,
        labels: (&ep.labels).into(),
        mtls_strict: ep
            .metadata
            .get(MTLS_METADATA)
            .is_some_and(|m| m == "strict"),
    }
}

impl Inner {
    fn service_msg(&self, key: &ServiceKey) -> Option<ServiceMsg> {
        let eps = self.registry.service(key);
        if eps.is_empty() {
            return None;
        }
        let mut hostnames = BTreeSet::new();
        let mut kinds = BTreeSet::new();
        let (mut consul_tags, mut consul_dcs, mut eureka_vips) =
            (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        for ep in eps.values() {
            hostnames.extend(ep.hostnames.iter().cloned());
            kinds.insert(ep.provenance.kind.to_string());
            match ep.provenance.kind {
                SourceKind::Consul => {
                    consul_tags.extend(ep.tags.iter().cloned());
                    consul_dcs.extend(ep.locality.region.iter().cloned());
                }
                // The Eureka adapter puts vipAddress and secureVipAddress into hostnames.
                SourceKind::Eureka => eureka_vips.extend(ep.hostnames.iter().cloned()),
                _ => {}
            }
        }
        Some(ServiceMsg {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            vip: self
                .vips
                .get(key)
                .map(ToString::to_string)
                .unwrap_or_default(),
            endpoints: eps.values().map(endpoint_msg).collect(),
            hostnames: hostnames.into_iter().collect(),
            source_kinds: kinds.into_iter().collect(),
            consul_tags: consul_tags.into_iter().collect(),
            consul_datacenters: consul_dcs.into_iter().collect(),
            eureka_vips: eureka_vips.into_iter().collect(),
        })
    }

    fn allocate_vip(&mut self, range: Ipv4Net) -> Option<Ipv4Addr> {
        let base = u32::from(range.network());
        let size = 1u64 << (32 - u32::from(range.prefix_len()));
        for _ in 0..size {
            let offset = self.vip_cursor;
            self.vip_cursor = u32::try_from((u64::from(self.vip_cursor) + 1) % size).unwrap_or(0);
            let ip = Ipv4Addr::from(base.wrapping_add(offset));
            if ip == range.network() || ip == range.broadcast() || self.used_vips.contains(&ip) {
                continue;
            }
            self.used_vips.insert(ip);
            return Some(ip);
        }
        None
    }
}

impl Mesh {
    /// Restores the mesh from the store (before any source answers). Sources that are
    /// no longer configured are dropped; restored agent workloads get a grace period.
    pub fn open(
        store: Arc<dyn Store>,
        settings: MeshSettings,
        bundle: Vec<Vec<u8>>,
        configured_sources: &BTreeSet<String>,
        deny: BTreeMap<String, i64>,
    ) -> Result<Arc<Self>, StoreError> {
        let mut dump = store.load_mesh()?;
        let mut registry = Registry::new();
        let mut invalid = BTreeMap::new();
        for (name, rec) in &dump.sources {
            // Moved, not copied, into the registry; the restore's deltas are not needed.
            let mut change = SourceChange::Full(SourceSnapshot {
                services: dump.data.remove(name).unwrap_or_default(),
            });
            // Stored by an older controller, or the VIP range changed since.
            screen(&mut invalid, name, &mut change, settings.vip_range);
            registry.apply_with_state_into(name, rec.kind, change, rec.state.clone(), &mut |_| {});
        }
        drop(dump.data);
        let used_vips = dump.vips.values().copied().collect();
        let inner = Inner {
            last_update: None,
            version: dump.version,
            registry,
            vips: dump.vips,
            used_vips,
            vip_cursor: 1,
            history: dump.history,
            deny,
            sessions: BTreeMap::new(),
            next_generation: 0,
            policies: dump.policies,
            invalid,
        };
        let (version_tx, _) = watch::channel(inner.version);
        let durable = Arc::new(std::sync::atomic::AtomicU64::new(inner.version));
        let flush = Arc::new(Notify::new());
        let mesh = Arc::new(Self {
            store,
            settings,
            bundle,
            inner: Mutex::new(inner),
            version_tx,
            flush,
            durable,
            deny_added: Arc::new(Notify::new()),
        });
        // Deny entries leave the list when their certificates expire.
        {
            let weak = Arc::downgrade(&mesh);
            let wake = mesh.deny_added.clone();
            tokio::spawn(async move {
                loop {
                    let next = {
                        let Some(mesh) = weak.upgrade() else { return };
                        let now = crate::enroll::now_unix();
                        match mesh.prune_deny(now) {
                            Ok(next) => next,
                            Err(e) => {
                                tracing::error!(error = %e, "cannot persist the pruned deny list");
                                Some(now + 60)
                            }
                        }
                    };
                    // Until the next expiry (a second after it), or an hour at most.
                    let secs = next
                        .map(|t| t - crate::enroll::now_unix() + 1)
                        .unwrap_or(3600)
                        .clamp(1, 3600);
                    let secs = u64::try_from(secs).unwrap_or(3600);
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(secs)) => {}
                        () = wake.notified() => {}
                    }
                }
            });
        }
        // Registry changes are written in a transaction and flushed right after, off the
        // commit path: a burst of changes shares one fsync, and the window a crash can
        // lose is one fsync long (the sources re-sync anything lost).
        {
            // The task holds the mesh weakly, so dropping the mesh releases the store.
            let weak = Arc::downgrade(&mesh);
            let flush = mesh.flush.clone();
            tokio::spawn(async move {
                loop {
                    flush.notified().await;
                    let Some(mesh) = weak.upgrade() else { return };
                    let target = *mesh.version_tx.borrow();
                    let (store, durable) = (mesh.store.clone(), mesh.durable.clone());
                    drop(mesh);
                    match tokio::task::spawn_blocking(move || store.flush()).await {
                        Ok(Ok(())) => {
                            durable.fetch_max(target, std::sync::atomic::Ordering::SeqCst);
                        }
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "cannot flush the registry to disk")
                        }
                        Err(_) => return,
                    }
                }
            });
        }
        {
            let mut inner = mesh.lock();
            let stale: Vec<String> = inner
                .registry
                .sources()
                .keys()
                .filter(|s| s.as_str() != AGENTS_SOURCE && !configured_sources.contains(*s))
                .cloned()
                .collect();
            for name in stale {
                tracing::info!(source = %name, "source no longer configured; dropping its endpoints");
                inner.invalid.retain(|(s, _), _| *s != name);
                let delta = inner.registry.remove_source(&name);
                mesh.commit(&mut inner, touched_keys([delta]), &[name], false)?;
            }
            // Workloads restored from the store wait for their agents to reconnect.
            let restored: Vec<String> = inner
                .registry
                .sources()
                .get(AGENTS_SOURCE)
                .map(|e| {
                    e.snapshot
                        .services
                        .values()
                        .flat_map(|eps| eps.keys().cloned())
                        .collect()
                })
                .unwrap_or_default();
            for agent_id in restored {
                mesh.schedule_expiry(agent_id, 0);
            }
        }
        Ok(mesh)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current mesh version.
    pub fn version(&self) -> u64 {
        self.lock().version
    }

    /// The newest version known to be flushed to disk.
    pub fn durable_version(&self) -> u64 {
        self.durable.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Watches the mesh version.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }

    /// Persists and publishes one change: `touched` are the services whose merged view
    /// changed, `sources` the sources whose data or state may have changed. Returns the
    /// new version (or the old one if nothing changed).
    fn commit(
        &self,
        inner: &mut Inner,
        touched: BTreeSet<ServiceKey>,
        sources: &[String],
        deny_changed: bool,
    ) -> Result<u64, StoreError> {
        self.commit_with(inner, touched, sources, deny_changed, Vec::new())
    }

    /// [`Mesh::commit`] with policy resources to write (`Some`) or delete (`None`) in the
    /// same transaction and version.
    fn commit_with(
        &self,
        inner: &mut Inner,
        touched: BTreeSet<ServiceKey>,
        sources: &[String],
        deny_changed: bool,
        policies: Vec<(String, Option<PolicyRecord>)>,
    ) -> Result<u64, StoreError> {
        let nothing = touched.is_empty() && !deny_changed && policies.is_empty();
        let mut new_vips = Vec::new();
        if !nothing {
            for key in &touched {
                if !inner.vips.contains_key(key) && !inner.registry.service(key).is_empty() {
                    match inner.allocate_vip(self.settings.vip_range) {
                        Some(ip) => {
                            inner.vips.insert(key.clone(), ip);
                            new_vips.push((key.clone(), ip));
                        }
                        None => {
                            tracing::error!(service = %key, range = %self.settings.vip_range, "VIP range exhausted; the service has no VIP (widen mesh.vip_range)")
                        }
                    }
                }
            }
        }
        let version = if nothing {
            inner.version
        } else {
            inner.version + 1
        };
        let history_keep_from = if nothing {
            inner.version.saturating_sub(self.settings.history_len)
        } else {
            version.saturating_sub(self.settings.history_len) + 1
        };
        let history = if nothing {
            inner
                .history
                .get(&inner.version)
                .cloned()
                .unwrap_or_default()
        } else {
            HistoryRecord {
                services: touched,
                deny: deny_changed,
                policies: policies.iter().map(|(k, _)| k.clone()).collect(),
            }
        };
        {
            let registry = &inner.registry;
            let mut write = MeshWrite {
                version,
                sources: Vec::new(),
                data: Vec::new(),
                vips: new_vips,
                history: &history,
                history_keep_from,
                policies: policies.clone(),
            };
            for name in sources {
                let entry = registry.sources().get(name);
                if let Some(entry) = entry {
                    write.sources.push((
                        name.clone(),
                        SourceRecord {
                            kind: entry.kind,
                            state: entry.state.clone(),
                        },
                    ));
                }
                if !nothing {
                    for key in &history.services {
                        let eps = entry.and_then(|e| e.snapshot.services.get(key));
                        write.data.push((name.as_str(), key, eps));
                    }
                }
            }
            if nothing {
                if write.sources.is_empty() {
                    return Ok(inner.version);
                }
                // Only a state change (e.g. an error message) with no endpoint change.
                self.store.save_mesh(&write)?;
                return Ok(inner.version);
            }
            self.store.save_mesh(&write)?;
        }
        inner.version = version;
        for (key, rec) in policies {
            match rec {
                Some(rec) => inner.policies.insert(key, rec),
                None => inner.policies.remove(&key),
            };
        }
        inner.history.insert(version, history);
        inner.history.retain(|v, _| *v >= history_keep_from);
        self.version_tx.send_replace(inner.version);
        self.flush.notify_one();
        Ok(inner.version)
    }

    /// Applies a registry source's update (consumed: its data moves into the registry).
    pub fn apply_source_update(&self, mut update: SourceUpdate) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let source = update.source.clone();
        if let Some(change) = update.change.as_mut() {
            screen(&mut inner.invalid, &source, change, self.settings.vip_range);
        }
        let mut touched = BTreeSet::new();
        apply_update_into(&mut inner.registry, update, now_ms(), &mut |d| {
            touched.insert(d.key);
        });
        self.commit(&mut inner, touched, std::slice::from_ref(&source), false)
    }

    /// [`Mesh::update_since`] as an encoded push frame with its version, built once per
    /// (since, version) pair and shared by every session that asks for the same pair:
    /// after a change, most agents stand at the same version.
    pub fn update_frame_since(&self, since: u64) -> (u64, Arc<Vec<u8>>) {
        {
            let inner = self.lock();
            if let Some((s, v, frame)) = &inner.last_update
                && *s == since
                && *v == inner.version
            {
                return (*v, frame.clone());
            }
        }
        let update = self.update_since(since);
        let version = update.version;
        let frame = Arc::new(causeway_api::wire::encode_frame(
            &causeway_api::push::PushFrame {
                kind: Some(causeway_api::push::push_frame::Kind::Update(update)),
            },
        ));
        let mut inner = self.lock();
        if inner.version == version {
            inner.last_update = Some((since, version, frame.clone()));
        }
        (version, frame)
    }

    /// The number of services in the merged registry.
    pub fn service_count(&self) -> usize {
        self.lock().registry.service_keys().count()
    }

    /// What a subscriber at `since` needs to reach the current version: the services
    /// changed since then, or a full snapshot when the history does not reach back.
    pub fn update_since(&self, since: u64) -> ConfigUpdate {
        let inner = self.lock();
        let covered = since > 0
            && since <= inner.version
            && (since == inner.version
                || inner
                    .history
                    .first_key_value()
                    .is_some_and(|(first, _)| *first <= since + 1));
        if !covered {
            let keys: Vec<ServiceKey> = inner.registry.service_keys().cloned().collect();
            return ConfigUpdate {
                version: inner.version,
                base_version: 0,
                full: true,
                services: keys.iter().filter_map(|k| inner.service_msg(k)).collect(),
                trust_bundle_der: self.bundle.clone(),
                bundle_set: true,
                deny_serials: inner.deny.keys().cloned().collect(),
                deny_set: true,
                vip_cidr: self.settings.vip_range.to_string(),
                policies: inner.policies.iter().map(policy_msg).collect(),
                required_features: if inner.policies.is_empty() {
                    Vec::new()
                } else {
                    vec![FEATURE_POLICY.to_owned()]
                },
                ..ConfigUpdate::default()
            };
        }
        let mut keys = BTreeSet::new();
        let mut deny = false;
        let mut policy_keys = BTreeSet::new();
        for (_, rec) in inner.history.range(since + 1..) {
            keys.extend(rec.services.iter().cloned());
            deny |= rec.deny;
            policy_keys.extend(rec.policies.iter().cloned());
        }
        let mut update = ConfigUpdate {
            version: inner.version,
            base_version: since,
            ..ConfigUpdate::default()
        };
        for key in &keys {
            match inner.service_msg(key) {
                Some(s) => update.services.push(s),
                None => update.removed.push(ServiceRef {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                }),
            }
        }
        if deny {
            update.deny_set = true;
            update.deny_serials = inner.deny.keys().cloned().collect();
        }
        for key in policy_keys {
            match inner.policies.get_key_value(&key) {
                Some(entry) => update.policies.push(policy_msg(entry)),
                None => update.removed_policies.push(key),
            }
        }
        if !update.policies.is_empty() || !update.removed_policies.is_empty() {
            // An agent that does not know policies must refuse the update, not apply the
            // registry part and silently allow everything.
            update.required_features.push(FEATURE_POLICY.to_owned());
        }
        update
    }

    /// Applies policy resources all-or-nothing in one version (create or replace each);
    /// with `dry_run`, reports what would change and writes nothing. Resources must be
    /// validated by the caller.
    pub fn apply_policies(
        &self,
        resources: Vec<Resource>,
        dry_run: bool,
    ) -> Result<PolicyApplied, StoreError> {
        let mut inner = self.lock();
        let mut next_seq = inner
            .policies
            .values()
            .map(|r| r.seq + 1)
            .max()
            .unwrap_or(1);
        let mut writes = Vec::new();
        let mut results = Vec::new();
        let version = inner.version + 1;
        for resource in resources {
            let key = PolicyRecord::key_of(&resource);
            let (outcome, seq) = match inner.policies.get(&key) {
                Some(old) if old.resource == resource => (PolicyOutcome::Unchanged, old.seq),
                Some(old) => (PolicyOutcome::Configured, old.seq),
                None => {
                    next_seq += 1;
                    (PolicyOutcome::Created, next_seq - 1)
                }
            };
            results.push((key.clone(), outcome));
            if outcome != PolicyOutcome::Unchanged {
                // A later document of the same batch for the same resource wins.
                writes.retain(|(k, _): &(String, Option<PolicyRecord>)| *k != key);
                writes.push((
                    key,
                    Some(PolicyRecord {
                        seq,
                        version,
                        resource,
                    }),
                ));
            }
        }
        let version = if dry_run || writes.is_empty() {
            inner.version
        } else {
            self.commit_with(&mut inner, BTreeSet::new(), &[], false, writes)?
        };
        Ok(PolicyApplied { version, results })
    }

    /// Deletes policy resources by `Kind/namespace/name`, all or none: a key that does not
    /// exist fails the whole call.
    pub fn delete_policies(&self, keys: &[String]) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        if let Some(missing) = keys.iter().find(|k| !inner.policies.contains_key(*k)) {
            return Err(StoreError::NotFound {
                kind: "policy",
                name: missing.clone(),
            });
        }
        let writes = keys.iter().map(|k| (k.clone(), None)).collect();
        self.commit_with(&mut inner, BTreeSet::new(), &[], false, writes)
    }

    /// Every policy resource, by `Kind/namespace/name`.
    pub fn policies(&self) -> BTreeMap<String, PolicyRecord> {
        self.lock().policies.clone()
    }

    fn agents_services(
        inner: &Inner,
    ) -> BTreeMap<ServiceKey, causeway_api::registry::ServiceEndpoints> {
        inner
            .registry
            .sources()
            .get(AGENTS_SOURCE)
            .map(|e| e.snapshot.services.clone())
            .unwrap_or_default()
    }

    /// Registers (or re-registers) an agent's workload; returns the change to apply.
    fn register(
        inner: &mut Inner,
        agent: &AgentRecord,
        group: &WorkloadGroup,
        address: &str,
    ) -> Option<RegistryDelta> {
        let service = group.service.as_ref()?;
        let key = ServiceKey::new(&group.namespace, service);
        let mut ep = Endpoint::new(
            address,
            Provenance {
                source: AGENTS_SOURCE.into(),
                kind: SourceKind::Agents,
                native_id: agent.id.clone(),
                revision: agent.joined_at.to_string(),
            },
        );
        ep.ports = group
            .ports
            .iter()
            .map(|p| (p.name.clone(), p.port))
            .collect();
        // Every workload carries its group's name as a label, so that policies can select
        // a group without the operator labelling it (`causeway.io/group: <name>`).
        let mut labels = group.labels.clone();
        labels.insert(GROUP_LABEL.to_owned(), group.name.clone());
        ep.labels = labels.into();
        ep.metadata
            .insert(MTLS_METADATA.into(), group.mtls.to_string());
        if let Some(source) = &group.registry_source {
            // Joining from an existing registry: the merge folds this workload into the
            // source's registration at the same address (Registry::service).
            ep.metadata
                .insert(BIND_SOURCE_METADATA.into(), source.clone());
        }
        ep.identity = Some(agent.spiffe_id.clone());
        let mut changes = BTreeMap::new();
        let all = Self::agents_services(inner);
        // The agent may have registered under another service before (group changed).
        for (k, eps) in &all {
            if k != &key && eps.contains_key(&agent.id) {
                let mut eps = eps.clone();
                eps.remove(&agent.id);
                changes.insert(k.clone(), eps);
            }
        }
        let mut eps = all.get(&key).cloned().unwrap_or_default();
        eps.insert(agent.id.clone(), ep);
        changes.insert(key, eps);
        Some(inner.registry.apply(
            AGENTS_SOURCE,
            SourceKind::Agents,
            SourceChange::Services(changes),
        ))
    }

    fn deregister(inner: &mut Inner, agent_id: &str) -> Option<RegistryDelta> {
        let changes: BTreeMap<_, _> = Self::agents_services(inner)
            .into_iter()
            .filter(|(_, eps)| eps.contains_key(agent_id))
            .map(|(k, mut eps)| {
                eps.remove(agent_id);
                (k, eps)
            })
            .collect();
        if changes.is_empty() {
            return None;
        }
        Some(inner.registry.apply(
            AGENTS_SOURCE,
            SourceKind::Agents,
            SourceChange::Services(changes),
        ))
    }

    /// Another agent's endpoint at `address` sharing a port with `group`'s, if any.
    fn taken(
        inner: &Inner,
        agent: &AgentRecord,
        group: &WorkloadGroup,
        address: IpAddr,
    ) -> Result<(), AddressRefused> {
        let Some(entry) = inner.registry.sources().get(AGENTS_SOURCE) else {
            return Ok(());
        };
        for (key, eps) in &entry.snapshot.services {
            for (id, ep) in eps {
                if *id == agent.id
                    || ep.address.parse::<IpAddr>().map(|a| a.to_canonical()) != Ok(address)
                {
                    continue;
                }
                if let Some(port) = group
                    .ports
                    .iter()
                    .map(|p| p.port)
                    .find(|p| ep.ports.values().any(|q| q == p))
                {
                    return Err(AddressRefused::Taken {
                        address,
                        port,
                        other: id.clone(),
                        service: key.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Starts a session for `agent`: ends any older one, and registers the workload at
    /// `address` (what its hello asked for; `Err` holds unparseable text) if the
    /// controller can vouch for it: the connection comes from it (`remote`) or it lies in
    /// `cidrs` (the group's and the token's), it is not in the VIP range, not loopback
    /// unless the control endpoint is, and not another agent's endpoint. Returns the
    /// handle and, when the address was refused, why (the workload is then not
    /// registered, and any registration of an earlier session is withdrawn).
    pub fn session_start(
        &self,
        agent: &AgentRecord,
        group: Option<&WorkloadGroup>,
        address: Result<IpAddr, String>,
        remote: IpAddr,
        cidrs: &[IpNet],
        acked_version: u64,
    ) -> Result<(SessionHandle, Option<String>), StoreError> {
        let mut inner = self.lock();
        inner.next_generation += 1;
        let generation = inner.next_generation;
        let kick = Arc::new(Notify::new());
        if let Some(old) = inner.sessions.get(&agent.id) {
            old.kick.notify_one();
        }
        let policy = AddressPolicy {
            vip_range: self.settings.vip_range,
            control_on_loopback: self.settings.control_on_loopback,
        };
        let shown = match &address {
            Ok(a) => a.to_canonical().to_string(),
            Err(text) => text.clone(),
        };
        let mut refusal = None;
        if let Some(group) = group.filter(|g| g.service.is_some()) {
            let verdict = match address {
                Ok(a) => {
                    let a = a.to_canonical();
                    policy
                        .check(a, remote, cidrs)
                        .and_then(|()| Self::taken(&inner, agent, group, a))
                        .map(|()| a)
                        .map_err(|e| e.to_string())
                }
                Err(text) => Err(format!(
                    "workload address {text:?} is not an IP address; start the agent with --address set to this host's own IP address"
                )),
            };
            let delta = match verdict {
                Ok(a) => Self::register(&mut inner, agent, group, &a.to_string()),
                Err(e) => {
                    tracing::warn!(agent = %agent.id, address = %shown, %remote, error = %e, "workload address refused; the agent is not registered");
                    refusal = Some(e);
                    Self::deregister(&mut inner, &agent.id)
                }
            };
            if let Some(delta) = delta {
                self.commit(
                    &mut inner,
                    touched_keys([delta]),
                    &[AGENTS_SOURCE.to_owned()],
                    false,
                )?;
            }
        }
        // Refusals reported in an earlier session stay visible to `why`.
        let recent_denials = inner
            .sessions
            .get(&agent.id)
            .map(|s| s.view.recent_denials.clone())
            .unwrap_or_default();
        inner.sessions.insert(
            agent.id.clone(),
            Session {
                view: SessionView {
                    connected: true,
                    acked_version,
                    sent_version: 0,
                    last_nack: None,
                    address: shown,
                    registration_error: refusal.clone(),
                    generation,
                    recent_denials,
                    agent_version: String::new(),
                    since_ms: now_ms(),
                    facts: None,
                },
                kick: kick.clone(),
            },
        );
        Ok((
            SessionHandle {
                agent_id: agent.id.clone(),
                generation,
                kick,
            },
            refusal,
        ))
    }

    /// Ends a session. A graceful end deregisters at once; otherwise the workload stays
    /// for the grace period, unless a newer session of the same agent exists.
    pub fn session_end(
        self: &Arc<Self>,
        h: &SessionHandle,
        graceful: bool,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let Some(s) = inner.sessions.get_mut(&h.agent_id) else {
            return Ok(());
        };
        if s.view.generation != h.generation {
            return Ok(()); // a newer session owns the lease
        }
        s.view.connected = false;
        s.view.since_ms = now_ms();
        if graceful {
            if let Some(delta) = Self::deregister(&mut inner, &h.agent_id) {
                self.commit(
                    &mut inner,
                    touched_keys([delta]),
                    &[AGENTS_SOURCE.to_owned()],
                    false,
                )?;
            }
            tracing::info!(agent = %h.agent_id, "agent left gracefully; workload deregistered");
        } else {
            drop(inner);
            self.schedule_expiry(h.agent_id.clone(), h.generation);
        }
        Ok(())
    }

    fn schedule_expiry(self: &Arc<Self>, agent_id: String, generation: u64) {
        let mesh = Arc::downgrade(self);
        let grace = self.settings.agent_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let Some(mesh) = mesh.upgrade() else { return };
            let mut inner = mesh.lock();
            let current = inner
                .sessions
                .get(&agent_id)
                .map(|s| (s.view.generation, s.view.connected));
            let expire = match current {
                None => generation == 0,
                Some((g, connected)) => g == generation && !connected,
            };
            if expire && let Some(delta) = Self::deregister(&mut inner, &agent_id) {
                tracing::info!(%agent_id, "agent connection gone longer than the grace period; workload deregistered");
                if let Err(e) = mesh.commit(
                    &mut inner,
                    touched_keys([delta]),
                    &[AGENTS_SOURCE.to_owned()],
                    false,
                ) {
                    tracing::error!(error = %e, "cannot persist a deregistration");
                }
            }
        });
    }

    /// Records what a session sent.
    pub fn record_sent(&self, h: &SessionHandle, version: u64) {
        if let Some(s) = self.lock().sessions.get_mut(&h.agent_id)
            && s.view.generation == h.generation
        {
            s.view.sent_version = version;
        }
    }

    /// Records an ACK or a NACK.
    pub fn record_answer(&self, h: &SessionHandle, acked: u64, nack: Option<NackView>) {
        if let Some(s) = self.lock().sessions.get_mut(&h.agent_id)
            && s.view.generation == h.generation
        {
            s.view.acked_version = acked;
            if nack.is_some() {
                s.view.last_nack = nack;
            } else {
                s.view.last_nack = None;
            }
        }
    }

    /// Records refusals an agent reported (bounded per agent; a report carries at most
    /// [`causeway_api::push::MAX_DENIALS_PER_REPORT`]).
    pub fn record_denials(&self, h: &SessionHandle, denials: Vec<causeway_api::push::Denial>) {
        if let Some(s) = self.lock().sessions.get_mut(&h.agent_id)
            && s.view.generation == h.generation
        {
            let keep = causeway_api::push::MAX_DENIALS_PER_REPORT;
            let skip = denials.len().saturating_sub(keep);
            for d in denials.into_iter().skip(skip) {
                if s.view.recent_denials.len() >= RECENT_DENIALS {
                    s.view.recent_denials.pop_front();
                }
                s.view.recent_denials.push_back(d);
            }
        }
    }

    /// Records the agent's software version (from its hello).
    pub fn record_agent_version(&self, h: &SessionHandle, version: String) {
        if let Some(s) = self.lock().sessions.get_mut(&h.agent_id)
            && s.view.generation == h.generation
        {
            s.view.agent_version = version;
        }
    }

    /// Records the data-plane facts an agent reported.
    pub fn record_facts(&self, h: &SessionHandle, facts: causeway_api::push::AgentFacts) {
        if let Some(s) = self.lock().sessions.get_mut(&h.agent_id)
            && s.view.generation == h.generation
        {
            if s.view.agent_version.is_empty() {
                s.view.agent_version.clone_from(&facts.agent_version);
            }
            s.view.facts = Some(facts);
        }
    }

    /// Each source's state (with since when it is stale), for `analyze`.
    pub fn source_states(&self) -> BTreeMap<String, SourceState> {
        self.lock()
            .registry
            .sources()
            .iter()
            .map(|(k, e)| (k.clone(), e.state.clone()))
            .collect()
    }

    /// The VIP range and how many of its addresses are allocated.
    pub fn vip_usage(&self) -> (Ipv4Net, usize) {
        (self.settings.vip_range, self.lock().used_vips.len())
    }

    /// An operator removed an agent: deny every unexpired certificate it holds (not only
    /// the newest: a copy of one from before a renewal is as good to an attacker),
    /// deregister, end its session.
    pub fn agent_removed(&self, agent_id: &str, certs: &[LiveCert]) -> Result<(), StoreError> {
        let now = crate::enroll::now_unix();
        let mut inner = self.lock();
        for c in certs.iter().filter(|c| c.not_after > now) {
            inner.deny.insert(c.serial.clone(), c.not_after);
        }
        let delta = Self::deregister(&mut inner, agent_id);
        if let Some(s) = inner.sessions.get(agent_id) {
            s.kick.notify_one();
        }
        self.commit(
            &mut inner,
            touched_keys(delta),
            &[AGENTS_SOURCE.to_owned()],
            true,
        )?;
        drop(inner);
        self.deny_added.notify_one();
        Ok(())
    }

    /// Drops deny entries whose certificates expired by `now` (pushing the shorter list
    /// when any did); returns when the next one expires.
    pub fn prune_deny(&self, now: i64) -> Result<Option<i64>, StoreError> {
        let mut inner = self.lock();
        let before = inner.deny.len();
        inner.deny.retain(|_, not_after| *not_after > now);
        if inner.deny.len() != before {
            tracing::info!(
                expired = before - inner.deny.len(),
                left = inner.deny.len(),
                "expired certificates dropped from the deny list"
            );
            self.commit(&mut inner, BTreeSet::new(), &[], true)?;
        }
        Ok(inner.deny.values().min().copied())
    }

    /// The denied serials with their expiry (Unix seconds).
    pub fn deny_list(&self) -> BTreeMap<String, i64> {
        self.lock().deny.clone()
    }

    /// Sessions by agent id.
    pub fn sessions(&self) -> BTreeMap<String, SessionView> {
        self.lock()
            .sessions
            .iter()
            .map(|(k, s)| (k.clone(), s.view.clone()))
            .collect()
    }

    /// The merged registry for the admin API.
    pub fn services(&self) -> Vec<ServiceView> {
        let inner = self.lock();
        inner
            .registry
            .service_keys()
            .filter_map(|key| Self::service_view(&inner, key))
            .collect()
    }

    /// Up to `limit` services of the merged registry after `after` (in key order), each
    /// call holding the lock only for its own page: a reader of the whole registry that
    /// must not hold up pushes (`analyze`) pages through it.
    pub fn services_page(&self, after: Option<&ServiceKey>, limit: usize) -> Vec<ServiceView> {
        let inner = self.lock();
        inner
            .registry
            .service_keys()
            .skip_while(|k| after.is_some_and(|a| *k <= a))
            .filter_map(|key| Self::service_view(&inner, key))
            .take(limit)
            .collect()
    }

    fn service_view(inner: &Inner, key: &ServiceKey) -> Option<ServiceView> {
        let eps = inner.registry.service(key);
        if eps.is_empty() {
            return None;
        }
        Some(ServiceView {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            vip: inner.vips.get(key).copied(),
            sources: eps
                .values()
                .flat_map(|e| std::iter::once(&e.provenance).chain(&e.bound))
                .map(|p| p.source.clone())
                .collect(),
            endpoints: eps
                .values()
                .map(|e| EndpointView {
                    address: e.address.clone(),
                    ports: (&e.ports).into(),
                    healthy: e.healthy(),
                    source: e.provenance.source.clone(),
                    kind: e.provenance.kind,
                    native_id: e.provenance.native_id.clone(),
                    revision: e.provenance.revision.clone(),
                    stale: e.stale,
                    identity: e.identity.clone(),
                    zone: e.locality.zone.clone(),
                    labels: (&e.labels).into(),
                    sources: std::iter::once(&e.provenance)
                        .chain(&e.bound)
                        .map(|p| p.source.clone())
                        .collect(),
                    agent: std::iter::once(&e.provenance)
                        .chain(&e.bound)
                        .find(|p| p.kind == SourceKind::Agents)
                        .map(|p| p.native_id.clone()),
                })
                .collect(),
        })
    }

    /// The registry's sources for the admin API.
    pub fn sources(&self) -> Vec<SourceView> {
        let inner = self.lock();
        inner
            .registry
            .sources()
            .iter()
            .map(|(name, e)| SourceView {
                name: name.clone(),
                kind: e.kind,
                state: match e.state.status {
                    causeway_api::registry::SourceStatus::Synced => "synced",
                    causeway_api::registry::SourceStatus::Stale => "stale",
                    _ => "pending",
                }
                .into(),
                last_error: e.state.last_error.clone(),
                services: e.snapshot.services.len(),
                endpoints: e.snapshot.endpoint_count(),
            })
            .collect()
    }

    /// Disagreements between sources, and endpoints refused at the door.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let inner = self.lock();
        let mut out = inner.registry.conflicts();
        out.extend(inner.invalid.values().flatten().cloned());
        out
    }

    /// Lists every configured source from the start: one that has not answered in this
    /// run is `pending` (with the data restored from the store, if any), so a source
    /// that hangs is visible at once. A source restored as stale stays stale (its
    /// endpoints keep their flag) until it answers.
    pub fn declare_sources(&self, sources: impl IntoIterator<Item = (String, SourceKind)>) {
        let mut inner = self.lock();
        for (name, kind) in sources {
            let restored_stale = inner
                .registry
                .sources()
                .get(&name)
                .is_some_and(|e| e.state.is_stale());
            if !restored_stale {
                // No data change: no delta, no new version.
                let _ = inner.registry.apply_with_state(
                    &name,
                    kind,
                    SourceChange::Services(BTreeMap::new()),
                    SourceState::syncing(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    /// Removal denies every unexpired certificate it is given (an expired one is left
    /// out), pushes them to every agent, and each entry leaves the list when its
    /// certificate expires, with a new version so agents get the shorter list.
    #[tokio::test(flavor = "current_thread")]
    async fn removal_denies_every_unexpired_certificate_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::reopen(dir.path()).unwrap());
        let mesh = Mesh::open(
            store,
            MeshSettings {
                vip_range: "240.240.0.0/16".parse().unwrap(),
                agent_grace: Duration::from_secs(60),
                history_len: 16,
                control_on_loopback: true,
            },
            Vec::new(),
            &BTreeSet::new(),
            BTreeMap::new(),
        )
        .unwrap();
        let now = crate::enroll::now_unix();
        let cert = |serial: &str, not_after: i64| LiveCert {
            serial: serial.into(),
            not_after,
        };
        let v0 = mesh.version();
        mesh.agent_removed(
            "a1",
            &[
                cert("expired", now - 1),
                cert("joined", now + 100),
                cert("renewed", now + 200),
            ],
        )
        .unwrap();
        let v1 = mesh.version();
        assert!(v1 > v0);
        let delta = mesh.update_since(v0);
        assert!(delta.deny_set);
        assert_eq!(delta.deny_serials, ["joined", "renewed"]);
        let full = mesh.update_since(0);
        assert_eq!(full.deny_serials, ["joined", "renewed"]);

        // Nothing expired yet: no new version.
        assert_eq!(mesh.prune_deny(now).unwrap(), Some(now + 100));
        assert_eq!(mesh.version(), v1);
        // The first certificate expired: dropped and pushed.
        assert_eq!(mesh.prune_deny(now + 150).unwrap(), Some(now + 200));
        assert!(mesh.version() > v1);
        let delta = mesh.update_since(v1);
        assert!(delta.deny_set);
        assert_eq!(delta.deny_serials, ["renewed"]);
        assert_eq!(mesh.prune_deny(now + 250).unwrap(), None);
        assert!(mesh.deny_list().is_empty());
    }
}
