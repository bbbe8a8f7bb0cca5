//! Per-edge traffic summaries for the controller (the web UI's traffic page), read from
//! the Istio metrics ([`super::istio`]) rather than from a second observer: an edge is
//! (reporter side, source workload, destination service, protocol, mutual TLS or not),
//! with its requests, 5xx answers, a coarse latency histogram (for a p99), TCP bytes and
//! connections. [`Edges::report`] sums the Istio series per edge and sends the
//! **deltas since the previous report** (counters never go back, so a delta is exact;
//! the controller divides by `interval_ms` for rates). A report holds at most
//! `max_edges` edges, the busiest; the rest are counted in `dropped`. Without Istio
//! metrics (`[telemetry] metrics = false`) the agent reports no traffic.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use causeway_api::push::{LATENCY_BOUNDS_MS, TrafficEdge, TrafficReport};

use super::istio::{IstioMetrics, Key};

/// Latency buckets of an edge: one per bound of [`LATENCY_BOUNDS_MS`], one over.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// The bucket of a request that took `d` (rounded up to the millisecond).
pub fn latency_bucket(d: Duration) -> usize {
    let ms = u64::try_from(d.as_micros().div_ceil(1000)).unwrap_or(u64::MAX);
    LATENCY_BOUNDS_MS
        .iter()
        .position(|&b| ms <= b)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

/// What identifies an edge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EdgeKey {
    destination_reporter: bool,
    source_workload: Arc<str>,
    source_namespace: Arc<str>,
    destination_service: String,
    protocol: Arc<str>,
    mtls: bool,
}

/// An edge's cumulative counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Totals {
    requests: u64,
    errors: u64,
    latency: [u64; LATENCY_BUCKETS],
    bytes: u64,
    connections: u64,
}

impl Totals {
    fn minus(&self, before: &Totals) -> Totals {
        let mut latency = [0; LATENCY_BUCKETS];
        for (i, l) in latency.iter_mut().enumerate() {
            *l = self.latency[i].saturating_sub(before.latency[i]);
        }
        Totals {
            requests: self.requests.saturating_sub(before.requests),
            errors: self.errors.saturating_sub(before.errors),
            latency,
            bytes: self.bytes.saturating_sub(before.bytes),
            connections: self.connections.saturating_sub(before.connections),
        }
    }

    fn is_zero(&self) -> bool {
        *self == Totals::default()
    }
}

// Positions in an Istio key (see `PEER_LABELS` then the HTTP or TCP labels).
const REPORTER: usize = 0;
const SOURCE_WORKLOAD: usize = 1;
const SOURCE_NAMESPACE: usize = 2;
const SERVICE_NAME: usize = 13;
const SERVICE_NAMESPACE: usize = 14;
const PROTOCOL: usize = 16;
const HTTP_CODE: usize = 17;
const HTTP_SECURITY: usize = 20;
const TCP_SECURITY: usize = 18;

fn edge_key(k: &Key, security: usize) -> EdgeKey {
    let (name, ns) = (&k[SERVICE_NAME], &k[SERVICE_NAMESPACE]);
    EdgeKey {
        destination_reporter: &*k[REPORTER] == "destination",
        source_workload: k[SOURCE_WORKLOAD].clone(),
        source_namespace: k[SOURCE_NAMESPACE].clone(),
        destination_service: if &**name == "PassthroughCluster" {
            name.to_string()
        } else {
            format!("{ns}/{name}")
        },
        protocol: k[PROTOCOL].clone(),
        mtls: &*k[security] == "mutual_tls",
    }
}

