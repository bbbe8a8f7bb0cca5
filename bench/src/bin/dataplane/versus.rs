//! `ZTUNNEL_BIN=PATH`: the side-by-side mode of issue 25. Istio's ztunnel runs as one more
//! path in the same rounds as direct TCP, both Causeway transports and the floors
//! (stunnel4, haproxy plain and mTLS), and every figure is also given as a ratio to
//! ztunnel's in the same run.
//!
//! ztunnel runs as it does without Kubernetes: dedicated mode (`PROXY_MODE=dedicated`),
//! its workloads and service from a local file (`LOCAL_XDS_PATH`, no istiod), the fake CA
//! of its `testing` feature (`FAKE_CA=true`), HBONE on TCP 15008, the client's source
//! address not kept (`ENABLE_ORIG_SRC=false`), its own sockets marked (`PACKET_MARK`) and
//! excluded from vm1's redirect of the server's address to its outbound port 15001 (what
//! its `scripts/ztunnel-redirect.sh` does for dedicated mode, limited to the server's
//! address as Causeway's capture is). Every proxy logs at `RUST_LOG=warn` (no per
//! connection line for either mesh).
//!
//! `ztunnel-1w` is ztunnel with one worker thread per proxy (`ZTUNNEL_WORKER_THREADS=1`), as
//! many runtime threads as the agent; its ratios are to the default `ztunnel` like every
//! other path's.
//!
//! Every path dials the server's own address (`vm2:8080`, declared `tcp:8080`: the L4
//! path), except the floors, which dial their local listener. Workloads per path and round,
//! `DATAPLANE_SECS` seconds each (5 by default), all 1 KiB request/response on the
//! bench's echo server unless said:
//!
//! - keep-alive: 50 connections, each sending its next request when the answer is in;
//!   req/s, and the CPU seconds of both proxies per 1,000 requests, and their RSS after;
//! - serial: one connection, back to back; p50 and p99, and what the path adds to the
//!   same round's direct p50 and p99 (direct's own spread is in its column);
//! - a new connection per request, 10 clients at once: connections/s;
//! - bulk: one stream, and 8 parallel streams, as fast as they go: Gbit/s.
//!
//! `DATAPLANE_AGENT_B=PATH` adds a path through two agents of that build (TCP + TLS), an
//! A/B in the same rounds. For profiling, `DATAPLANE_PATHS` (comma-separated path names;
//! direct always runs) and `DATAPLANE_WORKLOADS` (of `keepalive,serial,connect,bulk1,bulk8`)
//! narrow the rounds. The client programs are `dataplane vs-ping ADDR`,
//! `vs-keepalive ADDR SECS CONNS`, `vs-serial ADDR SECS`, `vs-bulk-par ADDR SECS N` (and
//! the bench's own `connect` and `bulk`).

use super::{
    CONNECT_CLIENTS, Node, PORT, Proc, REQ, Run, WAIT, bin, cpu_seconds, haproxy_pair, nofile_arg,
    percentile, rss_mib, run_json, stunnel, time_now, wait_for, which,
};
use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Keep-alive connections at once.
const KEEPALIVE_CONNS: usize = 50;
/// Parallel bulk streams.
const BULK_STREAMS: usize = 8;
/// ztunnel's SO_MARK on its own sockets (0x539), excluded from vm1's redirect.
const ZT_MARK: u32 = 1337;
/// vm1's nat chain of the ztunnel path.
const ZT_CHAIN: &str = "CW_BENCH_ZT";

/// The paths, in the order of the first round (direct always first, the rest rotated).
const PATHS: [&str; 9] = [
    "direct",
    "ztunnel",
    "ztunnel-1w",
    "causeway-tcp",
    "causeway-quic",
    "causeway-tcp (agent B)",
    "stunnel4 (mTLS)",
    "haproxy (plain, floor)",
    "haproxy (mTLS)",
];

