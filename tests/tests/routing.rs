//! Traffic management end to end (issue 21), in network namespaces created by the test: a
//! controller, a client VM and two server VMs whose groups carry `version=v1` and
//! `version=v2` and serve the same service `web` on `http:8080`. VirtualServices and
//! DestinationRules go through `causewayctl apply` and the push; the client's agent
//! routes. Needs root; fails loudly without it.
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use causeway_api::push::MeshState;
use causeway_tests::netns::{Lab, Proc, require_root};
use causeway_tests::{bin, describe, wait_for};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// HTTP/1.1 server, argv[1] = port, argv[2] = its name. `GET /flaky` answers 503 the first
/// time it sees an `x-req` value and 200 after; `GET /slow` answers after 3 s; `GET /hang`
/// never answers on the server named v2; `GET /outlier` answers 500 on v2; anything else
/// at once. Every answer's body is `<name> <path>`; every request is logged.
const SERVER_PY: &str = r#"
import sys, threading, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
seen = set(); lock = threading.Lock()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        status = 200
        if self.path.startswith("/flaky"):
            key = self.headers.get("x-req", "")
            with lock:
                first = key not in seen
                seen.add(key)
            if first: status = 503
        if self.path.startswith("/slow"):
            time.sleep(3)
        if self.path.startswith("/outlier") and sys.argv[2] == "v2":
            status = 500
        if self.path.startswith("/hang") and sys.argv[2] == "v2":
            print("hanging %s" % self.path, flush=True)
            time.sleep(3600)
        print("served %s %d" % (self.path, status), flush=True)
        body = ("%s %s" % (sys.argv[2], self.path)).encode()
        try:
            self.send_response(status); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass
    def log_message(self, *a): pass
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

/// HTTP/1.1 client: argv[3] requests `GET argv[4]` to argv[1]:argv[2] on keep-alive
/// connections (a new one after an error), with the headers `k=v` of argv[5:] and a
/// unique `x-req` each; with argv[3] = 0, runs until the file named by `STOP` exists.
/// Prints a JSON summary: counts per `<status> <server name>`, errors, the shortest and
/// longest request in ms, the response flags seen.
const CLIENT_PY: &str = r#"
import http.client, json, os, sys, time, uuid
host, port, n, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
extra = dict(kv.split("=", 1) for kv in sys.argv[5:])
stop = os.environ.get("STOP")
counts, flags, errors = {}, {}, []
lo, hi, i = 1e9, 0.0, 0
c = None
while (i < n) if n > 0 else not os.path.exists(stop):
    i += 1
    if c is None: c = http.client.HTTPConnection(host, port, timeout=30)
    h = dict(extra); h["x-req"] = uuid.uuid4().hex
    t = time.monotonic()
    try:
        c.request("GET", path, headers=h)
        r = c.getresponse(); body = r.read().decode()
    except Exception as e:
        errors.append(repr(e)); c.close(); c = None; continue
    ms = (time.monotonic() - t) * 1000
    lo, hi = min(lo, ms), max(hi, ms)
    key = "%d %s" % (r.status, body.split(" ")[0] if r.status == 200 else "-")
    counts[key] = counts.get(key, 0) + 1
    f = r.getheader("x-causeway-response-flags")
    if f: flags[f] = flags.get(f, 0) + 1
print(json.dumps({"counts": counts, "errors": errors, "min_ms": lo, "max_ms": hi, "flags": flags, "requests": i}))
"#;

struct Mesh {
    // Field order = drop order: processes before the namespaces they run in.
    procs: Vec<Proc>,
    ctl_admin: String,
    root: PathBuf,
    client_state: PathBuf,
    vip: String,
    lab: Lab,
    _dir: tempfile::TempDir,
}

