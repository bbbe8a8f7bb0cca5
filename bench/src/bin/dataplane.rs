//! Data-plane benchmark: the same client and server, side by side in one run, over
//!
//! 1. direct TCP between two network namespaces ("VMs"),
//! 2. two Causeway agents, QUIC tunnel (capture on, the client dials the service VIP),
//! 3. two Causeway agents, TCP + TLS fallback (the tunnel's UDP dropped),
//! 4. stunnel4 client → stunnel4 server with mutual TLS (the classic baseline).
//!
//! Measured per path: latency of 1 KiB request/response at a fixed 1,000 requests/s on one
//! connection (p50/p99, from the moment each request is written), bulk throughput of one
//! connection, new connections per second (each one 1 KiB request/response, 10 clients at
//! once: what a tunnel that pools and multiplexes saves), and CPU seconds of each proxy
//! process during the latency and connection runs. For the
//! agents, resident memory idle and with 10,000 concurrent connections through them over
//! QUIC (8,000 over the TCP + TLS fallback, which takes two descriptors per connection),
//! and, for bulk, the CPU every process and the whole machine spent per GB.
//!
//! Needs root (it creates and removes its namespaces), the release binaries of the
//! controller, agent and causewayctl (`CAUSEWAY_BIN_DIR`, set by bench/run.sh), stunnel4
//! and prlimit. Run: `bench/run.sh dataplane`.
//!
//! `DATAPLANE_HOLD=0` skips the held-connection phases (memory at 10,000 connections), for
//! quick iterations on latency, CPU and throughput. `DATAPLANE_MTU=9000` runs every path
//! over links with that MTU (jumbo frames) instead of 1500. `DATAPLANE_ROUNDS=N` runs only
//! the latency phase, N rounds of every path (each started afresh in each round, the order
//! rotated from round to round), and reports each path's spread of p50/p99 across rounds:
//! one run's p99 on a shared host says little, its median over rounds says more.
//! `DATAPLANE_PHASE=bulk` makes the rounds measure bulk throughput instead, with each
//! path's ratio to the same round's stunnel4. `DATAPLANE_AGENT_B=PATH` adds to the rounds
//! a path through two agents of another build (QUIC): an A/B comparison in one run.
//! `DATAPLANE_LOG=FILTER` is the `RUST_LOG` of the controller and the agents (`warn` by
//! default); `DATAPLANE_KEEP=1` keeps the run's directory with their logs (named at the
//! start).
//! `DATAPLANE_PUSH_MS=N` makes every round's measurement run while a config change is
//! pushed to the agents every N ms (a policy that selects no workload, applied and
//! deleted in turn): the push-during-traffic latency.
//!
//! `DATAPLANE_HTTP=1` is the HTTP mode (issues 20, 21 and 22; see [`run_http_rounds`]):
//! an HTTP/1.1 keep-alive load (a hyper client, `DATAPLANE_HTTP_CONNS` connections, 16 by
//! default, each sending its next request as soon as the last answer is read, for
//! `DATAPLANE_HTTP_SECS`, 10 by default) against a small hyper app, in
//! `DATAPLANE_ROUNDS` rounds (3 by default) of: direct; two agents with the port declared
//! `tcp:` (L4 splice); the same app port declared `http:` (the agents' HTTP proxy); HTTP
//! with a RequestAuthentication (inline ES256 key set) and a claims AuthorizationPolicy,
//! every request carrying a valid token; HTTP with a 3-route VirtualService and its
//! DestinationRule (skipped with a message when `causewayctl apply` refuses the kind);
//! and, when `DATAPLANE_AGENT_TOML_EXTRA` is set, HTTP through agents whose config file
//! is that TOML (the hook for "telemetry off" until the agent config has a switch); with
//! `DATAPLANE_AGENT_B=PATH` that path runs agents of that other build (an A/B of the HTTP
//! proxy in the same rounds; with the TOML too when both are set).
//! `DATAPLANE_HTTP_PATHS=1,2,3` runs only those agent paths (numbered in the order above,
//! from L4 = 1; direct always runs). It
//! lives here rather than in a program of its own because it is the same lab (controller,
//! two joined agents, namespaces, rounds, CPU and memory readings), only with another
//! client, server and set of paths; the HTTP client, server and token are in the bench
//! library (`causeway_bench::http`).
//!
//! `DATAPLANE_POLICIES=N` is the policy mode (issue 19; see [`run_policy_rounds`]): new
//! connections per second through the two agents (their default transport), in `DATAPLANE_ROUNDS` rounds (3
//! by default) of two paths, without policies and with `N` AuthorizationPolicies applied
//! by `causewayctl apply` (50 of them selecting the server's workload, each ALLOWing the
//! client, the rest selecting other workloads and namespaces: `causeway_bench::policy_set`),
//! each run `DATAPLANE_CONNECT_SECS` (5 by default) with 10 clients; prints the median of
//! the rounds' ratios with PASS or FAIL against issue 19's 0.9.
//! `ZTUNNEL_BIN=PATH` is the side-by-side mode of issue 25 (see the `versus` module): Istio's
//! ztunnel (dedicated mode, local config, fake CA) as one more path in the same rounds as
//! direct TCP, both Causeway transports, stunnel4 and haproxy (the floors), over keep-alive,
//! serial, new-connection, one-stream and 8-stream bulk workloads, every figure also given
//! as a ratio to ztunnel's (`DATAPLANE_ROUNDS`, 3 by default; `DATAPLANE_SECS` per workload,
//! 5 by default; `DATAPLANE_AGENT_B` adds a TCP + TLS path through another agent build).
//!
//! The same program is the client and the server: `dataplane serve PORT`,
//! `dataplane latency ADDR RATE SECS`, `dataplane bulk ADDR SECS`, `dataplane hold ADDR N`,
//! `dataplane connect ADDR SECS CLIENTS`, `dataplane http-serve PORT...`,
//! `dataplane http-load ADDR HOST PATH SECS CONNS [TOKEN]`,
//! `dataplane http-probe ADDR HOST PATH [TOKEN]`.
#![allow(clippy::disallowed_methods, reason = "a benchmark driver blocks")]

// The ztunnel side-by-side mode (`ZTUNNEL_BIN`), in a file of its own.
#[path = "dataplane/versus.rs"]
mod versus;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use causeway_bench::percentile;
use causeway_tests::netns::{Lab, Node};
use causeway_tests::{bin, wait_for};
use serde_json::{Value, json};

const REQ: usize = 1024;
const PORT: u16 = 8080;
const RATE: u32 = 1000;
const LATENCY_SECS: u64 = 10;
const BULK_SECS: u64 = 5;
/// New connections, each carrying one 1 KiB request/response: seconds and clients at once.
const CONNECT_SECS: u64 = 3;
const CONNECT_CLIENTS: usize = 10;
const CONNS: usize = 10_000;
/// Connections held over the TCP + TLS fallback: as many as over QUIC, now that it is
/// multiplexed (one descriptor per connection in each agent, plus the shared one).
const TLS_CONNS: usize = CONNS;
/// Longest wait for the held connections to be established.
const HOLD_WAIT: Duration = Duration::from_secs(180);
const WAIT: Duration = Duration::from_secs(60);
/// HTTP mode: the app port declared `http:` (the one declared `tcp:` is [`PORT`]).
const HTTP_PORT: u16 = 8081;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("missing argument {i}"))
    };
    match args.first().map(String::as_str) {
        Some("serve") => serve(a(1)?.parse()?),
        Some("latency") => latency(a(1)?.parse()?, a(2)?.parse()?, a(3)?.parse()?),
        Some("bulk") => bulk(a(1)?.parse()?, a(2)?.parse()?),
        Some("hold") => hold(a(1)?.parse()?, a(2)?.parse()?),
        Some("connect") => connect_rate(a(1)?.parse()?, a(2)?.parse()?, a(3)?.parse()?),
        Some("http-serve") => {
            let ports = args[1..]
                .iter()
                .map(|p| p.parse::<u16>())
                .collect::<Result<Vec<_>, _>>()?;
            tokio_rt()?.block_on(causeway_bench::http::serve(&ports))
        }
        Some("http-load") => {
            let t = http_target(&args, 6)?;
            let v = tokio_rt()?.block_on(causeway_bench::http::load(
                &t,
                a(4)?.parse()?,
                a(5)?.parse()?,
            ))?;
            println!("{v}");
            Ok(())
        }
        Some(p) if p.starts_with("vs-") => versus::client(&args),
        Some("http-probe") => {
            let t = http_target(&args, 4)?;
            println!("{}", tokio_rt()?.block_on(causeway_bench::http::probe(&t))?);
            Ok(())
        }
        _ => {
            let json_out = args
                .iter()
                .position(|x| x == "--json")
                .and_then(|i| args.get(i + 1))
                .map(PathBuf::from);
            orchestrate(json_out.as_deref())
        }
    }
}

// ---------------------------------------------------------------- the server and clients

/// The runtime of the HTTP server and clients: two worker threads (the lab has two VMs on
/// a small machine; the TCP server above has one, the agents their own).
fn tokio_rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// `ADDR HOST PATH ...` of `http-load` and `http-probe`, the token (if any) at `token_at`.
fn http_target(args: &[String], token_at: usize) -> anyhow::Result<causeway_bench::http::Target> {
    let get = |i: usize| {
        args.get(i)
            .cloned()
            .with_context(|| format!("missing argument {i}"))
    };
    Ok(causeway_bench::http::Target {
        addr: get(1)?.parse()?,
        host: get(2)?,
        path: get(3)?,
        token: args.get(token_at).cloned(),
    })
}

/// Server: the first byte of a connection picks the mode. `E`: echo 1 KiB messages; `B`:
/// count bytes until end of stream, answer the count; `H`: answer one byte, hold.
fn serve(port: u16) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let l = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
        loop {
            let (mut s, _) = l.accept().await?;
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut mode = [0u8; 1];
                if s.read_exact(&mut mode).await.is_err() {
                    return;
                }
                match mode[0] {
                    b'E' => {
                        let mut buf = [0u8; REQ];
                        while s.read_exact(&mut buf).await.is_ok() {
                            if s.write_all(&buf).await.is_err() {
                                return;
                            }
                        }
                    }
                    b'B' => {
                        let mut buf = vec![0u8; 256 * 1024];
                        let mut n = 0u64;
                        while let Ok(k) = s.read(&mut buf).await {
                            if k == 0 {
                                break;
                            }
                            n += k as u64;
                        }
                        let _ = s.write_all(&n.to_be_bytes()).await;
                    }
                    _ => {
                        let _ = s.write_all(b"h").await;
                        let mut b = [0u8; 1];
                        let _ = s.read(&mut b).await;
                    }
                }
            });
        }
    })
}

