//! Health, readiness, Prometheus metrics and the log level on `127.0.0.1:15020`, and
//! systemd readiness (`sd_notify`).
//!
//! - `GET /healthz/live`: 200 while the process serves requests.
//! - `GET /healthz/ready`: 200 only when the agent has an identity, a config (from the
//!   controller or the disk cache) and its data plane is up; otherwise 503 with the
//!   reason in the body. Ansible and load balancers wait on it.
//! - `GET /metrics`: the agent's metrics from a `prometheus-client` registry, in the
//!   Prometheus text format (0.0.4), or OpenMetrics when the scraper asks for it
//!   (`Accept: application/openmetrics-text`).
//! - `GET /logging`: the log filter in force; `PUT` or `POST /logging?level=DIRECTIVES`
//!   (RUST_LOG syntax, e.g. `info,causeway_agent::dataplane=debug`) replaces it until the
//!   agent restarts. Only loopback clients may use it (403 otherwise), also when the
//!   endpoint listens on all addresses for a remote Prometheus.
//!
//! Served by hyper (HTTP/1.1, one request per connection): a client has
//! [`READ_TIMEOUT`] to send its request head and at most [`MAX_HEAD`] bytes of it
//! (431 beyond); malformed requests get 400, other methods 405, other paths 404.
//!
//! When the agent becomes ready it sends `READY=1` to `$NOTIFY_SOCKET` (the unit is
//! `Type=notify`, so `systemctl start` returns only once the agent can serve), and
//! `STOPPING=1` when it begins to shut down. Not here: the watchdog.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use causeway_telemetry::http::reply;
use causeway_telemetry::metrics::{Labels, const_counter, const_gauge, gauge_value as sat};
use http::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::net::TcpListener;

pub use causeway_telemetry::http::{MAX_HEAD, READ_TIMEOUT};

const PLAIN: &str = "text/plain; charset=utf-8";

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
    telemetry: std::sync::OnceLock<Arc<crate::telemetry::Telemetry>>,
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

    /// The proxied traffic's telemetry (Istio metrics), which `/metrics` reports.
    pub fn set_telemetry(&self, t: Arc<crate::telemetry::Telemetry>) {
        let _ = self.telemetry.set(t);
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

    /// The registry `/metrics` encodes: this health's and the data plane's values (read
    /// at scrape time), the DNS server's and the agent's histograms.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut reg = Registry::default();
        reg.register_collector(Box::new(HealthCollector(self.clone())));
        if let Some(d) = self.dns.get() {
            reg.register_collector(Box::new(d.clone()));
        }
        crate::metrics::agent().register(&mut reg);
        if let Some(t) = self.telemetry.get() {
            t.register(&mut reg);
        }
        reg
    }

    /// The Prometheus text exposition (0.0.4) of the metrics.
    pub fn metrics(self: &Arc<Self>) -> String {
        causeway_telemetry::metrics::encode(
            &self.registry(),
            causeway_telemetry::metrics::PROMETHEUS_TEXT,
        )
    }
}

/// The agent's state and the data plane's counters, read at each scrape.
#[derive(Debug)]
struct HealthCollector(Arc<Health>);

