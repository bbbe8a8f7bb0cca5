//! Joining from existing registries (issue 7, item 3): a VM whose service is already
//! registered in Consul or Eureka joins with a group that names that registration
//! (`causewayctl group create … --registry-service SOURCE/SERVICE`). The real controller
//! with the fake Consul and Eureka as sources, real agents: the merged registry shows ONE
//! endpoint per VM, with the source's provenance and the agent's identity, and the agents
//! get it pushed with that identity (so their data plane reaches it through the mTLS
//! tunnel).
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::time::Duration;

use causeway_fakes::{ConsulRegistration, EurekaInstance, FakeConsul, FakeEureka};
use causeway_tests::*;
use serde_json::Value;

const AGENT_CFG: &str = "[identity]\nretry_min = \"100ms\"\nretry_max = \"1s\"\n";
const WAIT: Duration = Duration::from_secs(45);

fn endpoints(ctl: &Controller, name: &str) -> Vec<Value> {
    ctl.ctl_json(&["registry", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["namespace"] == "default" && s["name"] == name)
        .map(|s| s["endpoints"].as_array().cloned().unwrap())
        .unwrap_or_default()
}

/// The endpoint at `address`, once it carries an identity.
fn bound_at(ctl: &Controller, service: &str, address: &str) -> (Vec<Value>, Value) {
    wait_for(
        &format!("{service} at {address} bound to its agent"),
        WAIT,
        || {
            let eps = endpoints(ctl, service);
            let ep = eps
                .iter()
                .find(|e| e["address"] == address && e["identity"].is_string())
                .cloned()?;
            Some((eps, ep))
        },
    )
}

#[test]
fn a_vm_registered_in_consul_or_eureka_is_one_endpoint_with_provenance_and_identity() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let consul = rt.block_on(FakeConsul::start_empty()).unwrap();
    let eureka = rt.block_on(FakeEureka::start_empty()).unwrap();
    // Already registered before Causeway arrives: web on two VMs in Consul (only the
    // first gets an agent), billing on one VM in Eureka.
    consul.register(&ConsulRegistration::new("web-1", "web", "127.0.0.31", 8080));
    consul.register(&ConsulRegistration::new("web-2", "web", "127.0.0.32", 8080));
    eureka.register(&EurekaInstance::new(
        "BILLING",
        "billing-1",
        "127.0.0.41",
        9090,
    ));
    let dir = tempfile::tempdir().unwrap();
    let ctl = Controller::start_with_config(
        &dir.path().join("c"),
        &format!(
            "[mesh]\nagent_grace = \"2s\"\n\n[[sources.consul]]\nname = \"consul-dc1\"\naddress = \"{}\"\ndatacenter = \"dc1\"\nnamespace = \"default\"\n\n[[sources.eureka]]\nname = \"eureka-prod\"\nurl = \"{}\"\nnamespace = \"default\"\n",
            consul.url(),
            eureka.url()
        ),
    );
    wait_for("both registrations in the registry", WAIT, || {
        (endpoints(&ctl, "web").len() == 2 && endpoints(&ctl, "billing").len() == 1).then_some(())
    });

    // Groups that name the registrations; bad names are refused with the fix.
    let out = ctl.ctl(&[
        "group",
        "create",
        "bad",
        "--namespace",
        "default",
        "--service-account",
        "web",
        "--registry-service",
        "consul-dc1",
    ]);
    assert!(!out.status.success());
    assert!(
        describe(&out).contains("SOURCE/SERVICE"),
        "{}",
        describe(&out)
    );
    let out = ctl.ctl(&[
        "group",
        "create",
        "bad",
        "--namespace",
        "default",
        "--service-account",
        "web",
        "--service",
        "api",
        "--registry-service",
        "consul-dc1/web",
    ]);
    assert!(!out.status.success());
    assert!(
        describe(&out).contains("different services"),
        "{}",
        describe(&out)
    );
    ctl.ctl_ok(&[
        "group",
        "create",
        "web",
        "--namespace",
        "default",
        "--service-account",
        "web",
        "--registry-service",
        "consul-dc1/web",
    ]);
    ctl.ctl_ok(&[
        "group",
        "create",
        "billing",
        "--namespace",
        "default",
        "--service-account",
        "billing",
        "--mtls",
        "strict",
        "--registry-service",
        "eureka-prod/billing",
    ]);
    let groups = ctl.ctl_json(&["group", "list"]);
    assert!(
        groups
            .to_string()
            .contains("\"registry_source\":\"consul-dc1\""),
        "{groups}"
    );

    let s1 = dir.path().join("vm1");
    let s2 = dir.path().join("vm2");
    join_ok(&ctl.token("web", &[]), &s1);
    join_ok(&ctl.token("billing", &[]), &s2);
    let (id1, id2) = (agent_id(&s1), agent_id(&s2));
    let mut a1 = AgentProcess::start_with(&s1, AGENT_CFG, &["--address", "127.0.0.31"]);
    let a2 = AgentProcess::start_with(&s2, AGENT_CFG, &["--address", "127.0.0.41"]);

    // Consul: one endpoint per VM, not two; the bound one has both provenance and identity.
    let (web, ep) = bound_at(&ctl, "web", "127.0.0.31");
    assert_eq!(web.len(), 2, "no duplicate agent endpoint: {web:#?}");
    assert!(web.iter().all(|e| e["source"] == "consul-dc1"), "{web:#?}");
    assert!(ep["native_id"].as_str().unwrap().ends_with("web-1"), "{ep}");
    assert_eq!(ep["identity"], "spiffe://causeway.local/ns/default/sa/web");
    assert_eq!(ep["sources"], serde_json::json!(["consul-dc1", "agents"]));
    assert_eq!(ep["agent"], id1.as_str());
    assert_eq!(ep["ports"]["tcp"], 8080, "the registration's ports: {ep}");
    let other = web.iter().find(|e| e["address"] == "127.0.0.32").unwrap();
    assert!(
        other["identity"].is_null() && other["agent"].is_null(),
        "{other}"
    );
    assert_eq!(other["sources"], serde_json::json!(["consul-dc1"]));

    // Eureka likewise.
    let (billing, ep) = bound_at(&ctl, "billing", "127.0.0.41");
    assert_eq!(billing.len(), 1, "{billing:#?}");
    assert_eq!(ep["source"], "eureka-prod");
    assert_eq!(ep["native_id"], "billing-1");
    assert_eq!(
        ep["identity"],
        "spiffe://causeway.local/ns/default/sa/billing"
    );
    assert_eq!(ep["agent"], id2.as_str());

    // A bound workload is not a second endpoint at the registration's address.
    let conflicts = ctl.ctl_json(&["registry", "conflicts"]);
    assert_eq!(conflicts, serde_json::json!([]), "{conflicts}");

    // Text output shows both sources and the identity.
    let text = ctl.ctl_ok(&["registry", "show", "web"]);
    assert!(
        text.contains("consul-dc1+agents")
            && text.contains("spiffe://causeway.local/ns/default/sa/web"),
        "{text}"
    );

    // Pushed to the agents: the registration's endpoint carries the identity (the data
    // plane tunnels to endpoints with an identity) and the group's strict mode.
    let version = ctl.mesh_version();
    let pushed = wait_for("the bound endpoints pushed to vm1", WAIT, || {
        let st = a1.status();
        (st["config_version"].as_u64() >= Some(version)).then_some(())?;
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(s1.join("config.json")).ok()?).ok()?;
        Some(cfg)
    });
    let services = &pushed["services"];
    let web_eps = services["default/web"]["endpoints"].as_object().unwrap();
    assert_eq!(web_eps.len(), 2, "{web_eps:#?}");
    let bound = web_eps
        .values()
        .find(|e| e["address"] == "127.0.0.31")
        .unwrap();
    assert_eq!(
        bound["identity"],
        "spiffe://causeway.local/ns/default/sa/web"
    );
    assert_eq!(bound["source"], "consul-dc1");
    let billing_eps = services["default/billing"]["endpoints"]
        .as_object()
        .unwrap();
    assert_eq!(billing_eps.len(), 1, "{billing_eps:#?}");
    let (id, b) = billing_eps.iter().next().unwrap();
    assert_eq!(id, "eureka-prod/billing-1");
    assert_eq!(
        b["identity"],
        "spiffe://causeway.local/ns/default/sa/billing"
    );
    assert_eq!(b["mtls_strict"], true);

    // The agent leaves: the registration stays, without the identity (and no ghost).
    a1.stop();
    wait_for("web-1 without its agent", WAIT, || {
        let eps = endpoints(&ctl, "web");
        (eps.len() == 2
            && eps
                .iter()
                .all(|e| e["identity"].is_null() && e["source"] == "consul-dc1"))
        .then_some(())
    });
    drop(a2);
}
