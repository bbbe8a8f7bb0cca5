//! The merged registry in the real controller: sources from the fakes, the admin
//! interface (`causewayctl registry ...`), and restore from sled at restart.
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::time::Duration;

use causeway_fakes::FakeConsul;
use causeway_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn service(list: &Value, ns: &str, name: &str) -> Option<Value> {
    list.as_array()?
        .iter()
        .find(|s| s["namespace"] == ns && s["name"] == name)
        .cloned()
}

#[test]
fn consul_and_file_merge_and_survive_a_restart_without_their_sources() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let consul = rt.block_on(FakeConsul::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("external.toml");
    std::fs::write(
        &file,
        "[[services]]\nname = \"web\"\nnamespace = \"default\"\nports = { tcp = 8080 }\n[[services.endpoints]]\naddress = \"192.0.2.50\"\n\n[[services]]\nname = \"api\"\nnamespace = \"default\"\nports = { tcp = 9091 }\n[[services.endpoints]]\naddress = \"127.0.0.1\"\n",
    )
    .unwrap();
    let mut ctl = Controller::start_with_config(
        &dir.path().join("c"),
        &format!(
            "[[sources.consul]]\nname = \"consul-dc1\"\naddress = \"{}\"\ndatacenter = \"dc1\"\nnamespace = \"default\"\n\n[[sources.file]]\nname = \"external\"\npath = {:?}\n",
            consul.url(),
            file.to_str().unwrap()
        ),
    );

    // The same service from Consul and the file merges by union, with provenance.
    let web = wait_for("web from both sources", WAIT, || {
        let list = ctl.ctl_json(&["registry", "list"]);
        service(&list, "default", "web").filter(|w| w["endpoints"].as_array().unwrap().len() == 3)
    });
    assert!(
        web["vip"].as_str().unwrap().starts_with("240.240."),
        "{web}"
    );
    let eps = web["endpoints"].as_array().unwrap();
    for e in eps {
        for field in ["address", "ports", "healthy", "source", "stale"] {
            assert!(e.get(field).is_some(), "endpoint lacks {field}: {e}");
        }
    }
    let sources: Vec<&str> = eps.iter().map(|e| e["source"].as_str().unwrap()).collect();
    assert_eq!(sources.iter().filter(|s| **s == "consul-dc1").count(), 2);
    assert!(sources.contains(&"external"));
    assert_eq!(
        eps.iter().filter(|e| e["healthy"] == false).count(),
        1,
        "web-2 is critical in Consul"
    );
    let vip = web["vip"].clone();

    let srcs = ctl.ctl_json(&["registry", "sources"]);
    let consul_src = srcs
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "consul-dc1")
        .unwrap()
        .clone();
    assert_eq!(consul_src["kind"], "consul");
    assert_eq!(consul_src["state"], "synced");
    assert!(consul_src.get("last_error").is_some());
    // The file lists api at the address Consul has for it, with another port number:
    // both disagreements are reported, not hidden.
    let conflicts = wait_for("conflicts for api", WAIT, || {
        let c = ctl.ctl_json(&["registry", "conflicts"]);
        (c.as_array().unwrap().len() >= 2).then_some(c)
    });
    let kinds: Vec<&str> = conflicts
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"duplicate_address") && kinds.contains(&"port_mismatch"),
        "{conflicts}"
    );
    let text = ctl.ctl_ok(&["registry", "show", "web"]);
    assert!(
        text.contains("consul-dc1") && text.contains("external"),
        "{text}"
    );
    // Locality is region/zone: Consul's datacenter is the region.
    assert!(
        text.lines()
            .any(|l| l.contains("consul-dc1") && l.contains(" dc1/")),
        "{text}"
    );

    // Controller killed; Consul gone too. After restart, before any source answers,
    // the merged registry is back from sled, with the same VIP.
    wait_for("the registry on disk", WAIT, || {
        let m = ctl.api("/v1/mesh");
        (m["durable_version"] == m["version"]).then_some(())
    });
    ctl.kill();
    drop(consul);
    std::fs::remove_file(&file).unwrap();
    ctl.restart();
    let list = ctl.ctl_json(&["registry", "list"]);
    let web = service(&list, "default", "web").expect("web restored from the store");
    assert_eq!(web["endpoints"].as_array().unwrap().len(), 3);
    assert_eq!(web["vip"], vip, "VIPs are stable across restarts");
    // The failing sources are marked stale with their error; nothing is emptied.
    let srcs = wait_for("both sources stale", WAIT, || {
        let srcs = ctl.ctl_json(&["registry", "sources"]);
        srcs.as_array()
            .unwrap()
            .iter()
            .filter(|s| s["state"] == "stale" && s["last_error"].is_string())
            .count()
            .eq(&2)
            .then_some(srcs)
    });
    assert!(srcs.to_string().contains("consul-dc1"));
    let web = service(&ctl.ctl_json(&["registry", "list"]), "default", "web").unwrap();
    let eps = web["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 3, "a failing source never empties a service");
    assert!(eps.iter().all(|e| e["stale"] == true), "{eps:?}");
}

#[test]
fn a_bad_sources_config_is_refused_with_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[[sources.consul]]\nname = \"\"\naddress = \"not a url\"\n\n[[sources.file]]\nname = \"f\"\npath = \"\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("causeway-controller"))
        .args([
            "--data-dir",
            dir.path().join("d").to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ])
        .args([
            "--admin-listen",
            "127.0.0.1:0",
            "--control-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sources:"), "{err}");
    assert!(
        err.matches("sources:").count() >= 2,
        "every problem is listed: {err}"
    );
}

#[test]
fn a_consul_that_never_answers_is_listed_pending_then_stale_within_its_timeout() {
    // Accepts connections and never answers (a hung Consul).
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hung.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in hung.incoming() {
            match c {
                Ok(c) => conns.push(c),
                Err(_) => return,
            }
            if conns.len() > 64 {
                return;
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start_with_config(
        &dir.path().join("c"),
        &format!(
            "[[sources.consul]]\nname = \"consul-hung\"\naddress = \"http://{addr}\"\nwait = \"1s\"\nrequest_timeout = \"1s\"\nretry_initial = \"100ms\"\nretry_max = \"1s\"\n"
        ),
    );
    // Listed from the start, before any answer.
    let srcs = ctl.ctl_json(&["registry", "sources"]);
    let row = srcs
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "consul-hung")
        .cloned()
        .unwrap_or_else(|| panic!("a configured source is listed at once: {srcs}"));
    assert_eq!(row["kind"], "consul");
    assert!(
        row["state"] == "pending" || row["state"] == "stale",
        "{row}"
    );
    // Stale with the reason once its configured timeout (1s + 1s/16 + 1s) has passed;
    // with the default wait it would take over five minutes.
    let row = wait_for("the hung source reported stale", WAIT, || {
        let srcs = ctl.ctl_json(&["registry", "sources"]);
        srcs.as_array()?
            .iter()
            .find(|s| s["name"] == "consul-hung" && s["state"] == "stale")
            .cloned()
    });
    let err = row["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("no answer within"), "{row}");
    assert!(err.contains(&addr.to_string()), "{row}");
    drop(ctl);
    drop(held); // the thread ends with the process
}
