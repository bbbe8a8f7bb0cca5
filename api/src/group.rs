//! Workload groups: the template a VM joins into (namespace, service account, service,
//! ports, labels, allowed source networks, mTLS mode).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;

use crate::identity::{IdentityError, SpiffeId, TrustDomain, validate_label};

/// Why a workload group or one of its fields was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// A name, namespace, service account or service is not a DNS-1123 label.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A port is not of the form `NAME:PORT` with PORT in 1..=65535.
    #[error("invalid port {0:?}: expected NAME:PORT, for example http:8080")]
    Port(String),
    /// Two ports share one name.
    #[error("port name {0:?} is given twice; each port needs its own name")]
    DuplicatePort(String),
    /// Ports were given without a service to carry them.
    #[error("ports were given but no service: add --service NAME")]
    PortsWithoutService,
    /// A registry source was named without a service to bind.
    #[error(
        "registry source {0:?} was given but no service: add --service NAME (the service's name in the mesh, as the source registers it)"
    )]
    RegistryWithoutService(String),
    /// The mTLS mode is not one of the known modes.
    #[error("invalid mTLS mode {0:?}: expected \"strict\" or \"permissive\"")]
    Mode(String),
}

/// How an agent treats plaintext traffic to the applications of its group.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Plaintext to application ports is accepted beside mesh traffic.
    #[default]
    Permissive,
    /// Plaintext to application ports from off-host is dropped.
    Strict,
}

impl FromStr for MtlsMode {
    type Err = GroupError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "permissive" => Ok(Self::Permissive),
            "strict" => Ok(Self::Strict),
            _ => Err(GroupError::Mode(s.to_owned())),
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Permissive => "permissive",
            Self::Strict => "strict",
        })
    }
}

/// A named port such as `http:8080`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PortSpec {
    /// The port's name (a DNS-1123 label).
    pub name: String,
    /// The port number, 1..=65535.
    pub port: u16,
}

impl FromStr for PortSpec {
    type Err = GroupError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || GroupError::Port(s.to_owned());
        let (name, port) = s.split_once(':').ok_or_else(bad)?;
        validate_label("port name", name).map_err(|_| bad())?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        Ok(Self {
            name: name.to_owned(),
            port,
        })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.port)
    }
}

/// The template a VM joins into.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadGroup {
    /// The group's name, unique in the controller.
    pub name: String,
    /// The mesh namespace of the workloads.
    pub namespace: String,
    /// The service account: the last segment of the SPIFFE ID.
    pub service_account: String,
    /// The service the VM offers (auto-registered by its agent), if any.
    #[serde(default)]
    pub service: Option<String>,
    /// The service's named ports.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// Labels copied onto the VM's endpoint.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Source networks allowed to join into this group (empty: any).
    #[serde(default)]
    pub allowed_cidrs: Vec<IpNet>,
    /// mTLS mode of the group's agents.
    #[serde(default)]
    pub mtls: MtlsMode,
    /// Joining from an existing registry: the name of a configured registry source
    /// (Consul, Eureka…) in which `service` is already registered. An agent of this group
    /// is then bound to the registration at its own address: the merged registry shows
    /// that one endpoint, with the source's provenance and the agent's identity, instead
    /// of a second endpoint registered by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_source: Option<String>,
}

impl WorkloadGroup {
    /// Checks every field, returning all problems at once.
    pub fn validate(&self) -> Result<(), Vec<GroupError>> {
        let mut errors = Vec::new();
        for (what, value) in [
            ("group name", &self.name),
            ("namespace", &self.namespace),
            ("service account", &self.service_account),
        ] {
            if let Err(e) = validate_label(what, value) {
                errors.push(e.into());
            }
        }
        if let Some(service) = &self.service {
            if let Err(e) = validate_label("service", service) {
                errors.push(e.into());
            }
        } else if !self.ports.is_empty() {
            errors.push(GroupError::PortsWithoutService);
        }
        if let Some(source) = &self.registry_source {
            if let Err(e) = validate_label("registry source", source) {
                errors.push(e.into());
            }
            if self.service.is_none() {
                errors.push(GroupError::RegistryWithoutService(source.clone()));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.ports {
            if !seen.insert(p.name.as_str()) {
                errors.push(GroupError::DuplicatePort(p.name.clone()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The SPIFFE ID that agents of this group receive.
    pub fn spiffe_id(&self, td: &TrustDomain) -> Result<SpiffeId, IdentityError> {
        SpiffeId::new(td.clone(), &self.namespace, &self.service_account)
    }

    /// Whether an agent at `addr` may join into this group.
    pub fn allows_source(&self, addr: std::net::IpAddr) -> bool {
        self.allowed_cidrs.is_empty() || self.allowed_cidrs.iter().any(|n| n.contains(&addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group() -> WorkloadGroup {
        WorkloadGroup {
            name: "web".into(),
            namespace: "default".into(),
            service_account: "web".into(),
            service: Some("web".into()),
            ports: vec!["http:8080".parse().unwrap()],
            labels: BTreeMap::new(),
            allowed_cidrs: vec![],
            mtls: MtlsMode::Permissive,
            registry_source: None,
        }
    }

    #[test]
    fn ports_parse() {
        let p: PortSpec = "http:8080".parse().unwrap();
        assert_eq!((p.name.as_str(), p.port), ("http", 8080));
        for bad in ["http", "http:0", "http:65536", ":80", "HTTP:80", "http:x"] {
            assert!(bad.parse::<PortSpec>().is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn validation_reports_every_problem() {
        assert!(group().validate().is_ok());
        let mut g = group();
        g.namespace = "Bad NS".into();
        g.service_account = "".into();
        g.ports.push("http:9090".parse().unwrap());
        let errors = g.validate().unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        let mut g = group();
        g.service = None;
        assert_eq!(
            g.validate().unwrap_err(),
            vec![GroupError::PortsWithoutService]
        );
    }

    #[test]
    fn registry_source_needs_a_service_and_a_label() {
        let mut g = group();
        g.registry_source = Some("consul-dc1".into());
        assert!(g.validate().is_ok());
        g.service = None;
        g.ports.clear();
        assert_eq!(
            g.validate().unwrap_err(),
            vec![GroupError::RegistryWithoutService("consul-dc1".into())]
        );
        let mut g = group();
        g.registry_source = Some("Consul DC1".into());
        assert!(g.validate().is_err());
        // stored groups from before the field still load
        let old = r#"{"name":"a","namespace":"b","service_account":"c"}"#;
        let g: WorkloadGroup = serde_json::from_str(old).unwrap();
        assert_eq!(g.registry_source, None);
    }

    #[test]
    fn source_restriction() {
        let mut g = group();
        assert!(g.allows_source("192.0.2.1".parse().unwrap()));
        g.allowed_cidrs = vec!["10.1.0.0/16".parse().unwrap()];
        assert!(g.allows_source("10.1.2.3".parse().unwrap()));
        assert!(!g.allows_source("10.2.0.1".parse().unwrap()));
    }

    #[test]
    fn mode_parse() {
        assert_eq!("STRICT".parse::<MtlsMode>().unwrap(), MtlsMode::Strict);
        assert!("off".parse::<MtlsMode>().is_err());
    }
}
