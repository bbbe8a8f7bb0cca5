//! The controller's configuration: one typed struct, read from TOML, checked as a whole.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default data directory of a packaged controller.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/causeway/controller";

/// Why the configuration could not be used. Every problem is listed at once.
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
    /// The file is not valid TOML for this struct (unknown field, wrong type, ...).
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        message: String,
    },
    /// Rules across fields failed; each line is one problem.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// `causeway-controller` configuration (`/etc/causeway/controller.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the embedded store (sled) and the admin credential.
    pub data_dir: PathBuf,
    /// SPIFFE trust domain of the mesh, e.g. "causeway.local".
    pub trust_domain: String,
    /// Admin HTTP API (used by causewayctl).
    pub admin: AdminConfig,
    /// Control endpoint (QUIC) for join, renewal and config push.
    pub control: ControlConfig,
    /// Certificate authority.
    pub ca: CaConfig,
    /// Join tokens.
    pub tokens: TokenConfig,
    /// Config push, VIPs and agent workloads.
    pub mesh: MeshConfig,
    /// Registries merged into the mesh (`[[sources.consul]]`, `[[sources.eureka]]`,
    /// `[[sources.kubernetes]]`, `[[sources.file]]`).
    pub sources: causeway_registry::SourcesConfig,
    /// Prometheus metrics endpoint.
    pub metrics: MetricsConfig,
    /// Where state is kept: the embedded sled store (default) or etcd.
    pub store: StoreConfig,
}

/// Which store backend keeps the controller's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// sled in `<data_dir>/store`: one controller.
    #[default]
    Sled,
    /// etcd: several controllers share the state.
    Etcd,
}

/// `[store]`: the state backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// "sled" (default) or "etcd".
    pub backend: StoreBackend,
    /// etcd client URLs (`http://10.0.0.9:2379`), tried in turn.
    pub endpoints: Vec<String>,
    /// File whose bytes (32 or more) derive the key that encrypts the CA key in etcd;
    /// the same file on every controller.
    pub kek_file: Option<PathBuf>,
    /// Prefix of every key the controller writes in etcd.
    pub prefix: String,
    /// Time limit for connecting to one etcd endpoint.
    #[serde(with = "causeway_api::duration")]
    pub dial_timeout: Duration,
    /// Time limit for one etcd request.
    #[serde(with = "causeway_api::duration")]
    pub request_timeout: Duration,
    /// PEM CA bundle that etcd's server certificates chain to (https endpoints);
    /// default: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for etcd's `--client-cert-auth`, with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// TTL of the leadership lease (HA controllers on etcd): a leader that stops
    /// renewing it loses the registry sources to another controller within this time.
    #[serde(with = "causeway_api::duration")]
    pub lease_ttl: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Sled,
            endpoints: Vec::new(),
            kek_file: None,
            prefix: "/causeway/".into(),
            dial_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            ca_file: None,
            cert_file: None,
            key_file: None,
            lease_ttl: Duration::from_secs(10),
        }
    }
}

impl StoreConfig {
    /// The etcd client settings.
    pub fn etcd_options(&self) -> crate::etcd::EtcdOptions {
        crate::etcd::EtcdOptions {
            endpoints: self.endpoints.clone(),
            request_timeout: self.request_timeout,
            dial_timeout: self.dial_timeout,
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        }
    }

