//! Revocation end to end on loopback (issue 17): removing an agent denies every
//! certificate it was issued, not only the newest; join tokens are bound to their group's
//! identity, die with it, and can be revoked.
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use causeway_agent::dataplane::tunnel::{Header, Tunnel};
use causeway_agent::identity::StateDir;
use causeway_api::push::MeshState;
use causeway_tests::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const WAIT: Duration = Duration::from_secs(30);
const WEB_ID: &str = "spiffe://causeway.local/ns/default/sa/web";

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// An echo application on loopback (a task of `rt`); returns its port.
fn echo_app(rt: &tokio::runtime::Runtime) -> u16 {
    let l = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the echo app");
    let port = l.local_addr().expect("local addr").port();
    rt.spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// Through a fresh tunnel (no pooled connection) with the identity in `state_dir`, over
/// QUIC or TCP + TLS, to the web agent's tunnel at `peer`: sends `msg`, returns the echo.
fn round_trip(
    rt: &tokio::runtime::Runtime,
    state_dir: &Path,
    peer: SocketAddr,
    port: u16,
    tcp: bool,
    msg: &[u8],
) -> Result<Vec<u8>, String> {
    let identity = StateDir::new(state_dir).load().expect("identity files");
    rt.block_on(async {
        let state = causeway_agent::push::SharedState::new(MeshState::default());
        let t = Tunnel::bind(
            "127.0.0.1:0".parse().expect("address"),
            identity,
            state,
            causeway_agent::dataplane::tunnel::TunnelSettings::default(),
        )
        .map_err(|e| e.to_string())?;
        t.set_tcp_only(tcp);
        let header = Header {
            service: "default/web".into(),
            port,
        };
        let result = async {
            let o = t
                .open(peer, WEB_ID, &header)
                .await
                .map_err(|e| e.to_string())?;
            let (mut recv, mut send) = o.into_io();
            send.write_all(msg).await.map_err(|e| e.to_string())?;
            send.shutdown().await.map_err(|e| e.to_string())?;
            let mut back = Vec::new();
            recv.read_to_end(&mut back)
                .await
                .map_err(|e| e.to_string())?;
            Ok(back)
        };
        let r = tokio::time::timeout(WAIT, result)
            .await
            .unwrap_or_else(|_| Err("no answer".into()));
        t.close();
        r
    })
}

fn config(state: &Path) -> Value {
    std::fs::read(state.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// A copy of the identity files of `from` (what an attacker keeps before a renewal).
fn copy_identity(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("dir");
    for f in ["key.pem", "cert.pem", "bundle.pem", "agent.json"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
}

/// Issue 17 A: `agent remove` put only the agent's newest serial on the deny list, so a
/// copy of a certificate from before a renewal still reached a peer's application
/// through its tunnel. Now every unexpired certificate of the agent is denied: the
/// peer's tunnel refuses the old one over QUIC and over TCP + TLS, and the controller
/// refuses a renewal with it.
#[test]
fn a_removed_agents_earlier_certificate_is_refused_by_peer_tunnels_and_by_renewal() {
    let t = tmp();
    let rt = runtime();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    let app_port = echo_app(&rt);
    let port = format!("tcp:{app_port}");
    ctl.ctl_ok(&[
        "group",
        "create",
        "web",
        "--namespace",
        "default",
        "--service-account",
        "web",
        "--service",
        "web",
        "--port",
        &port,
    ]);
    ctl.ctl_ok(&[
        "group",
        "create",
        "client",
        "--namespace",
        "default",
        "--service-account",
        "client",
    ]);
    let web = t.path().join("web");
    join_ok(&ctl.token("web", &[]), &web);
    let e = t.path().join("e");
    join_ok(&ctl.token("client", &[]), &e);

    // The web agent: its tunnel on a port of its own, serving the echo app.
    let tunnel_port = unshared_port();
    let cfg = format!(
        "[identity]\nretry_min = \"100ms\"\nretry_max = \"1s\"\n[dataplane]\ntunnel_listen = \"127.0.0.1:{tunnel_port}\"\ntunnel_port = {tunnel_port}\noutbound_listen = \"127.0.0.1:0\"\n"
    );
    let w = AgentProcess::start_with(&web, &cfg, &["--address", "127.0.0.1"]);
    let web_id = agent_id(&web);
    wait_for("the web agent to serve its own workload", WAIT, || {
        config(&web)["services"]["default/web"]["endpoints"]
            .get(format!("agents/{web_id}"))
            .is_some()
            .then_some(())
    });
    let peer: SocketAddr = format!("127.0.0.1:{tunnel_port}").parse().unwrap();

    // Agent E keeps a copy of its first certificate, then renews.
    let old = t.path().join("e-old");
    copy_identity(&e, &old);
    let out = agent(&["renew", "--state-dir", e.to_str().unwrap()]);
    assert!(out.status.success(), "renew: {}", describe(&out));
    let (old_serial, new_serial) = (cert_of(&old).serial, cert_of(&e).serial);
    assert_ne!(old_serial, new_serial);

    // Before the removal both certificates reach the application on both transports
    // (so a refusal below is the deny list's doing, not the test's set-up).
    for tcp in [false, true] {
        for dir in [&old, &e] {
            let got = round_trip(&rt, dir, peer, app_port, tcp, b"before")
                .unwrap_or_else(|err| panic!("tcp={tcp}: {err}\n{}", w.log()));
            assert_eq!(got, b"before");
        }
    }

    ctl.ctl_ok(&["agent", "remove", &agent_id(&e)]);
    wait_for(
        "the web agent to apply the deny list of the removal",
        WAIT,
        || {
            let deny = config(&web)["deny_serials"].as_array()?.clone();
            deny.iter()
                .any(|s| s.as_str() == Some(new_serial.as_str()))
                .then_some(deny)
        },
    );
    for tcp in [false, true] {
        for dir in [&old, &e] {
            let r = round_trip(&rt, dir, peer, app_port, tcp, b"after the removal");
            assert!(
                r.is_err(),
                "tcp={tcp}: the removed agent's certificate {} reached the application: {r:?}",
                cert_of(dir).serial
            );
        }
    }
    let log = w.log();
    assert!(
        log.contains(&old_serial) && log.contains("deny list"),
        "the web agent names the denied serial: {log}"
    );

    // The controller refuses a renewal with the earlier certificate too.
    let out = agent(&["renew", "--state-dir", old.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("was removed"), "{err}");
    let removed = ctl.ctl_json(&["agent", "show", &agent_id(&e)]);
    assert_eq!(removed["renewals"], 1, "{removed}");
    let denied: Vec<&str> = removed["certificates"]
        .as_array()
        .expect("agent show lists the agent's certificates")
        .iter()
        .filter_map(|c| c["serial"].as_str())
        .collect();
    assert_eq!(
        denied,
        [old_serial.as_str(), new_serial.as_str()],
        "{removed}"
    );
}

fn create_group(ctl: &Controller, name: &str, namespace: &str, sa: &str) {
    ctl.ctl_ok(&[
        "group",
        "create",
        name,
        "--namespace",
        namespace,
        "--service-account",
        sa,
    ]);
}

fn token_state(ctl: &Controller, id: &str) -> Option<Value> {
    ctl.ctl_json(&["token", "list"])
        .as_array()?
        .iter()
        .find(|t| t["id"] == id)
        .cloned()
}

/// Issue 17 C: tokens referred to their group by name and outlived it, so a token made
/// for a deleted group joined a new group that took the name, with that group's
/// identity. Now a group's tokens are deleted with it, and a token is bound to its
/// group's immutable id.
#[test]
fn a_token_of_a_deleted_group_cannot_join_a_group_created_again_under_its_name() {
    let t = tmp();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    create_group(&ctl, "g2", "team-a", "default");
    let token = ctl.token("g2", &["--uses", "2"]);
    let created: Value = ctl.ctl_json(&["token", "list"])[0].clone();
    ctl.ctl_ok(&["group", "delete", "g2"]);
    create_group(&ctl, "g2", "payments", "admin");
    let err = join_err(&token, &t.path().join("a"));
    assert!(
        err.contains("join token is not valid") && err.contains("token create"),
        "{err}"
    );
    assert!(ctl.agents().is_empty(), "nothing joined");
    assert_eq!(created["state"], "active", "{created}");
    assert!(
        token_state(&ctl, created["id"].as_str().unwrap()).is_none(),
        "the group's tokens are deleted with it"
    );
    // A token of the new group joins it, with the new group's identity.
    let out = join_ok(&ctl.token("g2", &[]), &t.path().join("b"));
    assert!(
        out.contains("spiffe://causeway.local/ns/payments/sa/admin"),
        "{out}"
    );
}

/// Issue 17 C: `causewayctl token revoke` makes a token unusable at once, and
/// `token list` shows it revoked.
#[test]
fn token_revoke_makes_a_token_unusable_at_once() {
    let t = tmp();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    ctl.create_web_group();
    let token = ctl.token("web", &["--uses", "5"]);
    join_ok(&token, &t.path().join("a1"));
    let id = ctl.ctl_json(&["token", "list"])[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = ctl.ctl_ok(&["token", "revoke", &id]);
    assert!(out.contains("revoked"), "{out}");
    let err = join_err(&token, &t.path().join("a2"));
    assert!(
        err.contains(&format!("join token {id} was revoked")) && err.contains("token create"),
        "{err}"
    );
    let listed = token_state(&ctl, &id).expect("a revoked token stays listed");
    assert_eq!(listed["state"], "revoked", "{listed}");
    assert_eq!(listed["uses_left"], 4, "{listed}");
    let text = ctl.ctl_ok(&["token", "list"]);
    assert!(text.contains("STATE") && text.contains("revoked"), "{text}");
    // Unknown ids are named.
    let out = ctl.ctl(&["token", "revoke", "0000"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"0000\" does not exist"),
        "{}",
        describe(&out)
    );
    // The agent that joined before the revocation keeps its identity.
    assert_eq!(ctl.agents().len(), 1);
}
