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
    // So is a renewal, and the agent keeps the certificate it has.
    let before = cert_of(&state);
    let out = agent(&["renew", "--state-dir", state.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("etcd is unreachable"),
        "{}",
        describe(&out)
    );
    assert_eq!(cert_of(&state).serial, before.serial);
}

/// A controller on sled is migrated: `migrate --from-sled --to-etcd` copies its state,
/// `--check` agrees, and restarted on etcd (same data dir and port) it renews the agent
/// that joined before, without a new join; the CA stays the same.
#[test]
fn a_sled_controller_migrated_to_etcd_keeps_its_agents() {
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let kek = t.path().join("ca-kek");
    std::fs::write(&kek, "cd".repeat(32)).unwrap();
    let data = t.path().join("c");
    let mut ctl = Controller::start_with_config(&data, "");
    ctl.create_web_group();
    let state = t.path().join("a1");
    join_ok(&ctl.token("web", &[]), &state);
    let before = cert_of(&state);
    let fingerprint = ctl.fingerprint.clone();
    ctl.stop();

    let migrate = |extra: &[&str]| {
        let mut args = vec![
            "migrate",
            "--from-sled",
            data.to_str().unwrap(),
            "--to-etcd",
            "--endpoints",
            &etcd.url,
            "--kek-file",
            kek.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Command::new(bin("causeway-controller"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = migrate(&[]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("agents: 1 copied"), "{text}");
    let out = migrate(&["--check"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hold the same state"));
    // Idempotent: a second copy finds everything there.
    let again = migrate(&[]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("agents: 0 copied, 1 already there"),
        "{}",
        describe(&again)
    );
    // Without the etcd settings: a clear error naming them.
    let out = Command::new(bin("causeway-controller"))
        .args([
            "migrate",
            "--from-sled",
            data.to_str().unwrap(),
            "--to-etcd",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("store.endpoints is empty")
            && err.contains("store.kek_file"),
        "{err}"
    );

    // The same controller, now on etcd.
    std::fs::write(
        data.with_extension("toml"),
        format!(
            "[store]\nbackend = \"etcd\"\nendpoints = [\"{}\"]\nkek_file = \"{}\"\n",
            etcd.url,
            kek.display()
        ),
    )
    .unwrap();
    ctl.restart();
    assert!(ctl.log().contains("state kept in etcd"), "{}", ctl.log());
    assert_eq!(ctl.fingerprint, fingerprint, "the same CA");
    let out = agent(&["renew", "--state-dir", state.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let after = cert_of(&state);
    assert_ne!(after.serial, before.serial, "a new certificate");
    let agents = ctl.agents();
    assert_eq!(agents.len(), 1, "{agents:#?}");
    assert_eq!(agents[0]["renewals"], 1);
    // Now the two differ: the check says so and fails.
    let out = migrate(&["--check"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("differ in"),
        "{}",
        describe(&out)
    );
}

/// The mesh on etcd: a file source's service gets a VIP, both are written to etcd by the
/// registry task, and a controller restarted on the same etcd restores the same version
/// and VIP before the source answers again.
#[test]
fn the_mesh_state_on_etcd_survives_a_restart() {
    let t = tempfile::tempdir().unwrap();
    let etcd = Member::start(t.path());
    let kek = t.path().join("ca-kek");
    std::fs::write(&kek, "ef".repeat(32)).unwrap();
    let file = t.path().join("services.toml");
    std::fs::write(
        &file,
        "[[services]]\nname = \"pay\"\nports = { https = 443 }\n[[services.endpoints]]\naddress = \"203.0.113.10\"\n",
    )
    .unwrap();
    let toml = format!(
        "[store]\nbackend = \"etcd\"\nendpoints = [\"{}\"]\nkek_file = \"{}\"\n\n[[sources.file]]\nname = \"ext\"\npath = {:?}\n",
        etcd.url,
        kek.display(),
        file.to_str().unwrap()
    );
    let mut ctl = Controller::start_with_config(&t.path().join("c"), &toml);
    let find = |ctl: &Controller| {
        ctl.ctl_json(&["registry", "list"])
            .as_array()
            .and_then(|l| l.iter().find(|s| s["name"] == "pay").cloned())
    };
    let pay = wait_for("pay in the registry", Duration::from_secs(20), || {
        find(&ctl)
    });
    let vip = pay["vip"].as_str().unwrap().to_owned();
    let version = ctl.mesh_version();
    assert!(version > 0);
    let keys = etcd.keys("/causeway/mesh/");
    for want in [
        "/causeway/mesh/version",
        "/causeway/mesh/vips/default/pay",
        "/causeway/mesh/data/ext\0default/pay",
        "/causeway/mesh/sources/ext",
    ] {
        assert!(
            keys.iter().any(|k| k == want),
            "{want:?} missing from {keys:#?}"
        );
    }

    // Restarted without the file: the service and its VIP come back from etcd.
    std::fs::remove_file(&file).unwrap();
    ctl.restart();
    assert!(ctl.mesh_version() >= version);
    let pay = find(&ctl).expect("pay restored from etcd");
    assert_eq!(pay["vip"].as_str(), Some(vip.as_str()));
}