/// Client: `rate` requests/s of 1 KiB on one connection for `secs`; prints JSON.
fn latency(addr: SocketAddr, rate: u32, secs: u64) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.write_all(b"E")?;
    let req = [0x5au8; REQ];
    let mut resp = [0u8; REQ];
    // Warm up (pooled tunnel connection, caches).
    for _ in 0..200 {
        s.write_all(&req)?;
        s.read_exact(&mut resp)?;
    }
    let interval = Duration::from_secs(1) / rate;
    let n = u64::from(rate) * secs;
    let mut samples = Vec::with_capacity(n as usize);
    let start = Instant::now();
    for i in 0..n {
        let at = start + interval * u32::try_from(i).unwrap_or(u32::MAX);
        loop {
            let now = Instant::now();
            if now >= at {
                break;
            }
            let left = at - now;
            if left > Duration::from_micros(200) {
                std::thread::sleep(left - Duration::from_micros(150));
            } else {
                std::hint::spin_loop();
            }
        }
        let t0 = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut resp)?;
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    let wall = start.elapsed().as_secs_f64();
    samples.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "requests": n,
            "wall_s": wall,
            "p50_us": percentile(&samples, 0.50),
            "p90_us": percentile(&samples, 0.90),
            "p99_us": percentile(&samples, 0.99),
            "p999_us": percentile(&samples, 0.999),
            "max_us": samples.last().copied().unwrap_or(f64::NAN),
        })
    );
    Ok(())
}

/// Client: one connection writes as fast as it can for `secs`; prints JSON.
fn bulk(addr: SocketAddr, secs: u64) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.write_all(b"B")?;
    let buf = vec![0xa5u8; 1 << 20];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        s.write_all(&buf)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut n = [0u8; 8];
    s.read_exact(&mut n)?;
    let wall = start.elapsed().as_secs_f64();
    let bytes = u64::from_be_bytes(n);
    println!(
        "{}",
        json!({
            "bytes": bytes, "wall_s": wall, "gbit_s": bytes as f64 * 8.0 / wall / 1e9,
            "client_cpu_s": cpu_seconds(std::process::id()),
        })
    );
    Ok(())
}

/// Client: `clients` threads each open a connection, send one 1 KiB request, read the
/// answer and close, again and again for `secs`; prints JSON (connections per second and
/// the time of one connection + request, p50/p99).
fn connect_rate(addr: SocketAddr, secs: u64, clients: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    let stop = start + Duration::from_secs(secs);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
                let mut msg = vec![0x5au8; REQ + 1];
                msg[0] = b'E';
                let mut resp = [0u8; REQ];
                let mut samples = Vec::new();
                while Instant::now() < stop {
                    let t0 = Instant::now();
                    let mut s = TcpStream::connect(addr)
                        .with_context(|| format!("connect {addr} (new connection)"))?;
                    s.set_nodelay(true)?;
                    s.write_all(&msg)?;
                    s.read_exact(&mut resp)?;
                    drop(s);
                    samples.push(t0.elapsed().as_secs_f64() * 1e6);
                }
                Ok(samples)
            })
        })
        .collect();
    let mut samples = Vec::new();
    for t in threads {
        samples.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??,
        );
    }
    let wall = start.elapsed().as_secs_f64();
    samples.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "connections": samples.len(),
            "wall_s": wall,
            "per_s": samples.len() as f64 / wall,
            "p50_us": percentile(&samples, 0.50),
            "p90_us": percentile(&samples, 0.90),
            "p99_us": percentile(&samples, 0.99),
            "p999_us": percentile(&samples, 0.999),
        })
    );
    Ok(())
}

/// Client: opens `n` connections, each answered end to end, prints "ready", holds them
/// until its stdin closes.
fn hold(addr: SocketAddr, n: usize) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut conns = Vec::with_capacity(n);
        let mut set = tokio::task::JoinSet::new();
        let mut started = 0;
        while conns.len() < n {
            while started < n && set.len() < 256 {
                started += 1;
                set.spawn(async move {
                    let mut s = tokio::net::TcpStream::connect(addr).await?;
                    s.write_all(b"H").await?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await?;
                    anyhow::Ok(s)
                });
            }
            match set.join_next().await {
                Some(r) => conns.push(r??),
                None => bail!("connections ended early"),
            }
        }
        println!("ready {}", conns.len());
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)
        })
        .await;
        drop(conns);
        Ok(())
    })
}

// ---------------------------------------------------------------- the orchestration

/// A process in a namespace, killed on drop.
struct Proc(Child);

impl Proc {
    /// SIGTERM, then waits for the exit.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(node: &Node, log: &Path, program: &Path, args: &[&str]) -> anyhow::Result<Proc> {
    let f = std::fs::File::create(log)?;
    let child = node
        .cmd("prlimit")
        .arg(nofile_arg())
        .arg(program)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("DATAPLANE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("spawn {}", program.display()))?;
    Ok(Proc(child))
}

fn run_json(node: &Node, me: &Path, args: &[&str]) -> anyhow::Result<Value> {
    let out = node
        .cmd("prlimit")
        .arg(nofile_arg())
        .arg(me)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// This process's hard limit of open files (raising it needs CAP_SYS_RESOURCE, which
/// containers often lack): every process of the benchmark runs with soft = hard.
fn nofile_hard() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|x| x.starts_with("Max open files"))
                .and_then(|x| x.split_whitespace().nth(4)?.parse().ok())
        })
        .unwrap_or(1024)
}

fn nofile_arg() -> String {
    let h = nofile_hard();
    format!("--nofile={h}:{h}")
}

/// utime + stime of a process, in seconds.
/// CPU seconds the whole machine spent busy (user, system, interrupts; not idle, I/O
/// wait or steal), from `/proc/stat`.
fn machine_busy_seconds() -> f64 {
    machine_seconds(&[0, 1, 2, 5, 6])
}

/// CPU seconds the hypervisor gave to others while this VM wanted to run (steal).
fn machine_steal_seconds() -> f64 {
    machine_seconds(&[7])
}

/// The sum of the given columns of `/proc/stat`'s `cpu` line (user nice system idle
/// iowait irq softirq steal), in seconds.
fn machine_seconds(columns: &[usize]) -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let sum: f64 = columns.iter().filter_map(|i| f.get(*i)).sum();
    sum / 100.0
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

/// (VmRSS, VmHWM) in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

struct Run {
    lab: Lab,
    root: PathBuf,
    me: PathBuf,
    admin: String,
}

