//! The agent's configuration (`/etc/causeway/agent.toml`): one typed struct, checked whole.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default state directory of a packaged agent.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/causeway";

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not valid TOML for this struct.
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message with position.
        message: String,
    },
    /// Rules across fields failed; one line per problem.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// `causeway-agent` configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Directory for key.pem, cert.pem, bundle.pem, agent.json and status.json.
    pub state_dir: PathBuf,
    /// `host:port` of the controller; overrides the address from the join token.
    pub controller: Option<String>,
    /// `host:port` of each controller of an HA set, tried in turn (the one that
    /// answered last first); a DNS name stands for each of its addresses (IPv4 and
    /// IPv6, resolved again on every connection round); overrides `controller` and the
    /// join token's address.
    pub controllers: Vec<String>,
    /// Workload address registered in the mesh; default: the local address of the
    /// route to the controller.
    pub address: Option<std::net::IpAddr>,
    /// Certificate renewal.
    pub identity: IdentityConfig,
    /// Traffic capture, outbound proxy and tunnel.
    pub dataplane: DataplaneConfig,
    /// The built-in DNS server.
    pub dns: DnsConfig,
    /// Health, readiness and metrics endpoint (127.0.0.1:15020).
    pub health: crate::health::HealthConfig,
    /// Fetching the key sets of RequestAuthentication issuers.
    pub jwt: JwtConfig,
    /// Telemetry of the proxied traffic (Istio metrics, remote scraping).
    pub telemetry: crate::telemetry::TelemetryConfig,
}

/// Fetching JSON Web Key Sets for RequestAuthentication (`[jwt]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// A PEM file of CA certificates trusted for `jwksUri` endpoints, besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// How long a fetched key set is used before it is fetched again.
    #[serde(with = "causeway_api::duration")]
    pub refresh_interval: Duration,
    /// Least time between two fetches caused by a token with an unknown `kid`.
    #[serde(with = "causeway_api::duration")]
    pub unknown_kid_interval: Duration,
    /// Timeout of one fetch (connect and body).
    #[serde(with = "causeway_api::duration")]
    pub fetch_timeout: Duration,
    /// Most verified tokens kept so their signatures are not checked on every request
    /// (0: none kept).
    pub verified_tokens: usize,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            ca_file: None,
            refresh_interval: Duration::from_secs(20 * 60),
            unknown_kid_interval: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(5),
            verified_tokens: crate::jwks::verified::DEFAULT_ENTRIES,
        }
    }
}

/// The most `[jwt] verified_tokens` accepted.
pub const MAX_VERIFIED_TOKENS: usize = 1_000_000;

/// How applications' DNS queries reach the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DnsMode {
    /// An nftables rule redirects port 53 (UDP and TCP) to `dns.listen`; resolv.conf is
    /// untouched. Needs `dataplane.capture`; fails open (the kernel drops the rule when
    /// the agent dies).
    #[default]
    Capture,
    /// No rules: the agent writes /etc/resolv.conf (or a systemd-resolved drop-in) to point
    /// at `dns.resolver_listen` first, keeping the original servers after it, and restores
    /// the original on stop.
    ResolvConf,
    /// The DNS server runs on `dns.listen` only; nothing points applications at it.
    Off,
}

