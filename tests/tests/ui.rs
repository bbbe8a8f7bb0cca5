//! The controller's web UI: a real browser (headless Chromium driven by selenium,
//! `tests/ui/browse.py`) logs in through `causewayctl ui`'s one-time URL and reads every
//! page; plain HTTP checks refusals (no cookie, forged or logged-out cookie, a replayed
//! code, a huge search) and the security headers.
//!
//! Tools: `chromium`, `chromium-driver` and `python3-selenium` (Debian's python3), from
//! `scripts/install-deps-ui.sh`. Screenshots go to `$CAUSEWAY_CI_OUT/ui` (default
//! `target/ci-out/ui` in the workspace).
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use causeway_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const AGENT_CFG: &str = "[identity]\nretry_min = \"100ms\"\nretry_max = \"1s\"\n";
/// Debian's python3, where `python3-selenium` installs (PATH may name another one).
const PYTHON: &str = "/usr/bin/python3";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Where screenshots go: `$CAUSEWAY_CI_OUT/ui`, else `target/ci-out/ui`.
fn out_dir() -> PathBuf {
    let base = std::env::var_os("CAUSEWAY_CI_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target").join("ci-out"));
    let dir = base.join("ui");
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    dir
}

/// Fails with the fix when the browser tools are missing.
fn require_browser() {
    let mut missing = Vec::new();
    for (path, pkg) in [
        ("/usr/bin/chromium", "chromium"),
        ("/usr/bin/chromedriver", "chromium-driver"),
    ] {
        if !Path::new(path).exists() {
            missing.push(pkg);
        }
    }
    let selenium = Command::new(PYTHON)
        .args(["-c", "import selenium"])
        .status()
        .is_ok_and(|s| s.success());
    if !selenium {
        missing.push("python3-selenium");
    }
    assert!(
        missing.is_empty(),
        "the browser test needs {}: run scripts/install-deps-ui.sh (apt-get install chromium chromium-driver python3-selenium)",
        missing.join(", ")
    );
}

/// Runs `tests/ui/browse.py` and returns its JSON report (last line of stdout).
fn browse(args: &[&str]) -> Value {
    let script = workspace().join("tests/ui/browse.py");
    let out = Command::new(PYTHON)
        .arg(&script)
        .args(args)
        .output()
        .expect("run tests/ui/browse.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("browse.py gave no report: {}", describe(&out)));
    for c in report["checks"].as_array().into_iter().flatten() {
        println!("ok: {}", c.as_str().unwrap_or_default());
    }
    report
}

/// One HTTP exchange: status, headers and body.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> String {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn http(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Answer {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let mut req = client.request(method.parse().expect("method"), url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        let resp = req.send().await.expect("admin listener reachable");
        Answer {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.text().await.unwrap_or_default(),
        }
    })
}

fn assert_security_headers(a: &Answer, what: &str) {
    let csp = a.header("content-security-policy");
    assert!(
        csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{what}: CSP {csp:?}"
    );
    assert!(!csp.contains("unsafe-inline"), "{what}: CSP {csp:?}");
    assert_eq!(a.header("x-frame-options"), "DENY", "{what}");
    assert_eq!(a.header("cache-control"), "no-store", "{what}");
    assert_eq!(a.header("x-content-type-options"), "nosniff", "{what}");
}

fn login_url(ctl: &Controller) -> String {
    let url = ctl.ctl_ok(&["ui", "--print-url"]);
    assert_eq!(
        url.lines().count(),
        1,
        "--print-url prints the URL alone: {url:?}"
    );
    let url = url.trim().to_owned();
    assert!(
        url.starts_with(&format!("{}/ui/login#code=", ctl.admin)),
        "{url}"
    );
    url
}

fn code_of(url: &str) -> &str {
    url.split_once("#code=").expect("code in fragment").1
}

