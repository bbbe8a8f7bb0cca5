//! In-process tests of the HTTP core over loopback TCP: a test application (hyper), the
//! [`Proxy`] in front of it, and hyper or raw-socket clients. Every test is bounded by
//! [`bounded`] so that a hang fails instead of blocking the suite.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ::http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use bytes::Bytes;
use causeway_api::protocol::{H2_PREFACE, Protocol};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::*;

/// Fails the test when `f` does not finish in time (a hang), instead of hanging the suite.
async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("the test did not finish within 30 s: something hangs")
}

type AppBody = BoxBody<Bytes, Infallible>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<AppBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

/// The test application.
async fn app_handler(mut req: Request<Incoming>) -> Result<Response<AppBody>, Infallible> {
    let path = req.uri().path().to_owned();
    Ok(match path.as_str() {
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            text(StatusCode::OK, "late")
        }
        "/delay" => {
            tokio::time::sleep(Duration::from_millis(100)).await;
            text(StatusCode::OK, "first")
        }
        "/grpc" => {
            let saw_te = req.headers().get("te").cloned();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("7"));
            trailers.insert("grpc-message", HeaderValue::from_static("denied"));
            let mut r = Response::new(
                Full::new(body)
                    .with_trailers(async move { Some(Ok(trailers)) })
                    .boxed(),
            );
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            if let Some(te) = saw_te {
                r.headers_mut().insert("x-saw-te", te);
            }
            r
        }
        "/hop" => {
            let seen: Vec<String> = [
                "connection",
                "x-hop",
                "keep-alive",
                "te",
                "proxy-authorization",
                "x-end-to-end",
            ]
            .iter()
            .filter_map(|n| {
                req.headers()
                    .get(*n)
                    .map(|v| format!("{n}={}", v.to_str().unwrap()))
            })
            .collect();
            let mut r = text(StatusCode::OK, seen.join(" "));
            r.headers_mut()
                .insert("connection", HeaderValue::from_static("x-resp-hop"));
            r.headers_mut()
                .insert("x-resp-hop", HeaderValue::from_static("1"));
            r.headers_mut()
                .insert("keep-alive", HeaderValue::from_static("timeout=5"));
            r
        }
        "/ws" => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on.await.unwrap());
                let mut buf = [0u8; 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
            let mut r = text(StatusCode::SWITCHING_PROTOCOLS, "");
            r.headers_mut()
                .insert("upgrade", HeaderValue::from_static("websocket"));
            r.headers_mut()
                .insert("connection", HeaderValue::from_static("upgrade"));
            r
        }
        _ => {
            let head = format!(
                "{} {} {:?} host={} traceparent={}",
                req.method(),
                req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
                req.version(),
                req.headers()
                    .get("host")
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("-"),
                req.headers()
                    .get("traceparent")
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("-"),
            );
            let body = req.into_body().collect().await.unwrap().to_bytes();
            text(
                StatusCode::OK,
                format!("{head} body={}", String::from_utf8_lossy(&body)),
            )
        }
    })
}

/// Starts the test application (HTTP/1.1 and h2c).
async fn app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(s), service_fn(app_handler))
                    .await;
            });
        }
    });
    addr
}

/// A TCP upstream that counts its connects.
#[derive(Clone)]
struct Counting {
    app: LocalApp,
    connects: Arc<AtomicUsize>,
}

