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
//!
//! HTTP (issue 20): a mesh destination's port protocol comes from its port name
//! ([`port_protocol`]). An HTTP port (`http`, `http-*`, `http2*`, `grpc*`) is served by the
//! HTTP proxy of that service port ([`MeshUpstream`]: an endpoint chosen per request,
//! upstream connections = tunnel streams, pooled across the app's connections); an
//! undeclared one is sniffed first ([`super::http::detect`], `protocol_sniff_timeout`);
//! declared non-HTTP ports (`tcp`, `tcp-*`, ...) and passthrough are spliced unread.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use causeway_api::protocol::Protocol;
use causeway_api::push::MeshState;
use tokio::io::AsyncWriteExt as _;

use super::http::{self, HttpSettings, Proxy, UpstreamConn, UpstreamError};

use super::lb::{Balancer, Candidate, Choice, Outstanding};
use super::locality::{EndpointFacts, Locality, LocalityMode, Own};
use super::route::{Dest, LbKind, Plan, RouteTable, SourceFacts};
use super::splice::{splice, splice_until};
use super::tunnel::{Header, Tunnel, TunnelStream, connect_tcp};
use crate::push::SharedState;
use crate::telemetry::TcpConn;
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
    let upstreams = |key: &str, svc| service_upstreams(key, svc, port);
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

/// The healthy endpoints of service `key` that expose `port`.
fn service_upstreams(
    key: &str,
    svc: &causeway_api::push::ServiceState,
    port: u16,
) -> Vec<Upstream> {
    upstreams_where(key, svc, port, |_| true)
}

/// [`service_upstreams`] of the endpoints `keep` accepts (a subset's labels).
fn upstreams_where(
    key: &str,
    svc: &causeway_api::push::ServiceState,
    port: u16,
    keep: impl Fn(&causeway_api::push::EndpointState) -> bool,
) -> Vec<Upstream> {
    svc.endpoints
        .iter()
        .filter(|(_, e)| e.healthy && e.ports.values().any(|p| *p == port) && keep(e))
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
}

/// The protocol that port number `port` of service `service` declares: the name its
/// endpoints give that port, by Istio's port-name rules ([`Protocol::from_port_name`]);
/// [`Protocol::Auto`] (sniffed) when no endpoint names it.
pub fn port_protocol(state: &MeshState, service: &str, port: u16) -> Protocol {
    state
        .services
        .get(service)
        .and_then(|s| {
            s.endpoints
                .values()
                .find_map(|e| e.ports.iter().find(|(_, p)| **p == port))
        })
        .map_or(Protocol::Auto, |(name, _)| Protocol::from_port_name(name))
}

/// The endpoint a pool key names: `service/id` on the proxy's port, or `service/id#port`
/// (a route to another port); `None` when it is gone, unhealthy, or lacks the port.
fn find_upstream(state: &MeshState, endpoint: &str, default_port: u16) -> Option<Upstream> {
    let (key, port) = match endpoint.rsplit_once('#') {
        Some((k, p)) => (k, p.parse().ok()?),
        None => (endpoint, default_port),
    };
    state.services.iter().find_map(|(skey, svc)| {
        let id = key.strip_prefix(skey.as_str())?.strip_prefix('/')?;
        let e = svc.endpoints.get(id)?;
        if !e.healthy || !e.ports.values().any(|p| *p == port) {
            return None;
        }
        Some(Upstream {
            key: key.to_owned(),
            service: skey.clone(),
            addr: SocketAddr::new(e.address.parse().ok()?, port),
            identity: e.identity.clone(),
            zone: e.zone.clone(),
        })
    })
}

/// The endpoints of a route's destination (its service, subset and port).
fn dest_upstreams(state: &MeshState, dest: &Dest, port: u16) -> Vec<Upstream> {
    state
        .services
        .get(&dest.service)
        .map(|svc| upstreams_where(&dest.service, svc, port, |e| dest.selects(&e.labels)))
        .unwrap_or_default()
}

