//! Several controllers on one etcd (issue 23; a real etcd member, Debian's `etcd-server`,
//! which the test-deps script installs): exactly one of them leads and runs the registry
//! sources; a killed leader is replaced and the registry goes on changing on every
//! controller; a paused leader is replaced, its registry writes are fenced off and it
//! steps down when it resumes; a multi-use token is never spent more than its uses by
//! joins racing on two controllers.

#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_api::registry::{
    Endpoint, Provenance, ServiceKey, SourceChange, SourceKind, SourceState,
};
use causeway_controller::etcd::{Etcd, EtcdOptions};
use causeway_controller::mesh::{Mesh, MeshSettings};
use causeway_controller::store::{Fence, Store};
use causeway_controller::store_etcd::{EtcdStore, Kek};
use causeway_registry::SourceUpdate;
use causeway_tests::*;
use serde_json::Value;

/// Generous: the waits below end as soon as the condition holds.
const WAIT: Duration = Duration::from_secs(40);
/// The lease TTL the controllers run with (the default is 10 s).
const TTL_SECS: u64 = 3;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .unwrap()
        .port()
}

/// One etcd member on loopback, stopped on drop.
struct Member {
    child: Child,
    url: String,
}

impl Member {
    fn start(dir: &Path) -> Member {
        Member::cluster(dir, 1).pop().unwrap()
    }

