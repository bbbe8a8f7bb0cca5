//! CSR signing throughput of the controller's CA path, next to raw P-256 signing.
//!
//! Issue 2, section Benchmark: "signatures/s on one core, end to end including store
//! write, next to raw P-256 signing speed in the same run; target ≥ 5,000 issued
//! certificates/s on one core".
//!
//! Everything runs on one Tokio `current_thread` runtime. The modes, in order:
//!
//! | mode          | what is timed                                                        |
//! |---------------|----------------------------------------------------------------------|
//! | `raw-sign`    | `ring` ECDSA P-256 (SHA-256, ASN.1) over a 300-byte message: baseline |
//! | `csr-verify`  | `csr::parse_csr` alone (DER parse + the CSR's ECDSA signature check) |
//! | `ca-sign`     | `Ca::issue_workload` alone (build + sign a certificate, no store)    |
//! | `store-txn`   | `Store::commit_join` alone: one sled transaction per certificate, no flush |
//! | `store-batch-N` | `Store::commit_enrollments` of N joins per transaction, no flush   |
//! | `txn-flush-1` | `commit_join` + `Store::flush` after each one (no signing)           |
//! | `txn-flush-N` | one `commit_enrollments` of N + one `Store::flush` (ideal group commit, no signing) |
//! | `join-inline` | the join's steps re-stated inline (token + group reads, CSR verify, sign), recorded N per transaction, no flush |
//! | `join-serial` | `Enroller::join`, 1 in flight: one transaction and flush per certificate |
//! | `join-N`      | `Enroller::join`, N in flight (default 64): group commit batches transactions and flushes |
//!
//! The `join-*` modes are the end-to-end path a real join takes after the QUIC stream
//! is read: token lookup and hash check, CSR verification, signing, the sled
//! transaction (token spent + agent + certificate) and the durable flush, both shared by
//! the joins that wait together (group commit, `durability.rs`).
//! CSRs are generated before the clock starts. Only the `join-N` row is judged against
//! the target: throughput is what many agents joining at once get; `join-serial` shows
//! the latency of a lone join, bound by one `fsync`. CPU seconds come from
//! `/proc/self/stat` (all threads of the process, including the blocking thread that
//! runs the transaction and flush, and sled's own threads), so a CPU/wall ratio above
//! 1.0 shows work that left the runtime's one core.
//!
//! Usage: `ca_throughput [--count N] [--serial-count N] [--in-flight N] [--dir DIR]
//! [--json FILE]`. Pin the process to one CPU with `taskset -c 0` (as `bench/run.sh`
//! does) to make "one core" strict for every thread.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use causeway_api::wire::JoinRequest;
use causeway_api::{MtlsMode, SpiffeId, WorkloadGroup};
use causeway_controller::ca::Ca;
use causeway_controller::config::CaConfig;
use causeway_controller::csr::{CsrKey, parse_csr};
use causeway_controller::enroll::{Enroller, new_agent_id, now_unix, sha256_hex};
use causeway_controller::store::{
    AgentRecord, CertRecord, Enrollment, GroupRecord, LiveCert, SledStore, Store, TokenRecord,
};
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};

/// Issued certificates per second the end-to-end path must reach (issue 2).
const TARGET_PER_SEC: f64 = 5000.0;
/// Size of the message in the raw signing baseline (about a TBS certificate).
const RAW_MESSAGE_LEN: usize = 300;
/// Linux reports process CPU time in /proc in units of USER_HZ, which is 100 on every
/// architecture the kernel supports today.
const USER_HZ: f64 = 100.0;

struct Args {
    count: usize,
    serial_count: usize,
    in_flight: usize,
    dir: Option<PathBuf>,
    json: Option<PathBuf>,
}

const USAGE: &str =
    "usage: ca_throughput [--count N] [--serial-count N] [--in-flight N] [--dir DIR] [--json FILE]

  --count N         operations per mode (default 20000; sized for < 30 s in release)
  --serial-count N  joins in the 1-in-flight mode (default: count / 10, at least 100);
                    each one waits for its own fsync
  --in-flight N     concurrent joins in the group-commit mode (default 64)
  --dir DIR         where the temporary sled store is created (default: $TMPDIR or /tmp);
                    put it on the disk you want to measure
  --json FILE       also write the results as JSON";

