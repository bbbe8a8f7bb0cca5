//! Protocol detection for an accepted client connection, and [`Rewind`], which hands the
//! bytes read while detecting back to whichever path takes the connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use causeway_api::protocol::{self, MAX_SNIFF_LINE, Protocol, Sniffed};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The most bytes [`detect`] reads before giving up: a full request line
/// ([`MAX_SNIFF_LINE`]); [`protocol::sniff`] decides within it.
pub const SNIFF_CAP: usize = MAX_SNIFF_LINE;

/// Where a client connection goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// The port declares an HTTP protocol: serve it with the HTTP proxy (which tells
    /// HTTP/1.1 from HTTP/2 prior knowledge by itself). Nothing was read.
    Declared,
    /// Sniffed an HTTP/1.x request line.
    Http1,
    /// Sniffed the HTTP/2 connection preface.
    Http2,
    /// Opaque TCP: the port declares a non-HTTP protocol (`tcp`, `tcp-*`, `tls`, ...;
    /// nothing was read), or sniffing saw something else, the client sent nothing before
    /// the timeout (a server-speaks-first protocol), or closed. Splice it as today.
    Opaque,
}

impl Detected {
    /// Whether the connection goes to the HTTP proxy.
    pub fn is_http(self) -> bool {
        self != Detected::Opaque
    }
}

/// Classifies an accepted client connection for the port protocol `declared`:
/// - an HTTP protocol ([`Protocol::is_http`]) → [`Detected::Declared`] without reading;
/// - any other declared protocol (`tcp`, `tcp-*`, `tls`, `mysql`, ...) → [`Detected::Opaque`]
///   without reading: such ports are never sniffed or parsed;
/// - [`Protocol::Auto`] (undeclared) → reads until [`protocol::sniff`] decides, at most
///   [`SNIFF_CAP`] bytes and at most `timeout` in total; the timeout, end of stream or the
///   cap give [`Detected::Opaque`].
///
/// The returned [`Rewind`] replays every byte read here before the rest of `io`, so the
/// caller can hand it to the HTTP proxy or to the splice unchanged. Read errors are
/// returned (the connection is unusable).
pub async fn detect<IO>(
    mut io: IO,
    declared: Protocol,
    timeout: Duration,
) -> io::Result<(Detected, Rewind<IO>)>
where
    IO: AsyncRead + Unpin,
{
    if declared.is_http() {
        return Ok((Detected::Declared, Rewind::new(io)));
    }
    if !declared.sniffs() {
        return Ok((Detected::Opaque, Rewind::new(io)));
    }
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    let detected = loop {
        match protocol::sniff(&buf) {
            Sniffed::Http1 => break Detected::Http1,
            Sniffed::Http2 => break Detected::Http2,
            Sniffed::Opaque => break Detected::Opaque,
            Sniffed::NeedMore if buf.len() >= SNIFF_CAP => break Detected::Opaque,
            Sniffed::NeedMore => {}
        }
        // `read_buf` is cancel safe: when the timeout wins, no byte is lost.
        let room = SNIFF_CAP - buf.len();
        let mut limited = (&mut io).take(room as u64);
        match tokio::time::timeout_at(deadline, limited.read_buf(&mut buf)).await {
            Err(_) | Ok(Ok(0)) => break Detected::Opaque,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    };
    Ok((detected, Rewind::with_prefix(buf.freeze(), io)))
}

/// An IO that first yields `prefix` (bytes already read from `inner`), then reads from
/// `inner`; writes go to `inner` directly.
#[derive(Debug)]
pub struct Rewind<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO> Rewind<IO> {
    /// No bytes to replay.
    pub fn new(inner: IO) -> Self {
        Self::with_prefix(Bytes::new(), inner)
    }

    /// Replays `prefix` before reading from `inner`.
    pub fn with_prefix(prefix: Bytes, inner: IO) -> Self {
        Self { prefix, inner }
    }

    /// The bytes not yet replayed.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The bytes not yet replayed and the wrapped IO.
    pub fn into_parts(self) -> (Bytes, IO) {
        (self.prefix, self.inner)
    }

    /// The wrapped IO (for socket options, addresses).
    pub fn get_ref(&self) -> &IO {
        &self.inner
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
