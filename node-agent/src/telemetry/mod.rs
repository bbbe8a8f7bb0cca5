//! Telemetry of the proxied traffic (`[telemetry]` in agent.toml): Istio's standard
//! metrics ([`istio`]) on `/metrics`, with a cap on their series ([`series`]), and
//! `/metrics` on a routable address for a remote Prometheus ([`serve_metrics`],
//! `metrics_listen` and `metrics_allow`), which the agent reports to the controller so
//! that its Prometheus service discovery lists it; access logs ([`access_log`]), trace
//! context propagation ([`trace`]) and span export over OTLP ([`otlp`]).
//!
//! Observers of HTTP requests are composed with [`Fanout`]: [`Telemetry::http_observer`]
//! gives every proxy one observer that hands each record to each enabled consumer;
//! [`Telemetry::http_settings`] gives it its trace handling and the agent's identity.

pub mod access_log;
pub mod edges;
pub mod istio;
pub mod otlp;
pub mod series;
pub mod trace;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use ipnet::IpNet;
use serde::Deserialize;

use crate::dataplane::http::{HttpSettings, Observer, RequestRecord, Side};
use crate::push::SharedState;
pub use access_log::{AccessLog, AccessLogFormat, TcpRecord};
pub use istio::{CountingIo, Istio, Scope, TcpConn};

/// `[telemetry]` in the agent config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Record Istio's standard metrics (`istio_requests_total`, `istio_tcp_*`, ...).
    pub metrics: bool,
    /// Most label sets each metric family holds (the request metrics share one set, the
    /// TCP metrics another); new ones beyond are folded into one overflow series.
    pub max_series: usize,
    /// A second endpoint serving only `/metrics`, on a routable address for a remote
    /// Prometheus (e.g. "0.0.0.0:15090"); none by default.
    pub metrics_listen: Option<SocketAddr>,
    /// Networks whose scrapers `metrics_listen` answers (403 for others), e.g.
    /// ["10.0.0.0/8"]; required with `metrics_listen`.
    pub metrics_allow: Vec<IpNet>,
    /// One entry per HTTP request and per proxied TCP connection: "off" (default),
    /// "text" (Envoy's format) or "json"; to the journal under systemd, else stdout.
    pub access_log: AccessLogFormat,
    /// Percent (0–100) of requests and connections logged.
    pub access_log_sampling: f64,
    /// Percent (0–100) of the traces this agent starts (requests without trace context)
    /// that are sampled, i.e. exported; incoming contexts keep their own decision.
    pub trace_sampling: f64,
    /// OTLP/HTTP (protobuf) traces endpoint of a collector, e.g.
    /// "http://127.0.0.1:4318/v1/traces"; unset: spans are not exported.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            metrics: true,
            max_series: 10_000,
            metrics_listen: None,
            metrics_allow: Vec::new(),
            access_log: AccessLogFormat::Off,
            access_log_sampling: 100.0,
            trace_sampling: 1.0,
            otlp_endpoint: None,
        }
    }
}

/// Largest `max_series`.
pub const MAX_SERIES_LIMIT: usize = 1_000_000;

impl TelemetryConfig {
    /// Adds a line per problem to `errors`; `health` is the `[health] listen` address.
    pub fn validate(&self, health: SocketAddr, errors: &mut Vec<String>) {
        if !(1..=MAX_SERIES_LIMIT).contains(&self.max_series) {
            errors.push(format!(
                "telemetry.max_series = {}: must be between 1 and {MAX_SERIES_LIMIT}, e.g. 10000",
                self.max_series
            ));
        }
        for (field, v, example) in [
            (
                "telemetry.access_log_sampling",
                self.access_log_sampling,
                "100",
            ),
            ("telemetry.trace_sampling", self.trace_sampling, "1.0"),
        ] {
            if !(0.0..=100.0).contains(&v) {
                errors.push(format!(
                    "{field} = {v}: must be a percentage between 0 and 100, e.g. {example}"
                ));
            }
        }
        if let Some(url) = &self.otlp_endpoint
            && let Err(why) = otlp::parse_endpoint(url)
        {
            errors.push(format!("telemetry.otlp_endpoint = {url:?} {why}"));
        }
        let Some(listen) = self.metrics_listen else {
            if !self.metrics_allow.is_empty() {
                errors.push(
                    "telemetry.metrics_allow is set but telemetry.metrics_listen is not: set metrics_listen (e.g. \"0.0.0.0:15090\") or remove metrics_allow".into(),
                );
            }
            return;
        };
        if listen.port() == 0 {
            errors.push(format!(
                "telemetry.metrics_listen = {listen}: needs a fixed port (Prometheus is told it), e.g. \"0.0.0.0:15090\""
            ));
        }
        let overlaps = |a: std::net::IpAddr, b: std::net::IpAddr| {
            a == b || a.is_unspecified() || b.is_unspecified()
        };
        if listen.port() == health.port() && overlaps(listen.ip(), health.ip()) {
            errors.push(format!(
                "telemetry.metrics_listen = {listen}: health.listen ({health}) already takes that port; use another, e.g. \"0.0.0.0:15090\""
            ));
        }
        if self.metrics_allow.is_empty() {
            errors.push(format!(
                "telemetry.metrics_listen = {listen}: telemetry.metrics_allow is empty; list the networks of your Prometheus servers, e.g. metrics_allow = [\"10.0.0.0/8\"]"
            ));
        }
    }
}

