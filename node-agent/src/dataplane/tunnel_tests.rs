//! The tunnel in one process on loopback (tier 2): two real `Tunnel`s, certificates from a
//! test CA, a local echo application.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use causeway_api::push::MeshState;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::tunnel::{Header, ReadHeader as _, Transport, Tunnel, TunnelSettings};
use crate::identity::{AgentInfo, Identity, cert_facts};
use crate::push::SharedState;

const WEB: &str = "spiffe://causeway.local/ns/default/sa/web";
const CLIENT: &str = "spiffe://causeway.local/ns/default/sa/client";

fn ca() -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    rcgen::CertifiedIssuer::self_signed(p, key).unwrap()
}

fn identity(ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, id: &str) -> Identity {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.signed_by(&key, ca).unwrap();
    let facts = cert_facts(cert.der()).unwrap();
    Identity {
        info: AgentInfo {
            agent_id: "a-test".into(),
            controller: "127.0.0.1:1".into(),
            group: "g".into(),
            spiffe_id: id.into(),
            ca_fingerprint: String::new(),
            joined_at: 0,
        },
        key_pem: key.serialize_pem(),
        chain_der: vec![cert.der().to_vec()],
        bundle_der: vec![ca.der().to_vec()],
        spiffe_id: facts.spiffe_id,
        not_before: facts.not_before,
        not_after: facts.not_after,
        serial: facts.serial,
    }
}

fn state(deny: &[&str]) -> SharedState {
    SharedState::new(MeshState {
        deny_serials: deny
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<BTreeSet<_>>(),
        ..MeshState::default()
    })
}

/// A state in which this host ("a-test") serves `port` (the tunnel only reaches such ports).
fn serving(port: u16, deny: &[&str]) -> SharedState {
    let st = state(deny);
    st.modify(|s| {
        s.services.insert(
            "default/web".into(),
            causeway_api::push::ServiceState {
                vip: None,
                endpoints: [(
                    "agents/a-test".to_owned(),
                    causeway_api::push::EndpointState {
                        address: "127.0.0.1".into(),
                        ports: [("tcp".to_owned(), port)].into(),
                        healthy: true,
                        zone: None,
                        identity: None,
                        source: "agents".into(),
                        stale: false,
                        labels: Default::default(),
                        mtls_strict: false,
                        region: None,
                    },
                )]
                .into(),
                hostnames: vec![],
                source_kinds: vec![],
                consul_tags: vec![],
                consul_datacenters: vec![],
                eureka_vips: vec![],
            },
        );
    });
    st
}

fn tunnel(id: Identity, st: SharedState) -> Arc<Tunnel> {
    tunnel_with(id, st, TunnelSettings::default())
}

fn tunnel_with(id: Identity, st: SharedState, settings: TunnelSettings) -> Arc<Tunnel> {
    Tunnel::bind("127.0.0.1:0".parse().unwrap(), id, st, settings).unwrap()
}

/// An echo application on loopback; returns its port.
async fn echo_app() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// Sends `msg` through the tunnel, half-closes, returns what came back (or the error).
async fn round_trip(
    a: &Arc<Tunnel>,
    b: SocketAddr,
    expected: &str,
    port: u16,
    msg: &[u8],
) -> Result<Vec<u8>, String> {
    Ok(round_trip_on(a, b, expected, port, msg).await?.1)
}

async fn round_trip_on(
    a: &Arc<Tunnel>,
    b: SocketAddr,
    expected: &str,
    port: u16,
    msg: &[u8],
) -> Result<(Transport, Vec<u8>), String> {
    let header = Header {
        service: "default/web".into(),
        port,
    };
    let o = a
        .open(b, expected, &header)
        .await
        .map_err(|e| e.to_string())?;
    let transport = o.transport;
    let (mut recv, mut send) = o.into_io();
    send.write_all(msg).await.map_err(|e| e.to_string())?;
    send.shutdown().await.map_err(|e| e.to_string())?;
    let mut back = Vec::new();
    recv.read_to_end(&mut back)
        .await
        .map_err(|e| e.to_string())?;
    Ok((transport, back))
}

#[tokio::test]
async fn mutual_tls_with_the_expected_identity_carries_bytes_both_ways() {
    let ca = ca();
    let port = echo_app().await;
    let b = tunnel(identity(&ca, WEB), serving(port, &[]));
    let a = tunnel(identity(&ca, CLIENT), state(&[]));
    let addr = b.local_addr().unwrap();
    assert_eq!(
        round_trip(&a, addr, WEB, port, b"hello").await.unwrap(),
        b"hello"
    );
    // A second stream reuses the pooled connection.
    assert_eq!(
        round_trip(&a, addr, WEB, port, b"again").await.unwrap(),
        b"again"
    );
}

#[tokio::test]
async fn another_identity_than_expected_is_refused() {
    let ca = ca();
    let port = echo_app().await;
    let b = tunnel(identity(&ca, WEB), serving(port, &[]));
    let a = tunnel(identity(&ca, CLIENT), state(&[]));
    let err = round_trip(
        &a,
        b.local_addr().unwrap(),
        "spiffe://causeway.local/ns/default/sa/db",
        port,
        b"x",
    )
    .await
    .unwrap_err();
    assert!(err.contains("but the endpoint's identity is"), "{err}");
}

#[tokio::test]
async fn a_peer_from_another_ca_is_refused_both_ways() {
    let (ours, theirs) = (ca(), ca());
    let port = echo_app().await;
    // Server from another CA, same SPIFFE ID.
    let stranger = tunnel(identity(&theirs, WEB), serving(port, &[]));
    let a = tunnel(identity(&ours, CLIENT), state(&[]));
    let err = round_trip(&a, stranger.local_addr().unwrap(), WEB, port, b"x")
        .await
        .unwrap_err();
    assert!(err.contains("cannot connect"), "{err}");
    // Client from another CA: the server refuses it; nothing reaches the application.
    let b = tunnel(identity(&ours, WEB), serving(port, &[]));
    let intruder = tunnel(identity(&theirs, CLIENT), state(&[]));
    let mut intruder_bundle = identity(&theirs, CLIENT);
    intruder_bundle.bundle_der.push(ours.der().to_vec());
    let intruder2 = tunnel(intruder_bundle, state(&[]));
    for t in [&intruder, &intruder2] {
        assert!(
            round_trip(t, b.local_addr().unwrap(), WEB, port, b"x")
                .await
                .is_err()
        );
    }
}

