//! A fake Eureka server (Netflix `/eureka/v2` and Spring Cloud `/eureka` base paths),
//! seeded from `fixtures/eureka`.
//!
//! Reads answer JSON when the request accepts `application/json`, else XML (as a live
//! server does by default; `py-eureka-client` parses XML). Instances are kept as the JSON
//! the fixtures or registrations gave, so wire quirks (string numbers, `{"$":8080,
//! "@enabled":"true"}` ports, EmptyMap metadata) are replayed as they came.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};

use crate::fixtures::read_fixture;
use crate::http::{Common, Fault, RecordedRequest, lock, plain, serve};

/// A simple instance for [`FakeEureka::register`].
#[derive(Clone, Debug)]
pub struct EurekaInstance {
    /// Application name (upper case by Eureka convention).
    pub app: String,
    /// Instance id.
    pub instance_id: String,
    /// IP address.
    pub ip: String,
    /// Plain port (enabled).
    pub port: u16,
    /// Status: UP, DOWN, STARTING, OUT_OF_SERVICE, UNKNOWN.
    pub status: String,
    /// vipAddress.
    pub vip: String,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
}

impl EurekaInstance {
    /// An UP instance with vipAddress = lower-case app.
    pub fn new(app: &str, instance_id: &str, ip: &str, port: u16) -> Self {
        Self {
            app: app.to_uppercase(),
            instance_id: instance_id.into(),
            ip: ip.into(),
            port,
            status: "UP".into(),
            vip: app.to_lowercase(),
            metadata: BTreeMap::new(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "instanceId": self.instance_id, "hostName": self.ip, "app": self.app, "ipAddr": self.ip,
            "status": self.status, "overriddenStatus": "UNKNOWN",
            "port": {"$": self.port, "@enabled": "true"}, "securePort": {"$": 443, "@enabled": "false"},
            "countryId": 1,
            "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
            "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 90, "registrationTimestamp": 0,
                          "lastRenewalTimestamp": 0, "evictionTimestamp": 0, "serviceUpTimestamp": 0},
            "metadata": if self.metadata.is_empty() { json!({"@class": "java.util.Collections$EmptyMap"}) } else { json!(self.metadata) },
            "vipAddress": self.vip, "secureVipAddress": self.vip,
            "isCoordinatingDiscoveryServer": "false",
            "lastUpdatedTimestamp": "1700000000000", "lastDirtyTimestamp": "1700000000000"
        })
    }
}

struct Data {
    apps: BTreeMap<String, BTreeMap<String, Value>>,
    version: u64,
    /// Recently changed instances (with actionType), as Eureka's recentlyChangedQueue.
    queue: Vec<Value>,
    compact_singletons: bool,
    dirty: u64,
}

impl Data {
    fn hashcode(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for inst in self.apps.values().flat_map(BTreeMap::values) {
            *counts
                .entry(inst["status"].as_str().unwrap_or("UNKNOWN").to_string())
                .or_default() += 1;
        }
        counts.iter().map(|(s, c)| format!("{s}_{c}_")).collect()
    }

    fn put(&mut self, app: &str, mut inst: Value, action: &str) {
        self.version += 1;
        self.dirty += 1;
        let id = instance_id(&inst);
        inst["actionType"] = json!(action);
        inst["lastDirtyTimestamp"] = json!((1_700_000_000_000u64 + self.dirty).to_string());
        self.apps
            .entry(app.to_string())
            .or_default()
            .insert(id, inst.clone());
        self.queue.push(inst);
    }

    fn delete(&mut self, app: &str, id: &str) -> bool {
        let Some(instances) = self.apps.get_mut(app) else {
            return false;
        };
        let Some(mut inst) = instances.remove(id) else {
            return false;
        };
        if instances.is_empty() {
            self.apps.remove(app);
        }
        self.version += 1;
        inst["actionType"] = json!("DELETED");
        self.queue.push(inst);
        true
    }

    fn set_status(&mut self, app: &str, id: &str, status: &str) -> bool {
        let Some(mut inst) = self.apps.get(app).and_then(|a| a.get(id)).cloned() else {
            return false;
        };
        inst["status"] = json!(status);
        self.put(app, inst, "MODIFIED");
        true
    }

