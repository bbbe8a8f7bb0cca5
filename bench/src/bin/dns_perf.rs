//! DNS: the agent's server against dnsmasq, side by side in one run, with dnsperf.
//!
//! - The agent: the real server (`causeway_agent::dns::Dns`) in a child process of this
//!   program, with a mesh of `--services` services (names `svc<i>.default.causeway` and
//!   `svc<i>.default.svc.cluster.local`).
//! - The baseline: dnsmasq serving the same names from a hosts file, cache off, forwarding
//!   the rest to the same upstream.
//! - Forwarded names (`host<i>.outside.test`) go to an upstream dnsmasq (hosts file).
//!
//! Both servers under test run pinned to CPU 0 (`taskset -c 0`, one core); dnsperf and the
//! upstream run on CPU 1. Per server and name set: one throughput run (dnsperf as fast as
//! it can, `-c 4 -q 200`) for queries/s, and one latency run at a fixed rate (`--rate`,
//! dnsperf `-v` reports each query's latency) for p50/p99. Needs dnsperf, dnsmasq and
//! taskset (scripts/install-deps-dns.sh); no root, loopback only.
#![allow(
    clippy::disallowed_methods,
    reason = "a benchmark driver: blocking waits and exits are intended"
)]

use std::io::{BufRead as _, Write as _};
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context as _, bail};
use causeway_agent::config::{DnsConfig, DnsMode};
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

/// `--serve LISTEN UPSTREAM SERVICES`: run the agent's DNS server until stdin closes.
fn serve(listen: &str, upstream: &str, n: usize) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let cfg = DnsConfig {
            mode: DnsMode::Off,
            listen: listen.parse()?,
            upstreams: vec![upstream.to_owned()],
            ..DnsConfig::default()
        };
        let state = Arc::new(RwLock::new(mesh(n)));
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

fn dnsmasq(port: u16, hosts: &Path, upstream: Option<u16>, pin: &str) -> anyhow::Result<Killed> {
    let mut c = Command::new("taskset");
    c.args(["-c", pin, "dnsmasq"]).args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        "--pid-file",
        "--user=root",
        "--cache-size=0",
        "--dns-forward-max=1000",
    ]);
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
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(str::trim)
}

