//! File source: external services (like an Istio ServiceEntry) from a TOML file,
//! re-read when its content changes. Its format is documented for users in
//! docs/configuration.md (checked against these structs by a test).
//!
//! ```toml
//! [[services]]
//! name = "payments"             # service name (normalized to a DNS label)
//! namespace = "external"        # optional, default "default"
//! hosts = ["payments.example.com"]  # optional DNS names of the service
//! ports = { https = 443 }       # named ports of every endpoint
//! labels = { team = "billing" } # optional
//!
//! [[services.endpoints]]        # optional; without endpoints, each host is one
//! address = "203.0.113.10"
//! ports = { https = 8443 }      # optional, overrides the service's ports by name
//! zone = "eu-west-1a"           # optional
//! labels = { canary = "true" }  # optional, added to the service's labels
//! ```
//!
//! A missing, unreadable or invalid file makes the source stale with the error; its
//! last good content stays. Replace the file atomically (write a temporary file, then
//! rename it over this one): a half-written file that happens to parse is taken as is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use causeway_api::registry::{
    Endpoint, Locality, Provenance, ServiceKey, SourceChange, SourceKind, SourceSnapshot,
    normalize_name,
};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::config::FileSourceConfig;
use crate::source::{SourceOptions, SourceUpdate, StateTracker};

/// The file's top level (public so the configuration reference can be checked against it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDoc {
    #[serde(default)]
    services: Vec<FileService>,
}

/// One `[[services]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileService {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    ports: BTreeMap<String, u16>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    endpoints: Vec<FileEndpoint>,
}

/// One `[[services.endpoints]]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEndpoint {
    address: String,
    #[serde(default)]
    ports: BTreeMap<String, u16>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// A file of external services as a source.
#[derive(Clone, Debug)]
pub struct FileSource {
    name: String,
    path: PathBuf,
    opts: SourceOptions,
}