impl Counting {
    fn new(addr: SocketAddr) -> Self {
        Self {
            app: LocalApp {
                addr,
                connect_timeout: Duration::from_secs(5),
            },
            connects: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Upstream for Counting {
    async fn connect(&self, endpoint: &str) -> Result<UpstreamConn, UpstreamError> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        self.app.connect(endpoint).await
    }
}

/// An upstream with no endpoint.
struct NoEndpoint;

impl Upstream for NoEndpoint {
    fn pick(&self) -> Result<String, UpstreamError> {
        Err(UpstreamError::NoHealthyUpstream("shop/web:8080".into()))
    }

    async fn connect(&self, _endpoint: &str) -> Result<UpstreamConn, UpstreamError> {
        unreachable!("no endpoint is picked")
    }
}

/// Two endpoints (two applications) picked in turn, counting connects per endpoint.
struct RoundRobin {
    apps: [SocketAddr; 2],
    next: AtomicUsize,
    connects: [AtomicUsize; 2],
}

impl Upstream for RoundRobin {
    fn pick(&self) -> Result<String, UpstreamError> {
        Ok((self.next.fetch_add(1, Ordering::SeqCst) % 2).to_string())
    }

    async fn connect(&self, endpoint: &str) -> Result<UpstreamConn, UpstreamError> {
        let i: usize = endpoint.parse().unwrap();
        self.connects[i].fetch_add(1, Ordering::SeqCst);
        LocalApp {
            addr: self.apps[i],
            connect_timeout: Duration::from_secs(5),
        }
        .connect(endpoint)
        .await
    }
}

struct Recorder(mpsc::UnboundedSender<RequestRecord>);

impl Observer for Recorder {
    fn on_request(&self, record: RequestRecord) {
        let _ = self.0.send(record);
    }
}

/// Starts a proxy listener in front of `upstream`; records arrive on the receiver.
async fn proxy<U: Upstream>(
    upstream: U,
    settings: HttpSettings,
) -> (SocketAddr, mpsc::UnboundedReceiver<RequestRecord>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let proxy = Proxy::new(upstream, settings, Arc::new(Recorder(tx)));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let _ = proxy.serve(s).await;
            });
        }
    });
    (addr, rx)
}

async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    send
}

async fn h2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri)
        .header("host", "web.shop:8080")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn body_text(resp: Response<Incoming>) -> String {
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

/// Reads from `s` until `buf` contains `needle` `count` times.
async fn read_until(s: &mut TcpStream, needle: &str, count: usize) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while String::from_utf8_lossy(&buf).matches(needle).count() < count {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "connection closed; got {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn http1_keep_alive_reuses_one_upstream_connection_and_records_each_request() {
    bounded(async {
        let up = Counting::new(app().await);
        let connects = up.connects.clone();
        let (addr, mut records) = proxy(up, HttpSettings::default()).await;
        let mut client = h1(addr).await;
        for i in 0..5 {
            let req = Request::post(format!("/echo?i={i}"))
                .header("host", "web.shop:8080")
                .header(
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                )
                .header("x-b3-sampled", "1")
                .body(Full::new(Bytes::from_static(b"hello")))
                .unwrap();
            let resp = client.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let body = body_text(resp).await;
            let r = records.recv().await.unwrap();
            // The trace continues with this proxy's span as the app's parent.
            let span = r.trace.clone().expect("a span");
            assert_eq!(span.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
            assert_eq!(
                span.parent_span_id.map(|p| crate::telemetry::trace::hex(&p)),
                Some("b7ad6b7169203331".to_owned())
            );
            assert!(span.sampled);
            assert_eq!(
                body,
                format!(
                    "POST /echo?i={i} HTTP/1.1 host=web.shop:8080 traceparent=00-0af7651916cd43dd8448eb211c80319c-{}-01 body=hello",
                    crate::telemetry::trace::hex(&span.span_id)
                )
            );
            assert_eq!(r.side, Side::Source);
            assert_eq!(r.method, "POST");
            assert_eq!(r.authority, "web.shop:8080");
            assert_eq!(r.path, format!("/echo?i={i}"));
            assert_eq!(r.protocol, "HTTP/1.1");
            assert_eq!(r.response_code, 200);
            assert_eq!(r.response_flags, ResponseFlags::NONE);
            assert_eq!(r.response_flags.to_string(), "-");
            assert_eq!(r.request_bytes, 5);
            assert_eq!(r.response_bytes, body.len() as u64);
            assert_eq!(r.grpc_status, None);
            assert_eq!(r.upstream_host, Some(up_addr(&r)));
            assert_eq!(
                r.trace_headers,
                vec![
                    (
                        "traceparent".to_owned(),
                        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()
                    ),
                    ("x-b3-sampled".to_owned(), "1".to_owned()),
                ]
            );
        }
        assert_eq!(
            connects.load(Ordering::SeqCst),
            1,
            "five keep-alive requests use one upstream connection"
        );
    })
    .await;
}

/// Each downstream HTTP/1.1 connection has its own upstream connection, opened by its
/// first request and reused by the next ones; the upstream connection closes with it.
#[tokio::test]
async fn each_http1_client_connection_keeps_its_own_upstream_connection() {
    bounded(async {
        let up = Counting::new(app().await);
        let connects = up.connects.clone();
        let (addr, _records) = proxy(up, HttpSettings::default()).await;
        let (mut a, mut b) = (h1(addr).await, h1(addr).await);
        for i in 0..3 {
            for c in [&mut a, &mut b] {
                let resp = c.send_request(get(&format!("/x?i={i}"))).await.unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
                body_text(resp).await;
            }
        }
        assert_eq!(
            connects.load(Ordering::SeqCst),
            2,
            "two client connections, three requests each: one upstream connection each"
        );
        // A third client while the first two are idle gets a connection of its own, not
        // one of theirs.
        let mut c = h1(addr).await;
        let resp = c.send_request(get("/x")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(connects.load(Ordering::SeqCst), 3);
    })
    .await;
}

/// An upstream that closes its connection after every keep-alive response (without
/// `Connection: close`, as an app with a short idle timeout does): each request of a
/// keep-alive client still gets its answer, on a new upstream connection.
#[tokio::test]
async fn an_upstream_closing_idle_connections_costs_the_client_nothing() {
    bounded(async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    read_until(&mut s, "\r\n\r\n", 1).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    // Closed here, the response having said nothing about it.
                });
            }
        });
        let up = Counting::new(app);
        let connects = up.connects.clone();
        let (addr, mut records) = proxy(up, HttpSettings::default()).await;
        let mut client = h1(addr).await;
        for i in 0..5 {
            let resp = client
                .send_request(get(&format!("/x?i={i}")))
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "request {i}");
            assert_eq!(body_text(resp).await, "ok");
            let r = records.recv().await.unwrap();
            assert_eq!(r.response_flags, ResponseFlags::NONE, "request {i}");
        }
        assert_eq!(connects.load(Ordering::SeqCst), 5);
    })
    .await;
}

