//! Trace context propagation (issue 20): W3C Trace Context (`traceparent`, `tracestate`)
//! and B3 (the single `b3` header and the multi-header `x-b3-*` form).
//!
//! Each agent that proxies an HTTP request makes one span for it. [`on_request`] reads the
//! request's context (`traceparent` first, then `b3`, then `x-b3-*`; a malformed header is
//! ignored as if absent), makes this agent's span a child of it, and rewrites the headers
//! so that the next hop sees this span as its parent: `traceparent` is always set, the B3
//! headers are rewritten when the request carried them, `tracestate` is kept as it came.
//! A request without a (valid) context gets a new trace at the source agent, sampled with
//! the configured probability; the destination agent only continues traces, so its span is
//! the child of the source agent's span.

use std::cell::Cell;

use http::{HeaderMap, HeaderName, HeaderValue};

/// A trace id (16 bytes, never all zero).
pub type TraceId = [u8; 16];
/// A span id (8 bytes, never all zero).
pub type SpanId = [u8; 8];

/// A propagated context: the trace and the span of the previous hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    /// The trace.
    pub trace_id: TraceId,
    /// The parent span (the caller's).
    pub span_id: SpanId,
    /// Whether the trace is sampled (recorded).
    pub sampled: bool,
}

/// This agent's span of one request, as recorded in
/// [`crate::dataplane::http::RequestRecord::trace`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanRecord {
    /// The trace.
    pub trace_id: TraceId,
    /// This agent's span.
    pub span_id: SpanId,
    /// The span of the previous hop; `None` for the root span of a trace started here.
    pub parent_span_id: Option<SpanId>,
    /// Whether it is exported.
    pub sampled: bool,
    /// The request's `tracestate`, as it came.
    pub trace_state: Option<String>,
}

impl SpanRecord {
    /// The trace id in lower-case hex (32 digits).
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

/// How an agent treats requests' trace context.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TraceSettings {
    /// Percent (0–100) of the traces started at this agent that are sampled; `None`: the
    /// agent does not start traces (it still continues and rewrites incoming contexts).
    pub start_sampling: Option<f64>,
}

/// Hex digits, lower case.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