/// The figures per path, in table order: key, label, format precision, whether higher is
/// better.
const METRICS: [(&str, &str, usize, bool); 14] = [
    ("ka_rps", "keep-alive, 50 conns: req/s", 0, true),
    ("ka_p50_us", "keep-alive: p50 µs", 0, false),
    ("serial_p50_us", "serial, 1 conn: p50 µs", 0, false),
    ("serial_p99_us", "serial, 1 conn: p99 µs", 0, false),
    (
        "serial_added_p50_us",
        "serial: added p50 vs direct, µs",
        0,
        false,
    ),
    (
        "serial_added_p99_us",
        "serial: added p99 vs direct, µs",
        0,
        false,
    ),
    ("conn_rps", "new connection per request: req/s", 0, true),
    ("bulk1_gbps", "bulk, one stream: Gbit/s", 2, true),
    ("bulk8_gbps", "bulk, 8 streams: Gbit/s", 2, true),
    (
        "cpu_s_per_1k",
        "CPU s per 1,000 requests, both proxies (keep-alive)",
        4,
        false,
    ),
    ("cpu_client_s_per_1k", "… client-side proxy", 4, false),
    ("cpu_server_s_per_1k", "… server-side proxy", 4, false),
    (
        "rss_mib",
        "RSS after keep-alive, both proxies, MiB",
        1,
        false,
    ),
    ("rss_client_mib", "… client-side proxy, MiB", 1, false),
];

// ---------------------------------------------------------------- clients

/// The `vs-*` client programs (run in vm1).
pub(super) fn client(args: &[String]) -> anyhow::Result<()> {
    let a = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("missing argument {i}"))
    };
    let v = match a(0)? {
        "vs-ping" => ping(a(1)?.parse()?)?,
        "vs-keepalive" => keepalive(a(1)?.parse()?, a(2)?.parse()?, a(3)?.parse()?)?,
        "vs-serial" => serial(a(1)?.parse()?, a(2)?.parse()?)?,
        "vs-bulk-par" => bulk_parallel(a(1)?.parse()?, a(2)?.parse()?, a(3)?.parse()?)?,
        other => bail!("unknown program {other}"),
    };
    println!("{v}");
    Ok(())
}