/// A request without trace context gets a new trace where traces start (the source
/// agent): the app sees a `traceparent` naming the proxy's span; the record carries the
/// span and the principals: the agent's own as the source's, the upstream connection's
/// identity as the destination's.
#[tokio::test]
async fn a_request_without_context_starts_a_trace_and_records_principals() {
    struct WithIdentity(LocalApp);
    impl Upstream for WithIdentity {
        async fn connect(&self, endpoint: &str) -> Result<UpstreamConn, UpstreamError> {
            let mut c = self.0.connect(endpoint).await?;
            c.identity = Some("spiffe://causeway.local/ns/default/sa/web".into());
            Ok(c)
        }
    }
    bounded(async {
        let settings = HttpSettings {
            trace: crate::telemetry::trace::TraceSettings {
                start_sampling: Some(100.0),
            },
            own_identity: Some("spiffe://causeway.local/ns/default/sa/client".into()),
            ..HttpSettings::default()
        };
        let (tx, mut records) = mpsc::unbounded_channel();
        let up = WithIdentity(LocalApp {
            addr: app().await,
            connect_timeout: Duration::from_secs(5),
        });
        let proxy = Proxy::new(up, settings, Arc::new(Recorder(tx)));
        let (a, b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move { proxy.serve(b).await });
        let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(a))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/plain")
            .header("host", "web")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let body = body_text(client.send_request(req).await.unwrap()).await;
        let r = records.recv().await.unwrap();
        let span = r.trace.clone().expect("a new trace");
        assert!(span.sampled && span.parent_span_id.is_none());
        assert!(
            body.contains(&format!(
                "traceparent={}",
                crate::telemetry::trace::traceparent(&span.trace_id, &span.span_id, true)
            )),
            "{body}"
        );
        assert_eq!(
            r.source_principal.as_deref(),
            Some("spiffe://causeway.local/ns/default/sa/client")
        );
        assert_eq!(
            r.destination_principal.as_deref(),
            Some("spiffe://causeway.local/ns/default/sa/web")
        );
    })
    .await;
}

