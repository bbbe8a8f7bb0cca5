//! Istio's standard metrics (<https://istio.io/latest/docs/reference/config/metrics/>),
//! under Istio's names, types, units, buckets and labels, so that dashboards and alerts
//! written for Istio work unchanged:
//!
//! - HTTP and gRPC, one sample per request and reporter ([`IstioObserver`]):
//!   `istio_requests_total` (counter), `istio_request_duration_milliseconds`,
//!   `istio_request_bytes`, `istio_response_bytes` (histograms; body bytes).
//! - Every proxied connection, spliced or served as HTTP ([`TcpConn`]):
//!   `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//!   `istio_tcp_received_bytes_total` (client to server), `istio_tcp_sent_bytes_total`
//!   (server to client). Spliced connections add their bytes when they end; connections
//!   served as HTTP as the bytes pass.
//!
//! Labels: `reporter` is `source` on the client's agent and `destination` on the
//! server's. A workload is its agent's group, or for an endpoint without an agent the
//! registry service it belongs to; `*_workload_namespace` is the SPIFFE ID's namespace
//! (the service's namespace without an agent); principals are SPIFFE IDs
//! (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`, `unknown` without an agent); `*_app` and
//! `*_version` are the endpoint labels `app` and `version` (at the source, a request a
//! route sent to a DestinationRule subset with a `version` label has that version as
//! `destination_version`, also when no endpoint was reached); `*_cluster` is `unknown`
//! (VMs have no Kubernetes cluster id). `destination_service` is
//! `<name>.<namespace>.<causeway DNS domain>`, `PassthroughCluster` for connections to
//! non-mesh destinations. `connection_security_policy` is `mutual_tls` through the
//! tunnel, `none` in plaintext (an endpoint without an agent) or when no connection was
//! made. Unknown values are `unknown`, as Istio's.
//!
//! Cardinality: the four request metrics share one set of series, the four TCP metrics
//! another; each holds at most `[telemetry] max_series` label sets ([`SeriesMap`]). Past
//! the cap, new label sets are counted in
//! `causeway_telemetry_series_overflow_total{family}` and folded into one series whose
//! labels (but `reporter`) are `overflow`.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use causeway_api::push::MeshState;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::series::SeriesMap;
use crate::dataplane::http::{Observer, RequestRecord, Side};
use crate::push::SharedState;

/// Bucket bounds of `istio_request_duration_milliseconds` (milliseconds) and of the two
/// size histograms (bytes): Envoy's default histogram buckets, which Istio's proxies use.
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Labels of every series, in key order (then [`HTTP_LABELS`] or [`TCP_LABELS`]).
const PEER_LABELS: [&str; 16] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
];
/// The index of `destination_version` in [`PEER_LABELS`].
const DESTINATION_VERSION: usize = 11;
const HTTP_LABELS: [&str; 5] = [
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];
const TCP_LABELS: [&str; 3] = [
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

const UNKNOWN: &str = "unknown";
const PASSTHROUGH: &str = "PassthroughCluster";
const OVERFLOW: &str = "overflow";

/// Label values in the order of the names.
pub(super) type Key = Vec<Arc<str>>;

/// The request metrics of one label set.
#[derive(Debug)]
pub struct HttpSeries {
    pub(super) requests: Counter,
    /// Requests per latency bucket of the agent's traffic summaries
    /// ([`causeway_api::push::LATENCY_BOUNDS_MS`], then one over the last).
    pub(super) latency: [std::sync::atomic::AtomicU64; super::edges::LATENCY_BUCKETS],
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Default for HttpSeries {
    fn default() -> Self {
        Self {
            requests: Counter::default(),
            latency: Default::default(),
            duration: Histogram::new(BUCKETS),
            request_bytes: Histogram::new(BUCKETS),
            response_bytes: Histogram::new(BUCKETS),
        }
    }
}

/// The TCP metrics of one label set.
#[derive(Debug, Default)]
pub struct TcpSeries {
    pub(super) opened: Counter,
    closed: Counter,
    pub(super) sent: Counter,
    pub(super) received: Counter,
}

/// The Istio metrics of one agent (a [`Collector`] for `/metrics`).
#[derive(Debug)]
pub struct IstioMetrics {
    pub(super) http: SeriesMap<Key, HttpSeries>,
    pub(super) tcp: SeriesMap<Key, TcpSeries>,
}

impl IstioMetrics {
    /// Empty metrics; each family holds at most `max_series` label sets.
    pub fn new(max_series: usize) -> Self {
        Self {
            http: SeriesMap::new(max_series),
            tcp: SeriesMap::new(max_series),
        }
    }

    /// Counts one finished request under `key` (the values of [`PEER_LABELS`] then
    /// [`HTTP_LABELS`]).
    #[cfg(test)]
    pub(super) fn request(&self, key: Key, r: &RequestRecord) {
        let s = self.request_series(key).0;
        Self::count(&s, r);
    }

    /// The series of requests under `key`, and whether it is the overflow series.
    fn request_series(&self, key: Key) -> (Arc<HttpSeries>, bool) {
        let reporter = key[0].clone();
        self.http.get_flagged(key, || {
            overflow_key(reporter, PEER_LABELS.len() + HTTP_LABELS.len())
        })
    }

    /// Counts request `r` into series `s`.
    fn count(s: &HttpSeries, r: &RequestRecord) {
        s.requests.inc();
        s.duration.observe(r.duration.as_secs_f64() * 1000.0);
        s.latency[super::edges::latency_bucket(r.duration)]
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        s.request_bytes.observe(r.request_bytes as f64);
        s.response_bytes.observe(r.response_bytes as f64);
    }

    /// A connection opened under `key` (values of [`PEER_LABELS`] then [`TCP_LABELS`]).
    pub(super) fn tcp_open(&self, key: Key) -> TcpConn {
        let reporter = key[0].clone();
        let series = self.tcp.get(key, || {
            overflow_key(reporter, PEER_LABELS.len() + TCP_LABELS.len())
        });
        series.opened.inc();
        TcpConn { series }
    }
}

fn overflow_key(reporter: Arc<str>, len: usize) -> Key {
    let o: Arc<str> = Arc::from(OVERFLOW);
    std::iter::once(reporter)
        .chain(std::iter::repeat_n(o, len - 1))
        .collect()
}

fn labels<'a>(tail: &'static [&'static str], key: &'a Key) -> Vec<(&'static str, &'a str)> {
    PEER_LABELS
        .iter()
        .chain(tail)
        .zip(key.iter())
        .map(|(n, v)| (*n, &**v))
        .collect()
}

fn histogram_family(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[(Key, Arc<HttpSeries>)],
    pick: impl Fn(&HttpSeries) -> &Histogram,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (k, s) in series {
        let l = labels(&HTTP_LABELS, k);
        pick(s).encode(m.encode_family(&l)?)?;
    }
    Ok(())
}

fn counter_family<V>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    tail: &'static [&'static str],
    series: &[(Key, Arc<V>)],
    pick: impl Fn(&V) -> &Counter,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (k, s) in series {
        let l = labels(tail, k);
        pick(s).encode(m.encode_family(&l)?)?;
    }
    Ok(())
}