/// Hands each record to several observers, in order.
pub struct Fanout(pub Vec<Arc<dyn Observer>>);

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanout")
            .field("observers", &self.0.len())
            .finish()
    }
}

impl Observer for Fanout {
    fn on_request(&self, record: RequestRecord) {
        if let Some((last, rest)) = self.0.split_last() {
            for o in rest {
                o.on_request_ref(&record);
            }
            last.on_request(record);
        }
    }
}

/// The agent's telemetry, shared by the data plane and `/metrics`.
#[derive(Debug)]
pub struct Telemetry {
    /// Istio's metrics, `None` when `[telemetry] metrics = false`.
    pub istio: Option<Arc<Istio>>,
    /// The access log, when on.
    pub access_log: Option<Arc<AccessLog>>,
    /// The span exporter, when an endpoint is set.
    pub exporter: Option<Arc<otlp::Exporter>>,
    /// Percent of the traces started at this agent that are sampled.
    pub trace_sampling: f64,
    /// This agent's workload SPIFFE ID.
    pub own_principal: Arc<str>,
}

/// One agent has one telemetry: equal only to itself (settings holding it compare).
impl PartialEq for Telemetry {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for Telemetry {}

impl Telemetry {
    /// The telemetry of the agent `identity` (its SPIFFE ID) in `group`; services are
    /// named in the causeway DNS `domain`.
    pub fn new(
        cfg: &TelemetryConfig,
        identity: &str,
        group: &str,
        domain: &str,
        state: SharedState,
    ) -> Arc<Self> {
        Arc::new(Self::without_logs(cfg, identity, group, domain, state))
    }

    /// The metrics and trace settings of [`Self::new`], with the access log and the span
    /// exporter off.
    fn without_logs(
        cfg: &TelemetryConfig,
        identity: &str,
        group: &str,
        domain: &str,
        state: SharedState,
    ) -> Self {
        let istio = cfg.metrics.then(|| {
            Arc::new(Istio {
                metrics: Arc::new(istio::IstioMetrics::new(cfg.max_series)),
                labeler: istio::Labeler::new(identity, group, domain, state),
            })
        });
        Self {
            istio,
            access_log: None,
            exporter: None,
            trace_sampling: cfg.trace_sampling,
            own_principal: Arc::from(identity),
        }
    }

    /// [`Self::new`] for the agent of `identity`, also starting what `cfg` turns on of
    /// the access log (its writer thread) and the span export (a task: needs a Tokio
    /// runtime); `mark` is the SO_MARK of the exporter's sockets. A part that cannot
    /// start is logged and left off.
    pub fn start(
        cfg: &TelemetryConfig,
        identity: &crate::identity::Identity,
        domain: &str,
        state: SharedState,
        mark: Option<u32>,
    ) -> Arc<Self> {
        let mut this = Self::without_logs(
            cfg,
            &identity.spiffe_id.to_string(),
            &identity.info.group,
            domain,
            state,
        );
        this.access_log = match cfg.access_log {
            AccessLogFormat::Off => None,
            format => AccessLog::start(format, cfg.access_log_sampling, AccessLog::default_sink())
                .inspect_err(|e| tracing::error!(error = %e, "access log not started"))
                .ok()
                .map(Arc::new),
        };
        this.exporter = cfg.otlp_endpoint.as_deref().and_then(|url| {
            let endpoint = otlp::parse_endpoint(url)
                .inspect_err(|why| {
                    tracing::error!(endpoint = url, "span export off: the endpoint {why}")
                })
                .ok()?;
            let namespace = identity.spiffe_id.namespace().to_owned();
            let resource = otlp::ResourceInfo {
                service_name: format!("{}.{namespace}", identity.info.group),
                namespace,
                agent_id: identity.info.agent_id.clone(),
            };
            Some(Arc::new(otlp::Exporter::start(endpoint, resource, mark)))
        });
        Arc::new(this)
    }

