//! Config push sessions: one task per subscribed agent on its own QUIC stream.
//!
//! One update is in flight per agent. The next is computed when the agent answers, from
//! its acknowledged version to the current one, so a slow or stalled agent's changes
//! coalesce into one update and nothing else waits for it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use causeway_api::TrustDomain;
use causeway_api::push::{
    AgentFrame, Heartbeat, Hello, MAX_PUSH_FRAME, PushFrame, Registration, agent_frame, push_frame,
};
use causeway_api::wire::{self, ErrorCode, ErrorReply};
use causeway_api::{SpiffeId, hex};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;

use crate::mesh::{Mesh, NackView};
use crate::store::{AgentRecord, Store};

/// How often an idle subscription gets a heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(15);

pub(crate) use causeway_api::wire::{ReadFrameError, read_frame};

async fn send_frame(send: &mut quinn::SendStream, frame: &PushFrame) -> Result<(), String> {
    send.write_all(&wire::encode_frame(frame))
        .await
        .map_err(|e| e.to_string())
}

fn error_frame(code: ErrorCode, message: String) -> PushFrame {
    PushFrame {
        kind: Some(push_frame::Kind::Error(ErrorReply {
            code: code as i32,
            message,
        })),
    }
}

/// Who is subscribing, checked against the store.
fn authenticate(
    store: &dyn Store,
    td: &TrustDomain,
    peer: Option<&[CertificateDer<'static>]>,
) -> Result<AgentRecord, (ErrorCode, String)> {
    let leaf = peer.and_then(|p| p.first()).ok_or((
        ErrorCode::NotAuthenticated,
        "a subscription needs the agent's certificate (mutual TLS)".to_owned(),
    ))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|_| {
        (
            ErrorCode::NotAuthenticated,
            "unparseable client certificate".to_owned(),
        )
    })?;
    let serial = hex(cert.raw_serial());
    let internal = |e: crate::store::StoreError| (ErrorCode::Internal, e.to_string());
    let record = store.cert(&serial).map_err(internal)?.ok_or((
        ErrorCode::NotAuthenticated,
        format!("certificate serial {serial} was not issued by this controller; re-join with a new token"),
    ))?;
    let agent = store.agent(&record.agent_id).map_err(internal)?.ok_or((
        ErrorCode::NotAuthenticated,
        format!("certificate serial {serial} belongs to no known agent"),
    ))?;
    if agent.removed_at.is_some() {
        return Err((
            ErrorCode::AgentRemoved,
            format!(
                "agent {} was removed by an operator; it must re-join with a new token",
                agent.id
            ),
        ));
    }
    let id: SpiffeId = agent.spiffe_id.parse().map_err(|_| {
        (
            ErrorCode::NotAuthenticated,
            "agent identity unreadable".to_owned(),
        )
    })?;
    if id.trust_domain() != td {
        return Err((
            ErrorCode::NotAuthenticated,
            format!("identity {id} is outside trust domain {td}"),
        ));
    }
    Ok(agent)
}

