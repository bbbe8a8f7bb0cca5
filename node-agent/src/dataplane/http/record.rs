//! Per-request telemetry: [`RequestRecord`], [`Observer`], Envoy's [`ResponseFlags`], and
//! the body wrappers that count bytes and emit the record when a response ends.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use ::http::HeaderMap;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Which agent handled a request (Istio's `reporter` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The client's agent (outbound).
    Source,
    /// The server's agent (inbound).
    Destination,
}

impl Side {
    /// `source` or `destination`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

/// Envoy's response flags, as a set. Displayed as Envoy's access log does: the short
/// names joined by commas, `-` when empty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u16);

impl ResponseFlags {
    /// No flags.
    pub const NONE: Self = Self(0);
    /// `UH`: no healthy upstream endpoint.
    pub const NO_HEALTHY_UPSTREAM: Self = Self(1);
    /// `UF`: upstream connection failure.
    pub const UPSTREAM_CONNECTION_FAILURE: Self = Self(1 << 1);
    /// `UT`: upstream request timeout.
    pub const UPSTREAM_REQUEST_TIMEOUT: Self = Self(1 << 2);
    /// `UC`: upstream connection termination.
    pub const UPSTREAM_CONNECTION_TERMINATION: Self = Self(1 << 3);
    /// `URX`: upstream retry limit exceeded (a route's retries were used up).
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: Self = Self(1 << 4);
    /// `DC`: downstream connection termination (the client went away mid-response).
    pub const DOWNSTREAM_CONNECTION_TERMINATION: Self = Self(1 << 5);
    /// `DPE`: the downstream request had an HTTP protocol error (answered 400, 414 or 431
    /// by the agent; the record has no method or path).
    pub const DOWNSTREAM_PROTOCOL_ERROR: Self = Self(1 << 6);
    /// `RBAC`: the request was denied by an AuthorizationPolicy (answered 403).
    pub const RBAC_ACCESS_DENIED: Self = Self(1 << 7);
    /// `FI`: the request was aborted by a route's fault injection.
    pub const FAULT_INJECTED: Self = Self(1 << 8);
    /// `DI`: the request was delayed by a route's fault injection.
    pub const DELAY_INJECTED: Self = Self(1 << 9);
    /// `UO`: the destination's connection pool overflowed (a DestinationRule's
    /// `connectionPool` limit; answered 503).
    pub const UPSTREAM_OVERFLOW: Self = Self(1 << 10);

