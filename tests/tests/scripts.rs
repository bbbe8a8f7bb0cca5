//! The shell scripts a newcomer runs first: the demo's preflight and the test summary of
//! `scripts/test.sh`. No root needed; nothing is installed (`CAUSEWAY_NO_INSTALL=1`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_owned()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A folder of links to every program on this PATH (first one wins) except `hidden`.
fn path_without(hidden: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = std::env::var_os("PATH").expect("PATH");
    for d in std::env::split_paths(&path) {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let link = dir.path().join(&name);
            if name == hidden || link.exists() {
                continue;
            }
            let _ = std::os::unix::fs::symlink(e.path(), &link);
        }
    }
    dir
}

fn preflight(path: &std::ffi::OsStr) -> Output {
    Command::new(repo().join("scripts/demo.sh"))
        .arg("--preflight")
        .env("PATH", path)
        .env("CAUSEWAY_NO_INSTALL", "1")
        .output()
        .expect("run scripts/demo.sh --preflight")
}

/// Without `nft` (and with installing turned off) the demo stops before building, naming
/// the program and its package; the old demo exited 2 halfway with no message.
#[test]
fn demo_preflight_names_a_missing_nft() {
    let bin = path_without("nft");
    assert!(!bin.path().join("nft").exists());
    let out = preflight(bin.path().as_os_str());
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("error: nft not found on PATH (Debian package nftables)"),
        "{t}"
    );
    assert!(t.contains("fix: apt-get install nftables"), "{t}");
    assert!(t.contains("two-VM part"), "{t}");
}

/// The same preflight passes when every tool is there (the test tools include nft).
#[test]
fn demo_preflight_passes_with_every_tool() {
    let out = preflight(&std::env::var_os("PATH").expect("PATH"));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("everything the demo needs is present"), "{t}");
}

fn summary(log: &str) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("cargo-test.log");
    std::fs::write(&file, log).expect("write log");
    Command::new("bash")
        .arg(repo().join("scripts/test-summary.sh"))
        .arg(&file)
        .output()
        .expect("run scripts/test-summary.sh")
}

const FAILING: &str = "\
     Running unittests src/lib.rs (target/debug/deps/causeway_registry-1234)

running 3 tests
test consul::tests::a ... ok
test eureka::tests::b ... FAILED
test eureka::tests::c ... ignored

failures:

---- eureka::tests::b stdout ----
cannot read fixture

failures:
    eureka::tests::b

test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s

error: test failed, to rerun pass `-p causeway-registry --lib`
     Running tests/dns.rs (target/debug/deps/dns-abcd)

running 2 tests
     Running tests/ok.rs (target/debug/deps/ok-abcd)

running 2 tests
test x ... ok
test y ... ok

test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

   Doc-tests causeway_api

running 1 test
test api/src/lib.rs - x (line 3) ... ok

test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

error: 2 targets failed:
    `-p causeway-registry --lib`
    `-p causeway-tests --test dns`
";

/// One closing line over all test binaries, the failed tests named above it (with their
/// binary), a binary that crashed before its result counted, and a failing exit status.
#[test]
fn the_test_summary_counts_every_binary_and_names_the_failures() {
    let out = summary(FAILING);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(
        stdout.lines().last(),
        Some("4 passed, 2 failed, 1 ignored"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  eureka::tests::b (unittests src/lib.rs"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  tests/dns.rs (target/debug/deps/dns-abcd) (no result"),
        "{stdout}"
    );
}

#[test]
fn the_test_summary_of_a_clean_run_passes() {
    let start = FAILING
        .find("     Running tests/ok.rs")
        .expect("ok.rs part");
    let end = FAILING.find("error: 2 targets").expect("end");
    let clean = &FAILING[start..end];
    let out = summary(clean);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(stdout.trim(), "3 passed, 0 failed, 0 ignored", "{stdout}");
}
