//! The agent's side of the control endpoint: join (server-authenticated by the pinned CA)
//! and renewal (mutual TLS with the current certificate), over QUIC.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use causeway_api::wire::{
    self, ClientRequest, ErrorCode, Issued, JoinRequest, RenewRequest, ServerResponse,
    client_request, server_response,
};
use causeway_api::{JoinToken, hex, pem};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::{AgentInfo, Identity, IdentityError, StateDir, new_key_and_csr};
use crate::pinned::PinnedCa;

/// The name the controller's certificate carries.
pub const SERVER_NAME: &str = "causeway-controller";
/// ALPN of the control protocol.
pub const ALPN: &[u8] = b"causeway-control/1";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive interval of the control connection (see [`connect_to`]).
const CONTROL_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// Idle timeout of the control connection: no packet from the controller for this
/// long and the agent moves to another controller.
const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Why talking to the controller failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The controller address did not resolve.
    #[error("cannot resolve controller address {addr:?}: {message}")]
    Resolve {
        /// The address.
        addr: String,
        /// Why.
        message: String,
    },
    /// No QUIC connection could be made.
    #[error("cannot connect to the controller at {addr}: {message}")]
    Connect {
        /// The address.
        addr: String,
        /// Why, with what to do.
        message: String,
    },
    /// The controller answered with a refusal.
    #[error("the controller refused the request ({code:?}): {message}")]
    Refused {
        /// The code.
        code: ErrorCode,
        /// The controller's message.
        message: String,
    },
    /// The exchange broke off or the answer was unreadable.
    #[error("control protocol error with {addr}: {message}")]
    Protocol {
        /// The address.
        addr: String,
        /// What happened.
        message: String,
    },
    /// Local identity files.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The host already joined.
    #[error(
        "this host already joined as agent {agent_id} ({spiffe_id}) in {dir}; pass --force to join again with a new key"
    )]
    AlreadyJoined {
        /// Existing agent id.
        agent_id: String,
        /// Existing identity.
        spiffe_id: String,
        /// State dir.
        dir: String,
    },
}

impl ClientError {
    /// Whether retrying later may help (network trouble) or not (a refusal).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Resolve { .. } | Self::Connect { .. } | Self::Protocol { .. } => true,
            Self::Refused { code, .. } => *code == ErrorCode::Internal,
            Self::Identity(_) | Self::AlreadyJoined { .. } => false,
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Looks a controller's `host:port` up: every address it has, IPv4 and IPv6 (a DNS name
/// with several A/AAAA records names several controllers of an HA set).
pub trait Resolver: Send + Sync + std::fmt::Debug {
    /// The addresses of `host_port`, in the resolver's order.
    fn lookup<'a>(
        &'a self,
        host_port: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// The system's resolver (`getaddrinfo`: /etc/hosts, DNS), asked again on every
/// connection round so a changed record is followed.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup<'a>(
        &'a self,
        host_port: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move { Ok(tokio::net::lookup_host(host_port).await?.collect()) })
    }
}

/// One address to try: the configured `host:port` it came from and what it resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The entry as configured (`controllers`, `controller` or the join token's address).
    pub entry: String,
    /// One of its addresses.
    pub addr: SocketAddr,
}

impl Candidate {
    /// How the candidate is shown (status, logs): the entry itself when it is an
    /// address, else `name:port (address)`.
    pub fn label(&self) -> String {
        if self.entry.parse::<SocketAddr>().is_ok() {
            self.entry.clone()
        } else {
            format!("{} ({})", self.entry, self.addr)
        }
    }
}

