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
use causeway_controller::etcd::{Etcd, EtcdOptions, Op};
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
    let urls: Vec<String> = etcd.iter().map(|m| m.url.clone()).collect();
    ha_config_via(t, &urls, file)
}

/// [`ha_config`] with these etcd client URLs.
fn ha_config_via(t: &Path, urls: &[String], file: Option<&Path>) -> String {
    let kek = t.join("ca-kek");
    std::fs::write(&kek, "ab".repeat(32)).unwrap();
    let endpoints = urls
        .iter()
        .map(|u| format!("\"{u}\""))
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

/// A TCP relay on loopback in front of etcd for one controller. It forwards both ways,
/// except that it can hold the first request carrying a given pattern (a registry write
/// with a given fence) on its way to etcd until the test releases it: a write that the
/// controller sent while it led and that reaches etcd after it lost the lease, as a
/// write delayed in the network or in a paused process would.
struct Relay {
    url: String,
    hold: Arc<Hold>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    port: u16,
}

#[derive(Default)]
struct Hold {
    /// (pattern to hold, held now, released)
    state: std::sync::Mutex<(Option<Vec<u8>>, bool, bool)>,
    released: std::sync::Condvar,
}

impl Relay {
    fn start(etcd_url: &str) -> Relay {
        let upstream = etcd_url.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = Arc::new(Hold::default());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (h, st) = (hold.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
                let h = h.clone();
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut buf = vec![0u8; 64 << 10];
                    let mut tail: Vec<u8> = Vec::new();
                    loop {
                        let n = match c_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let chunk = &buf[..n];
                        let mut state = h.state.lock().unwrap();
                        if let Some(pattern) = state.0.clone() {
                            let mut seen = std::mem::take(&mut tail);
                            seen.extend_from_slice(chunk);
                            if seen.windows(pattern.len()).any(|w| w == pattern.as_slice()) {
                                state.0 = None;
                                state.1 = true;
                                while !state.2 {
                                    state = h.released.wait(state).unwrap();
                                }
                            } else {
                                let keep = seen.len().saturating_sub(pattern.len());
                                tail = seen.split_off(keep);
                            }
                        }
                        drop(state);
                        if s_write.write_all(chunk).is_err() {
                            break;
                        }
                    }
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Relay {
            url: format!("http://127.0.0.1:{port}"),
            hold,
            stop,
            port,
        }
    }

    /// Holds the next request that carries `pattern`.
    fn hold_request_with(&self, pattern: &str) {
        *self.hold.state.lock().unwrap() = (Some(pattern.as_bytes().to_vec()), false, false);
    }

    /// Whether a request is held now.
    fn holding(&self) -> bool {
        let s = self.hold.state.lock().unwrap();
        s.1 && !s.2
    }

    /// Lets the held request (and everything after it) through.
    fn release(&self) {
        self.hold.state.lock().unwrap().2 = true;
        self.hold.released.notify_all();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.release();
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop so that it sees the stop.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The create revision of the leadership key (the current leader's fence), from etcd.
fn leader_fence(etcd: &Member) -> i64 {
    let client = etcd.client();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(client.get(b"/causeway/leader"))
        .unwrap()
        .expect("a leader key")
        .create_revision
}

/// A leadership key deleted by hand (as `etcdctl del /causeway/leader` would): the
/// leader's lease still renews, so only its next registry write can tell it that it no
/// longer leads. That write is refused by the fence; the leader steps down at once,
/// campaigns again under a new fence, and the change lands in etcd in its new term (the
/// controller that kept "leading" wrote nothing again, forever).
#[test]
fn a_leader_whose_key_is_deleted_steps_down_at_its_first_fenced_write() {
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let file = t.path().join("registry.toml");
    write_registry(&file, &["192.0.2.70"]);
    let toml = ha_config(t.path(), &etcd, Some(&file));
    let c = Controller::start_with_config(&t.path().join("c1"), &toml);
    wait_for("the controller leads", WAIT, || {
        (metric(&c, "causeway_controller_leader") == Some(1.0)).then_some(())
    });
    wait_for("payments in etcd", WAIT, || {
        stored_payments(&etcd).contains("192.0.2.70").then_some(())
    });
    let fence = leader_fence(&etcd);

    let client = etcd.client();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(client.txn(
            &[],
            &[Op::Delete {
                key: b"/causeway/leader".to_vec(),
            }],
            &[],
        ))
        .unwrap();
    write_registry(&file, &["192.0.2.70", "192.0.2.71"]);
    c.wait_for("the change stored in etcd", WAIT, || {
        stored_payments(&etcd).contains("192.0.2.71").then_some(())
    });
    let log = c.log();
    assert!(
        log.contains("refused by the fence") && log.contains("no longer leading"),
        "{log}"
    );
    assert!(
        metric(&c, "causeway_controller_fenced_writes_total").unwrap_or(0.0) >= 1.0,
        "{log}"
    );
    assert!(leader_fence(&etcd) > fence, "a new term, under a new fence");
    wait_for("the controller leads again", WAIT, || {
        (metric(&c, "causeway_controller_leader") == Some(1.0)).then_some(())
    });
    assert_eq!(web_addresses(&c), set(&["192.0.2.70", "192.0.2.71"]));
}

/// The stored endpoints of `ext/payments`, read from etcd itself.
fn stored_payments(etcd: &Member) -> String {
    let client = etcd.client();
    let r = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(client.get_prefix(b"/causeway/mesh/data/", 0, 0))
        .unwrap();
    r.kvs
        .iter()
        .filter(|kv| String::from_utf8_lossy(&kv.key).contains("payments"))
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .collect()
}

/// The fencing test with real processes, without a race: the leader's registry write is
/// sent while it leads and held on its way to etcd (the relay), the leader is paused
/// (SIGSTOP) past its lease, the other controller takes over and writes the registry
/// twice; then the held write reaches etcd and must be refused by the fence (counted on
/// the old leader, `causeway_controller_fenced_writes_total`), etcd keeps the new
/// leader's registry, and the resumed controller steps down and follows. Without the
/// relay, whether the resumed process writes before it notices its lost lease is a race
/// (the term's tasks and the election wake together); the in-process test below covers
/// a stale leader writing on an up-to-date view.
#[test]
fn a_paused_leader_is_replaced_and_steps_down_when_it_resumes() {
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let file = t.path().join("registry.toml");
    write_registry(&file, &["192.0.2.60"]);
    // Each controller reaches etcd through its own relay; a request waits there for as
    // long as the test holds it (the request timeout is longer than the test).
    let relays: Vec<Relay> = (0..2).map(|_| Relay::start(&etcd.url)).collect();
    let cs: Vec<Controller> = relays
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let toml = ha_config_via(t.path(), std::slice::from_ref(&r.url), Some(&file))
                .replace("[store]\n", "[store]\nrequest_timeout = \"5m\"\n");
            Controller::start_with_config(&t.path().join(format!("c{}", i + 1)), &toml)
        })
        .collect();
    let refs: Vec<&Controller> = cs.iter().collect();
    let leader = one_leader(&refs);
    let (old, new, relay) = (&cs[leader], &cs[1 - leader], &relays[leader]);
    for c in &cs {
        wait_for("web on both", WAIT, || {
            (web_addresses(c) == set(&["192.0.2.60"])).then_some(())
        });
    }

    // The leader writes a registry change under its fence; the write is held.
    let fence = leader_fence(&etcd);
    relay.hold_request_with(&format!("\"create_revision\":\"{fence}\""));
    write_registry(&file, &["192.0.2.60", "192.0.2.61"]);
    wait_for(
        "the leader's registry write held on its way to etcd",
        WAIT,
        || relay.holding().then_some(()),
    );
    assert_eq!(
        metric(old, "causeway_controller_leader"),
        Some(1.0),
        "it still leads (its lease is renewed on other connections)"
    );

    // Paused past its lease with its write in flight: the other controller takes over,
    // runs the sources and writes the registry (twice).
    signal(old, "-STOP");
    let paused = Instant::now();
    wait_for("the other controller leads", WAIT, || {
        (metric(new, "causeway_controller_leader") == Some(1.0)).then_some(())
    });
    println!("taken over {:?} after the pause", paused.elapsed());
    assert_ne!(leader_fence(&etcd), fence, "a new term, a new fence");
    wait_for("the change on the new leader", WAIT, || {
        (web_addresses(new) == set(&["192.0.2.60", "192.0.2.61"])).then_some(())
    });
    write_registry(&file, &["192.0.2.62"]);
    wait_for("the next change on the new leader", WAIT, || {
        (web_addresses(new) == set(&["192.0.2.62"])).then_some(())
    });

    // The held write reaches etcd under the old fence, and the old leader resumes: the
    // write is refused, and etcd keeps the new leader's registry.
    relay.release();
    signal(old, "-CONT");
    wait_for("the late write refused by the fence", WAIT, || {
        (metric(old, "causeway_controller_fenced_writes_total").unwrap_or(0.0) >= 1.0).then_some(())
    });
    let stored = stored_payments(&etcd);
    assert!(
        stored.contains("192.0.2.62") && !stored.contains("192.0.2.61"),
        "etcd holds the new leader's registry: {stored}"
    );
    // It steps down, follows the new leader's registry, and one leader stays.
    wait_for("the old leader steps down", WAIT, || {
        (metric(old, "causeway_controller_leader") == Some(0.0)).then_some(())
    });
    assert!(old.log().contains("no longer leading"), "{}", old.log());
    wait_for("the old leader follows", WAIT, || {
        (web_addresses(old) == set(&["192.0.2.62"])).then_some(())
    });
    assert_eq!(leaders(&refs), vec![1 - leader], "one leader");
    write_registry(&file, &["192.0.2.63"]);
    for c in &cs {
        wait_for("the next change on both", WAIT, || {
            (web_addresses(c) == set(&["192.0.2.63"])).then_some(())
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

/// The mesh version stored in `store` and the services of its `file` source.
async fn stored_file_services(store: Arc<dyn Store>) -> (u64, BTreeSet<String>) {
    let stored = tokio::task::spawn_blocking(move || store.load_mesh())
        .await
        .unwrap()
        .unwrap();
    let services = stored
        .data
        .get("file")
        .map(|d| d.keys().map(|k| k.to_string()).collect())
        .unwrap_or_default();
    (stored.version, services)
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

/// A registry write that lost the race with another controller's write (here B's; in a
/// running set a join or a renewal on another controller) is tried again on the reloaded
/// mesh instead of being dropped: the stored registry has A's change on top of B's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_write_that_lost_a_race_is_tried_again_on_the_reloaded_mesh() {
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let (store_a, mesh_a) = mesh_on(&etcd).await;
    let (_store_b, mesh_b) = mesh_on(&etcd).await;
    let v1 = mesh_a
        .apply_source_update(file_update(&["web"]))
        .await
        .unwrap();
    assert_eq!(mesh_b.resync(false).await.unwrap(), v1);
    // B writes; A has not seen it, so A's next write is made on a stale version.
    let v2 = mesh_b
        .apply_source_update(file_update(&["web", "api"]))
        .await
        .unwrap();
    let v3 = mesh_a
        .apply_source_update(file_update(&["web", "api", "db"]))
        .await
        .unwrap();
    assert!(v3 > v2, "{v3} after {v2}");
    let (stored_version, services) = stored_file_services(store_a).await;
    assert_eq!(stored_version, v3);
    assert!(
        services.iter().any(|s| s.contains("db")),
        "A's change is stored: {services:?}"
    );
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
    let (stored_version, services) = stored_file_services(store_a).await;
    assert_eq!(stored_version, v2, "the fenced write stored nothing");
    assert_eq!(
        services,
        BTreeSet::from(["default/api".to_owned(), "default/web".to_owned()])
    );
    // A's view, changed in memory before the refusal, is reloaded: B's mesh, no db.
    assert_eq!(mesh_a.resync(false).await.unwrap(), v2);
    assert!(mesh_a.services().iter().all(|s| s.name != "db"));
    assert!(mesh_a.services().iter().any(|s| s.name == "api"));
}

/// A mesh on `etcd` whose leader (fence `first`) stored the file source's `web` at
/// version `v1`, then lost its leadership key: deleted by hand, its lease still alive.
struct DeletedKey {
    client: Etcd,
    store: Arc<dyn Store>,
    mesh: Arc<Mesh>,
    first: Fence,
    v1: u64,
}

const LEADER_KEY: &[u8] = b"/causeway/leader";

/// Takes the leadership key under a fresh lease.
async fn lead(client: &Etcd) -> Fence {
    let (lease, _) = client.lease_grant(Duration::from_secs(30)).await.unwrap();
    let l = client
        .try_lead(LEADER_KEY, b"a", lease)
        .await
        .unwrap()
        .unwrap();
    Fence {
        key: l.key,
        revision: l.fence,
    }
}

impl DeletedKey {
    async fn set_up(etcd: &Member) -> DeletedKey {
        let client = etcd.client();
        let (store, mesh) = mesh_on(etcd).await;
        let first = lead(&client).await;
        let v1 = mesh
            .apply_source_update_fenced(file_update(&["web"]), Some(first.clone()))
            .await
            .unwrap();
        client
            .txn(
                &[],
                &[Op::Delete {
                    key: LEADER_KEY.to_vec(),
                }],
                &[],
            )
            .await
            .unwrap();
        DeletedKey {
            client,
            store,
            mesh,
            first,
            v1,
        }
    }
}

/// The next leadership term, as `leader_duties` starts it (a reload if needed, then the
/// sources send what they know: `web` and `api`): the change is a new version, stored.
async fn the_next_term_stores_the_change(
    client: &Etcd,
    store: &Arc<dyn Store>,
    mesh: &Mesh,
    v1: u64,
) {
    let second = lead(client).await;
    mesh.resync(false).await.unwrap();
    let v2 = mesh
        .apply_source_update_fenced(file_update(&["web", "api"]), Some(second))
        .await
        .unwrap();
    assert!(v2 > v1, "the change is a new version ({v1} then {v2})");
    let (stored_version, services) = stored_file_services(store.clone()).await;
    assert_eq!(stored_version, v2);
    assert_eq!(
        services,
        BTreeSet::from(["default/api".to_owned(), "default/web".to_owned()])
    );
}

/// The deleted-key case without a race: a leader's write refused by the fence changed
/// its registry in memory only; when the same controller leads again and its sources
/// send the same data (a new term restarts them), that data is still a change to store.
/// The refused write reloads the mesh before it returns: if it were left to the
/// background reload, the new term's first write could be diffed against the unstored
/// registry, find nothing changed and store nothing, for as long as the source stays as
/// it is (seen in CI as a change that never reached etcd).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_refused_by_the_fence_is_stored_when_the_controller_leads_again() {
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let DeletedKey {
        client,
        store,
        mesh,
        first,
        v1,
    } = DeletedKey::set_up(&etcd).await;
    let err = mesh
        .apply_source_update_fenced(file_update(&["web", "api"]), Some(first))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no longer the leader"), "{err}");

    the_next_term_stores_the_change(&client, &store, &mesh, v1).await;
}

/// The same, when the refused write never returns: a term's tasks are aborted as soon as
/// the election notices the fence (the store signals it from inside the write), so the
/// source task can be dropped while its write is still on its way to etcd, after the
/// registry in memory was changed and before any error handling runs. The next term
/// must still find that data a change to store. Seen in CI and in one local run of six
/// of the process-level test above (the controller led again at once and stored
/// nothing): the mesh is marked diverged before the write goes out, not after it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_write_is_abandoned_midway_is_stored_by_the_next_term() {
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let DeletedKey {
        client,
        store,
        mesh,
        first,
        v1,
    } = DeletedKey::set_up(&etcd).await;
    // Polled once, then dropped: the registry is changed in memory and the write is
    // out (it runs to its end on a blocking thread, refused), but the caller is gone.
    let abandoned = tokio::time::timeout(
        Duration::ZERO,
        mesh.apply_source_update_fenced(file_update(&["web", "api"]), Some(first.clone())),
    )
    .await;
    assert!(abandoned.is_err(), "the write should still be on its way");
    // Until the refused write has reached etcd (the fence signal marks it).
    wait_for("the refused write", Duration::from_secs(20), || {
        causeway_controller::ha::is_fenced(first.revision).then_some(())
    });

    the_next_term_stores_the_change(&client, &store, &mesh, v1).await;
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

/// `sh -c` script that runs a command in its own mount namespace (`unshare --user
/// --map-root-user --mount`, so no root needed) with `$0` mounted over /etc/hosts: the
/// command resolves names with the system's resolver (getaddrinfo) against that file,
/// and nothing changes for other processes.
const WITH_HOSTS: &str = "mount --bind \"$0\" /etc/hosts && exec \"$@\"";

/// A DNS name for the HA set: both controllers advertise `controllers.causeway.test:PORT`
/// (the join token names it), one on 127.0.0.2, the other on [::1], same port. The
/// agent (and its join) resolve the name through a hosts file of their own, which first
/// lists only the first controller: the agent joins and connects there. The record then
/// gains the second controller's IPv6 address, the first controller is killed, and the
/// agent, resolving the name again on its next round, connects to the second one and
/// gets the next registry change there.
#[test]
fn an_agent_uses_every_address_of_a_controller_name_and_resolves_it_again() {
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let file = t.path().join("registry.toml");
    write_registry(&file, &["192.0.2.70"]);
    let toml = ha_config(t.path(), &etcd, Some(&file));
    let port = unshared_port();
    let name = format!("controllers.causeway.test:{port}");
    let mut c1 = Controller::start_listening(
        &t.path().join("c1"),
        &toml,
        &format!("127.0.0.2:{port}"),
        &name,
    );
    let c2 =
        Controller::start_listening(&t.path().join("c2"), &toml, &format!("[::1]:{port}"), &name);
    let hosts = t.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.2 controllers.causeway.test\n").unwrap();
    let wrap = [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "--",
        "sh",
        "-c",
        WITH_HOSTS,
        hosts.to_str().unwrap(),
    ];

    c1.create_web_group();
    let token = c1.token("web", &[]);
    assert_eq!(
        causeway_api::JoinToken::decode(&token).unwrap().controller,
        name,
        "the token names the set"
    );
    let s1 = t.path().join("a1");
    let out = Command::new(wrap[0])
        .args(&wrap[1..])
        .arg(bin("causeway-agent"))
        .args(["join", &token, "--state-dir", s1.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "join by name: {}", describe(&out));
    // No `controllers`: the agent uses the token's name.
    let a1 = AgentProcess::start_through(
        &wrap,
        &s1,
        "[identity]\nretry_min = \"100ms\"\nretry_max = \"1s\"\n",
        &["--address", "127.0.0.22"],
    );
    let first = format!("{name} (127.0.0.2:{port})");
    let second = format!("{name} ([::1]:{port})");
    let on_first = wait_for("connected to the first controller by name", WAIT, || {
        let st = a1.status();
        (st["controller_connected"] == true).then(|| st["controller"].clone())
    });

    // The record gains the second controller (IPv6); the first one dies. Only a new
    // resolution of the name reaches the second controller.
    std::fs::write(
        &hosts,
        "127.0.0.2 controllers.causeway.test\n::1 controllers.causeway.test\n",
    )
    .unwrap();
    c1.kill();
    write_registry(&file, &["192.0.2.70", "192.0.2.71"]);
    wait_for(
        "the change reaches the agent through the second controller",
        WAIT,
        || {
            let v = c2.mesh_version();
            let cached = std::fs::read_to_string(s1.join("config.json")).unwrap_or_default();
            let st = a1.status();
            (st["controller_connected"] == true
                && st["config_version"].as_u64() == Some(v)
                && cached.contains("192.0.2.71"))
            .then_some(())
        },
    );
    // The status names the entry and the address in use.
    assert_eq!(on_first, first.as_str());
    assert_eq!(a1.status()["controller"], second.as_str());
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

/// The issue's scenario: three etcd members, three controllers, two running agents (one
/// on the leader, one on another controller, each knowing all three). 200 joins with a
/// `uses: 100` token spread over the controllers, the leader killed (`kill -9`) during
/// the stream and the registry source changed at once: every join either succeeds once
/// or fails with a clear error, the token is spent exactly as many times as etcd holds
/// new agents (never above 100), every agent that got its certificate is in etcd, the
/// change reaches both running agents (the time from the kill is printed beside lease
/// TTL + 2 s, not asserted), and the leader's agent is connected to a survivor.
#[test]
fn joins_during_a_leader_kill_never_overspend_and_lose_no_agent() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const JOINS: usize = 200;
    let t = tempfile::tempdir().unwrap();
    let members = Member::cluster(t.path(), 3);
    let etcd = &members[0];
    let file = t.path().join("registry.toml");
    write_registry(&file, &["192.0.2.90"]);
    let toml = ha_config_on(t.path(), &members, Some(&file));
    let mut cs: Vec<Controller> = (1..=3)
        .map(|i| Controller::start_with_config(&t.path().join(format!("c{i}")), &toml))
        .collect();
    let leader = one_leader(&cs.iter().collect::<Vec<_>>());
    cs[0].create_web_group();

    // Two agents: a1 starts on the leader, a2 on another controller; both list all three.
    let other = (leader + 1) % 3;
    let running = cs[0].token("web", &["--uses", "2"]);
    let mut agents = Vec::new();
    for (n, first) in [(1, leader), (2, other)] {
        let mut tok = causeway_api::token::JoinToken::decode(&running).unwrap();
        tok.controller = cs[first].control.clone();
        let state = t.path().join(format!("a{n}"));
        join_ok(&tok.encode(), &state);
        let order: Vec<String> = (0..3)
            .map(|k| format!("\"{}\"", cs[(first + k) % 3].control))
            .collect();
        let cfg = format!(
            "controllers = [{}]\n[identity]\nretry_min = \"100ms\"\nretry_max = \"1s\"\n",
            order.join(", ")
        );
        let a = AgentProcess::start_with(&state, &cfg, &["--address", &format!("127.0.0.3{n}")]);
        wait_for(
            "each agent on its first controller, with the registry",
            WAIT,
            || {
                let st = a.status();
                let cached = std::fs::read_to_string(state.join("config.json")).unwrap_or_default();
                (st["controller_connected"] == true
                    && st["controller"] == cs[first].control.as_str()
                    && cached.contains("192.0.2.90"))
                .then_some(())
            },
        );
        agents.push((a, state));
    }
    let before = etcd.count("/causeway/agents/");
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
    write_registry(&file, &["192.0.2.90", "192.0.2.91"]);
    // Both agents watched together: each one's time is its own.
    let mut arrived: Vec<Option<Duration>> = vec![None; agents.len()];
    wait_for("the registry change at both running agents", WAIT, || {
        for ((_, state), at) in agents.iter().zip(arrived.iter_mut()) {
            let cached = std::fs::read_to_string(state.join("config.json")).unwrap_or_default();
            if at.is_none() && cached.contains("192.0.2.91") {
                *at = Some(killed.elapsed());
            }
        }
        arrived.iter().all(Option::is_some).then_some(())
    });
    for ((_, state), at) in agents.iter().zip(&arrived) {
        println!(
            "registry change at {} {:?} after the kill (lease TTL {TTL_SECS} s + 2 s = {} s)",
            state.display(),
            at.expect("waited for above"),
            TTL_SECS + 2
        );
    }
    for (a, _) in &agents {
        wait_for("the agent on a surviving controller", WAIT, || {
            let st = a.status();
            (st["controller_connected"] == true
                && st["controller"]
                    .as_str()
                    .is_some_and(|c| c != killed_control))
            .then_some(())
        });
    }
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
    // The two running agents were stored before the joins.
    let stored = etcd.count("/causeway/agents/") - before;
    println!(
        "{} joined, {spent_refusals} refused as spent, {stored} new agents in etcd",
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

/// Runs the real `ansible-playbook` (connection local) on `playbook` with the repository's
/// roles; returns its output, asserting success.
fn ansible_playbook(t: &Path, inventory: &Path, playbook: &Path, vars: &Path) -> String {
    let home = t.join("ansible-home");
    let out = Command::new("ansible-playbook")
        .arg("-i")
        .arg(inventory)
        .arg(playbook)
        .arg("-e")
        .arg(format!("@{}", vars.display()))
        .env(
            "ANSIBLE_ROLES_PATH",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../ansible/roles"),
        )
        .env("ANSIBLE_HOME", &home)
        .env("ANSIBLE_LOCAL_TEMP", home.join("tmp"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("LC_ALL", "C.UTF-8")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run ansible-playbook ({e}); install Debian's ansible (scripts/install-deps-vm.sh does)")
        });
    assert!(out.status.success(), "ansible-playbook: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `KEY="value"` lines of an environment file.
fn env_file(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{l:?}"));
            (k.to_owned(), v.trim_matches('"').to_owned())
        })
        .collect()
}

/// The Ansible roles for an HA set, through the real `ansible-playbook` (connection local,
/// each role's `config` tasks writing into a directory per inventory host instead of
/// /etc): the `etcd` role renders three members' settings from the inventory, and
/// `causeway_controller` with `causeway_store_backend: etcd` renders two controllers'
/// `[store]` and their CA key-encryption key. A second run changes nothing. Then etcd
/// runs with exactly the rendered settings and the controllers with exactly the rendered
/// controller.toml (the harness only moves their data dirs and listen ports): one
/// cluster, one CA, one leader.
#[test]
fn the_ansible_roles_render_an_ha_set_that_runs() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("rendered");
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let mut inventory = String::from("[etcd]\n");
    for (i, (client, peer)) in ports.iter().enumerate() {
        inventory.push_str(&format!(
            "e{i} ansible_host=127.0.0.1 etcd_client_port={client} etcd_peer_port={peer}\n"
        ));
    }
    inventory.push_str(
        "\n[causeway_controller]\nc1 ansible_host=127.0.0.1\nc2 ansible_host=127.0.0.1\n\n[all:vars]\nansible_connection=local\nansible_python_interpreter=/usr/bin/python3\n",
    );
    let inv = t.path().join("hosts.ini");
    std::fs::write(&inv, inventory).unwrap();
    // site.yml's two first plays, with only the roles' configuration tasks.
    let playbook = t.path().join("ha.yml");
    std::fs::write(
        &playbook,
        r#"---
- name: etcd members
  hosts: etcd
  gather_facts: false
  tasks:
    - name: A directory per member
      ansible.builtin.file:
        path: "{{ out }}/{{ inventory_hostname }}"
        state: directory
        mode: "0755"
    - name: The etcd role's configuration
      ansible.builtin.include_role:
        name: etcd
        tasks_from: config
      vars:
        etcd_config_file: "{{ out }}/{{ inventory_hostname }}/etcd"
        etcd_data_dir: "{{ out }}/{{ inventory_hostname }}/data"
        etcd_service: false

- name: Causeway controllers
  hosts: causeway_controller
  gather_facts: false
  tasks:
    - name: A directory per controller
      ansible.builtin.file:
        path: "{{ out }}/{{ inventory_hostname }}"
        state: directory
        mode: "0755"
    - name: The controller role's configuration
      ansible.builtin.include_role:
        name: causeway_controller
        tasks_from: config
      vars:
        causeway_controller_config_dir: "{{ out }}/{{ inventory_hostname }}"
        causeway_controller_config_group: root
        causeway_controller_service: false
"#,
    )
    .unwrap();
    let urls: Vec<String> = ports
        .iter()
        .map(|(c, _)| format!("http://127.0.0.1:{c}"))
        .collect();
    let kek = "cd".repeat(32);
    let vars = t.path().join("vars.json");
    std::fs::write(
        &vars,
        serde_json::json!({
            "out": out,
            "causeway_store_backend": "etcd",
            "causeway_etcd_endpoints": urls,
            "causeway_ca_kek": kek,
            "causeway_lease_ttl": "3s",
        })
        .to_string(),
    )
    .unwrap();
    let first = ansible_playbook(t.path(), &inv, &playbook, &vars);
    assert!(first.contains("changed=3"), "{first}");
    let second = ansible_playbook(t.path(), &inv, &playbook, &vars);
    for host in ["e0", "e1", "e2", "c1", "c2"] {
        let recap = second
            .lines()
            .find(|l| l.starts_with(host) && l.contains("ok="))
            .unwrap_or_else(|| panic!("no recap for {host}: {second}"));
        assert!(recap.contains("changed=0"), "second run: {recap}");
    }

    // The rendered files.
    let cluster = (0..3)
        .map(|i| format!("e{i}=http://127.0.0.1:{}", ports[i].1))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Vec::new();
    for (i, (client, _)) in ports.iter().enumerate() {
        let env = env_file(&out.join(format!("e{i}/etcd")));
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{k} missing: {env:?}"))
        };
        assert_eq!(get("ETCD_NAME"), format!("e{i}"));
        assert_eq!(get("ETCD_INITIAL_CLUSTER"), cluster);
        assert_eq!(
            get("ETCD_ADVERTISE_CLIENT_URLS"),
            format!("http://127.0.0.1:{client}")
        );
        let log = std::fs::File::create(t.path().join(format!("etcd-e{i}.log"))).unwrap();
        let child = Command::new("etcd")
            .envs(env)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        members.push(Member {
            child,
            url: urls[i].clone(),
        });
    }
    for name in ["c1", "c2"] {
        let path = out.join(name).join("controller.toml");
        let cfg = causeway_controller::config::Config::load(&path).unwrap();
        cfg.validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            cfg.store.backend,
            causeway_controller::config::StoreBackend::Etcd
        );
        assert_eq!(cfg.store.endpoints, urls);
        assert_eq!(cfg.store.lease_ttl, Duration::from_secs(3));
        let kek_file = out.join(name).join("ca-kek");
        assert_eq!(cfg.store.kek_file.as_deref(), Some(kek_file.as_path()));
        assert_eq!(std::fs::read_to_string(&kek_file).unwrap(), kek);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&kek_file).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }

    // They run: one etcd cluster, two controllers with one CA and one leader.
    for m in &members {
        let health = format!("{}/health", m.url);
        wait_for("the rendered etcd members form a cluster", WAIT, || {
            let out = Command::new("curl")
                .args(["-fsS", "-m", "1", &health])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .contains("true")
                .then_some(())
        });
    }
    let cs: Vec<Controller> = ["c1", "c2"]
        .iter()
        .map(|name| {
            let cfg = out.join(name).join("controller.toml");
            Controller::start(
                &t.path().join(format!("data-{name}")),
                &["--config", cfg.to_str().unwrap()],
            )
        })
        .collect();
    assert_eq!(cs[0].fingerprint, cs[1].fingerprint, "one CA");
    let refs: Vec<&Controller> = cs.iter().collect();
    one_leader(&refs);
}
