//! A small etcd v3 client over etcd's own JSON gateway (`/v3/kv/*`, `/v3/lease/*`,
//! `/v3/watch`), for the HA store (issue 23).
//!
//! Why the gateway and not gRPC: etcd serves the same v3 API as JSON on its client port
//! (grpc-gateway, on by default since 3.3), so the controller talks to it with the HTTP
//! client already in the tree — no protobuf stubs, no protoc, no tonic — and every request
//! is readable with `curl`. Values are base64 and 64-bit numbers are strings on the wire
//! (proto3's JSON mapping); both are hidden here.
//!
//! What it offers is what the store needs: range reads, transactions with compares (the
//! only write primitive the store uses, so every write is a compare-and-swap), leases, a
//! watch stream that resumes from a revision, and a fenced leader election built from
//! them: a leader key held by a lease, created only if absent; the key's create revision
//! is the fencing token that every leader write compares, so a leader that lost its lease
//! (paused, partitioned) cannot write after another one took over.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Client URLs (`http://10.0.0.9:2379`), tried in turn.
    pub endpoints: Vec<String>,
    /// Time limit for one request (not for watches).
    pub request_timeout: Duration,
    /// Time limit for connecting to one endpoint.
    pub dial_timeout: Duration,
    /// PEM CA bundle that etcd's server certificates chain to (`https://` endpoints);
    /// `None`: the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate chain presented to etcd (`--client-cert-auth`), with
    /// `key_file`.
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<std::path::PathBuf>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            request_timeout: Duration::from_secs(5),
            dial_timeout: Duration::from_secs(2),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

fn read_pem(key: &str, path: &std::path::Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|e| {
        EtcdError::Config(format!(
            "[store] {key} = {:?}: cannot read it ({e})",
            path.display()
        ))
    })
}

/// Why an etcd request failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered.
    #[error(
        "etcd is unreachable: tried {endpoints} ({last}); check that etcd runs and that [store] endpoints lists its client URLs"
    )]
    Unavailable {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// The last endpoint's error.
        last: String,
    },
    /// etcd answered with an error.
    #[error("etcd refused {what}: {message} (gRPC code {code})")]
    Refused {
        /// The request.
        what: &'static str,
        /// gRPC status code.
        code: i64,
        /// etcd's message.
        message: String,
    },
    /// etcd's answer could not be read.
    #[error("etcd's answer to {what} could not be read: {detail}")]
    Decode {
        /// The request.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// A configuration value is wrong.
    #[error("{0}")]
    Config(String),
}

fn i64_from_json<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => s.parse().map_err(serde::de::Error::custom),
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| serde::de::Error::custom("not an int64")),
        Value::Null => Ok(0),
        other => Err(serde::de::Error::custom(format!(
            "expected an int64, got {other}"
        ))),
    }
}

fn bytes_from_json<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = Option::<String>::deserialize(d)?.unwrap_or_default();
    B64.decode(s.as_bytes()).map_err(serde::de::Error::custom)
}

/// Response header: the store revision the answer reflects.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Header {
    /// The store revision.
    #[serde(default, deserialize_with = "i64_from_json")]
    pub revision: i64,
}

/// One key and its value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct KeyValue {
    /// The key.
    #[serde(default, deserialize_with = "bytes_from_json")]
    pub key: Vec<u8>,
    /// The value.
    #[serde(default, deserialize_with = "bytes_from_json")]
    pub value: Vec<u8>,
    /// Revision of the key's creation.
    #[serde(default, deserialize_with = "i64_from_json")]
    pub create_revision: i64,
    /// Revision of its last change.
    #[serde(default, deserialize_with = "i64_from_json")]
    pub mod_revision: i64,
    /// Changes since creation.
    #[serde(default, deserialize_with = "i64_from_json")]
    pub version: i64,
    /// The lease holding it (0: none).
    #[serde(default, deserialize_with = "i64_from_json")]
    pub lease: i64,
}

/// A range read's answer.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RangeResponse {
    /// Header.
    #[serde(default)]
    pub header: Header,
    /// The keys found (up to the limit).
    #[serde(default)]
    pub kvs: Vec<KeyValue>,
    /// Whether more keys matched than were returned.
    #[serde(default)]
    pub more: bool,
    /// How many keys matched.
    #[serde(default, deserialize_with = "i64_from_json")]
    pub count: i64,
}

