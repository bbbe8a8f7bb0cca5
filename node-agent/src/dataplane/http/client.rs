//! [`Proxy`]: serves one downstream connection with hyper and forwards each request through
//! an [`Upstream`], with pooled upstream connections.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use ::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ::http::uri::{Authority, PathAndQuery, Scheme};
use ::http::{Method, Request, Response, StatusCode, Uri, Version};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::record::{
    BoxError, ConnInfo, CountingBody, ObservedBody, Observer, Pending, RequestRecord,
    ResponseFlags, SubsetRecord, grpc_status, trace_headers,
};
use super::{HttpSettings, Side};
use crate::dataplane::pool::{Admitted, PoolLimits};
use crate::dataplane::route::{Dest, Plan};

/// A byte stream to an upstream (a tunnel stream, a TCP connection).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Why an [`Upstream`] could not give a connection.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// There is no healthy endpoint to send the request to (503 `UH`).
    #[error("no healthy upstream endpoint for {0}")]
    NoHealthyUpstream(String),
    /// Connecting failed (503 `UF`).
    #[error("cannot connect to upstream {peer}: {source}")]
    Connect {
        /// The endpoint tried.
        peer: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A new upstream connection and where it goes.
pub struct UpstreamConn {
    /// The stream.
    pub io: Box<dyn Io>,
    /// The upstream host as recorded in [`RequestRecord::upstream_host`] (`ip:port`).
    pub peer: String,
    /// The upstream's SPIFFE ID when it is an agent's (a tunnel stream), recorded as
    /// [`RequestRecord::destination_principal`] at the source agent.
    pub identity: Option<String>,
}

impl std::fmt::Debug for UpstreamConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConn")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// Where a [`Proxy`] sends requests. On the client side: the balancer's choice of endpoint
/// per request, and a tunnel stream to it; on the server side a TCP connection to the local
/// application ([`super::server::LocalApp`]).
pub trait Upstream: Send + Sync + 'static {
    /// Chooses the endpoint of one request (per-request load balancing, also for HTTP/2).
    /// Requests to the same endpoint key share that endpoint's pooled connections. The
    /// default is a single endpoint, `""`. An error answers the request with 503
    /// ([`UpstreamError::NoHealthyUpstream`]: `UH`).
    fn pick(&self) -> Result<String, UpstreamError> {
        Ok(String::new())
    }

    /// Routing (issue 21): what a VirtualService decides for this request (destination,
    /// faults, retries, timeout, header operations, rewrite), or `None` to send it to
    /// [`Upstream::pick`]'s choice as it is. Called once per request, before anything is
    /// sent.
    fn plan(&self, _req: &::http::request::Parts) -> Option<Plan> {
        None
    }

    /// The answer of `endpoint` to a try of a request routed to `dest`: its status, 503
    /// for a failed connection or a reset, 504 for a per-try timeout (outlier detection).
    fn observed(&self, _dest: &Dest, _endpoint: &str, _status: u16) {}

    /// Chooses the endpoint of a request routed to `dest` (with the request's
    /// consistent-hash key, if the destination hashes), avoiding the endpoints of `tried`
    /// (earlier tries of the same request) while another is left.
    fn pick_for(
        &self,
        _dest: &Dest,
        _hash: Option<u64>,
        _tried: &[String],
    ) -> Result<String, UpstreamError> {
        self.pick()
    }

    /// Opens a connection to `endpoint` (a key from [`Upstream::pick`]) when its pool has
    /// no idle one. Bound it by a connect timeout of its own if it can hang (the proxy's
    /// request timeout bounds it too, as `UT`).
    fn connect(
        &self,
        endpoint: &str,
    ) -> impl Future<Output = Result<UpstreamConn, UpstreamError>> + Send;
}

/// A decision on each request before it is forwarded (the destination agent's
/// authentication and authorization, `super::authz`). `Ok` forwards the request, whose
/// head it may have changed (headers added or removed, the path normalised); `Err` answers
/// it with the [`Refusal`] and forwards nothing.
pub trait Admission: Send + Sync + 'static {
    /// Decides one request from its head.
    fn admit<'a>(
        &'a self,
        head: &'a mut ::http::request::Parts,
    ) -> Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send + 'a>>;
}

/// The answer to a request an [`Admission`] refused (Envoy's local reply: 403 `RBAC:
/// access denied`, 401 `Jwt verification fails` with `WWW-Authenticate`).
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The status.
    pub status: StatusCode,
    /// The body (text/plain; for a gRPC request the `grpc-message`).
    pub body: &'static str,
    /// Headers added to the answer.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The response flags recorded.
    pub flags: ResponseFlags,
}

/// The upstream host and its identity, carried from the connector to the response.
#[derive(Clone, Debug)]
struct UpstreamHost(String, Option<Arc<str>>);

/// A pooled upstream connection as hyper's client sees it.
struct PooledConn {
    io: TokioIo<Box<dyn Io>>,
    peer: String,
    identity: Option<Arc<str>>,
}

impl Connection for PooledConn {
    fn connected(&self) -> Connected {
        Connected::new().extra(UpstreamHost(self.peer.clone(), self.identity.clone()))
    }
}

