//! `causewayctl analyze` end to end: each check's condition created in a real mesh (real
//! controller and agents, fake registries, a hand-driven subscriber where an agent must
//! misbehave), asserting the code, the resource and the exit status; the demo's mesh
//! analyzes clean; files are checked offline without a controller; the JSON is stable.
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use causeway_agent::identity::StateDir;
use causeway_api::push::{AgentFrame, Hello, PushFrame, agent_frame, push_frame};
use causeway_api::wire::{self, ClientRequest, client_request};
use causeway_fakes::{ConsulRegistration, FakeConsul, Fault};
use causeway_tests::netns::{Lab, Proc, require_root};
use causeway_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const AGENT_CFG: &str = "[identity]\nretry_min = \"100ms\"\nretry_max = \"1s\"\n";
/// Exit status of `analyze` when it found what `--fail-on` fails on.
const FINDINGS: i32 = 3;

/// The report of `causewayctl analyze ARGS --output json`, with the exit status.
fn report(out: &Output) -> (i32, Vec<Value>) {
    let code = out.status.code().expect("exited");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("analyze prints JSON ({e}): {}", describe(out)));
    (code, v["messages"].as_array().expect("messages").clone())
}

fn analyze(ctl: &Controller, args: &[&str]) -> (i32, Vec<Value>) {
    let mut all = vec!["analyze"];
    all.extend_from_slice(args);
    all.extend(["--output", "json"]);
    let out = ctl.ctl(&all);
    assert!(
        out.status.success() || out.status.code() == Some(FINDINGS),
        "analyze could not run: {}",
        describe(&out)
    );
    report(&out)
}

fn find<'a>(messages: &'a [Value], code: &str, resource: &str) -> Option<&'a Value> {
    messages
        .iter()
        .find(|m| m["code"] == code && m["resource"] == resource)
}

/// Polls `analyze ARGS` until it reports `code` for `resource`; returns that message,
/// the exit status and every message.
fn wait_message(
    ctl: &Controller,
    args: &[&str],
    code: &str,
    resource: &str,
) -> (Value, i32, Vec<Value>) {
    wait_for(&format!("{code} for {resource}"), WAIT, || {
        let (status, messages) = analyze(ctl, args);
        find(&messages, code, resource)
            .cloned()
            .map(|m| (m, status, messages.clone()))
    })
}

/// Errors and warnings only.
fn serious(messages: &[Value]) -> Vec<&Value> {
    messages
        .iter()
        .filter(|m| m["level"] == "Error" || m["level"] == "Warning")
        .collect()
}

/// A bare subscriber that answers updates by hand (an agent that NACKs or stalls).
struct RawSubscriber {
    rt: tokio::runtime::Runtime,
    _conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl RawSubscriber {
    fn connect(state: &Path) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let id = StateDir::new(state).load().unwrap();
        let (conn, send, recv) = rt.block_on(async {
            let conn = causeway_agent::client::connect_mtls(&id, &id.info.controller)
                .await
                .unwrap();
            let (mut send, recv) = conn.open_bi().await.unwrap();
            let hello = ClientRequest {
                kind: Some(client_request::Kind::Subscribe(Hello {
                    last_version: 0,
                    address: "127.0.0.99".into(),
                    agent_version: env!("CARGO_PKG_VERSION").into(),
                    protocol: causeway_api::push::PROTOCOL,
                    ..Hello::default()
                })),
            };
            send.write_all(&wire::encode_frame(&hello)).await.unwrap();
            (conn, send, recv)
        });
        Self {
            rt,
            _conn: conn,
            send,
            recv,
        }
    }

    fn answer(&mut self, kind: agent_frame::Kind) {
        let bytes = wire::encode_frame(&AgentFrame { kind: Some(kind) });
        self.rt.block_on(self.send.write_all(&bytes)).unwrap();
    }

