//! Serves the admin API ([`crate::admin::router`]) with limits that a client without
//! credentials cannot exhaust: hyper's HTTP/1 server on an accept loop of our own.
//!
//! - **Header-read timeout** (`admin.header_read_timeout`, default 3 s): hyper closes a
//!   connection whose request head is not complete this long after it started waiting
//!   for it: after the accept (and the TLS handshake), and after each response on a
//!   kept-alive connection. Slowloris heads and idle connections end here.
//! - **Idle timeout** (`admin.idle_timeout`, default 30 s): a connection that completes
//!   no request for this long (since its accept or its previous response) is closed,
//!   whatever it is doing: a body that trickles in, a response nobody reads.
//! - **Connection cap** (`admin.max_connections`, default 1024, and never more than the
//!   soft file-descriptor limit less [`FD_RESERVE`]): at the cap, the next accepted
//!   connection closes the oldest one that has no request in progress (one still
//!   sending its head, or idle between requests), else the oldest one; so a flood of
//!   idle or half-open connections delays a real client by no more than its own accept,
//!   and the process never runs out of descriptors for its store or its control port.
//!
//! Not here: the body limit (64 KiB, [`crate::admin::router`]) and authentication.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

/// File descriptors kept for everything but admin connections (store, control socket,
/// registry sources, logs, the runtime), out of the soft `RLIMIT_NOFILE`.
pub const FD_RESERVE: usize = 128;

/// How long open connections may finish their requests at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// The admin server's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// See the module docs.
    pub header_read_timeout: Duration,
    /// See the module docs.
    pub idle_timeout: Duration,
    /// Most connections open at once (after [`effective_max_connections`]).
    pub max_connections: usize,
}

/// The soft limit on open files of this process, from `/proc/self/limits` (`None` when
/// unlimited or unreadable).
pub fn soft_fd_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `configured`, lowered to fit under the soft descriptor limit `soft` (less
/// [`FD_RESERVE`]); at least 16.
pub fn effective_max_connections(configured: usize, soft: Option<usize>) -> usize {
    match soft {
        Some(soft) => configured.min(soft.saturating_sub(FD_RESERVE)).max(16),
        None => configured,
    }
}

/// What the accept loop and a connection's task share about that connection.
#[derive(Debug)]
struct ConnState {
    /// Requests being handled now.
    in_flight: AtomicUsize,
    /// Milliseconds since the server's epoch when a request last completed (or the
    /// connection was accepted).
    last_done: AtomicU64,
    /// Set when it was chosen for eviction (its task closes it on the next poll).
    closing: AtomicBool,
    /// Wakes the connection's task to close it (evicted at the cap).
    close: Notify,
}

#[derive(Debug)]
struct Tracker {
    epoch: Instant,
    /// Open connections by accept order (oldest first).
    conns: Mutex<BTreeMap<u64, Arc<ConnState>>>,
    /// One permit per connection allowed; a connection's task holds one until its
    /// socket is closed, so the cap counts descriptors, not intentions.
    slots: Arc<Semaphore>,
}

impl Tracker {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<ConnState>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the oldest connection without a request in progress (else the oldest) that
    /// is not closing already to close; false when every one is closing.
    fn evict_one(&self) -> bool {
        let conns = self.lock();
        let open = || conns.values().filter(|c| !c.closing.load(Ordering::SeqCst));
        let victim = open()
            .find(|c| c.in_flight.load(Ordering::SeqCst) == 0)
            .or_else(|| open().next())
            .cloned();
        drop(conns);
        match victim {
            Some(c) => {
                c.closing.store(true, Ordering::SeqCst);
                c.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Counts a request in progress for the eviction order and the idle timeout.
struct InFlight(Arc<ConnState>, Arc<Tracker>);

impl InFlight {
    fn new(state: &Arc<ConnState>, tracker: &Arc<Tracker>) -> Self {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(state.clone(), tracker.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .last_done
            .store(self.1.now_ms(), std::sync::atomic::Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves `app` on `tcp` (with TLS when `tls` is given) until `stop` turns true, then
/// lets open requests finish for up to [`DRAIN`].
pub async fn serve(
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
    app: axum::Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let tracker = Arc::new(Tracker {
        epoch: Instant::now(),
        conns: Mutex::new(BTreeMap::new()),
        slots: Arc::new(Semaphore::new(limits.max_connections)),
    });
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            a = tcp.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                // Small request/response exchanges: no Nagle delay on the answer.
                let _ = a.0.set_nodelay(true);
                a
            }
            Err(e) => {
                // Out of descriptors despite the cap (other parts of the process):
                // free one, and do not spin.
                tracing::warn!(error = %e, "admin API accept failed; closing the oldest idle connection");
                tracker.evict_one();
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // At the cap: close the oldest idle connection and wait until its socket is
        // closed (so the process holds at most `max_connections` + 1 admin sockets).
        let slot = match tracker.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if tracker.evict_one() {
                    tracing::debug!(
                        max = limits.max_connections,
                        "admin API at its connection cap; closing the oldest idle connection"
                    );
                }
                let Ok(slot) = tracker.slots.clone().acquire_owned().await else {
                    break;
                };
                slot
            }
        };
        next_id += 1;
        let state = Arc::new(ConnState {
            in_flight: AtomicUsize::new(0),
            last_done: AtomicU64::new(tracker.now_ms()),
            closing: AtomicBool::new(false),
            close: Notify::new(),
        });
        tracker.lock().insert(next_id, state.clone());
        let task = Connection {
            _slot: slot,
            id: next_id,
            peer,
            state,
            tracker: tracker.clone(),
            limits,
            app: app.clone(),
            stop: stop.clone(),
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => task.run(stream).await,
                Some(acceptor) => {
                    let handshake = tokio::select! {
                        r = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)) => r,
                        () = task.state.close.notified() => {
                            task.end();
                            return;
                        }
                    };
                    match handshake {
                        Ok(Ok(tls)) => task.run(tls).await,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %task.peer, error = %e, "admin TLS handshake failed");
                            task.end();
                        }
                        Err(_) => {
                            tracing::debug!(peer = %task.peer, "admin TLS handshake timed out");
                            task.end();
                        }
                    }
                }
            }
        });
    }
    // Draining: no more accepts; connections finish their requests (each task saw the
    // stop and asked hyper to shut down gracefully) or are dropped at the deadline.
    drop(tcp);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN, tracker.slots.acquire_many(all)).await;
}

