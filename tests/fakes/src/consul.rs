//! A fake Consul agent/server (HTTP API v1), seeded from `fixtures/consul`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::fixtures::{read_fixture, read_http_fixture};
use crate::http::{Common, Fault, RecordedRequest, lock, plain, serve};

/// A service registration, as `PUT /v1/agent/service/register` takes it.
#[derive(Clone, Debug)]
pub struct ConsulRegistration {
    /// Service ID (unique on the node).
    pub id: String,
    /// Service name.
    pub name: String,
    /// Address ("" falls back to the node's address in clients).
    pub address: String,
    /// Port.
    pub port: u16,
    /// Tags.
    pub tags: Vec<String>,
    /// Meta.
    pub meta: BTreeMap<String, String>,
    /// Status of its one check (`passing`, `warning`, `critical`), check id `service:<id>`.
    pub check_status: String,
}

impl ConsulRegistration {
    /// A passing service with no tags or meta.
    pub fn new(id: &str, name: &str, address: &str, port: u16) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            address: address.into(),
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            check_status: "passing".into(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "ID": self.id, "Name": self.name, "Tags": self.tags, "Address": self.address,
            "Port": self.port, "Meta": self.meta,
            "Check": {"CheckID": format!("service:{}", self.id), "Name": format!("{} TTL", self.id),
                      "TTL": "10m", "Status": self.check_status}
        })
    }
}

/// A field by name, matched as Consul does: case-insensitively, `_` ignored.
fn field<'a>(obj: &'a Value, name: &str) -> Option<&'a Value> {
    obj.as_object()?
        .iter()
        .find(|(k, _)| k.replace('_', "").eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

struct Svc {
    service: Value,
    checks: Vec<Value>,
}

struct Data {
    index: u64,
    catalog_index: u64,
    service_index: BTreeMap<String, u64>,
    node: Value,
    serf: Value,
    services: BTreeMap<String, Svc>,
    token: Option<String>,
    datacenter: String,
}

impl Data {
    fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    fn names(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        out.insert("consul".into(), Vec::new());
        for s in self.services.values() {
            let name = s.service["Service"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let tags = out.entry(name).or_default();
            for t in s.service["Tags"].as_array().into_iter().flatten() {
                let t = t.as_str().unwrap_or_default().to_string();
                if !tags.contains(&t) {
                    tags.push(t);
                }
            }
        }
        out
    }

    fn health(&self, name: &str, passing_only: bool) -> Vec<Value> {
        self.services
            .values()
            .filter(|s| s.service["Service"] == name)
            .map(|s| {
                let mut checks = vec![self.serf.clone()];
                checks.extend(s.checks.iter().cloned());
                json!({"Node": self.node, "Service": s.service, "Checks": checks})
            })
            .filter(|e| {
                !passing_only
                    || e["Checks"]
                        .as_array()
                        .is_some_and(|c| c.iter().all(|c| c["Status"] == "passing"))
            })
            .collect()
    }

    fn service_idx(&self, name: &str) -> u64 {
        self.service_index
            .get(name)
            .copied()
            .unwrap_or(self.catalog_index)
    }

    fn register(&mut self, body: &Value) -> Result<(), String> {
        // Consul decodes field names case-insensitively and accepts snake_case
        // (py-consul sends "name", "id", "checks")
        let name = field(body, "Name")
            .and_then(Value::as_str)
            .ok_or("missing service Name")?
            .to_string();
        let id = field(body, "ID")
            .and_then(Value::as_str)
            .unwrap_or(&name)
            .to_string();
        let port = field(body, "Port").and_then(Value::as_u64).unwrap_or(0);
        let address = field(body, "Address")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let idx = self.bump();
        let create = self
            .services
            .get(&id)
            .map(|s| s.service["CreateIndex"].clone())
            .unwrap_or(json!(idx));
        let mut tagged = json!({});
        if !address.is_empty() {
            tagged = json!({"lan_ipv4": {"Address": address, "Port": port}, "wan_ipv4": {"Address": address, "Port": port}});
        }
        let service = json!({
            "ID": id, "Service": name, "Tags": field(body, "Tags").cloned().filter(|t| !t.is_null()).unwrap_or(json!([])),
            "Address": address, "TaggedAddresses": tagged,
            "Meta": field(body, "Meta").cloned().filter(|m| !m.is_null()).unwrap_or(json!({})), "Port": port,
            "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": false,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}}, "Connect": {},
            "CreateIndex": create, "ModifyIndex": idx
        });
        let tags = service["Tags"].clone();
        let mut defs: Vec<Value> = Vec::new();
        if let Some(c) = field(body, "Check").filter(|c| c.is_object()) {
            defs.push(c.clone());
        }
        if let Some(cs) = field(body, "Checks").and_then(Value::as_array) {
            defs.extend(cs.iter().cloned());
        }
        let several = defs.len() > 1;
        let checks = defs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let check_id = field(c, "CheckID").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| {
                    if several { format!("service:{id}:{}", i + 1) } else { format!("service:{id}") }
                });
                let ty = if field(c, "TTL").is_some() { "ttl" } else if field(c, "HTTP").is_some() { "http" } else if field(c, "TCP").is_some() { "tcp" } else { "" };
                json!({
                    "Node": self.node["Node"], "CheckID": check_id,
                    "Name": field(c, "Name").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| format!("Service '{name}' check")),
                    "Status": field(c, "Status").and_then(Value::as_str).unwrap_or("critical"), "Notes": "", "Output": "",
                    "ServiceID": id, "ServiceName": name, "ServiceTags": tags, "Type": ty,
                    "Interval": "", "Timeout": "", "ExposedPort": 0, "Definition": {},
                    "CreateIndex": idx, "ModifyIndex": idx
                })
            })
            .collect();
        self.services.insert(id, Svc { service, checks });
        self.catalog_index = idx;
        self.service_index.insert(name, idx);
        Ok(())
    }

    fn deregister(&mut self, id: &str) -> bool {
        let Some(s) = self.services.remove(id) else {
            return false;
        };
        let idx = self.bump();
        let name = s.service["Service"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.catalog_index = idx;
        self.service_index.insert(name, idx);
        true
    }

    fn set_check(&mut self, check_id: &str, status: &str, output: &str) -> bool {
        let idx = self.index + 1;
        let mut hit = None;
        for s in self.services.values_mut() {
            for c in &mut s.checks {
                if c["CheckID"] == check_id {
                    if c["Status"] == status && c["Output"] == output {
                        return true;
                    }
                    c["Status"] = json!(status);
                    c["Output"] = json!(output);
                    c["ModifyIndex"] = json!(idx);
                    hit = s.service["Service"].as_str().map(str::to_string);
                }
            }
        }
        match hit {
            Some(name) => {
                self.bump();
                self.service_index.insert(name, idx);
                true
            }
            None => false,
        }
    }
}

