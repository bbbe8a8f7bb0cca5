//! Persistent state behind a [`Store`] trait; [`SledStore`] is the embedded default.
//!
//! Values are JSON (serde) in typed sled trees: `meta` (schema version), `ca`, `groups`,
//! `tokens`, `agents`, `certs`. Operations that must be atomic (spending a token while
//! recording the agent and its certificate; renewing) run as one sled transaction across
//! trees. Durability is explicit: callers [`Store::flush`] before answering a client, and
//! [`crate::durability::GroupCommit`] batches those flushes.

use std::net::IpAddr;
use std::path::Path;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use causeway_api::WorkloadGroup;
use causeway_api::registry::{ServiceEndpoints, ServiceKey, SourceKind, SourceState};
use ipnet::IpNet;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

/// The schema this build writes. Older schemas are migrated at open (version 2: group
/// ids, tokens bound to them, agents' unexpired certificates; see `SledStore::migrate`).
pub const SCHEMA_VERSION: u32 = 2;

/// Most unexpired certificates one agent may hold: a renewal beyond it is refused until
/// the oldest expires. Renewing at half the lifetime, an agent holds two or three; the
/// cap bounds what its removal puts on the deny list (ARCHITECTURE.md, "Removal").
pub const MAX_LIVE_CERTS: usize = 32;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database itself failed (I/O, corruption detected by sled).
    #[error("store I/O error: {0}")]
    Db(#[from] sled::Error),
    /// etcd failed or could not be reached ([`crate::store_etcd::EtcdStore`]).
    #[error("store (etcd): {0}")]
    Etcd(#[from] crate::etcd::EtcdError),
    /// The key-encryption key is missing, too short, or not the one the CA key in the
    /// store was sealed with.
    #[error("{0}")]
    Kek(String),
    /// A value could not be decoded.
    #[error("store value {tree}/{key} is corrupt: {message}")]
    Corrupt {
        /// The tree.
        tree: &'static str,
        /// The key.
        key: String,
        /// What failed.
        message: String,
    },
    /// The data directory was written by a newer controller.
    #[error(
        "the store's schema version is {found}, newer than this controller's {SCHEMA_VERSION}: run the newer causeway-controller, or restore a backup"
    )]
    SchemaTooNew {
        /// The version found.
        found: u32,
    },
    /// The thing to create exists already.
    #[error("{kind} {name:?} already exists")]
    Exists {
        /// What kind of thing.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The thing does not exist.
    #[error("{kind} {name:?} does not exist")]
    NotFound {
        /// What kind of thing.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The token has no uses left (another join spent it first).
    #[error("join token {0} has already been used")]
    TokenSpent(String),
    /// The agent was removed.
    #[error("agent {0} was removed")]
    AgentRemoved(String),
    /// The token was revoked by an operator.
    #[error("join token {id} was revoked at {revoked_at} (Unix time)")]
    TokenRevoked {
        /// Token id.
        id: String,
        /// Unix seconds.
        revoked_at: i64,
    },
    /// The agent holds [`MAX_LIVE_CERTS`] unexpired certificates already.
    #[error(
        "agent {agent} already holds {MAX_LIVE_CERTS} unexpired certificates; renewals resume when the oldest expires (Unix time {oldest_expires})"
    )]
    TooManyCerts {
        /// The agent.
        agent: String,
        /// When its oldest unexpired certificate expires, Unix seconds.
        oldest_expires: i64,
    },
    /// The operation conflicts with existing state.
    #[error("{0}")]
    Conflict(String),
}

/// The CA as stored: generated at first start, never replaced by a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CaRecord {
    /// PEM certificate of the signing CA.
    pub cert_pem: String,
    /// PEM (PKCS#8) key of the signing CA; empty when the key lives in an operator file.
    pub key_pem: String,
    /// SHA-256 (hex) of the signing CA certificate's DER.
    pub fingerprint: String,
    /// "generated" or "intermediate".
    pub mode: String,
    /// PEM roots of the trust bundle (more than one during a rotation).
    pub trust_bundle: Vec<String>,
    /// Unix seconds.
    pub created_at: i64,
}

/// A workload group with its bookkeeping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupRecord {
    /// The group.
    #[serde(flatten)]
    pub group: WorkloadGroup,
    /// Immutable id, new for every group created (a group deleted and created again
    /// under the same name gets another one): what join tokens are bound to. Empty only
    /// in records written before schema version 2, which the migration fills in.
    #[serde(default)]
    pub id: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// A join token; only the hash of its secret is kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    /// The token id (public).
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// The name of the group it joins into.
    pub group: String,
    /// The id of that group ([`GroupRecord::id`]): a token joins only the group it was
    /// created for, never a later group that took the same name. Empty for an orphaned
    /// token (migrated from schema 1 while its group's name belonged to a newer group).
    #[serde(default)]
    pub group_id: String,
    /// Unix seconds when an operator revoked it (`causewayctl token revoke`); a revoked
    /// token joins nothing.
    #[serde(default)]
    pub revoked_at: Option<i64>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// How many joins it allows in total.
    pub uses_total: u32,
    /// How many are left.
    pub uses_left: u32,
    /// Source networks allowed to use it (empty: any).
    pub cidrs: Vec<IpNet>,
}

/// An enrolled agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentRecord {
    /// The agent id.
    pub id: String,
    /// Its group.
    pub group: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// The host name it reported.
    pub hostname: String,
    /// The source address it joined from.
    pub address: IpAddr,
    /// The token used to join.
    pub token_id: String,
    /// Unix seconds.
    pub joined_at: i64,
    /// Serial (hex) of the newest certificate.
    pub serial: String,
    /// Expiry of the newest certificate, Unix seconds.
    pub not_after: i64,
    /// Unix seconds of the last renewal, if any.
    pub renewed_at: Option<i64>,
    /// How many renewals so far.
    pub renewals: u64,
    /// Unix seconds when an operator removed it; a removed agent cannot renew.
    pub removed_at: Option<i64>,
    /// Every certificate issued to it that had not expired when the newest was issued
    /// (oldest first, the newest last): what its removal puts on the deny list. At most
    /// [`MAX_LIVE_CERTS`].
    #[serde(default)]
    pub live_certs: Vec<LiveCert>,
}

