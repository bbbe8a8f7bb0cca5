//! Highly available controllers on etcd (issue 23), next to sled in the same run.
//!
//! Issue 23, section Benchmark: "Joins/s and renewals/s with the etcd backend (3 members
//! on this machine) against sled in the same run; push convergence to 1,000 agents
//! spread over three controllers (p99 change → all ACKs); failover time from leader
//! kill to the first registry change delivered, over 10 trials (median and max)."
//!
//! Three etcd members (Debian's `etcd-server`, the `etcd` binary on `PATH`) run on
//! 127.0.0.1, each on its own ports and in its own data dir under a temporary directory
//! that is removed at the end; every child (etcd, controllers) is killed on exit, on
//! error and on Ctrl-C. The parts, in order:
//!
//! 1. **Joins and renewals** (in process, as `ca_throughput`'s `join-N` row):
//!    `Enroller::join` with one multi-use token, `--in-flight` joins outstanding, then
//!    `Enroller::renew` of every agent just enrolled with its certificate chain and a
//!    new CSR. CSRs are made before the clock starts. Three rows, the same CSRs:
//!    `sled` (one store in the temporary dir, group commit and `fsync` as in a
//!    controller), `etcd ×1` (one `EtcdStore` on the three members) and `etcd ×3` (three
//!    `EtcdStore`s, each with its own CA handle and enroller, as three controllers; the
//!    workers take them in turn, so the three race on the one token and its
//!    compare-and-swap). Each row is checked afterwards: the token is spent exactly as
//!    many times as joins answered, and every agent has its renewal. The ratio is
//!    etcd / sled.
//! 2. **Push convergence**: three real `causeway-controller` processes on the etcd
//!    members (`[store] backend = "etcd"`, `lease_ttl` from `--lease-ttl`), one
//!    `[[sources.file]]` source that the leader runs. `--agents` identities join over
//!    QUIC (the real `causeway_agent::client::join`, round robin over the controllers;
//!    the time is printed), then subscribe as simulated agents (`causeway_bench::push_sim`,
//!    the ones of `push_convergence`), agent *i* to controller *i* mod 3. Each of
//!    `--changes` changes rewrites one endpoint address in the file; the commit is found
//!    by polling the leader's `GET /v1/mesh` every 5 ms and **t0** is when the last poll
//!    that still saw the old version was sent (so every latency is an upper bound, by
//!    at most one poll and one round trip). Per agent: t0 → its ACK of that version;
//!    per change: t0 → the last ACK, overall and per controller (the followers learn the
//!    change from etcd's watch). p50/p99 over all agents × changes and over changes.
//! 3. **Failover**, `--trials` times: with `--failover-agents` simulated agents
//!    subscribed to each controller, the leader (the one whose `/metrics` says
//!    `causeway_controller_leader 1`) gets `kill -9`, and the file is rewritten at once.
//!    Timed from the kill: a new leader reported (`/metrics` polled every 50 ms), the
//!    first surviving agent's ACK of the new version, and every surviving agent's ACK.
//!    The change is then checked in a survivor's `GET /v1/registry`. The killed
//!    controller is restarted (same data dir and control port) and caught up before the
//!    next trial. The time includes the lease expiry (up to `lease_ttl`), the followers'
//!    campaign interval (`lease_ttl` / 5, 100 ms to 1 s) and the new leader's start of
//!    the sources (the file is read at once; afterwards every 2 s).
//!
//! The controllers are found in `$CAUSEWAY_BIN_DIR`, else next to this executable (build
//! them first: `cargo build --release -p causeway-controller`).
//!
//! Usage: `ha_bench [--joins N] [--in-flight N] [--agents N] [--changes N] [--trials N]
//! [--failover-agents N] [--lease-ttl SECS] [--services N] [--client-rcvbuf BYTES]
//! [--dir DIR] [--keep] [--json FILE]`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use causeway_agent::client::{SERVER_NAME, join};
use causeway_agent::identity::{Identity, StateDir};
use causeway_api::wire::{Issued, JoinRequest, RenewRequest};
use causeway_api::{JoinToken, MtlsMode, WorkloadGroup};
use causeway_bench::percentile;
use causeway_bench::push_sim::{Rec, client_config, client_endpoint, run_agent};
use causeway_controller::ca::Ca;
use causeway_controller::config::CaConfig;
use causeway_controller::enroll::{Enroller, now_unix, sha256_hex};
use causeway_controller::etcd::EtcdOptions;
use causeway_controller::store::{GroupRecord, SledStore, Store, TokenRecord};
use causeway_controller::store_etcd::{EtcdStore, Kek};
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

/// How often the leader's `GET /v1/mesh` is polled to find a commit.
const POLL: Duration = Duration::from_millis(5);
/// How often `/metrics` is polled for the new leader during a failover.
const LEADER_POLL: Duration = Duration::from_millis(50);
/// Longest wait for any one step.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// QUIC joins in flight.
const JOIN_CONCURRENCY: usize = 32;
/// Subscriptions being set up at once.
const CONNECT_CONCURRENCY: usize = 64;
/// Etcd members.
const MEMBERS: usize = 3;
/// Controllers in the HA set.
const CONTROLLERS: usize = 3;
/// Where the key prefixes of the in-process enrollment rows start (the controllers use
/// the default, `/causeway/`).
const ENROLL_PREFIX: &str = "/bench-enroll";

#[derive(Debug, Clone, PartialEq)]
struct Args {
    joins: usize,
    in_flight: usize,
    agents: usize,
    changes: usize,
    trials: usize,
    failover_agents: usize,
    lease_ttl_secs: u64,
    services: usize,
    client_rcvbuf: usize,
    dir: Option<PathBuf>,
    keep: bool,
    json: Option<PathBuf>,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            joins: 2000,
            in_flight: 64,
            agents: 1000,
            changes: 20,
            trials: 10,
            failover_agents: 10,
            lease_ttl_secs: 10,
            services: 100,
            client_rcvbuf: 8 << 20,
            dir: None,
            keep: false,
            json: None,
        }
    }
}

