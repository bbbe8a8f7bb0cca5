//! Metric handles the agent's code updates as it runs (prometheus-client types), for
//! `/metrics` ([`crate::health`]). Values read at scrape time (readiness, the tunnel's
//! counters, authorization decisions) are collected there instead.

use std::sync::OnceLock;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Upper bounds (seconds) of the tunnel connect histogram's buckets: a loopback QUIC
/// handshake takes about a millisecond, a cross-region one a few hundred.
pub const CONNECT_BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

type TransportLabel = [(&'static str, &'static str); 1];

/// The agent's live metrics.
#[derive(Debug)]
pub struct AgentMetrics {
    /// Time to set up a tunnel connection to a peer agent (QUIC handshake; TCP connect,
    /// TLS and HTTP/2 handshakes), by transport; successful dials only.
    pub tunnel_connect: Family<TransportLabel, Histogram, fn() -> Histogram>,
    /// Endpoints ejected by outlier detection (a DestinationRule's `outlierDetection`)
    /// since the agent started (Envoy's `outlier_detection.ejections_enforced_total`).
    pub outlier_ejections: Counter,
    /// Endpoints outlier detection holds ejected now (Envoy's `ejections_active`),
    /// updated every second.
    pub outlier_ejections_active: Gauge,
}

fn connect_histogram() -> Histogram {
    Histogram::new(CONNECT_BUCKETS)
}

/// The process's agent metrics.
pub fn agent() -> &'static AgentMetrics {
    static M: OnceLock<AgentMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = AgentMetrics {
            tunnel_connect: Family::new_with_constructor(connect_histogram),
            outlier_ejections: Counter::default(),
            outlier_ejections_active: Gauge::default(),
        };
        // Both series from the start (zero until the first dial), so dashboards and
        // rate() see them.
        for t in ["quic", "tcp"] {
            drop(m.tunnel_connect.get_or_create(&[("transport", t)]));
        }
        m
    })
}

impl AgentMetrics {
    /// Adds these metrics to `reg`.
    pub fn register(&self, reg: &mut Registry) {
        reg.register_with_unit(
            "causeway_agent_tunnel_connect_duration",
            "Time to set up a tunnel connection to a peer agent (QUIC handshake; tcp: TCP connect, TLS and HTTP/2 handshakes), by transport, for dials that succeeded.",
            Unit::Seconds,
            self.tunnel_connect.clone(),
        );
        reg.register(
            "causeway_agent_outlier_ejections",
            "Endpoints ejected by outlier detection (a DestinationRule's outlierDetection) since the agent started.",
            self.outlier_ejections.clone(),
        );
        reg.register(
            "causeway_agent_outlier_ejections_active",
            "Endpoints outlier detection holds ejected now (updated every second).",
            self.outlier_ejections_active.clone(),
        );
    }
}

/// A tunnel connection over `transport` ("quic" or "tcp") dialled since `started` is up.
pub fn tunnel_connected(transport: &'static str, started: Instant) {
    agent()
        .tunnel_connect
        .get_or_create(&[("transport", transport)])
        .observe(started.elapsed().as_secs_f64());
}