/// Every address of every entry, in the entries' order: an entry that is an address as
/// it is, a name with each of its addresses (IPv4 first, then IPv6, each in the
/// resolver's order), an address met twice only once. Returns the entries that did not
/// resolve with why, so that the caller can name them when nothing is left.
pub async fn expand(entries: &[String], resolver: &dyn Resolver) -> (Vec<Candidate>, Vec<String>) {
    let mut out: Vec<Candidate> = Vec::new();
    let mut failed = Vec::new();
    for entry in entries {
        let mut addrs = match entry.parse::<SocketAddr>() {
            Ok(a) => vec![a],
            Err(_) => match resolver.lookup(entry).await {
                Ok(a) if !a.is_empty() => a,
                Ok(_) => {
                    failed.push(format!("{entry:?}: the name has no addresses"));
                    continue;
                }
                Err(e) => {
                    failed.push(format!("{entry:?}: {e}"));
                    continue;
                }
            },
        };
        // Stable: IPv4 first (what a controller listening on 0.0.0.0 answers), then IPv6.
        addrs.sort_by_key(SocketAddr::is_ipv6);
        for addr in addrs {
            if !out.iter().any(|c| c.addr == addr) {
                out.push(Candidate {
                    entry: entry.clone(),
                    addr,
                });
            }
        }
    }
    (out, failed)
}

/// Resolves `addr` (`host:port`) to every address it has with the system resolver.
async fn resolve_all(addr: &str) -> Result<Vec<Candidate>, ClientError> {
    let (cands, failed) = expand(&[addr.to_owned()], &SystemResolver).await;
    if cands.is_empty() {
        return Err(ClientError::Resolve {
            addr: addr.to_owned(),
            message: failed.join("; "),
        });
    }
    Ok(cands)
}

/// Connects to the first address of `addr` that answers (a name with several addresses
/// is several controllers); a failure another address cannot fix ends it at once.
async fn connect(
    addr: &str,
    tls: rustls::ClientConfig,
    pinned: Option<&PinnedCa>,
) -> Result<quinn::Connection, ClientError> {
    let cands = resolve_all(addr).await?;
    let n = cands.len();
    let mut failures = Vec::new();
    for c in &cands {
        match connect_to(&c.label(), c.addr, tls.clone(), pinned).await {
            Ok(conn) => return Ok(conn),
            Err(e) if n == 1 || !e.is_retryable() => return Err(e),
            Err(e) => {
                tracing::warn!(controller = %c.label(), error = %e, "controller address unreachable; trying the next one");
                failures.push(e.to_string());
            }
        }
    }
    Err(ClientError::Connect {
        addr: addr.to_owned(),
        message: format!(
            "none of its {n} addresses answered ({}); check that the controllers run and that UDP reaches them",
            failures.join("; ")
        ),
    })
}

