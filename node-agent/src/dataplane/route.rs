//! Routing in the source agent (issue 21): the VirtualServices and DestinationRules of
//! the pushed state compiled into a [`RouteTable`] once per applied version, and evaluated
//! per HTTP request ([`ServiceRoutes::plan`]) or per TCP connection
//! ([`ServiceRoutes::tcp_dest`]).
//!
//! Compiling resolves every host to a mesh service (`namespace/name`, any of the agent's
//! DNS forms), every subset to its endpoint labels, every regex once, every header name
//! and value once, and the source conditions (`sourceLabels`, `sourceNamespace`) against
//! this agent's own workload: a match whose source conditions this workload does not meet
//! is dropped at compile time, so evaluation only looks at the request. Evaluation
//! borrows the request and allocates nothing on the match path.
//!
//! Semantics follow Istio: VirtualServices of one host are merged oldest first (their
//! routes in order), the first route whose match (any of its `match` entries; none means
//! every request) holds is taken; its destination is drawn by weight; a route without
//! `retries` gets Istio's default retry policy (2 attempts on connect-failure,
//! refused-stream and 503).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ::http::header::{HeaderMap, HeaderName, HeaderValue};
use ::http::{StatusCode, request::Parts};
use causeway_api::push::MeshState;
use causeway_api::route::matcher::{
    RequestAttrs as Req, RequestMatch as MatchC, query_value, source_applies,
};
use causeway_api::route::resource::{
    Destination, HeaderOperations, Headers, HttpMatchRequest, HttpRetry, HttpRoute,
    LoadBalancerSettings, OutlierDetection, TrafficPolicy,
};
use causeway_api::route::validate::{parse_duration, service_of_host};
use causeway_api::route::{DestinationRule, RouteResource, VirtualService};

