//! Authorization of inbound streams and the follow-up of state changes: the deny list
//! and the AuthorizationPolicies of this host's workload, rebuilt when a published
//! snapshot changes them; open streams are cut when a change refuses them.

use super::*;

/// Completes once `peer`'s serial is in the deny set `deny` follows, logging that the
/// connection is closed.
pub(super) async fn until_denied(
    mut deny: tokio::sync::watch::Receiver<Arc<std::collections::BTreeSet<String>>>,
    peer: Arc<tls::PeerFacts>,
) {
    loop {
        if deny.borrow_and_update().contains(&peer.serial) {
            tracing::info!(peer_identity = %peer.spiffe_id, serial = %peer.serial, "tunnel connection closed: the peer's certificate is on the deny list");
            return;
        }
        if deny.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// QUIC application close code of a connection closed because the peer's certificate
/// was denied (1: no client certificate, 2: certificate refused at the handshake).
pub(super) const DENIED_CODE: u32 = 3;

/// Publishes changes of the deny list to open streams ([`Tunnel::cut_when_denied`]) and
/// connections, and closes pooled connections to denied peers; rebuilds the
/// authorization view when the policies or this workload's labels change (open inbound
/// streams are decided again, [`Tunnel::cut_when_refused`]). Woken by each published
/// snapshot (no timer), until the tunnel or the state is gone.
pub(super) async fn follow_state(
    tunnel: std::sync::Weak<Tunnel>,
    mut changes: tokio::sync::watch::Receiver<Arc<MeshState>>,
) {
    while changes.changed().await.is_ok() {
        let state = changes.borrow_and_update().clone();
        let Some(t) = tunnel.upgrade() else { return };
        let changed =
            (**t.deny.borrow() != state.deny_serials).then(|| Arc::new(state.deny_serials.clone()));
        let authz = {
            let (spiffe, group) = {
                let id = t.identity.read().unwrap_or_else(|p| p.into_inner());
                (id.spiffe_id.to_string(), id.info.group.clone())
            };
            (!t.authz.borrow().is_current(&state, &spiffe, &group)).then(|| {
                Arc::new(crate::dataplane::authz::LocalAuthz::build(
                    &state, &spiffe, &group,
                ))
            })
        };
        if let Some(authz) = authz {
            tracing::info!(
                policies = authz.selected(),
                "authorization policies for this workload changed"
            );
            t.authz.send_replace(authz);
        }
        if let Some(deny) = changed {
            // Streams and accepted connections first (they wait on the channel), then
            // the pooled QUIC connections, which need the pool's lock.
            t.deny.send_replace(deny.clone());
            t.close_denied(&deny);
        }
    }
}

impl Tunnel {
    /// Follows the authorization view of this host's workload as the tunnel rebuilds it
    /// (also for inbound plaintext, [`crate::dataplane::plaintext`]).
    pub(crate) fn policy_changes(
        &self,
    ) -> tokio::sync::watch::Receiver<Arc<crate::dataplane::authz::LocalAuthz>> {
        self.authz.subscribe()
    }

    /// Follows the deny list open streams and connections are cut by.
    #[cfg(test)]
    pub(crate) fn deny_changes(
        &self,
    ) -> tokio::sync::watch::Receiver<Arc<std::collections::BTreeSet<String>>> {
        self.deny.subscribe()
    }

    /// Completes once `peer`'s certificate is on the deny list (at once if it is already):
    /// a proxied connection through it is then cut ([`splice_until`]). Denying a serial is
    /// what removing an agent does, so a removed agent's open connections end as soon as
    /// the deny list is published, both ways: this agent cuts the streams it accepted from the peer and
    /// the ones it opened to it.
    pub fn cut_when_denied(
        &self,
        peer: Arc<tls::PeerFacts>,
    ) -> impl std::future::Future<Output = ()> + Send + use<> {
        // Not `until_denied`: every proxied connection's task holds this future, and
        // this form is 24 bytes smaller (the size test in `outbound.rs`).
        let mut deny = self.deny.subscribe();
        async move {
            loop {
                if deny.borrow_and_update().contains(&peer.serial) {
                    tracing::info!(peer_identity = %peer.spiffe_id, serial = %peer.serial, "open tunnel stream cut: the peer's certificate is on the deny list");
                    return;
                }
                if deny.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    /// Completes, after logging that the connection is closed, once `peer`'s certificate
    /// is on the deny list (at once if it is already).
    pub(super) fn connection_denied(
        &self,
        peer: Arc<tls::PeerFacts>,
    ) -> impl std::future::Future<Output = ()> + Send + use<> {
        until_denied(self.deny.subscribe(), peer)
    }

    /// Completes when an accepted stream must be cut: its peer's certificate was denied,
    /// or a policy change denies it now (decided again on every change of the policies
    /// or of this workload's labels; connections still allowed are untouched).
    pub(super) fn cut_when_refused(
        &self,
        peer: Arc<tls::PeerFacts>,
        source: std::net::IpAddr,
        destination: std::net::IpAddr,
        port: u16,
    ) -> impl std::future::Future<Output = ()> + Send + use<> {
        let mut deny = self.deny.subscribe();
        let mut authz = self.authz.subscribe();
        authz.mark_unchanged();
        async move {
            loop {
                if deny.borrow_and_update().contains(&peer.serial) {
                    tracing::info!(peer_identity = %peer.spiffe_id, serial = %peer.serial, "open tunnel stream cut: the peer's certificate is on the deny list");
                    return;
                }
                tokio::select! {
                    r = deny.changed() => {
                        if r.is_err() {
                            return std::future::pending().await;
                        }
                    }
                    r = authz.changed() => {
                        if r.is_err() {
                            return std::future::pending().await;
                        }
                        let view = authz.borrow_and_update().clone();
                        let d = view.decide(Some(&peer.spiffe_id), source, destination, port);
                        if !d.allow {
                            tracing::warn!(peer = %source, peer_identity = %peer.spiffe_id, port, policy = d.policy_label(), "open tunnel stream cut: a policy change denies it");
                            return;
                        }
                    }
                }
            }
        }
    }
}

impl Tunnel {
    /// Decides whether `peer` (connected from `remote`) may open a stream to `header`'s
    /// port: only the ports this host's own workload registered are reachable through the
    /// tunnel (never arbitrary loopback services: admin APIs, databases bound to lo); the
    /// connection may be older than the deny list, and a peer denied since opens no new
    /// stream on it (expiry is the client's to act on: it redials after renewing; refusing
    /// here would break agents of older versions, which keep their pooled connection
    /// across a renewal); the AuthorizationPolicies that select this host's workload
    /// decide the rest (when `decide_policies`; on HTTP ports they decide each request).
    /// Gives this workload's address and the policy decision, or the code the stream is
    /// reset with (the refusal is logged).
    pub(super) fn authorize(
        &self,
        peer: &tls::PeerFacts,
        remote: SocketAddr,
        header: &Header,
        decide_policies: bool,
    ) -> Result<
        (
            std::net::IpAddr,
            Option<crate::dataplane::authz::AuthzDecision>,
        ),
        u32,
    > {
        if self.state.get().deny_serials.contains(&peer.serial) {
            tracing::warn!(serial = %peer.serial, "tunnel stream refused: the peer's certificate is on the deny list");
            return Err(1);
        }
        let (served, own) = self.own_workload();
        if !served.contains(&header.port) {
            tracing::warn!(served = ?served, "tunnel stream refused: not a port of this host's workload");
            return Err(3);
        }
        if !decide_policies {
            return Ok((own, None));
        }
        let decision =
            self.authz
                .borrow()
                .decide(Some(&peer.spiffe_id), remote.ip(), own, header.port);
        if !decision.allow {
            tracing::warn!(
                policy = decision.policy_label(),
                "tunnel stream denied by policy"
            );
            return Err(3);
        }
        Ok((own, Some(decision)))
    }
}
