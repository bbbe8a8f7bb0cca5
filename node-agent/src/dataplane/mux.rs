//! The TCP + TLS fallback, multiplexed: one TLS connection per peer agent (and expected
//! identity) carries every proxied connection to it as an HTTP/2 stream, as ztunnel's
//! HBONE does. A new proxied connection then costs a stream, not a TCP and TLS handshake,
//! and holds a few hundred bytes of stream state instead of a TLS session of its own.
//!
//! Negotiated by ALPN ([`ALPN_MUX`] offered first, [`super::tls::ALPN`] second), so agents
//! of different versions keep talking during a rolling upgrade: an agent that only knows
//! the one-connection-per-stream protocol picks that, and the connection is used the
//! old way.
//!
//! Each stream is a `POST` of [`PATH`] answered with `200`; the request and response
//! bodies are the two directions of the proxied connection. The request body starts with
//! the same binary header as a QUIC stream ([`super::tunnel::Header`]), so both transports
//! share one header parser and its limits. The end of a body is the half-close; a
//! `RST_STREAM` is the reset, both ways; refused streams are reset.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::splice::{ChunkRead, ChunkWrite, Side};

/// ALPN of the multiplexed TCP + TLS tunnel.
pub const ALPN_MUX: &[u8] = b"causeway-mux/1";
/// Path of a tunnel stream's request.
pub const PATH: &str = "/causeway.tunnel/v1/stream";
/// Flow-control window of one stream. HTTP/2 tells the sender more room only once half
/// of it was read, so a bulk stream has half to a whole window in flight: at 1 MiB the
/// bench's bulk stream waited for window updates (3 Gbit/s with a CPU idle); 4 MiB, as the
/// QUIC tunnel's stream window, keeps it busy. It bounds what one stream may buffer.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Flow-control window of the connection, shared by its streams. A stream whose
/// application reads slowly holds up to its own window of it; 16 such streams at once
/// would stall the others (head-of-line blocking), so it is 16 stream windows.
const CONNECTION_WINDOW: u32 = 16 * STREAM_WINDOW;
/// Largest DATA frame accepted: fewer frames per TLS record batch in a bulk transfer.
const MAX_FRAME: u32 = 64 * 1024;
/// Bytes of an HTTP/2 frame header.
pub const FRAME_HEADER: usize = 9;
const _: () = assert!(super::splice::TCP_CHUNK <= MAX_FRAME as usize);
/// Streams one connection may carry at once (as many as a QUIC connection).
const MAX_STREAMS: u32 = 100_000;
/// Most bytes gathered from a stream into one write to the other side.
const GATHER: usize = 256 * 1024;
/// Error code of a stream reset by the agent (the other side reset, or refused).
pub const RESET: h2::Reason = h2::Reason::CANCEL;

/// Settings of the client side of a multiplexed connection.
pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(0)
        .enable_push(false);
    b
}

/// Settings of the server side of a multiplexed connection.
pub fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS);
    b
}

/// The request that opens a stream.
pub fn request() -> http::Request<()> {
    let mut r = http::Request::new(());
    *r.method_mut() = http::Method::POST;
    *r.uri_mut() = http::Uri::from_static("https://causeway.tunnel/causeway.tunnel/v1/stream");
    r
}

/// Whether an inbound request is a tunnel stream (anything else is refused).
pub fn is_tunnel_request<B>(r: &http::Request<B>) -> bool {
    r.method() == http::Method::POST && r.uri().path() == PATH
}

