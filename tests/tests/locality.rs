//! Locality load balancing and connection pool limits (retries among them) end to end (issue 21), in network
//! namespaces created by the test: a controller, a client VM in zone `a` and two server VMs
//! of the same service `web` (`http:8080`), one in zone `a` and one in zone `b`. The
//! zones come from the groups' `topology.kubernetes.io/region|zone` labels; the client's
//! agent applies the DestinationRule. Needs root; fails loudly without it.
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway_api::push::MeshState;
use causeway_tests::netns::{Lab, Proc, require_root};
use causeway_tests::{bin, describe, wait_for};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// HTTP/1.1 server, argv[1] = port, argv[2] = its name. `GET /block` answers once the file
/// argv[3] exists; `GET /retry-block/<id>` answers 503 `first try` the first time any
/// server sees `<id>` (a marker file beside argv[3]), then like `/block`; anything else
/// at once. Every 200's body is `<name> <path>`.
const SERVER_PY: &str = r#"
import os, sys, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path.startswith("/retry-block"):
            mark = os.path.join(os.path.dirname(sys.argv[3]), "seen" + self.path.replace("/", "-"))
            try:
                fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY); os.close(fd)
                self.send_response(503); self.send_header("Content-Length", "9"); self.end_headers()
                self.wfile.write(b"first try")
                return
            except FileExistsError:
                pass
        if self.path.startswith("/block") or self.path.startswith("/retry-block"):
            print("blocked %s" % self.path, flush=True)
            while not os.path.exists(sys.argv[3]): time.sleep(0.02)
        body = ("%s %s" % (sys.argv[2], self.path)).encode()
        try:
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass
    def log_message(self, *a): pass
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

/// HTTP/1.1 client: argv[3] requests `GET argv[4]` to argv[1]:argv[2], one keep-alive
/// connection (a new one after an error). Prints counts per `<status> <server name>` and
/// the errors as JSON.
const CLIENT_PY: &str = r#"
import http.client, json, sys
host, port, n, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
counts, errors, c = {}, [], None
for i in range(n):
    if c is None: c = http.client.HTTPConnection(host, port, timeout=30)
    try:
        c.request("GET", path); r = c.getresponse(); body = r.read().decode()
    except Exception as e:
        errors.append(repr(e)); c.close(); c = None; continue
    key = "%d %s" % (r.status, body.split(" ")[0] if r.status == 200 else "-")
    counts[key] = counts.get(key, 0) + 1
print(json.dumps({"counts": counts, "errors": errors}))
"#;

/// Three concurrent `GET /block` (or `GET argv[4]/<i>`) on their own connections to
/// argv[1]:argv[2]. Once one answer (argv[5] answers) arrived, creates the file argv[3]
/// (which releases the server) and waits for the others. Prints each answer: status,
/// `x-causeway-overflow`, body.
const CONCURRENT_PY: &str = r#"
import http.client, json, sys, threading
host, port, release = sys.argv[1], int(sys.argv[2]), sys.argv[3]
prefix = sys.argv[4] if len(sys.argv) > 4 else None
need = int(sys.argv[5]) if len(sys.argv) > 5 else 1
out, lock, first = [], threading.Lock(), threading.Event()
def one(i):
    path = "/block" if prefix is None else "%s/%d" % (prefix, i)
    c = http.client.HTTPConnection(host, port, timeout=60)
    try:
        c.request("GET", path); r = c.getresponse(); body = r.read().decode()
        res = {"status": r.status, "overflow": r.getheader("x-causeway-overflow"), "body": body}
    except Exception as e:
        res = {"error": repr(e)}
    with lock:
        out.append(res)
        if len(out) >= need: first.set()
ts = [threading.Thread(target=one, args=(i,)) for i in range(3)]
for t in ts: t.start()
first.wait(60)
open(release, "w").close()
for t in ts: t.join()
print(json.dumps(out))
"#;

struct Mesh {
    // Field order = drop order: processes before the namespaces they run in.
    servers: Vec<Option<Proc>>,
    procs: Vec<Proc>,
    ctl_admin: String,
    root: PathBuf,
    client_state: PathBuf,
    vip: String,
    lab: Lab,
    _dir: tempfile::TempDir,
}

const REGION: &str = "topology.kubernetes.io/region";
const ZONE: &str = "topology.kubernetes.io/zone";