/// A certificate that may still be valid: its serial and expiry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LiveCert {
    /// Serial, hex.
    pub serial: String,
    /// Expiry, Unix seconds.
    pub not_after: i64,
}

/// A certificate the CA issued.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertRecord {
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

/// One certificate issuance to record.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "short-lived, moved once into a batch of at most a few hundred"
)]
pub enum Enrollment {
    /// A join: spend one use of the token, record the new agent and its certificate.
    Join {
        /// The token spent.
        token_id: String,
        /// The new agent.
        agent: AgentRecord,
        /// Its first certificate.
        cert: CertRecord,
    },
    /// A renewal: record the certificate and point the agent at it.
    Renewal {
        /// The agent renewing.
        agent_id: String,
        /// The new certificate.
        cert: CertRecord,
        /// Unix seconds.
        now: i64,
    },
}

/// The outcome of one [`Enrollment`] in a batch: the agent as recorded, or why this one
/// was refused.
pub type EnrollOutcome = Result<AgentRecord, StoreError>;

fn single(mut outcomes: Vec<EnrollOutcome>) -> Result<AgentRecord, StoreError> {
    outcomes
        .pop()
        .unwrap_or_else(|| Err(StoreError::Conflict("the store returned no outcome".into())))
}

/// The controller's persistent state.
pub trait Store: Send + Sync + 'static {
    /// The CA, if one was created.
    fn ca(&self) -> Result<Option<CaRecord>, StoreError>;
    /// Stores `ca` unless a CA exists; returns the CA that is now in force.
    fn init_ca(&self, ca: &CaRecord) -> Result<CaRecord, StoreError>;

    /// Creates a group; fails if the name is taken.
    fn create_group(&self, group: &GroupRecord) -> Result<(), StoreError>;
    /// One group.
    fn group(&self, name: &str) -> Result<Option<GroupRecord>, StoreError>;
    /// All groups, by name.
    fn groups(&self) -> Result<Vec<GroupRecord>, StoreError>;
    /// Deletes a group and every join token made for it (so none can join a later
    /// group of the same name); refused while agents that were not removed belong to it.
    /// Returns how many tokens were deleted.
    fn delete_group(&self, name: &str) -> Result<usize, StoreError>;

    /// Stores a new token.
    fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// One token.
    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// All tokens.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Marks a token revoked at `now`: from then on it joins nothing (an in-flight join
    /// is refused when it commits). Revoking twice keeps the first time.
    fn revoke_token(&self, id: &str, now: i64) -> Result<TokenRecord, StoreError>;

    /// Records a batch of joins and renewals, in order, in one transaction. Each one is
    /// checked against the state left by those before it and gets its own outcome: a
    /// join whose token has no use left, or a renewal of a removed agent, is refused
    /// alone and writes nothing, while the rest of the batch is recorded. `Err` means the
    /// whole batch failed and nothing was written. Durable only after [`Store::flush`].
    fn commit_enrollments(&self, batch: &[Enrollment]) -> Result<Vec<EnrollOutcome>, StoreError>;

    /// Atomically spends one use of `token_id` and records the agent and its certificate.
    fn commit_join(
        &self,
        token_id: &str,
        agent: &AgentRecord,
        cert: &CertRecord,
    ) -> Result<(), StoreError> {
        let op = Enrollment::Join {
            token_id: token_id.to_owned(),
            agent: agent.clone(),
            cert: cert.clone(),
        };
        single(self.commit_enrollments(std::slice::from_ref(&op))?).map(|_| ())
    }
    /// Atomically records a renewal (refused if the agent was removed meanwhile).
    fn commit_renewal(
        &self,
        agent_id: &str,
        cert: &CertRecord,
        now: i64,
    ) -> Result<AgentRecord, StoreError> {
        let op = Enrollment::Renewal {
            agent_id: agent_id.to_owned(),
            cert: cert.clone(),
            now,
        };
        single(self.commit_enrollments(std::slice::from_ref(&op))?)
    }
    /// One agent.
    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError>;
    /// All agents, removed ones included.
    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    /// Marks an agent removed; it can no longer renew.
    fn remove_agent(&self, id: &str, now: i64) -> Result<AgentRecord, StoreError>;

    /// One issued certificate by serial (hex).
    fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError>;
    /// All issued certificates.
    fn certs(&self) -> Result<Vec<CertRecord>, StoreError>;

    /// The persisted mesh: merged-registry inputs, VIPs, version and change history.
    fn load_mesh(&self) -> Result<MeshDump, StoreError>;
    /// Writes one mesh change atomically.
    fn save_mesh(&self, change: &EncodedMeshWrite) -> Result<(), StoreError>;

    /// Makes everything written so far durable.
    fn flush(&self) -> Result<(), StoreError>;

    /// Whether several controllers share this store (etcd): the mesh state may change
    /// under this controller, and agent workloads restored at start may belong to
    /// agents connected to another controller.
    fn shared(&self) -> bool {
        false
    }

    /// On a shared store: the store revision of the mesh version as this controller last
    /// read or wrote it (so a watch can tell its own writes from others').
    fn mesh_revision(&self) -> Option<i64> {
        None
    }
}

/// One source's persisted state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceRecord {
    /// Its kind.
    pub kind: SourceKind,
    /// Its state.
    pub state: SourceState,
}

/// Which services one mesh version changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HistoryRecord {
    /// Services whose merged endpoints or VIP changed.
    pub services: BTreeSet<ServiceKey>,
    /// Whether the deny list changed.
    pub deny: bool,
    /// Policy resources (`Kind/namespace/name`) created, changed or deleted.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub policies: BTreeSet<String>,
    /// Routing resources (`Kind/namespace/name`) created, changed or deleted.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub routes: BTreeSet<String>,
}

/// One stored routing resource (VirtualService, DestinationRule).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteRecord {
    /// Creation order: lower is older (VirtualServices of one host merge oldest first).
    pub seq: u64,
    /// The mesh version that last changed it.
    pub version: u64,
    /// The resource as applied (validated).
    pub resource: causeway_api::route::RouteResource,
}