    /// The observer of an HTTP proxy at `scope`: the debug log line, and each enabled
    /// consumer (Istio metrics; the access log and the span export, which only queue).
    pub fn http_observer(&self, scope: Scope) -> Arc<dyn Observer> {
        let mut all: Vec<Arc<dyn Observer>> =
            vec![Arc::new(crate::dataplane::outbound::LogObserver)];
        if let Some(i) = &self.istio {
            all.push(Arc::new(istio::IstioObserver::new(i.clone(), scope)));
        }
        if self.access_log.is_some() || self.exporter.is_some() {
            all.push(Arc::new(RequestLogObserver {
                access_log: self.access_log.clone(),
                exporter: self.exporter.clone(),
            }));
        }
        Arc::new(Fanout(all))
    }

    /// The HTTP proxy settings of one side: the source agent starts traces (sampled at
    /// `trace_sampling`), the destination only continues them; both record this agent's
    /// identity as their end's principal.
    pub fn http_settings(&self, side: Side) -> HttpSettings {
        HttpSettings {
            side,
            trace: trace::TraceSettings {
                start_sampling: (side == Side::Source).then_some(self.trace_sampling),
            },
            own_identity: Some(self.own_principal.clone()),
            ..HttpSettings::default()
        }
    }

    /// Starts the access log record of a spliced connection accepted now; `None` when the
    /// access log is off.
    pub fn tcp_start(&self, side: Side) -> Option<TcpStart> {
        let log = self.access_log.clone()?;
        Some(TcpStart {
            log,
            side,
            start: std::time::SystemTime::now(),
            started: std::time::Instant::now(),
            source_principal: None,
            destination_principal: None,
            upstream_host: None,
        })
    }

    /// Adds the telemetry's metrics to `reg`: Istio's, and the access log's and span
    /// export's own counters.
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        if let Some(i) = &self.istio {
            reg.register_collector(Box::new(istio::IstioCollector(i.metrics.clone())));
        }
        if self.access_log.is_some() || self.exporter.is_some() {
            reg.register_collector(Box::new(TelemetryCollector {
                access_log: self.access_log.clone(),
                exporter: self.exporter.clone(),
            }));
        }
    }
}

/// Hands each HTTP record to the access log and the span exporter (each only queues).
#[derive(Debug)]
struct RequestLogObserver {
    access_log: Option<Arc<AccessLog>>,
    exporter: Option<Arc<otlp::Exporter>>,
}

impl Observer for RequestLogObserver {
    fn on_request(&self, record: RequestRecord) {
        self.on_request_ref(&record);
    }

    fn on_request_ref(&self, record: &RequestRecord) {
        if let Some(log) = &self.access_log {
            log.http(record);
        }
        if let Some(e) = &self.exporter {
            e.record(record);
        }
    }
}

/// What is known of a spliced connection while it runs, for its access log entry (made
/// only when the access log is on, [`Telemetry::tcp_start`]; held next to the
/// connection's [`TcpConn`]).
#[derive(Debug)]
pub struct TcpStart {
    log: Arc<AccessLog>,
    side: Side,
    start: std::time::SystemTime,
    started: std::time::Instant,
    /// The client's SPIFFE ID.
    pub source_principal: Option<Arc<str>>,
    /// The server's SPIFFE ID.
    pub destination_principal: Option<Arc<str>>,
    /// Where it goes (`ip:port`).
    pub upstream_host: Option<String>,
}

impl TcpStart {
    /// Logs the finished connection: `bytes_received` from the client, `bytes_sent` to it.
    pub fn finish(self, bytes_received: u64, bytes_sent: u64) {
        self.log.tcp(TcpRecord {
            side: self.side,
            start: self.start,
            duration: self.started.elapsed(),
            bytes_received,
            bytes_sent,
            upstream_host: self.upstream_host,
            source_principal: self.source_principal,
            destination_principal: self.destination_principal,
            response_flags: crate::dataplane::http::ResponseFlags::NONE,
        });
    }
}