/// What a compare looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The key's create revision (0: absent).
    CreateRevision(i64),
    /// The key's last modification revision.
    ModRevision(i64),
    /// The key's version (0: absent).
    Version(i64),
    /// The key's value.
    Value(Vec<u8>),
}

/// A compare's operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    /// Equal.
    Equal,
    /// Not equal.
    NotEqual,
    /// Less than.
    Less,
    /// Greater than.
    Greater,
}

/// One compare of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    /// The key.
    pub key: Vec<u8>,
    /// The operator.
    pub op: CmpOp,
    /// What is compared, with the value to compare to.
    pub target: Target,
}

impl Compare {
    /// The key is absent.
    pub fn absent(key: impl Into<Vec<u8>>) -> Compare {
        Compare {
            key: key.into(),
            op: CmpOp::Equal,
            target: Target::CreateRevision(0),
        }
    }

    /// The key was last changed at `revision` (0: absent).
    pub fn unchanged_since(key: impl Into<Vec<u8>>, revision: i64) -> Compare {
        Compare {
            key: key.into(),
            op: CmpOp::Equal,
            target: Target::ModRevision(revision),
        }
    }

    /// The key was created at `revision` (a fencing token).
    pub fn created_at(key: impl Into<Vec<u8>>, revision: i64) -> Compare {
        Compare {
            key: key.into(),
            op: CmpOp::Equal,
            target: Target::CreateRevision(revision),
        }
    }

    fn to_json(&self) -> Value {
        let result = match self.op {
            CmpOp::Equal => "EQUAL",
            CmpOp::NotEqual => "NOT_EQUAL",
            CmpOp::Less => "LESS",
            CmpOp::Greater => "GREATER",
        };
        let mut v = json!({"key": B64.encode(&self.key), "result": result});
        match &self.target {
            Target::CreateRevision(r) => {
                v["target"] = "CREATE".into();
                v["create_revision"] = r.to_string().into();
            }
            Target::ModRevision(r) => {
                v["target"] = "MOD".into();
                v["mod_revision"] = r.to_string().into();
            }
            Target::Version(r) => {
                v["target"] = "VERSION".into();
                v["version"] = r.to_string().into();
            }
            Target::Value(b) => {
                v["target"] = "VALUE".into();
                v["value"] = B64.encode(b).into();
            }
        }
        v
    }
}

/// One operation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write a key (lease 0: none).
    Put {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
        /// Lease.
        lease: i64,
    },
    /// Delete one key.
    Delete {
        /// Key.
        key: Vec<u8>,
    },
    /// Delete every key in `[key, range_end)`.
    DeleteRange {
        /// First key.
        key: Vec<u8>,
        /// The first key after the range.
        range_end: Vec<u8>,
    },
    /// Delete every key under a prefix.
    DeletePrefix {
        /// Prefix.
        prefix: Vec<u8>,
    },
    /// Read one key.
    Get {
        /// Key.
        key: Vec<u8>,
    },
}

impl Op {
    /// A put without lease.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Op::Put { key, value, lease } => {
                let mut p = json!({"key": B64.encode(key), "value": B64.encode(value)});
                if *lease != 0 {
                    p["lease"] = lease.to_string().into();
                }
                json!({ "request_put": p })
            }
            Op::Delete { key } => json!({"request_delete_range": {"key": B64.encode(key)}}),
            Op::DeleteRange { key, range_end } => json!({"request_delete_range": {
                "key": B64.encode(key),
                "range_end": B64.encode(range_end),
            }}),
            Op::DeletePrefix { prefix } => json!({"request_delete_range": {
                "key": B64.encode(prefix),
                "range_end": B64.encode(prefix_end(prefix)),
            }}),
            Op::Get { key } => json!({"request_range": {"key": B64.encode(key)}}),
        }
    }
}

/// The first key after every key that starts with `prefix` (etcd's `range_end`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or empty): the whole key space from the prefix on.
    vec![0]
}

