//! Telemetry of the proxied traffic (`[telemetry]` in agent.toml): Istio's standard
//! metrics ([`istio`]) on `/metrics`, with a cap on their series ([`series`]), and
//! `/metrics` on a routable address for a remote Prometheus ([`serve_metrics`],
//! `metrics_listen` and `metrics_allow`), which the agent reports to the controller so
//! that its Prometheus service discovery lists it.
//!
//! Observers of HTTP requests are composed with [`Fanout`]: [`Telemetry::http_observer`]
//! gives every proxy one observer that hands each record to each enabled consumer.

pub mod edges;
pub mod istio;
pub mod series;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use ipnet::IpNet;
use serde::Deserialize;

use crate::dataplane::http::{Observer, RequestRecord};
use crate::push::SharedState;
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
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            metrics: true,
            max_series: 10_000,
            metrics_listen: None,
            metrics_allow: Vec::new(),
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
        let istio = cfg.metrics.then(|| {
            Arc::new(Istio {
                metrics: Arc::new(istio::IstioMetrics::new(cfg.max_series)),
                labeler: istio::Labeler::new(identity, group, domain, state),
            })
        });
        Arc::new(Self { istio })
    }

    /// The observer of an HTTP proxy at `scope`: the debug log line, and each enabled
    /// consumer (Istio metrics).
    pub fn http_observer(&self, scope: Scope) -> Arc<dyn Observer> {
        let mut all: Vec<Arc<dyn Observer>> =
            vec![Arc::new(crate::dataplane::outbound::LogObserver)];
        if let Some(i) = &self.istio {
            all.push(Arc::new(istio::IstioObserver::new(i.clone(), scope)));
        }
        Arc::new(Fanout(all))
    }

    /// Adds the telemetry's metrics to `reg`.
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        if let Some(i) = &self.istio {
            reg.register_collector(Box::new(istio::IstioCollector(i.metrics.clone())));
        }
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
            request_bytes: 0,
            response_bytes: 0,
            duration: Default::default(),
            upstream_host: None,
            trace_headers: Vec::new(),
            conn: Default::default(),
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