/// The arguments, or `None` when help was asked for (and printed).
fn parse_args() -> Result<Option<Args>> {
    let mut args = Args {
        count: 20_000,
        serial_count: 0,
        in_flight: 64,
        dir: None,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--count" => args.count = value("--count")?.parse().context("--count: not a number")?,
            "--serial-count" => {
                args.serial_count = value("--serial-count")?
                    .parse()
                    .context("--serial-count: not a number")?;
            }
            "--in-flight" => {
                args.in_flight = value("--in-flight")?
                    .parse()
                    .context("--in-flight: not a number")?;
            }
            "--dir" => args.dir = Some(value("--dir")?.into()),
            "--json" => args.json = Some(value("--json")?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    ensure!(args.count > 0, "--count must be at least 1");
    ensure!(args.in_flight > 0, "--in-flight must be at least 1");
    if args.serial_count == 0 {
        args.serial_count = (args.count / 10).max(100);
    }
    Ok(Some(args))
}

/// CPU time (user + system, all threads, dead ones included) of this process.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after ") ".
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64((utime + stime) / USER_HZ))
}

/// Bytes this process has caused to be written to storage (`write_bytes` of
/// /proc/self/io: page-cache writeback and direct writes, all threads).
fn process_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Total size of the files under `dir`.
fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Peak resident set size so far (VmHWM), in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

struct Row {
    mode: String,
    what: &'static str,
    count: usize,
    wall: Duration,
    cpu: Option<Duration>,
    written: Option<u64>,
    peak_rss_kib: Option<u64>,
    judged: bool,
}

impl Row {
    fn per_sec(&self) -> f64 {
        self.count as f64 / self.wall.as_secs_f64()
    }
}

/// Times `f`, recording wall and process CPU time.
async fn timed<F>(
    mode: impl Into<String>,
    what: &'static str,
    count: usize,
    judged: bool,
    f: F,
) -> Result<Row>
where
    F: AsyncFnOnce() -> Result<()>,
{
    let cpu0 = process_cpu();
    let written0 = process_write_bytes();
    let t0 = Instant::now();
    f().await?;
    let wall = t0.elapsed();
    let cpu = process_cpu().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
    let row = Row {
        mode: mode.into(),
        what,
        count,
        wall,
        cpu,
        written: process_write_bytes()
            .zip(written0)
            .map(|(b, a)| b.saturating_sub(a)),
        peak_rss_kib: peak_rss_kib(),
        judged,
    };
    eprintln!(
        "  {:<12} {:>7} in {:>7.3} s = {:>9.0}/s",
        row.mode,
        row.count,
        row.wall.as_secs_f64(),
        row.per_sec()
    );
    Ok(row)
}

/// A P-256 key made on the "host" and a CSR for it, as an agent sends it.
fn make_csr(i: usize) -> Result<Vec<u8>> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = rcgen::CertificateParams::new(vec![format!("vm-{i}.bench.invalid")])?;
    Ok(params.serialize_request(&key)?.der().to_vec())
}

fn group() -> WorkloadGroup {
    WorkloadGroup {
        name: "bench".into(),
        namespace: "bench".into(),
        service_account: "web".into(),
        service: Some("web".into()),
        ports: vec!["http:8080".parse().expect("valid port")],
        labels: Default::default(),
        allowed_cidrs: vec!["10.0.0.0/8".parse().expect("valid network")],
        mtls: MtlsMode::Permissive,
        registry_source: None,
    }
}

fn token(id: &str, secret: &[u8], uses: u32, now: i64) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        secret_sha256: sha256_hex(secret),
        group: "bench".into(),
        group_id: "g-bench".into(),
        revoked_at: None,
        created_at: now,
        expires_at: now + 24 * 3600,
        uses_total: uses,
        uses_left: uses,
        cidrs: vec!["10.0.0.0/8".parse().expect("valid network")],
    }
}

/// Agent and certificate records shaped like real ones, for the store-only modes.
/// [`fake_records`] as joins spending the `bench-txn` token.
fn fake_joins(tag: &str, count: usize, id: &SpiffeId, now: i64) -> Vec<Enrollment> {
    fake_records(tag, count, id, now)
        .into_iter()
        .map(|(agent, cert)| Enrollment::Join {
            token_id: "bench-txn".into(),
            agent,
            cert,
        })
        .collect()
}

