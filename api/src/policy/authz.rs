//! The authorization evaluator: Istio's AuthorizationPolicy semantics, compiled.
//!
//! A [`PolicySet`] holds every policy compiled once (CIDRs parsed, ports numbers, strings
//! turned into exact/prefix/suffix matchers). [`PolicySet::for_workload`] picks the policies
//! that select one workload (done when the set or the workload changes, not per connection);
//! [`WorkloadPolicies::decide`] then decides one connection or request without allocating,
//! and [`WorkloadPolicies::explain`] gives the same decision with every step, for `why`.
//!
//! Semantics (Istio's documentation): DENY policies first, any match denies; then, if no
//! ALLOW policy selects the workload, allow; else allow only if one matches. AUDIT never
//! changes the decision. A policy matches if any rule matches; a rule matches if its `from`
//! (any entry), `to` (any entry) and `when` (every condition) match; inside an entry every
//! given field must match. Without HTTP attributes (a TCP port), a rule of an ALLOW policy
//! that uses HTTP-only fields never matches, and in a DENY or AUDIT policy those fields are
//! dropped, so the rule matches more (stricter).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::ROOT_NAMESPACE;
use super::resource::{Action, AuthorizationPolicy, Condition, Rule, Selector};
use super::validate::{ValueKind, condition_key, parse_cidr, parse_port};

/// A destination workload as policies see it.
#[derive(Debug, Clone, Copy)]
pub struct Workload<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Its labels, including `causeway.io/group`.
    pub labels: &'a BTreeMap<String, String>,
}

/// HTTP attributes of a request (absent on TCP ports).
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpAttributes<'a> {
    /// The Host header or `:authority`.
    pub host: &'a str,
    /// The method.
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// Request headers (names lower-case).
    pub headers: &'a [(String, String)],
    /// `iss/sub` of a validated JWT.
    pub request_principal: Option<&'a str>,
    /// The validated JWT's claims.
    pub claims: Option<&'a serde_json::Value>,
}

/// What is known of one connection or request at the destination.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The peer's principal `<trust-domain>/ns/<ns>/sa/<sa>`; `None` for plaintext.
    pub principal: Option<&'a str>,
    /// The connection's source address.
    pub source_ip: IpAddr,
    /// The original client address, when a proxy header gave one (else `source_ip`).
    pub remote_ip: Option<IpAddr>,
    /// The destination address.
    pub destination_ip: IpAddr,
    /// The destination port.
    pub destination_port: u16,
    /// The TLS SNI, if any.
    pub sni: Option<&'a str>,
    /// HTTP attributes, on ports parsed as HTTP.
    pub http: Option<HttpAttributes<'a>>,
}

impl<'a> Request<'a> {
    /// The principal without `spiffe://`, its namespace (after the first `/ns/`, up to the
    /// next `/`) and its service account (the namespace, and what follows the first
    /// `/sa/`), in one pass over the principal.
    fn principal_parts(&self) -> (Option<&'a str>, Option<&'a str>, Option<(&'a str, &'a str)>) {
        let Some(p) = self.principal else {
            return (None, None, None);
        };
        let (ns_at, sa_at) = markers(p.as_bytes());
        let namespace = ns_at.map(|i| {
            let rest = &p[i + 4..];
            match rest.as_bytes().iter().position(|&b| b == b'/') {
                Some(end) => &rest[..end],
                None => rest,
            }
        });
        let service_account = namespace.zip(sa_at.map(|i| &p[i + 4..]));
        (
            Some(p.strip_prefix("spiffe://").unwrap_or(p)),
            namespace,
            service_account,
        )
    }
}

/// Byte offsets of the first `/ns/` and the first `/sa/` in `p`, in one pass.
#[inline]
fn markers(p: &[u8]) -> (Option<usize>, Option<usize>) {
    let (mut ns, mut sa) = (None, None);
    let mut i = 0;
    while i + 4 <= p.len() {
        if p[i] == b'/' && p[i + 3] == b'/' {
            match (p[i + 1], p[i + 2]) {
                (b'n', b's') if ns.is_none() => ns = Some(i),
                (b's', b'a') if sa.is_none() => sa = Some(i),
                _ => {}
            }
            if ns.is_some() && sa.is_some() {
                break;
            }
        }
        i += 1;
    }
    (ns, sa)
}

/// What the matchers read of a request, derived once per decision (the principal without
/// `spiffe://`, its namespace and service account, the canonical addresses).
struct Ctx<'r, 'a> {
    req: &'r Request<'a>,
    principal: Option<&'a str>,
    namespace: Option<&'a str>,
    service_account: Option<(&'a str, &'a str)>,
    /// `source_ip`, IPv4-mapped IPv6 as IPv4.
    source: IpAddr,
    /// `remote_ip` (else `source_ip`), canonical.
    remote: IpAddr,
    /// No HTTP attributes: a TCP port.
    tcp: bool,
    /// Hash of `namespace` (for [`Guard::Namespace`]).
    namespace_hash: Option<u64>,
    /// Hash of the namespace of `principal` as written without `spiffe://` (the same as
    /// `namespace_hash` but for odd principals; for [`Guard::PrincipalNamespace`]).
    principal_namespace_hash: Option<u64>,
}

impl<'r, 'a> Ctx<'r, 'a> {
    fn new(req: &'r Request<'a>) -> Self {
        let (principal, namespace, service_account) = req.principal_parts();
        let namespace_hash = namespace.map(hash);
        let principal_namespace_hash = match (principal, req.principal) {
            // Not stripped: the same string, the same namespace.
            (Some(p), Some(raw)) if p.len() == raw.len() => namespace_hash,
            (Some(p), _) => namespace_of(p, true).map(hash),
            (None, _) => None,
        };
        Ctx {
            req,
            principal,
            namespace,
            service_account,
            source: req.source_ip.to_canonical(),
            remote: req.remote_ip.unwrap_or(req.source_ip).to_canonical(),
            tcp: req.http.is_none(),
            namespace_hash,
            principal_namespace_hash,
        }
    }
}

