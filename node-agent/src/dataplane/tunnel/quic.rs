//! The QUIC transport: dialling, the pooled connection per peer, stream opening.

use super::*;

/// How long a QUIC handshake may take before the TCP + TLS fallback is tried.
pub(super) const QUIC_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest UDP payload the tunnel's path MTU discovery tries: a 9000-byte (jumbo) IP MTU
/// less IPv6 and UDP headers. quinn's default stops at 1452 (a 1500 MTU); on networks with
/// jumbo frames (cloud VPCs, 9001 on AWS) each datagram then carries ~6× the bytes, and a
/// bulk stream's cost is mostly per datagram. Probes are separate packets and data grows
/// only after a probe is acknowledged, so a 1500-byte path settles at its own limit
/// (1452–1472 bytes) instead of growing past it.
pub(crate) const MTU_UPPER_BOUND: u16 = 8952;

/// Flow-control window of one QUIC stream (as the multiplexed TCP + TLS tunnel's).
pub(super) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;

pub(super) fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(Duration::from_secs(30).try_into().expect("in range")));
    t.max_concurrent_bidi_streams(100_000u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // A stream's window keeps a bulk stream busy; the connection's is 16 of them. Bytes a
    // stalled application does not read hold their stream's window of the connection's,
    // so with 16 MiB (until session 6) four stalled streams to one peer stopped every
    // other stream to it (test `stalled_streams_do_not_block_the_other_streams_of_a_connection`);
    // now it takes sixteen at once. The bound is per peer connection: at most 64 MiB
    // buffered for stalled readers per peer.
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window((16 * STREAM_WINDOW).into());
    t.send_window(16 * 1024 * 1024);
    Arc::new(t)
}

impl Tunnel {
    /// Closes the pooled QUIC connections to peers whose certificate is denied now; their
    /// streams end with them. (Multiplexed TCP + TLS connections close themselves: their
    /// task waits on the deny list, see `dial_tcp`; accepted connections of both
    /// transports too, see `serve_connection` and `serve_mux`.)
    pub(super) fn close_denied(&self, deny: &std::collections::BTreeSet<String>) {
        let mut closed = Vec::new();
        self.pool.retain(|key, c| {
            let keep = !deny.contains(&c.peer.serial);
            if !keep {
                c.conn.close(DENIED_CODE.into(), b"certificate denied");
                closed.push((key.0, c.peer.clone()));
            }
            keep
        });
        for (peer, facts) in closed {
            tracing::info!(%peer, peer_identity = %facts.spiffe_id, serial = %facts.serial, "tunnel connection closed: the peer's certificate is on the deny list");
        }
    }

    pub(super) async fn connection(
        &self,
        peer: SocketAddr,
        expected: &str,
    ) -> Result<Pooled<quinn::Connection>, TunnelError> {
        let key = (peer, expected.to_owned());
        let reusable = |c: &Pooled<quinn::Connection>| self.reusable(&key, &c.peer, &c.identity);
        match self
            .pool
            .get_or_dial(&key, reusable, || async {
                self.dial(peer, expected)
                    .await
                    .map(Dialled::<_, std::convert::Infallible>::Pooled)
            })
            .await?
        {
            Dialled::Pooled(c) => Ok(c),
            Dialled::Once(never) => match never {},
        }
    }

    /// How many QUIC connections this tunnel has dialled.
    pub fn quic_dials(&self) -> u64 {
        self.dials.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The current path MTU (largest UDP payload) of each pooled QUIC connection.
    #[cfg(test)]
    pub(crate) async fn path_mtus(&self) -> Vec<u16> {
        self.pool.map(|c| c.conn.stats().path.current_mtu)
    }

    /// Makes a new QUIC connection to `peer`, which must present `expected`.
    pub(super) async fn dial(
        &self,
        peer: SocketAddr,
        expected: &str,
    ) -> Result<Pooled<quinn::Connection>, TunnelError> {
        let started = std::time::Instant::now();
        self.dials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Read before the TLS configuration is: a renewal in between makes the
        // connection look older than it is (it is replaced sooner), never newer.
        let identity = self
            .identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let tls = self.client_tls(expected, false)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| tls::TlsError::Identity(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport());
        let err = |message: String| TunnelError::Connect { peer, message };
        let connecting = self
            .endpoint
            .connect_with(cfg, peer, tls::SERVER_NAME)
            .map_err(|e| err(e.to_string()))?;
        let conn =
            tokio::time::timeout(self.settings.connect_timeout.min(QUIC_TIMEOUT), connecting)
                .await
                .map_err(|_| err("no QUIC answer in time (UDP blocked?)".into()))?
                .map_err(|e| err(e.to_string()))?;
        let facts = conn
            .peer_identity()
            .and_then(|a| {
                a.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|c| c.first().map(|d| tls::peer_facts(d)))
            .ok_or_else(|| err("the peer presented no certificate".into()))?
            .map_err(err)?;
        tracing::debug!(%peer, identity = expected, "tunnel connection up");
        crate::metrics::tunnel_connected("quic", started);
        Ok(Pooled::new(conn, Arc::new(facts), identity))
    }

    /// Dials QUIC to `peer` in the background; when it works, the peer leaves `quic_down`
    /// and its next streams use the pooled QUIC connection the probe made.
    pub(super) fn probe_quic(self: &Arc<Self>, peer: SocketAddr, expected: String) {
        let me = self.clone();
        tokio::spawn(async move {
            match me.connection(peer, &expected).await {
                Ok(_) => {
                    me.quic_down
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&peer);
                    tracing::info!(%peer, "QUIC to the peer agent works again; new streams use it");
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "QUIC probe failed; staying on TCP + TLS")
                }
            }
        });
    }

    pub(super) async fn open_quic(
        &self,
        peer: SocketAddr,
        expected: &str,
        header: &Header,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, Arc<tls::PeerFacts>), TunnelError> {
        let bytes = header.encode()?;
        let mut last = None;
        // A pooled connection may have died since it was last used: one fresh attempt.
        for _ in 0..2 {
            let Pooled {
                conn, peer: facts, ..
            } = self.connection(peer, expected).await?;
            match conn.open_bi().await {
                Ok((mut send, recv)) => {
                    send.write_all(&bytes)
                        .await
                        .map_err(|e| TunnelError::Stream {
                            peer,
                            message: e.to_string(),
                        })?;
                    return Ok((send, recv, facts));
                }
                Err(e) => {
                    self.pool.forget(&(peer, expected.to_owned()), &conn);
                    last = Some(e.to_string());
                }
            }
        }
        Err(TunnelError::Stream {
            peer,
            message: last.unwrap_or_default(),
        })
    }
}