/// Header operations with names and values parsed once.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderOps {
    fn compile(ops: Option<&HeaderOperations>) -> HeaderOps {
        let Some(ops) = ops else {
            return HeaderOps::default();
        };
        let pair = |(k, v): (&String, &String)| {
            Some((
                HeaderName::from_bytes(k.as_bytes()).ok()?,
                HeaderValue::from_str(v).ok()?,
            ))
        };
        HeaderOps {
            set: ops.set.iter().filter_map(pair).collect(),
            add: ops.add.iter().filter_map(pair).collect(),
            remove: ops
                .remove
                .iter()
                .filter_map(|k| HeaderName::from_bytes(k.as_bytes()).ok())
                .collect(),
        }
    }

    /// Applies them: remove, then set, then add (Envoy's order).
    pub fn apply(&self, h: &mut HeaderMap) {
        for name in &self.remove {
            h.remove(name);
        }
        for (k, v) in &self.set {
            h.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.add {
            h.append(k.clone(), v.clone());
        }
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

fn headers_pair(h: Option<&Headers>) -> (HeaderOps, HeaderOps) {
    (
        HeaderOps::compile(h.and_then(|h| h.request.as_ref())),
        HeaderOps::compile(h.and_then(|h| h.response.as_ref())),
    )
}

/// What a consistent hash is taken of.
#[derive(Debug, Clone)]
pub enum HashOn {
    /// A request header.
    Header(HeaderName),
    /// A cookie.
    Cookie(String),
    /// The source address: one per agent, so all of this workload's requests.
    SourceIp,
    /// A query parameter.
    Query(String),
}

/// A destination's load balancing (its DestinationRule's `trafficPolicy.loadBalancer`,
/// the subset's overriding the rule's).
#[derive(Debug, Clone, Default)]
pub enum LbKind {
    /// Two random choices, the less loaded (also `UNSPECIFIED`, `LEAST_CONN`).
    #[default]
    LeastRequest,
    /// `RANDOM`.
    Random,
    /// `ROUND_ROBIN`.
    RoundRobin,
    /// `consistentHash`.
    Hash(HashOn),
}

impl LbKind {
    fn compile(lb: Option<&LoadBalancerSettings>) -> LbKind {
        let Some(lb) = lb else {
            return LbKind::LeastRequest;
        };
        if let Some(h) = &lb.consistent_hash {
            if let Some(name) = &h.http_header_name
                && let Ok(name) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            {
                return LbKind::Hash(HashOn::Header(name));
            }
            if let Some(c) = &h.http_cookie {
                return LbKind::Hash(HashOn::Cookie(c.name.clone()));
            }
            if h.use_source_ip == Some(true) {
                return LbKind::Hash(HashOn::SourceIp);
            }
            if let Some(q) = &h.http_query_parameter_name {
                return LbKind::Hash(HashOn::Query(q.clone()));
            }
        }
        match lb.simple.as_deref() {
            Some("RANDOM") => LbKind::Random,
            Some("ROUND_ROBIN") => LbKind::RoundRobin,
            _ => LbKind::LeastRequest,
        }
    }

    /// The hash key of a request, for a consistent hash; `None` (a random choice, as
    /// Envoy) when the request lacks the header, cookie or parameter.
    fn key(&self, r: &Req<'_>) -> Option<u64> {
        use std::hash::{Hash as _, Hasher as _};
        let LbKind::Hash(on) = self else { return None };
        let mut h = std::hash::DefaultHasher::new();
        match on {
            HashOn::Header(name) => r.headers.get(name)?.as_bytes().hash(&mut h),
            HashOn::Cookie(name) => r
                .headers
                .get_all(::http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|kv| {
                    let (k, v) = kv.trim().split_once('=')?;
                    (k == name).then_some(v)
                })?
                .hash(&mut h),
            HashOn::SourceIp => 0u8.hash(&mut h),
            HashOn::Query(key) => query_value(r.query, key)?.hash(&mut h),
        }
        Some(h.finish())
    }
}

/// A DestinationRule's `outlierDetection` with Istio's defaults (5 consecutive 5xx,
/// gateway errors off, 30 s base ejection, at most 10 % ejected).
fn outlier(o: Option<&OutlierDetection>) -> Option<Arc<super::lb::Outlier>> {
    let o = o?;
    let count = |v: Option<i64>, default: u32| v.map_or(default, |n| u32::try_from(n).unwrap_or(0));
    Some(Arc::new(super::lb::Outlier {
        consecutive_5xx: count(o.consecutive_5xx_errors, 5),
        consecutive_gateway: count(o.consecutive_gateway_errors.or(o.consecutive_errors), 0),
        base_ejection: o
            .base_ejection_time
            .as_deref()
            .and_then(|t| parse_duration(t).ok())
            .unwrap_or(Duration::from_secs(30)),
        max_ejection_percent: count(o.max_ejection_percent, 10),
    }))
}

/// A destination's policy: its rule's `trafficPolicy`, a subset's overriding it field by
/// field (as Istio merges them).
#[derive(Debug, Clone, Default)]
struct Policy {
    lb: LbKind,
    outlier: Option<Arc<super::lb::Outlier>>,
    locality: super::locality::LocalityMode,
    limits: Option<Arc<super::pool::PoolLimits>>,
}

impl Policy {
    /// The policy of destination (`service`, `subset_name`; `""`: the service's own),
    /// its connection-pool limits taken from `pools` when unchanged.
    fn compile(
        rule: Option<&TrafficPolicy>,
        subset: Option<&TrafficPolicy>,
        pools: &mut super::pool::PoolCache,
        service: &str,
        subset_name: &str,
    ) -> Policy {
        let field = |f: fn(&TrafficPolicy) -> bool| subset.filter(|t| f(t)).or(rule);
        let lb = field(|t| t.load_balancer.is_some()).and_then(|t| t.load_balancer.as_ref());
        let od =
            field(|t| t.outlier_detection.is_some()).and_then(|t| t.outlier_detection.as_ref());
        let cp = field(|t| t.connection_pool.is_some()).and_then(|t| t.connection_pool.as_ref());
        Policy {
            lb: LbKind::compile(lb),
            outlier: outlier(od),
            locality: super::locality::LocalityMode::compile(
                lb.and_then(|l| l.locality_lb_setting.as_ref()),
                od.is_some(),
            ),
            limits: pools.limits(service, subset_name, cp),
        }
    }
}

/// The fields of `dr` this agent accepts but does not enforce, or ignores as Istio does.
fn unenforced_fields(dr: &DestinationRule, out: &mut Vec<String>) {
    let name = format!(
        "DestinationRule {}/{}",
        dr.metadata.namespace(),
        dr.metadata.name
    );
    let rule = dr.spec.traffic_policy.as_ref();
    let policies = std::iter::once(("spec.trafficPolicy".to_owned(), rule)).chain(
        dr.spec.subsets.iter().enumerate().map(|(i, s)| {
            (
                format!("spec.subsets[{i}].trafficPolicy"),
                s.traffic_policy.as_ref(),
            )
        }),
    );
    for (path, t) in policies {
        let Some(t) = t else { continue };
        let has_outlier =
            t.outlier_detection.is_some() || rule.is_some_and(|r| r.outlier_detection.is_some());
        if let Some(l) = t
            .load_balancer
            .as_ref()
            .and_then(|l| l.locality_lb_setting.as_ref())
            && l.enabled != Some(false)
            && !has_outlier
        {
            out.push(format!(
                "{name}: {path}.loadBalancer.localityLbSetting is ignored without outlierDetection (as in Istio: the agent cannot tell an unhealthy locality); add {path}.outlierDetection"
            ));
        }
        let Some(cp) = &t.connection_pool else {
            continue;
        };
        let mut fields = Vec::new();
        if let Some(tcp) = &cp.tcp {
            for (set, f) in [
                (tcp.tcp_keepalive.is_some(), "tcp.tcpKeepalive"),
                (
                    tcp.max_connection_duration.is_some(),
                    "tcp.maxConnectionDuration",
                ),
            ] {
                if set {
                    fields.push(f);
                }
            }
        }
        if let Some(h) = &cp.http {
            for (set, f) in [
                (h.idle_timeout.is_some(), "http.idleTimeout"),
                (
                    h.max_requests_per_connection.is_some_and(|n| n > 1),
                    "http.maxRequestsPerConnection above 1",
                ),
                (h.h2_upgrade_policy.is_some(), "http.h2UpgradePolicy"),
                (h.use_client_protocol.is_some(), "http.useClientProtocol"),
                (
                    h.max_concurrent_streams.is_some(),
                    "http.maxConcurrentStreams",
                ),
            ] {
                if set {
                    fields.push(f);
                }
            }
        }
        for f in fields {
            out.push(format!("{name}: {path}.connectionPool.{f} (not enforced)"));
        }
    }
}

/// Where a route sends: a service, a subset of its endpoints, a port.
#[derive(Debug, Clone)]
pub struct Dest {
    /// The service, `namespace/name`.
    pub service: String,
    /// The subset's name, for logs.
    pub subset: Option<String>,
    /// The labels an endpoint must carry (the subset's; empty: every endpoint).
    pub labels: BTreeMap<String, String>,
    /// The destination port; `None`: the port the application dialled.
    pub port: Option<u16>,
    weight: u32,
    /// Load balancing among its endpoints.
    pub lb: LbKind,
    /// Outlier detection for its endpoints.
    pub outlier: Option<Arc<super::lb::Outlier>>,
    /// Locality load balancing among its endpoints.
    pub locality: super::locality::LocalityMode,
    /// Its `connectionPool` limits.
    pub limits: Option<Arc<super::pool::PoolLimits>>,
    /// The round-robin counter (shared by the copies of this destination).
    pub next: Arc<std::sync::atomic::AtomicUsize>,
    /// Request header operations of this destination.
    pub request_headers: HeaderOps,
    /// Response header operations of this destination.
    pub response_headers: HeaderOps,
}

impl Dest {
    /// Whether an endpoint with `labels` belongs to this destination.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        causeway_api::route::matcher::subset_selects(&self.labels, labels)
    }
}

/// Which failures a route retries (Envoy's `retry_on`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    five_xx: bool,
    gateway_error: bool,
    connect_failure: bool,
    reset: bool,
    retriable_4xx: bool,
    refused_stream: bool,
    codes: Vec<u16>,
}

