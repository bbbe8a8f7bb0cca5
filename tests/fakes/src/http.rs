//! What the fakes share: fault injection, request recording, server start.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;

/// A fault injected into every read response of a fake until cleared.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Answer 500 with a plain-text error.
    ServerError,
    /// Wait this long before answering normally (longer than a client's timeout = a timeout).
    Delay(Duration),
    /// Send only the first half of the JSON body.
    TruncatedJson,
    /// Send a body that is not JSON at all.
    MalformedJson,
    /// Send the real body followed by this many bytes of whitespace (valid JSON, huge).
    Huge(usize),
    /// Eureka only: report a wrong `apps__hashcode` in deltas.
    WrongHashcode,
}

/// One request a fake received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Raw query string (may be empty).
    pub query: String,
    /// Headers of interest (`x-consul-token`, `accept`).
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// The value of a query parameter, if present.
    pub fn param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| v.to_string())
        })
    }
}

#[derive(Default)]
pub(crate) struct Common {
    pub(crate) fault: Mutex<Option<Fault>>,
    pub(crate) requests: Mutex<Vec<RecordedRequest>>,
}

impl Common {
    pub(crate) fn record(&self, method: &str, path: &str, query: &str, headers: &HeaderMap) {
        let keep = ["x-consul-token", "accept", "content-type"];
        let headers = headers
            .iter()
            .filter(|(k, _)| keep.contains(&k.as_str()))
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        lock(&self.requests).push(RecordedRequest {
            method: method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            headers,
        });
    }

    pub(crate) fn fault(&self) -> Option<Fault> {
        lock(&self.fault).clone()
    }

    /// Applies the current fault (if any) to a read response.
    pub(crate) async fn respond(
        &self,
        status: StatusCode,
        headers: Vec<(&'static str, String)>,
        body: String,
    ) -> Response {
        let fault = self.fault();
        let body = match fault {
            Some(Fault::ServerError) => {
                return plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "rpc error making call: injected fault\n",
                );
            }
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                body
            }
            Some(Fault::TruncatedJson) => {
                let mut cut = body.len() / 2;
                while !body.is_char_boundary(cut) {
                    cut -= 1;
                }
                body[..cut].to_string()
            }
            Some(Fault::MalformedJson) => "<html><body>502 Bad Gateway</body></html>".to_string(),
            Some(Fault::Huge(n)) => {
                let mut b = body;
                b.push_str(&" ".repeat(n));
                b
            }
            Some(Fault::WrongHashcode) | None => body,
        };
        let mut resp = Response::new(Body::from(body));
        *resp.status_mut() = status;
        for (k, v) in headers {
            if let Ok(v) = HeaderValue::from_str(&v) {
                resp.headers_mut().insert(k, v);
            }
        }
        resp
    }
}

pub(crate) fn plain(status: StatusCode, text: &str) -> Response {
    let mut resp = Response::new(Body::from(text.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds 127.0.0.1:0 and serves `app` in a task.
pub(crate) async fn serve(
    app: Router,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, task))
}
