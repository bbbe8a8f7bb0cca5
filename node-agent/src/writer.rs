//! Disk writes off the data-plane thread: a writer task that follows a `watch` channel and
//! always writes its latest value on the blocking pool. A burst of changes while a write
//! (with its fsync) is under way ends in one more write of the newest value, not one per
//! change; the task that published never waits for the disk.

use tokio::sync::{mpsc, oneshot, watch};

/// A running writer; see the module docs.
#[derive(Debug)]
pub struct LatestWriter {
    flush: mpsc::UnboundedSender<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl LatestWriter {
    /// Writes each new value of `values` with `write` (on the blocking pool) until the
    /// channel closes; the value current at the start counts as written.
    pub fn spawn<T>(
        mut values: watch::Receiver<T>,
        write: impl Fn(T) + Send + Sync + 'static,
    ) -> Self
    where
        T: Clone + Send + Sync + 'static,
    {
        let (flush, mut flushes) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
        let write = std::sync::Arc::new(write);
        values.mark_unchanged();
        let task = tokio::spawn(async move {
            loop {
                let done = tokio::select! {
                    biased;
                    r = values.changed() => match r {
                        Ok(()) => None,
                        Err(_) => break,
                    },
                    Some(done) = flushes.recv() => {
                        if !values.has_changed().unwrap_or(false) {
                            let _ = done.send(());
                            continue;
                        }
                        Some(done)
                    }
                };
                let latest = values.borrow_and_update().clone();
                let w = write.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || w(latest)).await {
                    tracing::error!(error = %e, "a state file write failed");
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            // Closed: answer the flushes still waiting (everything is written).
            flushes.close();
            while let Some(done) = flushes.recv().await {
                let _ = done.send(());
            }
        });
        Self { flush, task }
    }

    /// Completes once every value published before the call is written (the newest of
    /// them, that is).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.flush.send(tx).is_ok() {
            let _ = rx.await;
        }
    }

    /// Waits for the last write once the channel is closed (all senders dropped).
    pub async fn finish(self) {
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn bursts_are_coalesced_and_flush_and_finish_write_the_latest() {
        let (tx, rx) = watch::channel(0u32);
        let written = Arc::new(Mutex::new(Vec::new()));
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (started_tx, released) = (Mutex::new(started_tx), Mutex::new(released));
        let w2 = written.clone();
        let writer = LatestWriter::spawn(rx, move |v| {
            if v == 1 {
                // The first write blocks until the burst below is published.
                started_tx.lock().unwrap().send(()).unwrap();
                released.lock().unwrap().recv().unwrap();
            }
            w2.lock().unwrap().push(v);
        });
        tx.send_replace(1);
        tokio::task::spawn_blocking(move || started.recv().unwrap())
            .await
            .unwrap();
        for v in 2..=5 {
            tx.send_replace(v);
        }
        release.send(()).unwrap();
        writer.flush().await;
        assert_eq!(
            *written.lock().unwrap(),
            vec![1, 5],
            "one write for the burst"
        );
        tx.send_replace(6);
        drop(tx);
        writer.finish().await;
        assert_eq!(*written.lock().unwrap(), vec![1, 5, 6]);
    }
}
