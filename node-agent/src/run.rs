//! The agent service: keeps a mutual-TLS connection to the controller and renews the
//! certificate at about half its lifetime (with jitter). While the controller is away
//! it keeps serving with the current certificate, retries with exponential backoff and
//! jitter, and reports the time left in `status.json`.

use std::future::Future;
use std::time::Duration;

use ring::rand::SecureRandom as _;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::client::{self, ClientError};
use crate::config::AgentConfig;
use crate::identity::{Identity, StateDir, write_atomic};

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

/// Exponential backoff with full jitter between `min` and `max`.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            current: min,
        }
    }
    fn reset(&mut self) {
        self.current = self.min;
    }
    fn next(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        d.mul_f64(0.5 + 0.5 * unit_random())
    }
}

struct Reporter {
    state: StateDir,
    status: RunStatus,
}

impl Reporter {
    fn write(&mut self) {
        self.status.updated_at = now_unix();
        let json = serde_json::to_vec_pretty(&self.status).expect("serializable");
        if let Err(e) = write_atomic(&self.state.file(STATUS_FILE), &json, 0o644) {
            tracing::warn!(error = %e, "cannot write status file");
        }
    }
}

/// Runs the agent until `shutdown` completes.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let state = StateDir::new(&cfg.state_dir);
    let mut identity: Identity = state.load()?;
    let controller = cfg
        .controller
        .clone()
        .unwrap_or_else(|| identity.info.controller.clone());
    tracing::info!(agent = %identity.info.agent_id, identity = %identity.spiffe_id, %controller, "agent starting");
    let mut rep = Reporter {
        state: state.clone(),
        status: RunStatus {
            pid: std::process::id(),
            controller: controller.clone(),
            ..RunStatus::default()
        },
    };
    let id_cfg = cfg.identity.clone();
    let mut backoff = Backoff::new(id_cfg.retry_min, id_cfg.retry_max);
    let mut renew_at = renewal_time(
        identity.not_before,
        identity.not_after,
        id_cfg.renew_at,
        id_cfg.jitter,
        unit_random(),
    );
    rep.status.next_renewal_at = Some(renew_at);
    rep.write();
    let mut conn: Option<quinn::Connection> = None;
    tokio::pin!(shutdown);

    loop {
        // 1. A control connection.
        if conn.as_ref().is_some_and(|c| c.close_reason().is_some()) {
            tracing::warn!(%controller, "control connection lost");
            conn = None;
            rep.status.controller_connected = false;
            rep.write();
        }
        if conn.is_none() {
            match client::connect_mtls(&identity, &controller).await {
                Ok(c) => {
                    tracing::info!(%controller, "connected to the controller");
                    conn = Some(c);
                    rep.status.controller_connected = true;
                    rep.status.last_error = None;
                    backoff.reset();
                    rep.write();
                }
                Err(e) => {
                    let left = identity.not_after - now_unix();
                    tracing::warn!(error = %e, certificate_expires_in_secs = left, "controller unreachable; serving with the current certificate");
                    rep.status.controller_connected = false;
                    rep.status.last_error = Some(e.to_string());
                    rep.write();
                    let wait = backoff.next();
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
                    rep.status.renewals += 1;
                    rep.status.last_renewal_at = Some(now_unix());
                    rep.status.next_renewal_at = Some(renew_at);
                    rep.status.last_error = None;
                    rep.write();
                    // The connection was authenticated with the old certificate; reconnect
                    // so the controller sees the new one.
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
                    rep.status.last_error = Some(e.to_string());
                    rep.write();
                    if matches!(
                        e,
                        ClientError::Connect { .. } | ClientError::Protocol { .. }
                    ) {
                        c.close(0u32.into(), b"retry");
                        conn = None;
                    }
                    let wait = if e.is_retryable() {
                        backoff.next()
                    } else {
                        id_cfg.retry_max
                    };
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            }
        }

        // 3. Wait for the renewal time, a lost connection, or shutdown.
        let until = Duration::from_secs(u64::try_from(renew_at - now).unwrap_or(0));
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep_until(Instant::now() + until) => {}
            _ = c.closed() => {}
        }
    }
    if let Some(c) = conn {
        c.close(0u32.into(), b"agent stopping");
    }
    rep.status.controller_connected = false;
    rep.status.pid = 0;
    rep.write();
    tracing::info!("agent stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let waits: Vec<Duration> = (0..6).map(|_| b.next()).collect();
        assert!(waits[0] <= Duration::from_secs(1));
        assert!(waits[3] >= Duration::from_secs(4), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(8)));
        b.reset();
        assert!(b.next() <= Duration::from_secs(1));
    }
}
