//! Group commit: concurrent joins and renewals share one store transaction and one flush.
//!
//! A request hands its [`Enrollment`] to the [`Committer`] and waits. One background task
//! takes everything that is waiting (up to [`MAX_BATCH`]), records it in one transaction
//! ([`Store::commit_enrollments`]), flushes, and only then answers each request with its
//! own outcome. While one batch is being written the next one gathers, so under load the
//! per-certificate cost of the transaction and of the `fsync` shrinks with the batch;
//! a lone request is written at once, with no timer to wait for.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::{AgentRecord, EnrollOutcome, Enrollment, Store, StoreError};

/// The most enrollments written in one transaction.
pub const MAX_BATCH: usize = 256;

type Pending = (Enrollment, oneshot::Sender<EnrollOutcome>);

/// Batches enrollments into transactions and flushes.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Pending>,
}

impl Committer {
    /// Starts the committing task for `store` (needs a Tokio runtime).
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Pending>(4 * MAX_BATCH);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                let (ops, waiters): (Vec<Enrollment>, Vec<_>) =
                    std::mem::take(&mut batch).into_iter().unzip();
                let s = store.clone();
                let written = tokio::task::spawn_blocking(move || {
                    let outcomes = s.commit_enrollments(&ops)?;
                    s.flush()?;
                    Ok::<_, StoreError>(outcomes)
                })
                .await
                .unwrap_or_else(|e| Err(StoreError::Conflict(format!("commit task failed: {e}"))));
                match written {
                    Ok(outcomes) => {
                        for (waiter, outcome) in waiters.into_iter().zip(outcomes) {
                            let _ = waiter.send(outcome);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "store commit failed; the batch's requests get an error and may retry");
                        let msg = format!("store commit failed: {e}");
                        for waiter in waiters {
                            let _ = waiter.send(Err(StoreError::Conflict(msg.clone())));
                        }
                    }
                }
            }
        });
        Self { tx }
    }

    /// Records `op` and returns once it is durable, with its own outcome.
    pub async fn commit(&self, op: Enrollment) -> Result<AgentRecord, StoreError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send((op, reply))
            .await
            .map_err(|_| StoreError::Conflict("store committer stopped".into()))?;
        done.await
            .map_err(|_| StoreError::Conflict("store committer stopped".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CertRecord, SledStore, TokenRecord};
    use std::net::{IpAddr, Ipv4Addr};

    fn join(token: &str, n: usize) -> Enrollment {
        let agent = AgentRecord {
            id: format!("a{n}"),
            group: "g".into(),
            spiffe_id: "spiffe://td/ns/n/sa/s".into(),
            hostname: String::new(),
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            token_id: token.into(),
            joined_at: 1,
            serial: format!("s{n}"),
            not_after: 2,
            renewed_at: None,
            renewals: 0,
            removed_at: None,
            live_certs: Vec::new(),
        };
        let cert = CertRecord {
            serial: agent.serial.clone(),
            agent_id: agent.id.clone(),
            spiffe_id: agent.spiffe_id.clone(),
            not_before: 0,
            not_after: 2,
            reason: "join".into(),
        };
        Enrollment::Join {
            token_id: token.into(),
            agent,
            cert,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_joins_get_their_own_outcomes_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store: Arc<dyn Store> = Arc::new(SledStore::reopen(dir.path()).unwrap());
            store
                .create_token(&TokenRecord {
                    id: "t".into(),
                    secret_sha256: String::new(),
                    group: "g".into(),
                    group_id: "g-1".into(),
                    revoked_at: None,
                    created_at: 0,
                    expires_at: i64::MAX,
                    uses_left: 5,
                    uses_total: 5,
                    cidrs: Vec::new(),
                })
                .unwrap();
            let c = Committer::start(store.clone());
            let tasks: Vec<_> = (0..40)
                .map(|n| {
                    let c = c.clone();
                    tokio::spawn(async move { c.commit(join("t", n)).await })
                })
                .collect();
            let mut ok = 0;
            for t in tasks {
                match t.await.unwrap() {
                    Ok(_) => ok += 1,
                    Err(StoreError::TokenSpent(id)) => assert_eq!(id, "t"),
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
            assert_eq!(ok, 5, "a token with 5 uses admits exactly 5 joins");
            let err = c.commit(join("missing", 99)).await.unwrap_err();
            assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
            // The committer's task holds the store; reopening needs it gone (sled locks).
            drop(c);
            while Arc::strong_count(&store) > 1 {
                tokio::task::yield_now().await;
            }
        }
        let store = SledStore::reopen(dir.path()).unwrap();
        assert_eq!(store.agents().unwrap().len(), 5);
        assert_eq!(store.certs().unwrap().len(), 5);
        assert_eq!(store.token("t").unwrap().unwrap().uses_left, 0);
    }
}
