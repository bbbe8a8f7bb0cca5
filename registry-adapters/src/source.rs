//! What all sources share: the update message, tuning, HTTP reading with limits, errors.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use causeway_api::registry::{
    Registry, RegistryDelta, ServiceDelta, SourceChange, SourceKind, SourceState,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{ConfigErrors, SourcesConfig};
use crate::{ConsulSource, EurekaSource, FileSource, KubernetesSource};

/// What a source sends to the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceUpdate {
    /// The source's configured name.
    pub source: String,
    /// Its kind.
    pub kind: SourceKind,
    /// New data, if any: `Full` on the first sync and after a full re-fetch, `Services`
    /// for the services that changed. `None` when only the state changed.
    pub change: Option<SourceChange>,
    /// The source's state after this update. When stale, keep its last known good data.
    pub state: SourceState,
}

/// Applies an update to the merged registry: its data and its state in one step (a
/// stale source's endpoints are flagged stale, never removed). Returns the delta, if
/// anything changed (at most one).
pub fn apply_update(
    registry: &mut Registry,
    update: SourceUpdate,
    now_ms: u64,
) -> Vec<RegistryDelta> {
    let mut services = Vec::new();
    let version = apply_update_into(registry, update, now_ms, &mut |d| services.push(d));
    if services.is_empty() {
        Vec::new()
    } else {
        vec![RegistryDelta { version, services }]
    }
}

/// [`apply_update`], consuming the update (its data moves into the registry, nothing is
/// copied) and handing each changed service's delta to `sink` as it is computed, so a
/// full re-sync of a large source never holds a second copy of it. Returns the
/// registry's version afterwards.
pub fn apply_update_into(
    registry: &mut Registry,
    update: SourceUpdate,
    now_ms: u64,
    sink: &mut dyn FnMut(ServiceDelta),
) -> u64 {
    let SourceUpdate {
        source,
        kind,
        change,
        mut state,
    } = update;
    if state.is_stale() && state.stale_since_ms.is_none() {
        state.stale_since_ms = Some(now_ms);
    }
    match change {
        Some(change) => registry.apply_with_state_into(&source, kind, change, state, sink),
        None if state.is_stale() => {
            let error = state.last_error.as_deref().unwrap_or("source failing");
            let since = state.stale_since_ms.unwrap_or(now_ms);
            registry.mark_stale_into(&source, kind, error, since, sink)
        }
        None if registry
            .sources()
            .get(&source)
            .is_some_and(|s| s.state.is_stale()) =>
        {
            // recovered without new data: flip its endpoints back
            registry.apply_with_state_into(
                &source,
                kind,
                SourceChange::Services(Default::default()),
                SourceState::synced(),
                sink,
            )
        }
        None => registry.version(),
    }
}

/// Tuning shared by all sources. [`Default`] is for production; tests shorten it.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Consul blocking-query `wait` (Consul caps it at 10 min).
    pub consul_wait: Duration,
    /// Added to `wait + wait/16` for a blocking query's HTTP timeout, and the timeout
    /// of every other request.
    pub request_timeout: Duration,
    /// At least this long between two calls of one watch (rate limit).
    pub min_interval: Duration,
    /// Retry delay bound after the first error; doubles with each further error up to
    /// `max_backoff`, each delay drawn at random below the bound ([`Backoff`]).
    pub error_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Largest response body accepted; larger is an error (the source goes stale).
    pub max_body_bytes: usize,
    /// Eureka delta poll interval (Eureka clients use 30 s).
    pub eureka_interval: Duration,
    /// How often the file source checks its file.
    pub file_interval: Duration,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            consul_wait: Duration::from_secs(300),
            request_timeout: Duration::from_secs(10),
            min_interval: Duration::from_millis(200),
            error_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_body_bytes: 64 << 20,
            eureka_interval: Duration::from_secs(30),
            file_interval: Duration::from_secs(2),
        }
    }
}