struct Inner {
    common: Common,
    data: Mutex<Data>,
    changed: watch::Sender<u64>,
}

/// A fake Consul on `127.0.0.1:<random>`. Dropping it stops the server.
pub struct FakeConsul {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeConsul {
    /// Starts a fake seeded with the recorded services `web` (web-1 passing, web-2
    /// critical) and `api` (api-1), at the recorded index.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(true).await
    }

    /// Starts a fake with only the `consul` service, no registrations.
    pub async fn start_empty() -> std::io::Result<Self> {
        Self::start_with(false).await
    }

    async fn start_with(seed: bool) -> std::io::Result<Self> {
        let web = read_http_fixture("consul/03-health-service-web.http");
        let api = read_http_fixture("consul/03-health-service-api.http");
        let catalog = read_http_fixture("consul/01-catalog-services.http");
        let web_entries: Vec<Value> =
            serde_json::from_str(&web.body).expect("fixture 03-health-service-web is JSON");
        let api_entries: Vec<Value> =
            serde_json::from_str(&api.body).expect("fixture 03-health-service-api is JSON");
        let idx = |f: &crate::HttpFixture| {
            f.header("X-Consul-Index")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
        };
        let node = web_entries[0]["Node"].clone();
        let serf = web_entries[0]["Checks"][0].clone();
        let mut data = Data {
            index: idx(&catalog).max(idx(&web)).max(idx(&api)),
            catalog_index: idx(&catalog),
            service_index: BTreeMap::new(),
            datacenter: node["Datacenter"].as_str().unwrap_or("dc1").to_string(),
            node,
            serf,
            services: BTreeMap::new(),
            token: None,
        };
        if seed {
            for (entries, index) in [(&web_entries, idx(&web)), (&api_entries, idx(&api))] {
                for e in entries {
                    let service = e["Service"].clone();
                    let checks = e["Checks"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|c| c["CheckID"] != "serfHealth")
                        .cloned()
                        .collect();
                    let name = service["Service"].as_str().unwrap_or_default().to_string();
                    let id = service["ID"].as_str().unwrap_or_default().to_string();
                    data.service_index.insert(name, index);
                    data.services.insert(id, Svc { service, checks });
                }
            }
        }
        let (changed, _) = watch::channel(data.index);
        let inner = Arc::new(Inner {
            common: Common::default(),
            data: Mutex::new(data),
            changed,
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let (addr, task) = serve(app).await?;
        Ok(Self { addr, inner, task })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Registers (or replaces) a service, as the HTTP API would.
    pub fn register(&self, reg: &ConsulRegistration) {
        self.mutate(|d| d.register(&reg.to_json()).map(|_| true).unwrap_or(false));
    }

    /// Deregisters a service by ID; false if unknown.
    pub fn deregister(&self, id: &str) -> bool {
        self.mutate(|d| d.deregister(id))
    }

    /// Sets a check's status (`passing`, `warning`, `critical`); false if unknown.
    pub fn set_check_status(&self, check_id: &str, status: &str) -> bool {
        self.mutate(|d| d.set_check(check_id, status, ""))
    }

    /// Moves the index back to `to` (as after a snapshot restore): every index the
    /// fake reports is at most `to` until it changes again.
    pub fn rewind_index(&self, to: u64) {
        self.mutate(|d| {
            d.index = to;
            d.catalog_index = d.catalog_index.min(to);
            for v in d.service_index.values_mut() {
                *v = (*v).min(to);
            }
            true
        });
    }

    /// Requires `X-Consul-Token: token` on every request (403 otherwise).
    pub fn require_token(&self, token: Option<&str>) {
        lock(&self.inner.data).token = token.map(str::to_string);
    }

    /// The current raft index.
    pub fn index(&self) -> u64 {
        lock(&self.inner.data).index
    }

    /// Injects a fault into every read until [`FakeConsul::clear_fault`].
    pub fn set_fault(&self, fault: Fault) {
        *lock(&self.inner.common.fault) = Some(fault);
    }

    /// Removes the fault.
    pub fn clear_fault(&self) {
        *lock(&self.inner.common.fault) = None;
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.inner.common.requests).clone()
    }

    fn mutate(&self, f: impl FnOnce(&mut Data) -> bool) -> bool {
        let (ok, idx) = {
            let mut d = lock(&self.inner.data);
            let ok = f(&mut d);
            (ok, d.index)
        };
        self.inner.changed.send_replace(idx);
        ok
    }
}

fn parse_wait(text: &str) -> Option<Duration> {
    let (num, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" | "" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        _ => None,
    }
}

fn json_headers(index: u64) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "application/json".into()),
        ("vary", "Accept-Encoding".into()),
        ("x-consul-default-acl-policy", "allow".into()),
        ("x-consul-effective-consistency", "leader".into()),
        ("x-consul-index", index.to_string()),
        ("x-consul-knownleader", "true".into()),
        ("x-consul-lastcontact", "0".into()),
        ("x-consul-query-backend", "blocking-query".into()),
    ]
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    inner
        .common
        .record(method.as_str(), &path, &query, &headers);
    let req = RecordedRequest {
        method: method.to_string(),
        path: path.clone(),
        query,
        headers: Vec::new(),
    };
    {
        let d = lock(&inner.data);
        if let Some(token) = &d.token {
            let given = headers.get("x-consul-token").and_then(|v| v.to_str().ok());
            if given != Some(token.as_str()) {
                return plain(StatusCode::FORBIDDEN, "ACL not found");
            }
        }
        if let Some(dc) = req.param("dc")
            && !dc.is_empty()
            && dc != d.datacenter
        {
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter");
        }
    }
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if method == Method::PUT {
        return write(&inner, &segs, &body);
    }
    if method != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    match segs.as_slice() {
        ["v1", "catalog", "services"] => {
            blocking(&inner, &req, |d| {
                (
                    d.catalog_index,
                    serde_json::to_string(&d.names()).unwrap_or_default(),
                )
            })
            .await
        }
        ["v1", "health", "service", name] => {
            let name = name.to_string();
            let passing = req.param("passing").is_some();
            blocking(&inner, &req, move |d| {
                (
                    d.service_idx(&name),
                    serde_json::to_string(&d.health(&name, passing)).unwrap_or_default(),
                )
            })
            .await
        }
        ["v1", "catalog", "service", name] => {
            let name = name.to_string();
            blocking(&inner, &req, move |d| {
                let entries: Vec<Value> = d
                    .health(&name, false)
                    .into_iter()
                    .map(|e| {
                        let (n, s) = (&e["Node"], &e["Service"]);
                        json!({"ID": n["ID"], "Node": n["Node"], "Address": n["Address"], "Datacenter": n["Datacenter"],
                               "TaggedAddresses": n["TaggedAddresses"], "NodeMeta": n["Meta"], "ServiceKind": "",
                               "ServiceID": s["ID"], "ServiceName": s["Service"], "ServiceTags": s["Tags"],
                               "ServiceAddress": s["Address"], "ServiceTaggedAddresses": s["TaggedAddresses"],
                               "ServiceWeights": s["Weights"], "ServiceMeta": s["Meta"], "ServicePort": s["Port"],
                               "ServiceEnableTagOverride": false, "ServiceProxy": s["Proxy"], "ServiceConnect": {},
                               "CreateIndex": s["CreateIndex"], "ModifyIndex": s["ModifyIndex"]})
                    })
                    .collect();
                (d.service_idx(&name), serde_json::to_string(&entries).unwrap_or_default())
            })
            .await
        }
        ["v1", "status", "leader"] => {
            inner
                .common
                .respond(StatusCode::OK, json_headers(0), "\"127.0.0.1:8300\"".into())
                .await
        }
        ["v1", "agent", "self"] => {
            let f = read_http_fixture("consul/10-agent-self.http");
            inner
                .common
                .respond(
                    StatusCode::OK,
                    vec![("content-type", "application/json".into())],
                    f.body,
                )
                .await
        }
        _ => plain(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

/// Serves a blocking query: answers at once when the index moved past `?index=`, else
/// holds until it does or `?wait=` (default 5 min, at most 10 min) passes.
async fn blocking(
    inner: &Arc<Inner>,
    req: &RecordedRequest,
    view: impl Fn(&Data) -> (u64, String),
) -> Response {
    let min_index = match req.param("index") {
        None => 0,
        Some(v) => match v.parse::<u64>() {
            Ok(i) => i,
            Err(_) => return plain(StatusCode::BAD_REQUEST, "Invalid index"),
        },
    };
    let wait = match req.param("wait") {
        None => Duration::from_secs(300),
        Some(w) => match parse_wait(&w) {
            Some(d) => d.min(Duration::from_secs(600)),
            None => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    &format!("Invalid wait time: time: invalid duration \"{w}\""),
                );
            }
        },
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut rx = inner.changed.subscribe();
    loop {
        let (idx, body) = view(&lock(&inner.data));
        let idx = idx.max(1);
        if min_index == 0 || idx > min_index || idx < min_index {
            // Consul answers at once when the index moved, also when it went backwards
            return inner
                .common
                .respond(StatusCode::OK, json_headers(idx), body)
                .await;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return inner.common.respond(StatusCode::OK, json_headers(idx), body).await },
            _ = tokio::time::sleep_until(deadline) => return inner.common.respond(StatusCode::OK, json_headers(idx), body).await,
        }
    }
}

