//! Health, readiness and Prometheus metrics on `127.0.0.1:15020`, and systemd readiness
//! (`sd_notify`).
//!
//! - `GET /healthz/live`: 200 while the process serves requests.
//! - `GET /healthz/ready`: 200 only when the agent has an identity, a config (from the
//!   controller or the disk cache) and its data plane is up; otherwise 503 with the
//!   reason in the body. Ansible and load balancers wait on it.
//! - `GET /metrics`: a few honest gauges and counters in the Prometheus text format.
//!
//! The responder is a small hand-written HTTP/1.1 server (one request per connection,
//! `Connection: close`): the agent needs three fixed GET routes, not an HTTP framework.
//! Malformed requests get 400, oversized heads 431, other methods 405, other paths 404.
//!
//! When the agent becomes ready it sends `READY=1` to `$NOTIFY_SOCKET` (the unit is
//! `Type=notify`, so `systemctl start` returns only once the agent can serve), and
//! `STOPPING=1` when it begins to shut down. Not here: the watchdog.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head accepted (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// `[health]` in the agent config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Serve `/healthz/ready`, `/healthz/live` and `/metrics`.
    pub enabled: bool,
    /// Address of the health and metrics endpoint; loopback by default (the design's
    /// port 15020). Use "0.0.0.0:15020" to let a remote Prometheus scrape it.
    pub listen: SocketAddr,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 15020)),
        }
    }
}

/// The agent's health, updated by the run loop and read by the endpoint.
#[derive(Debug, Default)]
pub struct Health {
    identity: AtomicBool,
    dataplane: AtomicBool,
    config: AtomicBool,
    config_version: AtomicU64,
    controller_connected: AtomicBool,
    cert_not_after: AtomicI64,
    full_updates: AtomicU64,
    delta_updates: AtomicU64,
    renewals: AtomicU64,
    notified_ready: AtomicBool,
    requests: AtomicU64,
    tunnel: std::sync::OnceLock<Arc<crate::dataplane::tunnel::Tunnel>>,
    dns: std::sync::OnceLock<Arc<crate::dns::metrics::DnsMetrics>>,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
        .unwrap_or(0)
}

impl Health {
    /// A fresh, not-ready health.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The identity is loaded; its certificate expires at `not_after` (Unix seconds).
    pub fn set_identity(&self, not_after: i64) {
        self.cert_not_after.store(not_after, Ordering::Relaxed);
        self.identity.store(true, Ordering::Relaxed);
        self.maybe_notify();
    }

    /// The data plane (listeners, tunnel, capture) is up.
    pub fn set_dataplane_up(&self, up: bool) {
        self.dataplane.store(up, Ordering::Relaxed);
        self.maybe_notify();
    }

    /// The data plane's tunnel, whose counters `/metrics` reports.
    pub fn set_tunnel(&self, t: Arc<crate::dataplane::tunnel::Tunnel>) {
        let _ = self.tunnel.set(t);
    }

    /// The DNS server's counters, which `/metrics` reports.
    pub fn set_dns(&self, m: Arc<crate::dns::metrics::DnsMetrics>) {
        let _ = self.dns.set(m);
    }

    /// Takes the agent's status report (written on every change by the run loop).
    pub fn update(&self, s: &crate::run::RunStatus) {
        self.config_version
            .store(s.config_version, Ordering::Relaxed);
        self.controller_connected
            .store(s.controller_connected, Ordering::Relaxed);
        self.full_updates.store(s.full_updates, Ordering::Relaxed);
        self.delta_updates.store(s.delta_updates, Ordering::Relaxed);
        self.renewals.store(s.renewals, Ordering::Relaxed);
        if s.config_version > 0 || s.full_updates > 0 {
            self.config.store(true, Ordering::Relaxed);
        }
        self.maybe_notify();
    }

