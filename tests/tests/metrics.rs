//! Metrics end to end: the controller's `/metrics` (its own listener) and the agent's
//! 15020 endpoint, with real processes on loopback. `promtool check metrics` (Debian
//! package `prometheus`, installed by `scripts/install-deps-metrics.sh`) must accept both
//! expositions; the values follow what happened (a join, a refused join, a config push
//! acknowledged, a synced file source); the agent's log level changes at run time.
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::io::{Read as _, Write as _};
use std::process::{Command, Stdio};
use std::time::Duration;

use causeway_tests::*;

const WAIT: Duration = Duration::from_secs(30);

/// One HTTP/1.1 request to `addr` (`host:port`); the whole response as text.
fn http(addr: &str, method: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    out
}

/// GET `path` and return the body, asserting 200.
fn get_body(addr: &str, path: &str) -> String {
    let r = http(addr, "GET", path);
    assert!(r.starts_with("HTTP/1.1 200 "), "GET {path}: {r}");
    r.split_once("\r\n\r\n").expect("head end").1.to_owned()
}

/// The value of the sample line `series` (name and labels exactly) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().expect("a number"))
}

/// Runs `promtool check metrics` on `text`, asserting it finds no problem.
fn promtool_ok(what: &str, text: &str) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot run promtool ({e}); install it: apt-get install prometheus (scripts/install-deps-metrics.sh)"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics refused the {what} metrics: {}\n{text}",
        describe(&out)
    );
}

#[test]
fn both_endpoints_pass_promtool_and_count_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let services = root.join("services.toml");
    std::fs::write(
        &services,
        "[[services]]\nname = \"pay\"\nnamespace = \"ext\"\nports = { http = 80 }\n[[services.endpoints]]\naddress = \"203.0.113.10\"\n",
    )
    .unwrap();
    let ctl = Controller::start_with_config(
        &root.join("c"),
        &format!(
            "[[sources.file]]\nname = \"ext\"\npath = {:?}\n",
            services.to_str().unwrap()
        ),
    );
    let metrics = ctl
        .metrics
        .strip_prefix("http://")
        .expect("http URL")
        .to_owned();
    ctl.create_web_group();

    // One join that works, one refused (the token is spent).
    let token = ctl.token("web", &[]);
    let state = root.join("vm1");
    join_ok(&token, &state);
    let err = join_err(&token, &root.join("vm2"));
    assert!(err.contains("already been used"), "{err}");

    let health = format!("127.0.0.1:{}", unshared_port());
    let agent = AgentProcess::start_with(
        &state,
        &format!(
            "[identity]\nretry_min = \"100ms\"\nretry_max = \"1s\"\n[health]\nlisten = \"{health}\"\n"
        ),
        &["--address", "127.0.0.21"],
    );
    wait_for("the agent ready on its health endpoint", WAIT, || {
        std::net::TcpStream::connect(&health).ok()?;
        http(&health, "GET", "/healthz/ready")
            .starts_with("HTTP/1.1 200 ")
            .then_some(())
    });

    // A change pushed to the agent: once it is acknowledged, the push lag has a sample.
    let before = ctl.mesh_version();
    std::fs::write(
        services.with_extension("tmp"),
        "[[services]]\nname = \"pay\"\nnamespace = \"ext\"\nports = { http = 80 }\n[[services.endpoints]]\naddress = \"203.0.113.11\"\n",
    )
    .unwrap();
    std::fs::rename(services.with_extension("tmp"), &services).unwrap();
    let c = wait_for(
        "the change acknowledged and its push lag recorded",
        WAIT,
        || {
            let v = ctl.mesh_version();
            let st = agent.status();
            let text = get_body(&metrics, "/metrics");
            let lagged = sample(&text, "causeway_controller_push_lag_seconds_count")? >= 1.0;
            (v > before && st["config_version"].as_u64() == Some(v) && lagged).then_some(text)
        },
    );
    for (series, want) in [
        ("causeway_controller_connected_agents", 1.0),
        ("causeway_controller_joins_total{outcome=\"ok\"}", 1.0),
        (
            "causeway_controller_joins_total{outcome=\"token_spent\"}",
            1.0,
        ),
        (
            "causeway_controller_source_state{source=\"ext\",kind=\"file\",state=\"synced\"}",
            1.0,
        ),
        (
            "causeway_controller_source_state{source=\"ext\",kind=\"file\",state=\"stale\"}",
            0.0,
        ),
        (
            "causeway_controller_source_stale_seconds{source=\"ext\"}",
            0.0,
        ),
        ("causeway_controller_source_endpoints{source=\"ext\"}", 1.0),
    ] {
        assert_eq!(sample(&c, series), Some(want), "{series} in\n{c}");
    }
    // The agent's workload and the file's service.
    assert!(
        sample(&c, "causeway_controller_registry_services").unwrap() >= 2.0,
        "{c}"
    );
    assert!(
        sample(&c, "causeway_controller_registry_endpoints").unwrap() >= 2.0,
        "{c}"
    );
    assert!(
        c.contains("causeway_controller_push_lag_seconds_bucket{le=\"+Inf\"}"),
        "{c}"
    );
    let r = http(&metrics, "GET", "/metrics");
    assert!(
        r.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{r}"
    );
    promtool_ok("controller", &c);

    let a = get_body(&health, "/metrics");
    for (series, want) in [
        ("causeway_agent_ready", 1.0),
        ("causeway_agent_controller_connected", 1.0),
        ("causeway_agent_config_version", ctl.mesh_version() as f64),
        ("causeway_agent_outlier_ejections_total", 0.0),
        ("causeway_agent_outlier_ejections_active", 0.0),
    ] {
        assert_eq!(sample(&a, series), Some(want), "{series} in\n{a}");
    }
    assert!(
        a.contains("# TYPE causeway_agent_tunnel_connect_duration_seconds histogram"),
        "{a}"
    );
    promtool_ok("agent", &a);

    // The log level, changed at run time from loopback.
    let r = http(&health, "PUT", "/logging?level=info,causeway_agent%3Ddebug");
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    assert!(get_body(&health, "/logging").contains("causeway_agent=debug"));
    let r = http(&health, "PUT", "/logging?level=causeway_agent%3Dloud");
    assert!(
        r.starts_with("HTTP/1.1 400 ") && r.contains("causeway_agent=loud"),
        "{r}"
    );
    // The refused filter changed nothing.
    assert!(get_body(&health, "/logging").contains("causeway_agent=debug"));
}

#[test]
fn a_taken_metrics_port_stops_the_controller_naming_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("causeway-controller"))
        .args(["--data-dir", dir.path().join("d").to_str().unwrap()])
        .args([
            "--admin-listen",
            "127.0.0.1:0",
            "--control-listen",
            "127.0.0.1:0",
        ])
        .args(["--metrics-listen", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&addr) && err.contains("metrics.listen"),
        "{err}"
    );
}
