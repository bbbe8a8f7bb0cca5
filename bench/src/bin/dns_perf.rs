//! DNS: the agent's server against dnsmasq, side by side in one run, with dnsperf.
//!
//! - The agent: the real server (`causeway_agent::dns::Dns`) in a child process of this
//!   program, with a mesh of `--services` services (names `svc<i>.default.causeway` and
//!   `svc<i>.default.svc.cluster.local`).
//! - The baseline: dnsmasq serving the same names from a hosts file, cache off, forwarding
//!   the rest to the same upstream.
//! - Forwarded names (`host<i>.outside.test`) go to an upstream dnsmasq (hosts file).
//!
//! Rows:
//! - `mesh`: mesh names, agent against dnsmasq (hosts file).
//! - `forwarded`: the forwarding paths alone — the upstream answers with TTL 0, the agent
//!   runs with `cache = false`, dnsmasq with `--cache-size=0`.
//! - `forwarded-cached`: the caches, warm — a second upstream answers with TTL 3600; the
//!   agent with its cache on (defaults), against dnsmasq with its default cache (150
//!   names, so the 1,000 names do not fit) and with `--cache-size=10000` (they fit).
//! - cold: `--cold` names (default 20,000) asked once each of the cached servers at the
//!   latency runs' rate (every query a miss: cache look-up, forward, store), reported
//!   (p50/p99/max; a q/s of a run that ends waiting for its few lost queries says little).
//!
//! Each throughput run also reports the server's CPU time (user + system, all its
//! threads, from /proc) per answered query, and how busy CPU 1 (dnsperf's) was: at ~100 %
//! dnsperf limits the q/s, and the CPU per query says more about the server than its q/s
//! (the `agent/…` rows give the CPU ratio in the last column; below 1: the agent needs less).
//!
//! The verdict covers every row: mesh ≥ 1.5× dnsmasq q/s, forwarded and forwarded-cached
//! ≥ 1.0× q/s with p99 ≤ dnsmasq's (the median ratio of the latency rounds ≤ 1.0); with
//! the mmsg client, also no wrong answer (throughput run and rounds).
//!
//! Both servers under test run pinned to CPU 0 (`taskset -c 0`, one core); the clients
//! and the upstreams run on CPU 1. Needs dnsperf, dnsmasq and taskset
//! (scripts/install-deps-dns.sh); no root, loopback only.
//!
//! Method, per row set and client:
//! - throughput: one run per server as fast as the client goes (dnsperf `-c 4 -q 200`,
//!   the mmsg client with 200 in flight) for `--seconds`: the q/s, saturated;
//! - latency: `--rounds` rounds (default 7) of `--round-seconds` (default 2) per server
//!   at one fixed offered rate for every server of the row — `--rate` (default 10,000
//!   q/s), but at most half the q/s the slowest server of the row reached in its
//!   throughput run, so no server runs near its capacity (a saturated server queues,
//!   and the p99 of a saturating client measures that queue, not the server). The
//!   servers' rounds are interleaved (agent, dnsmasq, …, then reversed: …, dnsmasq,
//!   agent), so each pair of rounds sees the same machine. A row's p50/p99 is the
//!   median over its rounds, its max the longest answer of any round; the agent/other
//!   p99 ratio is the median of the per-round ratios, printed with its range (module
//!   `rounds`). One 10 s run's p99 on a shared 2-vCPU machine is set by a few
//!   scheduling stalls, and single-run verdicts flipped between runs (BENCHMARKS.md,
//!   session 14); the median of paired rounds is not moved by one stalled round.
//! - The cached rows' upstream answers with TTL 3600, so names warmed once before the
//!   rows stay cached to the last round.
//!
//! Two clients. dnsperf needs ~5.5 µs of its CPU per query, more than the agent's server
//! per mesh answer, so on a 2-vCPU machine its one core caps the agent's q/s. The rows
//! named `… (mmsg client)` repeat the mesh, forwarded and forwarded-cached runs with this
//! program's own client (`--mmsg-client`, module `mmsg`: batched `sendmmsg`/`recvmmsg`,
//! pre-built queries of the same names, 4 sockets and 200 queries in flight as dnsperf's
//! `-c 4 -q 200`, every answer checked: NOERROR, the question echoed, an A record with the
//! name's address; anything else counts as an error), also pinned to CPU 1. Each row
//! prints the client's own CPU time per answered query (`client µs/q`: dnsperf's from
//! this program's waited-for children in /proc, the mmsg client's from its process CPU
//! clock), so the table shows which side a q/s is limited by. Each row's verdict names its
//! client.
#![allow(
    clippy::disallowed_methods,
    reason = "a benchmark driver: blocking waits and exits are intended"
)]

use std::io::{BufRead as _, Write as _};
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use causeway_agent::config::{DnsConfig, DnsMode};

#[path = "dns_perf/mmsg.rs"]
mod mmsg;
#[path = "dns_perf/rounds.rs"]
mod rounds;

