//! Config push end to end: the real controller and agents on loopback, a file source as
//! the registry that changes.
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway_agent::identity::StateDir;
use causeway_api::push::{AgentFrame, ConfigUpdate, Hello, PushFrame, agent_frame, push_frame};
use causeway_api::wire::{self, ClientRequest, ErrorCode, client_request};
use causeway_tests::*;
use serde_json::Value;

const AGENT_CFG: &str = "[identity]\nretry_min = \"100ms\"\nretry_max = \"1s\"\n";
const WAIT: Duration = Duration::from_secs(30);

struct Mesh {
    _dir: tempfile::TempDir,
    root: PathBuf,
    services: PathBuf,
    ctl: Controller,
}

fn services_file(entries: &[(&str, &str)]) -> String {
    entries
        .iter()
        .map(|(name, addr)| {
            format!("[[services]]\nname = \"{name}\"\nnamespace = \"ext\"\nports = {{ http = 80 }}\n[[services.endpoints]]\naddress = \"{addr}\"\n\n")
        })
        .collect()
}

fn mesh(grace: &str, entries: &[(&str, &str)]) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let services = root.join("services.toml");
    std::fs::write(&services, services_file(entries)).unwrap();
    let ctl = Controller::start_with_config(
        &root.join("c"),
        &format!(
            "[mesh]\nagent_grace = \"{grace}\"\n[[sources.file]]\nname = \"ext\"\npath = {:?}\n",
            services.to_str().unwrap()
        ),
    );
    ctl.create_web_group();
    Mesh {
        _dir: dir,
        root,
        services,
        ctl,
    }
}

impl Mesh {
    fn join(&self, name: &str) -> PathBuf {
        let state = self.root.join(name);
        join_ok(&self.ctl.token("web", &[]), &state);
        state
    }

    fn set_services(&self, entries: &[(&str, &str)]) -> u64 {
        let before = self.ctl.mesh_version();
        // Atomically, as operators should: the source must never read a half-written file.
        let tmp = self.services.with_extension("tmp");
        std::fs::write(&tmp, services_file(entries)).unwrap();
        std::fs::rename(&tmp, &self.services).unwrap();
        // Other changes (agents registering) also move the version: wait for the
        // file's own content, then take the version that includes it. Endpoints inside
        // the VIP range are refused by the controller and never appear.
        wait_for("the file change to reach the registry", WAIT, || {
            let v = self.ctl.mesh_version();
            let list = self.registry();
            let all_there = entries
                .iter()
                .filter(|(_, addr)| !addr.starts_with("240.240."))
                .all(|(name, addr)| {
                    list.iter().any(|s| {
                        s["namespace"] == "ext"
                            && s["name"] == *name
                            && s["endpoints"]
                                .as_array()
                                .is_some_and(|e| e.iter().any(|e| e["address"] == *addr))
                    })
                });
            (v > before && all_there).then(|| self.ctl.mesh_version())
        })
    }

    fn agent_row(&self, state: &Path) -> Value {
        let id = agent_id(state);
        self.ctl
            .agents()
            .into_iter()
            .find(|a| a["id"] == id.as_str())
            .expect("agent listed")
    }

    fn registry(&self) -> Vec<Value> {
        self.ctl
            .ctl_json(&["registry", "list"])
            .as_array()
            .cloned()
            .unwrap()
    }
}

fn wait_version(a: &AgentProcess, v: u64) -> Value {
    wait_for(&format!("agent at config version {v}"), WAIT, || {
        let st = a.status();
        (st["config_version"].as_u64() == Some(v)).then_some(st)
    })
}

