//! Eureka source: `GET {url}/apps` once, then `GET {url}/apps/delta` every
//! `eureka_interval`, checked against `apps__hashcode`; a mismatch means a missed
//! change, and triggers a full fetch (as Netflix's client does).
//!
//! Works with the Netflix (`/eureka/v2`) and Spring Cloud (`/eureka`) base paths — the
//! configured `url` includes it. Asks for JSON and accepts its quirks: a single
//! application or instance given as an object, numbers and booleans as strings, ports as
//! `{"$":8080,"@enabled":"true"}` or as plain numbers, metadata as
//! `{"@class":"java.util.Collections$EmptyMap"}`.
//!
//! Mapping: app `REVIEWS` → service `reviews` in the source's namespace; address
//! `ipAddr` (else `hostName`); ports `http` (`port`, when enabled) and `https`
//! (`securePort`, when enabled); health UP → passing, DOWN/OUT_OF_SERVICE → critical,
//! STARTING/UNKNOWN → unknown (only UP routes); `vipAddress` and `secureVipAddress` kept
//! as hostnames; zone from metadata `zone`, else dataCenterInfo's `availability-zone`;
//! metadata kept and also used as labels (subsets, selectors); native id `instanceId`,
//! revision `lastDirtyTimestamp`.

use std::collections::{BTreeMap, BTreeSet};

use causeway_api::registry::{
    Endpoint, Health, Locality, NamespaceMapping, Provenance, ServiceEndpoints, ServiceKey,
    SourceChange, SourceKind, SourceSnapshot,
};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::config::EurekaSourceConfig;
use crate::source::{
    FetchError, SourceError, SourceOptions, SourceUpdate, StateTracker, get_limited, http_client,
};

/// A Eureka server as a source.
#[derive(Clone, Debug)]
pub struct EurekaSource {
    name: String,
    base: String,
    mapping: NamespaceMapping,
    client: reqwest::Client,
    opts: SourceOptions,
}

/// One instance as read from Eureka.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// Upper-case application name.
    pub app: String,
    /// Instance id.
    pub id: String,
    /// Eureka status (UP, DOWN…).
    pub status: String,
    /// `ADDED`, `MODIFIED`, `DELETED` in deltas.
    pub action: Option<String>,
    /// The endpoint it maps to.
    pub endpoint: Endpoint,
}

/// A parsed `/apps` or `/apps/delta` answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applications {
    /// `apps__hashcode` ("" when absent).
    pub hashcode: String,
    /// Every instance, in document order.
    pub instances: Vec<Instance>,
}

/// Local state: app → instance id → instance.
type Local = BTreeMap<String, BTreeMap<String, Instance>>;

/// Eureka's reconcile hash code: `STATUS_count_` for each status, in status order.
pub fn reconcile_hashcode<'a>(statuses: impl Iterator<Item = &'a str>) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in statuses {
        *counts.entry(s).or_default() += 1;
    }
    counts.iter().map(|(s, c)| format!("{s}_{c}_")).collect()
}

