//! Inbound: accepting connections and streams of both transports, and handing each
//! authorized stream to the local application.

use super::*;
use crate::dataplane::http::{self as h, HttpSettings, Proxy, UpstreamConn, UpstreamError};
use tracing::Instrument as _;

pub(super) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The local application as the inbound HTTP proxy's upstream: a TCP connection to
/// `127.0.0.1:port` with the agent's mark (like the splice's). A failed connect answers
/// the request with 503 `UF`.
#[derive(Debug)]
pub(crate) struct AppUpstream {
    addr: SocketAddr,
    mark: Option<u32>,
    connect_timeout: Duration,
}

impl h::Upstream for AppUpstream {
    async fn connect(&self, _endpoint: &str) -> Result<UpstreamConn, UpstreamError> {
        match connect_tcp(self.addr, self.mark, self.connect_timeout).await {
            Ok(s) => Ok(UpstreamConn {
                io: Box::new(s),
                peer: self.addr.to_string(),
                identity: None,
            }),
            Err(e) => {
                tracing::warn!(app = %self.addr, error = %e, "local application unreachable");
                Err(UpstreamError::Connect {
                    peer: self.addr.to_string(),
                    source: std::io::Error::other(e.to_string()),
                })
            }
        }
    }
}

/// A tunnel stream as one byte stream, for the HTTP proxy.
pub(super) trait IntoIo {
    fn into_io(self) -> Box<dyn h::Io>;
}

impl IntoIo for QuicSide {
    fn into_io(self) -> Box<dyn h::Io> {
        Box::new(tokio::io::join(self.recv, self.send))
    }
}

impl IntoIo for MuxSide {
    fn into_io(self) -> Box<dyn h::Io> {
        Box::new(tokio::io::join(self.recv, self.send))
    }
}

impl IntoIo for Box<tokio_rustls::server::TlsStream<ReadAhead>> {
    fn into_io(self) -> Box<dyn h::Io> {
        self
    }
}