/// One stored policy resource (AuthorizationPolicy, PeerAuthentication).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyRecord {
    /// Creation order: lower is older (Istio's "oldest wins" among PeerAuthentications of
    /// one scope). Kept when the resource is re-applied.
    pub seq: u64,
    /// The mesh version that last changed it.
    pub version: u64,
    /// The resource as applied (validated).
    pub resource: causeway_api::policy::Resource,
}

impl PolicyRecord {
    /// The store and wire key of a resource: `Kind/namespace/name`.
    pub fn key_of(resource: &causeway_api::policy::Resource) -> String {
        let m = resource.metadata();
        format!("{}/{}/{}", resource.kind(), m.namespace(), m.name)
    }
}

/// Everything persisted about the mesh.
#[derive(Debug, Clone, Default)]
pub struct MeshDump {
    /// The mesh version.
    pub version: u64,
    /// Sources by name.
    pub sources: BTreeMap<String, SourceRecord>,
    /// Each source's endpoints per service.
    pub data: BTreeMap<String, BTreeMap<ServiceKey, ServiceEndpoints>>,
    /// Allocated VIPs.
    pub vips: BTreeMap<ServiceKey, Ipv4Addr>,
    /// Recent versions and what they changed.
    pub history: BTreeMap<u64, HistoryRecord>,
    /// Policy resources by `Kind/namespace/name`.
    pub policies: BTreeMap<String, PolicyRecord>,
    /// Routing resources by `Kind/namespace/name`.
    pub routes: BTreeMap<String, RouteRecord>,
}

/// One mesh change to persist. It borrows the endpoints from the registry instead of
/// copying them: a full re-sync of a large source is encoded straight from memory
/// ([`MeshWrite::encode`], under the mesh's lock), and the transaction then writes the
/// bytes without holding it.
#[derive(Debug, Clone)]
pub struct MeshWrite<'a> {
    /// The new mesh version.
    pub version: u64,
    /// Sources whose state changed.
    pub sources: Vec<(String, SourceRecord)>,
    /// Per source and service: the new endpoints, or `None` when the source no longer has it.
    pub data: Vec<(&'a str, &'a ServiceKey, Option<&'a ServiceEndpoints>)>,
    /// Newly allocated VIPs.
    pub vips: Vec<(ServiceKey, Ipv4Addr)>,
    /// The history entry of this version.
    pub history: &'a HistoryRecord,
    /// History entries below this version are dropped.
    pub history_keep_from: u64,
    /// Policy resources to write (`Some`) or delete (`None`), by `Kind/namespace/name`.
    pub policies: Vec<(String, Option<PolicyRecord>)>,
    /// Routing resources to write (`Some`) or delete (`None`), by `Kind/namespace/name`.
    pub routes: Vec<(String, Option<RouteRecord>)>,
}

/// A [`MeshWrite`] encoded: what the store writes in one transaction, owned, so that the
/// transaction runs without borrowing the mesh.
#[derive(Debug, Clone, Default)]
pub struct EncodedMeshWrite {
    pub(crate) version: u64,
    /// Source name → encoded [`SourceRecord`].
    pub(crate) sources: Vec<(Vec<u8>, Vec<u8>)>,
    /// `<source>\0<namespace>/<name>` → encoded endpoints, or `None` to delete.
    pub(crate) data: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Service key → encoded VIP.
    pub(crate) vips: Vec<(Vec<u8>, Vec<u8>)>,
    /// The encoded [`HistoryRecord`] of `version`.
    pub(crate) history: Vec<u8>,
    pub(crate) history_keep_from: u64,
    /// `Kind/namespace/name` → encoded [`PolicyRecord`], or `None` to delete.
    pub(crate) policies: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// `Kind/namespace/name` → encoded [`RouteRecord`], or `None` to delete.
    pub(crate) routes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// The leadership this write is made under (a registry source's update on a shared
    /// store): the store refuses it unless the leadership still holds.
    pub(crate) fence: Option<Fence>,
}

/// A leader's fencing token: the leadership key and the revision it was created at
/// (see [`crate::etcd::Leadership`]). A write carrying it commits only while that key
/// still exists at that revision, so a leader whose lease expired writes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The leadership key.
    pub key: Vec<u8>,
    /// Its create revision.
    pub revision: i64,
}

impl MeshWrite<'_> {
    /// Encodes the change for [`Store::save_mesh`].
    pub fn encode(&self) -> EncodedMeshWrite {
        EncodedMeshWrite {
            version: self.version,
            sources: self
                .sources
                .iter()
                .map(|(name, rec)| (name.as_bytes().to_vec(), encode(rec)))
                .collect(),
            data: self
                .data
                .iter()
                .map(|(source, key, eps)| (data_key(source, key), eps.map(encode)))
                .collect(),
            vips: self
                .vips
                .iter()
                .map(|(key, ip)| (key.to_string().into_bytes(), encode(ip)))
                .collect(),
            history: encode(self.history),
            history_keep_from: self.history_keep_from,
            policies: self
                .policies
                .iter()
                .map(|(key, rec)| (key.as_bytes().to_vec(), rec.as_ref().map(encode)))
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|(key, rec)| (key.as_bytes().to_vec(), rec.as_ref().map(encode)))
                .collect(),
            fence: None,
        }
    }
}

fn data_key(source: &str, key: &ServiceKey) -> Vec<u8> {
    format!("{source}\0{key}").into_bytes()
}

/// sled's page cache. sled's default is 1 GiB, which a controller would fill with the
/// registry it already holds in memory; every value is decoded once at start and the
/// hot paths (joins, renewals, registry writes) touch few pages, so a small cache does.
const CACHE_BYTES: u64 = 64 << 20;

/// The embedded store on sled.
pub struct SledStore {
    db: sled::Db,
    meta: sled::Tree,
    ca: sled::Tree,
    groups: sled::Tree,
    tokens: sled::Tree,
    agents: sled::Tree,
    certs: sled::Tree,
    reg_sources: sled::Tree,
    reg_data: sled::Tree,
    vips: sled::Tree,
    history: sled::Tree,
    policies: sled::Tree,
    routes: sled::Tree,
}