/// FNV-1a: the guards compare hashes of namespaces, not the strings (a collision only
/// lets the full check run).
#[inline]
fn hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The namespace of a principal (after its first `/ns/`, up to the next `/`; `whole`:
/// also when no `/` follows, for a complete principal).
fn namespace_of(p: &str, whole: bool) -> Option<&str> {
    let rest = &p[markers(p.as_bytes()).0? + 4..];
    match rest.as_bytes().iter().position(|&b| b == b'/') {
        Some(end) => Some(&rest[..end]),
        None => whole.then_some(rest),
    }
}

/// A string matcher: Istio's exact, `prefix*`, `*suffix` or `*` (any non-empty value).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// A path template (`{*}` one segment, `{**}` the rest).
    Template(Vec<String>),
}

impl Pattern {
    fn new(text: &str) -> Pattern {
        if text == "*" {
            Pattern::Any
        } else if let Some(p) = text.strip_suffix('*') {
            Pattern::Prefix(p.to_owned())
        } else if let Some(s) = text.strip_prefix('*') {
            Pattern::Suffix(s.to_owned())
        } else {
            Pattern::Exact(text.to_owned())
        }
    }

    fn path(text: &str) -> Pattern {
        if text.contains('{') {
            Pattern::Template(text.split('/').map(str::to_owned).collect())
        } else {
            Pattern::new(text)
        }
    }

    fn principal(text: &str) -> Pattern {
        Pattern::new(text.strip_prefix("spiffe://").unwrap_or(text))
    }

    fn host(text: &str) -> Pattern {
        Pattern::new(&text.to_ascii_lowercase())
    }

    #[inline]
    fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => !v.is_empty(),
            Pattern::Exact(e) => v == e,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(s) => v.ends_with(s.as_str()),
            Pattern::Template(segs) => {
                let mut have = v.split('/');
                for (i, want) in segs.iter().enumerate() {
                    if want == "{**}" && i + 1 == segs.len() {
                        return have.next().is_some_and(|s| !s.is_empty());
                    }
                    match have.next() {
                        Some(s) if want == "{*}" && !s.is_empty() => {}
                        Some(s) if s == want => {}
                        _ => return false,
                    }
                }
                have.next().is_none()
            }
        }
    }

    fn matches_host(&self, host: &str) -> bool {
        let lower = host.to_ascii_lowercase();
        if self.matches(&lower) {
            return true;
        }
        // `Host: web:8080` also matches a pattern written without the port.
        strip_port(&lower).is_some_and(|h| self.matches(h))
    }
}

/// `host:port` → `host` (also `[v6]:port`); `None` when there is no port.
fn strip_port(h: &str) -> Option<&str> {
    let (host, port) = h.rsplit_once(':')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return None;
    }
    Some(host)
}

/// An address block compiled to a mask compare (`ipnet`'s `contains` recomputes the
/// network and broadcast addresses on every call, a quarter of a decision's time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net {
    V4 { net: u32, mask: u32 },
    V6 { net: u128, mask: u128 },
}

impl Net {
    fn new(n: IpNet) -> Net {
        match n {
            IpNet::V4(n) => {
                let mask = u32::from(n.netmask());
                Net::V4 {
                    net: u32::from(n.network()) & mask,
                    mask,
                }
            }
            IpNet::V6(n) => {
                let mask = u128::from(n.netmask());
                Net::V6 {
                    net: u128::from(n.network()) & mask,
                    mask,
                }
            }
        }
    }

    /// Whether `ip` is in the block; an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a
    /// dual-stack socket reports for an IPv4 peer) counts as its IPv4 address.
    #[inline]
    fn contains(&self, ip: IpAddr) -> bool {
        self.contains_canonical(ip.to_canonical())
    }

    /// [`Net::contains`] of an address already canonical.
    #[inline]
    fn contains_canonical(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Net::V4 { net, mask }, IpAddr::V4(a)) => u32::from(a) & mask == *net,
            (Net::V6 { net, mask }, IpAddr::V6(a)) => u128::from(a) & mask == *net,
            _ => false,
        }
    }
}

#[inline]
fn any(patterns: &[Pattern], v: &str) -> bool {
    patterns.iter().any(|p| p.matches(v))
}

/// Why a rule did not match (the first field that failed), for explanations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// The policy has no rules.
    NoRules,
    /// A source field did not match (field name).
    Source(&'static str),
    /// An operation field did not match (field name).
    Operation(&'static str),
    /// A `when` condition did not match (its index).
    When(usize),
    /// An ALLOW rule with HTTP-only fields, on a port not parsed as HTTP.
    HttpOnTcp,
}

impl std::fmt::Display for Miss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Miss::NoRules => f.write_str("the policy has no rules, so it matches nothing"),
            Miss::Source(field) => write!(f, "source {field} did not match"),
            Miss::Operation(field) => write!(f, "operation {field} did not match"),
            Miss::When(i) => write!(f, "condition when[{i}] did not match"),
            Miss::HttpOnTcp => f.write_str(
                "the rule uses HTTP fields and the port is not HTTP: an ALLOW rule with them never matches on TCP",
            ),
        }
    }
}

/// One field of a `source`, compiled; a source keeps only the fields it sets, so matching
/// walks only those.
#[derive(Debug, Clone)]
enum SourceCheck {
    Principals(Vec<Pattern>),
    NotPrincipals(Vec<Pattern>),
    RequestPrincipals(Vec<Pattern>),
    NotRequestPrincipals(Vec<Pattern>),
    Namespaces(Vec<Pattern>),
    NotNamespaces(Vec<Pattern>),
    ServiceAccounts(Vec<(String, String)>),
    NotServiceAccounts(Vec<(String, String)>),
    IpBlocks(Vec<Net>),
    NotIpBlocks(Vec<Net>),
    RemoteIpBlocks(Vec<Net>),
    NotRemoteIpBlocks(Vec<Net>),
}