/// The TTL of the cached rows' upstream answers: longer than a whole run, so the names
/// warmed once are still cached in the last round.
const UPSTREAM_TTL: u32 = 3600;
use causeway_api::push::{EndpointState, MeshState, ServiceState};
use serde_json::json;

fn free_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn vip(i: usize) -> String {
    format!("240.240.{}.{}", 1 + i / 250, 1 + i % 250)
}

fn mesh(n: usize) -> MeshState {
    let mut s = MeshState {
        version: 1,
        vip_cidr: "240.240.0.0/16".parse().ok(),
        ..MeshState::default()
    };
    for i in 0..n {
        let ep = EndpointState {
            address: format!("10.1.{}.{}", i / 250, 1 + i % 250),
            ports: [("http".to_owned(), 8080)].into(),
            healthy: true,
            zone: None,
            identity: None,
            source: "file".into(),
            stale: false,
            labels: Default::default(),
            mtls_strict: false,
            region: None,
        };
        s.services.insert(
            format!("default/svc{i}"),
            ServiceState {
                vip: vip(i).parse().ok(),
                endpoints: [("file/1".to_owned(), ep)].into(),
                hostnames: vec![],
                source_kinds: vec!["file".into()],
                consul_tags: vec![],
                consul_datacenters: vec![],
                eureka_vips: vec![],
            },
        );
    }
    s
}

/// `--serve LISTEN UPSTREAM SERVICES CACHE`: run the agent's DNS server (cache "on" or
/// "off") until stdin closes.
fn serve(listen: &str, upstream: &str, n: usize, cache: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let cfg = DnsConfig {
            mode: DnsMode::Off,
            listen: listen.parse()?,
            upstreams: vec![upstream.to_owned()],
            cache,
            ..DnsConfig::default()
        };
        let state = causeway_agent::push::SharedState::new(mesh(n));
        let dns = causeway_agent::dns::Dns::start(&cfg, false, 0x4357, state, dir.path()).await?;
        println!("ready");
        std::io::stdout().flush()?;
        // Until the driver closes our stdin.
        tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        })
        .await?;
        dns.stop().await;
        Ok(())
    })
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn wait_answers(port: u16, name: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        let out = Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "+short",
                "+time=1",
                "+tries=1",
                name,
            ])
            .output()?;
        if out.status.success() && !out.stdout.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the server on port {port} does not answer {name}")
}

/// How a dnsmasq runs: its cache (None: dnsmasq's default, 150 names) and the TTL of
/// the names it answers from its hosts file (None: its default, 0).
#[derive(Debug, Clone, Copy)]
struct Dnsmasq {
    cache: Option<u32>,
    local_ttl: Option<u32>,
}

const NO_CACHE: Dnsmasq = Dnsmasq {
    cache: Some(0),
    local_ttl: None,
};

fn dnsmasq(
    port: u16,
    hosts: &Path,
    upstream: Option<u16>,
    pin: &str,
    how: Dnsmasq,
) -> anyhow::Result<Killed> {
    let mut c = Command::new("taskset");
    c.args(["-c", pin, "dnsmasq"]).args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        "--pid-file",
        "--user=root",
        "--dns-forward-max=1000",
    ]);
    if let Some(n) = how.cache {
        c.arg(format!("--cache-size={n}"));
    }
    if let Some(t) = how.local_ttl {
        c.arg(format!("--local-ttl={t}"));
    }
    c.arg(format!("--port={port}"))
        .arg(format!("--addn-hosts={}", hosts.display()));
    if let Some(u) = upstream {
        c.arg(format!("--server=127.0.0.1#{u}"));
    }
    let child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start dnsmasq (install: scripts/install-deps-dns.sh)")?;
    Ok(Killed(child))
}

#[derive(Debug, Clone, Default)]
struct Run {
    qps: f64,
    lost: String,
    /// The server's CPU time (user + system, all its threads) per answered query in the
    /// throughput run, µs.
    cpu_us_per_q: f64,
    /// How busy CPU 1 (the client's) was during the throughput run, 0–1, counting all
    /// its work (other programs too, on a busy machine): on a quiet machine, near 1 means
    /// the client itself limits the q/s, not the server.
    client_busy: f64,
    /// The client's own CPU time (user + system) per answered query in the throughput
    /// run, µs.
    client_cpu_us_per_q: f64,
    /// Wrong answers, throughput run and latency rounds (the mmsg client checks every
    /// answer; dnsperf: None).
    errors: Option<u64>,
    /// The latency rounds, in the order they ran.
    rounds: Vec<Latency>,
}

impl Run {
    fn per_round(&self, f: impl Fn(&Latency) -> f64) -> Vec<f64> {
        self.rounds.iter().map(f).collect()
    }
    /// The median over the rounds of their p50.
    fn p50_ms(&self) -> f64 {
        rounds::median_range(&self.per_round(|l| l.p50_ms)).0
    }
    /// The median over the rounds of their p99.
    fn p99_ms(&self) -> f64 {
        rounds::median_range(&self.per_round(|l| l.p99_ms)).0
    }
    /// The longest latency of any round.
    fn max_ms(&self) -> f64 {
        self.per_round(|l| l.max_ms)
            .into_iter()
            .fold(f64::NAN, f64::max)
    }
}