/// The collector `/metrics` registers.
#[derive(Debug)]
pub struct IstioCollector(pub Arc<IstioMetrics>);

impl Collector for IstioCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let http = m.http.snapshot();
        counter_family(
            &mut enc,
            "istio_requests",
            "Requests handled by the agent, per reporter (Istio standard metric).",
            &HTTP_LABELS,
            &http,
            |s| &s.requests,
        )?;
        histogram_family(
            &mut enc,
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds, from the request head to the end of the response (Istio standard metric).",
            &http,
            |s| &s.duration,
        )?;
        histogram_family(
            &mut enc,
            "istio_request_bytes",
            "Request body size in bytes (Istio standard metric).",
            &http,
            |s| &s.request_bytes,
        )?;
        histogram_family(
            &mut enc,
            "istio_response_bytes",
            "Response body size in bytes (Istio standard metric).",
            &http,
            |s| &s.response_bytes,
        )?;
        drop(http);
        let tcp = m.tcp.snapshot();
        counter_family(
            &mut enc,
            "istio_tcp_connections_opened",
            "Proxied connections opened (Istio standard metric).",
            &TCP_LABELS,
            &tcp,
            |s| &s.opened,
        )?;
        counter_family(
            &mut enc,
            "istio_tcp_connections_closed",
            "Proxied connections closed (Istio standard metric).",
            &TCP_LABELS,
            &tcp,
            |s| &s.closed,
        )?;
        counter_family(
            &mut enc,
            "istio_tcp_received_bytes",
            "Bytes from the client towards the server on proxied connections (Istio standard metric).",
            &TCP_LABELS,
            &tcp,
            |s| &s.received,
        )?;
        counter_family(
            &mut enc,
            "istio_tcp_sent_bytes",
            "Bytes from the server towards the client on proxied connections (Istio standard metric).",
            &TCP_LABELS,
            &tcp,
            |s| &s.sent,
        )?;
        causeway_telemetry::metrics::const_counter(
            &mut enc,
            "causeway_telemetry_series_overflow",
            "New label sets folded into the overflow series because the family held [telemetry] max_series label sets already.",
            &[
                (
                    vec![("family", "istio_requests".to_owned())],
                    m.http.overflowed(),
                ),
                (vec![("family", "istio_tcp".to_owned())], m.tcp.overflowed()),
            ],
        )?;
        causeway_telemetry::metrics::const_gauge(
            &mut enc,
            "causeway_telemetry_series",
            "Label sets held, per family (at most [telemetry] max_series, plus one overflow series).",
            &[
                (
                    vec![("family", "istio_requests".to_owned())],
                    causeway_telemetry::metrics::gauge_value(m.http.len()),
                ),
                (
                    vec![("family", "istio_tcp".to_owned())],
                    causeway_telemetry::metrics::gauge_value(m.tcp.len()),
                ),
            ],
        )
    }
}