#[derive(Debug, Clone, Default)]
struct CSource {
    checks: Vec<SourceCheck>,
}

#[derive(Debug, Clone, Default)]
struct COperation {
    hosts: Vec<Pattern>,
    not_hosts: Vec<Pattern>,
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    methods: Vec<Pattern>,
    not_methods: Vec<Pattern>,
    paths: Vec<Pattern>,
    not_paths: Vec<Pattern>,
}

#[derive(Debug, Clone)]
enum Attr {
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    SourceServiceAccount,
    DestinationIp,
    DestinationPort,
    Sni,
    Header(String),
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
    Claim(Vec<String>),
}

#[derive(Debug, Clone)]
enum Values {
    Cidrs(Vec<Net>),
    Ports(Vec<u16>),
    Text(Vec<Pattern>),
}

#[derive(Debug, Clone)]
struct CCondition {
    attr: Attr,
    http: bool,
    values: Values,
    not_values: Values,
}

#[derive(Debug, Clone, Default)]
struct CRule {
    from: Option<Vec<CSource>>,
    to: Option<Vec<COperation>>,
    when: Vec<CCondition>,
    /// Whether any field or condition needs HTTP attributes.
    uses_http: bool,
    /// The only destination ports the rule can match, when every `to` entry names ports
    /// (their union): a one-compare rejection before anything else is looked at.
    port_guard: Option<Box<[u16]>>,
    /// A necessary condition of `from`, one integer check per entry (any must pass);
    /// `None` when an entry has no such check. Rejects most rules of a decision without
    /// looking at a string.
    from_guard: Option<Box<[Guard]>>,
}

/// A necessary condition for one `source` entry to match, checked on integers only.
#[derive(Debug, Clone)]
enum Guard {
    /// The source address is in one of the blocks (`ipBlocks`).
    Source(Box<[Net]>),
    /// The remote address is in one of the blocks (`remoteIpBlocks`).
    Remote(Box<[Net]>),
    /// The peer's namespace hashes to one of these (`namespaces`, exact values).
    Namespace(Box<[u64]>),
    /// The namespace inside the peer's principal hashes to one of these (`principals`
    /// whose every value fixes the namespace: exact, or a prefix past `/ns/<ns>/`).
    PrincipalNamespace(Box<[u64]>),
}

impl Guard {
    /// The cheapest guard of `s`, if it has one.
    fn of(s: &CSource) -> Option<Guard> {
        let exact_hashes = |l: &[Pattern], f: &dyn Fn(&Pattern) -> Option<u64>| {
            l.iter().map(f).collect::<Option<Vec<u64>>>().map(|mut v| {
                v.sort_unstable();
                v.dedup();
                v.into_boxed_slice()
            })
        };
        let mut best = None;
        for c in &s.checks {
            let (rank, g) = match c {
                SourceCheck::IpBlocks(l) => (0, Some(Guard::Source(l.clone().into()))),
                SourceCheck::RemoteIpBlocks(l) => (1, Some(Guard::Remote(l.clone().into()))),
                SourceCheck::Namespaces(l) => (
                    2,
                    exact_hashes(l, &|p| match p {
                        Pattern::Exact(e) => Some(hash(e)),
                        _ => None,
                    })
                    .map(Guard::Namespace),
                ),
                SourceCheck::Principals(l) => (
                    3,
                    exact_hashes(l, &|p| match p {
                        Pattern::Exact(e) => namespace_of(e, true).map(hash),
                        Pattern::Prefix(pre) => namespace_of(pre, false).map(hash),
                        _ => None,
                    })
                    .map(Guard::PrincipalNamespace),
                ),
                _ => (4, None),
            };
            if let Some(g) = g
                && best.as_ref().is_none_or(|(r, _)| rank < *r)
            {
                best = Some((rank, g));
            }
        }
        best.map(|(_, g)| g)
    }

    #[inline]
    fn passes(&self, ctx: &Ctx<'_, '_>) -> bool {
        match self {
            Guard::Source(l) => in_canonical(l, ctx.source),
            Guard::Remote(l) => in_canonical(l, ctx.remote),
            Guard::Namespace(h) => ctx.namespace_hash.is_some_and(|x| h.contains(&x)),
            Guard::PrincipalNamespace(h) => {
                ctx.principal_namespace_hash.is_some_and(|x| h.contains(&x))
            }
        }
    }
}

/// One policy, compiled.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Action.
    pub action: Action,
    selector: Option<Selector>,
    rules: Vec<CRule>,
}

fn patterns(list: &[String], f: fn(&str) -> Pattern) -> Vec<Pattern> {
    list.iter().map(|s| f(s)).collect()
}

fn cidrs(list: &[String]) -> Vec<Net> {
    list.iter()
        .filter_map(|s| parse_cidr(s))
        .map(Net::new)
        .collect()
}

fn ports(list: &[String]) -> Vec<u16> {
    list.iter().filter_map(|s| parse_port(s)).collect()
}

fn service_accounts(list: &[String], policy_ns: &str) -> Vec<(String, String)> {
    list.iter()
        .map(|s| match s.split_once('/') {
            Some((ns, sa)) => (ns.to_owned(), sa.to_owned()),
            None => (policy_ns.to_owned(), s.clone()),
        })
        .collect()
}

