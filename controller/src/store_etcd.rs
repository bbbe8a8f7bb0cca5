//! [`EtcdStore`]: the [`Store`] on etcd, for several controllers sharing one state
//! (`[store] backend = "etcd"`, issue 23).
//!
//! Key layout under a prefix (default `/causeway/`), values JSON as in the sled trees:
//! `meta/schema_version`, `ca/current` (the CA; its private key sealed, see [`Kek`]),
//! `groups/<name>`, `tokens/<id>`, `agents/<id>`, `certs/<serial>`, and the mesh under
//! `mesh/`: `mesh/version`, `mesh/sources/<name>`, `mesh/data/<source>\0<ns>/<name>`,
//! `mesh/vips/<ns>/<name>`, `mesh/history/<version, 20 digits>/<part, 4 digits>`,
//! `mesh/policies/<Kind>/<ns>/<name>`, `mesh/routes/<Kind>/<ns>/<name>`.
//!
//! Every write is one etcd transaction that compares the mod revision of every key it
//! read (read, compute, compare-and-swap): a lost race re-reads and recomputes, a bounded
//! number of times, so a token with `uses: N` is spent at most N times by any number of
//! controllers. etcd limits a transaction to 128 operations and a request to 1.5 MiB by
//! default: an enrollment batch is committed in sub-batches (each atomic, each record with
//! its own outcome), a mesh write larger than one transaction is split into several, the
//! version and history entry first (so a reconnecting agent's delta names every service
//! the write touches), and a large history entry is split over several keys.
//!
//! The [`Store`] trait is synchronous; the store owns a small runtime that runs the etcd
//! requests, and a caller waits for the answer (inside `block_in_place` when it is a
//! worker of a multi-threaded runtime, so no async worker is blocked).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use causeway_api::registry::{ServiceEndpoints, ServiceKey};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

use crate::etcd::{Compare, Etcd, EtcdError, EtcdOptions, KeyValue, Op, TxnResponse, prefix_end};
use crate::store::{
    AgentRecord, CaRecord, CertRecord, EncodedMeshWrite, EnrollOutcome, Enrollment, GroupRecord,
    HistoryRecord, LiveCert, MAX_LIVE_CERTS, MeshDump, PolicyRecord, RouteRecord, SCHEMA_VERSION,
    SourceRecord, Store, StoreError, TokenRecord,
};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/causeway/";

/// Operations per transaction: below etcd's default `--max-txn-ops` (128).
const MAX_TXN_OPS: usize = 100;
/// Bytes of keys and values per transaction: below etcd's default request limit (1.5 MiB).
const MAX_TXN_BYTES: usize = 1 << 20;
/// Largest history value; a larger entry is split over several keys.
const HISTORY_PART_BYTES: usize = 256 << 10;
/// Enrollments per transaction (a join reads 1 key and writes 3).
const ENROLL_CHUNK: usize = 30;
/// Attempts of one compare-and-swap before giving up with a clear error.
const MAX_ATTEMPTS: u32 = 40;
/// Keys per page of a prefix read.
const PAGE: i64 = 1000;

/// The key-encryption key: seals the CA's private key before it goes to etcd.
///
/// Derived with HKDF-SHA256 from the bytes of `kek_file` (32+ random bytes, or text such
/// as 64 hex digits, whose surrounding whitespace is ignored); AES-256-GCM with a random nonce, the
/// CA certificate's fingerprint as associated data.
pub struct Kek {
    key: LessSafeKey,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

/// Fewest bytes a key-encryption key file may hold.
pub const KEK_MIN_BYTES: usize = 32;

impl Kek {
    /// Reads `path` (`[store] kek_file`).
    pub fn from_file(path: &Path) -> Result<Kek, StoreError> {
        let bytes = std::fs::read(path).map_err(|e| {
            StoreError::Kek(format!(
                "[store] kek_file = {:?}: cannot read it ({e}); create it once with at least {KEK_MIN_BYTES} random bytes (`head -c 32 /dev/urandom > {}`, mode 0600) and copy the same file to every controller",
                path.display(),
                path.display()
            ))
        })?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Derives the key from `bytes` (`origin` names them in errors).
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Kek, StoreError> {
        // Text (hex, base64) is taken without its surrounding whitespace, so a trailing
        // newline does not change the key; random bytes are taken as they are.
        let text = std::str::from_utf8(bytes)
            .is_ok_and(|t| t.chars().all(|c| !c.is_control() || c.is_whitespace()));
        let material = if text { bytes.trim_ascii() } else { bytes };
        if material.len() < KEK_MIN_BYTES {
            return Err(StoreError::Kek(format!(
                "[store] kek_file = {origin:?} holds {} bytes: a key-encryption key needs at least {KEK_MIN_BYTES} random bytes; write a new one with `head -c 32 /dev/urandom > {origin}` before the first controller starts (the same file on every controller)",
                material.len()
            )));
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"causeway kek v1").extract(material);
        let okm = prk
            .expand(&[b"causeway ca key"], &AES_256_GCM)
            .map_err(|_| StoreError::Kek("HKDF expansion failed".into()))?;
        Ok(Kek {
            key: LessSafeKey::new(UnboundKey::from(okm)),
        })
    }

    fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<String, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| StoreError::Kek("no randomness for a nonce".into()))?;
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| StoreError::Kek("sealing the CA key failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(B64.encode(out))
    }