/// The access log's and span export's own counters on `/metrics` (read at each
/// scrape): access log entries and spans dropped, spans exported.
#[derive(Debug)]
struct TelemetryCollector {
    access_log: Option<Arc<AccessLog>>,
    exporter: Option<Arc<otlp::Exporter>>,
}

impl prometheus_client::collector::Collector for TelemetryCollector {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use causeway_telemetry::metrics::{Labels, const_counter};
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(log) = &self.access_log {
            const_counter(
                &mut enc,
                "causeway_agent_access_log_dropped",
                "Access log entries dropped because the writer fell behind (its queue was full).",
                &[(Labels::new(), log.dropped())],
            )?;
        }
        if let Some(e) = &self.exporter {
            let s = e.stats();
            const_counter(
                &mut enc,
                "causeway_agent_spans_exported",
                "Spans accepted by the OTLP collector.",
                &[(Labels::new(), s.exported.load(Relaxed))],
            )?;
            const_counter(
                &mut enc,
                "causeway_agent_spans_dropped",
                "Spans dropped, by reason (queue_full: the export queue was full; export_failed: the collector did not take the batch).",
                &[
                    (
                        vec![("reason", "queue_full".to_owned())],
                        s.dropped_queue_full.load(Relaxed),
                    ),
                    (
                        vec![("reason", "export_failed".to_owned())],
                        s.dropped_export_failed.load(Relaxed),
                    ),
                ],
            )?;
        }
        Ok(())
    }
}

