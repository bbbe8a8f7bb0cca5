//! The configuration files that ship (the packages' conffiles and the Ansible role
//! templates rendered with the roles' defaults) parse and validate with the real
//! parsers of the agent and the controller; the units name the files they need.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn packaged_conffiles_parse_and_validate() {
    let agent = repo().join("packaging/deb/agent/agent.toml");
    let cfg = causeway_agent::config::AgentConfig::load(&agent)
        .unwrap_or_else(|e| panic!("{}: {e}", agent.display()));
    cfg.validate()
        .unwrap_or_else(|e| panic!("{}: {e}", agent.display()));
    assert_eq!(cfg.state_dir, Path::new("/var/lib/causeway"));
    assert_eq!(cfg.health.listen.port(), 15020);

    let ctl = repo().join("packaging/deb/controller/controller.toml");
    let cfg = causeway_controller::config::Config::load(&ctl)
        .unwrap_or_else(|e| panic!("{}: {e}", ctl.display()));
    cfg.validate()
        .unwrap_or_else(|e| panic!("{}: {e}", ctl.display()));
    assert_eq!(cfg.data_dir, Path::new("/var/lib/causeway/controller"));
}

#[test]
fn units_match_the_packaged_paths() {
    let unit =
        std::fs::read_to_string(repo().join("packaging/deb/agent/causeway-agent.service")).unwrap();
    for needle in [
        "Type=notify",
        "ExecStart=/usr/bin/causeway-agent run --config /etc/causeway/agent.toml",
        "ExecStopPost=/usr/bin/causeway-agent cleanup --state-dir /var/lib/causeway",
        "ConditionPathExists=/var/lib/causeway/agent.json",
        "User=causeway",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
    ] {
        assert!(
            unit.contains(needle),
            "causeway-agent.service lacks {needle:?}"
        );
    }
    let unit = std::fs::read_to_string(
        repo().join("packaging/deb/controller/causeway-controller.service"),
    )
    .unwrap();
    assert!(
        unit.contains(
            "ExecStart=/usr/bin/causeway-controller --config /etc/causeway/controller.toml"
        )
    );
}

/// Renders a role template with the role's defaults (and `extra` variables) through
/// Jinja2, as Ansible does.
fn render(role: &str, template: &str, extra: &str) -> String {
    let script = r#"
import sys, yaml, jinja2
role, template, extra = sys.argv[1], sys.argv[2], sys.argv[3]
v = yaml.safe_load(open(role + "/defaults/main.yml")) or {}
v.update(yaml.safe_load(extra) or {})
v["ansible_managed"] = "Ansible managed"
env = jinja2.Environment(undefined=jinja2.StrictUndefined)
env.filters["bool"] = lambda x: x if isinstance(x, bool) else str(x).lower() in ("1", "true", "yes", "on")
print(env.from_string(open(role + "/templates/" + template).read()).render(v))
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(repo().join("ansible/roles").join(role))
        .args([template, extra])
        .output()
        .expect("python3 (with python3-jinja2 and python3-yaml, installed with ansible by scripts/install-deps-vm.sh)");
    assert!(
        out.status.success(),
        "rendering {role}/{template} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn ansible_templates_render_to_valid_configs() {
    let dir = tempfile::tempdir().unwrap();
    for extra in [
        "{causeway_agent_address: 10.0.0.7}",
        "{causeway_agent_address: 10.0.0.7, causeway_agent_controller: '10.0.0.5:15012', causeway_agent_zone: z1, causeway_agent_capture: false, causeway_agent_inbound_mode: strict}",
        "{causeway_agent_address: 10.0.0.7, causeway_agent_controllers: ['10.0.0.5:15012', 'controllers.mesh.internal:15012']}",
    ] {
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, render("causeway_agent", "agent.toml.j2", extra)).unwrap();
        let cfg = causeway_agent::config::AgentConfig::load(&p)
            .unwrap_or_else(|e| panic!("agent.toml.j2 with {extra}: {e}"));
        cfg.validate().unwrap();
        assert_eq!(cfg.address, Some("10.0.0.7".parse().unwrap()));
    }
    let p = dir.path().join("controller.toml");
    std::fs::write(
        &p,
        render(
            "causeway_controller",
            "controller.toml.j2",
            "{causeway_controller_advertise: '10.0.0.5:15012'}",
        ),
    )
    .unwrap();
    let cfg = causeway_controller::config::Config::load(&p).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.control.advertise.as_deref(), Some("10.0.0.5:15012"));
}
