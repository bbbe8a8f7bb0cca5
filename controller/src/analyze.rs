//! `GET/POST /v1/analyze`: the controller's side of `causewayctl analyze`.
//!
//! It copies what the checks read (store records, sessions, the merged registry, the
//! policies) into a [`Snapshot`], each copy taking the mesh lock only as long as the
//! existing admin views do, then runs [`causeway_api::analyze::analyze`] on a blocking
//! thread without any lock held: pushes to agents go on meanwhile. The request may carry
//! resources from files (`-f`), analyzed as if applied.

use std::sync::OnceLock;

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{MethodRouter, get};
use causeway_api::analyze::{
    AgentFacts, AnalyzeRequest, EndpointFacts, NackFacts, PolicyFacts, Report, RouteFacts,
    ServiceFacts, Snapshot, SourceFacts, TokenFacts, analyze,
};
use causeway_api::registry::ServiceKey;

use crate::admin::{AdminState, ApiError};
use crate::enroll::now_unix;
use crate::store::StoreError;

/// When this process started serving the admin API (agents without a session since are
/// disconnected at least since then).
static STARTED: OnceLock<i64> = OnceLock::new();

/// Largest analyze request (it may carry many policy files).
const BODY_LIMIT: usize = 4 * 1024 * 1024;

/// The route's handlers (registered at `/v1/analyze`).
pub fn route() -> MethodRouter<AdminState> {
    STARTED.get_or_init(now_unix);
    get(analyze_get)
        .post(analyze_post)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
}

async fn analyze_get(State(s): State<AdminState>) -> Result<Json<Report>, ApiError> {
    run(s, AnalyzeRequest::default()).await
}

async fn analyze_post(
    State(s): State<AdminState>,
    Json(req): Json<AnalyzeRequest>,
) -> Result<Json<Report>, ApiError> {
    run(s, req).await
}

async fn run(s: AdminState, req: AnalyzeRequest) -> Result<Json<Report>, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A thread of its own, not the blocking pool: it runs at a lower scheduling priority
    // for its whole life (a pooled thread would keep the priority for the next task).
    std::thread::Builder::new()
        .name("analyze".into())
        .spawn(move || {
            deprioritize_current_thread();
            let report = snapshot(&s).map(|mut snap| {
                snap.overlay(req.resources);
                snap.overlay_routes(req.routes);
                analyze(&snap, &req.thresholds)
            });
            drop(tx.send(report));
        })
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot start the analysis thread: {e}; retry when the controller has fewer threads"),
            )
        })?;
    let report = rx.await.map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the analysis thread ended without an answer (see the controller's log)".to_string(),
        )
    })?;
    Ok(Json(report?))
}

/// The niceness an analysis thread runs at: pushes, joins and renewals (the runtime's
/// threads, niceness 0) win the CPU over it on a busy host, and it still finishes on an
/// idle one as fast as before.
const ANALYSIS_NICENESS: i32 = 10;

/// Lowers the calling thread's scheduling priority to [`ANALYSIS_NICENESS`] (on Linux,
/// `setpriority(PRIO_PROCESS, tid)` applies to one thread). Analyses are background work
/// next to config pushes; on failure the thread runs at the normal priority (logged).
pub fn deprioritize_current_thread() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), ANALYSIS_NICENESS) {
        tracing::debug!(
            error = %e,
            "could not lower the analysis thread's priority; it runs at the normal one"
        );
    }
}

/// Most services copied per turn of the mesh lock.
pub const PAGE: usize = 64;

/// Longest the copy holds the mesh lock in one turn: a page ends early when copying it
/// took this long, so a push waits at most about this long behind an analysis whatever
/// the size of the services.
pub const PAGE_BUDGET: std::time::Duration = std::time::Duration::from_micros(100);

/// Least pause between two turns of the mesh lock. The standard mutex is not fair: a
/// thread that unlocks and locks again at once usually wins against a waiter that was
/// just woken, so without a pause a push could wait behind many pages in a row.
const PAGE_PAUSE: std::time::Duration = std::time::Duration::from_micros(50);

/// The pause after a turn is at least this many times as long as the turn held the lock.
const PAUSE_PER_HOLD: u32 = 2;

