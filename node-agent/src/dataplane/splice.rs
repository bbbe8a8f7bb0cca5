//! Splicing two sides of a proxied connection: bytes both ways, half-close, resets and the
//! idle timeout.
//!
//! A side is a plain TCP socket (the application, an agentless endpoint), a QUIC stream
//! of the tunnel, or a TLS stream of the tunnel's TCP fallback. What each end sees:
//!
//! | event on side A | what B gets |
//! |---|---|
//! | end of stream (FIN, QUIC FIN, TLS close) | the same, in that direction only (half-close); the other direction goes on |
//! | reset (TCP RST, QUIC RESET_STREAM/STOP_SENDING, a TLS error) | an abortive close: TCP RST, QUIC RESET_STREAM + STOP_SENDING, TCP RST under the TLS |
//! | no byte either way for the idle timeout | both sides are closed abortively |
//!
//! Buffers: a TCP side reads only after the socket is readable, into a buffer taken for
//! that read and released once written; a QUIC side hands over quinn's own chunks; a TLS
//! side waits on a one-byte read before it takes a buffer. So an idle connection holds
//! no copy buffer (agent memory at many idle connections stays small).

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use super::readahead::ReadAhead;
use tokio::io::{AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Application error code for a QUIC stream reset by the agent (the other side reset).
pub const RESET_CODE: u32 = 0x52;
/// Largest read from a TCP socket at once: four TLS records' worth of plaintext less one
/// HTTP/2 frame header. On the multiplexed TCP + TLS tunnel a full read becomes one DATA
/// frame, and frame header plus payload then fill exactly four 16 KiB records, which
/// rustls takes in one call (its 64 KiB send buffer) and the agent writes with one system
/// call. A 64 KiB read made a 64 KiB + 9 byte frame: four full records and a fifth of 9
/// bytes, written on their own (two `writev` calls and an extra small TCP segment per
/// 64 KiB; `strace` in BENCHMARKS.md, issue 25). ztunnel's writes are whole records too.
pub(super) const TCP_CHUNK: usize = 4 * TLS_RECORD - super::mux::FRAME_HEADER;
/// Largest plaintext of one TLS record.
const TLS_RECORD: usize = 16 * 1024;
const _: () = assert!((TCP_CHUNK + super::mux::FRAME_HEADER).is_multiple_of(TLS_RECORD));
/// Most bytes read from a TLS side at once (four full records).
const TLS_GATHER: usize = 64 * 1024;

/// Reads the next chunks of a side.
pub trait ChunkRead: Send {
    /// Appends the next bytes to `out`, as they arrive (one or more chunks, each not
    /// empty); `Ok(false)` is the end of the stream.
    fn read_chunks(
        &mut self,
        out: &mut Vec<Bytes>,
    ) -> impl Future<Output = io::Result<bool>> + Send;
}

/// Writes chunks to a side: a QUIC stream takes the buffers over (no copy), a socket
/// writes them with one vectored call where it can.
pub trait ChunkWrite: Send {
    /// Writes every byte of `chunks`, leaving it empty.
    fn write_chunks(
        &mut self,
        chunks: &mut Vec<Bytes>,
    ) -> impl Future<Output = io::Result<()>> + Send;
}

/// A read buffer as `Bytes`, copied into an exact-size one when mostly empty: a QUIC
/// stream keeps what it is given until the peer acknowledges it, and a 1 KiB request must
/// not pin a 64 KiB buffer for that long (at 10,000 connections that is 640 MiB).
fn fitted(buf: Vec<u8>) -> Bytes {
    if buf.len() * 2 < buf.capacity() {
        Bytes::copy_from_slice(&buf)
    } else {
        Bytes::from(buf)
    }
}

/// Most buffers given to one vectored write.
const MAX_IOV: usize = 64;

/// Writes `chunks` with vectored writes (one system call for all of them when the
/// socket takes them), advancing through partial writes.
async fn write_vectored_all<W: AsyncWrite + Unpin + Send>(
    w: &mut W,
    chunks: &mut Vec<Bytes>,
) -> io::Result<()> {
    let mut i = 0;
    while i < chunks.len() {
        if chunks.len() - i == 1 {
            w.write_all(&chunks[i]).await?;
            break;
        }
        // On the heap: the slices live across the await, and the connection's future
        // must stay small.
        let slices: Vec<io::IoSlice<'_>> = chunks[i..]
            .iter()
            .take(MAX_IOV)
            .map(|c| io::IoSlice::new(c))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        drop(slices);
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 && i < chunks.len() {
            let len = chunks[i].len();
            if n >= len {
                n -= len;
                i += 1;
            } else {
                bytes::Buf::advance(&mut chunks[i], n);
                n = 0;
            }
        }
    }
    chunks.clear();
    Ok(())
}

impl ChunkWrite for tokio::net::tcp::OwnedWriteHalf {
    async fn write_chunks(&mut self, chunks: &mut Vec<Bytes>) -> io::Result<()> {
        write_vectored_all(self, chunks).await
    }
}

impl<S: tokio::io::AsyncRead + AsyncWrite + Send + Unpin> ChunkWrite for tokio::io::WriteHalf<S> {
    async fn write_chunks(&mut self, chunks: &mut Vec<Bytes>) -> io::Result<()> {
        write_vectored_all(self, chunks).await
    }
}

impl ChunkWrite for quinn::SendStream {
    async fn write_chunks(&mut self, chunks: &mut Vec<Bytes>) -> io::Result<()> {
        self.write_all_chunks(chunks)
            .await
            .map_err(io::Error::from)?;
        chunks.clear();
        Ok(())
    }
}

/// One side of a proxied connection.
pub trait Side: Send {
    /// Reading half.
    type R: ChunkRead;
    /// Writing half; its shutdown is the half-close.
    type W: AsyncWrite + ChunkWrite + Unpin + Send;
    /// Splits the side.
    fn split(self) -> (Self::R, Self::W);
    /// Closes the side abortively, given both halves back.
    fn abort(r: Self::R, w: Self::W);
}

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions reached end of stream.
    Closed,
    /// Side A failed or was reset; B was closed abortively.
    ResetA,
    /// Side B failed or was reset; A was closed abortively.
    ResetB,
    /// No byte moved for the idle timeout; both were closed abortively.
    Idle,
    /// Cut: the peer agent's certificate was denied (its agent removed) while the
    /// connection was open; both were closed abortively.
    Cut,
}