fn dnsperf(port: u16, data: &Path, seconds: u64, rate: u64) -> anyhow::Result<Run> {
    let port_s = port.to_string();
    let secs = seconds.to_string();
    let out = Command::new("taskset")
        .args(["-c", "1", "dnsperf", "-s", "127.0.0.1", "-p", &port_s, "-d"])
        .arg(data)
        .args(["-l", &secs, "-c", "4", "-q", "200", "-t", "2"])
        .output()
        .context("run dnsperf (install: scripts/install-deps-dns.sh)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let qps: f64 = field(&text, "Queries per second:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("dnsperf output without qps:\n{text}"))?;
    let lost = field(&text, "Queries lost:").unwrap_or("?").to_owned();
    // Latency at a fixed rate, every query's time reported.
    let out = Command::new("taskset")
        .args(["-c", "1", "dnsperf", "-s", "127.0.0.1", "-p", &port_s, "-d"])
        .arg(data)
        .args(["-l", "5", "-Q", &rate.to_string(), "-t", "2", "-v"])
        .output()?;
    let mut lat: Vec<f64> = String::from_utf8_lossy(&out.stdout)
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
    Ok(Run {
        qps,
        lost,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--serve") {
        let [_, listen, upstream, n] = args.as_slice() else {
            bail!("usage: dns_perf --serve LISTEN UPSTREAM SERVICES");
        };
        return serve(listen, upstream, n.parse()?);
    }
    let mut json_out = None;
    let mut services = 1000usize;
    let mut seconds = 10u64;
    let mut rate = 10_000u64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().context("missing value");
        match a.as_str() {
            "--json" => json_out = Some(val()?.clone()),
            "--services" => services = val()?.parse()?,
            "--seconds" => seconds = val()?.parse()?,
            "--rate" => rate = val()?.parse()?,
            other => bail!(
                "unknown argument {other}; usage: dns_perf [--json FILE] [--services N] [--seconds S] [--rate QPS]"
            ),
        }
    }
    let dir = tempfile::tempdir()?;
    let mesh_hosts = dir.path().join("mesh.hosts");
    let outside_hosts = dir.path().join("outside.hosts");
    let mesh_q = dir.path().join("mesh.queries");
    let outside_q = dir.path().join("outside.queries");
    let (mut mh, mut oh, mut mq, mut oq) =
        (String::new(), String::new(), String::new(), String::new());
    for i in 0..services {
        mh.push_str(&format!(
            "{} svc{i}.default.causeway svc{i}.default.svc.cluster.local\n",
            vip(i)
        ));
        mq.push_str(&format!("svc{i}.default.causeway A\n"));
        mq.push_str(&format!("svc{i}.default.svc.cluster.local A\n"));
        oh.push_str(&format!(
            "192.0.{}.{} host{i}.outside.test\n",
            i / 250,
            1 + i % 250
        ));
        oq.push_str(&format!("host{i}.outside.test A\n"));
    }
    std::fs::write(&mesh_hosts, mh)?;
    std::fs::write(&outside_hosts, oh)?;
    std::fs::write(&mesh_q, mq)?;
    std::fs::write(&outside_q, oq)?;

    let (up_port, agent_port, base_port) = (free_port()?, free_port()?, free_port()?);
    let _upstream = dnsmasq(up_port, &outside_hosts, None, "1")?;
    wait_answers(up_port, "host0.outside.test")?;
    let exe = std::env::current_exe()?;
    let mut agent = Command::new("taskset")
        .args(["-c", "0"])
        .arg(&exe)
        .args([
            "--serve",
            &format!("127.0.0.1:{agent_port}"),
            &format!("127.0.0.1:{up_port}"),
            &services.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(agent.stdout.take().context("stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("the agent's DNS server did not start: {line:?}");
    }
    let agent_pid = agent.id();
    let agent = Killed(agent);
    let baseline = dnsmasq(base_port, &mesh_hosts, Some(up_port), "0")?;
    wait_answers(agent_port, "svc0.default.causeway")?;
    wait_answers(base_port, "svc0.default.causeway")?;
    wait_answers(agent_port, "host0.outside.test")?;
    wait_answers(base_port, "host0.outside.test")?;

    println!(
        "{services} services ({} mesh names), {seconds}s throughput runs (dnsperf -c 4 -q 200), latency at {rate} q/s; servers pinned to CPU 0, dnsperf and the upstream to CPU 1",
        services * 2
    );
    println!(
        "{:<10} {:<14} {:>10} {:>12} {:>9} {:>9} {:>9}",
        "names", "server", "q/s", "lost", "p50 ms", "p99 ms", "max ms"
    );
    let mut results = Vec::new();
    for (set, file) in [("mesh", &mesh_q), ("forwarded", &outside_q)] {
        let mut pair = Vec::new();
        for (server, port) in [("agent", agent_port), ("dnsmasq", base_port)] {
            let r = dnsperf(port, file, seconds, rate)?;
            println!(
                "{set:<10} {server:<14} {:>10.0} {:>12} {:>9.3} {:>9.3} {:>9.3}",
                r.qps, r.lost, r.p50_ms, r.p99_ms, r.max_ms
            );
            results.push(
                json!({"names": set, "server": server, "qps": r.qps, "lost": r.lost,
                "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "max_ms": r.max_ms}),
            );
            pair.push(r);
        }
        println!(
            "{set:<10} {:<14} {:>10.2} {:>12} {:>9} {:>9.2}",
            "agent/dnsmasq",
            pair[0].qps / pair[1].qps,
            "",
            "",
            pair[0].p99_ms / pair[1].p99_ms
        );
    }
    let agent_rss = vm_hwm_kib(agent_pid);
    let base_rss = vm_hwm_kib(baseline.0.id());
    println!(
        "peak RSS: agent DNS process {} KiB, dnsmasq {} KiB",
        agent_rss.map(|v| v.to_string()).unwrap_or("?".into()),
        base_rss.map(|v| v.to_string()).unwrap_or("?".into())
    );
    drop(agent);
    if let Some(p) = json_out {
        std::fs::write(
            &p,
            serde_json::to_vec_pretty(&json!({
                "services": services, "seconds": seconds, "latency_rate": rate,
                "results": results, "agent_rss_kib": agent_rss, "dnsmasq_rss_kib": base_rss,
            }))?,
        )?;
    }
    Ok(())
}