    /// The next config update's version.
    fn next_update(&mut self) -> u64 {
        loop {
            let frame = self.rt.block_on(async {
                let mut prefix = [0u8; 4];
                tokio::time::timeout(WAIT, self.recv.read_exact(&mut prefix))
                    .await
                    .expect("a frame in time")
                    .expect("stream open");
                let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
                self.recv.read_exact(&mut body).await.unwrap();
                wire::decode_body::<PushFrame>(&body).unwrap()
            });
            if let Some(push_frame::Kind::Update(u)) = frame.kind {
                return u.version;
            }
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const ALLOW_CLIENT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: web-allow
  namespace: default
spec:
  selector:
    matchLabels:
      causeway.io/group: web
  rules:
  - from:
    - source:
        principals: ["causeway.local/ns/default/sa/client"]
"#;

/// The demo's policy: web admits only a principal no group has.
const ALLOW_FRONTEND: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: web-allow
  namespace: default
spec:
  selector:
    matchLabels:
      causeway.io/group: web
  rules:
  - from:
    - source:
        principals: ["causeway.local/ns/default/sa/frontend"]
"#;

const DENY_ALL_WEB: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: default
spec:
  action: DENY
  rules:
  - {}
"#;

const TYPO_SELECTOR: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: typo
  namespace: default
spec:
  selector:
    matchLabels:
      causeway.io/group: wbe
  action: AUDIT
  rules:
  - {}
"#;

/// Agents on loopback: a clean mesh, then each identity, push and policy condition.
#[test]
fn live_conditions_of_agents_groups_tokens_push_and_policies() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let services = write(
        root,
        "services.toml",
        "[[services]]\nname = \"ledger\"\nnamespace = \"ext\"\nports = { http = 80 }\n[[services.endpoints]]\naddress = \"203.0.113.10\"\n",
    );
    let ctl = Controller::start_with_config(
        &root.join("c"),
        &format!(
            "[[sources.file]]\nname = \"ext\"\npath = {:?}\n",
            services.to_str().unwrap()
        ),
    );
    ctl.create_web_group();
    ctl.ctl_ok(&[
        "group",
        "create",
        "client",
        "--namespace",
        "default",
        "--service-account",
        "client",
        "--service",
        "client",
        "--port",
        "http:7070",
    ]);
    let join = |name: &str, group: &str| {
        let state = root.join(name);
        join_ok(&ctl.token(group, &[]), &state);
        state
    };
    let (web_state, client_state) = (join("web1", "web"), join("client1", "client"));
    let _web = AgentProcess::start_with(&web_state, AGENT_CFG, &["--address", "127.0.0.11"]);
    let mut client =
        AgentProcess::start_with(&client_state, AGENT_CFG, &["--address", "127.0.0.12"]);
    let (web_id, client_id) = (agent_id(&web_state), agent_id(&client_state));
    let current = |id: &str| {
        let v = ctl.mesh_version();
        ctl.agents().iter().any(|a| {
            a["id"] == id && a["connected"] == true && a["acked_version"].as_u64() == Some(v)
        })
    };
    wait_for("both agents connected and current", WAIT, || {
        (current(&web_id) && current(&client_id)).then_some(())
    });

    // The clean mesh, with a policy that fits it: nothing to report, exit 0.
    let policy = write(root, "allow.yaml", ALLOW_CLIENT);
    ctl.ctl_ok(&["apply", "-f", policy.to_str().unwrap()]);
    let (status, messages) = analyze(&ctl, &[]);
    assert_eq!(status, 0, "{messages:#?}");
    assert!(messages.is_empty(), "a clean mesh: {messages:#?}");

    // A file that would leave web unreachable, checked before applying it: CW0402 and
    // CW0403 name it, live state unchanged. Warnings fail only with --fail-on warning.
    let frontend = write(root, "frontend.yaml", ALLOW_FRONTEND);
    let f = frontend.to_str().unwrap();
    let (status, messages) = analyze(&ctl, &["-f", f]);
    assert_eq!(status, 0, "{messages:#?}");
    let m = find(&messages, "CW0403", "AuthorizationPolicy default/web-allow")
        .unwrap_or_else(|| panic!("CW0403: {messages:#?}"));
    assert_eq!(m["level"], "Warning");
    assert!(
        m["message"]
            .as_str()
            .unwrap()
            .contains("frontend.yaml doc 1"),
        "{m}"
    );
    assert!(
        find(&messages, "CW0402", "AuthorizationPolicy default/web-allow").is_some(),
        "{messages:#?}"
    );
    let (status, _) = analyze(&ctl, &["-f", f, "--fail-on", "warning"]);
    assert_eq!(status, FINDINGS);
    let (status, messages) = analyze(
        &ctl,
        &[
            "-f",
            f,
            "--fail-on",
            "warning",
            "--suppress",
            "CW0403=AuthorizationPolicy default/web-allow",
            "--suppress",
            "CW0402=*",
        ],
    );
    assert_eq!((status, messages.len()), (0, 0), "{messages:#?}");

    // A policy whose selector matches no workload (CW0401), a DENY shadowing the ALLOW
    // (CW0404).
    let typo = write(root, "typo.yaml", TYPO_SELECTOR);
    let deny = write(root, "deny.yaml", DENY_ALL_WEB);
    ctl.ctl_ok(&[
        "apply",
        "-f",
        typo.to_str().unwrap(),
        "-f",
        deny.to_str().unwrap(),
    ]);
    let (status, messages) = analyze(&ctl, &[]);
    assert_eq!(status, 0, "{messages:#?}");
    assert_eq!(
        find(&messages, "CW0401", "AuthorizationPolicy default/typo").unwrap()["level"],
        "Warning"
    );
    assert!(
        find(&messages, "CW0404", "AuthorizationPolicy default/web-allow").is_some(),
        "{messages:#?}"
    );
    ctl.ctl_ok(&["delete", "ap", "typo"]);
    ctl.ctl_ok(&["delete", "ap", "deny-all"]);

    // Certificates expiring within the threshold (24 h certificates, a 2-day threshold).
    let (status, messages) = analyze(&ctl, &["--cert-expiry-within", "2d"]);
    assert_eq!(status, 0);
    for id in [&web_id, &client_id] {
        let m = find(&messages, "CW0201", &format!("agent {id}"))
            .unwrap_or_else(|| panic!("{messages:#?}"));
        assert_eq!(m["level"], "Warning");
    }

    // A group without agents (Info), a token that expired unused (Warning).
    ctl.ctl_ok(&[
        "group",
        "create",
        "batch",
        "--namespace",
        "default",
        "--service-account",
        "batch",
    ]);
    let token: Value = serde_json::from_str(&ctl.ctl_ok(&[
        "token", "create", "--group", "batch", "--ttl", "1s", "--output", "json",
    ]))
    .unwrap();
    let token_id = token["id"].as_str().unwrap().to_owned();
    let (_, status, messages) = wait_message(&ctl, &[], "CW0204", &format!("token {token_id}"));
    assert_eq!(status, 0);
    assert_eq!(
        find(&messages, "CW0203", "group batch").unwrap()["level"],
        "Info"
    );
    let (status, _) = analyze(&ctl, &["--fail-on", "warning"]);
    assert_eq!(status, FINDINGS);

    // An agent that refuses the config: CW0301 with its reason, an Error (exit 3).
    let nacker_state = join("nacker", "web");
    let nacker_id = agent_id(&nacker_state);
    let mut nacker = RawSubscriber::connect(&nacker_state);
    let v = nacker.next_update();
    nacker.answer(agent_frame::Kind::Nack(causeway_api::push::Nack {
        version: v,
        error: "update refused by the test agent".into(),
        current_version: 0,
        rejected: Vec::new(),
    }));
    let (m, status, _) = wait_message(&ctl, &[], "CW0301", &format!("agent {nacker_id}"));
    assert_eq!(status, FINDINGS);
    assert_eq!(m["level"], "Error");
    assert!(
        m["message"]
            .as_str()
            .unwrap()
            .contains("refused by the test agent"),
        "{m}"
    );

    // An agent that stopped answering while the mesh moved on two versions: CW0302.
    let stalled_state = join("stalled", "web");
    let stalled_id = agent_id(&stalled_state);
    let mut stalled = RawSubscriber::connect(&stalled_state);
    let v = stalled.next_update();
    stalled.answer(agent_frame::Kind::Ack(causeway_api::push::Ack {
        version: v,
    }));
    wait_for("the stalled agent's ACK recorded", WAIT, || {
        ctl.agents()
            .iter()
            .any(|a| a["id"] == stalled_id.as_str() && a["acked_version"].as_u64() == Some(v))
            .then_some(())
    });
    for (i, addr) in ["203.0.113.11", "203.0.113.12"].iter().enumerate() {
        let before = ctl.mesh_version();
        std::fs::write(
            &services,
            format!("[[services]]\nname = \"ledger{i}\"\nnamespace = \"ext\"\nports = {{ http = 80 }}\n[[services.endpoints]]\naddress = \"{addr}\"\n"),
        )
        .unwrap();
        wait_for("the file change in the mesh", WAIT, || {
            (ctl.mesh_version() > before).then_some(())
        });
    }
    let (m, _, _) = wait_message(&ctl, &[], "CW0302", &format!("agent {stalled_id}"));
    assert_eq!(m["level"], "Warning");

    // An agent gone longer than the threshold: CW0202.
    client.kill();
    let (m, _, _) = wait_message(
        &ctl,
        &["--disconnected-after", "1s"],
        "CW0202",
        &format!("agent {client_id}"),
    );
    assert_eq!(m["level"], "Warning");
    drop((nacker, stalled));
}

/// Registry sources: ports that disagree between Consul and a file, a failing Consul,
/// and its endpoints stale longer than the threshold.
#[test]
fn registry_conditions_from_a_fake_consul_and_a_file() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let consul = rt.block_on(FakeConsul::start_empty()).unwrap();
    consul.register(&ConsulRegistration::new("api-1", "api", "192.0.2.1", 9090));
    let mut web = ConsulRegistration::new("web-1", "web", "192.0.2.2", 8080);
    web.meta.insert("protocol".into(), "http".into());
    consul.register(&web);
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "external.toml",
        "[[services]]\nname = \"api\"\nnamespace = \"default\"\nports = { tcp = 9091 }\n[[services.endpoints]]\naddress = \"192.0.2.11\"\n\n[[services]]\nname = \"web\"\nnamespace = \"default\"\nports = { grpc = 8080 }\n[[services.endpoints]]\naddress = \"192.0.2.12\"\n",
    );
    let ctl = Controller::start_with_config(
        &dir.path().join("c"),
        &format!(
            "[[sources.consul]]\nname = \"consul-dc1\"\naddress = \"{}\"\nnamespace = \"default\"\nwait = \"1s\"\nrequest_timeout = \"1s\"\nretry_initial = \"100ms\"\nretry_max = \"1s\"\n\n[[sources.file]]\nname = \"external\"\npath = {:?}\n",
            consul.url(),
            file.to_str().unwrap()
        ),
    );
    let (m, status, messages) = wait_message(&ctl, &[], "CW0101", "service default/api");
    assert_eq!(
        (m["level"].as_str(), status),
        (Some("Warning"), 0),
        "{messages:#?}"
    );
    let text = m["message"].as_str().unwrap();
    assert!(
        text.contains("9090 in consul-dc1") && text.contains("9091 in external"),
        "{text}"
    );
    let m =
        find(&messages, "CW0102", "service default/web").unwrap_or_else(|| panic!("{messages:#?}"));
    assert!(
        m["message"]
            .as_str()
            .unwrap()
            .contains("\"grpc\" in external"),
        "{m}"
    );
    assert!(find(&messages, "CW0104", "source consul-dc1").is_none());