/// A transaction's answer.
#[derive(Clone, Debug, Default)]
pub struct TxnResponse {
    /// The store revision after the transaction.
    pub revision: i64,
    /// Whether the compares held (the success branch ran).
    pub succeeded: bool,
    /// The keys read by `Get` operations of the branch that ran, in order.
    pub reads: Vec<Vec<KeyValue>>,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Written.
    Put(KeyValue),
    /// Deleted (`mod_revision` is the deletion's revision).
    Delete(KeyValue),
}

/// A batch of changes at one revision or a few.
#[derive(Clone, Debug, Default)]
pub struct WatchBatch {
    /// The revision the batch brings the watcher to.
    pub revision: i64,
    /// The changes, in revision order.
    pub events: Vec<Event>,
}

/// An etcd client over the JSON gateway.
pub struct Etcd {
    http: reqwest::Client,
    endpoints: Vec<String>,
    /// The endpoint that answered last (tried first).
    current: AtomicUsize,
    request_timeout: Duration,
}

impl fmt::Debug for Etcd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

#[derive(Deserialize)]
struct GatewayError {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
    #[serde(default)]
    error: String,
}

impl Etcd {
    /// A client for `options.endpoints` (each `http://host:port` or `https://host:port`).
    pub fn new(options: &EtcdOptions) -> Result<Etcd, EtcdError> {
        if options.endpoints.is_empty() {
            return Err(EtcdError::Config(
                "[store] endpoints is empty: list etcd's client URLs, e.g. [\"http://10.0.0.9:2379\"]"
                    .to_owned(),
            ));
        }
        let mut endpoints = Vec::new();
        for e in &options.endpoints {
            let url = reqwest::Url::parse(e).map_err(|err| {
                EtcdError::Config(format!(
                    "[store] endpoints: {e:?} is not a URL ({err}); write it as http://HOST:2379"
                ))
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(EtcdError::Config(format!(
                    "[store] endpoints: {e:?} is not an http:// or https:// client URL; write it as http://HOST:2379"
                )));
            }
            endpoints.push(e.trim_end_matches('/').to_owned());
        }
        // reqwest is built without a default crypto provider; ring is the tree's one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(options.dial_timeout)
            .pool_idle_timeout(Duration::from_secs(30));
        if let Some(path) = &options.ca_file {
            let certs = reqwest::Certificate::from_pem_bundle(&read_pem("ca_file", path)?)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    EtcdError::Config(format!(
                        "[store] ca_file = {:?}: no PEM certificate in it; give the CA that signed etcd's server certificates",
                        path.display()
                    ))
                })?;
            builder = builder.tls_certs_only(certs);
        }
        match (&options.cert_file, &options.key_file) {
            (Some(cert), Some(key)) => {
                let mut pem = read_pem("cert_file", cert)?;
                pem.push(b'\n');
                pem.extend(read_pem("key_file", key)?);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    EtcdError::Config(format!(
                        "[store] cert_file = {:?} and key_file = {:?} are not a PEM certificate chain and its private key ({e})",
                        cert.display(),
                        key.display()
                    ))
                })?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => {
                return Err(EtcdError::Config(
                    "[store] cert_file and key_file go together; set both or neither".to_owned(),
                ));
            }
        }
        let http = builder
            .build()
            .map_err(|e| EtcdError::Config(format!("etcd client: {e}")))?;
        Ok(Etcd {
            http,
            endpoints,
            current: AtomicUsize::new(0),
            request_timeout: options.request_timeout,
        })
    }

    /// The configured endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Sends one request to the first endpoint that answers, starting with the one that
    /// answered last. A connection failure moves on to the next endpoint; an answer (even
    /// an error) does not.
    async fn call(
        &self,
        what: &'static str,
        path: &str,
        body: &Value,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, EtcdError> {
        let n = self.endpoints.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut last = String::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let url = format!("{}{}", self.endpoints[idx], path);
            let mut req = self.http.post(&url).json(body);
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            match req.send().await {
                Ok(resp) => {
                    self.current.store(idx, Ordering::Relaxed);
                    if resp.status().is_success() {
                        return Ok(resp);
                    }
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    let err: Option<GatewayError> = serde_json::from_str(&text).ok();
                    let (code, message) = match err {
                        Some(e) => (
                            e.code,
                            if e.message.is_empty() {
                                e.error
                            } else {
                                e.message
                            },
                        ),
                        None => (-1, format!("HTTP {status}: {}", text.trim())),
                    };
                    // 14 = UNAVAILABLE (no leader, member stopping): try another member.
                    if code == 14 {
                        last = format!("{}: {message}", self.endpoints[idx]);
                        continue;
                    }
                    return Err(EtcdError::Refused {
                        what,
                        code,
                        message,
                    });
                }
                Err(e) => {
                    last = format!("{}: {}", self.endpoints[idx], crate_error_chain(&e));
                }
            }
        }
        Err(EtcdError::Unavailable {
            endpoints: self.endpoints.join(", "),
            last,
        })
    }

    async fn unary<T: for<'de> Deserialize<'de>>(
        &self,
        what: &'static str,
        path: &str,
        body: Value,
    ) -> Result<T, EtcdError> {
        let resp = self
            .call(what, path, &body, Some(self.request_timeout))
            .await?;
        let bytes = resp.bytes().await.map_err(|e| EtcdError::Unavailable {
            endpoints: self.endpoints.join(", "),
            last: crate_error_chain(&e),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| EtcdError::Decode {
            what,
            detail: e.to_string(),
        })
    }

    /// Reads one key.
    pub async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let r: RangeResponse = self
            .unary("a read", "/v3/kv/range", json!({"key": B64.encode(key)}))
            .await?;
        Ok(r.kvs.into_iter().next())
    }

    /// Reads every key under `prefix`, sorted by key, at one revision (`revision` 0: the
    /// latest), `limit` 0 for all.
    pub async fn get_prefix(
        &self,
        prefix: &[u8],
        revision: i64,
        limit: i64,
    ) -> Result<RangeResponse, EtcdError> {
        self.range(prefix, &prefix_end(prefix), revision, limit)
            .await
    }

    /// Reads the keys in `[key, range_end)`, sorted by key, at one revision (`revision`
    /// 0: the latest), `limit` 0 for all: pages of a large prefix resume from the last
    /// key read (plus a zero byte) at the first page's revision.
    pub async fn range(
        &self,
        key: &[u8],
        range_end: &[u8],
        revision: i64,
        limit: i64,
    ) -> Result<RangeResponse, EtcdError> {
        let mut body = json!({
            "key": B64.encode(key),
            "range_end": B64.encode(range_end),
        });
        if revision > 0 {
            body["revision"] = revision.to_string().into();
        }
        if limit > 0 {
            body["limit"] = limit.to_string().into();
        }
        self.unary("a prefix read", "/v3/kv/range", body).await
    }

    /// Writes one key unconditionally (tests and bootstrap; the store writes through
    /// [`Etcd::txn`]).
    pub async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let mut body = json!({"key": B64.encode(key), "value": B64.encode(value)});
        if lease != 0 {
            body["lease"] = lease.to_string().into();
        }
        let r: Value = self.unary("a write", "/v3/kv/put", body).await?;
        revision_of(&r, "a write")
    }

    /// Runs a transaction: if every compare holds, `success`, else `failure`.
    pub async fn txn(
        &self,
        compares: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResponse, EtcdError> {
        let body = json!({
            "compare": compares.iter().map(Compare::to_json).collect::<Vec<_>>(),
            "success": success.iter().map(Op::to_json).collect::<Vec<_>>(),
            "failure": failure.iter().map(Op::to_json).collect::<Vec<_>>(),
        });
        let r: Value = self.unary("a transaction", "/v3/kv/txn", body).await?;
        let revision = revision_of(&r, "a transaction")?;
        let succeeded = r.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        let mut reads = Vec::new();
        for resp in r
            .get("responses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(range) = resp.get("response_range") {
                let range: RangeResponse =
                    serde_json::from_value(range.clone()).map_err(|e| EtcdError::Decode {
                        what: "a transaction",
                        detail: e.to_string(),
                    })?;
                reads.push(range.kvs);
            }
        }
        Ok(TxnResponse {
            revision,
            succeeded,
            reads,
        })
    }

    /// Grants a lease of `ttl`; returns its id and the TTL etcd granted.
    pub async fn lease_grant(&self, ttl: Duration) -> Result<(i64, Duration), EtcdError> {
        let secs = ttl.as_secs().max(1);
        let r: Value = self
            .unary(
                "a lease grant",
                "/v3/lease/grant",
                json!({"TTL": secs.to_string()}),
            )
            .await?;
        let id = int_field(&r, "ID", "a lease grant")?;
        let granted = int_field(&r, "TTL", "a lease grant")?;
        Ok((id, Duration::from_secs(granted.max(0) as u64)))
    }

    /// Renews a lease once; `None` when it has expired (or never existed).
    pub async fn lease_keep_alive(&self, id: i64) -> Result<Option<Duration>, EtcdError> {
        let r: Value = self
            .unary(
                "a lease renewal",
                "/v3/lease/keepalive",
                json!({"ID": id.to_string()}),
            )
            .await?;
        let result = r.get("result").unwrap_or(&r);
        let ttl = match result.get("TTL") {
            None => 0,
            Some(_) => int_field(result, "TTL", "a lease renewal")?,
        };
        Ok((ttl > 0).then(|| Duration::from_secs(ttl as u64)))
    }

    /// Revokes a lease (its keys are deleted).
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        let _: Value = self
            .unary(
                "a lease revoke",
                "/v3/lease/revoke",
                json!({"ID": id.to_string()}),
            )
            .await?;
        Ok(())
    }

    /// Watches every key under `prefix` from `start_revision` (inclusive; 0: from now).
    pub async fn watch_prefix(
        &self,
        prefix: &[u8],
        start_revision: i64,
    ) -> Result<Watch, EtcdError> {
        let mut create = json!({
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
        });
        if start_revision > 0 {
            create["start_revision"] = start_revision.to_string().into();
        }
        let resp = self
            .call(
                "a watch",
                "/v3/watch",
                &json!({"create_request": create}),
                None,
            )
            .await?;
        Ok(Watch {
            resp,
            buf: Vec::new(),
            created: false,
        })
    }
}