/// The cumulative counters of every edge in `m`.
fn totals(m: &IstioMetrics) -> HashMap<EdgeKey, Totals> {
    let mut out: HashMap<EdgeKey, Totals> = HashMap::new();
    for (k, s) in m.http.snapshot() {
        let t = out.entry(edge_key(&k, HTTP_SECURITY)).or_default();
        let n = s.requests.get();
        t.requests += n;
        if k[HTTP_CODE].starts_with('5') {
            t.errors += n;
        }
        for (i, b) in s.latency.iter().enumerate() {
            t.latency[i] += b.load(Ordering::Relaxed);
        }
    }
    for (k, s) in m.tcp.snapshot() {
        let t = out.entry(edge_key(&k, TCP_SECURITY)).or_default();
        t.bytes += s.sent.get() + s.received.get();
        t.connections += s.opened.get();
    }
    out
}

/// The agent's traffic summaries: the totals at the previous report.
#[derive(Debug)]
pub struct Edges {
    metrics: Arc<IstioMetrics>,
    previous: HashMap<EdgeKey, Totals>,
    since: Instant,
}

impl Edges {
    /// Summaries of `metrics`, counting from now on (what was counted before is not
    /// reported).
    pub fn new(metrics: Arc<IstioMetrics>) -> Self {
        let previous = totals(&metrics);
        Self {
            metrics,
            previous,
            since: Instant::now(),
        }
    }