/// One proxied connection's TCP metrics: opened when made, closed when dropped.
#[derive(Debug)]
pub struct TcpConn {
    series: Arc<TcpSeries>,
}

impl TcpConn {
    /// Adds bytes: `received` from the client, `sent` to it.
    pub fn bytes(&self, received: u64, sent: u64) {
        if received > 0 {
            self.series.received.inc_by(received);
        }
        if sent > 0 {
            self.series.sent.inc_by(sent);
        }
    }
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        self.series.closed.inc();
    }
}

/// A downstream byte stream that counts its bytes into a [`TcpConn`] as they pass
/// (reads: received from the client; writes: sent to it).
pub struct CountingIo<IO> {
    io: IO,
    conn: TcpConn,
}

impl<IO> CountingIo<IO> {
    /// `io`, counted into `conn`.
    pub fn new(io: IO, conn: TcpConn) -> Self {
        Self { io, conn }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for CountingIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.conn.bytes(n as u64, 0);
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for CountingIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.conn.bytes(0, *n as u64);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.conn.bytes(0, *n as u64);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A workload's labels.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Workload {
    name: Arc<str>,
    namespace: Arc<str>,
    principal: Arc<str>,
    app: Arc<str>,
    version: Arc<str>,
}

impl Workload {
    fn unknown() -> Self {
        let u: Arc<str> = Arc::from(UNKNOWN);
        Self {
            name: u.clone(),
            namespace: u.clone(),
            principal: u.clone(),
            app: u.clone(),
            version: u,
        }
    }

    fn with_labels(mut self, labels: &std::collections::BTreeMap<String, String>) -> Self {
        if let Some(a) = labels.get("app") {
            self.app = Arc::from(a.as_str());
        }
        if let Some(v) = labels.get("version") {
            self.version = Arc::from(v.as_str());
        }
        self
    }

    /// An agent's workload from its SPIFFE ID (namespace) and, when known, its group.
    fn agent(identity: &str, group: Option<&str>) -> Self {
        let ns = identity
            .split("/ns/")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or(UNKNOWN);
        Self {
            name: Arc::from(group.unwrap_or(UNKNOWN)),
            namespace: Arc::from(ns),
            principal: Arc::from(identity),
            ..Self::unknown()
        }
    }
}

/// A destination service's labels.
#[derive(Clone, Debug)]
struct Service {
    fqdn: Arc<str>,
    name: Arc<str>,
    namespace: Arc<str>,
}

/// Lookups in one mesh snapshot, kept until the next one.
#[derive(Default)]
struct Memo {
    state: Option<Arc<MeshState>>,
    own: Option<Workload>,
    by_identity: HashMap<Arc<str>, Workload>,
    by_endpoint: HashMap<(Arc<str>, String), Workload>,
    services: HashMap<Arc<str>, Service>,
}

/// What the agent knows to label its samples: itself and the mesh.
pub struct Labeler {
    own_identity: Arc<str>,
    own_group: Arc<str>,
    domain: String,
    state: SharedState,
    memo: Mutex<Memo>,
}

impl std::fmt::Debug for Labeler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Labeler")
            .field("own_identity", &self.own_identity)
            .field("own_group", &self.own_group)
            .finish_non_exhaustive()
    }
}

/// The group of an endpoint that runs an agent (its `causeway.io/group` label).
fn group_of(e: &causeway_api::push::EndpointState) -> Option<&str> {
    e.labels
        .get(causeway_api::policy::GROUP_LABEL)
        .map(String::as_str)
}

impl Labeler {
    /// The labeler of the agent with SPIFFE ID `identity` in group `group`; services are
    /// named `<name>.<namespace>.<domain>`.
    pub fn new(identity: &str, group: &str, domain: &str, state: SharedState) -> Self {
        Self {
            own_identity: Arc::from(identity),
            own_group: Arc::from(group),
            domain: domain.trim_end_matches('.').to_owned(),
            state,
            memo: Mutex::default(),
        }
    }

    fn memo<R>(&self, f: impl FnOnce(&mut Memo, &MeshState) -> R) -> R {
        let state = self.state.get();
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        if !memo.state.as_ref().is_some_and(|s| Arc::ptr_eq(s, &state)) {
            *memo = Memo {
                state: Some(state.clone()),
                ..Memo::default()
            };
        }
        f(&mut memo, &state)
    }