fn compile_condition(c: &Condition) -> Option<CCondition> {
    let (kind, http) = condition_key(&c.key)?;
    let attr = match c.key.as_str() {
        "source.ip" => Attr::SourceIp,
        "remote.ip" => Attr::RemoteIp,
        "source.namespace" => Attr::SourceNamespace,
        "source.principal" => Attr::SourcePrincipal,
        "source.serviceAccount" => Attr::SourceServiceAccount,
        "destination.ip" => Attr::DestinationIp,
        "destination.port" => Attr::DestinationPort,
        "connection.sni" => Attr::Sni,
        "request.auth.principal" => Attr::AuthPrincipal,
        "request.auth.audiences" => Attr::AuthAudiences,
        "request.auth.presenter" => Attr::AuthPresenter,
        k if k.starts_with("request.headers[") => {
            Attr::Header(k["request.headers[".len()..k.len() - 1].to_ascii_lowercase())
        }
        k => Attr::Claim(
            k["request.auth.claims[".len()..k.len() - 1]
                .split("][")
                .map(str::to_owned)
                .collect(),
        ),
    };
    let values = |list: &[String]| match kind {
        ValueKind::Cidr => Values::Cidrs(cidrs(list)),
        ValueKind::Port => Values::Ports(ports(list)),
        ValueKind::Text => Values::Text(patterns(list, Pattern::new)),
    };
    Some(CCondition {
        attr,
        http,
        values: values(&c.values),
        not_values: values(&c.not_values),
    })
}

fn compile_rule(rule: &Rule, policy_ns: &str) -> CRule {
    let from = rule.from.as_ref().map(|from| {
        from.iter()
            .map(|f| {
                let s = f.source.clone().unwrap_or_default();
                let mut checks = Vec::new();
                let mut add = |present: bool, c: SourceCheck| {
                    if present {
                        checks.push(c);
                    }
                };
                add(
                    !s.principals.is_empty(),
                    SourceCheck::Principals(patterns(&s.principals, Pattern::principal)),
                );
                add(
                    !s.not_principals.is_empty(),
                    SourceCheck::NotPrincipals(patterns(&s.not_principals, Pattern::principal)),
                );
                add(
                    !s.request_principals.is_empty(),
                    SourceCheck::RequestPrincipals(patterns(&s.request_principals, Pattern::new)),
                );
                add(
                    !s.not_request_principals.is_empty(),
                    SourceCheck::NotRequestPrincipals(patterns(
                        &s.not_request_principals,
                        Pattern::new,
                    )),
                );
                add(
                    !s.namespaces.is_empty(),
                    SourceCheck::Namespaces(patterns(&s.namespaces, Pattern::new)),
                );
                add(
                    !s.not_namespaces.is_empty(),
                    SourceCheck::NotNamespaces(patterns(&s.not_namespaces, Pattern::new)),
                );
                add(
                    !s.service_accounts.is_empty(),
                    SourceCheck::ServiceAccounts(service_accounts(&s.service_accounts, policy_ns)),
                );
                add(
                    !s.not_service_accounts.is_empty(),
                    SourceCheck::NotServiceAccounts(service_accounts(
                        &s.not_service_accounts,
                        policy_ns,
                    )),
                );
                add(
                    !s.ip_blocks.is_empty(),
                    SourceCheck::IpBlocks(cidrs(&s.ip_blocks)),
                );
                add(
                    !s.not_ip_blocks.is_empty(),
                    SourceCheck::NotIpBlocks(cidrs(&s.not_ip_blocks)),
                );
                add(
                    !s.remote_ip_blocks.is_empty(),
                    SourceCheck::RemoteIpBlocks(cidrs(&s.remote_ip_blocks)),
                );
                add(
                    !s.not_remote_ip_blocks.is_empty(),
                    SourceCheck::NotRemoteIpBlocks(cidrs(&s.not_remote_ip_blocks)),
                );
                CSource { checks }
            })
            .collect::<Vec<_>>()
    });
    let to = rule.to.as_ref().map(|to| {
        to.iter()
            .map(|t| {
                let o = t.operation.clone().unwrap_or_default();
                COperation {
                    hosts: patterns(&o.hosts, Pattern::host),
                    not_hosts: patterns(&o.not_hosts, Pattern::host),
                    ports: ports(&o.ports),
                    not_ports: ports(&o.not_ports),
                    methods: patterns(&o.methods, Pattern::new),
                    not_methods: patterns(&o.not_methods, Pattern::new),
                    paths: patterns(&o.paths, Pattern::path),
                    not_paths: patterns(&o.not_paths, Pattern::path),
                }
            })
            .collect::<Vec<_>>()
    });
    let when: Vec<CCondition> = rule
        .when
        .iter()
        .flatten()
        .filter_map(compile_condition)
        .collect();
    let uses_http = from.iter().flatten().flat_map(|s| &s.checks).any(|c| {
        matches!(
            c,
            SourceCheck::RequestPrincipals(_) | SourceCheck::NotRequestPrincipals(_)
        )
    }) || to.iter().flatten().any(|o| {
        !(o.hosts.is_empty()
            && o.not_hosts.is_empty()
            && o.methods.is_empty()
            && o.not_methods.is_empty()
            && o.paths.is_empty()
            && o.not_paths.is_empty())
    }) || when.iter().any(|c| c.http);
    let port_guard = to
        .as_ref()
        .filter(|to| !to.is_empty() && to.iter().all(|o| !o.ports.is_empty()))
        .map(|to| {
            let mut ports: Vec<u16> = to.iter().flat_map(|o| o.ports.iter().copied()).collect();
            ports.sort_unstable();
            ports.dedup();
            ports.into_boxed_slice()
        });
    let from_guard = from.as_ref().and_then(|from| {
        from.iter()
            .map(Guard::of)
            .collect::<Option<Vec<Guard>>>()
            .map(Vec::into_boxed_slice)
    });
    CRule {
        from,
        to,
        when,
        uses_http,
        port_guard,
        from_guard,
    }
}

