//! The HTTP/1.1 server of the local metrics endpoints (the agent's 15020, the
//! controller's 15014): hyper, one request per connection, a read timeout and a cap on
//! the request head.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;

/// Largest request head accepted (request line and headers): hyper's smallest buffer.
/// A bigger head gets 431.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head; then the connection is closed.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the connections `listener` accepts in a background task, answering each
/// request with `handler(request, client address)`.
pub fn serve<F>(listener: tokio::net::TcpListener, handler: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(&Request<Incoming>, SocketAddr) -> Response<String> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let h = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let r = h(&req, peer);
                    async move { Ok::<_, Infallible>(r) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(READ_TIMEOUT)
                    .max_buf_size(MAX_HEAD)
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "metrics endpoint connection");
                }
            });
        }
    })
}

/// A response with `status`, `content_type` and `body`.
pub fn reply(
    status: http::StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<String> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// The values of the request's `Accept` headers.
pub fn accept<B>(req: &Request<B>) -> impl Iterator<Item = &str> {
    req.headers()
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
}