impl RetryOn {
    fn parse(text: &str) -> RetryOn {
        let mut on = RetryOn::default();
        for c in text.split(',').map(str::trim) {
            match c {
                "5xx" => on.five_xx = true,
                "gateway-error" => on.gateway_error = true,
                "connect-failure" => on.connect_failure = true,
                "reset" => on.reset = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "refused-stream" => on.refused_stream = true,
                // gRPC conditions answer with HTTP 200 and a grpc-status; `unavailable`
                // is what a 503 becomes.
                "unavailable" => on.codes.push(503),
                other => {
                    if let Ok(code) = other.parse::<u16>() {
                        on.codes.push(code);
                    }
                }
            }
        }
        on
    }

    /// An upstream response with this status.
    pub fn status(&self, s: StatusCode) -> bool {
        let c = s.as_u16();
        (self.five_xx && s.is_server_error())
            || (self.gateway_error && matches!(c, 502..=504))
            || (self.retriable_4xx && c == 409)
            || self.codes.contains(&c)
    }

    /// The connection to the endpoint could not be made.
    pub fn connect_failure(&self) -> bool {
        self.connect_failure || self.five_xx || self.gateway_error || self.reset
    }

    /// The upstream went away (reset, disconnect) before the response head.
    pub fn reset(&self) -> bool {
        self.reset || self.five_xx || self.refused_stream
    }

