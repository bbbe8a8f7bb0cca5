//! Connection pool limits (issue 21): a DestinationRule's `trafficPolicy.connectionPool`,
//! enforced by the source agent as Envoy's circuit breakers are, per destination (service
//! or subset) and per agent.
//!
//! - `tcp.maxConnections`: HTTP/1.1 requests in flight to the destination at once (each
//!   holds one upstream connection until its response head arrives); TCP connections at
//!   once. A TCP connection over the limit is closed at once (Envoy's `UO`).
//! - `http.http1MaxPendingRequests`: HTTP/1.1 requests waiting for one of those
//!   connections; one more is answered 503 `UO`.
//! - `http.http2MaxRequests`: requests (any HTTP version) in flight at once; one more is
//!   answered 503 `UO`.
//! - `http.maxRetries`: retries in flight to the destination at once (Envoy's retry
//!   circuit breaker); a retry over it is not made, and the try's own answer goes back
//!   with the response flag `UO`.
//! - `http.maxRequestsPerConnection: 1`: no keep-alive upstream (`Connection: close`).
//! - `tcp.connectTimeout`: the connect to an endpoint (tunnel or plain TCP).
//! - `tcp.idleTimeout`: a spliced TCP connection with no byte either way for this long is
//!   closed (`0s`: never), instead of the agent's `idle_timeout`.
//!
//! An overflow answer carries `x-causeway-overflow: <the limit's field>` and names it in
//! its body; the request is recorded with the response flag `UO`, so the Istio metrics
//! (`response_flags="UO"`) and the access log count them. Limits live with the route table
//! and outlive it: a push that leaves a destination's `connectionPool` as it was keeps its
//! counters ([`PoolCache`]), so the requests and connections in flight still count
//! against the limit after any registry or routing change; a push that changes the
//! settings starts new counters (what is in flight finishes under the old ones).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use causeway_api::route::resource::ConnectionPoolSettings;
use causeway_api::route::validate::parse_duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A compiled `connectionPool`, with its counters.
#[derive(Debug)]
pub struct PoolLimits {
    connections: Option<Arc<Semaphore>>,
    max_connections: u32,
    max_pending: Option<u32>,
    pending: Arc<AtomicU32>,
    max_requests: Option<u32>,
    requests: Arc<AtomicU32>,
    max_retries: Option<u32>,
    retries: Arc<AtomicU32>,
    /// `maxRequestsPerConnection: 1`: each request on its own upstream connection.
    pub no_keepalive: bool,
    /// `tcp.connectTimeout`.
    pub connect_timeout: Option<Duration>,
    /// `tcp.idleTimeout` of spliced connections (`Some(None)`: `0s`, never).
    pub tcp_idle: Option<Option<Duration>>,
}

/// Which limit a request or connection overflowed (its field in `connectionPool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// `tcp.maxConnections`.
    MaxConnections,
    /// `http.http1MaxPendingRequests`.
    MaxPending,
    /// `http.http2MaxRequests`.
    MaxRequests,
    /// `http.maxRetries`.
    MaxRetries,
}

impl Overflow {
    /// The field path, for the answer and the log.
    pub fn field(self) -> &'static str {
        match self {
            Overflow::MaxConnections => "connectionPool.tcp.maxConnections",
            Overflow::MaxPending => "connectionPool.http.http1MaxPendingRequests",
            Overflow::MaxRequests => "connectionPool.http.http2MaxRequests",
            Overflow::MaxRetries => "connectionPool.http.maxRetries",
        }
    }
}

/// Decrements its counter when dropped.
#[derive(Debug)]
struct Count(Arc<AtomicU32>);

impl Drop for Count {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes one of `max` from `n`, if one is left.
fn take(n: &Arc<AtomicU32>, max: u32) -> Option<Count> {
    n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        (v < max).then_some(v + 1)
    })
    .ok()
    .map(|_| Count(n.clone()))
}

/// What an admitted request or connection holds until it is done.
#[derive(Debug, Default)]
pub struct Admitted {
    _request: Option<Count>,
    _connection: Option<OwnedSemaphorePermit>,
}

