//! Pooled tunnel connections: reuse rules, single-flight dial state, idle release.

use super::*;

/// A pooled connection that has not been given a new stream for this long is released:
/// forgotten by the pool, so it closes once the streams it still carries end (a peer that
/// stopped being an endpoint is not kept connected, with keepalives, for as long as both
/// agents live). The next stream to that peer dials again.
pub(super) const POOL_IDLE: Duration = Duration::from_secs(300);

/// A pooled connection, the peer certificate it was authenticated with, and this agent's
/// identity it was dialled with.
#[derive(Debug, Clone)]
pub(super) struct Pooled<C> {
    pub(super) conn: C,
    pub(super) peer: Arc<tls::PeerFacts>,
    pub(super) identity: Arc<Identity>,
    /// When the pool last handed this connection out for a new stream (or dialled it).
    pub(super) used: Arc<std::sync::Mutex<tokio::time::Instant>>,
}

impl<C: Clone> Pooled<C> {
    pub(super) fn new(conn: C, peer: Arc<tls::PeerFacts>, identity: Arc<Identity>) -> Self {
        Self {
            conn,
            peer,
            identity,
            used: Arc::new(std::sync::Mutex::new(tokio::time::Instant::now())),
        }
    }

    /// A handle for a new stream, marking the connection used now.
    pub(super) fn take(&self) -> Self {
        *self.used.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
        self.clone()
    }

