//! Access logs (`[telemetry] access_log = "text"|"json"`): one entry per HTTP request and
//! per proxied TCP connection, from each agent that handled it (`reporter` source or
//! destination), with Envoy's fields.
//!
//! Text, after Envoy's default format:
//!
//! ```text
//! [2026-12-07T07:20:00.123Z] "GET /r0 HTTP/1.1" 200 - 0 31 2 "web.default:8080" "10.77.0.3:8080" reporter=source source_principal=spiffe://causeway.local/ns/default/sa/client destination_principal=spiffe://causeway.local/ns/default/sa/web trace_id=4bf92f3577b34da6a3ce929d0e0e4736
//! ```
//!
//! (start time, `"method path protocol"`, status, response flags, bytes received from
//! and sent to the client, duration in milliseconds, authority, upstream host, then the
//! reporter, principals and trace id; `-` for what is unknown). A TCP connection reads
//! `"- - -" 0 FLAGS ...` as in Envoy. JSON: one object per line with the keys of Istio's
//! JSON access log (`start_time`, `method`, `path`, `protocol`, `response_code`,
//! `response_flags`, `bytes_received`, `bytes_sent`, `duration`, `authority`,
//! `upstream_host`) and `reporter`, `grpc_status`, `source_principal`,
//! `destination_principal`, `trace_id`; null for what is unknown.
//!
//! A request the source agent's route sent to a DestinationRule subset (issue 21) also
//! carries `destination_subset` and `destination_version` (the subset's `version` label):
//! JSON keys (null otherwise), and at the end of the text line
//! (`… trace_id=… destination_subset=v2 destination_version=v2`; absent otherwise).
//!
//! Where: the systemd journal when the agent's stderr is connected to it (one entry per
//! record, `SYSLOG_IDENTIFIER=causeway-access-log`, the fields as journal fields:
//! `journalctl -t causeway-access-log RESPONSE_CODE=503`), stdout otherwise. Entries are
//! written by a thread of their own from a bounded queue ([`QUEUE`]): the request path
//! only samples and `try_send`s; when the writer falls behind, entries are dropped and
//! counted, never waited for.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::dataplane::http::{RequestRecord, ResponseFlags, Side};

/// Entries waiting for the writer, at most.
pub const QUEUE: usize = 8192;

/// `[telemetry] access_log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// No access log.
    #[default]
    Off,
    /// Envoy's text format.
    Text,
    /// One JSON object per line.
    Json,
}

/// One proxied TCP connection (spliced, not parsed), as an agent saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpRecord {
    /// Which agent.
    pub side: Side,
    /// When the connection was accepted.
    pub start: SystemTime,
    /// Until both directions were done.
    pub duration: Duration,
    /// Bytes from the client (downstream).
    pub bytes_received: u64,
    /// Bytes to the client.
    pub bytes_sent: u64,
    /// Where it went (`ip:port`).
    pub upstream_host: Option<String>,
    /// The client's SPIFFE ID when known.
    pub source_principal: Option<Arc<str>>,
    /// The server's SPIFFE ID when known.
    pub destination_principal: Option<Arc<str>>,
    /// What went wrong, Envoy style.
    pub response_flags: ResponseFlags,
}

enum Entry {
    // Boxed: a request's record is three times a connection's, and the queue holds many.
    Http(Box<RequestRecord>),
    Tcp(TcpRecord),
}

/// Where entries go.
pub enum Sink {
    /// The systemd journal, through this layer.
    Journal(tracing_journald::Layer),
    /// Lines on this writer (stdout in the agent).
    Lines(Box<dyn std::io::Write + Send>),
}

/// The access log (module docs).
#[derive(Debug)]
pub struct AccessLog {
    tx: mpsc::SyncSender<Entry>,
    /// Percent of records logged.
    sampling: f64,
    dropped: AtomicU64,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Entry")
    }
}