    /// A try exceeded its per-try timeout.
    pub fn timeout(&self) -> bool {
        self.five_xx || self.gateway_error || self.reset
    }
}

/// A route's retry policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retry {
    /// Retries after the first try.
    pub attempts: u32,
    /// Bound of each try.
    pub per_try: Option<Duration>,
    /// What is retried.
    pub on: RetryOn,
}

impl Retry {
    /// Istio's policy for a route without `retries`.
    fn istio_default() -> Retry {
        Retry {
            attempts: 2,
            per_try: None,
            on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                codes: vec![503],
                ..RetryOn::default()
            },
        }
    }

    fn compile(r: Option<&HttpRetry>) -> Retry {
        let Some(r) = r else {
            return Retry::istio_default();
        };
        Retry {
            attempts: u32::try_from(r.attempts).unwrap_or(0),
            per_try: r
                .per_try_timeout
                .as_deref()
                .and_then(|t| parse_duration(t).ok())
                .filter(|d| !d.is_zero()),
            on: RetryOn::parse(
                r.retry_on
                    .as_deref()
                    .unwrap_or("connect-failure,refused-stream,unavailable,cancelled,503"),
            ),
        }
    }
}

/// One compiled HTTP route.
#[derive(Debug)]
pub struct HttpRouteC {
    /// `namespace/virtualservice` and the route's name or index, for logs.
    pub name: String,
    matches: Vec<MatchC>,
    dests: Vec<Arc<Dest>>,
    total_weight: u32,
    /// The whole-request timeout (`None`: the proxy's default).
    pub timeout: Option<Duration>,
    /// Retries.
    pub retry: Retry,
    delay: Option<(Duration, f64)>,
    abort: Option<(StatusCode, f64)>,
    mirror: Option<(Arc<Dest>, f64)>,
    /// Request header operations of the route.
    pub request_headers: HeaderOps,
    /// Response header operations of the route.
    pub response_headers: HeaderOps,
    rewrite_uri: Option<String>,
    /// The authority (`Host`) to send instead.
    pub rewrite_authority: Option<HeaderValue>,
}

/// What routing decided for one request.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The route taken.
    pub route: Arc<HttpRouteC>,
    /// The destination drawn.
    pub dest: Arc<Dest>,
    /// A fault delay to wait before sending.
    pub delay: Option<Duration>,
    /// A fault abort to answer with instead of sending.
    pub abort: Option<StatusCode>,
    /// The path to send instead (rewrite), if any.
    pub path: Option<String>,
    /// Where a copy of the request goes (fire and forget), when the mirror roll hit.
    pub mirror: Option<Arc<Dest>>,
    /// The consistent-hash key of the request, when the destination hashes.
    pub hash: Option<u64>,
}