/// One latency round of one server: every answer's latency at a fixed offered rate.
#[derive(Debug, Clone, Copy, Default)]
struct Latency {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Wrong answers (mmsg client; 0 for dnsperf, which does not check).
    errors: u64,
}

/// CPU time (user + system, seconds) of this program's children that were waited for
/// (`/proc/self/stat` cutime + cstime): a delta around a `Command::output` is that
/// command's CPU time.
fn children_cpu_secs() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = s.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(13)?.parse::<u64>().ok()? + f.get(14)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// CPU time (user + system, seconds) process `pid` has used so far (`/proc/PID/stat`,
/// in USER_HZ ticks: 100 per second on Linux).
fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// (busy, total) ticks of CPU `n` so far (`/proc/stat`; idle and iowait are not busy).
fn cpu_ticks(n: usize) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().find(|l| l.starts_with(&format!("cpu{n} ")))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total))
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(str::trim)
}

/// dnsperf's throughput run: as fast as it goes (`-c 4 -q 200`) for `seconds`.
fn dnsperf_throughput(port: u16, pid: u32, data: &Path, seconds: u64) -> anyhow::Result<Run> {
    let port_s = port.to_string();
    let secs = seconds.to_string();
    let (cpu0, client0, own0) = (cpu_secs(pid), cpu_ticks(1), children_cpu_secs());
    let out = Command::new("taskset")
        .args(["-c", "1", "dnsperf", "-s", "127.0.0.1", "-p", &port_s, "-d"])
        .arg(data)
        .args(["-l", &secs, "-c", "4", "-q", "200", "-t", "2"])
        .output()
        .context("run dnsperf (install: scripts/install-deps-dns.sh)")?;
    let (cpu1, client1, own1) = (cpu_secs(pid), cpu_ticks(1), children_cpu_secs());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let qps: f64 = field(&text, "Queries per second:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("dnsperf output without qps:\n{text}"))?;
    let completed: f64 = field(&text, "Queries completed:")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    let cpu_us_per_q = match (cpu0, cpu1) {
        (Some(a), Some(b)) => (b - a) * 1e6 / completed,
        _ => f64::NAN,
    };
    let client_busy = busy(client0, client1);
    let client_cpu_us_per_q = match (own0, own1) {
        (Some(a), Some(b)) => (b - a) * 1e6 / completed,
        _ => f64::NAN,
    };
    let lost = field(&text, "Queries lost:").unwrap_or("?").to_owned();
    Ok(Run {
        qps,
        lost,
        cpu_us_per_q,
        client_busy,
        client_cpu_us_per_q,
        errors: None,
        rounds: Vec::new(),
    })
}

/// One dnsperf latency round: `rate` q/s (`-Q`) for `seconds`, every query's latency
/// reported (`-v`).
fn dnsperf_latency(port: u16, data: &Path, seconds: u64, rate: u64) -> anyhow::Result<Latency> {
    let out = Command::new("taskset")
        .args(["-c", "1", "dnsperf", "-s", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .arg("-d")
        .arg(data)
        .args(["-l", &seconds.to_string(), "-Q", &rate.to_string()])
        .args(["-t", "2", "-v"])
        .output()
        .context("run dnsperf (install: scripts/install-deps-dns.sh)")?;
    let [p50_ms, p99_ms, max_ms] = percentiles(&String::from_utf8_lossy(&out.stdout))?;
    Ok(Latency {
        p50_ms,
        p99_ms,
        max_ms,
        errors: 0,
    })
}

/// The busy share of CPU 1 between two `cpu_ticks(1)` readings.
fn busy(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> f64 {
    match (a, b) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => (b1 - b0) as f64 / (t1 - t0) as f64,
        _ => f64::NAN,
    }
}

/// One run of the mmsg client (this program with `--mmsg-client`) pinned to CPU 1: its
/// JSON report.
fn mmsg_once(
    port: u16,
    data: &Path,
    seconds: u64,
    rate: Option<u64>,
) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("taskset")
        .args(["-c", "1"])
        .arg(std::env::current_exe()?)
        .arg("--mmsg-client")
        .arg(format!("127.0.0.1:{port}"))
        .arg(data)
        .args([
            seconds.to_string(),
            "200".into(),
            "4".into(),
            rate.unwrap_or(0).to_string(),
        ])
        .output()
        .context("run the mmsg client")?;
    if !out.status.success() {
        bail!(
            "the mmsg client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("the mmsg client's report")
}

/// The wrong answers of one mmsg client report, said on stderr by kind when there are any.
fn wrong_answers(port: u16, report: &serde_json::Value, during: &str) -> u64 {
    let errors = report["errors"].as_u64().unwrap_or(0);
    if errors > 0 {
        eprintln!(
            "mmsg client, port {port}: wrong answers in {during}: {}",
            report["errors_by_kind"]
        );
    }
    errors
}

/// The mmsg client's throughput run: as fast as the answers come, 200 in flight.
fn mmsg_throughput(port: u16, pid: u32, data: &Path, seconds: u64) -> anyhow::Result<Run> {
    let (cpu0, client0) = (cpu_secs(pid), cpu_ticks(1));
    let t = mmsg_once(port, data, seconds, None)?;
    let (cpu1, client1) = (cpu_secs(pid), cpu_ticks(1));
    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let ok = num(&t, "ok");
    let cpu_us_per_q = match (cpu0, cpu1) {
        (Some(a), Some(b)) => (b - a) * 1e6 / ok,
        _ => f64::NAN,
    };
    let errors = wrong_answers(port, &t, "the throughput run");
    Ok(Run {
        qps: num(&t, "qps"),
        lost: format!("{}", t["lost"].as_u64().unwrap_or(0)),
        cpu_us_per_q,
        client_busy: busy(client0, client1),
        client_cpu_us_per_q: num(&t, "cpu_us_per_query"),
        errors: Some(errors),
        rounds: Vec::new(),
    })
}

/// One latency round of the mmsg client: `rate` q/s for `seconds`.
fn mmsg_latency(port: u16, data: &Path, seconds: u64, rate: u64) -> anyhow::Result<Latency> {
    let l = mmsg_once(port, data, seconds, Some(rate))?;
    let num = |k: &str| l[k].as_f64().unwrap_or(f64::NAN);
    let errors = wrong_answers(port, &l, "a latency round");
    Ok(Latency {
        p50_ms: num("p50_ms"),
        p99_ms: num("p99_ms"),
        max_ms: num("max_ms"),
        errors,
    })
}

/// `--mmsg-client SERVER FILE SECONDS OUTSTANDING SOCKETS RATE` (RATE 0: as fast as the
/// answers come): runs the mmsg client and prints its JSON report.
fn mmsg_main(args: &[String]) -> anyhow::Result<()> {
    let [_, server, file, seconds, outstanding, sockets, rate] = args else {
        bail!(
            "usage: dns_perf --mmsg-client SERVER FILE SECONDS OUTSTANDING SOCKETS RATE (RATE 0: as fast as it goes)"
        );
    };
    let queries = mmsg::read_queries(Path::new(file))?;
    let rate: u64 = rate.parse().context("RATE")?;
    let o = mmsg::Options {
        server: server
            .parse()
            .with_context(|| format!("SERVER {server:?}"))?,
        seconds: seconds.parse().context("SECONDS")?,
        outstanding: outstanding.parse().context("OUTSTANDING")?,
        sockets: sockets.parse().context("SOCKETS")?,
        rate: (rate > 0).then_some(rate),
        timeout: Duration::from_secs(2),
    };
    println!("{}", mmsg::run(&queries, &o)?);
    Ok(())
}

/// p50, p99 and max (ms) of the per-query latencies `dnsperf -v` printed.
fn percentiles(text: &str) -> anyhow::Result<[f64; 3]> {
    let mut lat: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("> ") && !l.starts_with("> T "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .collect();
    if lat.is_empty() {
        bail!("dnsperf -v reported no latencies");
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i.min(lat.len() - 1)] * 1000.0
    };
    Ok([pct(0.50), pct(0.99), pct(1.0)])
}

/// Every name of `data` once (dnsperf -n 1): as fast as it goes (the warm-up), or at
/// `rate` q/s with every query's latency (the cold pass); lost, and p50/p99/max (ms)
/// when at a rate.
fn dnsperf_once(
    port: u16,
    data: &Path,
    rate: Option<u64>,
) -> anyhow::Result<(String, Option<[f64; 3]>)> {
    let rate_args: Vec<String> = match rate {
        Some(r) => vec!["-Q".into(), r.to_string(), "-v".into()],
        None => vec!["-c".into(), "4".into(), "-q".into(), "200".into()],
    };
    let out = Command::new("taskset")
        .args([
            "-c",
            "1",
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-d",
        ])
        .arg(data)
        .args(["-n", "1", "-t", "2"])
        .args(&rate_args)
        .output()
        .context("run dnsperf (install: scripts/install-deps-dns.sh)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lost = field(&text, "Queries lost:")
        .with_context(|| format!("dnsperf output without a result:\n{text}"))?
        .to_owned();
    let pct = match rate {
        Some(_) => Some(percentiles(&text)?),
        None => None,
    };
    Ok((lost, pct))
}

/// A row set: names, its query files (dnsperf's, the mmsg client's), servers (the agent
/// first) with their ports and pids.
type NameSet<'a> = (&'a str, [&'a Path; 2], Vec<(&'a str, u16, u32)>);

/// The load generator of a block of rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    Dnsperf,
    Mmsg,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Dnsperf => "dnsperf",
            Client::Mmsg => "mmsg",
        }
    }

    /// The query file of `set` for this client.
    fn file<'a>(self, set: &NameSet<'a>) -> &'a Path {
        set.1[usize::from(self == Client::Mmsg)]
    }

    /// The row label of name set `set`.
    fn label(self, set: &str) -> String {
        match self {
            Client::Dnsperf => set.to_owned(),
            Client::Mmsg => format!("{set} (mmsg client)"),
        }
    }

    fn throughput(self, port: u16, pid: u32, data: &Path, seconds: u64) -> anyhow::Result<Run> {
        match self {
            Client::Dnsperf => dnsperf_throughput(port, pid, data, seconds),
            Client::Mmsg => mmsg_throughput(port, pid, data, seconds),
        }
    }

    fn latency(self, port: u16, data: &Path, seconds: u64, rate: u64) -> anyhow::Result<Latency> {
        match self {
            Client::Dnsperf => dnsperf_latency(port, data, seconds, rate),
            Client::Mmsg => mmsg_latency(port, data, seconds, rate),
        }
    }
}