fn fake_records(
    tag: &str,
    count: usize,
    id: &SpiffeId,
    now: i64,
) -> Vec<(AgentRecord, CertRecord)> {
    (0..count)
        .map(|i| {
            let agent = AgentRecord {
                id: format!("a-{tag}-{i:08}"),
                group: "bench".into(),
                spiffe_id: id.to_string(),
                hostname: format!("vm-{i}.bench"),
                address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
                token_id: "bench-txn".into(),
                joined_at: now,
                serial: format!("{tag}-{i:032x}"),
                not_after: now + 86400,
                renewed_at: None,
                renewals: 0,
                removed_at: None,
                live_certs: vec![LiveCert {
                    serial: format!("{tag}-{i:032x}"),
                    not_after: now + 86400,
                }],
            };
            let cert = CertRecord {
                serial: agent.serial.clone(),
                agent_id: agent.id.clone(),
                spiffe_id: agent.spiffe_id.clone(),
                not_before: now - 300,
                not_after: now + 86400,
                reason: "join".into(),
            };
            (agent, cert)
        })
        .collect()
}

/// Runs `reqs` through `Enroller::join` with `in_flight` joins outstanding at any time.
async fn run_joins(
    enroller: Arc<Enroller>,
    reqs: Arc<Vec<JoinRequest>>,
    in_flight: usize,
) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let source = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..in_flight.min(reqs.len()) {
        let (enroller, reqs, next) = (enroller.clone(), reqs.clone(), next.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(req) = reqs.get(i) else {
                    return Ok::<_, anyhow::Error>(());
                };
                enroller
                    .join(req, source)
                    .await
                    .with_context(|| format!("join {i} failed"))?;
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.context("join worker panicked")??;
    }
    Ok(())
}

