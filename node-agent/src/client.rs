//! The agent's side of the control endpoint: join (server-authenticated by the pinned CA)
//! and renewal (mutual TLS with the current certificate), over QUIC.

use std::net::SocketAddr;
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

async fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    let resolved = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| ClientError::Resolve {
            addr: addr.to_owned(),
            message: e.to_string(),
        })?;
    let all: Vec<SocketAddr> = resolved.collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| ClientError::Resolve {
            addr: addr.to_owned(),
            message: "no addresses".into(),
        })
}

async fn connect(
    addr: &str,
    tls: rustls::ClientConfig,
    pinned: Option<&PinnedCa>,
) -> Result<quinn::Connection, ClientError> {
    let target = resolve(addr).await?;
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
    // Keep-alives every 3 s and a 10 s idle timeout: the controller notices a dead
    // agent (and starts its lease's grace period) within about 10 s.
    transport.keep_alive_interval(Some(Duration::from_secs(3)));
    transport.max_idle_timeout(Some(Duration::from_secs(10).try_into().expect("in range")));
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
/// in turn from the one that answered last. Each holds the whole mesh state, and config
/// versions are global to the set, so the push stream resumes from the agent's version
/// on whichever answers.
#[derive(Debug)]
pub struct Controllers {
    list: Vec<String>,
    current: std::sync::atomic::AtomicUsize,
}

impl Controllers {
    /// `list` in order of preference; empty is treated as one empty address (refused at
    /// connect with the resolver's error).
    pub fn new(mut list: Vec<String>) -> Self {
        if list.is_empty() {
            list.push(String::new());
        }
        Self {
            list,
            current: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Every controller, in order.
    pub fn list(&self) -> &[String] {
        &self.list
    }

    /// The controller tried first next time (the one that answered last).
    pub fn current(&self) -> &str {
        &self.list[self.current.load(std::sync::atomic::Ordering::Relaxed) % self.list.len()]
    }

    /// Moves to the next controller: the connection to the current one was lost, so
    /// the next attempt starts elsewhere (and comes back to it in turn).
    pub fn advance(&self) {
        let n = self.list.len();
        let _ = self.current.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |i| Some((i + 1) % n),
        );
    }

    /// Opens a mutual-TLS connection to the first controller that answers, starting
    /// with the current one; returns it with the controller's address. A failure that
    /// another controller cannot fix (the local identity files) ends the round at once;
    /// when none answers, the error names each.
    pub async fn connect_mtls(
        &self,
        identity: &Identity,
    ) -> Result<(quinn::Connection, String), ClientError> {
        let n = self.list.len();
        let start = self.current.load(std::sync::atomic::Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let addr = &self.list[idx];
            match connect_mtls(identity, addr).await {
                Ok(c) => {
                    self.current
                        .store(idx, std::sync::atomic::Ordering::Relaxed);
                    return Ok((c, addr.clone()));
                }
                Err(e) if n == 1 || !e.is_retryable() => return Err(e),
                Err(e) => {
                    tracing::warn!(controller = %addr, error = %e, "controller unreachable; trying the next one");
                    failures.push(e.to_string());
                }
            }
        }
        Err(ClientError::Connect {
            addr: self.list.join(", "),
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
    connect(controller, tls, None).await
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