/// How long and how fast: the throughput runs' length, the latency rounds' rate (at
/// most; see [`rounds::offered_rate`]), number and length.
#[derive(Debug, Clone, Copy)]
struct Plan {
    seconds: u64,
    rate: u64,
    rounds: usize,
    round_seconds: u64,
}

/// One row set with one client: each server's throughput run (saturated), then
/// `plan.rounds` latency rounds of every server at one offered rate, the servers
/// interleaved (order reversed every round). The runs (in the set's server order) and
/// the offered rate.
fn measure(client: Client, set: &NameSet<'_>, plan: &Plan) -> anyhow::Result<(Vec<Run>, u64)> {
    let file = client.file(set);
    let servers = &set.2;
    let mut runs = Vec::with_capacity(servers.len());
    for (_, port, pid) in servers {
        runs.push(client.throughput(*port, *pid, file, plan.seconds)?);
    }
    let qps: Vec<f64> = runs.iter().map(|r| r.qps).collect();
    let rate = rounds::offered_rate(plan.rate, &qps);
    // Let the last saturated run's backlog (socket queues, timed-out queries, the
    // kernel's deferred work) drain before the first round.
    std::thread::sleep(Duration::from_secs(1));
    for r in 0..plan.rounds {
        for i in rounds::order(r, servers.len()) {
            let l = client.latency(servers[i].1, file, plan.round_seconds, rate)?;
            if let Some(e) = runs[i].errors.as_mut() {
                *e += l.errors;
            }
            runs[i].rounds.push(l);
        }
    }
    Ok((runs, rate))
}