fn cached_services(state: &Path) -> Vec<String> {
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(state.join("config.json")).unwrap()).unwrap();
    cfg["services"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn a_change_reaches_both_agents_and_an_endpoint_in_the_vip_range_stops_no_one() {
    let m = mesh("30s", &[("payments", "203.0.113.10")]);
    let (s1, s2) = (m.join("vm1"), m.join("vm2"));
    let a1 = AgentProcess::start_with(&s1, AGENT_CFG, &["--address", "127.0.0.11"]);
    let a2 = AgentProcess::start_with(&s2, AGENT_CFG, &["--address", "127.0.0.12"]);
    // Both agents registered: wait until the mesh settles with both acked.
    let settled = wait_for("both agents acked the current version", WAIT, || {
        let v = m.ctl.mesh_version();
        let rows = [m.agent_row(&s1), m.agent_row(&s2)];
        rows.iter()
            .all(|r| r["acked_version"].as_u64() == Some(v) && r["connected"] == true)
            .then_some(v)
    });
    assert_eq!(wait_version(&a1, settled)["controller_connected"], true);
    wait_version(&a2, settled);

    // A registry change reaches both; both ACK; versions match.
    let v = m.set_services(&[("payments", "203.0.113.10"), ("ledger", "203.0.113.20")]);
    let st1 = wait_version(&a1, v);
    let st2 = wait_version(&a2, v);
    assert_eq!(st1["config_version"], st2["config_version"]);
    wait_for("controller sees both ACKs", WAIT, || {
        [m.agent_row(&s1), m.agent_row(&s2)]
            .iter()
            .all(|r| r["acked_version"].as_u64() == Some(v))
            .then_some(())
    });
    for s in [&s1, &s2] {
        let cached = cached_services(s);
        assert!(cached.contains(&"ext/ledger".to_owned()), "{cached:?}");
        assert!(
            cached.contains(&"default/web".to_owned()),
            "auto-registered workload is pushed too: {cached:?}"
        );
    }

    // One endpoint inside the VIP range (traffic to it would loop) is refused by the
    // controller and listed as a conflict; the rest of the change reaches both agents.
    let v = m.set_services(&[
        ("payments", "203.0.113.10"),
        ("ledger", "203.0.113.20"),
        ("loop", "240.240.0.77"),
        ("audit", "203.0.113.30"),
    ]);
    for (s, a) in [(&s1, &a1), (&s2, &a2)] {
        let st = wait_version(a, v);
        assert!(st["config_error"].is_null(), "{st}");
        let cached = cached_services(s);
        assert!(cached.contains(&"ext/audit".to_owned()), "{cached:?}");
        assert!(!cached.contains(&"ext/loop".to_owned()), "{cached:?}");
    }
    let conflicts = m.ctl.ctl_json(&["registry", "conflicts"]);
    let bad = conflicts
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "invalid_endpoint")
        .unwrap_or_else(|| panic!("the refused endpoint is a conflict: {conflicts}"));
    assert_eq!(bad["service"], "ext/loop");
    assert_eq!(bad["source"], "ext");
    assert_eq!(bad["address"], "240.240.0.77");
    assert!(
        bad["reason"]
            .as_str()
            .unwrap()
            .contains("inside the VIP range"),
        "{bad}"
    );
    // Later changes keep reaching everyone while the bad record stays in its source.
    let later = m.set_services(&[
        ("payments", "203.0.113.11"),
        ("ledger", "203.0.113.20"),
        ("loop", "240.240.0.77"),
        ("audit", "203.0.113.30"),
    ]);
    wait_version(&a1, later);
    wait_version(&a2, later);
    for s in [&s1, &s2] {
        let row = m.agent_row(s);
        assert!(row["session"]["last_nack"].is_null(), "{row}");
    }
    // Fixed at the source: the service arrives and the conflict clears.
    let fixed = m.set_services(&[
        ("payments", "203.0.113.11"),
        ("ledger", "203.0.113.20"),
        ("loop", "203.0.113.77"),
        ("audit", "203.0.113.30"),
    ]);
    wait_version(&a1, fixed);
    wait_version(&a2, fixed);
    assert!(cached_services(&s1).contains(&"ext/loop".to_owned()));
    let conflicts = m.ctl.ctl_json(&["registry", "conflicts"]);
    assert!(
        !conflicts
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["kind"] == "invalid_endpoint"),
        "{conflicts}"
    );
}

