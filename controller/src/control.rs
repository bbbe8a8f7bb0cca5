//! The control endpoint: QUIC (quinn + rustls) on UDP 15012.
//!
//! Server authentication always; client certificates optional at the TLS layer (a join
//! has none yet) and required by the renewal handler. Each request is one bidirectional
//! stream carrying one frame each way (see `causeway_api::wire`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use causeway_api::wire::{
    self, ClientRequest, ErrorCode, ErrorReply, ServerResponse, client_request, server_response,
};
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;

use crate::ca::Ca;
use crate::enroll::{Enroller, now_unix};
use crate::mesh::Mesh;
use crate::push::{ReadFrameError, read_frame, run_session};
use crate::store::Store;

/// ALPN protocol of the control endpoint.
pub const ALPN: &[u8] = b"causeway-control/1";
/// Lifetime of the controller's serving certificate (re-issued well before).
const SERVER_CERT_SECS: i64 = 30 * 24 * 3600;
/// How often the serving certificate is re-issued.
const SERVER_CERT_ROTATE: Duration = Duration::from_secs(24 * 3600);
/// Socket buffer asked for the control endpoint (the kernel caps it at rmem_max/wmem_max).
const UDP_BUFFER: usize = 8 << 20;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Sees the body of every control request as received (after TLS), before it is
/// decoded. Only tests set one (through [`crate::app::Hooks`]), to prove what agents
/// send; the binary never does, and nothing is written anywhere.
pub type RequestObserver = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Builds the QUIC server configuration with a fresh serving certificate.
pub fn server_config(ca: &Ca) -> anyhow::Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (chain, key) = ca.issue_server(now_unix(), SERVER_CERT_SECS)?;
    let mut roots = rustls::RootCertStore::empty();
    for der in ca.bundle_der() {
        roots.add(CertificateDer::from(der.clone()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(64u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // Agents send keep-alives every 3 s; a connection silent for 10 s is dead, which
    // starts its workload's grace period.
    transport.max_idle_timeout(Some(Duration::from_secs(10).try_into()?));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// The running control endpoint.
pub struct ControlServer {
    endpoint: quinn::Endpoint,
}

impl ControlServer {
    /// Binds the endpoint.
    pub fn bind(addr: SocketAddr, ca: &Ca) -> anyhow::Result<Self> {
        let bind_err = |e: std::io::Error| {
            anyhow::anyhow!(
                "cannot listen on UDP {addr} for the control endpoint: {e} (is another controller running? set control.listen or --control-listen)"
            )
        };
        let socket = std::net::UdpSocket::bind(addr).map_err(bind_err)?;
        // Many agents answering one update at once overflow the kernel's default
        // receive buffer (~200 KiB); ask for more (capped by net.core.rmem_max).
        let state = quinn::udp::UdpSocketState::new((&socket).into()).map_err(bind_err)?;
        for (what, r) in [
            (
                "receive",
                state.set_recv_buffer_size((&socket).into(), UDP_BUFFER),
            ),
            (
                "send",
                state.set_send_buffer_size((&socket).into(), UDP_BUFFER),
            ),
        ] {
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot enlarge the control socket's {what} buffer; raise net.core.rmem_max / wmem_max");
            }
        }
        let runtime = quinn::default_runtime()
            .ok_or_else(|| anyhow::anyhow!("no async runtime for the control endpoint"))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config(ca)?),
            socket,
            runtime,
        )
        .map_err(bind_err)?;
        Ok(Self { endpoint })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Closes the endpoint.
    pub fn close(&self) {
        self.endpoint
            .close(0u32.into(), b"controller shutting down");
    }

    /// Serves until the endpoint is closed.
    pub async fn serve(
        &self,
        enroller: Arc<Enroller>,
        mesh: Arc<Mesh>,
        store: Arc<dyn Store>,
        max_request: usize,
        observer: Option<RequestObserver>,
    ) {
        let endpoint = self.endpoint.clone();
        let rotate = enroller.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SERVER_CERT_ROTATE);
            tick.tick().await;
            loop {
                tick.tick().await;
                match server_config(rotate.ca()) {
                    Ok(cfg) => {
                        endpoint.set_server_config(Some(cfg));
                        tracing::info!("control endpoint certificate re-issued");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot re-issue the control endpoint certificate; keeping the current one")
                    }
                }
            }
        });
        let ctx = Arc::new(Ctx {
            enroller,
            mesh,
            store,
            max_request,
            observer,
        });
        while let Some(incoming) = self.endpoint.accept().await {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => ctx.connection(conn).await,
                    Err(e) => tracing::debug!(%remote, error = %e, "control handshake failed"),
                }
            });
        }
    }
}

