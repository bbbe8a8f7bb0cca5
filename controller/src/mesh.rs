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
    ConfigUpdate, EndpointMsg, FEATURE_POLICY, FEATURE_REQUEST_AUTHN, FEATURE_ROUTE, PolicyMsg,
    ServiceMsg, ServiceRef,
};
use causeway_api::registry::{
    BIND_SOURCE_METADATA, Conflict, Endpoint, Provenance, Registry, RegistryDelta, ServiceKey,
    SourceChange, SourceKind, SourceSnapshot, SourceState,
};
use causeway_api::registry::{REGION_LABEL, ZONE_LABEL};
use causeway_api::route::RouteResource;
use causeway_registry::{SourceUpdate, apply_update_into};
use ipnet::{IpNet, Ipv4Net};
use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::address::{AddressPolicy, AddressRefused};
use crate::store::{
    AgentRecord, HistoryRecord, LiveCert, MeshWrite, PolicyRecord, RouteRecord, SourceRecord,
    Store, StoreError,
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

pub use causeway_api::admin::{
    EndpointView, NackView, ServiceView, SessionView, SourceStateView, SourceView,
};

/// How many refusals the controller keeps per agent.
pub const RECENT_DENIALS: usize = 64;

struct Session {
    view: SessionView,
    kick: Arc<Notify>,
    /// Where a remote Prometheus may scrape the agent, if it said (its hello).
    scrape: Option<crate::sd::ScrapeTarget>,
    /// The agent's latest traffic summary and when it came (one per agent: bounded).
    traffic: Option<(std::time::Instant, causeway_api::push::TrafficReport)>,
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

/// The features an update carrying the policies `keys` (`Kind/namespace/name`) requires:
/// `policy/v1` for any policy (or a removal, `removals`), and `request-authn/v1` when one
/// is a RequestAuthentication (an agent that does not validate tokens must refuse it).
fn required_features<'a>(keys: impl Iterator<Item = &'a String>, removals: bool) -> Vec<String> {
    let mut any = removals;
    let mut authn = false;
    for k in keys {
        any = true;
        authn |= k.starts_with("RequestAuthentication/");
    }
    let mut out = Vec::new();
    if any {
        out.push(FEATURE_POLICY.to_owned());
    }
    if authn {
        out.push(FEATURE_REQUEST_AUTHN.to_owned());
    }
    out
}

/// A stored policy as pushed to agents.
fn policy_msg((key, rec): (&String, &PolicyRecord)) -> PolicyMsg {
    PolicyMsg {
        key: key.clone(),
        seq: rec.seq,
        json: serde_json::to_vec(&rec.resource).expect("a policy resource serialises"),
    }
}

/// A stored routing resource as pushed to agents.
fn route_msg((key, rec): (&String, &RouteRecord)) -> PolicyMsg {
    PolicyMsg {
        key: key.clone(),
        seq: rec.seq,
        json: serde_json::to_vec(&rec.resource).expect("a routing resource serialises"),
    }
}

/// Why [`Mesh::apply_routes`] refused a set of routing resources.
#[derive(Debug)]
pub enum RoutesRefused {
    /// The resources, with what is stored, do not hold together (each problem names the
    /// resource and field).
    Invalid(Vec<String>),
    /// The store failed.
    Store(StoreError),
}

impl From<StoreError> for RoutesRefused {
    fn from(e: StoreError) -> Self {
        RoutesRefused::Store(e)
    }
}

/// Every problem of `routes` taken together, as `Kind namespace/name: path: message`.
fn route_set_problems(routes: &BTreeMap<String, RouteRecord>) -> Vec<String> {
    let all: Vec<&RouteResource> = routes.values().map(|r| &r.resource).collect();
    causeway_api::route::check_set(&all)
        .into_iter()
        .map(|(key, p)| format!("{key}: {}: {}", p.path, p.message))
        .collect()
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
    /// Routing resources by `Kind/namespace/name`.
    routes: BTreeMap<String, RouteRecord>,
    /// Endpoints refused at the door, by (source, service), shown as conflicts.
    invalid: BTreeMap<(String, ServiceKey), Vec<Conflict>>,
    /// A change was applied here but its write to a shared store failed: the next
    /// [`Mesh::resync`] reloads even at the same version.
    diverged: bool,
}

/// A change prepared under the lock, to be written and published by [`Mesh::finish`].
struct Pending {
    /// The encoded transaction, if anything is to be written.
    write: Option<crate::store::EncodedMeshWrite>,
    /// The new version and what it records, if the change makes one.
    publish: Option<Publish>,
    /// The version when the change was prepared.
    current: u64,
}

struct Publish {
    version: u64,
    history: HistoryRecord,
    history_keep_from: u64,
    policies: Vec<(String, Option<PolicyRecord>)>,
    routes: Vec<(String, Option<RouteRecord>)>,
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
    /// Held by each change from its first edit of `inner` until its version is written
    /// and published: the store transaction runs without `inner`'s lock (and off the
    /// async workers), and changes still reach the store in version order.
    writer: tokio::sync::Mutex<()>,
    version_tx: watch::Sender<u64>,
    /// Wakes the flusher after a commit.
    flush: Arc<Notify>,
    /// The newest version known to be on disk.
    durable: Arc<std::sync::atomic::AtomicU64>,
    /// Wakes the deny-list pruner when entries were added.
    deny_added: Arc<Notify>,
    /// Notified when a write to a shared store failed: this controller's view may be
    /// stale (another controller wrote first), and [`Mesh::resync`] should run.
    stale: Arc<Notify>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
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
        region: ep.locality.region.clone().unwrap_or_default(),
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
    pub async fn open(
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
            routes: dump.routes,
            invalid,
            diverged: false,
        };
        let (version_tx, _) = watch::channel(inner.version);
        let durable = Arc::new(std::sync::atomic::AtomicU64::new(inner.version));
        let flush = Arc::new(Notify::new());
        let mesh = Arc::new(Self {
            store,
            settings,
            bundle,
            inner: Mutex::new(inner),
            writer: tokio::sync::Mutex::new(()),
            version_tx,
            flush,
            durable,
            deny_added: Arc::new(Notify::new()),
            stale: Arc::new(Notify::new()),
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
                        match mesh.prune_deny(now).await {
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
            let _writer = mesh.writer.lock().await;
            let stale: Vec<String> = mesh
                .lock()
                .registry
                .sources()
                .keys()
                .filter(|s| s.as_str() != AGENTS_SOURCE && !configured_sources.contains(*s))
                .cloned()
                .collect();
            for name in stale {
                tracing::info!(source = %name, "source no longer configured; dropping its endpoints");
                let pending = {
                    let mut inner = mesh.lock();
                    inner.invalid.retain(|(s, _), _| *s != name);
                    let delta = inner.registry.remove_source(&name);
                    mesh.prepare(
                        &mut inner,
                        touched_keys([delta]),
                        &[name],
                        false,
                        Vec::new(),
                    )
                };
                mesh.finish(pending).await?;
            }
            // Workloads restored from the store wait for their agents to reconnect.
            let inner = mesh.lock();
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
            drop(inner);
            // On a shared store the restored workloads include those of agents connected
            // to other controllers: only the controller holding an agent's session
            // expires its workload.
            if !mesh.store.shared() {
                for agent_id in restored {
                    mesh.schedule_expiry(agent_id, 0);
                }
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

    /// Prepares one change, under the lock: `touched` are the services whose merged view
    /// changed, `sources` the sources whose data or state may have changed. Allocates the
    /// new services' VIPs and encodes the write; [`Mesh::finish`] persists and publishes
    /// it. The caller holds `writer` from before the change until `finish` returns, so
    /// versions are written and published in order and none is lost.
    fn prepare(
        &self,
        inner: &mut Inner,
        touched: BTreeSet<ServiceKey>,
        sources: &[String],
        deny_changed: bool,
        policies: Vec<(String, Option<PolicyRecord>)>,
    ) -> Pending {
        self.prepare_all(inner, touched, sources, deny_changed, policies, Vec::new())
    }

    /// [`Mesh::prepare`] with routing resources too.
    fn prepare_all(
        &self,
        inner: &mut Inner,
        touched: BTreeSet<ServiceKey>,
        sources: &[String],
        deny_changed: bool,
        policies: Vec<(String, Option<PolicyRecord>)>,
        routes: Vec<(String, Option<RouteRecord>)>,
    ) -> Pending {
        let nothing =
            touched.is_empty() && !deny_changed && policies.is_empty() && routes.is_empty();
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
                routes: routes.iter().map(|(k, _)| k.clone()).collect(),
            }
        };
        let registry = &inner.registry;
        let mut write = MeshWrite {
            version,
            sources: Vec::new(),
            data: Vec::new(),
            vips: new_vips,
            history: &history,
            history_keep_from,
            policies: policies.clone(),
            routes: routes.clone(),
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
        // Only a state change (e.g. an error message) with no endpoint change is written
        // without a new version; no change at all writes nothing.
        let write = (!nothing || !write.sources.is_empty()).then(|| write.encode());
        Pending {
            publish: (!nothing).then_some(Publish {
                version,
                history,
                history_keep_from,
                policies,
                routes,
            }),
            write,
            current: inner.version,
        }
    }

    /// Writes a prepared change in one store transaction (off the async workers, without
    /// the lock), then publishes its version. Returns the new version (or the old one if
    /// nothing changed).
    async fn finish(&self, pending: Pending) -> Result<u64, StoreError> {
        if let Some(write) = pending.write {
            // On a shared store the mesh in memory is marked diverged before the write
            // goes out, and the mark is put back only once the store took the write: a
            // caller dropped while it waits (a leadership term's tasks are aborted as
            // soon as the fence refuses a write, from inside that write) would otherwise
            // leave a registry in memory that the store never got, unmarked, and the
            // next term would diff its sources' data against it, find nothing changed
            // and store nothing. Marked, the next write or term reloads first.
            let was_diverged = self.store.shared() && {
                let mut inner = self.lock();
                std::mem::replace(&mut inner.diverged, true)
            };
            let store = self.store.clone();
            let saved = tokio::task::spawn_blocking(move || store.save_mesh(&write)).await;
            if self.store.shared() && matches!(saved, Ok(Ok(()))) {
                self.lock().diverged = was_diverged;
            }
            match saved {
                Ok(Err(e)) => {
                    if self.store.shared() {
                        // The change was applied in memory but not stored: reload now,
                        // still holding the writer lock, so that no later write (the
                        // next leadership term's first source update, say) is diffed
                        // against a registry that etcd never got: it would find nothing
                        // changed and store nothing. If the reload fails too, the
                        // follower task retries it.
                        // Still marked (above), and handed to the follower first: if
                        // this task is dropped while it reloads (a term's sources stop
                        // when it ends), the next write still reloads first (see
                        // `apply_source_update_once`).
                        self.stale.notify_one();
                        if let Err(reload) = self.reload_locked(true).await {
                            tracing::warn!(error = %reload, "cannot reload the mesh after a failed write; retrying in the background");
                        }
                    }
                    return Err(e);
                }
                Ok(r) => r?,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {
                    return Err(StoreError::Db(sled::Error::Io(std::io::Error::other(
                        "the controller is shutting down",
                    ))));
                }
            }
        }
        let Some(p) = pending.publish else {
            return Ok(pending.current);
        };
        let mut inner = self.lock();
        inner.version = p.version;
        for (key, rec) in p.policies {
            match rec {
                Some(rec) => inner.policies.insert(key, rec),
                None => inner.policies.remove(&key),
            };
        }
        for (key, rec) in p.routes {
            match rec {
                Some(rec) => inner.routes.insert(key, rec),
                None => inner.routes.remove(&key),
            };
        }
        inner.history.insert(p.version, p.history);
        inner.history.retain(|v, _| *v >= p.history_keep_from);
        self.version_tx.send_replace(inner.version);
        self.flush.notify_one();
        Ok(inner.version)
    }

    /// Applies a registry source's update (consumed: its data moves into the registry).
    pub async fn apply_source_update(&self, update: SourceUpdate) -> Result<u64, StoreError> {
        self.apply_source_update_fenced(update, None).await
    }

    /// [`Mesh::apply_source_update`] under a leadership `fence` (HA controllers): the
    /// store refuses the write unless that leadership still holds.
    ///
    /// On a shared store a write that lost the race with another controller's (a join or
    /// a renewal there moves the mesh version too) is tried again on the reloaded mesh, a
    /// few times: the failed write's change would otherwise be dropped by the reload and
    /// wait for the source's next change. A write refused by the fence is not retried.
    pub async fn apply_source_update_fenced(
        &self,
        mut update: SourceUpdate,
        fence: Option<crate::store::Fence>,
    ) -> Result<u64, StoreError> {
        let mut attempt = 0;
        loop {
            let again = (self.store.shared() && attempt < 5).then(|| update.clone());
            match self.apply_source_update_once(update, fence.clone()).await {
                Err(StoreError::Conflict(e))
                    if again.is_some()
                        && !fence
                            .as_ref()
                            .is_some_and(|f| crate::ha::is_fenced(f.revision)) =>
                {
                    attempt += 1;
                    tracing::info!(error = %e, attempt, "registry update raced another controller's write; reloading the mesh and trying again");
                    // The failed write reloaded the mesh already (see `finish`);
                    // this reloads only if that reload failed.
                    self.resync(false).await?;
                    update = again.expect("checked above");
                }
                r => return r,
            }
        }
    }

    async fn apply_source_update_once(
        &self,
        mut update: SourceUpdate,
        fence: Option<crate::store::Fence>,
    ) -> Result<u64, StoreError> {
        let _writer = self.writer.lock().await;
        // A mesh changed in memory by a write the store refused is reloaded before it
        // is diffed again: otherwise the same data would look unchanged and never be
        // stored.
        if self.store.shared() && self.lock().diverged {
            self.reload_locked(true).await?;
        }
        let pending = {
            let mut inner = self.lock();
            let source = update.source.clone();
            if let Some(change) = update.change.as_mut() {
                screen(&mut inner.invalid, &source, change, self.settings.vip_range);
            }
            let mut touched = BTreeSet::new();
            apply_update_into(&mut inner.registry, update, now_ms(), &mut |d| {
                touched.insert(d.key);
            });
            let mut pending = self.prepare(
                &mut inner,
                touched,
                std::slice::from_ref(&source),
                false,
                Vec::new(),
            );
            if let Some(w) = pending.write.as_mut() {
                w.fence = fence;
            }
            pending
        };
        self.finish(pending).await
    }

    /// The store revision of the mesh version this controller last read or wrote (on a
    /// shared store; see [`Store::mesh_revision`]).
    pub fn store_revision(&self) -> Option<i64> {
        self.store.mesh_revision()
    }

    /// Waits until a write to a shared store failed (the view may be stale).
    pub async fn stale_notified(&self) {
        self.stale.notified().await;
    }

    /// Reloads the mesh from the store when the store's version differs from this
    /// controller's (or always, with `force`): on a shared store another controller
    /// wrote it. The sessions stay; each agent is then sent what changed since its own
    /// version (the history is reloaded too). The deny list is rebuilt from the removed
    /// agents. Returns the version now in force.
    pub async fn resync(&self, force: bool) -> Result<u64, StoreError> {
        let _writer = self.writer.lock().await;
        self.reload_locked(force).await
    }

    /// [`Mesh::resync`] for a caller that holds the writer lock.
    async fn reload_locked(&self, force: bool) -> Result<u64, StoreError> {
        let store = self.store.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let dump = store.load_mesh()?;
            let agents = store.agents()?;
            Ok::<_, StoreError>((dump, agents))
        })
        .await
        .map_err(|e| StoreError::Conflict(format!("the mesh reload task failed: {e}")))?;
        let (mut dump, agents) = loaded?;
        let mut inner = self.lock();
        if !force && !inner.diverged && dump.version == inner.version {
            return Ok(inner.version);
        }
        let mut registry = Registry::new();
        let mut invalid = BTreeMap::new();
        for (name, rec) in &dump.sources {
            let mut change = SourceChange::Full(SourceSnapshot {
                services: dump.data.remove(name).unwrap_or_default(),
            });
            screen(&mut invalid, name, &mut change, self.settings.vip_range);
            registry.apply_with_state_into(name, rec.kind, change, rec.state.clone(), &mut |_| {});
        }
        let now = crate::enroll::now_unix();
        let removed: Vec<AgentRecord> = agents
            .into_iter()
            .filter(|a| a.removed_at.is_some())
            .collect();
        // An agent removed through another controller loses its session here too.
        for a in &removed {
            if let Some(s) = inner.sessions.get(&a.id) {
                s.kick.notify_one();
            }
        }
        let deny: BTreeMap<String, i64> = removed
            .into_iter()
            .flat_map(|a| a.live_certs)
            .filter(|c| c.not_after > now)
            .map(|c| (c.serial, c.not_after))
            .collect();
        tracing::info!(
            from = inner.version,
            to = dump.version,
            "mesh reloaded from the shared store"
        );
        inner.used_vips = dump.vips.values().copied().collect();
        inner.vips = dump.vips;
        inner.registry = registry;
        inner.invalid = invalid;
        inner.history = dump.history;
        inner.policies = dump.policies;
        inner.routes = dump.routes;
        inner.deny = deny;
        inner.version = dump.version;
        inner.diverged = false;
        inner.last_update = None;
        self.version_tx.send_replace(inner.version);
        Ok(inner.version)
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
                routes: inner.routes.iter().map(route_msg).collect(),
                required_features: {
                    let mut f = required_features(inner.policies.keys(), false);
                    if !inner.routes.is_empty() {
                        f.push(FEATURE_ROUTE.to_owned());
                    }
                    f
                },
                ..ConfigUpdate::default()
            };
        }
        let mut keys = BTreeSet::new();
        let mut deny = false;
        let mut policy_keys = BTreeSet::new();
        let mut route_keys = BTreeSet::new();
        for (_, rec) in inner.history.range(since + 1..) {
            keys.extend(rec.services.iter().cloned());
            deny |= rec.deny;
            policy_keys.extend(rec.policies.iter().cloned());
            route_keys.extend(rec.routes.iter().cloned());
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
        // An agent that does not know policies must refuse the update, not apply the
        // registry part and silently allow everything.
        update.required_features = required_features(
            update.policies.iter().map(|p| &p.key),
            !update.removed_policies.is_empty(),
        );
        for key in route_keys {
            match inner.routes.get_key_value(&key) {
                Some(entry) => update.routes.push(route_msg(entry)),
                None => update.removed_routes.push(key),
            }
        }
        if !update.routes.is_empty() || !update.removed_routes.is_empty() {
            // An agent that cannot route must refuse, not send every request everywhere.
            update.required_features.push(FEATURE_ROUTE.to_owned());
        }
        update
    }

    /// Applies routing resources all-or-nothing in one version (create or replace each);
    /// with `dry_run`, reports what would change and writes nothing. Each resource must
    /// be validated on its own by the caller; here, under the lock, the resulting set is
    /// checked as a whole (every subset a route names is defined by a DestinationRule of
    /// its host), so a concurrent change cannot slip a dangling subset in.
    pub async fn apply_routes(
        &self,
        resources: Vec<RouteResource>,
        dry_run: bool,
    ) -> Result<PolicyApplied, RoutesRefused> {
        let _writer = self.writer.lock().await;
        let (current, pending, results) = {
            let mut inner = self.lock();
            let mut next_seq = inner.routes.values().map(|r| r.seq + 1).max().unwrap_or(1);
            let mut writes: Vec<(String, Option<RouteRecord>)> = Vec::new();
            let mut results = Vec::new();
            let mut after = inner.routes.clone();
            let version = inner.version + 1;
            for resource in resources {
                let key = resource.key();
                let stored = inner.routes.get(&key);
                let outcome = match stored {
                    Some(old) if old.resource == resource => PolicyOutcome::Unchanged,
                    Some(_) => PolicyOutcome::Configured,
                    None => PolicyOutcome::Created,
                };
                // Kept when re-applied; a new resource named twice in one batch gets one.
                let seq = match (stored, after.get(&key)) {
                    (Some(old), _) | (None, Some(old)) => old.seq,
                    (None, None) => {
                        next_seq += 1;
                        next_seq - 1
                    }
                };
                results.push((key.clone(), outcome));
                // A later document of the same batch for the same resource wins.
                writes.retain(|(k, _)| *k != key);
                let rec = RouteRecord {
                    seq,
                    version,
                    resource,
                };
                if outcome != PolicyOutcome::Unchanged {
                    writes.push((key.clone(), Some(rec.clone())));
                }
                after.insert(key, rec);
            }
            let problems = route_set_problems(&after);
            if !problems.is_empty() {
                return Err(RoutesRefused::Invalid(problems));
            }
            let pending = (!dry_run && !writes.is_empty()).then(|| {
                self.prepare_all(&mut inner, BTreeSet::new(), &[], false, Vec::new(), writes)
            });
            (inner.version, pending, results)
        };
        let version = match pending {
            Some(pending) => self.finish(pending).await?,
            None => current,
        };
        Ok(PolicyApplied { version, results })
    }

    /// Deletes routing resources by `Kind/namespace/name`, all or none: a key that does
    /// not exist, or a DestinationRule whose subsets a remaining VirtualService still
    /// names, fails the whole call.
    pub async fn delete_routes(&self, keys: &[String]) -> Result<u64, RoutesRefused> {
        let _writer = self.writer.lock().await;
        let pending = {
            let mut inner = self.lock();
            if let Some(missing) = keys.iter().find(|k| !inner.routes.contains_key(*k)) {
                return Err(RoutesRefused::Store(StoreError::NotFound {
                    kind: "routing resource",
                    name: missing.clone(),
                }));
            }
            let mut after = inner.routes.clone();
            for k in keys {
                after.remove(k);
            }
            let problems = route_set_problems(&after);
            if !problems.is_empty() {
                return Err(RoutesRefused::Invalid(problems));
            }
            let writes = keys.iter().map(|k| (k.clone(), None)).collect();
            self.prepare_all(&mut inner, BTreeSet::new(), &[], false, Vec::new(), writes)
        };
        Ok(self.finish(pending).await?)
    }

    /// Every routing resource, by `Kind/namespace/name`.
    pub fn routes(&self) -> BTreeMap<String, RouteRecord> {
        self.lock().routes.clone()
    }

    /// Applies policy resources all-or-nothing in one version (create or replace each);
    /// with `dry_run`, reports what would change and writes nothing. Resources must be
    /// validated by the caller.
    pub async fn apply_policies(
        &self,
        resources: Vec<Resource>,
        dry_run: bool,
    ) -> Result<PolicyApplied, StoreError> {
        let _writer = self.writer.lock().await;
        let (current, pending, results) = {
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
            let pending = (!dry_run && !writes.is_empty())
                .then(|| self.prepare(&mut inner, BTreeSet::new(), &[], false, writes));
            (inner.version, pending, results)
        };
        let version = match pending {
            Some(pending) => self.finish(pending).await?,
            None => current,
        };
        Ok(PolicyApplied { version, results })
    }

    /// Deletes policy resources by `Kind/namespace/name`, all or none: a key that does not
    /// exist fails the whole call.
    pub async fn delete_policies(&self, keys: &[String]) -> Result<u64, StoreError> {
        let _writer = self.writer.lock().await;
        let pending = {
            let mut inner = self.lock();
            if let Some(missing) = keys.iter().find(|k| !inner.policies.contains_key(*k)) {
                return Err(StoreError::NotFound {
                    kind: "policy",
                    name: missing.clone(),
                });
            }
            let writes = keys.iter().map(|k| (k.clone(), None)).collect();
            self.prepare(&mut inner, BTreeSet::new(), &[], false, writes)
        };
        self.finish(pending).await
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
        // Locality (issue 21): a VM has no node object, so its group's Kubernetes
        // topology labels say where it runs (a group per zone).
        ep.locality.region = labels.get(REGION_LABEL).cloned();
        ep.locality.zone = labels.get(ZONE_LABEL).cloned();
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
    ///
    /// On a shared store (HA controllers) a registration that lost a race with another
    /// controller's write is tried again on the reloaded mesh, twice at most.
    pub async fn session_start(
        &self,
        agent: &AgentRecord,
        group: Option<&WorkloadGroup>,
        address: Result<IpAddr, String>,
        remote: IpAddr,
        cidrs: &[IpNet],
        acked_version: u64,
    ) -> Result<(SessionHandle, Option<String>), StoreError> {
        let mut attempt = 0;
        loop {
            let r = self
                .session_start_once(agent, group, address.clone(), remote, cidrs, acked_version)
                .await;
            match r {
                Err(StoreError::Conflict(e)) if self.store.shared() && attempt < 2 => {
                    attempt += 1;
                    tracing::info!(agent = %agent.id, error = %e, "registration raced another controller; reloading the mesh and trying again");
                    self.resync(true).await?;
                }
                r => return r,
            }
        }
    }

    async fn session_start_once(
        &self,
        agent: &AgentRecord,
        group: Option<&WorkloadGroup>,
        address: Result<IpAddr, String>,
        remote: IpAddr,
        cidrs: &[IpNet],
        acked_version: u64,
    ) -> Result<(SessionHandle, Option<String>), StoreError> {
        let _writer = self.writer.lock().await;
        let (generation, kick, shown, refusal, pending) = {
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
            let mut pending = None;
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
                pending = delta.map(|delta| {
                    self.prepare(
                        &mut inner,
                        touched_keys([delta]),
                        &[AGENTS_SOURCE.to_owned()],
                        false,
                        Vec::new(),
                    )
                });
            }
            (generation, kick, shown, refusal, pending)
        };
        if let Some(pending) = pending {
            self.finish(pending).await?;
        }
        let mut inner = self.lock();
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
                scrape: None,
                traffic: None,
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
    pub async fn session_end(
        self: &Arc<Self>,
        h: &SessionHandle,
        graceful: bool,
    ) -> Result<(), StoreError> {
        let _writer = self.writer.lock().await;
        let pending = {
            let mut inner = self.lock();
            let Some(s) = inner.sessions.get_mut(&h.agent_id) else {
                return Ok(());
            };
            if s.view.generation != h.generation {
                return Ok(()); // a newer session owns the lease
            }
            s.view.connected = false;
            s.view.since_ms = now_ms();
            if !graceful {
                drop(inner);
                self.schedule_expiry(h.agent_id.clone(), h.generation);
                return Ok(());
            }
            Self::deregister(&mut inner, &h.agent_id).map(|delta| {
                self.prepare(
                    &mut inner,
                    touched_keys([delta]),
                    &[AGENTS_SOURCE.to_owned()],
                    false,
                    Vec::new(),
                )
            })
        };
        if let Some(pending) = pending {
            self.finish(pending).await?;
        }
        tracing::info!(agent = %h.agent_id, "agent left gracefully; workload deregistered");
        Ok(())
    }

    fn schedule_expiry(self: &Arc<Self>, agent_id: String, generation: u64) {
        let mesh = Arc::downgrade(self);
        let grace = self.settings.agent_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let Some(mesh) = mesh.upgrade() else { return };
            let _writer = mesh.writer.lock().await;
            let pending = {
                let mut inner = mesh.lock();
                let current = inner
                    .sessions
                    .get(&agent_id)
                    .map(|s| (s.view.generation, s.view.connected));
                let expire = match current {
                    None => generation == 0,
                    Some((g, connected)) => g == generation && !connected,
                };
                if !expire {
                    return;
                }
                let Some(delta) = Self::deregister(&mut inner, &agent_id) else {
                    return;
                };
                tracing::info!(%agent_id, "agent connection gone longer than the grace period; workload deregistered");
                mesh.prepare(
                    &mut inner,
                    touched_keys([delta]),
                    &[AGENTS_SOURCE.to_owned()],
                    false,
                    Vec::new(),
                )
            };
            if let Err(e) = mesh.finish(pending).await {
                tracing::error!(error = %e, "cannot persist a deregistration");
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

    /// Records where a remote Prometheus may scrape the agent (from its hello).
    pub fn record_scrape_target(&self, h: &SessionHandle, target: crate::sd::ScrapeTarget) {
        if let Some(s) = self.lock().sessions.get_mut(&h.agent_id)
            && s.view.generation == h.generation
        {
            s.scrape = Some(target);
        }
    }

    /// The scrape targets of the connected agents, by agent id (Prometheus service
    /// discovery).
    pub fn scrape_targets(&self) -> BTreeMap<String, crate::sd::ScrapeTarget> {
        self.lock()
            .sessions
            .iter()
            .filter(|(_, s)| s.view.connected)
            .filter_map(|(id, s)| Some((id.clone(), s.scrape.clone()?)))
            .collect()
    }

    /// Records an agent's traffic summary, replacing its previous one (at most
    /// [`causeway_api::push::MAX_EDGES_PER_REPORT`] edges are kept).
    pub fn record_traffic(&self, h: &SessionHandle, mut report: causeway_api::push::TrafficReport) {
        if let Some(s) = self.lock().sessions.get_mut(&h.agent_id)
            && s.view.generation == h.generation
        {
            let extra = report
                .edges
                .len()
                .saturating_sub(causeway_api::push::MAX_EDGES_PER_REPORT);
            report
                .edges
                .truncate(causeway_api::push::MAX_EDGES_PER_REPORT);
            report.dropped = report
                .dropped
                .saturating_add(u32::try_from(extra).unwrap_or(u32::MAX));
            s.traffic = Some((std::time::Instant::now(), report));
        }
    }

    /// The traffic of the connected agents, merged from their summaries younger than
    /// [`crate::traffic::FRESH`].
    pub fn traffic(&self) -> causeway_api::admin::TrafficView {
        let inner = self.lock();
        crate::traffic::merge(
            inner
                .sessions
                .values()
                .filter(|s| s.view.connected)
                .filter_map(|s| s.traffic.as_ref())
                .filter(|(at, _)| at.elapsed() <= crate::traffic::FRESH)
                .map(|(_, r)| r),
        )
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
    pub async fn agent_removed(
        &self,
        agent_id: &str,
        certs: &[LiveCert],
    ) -> Result<(), StoreError> {
        let now = crate::enroll::now_unix();
        let _writer = self.writer.lock().await;
        let pending = {
            let mut inner = self.lock();
            for c in certs.iter().filter(|c| c.not_after > now) {
                inner.deny.insert(c.serial.clone(), c.not_after);
            }
            let delta = Self::deregister(&mut inner, agent_id);
            if let Some(s) = inner.sessions.get(agent_id) {
                s.kick.notify_one();
            }
            self.prepare(
                &mut inner,
                touched_keys(delta),
                &[AGENTS_SOURCE.to_owned()],
                true,
                Vec::new(),
            )
        };
        self.finish(pending).await?;
        self.deny_added.notify_one();
        Ok(())
    }

    /// Drops deny entries whose certificates expired by `now` (pushing the shorter list
    /// when any did); returns when the next one expires.
    pub async fn prune_deny(&self, now: i64) -> Result<Option<i64>, StoreError> {
        let _writer = self.writer.lock().await;
        let (pending, next) = {
            let mut inner = self.lock();
            let before = inner.deny.len();
            inner.deny.retain(|_, not_after| *not_after > now);
            let next = inner.deny.values().min().copied();
            if inner.deny.len() == before {
                return Ok(next);
            }
            tracing::info!(
                expired = before - inner.deny.len(),
                left = inner.deny.len(),
                "expired certificates dropped from the deny list"
            );
            (
                self.prepare(&mut inner, BTreeSet::new(), &[], true, Vec::new()),
                next,
            )
        };
        self.finish(pending).await?;
        Ok(next)
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

    /// The lowest version a connected agent has acknowledged; None when no agent is
    /// connected (for the push lag metric).
    pub fn min_acked_version(&self) -> Option<u64> {
        let inner = self.lock();
        let connected = inner.sessions.values().filter(|s| s.view.connected);
        connected.map(|s| s.view.acked_version).min()
    }

    /// Since when (ms since the Unix epoch) each registry source has been stale.
    pub fn source_stale_since_ms(&self) -> BTreeMap<String, Option<u64>> {
        let inner = self.lock();
        let sources = inner.registry.sources().iter();
        sources
            .map(|(n, e)| (n.clone(), e.state.stale_since_ms))
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
            .service_keys_after(after)
            .filter_map(|key| Self::service_view(&inner, key))
            .take(limit)
            .collect()
    }

    /// [`Mesh::services_page`], ending the page early (after at least one service) once
    /// copying it has taken `budget`: the longest it holds the mesh lock is about
    /// `budget` plus one service.
    pub fn services_page_within(
        &self,
        after: Option<&ServiceKey>,
        limit: usize,
        budget: std::time::Duration,
    ) -> Vec<ServiceView> {
        let inner = self.lock();
        let start = std::time::Instant::now();
        let mut page = Vec::new();
        for key in inner.registry.service_keys_after(after) {
            if page.len() >= limit || (!page.is_empty() && start.elapsed() >= budget) {
                break;
            }
            page.extend(Self::service_view(&inner, key));
        }
        page
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
                    region: e.locality.region.clone(),
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
                    causeway_api::registry::SourceStatus::Synced => SourceStateView::Synced,
                    causeway_api::registry::SourceStatus::Stale => SourceStateView::Stale,
                    _ => SourceStateView::Pending,
                },
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

    fn settings(vip_range: &str, grace: Duration) -> MeshSettings {
        MeshSettings {
            vip_range: vip_range.parse().unwrap(),
            agent_grace: grace,
            history_len: 16,
            control_on_loopback: false,
        }
    }

    async fn open(dir: &std::path::Path, settings: MeshSettings) -> Arc<Mesh> {
        let store: Arc<dyn Store> = Arc::new(SledStore::reopen(dir).unwrap());
        let configured = BTreeSet::from(["file".to_owned()]);
        Mesh::open(store, settings, Vec::new(), &configured, BTreeMap::new())
            .await
            .unwrap()
    }

    /// A source update that sets `services` (one endpoint each) of source `file`.
    fn file_update(services: &[&str]) -> SourceUpdate {
        let mut changes = BTreeMap::new();
        for (i, name) in services.iter().enumerate() {
            let ep = Endpoint::new(
                format!("10.0.0.{}", i + 1),
                Provenance {
                    source: "file".into(),
                    kind: SourceKind::File,
                    native_id: (*name).to_owned(),
                    revision: "1".into(),
                },
            );
            changes.insert(
                ServiceKey::new("default", *name),
                BTreeMap::from([((*name).to_owned(), ep)]),
            );
        }
        SourceUpdate {
            source: "file".into(),
            kind: SourceKind::File,
            change: Some(SourceChange::Services(changes)),
            state: SourceState::synced(),
        }
    }

    fn vips(mesh: &Mesh) -> BTreeMap<String, Option<Ipv4Addr>> {
        mesh.services()
            .into_iter()
            .map(|s| (s.name, s.vip))
            .collect()
    }

    fn agent(id: &str) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            group: "web".into(),
            spiffe_id: "spiffe://causeway.local/ns/default/sa/web".into(),
            hostname: "h".into(),
            address: "10.1.0.1".parse().unwrap(),
            token_id: "t".into(),
            joined_at: 1,
            serial: format!("s-{id}"),
            not_after: i64::MAX,
            renewed_at: None,
            renewals: 0,
            removed_at: None,
            live_certs: Vec::new(),
        }
    }

    fn group() -> WorkloadGroup {
        WorkloadGroup {
            name: "web".into(),
            namespace: "default".into(),
            service_account: "web".into(),
            service: Some("web".into()),
            ports: vec![causeway_api::group::PortSpec {
                name: "http".into(),
                port: 8080,
            }],
            labels: BTreeMap::new(),
            allowed_cidrs: Vec::new(),
            mtls: Default::default(),
            registry_source: None,
        }
    }

    /// The agents registered as endpoints of `default/web`.
    fn web_agents(mesh: &Mesh) -> Vec<String> {
        mesh.services()
            .into_iter()
            .filter(|s| s.name == "web")
            .flat_map(|s| s.endpoints)
            .filter_map(|e| e.agent)
            .collect()
    }

    async fn start(mesh: &Arc<Mesh>, id: &str, address: &str) -> (SessionHandle, Option<String>) {
        let remote: IpAddr = address.parse().unwrap_or("10.1.0.1".parse().unwrap());
        mesh.session_start(
            &agent(id),
            Some(&group()),
            address.parse().map_err(|_| address.to_owned()),
            remote,
            &[],
            0,
        )
        .await
        .unwrap()
    }

    fn route(yaml: &str) -> RouteResource {
        let v: serde_json::Value = serde_yaml_ng::from_str(yaml).unwrap();
        causeway_api::route::decode_value(v).unwrap()
    }

    const DR: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web}\nspec:\n  host: web\n  subsets:\n  - {name: v1, labels: {version: v1}}\n";
    const VS: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: web}\nspec:\n  hosts: [web]\n  http:\n  - route:\n    - destination: {host: web.default.svc.cluster.local, subset: v1}\n";

    /// Routing resources: one version per apply, pushed in full snapshots and deltas with
    /// the required feature `route/v1` (an agent that cannot route refuses the update), a
    /// dangling subset refused with nothing applied, kept across a restart.
    #[tokio::test(flavor = "current_thread")]
    async fn routes_are_versioned_pushed_with_their_feature_and_checked_as_a_set() {
        let dir = tempfile::tempdir().unwrap();
        let mesh = open(
            dir.path(),
            settings("240.240.0.0/24", Duration::from_secs(60)),
        )
        .await;
        let v0 = mesh.version();
        // The VirtualService alone names a subset nobody defines: refused, nothing stored.
        let Err(RoutesRefused::Invalid(problems)) = mesh.apply_routes(vec![route(VS)], false).await
        else {
            panic!("a dangling subset was accepted")
        };
        assert!(
            problems[0].starts_with("VirtualService/default/web: spec.http[0].route[0].destination.subset: subset \"v1\" of default/web"),
            "{problems:?}"
        );
        assert_eq!(mesh.version(), v0);
        assert!(mesh.routes().is_empty());
        // A dry run of both reports and writes nothing.
        let dry = mesh
            .apply_routes(vec![route(DR), route(VS)], true)
            .await
            .map_err(|_| ())
            .unwrap();
        assert_eq!(dry.version, v0);
        assert!(mesh.routes().is_empty());
        let applied = mesh
            .apply_routes(vec![route(DR), route(VS)], false)
            .await
            .map_err(|_| ())
            .unwrap();
        assert_eq!(applied.version, v0 + 1);
        assert_eq!(applied.results[0].1, PolicyOutcome::Created);
        let full = mesh.update_since(0);
        assert_eq!(full.routes.len(), 2);
        assert_eq!(full.required_features, vec![FEATURE_ROUTE.to_owned()]);
        let delta = mesh.update_since(v0);
        assert_eq!(
            delta
                .routes
                .iter()
                .map(|r| r.key.as_str())
                .collect::<Vec<_>>(),
            ["DestinationRule/default/web", "VirtualService/default/web"]
        );
        assert_eq!(delta.required_features, vec![FEATURE_ROUTE.to_owned()]);
        // An agent applies them.
        let state = causeway_api::push::MeshState::default()
            .apply(&full)
            .unwrap()
            .state;
        assert_eq!(state.routes.len(), 2);
        // Deleting the rule the route needs is refused; deleting both works.
        let dr = "DestinationRule/default/web".to_owned();
        let vs = "VirtualService/default/web".to_owned();
        assert!(matches!(
            mesh.delete_routes(std::slice::from_ref(&dr)).await,
            Err(RoutesRefused::Invalid(_))
        ));
        drop(mesh);
        let mesh = open(
            dir.path(),
            settings("240.240.0.0/24", Duration::from_secs(60)),
        )
        .await;
        assert_eq!(mesh.routes().len(), 2, "kept across a restart");
        let v = mesh
            .delete_routes(&[vs.clone(), dr.clone()])
            .await
            .map_err(|_| ())
            .unwrap();
        let delta = mesh.update_since(v - 1);
        assert_eq!(delta.removed_routes, vec![dr, vs]);
        assert_eq!(delta.required_features, vec![FEATURE_ROUTE.to_owned()]);
        assert!(mesh.update_since(0).required_features.is_empty());
    }

    /// VIPs come from the range, never its network or broadcast address, each service
    /// keeps its own across changes and restarts, and an exhausted range leaves a new
    /// service without one (and the others untouched).
    #[tokio::test(flavor = "current_thread")]
    async fn vips_are_unique_stable_and_bounded_by_the_range() {
        let dir = tempfile::tempdir().unwrap();
        // A /28: 16 addresses, 14 usable.
        let range = "240.240.0.0/28";
        let mesh = open(dir.path(), settings(range, Duration::from_secs(60))).await;
        let names: Vec<String> = (0..14).map(|i| format!("svc{i:02}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let v1 = mesh.apply_source_update(file_update(&refs)).await.unwrap();
        assert_eq!(v1, 1, "one update, one version");
        let first = vips(&mesh);
        let net: Ipv4Net = range.parse().unwrap();
        let allocated: BTreeSet<Ipv4Addr> = first.values().map(|v| v.unwrap()).collect();
        assert_eq!(
            allocated.len(),
            14,
            "every service has its own VIP: {first:?}"
        );
        for ip in &allocated {
            assert!(net.contains(ip), "{ip} outside {net}");
            assert_ne!(*ip, net.network());
            assert_ne!(*ip, net.broadcast());
        }
        // The range is full: the 15th service has none; the others keep theirs.
        mesh.apply_source_update(file_update(&["late"]))
            .await
            .unwrap();
        let now = vips(&mesh);
        assert_eq!(now["late"], None);
        for (name, vip) in &first {
            assert_eq!(now[name], *vip, "{name} kept its VIP");
        }
        // A change to a service with a VIP keeps it.
        let update = file_update(&["svc03"]);
        mesh.apply_source_update(update).await.unwrap();
        assert_eq!(vips(&mesh)["svc03"], first["svc03"]);
        let version = mesh.version();
        drop(mesh);

        // After a restart on the same store: the same VIPs and version.
        let mesh = open(dir.path(), settings(range, Duration::from_secs(60))).await;
        assert_eq!(mesh.version(), version);
        let restored = vips(&mesh);
        for (name, vip) in &first {
            assert_eq!(restored[name], *vip, "{name} kept its VIP across a restart");
        }
    }

    /// Each change is written in version order with its history: a subscriber behind by
    /// one version gets only what changed since.
    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_changes_each_get_their_own_version_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mesh = open(
            dir.path(),
            settings("240.240.0.0/16", Duration::from_secs(60)),
        )
        .await;
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let mesh = mesh.clone();
                tokio::spawn(async move {
                    let name = format!("svc{i}");
                    mesh.apply_source_update(file_update(&[name.as_str()]))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut versions = Vec::new();
        for t in tasks {
            versions.push(t.await.unwrap());
        }
        versions.sort_unstable();
        assert_eq!(
            versions,
            (1..=8).collect::<Vec<u64>>(),
            "no version lost or shared"
        );
        assert_eq!(mesh.version(), 8);
        for v in 1..8 {
            let delta = mesh.update_since(v);
            assert!(!delta.full);
            assert_eq!(delta.services.len(), usize::try_from(8 - v).unwrap());
        }
        drop(mesh);
        // Everything reached the store.
        let mesh = open(
            dir.path(),
            settings("240.240.0.0/16", Duration::from_secs(60)),
        )
        .await;
        assert_eq!(mesh.version(), 8);
        assert_eq!(mesh.services().len(), 8);
    }

    /// A lost connection keeps the workload for the grace period, then withdraws it; a
    /// graceful end withdraws it at once.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_lost_session_keeps_its_lease_for_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let grace = Duration::from_secs(60);
        let mesh = open(dir.path(), settings("240.240.0.0/16", grace)).await;
        let (h, refusal) = start(&mesh, "a1", "10.1.0.1").await;
        assert_eq!(refusal, None);
        assert_eq!(web_agents(&mesh), ["a1"]);
        assert!(mesh.sessions()["a1"].connected);

        mesh.session_end(&h, false).await.unwrap();
        assert!(!mesh.sessions()["a1"].connected);
        tokio::time::sleep(grace - Duration::from_secs(1)).await;
        assert_eq!(
            web_agents(&mesh),
            ["a1"],
            "still registered within the grace"
        );
        let version = mesh.version();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(web_agents(&mesh).is_empty(), "withdrawn after the grace");
        assert_eq!(mesh.version(), version + 1);

        // A graceful end withdraws at once.
        let (h, _) = start(&mesh, "a2", "10.1.0.2").await;
        assert_eq!(web_agents(&mesh), ["a2"]);
        mesh.session_end(&h, true).await.unwrap();
        assert!(web_agents(&mesh).is_empty());
    }

    /// A reconnection within the grace period keeps the lease: the older session's end
    /// (and its expiry) do not withdraw the newer session's workload, and the older
    /// session is told to stop.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_newer_session_owns_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let grace = Duration::from_secs(60);
        let mesh = open(dir.path(), settings("240.240.0.0/16", grace)).await;
        let (old, _) = start(&mesh, "a1", "10.1.0.1").await;
        mesh.session_end(&old, false).await.unwrap();
        tokio::time::sleep(grace / 2).await;
        let (new, _) = start(&mesh, "a1", "10.1.0.1").await;
        assert!(new.generation > old.generation);
        tokio::time::sleep(grace * 2).await;
        assert_eq!(
            web_agents(&mesh),
            ["a1"],
            "the newer session holds the lease"
        );
        // The older one ending again (its task noticing late) changes nothing.
        mesh.session_end(&old, true).await.unwrap();
        assert_eq!(web_agents(&mesh), ["a1"]);
        assert!(mesh.sessions()["a1"].connected);

        // A third session kicks the second.
        let kicked = new.kick.clone();
        let notified = kicked.notified();
        let (_third, _) = start(&mesh, "a1", "10.1.0.1").await;
        tokio::time::timeout(Duration::from_secs(1), notified)
            .await
            .expect("the replaced session is told to end");
    }

    /// An address the controller cannot vouch for is not registered, and withdraws what
    /// an earlier session of the agent registered.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_refused_address_withdraws_the_registration() {
        let dir = tempfile::tempdir().unwrap();
        let mesh = open(
            dir.path(),
            settings("240.240.0.0/16", Duration::from_secs(60)),
        )
        .await;
        start(&mesh, "a1", "10.1.0.1").await;
        assert_eq!(web_agents(&mesh), ["a1"]);
        // In the VIP range.
        let (_, refusal) = start(&mesh, "a1", "240.240.0.9").await;
        let refusal = refusal.expect("refused");
        assert!(refusal.contains("240.240.0.9"), "{refusal}");
        assert!(web_agents(&mesh).is_empty());
        assert_eq!(
            mesh.sessions()["a1"].registration_error.as_deref(),
            Some(refusal.as_str())
        );
        // Not an address at all.
        let (_, refusal) = start(&mesh, "a1", "web-1.example").await;
        assert!(refusal.unwrap().contains("not an IP address"));
        // Another agent cannot take a1's address and port.
        start(&mesh, "a1", "10.1.0.1").await;
        let (_, refusal) = mesh
            .session_start(
                &agent("a2"),
                Some(&group()),
                Ok("10.1.0.1".parse().unwrap()),
                "10.1.0.1".parse().unwrap(),
                &[],
                0,
            )
            .await
            .unwrap();
        assert!(refusal.unwrap().contains("a1"));
        assert_eq!(web_agents(&mesh), ["a1"]);
    }

    /// A store whose mesh writes wait at a gate the test opens.
    struct GatedStore {
        inner: SledStore,
        entered: std::sync::mpsc::SyncSender<()>,
        open: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
        gated: std::sync::atomic::AtomicBool,
    }

    impl Store for GatedStore {
        fn ca(&self) -> Result<Option<crate::store::CaRecord>, StoreError> {
            self.inner.ca()
        }
        fn init_ca(
            &self,
            ca: &crate::store::CaRecord,
        ) -> Result<crate::store::CaRecord, StoreError> {
            self.inner.init_ca(ca)
        }
        fn create_group(&self, group: &crate::store::GroupRecord) -> Result<(), StoreError> {
            self.inner.create_group(group)
        }
        fn group(&self, name: &str) -> Result<Option<crate::store::GroupRecord>, StoreError> {
            self.inner.group(name)
        }
        fn groups(&self) -> Result<Vec<crate::store::GroupRecord>, StoreError> {
            self.inner.groups()
        }
        fn delete_group(&self, name: &str) -> Result<usize, StoreError> {
            self.inner.delete_group(name)
        }
        fn create_token(&self, token: &crate::store::TokenRecord) -> Result<(), StoreError> {
            self.inner.create_token(token)
        }
        fn token(&self, id: &str) -> Result<Option<crate::store::TokenRecord>, StoreError> {
            self.inner.token(id)
        }
        fn tokens(&self) -> Result<Vec<crate::store::TokenRecord>, StoreError> {
            self.inner.tokens()
        }
        fn revoke_token(
            &self,
            id: &str,
            now: i64,
        ) -> Result<crate::store::TokenRecord, StoreError> {
            self.inner.revoke_token(id, now)
        }
        fn commit_enrollments(
            &self,
            batch: &[crate::store::Enrollment],
        ) -> Result<Vec<crate::store::EnrollOutcome>, StoreError> {
            self.inner.commit_enrollments(batch)
        }
        fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
            self.inner.agent(id)
        }
        fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
            self.inner.agents()
        }
        fn remove_agent(&self, id: &str, now: i64) -> Result<AgentRecord, StoreError> {
            self.inner.remove_agent(id, now)
        }
        fn cert(&self, serial: &str) -> Result<Option<crate::store::CertRecord>, StoreError> {
            self.inner.cert(serial)
        }
        fn certs(&self) -> Result<Vec<crate::store::CertRecord>, StoreError> {
            self.inner.certs()
        }
        fn load_mesh(&self) -> Result<crate::store::MeshDump, StoreError> {
            self.inner.load_mesh()
        }
        fn save_mesh(&self, change: &crate::store::EncodedMeshWrite) -> Result<(), StoreError> {
            if self.gated.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = self.entered.send(());
                let _ = self.open.lock().unwrap().recv();
            }
            self.inner.save_mesh(change)
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.inner.flush()
        }
    }

    /// While a change's store transaction is in progress, the mesh still answers readers
    /// (sessions, the admin API): its lock is not held across the transaction.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_do_not_wait_for_a_store_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let (entered_tx, entered_rx) = std::sync::mpsc::sync_channel(1);
        let (open_tx, open_rx) = std::sync::mpsc::channel();
        let store = Arc::new(GatedStore {
            inner: SledStore::reopen(dir.path()).unwrap(),
            entered: entered_tx,
            open: std::sync::Mutex::new(open_rx),
            gated: std::sync::atomic::AtomicBool::new(false),
        });
        let mesh = Mesh::open(
            store.clone(),
            settings("240.240.0.0/16", Duration::from_secs(60)),
            Vec::new(),
            &BTreeSet::from(["file".to_owned()]),
            BTreeMap::new(),
        )
        .await
        .unwrap();
        store.gated.store(true, std::sync::atomic::Ordering::SeqCst);
        let writer = {
            let mesh = mesh.clone();
            tokio::spawn(async move { mesh.apply_source_update(file_update(&["web"])).await })
        };
        // The transaction has started and waits at the gate.
        tokio::task::spawn_blocking(move || entered_rx.recv().unwrap())
            .await
            .unwrap();
        // A reader on another thread gets its answer meanwhile.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let reader = mesh.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send((reader.version(), reader.sessions().len()));
        });
        let answered =
            tokio::task::spawn_blocking(move || done_rx.recv_timeout(Duration::from_secs(30)))
                .await
                .unwrap();
        open_tx.send(()).unwrap();
        assert_eq!(
            answered.expect("the reader was blocked by the store transaction"),
            (0, 0),
            "the version is published only once written"
        );
        assert_eq!(writer.await.unwrap().unwrap(), 1);
        assert_eq!(mesh.version(), 1);
    }

    /// Removal denies every unexpired certificate it is given (an expired one is left
    /// out), pushes them to every agent, and each entry leaves the list when its
    /// certificate expires, with a new version so agents get the shorter list.
    /// An update carrying a RequestAuthentication requires `request-authn/v1` (full and
    /// delta), one with only other policies `policy/v1` alone; an agent that knows only
    /// `policy/v1` refuses the first and applies the second.
    #[tokio::test(flavor = "current_thread")]
    async fn request_authentication_updates_require_their_feature() {
        let dir = tempfile::tempdir().unwrap();
        let mesh = open(
            dir.path(),
            settings("240.240.0.0/16", Duration::from_secs(60)),
        )
        .await;
        let doc = |kind: &str, spec: &str| {
            causeway_api::policy::decode_documents(
                "t",
                &format!("apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata: {{name: p, namespace: default}}\nspec: {spec}\n"),
            )
            .unwrap()
            .remove(0)
        };
        let v0 = mesh.update_since(0).version;
        mesh.apply_policies(vec![doc("AuthorizationPolicy", "{}")], false)
            .await
            .unwrap();
        let ap_only = mesh.update_since(v0);
        assert_eq!(ap_only.required_features, [FEATURE_POLICY]);
        assert_eq!(mesh.update_since(0).required_features, [FEATURE_POLICY]);
        let v1 = ap_only.version;
        mesh.apply_policies(
            vec![doc(
                "RequestAuthentication",
                "{jwtRules: [{issuer: \"https://idp\", jwksUri: \"https://idp/jwks\"}]}",
            )],
            false,
        )
        .await
        .unwrap();
        for update in [mesh.update_since(v1), mesh.update_since(0)] {
            assert_eq!(
                update.required_features,
                [FEATURE_POLICY, FEATURE_REQUEST_AUTHN],
                "full: {}",
                update.full
            );
            let old = causeway_api::push::MeshState::default()
                .apply_with_features(&update, &[FEATURE_POLICY])
                .unwrap_err();
            assert!(old.to_string().contains("request-authn/v1"), "{old}");
        }
    }

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
        .await
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
        .await
        .unwrap();
        let v1 = mesh.version();
        assert!(v1 > v0);
        let delta = mesh.update_since(v0);
        assert!(delta.deny_set);
        assert_eq!(delta.deny_serials, ["joined", "renewed"]);
        let full = mesh.update_since(0);
        assert_eq!(full.deny_serials, ["joined", "renewed"]);

        // Nothing expired yet: no new version.
        assert_eq!(mesh.prune_deny(now).await.unwrap(), Some(now + 100));
        assert_eq!(mesh.version(), v1);
        // The first certificate expired: dropped and pushed.
        assert_eq!(mesh.prune_deny(now + 150).await.unwrap(), Some(now + 200));
        assert!(mesh.version() > v1);
        let delta = mesh.update_since(v1);
        assert!(delta.deny_set);
        assert_eq!(delta.deny_serials, ["renewed"]);
        assert_eq!(mesh.prune_deny(now + 250).await.unwrap(), None);
        assert!(mesh.deny_list().is_empty());
    }
}
