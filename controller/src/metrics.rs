//! The controller's Prometheus metrics, on a listener of their own (`[metrics] listen`,
//! default 127.0.0.1:15014, as istiod's monitoring port): `GET /metrics`.
//!
//! - `causeway_controller_connected_agents`: agents with an open config subscription.
//! - `causeway_controller_push_lag_seconds`: from a new mesh version to the moment every
//!   connected agent has acknowledged it (or a later one).
//! - `causeway_controller_joins_total{outcome}`, `causeway_controller_renewals_total{outcome}`:
//!   enrollment requests by outcome (`ok` or the error code sent, e.g. `token_expired`).
//! - `causeway_controller_source_state{source,kind,state}`,
//!   `causeway_controller_source_stale_seconds{source}`: each registry source's state (1
//!   for the current one) and how long it has been stale (0 when not stale).
//! - `causeway_controller_registry_services`, `causeway_controller_registry_endpoints`:
//!   sizes of the merged registry; `causeway_controller_source_services{source}` and
//!   `causeway_controller_source_endpoints{source}` per source.
//! - `causeway_controller_mesh_version`, `causeway_controller_build_info{version}`.
//! - `causeway_controller_leader`: 1 while this controller leads the HA set (runs the
//!   registry sources), else 0; always 1 on sled (one controller).
//! - `causeway_controller_store_request_seconds`: latency of each etcd request of the
//!   store (`[store] backend = "etcd"`); `causeway_controller_etcd_errors_total`: etcd
//!   requests that failed (store, election, watch); `causeway_controller_fenced_writes_total`:
//!   registry writes refused because this controller no longer led.
//!
//! Also `GET /v1/sd/prometheus`: Prometheus HTTP service discovery of the agents'
//! metrics endpoints ([`crate::sd`]).
//!
//! Counters and the histogram live in one process-wide [`Metrics`]; the gauges are read
//! from the [`Mesh`] at each scrape.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use causeway_telemetry::http::reply;
use causeway_telemetry::metrics::{Labels, const_gauge, gauge_value};
use http::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::mesh::Mesh;

/// Upper bounds (seconds) of the push lag histogram's buckets.
pub const PUSH_LAG_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Upper bounds (seconds) of the store request latency histogram's buckets.
pub const STORE_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Versions waiting for their ACKs, at most (the oldest is dropped beyond).
const MAX_PENDING: usize = 4096;

type Outcome = [(&'static str, String); 1];

/// The controller's counters and histograms.
#[derive(Debug)]
pub struct Metrics {
    /// Join requests by outcome.
    pub joins: Family<Outcome, Counter>,
    /// Renewal requests by outcome.
    pub renewals: Family<Outcome, Counter>,
    /// Config change to all ACKs.
    pub push_lag: Histogram,
    /// 1 while this controller leads (runs the registry sources).
    pub leader: Gauge,
    /// Latency of the store's etcd requests.
    pub store_latency: Histogram,
    /// Failed etcd requests.
    pub etcd_errors: Counter,
    /// Registry writes refused by the leadership fence.
    pub fenced_writes: Counter,
    /// Versions not yet acknowledged by every connected agent, and when they were made.
    pending: Mutex<BTreeMap<u64, Instant>>,
    /// Wakes the push-lag task after ACKs and session ends: a burst of 1,000 ACKs is one
    /// scan of the sessions there, not one per ACK on the push path under the mesh lock.
    acked: tokio::sync::Notify,
}

/// The process's controller metrics.
pub fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        joins: Family::default(),
        renewals: Family::default(),
        push_lag: Histogram::new(PUSH_LAG_BUCKETS),
        leader: Gauge::default(),
        store_latency: Histogram::new(STORE_BUCKETS),
        etcd_errors: Counter::default(),
        fenced_writes: Counter::default(),
        pending: Mutex::new(BTreeMap::new()),
        acked: tokio::sync::Notify::new(),
    })
}

/// Records one etcd request of the store: its latency, and an error if it failed.
pub fn store_request(took: std::time::Duration, ok: bool) {
    let m = get();
    m.store_latency.observe(took.as_secs_f64());
    if !ok {
        m.etcd_errors.inc();
    }
}

/// The label of an enrollment outcome: `ok`, or the wire error code in snake case.
fn outcome<T>(r: &Result<T, crate::enroll::EnrollError>) -> String {
    let Err(e) = r else {
        return "ok".into();
    };
    let mut out = String::new();
    for (i, c) in format!("{:?}", e.code()).chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Counts a join request's outcome.
pub fn joined<T>(r: &Result<T, crate::enroll::EnrollError>) {
    get().joins.get_or_create(&[("outcome", outcome(r))]).inc();
}

/// Counts a renewal request's outcome.
pub fn renewed<T>(r: &Result<T, crate::enroll::EnrollError>) {
    get()
        .renewals
        .get_or_create(&[("outcome", outcome(r))])
        .inc();
}

impl Metrics {
    /// A new mesh version exists since `at`.
    pub fn version_made(&self, version: u64, at: Instant) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.entry(version).or_insert(at);
        while p.len() > MAX_PENDING {
            p.pop_first();
        }
    }

    /// Every connected agent has acknowledged `min_acked` or later (`None`: no agent is
    /// connected, so no version waits for anyone): the versions up to it are done.
    pub fn acked_up_to(&self, min_acked: Option<u64>, now: Instant) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let Some(min) = min_acked else {
            p.clear();
            return;
        };
        while let Some(entry) = p.first_entry() {
            if *entry.key() > min {
                break;
            }
            let made = entry.remove();
            self.push_lag
                .observe(now.saturating_duration_since(made).as_secs_f64());
        }
    }
}

