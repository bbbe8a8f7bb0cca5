//! The agent service: runs the data plane ([`crate::dataplane`]), keeps a mutual-TLS
//! connection to the controller and renews the certificate at about half its lifetime
//! (with jitter); a renewed certificate is handed to the tunnel for new connections. While the controller is away
//! it keeps serving with the current certificate, retries with exponential backoff and
//! jitter, and reports the time left in `status.json`.

use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ring::rand::SecureRandom as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::client::{self, ClientError};
use crate::config::AgentConfig;
use crate::identity::{Identity, StateDir, write_atomic};
use crate::push::{self, ConfigCache, Event, SharedState};

/// The status file written by the running agent.
pub const STATUS_FILE: &str = "status.json";

/// What the running agent reports about itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunStatus {
    /// Process id of the running agent.
    pub pid: u32,
    /// Whether a control connection to the controller is up.
    pub controller_connected: bool,
    /// The controller address in use.
    pub controller: String,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Unix seconds of the last successful renewal by this process.
    pub last_renewal_at: Option<i64>,
    /// Unix seconds of the next planned renewal.
    pub next_renewal_at: Option<i64>,
    /// Renewals done by this process.
    pub renewals: u64,
    /// Unix seconds of this report.
    pub updated_at: i64,
    /// The applied config version (0: none).
    #[serde(default)]
    pub config_version: u64,
    /// The controller's latest version as last heard.
    #[serde(default)]
    pub controller_version: Option<u64>,
    /// Why the last refused update was refused.
    #[serde(default)]
    pub config_error: Option<String>,
    /// Unix seconds of the last applied update.
    #[serde(default)]
    pub config_applied_at: Option<i64>,
    /// Why the controller refused this workload's address (it is then not registered).
    #[serde(default)]
    pub registration_error: Option<String>,
    /// Full snapshots applied by this process.
    #[serde(default)]
    pub full_updates: u64,
    /// Deltas applied by this process.
    #[serde(default)]
    pub delta_updates: u64,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
        .unwrap_or(0)
}

