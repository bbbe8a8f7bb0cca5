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
//! AuthorizationPolicies that select this host's workload ([`super::authz`]), then the agent connects to
//! `127.0.0.1:<port>` and splices both ways ([`super::splice`]: half-close, resets and
//! the idle timeout travel end to end).
//!
//! Certificates: [`Tunnel::reload`] swaps in a renewed identity. New connections (both
//! directions) use it; established connections keep going with the old one.
//!
//! Fallback: the same port number on TCP carries TLS 1.3 (same certificates, same
//! verification, same header). Between agents of this version it is multiplexed like
//! QUIC: one pooled TLS connection per peer agent, one HTTP/2 stream per proxied
//! connection ([`super::mux`]); with an agent that only speaks the first version (ALPN
//! decides), one TLS connection per proxied connection. [`Tunnel::open`] tries QUIC first
//! (at most 2 s); when it gets no answer and TCP works, that peer is reached over TCP, and
//! QUIC is probed in the background every 30 s until it works again.
//!
//! Pooled connections outlive their handshake: before each reuse a connection must have
//! been dialled with this agent's current certificate, and the peer certificate it was
//! authenticated with must still pass the deny list and its expiry; one that fails takes
//! no new streams (the next one dials again, which verifies in full; open streams go on).
//! An inbound stream is refused when its connection's peer certificate was denied since.
//!
//! Parts: [`header`] (the stream header's encoding), `pool` (one generic pool per
//! transport: reuse rules, single-flight dials, idle release), `quic` and `tcp_mux`
//! (dialling and opening streams on each transport), `inbound` (accept loops, one
//! tracing span per proxied stream), `authorize` (the per-stream decision and the
//! follow-up of published state: deny list and AuthorizationPolicies). Settings are a
//! value given at bind ([`TunnelSettings`]).

mod authorize;
pub mod header;
mod inbound;
mod pool;
mod quic;
mod tcp_mux;

use super::mux::{self, MuxRead, MuxSide, MuxWrite};
use super::readahead::ReadAhead;
use super::splice::{QuicSide, Side, splice_until};
use super::tls;
use crate::identity::Identity;
use crate::push::SharedState;
use causeway_api::push::MeshState;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};

use authorize::*;
pub use header::{Header, MAGIC, MAX_HEADER, ReadHeader, VERSION};
use pool::*;
pub(crate) use quic::MTU_UPPER_BOUND;
use quic::*;
pub(crate) use tcp_mux::tune_tunnel_socket;
use tcp_mux::*;

/// Requested size of the tunnel's UDP socket buffers.
const UDP_BUFFER: usize = 4 * 1024 * 1024;

/// How long a peer whose QUIC failed while TCP worked is reached over TCP before QUIC is
/// probed again (in the background: streams keep going over TCP meanwhile).
const QUIC_DOWN_FOR: Duration = Duration::from_secs(30);

/// A client TLS configuration and what it was built from.
#[derive(Debug)]
struct CachedClientTls {
    identity: Arc<Identity>,
    version: u64,
    config: Arc<rustls::ClientConfig>,
    /// The same with the TCP ALPN list (multiplexed first).
    tcp: Arc<rustls::ClientConfig>,
}

/// Read half of a tunnel stream (QUIC stream or TLS over TCP).
pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;

/// Write half of a tunnel stream; shutting it down is the half-close.
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// What a tunnel has carried since it started (for the agent's metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelCounters {
    /// Outbound streams opened, over QUIC and over TCP + TLS.
    pub opened: [u64; 2],
    /// Inbound streams handed to the local application, over QUIC and over TCP + TLS.
    pub accepted: [u64; 2],
    /// QUIC and TCP + TLS connections dialled.
    pub dials: [u64; 2],
    /// Peers reached over TCP + TLS now because QUIC got no answer.
    pub peers_on_tcp: u64,
    /// Tunnel connections open now, dialled and accepted: QUIC, and multiplexed TCP + TLS.
    pub connections: [u64; 2],
}

