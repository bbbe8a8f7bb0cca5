//! The agent's DNS server on 127.0.0.1:15053 (UDP and TCP).
//!
//! Mesh names — `<svc>.<ns>.svc.cluster.local`, `<svc>.service.consul`,
//! `<svc>.service.<dc>.consul`, `<tag>.<svc>.service.consul`, Eureka VIP names and
//! `<svc>.<ns>.causeway` — are answered from the applied config (also the cached one,
//! before the controller is reached) through a name [`index::Index`] rebuilt once per
//! config version. Everything else is forwarded unchanged to the host's original
//! resolvers ([`forward`]). Messages are parsed and built with hickory-proto
//! ([`answer`]).
//!
//! Answers to forwarded names are kept in a [`cache`] (positive for their TTL, negative
//! per RFC 2308; `[dns] cache = false` turns it off), emptied whenever the resolver
//! configuration changes.
//!
//! Threads: UDP is served by one plain thread per listening socket (receive a batch of
//! queries with `recvmmsg`, look up the mesh names or the cache, send the batch's
//! answers with `sendmmsg`: no task switch, no lock and no allocation per query on the
//! hot path); forwarded UDP queries leave from that thread too and their answers come
//! back on the forwarder's own threads ([`forward`]). TCP connections are tokio tasks.
//!
//! Reaching the server: with `[dns] mode = "capture"` (and data-plane capture on)
//! nftables owner tables (`ip`, and `ip6` for IPv6 nameservers) redirect port 53 to it
//! ([`nft`]) — removed by the kernel when the agent dies, and by the agent whenever it
//! cannot serve (listener down, or neither a config nor an upstream to answer from).
//! The server listens on `listen` (127.0.0.1:15053) and on `[::1]` at the same port.
//! `mode = "resolv-conf"` rewrites the resolver configuration instead ([`resolvconf`]).

pub mod answer;
pub mod cache;
pub mod forward;
pub mod index;
pub mod metrics;
pub mod nft;
pub mod resolvconf;
pub mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::config::{DnsConfig, DnsMode};
use crate::push::SharedState;
use answer::{Outcome, Transport};
use cache::{Cache, QueryInfo};
use forward::Forwarder;
use index::{Index, Zones};
use metrics::DnsMetrics;

/// What the running agent reports about its DNS server (`dns.json` in the state dir).
pub const STATUS_FILE: &str = "dns.json";

/// Checks a configured domain (`cluster.local`); the reason when it is not one.
pub fn check_domain(d: &str) -> Result<(), &'static str> {
    match index::normalize(d) {
        Some(_) => Ok(()),
        None => Err(
            "is not a DNS domain: use letters, digits and '-' in dot-separated labels, e.g. \"cluster.local\"",
        ),
    }
}

/// The DNS server's state as written to [`STATUS_FILE`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStatus {
    /// The listener.
    pub listen: Option<SocketAddr>,
    /// Whether it is serving.
    pub serving: bool,
    /// Whether the port-53 capture table should be live.
    pub capture: bool,
    /// The mark exempt from capture.
    pub mark: u32,
    /// The upstream resolvers.
    pub upstreams: Vec<SocketAddr>,
    /// Whether DNS capture is configured (`[dns] mode = "capture"`, capture not turned
    /// off), installed or not.
    #[serde(default)]
    pub capture_wanted: bool,
    /// Why the capture is configured but not installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_error: Option<String>,
}

