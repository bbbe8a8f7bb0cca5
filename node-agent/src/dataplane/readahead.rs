//! The TCP stream under the tunnel's TLS fallback, read ahead in large reads.
//!
//! rustls takes at most 4 KiB per `read_tls` call (`READ_SIZE` in its deframer), so each
//! 16 KiB TLS record cost four or five `recv` system calls. [`ReadAhead`] reads up to
//! [`READ_AHEAD`] bytes at once and hands them to rustls from memory. The buffer exists
//! only while it holds unread bytes: an idle connection holds none.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Largest single read from the socket.
pub const READ_AHEAD: usize = 64 * 1024;

/// A TCP stream with a read-ahead buffer (writes go straight through).
#[derive(Debug)]
pub struct ReadAhead {
    tcp: TcpStream,
    buf: Vec<u8>,
    pos: usize,
}

impl ReadAhead {
    /// Wraps `tcp`.
    pub fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// The socket (bytes read ahead and not yet consumed are dropped).
    pub fn into_inner(self) -> TcpStream {
        self.tcp
    }

    fn serve(&mut self, out: &mut ReadBuf<'_>) {
        let n = out.remaining().min(self.buf.len() - self.pos);
        out.put_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf = Vec::new();
            self.pos = 0;
        }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.pos < me.buf.len() {
            me.serve(out);
            return Poll::Ready(Ok(()));
        }
        if out.remaining() >= READ_AHEAD {
            return Pin::new(&mut me.tcp).poll_read(cx, out);
        }
        ready!(me.tcp.poll_read_ready(cx))?;
        // Through `poll_read` with the task's own waker, not `try_read`: a read shorter
        // than the buffer drains the socket and Tokio then clears its readiness, so the
        // next read sleeps at once instead of first failing with `EAGAIN` (one system
        // call per record).
        let mut buf = Vec::with_capacity(READ_AHEAD);
        let read = std::pin::pin!(tokio::io::AsyncReadExt::read_buf(&mut me.tcp, &mut buf));
        match read.poll(cx) {
            // End of stream: nothing put into `out`.
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(())),
            Poll::Ready(Ok(_)) => {
                me.buf = buf;
                me.pos = 0;
                me.serve(out);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // Stale readiness (cleared) or the cooperative budget spent: `cx` is
            // registered or woken either way.
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn reads_through_the_buffer_keep_every_byte_the_end_of_stream_and_writes() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(&sent).await.unwrap();
            s.shutdown().await.unwrap();
            // The other direction still works through the wrapper's write half.
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut r = ReadAhead::new(TcpStream::connect(addr).await.unwrap());
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        loop {
            let n = r.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, data);
        assert_eq!(r.read(&mut small).await.unwrap(), 0, "end of stream stays");
        assert!(r.buf.capacity() == 0, "no buffer is held once drained");
        r.write_all(b"pong").await.unwrap();
        r.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"pong");
    }
}