    fn apps_json(&self, apps: Vec<(String, Vec<Value>)>, hashcode: String) -> Value {
        let compact = self.compact_singletons;
        let list: Vec<Value> = apps
            .into_iter()
            .map(|(name, instances)| {
                let inst = if compact && instances.len() == 1 {
                    instances[0].clone()
                } else {
                    json!(instances)
                };
                json!({"name": name, "instance": inst})
            })
            .collect();
        let application = if compact && list.len() == 1 {
            list[0].clone()
        } else {
            json!(list)
        };
        json!({"applications": {"versions__delta": self.version.to_string(), "apps__hashcode": hashcode, "application": application}})
    }

    fn full(&self) -> Value {
        let apps = self
            .apps
            .iter()
            .map(|(n, i)| (n.clone(), i.values().cloned().collect()))
            .collect();
        self.apps_json(apps, self.hashcode())
    }

    fn delta(&self, wrong_hash: bool) -> Value {
        let mut apps: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for inst in &self.queue {
            apps.entry(inst["app"].as_str().unwrap_or_default().to_string())
                .or_default()
                .push(inst.clone());
        }
        let hash = if wrong_hash {
            "UP_999_".to_string()
        } else {
            self.hashcode()
        };
        self.apps_json(apps.into_iter().collect(), hash)
    }
}

fn instance_id(inst: &Value) -> String {
    inst["instanceId"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "{}:{}",
                inst["hostName"].as_str().unwrap_or(""),
                inst["app"].as_str().unwrap_or("")
            )
        })
}

struct Inner {
    common: Common,
    data: Mutex<Data>,
}

/// A fake Eureka server on `127.0.0.1:<random>`, serving both `/eureka` (Spring Cloud)
/// and `/eureka/v2` (Netflix). Dropping it stops the server.
pub struct FakeEureka {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeEureka {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeEureka {
    /// Starts a fake seeded with `FOO` (legacy codec, string fields, EmptyMap metadata)
    /// and `DISCOVERABLECLIENT` (Jackson codec) from the fixtures.
    pub async fn start() -> std::io::Result<Self> {
        let mut data = Self::empty_data();
        let legacy: Value = serde_json::from_str(&read_fixture(
            "eureka/apps-full-legacy-codec-string-fields.json",
        ))
        .expect("fixture apps-full-legacy-codec-string-fields.json is JSON");
        let single: Value = serde_json::from_str(&read_fixture("eureka/application-single.json"))
            .expect("fixture application-single.json is JSON");
        for app in legacy["applications"]["application"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for inst in app["instance"].as_array().into_iter().flatten() {
                data.seed(inst.clone());
            }
        }
        for inst in single["application"]["instance"]
            .as_array()
            .into_iter()
            .flatten()
        {
            data.seed(inst.clone());
        }
        Self::serve(data).await
    }

    /// Starts an empty fake.
    pub async fn start_empty() -> std::io::Result<Self> {
        Self::serve(Self::empty_data()).await
    }

    fn empty_data() -> Data {
        Data {
            apps: BTreeMap::new(),
            version: 1,
            queue: Vec::new(),
            compact_singletons: false,
            dirty: 0,
        }
    }

    async fn serve(data: Data) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            common: Common::default(),
            data: Mutex::new(data),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let (addr, task) = serve(app).await?;
        Ok(Self { addr, inner, task })
    }

    /// Spring Cloud base URL: `http://127.0.0.1:<port>/eureka`.
    pub fn url(&self) -> String {
        format!("http://{}/eureka", self.addr)
    }

    /// Netflix base URL: `http://127.0.0.1:<port>/eureka/v2`.
    pub fn url_v2(&self) -> String {
        format!("http://{}/eureka/v2", self.addr)
    }

    /// Registers (or replaces) an instance; it appears in the next delta as ADDED.
    pub fn register(&self, inst: &EurekaInstance) {
        lock(&self.inner.data).put(&inst.app, inst.to_json(), "ADDED");
    }

    /// Registers an instance without recording it in the recent-changes queue (as when
    /// a client misses a delta): only `apps__hashcode` reveals it.
    pub fn register_without_delta(&self, inst: &EurekaInstance) {
        let mut d = lock(&self.inner.data);
        d.put(&inst.app, inst.to_json(), "ADDED");
        d.queue.pop();
    }

    /// Registers a raw instance JSON object as given.
    pub fn register_json(&self, inst: Value) {
        let app = inst["app"].as_str().unwrap_or_default().to_uppercase();
        lock(&self.inner.data).put(&app, inst, "ADDED");
    }