impl Plan {
    /// Applies the request header operations (route, then destination) and the rewrite.
    pub fn apply_request(&self, parts: &mut Parts) {
        self.route.request_headers.apply(&mut parts.headers);
        self.dest.request_headers.apply(&mut parts.headers);
        let authority = self.route.rewrite_authority.as_ref();
        if let Some(a) = authority {
            parts.headers.insert(::http::header::HOST, a.clone());
        }
        if self.path.is_none() && (authority.is_none() || parts.uri.authority().is_none()) {
            return;
        }
        let mut p = ::http::uri::Parts::from(parts.uri.clone());
        if let Some(path) = &self.path
            && let Ok(pq) = path.parse()
        {
            p.path_and_query = Some(pq);
        }
        // HTTP/2 carries the authority in the URI (`:authority`).
        if let Some(a) = authority
            && p.authority.is_some()
            && let Ok(a) = ::http::uri::Authority::try_from(a.as_bytes())
        {
            p.authority = Some(a);
        }
        if let Ok(uri) = ::http::Uri::from_parts(p) {
            parts.uri = uri;
        }
    }

    /// Applies the response header operations (route, then destination).
    pub fn apply_response(&self, h: &mut HeaderMap) {
        if self.route.response_headers.is_empty() && self.dest.response_headers.is_empty() {
            return;
        }
        self.route.response_headers.apply(h);
        self.dest.response_headers.apply(h);
    }
}

/// One compiled TCP route.
#[derive(Debug)]
struct TcpRouteC {
    ports: Vec<u16>,
    /// No match entries: every connection.
    any: bool,
    dests: Vec<Arc<Dest>>,
    total_weight: u32,
}

/// The routes of one service (the one the application dialled).
#[derive(Debug, Default)]
pub struct ServiceRoutes {
    http: Vec<Arc<HttpRouteC>>,
    tcp: Vec<TcpRouteC>,
}

/// Draws an index by weight; `roll` in `0..total`.
fn by_weight(dests: &[Arc<Dest>], roll: u32) -> Option<&Arc<Dest>> {
    let mut acc = 0;
    for d in dests {
        acc += d.weight;
        if roll < acc {
            return Some(d);
        }
    }
    dests.iter().rev().find(|d| d.weight > 0)
}

fn percent_hit(pct: f64, rnd: u64) -> bool {
    // 1/10^6 resolution, as Envoy's fractional percent.
    (rnd % 1_000_000) as f64 / 10_000.0 < pct
}

impl ServiceRoutes {
    /// Whether HTTP routes exist.
    pub fn has_http(&self) -> bool {
        !self.http.is_empty()
    }