fn write(inner: &Arc<Inner>, segs: &[&str], body: &[u8]) -> Response {
    let result = {
        let mut d = lock(&inner.data);
        match segs {
            ["v1", "agent", "service", "register"] => match serde_json::from_slice::<Value>(body) {
                Ok(v) => d.register(&v).map_err(|e| (StatusCode::BAD_REQUEST, e)),
                Err(e) => Err((
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: {e}"),
                )),
            },
            ["v1", "agent", "service", "deregister", id] => {
                if d.deregister(id) {
                    Ok(())
                } else {
                    Err((
                        StatusCode::NOT_FOUND,
                        format!(
                            "Unknown service ID \"{id}\". Ensure that the service ID is passed, not the service name."
                        ),
                    ))
                }
            }
            [
                "v1",
                "agent",
                "check",
                verb @ ("pass" | "warn" | "fail" | "update"),
                id,
            ] => {
                let id = id.replace("%3A", ":").replace("%3a", ":");
                let (status, output) = match *verb {
                    "pass" => ("passing".to_string(), String::new()),
                    "warn" => ("warning".to_string(), String::new()),
                    "fail" => ("critical".to_string(), String::new()),
                    _ => {
                        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                        (
                            field(&v, "Status")
                                .and_then(Value::as_str)
                                .unwrap_or("critical")
                                .to_string(),
                            field(&v, "Output")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                        )
                    }
                };
                if d.set_check(&id, &status, &output) {
                    Ok(())
                } else {
                    Err((StatusCode::NOT_FOUND, format!("Unknown check ID \"{id}\"")))
                }
            }
            _ => Err((StatusCode::NOT_FOUND, "404 page not found".into())),
        }
    };
    let idx = lock(&inner.data).index;
    inner.changed.send_replace(idx);
    match result {
        Ok(()) => plain(StatusCode::OK, ""),
        Err((s, m)) => plain(s, &m),
    }
}

/// The recorded registration bodies (`web-1.json`…), for tests that replay them.
pub fn registration_fixture(name: &str) -> String {
    read_fixture(&format!("consul/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_parses_like_consul() {
        assert_eq!(parse_wait("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_wait("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_wait("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_wait("xyz"), None);
    }
}