/// The balancer's candidates for `ups` (endpoints of `state`) going to `dest` (`None`:
/// not routed), with this workload `own`, and the zone to prefer (the agent's
/// same-zone-first choice, for destinations without a DestinationRule). Under locality
/// load balancing each gets its priority (`roll` draws a `distribute` locality).
fn lb_candidates(
    state: &MeshState,
    ups: &[Upstream],
    dest: Option<&Dest>,
    own: &Own,
    roll: u64,
) -> (Vec<Candidate>, Option<String>) {
    let mode = dest.map(|d| &d.locality);
    let plain = |u: &Upstream| Candidate {
        key: u.key.clone(),
        zone: u.zone.clone(),
        priority: 0,
    };
    match mode {
        None | Some(LocalityMode::SameZoneFirst) => {
            (ups.iter().map(plain).collect(), own.locality.zone.clone())
        }
        Some(LocalityMode::Off) => (ups.iter().map(plain).collect(), None),
        Some(LocalityMode::On(l)) => {
            let drawn = l.draw(&own.locality, roll);
            let no_labels = std::collections::BTreeMap::new();
            let cands = ups
                .iter()
                .map(|u| {
                    let e = state.services.get(&u.service).and_then(|s| {
                        let id = u.key.strip_prefix(u.service.as_str())?.strip_prefix('/')?;
                        s.endpoints.get(id)
                    });
                    let locality = Locality {
                        region: e.and_then(|e| e.region.clone()),
                        zone: u.zone.clone(),
                    };
                    let facts = EndpointFacts {
                        locality: &locality,
                        labels: e.map_or(&no_labels, |e| &e.labels),
                    };
                    Candidate {
                        priority: l.priority(own, facts, drawn),
                        ..plain(u)
                    }
                })
                .collect();
            (cands, None)
        }
    }
}

/// This workload as locality load balancing sees it: its labels, and the region and zone
/// of its own endpoints (its group's topology labels), the agent config's `zone`
/// overriding the zone.
fn own_locality(
    state: &MeshState,
    facts: &SourceFacts,
    own: Option<IpAddr>,
    zone: Option<&str>,
) -> Own {
    let own = own.map(|a| a.to_string());
    let mine = || {
        state
            .services
            .values()
            .flat_map(|s| s.endpoints.values())
            .filter(|e| Some(&e.address) == own.as_ref())
    };
    Own {
        locality: Locality {
            region: mine().find_map(|e| e.region.clone()),
            zone: zone
                .map(str::to_owned)
                .or_else(|| mine().find_map(|e| e.zone.clone())),
        },
        labels: facts.labels.clone(),
    }
}

