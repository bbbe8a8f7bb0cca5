//! The tunnel between agents: QUIC (quinn) on UDP 15008, one pooled connection per peer
//! agent (and expected identity), one bidirectional stream per proxied TCP connection.
//!
//! Each stream starts with a fixed binary header, then carries the application's bytes:
//!
//! ```text
//! "CWT" | version (u8, 1) | port (u16, big-endian) | name length (u8, 1..=255) | name (UTF-8)
//! ```
//!
//! `name` is the destination service key (`namespace/name`), `port` the application port
//! on the peer. The header is at most [`MAX_HEADER`] bytes and the reader never reads
//! more. Unknown versions are refused (the stream is reset), so a later header can change
//! shape behind a new version byte.
//!
//! Inbound: the peer's certificate was verified against the trust bundle by TLS; its
//! serial is checked against the deny list, its SPIFFE ID is logged and passed to the
//! authorization hook ([`authorize`], allow-all for now), then the agent connects to
//! `127.0.0.1:<port>` and splices both ways, propagating half-close.
//!
//! Certificates: [`Tunnel::reload`] swaps in a renewed identity. New connections (both
//! directions) use it; established connections keep going with the old one.
//!
//! Not here yet: the TCP + TLS fallback on TCP 15008.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::tls;
use crate::identity::Identity;
use crate::push::SharedState;

/// Header magic.
pub const MAGIC: &[u8; 3] = b"CWT";
/// Header version written by this build.
pub const VERSION: u8 = 1;
/// Largest header.
pub const MAX_HEADER: usize = 3 + 1 + 2 + 1 + 255;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a tunnel operation failed; says which side and whether a retry elsewhere helps.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// The header is malformed (downstream peer's fault; no retry).
    #[error("bad tunnel header: {0}")]
    Header(String),
    /// No QUIC connection to the peer agent (upstream; another endpoint may work).
    #[error("cannot connect to peer agent {peer}: {message}")]
    Connect {
        /// The peer.
        peer: SocketAddr,
        /// Why.
        message: String,
    },
    /// A stream could not be opened or written (upstream).
    #[error("tunnel stream to {peer} failed: {message}")]
    Stream {
        /// The peer.
        peer: SocketAddr,
        /// Why.
        message: String,
    },
    /// TLS configuration (internal; no retry helps).
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

impl TunnelError {
    /// Whether trying another endpoint may help.
    pub fn retry_elsewhere(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::Stream { .. })
    }
}

/// What a stream is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Destination service (`namespace/name`).
    pub service: String,
    /// Application port on the peer.
    pub port: u16,
}

impl Header {
    /// Encodes; names longer than 255 bytes are refused.
    pub fn encode(&self) -> Result<Vec<u8>, TunnelError> {
        let name = self.service.as_bytes();
        let len = u8::try_from(name.len())
            .ok()
            .filter(|l| *l > 0)
            .ok_or_else(|| {
                TunnelError::Header(format!("service name length {} not in 1..=255", name.len()))
            })?;
        let mut v = Vec::with_capacity(7 + name.len());
        v.extend_from_slice(MAGIC);
        v.push(VERSION);
        v.extend_from_slice(&self.port.to_be_bytes());
        v.push(len);
        v.extend_from_slice(name);
        Ok(v)
    }

    /// Reads one header from `r`, never more than [`MAX_HEADER`] bytes.
    pub async fn read(r: &mut (impl AsyncRead + Unpin)) -> Result<Self, TunnelError> {
        let mut fixed = [0u8; 7];
        r.read_exact(&mut fixed)
            .await
            .map_err(|e| TunnelError::Header(format!("short header: {e}")))?;
        if &fixed[..3] != MAGIC {
            return Err(TunnelError::Header("wrong magic".into()));
        }
        if fixed[3] != VERSION {
            return Err(TunnelError::Header(format!(
                "header version {} is not supported (this agent speaks {VERSION})",
                fixed[3]
            )));
        }
        let port = u16::from_be_bytes([fixed[4], fixed[5]]);
        if port == 0 {
            return Err(TunnelError::Header("port 0".into()));
        }
        let len = usize::from(fixed[6]);
        if len == 0 {
            return Err(TunnelError::Header("empty service name".into()));
        }
        let mut name = vec![0u8; len];
        r.read_exact(&mut name)
            .await
            .map_err(|e| TunnelError::Header(format!("short header: {e}")))?;
        let service = String::from_utf8(name)
            .map_err(|_| TunnelError::Header("service name is not UTF-8".into()))?;
        Ok(Self { service, port })
    }
}

/// The authorization hook for inbound streams: allow-all until AuthorizationPolicy lands.
pub fn authorize(_peer_spiffe_id: &str, _header: &Header) -> bool {
    true
}

