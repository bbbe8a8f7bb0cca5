//! Config push at scale: 1,000 simulated agents on one controller, over real QUIC and
//! mutual TLS on loopback.
//!
//! Issue 4, section Benchmark: "1,000 simulated agents (lightweight clients in one
//! process, real QUIC + mTLS) subscribed to one controller on loopback: convergence time
//! from a registry change to all 1,000 ACKs (p50/p99; target p99 ≤ 1 s), controller
//! memory per connected agent, and the bytes sent for a one-endpoint change (must not
//! grow with the number of services)."
//!
//! The controller is the real `causeway-controller` binary, started as a child process
//! with a temporary data dir, ports `127.0.0.1:0`, `[mesh] agent_grace = "10m"` and one
//! `[[sources.file]]` source (`ext`) whose file this program rewrites to change the
//! registry. It is found in `$CAUSEWAY_BIN_DIR`, else next to this executable (build it
//! first: `cargo build --release -p causeway-controller`).
//!
//! Steps:
//! 1. A workload group without a service (so the agents do not auto-register: every
//!    registry change below is the file's alone) and one join token with N uses, both
//!    through the admin API; N identities enrolled with `causeway_agent::client::join`
//!    (the real join over QUIC; each in its own state dir).
//! 2. Controller `VmRSS` (from `/proc/<pid>/status`), then N subscriptions: each is a
//!    QUIC connection with the agent's own certificate (mTLS) made from ONE shared
//!    client `quinn::Endpoint` (one UDP socket for all simulated agents), one
//!    bidirectional stream, `Subscribe(Hello)`, then a loop that reads each
//!    `PushFrame`, records when an update arrived and its encoded size, and ACKs it at
//!    once. The simulated agents do not apply updates to a `MeshState` or write a
//!    cache: they are as light as an agent can be, so the bench measures the controller.
//!    Once all N have ACKed their snapshot, `VmRSS` again: the difference / N is the
//!    controller's memory per connected agent.
//! 3. Convergence, repeated `--changes` times: one endpoint address of one service in
//!    the file changes (written to a temporary file and renamed). The file source sees
//!    it on its next poll (every 2 s in the controller); the mesh version bump is found
//!    by polling `GET /v1/mesh` every 5 ms. **t0** is the instant the last poll that
//!    still returned the old version was sent: the commit happened after t0, so every
//!    latency below is an upper bound, too high by at most one poll interval plus one
//!    admin round trip. Each agent's latency is from t0 to the moment it had written
//!    its ACK for that version (a version at or past it). Reported: p50/p99 over all
//!    agents × changes, and per change the time until the last agent ACKed (p50/p99/max
//!    over changes). Then `GET /v1/agents` is polled every 50 ms until the controller
//!    has recorded all N ACKs: the time from t0 to that answer is the controller-side
//!    "all ACKs" time (an upper bound; ACKs lost to a full socket buffer arrive late).
//!    Datagrams the kernel dropped on the controller's and the client's UDP sockets
//!    (`/proc/net/udp`, column `drops`) are reported per phase. The shared client socket
//!    asks for an 8 MiB receive buffer (`--client-rcvbuf`; 0 keeps the kernel default)
//!    because 1,000 agents' updates arrive on it in one burst, which a real agent's own
//!    socket never sees.
//! 4. Bytes per one-endpoint change at 100, 1,000 and 10,000 services in the file: the
//!    file grows to that size, then one endpoint changes and the encoded size of the
//!    `ConfigUpdate` frame each agent receives for that version is recorded. To keep
//!    the run short only `--size-agents` agents (default 10) stay connected here; the
//!    size of a delta does not depend on the number of agents. (With 100 agents the
//!    growth to 10,000 services, a 9,000-service delta to each, stalled the controller
//!    until the connections idled out: see bench/results/push_convergence.md.)
//!
//! Usage: `push_convergence [--agents N] [--changes N] [--size-agents N]
//! [--sizes 100,1000,10000] [--client-rcvbuf BYTES] [--dir DIR] [--keep] [--json FILE]`.
//! Needs `ulimit -n` of a few hundred at least (one UDP socket for all subscriptions;
//! joins run 32 at a time, each with its own short-lived socket).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use causeway_agent::client::{SERVER_NAME, join};
use causeway_agent::identity::StateDir;
use causeway_api::JoinToken;
use causeway_bench::push_sim::{Rec, client_config, client_endpoint, run_agent};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