    // Consul fails: the source is an Error at once, its stale endpoints a Warning past
    // the threshold.
    consul.set_fault(Fault::ServerError);
    let (m, status, _) = wait_message(&ctl, &[], "CW0104", "source consul-dc1");
    assert_eq!((m["level"].as_str(), status), (Some("Error"), FINDINGS));
    let (m, _, _) = wait_message(
        &ctl,
        &["--stale-after", "1s"],
        "CW0103",
        "source consul-dc1",
    );
    assert_eq!(m["level"], "Warning");
    assert!(
        m["message"]
            .as_str()
            .unwrap()
            .contains("2 endpoints are stale"),
        "{m}"
    );
}

/// A VIP range nearly used up is a Warning, a full one an Error.
#[test]
fn vip_range_nearly_exhausted_then_full() {
    let dir = tempfile::tempdir().unwrap();
    let services = |n: usize| -> String {
        (0..n)
            .map(|i| format!("[[services]]\nname = \"s{i}\"\nnamespace = \"ext\"\nports = {{ http = 80 }}\n[[services.endpoints]]\naddress = \"203.0.113.{}\"\n\n", i + 1))
            .collect()
    };
    let file = write(dir.path(), "services.toml", &services(13));
    let ctl = Controller::start_with_config(
        &dir.path().join("c"),
        &format!(
            "[mesh]\nvip_range = \"240.240.0.0/28\"\n[[sources.file]]\nname = \"ext\"\npath = {:?}\n",
            file.to_str().unwrap()
        ),
    );
    let (m, status, _) = wait_message(&ctl, &[], "CW0105", "mesh.vip_range");
    assert_eq!((m["level"].as_str(), status), (Some("Warning"), 0), "{m}");
    assert!(m["message"].as_str().unwrap().contains("13 of 14"), "{m}");
    std::fs::write(&file, services(14)).unwrap();
    let (m, status, _) = wait_for("CW0105 as an Error", WAIT, || {
        let (status, messages) = analyze(&ctl, &[]);
        find(&messages, "CW0105", "mesh.vip_range")
            .filter(|m| m["level"] == "Error")
            .cloned()
            .map(|m| (m, status, ()))
    });
    assert_eq!(status, FINDINGS, "{m}");
}