impl hyper::rt::Read for PooledConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PooledConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        hyper::rt::Write::is_write_vectored(&self.io)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// hyper's connector over an [`Upstream`], for one endpoint.
struct Connector<U>(Arc<U>, Arc<str>);

impl<U> Clone for Connector<U> {
    fn clone(&self) -> Self {
        Self(self.0.clone(), self.1.clone())
    }
}

impl<U: Upstream> tower_service::Service<Uri> for Connector<U> {
    type Response = PooledConn;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<PooledConn, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let (upstream, endpoint) = (self.0.clone(), self.1.clone());
        Box::pin(async move {
            let c = upstream.connect(&endpoint).await?;
            Ok(PooledConn {
                io: TokioIo::new(c.io),
                peer: c.peer,
                identity: c.identity.map(Arc::from),
            })
        })
    }
}

/// The request body sent upstream: streamed, or buffered when a route may retry it.
type UpBody = CountingBody<http_body_util::Either<Incoming, Full<Bytes>>>;

/// The largest request body buffered so that a route can retry the request (Envoy's
/// default buffer limit is 1 MiB; retries are for small API calls). A larger or
/// unknown-length body is streamed and not retried.
const MAX_RETRY_BODY: u64 = 64 * 1024;

/// A request that got no upstream response: what the agent answers.
struct Failure {
    status: StatusCode,
    flags: ResponseFlags,
    text: String,
    host: Option<String>,
    /// The `connectionPool` limit that refused the request (`x-causeway-overflow`).
    overflow: Option<&'static str>,
}

impl Failure {
    fn timeout() -> Failure {
        Failure {
            status: StatusCode::GATEWAY_TIMEOUT,
            flags: ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
            text: "upstream request timeout".into(),
            host: None,
            overflow: None,
        }
    }

    /// Envoy's circuit-breaker answer (503 `UO`), naming the limit.
    fn overflow(o: crate::dataplane::pool::Overflow) -> Failure {
        Failure {
            status: StatusCode::SERVICE_UNAVAILABLE,
            flags: ResponseFlags::UPSTREAM_OVERFLOW,
            text: format!(
                "upstream connect error or disconnect/reset before headers. reset reason: overflow ({} of the destination's DestinationRule)",
                o.field()
            ),
            host: None,
            overflow: Some(o.field()),
        }
    }
}

/// Envoy's retry back-off: a random time up to `(2^n - 1) × 25 ms`, at most 250 ms.
fn retry_backoff(n: u32) -> std::time::Duration {
    let cap = (25u64 << n.min(4)).saturating_sub(25).clamp(25, 250);
    std::time::Duration::from_millis(crate::dataplane::lb::random() % (cap + 1))
}

/// The connection pools of one endpoint.
struct Pools<U> {
    /// HTTP/1.1 upstream connections (keep-alive pool).
    h1: Client<Connector<U>, UpBody>,
    /// HTTP/2 upstream connections (prior knowledge; one multiplexed connection).
    h2: Client<Connector<U>, UpBody>,
}

struct Inner<U> {
    settings: HttpSettings,
    observer: Arc<dyn Observer>,
    upstream: Arc<U>,
    /// Per endpoint key.
    pools: Mutex<HashMap<String, Arc<Pools<U>>>>,
}

impl<U: Upstream> Inner<U> {
    fn pools(&self, endpoint: &str) -> Arc<Pools<U>> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pools.get(endpoint) {
            return p.clone();
        }
        let connector = Connector(self.upstream.clone(), Arc::from(endpoint));
        let client = |h2: bool| {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .pool_idle_timeout(self.settings.pool_idle_timeout)
                .http1_max_buf_size(self.settings.max_header_bytes.max(8192) + 8192)
                .set_host(false)
                .http2_only(h2);
            b.build(connector.clone())
        };
        let p = Arc::new(Pools {
            h1: client(false),
            h2: client(true),
        });
        pools.insert(endpoint.to_owned(), p.clone());
        p
    }
}

/// A driven upstream connection (hyper's `Connection` future), polled by the task of the
/// downstream connection that opened it.
type ConnTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The most upstream HTTP/1.1 connections one downstream HTTP/1.1 connection holds (one
/// per endpoint its requests went to); a request to yet another endpoint uses the shared
/// pool.
const STICKY_MAX: usize = 4;

/// The upstream HTTP/1.1 connections of one downstream HTTP/1.1 connection, driven by the
/// downstream connection's own task ([`Proxy::serve_full`] polls them next to hyper's
/// server connection). A keep-alive client's requests then go out on "its" upstream
/// connection: no pool checkout, no task of its own per upstream connection, no hand-off
/// of each request and response between tasks. HTTP/1.1 serves one request at a time, so
/// one connection per endpoint is the usual case; a connection that is not ready (its last
/// response still streaming) gets a sibling, up to [`STICKY_MAX`]. The connections close
/// with the downstream connection.
#[derive(Default)]
struct Sticky {
    /// Connection futures opened by requests, not yet polled by the driver.
    opened: Mutex<Vec<ConnTask>>,
    /// The connections' senders, with their endpoint key and upstream host.
    conns: Mutex<Vec<StickyConn>>,
}

struct StickyConn {
    endpoint: Arc<str>,
    send: hyper::client::conn::http1::SendRequest<UpBody>,
    host: UpstreamHost,
}

impl Sticky {
    /// A ready connection to `endpoint` (closed ones are dropped), or whether there is room
    /// for a new one (`Err(true)`).
    fn take(&self, endpoint: &str) -> Result<StickyConn, bool> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| !c.send.is_closed());
        match conns
            .iter()
            .position(|c| &*c.endpoint == endpoint && c.send.is_ready())
        {
            Some(i) => Ok(conns.swap_remove(i)),
            None => Err(conns.len() < STICKY_MAX),
        }
    }

    fn put(&self, conn: StickyConn) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }

    fn drive(&self, task: ConnTask) {
        self.opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    /// Moves newly opened connections into `tasks`; whether there were any.
    fn adopt(&self, tasks: &mut Vec<ConnTask>) -> bool {
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        let any = !opened.is_empty();
        tasks.append(&mut opened);
        any
    }
}