impl Collector for HealthCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let h = &self.0;
        let b = |x: &AtomicBool| i64::from(x.load(Ordering::Relaxed));
        let u = |x: &AtomicU64| x.load(Ordering::Relaxed);
        let none = Labels::new;
        const_gauge(
            &mut enc,
            "causeway_agent_build_info",
            "Version of the running agent.",
            &[(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], 1)],
        )?;
        const_gauge(
            &mut enc,
            "causeway_agent_ready",
            "1 when identity, config and data plane are all up (as /healthz/ready).",
            &[(none(), i64::from(h.not_ready_reason().is_none()))],
        )?;
        const_gauge(
            &mut enc,
            "causeway_agent_controller_connected",
            "1 while the control connection to the controller is up.",
            &[(none(), b(&h.controller_connected))],
        )?;
        const_gauge(
            &mut enc,
            "causeway_agent_config_version",
            "Version of the applied mesh config (0: none).",
            &[(none(), sat(u(&h.config_version)))],
        )?;
        if h.identity.load(Ordering::Relaxed) {
            let exp = h.cert_not_after.load(Ordering::Relaxed);
            const_gauge(
                &mut enc,
                "causeway_agent_certificate_expiry_seconds",
                "Seconds until the workload certificate expires (negative: expired).",
                &[(none(), exp - now_unix())],
            )?;
        }
        const_counter(
            &mut enc,
            "causeway_agent_config_updates",
            "Config updates applied by this process.",
            &[
                (vec![("kind", "full".into())], u(&h.full_updates)),
                (vec![("kind", "delta".into())], u(&h.delta_updates)),
            ],
        )?;
        const_counter(
            &mut enc,
            "causeway_agent_certificate_renewals",
            "Certificate renewals by this process.",
            &[(none(), u(&h.renewals))],
        )?;
        if let Some(t) = h.tunnel.get() {
            let c = t.counters();
            let by = |extra: Option<&'static str>, v: [u64; 2]| -> Vec<(Labels, u64)> {
                ["quic", "tcp"]
                    .iter()
                    .zip(v)
                    .map(|(tr, n)| {
                        let mut l: Labels = extra
                            .map(|d| vec![("direction", d.to_owned())])
                            .unwrap_or_default();
                        l.push(("transport", (*tr).to_owned()));
                        (l, n)
                    })
                    .collect()
            };
            let mut streams = by(Some("outbound"), c.opened);
            streams.extend(by(Some("inbound"), c.accepted));
            const_counter(
                &mut enc,
                "causeway_agent_tunnel_streams",
                "Proxied connections carried by the tunnel, by direction and transport (tcp: TCP + TLS).",
                &streams,
            )?;
            const_counter(
                &mut enc,
                "causeway_agent_tunnel_dials",
                "Tunnel connections dialled to peer agents, by transport.",
                &by(None, c.dials),
            )?;
            const_gauge(
                &mut enc,
                "causeway_agent_tunnel_peers_on_tcp",
                "Peer agents reached over TCP + TLS because QUIC got no answer (UDP blocked?).",
                &[(none(), sat(c.peers_on_tcp))],
            )?;
            let conns: Vec<(Labels, i64)> = by(None, c.connections)
                .into_iter()
                .map(|(l, n)| (l, sat(n)))
                .collect();
            const_gauge(
                &mut enc,
                "causeway_agent_tunnel_connections",
                "Tunnel connections open to and from peer agents, by transport (tcp: multiplexed TCP + TLS).",
                &conns,
            )?;
        }
        let decisions: Vec<(Labels, u64)> = crate::dataplane::authz::decisions()
            .snapshot()
            .into_iter()
            .map(|(d, policy, n)| (vec![("decision", d.to_owned()), ("policy", policy)], n))
            .collect();
        const_counter(
            &mut enc,
            "causeway_agent_authz_decisions",
            "Authorization decisions on inbound connections, by decision and deciding policy (namespace/name; none: no ALLOW policy selects the workload; no-allow-match: denied because no ALLOW policy matched).",
            &decisions,
        )?;
        const_counter(
            &mut enc,
            "causeway_agent_health_requests",
            "Requests served by this endpoint.",
            &[(none(), u(&h.requests))],
        )?;
        Ok(())
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
    let task =
        causeway_telemetry::http::serve(listener, move |req, peer| handle(req, peer, &health));
    Ok(Some((addr, task)))
}

/// The value of `key` in a URL query, percent-decoded (`+` is a space).
fn query_value(query: &str, key: &str) -> Option<Result<String, String>> {
    let raw = query.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
    })?;
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                let v = std::str::from_utf8(&hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .filter(|_| hex.len() == 2);
                match v {
                    Some(v) => out.push(v),
                    None => return Some(Err(format!("bad percent-encoding in {key}={raw:?}"))),
                }
            }
            b'+' => out.push(b' '),
            _ => out.push(b),
        }
    }
    Some(String::from_utf8(out).map_err(|_| format!("{key}={raw:?} is not UTF-8")))
}

