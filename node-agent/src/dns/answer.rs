//! The query path: one DNS message in, a decision out. Pure (no sockets), so it is
//! unit-tested and fuzzed (`fuzz/fuzz_targets/dns_query.rs`).
//!
//! Mesh names are answered from the [`Index`]; everything else is forwarded unchanged
//! (the raw bytes go to the upstream, so flags, EDNS options and DNSSEC bits pass
//! through). Malformed input gets FORMERR when its header is readable and is dropped
//! otherwise; responses are never answered (no reflection loops).

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::index::{Index, Lookup, Target};

/// Largest query the server accepts; a real query is a few hundred bytes at most.
pub const MAX_QUERY: usize = 4096;
/// The UDP payload size the agent advertises in EDNS answers.
pub const EDNS_PAYLOAD: u16 = 1232;
/// DNS header length.
const HEADER: usize = 12;

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Send these bytes back.
    Answer(Vec<u8>),
    /// Not a mesh name: forward the query unchanged to the upstream resolvers.
    Forward,
    /// Say nothing (not a query, or not even a header).
    Drop,
}

/// Transport of the query (UDP answers are limited in size; TCP's are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Datagram: answers above the client's payload size are truncated (TC set).
    Udp,
    /// Stream.
    Tcp,
}

/// A bare error response built from the raw header (for messages hickory cannot parse).
pub fn raw_error(packet: &[u8], rcode: u8) -> Outcome {
    if packet.len() < HEADER || packet[2] & 0x80 != 0 {
        return Outcome::Drop;
    }
    let mut out = vec![0u8; HEADER];
    out[0] = packet[0];
    out[1] = packet[1];
    // QR=1, opcode copied, RD copied.
    out[2] = 0x80 | (packet[2] & 0x79);
    // RA=1, RCODE.
    out[3] = 0x80 | (rcode & 0x0f);
    Outcome::Answer(out)
}

/// SERVFAIL for a query (forwarding failed).
pub fn servfail(packet: &[u8]) -> Outcome {
    raw_error(packet, 2)
}

fn soa(zone: &str, ttl: u32) -> Option<Record> {
    let zone = Name::from_ascii(format!("{zone}.")).ok()?;
    let mname = Name::from_ascii("causeway-agent.").ok()?;
    let rname = Name::from_ascii("hostmaster.causeway-agent.").ok()?;
    Some(Record::from_rdata(
        zone,
        ttl,
        RData::SOA(SOA::new(mname, rname, 1, 3600, 600, 86400, ttl)),
    ))
}

/// The zone a name belongs to for the SOA of a negative answer: the name's parent labels.
fn negative_zone(name: &str) -> &str {
    name.split_once('.').map(|(_, z)| z).unwrap_or(name)
}

fn srv_records(
    target: &Target,
    qname: &Name,
    owner: &Name,
    only: Option<&str>,
    ttl: u32,
) -> Vec<Record> {
    target
        .ports
        .iter()
        .filter(|(n, _)| only.is_none_or(|o| o == n.as_str()))
        .map(|(_, p)| {
            Record::from_rdata(
                qname.clone(),
                ttl,
                RData::SRV(SRV::new(0, 1, *p, owner.clone())),
            )
        })
        .collect()
}

/// What the fast path found in a plain query.
struct Plain<'a> {
    /// The question section (name, type, class), as sent.
    question: &'a [u8],
    /// The lower-cased name without the trailing dot.
    name: [u8; 255],
    name_len: usize,
    qtype: u16,
    qclass: u16,
    /// The query had an EDNS OPT record (version 0).
    edns: bool,
}

/// Per byte of a label: its lower-case form when the fast path takes it (letters,
/// digits, '-' and '_'), else 0.
const LABEL_BYTE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' {
            t[b] = c.to_ascii_lowercase();
        }
        b += 1;
    }
    t
};