impl Mesh {
    /// Controller, the client VM (zone a), `web` in zone a (vm1) and zone b (vm2); returns
    /// once the client's agent has both endpoints with their zones.
    fn new() -> Self {
        require_root("the locality tests");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let lab = Lab::new(&["ctl", "vm0", "vm1", "vm2"]);
        let data = root.join("controller");
        let ctl = lab.node("ctl");
        let control = format!("{}:15012", ctl.addr);
        let c = Proc::spawn(
            ctl,
            &root.join("controller.log"),
            bin("causeway-controller"),
            &[
                "--data-dir",
                data.to_str().unwrap(),
                "--admin-listen",
                "127.0.0.1:0",
                "--control-listen",
                &control,
            ],
        );
        let endpoints: Value = wait_for("controller endpoints.json", WAIT, || {
            let text = std::fs::read_to_string(data.join("endpoints.json")).ok()?;
            serde_json::from_str(&text).ok()
        });
        let mut m = Self {
            servers: Vec::new(),
            procs: vec![c],
            ctl_admin: endpoints["admin"].as_str().expect("admin").to_owned(),
            root,
            client_state: PathBuf::new(),
            vip: String::new(),
            lab,
            _dir: dir,
        };
        let group = |m: &Mesh, name: &str, service: &str, port: &str, zone: &str| {
            let (region, zone) = (format!("{REGION}=r1"), format!("{ZONE}={zone}"));
            m.ctl_ok(&[
                "group",
                "create",
                name,
                "--namespace",
                "default",
                "--service-account",
                name,
                "--service",
                service,
                "--port",
                port,
                "--label",
                &region,
                "--label",
                &zone,
            ]);
        };
        group(&m, "client", "client", "tcp:7070", "a");
        group(&m, "web-a", "web", "http:8080", "a");
        group(&m, "web-b", "web", "http:8080", "b");
        let s0 = m.join("vm0", "client");
        for (vm, group) in [("vm1", "web-a"), ("vm2", "web-b")] {
            let state = m.join(vm, group);
            m.start_server(vm);
            m.agent(vm, &state);
        }
        m.agent("vm0", &s0);
        let (a1, a2) = (
            m.lab.node("vm1").addr.to_string(),
            m.lab.node("vm2").addr.to_string(),
        );
        m.vip = wait_for("web's two endpoints with their zones", WAIT, || {
            let s = config(&s0);
            let svc = s.services.get("default/web")?;
            let has = |a: &str, zone: &str| {
                svc.endpoints.values().any(|e| {
                    e.address == a
                        && e.zone.as_deref() == Some(zone)
                        && e.region.as_deref() == Some("r1")
                })
            };
            let rules = std::fs::read_to_string(s0.join("capture.rules")).ok()?;
            (has(&a1, "a") && has(&a2, "b") && rules.contains(&format!("-d {a1}/32 ")))
                .then_some(())?;
            svc.vip.map(|v| v.to_string())
        });
        m.client_state = s0;
        m
    }

    /// Starts `vm`'s server (vm1 is `a`, vm2 is `b`) and waits until it listens.
    fn start_server(&mut self, vm: &str) {
        let i = if vm == "vm1" { 0 } else { 1 };
        let name = ["a", "b"][i];
        let node = self.lab.node(vm).clone();
        let release = self.root.join("release");
        let srv = Proc::spawn(
            &node,
            &self.root.join(format!("{vm}.server.log")),
            "python3",
            &["-c", SERVER_PY, "8080", name, release.to_str().unwrap()],
        );
        while self.servers.len() <= i {
            self.servers.push(None);
        }
        self.servers[i] = Some(srv);
        wait_for("the test server to listen", WAIT, || {
            node.sh("ss -ltn | grep -q ':8080 '")
                .status
                .success()
                .then_some(())
        });
    }

    /// Stops `vm`'s server and waits until nothing listens on its port.
    fn stop_server(&mut self, vm: &str) {
        let i = if vm == "vm1" { 0 } else { 1 };
        drop(self.servers[i].take());
        let node = self.lab.node(vm).clone();
        wait_for("the test server to stop", WAIT, || {
            (!node.sh("ss -ltn | grep -q ':8080 '").status.success()).then_some(())
        });
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        self.lab
            .node("ctl")
            .causewayctl(&self.ctl_admin, &self.root.join("controller"), args)
    }

