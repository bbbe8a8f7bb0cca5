//! The cache of forwarded answers.
//!
//! - **What is kept**: answers to plain queries (one question, at most an EDNS OPT record
//!   without a client-subnet option), NOERROR with answers (positive) for the smallest
//!   TTL of their records, NXDOMAIN and NOERROR without answers (negative) per RFC 2308:
//!   the smaller of the SOA record's TTL and its MINIMUM field. No SOA, a TTL of 0, a
//!   truncated answer, another RCODE or a TSIG record: not kept. Positive lifetimes are
//!   capped by `cache_max_ttl`, negative ones by `cache_max_negative_ttl`.
//! - **Key**: the question's name (lower case), type and class, and the bits that change
//!   the answer: EDNS present, DO (DNSSEC records wanted), CD (checking disabled) and AD
//!   (whether the client wants to hear that the answer was validated).
//! - **Never served past its TTL**: an entry is dropped once its lifetime has passed,
//!   and every TTL of a served answer says what is left of it (whole seconds, rounded
//!   down), so the client does not keep it longer either.
//! - **Serving**: the stored answer with the client's ID, the client's question bytes
//!   (its letter case) and its RD bit. An answer too large for the client's UDP size is
//!   not served from the cache (forwarded, so the upstream truncates it).
//! - **Bounds**: at most `cache_max_entries` entries and `cache_max_bytes` bytes (key,
//!   answer, TTL positions and a fixed estimate of the bookkeeping per entry); the least
//!   recently used entries go first. [`Cache::clear`] empties it (the upstream set
//!   changed) and starts a new generation: answers to queries sent before are not kept.
//!
//! The clock is a parameter (`now`), so tests move it at will.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Longest key: flags, type, class and a 255-byte name.
pub const MAX_KEY: usize = 5 + 255;
/// DNS header length.
const HEADER: usize = 12;
/// Bookkeeping per entry beyond its key, answer and TTL positions (an estimate: the
/// entry, the LRU list node and hash table slot, four allocation headers).
pub const ENTRY_OVERHEAD: usize = std::mem::size_of::<Box<[u8]>>()
    + std::mem::size_of::<Entry>()
    + 2 * std::mem::size_of::<usize>()
    + 32
    + 4 * 16;

/// Key flag: the query had an EDNS OPT record.
const F_EDNS: u8 = 1;
/// Key flag: DNSSEC OK.
const F_DO: u8 = 2;
/// Key flag: checking disabled.
const F_CD: u8 = 4;
/// Key flag: AD asked for (dig sets it; a validating upstream then says whether the
/// answer is authentic, RFC 6840 §5.7).
const F_AD: u8 = 8;

/// What a cacheable query asks.
#[derive(Clone)]
pub struct QueryInfo {
    key: [u8; MAX_KEY],
    key_len: usize,
    /// Bytes of the question section (name, type, class) after the header.
    pub question_len: usize,
    /// Largest UDP answer the client takes (512, or its EDNS size).
    pub udp_limit: usize,
}

impl std::fmt::Debug for QueryInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryInfo")
            .field("key", &self.key())
            .field("question_len", &self.question_len)
            .field("udp_limit", &self.udp_limit)
            .finish()
    }
}