/// Waits until the agent at `state` reports the controller's refusal of its address, and
/// checks `causewayctl agent show` says the same; returns the message.
fn refused_address(m: &Mesh, a: &AgentProcess, state: &Path, expect: &str) -> String {
    let st = wait_for(
        &format!("the address refusal ({expect}) in the agent's status"),
        WAIT,
        || {
            let st = a.status();
            st["registration_error"]
                .as_str()
                .is_some_and(|e| e.contains(expect))
                .then_some(st)
        },
    );
    assert_eq!(
        st["controller_connected"], true,
        "it still has its subscription: {st}"
    );
    let shown = m.ctl.ctl_json(&["agent", "show", &agent_id(state)]);
    let error = shown["session"]["registration_error"]
        .as_str()
        .unwrap_or_else(|| panic!("agent show names the refusal: {shown}"))
        .to_owned();
    assert!(error.contains(expect), "{error}");
    assert!(a.log().contains(expect), "the agent logs it:\n{}", a.log());
    error
}

#[test]
fn addresses_the_controller_cannot_vouch_for_are_refused_and_the_mesh_keeps_flowing() {
    let m = mesh("30s", &[("payments", "203.0.113.10")]);
    let (s1, s2) = (m.join("vm1"), m.join("vm2"));
    let a1 = AgentProcess::start_with(&s1, AGENT_CFG, &["--address", "127.0.0.11"]);
    let a2 = AgentProcess::start_with(&s2, AGENT_CFG, &["--address", "127.0.0.12"]);
    wait_for("both agents registered", WAIT, || {
        (web_endpoints(&m).len() == 2).then_some(())
    });
    let mut entries = vec![("payments".to_owned(), "203.0.113.10".to_owned())];
    for (name, address, expect) in [
        ("vip", "240.240.0.77", "inside the VIP range 240.240.0.0/16"),
        ("dup", "127.0.0.11", "is already the endpoint of agent"),
    ] {
        let state = m.join(name);
        let bad = AgentProcess::start_with(&state, AGENT_CFG, &["--address", address]);
        let error = refused_address(&m, &bad, &state, expect);
        assert!(error.contains(address), "{error}");
        // Not registered: the group's service still has exactly the two good agents.
        let eps = web_endpoints(&m);
        let ids: Vec<&str> = eps
            .iter()
            .map(|e| e["native_id"].as_str().unwrap())
            .collect();
        assert_eq!(eps.len(), 2, "{eps:?}");
        assert!(!ids.contains(&agent_id(&state).as_str()), "{ids:?}");
        assert_eq!(
            eps.iter()
                .find(|e| e["address"] == "127.0.0.11")
                .map(|e| e["native_id"].clone()),
            Some(agent_id(&s1).into()),
            "the first agent keeps its endpoint"
        );
        // Everyone, the refused agent included, keeps receiving updates.
        entries.push((format!("after-{name}"), "203.0.113.40".to_owned()));
        let list: Vec<(&str, &str)> = entries
            .iter()
            .map(|(n, a)| (n.as_str(), a.as_str()))
            .collect();
        let v = m.set_services(&list);
        for a in [&a1, &a2, &bad] {
            let st = wait_version(a, v);
            assert!(st["config_error"].is_null(), "{st}");
        }
    }
}

#[test]
fn a_loopback_address_is_refused_when_the_control_endpoint_is_not_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let services = root.join("services.toml");
    std::fs::write(&services, services_file(&[("payments", "203.0.113.10")])).unwrap();
    // All interfaces: agents may be on other hosts, so loopback names no one. Tokens
    // still point at loopback, so no traffic leaves this host.
    let port = unshared_port();
    let ctl = Controller::start_listening(
        &root.join("c"),
        &format!(
            "[[sources.file]]\nname = \"ext\"\npath = {:?}\n",
            services.to_str().unwrap()
        ),
        &format!("0.0.0.0:{port}"),
        &format!("127.0.0.1:{port}"),
    );
    // Joins come from loopback here; 10.99.0.0/24 stands for the hosts' NAT network.
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
        "http:8080",
        "--cidr",
        "127.0.0.0/8",
        "--cidr",
        "10.99.0.0/24",
    ]);
    let m = Mesh {
        _dir: dir,
        root,
        services,
        ctl,
    };
    let good = m.join("vm1");
    let a1 = AgentProcess::start_with(&good, AGENT_CFG, &["--address", "10.99.0.11"]);
    wait_for(
        "the agent inside the group's CIDRs registered",
        WAIT,
        || {
            web_endpoints(&m)
                .iter()
                .any(|e| e["address"] == "10.99.0.11")
                .then_some(())
        },
    );
    for (name, extra) in [
        ("lo", &["--address", "127.0.0.5"][..]),
        // Without --address the connection's own (loopback) address is refused too.
        ("lo-default", &[][..]),
    ] {
        let state = m.join(name);
        let bad = AgentProcess::start_with(&state, AGENT_CFG, extra);
        refused_address(&m, &bad, &state, "is a loopback address");
        let v = m.set_services(&[("payments", "203.0.113.10"), (name, "203.0.113.50")]);
        wait_version(&a1, v);
        wait_version(&bad, v);
    }
    // Outside both the connection's address and the CIDRs: not vouched for.
    let state = m.join("far");
    let bad = AgentProcess::start_with(&state, AGENT_CFG, &["--address", "192.0.2.80"]);
    refused_address(
        &m,
        &bad,
        &state,
        "neither the address this agent connects from",
    );
    assert_eq!(web_endpoints(&m).len(), 1);
}