/// Why a try got no response.
enum SendError {
    /// The shared pool's client failed.
    Pool(hyper_util::client::legacy::Error),
    /// No connection to the endpoint could be opened.
    Connect(UpstreamError),
    /// The connection failed before the response head (`None`: it closed before the
    /// request went out), with the upstream host when known.
    Conn(Option<hyper::Error>, Option<String>),
}

impl SendError {
    /// The response flags and reply text for a failed upstream request.
    fn classify(&self) -> (ResponseFlags, String, Option<String>) {
        match self {
            SendError::Pool(e) => classify(e),
            SendError::Connect(e) => classify_upstream(e),
            SendError::Conn(_, host) => (
                ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
                CONNECTION_TERMINATION.into(),
                host.clone(),
            ),
        }
    }

    fn chain(&self) -> String {
        match self {
            SendError::Pool(e) => error_chain(e),
            SendError::Connect(e) => error_chain(e),
            SendError::Conn(Some(e), _) => error_chain(e),
            SendError::Conn(None, _) => "the upstream connection closed".into(),
        }
    }
}

/// The HTTP proxy for one destination: serves downstream connections ([`Proxy::serve`])
/// and forwards their requests to its [`Upstream`] through a shared connection pool. Cheap
/// to clone; build one per upstream target (e.g. per service port) and keep it, so that
/// connections are reused across downstream connections.
pub struct Proxy<U> {
    inner: Arc<Inner<U>>,
}

impl<U> std::fmt::Debug for Proxy<U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").finish_non_exhaustive()
    }
}

impl<U> Clone for Proxy<U> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// The pool key: every request of a [`Proxy`] goes to the same [`Upstream`], so one key.
const POOL_AUTHORITY: &str = "upstream.causeway.invalid";

