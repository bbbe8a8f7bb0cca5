//! The traffic between workloads and services (`GET /v1/traffic`, the UI's traffic
//! page), merged from the per-edge summaries the agents push
//! ([`causeway_api::push::TrafficReport`]: deltas over `interval_ms`, at most
//! [`causeway_api::push::MAX_EDGES_PER_REPORT`] edges). The controller keeps each
//! connected agent's latest report ([`crate::mesh::Mesh::record_traffic`]) and merges
//! those younger than [`FRESH`]: when an edge (source workload, destination service,
//! protocol) is reported by a destination's agent, only the destinations' views count,
//! as Kiali does (the source's would count each request twice); otherwise the sources'
//! (e.g. calls to endpoints without an agent). Rates are each report's deltas divided by
//! its interval, summed over agents.

use std::collections::BTreeMap;
use std::time::Duration;

use causeway_api::admin::{TrafficEdgeView, TrafficView};
use causeway_api::push::{LATENCY_BOUNDS_MS, TrafficReport};

/// Reports older than this are left out (an agent reports every few seconds while
/// there is traffic).
pub const FRESH: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Sum {
    request_rate: f64,
    bytes_rate: f64,
    requests: u64,
    errors: u64,
    bytes: u64,
    latency: Vec<u64>,
}

/// Of one (source, destination, protocol): by destination reporter, then by mTLS.
type Sides = BTreeMap<bool, BTreeMap<bool, Sum>>;

/// The upper bound (ms) of the bucket holding the 99th percentile; `None` without
/// requests or when it is in the bucket over the highest bound.
pub fn p99(buckets: &[u64]) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    // The smallest bucket whose cumulative count reaches 99% of the total.
    let rank = (total * 99).div_ceil(100);
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return LATENCY_BOUNDS_MS.get(i).copied();
        }
    }
    None
}