const CA_KEY: &[u8] = b"ca";

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

fn decode<T: DeserializeOwned>(
    tree: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

fn all<T: DeserializeOwned>(tree: &sled::Tree, name: &'static str) -> Result<Vec<T>, StoreError> {
    tree.iter()
        .map(|kv| {
            let (k, v) = kv?;
            decode(name, &k, &v)
        })
        .collect()
}

/// Turns a transaction result into a store result.
fn txn<T>(r: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Db(e),
    })
}

fn abort<T>(e: StoreError) -> Result<T, ConflictableTransactionError<StoreError>> {
    Err(ConflictableTransactionError::Abort(e))
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, checking and migrating the schema.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // Durability comes from explicit flushes (group commit for joins and renewals,
        // a flush after each admin write and registry commit), so sled's own periodic
        // flush is off: it would only add fsyncs that compete with ours.
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .cache_capacity(CACHE_BYTES)
            .open()?;
        let store = Self {
            meta: db.open_tree("meta")?,
            ca: db.open_tree("ca")?,
            groups: db.open_tree("groups")?,
            tokens: db.open_tree("tokens")?,
            agents: db.open_tree("agents")?,
            certs: db.open_tree("certs")?,
            reg_sources: db.open_tree("reg_sources")?,
            reg_data: db.open_tree("reg_data")?,
            vips: db.open_tree("vips")?,
            history: db.open_tree("history")?,
            policies: db.open_tree("policies")?,
            routes: db.open_tree("routes")?,
            db,
        };
        store.migrate()?;
        Ok(store)
    }

    /// Opens `dir` as [`SledStore::open`] does, waiting up to 10 s while the store is
    /// still locked by a handle this process just dropped: sled releases its file lock
    /// only when its background I/O tasks let go of the file, a moment after the last
    /// handle is dropped (a reopen at once failed in CI with "could not acquire lock").
    #[cfg(test)]
    #[allow(
        clippy::disallowed_methods,
        reason = "test support: a short blocking wait for sled to let go of its lock"
    )]
    pub(crate) fn reopen(dir: &Path) -> Result<Self, StoreError> {
        let start = std::time::Instant::now();
        loop {
            match Self::open(dir) {
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && start.elapsed() < std::time::Duration::from_secs(10) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => return r,
            }
        }
    }

    /// The schema version recorded in the store.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        match self.meta.get(b"schema_version")? {
            Some(v) => decode("meta", b"schema_version", &v),
            None => Ok(0),
        }
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let found = self.schema_version()?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { found });
        }
        // Version 0 is an empty store. Each step migrates from the version before it,
        // in its own transaction.
        if found < 2 {
            self.migrate_to_2(crate::enroll::now_unix())?;
        }
        if found < SCHEMA_VERSION {
            self.meta
                .insert(b"schema_version", encode(&SCHEMA_VERSION))?;
            self.db.flush()?;
        }
        Ok(())
    }

    /// Schema 1 → 2, in one transaction:
    /// - every group gets an immutable id;
    /// - every token is bound to its group's id when that group can be the one it was
    ///   made for (created no later than the token). A token whose group name now
    ///   belongs to a newer group stays unbound ("orphaned": listed, refused at join);
    ///   one whose group is gone is deleted, as deleting a group now does;
    /// - every agent lists its unexpired certificates (from the `certs` tree), so that
    ///   removing it denies all of them.
    fn migrate_to_2(&self, now: i64) -> Result<(), StoreError> {
        let mut groups: Vec<GroupRecord> = all(&self.groups, "groups")?;
        groups.retain(|g| g.id.is_empty());
        for g in &mut groups {
            g.id = crate::enroll::new_group_id();
        }
        let ids: BTreeMap<String, (String, i64)> = all::<GroupRecord>(&self.groups, "groups")?
            .into_iter()
            .map(|g| (g.group.name.clone(), (g.id, g.created_at)))
            .chain(
                groups
                    .iter()
                    .map(|g| (g.group.name.clone(), (g.id.clone(), g.created_at))),
            )
            .collect();
        let mut bind = Vec::new();
        let mut drop_tokens = Vec::new();
        for mut t in all::<TokenRecord>(&self.tokens, "tokens")? {
            if !t.group_id.is_empty() {
                continue;
            }
            match ids.get(&t.group) {
                None => drop_tokens.push(t.id),
                Some((id, created_at)) if *created_at <= t.created_at => {
                    t.group_id = id.clone();
                    bind.push(t);
                }
                Some(_) => {
                    tracing::warn!(token = %t.id, group = %t.group, "join token left unbound: it predates the group now of that name, so it was made for an earlier, deleted group; joins with it are refused")
                }
            }
        }
        let mut agents: Vec<AgentRecord> = all(&self.agents, "agents")?;
        agents.retain(|a| a.live_certs.is_empty());
        if !agents.is_empty() {
            let mut live: BTreeMap<String, Vec<LiveCert>> = BTreeMap::new();
            for c in all::<CertRecord>(&self.certs, "certs")? {
                if c.not_after > now {
                    live.entry(c.agent_id).or_default().push(LiveCert {
                        serial: c.serial,
                        not_after: c.not_after,
                    });
                }
            }
            for a in &mut agents {
                let mut certs = live.remove(&a.id).unwrap_or_default();
                if certs.is_empty() {
                    certs.push(LiveCert {
                        serial: a.serial.clone(),
                        not_after: a.not_after,
                    });
                }
                certs.sort_by_key(|c| c.not_after);
                a.live_certs = certs;
            }
        }
        txn(
            (&self.groups, &self.tokens, &self.agents).transaction(|(g_tree, t_tree, a_tree)| {
                for g in &groups {
                    g_tree.insert(g.group.name.as_bytes(), encode(g))?;
                }
                for t in &bind {
                    t_tree.insert(t.id.as_bytes(), encode(t))?;
                }
                for id in &drop_tokens {
                    t_tree.remove(id.as_bytes())?;
                }
                for a in &agents {
                    a_tree.insert(a.id.as_bytes(), encode(a))?;
                }
                Ok(())
            }),
        )?;
        if !groups.is_empty() || !bind.is_empty() || !drop_tokens.is_empty() || !agents.is_empty() {
            tracing::info!(
                groups = groups.len(),
                tokens_bound = bind.len(),
                tokens_deleted = drop_tokens.len(),
                agents = agents.len(),
                "store migrated to schema 2: group ids, tokens bound to them, agents' unexpired certificates"
            );
        }
        Ok(())
    }
}