#[test]
fn controller_away_agents_serve_from_cache_then_resume_with_deltas() {
    let mut m = mesh("30s", &[("payments", "203.0.113.10")]);
    let (s1, s2) = (m.join("vm1"), m.join("vm2"));
    let mut a1 = AgentProcess::start_with(&s1, AGENT_CFG, &["--address", "127.0.0.11"]);
    let a2 = AgentProcess::start_with(&s2, AGENT_CFG, &["--address", "127.0.0.12"]);
    let v = m.set_services(&[("payments", "203.0.113.10"), ("ledger", "203.0.113.20")]);
    wait_version(&a1, v);
    wait_version(&a2, v);
    let v = wait_for("mesh settled", WAIT, || {
        let v = m.ctl.mesh_version();
        (a1.status()["config_version"].as_u64() == Some(v)
            && a2.status()["config_version"].as_u64() == Some(v))
        .then_some(v)
    });

    // Controller stopped: agents keep their state.
    m.ctl.stop();
    for a in [&a1, &a2] {
        let st = wait_for("agent notices the controller is gone", WAIT, || {
            let st = a.status();
            (st["controller_connected"] == false).then_some(st)
        });
        assert_eq!(st["config_version"].as_u64(), Some(v));
        assert!(st["services"].as_u64().unwrap() >= 3);
    }
    // An agent restarted while the controller is down starts from its disk cache.
    a1.kill();
    let a1 = AgentProcess::start_with(&s1, AGENT_CFG, &["--address", "127.0.0.11"]);
    let st = wait_for("restarted agent running", WAIT, || {
        let st = a1.status();
        (st["running"] == true).then_some(st)
    });
    assert_eq!(st["controller_connected"], false);
    assert_eq!(
        st["config_version"].as_u64(),
        Some(v),
        "served from the disk cache"
    );
    assert!(cached_services(&s1).contains(&"ext/ledger".to_owned()));

    // The controller returns (same data dir and port) and the registry changes:
    // both agents converge, with deltas only (the history covers their version).
    m.ctl.restart();
    wait_for("both reconnected", WAIT, || {
        (a1.status()["controller_connected"] == true && a2.status()["controller_connected"] == true)
            .then_some(())
    });
    let v2 = m.set_services(&[("payments", "203.0.113.10"), ("ledger", "203.0.113.21")]);
    wait_version(&a1, v2);
    wait_version(&a2, v2);
    // The status file's counters are written a moment after the config cache: wait for
    // the delta to be counted rather than read them in the same instant.
    let st1 = wait_for("the delta counted in a1's status", WAIT, || {
        let st = a1.status();
        (st["delta_updates"].as_u64().unwrap_or(0) >= 1).then_some(st)
    });
    assert_eq!(
        st1["full_updates"].as_u64(),
        Some(0),
        "no full snapshot after resuming: {st1}"
    );
}