const USAGE: &str = "usage: ha_bench [--joins N] [--in-flight N] [--agents N] [--changes N] [--trials N]
                [--failover-agents N] [--lease-ttl SECS] [--services N] [--client-rcvbuf BYTES]
                [--dir DIR] [--keep] [--json FILE]

  --joins N            joins, then as many renewals, per store row (default 2000)
  --in-flight N        concurrent joins and renewals in those rows (default 64)
  --agents N           simulated agents spread over the three controllers (default 1000)
  --changes N          registry changes timed to all ACKs (default 20)
  --trials N           leader kills (default 10)
  --failover-agents N  simulated agents per controller during the kills (default 10)
  --lease-ttl SECS     the controllers' [store] lease_ttl, 2 to 300 (default 10, the product default)
  --services N         services in the registry file (default 100)
  --client-rcvbuf B    receive buffer asked for the agents' shared UDP socket (default 8 MiB)
  --dir DIR            where the temporary directory goes (default $TMPDIR or /tmp)
  --keep               keep it (logs of etcd and the controllers are there)
  --json FILE          also write the results as JSON";

/// The arguments (after the program name), or `None` when help was asked for.
fn parse_args(argv: impl IntoIterator<Item = String>) -> Result<Option<Args>> {
    let mut args = Args::default();
    let mut it = argv.into_iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        let mut number = |name: &str| -> Result<usize> {
            let v = value(name)?;
            v.parse()
                .with_context(|| format!("{name} {v:?}: not a whole number\n{USAGE}"))
        };
        match flag.as_str() {
            "--joins" => args.joins = number("--joins")?,
            "--in-flight" => args.in_flight = number("--in-flight")?,
            "--agents" => args.agents = number("--agents")?,
            "--changes" => args.changes = number("--changes")?,
            "--trials" => args.trials = number("--trials")?,
            "--failover-agents" => args.failover_agents = number("--failover-agents")?,
            "--lease-ttl" => args.lease_ttl_secs = number("--lease-ttl")? as u64,
            "--services" => args.services = number("--services")?,
            "--client-rcvbuf" => args.client_rcvbuf = number("--client-rcvbuf")?,
            "--dir" => args.dir = Some(value("--dir")?.into()),
            "--json" => args.json = Some(value("--json")?.into()),
            "--keep" => args.keep = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    for (name, v) in [
        ("--joins", args.joins),
        ("--in-flight", args.in_flight),
        ("--agents", args.agents),
        ("--changes", args.changes),
        ("--trials", args.trials),
        ("--failover-agents", args.failover_agents),
        ("--services", args.services),
    ] {
        ensure!(v > 0, "{name} 0: must be at least 1");
    }
    ensure!(
        (2..=300).contains(&args.lease_ttl_secs),
        "--lease-ttl {}: must be between 2 and 300 seconds (etcd grants no shorter lease; the product default is 10)",
        args.lease_ttl_secs
    );
    Ok(Some(args))
}

// ---------------------------------------------------------------------------------
// Machine facts

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn nproc() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .context("no free loopback port")?
        .local_addr()?
        .port())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// p50, p99 and max of samples (ms).
fn summary(v: &[f64]) -> (f64, f64, f64) {
    let s = sorted(v.to_vec());
    (
        percentile(&s, 0.50),
        percentile(&s, 0.99),
        s.last().copied().unwrap_or(f64::NAN),
    )
}

// ---------------------------------------------------------------------------------
// Etcd members