    /// The traffic since the previous call, at most `max_edges` edges (the busiest:
    /// most requests and connections, then most bytes); `None` when there was none.
    pub fn report(&mut self, max_edges: usize) -> Option<TrafficReport> {
        let now = totals(&self.metrics);
        let interval = self.since.elapsed();
        self.since = Instant::now();
        let empty = Totals::default();
        let mut edges: Vec<(EdgeKey, Totals)> = now
            .iter()
            .map(|(k, t)| (k, t.minus(self.previous.get(k).unwrap_or(&empty))))
            .filter(|(_, d)| !d.is_zero())
            .map(|(k, d)| (k.clone(), d))
            .collect();
        self.previous = now;
        if edges.is_empty() {
            return None;
        }
        edges.sort_by(|(ka, a), (kb, b)| {
            (b.requests + b.connections, b.bytes)
                .cmp(&(a.requests + a.connections, a.bytes))
                .then_with(|| ka.destination_service.cmp(&kb.destination_service))
        });
        let dropped = edges.len().saturating_sub(max_edges);
        edges.truncate(max_edges);
        Some(TrafficReport {
            edges: edges
                .into_iter()
                .map(|(k, t)| TrafficEdge {
                    destination_reporter: k.destination_reporter,
                    source_workload: k.source_workload.to_string(),
                    source_namespace: k.source_namespace.to_string(),
                    destination_service: k.destination_service,
                    protocol: k.protocol.to_string(),
                    mtls: k.mtls,
                    requests: t.requests,
                    errors: t.errors,
                    latency_buckets: t.latency.to_vec(),
                    bytes: t.bytes,
                    connections: t.connections,
                })
                .collect(),
            dropped: u32::try_from(dropped).unwrap_or(u32::MAX),
            interval_ms: u64::try_from(interval.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        })
    }
}

static AGENT: Mutex<Option<Edges>> = Mutex::new(None);

/// Makes `metrics` the source of this process's reports (the agent calls it once).
pub fn install(metrics: Arc<IstioMetrics>) {
    *AGENT.lock().unwrap_or_else(|p| p.into_inner()) = Some(Edges::new(metrics));
}

/// This process's report since the previous one (see [`install`]); `None` without
/// traffic or without Istio metrics.
pub fn take_report() -> Option<TrafficReport> {
    AGENT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()?
        .report(causeway_api::push::MAX_EDGES_PER_REPORT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::http::{RequestRecord, Side};

    fn key(reporter: &str, src: &str, svc: &str, tail: &[&str]) -> Key {
        let mut k: Key = vec![Arc::from(reporter), Arc::from(src), Arc::from("shop")];
        k.extend((3..13).map(|_| Arc::from("unknown")));
        k.extend([Arc::from(svc), Arc::from("shop"), Arc::from("unknown")]);
        k.extend(tail.iter().map(|t| Arc::from(*t)));
        k
    }

    fn request(ms: u64) -> RequestRecord {
        RequestRecord {
            side: Side::Source,
            start: std::time::SystemTime::now(),
            method: "GET".into(),
            authority: String::new(),
            path: "/".into(),
            protocol: "HTTP/1.1",
            response_code: 200,
            grpc_status: None,
            response_flags: Default::default(),
            subset: None,
            request_bytes: 0,
            response_bytes: 0,
            duration: Duration::from_millis(ms),
            upstream_host: None,
            trace_headers: Vec::new(),
            conn: Default::default(),
            source_principal: None,
            destination_principal: None,
            trace: None,
        }
    }

    #[test]
    fn latency_buckets_round_up() {
        assert_eq!(latency_bucket(Duration::from_millis(5)), 0);
        assert_eq!(latency_bucket(Duration::from_micros(5001)), 1);
        assert_eq!(latency_bucket(Duration::from_millis(300)), 6);
        assert_eq!(
            latency_bucket(Duration::from_secs(60)),
            LATENCY_BOUNDS_MS.len()
        );
    }

    /// Reports carry deltas since the previous one, per edge; an idle interval
    /// reports nothing; 5xx are errors; TCP bytes count both ways.
    #[test]
    fn reports_are_deltas_per_edge() {
        let m = Arc::new(IstioMetrics::new(1000));
        let ok = key(
            "source",
            "web",
            "api",
            &["http", "200", "", "-", "mutual_tls"],
        );
        let bad = key(
            "source",
            "web",
            "api",
            &["http", "503", "", "-", "mutual_tls"],
        );
        m.request(ok.clone(), &request(1));
        let mut e = Edges::new(m.clone());
        assert_eq!(e.report(10), None, "what came before is not reported");
        for _ in 0..3 {
            m.request(ok.clone(), &request(30));
        }
        m.request(bad.clone(), &request(30));
        let conn = m.tcp_open(key("destination", "web", "db", &["tcp", "-", "none"]));
        conn.bytes(100, 23);
        let r = e.report(10).expect("traffic");
        assert_eq!((r.edges.len(), r.dropped), (2, 0), "{r:#?}");
        let http = &r.edges[0];
        assert_eq!(
            (
                http.destination_reporter,
                http.source_workload.as_str(),
                http.destination_service.as_str(),
                http.protocol.as_str(),
                http.mtls
            ),
            (false, "web", "shop/api", "http", true)
        );
        assert_eq!((http.requests, http.errors), (4, 1));
        assert_eq!(http.latency_buckets[3], 4, "{:?}", http.latency_buckets);
        let tcp = &r.edges[1];
        assert_eq!(
            (
                tcp.destination_reporter,
                tcp.destination_service.as_str(),
                tcp.mtls,
                tcp.bytes,
                tcp.connections
            ),
            (true, "shop/db", false, 123, 1)
        );
        assert_eq!(e.report(10), None, "nothing new");
        m.request(ok, &request(1));
        let r = e.report(10).unwrap();
        assert_eq!((r.edges.len(), r.edges[0].requests), (1, 1), "{r:#?}");
        assert_eq!(r.edges[0].errors, 0);
    }

    /// A report holds at most the bound, the busiest edges, and counts the rest.
    #[test]
    fn a_report_is_bounded_and_keeps_the_busiest() {
        let m = Arc::new(IstioMetrics::new(10_000));
        let mut e = Edges::new(m.clone());
        for i in 0..300u64 {
            let k = key(
                "source",
                "web",
                &format!("svc{i}"),
                &["http", "200", "", "-", "none"],
            );
            for _ in 0..=(i % 7) {
                m.request(k.clone(), &request(1));
            }
        }
        let r = e.report(256).unwrap();
        assert_eq!((r.edges.len(), r.dropped), (256, 44));
        // The 300 edges carry 1 to 7 requests; the 44 dropped are all among the least busy.
        assert!(r.edges.iter().all(|x| x.requests >= 2), "{r:#?}");
        assert_eq!(r.edges[0].requests, 7);
    }
}