/// Reads the common case without allocating: one question of plain labels (no
/// compression), nothing else but an optional EDNS version-0 OPT record with no
/// options, and nothing after it. Anything else → None (the hickory path decides).
fn plain(packet: &[u8]) -> Option<Plain<'_>> {
    if packet.len() < HEADER + 5 || packet.len() > 512 {
        return None;
    }
    // QR=0, opcode QUERY, one question, no answers/authorities, at most one additional.
    if packet[2] & 0xf8 != 0 || packet[4..10] != [0, 1, 0, 0, 0, 0] || packet[10] != 0 {
        return None;
    }
    let arcount = packet[11];
    if arcount > 1 {
        return None;
    }
    let mut name = [0u8; 255];
    let mut name_len = 0usize;
    let mut i = HEADER;
    loop {
        let len = usize::from(*packet.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // a compression pointer or a reserved label type
        }
        let label = packet.get(i..i + len)?;
        if name_len + len + 1 > name.len() {
            return None;
        }
        if name_len > 0 {
            name[name_len] = b'.';
            name_len += 1;
        }
        for (d, b) in name[name_len..name_len + len].iter_mut().zip(label) {
            *d = LABEL_BYTE[usize::from(*b)];
            if *d == 0 {
                return None;
            }
        }
        name_len += len;
        i += len;
    }
    let fixed = packet.get(i..i + 4)?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
    let question = &packet[HEADER..i + 4];
    let rest = &packet[i + 4..];
    let edns = match (arcount, rest) {
        (0, []) => false,
        // Root name, type OPT, any payload size, extended RCODE 0, version 0, any flags,
        // no options.
        (1, [0, 0, 41, _, _, 0, 0, _, _, 0, 0]) => true,
        _ => return None,
    };
    if name_len == 0 {
        return None;
    }
    Some(Plain {
        question,
        name,
        name_len,
        qtype,
        qclass,
        edns,
    })
}

/// What [`handle_into`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The answer is in the output buffer: send it back.
    Answer,
    /// Not a mesh name: forward the query unchanged to the upstream resolvers.
    Forward,
    /// Say nothing (not a query, or not even a header).
    Drop,
}

/// The fast path: an A query for a mesh name with a VIP is answered by copying the
/// header and the question as asked (the client's ID and letter case) and appending
/// the name's precomputed answer record (a compression pointer to the question's name,
/// the TTL and the VIP, built with the index); a name outside the mesh (not SRV) is
/// forwarded. Everything else → None.
fn fast_into(index: &Index, packet: &[u8], out: &mut Vec<u8>) -> Option<Reply> {
    let p = plain(packet)?;
    let name = &p.name[..p.name_len];
    if let Some(e) = index.entry(name) {
        if p.qtype != 1 || p.qclass != 1 {
            return None;
        }
        let rr = e.a_record()?;
        out.clear();
        out.extend_from_slice(&[
            packet[0],
            packet[1],
            // QR, AA, RD as asked; RA; NOERROR.
            0x84 | (packet[2] & 0x01),
            0x80,
            0,
            1,
            0,
            1,
            0,
            0,
            0,
            u8::from(p.edns),
        ]);
        out.extend_from_slice(p.question);
        out.extend_from_slice(rr);
        if p.edns {
            let [hi, lo] = EDNS_PAYLOAD.to_be_bytes();
            out.extend_from_slice(&[0, 0, 41, hi, lo, 0, 0, 0, 0, 0, 0]);
        }
        return Some(Reply::Answer);
    }
    if p.qtype != 33 && index.zone_of(name).is_none() {
        return Some(Reply::Forward);
    }
    None
}

/// The fast path as an [`Outcome`] (tests compare it with the general path).
#[cfg(test)]
fn fast(index: &Index, packet: &[u8]) -> Option<Outcome> {
    let mut out = Vec::new();
    fast_into(index, packet, &mut out).map(|r| match r {
        Reply::Answer => Outcome::Answer(out),
        Reply::Forward => Outcome::Forward,
        Reply::Drop => Outcome::Drop,
    })
}

/// Handles one query, writing an answer into `out` (cleared first; its allocation is
/// kept from query to query, so a mesh answer on the fast path allocates nothing).
pub fn handle_into(index: &Index, packet: &[u8], transport: Transport, out: &mut Vec<u8>) -> Reply {
    if let Some(r) = fast_into(index, packet, out) {
        return r;
    }
    match handle_parsed(index, packet, transport) {
        Outcome::Answer(b) => {
            out.clear();
            out.extend_from_slice(&b);
            Reply::Answer
        }
        Outcome::Forward => Reply::Forward,
        Outcome::Drop => Reply::Drop,
    }
}

/// Handles one query.
pub fn handle(index: &Index, packet: &[u8], transport: Transport) -> Outcome {
    let mut out = Vec::new();
    match handle_into(index, packet, transport, &mut out) {
        Reply::Answer => Outcome::Answer(out),
        Reply::Forward => Outcome::Forward,
        Reply::Drop => Outcome::Drop,
    }
}

