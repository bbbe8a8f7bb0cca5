//! Routing resources (VirtualService, DestinationRule) through `causewayctl apply/get/delete`
//! against the real controller: versions, dry runs, persistence, the push to an agent's
//! cache, validation that names file, document and field and applies nothing, and
//! `registry show` with endpoint labels and locality.
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const AGENT_CFG: &str = "[identity]\nretry_min = \"100ms\"\nretry_max = \"1s\"\n";

const DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: web
  namespace: default
spec:
  host: web
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
";

const VS: &str = "apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: web
  namespace: default
spec:
  hosts: [web.default.svc.cluster.local]
  http:
  - name: canary
    match:
    - headers:
        x-canary: {exact: \"1\"}
    route:
    - destination: {host: web, subset: v2}
  - route:
    - destination: {host: web, subset: v1}
      weight: 90
    - destination: {host: web, subset: v2}
      weight: 10
    timeout: 5s
    retries: {attempts: 2, perTryTimeout: 1s, retryOn: 5xx}
";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn names(v: &Value) -> Vec<String> {
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}/{}/{}",
                i["kind"].as_str().unwrap(),
                i["metadata"]["namespace"].as_str().unwrap(),
                i["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn all_routes(ctl: &Controller) -> Vec<String> {
    let mut out = names(&ctl.ctl_json(&["get", "virtualservices", "-A"]));
    out.extend(names(&ctl.ctl_json(&["get", "dr", "-A"])));
    out
}

