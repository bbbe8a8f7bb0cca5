//! An HTTP test application and the clients that drive it, as one process that tests start
//! inside network namespaces (hyper, so HTTP/2 and gRPC trailers work without extra tools).
//!
//! - `http-probe serve PORT`: HTTP/1.1 and h2c (prior knowledge) on `0.0.0.0:PORT`, with
//!   upgrades. Prints `served METHOD PATH VERSION traceparent=V` per request. Routes:
//!   `/status/CODE` answers CODE; `/grpc` echoes the request body as gRPC (trailers
//!   `grpc-status: 0`, `x-trailer: kept`); `/ws` switches protocols (WebSocket-style
//!   Upgrade) and echoes bytes; `/cut` promises 1000 bytes, sends 10 and drops the
//!   connection; anything else answers `METHOD PATH VERSION traceparent=V`.
//! - `http-probe h2c URL`: one GET over HTTP/2 prior knowledge; prints `STATUS VERSION BODY`.
//! - `http-probe grpc URL`: one unary gRPC-style POST over h2c; prints `status=S
//!   body=N grpc-status=G x-trailer=T` (the trailers as received).
//! - `http-probe ws HOST PORT`: an Upgrade request on a raw connection, then `ping` both
//!   ways; prints `upgraded echo=ping`.
//! - `http-probe cut URL`: a GET whose response the server cuts; prints `error: ...` when
//!   the client sees the failure, `complete` if the body ended normally, `hang` (exit 1)
//!   if nothing happens within 20 s.
//! - `http-probe bad HOST PORT`: connection A sends a good request, B a malformed one, C a
//!   head over 64 KiB, then A another good request; prints `A1=S B=S C=S A2=S` (the
//!   status of each answer).

use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

type AppBody = BoxBody<Bytes, std::io::Error>;

const USAGE: &str =
    "usage: http-probe serve PORT | h2c URL | grpc URL | ws HOST PORT | cut URL | bad HOST PORT";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = tokio::time::timeout(Duration::from_secs(3600), run(&args)).await;
    match result {
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("http-probe: {e}");
            std::process::ExitCode::from(1)
        }
        Err(_) => std::process::ExitCode::from(1),
    }
}

async fn run(args: &[&str]) -> Result<(), String> {
    match args {
        ["serve", port] => serve(port.parse().map_err(|_| USAGE)?).await,
        ["h2c", url] => h2c(url).await,
        ["grpc", url] => grpc(url).await,
        ["ws", host, port] => ws(host, port).await,
        ["cut", url] => cut(url).await,
        ["bad", host, port] => bad(host, port).await,
        _ => Err(USAGE.into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<AppBody> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r
}

/// A body that sends 10 of the 1000 bytes it promised, waits (so the head and those bytes
/// go out), then fails: hyper drops the connection mid-body.
struct CutBody {
    sent: bool,
    pause: Pin<Box<tokio::time::Sleep>>,
}

impl Body for CutBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if !self.sent {
            self.sent = true;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"0123456789")))));
        }
        match self.pause.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                Poll::Ready(Some(Err(std::io::Error::other("cut by the test server"))))
            }
        }
    }
}

async fn handle(mut req: Request<Incoming>) -> Result<Response<AppBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let tp = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    println!(
        "served {} {} {:?} traceparent={tp}",
        req.method(),
        path,
        req.version()
    );
    let head = format!(
        "{} {} {:?} traceparent={tp}",
        req.method(),
        path,
        req.version()
    );
    Ok(if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
        text(status, head)
    } else if path == "/grpc" {
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        let body = body.unwrap_or_default();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("x-trailer", HeaderValue::from_static("kept"));
        let mut r = Response::new(
            Full::new(body)
                .map_err(|e| match e {})
                .with_trailers(async move { Some(Ok(trailers)) })
                .boxed(),
        );
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        r
    } else if path == "/ws" {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            let mut io = TokioIo::new(up);
            let mut buf = [0u8; 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut r = text(StatusCode::SWITCHING_PROTOCOLS, String::new());
        r.headers_mut()
            .insert("upgrade", HeaderValue::from_static("websocket"));
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("upgrade"));
        r
    } else if path == "/cut" {
        let body = CutBody {
            sent: false,
            pause: Box::pin(tokio::time::sleep(Duration::from_millis(300))),
        };
        let mut r = Response::new(body.boxed());
        r.headers_mut()
            .insert("content-length", HeaderValue::from_static("1000"));
        r
    } else {
        text(StatusCode::OK, head)
    })
}