struct Ctx {
    enroller: Arc<Enroller>,
    mesh: Arc<Mesh>,
    store: Arc<dyn Store>,
    max_request: usize,
    observer: Option<RequestObserver>,
}

fn error_response(code: ErrorCode, message: String) -> ServerResponse {
    ServerResponse {
        kind: Some(server_response::Kind::Error(ErrorReply {
            code: code as i32,
            message,
        })),
    }
}

impl Ctx {
    async fn connection(self: Arc<Self>, conn: quinn::Connection) {
        let peer: Option<Arc<Vec<CertificateDer<'static>>>> = conn
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .map(|b| Arc::new(*b));
        let remote = conn.remote_address();
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(_) => return,
            };
            let ctx = self.clone();
            let peer = peer.clone();
            tokio::spawn(async move {
                if let Err(e) = ctx.stream(remote, peer.as_deref(), send, recv).await {
                    tracing::debug!(%remote, error = %e, "control stream ended with an error");
                }
            });
        }
    }

    async fn stream(
        &self,
        remote: SocketAddr,
        peer: Option<&Vec<CertificateDer<'static>>>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> anyhow::Result<()> {
        let first =
            tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut recv, self.max_request)).await;
        let response = match first {
            Err(_) => error_response(
                ErrorCode::Malformed,
                format!(
                    "request not completed within {}s",
                    REQUEST_TIMEOUT.as_secs()
                ),
            ),
            Ok(Err(ReadFrameError::Frame(wire::FrameError::TooLarge { len, .. }))) => {
                let _ = recv.stop(0u32.into());
                tracing::warn!(%remote, len, limit = self.max_request, "oversized control request refused");
                error_response(
                    ErrorCode::TooLarge,
                    format!(
                        "request of {len} bytes is larger than the limit of {} bytes",
                        self.max_request
                    ),
                )
            }
            Ok(Err(ReadFrameError::Frame(e))) => {
                tracing::warn!(%remote, error = %e, "malformed control request");
                error_response(ErrorCode::Malformed, format!("malformed request: {e}"))
            }
            Ok(Err(e)) => return Err(anyhow::anyhow!("{e}")),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(body))) => {
                if let Some(observe) = &self.observer {
                    observe(&body);
                }
                match wire::decode_body::<ClientRequest>(&body) {
                    Ok(ClientRequest {
                        kind: Some(client_request::Kind::Subscribe(hello)),
                    }) => {
                        run_session(
                            self.mesh.clone(),
                            self.store.clone(),
                            self.enroller.ca().trust_domain().clone(),
                            peer.map(|v| v.as_slice()),
                            hello,
                            remote,
                            send,
                            recv,
                        )
                        .await;
                        return Ok(());
                    }
                    Ok(req) => self.handle(remote, peer, req).await,
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "malformed control request");
                        error_response(ErrorCode::Malformed, format!("malformed request: {e}"))
                    }
                }
            }
        };
        send.write_all(&wire::encode_frame(&response)).await?;
        send.finish()?;
        // Let the peer read the answer before the stream is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
        Ok(())
    }

    async fn handle(
        &self,
        remote: SocketAddr,
        peer: Option<&Vec<CertificateDer<'static>>>,
        req: ClientRequest,
    ) -> ServerResponse {
        let result = match req.kind {
            Some(client_request::Kind::Join(j)) => {
                let r = self.enroller.join(&j, remote.ip().to_canonical()).await;
                crate::metrics::joined(&r);
                r
            }
            Some(client_request::Kind::Renew(r)) => {
                let r = self.enroller.renew(peer.map(|v| v.as_slice()), &r).await;
                crate::metrics::renewed(&r);
                r
            }
            Some(client_request::Kind::Subscribe(_)) | None => {
                return error_response(
                    ErrorCode::Unsupported,
                    "request kind not supported by this controller (upgrade the controller?)"
                        .into(),
                );
            }
        };
        match result {
            Ok(issued) => ServerResponse {
                kind: Some(server_response::Kind::Issued(issued)),
            },
            Err(e) => {
                tracing::warn!(%remote, error = %e, "control request refused");
                error_response(e.code(), e.to_string())
            }
        }
    }
}
