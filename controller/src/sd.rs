//! Prometheus HTTP service discovery (`http_sd_configs`): `GET /v1/sd/prometheus` on the
//! metrics listener (`[metrics] listen`, default 127.0.0.1:15014) lists the `/metrics`
//! endpoint of every connected agent that reported one (its `[telemetry]
//! metrics_listen`), one target group per agent, labelled with its `group`, `namespace`,
//! `agent_id` and its group's labels (names made valid for Prometheus: other characters
//! become `_`). One scrape job covers the fleet:
//!
//! ```yaml
//! scrape_configs:
//!   - job_name: causeway-agents
//!     http_sd_configs:
//!       - url: http://CONTROLLER:15014/v1/sd/prometheus
//! ```

use std::collections::BTreeMap;

use serde::Serialize;

/// The path of the discovery document.
pub const PATH: &str = "/v1/sd/prometheus";

/// Where and what a connected agent offers to scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrapeTarget {
    /// `host:port` of its `/metrics` for remote scrapers.
    pub endpoint: String,
    /// Its group.
    pub group: String,
    /// Its group's namespace.
    pub namespace: String,
    /// Its group's labels.
    pub labels: BTreeMap<String, String>,
}

/// One target group of the `http_sd_configs` format.
#[derive(Debug, Serialize)]
struct TargetGroup {
    targets: Vec<String>,
    labels: BTreeMap<String, String>,
}

/// A label name Prometheus accepts (`[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__`,
/// which Prometheus reserves).
fn label_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) || out.is_empty() {
        out.insert(0, '_');
    }
    while out.starts_with("__") {
        out.remove(0);
    }
    out
}

/// The discovery document for `targets` (by agent id).
pub fn document(targets: &BTreeMap<String, ScrapeTarget>) -> String {
    let groups: Vec<TargetGroup> = targets
        .iter()
        .map(|(agent, t)| {
            let mut labels: BTreeMap<String, String> = t
                .labels
                .iter()
                .map(|(k, v)| (label_name(k), v.clone()))
                .collect();
            labels.insert("group".into(), t.group.clone());
            labels.insert("namespace".into(), t.namespace.clone());
            labels.insert("agent_id".into(), agent.clone());
            TargetGroup {
                targets: vec![t.endpoint.clone()],
                labels,
            }
        })
        .collect();
    serde_json::to_string(&groups).unwrap_or_else(|_| "[]".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_prometheus_http_sd() {
        let mut t = BTreeMap::new();
        t.insert(
            "a-1".to_owned(),
            ScrapeTarget {
                endpoint: "10.0.0.7:15090".into(),
                group: "web".into(),
                namespace: "shop".into(),
                labels: [
                    ("app".to_owned(), "web".to_owned()),
                    ("causeway.io/tier".to_owned(), "front".to_owned()),
                    ("group".to_owned(), "not-this".to_owned()),
                ]
                .into(),
            },
        );
        let v: serde_json::Value = serde_json::from_str(&document(&t)).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{
                "targets": ["10.0.0.7:15090"],
                "labels": {
                    "agent_id": "a-1",
                    "app": "web",
                    "causeway_io_tier": "front",
                    "group": "web",
                    "namespace": "shop"
                }
            }])
        );
        assert_eq!(document(&BTreeMap::new()), "[]");
        assert_eq!(label_name("__x"), "_x");
        assert_eq!(label_name("1a"), "_1a");
    }
}