/// Why the DNS server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// A listener could not be bound.
    #[error(
        "cannot listen for DNS on {addr} ({proto}): {source}; another program holds it: change [dns] listen, or stop that program"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// "UDP" or "TCP".
        proto: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The resolver configuration could not be changed (mode "resolv-conf").
    #[error(
        "cannot point {path} at the agent: {source}; check permissions, or use [dns] mode = \"capture\""
    )]
    ResolvConf {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What the query path shares between threads and tasks.
struct Shared {
    state: SharedState,
    zones: Zones,
    index: RwLock<Arc<Index>>,
    forwarder: RwLock<Arc<Forwarder>>,
    cache: Option<Arc<Cache>>,
}

impl Shared {
    /// The index for the current config version (rebuilt here when a push changed it).
    fn index(&self) -> Arc<Index> {
        let st = self.state.get();
        {
            let cur = self.index.read().unwrap_or_else(|p| p.into_inner());
            if cur.version == st.version {
                return cur.clone();
            }
        }
        let built = Arc::new(Index::build(&st, &self.zones));
        tracing::debug!(
            version = built.version,
            names = built.len(),
            "DNS name index rebuilt"
        );
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = built.clone();
        built
    }

    fn forwarder(&self) -> Arc<Forwarder> {
        self.forwarder
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A forwarded name over UDP: from the cache when it holds the answer, else sent
    /// upstream (the answer goes back to `src` from `sock` on the forwarder's thread).
    /// True when the answer to send back is in `out` (a cache hit, or SERVFAIL).
    fn forward_udp(
        &self,
        packet: &mut [u8],
        src: SocketAddr,
        sock: &Arc<std::net::UdpSocket>,
        out: &mut Vec<u8>,
    ) -> bool {
        let info = self.cache.as_ref().and_then(|_| QueryInfo::parse(packet));
        let generation = match (&self.cache, &info) {
            (Some(c), Some(i)) => {
                if c.lookup(i, packet, Instant::now(), i.udp_limit, out) {
                    return true;
                }
                c.generation()
            }
            _ => 0,
        };
        if !self
            .forwarder()
            .udp_query(packet, src, sock, info, generation)
            && let Outcome::Answer(b) = answer::servfail(packet)
        {
            tracing::warn!(
                "DNS query not forwarded (no upstream, or too many waiting); answering SERVFAIL"
            );
            out.clear();
            out.extend_from_slice(&b);
            return true;
        }
        false
    }

    /// A forwarded name over TCP: from the cache, else upstream over a kept connection.
    async fn forward_tcp(&self, q: &[u8]) -> Option<Vec<u8>> {
        let info = self.cache.as_ref().and_then(|_| QueryInfo::parse(q));
        let mut generation = 0;
        if let (Some(c), Some(i)) = (&self.cache, &info) {
            let mut out = Vec::new();
            if c.lookup(i, q, Instant::now(), usize::from(u16::MAX), &mut out) {
                return Some(out);
            }
            generation = c.generation();
        }
        let resp = self.forwarder().tcp(q).await?;
        if let (Some(c), Some(i)) = (&self.cache, &info) {
            c.insert(generation, i, q, &resp, Instant::now());
        }
        Some(resp)
    }

    /// The resolver configuration changed: new upstreams (unless configured) and an
    /// empty cache.
    fn resolv_changed(&self, cfg: &DnsConfig, own: &[IpAddr]) {
        if cfg.upstreams.is_empty() && cfg.mode != DnsMode::ResolvConf {
            let f = self
                .forwarder()
                .with_upstreams(upstreams_of(cfg, own, None));
            tracing::info!(upstreams = ?f.upstreams, "resolver configuration changed; new upstreams");
            *self.forwarder.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(f);
        }
        if let Some(c) = &self.cache {
            c.clear();
            tracing::info!("resolver configuration changed; DNS cache emptied");
        }
    }
}

/// Modification times of the resolver configuration (resolv.conf, and the file
/// systemd-resolved lists its upstreams in).
fn resolv_mtimes(cfg: &DnsConfig) -> [Option<SystemTime>; 2] {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    [
        m(&cfg.resolv_conf),
        m(Path::new(upstream::RESOLVED_UPSTREAMS)),
    ]
}

/// The running DNS server.
pub struct Dns {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    alive: Vec<Arc<AtomicBool>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    capture: Arc<Mutex<Option<nft::DnsCapture>>>,
    resolv: Option<resolvconf::ResolvGuard>,
    status_file: PathBuf,
    metrics: Arc<DnsMetrics>,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns").finish_non_exhaustive()
    }
}

fn zones_of(cfg: &DnsConfig) -> Zones {
    Zones {
        cluster_domains: cfg.cluster_domains.clone(),
        consul_domain: cfg.consul_domain.clone(),
        eureka_suffixes: cfg.eureka_suffixes.clone(),
        eureka_bare_names: cfg.eureka_bare_names,
        causeway_domain: cfg.causeway_domain.clone(),
        ttl: u32::try_from(cfg.ttl.as_secs()).unwrap_or(u32::MAX),
    }
}

fn upstreams_of(cfg: &DnsConfig, own: &[IpAddr], resolv_text: Option<&str>) -> Vec<SocketAddr> {
    if !cfg.upstreams.is_empty() {
        return cfg
            .upstreams
            .iter()
            .filter_map(|u| upstream::parse_upstream(u))
            .collect();
    }
    let rc = match resolv_text {
        Some(t) => upstream::ResolvConf::parse(t),
        None => upstream::ResolvConf::load(&cfg.resolv_conf, Path::new(upstream::RESOLVED_UPSTREAMS))
            .unwrap_or_else(|e| {
                tracing::warn!(path = %cfg.resolv_conf.display(), error = %e, "cannot read the resolver configuration; names outside the mesh cannot be forwarded");
                upstream::ResolvConf::default()
            }),
    };
    rc.upstreams(own)
}

/// The nameservers applications use (resolv.conf as written; none → libc's default
/// 127.0.0.1); IPv6 ones only with `ipv6` (the server listens on [::1]).
fn app_resolvers(path: &Path, ipv6: bool) -> Vec<IpAddr> {
    let rc = std::fs::read_to_string(path)
        .map(|t| upstream::ResolvConf::parse(&t))
        .unwrap_or_default();
    let mut v: Vec<IpAddr> = rc
        .nameservers
        .iter()
        .filter(|n| n.is_ipv4() || ipv6)
        .copied()
        .collect();
    if rc.nameservers.is_empty() {
        v.push(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    }
    v.sort();
    v.dedup();
    v
}

fn bind_udp(addr: SocketAddr) -> Result<std::net::UdpSocket, DnsError> {
    let err = |source| DnsError::Bind {
        addr,
        proto: "UDP",
        source,
    };
    std::net::UdpSocket::bind(addr).map_err(err)
}

/// Most datagrams one receive (`recvmmsg`) takes and one send (`sendmmsg`) gives.
const BATCH: usize = quinn::udp::BATCH_SIZE;
/// Room per received datagram: a query above [`answer::MAX_QUERY`] is cut here and
/// still read as one above it (FORMERR from its header, as before).
const SLOT: usize = answer::MAX_QUERY + 64;

/// Receives datagrams in batches: `recvmmsg` through quinn-udp (the workspace allows no
/// `unsafe`, and quinn-udp is already the tunnel's), on a non-blocking socket, waiting
/// in `poll` only when the queue is empty.
struct BatchRecv {
    /// quinn-udp's receive does not depend on the state's socket options, so the state
    /// is made on a scratch socket: the DNS socket keeps its own options (no packet
    /// info, TOS or GRO control messages, no DF bit on the answers).
    state: quinn::udp::UdpSocketState,
    bufs: Vec<u8>,
    meta: [quinn::udp::RecvMeta; BATCH],
    /// How many datagrams the next receive asks for: twice what the last one brought
    /// (4 to [`BATCH`]); quinn-udp prepares a header for every datagram asked for, which
    /// a quiet server would otherwise pay for 32 per query.
    want: usize,
    /// The last receive filled all it asked for: more are likely queued, so the next
    /// one goes without waiting for readability first.
    full: bool,
}

impl BatchRecv {
    fn new(sock: &std::net::UdpSocket) -> std::io::Result<Self> {
        let local = sock.local_addr()?;
        let scratch = std::net::UdpSocket::bind(SocketAddr::new(local.ip(), 0))?;
        let state = quinn::udp::UdpSocketState::new((&scratch).into())?;
        sock.set_nonblocking(true)?;
        Ok(Self {
            state,
            bufs: vec![0u8; BATCH * SLOT],
            meta: [quinn::udp::RecvMeta::default(); BATCH],
            want: 4,
            full: false,
        })
    }

    /// The next batch (datagram count); 0 after 250 ms without one.
    fn recv(&mut self, sock: &std::net::UdpSocket) -> std::io::Result<usize> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        if !self.full {
            let mut fds = [PollFd::new(sock, PollFlags::IN)];
            let wait = Timespec {
                tv_sec: 0,
                tv_nsec: 250_000_000,
            };
            match poll(&mut fds, Some(&wait)) {
                Ok(0) => return Ok(0),
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => return Ok(0),
                Err(e) => return Err(e.into()),
            }
        }
        let want = self.want;
        let mut chunks = self.bufs.chunks_mut(SLOT);
        let mut iovs: [std::io::IoSliceMut<'_>; BATCH] =
            std::array::from_fn(|_| std::io::IoSliceMut::new(chunks.next().unwrap_or(&mut [])));
        let r = self
            .state
            .recv(sock.into(), &mut iovs[..want], &mut self.meta[..want]);
        let n = match r {
            Ok(n) => n,
            Err(e) => match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => 0,
                _ => {
                    self.full = false;
                    return Err(e);
                }
            },
        };
        self.full = n == want;
        self.want = if self.full {
            (want * 2).min(BATCH)
        } else {
            (n * 2).clamp(4, BATCH)
        };
        Ok(n)
    }

    /// The datagrams of the last batch: (bytes, sender). (One per buffer: the socket has
    /// no GRO, so `stride` is the length; split by it all the same.)
    fn datagram(&mut self, i: usize) -> impl Iterator<Item = (&mut [u8], SocketAddr)> {
        let m = &self.meta[i];
        let (len, stride, addr) = (m.len, m.stride.max(1), m.addr);
        self.bufs[i * SLOT..i * SLOT + len.min(SLOT)]
            .chunks_mut(stride)
            .map(move |d| (d, addr))
    }
}

/// The answers of one batch, sent with one `sendmmsg` (rustix).
struct BatchSend {
    to: Vec<SocketAddr>,
    bufs: Vec<Vec<u8>>,
}

impl BatchSend {
    fn new() -> Self {
        Self {
            to: Vec::with_capacity(BATCH),
            bufs: (0..BATCH).map(|_| Vec::with_capacity(512)).collect(),
        }
    }

    /// The buffer for the next answer (kept if [`BatchSend::push`] follows).
    fn next(&mut self) -> &mut Vec<u8> {
        let i = self.to.len();
        if i == self.bufs.len() {
            self.bufs.push(Vec::with_capacity(512));
        }
        &mut self.bufs[i]
    }

    /// Keeps the answer written into [`BatchSend::next`] for `to`.
    fn push(&mut self, to: SocketAddr) {
        self.to.push(to);
    }

    /// Sends the kept answers and forgets them: one `sendmmsg` for several, a plain
    /// `send_to` for one. A failed answer is skipped, as a failed `send_to` was: the
    /// client asks again.
    fn flush(&mut self, sock: &std::net::UdpSocket) {
        use rustix::net::addr::SocketAddrArg as _;
        use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, sendmmsg};
        let n = self.to.len();
        let mut waits = 0;
        if n == 1 {
            while let Err(e) = sock.send_to(&self.bufs[0], self.to[0]) {
                if !send_error(&e, self.to[0], &mut waits, sock) {
                    break;
                }
            }
        } else if n > 1 {
            let mut parts: Vec<_> = self
                .to
                .iter()
                .zip(&self.bufs)
                .map(|(a, b)| {
                    (
                        a.as_any(),
                        [std::io::IoSlice::new(b)],
                        SendAncillaryBuffer::default(),
                    )
                })
                .collect();
            let mut msgs: Vec<MMsgHdr<'_>> = parts
                .iter_mut()
                .map(|(a, iov, c)| MMsgHdr::new_with_addr(a, iov, c))
                .collect();
            let mut i = 0;
            while i < n {
                match sendmmsg(sock, &mut msgs[i..], SendFlags::empty()) {
                    Ok(0) => break,
                    Ok(k) => i += k,
                    Err(e) => {
                        if !send_error(&e.into(), self.to[i], &mut waits, sock) {
                            i += 1;
                        }
                    }
                }
            }
        }
        self.to.clear();
    }
}