impl SourceOptions {
    /// These options with a Consul source's own settings (`wait`, `request_timeout`,
    /// `min_interval`, `retry_initial`, `retry_max`) in place of the defaults.
    pub fn for_consul(&self, cfg: &crate::config::ConsulSourceConfig) -> SourceOptions {
        SourceOptions {
            consul_wait: cfg.wait.unwrap_or(self.consul_wait),
            request_timeout: cfg.request_timeout.unwrap_or(self.request_timeout),
            min_interval: cfg.min_interval.unwrap_or(self.min_interval),
            error_backoff: cfg.retry_initial.unwrap_or(self.error_backoff),
            max_backoff: cfg.retry_max.unwrap_or(self.max_backoff),
            ..self.clone()
        }
    }
}

/// Starts one task per configured source, all sending to `tx`. Validates first and
/// reports every problem at once.
pub fn spawn_sources(
    config: &SourcesConfig,
    options: &SourceOptions,
    tx: mpsc::Sender<SourceUpdate>,
) -> Result<Vec<JoinHandle<()>>, ConfigErrors> {
    config.validate()?;
    let mut problems = Vec::new();
    let mut tasks = Vec::new();
    for c in &config.consul {
        match ConsulSource::new(c, options) {
            Ok(s) => tasks.push(tokio::spawn(s.run(tx.clone()))),
            Err(e) => problems.push(e.to_string()),
        }
    }
    for e in &config.eureka {
        match EurekaSource::new(e, options) {
            Ok(s) => tasks.push(tokio::spawn(s.run(tx.clone()))),
            Err(e) => problems.push(e.to_string()),
        }
    }
    for k in &config.kubernetes {
        tasks.push(tokio::spawn(
            KubernetesSource::new(k, options).run(tx.clone()),
        ));
    }
    for f in &config.file {
        tasks.push(tokio::spawn(FileSource::new(f, options).run(tx.clone())));
    }
    if problems.is_empty() {
        Ok(tasks)
    } else {
        for t in tasks {
            t.abort();
        }
        Err(ConfigErrors { problems })
    }
}

/// Errors creating a source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The token file could not be read.
    #[error(
        "source {source_name:?}: cannot read token_file {path}: {error}; create it with the ACL token, readable by the controller"
    )]
    TokenFile {
        /// Source name.
        source_name: String,
        /// The path.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// The CA file could not be read.
    #[error(
        "source {source_name:?}: cannot read ca_file {path}: {error}; point it at the PEM of the registry's CA"
    )]
    CaFile {
        /// Source name.
        source_name: String,
        /// The path.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("source {source_name:?}: cannot build its HTTP client: {error}")]
    Client {
        /// Source name.
        source_name: String,
        /// Why.
        error: reqwest::Error,
    },
    /// A URL in the config is not usable.
    #[error(
        "source {source_name:?}: {field} {value:?} is not an http(s) URL; write it as http://host:port"
    )]
    BadUrl {
        /// Source name.
        source_name: String,
        /// Field name.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// A namespace in the config is not a DNS label.
    #[error(
        "source {source_name:?}: namespace {value:?} is not a DNS label; use lower-case letters, digits and '-'"
    )]
    BadNamespace {
        /// Source name.
        source_name: String,
        /// The value.
        value: String,
    },
}

/// Why one fetch from a registry failed. The text is what operators see as `last_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// Could not connect.
    #[error(
        "GET {url}: cannot connect ({detail}); check the address and that the registry is running"
    )]
    Connect {
        /// The URL.
        url: String,
        /// The cause.
        detail: String,
    },
    /// No complete answer in time.
    #[error("GET {url}: no answer within {after:?}; the registry is overloaded or unreachable")]
    Timeout {
        /// The URL.
        url: String,
        /// The timeout.
        after: Duration,
    },
    /// Refused for lack of rights.
    #[error("GET {url}: HTTP {status} ({body}); check the ACL token (token_file) and its policy")]
    Auth {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Start of the body.
        body: String,
    },
    /// Any other non-success status.
    #[error("GET {url}: HTTP {status} ({body})")]
    Status {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Start of the body.
        body: String,
    },
    /// The body exceeded the limit.
    #[error(
        "GET {url}: response larger than {limit} bytes; refusing it (raise max_body_bytes if the registry is really that big)"
    )]
    TooLarge {
        /// The URL.
        url: String,
        /// The limit.
        limit: usize,
    },
    /// The body broke off or did not parse.
    #[error("GET {url}: bad response body: {detail}")]
    Body {
        /// The URL.
        url: String,
        /// What is wrong.
        detail: String,
    },
    /// A required header is missing or bad.
    #[error("GET {url}: header {header} missing or not a number; is this a Consul server?")]
    Header {
        /// The URL.
        url: String,
        /// Which header.
        header: &'static str,
    },
}

