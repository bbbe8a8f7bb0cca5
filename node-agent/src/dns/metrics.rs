//! DNS counters for `/metrics` (prometheus-client types, collected by `health.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;

use super::cache::Cache;
use causeway_telemetry::metrics::{Labels, const_counter, const_gauge, gauge_value};

/// Upper bounds (seconds) of the upstream latency histogram's buckets.
pub const BUCKETS: [f64; 14] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// What the DNS server counts.
#[derive(Debug)]
pub struct DnsMetrics {
    /// The cache, when it is on.
    pub cache: Option<Arc<Cache>>,
    /// Upstream queries that got no answer in time.
    pub upstream_timeouts: Counter,
    /// Upstream queries that failed otherwise (refused, socket errors, no connection).
    pub upstream_errors: Counter,
    /// Queries forwarded (UDP, TCP).
    pub forwarded: [Counter; 2],
    /// Upstream answer times.
    upstream_duration: Histogram,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        Self::new(None)
    }
}

impl DnsMetrics {
    /// Counters for a server with `cache`.
    pub fn new(cache: Option<Arc<Cache>>) -> Self {
        Self {
            cache,
            upstream_timeouts: Counter::default(),
            upstream_errors: Counter::default(),
            forwarded: Default::default(),
            upstream_duration: Histogram::new(BUCKETS),
        }
    }

    /// One upstream answer after `d`.
    pub fn observe(&self, d: Duration) {
        self.upstream_duration.observe(d.as_secs_f64());
    }

    /// These metrics alone, in the Prometheus text format.
    pub fn render(self: &Arc<Self>) -> String {
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(self.clone()));
        causeway_telemetry::metrics::encode(&reg, causeway_telemetry::metrics::PROMETHEUS_TEXT)
    }
}

impl Collector for DnsMetrics {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let u = |x: &AtomicU64| x.load(Ordering::Relaxed);
        let none = Labels::new;
        if let Some(c) = &self.cache {
            let n = &c.counters;
            const_counter(
                &mut enc,
                "causeway_agent_dns_cache_hits",
                "Forwarded-name queries answered from the DNS cache.",
                &[(none(), u(&n.hits))],
            )?;
            const_counter(
                &mut enc,
                "causeway_agent_dns_cache_misses",
                "Cacheable forwarded-name queries not in the DNS cache (sent upstream).",
                &[(none(), u(&n.misses))],
            )?;
            const_counter(
                &mut enc,
                "causeway_agent_dns_cache_evictions",
                "DNS cache entries pushed out by its entry or byte bound.",
                &[(none(), u(&n.evictions))],
            )?;
            const_gauge(
                &mut enc,
                "causeway_agent_dns_cache_entries",
                "Answers in the DNS cache.",
                &[(none(), gauge_value(c.len()))],
            )?;
            const_gauge(
                &mut enc,
                "causeway_agent_dns_cache_bytes",
                "Bytes the DNS cache's entries take (as bounded by dns.cache_max_bytes).",
                &[(none(), gauge_value(c.bytes()))],
            )?;
        }
        const_counter(
            &mut enc,
            "causeway_agent_dns_forwarded",
            "Queries forwarded to the upstream resolvers, by transport.",
            &[
                (vec![("transport", "udp".into())], self.forwarded[0].get()),
                (vec![("transport", "tcp".into())], self.forwarded[1].get()),
            ],
        )?;
        const_counter(
            &mut enc,
            "causeway_agent_dns_upstream_errors",
            "Upstream resolver queries that failed, by kind (timeout: no answer within dns.forward_timeout).",
            &[
                (
                    vec![("kind", "timeout".into())],
                    self.upstream_timeouts.get(),
                ),
                (vec![("kind", "error".into())], self.upstream_errors.get()),
            ],
        )?;
        self.upstream_duration.encode(enc.encode_descriptor(
            "causeway_agent_dns_upstream_duration",
            "Time from sending a query to an upstream resolver to its answer.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?)
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
        m.upstream_timeouts.inc_by(2);
        let t = Arc::new(m).render();
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