fn crate_error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    causeway_api::error_chain(e)
}

fn int_field(v: &Value, field: &str, what: &'static str) -> Result<i64, EtcdError> {
    let f = v.get(field).ok_or_else(|| EtcdError::Decode {
        what,
        detail: format!("no {field} in {v}"),
    })?;
    i64_from_json(f.clone()).map_err(|e| EtcdError::Decode {
        what,
        detail: format!("{field}: {e}"),
    })
}

fn revision_of(v: &Value, what: &'static str) -> Result<i64, EtcdError> {
    let header: Header = serde_json::from_value(v.get("header").cloned().unwrap_or_default())
        .map_err(|e| EtcdError::Decode {
            what,
            detail: e.to_string(),
        })?;
    Ok(header.revision)
}

/// A running watch: batches of changes in revision order.
pub struct Watch {
    resp: reqwest::Response,
    buf: Vec<u8>,
    created: bool,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    kv: KeyValue,
}

#[derive(Deserialize)]
struct RawWatchResult {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    created: bool,
    #[serde(default)]
    canceled: bool,
    #[serde(default)]
    cancel_reason: String,
    #[serde(default, deserialize_with = "i64_from_json")]
    compact_revision: i64,
    #[serde(default)]
    events: Vec<RawEvent>,
}