    fn open(&self, aad: &[u8], sealed: &str) -> Option<Vec<u8>> {
        let bytes = B64.decode(sealed).ok()?;
        if bytes.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ct) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}

/// The CA as kept in etcd: the record without its key, and the key sealed.
#[derive(Serialize, Deserialize)]
struct SealedCa {
    #[serde(flatten)]
    ca: CaRecord,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    key_sealed: String,
}

fn ca_aad(fingerprint: &str) -> Vec<u8> {
    format!("causeway ca key {fingerprint}").into_bytes()
}

/// The store on etcd.
pub struct EtcdStore {
    etcd: Arc<Etcd>,
    rt: Option<Runtime>,
    prefix: String,
    kek: Kek,
    /// Serialises this controller's writes (other controllers are kept out by the
    /// compares; this only avoids racing ourselves).
    write: Mutex<()>,
    /// Mod revision of `mesh/version` as this controller last read or wrote it: a mesh
    /// write compares it, so two writers never interleave unnoticed.
    mesh_rev: Mutex<Option<i64>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.etcd.endpoints())
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Dropping a runtime may not block inside another runtime's worker.
            rt.shutdown_background();
        }
    }
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

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    crate::etcd::encode(value)
}

/// Every key under `prefix` at one revision (`revision` 0: the latest), page by page.
async fn range_all(
    etcd: Arc<Etcd>,
    prefix: Vec<u8>,
    revision: i64,
) -> Result<(i64, Vec<KeyValue>), EtcdError> {
    let end = prefix_end(&prefix);
    let mut from = prefix;
    let mut rev = revision;
    let mut out = Vec::new();
    loop {
        let r = etcd.range(&from, &end, rev, PAGE).await?;
        if rev == 0 {
            rev = r.header.revision;
        }
        if let Some(last) = r.kvs.last() {
            from = last.key.clone();
            from.push(0);
        }
        let more = r.more && !r.kvs.is_empty();
        out.extend(r.kvs);
        if !more {
            return Ok((rev, out));
        }
    }
}

fn jitter_ms(attempt: u32) -> u64 {
    let mut b = [0u8; 2];
    let _ = SystemRandom::new().fill(&mut b);
    let cap = 1u64 << attempt.min(6);
    1 + u64::from(u16::from_le_bytes(b)) % (cap * 2)
}

impl EtcdStore {
    /// Connects to etcd, checks the schema (recording it in an empty store) and keeps
    /// `kek` for the CA key.
    pub fn open(options: &EtcdOptions, prefix: &str, kek: Kek) -> Result<Self, StoreError> {
        if !prefix.starts_with('/') || prefix.len() < 2 {
            return Err(StoreError::Conflict(format!(
                "[store] prefix = {prefix:?}: must start with / and name a directory, e.g. \"/causeway/\""
            )));
        }
        let prefix = if prefix.ends_with('/') {
            prefix.to_owned()
        } else {
            format!("{prefix}/")
        };
        let etcd = Arc::new(Etcd::new(options)?);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(|e| {
                StoreError::Conflict(format!("cannot start the etcd store's runtime: {e}"))
            })?;
        let store = EtcdStore {
            etcd,
            rt: Some(rt),
            prefix,
            kek,
            write: Mutex::new(()),
            mesh_rev: Mutex::new(None),
        };
        let key = store.key("meta", "schema_version");
        let r = store.txn(
            vec![Compare::absent(key.clone())],
            vec![Op::put(key.clone(), encode(&SCHEMA_VERSION))],
            vec![Op::Get { key: key.clone() }],
        )?;
        if !r.succeeded
            && let Some(kv) = r.reads.first().and_then(|kvs| kvs.first())
        {
            let found: u32 = decode("meta", &key, &kv.value)?;
            if found > SCHEMA_VERSION {
                return Err(StoreError::SchemaTooNew { found });
            }
        }
        Ok(store)
    }

    /// The key prefix in use (ends with `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The etcd client (tests, migration).
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    fn key(&self, tree: &str, name: &str) -> Vec<u8> {
        format!("{}{tree}/{name}", self.prefix).into_bytes()
    }

    fn tree(&self, tree: &str) -> Vec<u8> {
        format!("{}{tree}/", self.prefix).into_bytes()
    }

    /// Runs one etcd request on the store's runtime and waits for it.
    fn call<T, Fut>(&self, f: impl FnOnce(Arc<Etcd>) -> Fut) -> Result<T, StoreError>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T, EtcdError>> + Send + 'static,
    {
        self.run(f, true)
    }

    /// [`EtcdStore::call`]; `measured`: an etcd request, counted in the store metrics
    /// (a pause between retries is not).
    fn run<T, Fut>(&self, f: impl FnOnce(Arc<Etcd>) -> Fut, measured: bool) -> Result<T, StoreError>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T, EtcdError>> + Send + 'static,
    {
        let fut = f(self.etcd.clone());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt
            .as_ref()
            .expect("the runtime lives until drop")
            .spawn(async move {
                let started = std::time::Instant::now();
                let r = fut.await;
                if measured {
                    crate::metrics::store_request(started.elapsed(), r.is_ok());
                }
                let _ = tx.send(r);
            });
        let wait = move || rx.recv();
        let got = match Handle::try_current() {
            Ok(h) if matches!(h.runtime_flavor(), RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        match got {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError::Conflict(
                "the etcd store's runtime stopped before etcd answered".into(),
            )),
        }
    }

    fn pause(&self, attempt: u32) {
        let ms = jitter_ms(attempt);
        let _ = self.run(
            move |_| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, EtcdError>(())
            },
            false,
        );
    }

    fn get(&self, key: Vec<u8>) -> Result<Option<KeyValue>, StoreError> {
        self.call(move |e| async move { e.get(&key).await })
    }

    fn get_all(&self, prefix: Vec<u8>, revision: i64) -> Result<(i64, Vec<KeyValue>), StoreError> {
        self.call(move |e| range_all(e, prefix, revision))
    }

    fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> Result<TxnResponse, StoreError> {
        self.call(move |e| async move { e.txn(&compares, &success, &failure).await })
    }

    /// Reads `keys` at one revision: each key's value, absent or not.
    fn read_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<KeyValue>>, StoreError> {
        let ops = keys.iter().map(|k| Op::Get { key: k.clone() }).collect();
        let r = self.txn(Vec::new(), ops, Vec::new())?;
        Ok(r.reads
            .into_iter()
            .map(|kvs| kvs.into_iter().next())
            .chain(std::iter::repeat(None))
            .take(keys.len())
            .collect())
    }