/// One etcd member on loopback, killed on drop.
struct Member {
    child: Child,
    url: String,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The version line of `etcd --version`, or an error saying how to install it.
fn etcd_version() -> Result<String> {
    let out = Command::new("etcd").arg("--version").output().map_err(|e| {
        anyhow::anyhow!("etcd not found ({e}): apt-get install etcd-server (the `etcd` binary must be on PATH)")
    })?;
    ensure!(
        out.status.success(),
        "`etcd --version` failed with {}: reinstall etcd-server",
        out.status
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// `n` members forming one cluster, each with its data dir and log under `dir`; returns
/// once every member answers `/health` with `true`.
async fn start_cluster(dir: &Path, n: usize, http: &reqwest::Client) -> Result<Vec<Member>> {
    let ports: Vec<(u16, u16)> = (0..n)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<Result<_>>()?;
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Vec::with_capacity(n);
    for (i, (client, peer)) in ports.iter().enumerate() {
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log_path = dir.join(format!("etcd{i}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let data = dir.join(format!("etcd-data{i}"));
        let child = Command::new("etcd")
            .arg("--name")
            .arg(format!("m{i}"))
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &initial,
                "--initial-cluster-token",
                "causeway-ha-bench",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start etcd ({e}): apt-get install etcd-server"))?;
        members.push(Member { child, url });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, m) in members.iter_mut().enumerate() {
        loop {
            if let Some(status) = m.child.try_wait()? {
                bail!(
                    "etcd member {i} exited with {status}; see {}",
                    dir.join(format!("etcd{i}.log")).display()
                );
            }
            let healthy = match http.get(format!("{}/health", m.url)).send().await {
                Ok(r) => r.text().await.unwrap_or_default().contains("true"),
                Err(_) => false,
            };
            if healthy {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "etcd member {i} ({}) not healthy after 30 s; see {}",
                m.url,
                dir.join(format!("etcd{i}.log")).display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(members)
}

// ---------------------------------------------------------------------------------
// Part 1: joins and renewals in process

/// A P-256 key and a CSR for it, as an agent sends it (`ca_throughput`'s).
fn make_csr(i: usize) -> Result<Vec<u8>> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = rcgen::CertificateParams::new(vec![format!("vm-{i}.bench.invalid")])?;
    Ok(params.serialize_request(&key)?.der().to_vec())
}

fn bench_group() -> WorkloadGroup {
    WorkloadGroup {
        name: "bench".into(),
        namespace: "bench".into(),
        service_account: "web".into(),
        service: None,
        ports: Vec::new(),
        labels: Default::default(),
        allowed_cidrs: vec!["10.0.0.0/8".parse().expect("valid network")],
        mtls: MtlsMode::Permissive,
        registry_source: None,
    }
}

const TOKEN_ID: &str = "bench-join";
const SECRET: &[u8] = b"benchmark-secret-0123456789abcde";

/// Group and a token with `uses` uses, in a fresh store.
fn seed(store: &dyn Store, uses: usize) -> Result<()> {
    let now = now_unix();
    store.create_group(&GroupRecord {
        group: bench_group(),
        id: "g-bench".into(),
        created_at: now,
    })?;
    store.create_token(&TokenRecord {
        id: TOKEN_ID.into(),
        secret_sha256: sha256_hex(SECRET),
        group: "bench".into(),
        group_id: "g-bench".into(),
        revoked_at: None,
        created_at: now,
        expires_at: now + 24 * 3600,
        uses_total: u32::try_from(uses).context("--joins too large")?,
        uses_left: u32::try_from(uses).context("--joins too large")?,
        cidrs: vec!["10.0.0.0/8".parse().expect("valid network")],
    })?;
    store.flush()?;
    Ok(())
}

struct EnrollRow {
    backend: &'static str,
    controllers: usize,
    joins: usize,
    join_secs: f64,
    renewals: usize,
    renew_secs: f64,
}

impl EnrollRow {
    fn joins_per_sec(&self) -> f64 {
        self.joins as f64 / self.join_secs
    }
    fn renewals_per_sec(&self) -> f64 {
        self.renewals as f64 / self.renew_secs
    }
}

/// Runs `count` operations with `in_flight` outstanding; worker `w` uses enroller
/// `w % enrollers.len()`; returns the results by index.
async fn run_workers<T, F, Fut>(
    enrollers: &[Arc<Enroller>],
    count: usize,
    in_flight: usize,
    op: F,
) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(Arc<Enroller>, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<T>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let op = Arc::new(op);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..in_flight.min(count) {
        let (next, op) = (next.clone(), op.clone());
        let enroller = enrollers[w % enrollers.len()].clone();
        workers.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(out);
                }
                out.push((i, op(enroller.clone(), i).await?));
            }
        });
    }
    let mut all: Vec<(usize, T)> = Vec::with_capacity(count);
    while let Some(done) = workers.join_next().await {
        all.extend(done.context("worker panicked")??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, t)| t).collect())
}

/// Joins `join_csrs.len()` agents, then renews each with `renew_csrs`, over the stores
/// (one enroller each; the first store is seeded); checks the store afterwards.
async fn enroll_row(
    backend: &'static str,
    stores: Vec<Arc<dyn Store>>,
    join_csrs: &Arc<Vec<Vec<u8>>>,
    renew_csrs: &Arc<Vec<Vec<u8>>>,
    in_flight: usize,
) -> Result<EnrollRow> {
    let n = join_csrs.len();
    let td = "bench.causeway.invalid".parse()?;
    let now = now_unix();
    let first = stores.first().context("no store")?.clone();
    let mut enrollers = Vec::new();
    for store in &stores {
        // The first one creates the CA; the others load it, as controllers do.
        let ca = Arc::new(Ca::load_or_create(
            store.as_ref(),
            &CaConfig::default(),
            &td,
            now,
        )?);
        if enrollers.is_empty() {
            seed(first.as_ref(), n)?;
        }
        enrollers.push(Arc::new(Enroller::new(
            store.clone(),
            ca,
            Duration::from_secs(24 * 3600),
        )));
    }
    let source = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
    let csrs = join_csrs.clone();
    let t = Instant::now();
    let issued: Vec<Issued> = run_workers(&enrollers, n, in_flight, move |e, i| {
        let csrs = csrs.clone();
        async move {
            let req = JoinRequest {
                token_id: TOKEN_ID.into(),
                secret: SECRET.to_vec(),
                csr_der: csrs[i].clone(),
                hostname: format!("vm-{i}.bench"),
            };
            e.join(&req, source)
                .await
                .map_err(|err| anyhow::anyhow!("{backend}: join {i} failed: {err}"))
        }
    })
    .await?;
    let join_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "  {backend} ×{}: {n} joins in {join_secs:.2} s",
        stores.len()
    );

    let chains: Arc<Vec<Vec<CertificateDer<'static>>>> = Arc::new(
        issued
            .iter()
            .map(|i| {
                i.cert_chain_der
                    .iter()
                    .map(|d| CertificateDer::from(d.clone()))
                    .collect()
            })
            .collect(),
    );
    let csrs = renew_csrs.clone();
    let renewals = n.min(csrs.len());
    let t = Instant::now();
    run_workers(&enrollers, renewals, in_flight, move |e, i| {
        let (csrs, chains) = (csrs.clone(), chains.clone());
        async move {
            let req = RenewRequest {
                csr_der: csrs[i].clone(),
            };
            e.renew(Some(&chains[i]), &req)
                .await
                .map_err(|err| anyhow::anyhow!("{backend}: renewal {i} failed: {err}"))?;
            Ok(())
        }
    })
    .await?;
    let renew_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "  {backend} ×{}: {renewals} renewals in {renew_secs:.2} s",
        stores.len()
    );

    // Sanity: the token was spent exactly once per join, every agent renewed once.
    let token = first.token(TOKEN_ID)?.context("the bench token vanished")?;
    let spent = (token.uses_total - token.uses_left) as usize;
    ensure!(
        spent == n,
        "{backend}: token spent {spent} times for {n} joins"
    );
    let agents = first.agents()?;
    let joined = agents.iter().filter(|a| a.token_id == TOKEN_ID).count();
    let renewed: u64 = agents.iter().map(|a| a.renewals).sum();
    ensure!(
        joined == n && renewed == renewals as u64,
        "{backend}: {joined} agents and {renewed} renewals recorded, expected {n} and {renewals}"
    );
    Ok(EnrollRow {
        backend,
        controllers: stores.len(),
        joins: n,
        join_secs,
        renewals,
        renew_secs,
    })
}

fn etcd_store(endpoints: Vec<String>, prefix: &str) -> Result<Arc<dyn Store>> {
    let kek = Kek::from_bytes("ab".repeat(32).as_bytes(), "ha_bench key")?;
    let options = EtcdOptions {
        endpoints,
        ..EtcdOptions::default()
    };
    Ok(Arc::new(
        EtcdStore::open(&options, prefix, kek)
            .with_context(|| format!("cannot open the etcd store {prefix}"))?,
    ))
}