    /// `None` when ready, else why not.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if !self.identity.load(Ordering::Relaxed) {
            Some("no identity: run `causeway-agent join TOKEN` first")
        } else if !self.dataplane.load(Ordering::Relaxed) {
            Some("data plane not up (listeners, tunnel or capture rules)")
        } else if !self.config.load(Ordering::Relaxed) {
            Some("no config yet: the controller has not been reached and no cached config exists")
        } else {
            None
        }
    }

    fn maybe_notify(&self) {
        if self.not_ready_reason().is_none() && !self.notified_ready.swap(true, Ordering::Relaxed) {
            tracing::info!("agent ready");
            notify("READY=1\nSTATUS=ready");
        }
    }

    /// The Prometheus text exposition of the metrics.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, kind: &str, help: &str, lines: &[(String, String)]| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, v) in lines {
                out.push_str(&format!("{name}{labels} {v}\n"));
            }
        };
        let b = |x: &AtomicBool| u8::from(x.load(Ordering::Relaxed)).to_string();
        let u = |x: &AtomicU64| x.load(Ordering::Relaxed).to_string();
        gauge(
            "causeway_agent_build_info",
            "gauge",
            "Version of the running agent.",
            &[(
                format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")),
                "1".into(),
            )],
        );
        gauge(
            "causeway_agent_ready",
            "gauge",
            "1 when identity, config and data plane are all up (as /healthz/ready).",
            &[(
                String::new(),
                u8::from(self.not_ready_reason().is_none()).to_string(),
            )],
        );
        gauge(
            "causeway_agent_controller_connected",
            "gauge",
            "1 while the control connection to the controller is up.",
            &[(String::new(), b(&self.controller_connected))],
        );
        gauge(
            "causeway_agent_config_version",
            "gauge",
            "Version of the applied mesh config (0: none).",
            &[(String::new(), u(&self.config_version))],
        );
        let exp = self.cert_not_after.load(Ordering::Relaxed);
        if self.identity.load(Ordering::Relaxed) {
            gauge(
                "causeway_agent_certificate_expiry_seconds",
                "gauge",
                "Seconds until the workload certificate expires (negative: expired).",
                &[(String::new(), (exp - now_unix()).to_string())],
            );
        }
        gauge(
            "causeway_agent_config_updates_total",
            "counter",
            "Config updates applied by this process.",
            &[
                ("{kind=\"full\"}".into(), u(&self.full_updates)),
                ("{kind=\"delta\"}".into(), u(&self.delta_updates)),
            ],
        );
        gauge(
            "causeway_agent_certificate_renewals_total",
            "counter",
            "Certificate renewals by this process.",
            &[(String::new(), u(&self.renewals))],
        );
        if let Some(t) = self.tunnel.get() {
            let c = t.counters();
            let by = |what: &str, v: [u64; 2]| -> Vec<(String, String)> {
                ["quic", "tcp"]
                    .iter()
                    .zip(v)
                    .map(|(tr, n)| (format!("{{{what}transport=\"{tr}\"}}"), n.to_string()))
                    .collect()
            };
            let mut streams = by("direction=\"outbound\",", c.opened);
            streams.extend(by("direction=\"inbound\",", c.accepted));
            gauge(
                "causeway_agent_tunnel_streams_total",
                "counter",
                "Proxied connections carried by the tunnel, by direction and transport (tcp: TCP + TLS).",
                &streams,
            );
            gauge(
                "causeway_agent_tunnel_dials_total",
                "counter",
                "Tunnel connections dialled to peer agents, by transport.",
                &by("", c.dials),
            );
            gauge(
                "causeway_agent_tunnel_peers_on_tcp",
                "gauge",
                "Peer agents reached over TCP + TLS because QUIC got no answer (UDP blocked?).",
                &[(String::new(), c.peers_on_tcp.to_string())],
            );
            gauge(
                "causeway_agent_tunnel_connections",
                "gauge",
                "Tunnel connections open to and from peer agents, by transport (tcp: multiplexed TCP + TLS).",
                &by("", c.connections),
            );
        }
        let decisions: Vec<(String, String)> = crate::dataplane::authz::decisions()
            .snapshot()
            .into_iter()
            .map(|(d, policy, n)| {
                let policy = policy.replace('\\', "\\\\").replace('"', "\\\"");
                (
                    format!("{{decision=\"{d}\",policy=\"{policy}\"}}"),
                    n.to_string(),
                )
            })
            .collect();
        gauge(
            "causeway_agent_authz_decisions_total",
            "counter",
            "Authorization decisions on inbound connections, by decision and deciding policy (namespace/name; none: no ALLOW policy selects the workload; no-allow-match: denied because no ALLOW policy matched).",
            &decisions,
        );
        gauge(
            "causeway_agent_health_requests_total",
            "counter",
            "Requests served by this endpoint.",
            &[(String::new(), u(&self.requests))],
        );
        if let Some(d) = self.dns.get() {
            out.push_str(&d.render());
        }
        out
    }
}