/// A bare subscriber that reads and answers by hand.
struct RawSubscriber {
    rt: tokio::runtime::Runtime,
    _conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl RawSubscriber {
    fn connect(state: &Path, last_version: u64) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // A worker thread keeps the QUIC connection alive (keep-alives, ACKs) while the
        // test does not read: "stalled" means the application stops, not the network.
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
                    last_version,
                    address: "127.0.0.99".into(),
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

    fn send_raw(&mut self, bytes: &[u8]) {
        self.rt.block_on(self.send.write_all(bytes)).unwrap();
    }

    fn answer(&mut self, frame: AgentFrame) {
        self.send_raw(&wire::encode_frame(&frame));
    }

    /// The next frame that is not a heartbeat or the registration answer.
    fn next(&mut self) -> PushFrame {
        loop {
            let frame = self.rt.block_on(async {
                let mut prefix = [0u8; 4];
                tokio::time::timeout(WAIT, self.recv.read_exact(&mut prefix))
                    .await
                    .expect("a frame in time")
                    .expect("stream open");
                let len = u32::from_be_bytes(prefix) as usize;
                let mut body = vec![0u8; len];
                self.recv.read_exact(&mut body).await.unwrap();
                wire::decode_body::<PushFrame>(&body).unwrap()
            });
            if !matches!(
                frame.kind,
                Some(push_frame::Kind::Heartbeat(_) | push_frame::Kind::Registration(_))
            ) {
                return frame;
            }
        }
    }

    fn next_update(&mut self) -> ConfigUpdate {
        match self.next().kind {
            Some(push_frame::Kind::Update(u)) => u,
            other => panic!("expected an update, got {other:?}"),
        }
    }

    fn ack(&mut self, version: u64) {
        self.answer(AgentFrame {
            kind: Some(agent_frame::Kind::Ack(causeway_api::push::Ack { version })),
        });
    }
}

#[test]
fn a_stalled_agent_delays_no_one_and_gets_one_coalesced_delta() {
    let m = mesh("30s", &[("payments", "203.0.113.10")]);
    let (fast_state, slow_state) = (m.join("fast"), m.join("slow"));
    let fast = AgentProcess::start_with(&fast_state, AGENT_CFG, &["--address", "127.0.0.11"]);
    let mut slow = RawSubscriber::connect(&slow_state, 0);
    let first = slow.next_update();
    assert!(first.full, "a new subscriber gets a snapshot");
    // The slow agent stops reading and answering; three changes happen meanwhile, and
    // the running agent applies each of them.
    let mut versions = Vec::new();
    for (i, addr) in ["203.0.113.31", "203.0.113.32", "203.0.113.33"]
        .iter()
        .enumerate()
    {
        let name = format!("svc{i}");
        let mut entries = vec![("payments", "203.0.113.10")];
        let names: Vec<String> = (0..=i).map(|j| format!("svc{j}")).collect();
        for n in &names {
            entries.push((n.as_str(), addr));
        }
        let v = m.set_services(&entries);
        wait_version(&fast, v);
        versions.push((name, v));
    }
    // Resumed: it answers the first update and receives one delta covering all three.
    slow.ack(first.version);
    let latest = m.ctl.mesh_version();
    let delta = slow.next_update();
    assert!(!delta.full);
    assert_eq!(delta.base_version, first.version);
    assert_eq!(delta.version, latest);
    let names: Vec<&str> = delta.services.iter().map(|s| s.name.as_str()).collect();
    for (name, _) in &versions {
        assert!(
            names.contains(&name.as_str()),
            "{name} missing from the coalesced delta {names:?}"
        );
    }
    assert!(
        !names.contains(&"payments"),
        "an unchanged service is not resent: {names:?}"
    );
    slow.ack(delta.version);
    wait_for("the controller records the slow agent's ACK", WAIT, || {
        (m.agent_row(&slow_state)["acked_version"].as_u64() == Some(latest)).then_some(())
    });
}

fn web_endpoints(m: &Mesh) -> Vec<Value> {
    m.registry()
        .into_iter()
        .find(|s| s["namespace"] == "default" && s["name"] == "web")
        .map(|s| s["endpoints"].as_array().cloned().unwrap())
        .unwrap_or_default()
}

#[test]
fn auto_registration_follows_the_agent_with_a_lease() {
    let m = mesh("3s", &[]);
    let state = m.join("vm1");
    let id = agent_id(&state);
    let mut a = AgentProcess::start_with(&state, AGENT_CFG, &["--address", "127.0.0.21"]);
    let eps = wait_for("the agent's workload in the registry", WAIT, || {
        let eps = web_endpoints(&m);
        (!eps.is_empty()).then_some(eps)
    });
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0]["address"], "127.0.0.21");
    assert_eq!(eps[0]["source"], "agents");
    assert_eq!(eps[0]["native_id"], id.as_str());
    assert_eq!(
        eps[0]["identity"],
        "spiffe://causeway.local/ns/default/sa/web"
    );
    assert_eq!(eps[0]["ports"]["http"], 8080);

    // Killed and restarted within the grace period: never flaps, and the old session's
    // expiry cannot remove the new session's registration.
    a.kill();
    let a = AgentProcess::start_with(&state, AGENT_CFG, &["--address", "127.0.0.21"]);
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            web_endpoints(&m).len(),
            1,
            "workload flapped after an agent restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(a); // SIGKILL
    // Gone longer than the grace period: removed.
    wait_for("deregistration after the grace period", WAIT, || {
        web_endpoints(&m).is_empty().then_some(())
    });
}

