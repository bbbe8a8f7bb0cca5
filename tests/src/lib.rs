//! Support for Causeway's end-to-end tests: start the real binaries on `127.0.0.1:0`,
//! drive them through `causewayctl`, and read what they wrote.
//!
//! The binaries must be built first (`cargo build --workspace --bins`); [`bin`] finds
//! them next to the test executable, or in `$CAUSEWAY_BIN_DIR`.

#![allow(
    clippy::disallowed_methods,
    reason = "blocking test support code: sleeping while polling is intended"
)]

pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Path of a workspace binary.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("CAUSEWAY_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("test executable path");
            // target/debug/deps/<test> → target/debug
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .to_owned()
        });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first with `cargo build --workspace --bins` (or set CAUSEWAY_BIN_DIR)",
        path.display()
    );
    path
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A loopback port, free for both UDP and TCP now, outside the kernel's ephemeral range.
///
/// For a server that a test restarts on the same port: a port the kernel hands out for
/// `:0` binds can be taken by any socket in the meantime (an agent's QUIC endpoint took
/// a stopped controller's control port once in CI), a port below the range only by
/// another test choosing it explicitly, which this function avoids within a process and
/// makes unlikely across processes (each starts at a different place).
pub fn unshared_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000; // 20000..32000, below the default range 32768..60999
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    assert!(
        ephemeral_low >= LOW + SPAN,
        "net.ipv4.ip_local_port_range starts at {ephemeral_low}, inside the test port range {LOW}..{}",
        LOW + SPAN
    );
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let seed = (std::process::id().wrapping_mul(7_919)) % SPAN;
    let _ = NEXT.compare_exchange(u32::MAX, seed, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + n % SPAN).expect("below 32000");
        let free = std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN);
}

/// Text of a command's output, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Sends SIGTERM to a child.
pub fn terminate(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY-free: libc::kill through a safe wrapper is not available; use the kill command.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
    }
}

/// A controller process on ephemeral ports with its own data directory.
pub struct Controller {
    /// The data directory.
    pub data_dir: PathBuf,
    child: Option<Child>,
    /// Admin API base URL.
    pub admin: String,
    /// Control endpoint address.
    pub control: String,
    /// Metrics endpoint base URL (`http://127.0.0.1:PORT`, a free port per controller).
    pub metrics: String,
    /// CA fingerprint (hex).
    pub fingerprint: String,
    extra: Vec<String>,
    /// A command the controller is started through (e.g. `prlimit --nofile=1024 --`).
    prefix: Vec<String>,
}

impl Controller {
    /// Starts a controller in `data_dir` with extra arguments.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Self {
        let mut c = Self {
            data_dir: data_dir.to_owned(),
            child: None,
            admin: String::new(),
            control: String::new(),
            metrics: String::new(),
            fingerprint: String::new(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            prefix: Vec::new(),
        };
        c.spawn(None);
        c
    }

    /// Starts with a config file written from `toml`, with the open-files limit (soft
    /// and hard) at `nofile` from its first instruction on (through `prlimit`).
    pub fn start_with_fd_limit(data_dir: &Path, toml: &str, nofile: u32) -> Self {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let cfg = data_dir.with_extension("toml");
        std::fs::write(&cfg, toml).expect("write config");
        let mut c = Self {
            data_dir: data_dir.to_owned(),
            child: None,
            admin: String::new(),
            control: String::new(),
            metrics: String::new(),
            fingerprint: String::new(),
            extra: vec!["--config".into(), cfg.to_str().expect("utf-8 path").into()],
            prefix: vec![
                "prlimit".into(),
                format!("--nofile={nofile}:{nofile}"),
                "--".into(),
            ],
        };
        c.spawn(None);
        c
    }

    /// The controller's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts with a config file written from `toml` (data dir and ports from the harness).
    pub fn start_with_config(data_dir: &Path, toml: &str) -> Self {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let cfg = data_dir.with_extension("toml");
        std::fs::write(&cfg, toml).expect("write config");
        Self::start(data_dir, &["--config", cfg.to_str().expect("utf-8 path")])
    }

    /// A controller the test runs itself (`causeway_controller::app::start`), reached at
    /// these addresses; there is no process to kill or restart.
    pub fn attached(
        data_dir: &Path,
        admin: &str,
        control: &str,
        metrics: &str,
        fingerprint: &str,
    ) -> Self {
        Self {
            data_dir: data_dir.to_owned(),
            child: None,
            admin: admin.to_owned(),
            control: control.to_owned(),
            metrics: metrics.to_owned(),
            fingerprint: fingerprint.to_owned(),
            extra: Vec::new(),
            prefix: Vec::new(),
        }
    }