/// After a failed send of an answer: true to try it again (interrupted, or the socket
/// buffer was full — the socket is non-blocking for the batched receive, so this waits
/// for room as a blocking send did, 100 ms at a time, ten times at most).
fn send_error(
    e: &std::io::Error,
    to: SocketAddr,
    waits: &mut u32,
    sock: &std::net::UdpSocket,
) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    match e.kind() {
        std::io::ErrorKind::Interrupted => true,
        std::io::ErrorKind::WouldBlock if *waits < 10 => {
            *waits += 1;
            let mut fds = [PollFd::new(sock, PollFlags::OUT)];
            let wait = Timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            let _ = poll(&mut fds, Some(&wait));
            true
        }
        _ => {
            tracing::debug!(error = %e, %to, "DNS UDP send error");
            false
        }
    }
}

/// The UDP loop of one socket: answers mesh names and cached names, sends the rest
/// upstream. Queries are received in batches and the batch's answers sent together
/// (two system calls per batch, not per query, under load); the name index is taken
/// again only when a config was published since the last batch (one atomic load).
fn udp_loop(sock: Arc<std::net::UdpSocket>, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    let mut rx = match BatchRecv::new(&sock) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the DNS UDP socket for batched receive");
            return;
        }
    };
    let mut tx = BatchSend::new();
    let mut changes = shared.state.subscribe();
    let mut idx = shared.index();
    while !stop.load(Ordering::Relaxed) {
        let n = match rx.recv(&sock) {
            Ok(n) => n,
            Err(e) => {
                // ICMP errors of earlier sends surface here on some kernels: not fatal.
                tracing::debug!(error = %e, "DNS UDP receive error");
                continue;
            }
        };
        if n == 0 {
            continue;
        }
        if changes.has_changed().unwrap_or(false) {
            changes.mark_unchanged();
            idx = shared.index();
        }
        for i in 0..n {
            for (packet, src) in rx.datagram(i) {
                let out = tx.next();
                match answer::handle_into(&idx, packet, Transport::Udp, out) {
                    answer::Reply::Answer => tx.push(src),
                    answer::Reply::Forward => {
                        if shared.forward_udp(packet, src, &sock, out) {
                            tx.push(src);
                        }
                    }
                    answer::Reply::Drop => {}
                }
            }
        }
        tx.flush(&sock);
    }
}