impl Mesh {
    /// Controller, the client VM with its agent, two server VMs (`web` v1 and v2) with
    /// their agents and servers; returns once the client's agent routes to both.
    fn new() -> Self {
        require_root("the routing tests");
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
            procs: vec![c],
            ctl_admin: endpoints["admin"].as_str().expect("admin").to_owned(),
            root,
            client_state: PathBuf::new(),
            vip: String::new(),
            lab,
            _dir: dir,
        };
        let group = |m: &Mesh, name: &str, service: &str, port: &str, labels: &[&str]| {
            let mut args = vec![
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
            ];
            for l in labels {
                args.extend(["--label", l]);
            }
            m.ctl_ok(&args);
        };
        group(&m, "client", "client", "tcp:7070", &[]);
        group(&m, "web-v1", "web", "http:8080", &["version=v1"]);
        group(&m, "web-v2", "web", "http:8080", &["version=v2"]);
        let s0 = m.join("vm0", "client");
        for (vm, group, name) in [("vm1", "web-v1", "v1"), ("vm2", "web-v2", "v2")] {
            let state = m.join(vm, group);
            let node = m.lab.node(vm).clone();
            let srv = Proc::spawn(
                &node,
                &m.root.join(format!("{vm}.server.log")),
                "python3",
                &["-c", SERVER_PY, "8080", name],
            );
            m.procs.push(srv);
            wait_for("the test server to listen", WAIT, || {
                node.sh("ss -ltn | grep -q ':8080 '")
                    .status
                    .success()
                    .then_some(())
            });
            m.agent(vm, &state);
        }
        m.agent("vm0", &s0);
        let (a1, a2) = (
            m.lab.node("vm1").addr.to_string(),
            m.lab.node("vm2").addr.to_string(),
        );
        m.vip = wait_for("web's two endpoints at the client's agent", WAIT, || {
            let s = config(&s0);
            let svc = s.services.get("default/web")?;
            let has = |a: &str| svc.endpoints.values().any(|e| e.address == a);
            let rules = std::fs::read_to_string(s0.join("capture.rules")).ok()?;
            (has(&a1) && has(&a2) && rules.contains(&format!("-d {a1}/32 "))).then_some(())?;
            svc.vip.map(|v| v.to_string())
        });
        m.client_state = s0;
        m
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

    /// Applies `yaml` and waits until the client's agent holds the routing resources
    /// exactly as applied (by their content).
    fn apply(&self, name: &str, yaml: &str) {
        let f = self.root.join(format!("{name}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        self.ctl_ok(&["apply", "-f", f.to_str().unwrap()]);
        let want: Vec<Value> = yaml
            .split("\n---\n")
            .map(|d| {
                let v: Value = serde_yaml_ng::from_str(d).unwrap();
                serde_json::to_value(causeway_api::route::decode_value(v).unwrap()).unwrap()
            })
            .collect();
        wait_for(&format!("{name} at the client's agent"), WAIT, || {
            let s = config(&self.client_state);
            want.iter()
                .all(|w| {
                    s.routes
                        .values()
                        .any(|r| serde_json::to_value(&r.resource).ok().as_ref() == Some(w))
                })
                .then_some(())
        });
    }

    /// Runs [`CLIENT_PY`] in the client VM: `n` requests to `path` with `headers`.
    fn requests(&self, n: usize, path: &str, headers: &[&str]) -> Value {
        let mut args = vec![
            "-c".to_owned(),
            CLIENT_PY.to_owned(),
            self.vip.clone(),
            "8080".to_owned(),
            n.to_string(),
            path.to_owned(),
        ];
        args.extend(headers.iter().map(|h| (*h).to_owned()));
        let out = self
            .lab
            .node("vm0")
            .cmd("python3")
            .args(&args)
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

const SUBSETS: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}";

fn split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: default}}
spec:
  hosts: [web.default.causeway]
  http:
  - name: canary
    match:
    - headers:
        x-canary: {{exact: \"1\"}}
    route:
    - destination: {{host: web, subset: v2}}
  - name: split
    route:
    - destination: {{host: web, subset: v1}}
      weight: {v1}
    - destination: {{host: web, subset: v2}}
      weight: {v2}"
    )
}

/// 90/10 over 2,000 requests within ±3 points; `x-canary: 1` reaches v2 only; a switch
/// to 0/100 while a client keeps sending fails no request and then sends everything to
/// v2.
#[test]
fn weighted_split_header_match_and_a_switch_without_failures() {
    let m = Mesh::new();
    // Without routes both versions serve (the balancer's choice).
    let before = m.requests(200, "/", &[]);
    assert!(
        count(&before, "200 v1") > 0 && count(&before, "200 v2") > 0,
        "{before}"
    );

    m.apply("routes", &format!("{SUBSETS}\n---\n{}", split(90, 10)));
    let got = m.requests(2000, "/", &[]);
    let (v1, v2) = (count(&got, "200 v1"), count(&got, "200 v2"));
    assert_eq!(v1 + v2, 2000, "{got}\n{}", m.logs());
    let share = v1 as f64 / 2000.0;
    assert!(
        (0.87..=0.93).contains(&share),
        "v1 got {v1} of 2000 ({share:.3}), want 90% ± 3 points: {got}"
    );

    let canary = m.requests(200, "/", &["x-canary=1"]);
    assert_eq!(count(&canary, "200 v2"), 200, "{canary}");

    // Switch to 0/100 while a client keeps sending.
    let stop = m.root.join("stop");
    let running = m
        .lab
        .node("vm0")
        .cmd("python3")
        .args(["-c", CLIENT_PY, &m.vip, "8080", "0", "/"])
        .env("STOP", &stop)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    m.apply("switch", &split(0, 100));
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&stop, "").unwrap();
    let out = running.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let during: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ok = count(&during, "200 v1") + count(&during, "200 v2");
    assert_eq!(
        ok,
        during["requests"].as_u64().unwrap(),
        "a request failed during the switch: {during}\n{}",
        m.logs()
    );
    assert!(during["errors"].as_array().unwrap().is_empty(), "{during}");
    let after = m.requests(300, "/", &[]);
    assert_eq!(count(&after, "200 v2"), 300, "{after}");