    /// Appends what is wrong with these settings to `errors`.
    pub fn problems(&self, errors: &mut Vec<String>) {
        if self.backend != StoreBackend::Etcd {
            return;
        }
        if self.endpoints.is_empty() {
            errors.push(
                "store.endpoints is empty: backend = \"etcd\" needs etcd's client URLs, e.g. endpoints = [\"http://10.0.0.9:2379\"]"
                    .into(),
            );
        }
        for e in &self.endpoints {
            let ok = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .is_some_and(|rest| !rest.is_empty());
            if !ok {
                errors.push(format!(
                    "store.endpoints: {e:?} is not an etcd client URL; write it as \"http://HOST:2379\""
                ));
            }
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            errors.push(
                "store: cert_file and key_file go together (etcd's client certificate and its key); set both or neither".into(),
            );
        }
        if self.ca_file.is_some() || self.cert_file.is_some() {
            for e in self.endpoints.iter().filter(|e| e.starts_with("http://")) {
                errors.push(format!(
                    "store.endpoints: {e:?} is plain http but store.ca_file/cert_file are set for TLS; write it as https://"
                ));
            }
        }
        if self.kek_file.is_none() {
            errors.push(
                "store.kek_file is not set: backend = \"etcd\" keeps the CA key in etcd encrypted under a key-encryption key; create a file with 32 random bytes (`head -c 32 /dev/urandom > /etc/causeway/ca-kek`), copy it to every controller and set kek_file = \"/etc/causeway/ca-kek\""
                    .into(),
            );
        }
        if !self.prefix.starts_with('/') || self.prefix.len() < 2 {
            errors.push(format!(
                "store.prefix = {:?}: must start with / and name a directory, e.g. \"/causeway/\"",
                self.prefix
            ));
        }
        for (name, d) in [
            ("dial_timeout", self.dial_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if d.is_zero() || d > Duration::from_secs(300) {
                errors.push(format!(
                    "store.{name} = {}: must be above zero and at most 5m",
                    humantime::format_duration(d)
                ));
            }
        }
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl > Duration::from_secs(300) {
            errors.push(format!(
                "store.lease_ttl = {}: must be between 2s and 5m (etcd grants no shorter lease; the default is 10s)",
                humantime::format_duration(self.lease_ttl)
            ));
        }
    }
}

/// `[metrics]`: the Prometheus endpoint (`GET /metrics`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the metrics endpoint; loopback by default (the design's port 15014,
    /// as istiod's). Use "0.0.0.0:15014" to let a remote Prometheus scrape it.
    #[serde(deserialize_with = "causeway_api::netvalue::deserialize")]
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 15014)),
        }
    }
}

/// Keys that earlier versions accepted and this one refuses by name, with why and what
/// to do: an operator who kept one learns that it has no effect any more.
const REMOVED_KEYS: &[(&str, &str, &str)] = &[(
    "debug",
    "record_requests_dir",
    "it wrote every raw control request, join-token secrets included, to disk; delete the [debug] section (tests observe requests in-process instead)",
)];

/// Admin HTTP API settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address to listen on. Anything but loopback requires `tls_cert` and `tls_key`.
    #[serde(deserialize_with = "causeway_api::netvalue::deserialize")]
    pub listen: SocketAddr,
    /// PEM certificate chain for HTTPS on the admin API.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS on the admin API.
    pub tls_key: Option<PathBuf>,
    /// How long a connection may take to send a complete request head, counted from
    /// the accept (TLS handshake included) and again after each response on a kept-alive
    /// connection, e.g. "3s". Idle and slowly-sent connections are closed after it.
    #[serde(with = "causeway_api::duration")]
    pub header_read_timeout: Duration,
    /// How long a connection may go without completing a request (since its accept or
    /// its previous response), whatever it is doing, e.g. "30s": bounds a body that
    /// trickles in or a response the client does not read.
    #[serde(with = "causeway_api::duration")]
    pub idle_timeout: Duration,
    /// Most admin connections open at once. At the cap a new connection closes the
    /// oldest one with no request in progress. Lowered at start to the soft open-files
    /// limit less 128 (descriptors kept for the store, the control port and sources).
    pub max_connections: usize,
}

/// Control endpoint settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// UDP address of the QUIC control endpoint.
    #[serde(deserialize_with = "causeway_api::netvalue::deserialize")]
    pub listen: SocketAddr,
    /// `host:port` agents use to reach the controller; written into join tokens.
    /// Default: the listen address, or this host's outbound address when listening on all.
    pub advertise: Option<String>,
    /// Largest request (join or renewal) accepted, in bytes.
    pub max_request_bytes: usize,
}

