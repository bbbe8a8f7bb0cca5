//! The agent's config subscription: applies snapshots and deltas, ACKs or NACKs each,
//! and keeps the last applied state on disk (`config.json`) so a restart while the
//! controller is away starts from it (static stability).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use causeway_api::push::{
    Ack, AgentFacts, AgentFrame, ApplyError, ConfigUpdate, Goodbye, Hello, MAX_PUSH_FRAME,
    MeshState, Nack, PROTOCOL, PushFrame, ServiceRejection, agent_frame, push_frame,
};
use causeway_api::wire::{self, ClientRequest, ErrorCode, client_request};
use tokio::sync::{oneshot, watch};

use crate::client::ClientError;
use crate::identity::write_atomic;

/// Where the applied config is kept.
pub const CONFIG_FILE: &str = "config.json";

/// The applied config, on disk.
#[derive(Debug, Clone)]
pub struct ConfigCache {
    path: PathBuf,
    /// Tests: holds each write until released ([`WriteGate`]).
    #[cfg(test)]
    gate: Option<Arc<WriteGate>>,
}

/// Tests: makes the config cache's writes block until released, and counts them.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct WriteGate {
    state: std::sync::Mutex<(bool, u64, bool)>,
    changed: std::sync::Condvar,
}

#[cfg(test)]
impl WriteGate {
    /// A closed gate: writes wait for [`Self::open`] (at most 20 s, then they go on and
    /// [`Self::timed_out`] tells).
    pub(crate) fn closed() -> Arc<Self> {
        let g = Self::default();
        g.state.lock().unwrap().0 = true;
        Arc::new(g)
    }
    pub(crate) fn open(&self) {
        self.state.lock().unwrap().0 = false;
        self.changed.notify_all();
    }
    /// Writes that passed (or began waiting at) the gate.
    pub(crate) fn writes(&self) -> u64 {
        self.state.lock().unwrap().1
    }
    /// Whether a write gave up waiting: the gate was not opened by the test in time.
    pub(crate) fn timed_out(&self) -> bool {
        self.state.lock().unwrap().2
    }
    fn pass(&self) {
        let mut g = self.state.lock().unwrap();
        g.1 += 1;
        let (mut g, t) = self
            .changed
            .wait_timeout_while(g, std::time::Duration::from_secs(20), |s| s.0)
            .unwrap();
        if t.timed_out() {
            g.2 = true;
        }
    }
}

impl ConfigCache {
    /// The cache in `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(CONFIG_FILE),
            #[cfg(test)]
            gate: None,
        }
    }

    /// Tests: the same cache with its writes held at `gate`.
    #[cfg(test)]
    pub(crate) fn gated(mut self, gate: Arc<WriteGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Loads the last applied state; a missing file is an empty state, a corrupt one is
    /// reported and treated as empty (the controller then sends a full snapshot).
    pub fn load(&self) -> MeshState {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %self.path.display(), error = %e, "cached config is unreadable; starting empty until the controller sends a snapshot");
                MeshState::default()
            }),
            Err(_) => MeshState::default(),
        }
    }

    /// Starts the writer that keeps this cache at the latest state of `state`, off the
    /// data-plane thread ([`crate::writer`]): bursts of pushes are coalesced into one
    /// write (with its fsync) of the newest.
    pub fn spawn_writer(self, state: &SharedState) -> crate::writer::LatestWriter {
        crate::writer::LatestWriter::spawn(state.subscribe(), move |s: Arc<MeshState>| {
            if let Err(e) = self.save(&s) {
                tracing::warn!(error = %e, "cannot write the config cache; continuing from memory");
            }
        })
    }

    /// Writes the state atomically.
    pub fn save(&self, state: &MeshState) -> Result<(), crate::identity::IdentityError> {
        #[cfg(test)]
        if let Some(g) = &self.gate {
            g.pass();
        }
        let json = serde_json::to_vec(state).expect("serializable");
        write_atomic(&self.path, &json, 0o644)
    }
}