/// Starts the agent's DNS server (this program with `--serve`) pinned to CPU 0.
fn agent(port: u16, upstream: u16, services: usize, cache: bool) -> anyhow::Result<(Killed, u32)> {
    let exe = std::env::current_exe()?;
    let mut agent = Command::new("taskset")
        .args(["-c", "0"])
        .arg(&exe)
        .args([
            "--serve",
            &format!("127.0.0.1:{port}"),
            &format!("127.0.0.1:{upstream}"),
            &services.to_string(),
            if cache { "on" } else { "off" },
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(agent.stdout.take().context("stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("the agent's DNS server did not start: {line:?}");
    }
    let pid = agent.id();
    Ok((Killed(agent), pid))
}

/// A throughput/latency row as JSON.
fn run_json(set: &str, server: &str, client: &str, r: &Run, rate: u64) -> serde_json::Value {
    json!({"names": set, "server": server, "client": client, "qps": r.qps, "lost": r.lost,
    "errors": r.errors, "latency_rate": rate, "latency_rounds": r.rounds.len(),
    "p50_ms": r.p50_ms(), "p99_ms": r.p99_ms(), "max_ms": r.max_ms(),
    "p50_rounds_ms": r.per_round(|l| l.p50_ms), "p99_rounds_ms": r.per_round(|l| l.p99_ms),
    "max_rounds_ms": r.per_round(|l| l.max_ms),
    "server_cpu_us_per_query": r.cpu_us_per_q, "client_cpu_busy": r.client_busy,
    "client_cpu_us_per_query": r.client_cpu_us_per_q})
}

/// The agent's run against another's: q/s ratio, p99 ratio (median over the rounds of
/// the per-round ratios, with its min and max), server CPU per query ratio (below 1:
/// the agent needs less).
fn ratios(agent: &Run, other: &Run) -> (f64, (f64, f64, f64), f64) {
    let p99 = rounds::ratios(
        &agent.per_round(|l| l.p99_ms),
        &other.per_round(|l| l.p99_ms),
    );
    (
        agent.qps / other.qps,
        rounds::median_range(&p99),
        agent.cpu_us_per_q / other.cpu_us_per_q,
    )
}

/// One line of the verdict.
struct Verdict {
    row: String,
    client: &'static str,
    what: String,
    pass: bool,
}

/// The verdict of `agent` against `other` on name set `set`, printed as row `label`:
/// mesh ≥ 1.5× q/s; the forwarded sets ≥ 1.0× q/s and p99 ≤ the other's (the median
/// of the per-round ratios at offered rate `rate`); and, with the mmsg client, no wrong
/// answer from either server.
fn verdict(
    label: &str,
    set: &str,
    server: &str,
    client: &'static str,
    (agent, other): (&Run, &Run),
    rate: u64,
) -> Verdict {
    let (q, (p99, lo, hi), _) = ratios(agent, other);
    let (min_q, check_p99) = if set == "mesh" {
        (1.5, false)
    } else {
        (1.0, true)
    };
    let errors = agent.errors.unwrap_or(0) + other.errors.unwrap_or(0);
    let pass = q >= min_q && (!check_p99 || p99 <= 1.0) && errors == 0;
    let mut what = format!("q/s {q:.2}× (target ≥ {min_q:.1}×)");
    if check_p99 {
        what.push_str(&format!(
            ", p99 {p99:.2}× (median of {} rounds at {rate} q/s, {lo:.2}–{hi:.2}×; target ≤ 1.0×)",
            agent.rounds.len().min(other.rounds.len())
        ));
    }
    if errors > 0 {
        what.push_str(&format!(", {errors} wrong answers"));
    }
    Verdict {
        row: format!("{label} agent/{server}"),
        client,
        what,
        pass,
    }
}

/// Measures every row set with `client` and prints its table: per server the
/// throughput run's q/s, lost, (mmsg) wrong answers, CPU per query and the client's,
/// and the latency rounds' median p50 and p99 and their longest answer; per agent/other
/// pair the q/s ratio, the p99 ratio (median of the rounds, min–max) and the CPU ratio;
/// then each server's p99 round by round. Appends the rows' JSON and verdicts.
fn run_client(
    client: Client,
    sets: &[NameSet<'_>],
    plan: &Plan,
    results: &mut Vec<serde_json::Value>,
    verdicts: &mut Vec<Verdict>,
) -> anyhow::Result<()> {
    println!(
        "{:<30} {:<20} {:>10} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7} {:>11}",
        "names",
        "server",
        "q/s",
        "lost",
        "errors",
        "p50 ms",
        "p99 ms",
        "max ms",
        "CPU µs/q",
        "CPU1 %",
        "client µs/q"
    );
    let mut per_round = Vec::new();
    for set in sets {
        let (name, _, servers) = set;
        let label = client.label(name);
        let (runs, rate) = measure(client, set, plan)?;
        for ((server, _, _), r) in servers.iter().zip(&runs) {
            println!(
                "{label:<30} {server:<20} {:>10.0} {:>8} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9.2} {:>7.0} {:>11.2}",
                r.qps,
                r.lost,
                r.errors.map_or("-".to_owned(), |e| e.to_string()),
                r.p50_ms(),
                r.p99_ms(),
                r.max_ms(),
                r.cpu_us_per_q,
                r.client_busy * 100.0,
                r.client_cpu_us_per_q,
            );
            results.push(run_json(name, server, client.name(), r, rate));
            per_round.push(format!(
                "  {label:<30} {server:<20} at {rate:>6} q/s: {}",
                r.per_round(|l| l.p99_ms)
                    .iter()
                    .map(|v| format!("{v:.3}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
        for (i, (server, _, _)) in servers.iter().enumerate().skip(1) {
            let (q, (p99, lo, hi), cpu) = ratios(&runs[0], &runs[i]);
            println!(
                "{label:<30} {:<20} {q:>10.2} {:>8} {:>7} {:>9} {:>9} {:>9} {cpu:>9.2}",
                format!("agent/{server}"),
                "",
                "",
                "",
                format!("{p99:.2}"),
                format!("{lo:.2}–{hi:.2}"),
            );
            verdicts.push(verdict(
                &label,
                name,
                server,
                client.name(),
                (&runs[0], &runs[i]),
                rate,
            ));
        }
    }
    println!(
        "(agent/… lines: q/s ratio; in the p99 column the median of the per-round p99 ratios, in the max column their range; CPU ratio)"
    );
    println!(
        "p99 ms per latency round ({} rounds, {} s each, servers interleaved, order reversed every round):",
        plan.rounds, plan.round_seconds
    );
    for l in per_round {
        println!("{l}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--serve") {
        let [_, listen, upstream, n, cache] = args.as_slice() else {
            bail!("usage: dns_perf --serve LISTEN UPSTREAM SERVICES on|off");
        };
        return serve(listen, upstream, n.parse()?, cache == "on");
    }
    if args.first().map(String::as_str) == Some("--mmsg-client") {
        return mmsg_main(&args);
    }
    let mut json_out = None;
    let mut services = 1000usize;
    let mut seconds = 10u64;
    let mut rate = 10_000u64;
    let mut cold = 20_000usize;
    let mut latency_rounds = 7usize;
    let mut round_seconds = 2u64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().context("missing value");
        match a.as_str() {
            "--json" => json_out = Some(val()?.clone()),
            "--services" => services = val()?.parse()?,
            "--seconds" => seconds = val()?.parse()?,
            "--rate" => rate = val()?.parse()?,
            "--cold" => cold = val()?.parse()?,
            "--rounds" => latency_rounds = val()?.parse()?,
            "--round-seconds" => round_seconds = val()?.parse()?,
            other => bail!(
                "unknown argument {other}; usage: dns_perf [--json FILE] [--services N] [--seconds S] [--rate QPS] [--rounds N] [--round-seconds S] [--cold NAMES]"
            ),
        }
    }
    if latency_rounds == 0 || round_seconds == 0 || rate == 0 {
        bail!(
            "--rounds {latency_rounds}, --round-seconds {round_seconds}, --rate {rate}: each must be at least 1 (defaults 7, 2, 10000)"
        );
    }
    let plan = Plan {
        seconds,
        rate,
        rounds: latency_rounds,
        round_seconds,
    };
    let dir = tempfile::tempdir()?;
    let mesh_hosts = dir.path().join("mesh.hosts");
    let outside_hosts = dir.path().join("outside.hosts");
    let mesh_q = dir.path().join("mesh.queries");
    let outside_q = dir.path().join("outside.queries");
    let cold_q = dir.path().join("cold.queries");
    // The same names for the mmsg client, each with the address its answer must carry.
    let mesh_mq = dir.path().join("mesh.mmsg-queries");
    let outside_mq = dir.path().join("outside.mmsg-queries");
    let (mut mh, mut oh, mut mq, mut oq, mut cq) = (
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    );
    let (mut mmq, mut omq) = (String::new(), String::new());
    for i in 0..services {
        mh.push_str(&format!(
            "{} svc{i}.default.causeway svc{i}.default.svc.cluster.local\n",
            vip(i)
        ));
        mq.push_str(&format!("svc{i}.default.causeway A\n"));
        mq.push_str(&format!("svc{i}.default.svc.cluster.local A\n"));
        mmq.push_str(&format!("svc{i}.default.causeway A {}\n", vip(i)));
        mmq.push_str(&format!("svc{i}.default.svc.cluster.local A {}\n", vip(i)));
        let out_ip = format!("192.0.{}.{}", i / 250, 1 + i % 250);
        oh.push_str(&format!("{out_ip} host{i}.outside.test\n"));
        oq.push_str(&format!("host{i}.outside.test A\n"));
        omq.push_str(&format!("host{i}.outside.test A {out_ip}\n"));
    }
    for i in 0..cold {
        oh.push_str(&format!(
            "198.18.{}.{} cold{i}.outside.test\n",
            i / 250 % 256,
            1 + i % 250
        ));
        cq.push_str(&format!("cold{i}.outside.test A\n"));
    }
    std::fs::write(&mesh_hosts, mh)?;
    std::fs::write(&outside_hosts, oh)?;
    std::fs::write(&mesh_q, mq)?;
    std::fs::write(&outside_q, oq)?;
    std::fs::write(&cold_q, cq)?;
    std::fs::write(&mesh_mq, mmq)?;
    std::fs::write(&outside_mq, omq)?;

    // Upstreams: TTL 0 (the forwarding paths alone) and TTL 3600 (for the caches: the
    // names warmed once stay cached for the whole run, rounds included).
    let (up_port, up_ttl_port) = (free_port()?, free_port()?);
    let _upstream = dnsmasq(up_port, &outside_hosts, None, "1", NO_CACHE)?;
    let _upstream_ttl = dnsmasq(
        up_ttl_port,
        &outside_hosts,
        None,
        "1",
        Dnsmasq {
            cache: Some(0),
            local_ttl: Some(UPSTREAM_TTL),
        },
    )?;
    wait_answers(up_port, "host0.outside.test")?;
    wait_answers(up_ttl_port, "host0.outside.test")?;
    let (agent_port, cagent_port) = (free_port()?, free_port()?);
    let (base_port, dflt_port, big_port) = (free_port()?, free_port()?, free_port()?);
    // `taskset` execs the server: the child's pid is the server's.
    let (agent_proc, agent_pid) = agent(agent_port, up_port, services, false)?;
    let (cagent_proc, cagent_pid) = agent(cagent_port, up_ttl_port, services, true)?;
    let baseline = dnsmasq(base_port, &mesh_hosts, Some(up_port), "0", NO_CACHE)?;
    let dflt = dnsmasq(
        dflt_port,
        &mesh_hosts,
        Some(up_ttl_port),
        "0",
        Dnsmasq {
            cache: None,
            local_ttl: None,
        },
    )?;
    let big = dnsmasq(
        big_port,
        &mesh_hosts,
        Some(up_ttl_port),
        "0",
        Dnsmasq {
            cache: Some(10_000),
            local_ttl: None,
        },
    )?;
    for p in [agent_port, cagent_port, base_port, dflt_port, big_port] {
        wait_answers(p, "svc0.default.causeway")?;
    }
    for p in [agent_port, base_port] {
        wait_answers(p, "host0.outside.test")?;
    }

    println!(
        "{services} services ({} mesh names), {seconds}s throughput runs (dnsperf -c 4 -q 200, then the mmsg client: saturated); latency in {latency_rounds} rounds of {round_seconds}s per server, interleaved, at {rate} q/s (at most half the slower server's q/s); servers pinned to CPU 0, the clients and the upstreams to CPU 1",
        services * 2
    );
    println!(
        "forwarded: upstream TTL 0, agent cache off, dnsmasq --cache-size=0; forwarded-cached: upstream TTL {UPSTREAM_TTL}, warm, agent cache on, dnsmasq default cache (150) and --cache-size=10000"
    );
    // The cold pass first: no cached server has seen these names.
    println!();
    println!(
        "{:<17} {:<20} {:>10} {:>12} {:>9} {:>9} {:>9}",
        "cold (once each)", "server", "q/s", "lost", "p50 ms", "p99 ms", "max ms"
    );
    let mut cold_results = Vec::new();
    for (server, port) in [
        ("agent", cagent_port),
        ("dnsmasq", dflt_port),
        ("dnsmasq-c10000", big_port),
    ] {
        let (lost, pct) = dnsperf_once(port, &cold_q, Some(rate))?;
        let [p50, p99, max] = pct.unwrap_or([f64::NAN; 3]);
        println!(
            "{:<17} {server:<20} {:>10} {lost:>12} {p50:>9.3} {p99:>9.3} {max:>9.3}",
            format!("{cold} names"),
            format!("(at {rate})"),
        );
        cold_results.push(
            json!({"names": "cold", "count": cold, "server": server, "rate": rate,
            "lost": lost, "p50_ms": p50, "p99_ms": p99, "max_ms": max}),
        );
    }
    // Warm the caches with the names of the cached rows (their TTL outlasts the run).
    for port in [cagent_port, dflt_port, big_port] {
        dnsperf_once(port, &outside_q, None)?;
    }
    let mut results = Vec::new();
    let mut mmsg_results = Vec::new();
    let mut verdicts = Vec::new();
    let (base_pid, dflt_pid, big_pid) = (baseline.0.id(), dflt.0.id(), big.0.id());
    let sets: [NameSet<'_>; 3] = [
        (
            "mesh",
            [&mesh_q, &mesh_mq],
            vec![
                ("agent", agent_port, agent_pid),
                ("dnsmasq", base_port, base_pid),
            ],
        ),
        (
            "forwarded",
            [&outside_q, &outside_mq],
            vec![
                ("agent", agent_port, agent_pid),
                ("dnsmasq", base_port, base_pid),
            ],
        ),
        (
            "forwarded-cached",
            [&outside_q, &outside_mq],
            vec![
                ("agent", cagent_port, cagent_pid),
                ("dnsmasq", dflt_port, dflt_pid),
                ("dnsmasq-c10000", big_port, big_pid),
            ],
        ),
    ];
    println!();
    println!(
        "client: dnsperf on CPU 1 (throughput -c 4 -q 200; latency rounds -Q RATE -v); p50/p99: median of the rounds, max: of all rounds"
    );
    run_client(Client::Dnsperf, &sets, &plan, &mut results, &mut verdicts)?;
    println!();
    println!(
        "client: mmsg on CPU 1 (this program, --mmsg-client: sendmmsg/recvmmsg, 4 sockets, 200 in flight, every answer checked)"
    );
    run_client(Client::Mmsg, &sets, &plan, &mut mmsg_results, &mut verdicts)?;
    println!();
    println!("verdict:");
    for v in &verdicts {
        println!(
            "  {:<52} {:<8} {:<110} {}",
            v.row,
            v.client,
            v.what,
            if v.pass { "PASS" } else { "FAIL" }
        );
    }
    println!(
        "  {:<52} {:<8} reported only (no target)",
        "cold", "dnsperf"
    );
    let failed = verdicts.iter().filter(|v| !v.pass).count();
    println!(
        "  {} PASS, {failed} FAIL{}",
        verdicts.len() - failed,
        if failed == 0 {
            ": every row passes"
        } else {
            ""
        }
    );
    let rss = |pid: u32| vm_hwm_kib(pid);
    let (a_rss, ca_rss) = (rss(agent_pid), rss(cagent_pid));
    let (b_rss, d_rss, g_rss) = (rss(baseline.0.id()), rss(dflt.0.id()), rss(big.0.id()));
    let show = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or("?".into());
    println!(
        "peak RSS KiB: agent (cache off) {}, agent (cache on) {}, dnsmasq (no cache) {}, dnsmasq (default cache) {}, dnsmasq (cache 10000) {}",
        show(a_rss),
        show(ca_rss),
        show(b_rss),
        show(d_rss),
        show(g_rss)
    );
    drop((agent_proc, cagent_proc));
    if let Some(p) = json_out {
        std::fs::write(
            &p,
            serde_json::to_vec_pretty(&json!({
                "services": services, "seconds": seconds, "latency_rate": rate,
                "latency_rounds": latency_rounds, "latency_round_seconds": round_seconds,
                "upstream_ttl": UPSTREAM_TTL,
                "results": results, "mmsg_results": mmsg_results, "cold": cold_results,
                "verdict": verdicts.iter().map(|v| json!({"row": v.row, "client": v.client, "measured": v.what, "pass": v.pass})).collect::<Vec<_>>(),
                "agent_rss_kib": a_rss, "agent_cache_rss_kib": ca_rss,
                "dnsmasq_rss_kib": b_rss, "dnsmasq_default_cache_rss_kib": d_rss,
                "dnsmasq_cache_10000_rss_kib": g_rss,
            }))?,
        )?;
    }
    Ok(())
}