async fn enroll_part(args: &Args, root: &Path, members: &[Member]) -> Result<Vec<EnrollRow>> {
    let n = args.joins;
    eprintln!("generating {} CSRs (P-256, not timed)…", 2 * n);
    let join_csrs = Arc::new((0..n).map(make_csr).collect::<Result<Vec<_>>>()?);
    let renew_csrs = Arc::new((n..2 * n).map(make_csr).collect::<Result<Vec<_>>>()?);
    let urls: Vec<String> = members.iter().map(|m| m.url.clone()).collect();
    let mut rows = Vec::new();

    let sled: Arc<dyn Store> = Arc::new(SledStore::open(&root.join("sled"))?);
    rows.push(enroll_row("sled", vec![sled], &join_csrs, &renew_csrs, args.in_flight).await?);

    let one = vec![etcd_store(urls.clone(), &format!("{ENROLL_PREFIX}-1/"))?];
    rows.push(enroll_row("etcd", one, &join_csrs, &renew_csrs, args.in_flight).await?);

    // Three "controllers": each store prefers another member (its first endpoint).
    let three = (0..CONTROLLERS)
        .map(|c| {
            let mut eps = urls.clone();
            let n = eps.len();
            eps.rotate_left(c % n);
            etcd_store(eps, &format!("{ENROLL_PREFIX}-3/"))
        })
        .collect::<Result<Vec<_>>>()?;
    rows.push(enroll_row("etcd", three, &join_csrs, &renew_csrs, args.in_flight).await?);
    Ok(rows)
}

// ---------------------------------------------------------------------------------
// Controllers

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

/// One controller child process of the HA set, killed on drop.
struct Controller {
    index: usize,
    data: PathBuf,
    config: PathBuf,
    log: PathBuf,
    control_port: u16,
    child: Option<Child>,
    admin: String,
    control: std::net::SocketAddr,
    metrics: String,
    credential: String,
    http: reqwest::Client,
}

impl Controller {
    async fn start(root: &Path, index: usize, toml: &str, http: &reqwest::Client) -> Result<Self> {
        let data = root.join(format!("controller{index}"));
        std::fs::create_dir_all(&data)?;
        let config = root.join(format!("controller{index}.toml"));
        std::fs::write(&config, toml)?;
        let mut c = Controller {
            index,
            log: root.join(format!("controller{index}.log")),
            data,
            config,
            control_port: causeway_tests::unshared_port(),
            child: None,
            admin: String::new(),
            control: "127.0.0.1:0".parse()?,
            metrics: String::new(),
            credential: String::new(),
            http: http.clone(),
        };
        c.spawn().await?;
        Ok(c)
    }

    /// Starts the process (again) and waits for its `endpoints.json`.
    async fn spawn(&mut self) -> Result<()> {
        let endpoints = self.data.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bin("causeway-controller")?)
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--config")
            .arg(&self.config)
            .args([
                "--admin-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--control-listen")
            .arg(format!("127.0.0.1:{}", self.control_port))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start causeway-controller")?;
        let pid = child.id();
        self.child = Some(child);
        let started = Instant::now();
        let v: Value = loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "controller {} exited with {status}; see {}",
                    self.index,
                    self.log.display()
                );
            }
            if let Ok(text) = std::fs::read_to_string(&endpoints)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
                && v["pid"].as_u64() == Some(u64::from(pid))
            {
                break v;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "controller {} did not start within 30 s; see {}",
                self.index,
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.admin = v["admin"]
            .as_str()
            .context("endpoints.json: admin")?
            .to_owned();
        self.control = v["control"]
            .as_str()
            .context("endpoints.json: control")?
            .parse()?;
        self.metrics = v["metrics"]
            .as_str()
            .context("endpoints.json: metrics")?
            .to_owned();
        self.credential = std::fs::read_to_string(self.data.join("admin.token"))?
            .trim()
            .to_owned();
        Ok(())
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    /// `kill -9`; returns when the signal was sent (the process is reaped after).
    fn kill9(&mut self) -> Option<Instant> {
        let mut c = self.child.take()?;
        let _ = c.kill();
        let at = Instant::now();
        let _ = c.wait();
        Some(at)
    }

    async fn get(&self, path: &str) -> Result<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.admin))
            .bearer_auth(&self.credential)
            .send()
            .await
            .with_context(|| format!("controller {}: GET {path}", self.index))?;
        ensure!(
            resp.status().is_success(),
            "controller {}: GET {path}: {}",
            self.index,
            resp.status()
        );
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
        ensure!(
            status.is_success(),
            "controller {}: POST {path}: {status}: {v}",
            self.index
        );
        Ok(v)
    }

    async fn mesh(&self) -> Result<(u64, u64)> {
        let v = self.get("/v1/mesh").await?;
        Ok((
            v["version"].as_u64().context("/v1/mesh: version")?,
            v["services"].as_u64().context("/v1/mesh: services")?,
        ))
    }

    /// Whether `/metrics` says this controller leads (`false` when not reachable).
    async fn leads(&self) -> bool {
        if !self.running() {
            return false;
        }
        let Ok(resp) = self
            .http
            .get(format!("{}/metrics", self.metrics))
            .timeout(Duration::from_secs(2))
            .send()
            .await
        else {
            return false;
        };
        let text = resp.text().await.unwrap_or_default();
        text.lines().any(|l| {
            l.strip_prefix("causeway_controller_leader ")
                .is_some_and(|v| v.trim() == "1")
        })
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The index of the one running controller that leads, once exactly one does.
async fn one_leader(cs: &[Controller]) -> Result<usize> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let mut leading = Vec::new();
        for (i, c) in cs.iter().enumerate() {
            if c.leads().await {
                leading.push(i);
            }
        }
        if let [one] = leading.as_slice() {
            return Ok(*one);
        }
        ensure!(
            Instant::now() < deadline,
            "no single leader among the controllers within {STEP_TIMEOUT:?} (leading: {leading:?}); see the controller logs (--keep)"
        );
        tokio::time::sleep(LEADER_POLL).await;
    }
}