    /// `n` members forming one cluster (each in its own data dir under `dir`).
    fn cluster(dir: &Path, n: usize) -> Vec<Member> {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let members: Vec<Member> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let url = format!("http://127.0.0.1:{client}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let log = std::fs::File::create(dir.join(format!("etcd{i}.log"))).unwrap();
                let child = Command::new("etcd")
                    .args([
                        "--name",
                        &format!("m{i}"),
                        "--data-dir",
                        dir.join(format!("etcd-data{i}")).to_str().unwrap(),
                        "--listen-client-urls",
                        &url,
                        "--advertise-client-urls",
                        &url,
                        "--listen-peer-urls",
                        &peer_url,
                        "--initial-advertise-peer-urls",
                        &peer_url,
                        "--initial-cluster",
                        &initial,
                    ])
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap_or_else(|e| {
                        panic!("cannot start etcd ({e}); install it with: apt-get install etcd-server (scripts/install-test-deps.sh does)")
                    });
                Member { child, url }
            })
            .collect();
        for m in &members {
            let health = format!("{}/health", m.url);
            wait_for("etcd healthy", Duration::from_secs(30), || {
                let out = Command::new("curl")
                    .args(["-fsS", "-m", "1", &health])
                    .output()
                    .ok()?;
                String::from_utf8_lossy(&out.stdout)
                    .contains("true")
                    .then_some(())
            });
        }
        members
    }

    fn client(&self) -> Etcd {
        Etcd::new(&EtcdOptions {
            endpoints: vec![self.url.clone()],
            ..EtcdOptions::default()
        })
        .unwrap()
    }

    /// How many keys are under `prefix`, read from etcd itself.
    fn count(&self, prefix: &str) -> usize {
        let etcd = self.client();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(etcd.get_prefix(prefix.as_bytes(), 0, 0))
            .unwrap()
            .kvs
            .len()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A controller config on `etcd` with a short lease and a file source at `file`.
fn ha_config(t: &Path, etcd: &Member, file: Option<&Path>) -> String {
    ha_config_on(t, std::slice::from_ref(etcd), file)
}

/// [`ha_config`] with every member of a cluster as an endpoint.
fn ha_config_on(t: &Path, etcd: &[Member], file: Option<&Path>) -> String {
    let kek = t.join("ca-kek");
    std::fs::write(&kek, "ab".repeat(32)).unwrap();
    let endpoints = etcd
        .iter()
        .map(|m| format!("\"{}\"", m.url))
        .collect::<Vec<_>>()
        .join(", ");
    let mut toml = format!(
        "[store]\nbackend = \"etcd\"\nendpoints = [{endpoints}]\nkek_file = \"{}\"\nlease_ttl = \"{TTL_SECS}s\"\n",
        kek.display()
    );
    if let Some(file) = file {
        toml.push_str(&format!(
            "\n[[sources.file]]\nname = \"external\"\npath = {:?}\n",
            file.to_str().unwrap()
        ));
    }
    toml
}

/// A registry file with `ext/payments` at these addresses.
fn write_registry(file: &Path, addresses: &[&str]) {
    let mut text =
        "[[services]]\nname = \"payments\"\nnamespace = \"ext\"\nports = { tcp = 8080 }\n"
            .to_owned();
    for a in addresses {
        text.push_str(&format!("[[services.endpoints]]\naddress = \"{a}\"\n"));
    }
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// One metric's value from a controller's `/metrics` (`None`: not reachable).
fn metric(c: &Controller, name: &str) -> Option<f64> {
    let out = Command::new("curl")
        .args(["-fsS", "-m", "2", &format!("{}/metrics", c.metrics)])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Which of `cs` report themselves leader (unreachable ones count as not leading).
fn leaders(cs: &[&Controller]) -> Vec<usize> {
    cs.iter()
        .enumerate()
        .filter(|(_, c)| metric(c, "causeway_controller_leader") == Some(1.0))
        .map(|(i, _)| i)
        .collect()
}

/// The addresses of `ext/payments`'s endpoints in a controller's merged registry.
fn web_addresses(c: &Controller) -> BTreeSet<String> {
    addresses(c, "ext", "payments")
}

/// The addresses of a service's endpoints in a controller's merged registry.
fn addresses(c: &Controller, ns: &str, name: &str) -> BTreeSet<String> {
    let list = c.ctl_json(&["registry", "list"]);
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["namespace"] == ns && s["name"] == name)
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["address"].as_str().map(str::to_owned))
        .collect()
}

fn set(addresses: &[&str]) -> BTreeSet<String> {
    addresses.iter().map(|a| (*a).to_owned()).collect()
}

fn signal(c: &Controller, sig: &str) {
    let pid = c.pid().expect("a running controller");
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// Waits until exactly one of `cs` leads; returns its index.
fn one_leader(cs: &[&Controller]) -> usize {
    wait_for("exactly one leader", WAIT, || {
        match leaders(cs).as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    })
}

#[test]
fn one_controller_leads_and_a_killed_leader_is_replaced() {
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let file = t.path().join("registry.toml");
    write_registry(&file, &["192.0.2.50"]);
    let toml = ha_config(t.path(), &etcd, Some(&file));
    let mut cs: Vec<Controller> = (1..=3)
        .map(|i| Controller::start_with_config(&t.path().join(format!("c{i}")), &toml))
        .collect();
    let fingerprint = cs[0].fingerprint.clone();
    assert!(cs.iter().all(|c| c.fingerprint == fingerprint), "one CA");

    let refs: Vec<&Controller> = cs.iter().collect();
    let leader = one_leader(&refs);
    // The registry reaches every controller, through etcd.
    for c in &cs {
        wait_for("web on every controller", WAIT, || {
            (web_addresses(c) == set(&["192.0.2.50"])).then_some(())
        });
    }
    // Only the leader ran the sources.
    for (i, c) in cs.iter().enumerate() {
        assert_eq!(
            c.log().contains("registry sources running"),
            i == leader,
            "controller {i} (leader {leader}) log:\n{}",
            c.log()
        );
    }
    let versions: Vec<u64> = cs.iter().map(Controller::mesh_version).collect();

    // kill -9 the leader: another takes over within about the lease TTL.
    cs[leader].kill();
    let killed = Instant::now();
    let survivors: Vec<&Controller> = cs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, c)| c)
        .collect();
    let next = one_leader(&survivors);
    println!(
        "new leader after {:?} (lease_ttl {TTL_SECS}s)",
        killed.elapsed()
    );
    assert!(
        survivors[next].log().contains("registry sources running"),
        "{}",
        survivors[next].log()
    );

    // A registry change after the failover reaches every surviving controller.
    write_registry(&file, &["192.0.2.50", "192.0.2.51"]);
    for c in &survivors {
        wait_for("the change on every surviving controller", WAIT, || {
            (web_addresses(c) == set(&["192.0.2.50", "192.0.2.51"])).then_some(())
        });
    }
    println!(
        "registry change on every survivor {:?} after the kill",
        killed.elapsed()
    );
    // One version counter for the set: it only grows, whichever controller answers.
    let before = versions.iter().max().copied().unwrap();
    for c in &survivors {
        assert!(c.mesh_version() > before, "versions never go back");
    }
    // A leader stopped with SIGTERM gives the leadership up (revokes its lease) and the
    // last controller takes over.
    let next_index = cs
        .iter()
        .position(|c| std::ptr::eq(c, survivors[next]))
        .unwrap();
    let last = survivors[1 - next].data_dir.clone();
    drop(survivors);
    cs[next_index].stop();
    assert!(
        cs[next_index].log().contains("leadership given up"),
        "{}",
        cs[next_index].log()
    );
    let last = cs.iter().find(|c| c.data_dir == last).unwrap();
    let stopped = Instant::now();
    wait_for("the last controller leads", WAIT, || {
        (metric(last, "causeway_controller_leader") == Some(1.0)).then_some(())
    });
    println!(
        "last controller leads {:?} after the SIGTERM",
        stopped.elapsed()
    );
}