/// The pause after a turn of the mesh lock that took `held`: the copy holds the lock at
/// most a third of the time. Why: a push takes the mesh lock four or five times (the
/// change, its commit, the version, the update frame); with pages of 250 µs and a 50 µs
/// pause the copier held it 83 % of the time, so most pushes during a copy waited behind
/// a page at several of those points (issue 24: push p50 0.24 → 0.54 ms and p99 0.81 →
/// 1.70 ms during back-to-back analyses, the copy being ~80 % of an analysis). The
/// expected wait per lock taking is the share of time held times half a page: 0.83 × 125
/// µs before, at most 0.33 × 50 µs now. The copy takes two to three times as long.
pub fn pause_after(held: std::time::Duration) -> std::time::Duration {
    (held * PAUSE_PER_HOLD).max(PAGE_PAUSE)
}

/// Copies the merged registry (a page of [`PAGE`] services per turn of the mesh lock) and
/// the sources' states.
pub fn registry_facts(mesh: &crate::mesh::Mesh) -> (Vec<ServiceFacts>, Vec<SourceFacts>) {
    let states = mesh.source_states();
    let sources = mesh
        .sources()
        .into_iter()
        .map(|v| SourceFacts {
            stale_since: states
                .get(&v.name)
                .and_then(|st| st.stale_since_ms)
                .map(|ms| i64::try_from(ms / 1000).unwrap_or(i64::MAX)),
            kind: serde_json::to_value(v.kind)
                .ok()
                .and_then(|k| k.as_str().map(str::to_owned))
                .unwrap_or_default(),
            name: v.name,
            state: v.state.to_string(),
            last_error: v.last_error,
            endpoints: v.endpoints,
        })
        .collect();
    let mut services = Vec::new();
    let mut after: Option<ServiceKey> = None;
    loop {
        let started = std::time::Instant::now();
        let page = mesh.services_page_within(after.as_ref(), PAGE, PAGE_BUDGET);
        let held = started.elapsed();
        let Some(last) = page.last() else { break };
        #[allow(
            clippy::disallowed_methods,
            reason = "runs on the analysis thread (or a caller's plain thread), never on a runtime worker"
        )]
        std::thread::sleep(pause_after(held));
        after = Some(ServiceKey::new(last.namespace.clone(), last.name.clone()));
        services.extend(page.into_iter().map(|v| {
            ServiceFacts {
                namespace: v.namespace,
                name: v.name,
                endpoints: v
                    .endpoints
                    .into_iter()
                    .map(|e| EndpointFacts {
                        address: e.address,
                        source: e.source,
                        ports: e.ports,
                        stale: e.stale,
                        agent: e.agent,
                        labels: e.labels,
                    })
                    .collect(),
            }
        }));
    }
    (services, sources)
}

