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

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::mux::{self, MuxRead, MuxSide, MuxWrite};
use super::readahead::ReadAhead;
use super::splice::{QuicSide, Side, splice_until};
use super::tls;
use crate::identity::Identity;
use crate::push::SharedState;

/// The stream header: its layout, encoding and checks are in the wire module.
pub use causeway_api::wire::tunnel::{Header, MAGIC, MAX_HEADER, VERSION};
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a QUIC handshake may take before the TCP + TLS fallback is tried.
const QUIC_TIMEOUT: Duration = Duration::from_secs(2);
/// Requested size of the tunnel's UDP socket buffers.
const UDP_BUFFER: usize = 4 * 1024 * 1024;
/// How long a peer whose QUIC failed while TCP worked is reached over TCP before QUIC is
/// probed again (in the background: streams keep going over TCP meanwhile).
const QUIC_DOWN_FOR: Duration = Duration::from_secs(30);
/// TCP + TLS tunnel connections: keepalive probes after this much silence, then every
/// interval, and the connection is dropped after `TCP_KEEPALIVE_PROBES` unanswered ones.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const TCP_KEEPALIVE_PROBES: u32 = 5;
/// Sent data unacknowledged this long drops a TCP + TLS tunnel connection.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// A pooled connection that has not been given a new stream for this long is released:
/// forgotten by the pool, so it closes once the streams it still carries end (a peer that
/// stopped being an endpoint is not kept connected, with keepalives, for as long as both
/// agents live). The next stream to that peer dials again.
const POOL_IDLE: Duration = Duration::from_secs(300);

/// A client TLS configuration and what it was built from.
#[derive(Debug)]
struct CachedClientTls {
    identity: Arc<Identity>,
    version: u64,
    config: Arc<rustls::ClientConfig>,
    /// The same with the TCP ALPN list (multiplexed first).
    tcp: Arc<rustls::ClientConfig>,
}

/// A pooled connection, the peer certificate it was authenticated with, and this agent's
/// identity it was dialled with.
#[derive(Debug, Clone)]
struct Pooled<C> {
    conn: C,
    peer: Arc<tls::PeerFacts>,
    identity: Arc<Identity>,
    /// When the pool last handed this connection out for a new stream (or dialled it).
    used: Arc<std::sync::Mutex<tokio::time::Instant>>,
}

impl<C: Clone> Pooled<C> {
    fn new(conn: C, peer: Arc<tls::PeerFacts>, identity: Arc<Identity>) -> Self {
        Self {
            conn,
            peer,
            identity,
            used: Arc::new(std::sync::Mutex::new(tokio::time::Instant::now())),
        }
    }

    /// A handle for a new stream, marking the connection used now.
    fn take(&self) -> Self {
        *self.used.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
        self.clone()
    }