/// At the destination the source principal is the connection's authenticated peer
/// ([`ConnInfo::peer_identity`]) and the destination principal the agent's own; a request
/// with a context continues its trace without starting one.
#[tokio::test]
async fn the_destination_records_the_peer_and_its_own_principal() {
    bounded(async {
        let settings = HttpSettings {
            side: Side::Destination,
            own_identity: Some("spiffe://causeway.local/ns/default/sa/web".into()),
            ..HttpSettings::default()
        };
        let (tx, mut records) = mpsc::unbounded_channel();
        let up = LocalApp {
            addr: app().await,
            connect_timeout: Duration::from_secs(5),
        };
        let proxy = Proxy::new(up, settings, Arc::new(Recorder(tx)));
        let (a, b) = tokio::io::duplex(64 * 1024);
        let conn = ConnInfo {
            peer_identity: Some("spiffe://causeway.local/ns/default/sa/client".into()),
            service: Some("default/web".into()),
        };
        tokio::spawn(async move { proxy.serve_with(b, conn).await });
        let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(a))
            .await
            .unwrap();
        tokio::spawn(conn);
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let req = Request::get("/in")
            .header("host", "web")
            .header("traceparent", parent)
            .body(Full::new(Bytes::new()))
            .unwrap();
        body_text(client.send_request(req).await.unwrap()).await;
        let r = records.recv().await.unwrap();
        let span = r.trace.clone().expect("the continued trace");
        assert_eq!(
            crate::telemetry::trace::hex(&span.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            r.source_principal.as_deref(),
            Some("spiffe://causeway.local/ns/default/sa/client")
        );
        assert_eq!(
            r.destination_principal.as_deref(),
            Some("spiffe://causeway.local/ns/default/sa/web")
        );
    })
    .await;
}

/// A request the admission refuses still gets its span: the trace hook runs before the
/// admission, so the refused request's record (403, `RBAC`) carries the trace id.
#[tokio::test]
async fn a_refused_request_still_records_its_trace() {
    struct DenyAll;
    impl Admission for DenyAll {
        fn admit<'a>(
            &'a self,
            _: &'a mut ::http::request::Parts,
        ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send + 'a>> {
            Box::pin(async {
                Err(Refusal {
                    status: StatusCode::FORBIDDEN,
                    body: "RBAC: access denied",
                    headers: Vec::new(),
                    flags: ResponseFlags::RBAC_ACCESS_DENIED,
                })
            })
        }
    }
    bounded(async {
        let settings = HttpSettings {
            side: Side::Destination,
            ..HttpSettings::default()
        };
        let (tx, mut records) = mpsc::unbounded_channel();
        let up = LocalApp {
            addr: app().await,
            connect_timeout: Duration::from_secs(5),
        };
        let proxy = Proxy::new(up, settings, Arc::new(Recorder(tx)));
        let (a, b) = tokio::io::duplex(64 * 1024);
        let admission: Arc<dyn Admission> = Arc::new(DenyAll);
        tokio::spawn(async move { proxy.serve_admitted(b, Some(admission)).await });
        let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(a))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/secret")
            .header("host", "web")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        body_text(resp).await;
        let r = records.recv().await.unwrap();
        assert_eq!(r.response_code, 403);
        assert_eq!(r.response_flags, ResponseFlags::RBAC_ACCESS_DENIED);
        let span = r.trace.expect("the refused request's span");
        assert_eq!(
            crate::telemetry::trace::hex(&span.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    })
    .await;
}

