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
//! - `forwarded-cached`: the caches, warm — a second upstream answers with TTL 300; the
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
//! ≥ 1.0× q/s with p99 ≤ dnsmasq's; with the mmsg client, also no wrong answer.
//!
//! Both servers under test run pinned to CPU 0 (`taskset -c 0`, one core); dnsperf and the
//! upstream run on CPU 1. Per server and name set: one throughput run (dnsperf as fast as
//! it can, `-c 4 -q 200`) for queries/s, and one latency run at a fixed rate (`--rate`,
//! dnsperf `-v` reports each query's latency) for p50/p99. Needs dnsperf, dnsmasq and
//! taskset (scripts/install-deps-dns.sh); no root, loopback only.
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
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// The server's CPU time (user + system, all its threads) per answered query in the
    /// throughput run, µs.
    cpu_us_per_q: f64,
    /// How busy CPU 1 (dnsperf's) was during the throughput run, 0–1, counting all its
    /// work (other programs too, on a busy machine): on a quiet machine, near 1 means
    /// dnsperf itself limits the q/s, not the server.
    client_busy: f64,
    /// The client's own CPU time (user + system) per answered query in the throughput
    /// run, µs.
    client_cpu_us_per_q: f64,
    /// Wrong answers (the mmsg client checks every answer; dnsperf: None).
    errors: Option<u64>,
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