/// Binds the endpoint and serves it in a background task. A bind failure is logged and
/// returned; the agent keeps running without it.
pub async fn serve(
    cfg: &HealthConfig,
    health: Arc<Health>,
) -> std::io::Result<Option<(SocketAddr, tokio::task::JoinHandle<()>)>> {
    if !cfg.enabled {
        return Ok(None);
    }
    let listener = TcpListener::bind(cfg.listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot listen on the health endpoint {}: {e}; another program holds it, or set [health] listen in the agent config",
                cfg.listen
            ),
        )
    })?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "health endpoint listening");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let h = health.clone();
            tokio::spawn(async move {
                let _ = handle(stream, &h).await;
            });
        }
    });
    Ok(Some((addr, task)))
}

/// The response to one request head: status code, reason, body.
pub(crate) fn respond(head: &[u8], health: &Health) -> (u16, &'static str, String) {
    let Ok(text) = std::str::from_utf8(head) else {
        return (400, "Bad Request", "request is not UTF-8\n".into());
    };
    let line = text.split("\r\n").next().unwrap_or("");
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return (
            400,
            "Bad Request",
            "malformed request line; expected \"GET /healthz/ready HTTP/1.1\"\n".into(),
        );
    };
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return (
            400,
            "Bad Request",
            format!("unsupported protocol {version:?}; use HTTP/1.1\n"),
        );
    }
    if !target.starts_with('/') {
        return (
            400,
            "Bad Request",
            format!("bad request target {target:?}\n"),
        );
    }
    let path = target.split('?').next().unwrap_or(target);
    if !matches!(path, "/healthz/ready" | "/healthz/live" | "/metrics") {
        return (
            404,
            "Not Found",
            format!("no such path {path:?}; try /healthz/ready, /healthz/live or /metrics\n"),
        );
    }
    if method != "GET" && method != "HEAD" {
        return (
            405,
            "Method Not Allowed",
            format!("method {method:?} not allowed; use GET\n"),
        );
    }
    match path {
        "/healthz/live" => (200, "OK", "live\n".into()),
        "/healthz/ready" => match health.not_ready_reason() {
            None => (200, "OK", "ready\n".into()),
            Some(why) => (503, "Service Unavailable", format!("not ready: {why}\n")),
        },
        _ => (200, "OK", health.metrics()),
    }
}

async fn handle(mut stream: TcpStream, health: &Health) -> std::io::Result<()> {
    health.requests.fetch_add(1, Ordering::Relaxed);
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok::<_, std::io::Error>(Some(end));
            }
            if buf.len() > MAX_HEAD {
                return Ok(None);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let (code, reason, body) = match tokio::time::timeout(READ_TIMEOUT, read).await {
        Err(_) => (
            408,
            "Request Timeout",
            "request head not received in time\n".into(),
        ),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(None)) => (
            431,
            "Request Header Fields Too Large",
            format!("request head larger than {MAX_HEAD} bytes\n"),
        ),
        Ok(Ok(Some(end))) => respond(&buf[..end], health),
    };
    let head_only = buf.starts_with(b"HEAD ");
    let ctype = if body.starts_with("# HELP") {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        resp.push_str(&body);
    }
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

/// Sends `state` to systemd's `$NOTIFY_SOCKET` (a path, or an abstract socket named with
/// a leading '@'); does nothing when the variable is unset (not run by systemd).
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = notify_to(&path, state) {
        tracing::warn!(error = %e, socket = ?path, "cannot notify systemd ({state})");
    }
}

