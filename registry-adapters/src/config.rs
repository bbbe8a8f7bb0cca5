//! Source definitions as they appear in the controller's TOML config (`[sources]`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `sources` table of the controller config: several sources of each kind.
///
/// ```toml
/// [[sources.consul]]
/// name = "consul-dc1"
/// address = "http://127.0.0.1:8500"
/// datacenter = "dc1"
/// token_file = "/etc/causeway/consul.token"
/// namespace = "default"
///
/// [[sources.eureka]]
/// name = "eureka"
/// url = "http://eureka.internal:8761/eureka"
/// namespace = "default"
///
/// [[sources.file]]
/// name = "external"
/// path = "/etc/causeway/external-services.toml"
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesConfig {
    /// Consul catalogs, read with blocking queries.
    #[serde(default)]
    pub consul: Vec<ConsulSourceConfig>,
    /// Eureka servers, read with full and delta fetches.
    #[serde(default)]
    pub eureka: Vec<EurekaSourceConfig>,
    /// Kubernetes clusters, read with list + watch on Services and EndpointSlices.
    #[serde(default)]
    pub kubernetes: Vec<KubernetesSourceConfig>,
    /// TOML files of external services, reloaded when they change.
    #[serde(default)]
    pub file: Vec<FileSourceConfig>,
}

/// One Consul source (`[[sources.consul]]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulSourceConfig {
    /// Unique name of this source across all sources (shown as each endpoint's `source`).
    pub name: String,
    /// Base URL of a Consul agent or server, `http://host:8500` or `https://host:8501`.
    pub address: String,
    /// Datacenter to read (`?dc=`); the agent's own datacenter when absent.
    #[serde(default)]
    pub datacenter: Option<String>,
    /// File holding the ACL token sent as `X-Consul-Token` (read at start; trailing whitespace trimmed).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Mesh namespace its services land in; when absent, the Consul namespace if the
    /// catalog reports one (Enterprise), else `default`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Consul Enterprise namespace to read (`?ns=`); all of the token's when absent.
    #[serde(default)]
    pub consul_namespace: Option<String>,
    /// Consul Enterprise admin partition to read (`?partition=`).
    #[serde(default)]
    pub partition: Option<String>,
    /// PEM file of the CA that signed Consul's HTTPS certificate (added to the system roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How long Consul may hold a blocking query (`?wait=`, at most 10m); default "5m".
    /// A Consul that does not answer is reported stale after `wait + wait/16 + request_timeout`.
    #[serde(
        default,
        with = "causeway_api::duration::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub wait: Option<Duration>,
    /// Time allowed for a request beyond the blocking wait; default "10s".
    #[serde(
        default,
        with = "causeway_api::duration::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub request_timeout: Option<Duration>,
    /// Least time between two requests of one watch; default "200ms".
    #[serde(
        default,
        with = "causeway_api::duration::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_interval: Option<Duration>,
    /// Retry delay after the first failure (HTTP error, bad body, timeout); it doubles
    /// with every further failure up to `retry_max`, each delay drawn at random below
    /// it (full jitter); default "500ms".
    #[serde(
        default,
        with = "causeway_api::duration::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_initial: Option<Duration>,
    /// Longest retry delay; default "30s".
    #[serde(
        default,
        with = "causeway_api::duration::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_max: Option<Duration>,
    /// The service or node `Meta` key holding an endpoint's zone (the datacenter is its
    /// region); default "zone". Service meta wins over node meta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_meta_key: Option<String>,
}

/// One Eureka source (`[[sources.eureka]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EurekaSourceConfig {
    /// Unique name of this source across all sources.
    pub name: String,
    /// Base URL including the path: `http://host:8761/eureka` (Spring Cloud) or
    /// `http://host:8080/eureka/v2` (Netflix).
    pub url: String,
    /// Mesh namespace its applications land in (default `default`).
    #[serde(default)]
    pub namespace: Option<String>,
}

/// One Kubernetes cluster (`[[sources.kubernetes]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSourceConfig {
    /// Unique name of this source across all sources.
    pub name: String,
    /// Path of a kubeconfig file; in-cluster configuration when absent.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
}

/// One file of external services (`[[sources.file]]`); see [`crate::file`] for its format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// Unique name of this source across all sources.
    pub name: String,
    /// Path of the TOML file.
    pub path: PathBuf,
}

/// Every problem found in a `sources` table, reported at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid [sources] configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigErrors {
    /// One line per problem, each naming the field, the value and the fix.
    pub problems: Vec<String>,
}