impl<U: Upstream> Proxy<U> {
    /// A proxy forwarding to `upstream`, reporting to `observer`.
    pub fn new(upstream: U, settings: HttpSettings, observer: Arc<dyn Observer>) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                observer,
                upstream: Arc::new(upstream),
                pools: Mutex::default(),
            }),
        }
    }

    /// Drops the pools of endpoints for which `keep` is false (endpoints gone from the
    /// mesh); their idle connections close, requests in flight finish.
    pub fn retain_endpoints(&self, keep: impl Fn(&str) -> bool) {
        self.inner
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| keep(k));
    }

    /// Serves one downstream connection until it closes: HTTP/1.1 (keep-alive, pipelined
    /// requests answered in order) or HTTP/2 prior knowledge, decided by its first bytes.
    /// Returns when the connection is done; an error is the connection's (a protocol error,
    /// a reset, the header timeout), never another connection's.
    pub async fn serve<IO: Io>(&self, io: IO) -> Result<(), BoxError> {
        self.serve_full(io, ConnInfo::default(), None).await
    }

    /// [`Self::serve`], with every request of the connection decided by `admission`
    /// before it is forwarded.
    pub async fn serve_admitted<IO: Io>(
        &self,
        io: IO,
        admission: Option<Arc<dyn Admission>>,
    ) -> Result<(), BoxError> {
        self.serve_full(io, ConnInfo::default(), admission).await
    }

    /// [`Proxy::serve`], with what is known of the connection (recorded in every
    /// [`RequestRecord::conn`] of its requests).
    pub async fn serve_with<IO: Io>(&self, io: IO, conn: ConnInfo) -> Result<(), BoxError> {
        self.serve_full(io, conn, None).await
    }

    /// [`Proxy::serve`] with both: what is known of the connection, and the admission
    /// that decides each request before it is forwarded.
    pub async fn serve_full<IO: Io>(
        &self,
        io: IO,
        conn: ConnInfo,
        admission: Option<Arc<dyn Admission>>,
    ) -> Result<(), BoxError> {
        let s = &self.inner.settings;
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .header_read_timeout(s.header_read_timeout)
            .max_buf_size(s.max_header_bytes.max(8192))
            .max_headers(s.max_headers);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX));
        let this = self.clone();
        let info = conn.clone();
        let sticky = Arc::new(Sticky::default());
        let ours = sticky.clone();
        let service = service_fn(move |req| {
            let (this, info, admission) = (this.clone(), info.clone(), admission.clone());
            let sticky = ours.clone();
            async move {
                Ok::<_, std::convert::Infallible>(
                    this.handle(req, info, admission.as_deref(), &sticky).await,
                )
            }
        });
        let started = (Instant::now(), SystemTime::now());
        let mut served =
            std::pin::pin!(builder.serve_connection_with_upgrades(TokioIo::new(io), service));
        // The upstream connections this connection's requests opened ([`Sticky`]) are
        // polled here, in this task, before the server connection that waits on them.
        let mut upstream: Vec<ConnTask> = Vec::new();
        let result = std::future::poll_fn(|cx| {
            loop {
                sticky.adopt(&mut upstream);
                upstream.retain_mut(|c| c.as_mut().poll(cx).is_pending());
                if let Poll::Ready(r) = served.as_mut().poll(cx) {
                    return Poll::Ready(r);
                }
                if !sticky.adopt(&mut upstream) {
                    return Poll::Pending;
                }
            }
        })
        .await;
        if let Err(e) = &result
            && let Some(status) = e
                .downcast_ref::<hyper::Error>()
                .and_then(parse_error_status)
        {
            // hyper answered a malformed or oversized request head itself: log why, and
            // record it as Envoy does (the status and `DPE`).
            tracing::warn!(
                status,
                error = %e,
                max_header_bytes = s.max_header_bytes,
                max_headers = s.max_headers,
                "request refused: malformed or oversized request head"
            );
            let (source_principal, destination_principal) = self.principals(&conn);
            self.inner.observer.on_request(RequestRecord {
                side: s.side,
                start: started.1,
                method: String::new(),
                authority: String::new(),
                path: String::new(),
                protocol: "HTTP/1.1",
                response_code: status,
                grpc_status: None,
                response_flags: ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR,
                subset: None,
                request_bytes: 0,
                response_bytes: 0,
                duration: started.0.elapsed(),
                upstream_host: None,
                trace_headers: Vec::new(),
                source_principal,
                destination_principal,
                trace: None,
                conn,
            });
        }
        result
    }

    /// The principals a request of connection `conn` starts with: at the source this
    /// agent's own and the destination's still unknown (each request's upstream names it);
    /// at the destination the authenticated peer's and this agent's own.
    fn principals(&self, conn: &ConnInfo) -> (Option<Arc<str>>, Option<Arc<str>>) {
        let own = self.inner.settings.own_identity.clone();
        match self.inner.settings.side {
            Side::Source => (own, None),
            Side::Destination => (conn.peer_identity.clone(), own),
        }
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        conn: ConnInfo,
        admission: Option<&dyn Admission>,
        sticky: &Sticky,
    ) -> Response<ObservedBody> {
        let inner = &self.inner;
        let started = Instant::now();
        let version = req.version();
        let (source_principal, destination_principal) = self.principals(&conn);
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let request_bytes = Arc::new(AtomicU64::new(0));
        let mut pending = Pending {
            record: RequestRecord {
                side: inner.settings.side,
                start: SystemTime::now(),
                method: req.method().as_str().to_owned(),
                authority,
                path: req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_else(|| "/".into()),
                protocol: match version {
                    Version::HTTP_2 => "HTTP/2",
                    Version::HTTP_10 => "HTTP/1.0",
                    _ => "HTTP/1.1",
                },
                response_code: 0,
                grpc_status: None,
                response_flags: ResponseFlags::NONE,
                subset: None,
                request_bytes: 0,
                response_bytes: 0,
                duration: Default::default(),
                upstream_host: None,
                trace_headers: trace_headers(req.headers()),
                // Trace context: this agent's span; the headers are rewritten for the next
                // hop (crate::telemetry::trace). Before the admission, so that a refused
                // request still records its trace id.
                trace: crate::telemetry::trace::on_request(
                    &inner.settings.trace,
                    req.headers_mut(),
                ),
                source_principal,
                destination_principal,
                conn,
            },
            started,
            request_bytes: request_bytes.clone(),
            observer: inner.observer.clone(),
            grpc: req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc")),
        };

        let upgrade = is_upgrade(&req);
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        if !upgrade {
            strip_hop_by_hop(req.headers_mut());
        }
        let h2 = version == Version::HTTP_2;
        let (mut parts, body) = req.into_parts();
        if let Some(a) = admission
            && let Err(refusal) = a.admit(&mut parts).await
        {
            let mut resp = local_reply(pending, refusal.status, refusal.flags, refusal.body);
            resp.headers_mut().extend(refusal.headers);
            return resp;
        }
        // Routing (issue 21). Upgrades and CONNECT are byte streams: not routed.
        let plan = if upgrade {
            None
        } else {
            inner.upstream.plan(&parts)
        };
        if let Some(plan) = &plan {
            pending.record.subset = plan.dest.subset.as_deref().map(|name| SubsetRecord {
                name: Arc::from(name),
                version: plan
                    .dest
                    .labels
                    .get("version")
                    .map(|v| Arc::from(v.as_str())),
            });
            if let Some(delay) = plan.delay {
                pending
                    .record
                    .response_flags
                    .insert(ResponseFlags::DELAY_INJECTED);
                tokio::time::sleep(delay).await;
            }
            if let Some(status) = plan.abort {
                return local_reply(
                    pending,
                    status,
                    ResponseFlags::FAULT_INJECTED,
                    "fault filter abort",
                );
            }
            plan.apply_request(&mut parts);
        }
        parts.uri = upstream_uri(&parts.uri, &parts.method);
        if !h2 {
            // hyper's HTTP/1 client refuses other versions; HTTP/1.0 clients get HTTP/1.1
            // framing upstream, their own framing downstream.
            parts.version = Version::HTTP_11;
        }
        // HTTP/1.1 requests go out on the connection's own upstream connections; HTTP/2
        // (its streams are tasks of their own) and upgrades use the shared pool.
        let sticky = (!h2 && !upgrade).then_some(sticky);
        let (mut resp, upstream_host) = match self
            .forward(plan.as_ref(), parts, body, h2, request_bytes, sticky)
            .await
        {
            Ok((resp, flags, host)) => {
                pending.record.response_flags.insert(flags);
                (resp, host)
            }
            Err(f) => {
                pending.record.upstream_host = f.host;
                tracing::debug!(flags = %f.flags, text = %f.text, "upstream request failed");
                let mut resp = local_reply(pending, f.status, f.flags, &f.text);
                if let Some(limit) = f.overflow {
                    resp.headers_mut().insert(
                        HeaderName::from_static("x-causeway-overflow"),
                        HeaderValue::from_static(limit),
                    );
                }
                return resp;
            }
        };
        if let Some(plan) = &plan {
            plan.apply_response(resp.headers_mut());
        }
        if let Some(UpstreamHost(host, identity)) = upstream_host {
            pending.record.upstream_host = Some(host);
            if pending.record.destination_principal.is_none() {
                pending.record.destination_principal = identity;
            }
        }
        pending.record.response_code = resp.status().as_u16();
        pending.record.grpc_status = grpc_status(resp.headers());

        let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS
            || (pending.record.method == "CONNECT" && resp.status().is_success());
        match downstream_upgrade {
            Some(down) if switched => {
                let up = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    match tokio::try_join!(down, up) {
                        Ok((down, up)) => {
                            let mut down = TokioIo::new(down);
                            let mut up = TokioIo::new(up);
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                    }
                });
            }
            _ => strip_hop_by_hop(resp.headers_mut()),
        }
        resp.map(|body| ObservedBody::new(body, pending))
    }
}