impl PoolLimits {
    /// The limits of `cp`; `None` when it sets none that the agent enforces.
    pub fn compile(cp: Option<&ConnectionPoolSettings>) -> Option<Arc<PoolLimits>> {
        let cp = cp?;
        // As in Istio, 0 (the protobuf default) leaves a limit unset.
        let n = |v: Option<i64>| {
            v.filter(|v| *v > 0)
                .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
        };
        let tcp = cp.tcp.as_ref();
        let http = cp.http.as_ref();
        let max_connections = n(tcp.and_then(|t| t.max_connections));
        let limits = PoolLimits {
            connections: max_connections.map(|m| {
                Arc::new(Semaphore::new(
                    usize::try_from(m)
                        .unwrap_or(usize::MAX)
                        .min(Semaphore::MAX_PERMITS),
                ))
            }),
            max_connections: max_connections.unwrap_or(u32::MAX),
            max_pending: n(http.and_then(|h| h.http1_max_pending_requests)),
            pending: Arc::default(),
            max_requests: n(http.and_then(|h| h.http2_max_requests)),
            requests: Arc::default(),
            max_retries: n(http.and_then(|h| h.max_retries)),
            retries: Arc::default(),
            no_keepalive: http.and_then(|h| h.max_requests_per_connection) == Some(1),
            connect_timeout: tcp
                .and_then(|t| t.connect_timeout.as_deref())
                .and_then(|t| parse_duration(t).ok())
                .filter(|d| !d.is_zero()),
            tcp_idle: tcp
                .and_then(|t| t.idle_timeout.as_deref())
                .and_then(|t| parse_duration(t).ok())
                .map(|d| (!d.is_zero()).then_some(d)),
        };
        let any = limits.connections.is_some()
            || limits.max_pending.is_some()
            || limits.max_requests.is_some()
            || limits.max_retries.is_some()
            || limits.no_keepalive
            || limits.connect_timeout.is_some()
            || limits.tcp_idle.is_some();
        any.then(|| Arc::new(limits))
    }

    /// Admits an HTTP request (`h2`: on an HTTP/2 upstream connection, where requests
    /// share connections and only `http2MaxRequests` applies): at once, after waiting
    /// for a connection (a pending request), or not (the limit it overflowed).
    pub async fn admit_request(&self, h2: bool) -> Result<Admitted, Overflow> {
        let request = match self.max_requests {
            Some(max) => Some(take(&self.requests, max).ok_or(Overflow::MaxRequests)?),
            None => None,
        };
        let connection = match (&self.connections, h2) {
            (Some(sem), false) => Some(match sem.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    let _pending = take(&self.pending, self.max_pending.unwrap_or(u32::MAX))
                        .ok_or(Overflow::MaxPending)?;
                    sem.clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| Overflow::MaxConnections)?
                }
            }),
            _ => None,
        };
        Ok(Admitted {
            _request: request,
            _connection: connection,
        })
    }

    /// Admits a retry, at once or not at all (`http.maxRetries`); the retry holds what is
    /// returned until its try is over.
    pub fn admit_retry(&self) -> Result<Admitted, Overflow> {
        let request = match self.max_retries {
            Some(max) => Some(take(&self.retries, max).ok_or(Overflow::MaxRetries)?),
            None => None,
        };
        Ok(Admitted {
            _request: request,
            _connection: None,
        })
    }

    /// Admits a TCP connection, at once or not at all (`tcp.maxConnections`).
    pub fn admit_connection(&self) -> Result<Admitted, Overflow> {
        let connection = match &self.connections {
            Some(sem) => Some(
                sem.clone()
                    .try_acquire_owned()
                    .map_err(|_| Overflow::MaxConnections)?,
            ),
            None => None,
        };
        Ok(Admitted {
            _request: None,
            _connection: connection,
        })
    }

    /// `tcp.maxConnections` (`u32::MAX`: unlimited).
    pub fn max_connections(&self) -> u32 {
        self.max_connections
    }
}

/// The compiled limits of the route table in force, by destination (service key and
/// subset name, `""` for the service's own policy), so that the next compile reuses the
/// limits (and so the counters) of every destination whose settings it leaves as they
/// were. Holds them weakly: limits no table and no request holds any more are dropped.
#[derive(Debug, Default)]
pub struct PoolCache {
    live: HashMap<(String, String), (ConnectionPoolSettings, Weak<PoolLimits>)>,
}

impl PoolCache {
    /// The limits of `cp` for destination (`service`, `subset`): the live ones when their
    /// settings are the same, else newly compiled ones (see [`PoolLimits::compile`]).
    pub fn limits(
        &mut self,
        service: &str,
        subset: &str,
        cp: Option<&ConnectionPoolSettings>,
    ) -> Option<Arc<PoolLimits>> {
        let settings = cp?;
        let key = (service.to_owned(), subset.to_owned());
        if let Some((was, live)) = self.live.get(&key)
            && was == settings
            && let Some(limits) = live.upgrade()
        {
            return Some(limits);
        }
        let limits = PoolLimits::compile(cp)?;
        self.live
            .insert(key, (settings.clone(), Arc::downgrade(&limits)));
        Some(limits)
    }

