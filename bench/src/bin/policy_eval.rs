//! Cost of one authorization decision in the agent's evaluator (issue 19, Benchmark).
//!
//! The mesh holds `--policies` AuthorizationPolicies (default 1,000) in 100 namespaces;
//! `--selecting` of them (default 50) select the measured workload: DENY policies on ports
//! and addresses, ALLOW policies on principals, namespaces, ip blocks and ports, some in
//! the root namespace. The rest select other workloads or live in other namespaces.
//! Decisions are timed one by one (`Instant` before and after), for three connections:
//! allowed by the last ALLOW policy evaluated (every policy walked), denied by no ALLOW
//! match (every policy walked) and plaintext admitted by an ip block. The floor is the same
//! timing around a decision on a workload no policy selects (the measuring cost itself).
//! Also reported: compiling the set and selecting the workload's policies (done once per
//! change, not per connection) and the resident memory per 1,000 compiled policies.
//!
//! Usage: `policy_eval [--policies N] [--selecting N] [--iterations N] [--json FILE]
//! [--decide-only ROW]`. `--decide-only ROW` (0 allowed, 1 denied, 2 ip block) makes
//! `--iterations` decisions of that row untimed and exits: for instruction counts under
//! `valgrind --tool=callgrind` (deterministic, unlike times on a shared VM), per decision =
//! (count with N iterations − count with 0) / N.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use causeway_api::policy::authz::WorkloadPolicies;
use causeway_api::policy::{
    AuthorizationPolicy, PolicySet, Request, Resource, Workload, decode_documents,
};

/// Decision p99 target (issue 19).
const TARGET_P99_NS: f64 = 2_000.0;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|pages| pages * 4)
        .unwrap_or(0)
}

fn policy_yaml(i: usize, selecting: bool, n_selecting: usize) -> String {
    let (ns, selector) = if selecting {
        if i.is_multiple_of(10) {
            (
                "causeway-system",
                "  selector:\n    matchLabels: {app: web}\n",
            )
        } else {
            ("shop", "  selector:\n    matchLabels: {app: web}\n")
        }
    } else if i.is_multiple_of(3) {
        ("shop", "  selector:\n    matchLabels: {app: other}\n")
    } else {
        ("", "")
    };
    let ns = if ns.is_empty() {
        format!("team-{}", i % 100)
    } else {
        ns.to_owned()
    };
    // A third of the selecting policies deny (ports, addresses), the rest allow.
    let body = if selecting && i + 1 == n_selecting {
        "  rules:\n  - from:\n    - source: {principals: [\"causeway.local/ns/shop/sa/frontend\"]}\n    to:\n    - operation: {ports: [\"8080\"]}\n".to_owned()
    } else if selecting && i % 3 == 1 {
        format!(
            "  action: DENY\n  rules:\n  - to:\n    - operation: {{ports: [\"{}\"]}}\n  - from:\n    - source: {{ipBlocks: [\"203.0.{}.0/24\"]}}\n",
            20000 + i,
            i % 250
        )
    } else {
        format!(
            "  rules:\n  - from:\n    - source: {{principals: [\"causeway.local/ns/team-{i}/sa/client-{i}\", \"causeway.local/ns/team-{i}/sa/batch*\"]}}\n    - source: {{namespaces: [\"ns-{i}\"]}}\n    to:\n    - operation: {{ports: [\"8080\", \"9090\"]}}\n  - from:\n    - source: {{ipBlocks: [\"172.{}.0.0/16\"]}}\n",
            16 + (i % 16)
        )
    };
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p-{i}, namespace: {ns}}}\nspec:\n{selector}{body}"
    )
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64
}

struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
}

/// One decision, its inputs hidden from the optimizer (a precaution: the decision is a
/// pure function of loop-invariant inputs, which a compiler may compute once per loop;
/// timings were the same with and without it, and match the instruction counts).
#[inline(never)]
fn decide(wp: &WorkloadPolicies, req: &Request<'_>) -> bool {
    std::hint::black_box(wp)
        .decide(std::hint::black_box(req))
        .allow
}

fn time_decisions(f: impl Fn() -> bool, iterations: usize, expect: bool) -> Result<Stats> {
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations / 10 {
        if f() != expect {
            bail!("warm-up decision was not {expect}");
        }
    }
    for _ in 0..iterations {
        let t = Instant::now();
        let r = std::hint::black_box(f());
        samples.push(t.elapsed().as_nanos() as u64);
        if r != expect {
            bail!("decision was not {expect}");
        }
    }
    samples.sort_unstable();
    Ok(Stats {
        p50: percentile(&samples, 0.5),
        p99: percentile(&samples, 0.99),
        mean: samples.iter().sum::<u64>() as f64 / samples.len() as f64,
    })
}