/// Whether the next retry may go under the destination's `maxRetries` (Envoy's retry
/// circuit breaker): the previous retry's place is given back, the next one's taken and
/// held in `held` until its try is over. Over the limit the retry is not made and the
/// last try's answer goes back flagged `UO`, as Envoy does.
fn retry_admitted(limits: Option<&PoolLimits>, held: &mut Option<Admitted>) -> bool {
    *held = None;
    match limits.map(PoolLimits::admit_retry) {
        None => true,
        Some(Ok(a)) => {
            *held = Some(a);
            true
        }
        Some(Err(_)) => false,
    }
}

impl<U: Upstream> Proxy<U> {
    /// Sends a request upstream: one try, or with a route's retry policy several (each
    /// on another endpoint while one is left, each bounded by the per-try timeout), all
    /// within the route's timeout (the proxy's request timeout without a route). Returns
    /// the response with the flags to record (`URX` when the retries were used up), or
    /// what to answer instead.
    async fn forward(
        &self,
        plan: Option<&Plan>,
        mut parts: ::http::request::Parts,
        body: Incoming,
        h2: bool,
        request_bytes: Arc<AtomicU64>,
        sticky: Option<&Sticky>,
    ) -> Result<(Response<Incoming>, ResponseFlags, Option<UpstreamHost>), Failure> {
        use http_body_util::{BodyExt as _, Either};
        use hyper::body::Body as _;
        let inner = &self.inner;
        let overall = plan
            .and_then(|p| p.route.timeout)
            .unwrap_or(inner.settings.request_timeout);
        let retry = plan.map(|p| &p.route.retry);
        let limits = plan.and_then(|p| p.dest.limits.as_deref());
        if limits.is_some_and(|l| l.no_keepalive) && !h2 {
            // `maxRequestsPerConnection: 1`: the upstream connection closes after it.
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let run = async {
            // The destination's connectionPool limits (Envoy's circuit breakers): a
            // request over them is answered 503 `UO` at once; one waiting for a
            // connection (a pending request) waits within the route's timeout.
            let _admitted = match limits {
                Some(l) => Some(l.admit_request(h2).await.map_err(Failure::overflow)?),
                None => None,
            };
            // Retrying needs the body again: a small body of known length is buffered.
            let small = body.is_end_stream()
                || body
                    .size_hint()
                    .upper()
                    .is_some_and(|u| u <= MAX_RETRY_BODY);
            let attempts = match retry {
                Some(r) if small => r.attempts,
                _ => 0,
            };
            let mirror = plan.and_then(|p| p.mirror.as_ref());
            let mut streaming = None;
            let mut buffered = None;
            if attempts > 0 || (small && mirror.is_some()) {
                let bytes = match body.collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => {
                        return Err(Failure {
                            status: StatusCode::BAD_REQUEST,
                            flags: ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION,
                            text: format!("downstream request body failed: {e}"),
                            host: None,
                            overflow: None,
                        });
                    }
                };
                request_bytes.store(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                buffered = Some(bytes);
            } else {
                streaming = Some(body);
            }
            if let Some(dest) = mirror {
                match &buffered {
                    Some(body) => self.mirror(dest, &parts, body.clone(), h2),
                    None => {
                        tracing::debug!("request body too large or of unknown length: not mirrored")
                    }
                }
            }
            let mut parts = Some(parts);
            let mut tried: Vec<String> = Vec::new();
            let mut n = 0u32;
            // The place the retry in flight holds under `maxRetries`.
            let mut retry_held = None;
            loop {
                let last = n >= attempts;
                let picked = match plan {
                    Some(p) => inner.upstream.pick_for(&p.dest, p.hash, &tried),
                    None => inner.upstream.pick(),
                };
                let endpoint = match picked {
                    Ok(e) => e,
                    Err(e) => {
                        let (flags, text, host) = classify_upstream(&e);
                        return Err(Failure {
                            status: StatusCode::SERVICE_UNAVAILABLE,
                            flags,
                            text,
                            host,
                            overflow: None,
                        });
                    }
                };
                let req = match (streaming.take(), &buffered) {
                    (Some(body), _) => Request::from_parts(
                        parts.take().expect("one streamed try"),
                        CountingBody {
                            inner: Either::Left(body),
                            bytes: request_bytes.clone(),
                        },
                    ),
                    // A buffered body may be sent again: each try gets a copy of the head.
                    (None, buffered) => {
                        let head = parts.as_ref().expect("a buffered request keeps its head");
                        let mut r = Request::new(CountingBody {
                            inner: Either::Right(Full::new(buffered.clone().unwrap_or_default())),
                            bytes: Arc::new(AtomicU64::new(0)),
                        });
                        *r.method_mut() = head.method.clone();
                        *r.uri_mut() = head.uri.clone();
                        *r.version_mut() = head.version;
                        *r.headers_mut() = head.headers.clone();
                        r
                    }
                };
                tried.push(endpoint);
                let sent = self.send(&tried[tried.len() - 1], req, h2, sticky);
                let result = match plan.and_then(|p| p.route.retry.per_try) {
                    Some(t) => tokio::time::timeout(t, sent).await.ok(),
                    None => Some(sent.await),
                };
                if let (Some(p), Some(endpoint)) = (plan, tried.last()) {
                    let status = match &result {
                        Some(Ok((resp, _))) => resp.status().as_u16(),
                        Some(Err(_)) => 503,
                        None => 504,
                    };
                    inner.upstream.observed(&p.dest, endpoint, status);
                }
                let exhausted = |mut f: ResponseFlags| {
                    if attempts > 0 {
                        f.insert(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
                    }
                    f
                };
                match result {
                    Some(Ok((resp, host))) => {
                        if !retry.is_some_and(|r| r.on.status(resp.status())) {
                            return Ok((resp, ResponseFlags::NONE, host));
                        }
                        if last {
                            return Ok((resp, exhausted(ResponseFlags::NONE), host));
                        }
                        if !retry_admitted(limits, &mut retry_held) {
                            return Ok((resp, ResponseFlags::UPSTREAM_OVERFLOW, host));
                        }
                    }
                    Some(Err(e)) => {
                        let (flags, text, host) = e.classify();
                        tracing::debug!(error = %e.chain(), flags = %flags, try_ = n, "upstream try failed");
                        let again = retry.is_some_and(|r| {
                            if flags.contains(ResponseFlags::UPSTREAM_CONNECTION_FAILURE) {
                                r.on.connect_failure()
                            } else {
                                r.on.reset()
                            }
                        });
                        if !again || last {
                            return Err(Failure {
                                status: StatusCode::SERVICE_UNAVAILABLE,
                                flags: if again { exhausted(flags) } else { flags },
                                text,
                                host,
                                overflow: None,
                            });
                        }
                        if !retry_admitted(limits, &mut retry_held) {
                            let mut flags = flags;
                            flags.insert(ResponseFlags::UPSTREAM_OVERFLOW);
                            return Err(Failure {
                                status: StatusCode::SERVICE_UNAVAILABLE,
                                flags,
                                text,
                                host,
                                overflow: None,
                            });
                        }
                    }
                    None => {
                        let again = retry.is_some_and(|r| r.on.timeout());
                        if !again || last {
                            let mut f = Failure::timeout();
                            if again {
                                f.flags = exhausted(f.flags);
                            }
                            return Err(f);
                        }
                        if !retry_admitted(limits, &mut retry_held) {
                            let mut f = Failure::timeout();
                            f.flags.insert(ResponseFlags::UPSTREAM_OVERFLOW);
                            return Err(f);
                        }
                    }
                }
                n += 1;
                tokio::time::sleep(retry_backoff(n)).await;
            }
        };
        match tokio::time::timeout(overall, run).await {
            Ok(r) => r,
            Err(_) => Err(Failure::timeout()),
        }
    }
}

impl<U: Upstream> Proxy<U> {
    /// One try of a request to `endpoint`: on a [`Sticky`] connection of the downstream
    /// connection when given one (and it holds or has room for one to `endpoint`), else
    /// through the shared pool. The response comes with the upstream host it came from.
    async fn send(
        &self,
        endpoint: &str,
        mut req: Request<UpBody>,
        h2: bool,
        sticky: Option<&Sticky>,
    ) -> Result<(Response<Incoming>, Option<UpstreamHost>), SendError> {
        let target = sticky.and_then(|s| match s.take(endpoint) {
            Ok(c) => Some((s, Some(c))),
            Err(true) => Some((s, None)),
            Err(false) => None,
        });
        let Some((sticky, conn)) = target else {
            let pools = self.inner.pools(endpoint);
            let client = if h2 { &pools.h2 } else { &pools.h1 };
            return match client.request(req).await {
                Ok(mut resp) => {
                    let host = resp.extensions_mut().remove::<UpstreamHost>();
                    Ok((resp, host))
                }
                Err(e) => Err(SendError::Pool(e)),
            };
        };
        origin_form(req.uri_mut());
        let (reused, conn) = match conn {
            Some(c) => (true, c),
            None => (false, self.open(sticky, &Arc::from(endpoint)).await?),
        };
        let sent = match self.try_sticky(sticky, conn, req).await {
            Err(Ok(req)) if reused => {
                // The idle connection closed before the request went out (the upstream's
                // keep-alive timeout): once more, on a new connection.
                let conn = self.open(sticky, &Arc::from(endpoint)).await?;
                self.try_sticky(sticky, conn, req).await
            }
            sent => sent,
        };
        sent.map_err(|e| match e {
            Ok(_unsent) => SendError::Conn(None, None),
            Err((e, host)) => SendError::Conn(Some(e), host),
        })
    }

    /// Sends `req` on `conn`, which goes back to `sticky` at once (it is ready again for
    /// the next request once this one's response has been read). `Err(Ok(req))`: the
    /// request was not sent (the connection had closed).
    async fn try_sticky(
        &self,
        sticky: &Sticky,
        mut conn: StickyConn,
        req: Request<UpBody>,
    ) -> Result<
        (Response<Incoming>, Option<UpstreamHost>),
        Result<Request<UpBody>, (hyper::Error, Option<String>)>,
    > {
        let sent = conn.send.try_send_request(req);
        let host = conn.host.clone();
        sticky.put(conn);
        match sent.await {
            Ok(resp) => Ok((resp, Some(host))),
            Err(mut e) => match e.take_message() {
                Some(req) => Err(Ok(req)),
                None => Err(Err((e.into_error(), Some(host.0)))),
            },
        }
    }

    /// Opens a [`Sticky`] connection to `endpoint`, driven by the downstream connection's
    /// task.
    async fn open(&self, sticky: &Sticky, endpoint: &Arc<str>) -> Result<StickyConn, SendError> {
        let c = self
            .inner
            .upstream
            .connect(endpoint)
            .await
            .map_err(SendError::Connect)?;
        let host = UpstreamHost(c.peer, c.identity.map(Arc::from));
        let (send, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(self.inner.settings.max_header_bytes.max(8192) + 8192)
            .handshake(TokioIo::new(c.io))
            .await
            .map_err(|e| SendError::Conn(Some(e), Some(host.0.clone())))?;
        sticky.drive(Box::pin(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %error_chain(&e), "upstream connection failed");
            }
        }));
        Ok(StickyConn {
            endpoint: endpoint.clone(),
            send,
            host,
        })
    }