/// `analyze -f DIR --offline`: no controller (none is reachable), the one broken
/// document among valid ones named by file and document, exit 3; JSON is the contract.
#[test]
fn offline_files_name_the_broken_file_and_document() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    std::fs::create_dir(&pol).unwrap();
    write(&pol, "a-allow.yaml", ALLOW_CLIENT);
    write(
        &pol,
        "b-mixed.yaml",
        &format!(
            "{TYPO_SELECTOR}---\n{}",
            ALLOW_CLIENT
                .replace("  rules:", "  rulez:")
                .replace("web-allow", "broken")
        ),
    );
    write(&pol, "c-deny.yaml", DENY_ALL_WEB);
    let run = |extra: &[&str]| {
        let mut args = vec!["analyze", "-f", pol.to_str().unwrap(), "--offline"];
        args.extend_from_slice(extra);
        std::process::Command::new(bin("causewayctl"))
            .args(&args)
            // Nothing listens there, and no credential exists: offline needs neither.
            .env(
                "CAUSEWAY_CONTROLLER",
                format!("http://127.0.0.1:{}", unshared_port()),
            )
            .env(
                "CAUSEWAY_ADMIN_TOKEN_FILE",
                dir.path().join("no-such-token"),
            )
            .output()
            .unwrap()
    };
    let out = run(&["--output", "json"]);
    let (status, messages) = report(&out);
    assert_eq!(status, FINDINGS, "{}", describe(&out));
    let broken: Vec<&Value> = messages.iter().filter(|m| m["code"] == "CW0001").collect();
    assert_eq!(broken.len(), 1, "{messages:#?}");
    let resource = format!("{} doc 2", pol.join("b-mixed.yaml").display());
    assert_eq!(broken[0]["resource"], resource.as_str());
    assert_eq!(broken[0]["level"], "Error");
    assert!(
        broken[0]["message"].as_str().unwrap().contains("rulez"),
        "{}",
        broken[0]
    );
    // The valid files are analyzed: the DENY shadows the ALLOW (no live state needed).
    assert!(
        find(&messages, "CW0404", "AuthorizationPolicy default/web-allow").is_some(),
        "{messages:#?}"
    );
    // Live-only checks are skipped: nothing about selectors matching no group.
    assert!(
        !messages.iter().any(|m| m["code"] == "CW0401"),
        "{messages:#?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 error"),
        "{}",
        describe(&out)
    );

    // The schema: {"messages": [{code, level, resource, message, fix}]}, nothing else.
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["messages"]
    );
    for m in v["messages"].as_array().unwrap() {
        let obj = m.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["code", "fix", "level", "message", "resource"], "{m}");
        let code = m["code"].as_str().unwrap();
        assert!(
            code.len() == 6
                && code.starts_with("CW")
                && code[2..].bytes().all(|b| b.is_ascii_digit()),
            "{code}"
        );
        assert!(
            ["Error", "Warning", "Info"].contains(&m["level"].as_str().unwrap()),
            "{m}"
        );
        for k in ["resource", "message", "fix"] {
            assert!(!m[k].as_str().unwrap().is_empty(), "{m}");
        }
    }
    // YAML carries the same fields.
    let yaml = String::from_utf8(run(&["--output", "yaml"]).stdout).unwrap();
    assert!(
        yaml.starts_with("messages:")
            && yaml.contains("code: CW0001")
            && yaml.contains("level: Error"),
        "{yaml}"
    );
    // Suppressing the error: exit 0 (the warning does not fail by default).
    let out = run(&["--suppress", &format!("CW0001={resource}")]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CW0404") && text.contains("0 errors, 1 warning"),
        "{text}"
    );
}