#[test]
fn a_paused_leader_is_replaced_and_steps_down_when_it_resumes() {
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let file = t.path().join("registry.toml");
    write_registry(&file, &["192.0.2.60"]);
    let toml = ha_config(t.path(), &etcd, Some(&file));
    let cs: Vec<Controller> = (1..=2)
        .map(|i| Controller::start_with_config(&t.path().join(format!("c{i}")), &toml))
        .collect();
    let refs: Vec<&Controller> = cs.iter().collect();
    let leader = one_leader(&refs);
    let (old, new) = (&cs[leader], &cs[1 - leader]);
    for c in &cs {
        wait_for("web on both", WAIT, || {
            (web_addresses(c) == set(&["192.0.2.60"])).then_some(())
        });
    }

    // Paused past its lease: the other controller takes over and runs the sources.
    signal(old, "-STOP");
    let paused = Instant::now();
    wait_for("the other controller leads", WAIT, || {
        (metric(new, "causeway_controller_leader") == Some(1.0)).then_some(())
    });
    println!("taken over {:?} after the pause", paused.elapsed());
    write_registry(&file, &["192.0.2.60", "192.0.2.61"]);
    wait_for("the change on the new leader", WAIT, || {
        (web_addresses(new) == set(&["192.0.2.60", "192.0.2.61"])).then_some(())
    });

    // Resumed: it steps down, follows the new leader's registry, and one leader stays.
    signal(old, "-CONT");
    wait_for("the old leader steps down", WAIT, || {
        (metric(old, "causeway_controller_leader") == Some(0.0)).then_some(())
    });
    assert!(old.log().contains("no longer leading"), "{}", old.log());
    wait_for("the old leader follows", WAIT, || {
        (web_addresses(old) == set(&["192.0.2.60", "192.0.2.61"])).then_some(())
    });
    assert_eq!(leaders(&refs), vec![1 - leader], "one leader");
    println!(
        "registry writes refused by the fence on the resumed controller: {:?}",
        metric(old, "causeway_controller_fenced_writes_total")
    );
    // The registry stays the new leader's: nothing the old one wrote late got through.
    write_registry(&file, &["192.0.2.62"]);
    for c in &cs {
        wait_for("the next change on both", WAIT, || {
            (web_addresses(c) == set(&["192.0.2.62"])).then_some(())
        });
    }
}

fn file_update(names: &[&str]) -> SourceUpdate {
    let mut services = std::collections::BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        let ep = Endpoint::new(
            format!("192.0.2.{}", i + 1),
            Provenance {
                source: "file".into(),
                kind: SourceKind::File,
                native_id: (*name).to_owned(),
                revision: "1".into(),
            },
        );
        services.insert(
            ServiceKey::new("default", *name),
            std::collections::BTreeMap::from([((*name).to_owned(), ep)]),
        );
    }
    SourceUpdate {
        source: "file".into(),
        kind: SourceKind::File,
        change: Some(SourceChange::Services(services)),
        state: SourceState::synced(),
    }
}