/// Sends `state` to the notify socket at `path`.
pub fn notify_to(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let bytes = path.as_bytes();
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let addr = match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt as _;
            std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..])?
        }
        Some(b'/') => std::os::unix::net::SocketAddr::from_pathname(std::path::Path::new(path))?,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET must be an absolute path or start with '@'",
            ));
        }
    };
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> Arc<Health> {
        let h = Health::new();
        h.set_identity(now_unix() + 3600);
        h.set_dataplane_up(true);
        h.update(&crate::run::RunStatus {
            config_version: 3,
            controller_connected: true,
            ..Default::default()
        });
        h
    }

    #[test]
    fn readiness_needs_identity_dataplane_and_config() {
        let h = Health::new();
        assert!(h.not_ready_reason().unwrap().contains("identity"));
        h.set_identity(1);
        assert!(h.not_ready_reason().unwrap().contains("data plane"));
        h.set_dataplane_up(true);
        assert!(h.not_ready_reason().unwrap().contains("no config"));
        let (code, _, body) = respond(b"GET /healthz/ready HTTP/1.1", &h);
        assert_eq!(code, 503);
        assert!(body.contains("no config"), "{body}");
        h.update(&crate::run::RunStatus {
            full_updates: 1,
            ..Default::default()
        });
        assert_eq!(respond(b"GET /healthz/ready HTTP/1.1", &h).0, 200);
    }

    #[test]
    fn malformed_requests_get_clear_errors() {
        let h = ready();
        for (req, code) in [
            (&b"GET /healthz/live HTTP/1.1\r\nHost: x"[..], 200),
            (b"GET /metrics?x=1 HTTP/1.0", 200),
            (b"GARBAGE", 400),
            (b"GET /healthz/ready", 400),
            (b"GET  /healthz/ready HTTP/1.1", 400),
            (b"GET healthz HTTP/1.1", 400),
            (b"GET /healthz/ready SPDY/3", 400),
            (b"\xff\xfe /x HTTP/1.1", 400),
            (b"POST /healthz/ready HTTP/1.1", 405),
            (b"GET /admin HTTP/1.1", 404),
            (b"", 400),
        ] {
            let (c, _, body) = respond(req, &h);
            assert_eq!(c, code, "{:?}: {body}", String::from_utf8_lossy(req));
        }
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let h = ready();
        let m = h.metrics();
        assert!(m.contains("causeway_agent_ready 1\n"), "{m}");
        assert!(m.contains("causeway_agent_config_version 3\n"), "{m}");
        assert!(m.contains("causeway_agent_controller_connected 1\n"), "{m}");
        let exp: i64 = m
            .lines()
            .find_map(|l| l.strip_prefix("causeway_agent_certificate_expiry_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((3500..=3600).contains(&exp), "{exp}");
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("causeway_agent_"), "{line}");
            value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
        }
    }

    async fn get(addr: SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_over_tcp_including_bad_and_oversized_heads() {
        let h = Health::new();
        let cfg = HealthConfig {
            enabled: true,
            listen: "127.0.0.1:0".parse().unwrap(),
        };
        let (addr, task) = serve(&cfg, h.clone()).await.unwrap().unwrap();
        let r = get(addr, b"GET /healthz/ready HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        assert!(r.contains("no identity"), "{r}");
        let r = get(addr, b"GET /healthz/live HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200 ") && r.ends_with("live\n"),
            "{r}"
        );
        let r = get(addr, b"HEAD /healthz/live HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200 ") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        let r = get(addr, b"NONSENSE\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 3 * MAX_HEAD));
        let r = get(addr, &big).await;
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
        // A client that connects and goes away does not stop the server.
        drop(TcpStream::connect(addr).await.unwrap());
        let r = get(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.contains("causeway_agent_health_requests_total"), "{r}");
        task.abort();
    }

    #[test]
    fn notify_reaches_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notify");
        let rx = std::os::unix::net::UnixDatagram::bind(&p).unwrap();
        notify_to(p.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("causeway-test-notify-{}", std::process::id());
        let a = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = std::os::unix::net::UnixDatagram::bind_addr(&a).unwrap();
        notify_to(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        let err = notify_to(std::ffi::OsStr::new("relative"), "READY=1").unwrap_err();
        assert!(err.to_string().contains("absolute path"), "{err}");
    }
}