/// Sends a GET and reads the body with a size limit. Returns status-checked headers and body.
pub(crate) async fn get_limited(
    request: reqwest::RequestBuilder,
    url: &str,
    timeout: Duration,
    limit: usize,
) -> Result<(reqwest::header::HeaderMap, Vec<u8>), FetchError> {
    let classify = |e: reqwest::Error| {
        if e.is_timeout() {
            FetchError::Timeout {
                url: url.to_string(),
                after: timeout,
            }
        } else if e.is_connect() {
            FetchError::Connect {
                url: url.to_string(),
                detail: error_chain(&e),
            }
        } else {
            FetchError::Body {
                url: url.to_string(),
                detail: error_chain(&e),
            }
        }
    };
    let mut resp = request.timeout(timeout).send().await.map_err(classify)?;
    let status = resp.status();
    let headers = resp.headers().clone();
    if resp.content_length().is_some_and(|l| l > limit as u64) {
        return Err(FetchError::TooLarge {
            url: url.to_string(),
            limit,
        });
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(classify)? {
        if body.len() + chunk.len() > limit {
            return Err(FetchError::TooLarge {
                url: url.to_string(),
                limit,
            });
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        let text: String = String::from_utf8_lossy(&body).chars().take(200).collect();
        let text = text.trim().to_string();
        return Err(if status.as_u16() == 401 || status.as_u16() == 403 {
            FetchError::Auth {
                url: url.to_string(),
                status: status.as_u16(),
                body: text,
            }
        } else {
            FetchError::Status {
                url: url.to_string(),
                status: status.as_u16(),
                body: text,
            }
        });
    }
    Ok((headers, body))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Builds the HTTP client every source uses (rustls with ring).
pub(crate) fn http_client(source_name: &str) -> Result<reqwest::Client, SourceError> {
    http_client_with_ca(source_name, None)
}

/// An HTTP client that also trusts the CA in `ca_file` (PEM), for registries behind a
/// private CA.
pub(crate) fn http_client_with_ca(
    source_name: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<reqwest::Client, SourceError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|error| SourceError::CaFile {
            source_name: source_name.to_string(),
            path: path.display().to_string(),
            error,
        })?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|error| SourceError::Client {
                source_name: source_name.to_string(),
                error,
            })?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|error| SourceError::Client {
        source_name: source_name.to_string(),
        error,
    })
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Retry delays after failures: the shared exponential backoff with full jitter
/// ([`causeway_api::backoff`]). Every failure of a source (HTTP error, unreadable body,
/// timeout) goes through one of these; a success resets it.
pub(crate) use causeway_api::backoff::Backoff;

impl SourceOptions {
    /// The backoff for this source's retries: from `error_backoff` up to `max_backoff`.
    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(self.error_backoff, self.max_backoff)
    }
}

/// Tracks a source's state and tells when it changed.
#[derive(Debug)]
pub(crate) struct StateTracker {
    pub(crate) state: SourceState,
}

impl StateTracker {
    pub(crate) fn new() -> Self {
        Self {
            state: SourceState::syncing(),
        }
    }

    /// Records a failure; true if the state or the error text changed.
    pub(crate) fn fail(&mut self, error: &str) -> bool {
        let since = self.state.stale_since_ms.unwrap_or_else(now_ms);
        let new = SourceState::stale(error, since);
        let changed = new != self.state;
        self.state = new;
        changed
    }

