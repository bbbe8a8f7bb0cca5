//! The HTTP proxy core (issue 20): what the agents do with a connection on an HTTP port
//! instead of splicing bytes. Wired in `outbound.rs` (client side) and `tunnel/inbound.rs`
//! (destination side).
//!
//! - [`sniff::detect`] classifies an accepted client connection (declared protocol, else
//!   the first bytes within a timeout) and returns a [`Rewind`] that replays what it read,
//!   so the connection goes to the HTTP proxy or to the splice untouched.
//! - [`Proxy`] ([`client`]) serves one downstream connection with hyper (HTTP/1.1 with
//!   keep-alive and pipelining, HTTP/2 prior knowledge with trailers, Upgrade/CONNECT as a
//!   byte stream) and forwards each request through an [`Upstream`], which picks an
//!   endpoint per request and opens connections to it (on the client side tunnel streams).
//!   Connections are pooled per endpoint: keep-alive for HTTP/1.1, one multiplexed
//!   connection for HTTP/2. A request keeps its HTTP version upstream.
//! - [`server::LocalApp`] is the [`Upstream`] of the destination agent: the local
//!   application over TCP; [`server::serve_inbound`] serves a tunnel stream with it.
//! - Failures become the responses an operator expects, with Envoy's response flags
//!   ([`ResponseFlags`]): connect failure 503 `UF`, no endpoint 503 `UH`, timeout 504 `UT`,
//!   upstream gone before the response head 503 `UC`; an upstream that goes away in the
//!   middle of a response body aborts the downstream response (HTTP/1.1: the connection is
//!   closed; HTTP/2: the stream is reset) and records `UC`.
//! - An [`Observer`] gets one [`RequestRecord`] per finished request (telemetry).
//! - Limits ([`HttpSettings`]): a request head over the cap gets 431, a malformed request
//!   400 (both from hyper, on that connection only), and a client that does not finish its
//!   request head within the header timeout is disconnected.

pub mod authz;
pub mod client;
mod record;
pub mod server;
pub mod sniff;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use client::{Admission, Io, Proxy, Refusal, Upstream, UpstreamConn, UpstreamError};
pub use record::{
    ConnInfo, ObservedBody, Observer, RequestRecord, ResponseFlags, Side, SubsetRecord,
    TRACE_HEADERS,
};
pub use server::{LocalApp, inbound_proxy, serve_inbound};
pub use sniff::{Detected, Rewind, detect};

/// Limits and timeouts of the HTTP proxy.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// Which agent this is (recorded in every [`RequestRecord`]).
    pub side: Side,
    /// Time from sending a request upstream (connect included) to its response head;
    /// 504 `UT` when exceeded. Streaming bodies are not limited.
    pub request_timeout: Duration,
    /// Time a client has to send a complete HTTP/1.1 request head once it started one (or
    /// after a keep-alive response); the connection is closed when exceeded.
    pub header_read_timeout: Duration,
    /// The largest request head (request line and headers, bytes): HTTP/1.1 requests over
    /// it get 431; for HTTP/2 it is the advertised `SETTINGS_MAX_HEADER_LIST_SIZE`. Not
    /// below 8192 (hyper's minimum read buffer).
    pub max_header_bytes: usize,
    /// The most header fields in an HTTP/1.1 request (431 when exceeded).
    pub max_headers: usize,
    /// How long an idle upstream connection stays in the pool.
    pub pool_idle_timeout: Duration,
    /// Trace context handling ([`crate::telemetry::trace::on_request`]).
    pub trace: crate::telemetry::trace::TraceSettings,
    /// This agent's SPIFFE ID, recorded as [`RequestRecord::source_principal`] at the
    /// source and [`RequestRecord::destination_principal`] at the destination.
    pub own_identity: Option<std::sync::Arc<str>>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            side: Side::Source,
            request_timeout: Duration::from_secs(15),
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 60 * 1024,
            max_headers: 100,
            pool_idle_timeout: Duration::from_secs(60),
            trace: crate::telemetry::trace::TraceSettings::default(),
            own_identity: None,
        }
    }
}