/// Which transport carries a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A stream of the pooled QUIC connection (UDP).
    Quic = 0,
    /// TLS over TCP (fallback when UDP is blocked): a stream of a pooled, multiplexed
    /// connection, or a connection of its own with agents of an older version.
    TcpTls,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Quic => "quic",
            Self::TcpTls => "tcp+tls",
        })
    }
}

/// The stream of an opened tunnel.
#[derive(Debug)]
pub enum TunnelStream {
    /// A stream of the pooled QUIC connection.
    Quic(QuicSide),
    /// A stream of the pooled, multiplexed TCP + TLS connection.
    Mux(MuxSide),
    /// A TLS-over-TCP connection of its own (a peer agent of an older version).
    Tls(Box<tokio_rustls::client::TlsStream<ReadAhead>>),
}

/// An opened tunnel stream, header written.
pub struct Opened {
    /// The transport in use.
    pub transport: Transport,
    /// The stream.
    pub stream: TunnelStream,
    /// The peer agent's certificate, as its connection authenticated it.
    pub peer: Arc<tls::PeerFacts>,
}

impl Opened {
    /// The stream as boxed halves (for tools and tests; the proxy splices the stream).
    pub fn into_io(self) -> (BoxRead, BoxWrite) {
        match self.stream {
            TunnelStream::Quic(q) => (Box::new(q.recv), Box::new(q.send)),
            TunnelStream::Mux(m) => (Box::new(m.recv), Box::new(m.send)),
            TunnelStream::Tls(t) => {
                let (r, w) = tokio::io::split(*t);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("transport", &self.transport)
            .finish()
    }
}

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

/// The tunnel's settings, given as a value at bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSettings {
    /// Timeout of a connect to a peer agent or the local application.
    pub connect_timeout: Duration,
    /// SO_MARK on the tunnel's TCP sockets, so capture skips them.
    pub mark: Option<u32>,
    /// A proxied stream with no byte either way for this long is reset (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Open streams over TCP + TLS only, never trying QUIC (`tunnel_transport = "tcp"`).
    pub tcp_only: bool,
    /// How long a pooled connection may go without a new stream ([`POOL_IDLE`]).
    pub pool_idle: Duration,
    /// How long a peer whose QUIC failed is reached over TCP + TLS between QUIC probes
    /// ([`QUIC_DOWN_FOR`]).
    pub quic_down_for: Duration,
    /// Telemetry of the streams served (none: only debug log lines).
    pub telemetry: Option<Arc<crate::telemetry::Telemetry>>,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            mark: None,
            idle_timeout: None,
            tcp_only: false,
            pool_idle: POOL_IDLE,
            quic_down_for: QUIC_DOWN_FOR,
            telemetry: None,
        }
    }
}