    /// Cancels an instance; false if unknown.
    pub fn deregister(&self, app: &str, instance_id: &str) -> bool {
        lock(&self.inner.data).delete(&app.to_uppercase(), instance_id)
    }

    /// Sets an instance's status (UP, DOWN, OUT_OF_SERVICE…); false if unknown.
    pub fn set_status(&self, app: &str, instance_id: &str, status: &str) -> bool {
        lock(&self.inner.data).set_status(&app.to_uppercase(), instance_id, status)
    }

    /// Forgets the recent-changes queue (as after its retention passes): later deltas
    /// miss earlier changes, and only the hashcode tells a client it is out of date.
    pub fn clear_delta_queue(&self) {
        lock(&self.inner.data).queue.clear();
    }

    /// Serve a single application or instance as an object instead of a one-element
    /// array (old XStream-JSON servers do).
    pub fn set_compact_singletons(&self, on: bool) {
        lock(&self.inner.data).compact_singletons = on;
    }

    /// The `apps__hashcode` of the current state.
    pub fn hashcode(&self) -> String {
        lock(&self.inner.data).hashcode()
    }

    /// Injects a fault into every read until [`FakeEureka::clear_fault`].
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

    /// How many full fetches (`GET …/apps`) were served.
    pub fn full_fetches(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| {
                r.method == "GET" && (r.path.ends_with("/apps") || r.path.ends_with("/apps/"))
            })
            .count()
    }
}

impl Data {
    fn seed(&mut self, inst: Value) {
        let app = inst["app"].as_str().unwrap_or_default().to_uppercase();
        let id = instance_id(&inst);
        self.apps.entry(app).or_default().insert(id, inst);
    }
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
    let rest = path
        .strip_prefix("/eureka/v2/")
        .or_else(|| path.strip_prefix("/eureka/"))
        .map(|r| r.trim_end_matches('/'));
    let Some(rest) = rest else {
        return plain(StatusCode::NOT_FOUND, "");
    };
    let segs: Vec<String> = rest.split('/').map(decode).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let json_wanted = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("json"));
    let fault = inner.common.fault();
    match (method.clone(), segs.as_slice()) {
        (Method::GET, ["apps"]) => {
            let v = lock(&inner.data).full();
            read(&inner, v, json_wanted).await
        }
        (Method::GET, ["apps", "delta"]) => {
            let v = lock(&inner.data).delta(fault == Some(Fault::WrongHashcode));
            read(&inner, v, json_wanted).await
        }
        (Method::GET, ["apps", app]) => {
            let instances: Option<Vec<Value>> = lock(&inner.data)
                .apps
                .get(&app.to_uppercase())
                .map(|i| i.values().cloned().collect());
            let Some(instances) = instances else {
                return plain(StatusCode::NOT_FOUND, "");
            };
            let v = json!({"application": {"name": app.to_uppercase(), "instance": instances}});
            read(&inner, v, json_wanted).await
        }
        (Method::GET, ["apps", app, id]) => {
            let inst = lock(&inner.data)
                .apps
                .get(&app.to_uppercase())
                .and_then(|a| a.get(*id))
                .cloned();
            match inst {
                Some(i) => read(&inner, json!({"instance": i}), json_wanted).await,
                None => plain(StatusCode::NOT_FOUND, ""),
            }
        }
        (Method::POST, ["apps", app]) => {
            let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                return plain(
                    StatusCode::BAD_REQUEST,
                    "expected a JSON body {\"instance\":{...}}",
                );
            };
            let inst = v.get("instance").cloned().unwrap_or(v);
            if !inst.is_object() {
                return plain(StatusCode::BAD_REQUEST, "instance must be an object");
            }
            lock(&inner.data).put(&app.to_uppercase(), inst, "ADDED");
            plain(StatusCode::NO_CONTENT, "")
        }
        (Method::DELETE, ["apps", app, id]) => {
            if lock(&inner.data).delete(&app.to_uppercase(), id) {
                plain(StatusCode::OK, "")
            } else {
                plain(StatusCode::NOT_FOUND, "")
            }
        }
        (Method::PUT, ["apps", app, id]) => heartbeat(&inner, app, id, req.param("status")),
        (Method::PUT, ["apps", app, id, "status"]) => {
            let status = req.param("value").unwrap_or_else(|| "UNKNOWN".into());
            if lock(&inner.data).set_status(&app.to_uppercase(), id, &status) {
                plain(StatusCode::OK, "")
            } else {
                plain(StatusCode::NOT_FOUND, "")
            }
        }
        (Method::DELETE, ["apps", app, id, "status"]) => {
            if lock(&inner.data).set_status(&app.to_uppercase(), id, "UP") {
                plain(StatusCode::OK, "")
            } else {
                plain(StatusCode::NOT_FOUND, "")
            }
        }
        (Method::GET, ["instances", id]) => {
            let inst = lock(&inner.data)
                .apps
                .values()
                .find_map(|a| a.get(*id))
                .cloned();
            match inst {
                Some(i) => read(&inner, json!({"instance": i}), json_wanted).await,
                None => plain(StatusCode::NOT_FOUND, ""),
            }
        }
        _ => plain(StatusCode::NOT_FOUND, ""),
    }
}