async fn mesh_on(etcd: &Member) -> (Arc<dyn Store>, Arc<Mesh>) {
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::open(
            &EtcdOptions {
                endpoints: vec![etcd.url.clone()],
                ..EtcdOptions::default()
            },
            "/causeway/",
            Kek::from_bytes("cd".repeat(32).as_bytes(), "test").unwrap(),
        )
        .unwrap(),
    );
    let mesh = Mesh::open(
        store.clone(),
        MeshSettings {
            vip_range: "240.240.0.0/16".parse().unwrap(),
            agent_grace: Duration::from_secs(60),
            history_len: 64,
            control_on_loopback: true,
        },
        Vec::new(),
        &BTreeSet::from(["file".to_owned()]),
        std::collections::BTreeMap::new(),
    )
    .await
    .unwrap();
    (store, mesh)
}

/// The fence itself, without timing: controller A leads and writes; its lease ends and
/// B leads and writes; A, with an up-to-date view of the mesh (so only the fence can
/// stop it), writes under its old leadership: etcd refuses it, the refusal is counted,
/// and the stored registry is B's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_write_under_a_lost_leadership_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let client = etcd.client();
    let (store_a, mesh_a) = mesh_on(&etcd).await;
    let (_store_b, mesh_b) = mesh_on(&etcd).await;
    let key = b"/causeway/leader";

    let (lease_a, _) = client.lease_grant(Duration::from_secs(30)).await.unwrap();
    let la = client.try_lead(key, b"a", lease_a).await.unwrap().unwrap();
    let fence_a = Fence {
        key: la.key.clone(),
        revision: la.fence,
    };
    let v1 = mesh_a
        .apply_source_update_fenced(file_update(&["web"]), Some(fence_a.clone()))
        .await
        .unwrap();

    // A's lease ends (as when it expires during a pause); B leads and writes.
    client.lease_revoke(lease_a).await.unwrap();
    let (lease_b, _) = client.lease_grant(Duration::from_secs(30)).await.unwrap();
    let lb = client.try_lead(key, b"b", lease_b).await.unwrap().unwrap();
    assert_eq!(
        mesh_b.resync(false).await.unwrap(),
        v1,
        "B follows A's write"
    );
    let v2 = mesh_b
        .apply_source_update_fenced(
            file_update(&["web", "api"]),
            Some(Fence {
                key: lb.key.clone(),
                revision: lb.fence,
            }),
        )
        .await
        .unwrap();
    assert!(v2 > v1);

    // A catches up with the mesh, then writes under its lost leadership.
    assert_eq!(mesh_a.resync(false).await.unwrap(), v2);
    let before = causeway_controller::metrics::get().fenced_writes.get();
    let err = mesh_a
        .apply_source_update_fenced(file_update(&["web", "api", "db"]), Some(fence_a))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no longer the leader") && err.contains("/causeway/leader"),
        "{err}"
    );
    assert_eq!(
        causeway_controller::metrics::get().fenced_writes.get(),
        before + 1
    );
    let stored = tokio::task::spawn_blocking(move || store_a.load_mesh())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.version, v2, "the fenced write stored nothing");
    let services: BTreeSet<String> = stored
        .data
        .get("file")
        .map(|d| d.keys().map(|k| k.to_string()).collect())
        .unwrap_or_default();
    assert_eq!(
        services,
        BTreeSet::from(["default/api".to_owned(), "default/web".to_owned()])
    );
    // A's view, changed in memory before the refusal, is reloaded: B's mesh, no db.
    assert_eq!(mesh_a.resync(false).await.unwrap(), v2);
    assert!(mesh_a.services().iter().all(|s| s.name != "db"));
    assert!(mesh_a.services().iter().any(|s| s.name == "api"));
}