impl CompiledPolicy {
    /// Compiles a policy; call [`super::validate::validate`] first (invalid values are dropped
    /// here, which would widen nothing but could narrow a rule silently).
    pub fn compile(p: &AuthorizationPolicy) -> CompiledPolicy {
        let ns = p.metadata.namespace();
        CompiledPolicy {
            namespace: ns.to_owned(),
            name: p.metadata.name.clone(),
            action: p.spec.action,
            selector: p.spec.selector.clone(),
            rules: p
                .spec
                .rules
                .iter()
                .flatten()
                .map(|r| compile_rule(r, ns))
                .collect(),
        }
    }

    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether this policy applies to the workload: same namespace (or the root namespace)
    /// and the selector matches (no selector: every workload of the namespace / mesh).
    pub fn selects(&self, w: Workload<'_>) -> bool {
        if self.namespace != w.namespace && self.namespace != ROOT_NAMESPACE {
            return false;
        }
        self.selector.as_ref().is_none_or(|s| s.matches(w.labels))
    }

    /// Whether the policy matches the request; on a miss, why (the last rule's first miss).
    pub fn matches(&self, req: &Request<'_>) -> Result<usize, Miss> {
        self.matches_ctx(&Ctx::new(req))
    }

    /// Whether the policy matches (the decision's path: no reasons kept; the same result
    /// as [`Self::matches_ctx`], which `explain` uses).
    #[inline]
    fn hits(&self, ctx: &Ctx<'_, '_>) -> bool {
        let allow = self.action == Action::Allow;
        self.rules.iter().any(|r| rule_hits(r, ctx, allow))
    }

    fn matches_ctx(&self, ctx: &Ctx<'_, '_>) -> Result<usize, Miss> {
        let mut miss = Miss::NoRules;
        for (i, rule) in self.rules.iter().enumerate() {
            match match_rule(rule, ctx, self.action) {
                Ok(()) => return Ok(i),
                Err(m) => miss = m,
            }
        }
        Err(miss)
    }
}

/// [`match_rule`] without the reason: the hot path of [`WorkloadPolicies::decide`].
#[inline]
fn rule_hits(rule: &CRule, ctx: &Ctx<'_, '_>, allow: bool) -> bool {
    if let Some(ports) = &rule.port_guard
        && !ports.contains(&ctx.req.destination_port)
    {
        return false;
    }
    if ctx.tcp && rule.uses_http && allow {
        return false;
    }
    if let Some(guard) = &rule.from_guard
        && !guard.iter().any(|g| g.passes(ctx))
    {
        return false;
    }
    if let Some(from) = &rule.from
        && !from.iter().any(|s| source_hits(s, ctx))
    {
        return false;
    }
    if let Some(to) = &rule.to
        && !to.iter().any(|o| match_operation(o, ctx.req).is_ok())
    {
        return false;
    }
    rule.when
        .iter()
        .all(|c| (c.http && ctx.tcp) || match_condition(c, ctx))
}

/// [`match_source`] without the reason.
#[inline]
fn source_hits(s: &CSource, ctx: &Ctx<'_, '_>) -> bool {
    s.checks.iter().all(|c| match c {
        SourceCheck::Principals(l) => pos(l, ctx.principal),
        SourceCheck::NotPrincipals(l) => neg(l, ctx.principal),
        SourceCheck::Namespaces(l) => pos(l, ctx.namespace),
        SourceCheck::NotNamespaces(l) => neg(l, ctx.namespace),
        SourceCheck::ServiceAccounts(l) => sa_in(l, ctx),
        SourceCheck::NotServiceAccounts(l) => !sa_in(l, ctx),
        SourceCheck::IpBlocks(l) => in_canonical(l, ctx.source),
        SourceCheck::NotIpBlocks(l) => !in_canonical(l, ctx.source),
        SourceCheck::RemoteIpBlocks(l) => in_canonical(l, ctx.remote),
        SourceCheck::NotRemoteIpBlocks(l) => !in_canonical(l, ctx.remote),
        SourceCheck::RequestPrincipals(_) | SourceCheck::NotRequestPrincipals(_) if ctx.tcp => true,
        SourceCheck::RequestPrincipals(l) => {
            pos(l, ctx.req.http.as_ref().and_then(|h| h.request_principal))
        }
        SourceCheck::NotRequestPrincipals(l) => {
            neg(l, ctx.req.http.as_ref().and_then(|h| h.request_principal))
        }
    })
}

#[inline]
fn sa_in(list: &[(String, String)], ctx: &Ctx<'_, '_>) -> bool {
    ctx.service_account
        .is_some_and(|(ns, sa)| list.iter().any(|(n, s)| n == ns && s == sa))
}

#[inline]
fn in_canonical(list: &[Net], ip: IpAddr) -> bool {
    list.iter().any(|n| n.contains_canonical(ip))
}

fn match_rule(rule: &CRule, ctx: &Ctx<'_, '_>, action: Action) -> Result<(), Miss> {
    let req = ctx.req;
    let tcp = req.http.is_none();
    if tcp && rule.uses_http && action == Action::Allow {
        return Err(Miss::HttpOnTcp);
    }
    if let Some(from) = &rule.from {
        let mut miss = Miss::Source("(none)");
        if !from.iter().any(|s| match match_source(s, ctx) {
            Ok(()) => true,
            Err(m) => {
                miss = m;
                false
            }
        }) {
            return Err(miss);
        }
    }
    if let Some(to) = &rule.to {
        let mut miss = Miss::Operation("(none)");
        if !to.iter().any(|o| match match_operation(o, req) {
            Ok(()) => true,
            Err(m) => {
                miss = m;
                false
            }
        }) {
            return Err(miss);
        }
    }
    for (i, c) in rule.when.iter().enumerate() {
        if c.http && tcp {
            // DENY/AUDIT on TCP: the HTTP condition is dropped (ALLOW returned above).
            continue;
        }
        if !match_condition(c, ctx) {
            return Err(Miss::When(i));
        }
    }
    Ok(())
}