    /// Forgets the limits nothing holds any more (call after the old table is dropped).
    pub fn prune(&mut self) {
        self.live.retain(|_, (_, live)| live.strong_count() > 0);
    }

    /// How many destinations' limits are kept.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether no limits are kept.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_api::route::resource::{HttpSettings, TcpSettings};

    fn limits(
        max_connections: Option<i64>,
        pending: Option<i64>,
        requests: Option<i64>,
    ) -> Arc<PoolLimits> {
        PoolLimits::compile(Some(&ConnectionPoolSettings {
            tcp: Some(TcpSettings {
                max_connections,
                connect_timeout: Some("250ms".into()),
                idle_timeout: Some("90s".into()),
                ..TcpSettings::default()
            }),
            http: Some(HttpSettings {
                http1_max_pending_requests: pending,
                http2_max_requests: requests,
                max_requests_per_connection: Some(1),
                ..HttpSettings::default()
            }),
        }))
        .unwrap()
    }

    #[test]
    fn nothing_enforced_compiles_to_none() {
        assert!(PoolLimits::compile(None).is_none());
        assert!(PoolLimits::compile(Some(&ConnectionPoolSettings::default())).is_none());
        let l = limits(None, None, None);
        assert!(l.no_keepalive);
        assert_eq!(l.tcp_idle, Some(Some(Duration::from_secs(90))));
        assert_eq!(l.connect_timeout, Some(Duration::from_millis(250)));
        assert_eq!(l.max_connections(), u32::MAX);
    }

    #[tokio::test]
    async fn zero_is_unset_as_in_istio() {
        let l = limits(Some(0), Some(0), Some(0));
        assert_eq!(l.max_connections(), u32::MAX);
        let held: Vec<_> = admit_many(&l, 20).await;
        assert_eq!(held.len(), 20);
    }

    async fn admit_many(l: &PoolLimits, n: usize) -> Vec<Admitted> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(l.admit_request(false).await.unwrap());
        }
        v
    }

    #[tokio::test]
    async fn a_pending_request_waits_for_the_connection() {
        let l = limits(Some(1), Some(1), None);
        let first = l.admit_request(false).await.unwrap();
        // HTTP/2 requests share connections: only http2MaxRequests applies.
        assert!(l.admit_request(true).await.is_ok());
        let l2 = l.clone();
        let waiting = tokio::spawn(async move { l2.admit_request(false).await.map(|_| ()) });
        // Once the second waits it holds the only pending place: a third overflows.
        while l.pending.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            l.admit_request(false).await.unwrap_err(),
            Overflow::MaxPending
        );
        drop(first);
        assert_eq!(waiting.await.unwrap(), Ok(()));
    }

    #[test]
    fn retries_in_flight_are_bounded_by_max_retries() {
        let l = PoolLimits::compile(Some(&ConnectionPoolSettings {
            http: Some(HttpSettings {
                max_retries: Some(2),
                ..HttpSettings::default()
            }),
            ..ConnectionPoolSettings::default()
        }))
        .expect("maxRetries is enforced");
        let first = l.admit_retry().unwrap();
        let _second = l.admit_retry().unwrap();
        assert_eq!(l.admit_retry().unwrap_err(), Overflow::MaxRetries);
        assert_eq!(
            Overflow::MaxRetries.field(),
            "connectionPool.http.maxRetries"
        );
        // A retry that is over gives its place back.
        drop(first);
        assert!(l.admit_retry().is_ok());
        // Without maxRetries (or with 0, unset as in Istio) retries are not counted.
        let free = limits(Some(1), None, None);
        let held: Vec<_> = (0..100).map(|_| free.admit_retry().unwrap()).collect();
        assert_eq!(held.len(), 100);
    }

    #[tokio::test]
    async fn max_requests_and_tcp_connections() {
        let l = limits(Some(2), None, Some(1));
        let a = l.admit_request(true).await.unwrap();
        assert_eq!(
            l.admit_request(true).await.unwrap_err(),
            Overflow::MaxRequests
        );
        drop(a);
        let c1 = l.admit_connection().unwrap();
        let _c2 = l.admit_connection().unwrap();
        assert_eq!(l.admit_connection().unwrap_err(), Overflow::MaxConnections);
        drop(c1);
        assert!(l.admit_connection().is_ok());
        assert_eq!(
            Overflow::MaxPending.field(),
            "connectionPool.http.http1MaxPendingRequests"
        );
    }
}
