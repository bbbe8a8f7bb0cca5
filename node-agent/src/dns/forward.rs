//! Forwarding to the host's original resolvers.
//!
//! The query's bytes go out unchanged but for the ID (UDP), and the upstream's answer
//! comes back unchanged but for the ID (after checking it answers this query: ID, QR and
//! the question), so whatever the application asked for (EDNS options, DNSSEC bits) is
//! what the upstream sees. Every socket carries the agent's mark, so the port-53 capture
//! rule lets it through instead of redirecting it back to the agent; a resolver library
//! (hickory-resolver) would re-encode queries and open its own sockets, which cannot
//! carry that mark.
//!
//! **UDP** (the hot path, no Tokio): each upstream has a few long-lived connected
//! sockets ([`SOCKETS_PER_UPSTREAM`], each on its own kernel-chosen port), each with one
//! plain thread that receives the answers. A query gets a random ID on a randomly chosen
//! socket and waits in the pending table (ID and socket → the client, its own ID, the
//! query); the UDP loop thread that received it sends it and goes on. The answer's
//! thread restores the client's ID, stores it in the [cache](super::cache) and sends it
//! from the listening socket the query came to. A pending query after `timeout` (or at
//! once when the upstream's port refuses it) goes to the next upstream in resolv.conf
//! order, and a late answer of an earlier one still answers it; after the last one the
//! client gets SERVFAIL. The timeout thread takes the answers already waiting in the
//! sockets before it times anything out (on a busy host the answer threads may not have
//! run yet), and does not count time it could not run at all (a stalled host: the
//! upstreams could not run either). Query buffers are recycled: no
//! allocation per query once warm. Off-path spoofing needs the socket's port, the random
//! ID and the question, as against dnsmasq (which also rotates ports per query).
//!
//! **TCP**: upstream connections are kept (a few idle ones per upstream) and reused by
//! the next TCP query — the client's own TCP queries and its retries after a truncated
//! UDP answer; one that the upstream closed in the meantime is replaced once.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::cache::{Cache, QueryInfo};
use super::metrics::DnsMetrics;

/// Connected UDP sockets per upstream.
pub const SOCKETS_PER_UPSTREAM: usize = 4;
/// Most UDP queries waiting for an upstream at once (more: SERVFAIL at once).
pub const MAX_PENDING: usize = 4096;
/// Idle TCP connections kept per upstream.
pub const MAX_IDLE_TCP: usize = 8;
/// How often pending queries are checked for their timeout.
const SWEEP: Duration = Duration::from_millis(50);
/// How long an answer thread waits before looking at the stop flag.
const RECV_WAIT: Duration = Duration::from_millis(500);

/// Whether `resp` answers `query` (same ID, QR set).
fn answers(query: &[u8], resp: &[u8]) -> bool {
    resp.len() >= 12 && query.len() >= 2 && resp[..2] == query[..2] && resp[2] & 0x80 != 0
}

/// The end of the question section of a one-question message.
fn question_end(m: &[u8]) -> Option<usize> {
    if m.len() < 12 || m[4..6] != [0, 1] {
        return None;
    }
    let mut i = 12;
    loop {
        let len = *m.get(i)?;
        match len {
            0 => return (i + 5 <= m.len()).then_some(i + 5),
            l if l & 0xc0 == 0 => i += 1 + usize::from(l),
            _ => return None,
        }
    }
}

fn udp_socket(upstream: SocketAddr, mark: Option<u32>) -> std::io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(upstream);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if let Some(m) = mark {
        s.set_mark(m)?;
    }
    let any: SocketAddr = if upstream.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    s.bind(&any.into())?;
    s.connect(&upstream.into())?;
    s.set_read_timeout(Some(RECV_WAIT))?;
    Ok(s.into())
}

/// A UDP query waiting for its answer.
struct Pending {
    client: SocketAddr,
    reply: Arc<UdpSocket>,
    client_id: [u8; 2],
    /// The query as sent (with the agent's ID).
    query: Vec<u8>,
    /// The end of its question section, when it has exactly one.
    qend: Option<usize>,
    info: Option<QueryInfo>,
    generation: u64,
    upstream: usize,
    sent: Instant,
    /// [`Table::stalled`] when it was sent.
    stalled_at_send: Duration,
    /// Its keys at the upstreams that timed out before: their late answers still answer
    /// it (empty until a retry, so no allocation on the hot path).
    earlier: Vec<u32>,
}