/// This host's workload as routes' source conditions see it: the labels of the endpoints
/// at `own` (its group's labels) and the namespace of their identity.
fn source_facts(state: &MeshState, own: Option<IpAddr>) -> SourceFacts {
    let mut facts = SourceFacts::default();
    let Some(own) = own.map(|a| a.to_string()) else {
        return facts;
    };
    for e in state.services.values().flat_map(|s| s.endpoints.values()) {
        if e.address == own {
            facts
                .labels
                .extend(e.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
            if let Some(id) = &e.identity
                && let Some(rest) = id.split("/ns/").nth(1)
            {
                facts.namespace = rest.split('/').next().map(str::to_owned);
            }
        }
    }
    facts
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
    /// How long an undeclared port's first bytes are waited for to detect HTTP.
    pub protocol_sniff_timeout: Duration,
    /// Telemetry of the proxied connections and requests (none: only debug log lines).
    pub telemetry: Option<Arc<crate::telemetry::Telemetry>>,
}

/// Which HTTP proxy serves a connection: service key, port, and the endpoint key when the
/// application dialled one endpoint's own address.
type ProxyKey = (String, u16, Option<String>);

/// The outbound proxy.
#[derive(Debug)]
pub struct Outbound {
    state: SharedState,
    tunnel: Arc<Tunnel>,
    lb: Arc<Balancer>,
    settings: OutboundSettings,
    local: SocketAddr,
    /// One HTTP proxy per service port, so upstream connections (tunnel streams) are
    /// reused across the application's connections.
    http: Mutex<HashMap<ProxyKey, Proxy<MeshUpstream>>>,
    /// The route table and the state it was compiled from: compiled again when a new
    /// state is published (once per applied push), shared by every request until then.
    routes: Mutex<RouteCache>,
}

/// The route table, and this workload's locality, of one published state.
#[derive(Debug, Default)]
struct RouteCache {
    state: Option<Arc<MeshState>>,
    table: Arc<RouteTable>,
    own: Arc<Own>,
    /// The connection-pool limits of `table`, reused by the next compile.
    pools: super::pool::PoolCache,
}

/// What [`Outbound::prepare`] decided for a connection.
enum Prepared {
    /// Spliced to this connected upstream.
    Splice(Connected, Box<Held>),
    /// Served by this HTTP proxy; `prefix` is what sniffing read.
    Http(Proxy<MeshUpstream>, Bytes, Option<TcpConn>),
}

/// What a spliced connection holds until it ends: its outstanding mark at the balancer
/// and its TCP metrics (boxed: the connection's task stays small).
struct Held {
    _lb: Option<Outstanding>,
    /// Its place under the destination's `connectionPool.tcp.maxConnections`.
    _pool: Option<super::pool::Admitted>,
    /// The destination's `connectionPool.tcp.idleTimeout`, instead of the agent's.
    idle: Option<Option<Duration>>,
    tcp: Option<TcpConn>,
    /// Its access log record (when the access log is on).
    log: Option<crate::telemetry::TcpStart>,
}

impl Held {
    /// What `conn` holds; its access log record (`log`) learns where it goes.
    fn new(
        lb: Option<Outstanding>,
        tcp: Option<TcpConn>,
        log: Option<crate::telemetry::TcpStart>,
        conn: &Connected,
        own: Option<&Arc<str>>,
    ) -> Box<Self> {
        let log = log.map(|mut l| {
            let (Connected::Tunnel(_, upstream, _) | Connected::Plain(_, upstream)) = conn;
            l.upstream_host = Some(upstream.to_string());
            l.source_principal = own.cloned();
            if let Connected::Tunnel(_, _, peer) = conn {
                l.destination_principal = Some(Arc::from(peer.spiffe_id.as_str()));
            }
            l
        });
        Box::new(Self {
            _lb: lb,
            _pool: None,
            idle: None,
            tcp,
            log,
        })
    }
}

/// The [`http::Upstream`] of a service port on the client side: picks an endpoint per
/// request with the balancer (health and ejection included) and connects to it as the
/// splice does (a tunnel stream with the same header and identity check, or plain TCP to an
/// endpoint without an agent).
#[derive(Debug)]
pub struct MeshUpstream {
    out: Weak<Outbound>,
    service: String,
    port: u16,
    /// Only this endpoint (the application dialled its address).
    only: Option<String>,
    /// Connect timeouts of endpoints whose destination sets `connectionPool.tcp.connectTimeout`.
    connect_timeouts: Mutex<HashMap<String, Duration>>,
    /// [`MeshUpstream::candidates`] of the last mesh snapshot (they depend on nothing
    /// else): made once per snapshot instead of once per request.
    cands: Mutex<Option<Candidates>>,
}

/// The candidates of a service port in one mesh snapshot.
type Candidates = (Arc<MeshState>, Arc<Vec<Upstream>>);

impl MeshUpstream {
    fn no_dest(&self, dest: &Dest, port: u16) -> UpstreamError {
        UpstreamError::NoHealthyUpstream(format!(
            "{}:{port}{}",
            dest.service,
            dest.subset
                .as_deref()
                .map(|s| format!(" subset {s}"))
                .unwrap_or_default()
        ))
    }

    fn candidates(&self, out: &Outbound) -> Arc<Vec<Upstream>> {
        let state = out.state.get();
        let mut memo = self.cands.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, cands)) = &*memo
            && Arc::ptr_eq(seen, &state)
        {
            return cands.clone();
        }
        let mut v = match state.services.get(&self.service) {
            Some(svc) => service_upstreams(&self.service, svc, self.port),
            None => Vec::new(),
        };
        if let Some(only) = &self.only {
            v.retain(|u| &u.key == only);
        }
        let v = Arc::new(v);
        *memo = Some((state, v.clone()));
        v
    }

    fn no_endpoint(&self) -> UpstreamError {
        UpstreamError::NoHealthyUpstream(format!("{}:{}", self.service, self.port))
    }
}

impl http::Upstream for MeshUpstream {
    fn pick(&self) -> Result<String, UpstreamError> {
        let out = self.out.upgrade().ok_or_else(|| self.no_endpoint())?;
        let cands = self.candidates(&out);
        let (lb_cands, zone) = lb_candidates(&out.state.get(), &cands, None, &out.routing().1, 0);
        out.lb
            .pick(&lb_cands, zone.as_deref(), &[])
            .map(|i| cands[i].key.clone())
            .ok_or_else(|| self.no_endpoint())
    }