/// Waits until every running controller shows the same mesh version with `services`
/// services; returns it.
async fn in_step(cs: &[Controller], services: u64) -> Result<u64> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let mut seen = Vec::new();
        for c in cs.iter().filter(|c| c.running()) {
            seen.push(c.mesh().await?);
        }
        if seen.iter().all(|s| *s == seen[0]) && seen[0].1 >= services {
            return Ok(seen[0].0);
        }
        ensure!(
            Instant::now() < deadline,
            "the controllers did not agree on the mesh within {STEP_TIMEOUT:?}: (version, services) {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The registry file: `services` services with two endpoints each; `bump` sets the
/// address of the first endpoint of `svc-00000`.
fn services_file(services: usize, bump: usize) -> String {
    let mut out = String::with_capacity(services * 160);
    for i in 0..services {
        out.push_str(&format!(
            "[[services]]\nname = \"svc-{i:05}\"\nnamespace = \"ext\"\nports = {{ http = 8080 }}\n"
        ));
        for j in 0..2 {
            let address = if i == 0 && j == 0 {
                changed_address(bump)
            } else {
                let k = i * 2 + j;
                format!("10.{}.{}.{}", (k >> 16) & 255, (k >> 8) & 255, k & 255)
            };
            out.push_str(&format!(
                "[[services.endpoints]]\naddress = \"{address}\"\n"
            ));
        }
    }
    out
}

/// The address `bump` gives `svc-00000`'s first endpoint.
fn changed_address(bump: usize) -> String {
    format!("10.255.{}.{}", (bump / 250) % 250, bump % 250 + 1)
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// Simulated agents

/// Subscribed simulated agents and what they report.
struct Fleet {
    rx: mpsc::UnboundedReceiver<Rec>,
    /// Highest version each agent ACKed.
    latest: Vec<u64>,
    /// The controller each agent is connected to.
    home: Vec<usize>,
    log: Vec<Rec>,
    conns: Vec<quinn::Connection>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Connects `ids[i]` to `targets[i]` (index into `cs`) and subscribes each.
    async fn subscribe(
        endpoint: &quinn::Endpoint,
        ids: &[Identity],
        targets: &[usize],
        cs: &[Controller],
    ) -> Result<Fleet> {
        let (tx, rx) = mpsc::unbounded_channel();
        let sem = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
        let mut connecting = Vec::with_capacity(ids.len());
        for (id, &target) in ids.iter().zip(targets) {
            let cfg = client_config(id)?;
            let (sem, endpoint, control) = (sem.clone(), endpoint.clone(), cs[target].control);
            connecting.push(tokio::spawn(async move {
                let _permit = sem.acquire_owned().await?;
                let conn = endpoint.connect_with(cfg, control, SERVER_NAME)?.await?;
                anyhow::Ok(conn)
            }));
        }
        let mut conns = Vec::with_capacity(ids.len());
        let mut tasks = Vec::with_capacity(ids.len());
        for (i, c) in connecting.into_iter().enumerate() {
            let conn = c.await?.with_context(|| {
                format!("agent {i}: cannot connect to controller {}", targets[i])
            })?;
            let (tx, c2) = (tx.clone(), conn.clone());
            tasks.push(tokio::spawn(async move {
                // An agent of a killed controller ends with an error: expected here.
                let _ = run_agent(i, c2, tx).await;
            }));
            conns.push(conn);
        }
        Ok(Fleet {
            rx,
            latest: vec![0; ids.len()],
            home: targets.to_vec(),
            log: Vec::new(),
            conns,
            tasks,
        })
    }

    fn take(&mut self, r: Rec) {
        self.latest[r.agent] = self.latest[r.agent].max(r.version);
        self.log.push(r);
    }

    fn drain(&mut self) {
        while let Ok(r) = self.rx.try_recv() {
            self.take(r);
        }
    }

    /// Agents (of the given controllers) that have not ACKed `version` yet.
    fn behind(&self, version: u64, homes: &[usize]) -> usize {
        (0..self.latest.len())
            .filter(|a| homes.contains(&self.home[*a]) && self.latest[*a] < version)
            .count()
    }

    /// Waits until every agent whose controller is in `homes` ACKed `version` or later.
    async fn wait_all(&mut self, version: u64, homes: &[usize]) -> Result<()> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            self.drain();
            let behind = self.behind(version, homes);
            if behind == 0 {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{behind} agents did not ACK version {version} within {STEP_TIMEOUT:?}"
            );
            match tokio::time::timeout(Duration::from_millis(200), self.rx.recv()).await {
                Ok(Some(r)) => self.take(r),
                Ok(None) => bail!("every simulated agent's stream ended"),
                Err(_) => {}
            }
        }
    }

    /// When each agent first ACKed `version` or later.
    fn acked_at(&self, version: u64) -> BTreeMap<usize, Instant> {
        let mut done: BTreeMap<usize, Instant> = BTreeMap::new();
        for r in self.log.iter().filter(|r| r.version >= version) {
            let e = done.entry(r.agent).or_insert(r.acked);
            *e = (*e).min(r.acked);
        }
        done
    }

    fn close(self) {
        for c in &self.conns {
            c.close(0u32.into(), b"bench done");
        }
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Rewrites the file and finds the commit by polling the leader; returns (t0, version).
async fn change_and_find_commit(
    leader: &Controller,
    path: &Path,
    text: &str,
    before: u64,
) -> Result<(Instant, u64)> {
    write_atomic(path, text)?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut last_old = Instant::now();
    loop {
        let sent = Instant::now();
        let (v, _) = leader.mesh().await?;
        if v > before {
            return Ok((last_old, v));
        }
        last_old = sent;
        ensure!(
            Instant::now() < deadline,
            "the file change did not reach the leader's mesh within {STEP_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------
// Parts 2 and 3

struct Convergence {
    agents: usize,
    changes: usize,
    join_secs: f64,
    subscribe_secs: f64,
    per_agent_ms: Vec<f64>,
    all_acked_ms: Vec<f64>,
    per_controller_all_ms: Vec<Vec<f64>>,
    agents_per_controller: Vec<usize>,
}

struct Trial {
    killed: usize,
    new_leader: usize,
    leader_ms: f64,
    first_ms: f64,
    all_ms: f64,
    version: u64,
}

#[allow(
    clippy::too_many_lines,
    reason = "a benchmark script reads best as one sequence of steps"
)]
async fn ha_part(
    args: &Args,
    root: &Path,
    members: &[Member],
    http: &reqwest::Client,
) -> Result<(Convergence, Vec<Trial>)> {
    let kek = root.join("ca-kek");
    std::fs::write(&kek, "cd".repeat(32))?;
    let services_path = root.join("registry.toml");
    let mut bump = 0usize;
    write_atomic(&services_path, &services_file(args.services, bump))?;
    let endpoints = members
        .iter()
        .map(|m| format!("{:?}", m.url))
        .collect::<Vec<_>>()
        .join(", ");
    let toml = format!(
        "[mesh]\nagent_grace = \"10m\"\n\n[store]\nbackend = \"etcd\"\nendpoints = [{endpoints}]\nkek_file = {:?}\nlease_ttl = \"{}s\"\n\n[[sources.file]]\nname = \"ext\"\npath = {:?}\n",
        kek.to_str().context("utf-8 path")?,
        args.lease_ttl_secs,
        services_path.to_str().context("utf-8 path")?
    );
    let mut cs = Vec::with_capacity(CONTROLLERS);
    for i in 0..CONTROLLERS {
        // One after the other: the first one initialises the CA.
        cs.push(Controller::start(root, i, &toml, http).await?);
    }
    let leader = one_leader(&cs).await?;
    let v0 = in_step(&cs, args.services as u64).await?;
    eprintln!("controllers up, leader: controller {leader}, mesh version {v0}");

    // Identities: joins over QUIC, round robin over the controllers.
    let identities_needed = args.agents.max(CONTROLLERS * args.failover_agents);
    cs[0]
        .post(
            "/v1/groups",
            json!({"name": "bench", "namespace": "default", "service_account": "bench"}),
        )
        .await?;
    let token = cs[0]
        .post(
            "/v1/tokens",
            json!({"group": "bench", "uses": identities_needed, "ttl_secs": 3600}),
        )
        .await?;
    let token = JoinToken::decode(token["token"].as_str().context("POST /v1/tokens: token")?)
        .map_err(|e| anyhow::anyhow!("the token the controller made: {e}"))?;
    let started = Instant::now();
    let sem = Arc::new(Semaphore::new(JOIN_CONCURRENCY));
    let mut joins = Vec::with_capacity(identities_needed);
    for i in 0..identities_needed {
        let mut token = token.clone();
        token.controller = cs[i % CONTROLLERS].control.to_string();
        let sem = sem.clone();
        let state = StateDir::new(root.join(format!("agents/vm-{i:04}")));
        joins.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            join(&token, &state, &format!("vm-{i:04}"), false)
                .await
                .map_err(|e| anyhow::anyhow!("join {i}: {e}"))
        }));
    }
    let mut identities = Vec::with_capacity(identities_needed);
    for j in joins {
        identities.push(j.await??);
    }
    let join_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{identities_needed} joins over QUIC ({JOIN_CONCURRENCY} in flight, round robin over {CONTROLLERS} controllers) in {join_secs:.1} s"
    );

    // Part 2: convergence with the agents spread over the controllers.
    let (endpoint, rcvbuf) = client_endpoint(args.client_rcvbuf)?;
    eprintln!("agents' shared UDP socket: receive buffer {rcvbuf} bytes");
    let targets: Vec<usize> = (0..args.agents).map(|i| i % CONTROLLERS).collect();
    let started = Instant::now();
    let mut fleet = Fleet::subscribe(&endpoint, &identities[..args.agents], &targets, &cs).await?;
    let all: Vec<usize> = (0..CONTROLLERS).collect();
    let version = in_step(&cs, args.services as u64).await?;
    fleet.wait_all(version, &all).await?;
    let subscribe_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} agents subscribed and ACKed version {version} in {subscribe_secs:.1} s",
        args.agents
    );
    let mut per_agent_ms = Vec::new();
    let mut all_acked_ms = Vec::new();
    let mut per_controller_all_ms = vec![Vec::new(); CONTROLLERS];
    for c in 0..args.changes {
        bump += 1;
        let leader = one_leader(&cs).await?;
        let (before, _) = cs[leader].mesh().await?;
        let (t0, v) = change_and_find_commit(
            &cs[leader],
            &services_path,
            &services_file(args.services, bump),
            before,
        )
        .await?;
        fleet.wait_all(v, &all).await?;
        let done = fleet.acked_at(v);
        ensure!(done.len() == args.agents, "not every agent reported");
        let mut worst = [0.0f64; CONTROLLERS];
        for (agent, at) in &done {
            let lat = ms(at.saturating_duration_since(t0));
            per_agent_ms.push(lat);
            let home = fleet.home[*agent];
            worst[home] = worst[home].max(lat);
        }
        let max = worst.iter().copied().fold(0.0, f64::max);
        all_acked_ms.push(max);
        for (i, w) in worst.iter().enumerate() {
            per_controller_all_ms[i].push(*w);
        }
        fleet.log.retain(|r| r.version > v);
        eprintln!(
            "change {}/{}: version {v}, all {} agents ACKed {max:.1} ms after t0 (per controller {})",
            c + 1,
            args.changes,
            args.agents,
            worst
                .iter()
                .map(|w| format!("{w:.1}"))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    fleet.close();
    let convergence = Convergence {
        agents: args.agents,
        changes: args.changes,
        join_secs,
        subscribe_secs,
        per_agent_ms,
        all_acked_ms,
        per_controller_all_ms,
        agents_per_controller: (0..CONTROLLERS)
            .map(|c| targets.iter().filter(|t| **t == c).count())
            .collect(),
    };

    // Part 3: failover.
    let k = args.failover_agents;
    let ids = &identities[..CONTROLLERS * k];
    let targets: Vec<usize> = (0..CONTROLLERS * k).map(|i| i % CONTROLLERS).collect();
    let mut trials = Vec::with_capacity(args.trials);
    for t in 0..args.trials {
        let leader = one_leader(&cs).await?;
        let before = in_step(&cs, args.services as u64).await?;
        let mut fleet = Fleet::subscribe(&endpoint, ids, &targets, &cs).await?;
        fleet.wait_all(before, &all).await?;
        bump += 1;
        let text = services_file(args.services, bump);
        let killed_at = cs[leader].kill9().context("the leader was not running")?;
        write_atomic(&services_path, &text)?;
        let survivors: Vec<usize> = all.iter().copied().filter(|c| *c != leader).collect();
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut new_leader: Option<(usize, Instant)> = None;
        let mut next_poll = Instant::now();
        loop {
            fleet.drain();
            if new_leader.is_none() && Instant::now() >= next_poll {
                for &s in &survivors {
                    if cs[s].leads().await {
                        new_leader = Some((s, Instant::now()));
                    }
                }
                next_poll = Instant::now() + LEADER_POLL;
            }
            if new_leader.is_some() && fleet.behind(before + 1, &survivors) == 0 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "trial {}: after kill -9 of controller {leader}: new leader {:?}, {} surviving agents without the change after {STEP_TIMEOUT:?}",
                t + 1,
                new_leader.map(|(s, _)| s),
                fleet.behind(before + 1, &survivors)
            );
            if let Ok(Some(r)) =
                tokio::time::timeout(Duration::from_millis(10), fleet.rx.recv()).await
            {
                fleet.take(r);
            }
        }
        let (new_leader, leader_at) = new_leader.context("no new leader")?;
        let acked: Vec<Instant> = fleet
            .acked_at(before + 1)
            .into_iter()
            .filter(|(a, _)| fleet.home[*a] != leader)
            .map(|(_, at)| at)
            .collect();
        let first = acked.iter().min().copied().context("no ACK")?;
        let last = acked.iter().max().copied().context("no ACK")?;
        let version = fleet
            .log
            .iter()
            .filter(|r| r.version > before)
            .map(|r| r.version)
            .min()
            .context("no new version")?;
        // The new version is the change: the mesh moved by that one version, and the
        // changed address is in the new leader's registry.
        let (now_version, _) = cs[new_leader].mesh().await?;
        ensure!(
            now_version == version,
            "trial {}: the mesh went from version {before} to {now_version} after the kill, the agents' first new version was {version}: the first new version may not be the file change, so its time would not be the failover time",
            t + 1
        );
        let registry = cs[new_leader].get("/v1/registry").await?.to_string();
        ensure!(
            registry.contains(&format!("\"{}\"", changed_address(bump))),
            "trial {}: version {version} reached the agents but {} is not in controller {new_leader}'s registry",
            t + 1,
            changed_address(bump)
        );
        let trial = Trial {
            killed: leader,
            new_leader,
            leader_ms: ms(leader_at.saturating_duration_since(killed_at)),
            first_ms: ms(first.saturating_duration_since(killed_at)),
            all_ms: ms(last.saturating_duration_since(killed_at)),
            version,
        };
        eprintln!(
            "trial {}/{}: killed controller {}; controller {} leads after {:.0} ms; first surviving agent ACKed version {} after {:.0} ms, all {} after {:.0} ms",
            t + 1,
            args.trials,
            trial.killed,
            trial.new_leader,
            trial.leader_ms,
            trial.version,
            trial.first_ms,
            2 * k,
            trial.all_ms
        );
        trials.push(trial);
        fleet.close();
        cs[leader].spawn().await?;
    }
    Ok((convergence, trials))
}