impl Tunnel {
    pub(super) async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let mut accepting = self.accepting.subscribe();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = accepting.wait_for(|a| !*a) => return,
            };
            let Ok((tcp, remote)) = accepted else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                if let Err(e) = tune_tunnel_socket(&tcp) {
                    tracing::warn!(peer = %remote, error = %e, "cannot set keepalive on the tunnel connection");
                }
                let cfg = me
                    .tls_server
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                // Boxed: the handshake's and the stream's TLS state stay out of the task,
                // which lives as long as the connection.
                let tls = match tokio::time::timeout(
                    HEADER_TIMEOUT,
                    Box::pin(tokio_rustls::TlsAcceptor::from(cfg).accept(ReadAhead::new(tcp))),
                )
                .await
                {
                    Ok(Ok(t)) => Box::new(t),
                    Ok(Err(e)) => {
                        tracing::info!(peer = %remote, error = %e, "tunnel TLS handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
                let leaf = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|d| d.to_vec());
                let deny = me.state.get().deny_serials.clone();
                let peer = match leaf
                    .ok_or_else(|| "no client certificate".to_owned())
                    .and_then(|l| tls::check_peer(&l, None, &deny))
                {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(peer = %remote, error = %e, "tunnel connection refused");
                        return;
                    }
                };
                if tls.get_ref().1.alpn_protocol() == Some(mux::ALPN_MUX) {
                    me.serve_mux(peer, remote, tls).await;
                    return;
                }
                let mut tls = tls;
                let header =
                    match tokio::time::timeout(HEADER_TIMEOUT, Header::read(&mut *tls)).await {
                        Ok(Ok(h)) => h,
                        Ok(Err(e)) => {
                            tracing::warn!(peer = %remote, error = %e, "tunnel stream refused");
                            return;
                        }
                        Err(_) => return,
                    };
                // A refused stream over TCP + TLS is closed with its connection.
                me.serve_app(
                    &Arc::new(peer),
                    remote,
                    Transport::TcpTls,
                    header,
                    tls,
                    |t, _| drop(t),
                )
                .await;
            });
        }
    }

    /// Serves the streams of a multiplexed TCP + TLS connection.
    pub(super) async fn serve_mux(
        self: Arc<Self>,
        peer: tls::PeerFacts,
        remote: SocketAddr,
        tls: Box<tokio_rustls::server::TlsStream<ReadAhead>>,
    ) {
        let mut conn = match tokio::time::timeout(
            HEADER_TIMEOUT,
            mux::server_builder().handshake::<_, bytes::Bytes>(tls),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::info!(peer = %remote, error = %e, "tunnel HTTP/2 handshake refused");
                return;
            }
            Err(_) => return,
        };
        tracing::info!(peer = %remote, peer_identity = %peer.spiffe_id, "tunnel connection accepted (TCP + TLS, multiplexed)");
        let _open = OpenGuard::new(&self.mux_open);
        let peer = Arc::new(peer);
        let mut denied = std::pin::pin!(self.connection_denied(peer.clone()));
        // Accepting also drives the connection: its streams move only while this runs.
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                // Dropping the connection closes its TCP connection; every stream on
                // it fails.
                () = &mut denied => break,
            };
            let (request, respond) = match next {
                Some(Ok(r)) => r,
                Some(Err(e)) => {
                    tracing::debug!(peer = %remote, error = %e, "multiplexed tunnel connection ended");
                    break;
                }
                None => break,
            };
            let (me, peer) = (self.clone(), peer.clone());
            tokio::spawn(async move { me.serve_mux_stream(&peer, remote, request, respond).await });
        }
    }

    pub(super) async fn serve_mux_stream(
        &self,
        peer: &Arc<tls::PeerFacts>,
        remote: SocketAddr,
        request: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<bytes::Bytes>,
    ) {
        if !mux::is_tunnel_request(&request) {
            tracing::warn!(peer = %remote, method = %request.method(), path = %request.uri().path(), "tunnel stream refused: not a tunnel request");
            let mut not_found = http::Response::new(());
            *not_found.status_mut() = http::StatusCode::NOT_FOUND;
            let _ = respond.send_response(not_found, true);
            return;
        }
        let Ok(send) = respond.send_response(http::Response::new(()), false) else {
            return;
        };
        let mut side = MuxSide {
            send: MuxWrite::new(send),
            recv: MuxRead::body(request.into_body()),
        };
        let header = match tokio::time::timeout(HEADER_TIMEOUT, Header::read(&mut side.recv)).await
        {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::warn!(peer = %remote, error = %e, "tunnel stream refused");
                side.send.reset(h2::Reason::PROTOCOL_ERROR);
                return;
            }
            Err(_) => {
                side.send.reset(h2::Reason::CANCEL);
                return;
            }
        };
        self.serve_app(peer, remote, Transport::TcpTls, header, side, |mut m, _| {
            m.send.reset(h2::Reason::REFUSED_STREAM);
        })
        .await;
    }

    /// Authorizes, connects to the local application and splices. `refuse` closes the
    /// stream with an error code when that fails.
    pub(super) async fn serve_app<S: Side + IntoIo>(
        &self,
        peer: &Arc<tls::PeerFacts>,
        remote: SocketAddr,
        transport: Transport,
        header: Header,
        side: S,
        refuse: impl FnOnce(S, u32),
    ) {
        // One span per proxied stream: its events carry the connection's context.
        let span = tracing::info_span!(
            "inbound",
            src = %remote,
            peer_identity = %peer.spiffe_id,
            service = %header.service,
            port = header.port,
            %transport,
        );
        self.serve_authorized(peer, remote, transport, header, side, refuse)
            .instrument(span)
            .await;
    }

    async fn serve_authorized<S: Side + IntoIo>(
        &self,
        peer: &Arc<tls::PeerFacts>,
        remote: SocketAddr,
        transport: Transport,
        header: Header,
        side: S,
        refuse: impl FnOnce(S, u32),
    ) {
        let app = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, header.port));
        let proxy = self.http_proxy(app);
        // On an HTTP port the policies are decided per request, with its HTTP attributes
        // (Istio's HTTP RBAC): a denied request is answered 403, never the stream refused.
        let (own, decision) = match self.authorize(peer, remote, &header, proxy.is_none()) {
            Ok(a) => a,
            Err(code) => {
                refuse(side, code);
                return;
            }
        };
        if let Some(proxy) = proxy {
            let _inflight = self.inflight.track();
            self.accepted[transport as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!("inbound tunnel stream (HTTP: authorized per request)");
            let admission = Arc::new(crate::dataplane::http::authz::RequestAuthz {
                authz: self.authz.subscribe(),
                jwks: self.jwks(),
                peer: Arc::from(peer.spiffe_id.as_str()),
                source: remote.ip(),
                destination: own,
                port: header.port,
            });
            // Policy changes apply to the next request; a denied certificate cuts.
            let cut = self.cut_when_denied(peer.clone());
            let (io, conn) = self.observed_io(peer, &header, side.into_io());
            tokio::select! {
                r = Box::pin(proxy.serve_full(io, conn, Some(admission))) => if let Err(e) = r {
                    tracing::debug!(error = %e, "inbound HTTP stream ended");
                },
                () = cut => tracing::info!("inbound HTTP stream cut"),
            }
            return;
        }
        let Some(decision) = decision else {
            return;
        };
        let tcp = match connect_tcp(app, self.settings.mark, self.settings.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%app, error = %e, "local application unreachable");
                refuse(side, 2);
                return;
            }
        };
        let _inflight = self.inflight.track();
        // The access log's record (boxed: one pointer in the stream's task).
        let tcp_log = self.settings.telemetry.as_ref().and_then(|t| {
            let mut l = t.tcp_start(h::Side::Destination)?;
            l.upstream_host = Some(app.to_string());
            l.source_principal = Some(Arc::from(peer.spiffe_id.as_str()));
            l.destination_principal = Some(t.own_principal.clone());
            Some(Box::new(l))
        });
        self.accepted[transport as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(policy = decision.policy_label(), "inbound tunnel stream");
        let cut = self.cut_when_refused(peer.clone(), remote.ip(), own, header.port);
        let tcp_metrics = self.tcp_metrics(peer, &header);
        let done = splice_until(side, tcp, self.settings.idle_timeout, cut).await;
        if let Some(m) = tcp_metrics {
            m.bytes(done.a_to_b, done.b_to_a);
        }
        tracing::debug!(bytes_in = done.a_to_b, bytes_out = done.b_to_a, end = ?done.end, "inbound stream done");
        if let Some(l) = tcp_log {
            l.finish(done.a_to_b, done.b_to_a);
        }
    }

    /// The Istio TCP metrics of a stream from `peer` for `header`'s service (none when
    /// telemetry is off).
    fn tcp_metrics(
        &self,
        peer: &tls::PeerFacts,
        header: &Header,
    ) -> Option<crate::telemetry::TcpConn> {
        let istio = self.settings.telemetry.as_ref()?.istio.as_ref()?;
        Some(istio.destination_tcp(
            &Arc::from(peer.spiffe_id.as_str()),
            &Arc::from(header.service.as_str()),
        ))
    }

    /// A stream served as HTTP: counted into the TCP metrics as its bytes pass, and what
    /// its requests are recorded with (the client agent's identity, the service).
    fn observed_io(
        &self,
        peer: &tls::PeerFacts,
        header: &Header,
        io: Box<dyn h::Io>,
    ) -> (Box<dyn h::Io>, h::ConnInfo) {
        let conn = h::ConnInfo {
            peer_identity: Some(Arc::from(peer.spiffe_id.as_str())),
            service: Some(Arc::from(header.service.as_str())),
        };
        match self.tcp_metrics(peer, header) {
            Some(m) => (Box::new(crate::telemetry::CountingIo::new(io, m)), conn),
            None => (io, conn),
        }
    }

    /// The inbound HTTP proxy of local application port `app` when this host's workload
    /// declares that port HTTP by its name (`http`, `http-*`, `http2*`, `grpc*`); `None`
    /// otherwise (spliced; an undeclared port was sniffed on the client side, whose proxy
    /// then speaks HTTP over the spliced stream).
    fn http_proxy(&self, app: SocketAddr) -> Option<Proxy<AppUpstream>> {
        let mut declared = causeway_api::protocol::Protocol::Auto;
        self.for_own_endpoints(|e| {
            if let Some((name, _)) = e.ports.iter().find(|(_, p)| **p == app.port()) {
                declared = causeway_api::protocol::Protocol::from_port_name(name);
            }
        });
        let mut map = self.http.lock().unwrap_or_else(|p| p.into_inner());
        if !declared.is_http() {
            map.remove(&app.port());
            return None;
        }
        let proxy = map.entry(app.port()).or_insert_with(|| {
            let upstream = AppUpstream {
                addr: app,
                mark: self.settings.mark,
                connect_timeout: self.settings.connect_timeout,
            };
            let settings = match &self.settings.telemetry {
                Some(t) => t.http_settings(h::Side::Destination),
                None => HttpSettings {
                    side: h::Side::Destination,
                    ..HttpSettings::default()
                },
            };
            let observer: Arc<dyn h::Observer> = match &self.settings.telemetry {
                Some(t) => t.http_observer(crate::telemetry::Scope::Destination),
                None => Arc::new(crate::dataplane::outbound::LogObserver),
            };
            Proxy::new(upstream, settings, observer)
        });
        Some(proxy.clone())
    }

    /// Calls `f` with each of this agent's own registered endpoints (`agents/<agent id>`,
    /// one per service it registered under).
    pub(super) fn for_own_endpoints(&self, mut f: impl FnMut(&causeway_api::push::EndpointState)) {
        let me = format!(
            "agents/{}",
            self.identity
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .info
                .agent_id
        );
        let state = self.state.get();
        for e in state.services.values().filter_map(|s| s.endpoints.get(&me)) {
            f(e);
        }
    }

    /// Ports and address of this agent's own registered workload (endpoint
    /// `agents/<agent id>`; the address is unspecified when it has none), in one pass.
    pub(super) fn own_workload(&self) -> (std::collections::BTreeSet<u16>, std::net::IpAddr) {
        let mut ports = std::collections::BTreeSet::new();
        let mut addr = None;
        self.for_own_endpoints(|e| {
            ports.extend(e.ports.values().copied());
            addr = addr.or_else(|| e.address.parse().ok());
        });
        (
            ports,
            addr.unwrap_or(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        )
    }

    pub(super) async fn serve(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let me = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => me.serve_connection(conn).await,
                    Err(e) => {
                        tracing::info!(peer = %remote, error = %e, "tunnel handshake refused")
                    }
                }
            });
        }
    }

    pub(super) async fn serve_connection(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let leaf = conn
            .peer_identity()
            .and_then(|a| {
                a.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|c| c.first().map(|d| d.to_vec()));
        let Some(leaf) = leaf else {
            conn.close(1u32.into(), b"no client certificate");
            return;
        };
        let deny = self.state.get().deny_serials.clone();
        let peer = match tls::check_peer(&leaf, None, &deny) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(peer = %remote, error = %e, "tunnel connection refused");
                conn.close(2u32.into(), b"certificate refused");
                return;
            }
        };
        tracing::info!(peer = %remote, peer_identity = %peer.spiffe_id, "tunnel connection accepted");
        let peer = Arc::new(peer);
        let mut denied = std::pin::pin!(self.connection_denied(peer.clone()));
        loop {
            tokio::select! {
                next = conn.accept_bi() => {
                    let Ok((send, recv)) = next else { break };
                    let (me, peer) = (self.clone(), peer.clone());
                    tokio::spawn(async move { me.serve_stream(&peer, remote, send, recv).await });
                }
                () = &mut denied => {
                    conn.close(DENIED_CODE.into(), b"certificate denied");
                    break;
                }
            }
        }
    }

    pub(super) async fn serve_stream(
        &self,
        peer: &Arc<tls::PeerFacts>,
        remote: SocketAddr,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let header = match tokio::time::timeout(HEADER_TIMEOUT, Header::read(&mut recv)).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::warn!(peer = %remote, error = %e, "tunnel stream refused");
                let _ = send.reset(1u32.into());
                return;
            }
            Err(_) => {
                let _ = send.reset(1u32.into());
                return;
            }
        };
        self.serve_app(
            peer,
            remote,
            Transport::Quic,
            header,
            QuicSide { send, recv },
            |mut q, code| {
                let _ = q.send.reset(code.into());
                let _ = q.recv.stop(code.into());
            },
        )
        .await;
    }
}