/// The built-in DNS server (`[dns]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Run the DNS server at all.
    pub enabled: bool,
    /// How queries reach it: "capture" (default), "resolv-conf" or "off".
    pub mode: DnsMode,
    /// UDP and TCP address of the server (capture target); loopback only.
    pub listen: SocketAddr,
    /// Port-53 address used in "resolv-conf" mode (resolv.conf cannot name a port).
    pub resolver_listen: SocketAddr,
    /// TTL of mesh answers (and of negative answers in mesh zones), e.g. "5s".
    #[serde(with = "causeway_api::duration")]
    pub ttl: Duration,
    /// Kubernetes cluster domains: `<svc>.<ns>.svc.<domain>` for every service.
    pub cluster_domains: Vec<String>,
    /// Consul's domain: `<svc>.service.<domain>`, `<svc>.service.<dc>.<domain>` and
    /// `<tag>.<svc>.service.<domain>` for services from Consul sources.
    pub consul_domain: String,
    /// Eureka VIP names are answered as `<vip>.<suffix>` for each suffix here.
    pub eureka_suffixes: Vec<String>,
    /// Also answer single-label Eureka VIP names as they are (`inventory-service`).
    pub eureka_bare_names: bool,
    /// Causeway's own domain: `<svc>.<ns>.<domain>` for every service.
    pub causeway_domain: String,
    /// Upstream resolvers (`ip` or `ip:port`); empty: the nameservers of `resolv_conf`
    /// as they were before the agent started (systemd-resolved's stub is followed to
    /// /run/systemd/resolve/resolv.conf).
    pub upstreams: Vec<String>,
    /// The resolver configuration to read upstreams from (and to rewrite in "resolv-conf" mode).
    pub resolv_conf: PathBuf,
    /// How long to wait for one upstream before trying the next, e.g. "2s".
    #[serde(with = "causeway_api::duration")]
    pub forward_timeout: Duration,
    /// Also listen on `[::1]` at the port of `listen` (the target of the IPv6 capture of
    /// IPv6 nameservers). A host without IPv6 on loopback runs on without it.
    pub listen_ipv6: bool,
    /// Cache forwarded answers (positive for their TTL, negative per RFC 2308).
    pub cache: bool,
    /// Most answers the cache holds (least recently used go first).
    pub cache_max_entries: usize,
    /// Most bytes the cache's entries take (names, answers and bookkeeping).
    pub cache_max_bytes: usize,
    /// Longest time a positive answer is kept (and its TTLs are capped to), e.g. "1d".
    #[serde(with = "causeway_api::duration")]
    pub cache_max_ttl: Duration,
    /// Longest time a negative answer (NXDOMAIN, no data) is kept, e.g. "1h".
    #[serde(with = "causeway_api::duration")]
    pub cache_max_negative_ttl: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: DnsMode::Capture,
            listen: SocketAddr::from(([127, 0, 0, 1], 15053)),
            resolver_listen: SocketAddr::from(([127, 0, 0, 153], 53)),
            ttl: Duration::from_secs(5),
            cluster_domains: vec!["cluster.local".into()],
            consul_domain: "consul".into(),
            eureka_suffixes: Vec::new(),
            eureka_bare_names: false,
            causeway_domain: "causeway".into(),
            upstreams: Vec::new(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            forward_timeout: Duration::from_secs(2),
            listen_ipv6: true,
            cache: true,
            cache_max_entries: 10_000,
            cache_max_bytes: 4 << 20,
            cache_max_ttl: Duration::from_secs(86_400),
            cache_max_negative_ttl: Duration::from_secs(3600),
        }
    }
}

