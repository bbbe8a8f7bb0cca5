//! A fake Kubernetes API server for Services, `discovery.k8s.io/v1` EndpointSlices, Pods
//! and Nodes, seeded from `fixtures/kubernetes` (namespace `demo`: services `web` and `api`,
//! slices `web-abcde` with two ready endpoints and `api-fghij` with one ready and one
//! terminating; pods `web-v1-abcde` (version v1, node-a) and `web-v2-fghij` (v2, node-b);
//! nodes `node-a` and `node-b` with region/zone topology labels). Pods and Nodes are also
//! served as metadata only (`PartialObjectMetadata`, when the client asks for it in
//! `Accept`, as kube-rs's metadata watcher does), as recorded.
//!
//! Lists, gets, watches (replay from a resourceVersion, BOOKMARK events when asked, a
//! 410 `Expired` ERROR event for a resourceVersion older than the compaction point, as
//! recorded), create, replace, merge patch and delete, plus the discovery documents
//! kubectl reads. Plain HTTP.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::fixtures::read_http_fixture;
use crate::http::{Common, Fault, RecordedRequest, lock, serve};

/// The resource kinds the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KubeKind {
    /// core/v1 Service.
    Service,
    /// discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice,
    /// core/v1 Pod.
    Pod,
    /// core/v1 Node (cluster-scoped: its namespace is "").
    Node,
}

impl KubeKind {
    fn kind(self) -> &'static str {
        match self {
            KubeKind::Service => "Service",
            KubeKind::EndpointSlice => "EndpointSlice",
            KubeKind::Pod => "Pod",
            KubeKind::Node => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            KubeKind::Service | KubeKind::Pod | KubeKind::Node => "v1",
            KubeKind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            KubeKind::Service => "services",
            KubeKind::EndpointSlice => "endpointslices",
            KubeKind::Pod => "pods",
            KubeKind::Node => "nodes",
        }
    }

    fn namespaced(self) -> bool {
        self != KubeKind::Node
    }
}

/// The object as metadata only (`PartialObjectMetadata`), as the apiserver answers a client
/// that asks for `as=PartialObjectMetadata` in `Accept`.
fn metadata_only(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]})
}

fn wants_metadata(headers: &HeaderMap) -> bool {
    headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"))
}

struct Event {
    rv: u64,
    kind: KubeKind,
    ty: &'static str,
    object: Value,
}

struct Data {
    rv: u64,
    objects: BTreeMap<(KubeKind, String, String), Value>,
    events: Vec<Event>,
    compacted: u64,
    token: Option<String>,
    /// Paths answered with this status instead (e.g. 403 for an RBAC denial).
    path_status: BTreeMap<String, u16>,
}