    pub(super) fn idle_for(&self, now: tokio::time::Instant) -> Duration {
        now.saturating_duration_since(*self.used.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

pub(super) type PoolKey = (SocketAddr, String);

/// A connection the pool can hold (a QUIC connection, a multiplexed TCP + TLS one).
pub(super) trait PoolConn: Clone {
    /// Why the connection takes no new streams any more (it is closed), if so.
    fn closed(&self) -> Option<String>;
    /// Whether `other` is a handle of the same connection.
    fn same(&self, other: &Self) -> bool;
}

/// What a dial gave: a connection to pool, or one the pool does not keep (a TCP + TLS
/// connection of its own, with a peer agent of an older version).
pub(super) enum Dialled<C, T> {
    /// Pooled from now on.
    Pooled(Pooled<C>),
    /// Used once, not pooled.
    Once(T),
}

/// The connections of one transport to peer agents, by peer address and expected
/// identity, with one dial at a time per peer (single flight): many streams opened at
/// once towards a peer (a start, a burst) share one dial instead of each making a
/// connection, which with a blocked path would be hundreds of handshakes waiting out
/// their timeout together. Opens that waited on a dial that failed fail at once with its
/// error instead of dialling again each.
#[derive(Debug)]
pub(super) struct Pool<C> {
    conns: std::sync::Mutex<HashMap<PoolKey, Pooled<C>>>,
    /// Each key's dial lock, with the time and error of its last failed dial.
    dialing: std::sync::Mutex<HashMap<PoolKey, Arc<DialState>>>,
}

impl<C> Default for Pool<C> {
    fn default() -> Self {
        Self {
            conns: std::sync::Mutex::new(HashMap::new()),
            dialing: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

impl<C: PoolConn> Pool<C> {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Pooled<C>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pooled connection for `key`, if it is still open and `reusable` says it may
    /// carry new streams; one that may not is forgotten, so the next stream dials a new
    /// connection, while the streams it carries go on until they end.
    pub(super) fn get(
        &self,
        key: &PoolKey,
        reusable: impl Fn(&Pooled<C>) -> bool,
    ) -> Option<Pooled<C>> {
        let mut conns = self.conns();
        let c = conns.get(key)?;
        if let Some(reason) = c.conn.closed() {
            tracing::info!(peer = %key.0, %reason, "pooled tunnel connection closed; dialling again");
            conns.remove(key);
            return None;
        }
        if !reusable(c) {
            conns.remove(key);
            return None;
        }
        Some(c.take())
    }

    /// The pooled connection for `key`, or the result of `dial`, made once for every
    /// caller waiting on it; a [`Dialled::Pooled`] result is pooled.
    pub(super) async fn get_or_dial<T, F>(
        &self,
        key: &PoolKey,
        reusable: impl Fn(&Pooled<C>) -> bool,
        dial: impl FnOnce() -> F,
    ) -> Result<Dialled<C, T>, TunnelError>
    where
        F: std::future::Future<Output = Result<Dialled<C, T>, TunnelError>>,
    {
        if let Some(c) = self.get(key, &reusable) {
            return Ok(Dialled::Pooled(c));
        }
        let lock = self
            .dialing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let waited_from = tokio::time::Instant::now();
        let mut last_failure = lock.0.lock().await;
        if let Some(c) = self.get(key, &reusable) {
            return Ok(Dialled::Pooled(c));
        }
        if let Some((at, message)) = last_failure.as_ref()
            && *at >= waited_from
        {
            return Err(TunnelError::Connect {
                peer: key.0,
                message: message.clone(),
            });
        }
        let result = dial().await;
        match &result {
            Ok(Dialled::Pooled(c)) => {
                *last_failure = None;
                self.conns().insert(key.clone(), c.clone());
            }
            Ok(Dialled::Once(_)) => *last_failure = None,
            Err(e) => *last_failure = Some((tokio::time::Instant::now(), e.to_string())),
        }
        result
    }

    /// Forgets the pooled connection of `key` if it is `conn` (a stream could not be
    /// opened on it: the next open dials again).
    pub(super) fn forget(&self, key: &PoolKey, conn: &C) {
        let mut conns = self.conns();
        if conns.get(key).is_some_and(|c| c.conn.same(conn)) {
            conns.remove(key);
        }
    }

    /// Keeps the connections for which `keep` is true.
    pub(super) fn retain(&self, keep: impl FnMut(&PoolKey, &mut Pooled<C>) -> bool) {
        self.conns().retain(keep);
    }

    /// Forgets every connection.
    pub(super) fn clear(&self) {
        self.conns().clear();
    }

    /// `f` of each pooled connection.
    #[cfg(test)]
    pub(super) fn map<R>(&self, f: impl Fn(&Pooled<C>) -> R) -> Vec<R> {
        self.conns().values().map(f).collect()
    }
}

impl PoolConn for quinn::Connection {
    fn closed(&self) -> Option<String> {
        self.close_reason().map(|r| r.to_string())
    }
    fn same(&self, other: &Self) -> bool {
        self.stable_id() == other.stable_id()
    }
}

/// A pooled connection's dial lock, holding the time and error of its last failed dial.
#[derive(Debug, Default)]
pub(super) struct DialState(tokio::sync::Mutex<Option<(tokio::time::Instant, String)>>);

/// Releases idle pooled connections of the tunnel behind `tunnel` every quarter of its
/// pool idle time (at most every 30 s), until the tunnel is gone.
pub(super) async fn release_idle_connections(tunnel: std::sync::Weak<Tunnel>) {
    loop {
        let Some(every) = tunnel
            .upgrade()
            .map(|t| (t.pool_idle() / 4).clamp(Duration::from_millis(50), Duration::from_secs(30)))
        else {
            return;
        };
        tokio::time::sleep(every).await;
        let Some(t) = tunnel.upgrade() else { return };
        t.release_idle();
    }
}

impl Tunnel {
    pub(super) fn pool_idle(&self) -> Duration {
        self.settings.pool_idle
    }

    /// Forgets the pooled connections (both transports) that were given no new stream for
    /// the pool's idle time; each closes once its last stream ends (quinn closes a
    /// connection when its last handle and stream are gone; HTTP/2 sends GOAWAY when its
    /// last sender and stream are).
    pub(super) fn release_idle(&self) {
        let idle = self.pool_idle();
        let now = tokio::time::Instant::now();
        let mut released = Vec::new();
        let mut note = |key: &PoolKey, idle_for: Duration| {
            let keep = idle_for < idle;
            if !keep {
                released.push(key.0);
            }
            keep
        };
        self.pool.retain(|key, c| note(key, c.idle_for(now)));
        self.mux_pool.retain(|key, c| note(key, c.idle_for(now)));
        for peer in &released {
            tracing::debug!(%peer, idle_secs = idle.as_secs(), "idle tunnel connection released");
        }
    }

    /// Whether a pooled connection may carry new streams: it was dialled with this agent's
    /// current certificate (after a renewal, new streams get new connections that present
    /// the new one), and the peer's certificate it was authenticated with is still
    /// trusted (not denied or expired since).
    pub(super) fn reusable(
        &self,
        key: &PoolKey,
        peer: &tls::PeerFacts,
        dialled_as: &Arc<Identity>,
    ) -> bool {
        let current = self
            .identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !Arc::ptr_eq(&current, dialled_as) {
            tracing::info!(peer = %key.0, "renewed certificate: new streams to the peer get a new tunnel connection");
            return false;
        }
        let state = self.state.get();
        if let Err(why) = peer.still_trusted(&state.deny_serials) {
            tracing::warn!(peer = %key.0, reason = %why, "the pooled tunnel connection takes no new streams");
            return false;
        }
        true
    }
}