fn main() -> Result<()> {
    let mut policies = 1_000usize;
    let mut selecting = 50usize;
    let mut iterations = 200_000usize;
    let mut json_out = None;
    let mut decide_only: Option<usize> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> Result<usize> {
            args.next()
                .with_context(|| format!("{what} needs a number"))?
                .parse()
                .with_context(|| format!("{what} needs a number"))
        };
        match a.as_str() {
            "--policies" => policies = num("--policies")?,
            "--selecting" => selecting = num("--selecting")?,
            "--iterations" => iterations = num("--iterations")?,
            "--json" => json_out = Some(args.next().context("--json needs a file")?),
            "--decide-only" => decide_only = Some(num("--decide-only")?),
            other => bail!(
                "unknown argument {other:?}; usage: policy_eval [--policies N] [--selecting N] [--iterations N] [--json FILE] [--decide-only ROW]"
            ),
        }
    }
    if selecting > policies || selecting < 2 {
        bail!("--selecting must be between 2 and --policies ({policies})");
    }
    // Which policies select the workload: `selecting` of them spread over the set.
    let stride = policies / selecting;
    let yaml: String = (0..policies)
        .map(|i| {
            let sel = i.is_multiple_of(stride) && i / stride < selecting;
            let rank = i / stride;
            policy_yaml(if sel { rank } else { i }, sel, selecting)
                .replace("name: p-", &format!("name: p{i}-"))
        })
        .collect();

    let rss_before = rss_kib();
    let t = Instant::now();
    let docs = decode_documents("bench", &yaml).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let decode_ms = t.elapsed().as_secs_f64() * 1e3;
    let aps: Vec<AuthorizationPolicy> = docs
        .into_iter()
        .filter_map(|d| match d {
            Resource::AuthorizationPolicy(p) => Some(p),
            _ => None,
        })
        .collect();
    let t = Instant::now();
    let set = PolicySet::new(aps.iter());
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(aps);
    let rss_after = rss_kib();

    let labels: BTreeMap<String, String> = [
        ("app".to_owned(), "web".to_owned()),
        ("causeway.io/group".to_owned(), "web".to_owned()),
    ]
    .into();
    let t = Instant::now();
    let wp = set.for_workload(Workload {
        namespace: "shop",
        labels: &labels,
    });
    let select_us = t.elapsed().as_secs_f64() * 1e6;
    if wp.len() != selecting {
        bail!(
            "{} policies select the workload, expected {selecting}",
            wp.len()
        );
    }
    let empty = PolicySet::default().for_workload(Workload {
        namespace: "shop",
        labels: &labels,
    });

    let ip = |s: &str| s.parse::<IpAddr>().expect("address");
    let req = |principal: Option<&'static str>, src: &str| Request {
        principal,
        source_ip: ip(src),
        remote_ip: None,
        destination_ip: ip("10.0.0.9"),
        destination_port: 8080,
        sni: None,
        http: None,
    };
    let allowed = req(Some("causeway.local/ns/shop/sa/frontend"), "10.1.0.5");
    let denied = req(Some("causeway.local/ns/shop/sa/intruder"), "10.1.0.5");
    let by_ip = req(None, "172.20.3.4");

    if let Some(row) = decide_only {
        let (r, expect) = match row {
            0 => (&allowed, true),
            1 => (&denied, false),
            2 => (&by_ip, true),
            other => bail!("--decide-only {other}: rows are 0 (allowed), 1 (denied), 2 (ip block)"),
        };
        for _ in 0..iterations {
            if std::hint::black_box(&wp)
                .decide(std::hint::black_box(r))
                .allow
                != expect
            {
                bail!("decision was not {expect}");
            }
        }
        println!("{iterations} decisions of row {row}, untimed");
        return Ok(());
    }

    let floor = time_decisions(|| decide(&empty, &allowed), iterations, true)?;
    let rows = [
        (
            "allowed (last ALLOW)",
            time_decisions(|| decide(&wp, &allowed), iterations, true)?,
        ),
        (
            "denied (no ALLOW match)",
            time_decisions(|| decide(&wp, &denied), iterations, false)?,
        ),
        (
            "plaintext by ipBlocks",
            time_decisions(|| decide(&wp, &by_ip), iterations, true)?,
        ),
    ];

    println!(
        "policy_eval: {policies} policies, {selecting} selecting the workload, {iterations} decisions per row"
    );
    println!(
        "{:<26} {:>10} {:>10} {:>10}",
        "decision", "p50 ns", "p99 ns", "mean ns"
    );
    println!(
        "{:<26} {:>10.0} {:>10.0} {:>10.1}",
        "floor (no policy)", floor.p50, floor.p99, floor.mean
    );
    let mut worst_p99 = 0f64;
    for (name, s) in &rows {
        println!(
            "{:<26} {:>10.0} {:>10.0} {:>10.1}",
            name, s.p50, s.p99, s.mean
        );
        worst_p99 = worst_p99.max(s.p99);
    }
    let mem_per_1000 = (rss_after.saturating_sub(rss_before)) as f64 * 1000.0 / policies as f64;
    println!(
        "decode {decode_ms:.1} ms, compile {compile_ms:.1} ms, select workload {select_us:.1} us (once per change)"
    );
    println!(
        "resident memory of the compiled set: ~{mem_per_1000:.0} KiB per 1,000 policies (RSS delta, includes allocator slack)"
    );
    let verdict = if worst_p99 <= TARGET_P99_NS {
        "met"
    } else {
        "NOT met"
    };
    println!(
        "verdict: decision p99 {worst_p99:.0} ns vs target {TARGET_P99_NS:.0} ns: {verdict} (floor p99 {:.0} ns)",
        floor.p99
    );
    if let Some(path) = json_out {
        let mut j = serde_json::json!({
            "policies": policies,
            "selecting": selecting,
            "iterations": iterations,
            "floor": {"p50_ns": floor.p50, "p99_ns": floor.p99, "mean_ns": floor.mean},
            "decode_ms": decode_ms,
            "compile_ms": compile_ms,
            "select_us": select_us,
            "rss_kib_per_1000": mem_per_1000,
            "target_p99_ns": TARGET_P99_NS,
            "worst_p99_ns": worst_p99,
        });
        for (name, s) in &rows {
            j[*name] = serde_json::json!({"p50_ns": s.p50, "p99_ns": s.p99, "mean_ns": s.mean});
        }
        std::fs::write(&path, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}