#[tokio::test]
async fn denied_serials_are_refused() {
    let ca = ca();
    let port = echo_app().await;
    let web = identity(&ca, WEB);
    let client = identity(&ca, CLIENT);
    // The client denies the server's certificate.
    let b = tunnel(web.clone(), serving(port, &[]));
    let a = tunnel(client.clone(), state(&[&web.serial]));
    let err = round_trip(&a, b.local_addr().unwrap(), WEB, port, b"x")
        .await
        .unwrap_err();
    assert!(
        err.contains("deny list") || err.contains("cannot connect"),
        "{err}"
    );
    // The server denies the client's certificate.
    let b2 = tunnel(web, serving(port, &[&client.serial]));
    let a2 = tunnel(client, state(&[]));
    assert!(
        round_trip(&a2, b2.local_addr().unwrap(), WEB, port, b"x")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn rotation_keeps_established_streams_and_new_connections_work() {
    let ca = ca();
    let port = echo_app().await;
    let b = tunnel(identity(&ca, WEB), serving(port, &[]));
    let a = tunnel(identity(&ca, CLIENT), state(&[]));
    let addr = b.local_addr().unwrap();
    let header = Header {
        service: "default/web".into(),
        port,
    };
    let o = a.open(addr, WEB, &header).await.unwrap();
    assert_eq!(o.transport, Transport::Quic);
    let (mut recv, mut send) = o.into_io();
    send.write_all(b"before ").await.unwrap();
    let mut buf = [0u8; 7];
    recv.read_exact(&mut buf).await.unwrap();
    // Both sides renew.
    a.reload(identity(&ca, CLIENT)).unwrap();
    b.reload(identity(&ca, WEB)).unwrap();
    // The established stream goes on.
    send.write_all(b"after").await.unwrap();
    send.shutdown().await.unwrap();
    let mut rest = Vec::new();
    recv.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"after");
    // New streams get a new connection, which presents the renewed certificate.
    assert_eq!(a.quic_dials(), 1);
    assert_eq!(
        round_trip(&a, addr, WEB, port, b"renewed").await.unwrap(),
        b"renewed"
    );
    assert_eq!(
        a.quic_dials(),
        2,
        "a stream after the renewal reused the old connection"
    );
    // A fresh tunnel (new connection, renewed certificates on both ends) works too.
    let c = tunnel(identity(&ca, CLIENT), state(&[]));
    assert_eq!(
        round_trip(&c, addr, WEB, port, b"new").await.unwrap(),
        b"new"
    );
}

/// A loopback UDP socket and a TCP listener on the same port number. The kernel picks
/// the UDP port, which TCP may have in use (a client connection's local port): then both
/// are bound again.
fn udp_and_tcp_on_one_port() -> (std::net::UdpSocket, std::net::TcpListener) {
    for _ in 0..16 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        if let Ok(tcp) = std::net::TcpListener::bind(udp.local_addr().unwrap()) {
            tcp.set_nonblocking(true).unwrap();
            return (udp, tcp);
        }
    }
    panic!("no loopback port free for both UDP and TCP in 16 attempts");
}

/// Relays TCP connections accepted by `relay` on to `target`.
async fn tcp_relay(relay: std::net::TcpListener, target: SocketAddr) {
    let relay = tokio::net::TcpListener::from_std(relay).unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = relay.accept().await {
            tokio::spawn(async move {
                if let Ok(up) = tokio::net::TcpStream::connect(target).await {
                    super::splice::splice(s, up, None).await;
                }
            });
        }
    });
}

/// An address where UDP is a black hole (the returned socket, which must be kept) and TCP
/// reaches `target`'s TCP + TLS listener: a peer whose UDP is blocked.
async fn udp_blocked_path_to(target: SocketAddr) -> (std::net::UdpSocket, SocketAddr) {
    let (black_hole, relay) = udp_and_tcp_on_one_port();
    let blocked = black_hole.local_addr().unwrap();
    tcp_relay(relay, target).await;
    (black_hole, blocked)
}

#[tokio::test]
async fn udp_blocked_falls_back_to_tcp_tls() {
    let ca = ca();
    let port = echo_app().await;
    let b = tunnel(identity(&ca, WEB), serving(port, &[]));
    let a = tunnel(identity(&ca, CLIENT), state(&[]));
    assert_eq!(
        round_trip_on(&a, b.local_addr().unwrap(), WEB, port, b"q")
            .await
            .unwrap(),
        (Transport::Quic, b"q".to_vec())
    );
    let (black_hole, blocked) = udp_blocked_path_to(b.local_addr().unwrap()).await;
    assert_eq!(
        round_trip_on(&a, blocked, WEB, port, b"fallback")
            .await
            .unwrap(),
        (Transport::TcpTls, b"fallback".to_vec())
    );
    // Remembered: the next stream goes straight to TCP + TLS; identity checks still apply.
    assert_eq!(
        round_trip_on(&a, blocked, WEB, port, b"again")
            .await
            .unwrap(),
        (Transport::TcpTls, b"again".to_vec())
    );
    let err = round_trip(&a, blocked, CLIENT, port, b"x")
        .await
        .unwrap_err();
    assert!(err.contains("but the endpoint's identity is"), "{err}");
    drop(black_hole);
}

#[tokio::test]
async fn only_the_hosts_workload_ports_are_reachable() {
    let ca = ca();
    let served = echo_app().await;
    let private = echo_app().await; // e.g. a loopback-only admin API on the same host
    let b = tunnel(identity(&ca, WEB), serving(served, &[]));
    let a = tunnel(identity(&ca, CLIENT), state(&[]));
    let addr = b.local_addr().unwrap();
    assert_eq!(
        round_trip(&a, addr, WEB, served, b"ok").await.unwrap(),
        b"ok".to_vec()
    );
    let refused = round_trip(&a, addr, WEB, private, b"secret").await;
    assert!(
        refused.map(|v| v.is_empty()).unwrap_or(true),
        "a loopback port outside the workload was reachable"
    );
}