/// A random number in [0, 1).
fn unit_random() -> f64 {
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// When to renew a certificate valid from `not_before` to `not_after`.
pub fn renewal_time(not_before: i64, not_after: i64, renew_at: f64, jitter: f64, r: f64) -> i64 {
    let life = (not_after - not_before).max(0) as f64;
    let fraction = renew_at + jitter * (2.0 * r - 1.0);
    not_before + (life * fraction) as i64
}

/// Control-connection and renewal retries: the shared backoff (full jitter).
use causeway_api::backoff::Backoff;

struct Reporter {
    status: RunStatus,
    health: Arc<crate::health::Health>,
    /// To the status file's writer ([`status_writer`]).
    file: watch::Sender<RunStatus>,
}

impl Reporter {
    fn write(&mut self) {
        self.status.updated_at = now_unix();
        self.health.update(&self.status);
        self.file.send_replace(self.status.clone());
    }
}

/// Writes `status.json` with the latest status published on the returned sender, off the
/// data-plane thread; a burst of reports is one write.
fn status_writer(state: &StateDir) -> (watch::Sender<RunStatus>, crate::writer::LatestWriter) {
    let (tx, rx) = watch::channel(RunStatus::default());
    let path = state.file(STATUS_FILE);
    let writer = crate::writer::LatestWriter::spawn(rx, move |status: RunStatus| {
        let json = serde_json::to_vec_pretty(&status).expect("serializable");
        if let Err(e) = write_atomic(&path, &json, 0o644) {
            tracing::warn!(error = %e, "cannot write status file");
        }
    });
    (tx, writer)
}

/// The workload address to register: configured, or the local address of the route to
/// the controller.
fn local_address_towards(remote: std::net::SocketAddr) -> Option<IpAddr> {
    let bind: std::net::SocketAddr = if remote.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let sock = std::net::UdpSocket::bind(bind).ok()?;
    sock.connect(remote).ok()?;
    sock.local_addr().ok().map(|a| a.ip())
}

struct Subscription {
    task: tokio::task::JoinHandle<Result<(), ClientError>>,
    goodbye: Option<oneshot::Sender<()>>,
}

/// Runs the agent until `shutdown` completes.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let state = StateDir::new(&cfg.state_dir);
    let mut identity: Identity = state.load()?;
    let controllers = client::Controllers::new(cfg.controller_list(&identity.info.controller));
    let controller = controllers.list().join(", ");
    let cache = ConfigCache::new(state.path());
    let mesh_state = SharedState::new(cache.load());
    let cached_version = mesh_state.get().version;
    // Pushes are published in memory at once; this task persists the latest (with its
    // fsync) on the blocking pool, never on the data-plane thread.
    let cache_writer = cache.clone().spawn_writer(&mesh_state);
    tracing::info!(agent = %identity.info.agent_id, identity = %identity.spiffe_id, %controller, cached_config_version = cached_version, "agent starting");
    let health = crate::health::Health::new();
    health.set_identity(identity.not_after);
    let health_server = match crate::health::serve(&cfg.health, health.clone()).await {
        Ok(s) => s.map(|(_, task)| task),
        Err(e) => {
            tracing::warn!(error = %e, "health endpoint not available");
            None
        }
    };
    // `/metrics` for remote scrapers ([telemetry] metrics_listen); a failure is fatal,
    // as the operator asked for it and Prometheus would be told of it.
    let metrics_server = crate::telemetry::serve_metrics(&cfg.telemetry, health.clone())
        .await?
        .map(|(_, task)| task);
    // Metrics, access logs and tracing, before the data plane that reports to them.
    let telemetry = crate::telemetry::Telemetry::start(
        &cfg.telemetry,
        &identity,
        &cfg.dns.causeway_domain,
        mesh_state.clone(),
        cfg.dataplane.capture.then_some(cfg.dataplane.mark),
    );
    health.set_telemetry(telemetry.clone());
    if let Some(istio) = &telemetry.istio {
        crate::telemetry::edges::install(istio.metrics.clone());
    }
    let (status_file, status_writer) = status_writer(&state);
    let rep = Arc::new(Mutex::new(Reporter {
        file: status_file,
        status: RunStatus {
            pid: std::process::id(),
            controller: controllers.current(),
            config_version: cached_version,
            ..RunStatus::default()
        },
        health: health.clone(),
    }));
    let report = |f: &dyn Fn(&mut RunStatus)| {
        let mut r = rep.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut r.status);
        r.write();
    };
    // One JWKS cache for the agent (RequestAuthentication on HTTP ports); a bad
    // `[jwt] ca_file` stops the start, naming the file.
    let jwks = Arc::new(crate::jwks::JwksCache::from_config(&cfg.jwt)?);
    // The data plane before the control loop: it serves from the cached config while the
    // controller is away (static stability).
    let dataplane = crate::dataplane::Dataplane::start(
        &cfg.dataplane,
        &identity,
        mesh_state.clone(),
        cfg.address,
        state.path(),
        Some(telemetry),
    )
    .await?;
    if let Some(t) = dataplane.tunnel() {
        t.set_jwks(jwks);
    }
    // DNS after the data plane (its forwarder's sockets carry the data plane's mark); it
    // answers from the cached config too. A DNS failure is logged, never fatal: nothing
    // is redirected to a server that is not running.
    let dns = if cfg.dns.enabled {
        match crate::dns::Dns::start(
            &cfg.dns,
            cfg.dataplane.capture,
            cfg.dataplane.mark,
            mesh_state.clone(),
            state.path(),
        )
        .await
        {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::error!(error = %e, "DNS server not started; applications keep using their resolvers directly");
                None
            }
        }
    } else {
        None
    };
    if let Some(t) = dataplane.tunnel() {
        health.set_tunnel(t.clone());
    }
    if let Some(d) = &dns {
        health.set_dns(d.metrics());
    }
    health.set_dataplane_up(true);
    let id_cfg = cfg.identity.clone();
    let mut backoff = Backoff::new(id_cfg.retry_min, id_cfg.retry_max);
    let mut renew_at = renewal_time(
        identity.not_before,
        identity.not_after,
        id_cfg.renew_at,
        id_cfg.jitter,
        unit_random(),
    );
    report(&|s| s.next_renewal_at = Some(renew_at));
    let mut conn: Option<quinn::Connection> = None;
    let mut sub: Option<Subscription> = None;
    // The subscription task's result, once it ended (taken in step 1).
    let mut sub_result: Option<Result<Result<(), ClientError>, tokio::task::JoinError>> = None;
    tokio::pin!(shutdown);

    loop {
        // 1. A control connection with a config subscription.
        let sub_ended = sub_result.is_some();
        if conn.as_ref().is_some_and(|c| c.close_reason().is_some()) || sub_ended {
            let mut refused = false;
            let ended = match (sub.take(), sub_result.take()) {
                (_, Some(r)) => Some(r),
                (Some(s), None) => Some(s.task.await),
                (None, None) => None,
            };
            if let Some(Ok(Err(e))) = ended {
                refused = !e.is_retryable();
                tracing::warn!(error = %e, "config subscription ended");
                let msg = e.to_string();
                // One write: a reader never sees the error with the connection still "up".
                report(&move |st| {
                    st.last_error = Some(msg.clone());
                    st.controller_connected = false;
                });
            }
            if let Some(c) = conn.take() {
                c.close(0u32.into(), b"reconnecting");
            }
            tracing::warn!(controller = %controllers.current(), "control connection lost; serving from the last applied config");
            report(&|s| s.controller_connected = false);
            // With several controllers, the next attempt starts with another one.
            controllers.advance();
            let wait = if refused {
                id_cfg.retry_max
            } else {
                backoff.next_delay()
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if conn.is_none() {
            match controllers.connect_mtls(&identity).await {
                Ok((c, controller)) => {
                    let address = cfg
                        .address
                        .or_else(|| local_address_towards(c.remote_address()));
                    tracing::info!(%controller, address = ?address, "connected to the controller");
                    let (tx, rx) = oneshot::channel();
                    let (c2, st, rep2) = (c.clone(), mesh_state.clone(), rep.clone());
                    let facts_dir = Some(state.path().to_path_buf());
                    let metrics_endpoint =
                        advertised_metrics(cfg.telemetry.metrics_listen, address);
                    let task = tokio::spawn(async move {
                        push::subscribe(
                            &c2,
                            st,
                            address,
                            metrics_endpoint,
                            facts_dir,
                            rx,
                            move |ev| {
                                let mut r = rep2.lock().unwrap_or_else(|p| p.into_inner());
                                match ev {
                                    Event::Applied(v, full) => {
                                        if full {
                                            r.status.full_updates += 1;
                                        } else {
                                            r.status.delta_updates += 1;
                                        }
                                        r.status.config_version = v;
                                        r.status.controller_version =
                                            Some(r.status.controller_version.unwrap_or(0).max(v));
                                        r.status.config_error = None;
                                        r.status.config_applied_at = Some(now_unix());
                                    }
                                    Event::Refused(v, e) => {
                                        r.status.controller_version =
                                            Some(r.status.controller_version.unwrap_or(0).max(v));
                                        r.status.config_error = Some(e);
                                    }
                                    Event::ControllerVersion(v) => {
                                        r.status.controller_version = Some(v)
                                    }
                                    Event::Registration(e) => r.status.registration_error = e,
                                }
                                r.write();
                            },
                        )
                        .await
                    });
                    sub = Some(Subscription {
                        task,
                        goodbye: Some(tx),
                    });
                    conn = Some(c);
                    backoff.reset();
                    report(&move |s| {
                        s.controller_connected = true;
                        s.controller.clone_from(&controller);
                        s.last_error = None;
                    });
                }
                Err(e) => {
                    let left = identity.not_after - now_unix();
                    tracing::warn!(error = %e, certificate_expires_in_secs = left, "controller unreachable; serving with the current certificate and config");
                    let msg = e.to_string();
                    report(&move |s| {
                        s.controller_connected = false;
                        s.last_error = Some(msg.clone());
                    });
                    let wait = backoff.next_delay();
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            }
        }
        let c = conn.clone().expect("connected above");

        // 2. Renew when due.
        let now = now_unix();
        if now >= renew_at {
            match client::renew(&c, &state, &identity).await {
                Ok(new) => {
                    tracing::info!(serial = %new.serial, expires_at = new.not_after, "certificate renewed");
                    identity = new;
                    health.set_identity(identity.not_after);
                    dataplane.reload(&identity);
                    // Never renew again sooner than retry_min, whatever the certificate says.
                    let earliest = now_unix()
                        + i64::try_from(id_cfg.retry_min.as_secs())
                            .unwrap_or(1)
                            .max(1);
                    renew_at = renewal_time(
                        identity.not_before,
                        identity.not_after,
                        id_cfg.renew_at,
                        id_cfg.jitter,
                        unit_random(),
                    )
                    .max(earliest);
                    backoff.reset();
                    let at = now_unix();
                    report(&move |s| {
                        s.renewals += 1;
                        s.last_renewal_at = Some(at);
                        s.next_renewal_at = Some(renew_at);
                        s.last_error = None;
                    });
                    // The connection was authenticated with the old certificate; reconnect
                    // so the controller sees the new one. The subscription resumes from
                    // its version.
                    if let Some(mut s) = sub.take()
                        && let Some(g) = s.goodbye.take()
                    {
                        drop(g);
                        s.task.abort();
                    }
                    c.close(0u32.into(), b"renewed");
                    conn = None;
                    continue;
                }
                Err(e) => {
                    let left = identity.not_after - now_unix();
                    if e.is_retryable() {
                        tracing::warn!(error = %e, certificate_expires_in_secs = left, "renewal failed; will retry");
                    } else {
                        tracing::error!(error = %e, certificate_expires_in_secs = left, "renewal refused by the controller");
                    }
                    let msg = e.to_string();
                    report(&move |s| s.last_error = Some(msg.clone()));
                    let wait = if e.is_retryable() {
                        backoff.next_delay()
                    } else {
                        id_cfg.retry_max
                    };
                    renew_at = now_unix() + i64::try_from(wait.as_secs()).unwrap_or(1).max(1);
                    if matches!(
                        e,
                        ClientError::Connect { .. } | ClientError::Protocol { .. }
                    ) {
                        c.close(0u32.into(), b"retry");
                    }
                    continue;
                }
            }
        }

        // 3. Wait for the renewal time, a lost connection or subscription, or shutdown.
        let until = Duration::from_secs(u64::try_from(renew_at - now).unwrap_or(0));
        let sub_done = async {
            match sub.as_mut() {
                Some(s) => (&mut s.task).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep_until(Instant::now() + until) => {}
            _ = c.closed() => {}
            r = sub_done => sub_result = Some(r),
        }
    }
    crate::health::notify("STOPPING=1");
    health.set_dataplane_up(false);
    // Graceful stop: tell the controller to deregister this workload now.
    if let Some(mut s) = sub.take()
        && sub_result.is_none()
    {
        if let Some(g) = s.goodbye.take() {
            let _ = g.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), &mut s.task).await;
    }
    if let Some(c) = conn {
        c.close(0u32.into(), b"agent stopping");
    }
    if let Some(d) = dns {
        d.stop().await;
    }
    if let Err(e) = dataplane.stop(cfg.dataplane.drain_timeout).await {
        tracing::error!(error = %e, "cannot remove capture rules; `causeway-agent doctor` shows what is left");
    }
    report(&|s| {
        s.controller_connected = false;
        s.pid = 0;
    });
    // The last config and status reach the disk before the process ends.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        cache_writer.flush().await;
        status_writer.flush().await;
    })
    .await;
    if let Some(t) = health_server {
        t.abort();
    }
    if let Some(t) = metrics_server {
        t.abort();
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// The address Prometheus is told to scrape (`[telemetry] metrics_listen`): as
/// configured, or with the workload `address` when it listens on all addresses.
fn advertised_metrics(
    listen: Option<std::net::SocketAddr>,
    address: Option<std::net::IpAddr>,
) -> Option<std::net::SocketAddr> {
    let listen = listen?;
    if listen.ip().is_unspecified() {
        return address.map(|a| std::net::SocketAddr::new(a, listen.port()));
    }
    Some(listen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_metrics_endpoint_is_routable() {
        let a: std::net::IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(advertised_metrics(None, Some(a)), None);
        assert_eq!(
            advertised_metrics(Some("0.0.0.0:15090".parse().unwrap()), Some(a)),
            Some("10.0.0.7:15090".parse().unwrap())
        );
        assert_eq!(
            advertised_metrics(Some("0.0.0.0:15090".parse().unwrap()), None),
            None
        );
        assert_eq!(
            advertised_metrics(Some("10.0.0.9:15090".parse().unwrap()), Some(a)),
            Some("10.0.0.9:15090".parse().unwrap())
        );
    }

    #[test]
    fn renewal_is_about_half_life_with_jitter() {
        assert_eq!(renewal_time(0, 1000, 0.5, 0.1, 0.5), 500);
        assert_eq!(renewal_time(0, 1000, 0.5, 0.1, 0.0), 400);
        assert!(renewal_time(0, 1000, 0.5, 0.1, 0.999_999) <= 600);
        assert_eq!(
            renewal_time(100, 50, 0.5, 0.1, 0.5),
            100,
            "no life left: renew now"
        );
    }

    #[test]
    fn backoff_grows_to_its_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        // Full jitter: each wait is drawn from [0, bound]; the bound doubles to the cap.
        let mut bounds = Vec::new();
        for _ in 0..6 {
            let bound = b.current_bound();
            let w = b.next_delay();
            assert!(w <= bound, "{w:?} above {bound:?}");
            bounds.push(bound.as_secs());
        }
        assert_eq!(bounds, [1, 2, 4, 8, 8, 8]);
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}