    /// Sends a copy of a request to `dest`, fire and forget: its own task, its response
    /// discarded, bounded by the proxy's request timeout; the primary request never
    /// waits for it. The authority gets Envoy's `-shadow` suffix.
    fn mirror(&self, dest: &Arc<Dest>, parts: &::http::request::Parts, body: Bytes, h2: bool) {
        let this = self.clone();
        let dest = dest.clone();
        let mut req = Request::new(CountingBody {
            inner: http_body_util::Either::Right(Full::new(body)),
            bytes: Arc::new(AtomicU64::new(0)),
        });
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        if let Some(host) = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| HeaderValue::from_str(&shadow_host(h)).ok())
        {
            req.headers_mut().insert(header::HOST, host);
        }
        tokio::spawn(async move {
            let inner = &this.inner;
            let endpoint = match inner.upstream.pick_for(&dest, None, &[]) {
                Ok(e) => e,
                Err(e) => {
                    tracing::debug!(error = %e, "mirror: no endpoint");
                    return;
                }
            };
            let pools = inner.pools(&endpoint);
            let client = if h2 { &pools.h2 } else { &pools.h1 };
            let sent = tokio::time::timeout(inner.settings.request_timeout, async {
                let resp = client.request(req).await?;
                // Read the body so the pooled connection can be reused.
                http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .map_err(|e| e.into())
                    .map(|_| ())
            })
            .await;
            match sent {
                Ok(Ok(())) => {}
                Ok(Err::<(), BoxError>(e)) => tracing::debug!(error = %e, "mirror failed"),
                Err(_) => tracing::debug!("mirror timed out"),
            }
        });
    }
}

