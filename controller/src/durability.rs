//! Group commit: many concurrent requests wait on one flush of the store.
//!
//! A request that must be durable before it is answered calls [`GroupCommit::commit`]
//! after its transaction. One background task flushes whenever there are waiters; every
//! write done before a flush starts is covered by it, so under load one `fsync` serves a
//! whole batch of joins instead of one each.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Notify, watch};

use crate::store::{Store, StoreError};

/// Batches store flushes.
#[derive(Clone)]
pub struct GroupCommit {
    written: Arc<AtomicU64>,
    wake: Arc<Notify>,
    flushed: watch::Receiver<(u64, Option<String>)>,
}

impl GroupCommit {
    /// Starts the flushing task for `store`.
    pub fn start(store: Arc<dyn Store>) -> Self {
        let written = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(Notify::new());
        let (tx, flushed) = watch::channel((0u64, None));
        let (w, n) = (written.clone(), wake.clone());
        tokio::spawn(async move {
            let mut done = 0u64;
            loop {
                n.notified().await;
                let target = w.load(Ordering::SeqCst);
                if target <= done {
                    continue;
                }
                let s = store.clone();
                let result = tokio::task::spawn_blocking(move || s.flush())
                    .await
                    .unwrap_or_else(|e| {
                        Err(StoreError::Conflict(format!("flush task failed: {e}")))
                    });
                done = target;
                let err = result.err().map(|e| e.to_string());
                if tx.send((done, err)).is_err() {
                    return;
                }
            }
        });
        Self {
            written,
            wake,
            flushed,
        }
    }

    /// Returns once everything written before this call is durable.
    pub async fn commit(&self) -> Result<(), StoreError> {
        let mine = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        let mut rx = self.flushed.clone();
        self.wake.notify_one();
        loop {
            {
                let (done, err) = &*rx.borrow_and_update();
                if *done >= mine {
                    return match err {
                        None => Ok(()),
                        Some(e) => Err(StoreError::Conflict(format!("store flush failed: {e}"))),
                    };
                }
            }
            // Another waiter may have consumed the wake-up before the flusher got it.
            self.wake.notify_one();
            if rx.changed().await.is_err() {
                return Err(StoreError::Conflict("store flusher stopped".into()));
            }
        }
    }
}