/// Certificate-authority settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaConfig {
    /// Lifetime of workload certificates, e.g. "24h".
    #[serde(with = "causeway_api::duration")]
    pub workload_cert_ttl: Duration,
    /// PEM file: an intermediate CA certificate followed by its chain up to the root.
    /// With `intermediate_key`, the controller signs with it instead of generating a root.
    pub intermediate_cert_chain: Option<PathBuf>,
    /// PEM file: the private key of `intermediate_cert_chain` (PKCS#8, ECDSA P-256).
    pub intermediate_key: Option<PathBuf>,
}

/// Join-token settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// Lifetime of a token when `--ttl` is not given, e.g. "1h".
    #[serde(with = "causeway_api::duration")]
    pub default_ttl: Duration,
    /// Longest lifetime a token may be given.
    #[serde(with = "causeway_api::duration")]
    pub max_ttl: Duration,
}

/// Config push, VIPs and agent workloads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// IPv4 range that service VIPs are allocated from.
    #[serde(deserialize_with = "causeway_api::netvalue::deserialize")]
    pub vip_range: ipnet::Ipv4Net,
    /// How long an agent's workload stays registered after its connection is lost.
    #[serde(with = "causeway_api::duration")]
    pub agent_grace: Duration,
    /// How many config versions are remembered so reconnecting agents get a delta.
    pub history: u64,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            vip_range: "240.240.0.0/16".parse().expect("literal"),
            agent_grace: Duration::from_secs(60),
            history: 1024,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            trust_domain: "causeway.local".into(),
            admin: AdminConfig::default(),
            control: ControlConfig::default(),
            ca: CaConfig::default(),
            tokens: TokenConfig::default(),
            mesh: MeshConfig::default(),
            sources: causeway_registry::SourcesConfig::default(),
            metrics: MetricsConfig::default(),
            store: StoreConfig::default(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 15080)),
            tls_cert: None,
            tls_key: None,
            header_read_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 15012)),
            advertise: None,
            max_request_bytes: causeway_api::wire::MAX_REQUEST_FRAME,
        }
    }
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            workload_cert_ttl: Duration::from_secs(24 * 3600),
            intermediate_cert_chain: None,
            intermediate_key: None,
        }
    }
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text (`origin` names it in errors); does not validate.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: removed_key(text).unwrap_or_else(|| e.to_string()),
        })
    }

    /// Checks rules across fields; reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        if let Err(e) = self.trust_domain.parse::<causeway_api::TrustDomain>() {
            errors.push(format!("trust_domain: {e}"));
        }
        if self.data_dir.as_os_str().is_empty() {
            errors.push("data_dir: must not be empty".into());
        }
        match (&self.admin.tls_cert, &self.admin.tls_key) {
            (Some(_), None) | (None, Some(_)) => errors.push(
                "admin: tls_cert and tls_key go together; set both or neither".into(),
            ),
            (None, None) if !self.admin.listen.ip().is_loopback() => errors.push(format!(
                "admin.listen = {}: the admin API may listen off-host only with TLS; set admin.tls_cert and admin.tls_key, or listen on 127.0.0.1",
                self.admin.listen
            )),
            _ => {}
        }
        let (head, idle) = (self.admin.header_read_timeout, self.admin.idle_timeout);
        if head.is_zero() || head > Duration::from_secs(60) {
            errors.push(format!(
                "admin.header_read_timeout = {}: must be above zero and at most 1m (default 3s)",
                humantime::format_duration(head)
            ));
        }
        if idle < head || idle > Duration::from_secs(3600) {
            errors.push(format!(
                "admin.idle_timeout = {}: must be at least admin.header_read_timeout ({}) and at most 1h (default 30s)",
                humantime::format_duration(idle),
                humantime::format_duration(head)
            ));
        }
        let (m, a) = (self.metrics.listen, self.admin.listen);
        let overlap = m.ip() == a.ip() || m.ip().is_unspecified() || a.ip().is_unspecified();
        if m.port() != 0 && m.port() == a.port() && overlap {
            errors.push(format!(
                "metrics.listen = {m}: the admin API listens there (admin.listen = {a}); use another port (default 127.0.0.1:15014)"
            ));
        }
        if !(16..=1_000_000).contains(&self.admin.max_connections) {
            errors.push(format!(
                "admin.max_connections = {}: must be between 16 and 1000000 (default 1024)",
                self.admin.max_connections
            ));
        }
        match (&self.ca.intermediate_cert_chain, &self.ca.intermediate_key) {
            (Some(_), None) | (None, Some(_)) => errors.push(
                "ca: intermediate_cert_chain and intermediate_key go together; set both or neither"
                    .into(),
            ),
            _ => {}
        }
        let ttl = self.ca.workload_cert_ttl;
        if ttl < Duration::from_secs(60) || ttl > Duration::from_secs(366 * 24 * 3600) {
            errors.push(format!(
                "ca.workload_cert_ttl = {}: must be between 1m and 366d",
                humantime::format_duration(ttl)
            ));
        }
        if self.tokens.default_ttl.is_zero() || self.tokens.default_ttl > self.tokens.max_ttl {
            errors.push(format!(
                "tokens.default_ttl = {}: must be above zero and at most tokens.max_ttl ({})",
                humantime::format_duration(self.tokens.default_ttl),
                humantime::format_duration(self.tokens.max_ttl)
            ));
        }
        if self.control.max_request_bytes < 1024 || self.control.max_request_bytes > 16 << 20 {
            errors.push(format!(
                "control.max_request_bytes = {}: must be between 1024 and 16777216",
                self.control.max_request_bytes
            ));
        }
        if let Some(adv) = &self.control.advertise
            && !adv.contains(':')
        {
            errors.push(format!(
                "control.advertise = {adv:?}: must be host:port, e.g. \"10.0.0.5:15012\""
            ));
        }
        let vip_bits = 32 - u32::from(self.mesh.vip_range.prefix_len());
        if vip_bits < 4 {
            errors.push(format!(
                "mesh.vip_range = {}: too small; use at least a /28 (default 240.240.0.0/16)",
                self.mesh.vip_range
            ));
        }
        if self.mesh.history == 0 {
            errors.push("mesh.history = 0: must be at least 1".into());
        }
        self.store.problems(&mut errors);
        if let Err(e) = self.sources.validate() {
            errors.extend(e.problems.into_iter().map(|p| format!("sources: {p}")));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }
}