    /// This agent's workload.
    fn own(&self, memo: &mut Memo, state: &MeshState) -> Workload {
        if let Some(w) = &memo.own {
            return w.clone();
        }
        let mut w = Workload::agent(&self.own_identity, Some(&self.own_group));
        if let Some(e) = state
            .services
            .values()
            .flat_map(|s| s.endpoints.values())
            .find(|e| e.identity.as_deref() == Some(&*self.own_identity))
        {
            w = w.with_labels(&e.labels);
        }
        memo.own = Some(w.clone());
        w
    }

    /// The workload of the peer agent that authenticated as `identity`.
    fn peer(&self, memo: &mut Memo, state: &MeshState, identity: &Arc<str>) -> Workload {
        if let Some(w) = memo.by_identity.get(identity) {
            return w.clone();
        }
        let w = match state
            .services
            .values()
            .flat_map(|s| s.endpoints.values())
            .find(|e| e.identity.as_deref() == Some(&**identity))
        {
            Some(e) => Workload::agent(identity, group_of(e)).with_labels(&e.labels),
            None => Workload::agent(identity, None),
        };
        // Keys are authenticated identities: bounded by the mesh.
        memo.by_identity.insert(identity.clone(), w.clone());
        w
    }

    /// The workload of the endpoint of service `service` at `host` (`ip:port`).
    fn endpoint(
        &self,
        memo: &mut Memo,
        state: &MeshState,
        service: &Arc<str>,
        host: &str,
    ) -> Workload {
        let key = (service.clone(), host.to_owned());
        if let Some(w) = memo.by_endpoint.get(&key) {
            return w.clone();
        }
        let ip = host
            .parse::<std::net::SocketAddr>()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|_| host.to_owned());
        let svc = self.service(memo, service);
        let w = state
            .services
            .get(&**service)
            .and_then(|s| s.endpoints.values().find(|e| e.address == ip))
            .map_or_else(Workload::unknown, |e| match &e.identity {
                Some(id) => Workload::agent(id, group_of(e)).with_labels(&e.labels),
                // Without an agent: the registry service is the workload.
                None => Workload {
                    name: svc.name.clone(),
                    namespace: svc.namespace.clone(),
                    ..Workload::unknown()
                }
                .with_labels(&e.labels),
            });
        // Keys are endpoints the balancer picked: bounded by the mesh.
        memo.by_endpoint.insert(key, w.clone());
        w
    }

    fn service(&self, memo: &mut Memo, key: &Arc<str>) -> Service {
        if let Some(s) = memo.services.get(key) {
            return s.clone();
        }
        let (ns, name) = key.split_once('/').unwrap_or((UNKNOWN, key));
        let s = Service {
            fqdn: Arc::from(format!("{name}.{ns}.{}", self.domain)),
            name: Arc::from(name),
            namespace: Arc::from(ns),
        };
        memo.services.insert(key.clone(), s.clone());
        s
    }

    /// The values of [`PEER_LABELS`].
    fn peer_key(side: Side, src: Workload, dst: Workload, svc: Option<Service>) -> Key {
        let u: Arc<str> = Arc::from(UNKNOWN);
        let svc = svc.unwrap_or_else(|| Service {
            fqdn: u.clone(),
            name: u.clone(),
            namespace: u.clone(),
        });
        let mut k = Vec::with_capacity(PEER_LABELS.len() + HTTP_LABELS.len());
        k.push(Arc::from(side.as_str()));
        k.extend([src.name, src.namespace, src.principal, src.app, src.version]);
        k.push(u.clone());
        k.extend([dst.name, dst.namespace, dst.principal, dst.app, dst.version]);
        k.extend([svc.fqdn, svc.name, svc.namespace]);
        k.push(u);
        k
    }

    /// The peer labels of a connection or request on the client side, to `service`
    /// (`None`: passthrough) and the endpoint at `upstream` (`None`: none reached).
    fn source_key(&self, service: Option<&Arc<str>>, upstream: Option<&str>) -> Key {
        self.memo(|memo, state| {
            let own = self.own(memo, state);
            let Some(service) = service else {
                let p: Arc<str> = Arc::from(PASSTHROUGH);
                let svc = Service {
                    fqdn: p.clone(),
                    name: p,
                    namespace: Arc::from(UNKNOWN),
                };
                return Self::peer_key(Side::Source, own, Workload::unknown(), Some(svc));
            };
            let dst = upstream.map_or_else(Workload::unknown, |h| {
                self.endpoint(memo, state, service, h)
            });
            let svc = self.service(memo, service);
            Self::peer_key(Side::Source, own, dst, Some(svc))
        })
    }

    /// The peer labels on the server side, from the client agent `peer` to `service`.
    fn destination_key(&self, peer: Option<&Arc<str>>, service: Option<&Arc<str>>) -> Key {
        self.memo(|memo, state| {
            let own = self.own(memo, state);
            let src = peer.map_or_else(Workload::unknown, |p| self.peer(memo, state, p));
            let svc = service.map(|s| self.service(memo, s));
            Self::peer_key(Side::Destination, src, own, svc)
        })
    }
}

