//! `causewayctl analyze` at scale (issue 24, Benchmark): "analyze against a mesh of 10k
//! services / 100k endpoints / 1,000 agents / 1,000 policies answers in ≤ 2 s, and its
//! controller-side cost does not block pushes".
//!
//! What runs, in this one process:
//!
//! 1. A real `Mesh` on a fresh `SledStore` gets 10,000 services / 100,000 endpoints from
//!    two sources through `Mesh::apply_source_update` (the controller's path): `consul-dc1`
//!    holds every service, `external` (kind file) a second copy of one service in five
//!    (its endpoints at other addresses, same ports).
//! 2. `copy`: `controller::analyze::registry_facts` (what `/v1/analyze` copies out of the
//!    mesh: the merged registry, page by page, and the sources), timed; one page
//!    (`Mesh::services_page_within`, at most 64 services or `analyze::PAGE_BUDGET`, 100 µs: the longest the copy holds the mesh lock) and
//!    the whole registry at once (`mesh.services()`, as `registry list` copies it) too.
//! 3. `checks`: `causeway_api::analyze::analyze` on that registry plus 100 groups, 1,000
//!    agents (10 per group; some with a stale certificate, a NACK or lag), 1,000 policies
//!    (ALLOW and DENY on group selectors with principals of existing and unknown groups,
//!    some selecting nothing) and 1,000 tokens, timed per check and in total.
//! 4. `push while analyzing`: a thread applies one-endpoint changes and builds the update
//!    frame for them (`apply_source_update` + `update_frame_since`, the controller's part
//!    of a push) back to back for `--push-secs`, first alone, then while another thread
//!    runs copy + checks in a loop; the latency of each change+frame is reported (p50,
//!    p99, max) for both phases.
//!
//! 5. With `--attribute`: two more push phases, while another thread runs only the copy
//!    (`registry_facts`: the mesh lock, page by page, and the allocations of the copy) and
//!    only the checks (on a snapshot copied once: CPU and allocations, no lock), to tell
//!    which part of an analysis the push path suffers from.
//!
//! Usage: `analyze_scale [--services N] [--agents N] [--policies N] [--iterations N]
//! [--push-secs S] [--attribute] [--json FILE]`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use causeway_api::analyze::{
    AgentFacts, CHECKS, NackFacts, PolicyFacts, Snapshot, Thresholds, TokenFacts, analyze,
};
use causeway_api::registry::{
    Endpoint, Provenance, ServiceKey, SourceChange, SourceKind, SourceSnapshot, SourceState,
};
use causeway_api::{MtlsMode, PortSpec, WorkloadGroup};
use causeway_controller::mesh::{Mesh, MeshSettings};
use causeway_controller::store::{SledStore, Store};
use causeway_registry::SourceUpdate;

/// Target for one analysis (issue 24).
const TARGET_SECS: f64 = 2.0;
const ENDPOINTS_PER_SERVICE: usize = 10;
const GROUPS: usize = 100;
const NOW: i64 = 2_000_000_000;

fn endpoint(source: &str, kind: SourceKind, svc: usize, j: usize) -> Endpoint {
    let n = svc * ENDPOINTS_PER_SERVICE + j;
    let offset = if kind == SourceKind::File { 128 } else { 0 };
    let addr = format!(
        "10.{}.{}.{}",
        (n >> 16) & 0x3f | offset,
        (n >> 8) & 0xff,
        n & 0xff
    );
    let mut ep = Endpoint::new(
        addr,
        Provenance {
            source: source.into(),
            kind,
            native_id: format!("{source}-{svc}-{j}"),
            revision: "1".into(),
        },
    );
    ep.ports.insert("http".into(), 8080);
    ep.ports.insert("grpc".into(), 9090);
    ep
}

fn key(i: usize) -> ServiceKey {
    ServiceKey::new(format!("team-{}", i % 100), format!("svc-{i}"))
}

fn full(source: &str, kind: SourceKind, services: usize, every: usize) -> SourceUpdate {
    let mut snap = SourceSnapshot::default();
    for i in (0..services).filter(|i| i % every == 0) {
        let eps = (0..ENDPOINTS_PER_SERVICE / if every > 1 { 2 } else { 1 })
            .map(|j| {
                let e = endpoint(source, kind, i, j);
                (e.provenance.native_id.clone(), e)
            })
            .collect();
        snap.services.insert(key(i), eps);
    }
    SourceUpdate {
        source: source.into(),
        kind,
        change: Some(SourceChange::Full(snap)),
        state: SourceState::synced(),
    }
}