fn check(ok: bool, miss: Miss) -> Result<(), Miss> {
    if ok { Ok(()) } else { Err(miss) }
}

/// A positive list matches when empty or when a value is present and matches one entry; a
/// negative list matches when empty or when the value is absent or matches none.
fn pos(list: &[Pattern], v: Option<&str>) -> bool {
    list.is_empty() || v.is_some_and(|v| any(list, v))
}

fn neg(list: &[Pattern], v: Option<&str>) -> bool {
    list.is_empty() || !v.is_some_and(|v| any(list, v))
}

#[inline]
fn in_nets(list: &[Net], ip: IpAddr) -> bool {
    list.iter().any(|n| n.contains(ip))
}

fn match_source(s: &CSource, ctx: &Ctx<'_, '_>) -> Result<(), Miss> {
    let req = ctx.req;
    let sa_in = |list: &[(String, String)]| {
        ctx.service_account
            .is_some_and(|(ns, sa)| list.iter().any(|(n, s)| n == ns && s == sa))
    };
    let remote = || req.remote_ip.unwrap_or(req.source_ip);
    let request_principal = req.http.as_ref().and_then(|h| h.request_principal);
    for c in &s.checks {
        let (ok, field) = match c {
            SourceCheck::Principals(l) => (pos(l, ctx.principal), "principals"),
            SourceCheck::NotPrincipals(l) => (neg(l, ctx.principal), "notPrincipals"),
            SourceCheck::Namespaces(l) => (pos(l, ctx.namespace), "namespaces"),
            SourceCheck::NotNamespaces(l) => (neg(l, ctx.namespace), "notNamespaces"),
            SourceCheck::ServiceAccounts(l) => (sa_in(l), "serviceAccounts"),
            SourceCheck::NotServiceAccounts(l) => (!sa_in(l), "notServiceAccounts"),
            SourceCheck::IpBlocks(l) => (in_nets(l, req.source_ip), "ipBlocks"),
            SourceCheck::NotIpBlocks(l) => (!in_nets(l, req.source_ip), "notIpBlocks"),
            SourceCheck::RemoteIpBlocks(l) => (in_nets(l, remote()), "remoteIpBlocks"),
            SourceCheck::NotRemoteIpBlocks(l) => (!in_nets(l, remote()), "notRemoteIpBlocks"),
            // On TCP these are dropped (a DENY rule applies without them; an ALLOW rule
            // with them never got here).
            SourceCheck::RequestPrincipals(_) | SourceCheck::NotRequestPrincipals(_)
                if req.http.is_none() =>
            {
                (true, "")
            }
            SourceCheck::RequestPrincipals(l) => (pos(l, request_principal), "requestPrincipals"),
            SourceCheck::NotRequestPrincipals(l) => {
                (neg(l, request_principal), "notRequestPrincipals")
            }
        };
        if !ok {
            return Err(Miss::Source(field));
        }
    }
    Ok(())
}

fn match_operation(o: &COperation, req: &Request<'_>) -> Result<(), Miss> {
    check(
        o.ports.is_empty() || o.ports.contains(&req.destination_port),
        Miss::Operation("ports"),
    )?;
    check(
        !o.not_ports.contains(&req.destination_port),
        Miss::Operation("notPorts"),
    )?;
    if let Some(http) = &req.http {
        check(
            o.hosts.is_empty() || o.hosts.iter().any(|p| p.matches_host(http.host)),
            Miss::Operation("hosts"),
        )?;
        check(
            !o.not_hosts.iter().any(|p| p.matches_host(http.host)),
            Miss::Operation("notHosts"),
        )?;
        check(
            pos(&o.methods, Some(http.method)),
            Miss::Operation("methods"),
        )?;
        check(
            neg(&o.not_methods, Some(http.method)),
            Miss::Operation("notMethods"),
        )?;
        check(pos(&o.paths, Some(http.path)), Miss::Operation("paths"))?;
        check(
            neg(&o.not_paths, Some(http.path)),
            Miss::Operation("notPaths"),
        )?;
    }
    Ok(())
}

fn claim<'a>(claims: Option<&'a serde_json::Value>, path: &[String]) -> Vec<&'a str> {
    let mut v = match claims {
        Some(v) => v,
        None => return Vec::new(),
    };
    for key in path {
        match v.get(key) {
            Some(next) => v = next,
            None => return Vec::new(),
        }
    }
    match v {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Array(items) => items.iter().filter_map(|i| i.as_str()).collect(),
        _ => Vec::new(),
    }
}

fn match_condition(c: &CCondition, ctx: &Ctx<'_, '_>) -> bool {
    let req = ctx.req;
    let ip = match c.attr {
        Attr::SourceIp => Some(req.source_ip),
        Attr::RemoteIp => Some(req.remote_ip.unwrap_or(req.source_ip)),
        Attr::DestinationIp => Some(req.destination_ip),
        _ => None,
    };
    if let (Some(ip), Values::Cidrs(vals), Values::Cidrs(nots)) = (ip, &c.values, &c.not_values) {
        return (vals.is_empty() || in_nets(vals, ip)) && !in_nets(nots, ip);
    }
    if let (Attr::DestinationPort, Values::Ports(vals), Values::Ports(nots)) =
        (&c.attr, &c.values, &c.not_values)
    {
        let p = req.destination_port;
        return (vals.is_empty() || vals.contains(&p)) && !nots.contains(&p);
    }
    let (Values::Text(vals), Values::Text(nots)) = (&c.values, &c.not_values) else {
        return false;
    };
    let http = req.http.unwrap_or_default();
    let sa;
    let single: Option<&str> = match &c.attr {
        Attr::SourceNamespace => ctx.namespace,
        Attr::SourcePrincipal => ctx.principal,
        Attr::SourceServiceAccount => {
            sa = ctx.service_account.map(|(ns, sa)| format!("{ns}/{sa}"));
            sa.as_deref()
        }
        Attr::Sni => req.sni,
        Attr::Header(name) => http
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str()),
        Attr::AuthPrincipal => http.request_principal,
        Attr::AuthPresenter => claim(http.claims, &["azp".to_owned()]).first().copied(),
        Attr::AuthAudiences | Attr::Claim(_) => {
            let path = match &c.attr {
                Attr::Claim(p) => p.clone(),
                _ => vec!["aud".to_owned()],
            };
            let got = claim(http.claims, &path);
            return (vals.is_empty() || got.iter().any(|g| any(vals, g)))
                && !got.iter().any(|g| any(nots, g));
        }
        _ => None,
    };
    pos(vals, single) && neg(nots, single)
}