/// One 1 KiB echo on a new connection, tried for up to [`WAIT`]: the path is up.
fn ping(addr: SocketAddr) -> anyhow::Result<Value> {
    let start = Instant::now();
    loop {
        let once = || -> anyhow::Result<()> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut msg = vec![0x5au8; REQ + 1];
            msg[0] = b'E';
            s.write_all(&msg)?;
            let mut resp = [0u8; REQ];
            s.read_exact(&mut resp)?;
            Ok(())
        };
        match once() {
            Ok(()) => return Ok(json!({"ok": true, "after_s": start.elapsed().as_secs_f64()})),
            Err(e) if start.elapsed() > WAIT => {
                bail!("no echo through {addr} within {WAIT:?}: {e:#}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `conns` connections, each sending 1 KiB and reading the echo again and again for
/// `secs` (measured once every connection is open and has made one exchange).
fn keepalive(addr: SocketAddr, secs: u64, conns: usize) -> anyhow::Result<Value> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rt = super::tokio_rt()?;
    rt.block_on(async move {
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(conns + 1));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..conns {
            let barrier = barrier.clone();
            set.spawn(async move {
                let mut s = tokio::net::TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                let req = [0x5au8; REQ];
                let mut resp = [0u8; REQ];
                s.write_all(b"E").await?;
                s.write_all(&req).await?;
                s.read_exact(&mut resp).await?;
                barrier.wait().await;
                let stop = Instant::now() + Duration::from_secs(secs);
                let mut samples = Vec::new();
                while Instant::now() < stop {
                    let t0 = Instant::now();
                    s.write_all(&req).await?;
                    s.read_exact(&mut resp).await?;
                    samples.push(t0.elapsed().as_secs_f64() * 1e6);
                }
                anyhow::Ok(samples)
            });
        }
        barrier.wait().await;
        let start = Instant::now();
        let mut samples = Vec::new();
        while let Some(r) = set.join_next().await {
            samples.extend(r??);
        }
        let wall = start.elapsed().as_secs_f64();
        samples.sort_by(f64::total_cmp);
        Ok(json!({
            "requests": samples.len(), "wall_s": wall,
            "per_s": samples.len() as f64 / wall,
            "p50_us": percentile(&samples, 0.50), "p99_us": percentile(&samples, 0.99),
        }))
    })
}

/// One connection, 1 KiB requests back to back for `secs`.
fn serial(addr: SocketAddr, secs: u64) -> anyhow::Result<Value> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.write_all(b"E")?;
    let req = [0x5au8; REQ];
    let mut resp = [0u8; REQ];
    for _ in 0..200 {
        s.write_all(&req)?;
        s.read_exact(&mut resp)?;
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        let t0 = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut resp)?;
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    let wall = start.elapsed().as_secs_f64();
    samples.sort_by(f64::total_cmp);
    Ok(json!({
        "requests": samples.len(), "wall_s": wall, "per_s": samples.len() as f64 / wall,
        "p50_us": percentile(&samples, 0.50), "p99_us": percentile(&samples, 0.99),
        "p999_us": percentile(&samples, 0.999),
    }))
}

/// `n` connections each writing as fast as it can for `secs`; the server answers each
/// with the bytes it counted.
fn bulk_parallel(addr: SocketAddr, secs: u64, n: usize) -> anyhow::Result<Value> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || -> anyhow::Result<(u64, f64)> {
                let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
                s.write_all(b"B")?;
                let buf = vec![0xa5u8; 1 << 20];
                barrier.wait();
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(secs) {
                    s.write_all(&buf)?;
                }
                s.shutdown(std::net::Shutdown::Write)?;
                let mut count = [0u8; 8];
                s.read_exact(&mut count)?;
                Ok((u64::from_be_bytes(count), start.elapsed().as_secs_f64()))
            })
        })
        .collect();
    let (mut bytes, mut wall) = (0u64, 0f64);
    for t in threads {
        let (b, w) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a bulk thread panicked"))??;
        bytes += b;
        wall = wall.max(w);
    }
    Ok(json!({
        "streams": n, "bytes": bytes, "wall_s": wall, "gbit_s": bytes as f64 * 8.0 / wall / 1e9,
    }))
}

// ---------------------------------------------------------------- paths

/// A started path: its two proxies (client side first), the address the client dials,
/// and what to undo when it stops (ztunnel's redirect, the agents' state to clean).
struct Started {
    procs: Vec<Proc>,
    addr: String,
    redirect_in: Option<Node>,
    agent_states: Vec<(Node, PathBuf)>,
}

