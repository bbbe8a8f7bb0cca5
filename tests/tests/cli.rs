//! What a newcomer sees from the three binaries: errors printed once with each cause once,
//! value errors naming the value and the accepted form, `causewayctl` telling "not
//! running" from "wrong protocol", the default config files, completions and man pages.

use std::path::Path;
use std::process::{Command, Output};

use causeway_tests::{Controller, bin, describe};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn run(program: &str, args: &[&str], envs: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(bin(program));
    cmd.args(args).env_remove("CAUSEWAY_CONFIG");
    cmd.env_remove("CAUSEWAY_AGENT_CONFIG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run the binary")
}

/// The controller printed its fatal error twice (an ERROR log line, then `error:`), and a
/// missing file's cause twice inside it.
#[test]
fn the_controller_prints_a_fatal_error_once_with_each_cause_once() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("missing.toml");
    let out = run(
        "causeway-controller",
        &[
            "--config",
            missing.to_str().unwrap(),
            "--data-dir",
            t.path().join("data").to_str().unwrap(),
        ],
        &[],
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "{}", describe(&out));
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert!(!err.contains("ERROR"), "{err}");
    assert_eq!(err.matches(missing.to_str().unwrap()).count(), 2, "{err}"); // INFO line + error
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn the_agent_prints_a_fatal_error_once_with_each_cause_once() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("missing.toml");
    let out = run(
        "causeway-agent",
        &["run", "--config", missing.to_str().unwrap()],
        &[],
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "{}", describe(&out));
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

/// `vip_range = "…/33"` said only "invalid IP address syntax".
#[test]
fn a_bad_vip_range_names_the_value_and_the_accepted_form() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("controller.toml");
    std::fs::write(&cfg, "[mesh]\nvip_range = \"10.0.0.0/33\"\n").unwrap();
    let out = run(
        "causeway-controller",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            t.path().join("data").to_str().unwrap(),
        ],
        &[],
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(err.contains("\"10.0.0.0/33\" is not valid here"), "{err}");
    assert!(
        err.contains("ADDRESS/PREFIX with a prefix length from 0 to 32"),
        "{err}"
    );
    assert!(err.contains("vip_range"), "{err}");
}

/// `doctor` on a state dir with no identity said "capture rules: as expected".
#[test]
fn doctor_without_an_identity_fails_and_says_so() {
    let out = run(
        "causeway-agent",
        &["doctor", "--state-dir", "/nonexistent/causeway"],
        &[],
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        err.contains("no identity in /nonexistent/causeway: join first"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("as expected"));
}

fn ctl_at(url: &str, token: &Path) -> Output {
    Command::new(bin("causewayctl"))
        .args(["group", "list"])
        .env("CAUSEWAY_CONTROLLER", url)
        .env("CAUSEWAY_ADMIN_TOKEN_FILE", token)
        .output()
        .expect("run causewayctl")
}

/// "Not running" and "running, but https:// against a plain HTTP admin API" were one
/// message ("is causeway-controller running?").
#[test]
fn causewayctl_tells_an_absent_controller_from_a_tls_mismatch() {
    let t = tempfile::tempdir().unwrap();
    let ctl = Controller::start(&t.path().join("c"), &[]);
    let token = ctl.data_dir.join("admin.token");
    // A port nothing listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = ctl_at(&format!("http://127.0.0.1:{port}"), &token);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("cannot reach the controller"), "{err}");
    assert!(err.contains("Connection refused"), "{err}");
    assert!(!err.contains("reachable, but"), "{err}");

    let https = ctl.admin.replacen("http:", "https:", 1);
    let out = ctl_at(&https, &token);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("is reachable, but the TLS handshake failed"),
        "{err}"
    );
    assert!(err.contains(&format!("use {}", ctl.admin)), "{err}");
    assert!(!err.contains("cannot reach"), "{err}");
}

/// The agent reads $CAUSEWAY_CONFIG_DIR/agent.toml (normally /etc/causeway) without
/// --config, and --config overrides it; the same for the controller.
#[test]
fn the_default_config_files_are_read_and_config_overrides_them() {
    let t = tempfile::tempdir().unwrap();
    let etc = t.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    // Invalid on purpose: the error proves which file was read, without starting anything.
    std::fs::write(etc.join("agent.toml"), "from_the_default_file = 1\n").unwrap();
    std::fs::write(etc.join("controller.toml"), "from_the_default_file = 1\n").unwrap();
    let other = t.path().join("other.toml");
    std::fs::write(&other, "from_the_given_file = 1\n").unwrap();
    let envs: &[(&str, &Path)] = &[("CAUSEWAY_CONFIG_DIR", &etc)];
    let data = t.path().join("data");

    let out = run("causeway-agent", &["run"], envs);
    let err = stderr(&out);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        err.contains(&format!("{}", etc.join("agent.toml").display()))
            && err.contains("from_the_default_file"),
        "{err}"
    );
    let out = run(
        "causeway-agent",
        &["run", "--config", other.to_str().unwrap()],
        envs,
    );
    let err = stderr(&out);
    assert!(err.contains("from_the_given_file"), "{err}");
    assert!(!err.contains("from_the_default_file"), "{err}");

    let out = run(
        "causeway-controller",
        &["--data-dir", data.to_str().unwrap()],
        envs,
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        err.contains(&format!("{}", etc.join("controller.toml").display()))
            && err.contains("from_the_default_file"),
        "{err}"
    );
    let out = run(
        "causeway-controller",
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--config",
            other.to_str().unwrap(),
        ],
        envs,
    );
    let err = stderr(&out);
    assert!(err.contains("from_the_given_file"), "{err}");
    assert!(!err.contains("from_the_default_file"), "{err}");
}

