//! Consul source: blocking queries on `/v1/catalog/services` and
//! `/v1/health/service/<name>`.
//!
//! Mapping of a health entry to an [`Endpoint`]:
//! - address: `Service.Address`, else `Node.Address`;
//! - ports: the service port is named by `Service.Meta["protocol"]` (else `tcp`); Meta
//!   entries `port-<name> = <number>` (consul-k8s style) add named ports;
//! - health: the worst of all checks (node and service; `maintenance` counts as critical);
//! - locality: datacenter as region, `zone` from service or node Meta, node name;
//! - tags and Meta kept; `Meta["external-source"] = "kubernetes"` (consul-k8s sync)
//!   marks the endpoint `synced_from = Kubernetes`, so the merge does not count it twice;
//! - labels (for DestinationRule subsets and policy selectors): node Meta, then tags
//!   (`key=value` → `key: value`, other tags → `tag: ""`), then service Meta, the later
//!   winning on the same key;
//! - provenance: native id `<node>/<service id>`, revision `ModifyIndex`.
//!
//! Blocking queries follow Consul's guidance: the index is reset to 0 when it goes
//! backwards, never used below 1, the HTTP timeout is `wait + wait/16 + request_timeout`,
//! and calls of one watch are at least `min_interval` apart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use causeway_api::registry::{
    Endpoint, Health, Locality, NamespaceMapping, Provenance, ServiceEndpoints, ServiceKey,
    SourceChange, SourceKind, SourceSnapshot,
};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::ConsulSourceConfig;
use crate::source::{
    FetchError, SourceError, SourceOptions, SourceUpdate, StateTracker, get_limited,
    http_client_with_ca,
};

/// A Consul catalog as a source. Create with [`ConsulSource::new`], drive with [`ConsulSource::run`].
#[derive(Clone, Debug)]
pub struct ConsulSource {
    name: String,
    base: String,
    datacenter: Option<String>,
    /// The Meta key of an endpoint's zone (`zone_meta_key`, default `zone`).
    zone_key: String,
    /// `&ns=…&partition=…` for Consul Enterprise, or empty.
    scope: String,
    token: Option<String>,
    mapping: NamespaceMapping,
    client: reqwest::Client,
    opts: SourceOptions,
}

/// The next index to ask for after a response carrying `returned`, when the previous
/// request used `prev`: reset to 0 when it went backwards, never below 1 otherwise.
/// Returns the index and whether it was a reset.
pub fn next_index(prev: u64, returned: u64) -> (u64, bool) {
    if returned < prev {
        (0, true)
    } else {
        (returned.max(1), false)
    }
}

/// The HTTP timeout for a blocking query: above Consul's `wait + wait/16` jitter.
pub fn blocking_timeout(wait: Duration, margin: Duration) -> Duration {
    wait + wait / 16 + margin
}