fn one_change(n: usize, services: usize) -> SourceUpdate {
    let i = (n * 7919) % services;
    let eps = (0..ENDPOINTS_PER_SERVICE)
        .map(|j| {
            let mut e = endpoint("consul-dc1", SourceKind::Consul, i, j);
            if j == 0 {
                e.provenance.revision = format!("change-{n}");
                e.ports
                    .insert("http".into(), if n.is_multiple_of(2) { 8081 } else { 8080 });
            }
            (e.provenance.native_id.clone(), e)
        })
        .collect();
    SourceUpdate {
        source: "consul-dc1".into(),
        kind: SourceKind::Consul,
        change: Some(SourceChange::Services([(key(i), eps)].into())),
        state: SourceState::synced(),
    }
}

fn policy_yaml(i: usize) -> String {
    let g = i % GROUPS;
    let ns = format!("team-{}", g % 10);
    let (action, selector) = match i % 10 {
        0 => (
            "DENY",
            format!("  selector:\n    matchLabels: {{causeway.io/group: g-{g}, tier: canary}}\n"),
        ),
        1 => (
            "ALLOW",
            "  selector:\n    matchLabels: {causeway.io/group: nobody}\n".to_owned(),
        ),
        _ => (
            "ALLOW",
            format!("  selector:\n    matchLabels: {{causeway.io/group: g-{g}}}\n"),
        ),
    };
    let client = (g + 1) % GROUPS;
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p-{i}, namespace: {ns}}}\nspec:\n{selector}  action: {action}\n  rules:\n  - from:\n    - source: {{principals: [\"causeway.local/ns/team-{}/sa/g-{client}\", \"causeway.local/ns/gone/sa/x-{i}\"]}}\n    to:\n    - operation: {{ports: [\"8080\"]}}\n",
        client % 10
    )
}

fn snapshot_for(
    services: Vec<causeway_api::analyze::ServiceFacts>,
    sources: Vec<causeway_api::analyze::SourceFacts>,
    agents: usize,
    policies: &[PolicyFacts],
    version: u64,
) -> Snapshot {
    let groups: Vec<WorkloadGroup> = (0..GROUPS)
        .map(|g| WorkloadGroup {
            name: format!("g-{g}"),
            namespace: format!("team-{}", g % 10),
            service_account: format!("g-{g}"),
            service: Some(format!("g-{g}")),
            ports: vec![PortSpec {
                name: "http".into(),
                port: 8080,
            }],
            labels: BTreeMap::new(),
            allowed_cidrs: Vec::new(),
            mtls: MtlsMode::Permissive,
            registry_source: None,
        })
        .collect();
    let agents: Vec<AgentFacts> = (0..agents)
        .map(|a| AgentFacts {
            id: format!("agent-{a:04}"),
            group: format!("g-{}", a % GROUPS),
            address: Some(IpAddr::from([172, 16, (a >> 8) as u8, (a & 0xff) as u8])),
            joined_at: NOW - 3600,
            not_after: if a % 100 == 0 { NOW + 60 } else { NOW + 80_000 },
            connected: a % 50 != 0,
            session_since: Some(NOW - 3000),
            acked_version: Some(if a % 70 == 0 {
                version.saturating_sub(5)
            } else {
                version
            }),
            last_nack: (a % 333 == 0).then(|| NackFacts {
                version,
                error: "test".into(),
            }),
            agent_version: Some(env!("CARGO_PKG_VERSION").into()),
            dataplane: Some(causeway_api::push::AgentFacts {
                agent_version: env!("CARGO_PKG_VERSION").into(),
                capture_enabled: true,
                dns_enabled: true,
                ..Default::default()
            }),
            ..AgentFacts::default()
        })
        .collect();
    let tokens = (0..agents.len())
        .map(|t| TokenFacts {
            id: format!("tok-{t}"),
            group: format!("g-{}", t % GROUPS),
            expires_at: NOW - 10,
            uses_total: 1,
            uses_left: u32::from(t % 97 == 0),
            revoked: false,
        })
        .collect();
    Snapshot {
        live: true,
        now: NOW,
        controller_started: NOW - 86_400,
        controller_version: env!("CARGO_PKG_VERSION").into(),
        trust_domain: "causeway.local".into(),
        mesh_version: version,
        vip_range: "240.240.0.0/16".into(),
        vips_total: 65_534,
        vips_used: 10_000,
        sources,
        services,
        agents,
        groups,
        tokens,
        policies: policies.to_vec(),
        routes: Vec::new(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Change+frame latencies (ms) for `secs`, while `busy` runs in another thread if given.
fn push_phase(
    mesh: &Arc<Mesh>,
    services: usize,
    start: usize,
    secs: f64,
    busy: Option<Box<dyn Fn() + Send>>,
) -> Result<(Vec<f64>, usize)> {
    let stop = Arc::new(AtomicBool::new(false));
    let worker = busy.map(|f| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                f();
                n += 1;
            }
            n
        })
    });
    let mut lat = Vec::new();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut n = start;
    while Instant::now() < deadline {
        let update = one_change(n, services);
        let before = mesh.version();
        let t = Instant::now();
        tokio::runtime::Handle::current().block_on(mesh.apply_source_update(update))?;
        let applied = t.elapsed();
        let _frame = mesh.update_frame_since(before);
        lat.push(ms(t.elapsed()));
        if std::env::var_os("ANALYZE_SCALE_TRACE").is_some() {
            eprintln!(
                "change {:.2} ms, frame {:.2} ms",
                ms(applied),
                ms(t.elapsed() - applied)
            );
        }
        n += 1;
        // A plain thread, not a runtime worker: pacing the changes like pushes.
        #[allow(
            clippy::disallowed_methods,
            reason = "a plain thread paces the changes"
        )]
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let analyses = worker.map(|w| w.join().unwrap_or(0)).unwrap_or(0);
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok((lat, analyses))
}