impl SourcesConfig {
    /// Checks rules across fields: unique names, URLs with a scheme and host, namespaces
    /// that are DNS labels. Reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut problems = Vec::new();
        let mut names = BTreeSet::new();
        let mut check_name = |kind: &str, i: usize, name: &str, problems: &mut Vec<String>| {
            if name.trim().is_empty() {
                problems.push(format!(
                    "sources.{kind}[{i}].name is empty; give every source a unique name"
                ));
            } else if !names.insert(name.to_string()) {
                problems.push(format!(
                    "sources.{kind}[{i}].name {name:?} is used by another source; source names must be unique"
                ));
            }
        };
        for (i, c) in self.consul.iter().enumerate() {
            check_name("consul", i, &c.name, &mut problems);
            check_url(
                &format!("sources.consul[{i}].address"),
                &c.address,
                &mut problems,
            );
            check_ns(
                &format!("sources.consul[{i}].namespace"),
                c.namespace.as_deref(),
                &mut problems,
            );
            if c.wait
                .is_some_and(|w| w.is_zero() || w > Duration::from_secs(600))
            {
                problems.push(format!(
                    "sources.consul[{i}].wait = {:?} is outside 1s..10m (Consul caps blocking queries at 10 minutes); use e.g. \"5m\"",
                    c.wait.unwrap_or_default()
                ));
            }
            for (field, value) in [
                ("request_timeout", c.request_timeout),
                ("retry_initial", c.retry_initial),
                ("retry_max", c.retry_max),
            ] {
                if value.is_some_and(|v| v.is_zero()) {
                    problems.push(format!(
                        "sources.consul[{i}].{field} is 0; give a positive duration such as \"1s\", or remove it for the default"
                    ));
                }
            }
            if let (Some(first), Some(max)) = (c.retry_initial, c.retry_max)
                && first > max
            {
                problems.push(format!(
                    "sources.consul[{i}].retry_initial ({first:?}) is longer than retry_max ({max:?}); make retry_max the larger"
                ));
            }
            if c.datacenter.as_deref().is_some_and(|d| d.trim().is_empty()) {
                problems.push(format!("sources.consul[{i}].datacenter is empty; remove it or name a datacenter such as \"dc1\""));
            }
        }
        for (i, e) in self.eureka.iter().enumerate() {
            check_name("eureka", i, &e.name, &mut problems);
            check_url(&format!("sources.eureka[{i}].url"), &e.url, &mut problems);
            check_ns(
                &format!("sources.eureka[{i}].namespace"),
                e.namespace.as_deref(),
                &mut problems,
            );
        }
        for (i, k) in self.kubernetes.iter().enumerate() {
            check_name("kubernetes", i, &k.name, &mut problems);
            if k.kubeconfig
                .as_ref()
                .is_some_and(|p| p.as_os_str().is_empty())
            {
                problems.push(format!(
                    "sources.kubernetes[{i}].kubeconfig is empty; give the path of a kubeconfig file, or remove it to use the in-cluster config"
                ));
            }
        }
        for (i, f) in self.file.iter().enumerate() {
            check_name("file", i, &f.name, &mut problems);
            if f.path.as_os_str().is_empty() {
                problems.push(format!(
                    "sources.file[{i}].path is empty; give the path of a TOML file of services"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors { problems })
        }
    }

    /// Number of sources configured.
    pub fn len(&self) -> usize {
        self.consul.len() + self.eureka.len() + self.kubernetes.len() + self.file.len()
    }

    /// No source configured.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn check_url(field: &str, value: &str, problems: &mut Vec<String>) {
    match reqwest::Url::parse(value) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host_str().is_some() => {}
        Ok(u) => problems.push(format!(
            "{field} = {value:?} has scheme {:?}; use an http:// or https:// URL with a host",
            u.scheme()
        )),
        Err(e) => problems.push(format!(
            "{field} = {value:?} is not a URL ({e}); write it as http://host:port"
        )),
    }
}

fn check_ns(field: &str, value: Option<&str>, problems: &mut Vec<String>) {
    let Some(ns) = value else { return };
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if !ok {
        problems.push(format!(
            "{field} = {ns:?} is not a DNS label; use lower-case letters, digits and '-' (for example \"default\")"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_kinds_and_rejects_unknown_fields() {
        let text = r#"
            [[consul]]
            name = "c1"
            address = "http://127.0.0.1:8500"
            datacenter = "dc1"
            token_file = "/etc/causeway/consul.token"
            namespace = "default"
            [[eureka]]
            name = "e1"
            url = "http://127.0.0.1:8761/eureka"
            [[file]]
            name = "f1"
            path = "/etc/causeway/ext.toml"
        "#;
        let cfg: SourcesConfig = toml::from_str(text).unwrap();
        assert_eq!(cfg.len(), 3);
        cfg.validate().unwrap();
        let bad = "[[consul]]\nname = \"c\"\naddress = \"http://x\"\nadress = \"typo\"\n";
        let err = toml::from_str::<SourcesConfig>(bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("adress"), "{err}");
        assert!(toml::from_str::<SourcesConfig>("[[zookeeper]]\nname = \"z\"\n").is_err());
    }

    #[test]
    fn validate_reports_every_problem() {
        let cfg = SourcesConfig {
            consul: vec![ConsulSourceConfig {
                name: "a".into(),
                address: "127.0.0.1:8500".into(),
                datacenter: None,
                token_file: None,
                namespace: Some("Bad_NS".into()),
                consul_namespace: None,
                partition: None,
                ca_file: None,
                ..Default::default()
            }],
            eureka: vec![EurekaSourceConfig {
                name: "a".into(),
                url: "ftp://host/eureka".into(),
                namespace: None,
            }],
            kubernetes: vec![KubernetesSourceConfig {
                name: "k".into(),
                kubeconfig: Some(PathBuf::new()),
            }],
            file: vec![],
        };
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.problems.len(), 5, "{err}");
        let text = err.to_string();
        assert!(text.contains("\"a\" is used by another source"), "{text}");
        assert!(text.contains("ftp"), "{text}");
        assert!(text.contains("Bad_NS"), "{text}");
        assert!(text.contains("kubeconfig is empty"), "{text}");
    }
}