async fn run(args: &Args) -> Result<Vec<Row>> {
    let n = args.count;
    let tmp = match &args.dir {
        Some(d) => tempfile::Builder::new()
            .prefix("ca-throughput-")
            .tempdir_in(d)?,
        None => tempfile::Builder::new()
            .prefix("ca-throughput-")
            .tempdir()?,
    };
    eprintln!("store under {}", tmp.path().display());
    let mut rows = Vec::new();

    // --- Baseline: raw ECDSA P-256 signing with ring. ---
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("ring key generation failed"))?;
    let raw_key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| anyhow::anyhow!("ring rejected its own key"))?;
    let message: Vec<u8> = (0..RAW_MESSAGE_LEN).map(|i| (i * 31 % 251) as u8).collect();
    let sign_n = |k: usize| -> Result<()> {
        for _ in 0..k {
            let sig = raw_key
                .sign(&rng, &message)
                .map_err(|_| anyhow::anyhow!("ring signing failed"))?;
            std::hint::black_box(sig);
        }
        Ok(())
    };
    sign_n(n.min(500))?; // warm-up
    rows.push(
        timed(
            "raw-sign",
            "ring ECDSA P-256 sign, 300-byte message",
            n,
            false,
            async || sign_n(n),
        )
        .await?,
    );
    let raw_pub = raw_key.public_key().as_ref().len();
    ensure!(
        raw_pub == 65,
        "unexpected P-256 public key length {raw_pub}"
    );

    // --- Setup, not timed: store, CA, group, tokens, CSRs. ---
    eprintln!(
        "generating {} CSRs (P-256, not timed)…",
        n + args.serial_count
    );
    let t = Instant::now();
    let csrs: Vec<Vec<u8>> = (0..n + args.serial_count)
        .map(make_csr)
        .collect::<Result<_>>()?;
    eprintln!("  done in {:.1} s", t.elapsed().as_secs_f64());

    let store = Arc::new(SledStore::open(&tmp.path().join("db"))?);
    let now = now_unix();
    let td = "bench.causeway.invalid".parse()?;
    let ca = Arc::new(Ca::load_or_create(&*store, &CaConfig::default(), &td, now)?);
    store.create_group(&GroupRecord {
        group: group(),
        id: "g-bench".into(),
        created_at: now,
    })?;
    let secret = b"benchmark-secret-0123456789abcde".to_vec();
    let uses = u32::try_from(4 * (n + args.serial_count)).context("count too large")?;
    store.create_token(&token("bench-join", &secret, uses, now))?;
    store.create_token(&token("bench-txn", &secret, uses, now))?;
    store.flush()?;

    // --- CSR verification alone. ---
    let mut keys: Vec<CsrKey> = Vec::with_capacity(n);
    for der in csrs.iter().take(n.min(500)) {
        std::hint::black_box(parse_csr(der)?);
    }
    rows.push(
        timed(
            "csr-verify",
            "csr::parse_csr (DER parse + ECDSA verify)",
            n,
            false,
            async || {
                for der in &csrs[..n] {
                    keys.push(parse_csr(der)?);
                }
                Ok(())
            },
        )
        .await?,
    );

    // --- Signing a workload certificate alone (rcgen), no store. ---
    let id: SpiffeId = group().spiffe_id(ca.trust_domain())?;
    let mut issued: Vec<(Vec<u8>, String)> = Vec::with_capacity(n);
    for key in keys.iter().take(n.min(500)) {
        std::hint::black_box(ca.issue_workload(key, &id, now - 300, now + 86400)?);
    }
    rows.push(
        timed(
            "ca-sign",
            "Ca::issue_workload (rcgen build + sign), no store",
            n,
            false,
            async || {
                for key in &keys {
                    issued.push(ca.issue_workload(key, &id, now - 300, now + 86400)?);
                }
                Ok(())
            },
        )
        .await?,
    );
    let (cert_der, _) = issued.first().context("no certificate issued")?;
    eprintln!(
        "  a workload certificate is {} bytes of DER",
        cert_der.len()
    );

    // --- The sled transaction alone (no flush). ---
    let records = fake_records("txn", n, &id, now);
    rows.push(
        timed(
            "store-txn",
            "Store::commit_join (sled transaction), no flush",
            n,
            false,
            async || {
                for (agent, cert) in &records {
                    store.commit_join("bench-txn", agent, cert)?;
                }
                Ok(())
            },
        )
        .await?,
    );
    drop(records);
    store.flush()?;
    let records = fake_records("flush1", args.serial_count, &id, now);
    rows.push(
        timed(
            "txn-flush-1",
            "commit_join + Store::flush after each (no signing)",
            records.len(),
            false,
            async || {
                for (agent, cert) in &records {
                    store.commit_join("bench-txn", agent, cert)?;
                    store.flush()?;
                }
                Ok(())
            },
        )
        .await?,
    );
    let records = fake_joins("batchN", n, &id, now);
    rows.push(
        timed(
            format!("store-batch-{}", args.in_flight),
            "Store::commit_enrollments, N joins per transaction, no flush",
            records.len(),
            false,
            async || {
                for ops in records.chunks(args.in_flight) {
                    let outcomes = store.commit_enrollments(ops)?;
                    ensure!(outcomes.iter().all(Result::is_ok), "a join was refused");
                }
                Ok(())
            },
        )
        .await?,
    );
    let records = fake_joins("flushN", n, &id, now);
    rows.push(
        timed(
            format!("txn-flush-{}", args.in_flight),
            "one commit_enrollments of N + one Store::flush (ideal group commit, no signing)",
            records.len(),
            false,
            async || {
                for ops in records.chunks(args.in_flight) {
                    let outcomes = store.commit_enrollments(ops)?;
                    ensure!(outcomes.iter().all(Result::is_ok), "a join was refused");
                    store.flush()?;
                }
                Ok(())
            },
        )
        .await?,
    );
    drop(records);
    drop(issued);
    drop(keys);
    store.flush()?;

    // --- The join's steps inline, without the durable flush. ---
    // The same store reads, checks, CSR verification, signing and transaction as
    // `Enroller::join` (re-stated here, so keep it in step with enroll.rs), minus the
    // group-commit flush: the difference to `join-N` is what durability costs.
    let source = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
    let inline_join = |i: usize, der: &[u8], pending: &mut Vec<Enrollment>| -> Result<()> {
        let tok = store.token("bench-txn")?.context("token vanished")?;
        ensure!(
            sha256_hex(&secret) == tok.secret_sha256 && tok.uses_left > 0 && now < tok.expires_at
        );
        ensure!(tok.cidrs.iter().any(|c| c.contains(&source)));
        let g = store.group(&tok.group)?.context("group vanished")?.group;
        ensure!(g.allows_source(source));
        let key = parse_csr(der)?;
        let id = g.spiffe_id(ca.trust_domain())?;
        let (cert_der, serial) = ca.issue_workload(&key, &id, now - 300, now + 86400)?;
        let agent = AgentRecord {
            id: new_agent_id(),
            group: g.name.clone(),
            spiffe_id: id.to_string(),
            hostname: format!("vm-{i}.bench"),
            address: source,
            token_id: tok.id.clone(),
            joined_at: now,
            serial: serial.clone(),
            not_after: now + 86400,
            renewed_at: None,
            renewals: 0,
            removed_at: None,
            live_certs: vec![LiveCert {
                serial: serial.clone(),
                not_after: now + 86400,
            }],
        };
        let cert = CertRecord {
            serial,
            agent_id: agent.id.clone(),
            spiffe_id: agent.spiffe_id.clone(),
            not_before: now - 300,
            not_after: now + 86400,
            reason: "join".into(),
        };
        pending.push(Enrollment::Join {
            token_id: tok.id.clone(),
            agent,
            cert,
        });
        if pending.len() >= args.in_flight {
            let outcomes = store.commit_enrollments(pending)?;
            ensure!(outcomes.iter().all(Result::is_ok), "a join was refused");
            pending.clear();
        }
        std::hint::black_box(cert_der);
        Ok(())
    };
    rows.push(
        timed(
            "join-inline",
            "join steps inline (reads, verify, sign), N per transaction, no flush",
            n,
            false,
            async || {
                let mut pending = Vec::with_capacity(args.in_flight);
                for (i, der) in csrs[..n].iter().enumerate() {
                    inline_join(i, der, &mut pending)?;
                }
                let outcomes = store.commit_enrollments(&pending)?;
                ensure!(outcomes.iter().all(Result::is_ok), "a join was refused");
                Ok(())
            },
        )
        .await?,
    );
    store.flush()?;

    // --- End to end: Enroller::join. ---
    let enroller = Arc::new(Enroller::new(
        store.clone(),
        ca.clone(),
        Duration::from_secs(24 * 3600),
    ));
    let request = |der: &Vec<u8>, i: usize| JoinRequest {
        token_id: "bench-join".into(),
        secret: secret.clone(),
        csr_der: der.clone(),
        hostname: format!("vm-{i}.bench"),
    };
    let mut csrs = csrs;
    let serial_csrs = csrs.split_off(n);
    let batch: Arc<Vec<JoinRequest>> = Arc::new(
        csrs.iter()
            .enumerate()
            .map(|(i, d)| request(d, i))
            .collect(),
    );
    let serial: Arc<Vec<JoinRequest>> = Arc::new(
        serial_csrs
            .iter()
            .enumerate()
            .map(|(i, d)| request(d, n + i))
            .collect(),
    );
    drop(csrs);
    drop(serial_csrs);

    rows.push(
        timed(
            "join-serial",
            "Enroller::join, 1 in flight (a transaction and flush per certificate; latency, not judged)",
            serial.len(),
            false,
            async || run_joins(enroller.clone(), serial.clone(), 1).await,
        )
        .await?,
    );
    rows.push(
        timed(
            format!("join-{}", args.in_flight),
            "Enroller::join, concurrent (group commit)",
            batch.len(),
            true,
            async || run_joins(enroller.clone(), batch.clone(), args.in_flight).await,
        )
        .await?,
    );

    // --- Sanity: everything that was answered is in the store. ---
    let expected = n + serial.len();
    let left = store
        .token("bench-join")?
        .context("token vanished")?
        .uses_left;
    ensure!(
        (uses - left) as usize == expected,
        "token spent {} times, expected {expected}",
        uses - left
    );
    let joined = store
        .agents()?
        .iter()
        .filter(|a| a.token_id == "bench-join")
        .count();
    ensure!(
        joined == expected,
        "{joined} agents recorded, expected {expected}"
    );
    eprintln!("checked: {expected} joins recorded, token spent {expected} times");
    let records = store.agents()?.len();
    let bytes = dir_size(&tmp.path().join("db"));
    eprintln!(
        "store on disk: {:.1} MiB for {records} agents ({:.1} KiB per agent, certificates and tokens included)",
        bytes as f64 / 1048576.0,
        bytes as f64 / 1024.0 / records as f64
    );
    Ok(rows)
}

