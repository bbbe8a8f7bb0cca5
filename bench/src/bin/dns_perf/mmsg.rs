//! The `mmsg` client of `dns_perf`: a UDP DNS load generator cheap enough per query that
//! on a 2-vCPU machine the server, not the client, limits the q/s.
//!
//! dnsperf spends ~5.5 µs of its CPU per query (a `sendto` and a receive per query, two
//! threads handing off through a mutex), more than the agent's server needs per mesh
//! answer, so with both pinned to one core each the q/s it measures is its own ceiling.
//! This client sends pre-built queries (the same names) with one `sendmmsg` (rustix) per
//! batch and receives the answers with one `recvmmsg` (quinn-udp: the workspace allows no
//! `unsafe`) per batch, from one thread, on `sockets` connected UDP sockets, keeping at
//! most `outstanding` queries in flight (dnsperf's `-q`) or sending at a fixed `rate`.
//!
//! Every answer is checked, not only counted: its ID must be one in flight on that socket
//! (else it is late: its query had timed out), and it must be a response (QR, opcode 0),
//! not truncated, NOERROR, echo the query's question, and carry an A record of class IN —
//! with the expected address when the query file names one. Anything else is an error, by
//! kind. The process measures its own CPU time (`CLOCK_PROCESS_CPUTIME_ID`) over the run.

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

/// Most datagrams one `sendmmsg` or `recvmmsg` moves.
const BATCH: usize = quinn::udp::BATCH_SIZE;
/// Room per received datagram (the sockets have no GRO: one datagram per buffer).
const SLOT: usize = 2048;
/// Longest query packet: a 255-byte name, the header and the type and class.
const MAX_QUERY: usize = 512;

/// One query of the list: its packet (ID 0; the ID is written per send) and, when known,
/// the address its A answer must carry.
#[derive(Debug, Clone)]
pub(crate) struct Query {
    packet: Vec<u8>,
    expect: Option<Ipv4Addr>,
}

/// The wire form of an A/IN query for `name` with recursion desired and ID 0 (as dnsperf
/// sends it without `-e`: no EDNS).
pub(crate) fn query_packet(name: &str) -> anyhow::Result<Vec<u8>> {
    use hickory_proto::op::{Message, Query as Q};
    use hickory_proto::rr::{Name, RecordType};
    let n = Name::from_ascii(name).with_context(|| format!("query name {name:?}"))?;
    let mut m = Message::query();
    m.metadata.id = 0;
    m.metadata.recursion_desired = true;
    m.add_query(Q::query(n, RecordType::A));
    let p = m
        .to_vec()
        .with_context(|| format!("encode the query for {name:?}"))?;
    if p.len() > MAX_QUERY {
        bail!(
            "the query for {name:?} is {} bytes; at most {MAX_QUERY}",
            p.len()
        );
    }
    Ok(p)
}

/// Reads a query file: one `NAME A [ADDRESS]` per line (dnsperf's format plus the
/// address the answer must carry); empty lines and `#` comments are skipped.
pub(crate) fn read_queries(path: &Path) -> anyhow::Result<Vec<Query>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    parse_queries(&text).with_context(|| format!("query file {}", path.display()))
}

pub(crate) fn parse_queries(text: &str) -> anyhow::Result<Vec<Query>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(name), Some(t)) = (f.next(), f.next()) else {
            bail!(
                "line {}: {line:?} is not `NAME A [ADDRESS]`; write the name and the type",
                i + 1
            );
        };
        if !t.eq_ignore_ascii_case("A") {
            bail!(
                "line {}: type {t:?} for {name}: the mmsg client asks only A queries; use A",
                i + 1
            );
        }
        let expect = match f.next() {
            Some(a) => Some(a.parse::<Ipv4Addr>().with_context(|| {
                format!(
                    "line {}: {a:?} is not an IPv4 address (the expected answer of {name})",
                    i + 1
                )
            })?),
            None => None,
        };
        out.push(Query {
            packet: query_packet(name)?,
            expect,
        });
    }
    if out.is_empty() {
        bail!("no queries (one `NAME A [ADDRESS]` per line)");
    }
    Ok(out)
}

