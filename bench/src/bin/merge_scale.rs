//! Merging three registries at scale in the controller's real path, and the cost of one
//! endpoint change as the mesh grows.
//!
//! Issue 3, section Benchmark: "Merge 10,000 services / 100,000 endpoints across three
//! sources: controller peak RSS (target ≤ 300 MB) and time for the initial merge; then
//! the cost of one endpoint change (target ≤ 5 ms to produce its delta), shown at 1k,
//! 10k and 100k endpoints to prove it does not grow with mesh size."
//!
//! What runs, all in this one process on a Tokio runtime (the mesh may spawn timers):
//!
//! 1. `initial merge`: a `Mesh` is opened on a fresh `SledStore` in a temporary
//!    directory, then three sources deliver their first full snapshot through
//!    `Mesh::apply_source_update`, one after the other: `consul-dc1` (kind consul),
//!    `eureka-prod` (kind eureka) and `external` (kind file). That call is what the
//!    controller runs for every source update: merge into the registry, VIPs for new
//!    services, one sled transaction with the data, VIPs and history, version bump.
//!    Each source's snapshot is generated just before its call and dropped after, as a
//!    source task hands it over, so the input does not stay resident.
//! 2. The store is flushed (the initial sync made durable), then `one change (mesh)`: a `SourceChange::Services` update for one service from the
//!    source that holds it, in which exactly one endpoint changed (its revision and its
//!    health flip); timed from the `apply_source_update` call to its return (merge,
//!    delta, sled transaction, history). The update is built before the clock starts.
//! 3. `one change (registry only)`: the same changes on a pure
//!    `causeway_api::registry::Registry` holding the same data, without the store: the
//!    merge and delta alone, to split merge cost from persistence cost.
//!
//! Steps 2 and 3 run at mesh sizes 1k, 10k and 100k endpoints (10 endpoints per service).
//! The 100k mesh is built first so that the process's peak RSS (`VmHWM`, read from
//! `/proc/self/status`) after its initial merge is the peak of the big merge alone.
//! Peak RSS is of this whole process: mesh, registry, sled's page cache and the
//! generator's one snapshot in flight, i.e. an upper bound for a controller holding
//! the same mesh. The restart (`Mesh::open` on a copy of the flushed store) runs in a
//! child process of this program (`--restore-from DIR`), as a restarted controller
//! would, and its own peak RSS is reported too.
//!
//! Shape of the data: 20% of the services are offered by all three sources (their ten
//! endpoints are spread over the three); the rest come from one source each, in turn.
//! Every endpoint has its own address, named ports, tags or labels, metadata and a
//! locality as its kind of source would report them.
//!
//! Usage: `merge_scale [--services N] [--changes N] [--dir DIR] [--json FILE]`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use causeway_api::registry::{
    Endpoint, Health, Locality, Provenance, Registry, ServiceEndpoints, ServiceKey, SourceChange,
    SourceKind, SourceSnapshot, SourceState,
};
use causeway_controller::mesh::{Mesh, MeshSettings};
use causeway_controller::store::{SledStore, Store};
use causeway_registry::SourceUpdate;

/// Peak RSS the 100k-endpoint merge must stay under (issue 3).
const TARGET_PEAK_RSS_MB: f64 = 300.0;
/// Cost of one endpoint change (issue 3).
const TARGET_CHANGE_MS: f64 = 5.0;
/// Endpoints per service.
const EPS_PER_SERVICE: usize = 10;
/// The three sources: name and kind.
const SOURCES: [(&str, SourceKind); 3] = [
    ("consul-dc1", SourceKind::Consul),
    ("eureka-prod", SourceKind::Eureka),
    ("external", SourceKind::File),
];

struct Args {
    services: usize,
    changes: usize,
    dir: Option<PathBuf>,
    json: Option<PathBuf>,
    registry_only: bool,
    restore_from: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        services: 10_000,
        changes: 200,
        dir: None,
        json: None,
        registry_only: false,
        restore_from: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--services" => args.services = value()?.parse()?,
            "--changes" => args.changes = value()?.parse()?,
            "--dir" => args.dir = Some(value()?.into()),
            "--json" => args.json = Some(value()?.into()),
            "--registry-only-rss" => args.registry_only = true,
            "--restore-from" => args.restore_from = Some(value()?.into()),
            "-h" | "--help" => {
                println!(
                    "usage: merge_scale [--services N] [--changes N] [--dir DIR] [--json FILE] [--registry-only-rss]"
                );
                bail!("help shown");
            }
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    if args.services < 100 || args.changes == 0 {
        bail!("--services must be at least 100 and --changes at least 1");
    }
    Ok(args)
}

