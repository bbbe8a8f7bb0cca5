//! Outbound: the listener captured connections are redirected to (127.0.0.1:15001).
//!
//! For each connection: the original destination (SO_ORIGINAL_DST, through socket2's
//! safe wrapper), then the route:
//! - a service VIP and a port number that the service's endpoints expose → one of those
//!   endpoints, chosen by [`super::lb::Balancer`]; a failed connect ejects the endpoint
//!   and the next choice is tried (up to [`ATTEMPTS`]);
//! - a meshed endpoint's own address and one of its ports → that endpoint (the
//!   application asked for that host);
//! - anything else → passthrough to the original destination.
//!
//! Then auto mTLS: an endpoint with an identity (it runs an agent) is reached through the
//! tunnel; one without gets a plain TCP connection, unless plaintext upstreams are
//! disabled.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use causeway_api::push::MeshState;

use super::lb::{Balancer, Candidate, Outstanding};
use super::splice::{splice, splice_until};
use super::tunnel::{Header, Tunnel, TunnelStream, connect_tcp};
use crate::push::SharedState;
use tracing::Instrument as _;

/// Endpoints tried per connection before giving up.
pub const ATTEMPTS: usize = 3;

/// One possible upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Balancer key (`service/endpoint id`).
    pub key: String,
    /// Service key (`namespace/name`).
    pub service: String,
    /// Endpoint address and the application port.
    pub addr: SocketAddr,
    /// SPIFFE ID when it runs an agent.
    pub identity: Option<String>,
    /// Zone.
    pub zone: Option<String>,
}

/// Where a captured connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Choose among these (VIP).
    Balanced(Vec<Upstream>),
    /// This endpoint only (its own address was dialled).
    Direct(Upstream),
    /// Not a mesh destination: connect to it as is.
    Passthrough(SocketAddr),
}

/// Maps an original destination to a route (pure).
pub fn route(state: &MeshState, dst: SocketAddr) -> Route {
    let port = dst.port();
    let IpAddr::V4(ip) = dst.ip() else {
        return Route::Passthrough(dst);
    };
    let upstreams = |key: &str, svc: &causeway_api::push::ServiceState| -> Vec<Upstream> {
        svc.endpoints
            .iter()
            .filter(|(_, e)| e.healthy && e.ports.values().any(|p| *p == port))
            .filter_map(|(id, e)| {
                let addr: IpAddr = e.address.parse().ok()?;
                Some(Upstream {
                    key: format!("{key}/{id}"),
                    service: key.to_owned(),
                    addr: SocketAddr::new(addr, port),
                    identity: e.identity.clone(),
                    zone: e.zone.clone(),
                })
            })
            .collect()
    };
    if let Some((key, svc)) = state.services.iter().find(|(_, s)| s.vip == Some(ip)) {
        return Route::Balanced(upstreams(key, svc));
    }
    for (key, svc) in &state.services {
        if let Some(u) = upstreams(key, svc)
            .into_iter()
            .find(|u| u.addr.ip() == IpAddr::V4(ip))
        {
            return Route::Direct(u);
        }
    }
    Route::Passthrough(dst)
}

/// Settings of the outbound side.
#[derive(Debug, Clone)]
pub struct OutboundSettings {
    /// Mark for the agent's own sockets (None when capture is off).
    pub mark: Option<u32>,
    /// Port of peer agents' tunnel.
    pub tunnel_port: u16,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// A proxied connection with no byte either way for this long is closed (reset).
    pub idle_timeout: Option<Duration>,
    /// This host's zone.
    pub zone: Option<String>,
    /// Whether endpoints without an agent may be reached in plaintext.
    pub plaintext_upstreams: bool,
    /// This host's workload address: when the controller pushes this host's workload
    /// with its group in STRICT mode, plaintext upstreams are refused as well.
    pub own_address: Option<std::net::IpAddr>,
}