/// Names a removed key that `text` sets, if any (see [`REMOVED_KEYS`]).
fn removed_key(text: &str) -> Option<String> {
    let table: toml::Table = toml::from_str(text).ok()?;
    REMOVED_KEYS.iter().find_map(|(section, key, why)| {
        let set = table
            .get(*section)
            .and_then(toml::Value::as_table)
            .is_some_and(|t| t.contains_key(*key));
        set.then(|| format!("{section}.{key} was removed: {why}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_removed_request_recording_key_is_refused_by_name() {
        let err = Config::parse(
            "[debug]\nrecord_requests_dir = \"/tmp/requests\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("c.toml"), "{text}");
        assert!(
            text.contains("debug.record_requests_dir was removed"),
            "{text}"
        );
        assert!(text.contains("delete the [debug] section"), "{text}");
        // Any other key of the old section is an unknown field as usual.
        let err = Config::parse("[debug]\nverbose = true\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("debug"), "{err}");
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        let c = Config::parse("", Path::new("empty.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.admin.listen.port(), 15080);
        assert_eq!(c.control.listen.port(), 15012);
    }

    #[test]
    fn metrics_listen_defaults_to_15014_and_may_not_take_the_admin_port() {
        assert_eq!(
            Config::default().metrics.listen,
            "127.0.0.1:15014".parse().unwrap()
        );
        let c = Config::parse("[metrics]\nlisten = \"0.0.0.0:9464\"", Path::new("c.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.metrics.listen.port(), 9464);
        let c = Config::parse(
            "[admin]\nlisten = \"127.0.0.1:15080\"\n[metrics]\nlisten = \"0.0.0.0:15080\"",
            Path::new("c.toml"),
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("metrics.listen = 0.0.0.0:15080") && err.contains("admin.listen"),
            "{err}"
        );
        let err =
            Config::parse("[metrics]\nlisten = \"localhost:1\"", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("localhost:1"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Config::parse("trust_domian = \"x\"", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("trust_domian"), "{err}");
        let err = Config::parse(
            "[admin]\nlisten = \"127.0.0.1:1\"\nport = 3",
            Path::new("c.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
    }

    #[test]
    fn bad_duration_names_the_value() {
        let err =
            Config::parse("[ca]\nworkload_cert_ttl = \"soon\"", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("soon"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            trust_domain = "Not Valid"
            [admin]
            listen = "0.0.0.0:15080"
            header_read_timeout = "2m"
            idle_timeout = "1s"
            max_connections = 2
            [ca]
            workload_cert_ttl = "10s"
            intermediate_key = "/x.pem"
            [tokens]
            default_ttl = "60d"
            max_ttl = "1d"
        "#;
        let c = Config::parse(text, Path::new("c.toml")).unwrap();
        let ConfigError::Invalid(errors) = c.validate().unwrap_err() else {
            panic!("expected Invalid")
        };
        assert_eq!(errors.len(), 8, "{errors:#?}");
        assert!(
            errors
                .iter()
                .any(|e| e.contains("admin.header_read_timeout = 2m"))
        );
        assert!(errors.iter().any(|e| e.contains("admin.idle_timeout = 1s")));
        assert!(
            errors
                .iter()
                .any(|e| e.contains("admin.max_connections = 2"))
        );
        assert!(errors.iter().any(|e| e.contains("trust_domain")));
        assert!(errors.iter().any(|e| e.contains("off-host only with TLS")));
        assert!(errors.iter().any(|e| e.contains("intermediate_cert_chain")));
        assert!(errors.iter().any(|e| e.contains("workload_cert_ttl")));
        assert!(errors.iter().any(|e| e.contains("default_ttl")));
    }

    #[test]
    fn etcd_store_needs_endpoints_and_a_kek_file() {
        let c = Config::parse("[store]\nbackend = \"etcd\"", Path::new("c.toml")).unwrap();
        let ConfigError::Invalid(errors) = c.validate().unwrap_err() else {
            panic!("expected Invalid")
        };
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(
            errors[0].contains("store.endpoints is empty"),
            "{errors:#?}"
        );
        assert!(
            errors[1].contains("store.kek_file is not set"),
            "{errors:#?}"
        );
        assert!(errors[1].contains("head -c 32 /dev/urandom"), "{errors:#?}");
        let c = Config::parse(
            "[store]\nbackend = \"etcd\"\nendpoints = [\"10.0.0.9:2379\"]\nkek_file = \"/k\"\nprefix = \"x\"\nrequest_timeout = \"0s\"",
            Path::new("c.toml"),
        )
        .unwrap();
        let ConfigError::Invalid(errors) = c.validate().unwrap_err() else {
            panic!("expected Invalid")
        };
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors[0].contains("\"10.0.0.9:2379\" is not an etcd client URL"));
        assert!(errors[1].contains("store.prefix = \"x\""));
        assert!(errors[2].contains("store.request_timeout = 0s"));
        let err =
            Config::parse("[store]\nbackend = \"postgres\"", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("postgres"), "{err}");
        let c = Config::parse(
            "[store]\nbackend = \"etcd\"\nendpoints = [\"http://10.0.0.9:2379\"]\nkek_file = \"/etc/causeway/ca-kek\"",
            Path::new("c.toml"),
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(Config::default().store.backend, StoreBackend::Sled);
        let c = Config::parse(
            "[store]\nbackend = \"etcd\"\nendpoints = [\"http://10.0.0.9:2379\"]\nkek_file = \"/k\"\ncert_file = \"/c.pem\"",
            Path::new("c.toml"),
        )
        .unwrap();
        let ConfigError::Invalid(errors) = c.validate().unwrap_err() else {
            panic!("expected Invalid")
        };
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors[0].contains("cert_file and key_file go together"));
        assert!(errors[1].contains("is plain http") && errors[1].contains("https://"));
    }

    #[test]
    fn shipped_example_configs_parse_and_validate() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut found = 0;
        for dir in ["controller/examples", "packaging/deb/controller"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "toml") {
                    let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                    c.validate()
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    found += 1;
                }
            }
        }
        assert!(found >= 1, "no example controller config found");
    }
}