    fn one<T: DeserializeOwned>(
        &self,
        tree: &'static str,
        name: &str,
    ) -> Result<Option<T>, StoreError> {
        let key = self.key(tree, name);
        self.get(key.clone())?
            .map(|kv| decode(tree, &key, &kv.value))
            .transpose()
    }

    fn all<T: DeserializeOwned>(&self, tree: &'static str) -> Result<Vec<T>, StoreError> {
        let (_, kvs) = self.get_all(self.tree(tree), 0)?;
        kvs.iter()
            .map(|kv| decode(tree, &kv.key, &kv.value))
            .collect()
    }

    fn busy(what: &str) -> StoreError {
        StoreError::Conflict(format!(
            "{what}: {MAX_ATTEMPTS} attempts in a row lost a race with other writes to the same records in etcd; retry"
        ))
    }

    /// Read-modify-write of one record with compare-and-swap; `change` returns whether
    /// it changed the record.
    fn update<T: Serialize + DeserializeOwned>(
        &self,
        tree: &'static str,
        kind: &'static str,
        id: &str,
        change: impl Fn(&mut T) -> bool,
    ) -> Result<T, StoreError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let key = self.key(tree, id);
        for attempt in 0..MAX_ATTEMPTS {
            let Some(kv) = self.get(key.clone())? else {
                return Err(StoreError::NotFound {
                    kind,
                    name: id.to_owned(),
                });
            };
            let mut rec: T = decode(tree, &key, &kv.value)?;
            if !change(&mut rec) {
                return Ok(rec);
            }
            let r = self.txn(
                vec![Compare::unchanged_since(key.clone(), kv.mod_revision)],
                vec![Op::put(key.clone(), encode(&rec))],
                Vec::new(),
            )?;
            if r.succeeded {
                return Ok(rec);
            }
            self.pause(attempt);
        }
        Err(Self::busy(&format!("updating {kind} {id:?}")))
    }

    /// One sub-batch of enrollments in one transaction, retried on a lost race.
    fn commit_chunk(&self, batch: &[Enrollment]) -> Result<Vec<EnrollOutcome>, StoreError> {
        let keys: Vec<Vec<u8>> = batch
            .iter()
            .map(|op| match op {
                Enrollment::Join { token_id, .. } => self.key("tokens", token_id),
                Enrollment::Renewal { agent_id, .. } => self.key("agents", agent_id),
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for attempt in 0..MAX_ATTEMPTS {
            let read = self.read_many(&keys)?;
            let mut compares = Vec::with_capacity(keys.len());
            // The current value of every key read or written so far in this batch.
            let mut state: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
            for (key, kv) in keys.iter().zip(read) {
                compares.push(Compare::unchanged_since(
                    key.clone(),
                    kv.as_ref().map_or(0, |kv| kv.mod_revision),
                ));
                state.insert(key.clone(), kv.map(|kv| kv.value));
            }
            let mut writes: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let mut outcomes = Vec::with_capacity(batch.len());
            for op in batch {
                outcomes.push(self.apply(op, &mut state, &mut writes));
            }
            if writes.is_empty() {
                return Ok(outcomes);
            }
            let puts = writes.into_iter().map(|(k, v)| Op::put(k, v)).collect();
            if self.txn(compares, puts, Vec::new())?.succeeded {
                return Ok(outcomes);
            }
            self.pause(attempt);
        }
        Err(Self::busy("committing joins and renewals"))
    }

    /// Checks and applies one enrollment against `state` (as sled's transaction does).
    fn apply(
        &self,
        op: &Enrollment,
        state: &mut BTreeMap<Vec<u8>, Option<Vec<u8>>>,
        writes: &mut BTreeMap<Vec<u8>, Vec<u8>>,
    ) -> EnrollOutcome {
        fn set(
            state: &mut BTreeMap<Vec<u8>, Option<Vec<u8>>>,
            writes: &mut BTreeMap<Vec<u8>, Vec<u8>>,
            key: Vec<u8>,
            value: Vec<u8>,
        ) {
            state.insert(key.clone(), Some(value.clone()));
            writes.insert(key, value);
        }
        match op {
            Enrollment::Join {
                token_id,
                agent,
                cert,
            } => {
                let key = self.key("tokens", token_id);
                let Some(Some(raw)) = state.get(&key) else {
                    return Err(StoreError::NotFound {
                        kind: "join token",
                        name: token_id.clone(),
                    });
                };
                let mut t: TokenRecord = decode("tokens", &key, raw)?;
                if let Some(revoked_at) = t.revoked_at {
                    return Err(StoreError::TokenRevoked {
                        id: token_id.clone(),
                        revoked_at,
                    });
                }
                if t.uses_left == 0 {
                    return Err(StoreError::TokenSpent(token_id.clone()));
                }
                t.uses_left -= 1;
                set(state, writes, key, encode(&t));
                set(state, writes, self.key("agents", &agent.id), encode(agent));
                set(state, writes, self.key("certs", &cert.serial), encode(cert));
                Ok(agent.clone())
            }
            Enrollment::Renewal {
                agent_id,
                cert,
                now,
            } => {
                let key = self.key("agents", agent_id);
                let Some(Some(raw)) = state.get(&key) else {
                    return Err(StoreError::NotFound {
                        kind: "agent",
                        name: agent_id.clone(),
                    });
                };
                let mut a: AgentRecord = decode("agents", &key, raw)?;
                if a.removed_at.is_some() {
                    return Err(StoreError::AgentRemoved(agent_id.clone()));
                }
                if a.live_certs.is_empty() {
                    a.live_certs.push(LiveCert {
                        serial: a.serial.clone(),
                        not_after: a.not_after,
                    });
                }
                a.live_certs.retain(|c| c.not_after > *now);
                if a.live_certs.len() >= MAX_LIVE_CERTS {
                    return Err(StoreError::TooManyCerts {
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
                set(state, writes, key, encode(&a));
                set(state, writes, self.key("certs", &cert.serial), encode(cert));
                Ok(a)
            }
        }
    }

    fn unseal_ca(&self, key: &[u8], raw: &[u8]) -> Result<CaRecord, StoreError> {
        let sealed: SealedCa = decode("ca", key, raw)?;
        let mut ca = sealed.ca;
        if !sealed.key_sealed.is_empty() {
            let plain = self
                .kek
                .open(&ca_aad(&ca.fingerprint), &sealed.key_sealed)
                .ok_or_else(|| {
                    StoreError::Kek(format!(
                        "the CA key in etcd ({}) cannot be decrypted with this controller's [store] kek_file: every controller of the set needs the same kek_file; copy it from the controller that initialised the CA",
                        String::from_utf8_lossy(key)
                    ))
                })?;
            ca.key_pem = String::from_utf8(plain)
                .map_err(|_| StoreError::Kek("the decrypted CA key is not PEM text".into()))?;
        }
        Ok(ca)
    }

    fn mesh_version_rev(&self) -> Result<i64, StoreError> {
        let cached = *self.mesh_rev.lock().unwrap_or_else(|p| p.into_inner());
        match cached {
            Some(r) => Ok(r),
            None => Ok(self
                .get(self.key("mesh", "version"))?
                .map_or(0, |kv| kv.mod_revision)),
        }
    }
}

/// Splits a history entry into parts that each encode below [`HISTORY_PART_BYTES`].
/// [`history_parts`] of an encoded history entry: as it is when it fits one key.
fn history_parts_encoded(bytes: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
    if bytes.len() <= HISTORY_PART_BYTES {
        return Ok(vec![bytes.to_vec()]);
    }
    let h: HistoryRecord = decode("mesh/history", b"(being written)", bytes)?;
    Ok(history_parts(&h))
}

fn history_parts(h: &HistoryRecord) -> Vec<Vec<u8>> {
    let whole = encode(h);
    if whole.len() <= HISTORY_PART_BYTES || h.services.len() < 2 {
        return vec![whole];
    }
    let n = whole.len().div_ceil(HISTORY_PART_BYTES) + 1;
    let per = h.services.len().div_ceil(n);
    let services: Vec<&ServiceKey> = h.services.iter().collect();
    services
        .chunks(per)
        .enumerate()
        .map(|(i, chunk)| {
            let part = HistoryRecord {
                services: chunk.iter().map(|k| (*k).clone()).collect(),
                deny: i == 0 && h.deny,
                policies: if i == 0 {
                    h.policies.clone()
                } else {
                    BTreeSet::new()
                },
                routes: if i == 0 {
                    h.routes.clone()
                } else {
                    BTreeSet::new()
                },
            };
            encode(&part)
        })
        .collect()
}

fn op_bytes(op: &Op) -> usize {
    match op {
        Op::Put { key, value, .. } => key.len() + value.len() + 16,
        Op::Delete { key } | Op::Get { key } => key.len() + 16,
        Op::DeleteRange { key, range_end } => key.len() + range_end.len() + 16,
        Op::DeletePrefix { prefix } => 2 * prefix.len() + 16,
    }
}

impl Store for EtcdStore {
    fn ca(&self) -> Result<Option<CaRecord>, StoreError> {
        let key = self.key("ca", "current");
        self.get(key.clone())?
            .map(|kv| self.unseal_ca(&key, &kv.value))
            .transpose()
    }

    fn init_ca(&self, ca: &CaRecord) -> Result<CaRecord, StoreError> {
        let key = self.key("ca", "current");
        let mut sealed = SealedCa {
            ca: ca.clone(),
            key_sealed: String::new(),
        };
        if !ca.key_pem.is_empty() {
            sealed.key_sealed = self
                .kek
                .seal(&ca_aad(&ca.fingerprint), ca.key_pem.as_bytes())?;
            sealed.ca.key_pem = String::new();
        }
        let r = self.txn(
            vec![Compare::absent(key.clone())],
            vec![Op::put(key.clone(), encode(&sealed))],
            vec![Op::Get { key: key.clone() }],
        )?;
        if r.succeeded {
            return Ok(ca.clone());
        }
        match r.reads.first().and_then(|kvs| kvs.first()) {
            Some(kv) => self.unseal_ca(&key, &kv.value),
            // Deleted between the compare and the read: nobody's CA is in force.
            None => Err(StoreError::Conflict(
                "the CA record in etcd vanished while it was being created; start again".into(),
            )),
        }
    }

    fn create_group(&self, group: &GroupRecord) -> Result<(), StoreError> {
        let key = self.key("groups", &group.group.name);
        let r = self.txn(
            vec![Compare::absent(key.clone())],
            vec![Op::put(key, encode(group))],
            Vec::new(),
        )?;
        if r.succeeded {
            Ok(())
        } else {
            Err(StoreError::Exists {
                kind: "group",
                name: group.group.name.clone(),
            })
        }
    }

    fn group(&self, name: &str) -> Result<Option<GroupRecord>, StoreError> {
        self.one("groups", name)
    }

    fn groups(&self) -> Result<Vec<GroupRecord>, StoreError> {
        self.all("groups")
    }

    fn delete_group(&self, name: &str) -> Result<usize, StoreError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let gkey = self.key("groups", name);
        for attempt in 0..MAX_ATTEMPTS {
            let (rev, agents) = self.get_all(self.tree("agents"), 0)?;
            let active: Vec<String> = agents
                .iter()
                .map(|kv| decode::<AgentRecord>("agents", &kv.key, &kv.value))
                .collect::<Result<Vec<_>, _>>()?
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
            let (_, tokens) = self.get_all(self.tree("tokens"), rev)?;
            let mut mine = Vec::new();
            for kv in tokens {
                let t: TokenRecord = decode("tokens", &kv.key, &kv.value)?;
                if t.group == name {
                    mine.push(kv);
                }
            }
            let (_, group) = self.get_all(gkey.clone(), rev)?;
            let Some(g) = group.into_iter().find(|kv| kv.key == gkey) else {
                return Err(StoreError::NotFound {
                    kind: "group",
                    name: name.to_owned(),
                });
            };
            // More tokens than one transaction takes: the surplus goes first, each
            // chunk compared as read (a token of a group being deleted joins nothing
            // useful anyway), then the group with the last tokens in one transaction.
            let last = mine.len().saturating_sub(MAX_TXN_OPS / 2 - 1);
            let mut lost = false;
            for chunk in mine[..last].chunks(MAX_TXN_OPS / 2) {
                let compares = chunk
                    .iter()
                    .map(|kv| Compare::unchanged_since(kv.key.clone(), kv.mod_revision))
                    .collect();
                let ops = chunk
                    .iter()
                    .map(|kv| Op::Delete {
                        key: kv.key.clone(),
                    })
                    .collect();
                if !self.txn(compares, ops, Vec::new())?.succeeded {
                    lost = true;
                    break;
                }
            }
            if !lost {
                let mut compares = vec![Compare::unchanged_since(gkey.clone(), g.mod_revision)];
                let mut ops = vec![Op::Delete { key: gkey.clone() }];
                for kv in &mine[last..] {
                    compares.push(Compare::unchanged_since(kv.key.clone(), kv.mod_revision));
                    ops.push(Op::Delete {
                        key: kv.key.clone(),
                    });
                }
                if self.txn(compares, ops, Vec::new())?.succeeded {
                    return Ok(mine.len());
                }
            }
            self.pause(attempt);
        }
        Err(Self::busy(&format!("deleting group {name:?}")))
    }

    fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.txn(
            Vec::new(),
            vec![Op::put(self.key("tokens", &token.id), encode(token))],
            Vec::new(),
        )?;
        Ok(())
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.one("tokens", id)
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.all("tokens")
    }

    fn revoke_token(&self, id: &str, now: i64) -> Result<TokenRecord, StoreError> {
        self.update("tokens", "join token", id, |t: &mut TokenRecord| {
            if t.revoked_at.is_some() {
                return false;
            }
            t.revoked_at = Some(now);
            true
        })
    }

    fn commit_enrollments(&self, batch: &[Enrollment]) -> Result<Vec<EnrollOutcome>, StoreError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut first_err = None;
        let mut any_written = false;
        for chunk in batch.chunks(ENROLL_CHUNK) {
            match self.commit_chunk(chunk) {
                Ok(o) => {
                    any_written = true;
                    outcomes.extend(o);
                }
                Err(e) => {
                    let msg = format!("store commit failed: {e}");
                    outcomes.extend(chunk.iter().map(|_| Err(StoreError::Conflict(msg.clone()))));
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            // Nothing was written: the whole batch failed, as the trait says.
            Some(e) if !any_written => Err(e),
            _ => Ok(outcomes),
        }
    }

    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.one("agents", id)
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.all("agents")
    }

    fn remove_agent(&self, id: &str, now: i64) -> Result<AgentRecord, StoreError> {
        self.update("agents", "agent", id, |a: &mut AgentRecord| {
            if a.removed_at.is_some() {
                return false;
            }
            a.removed_at = Some(now);
            true
        })
    }

    fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError> {
        self.one("certs", serial)
    }

    fn certs(&self) -> Result<Vec<CertRecord>, StoreError> {
        self.all("certs")
    }

    fn load_mesh(&self) -> Result<MeshDump, StoreError> {
        let root = self.tree("mesh");
        let (_, kvs) = self.get_all(root.clone(), 0)?;
        let mut dump = MeshDump::default();
        let mut version_rev = 0;
        for kv in &kvs {
            let rest = String::from_utf8_lossy(&kv.key[root.len()..]).into_owned();
            let corrupt = |tree: &'static str, message: &str| StoreError::Corrupt {
                tree,
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                message: message.to_owned(),
            };
            if rest == "version" {
                dump.version = decode("mesh", &kv.key, &kv.value)?;
                version_rev = kv.mod_revision;
            } else if let Some(name) = rest.strip_prefix("sources/") {
                let rec: SourceRecord = decode("mesh/sources", &kv.key, &kv.value)?;
                dump.sources.insert(name.to_owned(), rec);
            } else if let Some(k) = rest.strip_prefix("data/") {
                let (source, key) = k.split_once('\0').ok_or_else(|| {
                    corrupt("mesh/data", "key is not <source>\\0<namespace>/<name>")
                })?;
                let key = ServiceKey::try_from(key.to_owned()).map_err(|_| {
                    corrupt("mesh/data", "key is not <source>\\0<namespace>/<name>")
                })?;
                let eps: ServiceEndpoints = decode("mesh/data", &kv.key, &kv.value)?;
                dump.data
                    .entry(source.to_owned())
                    .or_default()
                    .insert(key, eps);
            } else if let Some(k) = rest.strip_prefix("vips/") {
                let key = ServiceKey::try_from(k.to_owned())
                    .map_err(|e| corrupt("mesh/vips", &e.to_string()))?;
                let ip: Ipv4Addr = decode("mesh/vips", &kv.key, &kv.value)?;
                dump.vips.insert(key, ip);
            } else if let Some(k) = rest.strip_prefix("history/") {
                let version: u64 = k
                    .split('/')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| corrupt("mesh/history", "key is not <version>/<part>"))?;
                let part: HistoryRecord = decode("mesh/history", &kv.key, &kv.value)?;
                let h = dump.history.entry(version).or_default();
                h.services.extend(part.services);
                h.deny |= part.deny;
                h.policies.extend(part.policies);
                h.routes.extend(part.routes);
            } else if let Some(k) = rest.strip_prefix("policies/") {
                let rec: PolicyRecord = decode("mesh/policies", &kv.key, &kv.value)?;
                dump.policies.insert(k.to_owned(), rec);
            } else if let Some(k) = rest.strip_prefix("routes/") {
                let rec: RouteRecord = decode("mesh/routes", &kv.key, &kv.value)?;
                dump.routes.insert(k.to_owned(), rec);
            }
        }
        *self.mesh_rev.lock().unwrap_or_else(|p| p.into_inner()) = Some(version_rev);
        Ok(dump)
    }

    fn save_mesh(&self, w: &EncodedMeshWrite) -> Result<(), StoreError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let vkey = self.key("mesh", "version");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        // First the version and its history entry, so that whatever part of a write
        // split over several transactions is stored, the history names all of it.
        let mut ops = vec![Op::put(vkey.clone(), encode(&w.version))];
        for (i, part) in history_parts_encoded(&w.history)?.into_iter().enumerate() {
            ops.push(Op::put(
                self.key("mesh", &format!("history/{:020}/{i:04}", w.version)),
                part,
            ));
        }
        ops.push(Op::DeleteRange {
            key: self.tree("mesh/history"),
            range_end: self.key("mesh", &format!("history/{:020}", w.history_keep_from)),
        });
        for (name, rec) in &w.sources {
            ops.push(Op::put(self.key("mesh/sources", &text(name)), rec.clone()));
        }
        for (key, eps) in &w.data {
            let k = self.key("mesh/data", &text(key));
            ops.push(match eps {
                Some(eps) => Op::put(k, eps.clone()),
                None => Op::Delete { key: k },
            });
        }
        for (key, ip) in &w.vips {
            ops.push(Op::put(self.key("mesh/vips", &text(key)), ip.clone()));
        }
        for (key, rec) in &w.policies {
            let k = self.key("mesh/policies", &text(key));
            ops.push(match rec {
                Some(rec) => Op::put(k, rec.clone()),
                None => Op::Delete { key: k },
            });
        }
        for (key, rec) in &w.routes {
            let k = self.key("mesh/routes", &text(key));
            ops.push(match rec {
                Some(rec) => Op::put(k, rec.clone()),
                None => Op::Delete { key: k },
            });
        }
        // Pack into transactions within etcd's limits.
        let mut txns: Vec<Vec<Op>> = vec![Vec::new()];
        let mut bytes = 0;
        for op in ops {
            let size = op_bytes(&op);
            let cur = txns.last_mut().expect("one at least");
            if !cur.is_empty() && (cur.len() >= MAX_TXN_OPS || bytes + size > MAX_TXN_BYTES) {
                txns.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            txns.last_mut().expect("one at least").push(op);
        }
        let mut expected = self.mesh_version_rev()?;
        for (i, ops) in txns.into_iter().enumerate() {
            let mut compares = vec![Compare::unchanged_since(vkey.clone(), expected)];
            if let Some(f) = &w.fence {
                compares.push(Compare::created_at(f.key.clone(), f.revision));
            }
            let r = self.txn(compares, ops, Vec::new())?;
            if !r.succeeded
                && let Some(f) = &w.fence
            {
                let now = self.get(f.key.clone())?.map_or(0, |kv| kv.create_revision);
                if now != f.revision {
                    crate::metrics::get().fenced_writes.inc();
                    crate::ha::write_fenced(f.revision);
                    return Err(StoreError::Conflict(format!(
                        "this controller is no longer the leader: its registry write was refused because the leadership key {} was created at revision {} when it led and is {} now (another controller leads, or the lease expired); the new leader runs the registry sources",
                        String::from_utf8_lossy(&f.key),
                        f.revision,
                        if now == 0 {
                            "absent".to_owned()
                        } else {
                            format!("at revision {now}")
                        }
                    )));
                }
            }
            if !r.succeeded {
                // The revision stays the stale one: every later write fails the same way
                // instead of overwriting the other writer's state with this stale view.
                return Err(StoreError::Conflict(format!(
                    "the mesh state in etcd ({}) was changed by another writer since this controller read it; its registry view is stale: restart this controller",
                    String::from_utf8_lossy(&vkey)
                )));
            }
            if i == 0 {
                expected = r.revision;
                *self.mesh_rev.lock().unwrap_or_else(|p| p.into_inner()) = Some(expected);
            }
        }
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }

    fn mesh_revision(&self) -> Option<i64> {
        *self.mesh_rev.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn flush(&self) -> Result<(), StoreError> {
        // A transaction etcd acknowledged is on a quorum's disks already.
        Ok(())
    }
}

/// Opens the store `[store]` configures: sled in `data_dir/store`, or etcd.
pub fn open_configured(
    cfg: &crate::config::StoreConfig,
    data_dir: &Path,
) -> anyhow::Result<Arc<dyn Store>> {
    use anyhow::Context as _;
    match cfg.backend {
        crate::config::StoreBackend::Sled => {
            let dir = data_dir.join("store");
            let store = crate::store::SledStore::open(&dir).with_context(|| {
                format!(
                    "cannot open the store at {} (is another controller using this data dir?)",
                    dir.display()
                )
            })?;
            Ok(Arc::new(store))
        }
        crate::config::StoreBackend::Etcd => {
            let kek_file = cfg
                .kek_file
                .as_deref()
                .context("[store] kek_file is required with backend = \"etcd\"")?;
            let kek = Kek::from_file(kek_file)?;
            let options = cfg.etcd_options();
            let store = EtcdStore::open(&options, &cfg.prefix, kek).with_context(|| {
                format!(
                    "cannot open the etcd store at {} (prefix {})",
                    cfg.endpoints.join(", "),
                    cfg.prefix
                )
            })?;
            tracing::info!(endpoints = %cfg.endpoints.join(", "), prefix = %store.prefix(), "state kept in etcd");
            Ok(Arc::new(store))
        }
    }
}

/// What [`EtcdStore::import_from`] copied (records that were absent in etcd), by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Kind (`ca`, `groups`, `tokens`, `agents`, `certs`, `mesh`) → records copied.
    pub copied: BTreeMap<&'static str, usize>,
    /// Kind → records already in etcd (left as they are).
    pub present: BTreeMap<&'static str, usize>,
}