    // `causewayctl get` shows them; deleting the rule still named by the route is refused.
    let vs = m.ctl_ok(&["get", "vs", "web", "--output", "json"]);
    assert!(vs.contains("\"weight\": 100"), "{vs}");
    let text = m.ctl_ok(&["get", "dr"]);
    assert!(text.contains("v1,v2"), "{text}");
    let refused = m
        .lab
        .node("ctl")
        .cmd(bin("causewayctl"))
        .args(["delete", "dr", "web", "-n", "default"])
        .env("CAUSEWAY_CONTROLLER", &m.ctl_admin)
        .env(
            "CAUSEWAY_ADMIN_TOKEN_FILE",
            m.root.join("controller").join("admin.token"),
        )
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let msg = describe(&refused);
    assert!(
        msg.contains("VirtualService/default/web") && msg.contains("subset \"v1\""),
        "{msg}"
    );
}

const RESILIENCE: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - name: flaky
    match:
    - uri: {prefix: /flaky}
    retries: {attempts: 2, retryOn: 5xx}
    route:
    - destination: {host: web, subset: v1}
  - name: per-try
    match:
    - uri: {exact: /slow/per-try}
    timeout: 20s
    retries: {attempts: 2, perTryTimeout: 400ms, retryOn: \"gateway-error,5xx\"}
    route:
    - destination: {host: web, subset: v1}
  - name: overall
    match:
    - uri: {exact: /slow/overall}
    timeout: 1s
    retries: {attempts: 0}
    route:
    - destination: {host: web, subset: v1}
  - name: abort
    match:
    - uri: {prefix: /abort}
    fault:
      abort: {httpStatus: 503, percentage: {value: 50}}
    route:
    - destination: {host: web, subset: v1}
  - name: delay
    match:
    - uri: {prefix: /delay}
    fault:
      delay: {fixedDelay: 200ms, percentage: {value: 100}}
    route:
    - destination: {host: web, subset: v1}
  - name: mirror
    match:
    - uri: {prefix: /mirror}
    route:
    - destination: {host: web, subset: v1}
    mirror: {host: web, subset: v2}
    mirrorPercentage: {value: 25.0}
  - name: hang
    match:
    - uri: {prefix: /hang}
    route:
    - destination: {host: web, subset: v1}
    mirror: {host: web, subset: v2}";

/// A first-attempt 503 is retried into a 200; per-try and overall timeouts answer 504
/// `UT`, never before the configured time; an abort fault at 50 % answers 503 `FI` to
/// half the requests; a 200 ms delay fault delays every request by at least 200 ms; a
/// 25 % mirror copies a quarter of 2,000 requests to v2, and a mirror target that never
/// answers holds up no primary request.
#[test]
fn retries_timeouts_faults_and_mirror() {
    let m = Mesh::new();
    m.apply("resilience", &format!("{SUBSETS}\n---\n{RESILIENCE}"));

    // Each request's first try gets 503 from the server; the retry gets 200.
    let flaky = m.requests(20, "/flaky", &[]);
    assert_eq!(count(&flaky, "200 v1"), 20, "{flaky}\n{}", m.logs());

    // Per-try timeout 400 ms, 2 retries: 3 tries, then 504 UT (and URX).
    let per_try = m.requests(1, "/slow/per-try", &[]);
    assert_eq!(count(&per_try, "504 -"), 1, "{per_try}\n{}", m.logs());
    assert!(per_try["min_ms"].as_f64().unwrap() >= 1200.0, "{per_try}");
    let flags = per_try["flags"].as_object().unwrap();
    assert!(flags.keys().any(|f| f.contains("UT")), "{per_try}");
    let served = wait_for("the server to log three tries", WAIT, || {
        let log = m.procs[1].log();
        (log.matches("served /slow/per-try").count() == 3).then_some(log)
    });
    assert!(served.contains("served /slow/per-try 200"), "{served}");

    // Overall timeout 1 s, server takes 3 s: 504 UT, not before 1 s.
    let overall = m.requests(1, "/slow/overall", &[]);
    assert_eq!(count(&overall, "504 -"), 1, "{overall}");
    assert!(overall["min_ms"].as_f64().unwrap() >= 1000.0, "{overall}");
    assert!(overall["max_ms"].as_f64().unwrap() < 3000.0, "{overall}");

    // Abort 50 %: 503 FI for about half of 1,000 requests, the rest reach v1.
    let abort = m.requests(1000, "/abort", &[]);
    let (aborted, passed) = (count(&abort, "503 -"), count(&abort, "200 v1"));
    assert_eq!(aborted + passed, 1000, "{abort}");
    assert!((430..=570).contains(&aborted), "{abort}");
    assert_eq!(abort["flags"]["FI"].as_u64(), Some(aborted), "{abort}");

    // Delay 200 ms at 100 %.
    let delay = m.requests(10, "/delay", &[]);
    assert_eq!(count(&delay, "200 v1"), 10, "{delay}");
    assert!(delay["min_ms"].as_f64().unwrap() >= 200.0, "{delay}");

    // Mirror 25 %: every primary request reaches v1, about a quarter are copied to v2.
    let mirrored = m.requests(2000, "/mirror", &[]);
    assert_eq!(count(&mirrored, "200 v1"), 2000, "{mirrored}");
    let v2_log = || m.procs[3].log().matches("served /mirror").count();
    let copies = wait_for("the mirrored copies to settle", WAIT, || {
        let before = v2_log();
        std::thread::sleep(Duration::from_millis(1000));
        (v2_log() == before).then_some(before)
    });
    assert!(
        (440..=560).contains(&copies),
        "v2 got {copies} mirrored copies of 2,000 requests, want 25% ± 3 points"
    );
    assert_eq!(m.procs[1].log().matches("served /mirror").count(), 2000);

    // A mirror target that never answers: every primary request still completes.
    let hang = m.requests(100, "/hang", &[]);
    assert_eq!(count(&hang, "200 v1"), 100, "{hang}\n{}", m.logs());
    assert!(hang["errors"].as_array().unwrap().is_empty(), "{hang}");
    assert!(
        m.procs[3].log().contains("hanging /hang"),
        "the mirror was not sent"
    );
}

const OUTLIER: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 20s, maxEjectionPercent: 50}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - route:
    - destination: {host: web}";