fn security(mtls: bool) -> Arc<str> {
    Arc::from(if mtls { "mutual_tls" } else { "none" })
}

/// The Istio metrics and the labeler, shared by every observer and connection of an
/// agent.
#[derive(Debug)]
pub struct Istio {
    /// The metrics.
    pub metrics: Arc<IstioMetrics>,
    /// Labels from the mesh.
    pub labeler: Labeler,
}

impl Istio {
    /// A client-side connection to `service` (`None`: passthrough) at the endpoint
    /// `upstream` (`ip:port`; `None`: not known per connection, e.g. HTTP, balanced per
    /// request), through the tunnel (`mtls`) or in plaintext.
    pub fn source_tcp(
        &self,
        service: Option<&Arc<str>>,
        upstream: Option<&str>,
        mtls: bool,
    ) -> TcpConn {
        let mut key = self.labeler.source_key(service, upstream);
        key.extend([Arc::from("tcp"), Arc::from("-"), security(mtls)]);
        self.metrics.tcp_open(key)
    }

    /// A server-side connection (tunnel stream) from the agent `peer` for `service`.
    pub fn destination_tcp(&self, peer: &Arc<str>, service: &Arc<str>) -> TcpConn {
        let mut key = self.labeler.destination_key(Some(peer), Some(service));
        key.extend([Arc::from("tcp"), Arc::from("-"), security(true)]);
        self.metrics.tcp_open(key)
    }
}

/// Where an [`IstioObserver`]'s proxy sits.
#[derive(Clone, Debug)]
pub enum Scope {
    /// The client side, proxying to this service (`namespace/name`).
    Source(Arc<str>),
    /// The server side (peer and service come with each connection).
    Destination,
}

/// Counts each finished request into the Istio metrics, once per reporter.
#[derive(Debug)]
pub struct IstioObserver {
    istio: Arc<Istio>,
    scope: Scope,
    /// The series of the last request counted, with what its labels were made from: a
    /// request that matches it (the usual case: the same endpoint and status as the last
    /// one, in the same mesh snapshot) is counted without building its labels again.
    last: Mutex<Option<LastSeries>>,
}

/// What [`IstioObserver::key`] reads of a request and of the mesh, and the series its
/// labels gave (never the overflow series: each label set folded into it is counted).
#[derive(Debug)]
struct LastSeries {
    state: Arc<MeshState>,
    upstream: Option<String>,
    version: Option<Arc<str>>,
    peer: Option<Arc<str>>,
    service: Option<Arc<str>>,
    response_code: u16,
    grpc_status: Option<u32>,
    flags: crate::dataplane::http::ResponseFlags,
    series: Arc<HttpSeries>,
}

impl LastSeries {
    fn matches(&self, state: &Arc<MeshState>, r: &RequestRecord) -> bool {
        Arc::ptr_eq(&self.state, state)
            && self.response_code == r.response_code
            && self.grpc_status == r.grpc_status
            && self.flags == r.response_flags
            && self.upstream.as_deref() == r.upstream_host.as_deref()
            && self.version.as_deref() == r.subset.as_ref().and_then(|s| s.version.as_deref())
            && self.peer.as_deref() == r.conn.peer_identity.as_deref()
            && self.service.as_deref() == r.conn.service.as_deref()
    }
}

impl IstioObserver {
    /// The observer of a proxy at `scope`.
    pub fn new(istio: Arc<Istio>, scope: Scope) -> Self {
        Self {
            istio,
            scope,
            last: Mutex::default(),
        }
    }

    fn key(&self, r: &RequestRecord) -> Key {
        let l = &self.istio.labeler;
        let (mut key, mtls) = match &self.scope {
            Scope::Source(service) => {
                let upstream = r.upstream_host.as_deref();
                let mut key = l.source_key(Some(service), upstream);
                // Routed to a subset with a `version` label: that version, also when no
                // endpoint was reached (no healthy endpoint in the subset, fault abort).
                if let Some(v) = r.subset.as_ref().and_then(|s| s.version.as_ref()) {
                    key[DESTINATION_VERSION] = v.clone();
                }
                // Through the tunnel when the endpoint reached runs an agent.
                let mtls = upstream.is_some() && &*key[9] != UNKNOWN;
                (key, mtls)
            }
            Scope::Destination => (
                l.destination_key(r.conn.peer_identity.as_ref(), r.conn.service.as_ref()),
                true,
            ),
        };
        let grpc = r.grpc_status.map(|s| s.to_string());
        key.extend([
            Arc::from(if grpc.is_some() { "grpc" } else { "http" }),
            Arc::from(r.response_code.to_string()),
            Arc::from(grpc.unwrap_or_default()),
            Arc::from(r.response_flags.to_string()),
            security(mtls),
        ]);
        key
    }
}