// ---------------------------------------------------------------------------------
// Report

struct Report {
    nproc: usize,
    load_start: String,
    load_end: String,
    etcd_version: String,
    enroll: Vec<EnrollRow>,
    convergence: Convergence,
    trials: Vec<Trial>,
}

fn print_report(args: &Args, r: &Report) {
    println!(
        "machine: {} CPUs online; load average {} at the start, {} at the end; {}",
        r.nproc, r.load_start, r.load_end, r.etcd_version
    );
    println!(
        "\n== joins and renewals in process (Enroller, {} in flight, {} each; etcd: {MEMBERS} members on this machine)",
        args.in_flight, args.joins
    );
    let sled = r.enroll.iter().find(|e| e.backend == "sled");
    println!(
        "{:<8} {:>11} {:>9} {:>12} {:>13} {:>16}",
        "backend", "controllers", "joins/s", "renewals/s", "joins etcd/sled", "renewals etcd/sled"
    );
    for e in &r.enroll {
        let (jr, rr) = match sled {
            Some(s) if e.backend != "sled" => (
                format!("{:.3}", e.joins_per_sec() / s.joins_per_sec()),
                format!("{:.3}", e.renewals_per_sec() / s.renewals_per_sec()),
            ),
            _ => ("-".into(), "-".into()),
        };
        println!(
            "{:<8} {:>11} {:>9.0} {:>12.0} {:>15} {:>18}",
            e.backend,
            e.controllers,
            e.joins_per_sec(),
            e.renewals_per_sec(),
            jr,
            rr
        );
    }
    let c = &r.convergence;
    let (a50, a99, amax) = summary(&c.per_agent_ms);
    let (all50, all99, allmax) = summary(&c.all_acked_ms);
    println!(
        "\n== push convergence: {} agents over {CONTROLLERS} controllers ({}), {} changes, t0 = commit seen on the leader",
        c.agents,
        c.agents_per_controller
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(" + "),
        c.changes
    );
    println!("{:<34} {:>9} {:>9} {:>9}", "", "p50 ms", "p99 ms", "max ms");
    println!(
        "{:<34} {a50:>9.1} {a99:>9.1} {amax:>9.1}",
        "per agent: t0 → its ACK"
    );
    println!(
        "{:<34} {all50:>9.1} {all99:>9.1} {allmax:>9.1}",
        "per change: t0 → all ACKs"
    );
    for (i, v) in c.per_controller_all_ms.iter().enumerate() {
        let (p50, p99, max) = summary(v);
        println!(
            "{:<34} {p50:>9.1} {p99:>9.1} {max:>9.1}",
            format!("  agents of controller {i}")
        );
    }
    println!(
        "(setup: {} joins over QUIC in {:.1} s = {:.0}/s, round robin over the controllers; subscriptions and snapshots in {:.1} s)",
        c.agents.max(CONTROLLERS * args.failover_agents),
        c.join_secs,
        c.agents.max(CONTROLLERS * args.failover_agents) as f64 / c.join_secs,
        c.subscribe_secs
    );
    println!(
        "\n== failover: kill -9 of the leader, then a registry change at once; {} trials, lease_ttl {} s, {} agents per controller",
        r.trials.len(),
        args.lease_ttl_secs,
        args.failover_agents
    );
    println!(
        "{:<44} {:>10} {:>10}",
        "from the kill to", "median ms", "max ms"
    );
    let rows: [(&str, Vec<f64>); 3] = [
        (
            "a new leader reported (/metrics)",
            r.trials.iter().map(|t| t.leader_ms).collect(),
        ),
        (
            "first surviving agent ACKed the change",
            r.trials.iter().map(|t| t.first_ms).collect(),
        ),
        (
            "every surviving agent ACKed the change",
            r.trials.iter().map(|t| t.all_ms).collect(),
        ),
    ];
    for (what, v) in &rows {
        let s = sorted(v.clone());
        println!(
            "{what:<44} {:>10.0} {:>10.0}",
            percentile(&s, 0.5),
            s.last().copied().unwrap_or(f64::NAN)
        );
    }
}