    /// Starts with a config file written from `toml`, the control endpoint on
    /// `control_listen` (e.g. all interfaces) and tokens pointing at `advertise`.
    pub fn start_listening(
        data_dir: &Path,
        toml: &str,
        control_listen: &str,
        advertise: &str,
    ) -> Self {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let cfg = data_dir.with_extension("toml");
        std::fs::write(&cfg, toml).expect("write config");
        let mut c = Self {
            data_dir: data_dir.to_owned(),
            child: None,
            admin: String::new(),
            control: String::new(),
            metrics: String::new(),
            fingerprint: String::new(),
            extra: vec![
                "--config".into(),
                cfg.to_str().expect("utf-8 path").into(),
                "--advertise".into(),
                advertise.into(),
            ],
            prefix: Vec::new(),
        };
        c.spawn(Some(control_listen));
        c
    }

    fn spawn(&mut self, control_listen: Option<&str>) {
        let endpoints = self.data_dir.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        std::fs::create_dir_all(&self.data_dir).expect("data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .expect("log file");
        let control = control_listen
            .map(str::to_owned)
            .unwrap_or_else(|| format!("127.0.0.1:{}", unshared_port()));
        let mut cmd = match self.prefix.split_first() {
            None => Command::new(bin("causeway-controller")),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("causeway-controller"));
                c
            }
        };
        let child = cmd
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--admin-listen",
                "127.0.0.1:0",
                "--control-listen",
                &control,
            ])
            .args(&self.extra)
            // A free port per controller, unless the test chose one.
            .args(
                (!self.extra.iter().any(|a| a == "--metrics-listen"))
                    .then_some(["--metrics-listen", "127.0.0.1:0"])
                    .into_iter()
                    .flatten(),
            )
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn causeway-controller");
        let pid = child.id();
        self.child = Some(child);
        let v: Value = wait_for("controller endpoints.json", Duration::from_secs(30), || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("controller exited with {status}; log:\n{}", self.log());
            }
            let text = std::fs::read_to_string(&endpoints).ok()?;
            let v: Value = serde_json::from_str(&text).ok()?;
            (v["pid"].as_u64() == Some(u64::from(pid))).then_some(v)
        });
        self.admin = v["admin"].as_str().expect("admin").to_owned();
        self.control = v["control"].as_str().expect("control").to_owned();
        self.metrics = v["metrics"].as_str().expect("metrics").to_owned();
        self.fingerprint = v["ca_fingerprint"]
            .as_str()
            .expect("fingerprint")
            .to_owned();
    }

    /// The controller's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    /// Waits like [`wait_for`], and on a timeout panics with the controller's log: what
    /// it did while the test waited is what explains a timeout.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let start = Instant::now();
        wait_for(what, Duration::MAX, || {
            let v = f();
            if v.is_none() && start.elapsed() >= timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; the controller's log:\n{}",
                    self.log()
                );
            }
            v
        })
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&c);
            let _ = c.wait();
        }
    }

    /// Starts again on the same data dir and the same control port.
    pub fn restart(&mut self) {
        self.kill();
        let control = self.control.clone();
        self.spawn(Some(&control));
    }

    /// GETs an admin API path with the credential and parses the JSON answer.
    pub fn api(&self, path: &str) -> Value {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let credential =
            std::fs::read_to_string(self.data_dir.join("admin.token")).expect("admin.token");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let resp = reqwest::Client::new()
                .get(format!("{}{path}", self.admin))
                .bearer_auth(credential.trim())
                .send()
                .await
                .expect("admin API reachable");
            assert!(resp.status().is_success(), "{path}: {}", resp.status());
            resp.json().await.expect("JSON")
        })
    }

    /// The mesh version.
    pub fn mesh_version(&self) -> u64 {
        self.api("/v1/mesh")["version"].as_u64().expect("version")
    }

    /// The agent list (`causewayctl agent list --output json`).
    pub fn agents(&self) -> Vec<Value> {
        self.ctl_json(&["agent", "list"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Runs `causewayctl` against this controller.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("causewayctl"))
            .args(args)
            .env("CAUSEWAY_CONTROLLER", &self.admin)
            .env(
                "CAUSEWAY_ADMIN_TOKEN_FILE",
                self.data_dir.join("admin.token"),
            )
            .output()
            .expect("run causewayctl")
    }

    /// Runs `causewayctl`, asserting success; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "causewayctl {args:?} failed: {}",
            describe(&out)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Runs `causewayctl ... --output json` and parses it.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        serde_json::from_str(&self.ctl_ok(&all)).expect("JSON output")
    }

    /// Creates the group `web` (namespace default, service account web).
    pub fn create_web_group(&self) {
        self.ctl_ok(&[
            "group",
            "create",
            "web",
            "--namespace",
            "default",
            "--service-account",
            "web",
            "--service",
            "web",
            "--port",
            "http:8080",
        ]);
    }

    /// Creates a token for `group` with extra arguments; returns its text.
    pub fn token(&self, group: &str, extra: &[&str]) -> String {
        let mut args = vec!["token", "create", "--group", group];
        args.extend_from_slice(extra);
        self.ctl_ok(&args).trim().to_owned()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `causeway-agent` with arguments.
pub fn agent(args: &[&str]) -> Output {
    Command::new(bin("causeway-agent"))
        .args(args)
        .output()
        .expect("run causeway-agent")
}

/// Joins with `token` into `state_dir`, asserting success.
pub fn join_ok(token: &str, state_dir: &Path) -> String {
    let out = agent(&[
        "join",
        token,
        "--state-dir",
        state_dir.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "join failed: {}", describe(&out));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Joins with `token`, asserting failure; returns stderr.
pub fn join_err(token: &str, state_dir: &Path) -> String {
    let out = agent(&[
        "join",
        token,
        "--state-dir",
        state_dir.to_str().expect("utf-8"),
    ]);
    assert!(
        !out.status.success(),
        "join unexpectedly succeeded: {}",
        describe(&out)
    );
    String::from_utf8(out.stderr).expect("utf-8")
}

/// The leaf certificate facts of a state dir.
pub fn cert_of(state_dir: &Path) -> causeway_agent::identity::CertFacts {
    let pem = std::fs::read_to_string(state_dir.join("cert.pem")).expect("cert.pem");
    let der = causeway_api::pem::decode_all(&pem, "CERTIFICATE")
        .into_iter()
        .next()
        .expect("a certificate");
    causeway_agent::identity::cert_facts(&der).expect("valid certificate")
}

/// The agent id a state dir was enrolled as (`agent.json`).
pub fn agent_id(state_dir: &Path) -> String {
    let info: Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("agent.json")).expect("agent.json"))
            .expect("agent.json is JSON");
    info["agent_id"].as_str().expect("agent_id").to_owned()
}

/// A running `causeway-agent run` process.
pub struct AgentProcess {
    child: Option<Child>,
    /// Its state dir.
    pub state_dir: PathBuf,
}

impl AgentProcess {
    /// Starts `causeway-agent run` with a config file written from `toml`.
    pub fn start(state_dir: &Path, toml: &str) -> Self {
        Self::start_with(state_dir, toml, &[])
    }

    /// Starts `causeway-agent run` with a config file and extra arguments.
    pub fn start_with(state_dir: &Path, toml: &str, extra: &[&str]) -> Self {
        Self::start_through(&[], state_dir, toml, extra)
    }

    /// [`AgentProcess::start_with`] through a command that execs the agent (`prefix`
    /// followed by the agent's path and arguments, e.g. a mount namespace with its own
    /// /etc/hosts); the process keeps the agent's pid.
    pub fn start_through(prefix: &[&str], state_dir: &Path, toml: &str, extra: &[&str]) -> Self {
        let cfg = state_dir.with_extension("agent.toml");
        std::fs::write(&cfg, toml).expect("write agent config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state_dir.with_extension("agent.log"))
            .expect("agent log");
        let mut cmd = match prefix.split_first() {
            None => Command::new(bin("causeway-agent")),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("causeway-agent"));
                c
            }
        };
        let child = cmd
            .args(["run", "--config"])
            .arg(&cfg)
            .arg("--state-dir")
            .arg(state_dir)
            .args(extra)
            // These tests run agents on the host (as root in CI): never touch the host's
            // iptables. Data-plane tests start their agents in network namespaces instead.
            .args((!extra.contains(&"--no-capture")).then_some("--no-capture"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn causeway-agent run");
        Self {
            child: Some(child),
            state_dir: state_dir.to_owned(),
        }
    }

    /// The agent's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.with_extension("agent.log")).unwrap_or_default()
    }

    /// `causeway-agent status --output json`.
    pub fn status(&self) -> Value {
        let out = agent(&[
            "status",
            "--state-dir",
            self.state_dir.to_str().expect("utf-8"),
            "--output",
            "json",
        ]);
        assert!(out.status.success(), "status failed: {}", describe(&out));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&c);
            let _ = c.wait();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::unshared_port;

    #[test]
    fn unshared_ports_are_free_distinct_and_below_the_ephemeral_range() {
        let a = unshared_port();
        // Held: the next call must not hand out a port that is in use.
        let held = std::net::UdpSocket::bind(("127.0.0.1", a)).expect("first port is free");
        let b = unshared_port();
        assert_ne!(a, b);
        for p in [a, b] {
            assert!((20_000..32_000).contains(&p), "{p} outside 20000..32000");
        }
        drop(held);
        std::net::TcpListener::bind(("127.0.0.1", b)).expect("second port is free for TCP");
    }
}