/// `GET /metrics` only, for clients in `allow`.
fn handle_metrics<B>(
    req: &Request<B>,
    peer: SocketAddr,
    allow: &[IpNet],
    health: &Arc<crate::health::Health>,
) -> Response<String> {
    use causeway_telemetry::http::reply;
    const PLAIN: &str = "text/plain; charset=utf-8";
    let ip = peer.ip().to_canonical();
    if !allow.iter().any(|n| n.contains(&ip)) {
        return reply(
            StatusCode::FORBIDDEN,
            PLAIN,
            format!("{ip} is not in telemetry.metrics_allow\n"),
        );
    }
    if req.uri().path() != "/metrics" || req.uri().authority().is_some() {
        return reply(
            StatusCode::NOT_FOUND,
            PLAIN,
            format!(
                "no such path {:?}; only /metrics is served here\n",
                req.uri().path()
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
    let ctype = causeway_telemetry::metrics::negotiate(causeway_telemetry::http::accept(req));
    reply(
        StatusCode::OK,
        ctype,
        causeway_telemetry::metrics::encode(&health.registry(), ctype),
    )
}

/// Serves `/metrics` (only) on `[telemetry] metrics_listen` to the networks of
/// `metrics_allow`; `None` when not configured. Returns the bound address.
pub async fn serve_metrics(
    cfg: &TelemetryConfig,
    health: Arc<crate::health::Health>,
) -> std::io::Result<Option<(SocketAddr, tokio::task::JoinHandle<()>)>> {
    let Some(listen) = cfg.metrics_listen else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot listen on telemetry.metrics_listen {listen}: {e}; another program holds it, or the address is not this host's"
            ),
        )
    })?;
    let addr = listener.local_addr()?;
    let allow = cfg.metrics_allow.clone();
    tracing::info!(%addr, allow = ?allow, "metrics endpoint for remote scrapers listening");
    let task = causeway_telemetry::http::serve(listener, move |req, peer| {
        handle_metrics(req, peer, &allow, &health)
    });
    Ok(Some((addr, task)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(toml_text: &str) -> Vec<String> {
        #[derive(Deserialize)]
        struct W {
            telemetry: TelemetryConfig,
        }
        let w: W = toml::from_str(toml_text).unwrap();
        let mut e = Vec::new();
        w.telemetry
            .validate(SocketAddr::from(([127, 0, 0, 1], 15020)), &mut e);
        e
    }

    #[test]
    fn the_section_is_checked() {
        assert!(problems("[telemetry]\n").is_empty());
        assert!(
            problems("[telemetry]\nmetrics_listen = \"0.0.0.0:15090\"\nmetrics_allow = [\"10.0.0.0/8\"]\nmax_series = 500\n")
                .is_empty()
        );
        let e = problems("[telemetry]\nmax_series = 0\nmetrics_listen = \"0.0.0.0:15020\"\n");
        assert_eq!(e.len(), 3, "{e:#?}");
        assert!(e[0].contains("telemetry.max_series = 0"), "{e:#?}");
        assert!(e[1].contains("health.listen"), "{e:#?}");
        assert!(e[2].contains("metrics_allow = [\"10.0.0.0/8\"]"), "{e:#?}");
        let e = problems("[telemetry]\nmetrics_allow = [\"10.0.0.0/8\"]\n");
        assert!(e.len() == 1 && e[0].contains("metrics_listen"), "{e:#?}");
        let e = problems(
            "[telemetry]\nmetrics_listen = \"10.0.0.1:0\"\nmetrics_allow = [\"10.0.0.0/8\"]\n",
        );
        assert!(e.len() == 1 && e[0].contains("fixed port"), "{e:#?}");
    }

    /// Every observer of a fan-out sees each record once.
    #[test]
    fn a_fanout_hands_each_record_to_every_observer() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        #[derive(Default)]
        struct Count(AtomicUsize);
        impl Observer for Count {
            fn on_request(&self, r: RequestRecord) {
                assert_eq!(r.path, "/x");
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let all: Vec<Arc<Count>> = (0..3).map(|_| Arc::default()).collect();
        let fan = Fanout(all.iter().map(|c| c.clone() as Arc<dyn Observer>).collect());
        fan.on_request(RequestRecord {
            side: crate::dataplane::http::Side::Source,
            start: std::time::SystemTime::now(),
            method: "GET".into(),
            authority: String::new(),
            path: "/x".into(),
            protocol: "HTTP/1.1",
            response_code: 200,
            grpc_status: None,
            response_flags: Default::default(),
            subset: None,
            request_bytes: 0,
            response_bytes: 0,
            duration: Default::default(),
            upstream_host: None,
            trace_headers: Vec::new(),
            conn: Default::default(),
            source_principal: None,
            destination_principal: None,
            trace: None,
        });
        assert!(all.iter().all(|c| c.0.load(Ordering::Relaxed) == 1));
    }

    /// `metrics = false`: no Istio series, no Istio families on `/metrics`, and the
    /// proxies' observer only logs.
    #[test]
    fn metrics_off_records_nothing() {
        let cfg = TelemetryConfig {
            metrics: false,
            ..TelemetryConfig::default()
        };
        let t = Telemetry::new(
            &cfg,
            "spiffe://causeway.local/ns/a/sa/b",
            "g",
            "causeway",
            SharedState::new(Default::default()),
        );
        assert!(t.istio.is_none());
        let mut reg = prometheus_client::registry::Registry::default();
        t.register(&mut reg);
        let text =
            causeway_telemetry::metrics::encode(&reg, causeway_telemetry::metrics::PROMETHEUS_TEXT);
        assert!(!text.contains("istio_"), "{text}");
        let on = Telemetry::new(
            &TelemetryConfig::default(),
            "spiffe://causeway.local/ns/a/sa/b",
            "g",
            "causeway",
            SharedState::new(Default::default()),
        );
        let mut reg = prometheus_client::registry::Registry::default();
        on.register(&mut reg);
        let text =
            causeway_telemetry::metrics::encode(&reg, causeway_telemetry::metrics::PROMETHEUS_TEXT);
        assert!(
            text.contains("# TYPE istio_requests_total counter"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn metrics_listen_serves_only_metrics_to_allowed_networks() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let health = crate::health::Health::new();
        let get = |addr: SocketAddr, path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let cfg = TelemetryConfig {
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            metrics_allow: vec!["127.0.0.0/8".parse().unwrap()],
            ..TelemetryConfig::default()
        };
        let (addr, task) = serve_metrics(&cfg, health.clone()).await.unwrap().unwrap();
        let ok = get(addr, "/metrics").await;
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.contains("causeway_agent_ready"),
            "{ok}"
        );
        let other = get(addr, "/healthz/ready").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let logging = get(addr, "/logging").await;
        assert!(logging.starts_with("HTTP/1.1 404"), "{logging}");
        task.abort();
        let cfg = TelemetryConfig {
            metrics_allow: vec!["10.0.0.0/8".parse().unwrap()],
            ..cfg
        };
        let (addr, task) = serve_metrics(&cfg, health).await.unwrap().unwrap();
        let refused = get(addr, "/metrics").await;
        assert!(
            refused.starts_with("HTTP/1.1 403")
                && refused.contains("127.0.0.1 is not in telemetry.metrics_allow"),
            "{refused}"
        );
        task.abort();
    }
}