/// Completions for all three binaries, and no panic when the reader closes the pipe early
/// (`causewayctl completions bash | head -3` panicked on the broken pipe).
#[test]
fn completions_for_every_binary_survive_a_closed_pipe() {
    for b in ["causewayctl", "causeway-agent", "causeway-controller"] {
        let out = run(b, &["completions", "bash"], &[]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{b}: {}", describe(&out));
        assert!(text.contains("complete -F"), "{b}: {text}");
        let out = run(b, &["completions", "zsh"], &[]);
        assert!(out.status.success(), "{b} zsh: {}", describe(&out));

        // The reader is gone before the first write (as after `| head -3` once head has
        // its lines): every write fails with EPIPE; the binary must exit quietly.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(bin(b))
            .args(["completions", "bash"])
            .stdout(writer)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(out.status.success(), "{b}: {}", describe(&out));
        assert!(!err.contains("panicked"), "{b}: {err}");
    }
}

/// A man page from each binary's own CLI definition (clap_mangen), with its options.
#[test]
fn every_binary_renders_its_man_page() {
    for (b, section, option) in [
        ("causewayctl", "1", "controller"),
        ("causeway-agent", "8", "doctor"),
        ("causeway-controller", "8", "data\\-dir"),
    ] {
        let out = run(b, &["man"], &[]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{b}: {}", describe(&out));
        assert!(text.contains(&format!(".TH {b} {section}")), "{b}: {text}");
        assert!(text.contains(option), "{b}: {text}");
    }
}

/// `group create --help` listed its required options among the global ones; the global
/// ones now come after, under their own heading.
#[test]
fn group_create_help_shows_its_required_options_first() {
    let out = run("causewayctl", &["group", "create", "--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", describe(&out));
    let at = |s: &str| {
        help.find(s)
            .unwrap_or_else(|| panic!("{s} not in:\n{help}"))
    };
    let global = at("Global options:");
    assert!(at("--namespace <NAMESPACE>") < global, "{help}");
    assert!(at("--service-account <SERVICE_ACCOUNT>") < global, "{help}");
    assert!(
        at("--namespace <NAMESPACE>") < at("--service <SERVICE>"),
        "{help}"
    );
    for g in [
        "--controller",
        "--admin-token-file",
        "--ca-file",
        "--output",
    ] {
        assert!(
            at(g) > global,
            "{g} should be under Global options:\n{help}"
        );
    }
}

/// Answers every HTTP request on a loopback port with `body` (JSON, status 200), as a
/// controller of another version would; returns the base URL.
fn answering(body: &'static str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        use std::io::{BufRead as _, BufReader, Write as _};
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            // The request head; the commands used here send no body.
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

/// `causewayctl` read answers by string keys, so a field the controller renamed printed
/// "-" and exited 0. Now an answer without a field it needs is an error naming the field.
#[test]
fn a_renamed_field_in_an_answer_is_an_error_naming_it() {
    let t = tempfile::tempdir().unwrap();
    let token = t.path().join("admin.token");
    std::fs::write(&token, "x\n").unwrap();
    // `vip` renamed to `virtual_ip` (an Option: a missing one must not read as "none").
    let url = answering(
        r#"[{"namespace":"default","name":"web","virtual_ip":"240.240.0.1","sources":["file"],"endpoints":[]}]"#,
    );
    for output in ["text", "json"] {
        let out = Command::new(bin("causewayctl"))
            .args(["registry", "list", "--output", output])
            .env("CAUSEWAY_CONTROLLER", &url)
            .env("CAUSEWAY_ADMIN_TOKEN_FILE", &token)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(!out.status.success(), "{}", describe(&out));
        assert!(
            err.contains("GET /v1/registry does not match this causewayctl"),
            "{err}"
        );
        assert!(err.contains("[0]") && err.contains("`vip`"), "{err}");
        assert!(out.stdout.is_empty(), "nothing printed: {}", describe(&out));
    }
    // The same answer with the field under its name is printed.
    let url = answering(
        r#"[{"namespace":"default","name":"web","vip":"240.240.0.1","sources":["file"],"endpoints":[]}]"#,
    );
    let out = Command::new(bin("causewayctl"))
        .args(["registry", "list"])
        .env("CAUSEWAY_CONTROLLER", &url)
        .env("CAUSEWAY_ADMIN_TOKEN_FILE", &token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("240.240.0.1"),
        "{}",
        describe(&out)
    );
}