/// The tunnel endpoint (server and client on one UDP socket).
pub struct Tunnel {
    endpoint: quinn::Endpoint,
    tls_server: RwLock<Arc<rustls::ServerConfig>>,
    /// Peers reached over TCP + TLS because QUIC got no answer, with when to probe QUIC
    /// again.
    quic_down: std::sync::Mutex<HashMap<SocketAddr, tokio::time::Instant>>,
    identity: RwLock<Arc<Identity>>,
    state: SharedState,
    /// Pooled QUIC connections (one dial at a time per peer).
    pool: Pool<quinn::Connection>,
    /// Pooled multiplexed TCP + TLS connections (one dial at a time per peer).
    mux_pool: Pool<MuxConn>,
    /// Peers that answered TCP + TLS without multiplexing (an older agent): each stream
    /// dials its own connection, without waiting on the others.
    single_peers: std::sync::Mutex<std::collections::HashSet<PoolKey>>,
    /// TCP + TLS connections dialled (for tests and diagnostics).
    tcp_dials: std::sync::atomic::AtomicU64,
    /// Open streams over TCP + TLS only, never trying QUIC (`tunnel_transport = "tcp"`).
    tcp_only: std::sync::atomic::AtomicBool,
    /// Outbound streams opened, by transport (index: `Transport as usize`).
    opened: [std::sync::atomic::AtomicU64; 2],
    /// Inbound streams served, by transport.
    accepted: [std::sync::atomic::AtomicU64; 2],
    /// Client TLS configurations by expected peer identity.
    tls_clients: std::sync::Mutex<HashMap<String, CachedClientTls>>,
    /// QUIC dials made (for tests and diagnostics).
    dials: std::sync::atomic::AtomicU64,
    /// Fixed at bind.
    settings: TunnelSettings,
    /// Multiplexed TCP + TLS connections open now (dialled and accepted).
    mux_open: Arc<std::sync::atomic::AtomicU64>,
    /// The inbound HTTP proxy of each local application port declared HTTP, so
    /// connections to the application are pooled across tunnel streams.
    http: std::sync::Mutex<HashMap<u16, super::http::Proxy<inbound::AppUpstream>>>,
    /// The deny list as last seen in the mesh state, for cutting the open streams of a
    /// peer denied since ([`Self::cut_when_denied`]).
    deny: tokio::sync::watch::Sender<Arc<std::collections::BTreeSet<String>>>,
    /// The authorization view of this host's workload, rebuilt when the policies or its
    /// labels change; open inbound streams are decided again on each change.
    authz: tokio::sync::watch::Sender<Arc<super::authz::LocalAuthz>>,
    /// The agent's JWKS cache, for RequestAuthentication on the request path of HTTP
    /// ports ([`Self::set_jwks`]; a default one when none was given).
    jwks: std::sync::OnceLock<Arc<crate::jwks::JwksCache>>,
    /// Proxied connections in flight (outbound ones count here too), for the drain.
    inflight: super::drain::Inflight,
    /// Whether new connections are accepted (false once draining).
    accepting: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("local", &self.endpoint.local_addr().ok())
            .finish()
    }
}

/// Binds the tunnel's UDP socket and, on the same port number, the TCP + TLS fallback's
/// listener. With port 0 the kernel picks the UDP port, which TCP may have in use (a
/// client connection's port): then both are bound again on another, a few times.
fn bind_pair(
    listen: SocketAddr,
) -> Result<(std::net::UdpSocket, std::net::TcpListener), (&'static str, SocketAddr, std::io::Error)>
{
    let attempts = if listen.port() == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = std::net::UdpSocket::bind(listen).map_err(|e| ("udp", listen, e))?;
        let addr = udp.local_addr().unwrap_or(listen);
        match std::net::TcpListener::bind(addr) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some((addr, e)),
        }
    }
    let (addr, e) = last.expect("at least one attempt");
    Err(("tcp", addr, e))
}