/// Outlier detection: the endpoint answering 500 is ejected after 3 in a row, shown by
/// `causeway-agent status`, gets no request while ejected, and takes requests again once
/// the ejection ends.
#[test]
fn outlier_detection_ejects_the_failing_endpoint_and_takes_it_back() {
    let m = Mesh::new();
    m.apply("outlier", OUTLIER);
    let status = || -> Value {
        let out = m
            .lab
            .node("vm0")
            .cmd(bin("causeway-agent"))
            .args([
                "status",
                "--state-dir",
                m.client_state.to_str().unwrap(),
                "--output",
                "json",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let first = m.requests(60, "/outlier", &[]);
    let errors = count(&first, "500 -");
    assert_eq!(
        errors,
        3,
        "v2 should be ejected after 3 errors in a row: {first}\n{}",
        m.logs()
    );
    let ejected = wait_for("the ejection in causeway-agent status", WAIT, || {
        let list = status()["outlier_ejections"].as_array()?.clone();
        (!list.is_empty()).then_some(list)
    });
    assert_eq!(ejected.len(), 1, "{ejected:?}");
    // While it is ejected (20 s), v1 takes every request.
    let during = m.requests(100, "/outlier", &[]);
    assert_eq!(count(&during, "200 v1"), 100, "{during}");
    assert_eq!(
        status()["outlier_ejections"].as_array().unwrap().len(),
        1,
        "the ejection ended during the batch"
    );
    // The ejection ends; v2 takes requests again (and answers 500).
    wait_for("the ejection to end", WAIT, || {
        status()["outlier_ejections"]
            .as_array()?
            .is_empty()
            .then_some(())
    });
    let after = m.requests(60, "/outlier", &[]);
    assert!(count(&after, "500 -") >= 1, "{after}");
}
