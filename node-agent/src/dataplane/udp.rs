//! The tunnel's UDP socket for quinn, registered with the runtime for readability only.
//!
//! quinn's stock Tokio socket costs two avoidable things per datagram, measured with
//! `strace` on an agent under 1,000 requests/s:
//!
//! - Tokio registers a UDP socket for both directions, and each `sendmsg` frees buffer
//!   space, which is an `EPOLLOUT` edge: the next `epoll_wait` returns at once with
//!   nothing to do. Here the socket is registered for reading only. quinn asks whether the
//!   socket is writable before every send; the answer is yes, without a system call,
//!   unless a send failed with `EAGAIN` (rare: the buffers are several MiB). Then a
//!   duplicate of the descriptor is registered for writability just until there is room.
//! - After a `recvmmsg` that returned fewer datagrams than it had room for, the queue was
//!   empty, but the readiness stays set and the next poll tries once more, to fail with
//!   `EAGAIN`. Here such a short batch clears the readiness (with the readiness event seen
//!   before the read, so a datagram that arrived meanwhile still wakes the endpoint).
//!
//! Sending and receiving themselves are quinn-udp's (GSO, GRO, ECN, source addresses).

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A UDP socket for a quinn endpoint (see the module docs).
pub struct TunnelSocket {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// A send failed with `EAGAIN` and no wait for room has ended since.
    send_blocked: AtomicBool,
}

impl fmt::Debug for TunnelSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelSocket")
            .field("local", &self.io.get_ref().local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// Registers an owned socket with Tokio for `interest` only.
///
/// `AsyncFd::with_interest` is deprecated because it is unsound for a type whose
/// `as_raw_fd` may change or close under Tokio; a `std::net::UdpSocket` owns its descriptor
/// and never changes it, which is the contract the `unsafe` replacement asks the caller to
/// uphold (and this workspace forbids `unsafe`).
#[allow(
    deprecated,
    reason = "sound for an owned std socket; see the doc comment"
)]
fn register(
    socket: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    AsyncFd::with_interest(socket, interest)
}

impl TunnelSocket {
    /// Wraps a bound socket (made non-blocking here); needs a Tokio runtime.
    pub fn new(socket: std::net::UdpSocket, state: UdpSocketState) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        Ok(Self {
            io: register(socket, Interest::READABLE)?,
            state,
            send_blocked: AtomicBool::new(false),
        })
    }
}

/// Most bytes one segmentation-offload send may carry: an IPv4 packet's 65,535 less the
/// IPv4 and UDP headers (IPv6 allows 20 more).
const MAX_GSO_BYTES: usize = 65_535 - 20 - 8;

impl TunnelSocket {
    fn send_one(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        if matches!(&sent, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.send_blocked.store(true, Ordering::Release);
        }
        sent
    }
}