/// One TCP connection: length-prefixed queries, answered in order (pipelined queries
/// wait in the socket buffer); closed after 10 s idle or on a malformed frame.
async fn tcp_conn(mut s: tokio::net::TcpStream, shared: Arc<Shared>) {
    loop {
        let mut prefix = [0u8; 2];
        match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut prefix)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let len = usize::from(u16::from_be_bytes(prefix));
        let mut q = vec![0u8; len];
        match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut q)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let idx = shared.index();
        let resp = match answer::handle(&idx, &q, Transport::Tcp) {
            Outcome::Answer(b) => b,
            Outcome::Forward => match shared.forward_tcp(&q).await {
                Some(b) => b,
                None => match answer::servfail(&q) {
                    Outcome::Answer(b) => b,
                    _ => return,
                },
            },
            Outcome::Drop => return,
        };
        let Ok(n) = u16::try_from(resp.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(resp.len() + 2);
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&resp);
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

async fn tcp_accept(l: tokio::net::TcpListener, shared: Arc<Shared>) {
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    loop {
        let Ok((s, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            tcp_conn(s, shared).await;
            drop(permit);
        });
    }
}

/// Delay before the next DNS capture install after `failures` failed ones in a row:
/// 0.5 s, doubling, at most 30 s.
fn install_retry_delay(failures: u32) -> Duration {
    Duration::from_millis(500)
        .saturating_mul(1u32 << failures.saturating_sub(1).min(6))
        .min(Duration::from_secs(30))
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    #[test]
    fn failed_capture_installs_back_off_to_thirty_seconds() {
        let d: Vec<u64> = (1..=9)
            .map(|f| install_retry_delay(f).as_millis() as u64)
            .collect();
        assert_eq!(d, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
        assert_eq!(install_retry_delay(u32::MAX), Duration::from_secs(30));
    }
}

fn write_status(path: &Path, st: &DnsStatus) {
    let json = serde_json::to_vec_pretty(st).unwrap_or_default();
    if let Err(e) = crate::identity::write_atomic(path, &json, 0o644) {
        tracing::warn!(error = %e, "cannot write {STATUS_FILE}");
    }
}

impl Dns {
    /// Starts the server (and its capture or resolver configuration). `capture` is the
    /// data plane's capture switch; `mark` its socket mark. A listener that cannot be
    /// bound is an error; the caller logs it and runs on without DNS (nothing is
    /// redirected to a server that is not there).
    pub async fn start(
        cfg: &DnsConfig,
        capture: bool,
        mark: u32,
        state: SharedState,
        state_dir: &Path,
    ) -> Result<Self, DnsError> {
        let status_file = state_dir.join(STATUS_FILE);
        let _ = std::fs::remove_file(&status_file);
        let use_capture = capture && cfg.mode == DnsMode::Capture;
        // Only the agent's own port-53 address can be a resolv.conf nameserver of its own
        // (listen is on 15053, which resolv.conf cannot name).
        let own: Vec<IpAddr> = if cfg.mode == DnsMode::ResolvConf {
            vec![cfg.resolver_listen.ip()]
        } else {
            Vec::new()
        };
        let mut resolv_text = None;
        if cfg.mode == DnsMode::ResolvConf {
            // Upstreams from the original file, restored first if an earlier agent crashed.
            resolvconf::recover(&cfg.resolv_conf, state_dir).map_err(|source| {
                DnsError::ResolvConf {
                    path: cfg.resolv_conf.clone(),
                    source,
                }
            })?;
            resolv_text = std::fs::read_to_string(&cfg.resolv_conf).ok();
        }
        let cache = cfg.cache.then(|| {
            Arc::new(Cache::new(cache::Limits {
                max_entries: cfg.cache_max_entries,
                max_bytes: cfg.cache_max_bytes,
                max_ttl: cfg.cache_max_ttl,
                max_negative_ttl: cfg.cache_max_negative_ttl,
            }))
        });
        let metrics = Arc::new(DnsMetrics::new(cache.clone()));
        let forwarder = Forwarder::new(
            upstreams_of(cfg, &own, resolv_text.as_deref()),
            cfg.forward_timeout,
            capture.then_some(mark),
            cache.clone(),
            metrics.clone(),
        );
        let zones = zones_of(cfg);
        let first = Index::build(&state.get(), &zones);
        tracing::info!(listen = %cfg.listen, names = first.len(), config_version = first.version, upstreams = ?forwarder.upstreams, cache = cfg.cache, "DNS server starting");
        let shared = Arc::new(Shared {
            state: state.clone(),
            zones,
            index: RwLock::new(Arc::new(first)),
            forwarder: RwLock::new(Arc::new(forwarder)),
            cache,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut dns = Dns {
            stop: stop.clone(),
            threads: Vec::new(),
            alive: Vec::new(),
            tasks: Vec::new(),
            capture: Arc::new(Mutex::new(None)),
            resolv: None,
            status_file: status_file.clone(),
            metrics,
        };
        // The name index follows the published config: rebuilt off the query path when
        // a snapshot arrives (a query that comes first rebuilds it itself).
        let (mut changes, sh) = (state.subscribe(), shared.clone());
        dns.tasks.push(tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                changes.mark_unchanged();
                let sh = sh.clone();
                let _ = tokio::task::spawn_blocking(move || sh.index()).await;
            }
        }));
        dns.serve_on(cfg.listen, &shared).await?;
        if cfg.mode == DnsMode::ResolvConf {
            dns.serve_on(cfg.resolver_listen, &shared).await?;
        }
        // IPv6: [::1] at the same port, the target of the ip6 capture. Without it (no IPv6
        // on loopback), IPv6 nameservers are not captured: their queries go to them.
        let listen6 = SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), cfg.listen.port());
        let ipv6 = cfg.listen_ipv6
            && match dns.serve_on(listen6, &shared).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "no DNS server on IPv6 loopback; IPv6 nameservers are not captured");
                    false
                }
            };
        if cfg.mode == DnsMode::ResolvConf {
            let idx = shared.index();
            let zones: Vec<String> = idx.zones().to_vec();
            let g = resolvconf::apply(
                &cfg.resolv_conf,
                state_dir,
                cfg.resolver_listen.ip(),
                &zones,
            )
            .map_err(|source| DnsError::ResolvConf {
                path: cfg.resolv_conf.clone(),
                source,
            })?;
            tracing::info!(path = %cfg.resolv_conf.display(), resolver = %cfg.resolver_listen, "resolver configuration points at the agent");
            dns.resolv = Some(g);
        }
        // Supervisor: capture only while the server can serve; upstreams follow resolv.conf.
        let (cap, sh) = (dns.capture.clone(), shared.clone());
        let listen = cfg.listen;
        let loops_alive = dns.alive.clone();
        let stop2 = stop.clone();
        let mut last_status: Option<DnsStatus> = None;
        let cfg3 = cfg.clone();
        let own2 = own.clone();
        let mut installed_for: Vec<IpAddr> = Vec::new();
        // The last install error, so a persistent one (no `nft`, no privilege) is logged
        // once, not every round.
        let last_error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        // Failed installs are retried with a doubling delay (500 ms up to 30 s): a host
        // without `nft`, or an agent without the privilege, must not fork a process every
        // round for as long as it runs.
        let mut failures: u32 = 0;
        let mut next_install = tokio::time::Instant::now();
        // `start` returns after the first round has installed capture (or not) and
        // written the status file: `doctor` never sees the table before the status that
        // expects it (a push right after the start used to get there first).
        let (first_round, first_round_done) = tokio::sync::oneshot::channel::<()>();
        let mut first_round = Some(first_round);
        dns.tasks.push(tokio::spawn(async move {
            let mut seen_mtime = resolv_mtimes(&cfg3);
            // What applications query: the nameservers of resolv.conf as written. Read
            // again only when the file changes (one stat per round, not a parse).
            let mut app_ns = app_resolvers(&cfg3.resolv_conf, ipv6);
            loop {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                // resolv.conf edited (DHCP, an operator), or systemd-resolved's upstreams:
                // new nameservers to capture, new upstreams unless they are configured,
                // and no cached answer of the old ones.
                let m = resolv_mtimes(&cfg3);
                if m != seen_mtime {
                    seen_mtime = m;
                    app_ns = app_resolvers(&cfg3.resolv_conf, ipv6);
                    sh.resolv_changed(&cfg3, &own2);
                }
                let f = sh.forwarder();
                let has_config = sh.index().version > 0;
                let serving = loops_alive.iter().all(|a| a.load(Ordering::Relaxed));
                let want = use_capture
                    && serving
                    && (has_config || f.has_upstreams())
                    && !app_ns.is_empty();
                let resolvers = app_ns.clone();
                let changed = resolvers != installed_for;
                installed_for = resolvers.clone();
                if changed {
                    failures = 0;
                    next_install = tokio::time::Instant::now();
                }
                let may_install = tokio::time::Instant::now() >= next_install;
                let cap2 = cap.clone();
                let errors = last_error.clone();
                let last_error = last_error.clone();
                let (installed, failed) = tokio::task::spawn_blocking(move || {
                    let mut guard = cap2.lock().unwrap_or_else(|p| p.into_inner());
                    if changed && let Some(mut c) = guard.take() {
                        c.remove();
                        tracing::info!(?resolvers, "resolv.conf nameservers changed; DNS capture follows");
                    }
                    let alive = guard.as_mut().is_some_and(|c| c.alive());
                    let mut failed = false;
                    // After a failed install, nothing is tried until `next_install`.
                    if want && !alive && may_install {
                        if guard.take().is_some() {
                            tracing::warn!("the DNS capture's nft process ended; installing it again");
                        }
                        let mut last = last_error.lock().unwrap_or_else(|p| p.into_inner());
                        match nft::DnsCapture::install(mark, listen.port(), &resolvers) {
                            Ok(c) => {
                                *guard = Some(c);
                                if last.take().is_some() {
                                    tracing::info!("DNS capture installed after all");
                                }
                            }
                            Err(e) => {
                                failed = true;
                                let msg = e.to_string();
                                if last.as_deref() == Some(msg.as_str()) {
                                    tracing::debug!(error = %msg, "DNS capture still not installed");
                                } else {
                                    tracing::error!(error = %msg, "DNS capture not installed; applications keep using their resolvers directly (retrying after 0.5 s, doubling up to 30 s; logged again only if the error changes)");
                                    *last = Some(msg);
                                }
                            }
                        }
                    } else if !want && let Some(mut c) = guard.take() {
                        c.remove();
                        tracing::warn!(serving, "DNS capture removed: the server cannot answer (listener down, or no config and no upstream resolver)");
                    }
                    (guard.is_some(), failed)
                })
                .await
                .unwrap_or((false, false));
                if failed {
                    failures = failures.saturating_add(1);
                    next_install = tokio::time::Instant::now() + install_retry_delay(failures);
                } else if installed {
                    failures = 0;
                }
                if use_capture && !want && !installed {
                    tracing::debug!("DNS capture waits for a config or an upstream resolver");
                }
                let st = DnsStatus {
                    listen: Some(listen),
                    serving,
                    capture: installed,
                    mark,
                    upstreams: f.upstreams.clone(),
                    capture_wanted: use_capture,
                    capture_error: (use_capture && !installed).then(|| {
                        errors
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone()
                            .unwrap_or_else(|| {
                                "waiting for a config or an upstream resolver".into()
                            })
                    }),
                };
                if last_status.as_ref() != Some(&st) {
                    write_status(&status_file, &st);
                    last_status = Some(st);
                }
                if let Some(done) = first_round.take() {
                    let _ = done.send(());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
        let _ = first_round_done.await;
        Ok(dns)
    }

    /// Serves UDP (a plain thread) and TCP (a task) on `addr`.
    async fn serve_on(&mut self, addr: SocketAddr, shared: &Arc<Shared>) -> Result<(), DnsError> {
        let udp = Arc::new(bind_udp(addr)?);
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DnsError::Bind {
                addr,
                proto: "TCP",
                source,
            })?;
        let (u, sh, st) = (udp, shared.clone(), self.stop.clone());
        let alive = Arc::new(AtomicBool::new(true));
        let th = std::thread::Builder::new()
            .name("dns-udp".into())
            .spawn({
                let alive = alive.clone();
                move || {
                    // Cleared however the loop ends (a panic included): capture then goes.
                    struct Alive(Arc<AtomicBool>);
                    impl Drop for Alive {
                        fn drop(&mut self) {
                            self.0.store(false, Ordering::Relaxed);
                        }
                    }
                    let _alive = Alive(alive);
                    udp_loop(u, sh, st)
                }
            })
            .map_err(|source| DnsError::Bind {
                addr,
                proto: "UDP",
                source,
            })?;
        self.alive.push(alive);
        self.threads.push(th);
        self.tasks
            .push(tokio::spawn(tcp_accept(tcp, shared.clone())));
        Ok(())
    }

    /// The DNS counters (for `/metrics`).
    pub fn metrics(&self) -> Arc<DnsMetrics> {
        self.metrics.clone()
    }

    /// Removes capture (or restores the resolver configuration) first, then stops serving.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
        let cap = self.capture.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(mut c) = cap.lock().unwrap_or_else(|p| p.into_inner()).take() {
                c.remove();
                tracing::info!("DNS capture removed");
            }
        })
        .await;
        if let Some(g) = self.resolv.take()
            && let Err(e) = g.restore()
        {
            tracing::error!(error = %e, "cannot restore the original resolver configuration");
        }
        for t in self.threads.drain(..) {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        let _ = std::fs::remove_file(&self.status_file);
    }
}