/// The response to one request from `peer`.
pub(crate) fn handle<B>(
    req: &Request<B>,
    peer: SocketAddr,
    health: &Arc<Health>,
) -> Response<String> {
    health.requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path();
    let method = req.method();
    if req.uri().authority().is_some() || !path.starts_with('/') {
        return reply(
            StatusCode::BAD_REQUEST,
            PLAIN,
            format!(
                "bad request target {:?}; use a path such as /healthz/ready\n",
                req.uri().to_string()
            ),
        );
    }
    if path == "/logging" {
        return logging(req, peer);
    }
    if !matches!(path, "/healthz/ready" | "/healthz/live" | "/metrics") {
        return reply(
            StatusCode::NOT_FOUND,
            PLAIN,
            format!(
                "no such path {path:?}; try /healthz/ready, /healthz/live, /metrics or /logging\n"
            ),
        );
    }
    if method != Method::GET && method != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            format!("method {method} not allowed; use GET\n"),
        );
    }
    match path {
        "/healthz/live" => reply(StatusCode::OK, PLAIN, "live\n".into()),
        "/healthz/ready" => match health.not_ready_reason() {
            None => reply(StatusCode::OK, PLAIN, "ready\n".into()),
            Some(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not ready: {why}\n"),
            ),
        },
        _ => {
            let ctype =
                causeway_telemetry::metrics::negotiate(causeway_telemetry::http::accept(req));
            let body = causeway_telemetry::metrics::encode(&health.registry(), ctype);
            reply(StatusCode::OK, ctype, body)
        }
    }
}