impl quinn::AsyncUdpSocket for TunnelSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(WritablePoller {
            socket: self,
            waiting: None,
        })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        // quinn batches up to 10 datagrams per send. With jumbo datagrams that passes the
        // 64 KiB a UDP segmentation-offload send can carry, the kernel refuses it with
        // `EMSGSIZE`, and quinn-udp takes `EMSGSIZE` for a lost MTU probe: the whole batch
        // would vanish. Such a batch goes out in parts that fit. (If a later part finds
        // the buffer full, quinn resends the batch; QUIC drops the duplicate packets.)
        match transmit.segment_size {
            Some(seg) if seg > 0 && transmit.contents.len() > MAX_GSO_BYTES => {
                let per = (MAX_GSO_BYTES / seg).max(1) * seg;
                for part in transmit.contents.chunks(per) {
                    self.send_one(&Transmit {
                        destination: transmit.destination,
                        ecn: transmit.ecn,
                        contents: part,
                        segment_size: (part.len() > seg).then_some(seg),
                        src_ip: transmit.src_ip,
                    })?;
                }
                Ok(())
            }
            _ => self.send_one(transmit),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let room = bufs.len().min(quinn::udp::BATCH_SIZE);
        loop {
            let mut ready = ready!(self.io.poll_read_ready(cx))?;
            let mut received = None;
            let result = ready.try_io(|io| {
                let n = self.state.recv(io.get_ref().into(), bufs, meta)?;
                received = Some(n);
                if n < room {
                    // The queue is empty: clear the readiness seen before this read.
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(n)
                }
            });
            if let Some(n) = received {
                return Poll::Ready(Ok(n));
            }
            match result {
                // `received` is set whenever the read succeeded.
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // `EAGAIN`: stale readiness, now cleared; wait again.
                Err(_would_block) => {}
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

/// Says whether the socket may take a datagram: at once while no send has failed with
/// `EAGAIN`; after one, a duplicate descriptor is registered for writability while the
/// wait lasts and dropped (deregistered and closed) once it is over.
struct WritablePoller {
    socket: Arc<TunnelSocket>,
    waiting: Option<AsyncFd<std::net::UdpSocket>>,
}

impl fmt::Debug for WritablePoller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WritablePoller")
            .field("waiting", &self.waiting.is_some())
            .finish_non_exhaustive()
    }
}

impl quinn::UdpPoller for WritablePoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.waiting.is_none() && !me.socket.send_blocked.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        if me.waiting.is_none() {
            let dup = me.socket.io.get_ref().try_clone()?;
            me.waiting = Some(register(dup, Interest::WRITABLE)?);
        }
        let polled = match me.waiting.as_ref().map(|fd| fd.poll_write_ready(cx)) {
            Some(Poll::Pending) => return Poll::Pending,
            Some(Poll::Ready(r)) => r.map(drop),
            None => Ok(()),
        };
        me.waiting = None;
        if polled.is_ok() {
            me.socket.send_blocked.store(false, Ordering::Release);
        }
        Poll::Ready(polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::AsyncUdpSocket as _;

    fn socket() -> Arc<TunnelSocket> {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let state = UdpSocketState::new((&s).into()).expect("state");
        Arc::new(TunnelSocket::new(s, state).expect("socket"))
    }

    async fn recv_one(s: &TunnelSocket) -> Vec<u8> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut meta = [RecvMeta::default(); 1];
        let n = {
            let mut bufs = [IoSliceMut::new(&mut buf)];
            std::future::poll_fn(|cx| s.poll_recv(cx, &mut bufs, &mut meta))
                .await
                .expect("recv")
        };
        assert_eq!(n, 1);
        buf.truncate(meta[0].len);
        buf
    }

    /// A datagram that arrives after a short batch cleared the readiness still wakes the
    /// reader, and datagrams queued beyond one batch are all read.
    #[tokio::test]
    async fn short_batches_clear_readiness_without_losing_a_datagram() {
        let s = socket();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind peer");
        let to = s.local_addr().expect("addr");
        peer.send_to(b"one", to).expect("send");
        assert_eq!(recv_one(&s).await, b"one");
        // Readiness is cleared now; the next datagram must still be delivered.
        let reader = {
            let s = s.clone();
            tokio::spawn(async move { recv_one(&s).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        peer.send_to(b"two", to).expect("send");
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("the second datagram woke the reader")
            .expect("join");
        assert_eq!(got, b"two");

        // A full batch does not clear readiness: 3 queued, read one at a time.
        for m in [b"a", b"b", b"c"] {
            peer.send_to(m, to).expect("send");
        }
        for m in [b"a", b"b", b"c"] {
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), recv_one(&s))
                .await
                .expect("queued datagram read");
            assert_eq!(got, m);
        }
    }

    /// The poller answers at once while no send has failed; after an `EAGAIN` it waits on
    /// a registration of its own, which ends (and clears the flag) once there is room. A
    /// full UDP send buffer cannot be arranged on loopback, where a datagram leaves the
    /// sender's buffer as it is sent, so the failure is simulated by setting the flag.
    #[tokio::test]
    async fn the_writable_poller_waits_only_after_a_send_found_no_room() {
        let s = socket();
        let mut poller = s.clone().create_io_poller();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        for _ in 0..3 {
            assert!(matches!(
                poller.as_mut().poll_writable(&mut cx),
                Poll::Ready(Ok(()))
            ));
        }
        s.send_blocked.store(true, Ordering::Release);
        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
            .await
            .expect("writable");
        assert!(
            !s.send_blocked.load(Ordering::Acquire),
            "the wait cleared the flag"
        );
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind peer");
        let transmit = Transmit {
            destination: peer.local_addr().expect("addr"),
            ecn: None,
            contents: b"hello",
            segment_size: None,
            src_ip: None,
        };
        s.try_send(&transmit).expect("send");
        let mut buf = [0u8; 16];
        let (n, _) = peer.recv_from(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"hello");
    }

    /// A batch of jumbo datagrams larger than one offloaded send can carry arrives whole
    /// (split into sends that fit, instead of being refused by the kernel and dropped).
    #[tokio::test]
    async fn a_batch_past_64_kib_is_split_and_every_datagram_arrives() {
        let s = socket();
        if s.max_transmit_segments() < 10 {
            eprintln!("no UDP segmentation offload here: nothing to split");
            return;
        }
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind peer");
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let seg = 8000;
        let contents: Vec<u8> = (0..10 * seg).map(|i| (i / seg) as u8).collect();
        s.try_send(&Transmit {
            destination: peer.local_addr().expect("addr"),
            ecn: None,
            contents: &contents,
            segment_size: Some(seg),
            src_ip: None,
        })
        .expect("send");
        let mut buf = vec![0u8; 65_536];
        for i in 0..10u8 {
            let (n, _) = peer.recv_from(&mut buf).expect("every datagram arrives");
            assert_eq!(n, seg, "datagram {i}");
            assert!(buf[..n].iter().all(|b| *b == i), "datagram {i} in order");
        }
    }
}