/// For `causeway-agent cleanup` (after the agent stopped, however it stopped): deletes a
/// leftover DNS capture table that no live process owns (an owned one goes with its
/// owner), restores the resolver configuration of "resolv-conf" mode, removes `dns.json`.
/// Returns what was done, one line each.
pub fn cleanup(state_dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    for family in nft::FAMILIES {
        if nft::live_family(family).is_none() {
            continue;
        }
        match std::process::Command::new("nft")
            .args(["delete", "table", family, nft::TABLE])
            .output()
        {
            Ok(o) if o.status.success() => {
                done.push(format!("deleted nftables table {family} {}", nft::TABLE))
            }
            _ => tracing::warn!(
                table = nft::TABLE,
                family,
                "DNS capture table is owned by a running process; left alone"
            ),
        }
    }
    match resolvconf::cleanup(state_dir) {
        Ok(true) => done.push("restored the original resolver configuration".into()),
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "cannot restore the original resolver configuration"),
    }
    let _ = std::fs::remove_file(state_dir.join(STATUS_FILE));
    done
}

/// What `causeway-agent doctor` finds about DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsDoctor {
    /// Problems, one line each (empty: as expected).
    pub problems: Vec<String>,
    /// What was checked, for the report.
    pub summary: String,
}

/// Compares the live DNS capture with what the running agent reports, and asks the
/// server a question when it should be serving.
pub fn doctor(state_dir: &Path, agent_running: bool) -> DnsDoctor {
    let status: Option<DnsStatus> = std::fs::read_to_string(state_dir.join(STATUS_FILE))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let live = nft::live();
    let mut problems = Vec::new();
    let expected = agent_running && status.as_ref().is_some_and(|s| s.capture);
    // An ip6 table alone (the ip one is always created with it): left by someone else.
    if live.is_none() && !expected && nft::live_family("ip6").is_some() {
        problems.push(format!(
            "nftables table ip6 {} redirects port 53 but no serving agent expects it: DNS of this host goes to a server that is not there; remove it with `nft delete table ip6 {}`",
            nft::TABLE,
            nft::TABLE
        ));
    }
    match (&live, expected) {
        (Some(_), false) => problems.push(format!(
            "nftables table ip {} redirects port 53 but no serving agent expects it: DNS of this host goes to a server that is not there; remove it with `nft delete table ip {}`",
            nft::TABLE,
            nft::TABLE
        )),
        (None, true) => problems.push(format!(
            "the agent reports DNS capture on, but table ip {} is missing: applications bypass the mesh DNS; restart the agent",
            nft::TABLE
        )),
        (Some(t), true) => {
            if let Some(s) = &status
                && let Some(l) = s.listen
                && !nft::matches(t, s.mark, l.port())
            {
                problems.push(format!(
                    "table ip {} does not redirect port 53 to {l} with mark {:#x} exempt; restart the agent",
                    nft::TABLE,
                    s.mark
                ));
            }
        }
        (None, false) => {}
    }
    if agent_running
        && let Some(s) = &status
        && let Some(l) = s.listen
        && !probe(l)
    {
        problems.push(format!(
            "the DNS server on {l} does not answer: names inside the mesh do not resolve; see the agent's log"
        ));
    }
    let summary = match (&status, agent_running) {
        (Some(s), true) => format!(
            "listening on {}, capture {}, upstreams {:?}",
            s.listen.map(|l| l.to_string()).unwrap_or_default(),
            if s.capture { "on" } else { "off" },
            s.upstreams
        ),
        _ => "no agent DNS server running (no capture expected)".into(),
    };
    DnsDoctor { problems, summary }
}