impl Observer for IstioObserver {
    fn on_request(&self, record: RequestRecord) {
        self.on_request_ref(&record);
    }

    fn on_request_ref(&self, record: &RequestRecord) {
        let state = self.istio.labeler.state.get();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = last.as_ref().filter(|l| l.matches(&state, record)) {
            IstioMetrics::count(&l.series, record);
            return;
        }
        // The labels are made from this snapshot or a newer one: a newer one is never
        // matched by `state` again, so the entry below is only ever used for labels made
        // from the snapshot it names.
        let (series, overflowed) = self.istio.metrics.request_series(self.key(record));
        IstioMetrics::count(&series, record);
        *last = (!overflowed).then(|| LastSeries {
            state,
            upstream: record.upstream_host.clone(),
            version: record.subset.as_ref().and_then(|s| s.version.clone()),
            peer: record.conn.peer_identity.clone(),
            service: record.conn.service.clone(),
            response_code: record.response_code,
            grpc_status: record.grpc_status,
            flags: record.response_flags,
            series,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::http::{ConnInfo, ResponseFlags};
    use causeway_api::push::{EndpointState, ServiceState};
    use std::time::{Duration, SystemTime};

    const WEB: &str = "spiffe://causeway.local/ns/shop/sa/web";
    const CLIENT: &str = "spiffe://causeway.local/ns/shop/sa/client";

    fn ep(addr: &str, identity: Option<&str>, labels: &[(&str, &str)]) -> EndpointState {
        EndpointState {
            address: addr.into(),
            ports: [("http".to_owned(), 8080)].into(),
            healthy: true,
            zone: None,
            identity: identity.map(str::to_owned),
            source: "agents".into(),
            stale: false,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            mtls_strict: false,
            region: None,
        }
    }

    fn state() -> SharedState {
        let mut s = MeshState::default();
        s.services.insert(
            "shop/web".into(),
            ServiceState {
                vip: None,
                endpoints: [
                    (
                        "agents/a1".to_owned(),
                        ep(
                            "10.0.0.2",
                            Some(WEB),
                            &[
                                ("causeway.io/group", "web-vms"),
                                ("app", "web"),
                                ("version", "v2"),
                            ],
                        ),
                    ),
                    (
                        "consul/x".to_owned(),
                        ep("10.0.0.9", None, &[("app", "legacy")]),
                    ),
                ]
                .into(),
                hostnames: vec![],
                source_kinds: vec![],
                consul_tags: vec![],
                consul_datacenters: vec![],
                eureka_vips: vec![],
            },
        );
        SharedState::new(s)
    }

    fn record(side: Side, code: u16, upstream: Option<&str>, conn: ConnInfo) -> RequestRecord {
        RequestRecord {
            side,
            start: SystemTime::now(),
            method: "GET".into(),
            authority: "web".into(),
            path: "/".into(),
            protocol: "HTTP/1.1",
            response_code: code,
            grpc_status: None,
            response_flags: ResponseFlags::NONE,
            subset: None,
            request_bytes: 3,
            response_bytes: 1200,
            duration: Duration::from_millis(7),
            upstream_host: upstream.map(str::to_owned),
            trace_headers: vec![],
            conn,
            source_principal: None,
            destination_principal: None,
            trace: None,
        }
    }

    fn scrape(m: &Arc<IstioMetrics>) -> String {
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(IstioCollector(m.clone())));
        causeway_telemetry::metrics::encode(&reg, causeway_telemetry::metrics::PROMETHEUS_TEXT)
    }

    /// The scraped `istio_requests_total` series whose `label` is `value`.
    fn requests_total_line<'a>(text: &'a str, label: &str, value: &str) -> &'a str {
        let want = format!("{label}=\"{value}\"");
        text.lines()
            .find(|l| l.starts_with("istio_requests_total{") && l.contains(&want))
            .unwrap_or_else(|| panic!("no istio_requests_total series with {want}: {text}"))
    }

    fn istio(identity: &str, group: &str, max: usize) -> Arc<Istio> {
        Arc::new(Istio {
            metrics: Arc::new(IstioMetrics::new(max)),
            labeler: Labeler::new(identity, group, "causeway", state()),
        })
    }