/// A token with `uses: 10`, joins racing on two controllers of the set: exactly 10
/// succeed, the others are refused with the token's error, and etcd holds 10 agents.
#[test]
fn a_multi_use_token_is_never_spent_twice_across_controllers() {
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let toml = ha_config(t.path(), &etcd, None);
    let c1 = Controller::start_with_config(&t.path().join("c1"), &toml);
    let c2 = Controller::start_with_config(&t.path().join("c2"), &toml);
    c1.create_web_group();
    let token = c1.token("web", &["--uses", "10"]);
    let mut to_c2 = causeway_api::token::JoinToken::decode(&token).unwrap();
    to_c2.controller = c2.control.clone();
    let tokens = [token, to_c2.encode()];

    let joins: Vec<_> = (0..24)
        .map(|i| {
            let token = tokens[i % 2].clone();
            let dir = t.path().join(format!("a{i}"));
            std::thread::spawn(move || {
                agent(&[
                    "join",
                    &token,
                    "--state-dir",
                    dir.to_str().unwrap(),
                    "--hostname",
                    &format!("host{i}"),
                ])
            })
        })
        .collect();
    let outs: Vec<_> = joins.into_iter().map(|j| j.join().unwrap()).collect();
    let ok = outs.iter().filter(|o| o.status.success()).count();
    for o in outs.iter().filter(|o| !o.status.success()) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("has already been used"), "{}", describe(o));
    }
    assert_eq!(ok, 10, "exactly the token's uses");
    assert_eq!(etcd.count("/causeway/agents/"), 10, "agents in etcd");
    let listed: Value = c2.ctl_json(&["token", "list"]);
    assert!(listed.to_string().contains("\"uses_left\":0"), "{listed}");
}

/// Agents connected to different controllers of the set: each controller registers its
/// own agent's workload and every controller sees both; a change of the leader's
/// registry source reaches both agents, at the same (set-wide) config version.
#[test]
fn agents_on_every_controller_get_the_registry_changes() {
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let file = t.path().join("registry.toml");
    write_registry(&file, &["192.0.2.70"]);
    let toml = ha_config(t.path(), &etcd, Some(&file));
    let c1 = Controller::start_with_config(&t.path().join("c1"), &toml);
    let c2 = Controller::start_with_config(&t.path().join("c2"), &toml);
    c1.create_web_group();
    let token = c1.token("web", &["--uses", "2"]);
    let mut to_c2 = causeway_api::token::JoinToken::decode(&token).unwrap();
    to_c2.controller = c2.control.clone();
    let (s1, s2) = (t.path().join("a1"), t.path().join("a2"));
    join_ok(&token, &s1);
    join_ok(&to_c2.encode(), &s2);
    let cfg = "[identity]\nretry_min = \"100ms\"\nretry_max = \"1s\"\n";
    let a1 = AgentProcess::start_with(&s1, cfg, &["--address", "127.0.0.11"]);
    let a2 = AgentProcess::start_with(&s2, cfg, &["--address", "127.0.0.12"]);

    // Both workloads, each registered by its own controller, on both controllers.
    for c in [&c1, &c2] {
        wait_for("both workloads on every controller", WAIT, || {
            (addresses(c, "default", "web") == set(&["127.0.0.11", "127.0.0.12"])).then_some(())
        });
    }

    // A registry change: both agents get it, at one version.
    write_registry(&file, &["192.0.2.70", "192.0.2.71"]);
    let v = wait_for(
        "the change on both controllers at one version",
        WAIT,
        || {
            let (v1, v2) = (c1.mesh_version(), c2.mesh_version());
            (v1 == v2
                && web_addresses(&c1) == set(&["192.0.2.70", "192.0.2.71"])
                && web_addresses(&c2) == set(&["192.0.2.70", "192.0.2.71"]))
            .then_some(v1)
        },
    );
    for (a, s) in [(&a1, &s1), (&a2, &s2)] {
        let mut last = Value::Null;
        let got = crate_wait(WAIT, || {
            last = a.status();
            let cached = std::fs::read_to_string(s.join("config.json")).unwrap_or_default();
            (last["config_version"].as_u64() >= Some(v) && cached.contains("192.0.2.71"))
                .then_some(())
        });
        assert!(
            got.is_some(),
            "{} never reached version {v} with the change (c1 at {}, c2 at {}): {last}\nagent log:\n{}\nc1 log:\n{}\nc2 log:\n{}",
            s.display(),
            c1.mesh_version(),
            c2.mesh_version(),
            a.log(),
            c1.log(),
            c2.log()
        );
    }
    // And they stand at one version, the set's.
    wait_for("both agents at the controllers' version", WAIT, || {
        let v = c1.mesh_version();
        (v == c2.mesh_version()
            && a1.status()["config_version"].as_u64() == Some(v)
            && a2.status()["config_version"].as_u64() == Some(v))
        .then_some(())
    });
}