impl Run {
    fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .lab
            .node("ctl")
            .cmd(bin("causewayctl"))
            .args(args)
            .env("CAUSEWAY_CONTROLLER", &self.admin)
            .env(
                "CAUSEWAY_ADMIN_TOKEN_FILE",
                self.root.join("controller").join("admin.token"),
            )
            .output()?;
        if !out.status.success() {
            bail!(
                "causewayctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    fn agent(&self, vm: &str, state: &Path) -> anyhow::Result<Proc> {
        self.agent_of(&bin("causeway-agent"), vm, state, None)
    }

    /// An agent of `exe` whose tunnel is `transport` ("quic" or "tcp") whatever the
    /// build's default: the paths named after a transport use it.
    fn agent_on(
        &self,
        exe: &Path,
        vm: &str,
        state: &Path,
        transport: &str,
    ) -> anyhow::Result<Proc> {
        let config = self.root.join(format!("transport-{transport}.toml"));
        std::fs::write(
            &config,
            format!("[dataplane]\ntunnel_transport = \"{transport}\"\n"),
        )?;
        self.agent_of(exe, vm, state, Some(&config))
    }

    /// An agent of the binary `exe` in `vm`, with the config file `config` if given.
    fn agent_of(
        &self,
        exe: &Path,
        vm: &str,
        state: &Path,
        config: Option<&Path>,
    ) -> anyhow::Result<Proc> {
        let node = self.lab.node(vm);
        let addr = node.addr.to_string();
        let mut args = vec![
            "run",
            "--state-dir",
            state.to_str().context("path")?,
            "--address",
            &addr,
        ];
        if let Some(c) = config {
            args.extend(["--config", c.to_str().context("path")?]);
        }
        spawn(node, &self.root.join(format!("{vm}.agent.log")), exe, &args)
    }

    /// Latency and bulk from vm1 to `addr`, with the CPU of `procs` during the latency run.
    /// Holds `conns` connections through both agents and reads their memory.
    fn hold(
        &self,
        addr: &str,
        conns: usize,
        client_agent: u32,
        server_agent: u32,
        idle: (f64, f64),
    ) -> anyhow::Result<Value> {
        eprintln!("-- {conns} concurrent connections through both agents");
        let mut holder = self
            .lab
            .node("vm1")
            .cmd("prlimit")
            .arg(nofile_arg())
            .arg(&self.me)
            .args(["hold", addr, &conns.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = holder.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(HOLD_WAIT).unwrap_or_default();
        if !line.starts_with("ready") {
            let _ = holder.kill();
            let _ = holder.wait();
            bail!(
                "holding {conns} connections failed within {HOLD_WAIT:?}: {line:?} (see the agents' logs; open-file limits?)"
            );
        }
        let at_conns = (rss_mib(client_agent), rss_mib(server_agent));
        drop(holder.stdin.take());
        let _ = holder.wait();
        Ok(json!({
            "client_agent_idle_rss": idle.0, "server_agent_idle_rss": idle.1,
            "client_agent_rss_at_conns": at_conns.0.0, "client_agent_peak": at_conns.0.1,
            "server_agent_rss_at_conns": at_conns.1.0, "server_agent_peak": at_conns.1.1,
            "connections": conns,
        }))
    }

    /// Latency and CPU per request, then bulk throughput with the CPU every process on
    /// the path spent on it (client, `server` and each proxy in `procs`).
    fn measure(
        &self,
        name: &str,
        addr: &str,
        server: u32,
        procs: &[(&str, u32)],
    ) -> anyhow::Result<Value> {
        eprintln!("-- {name}: latency at {RATE}/s for {LATENCY_SECS}s");
        let vm1 = self.lab.node("vm1");
        let before: Vec<f64> = procs.iter().map(|(_, p)| cpu_seconds(*p)).collect();
        let lat = run_json(
            vm1,
            &self.me,
            &[
                "latency",
                addr,
                &RATE.to_string(),
                &LATENCY_SECS.to_string(),
            ],
        )?;
        let mut cpu = serde_json::Map::new();
        let requests = lat["requests"].as_f64().unwrap_or(1.0);
        let wall = lat["wall_s"].as_f64().unwrap_or(1.0);
        for ((who, pid), b) in procs.iter().zip(before) {
            let used = cpu_seconds(*pid) - b;
            cpu.insert(
                (*who).to_owned(),
                json!({
                    "cpu_s_per_1k_requests": used / requests * 1000.0,
                    "vcpu_at_rate": used / wall,
                    "rss_mib": rss_mib(*pid).0,
                }),
            );
        }
        eprintln!("-- {name}: bulk for {BULK_SECS}s");
        let before: Vec<f64> = procs.iter().map(|(_, p)| cpu_seconds(*p)).collect();
        let server_before = cpu_seconds(server);
        let machine_before = machine_busy_seconds();
        let steal_before = machine_steal_seconds();
        let mut bulk = run_json(vm1, &self.me, &["bulk", addr, &BULK_SECS.to_string()])?;
        let proxies: f64 = procs
            .iter()
            .zip(before)
            .map(|((_, p), b)| cpu_seconds(*p) - b)
            .sum();
        let server_cpu = cpu_seconds(server) - server_before;
        let machine = machine_busy_seconds() - machine_before;
        let steal = machine_steal_seconds() - steal_before;
        let client_cpu = bulk["client_cpu_s"].as_f64().unwrap_or(f64::NAN);
        let gb = bulk["bytes"].as_f64().unwrap_or(f64::NAN) / 1e9;
        let wall = bulk["wall_s"].as_f64().unwrap_or(f64::NAN);
        bulk["cpu"] = json!({
            "client_s": client_cpu, "server_s": server_cpu, "proxies_s": proxies,
            "total_s_per_gb": (client_cpu + server_cpu + proxies) / gb,
            "proxies_s_per_gb": proxies / gb,
            "processes_cpus_busy": (client_cpu + server_cpu + proxies) / wall,
            "machine_s_per_gb": machine / gb,
            "machine_cpus_busy": machine / wall,
            "machine_cpus_stolen": steal / wall,
        });
        eprintln!("-- {name}: new connections for {CONNECT_SECS}s, {CONNECT_CLIENTS} clients");
        let before: Vec<f64> = procs.iter().map(|(_, p)| cpu_seconds(*p)).collect();
        let mut connect = run_json(
            vm1,
            &self.me,
            &[
                "connect",
                addr,
                &CONNECT_SECS.to_string(),
                &CONNECT_CLIENTS.to_string(),
            ],
        )?;
        let conns = connect["connections"].as_f64().unwrap_or(f64::NAN);
        let per_proxy: serde_json::Map<String, Value> = procs
            .iter()
            .zip(before)
            .map(|((who, p), b)| {
                (
                    (*who).to_owned(),
                    json!((cpu_seconds(*p) - b) / conns * 1000.0),
                )
            })
            .collect();
        connect["cpu_s_per_1k_connections"] = Value::Object(per_proxy);
        let v = json!({ "path": name, "latency": lat, "bulk": bulk, "connect": connect, "proxies": cpu });
        eprintln!("{v}");
        Ok(v)
    }
}

fn orchestrate(json_out: Option<&Path>) -> anyhow::Result<()> {
    causeway_tests::netns::require_root("the data-plane benchmark");
    let need = CONNS as u64 + 1000;
    if nofile_hard() < need {
        bail!(
            "the hard limit of open files is {}, below the {need} that {CONNS} connections need; raise it (ulimit -Hn, LimitNOFILE) and run again",
            nofile_hard()
        );
    }
    let holds = std::env::var("DATAPLANE_HOLD").map_or(true, |v| v != "0");
    let rounds = std::env::var("DATAPLANE_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let me = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_owned();
    // `DATAPLANE_KEEP=1`: the run's directory (every process's log) stays for reading.
    let _dir = if std::env::var("DATAPLANE_KEEP").is_ok_and(|v| v == "1") {
        let kept = dir.keep();
        eprintln!(
            "-- logs and state stay in {} (DATAPLANE_KEEP)",
            kept.display()
        );
        None
    } else {
        Some(dir)
    };
    let lab = Lab::new(&["ctl", "vm1", "vm2"]);
    if let Some(mtu) = std::env::var("DATAPLANE_MTU")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        eprintln!("-- links of the lab at MTU {mtu} (DATAPLANE_MTU)");
        lab.set_mtu(mtu);
    }
    let (vm1, vm2, ctl) = (
        lab.node("vm1").clone(),
        lab.node("vm2").clone(),
        lab.node("ctl").clone(),
    );
    let data = root.join("controller");
    let control = format!("{}:15012", ctl.addr);
    let _controller = spawn(
        &ctl,
        &root.join("controller.log"),
        &bin("causeway-controller"),
        &[
            "--data-dir",
            data.to_str().context("path")?,
            "--admin-listen",
            "127.0.0.1:0",
            "--control-listen",
            &control,
        ],
    )?;
    let start = Instant::now();
    let endpoints: Value = loop {
        if let Some(v) = std::fs::read_to_string(data.join("endpoints.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            break v;
        }
        if start.elapsed() > WAIT {
            bail!(
                "the controller did not start:\n{}",
                std::fs::read_to_string(root.join("controller.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let run = Run {
        admin: endpoints["admin"].as_str().context("admin")?.to_owned(),
        lab,
        root: root.clone(),
        me: me.clone(),
    };
    // HTTP mode: the app's two ports, one declared `tcp:` (L4), one `http:`.
    let http_mode = std::env::var("DATAPLANE_HTTP").is_ok_and(|v| v == "1");
    let web_ports: &[&str] = if http_mode {
        &["tcp:8080", "http:8081"]
    } else {
        &["tcp:8080"]
    };
    for (group, ports) in [("web", web_ports), ("client", &["tcp:7070"][..])] {
        let mut args = vec![
            "group",
            "create",
            group,
            "--namespace",
            "default",
            "--service-account",
            group,
            "--service",
            group,
        ];
        for p in ports.iter().copied() {
            args.extend(["--port", p]);
        }
        run.ctl(&args)?;
    }
    let mut states = Vec::new();
    for (vm, group) in [("vm1", "client"), ("vm2", "web")] {
        let token = run.ctl(&["token", "create", "--group", group])?;
        let state = root.join(vm);
        let out = run
            .lab
            .node(vm)
            .cmd(bin("causeway-agent"))
            .args([
                "join",
                token.trim(),
                "--state-dir",
                state.to_str().context("path")?,
            ])
            .output()?;
        if !out.status.success() {
            bail!("join {vm}: {}", String::from_utf8_lossy(&out.stderr));
        }
        states.push(state);
    }
    // Many short connections (from the client in vm1, from the server-side proxy in vm2
    // to the application): a wide ephemeral range and TIME_WAIT reuse (both per
    // namespace), so the connection phases never run out of local ports. The range starts
    // above the mesh's ports (15001–15053), which a client's ephemeral port must not take.
    for vm in [&vm1, &vm2] {
        vm.sh_ok("sysctl -qw net.ipv4.ip_local_port_range='20000 65000' net.ipv4.tcp_tw_reuse=1");
    }
    let server = if http_mode {
        spawn(
            &vm2,
            &root.join("server.log"),
            &me,
            &["http-serve", &PORT.to_string(), &HTTP_PORT.to_string()],
        )?
    } else {
        spawn(
            &vm2,
            &root.join("server.log"),
            &me,
            &["serve", &PORT.to_string()],
        )?
    };
    std::thread::sleep(Duration::from_millis(300));
    let direct_addr = format!("{}:{PORT}", vm2.addr);
    let mut results = Vec::new();

    // 1. Direct (in rounds mode, measured in each round instead).
    let server_pid = server.0.id();
    if rounds.is_none() && !http_mode {
        results.push(run.measure("direct TCP", &direct_addr, server_pid, &[])?);
    }

    // 2. Two agents, QUIC.
    let a2 = run.agent_on(&bin("causeway-agent"), "vm2", &states[1], "quic")?;
    let a1 = run.agent_on(&bin("causeway-agent"), "vm1", &states[0], "quic")?;
    for (state, agent) in [(&states[1], &a2), (&states[0], &a1)] {
        controller_synced(state, agent.0.id());
    }
    let vip: String = wait_for("vm1 to route the web service", WAIT, || {
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(states[0].join("config.json")).ok()?).ok()?;
        let rules = std::fs::read_to_string(states[0].join("capture.rules")).ok()?;
        rules
            .contains(&format!("-d {}/32 ", vm2.addr))
            .then_some(())?;
        cfg["services"]["default/web"]["vip"]
            .as_str()
            .map(str::to_owned)
    });
    let vip_addr = format!("{vip}:{PORT}");
    if http_mode {
        a1.stop();
        a2.stop();
        let report = run_http_rounds(&run, &states, &vip, rounds.unwrap_or(3))?;
        if let Some(p) = json_out {
            std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
        }
        drop(server);
        return Ok(());
    }
    if let Some(policies) = policy_mode()? {
        a1.stop();
        a2.stop();
        let report = run_policy_rounds(&run, &states, &vip_addr, rounds.unwrap_or(3), policies)?;
        if let Some(p) = json_out {
            std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
        }
        return Ok(());
    }
    // `ZTUNNEL_BIN`: ztunnel side by side with every path (issue 25; see `versus`).
    if let Some(zt) = std::env::var_os("ZTUNNEL_BIN") {
        a1.stop();
        a2.stop();
        let report = versus::run_versus(&run, &states, Path::new(&zt), rounds.unwrap_or(3))?;
        if let Some(p) = json_out {
            std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
        }
        return Ok(());
    }
    if let Some(rounds) = rounds {
        a1.stop();
        a2.stop();
        let phase = match std::env::var("DATAPLANE_PHASE").as_deref() {
            Ok("bulk") => Phase::Bulk,
            Ok("latency") | Err(_) => Phase::Latency,
            Ok(other) => bail!("DATAPLANE_PHASE={other}: expected latency or bulk"),
        };
        let report = run_rounds(&run, &states, &vip_addr, rounds, phase)?;
        if let Some(p) = json_out {
            std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
        }
        return Ok(());
    }
    let idle = (rss_mib(a1.0.id()).0, rss_mib(a2.0.id()).0);
    let mut quic = run.measure(
        "two agents, QUIC",
        &vip_addr,
        server_pid,
        &[("client agent", a1.0.id()), ("server agent", a2.0.id())],
    )?;
    if holds {
        quic["memory_mib"] = run.hold(&vip_addr, CONNS, a1.0.id(), a2.0.id(), idle)?;
    }
    results.push(quic);

    // 3. Two agents, TCP + TLS: fresh agents (their memory is measured from idle), the
    // tunnel's UDP dropped.
    a1.stop();
    a2.stop();
    vm1.sh_ok("iptables -A OUTPUT -p udp --dport 15008 -j DROP");
    let a2 = run.agent_on(&bin("causeway-agent"), "vm2", &states[1], "tcp")?;
    wait_for("vm2's agent to listen on TCP 15008", WAIT, || {
        vm2.sh("ss -ltn | grep -q ':15008 '")
            .status
            .success()
            .then_some(())
    });
    let a1 = run.agent_on(&bin("causeway-agent"), "vm1", &states[0], "tcp")?;
    for (state, agent) in [(&states[1], &a2), (&states[0], &a1)] {
        controller_synced(state, agent.0.id());
    }
    wait_for("vm1 to route again", WAIT, || {
        std::fs::read_to_string(states[0].join("capture.rules"))
            .ok()?
            .contains(&format!("-d {}/32 ", vm2.addr))
            .then_some(())
    });
    let tls_idle = (rss_mib(a1.0.id()).0, rss_mib(a2.0.id()).0);
    let mut tls = run.measure(
        "two agents, TCP + TLS",
        &vip_addr,
        server_pid,
        &[("client agent", a1.0.id()), ("server agent", a2.0.id())],
    )?;
    if holds {
        tls["memory_mib"] = run.hold(&vip_addr, TLS_CONNS, a1.0.id(), a2.0.id(), tls_idle)?;
    }
    results.push(tls);
    // A clean stop removes the agents' capture rules.
    a1.stop();
    a2.stop();
    vm1.sh_ok("iptables -D OUTPUT -p udp --dport 15008 -j DROP");
    for vm in [&vm1, &vm2] {
        if vm.sh_ok("iptables-save").contains("CAUSEWAY") {
            bail!("capture rules left in {} after the agent stopped", vm.ns);
        }
    }

    // 4. stunnel4, mutual TLS.
    let (st_client, st_server) = stunnel(&root, &vm1, &vm2)?;
    results.push(
        run.measure(
            "stunnel4 → stunnel4 (mTLS)",
            "127.0.0.1:9000",
            server_pid,
            &[
                ("client stunnel", st_client.0.id()),
                ("server stunnel", st_server.0.id()),
            ],
        )
        .with_context(|| {
            let log = |f: &str| std::fs::read_to_string(root.join(f)).unwrap_or_default();
            format!(
                "stunnel4 logs:\n{}\n{}",
                log("st-client.log"),
                log("st-server.log")
            )
        })?,
    );
    let st_idle = (rss_mib(st_client.0.id()).0, rss_mib(st_server.0.id()).0);
    drop((st_client, st_server));

    // 5. and 6. haproxy, plain TCP (the floor: what two proxies cost here before any
    // encryption) and mutual TLS, one thread each like the agents and stunnel4.
    match which("haproxy") {
        None => {
            eprintln!("-- haproxy is not installed (apt-get install haproxy): its rows are skipped")
        }
        Some(haproxy) => {
            for tls in [false, true] {
                let name = if tls {
                    "haproxy → haproxy (mTLS)"
                } else {
                    "haproxy → haproxy (plain TCP, the floor)"
                };
                let (c, s) = haproxy_pair(&haproxy, &root, &vm1, &vm2, tls)?;
                results.push(
                    run.measure(
                        name,
                        "127.0.0.1:9100",
                        server_pid,
                        &[("client haproxy", c.0.id()), ("server haproxy", s.0.id())],
                    )
                    .with_context(|| {
                        let log =
                            |f: &str| std::fs::read_to_string(root.join(f)).unwrap_or_default();
                        format!(
                            "haproxy logs:\n{}\n{}",
                            log("hap-client.log"),
                            log("hap-server.log")
                        )
                    })?,
                );
            }
        }
    }

    let report = json!({
        "date": time_now(),
        "rate": RATE, "request_bytes": REQ, "latency_secs": LATENCY_SECS, "bulk_secs": BULK_SECS,
        "results": results,
        "stunnel_rss_mib": st_idle,
    });
    print_table(&report);
    if let Some(p) = json_out {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

/// The paths of [`run_rounds`], in the order of its first round.
const ROUND_PATHS: [&str; 7] = [
    "direct TCP",
    "two agents, QUIC",
    "two agents, QUIC (agent B)",
    "two agents, TCP + TLS",
    "stunnel4 → stunnel4 (mTLS)",
    "haproxy → haproxy (plain TCP, the floor)",
    "haproxy → haproxy (mTLS)",
];

/// The phase [`run_rounds`] measures.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Latency,
    Bulk,
}

/// `DATAPLANE_ROUNDS`: one phase only, `rounds` times for every path, each path started
/// before and stopped after its run, the order rotated by one path per round so no path
/// always follows the same one. Prints every run and, per path, the median and range of
/// its p50, p99 and p99 added to the same round's direct p99 (latency), or of its
/// throughput and its ratio to the same round's stunnel4 (bulk).
fn run_rounds(
    run: &Run,
    states: &[PathBuf],
    vip_addr: &str,
    rounds: usize,
    phase: Phase,
) -> anyhow::Result<Value> {
    let (vm1, vm2) = (run.lab.node("vm1").clone(), run.lab.node("vm2").clone());
    let haproxy = which("haproxy");
    let agent_b = std::env::var_os("DATAPLANE_AGENT_B").map(PathBuf::from);
    if let Some(b) = &agent_b {
        anyhow::ensure!(
            b.is_file(),
            "DATAPLANE_AGENT_B={}: no such file",
            b.display()
        );
    }
    let routed = |state: &Path| {
        wait_for("vm1 to route the web service", WAIT, || {
            std::fs::read_to_string(state.join("capture.rules"))
                .ok()?
                .contains(&format!("-d {}/32 ", vm2.addr))
                .then_some(())
        })
    };
    // `DATAPLANE_PUSH_MS=N`: while each path is measured, a policy that selects no
    // workload is applied and deleted in turn every N ms, so both agents take a config
    // push (apply, publish, cache write with fsync) every N ms under the traffic; the
    // decisions do not change. This is the push-during-traffic figure of issue 18.
    let push_every = std::env::var("DATAPLANE_PUSH_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    let push_policy = run.root.join("push-policy.yaml");
    std::fs::write(
        &push_policy,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bench-push, namespace: default}\nspec:\n  selector:\n    matchLabels: {app: no-such-workload}\n  rules:\n  - from:\n    - source: {principals: [\"causeway.local/ns/default/sa/nobody\"]}\n",
    )?;
    let push = Pusher {
        node: run.lab.node("ctl").clone(),
        admin: run.admin.clone(),
        token: run.root.join("controller").join("admin.token"),
        policy: push_policy,
    };
    let mut runs: Vec<Value> = Vec::new();
    for round in 0..rounds {
        let mut direct_p99 = f64::NAN;
        for k in 0..ROUND_PATHS.len() {
            // Direct first in every round (the others are compared with it), the rest rotated.
            let name = if k == 0 {
                ROUND_PATHS[0]
            } else {
                ROUND_PATHS[1 + (k - 1 + round) % (ROUND_PATHS.len() - 1)]
            };
            let (procs, addr): (Vec<(&str, Proc)>, String) = match name {
                "direct TCP" => (Vec::new(), format!("{}:{PORT}", vm2.addr)),
                "two agents, QUIC" | "two agents, TCP + TLS" | "two agents, QUIC (agent B)" => {
                    let exe = if name.ends_with("(agent B)") {
                        let Some(b) = &agent_b else { continue };
                        b.clone()
                    } else {
                        bin("causeway-agent")
                    };
                    let tcp = name.ends_with("TLS");
                    if tcp {
                        vm1.sh_ok("iptables -A OUTPUT -p udp --dport 15008 -j DROP");
                    }
                    let transport = if tcp { "tcp" } else { "quic" };
                    let a2 = run.agent_on(&exe, "vm2", &states[1], transport)?;
                    let a1 = run.agent_on(&exe, "vm1", &states[0], transport)?;
                    // As in the HTTP rounds: not on the cached config any more, then
                    // routed by the controller's (see `run_http_rounds`).
                    for (state, agent) in [(&states[1], &a2), (&states[0], &a1)] {
                        controller_synced(state, agent.0.id());
                    }
                    routed(&states[0]);
                    (
                        vec![("client agent", a1), ("server agent", a2)],
                        vip_addr.to_owned(),
                    )
                }
                "stunnel4 → stunnel4 (mTLS)" => {
                    let (c, s) = stunnel(&run.root, &vm1, &vm2)?;
                    (
                        vec![("client stunnel", c), ("server stunnel", s)],
                        "127.0.0.1:9000".to_owned(),
                    )
                }
                _ => {
                    let Some(haproxy) = &haproxy else { continue };
                    let tls = name.ends_with("(mTLS)");
                    // haproxy's mTLS uses stunnel4's certificates.
                    if tls && !run.root.join("st-ca.pem").exists() {
                        drop(stunnel(&run.root, &vm1, &vm2)?);
                    }
                    let (c, s) = haproxy_pair(haproxy, &run.root, &vm1, &vm2, tls)?;
                    (
                        vec![("client haproxy", c), ("server haproxy", s)],
                        "127.0.0.1:9100".to_owned(),
                    )
                }
            };
            eprintln!("-- round {}/{rounds}: {name}", round + 1);
            let before: Vec<f64> = procs.iter().map(|(_, p)| cpu_seconds(p.0.id())).collect();
            // `DATAPLANE_PUSH_MS`: config pushes during the measurement (see `pusher`).
            let stop = std::sync::atomic::AtomicBool::new(false);
            let (m, pushes) = std::thread::scope(|s| {
                let pusher = push_every.map(|every| {
                    let (stop, push) = (&stop, &push);
                    s.spawn(move || pusher(push, every, stop))
                });
                let m = match phase {
                    Phase::Latency => run_json(
                        &vm1,
                        &run.me,
                        &[
                            "latency",
                            &addr,
                            &RATE.to_string(),
                            &LATENCY_SECS.to_string(),
                        ],
                    ),
                    Phase::Bulk => {
                        run_json(&vm1, &run.me, &["bulk", &addr, &BULK_SECS.to_string()])
                    }
                };
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let pushes = pusher.map(|p| p.join().unwrap_or(0));
                (m, pushes)
            });
            let mut m = m?;
            if let Some(n) = pushes {
                m["config_pushes"] = json!(n);
            }
            let used: Vec<f64> = procs
                .iter()
                .zip(before)
                .map(|((_, p), b)| cpu_seconds(p.0.id()) - b)
                .collect();
            match phase {
                Phase::Latency => {
                    let requests = m["requests"].as_f64().unwrap_or(f64::NAN);
                    let cpu: Vec<f64> = used.iter().map(|u| u / requests * 1000.0).collect();
                    let p99 = m["p99_us"].as_f64().unwrap_or(f64::NAN);
                    if k == 0 {
                        direct_p99 = p99;
                    }
                    m["added_p99_us"] = json!(p99 - direct_p99);
                    m["cpu_s_per_1k_requests"] = json!(cpu);
                }
                Phase::Bulk => {
                    let gb = m["bytes"].as_f64().unwrap_or(f64::NAN) / 1e9;
                    let cpu: Vec<f64> = used.iter().map(|u| u / gb).collect();
                    m["cpu_s_per_gb"] = json!(cpu);
                }
            }
            m["path"] = json!(name);
            m["round"] = json!(round + 1);
            eprintln!("{m}");
            runs.push(m);
            for (_, p) in procs {
                p.stop();
            }
            if name == "two agents, TCP + TLS" {
                vm1.sh_ok("iptables -D OUTPUT -p udp --dport 15008 -j DROP");
            }
        }
    }
    let median = |mut v: Vec<f64>| -> (f64, f64, f64) {
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let cpu_median = |of: &[&Value], key: &str| -> String {
        (0..2)
            .map(|i| {
                let (m, _, _) = median(of.iter().filter_map(|r| r[key][i].as_f64()).collect());
                format!("{m:.3}")
            })
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let mut summary = Vec::new();
    match phase {
        Phase::Latency => {
            println!(
                "| path | runs | p50 µs median (range) | p99 µs median (range) | added p99 µs median (range) | p99.9 µs median | CPU s / 1k req per proxy, median |"
            );
            println!("|---|---:|---|---|---|---:|---|");
        }
        Phase::Bulk => {
            println!(
                "| path | runs | Gbit/s median (range) | × stunnel4 of the same round, median (range) | CPU s / GB per proxy, median |"
            );
            println!("|---|---:|---|---|---|");
        }
    }
    for name in ROUND_PATHS {
        let of: Vec<&Value> = runs.iter().filter(|r| r["path"] == name).collect();
        if of.is_empty() {
            continue;
        }
        let col = |k: &str| -> Vec<f64> { of.iter().filter_map(|r| r[k].as_f64()).collect() };
        match phase {
            Phase::Latency => {
                let (p50, p50lo, p50hi) = median(col("p50_us"));
                let (p99, p99lo, p99hi) = median(col("p99_us"));
                let (add, addlo, addhi) = median(col("added_p99_us"));
                let (p999, _, _) = median(col("p999_us"));
                let cpu = if name == "direct TCP" {
                    "–".to_owned()
                } else {
                    cpu_median(&of, "cpu_s_per_1k_requests")
                };
                println!(
                    "| {name} | {} | {p50:.0} ({p50lo:.0}–{p50hi:.0}) | {p99:.0} ({p99lo:.0}–{p99hi:.0}) | {add:.0} ({addlo:.0}–{addhi:.0}) | {p999:.0} | {cpu} |",
                    of.len()
                );
                summary.push(json!({"path": name, "runs": of.len(), "p50_median_us": p50, "p99_median_us": p99, "added_p99_median_us": add, "p999_median_us": p999}));
            }
            Phase::Bulk => {
                let (g, glo, ghi) = median(col("gbit_s"));
                // Each run against stunnel4's run of the same round.
                let ratios: Vec<f64> = of
                    .iter()
                    .filter_map(|r| {
                        let st = runs.iter().find(|x| {
                            x["round"] == r["round"] && x["path"] == "stunnel4 → stunnel4 (mTLS)"
                        })?;
                        Some(r["gbit_s"].as_f64()? / st["gbit_s"].as_f64()?)
                    })
                    .collect();
                let (x, xlo, xhi) = median(ratios);
                let cpu = if name == "direct TCP" {
                    "–".to_owned()
                } else {
                    cpu_median(&of, "cpu_s_per_gb")
                };
                println!(
                    "| {name} | {} | {g:.2} ({glo:.2}–{ghi:.2}) | {x:.2} ({xlo:.2}–{xhi:.2}) | {cpu} |",
                    of.len()
                );
                summary.push(json!({"path": name, "runs": of.len(), "gbit_s_median": g, "x_stunnel4_median": x}));
            }
        }
    }
    Ok(json!({
        "date": time_now(),
        "phase": if phase == Phase::Bulk { "bulk" } else { "latency" },
        "rate": RATE, "request_bytes": REQ, "latency_secs": LATENCY_SECS, "bulk_secs": BULK_SECS,
        "rounds": rounds,
        "runs": runs,
        "summary": summary,
    }))
}

/// What the push thread needs to drive `causewayctl` in the controller's namespace.
struct Pusher {
    node: Node,
    admin: String,
    token: PathBuf,
    policy: PathBuf,
}

/// Applies and deletes `push.policy` in turn every `every` until `stop`; returns how many
/// changes were made (each one a config push to every agent).
fn pusher(push: &Pusher, every: Duration, stop: &std::sync::atomic::AtomicBool) -> u64 {
    let mut n = 0u64;
    let policy = push.policy.to_string_lossy().into_owned();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let args: Vec<&str> = if n.is_multiple_of(2) {
            vec!["apply", "-f", &policy]
        } else {
            vec!["delete", "ap", "bench-push", "-n", "default"]
        };
        let ok = push
            .node
            .cmd(bin("causewayctl"))
            .args(&args)
            .env("CAUSEWAY_CONTROLLER", &push.admin)
            .env("CAUSEWAY_ADMIN_TOKEN_FILE", &push.token)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            n += 1;
        }
        std::thread::sleep(every);
    }
    n
}

fn time_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Starts stunnel4 server in vm2 (9443 → 127.0.0.1:8080) and client in vm1
/// (127.0.0.1:9000 → vm2:9443), both verifying the peer against a test CA.
fn stunnel(root: &Path, vm1: &Node, vm2: &Node) -> anyhow::Result<(Proc, Proc)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Distinct subject names: OpenSSL takes a leaf whose subject equals its issuer's for
    // self-issued and refuses the chain.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "causeway bench stunnel CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    std::fs::write(root.join("st-ca.pem"), ca.pem())?;
    for name in ["server", "client"] {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![format!("{name}.bench")])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name}.bench"));
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(
            root.join(format!("st-{name}.pem")),
            format!("{}{}", cert.pem(), key.serialize_pem()),
        )?;
    }
    let r = |f: &str| root.join(f).display().to_string();
    let server_conf = format!(
        "foreground = yes\npid =\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n[s]\naccept = 0.0.0.0:9443\nconnect = 127.0.0.1:{PORT}\ncert = {}\nCAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
        r("st-server.pem"),
        r("st-ca.pem")
    );
    let client_conf = format!(
        "foreground = yes\npid =\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n[c]\nclient = yes\naccept = 127.0.0.1:9000\nconnect = {}:9443\ncert = {}\nCAfile = {}\nverifyChain = yes\ncheckHost = server.bench\n",
        vm2.addr,
        r("st-client.pem"),
        r("st-ca.pem")
    );
    std::fs::write(root.join("st-server.conf"), server_conf)?;
    std::fs::write(root.join("st-client.conf"), client_conf)?;
    let stunnel = which("stunnel4")
        .or_else(|| which("stunnel"))
        .context("stunnel4 is not installed: apt-get install stunnel4")?;
    let s = spawn(
        vm2,
        &root.join("st-server.log"),
        &stunnel,
        &[&r("st-server.conf")],
    )?;
    let c = spawn(
        vm1,
        &root.join("st-client.log"),
        &stunnel,
        &[&r("st-client.conf")],
    )?;
    wait_for("stunnel4 to listen", WAIT, || {
        vm1.sh("ss -ltn | grep -q '127.0.0.1:9000 '")
            .status
            .success()
            .then_some(())
    });
    Ok((c, s))
}

/// Starts haproxy in TCP mode, one thread: server side in vm2 (9101 → 127.0.0.1:8080),
/// client side in vm1 (127.0.0.1:9100 → vm2:9101). With `tls`, the hop between them is
/// mutual TLS with stunnel4's certificates (written by [`stunnel`], run before).
fn haproxy_pair(
    haproxy: &Path,
    root: &Path,
    vm1: &Node,
    vm2: &Node,
    tls: bool,
) -> anyhow::Result<(Proc, Proc)> {
    let r = |f: &str| root.join(f).display().to_string();
    let head = "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n";
    let (server_tls, client_tls) = if tls {
        (
            format!(
                " ssl crt {} ca-file {} verify required",
                r("st-server.pem"),
                r("st-ca.pem")
            ),
            format!(
                " ssl crt {} ca-file {} verify required verifyhost server.bench",
                r("st-client.pem"),
                r("st-ca.pem")
            ),
        )
    } else {
        (String::new(), String::new())
    };
    let server_conf =
        format!("{head}listen s\n  bind 0.0.0.0:9101{server_tls}\n  server app 127.0.0.1:{PORT}\n");
    let client_conf = format!(
        "{head}listen c\n  bind 127.0.0.1:9100\n  server peer {}:9101{client_tls}\n",
        vm2.addr
    );
    std::fs::write(root.join("hap-server.cfg"), server_conf)?;
    std::fs::write(root.join("hap-client.cfg"), client_conf)?;
    let s = spawn(
        vm2,
        &root.join("hap-server.log"),
        haproxy,
        &["-db", "-f", &r("hap-server.cfg")],
    )?;
    let c = spawn(
        vm1,
        &root.join("hap-client.log"),
        haproxy,
        &["-db", "-f", &r("hap-client.cfg")],
    )?;
    wait_for("haproxy to listen", WAIT, || {
        (vm1.sh("ss -ltn | grep -q '127.0.0.1:9100 '")
            .status
            .success()
            && vm2.sh("ss -ltn | grep -q ':9101 '").status.success())
        .then_some(())
    });
    Ok((c, s))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn print_table(report: &Value) {
    let results = report["results"].as_array().cloned().unwrap_or_default();
    let direct = &results[0];
    let d50 = direct["latency"]["p50_us"].as_f64().unwrap_or(f64::NAN);
    let d99 = direct["latency"]["p99_us"].as_f64().unwrap_or(f64::NAN);
    let dbulk = direct["bulk"]["gbit_s"].as_f64().unwrap_or(f64::NAN);
    let stunnel = results.iter().find(|r| {
        r["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("stunnel4"))
    });
    let st_bulk = stunnel
        .and_then(|r| r["bulk"]["gbit_s"].as_f64())
        .unwrap_or(f64::NAN);
    println!(
        "| path | p50 µs | p99 µs | added p50 / p99 µs | bulk Gbit/s | % of direct | × stunnel4 | CPU s per 1k req (each proxy) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &results {
        let p50 = r["latency"]["p50_us"].as_f64().unwrap_or(f64::NAN);
        let p99 = r["latency"]["p99_us"].as_f64().unwrap_or(f64::NAN);
        let g = r["bulk"]["gbit_s"].as_f64().unwrap_or(f64::NAN);
        let cpu: Vec<String> = r["proxies"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        format!(
                            "{k} {:.4}",
                            v["cpu_s_per_1k_requests"].as_f64().unwrap_or(f64::NAN)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "| {} | {p50:.0} | {p99:.0} | {:.0} / {:.0} | {g:.2} | {:.0} % | {:.2} | {} |",
            r["path"].as_str().unwrap_or(""),
            p50 - d50,
            p99 - d99,
            g / dbulk * 100.0,
            g / st_bulk,
            if cpu.is_empty() {
                "–".to_owned()
            } else {
                cpu.join(", ")
            }
        );
    }
    println!(
        "\n| path (bulk) | Gbit/s | machine CPUs busy (of {}) | stolen by the host | machine CPU s per GB | processes: client + server + proxies, CPU s per GB | of which proxies |",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        let c = &r["bulk"]["cpu"];
        let f = |k: &str| c[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r["path"].as_str().unwrap_or(""),
            r["bulk"]["gbit_s"].as_f64().unwrap_or(f64::NAN),
            f("machine_cpus_busy"),
            f("machine_cpus_stolen"),
            f("machine_s_per_gb"),
            f("total_s_per_gb"),
            f("proxies_s_per_gb"),
        );
    }
    println!(
        "\n| path (new connection per request, {CONNECT_CLIENTS} clients) | connections/s | × stunnel4 | connect + request p50 / p99 µs | CPU s per 1k connections (each proxy) |"
    );
    println!("|---|---|---|---|---|");
    let st_conns = stunnel
        .and_then(|r| r["connect"]["per_s"].as_f64())
        .unwrap_or(f64::NAN);
    for r in &results {
        let c = &r["connect"];
        let cpu: Vec<String> = c["cpu_s_per_1k_connections"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {:.3}", v.as_f64().unwrap_or(f64::NAN)))
                    .collect()
            })
            .unwrap_or_default();
        let per_s = c["per_s"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {per_s:.0} | {:.2} | {:.0} / {:.0} | {} |",
            r["path"].as_str().unwrap_or(""),
            per_s / st_conns,
            c["p50_us"].as_f64().unwrap_or(f64::NAN),
            c["p99_us"].as_f64().unwrap_or(f64::NAN),
            if cpu.is_empty() {
                "–".to_owned()
            } else {
                cpu.join(", ")
            }
        );
    }
    for r in &results {
        if !r["memory_mib"].is_null() {
            println!(
                "\nagent memory (MiB), {}: {}",
                r["path"].as_str().unwrap_or(""),
                r["memory_mib"]
            );
        }
    }
    println!(
        "stunnel4 RSS after its run (MiB): {}",
        report["stunnel_rss_mib"]
    );
}

// ---------------------------------------------------------------- the HTTP mode

/// The paths of [`run_http_rounds`], in the order of its first round.
const HTTP_PATHS: [&str; 6] = [
    "direct (no agents)",
    "two agents, L4 (tcp: port)",
    "two agents, HTTP (http: port)",
    "two agents, HTTP + DATAPLANE_AGENT_TOML_EXTRA",
    "two agents, HTTP + JWT + claims policy",
    "two agents, HTTP + 3-route VirtualService",
];
/// The mesh name of the app, sent as Host (VirtualService routing matches it).
const HTTP_HOST: &str = "web.default";
/// The path every request asks for (the VirtualService's third route, after two matches).
const HTTP_PATH: &str = "/api/items";
const JWT_ISSUER: &str = "https://idp.bench.example";
const JWT_AUDIENCE: &str = "causeway-bench";

/// The ratios the issues ask for: (issue, what, path, reference path, target).
const HTTP_TARGETS: [(&str, &str, &str, &str, f64); 4] = [
    ("20", "HTTP ÷ L4 req/s", HTTP_PATHS[2], HTTP_PATHS[1], 0.8),
    (
        "22",
        "JWT + claims policy ÷ HTTP req/s",
        HTTP_PATHS[4],
        HTTP_PATHS[2],
        0.85,
    ),
    (
        "21",
        "3-route VirtualService ÷ HTTP req/s",
        HTTP_PATHS[5],
        HTTP_PATHS[2],
        0.95,
    ),
    (
        "20",
        "DATAPLANE_AGENT_TOML_EXTRA ÷ HTTP req/s (no target)",
        HTTP_PATHS[3],
        HTTP_PATHS[2],
        f64::NAN,
    ),
];

/// The policy resources of the JWT path: an inline-key RequestAuthentication and an
/// AuthorizationPolicy that allows GET /api/* to a principal of the issuer with the
/// claim `team: bench` (so a request without the token gets 403). JSON documents, which
/// are YAML.
fn jwt_resources(jwks: &str) -> String {
    let selector = json!({"matchLabels": {"causeway.io/group": "web"}});
    let ra = json!({
        "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
        "metadata": {"name": "bench-jwt", "namespace": "default"},
        "spec": {"selector": selector, "jwtRules": [{
            "issuer": JWT_ISSUER, "audiences": [JWT_AUDIENCE], "jwks": jwks,
        }]},
    });
    let ap = json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "bench-claims", "namespace": "default"},
        "spec": {"selector": selector, "rules": [{
            "from": [{"source": {"requestPrincipals": [format!("{JWT_ISSUER}/*")]}}],
            "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"]}}],
            "when": [{"key": "request.auth.claims[team]", "values": ["bench"]}],
        }]},
    });
    format!("{ra}\n---\n{ap}\n")
}

/// The routing resources of the VirtualService path: a DestinationRule with one subset
/// (the app's group) and a VirtualService of three routes, the bench's requests taking
/// the third (after a URI prefix and a header match that do not match).
fn route_resources() -> String {
    let dest = json!({"host": HTTP_HOST, "subset": "v1", "port": {"number": HTTP_PORT}});
    let dr = json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "bench-web", "namespace": "default"},
        "spec": {"host": HTTP_HOST, "subsets": [
            {"name": "v1", "labels": {"causeway.io/group": "web"}},
        ]},
    });
    let vs = json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "bench-web", "namespace": "default"},
        "spec": {"hosts": [HTTP_HOST], "http": [
            {"name": "admin", "match": [{"uri": {"prefix": "/admin"}}], "route": [{"destination": dest}]},
            {"name": "canary", "match": [{"headers": {"x-canary": {"exact": "1"}}}], "route": [{"destination": dest}]},
            {"name": "default", "route": [{"destination": dest}]},
        ]},
    });
    format!("{dr}\n---\n{vs}\n")
}