/// What an answer was found to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Ok,
    /// Cut short, or a name or record running past the end.
    Malformed,
    /// QR not set, or an opcode other than QUERY.
    NotResponse,
    Truncated,
    /// Any RCODE other than NOERROR (the value).
    Rcode(u8),
    /// Not exactly the question that was asked.
    WrongQuestion,
    /// NOERROR without an A/IN record.
    NoAnswer,
    /// A records, none with the expected address.
    WrongAddress,
}

impl Verdict {
    fn kind(self) -> usize {
        match self {
            Verdict::Ok => 0,
            Verdict::Malformed => 1,
            Verdict::NotResponse => 2,
            Verdict::Truncated => 3,
            Verdict::Rcode(_) => 4,
            Verdict::WrongQuestion => 5,
            Verdict::NoAnswer => 6,
            Verdict::WrongAddress => 7,
        }
    }
}

const KINDS: [&str; 8] = [
    "ok",
    "malformed",
    "not_response",
    "truncated",
    "rcode",
    "wrong_question",
    "no_answer",
    "wrong_address",
];

/// The offset just past the (possibly compressed) name at `pos`.
fn skip_name(buf: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let len = *buf.get(pos)?;
        match len {
            0 => return Some(pos + 1),
            l if l & 0xC0 == 0xC0 => {
                buf.get(pos + 1)?;
                return Some(pos + 2);
            }
            l if l & 0xC0 == 0 => pos += 1 + usize::from(l),
            _ => return None,
        }
    }
}

fn u16_at(buf: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*buf.get(pos)?, *buf.get(pos + 1)?]))
}

