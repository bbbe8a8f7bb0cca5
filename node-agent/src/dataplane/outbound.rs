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

use super::lb::{Balancer, Candidate};
use super::splice::splice;
use super::tunnel::{Header, Tunnel, TunnelStream, connect_tcp};
use crate::push::SharedState;

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
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .services
            .values()
            .any(|s| {
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
                    tokio::spawn(async move { me.handle(stream, client).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, stream: tokio::net::TcpStream, client: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let dst = match socket2::SockRef::from(&stream)
            .original_dst_v4()
            .map(|a| a.as_socket())
        {
            Ok(Some(d)) if d != self.local => d,
            Ok(_) => {
                tracing::debug!(%client, "connection to the outbound port without capture; closed");
                return;
            }
            Err(e) => {
                tracing::debug!(%client, error = %e, "no original destination; closed");
                return;
            }
        };
        let route = {
            let s = self.state.read().unwrap_or_else(|p| p.into_inner());
            route(&s, dst)
        };
        let cands = match route {
            Route::Passthrough(addr) => {
                tracing::debug!(%client, %addr, "passthrough");
                match connect_tcp(addr, self.settings.mark, self.settings.connect_timeout).await {
                    Ok(up) => {
                        splice(stream, up, self.settings.idle_timeout).await;
                    }
                    Err(e) => {
                        tracing::info!(%client, %addr, error = %e, "passthrough connect failed")
                    }
                }
                return;
            }
            Route::Direct(u) => vec![u],
            Route::Balanced(v) => v,
        };
        if cands.is_empty() {
            tracing::warn!(%client, %dst, "no healthy endpoint with this port; connection closed");
            return;
        }
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
                            tracing::info!(%client, %dst, upstream = %up.addr, peer_identity = %identity, transport = %opened.transport, "outbound via tunnel");
                            let idle = self.settings.idle_timeout;
                            let done = match opened.stream {
                                TunnelStream::Quic(q) => splice(stream, q, idle).await,
                                TunnelStream::Tls(t) => splice(stream, *t, idle).await,
                            };
                            tracing::info!(%client, upstream = %up.addr, bytes_out = done.a_to_b, bytes_in = done.b_to_a, end = ?done.end, "outbound connection done");
                            drop(guard);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(%client, upstream = %up.addr, error = %e, "tunnel failed");
                            if !e.retry_elsewhere() {
                                return;
                            }
                            self.lb.failed(&up.key);
                        }
                    }
                }
                None if !self.settings.plaintext_upstreams || self.group_strict() => {
                    tracing::warn!(%client, upstream = %up.addr, "endpoint has no agent and plaintext upstreams are disabled; refused");
                    continue;
                }
                None => {
                    match connect_tcp(up.addr, self.settings.mark, self.settings.connect_timeout)
                        .await
                    {
                        Ok(u) => {
                            self.lb.succeeded(&up.key);
                            tracing::info!(%client, %dst, upstream = %up.addr, "outbound in plaintext (endpoint has no agent)");
                            splice(stream, u, self.settings.idle_timeout).await;
                            drop(guard);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(%client, upstream = %up.addr, error = %e, "connect failed");
                            self.lb.failed(&up.key);
                        }
                    }
                }
            }
        }
        tracing::warn!(%client, %dst, tried = ?tried, "no endpoint reachable; connection closed");
    }
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