#[tokio::test]
async fn concurrent_opens_share_one_dial_also_when_udp_is_blocked() {
    let ca = ca();
    let port = echo_app().await;
    let b = tunnel(identity(&ca, WEB), serving(port, &[]));
    let a = tunnel(identity(&ca, CLIENT), state(&[]));
    let opens = |peer: SocketAddr| {
        let a = a.clone();
        async move {
            let tasks: Vec<_> = (0..20)
                .map(|i| {
                    let a = a.clone();
                    tokio::spawn(async move {
                        let msg = format!("m{i}");
                        round_trip_on(&a, peer, WEB, port, msg.as_bytes())
                            .await
                            .map(|(t, back)| (t, back == msg.as_bytes()))
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap().unwrap());
            }
            out
        }
    };
    // A reachable peer: twenty streams at once ride one pooled connection.
    let done = opens(b.local_addr().unwrap()).await;
    assert!(
        done.iter().all(|d| *d == (Transport::Quic, true)),
        "{done:?}"
    );
    assert_eq!(a.quic_dials(), 1);
    // UDP a black hole, TCP reaching b: the twenty wait on one dial, then all fall back.
    let (black_hole, blocked) = udp_blocked_path_to(b.local_addr().unwrap()).await;
    let done = opens(blocked).await;
    assert!(
        done.iter().all(|d| *d == (Transport::TcpTls, true)),
        "{done:?}"
    );
    assert_eq!(
        a.quic_dials(),
        2,
        "one more dial for the blocked peer, not one per stream"
    );
    drop(black_hole);
}

#[tokio::test]
async fn a_pushed_deny_list_applies_to_the_next_tls_connection() {
    let ca = ca();
    let port = echo_app().await;
    let web = identity(&ca, WEB);
    let b = tunnel(web.clone(), serving(port, &[]));
    let st = state(&[]);
    let a = tunnel(identity(&ca, CLIENT), st.clone());
    let (_black_hole, blocked) = udp_blocked_path_to(b.local_addr().unwrap()).await;
    assert_eq!(
        round_trip_on(&a, blocked, WEB, port, b"one").await.unwrap(),
        (Transport::TcpTls, b"one".to_vec())
    );
    // A push denies the server's certificate: the client configuration is rebuilt.
    st.modify(|s| {
        s.deny_serials.insert(web.serial.clone());
        s.version += 1;
    });
    let err = round_trip(&a, blocked, WEB, port, b"two")
        .await
        .unwrap_err();
    assert!(err.contains("deny list"), "{err}");
}

/// Both ends of the tunnel agree on TLS 1.3 with AES-128-GCM (the client's order decides).
#[test]
fn the_tunnel_negotiates_tls13_aes_128_gcm() {
    let ca = ca();
    let bundle = [ca.der().to_vec()];
    let server = super::tls::server_config(&identity(&ca, WEB), &bundle).unwrap();
    let client = super::tls::client_config(
        &identity(&ca, CLIENT),
        &bundle,
        WEB,
        Arc::new(BTreeSet::new()),
    )
    .unwrap();
    let name = rustls::pki_types::ServerName::try_from(super::tls::SERVER_NAME).unwrap();
    let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
    let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
    // Moves everything `from` has to send into `to`.
    fn pump<A, B>(from: &mut rustls::ConnectionCommon<A>, to: &mut rustls::ConnectionCommon<B>) {
        let mut wire = Vec::new();
        from.write_tls(&mut wire).unwrap();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
            to.process_new_packets().unwrap();
        }
    }
    for _ in 0..10 {
        pump(&mut c, &mut s);
        pump(&mut s, &mut c);
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
    }
    assert!(!c.is_handshaking(), "the in-memory handshake finished");
    assert_eq!(
        c.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
}

/// Path MTU discovery goes past quinn's 1,452-byte default where the path allows it
/// (loopback: 65,536), close to the jumbo-frame bound and never beyond it: both the upper
/// bound and the largest datagram each endpoint says it accepts are raised.
#[tokio::test]
async fn path_mtu_discovery_uses_jumbo_datagrams_where_the_path_allows() {
    let ca = ca();
    let port = echo_app().await;
    let a = tunnel(identity(&ca, CLIENT), state(&[]));
    let b = tunnel(identity(&ca, WEB), serving(port, &[]));
    let b_addr = b.local_addr().unwrap();
    let msg = vec![7u8; 256 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mtu = loop {
        let (transport, back) = round_trip_on(&a, b_addr, WEB, port, &msg).await.unwrap();
        assert!(matches!(transport, Transport::Quic), "{transport:?}");
        assert_eq!(back.len(), msg.len());
        let mtus = a.path_mtus().await;
        assert_eq!(mtus.len(), 1, "one pooled connection: {mtus:?}");
        if mtus[0] > 8000 || tokio::time::Instant::now() > deadline {
            break mtus[0];
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        mtu > 8000 && mtu <= super::tunnel::MTU_UPPER_BOUND,
        "path MTU on loopback: {mtu}"
    );
}

/// TCP + TLS between agents of this version: every stream to a peer rides one pooled,
/// multiplexed TLS connection (20 at once, then more one after another).
#[tokio::test]
async fn tcp_tls_streams_share_one_multiplexed_connection() {
    let ca = ca();
    let port = echo_app().await;
    let b = tunnel(identity(&ca, WEB), serving(port, &[]));
    let a = tunnel(identity(&ca, CLIENT), state(&[]));
    let (black_hole, blocked) = udp_blocked_path_to(b.local_addr().unwrap()).await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move {
                let msg = format!("stream {i} ").repeat(1000);
                let got = round_trip_on(&a, blocked, WEB, port, msg.as_bytes()).await;
                got.map(|(t, back)| (t, back == msg.as_bytes()))
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), (Transport::TcpTls, true));
    }
    for i in 0..5 {
        let msg = format!("sequential {i}");
        assert_eq!(
            round_trip_on(&a, blocked, WEB, port, msg.as_bytes())
                .await
                .unwrap(),
            (Transport::TcpTls, msg.into_bytes())
        );
    }
    assert_eq!(a.tcp_dials(), 1, "one TLS connection for 25 streams");
    drop(black_hole);
}

/// Over a multiplexed stream: a half-close leaves the other direction open, a reset by
/// the application reaches the client as a reset, and the client's abort reaches the
/// application as a reset.
#[tokio::test]
async fn half_close_and_resets_travel_over_a_multiplexed_stream() {
    use super::splice::Side as _;
    let ca = ca();
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = app.local_addr().unwrap().port();
    let b = tunnel(identity(&ca, WEB), serving(port, &[]));
    let a = tunnel(identity(&ca, CLIENT), state(&[]));
    let (black_hole, blocked) = udp_blocked_path_to(b.local_addr().unwrap()).await;
    let header = Header {
        service: "default/web".into(),
        port,
    };

    // Half-close: the client sends and ends its direction; the application reads to the
    // end, then answers over the direction still open.
    let o = a.open(blocked, WEB, &header).await.unwrap();
    assert!(matches!(o.stream, super::tunnel::TunnelStream::Mux(_)));
    let (mut recv, mut send) = o.into_io();
    send.write_all(b"ping").await.unwrap();
    send.shutdown().await.unwrap();
    let (mut s, _) = app.accept().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"ping");
    s.write_all(b"pong").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    recv.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"pong");

    // The application resets: the client's read fails with a reset, not an end of stream.
    let o = a.open(blocked, WEB, &header).await.unwrap();
    let (mut recv, mut send) = o.into_io();
    send.write_all(b"x").await.unwrap();
    let (s, _) = app.accept().await.unwrap();
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    // And stays reset: a later read does not turn it into an end of stream.
    assert_eq!(
        recv.read(&mut buf).await.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );

    // The client aborts: the application sees a reset.
    let o = a.open(blocked, WEB, &header).await.unwrap();
    let super::tunnel::TunnelStream::Mux(mut m) = o.stream else {
        panic!("not multiplexed");
    };
    m.send.write_all(b"y").await.unwrap();
    let (mut s, _) = app.accept().await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    super::mux::MuxSide::abort(m.recv, m.send);
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    assert_eq!(a.tcp_dials(), 1);
    drop(black_hole);
}

