//! The simulated agents of the push benchmarks (`push_convergence`, `ha_bench`): as light
//! as an agent can be, so the benchmarks measure the controller. Each one is a QUIC
//! connection with the agent's own certificate (mutual TLS) from one shared client
//! `quinn::Endpoint`, one bidirectional stream, `Subscribe(Hello)`, then a loop that reads
//! each `PushFrame`, records when an update arrived and its encoded size, and ACKs it at
//! once (no `MeshState`, no cache).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use causeway_agent::client::ALPN;
use causeway_agent::identity::Identity;
use causeway_api::pem;
use causeway_api::push::{
    Ack, AgentFrame, Hello, MAX_PUSH_FRAME, PROTOCOL, PushFrame, agent_frame, push_frame,
};
use causeway_api::wire::{self, ClientRequest, client_request};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::mpsc;

/// The client endpoint shared by all simulated agents: one UDP socket on loopback with
/// a receive buffer of `rcvbuf` bytes asked for (the kernel caps it at
/// `net.core.rmem_max` and doubles it); returns the endpoint and the size granted.
pub fn client_endpoint(rcvbuf: usize) -> Result<(quinn::Endpoint, usize)> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    if rcvbuf > 0 {
        state.set_recv_buffer_size((&socket).into(), rcvbuf)?;
    }
    let granted = state.recv_buffer_size((&socket).into())?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok((endpoint, granted))
}

/// What a simulated agent reports for each update it ACKed.
pub struct Rec {
    /// The agent's index.
    pub agent: usize,
    /// The update's mesh version.
    pub version: u64,
    /// Whether it was a full snapshot.
    pub full: bool,
    /// Services in it.
    pub services: usize,
    /// Services it removed.
    pub removed: usize,
    /// Encoded frame size, length prefix included.
    pub bytes: usize,
    /// When the frame was read completely.
    pub received: Instant,
    /// When the ACK was written.
    pub acked: Instant,
}

/// The TLS client configuration of one simulated agent (its certificate, the mesh's
/// trust bundle), with the real agent's keep-alive and idle timeout.
pub fn client_config(id: &Identity) -> Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in &id.bundle_der {
        roots.add(CertificateDer::from(der.clone()))?;
    }
    let chain: Vec<CertificateDer<'static>> = id
        .chain_der
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    let key = pem::decode_all(&id.key_pem, "PRIVATE KEY")
        .into_iter()
        .next()
        .context("no PKCS#8 key")?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    // As the real agent: keep-alives every 3 s, 10 s idle timeout.
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(3)));
    transport.max_idle_timeout(Some(Duration::from_secs(10).try_into()?));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// One simulated agent: subscribe, then read and ACK every update until the stream ends.
pub async fn run_agent(
    agent: usize,
    conn: quinn::Connection,
    tx: mpsc::UnboundedSender<Rec>,
) -> Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = ClientRequest {
        kind: Some(client_request::Kind::Subscribe(Hello {
            last_version: 0,
            address: String::new(),
            agent_version: "bench".into(),
            protocol: PROTOCOL,
            ..Hello::default()
        })),
    };
    send.write_all(&wire::encode_frame(&hello)).await?;
    loop {
        let mut prefix = [0u8; 4];
        match recv.read_exact(&mut prefix).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let len = wire::frame_len(prefix, MAX_PUSH_FRAME)?;
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await?;
        let received = Instant::now();
        let frame: PushFrame = wire::decode_body(&body)?;
        match frame.kind {
            Some(push_frame::Kind::Update(u)) => {
                let ack = AgentFrame {
                    kind: Some(agent_frame::Kind::Ack(Ack { version: u.version })),
                };
                send.write_all(&wire::encode_frame(&ack)).await?;
                let _ = tx.send(Rec {
                    agent,
                    version: u.version,
                    full: u.full,
                    services: u.services.len(),
                    removed: u.removed.len(),
                    bytes: 4 + len,
                    received,
                    acked: Instant::now(),
                });
            }
            Some(push_frame::Kind::Heartbeat(_) | push_frame::Kind::Registration(_)) | None => {}
            Some(push_frame::Kind::Error(e)) => bail!("controller error: {}", e.message),
        }
    }
}