fn logs(procs: &[Proc]) -> String {
    procs
        .iter()
        .map(|p| format!("== {}\n{}", p.log.display(), p.log()))
        .collect()
}

/// The demo's mesh (two VMs in network namespaces with capture and DNS capture on)
/// analyzes with no Error and no Warning; then capture drift, DNS capture removed, the
/// demo's policy and STRICT mTLS with an agentless client are each reported.
#[test]
fn the_demo_mesh_is_clean_then_dataplane_and_policy_problems_are_reported() {
    require_root("the demo-mesh analyze test");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let lab = Lab::new(&["ctl", "vm1", "vm2", "plain"]);
    let plain = lab.node("plain").addr;
    let services = write(
        root,
        "services.toml",
        &format!(
            "[[services]]\nname = \"plain\"\nnamespace = \"ext\"\nports = {{ tcp = 9090 }}\n[[services.endpoints]]\naddress = \"{plain}\"\n"
        ),
    );
    let cfg = write(
        root,
        "controller.toml",
        &format!(
            "[[sources.file]]\nname = \"ext\"\npath = {:?}\n",
            services.to_str().unwrap()
        ),
    );
    let data = root.join("controller");
    let ctl_node = lab.node("ctl").clone();
    let control = format!("{}:15012", ctl_node.addr);
    let mut procs = vec![Proc::spawn(
        &ctl_node,
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
    )];
    let endpoints: Value = wait_for("controller endpoints.json", WAIT, || {
        serde_json::from_str(&std::fs::read_to_string(data.join("endpoints.json")).ok()?).ok()
    });
    let admin = endpoints["admin"].as_str().unwrap().to_owned();
    let ctl_cmd = |args: &[&str]| -> Output {
        ctl_node
            .cmd(bin("causewayctl"))
            .args(args)
            .env("CAUSEWAY_CONTROLLER", &admin)
            .env("CAUSEWAY_ADMIN_TOKEN_FILE", data.join("admin.token"))
            .output()
            .unwrap()
    };
    let ctl_ok = |args: &[&str]| ctl_node.causewayctl(&admin, &data, args);
    let analyze = |args: &[&str]| {
        let mut all = vec!["analyze"];
        all.extend_from_slice(args);
        all.extend(["--output", "json"]);
        let out = ctl_cmd(&all);
        assert!(
            out.status.success() || out.status.code() == Some(FINDINGS),
            "{}",
            describe(&out)
        );
        report(&out)
    };
    for (group, port) in [("web", "http:8080"), ("client", "http:7070")] {
        ctl_ok(&[
            "group",
            "create",
            group,
            "--namespace",
            "default",
            "--service-account",
            group,
            "--service",
            group,
            "--port",
            port,
        ]);
    }
    let mut ids = Vec::new();
    for (vm, group) in [("vm1", "client"), ("vm2", "web")] {
        let token = ctl_ok(&["token", "create", "--group", group, "--ttl", "10m"]);
        let state = root.join(vm);
        let node = lab.node(vm).clone();
        let out = node
            .cmd(bin("causeway-agent"))
            .args(["join", token.trim(), "--state-dir", state.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "join {vm}: {}", describe(&out));
        ids.push(agent_id(&state));
        let addr = node.addr.to_string();
        procs.push(Proc::spawn(
            &node,
            &root.join(format!("{vm}.agent.log")),
            bin("causeway-agent"),
            &[
                "run",
                "--state-dir",
                state.to_str().unwrap(),
                "--address",
                &addr,
            ],
        ));
    }
    let (client_id, web_id) = (ids[0].clone(), ids[1].clone());
    // Both agents report their data plane: capture and DNS capture on.
    wait_for("both agents' data-plane facts", WAIT, || {
        let list: Value =
            serde_json::from_str(&ctl_ok(&["agent", "list", "--output", "json"])).ok()?;
        let rows = list.as_array()?;
        let ready = rows.len() == 2
            && rows.iter().all(|a| {
                a["connected"] == true
                    && a["session"]["facts"]["capture_enabled"] == true
                    && a["session"]["facts"]["dns_enabled"] == true
            });
        ready.then_some(())
    });
    let (status, messages) = wait_for("the demo mesh analyzed clean", WAIT, || {
        let (status, messages) = analyze(&[]);
        // Agents may still be one version behind right after the join.
        serious(&messages).is_empty().then_some((status, messages))
    });
    assert_eq!(status, 0, "{messages:#?}");

    // The demo's policy: web admits only a principal no group has (CW0402), so no
    // current client reaches it (CW0403).
    let frontend = write(root, "frontend.yaml", ALLOW_FRONTEND);
    ctl_ok(&["apply", "-f", frontend.to_str().unwrap()]);
    let (status, messages) = analyze(&[]);
    assert_eq!(status, 0, "{messages:#?}");
    for code in ["CW0402", "CW0403"] {
        assert!(
            find(&messages, code, "AuthorizationPolicy default/web-allow").is_some(),
            "{code}: {messages:#?}"
        );
    }
    // Its fix, checked as a file against the live mesh before applying it: clean.
    let fixed = write(root, "fixed.yaml", ALLOW_CLIENT);
    let (status, messages) = analyze(&["-f", fixed.to_str().unwrap(), "--fail-on", "warning"]);
    assert_eq!(status, 0, "{messages:#?}");
    ctl_ok(&["apply", "-f", fixed.to_str().unwrap()]);

    // STRICT for the mesh while the registry lists an agentless workload (plain).
    let strict = write(
        root,
        "strict.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: causeway-system\nspec:\n  mtls:\n    mode: STRICT\n",
    );
    ctl_ok(&["apply", "-f", strict.to_str().unwrap()]);
    let (status, messages) = analyze(&[]);
    let m = find(
        &messages,
        "CW0405",
        "PeerAuthentication causeway-system/default",
    )
    .unwrap_or_else(|| panic!("{messages:#?}"));
    assert_eq!((m["level"].as_str(), status), (Some("Warning"), 0));
    assert!(
        m["message"].as_str().unwrap().contains(&plain.to_string()),
        "{m}"
    );
    ctl_ok(&["delete", "pa", "default", "-n", "causeway-system"]);

    // Capture drift in vm1 (its jump removed): CW0601, an Error.
    lab.node("vm1")
        .sh_ok("iptables -t nat -D OUTPUT -j CAUSEWAY_OUTPUT");
    let (m, status) = wait_for("CW0601 for vm1's agent", WAIT, || {
        let (status, messages) = analyze(&[]);
        find(&messages, "CW0601", &format!("agent {client_id}"))
            .cloned()
            .map(|m| (m, status))
    });
    assert_eq!(
        (m["level"].as_str(), status),
        (Some("Error"), FINDINGS),
        "{m}\n{}",
        logs(&procs)
    );
    assert!(
        m["message"].as_str().unwrap().contains("CAUSEWAY_OUTPUT"),
        "{m}"
    );

    // DNS capture lost in vm2: another program takes the capture table (an nftables
    // table owned by its process) the moment the agent's own `nft -i` ends; the agent
    // cannot reinstall its capture while that table is held.
    let vm2 = lab.node("vm2").clone();
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", &vm2.ns])
        .output()
        .unwrap();
    let nft: Vec<String> = String::from_utf8_lossy(&pids.stdout)
        .split_whitespace()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "nft")
        })
        .map(str::to_owned)
        .collect();
    assert_eq!(
        nft.len(),
        1,
        "one nft -i holds vm2's DNS capture table: {nft:?}"
    );
    procs.push(Proc::spawn(
        &vm2,
        &root.join("vm2.holder.log"),
        "sh",
        &[
            "-c",
            &format!(
                "kill -KILL {}; {{ echo 'add table ip causeway_dns {{ flags owner; }}'; sleep 600; }} | nft -i",
                nft[0]
            ),
        ],
    ));
    let (m, status) = wait_for("CW0602 for vm2's agent", WAIT, || {
        let (status, messages) = analyze(&[]);
        find(&messages, "CW0602", &format!("agent {web_id}"))
            .cloned()
            .map(|m| (m, status))
    });
    assert_eq!(
        (m["level"].as_str(), status),
        (Some("Error"), FINDINGS),
        "{m}\n{}",
        logs(&procs)
    );
    drop(procs);
}

