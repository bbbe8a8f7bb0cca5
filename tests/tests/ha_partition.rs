//! A controller of an HA set cut off from etcd by an nft rule in its network namespace
//! (etcd, two controllers and an agent host each in their own namespace; needs root):
//! it refuses joins and renewals with an error naming etcd instead of issuing from stale
//! state, gives up the leadership, and once the rule is gone it catches up with the
//! registry changes made meanwhile and serves joins again.

#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway_tests::netns::{Lab, Node, Proc};
use causeway_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

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

/// A controller started in `node`, its admin API and metrics on the namespace's loopback.
struct Ctl {
    node: Node,
    data: PathBuf,
    proc: Proc,
}

impl Ctl {
    fn start(node: &Node, root: &Path, name: &str, config: &Path) -> Ctl {
        let data = root.join(name);
        std::fs::create_dir_all(&data).unwrap();
        let control = format!("{}:15012", node.addr);
        let mut proc = Proc::spawn(
            node,
            &root.join(format!("{name}.log")),
            bin("causeway-controller"),
            &[
                "--data-dir",
                data.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
                "--admin-listen",
                "127.0.0.1:15080",
                "--control-listen",
                &control,
                "--advertise",
                &control,
                "--metrics-listen",
                "127.0.0.1:15014",
            ],
        );
        let endpoints = data.join("endpoints.json");
        proc.wait_for("controller endpoints.json", WAIT, || {
            endpoints.exists().then_some(())
        });
        Ctl {
            node: node.clone(),
            data,
            proc,
        }
    }

    fn ctl(&self, args: &[&str]) -> String {
        self.node
            .causewayctl("http://127.0.0.1:15080", &self.data, args)
    }

    fn leads(&self) -> bool {
        let out = self
            .node
            .sh("curl -fsS -m 2 http://127.0.0.1:15014/metrics");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == "causeway_controller_leader 1")
    }

    fn payments(&self) -> Vec<String> {
        let list: Value =
            serde_json::from_str(&self.ctl(&["registry", "list", "--output", "json"])).unwrap();
        let mut out: Vec<String> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["namespace"] == "ext" && s["name"] == "payments")
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e["address"].as_str().map(str::to_owned))
            .collect();
        out.sort();
        out
    }
}

fn join(node: &Node, token: &str, dir: &Path) -> std::process::Output {
    node.cmd(bin("causeway-agent"))
        .args(["join", token, "--state-dir", dir.to_str().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn a_controller_cut_off_from_etcd_refuses_to_issue_and_catches_up_when_healed() {
    let lab = Lab::new(&["etcd", "c1", "c2", "host"]);
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let etcd_node = lab.node("etcd");
    let url = format!("http://{}:2379", etcd_node.addr);
    let _etcd = Proc::spawn(
        etcd_node,
        &root.join("etcd.log"),
        "etcd",
        &[
            "--name",
            "m1",
            "--data-dir",
            root.join("etcd-data").to_str().unwrap(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "m1=http://127.0.0.1:2380",
        ],
    );
    wait_for("etcd healthy", WAIT, || {
        let out = etcd_node.sh(&format!("curl -fsS -m 1 {url}/health"));
        String::from_utf8_lossy(&out.stdout)
            .contains("true")
            .then_some(())
    });
    let file = root.join("registry.toml");
    write_registry(&file, &["192.0.2.110"]);
    let kek = root.join("ca-kek");
    std::fs::write(&kek, "ef".repeat(32)).unwrap();
    let config = root.join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nbackend = \"etcd\"\nendpoints = [\"{url}\"]\nkek_file = \"{}\"\nlease_ttl = \"3s\"\ndial_timeout = \"1s\"\nrequest_timeout = \"2s\"\n\n[[sources.file]]\nname = \"external\"\npath = {:?}\n",
            kek.display(),
            file.to_str().unwrap()
        ),
    )
    .unwrap();
    let c1 = Ctl::start(lab.node("c1"), root, "c1", &config);
    let c2 = Ctl::start(lab.node("c2"), root, "c2", &config);
    wait_for("one leader", WAIT, || {
        (c1.leads() != c2.leads()).then_some(())
    });
    for c in [&c1, &c2] {
        wait_for("the registry on both", WAIT, || {
            (c.payments() == ["192.0.2.110"]).then_some(())
        });
    }
    c1.ctl(&[
        "group",
        "create",
        "web",
        "--namespace",
        "default",
        "--service-account",
        "web",
    ]);
    let token = c1.ctl(&["token", "create", "--group", "web", "--uses", "5"]);
    let mut to_c2 = causeway_api::token::JoinToken::decode(token.trim()).unwrap();
    to_c2.controller = format!("{}:15012", c2.node.addr);
    let to_c2 = to_c2.encode();
    let host = lab.node("host");
    let a1 = root.join("a1");
    let out = join(host, &to_c2, &a1);
    assert!(out.status.success(), "{}", describe(&out));
    let serial = cert_of(&a1).serial;

    // c2 cut off from etcd.
    c2.node.sh_ok(&format!(
        "nft add table inet cwpart && nft add chain inet cwpart out '{{ type filter hook output priority 0; policy accept; }}' && nft add rule inet cwpart out ip daddr {} tcp dport 2379 drop",
        etcd_node.addr
    ));
    let out = join(host, &to_c2, &root.join("a2"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("etcd is unreachable"),
        "a join on the cut-off controller is refused naming etcd: {}",
        describe(&out)
    );
    assert!(!root.join("a2/cert.pem").exists());
    let out = host
        .cmd(bin("causeway-agent"))
        .args(["renew", "--state-dir", a1.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("etcd is unreachable"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        cert_of(&a1).serial,
        serial,
        "the agent keeps its certificate"
    );
    // The other controller leads and takes the registry change.
    wait_for("c1 leads, c2 does not", WAIT, || {
        (c1.leads() && !c2.leads()).then_some(())
    });
    write_registry(&file, &["192.0.2.110", "192.0.2.111"]);
    wait_for("the change on c1", WAIT, || {
        (c1.payments() == ["192.0.2.110", "192.0.2.111"]).then_some(())
    });

    // Healed: c2 catches up and serves joins again.
    c2.node.sh_ok("nft delete table inet cwpart");
    wait_for("c2 catches up", WAIT, || {
        (c2.payments() == ["192.0.2.110", "192.0.2.111"]).then_some(())
    });
    let out = join(host, &to_c2, &root.join("a3"));
    assert!(out.status.success(), "{}", describe(&out));
    assert!(c1.leads() != c2.leads(), "one leader");
    drop(c1.proc);
    drop(c2.proc);
}