/// What a splice did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes from A to B.
    pub a_to_b: u64,
    /// Bytes from B to A.
    pub b_to_a: u64,
    /// How it ended.
    pub end: End,
}

enum Dir {
    /// Source ended; destination shut down.
    Done,
    /// Reading the source failed.
    SrcFailed,
    /// Writing the destination failed.
    DstFailed,
}

async fn copy<R: ChunkRead, W: AsyncWrite + ChunkWrite + Unpin + Send>(
    src: &mut R,
    dst: &mut W,
    epoch: tokio::time::Instant,
    last: &AtomicU64,
    count: &AtomicU64,
) -> Dir {
    let mut n = 0u64;
    loop {
        // Allocated only when a chunk arrives: an idle connection holds no buffer.
        let mut chunks = Vec::new();
        match src.read_chunks(&mut chunks).await {
            Ok(true) => {
                let len: usize = chunks.iter().map(Bytes::len).sum();
                if dst.write_chunks(&mut chunks).await.is_err() {
                    return Dir::DstFailed;
                }
                n += len as u64;
                count.store(n, Ordering::Relaxed);
                last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            Ok(false) => {
                return match dst.shutdown().await {
                    Ok(()) => Dir::Done,
                    // The destination is gone already; report it as its failure.
                    Err(_) => Dir::DstFailed,
                };
            }
            Err(_) => return Dir::SrcFailed,
        }
    }
}

/// Splices `a` and `b` until both directions end, one side fails, or nothing moves for
/// `idle`. On a failure of one side, the other is closed abortively, so a reset travels
/// end to end; on the idle timeout both are.
pub fn splice<A: Side, B: Side>(
    a: A,
    b: B,
    idle: Option<Duration>,
) -> impl Future<Output = Spliced> {
    splice_until(a, b, idle, std::future::pending())
}

/// [`splice`], also ended when `cut` completes (the peer was denied): then both sides are
/// closed abortively.
pub async fn splice_until<A: Side, B: Side>(
    a: A,
    b: B,
    idle: Option<Duration>,
    cut: impl Future<Output = ()>,
) -> Spliced {
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let epoch = tokio::time::Instant::now();
    let last = AtomicU64::new(0);
    let (ab, ba) = (AtomicU64::new(0), AtomicU64::new(0));
    let end = {
        let mut a_to_b = std::pin::pin!(copy(&mut ar, &mut bw, epoch, &last, &ab));
        let mut b_to_a = std::pin::pin!(copy(&mut br, &mut aw, epoch, &last, &ba));
        let idle_watch = async {
            let Some(idle) = idle else {
                return std::future::pending::<()>().await;
            };
            loop {
                let at = epoch + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
                if tokio::time::Instant::now() >= at {
                    return;
                }
                tokio::time::sleep_until(at).await;
            }
        };
        let mut idle_watch = std::pin::pin!(idle_watch);
        let mut cut = std::pin::pin!(cut);
        let mut first: Option<bool> = None; // which direction finished cleanly: true = a→b
        loop {
            tokio::select! {
                d = &mut a_to_b, if first != Some(true) => match d {
                    Dir::Done if first.is_some() => break End::Closed,
                    Dir::Done => first = Some(true),
                    Dir::SrcFailed => break End::ResetA,
                    Dir::DstFailed => break End::ResetB,
                },
                d = &mut b_to_a, if first != Some(false) => match d {
                    Dir::Done if first.is_some() => break End::Closed,
                    Dir::Done => first = Some(false),
                    Dir::SrcFailed => break End::ResetB,
                    Dir::DstFailed => break End::ResetA,
                },
                () = &mut idle_watch => break End::Idle,
                () = &mut cut => break End::Cut,
            }
        }
    };
    let spliced = Spliced {
        a_to_b: ab.load(Ordering::Relaxed),
        b_to_a: ba.load(Ordering::Relaxed),
        end,
    };
    match end {
        End::Closed => {}
        End::ResetA => B::abort(br, bw),
        End::ResetB => A::abort(ar, aw),
        End::Idle | End::Cut => {
            A::abort(ar, aw);
            B::abort(br, bw);
        }
    }
    spliced
}

/// Closes a TCP socket with a reset (SO_LINGER 0, then close).
fn reset_tcp(s: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// A TCP read half: waits for readability without a buffer, then reads into one.
///
/// The read goes through `AsyncRead` with the task's own waker: a read shorter than the
/// buffer drains the socket and Tokio then clears its readiness, so the next call sleeps at
/// once instead of first trying a read that can only fail with `EAGAIN` (one system call
/// per request). A `Pending` from it (stale readiness, or Tokio's cooperative budget
/// spent) has registered the task's waker, so the task sleeps and is woken correctly.
impl ChunkRead for tokio::net::tcp::OwnedReadHalf {
    async fn read_chunks(&mut self, out: &mut Vec<Bytes>) -> io::Result<bool> {
        let buf = std::future::poll_fn(|cx| {
            std::task::ready!(self.as_ref().poll_read_ready(cx))?;
            let mut buf: Vec<u8> = Vec::with_capacity(TCP_CHUNK);
            let read = std::pin::pin!(self.read_buf(&mut buf));
            std::task::ready!(read.poll(cx))?;
            std::task::Poll::Ready(Ok::<_, io::Error>(buf))
        })
        .await?;
        if buf.is_empty() {
            return Ok(false);
        }
        out.push(fitted(buf));
        Ok(true)
    }
}

impl Side for tokio::net::TcpStream {
    type R = tokio::net::tcp::OwnedReadHalf;
    type W = tokio::net::tcp::OwnedWriteHalf;
    fn split(self) -> (Self::R, Self::W) {
        self.into_split()
    }
    fn abort(r: Self::R, w: Self::W) {
        if let Ok(s) = r.reunite(w) {
            reset_tcp(s);
        }
    }
}

/// Most bytes gathered from a QUIC stream into one write to the other side.
const QUIC_GATHER: usize = 256 * 1024;

/// A QUIC stream hands over its received chunks (about one datagram each), without
/// copying them. The first is awaited; those already waiting behind it are taken without
/// waiting, so the TCP side gets one vectored write for them instead of one per datagram.
/// Nothing but quinn's small read future is held while the stream is idle, which keeps an
/// idle connection's task small.
impl ChunkRead for quinn::RecvStream {
    async fn read_chunks(&mut self, out: &mut Vec<Bytes>) -> io::Result<bool> {
        let mut total = match quinn::RecvStream::read_chunk(self, usize::MAX, true).await {
            Ok(Some(c)) => {
                let len = c.bytes.len();
                out.push(c.bytes);
                len
            }
            Ok(None) => return Ok(false),
            Err(e) => return Err(io::Error::from(e)),
        };
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        while total < QUIC_GATHER && out.len() < MAX_IOV {
            // Polled once: ready only when a chunk is already buffered. A pending read
            // is dropped (quinn's reads are cancel-safe); the next `read_chunks` awaits
            // with the task's real waker before the task sleeps.
            let next = std::pin::pin!(quinn::RecvStream::read_chunk(self, usize::MAX, true));
            match next.poll(&mut cx) {
                std::task::Poll::Ready(Ok(Some(c))) => {
                    total += c.bytes.len();
                    out.push(c.bytes);
                }
                // End of stream or an error: hand over what was read; the next call
                // reports it.
                _ => break,
            }
        }
        Ok(true)
    }
}

/// A tunnel stream over QUIC.
#[derive(Debug)]
pub struct QuicSide {
    /// Sending half.
    pub send: quinn::SendStream,
    /// Receiving half.
    pub recv: quinn::RecvStream,
}

impl Side for QuicSide {
    type R = quinn::RecvStream;
    type W = quinn::SendStream;
    fn split(self) -> (Self::R, Self::W) {
        (self.recv, self.send)
    }
    fn abort(mut r: Self::R, mut w: Self::W) {
        let _ = w.reset(RESET_CODE.into());
        let _ = r.stop(RESET_CODE.into());
    }
}

/// A boxed side: a TLS stream (over a kilobyte of rustls state) is passed boxed, so the
/// splice's future, which lives as long as the connection, holds a pointer, not the state.
impl<T: Side> Side for Box<T> {
    type R = T::R;
    type W = T::W;
    fn split(self) -> (Self::R, Self::W) {
        (*self).split()
    }
    fn abort(r: Self::R, w: Self::W) {
        T::abort(r, w);
    }
}

/// Read half of a TLS side.
#[derive(Debug)]
pub struct TlsRead<S>(tokio::io::ReadHalf<S>);

/// A TLS side is read through a one-byte probe first, so an idle connection waits
/// without a buffer; once a byte has arrived, a buffer is taken and whatever else is
/// already decrypted or already received (up to [`TLS_GATHER`] bytes, several records in
/// a bulk transfer) is read into it without waiting, so the other side gets one write for
/// all of it.
impl<S: tokio::io::AsyncRead + AsyncWrite + Send + Unpin> ChunkRead for TlsRead<S> {
    async fn read_chunks(&mut self, out: &mut Vec<Bytes>) -> io::Result<bool> {
        use bytes::BufMut as _;
        let mut probe = [0u8; 1];
        if self.0.read(&mut probe).await? == 0 {
            return Ok(false);
        }
        let mut buf = Vec::with_capacity(TLS_GATHER);
        buf.push(probe[0]);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        while buf.len() < TLS_GATHER {
            let room = TLS_GATHER - buf.len();
            // Polled once, without waiting: a pending read leaves nothing behind, and an
            // error or the end of the stream comes back on the next read, after these
            // bytes are handed over.
            let mut limited = (&mut buf).limit(room);
            let read = std::pin::pin!(self.0.read_buf(&mut limited));
            match read.poll(&mut cx) {
                std::task::Poll::Ready(Ok(n)) if n > 0 => {}
                _ => break,
            }
        }
        out.push(fitted(buf));
        Ok(true)
    }
}

impl Side for tokio_rustls::server::TlsStream<ReadAhead> {
    type R = TlsRead<Self>;
    type W = tokio::io::WriteHalf<Self>;
    fn split(self) -> (Self::R, Self::W) {
        let (r, w) = tokio::io::split(self);
        (TlsRead(r), w)
    }
    fn abort(r: Self::R, w: Self::W) {
        let (tcp, _) = r.0.unsplit(w).into_inner();
        reset_tcp(tcp.into_inner());
    }
}

impl Side for tokio_rustls::client::TlsStream<ReadAhead> {
    type R = TlsRead<Self>;
    type W = tokio::io::WriteHalf<Self>;
    fn split(self) -> (Self::R, Self::W) {
        let (r, w) = tokio::io::split(self);
        (TlsRead(r), w)
    }
    fn abort(r: Self::R, w: Self::W) {
        let (tcp, _) = r.0.unsplit(w).into_inner();
        reset_tcp(tcp.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    /// Takes at most 3 bytes per call, from the first buffers of a vectored write.
    struct Trickle(Vec<u8>);
    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(3);
            self.0.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(3 - n);
                self.0.extend_from_slice(&b[..take]);
                n += take;
                if n == 3 {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn vectored_writes_survive_partial_writes_in_order() {
        let parts: [&[u8]; 5] = [b"ab", b"", b"cdefg", b"h", b"ijklmnopq"];
        let mut chunks: Vec<Bytes> = parts.iter().map(|p| Bytes::copy_from_slice(p)).collect();
        let mut w = Trickle(Vec::new());
        write_vectored_all(&mut w, &mut chunks).await.unwrap();
        assert_eq!(w.0, b"abcdefghijklmnopq");
        assert!(chunks.is_empty());
    }

    /// A full read from a TCP side, sent as one HTTP/2 DATA frame, fills whole TLS records
    /// (no small record and second write behind every 64 KiB).
    #[tokio::test]
    async fn a_full_tcp_read_plus_a_frame_header_fills_whole_tls_records() {
        use tokio::io::AsyncWriteExt as _;
        let (mut client, server) = pair().await;
        let writer = tokio::spawn(async move {
            client.write_all(&vec![7u8; 3 * TCP_CHUNK]).await.unwrap();
            client
        });
        let (mut r, _w) = server.into_split();
        let mut total = 0;
        while total < 3 * TCP_CHUNK {
            let mut chunks = Vec::new();
            assert!(r.read_chunks(&mut chunks).await.unwrap());
            for c in &chunks {
                assert!(c.len() <= TCP_CHUNK, "a read of {} bytes", c.len());
                total += c.len();
            }
        }
        drop(writer.await.unwrap());
        let frame = TCP_CHUNK + crate::dataplane::mux::FRAME_HEADER;
        assert!(
            frame.is_multiple_of(TLS_RECORD),
            "a full read's frame is {frame} bytes"
        );
    }

    #[test]
    fn small_reads_do_not_pin_large_buffers() {
        let mut big = Vec::with_capacity(64 * 1024);
        big.extend_from_slice(b"hello");
        let b = fitted(big);
        assert_eq!(&b[..], b"hello");
        let full = vec![7u8; 40 * 1024];
        assert_eq!(fitted(full).len(), 40 * 1024);
    }

    /// A connected loopback pair (client, server).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// client ⇄ [a | proxy | b] ⇄ server
    async fn proxied(
        idle: Option<Duration>,
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Spliced>) {
        let (client, a) = pair().await;
        let (b, server) = pair().await;
        let task = tokio::spawn(splice(a, b, idle));
        (client, server, task)
    }

    fn rst(s: TcpStream) {
        reset_tcp(s);
    }

    #[tokio::test]
    async fn bytes_both_ways_and_half_close() {
        let (mut client, mut server, task) = proxied(None).await;
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping", "client → server, then EOF");
        // The other direction still works after the half-close.
        server.write_all(b"pong").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
        let s = task.await.unwrap();
        assert_eq!((s.a_to_b, s.b_to_a, s.end), (4, 4, End::Closed));
    }

    #[tokio::test]
    async fn a_reset_by_the_server_reaches_the_client_as_a_reset() {
        let (mut client, server, task) = proxied(None).await;
        client.write_all(b"x").await.unwrap();
        rst(server);
        let mut buf = [0u8; 8];
        let r = client.read(&mut buf).await;
        assert_eq!(
            r.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "the client must see a reset, not a clean end of stream"
        );
        assert_eq!(task.await.unwrap().end, End::ResetB);
    }

    #[tokio::test]
    async fn a_reset_by_the_client_reaches_the_server_as_a_reset() {
        let (client, mut server, task) = proxied(None).await;
        rst(client);
        let mut buf = [0u8; 8];
        let r = server.read(&mut buf).await;
        assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
        assert_eq!(task.await.unwrap().end, End::ResetA);
    }

    #[tokio::test]
    async fn a_cut_resets_both_ends_of_a_busy_connection() {
        let (client, a) = pair().await;
        let (b, server) = pair().await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(splice_until(a, b, None, async {
            let _ = rx.await;
        }));
        let (mut client, mut server) = (client, server);
        client.write_all(b"before").await.unwrap();
        let mut buf = [0u8; 6];
        server.read_exact(&mut buf).await.unwrap();
        tx.send(()).unwrap();
        assert_eq!(task.await.unwrap().end, End::Cut);
        let mut buf = [0u8; 1];
        for end in [&mut client, &mut server] {
            let r = end.read(&mut buf).await;
            assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
        }
    }

    #[tokio::test]
    async fn idle_connections_are_closed_and_busy_ones_are_not() {
        let idle = Duration::from_millis(300);
        let (mut client, mut server, task) = proxied(Some(idle)).await;
        // Traffic every 100 ms for longer than the idle timeout keeps it open.
        for _ in 0..6 {
            client.write_all(b"k").await.unwrap();
            let mut b = [0u8; 1];
            server.read_exact(&mut b).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!task.is_finished(), "a busy connection is not idle");
        // Then silence: both ends are reset.
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf))
            .await
            .expect("closed within the guard");
        assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
        let r = server.read(&mut buf).await;
        assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
        assert_eq!(task.await.unwrap().end, End::Idle);
    }

    #[tokio::test]
    async fn large_transfer_is_exact() {
        let (mut client, mut server, task) = proxied(None).await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let send = data.clone();
        let w = tokio::spawn(async move {
            client.write_all(&send).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        drop(server);
        drop(w.await.unwrap());
        assert_eq!(task.await.unwrap().a_to_b, data.len() as u64);
    }
}