/// Data-plane settings (ports from the design brief by default).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataplaneConfig {
    /// Install iptables capture rules (needs root or CAP_NET_ADMIN). `--no-capture`
    /// turns it off; the listeners still run.
    pub capture: bool,
    /// Where captured outbound connections are redirected to; loopback only.
    pub outbound_listen: SocketAddr,
    /// UDP address of the tunnel (QUIC) that peer agents connect to.
    pub tunnel_listen: SocketAddr,
    /// Tunnel port of peer agents.
    pub tunnel_port: u16,
    /// Where off-host plaintext to this host's application ports (PERMISSIVE) is handed
    /// to the agent (TPROXY) to be authorized; IPv4.
    pub inbound_listen: SocketAddr,
    /// Socket mark (SO_MARK) on the agent's own TCP sockets so capture skips them.
    pub mark: u32,
    /// This host's zone, for same-zone-first endpoint choice.
    pub zone: Option<String>,
    /// Timeout of a connect to an endpoint, a peer agent or a local application, e.g. "5s".
    #[serde(with = "causeway_api::duration")]
    pub connect_timeout: Duration,
    /// A proxied connection with no byte in either direction for this long is closed
    /// with a reset at both ends, e.g. "1h"; "0s" turns the timeout off.
    #[serde(with = "causeway_api::duration")]
    pub idle_timeout: Duration,
    /// On stop (SIGTERM), how long the proxied connections still open may take to finish
    /// before they are closed, e.g. "5s"; "0s" closes them at once.
    #[serde(with = "causeway_api::duration")]
    pub drain_timeout: Duration,
    /// First ejection of an endpoint whose connect failed; doubles per failure, e.g. "5s".
    #[serde(with = "causeway_api::duration")]
    pub eject_base: Duration,
    /// Longest ejection, e.g. "1m".
    #[serde(with = "causeway_api::duration")]
    pub eject_max: Duration,
    /// Reach endpoints that run no agent in plaintext (auto mTLS); false refuses them.
    pub plaintext_upstreams: bool,
    /// Plaintext to this host's application ports from off-host: "permissive" accepts it,
    /// "strict" refuses it (only tunnel traffic gets in). Set here until the controller
    /// pushes the workload group's mode.
    pub inbound_mode: InboundMode,
    /// Transport this agent uses towards peer agents: "tcp" (the default: TCP + TLS on
    /// 15008, HTTP/2-multiplexed; ahead of QUIC on bulk, serial latency and memory side by
    /// side with ztunnel, BENCHMARKS.md) or "quic" (UDP 15008, the TCP + TLS fallback when
    /// UDP gets no answer). Inbound, both are always served, so agents with either setting
    /// (and older agents, whose default was "quic") reach each other.
    pub tunnel_transport: TunnelTransport,
    /// How long the client side waits for the first bytes of a connection to a port whose
    /// protocol is undeclared, to tell HTTP from opaque TCP (then spliced), e.g. "300ms".
    #[serde(with = "causeway_api::duration")]
    pub protocol_sniff_timeout: Duration,
}

/// Which tunnel transport the agent uses towards its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelTransport {
    /// QUIC, falling back to TCP + TLS per peer when UDP is blocked.
    Quic,
    /// TCP + TLS (multiplexed) only: the default (issue 25, BENCHMARKS.md).
    #[default]
    Tcp,
}

/// Whether off-host plaintext may reach this host's application ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    /// Accepted (migration: clients without an agent keep working).
    #[default]
    Permissive,
    /// Refused (TCP reset); tunnel traffic arrives over loopback and is not affected.
    Strict,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            capture: true,
            outbound_listen: SocketAddr::from(([127, 0, 0, 1], 15001)),
            tunnel_listen: SocketAddr::from(([0, 0, 0, 0], 15008)),
            tunnel_port: 15008,
            inbound_listen: SocketAddr::from(([0, 0, 0, 0], 15006)),
            mark: 0x4357,
            zone: None,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
            drain_timeout: Duration::from_secs(5),
            eject_base: Duration::from_secs(5),
            eject_max: Duration::from_secs(60),
            plaintext_upstreams: true,
            inbound_mode: InboundMode::Permissive,
            tunnel_transport: TunnelTransport::Tcp,
            protocol_sniff_timeout: Duration::from_millis(300),
        }
    }
}

/// Certificate renewal settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Renew when this fraction of the certificate's lifetime has passed (0.5 = half).
    pub renew_at: f64,
    /// Random spread around `renew_at` so a fleet does not renew at once (0.1 = ±10 %).
    pub jitter: f64,
    /// First retry delay after a failed renewal or connection, e.g. "1s".
    #[serde(with = "causeway_api::duration")]
    pub retry_min: Duration,
    /// Longest retry delay, e.g. "5m".
    #[serde(with = "causeway_api::duration")]
    pub retry_max: Duration,
}