/// Merges the agents' latest reports into edges, busiest first.
pub fn merge<'a>(reports: impl IntoIterator<Item = &'a TrafficReport>) -> TrafficView {
    let mut by_edge: BTreeMap<(String, String, String), Sides> = BTreeMap::new();
    let (mut agents, mut dropped) = (0, 0u64);
    for r in reports {
        agents += 1;
        dropped += u64::from(r.dropped);
        let secs = (r.interval_ms.max(1) as f64) / 1000.0;
        for e in r
            .edges
            .iter()
            .take(causeway_api::push::MAX_EDGES_PER_REPORT)
        {
            let source = format!("{}/{}", e.source_namespace, e.source_workload);
            let s = by_edge
                .entry((source, e.destination_service.clone(), e.protocol.clone()))
                .or_default()
                .entry(e.destination_reporter)
                .or_default()
                .entry(e.mtls)
                .or_default();
            s.request_rate += e.requests as f64 / secs;
            s.bytes_rate += e.bytes as f64 / secs;
            s.requests += e.requests;
            s.errors += e.errors.min(e.requests);
            s.bytes += e.bytes;
            if s.latency.len() < e.latency_buckets.len() {
                s.latency.resize(e.latency_buckets.len(), 0);
            }
            for (a, b) in s.latency.iter_mut().zip(&e.latency_buckets) {
                *a += b;
            }
        }
    }
    let mut edges = Vec::new();
    for ((source, destination, protocol), mut sides) in by_edge {
        // The destination's view when it has one (the last key: `true`).
        let Some((dest_side, views)) = sides.pop_last() else {
            continue;
        };
        for (mtls, s) in views {
            edges.push(TrafficEdgeView {
                source: source.clone(),
                destination: destination.clone(),
                protocol: protocol.clone(),
                mtls,
                reporter: if dest_side { "destination" } else { "source" }.into(),
                request_rate: s.request_rate,
                error_rate: if s.requests == 0 {
                    0.0
                } else {
                    s.errors as f64 / s.requests as f64
                },
                p99_ms: p99(&s.latency),
                bytes_rate: s.bytes_rate,
                requests: s.requests,
                bytes: s.bytes,
            });
        }
    }
    // HTTP and gRPC are carried on connections the agents also count as TCP: their
    // bytes go to the request edge of the same pair, not to an edge of their own.
    let mut i = 0;
    while i < edges.len() {
        let e = &edges[i];
        let carrier = (e.protocol == "tcp")
            .then(|| {
                edges.iter().position(|o| {
                    o.protocol != "tcp"
                        && (&o.source, &o.destination, o.mtls, &o.reporter)
                            == (&e.source, &e.destination, e.mtls, &e.reporter)
                })
            })
            .flatten();
        match carrier {
            Some(j) => {
                let tcp = edges.swap_remove(i);
                let j = if j == edges.len() { i } else { j };
                edges[j].bytes += tcp.bytes;
                edges[j].bytes_rate += tcp.bytes_rate;
            }
            None => i += 1,
        }
    }
    edges.sort_by(|a, b| {
        b.requests
            .cmp(&a.requests)
            .then(b.bytes.cmp(&a.bytes))
            .then_with(|| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)))
    });
    TrafficView {
        edges,
        agents_reporting: agents,
        dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_api::push::TrafficEdge;

    fn edge(dest: bool, src: &str, svc: &str, proto: &str, mtls: bool) -> TrafficEdge {
        TrafficEdge {
            destination_reporter: dest,
            source_workload: src.into(),
            source_namespace: "shop".into(),
            destination_service: svc.into(),
            protocol: proto.into(),
            mtls,
            ..TrafficEdge::default()
        }
    }

    #[test]
    fn p99_is_the_bound_of_its_bucket() {
        assert_eq!(p99(&[]), None);
        assert_eq!(p99(&[0; 12]), None);
        let mut b = vec![0u64; 12];
        b[1] = 99;
        b[6] = 1;
        assert_eq!(p99(&b), Some(10), "99 of 100 are within 10 ms");
        b[6] = 2;
        assert_eq!(p99(&b), Some(500));
        b[11] = 50;
        assert_eq!(p99(&b), None, "beyond the highest bound");
    }

    /// Both sides report web -> shop/api: only the destinations' views count (two
    /// destination agents, summed); web -> shop/legacy (no agent at the destination):
    /// the source's; rates are per second of each report's interval.
    #[test]
    fn the_destination_view_wins_and_agents_sum() {
        let src = TrafficReport {
            edges: vec![
                TrafficEdge {
                    requests: 40,
                    errors: 40,
                    ..edge(false, "web", "shop/api", "http", true)
                },
                TrafficEdge {
                    requests: 10,
                    errors: 1,
                    latency_buckets: vec![10, 0, 0],
                    ..edge(false, "web", "shop/legacy", "http", false)
                },
            ],
            dropped: 3,
            interval_ms: 5000,
        };
        let dst = |n: u64, errs: u64| TrafficReport {
            edges: vec![TrafficEdge {
                requests: n,
                errors: errs,
                latency_buckets: vec![0, n, 0],
                ..edge(true, "web", "shop/api", "http", true)
            }],
            dropped: 0,
            interval_ms: 2000,
        };
        let (d1, d2) = (dst(30, 3), dst(10, 1));
        let tcp = TrafficReport {
            edges: vec![
                TrafficEdge {
                    bytes: 4000,
                    connections: 1,
                    ..edge(false, "web", "shop/db", "tcp", true)
                },
                // The connections that carried web -> shop/legacy's requests.
                TrafficEdge {
                    bytes: 800,
                    connections: 1,
                    ..edge(false, "web", "shop/legacy", "tcp", false)
                },
            ],
            dropped: 0,
            interval_ms: 4000,
        };
        let v = merge([&src, &d1, &d2, &tcp]);
        assert_eq!((v.agents_reporting, v.dropped), (4, 3));
        assert_eq!(v.edges.len(), 3, "{v:#?}");
        let api = &v.edges[0];
        assert_eq!(
            (
                api.destination.as_str(),
                api.reporter.as_str(),
                api.requests,
                api.mtls
            ),
            ("shop/api", "destination", 40, true)
        );
        assert!((api.request_rate - 20.0).abs() < 1e-9, "{api:?}");
        assert!((api.error_rate - 0.1).abs() < 1e-9, "{api:?}");
        assert_eq!(api.p99_ms, Some(10));
        let legacy = &v.edges[1];
        assert_eq!(
            (
                legacy.source.as_str(),
                legacy.reporter.as_str(),
                legacy.mtls,
                legacy.p99_ms
            ),
            ("shop/web", "source", false, Some(5))
        );
        assert!((legacy.request_rate - 2.0).abs() < 1e-9);
        assert_eq!(
            legacy.bytes, 800,
            "the carrying connections' bytes: {legacy:?}"
        );
        assert!((legacy.bytes_rate - 200.0).abs() < 1e-9);
        let db = &v.edges[2];
        assert_eq!((db.protocol.as_str(), db.bytes), ("tcp", 4000));
        assert!((db.bytes_rate - 1000.0).abs() < 1e-9);
        assert_eq!(merge([]).edges, vec![]);
    }
}