/// A decision, without explanation.
#[derive(Debug, Clone, Copy)]
pub struct Verdict<'p> {
    /// Allowed or denied.
    pub allow: bool,
    /// The policy that decided: the matching DENY or ALLOW policy (`None`: no ALLOW policy
    /// selects the workload, or none matched).
    pub policy: Option<&'p CompiledPolicy>,
    /// The AUDIT policy that matched, if any.
    pub audit: Option<&'p CompiledPolicy>,
}

/// The policies that select one workload, in evaluation order.
#[derive(Debug, Clone, Default)]
pub struct WorkloadPolicies {
    deny: Vec<Arc<CompiledPolicy>>,
    allow: Vec<Arc<CompiledPolicy>>,
    audit: Vec<Arc<CompiledPolicy>>,
    deny_index: RuleIndex,
    allow_index: RuleIndex,
    audit_index: RuleIndex,
}

/// How many rules of one action's list [`RuleIndex`] indexes (a bitset on the stack of
/// the decision); past it the list is walked policy by policy.
const MAX_INDEXED_RULES: usize = 1024;
const INDEX_WORDS: usize = MAX_INDEXED_RULES / 64;

/// The rules of one action's policies for one workload, indexed by their guards (built
/// with the workload's policies, once per change): a decision looks up the peer's
/// namespace (two binary searches) and scans the address blocks (integer compares), and
/// then checks in full only the rules those admit plus the rules without a guard, in
/// evaluation order, so the first hit is the first matching policy.
#[derive(Debug, Clone, Default)]
struct RuleIndex {
    /// (policy, rule) of each rule id, in evaluation order.
    rules: Vec<(u32, u32)>,
    /// Bitset of the rules with neither a `from` nor a port guard: always checked.
    always: Vec<u64>,
    /// (port, rule id), sorted: rules without a `from` guard that only match these ports.
    port: Vec<(u16, u32)>,
    /// (namespace hash, rule id), sorted: [`Guard::Namespace`].
    namespace: Vec<(u64, u32)>,
    /// (namespace hash, rule id), sorted: [`Guard::PrincipalNamespace`].
    principal_namespace: Vec<(u64, u32)>,
    /// (block, rule id): [`Guard::Source`].
    source: Vec<(Net, u32)>,
    /// (block, rule id): [`Guard::Remote`].
    remote: Vec<(Net, u32)>,
    /// More rules than the bitset holds: walk the policies instead.
    walk: bool,
}

impl RuleIndex {
    fn new(list: &[Arc<CompiledPolicy>]) -> RuleIndex {
        let mut ix = RuleIndex::default();
        let total: usize = list.iter().map(|p| p.rules.len()).sum();
        if total > MAX_INDEXED_RULES {
            ix.walk = true;
            return ix;
        }
        ix.always = vec![0; total.div_ceil(64)];
        for (pi, p) in list.iter().enumerate() {
            for (ri, rule) in p.rules.iter().enumerate() {
                let id = u32::try_from(ix.rules.len()).expect("at most MAX_INDEXED_RULES");
                ix.rules.push((
                    u32::try_from(pi).expect("few policies"),
                    u32::try_from(ri).expect("few rules"),
                ));
                let Some(guards) = &rule.from_guard else {
                    match &rule.port_guard {
                        Some(ports) => ix.port.extend(ports.iter().map(|p| (*p, id))),
                        None => ix.always[id as usize / 64] |= 1 << (id % 64),
                    }
                    continue;
                };
                for g in guards.iter() {
                    match g {
                        Guard::Source(l) => ix.source.extend(l.iter().map(|n| (*n, id))),
                        Guard::Remote(l) => ix.remote.extend(l.iter().map(|n| (*n, id))),
                        Guard::Namespace(h) => ix.namespace.extend(h.iter().map(|h| (*h, id))),
                        Guard::PrincipalNamespace(h) => {
                            ix.principal_namespace.extend(h.iter().map(|h| (*h, id)))
                        }
                    }
                }
            }
        }
        ix.namespace.sort_unstable();
        ix.principal_namespace.sort_unstable();
        ix.port.sort_unstable();
        ix
    }