impl EtcdStore {
    /// Writes `value` at `key` unless the key exists; whether it wrote.
    fn put_if_absent(&self, key: Vec<u8>, value: Vec<u8>) -> Result<bool, StoreError> {
        Ok(self
            .txn(
                vec![Compare::absent(key.clone())],
                vec![Op::put(key, value)],
                Vec::new(),
            )?
            .succeeded)
    }

    /// Copies a single controller's state (`from`, its sled store) into etcd,
    /// idempotently: every record is created only if absent, so running it again (or
    /// after the etcd controllers have started) changes nothing already there. The mesh
    /// state (registry cache, VIPs, history, policies) is copied only while etcd holds
    /// none, its version key last, so an interrupted copy is completed by running again.
    /// A CA in etcd other than `from`'s is an error: the agents' certificates would not
    /// chain to it.
    pub fn import_from(&self, from: &dyn Store) -> Result<ImportReport, StoreError> {
        let mut report = ImportReport::default();
        let mut count = |kind: &'static str, wrote: bool| {
            *if wrote {
                report.copied.entry(kind)
            } else {
                report.present.entry(kind)
            }
            .or_default() += 1;
        };
        if let Some(ca) = from.ca()? {
            let existed = self.get(self.key("ca", "current"))?.is_some();
            let in_force = self.init_ca(&ca)?;
            if in_force.fingerprint != ca.fingerprint {
                return Err(StoreError::Conflict(format!(
                    "etcd already holds another CA (fingerprint {}) than the sled store (fingerprint {}): the agents' certificates would not chain to it; use another [store] prefix, or remove {}ca/ from etcd if that CA is unused",
                    in_force.fingerprint, ca.fingerprint, self.prefix
                )));
            }
            count("ca", !existed);
        }
        for g in from.groups()? {
            count(
                "groups",
                self.put_if_absent(self.key("groups", &g.group.name), encode(&g))?,
            );
        }
        for t in from.tokens()? {
            count(
                "tokens",
                self.put_if_absent(self.key("tokens", &t.id), encode(&t))?,
            );
        }
        for a in from.agents()? {
            count(
                "agents",
                self.put_if_absent(self.key("agents", &a.id), encode(&a))?,
            );
        }
        for c in from.certs()? {
            count(
                "certs",
                self.put_if_absent(self.key("certs", &c.serial), encode(&c))?,
            );
        }
        let vkey = self.key("mesh", "version");
        if self.get(vkey.clone())?.is_some() {
            count("mesh", false);
        } else {
            let dump = from.load_mesh()?;
            let mut ops = Vec::new();
            for (name, rec) in &dump.sources {
                ops.push(Op::put(self.key("mesh/sources", name), encode(rec)));
            }
            for (source, services) in &dump.data {
                for (key, eps) in services {
                    ops.push(Op::put(
                        self.key("mesh/data", &format!("{source}\0{key}")),
                        encode(eps),
                    ));
                }
            }
            for (key, ip) in &dump.vips {
                ops.push(Op::put(self.key("mesh/vips", &key.to_string()), encode(ip)));
            }
            for (version, h) in &dump.history {
                for (i, part) in history_parts(h).into_iter().enumerate() {
                    ops.push(Op::put(
                        self.key("mesh", &format!("history/{version:020}/{i:04}")),
                        part,
                    ));
                }
            }
            for (key, rec) in &dump.routes {
                ops.push(Op::put(self.key("mesh/routes", key), encode(rec)));
            }
            for (key, rec) in &dump.policies {
                ops.push(Op::put(self.key("mesh/policies", key), encode(rec)));
            }
            let mut batch = Vec::new();
            let mut bytes = 0;
            for op in ops {
                let size = op_bytes(&op);
                if !batch.is_empty() && (batch.len() >= MAX_TXN_OPS || bytes + size > MAX_TXN_BYTES)
                {
                    // The version key is still absent: nobody else writes the mesh yet.
                    self.txn(
                        vec![Compare::absent(vkey.clone())],
                        std::mem::take(&mut batch),
                        Vec::new(),
                    )?;
                    bytes = 0;
                }
                bytes += size;
                batch.push(op);
            }
            batch.push(Op::put(vkey.clone(), encode(&dump.version)));
            let wrote = self
                .txn(vec![Compare::absent(vkey.clone())], batch, Vec::new())?
                .succeeded;
            *self.mesh_rev.lock().unwrap_or_else(|p| p.into_inner()) = None;
            count("mesh", wrote);
        }
        Ok(report)
    }

    /// Compares etcd's state with `from`'s: one line per difference (empty: the same).
    pub fn differences_from(&self, from: &dyn Store) -> Result<Vec<String>, StoreError> {
        fn diff<T: PartialEq + Serialize>(
            out: &mut Vec<String>,
            kind: &str,
            sled: Vec<(String, T)>,
            etcd: Vec<(String, T)>,
        ) {
            let etcd: BTreeMap<String, T> = etcd.into_iter().collect();
            let mut seen = BTreeSet::new();
            for (id, rec) in sled {
                match etcd.get(&id) {
                    None => out.push(format!("{kind} {id:?}: in sled, not in etcd")),
                    Some(e) if *e != rec => out.push(format!(
                        "{kind} {id:?} differs: sled {} / etcd {}",
                        String::from_utf8_lossy(&encode(&rec)),
                        String::from_utf8_lossy(&encode(e))
                    )),
                    Some(_) => {}
                }
                seen.insert(id);
            }
            for id in etcd.keys().filter(|id| !seen.contains(*id)) {
                out.push(format!("{kind} {id:?}: in etcd, not in sled"));
            }
        }
        let mut out = Vec::new();
        match (from.ca()?, self.ca()?) {
            (a, b) if a == b => {}
            (a, b) => out.push(format!(
                "ca differs: sled {:?} / etcd {:?}",
                a.map(|c| c.fingerprint),
                b.map(|c| c.fingerprint)
            )),
        }
        let by = |v: Vec<GroupRecord>| v.into_iter().map(|g| (g.group.name.clone(), g)).collect();
        diff(&mut out, "group", by(from.groups()?), by(self.groups()?));
        let by = |v: Vec<TokenRecord>| v.into_iter().map(|t| (t.id.clone(), t)).collect();
        diff(&mut out, "token", by(from.tokens()?), by(self.tokens()?));
        let by = |v: Vec<AgentRecord>| v.into_iter().map(|a| (a.id.clone(), a)).collect();
        diff(&mut out, "agent", by(from.agents()?), by(self.agents()?));
        let by = |v: Vec<CertRecord>| v.into_iter().map(|c| (c.serial.clone(), c)).collect();
        diff(&mut out, "cert", by(from.certs()?), by(self.certs()?));
        let (a, b) = (from.load_mesh()?, self.load_mesh()?);
        if a.version != b.version {
            out.push(format!(
                "mesh version differs: sled {} / etcd {}",
                a.version, b.version
            ));
        }
        let pairs = |m: BTreeMap<String, SourceRecord>| m.into_iter().collect();
        diff(
            &mut out,
            "registry source",
            pairs(a.sources),
            pairs(b.sources),
        );
        let flat = |m: BTreeMap<String, BTreeMap<ServiceKey, ServiceEndpoints>>| {
            m.into_iter()
                .flat_map(|(s, svcs)| {
                    svcs.into_iter()
                        .map(move |(k, eps)| (format!("{s}/{k}"), eps))
                })
                .collect()
        };
        diff(&mut out, "registry data", flat(a.data), flat(b.data));
        let vips = |m: BTreeMap<ServiceKey, Ipv4Addr>| {
            m.into_iter().map(|(k, ip)| (k.to_string(), ip)).collect()
        };
        diff(&mut out, "vip", vips(a.vips), vips(b.vips));
        let hist = |m: BTreeMap<u64, HistoryRecord>| {
            m.into_iter().map(|(v, h)| (v.to_string(), h)).collect()
        };
        diff(&mut out, "history", hist(a.history), hist(b.history));
        let pol = |m: BTreeMap<String, PolicyRecord>| m.into_iter().collect();
        diff(&mut out, "policy", pol(a.policies), pol(b.policies));
        let rt = |m: BTreeMap<String, RouteRecord>| m.into_iter().collect();
        diff(&mut out, "route", rt(a.routes), rt(b.routes));
        Ok(out)
    }
}