    /// The plan for a request to `port`; `None` when no route matches (the request goes
    /// to the dialled service as without routing). `rnd` gives random numbers.
    pub fn plan(&self, parts: &Parts, port: u16, mut rnd: impl FnMut() -> u64) -> Option<Plan> {
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                parts
                    .headers
                    .get(::http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("");
        let req = Req {
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
            method: parts.method.as_str(),
            authority,
            headers: &parts.headers,
            port,
        };
        for route in &self.http {
            let matched = if route.matches.is_empty() {
                Some(req.path.len())
            } else {
                route.matches.iter().find_map(|m| m.eval(&req))
            };
            let Some(prefix) = matched else { continue };
            if route.total_weight == 0 {
                continue;
            }
            let roll = u32::try_from(rnd() % u64::from(route.total_weight)).unwrap_or(0);
            let dest = by_weight(&route.dests, roll)?.clone();
            let delay = route
                .delay
                .filter(|(_, pct)| percent_hit(*pct, rnd()))
                .map(|(d, _)| d);
            let abort = route
                .abort
                .filter(|(_, pct)| percent_hit(*pct, rnd()))
                .map(|(s, _)| s);
            let path = route.rewrite_uri.as_ref().map(|new| {
                let rest = req.path.get(prefix..).unwrap_or("");
                let mut p = String::with_capacity(new.len() + rest.len() + req.query.len() + 1);
                p.push_str(new);
                p.push_str(rest);
                if p.is_empty() {
                    p.push('/');
                }
                if !req.query.is_empty() {
                    p.push('?');
                    p.push_str(req.query);
                }
                p
            });
            let hash = dest.lb.key(&req);
            let mirror = route
                .mirror
                .as_ref()
                .filter(|(_, pct)| percent_hit(*pct, rnd()))
                .map(|(d, _)| d.clone());
            return Some(Plan {
                route: route.clone(),
                dest,
                delay,
                abort,
                path,
                mirror,
                hash,
            });
        }
        None
    }

    /// The destination of a TCP connection to `port`; `None`: no TCP route applies.
    pub fn tcp_dest(&self, port: u16, rnd: u64) -> Option<Arc<Dest>> {
        let route = self.tcp.iter().find(|r| r.any || r.ports.contains(&port))?;
        if route.total_weight == 0 {
            return None;
        }
        let roll = u32::try_from(rnd % u64::from(route.total_weight)).unwrap_or(0);
        by_weight(&route.dests, roll).cloned()
    }
}

/// This agent's own workload, for `sourceLabels` and `sourceNamespace`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceFacts {
    /// Its labels (its group's, and `causeway.io/group`).
    pub labels: BTreeMap<String, String>,
    /// Its namespace.
    pub namespace: Option<String>,
}

/// Every service's routes, compiled from one applied state.
#[derive(Debug, Default)]
pub struct RouteTable {
    services: HashMap<String, Arc<ServiceRoutes>>,
    /// Fields of the resources that this agent does not enforce yet (logged).
    pub unenforced: Vec<String>,
}

impl RouteTable {
    /// The routes of service `key` (`namespace/name`), if it has any.
    pub fn service(&self, key: &str) -> Option<&Arc<ServiceRoutes>> {
        self.services.get(key)
    }

    /// Whether no service has routes.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Compiles the routing resources of `state` as seen from the workload `own`.
    pub fn compile(state: &MeshState, own: &SourceFacts) -> RouteTable {
        Self::compile_with(state, own, &mut super::pool::PoolCache::default())
    }