impl Data {
    fn put(&mut self, kind: KubeKind, mut obj: Value, ty: &'static str) -> Value {
        self.rv += 1;
        let ns = if kind.namespaced() {
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        obj["kind"] = json!(kind.kind());
        obj["apiVersion"] = json!(kind.api_version());
        if kind.namespaced() {
            obj["metadata"]["namespace"] = json!(ns);
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", self.rv));
        }
        self.objects.insert((kind, ns, name), obj.clone());
        self.events.push(Event {
            rv: self.rv,
            kind,
            ty,
            object: obj.clone(),
        });
        obj
    }

    fn delete(&mut self, kind: KubeKind, ns: &str, name: &str) -> Option<Value> {
        let mut obj = self
            .objects
            .remove(&(kind, ns.to_string(), name.to_string()))?;
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.events.push(Event {
            rv: self.rv,
            kind,
            ty: "DELETED",
            object: obj.clone(),
        });
        Some(obj)
    }
}

struct Inner {
    common: Common,
    data: Mutex<Data>,
    changed: watch::Sender<u64>,
    /// Bumped to end every open watch stream.
    generation: watch::Sender<u64>,
    /// How many watches were answered `410 Expired`.
    expired_sent: std::sync::atomic::AtomicUsize,
}

/// A fake kube-apiserver on `http://127.0.0.1:<random>`. Dropping it stops the server.
pub struct FakeKubernetes {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKubernetes {
    fn drop(&mut self) {
        self.task.abort();
        self.inner.generation.send_modify(|g| *g += 1);
    }
}

fn list_items(rel: &str) -> Vec<Value> {
    let f = read_http_fixture(rel);
    let v: Value =
        serde_json::from_str(&f.body).unwrap_or_else(|e| panic!("fixture {rel} is not JSON: {e}"));
    v["items"].as_array().cloned().unwrap_or_default()
}

impl FakeKubernetes {
    /// Starts a fake seeded with the recorded initial state.
    pub async fn start() -> std::io::Result<Self> {
        let mut data = Data {
            rv: 200,
            objects: BTreeMap::new(),
            events: Vec::new(),
            compacted: 0,
            token: None,
            path_status: BTreeMap::new(),
        };
        for item in list_items("kubernetes/02-services-all-namespaces.http") {
            data.put(KubeKind::Service, item, "ADDED");
        }
        for item in list_items("kubernetes/03-endpointslices-all-namespaces.http") {
            data.put(KubeKind::EndpointSlice, item, "ADDED");
        }
        for item in list_items("kubernetes/13-pods-all-namespaces.http") {
            data.put(KubeKind::Pod, item, "ADDED");
        }
        for item in list_items("kubernetes/13-nodes.http") {
            data.put(KubeKind::Node, item, "ADDED");
        }
        let (changed, _) = watch::channel(data.rv);
        let (generation, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            common: Common::default(),
            data: Mutex::new(data),
            changed,
            generation,
            expired_sent: Default::default(),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let (addr, task) = serve(app).await?;
        Ok(Self { addr, inner, task })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (YAML) for this server with a bearer token.
    pub fn kubeconfig(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: {token}\n",
            self.url()
        )
    }

    /// Creates or replaces an object (`metadata.namespace` defaults to `default`).
    pub fn apply(&self, kind: KubeKind, obj: Value) {
        let exists = {
            let d = lock(&self.inner.data);
            let ns = if kind.namespaced() {
                obj["metadata"]["namespace"].as_str().unwrap_or("default")
            } else {
                ""
            }
            .to_string();
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            d.objects.contains_key(&(kind, ns, name))
        };
        self.mutate(|d| {
            d.put(kind, obj, if exists { "MODIFIED" } else { "ADDED" });
        });
    }

    /// Deletes an object; false if it did not exist.
    pub fn delete(&self, kind: KubeKind, ns: &str, name: &str) -> bool {
        let mut found = false;
        self.mutate(|d| found = d.delete(kind, ns, name).is_some());
        found
    }

    /// The object, if present.
    pub fn get(&self, kind: KubeKind, ns: &str, name: &str) -> Option<Value> {
        lock(&self.inner.data)
            .objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Forgets history up to now (as etcd compaction or an apiserver restart does) and
    /// ends every open watch: a client resuming from an older resourceVersion gets
    /// `410 Expired` and must list again.
    pub fn expire_watches(&self) {
        {
            let mut d = lock(&self.inner.data);
            d.compacted = d.rv + 1;
            d.rv += 1;
        }
        self.inner.generation.send_modify(|g| *g += 1);
    }

    /// How many watches were answered with a `410 Expired` ERROR event.
    pub fn expired_answers(&self) -> usize {
        self.inner
            .expired_sent
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requires `Authorization: Bearer <token>` (401 otherwise).
    pub fn require_token(&self, token: Option<&str>) {
        lock(&self.inner.data).token = token.map(str::to_string);
    }

    /// Injects a fault into every read until cleared; also ends open watches.
    pub fn set_fault(&self, fault: Fault) {
        *lock(&self.inner.common.fault) = Some(fault);
        self.inner.generation.send_modify(|g| *g += 1);
    }

    /// Answers every request for `path` with `code` (403: the RBAC denial the apiserver
    /// gives a service account without list/watch on that resource).
    pub fn set_path_status(&self, path: &str, code: u16) {
        lock(&self.inner.data)
            .path_status
            .insert(path.to_owned(), code);
    }

    /// Removes the fault.
    pub fn clear_fault(&self) {
        *lock(&self.inner.common.fault) = None;
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.inner.common.requests).clone()
    }

    /// How many list (non-watch GET collection) requests were served for `kind`.
    pub fn lists(&self, kind: KubeKind) -> usize {
        let suffix = format!("/{}", kind.plural());
        self.requests()
            .iter()
            .filter(|r| {
                r.method == "GET" && r.path.ends_with(&suffix) && r.param("watch").is_none()
            })
            .count()
    }

    fn mutate(&self, f: impl FnOnce(&mut Data)) {
        let rv = {
            let mut d = lock(&self.inner.data);
            f(&mut d);
            d.rv
        };
        self.inner.changed.send_replace(rv);
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &body,
    )
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    let mut resp = Response::new(Body::from(serde_json::to_string(body).unwrap_or_default()));
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp
}

fn selector_matches(obj: &Value, selector: Option<&str>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(
        |term| match term.split_once("==").or_else(|| term.split_once('=')) {
            Some((k, v)) => obj["metadata"]["labels"][k].as_str() == Some(v),
            None => !obj["metadata"]["labels"][term].is_null(),
        },
    )
}

fn decode(text: &str) -> String {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (k, v) in p {
                if v.is_null() {
                    if let Some(t) = target.as_object_mut() {
                        t.remove(k);
                    }
                } else {
                    merge_patch(&mut target[k], v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn discovery(port: u16, segs: &[&str]) -> Option<Value> {
    let res = |name: &str, kind: &str, short: &[&str]| {
        json!({"name": name, "singularName": kind.to_lowercase(), "namespaced": true, "kind": kind,
               "verbs": ["create","delete","get","list","patch","update","watch"], "shortNames": short})
    };
    match segs {
        ["api"] => Some(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": format!("127.0.0.1:{port}")}]})),
        ["apis"] => Some(
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{"name": "discovery.k8s.io",
            "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
            "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}}]}),
        ),
        ["api", "v1"] => Some(json!({"kind": "APIResourceList", "groupVersion": "v1",
            "resources": [res("services", "Service", &["svc"]), res("pods", "Pod", &["po"]),
                          {"name": "nodes", "singularName": "node", "namespaced": false, "kind": "Node",
                           "verbs": ["create","delete","get","list","patch","update","watch"], "shortNames": ["no"]}]})),
        ["apis", "discovery.k8s.io", "v1"] => {
            Some(json!({"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": "discovery.k8s.io/v1", "resources": [res("endpointslices", "EndpointSlice", &[])]}))
        }
        _ => None,
    }
}

/// `(kind, namespace, name)` of a resource path.
fn route(segs: &[&str]) -> Option<(KubeKind, Option<String>, Option<String>)> {
    let (core, rest) = match segs {
        ["api", "v1", rest @ ..] => (true, rest),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => (false, rest),
        _ => return None,
    };
    let kind_of = |plural: &str| {
        let kinds: &[KubeKind] = if core {
            &[KubeKind::Service, KubeKind::Pod, KubeKind::Node]
        } else {
            &[KubeKind::EndpointSlice]
        };
        kinds.iter().copied().find(|k| k.plural() == plural)
    };
    match rest {
        [p] => Some((kind_of(p)?, None, None)),
        [p, name] => {
            let kind = kind_of(p).filter(|k| !k.namespaced())?;
            Some((kind, None, Some(name.to_string())))
        }
        ["namespaces", ns, p] => {
            let kind = kind_of(p).filter(|k| k.namespaced())?;
            Some((kind, Some(ns.to_string()), None))
        }
        ["namespaces", ns, p, name] => {
            let kind = kind_of(p).filter(|k| k.namespaced())?;
            Some((kind, Some(ns.to_string()), Some(name.to_string())))
        }
        _ => None,
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
    let param = |n: &str| req.param(n).map(|v| decode(&v));
    if let Some(token) = lock(&inner.data).token.clone() {
        let given = headers.get("authorization").and_then(|v| v.to_str().ok());
        if given != Some(format!("Bearer {token}").as_str()) {
            return status(401, "Unauthorized", "Unauthorized");
        }
    }
    let denied = lock(&inner.data).path_status.get(&path).copied();
    if let Some(code) = denied {
        let plural = path.rsplit('/').next().unwrap_or("");
        return status(
            code,
            if code == 403 { "Forbidden" } else { "Error" },
            &format!(
                "{plural} is forbidden: User \"system:serviceaccount:causeway:controller\" cannot list resource \"{plural}\" in API group \"\" at the cluster scope"
            ),
        );
    }
    let segs: Vec<&str> = path
        .trim_start_matches('/')
        .trim_end_matches('/')
        .split('/')
        .collect();
    if method == Method::GET {
        if segs == ["version"] {
            let f = read_http_fixture("kubernetes/01-version.http");
            return inner
                .common
                .respond(
                    StatusCode::OK,
                    vec![("content-type", "application/json".into())],
                    f.body,
                )
                .await;
        }
        let port = headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if let Some(doc) = discovery(port, &segs) {
            return json_response(StatusCode::OK, &doc);
        }
    }
    let Some((kind, ns, name)) = route(&segs) else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let meta = wants_metadata(&headers);
    let shape = move |o: Value| if meta { metadata_only(&o) } else { o };
    // The key's namespace: the path's (or `default`) for namespaced kinds, "" otherwise.
    let ns_key = |ns: Option<String>| {
        if kind.namespaced() {
            ns.unwrap_or_else(|| "default".into())
        } else {
            String::new()
        }
    };
    match (method, name) {
        (Method::GET, None) => {
            let selector = param("labelSelector");
            let watching = matches!(param("watch").as_deref(), Some("true" | "1"));
            if watching {
                return start_watch(
                    &inner,
                    kind,
                    ns,
                    selector,
                    param("resourceVersion"),
                    WatchOpts {
                        bookmarks: param("allowWatchBookmarks").as_deref() == Some("true"),
                        timeout: param("timeoutSeconds"),
                        meta,
                    },
                )
                .await;
            }
            let (rv, items) = {
                let d = lock(&inner.data);
                let items: Vec<Value> = d
                    .objects
                    .iter()
                    .filter(|((k, n, _), o)| {
                        *k == kind
                            && ns.as_ref().is_none_or(|ns| ns == n)
                            && selector_matches(o, selector.as_deref())
                    })
                    .map(|(_, o)| shape(o.clone()))
                    .collect();
                (d.rv, items)
            };
            let (list_kind, list_version) = if meta {
                ("PartialObjectMetadataList".to_owned(), "meta.k8s.io/v1")
            } else {
                (format!("{}List", kind.kind()), kind.api_version())
            };
            let list = json!({"kind": list_kind, "apiVersion": list_version,
                              "metadata": {"resourceVersion": rv.to_string()}, "items": items});
            inner
                .common
                .respond(
                    StatusCode::OK,
                    vec![("content-type", "application/json".into())],
                    list.to_string(),
                )
                .await
        }
        (Method::GET, Some(name)) => {
            let obj = lock(&inner.data)
                .objects
                .get(&(kind, ns_key(ns), name.clone()))
                .cloned();
            match obj {
                Some(o) => {
                    inner
                        .common
                        .respond(
                            StatusCode::OK,
                            vec![("content-type", "application/json".into())],
                            shape(o).to_string(),
                        )
                        .await
                }
                None => status(
                    404,
                    "NotFound",
                    &format!("{}s \"{name}\" not found", kind.kind().to_lowercase()),
                ),
            }
        }
        (Method::POST, None) => {
            let Ok(mut obj) = serde_json::from_slice::<Value>(&body) else {
                return status(400, "BadRequest", "the body is not JSON");
            };
            if let Some(ns) = &ns {
                obj["metadata"]["namespace"] = json!(ns);
            }
            let key = (
                kind,
                ns_key(obj["metadata"]["namespace"].as_str().map(str::to_owned)),
                obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
            let created = {
                let mut d = lock(&inner.data);
                if key.2.is_empty() {
                    return status(422, "Invalid", "metadata.name: Required value");
                }
                if d.objects.contains_key(&key) {
                    return status(
                        409,
                        "AlreadyExists",
                        &format!("{} \"{}\" already exists", kind.kind(), key.2),
                    );
                }
                d.put(kind, obj, "ADDED")
            };
            notify(&inner);
            json_response(StatusCode::CREATED, &created)
        }
        (m @ (Method::PUT | Method::PATCH), Some(name)) => {
            let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                return status(400, "BadRequest", "the body is not JSON");
            };
            let key = (kind, ns_key(ns), name.clone());
            let updated = {
                let mut d = lock(&inner.data);
                let Some(mut obj) = d.objects.get(&key).cloned() else {
                    return status(
                        404,
                        "NotFound",
                        &format!("{} \"{name}\" not found", kind.kind()),
                    );
                };
                if m == Method::PUT {
                    obj = patch;
                    if kind.namespaced() {
                        obj["metadata"]["namespace"] = json!(key.1);
                    }
                } else {
                    merge_patch(&mut obj, &patch);
                }
                d.put(kind, obj, "MODIFIED")
            };
            notify(&inner);
            json_response(StatusCode::OK, &updated)
        }
        (Method::DELETE, Some(name)) => {
            let deleted = lock(&inner.data).delete(kind, &ns_key(ns), &name);
            notify(&inner);
            match deleted {
                Some(o) => json_response(StatusCode::OK, &o),
                None => status(
                    404,
                    "NotFound",
                    &format!("{} \"{name}\" not found", kind.kind()),
                ),
            }
        }
        _ => status(405, "MethodNotAllowed", "method not allowed"),
    }
}

fn notify(inner: &Arc<Inner>) {
    let rv = lock(&inner.data).rv;
    inner.changed.send_replace(rv);
}

fn event_json(ty: &str, obj: &Value) -> Bytes {
    let mut line = json!({"type": ty, "object": obj}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// A watch's query options.
struct WatchOpts {
    /// `allowWatchBookmarks=true`.
    bookmarks: bool,
    /// `timeoutSeconds`.
    timeout: Option<String>,
    /// Metadata only (`PartialObjectMetadata`).
    meta: bool,
}

async fn start_watch(
    inner: &Arc<Inner>,
    kind: KubeKind,
    ns: Option<String>,
    selector: Option<String>,
    rv: Option<String>,
    opts: WatchOpts,
) -> Response {
    let WatchOpts {
        bookmarks,
        timeout,
        meta,
    } = opts;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let event_json = move |ty: &str, obj: &Value| {
        if meta && ty != "ERROR" {
            event_json(ty, &metadata_only(obj))
        } else {
            event_json(ty, obj)
        }
    };
    let start: Option<u64> = rv
        .as_deref()
        .filter(|r| !r.is_empty() && *r != "0")
        .and_then(|r| r.parse().ok());
    // an expired resourceVersion is answered 410 before any body fault applies
    let expired = start.is_some_and(|r| r < lock(&inner.data).compacted);
    match inner.common.fault() {
        Some(Fault::ServerError) => return status(500, "InternalError", "injected fault"),
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::TruncatedJson) if !expired => {
            let _ = tx.try_send(Bytes::from_static(
                b"{\"type\":\"ADDED\",\"object\":{\"kind\":\"Endpoint",
            ));
            drop(tx);
            return stream_response(rx);
        }
        Some(Fault::MalformedJson) if !expired => {
            let _ = tx.try_send(Bytes::from_static(b"<html>502 Bad Gateway</html>\n"));
            drop(tx);
            return stream_response(rx);
        }
        _ => {}
    }
    let matches = {
        let ns = ns.clone();
        let selector = selector.clone();
        move |e: &Event| {
            e.kind == kind
                && ns
                    .as_ref()
                    .is_none_or(|n| e.object["metadata"]["namespace"].as_str() == Some(n))
                && selector_matches(&e.object, selector.as_deref())
        }
    };
    let mut first: Vec<Bytes> = Vec::new();
    let mut last_rv;
    {
        let d = lock(&inner.data);
        last_rv = d.rv;
        match start {
            Some(r) if r < d.compacted => {
                inner
                    .expired_sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let obj = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {r} ({})", d.compacted), "reason": "Expired", "code": 410});
                first.push(event_json("ERROR", &obj));
                drop(d);
                let _ = tx.try_send(first.remove(0));
                drop(tx);
                return stream_response(rx);
            }
            Some(r) => {
                for e in d.events.iter().filter(|e| e.rv > r && matches(e)) {
                    first.push(event_json(e.ty, &e.object));
                }
            }
            None => {
                for ((k, n, _), o) in &d.objects {
                    if *k == kind
                        && ns.as_ref().is_none_or(|ns| ns == n)
                        && selector_matches(o, selector.as_deref())
                    {
                        first.push(event_json("ADDED", o));
                    }
                }
            }
        }
        if bookmarks {
            first.push(event_json(
                "BOOKMARK",
                &json!({"kind": kind.kind(), "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": d.rv.to_string()}}),
            ));
        }
    }
    let mut changed = inner.changed.subscribe();
    let mut generation = inner.generation.subscribe();
    generation.mark_unchanged();
    let inner = inner.clone();
    let timeout = timeout
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    tokio::spawn(async move {
        for b in first {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = generation.changed() => return,
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            }
            let batch: Vec<Bytes> = {
                let d = lock(&inner.data);
                let out = d
                    .events
                    .iter()
                    .filter(|e| e.rv > last_rv && matches(e))
                    .map(|e| event_json(e.ty, &e.object))
                    .collect();
                last_rv = d.rv;
                out
            };
            for b in batch {
                if tx.send(b).await.is_err() {
                    return;
                }
            }
        }
    });
    stream_response(rx)
}

fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1]});
        merge_patch(&mut t, &json!({"a": null, "b": {"c": 5}, "e": [2, 3]}));
        assert_eq!(t, json!({"b": {"c": 5, "d": 3}, "e": [2, 3]}));
    }

    #[test]
    fn selectors() {
        let o = json!({"metadata": {"labels": {"kubernetes.io/service-name": "web", "x": "1"}}});
        assert!(selector_matches(&o, Some("kubernetes.io/service-name=web")));
        assert!(selector_matches(
            &o,
            Some("kubernetes.io/service-name==web,x")
        ));
        assert!(!selector_matches(&o, Some("x=2")));
    }
}