impl QueryInfo {
    /// The cache key.
    pub fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }

    /// Reads a query the cache can answer; None for anything else (it is forwarded and
    /// its answer not kept). No allocation.
    pub fn parse(packet: &[u8]) -> Option<Self> {
        if packet.len() < HEADER + 5 {
            return None;
        }
        // QR=0, opcode QUERY; one question, no answers or authorities, at most one
        // additional (the OPT record).
        if packet[2] & 0xf8 != 0 || packet[4..10] != [0, 1, 0, 0, 0, 0] || packet[10] != 0 {
            return None;
        }
        let arcount = packet[11];
        if arcount > 1 {
            return None;
        }
        let mut key = [0u8; MAX_KEY];
        let mut k = 5;
        let mut i = HEADER;
        loop {
            let len = usize::from(*packet.get(i)?);
            if len > 63 {
                return None; // compression or a reserved label type: not in a query
            }
            if k + 1 + len > MAX_KEY {
                return None;
            }
            key[k] = len as u8;
            let label = packet.get(i + 1..i + 1 + len)?;
            for (d, s) in key[k + 1..k + 1 + len].iter_mut().zip(label) {
                *d = s.to_ascii_lowercase();
            }
            k += 1 + len;
            i += 1 + len;
            if len == 0 {
                break;
            }
        }
        let fixed = packet.get(i..i + 4)?;
        key[1..5].copy_from_slice(fixed);
        i += 4;
        let question_len = i - HEADER;
        let mut flags = if packet[3] & 0x10 != 0 { F_CD } else { 0 };
        if packet[3] & 0x20 != 0 {
            flags |= F_AD;
        }
        let mut udp_limit = 512;
        if arcount == 1 {
            // Root name, type OPT, payload size, extended RCODE, version 0, flags, options.
            let opt = packet.get(i..i + 11)?;
            if opt[0] != 0 || opt[1..3] != [0, 41] || opt[6] != 0 {
                return None;
            }
            udp_limit = usize::from(u16::from_be_bytes([opt[3], opt[4]])).max(512);
            flags |= F_EDNS;
            if opt[7] & 0x80 != 0 {
                flags |= F_DO;
            }
            let rdlen = usize::from(u16::from_be_bytes([opt[9], opt[10]]));
            i += 11;
            let mut options = packet.get(i..i + rdlen)?;
            while !options.is_empty() {
                let head = options.get(..4)?;
                let code = u16::from_be_bytes([head[0], head[1]]);
                let olen = usize::from(u16::from_be_bytes([head[2], head[3]]));
                // Client subnet: the answer depends on who asks.
                if code == 8 {
                    return None;
                }
                options = options.get(4 + olen..)?;
            }
            i += rdlen;
        }
        if i != packet.len() {
            return None;
        }
        key[0] = flags;
        Some(Self {
            key,
            key_len: k,
            question_len,
            udp_limit,
        })
    }
}

/// The cache's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most entries.
    pub max_entries: usize,
    /// Most bytes (as accounted, [`ENTRY_OVERHEAD`] included).
    pub max_bytes: usize,
    /// Longest positive lifetime.
    pub max_ttl: Duration,
    /// Longest negative lifetime.
    pub max_negative_ttl: Duration,
}

/// Cache counters (read by `/metrics`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Answers served from the cache.
    pub hits: AtomicU64,
    /// Cacheable queries not found (or found expired, or too large for the client).
    pub misses: AtomicU64,
    /// Entries pushed out by the bounds.
    pub evictions: AtomicU64,
    /// Answers stored.
    pub inserts: AtomicU64,
}

struct Entry {
    /// The answer as stored: every TTL set to the lifetime.
    resp: Box<[u8]>,
    /// Where the TTLs are.
    ttl_at: Box<[u16]>,
    stored: Instant,
    lifetime: Duration,
    /// Accounted size.
    bytes: usize,
}

struct Inner {
    lru: lru::LruCache<Box<[u8]>, Entry>,
    bytes: usize,
}

/// The cache (shared by the UDP loops, the upstream reply threads and TCP tasks).
pub struct Cache {
    inner: Mutex<Inner>,
    limits: Limits,
    generation: AtomicU64,
    /// Hits, misses, evictions.
    pub counters: Counters,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// What [`analyze`] found in an answer worth keeping.
struct Analyzed {
    ttl_at: Vec<u16>,
    lifetime: u32,
    /// Where the answer ends once OPT options are cut.
    end: usize,
    /// Where the OPT record's RDLENGTH is, when its options are cut.
    opt_rdlen_at: Option<usize>,
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(i..i + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?))
}

/// Skips a (possibly compressed) name; the index after it.
fn skip_name(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let len = *b.get(i)?;
        match len {
            0 => return Some(i + 1),
            l if l & 0xc0 == 0xc0 => return (i + 2 <= b.len()).then_some(i + 2),
            l if l & 0xc0 == 0 => i += 1 + usize::from(l),
            _ => return None,
        }
    }
}