/// Routing checks against a live mesh (a file source with endpoints labelled by version):
/// a DestinationRule subset selecting no endpoint and two VirtualServices for one host
/// are applied and reported; `-f` with a host and a destination the registry lacks, with
/// weights off 100 and an undefined subset is reported with the file and document.
#[test]
fn routing_conditions_live_and_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "services.toml",
        "[[services]]\nname = \"web\"\nnamespace = \"default\"\nports = { http = 8080 }\n[[services.endpoints]]\naddress = \"192.0.2.21\"\nlabels = { version = \"v1\" }\n[[services.endpoints]]\naddress = \"192.0.2.22\"\nlabels = { version = \"v2\" }\n",
    );
    let ctl = Controller::start_with_config(
        &dir.path().join("c"),
        &format!(
            "[[sources.file]]\nname = \"ext\"\npath = {:?}\n",
            file.to_str().unwrap()
        ),
    );
    wait_for("service web in the registry", WAIT, || {
        let out = ctl.ctl(&["registry", "list", "--output", "json"]);
        String::from_utf8_lossy(&out.stdout)
            .contains("\"web\"")
            .then_some(())
    });
    let good = write(
        dir.path(),
        "routes.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: web, namespace: default}\nspec:\n  host: web\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n  - {name: v3, labels: {version: v3}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: default}\nspec:\n  hosts: [web]\n  http:\n  - route:\n    - {destination: {host: web, subset: v1}, weight: 90}\n    - {destination: {host: web.default, subset: v2}, weight: 10}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web-canary, namespace: default}\nspec:\n  hosts: [web.default.causeway]\n  http:\n  - route: [{destination: {host: web, subset: v2}}]\n",
    );
    let out = ctl.ctl(&["apply", "-f", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let (status, messages) = analyze(&ctl, &[]);
    let m = find(&messages, "CW0504", "DestinationRule default/web")
        .unwrap_or_else(|| panic!("{messages:#?}"));
    assert!(m["message"].as_str().unwrap().contains("\"v3\""), "{m}");
    assert_eq!(m["level"], "Warning");
    let m = find(&messages, "CW0506", "VirtualService default/web-canary")
        .unwrap_or_else(|| panic!("{messages:#?}"));
    assert!(
        m["message"]
            .as_str()
            .unwrap()
            .contains("VirtualService default/web"),
        "{m}"
    );
    assert!(
        find(&messages, "CW0506", "VirtualService default/web").is_none(),
        "the older one is not reported: {messages:#?}"
    );
    assert_eq!(status, 0, "warnings only: {messages:#?}");
    let (status, _) = analyze(&ctl, &["--fail-on", "warning"]);
    assert_eq!(status, FINDINGS);

    // Files checked against the live mesh before they are applied.
    let bad = write(
        dir.path(),
        "bad.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: shop, namespace: default}\nspec:\n  hosts: [shop]\n  http:\n  - route: [{destination: {host: cart}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: default}\nspec:\n  hosts: [web]\n  http:\n  - route: [{destination: {host: web, subset: v9}}]\n",
    );
    let (status, messages) = analyze(&ctl, &["-f", bad.to_str().unwrap()]);
    assert_eq!(status, FINDINGS, "{messages:#?}");
    let m = find(&messages, "CW0501", "VirtualService default/shop")
        .unwrap_or_else(|| panic!("{messages:#?}"));
    assert!(
        m["message"].as_str().unwrap().contains("bad.yaml doc 1"),
        "{m}"
    );
    let m = find(&messages, "CW0502", "VirtualService default/shop")
        .unwrap_or_else(|| panic!("{messages:#?}"));
    assert_eq!(m["level"], "Error");
    let m = find(&messages, "CW0503", "VirtualService default/web")
        .unwrap_or_else(|| panic!("{messages:#?}"));
    assert!(m["message"].as_str().unwrap().contains("v9"), "{m}");

    // Weights that do not add up are refused by validation: offline, CW0001 names the
    // file and document.
    let weights = write(
        dir.path(),
        "weights.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: default}\nspec:\n  hosts: [web]\n  http:\n  - route:\n    - {destination: {host: web}, weight: 60}\n    - {destination: {host: web}, weight: 60}\n",
    );
    let out = std::process::Command::new(bin("causewayctl"))
        .args([
            "analyze",
            "--offline",
            "-f",
            weights.to_str().unwrap(),
            "--output",
            "json",
        ])
        .env(
            "CAUSEWAY_CONTROLLER",
            format!("http://127.0.0.1:{}", unshared_port()),
        )
        .env(
            "CAUSEWAY_ADMIN_TOKEN_FILE",
            dir.path().join("no-such-token"),
        )
        .output()
        .unwrap();
    let (status, messages) = report(&out);
    assert_eq!(status, FINDINGS, "{messages:#?}");
    assert!(
        messages.iter().any(|m| m["code"] == "CW0001"
            && m["resource"]
                .as_str()
                .unwrap()
                .ends_with("weights.yaml doc 1")),
        "{messages:#?}"
    );
}