fn session_cookie(a: &Answer) -> String {
    let set = a.header("set-cookie");
    set.split(';')
        .next()
        .filter(|c| c.starts_with("causeway_ui="))
        .unwrap_or_else(|| panic!("no session cookie in {set:?}"))
        .to_owned()
}

#[test]
fn refusals_and_security_headers_without_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start(&dir.path().join("c"), &[]);
    let base = ctl.admin.clone();
    let token = std::fs::read_to_string(ctl.data_dir.join("admin.token")).unwrap();
    let token = token.trim();

    // No cookie: data and pages are refused with a message; the page sends to login.
    let a = http("GET", &format!("{base}/ui/api/services"), &[], None);
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("not logged in"),
        "{}",
        a.body
    );
    assert_security_headers(&a, "401 from the API");
    let a = http("GET", &format!("{base}/ui/services"), &[], None);
    assert_eq!(a.status, 401);
    assert!(
        a.body.contains("url=/ui/login") && a.body.contains("Not logged in"),
        "{}",
        a.body
    );
    assert_security_headers(&a, "401 page");
    // The login page and the scripts are public, with the same headers.
    for path in [
        "/ui/login",
        "/ui/assets/app.js",
        "/ui/assets/login.js",
        "/ui/assets/app.css",
    ] {
        let a = http("GET", &format!("{base}{path}"), &[], None);
        assert_eq!(a.status, 200, "{path}");
        assert_security_headers(&a, path);
    }
    let login = http("GET", &format!("{base}/ui/login"), &[], None).body;
    assert!(!login.contains("<script>"), "no inline script: {login}");

    // Login codes need the admin credential.
    let a = http("POST", &format!("{base}/v1/ui/login-codes"), &[], None);
    assert_eq!(a.status, 401, "{}", a.body);
    let wrong = http(
        "POST",
        &format!("{base}/v1/ui/login-codes"),
        &[("authorization", "Bearer not-the-token")],
        None,
    );
    assert_eq!(wrong.status, 401, "{}", wrong.body);

    // A code works once.
    let url = login_url(&ctl);
    let body = format!("{{\"code\":\"{}\"}}", code_of(&url));
    let ok = http("POST", &format!("{base}/ui/api/session"), &[], Some(&body));
    assert_eq!(ok.status, 200, "{}", ok.body);
    let set = ok.header("set-cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set.contains(attr), "cookie lacks {attr}: {set}");
    }
    let cookie = session_cookie(&ok);
    let again = http("POST", &format!("{base}/ui/api/session"), &[], Some(&body));
    assert_eq!(again.status, 401, "{}", again.body);
    assert!(
        again.json()["error"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{}",
        again.body
    );
    let unknown = http(
        "POST",
        &format!("{base}/ui/api/session"),
        &[],
        Some("{\"code\":\"0123456789abcdef\"}"),
    );
    assert_eq!(unknown.status, 401);
    assert!(
        unknown.body.contains("unknown or expired"),
        "{}",
        unknown.body
    );
    let garbage = http(
        "POST",
        &format!("{base}/ui/api/session"),
        &[],
        Some("{\"code\":"),
    );
    assert_eq!(garbage.status, 400, "{}", garbage.body);
    assert!(garbage.body.contains("login request"), "{}", garbage.body);

    // The session reads data, with the headers.
    let a = http(
        "GET",
        &format!("{base}/ui/api/overview"),
        &[("cookie", &cookie)],
        None,
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_security_headers(&a, "overview data");
    assert_eq!(a.json()["agents"]["total"], 0);
    let a = http(
        "GET",
        &format!("{base}/ui/services"),
        &[("cookie", &cookie)],
        None,
    );
    assert_eq!(a.status, 200);
    assert!(
        a.body.contains("<script src=\"/ui/assets/app.js\""),
        "{}",
        a.body
    );
    assert!(a.body.contains("aria-current=\"page\""), "{}", a.body);
    assert_security_headers(&a, "services page");
    let a = http(
        "GET",
        &format!("{base}/ui/api/traffic"),
        &[("cookie", &cookie)],
        None,
    );
    assert_eq!(a.json()["edges"], serde_json::json!([]));
    assert!(
        a.json()["message"]
            .as_str()
            .unwrap()
            .contains("no traffic data yet")
    );

    // A huge search string, and paging out of range: 400 with the limit.
    let huge = "x".repeat(10_000);
    let a = http(
        "GET",
        &format!("{base}/ui/api/services?q={huge}"),
        &[("cookie", &cookie)],
        None,
    );
    assert_eq!(a.status, 400, "{}", &a.body[..a.body.len().min(300)]);
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("10000 characters long; at most 256"),
        "{}",
        a.body
    );
    let a = http(
        "GET",
        &format!("{base}/ui/api/agents?per_page=100000"),
        &[("cookie", &cookie)],
        None,
    );
    assert_eq!(a.status, 400);
    assert!(
        a.body.contains("per_page") && a.body.contains("1 to 500"),
        "{}",
        a.body
    );

    // A forged cookie, and a logged-out one: 401 that says to log in again.
    let forged = format!("causeway_ui={}", "ab".repeat(32));
    for c in [forged.as_str(), "causeway_ui="] {
        let a = http(
            "GET",
            &format!("{base}/ui/api/agents"),
            &[("cookie", c)],
            None,
        );
        assert_eq!(a.status, 401, "{c}: {}", a.body);
        assert!(a.body.contains("log in again"), "{}", a.body);
    }
    let out = http(
        "DELETE",
        &format!("{base}/ui/api/session"),
        &[("cookie", &cookie)],
        None,
    );
    assert_eq!(out.status, 204);
    assert!(out.header("set-cookie").contains("Max-Age=0"));
    let a = http(
        "GET",
        &format!("{base}/ui/api/agents"),
        &[("cookie", &cookie)],
        None,
    );
    assert_eq!(a.status, 401, "a logged-out session is refused: {}", a.body);

    // The admin token in the form: wrong one refused, right one logs in.
    let a = http(
        "POST",
        &format!("{base}/ui/api/session"),
        &[],
        Some("{\"token\":\"guess\"}"),
    );
    assert_eq!(a.status, 401);
    assert!(
        a.body.contains("not the controller's admin token"),
        "{}",
        a.body
    );
    let a = http(
        "POST",
        &format!("{base}/ui/api/session"),
        &[],
        Some(&format!("{{\"token\":\"{token}\"}}")),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let cookie = session_cookie(&a);
    let a = http(
        "GET",
        &format!("{base}/ui/api/version"),
        &[("cookie", &cookie)],
        None,
    );
    assert_eq!(a.status, 200);
    assert!(a.json()["etag"].is_string());

    // Nothing secret in the controller's log.
    let log = ctl.log();
    assert!(!log.contains(code_of(&url)), "login code logged:\n{log}");
    assert!(!log.contains(token), "admin token logged");
}

/// Services of the file source: a conflict (an endpoint inside the VIP range is refused).
const SERVICES: &str = r#"
[[services]]
name = "payments"
namespace = "external"
ports = { https = 443 }
[[services.endpoints]]
address = "203.0.113.10"
[[services.endpoints]]
address = "203.0.113.11"
zone = "eu-west-1a"
[[services.endpoints]]
address = "240.240.0.9"

[[services]]
name = "ledger"
namespace = "finance"
ports = { tcp = 5432 }
[[services.endpoints]]
address = "198.51.100.7"
"#;

#[test]
fn a_browser_logs_in_once_and_reads_every_page() {
    require_browser();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let services = root.join("services.toml");
    std::fs::write(&services, SERVICES).unwrap();
    let ctl = Controller::start_with_config(
        &root.join("c"),
        &format!(
            "[[sources.file]]\nname = \"ext\"\npath = {:?}\n",
            services.to_str().unwrap()
        ),
    );
    ctl.create_web_group();
    let policy = root.join("deny.yaml");
    std::fs::write(
        &policy,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: web-admin\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      causeway.io/group: billing\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin\"]\n",
    )
    .unwrap();
    ctl.ctl_ok(&["apply", "-f", policy.to_str().unwrap()]);
    let state = root.join("vm1");
    join_ok(&ctl.token("web", &[]), &state);
    let id = agent_id(&state);
    let _agent = AgentProcess::start(&state, AGENT_CFG);
    wait_for(
        "the agent connected with its workload registered",
        WAIT,
        || {
            let a = ctl.agents().into_iter().find(|a| a["id"] == id.as_str())?;
            let registered = ctl
                .ctl_json(&["registry", "list"])
                .as_array()?
                .iter()
                .any(|s| s["name"] == "web" && s["namespace"] == "default");
            (a["connected"] == true && registered).then_some(())
        },
    );
    wait_for("the file source synced", WAIT, || {
        let list = ctl.ctl_json(&["registry", "list"]);
        list.as_array()?
            .iter()
            .any(|s| s["name"] == "ledger")
            .then_some(())
    });

    let url = login_url(&ctl);
    let out = out_dir();
    let report = browse(&[
        "--mode",
        "full",
        "--url",
        &url,
        "--base",
        &ctl.admin,
        "--out",
        out.to_str().unwrap(),
        "--service",
        "external/payments",
        "--service",
        "finance/ledger",
        "--service",
        "default/web",
        "--source",
        "ext",
        "--source",
        "agents",
        "--agent",
        &id,
        "--search",
        "ledger",
        "--policy",
        "default/web-admin",
        "--why-from",
        "web",
        "--why-to",
        "web.default:8080",
        "--why-expect",
        "ALLOW",
        "--live-file",
        services.to_str().unwrap(),
        "--live-append",
        "[[services]]\nname = \"reports\"\nnamespace = \"finance\"\nports = { http = 80 }\n[[services.endpoints]]\naddress = \"198.51.100.8\"",
        "--live-service",
        "finance/reports",
    ]);
    assert_eq!(
        report["errors"],
        serde_json::json!([]),
        "browser checks failed: {report:#}\ncontroller log:\n{}",
        ctl.log()
    );
    for page in [
        "overview",
        "services",
        "agents",
        "traffic",
        "policy",
        "login-refused",
    ] {
        let png = out.join(format!("{page}.png"));
        let len = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
        assert!(len > 1000, "screenshot {} missing or empty", png.display());
    }
    println!(
        "screenshots in {}; login to services page: {} ms",
        out.display(),
        report["timings"]["login_to_services_ms"]
    );
}

#[test]
fn ten_thousand_services_page_on_the_server() {
    require_browser();
    const N: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let services = root.join("services.toml");
    let mut text = String::with_capacity(N * 120);
    for i in 0..N {
        text.push_str(&format!(
            "[[services]]\nname = \"svc-{i:05}\"\nnamespace = \"ns-{}\"\nports = {{ http = 80 }}\n[[services.endpoints]]\naddress = \"10.{}.{}.{}\"\n",
            i % 20,
            i / 65536 % 256 + 100,
            i / 256 % 256,
            i % 256
        ));
    }
    std::fs::write(&services, text).unwrap();
    let ctl = Controller::start_with_config(
        &root.join("c"),
        &format!(
            "[[sources.file]]\nname = \"bulk\"\npath = {:?}\n",
            services.to_str().unwrap()
        ),
    );
    wait_for(
        "10k services in the registry",
        Duration::from_secs(120),
        || (ctl.api("/v1/mesh")["services"].as_u64() == Some(N as u64)).then_some(()),
    );
    let url = login_url(&ctl);
    let report = browse(&[
        "--mode",
        "perf",
        "--url",
        &url,
        "--base",
        &ctl.admin,
        "--out",
        out_dir().to_str().unwrap(),
        "--expect-total",
        "10000",
        "--search",
        "svc-09999",
    ]);
    assert_eq!(
        report["errors"],
        serde_json::json!([]),
        "browser checks failed: {report:#}"
    );
    let t = &report["timings"];
    println!(
        "services page with {N} services: first render {} ms after navigation start (after login), reload {} ms render / {} ms wall",
        t["services_first_render_ms"], t["services_reload_render_ms"], t["services_reload_wall_ms"]
    );
}

/// HTTP/1.1 server on argv[1]: `/fail…` answers 500, the rest 200.
const HTTP_SERVER_PY: &str = r#"
import sys
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        code = 500 if self.path.startswith("/fail") else 200
        body = b"ok\n"
        self.send_response(code); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

/// A client that keeps calling argv[1]:argv[2] (two 200s and one 500 a round) until
/// killed, so the traffic stays fresh however long the browser takes.
const HTTP_LOOP_PY: &str = r#"
import http.client, sys, time
while True:
    try:
        c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=5)
        for p in ("/ok", "/ok", "/fail"):
            c.request("GET", p); r = c.getresponse(); r.read()
            print(r.status, flush=True)
        c.close()
    except Exception as e:
        print("error:", e, flush=True)
    time.sleep(0.3)