    #[test]
    fn a_request_routed_to_a_subset_carries_its_version() {
        assert_eq!(PEER_LABELS[DESTINATION_VERSION], "destination_version");
        let src = istio(CLIENT, "clients", 100);
        let o = IstioObserver::new(src.clone(), Scope::Source(Arc::from("shop/web")));
        let subset = |v: &str| {
            Some(crate::dataplane::http::SubsetRecord {
                name: Arc::from(v),
                version: Some(Arc::from(v)),
            })
        };
        // The subset's only endpoint is down: no upstream, the version is the subset's.
        let mut r = record(Side::Source, 503, None, ConnInfo::default());
        r.response_flags = ResponseFlags::NO_HEALTHY_UPSTREAM;
        r.subset = subset("v3");
        o.on_request(r);
        // Reached: the endpoint's version, the same as the subset's.
        let mut r = record(
            Side::Source,
            200,
            Some("10.0.0.2:8080"),
            ConnInfo::default(),
        );
        r.subset = subset("v2");
        o.on_request(r);
        // Without a subset and no upstream: unknown, as before.
        o.on_request(record(Side::Source, 502, None, ConnInfo::default()));
        let text = scrape(&src.metrics);
        let line = |code: &str| requests_total_line(&text, "response_code", code).to_owned();
        assert!(line("503").contains("destination_version=\"v3\""), "{text}");
        assert!(line("200").contains("destination_version=\"v2\""), "{text}");
        assert!(
            line("502").contains("destination_version=\"unknown\""),
            "{text}"
        );
    }