    /// [`RouteTable::compile`], keeping the connection-pool limits (and their counters)
    /// in `pools` of every destination whose `connectionPool` is unchanged.
    pub fn compile_with(
        state: &MeshState,
        own: &SourceFacts,
        pools: &mut super::pool::PoolCache,
    ) -> RouteTable {
        let mut rules: Vec<(u64, &DestinationRule)> = Vec::new();
        let mut services: Vec<(u64, &VirtualService)> = Vec::new();
        for r in state.routes.values() {
            match &r.resource {
                RouteResource::DestinationRule(d) => rules.push((r.seq, d)),
                RouteResource::VirtualService(v) => services.push((r.seq, v)),
            }
        }
        rules.sort_by_key(|(seq, _)| *seq);
        services.sort_by_key(|(seq, _)| *seq);
        let mut unenforced = Vec::new();
        for (_, dr) in &rules {
            unenforced_fields(dr, &mut unenforced);
        }
        // service → subset → labels and load balancing; the oldest rule defining a
        // subset wins; service → the rule's own load balancing (the oldest rule's).
        type Subsets = HashMap<String, (BTreeMap<String, String>, Policy)>;
        let mut subsets: HashMap<String, Subsets> = HashMap::new();
        let mut service_lb: HashMap<String, Policy> = HashMap::new();
        for (_, dr) in &rules {
            let (ns, name) = service_of_host(&dr.spec.host, dr.metadata.namespace());
            let key = format!("{ns}/{name}");
            let rule = dr.spec.traffic_policy.as_ref();
            service_lb
                .entry(key.clone())
                .or_insert_with(|| Policy::compile(rule, None, pools, &key, ""));
            let entry = subsets.entry(key.clone()).or_default();
            for s in &dr.spec.subsets {
                let own = s.traffic_policy.as_ref();
                entry.entry(s.name.clone()).or_insert_with(|| {
                    (
                        s.labels.clone(),
                        Policy::compile(rule, own, pools, &key, &s.name),
                    )
                });
            }
        }
        let mut table: HashMap<String, ServiceRoutes> = HashMap::new();
        for (_, vs) in &services {
            let ns = vs.metadata.namespace();
            let dest = |d: &Destination, weight: Option<i64>, headers: Option<&Headers>| {
                let (sns, sname) = service_of_host(&d.host, ns);
                let service = format!("{sns}/{sname}");
                let (labels, policy) = d
                    .subset
                    .as_ref()
                    .and_then(|s| subsets.get(&service).and_then(|m| m.get(s)))
                    .cloned()
                    .unwrap_or_else(|| {
                        (
                            BTreeMap::new(),
                            service_lb.get(&service).cloned().unwrap_or_default(),
                        )
                    });
                let (request_headers, response_headers) = headers_pair(headers);
                Arc::new(Dest {
                    service,
                    subset: d.subset.clone(),
                    labels,
                    port: d.port.as_ref().and_then(|p| u16::try_from(p.number).ok()),
                    weight: u32::try_from(weight.unwrap_or(0)).unwrap_or(0),
                    lb: policy.lb,
                    outlier: policy.outlier,
                    locality: policy.locality,
                    limits: policy.limits,
                    next: Arc::default(),
                    request_headers,
                    response_headers,
                })
            };
            let weigh = |mut dests: Vec<Arc<Dest>>| {
                // One destination without a weight takes everything.
                if dests.len() == 1 && dests[0].weight == 0 {
                    Arc::make_mut(&mut dests[0]).weight = 100;
                }
                let total: u32 = dests.iter().map(|d| d.weight).sum();
                (dests, total)
            };
            let mut http = Vec::new();
            for (i, r) in vs.spec.http.iter().enumerate() {
                if let Some(c) = compile_http(r, i, vs, own, &dest, &weigh) {
                    http.push(Arc::new(c));
                }
            }
            let mut tcp = Vec::new();
            for r in &vs.spec.tcp {
                let applies = |m: &causeway_api::route::resource::L4MatchAttributes| {
                    m.source_labels
                        .iter()
                        .all(|(k, v)| own.labels.get(k) == Some(v))
                        && m.source_namespace
                            .as_ref()
                            .is_none_or(|n| own.namespace.as_ref() == Some(n))
                };
                let kept: Vec<_> = r.matches.iter().filter(|m| applies(m)).collect();
                if !r.matches.is_empty() && kept.is_empty() {
                    continue;
                }
                let any = kept.is_empty() || kept.iter().any(|m| m.port.is_none());
                let ports = kept
                    .iter()
                    .filter_map(|m| m.port.and_then(|p| u16::try_from(p).ok()))
                    .collect();
                let (dests, total_weight) = weigh(
                    r.route
                        .iter()
                        .map(|d| dest(&d.destination, d.weight, None))
                        .collect(),
                );
                tcp.push(TcpRouteC {
                    ports,
                    any,
                    dests,
                    total_weight,
                });
            }
            for host in &vs.spec.hosts {
                let (hns, hname) = service_of_host(host, ns);
                let entry = table.entry(format!("{hns}/{hname}")).or_default();
                entry.http.extend(http.iter().cloned());
                entry.tcp.extend(tcp.iter().map(|t| TcpRouteC {
                    ports: t.ports.clone(),
                    any: t.any,
                    dests: t.dests.clone(),
                    total_weight: t.total_weight,
                }));
            }
        }
        // A service with a DestinationRule and no VirtualService: every request and
        // connection goes to the service under the rule's policy (Istio applies a rule
        // without a VirtualService), with one try: traffic without a VirtualService keeps
        // its retry behaviour (ARCHITECTURE.md).
        for (_, dr) in &rules {
            let (ns, name) = service_of_host(&dr.spec.host, dr.metadata.namespace());
            let service = format!("{ns}/{name}");
            if table.contains_key(&service) {
                continue;
            }
            let policy = service_lb.get(&service).cloned().unwrap_or_default();
            let dest = Arc::new(Dest {
                service: service.clone(),
                subset: None,
                labels: BTreeMap::new(),
                port: None,
                weight: 100,
                lb: policy.lb,
                outlier: policy.outlier,
                locality: policy.locality,
                limits: policy.limits,
                next: Arc::default(),
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
            });
            let routes = table.entry(service).or_default();
            routes.http.push(Arc::new(HttpRouteC {
                name: format!(
                    "DestinationRule {}/{} (no VirtualService)",
                    dr.metadata.namespace(),
                    dr.metadata.name
                ),
                matches: Vec::new(),
                dests: vec![dest.clone()],
                total_weight: 100,
                timeout: None,
                retry: Retry::default(),
                delay: None,
                abort: None,
                mirror: None,
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
                rewrite_uri: None,
                rewrite_authority: None,
            }));
            routes.tcp.push(TcpRouteC {
                ports: Vec::new(),
                any: true,
                dests: vec![dest],
                total_weight: 100,
            });
        }
        RouteTable {
            services: table.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
            unenforced,
        }
    }
}

