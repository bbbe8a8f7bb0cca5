//! Push size of one changed AuthorizationPolicy against the number of policies in the mesh
//! (issue 19, Benchmark: "Push size of one changed policy must not grow with the number of
//! policies").
//!
//! For each count (10, 100 and 1,000 by default): a real `Mesh` on a fresh `SledStore`
//! gets that many AuthorizationPolicies in one apply (`causeway_bench::policy_set`, 50 or
//! fewer selecting one workload); then one of them is edited (one more principal), one is
//! added and one deleted, each a version of its own. Measured for each change: the bytes
//! of the push frame an agent standing at the version before receives
//! (`Mesh::update_frame_since`, the frame the controller's push sessions send, length
//! prefix included) and how many policies it carries; for reference, the full snapshot a
//! new agent gets. Bytes, not times: the result is exact and the same on any machine.
//!
//! Usage: `policy_push [--counts 10,100,1000] [--json FILE]`. Exits non-zero when a
//! change's push at the largest count is more than 64 bytes larger than at the smallest
//! (varint lengths of versions and sequence numbers may differ by a few bytes).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use causeway_api::policy::decode_documents;
use causeway_api::push::{ConfigUpdate, PushFrame, push_frame};
use causeway_controller::mesh::{Mesh, MeshSettings};
use causeway_controller::store::{SledStore, Store};

const NAMESPACE: &str = "default";
const GROUP: &str = "web";
const ALLOWED: &str = "causeway.local/ns/default/sa/client";
/// Largest growth of one change's push from the smallest to the largest count.
const SLACK_BYTES: usize = 64;

fn decode(yaml: &str) -> Result<Vec<causeway_api::policy::Resource>> {
    decode_documents("policy_push", yaml).map_err(|errors| {
        anyhow::anyhow!(
            "the generated policies do not decode: {}",
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })
}

/// The update inside a push frame (after its length prefix), for counting its policies.
fn policies_in(frame: &[u8]) -> Result<(usize, usize, bool)> {
    let frame: PushFrame = causeway_api::wire::decode_frame(frame, usize::MAX)
        .map_err(|e| anyhow::anyhow!("the push frame does not decode: {e}"))?;
    let Some(push_frame::Kind::Update(ConfigUpdate {
        policies,
        removed_policies,
        full,
        ..
    })) = frame.kind
    else {
        bail!("the push frame is not an update");
    };
    Ok((policies.len(), removed_policies.len(), full))
}

/// One change to the mesh, returning the version it made.
type Step<'a> = Box<dyn Fn() -> Result<u64> + 'a>;

struct Row {
    count: usize,
    full_bytes: usize,
    /// (change, bytes, policies carried, removals carried, full snapshot?)
    changes: Vec<(&'static str, usize, usize, usize, bool)>,
}

fn measure(rt: &tokio::runtime::Runtime, count: usize) -> Result<Row> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path())?);
    let mesh = rt.block_on(Mesh::open(
        store,
        MeshSettings {
            vip_range: "240.240.0.0/16".parse().expect("literal"),
            agent_grace: Duration::from_secs(60),
            history_len: 1024,
            control_on_loopback: true,
        },
        Vec::new(),
        &BTreeSet::new(),
        BTreeMap::new(),
    ))?;
    let selecting = count.min(50);
    let all = decode(&causeway_bench::policy_set::yaml(
        count, selecting, NAMESPACE, GROUP, ALLOWED,
    ))?;
    rt.block_on(mesh.apply_policies(all, false))
        .context("applying the policy set")?;
    let full_bytes = mesh.update_frame_since(0).1.len();
    let mut changes = Vec::new();
    let one = |i: usize, revision: usize| {
        decode(&causeway_bench::policy_set::one(
            i,
            i < selecting,
            NAMESPACE,
            GROUP,
            ALLOWED,
            revision,
        ))
    };
    let steps: [(&'static str, Step<'_>); 3] = [
        (
            "edit one selecting policy",
            Box::new(|| Ok(rt.block_on(mesh.apply_policies(one(0, 1)?, false))?.version)),
        ),
        (
            "add one policy",
            Box::new(|| {
                Ok(rt
                    .block_on(mesh.apply_policies(one(count, 0)?, false))?
                    .version)
            }),
        ),
        (
            "delete one policy",
            Box::new(|| {
                let doc = one(1, 0)?;
                let key = causeway_controller::store::PolicyRecord::key_of(&doc[0]);
                Ok(rt.block_on(mesh.delete_policies(&[key]))?)
            }),
        ),
    ];
    for (name, step) in steps {
        let before = mesh.version();
        let after = step().with_context(|| name.to_owned())?;
        if after != before + 1 {
            bail!("{name}: the version went from {before} to {after}, expected one step");
        }
        let (v, frame) = mesh.update_frame_since(before);
        if v != after {
            bail!("{name}: the push is for version {v}, expected {after}");
        }
        let (p, r, full) = policies_in(&frame)?;
        changes.push((name, frame.len(), p, r, full));
    }
    Ok(Row {
        count,
        full_bytes,
        changes,
    })
}

fn main() -> Result<()> {
    let mut counts = vec![10usize, 100, 1_000];
    let mut json_out = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--counts" => {
                counts = args
                    .next()
                    .context("--counts needs a list such as 10,100,1000")?
                    .split(',')
                    .map(|c| c.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--counts needs a list such as 10,100,1000")?;
            }
            "--json" => json_out = Some(args.next().context("--json needs a file")?),
            other => bail!(
                "unknown argument {other:?}; usage: policy_push [--counts 10,100,1000] [--json FILE]"
            ),
        }
    }
    if counts.iter().any(|c| *c < 2) {
        bail!("--counts: each count must be at least 2 (one policy is edited, one deleted)");
    }
    counts.sort_unstable();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let rows: Vec<Row> = counts
        .iter()
        .map(|c| measure(&rt, *c))
        .collect::<Result<_>>()?;
    println!(
        "| policies in the mesh | change | push bytes | policies / removals carried | full snapshot? | full snapshot bytes (new agent) |"
    );
    println!("|---:|---|---:|---|---|---:|");
    for r in &rows {
        for (name, bytes, p, rm, full) in &r.changes {
            println!(
                "| {} | {name} | {bytes} | {p} / {rm} | {} | {} |",
                r.count,
                if *full { "yes" } else { "no" },
                r.full_bytes
            );
        }
    }
    let (first, last) = (&rows[0], &rows[rows.len() - 1]);
    let mut pass = true;
    let mut verdicts = Vec::new();
    for (a, b) in first.changes.iter().zip(&last.changes) {
        let grown = b.1.saturating_sub(a.1);
        let ok = grown <= SLACK_BYTES && !b.4;
        pass &= ok;
        println!(
            "{}: {} bytes with {} policies, {} with {}: {}",
            a.0,
            a.1,
            first.count,
            b.1,
            last.count,
            if ok { "PASS" } else { "FAIL" }
        );
        verdicts.push(serde_json::json!({"change": a.0, "bytes_smallest": a.1, "bytes_largest": b.1, "pass": ok}));
    }
    if let Some(path) = json_out {
        let j = serde_json::json!({
            "rows": rows.iter().map(|r| serde_json::json!({
                "policies": r.count,
                "full_snapshot_bytes": r.full_bytes,
                "changes": r.changes.iter().map(|(n, b, p, rm, full)| serde_json::json!({
                    "change": n, "push_bytes": b, "policies": p, "removed": rm, "full": full,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "verdicts": verdicts,
            "pass": pass,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {path}"))?;
    }
    if !pass {
        bail!("the push of one changed policy grows with the number of policies");
    }
    Ok(())
}