/// `causeway-controller migrate --from-sled DIR --to-etcd [--check]`: copies (or with
/// `check`, compares) a sled store into the etcd that `cfg` names. Returns the text to
/// print; with `check`, an error when the two differ.
pub fn migrate_command(
    from_sled: &Path,
    cfg: &crate::config::StoreConfig,
    check: bool,
) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let mut errors = Vec::new();
    let mut etcd_cfg = cfg.clone();
    etcd_cfg.backend = crate::config::StoreBackend::Etcd;
    etcd_cfg.problems(&mut errors);
    if !errors.is_empty() {
        anyhow::bail!(
            "migrate --to-etcd needs the etcd settings ([store] in --config, or --endpoints and --kek-file):\n  - {}",
            errors.join("\n  - ")
        );
    }
    let store_dir = if from_sled.join("store").join("db").exists() {
        from_sled.join("store")
    } else {
        from_sled.to_owned()
    };
    if !store_dir.join("db").exists() {
        anyhow::bail!(
            "--from-sled {}: no sled store there (expected {}/db or {}/store/db); give the controller's data dir",
            from_sled.display(),
            store_dir.display(),
            from_sled.display()
        );
    }
    let sled = crate::store::SledStore::open(&store_dir).with_context(|| {
        format!(
            "cannot open the sled store at {} (stop the controller that uses it first)",
            store_dir.display()
        )
    })?;
    let kek = Kek::from_file(etcd_cfg.kek_file.as_deref().expect("validated"))?;
    let options = etcd_cfg.etcd_options();
    let etcd = EtcdStore::open(&options, &etcd_cfg.prefix, kek)?;
    if check {
        let diffs = etcd.differences_from(&sled)?;
        if diffs.is_empty() {
            return Ok(format!(
                "sled store {} and etcd ({}, prefix {}) hold the same state\n",
                store_dir.display(),
                etcd_cfg.endpoints.join(", "),
                etcd.prefix()
            ));
        }
        anyhow::bail!(
            "sled store {} and etcd (prefix {}) differ in {} record(s):\n  - {}",
            store_dir.display(),
            etcd.prefix(),
            diffs.len(),
            diffs.join("\n  - ")
        );
    }
    let report = etcd.import_from(&sled)?;
    let mut text = format!(
        "migrated {} into etcd ({}, prefix {}):\n",
        store_dir.display(),
        etcd_cfg.endpoints.join(", "),
        etcd.prefix()
    );
    for kind in ["ca", "groups", "tokens", "agents", "certs", "mesh"] {
        text.push_str(&format!(
            "  {kind}: {} copied, {} already there\n",
            report.copied.get(kind).unwrap_or(&0),
            report.present.get(kind).unwrap_or(&0)
        ));
    }
    Ok(text)
}
