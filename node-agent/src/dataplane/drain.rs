//! Drain on stop: the proxied connections in flight are counted, so a stopping agent
//! (SIGTERM) can stop accepting and wait for them to finish, up to
//! `[dataplane] drain_timeout`, before it closes the rest (as ztunnel and linkerd2-proxy
//! drain).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts the proxied connections in flight (outbound and inbound).
#[derive(Debug, Clone, Default)]
pub struct Inflight(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    count: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One proxied connection in flight, counted until dropped.
#[derive(Debug)]
pub struct InflightGuard(Arc<Shared>);

impl Inflight {
    /// Counts one connection until the guard is dropped.
    pub fn track(&self) -> InflightGuard {
        self.0.count.fetch_add(1, Ordering::Relaxed);
        InflightGuard(self.0.clone())
    }

    /// Connections in flight now.
    pub fn count(&self) -> usize {
        self.0.count.load(Ordering::Relaxed)
    }

    /// Completes once no connection is in flight (at once when none is).
    pub async fn idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_completes_when_the_last_connection_ends() {
        let inflight = Inflight::default();
        inflight.idle().await;
        let (a, b) = (inflight.track(), inflight.track());
        let waiter = tokio::spawn({
            let i = inflight.clone();
            async move { i.idle().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one connection is still in flight");
        drop(b);
        waiter.await.unwrap();
        assert_eq!(inflight.count(), 0);
    }
}