/// Waits until the agent of process `pid` with state directory `state` is connected to
/// the controller and has applied the controller's latest config version it knows of (its
/// `status.json`), so that it no longer runs on the cached config it started with.
fn controller_synced(state: &Path, pid: u32) {
    wait_for(
        &format!("the agent {pid} to apply the controller's config"),
        WAIT,
        || {
            let s: Value =
                serde_json::from_str(&std::fs::read_to_string(state.join("status.json")).ok()?)
                    .ok()?;
            (s["pid"].as_u64()? == u64::from(pid)
                && s["controller_connected"].as_bool()?
                && s["config_version"].as_u64()? >= s["controller_version"].as_u64()?)
            .then_some(())
        },
    );
}

/// One request from vm1 on a new connection: its status, or None when it failed.
fn http_probe(run: &Run, addr: &str, token: Option<&str>) -> Option<u16> {
    let mut args = vec!["http-probe", addr, HTTP_HOST, HTTP_PATH];
    args.extend(token);
    let out = run.lab.node("vm1").cmd(&run.me).args(&args).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// `DATAPLANE_HTTP=1`: `rounds` rounds of every HTTP path (see [`HTTP_PATHS`]), each one
/// started afresh (policy or routes applied, agents started, the effect probed) and
/// stopped after its run, direct first and the rest rotated and reversed from round to
/// round. Per run:
/// requests/s (200s only), latency, CPU s per 1,000 requests and RSS of each agent. Prints
/// per path the medians and, per issue, the median over rounds of each round's ratio,
/// PASS or FAIL against its target.
fn run_http_rounds(
    run: &Run,
    states: &[PathBuf],
    vip: &str,
    rounds: usize,
) -> anyhow::Result<Value> {
    let vm2 = run.lab.node("vm2").clone();
    let env_num = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(d)
    };
    let secs = env_num("DATAPLANE_HTTP_SECS", LATENCY_SECS);
    let conns = env_num("DATAPLANE_HTTP_CONNS", 16);
    let extra = std::env::var("DATAPLANE_AGENT_TOML_EXTRA").ok();
    // An A/B of two agent builds in the same rounds: the extra path runs this build.
    let agent_b = std::env::var_os("DATAPLANE_AGENT_B").map(PathBuf::from);
    if let Some(b) = &agent_b {
        anyhow::ensure!(
            b.is_file(),
            "DATAPLANE_AGENT_B={}: no such file",
            b.display()
        );
        eprintln!(
            "-- the path {:?} runs the agent build {} (DATAPLANE_AGENT_B)",
            HTTP_PATHS[3],
            b.display()
        );
    }
    let extra_config = run.root.join("agent-extra.toml");
    if let Some(t) = &extra {
        std::fs::write(&extra_config, t)?;
        eprintln!(
            "-- agents of the path {:?} read this config file (DATAPLANE_AGENT_TOML_EXTRA):\n{t}",
            HTTP_PATHS[3]
        );
    }
    let jwt = causeway_bench::http::es256(JWT_ISSUER, JWT_AUDIENCE, "bench-client")?;
    let jwt_file = run.root.join("bench-jwt.yaml");
    std::fs::write(&jwt_file, jwt_resources(&jwt.jwks))?;
    let route_file = run.root.join("bench-routes.yaml");
    std::fs::write(&route_file, route_resources())?;
    let file = |p: &Path| p.to_string_lossy().into_owned();
    let mut skipped: serde_json::Map<String, Value> = serde_json::Map::new();
    if extra.is_none() && agent_b.is_none() {
        skipped.insert(
            HTTP_PATHS[3].to_owned(),
            json!("DATAPLANE_AGENT_TOML_EXTRA is not set (the agent config has no [telemetry] switch yet; set it to the TOML that turns telemetry off)"),
        );
    }
    // `DATAPLANE_HTTP_PATHS=1,2,3`: only these of the agent paths (numbered from 1 in
    // [`HTTP_PATHS`] after direct, which always runs), for a quicker A/B.
    if let Ok(only) = std::env::var("DATAPLANE_HTTP_PATHS") {
        let keep = only
            .split(',')
            .map(|n| match n.trim().parse::<usize>() {
                Ok(i) if (1..HTTP_PATHS.len()).contains(&i) => Ok(i),
                _ => Err(anyhow::anyhow!(
                    "DATAPLANE_HTTP_PATHS={only:?}: {n:?} is not a path number; expected numbers from 1 to {} separated by commas (1 = {:?}, 2 = {:?}, 3 = {:?}, 4 = {:?}, 5 = {:?})",
                    HTTP_PATHS.len() - 1,
                    HTTP_PATHS[1],
                    HTTP_PATHS[2],
                    HTTP_PATHS[3],
                    HTTP_PATHS[4],
                    HTTP_PATHS[5],
                )),
            })
            .collect::<anyhow::Result<Vec<usize>>>()?;
        for (i, name) in HTTP_PATHS.iter().enumerate().skip(1) {
            if !keep.contains(&i) {
                skipped.insert(
                    (*name).to_owned(),
                    json!(format!("not in DATAPLANE_HTTP_PATHS={only}")),
                );
            }
        }
    }
    let routed = |state: &Path| {
        wait_for("vm1 to route the web service", WAIT, || {
            std::fs::read_to_string(state.join("capture.rules"))
                .ok()?
                .contains(&format!("-d {}/32 ", vm2.addr))
                .then_some(())
        })
    };
    let mut runs: Vec<Value> = Vec::new();
    for round in 0..rounds {
        let mut direct: Option<(f64, f64)> = None;
        // Direct first; the agent paths that run rotated by one every second round and
        // reversed every other round, so that of any two paths each goes first in half of
        // the rounds (a later slot was seen to be favoured).
        let active: Vec<&str> = HTTP_PATHS[1..]
            .iter()
            .copied()
            .filter(|n| !skipped.contains_key(*n))
            .collect();
        let mut order: Vec<&str> = (0..active.len())
            .map(|i| active[(i + round / 2) % active.len()])
            .collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for (k, name) in std::iter::once(HTTP_PATHS[0]).chain(order).enumerate() {
            if skipped.contains_key(name) {
                continue;
            }
            let jwt_path = name == HTTP_PATHS[4];
            let route_path = name == HTTP_PATHS[5];
            if jwt_path {
                run.ctl(&["apply", "-f", &file(&jwt_file)])?;
            }
            if route_path && let Err(e) = run.ctl(&["apply", "-f", &file(&route_file)]) {
                let why = format!(
                    "causewayctl apply refused the DestinationRule + VirtualService (this build has no VirtualService routing?): {e:#}"
                );
                eprintln!("-- {name}: skipped in every round: {why}");
                skipped.insert(name.to_owned(), json!(why));
                continue;
            }
            let (agents, addr): (Vec<(&str, Proc)>, String) = if k == 0 {
                (Vec::new(), format!("{}:{HTTP_PORT}", vm2.addr))
            } else {
                let config =
                    (name == HTTP_PATHS[3] && extra.is_some()).then_some(extra_config.as_path());
                let exe = match &agent_b {
                    Some(b) if name == HTTP_PATHS[3] => b.clone(),
                    _ => bin("causeway-agent"),
                };
                let a2 = run.agent_of(&exe, "vm2", &states[1], config)?;
                let a1 = run.agent_of(&exe, "vm1", &states[0], config)?;
                routed(&states[0]);
                // Each agent starts on its cached config (the one of the last path, with
                // the server's endpoint) and then takes the controller's, which may still
                // lack the restarted server agent: a connection accepted in that window
                // was passed through to the VIP and reset (seen as the load's `connection
                // error`). The load starts once both are at the controller's version; the
                // probe below then waits for the server's endpoint.
                for (state, agent) in [(&states[1], &a2), (&states[0], &a1)] {
                    controller_synced(state, agent.0.id());
                }
                let port = if name == HTTP_PATHS[1] {
                    PORT
                } else {
                    HTTP_PORT
                };
                (
                    vec![("client agent", a1), ("server agent", a2)],
                    format!("{vip}:{port}"),
                )
            };
            // The path is ready when the agents answer as its config says: without a
            // token 403 on the JWT path (the policy is in force), 200 elsewhere (no
            // policy left from an earlier path); with the token 200.
            let token = jwt_path.then_some(jwt.token.as_str());
            let bare = if jwt_path { 403 } else { 200 };
            wait_for(
                &format!("{name}: a request without a token to get {bare}"),
                WAIT,
                || (http_probe(run, &addr, None) == Some(bare)).then_some(()),
            );
            if token.is_some() {
                wait_for(
                    &format!("{name}: a request with the token to get 200"),
                    WAIT,
                    || (http_probe(run, &addr, token) == Some(200)).then_some(()),
                );
            }
            eprintln!("-- round {}/{rounds}: {name}", round + 1);
            let before: Vec<f64> = agents.iter().map(|(_, p)| cpu_seconds(p.0.id())).collect();
            let mut args = vec![
                "http-load".to_owned(),
                addr.clone(),
                HTTP_HOST.to_owned(),
                HTTP_PATH.to_owned(),
                secs.to_string(),
                conns.to_string(),
            ];
            args.extend(token.map(str::to_owned));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut m = run_json(run.lab.node("vm1"), &run.me, &args)?;
            let requests = m["requests"].as_f64().unwrap_or(f64::NAN);
            let cpu: Vec<f64> = agents
                .iter()
                .zip(&before)
                .map(|((_, p), b)| (cpu_seconds(p.0.id()) - b) / requests * 1000.0)
                .collect();
            let rss: Vec<(f64, f64)> = agents.iter().map(|(_, p)| rss_mib(p.0.id())).collect();
            let (p50, p99) = (
                m["p50_us"].as_f64().unwrap_or(f64::NAN),
                m["p99_us"].as_f64().unwrap_or(f64::NAN),
            );
            let (d50, d99) = *direct.get_or_insert((p50, p99));
            m["added_p50_us"] = json!(p50 - d50);
            m["added_p99_us"] = json!(p99 - d99);
            m["agent_cpu_s_per_1k_requests"] = json!(cpu);
            m["agent_rss_mib"] = json!(rss.iter().map(|r| r.0).collect::<Vec<_>>());
            m["agent_peak_rss_mib"] = json!(rss.iter().map(|r| r.1).collect::<Vec<_>>());
            m["path"] = json!(name);
            m["round"] = json!(round + 1);
            eprintln!("{m}");
            runs.push(m);
            for (_, p) in agents {
                p.stop();
            }
            if jwt_path {
                run.ctl(&["delete", "-f", &file(&jwt_file)])?;
            }
            if route_path {
                run.ctl(&["delete", "-f", &file(&route_file)])?;
            }
        }
    }
    let median = |mut v: Vec<f64>| -> (f64, f64, f64) {
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let pair = |of: &[&Value], key: &str| -> String {
        (0..2)
            .map(|i| {
                let (m, _, _) = median(of.iter().filter_map(|r| r[key][i].as_f64()).collect());
                format!("{m:.3}")
            })
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!(
        "\nHTTP/1.1 keep-alive, {conns} connections, {secs} s per run, GET {HTTP_PATH}; medians over {rounds} rounds\n"
    );
    println!(
        "| path | runs | req/s (200s) median (range) | p50 µs | p99 µs | added p50 / p99 µs vs direct | agent CPU s / 1k req (client / server) | agent RSS MiB (client / server) | non-200 + errors |"
    );
    println!("|---|---:|---|---:|---:|---|---|---|---:|");
    let mut summary = Vec::new();
    for name in HTTP_PATHS {
        let of: Vec<&Value> = runs.iter().filter(|r| r["path"] == name).collect();
        if of.is_empty() {
            continue;
        }
        let col = |k: &str| -> Vec<f64> { of.iter().filter_map(|r| r[k].as_f64()).collect() };
        let (rps, lo, hi) = median(col("ok_req_s"));
        let (p50, _, _) = median(col("p50_us"));
        let (p99, _, _) = median(col("p99_us"));
        let (a50, _, _) = median(col("added_p50_us"));
        let (a99, _, _) = median(col("added_p99_us"));
        let bad: f64 = of
            .iter()
            .map(|r| {
                r["requests"].as_f64().unwrap_or(0.0) - r["ok_200"].as_f64().unwrap_or(0.0)
                    + r["errors"].as_f64().unwrap_or(0.0)
            })
            .sum();
        let (cpu, rss) = if name == HTTP_PATHS[0] {
            ("–".to_owned(), "–".to_owned())
        } else {
            (
                pair(&of, "agent_cpu_s_per_1k_requests"),
                pair(&of, "agent_rss_mib"),
            )
        };
        println!(
            "| {name} | {} | {rps:.0} ({lo:.0}–{hi:.0}) | {p50:.0} | {p99:.0} | {a50:.0} / {a99:.0} | {cpu} | {rss} | {bad:.0} |",
            of.len()
        );
        summary.push(json!({
            "path": name, "runs": of.len(), "ok_req_s_median": rps,
            "p50_median_us": p50, "p99_median_us": p99,
            "added_p50_median_us": a50, "added_p99_median_us": a99,
            "non_200_and_errors": bad,
        }));
    }
    println!("\n| issue | ratio | median of the rounds' ratios (range) | target | verdict |");
    println!("|---|---|---|---:|---|");
    let mut verdicts = Vec::new();
    for (issue, what, path, reference, target) in HTTP_TARGETS {
        // Each run against its reference of the same round.
        let ratios: Vec<f64> = runs
            .iter()
            .filter(|r| r["path"] == path)
            .filter_map(|r| {
                let base = runs
                    .iter()
                    .find(|x| x["round"] == r["round"] && x["path"] == reference)?;
                Some(r["ok_req_s"].as_f64()? / base["ok_req_s"].as_f64()?)
            })
            .collect();
        let verdict = if ratios.is_empty() {
            match skipped.get(path) {
                Some(why) => format!("SKIPPED: {}", why.as_str().unwrap_or("")),
                None => "NO DATA".to_owned(),
            }
        } else if target.is_nan() {
            "(information)".to_owned()
        } else {
            let (m, _, _) = median(ratios.clone());
            (if m >= target { "PASS" } else { "FAIL" }).to_owned()
        };
        let (m, lo, hi) = median(ratios);
        let target_s = if target.is_nan() {
            "–".to_owned()
        } else {
            format!("≥ {target}")
        };
        println!("| {issue} | {what} | {m:.3} ({lo:.3}–{hi:.3}) | {target_s} | {verdict} |");
        verdicts.push(json!({
            "issue": issue, "ratio": what, "path": path, "reference": reference,
            "median": m, "min": lo, "max": hi,
            "target": if target.is_nan() { Value::Null } else { json!(target) },
            "verdict": verdict,
        }));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\nload average at the end (1, 5, 15 min): {}", load.trim());
    Ok(json!({
        "date": time_now(),
        "mode": "http",
        "connections": conns, "secs": secs, "path": HTTP_PATH, "host": HTTP_HOST,
        "rounds": rounds,
        "loadavg_end": load.trim(),
        "agent_toml_extra": extra,
        "skipped": skipped,
        "runs": runs,
        "summary": summary,
        "targets": verdicts,
    }))
}

// ---------------------------------------------------------------- the policy mode

/// Issue 19's target: new connections/s with the policy set ÷ without.
const POLICY_TARGET: f64 = 0.9;
/// How many of the policies select the server's workload.
const POLICY_SELECTING: usize = 50;
/// The client's principal (group `client`, namespace `default`), which every selecting
/// policy allows.
const POLICY_CLIENT: &str = "causeway.local/ns/default/sa/client";

/// `DATAPLANE_POLICIES=N`: the number of policies of the policy mode, if set.
fn policy_mode() -> anyhow::Result<Option<usize>> {
    let Ok(v) = std::env::var("DATAPLANE_POLICIES") else {
        return Ok(None);
    };
    match v.parse::<usize>() {
        Ok(n) if n >= POLICY_SELECTING => Ok(Some(n)),
        _ => bail!(
            "DATAPLANE_POLICIES={v:?}: expected a number of policies of at least {POLICY_SELECTING} (that many select the server), e.g. 1000"
        ),
    }
}

/// How many policies the agent whose state directory is `state` holds (its cached config).
fn agent_policies(state: &Path) -> Option<usize> {
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(state.join("config.json")).ok()?).ok()?;
    Some(cfg["policies"].as_object().map_or(0, |m| m.len()))
}

/// `DATAPLANE_POLICIES=N`: `rounds` rounds of new connections through two agents without
/// policies and with the `N` of [`causeway_bench::policy_set`] applied (the order swapped
/// every round). Each path starts fresh agents, waits until both hold the expected number
/// of policies and a connection passes, then runs the `connect` client (10 clients,
/// `DATAPLANE_CONNECT_SECS`). Per run: connections/s, connection time p50/p99, agent CPU
/// s per 1,000 connections and RSS. Prints per path the medians and the median of the
/// rounds' ratios (with ÷ without), PASS or FAIL against [`POLICY_TARGET`].
fn run_policy_rounds(
    run: &Run,
    states: &[PathBuf],
    vip_addr: &str,
    rounds: usize,
    policies: usize,
) -> anyhow::Result<Value> {
    let vm2 = run.lab.node("vm2").clone();
    let secs = std::env::var("DATAPLANE_CONNECT_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(5);
    let file = run.root.join("bench-policies.yaml");
    std::fs::write(
        &file,
        causeway_bench::policy_set::yaml(
            policies,
            POLICY_SELECTING,
            "default",
            "web",
            POLICY_CLIENT,
        ),
    )?;
    let file = file.to_string_lossy().into_owned();
    let with = format!("two agents, {policies} policies ({POLICY_SELECTING} selecting)");
    let paths = ["two agents, no policies".to_owned(), with.clone()];
    let mut runs: Vec<Value> = Vec::new();
    for round in 0..rounds {
        for k in 0..paths.len() {
            let name = &paths[(k + round) % paths.len()];
            let with_policies = *name == with;
            let expect = if with_policies {
                run.ctl(&["apply", "-f", &file])?;
                policies
            } else {
                0
            };
            let a2 = run.agent("vm2", &states[1])?;
            let a1 = run.agent("vm1", &states[0])?;
            wait_for("vm1 to route the web service", WAIT, || {
                std::fs::read_to_string(states[0].join("capture.rules"))
                    .ok()?
                    .contains(&format!("-d {}/32 ", vm2.addr))
                    .then_some(())
            });
            for state in states {
                wait_for(
                    &format!(
                        "{name}: the agent of {} to hold {expect} policies",
                        state.display()
                    ),
                    WAIT,
                    || (agent_policies(state) == Some(expect)).then_some(()),
                );
            }
            // One connection end to end: the policies admit the client. The agents may
            // still be starting (the capture file can be the previous agent's): a few
            // tries, 250 ms apart.
            let mut tries = 0;
            loop {
                tries += 1;
                match run_json(
                    run.lab.node("vm1"),
                    &run.me,
                    &["connect", vip_addr, "1", "1"],
                ) {
                    Err(_) if tries < 40 => std::thread::sleep(Duration::from_millis(250)),
                    other => break other,
                }
            }
            .with_context(|| {
                format!(
                    "{name}: a connection through the agents failed (see the agents' logs in {})",
                    run.root.display()
                )
            })?;
            eprintln!(
                "-- round {}/{rounds}: {name}: new connections for {secs}s, {CONNECT_CLIENTS} clients",
                round + 1
            );
            let agents = [("client agent", &a1), ("server agent", &a2)];
            let before: Vec<f64> = agents.iter().map(|(_, p)| cpu_seconds(p.0.id())).collect();
            let mut m = run_json(
                run.lab.node("vm1"),
                &run.me,
                &[
                    "connect",
                    vip_addr,
                    &secs.to_string(),
                    &CONNECT_CLIENTS.to_string(),
                ],
            )?;
            let conns = m["connections"].as_f64().unwrap_or(f64::NAN);
            let cpu: Vec<f64> = agents
                .iter()
                .zip(&before)
                .map(|((_, p), b)| (cpu_seconds(p.0.id()) - b) / conns * 1000.0)
                .collect();
            let rss: Vec<f64> = agents.iter().map(|(_, p)| rss_mib(p.0.id()).0).collect();
            m["agent_cpu_s_per_1k_connections"] = json!(cpu);
            m["agent_rss_mib"] = json!(rss);
            m["policies"] = json!(expect);
            m["path"] = json!(name);
            m["round"] = json!(round + 1);
            eprintln!("{m}");
            runs.push(m);
            a1.stop();
            a2.stop();
            if with_policies {
                run.ctl(&["delete", "-f", &file])?;
            }
        }
    }
    let median = |mut v: Vec<f64>| -> (f64, f64, f64) {
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    println!(
        "\nNew connections through two agents (default transport), {CONNECT_CLIENTS} clients, {secs} s per run, each a 1 KiB request/response; medians over {rounds} rounds\n"
    );
    println!(
        "| path | runs | connections/s median (range) | p50 µs | p99 µs | agent CPU s / 1k conn (client / server) | agent RSS MiB (client / server) |"
    );
    println!("|---|---:|---|---:|---:|---|---|");
    let mut summary = Vec::new();
    for name in &paths {
        let of: Vec<&Value> = runs.iter().filter(|r| r["path"] == name.as_str()).collect();
        let col = |k: &str| -> Vec<f64> { of.iter().filter_map(|r| r[k].as_f64()).collect() };
        let pair = |k: &str| -> String {
            (0..2)
                .map(|i| {
                    let (m, _, _) = median(of.iter().filter_map(|r| r[k][i].as_f64()).collect());
                    format!("{m:.3}")
                })
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let (cps, lo, hi) = median(col("per_s"));
        let (p50, _, _) = median(col("p50_us"));
        let (p99, _, _) = median(col("p99_us"));
        println!(
            "| {name} | {} | {cps:.0} ({lo:.0}–{hi:.0}) | {p50:.0} | {p99:.0} | {} | {} |",
            of.len(),
            pair("agent_cpu_s_per_1k_connections"),
            pair("agent_rss_mib"),
        );
        summary.push(json!({
            "path": name, "runs": of.len(), "per_s_median": cps,
            "p50_median_us": p50, "p99_median_us": p99,
        }));
    }
    // Each round's run with the policies against the same round's run without.
    let ratios: Vec<f64> = runs
        .iter()
        .filter(|r| r["path"] == with.as_str())
        .filter_map(|r| {
            let base = runs
                .iter()
                .find(|x| x["round"] == r["round"] && x["path"] == paths[0].as_str())?;
            Some(r["per_s"].as_f64()? / base["per_s"].as_f64()?)
        })
        .collect();
    let (m, lo, hi) = median(ratios);
    let verdict = if m.is_nan() {
        "NO DATA"
    } else if m >= POLICY_TARGET {
        "PASS"
    } else {
        "FAIL"
    };
    println!(
        "\nissue 19: new connections/s with {policies} policies ÷ without: {m:.3} ({lo:.3}–{hi:.3}), target ≥ {POLICY_TARGET}: {verdict}"
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at the end (1, 5, 15 min): {}", load.trim());
    Ok(json!({
        "date": time_now(),
        "mode": "policies",
        "policies": policies, "selecting": POLICY_SELECTING,
        "clients": CONNECT_CLIENTS, "secs": secs, "rounds": rounds,
        "loadavg_end": load.trim(),
        "runs": runs,
        "summary": summary,
        "ratio": {"median": m, "min": lo, "max": hi, "target": POLICY_TARGET, "verdict": verdict},
    }))
}