/// Rolling upgrades: an agent of the previous version (TCP + TLS without multiplexing,
/// its ALPN only) is still reached, one connection per stream, and still reaches us.
#[tokio::test]
async fn agents_of_the_previous_version_still_talk_over_tcp_tls() {
    let ca = ca();
    let port = echo_app().await;
    // The previous version's server: TLS with its one ALPN, a header, then the bytes.
    let web = identity(&ca, WEB);
    let old_cfg = Arc::new(super::tls::server_config(&web, &web.bundle_der).unwrap());
    assert_eq!(old_cfg.alpn_protocols, vec![super::tls::ALPN.to_vec()]);
    let black_hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let old = black_hole.local_addr().unwrap();
    let listener = tokio::net::TcpListener::bind(old).await.unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let cfg = old_cfg.clone();
            tokio::spawn(async move {
                let mut tls = tokio_rustls::TlsAcceptor::from(cfg)
                    .accept(tcp)
                    .await
                    .unwrap();
                let h = Header::read(&mut tls).await.unwrap();
                let mut app = tokio::net::TcpStream::connect(("127.0.0.1", h.port))
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut app).await;
            });
        }
    });
    let a = tunnel(identity(&ca, CLIENT), state(&[]));
    for msg in [&b"first"[..], b"second"] {
        assert_eq!(
            round_trip_on(&a, old, WEB, port, msg).await.unwrap(),
            (Transport::TcpTls, msg.to_vec())
        );
    }
    assert_eq!(
        a.tcp_dials(),
        2,
        "one connection per stream with an old peer"
    );

    // The previous version's client reaches a current agent.
    let b = tunnel(web, serving(port, &[]));
    let client = identity(&ca, CLIENT);
    let cfg =
        super::tls::client_config(&client, &client.bundle_der, WEB, Arc::new(BTreeSet::new()))
            .unwrap();
    let tcp = tokio::net::TcpStream::connect(b.local_addr().unwrap())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(super::tls::SERVER_NAME).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(super::tls::ALPN));
    let header = Header {
        service: "default/web".into(),
        port,
    };
    tls.write_all(&header.encode().unwrap()).await.unwrap();
    tls.write_all(b"from an old agent").await.unwrap();
    let mut back = [0u8; 17];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"from an old agent");
    drop(black_hole);
}

/// Bad input on a multiplexed connection: a request that is not a tunnel stream gets a
/// 404, a stream with a malformed header is reset; the connection keeps serving.
#[tokio::test]
async fn a_multiplexed_connection_refuses_bad_requests_and_headers_and_goes_on() {
    let ca = ca();
    let port = echo_app().await;
    let b = tunnel(identity(&ca, WEB), serving(port, &[]));
    let client = identity(&ca, CLIENT);
    let mut cfg =
        super::tls::client_config(&client, &client.bundle_der, WEB, Arc::new(BTreeSet::new()))
            .unwrap();
    cfg.alpn_protocols = vec![super::mux::ALPN_MUX.to_vec()];
    let tcp = tokio::net::TcpStream::connect(b.local_addr().unwrap())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(super::tls::SERVER_NAME).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let (h2, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();

    let get = http::Request::get("https://causeway.tunnel/")
        .body(())
        .unwrap();
    let (resp, _) = h2.send_request(get, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), http::StatusCode::NOT_FOUND);

    let (resp, mut body) = h2.send_request(super::mux::request(), false).unwrap();
    body.send_data(bytes::Bytes::from_static(b"XYZ\x01\x00\x50\x01w"), false)
        .unwrap();
    // The reset may come before or after the response's headers are read.
    let err = match resp.await {
        Err(e) => e,
        Ok(r) => r.into_body().data().await.unwrap().unwrap_err(),
    };
    assert_eq!(err.reason(), Some(h2::Reason::PROTOCOL_ERROR), "{err}");

    // The same connection still carries a good stream.
    let (resp, mut body) = h2.send_request(super::mux::request(), false).unwrap();
    let header = Header {
        service: "default/web".into(),
        port,
    };
    body.send_data(header.encode().unwrap().into(), false)
        .unwrap();
    body.send_data(bytes::Bytes::from_static(b"still here"), true)
        .unwrap();
    let mut recv = resp.await.unwrap().into_body();
    let mut got = Vec::new();
    while let Some(chunk) = recv.data().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, b"still here");
}

/// A tunnel `b` serving `port` as `web` and a tunnel `a` of `client`, with the mesh state
/// of each (the deny tests put the other's serial in it).
struct Pair {
    b_state: SharedState,
    b: Arc<Tunnel>,
    a_state: SharedState,
    a: Arc<Tunnel>,
}

fn pair(web: &Identity, client: &Identity, port: u16) -> Pair {
    let b_state = serving(port, &[]);
    let b = tunnel(web.clone(), b_state.clone());
    let a_state = state(&[]);
    let a = tunnel(client.clone(), a_state.clone());
    Pair {
        b_state,
        b,
        a_state,
        a,
    }
}

/// A pooled connection is not reused once the peer's certificate is denied (QUIC and
/// TCP + TLS alike), and a peer's new stream is refused on a connection made before its
/// certificate was denied.
#[tokio::test]
async fn pooled_connections_are_not_reused_after_a_deny() {
    let ca = ca();
    let port = echo_app().await;
    let web = identity(&ca, WEB);
    let client = identity(&ca, CLIENT);
    let Pair {
        b_state,
        b,
        a_state,
        a,
    } = pair(&web, &client, port);
    let addr = b.local_addr().unwrap();
    let (black_hole, blocked) = udp_blocked_path_to(addr).await;
    for peer in [addr, blocked] {
        assert!(round_trip(&a, peer, WEB, port, b"ok").await.is_ok());
    }
    // The server denies the client: both pooled connections stay up on the client's
    // side, yet the server refuses their new streams.
    b_state.modify(|s| {
        s.deny_serials.insert(client.serial.clone());
    });
    for peer in [addr, blocked] {
        let r = round_trip(&a, peer, WEB, port, b"after the deny").await;
        assert!(
            r.as_ref().map(|v| v.is_empty()).unwrap_or(true),
            "a denied client's stream went through: {r:?}"
        );
    }
    b_state.modify(|s| s.deny_serials.clear());
    // The client denies the server: the pooled connections are dropped, the new dials
    // fail verification.
    a_state.modify(|s| {
        s.deny_serials.insert(web.serial.clone());
        s.version += 1;
    });
    for peer in [addr, blocked] {
        let err = round_trip(&a, peer, WEB, port, b"x").await.unwrap_err();
        assert!(err.contains("deny list"), "{peer}: {err}");
    }
    drop(black_hole);
}