async fn connect_to(
    label: &str,
    target: SocketAddr,
    tls: rustls::ClientConfig,
    pinned: Option<&PinnedCa>,
) -> Result<quinn::Connection, ClientError> {
    let addr = label;
    if let Some(p) = pinned
        && let Ok(mut f) = p.failure.lock()
    {
        // A reason left by an earlier address is not this one's.
        *f = None;
    }
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let connect_err = |message: String| ClientError::Connect {
        addr: addr.to_owned(),
        message,
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| connect_err(e.to_string()))?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| connect_err(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Keep-alives every second and a 4 s idle timeout (the connection's is the lower
    // of the two ends'): an agent whose controller died without a word (`kill -9`, a
    // host gone) moves to another controller about 4 s later, inside an HA set's
    // leader takeover (lease TTL, 10 s by default), instead of after 10 s; the
    // controller likewise notices a dead agent and starts its lease's grace period.
    // Three missed keep-alives in a row are needed to drop a live connection.
    transport.keep_alive_interval(Some(CONTROL_KEEP_ALIVE));
    transport.max_idle_timeout(Some(CONTROL_IDLE_TIMEOUT.try_into().expect("in range")));
    cfg.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(cfg);
    let connecting = endpoint
        .connect(target, SERVER_NAME)
        .map_err(|e| connect_err(e.to_string()))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => Err(connect_err(format!(
            "no answer within {}s; check that the controller runs and UDP {} is reachable",
            CONNECT_TIMEOUT.as_secs(),
            target.port()
        ))),
        Ok(Err(e)) => {
            let pinned_reason = pinned.and_then(|p| p.failure.lock().ok().and_then(|f| f.clone()));
            Err(connect_err(pinned_reason.unwrap_or_else(|| explain(&e))))
        }
        Ok(Ok(conn)) => Ok(conn),
    }
}

/// Turns a QUIC/TLS failure into advice.
pub(crate) fn explain(e: &quinn::ConnectionError) -> String {
    let text = e.to_string();
    if text.contains("CertificateExpired")
        || text.contains("certificate expired")
        || text.contains("Expired")
    {
        format!("{text}: this host's certificate has expired; re-join with a new token")
    } else if [
        "UnknownCA",
        "unknown ca",
        "BadCertificate",
        "bad certificate",
        "invalid peer certificate",
        "UnknownIssuer",
    ]
    .iter()
    .any(|p| text.contains(p))
    {
        format!(
            "{text}: the controller does not accept this host's certificate (issued by another CA?); re-join with a new token"
        )
    } else {
        text
    }
}

/// Sends one request on its own stream and reads the answer.
pub async fn request(conn: &quinn::Connection, req: &ClientRequest) -> Result<Issued, ClientError> {
    let addr = conn.remote_address().to_string();
    let proto = |message: String| ClientError::Protocol {
        addr: addr.clone(),
        message,
    };
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| proto(explain(&e)))?;
        send.write_all(&wire::encode_frame(req))
            .await
            .map_err(|e| proto(e.to_string()))?;
        send.finish().map_err(|e| proto(e.to_string()))?;
        let buf = recv
            .read_to_end(wire::MAX_RESPONSE_FRAME + 4)
            .await
            .map_err(|e| proto(e.to_string()))?;
        wire::decode_frame::<ServerResponse>(&buf, wire::MAX_RESPONSE_FRAME)
            .map_err(|e| proto(e.to_string()))
    };
    let resp = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Err(_) => {
            return Err(proto(format!(
                "no answer within {}s",
                REQUEST_TIMEOUT.as_secs()
            )));
        }
        // In TLS 1.3 the server judges the client certificate after the client thinks the
        // handshake is done: the reason arrives as the connection's close reason.
        Ok(Err(e)) => match conn.close_reason() {
            Some(reason) => return Err(proto(explain(&reason))),
            None => return Err(e),
        },
        Ok(Ok(r)) => r,
    };
    match resp.kind {
        Some(server_response::Kind::Issued(i)) => Ok(i),
        Some(server_response::Kind::Error(e)) => Err(ClientError::Refused {
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            message: e.message,
        }),
        None => Err(proto("empty answer (newer controller?)".into())),
    }
}

fn check_issued(issued: &Issued, addr: &str) -> Result<(), ClientError> {
    if issued.cert_chain_der.is_empty() || issued.trust_bundle_der.is_empty() {
        return Err(ClientError::Protocol {
            addr: addr.to_owned(),
            message: "the answer carries no certificate or no trust bundle".into(),
        });
    }
    Ok(())
}

/// Enrolls this host: new key (kept here), CSR + token → certificate, saved in `state`.
pub async fn join(
    token: &JoinToken,
    state: &StateDir,
    hostname: &str,
    force: bool,
) -> Result<Identity, ClientError> {
    if state.is_joined() && !force {
        let existing = state.load()?;
        return Err(ClientError::AlreadyJoined {
            agent_id: existing.info.agent_id,
            spiffe_id: existing.spiffe_id.to_string(),
            dir: state.path().display().to_string(),
        });
    }
    state.ensure()?;
    let (key, csr_der) = new_key_and_csr()?;
    let conn = connect_pinned(token).await?;
    let req = ClientRequest {
        kind: Some(client_request::Kind::Join(JoinRequest {
            token_id: token.id.clone(),
            secret: token.secret.to_vec(),
            csr_der,
            hostname: hostname.to_owned(),
        })),
    };
    let issued = request(&conn, &req).await?;
    conn.close(0u32.into(), b"done");
    check_issued(&issued, &token.controller)?;
    let info = AgentInfo {
        agent_id: issued.agent_id.clone(),
        controller: token.controller.clone(),
        group: issued.group.clone(),
        spiffe_id: issued.spiffe_id.clone(),
        ca_fingerprint: hex(&token.ca_fingerprint),
        joined_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
            .unwrap_or(0),
    };
    state.save(&key, &issued, &info)?;
    Ok(state.load()?)
}