/// CPU time used by the calling thread so far (CLOCK_THREAD_CPUTIME_ID).
fn thread_cpu() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// A field of `/proc/self/status` in kB.
fn proc_status_kb(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn mb(kb: Option<u64>) -> f64 {
    kb.map(|k| k as f64 / 1024.0).unwrap_or(f64::NAN)
}

/// Which source offers endpoint `j` of service `i`.
fn source_of(i: usize, j: usize) -> usize {
    if i.is_multiple_of(5) {
        (i + j) % 3
    } else {
        i % 3
    }
}

fn key(i: usize) -> ServiceKey {
    ServiceKey::new("default", format!("svc-{i:05}"))
}

/// Endpoint `j` of service `i` as source `s` reports it.
fn endpoint(s: usize, i: usize, j: usize) -> Endpoint {
    let k = i * EPS_PER_SERVICE + j;
    let address = format!("10.{}.{}.{}", (k >> 16) & 255, (k >> 8) & 255, k & 255);
    let name = format!("svc-{i:05}");
    let (source, kind) = SOURCES[s];
    let zone_letter = ["a", "b", "c"][j % 3];
    match kind {
        SourceKind::Consul => {
            let node = format!("node-{:04}", k / 8);
            let mut ep = Endpoint::new(
                address,
                Provenance {
                    source: source.into(),
                    kind,
                    native_id: format!("{node}/{name}-{j}"),
                    revision: format!("{}", 1000 + k),
                },
            );
            ep.ports = [("http".to_owned(), 8080), ("grpc".to_owned(), 9090)].into();
            ep.tags = vec!["v1".into(), "primary".into(), format!("shard-{}", j % 4)];
            ep.metadata = [
                ("version".to_owned(), "1.4.2".to_owned()),
                ("team".to_owned(), format!("team-{}", i % 40)),
                ("env".to_owned(), "prod".to_owned()),
            ]
            .into();
            ep.locality = Locality {
                region: Some("dc1".into()),
                zone: Some(format!("dc1-{zone_letter}")),
                node: Some(node),
            };
            ep
        }
        SourceKind::Eureka => {
            let instance = format!("ip-10-{}-{}.ec2.internal:{name}:8080", k >> 8, k & 255);
            let mut ep = Endpoint::new(
                address,
                Provenance {
                    source: source.into(),
                    kind,
                    native_id: instance.clone(),
                    revision: format!("{}", 1_700_000_000_000u64 + k as u64),
                },
            );
            ep.ports = [("http".to_owned(), 8080), ("https".to_owned(), 8443)].into();
            ep.metadata = [
                ("instanceId".to_owned(), instance),
                ("management.port".to_owned(), "8081".to_owned()),
                ("zone".to_owned(), format!("us-east-1{zone_letter}")),
            ]
            .into();
            ep.hostnames = [format!("{name}.prod.eureka")].into();
            ep.locality = Locality {
                region: Some("us-east-1".into()),
                zone: Some(format!("us-east-1{zone_letter}")),
                node: None,
            };
            ep
        }
        _ => {
            let mut ep = Endpoint::new(
                address,
                Provenance {
                    source: source.into(),
                    kind,
                    native_id: format!("{name}/{j}"),
                    revision: "1".into(),
                },
            );
            ep.ports = [("https".to_owned(), 443)].into();
            ep.labels = [
                ("team".to_owned(), format!("team-{}", i % 40)),
                ("tier".to_owned(), "external".to_owned()),
            ]
            .into();
            ep.hostnames = [format!("{name}.example.com")].into();
            ep.locality = Locality {
                region: None,
                zone: Some(format!("eu-west-1{zone_letter}")),
                node: None,
            };
            ep
        }
    }
}

/// Service `i`'s endpoints from source `s` (empty when it does not offer it).
fn service_endpoints(s: usize, i: usize) -> ServiceEndpoints {
    (0..EPS_PER_SERVICE)
        .filter(|j| source_of(i, *j) == s)
        .map(|j| {
            let ep = endpoint(s, i, j);
            (ep.provenance.native_id.clone(), ep)
        })
        .collect()
}

/// Source `s`'s full snapshot of a mesh of `services` services.
fn snapshot(s: usize, services: usize) -> SourceSnapshot {
    SourceSnapshot {
        services: (0..services)
            .map(|i| (key(i), service_endpoints(s, i)))
            .filter(|(_, eps)| !eps.is_empty())
            .collect(),
    }
}

fn full_update(s: usize, services: usize) -> SourceUpdate {
    let (source, kind) = SOURCES[s];
    SourceUpdate {
        source: source.into(),
        kind,
        change: Some(SourceChange::Full(snapshot(s, services))),
        state: SourceState::synced(),
    }
}

/// Tiny deterministic generator (no rand dependency; the sequence is the same each run).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// Change number `n`: one service, from the source offering its first endpoint, with
/// that endpoint's revision bumped and its health flipped. Only that one endpoint
/// differs from what the mesh holds (the others are regenerated unchanged).
fn one_change(rng: &mut Lcg, services: usize, n: usize) -> SourceUpdate {
    let i = rng.below(services);
    let s = source_of(i, 0);
    let mut eps = service_endpoints(s, i);
    let first = endpoint(s, i, 0);
    let ep = eps
        .get_mut(&first.provenance.native_id)
        .expect("the first endpoint is offered by its source");
    ep.provenance.revision = format!("change-{n}");
    ep.health = if n.is_multiple_of(2) {
        Health::Critical
    } else {
        Health::Passing
    };
    let (source, kind) = SOURCES[s];
    SourceUpdate {
        source: source.into(),
        kind,
        change: Some(SourceChange::Services([(key(i), eps)].into())),
        state: SourceState::synced(),
    }
}

#[derive(Clone, Copy, Default)]
struct Stats {
    over_target: usize,
    p50: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

fn stats_ms(samples: &mut [Duration]) -> Stats {
    samples.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| {
        let idx = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        ms(samples[idx])
    };
    Stats {
        over_target: samples
            .iter()
            .filter(|d| ms(**d) > TARGET_CHANGE_MS)
            .count(),
        p50: at(0.50),
        p99: at(0.99),
        max: ms(*samples.last().expect("samples")),
        mean: samples.iter().map(|d| ms(*d)).sum::<f64>() / samples.len() as f64,
    }
}

struct SizeResult {
    services: usize,
    endpoints: usize,
    initial_merge: Duration,
    /// Source, time, VmRSS and VmHWM (MB) after its snapshot was merged.
    per_source: Vec<(String, Duration, f64, f64)>,
    rss_after_open_mb: f64,
    peak_rss_after_merge_mb: f64,
    rss_after_merge_mb: f64,
    restore: Duration,
    restore_peak_rss_mb: f64,
    initial_flush: Duration,
    flush: Duration,
    mesh_change: Stats,
    /// The same changes in CPU time of the calling thread: what the change costs,
    /// without the time the scheduler gave to other processes on a shared machine.
    mesh_change_cpu: Stats,
    registry_change: Stats,
    delta_services: usize,
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn settings() -> MeshSettings {
    MeshSettings {
        vip_range: "240.240.0.0/16".parse().expect("literal"),
        agent_grace: Duration::from_secs(60),
        history_len: 1024,
        control_on_loopback: true,
    }
}

fn configured() -> BTreeSet<String> {
    SOURCES.iter().map(|(n, _)| (*n).to_owned()).collect()
}

async fn open_mesh(dir: &std::path::Path) -> Result<(Arc<Mesh>, Arc<dyn Store>)> {
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir)?);
    let mesh = Mesh::open(
        store.clone(),
        settings(),
        Vec::new(),
        &configured(),
        BTreeMap::new(),
    )
    .await?;
    Ok((mesh, store))
}

/// Builds a mesh of `services` services, measures the initial merge, one-endpoint
/// changes through the mesh and through a bare registry.
async fn run_size(root: &std::path::Path, services: usize, changes: usize) -> Result<SizeResult> {
    let dir = root.join(format!("store-{services}"));
    let (mesh, store) = open_mesh(&dir).await?;
    let rss_after_open_mb = mb(proc_status_kb("VmRSS:"));
    let mut per_source = Vec::new();
    let mut initial_merge = Duration::ZERO;
    for (s, (name, _)) in SOURCES.iter().enumerate() {
        let update = full_update(s, services);
        let start = Instant::now();
        mesh.apply_source_update(update).await?;
        let took = start.elapsed();
        initial_merge += took;
        per_source.push((
            (*name).to_owned(),
            took,
            mb(proc_status_kb("VmRSS:")),
            mb(proc_status_kb("VmHWM:")),
        ));
    }
    let peak_rss_after_merge_mb = mb(proc_status_kb("VmHWM:"));
    let rss_after_merge_mb = mb(proc_status_kb("VmRSS:"));
    let merged = mesh.services();
    let endpoints: usize = merged.iter().map(|s| s.endpoints.len()).sum();
    if merged.len() != services || endpoints != services * EPS_PER_SERVICE {
        bail!(
            "merged mesh has {} services / {endpoints} endpoints, expected {services} / {}",
            merged.len(),
            services * EPS_PER_SERVICE
        );
    }
    if merged.iter().any(|s| s.vip.is_none()) {
        bail!("a merged service has no VIP");
    }
    drop(merged);

    // The initial sync made durable first, as it is shortly after a controller's start:
    // the changes are timed in steady state, not against the first flush of the whole
    // merged registry running beside them.
    let start = Instant::now();
    store.flush()?;
    let initial_flush = start.elapsed();

    // One endpoint change through the mesh (merge + delta + sled + history).
    let mut rng = Lcg(42);
    let mut mesh_samples = Vec::with_capacity(changes);
    let mut mesh_cpu = Vec::with_capacity(changes);
    let mut delta_services = 0;
    for n in 0..changes {
        let update = one_change(&mut rng, services, n);
        let before = mesh.version();
        let cpu = thread_cpu();
        let start = Instant::now();
        let v = mesh.apply_source_update(update).await?;
        mesh_samples.push(start.elapsed());
        mesh_cpu.push(thread_cpu().saturating_sub(cpu));
        if v != before + 1 {
            bail!("change {n} did not produce exactly one new version ({before} → {v})");
        }
        delta_services = delta_services.max(mesh.update_since(before).services.len());
    }
    // Everything written made durable (the controller does this at shutdown; sled
    // otherwise flushes in the background), then closed.
    let start = Instant::now();
    store.flush()?;
    let flush = start.elapsed();
    drop(mesh);
    drop(store);

    // Restart: the merged registry restored from sled before any source answers.
    // sled keeps its directory lock for a while after the last handle is dropped (its
    // epoch-based reclamation holds the file), so the flushed store is copied and the
    // copy is opened, as a restarted controller would open it.
    let copy = root.join(format!("store-{services}-restart"));
    copy_dir(&dir, &copy)?;
    // In a fresh process, like a restarted controller: this process's allocator still
    // holds what the merge freed, which would inflate the restart's peak.
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("--restore-from")
        .arg(&copy)
        .output()
        .context("cannot run the restore child")?;
    if !out.status.success() {
        bail!(
            "restore child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let child: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "restore child said {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let restore = Duration::from_secs_f64(child["restore_ms"].as_f64().unwrap_or(0.0) / 1000.0);
    let restore_peak_rss_mb = child["peak_rss_mb"].as_f64().unwrap_or(f64::NAN);
    let restored = child["services"].as_u64().unwrap_or(0) as usize;
    if restored != services {
        bail!("restored {restored} services, expected {services}");
    }

    // The same changes on a bare registry: merge and delta only.
    let mut registry = Registry::new();
    for (s, (name, kind)) in SOURCES.iter().enumerate() {
        registry.apply(name, *kind, SourceChange::Full(snapshot(s, services)));
    }
    let mut rng = Lcg(42);
    let mut registry_samples = Vec::with_capacity(changes);
    for n in 0..changes {
        let update = one_change(&mut rng, services, n);
        let change = update.change.clone().expect("a change");
        let start = Instant::now();
        let delta = registry.apply(&update.source, update.kind, change);
        registry_samples.push(start.elapsed());
        if delta.services.len() != 1 || delta.services[0].updated.len() != 1 {
            bail!("registry change {n} did not update exactly one endpoint");
        }
    }
    drop(registry);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&copy);

    Ok(SizeResult {
        services,
        endpoints,
        initial_merge,
        per_source,
        rss_after_open_mb,
        peak_rss_after_merge_mb,
        rss_after_merge_mb,
        restore,
        restore_peak_rss_mb,
        initial_flush,
        flush,
        mesh_change: stats_ms(&mut mesh_samples),
        mesh_change_cpu: stats_ms(&mut mesh_cpu),
        registry_change: stats_ms(&mut registry_samples),
        delta_services,
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// Diagnostic: the peak RSS of merging the same data into a bare registry (no mesh, no
/// store, no VIPs), to split the memory of the merged state from the persistence path.
fn registry_only(services: usize) {
    let start = mb(proc_status_kb("VmRSS:"));
    let mut registry = Registry::new();
    for (s, (name, kind)) in SOURCES.iter().enumerate() {
        registry.apply(name, *kind, SourceChange::Full(snapshot(s, services)));
    }
    println!(
        "registry only, {services} services / {} endpoints: VmRSS {:.1} MB, VmHWM {:.1} MB (process start {start:.1} MB)",
        services * EPS_PER_SERVICE,
        mb(proc_status_kb("VmRSS:")),
        mb(proc_status_kb("VmHWM:"))
    );
    drop(registry);
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if args.registry_only {
        registry_only(args.services);
        return Ok(());
    }
    if let Some(dir) = &args.restore_from {
        // Child mode: a controller restart on a flushed store, alone in its process.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (ms, services) = runtime.block_on(async {
            let start = Instant::now();
            let (mesh, _store) = open_mesh(dir).await?;
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            anyhow::Ok((ms, mesh.service_count()))
        })?;
        println!(
            "{}",
            serde_json::json!({"restore_ms": ms, "services": services, "peak_rss_mb": mb(proc_status_kb("VmHWM:"))})
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let root = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::tempdir_in(d)?
        }
        None => tempfile::tempdir()?,
    };
    let rss_start = mb(proc_status_kb("VmRSS:"));
    // Largest first: the process peak after its merge is the big merge's own.
    let sizes = [args.services, args.services / 10, args.services / 100];
    let mut results = Vec::new();
    for services in sizes {
        eprintln!(
            "merge_scale: {services} services / {} endpoints…",
            services * EPS_PER_SERVICE
        );
        let root = root.path().to_owned();
        let r = runtime.block_on(async move { run_size(&root, services, args.changes).await })?;
        results.push(r);
    }
    let peak_end = mb(proc_status_kb("VmHWM:"));
    results.sort_by_key(|r| r.endpoints);
    let big = results.last().expect("results");

    println!();
    println!(
        "merge_scale: {} services / {} endpoints across 3 sources ({} changes per size)",
        big.services, big.endpoints, args.changes
    );
    println!();
    println!(
        "initial merge (Mesh::apply_source_update with each source's Full snapshot, sled store):"
    );
    println!(
        "  {:<12} {:>9}   after it: {:>8} {:>8}",
        "source", "time", "VmRSS", "VmHWM"
    );
    println!(
        "  {:<12} {:>9}             {:>5.1} MB (empty mesh, sled opened)",
        "(open)", "", big.rss_after_open_mb
    );
    for (name, took, rss, hwm) in &big.per_source {
        println!(
            "  {name:<12} {:>9.1} ms       {rss:>5.1} MB {hwm:>5.1} MB",
            took.as_secs_f64() * 1000.0
        );
    }
    let rss_ok = big.peak_rss_after_merge_mb <= TARGET_PEAK_RSS_MB;
    println!(
        "  total        {:>9.1} ms   (then made durable: store flush {:.1} ms, before the changes below)",
        big.initial_merge.as_secs_f64() * 1000.0,
        big.initial_flush.as_secs_f64() * 1000.0
    );
    println!(
        "  peak RSS (VmHWM) after merge: {:.1} MB (process start {:.1} MB, RSS now {:.1} MB)   target ≤ {TARGET_PEAK_RSS_MB:.0} MB   {}",
        big.peak_rss_after_merge_mb,
        rss_start,
        big.rss_after_merge_mb,
        verdict(rss_ok)
    );
    let restore_ok = big.restore_peak_rss_mb <= TARGET_PEAK_RSS_MB;
    println!(
        "  store flush after the run: {:.1} ms; restore at restart (Mesh::open from sled, fresh process): {:.1} ms, peak RSS {:.1} MB   {}",
        big.flush.as_secs_f64() * 1000.0,
        big.restore.as_secs_f64() * 1000.0,
        big.restore_peak_rss_mb,
        verdict(restore_ok)
    );
    println!();
    println!(
        "one endpoint change (ms; delta + persist through the mesh, vs registry merge alone):"
    );
    println!(
        "  {:>9} {:>9} | {:>8} {:>8} {:>8} {:>8} {:>5} | {:>8} {:>8} {:>8} | {:>8} {:>8} | target  verdict",
        "endpoints",
        "services",
        "mesh p50",
        "p99",
        "max",
        "mean",
        ">5ms",
        "cpu p50",
        "p99",
        "max",
        "reg p50",
        "p99"
    );
    let mut all_ok = rss_ok && restore_ok;
    for r in &results {
        let ok = r.mesh_change.p99 <= TARGET_CHANGE_MS;
        all_ok &= ok;
        println!(
            "  {:>9} {:>9} | {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>5} | {:>8.3} {:>8.3} {:>8.3} | {:>8.3} {:>8.3} | p99≤{TARGET_CHANGE_MS:.0}  {}",
            r.endpoints,
            r.services,
            r.mesh_change.p50,
            r.mesh_change.p99,
            r.mesh_change.max,
            r.mesh_change.mean,
            r.mesh_change.over_target,
            r.mesh_change_cpu.p50,
            r.mesh_change_cpu.p99,
            r.mesh_change_cpu.max,
            r.registry_change.p50,
            r.registry_change.p99,
            verdict(ok)
        );
    }
    let small = &results[0];
    let growth = big.mesh_change.p50 / small.mesh_change.p50;
    println!(
        "  p50 growth from {} to {} endpoints: ×{growth:.2} (flat means the cost does not grow with the mesh)",
        small.endpoints, big.endpoints
    );
    println!(
        "  process peak RSS at the end: {peak_end:.1} MB (after the merge, includes the benchmark's own work: the full registry view it checks, the bare-registry baseline)"
    );
    println!();
    println!(
        "overall: {}",
        if all_ok {
            "PASS"
        } else {
            "FAIL (see the rows above)"
        }
    );

    if let Some(path) = &args.json {
        let sizes: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                let s = |st: &Stats| {
                    serde_json::json!({"over_target": st.over_target, "p50_ms": st.p50, "p99_ms": st.p99, "max_ms": st.max, "mean_ms": st.mean})
                };
                serde_json::json!({
                    "services": r.services,
                    "endpoints": r.endpoints,
                    "initial_merge_ms": r.initial_merge.as_secs_f64() * 1000.0,
                    "initial_merge_per_source": r.per_source.iter().map(|(n, d, rss, hwm)| (n.clone(), serde_json::json!({"ms": d.as_secs_f64() * 1000.0, "rss_after_mb": rss, "hwm_after_mb": hwm}))).collect::<BTreeMap<_, _>>(),
                    "rss_after_open_mb": r.rss_after_open_mb,
                    "restore_ms": r.restore.as_secs_f64() * 1000.0,
                    "restore_peak_rss_mb": r.restore_peak_rss_mb,
                    "flush_ms": r.flush.as_secs_f64() * 1000.0,
                    "initial_flush_ms": r.initial_flush.as_secs_f64() * 1000.0,
                    "peak_rss_after_merge_mb": r.peak_rss_after_merge_mb,
                    "rss_after_merge_mb": r.rss_after_merge_mb,
                    "one_change_mesh": s(&r.mesh_change),
                    "one_change_mesh_thread_cpu": s(&r.mesh_change_cpu),
                    "one_change_registry_only": s(&r.registry_change),
                    "delta_services_max": r.delta_services,
                    "one_change_pass": r.mesh_change.p99 <= TARGET_CHANGE_MS,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "bench": "merge_scale",
            "changes_per_size": args.changes,
            "target_peak_rss_mb": TARGET_PEAK_RSS_MB,
            "target_change_ms": TARGET_CHANGE_MS,
            "peak_rss_pass": rss_ok,
            "restore_peak_rss_pass": restore_ok,
            "process_start_rss_mb": rss_start,
            "process_peak_rss_end_mb": peak_end,
            "sizes": sizes,
            "pass": all_ok,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
