//! Request telemetry of the data plane (issue 20), `[telemetry]` in agent.toml: access
//! logs ([`access_log`]), trace context propagation ([`trace`]) and span export over
//! OTLP ([`otlp`]).
//!
//! [`install`] sets it up once per process (in `run`); the data plane then takes its
//! pieces from here: [`observer`] for the HTTP proxies' [`Observer`], [`http_settings`] for
//! their trace handling, [`own_principal`] for the records, and [`on_tcp`] for spliced
//! connections. Without [`install`] (unit tests, tools) they do nothing but the debug
//! log of [`crate::dataplane::outbound::LogObserver`].

pub mod access_log;
pub mod otlp;
pub mod trace;

use std::sync::{Arc, OnceLock};

use crate::dataplane::http::{HttpSettings, Observer, RequestRecord, Side};

pub use access_log::{AccessLog, AccessLogFormat, TcpRecord};

/// What the agent's telemetry does, from `[telemetry]`.
#[derive(Debug)]
pub struct Telemetry {
    /// The access log, when on.
    pub access_log: Option<AccessLog>,
    /// The span exporter, when an endpoint is set.
    pub exporter: Option<otlp::Exporter>,
    /// Percent of the traces started at this agent that are sampled.
    pub trace_sampling: f64,
    /// This agent's workload SPIFFE ID.
    pub own_principal: Arc<str>,
}

static GLOBAL: OnceLock<Arc<Telemetry>> = OnceLock::new();

/// Installs the process's telemetry (the first call wins).
pub fn install(t: Telemetry) -> Arc<Telemetry> {
    GLOBAL.get_or_init(|| Arc::new(t)).clone()
}

/// The installed telemetry.
pub fn get() -> Option<&'static Arc<Telemetry>> {
    GLOBAL.get()
}

/// This agent's workload SPIFFE ID, once installed.
pub fn own_principal() -> Option<Arc<str>> {
    get().map(|t| t.own_principal.clone())
}

/// The HTTP proxy settings of one side: the source agent starts traces (sampled at
/// `trace_sampling`), the destination only continues them.
pub fn http_settings(side: Side) -> HttpSettings {
    let start_sampling = match (side, get()) {
        (Side::Source, Some(t)) => Some(t.trace_sampling),
        _ => None,
    };
    HttpSettings {
        side,
        trace: trace::TraceSettings { start_sampling },
        ..HttpSettings::default()
    }
}

/// What is known of a spliced connection while it runs, for its access log entry.
/// Boxed and made only when the access log is on ([`tcp_start`]): a connection's task
/// then carries one pointer for it.
#[derive(Debug)]
pub struct TcpStart {
    start: std::time::SystemTime,
    started: std::time::Instant,
    /// The client's SPIFFE ID.
    pub source_principal: Option<Arc<str>>,
    /// The server's SPIFFE ID.
    pub destination_principal: Option<Arc<str>>,
    /// Where it goes (`ip:port`).
    pub upstream_host: Option<String>,
}

/// Starts the record of a spliced connection accepted now; `None` when the access log is
/// off.
pub fn tcp_start() -> Option<Box<TcpStart>> {
    get()?.access_log.as_ref()?;
    Some(Box::new(TcpStart {
        start: std::time::SystemTime::now(),
        started: std::time::Instant::now(),
        source_principal: None,
        destination_principal: None,
        upstream_host: None,
    }))
}

impl TcpStart {
    /// Logs the finished connection (when `start` is some): `bytes_received` from the
    /// client, `bytes_sent` to it. Takes the option whole, so that the connection's task
    /// needs no drop flag for it.
    pub fn finish_opt(start: Option<Box<Self>>, side: Side, bytes_received: u64, bytes_sent: u64) {
        let Some(this) = start else { return };
        let this = *this;
        on_tcp(TcpRecord {
            side,
            start: this.start,
            duration: this.started.elapsed(),
            bytes_received,
            bytes_sent,
            upstream_host: this.upstream_host,
            source_principal: this.source_principal,
            destination_principal: this.destination_principal,
            response_flags: crate::dataplane::http::ResponseFlags::NONE,
        });
    }
}

/// A finished spliced connection.
pub fn on_tcp(record: TcpRecord) {
    if let Some(log) = get().and_then(|t| t.access_log.as_ref()) {
        log.tcp(record);
    }
}

/// The observer of the HTTP proxies: the debug log line, the access log and the span
/// export, each of which only queues (never waits).
#[derive(Debug)]
pub struct TelemetryObserver {
    telemetry: Option<Arc<Telemetry>>,
}

impl Observer for TelemetryObserver {
    fn on_request(&self, record: RequestRecord) {
        if let Some(t) = &self.telemetry {
            if let Some(log) = &t.access_log {
                log.http(&record);
            }
            if let Some(e) = &t.exporter {
                e.record(&record);
            }
        }
        crate::dataplane::outbound::LogObserver.on_request(record);
    }
}

/// The observer for a new HTTP proxy.
pub fn observer() -> Arc<dyn Observer> {
    Arc::new(TelemetryObserver {
        telemetry: get().cloned(),
    })
}

/// Starts what `cfg` turns on (the access log's writer thread, the span export task;
/// needs a Tokio runtime) for the agent of `identity`; `mark` is the SO_MARK of the
/// exporter's sockets. A part that cannot start is logged and left off.
pub fn start(
    cfg: &crate::config::TelemetryConfig,
    identity: &crate::identity::Identity,
    mark: Option<u32>,
) -> Telemetry {
    let access_log = match cfg.access_log {
        AccessLogFormat::Off => None,
        format => AccessLog::start(format, cfg.access_log_sampling, AccessLog::default_sink())
            .inspect_err(|e| tracing::error!(error = %e, "access log not started"))
            .ok(),
    };
    let exporter = cfg.otlp_endpoint.as_deref().and_then(|url| {
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
        Some(otlp::Exporter::start(endpoint, resource, mark))
    });
    Telemetry {
        access_log,
        exporter,
        trace_sampling: cfg.trace_sampling,
        own_principal: Arc::from(identity.spiffe_id.to_string()),
    }
}

/// The telemetry's own counters on `/metrics` (read at each scrape): access log entries
/// and spans dropped, spans exported.
#[derive(Debug)]
pub struct TelemetryCollector;

impl prometheus_client::collector::Collector for TelemetryCollector {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use causeway_telemetry::metrics::{Labels, const_counter};
        use std::sync::atomic::Ordering::Relaxed;
        let Some(t) = get() else { return Ok(()) };
        if let Some(log) = &t.access_log {
            const_counter(
                &mut enc,
                "causeway_agent_access_log_dropped",
                "Access log entries dropped because the writer fell behind (its queue was full).",
                &[(Labels::new(), log.dropped())],
            )?;
        }
        if let Some(e) = &t.exporter {
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