/// `host[:port]` with Envoy's shadow suffix on the host: `web-shadow[:port]`.
fn shadow_host(h: &str) -> String {
    match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{h}-shadow"),
    }
}

/// The status hyper's HTTP/1 server sends for a request head it cannot parse (400, 431 or
/// 414; `hyper::proto::h1::role::Server::on_error`), `None` for other connection errors.
fn parse_error_status(e: &hyper::Error) -> Option<u16> {
    if !e.is_parse() || e.is_parse_version_h2() || e.is_parse_status() {
        return None;
    }
    Some(if !e.is_parse_too_large() {
        400
    } else if e.to_string().to_ascii_lowercase().contains("uri") {
        414
    } else {
        431
    })
}

/// The request's URI as hyper's client needs it (absolute, with the pool's key); the client
/// sends origin form (authority form for CONNECT) on HTTP/1.1 and the original authority
/// in the `Host` header, which it leaves alone. HTTP/2 keeps the original `:authority`.
fn upstream_uri(uri: &Uri, method: &Method) -> Uri {
    if uri.authority().is_some() || *method == Method::CONNECT {
        return uri.clone();
    }
    let mut parts = ::http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(Authority::from_static(POOL_AUTHORITY));
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// An HTTP/1.1 Upgrade (WebSocket, h2c upgrade is not offered) or a CONNECT.
fn is_upgrade<B>(req: &Request<B>) -> bool {
    if req.method() == Method::CONNECT {
        return true;
    }
    req.version() != Version::HTTP_2
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Whether `name` is one of the hop-by-hop headers [`strip_hop_by_hop`] removes or
/// rewrites (those a `Connection` header names come only with a `Connection` header).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::TRAILER
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1), including those the `Connection`
/// header names; `TE: trailers` stays (gRPC needs it).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over their few names instead of a dozen
    // lookups, per request and per response.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if name != header::TE {
            headers.remove(name);
        }
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn upstream_host_of(c: &Connected) -> Option<String> {
    let mut ext = ::http::Extensions::new();
    c.get_extras(&mut ext);
    ext.get::<UpstreamHost>().map(|h| h.0.clone())
}