/// A stream that is open when the peer's certificate is denied is cut (both transports):
/// the server agent resets the streams it accepted from a client denied since, and the
/// client agent's [`Tunnel::cut_when_denied`] fires for a server denied since.
#[tokio::test]
async fn open_streams_are_cut_when_the_peer_is_denied() {
    let ca = ca();
    let port = echo_app().await;
    let web = identity(&ca, WEB);
    let client = identity(&ca, CLIENT);
    let Pair {
        b_state,
        b,
        a_state,
        a,
    } = pair(&web, &client, port);
    let addr = b.local_addr().unwrap();
    let header = Header {
        service: "default/web".into(),
        port,
    };
    for tcp in [false, true] {
        a.set_tcp_only(tcp);
        // Inbound: the server denies the client while a stream is open.
        let (mut recv, mut send) = a.open(addr, WEB, &header).await.unwrap().into_io();
        let mut buf = [0u8; 4];
        send.write_all(b"ping").await.unwrap();
        recv.read_exact(&mut buf).await.unwrap();
        b_state.modify(|s| {
            s.deny_serials.insert(client.serial.clone());
        });
        let r = tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf))
            .await
            .expect("cut within the guard");
        assert!(
            r.is_err(),
            "tcp {tcp}: the stream of a denied client was not reset: {r:?}"
        );
        b_state.modify(|s| s.deny_serials.clear());
        // Outbound: the client denies the server while a stream is open.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let opened = a.open(addr, WEB, &header).await.unwrap();
        assert_eq!(opened.peer.serial, web.serial);
        let cut = a.cut_when_denied(opened.peer.clone());
        let mut cut = std::pin::pin!(cut);
        assert!(
            tokio::time::timeout(Duration::from_millis(700), &mut cut)
                .await
                .is_err(),
            "tcp {tcp}: cut before any deny"
        );
        a_state.modify(|s| {
            s.deny_serials.insert(web.serial.clone());
        });
        tokio::time::timeout(Duration::from_secs(10), cut)
            .await
            .expect("the client cuts its stream to a denied server");
        a_state.modify(|s| s.deny_serials.clear());
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}

/// Denying a peer closes the tunnel connections to and from it, not only their streams:
/// the server agent closes the connection it accepted from a denied client, the client
/// agent the one it dialled to a denied server (both transports). Before, the idle
/// connection stayed open, with keepalives, until the pool released it (5 minutes).
#[tokio::test]
async fn connections_of_a_denied_peer_are_closed_both_ways() {
    let ca = ca();
    let port = echo_app().await;
    let (web, client) = (identity(&ca, WEB), identity(&ca, CLIENT));
    for tcp in [false, true] {
        let transport = usize::from(tcp);
        let open = |t: &Arc<Tunnel>| t.counters().connections[transport];
        for server_denies in [true, false] {
            let Pair {
                b_state,
                b,
                a_state,
                a,
            } = pair(&web, &client, port);
            a.set_tcp_only(tcp);
            let addr = b.local_addr().unwrap();
            assert_eq!(round_trip(&a, addr, WEB, port, b"x").await.unwrap(), b"x");
            assert_eq!((open(&a), open(&b)), (1, 1), "tcp {tcp}");
            if server_denies {
                b_state.modify(|s| {
                    s.deny_serials.insert(client.serial.clone());
                });
            } else {
                // As a push does: a new version with the serial on the deny list.
                a_state.modify(|st| {
                    st.deny_serials.insert(web.serial.clone());
                    st.version += 1;
                });
            }
            wait_until(Duration::from_secs(10), || open(&a) == 0 && open(&b) == 0).await;
            if !server_denies {
                // A new stream to the denied server is refused, not sent on a pooled
                // connection.
                assert!(round_trip(&a, addr, WEB, port, b"y").await.is_err());
            }
            a.close();
            b.close();
        }
    }
}

/// `tunnel_transport = "tcp"`: streams go over TCP + TLS without trying QUIC first.
#[tokio::test]
async fn tcp_only_opens_streams_without_trying_quic() {
    let ca = ca();
    let port = echo_app().await;
    let b = tunnel(identity(&ca, WEB), serving(port, &[]));
    let a = tunnel(identity(&ca, CLIENT), state(&[]));
    a.set_tcp_only(true);
    let addr = b.local_addr().unwrap();
    for msg in [&b"one"[..], b"two"] {
        assert_eq!(
            round_trip_on(&a, addr, WEB, port, msg).await.unwrap(),
            (Transport::TcpTls, msg.to_vec())
        );
    }
    assert_eq!((a.quic_dials(), a.tcp_dials()), (0, 1));
    a.set_tcp_only(false);
    assert_eq!(
        round_trip_on(&a, addr, WEB, port, b"three").await.unwrap(),
        (Transport::Quic, b"three".to_vec())
    );
}

/// TCP + TLS tunnel connections carry keepalive and a user timeout, so a vanished peer
/// fails pooled streams within about 30 s (like QUIC's idle timeout), not ~15 min.
#[tokio::test]
async fn tcp_tunnel_sockets_detect_a_dead_peer() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let s = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let r = socket2::SockRef::from(&s);
    assert!(!r.keepalive().unwrap());
    super::tunnel::tune_tunnel_socket(&s).unwrap();
    assert!(r.keepalive().unwrap());
    assert_eq!(r.tcp_keepalive_time().unwrap(), Duration::from_secs(5));
    assert_eq!(r.tcp_keepalive_interval().unwrap(), Duration::from_secs(5));
    assert_eq!(r.tcp_keepalive_retries().unwrap(), 5);
    assert_eq!(r.tcp_user_timeout().unwrap(), Some(Duration::from_secs(30)));
}

/// An address whose UDP is relayed to `target` only while the returned switch is on (a
/// firewall that blocks, then allows, the tunnel's UDP); its TCP always reaches `target`.
async fn switchable_udp_path_to(
    target: SocketAddr,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (front, relay) = udp_and_tcp_on_one_port();
    front.set_nonblocking(true).unwrap();
    let front = Arc::new(tokio::net::UdpSocket::from_std(front).unwrap());
    let addr = front.local_addr().unwrap();
    tcp_relay(relay, target).await;
    let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    back.connect(target).await.unwrap();
    let on = Arc::new(AtomicBool::new(false));
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let (f, b, o, c) = (front.clone(), back.clone(), on.clone(), client.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = f.recv_from(&mut buf).await {
            if o.load(Ordering::Relaxed) {
                *c.lock().unwrap() = Some(from);
                let _ = b.send(&buf[..n]).await;
            }
        }
    });
    let (f, o) = (front, on.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = back.recv(&mut buf).await {
            let to = *client.lock().unwrap();
            if let (true, Some(to)) = (o.load(Ordering::Relaxed), to) {
                let _ = f.send_to(&buf[..n], to).await;
            }
        }
    });
    (addr, on)
}

