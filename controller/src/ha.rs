//! Several controllers on one etcd (issue 23): leader election and following the
//! shared mesh state.
//!
//! Every controller serves agents, joins, renewals and the admin API. One of them, the
//! **leader**, also runs the registry sources and writes the merged registry. The leader
//! holds `<prefix>leader`, a key attached to an etcd lease of `[store] lease_ttl` that it
//! renews every third of the TTL; the key's create revision is the fencing token that
//! every registry write of that term compares ([`crate::store::Fence`]), so a leader that
//! lost its lease (paused, partitioned) has its writes refused by etcd even before it
//! notices. The leader steps down when a renewal fails past the lease's expiry by its own
//! clock, etcd says the lease is gone, or a registry write of its term is refused by the
//! fence (the key was deleted or taken over while its lease lived); the others campaign
//! every fifth of the TTL (between 100 ms and 1 s).
//!
//! Every controller also follows the mesh: it watches `<prefix>mesh/version` and reloads
//! the mesh from etcd when another controller wrote a newer version
//! ([`Mesh::resync`]), so its own agents get the change as a delta from their version.
//! The version is one counter for the whole set (each write compares the key's revision),
//! so an agent that moves to another controller never sees its version go back.
//!
//! On sled (the default) there is one controller: it is always the leader and nothing
//! here runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{StoreBackend, StoreConfig};
use crate::etcd::{Etcd, EtcdError, Event};
use crate::mesh::Mesh;
use crate::store::Fence;

/// This controller's role in the set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Another controller leads (or none yet): serve, follow, do not run the sources.
    Follower,
    /// This controller leads: run the sources, fencing their writes with the token
    /// (`None` on sled, where there is no one to fence out).
    Leader(Option<Fence>),
}

impl Role {
    /// Whether this controller leads.
    pub fn is_leader(&self) -> bool {
        matches!(self, Role::Leader(_))
    }
}

/// The running election and mesh follower.
#[derive(Debug)]
pub struct Ha {
    /// This controller's role, as it changes.
    pub role: watch::Receiver<Role>,
    /// On sled: the sender of the role that never changes, kept so it stays open.
    _fixed: Option<watch::Sender<Role>>,
    etcd: Option<Arc<Etcd>>,
    /// The lease of the current term (0: not leading).
    lease: Arc<AtomicI64>,
    tasks: Vec<JoinHandle<()>>,
}