fn compile_http(
    r: &HttpRoute,
    index: usize,
    vs: &VirtualService,
    own: &SourceFacts,
    dest: &impl Fn(&Destination, Option<i64>, Option<&Headers>) -> Arc<Dest>,
    weigh: &impl Fn(Vec<Arc<Dest>>) -> (Vec<Arc<Dest>>, u32),
) -> Option<HttpRouteC> {
    let applies = |m: &HttpMatchRequest| {
        source_applies(
            &m.source_labels,
            m.source_namespace.as_ref(),
            &own.labels,
            own.namespace.as_ref(),
        )
    };
    let kept: Vec<&HttpMatchRequest> = r.matches.iter().filter(|m| applies(m)).collect();
    if !r.matches.is_empty() && kept.is_empty() {
        // Every match names another source: the route never applies here.
        return None;
    }
    let matches = kept.iter().map(|m| MatchC::compile(m)).collect();
    let (dests, total_weight) = weigh(
        r.route
            .iter()
            .map(|d| dest(&d.destination, d.weight, d.headers.as_ref()))
            .collect(),
    );
    let pct = |p: &Option<causeway_api::route::resource::Percent>, legacy: Option<i64>| {
        p.as_ref()
            .map(|p| p.value)
            .or(legacy.map(|v| v as f64))
            .unwrap_or(100.0)
    };
    let fault = r.fault.as_ref();
    let delay = fault.and_then(|f| f.delay.as_ref()).and_then(|d| {
        let t = parse_duration(d.fixed_delay.as_deref()?).ok()?;
        Some((t, pct(&d.percentage, d.percent)))
    });
    let abort = fault.and_then(|f| f.abort.as_ref()).and_then(|a| {
        let s = StatusCode::from_u16(u16::try_from(a.http_status?).ok()?).ok()?;
        Some((s, pct(&a.percentage, None)))
    });
    let (request_headers, response_headers) = headers_pair(r.headers.as_ref());
    Some(HttpRouteC {
        name: format!(
            "{}/{} {}",
            vs.metadata.namespace(),
            vs.metadata.name,
            r.name.clone().unwrap_or_else(|| format!("http[{index}]"))
        ),
        matches,
        dests,
        total_weight,
        timeout: r
            .timeout
            .as_deref()
            .and_then(|t| parse_duration(t).ok())
            .filter(|d| !d.is_zero()),
        retry: Retry::compile(r.retries.as_ref()),
        delay,
        abort,
        request_headers,
        response_headers,
        mirror: r.mirror.as_ref().map(|m| {
            (
                dest(m, Some(100), None),
                pct(&r.mirror_percentage, r.mirror_percent),
            )
        }),
        rewrite_uri: r.rewrite.as_ref().and_then(|w| w.uri.clone()),
        rewrite_authority: r
            .rewrite
            .as_ref()
            .and_then(|w| w.authority.as_deref())
            .and_then(|a| HeaderValue::from_str(a).ok()),
    })
}

#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod tests;