/// An HTTP/2 error as an I/O error: a reset stream is a reset connection.
fn to_io(e: h2::Error) -> io::Error {
    if e.is_reset() || e.is_go_away() {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    } else if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// Receiving half of a stream: on the client, the response is awaited first.
pub struct MuxRead {
    state: ReadState,
    /// Bytes received but not yet handed over (after a partial `AsyncRead`).
    pending: Bytes,
    /// An error or the end of the stream found after bytes that were handed over first.
    ended: Option<io::Result<()>>,
}

enum ReadState {
    Response(h2::client::ResponseFuture),
    Body(h2::RecvStream),
}

impl std::fmt::Debug for MuxRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxRead")
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl MuxRead {
    /// The client's receiving half, before the response arrived.
    pub fn response(r: h2::client::ResponseFuture) -> Self {
        Self {
            state: ReadState::Response(r),
            pending: Bytes::new(),
            ended: None,
        }
    }

    /// The server's receiving half (the request body).
    pub fn body(b: h2::RecvStream) -> Self {
        Self {
            state: ReadState::Body(b),
            pending: Bytes::new(),
            ended: None,
        }
    }

    /// The next received bytes: `Ready(Ok(None))` at the end of the stream. Capacity is
    /// released as bytes are taken, so the peer sends on while the agent writes them out.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        if let Some(end) = self.ended.take() {
            // Stays ended: a second call sees the end again.
            self.ended = Some(match &end {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
            return Poll::Ready(end.map(|()| None));
        }
        let next = self.poll_stream(cx);
        if let Poll::Ready(Err(e)) = &next {
            // Remembered: the finished response or stream is never polled again.
            self.ended = Some(Err(io::Error::new(e.kind(), e.to_string())));
        }
        next
    }

    fn poll_stream(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        loop {
            match &mut self.state {
                ReadState::Response(f) => {
                    let resp = ready!(Pin::new(f).poll(cx)).map_err(to_io)?;
                    if resp.status() != http::StatusCode::OK {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionRefused,
                            format!("the peer agent answered {}", resp.status()),
                        )));
                    }
                    self.state = ReadState::Body(resp.into_body());
                }
                ReadState::Body(b) => {
                    return match ready!(b.poll_data(cx)) {
                        Some(Ok(data)) => {
                            let _ = b.flow_control().release_capacity(data.len());
                            Poll::Ready(Ok(Some(data)))
                        }
                        Some(Err(e)) => Poll::Ready(Err(to_io(e))),
                        None => {
                            self.ended = Some(Ok(()));
                            Poll::Ready(Ok(None))
                        }
                    };
                }
            }
        }
    }
}

impl ChunkRead for MuxRead {
    /// Awaits the first frame, then takes those already received behind it without
    /// waiting (one vectored write to the other side for all of them).
    async fn read_chunks(&mut self, out: &mut Vec<Bytes>) -> io::Result<bool> {
        std::future::poll_fn(|cx| {
            let mut total = 0;
            loop {
                match self.poll_next(cx) {
                    Poll::Ready(Ok(Some(b))) => {
                        if b.is_empty() {
                            continue;
                        }
                        total += b.len();
                        out.push(b);
                        if total >= GATHER {
                            return Poll::Ready(Ok(true));
                        }
                    }
                    Poll::Ready(Ok(None)) if total == 0 => return Poll::Ready(Ok(false)),
                    Poll::Ready(Err(e)) if total == 0 => return Poll::Ready(Err(e)),
                    Poll::Ready(end) => {
                        // Hand over what was read; the next call reports the end.
                        self.ended = Some(end.map(|_| ()));
                        return Poll::Ready(Ok(true));
                    }
                    Poll::Pending if total == 0 => return Poll::Pending,
                    Poll::Pending => return Poll::Ready(Ok(true)),
                }
            }
        })
        .await
    }
}

impl AsyncRead for MuxRead {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(mut data) = ready!(self.poll_next(cx))? else {
            return Poll::Ready(Ok(()));
        };
        let n = data.len().min(buf.remaining());
        buf.put_slice(&data[..n]);
        data.advance(n);
        self.pending = data;
        Poll::Ready(Ok(()))
    }
}

/// Sending half of a stream; its shutdown ends the body (the half-close).
pub struct MuxWrite(h2::SendStream<Bytes>);

impl std::fmt::Debug for MuxWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MuxWrite")
    }
}

impl MuxWrite {
    /// Wraps a stream's sending half.
    pub fn new(s: h2::SendStream<Bytes>) -> Self {
        Self(s)
    }

    /// Resets the stream (both directions) with `reason`.
    pub fn reset(&mut self, reason: h2::Reason) {
        self.0.send_reset(reason);
    }