#[test]
fn apply_get_delete_survive_a_restart_and_reach_the_agent() {
    let t = tempfile::tempdir().unwrap();
    let mut ctl = Controller::start(&t.path().join("c"), &[]);
    ctl.create_web_group();
    let state = t.path().join("vm1");
    join_ok(&ctl.token("web", &[]), &state);
    let a = AgentProcess::start_with(&state, AGENT_CFG, &["--address", "127.0.0.11"]);
    wait_for("the agent's endpoint in the registry", WAIT, || {
        let list = ctl.ctl_json(&["registry", "list"]);
        list.as_array()?
            .iter()
            .any(|s| s["name"] == "web" && s["endpoints"][0]["identity"].is_string())
            .then_some(())
    });

    let file = write(t.path(), "routes.yaml", &format!("{DR}---\n{VS}"));
    let before = ctl.mesh_version();
    // A dry run reports and changes nothing.
    let out = ctl.ctl_ok(&["apply", "-f", file.to_str().unwrap(), "--dry-run"]);
    assert!(
        out.contains("VirtualService default/web created (dry run)"),
        "{out}"
    );
    assert_eq!(ctl.mesh_version(), before);
    assert!(all_routes(&ctl).is_empty());

    let out = ctl.ctl_ok(&["apply", "-f", file.to_str().unwrap()]);
    assert!(out.contains("DestinationRule default/web created"), "{out}");
    assert!(out.contains("VirtualService default/web created"), "{out}");
    let after = ctl.mesh_version();
    assert_eq!(after, before + 1, "one apply is one mesh version");
    let again = ctl.ctl_ok(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(again.matches("unchanged").count(), 2, "{again}");
    assert_eq!(ctl.mesh_version(), after);

    let expected = vec![
        "VirtualService/default/web".to_owned(),
        "DestinationRule/default/web".to_owned(),
    ];
    assert_eq!(all_routes(&ctl), expected);
    let vs = ctl.ctl_json(&["get", "vs", "web", "-n", "default"]);
    assert_eq!(vs["apiVersion"], "networking.istio.io/v1beta1");
    assert_eq!(vs["spec"]["http"][1]["route"][0]["weight"], 90);
    let text = ctl.ctl_ok(&["get", "dr"]);
    assert!(text.contains("subsets: v1,v2"), "{text}");
    // YAML output re-applies as it is.
    let yaml = ctl.ctl_ok(&["get", "vs", "-A", "--output", "yaml"]);
    let round = write(t.path(), "round.yaml", &yaml);
    let out = ctl.ctl_ok(&["apply", "-f", round.to_str().unwrap()]);
    assert!(
        out.contains("VirtualService default/web unchanged"),
        "{out}"
    );

    // The agent's cache holds them.
    wait_for("the agent's cache holds the routes", WAIT, || {
        let text = std::fs::read_to_string(state.join("config.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        let keys: Vec<String> = v["routes"].as_object()?.keys().cloned().collect();
        (keys
            == [
                "DestinationRule/default/web".to_owned(),
                "VirtualService/default/web".to_owned(),
            ])
        .then_some(())
    });

    ctl.restart();
    assert_eq!(all_routes(&ctl), expected);

    // The rule is still needed by the route: refused, nothing deleted.
    let refused = ctl.ctl(&["delete", "dr", "web", "-n", "default"]);
    assert!(!refused.status.success());
    let msg = describe(&refused);
    assert!(
        msg.contains("VirtualService/default/web: spec.http[0].route[0].destination.subset"),
        "{msg}"
    );
    assert_eq!(all_routes(&ctl), expected);
    // Delete by name, then by file.
    ctl.ctl_ok(&["delete", "vs", "web", "-n", "default"]);
    let missing = ctl.ctl(&["delete", "vs", "web", "-n", "default"]);
    assert!(
        describe(&missing).contains("does not exist"),
        "{}",
        describe(&missing)
    );
    ctl.ctl_ok(&[
        "delete",
        "-f",
        write(t.path(), "dr.yaml", DR).to_str().unwrap(),
    ]);
    assert!(all_routes(&ctl).is_empty());
    wait_for("the agent's cache drops deleted routes", WAIT, || {
        let text = std::fs::read_to_string(state.join("config.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v.get("routes").is_none().then_some(())
    });
    drop(a);
}

#[test]
fn invalid_routes_apply_nothing_and_say_where() {
    let t = tempfile::tempdir().unwrap();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    let v0 = ctl.mesh_version();
    let cases = [
        (
            "regex.yaml",
            VS.replace(
                "headers:\n        x-canary: {exact: \"1\"}",
                "uri: {regex: \"/a(b\"}",
            ),
            "doc 2: spec.http[0].match[0].uri.regex: \"/a(b\" does not compile",
        ),
        (
            "weights.yaml",
            VS.replace("weight: 10", "weight: 30"),
            "doc 2: spec.http[1].route: the weights sum to 120",
        ),
        (
            "timeout.yaml",
            VS.replace("timeout: 5s", "timeout: -1s"),
            "doc 2: spec.http[1].timeout: \"-1s\" is negative",
        ),
        (
            "subset.yaml",
            VS.replace("subset: v2}\n      weight", "subset: v3}\n      weight"),
            "doc 2: spec.http[1].route[1].destination.subset: subset \"v3\" of default/web is not defined by DestinationRule default/web",
        ),
    ];
    for (name, vs, want) in &cases {
        let f = write(t.path(), name, &format!("{DR}---\n{vs}"));
        let out = ctl.ctl(&["apply", "-f", f.to_str().unwrap()]);
        assert!(!out.status.success(), "{name} was accepted");
        let msg = describe(&out);
        assert!(
            msg.contains(&format!("{} {want}", f.display())),
            "{name}: want {want:?} in\n{msg}"
        );
        assert!(msg.contains("nothing applied"), "{name}: {msg}");
    }
    assert!(all_routes(&ctl).is_empty());
    assert_eq!(ctl.mesh_version(), v0);

    // A subset checked against the rules already applied, on the controller.
    ctl.ctl_ok(&[
        "apply",
        "-f",
        write(t.path(), "dr.yaml", DR).to_str().unwrap(),
    ]);
    let f = write(
        t.path(),
        "vs.yaml",
        &VS.replace("subset: v2}\n      weight", "subset: v3}\n      weight"),
    );
    let msg = describe(&ctl.ctl(&["apply", "-f", f.to_str().unwrap()]));
    assert!(
        msg.contains("nothing applied")
            && msg.contains("VirtualService/default/web: spec.http[1].route[1].destination.subset: subset \"v3\" of default/web is not defined by DestinationRule default/web"),
        "{msg}"
    );
    assert_eq!(
        all_routes(&ctl),
        vec!["DestinationRule/default/web".to_owned()]
    );
    // Kinds by every name; an unknown one says which are known.
    for k in [
        "vs",
        "virtualservice",
        "VirtualServices",
        "dr",
        "destinationrules",
    ] {
        ctl.ctl_ok(&["get", k, "-A"]);
    }
    let bad = describe(&ctl.ctl(&["get", "gateways"]));
    assert!(bad.contains("virtualservices (vs)"), "{bad}");
}

#[test]
fn registry_show_has_endpoint_labels_and_locality() {
    let t = tempfile::tempdir().unwrap();
    let services = write(
        t.path(),
        "services.toml",
        "[[services]]\nname = \"shop\"\nports = { http = 8080 }\n[[services.endpoints]]\naddress = \"192.0.2.10\"\nzone = \"eu-west-1/eu-west-1a\"\nlabels = { version = \"v1\" }\n",
    );
    let ctl = Controller::start_with_config(
        &t.path().join("c"),
        &format!(
            "[[sources.file]]\nname = \"ext\"\npath = {:?}\n",
            services.to_str().unwrap()
        ),
    );
    let text = wait_for("the file source's service", WAIT, || {
        let out = ctl.ctl(&["registry", "show", "shop"]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    assert!(
        text.contains("LOCALITY") && text.contains("LABELS"),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.starts_with("192.0.2.10"))
        .unwrap_or_else(|| panic!("no endpoint row in\n{text}"));
    assert!(row.contains("eu-west-1/eu-west-1a"), "{row}");
    assert!(row.contains("version=v1"), "{row}");
}