/// Connects side `a` (its read and write halves) with side `b`: copies a → b and b → a.
/// When one side's reading ends, the other side's write half is shut down (half-close),
/// and the copy the other way goes on until it ends too. Returns bytes (a → b, b → a).
pub async fn splice(
    a: (impl AsyncRead + Unpin, impl AsyncWrite + Unpin),
    b: (impl AsyncRead + Unpin, impl AsyncWrite + Unpin),
) -> (u64, u64) {
    let ((mut a_r, mut a_w), (mut b_r, mut b_w)) = (a, b);
    let a_to_b = async {
        let n = tokio::io::copy(&mut a_r, &mut b_w).await.unwrap_or(0);
        let _ = b_w.shutdown().await;
        n
    };
    let b_to_a = async {
        let n = tokio::io::copy(&mut b_r, &mut a_w).await.unwrap_or(0);
        let _ = a_w.shutdown().await;
        n
    };
    tokio::join!(a_to_b, b_to_a)
}

/// Connects a TCP socket, with `mark` (SO_MARK) so capture rules skip it.
pub async fn connect_tcp(
    addr: SocketAddr,
    mark: Option<u32>,
    timeout: Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(m) = mark {
        socket2::SockRef::from(&sock).set_mark(m)?;
    }
    let s = tokio::time::timeout(timeout, sock.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// The tunnel endpoint (server and client on one UDP socket).
pub struct Tunnel {
    endpoint: quinn::Endpoint,
    identity: RwLock<Arc<Identity>>,
    state: SharedState,
    pool: tokio::sync::Mutex<HashMap<(SocketAddr, String), quinn::Connection>>,
    connect_timeout: Duration,
    mark: Option<u32>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("local", &self.endpoint.local_addr().ok())
            .finish()
    }
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(Duration::from_secs(30).try_into().expect("in range")));
    t.max_concurrent_bidi_streams(100_000u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window((4u32 * 1024 * 1024).into());
    t.receive_window((16u32 * 1024 * 1024).into());
    t.send_window(16 * 1024 * 1024);
    Arc::new(t)
}

impl Tunnel {
    /// Binds UDP `listen` and serves inbound streams until the endpoint closes.
    pub fn bind(
        listen: SocketAddr,
        identity: Identity,
        state: SharedState,
        connect_timeout: Duration,
        mark: Option<u32>,
    ) -> Result<Arc<Self>, TunnelError> {
        let server = Self::quic_server_config(&identity, &state)?;
        let endpoint =
            quinn::Endpoint::server(server, listen).map_err(|e| TunnelError::Connect {
                peer: listen,
                message: format!("cannot bind UDP {listen}: {e}"),
            })?;
        let t = Arc::new(Self {
            endpoint,
            identity: RwLock::new(Arc::new(identity)),
            state,
            pool: tokio::sync::Mutex::new(HashMap::new()),
            connect_timeout,
            mark,
        });
        tokio::spawn(t.clone().serve());
        Ok(t)
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    fn bundle(identity: &Identity, state: &SharedState) -> Vec<Vec<u8>> {
        let s = state.read().unwrap_or_else(|p| p.into_inner());
        if s.trust_bundle_der.is_empty() {
            identity.bundle_der.clone()
        } else {
            s.trust_bundle_der.clone()
        }
    }

    fn quic_server_config(
        identity: &Identity,
        state: &SharedState,
    ) -> Result<quinn::ServerConfig, TunnelError> {
        let tls = tls::server_config(identity, &Self::bundle(identity, state))?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| tls::TlsError::Identity(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(transport());
        Ok(cfg)
    }

    /// Uses `identity` for new connections from now on; established ones keep going.
    pub fn reload(&self, identity: Identity) -> Result<(), TunnelError> {
        let server = Self::quic_server_config(&identity, &self.state)?;
        self.endpoint.set_server_config(Some(server));
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(identity);
        tracing::info!("tunnel uses the renewed certificate for new connections");
        Ok(())
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"agent stopping");
    }

    async fn connection(
        &self,
        peer: SocketAddr,
        expected: &str,
    ) -> Result<quinn::Connection, TunnelError> {
        let key = (peer, expected.to_owned());
        if let Some(c) = self.pool.lock().await.get(&key)
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let identity = self
            .identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let deny = Arc::new(
            self.state
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .deny_serials
                .clone(),
        );
        let tls = tls::client_config(
            &identity,
            &Self::bundle(&identity, &self.state),
            expected,
            deny,
        )?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| tls::TlsError::Identity(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport());
        let err = |message: String| TunnelError::Connect { peer, message };
        let connecting = self
            .endpoint
            .connect_with(cfg, peer, tls::SERVER_NAME)
            .map_err(|e| err(e.to_string()))?;
        let conn = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| err("no QUIC answer in time (UDP blocked?)".into()))?
            .map_err(|e| err(e.to_string()))?;
        tracing::debug!(%peer, identity = expected, "tunnel connection up");
        self.pool.lock().await.insert(key, conn.clone());
        Ok(conn)
    }

    /// Opens a stream to the agent at `peer`, which must present `expected`, and writes
    /// the header.
    pub async fn open(
        &self,
        peer: SocketAddr,
        expected: &str,
        header: &Header,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), TunnelError> {
        let bytes = header.encode()?;
        let mut last = None;
        // A pooled connection may have died since it was last used: one fresh attempt.
        for _ in 0..2 {
            let conn = self.connection(peer, expected).await?;
            match conn.open_bi().await {
                Ok((mut send, recv)) => {
                    send.write_all(&bytes)
                        .await
                        .map_err(|e| TunnelError::Stream {
                            peer,
                            message: e.to_string(),
                        })?;
                    return Ok((send, recv));
                }
                Err(e) => {
                    self.pool.lock().await.remove(&(peer, expected.to_owned()));
                    last = Some(e.to_string());
                }
            }
        }
        Err(TunnelError::Stream {
            peer,
            message: last.unwrap_or_default(),
        })
    }

    async fn serve(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let me = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => me.serve_connection(conn).await,
                    Err(e) => {
                        tracing::info!(peer = %remote, error = %e, "tunnel handshake refused")
                    }
                }
            });
        }
    }

    async fn serve_connection(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let leaf = conn
            .peer_identity()
            .and_then(|a| {
                a.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|c| c.first().map(|d| d.to_vec()));
        let Some(leaf) = leaf else {
            conn.close(1u32.into(), b"no client certificate");
            return;
        };
        let deny = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .deny_serials
            .clone();
        let peer = match tls::check_peer(&leaf, None, &deny) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(peer = %remote, error = %e, "tunnel connection refused");
                conn.close(2u32.into(), b"certificate refused");
                return;
            }
        };
        tracing::info!(peer = %remote, peer_identity = %peer.spiffe_id, "tunnel connection accepted");
        let peer = Arc::new(peer);
        while let Ok((send, recv)) = conn.accept_bi().await {
            let (me, peer) = (self.clone(), peer.clone());
            tokio::spawn(async move { me.serve_stream(&peer, remote, send, recv).await });
        }
    }

    async fn serve_stream(
        &self,
        peer: &tls::PeerFacts,
        remote: SocketAddr,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let header = match tokio::time::timeout(HEADER_TIMEOUT, Header::read(&mut recv)).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::warn!(peer = %remote, error = %e, "tunnel stream refused");
                let _ = send.reset(1u32.into());
                return;
            }
            Err(_) => {
                let _ = send.reset(1u32.into());
                return;
            }
        };
        if !authorize(&peer.spiffe_id, &header) {
            tracing::warn!(peer_identity = %peer.spiffe_id, service = %header.service, port = header.port, "tunnel stream denied by policy");
            let _ = send.reset(3u32.into());
            return;
        }
        let app = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, header.port));
        let tcp = match connect_tcp(app, self.mark, self.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(peer_identity = %peer.spiffe_id, %app, error = %e, "local application unreachable");
                let _ = send.reset(2u32.into());
                return;
            }
        };
        tracing::info!(peer = %remote, peer_identity = %peer.spiffe_id, service = %header.service, port = header.port, "inbound tunnel stream");
        let (r, w) = tcp.into_split();
        let (up, down) = splice((recv, send), (r, w)).await;
        tracing::debug!(peer_identity = %peer.spiffe_id, bytes_in = up, bytes_out = down, "inbound stream done");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn splice_copies_both_ways_and_propagates_half_close() {
        let (mut client, proxy_a) = tokio::io::duplex(64);
        let (proxy_b, mut server) = tokio::io::duplex(64);
        let task = tokio::spawn(splice(tokio::io::split(proxy_a), tokio::io::split(proxy_b)));
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping", "client → server, then EOF (half-close)");
        server.write_all(b"pong").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(
            back, b"pong",
            "server → client after the client's half-close"
        );
        assert_eq!(task.await.unwrap(), (4, 4));
    }

    #[tokio::test]
    async fn header_round_trip_and_limits() {
        let h = Header {
            service: "default/web".into(),
            port: 8080,
        };
        let bytes = h.encode().unwrap();
        assert_eq!(&bytes[..4], b"CWT\x01");
        assert_eq!(Header::read(&mut &bytes[..]).await.unwrap(), h);
        assert!(
            Header {
                service: "x".repeat(256),
                port: 1
            }
            .encode()
            .is_err()
        );
        let mut bad = bytes.clone();
        bad[3] = 9;
        let err = Header::read(&mut &bad[..]).await.unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
        assert!(Header::read(&mut &bytes[..5]).await.is_err());
        let mut zero = bytes.clone();
        zero[4] = 0;
        zero[5] = 0;
        assert!(Header::read(&mut &zero[..]).await.is_err());
    }
}