/// Polls `f` until it returns `Some` or `timeout` passes (`None`).
fn crate_wait<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// An agent that knows both controllers (`controllers = [...]`) moves to the other one
/// when its controller is killed, resumes its config from its version (which never goes
/// back), and gets the next registry change there. `causewayctl` with both admin URLs,
/// the first one dead, answers from the second.
#[test]
fn an_agent_fails_over_to_another_controller_and_ctl_uses_the_first_that_answers() {
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let file = t.path().join("registry.toml");
    write_registry(&file, &["192.0.2.80"]);
    let toml = ha_config(t.path(), &etcd, Some(&file));
    let mut c1 = Controller::start_with_config(&t.path().join("c1"), &toml);
    let c2 = Controller::start_with_config(&t.path().join("c2"), &toml);
    c1.create_web_group();
    let s1 = t.path().join("a1");
    join_ok(&c1.token("web", &[]), &s1);
    let cfg = format!(
        "controllers = [\"{}\", \"{}\"]\n[identity]\nretry_min = \"100ms\"\nretry_max = \"1s\"\n",
        c1.control, c2.control
    );
    let a1 = AgentProcess::start_with(&s1, &cfg, &["--address", "127.0.0.21"]);
    let mut seen = 0;
    let mut version = |a: &AgentProcess| {
        let st = a.status();
        let v = st["config_version"].as_u64().unwrap_or(0);
        assert!(
            v >= seen,
            "config version went back from {seen} to {v}: {st}"
        );
        seen = v;
        st
    };
    wait_for("connected to the first controller", WAIT, || {
        let st = version(&a1);
        (st["controller_connected"] == true && st["controller"] == c1.control.as_str())
            .then_some(())
    });
    wait_for("the agent has the registry", WAIT, || {
        let v = c2.mesh_version();
        (version(&a1)["config_version"].as_u64() == Some(v)).then_some(())
    });

    let c1_admin = c1.admin.clone();
    c1.kill();
    let killed = Instant::now();
    wait_for("connected to the second controller", WAIT, || {
        let st = version(&a1);
        (st["controller_connected"] == true && st["controller"] == c2.control.as_str())
            .then_some(())
    });
    println!(
        "agent on the second controller {:?} after the kill",
        killed.elapsed()
    );
    write_registry(&file, &["192.0.2.80", "192.0.2.81"]);
    // The agent's cached config (written after the status) has the change.
    wait_for(
        "the change reaches the agent on the second controller",
        WAIT,
        || {
            let v = c2.mesh_version();
            let cached = std::fs::read_to_string(s1.join("config.json")).unwrap_or_default();
            (web_addresses(&c2).contains("192.0.2.81")
                && version(&a1)["config_version"].as_u64() == Some(v)
                && cached.contains("192.0.2.81"))
            .then_some(())
        },
    );

    // causewayctl: the dead controller first, then the live one; one credential for
    // both (the operator copied admin.token; here the live one's is used).
    let out = Command::new(bin("causewayctl"))
        .args([
            "--controller",
            &c1_admin,
            "--controller",
            &c2.admin,
            "--admin-token-file",
            c2.data_dir.join("admin.token").to_str().unwrap(),
            "agent",
            "list",
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let id = agent_id(&s1);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&id),
        "{}",
        describe(&out)
    );
    // With only the dead one, the error names it.
    let out = Command::new(bin("causewayctl"))
        .args([
            "--controller",
            &c1_admin,
            "--admin-token-file",
            c2.data_dir.join("admin.token").to_str().unwrap(),
            "agent",
            "list",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&c1_admin),
        "{}",
        describe(&out)
    );
}