fn dnsperf(port: u16, pid: u32, data: &Path, seconds: u64, rate: u64) -> anyhow::Result<Run> {
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
    // Latency at a fixed rate, every query's time reported.
    let out = Command::new("taskset")
        .args(["-c", "1", "dnsperf", "-s", "127.0.0.1", "-p", &port_s, "-d"])
        .arg(data)
        .args(["-l", "5", "-Q", &rate.to_string(), "-t", "2", "-v"])
        .output()?;
    let pct = percentiles(&String::from_utf8_lossy(&out.stdout))?;
    Ok(Run {
        qps,
        lost,
        p50_ms: pct[0],
        p99_ms: pct[1],
        max_ms: pct[2],
        cpu_us_per_q,
        client_busy,
        client_cpu_us_per_q,
        errors: None,
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

/// The mmsg client's throughput run (q/s, server and client CPU per query) and latency
/// run at `rate` (p50/p99/max), as dnsperf's.
fn mmsg_client(port: u16, pid: u32, data: &Path, seconds: u64, rate: u64) -> anyhow::Result<Run> {
    let (cpu0, client0) = (cpu_secs(pid), cpu_ticks(1));
    let t = mmsg_once(port, data, seconds, None)?;
    let (cpu1, client1) = (cpu_secs(pid), cpu_ticks(1));
    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let ok = num(&t, "ok");
    let cpu_us_per_q = match (cpu0, cpu1) {
        (Some(a), Some(b)) => (b - a) * 1e6 / ok,
        _ => f64::NAN,
    };
    let l = mmsg_once(port, data, 5, Some(rate))?;
    let errors = t["errors"].as_u64().unwrap_or(0) + l["errors"].as_u64().unwrap_or(0);
    if errors > 0 {
        eprintln!(
            "mmsg client, port {port}: wrong answers: throughput run {}, latency run {}",
            t["errors_by_kind"], l["errors_by_kind"]
        );
    }
    Ok(Run {
        qps: num(&t, "qps"),
        lost: format!("{}", t["lost"].as_u64().unwrap_or(0)),
        p50_ms: num(&l, "p50_ms"),
        p99_ms: num(&l, "p99_ms"),
        max_ms: num(&l, "max_ms"),
        cpu_us_per_q,
        client_busy: busy(client0, client1),
        client_cpu_us_per_q: num(&t, "cpu_us_per_query"),
        errors: Some(errors),
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

/// A row set: names, query file, servers (the agent first) with their ports and pids.
type NameSet<'a> = (&'a str, &'a Path, Vec<(&'a str, u16, u32)>);

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
fn run_json(set: &str, server: &str, client: &str, r: &Run) -> serde_json::Value {
    json!({"names": set, "server": server, "client": client, "qps": r.qps, "lost": r.lost,
    "errors": r.errors, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "max_ms": r.max_ms,
    "server_cpu_us_per_query": r.cpu_us_per_q, "client_cpu_busy": r.client_busy,
    "client_cpu_us_per_query": r.client_cpu_us_per_q})
}

/// The agent's run against another's: q/s ratio, p99 ratio, server CPU per query ratio
/// (below 1: the agent needs less).
fn ratios(agent: &Run, other: &Run) -> (f64, f64, f64) {
    (
        agent.qps / other.qps,
        agent.p99_ms / other.p99_ms,
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
/// mesh ≥ 1.5× q/s; the forwarded sets ≥ 1.0× q/s and p99 ≤ the other's; and, with the
/// mmsg client, no wrong answer from either server.
fn verdict(
    label: &str,
    set: &str,
    server: &str,
    client: &'static str,
    agent: &Run,
    other: &Run,
) -> Verdict {
    let (q, p99, _) = ratios(agent, other);
    let (min_q, check_p99) = if set == "mesh" {
        (1.5, false)
    } else {
        (1.0, true)
    };
    let errors = agent.errors.unwrap_or(0) + other.errors.unwrap_or(0);
    let pass = q >= min_q && (!check_p99 || p99 <= 1.0) && errors == 0;
    let mut what = format!("q/s {q:.2}× (target ≥ {min_q:.1}×)");
    if check_p99 {
        what.push_str(&format!(", p99 {p99:.2}× (target ≤ 1.0×)"));
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
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().context("missing value");
        match a.as_str() {
            "--json" => json_out = Some(val()?.clone()),
            "--services" => services = val()?.parse()?,
            "--seconds" => seconds = val()?.parse()?,
            "--rate" => rate = val()?.parse()?,
            "--cold" => cold = val()?.parse()?,
            other => bail!(
                "unknown argument {other}; usage: dns_perf [--json FILE] [--services N] [--seconds S] [--rate QPS] [--cold NAMES]"
            ),
        }
    }
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

    // Upstreams: TTL 0 (the forwarding paths alone) and TTL 300 (for the caches).
    let (up_port, up_ttl_port) = (free_port()?, free_port()?);
    let _upstream = dnsmasq(up_port, &outside_hosts, None, "1", NO_CACHE)?;
    let _upstream_ttl = dnsmasq(
        up_ttl_port,
        &outside_hosts,
        None,
        "1",
        Dnsmasq {
            cache: Some(0),
            local_ttl: Some(300),
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
        "{services} services ({} mesh names), {seconds}s throughput runs (dnsperf -c 4 -q 200, then the mmsg client), latency at {rate} q/s; servers pinned to CPU 0, the clients and the upstreams to CPU 1",
        services * 2
    );
    println!(
        "forwarded: upstream TTL 0, agent cache off, dnsmasq --cache-size=0; forwarded-cached: upstream TTL 300, warm, agent cache on, dnsmasq default cache (150) and --cache-size=10000"
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
    // Warm the caches with the names of the cached rows.
    for port in [cagent_port, dflt_port, big_port] {
        dnsperf_once(port, &outside_q, None)?;
    }
    println!();
    println!("client: dnsperf -c 4 -q 200 on CPU 1");
    println!(
        "{:<17} {:<20} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>7} {:>11}",
        "names",
        "server",
        "q/s",
        "lost",
        "p50 ms",
        "p99 ms",
        "max ms",
        "CPU µs/q",
        "CPU1 %",
        "client µs/q"
    );
    let mut results = Vec::new();
    let mut verdicts = Vec::new();
    let (base_pid, dflt_pid, big_pid) = (baseline.0.id(), dflt.0.id(), big.0.id());
    let sets: [NameSet<'_>; 3] = [
        (
            "mesh",
            &mesh_q,
            vec![
                ("agent", agent_port, agent_pid),
                ("dnsmasq", base_port, base_pid),
            ],
        ),
        (
            "forwarded",
            &outside_q,
            vec![
                ("agent", agent_port, agent_pid),
                ("dnsmasq", base_port, base_pid),
            ],
        ),
        (
            "forwarded-cached",
            &outside_q,
            vec![
                ("agent", cagent_port, cagent_pid),
                ("dnsmasq", dflt_port, dflt_pid),
                ("dnsmasq-c10000", big_port, big_pid),
            ],
        ),
    ];
    for (set, file, servers) in &sets {
        let mut runs = Vec::new();
        for (server, port, pid) in servers {
            let r = dnsperf(*port, *pid, file, seconds, rate)?;
            println!(
                "{set:<17} {server:<20} {:>10.0} {:>12} {:>9.3} {:>9.3} {:>9.3} {:>9.2} {:>7.0} {:>11.2}",
                r.qps,
                r.lost,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.cpu_us_per_q,
                r.client_busy * 100.0,
                r.client_cpu_us_per_q,
            );
            results.push(run_json(set, server, "dnsperf", &r));
            runs.push(r);
        }
        for (i, (server, _, _)) in servers.iter().enumerate().skip(1) {
            let (q, p99, cpu) = ratios(&runs[0], &runs[i]);
            println!(
                "{set:<17} {:<20} {q:>10.2} {:>12} {:>9} {p99:>9.2} {:>9} {cpu:>9.2}",
                format!("agent/{server}"),
                "",
                "",
                "",
            );
            verdicts.push(verdict(set, set, server, "dnsperf", &runs[0], &runs[i]));
        }
    }

    // The same rows with the mmsg client (the caches warmed again: their TTL is 300 s).
    for port in [cagent_port, dflt_port, big_port] {
        dnsperf_once(port, &outside_q, None)?;
    }
    println!();
    println!(
        "client: mmsg (this program, --mmsg-client: sendmmsg/recvmmsg, 4 sockets, 200 in flight, every answer checked) on CPU 1"
    );
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
    let mut mmsg_results = Vec::new();
    let mmsg_files = [&mesh_mq, &outside_mq, &outside_mq];
    for ((set, _, servers), file) in sets.iter().zip(mmsg_files) {
        let label = format!("{set} (mmsg client)");
        let mut runs = Vec::new();
        for (server, port, pid) in servers {
            let r = mmsg_client(*port, *pid, file, seconds, rate)?;
            println!(
                "{label:<30} {server:<20} {:>10.0} {:>8} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9.2} {:>7.0} {:>11.2}",
                r.qps,
                r.lost,
                r.errors.unwrap_or(0),
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.cpu_us_per_q,
                r.client_busy * 100.0,
                r.client_cpu_us_per_q,
            );
            mmsg_results.push(run_json(set, server, "mmsg", &r));
            runs.push(r);
        }
        for (i, (server, _, _)) in servers.iter().enumerate().skip(1) {
            let (q, p99, cpu) = ratios(&runs[0], &runs[i]);
            println!(
                "{label:<30} {:<20} {q:>10.2} {:>8} {:>7} {:>9} {p99:>9.2} {:>9} {cpu:>9.2}",
                format!("agent/{server}"),
                "",
                "",
                "",
                "",
            );
            verdicts.push(verdict(&label, set, server, "mmsg", &runs[0], &runs[i]));
        }
    }
    println!();
    println!("verdict:");
    for v in &verdicts {
        println!(
            "  {:<52} {:<8} {:<66} {}",
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