/// Sends `addr` a query with a readable header and an unreadable question: a live server
/// answers FORMERR at once, without forwarding anything.
fn probe(addr: SocketAddr) -> bool {
    let Ok(sock) = std::net::UdpSocket::bind(if addr.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    }) else {
        return false;
    };
    let _ = sock.set_read_timeout(Some(Duration::from_secs(2)));
    // id 0x4357, RD, one question that is a dangling compression pointer.
    let q = [0x43, 0x57, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0xff];
    if sock.send_to(&q, addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(sock.recv_from(&mut buf), Ok((n, _)) if n >= 12 && buf[..2] == q[..2])
}

#[cfg(test)]
mod server_tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// An upstream on loopback answering every A query with 192.0.2.<n> (n: queries so
    /// far), TTL 300; returns its address and the query count.
    fn upstream() -> (SocketAddr, Arc<AtomicU32>) {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        let n = Arc::new(AtomicU32::new(0));
        let n2 = n.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((len, from)) = s.recv_from(&mut buf) {
                let k = n2.fetch_add(1, Ordering::SeqCst) + 1;
                let mut r = buf[..len].to_vec();
                r[2] |= 0x80;
                r[3] = 0x80;
                r[7] = 1;
                r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 192, 0, 2]);
                r.push(k as u8);
                let _ = s.send_to(&r, from);
            }
        });
        (addr, n)
    }

    fn free_port() -> u16 {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Asks `server` for `name` A over UDP; the address in the answer and its TTL.
    fn ask(server: SocketAddr, name: &str) -> (String, u32) {
        let mut q = vec![0x55, 0x66, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.send_to(&q, server).unwrap();
        let mut buf = [0u8; 512];
        let n = c.recv(&mut buf).unwrap();
        let r = &buf[..n];
        assert_eq!(&r[..2], &[0x55, 0x66], "the client's ID");
        let ttl = u32::from_be_bytes(r[n - 10..n - 6].try_into().unwrap());
        (
            format!("{}.{}.{}.{}", r[n - 4], r[n - 3], r[n - 2], r[n - 1]),
            ttl,
        )
    }

    async fn start(cfg: &DnsConfig, dir: &Path) -> Dns {
        let state = SharedState::default();
        Dns::start(cfg, false, 0x4357, state, dir).await.unwrap()
    }

    /// Through the real server (batched receive and send): 150 queries, sent 30 at once
    /// from one socket — mesh A names in mixed case, with and without EDNS, AAAA (NODATA),
    /// SRV, NXDOMAIN, an oversized datagram and forwarded names — each get exactly the
    /// bytes the query path gives for them (the forwarded ones the upstream's answer),
    /// under their own ID. A config published afterwards is answered from at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batched_queries_get_the_answers_of_the_query_path() {
        use hickory_proto::op::{Edns, Message, Query};
        use hickory_proto::rr::{Name, RecordType};
        let dir = tempfile::tempdir().unwrap();
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 192.0.2.53\n").unwrap();
        let (up, asked) = upstream();
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let cfg = DnsConfig {
            mode: DnsMode::Off,
            listen,
            listen_ipv6: false,
            upstreams: vec![up.to_string()],
            resolv_conf: resolv,
            cache: false,
            ..DnsConfig::default()
        };
        let state = SharedState::new(index::tests::mesh());
        let dns = Dns::start(&cfg, false, 0x4357, state.clone(), dir.path())
            .await
            .unwrap();
        let idx = Index::build(&state.get(), &zones_of(&cfg));
        let kinds: [(&str, RecordType, bool); 10] = [
            ("web.service.consul.", RecordType::A, false),
            ("WEB.Default.Svc.Cluster.Local.", RecordType::A, false),
            ("web.default.causeway.", RecordType::A, true),
            ("Payments.Example.Com.", RecordType::A, true),
            ("web.service.consul.", RecordType::AAAA, false),
            ("web.service.consul.", RecordType::SRV, true),
            ("nope.default.causeway.", RecordType::A, false),
            ("www.example.", RecordType::A, false),
            ("inventory.shop.causeway.", RecordType::A, false),
            ("oversized", RecordType::A, false),
        ];
        let queries: Vec<Vec<u8>> = (0..150u16)
            .map(|id| {
                let (name, t, edns) = kinds[usize::from(id) % kinds.len()];
                if name == "oversized" {
                    let mut q = vec![0u8; answer::MAX_QUERY + 900];
                    q[..6].copy_from_slice(&[0, 0, 1, 0, 0, 1]);
                    q[..2].copy_from_slice(&id.to_be_bytes());
                    return q;
                }
                let mut m = Message::query();
                m.metadata.id = id;
                m.metadata.recursion_desired = true;
                m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
                if edns {
                    m.set_edns(Edns::new());
                }
                m.to_vec().unwrap()
            })
            .collect();
        let answers = tokio::task::spawn_blocking({
            let queries = queries.clone();
            move || {
                let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                // In waves of 30 sent at once (the server's queue holds them; all 150 at
                // once could overflow its receive buffer, a drop the test would misread).
                let mut got = std::collections::BTreeMap::new();
                let mut buf = [0u8; 4096];
                for wave in queries.chunks(30) {
                    for q in wave {
                        c.send_to(q, listen).unwrap();
                    }
                    let until = got.len() + wave.len();
                    while got.len() < until {
                        let n = match c.recv(&mut buf) {
                            Ok(n) => n,
                            Err(e) => panic!(
                                "no answer to {:?}: {e}",
                                (0..queries.len() as u16)
                                    .filter(|i| !got.contains_key(i))
                                    .collect::<Vec<_>>()
                            ),
                        };
                        let id = u16::from_be_bytes([buf[0], buf[1]]);
                        assert!(
                            got.insert(id, buf[..n].to_vec()).is_none(),
                            "one answer per query ({id})"
                        );
                    }
                }
                got
            }
        })
        .await
        .unwrap();
        for (id, q) in queries.iter().enumerate() {
            let got = &answers[&(id as u16)];
            match answer::handle(&idx, q, Transport::Udp) {
                Outcome::Answer(want) => assert_eq!(got, &want, "query {id}"),
                Outcome::Forward => {
                    let m = Message::from_vec(got).unwrap();
                    assert_eq!(m.metadata.id, id as u16);
                    assert_eq!(m.answers.len(), 1, "the upstream's answer");
                }
                Outcome::Drop => panic!("query {id} is answered"),
            }
        }
        assert_eq!(asked.load(Ordering::SeqCst), 15, "www.example forwarded");
        // A push: the next query sees the new name.
        state.modify(|s| {
            s.version += 1;
            s.services.insert(
                "default/new".into(),
                index::tests::service("240.240.0.99", &["file"]),
            );
        });
        let (a, ttl) = tokio::task::spawn_blocking(move || ask(listen, "new.default.causeway"))
            .await
            .unwrap();
        assert_eq!((a.as_str(), ttl), ("240.240.0.99", 5));
        dns.stop().await;
    }

    /// Through the real server: a forwarded name is asked upstream once and then served
    /// from the cache; rewriting resolv.conf empties the cache, so the next query goes
    /// upstream again and gets the new answer. With `cache = false` every query goes up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarded_answers_are_cached_until_resolv_conf_changes() {
        let dir = tempfile::tempdir().unwrap();
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 192.0.2.53\n").unwrap();
        let (up, asked) = upstream();
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let cfg = DnsConfig {
            mode: DnsMode::Off,
            listen,
            listen_ipv6: false,
            upstreams: vec![up.to_string()],
            resolv_conf: resolv.clone(),
            ..DnsConfig::default()
        };
        let dns = start(&cfg, dir.path()).await;
        let m = dns.metrics();
        let (a, ttl) = tokio::task::spawn_blocking(move || ask(listen, "www.example"))
            .await
            .unwrap();
        assert_eq!((a.as_str(), ttl), ("192.0.2.1", 300));
        let (a, ttl) = tokio::task::spawn_blocking(move || ask(listen, "WWW.example"))
            .await
            .unwrap();
        assert_eq!(a, "192.0.2.1", "from the cache");
        assert!(ttl <= 300);
        assert_eq!(asked.load(Ordering::SeqCst), 1, "asked upstream once");
        let cache = m.cache.clone().unwrap();
        assert_eq!(cache.counters.hits.load(Ordering::Relaxed), 1);
        assert_eq!(cache.len(), 1);
        // resolv.conf rewritten: the cache is emptied (the supervisor looks every 0.5 s).
        std::fs::write(&resolv, "nameserver 192.0.2.54\n").unwrap();
        let t0 = Instant::now();
        while !cache.is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the cache was not emptied after the resolv.conf change"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (a, _) = tokio::task::spawn_blocking(move || ask(listen, "www.example"))
            .await
            .unwrap();
        assert_eq!(a, "192.0.2.2", "asked again after the change");
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        assert!(
            m.render()
                .contains("causeway_agent_dns_cache_hits_total 1\n")
        );
        dns.stop().await;

        // Off: every query goes upstream.
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let cfg = DnsConfig {
            listen,
            cache: false,
            ..cfg
        };
        let dns = start(&cfg, dir.path()).await;
        for k in 3..5 {
            let (a, _) = tokio::task::spawn_blocking(move || ask(listen, "www.example"))
                .await
                .unwrap();
            assert_eq!(a, format!("192.0.2.{k}"));
        }
        assert!(dns.metrics().cache.is_none());
        assert!(!dns.metrics().render().contains("cache"));
        dns.stop().await;
    }
}
