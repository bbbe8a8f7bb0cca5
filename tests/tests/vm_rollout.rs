//! VM tier: the Debian packages rolled out with Ansible onto booted systemd VMs
//! (systemd-nspawn, systemd as PID 1) on a private bridge. The harness is
//! `tests/vm/run.sh`; this test packages the binaries it was built with, runs the
//! harness and fails with its output. Root only, like the namespace tier; the base
//! image is built on the first run and cached in /var/cache/causeway-vm.

use std::path::Path;
use std::process::Command;

use causeway_tests::netns::require_root;

#[test]
fn packaged_rollout_on_booted_systemd_vms() {
    require_root("packaged_rollout_on_booted_systemd_vms");
    let agent = causeway_tests::bin("causeway-agent");
    let bin_dir = agent.parent().expect("bin dir");
    for b in ["causeway-controller", "causewayctl"] {
        causeway_tests::bin(b);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/run.sh");
    let status = Command::new("bash")
        .arg(&script)
        // The test build's binaries (`cargo build --workspace --bins`): a release build
        // here would cost minutes of CI (see packaging/deb/README.md for the numbers).
        .env("CAUSEWAY_DEB_PROFILE", "dev")
        .env("CAUSEWAY_DEB_SKIP_CARGO", "1")
        .env("CAUSEWAY_DEB_BIN_DIR", bin_dir)
        .env("VM_ID", format!("cwv{}", std::process::id()))
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        status.success(),
        "{} failed ({status}); its output above names the failed step. Dependencies: scripts/install-deps-vm.sh",
        script.display()
    );
}