impl Started {
    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.0.id()).collect()
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        // SIGTERM and wait (a clean stop removes the agents' capture rules).
        for p in std::mem::take(&mut self.procs) {
            p.stop();
        }
        if let Some(n) = &self.redirect_in {
            n.sh(&format!(
                "iptables -w -t nat -D OUTPUT -j {ZT_CHAIN}; iptables -w -t nat -F {ZT_CHAIN}; iptables -w -t nat -X {ZT_CHAIN}"
            ));
        }
        for (node, state) in &self.agent_states {
            let _ = node
                .cmd(bin("causeway-agent"))
                .arg("cleanup")
                .arg("--state-dir")
                .arg(state)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Local-XDS file of ztunnel: the client workload in vm1, the server in vm2 with its
/// service on [`PORT`], both HBONE.
fn ztunnel_xds(vm1: &Node, vm2: &Node) -> String {
    format!(
        r#"workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["{a}"]
  protocol: HBONE
  node: node-a
  network: ""
  services: {{}}
- uid: cluster1//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["{b}"]
  protocol: HBONE
  node: node-b
  network: ""
  services:
    "default/server.default.svc.cluster.local":
      {PORT}: {PORT}
services:
- name: server
  namespace: default
  hostname: server.default.svc.cluster.local
  vips:
    - /10.96.0.10
  ports:
    {PORT}: {PORT}
  subjectAltNames:
    - spiffe://cluster.local/ns/default/sa/server
"#,
        a = vm1.addr,
        b = vm2.addr
    )
}

/// Waits until `node` listens on TCP `port`.
fn wait_listen(node: &Node, port: u16, what: &str) {
    wait_for(what, WAIT, || {
        node.sh(&format!("ss -Hltn 'sport = :{port}' | grep -q ."))
            .status
            .success()
            .then_some(())
    });
}

/// Both ztunnels (server side first), then vm1's redirect of the server's address;
/// `workers`: `ZTUNNEL_WORKER_THREADS` (its default is one per CPU, 2 here; the agent runs
/// one).
fn start_ztunnel(
    run: &Run,
    zt: &Path,
    vm1: &Node,
    vm2: &Node,
    workers: Option<u32>,
) -> anyhow::Result<Started> {
    let xds = run.root.join("zt-xds.yaml");
    std::fs::write(&xds, ztunnel_xds(vm1, vm2))?;
    let mut procs = Vec::new();
    for (node, side, name) in [
        (vm2, "b", "default/server/server"),
        (vm1, "a", "default/client/client"),
    ] {
        let dir = run.root.join(format!("zt-{side}"));
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(run.root.join(format!("ztunnel-{side}.log")))?;
        let mut cmd = node.cmd("prlimit");
        if let Some(w) = workers {
            cmd.env("ZTUNNEL_WORKER_THREADS", w.to_string());
        }
        let child = cmd
            .arg(nofile_arg())
            .arg(zt)
            .current_dir(&dir)
            .env("RUST_LOG", "warn")
            .env("FAKE_CA", "true")
            .env("XDS_ADDRESS", "")
            .env("CA_ADDRESS", "")
            .env("LOCAL_XDS_PATH", &xds)
            .env("PROXY_MODE", "dedicated")
            .env("PACKET_MARK", ZT_MARK.to_string())
            .env("ENABLE_ORIG_SRC", "false")
            .env("NODE_NAME", format!("node-{side}"))
            .env("PROXY_WORKLOAD_INFO", name)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn ztunnel {}", zt.display()))?;
        procs.push(Proc(child));
    }
    procs.reverse();
    let mut started = Started {
        procs,
        addr: format!("{}:{PORT}", vm2.addr),
        redirect_in: None,
        agent_states: Vec::new(),
    };
    wait_listen(vm2, 15008, "vm2's ztunnel to listen on 15008 (HBONE)");
    wait_listen(vm1, 15001, "vm1's ztunnel to listen on 15001 (outbound)");
    vm1.sh_ok(&format!(
        "iptables -w -t nat -N {ZT_CHAIN} && iptables -w -t nat -A {ZT_CHAIN} -m mark --mark {ZT_MARK}/0xfff -j RETURN && iptables -w -t nat -A {ZT_CHAIN} -d {}/32 -p tcp -j REDIRECT --to-ports 15001 && iptables -w -t nat -A OUTPUT -j {ZT_CHAIN}",
        vm2.addr
    ));
    started.redirect_in = Some(vm1.clone());
    for node in [vm1, vm2] {
        wait_for("ztunnel to be ready (15021/healthz/ready)", WAIT, || {
            node.sh("curl -sf -o /dev/null --max-time 1 http://127.0.0.1:15021/healthz/ready")
                .status
                .success()
                .then_some(())
        });
    }
    Ok(started)
}

/// Two agents of `exe` (server side first) with `tunnel_transport = transport`.
fn start_agents(
    run: &Run,
    states: &[PathBuf],
    exe: &Path,
    transport: &str,
    vm1: &Node,
    vm2: &Node,
) -> anyhow::Result<Started> {
    let cfg = run.root.join(format!("vs-agent-{transport}.toml"));
    std::fs::write(
        &cfg,
        format!("[dataplane]\ntunnel_transport = \"{transport}\"\n"),
    )?;
    // The previous agents' rules file would pass the wait below before these agents
    // capture anything (and the keep-alive connections would go around them).
    for state in states {
        let _ = std::fs::remove_file(state.join("capture.rules"));
    }
    let a2 = run.agent_of(exe, "vm2", &states[1], Some(&cfg))?;
    let a1 = run.agent_of(exe, "vm1", &states[0], Some(&cfg))?;
    let started = Started {
        procs: vec![a1, a2],
        addr: format!("{}:{PORT}", vm2.addr),
        redirect_in: None,
        agent_states: vec![
            (vm1.clone(), states[0].clone()),
            (vm2.clone(), states[1].clone()),
        ],
    };
    wait_for("vm1's agent to capture the server's address", WAIT, || {
        std::fs::read_to_string(states[0].join("capture.rules"))
            .ok()?
            .contains(&format!("-d {}/32 ", vm2.addr))
            .then_some(())
    });
    for node in [vm1, vm2] {
        wait_for("the agent to be ready (15020/healthz/ready)", WAIT, || {
            node.sh("curl -sf -o /dev/null --max-time 1 http://127.0.0.1:15020/healthz/ready")
                .status
                .success()
                .then_some(())
        });
    }
    Ok(started)
}

fn start_path(
    run: &Run,
    states: &[PathBuf],
    name: &str,
    zt: &Path,
    agent_b: Option<&Path>,
) -> anyhow::Result<Option<Started>> {
    let (vm1, vm2) = (run.lab.node("vm1"), run.lab.node("vm2"));
    let floor = |procs: (Proc, Proc), addr: &str| Started {
        procs: vec![procs.0, procs.1],
        addr: addr.to_owned(),
        redirect_in: None,
        agent_states: Vec::new(),
    };
    Ok(Some(match name {
        "direct" => Started {
            procs: Vec::new(),
            addr: format!("{}:{PORT}", vm2.addr),
            redirect_in: None,
            agent_states: Vec::new(),
        },
        "ztunnel" => start_ztunnel(run, zt, vm1, vm2, None)?,
        "ztunnel-1w" => start_ztunnel(run, zt, vm1, vm2, Some(1))?,
        "causeway-tcp" => start_agents(run, states, &bin("causeway-agent"), "tcp", vm1, vm2)?,
        "causeway-quic" => start_agents(run, states, &bin("causeway-agent"), "quic", vm1, vm2)?,
        "causeway-tcp (agent B)" => {
            let Some(b) = agent_b else { return Ok(None) };
            start_agents(run, states, b, "tcp", vm1, vm2)?
        }
        "stunnel4 (mTLS)" => floor(stunnel(&run.root, vm1, vm2)?, "127.0.0.1:9000"),
        _ => {
            let Some(haproxy) = which("haproxy") else {
                return Ok(None);
            };
            let tls = name.ends_with("(mTLS)");
            if tls && !run.root.join("st-ca.pem").exists() {
                drop(stunnel(&run.root, vm1, vm2)?);
            }
            floor(
                haproxy_pair(&haproxy, &run.root, vm1, vm2, tls)?,
                "127.0.0.1:9100",
            )
        }
    }))
}

// ---------------------------------------------------------------- rounds

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Every workload once through a started path; the figures of [`METRICS`] (the added
/// latency is filled in by the caller).
fn measure(run: &Run, p: &Started, secs: u64) -> anyhow::Result<Value> {
    let vm1 = run.lab.node("vm1");
    let me = &run.me;
    let addr = p.addr.as_str();
    let s = secs.to_string();
    run_json(vm1, me, &["vs-ping", addr]).context("the path does not answer")?;
    let mut m = json!({ "load1_start": load1() });
    let wanted = std::env::var("DATAPLANE_WORKLOADS").ok();
    let want = |w: &str| {
        wanted
            .as_deref()
            .is_none_or(|l| l.split(',').any(|x| x.trim() == w))
    };
    let pids = p.pids();
    if want("keepalive") {
        keepalive_figures(run, &pids, addr, &s, &mut m)?;
    }
    if want("serial") {
        let serial = run_json(vm1, me, &["vs-serial", addr, &s])?;
        m["serial_p50_us"] = serial["p50_us"].clone();
        m["serial_p99_us"] = serial["p99_us"].clone();
    }
    if want("connect") {
        let conn = run_json(
            vm1,
            me,
            &["connect", addr, &s, &CONNECT_CLIENTS.to_string()],
        )?;
        m["conn_rps"] = conn["per_s"].clone();
    }
    if want("bulk1") {
        let bulk = run_json(vm1, me, &["bulk", addr, &s])?;
        m["bulk1_gbps"] = bulk["gbit_s"].clone();
    }
    if want("bulk8") {
        let bulk8 = run_json(
            vm1,
            me,
            &["vs-bulk-par", addr, &s, &BULK_STREAMS.to_string()],
        )?;
        m["bulk8_gbps"] = bulk8["gbit_s"].clone();
    }
    m["load1_end"] = json!(load1());
    Ok(m)
}

/// The keep-alive load, with the CPU of both proxies per 1,000 requests and their RSS
/// after it.
fn keepalive_figures(
    run: &Run,
    pids: &[u32],
    addr: &str,
    s: &str,
    m: &mut Value,
) -> anyhow::Result<()> {
    let (vm1, me) = (run.lab.node("vm1"), &run.me);
    let cpu0: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
    let ka = run_json(
        vm1,
        me,
        &["vs-keepalive", addr, s, &KEEPALIVE_CONNS.to_string()],
    )?;
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&cpu0)
        .map(|(p, c)| cpu_seconds(*p) - c)
        .collect();
    let req = ka["requests"].as_f64().unwrap_or(f64::NAN);
    m["ka_rps"] = ka["per_s"].clone();
    m["ka_p50_us"] = ka["p50_us"].clone();
    if pids.len() == 2 {
        let rss: Vec<f64> = pids.iter().map(|p| rss_mib(*p).0).collect();
        m["cpu_client_s_per_1k"] = json!(cpu[0] / req * 1000.0);
        m["cpu_server_s_per_1k"] = json!(cpu[1] / req * 1000.0);
        m["cpu_s_per_1k"] = json!((cpu[0] + cpu[1]) / req * 1000.0);
        m["rss_client_mib"] = json!(rss[0]);
        m["rss_server_mib"] = json!(rss[1]);
        m["rss_mib"] = json!(rss[0] + rss[1]);
    }
    Ok(())
}

/// `rounds` rounds of every path (each started before and stopped after its turn; direct
/// first, the others rotated by one place per round); prints the medians, ranges and
/// ratios to ztunnel; returns the report.
pub(super) fn run_versus(
    run: &Run,
    states: &[PathBuf],
    zt: &Path,
    rounds: usize,
) -> anyhow::Result<Value> {
    anyhow::ensure!(
        zt.is_file(),
        "ZTUNNEL_BIN={}: no such file (the path of a ztunnel binary built with rustls + ring and its `testing` feature, for the fake CA)",
        zt.display()
    );
    for tool in ["curl", "iptables", "ss"] {
        anyhow::ensure!(
            which(tool).is_some(),
            "{tool} is missing: the ztunnel path needs it (apt-get install curl iptables iproute2)"
        );
    }
    let agent_b = std::env::var_os("DATAPLANE_AGENT_B").map(PathBuf::from);
    if let Some(b) = &agent_b {
        anyhow::ensure!(
            b.is_file(),
            "DATAPLANE_AGENT_B={}: no such file",
            b.display()
        );
    }
    let secs: u64 = match std::env::var("DATAPLANE_SECS") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|s| *s > 0)
            .with_context(|| format!("DATAPLANE_SECS={v}: expected whole seconds > 0"))?,
        Err(_) => 5,
    };
    let load_before = load1();
    eprintln!(
        "-- side by side with ztunnel: {rounds} rounds of {} paths, {secs} s per workload (load {load_before})",
        PATHS.len()
    );
    let only = std::env::var("DATAPLANE_PATHS").ok();
    let chosen = |name: &str| {
        name == "direct"
            || only
                .as_deref()
                .is_none_or(|l| l.split(',').any(|x| x.trim() == name))
    };
    let mut runs: Vec<Value> = Vec::new();
    for round in 0..rounds {
        let mut direct = Value::Null;
        for k in 0..PATHS.len() {
            let name = if k == 0 {
                PATHS[0]
            } else {
                PATHS[1 + (k - 1 + round) % (PATHS.len() - 1)]
            };
            if !chosen(name) {
                continue;
            }
            let Some(started) = start_path(run, states, name, zt, agent_b.as_deref())
                .with_context(|| format!("starting {name}"))?
            else {
                continue;
            };
            eprintln!("-- round {}/{rounds}: {name}", round + 1);
            let mut m = measure(run, &started, secs).with_context(|| {
                format!(
                    "{name} (logs in {}: keep them with a debugger)",
                    run.root.display()
                )
            })?;
            drop(started);
            if k == 0 {
                direct = m.clone();
            } else {
                for q in ["p50", "p99"] {
                    let key = format!("serial_{q}_us");
                    if let (Some(a), Some(d)) = (m[&key].as_f64(), direct[&key].as_f64()) {
                        m[format!("serial_added_{q}_us")] = json!(a - d);
                    }
                }
            }
            m["path"] = json!(name);
            m["round"] = json!(round + 1);
            eprintln!("{m}");
            runs.push(m);
        }
    }
    let load_after = load1();
    let loads: Vec<f64> = runs
        .iter()
        .flat_map(|r| [r["load1_start"].as_f64(), r["load1_end"].as_f64()])
        .flatten()
        .collect();
    let (load_med, load_lo, load_hi) =
        causeway_bench::median_range(&loads).unwrap_or((f64::NAN, f64::NAN, f64::NAN));
    let paths: Vec<&str> = PATHS
        .iter()
        .copied()
        .filter(|p| runs.iter().any(|r| r["path"] == *p))
        .collect();
    let stat = |path: &str, key: &str| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r["path"] == path)
            .filter_map(|r| r[key].as_f64())
            .collect();
        causeway_bench::median_range(&v)
    };
    println!(
        "Median [min–max] over {rounds} rounds, {secs} s per workload; (×) ratio of medians to ztunnel's (req/s, Gbit/s: > 1 is better; latency, CPU, RSS: < 1 is better). 1-min load average during the rounds: median {load_med:.2}, range {load_lo:.2}–{load_hi:.2}."
    );
    println!();
    println!("| workload | {} |", paths.join(" | "));
    println!("|---|{}", "---|".repeat(paths.len()));
    let mut summary = serde_json::Map::new();
    for (key, label, prec, _higher) in METRICS {
        let zt_med = stat("ztunnel", key).map(|s| s.0);
        let mut cells = Vec::new();
        let mut per_path = serde_json::Map::new();
        for p in &paths {
            match stat(p, key) {
                None => cells.push("–".to_owned()),
                Some((med, lo, hi)) => {
                    let ratio = zt_med.map(|z| med / z);
                    let r = match ratio {
                        Some(r) if *p != "ztunnel" && r.is_finite() => format!(" ({r:.2}×)"),
                        _ => String::new(),
                    };
                    cells.push(format!("{med:.prec$} [{lo:.prec$}–{hi:.prec$}]{r}"));
                    per_path.insert(
                        (*p).to_owned(),
                        json!({"median": med, "min": lo, "max": hi, "x_ztunnel": ratio}),
                    );
                }
            }
        }
        if per_path.is_empty() {
            continue;
        }
        println!("| {label} | {} |", cells.join(" | "));
        summary.insert(key.to_owned(), Value::Object(per_path));
    }
    Ok(json!({
        "date": time_now(),
        "mode": "ztunnel side by side",
        "ztunnel": zt.display().to_string(),
        "agent_b": agent_b.map(|b| b.display().to_string()),
        "rounds": rounds, "secs_per_workload": secs, "request_bytes": REQ,
        "keepalive_conns": KEEPALIVE_CONNS, "bulk_streams": BULK_STREAMS,
        "connect_clients": CONNECT_CLIENTS,
        "load1_before": load_before, "load1_after": load_after,
        "runs": runs,
        "summary": summary,
    }))
}