/// How often the mesh follower checks the stored version besides its watch.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// How often a follower tries to take the leadership.
fn campaign_interval(ttl: Duration) -> Duration {
    (ttl / 5).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

fn etcd_error(what: &str, e: &EtcdError) {
    crate::metrics::get().etcd_errors.inc();
    tracing::warn!(error = %e, "{what}");
}

/// Starts the election and the mesh follower for `cfg` (nothing on sled). `identity`
/// names this controller in the leader key (shown by `etcdctl get <prefix>leader`).
pub fn start(cfg: &StoreConfig, mesh: Arc<Mesh>, identity: String) -> anyhow::Result<Ha> {
    if cfg.backend != StoreBackend::Etcd {
        crate::metrics::get().leader.set(1);
        let (tx, role) = watch::channel(Role::Leader(None));
        return Ok(Ha {
            role,
            // Kept open: the role never changes.
            _fixed: Some(tx),
            etcd: None,
            lease: Arc::new(AtomicI64::new(0)),
            tasks: Vec::new(),
        });
    }
    let etcd = Arc::new(Etcd::new(&cfg.etcd_options())?);
    let prefix = if cfg.prefix.ends_with('/') {
        cfg.prefix.clone()
    } else {
        format!("{}/", cfg.prefix)
    };
    crate::metrics::get().leader.set(0);
    let (tx, role) = watch::channel(Role::Follower);
    let lease = Arc::new(AtomicI64::new(0));
    let elect = tokio::spawn(elect(
        etcd.clone(),
        format!("{prefix}leader").into_bytes(),
        identity.into_bytes(),
        cfg.lease_ttl,
        tx,
        lease.clone(),
    ));
    let follow = tokio::spawn(follow(
        etcd.clone(),
        format!("{prefix}mesh/version").into_bytes(),
        mesh,
    ));
    Ok(Ha {
        role,
        _fixed: None,
        etcd: Some(etcd),
        lease,
        tasks: vec![elect, follow],
    })
}

impl Ha {
    /// Stops campaigning and following; a leader gives the leadership up at once
    /// (revokes its lease) so another controller takes over without waiting for the TTL.
    pub async fn resign(&self) {
        for t in &self.tasks {
            t.abort();
        }
        let lease = self.lease.swap(0, Ordering::SeqCst);
        if let (Some(etcd), true) = (&self.etcd, lease != 0) {
            match tokio::time::timeout(Duration::from_secs(2), etcd.lease_revoke(lease)).await {
                Ok(Ok(())) => tracing::info!("leadership given up"),
                Ok(Err(e)) => etcd_error("cannot give the leadership up", &e),
                Err(_) => tracing::warn!("giving the leadership up timed out"),
            }
        }
        crate::metrics::get().leader.set(0);
    }
}

/// The fence (leadership key create revision) of the last registry write etcd refused
/// because the leadership key was no longer the writer's: the leader of that term steps
/// down at once instead of waiting for its lease, which may still live (the key deleted
/// by hand, or taken over while this controller's renewals kept succeeding).
static FENCED: std::sync::LazyLock<watch::Sender<i64>> =
    std::sync::LazyLock::new(|| watch::Sender::new(0));

/// Whether etcd refused a registry write made under `fence` (the last such refusal).
pub fn is_fenced(fence: i64) -> bool {
    *FENCED.borrow() == fence
}

/// Called by the store when etcd refused a registry write made under `fence`.
pub fn write_fenced(fence: i64) {
    FENCED.send_replace(fence);
}

/// Campaigns, leads, steps down, campaigns again, for as long as the controller runs.
async fn elect(
    etcd: Arc<Etcd>,
    key: Vec<u8>,
    identity: Vec<u8>,
    ttl: Duration,
    role: watch::Sender<Role>,
    current_lease: Arc<AtomicI64>,
) {
    let poll = campaign_interval(ttl);
    loop {
        // A lease to campaign with.
        let asked = Instant::now();
        let (lease, granted) = match etcd.lease_grant(ttl).await {
            Ok((id, granted)) => (id, granted.max(Duration::from_secs(1))),
            Err(e) => {
                etcd_error("cannot get a lease to campaign for the leadership", &e);
                tokio::time::sleep(poll).await;
                continue;
            }
        };
        // By this controller's clock the lease lives at least until `renewed + granted`.
        let mut renewed = asked;
        let won = loop {
            if renewed.elapsed() >= granted / 3 {
                let sent = Instant::now();
                match etcd.lease_keep_alive(lease).await {
                    Ok(Some(_)) => renewed = sent,
                    Ok(None) => break None,
                    Err(e) => {
                        etcd_error("cannot renew the campaign lease", &e);
                        if renewed.elapsed() >= granted {
                            break None;
                        }
                    }
                }
            }
            match etcd.try_lead(&key, &identity, lease).await {
                Ok(Some(l)) if renewed.elapsed() < granted => break Some(l),
                Ok(Some(_)) => break None,
                Ok(None) => {}
                Err(e) => etcd_error("cannot campaign for the leadership", &e),
            }
            tokio::time::sleep(poll).await;
        };
        let Some(leadership) = won else {
            continue;
        };
        current_lease.store(lease, Ordering::SeqCst);
        tracing::info!(
            fence = leadership.fence,
            lease_ttl = ?granted,
            "leading: this controller runs the registry sources"
        );
        crate::metrics::get().leader.set(1);
        role.send_replace(Role::Leader(Some(Fence {
            key: leadership.key.clone(),
            revision: leadership.fence,
        })));
        let mut fenced = FENCED.subscribe();
        let why = loop {
            tokio::select! {
                () = tokio::time::sleep((granted / 3).saturating_sub(renewed.elapsed())) => {}
                _ = fenced.wait_for(|f| *f == leadership.fence) => {
                    break "a registry write was refused by the fence: the leadership key is no longer this controller's (deleted, or another controller's)";
                }
            }
            let now = Instant::now();
            let Some(left) = (renewed + granted).checked_duration_since(now) else {
                break "the lease expired before it could be renewed (was this process paused?)";
            };
            match tokio::time::timeout(left, etcd.lease_keep_alive(lease)).await {
                Ok(Ok(Some(_))) => renewed = now,
                Ok(Ok(None)) => break "etcd says the lease expired",
                Ok(Err(e)) => {
                    etcd_error("cannot renew the leadership lease", &e);
                    // Retry soon; the deadline above decides.
                    tokio::time::sleep(poll.min(left)).await;
                }
                Err(_) => break "no renewal succeeded before the lease expired",
            }
        };
        tracing::warn!(
            reason = why,
            "no longer leading: the registry sources stop here"
        );
        current_lease.store(0, Ordering::SeqCst);
        crate::metrics::get().leader.set(0);
        role.send_replace(Role::Follower);
        // If the lease still lives (etcd unreachable for a while), free the key.
        let _ = tokio::time::timeout(Duration::from_secs(1), etcd.lease_revoke(lease)).await;
    }
}

/// Reloads the mesh whenever another controller wrote a newer version, or when a
/// write of this controller failed (its view may be stale).
async fn follow(etcd: Arc<Etcd>, vkey: Vec<u8>, mesh: Arc<Mesh>) {
    let resync = |force: bool| {
        let mesh = mesh.clone();
        async move {
            if let Err(e) = mesh.resync(force).await {
                tracing::warn!(error = %e, "cannot reload the mesh from etcd");
                false
            } else {
                true
            }
        }
    };
    loop {
        // Catch up, then watch from the revision read.
        let rev = match etcd.get_prefix(&vkey, 0, 0).await {
            Ok(r) => r.header.revision,
            Err(e) => {
                etcd_error("cannot read the mesh version", &e);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if !resync(false).await {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let mut watch = match etcd.watch_prefix(&vkey, rev + 1).await {
            Ok(w) => w,
            Err(e) => {
                etcd_error("cannot watch the mesh version", &e);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                batch = watch.next() => match batch {
                    Ok(Some(batch)) => {
                        // Our own writes come back too: those (and anything older than what this
                        // controller read or wrote last) are skipped. Another
                        // controller's write at the same version changed a source's
                        // state only (no new version): reloaded all the same.
                        let newest = batch.events.iter().rev().find_map(|e| match e {
                            Event::Put(kv) => serde_json::from_slice::<u64>(&kv.value)
                                .ok()
                                .map(|v| (v, kv.mod_revision)),
                            Event::Delete(_) => None,
                        });
                        let ours = mesh.store_revision();
                        match newest {
                            Some((_, rev)) if ours.is_some_and(|o| rev <= o) => {}
                            Some((v, _)) if v < mesh.version() => {}
                            Some((v, _)) if v == mesh.version() => {
                                resync(true).await;
                            }
                            _ => {
                                resync(false).await;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        etcd_error("the mesh watch failed", &e);
                        break;
                    }
                },
                () = mesh.stale_notified() => {
                    resync(true).await;
                }
                // A watch whose connection silently stopped (a partition drops packets,
                // no error reaches it) would miss changes: check the version now and then.
                () = tokio::time::sleep(CHECK_EVERY) => {
                    match etcd.get(&vkey).await {
                        Ok(kv) => {
                            let stored = kv.and_then(|kv| serde_json::from_slice::<u64>(&kv.value).ok());
                            if stored.is_some_and(|v| v > mesh.version()) {
                                tracing::info!("the mesh watch missed a change; reconnecting it");
                                break;
                            }
                        }
                        Err(e) => etcd_error("cannot read the mesh version", &e),
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_campaign_often_but_not_in_a_busy_loop() {
        assert_eq!(
            campaign_interval(Duration::from_secs(10)),
            Duration::from_secs(1)
        );
        assert_eq!(
            campaign_interval(Duration::from_secs(2)),
            Duration::from_millis(400)
        );
        assert_eq!(
            campaign_interval(Duration::from_millis(100)),
            Duration::from_millis(100)
        );
    }
}