/// Three etcd members: with the first one (every controller's first endpoint) killed,
/// the set keeps one leader, joins are served by both controllers and a registry change
/// still reaches both. Each controller reports its etcd request latencies, and counts the
/// requests that failed against the dead member.
#[test]
fn with_one_of_three_etcd_members_killed_the_controllers_keep_serving() {
    let t = tempfile::tempdir().unwrap();
    let mut members = Member::cluster(t.path(), 3);
    let file = t.path().join("registry.toml");
    write_registry(&file, &["192.0.2.90"]);
    let toml = ha_config_on(t.path(), &members, Some(&file));
    let c1 = Controller::start_with_config(&t.path().join("c1"), &toml);
    let c2 = Controller::start_with_config(&t.path().join("c2"), &toml);
    one_leader(&[&c1, &c2]);
    c1.create_web_group();
    join_ok(&c1.token("web", &[]), &t.path().join("a0"));

    let mut first = members.remove(0);
    let _ = first.child.kill();
    let _ = first.child.wait();
    // Joins on both controllers, a registry change on both, one leader.
    for (i, c) in [&c1, &c2].into_iter().enumerate() {
        let token = c1.token("web", &[]);
        let mut to_c = causeway_api::token::JoinToken::decode(&token).unwrap();
        to_c.controller = c.control.clone();
        join_ok(&to_c.encode(), &t.path().join(format!("a{}", i + 1)));
    }
    write_registry(&file, &["192.0.2.90", "192.0.2.91"]);
    for c in [&c1, &c2] {
        wait_for("the change on both controllers", WAIT, || {
            (web_addresses(c) == set(&["192.0.2.90", "192.0.2.91"])).then_some(())
        });
    }
    one_leader(&[&c1, &c2]);
    assert_eq!(members[0].count("/causeway/agents/"), 3);
    for c in [&c1, &c2] {
        let requests = metric(c, "causeway_controller_store_request_seconds_count");
        assert!(requests.is_some_and(|n| n > 0.0), "{requests:?}");
        let errors = metric(c, "causeway_controller_etcd_errors_total");
        println!(
            "{}: etcd requests {requests:?}, failed {errors:?}",
            c.data_dir.display()
        );
    }
}

/// On sled (the default) the one controller always leads.
#[test]
fn a_sled_controller_always_leads() {
    let t = tempfile::tempdir().unwrap();
    let c = Controller::start_with_config(&t.path().join("c"), "");
    assert_eq!(metric(&c, "causeway_controller_leader"), Some(1.0));
    assert!(!c.log().contains("registry sources running"), "{}", c.log());
}

/// A source's state change that makes no new version (the file source's file is gone:
/// stale, its endpoints kept) reaches the follower too.
#[test]
fn a_source_turning_stale_shows_on_every_controller() {
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let file = t.path().join("registry.toml");
    write_registry(&file, &["192.0.2.100"]);
    let toml = ha_config(t.path(), &etcd, Some(&file));
    let c1 = Controller::start_with_config(&t.path().join("c1"), &toml);
    let c2 = Controller::start_with_config(&t.path().join("c2"), &toml);
    one_leader(&[&c1, &c2]);
    let state = |c: &Controller| {
        c.api("/v1/registry/sources")
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == "external")
            .map(|s| s["state"].as_str().unwrap_or_default().to_owned())
    };
    for c in [&c1, &c2] {
        wait_for("synced on both", WAIT, || {
            (state(c).as_deref() == Some("synced") && web_addresses(c).len() == 1).then_some(())
        });
    }
    let version = c1.mesh_version();
    std::fs::remove_file(&file).unwrap();
    for c in [&c1, &c2] {
        wait_for("stale on both", WAIT, || {
            (state(c).as_deref() == Some("stale")).then_some(())
        });
        assert_eq!(web_addresses(c), set(&["192.0.2.100"]), "endpoints kept");
    }
    println!("version {version} before, {} after", c1.mesh_version());
}