/// Copies the live state the checks read.
pub fn snapshot(s: &AdminState) -> Result<Snapshot, StoreError> {
    let now = now_unix();
    let groups = s.store.groups()?;
    let group_ids: std::collections::BTreeMap<&str, &str> = groups
        .iter()
        .map(|g| (g.group.name.as_str(), g.id.as_str()))
        .collect();
    let tokens = s
        .store
        .tokens()?
        .into_iter()
        // A token whose group is gone cannot be used; it is not worth a message.
        .filter(|t| group_ids.get(t.group.as_str()) == Some(&t.group_id.as_str()))
        .map(|t| TokenFacts {
            id: t.id,
            group: t.group,
            expires_at: t.expires_at,
            uses_total: t.uses_total,
            uses_left: t.uses_left,
            revoked: t.revoked_at.is_some(),
        })
        .collect();
    let sessions = s.mesh.sessions();
    let agents = s
        .store
        .agents()?
        .into_iter()
        .map(|a| {
            let session = sessions.get(&a.id);
            AgentFacts {
                address: session
                    .and_then(|v| v.address.parse().ok())
                    .or(Some(a.address)),
                removed: a.removed_at.is_some(),
                joined_at: a.joined_at,
                not_after: a.not_after,
                connected: session.is_some_and(|v| v.connected),
                session_since: session
                    .map(|v| i64::try_from(v.since_ms / 1000).unwrap_or(i64::MAX)),
                acked_version: session.map(|v| v.acked_version),
                last_nack: session.and_then(|v| {
                    v.last_nack.as_ref().map(|n| NackFacts {
                        version: n.version,
                        error: n.error.clone(),
                    })
                }),
                agent_version: session
                    .map(|v| v.agent_version.clone())
                    .filter(|v| !v.is_empty()),
                dataplane: session.and_then(|v| v.facts.clone()),
                id: a.id,
                group: a.group,
            }
        })
        .collect();
    let (services, sources) = registry_facts(&s.mesh);
    let policies = s
        .mesh
        .policies()
        .into_values()
        .map(|r| PolicyFacts {
            seq: r.seq,
            resource: r.resource,
            origin: None,
        })
        .collect();
    let (range, used) = s.mesh.vip_usage();
    let bits = 32 - u32::from(range.prefix_len());
    Ok(Snapshot {
        live: true,
        now,
        controller_started: *STARTED.get_or_init(now_unix),
        controller_version: env!("CARGO_PKG_VERSION").into(),
        trust_domain: s.ca.trust_domain().to_string(),
        mesh_version: s.mesh.version(),
        vip_range: range.to_string(),
        // The network and broadcast addresses are never given out.
        vips_total: (1u64 << bits).saturating_sub(2),
        vips_used: u64::try_from(used).unwrap_or(u64::MAX),
        sources,
        services,
        agents,
        groups: groups.into_iter().map(|g| g.group).collect(),
        tokens,
        policies,
        routes: s
            .mesh
            .routes()
            .into_values()
            .map(|r| RouteFacts {
                seq: r.seq,
                resource: r.resource,
                origin: None,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;
    use std::time::Duration;

    use causeway_api::registry::{
        Endpoint, Provenance, SourceChange, SourceKind, SourceSnapshot, SourceState,
    };
    use causeway_registry::SourceUpdate;

    use super::*;
    use crate::mesh::{Mesh, MeshSettings};
    use crate::store::{SledStore, Store};

    /// The copier holds the mesh lock at most a third of the time: each pause is at least
    /// twice the turn before it, and never under the floor.
    #[test]
    fn the_pause_after_a_page_is_twice_its_hold_or_the_floor() {
        use std::time::Duration;
        for held in [0, 1, 20, 25, 26, 100, 250, 1_000, 20_000] {
            let held = Duration::from_micros(held);
            let pause = pause_after(held);
            assert!(pause >= held * 2, "{held:?} → {pause:?}");
            assert!(pause >= PAGE_PAUSE, "{held:?} → {pause:?}");
            assert!(
                held.as_secs_f64() / (held + pause).as_secs_f64() <= 1.0 / 3.0 + 1e-9,
                "{held:?} → {pause:?}"
            );
        }
        assert_eq!(pause_after(Duration::ZERO), PAGE_PAUSE);
        assert_eq!(
            pause_after(Duration::from_micros(100)),
            Duration::from_micros(200)
        );
    }

    /// The paged copy holds every service once, in order, across page boundaries.
    #[tokio::test(flavor = "current_thread")]
    async fn the_paged_copy_holds_every_service_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let mesh = Mesh::open(
            store,
            MeshSettings {
                vip_range: "240.240.0.0/16".parse().unwrap(),
                agent_grace: Duration::from_secs(60),
                history_len: 16,
                control_on_loopback: true,
            },
            Vec::new(),
            &BTreeSet::new(),
            BTreeMap::new(),
        )
        .await
        .unwrap();
        let n = 2 * PAGE + 7;
        let mut snap = SourceSnapshot::default();
        for i in 0..n {
            let mut ep = Endpoint::new(
                format!("10.0.{}.{}", i / 250, i % 250 + 1),
                Provenance {
                    source: "ext".into(),
                    kind: SourceKind::File,
                    native_id: format!("e{i}"),
                    revision: "1".into(),
                },
            );
            ep.ports.insert("http".into(), 80);
            snap.services.insert(
                ServiceKey::new("ext", format!("s{i:04}")),
                [(format!("e{i}"), ep)].into_iter().collect(),
            );
        }
        mesh.apply_source_update(SourceUpdate {
            source: "ext".into(),
            kind: SourceKind::File,
            change: Some(SourceChange::Full(snap)),
            state: SourceState::synced(),
        })
        .await
        .unwrap();
        let (services, sources) = registry_facts(&mesh);
        let names: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
        let expected: Vec<String> = (0..n).map(|i| format!("s{i:04}")).collect();
        assert_eq!(names, expected);
        assert!(services.iter().all(|s| s.endpoints.len() == 1));
        let ext = sources.iter().find(|s| s.name == "ext").unwrap();
        assert_eq!((ext.kind.as_str(), ext.state.as_str()), ("file", "synced"));
    }
}