    #[test]
    fn both_reporters_label_requests_as_istio() {
        // The client's agent.
        let src = istio(CLIENT, "clients", 100);
        let o = IstioObserver::new(src.clone(), Scope::Source(Arc::from("shop/web")));
        o.on_request(record(
            Side::Source,
            200,
            Some("10.0.0.2:8080"),
            ConnInfo::default(),
        ));
        o.on_request(record(
            Side::Source,
            500,
            Some("10.0.0.2:8080"),
            ConnInfo::default(),
        ));
        o.on_request(record(
            Side::Source,
            200,
            Some("10.0.0.9:8080"),
            ConnInfo::default(),
        ));
        let text = scrape(&src.metrics);
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"500\""))
            .unwrap_or_else(|| panic!("{text}"));
        for want in [
            "reporter=\"source\"",
            "source_workload=\"clients\"",
            "source_workload_namespace=\"shop\"",
            &format!("source_principal=\"{CLIENT}\""),
            "destination_workload=\"web-vms\"",
            "destination_workload_namespace=\"shop\"",
            &format!("destination_principal=\"{WEB}\""),
            "destination_app=\"web\"",
            "destination_version=\"v2\"",
            "destination_service=\"web.shop.causeway\"",
            "destination_service_name=\"web\"",
            "destination_service_namespace=\"shop\"",
            "request_protocol=\"http\"",
            "grpc_response_status=\"\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(line.contains(want), "{want} not in {line}");
        }
        assert!(line.ends_with(" 1"), "{line}");
        // The endpoint without an agent: the service is the workload, in plaintext.
        let legacy = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{") && l.contains("legacy"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            legacy.contains("destination_workload=\"web\"")
                && legacy.contains("destination_principal=\"unknown\"")
                && legacy.contains("connection_security_policy=\"none\""),
            "{legacy}"
        );
        assert!(
            text.contains("# TYPE istio_request_duration_milliseconds histogram")
                && text.contains("le=\"0.5\"")
                && text.contains("le=\"3.6e+06\"")
                && text.contains("le=\"+Inf\""),
            "{text}"
        );

        // The server's agent: the peer comes with the connection.
        let dst = istio(WEB, "web-vms", 100);
        let o = IstioObserver::new(dst.clone(), Scope::Destination);
        let conn = ConnInfo {
            peer_identity: Some(Arc::from(CLIENT)),
            service: Some(Arc::from("shop/web")),
        };
        o.on_request(record(Side::Destination, 200, Some("127.0.0.1:8080"), conn));
        let text = scrape(&dst.metrics);
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{"))
            .unwrap_or_else(|| panic!("{text}"));
        for want in [
            "reporter=\"destination\"",
            "source_workload=\"unknown\"",
            "source_workload_namespace=\"shop\"",
            &format!("source_principal=\"{CLIENT}\""),
            "destination_workload=\"web-vms\"",
            "destination_app=\"web\"",
            "destination_service_name=\"web\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(line.contains(want), "{want} not in {line}");
        }
    }

    #[test]
    fn tcp_connections_count_bytes_and_closes() {
        let src = istio(CLIENT, "clients", 100);
        let svc: Arc<str> = Arc::from("shop/web");
        let c = src.source_tcp(Some(&svc), Some("10.0.0.2:8080"), true);
        c.bytes(10, 0);
        c.bytes(5, 7);
        let text = scrape(&src.metrics);
        assert!(
            text.contains("istio_tcp_connections_closed_total{") && text.contains("} 0\n"),
            "{text}"
        );
        drop(c);
        let p = src.source_tcp(None, None, false);
        drop(p);
        let text = scrape(&src.metrics);
        let value = |name: &str, svc: &str| -> u64 {
            text.lines()
                .find(|l| {
                    l.starts_with(name)
                        && l.contains(&format!("destination_service_name=\"{svc}\""))
                })
                .unwrap_or_else(|| panic!("{name} {svc}: {text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        assert_eq!(value("istio_tcp_received_bytes_total{", "web"), 15);
        assert_eq!(value("istio_tcp_sent_bytes_total{", "web"), 7);
        assert_eq!(value("istio_tcp_connections_opened_total{", "web"), 1);
        assert_eq!(value("istio_tcp_connections_closed_total{", "web"), 1);
        assert_eq!(value("istio_tcp_connections_closed_total{", PASSTHROUGH), 1);
    }

    /// The observer counts a request like the last one into the last one's series
    /// without making its labels again; a new mesh snapshot (here the endpoint's
    /// `version` label changes) relabels the next request, and a label set folded into
    /// the overflow series is counted as overflow every time it is seen.
    #[test]
    fn repeated_requests_follow_mesh_changes_and_overflow_counts() {
        let src = istio(CLIENT, "clients", 2);
        let o = IstioObserver::new(src.clone(), Scope::Source(Arc::from("shop/web")));
        let ok = || {
            record(
                Side::Source,
                200,
                Some("10.0.0.2:8080"),
                ConnInfo::default(),
            )
        };
        o.on_request(ok());
        o.on_request(ok());
        src.labeler.state.modify(|s| {
            let e = s
                .services
                .get_mut("shop/web")
                .and_then(|svc| svc.endpoints.get_mut("agents/a1"))
                .expect("endpoint a1");
            e.labels.insert("version".into(), "v3".into());
        });
        o.on_request(ok());
        let text = scrape(&src.metrics);
        let count = |version: &str| {
            requests_total_line(&text, "destination_version", version)
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        };
        assert_eq!((count("v2"), count("v3")), (Some(2), Some(1)), "{text}");
        // The cap (2) is reached: a third label set, twice, overflows twice.
        for _ in 0..2 {
            o.on_request(record(
                Side::Source,
                500,
                Some("10.0.0.2:8080"),
                ConnInfo::default(),
            ));
        }
        assert_eq!(src.metrics.http.overflowed(), 2);
        o.on_request(ok());
        assert_eq!(src.metrics.http.overflowed(), 2);
        assert_eq!(count("v3"), Some(1), "scraped before the last request");
        let text = scrape(&src.metrics);
        assert!(
            text.lines().any(|l| l.starts_with("istio_requests_total{")
                && l.contains("destination_version=\"v3\"")
                && l.ends_with(" 2")),
            "{text}"
        );
    }

    /// Paths are not labels (as in Istio): 100,000 distinct paths are one series.
    #[test]
    fn distinct_paths_are_one_series() {
        let src = istio(CLIENT, "clients", 50);
        let o = IstioObserver::new(src.clone(), Scope::Source(Arc::from("shop/web")));
        for i in 0..100_000u32 {
            let mut r = record(
                Side::Source,
                200,
                Some("10.0.0.2:8080"),
                ConnInfo::default(),
            );
            r.path = format!("/item/{i}?q={i}");
            o.on_request(r);
        }
        assert_eq!(
            (src.metrics.http.len(), src.metrics.http.overflowed()),
            (1, 0)
        );
        let text = scrape(&src.metrics);
        assert!(!text.contains("/item/"), "a path became a label");
    }

    /// 100,000 distinct label sets (here: destination services) leave the cap plus one
    /// series; each one past the cap is counted, and its requests land in the overflow
    /// series.
    #[test]
    fn the_series_cap_holds_and_overflow_is_counted() {
        let src = istio(CLIENT, "clients", 50);
        for i in 0..100_000u32 {
            let o = IstioObserver::new(src.clone(), Scope::Source(Arc::from(format!("shop/s{i}"))));
            o.on_request(record(Side::Source, 200, None, ConnInfo::default()));
        }
        assert_eq!(src.metrics.http.len(), 51);
        let text = scrape(&src.metrics);
        assert!(
            text.contains(
                "causeway_telemetry_series_overflow_total{family=\"istio_requests\"} 99950"
            ),
            "{}",
            text.lines()
                .filter(|l| l.starts_with("causeway_"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let overflow = text
            .lines()
            .find(|l| {
                l.starts_with("istio_requests_total{") && l.contains("source_workload=\"overflow\"")
            })
            .unwrap_or_else(|| panic!("no overflow series"));
        assert!(
            overflow.contains("reporter=\"source\"") && overflow.ends_with(" 99950"),
            "{overflow}"
        );
    }
}