/// Appends `bytes` in lower-case hex to `s` (on the request path: no formatter).
fn push_hex(s: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

// The trace headers, parsed once (a lookup by `&str` parses the name every time).
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
const X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A B3 trace id: 16 or 32 hex digits (a 64-bit id is left-padded with zeros).
fn b3_trace_id(s: &str) -> Option<TraceId> {
    let s = s.to_ascii_lowercase();
    let id = match s.len() {
        16 => {
            let short: [u8; 8] = unhex(&s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&short);
            id
        }
        32 => unhex(&s)?,
        _ => return None,
    };
    (id != [0; 16]).then_some(id)
}

fn parse_span_id(s: &str) -> Option<SpanId> {
    let id: SpanId = unhex(&s.to_ascii_lowercase())?;
    (id != [0; 8]).then_some(id)
}

/// Parses a W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`). Version `ff`, all-zero
/// ids, upper-case hex and wrong lengths are invalid; a later version is read by its first
/// four fields (W3C's forward compatibility).
pub fn parse_traceparent(value: &str) -> Option<Context> {
    let mut parts = value.trim().splitn(5, '-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    let rest = parts.next();
    let [v] = unhex::<1>(version)?;
    if v == 0xff || (v == 0 && rest.is_some()) {
        return None;
    }
    let trace_id: TraceId = unhex(trace)?;
    let span_id: SpanId = unhex(parent)?;
    let [flags] = unhex::<1>(flags)?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Context {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

/// Parses a single `b3` header (`<trace id>-<span id>[-<sampling>[-<parent span id>]]`).
/// A sampling-only value (`0`, `1`, `d`) carries no context: `None`.
pub fn parse_b3_single(value: &str) -> Option<Context> {
    let mut parts = value.trim().split('-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = parse_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None => true,
        Some("1" | "d") => true,
        Some("0") => false,
        Some(_) => return None,
    };
    if let Some(parent) = parts.next() {
        parse_span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Context {
        trace_id,
        span_id,
        sampled,
    })
}

/// Parses the multi-header B3 form: `x-b3-traceid` and `x-b3-spanid` (both needed),
/// `x-b3-sampled` (`1`/`0`, `true`/`false`; absent: sampled) and `x-b3-flags: 1` (debug,
/// sampled).
pub fn parse_b3_multi(headers: &HeaderMap) -> Option<Context> {
    let get = |n: &HeaderName| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    let trace_id = b3_trace_id(get(&X_B3_TRACEID)?)?;
    let span_id = parse_span_id(get(&X_B3_SPANID)?)?;
    let debug = get(&X_B3_FLAGS) == Some("1");
    let sampled = debug
        || match get(&X_B3_SAMPLED) {
            None => true,
            Some(s) => s == "1" || s.eq_ignore_ascii_case("true"),
        };
    Some(Context {
        trace_id,
        span_id,
        sampled,
    })
}

/// Which propagation format a request carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `traceparent`.
    W3c,
    /// The single `b3` header.
    B3Single,
    /// `x-b3-traceid` and friends.
    B3Multi,
}

/// The context a request carries, and in which format: `traceparent` if valid, else `b3`,
/// else the `x-b3-*` headers.
pub fn extract(headers: &HeaderMap) -> Option<(Context, Format)> {
    let get = |n: &HeaderName| headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(c) = get(&TRACEPARENT).and_then(parse_traceparent) {
        return Some((c, Format::W3c));
    }
    if let Some(c) = get(&B3).and_then(parse_b3_single) {
        return Some((c, Format::B3Single));
    }
    parse_b3_multi(headers).map(|c| (c, Format::B3Multi))
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // Never expected; ids stay unique enough per thread and time.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return (t.as_nanos() as u64) | 1;
    }
    u64::from_le_bytes(b) | 1
}

/// A pseudo-random number (splitmix64 over a per-thread state seeded from the system):
/// ids need to be unique, not secret, and this is on the request path.
pub fn random_u64() -> u64 {
    RNG.with(|s| {
        let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// Whether an event with probability `percent` (0–100) happens this time.
pub fn chance(percent: f64) -> bool {
    if percent >= 100.0 {
        return true;
    }
    if percent <= 0.0 {
        return false;
    }
    // 53 random bits as a float in [0, 100).
    ((random_u64() >> 11) as f64 / (1u64 << 53) as f64) * 100.0 < percent
}

fn new_span_id() -> SpanId {
    loop {
        let id = random_u64();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

fn new_trace_id() -> TraceId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&random_u64().to_be_bytes());
    id[8..].copy_from_slice(&new_span_id());
    id
}

/// The `traceparent` value of a span.
pub fn traceparent(trace_id: &TraceId, span_id: &SpanId, sampled: bool) -> String {
    let mut s = String::with_capacity(55);
    s.push_str("00-");
    push_hex(&mut s, trace_id);
    s.push('-');
    push_hex(&mut s, span_id);
    s.push_str(if sampled { "-01" } else { "-00" });
    s
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// Makes this agent's span of a request and rewrites the request's trace headers so that
/// the next hop continues the trace as its child (module docs). Returns `None` (headers
/// untouched) when the request has no valid context and this agent starts no trace
/// (`settings.start_sampling` is `None`, e.g. at the destination).
pub fn on_request(settings: &TraceSettings, headers: &mut HeaderMap) -> Option<SpanRecord> {
    let extracted = extract(headers);
    let trace_state = headers
        .get(&TRACESTATE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let span = match extracted {
        Some((ctx, format)) => SpanRecord {
            trace_id: ctx.trace_id,
            span_id: new_span_id(),
            parent_span_id: Some(ctx.span_id),
            sampled: ctx.sampled,
            // tracestate belongs to traceparent: kept only with a valid one.
            trace_state: if format == Format::W3c {
                trace_state
            } else {
                None
            },
        },
        None => {
            let percent = settings.start_sampling?;
            SpanRecord {
                trace_id: new_trace_id(),
                span_id: new_span_id(),
                parent_span_id: None,
                sampled: chance(percent),
                trace_state: None,
            }
        }
    };
    if span.trace_state.is_none() {
        headers.remove(&TRACESTATE);
    }
    set(
        headers,
        TRACEPARENT,
        &traceparent(&span.trace_id, &span.span_id, span.sampled),
    );
    let sampled = if span.sampled { "1" } else { "0" };
    if headers.contains_key(&B3) {
        let mut v = String::with_capacity(68);
        push_hex(&mut v, &span.trace_id);
        v.push('-');
        push_hex(&mut v, &span.span_id);
        v.push('-');
        v.push_str(sampled);
        if let Some(p) = &span.parent_span_id {
            v.push('-');
            push_hex(&mut v, p);
        }
        set(headers, B3, &v);
    }
    if headers.contains_key(&X_B3_TRACEID) || headers.contains_key(&X_B3_SPANID) {
        set(headers, X_B3_TRACEID, &hex(&span.trace_id));
        set(headers, X_B3_SPANID, &hex(&span.span_id));
        match &span.parent_span_id {
            Some(p) => set(headers, X_B3_PARENTSPANID, &hex(p)),
            None => {
                headers.remove(&X_B3_PARENTSPANID);
            }
        }
        if !headers.contains_key(&X_B3_FLAGS) {
            set(headers, X_B3_SAMPLED, sampled);
        }
    }
    Some(span)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for &(n, v) in pairs {
            h.insert(
                HeaderName::from_static(n),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn get<'a>(h: &'a HeaderMap, n: &str) -> Option<&'a str> {
        h.get(n).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn traceparent_is_parsed_and_bad_ones_are_refused() {
        let c = parse_traceparent(TP).unwrap();
        assert_eq!(hex(&c.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&c.span_id), "00f067aa0ba902b7");
        assert!(c.sampled);
        assert!(
            !parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .unwrap()
                .sampled
        );
        for bad in [
            "",
            "garbage",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
        // A later version may append fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later")
                .is_some()
        );
    }

    #[test]
    fn b3_single_and_multi_are_parsed() {
        let c =
            parse_b3_single("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90")
                .unwrap();
        assert_eq!(hex(&c.trace_id), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(hex(&c.span_id), "e457b5a2e4d86bd1");
        assert!(c.sampled);
        let c = parse_b3_single("64fe8b2a57d3eff7-e457b5a2e4d86bd1-0").unwrap();
        assert_eq!(hex(&c.trace_id), "000000000000000064fe8b2a57d3eff7");
        assert!(!c.sampled);
        assert!(
            parse_b3_single("64fe8b2a57d3eff7-e457b5a2e4d86bd1-d")
                .unwrap()
                .sampled
        );
        for bad in [
            "0",
            "1",
            "d",
            "xyz-e457b5a2e4d86bd1",
            "64fe8b2a57d3eff7-e457b5a2e4d86bd1-7",
        ] {
            assert_eq!(parse_b3_single(bad), None, "{bad:?}");
        }
        let h = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "0"),
        ]);
        let c = parse_b3_multi(&h).unwrap();
        assert_eq!(hex(&c.trace_id), "463ac35c9f6413ad48485a3953bb6124");
        assert!(!c.sampled);
        let h = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-flags", "1"),
        ]);
        let c = parse_b3_multi(&h).unwrap();
        assert_eq!(hex(&c.trace_id), "0000000000000000463ac35c9f6413ad");
        assert!(c.sampled);
        assert_eq!(
            parse_b3_multi(&headers(&[("x-b3-traceid", "463ac35c9f6413ad")])),
            None
        );
    }

    #[test]
    fn an_incoming_traceparent_is_continued_as_a_child() {
        let mut h = headers(&[("traceparent", TP), ("tracestate", "vendor=x")]);
        let span = on_request(
            &TraceSettings {
                start_sampling: None,
            },
            &mut h,
        )
        .unwrap();
        assert_eq!(span.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&span.parent_span_id.unwrap()), "00f067aa0ba902b7");
        assert!(span.sampled);
        assert_eq!(span.trace_state.as_deref(), Some("vendor=x"));
        let next = parse_traceparent(get(&h, "traceparent").unwrap()).unwrap();
        assert_eq!(next.trace_id, span.trace_id);
        assert_eq!(next.span_id, span.span_id);
        assert_ne!(next.span_id, span.parent_span_id.unwrap());
        assert_eq!(get(&h, "tracestate"), Some("vendor=x"));
    }

    #[test]
    fn a_request_without_context_gets_a_new_trace_only_where_traces_start() {
        let mut h = HeaderMap::new();
        assert_eq!(
            on_request(
                &TraceSettings {
                    start_sampling: None
                },
                &mut h
            ),
            None
        );
        assert!(h.is_empty());
        let span = on_request(
            &TraceSettings {
                start_sampling: Some(100.0),
            },
            &mut h,
        )
        .unwrap();
        assert!(span.sampled && span.parent_span_id.is_none());
        let c = parse_traceparent(get(&h, "traceparent").unwrap()).unwrap();
        assert_eq!((c.trace_id, c.span_id), (span.trace_id, span.span_id));
        let mut h = HeaderMap::new();
        let span = on_request(
            &TraceSettings {
                start_sampling: Some(0.0),
            },
            &mut h,
        )
        .unwrap();
        assert!(!span.sampled);
        assert!(get(&h, "traceparent").unwrap().ends_with("-00"));
        // Ids differ from one trace to the next.
        let mut h2 = HeaderMap::new();
        let other = on_request(
            &TraceSettings {
                start_sampling: Some(0.0),
            },
            &mut h2,
        )
        .unwrap();
        assert_ne!(span.trace_id, other.trace_id);
    }

    #[test]
    fn a_bad_traceparent_is_replaced_and_its_tracestate_dropped() {
        let mut h = headers(&[("traceparent", "00-zz-yy-01"), ("tracestate", "vendor=x")]);
        // At the destination (no new traces) the bad header is left for the app.
        let dest = on_request(
            &TraceSettings {
                start_sampling: None,
            },
            &mut h,
        );
        assert_eq!(dest, None);
        let span = on_request(
            &TraceSettings {
                start_sampling: Some(100.0),
            },
            &mut h,
        )
        .unwrap();
        assert!(span.parent_span_id.is_none());
        assert!(parse_traceparent(get(&h, "traceparent").unwrap()).is_some());
        assert_eq!(get(&h, "tracestate"), None);
    }

    #[test]
    fn b3_requests_keep_their_trace_and_get_rewritten_b3_headers() {
        let mut h = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
        let span = on_request(
            &TraceSettings {
                start_sampling: Some(0.0),
            },
            &mut h,
        )
        .unwrap();
        assert_eq!(span.trace_id_hex(), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(hex(&span.parent_span_id.unwrap()), "e457b5a2e4d86bd1");
        assert!(span.sampled);
        assert_eq!(
            get(&h, "b3").unwrap(),
            format!(
                "80f198ee56343ba864fe8b2a57d3eff7-{}-1-e457b5a2e4d86bd1",
                hex(&span.span_id)
            )
        );
        assert!(
            get(&h, "traceparent")
                .unwrap()
                .contains("80f198ee56343ba864fe8b2a57d3eff7")
        );

        let mut h = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ]);
        let span = on_request(
            &TraceSettings {
                start_sampling: None,
            },
            &mut h,
        )
        .unwrap();
        assert_eq!(span.trace_id_hex(), "463ac35c9f6413ad48485a3953bb6124");
        assert_eq!(
            get(&h, "x-b3-traceid"),
            Some("463ac35c9f6413ad48485a3953bb6124")
        );
        assert_eq!(get(&h, "x-b3-spanid"), Some(hex(&span.span_id).as_str()));
        assert_eq!(get(&h, "x-b3-parentspanid"), Some("a2fb4a1d1a96d312"));
        assert_eq!(get(&h, "x-b3-sampled"), Some("1"));
        // A valid traceparent wins over B3.
        let mut h = headers(&[
            ("traceparent", TP),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ]);
        let span = on_request(
            &TraceSettings {
                start_sampling: None,
            },
            &mut h,
        )
        .unwrap();
        assert_eq!(span.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn sampling_percent_is_honoured_roughly() {
        assert!(chance(100.0) && !chance(0.0));
        let hits = (0..10_000).filter(|_| chance(25.0)).count();
        assert!((2_000..3_000).contains(&hits), "{hits}");
    }
}