    /// The position in `list` of the first policy that matches (`list` is what the index
    /// was built from).
    #[inline]
    fn first_hit(&self, list: &[Arc<CompiledPolicy>], ctx: &Ctx<'_, '_>) -> Option<usize> {
        if self.walk {
            return list.iter().position(|p| p.hits(ctx));
        }
        if self.rules.is_empty() {
            return None;
        }
        let mut set = [0u64; INDEX_WORDS];
        let words = self.always.len();
        set[..words].copy_from_slice(&self.always);
        let mut mark = |id: u32| set[id as usize / 64] |= 1 << (id % 64);
        let mut by_hash = |table: &[(u64, u32)], key: Option<u64>| {
            if let Some(key) = key {
                let start = table.partition_point(|(h, _)| *h < key);
                for &(h, id) in &table[start..] {
                    if h != key {
                        break;
                    }
                    mark(id);
                }
            }
        };
        by_hash(&self.namespace, ctx.namespace_hash);
        by_hash(&self.principal_namespace, ctx.principal_namespace_hash);
        let port = ctx.req.destination_port;
        let start = self.port.partition_point(|(p, _)| *p < port);
        for &(p, id) in &self.port[start..] {
            if p != port {
                break;
            }
            mark(id);
        }
        for (net, id) in &self.source {
            if net.contains_canonical(ctx.source) {
                mark(*id);
            }
        }
        for (net, id) in &self.remote {
            if net.contains_canonical(ctx.remote) {
                mark(*id);
            }
        }
        for (w, bits) in set[..words].iter().enumerate() {
            let mut bits = *bits;
            while bits != 0 {
                let id = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let (pi, ri) = self.rules[id];
                let p = &list[pi as usize];
                if rule_hits(&p.rules[ri as usize], ctx, p.action == Action::Allow) {
                    return Some(pi as usize);
                }
            }
        }
        None
    }
}

/// One step of an explanation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Step {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// Its action.
    pub action: String,
    /// Whether it matched.
    pub matched: bool,
    /// The matching rule, or the first reason it did not match.
    pub reason: String,
}

/// A decision with every step, for `why`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Decision {
    /// `allow` or `deny`.
    pub decision: String,
    /// The deciding policy, `namespace/name`.
    pub policy: Option<String>,
    /// One line saying why.
    pub reason: String,
    /// Each policy that selects the destination, in evaluation order.
    pub steps: Vec<Step>,
}

impl WorkloadPolicies {
    /// Whether any policy selects the workload.
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.audit.is_empty()
    }

    /// How many policies select the workload.
    pub fn len(&self) -> usize {
        self.deny.len() + self.allow.len() + self.audit.len()
    }

    /// Decides one connection or request.
    pub fn decide(&self, req: &Request<'_>) -> Verdict<'_> {
        let ctx = Ctx::new(req);
        let audit = self
            .audit_index
            .first_hit(&self.audit, &ctx)
            .map(|i| &*self.audit[i]);
        if let Some(p) = self
            .deny_index
            .first_hit(&self.deny, &ctx)
            .map(|i| &self.deny[i])
        {
            return Verdict {
                allow: false,
                policy: Some(p),
                audit,
            };
        }
        if self.allow.is_empty() {
            return Verdict {
                allow: true,
                policy: None,
                audit,
            };
        }
        match self
            .allow_index
            .first_hit(&self.allow, &ctx)
            .map(|i| &self.allow[i])
        {
            Some(p) => Verdict {
                allow: true,
                policy: Some(p),
                audit,
            },
            None => Verdict {
                allow: false,
                policy: None,
                audit,
            },
        }
    }

    /// Decides with every step explained (same result as [`Self::decide`]).
    pub fn explain(&self, req: &Request<'_>) -> Decision {
        let ctx = Ctx::new(req);
        let mut steps = Vec::new();
        let mut step = |p: &CompiledPolicy| {
            let r = p.matches_ctx(&ctx);
            steps.push(Step {
                policy: p.id(),
                action: p.action.to_string(),
                matched: r.is_ok(),
                reason: match r {
                    Ok(i) => format!("rule {i} matched"),
                    Err(m) => m.to_string(),
                },
            });
            r.is_ok()
        };
        for p in &self.audit {
            step(p);
        }
        let mut deny = None;
        for p in &self.deny {
            if step(p) && deny.is_none() {
                deny = Some(p.id());
            }
        }
        let mut allow = None;
        for p in &self.allow {
            if step(p) && allow.is_none() {
                allow = Some(p.id());
            }
        }
        let (decision, policy, reason) = if let Some(d) = deny {
            ("deny", Some(d.clone()), format!("DENY policy {d} matched"))
        } else if self.allow.is_empty() {
            (
                "allow",
                None,
                "no ALLOW policy selects the destination, so everything not denied is allowed"
                    .to_owned(),
            )
        } else if let Some(a) = allow {
            (
                "allow",
                Some(a.clone()),
                format!("ALLOW policy {a} matched"),
            )
        } else {
            (
                "deny",
                None,
                "ALLOW policies select the destination and none matched".to_owned(),
            )
        };
        Decision {
            decision: decision.to_owned(),
            policy,
            reason,
            steps,
        }
    }
}

/// Every authorization policy of the mesh, compiled.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: Vec<Arc<CompiledPolicy>>,
}

impl PolicySet {
    /// Compiles policies (sorted by namespace/name so that evaluation order is stable).
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a AuthorizationPolicy>) -> PolicySet {
        let mut policies: Vec<Arc<CompiledPolicy>> = policies
            .into_iter()
            .map(|p| Arc::new(CompiledPolicy::compile(p)))
            .collect();
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        PolicySet { policies }
    }

    /// How many policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies that select `w`.
    pub fn for_workload(&self, w: Workload<'_>) -> WorkloadPolicies {
        let mut out = WorkloadPolicies::default();
        for p in self.policies.iter().filter(|p| p.selects(w)) {
            match p.action {
                Action::Deny => out.deny.push(p.clone()),
                Action::Allow => out.allow.push(p.clone()),
                Action::Audit => out.audit.push(p.clone()),
                // CUSTOM is refused by validation; if one slipped through, deny what it
                // matches rather than ignore it.
                Action::Custom => out.deny.push(p.clone()),
            }
        }
        out.deny_index = RuleIndex::new(&out.deny);
        out.allow_index = RuleIndex::new(&out.allow);
        out.audit_index = RuleIndex::new(&out.audit);
        out
    }
}