    fn join(&self, vm: &str, group: &str) -> PathBuf {
        let token = self.ctl_ok(&["token", "create", "--group", group]);
        let state = self.root.join(vm);
        let out = self
            .lab
            .node(vm)
            .cmd(bin("causeway-agent"))
            .args(["join", token.trim(), "--state-dir", state.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "join {vm}: {}", describe(&out));
        state
    }

    fn agent(&mut self, vm: &str, state: &Path) {
        let node = self.lab.node(vm).clone();
        let addr = node.addr.to_string();
        let p = Proc::spawn(
            &node,
            &self.root.join(format!("{vm}.agent.log")),
            bin("causeway-agent"),
            &[
                "run",
                "--state-dir",
                state.to_str().unwrap(),
                "--address",
                &addr,
            ],
        );
        self.procs.push(p);
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("== {}\n{}", p.log.display(), p.log()))
            .collect()
    }

    /// Applies `yaml` and waits until the client's agent holds it (by its content).
    fn apply(&self, name: &str, yaml: &str) {
        let f = self.root.join(format!("{name}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        self.ctl_ok(&["apply", "-f", f.to_str().unwrap()]);
        let v: Value = serde_yaml_ng::from_str(yaml).unwrap();
        let want = serde_json::to_value(causeway_api::route::decode_value(v).unwrap()).unwrap();
        wait_for(&format!("{name} at the client's agent"), WAIT, || {
            config(&self.client_state)
                .routes
                .values()
                .any(|r| serde_json::to_value(&r.resource).ok().as_ref() == Some(&want))
                .then_some(())
        });
    }

    /// Runs a Python `script` in the client VM with `args`; its stdout as JSON.
    fn python(&self, script: &str, args: &[&str]) -> Value {
        let out = self
            .lab
            .node("vm0")
            .cmd("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "client: {}\n{}",
            describe(&out),
            self.logs()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `n` requests to `path` from the client VM.
    fn requests(&self, n: usize, path: &str) -> Value {
        self.python(CLIENT_PY, &[&self.vip, "8080", &n.to_string(), path])
    }

    /// The client agent's `causeway-agent status`.
    fn status(&self) -> Value {
        let out = self
            .lab
            .node("vm0")
            .cmd(bin("causeway-agent"))
            .args([
                "status",
                "--state-dir",
                self.client_state.to_str().unwrap(),
                "--output",
                "json",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn config(state: &Path) -> MeshState {
    std::fs::read(state.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn count(summary: &Value, key: &str) -> u64 {
    summary["counts"][key].as_u64().unwrap_or(0)
}

const LOCALITY: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting: {enabled: true}
    outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 30s, maxEjectionPercent: 100}";

/// Locality failover: with every endpoint healthy the client (zone a) sends only to zone
/// a (round robin would alternate without locality load balancing); with zone a's
/// application stopped, its endpoint is ejected by outlier detection after two 503s and
/// zone b takes every request; once zone a's application is back and its ejection over,
/// traffic returns there.
#[test]
fn traffic_stays_in_the_zone_fails_over_when_it_goes_dark_and_comes_back() {
    let mut m = Mesh::new();
    m.apply("locality", LOCALITY);
    let before = m.requests(100, "/");
    assert_eq!(count(&before, "200 a"), 100, "{before}\n{}", m.logs());

    m.stop_server("vm1");
    // Zone a answers 503 (its agent cannot reach the application): after 2 in a row
    // (consecutive5xxErrors) its endpoint is ejected and zone b takes the rest. Without a
    // VirtualService there are no retries, so the two are seen by the client.
    let during = m.requests(50, "/");
    assert_eq!(count(&during, "503 -"), 2, "{during}\n{}", m.logs());
    assert_eq!(count(&during, "200 b"), 48, "{during}\n{}", m.logs());
    let a1 = m.lab.node("vm1").addr.to_string();
    let web_a = config(&m.client_state).services["default/web"]
        .endpoints
        .iter()
        .find(|(_, e)| e.address == a1)
        .map(|(id, _)| format!("default/web/{id}"))
        .unwrap();
    let ejected = wait_for("zone a's ejection in causeway-agent status", WAIT, || {
        let list = m.status()["outlier_ejections"].as_array()?.clone();
        (!list.is_empty()).then_some(list)
    });
    assert_eq!(ejected.len(), 1, "{ejected:?}");
    assert_eq!(ejected[0]["endpoint"], web_a.as_str(), "{ejected:?}");
    let after = m.requests(20, "/");
    assert_eq!(count(&after, "200 b"), 20, "{after}\n{}", m.logs());

    // Zone a recovers: once its ejection ends, it takes the traffic again.
    m.start_server("vm1");
    wait_for("traffic back in zone a", WAIT, || {
        let back = m.requests(20, "/");
        (count(&back, "200 a") == 20).then_some(())
    });
}

const POOL: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}";

/// `connectionPool`: with one connection and one pending request allowed, of three
/// concurrent requests one is answered 503 at once naming the limit (Envoy's overflow,
/// `UO`), the other two complete once the server answers.
#[test]
fn a_connection_pool_limit_answers_the_overflowing_request_503() {
    let m = Mesh::new();
    m.apply("pool", POOL);
    let release = m.root.join("release");
    let answers = m.python(CONCURRENT_PY, &[&m.vip, "8080", release.to_str().unwrap()]);
    let answers = answers.as_array().unwrap();
    assert_eq!(answers.len(), 3, "{answers:?}");
    let ok = answers.iter().filter(|a| a["status"] == 200).count();
    let overflow: Vec<&Value> = answers.iter().filter(|a| a["status"] == 503).collect();
    assert_eq!((ok, overflow.len()), (2, 1), "{answers:?}\n{}", m.logs());
    assert_eq!(
        overflow[0]["overflow"], "connectionPool.http.http1MaxPendingRequests",
        "{answers:?}"
    );
    assert!(
        overflow[0]["body"]
            .as_str()
            .unwrap()
            .contains("reset reason: overflow"),
        "{answers:?}"
    );
}

const RETRIES: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - route:
    - destination: {host: web}
    retries: {attempts: 1, retryOn: 5xx}
    timeout: 60s";

const MAX_RETRIES: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy:
    connectionPool:
      http: {maxRetries: 1}";

/// `connectionPool.http.maxRetries: 1` (Envoy's retry circuit breaker): three concurrent
/// requests each get 503 on their first try and would each retry; the retry that holds
/// the one place blocks on the server, so the other two are not retried and their
/// clients get the server's own 503 at once (recorded `UO`); once they have, the server
/// is released and the retried request completes with 200. Without the limit all three
/// retries would block and no answer would come.
#[test]
fn max_retries_bounds_the_retries_in_flight() {
    let m = Mesh::new();
    m.apply("max-retries", MAX_RETRIES);
    m.apply("retries", RETRIES);
    let release = m.root.join("release");
    let answers = m.python(
        CONCURRENT_PY,
        &[
            &m.vip,
            "8080",
            release.to_str().unwrap(),
            "/retry-block",
            "2",
        ],
    );
    let answers = answers.as_array().unwrap();
    assert_eq!(answers.len(), 3, "{answers:?}");
    let ok = answers.iter().filter(|a| a["status"] == 200).count();
    let not_retried = answers
        .iter()
        .filter(|a| a["status"] == 503 && a["body"] == "first try")
        .count();
    assert_eq!((ok, not_retried), (1, 2), "{answers:?}\n{}", m.logs());
    assert!(
        !m.logs().contains("http.maxRetries"),
        "maxRetries is enforced, not reported as ignored: {}",
        m.logs()
    );
}

const DISTRIBUTE: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        distribute:
        - from: r1/a/*
          to: {\"r1/a/*\": 20, \"r1/b/*\": 80}
    outlierDetection: {consecutive5xxErrors: 5}";

/// `distribute`: from zone a, 20 % of the requests stay in zone a and 80 % go to zone b;
/// over 2,000 requests each share is within ±3 points.
#[test]
fn distribute_weights_across_zones_hold() {
    let m = Mesh::new();
    m.apply("distribute", DISTRIBUTE);
    let n = 2000;
    let got = m.requests(n, "/");
    let (a, b) = (count(&got, "200 a"), count(&got, "200 b"));
    assert_eq!(a + b, 2000, "{got}\n{}", m.logs());
    // 20 % ± 3 points of 2,000 = 340..=460; 80 % ± 3 points = 1,540..=1,660.
    assert!((340..=460).contains(&a), "zone a {a} of 2000: {got}");
    assert!((1540..=1660).contains(&b), "zone b {b} of 2000: {got}");
}
