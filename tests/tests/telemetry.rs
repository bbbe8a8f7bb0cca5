//! Istio metrics end to end (issue 20), in network namespaces created by the test: a
//! controller namespace `ctl` where a real Prometheus server (Debian `prometheus`, from
//! `scripts/install-deps-metrics.sh`) runs with its own config and storage in a temporary
//! directory, and two VMs with agents whose `[telemetry] metrics_listen` is open to `ctl`.
//! Prometheus finds the agents through the controller's HTTP service discovery
//! (`/v1/sd/prometheus`) and scrapes them every second; the checks are PromQL queries
//! through its HTTP API. Needs root; fails loudly without it.
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use causeway_tests::netns::{Lab, Node, Proc, require_root};
use causeway_tests::{bin, describe, wait_for};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

/// HTTP/1.1 server on argv[1]: `/ok…` answers 200, `/fail…` 500, with a body.
const HTTP_SERVER_PY: &str = r#"
import sys
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        code = 500 if self.path.startswith("/fail") else 200
        body = ("code=%d path=%s\n" % (code, self.path)).encode()
        self.send_response(code); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

/// HTTP/1.1 client: GET each path of argv[3:] on one keep-alive connection to
/// argv[1]:argv[2]; prints one status per line.
const HTTP_CLIENT_PY: &str = r#"
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=20)
for p in sys.argv[3:]:
    c.request("GET", p)
    r = c.getresponse(); r.read()
    print(r.status)
"#;

/// Echo server on argv[1]: a first line naming itself, then echoes until EOF.
const ECHO_SERVER_PY: &str = r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
def h(c):
    c.sendall(b"echo-server\n")
    while True:
        d = c.recv(65536)
        if not d: break
        c.sendall(d)
    c.shutdown(socket.SHUT_WR); c.close()
while True:
    c, a = s.accept(); threading.Thread(target=h, args=(c,), daemon=True).start()
"#;

/// Client: sends argv[3] bytes, half-closes, prints how many bytes it received.
const TCP_CLIENT_PY: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
c.sendall(b"x" * int(sys.argv[3])); c.shutdown(socket.SHUT_WR)
n = 0
while True:
    d = c.recv(65536)
    if not d: break
    n += len(d)
print(n)
"#;

/// Prints the body of GET argv[1].
const FETCH_PY: &str = r#"
import sys, urllib.request
sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
"#;

struct Mesh {
    // Field order = drop order: processes before the namespaces they run in.
    procs: Vec<Proc>,
    ctl_admin: String,
    root: PathBuf,
    lab: Lab,
    _dir: tempfile::TempDir,
}