fn main() -> Result<()> {
    let mut services = 10_000usize;
    let mut agents = 1_000usize;
    let mut n_policies = 1_000usize;
    let mut iterations = 5usize;
    let mut push_secs = 5.0f64;
    let mut json_out = None;
    let mut attribute = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--attribute" {
            attribute = true;
            continue;
        }
        let mut num = |what: &str| -> Result<String> {
            args.next().with_context(|| format!("{what} needs a value"))
        };
        match a.as_str() {
            "--services" => services = num("--services")?.parse()?,
            "--agents" => agents = num("--agents")?.parse()?,
            "--policies" => n_policies = num("--policies")?.parse()?,
            "--iterations" => iterations = num("--iterations")?.parse()?,
            "--push-secs" => push_secs = num("--push-secs")?.parse()?,
            "--json" => json_out = Some(num("--json")?),
            other => bail!(
                "unknown argument {other:?}; usage: analyze_scale [--services N] [--agents N] [--policies N] [--iterations N] [--push-secs S] [--attribute] [--json FILE]"
            ),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path())?);
    let configured: BTreeSet<String> = ["consul-dc1", "external"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let mesh = rt.block_on(Mesh::open(
        store,
        MeshSettings {
            vip_range: "240.240.0.0/16".parse().expect("literal"),
            agent_grace: Duration::from_secs(60),
            history_len: 1024,
            control_on_loopback: true,
        },
        Vec::new(),
        &configured,
        BTreeMap::new(),
    ))?;
    let t = Instant::now();
    rt.block_on(mesh.apply_source_update(full("consul-dc1", SourceKind::Consul, services, 1)))?;
    rt.block_on(mesh.apply_source_update(full("external", SourceKind::File, services, 5)))?;
    let endpoints: usize = mesh.sources().iter().map(|s| s.endpoints).sum();
    println!(
        "mesh: {services} services, {endpoints} endpoints from 2 sources, built in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let policies: Vec<PolicyFacts> = causeway_api::policy::decode_documents(
        "bench",
        &(0..n_policies).map(policy_yaml).collect::<String>(),
    )
    .map_err(|e| anyhow::anyhow!("{e:?}"))?
    .into_iter()
    .enumerate()
    .map(|(i, resource)| PolicyFacts {
        seq: i as u64,
        resource,
        origin: None,
    })
    .collect();

    let mut lock_ms = Vec::new();
    let mut whole_ms = Vec::new();
    let mut copy_ms = Vec::new();
    let mut checks_ms = Vec::new();
    let mut per_check: BTreeMap<&str, f64> = BTreeMap::new();
    let mut messages = 0;
    for _ in 0..iterations {
        // The longest the copy holds the mesh lock: one page (the route copies page by
        // page), and for comparison the whole registry at once (`registry list`).
        let t = Instant::now();
        drop(mesh.services());
        whole_ms.push(ms(t.elapsed()));
        let t = Instant::now();
        drop(mesh.services_page_within(
            None,
            causeway_controller::analyze::PAGE,
            causeway_controller::analyze::PAGE_BUDGET,
        ));
        lock_ms.push(ms(t.elapsed()));
        let t = Instant::now();
        let (svc, src) = causeway_controller::analyze::registry_facts(&mesh);
        copy_ms.push(ms(t.elapsed()));
        let snap = snapshot_for(svc, src, agents, &policies, mesh.version());
        let t = Instant::now();
        let r = analyze(&snap, &Thresholds::default());
        checks_ms.push(ms(t.elapsed()));
        messages = r.messages.len();
        for c in CHECKS {
            let mut out = Vec::new();
            let t = Instant::now();
            (c.run)(&snap, &Thresholds::default(), &mut out);
            *per_check.entry(c.name).or_default() += ms(t.elapsed()) / iterations as f64;
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        percentile(v, 0.5)
    };
    let (lock, copy, checks) = (med(&mut lock_ms), med(&mut copy_ms), med(&mut checks_ms));
    let whole = med(&mut whole_ms);
    let total_s = (copy + checks) / 1000.0;
    println!(
        "analysis ({iterations} runs, medians): {agents} agents, {} policies, {GROUPS} groups; {messages} messages",
        policies.len()
    );
    println!("  one page (lock)                    {lock:9.3} ms");
    println!("  mesh.services() at once (lock)     {whole:9.1} ms  (not used by analyze)");
    println!("  copy (registry_facts)              {copy:9.1} ms");
    println!("  checks                             {checks:9.1} ms");
    for (name, t) in &per_check {
        println!("    {name:<32} {t:9.1} ms");
    }
    println!(
        "  total (copy + checks)              {:9.1} ms  (target ≤ {TARGET_SECS} s: {})",
        total_s * 1000.0,
        if total_s <= TARGET_SECS {
            "met"
        } else {
            "MISSED"
        }
    );

    let (alone, _) = push_phase(&mesh, services, 0, push_secs, None)?;
    let m2 = mesh.clone();
    let pol2 = policies.clone();
    let busy: Box<dyn Fn() + Send> = Box::new(move || {
        // As the controller's analysis thread does (idempotent).
        causeway_controller::analyze::deprioritize_current_thread();
        let (svc, src) = causeway_controller::analyze::registry_facts(&m2);
        let snap = snapshot_for(svc, src, agents, &pol2, m2.version());
        drop(analyze(&snap, &Thresholds::default()));
    });
    let (during, analyses) = push_phase(&mesh, services, 1_000_000, push_secs, Some(busy))?;
    let row = |name: &str, v: &[f64]| {
        println!(
            "  {name:<28} n={:5}  p50 {:7.2} ms  p99 {:7.2} ms  max {:7.2} ms",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99),
            v.last().copied().unwrap_or(0.0)
        );
    };
    println!("push path (one-endpoint change + update frame), {push_secs} s each:");
    row("alone", &alone);
    row(&format!("during analyze ({analyses} runs)"), &during);
    let mut attributed = serde_json::Map::new();
    if attribute {
        let m3 = mesh.clone();
        let copy_only: Box<dyn Fn() + Send> = Box::new(move || {
            causeway_controller::analyze::deprioritize_current_thread();
            drop(causeway_controller::analyze::registry_facts(&m3));
        });
        let (copy_lat, copies) =
            push_phase(&mesh, services, 2_000_000, push_secs, Some(copy_only))?;
        let (svc, src) = causeway_controller::analyze::registry_facts(&mesh);
        let snap = Arc::new(snapshot_for(svc, src, agents, &policies, mesh.version()));
        let checks_only: Box<dyn Fn() + Send> = Box::new(move || {
            causeway_controller::analyze::deprioritize_current_thread();
            drop(analyze(&snap, &Thresholds::default()));
        });
        let (checks_lat, checks_runs) =
            push_phase(&mesh, services, 3_000_000, push_secs, Some(checks_only))?;
        let (alone2, _) = push_phase(&mesh, services, 4_000_000, push_secs, None)?;
        row(&format!("during copy only ({copies})"), &copy_lat);
        row(&format!("during checks only ({checks_runs})"), &checks_lat);
        row("alone again", &alone2);
        for (k, v) in [
            ("copy_only", &copy_lat),
            ("checks_only", &checks_lat),
            ("alone_again", &alone2),
        ] {
            attributed.insert(
                k.to_owned(),
                serde_json::json!({"n": v.len(), "p50_ms": percentile(v, 0.5), "p99_ms": percentile(v, 0.99), "max_ms": v.last().copied().unwrap_or(0.0)}),
            );
        }
    }

    if let Some(path) = json_out {
        let stats = |v: &[f64]| serde_json::json!({"n": v.len(), "p50_ms": percentile(v, 0.5), "p99_ms": percentile(v, 0.99), "max_ms": v.last().copied().unwrap_or(0.0)});
        let j = serde_json::json!({
            "services": services, "endpoints": endpoints, "agents": agents, "policies": policies.len(),
            "page_lock_ms": lock, "whole_registry_lock_ms": whole, "copy_ms": copy, "checks_ms": checks, "total_ms": total_s * 1000.0,
            "target_s": TARGET_SECS, "per_check_ms": per_check,
            "push_alone": stats(&alone), "push_during_analyze": stats(&during), "analyses_during": analyses,
            "push_attributed": attributed,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("cannot write {path}"))?;
    }
    Ok(())
}