/// An agent acknowledged a version, or a session ended: the push-lag task (started with
/// the metrics listener) then records the lag of every version all connected agents now
/// have. Wakes coalesce, so the push path only sets a flag.
pub fn push_acked() {
    get().acked.notify_one();
}

/// Records the push lag of every version all connected agents have now.
fn observe_acked(mesh: &Mesh) {
    get().acked_up_to(mesh.min_acked_version(), Instant::now());
}

/// The gauges read from the mesh at each scrape.
struct MeshCollector(Arc<Mesh>);

impl std::fmt::Debug for MeshCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshCollector")
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Collector for MeshCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mesh = &self.0;
        let none = Labels::new;
        const_gauge(
            &mut enc,
            "causeway_controller_build_info",
            "Version of the running controller.",
            &[(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], 1)],
        )?;
        const_gauge(
            &mut enc,
            "causeway_controller_mesh_version",
            "The current mesh config version.",
            &[(none(), gauge_value(mesh.version()))],
        )?;
        let connected = mesh.sessions().values().filter(|s| s.connected).count();
        const_gauge(
            &mut enc,
            "causeway_controller_connected_agents",
            "Agents with an open config subscription.",
            &[(none(), gauge_value(connected))],
        )?;
        let services = mesh.services();
        let endpoints: usize = services.iter().map(|s| s.endpoints.len()).sum();
        const_gauge(
            &mut enc,
            "causeway_controller_registry_services",
            "Services in the merged registry (with at least one endpoint).",
            &[(none(), gauge_value(services.len()))],
        )?;
        const_gauge(
            &mut enc,
            "causeway_controller_registry_endpoints",
            "Endpoints in the merged registry.",
            &[(none(), gauge_value(endpoints))],
        )?;
        let sources = mesh.sources();
        let stale_since = mesh.source_stale_since_ms();
        let now = now_ms();
        let mut states = Vec::new();
        let mut stale = Vec::new();
        let mut svc = Vec::new();
        let mut eps = Vec::new();
        for s in &sources {
            let kind = s.kind.to_string();
            for state in ["pending", "synced", "stale"] {
                states.push((
                    vec![
                        ("source", s.name.clone()),
                        ("kind", kind.clone()),
                        ("state", state.to_owned()),
                    ],
                    i64::from(s.state.to_string() == state),
                ));
            }
            let since = stale_since.get(&s.name).copied().flatten();
            let secs = since.map_or(0, |t| now.saturating_sub(t) / 1000);
            stale.push((vec![("source", s.name.clone())], gauge_value(secs)));
            svc.push((vec![("source", s.name.clone())], gauge_value(s.services)));
            eps.push((vec![("source", s.name.clone())], gauge_value(s.endpoints)));
        }
        const_gauge(
            &mut enc,
            "causeway_controller_source_state",
            "Each registry source's state: 1 for the current one of pending (no complete answer yet in this run), synced and stale.",
            &states,
        )?;
        const_gauge(
            &mut enc,
            "causeway_controller_source_stale_seconds",
            "Seconds since the registry source went stale (its last answer failed); 0 while it is not stale.",
            &stale,
        )?;
        const_gauge(
            &mut enc,
            "causeway_controller_source_services",
            "Services the registry source holds.",
            &svc,
        )?;
        const_gauge(
            &mut enc,
            "causeway_controller_source_endpoints",
            "Endpoints the registry source holds.",
            &eps,
        )?;
        Ok(())
    }
}

/// The registry `/metrics` encodes for the controller of `mesh`.
pub fn registry(mesh: &Arc<Mesh>) -> Registry {
    let m = get();
    let mut reg = Registry::default();
    reg.register_collector(Box::new(MeshCollector(mesh.clone())));
    reg.register(
        "causeway_controller_joins",
        "Join requests, by outcome (ok, or the error code sent to the agent).",
        m.joins.clone(),
    );
    reg.register(
        "causeway_controller_renewals",
        "Certificate renewal requests, by outcome (ok, or the error code sent to the agent).",
        m.renewals.clone(),
    );
    reg.register(
        "causeway_controller_leader",
        "1 while this controller leads the HA set and runs the registry sources, else 0 (always 1 on sled).",
        m.leader.clone(),
    );
    reg.register_with_unit(
        "causeway_controller_store_request",
        "Latency of each etcd request of the store ([store] backend = \"etcd\").",
        Unit::Seconds,
        m.store_latency.clone(),
    );
    reg.register(
        "causeway_controller_etcd_errors",
        "etcd requests that failed (store, leader election, mesh watch).",
        m.etcd_errors.clone(),
    );
    reg.register(
        "causeway_controller_fenced_writes",
        "Registry writes refused because this controller no longer led (its leadership lease had expired).",
        m.fenced_writes.clone(),
    );
    reg.register_with_unit(
        "causeway_controller_push_lag",
        "Time from a new mesh config version to the moment every connected agent has acknowledged it or a later one.",
        Unit::Seconds,
        m.push_lag.clone(),
    );
    reg
}