/// Convergence target (issue 4).
const TARGET_P99_MS: f64 = 1000.0;
/// How often `GET /v1/mesh` is polled to find the commit.
const POLL: Duration = Duration::from_millis(5);
/// How often `GET /v1/agents` is polled for the controller's view of the ACKs.
const CONTROLLER_ACK_POLL: Duration = Duration::from_millis(50);
/// Poll interval while the mesh is large (each `GET /v1/mesh` builds every service's
/// view under the mesh lock; polling fast would slow down what is measured).
const POLL_LARGE: Duration = Duration::from_millis(100);
/// Joins in flight.
const JOIN_CONCURRENCY: usize = 32;
/// Subscriptions being set up at once.
const CONNECT_CONCURRENCY: usize = 64;
/// Endpoints per service in the file.
const EPS_PER_SERVICE: usize = 2;
/// Longest wait for any one step.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

struct Args {
    agents: usize,
    changes: usize,
    size_agents: usize,
    sizes: Vec<usize>,
    dir: Option<PathBuf>,
    json: Option<PathBuf>,
    keep: bool,
    client_rcvbuf: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        agents: 1000,
        changes: 20,
        size_agents: 10,
        sizes: vec![100, 1000, 10_000],
        dir: None,
        json: None,
        keep: false,
        client_rcvbuf: 8 << 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--agents" => args.agents = value()?.parse()?,
            "--changes" => args.changes = value()?.parse()?,
            "--size-agents" => args.size_agents = value()?.parse()?,
            "--sizes" => {
                args.sizes = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
            }
            "--dir" => args.dir = Some(value()?.into()),
            "--json" => args.json = Some(value()?.into()),
            "--keep" => args.keep = true,
            "--client-rcvbuf" => args.client_rcvbuf = value()?.parse()?,
            "-h" | "--help" => {
                println!(
                    "usage: push_convergence [--agents N] [--changes N] [--size-agents N] [--sizes 100,1000,10000] [--client-rcvbuf BYTES] [--dir DIR] [--keep] [--json FILE]"
                );
                bail!("help shown");
            }
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    ensure!(
        args.agents > 0 && args.changes > 0 && !args.sizes.is_empty(),
        "--agents, --changes and --sizes must not be zero or empty"
    );
    args.size_agents = args.size_agents.clamp(1, args.agents);
    Ok(args)
}

/// Where the workspace binaries are.
fn bin(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("CAUSEWAY_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .to_owned(),
    };
    let path = dir.join(name);
    ensure!(
        path.exists(),
        "{} not found: build it first (`cargo build --release -p causeway-controller`) or set CAUSEWAY_BIN_DIR",
        path.display()
    );
    Ok(path)
}