fn print_table(rows: &[Row], raw_per_sec: f64) {
    println!(
        "{:<14} {:>7} {:>8} {:>10} {:>8} {:>7} {:>8} {:>10} {:>6}  what",
        "mode",
        "count",
        "seconds",
        "per-second",
        "µs/op",
        "vs raw",
        "cpu/wall",
        "disk KiB/op",
        "target"
    );
    for r in rows {
        let cpu_wall = r
            .cpu
            .map(|c| format!("{:.2}", c.as_secs_f64() / r.wall.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        let written = r
            .written
            .map(|w| format!("{:.2}", w as f64 / 1024.0 / r.count as f64))
            .unwrap_or_else(|| "-".into());
        let verdict = if !r.judged {
            "-".to_owned()
        } else if r.per_sec() >= TARGET_PER_SEC {
            "PASS".to_owned()
        } else {
            "FAIL".to_owned()
        };
        println!(
            "{:<14} {:>7} {:>8.3} {:>10.0} {:>8.1} {:>7.3} {:>8} {:>11} {:>6}  {}",
            r.mode,
            r.count,
            r.wall.as_secs_f64(),
            r.per_sec(),
            1e6 / r.per_sec(),
            r.per_sec() / raw_per_sec,
            cpu_wall,
            written,
            verdict,
            r.what
        );
    }
    println!(
        "target: >= {TARGET_PER_SEC:.0} issued certificates/s on one core (join-N row: throughput under concurrent joins); \"vs raw\" = per-second / raw-sign per-second;\n\
         cpu/wall = process CPU time (all threads) / wall time; disk KiB/op = /proc/self/io write_bytes per operation"
    );
    if let Some(kib) = rows.last().and_then(|r| r.peak_rss_kib) {
        println!(
            "peak RSS (VmHWM) of this process: {:.1} MiB",
            kib as f64 / 1024.0
        );
    }
}

/// A JSON string literal (the values here are our own labels and paths).
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "null".to_owned(), |v| v.to_string())
}