#[derive(Deserialize)]
struct RawWatchMessage {
    result: Option<RawWatchResult>,
    error: Option<GatewayError>,
}

impl Watch {
    /// The next batch; `Ok(None)` when etcd closed the stream (reconnect from the last
    /// revision seen + 1). A compacted start revision is an error naming it.
    pub async fn next(&mut self) -> Result<Option<WatchBatch>, EtcdError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                let msg: RawWatchMessage =
                    serde_json::from_slice(line).map_err(|e| EtcdError::Decode {
                        what: "a watch",
                        detail: e.to_string(),
                    })?;
                if let Some(e) = msg.error {
                    return Err(EtcdError::Refused {
                        what: "a watch",
                        code: e.code,
                        message: if e.message.is_empty() {
                            e.error
                        } else {
                            e.message
                        },
                    });
                }
                let Some(r) = msg.result else { continue };
                if r.canceled {
                    return Err(EtcdError::Refused {
                        what: "a watch",
                        code: 11,
                        message: if r.compact_revision > 0 {
                            format!(
                                "the start revision was compacted; the oldest kept is {}",
                                r.compact_revision
                            )
                        } else {
                            format!("canceled: {}", r.cancel_reason)
                        },
                    });
                }
                if r.created && !self.created {
                    self.created = true;
                    if r.events.is_empty() {
                        continue;
                    }
                }
                let events = r
                    .events
                    .into_iter()
                    .map(|e| match e.kind.as_deref() {
                        Some("DELETE") => Event::Delete(e.kv),
                        _ => Event::Put(e.kv),
                    })
                    .collect::<Vec<_>>();
                if events.is_empty() {
                    // Progress notification.
                    continue;
                }
                return Ok(Some(WatchBatch {
                    revision: r.header.revision,
                    events,
                }));
            }
            match self.resp.chunk().await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) => return Ok(None),
                Err(e) => {
                    return Err(EtcdError::Unavailable {
                        endpoints: "the watch's endpoint".to_owned(),
                        last: crate_error_chain(&e),
                    });
                }
            }
        }
    }
}