/// The applied config, published as one immutable snapshot per change (for the data
/// plane, DNS and the cache writer). Readers take the current snapshot
/// ([`Self::get`]) or follow the changes ([`Self::subscribe`]: `changed()` wakes them
/// at once; nothing polls). Publishing is a pointer swap: it never waits for a reader or
/// the disk.
#[derive(Debug, Clone)]
pub struct SharedState(Arc<watch::Sender<Arc<MeshState>>>);

impl Default for SharedState {
    fn default() -> Self {
        Self::new(MeshState::default())
    }
}

impl SharedState {
    /// A state starting at `state`.
    pub fn new(state: MeshState) -> Self {
        Self(Arc::new(watch::Sender::new(Arc::new(state))))
    }

    /// The current snapshot.
    pub fn get(&self) -> Arc<MeshState> {
        self.0.borrow().clone()
    }

    /// Follows the snapshots (the current one counts as seen).
    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshState>> {
        self.0.subscribe()
    }

    /// Publishes `state` as the current snapshot.
    pub fn publish(&self, state: MeshState) {
        self.0.send_replace(Arc::new(state));
    }

    /// Publishes a copy of the current snapshot changed by `f`.
    pub fn modify(&self, f: impl FnOnce(&mut MeshState)) {
        let mut next = (*self.get()).clone();
        f(&mut next);
        self.publish(next);
    }
}

/// What the subscription reports to the service loop.
#[derive(Debug, Clone)]
pub enum Event {
    /// A version was applied (`true`: it was a full snapshot).
    Applied(u64, bool),
    /// A version was refused.
    Refused(u64, String),
    /// The controller's current version (heartbeat).
    ControllerVersion(u64),
    /// The controller's answer to the workload address: `None` registered, `Some(why)`
    /// refused.
    Registration(Option<String>),
}

async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Vec<u8>>, String> {
    wire::read_frame(recv, MAX_PUSH_FRAME)
        .await
        .map_err(|e| e.to_string())
}

/// [`read_frame`] owning the stream, which it hands back with the frame.
async fn read_frame_owned(
    mut recv: quinn::RecvStream,
) -> (quinn::RecvStream, Result<Option<Vec<u8>>, String>) {
    let r = read_frame(&mut recv).await;
    (recv, r)
}

async fn write(send: &mut quinn::SendStream, frame: &AgentFrame) -> Result<(), String> {
    send.write_all(&wire::encode_frame(frame))
        .await
        .map_err(|e| e.to_string())
}

/// How an update went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied in full at this version.
    Applied(u64),
    /// Applied at this version except the services in `rejected` (they keep their last
    /// good copy); `summary` names each and why.
    Partial {
        /// The version now applied.
        version: u64,
        /// One line for logs, status and the NACK.
        summary: String,
        /// The refused services.
        rejected: Vec<ServiceRejection>,
    },
    /// Refused as a whole; the agent stays at `current` (a newer deny list in the
    /// update is applied all the same).
    Refused {
        /// The version the agent stays on.
        current: u64,
        /// Why.
        error: ApplyError,
    },
}

impl Outcome {
    /// The frame answering the update.
    pub fn answer(&self, update: &ConfigUpdate) -> agent_frame::Kind {
        match self {
            Outcome::Applied(v) => agent_frame::Kind::Ack(Ack { version: *v }),
            Outcome::Partial {
                version,
                summary,
                rejected,
            } => agent_frame::Kind::Nack(Nack {
                version: *version,
                error: summary.clone(),
                current_version: *version,
                rejected: rejected.clone(),
            }),
            Outcome::Refused { current, error } => agent_frame::Kind::Nack(Nack {
                version: update.version,
                error: error.to_string(),
                current_version: *current,
                rejected: Vec::new(),
            }),
        }
    }
}