    fn plan(&self, req: &::http::request::Parts) -> Option<Plan> {
        // The application dialled one endpoint's own address: it gets that endpoint.
        if self.only.is_some() {
            return None;
        }
        let out = self.out.upgrade()?;
        let table = out.route_table();
        table
            .service(&self.service)?
            .plan(req, self.port, super::lb::random)
    }

    fn observed(&self, dest: &Dest, endpoint: &str, status: u16) {
        let Some(o) = &dest.outlier else { return };
        let Some(out) = self.out.upgrade() else {
            return;
        };
        let (key, port) = match endpoint.rsplit_once('#') {
            Some((k, p)) => (k, p.parse().unwrap_or(self.port)),
            None => (endpoint, self.port),
        };
        let peers: Vec<String> = dest_upstreams(&out.state.get(), dest, port)
            .into_iter()
            .map(|u| u.key)
            .collect();
        out.lb.observe(key, status, o, &peers);
    }

    fn pick_for(
        &self,
        dest: &Dest,
        hash: Option<u64>,
        tried: &[String],
    ) -> Result<String, UpstreamError> {
        let port = dest.port.unwrap_or(self.port);
        let out = self.out.upgrade().ok_or_else(|| self.no_dest(dest, port))?;
        let state = out.state.get();
        let cands = dest_upstreams(&state, dest, port);
        let (lb_cands, zone) = lb_candidates(
            &state,
            &cands,
            Some(dest),
            &out.routing().1,
            super::lb::random(),
        );
        let zone = zone.as_deref();
        let tried: Vec<String> = tried
            .iter()
            .map(|t| t.split('#').next().unwrap_or(t).to_owned())
            .collect();
        // Another endpoint than the tries before, while one is left (Istio's default
        // retry host predicate).
        let choice = match (&dest.lb, hash) {
            (LbKind::Hash(_), Some(h)) => Choice::Hash(h),
            (LbKind::Random, _) => Choice::Random,
            (LbKind::RoundRobin, _) => Choice::RoundRobin(&dest.next),
            _ => Choice::LeastRequest,
        };
        let i = out
            .lb
            .pick_by(&lb_cands, zone, &tried, choice)
            .or_else(|| out.lb.pick_by(&lb_cands, zone, &[], choice))
            .ok_or_else(|| self.no_dest(dest, port))?;
        if let Some(t) = dest.limits.as_ref().and_then(|l| l.connect_timeout) {
            self.connect_timeouts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(cands[i].key.clone(), t);
        }
        Ok(if port == self.port {
            cands[i].key.clone()
        } else {
            format!("{}#{port}", cands[i].key)
        })
    }

    async fn connect(&self, endpoint: &str) -> Result<UpstreamConn, UpstreamError> {
        let out = self.out.upgrade().ok_or_else(|| self.no_endpoint())?;
        let up = match &self.only {
            Some(_) => self
                .candidates(&out)
                .iter()
                .find(|u| u.key == endpoint)
                .cloned(),
            None => find_upstream(&out.state.get(), endpoint, self.port),
        }
        .ok_or_else(|| self.no_endpoint())?;
        let peer = up.addr.to_string();
        let timeout = self
            .connect_timeouts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&up.key)
            .copied();
        let conn = out
            .connect_one(&up, timeout)
            .await
            .map_err(|(_, message)| UpstreamError::Connect {
                peer: peer.clone(),
                source: std::io::Error::other(message),
            })?;
        // A pooled tunnel stream is cut, like a spliced one, once the peer agent's
        // certificate is denied (its agent removed).
        let cut = |p| Box::pin(out.tunnel.cut_when_denied(p));
        let io: Box<dyn http::Io> = match conn {
            Connected::Tunnel(TunnelStream::Quic(q), _, p) => {
                Box::new(CutIo::new(tokio::io::join(q.recv, q.send), cut(p)))
            }
            Connected::Tunnel(TunnelStream::Mux(m), _, p) => {
                Box::new(CutIo::new(tokio::io::join(m.recv, m.send), cut(p)))
            }
            Connected::Tunnel(TunnelStream::Tls(t), _, p) => Box::new(CutIo::new(t, cut(p))),
            Connected::Plain(u, _) => Box::new(u),
        };
        Ok(UpstreamConn {
            io,
            peer,
            identity: up.identity,
        })
    }
}

/// A byte stream that fails (connection aborted) once `cut` completes: reads and writes
/// poll `cut` first, so an idle pooled connection, whose reads hyper keeps polling, closes
/// at once too.
struct CutIo<IO> {
    io: IO,
    cut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    done: bool,
}