/// Keeps the key sets of this workload's JWT rules fetched: at once, when the rules
/// change, and every `refresh_interval` (so requests rarely wait for a fetch), until the
/// tunnel is gone.
async fn warm_jwks(
    tunnel: std::sync::Weak<Tunnel>,
    mut authz: tokio::sync::watch::Receiver<Arc<super::authz::LocalAuthz>>,
) {
    loop {
        let rules = authz.borrow_and_update().jwt_rules().to_vec();
        let Some(cache) = tunnel.upgrade().map(|t| t.jwks()) else {
            return;
        };
        let every = cache.refresh_interval();
        cache.prefetch(&rules).await;
        drop(cache);
        tokio::select! {
            r = authz.changed() => if r.is_err() { return },
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// QUIC application close code of the connections of an agent that stops.
const STOPPING_CODE: u32 = 0;

impl Tunnel {
    /// Binds UDP `listen` and serves inbound streams until the endpoint closes.
    pub fn bind(
        listen: SocketAddr,
        identity: Identity,
        state: SharedState,
        settings: TunnelSettings,
    ) -> Result<Arc<Self>, TunnelError> {
        // Subscribed before anything is built from the state: no change is missed.
        let mut changes = state.subscribe();
        let first = changes.borrow_and_update().clone();
        let (server, tls_server) = Self::server_configs(&identity, &first)?;
        let bind_err = |e: std::io::Error| TunnelError::Connect {
            peer: listen,
            message: format!("cannot bind UDP {listen}: {e}"),
        };
        let (socket, tcp) = bind_pair(listen).map_err(|(proto, addr, e)| TunnelError::Connect {
            peer: addr,
            message: match proto {
                "tcp" => format!("cannot bind TCP {addr} (TCP + TLS fallback): {e}"),
                _ => format!("cannot bind UDP {addr}: {e}"),
            },
        })?;
        // One bulk stream sends tens of thousands of datagrams per second: the kernel's
        // default socket buffers (~200 KiB) drop bursts and the congestion controller
        // backs off. Ask for more (capped by net.core.rmem_max / wmem_max).
        let udp = quinn::udp::UdpSocketState::new((&socket).into()).map_err(bind_err)?;
        for (what, r) in [
            (
                "receive",
                udp.set_recv_buffer_size((&socket).into(), UDP_BUFFER),
            ),
            (
                "send",
                udp.set_send_buffer_size((&socket).into(), UDP_BUFFER),
            ),
        ] {
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot enlarge the tunnel socket's {what} buffer; raise net.core.rmem_max / wmem_max");
            }
        }
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind_err(std::io::Error::other("no async runtime for the tunnel")))?;
        let socket = Arc::new(super::udp::TunnelSocket::new(socket, udp).map_err(bind_err)?);
        // The largest datagram this endpoint accepts, told to peers (quinn's default is
        // 1472, which caps the peer's path MTU discovery whatever its upper bound).
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(MTU_UPPER_BOUND)
            .map_err(|e| bind_err(std::io::Error::other(e.to_string())))?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server),
            socket,
            runtime,
        )
        .map_err(bind_err)?;
        let tcp_addr = tcp.local_addr().unwrap_or(listen);
        let tcp = tcp
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(tcp))
            .map_err(|e| TunnelError::Connect {
                peer: tcp_addr,
                message: format!("cannot listen on TCP {tcp_addr} (TCP + TLS fallback): {e}"),
            })?;
        let deny = Arc::new(first.deny_serials.clone());
        let authz = Arc::new(super::authz::LocalAuthz::build(
            &first,
            &identity.spiffe_id.to_string(),
            &identity.info.group,
        ));
        let t = Arc::new(Self {
            deny: tokio::sync::watch::Sender::new(deny),
            authz: tokio::sync::watch::Sender::new(authz),
            endpoint,
            tls_server: RwLock::new(tls_server),
            quic_down: std::sync::Mutex::new(HashMap::new()),
            identity: RwLock::new(Arc::new(identity)),
            state,
            pool: Pool::default(),
            mux_pool: Pool::default(),
            single_peers: std::sync::Mutex::new(std::collections::HashSet::new()),
            tcp_dials: std::sync::atomic::AtomicU64::new(0),
            opened: Default::default(),
            accepted: Default::default(),
            tls_clients: std::sync::Mutex::new(HashMap::new()),
            dials: std::sync::atomic::AtomicU64::new(0),
            tcp_only: std::sync::atomic::AtomicBool::new(settings.tcp_only),
            settings,
            mux_open: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            http: std::sync::Mutex::default(),
            jwks: std::sync::OnceLock::new(),
            inflight: super::drain::Inflight::default(),
            accepting: tokio::sync::watch::Sender::new(true),
        });
        tokio::spawn(t.clone().serve());
        tokio::spawn(t.clone().serve_tcp(tcp));
        tokio::spawn(release_idle_connections(Arc::downgrade(&t)));
        tokio::spawn(follow_state(Arc::downgrade(&t), changes));
        Ok(t)
    }

    /// Gives the tunnel the agent's JWKS cache (`[jwt]`), once, and keeps the key sets of
    /// the RequestAuthentication rules of this workload warm: fetched when the rules
    /// change and again every `refresh_interval`. Returns false when a cache was set (or
    /// a default one made) before.
    pub fn set_jwks(self: &Arc<Self>, cache: Arc<crate::jwks::JwksCache>) -> bool {
        let set = self.jwks.set(cache).is_ok();
        if set {
            tokio::spawn(warm_jwks(Arc::downgrade(self), self.authz.subscribe()));
        }
        set
    }

    /// The JWKS cache ([`Self::set_jwks`]; without one, a cache with the `[jwt]` defaults).
    pub(crate) fn jwks(&self) -> Arc<crate::jwks::JwksCache> {
        self.jwks
            .get_or_init(|| {
                let defaults = crate::config::JwtConfig::default();
                Arc::new(
                    crate::jwks::JwksCache::from_config(&defaults)
                        .expect("the default JWKS cache has no CA file to fail on"),
                )
            })
            .clone()
    }

    /// Opens outbound streams over TCP + TLS only (`true`), or QUIC first (`false`, the
    /// default). Inbound streams are served on both transports either way.
    pub fn set_tcp_only(&self, tcp_only: bool) {
        self.tcp_only
            .store(tcp_only, std::sync::atomic::Ordering::Relaxed);
    }

    /// What this tunnel has carried so far.
    pub fn counters(&self) -> TunnelCounters {
        let get = |a: &[std::sync::atomic::AtomicU64; 2]| {
            a.each_ref()
                .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        };
        TunnelCounters {
            opened: get(&self.opened),
            accepted: get(&self.accepted),
            dials: [self.quic_dials(), self.tcp_dials()],
            peers_on_tcp: self
                .quic_down
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len() as u64,
            connections: [
                self.endpoint.open_connections() as u64,
                self.mux_open.load(std::sync::atomic::Ordering::Relaxed),
            ],
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    fn bundle(identity: &Identity, s: &MeshState) -> Vec<Vec<u8>> {
        if s.trust_bundle_der.is_empty() {
            identity.bundle_der.clone()
        } else {
            s.trust_bundle_der.clone()
        }
    }

    fn server_configs(
        identity: &Identity,
        state: &MeshState,
    ) -> Result<(quinn::ServerConfig, Arc<rustls::ServerConfig>), TunnelError> {
        let tls = tls::server_config(identity, &Self::bundle(identity, state))?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls.clone())
            .map_err(|e| tls::TlsError::Identity(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(transport());
        let mut tcp = tls;
        tcp.alpn_protocols = tls::TCP_ALPN.iter().map(|p| p.to_vec()).collect();
        Ok((cfg, Arc::new(tcp)))
    }

    /// Uses `identity` for new connections from now on; established ones keep going.
    pub fn reload(&self, identity: Identity) -> Result<(), TunnelError> {
        let (server, tls_server) = Self::server_configs(&identity, &self.state.get())?;
        self.endpoint.set_server_config(Some(server));
        *self.tls_server.write().unwrap_or_else(|p| p.into_inner()) = tls_server;
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(identity);
        tracing::info!("tunnel uses the renewed certificate for new connections");
        Ok(())
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.endpoint.close(STOPPING_CODE.into(), b"agent stopping");
    }

    /// The proxied connections in flight through this agent (outbound and inbound).
    pub fn inflight(&self) -> &super::drain::Inflight {
        &self.inflight
    }

    /// Accepts no new connection from peers (QUIC or TCP + TLS) from now on; streams on
    /// connections already accepted are still served, and open ones go on (the drain).
    pub fn stop_accepting(&self) {
        self.endpoint.set_server_config(None);
        self.accepting.send_replace(false);
    }

    /// [`Self::close`], then waits (briefly) until peers were told: each connection ends
    /// with an application close, so a peer's pooled connection to this process is closed
    /// at once and its next stream dials again (the new process, after a restart),
    /// instead of hanging on a connection nobody answers until its idle timeout.
    pub async fn shutdown(&self) {
        self.close();
        self.mux_pool.clear();
        if tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle())
            .await
            .is_err()
        {
            tracing::debug!("tunnel connections still closing at exit");
        }
    }

    /// The client TLS configuration for peers that must present `expected` (`tcp`: with
    /// the TCP ALPN list): built once per identity and mesh state version (certificate,
    /// trust bundle, deny list), not per connection, since with a peer of an older
    /// version the TCP + TLS fallback opens one TLS connection per proxied connection.
    fn client_tls(
        &self,
        expected: &str,
        tcp: bool,
    ) -> Result<Arc<rustls::ClientConfig>, TunnelError> {
        let identity = self
            .identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let snapshot = self.state.get();
        let version = snapshot.version;
        let mut cache = self.tls_clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(expected)
            && c.version == version
            && Arc::ptr_eq(&c.identity, &identity)
        {
            return Ok(if tcp { c.tcp.clone() } else { c.config.clone() });
        }
        // One snapshot: the deny list and bundle are the version's.
        let deny = snapshot.deny_serials.clone();
        let config = tls::client_config(
            &identity,
            &Self::bundle(&identity, &snapshot),
            expected,
            Arc::new(deny),
        )?;
        let mut tcp_config = config.clone();
        tcp_config.alpn_protocols = tls::TCP_ALPN.iter().map(|p| p.to_vec()).collect();
        let (config, tcp_config) = (Arc::new(config), Arc::new(tcp_config));
        let chosen = if tcp { &tcp_config } else { &config }.clone();
        cache.insert(
            expected.to_owned(),
            CachedClientTls {
                identity,
                version,
                config,
                tcp: tcp_config,
            },
        );
        Ok(chosen)
    }

    /// Opens a stream to the agent at `peer`, which must present `expected`, and writes
    /// the header: over QUIC, or over TCP + TLS when QUIC gets no answer (UDP blocked).
    /// A peer whose QUIC failed while TCP worked is reached over TCP from then on; every
    /// [`QUIC_DOWN_FOR`] one QUIC dial is tried in the background, and once one succeeds
    /// new streams go over QUIC again. No stream waits on those probes.
    pub async fn open(
        self: &Arc<Self>,
        peer: SocketAddr,
        expected: &str,
        header: &Header,
    ) -> Result<Opened, TunnelError> {
        let opened = self.open_stream(peer, expected, header).await?;
        self.opened[opened.transport as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(opened)
    }

    async fn open_stream(
        self: &Arc<Self>,
        peer: SocketAddr,
        expected: &str,
        header: &Header,
    ) -> Result<Opened, TunnelError> {
        if self.tcp_only.load(std::sync::atomic::Ordering::Relaxed) {
            return self.open_tcp(peer, expected, header).await;
        }
        let now = tokio::time::Instant::now();
        let down_for = self.settings.quic_down_for;
        let quic_down = {
            let mut down = self.quic_down.lock().unwrap_or_else(|p| p.into_inner());
            match down.get(&peer).copied() {
                None => false,
                Some(probe_at) => {
                    if now >= probe_at {
                        down.insert(peer, now + down_for);
                        self.probe_quic(peer, expected.to_owned());
                    }
                    true
                }
            }
        };
        let quic_err = if quic_down {
            None
        } else {
            match self.open_quic(peer, expected, header).await {
                Ok((send, recv, peer)) => {
                    return Ok(Opened {
                        transport: Transport::Quic,
                        stream: TunnelStream::Quic(QuicSide { send, recv }),
                        peer,
                    });
                }
                Err(e @ TunnelError::Tls(_)) | Err(e @ TunnelError::Header(_)) => return Err(e),
                Err(e) => Some(e),
            }
        };
        match self.open_tcp(peer, expected, header).await {
            Ok(o) => {
                if let Some(e) = &quic_err {
                    tracing::warn!(%peer, quic_error = %e, "QUIC to the peer agent failed; using TCP + TLS, and probing QUIC in the background");
                    self.quic_down
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(peer, now + down_for);
                }
                Ok(o)
            }
            Err(tcp_err) => {
                self.quic_down
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&peer);
                Err(TunnelError::Connect {
                    peer,
                    message: match quic_err {
                        Some(q) => format!("QUIC: {q}; TCP + TLS: {tcp_err}"),
                        None => tcp_err.to_string(),
                    },
                })
            }
        }
    }
}