/// A field of `/proc/<pid>/status` in kB.
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// User + system CPU seconds of a process.
fn cpu_secs(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Datagrams the kernel dropped on the UDP socket bound to `port` on loopback (the
/// `drops` column of `/proc/net/udp`; full receive buffer), if it is listed.
fn udp_drops(port: u16) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/udp").ok()?;
    let want = format!("0100007F:{port:04X}");
    text.lines()
        .skip(1)
        .find(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|d| d.parse().ok())
}

/// The soft limit on open files.
fn nofile_soft() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The file source's content: `services` services with two endpoints each; `bump`
/// changes the address of service 0's first endpoint.
fn services_file(services: usize, bump: usize) -> String {
    let mut out = String::with_capacity(services * 160);
    for i in 0..services {
        out.push_str(&format!(
            "[[services]]\nname = \"svc-{i:05}\"\nnamespace = \"ext\"\nports = {{ http = 8080, grpc = 9090 }}\nlabels = {{ team = \"team-{}\" }}\n",
            i % 40
        ));
        for j in 0..EPS_PER_SERVICE {
            let k = i * EPS_PER_SERVICE + j;
            let last = if i == 0 && j == 0 {
                (bump % 250) + 1
            } else {
                k & 255
            };
            out.push_str(&format!(
                "[[services.endpoints]]\naddress = \"10.{}.{}.{last}\"\nzone = \"zone-{}\"\n",
                (k >> 16) & 255,
                (k >> 8) & 255,
                j % 3
            ));
        }
    }
    out
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The controller child process.
struct Controller {
    child: Child,
    pid: u32,
    admin: String,
    control: std::net::SocketAddr,
    credential: String,
    http: reqwest::Client,
}

impl Controller {
    async fn start(root: &Path, services_path: &Path) -> Result<Self> {
        let data = root.join("controller");
        std::fs::create_dir_all(&data)?;
        let cfg = root.join("controller.toml");
        std::fs::write(
            &cfg,
            format!(
                "[mesh]\nagent_grace = \"10m\"\n\n[[sources.file]]\nname = \"ext\"\npath = {:?}\n",
                services_path.to_str().context("utf-8 path")?
            ),
        )?;
        let log = std::fs::File::create(root.join("controller.log"))?;
        let child = Command::new(bin("causeway-controller")?)
            .arg("--data-dir")
            .arg(&data)
            .arg("--config")
            .arg(&cfg)
            .args([
                "--admin-listen",
                "127.0.0.1:0",
                "--control-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start causeway-controller")?;
        let pid = child.id();
        let mut child = child;
        let started = Instant::now();
        let endpoints: Value = loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "controller exited with {status}; see {}",
                    root.join("controller.log").display()
                );
            }
            if let Ok(text) = std::fs::read_to_string(data.join("endpoints.json"))
                && let Ok(v) = serde_json::from_str::<Value>(&text)
                && v["pid"].as_u64() == Some(u64::from(pid))
            {
                break v;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "controller did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let credential = std::fs::read_to_string(data.join("admin.token"))?
            .trim()
            .to_owned();
        Ok(Self {
            child,
            pid,
            admin: endpoints["admin"].as_str().context("admin")?.to_owned(),
            control: endpoints["control"].as_str().context("control")?.parse()?,
            credential,
            http: reqwest::Client::new(),
        })
    }

    async fn get(&self, path: &str) -> Result<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.admin))
            .bearer_auth(&self.credential)
            .send()
            .await?;
        ensure!(resp.status().is_success(), "GET {path}: {}", resp.status());
        Ok(resp.json().await?)
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value> {
        let resp = self
            .http
            .post(format!("{}{path}", self.admin))
            .bearer_auth(&self.credential)
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await?;
        ensure!(status.is_success(), "POST {path}: {status}: {v}");
        Ok(v)
    }

    async fn mesh(&self) -> Result<(u64, u64)> {
        let v = self.get("/v1/mesh").await?;
        Ok((
            v["version"].as_u64().context("version")?,
            v["services"].as_u64().context("services")?,
        ))
    }

    fn rss_mb(&self) -> f64 {
        status_kb(self.pid, "VmRSS:")
            .map(|k| k as f64 / 1024.0)
            .unwrap_or(f64::NAN)
    }

    fn hwm_mb(&self) -> f64 {
        status_kb(self.pid, "VmHWM:")
            .map(|k| k as f64 / 1024.0)
            .unwrap_or(f64::NAN)
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Removes the temporary directory at the end unless asked to keep it.
struct Cleanup {
    _dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Cleanup {
    fn path(&self) -> &Path {
        &self.path
    }
}

fn scopeguard(dir: tempfile::TempDir, keep: bool) -> Cleanup {
    let path = dir.path().to_owned();
    if keep {
        let _ = dir.keep();
        Cleanup { _dir: None, path }
    } else {
        Cleanup {
            _dir: Some(dir),
            path,
        }
    }
}

/// Collects what the agents report.
struct Tracker {
    rx: mpsc::UnboundedReceiver<Rec>,
    latest: Vec<u64>,
    log: Vec<Rec>,
}

impl Tracker {
    fn drain(&mut self) {
        while let Ok(r) = self.rx.try_recv() {
            self.latest[r.agent] = self.latest[r.agent].max(r.version);
            self.log.push(r);
        }
    }

    /// Waits until every agent in `agents` ACKed `version` or later.
    async fn wait_all(&mut self, agents: std::ops::Range<usize>, version: u64) -> Result<()> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            self.drain();
            let behind = agents.clone().filter(|a| self.latest[*a] < version).count();
            if behind == 0 {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{behind} agents did not ACK version {version} within {STEP_TIMEOUT:?}"
            );
            match tokio::time::timeout(Duration::from_millis(200), self.rx.recv()).await {
                Ok(Some(r)) => {
                    self.latest[r.agent] = self.latest[r.agent].max(r.version);
                    self.log.push(r);
                }
                Ok(None) => bail!("all agents ended"),
                Err(_) => {}
            }
        }
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Rewrites the file and finds the commit by polling; returns (t0, new version).
async fn change_and_find_commit(
    ctl: &Controller,
    path: &Path,
    text: &str,
    before: u64,
    poll: Duration,
) -> Result<(Instant, u64)> {
    write_atomic(path, text)?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut last_old = Instant::now();
    loop {
        let sent = Instant::now();
        let (v, _) = ctl.mesh().await?;
        if v > before {
            return Ok((last_old, v));
        }
        last_old = sent;
        ensure!(
            Instant::now() < deadline,
            "the file change did not reach the mesh"
        );
        tokio::time::sleep(poll).await;
    }
}

/// How long each `GET /v1/agents` of [`wait_controller_acks`] took to answer (ms): the
/// controller-side figure includes it (twice when the first poll came too early).
static AGENTS_VIEW_MS: std::sync::Mutex<Vec<f64>> = std::sync::Mutex::new(Vec::new());

/// Polls `GET /v1/agents` (every `CONTROLLER_ACK_POLL`) until the controller has
/// recorded an ACK of `version` or later from `agents` agents; returns when the answer
/// that showed it arrived (an upper bound on when the last ACK was processed).
async fn wait_controller_acks(ctl: &Controller, version: u64, agents: usize) -> Result<Instant> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let asked = Instant::now();
        let v = ctl.get("/v1/agents").await?;
        let at = Instant::now();
        AGENTS_VIEW_MS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((at - asked).as_secs_f64() * 1000.0);
        let acked = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|r| r["acked_version"].as_u64().is_some_and(|x| x >= version))
                    .count()
            })
            .unwrap_or(0);
        if acked >= agents {
            return Ok(at);
        }
        ensure!(
            Instant::now() < deadline,
            "the controller recorded only {acked}/{agents} ACKs of version {version}"
        );
        tokio::time::sleep(CONTROLLER_ACK_POLL).await;
    }
}