/// Leadership held through a leased key; the key's create revision fences writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leadership {
    /// The leader key.
    pub key: Vec<u8>,
    /// The lease holding it.
    pub lease: i64,
    /// The key's create revision: every leader write compares it.
    pub fence: i64,
}

impl Leadership {
    /// The compare that a leader's writes carry: the leader key still exists at the
    /// revision this leader created it. A leader whose lease expired fails it.
    pub fn fence(&self) -> Compare {
        Compare::created_at(self.key.clone(), self.fence)
    }
}

impl Etcd {
    /// Tries once to become leader: creates `key` = `value` under `lease` if absent.
    /// `Ok(None)` when another holder has it (its value is returned by [`Etcd::get`]).
    pub async fn try_lead(
        &self,
        key: &[u8],
        value: &[u8],
        lease: i64,
    ) -> Result<Option<Leadership>, EtcdError> {
        let r = self
            .txn(
                &[Compare::absent(key)],
                &[Op::Put {
                    key: key.to_vec(),
                    value: value.to_vec(),
                    lease,
                }],
                &[],
            )
            .await?;
        Ok(r.succeeded.then(|| Leadership {
            key: key.to_vec(),
            lease,
            fence: r.revision,
        }))
    }
}

/// Serialises a value for etcd (JSON): one place, so the encoding can change later.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serialising a store record cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_that_can_be() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn compares_and_ops_use_the_gateway_field_names() {
        let c = Compare::absent("k").to_json();
        assert_eq!(c["target"], "CREATE");
        assert_eq!(c["create_revision"], "0");
        assert_eq!(c["key"], B64.encode("k"));
        let v = Compare {
            key: b"k".to_vec(),
            op: CmpOp::Less,
            target: Target::Value(b"v".to_vec()),
        }
        .to_json();
        assert_eq!(
            (v["result"].as_str(), v["target"].as_str()),
            (Some("LESS"), Some("VALUE"))
        );
        let p = Op::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            lease: 7,
        }
        .to_json();
        assert_eq!(p["request_put"]["lease"], "7");
        let d = Op::DeletePrefix {
            prefix: b"/p/".to_vec(),
        }
        .to_json();
        assert_eq!(d["request_delete_range"]["range_end"], B64.encode("/p0"));
    }

    #[test]
    fn int64_as_string_number_or_absent() {
        let kv: KeyValue = serde_json::from_str(
            r#"{"key":"Zm9v","create_revision":"2","mod_revision":3,"value":"YmFy"}"#,
        )
        .unwrap();
        assert_eq!(
            (
                kv.key.as_slice(),
                kv.value.as_slice(),
                kv.create_revision,
                kv.mod_revision,
                kv.version
            ),
            (&b"foo"[..], &b"bar"[..], 2, 3, 0)
        );
        assert!(serde_json::from_str::<KeyValue>(r#"{"create_revision":"x"}"#).is_err());
        assert!(serde_json::from_str::<KeyValue>(r#"{"key":"***"}"#).is_err());
    }

    #[test]
    fn bad_endpoints_are_named() {
        for (endpoints, want) in [
            (vec![], "[store] endpoints is empty"),
            (
                vec!["localhost:2379".to_owned()],
                "not an http:// or https://",
            ),
            (vec!["http//x".to_owned()], "is not a URL"),
        ] {
            let e = Etcd::new(&EtcdOptions {
                endpoints,
                ..EtcdOptions::default()
            })
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