    const NAMES: [(Self, &'static str); 11] = [
        (Self::NO_HEALTHY_UPSTREAM, "UH"),
        (Self::UPSTREAM_CONNECTION_FAILURE, "UF"),
        (Self::UPSTREAM_REQUEST_TIMEOUT, "UT"),
        (Self::UPSTREAM_CONNECTION_TERMINATION, "UC"),
        (Self::UPSTREAM_RETRY_LIMIT_EXCEEDED, "URX"),
        (Self::DOWNSTREAM_CONNECTION_TERMINATION, "DC"),
        (Self::DOWNSTREAM_PROTOCOL_ERROR, "DPE"),
        (Self::RBAC_ACCESS_DENIED, "RBAC"),
        (Self::FAULT_INJECTED, "FI"),
        (Self::DELAY_INJECTED, "DI"),
        (Self::UPSTREAM_OVERFLOW, "UO"),
    ];

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no flag is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Adds the flags of `other`.
    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        let mut first = true;
        for (flag, name) in Self::NAMES {
            if self.contains(flag) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

/// The request headers that carry trace context (W3C and B3), copied as seen.
pub const TRACE_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// What the agent knows of a downstream connection beyond its bytes (given to
/// [`crate::dataplane::http::Proxy::serve_with`]): on the destination side, the client
/// agent's identity and the service the tunnel stream was opened for. Shared by every
/// request of the connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    /// The SPIFFE ID the peer authenticated with (destination side: the client agent's).
    pub peer_identity: Option<Arc<str>>,
    /// The destination service key (`namespace/name`).
    pub service: Option<Arc<str>>,
}

/// One finished HTTP request, as the agent saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// Which agent recorded it.
    pub side: Side,
    /// When the request head arrived.
    pub start: SystemTime,
    /// `GET`, `POST`, ...
    pub method: String,
    /// The `:authority` (HTTP/2) or `Host` header; empty when the request had none.
    pub authority: String,
    /// The path and query.
    pub path: String,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2` (downstream).
    pub protocol: &'static str,
    /// The status sent to the client (generated by the agent on failures).
    pub response_code: u16,
    /// `grpc-status` from the response trailers, or from the headers of a trailers-only
    /// response.
    pub grpc_status: Option<u32>,
    /// What went wrong, Envoy style.
    pub response_flags: ResponseFlags,
    /// Request body bytes read from the client.
    pub request_bytes: u64,
    /// Response body bytes sent towards the client.
    pub response_bytes: u64,
    /// From the request head to the end of the response (or its abort).
    pub duration: Duration,
    /// The upstream the request went to ([`crate::dataplane::http::UpstreamConn::peer`]),
    /// `None` when no connection was made.
    pub upstream_host: Option<String>,
    /// The trace headers of the request ([`TRACE_HEADERS`]), names lower case, in that
    /// order.
    pub trace_headers: Vec<(String, String)>,
    /// The downstream connection's [`ConnInfo`] (empty when the proxy was not told).
    pub conn: ConnInfo,
    /// The client's SPIFFE ID when known: at the source, the agent's own
    /// ([`crate::dataplane::http::HttpSettings::own_identity`]); at the destination,
    /// [`ConnInfo::peer_identity`].
    pub source_principal: Option<Arc<str>>,
    /// The server's SPIFFE ID when known: at the source, the chosen endpoint's agent
    /// ([`crate::dataplane::http::UpstreamConn::identity`], per request); at the
    /// destination, the agent's own.
    pub destination_principal: Option<Arc<str>>,
    /// This agent's span of the request ([`crate::telemetry::trace`]); `None` when the
    /// request carried no trace context and this agent started none.
    pub trace: Option<crate::telemetry::trace::SpanRecord>,
    /// At the source, the DestinationRule subset the request was routed to (issue 21);
    /// `None` without routing or without a subset.
    pub subset: Option<SubsetRecord>,
}

/// The subset a route sent a request to, for telemetry: Istio's `destination_version`
/// and the access log carry its `version` label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubsetRecord {
    /// The subset's name.
    pub name: Arc<str>,
    /// Its `version` label, if it selects by one.
    pub version: Option<Arc<str>>,
}

/// Receives one [`RequestRecord`] per finished request. Called on the request path: it
/// must not block (queue the record if it needs I/O).
pub trait Observer: Send + Sync + 'static {
    /// A request finished (completed, failed, or was abandoned by either side).
    fn on_request(&self, record: RequestRecord);

    /// The same, for an observer that needs no copy of its own: a fan-out hands the
    /// record by reference to every observer but the last. Defaults to a clone.
    fn on_request_ref(&self, record: &RequestRecord) {
        self.on_request(record.clone());
    }
}

/// An observer that drops every record.
impl Observer for () {
    fn on_request(&self, _record: RequestRecord) {}
}

/// [`TRACE_HEADERS`] as header names, parsed once (a lookup by `&str` parses the name
/// every time, eight times per request).
static TRACE_HEADER_NAMES: [::http::HeaderName; 8] = [
    ::http::HeaderName::from_static(TRACE_HEADERS[0]),
    ::http::HeaderName::from_static(TRACE_HEADERS[1]),
    ::http::HeaderName::from_static(TRACE_HEADERS[2]),
    ::http::HeaderName::from_static(TRACE_HEADERS[3]),
    ::http::HeaderName::from_static(TRACE_HEADERS[4]),
    ::http::HeaderName::from_static(TRACE_HEADERS[5]),
    ::http::HeaderName::from_static(TRACE_HEADERS[6]),
    ::http::HeaderName::from_static(TRACE_HEADERS[7]),
];

pub(crate) fn trace_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    TRACE_HEADERS
        .iter()
        .zip(&TRACE_HEADER_NAMES)
        .filter_map(|(name, key)| {
            headers
                .get(key)
                .and_then(|v| v.to_str().ok())
                .map(|v| ((*name).to_owned(), v.to_owned()))
        })
        .collect()
}

/// `grpc-status`, parsed once.
static GRPC_STATUS: ::http::HeaderName = ::http::HeaderName::from_static("grpc-status");

pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get(&GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// A record waiting for its response to end.
pub(crate) struct Pending {
    pub(crate) record: RequestRecord,
    pub(crate) started: Instant,
    pub(crate) request_bytes: Arc<AtomicU64>,
    pub(crate) observer: Arc<dyn Observer>,
    /// The request is gRPC (`content-type: application/grpc*`): local replies are gRPC.
    pub(crate) grpc: bool,
}

impl Pending {
    fn finish(mut self, response_bytes: u64, flags: ResponseFlags) {
        self.record.response_bytes = response_bytes;
        self.record.response_flags.insert(flags);
        self.record.request_bytes = self.request_bytes.load(Ordering::Relaxed);
        self.record.duration = self.started.elapsed();
        self.observer.on_request(self.record);
    }
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body sent downstream: counts bytes, picks up `grpc-status` from trailers
/// and emits the record at the end of the stream, on an upstream error (`UC`) or when the
/// client goes away first (dropped before the end: `DC`).
pub struct ObservedBody {
    inner: Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>,
    bytes: u64,
    pending: Option<Pending>,
}

impl ObservedBody {
    pub(crate) fn new<B>(inner: B, pending: Pending) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        Self {
            inner: Box::pin(inner.map_err(Into::into)),
            bytes: 0,
            pending: Some(pending),
        }
    }

    fn finish(&mut self, flags: ResponseFlags) {
        if let Some(p) = self.pending.take() {
            p.finish(self.bytes, flags);
        }
    }
}

impl fmt::Debug for ObservedBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservedBody")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(status) = grpc_status(trailers)
                    && let Some(p) = self.pending.as_mut()
                {
                    p.record.grpc_status = Some(status);
                }
                if self.inner.is_end_stream() {
                    self.finish(ResponseFlags::NONE);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                self.finish(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION)
            }
            Poll::Ready(None) => self.finish(ResponseFlags::NONE),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        if let Some(p) = &self.pending {
            // A response to HEAD, a 1xx, 204 or 304 has no body: hyper drops it unread.
            let bodiless = p.record.method == "HEAD"
                || matches!(p.record.response_code, 100..=199 | 204 | 304);
            let flags = if bodiless || self.inner.is_end_stream() {
                ResponseFlags::NONE
            } else {
                ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION
            };
            self.finish(flags);
        }
    }
}

/// The request body sent upstream: counts bytes into a shared counter.
pub(crate) struct CountingBody<B> {
    pub(crate) inner: B,
    pub(crate) bytes: Arc<AtomicU64>,
}

impl<B> Body for CountingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