#[test]
fn graceful_stop_deregisters_at_once() {
    let m = mesh("10m", &[]);
    let state = m.join("vm1");
    let mut a = AgentProcess::start_with(&state, AGENT_CFG, &["--address", "127.0.0.22"]);
    wait_for("registered", WAIT, || {
        (!web_endpoints(&m).is_empty()).then_some(())
    });
    a.stop();
    // Far sooner than the ten-minute grace period.
    wait_for("deregistered on SIGTERM", Duration::from_secs(10), || {
        web_endpoints(&m).is_empty().then_some(())
    });
    let row = m.agent_row(&state);
    assert_eq!(row["connected"], false);
}

#[test]
fn subscription_refusals_and_malformed_frames() {
    let m = mesh("30s", &[("payments", "203.0.113.10")]);
    let state = m.join("vm1");

    // An unknown (future) frame kind is ignored; the session goes on.
    let mut sub = RawSubscriber::connect(&state, 0);
    let first = sub.next_update();
    sub.send_raw(&[0, 0, 0, 2, 0x4a, 0x00]); // AgentFrame field 9: unknown kind
    sub.ack(first.version);
    let v = m.set_services(&[("payments", "203.0.113.11")]);
    let next = sub.next_update();
    assert_eq!(next.version, v);
    assert_eq!(next.base_version, first.version);

    // A malformed frame ends the subscription with an error.
    sub.send_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
    match sub.next().kind {
        Some(push_frame::Kind::Error(e)) => {
            assert_eq!(e.code, ErrorCode::Malformed as i32, "{}", e.message)
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    // An oversized frame too.
    let mut sub = RawSubscriber::connect(&state, 0);
    let _ = sub.next_update();
    sub.send_raw(&(64u32 << 20).to_be_bytes());
    match sub.next().kind {
        Some(push_frame::Kind::Error(e)) => {
            assert!(e.message.contains("larger than"), "{}", e.message)
        }
        other => panic!("expected an error frame, got {other:?}"),
    }

    // A removed agent's session is ended and a new one refused.
    let mut sub = RawSubscriber::connect(&state, 0);
    let _ = sub.next_update();
    m.ctl.ctl_ok(&["agent", "remove", &agent_id(&state)]);
    match sub.next().kind {
        Some(push_frame::Kind::Error(e)) => assert_eq!(e.code, ErrorCode::AgentRemoved as i32),
        other => panic!("expected the session to end, got {other:?}"),
    }
    let mut sub = RawSubscriber::connect(&state, 0);
    match sub.next().kind {
        Some(push_frame::Kind::Error(e)) => {
            assert_eq!(e.code, ErrorCode::AgentRemoved as i32);
            assert!(e.message.contains("re-join"), "{}", e.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Other agents get the removed agent's certificate in their deny list.
    let other = m.join("vm2");
    let mut sub2 = RawSubscriber::connect(&other, 0);
    let snap = sub2.next_update();
    let removed_serial = cert_of(&state).serial;
    assert!(
        snap.deny_serials.contains(&removed_serial),
        "deny list {:?}",
        snap.deny_serials
    );
}

#[test]
fn subscription_with_a_certificate_from_another_ca_is_refused() {
    let m = mesh("30s", &[]);
    let dir = tempfile::tempdir().unwrap();
    let other = Controller::start(&dir.path().join("other"), &[]);
    other.create_web_group();
    let state = dir.path().join("stranger");
    join_ok(&other.token("web", &[]), &state);
    // Point it at our controller and trust our server, so only its certificate can fail.
    let info_path = state.join("agent.json");
    let mut info: Value = serde_json::from_slice(&std::fs::read(&info_path).unwrap()).unwrap();
    info["controller"] = m.ctl.control.clone().into();
    std::fs::write(&info_path, serde_json::to_vec(&info).unwrap()).unwrap();
    let ca = m.ctl.ctl_json(&["ca", "show"]);
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(state.join("bundle.pem")).unwrap(),
        ca["trust_bundle_pem"][0].as_str().unwrap()
    );
    std::fs::write(state.join("bundle.pem"), bundle).unwrap();
    let a = AgentProcess::start(&state, AGENT_CFG);
    let st = wait_for("the refusal in the agent's status", WAIT, || {
        let st = a.status();
        st["last_error"]
            .as_str()
            .map(str::to_owned)
            .filter(|e| e.contains("does not accept this host's certificate"))
            .map(|_| st)
    });
    assert_eq!(st["controller_connected"], false);
    assert!(
        m.ctl.agents().is_empty(),
        "nothing registered for a stranger"
    );
    assert!(web_endpoints(&m).is_empty());
}

#[test]
fn subscription_with_an_expired_certificate_is_refused() {
    // A controller signing with an operator intermediate, so the test can mint an
    // expired certificate from the same CA for the agent's own key.
    let dir = tempfile::tempdir().unwrap();
    let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root_params = rcgen::CertificateParams::new(vec![]).unwrap();
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let root = rcgen::CertifiedIssuer::self_signed(root_params, root_key).unwrap();
    let int_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut int_params = rcgen::CertificateParams::new(vec![]).unwrap();
    int_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    int_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let intermediate = rcgen::CertifiedIssuer::signed_by(int_params, int_key, &root).unwrap();
    let chain = dir.path().join("chain.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&chain, format!("{}{}", intermediate.pem(), root.pem())).unwrap();
    std::fs::write(&key, intermediate.key().serialize_pem()).unwrap();
    let ctl = Controller::start_with_config(
        &dir.path().join("c"),
        &format!(
            "[ca]\nintermediate_cert_chain = {:?}\nintermediate_key = {:?}\n",
            chain.to_str().unwrap(),
            key.to_str().unwrap()
        ),
    );
    assert_eq!(ctl.ctl_json(&["ca", "show"])["mode"], "intermediate");
    ctl.create_web_group();
    let state = dir.path().join("vm");
    join_ok(&ctl.token("web", &[]), &state);
    // The join's certificate chains to the operator's root.
    let bundle = std::fs::read_to_string(state.join("bundle.pem")).unwrap();
    assert_eq!(
        causeway_api::pem::decode_all(&bundle, "CERTIFICATE"),
        vec![root.der().to_vec()]
    );

    // Replace the certificate with an expired one for the same key and identity.
    let agent_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(state.join("key.pem")).unwrap()).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://causeway.local/ns/default/sa/web"
            .try_into()
            .unwrap(),
    )];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 2);
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let expired = params.signed_by(&agent_key, &intermediate).unwrap();
    std::fs::write(
        state.join("cert.pem"),
        format!("{}{}", expired.pem(), intermediate.pem()),
    )
    .unwrap();
    let a = AgentProcess::start(&state, AGENT_CFG);
    let st = wait_for("the expiry refusal in the agent's status", WAIT, || {
        let st = a.status();
        st["last_error"]
            .as_str()
            .filter(|e| e.contains("expired"))
            .map(|_| st.clone())
    });
    assert_eq!(st["controller_connected"], false);
    assert!(st["expires_in_secs"].as_i64().unwrap() < 0);
    let row = ctl.agents().remove(0);
    assert_eq!(
        row["connected"], false,
        "no session for an expired certificate"
    );
}
