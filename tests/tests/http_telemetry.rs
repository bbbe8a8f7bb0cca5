//! HTTP through two agents in network namespaces (issue 20): access logs, trace
//! propagation and span export, and the protocols and bad input the HTTP proxy must
//! handle end to end. Root only, like `dataplane.rs`.
//!
//! The application and the clients are `http-probe` (tests/fakes; hyper, so h2c and gRPC
//! trailers need no extra tools); the OTLP receiver is a small Python HTTP server in the
//! controller's namespace that stores each POST body, decoded here with the agent's
//! prost messages (generated from the OpenTelemetry `.proto` files).

use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway_agent::telemetry::otlp::proto::{ExportTraceServiceRequest, Span};
use causeway_tests::netns::{Lab, Proc, require_root};
use causeway_tests::{bin, describe, wait_for};
use prost::Message as _;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// Stores each POST body as `<dir>/<n>.pb` (written to a temporary name, then renamed)
/// and answers 200 with an empty `ExportTraceServiceResponse`.
const OTLP_RECEIVER_PY: &str = r#"
import os, sys, itertools
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
out = sys.argv[2]
n = itertools.count()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        i = next(n)
        tmp = os.path.join(out, "%d.tmp" % i)
        with open(tmp, "wb") as f:
            f.write(body)
        os.rename(tmp, os.path.join(out, "%d.pb" % i))
        print("POST %s %s %d bytes" % (self.path, self.headers["Content-Type"], len(body)), flush=True)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a): pass
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
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
    /// Lab with nodes ctl, vm1, vm2; a controller in ctl; group `client` and group `shop`
    /// with `ports`.
    fn new(ports: &[&str]) -> Self {
        require_root("the HTTP telemetry tests");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let lab = Lab::new(&["ctl", "vm1", "vm2"]);
        let data = root.join("controller");
        let cfg = root.join("controller.toml");
        std::fs::write(&cfg, "").unwrap();
        let ctl = lab.node("ctl");
        let control = format!("{}:15012", ctl.addr);
        let c = Proc::spawn(
            ctl,
            &root.join("controller.log"),
            bin("causeway-controller"),
            &[
                "--data-dir",
                data.to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
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
        let m = Self {
            procs: vec![c],
            ctl_admin: endpoints["admin"].as_str().expect("admin").to_owned(),
            root,
            lab,
            _dir: dir,
        };
        let group = |name: &str, ports: &[&str]| {
            let mut args = vec![
                "group",
                "create",
                name,
                "--namespace",
                "default",
                "--service-account",
                name,
                "--service",
                name,
            ];
            for p in ports {
                args.extend(["--port", p]);
            }
            m.ctl_ok(&args);
        };
        group("client", &["tcp:7070"]);
        group("shop", ports);
        m
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        self.lab
            .node("ctl")
            .causewayctl(&self.ctl_admin, &self.root.join("controller"), args)
    }

    /// Joins `vm` into `group`; returns its state dir.
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

    /// Starts the agent of `vm` with `toml` as its config file; returns its index.
    fn agent(&mut self, vm: &str, state: &Path, toml: &str) -> usize {
        let node = self.lab.node(vm).clone();
        let cfg = self.root.join(format!("{vm}.agent.toml"));
        std::fs::write(&cfg, toml).unwrap();
        let addr = node.addr.to_string();
        let p = Proc::spawn(
            &node,
            &self.root.join(format!("{vm}.agent.log")),
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
        self.procs.push(p);
        self.procs.len() - 1
    }

    /// Starts `http-probe serve port` in `vm`; returns its index once it listens.
    fn app(&mut self, vm: &str, port: u16) -> usize {
        let node = self.lab.node(vm).clone();
        let p = Proc::spawn(
            &node,
            &self.root.join(format!("{vm}.app-{port}.log")),
            bin("http-probe"),
            &["serve", &port.to_string()],
        );
        self.procs.push(p);
        let i = self.procs.len() - 1;
        self.wait_log(i, "the test application to listen", |log| {
            log.contains(&format!("listening on {port}")).then_some(())
        });
        i
    }

    /// Polls the output of process `i` with `f` (failing at once if it exits).
    fn wait_log<T>(&mut self, i: usize, what: &str, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let path = self.procs[i].log.clone();
        self.procs[i].wait_for(what, WAIT, || {
            f(&std::fs::read_to_string(&path).unwrap_or_default())
        })
    }

    /// Runs `http-probe args` in vm1; returns its stdout (asserting success).
    fn probe(&self, args: &[&str]) -> String {
        let out = self
            .lab
            .node("vm1")
            .cmd(bin("http-probe"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "http-probe {args:?}: {}\n{}",
            describe(&out),
            self.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `curl` in vm1 with `args`; returns stdout (asserting success).
    fn curl(&self, args: &[&str]) -> String {
        let out = self
            .lab
            .node("vm1")
            .cmd("curl")
            .args(["-sS", "--max-time", "20"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl {args:?}: {}\n{}",
            describe(&out),
            self.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("== {}\n{}", p.log.display(), p.log()))
            .collect()
    }
}

fn spiffe_id(state: &Path) -> String {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("agent.json")).unwrap()).unwrap();
    v["spiffe_id"].as_str().unwrap().to_owned()
}

/// Waits until `vm`'s agent routes `service` to `addr`; returns the service's VIP.
fn wait_routed(state: &Path, service: &str, addr: &str) -> String {
    wait_for(&format!("{service} at {addr} routed"), WAIT, || {
        let text = std::fs::read_to_string(state.join("config.json")).ok()?;
        let s: causeway_api::push::MeshState = serde_json::from_str(&text).ok()?;
        let svc = s.services.get(service)?;
        svc.endpoints.values().find(|e| e.address == addr)?;
        let rules = std::fs::read_to_string(state.join("capture.rules")).ok()?;
        rules.contains(&format!("-d {addr}/32 ")).then_some(())?;
        svc.vip.map(|v| v.to_string())
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A span as exported, with its resource's `service.name`.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    span: Span,
}

fn string_attr(attrs: &[causeway_agent::telemetry::otlp::proto::KeyValue], key: &str) -> String {
    use causeway_agent::telemetry::otlp::proto::opentelemetry::proto::common::v1::any_value::Value as V;
    attrs
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            V::StringValue(s) => s.clone(),
            V::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
        .unwrap_or_default()
}

/// Every span the receiver stored so far.
fn exported(dir: &Path) -> Vec<Exported> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "pb") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let req = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap_or_else(|e| {
            panic!(
                "{} is not an ExportTraceServiceRequest: {e}",
                path.display()
            )
        });
        for rs in req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .map(|r| string_attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    out.push(Exported {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
    }
    out
}

/// The app's `served` lines' traceparent for `path`.
fn app_traceparent(log: &str, path: &str) -> String {
    log.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("served GET {path} "))
                .and_then(|r| r.split("traceparent=").nth(1))
        })
        .unwrap_or_else(|| panic!("the app saw no GET {path}: {log}"))
        .to_owned()
}

/// Two agents with `[telemetry]` on (JSON access log on vm1, text on vm2, every trace
/// sampled, spans to a receiver in ctl); requests from vm1 to vm2's `http:8080`:
/// - `/ok` without trace headers: vm1 starts a trace; the app sees a `traceparent` with
///   it; both agents' access log entries carry the status, both principals and that trace
///   id; the receiver gets vm1's client span (a root) and vm2's server span whose parent is
///   vm1's span, and the app's parent id is vm2's span;
/// - `/status/500` with a `traceparent`: the trace id is kept (app, both logs, both
///   spans), vm1's span is the child of the caller's span, and the 500 is logged;
/// - a TCP connection to a `tcp:` port is logged once per agent with its bytes.
#[test]
fn access_logs_and_linked_spans_from_both_agents() {
    let mut m = Mesh::new(&["http:8080", "tcp-echo:8081"]);
    let ctl = m.lab.node("ctl").clone();
    let spans_dir = m.root.join("spans");
    std::fs::create_dir(&spans_dir).unwrap();
    let receiver = Proc::spawn(
        &ctl,
        &m.root.join("otlp-receiver.log"),
        "python3",
        &["-c", OTLP_RECEIVER_PY, "4318", spans_dir.to_str().unwrap()],
    );
    m.procs.push(receiver);
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "shop");
    let app = m.app("vm2", 8080);
    let echo = Proc::spawn(
        m.lab.node("vm2"),
        &m.root.join("vm2.echo.log"),
        "python3",
        &[
            "-c",
            "import socket\ns=socket.create_server(('0.0.0.0',8081))\nwhile True:\n  c,_=s.accept()\n  d=c.recv(100)\n  c.sendall(d*2)\n  c.close()",
        ],
    );
    m.procs.push(echo);
    let telemetry = |format: &str| {
        format!(
            "[telemetry]\naccess_log = \"{format}\"\ntrace_sampling = 100.0\notlp_endpoint = \"http://{}:4318/v1/traces\"\n",
            ctl.addr
        )
    };
    let a2 = m.agent("vm2", &s2, &telemetry("text"));
    let a1 = m.agent("vm1", &s1, &telemetry("json"));
    let vm2_addr = m.lab.node("vm2").addr.to_string();
    let vip = wait_routed(&s1, "default/shop", &vm2_addr);
    let (client_id, shop_id) = (spiffe_id(&s1), spiffe_id(&s2));

    // (1) No trace headers.
    let body = m.curl(&[&format!("http://{vip}:8080/ok")]);
    assert!(
        body.starts_with("GET /ok HTTP/1.1 traceparent=00-"),
        "{body}"
    );
    let app_tp = app_traceparent(&m.procs[app].log(), "/ok");
    let parts: Vec<&str> = app_tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{app_tp}");
    let (trace, app_parent) = (parts[1].to_owned(), parts[2].to_owned());
    assert_eq!(parts[3], "01", "sampled at 100 %: {app_tp}");

    // (2) With a caller's context.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let caller_tp = format!("00-{caller_trace}-{caller_span}-01");
    m.curl(&[
        "-H",
        &format!("traceparent: {caller_tp}"),
        &format!("http://{vip}:8080/status/500"),
    ]);
    let app_tp2 = app_traceparent(&m.procs[app].log(), "/status/500");
    assert!(
        app_tp2.starts_with(&format!("00-{caller_trace}-")) && !app_tp2.contains(caller_span),
        "the trace id is kept and each agent adds its span: {app_tp2}"
    );

    // (3) A TCP connection.
    let out = m
        .lab
        .node("vm1")
        .sh_ok(&format!("python3 -c \"import socket\nc=socket.create_connection(('{vip}',8081),timeout=20)\nc.sendall(b'hello')\nb=b''\nwhile True:\n  d=c.recv(100)\n  if not d: break\n  b+=d\nprint(b.decode())\""));
    assert_eq!(out.trim(), "hellohello");

    // Access logs: vm1 (JSON, source).
    let json_lines = |log: &str| -> Vec<Value> {
        log.lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let src = m.wait_log(a1, "vm1's access log entries", |log| {
        let v = json_lines(log);
        (v.len() >= 3).then_some(v)
    });
    let find = |v: &[Value], path: &str| -> Value {
        v.iter()
            .find(|e| e["path"] == path)
            .unwrap_or_else(|| panic!("no entry for {path}: {v:#?}"))
            .clone()
    };
    let ok = find(&src, "/ok");
    assert_eq!(ok["reporter"], "source");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["protocol"], "HTTP/1.1");
    assert_eq!(ok["response_code"], 200);
    assert_eq!(ok["response_flags"], "-");
    assert_eq!(ok["source_principal"], client_id.as_str());
    assert_eq!(ok["destination_principal"], shop_id.as_str());
    assert_eq!(ok["trace_id"], trace.as_str());
    assert_eq!(ok["upstream_host"], format!("{vm2_addr}:8080"));
    assert_eq!(ok["bytes_sent"].as_u64(), Some(body.len() as u64));
    let failed = find(&src, "/status/500");
    assert_eq!(failed["response_code"], 500);
    assert_eq!(failed["trace_id"], caller_trace);
    let tcp = src
        .iter()
        .find(|e| e["method"].is_null() && e["upstream_host"] == format!("{vm2_addr}:8081"))
        .unwrap_or_else(|| panic!("no TCP entry: {src:#?}"));
    assert_eq!(tcp["response_code"], 0);
    assert_eq!(
        (tcp["bytes_received"].as_u64(), tcp["bytes_sent"].as_u64()),
        (Some(5), Some(10))
    );
    assert_eq!(tcp["destination_principal"], shop_id.as_str());

    // vm2 (text, destination).
    let dst = m.wait_log(a2, "vm2's access log entries", |log| {
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains(" reporter=destination "))
            .map(str::to_owned)
            .collect();
        (lines.len() >= 3).then_some(lines)
    });
    let line = |needle: &str| -> String {
        dst.iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no destination entry with {needle:?}: {dst:#?}"))
            .clone()
    };
    let ok = line("\"GET /ok HTTP/1.1\" 200 - ");
    assert!(
        ok.ends_with(&format!(
            " \"127.0.0.1:8080\" reporter=destination source_principal={client_id} destination_principal={shop_id} trace_id={trace}"
        )),
        "{ok}"
    );
    let failed = line("\"GET /status/500 HTTP/1.1\" 500 - ");
    assert!(
        failed.ends_with(&format!("trace_id={caller_trace}")),
        "{failed}"
    );
    let tcp = line("\"- - -\" 0 - 5 10 ");
    assert!(
        tcp.contains(&format!(
            " source_principal={client_id} destination_principal={shop_id} "
        )),
        "{tcp}"
    );

    // Spans: two per request, linked.
    let spans = wait_for("four spans at the receiver", WAIT, || {
        let s = exported(&spans_dir);
        (s.len() >= 4).then_some(s)
    });
    let of_trace = |t: &str| -> (Exported, Exported) {
        let mine: Vec<&Exported> = spans
            .iter()
            .filter(|s| hex(&s.span.trace_id) == t)
            .collect();
        assert_eq!(mine.len(), 2, "trace {t}: {spans:#?}");
        let client = mine
            .iter()
            .find(|s| s.span.kind == 3)
            .expect("a client span");
        let server = mine
            .iter()
            .find(|s| s.span.kind == 2)
            .expect("a server span");
        ((*client).clone(), (*server).clone())
    };
    let (client, server) = of_trace(&trace);
    assert_eq!(client.service, "client.default");
    assert_eq!(server.service, "shop.default");
    assert!(
        client.span.parent_span_id.is_empty(),
        "vm1 started the trace"
    );
    assert_eq!(
        server.span.parent_span_id, client.span.span_id,
        "vm2's span is the child of vm1's"
    );
    assert_eq!(
        hex(&server.span.span_id),
        app_parent,
        "the app's parent is vm2's span"
    );
    assert_eq!(
        string_attr(&server.span.attributes, "http.response.status_code"),
        "200"
    );
    assert_eq!(string_attr(&client.span.attributes, "url.path"), "/ok");
    assert_eq!(
        string_attr(&server.span.attributes, "source.principal"),
        client_id
    );
    let (client, server) = of_trace(caller_trace);
    assert_eq!(hex(&client.span.parent_span_id), caller_span);
    assert_eq!(server.span.parent_span_id, client.span.span_id);
    assert_eq!(
        server.span.status.as_ref().map(|s| s.code),
        Some(2),
        "500 is an error"
    );
    assert!(
        m.procs
            .iter()
            .any(|p| p.log().contains("POST /v1/traces application/x-protobuf")),
        "{}",
        m.logs()
    );
    // Each agent counts what it exported (and dropped nothing).
    for vm in ["vm1", "vm2"] {
        let node = m.lab.node(vm).clone();
        let metrics = wait_for(&format!("{vm}'s exported spans counted"), WAIT, || {
            let text = node.sh_ok("curl -s http://127.0.0.1:15020/metrics");
            text.lines()
                .any(|l| l == "causeway_agent_spans_exported_total 2")
                .then_some(text)
        });
        for line in [
            "causeway_agent_spans_dropped_total{reason=\"queue_full\"} 0",
            "causeway_agent_spans_dropped_total{reason=\"export_failed\"} 0",
            "causeway_agent_access_log_dropped_total 0",
        ] {
            assert!(
                metrics.lines().any(|l| l == line),
                "{vm}: {line}\n{metrics}"
            );
        }
    }
}

/// Through two agents with HTTP proxies at both ends (`http:8080`, `http2-h2c:8082`,
/// `grpc:8083`): an h2c GET stays HTTP/2; a gRPC call gets its body and trailers; a
/// WebSocket-style Upgrade switches and echoes; a server that drops the connection
/// mid-body gives the client an error, not a hang; and bad input stays on its connection:
/// a malformed head gets 400 and a head over the limit 431 while a keep-alive connection
/// opened before goes on working.
#[test]
fn protocols_and_bad_input_through_two_agents() {
    let mut m = Mesh::new(&["http:8080", "http2-h2c:8082", "grpc:8083"]);
    let s1 = m.join("vm1", "client");
    let s2 = m.join("vm2", "shop");
    for port in [8080, 8082, 8083] {
        m.app("vm2", port);
    }
    m.agent("vm2", &s2, "");
    m.agent("vm1", &s1, "");
    let vm2_addr = m.lab.node("vm2").addr.to_string();
    let vip = wait_routed(&s1, "default/shop", &vm2_addr);

    let out = m.probe(&["h2c", &format!("http://{vip}:8082/h2")]);
    // The source agent adds a traceparent (trace_sampling's default is 1 %).
    assert!(
        out.starts_with("200 HTTP/2.0 GET /h2 HTTP/2.0 traceparent=00-"),
        "{out}\n{}",
        m.logs()
    );

    let out = m.probe(&["grpc", &format!("http://{vip}:8083/grpc")]);
    assert_eq!(
        out.trim(),
        "status=200 body=10 grpc-status=0 x-trailer=kept",
        "{}",
        m.logs()
    );

    let out = m.probe(&["ws", &vip, "8080"]);
    assert_eq!(out.trim(), "upgraded echo=ping", "{}", m.logs());

    let out = m.probe(&["cut", &format!("http://{vip}:8080/cut")]);
    assert!(out.starts_with("error: "), "{out}\n{}", m.logs());

    // A1 and A2 are two requests on one keep-alive connection, before and after B and C.
    let out = m.probe(&["bad", &vip, "8080"]);
    assert_eq!(out.trim(), "A1=200 B=400 C=431 A2=200", "{}", m.logs());
}