/// The outbound proxy.
#[derive(Debug)]
pub struct Outbound {
    state: SharedState,
    tunnel: Arc<Tunnel>,
    lb: Arc<Balancer>,
    settings: OutboundSettings,
    local: SocketAddr,
}

impl Outbound {
    /// Whether this host's own workload is in a STRICT group (pushed by the controller).
    fn group_strict(&self) -> bool {
        let Some(own) = self.settings.own_address else {
            return false;
        };
        let own = own.to_string();
        self.state.get().services.values().any(|s| {
            s.endpoints
                .values()
                .any(|e| e.mtls_strict && e.address == own)
        })
    }

    /// Serves connections from `listener` until the task is dropped.
    pub async fn serve(
        listener: tokio::net::TcpListener,
        state: SharedState,
        tunnel: Arc<Tunnel>,
        lb: Arc<Balancer>,
        settings: OutboundSettings,
    ) {
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let me = Arc::new(Self {
            state,
            tunnel,
            lb,
            settings,
            local,
        });
        loop {
            match listener.accept().await {
                Ok((stream, client)) => {
                    let me = me.clone();
                    // One span per proxied connection: its events carry the
                    // connection's context (the destination is recorded once known).
                    let span = tracing::info_span!(
                        "outbound",
                        src = %client,
                        dst = tracing::field::Empty
                    );
                    tokio::spawn(async move { me.handle(stream).await }.instrument(span));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, stream: tokio::net::TcpStream) {
        let _inflight = self.tunnel.inflight().track();
        // Routing and connecting is its own future, boxed and finished (its candidate
        // lists freed) before the splice starts: the task of a long-lived connection then
        // holds only the splice's state (~1 KiB instead of ~2.9 KiB), which is what an
        // agent's memory at tens of thousands of connections is made of.
        let Some((conn, guard)) = Box::pin(self.prepare(&stream)).await else {
            return;
        };
        let idle = self.settings.idle_timeout;
        let (done, upstream) = match conn {
            // A tunnel stream is cut if the peer agent's certificate is denied meanwhile.
            Connected::Tunnel(TunnelStream::Quic(q), upstream, peer) => {
                let cut = self.tunnel.cut_when_denied(peer);
                (splice_until(stream, q, idle, cut).await, upstream)
            }
            Connected::Tunnel(TunnelStream::Mux(m), upstream, peer) => {
                let cut = self.tunnel.cut_when_denied(peer);
                (splice_until(stream, m, idle, cut).await, upstream)
            }
            Connected::Tunnel(TunnelStream::Tls(t), upstream, peer) => {
                let cut = self.tunnel.cut_when_denied(peer);
                (splice_until(stream, t, idle, cut).await, upstream)
            }
            Connected::Plain(u, upstream) => (splice(stream, u, idle).await, upstream),
        };
        tracing::info!(%upstream, bytes_out = done.a_to_b, bytes_in = done.b_to_a, end = ?done.end, "outbound connection done");
        drop(guard);
    }

    /// Finds where a captured connection goes and connects there; `None` when it is
    /// closed instead (the reason is logged).
    async fn prepare(
        &self,
        stream: &tokio::net::TcpStream,
    ) -> Option<(Connected, Option<Outstanding>)> {
        let _ = stream.set_nodelay(true);
        let dst = match socket2::SockRef::from(stream)
            .original_dst_v4()
            .map(|a| a.as_socket())
        {
            Ok(Some(d)) if d != self.local => d,
            Ok(_) => {
                tracing::debug!("connection to the outbound port without capture; closed");
                return None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "no original destination; closed");
                return None;
            }
        };
        tracing::Span::current().record("dst", tracing::field::display(dst));
        let route = {
            let s = self.state.get();
            route(&s, dst)
        };
        let cands = match route {
            Route::Passthrough(addr) => {
                tracing::debug!(%addr, "passthrough");
                return match connect_tcp(addr, self.settings.mark, self.settings.connect_timeout)
                    .await
                {
                    Ok(up) => Some((Connected::Plain(up, addr), None)),
                    Err(e) => {
                        tracing::info!(%addr, error = %e, "passthrough connect failed");
                        None
                    }
                };
            }
            Route::Direct(u) => vec![u],
            Route::Balanced(v) => v,
        };
        if cands.is_empty() {
            tracing::warn!("no healthy endpoint with this port; connection closed");
            return None;
        }
        let (conn, guard) = self.connect(cands).await?;
        Some((conn, Some(guard)))
    }

    /// Picks an endpoint and connects to it (tunnel or plain TCP), trying up to
    /// [`ATTEMPTS`] endpoints; `None` when none could be reached (already logged).
    async fn connect(&self, cands: Vec<Upstream>) -> Option<(Connected, Outstanding)> {
        let lb_cands: Vec<Candidate> = cands
            .iter()
            .map(|u| Candidate {
                key: u.key.clone(),
                zone: u.zone.clone(),
            })
            .collect();
        let mut tried = Vec::new();
        while tried.len() < ATTEMPTS {
            let Some(i) = self
                .lb
                .pick(&lb_cands, self.settings.zone.as_deref(), &tried)
            else {
                break;
            };
            let up = &cands[i];
            tried.push(up.key.clone());
            let guard = self.lb.start(&up.key);
            match &up.identity {
                Some(identity) => {
                    let peer = SocketAddr::new(up.addr.ip(), self.settings.tunnel_port);
                    let header = Header {
                        service: up.service.clone(),
                        port: up.addr.port(),
                    };
                    match self.tunnel.open(peer, identity, &header).await {
                        Ok(opened) => {
                            self.lb.succeeded(&up.key);
                            tracing::info!(upstream = %up.addr, peer_identity = %identity, transport = %opened.transport, "outbound via tunnel");
                            return Some((
                                Connected::Tunnel(opened.stream, up.addr, opened.peer),
                                guard,
                            ));
                        }
                        Err(e) => {
                            tracing::warn!(upstream = %up.addr, error = %e, "tunnel failed");
                            if !e.retry_elsewhere() {
                                return None;
                            }
                            self.lb.failed(&up.key);
                        }
                    }
                }
                None if !self.settings.plaintext_upstreams || self.group_strict() => {
                    tracing::warn!(upstream = %up.addr, "endpoint has no agent and plaintext upstreams are disabled; refused");
                    continue;
                }
                None => {
                    match connect_tcp(up.addr, self.settings.mark, self.settings.connect_timeout)
                        .await
                    {
                        Ok(u) => {
                            self.lb.succeeded(&up.key);
                            tracing::info!(upstream = %up.addr, "outbound in plaintext (endpoint has no agent)");
                            return Some((Connected::Plain(u, up.addr), guard));
                        }
                        Err(e) => {
                            tracing::warn!(upstream = %up.addr, error = %e, "connect failed");
                            self.lb.failed(&up.key);
                        }
                    }
                }
            }
        }
        tracing::warn!(tried = ?tried, "no endpoint reachable; connection closed");
        None
    }
}

/// A connected upstream, and its address for the log.
enum Connected {
    Tunnel(TunnelStream, SocketAddr, Arc<super::tls::PeerFacts>),
    Plain(tokio::net::TcpStream, SocketAddr),
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_api::push::{EndpointState, ServiceState};

    fn ep(addr: &str, port: u16, identity: Option<&str>, healthy: bool) -> EndpointState {
        EndpointState {
            address: addr.into(),
            ports: [("http".to_owned(), port)].into(),
            healthy,
            zone: None,
            identity: identity.map(str::to_owned),
            source: "agents".into(),
            stale: false,
            labels: Default::default(),
            mtls_strict: false,
        }
    }

    fn state() -> MeshState {
        let mut s = MeshState::default();
        s.services.insert(
            "default/web".into(),
            ServiceState {
                vip: Some("240.240.0.1".parse().unwrap()),
                endpoints: [
                    (
                        "a".to_owned(),
                        ep("10.0.0.1", 8080, Some("spiffe://x/ns/default/sa/web"), true),
                    ),
                    ("b".to_owned(), ep("10.0.0.2", 8080, None, true)),
                    ("c".to_owned(), ep("10.0.0.3", 8080, None, false)),
                    ("d".to_owned(), ep("10.0.0.4", 9090, None, true)),
                ]
                .into(),
                hostnames: vec![],
                source_kinds: vec![],
                consul_tags: vec![],
                consul_datacenters: vec![],
                eureka_vips: vec![],
            },
        );
        s
    }

    #[test]
    fn vip_port_selects_healthy_endpoints_with_that_port() {
        let Route::Balanced(ups) = route(&state(), "240.240.0.1:8080".parse().unwrap()) else {
            panic!()
        };
        let addrs: Vec<String> = ups.iter().map(|u| u.addr.to_string()).collect();
        assert_eq!(addrs, vec!["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(
            ups[0].identity.as_deref(),
            Some("spiffe://x/ns/default/sa/web")
        );
        assert_eq!(ups[0].key, "default/web/a");
        assert_eq!(
            route(&state(), "240.240.0.1:22".parse().unwrap()),
            Route::Balanced(vec![])
        );
    }

    #[test]
    fn endpoint_address_is_direct_and_others_pass_through() {
        let Route::Direct(u) = route(&state(), "10.0.0.2:8080".parse().unwrap()) else {
            panic!()
        };
        assert_eq!(u.service, "default/web");
        assert!(matches!(
            route(&state(), "10.0.0.2:22".parse().unwrap()),
            Route::Passthrough(_)
        ));
        assert!(matches!(
            route(&state(), "192.0.2.1:80".parse().unwrap()),
            Route::Passthrough(_)
        ));
    }
}

#[cfg(test)]
mod sizes {
    use super::*;
    use crate::dataplane::splice::QuicSide;

    /// The size of the future a function returns, without calling it.
    fn ret_size<F, A, B, C, Fut>(_: &F) -> usize
    where
        F: Fn(A, B, C) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Each proxied connection is one task holding this future for its whole life, so its
    /// size is most of an agent's memory per connection (10,000 connections × 1 KiB =
    /// 10 MiB). Connecting (~1.7 KiB of tunnel-open state) is boxed and done before the
    /// splice; a TLS stream is spliced boxed. Was 2,880 bytes before that.
    #[test]
    fn a_connections_task_stays_small() {
        let handle =
            |o: Arc<Outbound>, s: tokio::net::TcpStream, (): ()| async move { o.handle(s).await };
        let quic = |a: tokio::net::TcpStream, b: QuicSide, i: Option<Duration>| splice(a, b, i);
        let tls = |a: tokio::net::TcpStream,
                   b: Box<tokio_rustls::client::TlsStream<super::super::readahead::ReadAhead>>,
                   i: Option<Duration>| splice(a, b, i);
        let (handle, quic, tls) = (ret_size(&handle), ret_size(&quic), ret_size(&tls));
        let cut = |t: Arc<Tunnel>, p: Arc<super::super::tls::PeerFacts>| t.cut_when_denied(p);
        let cut = {
            fn size<F: Fn(A, B) -> Fut, A, B, Fut>(_: &F) -> usize {
                std::mem::size_of::<Fut>()
            }
            size(&cut)
        };
        eprintln!(
            "future sizes: connection task {handle}, QUIC splice {quic}, TLS splice {tls}, cut {cut}"
        );
        assert!(
            handle <= 2048,
            "a proxied connection's task is {handle} bytes; keep connect state boxed"
        );
        assert!(
            quic <= 1280 && tls <= 1280,
            "splice futures: QUIC {quic}, TLS {tls} bytes"
        );
    }
}
