//! The agent's config subscription: applies snapshots and deltas, ACKs or NACKs each,
//! and keeps the last applied state on disk (`config.json`) so a restart while the
//! controller is away starts from it (static stability).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use causeway_api::push::{
    Ack, AgentFrame, ApplyError, ConfigUpdate, Goodbye, Hello, MAX_PUSH_FRAME, MeshState, Nack,
    PROTOCOL, PushFrame, agent_frame, push_frame,
};
use causeway_api::wire::{self, ClientRequest, ErrorCode, client_request};
use tokio::sync::oneshot;

use crate::client::ClientError;
use crate::identity::write_atomic;

/// Where the applied config is kept.
pub const CONFIG_FILE: &str = "config.json";

/// The applied config, on disk.
#[derive(Debug, Clone)]
pub struct ConfigCache {
    path: PathBuf,
}

impl ConfigCache {
    /// The cache in `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(CONFIG_FILE),
        }
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

    /// Writes the state atomically.
    pub fn save(&self, state: &MeshState) -> Result<(), crate::identity::IdentityError> {
        let json = serde_json::to_vec(state).expect("serializable");
        write_atomic(&self.path, &json, 0o644)
    }
}

/// Shared view of the applied config (for DNS and the proxy).
pub type SharedState = Arc<RwLock<MeshState>>;

/// What the subscription reports to the service loop.
#[derive(Debug, Clone)]
pub enum Event {
    /// A version was applied (`true`: it was a full snapshot).
    Applied(u64, bool),
    /// A version was refused.
    Refused(u64, String),
    /// The controller's current version (heartbeat).
    ControllerVersion(u64),
}

async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Vec<u8>>, String> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let len = wire::frame_len(prefix, MAX_PUSH_FRAME).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Some(body))
}

async fn write(send: &mut quinn::SendStream, frame: &AgentFrame) -> Result<(), String> {
    send.write_all(&wire::encode_frame(frame))
        .await
        .map_err(|e| e.to_string())
}

/// Applies one update to the shared state and the cache; the answer to send.
pub fn apply(
    state: &SharedState,
    cache: &ConfigCache,
    update: &ConfigUpdate,
) -> Result<u64, (u64, ApplyError)> {
    let current = state.read().unwrap_or_else(|p| p.into_inner()).clone();
    match current.apply(update) {
        Ok(next) => {
            if let Err(e) = cache.save(&next) {
                tracing::warn!(error = %e, "cannot write the config cache; continuing from memory");
            }
            let v = next.version;
            *state.write().unwrap_or_else(|p| p.into_inner()) = next;
            Ok(v)
        }
        Err(e) => Err((current.version, e)),
    }
}

/// Runs a subscription on `conn` until it ends. `goodbye` asks for a graceful end
/// (the controller deregisters the workload at once).
pub async fn subscribe(
    conn: &quinn::Connection,
    state: SharedState,
    cache: ConfigCache,
    address: Option<IpAddr>,
    goodbye: oneshot::Receiver<()>,
    mut events: impl FnMut(Event),
) -> Result<(), ClientError> {
    let addr = conn.remote_address().to_string();
    let proto = |message: String| ClientError::Protocol {
        addr: addr.clone(),
        message,
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| proto(e.to_string()))?;
    let last_version = state.read().unwrap_or_else(|p| p.into_inner()).version;
    let hello = ClientRequest {
        kind: Some(client_request::Kind::Subscribe(Hello {
            last_version,
            address: address.map(|a| a.to_string()).unwrap_or_default(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL,
        })),
    };
    send.write_all(&wire::encode_frame(&hello))
        .await
        .map_err(|e| proto(e.to_string()))?;
    tokio::pin!(goodbye);
    loop {
        let body = tokio::select! {
            r = read_frame(&mut recv) => r.map_err(|e| match conn.close_reason() {
                Some(reason) => proto(crate::client::explain(&reason)),
                None => proto(e),
            })?,
            _ = &mut goodbye => {
                let _ = write(&mut send, &AgentFrame { kind: Some(agent_frame::Kind::Goodbye(Goodbye {})) }).await;
                let _ = send.finish();
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), send.stopped()).await;
                return Ok(());
            }
        };
        let Some(body) = body else {
            return Err(proto("the controller ended the subscription".into()));
        };
        let frame: PushFrame = wire::decode_body(&body).map_err(|e| proto(e.to_string()))?;
        match frame.kind {
            Some(push_frame::Kind::Update(update)) => {
                let answer = match apply(&state, &cache, &update) {
                    Ok(v) => {
                        tracing::info!(
                            version = v,
                            full = update.full,
                            services = update.services.len(),
                            removed = update.removed.len(),
                            "config applied"
                        );
                        events(Event::Applied(v, update.full));
                        agent_frame::Kind::Ack(Ack { version: v })
                    }
                    Err((current, e)) => {
                        tracing::warn!(version = update.version, stays_on = current, error = %e, "config update refused; keeping the last good config");
                        events(Event::Refused(update.version, e.to_string()));
                        agent_frame::Kind::Nack(Nack {
                            version: update.version,
                            error: e.to_string(),
                            current_version: current,
                        })
                    }
                };
                write(&mut send, &AgentFrame { kind: Some(answer) })
                    .await
                    .map_err(proto)?;
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