impl EurekaSource {
    /// Checks the config.
    pub fn new(cfg: &EurekaSourceConfig, opts: &SourceOptions) -> Result<Self, SourceError> {
        let url = reqwest::Url::parse(&cfg.url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"));
        if url.is_none() {
            return Err(SourceError::BadUrl {
                source_name: cfg.name.clone(),
                field: "url",
                value: cfg.url.clone(),
            });
        }
        let ns = cfg.namespace.clone().unwrap_or_else(|| "default".into());
        if causeway_api::registry::normalize_name(&ns).ok().as_deref() != Some(ns.as_str()) {
            return Err(SourceError::BadNamespace {
                source_name: cfg.name.clone(),
                value: ns,
            });
        }
        Ok(Self {
            name: cfg.name.clone(),
            base: cfg.url.trim_end_matches('/').to_string(),
            mapping: NamespaceMapping::fixed(ns),
            client: http_client(&cfg.name)?,
            opts: opts.clone(),
        })
    }

    /// Replaces the namespace mapping.
    pub fn with_mapping(mut self, mapping: NamespaceMapping) -> Self {
        self.mapping = mapping;
        self
    }

    async fn fetch(&self, path: &str) -> Result<Applications, FetchError> {
        let url = format!("{}{}", self.base, path);
        let req = self.client.get(&url).header("Accept", "application/json");
        let (_, body) = get_limited(
            req,
            &url,
            self.opts.request_timeout,
            self.opts.max_body_bytes,
        )
        .await?;
        parse_applications(&self.name, &body).map_err(|detail| FetchError::Body { url, detail })
    }

    fn key(&self, app: &str) -> Option<ServiceKey> {
        self.mapping.key(app, None, None).ok()
    }

    fn snapshot(&self, local: &Local) -> SourceSnapshot {
        let mut snap = SourceSnapshot::default();
        for (app, instances) in local {
            if let Some(key) = self.key(app) {
                let eps = snap.services.entry(key).or_default();
                for (id, i) in instances
                    .iter()
                    .filter(|(_, i)| !i.endpoint.address.is_empty())
                {
                    eps.insert(id.clone(), i.endpoint.clone());
                }
            }
        }
        snap
    }

    /// Runs until `tx` is closed.
    pub async fn run(self, tx: mpsc::Sender<SourceUpdate>) {
        let mut local: Local = BTreeMap::new();
        let mut need_full = true;
        let mut tracker = StateTracker::new();
        let mut backoff = self.opts.backoff();
        let send = |change: Option<SourceChange>, tracker: &StateTracker| {
            let update = SourceUpdate {
                source: self.name.clone(),
                kind: SourceKind::Eureka,
                change,
                state: tracker.state.clone(),
            };
            let tx = tx.clone();
            async move { tx.send(update).await.is_ok() }
        };
        loop {
            if need_full {
                match self.fetch("/apps").await {
                    Ok(apps) => {
                        backoff.reset();
                        local.clear();
                        for i in apps.instances {
                            local
                                .entry(i.app.clone())
                                .or_default()
                                .insert(i.id.clone(), i);
                        }
                        need_full = false;
                        tracker.ok();
                        if !send(Some(SourceChange::Full(self.snapshot(&local))), &tracker).await {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(source = %self.name, error = %e, "eureka full fetch failed");
                        if tracker.fail(&e.to_string()) && !send(None, &tracker).await {
                            return;
                        }
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                }
            }
            tokio::time::sleep(self.opts.eureka_interval).await;
            match self.fetch("/apps/delta").await {
                Ok(delta) => {
                    backoff.reset();
                    let changed_apps = apply_delta(&mut local, delta.instances);
                    let ours = reconcile_hashcode(
                        local
                            .values()
                            .flat_map(|a| a.values())
                            .map(|i| i.status.as_str()),
                    );
                    if ours != delta.hashcode {
                        tracing::info!(source = %self.name, ours, theirs = %delta.hashcode, "eureka hashcode mismatch; full fetch");
                        need_full = true;
                        continue;
                    }
                    let state_changed = tracker.ok();
                    let mut changes = BTreeMap::new();
                    for app in changed_apps {
                        let Some(key) = self.key(&app) else { continue };
                        let eps: ServiceEndpoints = local
                            .get(&app)
                            .map(|m| {
                                m.iter()
                                    .filter(|(_, i)| !i.endpoint.address.is_empty())
                                    .map(|(id, i)| (id.clone(), i.endpoint.clone()))
                                    .collect()
                            })
                            .unwrap_or_default();
                        changes.insert(key, eps);
                    }
                    if !changes.is_empty() || state_changed {
                        let change =
                            (!changes.is_empty()).then_some(SourceChange::Services(changes));
                        if !send(change, &tracker).await {
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(source = %self.name, error = %e, "eureka delta fetch failed");
                    if tracker.fail(&e.to_string()) && !send(None, &tracker).await {
                        return;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

/// Applies delta instances; returns the apps whose endpoints changed.
fn apply_delta(local: &mut Local, instances: Vec<Instance>) -> BTreeSet<String> {
    let mut changed = BTreeSet::new();
    for i in instances {
        let app = i.app.clone();
        match i.action.as_deref() {
            Some("DELETED") => {
                if let Some(m) = local.get_mut(&app) {
                    if m.remove(&i.id).is_some() {
                        changed.insert(app.clone());
                    }
                    if m.is_empty() {
                        local.remove(&app);
                    }
                }
            }
            _ => {
                let m = local.entry(app.clone()).or_default();
                let same = m
                    .get(&i.id)
                    .is_some_and(|old| old.endpoint == i.endpoint && old.status == i.status);
                if !same {
                    m.insert(i.id.clone(), i);
                    changed.insert(app);
                }
            }
        }
    }
    changed
}

/// A value or a one-element object given where an array is expected.
fn as_list(v: Option<&Value>) -> Vec<&Value> {
    match v {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(o @ Value::Object(_)) => vec![o],
        _ => Vec::new(),
    }
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn truthy(v: Option<&Value>, default: bool) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => default,
    }
}

/// A port in any of its shapes: `8080`, `"8080"`, `{"$":8080,"@enabled":"true"}`.
/// Returns the number if it is valid and enabled.
fn port(v: Option<&Value>, default_enabled: bool) -> Option<u16> {
    let (num, enabled) = match v? {
        Value::Object(o) => (o.get("$"), truthy(o.get("@enabled"), default_enabled)),
        other => (Some(other), default_enabled),
    };
    let n: u64 = text(num)?.trim().parse().ok()?;
    let n = u16::try_from(n).ok().filter(|p| *p != 0)?;
    enabled.then_some(n)
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(Value::Object(o)) = v {
        for (k, v) in o {
            if k.starts_with('@') {
                continue;
            }
            if let Some(t) = text(Some(v)) {
                out.insert(k.clone(), t);
            }
        }
    }
    out
}

fn dns_names(v: Option<&Value>) -> Vec<String> {
    text(v)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|n| {
            !n.is_empty()
                && n.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_' || b == b':'
                })
        })
        .map(str::to_string)
        .collect()
}

/// Parses an `/apps` or `/apps/delta` JSON body.
pub fn parse_applications(source: &str, body: &[u8]) -> Result<Applications, String> {
    let root: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let apps = root
        .get("applications")
        .filter(|a| a.is_object())
        .ok_or_else(|| {
            "no \"applications\" object; is the url the Eureka base (…/eureka or …/eureka/v2)?"
                .to_string()
        })?;
    let hashcode = text(apps.get("apps__hashcode")).unwrap_or_default();
    let mut instances = Vec::new();
    for app in as_list(apps.get("application")) {
        let app_name = text(app.get("name")).unwrap_or_default();
        for inst in as_list(app.get("instance")) {
            instances.push(parse_instance(source, &app_name, inst)?);
        }
    }
    Ok(Applications {
        hashcode,
        instances,
    })
}

/// An instance without any address is still returned (it counts in the hashcode), but
/// never becomes an endpoint.
fn parse_instance(source: &str, app_name: &str, inst: &Value) -> Result<Instance, String> {
    if !inst.is_object() {
        return Err(format!(
            "application {app_name}: an instance is not an object"
        ));
    }
    let app = text(inst.get("app"))
        .unwrap_or_else(|| app_name.to_string())
        .to_uppercase();
    let host = text(inst.get("hostName")).unwrap_or_default();
    let address = text(inst.get("ipAddr"))
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| host.clone());
    let http = port(inst.get("port"), true);
    let https = port(inst.get("securePort"), false);
    let id = text(inst.get("instanceId"))
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| {
            format!(
                "{host}:{}:{}",
                app.to_lowercase(),
                http.or(https).unwrap_or(0)
            )
        });
    let status = text(inst.get("status"))
        .unwrap_or_else(|| "UNKNOWN".into())
        .to_uppercase();
    let metadata = string_map(inst.get("metadata"));
    let dc_meta = string_map(inst.get("dataCenterInfo").and_then(|d| d.get("metadata")));
    let mut ep = Endpoint::new(
        address,
        Provenance {
            source: source.to_string(),
            kind: SourceKind::Eureka,
            native_id: id.clone(),
            revision: text(inst.get("lastDirtyTimestamp")).unwrap_or_default(),
        },
    );
    if let Some(p) = http {
        ep.ports.insert("http".into(), p);
    }
    if let Some(p) = https {
        ep.ports.insert("https".into(), p);
    }
    ep.health = match status.as_str() {
        "UP" => Health::Passing,
        "DOWN" | "OUT_OF_SERVICE" => Health::Critical,
        _ => Health::Unknown,
    };
    ep.locality = Locality {
        region: dc_meta.get("region").cloned(),
        zone: metadata
            .get("zone")
            .or_else(|| dc_meta.get("availability-zone"))
            .cloned(),
        node: (!host.is_empty()).then_some(host),
    };
    ep.hostnames = dns_names(inst.get("vipAddress"))
        .into_iter()
        .chain(dns_names(inst.get("secureVipAddress")))
        .collect();
    // Labels for subsets and selectors: the instance's metadata (Spring Cloud puts
    // `version`, `zone`, … there).
    ep.labels = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    ep.metadata = metadata.into();
    Ok(Instance {
        app,
        id,
        status,
        action: text(inst.get("actionType")),
        endpoint: ep,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        causeway_fakes::read_fixture_bytes(&format!("eureka/{name}"))
    }

    #[test]
    fn legacy_codec_strings_ports_and_empty_map() {
        let apps =
            parse_applications("e", &fixture("apps-full-legacy-codec-string-fields.json")).unwrap();
        assert_eq!(apps.hashcode, "UP_1_");
        let i = &apps.instances[0];
        assert_eq!(i.app, "FOO");
        assert_eq!(i.id, "localhost:foo");
        assert_eq!(i.endpoint.address, "192.168.56.1");
        assert_eq!(
            i.endpoint.ports,
            BTreeMap::from([("http".to_string(), 8080)]).into(),
            "securePort is disabled"
        );
        assert!(
            i.endpoint.metadata.is_empty(),
            "EmptyMap @class is not metadata"
        );
        assert_eq!(i.endpoint.provenance.revision, "1457714988172");
        assert!(i.endpoint.hostnames.contains("foo"));
        assert!(i.endpoint.healthy());
    }

    #[test]
    fn single_instance_as_object_and_odd_vip() {
        let apps = parse_applications(
            "e",
            &fixture("apps-single-instance-object-numeric-port.json"),
        )
        .unwrap();
        assert_eq!(apps.instances.len(), 1);
        let i = &apps.instances[0];
        assert_eq!(i.app, "TESTENG.METRICSD");
        assert_eq!(
            i.endpoint.ports,
            BTreeMap::from([("http".to_string(), 7101), ("https".to_string(), 7101)]).into()
        );
        assert!(i.endpoint.hostnames.is_empty(), "\"[]\" is not a DNS name");
        assert_eq!(
            i.endpoint.metadata["base-uri"],
            "https://192.168.40.94:7101"
        );
        assert_eq!(
            i.endpoint.labels.get("base-uri").map(String::as_str),
            Some("https://192.168.40.94:7101"),
            "metadata are labels too"
        );
        // no instanceId: host:app:port
        assert_eq!(i.id, "192.168.40.94:7101:testeng.metricsd:7101");
    }

    #[test]
    fn delta_actions_apply() {
        let apps = parse_applications("e", &fixture("apps-delta-added-deleted.json")).unwrap();
        assert_eq!(apps.hashcode, "UP_3_");
        let actions: Vec<_> = apps
            .instances
            .iter()
            .map(|i| i.action.clone().unwrap())
            .collect();
        assert_eq!(actions, vec!["ADDED", "DELETED"]);
        let mut local = Local::new();
        let deleted = apps.instances[1].clone();
        let mut pre = deleted.clone();
        pre.action = None;
        local
            .entry(pre.app.clone())
            .or_default()
            .insert(pre.id.clone(), pre);
        let changed = apply_delta(&mut local, apps.instances);
        assert_eq!(
            changed,
            BTreeSet::from(["DISCOVERABLECLIENT".to_string(), "STATICCLIENT".to_string()])
        );
        assert!(!local.contains_key("STATICCLIENT"));
        let dc = &local["DISCOVERABLECLIENT"]["localhost:discoverableclient:10012"];
        assert_eq!(
            dc.endpoint.ports,
            BTreeMap::from([("https".to_string(), 10012)]).into(),
            "plain port disabled"
        );
    }

    #[test]
    fn status_maps_to_health() {
        let v: Value =
            serde_json::from_slice(&fixture("instance-empty-metadata-emptymap.json")).unwrap();
        let i = parse_instance("e", "MINIMAL", &v["instance"]).unwrap();
        assert_eq!(i.status, "OUT_OF_SERVICE");
        assert_eq!(i.endpoint.health, Health::Critical);
        assert!(!i.endpoint.healthy());
    }

    #[test]
    fn instance_without_address_counts_in_hashcode_but_is_no_endpoint() {
        let body =
            br#"{"applications":{"apps__hashcode":"UP_2_","application":{"name":"A","instance":[
            {"instanceId":"a1","app":"A","ipAddr":"10.0.0.1","status":"UP","port":80},
            {"instanceId":"a2","app":"A","status":"UP"}]}}}"#;
        let apps = parse_applications("e", body).unwrap();
        let mut local = Local::new();
        apply_delta(&mut local, apps.instances);
        let ours = reconcile_hashcode(
            local
                .values()
                .flat_map(|a| a.values())
                .map(|i| i.status.as_str()),
        );
        assert_eq!(ours, apps.hashcode);
        let src = EurekaSource::new(
            &EurekaSourceConfig {
                name: "e".into(),
                url: "http://127.0.0.1:1/eureka".into(),
                namespace: None,
            },
            &SourceOptions::default(),
        )
        .unwrap();
        let snap = src.snapshot(&local);
        assert_eq!(snap.endpoint_count(), 1);
    }

    #[test]
    fn hashcode_matches_eureka() {
        assert_eq!(
            reconcile_hashcode(["UP", "DOWN", "UP"].into_iter()),
            "DOWN_1_UP_2_"
        );
        assert_eq!(reconcile_hashcode(std::iter::empty()), "");
    }

    #[test]
    fn bad_bodies_are_errors() {
        assert!(parse_applications("e", b"{\"applications\":{\"application\":[").is_err());
        assert!(parse_applications("e", b"<html></html>").is_err());
        assert!(parse_applications("e", b"{\"foo\":1}").is_err());
        assert!(
            parse_applications(
                "e",
                b"{\"applications\":{\"application\":[{\"name\":\"A\",\"instance\":[1]}]}}"
            )
            .is_err()
        );
        let empty = parse_applications("e", b"{\"applications\":{\"versions__delta\":\"1\",\"apps__hashcode\":\"\",\"application\":[]}}").unwrap();
        assert!(empty.instances.is_empty());
    }

    #[test]
    fn ports_in_every_shape() {
        assert_eq!(port(Some(&serde_json::json!(8080)), true), Some(8080));
        assert_eq!(port(Some(&serde_json::json!("8080")), true), Some(8080));
        assert_eq!(
            port(
                Some(&serde_json::json!({"$": "8080", "@enabled": true})),
                false
            ),
            Some(8080)
        );
        assert_eq!(
            port(
                Some(&serde_json::json!({"$": 8080, "@enabled": "false"})),
                true
            ),
            None
        );
        assert_eq!(port(Some(&serde_json::json!(70000)), true), None);
    }
}
