//! Forwarding to the host's original resolvers.
//!
//! The query's bytes go out unchanged and the upstream's answer comes back unchanged
//! (after checking it answers this query), so whatever the application asked for (EDNS
//! options, DNSSEC bits, its ID) is what the upstream sees. Every socket carries the
//! agent's mark, so the port-53 capture rule lets it through instead of redirecting it
//! back to the agent; a resolver library (hickory-resolver) would re-encode queries and
//! open its own sockets, which cannot carry that mark.
//!
//! UDP uses a fresh socket per query (a random source port per query, as a stub
//! resolver does); upstreams are tried in resolv.conf order, each for `timeout`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Where and how to forward.
#[derive(Debug, Clone)]
pub struct Forwarder {
    /// Upstream servers in order.
    pub upstreams: Vec<SocketAddr>,
    /// Wait per upstream.
    pub timeout: Duration,
    /// Mark on the sockets (None when capture is off).
    pub mark: Option<u32>,
}

/// Whether `resp` answers `query` (same ID, QR set).
fn answers(query: &[u8], resp: &[u8]) -> bool {
    resp.len() >= 12 && query.len() >= 2 && resp[..2] == query[..2] && resp[2] & 0x80 != 0
}

fn udp_socket(upstream: SocketAddr, mark: Option<u32>) -> std::io::Result<tokio::net::UdpSocket> {
    let domain = socket2::Domain::for_address(upstream);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if let Some(m) = mark {
        s.set_mark(m)?;
    }
    s.set_nonblocking(true)?;
    let any: SocketAddr = if upstream.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    s.bind(&any.into())?;
    s.connect(&upstream.into())?;
    tokio::net::UdpSocket::from_std(s.into())
}

impl Forwarder {
    /// Whether there is anywhere to forward to.
    pub fn has_upstreams(&self) -> bool {
        !self.upstreams.is_empty()
    }

    async fn udp_one(&self, upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let sock = udp_socket(upstream, self.mark)?;
        sock.send(query).await?;
        let mut buf = vec![0u8; 65535];
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time")
                })??;
            if answers(query, &buf[..n]) {
                buf.truncate(n);
                return Ok(buf);
            }
            // Anything else on this connected socket (a late or spoofed reply) is ignored.
        }
    }

    async fn tcp_one(&self, upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let len = u16::try_from(query.len()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "query above 65535 bytes")
        })?;
        let work = async {
            let mut s =
                crate::dataplane::tunnel::connect_tcp(upstream, self.mark, self.timeout).await?;
            let mut out = Vec::with_capacity(query.len() + 2);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(query);
            s.write_all(&out).await?;
            let mut prefix = [0u8; 2];
            s.read_exact(&mut prefix).await?;
            let mut resp = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
            s.read_exact(&mut resp).await?;
            if !answers(query, &resp) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the upstream's answer does not match the query",
                ));
            }
            Ok(resp)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))?
    }

    /// Forwards over UDP (the answer may be truncated; the client then retries over TCP,
    /// which is captured and forwarded over TCP).
    pub async fn udp(&self, query: &[u8]) -> Option<Vec<u8>> {
        for u in &self.upstreams {
            match self.udp_one(*u, query).await {
                Ok(r) => return Some(r),
                Err(e) => {
                    tracing::debug!(upstream = %u, error = %e, "upstream did not answer (UDP)")
                }
            }
        }
        tracing::warn!(upstreams = ?self.upstreams, "no upstream resolver answered; answering SERVFAIL");
        None
    }

    /// Forwards over TCP.
    pub async fn tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        for u in &self.upstreams {
            match self.tcp_one(*u, query).await {
                Ok(r) => return Some(r),
                Err(e) => {
                    tracing::debug!(upstream = %u, error = %e, "upstream did not answer (TCP)")
                }
            }
        }
        tracing::warn!(upstreams = ?self.upstreams, "no upstream resolver answered over TCP; answering SERVFAIL");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forwards_udp_and_tcp_and_skips_dead_upstreams() {
        // A tiny upstream on loopback: echoes the query with QR set.
        // UDP and TCP on one port number; the UDP port the kernel picks may be in use
        // on TCP (a client connection's local port), then both are bound again.
        let (udp, tcp) = (0..16)
            .find_map(|_| {
                let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                let tcp = std::net::TcpListener::bind(udp.local_addr().unwrap()).ok()?;
                udp.set_nonblocking(true).unwrap();
                tcp.set_nonblocking(true).unwrap();
                Some((udp, tcp))
            })
            .expect("a loopback port free for both UDP and TCP");
        let udp = tokio::net::UdpSocket::from_std(udp).unwrap();
        let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
        let addr = udp.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, from) = udp.recv_from(&mut buf).await.unwrap();
                // First a reply with the wrong ID (ignored), then the right one.
                let mut wrong = buf[..n].to_vec();
                wrong[0] ^= 0xff;
                wrong[2] |= 0x80;
                udp.send_to(&wrong, from).await.unwrap();
                buf[2] |= 0x80;
                udp.send_to(&buf[..n], from).await.unwrap();
            }
        });
        tokio::spawn(async move {
            loop {
                let (mut s, _) = tcp.accept().await.unwrap();
                let mut p = [0u8; 2];
                s.read_exact(&mut p).await.unwrap();
                let mut q = vec![0u8; usize::from(u16::from_be_bytes(p))];
                s.read_exact(&mut q).await.unwrap();
                q[2] |= 0x80;
                s.write_all(&p).await.unwrap();
                s.write_all(&q).await.unwrap();
            }
        });
        // A dead upstream first: a closed port on loopback.
        let dead = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let f = Forwarder {
            upstreams: vec![dead, addr],
            timeout: Duration::from_millis(500),
            mark: None,
        };
        let q = [0x12, 0x34, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let r = f.udp(&q).await.unwrap();
        assert_eq!(&r[..2], &[0x12, 0x34]);
        let f = Forwarder {
            upstreams: vec![addr],
            ..f
        };
        let r = f.tcp(&q).await.unwrap();
        assert_eq!(r[2] & 0x80, 0x80);
        let none = Forwarder {
            upstreams: vec![dead],
            timeout: Duration::from_millis(200),
            mark: None,
        };
        assert!(none.udp(&q).await.is_none());
    }
}