impl ConsulSource {
    /// Checks the config and reads the token file.
    pub fn new(cfg: &ConsulSourceConfig, opts: &SourceOptions) -> Result<Self, SourceError> {
        let url = reqwest::Url::parse(&cfg.address)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"));
        if url.is_none() {
            return Err(SourceError::BadUrl {
                source_name: cfg.name.clone(),
                field: "address",
                value: cfg.address.clone(),
            });
        }
        let token = match &cfg.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|error| SourceError::TokenFile {
                        source_name: cfg.name.clone(),
                        path: path.display().to_string(),
                        error,
                    })?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let mut mapping =
            NamespaceMapping::fixed(cfg.namespace.clone().unwrap_or_else(|| "default".into()));
        mapping.keep_native_namespace = cfg.namespace.is_none();
        Ok(Self {
            name: cfg.name.clone(),
            base: cfg.address.trim_end_matches('/').to_string(),
            datacenter: cfg.datacenter.clone(),
            zone_key: cfg
                .zone_meta_key
                .clone()
                .filter(|k| !k.is_empty())
                .unwrap_or_else(|| "zone".into()),
            scope: [("ns", &cfg.consul_namespace), ("partition", &cfg.partition)]
                .into_iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| format!("&{k}={v}")))
                .collect(),
            token,
            mapping,
            client: http_client_with_ca(&cfg.name, cfg.ca_file.as_deref())?,
            opts: opts.for_consul(cfg),
        })
    }

    /// Replaces the namespace mapping (for example datacenter rules).
    pub fn with_mapping(mut self, mapping: NamespaceMapping) -> Self {
        self.mapping = mapping;
        self
    }

    /// The source's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// One blocking GET of `path`: returns (X-Consul-Index, body).
    async fn blocking_get(&self, path: &str, index: u64) -> Result<(u64, Vec<u8>), FetchError> {
        let mut url = format!(
            "{}{}?index={}&wait={}ms",
            self.base,
            path,
            index,
            self.opts.consul_wait.as_millis()
        );
        if let Some(dc) = &self.datacenter {
            url.push_str("&dc=");
            url.push_str(dc);
        }
        url.push_str(&self.scope);
        let mut req = self.client.get(&url);
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t);
        }
        let timeout = blocking_timeout(self.opts.consul_wait, self.opts.request_timeout);
        let (headers, body) = get_limited(req, &url, timeout, self.opts.max_body_bytes).await?;
        let index = headers
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or(FetchError::Header {
                url: url.clone(),
                header: "X-Consul-Index",
            })?;
        Ok((index, body))
    }

    /// Runs until `tx` is closed: watches the catalog and every service in it.
    pub async fn run(self, tx: mpsc::Sender<SourceUpdate>) {
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
        let catalog = tokio::spawn(watch(
            self.clone(),
            "/v1/catalog/services".into(),
            None,
            ev_tx.clone(),
        ));
        let mut watchers: HashMap<String, JoinHandle<()>> = HashMap::new();
        let mut data: BTreeMap<String, (ServiceKey, ServiceEndpoints)> = BTreeMap::new();
        let mut failing: BTreeMap<String, String> = BTreeMap::new();
        let mut catalog_names: Option<BTreeSet<String>> = None;
        let mut synced_once = false;
        let mut tracker = StateTracker::new();
        let mut pending: BTreeSet<ServiceKey> = BTreeSet::new();
        while let Some(ev) = ev_rx.recv().await {
            let mut state_changed = false;
            match ev {
                Event::Catalog(names) => {
                    failing.remove(CATALOG);
                    for gone in watchers
                        .keys()
                        .filter(|n| !names.contains(*n))
                        .cloned()
                        .collect::<Vec<_>>()
                    {
                        if let Some(h) = watchers.remove(&gone) {
                            h.abort();
                        }
                        failing.remove(&gone);
                        if let Some((key, _)) = data.remove(&gone) {
                            pending.insert(key);
                        }
                    }
                    let new_names: Vec<String> = names
                        .iter()
                        .filter(|n| !watchers.contains_key(*n))
                        .cloned()
                        .collect();
                    for new in &new_names {
                        let path = format!("/v1/health/service/{new}");
                        watchers.insert(
                            new.clone(),
                            tokio::spawn(watch(
                                self.clone(),
                                path,
                                Some(new.clone()),
                                ev_tx.clone(),
                            )),
                        );
                    }
                    catalog_names = Some(names);
                }
                Event::Health { name, eps } => {
                    if !watchers.contains_key(&name) {
                        continue; // a late answer for a service that left the catalog
                    }
                    failing.remove(&name);
                    let key = match self.mapping.key(
                        &name,
                        eps.values()
                            .next()
                            .and_then(|e| e.metadata.get(NS_META))
                            .map(String::as_str),
                        None,
                    ) {
                        Ok(k) => k,
                        Err(e) => {
                            failing.insert(name.clone(), e.to_string());
                            state_changed |= self.update_state(&mut tracker, &failing);
                            if state_changed && !send(&tx, &self.name, None, &tracker).await {
                                break;
                            }
                            continue;
                        }
                    };
                    let prev = data.insert(name.clone(), (key.clone(), eps));
                    if prev.as_ref().map(|p| &p.1) != data.get(&name).map(|d| &d.1) {
                        pending.insert(key.clone());
                        if let Some((old_key, _)) = prev.filter(|p| p.0 != key) {
                            pending.insert(old_key);
                        }
                    }
                }
                Event::Err { watch, error } => {
                    failing.insert(watch.unwrap_or_else(|| CATALOG.into()), error.to_string());
                }
            }
            state_changed |= self.update_state(&mut tracker, &failing);
            // initial sync: wait until the catalog and every service answered (or failed)
            let complete = catalog_names.as_ref().is_some_and(|names| {
                names
                    .iter()
                    .all(|n| data.contains_key(n) || failing.contains_key(n))
            });
            if !synced_once {
                if !complete {
                    if state_changed
                        && tracker.state.is_stale()
                        && !send(&tx, &self.name, None, &tracker).await
                    {
                        break;
                    }
                    continue;
                }
                synced_once = true;
                pending.clear();
                let mut snap = SourceSnapshot::default();
                for (key, eps) in data.values() {
                    snap.services
                        .entry(key.clone())
                        .or_default()
                        .extend(eps.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                if !send(&tx, &self.name, Some(SourceChange::Full(snap)), &tracker).await {
                    break;
                }
                continue;
            }
            if !pending.is_empty() {
                let mut changed = BTreeMap::new();
                for key in std::mem::take(&mut pending) {
                    let mut eps = ServiceEndpoints::new();
                    for (k, e) in data.values() {
                        if *k == key {
                            eps.extend(e.iter().map(|(a, b)| (a.clone(), b.clone())));
                        }
                    }
                    changed.insert(key, eps);
                }
                if !send(
                    &tx,
                    &self.name,
                    Some(SourceChange::Services(changed)),
                    &tracker,
                )
                .await
                {
                    break;
                }
            } else if state_changed && !send(&tx, &self.name, None, &tracker).await {
                break;
            }
        }
        catalog.abort();
        for (_, h) in watchers {
            h.abort();
        }
    }

    fn update_state(&self, tracker: &mut StateTracker, failing: &BTreeMap<String, String>) -> bool {
        match failing.values().next_back() {
            None => tracker.ok(),
            Some(_) => {
                let text = if failing.len() == 1 {
                    failing.values().next().cloned().unwrap_or_default()
                } else {
                    let first = failing.values().next().cloned().unwrap_or_default();
                    format!("{first} (and {} more failing watches)", failing.len() - 1)
                };
                tracker.fail(&text)
            }
        }
    }
}

const CATALOG: &str = "\u{0}catalog";
const NS_META: &str = "consul-namespace";

/// What a watch reports to the coordinator: a parsed answer, or a failure.
enum Event {
    /// The catalog's service names (without `consul` itself).
    Catalog(BTreeSet<String>),
    /// One service's endpoints.
    Health { name: String, eps: ServiceEndpoints },
    /// A failed request or an answer that does not parse.
    Err {
        watch: Option<String>,
        error: FetchError,
    },
}

async fn send(
    tx: &mpsc::Sender<SourceUpdate>,
    name: &str,
    change: Option<SourceChange>,
    tracker: &StateTracker,
) -> bool {
    tx.send(SourceUpdate {
        source: name.to_string(),
        kind: SourceKind::Consul,
        change,
        state: tracker.state.clone(),
    })
    .await
    .is_ok()
}

/// One blocking-query loop; sends each answer whose index moved, and each error.
async fn watch(
    src: ConsulSource,
    path: String,
    name: Option<String>,
    tx: mpsc::UnboundedSender<Event>,
) {
    let mut index = 0u64;
    let mut backoff = src.opts.backoff();
    let mut last_call: Option<tokio::time::Instant> = None;
    loop {
        if let Some(t) = last_call {
            tokio::time::sleep_until(t + src.opts.min_interval).await;
        }
        last_call = Some(tokio::time::Instant::now());
        match src.blocking_get(&path, index).await {
            Ok((returned, body)) => {
                // Every answer is parsed here, even one with an unchanged index (its body
                // may be broken): an answer that does not parse is a failure like any
                // other and backs off, instead of being asked again at once.
                let event = match &name {
                    None => parse_catalog(&body).map(Event::Catalog),
                    Some(n) => parse_health_with(
                        &src.name,
                        src.datacenter.as_deref(),
                        &src.zone_key,
                        &body,
                    )
                    .map(|eps| Event::Health {
                        name: n.clone(),
                        eps,
                    })
                    .map_err(|e| format!("health/service/{n}: {e}")),
                };
                let failed = event.is_err();
                let event = event.unwrap_or_else(|detail| Event::Err {
                    watch: name.clone(),
                    error: FetchError::Body {
                        url: format!("{}{path}", src.base),
                        detail,
                    },
                });
                if failed {
                    // The index stays: the retry reads the same data again.
                    tracing::warn!(source = %src.name, path, "consul answer unreadable; backing off");
                } else {
                    backoff.reset();
                    let (next, reset) = next_index(index, returned);
                    if reset {
                        tracing::info!(source = %src.name, path, index, returned, "consul index went backwards; resetting to 0");
                    }
                    index = next;
                }
                if tx.send(event).is_err() {
                    return;
                }
                if failed {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
            Err(error) => {
                tracing::warn!(source = %src.name, path, %error, "consul watch failed");
                if tx
                    .send(Event::Err {
                        watch: name.clone(),
                        error,
                    })
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Parses a `/v1/catalog/services` body into service names (without `consul` itself).
fn parse_catalog(body: &[u8]) -> Result<BTreeSet<String>, String> {
    let names: BTreeMap<String, serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| format!("catalog/services: not the expected JSON object: {e}"))?;
    Ok(names.into_keys().filter(|n| n != "consul").collect())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: Node,
    service: Service,
    #[serde(default)]
    checks: Option<Vec<Check>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Node {
    node: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    datacenter: Option<String>,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Service {
    #[serde(rename = "ID")]
    id: String,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    address: String,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    port: i64,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    partition: Option<String>,
    #[serde(default)]
    modify_index: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Check {
    status: String,
}

fn check_health(status: &str) -> Health {
    match status {
        "passing" => Health::Passing,
        "warning" => Health::Warning,
        "critical" | "maintenance" => Health::Critical,
        _ => Health::Unknown,
    }
}

/// Parses a `/v1/health/service/<name>` body into endpoints by native id, for source
/// `source` reading `datacenter` (used as region when a node has none).
pub fn parse_health(
    source: &str,
    datacenter: Option<&str>,
    body: &[u8],
) -> Result<ServiceEndpoints, String> {
    parse_health_with(source, datacenter, "zone", body)
}

/// [`parse_health`] with the zone read from service or node `Meta` key `zone_key`.
pub fn parse_health_with(
    source: &str,
    datacenter: Option<&str>,
    zone_key: &str,
    body: &[u8],
) -> Result<ServiceEndpoints, String> {
    let entries: Vec<HealthEntry> =
        serde_json::from_slice(body).map_err(|e| format!("not the expected JSON array: {e}"))?;
    let mut out = ServiceEndpoints::new();
    for e in entries {
        let address = if e.service.address.is_empty() {
            e.node.address.clone()
        } else {
            e.service.address.clone()
        };
        if address.is_empty() {
            continue;
        }
        let native_id = format!("{}/{}", e.node.node, e.service.id);
        let mut ep = Endpoint::new(
            address,
            Provenance {
                source: source.to_string(),
                kind: SourceKind::Consul,
                native_id: native_id.clone(),
                revision: e.service.modify_index.to_string(),
            },
        );
        let meta = e.service.meta.unwrap_or_default();
        let port_name = meta
            .get("protocol")
            .cloned()
            .unwrap_or_else(|| "tcp".into());
        if let Ok(port) = u16::try_from(e.service.port)
            && port != 0
        {
            ep.ports.insert(port_name, port);
        }
        for (k, v) in &meta {
            if let (Some(name), Ok(port)) = (k.strip_prefix("port-"), v.parse::<u16>()) {
                ep.ports.insert(name.to_string(), port);
            }
        }
        ep.health = e
            .checks
            .unwrap_or_default()
            .iter()
            .map(|c| check_health(&c.status))
            .fold(Health::Passing, Health::worst);
        let node_meta = e.node.meta.unwrap_or_default();
        ep.locality = Locality {
            region: e
                .node
                .datacenter
                .clone()
                .or_else(|| datacenter.map(str::to_string)),
            zone: meta
                .get(zone_key)
                .or_else(|| node_meta.get(zone_key))
                .cloned(),
            node: Some(e.node.node.clone()),
        };
        if meta.get("external-source").map(String::as_str) == Some("kubernetes") {
            ep.synced_from = Some(SourceKind::Kubernetes);
        }
        ep.tags = e.service.tags.unwrap_or_default();
        ep.labels = consul_labels(&node_meta, &meta, &ep.tags);
        ep.metadata = meta.into();
        if let Some(ns) = e.service.namespace.filter(|n| !n.is_empty()) {
            ep.metadata.insert(NS_META.into(), ns);
        }
        if let Some(p) = e.service.partition.filter(|n| !n.is_empty()) {
            ep.metadata.insert("consul-partition".into(), p);
        }
        out.insert(native_id, ep);
    }
    Ok(out)
}

/// Labels of a Consul endpoint, for subsets and policy selectors: node meta, then tags
/// (`key=value` → `key: value`, any other tag → `tag: ""`), then service meta; a later
/// one wins on the same key (the service's own meta is the most specific).
fn consul_labels(
    node_meta: &BTreeMap<String, String>,
    meta: &BTreeMap<String, String>,
    tags: &[String],
) -> causeway_api::registry::SortedMap<String, String> {
    let mut labels: BTreeMap<String, String> = node_meta.clone();
    for tag in tags {
        match tag.split_once('=') {
            Some((k, v)) if !k.is_empty() => labels.insert(k.to_owned(), v.to_owned()),
            _ => labels.insert(tag.clone(), String::new()),
        };
    }
    labels.extend(meta.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_from_node_meta_tags_and_service_meta() {
        let node: BTreeMap<String, String> = [
            ("rack".into(), "r1".into()),
            ("version".into(), "node".into()),
        ]
        .into();
        let meta: BTreeMap<String, String> = [("team".into(), "shop".into())].into();
        let tags = vec!["v1".to_owned(), "version=v2".to_owned(), "=odd".to_owned()];
        let l = consul_labels(&node, &meta, &tags);
        let got: Vec<(&str, &str)> = l.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            got,
            [
                ("=odd", ""),
                ("rack", "r1"),
                ("team", "shop"),
                ("v1", ""),
                ("version", "v2")
            ]
        );
        // Service meta beats a tag with the same key.
        let meta: BTreeMap<String, String> = [("version".into(), "v3".into())].into();
        assert_eq!(
            consul_labels(&node, &meta, &tags)
                .get("version")
                .map(String::as_str),
            Some("v3")
        );
    }

    #[test]
    fn index_resets_when_it_goes_backwards_and_never_uses_zero() {
        assert_eq!(next_index(0, 9), (9, false));
        assert_eq!(next_index(9, 9), (9, false));
        assert_eq!(next_index(9, 12), (12, false));
        assert_eq!(next_index(12, 5), (0, true));
        assert_eq!(next_index(0, 0), (1, false));
    }

    #[test]
    fn timeout_is_above_wait_plus_jitter() {
        let t = blocking_timeout(Duration::from_secs(160), Duration::from_secs(1));
        assert!(t > Duration::from_secs(170));
        assert_eq!(t, Duration::from_secs(171));
    }

    fn recorded(file: &str) -> Vec<u8> {
        let f = causeway_fakes::read_http_fixture(file);
        f.body.into_bytes()
    }

    #[test]
    fn parses_the_recorded_health_answer() {
        let eps = parse_health(
            "consul-dc1",
            None,
            &recorded("consul/03-health-service-web.http"),
        )
        .unwrap();
        assert_eq!(eps.len(), 2);
        let w1 = &eps["realsrv-server/web-1"];
        assert_eq!(w1.address, "127.0.0.1");
        assert_eq!(w1.ports["tcp"], 8080);
        assert_eq!(w1.health, Health::Passing);
        assert_eq!(w1.tags, vec!["v1", "primary"]);
        assert_eq!(
            w1.labels.get("v1").map(String::as_str),
            Some(""),
            "a plain tag is a label"
        );
        assert!(w1.labels.contains_key("primary"));
        assert_eq!(w1.metadata["version"], "1.0");
        assert_eq!(w1.locality.region.as_deref(), Some("dc1"));
        assert_eq!(w1.provenance.revision, "8");
        let w2 = &eps["realsrv-server/web-2"];
        assert_eq!(w2.address, "127.0.0.2");
        assert_eq!(
            w2.health,
            Health::Critical,
            "worst of the checks: web-2's TTL is critical"
        );
        let after = parse_health(
            "consul-dc1",
            None,
            &recorded("consul/07-health-service-web-after.http"),
        )
        .unwrap();
        assert_eq!(after["realsrv-server/web-2"].health, Health::Passing);
        assert!(
            parse_health(
                "consul-dc1",
                None,
                &recorded("consul/09-health-service-api-after-deregister.http")
            )
            .unwrap()
            .is_empty()
        );
    }

    #[test]
    fn the_zone_comes_from_the_configured_meta_key_service_before_node() {
        let body = br#"[{"Node":{"Node":"n1","Address":"10.0.0.7","Datacenter":"dc1","Meta":{"zone":"node-zone","rack-zone":"eu-1b"}},
            "Service":{"ID":"web-x","Service":"web","Tags":null,"Address":"","Meta":{"az":"eu-1a"},"Port":8080,"ModifyIndex":3},
            "Checks":[]}]"#;
        let zone = |key: &str| {
            parse_health_with("consul-dc1", None, key, body).unwrap()["n1/web-x"]
                .locality
                .zone
                .clone()
        };
        assert_eq!(zone("zone").as_deref(), Some("node-zone"));
        assert_eq!(zone("az").as_deref(), Some("eu-1a"));
        assert_eq!(zone("rack-zone").as_deref(), Some("eu-1b"));
        assert_eq!(zone("none"), None);
        let e = &parse_health_with("consul-dc1", None, "az", body).unwrap()["n1/web-x"];
        assert_eq!(e.locality.region.as_deref(), Some("dc1"));
    }

    #[test]
    fn address_falls_back_to_node_and_k8s_sync_is_recognised() {
        let body = br#"[{"Node":{"Node":"n1","Address":"10.0.0.7","Datacenter":"dc1","Meta":null},
            "Service":{"ID":"web-x","Service":"web","Tags":null,"Address":"","Meta":{"external-source":"kubernetes","port-grpc":"9090","protocol":"http"},"Port":8080,"ModifyIndex":3},
            "Checks":[{"Status":"passing"},{"Status":"warning"}]}]"#;
        let eps = parse_health("consul-dc1", None, body).unwrap();
        let e = &eps["n1/web-x"];
        assert_eq!(e.address, "10.0.0.7");
        assert_eq!(e.synced_from, Some(SourceKind::Kubernetes));
        assert_eq!(
            e.ports,
            BTreeMap::from([("grpc".to_string(), 9090), ("http".to_string(), 8080)]).into()
        );
        assert_eq!(e.health, Health::Warning);
    }

    #[test]
    fn malformed_bodies_are_errors() {
        assert!(parse_health("consul-dc1", None, b"[{\"Node\":").is_err());
        assert!(parse_health("consul-dc1", None, b"{}").is_err());
    }
}