/// Opens a server-authenticated connection to the controller named by `token`, pinning
/// the token's CA fingerprint.
pub async fn connect_pinned(token: &JoinToken) -> Result<quinn::Connection, ClientError> {
    let pinned = Arc::new(PinnedCa::new(token.ca_fingerprint, provider()));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Protocol {
            addr: token.controller.clone(),
            message: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(pinned.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    connect(&token.controller, tls, Some(&pinned)).await
}

/// The controllers an agent may talk to (`controllers` in agent.toml: an HA set), tried
/// in turn from the one that answered last. An entry may be a DNS name with several
/// addresses: each address is a controller, and the name is resolved again on every
/// connection round, so a changed record is followed. Each controller holds the whole
/// mesh state, and config versions are global to the set, so the push stream resumes
/// from the agent's version on whichever answers.
#[derive(Debug)]
pub struct Controllers {
    list: Vec<String>,
    resolver: Arc<dyn Resolver>,
    cursor: std::sync::Mutex<Cursor>,
}

/// Where the next round starts.
#[derive(Debug, Default)]
struct Cursor {
    /// The address that answered last.
    last: Option<Candidate>,
    /// Start after it (its connection was lost).
    moved: bool,
}

impl Controllers {
    /// `list` in order of preference, resolved with the system's resolver; empty is
    /// treated as one empty address (refused at connect with the resolver's error).
    pub fn new(list: Vec<String>) -> Self {
        Self::with_resolver(list, Arc::new(SystemResolver))
    }

    /// [`Controllers::new`] with another resolver.
    pub fn with_resolver(mut list: Vec<String>, resolver: Arc<dyn Resolver>) -> Self {
        if list.is_empty() {
            list.push(String::new());
        }
        Self {
            list,
            resolver,
            cursor: std::sync::Mutex::new(Cursor::default()),
        }
    }

    fn cursor(&self) -> std::sync::MutexGuard<'_, Cursor> {
        self.cursor.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every controller entry, in order.
    pub fn list(&self) -> &[String] {
        &self.list
    }

    /// The controller that answered last (`name:port (address)` for a name), or the
    /// first entry before any answered.
    pub fn current(&self) -> String {
        self.cursor()
            .last
            .as_ref()
            .map_or_else(|| self.list[0].clone(), Candidate::label)
    }

    /// Moves to the next controller: the connection to the current one was lost, so
    /// the next attempt starts elsewhere (and comes back to it in turn).
    pub fn advance(&self) {
        self.cursor().moved = true;
    }

    /// This round's addresses (every entry resolved now) and the index to start at: the
    /// one that answered last, or the one after it when it was left; the first when it
    /// is no longer among them.
    pub async fn round(&self) -> Result<(Vec<Candidate>, usize), ClientError> {
        let (cands, failed) = expand(&self.list, &*self.resolver).await;
        if cands.is_empty() {
            return Err(ClientError::Resolve {
                addr: self.list.join(", "),
                message: failed.join("; "),
            });
        }
        for f in &failed {
            tracing::warn!(error = %f, "a controller entry does not resolve; trying the others");
        }
        let cursor = self.cursor();
        let start = cursor
            .last
            .as_ref()
            .and_then(|l| cands.iter().position(|c| c == l))
            .map_or(0, |p| if cursor.moved { p + 1 } else { p })
            % cands.len();
        Ok((cands, start))
    }

    /// Opens a mutual-TLS connection to the first controller that answers, starting
    /// with the current one; returns it with the controller's label. A failure that
    /// another controller cannot fix (the local identity files) ends the round at once;
    /// when none answers, the error names each.
    pub async fn connect_mtls(
        &self,
        identity: &Identity,
    ) -> Result<(quinn::Connection, String), ClientError> {
        let (cands, start) = self.round().await?;
        let n = cands.len();
        let tls = mtls_config(identity)?;
        let mut failures = Vec::new();
        for i in 0..n {
            let cand = &cands[(start + i) % n];
            let label = cand.label();
            match connect_to(&label, cand.addr, tls.clone(), None).await {
                Ok(c) => {
                    *self.cursor() = Cursor {
                        last: Some(cand.clone()),
                        moved: false,
                    };
                    return Ok((c, label));
                }
                Err(e) if n == 1 || !e.is_retryable() => return Err(e),
                Err(e) => {
                    tracing::warn!(controller = %label, error = %e, "controller unreachable; trying the next one");
                    failures.push(e.to_string());
                }
            }
        }
        Err(ClientError::Connect {
            addr: cands
                .iter()
                .map(Candidate::label)
                .collect::<Vec<_>>()
                .join(", "),
            message: format!(
                "no controller of the set answered ({}); check that they run and that UDP reaches them",
                failures.join("; ")
            ),
        })
    }
}

/// Opens a mutual-TLS connection to the controller with the current identity.
pub async fn connect_mtls(
    identity: &Identity,
    controller: &str,
) -> Result<quinn::Connection, ClientError> {
    connect(controller, mtls_config(identity)?, None).await
}

/// The TLS client settings of a mutual-TLS connection with the current identity. The
/// controller is checked by its certificate's name ([`SERVER_NAME`]) under the mesh CA,
/// whatever address or DNS name it was reached at.
fn mtls_config(identity: &Identity) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for der in &identity.bundle_der {
        roots.add(CertificateDer::from(der.clone())).map_err(|e| {
            ClientError::Identity(IdentityError::Invalid {
                path: "bundle.pem".into(),
                message: e.to_string(),
            })
        })?;
    }
    let chain: Vec<CertificateDer<'static>> = identity
        .chain_der
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    let key_der = pem::decode_all(&identity.key_pem, "PRIVATE KEY")
        .into_iter()
        .next()
        .ok_or_else(|| IdentityError::Invalid {
            path: "key.pem".into(),
            message: "no PKCS#8 PRIVATE KEY block".into(),
        })?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .and_then(|b| {
            b.with_root_certificates(roots).with_client_auth_cert(
                chain,
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
            )
        })
        .map_err(|e| {
            ClientError::Identity(IdentityError::Invalid {
                path: "cert.pem".into(),
                message: e.to_string(),
            })
        })?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// Renews the certificate over `conn` (mTLS) with a fresh key; saves and returns the new identity.
pub async fn renew(
    conn: &quinn::Connection,
    state: &StateDir,
    current: &Identity,
) -> Result<Identity, ClientError> {
    let (key, csr_der) = new_key_and_csr()?;
    let req = ClientRequest {
        kind: Some(client_request::Kind::Renew(RenewRequest { csr_der })),
    };
    let issued = request(conn, &req).await?;
    check_issued(&issued, &current.info.controller)?;
    let mut info = current.info.clone();
    info.spiffe_id = issued.spiffe_id.clone();
    state.save(&key, &issued, &info)?;
    Ok(state.load()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// A resolver with a fixed answer per name that the test can change.
    #[derive(Debug, Default)]
    struct Fixed(Mutex<HashMap<String, Vec<SocketAddr>>>);

    impl Fixed {
        fn set(&self, name: &str, addrs: &[&str]) {
            self.0.lock().unwrap().insert(
                name.to_owned(),
                addrs.iter().map(|a| a.parse().unwrap()).collect(),
            );
        }
    }

    impl Resolver for Fixed {
        fn lookup<'a>(
            &'a self,
            host_port: &'a str,
        ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>> {
            let answer = self.0.lock().unwrap().get(host_port).cloned();
            Box::pin(async move {
                answer.ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such name")
                })
            })
        }
    }

    fn addrs(c: &[Candidate]) -> Vec<String> {
        c.iter().map(|c| c.addr.to_string()).collect()
    }

    #[tokio::test]
    async fn a_name_expands_to_each_of_its_addresses_ipv4_first() {
        let r = Fixed::default();
        r.set(
            "ctl.mesh.internal:15012",
            &["[fd00::5]:15012", "10.0.0.5:15012", "10.0.0.6:15012"],
        );
        r.set("empty.internal:15012", &[]);
        let entries = [
            "ctl.mesh.internal:15012",
            "10.0.0.6:15012",
            "10.0.0.7:15012",
            "gone.internal:15012",
            "empty.internal:15012",
        ]
        .map(str::to_owned);
        let (cands, failed) = expand(&entries, &r).await;
        // Each address once, in the entries' order; a name's IPv4 addresses before its IPv6.
        assert_eq!(
            addrs(&cands),
            [
                "10.0.0.5:15012",
                "10.0.0.6:15012",
                "[fd00::5]:15012",
                "10.0.0.7:15012"
            ]
        );
        assert_eq!(cands[0].label(), "ctl.mesh.internal:15012 (10.0.0.5:15012)");
        assert_eq!(cands[3].label(), "10.0.0.7:15012");
        assert_eq!(failed.len(), 2, "{failed:?}");
        assert!(
            failed[0].contains("gone.internal:15012") && failed[0].contains("no such name"),
            "{failed:?}"
        );
        assert!(
            failed[1].contains("empty.internal") && failed[1].contains("no addresses"),
            "{failed:?}"
        );
    }

    #[tokio::test]
    async fn each_round_resolves_again_and_starts_where_it_should() {
        let r = Arc::new(Fixed::default());
        r.set("ctl.mesh.internal:15012", &["10.0.0.5:15012"]);
        let set = Controllers::with_resolver(vec!["ctl.mesh.internal:15012".into()], r.clone());
        assert_eq!(set.current(), "ctl.mesh.internal:15012");
        let (cands, start) = set.round().await.unwrap();
        assert_eq!((addrs(&cands), start), (vec!["10.0.0.5:15012".into()], 0));
        // The record gains an address: the next round has both.
        r.set(
            "ctl.mesh.internal:15012",
            &["10.0.0.5:15012", "[fd00::6]:15012"],
        );
        let (cands, start) = set.round().await.unwrap();
        assert_eq!(addrs(&cands), ["10.0.0.5:15012", "[fd00::6]:15012"]);
        assert_eq!(start, 0);
        // The first answered, then its connection was lost: the next round starts after it.
        set.cursor().last = Some(cands[0].clone());
        assert_eq!(set.current(), "ctl.mesh.internal:15012 (10.0.0.5:15012)");
        assert_eq!(set.round().await.unwrap().1, 0, "stays while it answers");
        set.advance();
        assert_eq!(set.round().await.unwrap().1, 1);
        // The second answered, was left, and the round wraps to the first.
        *set.cursor() = Cursor {
            last: Some(cands[1].clone()),
            moved: true,
        };
        assert_eq!(set.round().await.unwrap().1, 0);
        // The address that answered last left the record: start at the first.
        r.set(
            "ctl.mesh.internal:15012",
            &["10.0.0.7:15012", "10.0.0.8:15012"],
        );
        let (cands, start) = set.round().await.unwrap();
        assert_eq!(
            (addrs(&cands), start),
            (vec!["10.0.0.7:15012".into(), "10.0.0.8:15012".into()], 0)
        );
        // No entry resolves: the error names the entries and why.
        r.0.lock().unwrap().clear();
        let err = set.round().await.unwrap_err().to_string();
        assert!(
            err.contains("ctl.mesh.internal:15012") && err.contains("no such name"),
            "{err}"
        );
    }

    /// The system resolver: `localhost` is loopback (one or both families), an address
    /// entry is taken as it is.
    #[tokio::test]
    async fn the_system_resolver_expands_localhost_and_keeps_addresses() {
        let entries = ["localhost:15012", "[::1]:15013"].map(str::to_owned);
        let (cands, failed) = expand(&entries, &SystemResolver).await;
        assert!(failed.is_empty(), "{failed:?}");
        let from_name: Vec<&Candidate> = cands
            .iter()
            .filter(|c| c.entry == "localhost:15012")
            .collect();
        assert!(!from_name.is_empty());
        assert!(
            from_name
                .iter()
                .all(|c| c.addr.ip().is_loopback() && c.addr.port() == 15012),
            "{cands:?}"
        );
        assert_eq!(cands.last().unwrap().label(), "[::1]:15013");
    }
}