fn to_json(args: &Args, r: &Report) -> Value {
    let sled = r.enroll.iter().find(|e| e.backend == "sled");
    let c = &r.convergence;
    let (a50, a99, amax) = summary(&c.per_agent_ms);
    let (all50, all99, allmax) = summary(&c.all_acked_ms);
    let med_max = |v: Vec<f64>| {
        let s = sorted(v);
        json!({"median_ms": percentile(&s, 0.5), "max_ms": s.last().copied()})
    };
    json!({
        "benchmark": "ha_bench",
        "unix_time": now_unix(),
        "machine": {
            "nproc": r.nproc,
            "load_average_start": r.load_start,
            "load_average_end": r.load_end,
            "etcd": r.etcd_version,
            "etcd_members": MEMBERS,
        },
        "args": {
            "joins": args.joins,
            "in_flight": args.in_flight,
            "agents": args.agents,
            "changes": args.changes,
            "trials": args.trials,
            "failover_agents": args.failover_agents,
            "lease_ttl_secs": args.lease_ttl_secs,
            "services": args.services,
        },
        "enroll": r.enroll.iter().map(|e| json!({
            "backend": e.backend,
            "controllers": e.controllers,
            "joins": e.joins,
            "join_seconds": e.join_secs,
            "joins_per_second": e.joins_per_sec(),
            "renewals": e.renewals,
            "renew_seconds": e.renew_secs,
            "renewals_per_second": e.renewals_per_sec(),
            "joins_ratio_to_sled": sled.map(|s| e.joins_per_sec() / s.joins_per_sec()),
            "renewals_ratio_to_sled": sled.map(|s| e.renewals_per_sec() / s.renewals_per_sec()),
        })).collect::<Vec<_>>(),
        "convergence": {
            "agents": c.agents,
            "agents_per_controller": c.agents_per_controller,
            "changes": c.changes,
            "quic_join_seconds": c.join_secs,
            "subscribe_seconds": c.subscribe_secs,
            "per_agent_ms": {"p50": a50, "p99": a99, "max": amax},
            "all_acked_ms": {"p50": all50, "p99": all99, "max": allmax},
            "per_controller_all_acked_ms": c.per_controller_all_ms.iter().map(|v| {
                let (p50, p99, max) = summary(v);
                json!({"p50": p50, "p99": p99, "max": max})
            }).collect::<Vec<_>>(),
        },
        "failover": {
            "trials": r.trials.iter().map(|t| json!({
                "killed": t.killed,
                "new_leader": t.new_leader,
                "new_leader_ms": t.leader_ms,
                "first_agent_ms": t.first_ms,
                "all_agents_ms": t.all_ms,
                "version": t.version,
            })).collect::<Vec<_>>(),
            "new_leader": med_max(r.trials.iter().map(|t| t.leader_ms).collect()),
            "first_agent": med_max(r.trials.iter().map(|t| t.first_ms).collect()),
            "all_agents": med_max(r.trials.iter().map(|t| t.all_ms).collect()),
        },
    })
}

