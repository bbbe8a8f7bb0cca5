//! The TCP + TLS fallback: multiplexed (HTTP/2) connections per peer, or one TLS
//! connection per stream with agents of an older version.

use super::*;

/// TCP + TLS tunnel connections: keepalive probes after this much silence, then every
/// interval, and the connection is dropped after `TCP_KEEPALIVE_PROBES` unanswered ones.
pub(super) const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(5);

pub(super) const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

pub(super) const TCP_KEEPALIVE_PROBES: u32 = 5;

/// Sent data unacknowledged this long drops a TCP + TLS tunnel connection.
pub(super) const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// A multiplexed TCP + TLS connection's handle; `closed` is set when its task ends.
#[derive(Clone)]
pub(super) struct MuxConn {
    pub(super) send: h2::client::SendRequest<bytes::Bytes>,
    pub(super) closed: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for MuxConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxConn")
            .field("closed", &self.closed)
            .finish()
    }
}

/// What a TCP + TLS dial gave: a multiplexed connection, or (a peer of an older
/// version) a TLS connection for this one stream.
pub(super) type TcpDial = Dialled<
    MuxConn,
    (
        Box<tokio_rustls::client::TlsStream<ReadAhead>>,
        Arc<tls::PeerFacts>,
    ),
>;

impl PoolConn for MuxConn {
    fn closed(&self) -> Option<String> {
        self.closed
            .load(std::sync::atomic::Ordering::Acquire)
            .then(|| "the multiplexed connection ended".to_owned())
    }
    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.closed, &other.closed)
    }
}

/// Makes a dead peer of a TCP + TLS tunnel connection show within about 30 s, as the QUIC
/// tunnel's idle timeout does: a pooled connection outlives its connect, and without
/// this, streams opened on a connection to a host that vanished (power loss, partition)
/// would wait for the kernel's retransmissions (~15 min) instead of failing over.
pub(crate) fn tune_tunnel_socket(s: &tokio::net::TcpStream) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(s);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(TCP_KEEPALIVE_IDLE)
            .with_interval(TCP_KEEPALIVE_INTERVAL)
            .with_retries(TCP_KEEPALIVE_PROBES),
    )?;
    sock.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT))
}

/// Counts one open connection in a gauge for as long as it lives.
pub(super) struct OpenGuard(pub(super) Arc<std::sync::atomic::AtomicU64>);