    /// Records success; true if it was not synced before.
    pub(crate) fn ok(&mut self) -> bool {
        let changed = self.state != SourceState::synced();
        self.state = SourceState::synced();
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_api::registry::{Endpoint, Provenance, ServiceKey, SourceSnapshot};

    #[test]
    fn backoff_bound_doubles_and_caps_and_each_delay_is_drawn_below_it() {
        let opts = SourceOptions {
            error_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            ..SourceOptions::default()
        };
        let mut b = opts.backoff();
        let mut bounds = Vec::new();
        for _ in 0..4 {
            let bound = b.current_bound();
            let d = b.next_delay();
            assert!(d <= bound, "{d:?} above its bound {bound:?}");
            bounds.push(bound.as_millis());
        }
        assert_eq!(bounds, vec![100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.current_bound().as_millis(), 100);
        // Jitter: many draws below one bound spread out over it (not all equal, not all
        // at the bound), and their mean is near half the bound.
        let opts = SourceOptions {
            error_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(1),
            ..SourceOptions::default()
        };
        let mut b = opts.backoff();
        let draws: Vec<f64> = (0..400).map(|_| b.next_delay().as_secs_f64()).collect();
        let mean = draws.iter().sum::<f64>() / 400.0;
        assert!((0.35..0.65).contains(&mean), "mean {mean}");
        assert!(draws.iter().any(|d| *d < 0.25) && draws.iter().any(|d| *d > 0.75));
    }

    #[test]
    fn a_consul_source_takes_its_own_timings() {
        let cfg = crate::config::ConsulSourceConfig {
            wait: Some(Duration::from_secs(2)),
            request_timeout: Some(Duration::from_secs(3)),
            retry_max: Some(Duration::from_secs(4)),
            ..Default::default()
        };
        let o = SourceOptions::default().for_consul(&cfg);
        assert_eq!(o.consul_wait, Duration::from_secs(2));
        assert_eq!(o.request_timeout, Duration::from_secs(3));
        assert_eq!(o.max_backoff, Duration::from_secs(4));
        assert_eq!(o.error_backoff, SourceOptions::default().error_backoff);
    }

    #[test]
    fn apply_update_keeps_data_of_a_stale_source_and_recovers() {
        let key = ServiceKey::new("default", "web");
        let mut snap = SourceSnapshot::default();
        let ep = Endpoint::new(
            "10.0.0.1",
            Provenance {
                source: "c".into(),
                kind: SourceKind::Consul,
                native_id: "n/1".into(),
                revision: "1".into(),
            },
        );
        snap.services
            .insert(key.clone(), [("n/1".to_string(), ep)].into());
        let mut reg = Registry::new();
        let up = |change, state| SourceUpdate {
            source: "c".into(),
            kind: SourceKind::Consul,
            change,
            state,
        };
        let d = apply_update(
            &mut reg,
            up(Some(SourceChange::Full(snap)), SourceState::synced()),
            1,
        );
        assert_eq!(d.len(), 1);
        let d = apply_update(&mut reg, up(None, SourceState::stale("HTTP 500", 5)), 6);
        assert_eq!(d.len(), 1);
        assert!(reg.merged()[&key][0].stale);
        let d = apply_update(&mut reg, up(None, SourceState::synced()), 7);
        assert_eq!(d.len(), 1);
        assert!(!reg.merged()[&key][0].stale);
        assert!(apply_update(&mut reg, up(None, SourceState::synced()), 8).is_empty());
    }

    #[test]
    fn state_tracker_reports_transitions_only() {
        let mut t = StateTracker::new();
        assert!(t.ok());
        assert!(!t.ok());
        assert!(t.fail("a"));
        let since = t.state.stale_since_ms;
        assert!(!t.fail("a"));
        assert!(t.fail("b"));
        assert_eq!(t.state.stale_since_ms, since);
        assert!(t.ok());
    }
}