impl<IO> CutIo<IO> {
    fn new(io: IO, cut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Self {
        Self {
            io,
            cut,
            done: false,
        }
    }

    fn poll_cut(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<()> {
        if !self.done && self.cut.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        self.done = true;
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "tunnel stream cut: the peer agent's certificate is denied",
        ))
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CutIo<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.poll_cut(cx)?;
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CutIo<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.poll_cut(cx)?;
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.poll_cut(cx)?;
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    /// As the stream below: hyper then hands a message's head and body over together
    /// instead of copying them into one buffer first.
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.poll_cut(cx)?;
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Logs one debug line per HTTP request (metrics and access logs come later).
#[derive(Debug)]
pub struct LogObserver;

impl http::Observer for LogObserver {
    fn on_request(&self, r: http::RequestRecord) {
        self.on_request_ref(&r);
    }

    fn on_request_ref(&self, r: &http::RequestRecord) {
        tracing::debug!(
            side = r.side.as_str(),
            method = %r.method,
            path = %r.path,
            status = r.response_code,
            flags = %r.response_flags,
            duration_ms = r.duration.as_millis() as u64,
            upstream = r.upstream_host.as_deref().unwrap_or("-"),
            "http request"
        );
    }
}

impl Outbound {
    /// The route table of the current state (compiled once per published state).
    fn route_table(&self) -> Arc<RouteTable> {
        self.routing().0
    }

    /// The route table and this workload's locality, of the current state (compiled once
    /// per published state).
    fn routing(&self) -> (Arc<RouteTable>, Arc<Own>) {
        let state = self.state.get();
        let mut cache = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(seen) = &cache.state
            && Arc::ptr_eq(seen, &state)
        {
            return (cache.table.clone(), cache.own.clone());
        }
        let facts = source_facts(&state, self.settings.own_address);
        let table = if state.routes.is_empty() {
            Arc::new(RouteTable::default())
        } else {
            let t = RouteTable::compile_with(&state, &facts, &mut cache.pools);
            tracing::debug!(version = state.version, "route table compiled");
            if !t.unenforced.is_empty() {
                tracing::warn!(version = state.version, fields = ?t.unenforced, "routing fields not enforced by this agent");
            }
            Arc::new(t)
        };
        let own = Arc::new(own_locality(
            &state,
            &facts,
            self.settings.own_address,
            self.settings.zone.as_deref(),
        ));
        cache.state = Some(state);
        cache.table = table.clone();
        cache.own = own.clone();
        cache.pools.prune();
        (table, own)
    }

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
            http: Mutex::default(),
            routes: Mutex::default(),
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

    async fn handle(self: &Arc<Self>, mut stream: tokio::net::TcpStream) {
        let _inflight = self.tunnel.inflight().track();
        // Routing and connecting is its own future, boxed and finished (its candidate
        // lists freed) before the splice starts: the task of a long-lived connection then
        // holds only the splice's state (~1 KiB instead of ~2.9 KiB), which is what an
        // agent's memory at tens of thousands of connections is made of.
        let (conn, held) = match Box::pin(self.prepare(&mut stream)).await {
            None => return,
            Some(Prepared::Splice(conn, held)) => (conn, held),
            Some(Prepared::Http(proxy, prefix, m)) => {
                Box::pin(serve_http(proxy, prefix, stream, m)).await;
                return;
            }
        };
        let idle = held.idle.unwrap_or(self.settings.idle_timeout);
        let mut held = held;
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
        if let Some(m) = &held.tcp {
            m.bytes(done.a_to_b, done.b_to_a);
        }
        if let Some(l) = held.log.take() {
            l.finish(done.a_to_b, done.b_to_a);
        }
        drop(held);
    }

    /// The HTTP proxy of a service port (made on first use); drops the proxies of services
    /// gone from the mesh and the pools of this one's endpoints no longer in `cands`.
    fn http_proxy(self: &Arc<Self>, key: ProxyKey, cands: &[Upstream]) -> Proxy<MeshUpstream> {
        let state = self.state.get();
        let mut map = self.http.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|k, _| state.services.contains_key(&k.0));
        let proxy = map.entry(key.clone()).or_insert_with(|| {
            let upstream = MeshUpstream {
                out: Arc::downgrade(self),
                service: key.0,
                port: key.1,
                only: key.2,
                connect_timeouts: Mutex::default(),
                cands: Mutex::default(),
            };
            let observer: Arc<dyn http::Observer> = match &self.settings.telemetry {
                Some(t) => t.http_observer(crate::telemetry::Scope::Source(Arc::from(
                    upstream.service.as_str(),
                ))),
                None => Arc::new(LogObserver),
            };
            let settings = match &self.settings.telemetry {
                Some(t) => t.http_settings(http::Side::Source),
                None => HttpSettings::default(),
            };
            Proxy::new(upstream, settings, observer)
        });
        // Pools of endpoints still in the mesh stay (routes may send to other services).
        proxy.retain_endpoints(|e| {
            cands.iter().any(|u| u.key == e) || find_upstream(&state, e, key.1).is_some()
        });
        proxy.clone()
    }

    /// Finds where a captured connection goes and connects there (or hands it to the
    /// HTTP proxy of its service port); `None` when it is closed instead (the reason is
    /// logged).
    async fn prepare(self: &Arc<Self>, stream: &mut tokio::net::TcpStream) -> Option<Prepared> {
        let _ = stream.set_nodelay(true);
        // The access log's record of a spliced connection starts at its accept.
        let telemetry = self.settings.telemetry.as_ref();
        let log = telemetry.and_then(|t| t.tcp_start(http::Side::Source));
        let own = telemetry.map(|t| &t.own_principal);
        let dst = match socket2::SockRef::from(&*stream)
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
        let (cands, only) = match route {
            Route::Passthrough(addr) => {
                tracing::debug!(%addr, "passthrough");
                return match connect_tcp(addr, self.settings.mark, self.settings.connect_timeout)
                    .await
                {
                    Ok(up) => {
                        let conn = Connected::Plain(up, addr);
                        let tcp = self.tcp_metrics(None, None, false);
                        let held = Held::new(None, tcp, log, &conn, own);
                        Some(Prepared::Splice(conn, held))
                    }
                    Err(e) => {
                        tracing::info!(%addr, error = %e, "passthrough connect failed");
                        None
                    }
                };
            }
            Route::Direct(u) => {
                let only = Some(u.key.clone());
                (vec![u], only)
            }
            Route::Balanced(v) => (v, None),
        };
        let Some(first) = cands.first() else {
            tracing::warn!("no healthy endpoint with this port; connection closed");
            return None;
        };
        let declared = port_protocol(&self.state.get(), &first.service, dst.port());
        let mut prefix = Bytes::new();
        if declared.is_http() || declared.sniffs() {
            let timeout = self.settings.protocol_sniff_timeout;
            let (detected, rewind) = match http::detect(&mut *stream, declared, timeout).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(error = %e, "connection failed while detecting its protocol");
                    return None;
                }
            };
            prefix = rewind.into_parts().0;
            if detected.is_http() {
                tracing::debug!(protocol = %declared, ?detected, "served as HTTP");
                let metrics =
                    self.tcp_metrics(Some(first.service.as_str()), None, first.identity.is_some());
                let key = (first.service.clone(), dst.port(), only);
                return Some(Prepared::Http(
                    self.http_proxy(key, &cands),
                    prefix,
                    metrics,
                ));
            }
        }
        let mut service = first.service.clone();
        // TCP routes (issue 21): a destination drawn by weight per connection.
        let route = match &only {
            None => self.tcp_route(&first.service, dst.port()),
            Some(_) => None,
        };
        let admitted = match route.as_ref().and_then(|(d, _)| d.limits.as_ref()) {
            Some(limits) => match limits.admit_connection() {
                Ok(a) => Some(a),
                Err(o) => {
                    tracing::warn!(service = %first.service, limit = o.field(), max = limits.max_connections(), "connection closed: the destination's connection pool overflowed (UO)");
                    return None;
                }
            },
            None => None,
        };
        let cands = match &route {
            Some((dest, port)) => {
                let port = *port;
                let routed = dest_upstreams(&self.state.get(), dest, port);
                tracing::debug!(service = %dest.service, subset = ?dest.subset, port, "tcp route");
                if routed.is_empty() {
                    tracing::warn!(service = %dest.service, subset = ?dest.subset, port, "the route's destination has no healthy endpoint; connection closed");
                    return None;
                }
                service = dest.service.to_string();
                routed
            }
            None => cands,
        };
        let (mut conn, guard) = self
            .connect(cands, route.as_ref().map(|(d, _)| &**d))
            .await?;
        if !prefix.is_empty()
            && let Err(e) = write_prefix(&mut conn, &prefix).await
        {
            tracing::info!(error = %e, "upstream failed before the splice");
            return None;
        }
        let (upstream, mtls) = match &conn {
            Connected::Tunnel(_, a, _) => (a, true),
            Connected::Plain(_, a) => (a, false),
        };
        let metrics = self.tcp_metrics(
            Some(service.as_str()),
            Some(upstream.to_string().as_str()),
            mtls,
        );
        let mut held = Held::new(Some(guard), metrics, log, &conn, own);
        held._pool = admitted;
        held.idle = route
            .as_ref()
            .and_then(|(d, _)| d.limits.as_ref()?.tcp_idle);
        Some(Prepared::Splice(conn, held))
    }

    /// The Istio TCP metrics of a connection to `service` (`None`: passthrough) at the
    /// endpoint `upstream` (`ip:port`, when known per connection); none when telemetry
    /// is off.
    fn tcp_metrics(
        &self,
        service: Option<&str>,
        upstream: Option<&str>,
        mtls: bool,
    ) -> Option<TcpConn> {
        let istio = self.settings.telemetry.as_ref()?.istio.as_ref()?;
        let service: Option<Arc<str>> = service.map(Arc::from);
        Some(istio.source_tcp(service.as_ref(), upstream, mtls))
    }

    /// The destination and port of a TCP connection to service `service` port `port`
    /// under its TCP routes, if it has any.
    fn tcp_route(&self, service: &str, port: u16) -> Option<(Arc<Dest>, u16)> {
        let table = self.route_table();
        let dest = table
            .service(service)?
            .tcp_dest(port, super::lb::random())?;
        let p = dest.port.unwrap_or(port);
        Some((dest, p))
    }

    /// Picks an endpoint and connects to it (tunnel or plain TCP), trying up to
    /// [`ATTEMPTS`] endpoints; `None` when none could be reached (already logged).
    async fn connect(
        &self,
        cands: Vec<Upstream>,
        dest: Option<&Dest>,
    ) -> Option<(Connected, Outstanding)> {
        let (lb_cands, zone) = lb_candidates(
            &self.state.get(),
            &cands,
            dest,
            &self.routing().1,
            super::lb::random(),
        );
        let timeout = dest.and_then(|d| d.limits.as_ref()?.connect_timeout);
        let mut tried = Vec::new();
        while tried.len() < ATTEMPTS {
            let Some(i) = self.lb.pick(&lb_cands, zone.as_deref(), &tried) else {
                break;
            };
            let up = &cands[i];
            tried.push(up.key.clone());
            let guard = self.lb.start(&up.key);
            match self.connect_one(up, timeout).await {
                Ok(conn) => return Some((conn, guard)),
                Err((false, _)) => return None,
                Err((true, _)) => {}
            }
        }
        tracing::warn!(tried = ?tried, "no endpoint reachable; connection closed");
        None
    }

    /// Connects to one endpoint (tunnel or plain TCP) and tells the balancer how it went.
    /// An error says whether another endpoint may be tried, and why (already logged).
    async fn connect_one(
        &self,
        up: &Upstream,
        timeout: Option<Duration>,
    ) -> Result<Connected, (bool, String)> {
        let Some(t) = timeout else {
            return self.connect_one_unbounded(up).await;
        };
        match tokio::time::timeout(t, self.connect_one_unbounded(up)).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(upstream = %up.addr, timeout = ?t, "connect timed out (the destination's connectionPool.tcp.connectTimeout)");
                self.lb.failed(&up.key);
                Err((
                    true,
                    format!("connect timed out after {t:?} (connectionPool.tcp.connectTimeout)"),
                ))
            }
        }
    }

    /// [`Outbound::connect_one`] bounded by the agent's own timeouts only.
    async fn connect_one_unbounded(&self, up: &Upstream) -> Result<Connected, (bool, String)> {
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
                        Ok(Connected::Tunnel(opened.stream, up.addr, opened.peer))
                    }
                    Err(e) => {
                        tracing::warn!(upstream = %up.addr, error = %e, "tunnel failed");
                        if !e.retry_elsewhere() {
                            return Err((false, e.to_string()));
                        }
                        self.lb.failed(&up.key);
                        Err((true, e.to_string()))
                    }
                }
            }
            None if !self.settings.plaintext_upstreams || self.group_strict() => {
                tracing::warn!(upstream = %up.addr, "endpoint has no agent and plaintext upstreams are disabled; refused");
                Err((
                    true,
                    "endpoint has no agent and plaintext upstreams are disabled".into(),
                ))
            }
            None => {
                match connect_tcp(up.addr, self.settings.mark, self.settings.connect_timeout).await
                {
                    Ok(u) => {
                        self.lb.succeeded(&up.key);
                        tracing::info!(upstream = %up.addr, "outbound in plaintext (endpoint has no agent)");
                        Ok(Connected::Plain(u, up.addr))
                    }
                    Err(e) => {
                        tracing::warn!(upstream = %up.addr, error = %e, "connect failed");
                        self.lb.failed(&up.key);
                        Err((true, e.to_string()))
                    }
                }
            }
        }
    }
}