/// `/logging`: read (GET) or replace (PUT, POST `?level=`) the log filter; loopback only.
fn logging<B>(req: &Request<B>, peer: SocketAddr) -> Response<String> {
    if !peer.ip().to_canonical().is_loopback() {
        return reply(
            StatusCode::FORBIDDEN,
            PLAIN,
            format!(
                "/logging answers only to clients on this host (loopback), not {}\n",
                peer.ip()
            ),
        );
    }
    let method = req.method();
    if method == Method::GET || method == Method::HEAD {
        let now = causeway_telemetry::current_filter().unwrap_or_else(|| "(not set up)".into());
        return reply(StatusCode::OK, PLAIN, format!("{now}\n"));
    }
    if method != Method::PUT && method != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            format!(
                "method {method} not allowed on /logging; use GET, or PUT /logging?level=info\n"
            ),
        );
    }
    let level = match query_value(req.uri().query().unwrap_or(""), "level") {
        None => {
            return reply(
                StatusCode::BAD_REQUEST,
                PLAIN,
                "no level given; use PUT /logging?level=DIRECTIVES, e.g. level=info or level=info,causeway_agent::dataplane=debug\n".into(),
            );
        }
        Some(Err(e)) => return reply(StatusCode::BAD_REQUEST, PLAIN, format!("{e}\n")),
        Some(Ok(l)) => l,
    };
    match causeway_telemetry::set_filter(&level) {
        Ok(now) => {
            tracing::warn!(filter = %now, client = %peer, "log filter changed at run time");
            reply(StatusCode::OK, PLAIN, format!("{now}\n"))
        }
        Err(e) => reply(StatusCode::BAD_REQUEST, PLAIN, format!("{e}\n")),
    }
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
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    const LOCAL: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

    fn request(method: &str, target: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(target)
            .body(())
            .unwrap()
    }

    fn code(h: &Arc<Health>, method: &str, target: &str, peer: SocketAddr) -> (u16, String) {
        let r = handle(&request(method, target), peer, h);
        (r.status().as_u16(), r.into_body())
    }

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
        let (c, body) = code(&h, "GET", "/healthz/ready", LOCAL);
        assert_eq!(c, 503);
        assert!(body.contains("no config"), "{body}");
        h.update(&crate::run::RunStatus {
            full_updates: 1,
            ..Default::default()
        });
        assert_eq!(code(&h, "GET", "/healthz/ready", LOCAL).0, 200);
    }

    #[tokio::test]
    async fn malformed_requests_get_clear_errors() {
        let h = ready();
        let (addr, task) = serve(&local_cfg(), h.clone()).await.unwrap().unwrap();
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
        ] {
            let mut raw = req.to_vec();
            raw.extend_from_slice(b"\r\n\r\n");
            let r = get(addr, &raw).await;
            // An HTTP/1.0 request gets an HTTP/1.0 response.
            assert!(
                r.starts_with("HTTP/1.") && r.get(9..13) == Some(&format!("{code} ")),
                "{:?}: want {code}, got {r:?}",
                String::from_utf8_lossy(req)
            );
        }
        // Blank lines are no request (RFC 9112 lets a server skip them): the connection
        // is closed, without a response, once the read timeout has passed.
        assert_eq!(get(addr, b"\r\n\r\n").await, "");
        task.abort();
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

    fn local_cfg() -> HealthConfig {
        HealthConfig {
            enabled: true,
            listen: "127.0.0.1:0".parse().unwrap(),
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

    #[tokio::test]
    async fn metrics_content_type_follows_the_accept_header() {
        let h = ready();
        let (addr, task) = serve(&local_cfg(), h.clone()).await.unwrap().unwrap();
        let r = get(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            r.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{r}"
        );
        assert!(
            r.contains("\ncauseway_agent_ready 1\n") && !r.contains("# EOF"),
            "{r}"
        );
        let r = get(
            addr,
            b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
        )
        .await;
        assert!(
            r.contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
            ),
            "{r}"
        );
        assert!(r.ends_with("# EOF\n"), "{r}");
        let r = get(addr, b"GET /healthz/live HTTP/1.1\r\n\r\n").await;
        assert!(
            r.contains("content-type: text/plain; charset=utf-8\r\n"),
            "{r}"
        );
        task.abort();
    }

    #[tokio::test]
    async fn logging_endpoint_changes_the_filter_for_loopback_clients_only() {
        causeway_telemetry::init("info");
        let h = ready();
        // Another host: refused whatever the method.
        let remote: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        for m in ["GET", "PUT", "POST"] {
            let (c, body) = code(&h, m, "/logging?level=debug", remote);
            assert_eq!(c, 403, "{m}: {body}");
            assert!(
                body.contains("loopback") && body.contains("192.0.2.7"),
                "{body}"
            );
        }
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        assert_eq!(code(&h, "GET", "/logging", mapped).0, 200);
        assert_eq!(code(&h, "DELETE", "/logging", LOCAL).0, 405);
        let (c, body) = code(&h, "PUT", "/logging", LOCAL);
        assert_eq!(c, 400);
        assert!(body.contains("level="), "{body}");
        let (c, body) = code(
            &h,
            "PUT",
            "/logging?level=info,causeway_agent%3Dloud",
            LOCAL,
        );
        assert_eq!(c, 400);
        assert!(body.contains("causeway_agent=loud"), "{body}");

        // Over TCP from loopback: every directive (percent-encoded) is taken.
        let (addr, task) = serve(&local_cfg(), h.clone()).await.unwrap().unwrap();
        let r = get(
            addr,
            b"PUT /logging?level=warn%2Ccauseway_agent%3A%3Adns%3Ddebug HTTP/1.1\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(
            r.contains("causeway_agent::dns=debug") && r.contains("warn"),
            "{r}"
        );
        let r = get(addr, b"GET /logging HTTP/1.1\r\n\r\n").await;
        assert!(r.contains("causeway_agent::dns=debug"), "{r}");
        assert_eq!(
            causeway_telemetry::current_filter().as_deref(),
            r.rsplit("\r\n\r\n").next().map(str::trim)
        );
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