/// The results as JSON (hand-written: the workspace has no serde_json in this crate's
/// dependencies, and these few numbers do not need it).
fn to_json(args: &Args, rows: &[Row], raw_per_sec: f64) -> String {
    let results: Vec<String> = rows
        .iter()
        .map(|r| {
            let target = if !r.judged {
                "null".to_owned()
            } else if r.per_sec() >= TARGET_PER_SEC {
                json_str("PASS")
            } else {
                json_str("FAIL")
            };
            format!(
                concat!(
                    "    {{\"mode\": {}, \"what\": {}, \"count\": {}, \"seconds\": {:.6}, ",
                    "\"per_second\": {:.1}, \"ratio_to_raw_sign\": {:.4}, \"cpu_seconds\": {}, ",
                    "\"disk_write_bytes\": {}, \"peak_rss_kib_so_far\": {}, \"target\": {}}}"
                ),
                json_str(&r.mode),
                json_str(r.what),
                r.count,
                r.wall.as_secs_f64(),
                r.per_sec(),
                r.per_sec() / raw_per_sec,
                json_opt(r.cpu.map(|c| format!("{:.2}", c.as_secs_f64()))),
                json_opt(r.written),
                json_opt(r.peak_rss_kib),
                target,
            )
        })
        .collect();
    format!(
        concat!(
            "{{\n  \"benchmark\": \"ca_throughput\",\n  \"runtime\": \"tokio current_thread\",\n",
            "  \"target_per_second\": {},\n  \"count\": {},\n  \"serial_count\": {},\n",
            "  \"in_flight\": {},\n  \"unix_time\": {},\n  \"peak_rss_kib\": {},\n",
            "  \"results\": [\n{}\n  ]\n}}\n"
        ),
        TARGET_PER_SEC,
        args.count,
        args.serial_count,
        args.in_flight,
        now_unix(),
        json_opt(peak_rss_kib()),
        results.join(",\n"),
    )
}

fn main() -> Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // The group-commit flush runs on Tokio's blocking pool; one thread is all it uses.
        .max_blocking_threads(1)
        .build()?;
    let rows = rt.block_on(run(&args))?;
    let raw = rows
        .iter()
        .find(|r| r.mode == "raw-sign")
        .map(Row::per_sec)
        .context("no baseline")?;
    print_table(&rows, raw);
    if let Some(path) = &args.json {
        std::fs::write(path, to_json(&args, &rows, raw))
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}
