//! The real controller with `[store] backend = "etcd"` (a real etcd member, Debian's
//! `etcd-server`; the test-deps script installs it): it serves a join end to end, keeps
//! its state in etcd and nothing in its data dir, a second controller on the same etcd
//! shares the CA and sees the agent, and with etcd gone a join is refused with an error
//! instead of being issued from stale state.

#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use causeway_controller::etcd::{Etcd, EtcdOptions};
use causeway_tests::*;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .unwrap()
        .port()
}

/// One etcd member on loopback, stopped on drop.
struct Member {
    child: Option<Child>,
    url: String,
}

impl Member {
    fn start(dir: &Path) -> Member {
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .args([
                "--name",
                "m1",
                "--data-dir",
                dir.join("etcd-data").to_str().unwrap(),
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("m1={peer_url}"),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start etcd ({e}); install it with: apt-get install etcd-server (scripts/install-test-deps.sh does)")
            });
        let health = format!("{url}/health");
        wait_for("etcd healthy", Duration::from_secs(30), || {
            let out = Command::new("curl")
                .args(["-fsS", "-m", "1", &health])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .contains("true")
                .then_some(())
        });
        Member {
            child: Some(child),
            url,
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The keys under `prefix`, read from etcd itself.
    fn keys(&self, prefix: &str) -> Vec<String> {
        let etcd = Etcd::new(&EtcdOptions {
            endpoints: vec![self.url.clone()],
            ..EtcdOptions::default()
        })
        .unwrap();
        let r = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(etcd.get_prefix(prefix.as_bytes(), 0, 0))
            .unwrap();
        r.kvs
            .into_iter()
            .map(|kv| String::from_utf8(kv.key).unwrap())
            .collect()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn a_controller_on_etcd_serves_a_join_and_shares_its_state() {
    let t = tempfile::tempdir().unwrap();
    let mut etcd = Member::start(t.path());
    let kek = t.path().join("ca-kek");
    std::fs::write(&kek, "ab".repeat(32)).unwrap();
    let toml = format!(
        "[store]\nbackend = \"etcd\"\nendpoints = [\"{}\"]\nkek_file = \"{}\"\n",
        etcd.url,
        kek.display()
    );
    let c1 = Controller::start_with_config(&t.path().join("c1"), &toml);
    assert!(c1.log().contains("state kept in etcd"), "{}", c1.log());
    c1.create_web_group();
    let token = c1.token("web", &["--uses", "2"]);
    let state = t.path().join("a1");
    join_ok(&token, &state);
    let id = agent_id(&state);
    assert_eq!(
        cert_of(&state).spiffe_id.to_string(),
        "spiffe://causeway.local/ns/default/sa/web"
    );

    // The state is in etcd, not in the data dir.
    let keys = etcd.keys("/causeway/");
    for want in [
        "/causeway/ca/current".to_owned(),
        "/causeway/groups/web".to_owned(),
        format!("/causeway/agents/{id}"),
    ] {
        assert!(keys.contains(&want), "{want} missing from {keys:#?}");
    }
    assert!(
        !t.path().join("c1/store").exists(),
        "no sled store with backend = \"etcd\""
    );

    // A second controller on the same etcd: the same CA, the same agents and tokens.
    let c2 = Controller::start_with_config(&t.path().join("c2"), &toml);
    assert_eq!(c2.fingerprint, c1.fingerprint, "one CA for the set");
    let agents = c2.agents();
    assert!(
        agents.iter().any(|a| a["id"].as_str() == Some(id.as_str())),
        "{agents:#?}"
    );
    let tokens = c2.ctl_json(&["token", "list"]);
    let listed = tokens.to_string();
    assert!(listed.contains("\"uses_left\":1"), "{listed}");

    // etcd gone: a join is refused, not issued from what the controller remembers.
    etcd.kill();
    let err = join_err(&token, &t.path().join("a2"));
    assert!(!t.path().join("a2/cert.pem").exists());
    assert!(
        err.contains("etcd is unreachable") && err.contains("[store] endpoints"),
        "the refusal names etcd and the setting: {err}"
    );
}
