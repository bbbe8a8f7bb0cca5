//! `causeway-agent status`: identity, expiry and controller connection, from the state dir.

use serde::Serialize;

use crate::identity::StateDir;
use crate::run::{RunStatus, STATUS_FILE};

/// The status report.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Agent id.
    pub agent_id: String,
    /// SPIFFE ID.
    pub identity: String,
    /// Group.
    pub group: String,
    /// Controller address.
    pub controller: String,
    /// Certificate serial.
    pub serial: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Seconds left (negative once expired).
    pub expires_in_secs: i64,
    /// Whether an agent process is running for this state dir.
    pub running: bool,
    /// Whether that process has a control connection.
    pub controller_connected: bool,
    /// The applied config version (from the running agent, else the on-disk cache);
    /// `null` until the controller has pushed config.
    pub config_version: Option<u64>,
    /// The controller's version as last heard, when known.
    pub controller_version: Option<u64>,
    /// Versions behind the controller.
    pub config_lag: Option<u64>,
    /// Why the last refused update was refused.
    pub config_error: Option<String>,
    /// Why the controller refused this workload's address (not registered in the mesh).
    pub registration_error: Option<String>,
    /// Services in the applied config.
    pub services: usize,
    /// Full snapshots applied by the running process.
    pub full_updates: Option<u64>,
    /// Deltas applied by the running process.
    pub delta_updates: Option<u64>,
    /// The last error the running agent reported.
    pub last_error: Option<String>,
    /// Unix seconds.
    pub last_renewal_at: Option<i64>,
    /// Unix seconds.
    pub next_renewal_at: Option<i64>,
    /// Endpoints ejected by outlier detection (a DestinationRule's `outlierDetection`)
    /// in the running agent, with the time left.
    pub outlier_ejections: Vec<crate::dataplane::lb::Ejected>,
}

fn process_alive(pid: u32) -> bool {
    pid != 0
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("causeway-agent"))
            .unwrap_or(false)
}

/// Builds the report.
pub fn status(state: &StateDir) -> anyhow::Result<Status> {
    let id = state.load()?;
    let run: RunStatus = std::fs::read(state.file(STATUS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let running = process_alive(run.pid);
    let cached = crate::push::ConfigCache::new(state.path()).load();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
        .unwrap_or(0);
    Ok(Status {
        agent_id: id.info.agent_id,
        identity: id.spiffe_id.to_string(),
        group: id.info.group,
        controller: if run.controller.is_empty() {
            id.info.controller
        } else {
            run.controller
        },
        serial: id.serial,
        expires_at: id.not_after,
        expires_in_secs: id.not_after - now,
        running,
        controller_connected: running && run.controller_connected,
        config_version: (cached.version > 0).then_some(cached.version),
        controller_version: if running {
            run.controller_version
        } else {
            None
        },
        config_lag: if running {
            run.controller_version
                .map(|c| c.saturating_sub(cached.version))
        } else {
            None
        },
        config_error: if running { run.config_error } else { None },
        registration_error: if running {
            run.registration_error
        } else {
            None
        },
        services: cached.services.len(),
        full_updates: running.then_some(run.full_updates),
        delta_updates: running.then_some(run.delta_updates),
        last_error: if running { run.last_error } else { None },
        last_renewal_at: run.last_renewal_at,
        next_renewal_at: if running { run.next_renewal_at } else { None },
        outlier_ejections: if running {
            outlier_ejections(state, now)
        } else {
            Vec::new()
        },
    })
}

/// The running agent's outlier ejections, with the time left now.
fn outlier_ejections(state: &StateDir, now_secs: i64) -> Vec<crate::dataplane::lb::Ejected> {
    let Some(report) = std::fs::read(state.file(crate::dataplane::lb::OUTLIERS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<crate::dataplane::lb::OutlierReport>(&b).ok())
    else {
        return Vec::new();
    };
    let elapsed = u64::try_from(now_secs)
        .unwrap_or(0)
        .saturating_mul(1000)
        .saturating_sub(report.at_unix_ms);
    report
        .ejected
        .into_iter()
        .filter(|e| e.remaining_ms > elapsed)
        .map(|mut e| {
            e.remaining_ms -= elapsed;
            e
        })
        .collect()
}

/// Human-readable form.
pub fn render(s: &Status) -> String {
    let left = if s.expires_in_secs >= 0 {
        format!(
            "in {}",
            humantime::format_duration(std::time::Duration::from_secs(
                s.expires_in_secs.unsigned_abs()
            ))
        )
    } else {
        format!(
            "EXPIRED {} ago: re-join with a new token",
            humantime::format_duration(std::time::Duration::from_secs(
                s.expires_in_secs.unsigned_abs()
            ))
        )
    };
    let mut out = format!(
        "agent:       {}\nidentity:    {}\ngroup:       {}\ncontroller:  {} ({})\ncertificate: serial {}, expires {} ({left})\n",
        s.agent_id,
        s.identity,
        s.group,
        s.controller,
        match (s.running, s.controller_connected) {
            (false, _) => "agent not running",
            (true, true) => "connected",
            (true, false) => "NOT connected",
        },
        s.serial,
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(s.expires_at.max(0).unsigned_abs())
        ),
    );
    out.push_str(&format!(
        "config:      {}\n",
        s.config_version
            .map_or("no config pushed yet".to_owned(), |v| format!(
                "version {v}, {} services{}",
                s.services,
                s.config_lag
                    .map_or(String::new(), |l| format!(", {l} behind the controller"))
            ))
    ));
    if let Some(e) = &s.config_error {
        out.push_str(&format!("config refused: {e}\n"));
    }
    if let Some(e) = &s.registration_error {
        out.push_str(&format!("NOT registered: {e}\n"));
    }
    for e in &s.outlier_ejections {
        out.push_str(&format!(
            "ejected:     {} by outlier detection, {} ms left (ejection {})\n",
            e.endpoint, e.remaining_ms, e.ejections
        ));
    }
    if let Some(e) = &s.last_error {
        out.push_str(&format!("last error:  {e}\n"));
    }
    out
}