/// Parses a services file into a snapshot; every problem is reported at once.
pub fn parse_services_file(source: &str, text: &str) -> Result<SourceSnapshot, String> {
    let doc: FileDoc = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    let mut snap = SourceSnapshot::default();
    let mut seen: BTreeSet<ServiceKey> = BTreeSet::new();
    for (i, svc) in doc.services.iter().enumerate() {
        let name = match normalize_name(&svc.name) {
            Ok(n) => n,
            Err(e) => {
                problems.push(format!("services[{i}].name: {e}"));
                continue;
            }
        };
        let ns = svc.namespace.clone().unwrap_or_else(|| "default".into());
        if normalize_name(&ns).ok().as_deref() != Some(ns.as_str()) {
            problems.push(format!("services[{i}].namespace {ns:?} is not a DNS label; use lower-case letters, digits and '-'"));
            continue;
        }
        let key = ServiceKey::new(ns, name);
        if !seen.insert(key.clone()) {
            problems.push(format!(
                "services[{i}]: service {key} is defined twice; merge the two entries"
            ));
            continue;
        }
        for (p, n) in &svc.ports {
            if *n == 0 {
                problems.push(format!(
                    "services[{i}].ports.{p} = 0; use a port between 1 and 65535"
                ));
            }
        }
        let targets: Vec<FileEndpoint> = if svc.endpoints.is_empty() {
            svc.hosts
                .iter()
                .map(|h| FileEndpoint {
                    address: h.clone(),
                    ports: BTreeMap::new(),
                    zone: None,
                    labels: BTreeMap::new(),
                })
                .collect()
        } else {
            svc.endpoints.clone()
        };
        if targets.is_empty() {
            problems.push(format!(
                "services[{i}] ({key}) has neither endpoints nor hosts; add one of them"
            ));
            continue;
        }
        let eps = snap.services.entry(key.clone()).or_default();
        for (
            j,
            FileEndpoint {
                address,
                ports,
                zone,
                labels,
            },
        ) in targets.into_iter().enumerate()
        {
            if address.trim().is_empty() {
                problems.push(format!("services[{i}].endpoints[{j}].address is empty"));
                continue;
            }
            let native_id = format!("{key}/{address}");
            let mut ep = Endpoint::new(
                address,
                Provenance {
                    source: source.into(),
                    kind: SourceKind::File,
                    native_id: native_id.clone(),
                    revision: String::new(),
                },
            );
            ep.ports = svc.ports.clone().into();
            ep.ports.extend(ports);
            if ep.ports.is_empty() {
                problems.push(format!(
                    "services[{i}] ({key}): endpoint {j} has no ports; set ports = {{ http = 80 }}"
                ));
            }
            ep.labels = svc.labels.clone().into();
            ep.labels.extend(labels);
            ep.locality = Locality {
                zone,
                ..Locality::default()
            };
            ep.hostnames = svc.hosts.iter().cloned().collect();
            // the revision changes only when this endpoint's own definition does
            let def = format!(
                "{:?}",
                (
                    &ep.address,
                    &ep.ports,
                    &ep.labels,
                    &ep.locality,
                    &ep.hostnames
                )
            );
            ep.provenance.revision = format!("{:016x}", fnv1a(def.as_bytes()));
            eps.insert(native_id, ep);
        }
    }
    if problems.is_empty() {
        Ok(snap)
    } else {
        Err(problems.join("; "))
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl FileSource {
    /// A source for `cfg.path`.
    pub fn new(cfg: &FileSourceConfig, opts: &SourceOptions) -> Self {
        Self {
            name: cfg.name.clone(),
            path: cfg.path.clone(),
            opts: opts.clone(),
        }
    }

    /// Runs until `tx` is closed: re-reads the file every `file_interval`; the first
    /// good read is sent as a full snapshot, later changes as only the services that
    /// changed (so one edited entry costs one service, not the whole file).
    pub async fn run(self, tx: mpsc::Sender<SourceUpdate>) {
        let mut last: Option<Vec<u8>> = None;
        let mut prev: Option<SourceSnapshot> = None;
        let mut tracker = StateTracker::new();
        loop {
            let outcome = match tokio::fs::read(&self.path).await {
                Err(e) => Err(format!(
                    "cannot read {}: {e}; create the file or fix sources.file path",
                    self.path.display()
                )),
                Ok(bytes) if last.as_ref() == Some(&bytes) && !tracker.state.is_stale() => Ok(None),
                Ok(bytes) => match std::str::from_utf8(&bytes) {
                    Err(e) => Err(format!("{}: not UTF-8 ({e})", self.path.display())),
                    Ok(text) => match parse_services_file(&self.name, text) {
                        Ok(snap) => {
                            last = Some(bytes.clone());
                            Ok(Some(snap))
                        }
                        Err(e) => Err(format!("{}: {e}", self.path.display())),
                    },
                },
            };
            let update = match outcome {
                Ok(Some(snap)) => {
                    tracker.ok();
                    let change = match prev.replace(snap.clone()) {
                        None => Some(SourceChange::Full(snap)),
                        Some(old) => {
                            let changed = changed_services(&old, &snap);
                            (!changed.is_empty()).then_some(SourceChange::Services(changed))
                        }
                    };
                    Some(SourceUpdate {
                        source: self.name.clone(),
                        kind: SourceKind::File,
                        change,
                        state: tracker.state.clone(),
                    })
                }
                Ok(None) => None,
                Err(e) => tracker.fail(&e).then(|| SourceUpdate {
                    source: self.name.clone(),
                    kind: SourceKind::File,
                    change: None,
                    state: tracker.state.clone(),
                }),
            };
            if let Some(u) = update
                && tx.send(u).await.is_err()
            {
                return;
            }
            tokio::time::sleep(self.opts.file_interval).await;
        }
    }
}

/// The services that differ between two snapshots; a removed service maps to no endpoints.
fn changed_services(
    old: &SourceSnapshot,
    new: &SourceSnapshot,
) -> BTreeMap<causeway_api::registry::ServiceKey, causeway_api::registry::ServiceEndpoints> {
    let mut out = BTreeMap::new();
    for (key, eps) in &new.services {
        if old.services.get(key) != Some(eps) {
            out.insert(key.clone(), eps.clone());
        }
    }
    for key in old.services.keys() {
        if !new.services.contains_key(key) {
            out.insert(key.clone(), Default::default());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changed_services_are_sent_after_the_first_read() {
        let a = parse_services_file("f", "[[services]]\nname = \"a\"\nports = { http = 80 }\n[[services.endpoints]]\naddress = \"192.0.2.1\"\n[[services]]\nname = \"b\"\nports = { http = 80 }\n[[services.endpoints]]\naddress = \"192.0.2.2\"\n").unwrap();
        let b = parse_services_file("f", "[[services]]\nname = \"a\"\nports = { http = 80 }\n[[services.endpoints]]\naddress = \"192.0.2.9\"\n").unwrap();
        let changed = changed_services(&a, &b);
        assert_eq!(changed.len(), 2, "{changed:?}");
        let names: Vec<&str> = changed.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, vec!["a", "b"]);
        assert!(changed.values().any(|eps| eps.is_empty()), "b is removed");
        assert!(changed_services(&b, &b).is_empty());
    }

    #[test]
    fn parses_services_with_endpoints_and_hosts() {
        let text = r#"
            [[services]]
            name = "Payments"
            namespace = "external"
            hosts = ["payments.example.com"]
            ports = { https = 443 }
            labels = { team = "billing" }
            [[services.endpoints]]
            address = "203.0.113.10"
            zone = "eu-1a"
            [[services.endpoints]]
            address = "203.0.113.11"
            ports = { https = 8443 }

            [[services]]
            name = "geo"
            hosts = ["geo.example.com"]
            ports = { http = 80 }
        "#;
        let snap = parse_services_file("ext", text).unwrap();
        let pay = &snap.services[&ServiceKey::new("external", "payments")];
        assert_eq!(pay.len(), 2);
        let e = &pay["external/payments/203.0.113.11"];
        assert_eq!(e.ports["https"], 8443);
        assert_eq!(e.labels["team"], "billing");
        assert!(e.hostnames.contains("payments.example.com"));
        let geo = &snap.services[&ServiceKey::new("default", "geo")];
        assert_eq!(
            geo["default/geo/geo.example.com"].address,
            "geo.example.com"
        );
    }

    #[test]
    fn reports_every_problem() {
        let text = r#"
            [[services]]
            name = "a"
            ports = { http = 0 }
            hosts = ["a.example.com"]
            [[services]]
            name = "b"
            [[services]]
            name = "a"
            hosts = ["x"]
            ports = { http = 1 }
        "#;
        let err = parse_services_file("ext", text).unwrap_err();
        assert!(err.contains("ports.http = 0"), "{err}");
        assert!(err.contains("neither endpoints nor hosts"), "{err}");
        assert!(err.contains("defined twice"), "{err}");
        assert!(
            parse_services_file("ext", "[[services]]\nname = \"a\"\nhostz = []\n")
                .unwrap_err()
                .contains("hostz")
        );
    }
}