impl OpenGuard {
    pub(super) fn new(gauge: &Arc<std::sync::atomic::AtomicU64>) -> Self {
        gauge.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(gauge.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Opens a stream on a multiplexed connection and sends the header.
pub(super) async fn open_mux_stream(
    conn: &MuxConn,
    header: bytes::Bytes,
) -> Result<MuxSide, String> {
    let mut send = conn
        .send
        .clone()
        .ready()
        .await
        .map_err(|e| format!("multiplexed connection: {e}"))?;
    let (response, mut body) = send
        .send_request(mux::request(), false)
        .map_err(|e| format!("opening a stream: {e}"))?;
    body.send_data(header, false)
        .map_err(|e| format!("sending the header: {e}"))?;
    Ok(MuxSide {
        send: MuxWrite::new(body),
        recv: MuxRead::response(response),
    })
}

impl Tunnel {
    /// How many TCP + TLS connections this tunnel has dialled.
    pub fn tcp_dials(&self) -> u64 {
        self.tcp_dials.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) async fn open_tcp(
        &self,
        peer: SocketAddr,
        expected: &str,
        header: &Header,
    ) -> Result<Opened, TunnelError> {
        let bytes = bytes::Bytes::from(header.encode()?);
        let key = (peer, expected.to_owned());
        let stream_err = |message: String| TunnelError::Stream { peer, message };
        let mut last = None;
        // A pooled connection may have died since it was last used: one fresh attempt.
        for _ in 0..2 {
            let conn = match self.mux_connection(&key).await? {
                Dialled::Once((mut stream, peer)) => {
                    stream
                        .write_all(&bytes)
                        .await
                        .map_err(|e| stream_err(e.to_string()))?;
                    return Ok(Opened {
                        transport: Transport::TcpTls,
                        stream: TunnelStream::Tls(stream),
                        peer,
                    });
                }
                Dialled::Pooled(c) => c,
            };
            match open_mux_stream(&conn.conn, bytes.clone()).await {
                Ok(side) => {
                    return Ok(Opened {
                        transport: Transport::TcpTls,
                        stream: TunnelStream::Mux(side),
                        peer: conn.peer.clone(),
                    });
                }
                Err(e) => {
                    self.mux_pool.forget(&key, &conn.conn);
                    last = Some(e);
                }
            }
        }
        Err(stream_err(last.unwrap_or_default()))
    }

    /// A multiplexed TCP + TLS connection to the peer of `key` (pooled, or dialled once
    /// for every open waiting on it), or a connection of its own for a peer of an older
    /// version.
    pub(super) async fn mux_connection(&self, key: &PoolKey) -> Result<TcpDial, TunnelError> {
        let (peer, expected) = (key.0, key.1.as_str());
        let reusable = |c: &Pooled<MuxConn>| self.reusable(key, &c.peer, &c.identity);
        if self
            .single_peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
        {
            return self.dial_tcp(peer, expected).await;
        }
        let result = self
            .mux_pool
            .get_or_dial(key, reusable, || self.dial_tcp(peer, expected))
            .await;
        if let Ok(Dialled::Once(_)) = &result {
            tracing::info!(%peer, "the peer agent does not multiplex TCP + TLS (an older version): one connection per stream");
            self.single_peers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone());
        }
        result
    }

    /// Dials TCP, handshakes TLS (the peer must present `expected`) and, when the peer
    /// chose the multiplexed protocol, HTTP/2.
    pub(super) async fn dial_tcp(
        &self,
        peer: SocketAddr,
        expected: &str,
    ) -> Result<TcpDial, TunnelError> {
        let started = std::time::Instant::now();
        self.tcp_dials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // As in `dial`: read before the TLS configuration.
        let identity = self
            .identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let tls = self.client_tls(expected, true)?;
        let err = |message: String| TunnelError::Connect { peer, message };
        let tcp = connect_tcp(peer, self.settings.mark, self.settings.connect_timeout)
            .await
            .map_err(|e| err(e.to_string()))?;
        if let Err(e) = tune_tunnel_socket(&tcp) {
            tracing::warn!(%peer, error = %e, "cannot set keepalive on the tunnel connection");
        }
        let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).expect("literal");
        let stream = tokio::time::timeout(
            self.settings.connect_timeout,
            tokio_rustls::TlsConnector::from(tls).connect(name, ReadAhead::new(tcp)),
        )
        .await
        .map_err(|_| err("TLS handshake timed out".into()))?
        .map_err(|e| err(e.to_string()))?;
        let stream = Box::new(stream);
        let facts = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| err("the peer presented no certificate".into()))
            .and_then(|leaf| tls::peer_facts(leaf).map_err(err))?;
        if stream.get_ref().1.alpn_protocol() != Some(mux::ALPN_MUX) {
            crate::metrics::tunnel_connected("tcp", started);
            return Ok(Dialled::Once((stream, Arc::new(facts))));
        }
        let (send, conn) = tokio::time::timeout(
            self.settings.connect_timeout,
            mux::client_builder().handshake::<_, bytes::Bytes>(stream),
        )
        .await
        .map_err(|_| err("HTTP/2 handshake timed out".into()))?
        .map_err(|e| err(format!("HTTP/2 handshake: {e}")))?;
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = closed.clone();
        let open = OpenGuard::new(&self.mux_open);
        let facts = Arc::new(facts);
        let denied = self.connection_denied(facts.clone());
        tokio::spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "multiplexed tunnel connection ended");
                },
                // Dropping the connection closes its TCP connection; every stream on it
                // fails.
                () = denied => {}
            }
            flag.store(true, std::sync::atomic::Ordering::Release);
            drop(open);
        });
        tracing::debug!(%peer, identity = expected, "multiplexed TCP + TLS tunnel connection up");
        crate::metrics::tunnel_connected("tcp", started);
        Ok(Dialled::Pooled(Pooled::new(
            MuxConn { send, closed },
            facts,
            identity,
        )))
    }
}