impl Mesh {
    fn new() -> Self {
        require_root("the telemetry test");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let lab = Lab::new(&["ctl", "vm1", "vm2"]);
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
                "--metrics-listen",
                "127.0.0.1:15014",
            ],
        );
        let endpoints: Value = wait_for("controller endpoints.json", WAIT, || {
            let text = std::fs::read_to_string(data.join("endpoints.json")).ok()?;
            serde_json::from_str(&text).ok()
        });
        Self {
            procs: vec![c],
            ctl_admin: endpoints["admin"].as_str().expect("admin").to_owned(),
            root,
            lab,
            _dir: dir,
        }
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        self.lab
            .node("ctl")
            .causewayctl(&self.ctl_admin, &self.root.join("controller"), args)
    }

    fn node(&self, name: &str) -> Node {
        self.lab.node(name).clone()
    }

    fn spawn(
        &mut self,
        node: &Node,
        log: &str,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) {
        let p = Proc::spawn(node, &self.root.join(log), program, args);
        self.procs.push(p);
    }

    /// Joins `vm` into `group` and runs its agent with `/metrics` open to `ctl` on
    /// 0.0.0.0:15090; returns the state dir.
    fn agent(&mut self, vm: &str, group: &str) -> PathBuf {
        let token = self.ctl_ok(&["token", "create", "--group", group]);
        let state = self.root.join(vm);
        let node = self.node(vm);
        let out = node
            .cmd(bin("causeway-agent"))
            .args(["join", token.trim(), "--state-dir", state.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "join {vm}: {}", describe(&out));
        let cfg = self.root.join(format!("{vm}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[telemetry]\nmetrics_listen = \"0.0.0.0:15090\"\nmetrics_allow = [\"{}/32\"]\n",
                self.lab.node("ctl").addr
            ),
        )
        .unwrap();
        let addr = node.addr.to_string();
        self.spawn(
            &node,
            &format!("{vm}.agent.log"),
            bin("causeway-agent"),
            &[
                "run",
                "--config",
                cfg.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
                "--address",
                &addr,
            ],
        );
        state
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("== {}\n{}", p.log.display(), p.log()))
            .collect()
    }

    /// `python3 -c script args...` in `vm`; its stdout (must succeed).
    fn python(&self, vm: &str, script: &str, args: &[&str]) -> String {
        let out = self
            .lab
            .node(vm)
            .cmd("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "python in {vm} {args:?}: {}\n{}",
            describe(&out),
            self.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The result vector of PromQL `query` (`[{metric, value}]`), through Prometheus's
    /// HTTP API in `ctl`.
    fn promql(&self, query: &str) -> Vec<Value> {
        let url = format!(
            "http://127.0.0.1:19090/api/v1/query?query={}",
            encode(query)
        );
        let out = self
            .lab
            .node("ctl")
            .cmd("python3")
            .args(["-c", FETCH_PY, &url])
            .output()
            .unwrap();
        if !out.status.success() {
            return Vec::new();
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert_ne!(v["status"], "error", "PromQL {query}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a PromQL query returning one sample; `None` when it returns none.
    fn promql_value(&self, query: &str) -> Option<u64> {
        let r = self.promql(query);
        let [one] = r.as_slice() else { return None };
        one["value"][1]
            .as_str()?
            .parse::<f64>()
            .ok()
            .map(|f| f as u64)
    }

    /// Waits until PromQL `query` returns `want` (a counter only grows: a value above it
    /// fails at once).
    fn wait_value(&self, query: &str, want: u64) {
        let mut last = None;
        let done = wait_for_quiet(WAIT, || {
            last = self.promql_value(query);
            assert!(
                last.is_none_or(|v| v <= want),
                "{query} = {last:?}, above {want}\n{}",
                self.logs()
            );
            (last == Some(want)).then_some(())
        });
        assert!(
            done.is_some(),
            "{query} = {last:?}, want {want}\n{}",
            self.logs()
        );
    }
}

/// Polls `f` until it gives a value or `timeout` passes.
fn wait_for_quiet<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Percent-encodes a URL query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `promtool check metrics` on `text`: its complaints, one per line, besides the one
/// Istio's own metric name earns (`istio_request_duration_milliseconds` is in
/// milliseconds, not the base unit). A parse error is a complaint too.
fn promtool_problems(text: &str) -> Vec<String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/install-deps-metrics.sh)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let istio_unit =
        "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";
    let problems: Vec<String> = all
        .lines()
        .filter(|l| !l.trim().is_empty() && l.trim() != istio_unit)
        .map(str::to_owned)
        .collect();
    // Exit 0: clean; 3: lint problems only (all of them listed above).
    assert!(
        out.status.success() || out.status.code() == Some(3),
        "promtool failed: {}",
        describe(&out)
    );
    problems
}

fn wait_listening(node: &Node, port: u16) {
    wait_for(&format!("a server on port {port}"), WAIT, || {
        node.sh(&format!("ss -ltn | grep -q ':{port} '"))
            .status
            .success()
            .then_some(())
    });
}

/// The service's VIP once `state`'s agent routes it to `addr`.
fn wait_routed(state: &Path, service: &str, addr: &str) -> String {
    wait_for(&format!("{service} at {addr} routed"), WAIT, || {
        let s: causeway_api::push::MeshState =
            serde_json::from_slice(&std::fs::read(state.join("config.json")).ok()?).ok()?;
        let svc = s.services.get(service)?;
        svc.endpoints.values().find(|e| e.address == addr)?;
        let rules = std::fs::read_to_string(state.join("capture.rules")).ok()?;
        rules.contains(&format!("-d {addr}/32 ")).then_some(())?;
        svc.vip.map(|v| v.to_string())
    })
}

/// A real Prometheus discovers both agents through the controller and scrapes them: the
/// requests vm1 sends to vm2's HTTP service `web` (some answered 200, some 500 by the
/// application) are counted exactly once per reporter with the right response codes and
/// Istio's labels, and the TCP counters of a spliced service match the bytes sent.
#[test]
fn prometheus_discovers_the_agents_and_counts_requests_and_bytes() {
    let mut m = Mesh::new();
    m.ctl_ok(&[
        "group",
        "create",
        "web",
        "--namespace",
        "shop",
        "--service-account",
        "web",
        "--service",
        "web",
        "--port",
        "http:8080",
        "--label",
        "app=web",
        "--label",
        "version=v1",
    ]);
    m.ctl_ok(&[
        "group",
        "create",
        "client",
        "--namespace",
        "shop",
        "--service-account",
        "client",
        "--service",
        "echo",
        "--port",
        "tcp-echo:9000",
        "--label",
        "app=client",
    ]);
    let (vm1, vm2, ctl) = (m.node("vm1"), m.node("vm2"), m.node("ctl"));
    m.spawn(
        &vm2,
        "vm2.http.log",
        "python3",
        &["-c", HTTP_SERVER_PY, "8080"],
    );
    m.spawn(
        &vm1,
        "vm1.echo.log",
        "python3",
        &["-c", ECHO_SERVER_PY, "9000"],
    );
    wait_listening(&vm2, 8080);
    wait_listening(&vm1, 9000);
    let s2 = m.agent("vm2", "web");
    let s1 = m.agent("vm1", "client");
    let web_vip = wait_routed(&s1, "shop/web", &vm2.addr.to_string());
    let echo_vip = wait_routed(&s2, "shop/echo", &vm1.addr.to_string());

    // Service discovery lists both agents at their routable metrics endpoints.
    let sd_url = "http://127.0.0.1:15014/v1/sd/prometheus";
    let sd: Value = wait_for("both agents in service discovery", WAIT, || {
        let out = ctl
            .cmd("python3")
            .args(["-c", FETCH_PY, sd_url])
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v.as_array()?.len() == 2).then_some(v)
    });
    let web_target = sd
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["labels"]["group"] == "web")
        .unwrap_or_else(|| panic!("{sd}"));
    assert_eq!(
        web_target["targets"][0],
        format!("{}:15090", vm2.addr),
        "{sd}"
    );
    assert_eq!(web_target["labels"]["namespace"], "shop", "{sd}");
    assert_eq!(web_target["labels"]["app"], "web", "{sd}");

    // A real Prometheus with one scrape job fed by the controller.
    let prom_dir = m.root.join("prometheus");
    std::fs::create_dir_all(prom_dir.join("data")).unwrap();
    let prom_cfg = prom_dir.join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: causeway-agents\n    scrape_interval: 1s\n    http_sd_configs:\n      - url: {sd_url}\n        refresh_interval: 1s\n"
        ),
    )
    .unwrap();
    let (cfg_arg, data_arg) = (
        format!("--config.file={}", prom_cfg.display()),
        format!("--storage.tsdb.path={}", prom_dir.join("data").display()),
    );
    m.spawn(
        &ctl,
        "prometheus.log",
        "prometheus",
        &[&cfg_arg, &data_arg, "--web.listen-address=127.0.0.1:19090"],
    );
    m.wait_value("count(up{job=\"causeway-agents\"} == 1)", 2);
    let up = m.promql("up{job=\"causeway-agents\"}");
    assert!(
        up.iter()
            .any(|s| s["metric"]["group"] == "web" && s["metric"]["namespace"] == "shop"),
        "{up:?}"
    );

    // N requests: 7 answered 200, 3 answered 500 by the application.
    let paths: Vec<String> = (0..10)
        .map(|i| {
            if i % 3 == 1 {
                format!("/fail{i}")
            } else {
                format!("/ok{i}")
            }
        })
        .collect();
    let mut args = vec![web_vip.as_str(), "8080"];
    args.extend(paths.iter().map(String::as_str));
    let statuses = m.python("vm1", HTTP_CLIENT_PY, &args);
    assert_eq!(statuses.matches("200").count(), 7, "{statuses}");
    assert_eq!(statuses.matches("500").count(), 3, "{statuses}");

    let dst = "istio_requests_total{reporter=\"destination\",destination_service_name=\"web\"}";
    m.wait_value(&format!("sum({dst})"), 10);
    m.wait_value(
        "sum(istio_requests_total{reporter=\"source\",destination_service_name=\"web\"})",
        10,
    );
    let split: Vec<(String, u64)> = {
        let mut v: Vec<(String, u64)> = m
            .promql(&format!("sum by (response_code) ({dst})"))
            .iter()
            .map(|s| {
                (
                    s["metric"]["response_code"]
                        .as_str()
                        .unwrap_or("?")
                        .to_owned(),
                    s["value"][1].as_str().unwrap_or("0").parse().unwrap_or(0),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        split,
        [("200".to_owned(), 7), ("500".to_owned(), 3)],
        "{}",
        m.logs()
    );
    // Istio's labels on the destination's samples.
    let series = m.promql(dst);
    let web_id = "spiffe://causeway.local/ns/shop/sa/web";
    let client_id = "spiffe://causeway.local/ns/shop/sa/client";
    for s in &series {
        let l = &s["metric"];
        for (k, v) in [
            ("source_principal", client_id),
            ("source_workload", "client"),
            ("source_workload_namespace", "shop"),
            ("source_app", "client"),
            ("destination_principal", web_id),
            ("destination_workload", "web"),
            ("destination_workload_namespace", "shop"),
            ("destination_app", "web"),
            ("destination_version", "v1"),
            ("destination_service", "web.shop.causeway"),
            ("destination_service_namespace", "shop"),
            ("request_protocol", "http"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ] {
            assert_eq!(l[k], v, "{k} in {l}");
        }
    }
    m.wait_value(
        "sum(istio_request_duration_milliseconds_count{reporter=\"destination\",destination_service_name=\"web\"})",
        10,
    );

    // A spliced TCP service, vm2 → vm1: bytes both ways on both agents.
    let sent = 123_457;
    let got: u64 = m
        .python(
            "vm2",
            TCP_CLIENT_PY,
            &[&echo_vip, "9000", &sent.to_string()],
        )
        .trim()
        .parse()
        .unwrap();
    assert_eq!(got, sent + "echo-server\n".len() as u64);
    for reporter in ["source", "destination"] {
        let sel = format!("{{reporter=\"{reporter}\",destination_service_name=\"echo\"}}");
        m.wait_value(&format!("sum(istio_tcp_connections_closed_total{sel})"), 1);
        m.wait_value(&format!("sum(istio_tcp_connections_opened_total{sel})"), 1);
        m.wait_value(&format!("sum(istio_tcp_received_bytes_total{sel})"), sent);
        m.wait_value(&format!("sum(istio_tcp_sent_bytes_total{sel})"), got);
    }

    // Both expositions pass promtool (apart from Istio's own millisecond unit).
    for vm in ["vm1", "vm2"] {
        let text = m
            .lab
            .node(vm)
            .sh_ok("python3 -c \"import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:15020/metrics').read().decode())\"");
        assert!(text.contains("istio_requests_total{"), "{text}");
        let problems = promtool_problems(&text);
        assert!(
            problems.is_empty(),
            "promtool on {vm}: {problems:#?}\n{text}"
        );
    }
}