fn up_addr(r: &RequestRecord) -> String {
    r.upstream_host.clone().expect("an upstream host")
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded_in_either_direction() {
    bounded(async {
        let (addr, _records) = proxy(Counting::new(app().await), HttpSettings::default()).await;
        let mut client = h1(addr).await;
        let req = Request::get("/hop")
            .header("host", "web")
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers, deflate")
            .header("proxy-authorization", "Basic eDp5")
            .header("x-end-to-end", "kept")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        for h in ["connection", "x-resp-hop", "keep-alive"] {
            assert!(!resp.headers().contains_key(h), "{h} reached the client");
        }
        assert_eq!(body_text(resp).await, "te=trailers x-end-to-end=kept");
        // The client connection is still open (the upstream's Connection header did not
        // close it).
        let resp = client.send_request(get("/after")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    bounded(async {
        let (addr, _records) = proxy(Counting::new(app().await), HttpSettings::default()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The first request is slower upstream than the second.
        s.write_all(
            b"GET /delay HTTP/1.1\r\nHost: web\r\n\r\nGET /second HTTP/1.1\r\nHost: web\r\n\r\n",
        )
        .await
        .unwrap();
        let got = read_until(&mut s, "HTTP/1.1 200 OK", 2).await;
        let got = if got.contains("/second") {
            got
        } else {
            let more = read_until(&mut s, "/second", 1).await;
            got + &more
        };
        let first = got.find("first").expect("the first response");
        let second = got.find("GET /second").expect("the second response");
        assert!(first < second, "responses out of order: {got}");
    })
    .await;
}

#[tokio::test]
async fn http2_prior_knowledge_multiplexes_on_one_upstream_connection() {
    bounded(async {
        let up = Counting::new(app().await);
        let connects = up.connects.clone();
        let (addr, mut records) = proxy(up, HttpSettings::default()).await;
        let client = h2(addr).await;
        let mut calls = Vec::new();
        for i in 0..3 {
            let mut c = client.clone();
            calls.push(tokio::spawn(async move {
                let req = Request::get(format!("http://web.shop:8080/h2?i={i}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = c.send_request(req).await.unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
                body_text(resp).await
            }));
        }
        for (i, call) in calls.into_iter().enumerate() {
            let body = call.await.unwrap();
            assert!(
                body.starts_with(&format!("GET /h2?i={i} HTTP/2.0")),
                "{body}"
            );
        }
        for _ in 0..3 {
            let r = records.recv().await.unwrap();
            assert_eq!(r.protocol, "HTTP/2");
            assert_eq!(r.authority, "web.shop:8080");
            assert_eq!(r.response_code, 200);
        }
        assert_eq!(connects.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn requests_on_one_http2_connection_are_balanced_per_request_with_a_pool_per_endpoint() {
    bounded(async {
        let up = Arc::new(RoundRobin {
            apps: [app().await, app().await],
            next: AtomicUsize::new(0),
            connects: [AtomicUsize::new(0), AtomicUsize::new(0)],
        });
        struct Shared(Arc<RoundRobin>);
        impl Upstream for Shared {
            fn pick(&self) -> Result<String, UpstreamError> {
                self.0.pick()
            }
            async fn connect(&self, endpoint: &str) -> Result<UpstreamConn, UpstreamError> {
                self.0.connect(endpoint).await
            }
        }
        let (addr, mut records) = proxy(Shared(up.clone()), HttpSettings::default()).await;
        let mut client = h2(addr).await;
        let mut hosts = Vec::new();
        for i in 0..6 {
            let req = Request::get(format!("http://web.shop:8080/rr?i={i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = client.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            body_text(resp).await;
            hosts.push(up_addr(&records.recv().await.unwrap()));
        }
        let a = up.apps.map(|a| a.to_string());
        assert_eq!(
            hosts,
            [&a[0], &a[1], &a[0], &a[1], &a[0], &a[1]].map(String::clone)
        );
        assert_eq!(up.connects[0].load(Ordering::SeqCst), 1);
        assert_eq!(up.connects[1].load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn grpc_call_with_trailers_passes_end_to_end() {
    bounded(async {
        let (addr, mut records) = proxy(Counting::new(app().await), HttpSettings::default()).await;
        let mut client = h2(addr).await;
        let req = Request::post("http://web.shop:9090/grpc")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
            .unwrap();
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-saw-te"], "trailers");
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(trailers["grpc-status"], "7");
        assert_eq!(trailers["grpc-message"], "denied");
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"\0\0\0\0\x02hi"));
        let r = records.recv().await.unwrap();
        assert_eq!(r.grpc_status, Some(7));
        assert_eq!(r.protocol, "HTTP/2");
        assert_eq!(r.request_bytes, 7);
        assert_eq!(r.response_bytes, 7);
    })
    .await;
}

#[tokio::test]
async fn websocket_upgrade_is_passed_through_as_a_byte_stream() {
    bounded(async {
        let (addr, mut records) = proxy(Counting::new(app().await), HttpSettings::default()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
        let head = read_until(&mut s, "\r\n\r\n", 1).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.to_ascii_lowercase().contains("upgrade: websocket"), "{head}");
        for msg in [&b"\x81\x05hello"[..], b"any bytes at all \x00\xff"] {
            s.write_all(msg).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg);
        }
        let r = records.recv().await.unwrap();
        assert_eq!(r.response_code, 101);
    })
    .await;
}

/// A server that sends a response head promising 100 bytes, 3 of them, and closes.
async fn closes_mid_response() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !String::from_utf8_lossy(&seen).contains("\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstream_closing_mid_response_gives_the_client_an_error_not_a_hang() {
    bounded(async {
        let (addr, mut records) = proxy(
            Counting::new(closes_mid_response().await),
            HttpSettings::default(),
        )
        .await;
        let mut client = h1(addr).await;
        let resp = client.send_request(get("/")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await;
        assert!(body.is_err(), "a truncated body must be an error");
        let r = records.recv().await.unwrap();
        assert_eq!(r.response_code, 200);
        assert!(
            r.response_flags
                .contains(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION),
            "{}",
            r.response_flags
        );
        assert_eq!(r.response_bytes, 3);
    })
    .await;
}

/// An HTTP/2 server that sends a response head and "abc", then, once `reset` is
/// notified, resets the stream.
async fn h2_resets_mid_response(reset: Arc<tokio::sync::Notify>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let reset = reset.clone();
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(s).await.unwrap();
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let mut send = respond.send_response(Response::new(()), false).unwrap();
                    send.send_data(Bytes::from_static(b"abc"), false).unwrap();
                    let reset = reset.clone();
                    tokio::spawn(async move {
                        reset.notified().await;
                        send.send_reset(h2::Reason::INTERNAL_ERROR);
                    });
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_http2_upstream_reset_mid_response_resets_the_client_stream() {
    bounded(async {
        let reset = Arc::new(tokio::sync::Notify::new());
        let (addr, mut records) = proxy(
            Counting::new(h2_resets_mid_response(reset.clone()).await),
            HttpSettings::default(),
        )
        .await;
        let mut client = h2(addr).await;
        let req = Request::get("http://web.shop:8080/stream")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().unwrap(), &Bytes::from_static(b"abc"));
        reset.notify_one();
        assert!(
            body.collect().await.is_err(),
            "the client's stream must be reset"
        );
        let r = records.recv().await.unwrap();
        assert_eq!(r.response_code, 200);
        assert!(
            r.response_flags
                .contains(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION),
            "{}",
            r.response_flags
        );
        // The client connection still works for a new stream (the upstream resets it too,
        // after its head).
        let req = Request::get("http://web.shop:8080/again")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn malformed_request_gets_400_and_other_connections_keep_working() {
    bounded(async {
        let (addr, mut records) = proxy(Counting::new(app().await), HttpSettings::default()).await;
        let mut other = h1(addr).await;
        let mut bad = TcpStream::connect(addr).await.unwrap();
        bad.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nBad Header\x01: x\r\n\r\n")
            .await
            .unwrap();
        let got = read_until(&mut bad, "\r\n", 1).await;
        assert!(got.starts_with("HTTP/1.1 400"), "{got}");
        let r = records.recv().await.unwrap();
        assert_eq!(
            (r.response_code, r.response_flags.to_string().as_str()),
            (400, "DPE")
        );
        let resp = other.send_request(get("/still")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(body_text(resp).await.starts_with("GET /still"));
    })
    .await;
}

#[tokio::test]
async fn header_block_over_the_limit_gets_431() {
    bounded(async {
        let settings = HttpSettings {
            max_header_bytes: 16 * 1024,
            ..HttpSettings::default()
        };
        let (addr, mut records) = proxy(Counting::new(app().await), settings).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let big = "a".repeat(64 * 1024);
        let req = format!("GET / HTTP/1.1\r\nHost: web\r\nX-Big: {big}\r\n\r\n");
        // The proxy may answer and close before it has read everything.
        let _ = s.write_all(req.as_bytes()).await;
        let got = read_until(&mut s, "\r\n", 1).await;
        assert!(got.starts_with("HTTP/1.1 431"), "{got}");
        let r = records.recv().await.unwrap();
        assert_eq!(
            (r.response_code, r.response_flags.to_string().as_str()),
            (431, "DPE")
        );

        // So does a request with too many header fields.
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut req = String::from("GET / HTTP/1.1\r\nHost: web\r\n");
        for i in 0..200 {
            req.push_str(&format!("X-H{i}: v\r\n"));
        }
        req.push_str("\r\n");
        let _ = s.write_all(req.as_bytes()).await;
        let got = read_until(&mut s, "\r\n", 1).await;
        assert!(got.starts_with("HTTP/1.1 431"), "{got}");
        let r = records.recv().await.unwrap();
        assert_eq!(
            (r.response_code, r.response_flags.to_string().as_str()),
            (431, "DPE")
        );
    })
    .await;
}

#[tokio::test]
async fn a_client_that_does_not_finish_its_request_head_is_disconnected() {
    bounded(async {
        let settings = HttpSettings {
            header_read_timeout: Duration::from_millis(300),
            ..HttpSettings::default()
        };
        let (addr, _records) = proxy(Counting::new(app().await), settings).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n")
            .await
            .unwrap();
        // Ends when the proxy closes the connection (`bounded` fails the test otherwise).
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        let rest = String::from_utf8_lossy(&rest);
        assert!(!rest.contains("200 OK"), "{rest}");
    })
    .await;
}

#[tokio::test]
async fn connect_refused_is_503_uf_and_no_endpoint_is_503_uh() {
    bounded(async {
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let (addr, mut records) = proxy(Counting::new(closed), HttpSettings::default()).await;
        let mut client = h1(addr).await;
        let resp = client.send_request(get("/x")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()["x-causeway-response-flags"], "UF");
        let r = records.recv().await.unwrap();
        assert_eq!(r.response_code, 503);
        assert_eq!(r.response_flags, ResponseFlags::UPSTREAM_CONNECTION_FAILURE);
        assert_eq!(r.response_flags.to_string(), "UF");
        // The client connection stays usable.
        let resp = client.send_request(get("/y")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        // A gRPC client gets a gRPC answer: trailers-only, UNAVAILABLE.
        let mut grpc = h2(addr).await;
        let req = Request::post("http://web.shop:9090/pkg.Svc/Call")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        let resp = grpc.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        let _ = records.recv().await.unwrap();
        let r = records.recv().await.unwrap();
        assert_eq!((r.response_code, r.grpc_status), (200, Some(14)));
        assert_eq!(r.response_flags.to_string(), "UF");

        let (addr, mut records) = proxy(NoEndpoint, HttpSettings::default()).await;
        let mut client = h1(addr).await;
        let resp = client.send_request(get("/x")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body_text(resp).await, "no healthy upstream");
        let r = records.recv().await.unwrap();
        assert_eq!(r.response_flags.to_string(), "UH");
        assert_eq!(r.upstream_host, None);
    })
    .await;
}

#[tokio::test]
async fn slow_upstream_is_504_ut() {
    bounded(async {
        let settings = HttpSettings {
            request_timeout: Duration::from_millis(300),
            ..HttpSettings::default()
        };
        let (addr, mut records) = proxy(Counting::new(app().await), settings).await;
        let mut client = h1(addr).await;
        let resp = client.send_request(get("/slow")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        let r = records.recv().await.unwrap();
        assert_eq!(r.response_code, 504);
        assert_eq!(r.response_flags.to_string(), "UT");
    })
    .await;
}

#[tokio::test]
async fn the_server_side_forwards_to_the_local_app_and_maps_refused_to_503_uf() {
    bounded(async {
        let (tx, mut records) = mpsc::unbounded_channel();
        let app_addr = app().await;
        let inbound = inbound_proxy(
            LocalApp {
                addr: app_addr,
                connect_timeout: Duration::from_secs(5),
            },
            HttpSettings::default(),
            Arc::new(Recorder(tx.clone())),
        );
        // A tunnel stream is any byte stream: use an in-memory pipe.
        let (near, far) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move { serve_inbound(&inbound, far).await });
        let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = client.send_request(get("/in")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(body_text(resp).await.starts_with("GET /in HTTP/1.1"));
        let r = records.recv().await.unwrap();
        assert_eq!(r.side, Side::Destination);
        assert_eq!(r.upstream_host, Some(app_addr.to_string()));

        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let inbound = inbound_proxy(
            LocalApp {
                addr: closed,
                connect_timeout: Duration::from_secs(5),
            },
            HttpSettings::default(),
            Arc::new(Recorder(tx)),
        );
        let (near, far) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move { serve_inbound(&inbound, far).await });
        let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = client.send_request(get("/in")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let r = records.recv().await.unwrap();
        assert_eq!(r.response_flags.to_string(), "UF");
        assert_eq!(r.upstream_host, Some(closed.to_string()));
    })
    .await;
}

/// Accepts one connection and runs [`detect`] on it.
async fn accept_and_detect(
    declared: Protocol,
    timeout: Duration,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<(Detected, Rewind<TcpStream>)>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        detect(s, declared, timeout).await.unwrap()
    });
    (addr, task)
}

#[tokio::test]
async fn an_http_request_on_an_undeclared_port_is_sniffed_as_http_and_proxied() {
    bounded(async {
        let declared = Protocol::from_port_name("web");
        assert_eq!(declared, Protocol::Auto);
        let (addr, task) = accept_and_detect(declared, Duration::from_secs(20)).await;
        let mut client = h1(addr).await;
        let req = client.send_request(get("/sniffed"));
        let (tx, mut records) = mpsc::unbounded_channel();
        let serve = async move {
            let (detected, io) = task.await.unwrap();
            assert_eq!(detected, Detected::Http1);
            assert!(detected.is_http());
            assert!(io.prefix().starts_with(b"GET /sniffed HTTP/1.1\r\n"));
            let proxy = Proxy::new(
                Counting::new(app().await),
                HttpSettings::default(),
                Arc::new(Recorder(tx)),
            );
            let _ = proxy.serve(io).await;
        };
        tokio::spawn(serve);
        let resp = req.await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(body_text(resp).await.starts_with("GET /sniffed HTTP/1.1"));
        assert_eq!(records.recv().await.unwrap().path, "/sniffed");

        // The HTTP/2 preface is sniffed too.
        let (addr, task) = accept_and_detect(Protocol::Auto, Duration::from_secs(20)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(H2_PREFACE).await.unwrap();
        let (detected, io) = task.await.unwrap();
        assert_eq!(detected, Detected::Http2);
        assert_eq!(io.prefix(), H2_PREFACE);
    })
    .await;
}

#[tokio::test]
async fn server_speaks_first_on_an_undeclared_port_times_out_to_opaque_untouched() {
    bounded(async {
        let (addr, task) = accept_and_detect(Protocol::Auto, Duration::from_millis(200)).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        // The client waits for the server's banner and sends nothing.
        let (detected, mut io) = task.await.unwrap();
        assert_eq!(detected, Detected::Opaque);
        assert!(io.prefix().is_empty());
        io.write_all(b"220 smtp.example ESMTP\r\n").await.unwrap();
        let mut banner = [0u8; 24];
        client.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"220 smtp.example ESMTP\r\n");
        client.write_all(b"EHLO me\r\n").await.unwrap();
        let mut got = [0u8; 9];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"EHLO me\r\n");
    })
    .await;
}

#[tokio::test]
async fn non_http_bytes_are_opaque_and_replayed_exactly() {
    bounded(async {
        let (addr, task) = accept_and_detect(Protocol::Auto, Duration::from_secs(20)).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
        let (detected, mut io) = task.await.unwrap();
        assert_eq!(detected, Detected::Opaque);
        client.write_all(b"more").await.unwrap();
        let mut got = [0u8; 25];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"SSH-2.0-OpenSSH_9.2\r\nmore");
    })
    .await;
}

#[tokio::test]
async fn a_tcp_port_is_never_sniffed() {
    bounded(async {
        for name in ["tcp", "tcp-db", "TCP-web"] {
            let declared = Protocol::from_port_name(name);
            // A timeout far beyond the test's bound: if `detect` read, the test would fail.
            let (addr, task) = accept_and_detect(declared, Duration::from_secs(3600)).await;
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (detected, mut io) = task.await.unwrap();
            assert_eq!(detected, Detected::Opaque, "{name}");
            assert!(io.prefix().is_empty());
            // An HTTP request on it is just bytes.
            client
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut got = [0u8; 27];
            io.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        }
        // A declared HTTP port is not sniffed either: it goes to the proxy as it is.
        let (addr, task) = accept_and_detect(
            Protocol::from_port_name("http-web"),
            Duration::from_secs(3600),
        )
        .await;
        let _client = TcpStream::connect(addr).await.unwrap();
        let (detected, io) = task.await.unwrap();
        assert_eq!(detected, Detected::Declared);
        assert!(io.prefix().is_empty());
    })
    .await;
}

#[test]
fn response_flags_display_like_envoy() {
    let mut f = ResponseFlags::NONE;
    assert_eq!(f.to_string(), "-");
    f.insert(ResponseFlags::UPSTREAM_CONNECTION_FAILURE);
    f.insert(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
    assert_eq!(f.to_string(), "UF,URX");
}

#[tokio::test]
async fn an_http2_header_list_over_the_limit_gets_431_and_the_connection_goes_on() {
    bounded(async {
        let settings = HttpSettings {
            max_header_bytes: 16 * 1024,
            ..HttpSettings::default()
        };
        let (addr, _records) = proxy(Counting::new(app().await), settings).await;
        let mut client = h2(addr).await;
        let req = Request::get("http://web/big")
            .header("x-big", "a".repeat(32 * 1024))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let req = Request::get("http://web/after")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    })
    .await;
}