/// The response flags and reply text for a failed upstream request.
fn classify(e: &hyper_util::client::legacy::Error) -> (ResponseFlags, String, Option<String>) {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(up) = err.downcast_ref::<UpstreamError>() {
            return classify_upstream(up);
        }
        source = err.source();
    }
    if e.is_connect() {
        return (
            ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
            CONNECT_FAILURE.into(),
            None,
        );
    }
    (
        ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
        CONNECTION_TERMINATION.into(),
        e.connect_info().and_then(upstream_host_of),
    )
}

const CONNECTION_TERMINATION: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";

/// The origin form of a request target (`/path?query`), as hyper's pooled client sends
/// HTTP/1.1 requests.
fn origin_form(uri: &mut Uri) {
    *uri = match uri.path_and_query() {
        Some(p) if p.as_str() != "/" => {
            let mut parts = ::http::uri::Parts::default();
            parts.path_and_query = Some(p.clone());
            Uri::from_parts(parts).unwrap_or_default()
        }
        _ => Uri::default(),
    };
}

const CONNECT_FAILURE: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";

fn classify_upstream(up: &UpstreamError) -> (ResponseFlags, String, Option<String>) {
    match up {
        UpstreamError::NoHealthyUpstream(_) => (
            ResponseFlags::NO_HEALTHY_UPSTREAM,
            "no healthy upstream".into(),
            None,
        ),
        UpstreamError::Connect { peer, .. } => (
            ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
            CONNECT_FAILURE.into(),
            Some(peer.clone()),
        ),
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        s.push_str(": ");
        s.push_str(&err.to_string());
        source = err.source();
    }
    s
}

/// A response made by the agent (Envoy's wording), recorded with `flags`, which are also
/// sent in `x-causeway-response-flags`. A gRPC request gets what Envoy sends a gRPC client:
/// a trailers-only response, HTTP 200 with `grpc-status` mapped from the HTTP status
/// (503 and 504 are `UNAVAILABLE`, 14) and the text in `grpc-message`.
fn local_reply(
    mut pending: Pending,
    status: StatusCode,
    flags: ResponseFlags,
    text: &str,
) -> Response<ObservedBody> {
    pending.record.response_flags.insert(flags);
    let mut resp = if pending.grpc {
        let code = grpc_status_for(status);
        pending.record.response_code = 200;
        pending.record.grpc_status = Some(code);
        let mut resp = Response::new(ObservedBody::new(Full::new(Bytes::new()), pending));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(HeaderName::from_static("grpc-status"), code.into());
        if let Ok(v) = HeaderValue::from_str(text) {
            h.insert(HeaderName::from_static("grpc-message"), v);
        }
        resp
    } else {
        pending.record.response_code = status.as_u16();
        let mut resp = Response::new(ObservedBody::new(
            Full::new(Bytes::from(text.to_owned())),
            pending,
        ));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        resp
    };
    resp.headers_mut().insert(
        HeaderName::from_static("x-causeway-response-flags"),
        HeaderValue::from_str(&flags.to_string()).unwrap_or(HeaderValue::from_static("-")),
    );
    resp
}

/// Envoy's HTTP to gRPC status mapping (`Grpc::Utility::httpToGrpcStatus`, after the
/// gRPC spec's http-grpc-status-mapping).
fn grpc_status_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}