/// Applies one update to the shared state, which publishes it (the cache writer
/// persists it, see [`ConfigCache::spawn_writer`]). The state never loses its last good
/// config: a refused service keeps its previous copy, a refused update changes nothing
/// but a newer deny list.
pub fn apply(state: &SharedState, update: &ConfigUpdate) -> Outcome {
    let current = state.get();
    match current.apply(update) {
        Ok(applied) => {
            let summary = applied.rejection_summary();
            let v = applied.state.version;
            state.publish(applied.state);
            match summary {
                None => Outcome::Applied(v),
                Some(summary) => Outcome::Partial {
                    version: v,
                    summary,
                    rejected: applied.rejected,
                },
            }
        }
        Err(error) => {
            if let Some(next) = current.apply_deny_only(update) {
                tracing::info!(
                    version = update.version,
                    "update refused, but its deny list is applied"
                );
                state.publish(next);
            }
            Outcome::Refused {
                current: current.version,
                error,
            }
        }
    }
}

/// What this agent reports of its data plane: the `causeway-agent doctor` checks of its
/// capture rules (when it installed any) and of its DNS capture (when it captures DNS).
pub fn collect_facts(state_dir: &Path) -> AgentFacts {
    let mut f = AgentFacts {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        ..AgentFacts::default()
    };
    if let Ok(text) = std::fs::read_to_string(state_dir.join(crate::dataplane::RULES_FILE)) {
        f.capture_enabled = true;
        let expected: Vec<String> = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        match crate::dataplane::capture::save() {
            Ok(save) => {
                let live = crate::dataplane::capture::LiveRules::parse(&save).lines();
                let drift = crate::dataplane::capture::Drift::between(&expected, &live);
                f.capture_problems
                    .extend(drift.missing.iter().map(|l| format!("missing: {l}")));
                f.capture_problems
                    .extend(drift.unexpected.iter().map(|l| format!("unexpected: {l}")));
            }
            Err(e) => f
                .capture_problems
                .push(format!("cannot read the live rules: {e}")),
        }
    }
    let dns: Option<crate::dns::DnsStatus> =
        std::fs::read_to_string(state_dir.join(crate::dns::STATUS_FILE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
    if let Some(d) = dns.filter(|d| d.capture_wanted || d.capture) {
        f.dns_enabled = true;
        if d.capture {
            f.dns_problems = crate::dns::doctor(state_dir, true).problems;
        } else {
            f.dns_problems.push(format!(
                "DNS capture is configured but not installed: {}",
                d.capture_error.as_deref().unwrap_or("unknown reason")
            ));
        }
    }
    f
}

/// Runs a subscription on `conn` until it ends. `goodbye` asks for a graceful end
/// (the controller deregisters the workload at once). `state_dir`, when given, is where
/// the agent's data-plane facts are checked for `causewayctl analyze`. `metrics_endpoint`
/// is where a remote Prometheus may scrape this agent (`[telemetry] metrics_listen`),
/// told to the controller for its service discovery.
pub async fn subscribe(
    conn: &quinn::Connection,
    state: SharedState,
    address: Option<IpAddr>,
    metrics_endpoint: Option<std::net::SocketAddr>,
    state_dir: Option<PathBuf>,
    goodbye: oneshot::Receiver<()>,
    mut events: impl FnMut(Event),
) -> Result<(), ClientError> {
    let addr = conn.remote_address().to_string();
    let proto = |message: String| ClientError::Protocol {
        addr: addr.clone(),
        message,
    };
    let (mut send, recv) = conn.open_bi().await.map_err(|e| proto(e.to_string()))?;
    let last_version = state.get().version;
    let hello = ClientRequest {
        kind: Some(client_request::Kind::Subscribe(Hello {
            last_version,
            address: address.map(|a| a.to_string()).unwrap_or_default(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL,
            metrics_endpoint: metrics_endpoint.map(|a| a.to_string()).unwrap_or_default(),
        })),
    };
    send.write_all(&wire::encode_frame(&hello))
        .await
        .map_err(|e| proto(e.to_string()))?;
    tokio::pin!(goodbye);
    let mut facts_sent: Option<AgentFacts> = None;
    let mut ticks: u64 = 0;
    // Refusals by policy go to the controller (for `causewayctl why`) at most every 2 s.
    let mut report = tokio::time::interval(std::time::Duration::from_secs(2));
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The read in progress survives the other branches (a read cut in the middle of a
    // frame would lose its bytes): it owns the stream and hands it back with the frame.
    let mut reading = Box::pin(read_frame_owned(recv));
    enum Woke {
        Read(Result<Option<Vec<u8>>, String>),
        Report,
        Goodbye,
    }
    loop {
        let woke = tokio::select! {
            (stream, r) = &mut reading => {
                reading.set(read_frame_owned(stream));
                Woke::Read(r)
            }
            _ = report.tick() => Woke::Report,
            _ = &mut goodbye => Woke::Goodbye,
        };
        let body = match woke {
            Woke::Report => {
                let denials = crate::dataplane::authz::decisions().take_unreported();
                if !denials.is_empty() {
                    tracing::info!(
                        refusals = denials.len(),
                        "reporting policy refusals to the controller"
                    );
                    let frame = AgentFrame {
                        kind: Some(agent_frame::Kind::Denials(
                            causeway_api::push::DenialReport { denials },
                        )),
                    };
                    write(&mut send, &frame).await.map_err(proto)?;
                }
                // Per-edge traffic summaries (the UI's traffic page), every 4 s when
                // there was traffic.
                ticks += 1;
                if ticks.is_multiple_of(2)
                    && let Some(traffic) = crate::telemetry::edges::take_report()
                {
                    let frame = AgentFrame {
                        kind: Some(agent_frame::Kind::Traffic(traffic)),
                    };
                    write(&mut send, &frame).await.map_err(proto)?;
                }
                // Data-plane facts (for `causewayctl analyze`): checked every 10 s, sent
                // once per session and then when they change.
                if let Some(dir) = state_dir.clone().filter(|_| ticks % 5 == 1) {
                    let facts = tokio::task::spawn_blocking(move || collect_facts(&dir))
                        .await
                        .ok();
                    if let Some(facts) = facts.filter(|f| facts_sent.as_ref() != Some(f)) {
                        let frame = AgentFrame {
                            kind: Some(agent_frame::Kind::Facts(facts.clone())),
                        };
                        write(&mut send, &frame).await.map_err(proto)?;
                        facts_sent = Some(facts);
                    }
                }
                continue;
            }
            Woke::Goodbye => {
                let _ = write(
                    &mut send,
                    &AgentFrame {
                        kind: Some(agent_frame::Kind::Goodbye(Goodbye {})),
                    },
                )
                .await;
                let _ = send.finish();
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(2), send.stopped()).await;
                return Ok(());
            }
            Woke::Read(r) => r.map_err(|e| match conn.close_reason() {
                Some(reason) => proto(crate::client::explain(&reason)),
                None => proto(e),
            })?,
        };
        let Some(body) = body else {
            return Err(proto("the controller ended the subscription".into()));
        };
        let frame: PushFrame = wire::decode_body(&body).map_err(|e| proto(e.to_string()))?;
        match frame.kind {
            Some(push_frame::Kind::Update(update)) => {
                let outcome = apply(&state, &update);
                match &outcome {
                    Outcome::Applied(v) => {
                        tracing::info!(
                            version = v,
                            full = update.full,
                            services = update.services.len(),
                            removed = update.removed.len(),
                            "config applied"
                        );
                        events(Event::Applied(*v, update.full));
                    }
                    Outcome::Partial {
                        version, summary, ..
                    } => {
                        tracing::warn!(version, error = %summary, "config applied except refused services; they keep their last good config");
                        events(Event::Applied(*version, update.full));
                        events(Event::Refused(*version, summary.clone()));
                    }
                    Outcome::Refused { current, error } => {
                        tracing::warn!(version = update.version, stays_on = current, %error, "config update refused; keeping the last good config");
                        events(Event::Refused(update.version, error.to_string()));
                    }
                }
                write(
                    &mut send,
                    &AgentFrame {
                        kind: Some(outcome.answer(&update)),
                    },
                )
                .await
                .map_err(proto)?;
            }
            Some(push_frame::Kind::Registration(r)) => {
                if r.accepted {
                    tracing::info!(address = %r.address, "workload registered");
                    events(Event::Registration(None));
                } else {
                    tracing::error!(address = %r.address, error = %r.error, "the controller refused this workload's address; it is not registered in the mesh (this agent still receives config)");
                    events(Event::Registration(Some(r.error)));
                }
            }
            Some(push_frame::Kind::Heartbeat(h)) => events(Event::ControllerVersion(h.version)),
            Some(push_frame::Kind::Error(e)) => {
                return Err(ClientError::Refused {
                    code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
                    message: e.message,
                });
            }
            None => {} // a newer controller's frame kind: ignored
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_api::push::{EndpointMsg, ServiceMsg};

    fn svc(name: &str, vip: &str, addr: &str) -> ServiceMsg {
        ServiceMsg {
            namespace: "ext".into(),
            name: name.into(),
            vip: vip.into(),
            endpoints: vec![EndpointMsg {
                id: format!("f/{name}"),
                address: addr.into(),
                ports: [("http".to_owned(), 80u32)].into(),
                healthy: true,
                ..EndpointMsg::default()
            }],
            ..ServiceMsg::default()
        }
    }

    #[tokio::test]
    async fn one_bad_service_is_reported_and_the_rest_applied_and_cached() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ConfigCache::new(dir.path());
        let state = SharedState::default();
        let writer = cache.clone().spawn_writer(&state);
        let first = ConfigUpdate {
            version: 1,
            full: true,
            vip_cidr: "240.240.0.0/16".into(),
            services: vec![svc("web", "240.240.0.1", "10.0.0.1")],
            ..ConfigUpdate::default()
        };
        assert_eq!(apply(&state, &first), Outcome::Applied(1));
        let update = ConfigUpdate {
            version: 2,
            base_version: 1,
            services: vec![
                svc("web", "240.240.0.1", "240.240.0.77"),
                svc("ledger", "240.240.0.2", "10.0.0.2"),
            ],
            ..ConfigUpdate::default()
        };
        let outcome = apply(&state, &update);
        let Outcome::Partial {
            version, summary, ..
        } = &outcome
        else {
            panic!("expected a partial apply, got {outcome:?}")
        };
        assert_eq!(*version, 2);
        assert!(
            summary.contains("ext/web") && summary.contains("240.240.0.77"),
            "{summary}"
        );
        let agent_frame::Kind::Nack(nack) = outcome.answer(&update) else {
            panic!("a partial apply is answered with a NACK naming the services")
        };
        assert_eq!((nack.version, nack.current_version), (2, 2));
        assert_eq!(nack.rejected.len(), 1);
        assert_eq!(nack.rejected[0].name, "web");
        let held = (*state.get()).clone();
        writer.flush().await;
        assert_eq!(
            held.services["ext/web"].endpoints["f/web"].address,
            "10.0.0.1"
        );
        assert!(held.services.contains_key("ext/ledger"));
        assert_eq!(cache.load(), held, "the cache holds what is applied");

        // Refused as a whole (wrong base), yet its newer deny list is applied.
        let refused = ConfigUpdate {
            version: 9,
            base_version: 7,
            deny_set: true,
            deny_serials: vec!["0a0b".into()],
            ..ConfigUpdate::default()
        };
        let outcome = apply(&state, &refused);
        assert!(
            matches!(outcome, Outcome::Refused { current: 2, .. }),
            "{outcome:?}"
        );
        let held = (*state.get()).clone();
        writer.flush().await;
        assert_eq!(held.version, 2);
        assert!(held.deny_serials.contains("0a0b"));
        assert_eq!(cache.load(), held);
    }
}