struct Connection {
    /// Released when the connection (its socket) is gone.
    _slot: OwnedSemaphorePermit,
    id: u64,
    peer: SocketAddr,
    state: Arc<ConnState>,
    tracker: Arc<Tracker>,
    limits: Limits,
    app: axum::Router,
    stop: watch::Receiver<bool>,
}

impl Connection {
    fn end(&self) {
        self.tracker.lock().remove(&self.id);
    }

    async fn run<IO>(mut self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (state, tracker, app) = (self.state.clone(), self.tracker.clone(), self.app.clone());
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let guard = InFlight::new(&state, &tracker);
                let mut app = app.clone();
                async move {
                    let response = tower_service::Service::call(&mut app, req).await;
                    drop(guard);
                    response
                }
            });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        let mut conn = std::pin::pin!(conn);
        let idle = self.limits.idle_timeout;
        let mut draining = false;
        loop {
            let last_done = self.state.last_done.load(Ordering::SeqCst);
            let idle_deadline = self.tracker.epoch + Duration::from_millis(last_done) + idle;
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(peer = %self.peer, error = %e, "admin connection ended");
                    }
                    break;
                }
                () = self.state.close.notified() => break,
                () = tokio::time::sleep_until(idle_deadline) => {
                    if self.state.last_done.load(Ordering::SeqCst) == last_done {
                        tracing::debug!(peer = %self.peer, "admin connection closed: no request completed within admin.idle_timeout");
                        break;
                    }
                }
                _ = self.stop.wait_for(|s| *s), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stays_under_the_descriptor_limit() {
        assert_eq!(
            effective_max_connections(1024, Some(1024)),
            1024 - FD_RESERVE
        );
        assert_eq!(effective_max_connections(100, Some(65536)), 100);
        assert_eq!(effective_max_connections(1024, None), 1024);
        assert_eq!(effective_max_connections(1024, Some(64)), 16);
        assert!(soft_fd_limit().is_some_and(|n| n > 0));
    }
}