    /// Waits until the peer's window lets `want` more bytes (or part of them) go, and
    /// returns how many may be sent now. HTTP/2 would buffer anything sent past the
    /// window, without bound; waiting for capacity is the back-pressure.
    fn poll_room(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        loop {
            self.0.reserve_capacity(want);
            match ready!(self.0.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => return Poll::Ready(Ok(n.min(want))),
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the tunnel stream is closed for sending",
                    )));
                }
            }
        }
    }
}

impl ChunkWrite for MuxWrite {
    /// Hands the buffers to HTTP/2 without copying, as the peer's window allows.
    async fn write_chunks(&mut self, chunks: &mut Vec<Bytes>) -> io::Result<()> {
        for mut c in chunks.drain(..) {
            while !c.is_empty() {
                let n = std::future::poll_fn(|cx| self.poll_room(cx, c.len())).await?;
                self.0.send_data(c.split_to(n), false).map_err(to_io)?;
            }
        }
        Ok(())
    }
}

impl AsyncWrite for MuxWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_room(cx, buf.len()))?;
        self.0
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    /// The buffers (an HTTP message's head and body, as hyper hands them over when the
    /// stream says it writes vectored) go out as one DATA frame: one copy, where a
    /// flattening writer would copy the body into the head's buffer first.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_room(cx, total))?;
        let mut data = bytes::BytesMut::with_capacity(n);
        for b in bufs {
            let take = b.len().min(n - data.len());
            data.extend_from_slice(&b[..take]);
            if data.len() == n {
                break;
            }
        }
        self.0.send_data(data.freeze(), false).map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes frames out as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.0.send_data(Bytes::new(), true).map_err(to_io))
    }
}

/// A stream of a multiplexed TCP + TLS connection.
#[derive(Debug)]
pub struct MuxSide {
    /// Sending half.
    pub send: MuxWrite,
    /// Receiving half.
    pub recv: MuxRead,
}

impl Side for MuxSide {
    type R = MuxRead;
    type W = MuxWrite;
    fn split(self) -> (Self::R, Self::W) {
        (self.recv, self.send)
    }
    fn abort(_r: Self::R, mut w: Self::W) {
        // One RST_STREAM ends both directions of an HTTP/2 stream.
        w.reset(RESET);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSlice;
    use tokio::io::AsyncWriteExt as _;

    /// A message handed over as several buffers (hyper's head and body once the stream
    /// says it writes vectored) arrives whole, in one DATA frame, and the stream says it
    /// writes vectored (else hyper would flatten every message first).
    #[tokio::test]
    async fn a_vectored_write_goes_out_as_one_data_frame() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = server_builder().handshake::<_, Bytes>(b).await.unwrap();
            let (req, _respond) = conn.accept().await.unwrap().unwrap();
            let conn_task =
                tokio::spawn(async move { while let Some(Ok(_)) = conn.accept().await {} });
            let mut body = req.into_body();
            let mut frames = Vec::new();
            while let Some(data) = body.data().await {
                let data = data.unwrap();
                let _ = body.flow_control().release_capacity(data.len());
                frames.push(data);
            }
            conn_task.abort();
            frames
        });
        let (mut send, conn) = client_builder().handshake::<_, Bytes>(a).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let (_resp, stream) = send.send_request(request(), false).unwrap();
        let mut w = MuxWrite::new(stream);
        assert!(w.is_write_vectored());
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
        let n = std::future::poll_fn(|cx| {
            Pin::new(&mut w).poll_write_vectored(
                cx,
                &[
                    IoSlice::new(head),
                    IoSlice::new(b""),
                    IoSlice::new(b"hello"),
                ],
            )
        })
        .await
        .unwrap();
        assert_eq!(n, head.len() + 5);
        w.shutdown().await.unwrap();
        let frames = server.await.unwrap();
        // (The end of the stream may come as an empty frame of its own.)
        let got: Vec<&[u8]> = frames
            .iter()
            .filter(|f| !f.is_empty())
            .map(|f| &f[..])
            .collect();
        assert_eq!(
            got,
            [&b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"[..]],
            "one DATA frame with the whole message"
        );
    }
}