impl AgentConfig {
    /// The controllers to use, in order: `controllers`, else `controller`, else the one
    /// the join token named (`joined`).
    pub fn controller_list(&self, joined: &str) -> Vec<String> {
        if !self.controllers.is_empty() {
            self.controllers.clone()
        } else {
            vec![self.controller.clone().unwrap_or_else(|| joined.to_owned())]
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            controller: None,
            controllers: Vec::new(),
            address: None,
            identity: IdentityConfig::default(),
            dataplane: DataplaneConfig::default(),
            dns: DnsConfig::default(),
            health: crate::health::HealthConfig::default(),
            jwt: JwtConfig::default(),
            telemetry: crate::telemetry::TelemetryConfig::default(),
        }
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            renew_at: 0.5,
            jitter: 0.1,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
        }
    }
}

impl AgentConfig {
    /// Reads a config file (does not validate).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Checks rules across fields; reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let id = &self.identity;
        if !(id.renew_at > 0.0 && id.renew_at < 1.0) {
            errors.push(format!(
                "identity.renew_at = {}: must be between 0 and 1 (0.5 renews at half the lifetime)",
                id.renew_at
            ));
        }
        if !(0.0..=0.4).contains(&id.jitter) {
            errors.push(format!(
                "identity.jitter = {}: must be between 0 and 0.4",
                id.jitter
            ));
        } else if id.renew_at - id.jitter <= 0.0 || id.renew_at + id.jitter >= 1.0 {
            errors.push(format!(
                "identity.renew_at ± jitter = {}..{}: must stay inside 0..1",
                id.renew_at - id.jitter,
                id.renew_at + id.jitter
            ));
        }
        if id.retry_min.is_zero() || id.retry_min > id.retry_max {
            errors.push(format!(
                "identity.retry_min = {}: must be above zero and at most identity.retry_max ({})",
                humantime::format_duration(id.retry_min),
                humantime::format_duration(id.retry_max)
            ));
        }
        if self.jwt.refresh_interval.is_zero() || self.jwt.fetch_timeout.is_zero() {
            errors.push(
                "jwt.refresh_interval and jwt.fetch_timeout must be above zero (e.g. \"20m\" and \"5s\")"
                    .to_owned(),
            );
        }
        if self.jwt.verified_tokens > MAX_VERIFIED_TOKENS {
            errors.push(format!(
                "jwt.verified_tokens = {}: must be at most {MAX_VERIFIED_TOKENS} (each entry holds a token's claims, up to a few KiB; 0 turns the cache off)",
                self.jwt.verified_tokens
            ));
        }
        if let Some(c) = &self.controller
            && let Err(why) = check_host_port(c)
        {
            errors.push(format!(
                "controller = {c:?}: {why}; write host:port, e.g. \"10.0.0.5:15012\""
            ));
        }
        for c in &self.controllers {
            if let Err(why) = check_host_port(c) {
                errors.push(format!(
                    "controllers: {c:?} must be host:port ({why}), e.g. controllers = [\"10.0.0.5:15012\", \"[2001:db8::5]:15012\", \"controllers.example:15012\"]"
                ));
            }
        }
        if self.controller.is_some() && !self.controllers.is_empty() {
            errors.push(
                "controller and controllers are both set: list every controller in controllers and remove controller".to_owned(),
            );
        }
        let dp = &self.dataplane;
        if !dp.outbound_listen.ip().is_loopback() {
            errors.push(format!(
                "dataplane.outbound_listen = {}: must be a loopback address (captured connections come from this host only), e.g. \"127.0.0.1:15001\"",
                dp.outbound_listen
            ));
        }
        if dp.capture && dp.outbound_listen.port() == 0 {
            errors.push(
                "dataplane.outbound_listen: port 0 cannot be a capture target; use 15001".into(),
            );
        }
        if dp.capture && (!dp.inbound_listen.is_ipv4() || dp.inbound_listen.port() == 0) {
            errors.push(format!(
                "dataplane.inbound_listen = {}: must be an IPv4 address with a port (the TPROXY target of inbound plaintext), e.g. \"0.0.0.0:15006\"",
                dp.inbound_listen
            ));
        }
        if dp.tunnel_port == 0 {
            errors.push("dataplane.tunnel_port = 0: must be 1..65535 (15008)".into());
        }
        if dp.mark == 0 {
            errors.push("dataplane.mark = 0: must be non-zero (0 is every unmarked socket)".into());
        }
        if dp.connect_timeout.is_zero() {
            errors.push("dataplane.connect_timeout: must be above zero, e.g. \"5s\"".into());
        }
        if dp.protocol_sniff_timeout.is_zero()
            || dp.protocol_sniff_timeout > Duration::from_secs(10)
        {
            errors.push(format!(
                "dataplane.protocol_sniff_timeout = {}: must be above zero and at most 10s, e.g. \"300ms\"",
                humantime::format_duration(dp.protocol_sniff_timeout)
            ));
        }
        if dp.eject_base.is_zero() || dp.eject_base > dp.eject_max {
            errors.push(format!(
                "dataplane.eject_base = {}: must be above zero and at most dataplane.eject_max ({})",
                humantime::format_duration(dp.eject_base),
                humantime::format_duration(dp.eject_max)
            ));
        }
        self.telemetry.validate(self.health.listen, &mut errors);
        let dns = &self.dns;
        if dns.enabled {
            if !dns.listen.ip().is_loopback() || dns.listen.port() == 0 {
                errors.push(format!(
                    "dns.listen = {}: must be a loopback address with a port, e.g. \"127.0.0.1:15053\"",
                    dns.listen
                ));
            }
            if dns.mode == DnsMode::ResolvConf
                && (!dns.resolver_listen.ip().is_loopback() || dns.resolver_listen.port() != 53)
            {
                errors.push(format!(
                    "dns.resolver_listen = {}: must be a loopback address on port 53 (resolv.conf cannot name a port), e.g. \"127.0.0.153:53\"",
                    dns.resolver_listen
                ));
            }
            if dns.ttl.is_zero() || dns.ttl > Duration::from_secs(3600) {
                errors.push(format!(
                    "dns.ttl = {}: must be between 1s and 1h (short: VIPs are stable, but services come and go)",
                    humantime::format_duration(dns.ttl)
                ));
            }
            if dns.forward_timeout.is_zero() {
                errors.push("dns.forward_timeout: must be above zero, e.g. \"2s\"".into());
            }
            if dns.cache {
                if dns.cache_max_entries == 0 {
                    errors.push(
                        "dns.cache_max_entries = 0: must be at least 1, e.g. 10000 (or set dns.cache = false)".into(),
                    );
                }
                if dns.cache_max_bytes < 64 << 10 {
                    errors.push(format!(
                        "dns.cache_max_bytes = {}: must be at least 65536 (64 KiB), e.g. 4194304 (or set dns.cache = false)",
                        dns.cache_max_bytes
                    ));
                }
                for (field, d) in [
                    ("dns.cache_max_ttl", dns.cache_max_ttl),
                    ("dns.cache_max_negative_ttl", dns.cache_max_negative_ttl),
                ] {
                    if d < Duration::from_secs(1) {
                        errors.push(format!(
                            "{field} = {}: must be at least 1s, e.g. \"1h\" (or set dns.cache = false)",
                            humantime::format_duration(d)
                        ));
                    }
                }
            }
            let domains = dns
                .cluster_domains
                .iter()
                .map(|d| ("dns.cluster_domains", d))
                .chain(
                    dns.eureka_suffixes
                        .iter()
                        .map(|d| ("dns.eureka_suffixes", d)),
                )
                .chain([
                    ("dns.consul_domain", &dns.consul_domain),
                    ("dns.causeway_domain", &dns.causeway_domain),
                ]);
            for (field, d) in domains {
                if let Err(why) = crate::dns::check_domain(d) {
                    errors.push(format!("{field}: {d:?} {why}"));
                }
            }
            for u in &dns.upstreams {
                if crate::dns::upstream::parse_upstream(u).is_none() {
                    errors.push(format!(
                        "dns.upstreams: {u:?} is not an IP address or ip:port, e.g. \"10.0.0.2\" or \"[fd00::2]:53\""
                    ));
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }
}

/// Checks a controller address: `host:port` with a name, an IPv4 address or a bracketed
/// IPv6 address, and a port from 1 to 65535.
fn check_host_port(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err("no port".to_owned());
    };
    match port.parse::<u16>() {
        Ok(0) => return Err("port 0".to_owned()),
        Ok(_) => {}
        Err(_) => return Err(format!("port {port:?} is not a number from 1 to 65535")),
    }
    if host.is_empty() {
        return Err("no host".to_owned());
    }
    if let Some(inner) = host.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else {
            return Err(format!("{host:?} opens a bracket it does not close"));
        };
        return inner
            .parse::<std::net::Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| format!("{inner:?} is not an IPv6 address"));
    }
    if host.contains(char::is_whitespace) || host.contains('/') {
        return Err(format!("{host:?} is not a host name or address"));
    }
    if host.contains(':') {
        return Err("an IPv6 address needs brackets, e.g. [2001:db8::5]:15012".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        AgentConfig::default().validate().unwrap();
    }

    #[test]
    fn unknown_fields_and_all_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(&p, "state_dri = \"/x\"").unwrap();
        let err = AgentConfig::load(&p).unwrap_err();
        assert!(err.to_string().contains("state_dri"), "{err}");
        std::fs::write(
            &p,
            "controller = \"nohost\"\n[identity]\nrenew_at = 1.5\nretry_min = \"10m\"\nretry_max = \"1m\"\n",
        )
        .unwrap();
        let ConfigError::Invalid(errors) = AgentConfig::load(&p).unwrap().validate().unwrap_err()
        else {
            panic!()
        };
        assert_eq!(errors.len(), 4, "{errors:#?}");
        std::fs::write(
            &p,
            "[dataplane]\noutbound_listen = \"0.0.0.0:15001\"\nmark = 0\neject_base = \"2m\"\n",
        )
        .unwrap();
        let ConfigError::Invalid(errors) = AgentConfig::load(&p).unwrap().validate().unwrap_err()
        else {
            panic!()
        };
        assert_eq!(errors.len(), 3, "{errors:#?}");
    }

    #[test]
    fn controllers_are_host_ports_and_take_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(
            &p,
            "controllers = [\"10.0.0.5:15012\", \"10.0.0.6:15012\"]\n",
        )
        .unwrap();
        let cfg = AgentConfig::load(&p).unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.controller_list("10.0.0.9:15012"),
            vec!["10.0.0.5:15012".to_owned(), "10.0.0.6:15012".to_owned()]
        );
        let token_only = AgentConfig::default();
        assert_eq!(
            token_only.controller_list("10.0.0.9:15012"),
            vec!["10.0.0.9:15012".to_owned()]
        );
        std::fs::write(
            &p,
            "controllers = [\"[2001:db8::5]:15012\", \"ctl.example:15012\"]\n",
        )
        .unwrap();
        AgentConfig::load(&p).unwrap().validate().unwrap();
        for (bad, why) in [
            ("ctl.example:http", "not a number"),
            ("ctl.example:0", "port 0"),
            ("ctl.example:70000", "not a number"),
            (":15012", "no host"),
            ("2001:db8::5:15012", "needs brackets"),
            ("[2001:db8::5:15012", "does not close"),
            ("[not-v6]:15012", "not an IPv6 address"),
            ("http://ctl.example:15012", "not a host name"),
        ] {
            std::fs::write(&p, format!("controllers = [{bad:?}]\n")).unwrap();
            let ConfigError::Invalid(errors) =
                AgentConfig::load(&p).unwrap().validate().unwrap_err()
            else {
                panic!("{bad}")
            };
            assert!(
                errors.len() == 1 && errors[0].contains(bad) && errors[0].contains(why),
                "{bad}: {errors:#?}"
            );
        }
        std::fs::write(
            &p,
            "controller = \"10.0.0.5:15012\"\ncontrollers = [\"nohost\"]\n",
        )
        .unwrap();
        let ConfigError::Invalid(errors) = AgentConfig::load(&p).unwrap().validate().unwrap_err()
        else {
            panic!()
        };
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(
            errors[0].contains("\"nohost\" must be host:port"),
            "{errors:#?}"
        );
        assert!(errors[1].contains("both set"), "{errors:#?}");
    }

    #[test]
    fn dns_section_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(&p, "[dns]\nzones = []\n").unwrap();
        assert!(
            AgentConfig::load(&p)
                .unwrap_err()
                .to_string()
                .contains("zones")
        );
        std::fs::write(
            &p,
            "[dns]\nmode = \"resolv-conf\"\nlisten = \"0.0.0.0:15053\"\nresolver_listen = \"127.0.0.153:5353\"\nttl = \"0s\"\ncluster_domains = [\"bad domain\"]\nupstreams = [\"dns.example\"]\n",
        )
        .unwrap();
        let ConfigError::Invalid(errors) = AgentConfig::load(&p).unwrap().validate().unwrap_err()
        else {
            panic!()
        };
        assert_eq!(errors.len(), 5, "{errors:#?}");
        std::fs::write(&p, "[dns]\nmode = \"sideways\"\n").unwrap();
        assert!(
            AgentConfig::load(&p)
                .unwrap_err()
                .to_string()
                .contains("sideways")
        );
        std::fs::write(
            &p,
            "[dns]\nmode = \"off\"\neureka_suffixes = [\"eureka.internal\"]\neureka_bare_names = true\nupstreams = [\"10.0.0.2\", \"[fd00::2]:53\"]\n",
        )
        .unwrap();
        AgentConfig::load(&p).unwrap().validate().unwrap();
        // The cache's bounds.
        std::fs::write(
            &p,
            "[dns]\ncache_max_entries = 0\ncache_max_bytes = 1000\ncache_max_ttl = \"0s\"\ncache_max_negative_ttl = \"0s\"\n",
        )
        .unwrap();
        let ConfigError::Invalid(errors) = AgentConfig::load(&p).unwrap().validate().unwrap_err()
        else {
            panic!()
        };
        assert_eq!(errors.len(), 4, "{errors:#?}");
        assert!(
            errors[1].contains("dns.cache_max_bytes = 1000") && errors[1].contains("65536"),
            "{errors:#?}"
        );
        // Off: the bounds do not matter.
        std::fs::write(&p, "[dns]\ncache = false\ncache_max_entries = 0\n").unwrap();
        let c = AgentConfig::load(&p).unwrap();
        c.validate().unwrap();
        assert!(!c.dns.cache && AgentConfig::default().dns.cache);
    }

    /// The default transport is TCP + TLS (issue 25: ahead of QUIC on bulk, serial latency
    /// and memory side by side with ztunnel), with no config file, with a file that does
    /// not name it, and for the enum itself; "quic" stays selectable.
    #[test]
    fn jwt_verified_tokens_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        assert_eq!(AgentConfig::default().jwt.verified_tokens, 10_000);
        std::fs::write(&p, "[jwt]\nverified_tokens = 0\n").unwrap();
        let c = AgentConfig::load(&p).unwrap();
        c.validate().unwrap();
        assert_eq!(c.jwt.verified_tokens, 0);
        std::fs::write(&p, "[jwt]\nverified_tokens = 2000000\n").unwrap();
        let ConfigError::Invalid(errors) = AgentConfig::load(&p).unwrap().validate().unwrap_err()
        else {
            panic!()
        };
        assert!(
            errors.len() == 1
                && errors[0].contains("jwt.verified_tokens = 2000000")
                && errors[0].contains("1000000"),
            "{errors:#?}"
        );
    }

    #[test]
    fn tunnel_transport_defaults_to_tcp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        assert_eq!(
            AgentConfig::default().dataplane.tunnel_transport,
            TunnelTransport::Tcp
        );
        assert_eq!(TunnelTransport::default(), TunnelTransport::Tcp);
        std::fs::write(&p, "[dataplane]\nidle_timeout = \"1m\"\n").unwrap();
        assert_eq!(
            AgentConfig::load(&p).unwrap().dataplane.tunnel_transport,
            TunnelTransport::Tcp
        );
        std::fs::write(&p, "[dataplane]\ntunnel_transport = \"quic\"\n").unwrap();
        assert_eq!(
            AgentConfig::load(&p).unwrap().dataplane.tunnel_transport,
            TunnelTransport::Quic
        );
    }

    #[test]
    fn tunnel_transport_is_quic_or_tcp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(&p, "[dataplane]\ntunnel_transport = \"tcp\"\n").unwrap();
        assert_eq!(
            AgentConfig::load(&p).unwrap().dataplane.tunnel_transport,
            TunnelTransport::Tcp
        );
        std::fs::write(&p, "[dataplane]\ntunnel_transport = \"sctp\"\n").unwrap();
        let err = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("sctp") && err.contains("quic") && err.contains("tcp"),
            "{err}"
        );
    }

    #[test]
    fn telemetry_section_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        let d = AgentConfig::default().telemetry;
        assert_eq!(d.access_log, crate::telemetry::AccessLogFormat::Off);
        assert_eq!((d.access_log_sampling, d.trace_sampling), (100.0, 1.0));
        std::fs::write(
            &p,
            "[telemetry]\naccess_log = \"json\"\naccess_log_sampling = 12.5\ntrace_sampling = 100\notlp_endpoint = \"http://10.0.0.9:4318/v1/traces\"\n",
        )
        .unwrap();
        let c = AgentConfig::load(&p).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.telemetry.access_log,
            crate::telemetry::AccessLogFormat::Json
        );
        assert_eq!(c.telemetry.access_log_sampling, 12.5);
        std::fs::write(&p, "[telemetry]\naccess_log = \"xml\"\n").unwrap();
        let err = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("xml") && err.contains("json"), "{err}");
        std::fs::write(
            &p,
            "[telemetry]\naccess_log_sampling = 101\ntrace_sampling = -1\notlp_endpoint = \"https://c:4318\"\n",
        )
        .unwrap();
        let ConfigError::Invalid(errors) = AgentConfig::load(&p).unwrap().validate().unwrap_err()
        else {
            panic!()
        };
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(
            errors[0].contains("telemetry.access_log_sampling = 101"),
            "{errors:#?}"
        );
        assert!(
            errors[2].contains("telemetry.otlp_endpoint")
                && errors[2].contains("http://127.0.0.1:4318/v1/traces"),
            "{errors:#?}"
        );
    }

    #[test]
    fn protocol_sniff_timeout_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(&p, "[dataplane]\nprotocol_sniff_timeout = \"150ms\"\n").unwrap();
        let c = AgentConfig::load(&p).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.dataplane.protocol_sniff_timeout,
            Duration::from_millis(150)
        );
        for bad in ["0s", "1m"] {
            std::fs::write(
                &p,
                format!("[dataplane]\nprotocol_sniff_timeout = \"{bad}\"\n"),
            )
            .unwrap();
            let ConfigError::Invalid(errors) =
                AgentConfig::load(&p).unwrap().validate().unwrap_err()
            else {
                panic!()
            };
            assert!(
                errors.len() == 1
                    && errors[0].contains("dataplane.protocol_sniff_timeout")
                    && errors[0].contains("300ms"),
                "{errors:#?}"
            );
        }
    }

    #[test]
    fn shipped_example_configs_parse_and_validate() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut found = 0;
        for dir in ["node-agent/examples", "packaging/deb/agent"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "toml") {
                    AgentConfig::load(&path)
                        .and_then(|c| c.validate())
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    found += 1;
                }
            }
        }
        assert!(found >= 1, "no example agent config found");
    }
}