struct SizeRow {
    services: usize,
    version: u64,
    bytes_min: usize,
    bytes_max: usize,
    delta_services: usize,
    delta_removed: usize,
    full: bool,
    grow_sync_ms: f64,
    change_p50_ms: f64,
    change_max_ms: f64,
    controller_rss_mb: f64,
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

#[allow(
    clippy::too_many_lines,
    reason = "a benchmark script reads best as one sequence of steps"
)]
async fn run(args: Args) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let nofile = nofile_soft();
    eprintln!("push_convergence: open files soft limit {nofile:?}");
    if nofile.is_some_and(|n| n < 512) {
        bail!("ulimit -n is {nofile:?}; raise it to at least 512 (`ulimit -n 4096`) and run again");
    }
    let root = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::tempdir_in(d)?
        }
        None => tempfile::tempdir()?,
    };
    let cleanup = scopeguard(root, args.keep);
    let root = cleanup.path();
    if args.keep {
        eprintln!(
            "push_convergence: keeping {} (controller.log is there)",
            root.display()
        );
    }
    let services_path = root.join("services.toml");
    let first_size = args.sizes[0];
    let mut bump = 0usize;
    write_atomic(&services_path, &services_file(first_size, bump))?;
    let mut ctl = Controller::start(root, &services_path).await?;
    eprintln!(
        "push_convergence: controller pid {} admin {} control {}",
        ctl.pid, ctl.admin, ctl.control
    );
    let rss_fresh = ctl.rss_mb();

    // Wait for the file's first sync.
    let deadline = Instant::now() + STEP_TIMEOUT;
    while ctl.mesh().await?.1 < first_size as u64 {
        ensure!(Instant::now() < deadline, "the file source never synced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 1. Group, token, joins.
    ctl.post(
        "/v1/groups",
        json!({"name": "bench", "namespace": "default", "service_account": "bench"}),
    )
    .await?;
    let token = ctl
        .post(
            "/v1/tokens",
            json!({"group": "bench", "uses": args.agents, "ttl_secs": 3600}),
        )
        .await?;
    let token = JoinToken::decode(token["token"].as_str().context("token")?)
        .map_err(|e| anyhow::anyhow!("token: {e}"))?;
    let token = Arc::new(token);
    let started = Instant::now();
    let sem = Arc::new(Semaphore::new(JOIN_CONCURRENCY));
    let mut joins = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        let (sem, token) = (sem.clone(), token.clone());
        let state = StateDir::new(root.join(format!("agents/vm-{i:04}")));
        joins.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            join(&token, &state, &format!("vm-{i:04}"), false)
                .await
                .map_err(|e| anyhow::anyhow!("join {i}: {e}"))
        }));
    }
    let mut identities = Vec::with_capacity(args.agents);
    for j in joins {
        identities.push(j.await??);
    }
    let join_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "push_convergence: {} joins in {join_secs:.1} s",
        args.agents
    );

    // 2. Subscriptions over one shared client endpoint.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = ctl.rss_mb();
    let (endpoint, rcvbuf) = client_endpoint(args.client_rcvbuf)?;
    let client_port = endpoint.local_addr()?.port();
    let control_port = ctl.control.port();
    let drops = || {
        (
            udp_drops(control_port).unwrap_or(0),
            udp_drops(client_port).unwrap_or(0),
        )
    };
    let drops_subscribe = drops();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut tracker = Tracker {
        rx,
        latest: vec![0; args.agents],
        log: Vec::new(),
    };
    let started = Instant::now();
    let sem = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut connecting = Vec::with_capacity(args.agents);
    for id in &identities {
        let cfg = client_config(id)?;
        let (sem, endpoint, control) = (sem.clone(), endpoint.clone(), ctl.control);
        connecting.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let conn = endpoint.connect_with(cfg, control, SERVER_NAME)?.await?;
            anyhow::Ok(conn)
        }));
    }
    let mut conns = Vec::with_capacity(args.agents);
    let mut agent_tasks = Vec::with_capacity(args.agents);
    for (i, c) in connecting.into_iter().enumerate() {
        let conn = c.await?.with_context(|| format!("agent {i} connect"))?;
        let tx = tx.clone();
        let c2 = conn.clone();
        agent_tasks.push(tokio::spawn(async move {
            if let Err(e) = run_agent(i, c2.clone(), tx).await
                && !matches!(
                    c2.close_reason(),
                    Some(quinn::ConnectionError::LocallyClosed)
                )
            {
                eprintln!("agent {i}: {e:#}");
            }
        }));
        conns.push(conn);
    }
    drop(tx);
    let (version0, _) = ctl.mesh().await?;
    tracker.wait_all(0..args.agents, version0).await?;
    let subscribe_secs = started.elapsed().as_secs_f64();
    let drops_conv = drops();
    let drops_subscribe = (
        drops_conv.0 - drops_subscribe.0,
        drops_conv.1 - drops_subscribe.1,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = ctl.rss_mb();
    let per_agent_kb = (rss_after - rss_before) * 1024.0 / args.agents as f64;
    let snapshot_bytes = tracker
        .log
        .iter()
        .find(|r| r.full)
        .map(|r| r.bytes)
        .unwrap_or(0);
    let connected = ctl.get("/v1/mesh").await?["agents_connected"]
        .as_u64()
        .unwrap_or(0);
    eprintln!(
        "push_convergence: {} subscribed in {subscribe_secs:.1} s ({connected} connected per the controller); RSS {rss_before:.1} → {rss_after:.1} MB",
        args.agents
    );

    // 3. Convergence over `changes` one-endpoint changes.
    let cpu_start = cpu_secs(ctl.pid);
    let conv_started = Instant::now();
    let mut per_agent_ms = Vec::new();
    let mut all_acked_ms = Vec::new();
    let mut first_offset_ms = Vec::new();
    let mut change_bytes = Vec::new();
    let mut ctl_acked_ms = Vec::new();
    for c in 0..args.changes {
        bump += 1;
        let (before, _) = ctl.mesh().await?;
        let (t0, v) = change_and_find_commit(
            &ctl,
            &services_path,
            &services_file(first_size, bump),
            before,
            POLL,
        )
        .await?;
        tracker.wait_all(0..args.agents, v).await?;
        let ctl_all = wait_controller_acks(&ctl, v, args.agents).await?;
        ctl_acked_ms.push(ms(ctl_all.saturating_duration_since(t0)));
        let mut done: BTreeMap<usize, (Instant, Instant)> = BTreeMap::new();
        for r in tracker.log.iter().filter(|r| r.version >= v) {
            let e = done.entry(r.agent).or_insert((r.received, r.acked));
            if r.acked < e.1 {
                *e = (r.received, r.acked);
            }
            if r.version == v && !r.full {
                change_bytes.push(r.bytes);
            }
        }
        ensure!(done.len() == args.agents, "not every agent reported");
        let lat: Vec<f64> = done
            .values()
            .map(|(_, a)| ms(a.saturating_duration_since(t0)))
            .collect();
        let first = done.values().map(|(r, _)| *r).min().expect("agents");
        first_offset_ms.push(ms(first.saturating_duration_since(t0)));
        let max = lat.iter().copied().fold(0.0, f64::max);
        all_acked_ms.push(max);
        per_agent_ms.extend(lat);
        tracker.log.retain(|r| r.version > v);
        let d = drops();
        eprintln!(
            "push_convergence: change {}/{}: version {v}, all {} ACKed {max:.1} ms after t0, the controller had them all {:.1} ms after t0 (UDP drops so far: controller {}, client {})",
            c + 1,
            args.changes,
            args.agents,
            ctl_acked_ms.last().copied().unwrap_or(f64::NAN),
            d.0,
            d.1
        );
    }
    let conv_wall = conv_started.elapsed().as_secs_f64();
    let drops_end = drops();
    let drops_conv = (drops_end.0 - drops_conv.0, drops_end.1 - drops_conv.1);
    let cpu_used = match (cpu_start, cpu_secs(ctl.pid)) {
        (Some(a), Some(b)) => b - a,
        _ => f64::NAN,
    };
    let per_agent = sorted(per_agent_ms);
    let all_acked = sorted(all_acked_ms);
    let first_offset = sorted(first_offset_ms);
    let p50 = percentile(&per_agent, 0.50);
    let p99 = percentile(&per_agent, 0.99);
    let all_p50 = percentile(&all_acked, 0.50);
    let all_p99 = percentile(&all_acked, 0.99);
    let all_max = all_acked.last().copied().unwrap_or(f64::NAN);
    let ctl_acked = sorted(ctl_acked_ms);
    let ctl_p50 = percentile(&ctl_acked, 0.50);
    let ctl_p99 = percentile(&ctl_acked, 0.99);
    let ctl_max = ctl_acked.last().copied().unwrap_or(f64::NAN);
    let agents_view = ctl.get("/v1/agents").await?;
    let (final_version, _) = ctl.mesh().await?;
    let controller_acked = agents_view
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["acked_version"].as_u64() == Some(final_version))
                .count()
        })
        .unwrap_or(0);

    // 4. Bytes of a one-endpoint change as the mesh grows.
    for conn in &conns[args.size_agents..] {
        conn.close(0u32.into(), b"bench: fewer agents for the size steps");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let keep = 0..args.size_agents;
    let mut rows = Vec::new();
    for &size in &args.sizes {
        // Grow (or shrink) the file to `size` services.
        let (before, _) = ctl.mesh().await?;
        let grow_start = Instant::now();
        write_atomic(&services_path, &services_file(size, bump))?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        let grown = loop {
            let (v, s) = ctl.mesh().await?;
            if s == size as u64 && v > before {
                break v;
            }
            if s == size as u64 && size == first_size {
                break v; // same size as now: nothing to commit
            }
            ensure!(
                Instant::now() < deadline,
                "the mesh did not reach {size} services"
            );
            // Each GET /v1/mesh builds every service's view under the mesh lock:
            // poll slowly while the mesh grows, to disturb the sync as little as possible.
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        tracker.wait_all(keep.clone(), grown).await?;
        let grow_sync_ms = ms(grow_start.elapsed());
        tracker.log.clear();
        // One endpoint changes.
        bump += 1;
        let (t0, v) = change_and_find_commit(
            &ctl,
            &services_path,
            &services_file(size, bump),
            grown,
            if size > 1000 { POLL_LARGE } else { POLL },
        )
        .await?;
        tracker.wait_all(keep.clone(), v).await?;
        let recs: Vec<&Rec> = tracker
            .log
            .iter()
            .filter(|r| r.version == v && keep.contains(&r.agent))
            .collect();
        ensure!(!recs.is_empty(), "no agent reported version {v}");
        let lat = sorted(
            recs.iter()
                .map(|r| ms(r.acked.saturating_duration_since(t0)))
                .collect(),
        );
        rows.push(SizeRow {
            services: size,
            version: v,
            bytes_min: recs.iter().map(|r| r.bytes).min().unwrap_or(0),
            bytes_max: recs.iter().map(|r| r.bytes).max().unwrap_or(0),
            delta_services: recs.iter().map(|r| r.services).max().unwrap_or(0),
            delta_removed: recs.iter().map(|r| r.removed).max().unwrap_or(0),
            full: recs.iter().any(|r| r.full),
            grow_sync_ms,
            change_p50_ms: percentile(&lat, 0.5),
            change_max_ms: lat.last().copied().unwrap_or(f64::NAN),
            controller_rss_mb: ctl.rss_mb(),
        });
        tracker.log.clear();
        eprintln!(
            "push_convergence: {size} services: one-endpoint change = {} bytes",
            rows.last().map(|r| r.bytes_max).unwrap_or(0)
        );
    }
    let controller_hwm = ctl.hwm_mb();
    for conn in &conns {
        conn.close(0u32.into(), b"bench done");
    }
    endpoint.wait_idle().await;
    for t in agent_tasks {
        t.abort();
    }
    ctl.stop();

    // Report.
    let conv_ok = p99 <= TARGET_P99_MS;
    let all_ok = all_p99 <= TARGET_P99_MS;
    let ctl_ok = ctl_p99 <= TARGET_P99_MS;
    let bytes_first = rows.first().map(|r| r.bytes_max).unwrap_or(0);
    let bytes_last = rows.last().map(|r| r.bytes_max).unwrap_or(0);
    // "Does not grow": the largest mesh's delta is within 10% (+64 bytes for longer
    // version numbers and names) of the smallest's, and every delta is one service.
    let bytes_ok = (bytes_last as f64) <= bytes_first as f64 * 1.1 + 64.0
        && rows
            .iter()
            .all(|r| !r.full && r.delta_services == 1 && r.delta_removed == 0);
    let change_bytes_p50 = {
        let mut b = change_bytes.clone();
        b.sort_unstable();
        b.get(b.len() / 2).copied().unwrap_or(0)
    };
    println!();
    println!(
        "push_convergence: {} simulated agents (real QUIC + mTLS, one client UDP socket) on one controller, loopback",
        args.agents
    );
    println!(
        "  setup: {} joins in {join_secs:.1} s; {} subscriptions (snapshot {} B each) in {subscribe_secs:.1} s; controller reports {connected} connected",
        args.agents, args.agents, snapshot_bytes
    );
    println!();
    println!(
        "convergence over {} one-endpoint changes, {} services in the mesh (t0 = last GET /v1/mesh still showing the old version, polled every {} ms):",
        args.changes,
        first_size,
        POLL.as_millis()
    );
    println!(
        "  per-agent ACK latency       p50 {p50:>8.1} ms   p99 {p99:>8.1} ms   target p99 ≤ {TARGET_P99_MS:.0} ms   {}",
        verdict(conv_ok)
    );
    println!(
        "  time to all {} ACKs        p50 {all_p50:>8.1} ms   p99 {all_p99:>8.1} ms   max {all_max:.1} ms   target p99 ≤ {TARGET_P99_MS:.0} ms   {}",
        args.agents,
        verdict(all_ok)
    );
    println!(
        "  all {} ACKs seen by the controller  p50 {ctl_p50:>8.1} ms   p99 {ctl_p99:>8.1} ms   max {ctl_max:.1} ms   target p99 ≤ {TARGET_P99_MS:.0} ms   {}",
        args.agents,
        verdict(ctl_ok)
    );
    println!(
        "    (the controller's view: GET /v1/agents polled every {} ms after the agents had sent their ACKs; an upper bound)",
        CONTROLLER_ACK_POLL.as_millis()
    );
    {
        let mut v = AGENTS_VIEW_MS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        v.sort_by(|a, b| a.total_cmp(b));
        println!(
            "    each GET /v1/agents ({} agents) took p50 {:.1} ms, max {:.1} ms to answer ({} polls)",
            args.agents,
            percentile(&v, 0.50),
            v.last().copied().unwrap_or(0.0),
            v.len()
        );
    }
    println!(
        "  first agent received, after t0: p50 {:.1} ms, max {:.1} ms",
        percentile(&first_offset, 0.5),
        first_offset.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  one-endpoint delta size to each agent: {change_bytes_p50} B; controller CPU {cpu_used:.2} s over {conv_wall:.1} s of this phase; controller-side agents at the final version: {controller_acked}/{}",
        args.agents
    );
    println!(
        "  UDP datagrams dropped by the kernel (full receive buffer, /proc/net/udp): subscribing: controller {} / client {}; convergence phase: controller {} / client {} (client socket receive buffer {rcvbuf} B)",
        drops_subscribe.0, drops_subscribe.1, drops_conv.0, drops_conv.1
    );
    println!();
    println!("controller memory (VmRSS of the controller process):");
    println!(
        "  fresh {rss_fresh:.1} MB; after {} joins {rss_before:.1} MB; with {} subscribed {rss_after:.1} MB → {per_agent_kb:.1} kB per connected agent; peak (VmHWM) {controller_hwm:.1} MB",
        args.agents, args.agents
    );
    println!();
    println!(
        "bytes sent for a one-endpoint change ({} agents connected):",
        args.size_agents
    );
    println!(
        "  {:>8} | {:>11} | {:>14} | {:>15} | {:>17} | {:>10}",
        "services",
        "frame bytes",
        "services/rm'd",
        "grow+sync (ms)",
        "change p50/max ms",
        "ctl RSS MB"
    );
    for r in &rows {
        println!(
            "  {:>8} | {:>11} | {:>14} | {:>15.0} | {:>8.1}/{:<8.1} | {:>10.1}",
            r.services,
            if r.bytes_min == r.bytes_max {
                r.bytes_max.to_string()
            } else {
                format!("{}–{}", r.bytes_min, r.bytes_max)
            },
            format!(
                "{}/{}{}",
                r.delta_services,
                r.delta_removed,
                if r.full { " FULL" } else { "" }
            ),
            r.grow_sync_ms,
            r.change_p50_ms,
            r.change_max_ms,
            r.controller_rss_mb
        );
    }
    println!(
        "  does not grow with the mesh ({bytes_first} B at {} services → {bytes_last} B at {} services): {}",
        rows.first().map(|r| r.services).unwrap_or(0),
        rows.last().map(|r| r.services).unwrap_or(0),
        verdict(bytes_ok)
    );
    println!();
    let pass = conv_ok && all_ok && ctl_ok && bytes_ok;
    println!("overall: {}", verdict(pass));

    if let Some(path) = &args.json {
        let doc = json!({
            "bench": "push_convergence",
            "agents": args.agents,
            "changes": args.changes,
            "mesh_services": first_size,
            "t0": "send instant of the last GET /v1/mesh (polled every 5 ms) that still returned the old version",
            "join_secs": join_secs,
            "subscribe_secs": subscribe_secs,
            "snapshot_bytes": snapshot_bytes,
            "convergence": {
                "per_agent_p50_ms": p50,
                "per_agent_p99_ms": p99,
                "all_acked_p50_ms": all_p50,
                "all_acked_p99_ms": all_p99,
                "all_acked_max_ms": all_max,
                "first_received_p50_ms": percentile(&first_offset, 0.5),
                "target_p99_ms": TARGET_P99_MS,
                "controller_all_acked_p50_ms": ctl_p50,
                "controller_all_acked_p99_ms": ctl_p99,
                "controller_all_acked_max_ms": ctl_max,
                "pass": conv_ok && all_ok && ctl_ok,
                "controller_cpu_secs": cpu_used,
                "phase_wall_secs": conv_wall,
                "delta_bytes_p50": change_bytes_p50,
                "udp_drops_controller": drops_conv.0,
                "udp_drops_client": drops_conv.1,
                "udp_drops_subscribe_controller": drops_subscribe.0,
                "udp_drops_subscribe_client": drops_subscribe.1,
                "client_rcvbuf_bytes": rcvbuf,
                "controller_side_acked": controller_acked,
            },
            "controller_memory": {
                "fresh_rss_mb": rss_fresh,
                "before_subscribe_rss_mb": rss_before,
                "after_subscribe_rss_mb": rss_after,
                "per_agent_kb": per_agent_kb,
                "peak_hwm_mb": controller_hwm,
            },
            "one_endpoint_change_bytes": rows.iter().map(|r| json!({
                "services": r.services,
                "version": r.version,
                "frame_bytes_min": r.bytes_min,
                "frame_bytes_max": r.bytes_max,
                "delta_services": r.delta_services,
                "delta_removed": r.delta_removed,
                "full": r.full,
                "grow_sync_ms": r.grow_sync_ms,
                "change_p50_ms": r.change_p50_ms,
                "change_max_ms": r.change_max_ms,
                "controller_rss_mb": r.controller_rss_mb,
                "agents": args.size_agents,
            })).collect::<Vec<_>>(),
            "bytes_pass": bytes_ok,
            "pass": pass,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}