impl Store for SledStore {
    fn ca(&self) -> Result<Option<CaRecord>, StoreError> {
        self.ca
            .get(CA_KEY)?
            .map(|v| decode("ca", CA_KEY, &v))
            .transpose()
    }

    fn init_ca(&self, ca: &CaRecord) -> Result<CaRecord, StoreError> {
        match self
            .ca
            .compare_and_swap(CA_KEY, None::<&[u8]>, Some(encode(ca)))?
        {
            Ok(()) => {
                self.db.flush()?;
                Ok(ca.clone())
            }
            Err(existing) => decode(
                "ca",
                CA_KEY,
                &existing.current.expect("present on conflict"),
            ),
        }
    }

    fn create_group(&self, group: &GroupRecord) -> Result<(), StoreError> {
        let key = group.group.name.as_bytes();
        match self
            .groups
            .compare_and_swap(key, None::<&[u8]>, Some(encode(group)))?
        {
            Ok(()) => Ok(()),
            Err(_) => Err(StoreError::Exists {
                kind: "group",
                name: group.group.name.clone(),
            }),
        }
    }

    fn group(&self, name: &str) -> Result<Option<GroupRecord>, StoreError> {
        self.groups
            .get(name.as_bytes())?
            .map(|v| decode("groups", name.as_bytes(), &v))
            .transpose()
    }

    fn groups(&self) -> Result<Vec<GroupRecord>, StoreError> {
        all(&self.groups, "groups")
    }

    fn delete_group(&self, name: &str) -> Result<usize, StoreError> {
        let active: Vec<String> = self
            .agents()?
            .into_iter()
            .filter(|a| a.group == name && a.removed_at.is_none())
            .map(|a| a.id)
            .collect();
        if !active.is_empty() {
            return Err(StoreError::Conflict(format!(
                "group {name:?} still has {} active agent(s) ({}); remove them first with `causewayctl agent remove ID`",
                active.len(),
                active.join(", ")
            )));
        }
        // Every token naming the group goes with it (also orphans of an earlier group of
        // that name). A token created for this group while this runs is bound to this
        // group's id, which no later group gets, so it can never join anything.
        let tokens: Vec<String> = self
            .tokens()?
            .into_iter()
            .filter(|t| t.group == name)
            .map(|t| t.id)
            .collect();
        txn(
            (&self.groups, &self.tokens).transaction(|(groups, tokens_tree)| {
                if groups.remove(name.as_bytes())?.is_none() {
                    return abort(StoreError::NotFound {
                        kind: "group",
                        name: name.to_owned(),
                    });
                }
                for id in &tokens {
                    tokens_tree.remove(id.as_bytes())?;
                }
                Ok(tokens.len())
            }),
        )
    }

    fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.tokens.insert(token.id.as_bytes(), encode(token))?;
        Ok(())
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.tokens
            .get(id.as_bytes())?
            .map(|v| decode("tokens", id.as_bytes(), &v))
            .transpose()
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        all(&self.tokens, "tokens")
    }

    fn revoke_token(&self, id: &str, now: i64) -> Result<TokenRecord, StoreError> {
        txn(self.tokens.transaction(|tokens| {
            let Some(raw) = tokens.get(id.as_bytes())? else {
                return abort(StoreError::NotFound {
                    kind: "join token",
                    name: id.to_owned(),
                });
            };
            let mut token: TokenRecord = match decode("tokens", id.as_bytes(), &raw) {
                Ok(t) => t,
                Err(e) => return abort(e),
            };
            if token.revoked_at.is_none() {
                token.revoked_at = Some(now);
                tokens.insert(id.as_bytes(), encode(&token))?;
            }
            Ok(token)
        }))
    }

    fn commit_enrollments(&self, batch: &[Enrollment]) -> Result<Vec<EnrollOutcome>, StoreError> {
        // One transaction per batch, not per certificate: a sled transaction over three
        // trees costs ~80-130 µs, and ~20 µs per record when it carries 64 of them
        // (measured; see BENCHMARKS.md). A refused record aborts nothing: it is skipped
        // and reported, so one spent token does not fail its neighbours' joins.
        txn(
            (&self.tokens, &self.agents, &self.certs).transaction(|(tokens, agents, certs)| {
                let mut outcomes = Vec::with_capacity(batch.len());
                for op in batch {
                    let outcome = match op {
                        Enrollment::Join {
                            token_id,
                            agent,
                            cert,
                        } => {
                            let key = token_id.as_bytes();
                            match tokens.get(key)? {
                                None => Err(StoreError::NotFound {
                                    kind: "join token",
                                    name: token_id.clone(),
                                }),
                                Some(raw) => match decode::<TokenRecord>("tokens", key, &raw) {
                                    Err(e) => Err(e),
                                    Ok(TokenRecord {
                                        revoked_at: Some(revoked_at),
                                        ..
                                    }) => Err(StoreError::TokenRevoked {
                                        id: token_id.clone(),
                                        revoked_at,
                                    }),
                                    Ok(t) if t.uses_left == 0 => {
                                        Err(StoreError::TokenSpent(token_id.clone()))
                                    }
                                    Ok(mut t) => {
                                        t.uses_left -= 1;
                                        tokens.insert(key, encode(&t))?;
                                        agents.insert(agent.id.as_bytes(), encode(agent))?;
                                        certs.insert(cert.serial.as_bytes(), encode(cert))?;
                                        Ok(agent.clone())
                                    }
                                },
                            }
                        }
                        Enrollment::Renewal {
                            agent_id,
                            cert,
                            now,
                        } => {
                            let key = agent_id.as_bytes();
                            match agents.get(key)? {
                                None => Err(StoreError::NotFound {
                                    kind: "agent",
                                    name: agent_id.clone(),
                                }),
                                Some(raw) => match decode::<AgentRecord>("agents", key, &raw) {
                                    Err(e) => Err(e),
                                    Ok(a) if a.removed_at.is_some() => {
                                        Err(StoreError::AgentRemoved(agent_id.clone()))
                                    }
                                    Ok(mut a) => 'renew: {
                                        if a.live_certs.is_empty() {
                                            // Written before schema 2 and not migrated.
                                            a.live_certs.push(LiveCert {
                                                serial: a.serial.clone(),
                                                not_after: a.not_after,
                                            });
                                        }
                                        a.live_certs.retain(|c| c.not_after > *now);
                                        if a.live_certs.len() >= MAX_LIVE_CERTS {
                                            break 'renew Err(StoreError::TooManyCerts {
                                                agent: a.id.clone(),
                                                oldest_expires: a
                                                    .live_certs
                                                    .iter()
                                                    .map(|c| c.not_after)
                                                    .min()
                                                    .unwrap_or(*now),
                                            });
                                        }
                                        a.live_certs.push(LiveCert {
                                            serial: cert.serial.clone(),
                                            not_after: cert.not_after,
                                        });
                                        a.serial = cert.serial.clone();
                                        a.not_after = cert.not_after;
                                        a.renewed_at = Some(*now);
                                        a.renewals += 1;
                                        agents.insert(key, encode(&a))?;
                                        certs.insert(cert.serial.as_bytes(), encode(cert))?;
                                        Ok(a)
                                    }
                                },
                            }
                        }
                    };
                    outcomes.push(outcome);
                }
                Ok(outcomes)
            }),
        )
    }

    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.agents
            .get(id.as_bytes())?
            .map(|v| decode("agents", id.as_bytes(), &v))
            .transpose()
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        all(&self.agents, "agents")
    }

    fn remove_agent(&self, id: &str, now: i64) -> Result<AgentRecord, StoreError> {
        txn(self.agents.transaction(|agents| {
            let Some(raw) = agents.get(id.as_bytes())? else {
                return abort(StoreError::NotFound {
                    kind: "agent",
                    name: id.to_owned(),
                });
            };
            let mut agent: AgentRecord = match decode("agents", id.as_bytes(), &raw) {
                Ok(a) => a,
                Err(e) => return abort(e),
            };
            if agent.removed_at.is_none() {
                agent.removed_at = Some(now);
                agents.insert(id.as_bytes(), encode(&agent))?;
            }
            Ok(agent)
        }))
    }

    fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError> {
        self.certs
            .get(serial.as_bytes())?
            .map(|v| decode("certs", serial.as_bytes(), &v))
            .transpose()
    }

    fn certs(&self) -> Result<Vec<CertRecord>, StoreError> {
        all(&self.certs, "certs")
    }

    fn load_mesh(&self) -> Result<MeshDump, StoreError> {
        let mut dump = MeshDump {
            version: match self.meta.get(b"mesh_version")? {
                Some(v) => decode("meta", b"mesh_version", &v)?,
                None => 0,
            },
            ..MeshDump::default()
        };
        for kv in self.reg_sources.iter() {
            let (k, v) = kv?;
            dump.sources.insert(
                String::from_utf8_lossy(&k).into_owned(),
                decode("reg_sources", &k, &v)?,
            );
        }
        for kv in self.reg_data.iter() {
            let (k, v) = kv?;
            let text = String::from_utf8_lossy(&k).into_owned();
            let corrupt = || StoreError::Corrupt {
                tree: "reg_data",
                key: text.clone(),
                message: "key is not <source>\\0<namespace>/<name>".into(),
            };
            let (source, key) = text.split_once('\0').ok_or_else(corrupt)?;
            let key = ServiceKey::try_from(key.to_owned()).map_err(|_| corrupt())?;
            let eps: ServiceEndpoints = decode("reg_data", &k, &v)?;
            dump.data
                .entry(source.to_owned())
                .or_default()
                .insert(key, eps);
        }
        for kv in self.vips.iter() {
            let (k, v) = kv?;
            let text = String::from_utf8_lossy(&k).into_owned();
            let key = ServiceKey::try_from(text.clone()).map_err(|e| StoreError::Corrupt {
                tree: "vips",
                key: text.clone(),
                message: e.to_string(),
            })?;
            dump.vips.insert(key, decode("vips", &k, &v)?);
        }
        for kv in self.history.iter() {
            let (k, v) = kv?;
            let version =
                u64::from_be_bytes(k.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    tree: "history",
                    key: format!("{k:?}"),
                    message: "key is not 8 bytes".into(),
                })?);
            dump.history.insert(version, decode("history", &k, &v)?);
        }
        for kv in self.policies.iter() {
            let (k, v) = kv?;
            dump.policies.insert(
                String::from_utf8_lossy(&k).into_owned(),
                decode("policies", &k, &v)?,
            );
        }
        for kv in self.routes.iter() {
            let (k, v) = kv?;
            dump.routes.insert(
                String::from_utf8_lossy(&k).into_owned(),
                decode("routes", &k, &v)?,
            );
        }
        Ok(dump)
    }

    fn save_mesh(&self, w: &EncodedMeshWrite) -> Result<(), StoreError> {
        let old: Vec<sled::IVec> = self
            .history
            .range(..w.history_keep_from.to_be_bytes())
            .keys()
            .collect::<Result<_, _>>()?;
        txn((
            &self.meta,
            &self.reg_sources,
            &self.reg_data,
            &self.vips,
            &self.history,
            &self.policies,
            &self.routes,
        )
            .transaction(|(meta, sources, data, vips, history, policies, routes)| {
                meta.insert(b"mesh_version".as_ref(), encode(&w.version))?;
                for (name, rec) in &w.sources {
                    sources.insert(name.as_slice(), rec.as_slice())?;
                }
                for (key, eps) in &w.data {
                    match eps {
                        Some(eps) => data.insert(key.as_slice(), eps.as_slice())?,
                        None => data.remove(key.as_slice())?,
                    };
                }
                for (key, ip) in &w.vips {
                    vips.insert(key.as_slice(), ip.as_slice())?;
                }
                history.insert(&w.version.to_be_bytes(), w.history.as_slice())?;
                for k in &old {
                    history.remove(k)?;
                }
                for (key, rec) in &w.policies {
                    match rec {
                        Some(rec) => policies.insert(key.as_slice(), rec.as_slice())?,
                        None => policies.remove(key.as_slice())?,
                    };
                }
                for (key, rec) in &w.routes {
                    match rec {
                        Some(rec) => routes.insert(key.as_slice(), rec.as_slice())?,
                        None => routes.remove(key.as_slice())?,
                    };
                }
                Ok(())
            }))
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: &str, uses: u32) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            secret_sha256: "00".into(),
            group: "g".into(),
            group_id: "g-1".into(),
            revoked_at: None,
            created_at: 0,
            expires_at: 100,
            uses_total: uses,
            uses_left: uses,
            cidrs: vec![],
        }
    }

    fn agent(id: &str) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            group: "g".into(),
            spiffe_id: "spiffe://td/ns/a/sa/b".into(),
            hostname: "h".into(),
            address: "127.0.0.1".parse().unwrap(),
            token_id: "t".into(),
            joined_at: 0,
            serial: format!("s-{id}"),
            not_after: 10,
            renewed_at: None,
            renewals: 0,
            removed_at: None,
            live_certs: vec![LiveCert {
                serial: format!("s-{id}"),
                not_after: 10,
            }],
        }
    }

    fn cert(serial: &str, agent: &str) -> CertRecord {
        CertRecord {
            serial: serial.into(),
            agent_id: agent.into(),
            spiffe_id: "spiffe://td/ns/a/sa/b".into(),
            not_before: 0,
            not_after: 10,
            reason: "join".into(),
        }
    }

    #[test]
    fn single_use_token_is_spent_once_and_state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::reopen(dir.path()).unwrap();
            s.create_token(&token("t", 1)).unwrap();
            s.commit_join("t", &agent("a1"), &cert("s1", "a1")).unwrap();
            let err = s
                .commit_join("t", &agent("a2"), &cert("s2", "a2"))
                .unwrap_err();
            assert!(matches!(err, StoreError::TokenSpent(_)), "{err}");
            assert!(
                s.agent("a2").unwrap().is_none(),
                "a failed join leaves no agent"
            );
            assert!(
                s.cert("s2").unwrap().is_none(),
                "a failed join leaves no cert"
            );
            s.flush().unwrap();
        }
        let s = SledStore::reopen(dir.path()).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.token("t").unwrap().unwrap().uses_left, 0);
        assert_eq!(s.agents().unwrap().len(), 1);
        assert_eq!(s.cert("s1").unwrap().unwrap().agent_id, "a1");
    }

    #[test]
    fn ca_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::reopen(dir.path()).unwrap();
        let first = CaRecord {
            cert_pem: "A".into(),
            key_pem: "K".into(),
            fingerprint: "f1".into(),
            mode: "generated".into(),
            trust_bundle: vec!["A".into()],
            created_at: 1,
        };
        let mut second = first.clone();
        second.fingerprint = "f2".into();
        assert_eq!(s.init_ca(&first).unwrap(), first);
        assert_eq!(s.init_ca(&second).unwrap(), first);
    }

    #[test]
    fn a_batch_refuses_only_its_bad_records_and_sees_its_own_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::reopen(dir.path()).unwrap();
        s.create_token(&token("t", 1)).unwrap();
        s.commit_join("t", &agent("gone"), &cert("s0", "gone"))
            .unwrap();
        s.remove_agent("gone", 1).unwrap();
        s.create_token(&token("t2", 1)).unwrap();
        let join = |t: &str, a: &str, serial: &str| Enrollment::Join {
            token_id: t.into(),
            agent: agent(a),
            cert: cert(serial, a),
        };
        let renew = |a: &str, serial: &str| Enrollment::Renewal {
            agent_id: a.into(),
            cert: cert(serial, a),
            now: 9,
        };
        let out = s
            .commit_enrollments(&[
                join("t2", "a1", "s1"),
                join("t2", "a2", "s2"), // the one use went to a1, just before
                renew("gone", "s3"),
                renew("a1", "s4"), // a1 exists only in this batch so far
                join("nope", "a5", "s5"),
            ])
            .unwrap();
        assert!(out[0].is_ok());
        assert!(
            matches!(out[1], Err(StoreError::TokenSpent(_))),
            "{:?}",
            out[1]
        );
        assert!(
            matches!(out[2], Err(StoreError::AgentRemoved(_))),
            "{:?}",
            out[2]
        );
        assert_eq!(out[3].as_ref().unwrap().serial, "s4");
        assert!(
            matches!(out[4], Err(StoreError::NotFound { .. })),
            "{:?}",
            out[4]
        );
        s.flush().unwrap();
        drop(s);
        let s = SledStore::reopen(dir.path()).unwrap();
        assert!(s.agent("a2").unwrap().is_none() && s.cert("s2").unwrap().is_none());
        assert!(s.cert("s3").unwrap().is_none() && s.cert("s5").unwrap().is_none());
        assert_eq!(s.agent("a1").unwrap().unwrap().renewals, 1);
        assert!(s.cert("s1").unwrap().is_some() && s.cert("s4").unwrap().is_some());
        assert_eq!(s.token("t2").unwrap().unwrap().uses_left, 0);
    }

    #[test]
    fn removed_agents_cannot_renew_and_block_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::reopen(dir.path()).unwrap();
        s.create_token(&token("t", 5)).unwrap();
        s.commit_join("t", &agent("a1"), &cert("s1", "a1")).unwrap();
        let renewed = s.commit_renewal("a1", &cert("s2", "a1"), 5).unwrap();
        assert_eq!((renewed.serial.as_str(), renewed.renewals), ("s2", 1));
        let err = s.delete_group("g").unwrap_err();
        assert!(err.to_string().contains("a1"), "{err}");
        s.remove_agent("a1", 6).unwrap();
        let err = s.commit_renewal("a1", &cert("s3", "a1"), 7).unwrap_err();
        assert!(matches!(err, StoreError::AgentRemoved(_)));
        assert!(s.cert("s3").unwrap().is_none());
    }

    /// A store written by schema 1 (records without group ids, token bindings or
    /// certificate lists) opens: groups get ids, tokens are bound to their group (or left
    /// orphaned when the group of that name is newer, or deleted when it is gone), and
    /// agents list their unexpired certificates, the earlier ones included.
    #[test]
    fn a_schema_1_store_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let now = crate::enroll::now_unix();
        {
            let s = SledStore::reopen(dir.path()).unwrap();
            let put = |tree: &sled::Tree, key: &str, v: serde_json::Value| {
                tree.insert(key.as_bytes(), serde_json::to_vec(&v).unwrap())
                    .unwrap();
            };
            let group = |name: &str, created_at: i64| {
                serde_json::json!({"name": name, "namespace": "ns", "service_account": "sa",
                    "service": null, "ports": [], "labels": {}, "allowed_cidrs": [],
                    "created_at": created_at})
            };
            put(&s.groups, "g", group("g", 100));
            put(&s.groups, "g2", group("g2", 500));
            let token = |id: &str, group: &str, created_at: i64| {
                serde_json::json!({"id": id, "secret_sha256": "00", "group": group,
                    "created_at": created_at, "expires_at": now + 100, "uses_total": 1,
                    "uses_left": 1, "cidrs": []})
            };
            put(&s.tokens, "bound", token("bound", "g", 200));
            put(&s.tokens, "orphan", token("orphan", "g2", 300));
            put(&s.tokens, "gone", token("gone", "deleted", 300));
            put(
                &s.agents,
                "a1",
                serde_json::json!({"id": "a1", "group": "g", "spiffe_id": "spiffe://td/ns/ns/sa/sa",
                    "hostname": "h", "address": "127.0.0.1", "token_id": "bound", "joined_at": 1,
                    "serial": "s3", "not_after": now + 30, "renewed_at": 2, "renewals": 2,
                    "removed_at": null}),
            );
            for (serial, not_after) in [("s1", now - 5), ("s2", now + 20), ("s3", now + 30)] {
                put(
                    &s.certs,
                    serial,
                    serde_json::to_value(cert(serial, "a1"))
                        .map(|mut c| {
                            c["not_after"] = not_after.into();
                            c
                        })
                        .unwrap(),
                );
            }
            s.meta.insert(b"schema_version", encode(&1u32)).unwrap();
            s.flush().unwrap();
        }
        let s = SledStore::reopen(dir.path()).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let g = s.group("g").unwrap().unwrap();
        assert!(g.id.starts_with("g-"), "{g:?}");
        assert_ne!(g.id, s.group("g2").unwrap().unwrap().id);
        assert_eq!(s.token("bound").unwrap().unwrap().group_id, g.id);
        assert_eq!(s.token("orphan").unwrap().unwrap().group_id, "");
        assert!(s.token("gone").unwrap().is_none());
        let serials: Vec<String> = s
            .agent("a1")
            .unwrap()
            .unwrap()
            .live_certs
            .into_iter()
            .map(|c| c.serial)
            .collect();
        assert_eq!(serials, ["s2", "s3"]);
    }

    /// Renewals add to the agent's unexpired certificates (expired ones leave the list);
    /// at [`MAX_LIVE_CERTS`] a renewal is refused, naming when the oldest expires.
    #[test]
    fn renewals_keep_the_unexpired_certificates_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::reopen(dir.path()).unwrap();
        s.create_token(&token("t", 1)).unwrap();
        s.commit_join("t", &agent("a1"), &cert("s-a1", "a1"))
            .unwrap();
        let renew = |serial: &str, now: i64| {
            let mut c = cert(serial, "a1");
            c.not_after = now + 100;
            s.commit_renewal("a1", &c, now)
        };
        // s-a1 expires at 10: gone from the list after a renewal at 20.
        let a = renew("r0", 20).unwrap();
        assert_eq!(a.live_certs.len(), 1);
        for i in 1..MAX_LIVE_CERTS {
            renew(&format!("r{i}"), 20).unwrap();
        }
        let err = renew("too-many", 20).unwrap_err();
        assert!(err.to_string().contains("renewals resume"), "{err}");
        let a = s.agent("a1").unwrap().unwrap();
        assert_eq!(a.live_certs.len(), MAX_LIVE_CERTS);
        assert_eq!(a.live_certs.first().unwrap().serial, "r0");
        assert!(s.cert("too-many").unwrap().is_none());
    }

    /// Deleting a group deletes its tokens; revoking a token refuses its next join.
    #[test]
    fn group_deletion_takes_its_tokens_and_revoked_tokens_join_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::reopen(dir.path()).unwrap();
        let group = GroupRecord {
            group: WorkloadGroup {
                name: "g".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
                service: None,
                ports: vec![],
                labels: Default::default(),
                allowed_cidrs: vec![],
                mtls: Default::default(),
                registry_source: None,
            },
            id: "g-1".into(),
            created_at: 0,
        };
        s.create_group(&group).unwrap();
        s.create_token(&token("t1", 2)).unwrap();
        s.create_token(&token("t2", 2)).unwrap();
        let revoked = s.revoke_token("t1", 7).unwrap();
        assert_eq!(revoked.revoked_at, Some(7));
        assert_eq!(s.revoke_token("t1", 9).unwrap().revoked_at, Some(7));
        let err = s
            .commit_join("t1", &agent("a1"), &cert("s1", "a1"))
            .unwrap_err();
        assert!(matches!(err, StoreError::TokenRevoked { .. }), "{err}");
        assert!(s.agent("a1").unwrap().is_none());
        assert_eq!(s.delete_group("g").unwrap(), 2);
        assert!(s.tokens().unwrap().is_empty());
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::reopen(dir.path()).unwrap();
            s.meta
                .insert(b"schema_version", encode(&(SCHEMA_VERSION + 1)))
                .unwrap();
            s.flush().unwrap();
        }
        let err = SledStore::reopen(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::SchemaTooNew { .. }), "{err}");
    }

    #[test]
    fn corrupt_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::reopen(dir.path()).unwrap();
        s.groups.insert(b"web", b"{not json".to_vec()).unwrap();
        let err = s.group("web").unwrap_err();
        assert!(err.to_string().contains("groups/web"), "{err}");
    }
}