    fn idle_for(&self, now: tokio::time::Instant) -> Duration {
        now.saturating_duration_since(*self.used.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A multiplexed TCP + TLS connection's handle; `closed` is set when its task ends.
#[derive(Clone)]
struct MuxConn {
    send: h2::client::SendRequest<bytes::Bytes>,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for MuxConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxConn")
            .field("closed", &self.closed)
            .finish()
    }
}

/// What a TCP + TLS dial gave: a multiplexed connection, or (a peer of an older
/// version) a TLS connection for this one stream.
enum TcpDial {
    Mux(Pooled<MuxConn>),
    Single(
        Box<tokio_rustls::client::TlsStream<ReadAhead>>,
        Arc<tls::PeerFacts>,
    ),
}

type PoolKey = (SocketAddr, String);

/// A pooled connection's dial lock, holding the time and error of its last failed dial.
#[derive(Debug, Default)]
struct DialState(tokio::sync::Mutex<Option<(tokio::time::Instant, String)>>);

impl DialState {
    /// The dial lock of `key` in `map`.
    fn of(map: &std::sync::Mutex<HashMap<PoolKey, Arc<Self>>>, key: &PoolKey) -> Arc<Self> {
        map.lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// The error of a dial that failed while this caller waited for the lock (since
    /// `waited_from`): the caller fails with it instead of dialling again.
    fn failed_meanwhile(
        last: &Option<(tokio::time::Instant, String)>,
        waited_from: tokio::time::Instant,
        peer: SocketAddr,
    ) -> Option<TunnelError> {
        let (at, message) = last.as_ref()?;
        (*at >= waited_from).then(|| TunnelError::Connect {
            peer,
            message: message.clone(),
        })
    }
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

impl From<causeway_api::wire::tunnel::HeaderError> for TunnelError {
    fn from(e: causeway_api::wire::tunnel::HeaderError) -> Self {
        Self::Header(e.to_string())
    }
}

/// Reads a [`Header`] from a stream.
pub trait ReadHeader {
    /// Reads one header from `r`, never more than [`MAX_HEADER`] bytes.
    fn read(
        r: &mut (impl AsyncRead + Unpin),
    ) -> impl std::future::Future<Output = Result<Header, TunnelError>>;
}

impl ReadHeader for Header {
    async fn read(r: &mut (impl AsyncRead + Unpin)) -> Result<Header, TunnelError> {
        use causeway_api::wire::tunnel::{PREFIX_LEN, Prefix};
        let mut fixed = [0u8; PREFIX_LEN];
        r.read_exact(&mut fixed)
            .await
            .map_err(|e| TunnelError::Header(format!("short header: {e}")))?;
        let prefix = Prefix::parse(fixed)?;
        let mut name = vec![0u8; prefix.name_len()];
        r.read_exact(&mut name)
            .await
            .map_err(|e| TunnelError::Header(format!("short header: {e}")))?;
        Ok(prefix.finish(&name)?)
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

/// Makes a dead peer of a TCP + TLS tunnel connection show within about 30 s, as the QUIC
/// tunnel's idle timeout does: a pooled connection outlives its connect, and without
/// this, streams opened on a connection to a host that vanished (power loss, partition)
/// would wait for the kernel's retransmissions (~15 min) instead of failing over.
pub(crate) fn tune_tunnel_socket(s: &tokio::net::TcpStream) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(s);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(TCP_KEEPALIVE_IDLE)
            .with_interval(TCP_KEEPALIVE_INTERVAL)
            .with_retries(TCP_KEEPALIVE_PROBES),
    )?;
    sock.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT))
}

/// The tunnel endpoint (server and client on one UDP socket).
pub struct Tunnel {
    endpoint: quinn::Endpoint,
    tls_server: RwLock<Arc<rustls::ServerConfig>>,
    /// Peers reached over TCP + TLS because QUIC got no answer, with when to probe QUIC
    /// again.
    quic_down: std::sync::Mutex<HashMap<SocketAddr, tokio::time::Instant>>,
    /// How long a peer stays in `quic_down` between probes ([`QUIC_DOWN_FOR`]).
    quic_down_for: std::sync::Mutex<Duration>,
    identity: RwLock<Arc<Identity>>,
    state: SharedState,
    pool: tokio::sync::Mutex<HashMap<PoolKey, Pooled<quinn::Connection>>>,
    /// One QUIC dial at a time per pooled connection, with the last failure: opens that
    /// waited on a dial that failed fail at once instead of dialling again each.
    dialing: std::sync::Mutex<HashMap<PoolKey, Arc<DialState>>>,
    /// Pooled multiplexed TCP + TLS connections.
    mux_pool: std::sync::Mutex<HashMap<PoolKey, Pooled<MuxConn>>>,
    /// One TCP + TLS dial at a time per pooled connection (as `dialing`).
    mux_dialing: std::sync::Mutex<HashMap<PoolKey, Arc<DialState>>>,
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
    connect_timeout: Duration,
    mark: Option<u32>,
    idle_timeout: Option<Duration>,
    /// How long a pooled connection may go without a new stream ([`POOL_IDLE`]).
    pool_idle: std::sync::Mutex<Duration>,
    /// Multiplexed TCP + TLS connections open now (dialled and accepted).
    mux_open: Arc<std::sync::atomic::AtomicU64>,
    /// The deny list as last seen in the mesh state, for cutting the open streams of a
    /// peer denied since ([`Self::cut_when_denied`]).
    deny: tokio::sync::watch::Sender<Arc<std::collections::BTreeSet<String>>>,
    /// The authorization view of this host's workload, rebuilt when the policies or its
    /// labels change; open inbound streams are decided again on each change.
    authz: tokio::sync::watch::Sender<Arc<super::authz::LocalAuthz>>,
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

/// Largest UDP payload the tunnel's path MTU discovery tries: a 9000-byte (jumbo) IP MTU
/// less IPv6 and UDP headers. quinn's default stops at 1452 (a 1500 MTU); on networks with
/// jumbo frames (cloud VPCs, 9001 on AWS) each datagram then carries ~6× the bytes, and a
/// bulk stream's cost is mostly per datagram. Probes are separate packets and data grows
/// only after a probe is acknowledged, so a 1500-byte path settles at its own limit
/// (1452–1472 bytes) instead of growing past it.
pub(crate) const MTU_UPPER_BOUND: u16 = 8952;

/// Flow-control window of one QUIC stream (as the multiplexed TCP + TLS tunnel's).
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(Duration::from_secs(30).try_into().expect("in range")));
    t.max_concurrent_bidi_streams(100_000u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // A stream's window keeps a bulk stream busy; the connection's is 16 of them. Bytes a
    // stalled application does not read hold their stream's window of the connection's,
    // so with 16 MiB (until session 6) four stalled streams to one peer stopped every
    // other stream to it (test `stalled_streams_do_not_block_the_other_streams_of_a_connection`);
    // now it takes sixteen at once. The bound is per peer connection: at most 64 MiB
    // buffered for stalled readers per peer.
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window((16 * STREAM_WINDOW).into());
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
        idle_timeout: Option<Duration>,
    ) -> Result<Arc<Self>, TunnelError> {
        let (server, tls_server) = Self::server_configs(&identity, &state)?;
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
        let deny = Arc::new(
            state
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .deny_serials
                .clone(),
        );
        let authz = Arc::new(super::authz::LocalAuthz::build(
            &state.read().unwrap_or_else(|p| p.into_inner()),
            &identity.spiffe_id.to_string(),
            &identity.info.group,
        ));
        let t = Arc::new(Self {
            deny: tokio::sync::watch::Sender::new(deny),
            authz: tokio::sync::watch::Sender::new(authz),
            endpoint,
            tls_server: RwLock::new(tls_server),
            quic_down: std::sync::Mutex::new(HashMap::new()),
            quic_down_for: std::sync::Mutex::new(QUIC_DOWN_FOR),
            identity: RwLock::new(Arc::new(identity)),
            state,
            pool: tokio::sync::Mutex::new(HashMap::new()),
            dialing: std::sync::Mutex::new(HashMap::new()),
            mux_pool: std::sync::Mutex::new(HashMap::new()),
            mux_dialing: std::sync::Mutex::new(HashMap::new()),
            single_peers: std::sync::Mutex::new(std::collections::HashSet::new()),
            tcp_dials: std::sync::atomic::AtomicU64::new(0),
            tcp_only: std::sync::atomic::AtomicBool::new(false),
            opened: Default::default(),
            accepted: Default::default(),
            tls_clients: std::sync::Mutex::new(HashMap::new()),
            dials: std::sync::atomic::AtomicU64::new(0),
            connect_timeout,
            mark,
            idle_timeout,
            pool_idle: std::sync::Mutex::new(POOL_IDLE),
            mux_open: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        });
        tokio::spawn(t.clone().serve());
        tokio::spawn(t.clone().serve_tcp(tcp));
        tokio::spawn(release_idle_connections(Arc::downgrade(&t)));
        tokio::spawn(follow_deny_list(Arc::downgrade(&t)));
        Ok(t)
    }

    /// Completes once `peer`'s certificate is on the deny list (at once if it is already):
    /// a proxied connection through it is then cut ([`splice_until`]). Denying a serial is
    /// what removing an agent does, so a removed agent's open connections end within
    /// [`DENY_POLL`], both ways: this agent cuts the streams it accepted from the peer and
    /// the ones it opened to it.
    pub fn cut_when_denied(
        &self,
        peer: Arc<tls::PeerFacts>,
    ) -> impl std::future::Future<Output = ()> + Send + use<> {
        // Not `until_denied`: every proxied connection's task holds this future, and
        // this form is 24 bytes smaller (the size test in `outbound.rs`).
        let mut deny = self.deny.subscribe();
        async move {
            loop {
                if deny.borrow_and_update().contains(&peer.serial) {
                    tracing::info!(peer_identity = %peer.spiffe_id, serial = %peer.serial, "open tunnel stream cut: the peer's certificate is on the deny list");
                    return;
                }
                if deny.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    /// Completes, after logging that the connection is closed, once `peer`'s certificate
    /// is on the deny list (at once if it is already).
    fn connection_denied(
        &self,
        peer: Arc<tls::PeerFacts>,
    ) -> impl std::future::Future<Output = ()> + Send + use<> {
        until_denied(self.deny.subscribe(), peer)
    }

    /// Closes the pooled QUIC connections to peers whose certificate is denied now; their
    /// streams end with them. (Multiplexed TCP + TLS connections close themselves: their
    /// task waits on the deny list, see `dial_tcp`; accepted connections of both
    /// transports too, see `serve_connection` and `serve_mux`.)
    async fn close_denied(&self, deny: &std::collections::BTreeSet<String>) {
        let mut closed = Vec::new();
        self.pool.lock().await.retain(|key, c| {
            let keep = !deny.contains(&c.peer.serial);
            if !keep {
                c.conn.close(DENIED_CODE.into(), b"certificate denied");
                closed.push((key.0, c.peer.clone()));
            }
            keep
        });
        for (peer, facts) in closed {
            tracing::info!(%peer, peer_identity = %facts.spiffe_id, serial = %facts.serial, "tunnel connection closed: the peer's certificate is on the deny list");
        }
    }

    /// Sets how long a pooled connection may go without a new stream before it is
    /// released (tests; [`POOL_IDLE`] otherwise).
    #[cfg(test)]
    pub(crate) fn set_pool_idle(&self, idle: Duration) {
        *self.pool_idle.lock().unwrap_or_else(|p| p.into_inner()) = idle;
    }

    fn pool_idle(&self) -> Duration {
        *self.pool_idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the pooled connections (both transports) that were given no new stream for
    /// the pool's idle time; each closes once its last stream ends (quinn closes a
    /// connection when its last handle and stream are gone; HTTP/2 sends GOAWAY when its
    /// last sender and stream are).
    async fn release_idle(&self) {
        let idle = self.pool_idle();
        let now = tokio::time::Instant::now();
        let mut released = Vec::new();
        self.pool.lock().await.retain(|key, c| {
            let keep = c.idle_for(now) < idle;
            if !keep {
                released.push(key.0);
            }
            keep
        });
        self.mux_pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|key, c| {
                let keep = c.idle_for(now) < idle;
                if !keep {
                    released.push(key.0);
                }
                keep
            });
        for peer in &released {
            tracing::debug!(%peer, idle_secs = idle.as_secs(), "idle tunnel connection released");
        }
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

    fn bundle(identity: &Identity, state: &SharedState) -> Vec<Vec<u8>> {
        let s = state.read().unwrap_or_else(|p| p.into_inner());
        if s.trust_bundle_der.is_empty() {
            identity.bundle_der.clone()
        } else {
            s.trust_bundle_der.clone()
        }
    }

    fn server_configs(
        identity: &Identity,
        state: &SharedState,
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
        let (server, tls_server) = Self::server_configs(&identity, &self.state)?;
        self.endpoint.set_server_config(Some(server));
        *self.tls_server.write().unwrap_or_else(|p| p.into_inner()) = tls_server;
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(identity);
        tracing::info!("tunnel uses the renewed certificate for new connections");
        Ok(())
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"agent stopping");
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
        let version = self.state.read().unwrap_or_else(|p| p.into_inner()).version;
        let mut cache = self.tls_clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(expected)
            && c.version == version
            && Arc::ptr_eq(&c.identity, &identity)
        {
            return Ok(if tcp { c.tcp.clone() } else { c.config.clone() });
        }
        // Read after `version`: a change in between makes the next call rebuild, never
        // keeps an older deny list than the version says.
        let deny = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .deny_serials
            .clone();
        let config = tls::client_config(
            &identity,
            &Self::bundle(&identity, &self.state),
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

    async fn connection(
        &self,
        peer: SocketAddr,
        expected: &str,
    ) -> Result<Pooled<quinn::Connection>, TunnelError> {
        let key = (peer, expected.to_owned());
        if let Some(c) = self.pooled(&key).await {
            return Ok(c);
        }
        // Single flight: many connections opened at once towards a peer (a start, a burst)
        // share one dial instead of each making a QUIC connection, which with UDP blocked
        // would be hundreds of handshakes waiting out their timeout together.
        let dial = DialState::of(&self.dialing, &key);
        let waited_from = tokio::time::Instant::now();
        let mut last_failure = dial.0.lock().await;
        if let Some(c) = self.pooled(&key).await {
            return Ok(c);
        }
        if let Some(e) = DialState::failed_meanwhile(&last_failure, waited_from, peer) {
            return Err(e);
        }
        let result = self.dial(peer, expected).await;
        match &result {
            Ok(conn) => {
                *last_failure = None;
                self.pool.lock().await.insert(key, conn.clone());
            }
            Err(e) => {
                *last_failure = Some((tokio::time::Instant::now(), e.to_string()));
            }
        }
        result
    }

    /// How many QUIC connections this tunnel has dialled.
    pub fn quic_dials(&self) -> u64 {
        self.dials.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The current path MTU (largest UDP payload) of each pooled QUIC connection.
    #[cfg(test)]
    pub(crate) async fn path_mtus(&self) -> Vec<u16> {
        self.pool
            .lock()
            .await
            .values()
            .map(|c| c.conn.stats().path.current_mtu)
            .collect()
    }

    /// How many TCP + TLS connections this tunnel has dialled.
    pub fn tcp_dials(&self) -> u64 {
        self.tcp_dials.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The pooled connection for `key`, if it is still open and may carry new streams
    /// ([`Self::reusable`]); one that may not is forgotten, so the next stream dials a
    /// new connection, while the streams it carries go on until they end.
    async fn pooled(&self, key: &PoolKey) -> Option<Pooled<quinn::Connection>> {
        let mut pool = self.pool.lock().await;
        let c = pool.get(key)?;
        if c.conn.close_reason().is_some() {
            pool.remove(key);
            return None;
        }
        if !self.reusable(key, &c.peer, &c.identity) {
            pool.remove(key);
            return None;
        }
        Some(c.take())
    }

    /// Whether a pooled connection may carry new streams: it was dialled with this agent's
    /// current certificate (after a renewal, new streams get new connections that present
    /// the new one), and the peer's certificate it was authenticated with is still
    /// trusted (not denied or expired since).
    fn reusable(&self, key: &PoolKey, peer: &tls::PeerFacts, dialled_as: &Arc<Identity>) -> bool {
        let current = self
            .identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !Arc::ptr_eq(&current, dialled_as) {
            tracing::info!(peer = %key.0, "renewed certificate: new streams to the peer get a new tunnel connection");
            return false;
        }
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        if let Err(why) = peer.still_trusted(&state.deny_serials) {
            tracing::warn!(peer = %key.0, reason = %why, "the pooled tunnel connection takes no new streams");
            return false;
        }
        true
    }

    /// Makes a new QUIC connection to `peer`, which must present `expected`.
    async fn dial(
        &self,
        peer: SocketAddr,
        expected: &str,
    ) -> Result<Pooled<quinn::Connection>, TunnelError> {
        self.dials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Read before the TLS configuration is: a renewal in between makes the
        // connection look older than it is (it is replaced sooner), never newer.
        let identity = self
            .identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let tls = self.client_tls(expected, false)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| tls::TlsError::Identity(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport());
        let err = |message: String| TunnelError::Connect { peer, message };
        let connecting = self
            .endpoint
            .connect_with(cfg, peer, tls::SERVER_NAME)
            .map_err(|e| err(e.to_string()))?;
        let conn = tokio::time::timeout(self.connect_timeout.min(QUIC_TIMEOUT), connecting)
            .await
            .map_err(|_| err("no QUIC answer in time (UDP blocked?)".into()))?
            .map_err(|e| err(e.to_string()))?;
        let facts = conn
            .peer_identity()
            .and_then(|a| {
                a.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|c| c.first().map(|d| tls::peer_facts(d)))
            .ok_or_else(|| err("the peer presented no certificate".into()))?
            .map_err(err)?;
        tracing::debug!(%peer, identity = expected, "tunnel connection up");
        Ok(Pooled::new(conn, Arc::new(facts), identity))
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
        let down_for = *self.quic_down_for.lock().unwrap_or_else(|p| p.into_inner());
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

    /// Dials QUIC to `peer` in the background; when it works, the peer leaves `quic_down`
    /// and its next streams use the pooled QUIC connection the probe made.
    fn probe_quic(self: &Arc<Self>, peer: SocketAddr, expected: String) {
        let me = self.clone();
        tokio::spawn(async move {
            match me.connection(peer, &expected).await {
                Ok(_) => {
                    me.quic_down
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&peer);
                    tracing::info!(%peer, "QUIC to the peer agent works again; new streams use it");
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "QUIC probe failed; staying on TCP + TLS")
                }
            }
        });
    }

    /// Sets how long a peer stays on TCP + TLS between QUIC probes (tests).
    #[cfg(test)]
    pub(crate) fn set_quic_down_for(&self, d: Duration) {
        *self.quic_down_for.lock().unwrap_or_else(|p| p.into_inner()) = d;
    }

    async fn open_tcp(
        &self,
        peer: SocketAddr,
        expected: &str,
        header: &Header,
    ) -> Result<Opened, TunnelError> {
        let bytes = bytes::Bytes::from(header.encode()?);
        let key = (peer, expected.to_owned());
        let stream_err = |message: String| TunnelError::Stream { peer, message };
        let mut last = None;
        // A pooled connection may have died since it was last used: one fresh attempt.
        for _ in 0..2 {
            let conn = match self.mux_connection(&key).await? {
                TcpDial::Single(mut stream, peer) => {
                    stream
                        .write_all(&bytes)
                        .await
                        .map_err(|e| stream_err(e.to_string()))?;
                    return Ok(Opened {
                        transport: Transport::TcpTls,
                        stream: TunnelStream::Tls(stream),
                        peer,
                    });
                }
                TcpDial::Mux(c) => c,
            };
            match open_mux_stream(&conn.conn, bytes.clone()).await {
                Ok(side) => {
                    return Ok(Opened {
                        transport: Transport::TcpTls,
                        stream: TunnelStream::Mux(side),
                        peer: conn.peer.clone(),
                    });
                }
                Err(e) => {
                    let mut pool = self.mux_pool.lock().unwrap_or_else(|p| p.into_inner());
                    if pool
                        .get(&key)
                        .is_some_and(|c| Arc::ptr_eq(&c.conn.closed, &conn.conn.closed))
                    {
                        pool.remove(&key);
                    }
                    last = Some(e);
                }
            }
        }
        Err(stream_err(last.unwrap_or_default()))
    }

    /// The pooled multiplexed connection for `key` if it is open and still trusted.
    fn mux_pooled(&self, key: &PoolKey) -> Option<Pooled<MuxConn>> {
        let mut pool = self.mux_pool.lock().unwrap_or_else(|p| p.into_inner());
        let c = pool.get(key)?;
        if c.conn.closed.load(std::sync::atomic::Ordering::Acquire) {
            pool.remove(key);
            return None;
        }
        if !self.reusable(key, &c.peer, &c.identity) {
            // Dropping the last handle ends the connection once its streams end; new
            // streams dial again and verify in full.
            pool.remove(key);
            return None;
        }
        Some(c.take())
    }

    /// A multiplexed TCP + TLS connection to the peer of `key` (pooled, or dialled once
    /// for every open waiting on it), or a connection of its own for a peer of an older
    /// version.
    async fn mux_connection(&self, key: &PoolKey) -> Result<TcpDial, TunnelError> {
        let (peer, expected) = (key.0, key.1.as_str());
        if let Some(c) = self.mux_pooled(key) {
            return Ok(TcpDial::Mux(c));
        }
        if self
            .single_peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
        {
            return self.dial_tcp(peer, expected).await;
        }
        let dial = DialState::of(&self.mux_dialing, key);
        let waited_from = tokio::time::Instant::now();
        let mut last_failure = dial.0.lock().await;
        if let Some(c) = self.mux_pooled(key) {
            return Ok(TcpDial::Mux(c));
        }
        if let Some(e) = DialState::failed_meanwhile(&last_failure, waited_from, peer) {
            return Err(e);
        }
        let result = self.dial_tcp(peer, expected).await;
        match &result {
            Ok(TcpDial::Mux(c)) => {
                *last_failure = None;
                self.mux_pool
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), c.clone());
            }
            Ok(TcpDial::Single(..)) => {
                *last_failure = None;
                tracing::info!(%peer, "the peer agent does not multiplex TCP + TLS (an older version): one connection per stream");
                self.single_peers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone());
            }
            Err(e) => *last_failure = Some((tokio::time::Instant::now(), e.to_string())),
        }
        result
    }

    /// Dials TCP, handshakes TLS (the peer must present `expected`) and, when the peer
    /// chose the multiplexed protocol, HTTP/2.
    async fn dial_tcp(&self, peer: SocketAddr, expected: &str) -> Result<TcpDial, TunnelError> {
        self.tcp_dials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // As in `dial`: read before the TLS configuration.
        let identity = self
            .identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let tls = self.client_tls(expected, true)?;
        let err = |message: String| TunnelError::Connect { peer, message };
        let tcp = connect_tcp(peer, self.mark, self.connect_timeout)
            .await
            .map_err(|e| err(e.to_string()))?;
        if let Err(e) = tune_tunnel_socket(&tcp) {
            tracing::warn!(%peer, error = %e, "cannot set keepalive on the tunnel connection");
        }
        let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).expect("literal");
        let stream = tokio::time::timeout(
            self.connect_timeout,
            tokio_rustls::TlsConnector::from(tls).connect(name, ReadAhead::new(tcp)),
        )
        .await
        .map_err(|_| err("TLS handshake timed out".into()))?
        .map_err(|e| err(e.to_string()))?;
        let stream = Box::new(stream);
        let facts = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| err("the peer presented no certificate".into()))
            .and_then(|leaf| tls::peer_facts(leaf).map_err(err))?;
        if stream.get_ref().1.alpn_protocol() != Some(mux::ALPN_MUX) {
            return Ok(TcpDial::Single(stream, Arc::new(facts)));
        }
        let (send, conn) = tokio::time::timeout(
            self.connect_timeout,
            mux::client_builder().handshake::<_, bytes::Bytes>(stream),
        )
        .await
        .map_err(|_| err("HTTP/2 handshake timed out".into()))?
        .map_err(|e| err(format!("HTTP/2 handshake: {e}")))?;
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = closed.clone();
        let open = OpenGuard::new(&self.mux_open);
        let facts = Arc::new(facts);
        let denied = self.connection_denied(facts.clone());
        tokio::spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "multiplexed tunnel connection ended");
                },
                // Dropping the connection closes its TCP connection; every stream on it
                // fails.
                () = denied => {}
            }
            flag.store(true, std::sync::atomic::Ordering::Release);
            drop(open);
        });
        tracing::debug!(%peer, identity = expected, "multiplexed TCP + TLS tunnel connection up");
        Ok(TcpDial::Mux(Pooled::new(
            MuxConn { send, closed },
            facts,
            identity,
        )))
    }

    async fn open_quic(
        &self,
        peer: SocketAddr,
        expected: &str,
        header: &Header,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, Arc<tls::PeerFacts>), TunnelError> {
        let bytes = header.encode()?;
        let mut last = None;
        // A pooled connection may have died since it was last used: one fresh attempt.
        for _ in 0..2 {
            let Pooled {
                conn, peer: facts, ..
            } = self.connection(peer, expected).await?;
            match conn.open_bi().await {
                Ok((mut send, recv)) => {
                    send.write_all(&bytes)
                        .await
                        .map_err(|e| TunnelError::Stream {
                            peer,
                            message: e.to_string(),
                        })?;
                    return Ok((send, recv, facts));
                }
                Err(e) => {
                    let mut pool = self.pool.lock().await;
                    let key = (peer, expected.to_owned());
                    if pool
                        .get(&key)
                        .is_some_and(|c| c.conn.stable_id() == conn.stable_id())
                    {
                        pool.remove(&key);
                    }
                    last = Some(e.to_string());
                }
            }
        }
        Err(TunnelError::Stream {
            peer,
            message: last.unwrap_or_default(),
        })
    }

    async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let Ok((tcp, remote)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                if let Err(e) = tune_tunnel_socket(&tcp) {
                    tracing::warn!(peer = %remote, error = %e, "cannot set keepalive on the tunnel connection");
                }
                let cfg = me
                    .tls_server
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                // Boxed: the handshake's and the stream's TLS state stay out of the task,
                // which lives as long as the connection.
                let tls = match tokio::time::timeout(
                    HEADER_TIMEOUT,
                    Box::pin(tokio_rustls::TlsAcceptor::from(cfg).accept(ReadAhead::new(tcp))),
                )
                .await
                {
                    Ok(Ok(t)) => Box::new(t),
                    Ok(Err(e)) => {
                        tracing::info!(peer = %remote, error = %e, "tunnel TLS handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
                let leaf = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|d| d.to_vec());
                let deny = me
                    .state
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .deny_serials
                    .clone();
                let peer = match leaf
                    .ok_or_else(|| "no client certificate".to_owned())
                    .and_then(|l| tls::check_peer(&l, None, &deny))
                {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(peer = %remote, error = %e, "tunnel connection refused");
                        return;
                    }
                };
                if tls.get_ref().1.alpn_protocol() == Some(mux::ALPN_MUX) {
                    me.serve_mux(peer, remote, tls).await;
                    return;
                }
                let mut tls = tls;
                let header =
                    match tokio::time::timeout(HEADER_TIMEOUT, Header::read(&mut *tls)).await {
                        Ok(Ok(h)) => h,
                        Ok(Err(e)) => {
                            tracing::warn!(peer = %remote, error = %e, "tunnel stream refused");
                            return;
                        }
                        Err(_) => return,
                    };
                // A refused stream over TCP + TLS is closed with its connection.
                me.serve_app(
                    &Arc::new(peer),
                    remote,
                    Transport::TcpTls,
                    header,
                    tls,
                    |t, _| drop(t),
                )
                .await;
            });
        }
    }

    /// Serves the streams of a multiplexed TCP + TLS connection.
    async fn serve_mux(
        self: Arc<Self>,
        peer: tls::PeerFacts,
        remote: SocketAddr,
        tls: Box<tokio_rustls::server::TlsStream<ReadAhead>>,
    ) {
        let mut conn = match tokio::time::timeout(
            HEADER_TIMEOUT,
            mux::server_builder().handshake::<_, bytes::Bytes>(tls),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::info!(peer = %remote, error = %e, "tunnel HTTP/2 handshake refused");
                return;
            }
            Err(_) => return,
        };
        tracing::info!(peer = %remote, peer_identity = %peer.spiffe_id, "tunnel connection accepted (TCP + TLS, multiplexed)");
        let _open = OpenGuard::new(&self.mux_open);
        let peer = Arc::new(peer);
        let mut denied = std::pin::pin!(self.connection_denied(peer.clone()));
        // Accepting also drives the connection: its streams move only while this runs.
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                // Dropping the connection closes its TCP connection; every stream on
                // it fails.
                () = &mut denied => break,
            };
            let (request, respond) = match next {
                Some(Ok(r)) => r,
                Some(Err(e)) => {
                    tracing::debug!(peer = %remote, error = %e, "multiplexed tunnel connection ended");
                    break;
                }
                None => break,
            };
            let (me, peer) = (self.clone(), peer.clone());
            tokio::spawn(async move { me.serve_mux_stream(&peer, remote, request, respond).await });
        }
    }

    async fn serve_mux_stream(
        &self,
        peer: &Arc<tls::PeerFacts>,
        remote: SocketAddr,
        request: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<bytes::Bytes>,
    ) {
        if !mux::is_tunnel_request(&request) {
            tracing::warn!(peer = %remote, method = %request.method(), path = %request.uri().path(), "tunnel stream refused: not a tunnel request");
            let mut not_found = http::Response::new(());
            *not_found.status_mut() = http::StatusCode::NOT_FOUND;
            let _ = respond.send_response(not_found, true);
            return;
        }
        let Ok(send) = respond.send_response(http::Response::new(()), false) else {
            return;
        };
        let mut side = MuxSide {
            send: MuxWrite::new(send),
            recv: MuxRead::body(request.into_body()),
        };
        let header = match tokio::time::timeout(HEADER_TIMEOUT, Header::read(&mut side.recv)).await
        {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::warn!(peer = %remote, error = %e, "tunnel stream refused");
                side.send.reset(h2::Reason::PROTOCOL_ERROR);
                return;
            }
            Err(_) => {
                side.send.reset(h2::Reason::CANCEL);
                return;
            }
        };
        self.serve_app(peer, remote, Transport::TcpTls, header, side, |mut m, _| {
            m.send.reset(h2::Reason::REFUSED_STREAM);
        })
        .await;
    }

    /// Authorizes, connects to the local application and splices. `refuse` closes the
    /// stream with an error code when that fails.
    async fn serve_app<S: Side>(
        &self,
        peer: &Arc<tls::PeerFacts>,
        remote: SocketAddr,
        transport: Transport,
        header: Header,
        side: S,
        refuse: impl FnOnce(S, u32),
    ) {
        // Only the ports this host's own workload registered are reachable through the
        // tunnel: never arbitrary loopback services (admin APIs, databases bound to lo).
        // The connection may be older than the deny list: a peer denied since opens no
        // new stream on it. (Expiry is the client's to act on: it redials after renewing;
        // refusing here would break agents of older versions, which keep their pooled
        // connection across a renewal.)
        let denied = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .deny_serials
            .contains(&peer.serial);
        if denied {
            tracing::warn!(peer = %remote, peer_identity = %peer.spiffe_id, serial = %peer.serial, "tunnel stream refused: the peer's certificate is on the deny list");
            refuse(side, 1);
            return;
        }
        let (served, own) = self.own_workload();
        if !served.contains(&header.port) {
            tracing::warn!(peer_identity = %peer.spiffe_id, port = header.port, served = ?served, "tunnel stream refused: not a port of this host's workload");
            refuse(side, 3);
            return;
        }
        let decision =
            self.authz
                .borrow()
                .decide(Some(&peer.spiffe_id), remote.ip(), own, header.port);
        if !decision.allow {
            tracing::warn!(peer = %remote, peer_identity = %peer.spiffe_id, service = %header.service, port = header.port, policy = decision.policy_label(), "tunnel stream denied by policy");
            refuse(side, 3);
            return;
        }
        let app = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, header.port));
        let tcp = match connect_tcp(app, self.mark, self.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(peer_identity = %peer.spiffe_id, %app, error = %e, "local application unreachable");
                refuse(side, 2);
                return;
            }
        };
        self.accepted[transport as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(peer = %remote, peer_identity = %peer.spiffe_id, service = %header.service, port = header.port, %transport, policy = decision.policy_label(), "inbound tunnel stream");
        let cut = self.cut_when_refused(peer.clone(), remote.ip(), own, header.port);
        let done = splice_until(side, tcp, self.idle_timeout, cut).await;
        tracing::debug!(peer_identity = %peer.spiffe_id, bytes_in = done.a_to_b, bytes_out = done.b_to_a, end = ?done.end, "inbound stream done");
    }

    /// Calls `f` with each of this agent's own registered endpoints (`agents/<agent id>`,
    /// one per service it registered under).
    fn for_own_endpoints(&self, mut f: impl FnMut(&causeway_api::push::EndpointState)) {
        let me = format!(
            "agents/{}",
            self.identity
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .info
                .agent_id
        );
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        for e in state.services.values().filter_map(|s| s.endpoints.get(&me)) {
            f(e);
        }
    }

    /// Completes when an accepted stream must be cut: its peer's certificate was denied,
    /// or a policy change denies it now (decided again on every change of the policies
    /// or of this workload's labels; connections still allowed are untouched).
    fn cut_when_refused(
        &self,
        peer: Arc<tls::PeerFacts>,
        source: std::net::IpAddr,
        destination: std::net::IpAddr,
        port: u16,
    ) -> impl std::future::Future<Output = ()> + Send + use<> {
        let mut deny = self.deny.subscribe();
        let mut authz = self.authz.subscribe();
        authz.mark_unchanged();
        async move {
            loop {
                if deny.borrow_and_update().contains(&peer.serial) {
                    tracing::info!(peer_identity = %peer.spiffe_id, serial = %peer.serial, "open tunnel stream cut: the peer's certificate is on the deny list");
                    return;
                }
                tokio::select! {
                    r = deny.changed() => {
                        if r.is_err() {
                            return std::future::pending().await;
                        }
                    }
                    r = authz.changed() => {
                        if r.is_err() {
                            return std::future::pending().await;
                        }
                        let view = authz.borrow_and_update().clone();
                        let d = view.decide(Some(&peer.spiffe_id), source, destination, port);
                        if !d.allow {
                            tracing::warn!(peer = %source, peer_identity = %peer.spiffe_id, port, policy = d.policy_label(), "open tunnel stream cut: a policy change denies it");
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Ports and address of this agent's own registered workload (endpoint
    /// `agents/<agent id>`; the address is unspecified when it has none), in one pass.
    fn own_workload(&self) -> (std::collections::BTreeSet<u16>, std::net::IpAddr) {
        let mut ports = std::collections::BTreeSet::new();
        let mut addr = None;
        self.for_own_endpoints(|e| {
            ports.extend(e.ports.values().copied());
            addr = addr.or_else(|| e.address.parse().ok());
        });
        (
            ports,
            addr.unwrap_or(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        )
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
        let mut denied = std::pin::pin!(self.connection_denied(peer.clone()));
        loop {
            tokio::select! {
                next = conn.accept_bi() => {
                    let Ok((send, recv)) = next else { break };
                    let (me, peer) = (self.clone(), peer.clone());
                    tokio::spawn(async move { me.serve_stream(&peer, remote, send, recv).await });
                }
                () = &mut denied => {
                    conn.close(DENIED_CODE.into(), b"certificate denied");
                    break;
                }
            }
        }
    }

    async fn serve_stream(
        &self,
        peer: &Arc<tls::PeerFacts>,
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
        self.serve_app(
            peer,
            remote,
            Transport::Quic,
            header,
            QuicSide { send, recv },
            |mut q, code| {
                let _ = q.send.reset(code.into());
                let _ = q.recv.stop(code.into());
            },
        )
        .await;
    }
}

/// Opens a stream on a multiplexed connection and sends the header.
/// Counts one open connection in a gauge for as long as it lives.
struct OpenGuard(Arc<std::sync::atomic::AtomicU64>);

impl OpenGuard {
    fn new(gauge: &Arc<std::sync::atomic::AtomicU64>) -> Self {
        gauge.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(gauge.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How often the mesh state's deny list is compared with the one open streams watch.
const DENY_POLL: Duration = Duration::from_millis(500);

/// Completes once `peer`'s serial is in the deny set `deny` follows, logging that the
/// connection is closed.
async fn until_denied(
    mut deny: tokio::sync::watch::Receiver<Arc<std::collections::BTreeSet<String>>>,
    peer: Arc<tls::PeerFacts>,
) {
    loop {
        if deny.borrow_and_update().contains(&peer.serial) {
            tracing::info!(peer_identity = %peer.spiffe_id, serial = %peer.serial, "tunnel connection closed: the peer's certificate is on the deny list");
            return;
        }
        if deny.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// QUIC application close code of a connection closed because the peer's certificate
/// was denied (1: no client certificate, 2: certificate refused at the handshake).
const DENIED_CODE: u32 = 3;

/// Publishes changes of the deny list to open streams ([`Tunnel::cut_when_denied`]) and
/// connections, and closes pooled connections to denied peers, until the tunnel is gone.
async fn follow_deny_list(tunnel: std::sync::Weak<Tunnel>) {
    loop {
        tokio::time::sleep(DENY_POLL).await;
        let Some(t) = tunnel.upgrade() else { return };
        let changed = {
            let state = t.state.read().unwrap_or_else(|p| p.into_inner());
            (**t.deny.borrow() != state.deny_serials).then(|| Arc::new(state.deny_serials.clone()))
        };
        let authz = {
            let (spiffe, group) = {
                let id = t.identity.read().unwrap_or_else(|p| p.into_inner());
                (id.spiffe_id.to_string(), id.info.group.clone())
            };
            let state = t.state.read().unwrap_or_else(|p| p.into_inner());
            (!t.authz.borrow().is_current(&state, &spiffe, &group))
                .then(|| Arc::new(super::authz::LocalAuthz::build(&state, &spiffe, &group)))
        };
        if let Some(authz) = authz {
            tracing::info!(
                policies = authz.selected(),
                "authorization policies for this workload changed"
            );
            t.authz.send_replace(authz);
        }
        if let Some(deny) = changed {
            // Streams and accepted connections first (they wait on the channel), then
            // the pooled QUIC connections, which need the pool's lock.
            t.deny.send_replace(deny.clone());
            t.close_denied(&deny).await;
        }
    }
}

/// Releases idle pooled connections of the tunnel behind `tunnel` every quarter of its
/// pool idle time (at most every 30 s), until the tunnel is gone.
async fn release_idle_connections(tunnel: std::sync::Weak<Tunnel>) {
    loop {
        let Some(every) = tunnel
            .upgrade()
            .map(|t| (t.pool_idle() / 4).clamp(Duration::from_millis(50), Duration::from_secs(30)))
        else {
            return;
        };
        tokio::time::sleep(every).await;
        let Some(t) = tunnel.upgrade() else { return };
        t.release_idle().await;
    }
}

async fn open_mux_stream(conn: &MuxConn, header: bytes::Bytes) -> Result<MuxSide, String> {
    let mut send = conn
        .send
        .clone()
        .ready()
        .await
        .map_err(|e| format!("multiplexed connection: {e}"))?;
    let (response, mut body) = send
        .send_request(mux::request(), false)
        .map_err(|e| format!("opening a stream: {e}"))?;
    body.send_data(header, false)
        .map_err(|e| format!("sending the header: {e}"))?;
    Ok(MuxSide {
        send: MuxWrite::new(body),
        recv: MuxRead::response(response),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