/// The general path: hickory parses and builds (also the reference the fast path is
/// tested against).
pub fn handle_parsed(index: &Index, packet: &[u8], transport: Transport) -> Outcome {
    if packet.len() < HEADER || packet[2] & 0x80 != 0 {
        return Outcome::Drop;
    }
    if packet.len() > MAX_QUERY {
        return raw_error(packet, 1);
    }
    let req = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => return raw_error(packet, 1),
    };
    if req.metadata.message_type != MessageType::Query {
        return Outcome::Drop;
    }
    if req.metadata.op_code != OpCode::Query {
        return raw_error(packet, 4); // NOTIMP
    }
    if req.queries.len() != 1 || !req.answers.is_empty() || !req.authorities.is_empty() {
        return raw_error(packet, 1);
    }
    let q = &req.queries[0];
    let ascii = q.name().to_ascii();
    let Some(name) = super::index::normalize(&ascii) else {
        return Outcome::Forward;
    };
    let lookup = index.lookup(&name);
    // SRV in the `_port._proto.<name>` form (Kubernetes style): strip the two labels.
    let mut srv_port: Option<&str> = None;
    let lookup = match lookup {
        Lookup::Outside | Lookup::NxDomain(_) if q.query_type() == RecordType::SRV => {
            let mut parts = name.splitn(3, '.');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(p), Some(proto), Some(rest))
                    if p.starts_with('_') && (proto == "_tcp" || proto == "_udp") =>
                {
                    match index.lookup(rest) {
                        Lookup::Found(t) => {
                            srv_port = Some(&p[1..]);
                            Lookup::Found(t)
                        }
                        _ => lookup,
                    }
                }
                _ => lookup,
            }
        }
        other => other,
    };
    if matches!(lookup, Lookup::Outside) {
        return Outcome::Forward;
    }
    if q.query_class() != DNSClass::IN {
        return raw_error(packet, 5); // REFUSED: the mesh has IN records only
    }
    let ttl = index.ttl;
    let mut resp = Message::response(req.metadata.id, OpCode::Query);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.authoritative = true;
    resp.add_query(q.clone());
    if let Some(e) = &req.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        if e.version() > 0 {
            resp.metadata.response_code = ResponseCode::BADVERS;
        }
        resp.set_edns(edns);
    }
    let qname = q.name().clone();
    match lookup {
        Lookup::Found(t) => {
            let owner = match srv_port {
                Some(_) => {
                    // The SRV target is the service name itself (strip `_port._proto.`).
                    let base: Vec<&str> = name.splitn(3, '.').collect();
                    Name::from_ascii(format!("{}.", base.get(2).copied().unwrap_or(&name)))
                        .unwrap_or_else(|_| qname.clone())
                }
                None => qname.clone(),
            };
            let records: Vec<Record> = match (q.query_type(), t.vip) {
                (RecordType::A | RecordType::ANY, Some(vip)) if srv_port.is_none() => {
                    vec![Record::from_rdata(qname.clone(), ttl, RData::A(A(vip)))]
                }
                (RecordType::SRV, _) => srv_records(t, &qname, &owner, srv_port, ttl),
                _ => Vec::new(), // NODATA: AAAA (no v6 VIPs), MX, TXT, ...
            };
            if q.query_type() == RecordType::SRV
                && let Some(vip) = t.vip
                && !records.is_empty()
            {
                resp.add_additional(Record::from_rdata(owner, ttl, RData::A(A(vip))));
            }
            if records.is_empty()
                && let Some(s) = soa(negative_zone(&name), ttl)
            {
                resp.add_authority(s);
            }
            resp.add_answers(records);
        }
        Lookup::NxDomain(zone) => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            if let Some(s) = soa(zone, ttl) {
                resp.add_authority(s);
            }
        }
        Lookup::Outside => return Outcome::Forward,
    }
    let limit = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => usize::from(req.edns.as_ref().map_or(512, |e| e.max_payload()).max(512)),
    };
    match resp.to_vec() {
        Ok(bytes) if bytes.len() <= limit => Outcome::Answer(bytes),
        Ok(_) => match resp.truncate().to_vec() {
            Ok(b) => Outcome::Answer(b),
            Err(_) => servfail(packet),
        },
        Err(_) => servfail(packet),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::index::{Zones, tests::mesh};
    use hickory_proto::op::Query;

    fn index() -> Index {
        Index::build(&mesh(), &Zones::default())
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn answer(o: Outcome) -> Message {
        match o {
            Outcome::Answer(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    #[test]
    fn a_srv_nodata_nxdomain_forward() {
        let idx = index();
        let m = answer(handle(
            &idx,
            &query("Web.Service.Consul.", RecordType::A),
            Transport::Udp,
        ));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative && m.metadata.recursion_desired);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(
            m.answers[0].data,
            RData::A(A("240.240.0.10".parse().unwrap()))
        );
        assert_eq!(m.answers[0].ttl, 5);

        let m = answer(handle(
            &idx,
            &query("web.default.causeway.", RecordType::AAAA),
            Transport::Udp,
        ));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty(), "no v6 VIP: NODATA");
        assert_eq!(m.authorities.len(), 1);

        let m = answer(handle(
            &idx,
            &query("web.service.consul.", RecordType::SRV),
            Transport::Udp,
        ));
        let mut ports: Vec<u16> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => s.port,
                _ => 0,
            })
            .collect();
        ports.sort();
        assert_eq!(ports, vec![8080, 9090]);
        assert_eq!(m.additionals.len(), 1);

        let m = answer(handle(
            &idx,
            &query("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV),
            Transport::Udp,
        ));
        assert_eq!(m.answers.len(), 1);

        let m = answer(handle(
            &idx,
            &query("nope.service.consul.", RecordType::A),
            Transport::Udp,
        ));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

        let m = answer(handle(
            &idx,
            &query("web.service.consul.", RecordType::MX),
            Transport::Udp,
        ));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());

        assert_eq!(
            handle(&idx, &query("example.com.", RecordType::A), Transport::Udp),
            Outcome::Forward
        );
    }

    #[test]
    fn fuzz_seeds_give_the_outcomes_they_are_named_for() {
        let idx = index();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/dns_query");
        let read = |n: &str| std::fs::read(dir.join(n)).unwrap();
        let rcode = |o: Outcome| answer(o).metadata.response_code;
        assert_eq!(
            rcode(handle(&idx, &read("a-consul.bin"), Transport::Udp)),
            ResponseCode::NoError
        );
        assert_eq!(
            answer(handle(&idx, &read("aaaa-edns-k8s.bin"), Transport::Udp))
                .answers
                .len(),
            0
        );
        assert_eq!(
            answer(handle(&idx, &read("srv-k8s-port.bin"), Transport::Tcp))
                .answers
                .len(),
            1
        );
        assert_eq!(
            rcode(handle(&idx, &read("nxdomain-causeway.bin"), Transport::Udp)),
            ResponseCode::NXDomain
        );
        assert_eq!(
            handle(&idx, &read("forward-outside.bin"), Transport::Udp),
            Outcome::Forward
        );
        assert_eq!(
            rcode(handle(&idx, &read("formerr-garbage.bin"), Transport::Udp)),
            ResponseCode::FormErr
        );
    }

    #[test]
    fn fast_path_answers_as_the_general_path() {
        let idx = index();
        let mut with_edns = Message::query();
        with_edns.metadata.recursion_desired = true;
        with_edns.add_query(Query::query(
            Name::from_ascii("WEB.service.consul.").unwrap(),
            RecordType::A,
        ));
        let mut e = Edns::new();
        e.set_max_payload(4096);
        with_edns.set_edns(e);
        let queries = [
            query("web.service.consul.", RecordType::A),
            query("Web.Default.Causeway.", RecordType::A),
            with_edns.to_vec().unwrap(),
            query("example.com.", RecordType::A),
            query("example.com.", RecordType::AAAA),
        ];
        for q in &queries {
            let f = fast(&idx, q).expect("the fast path takes it");
            let g = handle_parsed(&idx, q, Transport::Udp);
            match (f, g) {
                (Outcome::Answer(a), Outcome::Answer(b)) => {
                    let (a, b) = (
                        Message::from_vec(&a).unwrap(),
                        Message::from_vec(&b).unwrap(),
                    );
                    assert_eq!(a.metadata, b.metadata);
                    assert_eq!(a.queries, b.queries);
                    assert_eq!(a.answers, b.answers);
                    assert_eq!(a.edns.is_some(), b.edns.is_some());
                    assert!(a.authorities.is_empty() && b.authorities.is_empty());
                }
                (a, b) => assert_eq!(a, b),
            }
        }
        // Left to the general path: NXDOMAIN, AAAA, SRV, compression, a second record.
        for q in [
            query("nope.service.consul.", RecordType::A),
            query("web.service.consul.", RecordType::AAAA),
            query("web.service.consul.", RecordType::SRV),
            query("_http._tcp.example.com.", RecordType::SRV),
        ] {
            assert!(fast(&idx, &q).is_none());
        }
    }

    /// The fast path's answer as the builder before issue 27's rework made it (copy the
    /// header fields and the question, append the record field by field): the reference
    /// the precomputed record must reproduce byte for byte.
    fn old_fast_answer(index: &Index, packet: &[u8]) -> Option<Vec<u8>> {
        let p = plain(packet)?;
        let name = std::str::from_utf8(&p.name[..p.name_len]).ok()?;
        match index.lookup(name) {
            Lookup::Found(t) if p.qtype == 1 && p.qclass == 1 => {
                let vip = t.vip?;
                let mut out = Vec::new();
                out.extend_from_slice(&packet[..2]);
                out.push(0x84 | (packet[2] & 0x01));
                out.push(0x80);
                out.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, u8::from(p.edns)]);
                out.extend_from_slice(p.question);
                out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
                out.extend_from_slice(&index.ttl.to_be_bytes());
                out.extend_from_slice(&[0, 4]);
                out.extend_from_slice(&vip.octets());
                if p.edns {
                    out.push(0);
                    out.extend_from_slice(&[0, 41]);
                    out.extend_from_slice(&EDNS_PAYLOAD.to_be_bytes());
                    out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
                }
                Some(out)
            }
            _ => None,
        }
    }

    fn with_edns(name: &str, t: RecordType, payload: u16, dnssec_ok: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0xbeef;
        m.metadata.recursion_desired = false;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        let mut e = Edns::new();
        e.set_max_payload(payload);
        e.set_dnssec_ok(dnssec_ok);
        m.set_edns(e);
        m.to_vec().unwrap()
    }

    /// `handle_into` (the serving thread's call, with the index's precomputed A record)
    /// writes exactly the bytes the earlier builder wrote for A queries — the client's
    /// ID, RD bit and letter case, with and without EDNS, any TTL — and exactly the
    /// general path's bytes for everything the fast path leaves to it (AAAA, SRV,
    /// NXDOMAIN, NODATA, other classes), whatever the output buffer held before.
    #[test]
    fn handle_into_writes_the_bytes_of_the_earlier_builders() {
        for ttl in [5, 0, 86_400, 0x7fff_ffff] {
            let idx = Index::build(
                &mesh(),
                &Zones {
                    ttl,
                    ..Zones::default()
                },
            );
            let mut rd_off = query("web.service.consul.", RecordType::A);
            rd_off[2] &= !0x01;
            let fast_ones = [
                query("web.service.consul.", RecordType::A),
                query("WeB.SeRvIcE.CoNsUl.", RecordType::A),
                query("web.default.svc.cluster.local.", RecordType::A),
                query("V1.Web.Service.DC1.Consul.", RecordType::A),
                query("payments.example.com.", RecordType::A),
                rd_off,
                with_edns("Web.Default.Causeway.", RecordType::A, 4096, false),
                with_edns("web.default.causeway.", RecordType::A, 512, true),
            ];
            for q in &fast_ones {
                let want = old_fast_answer(&idx, q).expect("an A answer of the fast path");
                let mut out = b"left over from the last query".to_vec();
                assert_eq!(
                    handle_into(&idx, q, Transport::Udp, &mut out),
                    Reply::Answer
                );
                assert_eq!(out, want, "ttl {ttl}, query {q:02x?}");
                assert_eq!(handle(&idx, q, Transport::Udp), Outcome::Answer(want));
                // What the old fast path answered is what hickory reads from it.
                let m = answer(Outcome::Answer(out.clone()));
                assert_eq!(m.metadata.id, u16::from_be_bytes([q[0], q[1]]));
                assert_eq!(m.answers.len(), 1);
                assert_eq!(m.answers[0].ttl, ttl);
                // The question as asked: the client's letter case.
                let qlen = q.len() - 12 - if m.edns.is_some() { 11 } else { 0 };
                assert_eq!(&out[12..12 + qlen], &q[12..12 + qlen]);
            }
            let general = [
                query("web.service.consul.", RecordType::AAAA),
                query("Web.Service.Consul.", RecordType::SRV),
                query("_http._tcp.web.default.svc.cluster.local.", RecordType::SRV),
                query("nope.service.consul.", RecordType::A),
                query("NoPe.Default.Causeway.", RecordType::AAAA),
                query("web.service.consul.", RecordType::MX),
                with_edns("web.service.consul.", RecordType::AAAA, 1232, true),
                with_edns("nope.svc.cluster.local.", RecordType::A, 4096, false),
            ];
            for q in &general {
                assert_eq!(old_fast_answer(&idx, q), None);
                let Outcome::Answer(want) = handle_parsed(&idx, q, Transport::Udp) else {
                    panic!("the general path answers {q:02x?}");
                };
                let mut out = vec![0xff; 700];
                assert_eq!(
                    handle_into(&idx, q, Transport::Udp, &mut out),
                    Reply::Answer
                );
                assert_eq!(out, want, "ttl {ttl}, query {q:02x?}");
            }
            // Class CH for a mesh name: REFUSED from the general path.
            let mut ch = query("web.service.consul.", RecordType::A);
            let n = ch.len();
            ch[n - 1] = 3;
            let mut out = Vec::new();
            assert_eq!(
                handle_into(&idx, &ch, Transport::Udp, &mut out),
                Reply::Answer
            );
            assert_eq!(
                answer(Outcome::Answer(out)).metadata.response_code,
                ResponseCode::Refused
            );
            // Forwarded and dropped as before, the buffer not used.
            let mut out = Vec::new();
            assert_eq!(
                handle_into(
                    &idx,
                    &query("example.com.", RecordType::A),
                    Transport::Udp,
                    &mut out
                ),
                Reply::Forward
            );
            assert_eq!(
                handle_into(
                    &idx,
                    &query("_x._tcp.example.com.", RecordType::SRV),
                    Transport::Udp,
                    &mut out
                ),
                Reply::Forward
            );
            let mut resp = query("web.service.consul.", RecordType::A);
            resp[2] |= 0x80;
            assert_eq!(
                handle_into(&idx, &resp, Transport::Udp, &mut out),
                Reply::Drop
            );
            assert_eq!(
                handle_into(&idx, &[1, 2], Transport::Udp, &mut out),
                Reply::Drop
            );
        }
    }

    /// The fast path's name check accepts exactly letters, digits, '-' and '_' (lower
    /// cased); any other byte leaves the query to the general path.
    #[test]
    fn label_bytes() {
        for b in 0..=255u8 {
            let ok = b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
            let want = if ok { b.to_ascii_lowercase() } else { 0 };
            assert_eq!(LABEL_BYTE[usize::from(b)], want, "byte {b:#04x}");
        }
        let idx = index();
        // "web\x00..." never matches; a name with a space goes to hickory (forwarded).
        let mut q = query("web.service.consul.", RecordType::A);
        q[13] = b' ';
        assert!(fast(&idx, &q).is_none());
        assert_eq!(handle(&idx, &q, Transport::Udp), Outcome::Forward);
    }

    #[test]
    fn malformed_input() {
        let idx = index();
        assert_eq!(handle(&idx, &[], Transport::Udp), Outcome::Drop);
        assert_eq!(handle(&idx, &[1, 2, 3], Transport::Udp), Outcome::Drop);
        // A header claiming one question, then garbage: FORMERR with the same id.
        let bad = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
        let m = answer(handle(&idx, &bad, Transport::Udp));
        assert_eq!(m.metadata.id, 0xabcd);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // A response is never answered.
        let mut resp = query("web.service.consul.", RecordType::A);
        resp[2] |= 0x80;
        assert_eq!(handle(&idx, &resp, Transport::Udp), Outcome::Drop);
        // Oversized.
        let mut big = query("web.service.consul.", RecordType::A);
        big.resize(MAX_QUERY + 1, 0);
        let m = answer(handle(&idx, &big, Transport::Udp));
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // Two questions.
        let mut two = Message::query();
        two.add_query(Query::query(
            Name::from_ascii("a.b.").unwrap(),
            RecordType::A,
        ));
        two.add_query(Query::query(
            Name::from_ascii("c.d.").unwrap(),
            RecordType::A,
        ));
        let m = answer(handle(&idx, &two.to_vec().unwrap(), Transport::Udp));
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // Another opcode.
        let mut notify = Message::new(7, MessageType::Query, OpCode::Notify);
        notify.add_query(Query::query(
            Name::from_ascii("a.b.").unwrap(),
            RecordType::SOA,
        ));
        let m = answer(handle(&idx, &notify.to_vec().unwrap(), Transport::Udp));
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    }
}