/// Whether `resp` is worth keeping as the answer to `query` (with question `q`), and
/// where its TTLs are.
fn analyze(q: &QueryInfo, query: &[u8], resp: &[u8], limits: &Limits) -> Option<Analyzed> {
    if resp.len() < HEADER || resp.len() > usize::from(u16::MAX) {
        return None;
    }
    // QR=1, opcode QUERY, TC=0.
    if resp[2] & 0xfa != 0x80 {
        return None;
    }
    let rcode = resp[3] & 0x0f;
    if rcode != 0 && rcode != 3 {
        return None;
    }
    if u16_at(resp, 4)? != 1 {
        return None;
    }
    let qend = HEADER + q.question_len;
    if !resp
        .get(HEADER..qend)?
        .eq_ignore_ascii_case(query.get(HEADER..qend)?)
    {
        return None;
    }
    let an = usize::from(u16_at(resp, 6)?);
    let ns = usize::from(u16_at(resp, 8)?);
    let ar = usize::from(u16_at(resp, 10)?);
    let mut ttl_at = Vec::with_capacity(an + ns + ar);
    let mut min_ttl = u32::MAX;
    let mut soa_min: Option<u32> = None;
    let mut opt: Option<(usize, usize, usize)> = None; // (rdlen at, rdata start, rdata end)
    let mut i = qend;
    for n in 0..an + ns + ar {
        i = skip_name(resp, i)?;
        let rtype = u16_at(resp, i)?;
        let ttl = u32_at(resp, i + 4)?;
        let rdlen = usize::from(u16_at(resp, i + 8)?);
        let rdata = i + 10;
        let end = rdata + rdlen;
        if end > resp.len() {
            return None;
        }
        match rtype {
            41 => {
                if n < an + ns || opt.is_some() {
                    return None;
                }
                opt = Some((i + 8, rdata, end));
            }
            250 => return None, // TSIG: signed for one exchange
            _ => {
                // RFC 2181: a TTL with the top bit set counts as 0.
                let ttl = if ttl & 0x8000_0000 != 0 { 0 } else { ttl };
                min_ttl = min_ttl.min(ttl);
                ttl_at.push(u16::try_from(i + 4).ok()?);
                if rtype == 6 && (an..an + ns).contains(&n) && rdlen >= 22 {
                    let minimum = u32_at(resp, end - 4)?;
                    soa_min = Some(soa_min.map_or(minimum, |m: u32| m.min(minimum)));
                }
            }
        }
        i = end;
    }
    if i != resp.len() {
        return None;
    }
    let positive = rcode == 0 && an > 0;
    let cap = if positive {
        limits.max_ttl
    } else {
        limits.max_negative_ttl
    };
    let cap = u32::try_from(cap.as_secs()).unwrap_or(u32::MAX);
    let lifetime = if positive {
        min_ttl.min(cap)
    } else {
        // RFC 2308 §5: negative answers live min(SOA TTL, SOA MINIMUM); without a SOA
        // they are not cached.
        min_ttl.min(soa_min?).min(cap)
    };
    if lifetime == 0 {
        return None;
    }
    // OPT options (a server cookie, padding) belong to one exchange: cut when OPT is the
    // last record; kept otherwise only when it has none.
    let (end, opt_rdlen_at) = match opt {
        Some((rdlen_at, start, end)) if start != end => {
            if end != resp.len() {
                return None;
            }
            (start, Some(rdlen_at))
        }
        _ => (resp.len(), None),
    };
    Some(Analyzed {
        ttl_at,
        lifetime,
        end,
        opt_rdlen_at,
    })
}