fn handle<B>(req: &Request<B>, mesh: &Arc<Mesh>) -> Response<String> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let path = req.uri().path();
    if path != "/metrics" && path != crate::sd::PATH {
        return reply(
            StatusCode::NOT_FOUND,
            PLAIN,
            format!(
                "no such path {path:?}; try /metrics or {}\n",
                crate::sd::PATH
            ),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            format!("method {} not allowed; use GET\n", req.method()),
        );
    }
    if path == crate::sd::PATH {
        return reply(
            StatusCode::OK,
            "application/json",
            crate::sd::document(&mesh.scrape_targets()),
        );
    }
    let ctype = causeway_telemetry::metrics::negotiate(causeway_telemetry::http::accept(req));
    reply(
        StatusCode::OK,
        ctype,
        causeway_telemetry::metrics::encode(&registry(mesh), ctype),
    )
}

/// Binds `listen` (`[metrics] listen`), serves `/metrics` there, and records when each
/// mesh version appears (for the push lag). Returns the bound address.
pub async fn spawn(
    listen: SocketAddr,
    mesh: Arc<Mesh>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {listen} for metrics: {e}; another program holds it (set metrics.listen in the controller config, or --metrics-listen)"
        )
    })?;
    let addr = listener.local_addr()?;
    let mut versions = mesh.watch();
    let watched = mesh.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = versions.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let v = *versions.borrow_and_update();
                    get().version_made(v, Instant::now());
                }
                () = get().acked.notified() => {}
            }
            // Also right after a new version: with no agent connected nothing waits.
            observe_acked(&watched);
        }
    });
    let task = causeway_telemetry::http::serve(listener, move |req, _| handle(req, &mesh));
    tracing::info!(%addr, "metrics endpoint listening");
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The histogram's count and sum, as scraped.
    fn scraped(h: &Histogram) -> (u64, f64) {
        let mut reg = Registry::default();
        reg.register_with_unit("lag", "Lag.", Unit::Seconds, h.clone());
        let text =
            causeway_telemetry::metrics::encode(&reg, causeway_telemetry::metrics::PROMETHEUS_TEXT);
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .trim()
                .to_owned()
        };
        (
            value("lag_seconds_count ").parse().unwrap(),
            value("lag_seconds_sum ").parse().unwrap(),
        )
    }

    #[test]
    fn push_lag_waits_for_every_connected_agent() {
        let m = Metrics {
            joins: Family::default(),
            renewals: Family::default(),
            push_lag: Histogram::new(PUSH_LAG_BUCKETS),
            leader: Gauge::default(),
            store_latency: Histogram::new(STORE_BUCKETS),
            etcd_errors: Counter::default(),
            fenced_writes: Counter::default(),
            pending: Mutex::new(BTreeMap::new()),
            acked: tokio::sync::Notify::new(),
        };
        let t0 = Instant::now();
        m.version_made(5, t0);
        m.version_made(6, t0 + Duration::from_millis(100));
        // The slowest agent is still on 4: nothing observed.
        m.acked_up_to(Some(4), t0 + Duration::from_secs(1));
        assert_eq!(scraped(&m.push_lag).0, 0);
        // All have 5: version 5 took 2 s; 6 still waits.
        m.acked_up_to(Some(5), t0 + Duration::from_secs(2));
        let (count, sum) = scraped(&m.push_lag);
        assert_eq!(count, 1);
        assert!((sum - 2.0).abs() < 1e-9, "{sum}");
        // A later version acknowledged covers the earlier one.
        m.version_made(7, t0 + Duration::from_secs(2));
        m.acked_up_to(Some(7), t0 + Duration::from_secs(3));
        assert_eq!(scraped(&m.push_lag).0, 3);
        // No agent connected: pending versions are dropped, not observed.
        m.version_made(8, t0);
        m.acked_up_to(None, t0 + Duration::from_secs(60));
        assert_eq!(scraped(&m.push_lag).0, 3);
        assert!(m.pending.lock().unwrap().is_empty());
    }

    #[test]
    fn outcomes_are_snake_case_error_codes() {
        use crate::enroll::EnrollError;
        assert_eq!(outcome::<()>(&Ok(())), "ok");
        assert_eq!(
            outcome::<()>(&Err(EnrollError::TokenInvalid)),
            "token_invalid"
        );
        assert_eq!(
            outcome::<()>(&Err(EnrollError::AgentRemoved("a".into()))),
            "agent_removed"
        );
    }
}
