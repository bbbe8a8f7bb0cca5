//! Policy resources end to end: `causewayctl apply/get/delete/why` against the real
//! controller, persistence across restarts and crashes, and the push to agents.
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const AGENT_CFG: &str = "[identity]\nretry_min = \"100ms\"\nretry_max = \"1s\"\n";

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-client
  namespace: default
spec:
  selector:
    matchLabels:
      causeway.io/group: web
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["causeway.local/ns/default/sa/client"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-batch
  namespace: default
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["causeway.local/ns/default/sa/batch"]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: causeway-system
spec:
  mtls:
    mode: STRICT
"#;

const REQUEST_AUTHN: &str = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt
  namespace: default
spec:
  selector:
    matchLabels:
      causeway.io/group: web
  jwtRules:
  - issuer: https://idp.example
    audiences: [web]
    jwksUri: https://idp.example/.well-known/jwks.json
"#;

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

fn all_policies(ctl: &Controller) -> Vec<String> {
    let mut out = names(&ctl.ctl_json(&["get", "ap", "-A"]));
    out.extend(names(&ctl.ctl_json(&["get", "pa", "-A"])));
    out.extend(names(&ctl.ctl_json(&["get", "ra", "-A"])));
    out
}

/// Waits until `service` has an endpoint run by an agent in the registry.
fn wait_for_endpoint(ctl: &Controller, service: &str) {
    wait_for("the agent's endpoint in the registry", WAIT, || {
        let list = ctl.ctl_json(&["registry", "list"]);
        list.as_array()?
            .iter()
            .any(|s| s["name"] == service && s["endpoints"][0]["identity"].is_string())
            .then_some(())
    });
}

fn group(ctl: &Controller, name: &str, sa: &str, port: &str) {
    ctl.ctl_ok(&[
        "group",
        "create",
        name,
        "--namespace",
        "default",
        "--service-account",
        sa,
        "--service",
        name,
        "--port",
        port,
    ]);
}

#[test]
fn apply_get_delete_survive_a_restart_and_push_to_agents() {
    let t = tempfile::tempdir().unwrap();
    let mut ctl = Controller::start(&t.path().join("c"), &[]);
    ctl.create_web_group();
    let state = t.path().join("vm1");
    join_ok(&ctl.token("web", &[]), &state);
    let a = AgentProcess::start_with(&state, AGENT_CFG, &["--address", "127.0.0.11"]);
    wait_for_endpoint(&ctl, "web");

    let file = write(
        t.path(),
        "policy.yaml",
        &format!("{POLICIES}---{REQUEST_AUTHN}"),
    );
    let before = ctl.mesh_version();
    let out = ctl.ctl_ok(&["apply", "-f", file.to_str().unwrap()]);
    assert!(
        out.contains("AuthorizationPolicy default/allow-client created"),
        "{out}"
    );
    assert!(
        out.contains("RequestAuthentication default/jwt created"),
        "{out}"
    );
    assert!(
        out.contains("PeerAuthentication causeway-system/default created"),
        "{out}"
    );
    let after = ctl.mesh_version();
    assert_eq!(after, before + 1, "one apply is one mesh version");
    // Applying the same file again changes nothing.
    let again = ctl.ctl_ok(&["apply", "-f", file.to_str().unwrap()]);
    assert!(again.contains("allow-client unchanged"), "{again}");
    assert_eq!(ctl.mesh_version(), after);

    let expected = vec![
        "AuthorizationPolicy/default/allow-client".to_owned(),
        "AuthorizationPolicy/default/deny-batch".to_owned(),
        "PeerAuthentication/causeway-system/default".to_owned(),
        "RequestAuthentication/default/jwt".to_owned(),
    ];
    assert_eq!(all_policies(&ctl), expected);
    let ra = ctl.ctl_json(&["get", "ra", "jwt", "-n", "default"]);
    assert_eq!(ra["spec"]["jwtRules"][0]["issuer"], "https://idp.example");
    // One by name, in Istio's shape; YAML output re-applies as it is.
    let one = ctl.ctl_json(&["get", "ap", "allow-client", "-n", "default"]);
    assert_eq!(one["kind"], "AuthorizationPolicy");
    assert_eq!(
        one["spec"]["rules"][0]["from"][0]["source"]["principals"][0],
        "causeway.local/ns/default/sa/client"
    );
    let yaml = ctl.ctl_ok(&["get", "ap", "-A", "--output", "yaml"]);
    let round = write(t.path(), "round.yaml", &yaml);
    let out = ctl.ctl_ok(&["apply", "-f", round.to_str().unwrap()]);
    assert!(out.matches("unchanged").count() == 2, "{out}");
    let missing = ctl.ctl(&["get", "ap", "nope"]);
    assert!(!missing.status.success());
    assert!(
        describe(&missing).contains("not found"),
        "{}",
        describe(&missing)
    );

    // The agent receives the policies with the version (its cache holds them).
    wait_for("the agent's cache holds the policies", WAIT, || {
        let text = std::fs::read_to_string(state.join("config.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        let keys: Vec<String> = v["policies"].as_object()?.keys().cloned().collect();
        (keys == expected).then_some(())
    });

    // A crash and a restart keep them.
    ctl.restart();
    assert_eq!(all_policies(&ctl), expected);

    // Delete by name and by file.
    ctl.ctl_ok(&["delete", "ap", "deny-batch", "-n", "default"]);
    assert_eq!(all_policies(&ctl).len(), 3);
    let gone = ctl.ctl(&["delete", "ap", "deny-batch", "-n", "default"]);
    assert!(!gone.status.success());
    assert!(
        describe(&gone).contains("does not exist"),
        "{}",
        describe(&gone)
    );
    let only_first = write(
        t.path(),
        "first.yaml",
        POLICIES.split("---").next().unwrap(),
    );
    ctl.ctl_ok(&["delete", "-f", only_first.to_str().unwrap()]);
    assert_eq!(
        all_policies(&ctl),
        vec![
            "PeerAuthentication/causeway-system/default".to_owned(),
            "RequestAuthentication/default/jwt".to_owned()
        ]
    );
    ctl.ctl_ok(&["delete", "ra", "jwt", "-n", "default"]);
    wait_for("the agent's cache drops deleted policies", WAIT, || {
        let text = std::fs::read_to_string(state.join("config.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        (v["policies"].as_object()?.len() == 1).then_some(())
    });
    drop(a);
}

/// A mesh-sized policy file (1,000 AuthorizationPolicies, about 0.5 MiB: over the admin
/// API's general 64 KiB body limit) is applied, listed and deleted in one call each.
#[test]
fn a_file_of_a_thousand_policies_applies_and_deletes_in_one_call() {
    let t = tempfile::tempdir().unwrap();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    let yaml: String = (0..1_000)
        .map(|i| {
            format!(
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p-{i}, namespace: team-{}}}\nspec:\n  selector:\n    matchLabels: {{app: app-{i}}}\n  rules:\n  - from:\n    - source: {{principals: [\"causeway.local/ns/team-{i}/sa/client-{i}\", \"causeway.local/ns/team-{i}/sa/batch*\"]}}\n    - source: {{namespaces: [\"ns-{i}\"]}}\n    to:\n    - operation: {{ports: [\"8080\", \"9090\"]}}\n  - from:\n    - source: {{ipBlocks: [\"172.{}.0.0/16\"]}}\n",
                i % 100,
                16 + i % 16
            )
        })
        .collect();
    assert!(yaml.len() > 256 * 1024, "{} bytes", yaml.len());
    let f = write(t.path(), "mesh.yaml", &yaml);
    let v0 = ctl.mesh_version();
    let out = ctl.ctl_ok(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(out.matches("created").count(), 1_000, "{out}");
    assert_eq!(ctl.mesh_version(), v0 + 1, "one version for the whole file");
    assert_eq!(all_policies(&ctl).len(), 1_000);
    ctl.ctl_ok(&["delete", "-f", f.to_str().unwrap()]);
    assert_eq!(all_policies(&ctl), Vec::<String>::new());
}

#[test]
fn invalid_files_apply_nothing_and_say_where() {
    let t = tempfile::tempdir().unwrap();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    let v0 = ctl.mesh_version();
    let bad_cidr = format!(
        "{POLICIES}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bad, namespace: default}}\nspec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/8\", \"10.0.0/8\"]\n"
    );
    let cases = [
        (
            "cidr.yaml",
            bad_cidr.as_str(),
            "doc 4: spec.rules[0].from[0].source.ipBlocks[1]: \"10.0.0/8\" is not a CIDR",
        ),
        (
            "field.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec:\n  rule: []\n",
            "doc 1: spec.rule: unknown field `rule`",
        ),
        (
            "kind.yaml",
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: x}\n",
            "unknown kind \"Gateway\"",
        ),
        ("yaml.yaml", "apiVersion: [\n", "not valid YAML"),
        (
            "port.yaml",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\nspec:\n  portLevelMtls:\n    8080: {mode: DISABLE}\n",
            "portLevelMtls needs a workload selector",
        ),
        (
            "custom.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {action: CUSTOM, provider: {name: ext}}\n",
            "CUSTOM",
        ),
    ];
    for (name, text, want) in cases {
        let f = write(t.path(), name, text);
        let out = ctl.ctl(&["apply", "-f", f.to_str().unwrap()]);
        assert!(!out.status.success(), "{name} was accepted");
        let msg = describe(&out);
        assert!(msg.contains(want), "{name}: want {want:?} in\n{msg}");
        assert!(msg.contains("nothing applied"), "{name}: {msg}");
    }
    // Dry run validates and writes nothing.
    let good = write(t.path(), "good.yaml", POLICIES);
    let out = ctl.ctl_ok(&["apply", "-f", good.to_str().unwrap(), "--dry-run"]);
    assert!(out.contains("created (dry run)"), "{out}");
    assert_eq!(all_policies(&ctl), Vec::<String>::new());
    assert_eq!(ctl.mesh_version(), v0);
    // The server validates too: a client that skips validation gets the same answer.
    let body = serde_json::json!({"resources": [{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "raw"}, "spec": {"rules": [{"from": []}]}}]});
    let credential = std::fs::read_to_string(ctl.data_dir.join("admin.token")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, text) = rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/policies/apply", ctl.admin))
            .bearer_auth(credential.trim())
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("`from` must not be empty"), "{text}");
    assert_eq!(all_policies(&ctl), Vec::<String>::new());
}

#[test]
fn a_crash_during_apply_leaves_all_or_nothing() {
    let t = tempfile::tempdir().unwrap();
    let mut ctl = Controller::start(&t.path().join("c"), &[]);
    let many: String = (0..300)
        .map(|i| format!("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: ns{}}}\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {{ports: [\"{}\"]}}\n", i % 7, 10000 + i))
        .collect();
    let file = write(t.path(), "many.yaml", &many);
    for round in 0..4u64 {
        let child = std::process::Command::new(bin("causewayctl"))
            .args(["apply", "-f", file.to_str().unwrap()])
            .env("CAUSEWAY_CONTROLLER", &ctl.admin)
            .env(
                "CAUSEWAY_ADMIN_TOKEN_FILE",
                ctl.data_dir.join("admin.token"),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill the controller at a different moment of the apply each round.
        std::thread::sleep(Duration::from_millis(20 + round * 40));
        ctl.restart();
        let mut child = child;
        let _ = child.wait();
        let n = names(&ctl.ctl_json(&["get", "ap", "-A"])).len();
        assert!(
            n == 0 || n == 300,
            "round {round}: {n} of 300 policies after a crash mid-apply"
        );
        if n == 300 {
            ctl.ctl_ok(&["delete", "-f", file.to_str().unwrap()]);
        }
    }
}

#[test]
fn why_names_the_deciding_policy() {
    let t = tempfile::tempdir().unwrap();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    ctl.create_web_group();
    group(&ctl, "client", "client", "tcp-c:9000");
    group(&ctl, "batch", "batch", "tcp-b:9001");
    group(&ctl, "other", "other", "tcp-o:9002");
    let state = t.path().join("web");
    join_ok(&ctl.token("web", &[]), &state);
    let _a = AgentProcess::start_with(&state, AGENT_CFG, &["--address", "127.0.0.21"]);
    wait_for_endpoint(&ctl, "web");
    let why = |from: &str, to: &str| ctl.ctl_json(&["why", "--from", from, "--to", to]);

    // No policy: allowed, and it says so.
    let v = why("client", "web:8080");
    assert_eq!(v["decision"], "allow", "{v}");
    assert_eq!(v["policy"], Value::Null);

    let file = write(t.path(), "p.yaml", POLICIES);
    ctl.ctl_ok(&["apply", "-f", file.to_str().unwrap()]);

    let v = why("client", "web:8080");
    assert_eq!(v["decision"], "allow", "{v}");
    assert_eq!(v["policy"], "default/allow-client");
    let v = why("batch", "web.default:8080");
    assert_eq!(v["decision"], "deny", "{v}");
    assert_eq!(v["policy"], "default/deny-batch");
    let v = why("other", "web.default.causeway:8080");
    assert_eq!(v["decision"], "deny", "{v}");
    assert_eq!(
        v["policy"],
        Value::Null,
        "denied because no ALLOW matched: {v}"
    );
    let steps = v["steps"].as_array().unwrap();
    assert!(
        steps.iter().any(|s| s["step"] == "policy"
            && s["policy"] == "default/allow-client"
            && s["matched"] == false
            && s["detail"]
                .as_str()
                .unwrap()
                .contains("principals did not match")),
        "{v}"
    );
    // Plaintext from a host without an agent, under the mesh-wide STRICT policy.
    let v = why("192.0.2.9", "web:8080");
    assert_eq!(v["decision"], "deny", "{v}");
    assert_eq!(v["policy"], "causeway-system/default");
    // The text form ends with the decision.
    let text = ctl.ctl_ok(&["why", "--from", "batch", "--to", "web:8080"]);
    assert!(
        text.trim_end().ends_with("=> DENY by default/deny-batch"),
        "{text}"
    );
    // Clear errors for unknown names.
    let out = ctl.ctl(&["why", "--from", "nobody", "--to", "web:8080"]);
    assert!(
        describe(&out).contains("is not a group, an agent id or an IP address"),
        "{}",
        describe(&out)
    );
    let out = ctl.ctl(&["why", "--from", "client", "--to", "nothing:80"]);
    assert!(
        describe(&out).contains("no service nothing"),
        "{}",
        describe(&out)
    );
}

#[test]
fn group_mtls_flag_writes_the_equivalent_peer_authentication() {
    let t = tempfile::tempdir().unwrap();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    // Without --mtls nothing is written: namespace and mesh policies apply.
    ctl.create_web_group();
    assert_eq!(all_policies(&ctl), Vec::<String>::new());
    ctl.ctl_ok(&[
        "group",
        "create",
        "secure",
        "--namespace",
        "shop",
        "--service-account",
        "secure",
        "--mtls",
        "strict",
    ]);
    assert_eq!(
        all_policies(&ctl),
        vec!["PeerAuthentication/shop/group-secure".to_owned()]
    );
    let pa = ctl.ctl_json(&["get", "pa", "group-secure", "-n", "shop"]);
    assert_eq!(pa["spec"]["mtls"]["mode"], "STRICT");
    assert_eq!(
        pa["spec"]["selector"]["matchLabels"]["causeway.io/group"],
        "secure"
    );
    ctl.ctl_ok(&["group", "delete", "secure"]);
    assert_eq!(all_policies(&ctl), Vec::<String>::new());
}