async fn run(args: &Args) -> Result<Report> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let etcd_version = etcd_version()?;
    let load_start = load_average();
    println!(
        "ha_bench: {} CPUs online, load average {load_start}; {etcd_version}",
        nproc()
    );
    let root = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::Builder::new().prefix("ha-bench-").tempdir_in(d)?
        }
        None => tempfile::Builder::new().prefix("ha-bench-").tempdir()?,
    };
    let root_path = root.path().to_owned();
    if args.keep {
        eprintln!("keeping {} (etcd and controller logs)", root_path.display());
    }
    let http = reqwest::Client::new();
    let result = async {
        let members = start_cluster(&root_path, MEMBERS, &http).await?;
        eprintln!(
            "etcd: {MEMBERS} members at {}",
            members
                .iter()
                .map(|m| m.url.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        eprintln!("part 1: joins and renewals, sled and etcd");
        let enroll = enroll_part(args, &root_path, &members).await?;
        eprintln!("part 2 and 3: three controllers on etcd");
        let (convergence, trials) = ha_part(args, &root_path, &members, &http).await?;
        anyhow::Ok((enroll, convergence, trials))
    }
    .await;
    // Every child is killed by now (their handles were dropped).
    if args.keep {
        let _ = root.keep();
    }
    let (enroll, convergence, trials) = result?;
    Ok(Report {
        nproc: nproc(),
        load_start,
        load_end: load_average(),
        etcd_version,
        enroll,
        convergence,
        trials,
    })
}

fn main() -> Result<()> {
    let Some(args) = parse_args(std::env::args().skip(1))? else {
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        tokio::select! {
            r = run(&args) => r,
            // Dropping `run` drops the etcd members and controllers: each kills its child.
            _ = tokio::signal::ctrl_c() => bail!("interrupted; every etcd member and controller was stopped"),
        }
    })?;
    print_report(&args, &report);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&to_json(&args, &report))?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>> {
        parse_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn defaults_are_the_issue_s_figures() {
        let a = parse(&[]).unwrap().unwrap();
        assert_eq!((a.agents, a.trials, a.lease_ttl_secs), (1000, 10, 10));
    }

    #[test]
    fn values_are_read_and_bad_ones_named() {
        let a = parse(&["--joins", "50", "--lease-ttl", "3", "--keep"])
            .unwrap()
            .unwrap();
        assert_eq!((a.joins, a.lease_ttl_secs, a.keep), (50, 3, true));
        let e = parse(&["--lease-ttl", "1"]).unwrap_err().to_string();
        assert!(e.contains("--lease-ttl 1"), "{e}");
        let e = parse(&["--agents", "many"]).unwrap_err().to_string();
        assert!(e.contains("--agents \"many\""), "{e}");
        let e = parse(&["--trials", "0"]).unwrap_err().to_string();
        assert!(e.contains("--trials 0"), "{e}");
        assert!(parse(&["--frobnicate"]).is_err());
        assert!(parse(&["--help"]).unwrap().is_none());
    }

    #[test]
    fn the_changed_address_is_in_the_file() {
        let text = services_file(3, 7);
        assert!(text.contains(&format!("\"{}\"", changed_address(7))));
        assert!(!text.contains(&format!("\"{}\"", changed_address(8))));
    }
}