/// Once a peer is on TCP + TLS because UDP was blocked, QUIC is probed in the background:
/// streams opened meanwhile do not wait on the probe's dial, and when UDP works again new
/// streams go over QUIC.
#[tokio::test]
async fn quic_is_probed_in_the_background_and_used_again_once_udp_works() {
    let ca = ca();
    let port = echo_app().await;
    let b = tunnel(identity(&ca, WEB), serving(port, &[]));
    let a = tunnel_with(
        identity(&ca, CLIENT),
        state(&[]),
        TunnelSettings {
            quic_down_for: Duration::from_millis(300),
            ..TunnelSettings::default()
        },
    );
    let (addr, udp_on) = switchable_udp_path_to(b.local_addr().unwrap()).await;
    assert_eq!(
        round_trip_on(&a, addr, WEB, port, b"blocked")
            .await
            .unwrap(),
        (Transport::TcpTls, b"blocked".to_vec())
    );
    assert_eq!(a.quic_dials(), 1);

    // Still blocked when the probe is due: the stream that starts the probe goes over TCP
    // without waiting out the probe's 2 s QUIC dial.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let started = std::time::Instant::now();
    assert_eq!(
        round_trip_on(&a, addr, WEB, port, b"during the probe")
            .await
            .unwrap(),
        (Transport::TcpTls, b"during the probe".to_vec())
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the stream waited for the QUIC probe"
    );
    assert_eq!(a.quic_dials(), 2, "the probe dialled");

    // UDP allowed again: after the next probe, new streams use QUIC.
    udp_on.store(true, std::sync::atomic::Ordering::Relaxed);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (transport, back) = round_trip_on(&a, addr, WEB, port, b"again").await.unwrap();
        assert_eq!(back, b"again");
        if transport == Transport::Quic {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "QUIC was never used again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The tunnel's counters (and the agent's `/metrics` lines from them) follow what each
/// transport carried, on both ends, and count the peers held on TCP + TLS.
#[tokio::test]
async fn counters_and_metrics_follow_each_transport() {
    let ca = ca();
    let port = echo_app().await;
    let b = tunnel(identity(&ca, WEB), serving(port, &[]));
    let a = tunnel(identity(&ca, CLIENT), state(&[]));
    let addr = b.local_addr().unwrap();
    let (black_hole, blocked) = udp_blocked_path_to(addr).await;
    for _ in 0..2 {
        round_trip(&a, addr, WEB, port, b"q").await.unwrap();
    }
    for _ in 0..3 {
        round_trip(&a, blocked, WEB, port, b"t").await.unwrap();
    }
    let c = a.counters();
    assert_eq!(
        (c.opened, c.dials, c.peers_on_tcp),
        ([2, 3], [2, 1], 1),
        "{c:?}"
    );
    assert_eq!(b.counters().accepted, [2, 3]);
    let health = crate::health::Health::new();
    health.set_tunnel(a.clone());
    let m = health.metrics();
    for line in [
        "causeway_agent_tunnel_streams_total{direction=\"outbound\",transport=\"quic\"} 2\n",
        "causeway_agent_tunnel_streams_total{direction=\"outbound\",transport=\"tcp\"} 3\n",
        "causeway_agent_tunnel_streams_total{direction=\"inbound\",transport=\"quic\"} 0\n",
        "causeway_agent_tunnel_dials_total{transport=\"quic\"} 2\n",
        "causeway_agent_tunnel_dials_total{transport=\"tcp\"} 1\n",
        "causeway_agent_tunnel_peers_on_tcp 1\n",
        "causeway_agent_tunnel_connections{transport=\"tcp\"} 1\n",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
    assert_eq!(b.counters().connections, [1, 1], "one of each accepted");
    drop(black_hole);
}

/// A pooled connection given no new stream for the pool's idle time is released: the
/// next stream dials again, a stream it still carries goes on, and the connection closes
/// once that stream ends (both transports; before, an idle connection stayed open, with
/// keepalives, for as long as both agents lived).
#[tokio::test]
async fn idle_pooled_connections_are_released_and_close_after_their_last_stream() {
    let ca = ca();
    let port = echo_app().await;
    let b = tunnel(identity(&ca, WEB), serving(port, &[]));
    for tcp in [false, true] {
        let a = tunnel_with(
            identity(&ca, CLIENT),
            state(&[]),
            TunnelSettings {
                tcp_only: tcp,
                pool_idle: Duration::from_millis(300),
                ..TunnelSettings::default()
            },
        );
        let transport = usize::from(tcp);
        let dials = |a: &Arc<Tunnel>| a.counters().dials[transport];
        let open = |a: &Arc<Tunnel>| a.counters().connections[transport];
        let addr = b.local_addr().unwrap();
        let header = Header {
            service: "default/web".into(),
            port,
        };
        // A long-lived stream, then the connection goes idle (no new stream).
        let (mut recv, mut send) = a.open(addr, WEB, &header).await.unwrap().into_io();
        let mut buf = [0u8; 5];
        send.write_all(b"hello").await.unwrap();
        recv.read_exact(&mut buf).await.unwrap();
        assert_eq!((dials(&a), open(&a)), (1, 1));
        tokio::time::sleep(Duration::from_millis(900)).await;
        // Released: a new stream dials a second connection ...
        assert_eq!(
            round_trip(&a, addr, WEB, port, b"new").await.unwrap(),
            b"new"
        );
        assert_eq!(
            dials(&a),
            2,
            "tcp {tcp}: the idle connection was not released"
        );
        // ... while the long-lived stream on the released one still carries bytes.
        send.write_all(b"still").await.unwrap();
        recv.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still");
        assert_eq!(
            open(&a),
            2,
            "tcp {tcp}: the released connection still has a stream"
        );
        send.shutdown().await.unwrap();
        let mut rest = Vec::new();
        recv.read_to_end(&mut rest).await.unwrap();
        drop((send, recv));
        // Both close now: the first lost its last stream, the second has been idle.
        wait_until(Duration::from_secs(10), || open(&a) == 0).await;
        wait_until(Duration::from_secs(10), || {
            b.counters().connections[transport] == 0
        })
        .await;
        assert_eq!(
            round_trip(&a, addr, WEB, port, b"again").await.unwrap(),
            b"again"
        );
        assert_eq!((dials(&a), open(&a)), (3, 1));
        a.close();
    }
}

async fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The same over the multiplexed TCP + TLS tunnel: a renewal keeps the stream that is
/// open and gives new streams a new connection.
#[tokio::test]
async fn rotation_over_tcp_tls_keeps_open_streams_and_redials_for_new_ones() {
    let ca = ca();
    let port = echo_app().await;
    let b = tunnel(identity(&ca, WEB), serving(port, &[]));
    let a = tunnel(identity(&ca, CLIENT), state(&[]));
    let (black_hole, blocked) = udp_blocked_path_to(b.local_addr().unwrap()).await;
    let header = Header {
        service: "default/web".into(),
        port,
    };
    let o = a.open(blocked, WEB, &header).await.unwrap();
    assert_eq!(o.transport, Transport::TcpTls);
    let (mut recv, mut send) = o.into_io();
    send.write_all(b"before ").await.unwrap();
    let mut buf = [0u8; 7];
    recv.read_exact(&mut buf).await.unwrap();
    a.reload(identity(&ca, CLIENT)).unwrap();
    assert_eq!(
        round_trip_on(&a, blocked, WEB, port, b"renewed")
            .await
            .unwrap(),
        (Transport::TcpTls, b"renewed".to_vec())
    );
    assert_eq!(
        a.tcp_dials(),
        2,
        "a new stream after the renewal used the old connection"
    );
    send.write_all(b"after").await.unwrap();
    send.shutdown().await.unwrap();
    let mut rest = Vec::new();
    recv.read_to_end(&mut rest).await.unwrap();
    assert_eq!(
        rest, b"after",
        "the open stream did not survive the renewal"
    );
    drop(black_hole);
}

/// A local application that accepts connections and never reads them (a stalled
/// consumer); returns its port.
async fn stalled_app() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    port
}

/// Streams whose applications stop reading fill their own flow-control windows, not the
/// whole connection's: five of them at once leave the connection free for the others
/// (no head-of-line blocking across streams), on both transports.
#[tokio::test]
async fn stalled_streams_do_not_block_the_other_streams_of_a_connection() {
    let ca = ca();
    let echo = echo_app().await;
    let stalled = stalled_app().await;
    let st = serving(echo, &[]);
    st.modify(|s| {
        let svc = s.services.get_mut("default/web").unwrap();
        let ep = svc.endpoints.get_mut("agents/a-test").unwrap();
        ep.ports.insert("stalled".into(), stalled);
    });
    let b = tunnel(identity(&ca, WEB), st.clone());
    let a = tunnel(identity(&ca, CLIENT), state(&[]));
    let (black_hole, blocked) = udp_blocked_path_to(b.local_addr().unwrap()).await;
    for (peer, transport) in [
        (b.local_addr().unwrap(), Transport::Quic),
        (blocked, Transport::TcpTls),
    ] {
        let header = Header {
            service: "default/web".into(),
            port: stalled,
        };
        let mut writers = Vec::new();
        for i in 0..5 {
            let o = tokio::time::timeout(Duration::from_secs(10), a.open(peer, WEB, &header))
                .await
                .unwrap_or_else(|_| panic!("{transport}: stream {i} could not even open"))
                .unwrap();
            assert_eq!(o.transport, transport);
            let (recv, mut send) = o.into_io();
            let chunk = vec![7u8; 256 * 1024];
            // Writes until the stream stops taking bytes (its window and the kernel's
            // buffers are full).
            while let Ok(r) =
                tokio::time::timeout(Duration::from_millis(500), send.write_all(&chunk)).await
            {
                r.unwrap();
            }
            writers.push((recv, send));
        }
        assert_eq!(
            tokio::time::timeout(
                Duration::from_secs(10),
                round_trip_on(&a, peer, WEB, echo, b"still moving")
            )
            .await
            .expect("a stream behind five stalled ones did not get through")
            .unwrap(),
            (transport, b"still moving".to_vec())
        );
        drop(writers);
    }
    drop(black_hole);
}

/// Puts the policy resources of `yaml` into `st` (replacing any there).
fn set_policies(st: &SharedState, yaml: &str) {
    st.modify(|s| {
        s.policies = super::authz::policies_from_yaml(yaml);
        s.version += 1;
    });
}

const OTHER: &str = "spiffe://causeway.local/ns/default/sa/other";

const ALLOW_BOTH: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-clients, namespace: default}\nspec:\n  rules:\n  - from:\n    - source: {principals: [\"causeway.local/ns/default/sa/client\", \"causeway.local/ns/default/sa/other\"]}\n";

/// AuthorizationPolicy at the destination (both transports): an ALLOW policy admits the
/// principals it names and refuses the rest; a DENY policy pushed while streams are open
/// cuts the streams it now denies and leaves the others echoing; removing it restores
/// access.
#[tokio::test]
async fn policies_refuse_new_streams_and_cut_open_ones_they_deny() {
    let ca = ca();
    let port = echo_app().await;
    let web = identity(&ca, WEB);
    let client = identity(&ca, CLIENT);
    let Pair { b_state, b, a, .. } = pair(&web, &client, port);
    let other = tunnel(identity(&ca, OTHER), state(&[]));
    let stranger = tunnel(
        identity(&ca, "spiffe://causeway.local/ns/default/sa/stranger"),
        state(&[]),
    );
    let addr = b.local_addr().unwrap();
    let header = Header {
        service: "default/web".into(),
        port,
    };
    set_policies(&b_state, ALLOW_BOTH);
    // The tunnel follows the published state (a margin for its task to run).
    tokio::time::sleep(Duration::from_millis(700)).await;
    for tcp in [false, true] {
        for t in [&a, &other, &stranger] {
            t.set_tcp_only(tcp);
        }
        assert_eq!(
            round_trip(&a, addr, WEB, port, b"hi").await.unwrap(),
            b"hi",
            "tcp {tcp}: the allowed client"
        );
        let r = round_trip(&stranger, addr, WEB, port, b"hi").await;
        assert!(
            r.as_ref().map(|v| v.is_empty()).unwrap_or(true),
            "tcp {tcp}: a principal no ALLOW rule names went through: {r:?}"
        );
        // Two open streams, then a DENY for the client only.
        let (mut c_recv, mut c_send) = a.open(addr, WEB, &header).await.unwrap().into_io();
        let (mut o_recv, mut o_send) = other.open(addr, WEB, &header).await.unwrap().into_io();
        let mut buf = [0u8; 4];
        for (r, w) in [(&mut c_recv, &mut c_send), (&mut o_recv, &mut o_send)] {
            w.write_all(b"ping").await.unwrap();
            r.read_exact(&mut buf).await.unwrap();
        }
        set_policies(
            &b_state,
            &format!(
                "{ALLOW_BOTH}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-client, namespace: default}}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source: {{principals: [\"causeway.local/ns/default/sa/client\"]}}\n"
            ),
        );
        let r = tokio::time::timeout(Duration::from_secs(10), c_recv.read(&mut buf))
            .await
            .expect("cut within the guard");
        assert!(
            r.is_err() || r.as_ref().is_ok_and(|n| *n == 0),
            "tcp {tcp}: the denied client's open stream was not cut: {r:?}"
        );
        o_send.write_all(b"pong").await.unwrap();
        o_recv.read_exact(&mut buf).await.unwrap();
        assert_eq!(
            &buf, b"pong",
            "tcp {tcp}: the other client's stream is untouched"
        );
        let r = round_trip(&a, addr, WEB, port, b"again").await;
        assert!(
            r.as_ref().map(|v| v.is_empty()).unwrap_or(true),
            "tcp {tcp}: a new stream of the denied client went through: {r:?}"
        );
        // Deleting the DENY policy restores access.
        set_policies(&b_state, ALLOW_BOTH);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            round_trip(&a, addr, WEB, port, b"back").await.unwrap(),
            b"back",
            "tcp {tcp}"
        );
        drop((o_send, o_recv));
    }
    let counted = super::authz::decisions().snapshot();
    assert!(
        counted
            .iter()
            .any(|(d, p, n)| *d == "deny" && p == "default/deny-client" && *n > 0),
        "{counted:?}"
    );
}

/// A policy or deny-list change reaches the tunnel when it is published, not at a poll
/// interval: under paused time the tunnel's authorization view and deny list (what open
/// streams are cut by) follow a published snapshot while the clock stands still. A
/// follower that polls on a timer only sees it after the clock advances to its next tick.
#[tokio::test(start_paused = true)]
async fn a_published_policy_or_deny_reaches_the_tunnel_without_a_timer() {
    let ca = ca();
    let st = serving(8080, &[]);
    let b = tunnel(identity(&ca, WEB), st.clone());
    let mut policies = b.policy_changes();
    let mut deny = b.deny_changes();
    let start = tokio::time::Instant::now();
    set_policies(&st, ALLOW_BOTH);
    policies.changed().await.unwrap();
    assert_eq!(policies.borrow_and_update().selected(), 1);
    st.modify(|s| {
        s.deny_serials.insert("0a0b".into());
    });
    deny.changed().await.unwrap();
    assert!(deny.borrow_and_update().contains("0a0b"));
    assert_eq!(
        tokio::time::Instant::now(),
        start,
        "the tunnel saw the change only after a timer fired"
    );
}

/// The config cache's write (with its fsync) does not hold up the data plane: while the
/// write of a push hangs, the agent's open proxied connection keeps echoing and a new
/// connection (a fresh dial from another agent) is accepted; pushes made meanwhile are
/// one more write, of the newest. On the agent's single-threaded runtime a write on the
/// data-plane thread would stop all of it until the write ends.
#[tokio::test]
async fn a_slow_config_cache_write_does_not_hold_up_proxied_connections() {
    use causeway_api::push::{ConfigUpdate, EndpointMsg, ServiceMsg};

    use crate::push::{ConfigCache, Outcome, WriteGate, apply};

    let ca = ca();
    let port = echo_app().await;
    let web = identity(&ca, WEB);
    let client = identity(&ca, CLIENT);
    let Pair { b_state, b, a, .. } = pair(&web, &client, port);
    let addr = b.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gate = WriteGate::closed();
    let writer = ConfigCache::new(dir.path())
        .gated(gate.clone())
        .spawn_writer(&b_state);
    // A push as the controller sends it: this host's workload serving `port`.
    let update = |version: u64| ConfigUpdate {
        version,
        full: true,
        vip_cidr: "240.240.0.0/16".into(),
        services: vec![ServiceMsg {
            namespace: "default".into(),
            name: "web".into(),
            vip: "240.240.0.1".into(),
            endpoints: vec![EndpointMsg {
                id: "agents/a-test".into(),
                address: "127.0.0.1".into(),
                ports: [("tcp".to_owned(), u32::from(port))].into(),
                healthy: true,
                ..EndpointMsg::default()
            }],
            ..ServiceMsg::default()
        }],
        ..ConfigUpdate::default()
    };
    let header = Header {
        service: "default/web".into(),
        port,
    };
    let (mut recv, mut send) = a.open(addr, WEB, &header).await.unwrap().into_io();
    let mut buf = [0u8; 4];
    send.write_all(b"ping").await.unwrap();
    recv.read_exact(&mut buf).await.unwrap();

    assert_eq!(apply(&b_state, &update(1)), Outcome::Applied(1));
    wait_until(Duration::from_secs(10), || gate.writes() == 1).await;
    // The write of version 1 hangs; two more pushes arrive.
    for v in [2, 3] {
        assert_eq!(apply(&b_state, &update(v)), Outcome::Applied(v));
    }
    send.write_all(b"pong").await.unwrap();
    recv.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong", "the open connection echoes");
    let other = tunnel(identity(&ca, OTHER), state(&[]));
    assert_eq!(
        round_trip(&other, addr, WEB, port, b"new").await.unwrap(),
        b"new",
        "a new connection is accepted"
    );
    assert_eq!(other.quic_dials() + other.tcp_dials(), 1);
    gate.open();
    writer.flush().await;
    assert!(
        !gate.timed_out(),
        "the data plane waited for the config cache write"
    );
    assert_eq!(ConfigCache::new(dir.path()).load(), *b_state.get());
    assert_eq!(b_state.get().version, 3);
    assert_eq!(
        gate.writes(),
        2,
        "the pushes made during a write are one write"
    );
    drop((send, recv));
}

/// An HTTP/1.1 application on loopback answering every request `200` with body
/// `METHOD PATH` (keep-alive); returns its port.
async fn http_app() -> u16 {
    use http_body_util::Full;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let body = format!("{} {}", req.method(), req.uri().path());
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            bytes::Bytes::from(body),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    port
}

async fn http_call(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    method: &str,
    path: &str,
) -> (u16, String) {
    use http_body_util::BodyExt as _;
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// On a port the workload declares HTTP, the AuthorizationPolicies decide each request
/// with its attributes instead of the stream: a client whose only ALLOW rule names a
/// method gets its stream (at L4, with Istio's TCP semantics, that rule never matches),
/// its GET reaches the application and its POST is answered 403 `RBAC: access denied` on
/// the same connection. A TCP port keeps the TCP semantics: the same rule refuses the
/// stream.
#[tokio::test]
async fn http_ports_decide_each_request_and_tcp_ports_each_stream() {
    use http_body_util::Empty;
    let ca = ca();
    let http_port = http_app().await;
    let tcp_port = echo_app().await;
    let web = identity(&ca, WEB);
    let client = identity(&ca, CLIENT);
    let Pair { b_state, b, a, .. } = pair(&web, &client, http_port);
    b_state.modify(|s| {
        for svc in s.services.values_mut() {
            for e in svc.endpoints.values_mut() {
                e.ports = [("http".to_owned(), http_port), ("tcp".to_owned(), tcp_port)].into();
            }
        }
    });
    set_policies(
        &b_state,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: get-only, namespace: default}\nspec:\n  rules:\n  - from:\n    - source: {principals: [\"causeway.local/ns/default/sa/client\"]}\n    to:\n    - operation: {methods: [GET]}\n",
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let addr = b.local_addr().unwrap();
    let header = Header {
        service: "default/web".into(),
        port: http_port,
    };
    let (recv, send) = a.open(addr, WEB, &header).await.unwrap().into_io();
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(
        hyper_util::rt::TokioIo::new(tokio::io::join(recv, send)),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    assert_eq!(
        http_call(&mut sender, "GET", "/a").await,
        (200, "GET /a".to_owned())
    );
    assert_eq!(
        http_call(&mut sender, "POST", "/a").await,
        (403, "RBAC: access denied".to_owned())
    );
    assert_eq!(
        http_call(&mut sender, "GET", "/b").await,
        (200, "GET /b".to_owned()),
        "the connection goes on after a denied request"
    );
    // A policy change applies to the next request of the open connection.
    set_policies(
        &b_state,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: get-only, namespace: default}\nspec:\n  rules:\n  - from:\n    - source: {principals: [\"causeway.local/ns/default/sa/client\"]}\n    to:\n    - operation: {methods: [GET], notPaths: [\"/b\"]}\n",
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        http_call(&mut sender, "GET", "/b").await,
        (403, "RBAC: access denied".to_owned()),
        "the new policy decides the open connection's next request"
    );
    assert_eq!(
        http_call(&mut sender, "GET", "/a").await,
        (200, "GET /a".to_owned())
    );
    let r = round_trip(&a, addr, WEB, tcp_port, b"hi").await;
    assert!(
        r.as_ref().map(|v| v.is_empty()).unwrap_or(true),
        "the TCP port's stream was not refused: {r:?}"
    );
}