/// 200 joins with a `uses: 100` token spread over three controllers, the leader killed
/// (`kill -9`) during the stream: every join either succeeds once or fails with a clear
/// error, the token is spent exactly as many times as etcd holds agents (never above
/// 100), and every agent that got its certificate is in etcd.
#[test]
fn joins_during_a_leader_kill_never_overspend_and_lose_no_agent() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const JOINS: usize = 200;
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let toml = ha_config(t.path(), &etcd, None);
    let mut cs: Vec<Controller> = (1..=3)
        .map(|i| Controller::start_with_config(&t.path().join(format!("c{i}")), &toml))
        .collect();
    let leader = one_leader(&cs.iter().collect::<Vec<_>>());
    cs[0].create_web_group();
    let token =
        causeway_api::token::JoinToken::decode(&cs[0].token("web", &["--uses", "100"])).unwrap();
    let tokens: Arc<Vec<String>> = Arc::new(
        cs.iter()
            .map(|c| {
                let mut t = token.clone();
                t.controller = c.control.clone();
                t.encode()
            })
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let dead = Arc::new(AtomicUsize::new(usize::MAX));
    let results = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..6)
        .map(|_| {
            let (next, dead, results, tokens) =
                (next.clone(), dead.clone(), results.clone(), tokens.clone());
            let root = t.path().to_owned();
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= JOINS {
                        return;
                    }
                    let mut c = i % 3;
                    if c == dead.load(Ordering::SeqCst) {
                        c = (c + 1) % 3;
                    }
                    let dir = root.join(format!("j{i}"));
                    let out = agent(&[
                        "join",
                        &tokens[c],
                        "--state-dir",
                        dir.to_str().unwrap(),
                        "--hostname",
                        &format!("host{i}"),
                    ]);
                    results.lock().unwrap().push((dir, out));
                }
            })
        })
        .collect();
    wait_for("a third of the joins started", WAIT, || {
        (next.load(Ordering::SeqCst) >= JOINS / 3).then_some(())
    });
    dead.store(leader, Ordering::SeqCst);
    let killed_control = cs[leader].control.clone();
    cs[leader].kill();
    let killed = Instant::now();
    for w in workers {
        w.join().unwrap();
    }
    println!("joins finished {:?} after the kill", killed.elapsed());
    let results = std::mem::take(&mut *results.lock().unwrap());
    assert_eq!(results.len(), JOINS);
    let mut ok = Vec::new();
    let mut spent_refusals = 0;
    for (dir, out) in &results {
        if out.status.success() {
            ok.push(agent_id(dir));
            continue;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("has already been used") {
            spent_refusals += 1;
        } else {
            // In flight on the killed controller (the error names it), or etcd too slow
            // to answer on this busy machine (the error names etcd and the setting).
            assert!(
                err.contains(&killed_control)
                    || (err.contains("etcd is unreachable") && err.contains("[store] endpoints")),
                "a join fails only as spent, on the killed controller {killed_control}, or naming etcd: {}",
                describe(out)
            );
        }
    }
    let survivor = cs.iter().position(|c| c.pid().is_some()).unwrap();
    let ids = cs[survivor].agents();
    let stored = etcd.count("/causeway/agents/");
    println!(
        "{} joined, {spent_refusals} refused as spent, {stored} agents in etcd",
        ok.len()
    );
    assert!(stored <= 100, "{stored} agents for a 100-use token");
    assert!(ok.len() <= stored);
    for id in &ok {
        assert!(
            ids.iter().any(|a| a["id"].as_str() == Some(id.as_str())),
            "agent {id} joined but is not stored"
        );
    }
    let listed = cs[survivor].ctl_json(&["token", "list"]);
    let uses_left = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"].as_str() == Some(token.id.as_str()))
        .and_then(|t| t["uses_left"].as_u64())
        .unwrap();
    assert_eq!(uses_left as usize + stored, 100, "one use per stored agent");
    assert!(
        spent_refusals > 0 || stored < 100,
        "more joins than uses were refused"
    );
}