/// Pending queries by (socket, ID), and recycled query buffers.
struct Table {
    map: HashMap<u32, Pending>,
    /// The keys of [`Pending::earlier`] → the query's current key.
    earlier: HashMap<u32, u32>,
    free: Vec<Vec<u8>>,
    rng: u64,
    /// Time the timeout thread could not run (a stalled or starved host), in all: it is
    /// not counted against the upstreams, which could not run either.
    stalled: Duration,
    /// When the timeout round last ran.
    last_sweep: Instant,
}

impl Table {
    fn next(&mut self) -> u64 {
        // xorshift64*: seeded from the system's random source; the IDs and sockets it
        // picks only have to be unpredictable off the host.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A free (socket of `upstream`, ID) key: neither a pending query's nor an earlier
    /// key one may still get a late answer for.
    fn key(&mut self, upstream: usize) -> u32 {
        loop {
            let r = self.next();
            let sock = upstream * SOCKETS_PER_UPSTREAM + (r >> 32) as usize % SOCKETS_PER_UPSTREAM;
            let key = ((sock as u32) << 16) | (r & 0xffff) as u32;
            if !self.map.contains_key(&key) && !self.earlier.contains_key(&key) {
                return key;
            }
        }
    }

    /// `p` is done (answered or failed): its earlier keys are free again.
    fn forget(&mut self, p: &Pending) {
        for k in &p.earlier {
            self.earlier.remove(k);
        }
    }

    /// The pending query `resp` (received on the socket of `key`) answers, taken out of
    /// the table: by its current key or an earlier one, with the question asked (a
    /// spoofer has to know it too). None for a late answer (the query was answered or
    /// failed) or one that is not ours.
    fn take(&mut self, key: u32, resp: &[u8]) -> Option<Pending> {
        let cur = if self.map.contains_key(&key) {
            key
        } else {
            *self.earlier.get(&key)?
        };
        let p = self.map.get(&cur)?;
        if let Some(qend) = p.qend
            && !resp
                .get(12..qend)
                .is_some_and(|r| r.eq_ignore_ascii_case(&p.query[12..qend]))
        {
            return None;
        }
        let p = self.map.remove(&cur)?;
        self.forget(&p);
        Some(p)
    }
}

/// A timeout round that starts more than this after the previous one's start (they are
/// [`SWEEP`] apart) found the host stalled: the time past [`SWEEP`] is not counted
/// against the upstreams.
const STALL: Duration = Duration::from_millis(200);

struct UdpInner {
    /// Every upstream's sockets, in order: upstream i has sockets
    /// i*SOCKETS_PER_UPSTREAM ..
    socks: Vec<UdpSocket>,
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    table: Mutex<Table>,
    cache: Option<Arc<Cache>>,
    metrics: Arc<DnsMetrics>,
    stop: AtomicBool,
}

impl UdpInner {
    fn new(
        socks: Vec<UdpSocket>,
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        cache: Option<Arc<Cache>>,
        metrics: Arc<DnsMetrics>,
    ) -> Self {
        Self {
            socks,
            upstreams,
            timeout,
            table: Mutex::new(Table {
                map: HashMap::with_capacity(256),
                earlier: HashMap::new(),
                free: Vec::new(),
                rng: seed(),
                stalled: Duration::ZERO,
                last_sweep: Instant::now(),
            }),
            cache,
            metrics,
            stop: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a UDP query that came to `reply` from `client` to the first upstream; see
    /// [`Forwarder::udp_query`].
    fn query(
        &self,
        query: &mut [u8],
        client: SocketAddr,
        reply: &Arc<UdpSocket>,
        info: Option<QueryInfo>,
        generation: u64,
    ) -> bool {
        if query.len() < 12 {
            return false;
        }
        let client_id = [query[0], query[1]];
        let qend = question_end(query);
        let key = {
            let mut t = self.lock();
            if t.map.len() >= MAX_PENDING {
                return false;
            }
            let key = t.key(0);
            query[..2].copy_from_slice(&key.to_be_bytes()[2..]);
            let mut buf = t.free.pop().unwrap_or_default();
            buf.clear();
            buf.extend_from_slice(query);
            let stalled_at_send = t.stalled;
            t.map.insert(
                key,
                Pending {
                    client,
                    reply: reply.clone(),
                    client_id,
                    qend,
                    query: buf,
                    info,
                    generation,
                    upstream: 0,
                    sent: Instant::now(),
                    stalled_at_send,
                    earlier: Vec::new(),
                },
            );
            key
        };
        self.metrics.forwarded[0].inc();
        if let Err(e) = self.socks[(key >> 16) as usize].send(query) {
            self.metrics.upstream_errors.inc();
            tracing::debug!(upstream = %self.upstreams[0], error = %e, "cannot send to the upstream (UDP)");
            let mut t = self.lock();
            if let Some(mut p) = t.map.remove(&key) {
                p.upstream += 1;
                self.dispatch(&mut t, p, None);
            }
        }
        query[..2].copy_from_slice(&client_id);
        true
    }

    /// Sends `p` to upstream `p.upstream` (on a fresh key), or answers SERVFAIL when
    /// there is none left. `timed_out`: its key at the upstream that did not answer in
    /// time, whose answer still counts if it comes before another's. Called with the
    /// table locked.
    fn dispatch(&self, t: &mut Table, mut p: Pending, timed_out: Option<u32>) {
        if let Some(k) = timed_out
            && p.upstream < self.upstreams.len()
        {
            p.earlier.push(k);
        }
        while p.upstream < self.upstreams.len() {
            let key = t.key(p.upstream);
            p.query[..2].copy_from_slice(&key.to_be_bytes()[2..]);
            p.sent = Instant::now();
            p.stalled_at_send = t.stalled;
            let sock = (key >> 16) as usize;
            match self.socks[sock].send(&p.query) {
                Ok(_) => {
                    for k in &p.earlier {
                        t.earlier.insert(*k, key);
                    }
                    t.map.insert(key, p);
                    return;
                }
                Err(e) => {
                    self.metrics.upstream_errors.inc();
                    tracing::debug!(upstream = %self.upstreams[p.upstream], error = %e, "cannot send to the upstream (UDP)");
                    p.upstream += 1;
                }
            }
        }
        self.fail(t, p);
    }

    /// SERVFAIL to the client of `p`; its buffer is recycled.
    fn fail(&self, t: &mut Table, mut p: Pending) {
        tracing::warn!(upstreams = ?self.upstreams, "no upstream resolver answered; answering SERVFAIL");
        t.forget(&p);
        p.query[..2].copy_from_slice(&p.client_id);
        if let super::answer::Outcome::Answer(b) = super::answer::servfail(&p.query) {
            send_answer(&p.reply, &b, p.client);
        }
        t.free.push(p.query);
    }

    /// An upstream's answer `resp` received on socket `s`: to its client (and the
    /// cache). The buffer of the answered query is left in `done`, to be recycled under
    /// the next lock. False when stopping.
    fn deliver(&self, s: usize, resp: &mut [u8], done: &mut Option<Vec<u8>>) -> bool {
        if resp.len() < 12 || resp[2] & 0x80 == 0 {
            return true;
        }
        let key = ((s as u32) << 16) | u32::from(u16::from_be_bytes([resp[0], resp[1]]));
        let p = {
            let mut t = self.lock();
            if let Some(b) = done.take() {
                t.free.push(b);
            }
            if self.stop.load(Ordering::Relaxed) && t.map.is_empty() {
                return false;
            }
            match t.take(key, resp) {
                Some(p) => p,
                None => return true, // late (answered or failed) or not ours
            }
        };
        let now = Instant::now();
        self.metrics.observe(now.saturating_duration_since(p.sent));
        resp[..2].copy_from_slice(&p.client_id);
        if let (Some(c), Some(info)) = (&self.cache, &p.info) {
            c.insert(p.generation, info, &p.query, resp, now);
        }
        send_answer(&p.reply, resp, p.client);
        *done = Some(p.query);
        true
    }

    /// An ICMP error of an earlier send on socket `s` (port unreachable): the upstream
    /// does not serve; the queries waiting on this socket go to the next one now.
    fn unreachable(&self, s: usize, e: &std::io::Error) {
        self.metrics.upstream_errors.inc();
        tracing::debug!(upstream = %self.upstreams[s / SOCKETS_PER_UPSTREAM], error = %e, "upstream unreachable (UDP)");
        let mut t = self.lock();
        let keys: Vec<u32> = t
            .map
            .keys()
            .copied()
            .filter(|k| (k >> 16) as usize == s)
            .collect();
        for k in keys {
            if let Some(mut p) = t.map.remove(&k) {
                p.upstream += 1;
                self.dispatch(&mut t, p, None);
            }
        }
    }

    /// The answer thread of socket `s`.
    fn receive(&self, s: usize) {
        let sock = &self.socks[s];
        let mut buf = vec![0u8; 65535];
        // The buffer of the last answered query, recycled under the next lock.
        let mut done: Option<Vec<u8>> = None;
        loop {
            match sock.recv(&mut buf) {
                Ok(n) => {
                    if !self.deliver(s, &mut buf[..n], &mut done) {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    if self.stop.load(Ordering::Relaxed) && self.lock().map.is_empty() {
                        return;
                    }
                }
                Err(e) => self.unreachable(s, &e),
            }
        }
    }

    /// The timeout thread: pending queries past `timeout` go to the next upstream.
    #[allow(
        clippy::disallowed_methods,
        reason = "a plain thread of its own, not a Tokio worker"
    )]
    fn sweep(&self) {
        let mut buf = vec![0u8; 65535];
        loop {
            std::thread::sleep(SWEEP);
            if !self.sweep_once(Instant::now(), &mut buf) {
                return;
            }
        }
    }

    /// One timeout round at `now`. The answers already waiting in the sockets are taken
    /// first, so a query whose answer came in time is answered even when its answer
    /// thread has not run yet (a busy host); and a round that starts late (the host
    /// stalled) does not count the stall against the upstreams. False when stopping.
    fn sweep_once(&self, now: Instant, buf: &mut [u8]) -> bool {
        use rustix::net::{RecvFlags, recv};
        let mut done = None;
        for (s, sock) in self.socks.iter().enumerate() {
            loop {
                match recv(sock, &mut *buf, RecvFlags::DONTWAIT) {
                    Ok((n, _)) => {
                        let n = n.min(buf.len());
                        if !self.deliver(s, &mut buf[..n], &mut done) {
                            return false;
                        }
                    }
                    Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => break,
                    Err(e) => {
                        self.unreachable(s, &e.into());
                        break;
                    }
                }
            }
        }
        let mut t = self.lock();
        if let Some(b) = done {
            t.free.push(b);
        }
        if self.stop.load(Ordering::Relaxed) && t.map.is_empty() {
            return false;
        }
        let gap = now.saturating_duration_since(t.last_sweep);
        t.last_sweep = t.last_sweep.max(now);
        if gap > STALL {
            t.stalled += gap - SWEEP;
            tracing::debug!(
                stalled_ms = (gap - SWEEP).as_millis() as u64,
                "the DNS timeout thread ran late; the stall does not count against the upstreams"
            );
        }
        let stalled = t.stalled;
        let late: Vec<u32> = t
            .map
            .iter()
            .filter(|(_, p)| {
                now.saturating_duration_since(p.sent)
                    .saturating_sub(stalled - p.stalled_at_send)
                    >= self.timeout
            })
            .map(|(k, _)| *k)
            .collect();
        for k in late {
            if let Some(mut p) = t.map.remove(&k) {
                self.metrics.upstream_timeouts.inc();
                tracing::debug!(upstream = %self.upstreams[p.upstream], "upstream did not answer in time (UDP)");
                p.upstream += 1;
                self.dispatch(&mut t, p, Some(k));
            }
        }
        true
    }
}

/// Sends an answer from the listening socket (non-blocking: a full buffer is waited
/// for as the serving loop does).
fn send_answer(sock: &UdpSocket, b: &[u8], to: SocketAddr) {
    let mut waits = 0;
    while let Err(e) = sock.send_to(b, to) {
        if !super::send_error(&e, to, &mut waits, sock) {
            break;
        }
    }
}

/// Where and how to forward.
pub struct Forwarder {
    /// Upstream servers in order.
    pub upstreams: Vec<SocketAddr>,
    /// Wait per upstream.
    pub timeout: Duration,
    /// Mark on the sockets (None when capture is off).
    pub mark: Option<u32>,
    udp: Option<Arc<UdpInner>>,
    tcp_idle: Vec<Mutex<Vec<tokio::net::TcpStream>>>,
    cache: Option<Arc<Cache>>,
    metrics: Arc<DnsMetrics>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("upstreams", &self.upstreams)
            .field("timeout", &self.timeout)
            .field("mark", &self.mark)
            .finish_non_exhaustive()
    }
}

impl Drop for Forwarder {
    /// The answer and timeout threads end once the queries still waiting are done.
    fn drop(&mut self) {
        if let Some(u) = &self.udp {
            u.stop.store(true, Ordering::Relaxed);
        }
    }
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b) | 1
}