"#;

/// Two VMs with agents in network namespaces: vm1 (group `client`) calls vm2's HTTP
/// service `shop/web` through the mesh. The agents' traffic summaries reach the
/// controller over the push channel: `GET /v1/traffic` has the edge as the destination
/// saw it (mutual TLS, with errors), and the browser's traffic page shows it in the
/// graph and the table. Needs root.
#[test]
fn the_traffic_page_shows_the_edge_between_two_agents() {
    use causeway_tests::netns::{Lab, Proc, require_root};
    require_browser();
    require_root("the traffic page test");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let lab = Lab::new(&["ctl", "vm1", "vm2"]);
    let mut procs: Vec<Proc> = Vec::new();
    let data = root.join("controller");
    let ctl = lab.node("ctl").clone();
    let control = format!("{}:15012", ctl.addr);
    procs.push(Proc::spawn(
        &ctl,
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
    ));
    let endpoints: Value = wait_for("controller endpoints.json", WAIT, || {
        let text = std::fs::read_to_string(data.join("endpoints.json")).ok()?;
        serde_json::from_str(&text).ok()
    });
    let admin = endpoints["admin"].as_str().expect("admin").to_owned();
    let ctl_ok = |args: &[&str]| ctl.causewayctl(&admin, &data, args);
    for (group, sa, service, port) in [
        ("web", "web", "web", "http:8080"),
        ("client", "client", "client", "http:8081"),
    ] {
        ctl_ok(&[
            "group",
            "create",
            group,
            "--namespace",
            "shop",
            "--service-account",
            sa,
            "--service",
            service,
            "--port",
            port,
        ]);
    }
    let (vm1, vm2) = (lab.node("vm1").clone(), lab.node("vm2").clone());
    procs.push(Proc::spawn(
        &vm2,
        &root.join("vm2.http.log"),
        "python3",
        &["-c", HTTP_SERVER_PY, "8080"],
    ));
    let mut agent = |vm: &str, group: &str| {
        let token = ctl_ok(&["token", "create", "--group", group]);
        let state = root.join(vm);
        let node = lab.node(vm);
        let out = node
            .cmd(bin("causeway-agent"))
            .args(["join", token.trim(), "--state-dir", state.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "join {vm}: {}", describe(&out));
        let cfg = root.join(format!("{vm}.toml"));
        std::fs::write(&cfg, AGENT_CFG).unwrap();
        procs.push(Proc::spawn(
            node,
            &root.join(format!("{vm}.agent.log")),
            bin("causeway-agent"),
            &[
                "run",
                "--config",
                cfg.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
                "--address",
                &node.addr.to_string(),
            ],
        ));
        state
    };
    agent("vm2", "web");
    let s1 = agent("vm1", "client");
    let vm2_addr = vm2.addr.to_string();
    let vip = wait_for("shop/web routed at vm1", WAIT, || {
        let s: causeway_api::push::MeshState =
            serde_json::from_slice(&std::fs::read(s1.join("config.json")).ok()?).ok()?;
        let svc = s.services.get("shop/web")?;
        svc.endpoints.values().find(|e| e.address == vm2_addr)?;
        let rules = std::fs::read_to_string(s1.join("capture.rules")).ok()?;
        rules
            .contains(&format!("-d {vm2_addr}/32 "))
            .then_some(())?;
        svc.vip.map(|v| v.to_string())
    });
    procs.push(Proc::spawn(
        &vm1,
        &root.join("vm1.client.log"),
        "python3",
        &["-c", HTTP_LOOP_PY, &vip, "8080"],
    ));
    let logs = |procs: &[Proc]| -> String {
        procs
            .iter()
            .map(|p| format!("== {}\n{}", p.log.display(), p.log()))
            .collect()
    };

    // The admin API: the edge as the destination's agent saw it.
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let fetch = "import sys, urllib.request\nr = urllib.request.Request(sys.argv[1], headers={'Authorization': 'Bearer ' + sys.argv[2]})\nsys.stdout.write(urllib.request.urlopen(r, timeout=10).read().decode())\n";
    let mut last = Value::Null;
    let edge = wait_for_value(&mut last, || {
        let out = ctl
            .cmd("python3")
            .args(["-c", fetch, &format!("{admin}/v1/traffic"), token.trim()])
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    });
    let edge = edge.unwrap_or_else(|| {
        panic!(
            "no shop/client -> shop/web edge with errors in /v1/traffic: {last:#}\n{}",
            logs(&procs)
        )
    });
    assert_eq!(edge["reporter"], "destination", "{last:#}");
    assert_eq!(edge["mtls"], true, "{last:#}");
    assert_eq!(edge["protocol"], "http", "{last:#}");
    let errors = edge["error_rate"].as_f64().unwrap();
    assert!(errors > 0.0 && errors < 1.0, "{last:#}");
    assert!(edge["p99_ms"].as_u64().is_some(), "{last:#}");

    // The browser, in the controller's namespace (the admin API listens on its loopback).
    let url = ctl_ok(&["ui", "--print-url"]).trim().to_owned();
    let out_dir = out_dir();
    let script = workspace().join("tests/ui/browse.py");
    let out = ctl
        .cmd(PYTHON)
        .arg(&script)
        .args([
            "--mode",
            "traffic",
            "--url",
            &url,
            "--base",
            &admin,
            "--out",
            out_dir.to_str().unwrap(),
            "--edge-from",
            "shop/client",
            "--edge-to",
            "shop/web",
        ])
        .output()
        .expect("run tests/ui/browse.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("browse.py gave no report: {}", describe(&out)));
    for c in report["checks"].as_array().into_iter().flatten() {
        println!("ok: {}", c.as_str().unwrap_or_default());
    }
    assert_eq!(
        report["errors"],
        serde_json::json!([]),
        "browser checks failed: {report:#}\n{}",
        logs(&procs)
    );
    // Processes end before the namespaces they run in.
    drop(procs);
    drop(lab);
}

/// Polls `/v1/traffic` (through `get`) until the client -> web edge has errors; keeps
/// the last answer in `last`.
fn wait_for_value(last: &mut Value, mut get: impl FnMut() -> Option<Value>) -> Option<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while std::time::Instant::now() < deadline {
        if let Some(v) = get() {
            let found = v["edges"].as_array().and_then(|edges| {
                edges
                    .iter()
                    .find(|e| {
                        e["source"] == "shop/client"
                            && e["destination"] == "shop/web"
                            && e["error_rate"].as_f64().is_some_and(|r| r > 0.0)
                    })
                    .cloned()
            });
            *last = v;
            if found.is_some() {
                return found;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    None
}