async fn serve(port: u16) -> Result<(), String> {
    let l = TcpListener::bind(("0.0.0.0", port))
        .await
        .map_err(|e| format!("cannot listen on {port}: {e}"))?;
    println!("listening on {port}");
    loop {
        let (s, _) = l.accept().await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(s), service_fn(handle))
                .await;
        });
    }
}

async fn connect(url: &http::Uri) -> Result<TcpStream, String> {
    let host = url.host().ok_or("no host")?;
    let port = url.port_u16().unwrap_or(80);
    TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))
}

async fn h2_sender(
    url: &http::Uri,
) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, String> {
    let s = connect(url).await?;
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(send)
}

async fn h2c(url: &str) -> Result<(), String> {
    let url: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let mut send = h2_sender(&url).await?;
    let resp = send
        .send_request(
            Request::get(url.clone())
                .body(Full::new(Bytes::new()))
                .map_err(|e| e.to_string())?,
        )
        .await
        .map_err(|e| format!("request: {e}"))?;
    let (status, version) = (resp.status().as_u16(), resp.version());
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    println!("{status} {version:?} {}", String::from_utf8_lossy(&body));
    Ok(())
}

async fn grpc(url: &str) -> Result<(), String> {
    let url: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let mut send = h2_sender(&url).await?;
    // One length-prefixed message: not compressed, 5 bytes.
    let frame = Bytes::from_static(b"\x00\x00\x00\x00\x05hello");
    let req = Request::post(url.clone())
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(frame))
        .map_err(|e| e.to_string())?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let get = |n: &str| {
        trailers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    println!(
        "status={status} body={} grpc-status={} x-trailer={}",
        collected.to_bytes().len(),
        get("grpc-status"),
        get("x-trailer")
    );
    Ok(())
}

/// Reads a response head (up to the blank line); returns it.
async fn read_head(s: &mut TcpStream) -> Result<String, String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut b).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(format!("closed after {:?}", String::from_utf8_lossy(&head)));
        }
        head.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn status_of(head: &str) -> String {
    head.split_whitespace().nth(1).unwrap_or("?").to_owned()
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

async fn ws(host: &str, port: &str) -> Result<(), String> {
    let mut s = TcpStream::connect(format!("{host}:{port}"))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let head = read_head(&mut s).await?;
    if status_of(&head) != "101" {
        return Err(format!("no upgrade: {head}"));
    }
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)
        .await
        .map_err(|e| format!("echo: {e}"))?;
    println!("upgraded echo={}", String::from_utf8_lossy(&buf));
    Ok(())
}

async fn cut(url: &str) -> Result<(), String> {
    let url: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let s = connect(&url).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        let req = Request::get(url.path())
            .header("host", url.authority().map(|a| a.as_str()).unwrap_or("x"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("error: before the body: {e}"))?;
        match resp.into_body().collect().await {
            Ok(b) => Ok(format!("complete ({} bytes)", b.to_bytes().len())),
            Err(e) => Err(format!("error: in the body: {e}")),
        }
    })
    .await;
    match outcome {
        Ok(Ok(s)) | Ok(Err(s)) => {
            println!("{s}");
            Ok(())
        }
        Err(_) => {
            println!("hang");
            Err("no outcome within 20 s".into())
        }
    }
}

/// Sends `req` on `s` and returns the answer's status (reading its body by length).
async fn exchange(s: &mut TcpStream, req: &[u8]) -> Result<String, String> {
    s.write_all(req).await.map_err(|e| format!("write: {e}"))?;
    let head = read_head(s).await?;
    let mut body = vec![0u8; content_length(&head)];
    s.read_exact(&mut body)
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok(status_of(&head))
}

async fn bad(host: &str, port: &str) -> Result<(), String> {
    let addr = format!("{host}:{port}");
    let open = || async {
        TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("connect: {e}"))
    };
    let good = format!("GET /good HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut a = open().await?;
    let a1 = exchange(&mut a, good.as_bytes()).await?;
    let mut b = open().await?;
    let b1 = exchange(
        &mut b,
        format!("GET /bad HTTP/1.1\r\nHost: {host}\r\nthis is not a header\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut c = open().await?;
    let big = "a".repeat(64 * 1024);
    // The proxy may answer and close before it has read the whole head: the write may
    // fail, the answer is still there to read.
    let _ = c
        .write_all(format!("GET /big HTTP/1.1\r\nHost: {host}\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await;
    let c1 = read_head(&mut c)
        .await
        .map(|h| status_of(&h))
        .unwrap_or_else(|e| format!("({e})"));
    let a2 = exchange(&mut a, good.as_bytes()).await?;
    println!("A1={a1} B={b1} C={c1} A2={a2}");
    Ok(())
}