impl Forwarder {
    /// Opens the UDP sockets (and starts their threads) for `upstreams`. A socket that
    /// cannot be opened is logged; without any, UDP queries get SERVFAIL.
    pub fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        mark: Option<u32>,
        cache: Option<Arc<Cache>>,
        metrics: Arc<DnsMetrics>,
    ) -> Self {
        let socks: std::io::Result<Vec<UdpSocket>> = upstreams
            .iter()
            .flat_map(|u| std::iter::repeat_n(*u, SOCKETS_PER_UPSTREAM))
            .map(|u| udp_socket(u, mark))
            .collect();
        let udp = match socks {
            Ok(socks) if !socks.is_empty() => {
                let inner = Arc::new(UdpInner::new(
                    socks,
                    upstreams.clone(),
                    timeout,
                    cache.clone(),
                    metrics.clone(),
                ));
                let mut ok = true;
                for s in 0..inner.socks.len() {
                    let i = inner.clone();
                    ok &= std::thread::Builder::new()
                        .name("dns-upstream".into())
                        .spawn(move || i.receive(s))
                        .is_ok();
                }
                let i = inner.clone();
                ok &= std::thread::Builder::new()
                    .name("dns-timeouts".into())
                    .spawn(move || i.sweep())
                    .is_ok();
                if !ok {
                    inner.stop.store(true, Ordering::Relaxed);
                    tracing::error!(
                        "cannot start the DNS forwarding threads; forwarded names get SERVFAIL"
                    );
                }
                ok.then_some(inner)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::error!(upstreams = ?upstreams, error = %e, "cannot open sockets to the upstream resolvers; forwarded names get SERVFAIL");
                None
            }
        };
        Self {
            tcp_idle: upstreams.iter().map(|_| Mutex::default()).collect(),
            upstreams,
            timeout,
            mark,
            udp,
            cache,
            metrics,
        }
    }

    /// Whether there is anywhere to forward to.
    pub fn has_upstreams(&self) -> bool {
        !self.upstreams.is_empty()
    }

    /// A forwarder like this one (timeout, mark, cache) for `upstreams`, on new sockets.
    pub fn with_upstreams(&self, upstreams: Vec<SocketAddr>) -> Self {
        Self::new(
            upstreams,
            self.timeout,
            self.mark,
            self.cache.clone(),
            self.metrics.clone(),
        )
    }

    /// Forwards a UDP query that came to `reply` from `client`; the answer (or SERVFAIL)
    /// is sent from `reply` by another thread. `info`: the query's cache key, when the
    /// answer may be kept (at cache `generation`). False when it cannot be forwarded now
    /// (no upstream, too many waiting): the caller answers SERVFAIL.
    ///
    /// `query` is sent as it is but for the ID (put back before returning), outside the
    /// pending table's lock.
    pub fn udp_query(
        &self,
        query: &mut [u8],
        client: SocketAddr,
        reply: &Arc<UdpSocket>,
        info: Option<QueryInfo>,
        generation: u64,
    ) -> bool {
        match &self.udp {
            Some(u) => u.query(query, client, reply, info, generation),
            None => false,
        }
    }

    /// One query on one TCP connection.
    async fn exchange(
        s: &mut tokio::net::TcpStream,
        query: &[u8],
        len: u16,
    ) -> std::io::Result<Vec<u8>> {
        let mut out = [0u8; 2 + super::answer::MAX_QUERY];
        let framed = out.get_mut(..2 + query.len()).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "query too large")
        })?;
        framed[..2].copy_from_slice(&len.to_be_bytes());
        framed[2..].copy_from_slice(query);
        s.write_all(framed).await?;
        let mut prefix = [0u8; 2];
        s.read_exact(&mut prefix).await?;
        let mut resp = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
        s.read_exact(&mut resp).await?;
        if !answers(query, &resp) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the upstream's answer does not match the query",
            ));
        }
        Ok(resp)
    }

    async fn tcp_one(&self, i: usize, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let upstream = self.upstreams[i];
        let len = u16::try_from(query.len()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "query above 65535 bytes")
        })?;
        let idle = || {
            self.tcp_idle[i]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
        };
        let work = async {
            // A kept connection first; one the upstream closed meanwhile is replaced once.
            if let Some(mut s) = idle()
                && let Ok(r) = Self::exchange(&mut s, query, len).await
            {
                return Ok((s, r));
            }
            let mut s =
                crate::dataplane::tunnel::connect_tcp(upstream, self.mark, self.timeout).await?;
            let r = Self::exchange(&mut s, query, len).await?;
            Ok::<_, std::io::Error>((s, r))
        };
        let (s, r) = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time")
            })??;
        let mut pool = self.tcp_idle[i].lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < MAX_IDLE_TCP {
            pool.push(s);
        }
        Ok(r)
    }

    /// Forwards over TCP (a kept connection when there is one).
    pub async fn tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.metrics.forwarded[1].inc();
        for (i, u) in self.upstreams.iter().enumerate() {
            let sent = Instant::now();
            match self.tcp_one(i, query).await {
                Ok(r) => {
                    self.metrics.observe(sent.elapsed());
                    return Some(r);
                }
                Err(e) => {
                    let c = if e.kind() == std::io::ErrorKind::TimedOut {
                        &self.metrics.upstream_timeouts
                    } else {
                        &self.metrics.upstream_errors
                    };
                    c.inc();
                    tracing::debug!(upstream = %u, error = %e, "upstream did not answer (TCP)")
                }
            }
        }
        tracing::warn!(upstreams = ?self.upstreams, "no upstream resolver answered over TCP; answering SERVFAIL");
        None
    }

    /// The cache answers are kept in (None: off).
    pub fn cache(&self) -> Option<&Arc<Cache>> {
        self.cache.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A tiny upstream on loopback: UDP and TCP on one port number, echoing the query
    /// with QR set (UDP: a reply with the wrong ID first, which is ignored). Counts TCP
    /// connections.
    async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        // The UDP port the kernel picks may be in use on TCP (a client connection's local
        // port), then both are bound again.
        let (udp, tcp) = (0..16)
            .find_map(|_| {
                let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                let tcp = std::net::TcpListener::bind(udp.local_addr().unwrap()).ok()?;
                udp.set_nonblocking(true).unwrap();
                tcp.set_nonblocking(true).unwrap();
                Some((udp, tcp))
            })
            .expect("a loopback port free for both UDP and TCP");
        let udp = tokio::net::UdpSocket::from_std(udp).unwrap();
        let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
        let addr = udp.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, from) = udp.recv_from(&mut buf).await.unwrap();
                let mut wrong = buf[..n].to_vec();
                wrong[0] ^= 0xff;
                wrong[2] |= 0x80;
                udp.send_to(&wrong, from).await.unwrap();
                buf[2] |= 0x80;
                udp.send_to(&buf[..n], from).await.unwrap();
            }
        });
        let conns = Arc::new(AtomicUsize::new(0));
        let c2 = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = tcp.accept().await.unwrap();
                c2.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    loop {
                        let mut p = [0u8; 2];
                        if s.read_exact(&mut p).await.is_err() {
                            return;
                        }
                        let mut q = vec![0u8; usize::from(u16::from_be_bytes(p))];
                        s.read_exact(&mut q).await.unwrap();
                        q[2] |= 0x80;
                        s.write_all(&p).await.unwrap();
                        s.write_all(&q).await.unwrap();
                    }
                });
            }
        });
        (addr, conns)
    }

    fn forwarder(upstreams: Vec<SocketAddr>, timeout: Duration) -> Forwarder {
        Forwarder::new(
            upstreams,
            timeout,
            None,
            None,
            Arc::new(DnsMetrics::default()),
        )
    }

    /// A client, the "listening" socket of the agent, and a query through `f`; the
    /// answer the client gets.
    fn ask_udp(f: &Forwarder, q: &[u8]) -> Vec<u8> {
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let listener = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let mut q = q.to_vec();
        assert!(f.udp_query(&mut q, client.local_addr().unwrap(), &listener, None, 0));
        let mut buf = [0u8; 512];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(
            from,
            listener.local_addr().unwrap(),
            "answered from the listener"
        );
        buf[..n].to_vec()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwards_udp_and_tcp_and_skips_dead_upstreams() {
        let (addr, conns) = upstream().await;
        // A dead upstream first: a closed port on loopback (refused at once).
        let dead = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let f = forwarder(vec![dead, addr], Duration::from_secs(5));
        let q = [0x12, 0x34, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let r = tokio::task::spawn_blocking(move || {
            let r = ask_udp(&f, &q);
            // The sockets are kept: a second query goes out on them too.
            let r2 = ask_udp(&f, &[0x56, 0x78, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            assert_eq!(&r2[..2], &[0x56, 0x78]);
            r
        })
        .await
        .unwrap();
        assert_eq!(&r[..2], &[0x12, 0x34], "the client's own ID");
        assert_eq!(r[2] & 0x80, 0x80);
        // TCP: three queries, one upstream connection.
        let f = forwarder(vec![addr], Duration::from_secs(5));
        for id in 0..3u8 {
            let q = [id, 0x34, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            let r = f.tcp(&q).await.unwrap();
            assert_eq!(r[0], id);
            assert_eq!(r[2] & 0x80, 0x80);
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1, "the connection is reused");
        // No upstream answers: SERVFAIL after the timeout.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let f = forwarder(
            vec![silent.local_addr().unwrap()],
            Duration::from_millis(200),
        );
        let r = tokio::task::spawn_blocking(move || {
            ask_udp(
                &f,
                &[0x43, 0x21, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1],
            )
        })
        .await
        .unwrap();
        assert_eq!(&r[..2], &[0x43, 0x21]);
        assert_eq!(r[3] & 0x0f, 2, "SERVFAIL");
        drop(silent);
    }

    fn a_query(id: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        q.extend_from_slice(b"\x03www\x07example\x00\x00\x01\x00\x01");
        q
    }

    /// A bound socket standing for an upstream the test answers from by hand.
    fn manual_upstream() -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// The upstream's answer to the query it got: the query with QR set.
    fn answer_to(q: &[u8]) -> Vec<u8> {
        let mut r = q.to_vec();
        r[2] |= 0x80;
        r[3] = 0x80;
        r
    }

    /// The first upstream answers only after the query was sent on to the second
    /// (which never answers): its late answer reaches the client — before, it was
    /// dropped and the client got SERVFAIL once the second timed out too.
    #[test]
    fn a_late_answer_of_an_earlier_upstream_still_answers() {
        let (a, b) = (manual_upstream(), manual_upstream());
        let f = forwarder(
            vec![a.local_addr().unwrap(), b.local_addr().unwrap()],
            Duration::from_millis(300),
        );
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let listener = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let mut q = a_query(0x7777);
        assert!(f.udp_query(&mut q, client.local_addr().unwrap(), &listener, None, 0));
        let mut buf = [0u8; 512];
        let (n, agent) = a.recv_from(&mut buf).unwrap();
        let first = buf[..n].to_vec();
        // The retry at the second upstream (the first's timeout has passed).
        let (n, _) = b.recv_from(&mut buf).unwrap();
        assert_eq!(buf[12..n], first[12..], "the same question");
        a.send_to(&answer_to(&first), agent).unwrap();
        let n = client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..2], &[0x77, 0x77], "the client's ID");
        assert_eq!(
            buf[3] & 0x0f,
            0,
            "the first upstream's answer, not SERVFAIL"
        );
        assert_eq!(buf[12..n], first[12..]);
        let u = f.udp.as_ref().unwrap();
        let t = u.lock();
        assert!(
            t.map.is_empty() && t.earlier.is_empty(),
            "nothing left waiting"
        );
    }

    /// The forwarding state without its threads, on sockets connected to `upstreams`.
    fn inner(upstreams: &[SocketAddr], timeout: Duration) -> UdpInner {
        let socks = upstreams
            .iter()
            .flat_map(|u| std::iter::repeat_n(*u, SOCKETS_PER_UPSTREAM))
            .map(|u| udp_socket(u, None).unwrap())
            .collect();
        UdpInner::new(
            socks,
            upstreams.to_vec(),
            timeout,
            None,
            Arc::new(DnsMetrics::default()),
        )
    }

    /// An answer that came in time but is still in the socket (its answer thread had not
    /// run: a busy host) is delivered by the timeout round, not timed out into SERVFAIL.
    #[test]
    fn an_answer_waiting_in_the_socket_is_not_timed_out() {
        use rustix::event::{PollFd, PollFlags, poll};
        let up = manual_upstream();
        let u = inner(&[up.local_addr().unwrap()], Duration::from_millis(100));
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let listener = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let mut q = a_query(0x1234);
        assert!(u.query(&mut q, client.local_addr().unwrap(), &listener, None, 0));
        let mut buf = [0u8; 512];
        let (n, agent) = up.recv_from(&mut buf).unwrap();
        up.send_to(&answer_to(&buf[..n]), agent).unwrap();
        // Wait until the answer is in one of the agent's sockets.
        let mut fds: Vec<PollFd<'_>> = u
            .socks
            .iter()
            .map(|s| PollFd::new(s, PollFlags::IN))
            .collect();
        assert_eq!(poll(&mut fds, None).unwrap(), 1);
        // A round well past the timeout, on time (no stall).
        let now = Instant::now() + Duration::from_secs(1);
        u.lock().last_sweep = now - SWEEP;
        let mut scratch = vec![0u8; 65535];
        assert!(u.sweep_once(now, &mut scratch));
        let n = client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..2], &[0x12, 0x34]);
        assert_eq!(buf[3] & 0x0f, 0, "the upstream's answer, not SERVFAIL");
        assert!(n > 12);
        assert_eq!(u.metrics.upstream_timeouts.get(), 0);
    }

    /// A timeout round that runs seconds late (the host stalled) does not count the stall
    /// against the upstream; the query times out once it has waited `timeout` of the time
    /// the agent could run.
    #[test]
    fn a_stalled_host_does_not_time_out_the_upstream() {
        let silent = manual_upstream();
        let u = inner(&[silent.local_addr().unwrap()], Duration::from_secs(1));
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let listener = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        let t0 = Instant::now();
        u.lock().last_sweep = t0;
        let mut q = a_query(0x4321);
        assert!(u.query(&mut q, client.local_addr().unwrap(), &listener, None, 0));
        let mut scratch = vec![0u8; 65535];
        // Three seconds without a round, then rounds every 50 ms again.
        let mut at = t0 + Duration::from_secs(3);
        assert!(u.sweep_once(at, &mut scratch));
        while at < t0 + Duration::from_millis(3500) {
            at += SWEEP;
            assert!(u.sweep_once(at, &mut scratch));
        }
        assert_eq!(u.lock().map.len(), 1, "still waiting for the upstream");
        assert_eq!(u.metrics.upstream_timeouts.get(), 0);
        while at < t0 + Duration::from_millis(4100) {
            at += SWEEP;
            assert!(u.sweep_once(at, &mut scratch));
        }
        assert!(
            u.lock().map.is_empty(),
            "timed out after a second of running time"
        );
        let mut buf = [0u8; 512];
        client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..2], &[0x43, 0x21]);
        assert_eq!(buf[3] & 0x0f, 2, "SERVFAIL");
        assert_eq!(u.metrics.upstream_timeouts.get(), 1);
    }
}
