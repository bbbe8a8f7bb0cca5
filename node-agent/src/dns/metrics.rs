//! DNS counters for `/metrics` (Prometheus text format, the style of `health.rs`).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::cache::Cache;

/// Upper bounds (seconds) of the upstream latency histogram's buckets.
pub const BUCKETS: [f64; 14] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// What the DNS server counts.
#[derive(Debug, Default)]
pub struct DnsMetrics {
    /// The cache, when it is on.
    pub cache: Option<Arc<Cache>>,
    /// Upstream queries that got no answer in time.
    pub upstream_timeouts: AtomicU64,
    /// Upstream queries that failed otherwise (refused, socket errors, no connection).
    pub upstream_errors: AtomicU64,
    /// Queries forwarded (UDP, TCP).
    pub forwarded: [AtomicU64; 2],
    /// Histogram of upstream answer times: one counter per bucket (not cumulative), then
    /// +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl DnsMetrics {
    /// Counters for a server with `cache`.
    pub fn new(cache: Option<Arc<Cache>>) -> Self {
        Self {
            cache,
            ..Self::default()
        }
    }

    /// One upstream answer after `d`.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let u = |x: &AtomicU64| x.load(Ordering::Relaxed).to_string();
        if let Some(c) = &self.cache {
            let n = &c.counters;
            metric(
                "causeway_agent_dns_cache_hits_total",
                "counter",
                "Forwarded-name queries answered from the DNS cache.",
                &[(String::new(), u(&n.hits))],
            );
            metric(
                "causeway_agent_dns_cache_misses_total",
                "counter",
                "Cacheable forwarded-name queries not in the DNS cache (sent upstream).",
                &[(String::new(), u(&n.misses))],
            );
            metric(
                "causeway_agent_dns_cache_evictions_total",
                "counter",
                "DNS cache entries pushed out by its entry or byte bound.",
                &[(String::new(), u(&n.evictions))],
            );
            metric(
                "causeway_agent_dns_cache_entries",
                "gauge",
                "Answers in the DNS cache.",
                &[(String::new(), c.len().to_string())],
            );
            metric(
                "causeway_agent_dns_cache_bytes",
                "gauge",
                "Bytes the DNS cache's entries take (as bounded by dns.cache_max_bytes).",
                &[(String::new(), c.bytes().to_string())],
            );
        }
        metric(
            "causeway_agent_dns_forwarded_total",
            "counter",
            "Queries forwarded to the upstream resolvers, by transport.",
            &[
                ("{transport=\"udp\"}".into(), u(&self.forwarded[0])),
                ("{transport=\"tcp\"}".into(), u(&self.forwarded[1])),
            ],
        );
        metric(
            "causeway_agent_dns_upstream_errors_total",
            "counter",
            "Upstream resolver queries that failed, by kind (timeout: no answer within dns.forward_timeout).",
            &[
                ("{kind=\"timeout\"}".into(), u(&self.upstream_timeouts)),
                ("{kind=\"error\"}".into(), u(&self.upstream_errors)),
            ],
        );
        let mut lines = Vec::with_capacity(BUCKETS.len() + 3);
        let mut acc = 0u64;
        for (i, b) in BUCKETS.iter().enumerate() {
            acc += self.buckets[i].load(Ordering::Relaxed);
            lines.push((format!("_bucket{{le=\"{b}\"}}"), acc.to_string()));
        }
        acc += self.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        lines.push(("_bucket{le=\"+Inf\"}".into(), acc.to_string()));
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        lines.push(("_sum".into(), sum.to_string()));
        lines.push(("_count".into(), acc.to_string()));
        metric(
            "causeway_agent_dns_upstream_duration_seconds",
            "histogram",
            "Time from sending a query to an upstream resolver to its answer.",
            &lines,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_counts_match() {
        let m = DnsMetrics::new(None);
        m.observe(Duration::from_micros(100));
        m.observe(Duration::from_millis(3));
        m.observe(Duration::from_secs(10));
        m.upstream_timeouts.fetch_add(2, Ordering::Relaxed);
        let t = m.render();
        assert!(
            t.contains("causeway_agent_dns_upstream_duration_seconds_bucket{le=\"0.00025\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("causeway_agent_dns_upstream_duration_seconds_bucket{le=\"0.005\"} 2\n")
        );
        assert!(t.contains("causeway_agent_dns_upstream_duration_seconds_bucket{le=\"5\"} 2\n"));
        assert!(t.contains("causeway_agent_dns_upstream_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(t.contains("causeway_agent_dns_upstream_duration_seconds_count 3\n"));
        assert!(t.contains("causeway_agent_dns_upstream_errors_total{kind=\"timeout\"} 2\n"));
        assert!(!t.contains("cache"), "no cache, no cache metrics");
    }
}