/// Checks the answer `resp` to `query` (the packet sent; its ID is not compared: the
/// caller matched it), wanting an A/IN record, with address `expect` when given.
pub(crate) fn check_answer(resp: &[u8], query: &[u8], expect: Option<Ipv4Addr>) -> Verdict {
    if resp.len() < 12 || query.len() < 12 {
        return Verdict::Malformed;
    }
    let (f1, f2) = (resp[2], resp[3]);
    if f1 & 0x80 == 0 || (f1 >> 3) & 0x0F != 0 {
        return Verdict::NotResponse;
    }
    if f1 & 0x02 != 0 {
        return Verdict::Truncated;
    }
    if f2 & 0x0F != 0 {
        return Verdict::Rcode(f2 & 0x0F);
    }
    // The question: exactly one, the bytes that were sent (names compared ignoring ASCII
    // case; length bytes are below 64, so no letter).
    let Some(qend) = skip_name(query, 12).map(|p| p + 4) else {
        return Verdict::Malformed;
    };
    if u16_at(resp, 4) != Some(1) {
        return Verdict::WrongQuestion;
    }
    match (resp.get(12..qend), query.get(12..qend)) {
        (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => {}
        (None, _) => return Verdict::Malformed,
        _ => return Verdict::WrongQuestion,
    }
    let Some(ancount) = u16_at(resp, 6) else {
        return Verdict::Malformed;
    };
    let (mut pos, mut seen_a) = (qend, false);
    for _ in 0..ancount {
        let Some(p) = skip_name(resp, pos) else {
            return Verdict::Malformed;
        };
        let (Some(t), Some(class), Some(rdlen)) =
            (u16_at(resp, p), u16_at(resp, p + 2), u16_at(resp, p + 8))
        else {
            return Verdict::Malformed;
        };
        let rd = p + 10;
        let Some(rdata) = resp.get(rd..rd + usize::from(rdlen)) else {
            return Verdict::Malformed;
        };
        if t == 1 && class == 1 && rdata.len() == 4 {
            seen_a = true;
            match expect {
                None => return Verdict::Ok,
                Some(ip) if rdata == ip.octets() => return Verdict::Ok,
                Some(_) => {}
            }
        }
        pos = rd + usize::from(rdlen);
    }
    if seen_a {
        Verdict::WrongAddress
    } else {
        Verdict::NoAnswer
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// 0: free; else the generation of the query in flight under this ID.
    generation: u32,
    query: u32,
    sent_ns: u64,
}

/// The query IDs of one socket: which are in flight, for which query, since when. Free
/// IDs are reused first-in first-out, so an ID comes back only after ~65,000 other
/// queries (a late answer cannot be taken for a newer query's).
pub(crate) struct Ids {
    slots: Vec<Slot>,
    free: VecDeque<u16>,
    /// (ID, generation) in send order, for the timeouts; entries whose query was answered
    /// are dropped when they reach the front.
    order: VecDeque<(u16, u32)>,
    next_generation: u32,
    inflight: usize,
}

impl Ids {
    pub(crate) fn new() -> Self {
        Self {
            slots: vec![Slot::default(); 1 << 16],
            free: (0..=u16::MAX).collect(),
            order: VecDeque::new(),
            next_generation: 1,
            inflight: 0,
        }
    }

    pub(crate) fn inflight(&self) -> usize {
        self.inflight
    }

    /// An ID for query `query` sent at `now_ns`; None when all 65,536 are in flight.
    pub(crate) fn take(&mut self, query: u32, now_ns: u64) -> Option<u16> {
        let id = self.free.pop_front()?;
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        self.slots[usize::from(id)] = Slot {
            generation,
            query,
            sent_ns: now_ns,
        };
        self.order.push_back((id, generation));
        self.inflight += 1;
        Some(id)
    }

    /// The answer with `id` arrived: its (query, send time), and the ID is free again;
    /// None when no query is in flight under it (late, or never sent).
    pub(crate) fn answer(&mut self, id: u16) -> Option<(u32, u64)> {
        let s = &mut self.slots[usize::from(id)];
        if s.generation == 0 {
            return None;
        }
        s.generation = 0;
        self.free.push_back(id);
        self.inflight -= 1;
        Some((s.query, s.sent_ns))
    }

    /// The answer with `id` arrived at `now_ns`: its (query, send time) when it came within
    /// `timeout_ns`, `Err(())` when it came later (the query counts as lost, as if
    /// [`Ids::expire`] had run first: a stalled client does not turn a timeout into an
    /// answer); None when no query is in flight under it. The ID is free again.
    pub(crate) fn answer_at(
        &mut self,
        id: u16,
        now_ns: u64,
        timeout_ns: u64,
    ) -> Option<Result<(u32, u64), ()>> {
        let (query, sent_ns) = self.answer(id)?;
        Some(if now_ns.saturating_sub(sent_ns) < timeout_ns {
            Ok((query, sent_ns))
        } else {
            Err(())
        })
    }

    /// Frees `id` taken for a query that could not be sent after all.
    pub(crate) fn cancel(&mut self, id: u16) {
        let _ = self.answer(id);
    }

    /// Gives up on the queries sent before `now_ns - timeout_ns`; how many.
    pub(crate) fn expire(&mut self, now_ns: u64, timeout_ns: u64) -> u64 {
        let mut lost = 0;
        while let Some(&(id, generation)) = self.order.front() {
            let s = self.slots[usize::from(id)];
            if s.generation == generation {
                if now_ns.saturating_sub(s.sent_ns) < timeout_ns {
                    break;
                }
                self.cancel(id);
                lost += 1;
            }
            self.order.pop_front();
        }
        lost
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) server: SocketAddr,
    pub(crate) seconds: f64,
    /// Most queries in flight, all sockets together (dnsperf `-q`).
    pub(crate) outstanding: usize,
    pub(crate) sockets: usize,
    /// Queries per second; None: as fast as the answers come back.
    pub(crate) rate: Option<u64>,
    pub(crate) timeout: Duration,
}

fn process_cpu_secs() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

struct Conn {
    sock: UdpSocket,
    ids: Ids,
}

struct Counts {
    sent: u64,
    ok: u64,
    ok_in_window: u64,
    lost: u64,
    late: u64,
    /// By [`Verdict::kind`] (index 0 unused).
    errors: [u64; KINDS.len()],
    lat_ns: Vec<u32>,
}

/// Sends up to `n` queries on `c`, from `*next` on in the list; how many went out.
fn send_batch(
    c: &mut Conn,
    queries: &[Query],
    next: &mut usize,
    n: usize,
    now_ns: u64,
    bufs: &mut [[u8; MAX_QUERY]],
) -> anyhow::Result<usize> {
    use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, sendmmsg};
    let n = n.min(BATCH);
    let mut lens = [0usize; BATCH];
    let mut ids = [0u16; BATCH];
    let mut k = 0;
    while k < n {
        let q = &queries[*next];
        let Some(id) = c.ids.take(*next as u32, now_ns) else {
            break;
        };
        bufs[k][..q.packet.len()].copy_from_slice(&q.packet);
        bufs[k][..2].copy_from_slice(&id.to_be_bytes());
        (lens[k], ids[k]) = (q.packet.len(), id);
        *next = (*next + 1) % queries.len();
        k += 1;
    }
    if k == 0 {
        return Ok(0);
    }
    let iovs: Vec<[IoSlice<'_>; 1]> = bufs[..k]
        .iter()
        .zip(&lens)
        .map(|(b, &l)| [IoSlice::new(&b[..l])])
        .collect();
    let mut ctrls: Vec<SendAncillaryBuffer<'_, '_, '_>> =
        (0..k).map(|_| SendAncillaryBuffer::default()).collect();
    let mut msgs: Vec<MMsgHdr<'_>> = iovs
        .iter()
        .zip(ctrls.iter_mut())
        .map(|(iov, ctrl)| MMsgHdr::new(iov, ctrl))
        .collect();
    let mut done = 0;
    while done < k {
        match sendmmsg(&c.sock, &mut msgs[done..], SendFlags::empty()) {
            Ok(0) => break,
            Ok(m) => done += m,
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => break,
            Err(rustix::io::Errno::CONNREFUSED) => bail!(
                "the server refused the queries (port unreachable): is it listening on {}?",
                c.sock
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default()
            ),
            Err(e) => return Err(std::io::Error::from(e)).context("sendmmsg"),
        }
    }
    // What the socket buffer did not take is not sent: free its IDs, ask it next time.
    for &id in &ids[done..k] {
        c.ids.cancel(id);
    }
    *next = (*next + queries.len() - (k - done)) % queries.len();
    Ok(done)
}

/// Runs the load and reports (JSON): sent, answered, errors by kind, lost, late, the
/// q/s over the sending window, latency percentiles (ms) of the correct answers, and the
/// process's CPU time per correct answer.
pub(crate) fn run(queries: &[Query], o: &Options) -> anyhow::Result<serde_json::Value> {
    if queries.is_empty() || o.sockets == 0 || o.outstanding == 0 {
        bail!("the mmsg client needs queries, at least one socket and one query in flight");
    }
    let local: SocketAddr = match o.server {
        SocketAddr::V4(_) => "0.0.0.0:0".parse()?,
        SocketAddr::V6(_) => "[::]:0".parse()?,
    };
    // quinn-udp's receive does not depend on the state's socket options: made on a scratch
    // socket, so the client's sockets keep plain options (no GRO, no control messages).
    let scratch = UdpSocket::bind(local)?;
    let state = quinn::udp::UdpSocketState::new((&scratch).into())?;
    let mut conns = Vec::with_capacity(o.sockets);
    for _ in 0..o.sockets {
        let sock = UdpSocket::bind(local)?;
        sock.connect(o.server)?;
        sock.set_nonblocking(true)?;
        conns.push(Conn {
            sock,
            ids: Ids::new(),
        });
    }
    let per_sock = o.outstanding.div_ceil(o.sockets);
    let window_ns = (o.seconds * 1e9) as u64;
    let timeout_ns = o.timeout.as_nanos() as u64;
    let mut bufs = vec![[0u8; MAX_QUERY]; BATCH];
    let mut rbuf = vec![0u8; BATCH * SLOT];
    let mut meta = [quinn::udp::RecvMeta::default(); BATCH];
    let mut c = Counts {
        sent: 0,
        ok: 0,
        ok_in_window: 0,
        lost: 0,
        late: 0,
        errors: [0; KINDS.len()],
        lat_ns: Vec::with_capacity(1 << 20),
    };
    let (mut next, mut rr) = (0usize, 0usize);
    let cpu0 = process_cpu_secs();
    let start = Instant::now();
    let now_ns = |s: Instant| s.elapsed().as_nanos() as u64;
    loop {
        let now = now_ns(start);
        let sending = now < window_ns;
        if sending {
            match o.rate {
                None => {
                    for conn in conns.iter_mut() {
                        while conn.ids.inflight() < per_sock {
                            let want = per_sock - conn.ids.inflight();
                            let k = send_batch(conn, queries, &mut next, want, now, &mut bufs)?;
                            c.sent += k as u64;
                            if k < want.min(BATCH) {
                                break;
                            }
                        }
                    }
                }
                Some(rate) => {
                    // Every query due by now (the first at 0), round robin over the sockets.
                    let due = (u128::from(now) * u128::from(rate) / 1_000_000_000) as u64 + 1;
                    while c.sent < due {
                        let nconns = conns.len();
                        let conn = &mut conns[rr];
                        rr = (rr + 1) % nconns;
                        let room = per_sock.saturating_sub(conn.ids.inflight());
                        let want = ((due - c.sent) as usize).min(room);
                        if want == 0 {
                            break;
                        }
                        let k = send_batch(conn, queries, &mut next, want, now, &mut bufs)?;
                        c.sent += k as u64;
                        if k == 0 {
                            break;
                        }
                    }
                }
            }
        }
        // Answers: every socket, until its queue is empty.
        let mut got = 0;
        for conn in conns.iter_mut() {
            loop {
                let mut chunks = rbuf.chunks_mut(SLOT);
                let mut iovs: [IoSliceMut<'_>; BATCH] =
                    std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or(&mut [])));
                let n = match state.recv((&conn.sock).into(), &mut iovs, &mut meta) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => bail!(
                        "the server refused the queries (port unreachable): is it listening on {}?",
                        o.server
                    ),
                    Err(e) => return Err(e).context("recvmmsg"),
                };
                let at = now_ns(start);
                for (i, m) in meta[..n].iter().enumerate() {
                    let len = m.len.min(SLOT);
                    let d = &rbuf[i * SLOT..i * SLOT + len];
                    let Some(id) = u16_at(d, 0) else {
                        c.errors[Verdict::Malformed.kind()] += 1;
                        continue;
                    };
                    let (qi, sent_ns) = match conn.ids.answer_at(id, at, timeout_ns) {
                        Some(Ok(q)) => q,
                        Some(Err(())) => {
                            c.lost += 1;
                            continue;
                        }
                        None => {
                            c.late += 1;
                            continue;
                        }
                    };
                    let q = &queries[qi as usize];
                    match check_answer(d, &q.packet, q.expect) {
                        Verdict::Ok => {
                            c.ok += 1;
                            if at <= window_ns {
                                c.ok_in_window += 1;
                            }
                            c.lat_ns
                                .push(at.saturating_sub(sent_ns).min(u64::from(u32::MAX)) as u32);
                        }
                        v => c.errors[v.kind()] += 1,
                    }
                }
                got += n;
                if n < BATCH {
                    break;
                }
            }
        }
        let now = now_ns(start);
        for conn in conns.iter_mut() {
            c.lost += conn.ids.expire(now, timeout_ns);
        }
        let inflight: usize = conns.iter().map(|k| k.ids.inflight()).sum();
        if now >= window_ns && inflight == 0 {
            break;
        }
        if got == 0 {
            // Wait for an answer, the next query due, a timeout or the window's end.
            let until = match o.rate {
                Some(rate) if now < window_ns => {
                    (u128::from(c.sent) * 1_000_000_000 / u128::from(rate.max(1))) as u64
                }
                _ if now < window_ns => window_ns.min(now + 10_000_000),
                _ => now + 10_000_000,
            };
            let wait = until.saturating_sub(now);
            if wait > 0 || o.rate.is_none() {
                use rustix::event::{PollFd, PollFlags, Timespec, poll};
                let mut fds: Vec<PollFd<'_>> = conns
                    .iter()
                    .map(|k| PollFd::new(&k.sock, PollFlags::IN))
                    .collect();
                let ts = Timespec {
                    tv_sec: (wait / 1_000_000_000) as _,
                    tv_nsec: (wait % 1_000_000_000) as _,
                };
                match poll(&mut fds, Some(&ts)) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(std::io::Error::from(e)).context("poll"),
                }
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = process_cpu_secs() - cpu0;
    c.lat_ns.sort_unstable();
    let pct = |p: f64| {
        if c.lat_ns.is_empty() {
            return f64::NAN;
        }
        let i = ((c.lat_ns.len() as f64 - 1.0) * p).round() as usize;
        f64::from(c.lat_ns[i.min(c.lat_ns.len() - 1)]) / 1e6
    };
    let errors: u64 = c.errors.iter().sum();
    let by_kind: serde_json::Map<String, serde_json::Value> = KINDS
        .iter()
        .zip(c.errors)
        .skip(1)
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| ((*k).to_owned(), json!(n)))
        .collect();
    Ok(json!({
        "sent": c.sent, "ok": c.ok, "errors": errors, "errors_by_kind": by_kind,
        "lost": c.lost, "late": c.late,
        "window_s": o.seconds, "qps": c.ok_in_window as f64 / o.seconds,
        "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0),
        "cpu_s": cpu, "wall_s": wall,
        "cpu_us_per_query": cpu * 1e6 / c.ok.max(1) as f64,
        "cpu_busy": cpu / wall,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
    use hickory_proto::rr::rdata::{A, CNAME};
    use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

    /// The server's answer to `q`: `records` in the answer section, `rcode`.
    fn answer(q: &[u8], records: Vec<Record>, rcode: ResponseCode) -> Vec<u8> {
        let req = Message::from_vec(q).unwrap();
        let mut m = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.metadata.response_code = rcode;
        m.add_query(req.queries[0].clone());
        for r in records {
            m.add_answer(r);
        }
        m.to_vec().unwrap()
    }

    fn a(name: &str, ip: &str) -> Record {
        Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            30,
            RData::A(A(ip.parse().unwrap())),
        )
    }

    fn with_id(p: &[u8], id: u16) -> Vec<u8> {
        let mut p = p.to_vec();
        p[..2].copy_from_slice(&id.to_be_bytes());
        p
    }

    #[test]
    fn query_packet_is_a_standard_a_query_with_recursion() {
        let p = query_packet("svc7.default.causeway").unwrap();
        let m = Message::from_vec(&p).unwrap();
        assert_eq!(m.metadata.id, 0);
        assert_eq!(m.metadata.message_type, MessageType::Query);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.queries[0].name().to_ascii(), "svc7.default.causeway.");
        assert_eq!(m.queries[0].query_type(), RecordType::A);
        assert_eq!(m.queries[0].query_class(), DNSClass::IN);
        assert!(m.edns.is_none(), "no EDNS, as dnsperf without -e");
        // The ID a send writes into the first two bytes is the parsed one.
        let m = Message::from_vec(&with_id(&p, 0xBEEF)).unwrap();
        assert_eq!(m.metadata.id, 0xBEEF);
    }

    #[test]
    fn query_file_lines_parse_and_bad_lines_are_named() {
        let qs =
            parse_queries("# mesh\nsvc0.default.causeway A 240.240.1.1\n\nhost0.outside.test a\n")
                .unwrap();
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[0].expect, Some(Ipv4Addr::new(240, 240, 1, 1)));
        assert_eq!(qs[1].expect, None);
        let e = format!("{:#}", parse_queries("x.test AAAA\n").unwrap_err());
        assert!(e.contains("AAAA") && e.contains("use A"), "{e}");
        let e = format!("{:#}", parse_queries("x.test A 1.2.3\n").unwrap_err());
        assert!(e.contains("1.2.3") && e.contains("IPv4"), "{e}");
        let e = format!("{:#}", parse_queries("lonely\n").unwrap_err());
        assert!(e.contains("line 1") && e.contains("lonely"), "{e}");
        assert!(parse_queries("# nothing\n").is_err());
    }

    #[test]
    fn correct_answers_pass_with_and_without_an_expected_address() {
        let q = with_id(&query_packet("svc1.default.causeway").unwrap(), 7);
        let ip = Ipv4Addr::new(240, 240, 1, 2);
        let r = answer(
            &q,
            vec![a("svc1.default.causeway.", "240.240.1.2")],
            ResponseCode::NoError,
        );
        assert_eq!(check_answer(&r, &q, Some(ip)), Verdict::Ok);
        assert_eq!(check_answer(&r, &q, None), Verdict::Ok);
        // A CNAME first, then the A record (the owner name compressed or not).
        let cname = Record::from_rdata(
            Name::from_ascii("svc1.default.causeway.").unwrap(),
            30,
            RData::CNAME(CNAME(Name::from_ascii("real.example.").unwrap())),
        );
        let r = answer(
            &q,
            vec![cname, a("real.example.", "240.240.1.2")],
            ResponseCode::NoError,
        );
        assert_eq!(check_answer(&r, &q, Some(ip)), Verdict::Ok);
        // Names are compared ignoring case (a server may echo 0x20-mixed case).
        let mut upper = r.clone();
        upper[13..17].copy_from_slice(b"SVC1");
        assert_eq!(check_answer(&upper, &q, Some(ip)), Verdict::Ok);
    }

    #[test]
    fn wrong_answers_are_errors_by_kind() {
        let q = with_id(&query_packet("host3.outside.test").unwrap(), 9);
        let ip = Some(Ipv4Addr::new(192, 0, 0, 4));
        let good = answer(
            &q,
            vec![a("host3.outside.test.", "192.0.0.4")],
            ResponseCode::NoError,
        );
        assert_eq!(check_answer(&good, &q, ip), Verdict::Ok);
        // NXDOMAIN, SERVFAIL.
        let nx = answer(&q, vec![], ResponseCode::NXDomain);
        assert_eq!(check_answer(&nx, &q, ip), Verdict::Rcode(3));
        let sf = answer(&q, vec![], ResponseCode::ServFail);
        assert_eq!(check_answer(&sf, &q, ip), Verdict::Rcode(2));
        // NOERROR without a record (NODATA).
        let empty = answer(&q, vec![], ResponseCode::NoError);
        assert_eq!(check_answer(&empty, &q, ip), Verdict::NoAnswer);
        assert_eq!(check_answer(&empty, &q, None), Verdict::NoAnswer);
        // Another address.
        let other = answer(
            &q,
            vec![a("host3.outside.test.", "192.0.0.5")],
            ResponseCode::NoError,
        );
        assert_eq!(check_answer(&other, &q, ip), Verdict::WrongAddress);
        assert_eq!(check_answer(&other, &q, None), Verdict::Ok);
        // The answer to another name.
        let q2 = query_packet("host4.outside.test").unwrap();
        let wrong_q = answer(
            &q2,
            vec![a("host4.outside.test.", "192.0.0.4")],
            ResponseCode::NoError,
        );
        assert_eq!(check_answer(&wrong_q, &q, ip), Verdict::WrongQuestion);
        // The query itself echoed back (QR clear).
        assert_eq!(check_answer(&q, &q, ip), Verdict::NotResponse);
        // TC set.
        let mut tc = good.clone();
        tc[2] |= 0x02;
        assert_eq!(check_answer(&tc, &q, ip), Verdict::Truncated);
        // Cut short: in the header, in the question, in the record.
        assert_eq!(check_answer(&good[..8], &q, ip), Verdict::Malformed);
        assert_eq!(check_answer(&good[..20], &q, ip), Verdict::Malformed);
        assert_eq!(
            check_answer(&good[..good.len() - 2], &q, ip),
            Verdict::Malformed
        );
        // An answer count past the records there are.
        let mut more = good.clone();
        more[7] = 2;
        assert_eq!(
            check_answer(&more, &q, ip),
            Verdict::Ok,
            "the first matches"
        );
        let mut more = other.clone();
        more[7] = 2;
        assert_eq!(check_answer(&more, &q, ip), Verdict::Malformed);
    }

    #[test]
    fn ids_match_answers_to_their_query_once() {
        let mut ids = Ids::new();
        let a = ids.take(10, 1_000).unwrap();
        let b = ids.take(11, 2_000).unwrap();
        assert_ne!(a, b);
        assert_eq!(ids.inflight(), 2);
        assert_eq!(ids.answer(b), Some((11, 2_000)));
        // A second answer with the same ID is late, not a second answer.
        assert_eq!(ids.answer(b), None);
        // An ID never sent is not in flight.
        assert_eq!(ids.answer(b.wrapping_add(100)), None);
        assert_eq!(ids.answer(a), Some((10, 1_000)));
        assert_eq!(ids.inflight(), 0);
    }

    #[test]
    fn ids_are_reused_last_and_run_out_at_65536() {
        let mut ids = Ids::new();
        let first = ids.take(0, 0).unwrap();
        ids.answer(first).unwrap();
        // The freed ID comes back only after every other one.
        let mut seen = std::collections::HashSet::new();
        for i in 0..65_535u32 {
            let id = ids.take(i, 0).unwrap();
            assert_ne!(id, first, "reused after {i} others");
            assert!(seen.insert(id));
        }
        assert_eq!(ids.take(0, 0), Some(first));
        assert_eq!(ids.take(0, 0), None, "all 65,536 in flight");
        assert_eq!(ids.inflight(), 65_536);
    }

    #[test]
    fn expire_counts_only_unanswered_queries_past_the_timeout() {
        let mut ids = Ids::new();
        let a = ids.take(1, 100).unwrap();
        let b = ids.take(2, 200).unwrap();
        let c = ids.take(3, 900).unwrap();
        ids.answer(a).unwrap();
        // At 1,150 with a timeout of 1,000 nothing is lost yet (b is 950 old).
        assert_eq!(ids.expire(1_150, 1_000), 0);
        assert_eq!(ids.inflight(), 2);
        // At 1,200: b (sent at 200) is lost; a was answered; c is still waiting.
        assert_eq!(ids.expire(1_200, 1_000), 1);
        assert_eq!(ids.inflight(), 1);
        // The lost query's late answer is not counted as an answer.
        assert_eq!(ids.answer(b), None);
        assert_eq!(ids.expire(1_899, 1_000), 0);
        assert_eq!(ids.expire(1_900, 1_000), 1);
        assert_eq!(ids.answer(c), None);
        assert_eq!(ids.inflight(), 0);
        // An answer that comes after the timeout, before an expire ran, is lost too.
        let e = ids.take(5, 1_000).unwrap();
        assert_eq!(ids.answer_at(e, 3_000, 2_000), Some(Err(())));
        assert_eq!(ids.inflight(), 0);
        assert_eq!(ids.answer_at(e, 3_000, 2_000), None, "and only once");
        let f = ids.take(6, 1_000).unwrap();
        assert_eq!(ids.answer_at(f, 2_999, 2_000), Some(Ok((6, 1_000))));
        // A cancelled ID is free again and never expires.
        let d = ids.take(4, 0).unwrap();
        ids.cancel(d);
        assert_eq!(ids.expire(u64::MAX, 1), 0);
    }

    #[test]
    fn runs_against_a_local_server_and_counts_wrong_answers() {
        // A one-socket echo-style server on loopback that answers every second query with
        // the wrong address: the client counts those as errors and the others as answers.
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let mut n = 0u32;
            while let Ok((len, from)) = server.recv_from(&mut buf) {
                let ip = if n.is_multiple_of(2) {
                    "192.0.2.1"
                } else {
                    "192.0.2.9"
                };
                n += 1;
                let r = answer(&buf[..len], vec![a("ok.test.", ip)], ResponseCode::NoError);
                let _ = server.send_to(&r, from);
            }
            n
        });
        let qs = parse_queries("ok.test A 192.0.2.1\n").unwrap();
        let r = run(
            &qs,
            &Options {
                server: addr,
                seconds: 0.2,
                outstanding: 1,
                sockets: 1,
                rate: None,
                timeout: Duration::from_secs(2),
            },
        )
        .unwrap();
        let served = t.join().unwrap();
        let (ok, errors) = (r["ok"].as_u64().unwrap(), r["errors"].as_u64().unwrap());
        assert!(ok > 0, "{r}");
        assert_eq!(ok + errors, u64::from(served), "{r}");
        assert_eq!(r["errors_by_kind"]["wrong_address"].as_u64(), Some(errors));
        assert_eq!(r["lost"].as_u64(), Some(0), "{r}");
        assert!(
            ok.abs_diff(errors) <= 1,
            "every second answer is wrong: {r}"
        );
    }
}