/// Serves one subscription until the agent leaves, the stream fails, or the session
/// is replaced or the agent removed.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the parts of a QUIC stream and its context are clearer apart"
)]
pub(crate) async fn run_session(
    mesh: Arc<Mesh>,
    store: Arc<dyn Store>,
    td: TrustDomain,
    peer: Option<&[CertificateDer<'static>]>,
    hello: Hello,
    remote: SocketAddr,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let agent = match authenticate(store.as_ref(), &td, peer) {
        Ok(a) => a,
        Err((code, message)) => {
            tracing::warn!(%remote, %message, "subscription refused");
            let _ = send_frame(&mut send, &error_frame(code, message)).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            return;
        }
    };
    let group = store.group(&agent.group).ok().flatten().map(|g| g.group);
    // The address to register: the one the agent names, else its connection's.
    let address: Result<IpAddr, String> = if hello.address.is_empty() {
        Ok(remote.ip().to_canonical())
    } else {
        hello.address.parse().map_err(|_| hello.address.clone())
    };
    // Networks the controller vouches for (hosts behind NAT): the group's and the token's.
    let mut cidrs = group
        .as_ref()
        .map(|g| g.allowed_cidrs.clone())
        .unwrap_or_default();
    if let Ok(Some(token)) = store.token(&agent.token_id) {
        cidrs.extend(token.cidrs);
    }
    let started = mesh
        .session_start(
            &agent,
            group.as_ref(),
            address,
            remote.ip().to_canonical(),
            &cidrs,
            hello.last_version,
        )
        .await;
    let (handle, refusal) = match started {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(agent = %agent.id, error = %e, "cannot start a session");
            let _ = send_frame(&mut send, &error_frame(ErrorCode::Internal, e.to_string())).await;
            return;
        }
    };
    mesh.record_agent_version(&handle, hello.agent_version.clone());
    if !hello.metrics_endpoint.is_empty() {
        mesh.record_scrape_target(
            &handle,
            crate::sd::ScrapeTarget {
                endpoint: hello.metrics_endpoint.clone(),
                group: agent.group.clone(),
                namespace: group
                    .as_ref()
                    .map(|g| g.namespace.clone())
                    .unwrap_or_default(),
                labels: group.as_ref().map(|g| g.labels.clone()).unwrap_or_default(),
            },
        );
    }
    tracing::info!(agent = %agent.id, address = %hello.address, %remote, registered = refusal.is_none(), last_version = hello.last_version, generation = handle.generation, "agent subscribed");
    // Tell the agent whether its workload is registered (older agents ignore the frame).
    if group.as_ref().is_some_and(|g| g.service.is_some()) {
        let frame = PushFrame {
            kind: Some(push_frame::Kind::Registration(Registration {
                address: if hello.address.is_empty() {
                    remote.ip().to_canonical().to_string()
                } else {
                    hello.address.clone()
                },
                accepted: refusal.is_none(),
                error: refusal.unwrap_or_default(),
            })),
        };
        if let Err(e) = send_frame(&mut send, &frame).await {
            tracing::info!(agent = %agent.id, error = %e, "subscription write failed");
            let _ = mesh.session_end(&handle, false).await;
            return;
        }
    }

    let (tx, mut rx) = mpsc::channel::<Result<AgentFrame, String>>(8);
    let reader = tokio::spawn(async move {
        loop {
            let item = match read_frame(&mut recv, MAX_PUSH_FRAME).await {
                Ok(Some(body)) => wire::decode_body::<AgentFrame>(&body).map_err(|e| e.to_string()),
                Ok(None) => Err("stream closed".into()),
                Err(e) => Err(e.to_string()),
            };
            let end = item.is_err();
            if tx.send(item).await.is_err() || end {
                return;
            }
        }
    });

    let mut versions = mesh.watch();
    let mut acked = hello.last_version;
    let mut in_flight: Option<u64> = None;
    let mut nacked: Option<u64> = None;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.tick().await;
    let graceful = loop {
        if in_flight.is_none() {
            let current = *versions.borrow_and_update();
            if current != acked && nacked.is_none_or(|n| current > n) {
                let (version, frame) = mesh.update_frame_since(acked);
                if let Err(e) = send.write_all(&frame).await {
                    tracing::info!(agent = %agent.id, error = %e, "subscription write failed");
                    break false;
                }
                in_flight = Some(version);
                mesh.record_sent(&handle, version);
            }
        }
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Ok(AgentFrame { kind: Some(agent_frame::Kind::Ack(a)) })) => {
                    if in_flight == Some(a.version) {
                        in_flight = None;
                    }
                    acked = a.version;
                    nacked = None;
                    mesh.record_answer(&handle, acked, None);
                    crate::metrics::push_acked();
                }
                Some(Ok(AgentFrame { kind: Some(agent_frame::Kind::Nack(n)) })) => {
                    tracing::warn!(agent = %agent.id, version = n.version, stays_on = n.current_version, error = %n.error, "agent refused a config update");
                    in_flight = None;
                    acked = n.current_version;
                    nacked = Some(n.version);
                    mesh.record_answer(&handle, acked, Some(NackView { version: n.version, error: n.error, rejected: n.rejected }));
                }
                Some(Ok(AgentFrame { kind: Some(agent_frame::Kind::Goodbye(_)) })) => break true,
                Some(Ok(AgentFrame { kind: Some(agent_frame::Kind::Denials(d)) })) => {
                    mesh.record_denials(&handle, d.denials);
                }
                Some(Ok(AgentFrame { kind: Some(agent_frame::Kind::Traffic(t)) })) => {
                    mesh.record_traffic(&handle, t);
                }
                Some(Ok(AgentFrame { kind: Some(agent_frame::Kind::Facts(f)) })) => {
                    mesh.record_facts(&handle, f);
                }
                Some(Ok(AgentFrame { kind: None })) => {} // a newer agent's frame kind: ignored
                Some(Err(e)) => {
                    tracing::info!(agent = %agent.id, error = %e, "subscription ended");
                    if e.contains("malformed") || e.contains("larger than") {
                        let _ = send_frame(&mut send, &error_frame(ErrorCode::Malformed, e)).await;
                        let _ = send.finish();
                    }
                    break false;
                }
                None => break false,
            },
            _ = versions.changed() => {
                // Seen; the next loop turn sends if nothing is in flight.
                versions.borrow_and_update();
                if in_flight.is_none() {
                    continue;
                }
            }
            _ = heartbeat.tick() => {
                let frame = PushFrame { kind: Some(push_frame::Kind::Heartbeat(Heartbeat { version: mesh.version() })) };
                if send_frame(&mut send, &frame).await.is_err() {
                    break false;
                }
            }
            _ = handle.kick.notified() => {
                let _ = send_frame(&mut send, &error_frame(ErrorCode::AgentRemoved, "session ended by the controller: replaced by a newer session, or the agent was removed".into())).await;
                let _ = send.finish();
                break false;
            }
        }
    };
    reader.abort();
    if let Err(e) = mesh.session_end(&handle, graceful).await {
        tracing::error!(agent = %agent.id, error = %e, "cannot record the end of a session");
    }
    crate::metrics::push_acked();
}