impl AccessLog {
    /// Starts the writer thread: `format` (not [`AccessLogFormat::Off`]) to `sink`,
    /// `sampling` percent (0–100) of the records.
    pub fn start(format: AccessLogFormat, sampling: f64, sink: Sink) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(&rx, format, sink))?;
        Ok(Self {
            tx,
            sampling,
            dropped: AtomicU64::new(0),
            writer: Some(writer),
        })
    }

    /// Writes what is queued, then stops the writer.
    pub fn finish(mut self) {
        let writer = self.writer.take();
        drop(self);
        if let Some(w) = writer {
            let _ = w.join();
        }
    }

    /// The sink for this process: the journal when stderr goes to it, else stdout.
    pub fn default_sink() -> Sink {
        if causeway_telemetry::output() == causeway_telemetry::Output::Journal {
            match tracing_journald::layer() {
                Ok(l) => {
                    return Sink::Journal(
                        l.with_syslog_identifier("causeway-access-log".into())
                            .with_field_prefix(None),
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write the access log to the journal; writing it to stdout")
                }
            }
        }
        Sink::Lines(Box::new(std::io::stdout()))
    }

    fn send(&self, e: Entry) {
        if !crate::telemetry::trace::chance(self.sampling) {
            return;
        }
        if self.tx.try_send(e).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Logs a finished HTTP request (sampled; never waits).
    pub fn http(&self, r: &RequestRecord) {
        self.send(Entry::Http(Box::new(r.clone())));
    }

    /// Logs a finished TCP connection (sampled; never waits).
    pub fn tcp(&self, r: TcpRecord) {
        self.send(Entry::Tcp(r));
    }

    /// Entries dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The fields of one entry, in order.
#[derive(Debug, Clone, PartialEq)]
struct Fields {
    start_time: String,
    method: Option<String>,
    path: Option<String>,
    protocol: Option<&'static str>,
    response_code: u16,
    grpc_status: Option<u32>,
    response_flags: String,
    bytes_received: u64,
    bytes_sent: u64,
    duration: u64,
    authority: Option<String>,
    upstream_host: Option<String>,
    reporter: &'static str,
    source_principal: Option<String>,
    destination_principal: Option<String>,
    trace_id: Option<String>,
    destination_subset: Option<String>,
    destination_version: Option<String>,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

impl Fields {
    fn of(e: &Entry) -> Self {
        match e {
            Entry::Http(r) => Self {
                start_time: humantime::format_rfc3339_millis(r.start).to_string(),
                method: non_empty(&r.method),
                path: non_empty(&r.path),
                protocol: Some(r.protocol),
                response_code: r.response_code,
                grpc_status: r.grpc_status,
                response_flags: r.response_flags.to_string(),
                bytes_received: r.request_bytes,
                bytes_sent: r.response_bytes,
                duration: r.duration.as_millis() as u64,
                authority: non_empty(&r.authority),
                upstream_host: r.upstream_host.clone(),
                reporter: r.side.as_str(),
                source_principal: r.source_principal.as_deref().map(str::to_owned),
                destination_principal: r.destination_principal.as_deref().map(str::to_owned),
                trace_id: r.trace.as_ref().map(|t| t.trace_id_hex()),
                destination_subset: r.subset.as_ref().map(|s| s.name.to_string()),
                destination_version: r
                    .subset
                    .as_ref()
                    .and_then(|s| s.version.as_deref())
                    .map(str::to_owned),
            },
            Entry::Tcp(r) => Self {
                start_time: humantime::format_rfc3339_millis(r.start).to_string(),
                method: None,
                path: None,
                protocol: None,
                response_code: 0,
                grpc_status: None,
                response_flags: r.response_flags.to_string(),
                bytes_received: r.bytes_received,
                bytes_sent: r.bytes_sent,
                duration: r.duration.as_millis() as u64,
                authority: None,
                upstream_host: r.upstream_host.clone(),
                reporter: r.side.as_str(),
                source_principal: r.source_principal.as_deref().map(str::to_owned),
                destination_principal: r.destination_principal.as_deref().map(str::to_owned),
                trace_id: None,
                destination_subset: None,
                destination_version: None,
            },
        }
    }

    fn text(&self) -> String {
        let d = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        let mut line = format!(
            "[{}] \"{} {} {}\" {} {} {} {} {} \"{}\" \"{}\" reporter={} source_principal={} destination_principal={} trace_id={}",
            self.start_time,
            d(&self.method),
            d(&self.path),
            self.protocol.unwrap_or("-"),
            self.response_code,
            self.response_flags,
            self.bytes_received,
            self.bytes_sent,
            self.duration,
            d(&self.authority),
            d(&self.upstream_host),
            self.reporter,
            d(&self.source_principal),
            d(&self.destination_principal),
            d(&self.trace_id),
        );
        // Only for a request routed to a subset: other lines keep their shape.
        if let Some(subset) = &self.destination_subset {
            line.push_str(&format!(
                " destination_subset={subset} destination_version={}",
                d(&self.destination_version)
            ));
        }
        line
    }

    fn json(&self) -> String {
        serde_json::json!({
            "start_time": self.start_time,
            "method": self.method,
            "path": self.path,
            "protocol": self.protocol,
            "response_code": self.response_code,
            "grpc_status": self.grpc_status,
            "response_flags": self.response_flags,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "duration": self.duration,
            "authority": self.authority,
            "upstream_host": self.upstream_host,
            "reporter": self.reporter,
            "source_principal": self.source_principal,
            "destination_principal": self.destination_principal,
            "trace_id": self.trace_id,
            "destination_subset": self.destination_subset,
            "destination_version": self.destination_version,
        })
        .to_string()
    }

    /// One journal entry: the line as the message, the fields as journal fields.
    fn emit(&self, line: &str) {
        let none = "-";
        tracing::info!(
            target: "causeway_access_log",
            reporter = self.reporter,
            method = self.method.as_deref().unwrap_or(none),
            path = self.path.as_deref().unwrap_or(none),
            protocol = self.protocol.unwrap_or(none),
            response_code = self.response_code,
            grpc_status = self.grpc_status.map(i64::from).unwrap_or(-1),
            response_flags = %self.response_flags,
            bytes_received = self.bytes_received,
            bytes_sent = self.bytes_sent,
            duration = self.duration,
            authority = self.authority.as_deref().unwrap_or(none),
            upstream_host = self.upstream_host.as_deref().unwrap_or(none),
            source_principal = self.source_principal.as_deref().unwrap_or(none),
            destination_principal = self.destination_principal.as_deref().unwrap_or(none),
            trace_id = self.trace_id.as_deref().unwrap_or(none),
            destination_subset = self.destination_subset.as_deref().unwrap_or(none),
            destination_version = self.destination_version.as_deref().unwrap_or(none),
            "{line}"
        );
    }
}

fn format_line(format: AccessLogFormat, f: &Fields) -> String {
    match format {
        AccessLogFormat::Json => f.json(),
        _ => f.text(),
    }
}

fn write_loop(rx: &mpsc::Receiver<Entry>, format: AccessLogFormat, sink: Sink) {
    match sink {
        Sink::Journal(layer) => {
            use tracing_subscriber::layer::SubscriberExt as _;
            // This thread's own subscriber: the access log does not depend on RUST_LOG.
            let subscriber = tracing_subscriber::registry().with(layer);
            tracing::subscriber::with_default(subscriber, || {
                while let Ok(e) = rx.recv() {
                    let f = Fields::of(&e);
                    f.emit(&format_line(format, &f));
                }
            });
        }
        Sink::Lines(w) => {
            let mut w = std::io::BufWriter::new(w);
            while let Ok(e) = rx.recv() {
                let mut write = |e: &Entry| {
                    let f = Fields::of(e);
                    let _ = writeln!(w, "{}", format_line(format, &f));
                };
                write(&e);
                // Whatever else is queued goes out in the same write.
                while let Ok(e) = rx.try_recv() {
                    write(&e);
                }
                let _ = w.flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::trace::SpanRecord;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record() -> RequestRecord {
        RequestRecord {
            side: Side::Destination,
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_765_000_000_123),
            method: "GET".into(),
            authority: "web.default:8080".into(),
            path: "/r0".into(),
            protocol: "HTTP/1.1",
            response_code: 200,
            grpc_status: None,
            response_flags: ResponseFlags::NONE,
            subset: None,
            request_bytes: 0,
            response_bytes: 31,
            duration: Duration::from_millis(2),
            upstream_host: Some("127.0.0.1:8080".into()),
            trace_headers: vec![],
            conn: Default::default(),
            source_principal: Some("spiffe://causeway.local/ns/default/sa/client".into()),
            destination_principal: Some("spiffe://causeway.local/ns/default/sa/web".into()),
            trace: Some(SpanRecord {
                trace_id: [0xab; 16],
                span_id: [1; 8],
                parent_span_id: None,
                sampled: false,
                trace_state: None,
            }),
        }
    }

    fn lines(format: AccessLogFormat, sampling: f64, n: usize) -> Vec<String> {
        let buf = Buf::default();
        let log = AccessLog::start(format, sampling, Sink::Lines(Box::new(buf.clone()))).unwrap();
        for _ in 0..n {
            log.http(&record());
        }
        log.tcp(TcpRecord {
            side: Side::Source,
            start: SystemTime::UNIX_EPOCH,
            duration: Duration::from_millis(1500),
            bytes_received: 5,
            bytes_sent: 7,
            upstream_host: Some("10.0.0.2:9090".into()),
            source_principal: None,
            destination_principal: None,
            response_flags: ResponseFlags::NONE,
        });
        log.finish();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn text_lines_carry_envoys_fields_principals_and_trace_id() {
        let l = lines(AccessLogFormat::Text, 100.0, 1);
        assert_eq!(
            l,
            vec![
                "[2025-12-06T05:46:40.123Z] \"GET /r0 HTTP/1.1\" 200 - 0 31 2 \"web.default:8080\" \"127.0.0.1:8080\" reporter=destination source_principal=spiffe://causeway.local/ns/default/sa/client destination_principal=spiffe://causeway.local/ns/default/sa/web trace_id=abababababababababababababababab",
                "[1970-01-01T00:00:00.000Z] \"- - -\" 0 - 5 7 1500 \"-\" \"10.0.0.2:9090\" reporter=source source_principal=- destination_principal=- trace_id=-",
            ]
        );
    }

    #[test]
    fn json_lines_have_istios_keys_and_nulls_for_unknowns() {
        let l = lines(AccessLogFormat::Json, 100.0, 1);
        let http: serde_json::Value = serde_json::from_str(&l[0]).unwrap();
        assert_eq!(http["response_code"], 200);
        assert_eq!(http["response_flags"], "-");
        assert_eq!(http["trace_id"], "abababababababababababababababab");
        assert_eq!(
            http["source_principal"],
            "spiffe://causeway.local/ns/default/sa/client"
        );
        assert_eq!(http["grpc_status"], serde_json::Value::Null);
        let tcp: serde_json::Value = serde_json::from_str(&l[1]).unwrap();
        assert_eq!(tcp["method"], serde_json::Value::Null);
        assert_eq!(
            (tcp["bytes_received"].as_u64(), tcp["bytes_sent"].as_u64()),
            (Some(5), Some(7))
        );
    }

    #[test]
    fn a_request_routed_to_a_subset_logs_the_subset_and_its_version() {
        let buf = Buf::default();
        let log = AccessLog::start(
            AccessLogFormat::Text,
            100.0,
            Sink::Lines(Box::new(buf.clone())),
        )
        .unwrap();
        let mut r = record();
        r.subset = Some(crate::dataplane::http::SubsetRecord {
            name: Arc::from("canary"),
            version: Some(Arc::from("v2")),
        });
        log.http(&r);
        log.finish();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.trim_end().ends_with(
                "trace_id=abababababababababababababababab destination_subset=canary destination_version=v2"
            ),
            "{text}"
        );
        let f = Fields::of(&Entry::Http(Box::new(r)));
        let json: serde_json::Value = serde_json::from_str(&f.json()).unwrap();
        assert_eq!(json["destination_subset"], "canary");
        assert_eq!(json["destination_version"], "v2");
        let plain: serde_json::Value =
            serde_json::from_str(&Fields::of(&Entry::Http(Box::new(record()))).json()).unwrap();
        assert_eq!(plain["destination_version"], serde_json::Value::Null);
    }

    #[test]
    fn sampling_zero_logs_nothing() {
        let l = lines(AccessLogFormat::Text, 0.0, 50);
        assert!(l.is_empty(), "{l:?}");
    }
}