/// Heartbeat (`PUT apps/APP/ID`): 404 tells the client to register again.
fn heartbeat(inner: &Arc<Inner>, app: &str, id: &str, status: Option<String>) -> Response {
    let mut d = lock(&inner.data);
    let app = app.to_uppercase();
    let Some(current) = d
        .apps
        .get(&app)
        .and_then(|a| a.get(id))
        .map(|i| i["status"].as_str().unwrap_or("").to_string())
    else {
        return plain(StatusCode::NOT_FOUND, "");
    };
    if let Some(status) = status
        && current != status
        && current != "OUT_OF_SERVICE"
    {
        d.set_status(&app, id, &status);
    }
    plain(StatusCode::OK, "")
}

async fn read(inner: &Arc<Inner>, v: Value, json_wanted: bool) -> Response {
    if json_wanted {
        let body = serde_json::to_string(&v).unwrap_or_default();
        inner
            .common
            .respond(
                StatusCode::OK,
                vec![("content-type", "application/json".into())],
                body,
            )
            .await
    } else {
        let mut out = String::new();
        if let Some(obj) = v.as_object() {
            for (k, v) in obj {
                to_xml(k, v, &mut out);
            }
        }
        inner
            .common
            .respond(
                StatusCode::OK,
                vec![("content-type", "application/xml".into())],
                out,
            )
            .await
    }
}

fn decode(seg: &str) -> String {
    let bytes = seg.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        if bytes[i] == b'%'
            && let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// JSON → XStream-style XML: `@x` keys become attributes, `$` the text, arrays repeat the tag.
fn to_xml(tag: &str, v: &Value, out: &mut String) {
    match v {
        Value::Array(items) => {
            for item in items {
                to_xml(tag, item, out);
            }
        }
        Value::Object(map) => {
            out.push('<');
            out.push_str(tag);
            for (k, v) in map.iter().filter(|(k, _)| k.starts_with('@')) {
                out.push_str(&format!(" {}=\"{}\"", &k[1..], escape(&scalar(v))));
            }
            out.push('>');
            if let Some(text) = map.get("$") {
                out.push_str(&escape(&scalar(text)));
            }
            for (k, v) in map.iter().filter(|(k, _)| !k.starts_with('@') && *k != "$") {
                to_xml(k, v, out);
            }
            out.push_str(&format!("</{tag}>"));
        }
        Value::Null => out.push_str(&format!("<{tag}/>")),
        other => out.push_str(&format!("<{tag}>{}</{tag}>", escape(&scalar(other)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashcode_counts_statuses_in_order() {
        let mut d = FakeEureka::empty_data();
        d.put(
            "A",
            EurekaInstance::new("a", "a1", "10.0.0.1", 80).to_json(),
            "ADDED",
        );
        d.put(
            "A",
            EurekaInstance::new("a", "a2", "10.0.0.2", 80).to_json(),
            "ADDED",
        );
        d.set_status("A", "a2", "DOWN");
        assert_eq!(d.hashcode(), "DOWN_1_UP_1_");
    }

    #[test]
    fn xml_uses_attributes_and_text() {
        let mut out = String::new();
        to_xml("port", &json!({"$": 8080, "@enabled": "true"}), &mut out);
        assert_eq!(out, "<port enabled=\"true\">8080</port>");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(decode("host%3Aapp%3A80"), "host:app:80");
        assert_eq!(decode("plain"), "plain");
    }
}