/// Serves a client connection with `proxy` (`prefix`: what sniffing read), counted into
/// the TCP metrics `m` as its bytes pass.
async fn serve_http(
    proxy: Proxy<MeshUpstream>,
    prefix: Bytes,
    stream: tokio::net::TcpStream,
    m: Option<TcpConn>,
) {
    let io = http::Rewind::with_prefix(prefix, stream);
    let served = match m {
        Some(m) => proxy.serve(crate::telemetry::CountingIo::new(io, m)).await,
        None => proxy.serve(io).await,
    };
    if let Err(e) = served {
        tracing::debug!(error = %e, "outbound HTTP connection ended");
    }
}

/// Writes the bytes read while sniffing to the upstream, before the splice.
async fn write_prefix(conn: &mut Connected, prefix: &[u8]) -> std::io::Result<()> {
    match conn {
        Connected::Tunnel(TunnelStream::Quic(q), ..) => {
            q.send.write_all(prefix).await.map_err(std::io::Error::from)
        }
        Connected::Tunnel(TunnelStream::Mux(m), ..) => m.send.write_all(prefix).await,
        Connected::Tunnel(TunnelStream::Tls(t), ..) => t.write_all(prefix).await,
        Connected::Plain(u, _) => u.write_all(prefix).await,
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
            region: None,
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

    /// A pooled HTTP tunnel stream fails once its cut completes (the peer denied), even
    /// while a read is waiting.
    #[tokio::test]
    async fn a_cut_stream_fails_reads_and_writes() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (a, mut b) = tokio::io::duplex(64);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut io = CutIo::new(
            a,
            Box::pin(async move {
                let _ = rx.await;
            }),
        );
        io.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 4];
            let r = io.read(&mut buf).await;
            (r.map_err(|e| e.kind()), io)
        });
        tx.send(()).unwrap();
        // Bounded so that a stream that is not cut fails the test instead of hanging it.
        let (r, mut io) = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .expect("the read was not cut")
            .unwrap();
        assert_eq!(r, Err(std::io::ErrorKind::ConnectionAborted));
        let w = io.write_all(b"more").await.map_err(|e| e.kind());
        assert_eq!(w, Err(std::io::ErrorKind::ConnectionAborted));
    }

    #[test]
    fn port_protocol_follows_the_port_name() {
        let mut s = state();
        let svc = s.services.get_mut("default/web").unwrap();
        for (id, name) in [("b", "tcp-web"), ("d", "web")] {
            let e = svc.endpoints.get_mut(id).unwrap();
            e.ports = [(name.to_owned(), if id == "b" { 8081 } else { 9090 })].into();
        }
        assert_eq!(port_protocol(&s, "default/web", 8080), Protocol::Http);
        assert_eq!(port_protocol(&s, "default/web", 8081), Protocol::Tcp);
        assert_eq!(port_protocol(&s, "default/web", 9090), Protocol::Auto);
        assert_eq!(port_protocol(&s, "default/web", 22), Protocol::Auto);
        assert_eq!(port_protocol(&s, "default/other", 8080), Protocol::Auto);
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
    /// splice; a TLS stream is spliced boxed. Was 2,880 bytes before that. The access log's
    /// record of the connection and the Istio TCP metrics add nothing to it: both live in
    /// the boxed `Held` that the task already carries. 2,000 bytes with both.
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
            handle <= 2000,
            "a proxied connection's task is {handle} bytes; keep connect state boxed"
        );
        assert!(
            quic <= 1280 && tls <= 1280,
            "splice futures: QUIC {quic}, TLS {tls} bytes"
        );
    }
}
