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
    /// Workload address registered in the mesh; default: the local address of the
    /// route to the controller.
    pub address: Option<std::net::IpAddr>,
    /// Certificate renewal.
    pub identity: IdentityConfig,
    /// Traffic capture, outbound proxy and tunnel.
    pub dataplane: DataplaneConfig,
    /// Health, readiness and metrics endpoint (127.0.0.1:15020).
    pub health: crate::health::HealthConfig,
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
    /// Socket mark (SO_MARK) on the agent's own TCP sockets so capture skips them.
    pub mark: u32,
    /// This host's zone, for same-zone-first endpoint choice.
    pub zone: Option<String>,
    /// Timeout of a connect to an endpoint, a peer agent or a local application, e.g. "5s".
    #[serde(with = "causeway_api::duration")]
    pub connect_timeout: Duration,
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
            mark: 0x4357,
            zone: None,
            connect_timeout: Duration::from_secs(5),
            eject_base: Duration::from_secs(5),
            eject_max: Duration::from_secs(60),
            plaintext_upstreams: true,
            inbound_mode: InboundMode::Permissive,
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

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            controller: None,
            address: None,
            identity: IdentityConfig::default(),
            dataplane: DataplaneConfig::default(),
            health: crate::health::HealthConfig::default(),
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
        if let Some(c) = &self.controller
            && !c.contains(':')
        {
            errors.push(format!(
                "controller = {c:?}: must be host:port, e.g. \"10.0.0.5:15012\""
            ));
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
        if dp.tunnel_port == 0 {
            errors.push("dataplane.tunnel_port = 0: must be 1..65535 (15008)".into());
        }
        if dp.mark == 0 {
            errors.push("dataplane.mark = 0: must be non-zero (0 is every unmarked socket)".into());
        }
        if dp.connect_timeout.is_zero() {
            errors.push("dataplane.connect_timeout: must be above zero, e.g. \"5s\"".into());
        }
        if dp.eject_base.is_zero() || dp.eject_base > dp.eject_max {
            errors.push(format!(
                "dataplane.eject_base = {}: must be above zero and at most dataplane.eject_max ({})",
                humantime::format_duration(dp.eject_base),
                humantime::format_duration(dp.eject_max)
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }
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