impl Cache {
    /// An empty cache.
    pub fn new(limits: Limits) -> Self {
        Self {
            inner: Mutex::new(Inner {
                lru: lru::LruCache::unbounded(),
                bytes: 0,
            }),
            limits,
            generation: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    /// The bounds.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The current generation (pass it back to [`Cache::insert`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.lock().lru.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held (as accounted).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Drops every entry; answers to queries sent before are not stored afterwards.
    pub fn clear(&self) {
        let mut g = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        g.lru.clear();
        g.bytes = 0;
    }

    /// Writes the answer to `query` into `out` when a live entry holds it and it fits
    /// `limit` bytes. Counts a hit or a miss.
    pub fn lookup(
        &self,
        q: &QueryInfo,
        query: &[u8],
        now: Instant,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        let hit = self.lookup_inner(q, query, now, limit, out);
        let c = if hit {
            &self.counters.hits
        } else {
            &self.counters.misses
        };
        c.fetch_add(1, Ordering::Relaxed);
        hit
    }

    fn lookup_inner(
        &self,
        q: &QueryInfo,
        query: &[u8],
        now: Instant,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        let mut g = self.lock();
        let Some(e) = g.lru.get(q.key()) else {
            return false;
        };
        let age = now.saturating_duration_since(e.stored);
        if age >= e.lifetime {
            if let Some(e) = g.lru.pop(q.key()) {
                g.bytes -= e.bytes;
            }
            return false;
        }
        if e.resp.len() > limit {
            return false;
        }
        let left = u32::try_from((e.lifetime - age).as_secs()).unwrap_or(u32::MAX);
        out.clear();
        out.extend_from_slice(&e.resp);
        for at in e.ttl_at.iter() {
            let at = usize::from(*at);
            out[at..at + 4].copy_from_slice(&left.to_be_bytes());
        }
        drop(g);
        // The client's ID, RD bit and question bytes.
        out[..2].copy_from_slice(&query[..2]);
        out[2] = (out[2] & !0x01) | (query[2] & 0x01);
        let qend = HEADER + q.question_len;
        out[HEADER..qend].copy_from_slice(&query[HEADER..qend]);
        true
    }

    /// Stores `resp`, the upstream's answer to `query`, if it is worth keeping and the
    /// cache is still at `generation`. Whether it was stored.
    pub fn insert(
        &self,
        generation: u64,
        q: &QueryInfo,
        query: &[u8],
        resp: &[u8],
        now: Instant,
    ) -> bool {
        let Some(a) = analyze(q, query, resp, &self.limits) else {
            return false;
        };
        let mut stored = resp[..a.end].to_vec();
        if let Some(at) = a.opt_rdlen_at {
            stored[at..at + 2].copy_from_slice(&[0, 0]);
        }
        for at in &a.ttl_at {
            let at = usize::from(*at);
            stored[at..at + 4].copy_from_slice(&a.lifetime.to_be_bytes());
        }
        let key: Box<[u8]> = q.key().into();
        let bytes = key.len() + stored.len() + 2 * a.ttl_at.len() + ENTRY_OVERHEAD;
        if bytes > self.limits.max_bytes {
            return false;
        }
        let entry = Entry {
            resp: stored.into_boxed_slice(),
            ttl_at: a.ttl_at.into_boxed_slice(),
            stored: now,
            lifetime: Duration::from_secs(u64::from(a.lifetime)),
            bytes,
        };
        let mut g = self.lock();
        if self.generation.load(Ordering::Acquire) != generation {
            return false;
        }
        if let Some((_, old)) = g.lru.push(key, entry) {
            g.bytes -= old.bytes;
        }
        g.bytes += bytes;
        let mut evicted = 0;
        while g.lru.len() > self.limits.max_entries || g.bytes > self.limits.max_bytes {
            match g.lru.pop_lru() {
                Some((_, e)) => {
                    g.bytes -= e.bytes;
                    evicted += 1;
                }
                None => break,
            }
        }
        drop(g);
        self.counters.inserts.fetch_add(1, Ordering::Relaxed);
        if evicted > 0 {
            self.counters
                .evictions
                .fetch_add(evicted, Ordering::Relaxed);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    fn limits() -> Limits {
        Limits {
            max_entries: 1000,
            max_bytes: 1 << 20,
            max_ttl: Duration::from_secs(86_400),
            max_negative_ttl: Duration::from_secs(3600),
        }
    }

    fn query(name: &str, t: RecordType, id: u16) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    /// The upstream's answer: `ip` with `ttl`, or NXDOMAIN with a SOA (TTL, MINIMUM).
    fn answer(q: &[u8], ip: Option<(&str, u32)>, soa: Option<(u32, u32)>) -> Vec<u8> {
        let req = Message::from_vec(q).unwrap();
        let mut m = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.metadata.recursion_available = true;
        m.add_query(req.queries[0].clone());
        let name = req.queries[0].name().clone();
        if let Some((ip, ttl)) = ip {
            m.add_answer(Record::from_rdata(
                name,
                ttl,
                RData::A(A(ip.parse().unwrap())),
            ));
        } else {
            m.metadata.response_code = ResponseCode::NXDomain;
        }
        if let Some((ttl, minimum)) = soa {
            m.add_authority(Record::from_rdata(
                Name::from_ascii("example.").unwrap(),
                ttl,
                RData::SOA(SOA::new(
                    Name::from_ascii("ns.example.").unwrap(),
                    Name::from_ascii("h.example.").unwrap(),
                    1,
                    3600,
                    600,
                    86400,
                    minimum,
                )),
            ));
        }
        if let Some(e) = &req.edns {
            m.set_edns(e.clone());
        }
        m.to_vec().unwrap()
    }

    /// Asks the cache as the server does; the parsed answer on a hit.
    fn ask(c: &Cache, q: &[u8], now: Instant) -> Option<Message> {
        let info = QueryInfo::parse(q).unwrap();
        let mut out = Vec::new();
        c.lookup(&info, q, now, 65535, &mut out)
            .then(|| Message::from_vec(&out).unwrap())
    }

    fn ip_of(m: &Message) -> String {
        match &m.answers[0].data {
            RData::A(a) => a.0.to_string(),
            other => panic!("not A: {other:?}"),
        }
    }

    /// The upstream's record changes while an answer is cached: the old one is served
    /// until its TTL has passed (its TTL counting down), never after; then the new one.
    #[test]
    fn a_changed_record_is_served_new_only_after_its_ttl() {
        let c = Cache::new(limits());
        let t0 = Instant::now();
        let q = query("www.example.", RecordType::A, 1);
        let info = QueryInfo::parse(&q).unwrap();
        assert!(ask(&c, &q, t0).is_none(), "empty cache");
        assert!(c.insert(
            c.generation(),
            &info,
            &q,
            &answer(&q, Some(("192.0.2.1", 30)), None),
            t0
        ));
        // The upstream now says 192.0.2.2. Every second until the TTL: the old answer,
        // with the client's ID and what is left of the TTL.
        for s in 0..30u64 {
            let q2 = query("WWW.Example.", RecordType::A, 1000 + s as u16);
            let m = ask(&c, &q2, t0 + Duration::from_millis(s * 1000 + 999))
                .unwrap_or_else(|| panic!("a miss at {s}.999 s, before the TTL of 30 s"));
            assert_eq!(ip_of(&m), "192.0.2.1");
            assert_eq!(m.metadata.id, 1000 + s as u16);
            assert_eq!(m.answers[0].ttl, 29 - s as u32, "at {s}.999 s");
            assert_eq!(
                m.queries[0].name().to_ascii(),
                "WWW.Example.",
                "the client's own question"
            );
        }
        // At 30 s: gone (a miss), so the query goes upstream and the new answer is kept.
        let t30 = t0 + Duration::from_secs(30);
        assert!(ask(&c, &q, t30).is_none(), "served at its TTL");
        assert!(c.is_empty());
        assert!(c.insert(
            c.generation(),
            &info,
            &q,
            &answer(&q, Some(("192.0.2.2", 30)), None),
            t30
        ));
        let m = ask(&c, &q, t30 + Duration::from_secs(1)).unwrap();
        assert_eq!(ip_of(&m), "192.0.2.2");
        assert_eq!(m.answers[0].ttl, 29);
        let n = &c.counters;
        assert_eq!(n.hits.load(Ordering::Relaxed), 31);
        assert_eq!(n.misses.load(Ordering::Relaxed), 2);
    }

    /// A positive TTL above the cap lives for the cap (and says so).
    #[test]
    fn ttls_are_capped() {
        let c = Cache::new(Limits {
            max_ttl: Duration::from_secs(10),
            ..limits()
        });
        let t0 = Instant::now();
        let q = query("www.example.", RecordType::A, 1);
        let info = QueryInfo::parse(&q).unwrap();
        c.insert(
            c.generation(),
            &info,
            &q,
            &answer(&q, Some(("192.0.2.1", 86_400)), None),
            t0,
        );
        assert_eq!(ask(&c, &q, t0).unwrap().answers[0].ttl, 10);
        assert!(ask(&c, &q, t0 + Duration::from_millis(9999)).is_some());
        assert!(ask(&c, &q, t0 + Duration::from_secs(10)).is_none());
    }

    /// NXDOMAIN lives min(SOA TTL, SOA MINIMUM) (RFC 2308), capped by the negative cap;
    /// without a SOA it is not kept; TTL 0 is not kept.
    #[test]
    fn a_negative_answer_expires_per_its_soa_minimum() {
        let c = Cache::new(limits());
        let t0 = Instant::now();
        let q = query("nope.example.", RecordType::A, 1);
        let info = QueryInfo::parse(&q).unwrap();
        // SOA TTL 3600, MINIMUM 60: 60 s.
        assert!(c.insert(
            c.generation(),
            &info,
            &q,
            &answer(&q, None, Some((3600, 60))),
            t0
        ));
        let m = ask(&c, &q, t0 + Duration::from_millis(59_999)).expect("before the minimum");
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(m.authorities[0].ttl, 0, "59.999 s of 60 s: 0 s left");
        let m = ask(&c, &q, t0 + Duration::from_secs(20)).unwrap();
        assert_eq!(m.authorities[0].ttl, 40);
        assert!(ask(&c, &q, t0 + Duration::from_secs(60)).is_none());
        // SOA TTL 30 below MINIMUM 600: 30 s.
        c.insert(
            c.generation(),
            &info,
            &q,
            &answer(&q, None, Some((30, 600))),
            t0,
        );
        assert!(ask(&c, &q, t0 + Duration::from_millis(29_999)).is_some());
        assert!(ask(&c, &q, t0 + Duration::from_secs(30)).is_none());
        // Capped by max_negative_ttl.
        let small = Cache::new(Limits {
            max_negative_ttl: Duration::from_secs(5),
            ..limits()
        });
        small.insert(0, &info, &q, &answer(&q, None, Some((3600, 3600))), t0);
        assert!(ask(&small, &q, t0 + Duration::from_millis(4999)).is_some());
        assert!(ask(&small, &q, t0 + Duration::from_secs(5)).is_none());
        // No SOA, or TTL 0: not kept.
        assert!(!c.insert(c.generation(), &info, &q, &answer(&q, None, None), t0));
        assert!(!c.insert(
            c.generation(),
            &info,
            &q,
            &answer(&q, Some(("192.0.2.1", 0)), None),
            t0
        ));
        // NODATA (NOERROR, no answers) is negative too.
        let q6 = query("www.example.", RecordType::AAAA, 2);
        let i6 = QueryInfo::parse(&q6).unwrap();
        let mut nodata = answer(&q6, None, Some((100, 100)));
        nodata[3] &= 0xf0;
        assert!(c.insert(c.generation(), &i6, &q6, &nodata, t0));
        assert!(ask(&c, &q6, t0 + Duration::from_secs(99)).is_some());
        assert!(ask(&c, &q6, t0 + Duration::from_secs(100)).is_none());
    }

    /// DO, CD and EDNS are part of the key; the question must match; a truncated answer,
    /// SERVFAIL or a client-subnet query is not kept; an answer above the client's size
    /// is not served.
    #[test]
    fn key_bits_and_what_is_not_kept() {
        let c = Cache::new(limits());
        let t0 = Instant::now();
        let plain = query("www.example.", RecordType::A, 1);
        let info = QueryInfo::parse(&plain).unwrap();
        c.insert(
            0,
            &info,
            &plain,
            &answer(&plain, Some(("192.0.2.1", 60)), None),
            t0,
        );
        let with = |f: &dyn Fn(&mut Message)| {
            let mut m = Message::from_vec(&plain).unwrap();
            f(&mut m);
            m.to_vec().unwrap()
        };
        let edns = with(&|m| {
            m.set_edns(Edns::new());
        });
        let dnssec = with(&|m| {
            let mut e = Edns::new();
            e.set_dnssec_ok(true);
            m.set_edns(e);
        });
        let cd = with(&|m| m.metadata.checking_disabled = true);
        let ad = with(&|m| m.metadata.authentic_data = true);
        let other_type = query("www.example.", RecordType::AAAA, 1);
        for q in [&edns, &dnssec, &cd, &ad, &other_type] {
            assert!(ask(&c, q, t0).is_none());
        }
        assert!(ask(&c, &plain, t0).is_some());
        // The answer to another question is not kept for this one.
        let other = query("other.example.", RecordType::A, 1);
        assert!(!c.insert(
            0,
            &info,
            &plain,
            &answer(&other, Some(("192.0.2.9", 60)), None),
            t0
        ));
        // TC set, SERVFAIL: not kept.
        let mut tc = answer(&edns, Some(("192.0.2.1", 60)), None);
        tc[2] |= 0x02;
        let ie = QueryInfo::parse(&edns).unwrap();
        assert!(!c.insert(0, &ie, &edns, &tc, t0));
        let mut sf = answer(&edns, Some(("192.0.2.1", 60)), None);
        sf[3] = (sf[3] & 0xf0) | 2;
        assert!(!c.insert(0, &ie, &edns, &sf, t0));
        // Client subnet (option 8): not even a key.
        let mut ecs = edns.clone();
        let n = ecs.len();
        ecs[n - 2..].copy_from_slice(&[0, 8]);
        ecs.extend_from_slice(&[0, 8, 0, 4, 0, 1, 24, 0]);
        assert!(QueryInfo::parse(&ecs).is_none());
        // Too large for the client: a miss.
        let info = QueryInfo::parse(&plain).unwrap();
        let mut out = Vec::new();
        assert!(!c.lookup(&info, &plain, t0, 20, &mut out));
        // A later generation refuses what was asked before the clear.
        let g = c.generation();
        c.clear();
        assert!(c.is_empty() && c.bytes() == 0);
        assert!(!c.insert(
            g,
            &info,
            &plain,
            &answer(&plain, Some(("192.0.2.1", 60)), None),
            t0
        ));
        assert!(c.insert(
            c.generation(),
            &info,
            &plain,
            &answer(&plain, Some(("192.0.2.1", 60)), None),
            t0
        ));
    }

    /// An EDNS answer's options (a server cookie) are cut; the OPT record stays.
    #[test]
    fn opt_options_are_not_kept() {
        let c = Cache::new(limits());
        let t0 = Instant::now();
        let mut q = Message::from_vec(&query("www.example.", RecordType::A, 1)).unwrap();
        q.set_edns(Edns::new());
        let q = q.to_vec().unwrap();
        let info = QueryInfo::parse(&q).unwrap();
        let mut resp = answer(&q, Some(("192.0.2.1", 60)), None);
        // OPT is last: give it a COOKIE option (10), 8 + 8 bytes.
        let n = resp.len();
        resp[n - 2..].copy_from_slice(&[0, 20]);
        resp.extend_from_slice(&[0, 10, 0, 16]);
        resp.extend_from_slice(&[7u8; 16]);
        Message::from_vec(&resp).expect("a valid answer with a cookie");
        assert!(c.insert(0, &info, &q, &resp, t0));
        let m = ask(&c, &q, t0).unwrap();
        let e = m.edns.clone().expect("OPT kept");
        assert!(e.options().as_ref().is_empty(), "{e:?}");
        assert_eq!(ip_of(&m), "192.0.2.1");
    }

    /// A query for `name` A, built by hand (fast enough for a million).
    fn raw_query(name: &str) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.').filter(|l| !l.is_empty()) {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    }

    /// Its answer: one A record (a pointer to the question's name), TTL 300.
    fn raw_answer(q: &[u8]) -> Vec<u8> {
        let mut r = q.to_vec();
        r[2] |= 0x80;
        r[3] = 0x80;
        r[7] = 1;
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 192, 0, 2, 1]);
        r
    }

    /// One million distinct names through a cache of 1 MiB: the accounted bytes and the
    /// entries never exceed the bounds, and what left was counted as evicted.
    #[test]
    fn memory_stays_within_its_bound_under_a_million_names() {
        let lim = Limits {
            max_entries: 100_000,
            max_bytes: 1 << 20,
            ..limits()
        };
        let c = Cache::new(lim);
        let t0 = Instant::now();
        let mut worst = 0;
        for i in 0..1_000_000u32 {
            let q = raw_query(&format!("host{i}.example."));
            let info = QueryInfo::parse(&q).unwrap();
            assert!(c.insert(0, &info, &q, &raw_answer(&q), t0));
            let b = c.bytes();
            worst = worst.max(b);
            assert!(b <= lim.max_bytes, "{b} bytes after {i} names");
            assert!(c.len() <= lim.max_entries);
        }
        assert!(
            worst > lim.max_bytes - 200,
            "the bound was reached: {worst}"
        );
        let held = c.len() as u64;
        assert!(held > 1000, "{held}");
        assert_eq!(
            c.counters.evictions.load(Ordering::Relaxed),
            1_000_000 - held
        );
        // Each entry is accounted with at least its key and answer.
        let q = raw_query("host999999.example.");
        let min_entry = QueryInfo::parse(&q).unwrap().key().len() + raw_answer(&q).len();
        assert!(c.bytes() >= held as usize * min_entry);
        // The most recent names are the ones kept.
        assert!(ask(&c, &q, t0).is_some());
        assert!(ask(&c, &raw_query("host0.example."), t0).is_none());
        // The entry bound alone.
        let c = Cache::new(Limits {
            max_entries: 10,
            ..lim
        });
        for i in 0..100u32 {
            let q = raw_query(&format!("host{i}.example."));
            let info = QueryInfo::parse(&q).unwrap();
            c.insert(0, &info, &q, &raw_answer(&q), t0);
        }
        assert_eq!(c.len(), 10);
        assert_eq!(c.counters.evictions.load(Ordering::Relaxed), 90);
    }

    /// Damaged queries and answers (bytes flipped, cut short) are refused or kept, never
    /// a panic, and what is served carries the client's ID.
    #[test]
    fn damaged_messages_do_not_panic() {
        let c = Cache::new(limits());
        let t0 = Instant::now();
        let mut q = Message::from_vec(&query("www.example.", RecordType::A, 1)).unwrap();
        q.set_edns(Edns::new());
        let q = q.to_vec().unwrap();
        let good = answer(&q, Some(("192.0.2.1", 60)), Some((60, 60)));
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut out = Vec::new();
        for _ in 0..50_000 {
            let (mut mq, mut mr) = (q.clone(), good.clone());
            for _ in 0..next() % 4 {
                let m = if next() % 2 == 0 { &mut mq } else { &mut mr };
                let i = next() as usize % m.len();
                m[i] = next() as u8;
            }
            if next() % 8 == 0 {
                let n = next() as usize % mr.len();
                mr.truncate(n);
            }
            let Some(info) = QueryInfo::parse(&mq) else {
                continue;
            };
            c.insert(c.generation(), &info, &mq, &mr, t0);
            if c.lookup(&info, &mq, t0, 65535, &mut out) {
                assert_eq!(out[..2], mq[..2]);
            }
        }
    }
}
