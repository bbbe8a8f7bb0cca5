//! Join and renewal: the policy between a request and a signed certificate.
//!
//! Join: token id + secret (hash compared) → not expired → uses left → source address
//! inside the token's and the group's networks → CSR verified → certificate for the
//! group's SPIFFE ID → token spent, agent and certificate recorded (one transaction per batch of
//! concurrent joins) → flushed (group commit) → answered. A reply is only ever sent for durable state.
//!
//! Renewal: the caller's client certificate (verified by TLS against the trust bundle)
//! must be one this controller issued, to an agent that was not removed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use causeway_api::wire::{ErrorCode, Issued, JoinRequest, RenewRequest};
use causeway_api::{SpiffeId, hex};
use ipnet::IpNet;
use ring::rand::SecureRandom as _;
use rustls::pki_types::CertificateDer;

use crate::ca::{Ca, CaError};
use crate::csr::{CsrError, parse_csr};
use crate::durability::Committer;
use crate::store::{AgentRecord, CertRecord, Enrollment, Store, StoreError};

/// Longest time before "now" that a new certificate is already valid (clock skew).
const MAX_BACKDATE_SECS: i64 = 300;

/// Why a join or renewal was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// Unknown token id or wrong secret (not told apart, on purpose).
    #[error(
        "join token is not valid: unknown token or wrong secret; create a new one with `causewayctl token create`"
    )]
    TokenInvalid,
    /// The token expired.
    #[error(
        "join token {id} expired at {expired_at} (Unix time); create a new one with `causewayctl token create`"
    )]
    TokenExpired {
        /// Token id.
        id: String,
        /// Unix seconds.
        expired_at: i64,
    },
    /// No uses left.
    #[error(
        "join token {0} has already been used; create a new one, or pass --uses N for a reusable token"
    )]
    TokenSpent(String),
    /// Caller outside the allowed networks.
    #[error("join from {address} refused: the {what} allows only {allowed}")]
    SourceNotAllowed {
        /// The caller's address.
        address: IpAddr,
        /// "token" or "group G".
        what: String,
        /// The allowed networks.
        allowed: String,
    },
    /// The group is gone.
    #[error("workload group {0:?} does not exist (deleted after the token was created?)")]
    GroupMissing(String),
    /// An operator revoked the token.
    #[error(
        "join token {id} was revoked by an operator at {revoked_at} (Unix time); ask for a new one (`causewayctl token create`)"
    )]
    TokenRevoked {
        /// Token id.
        id: String,
        /// Unix seconds.
        revoked_at: i64,
    },
    /// The token's group was deleted; a group of the same name now is another group.
    #[error(
        "join token {id} was made for an earlier group named {group:?}, which was deleted; the group of that name now is a different group and this token cannot join it: create a new token with `causewayctl token create --group {group}`"
    )]
    TokenOrphaned {
        /// Token id.
        id: String,
        /// The group name.
        group: String,
    },
    /// The agent holds too many unexpired certificates.
    #[error("{0}")]
    TooManyCerts(StoreError),
    /// The CSR was refused.
    #[error("CSR refused: {0}")]
    Csr(#[from] CsrError),
    /// No client certificate on a renewal.
    #[error("renewal needs the agent's current certificate (mutual TLS); none was presented")]
    NotAuthenticated,
    /// The client certificate is not one we issued.
    #[error("certificate serial {0} was not issued by this controller; re-join with a new token")]
    UnknownCertificate(String),
    /// The agent was removed.
    #[error("agent {0} was removed by an operator; it must re-join with a new token")]
    AgentRemoved(String),
    /// The store failed.
    #[error("store error: {0}")]
    Store(StoreError),
    /// Signing failed.
    #[error("CA error: {0}")]
    Ca(#[from] CaError),
}

impl From<StoreError> for EnrollError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TokenSpent(id) => Self::TokenSpent(id),
            StoreError::AgentRemoved(id) => Self::AgentRemoved(id),
            StoreError::TokenRevoked { id, revoked_at } => Self::TokenRevoked { id, revoked_at },
            e @ StoreError::TooManyCerts { .. } => Self::TooManyCerts(e),
            other => Self::Store(other),
        }
    }
}

impl EnrollError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            // Revoked and orphaned tokens are told only after the secret matched.
            Self::TokenInvalid | Self::TokenRevoked { .. } | Self::TokenOrphaned { .. } => {
                ErrorCode::TokenInvalid
            }
            Self::TooManyCerts(_) => ErrorCode::Internal,
            Self::TokenExpired { .. } => ErrorCode::TokenExpired,
            Self::TokenSpent(_) => ErrorCode::TokenSpent,
            Self::SourceNotAllowed { .. } => ErrorCode::SourceNotAllowed,
            Self::GroupMissing(_) => ErrorCode::GroupMissing,
            Self::Csr(_) => ErrorCode::CsrInvalid,
            Self::NotAuthenticated | Self::UnknownCertificate(_) => ErrorCode::NotAuthenticated,
            Self::AgentRemoved(_) => ErrorCode::AgentRemoved,
            Self::Store(_) | Self::Ca(_) => ErrorCode::Internal,
        }
    }
}

/// Current Unix time in seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// SHA-256 as hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// Random bytes as hex.
pub fn random_hex(len: usize) -> String {
    let mut b = vec![0u8; len];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system RNG works");
    hex(&b)
}

/// A new agent id: `a-` then 16 hex digits that increase in join order (so the store
/// appends) and 8 random ones (so ids stay unique across restarts and clock steps).
pub fn new_agent_id() -> String {
    format!("a-{:016x}{}", crate::ca::time_ordered(), random_hex(4))
}

fn join_nets(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A new group id: `g-` then 16 hex digits from the clock and 8 random ones, never
/// reused (a group deleted and created again gets another).
pub fn new_group_id() -> String {
    format!("g-{:016x}{}", crate::ca::time_ordered(), random_hex(4))
}

/// Issues certificates for joins and renewals.
pub struct Enroller {
    store: Arc<dyn Store>,
    ca: Arc<Ca>,
    commit: Committer,
    cert_ttl: Duration,
}

impl Enroller {
    /// A new enroller; starts the group-commit task (needs a Tokio runtime).
    pub fn new(store: Arc<dyn Store>, ca: Arc<Ca>, cert_ttl: Duration) -> Self {
        Self {
            commit: Committer::start(store.clone()),
            store,
            ca,
            cert_ttl,
        }
    }

    /// The CA.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    fn issued(&self, agent: &AgentRecord, der: Vec<u8>) -> Issued {
        let mut chain = vec![der];
        chain.extend(self.ca.chain_der().iter().cloned());
        Issued {
            agent_id: agent.id.clone(),
            spiffe_id: agent.spiffe_id.clone(),
            cert_chain_der: chain,
            trust_bundle_der: self.ca.bundle_der().to_vec(),
            not_after_unix: agent.not_after,
            group: agent.group.clone(),
        }
    }

    fn ttl_secs(&self) -> i64 {
        i64::try_from(self.cert_ttl.as_secs()).unwrap_or(i64::MAX / 4)
    }

    /// How far back `not_before` goes: covers clock skew without eating much of a
    /// short lifetime (at most 5 minutes, at most 1/20 of the lifetime).
    fn backdate(&self) -> i64 {
        (self.ttl_secs() / 20).min(MAX_BACKDATE_SECS)
    }

    /// Enrolls a new agent with a join token.
    pub async fn join(&self, req: &JoinRequest, source: IpAddr) -> Result<Issued, EnrollError> {
        let now = now_unix();
        let token = self
            .store
            .token(&req.token_id)?
            .ok_or(EnrollError::TokenInvalid)?;
        if sha256_hex(&req.secret) != token.secret_sha256 {
            return Err(EnrollError::TokenInvalid);
        }
        if now >= token.expires_at {
            return Err(EnrollError::TokenExpired {
                id: token.id,
                expired_at: token.expires_at,
            });
        }
        if let Some(revoked_at) = token.revoked_at {
            return Err(EnrollError::TokenRevoked {
                id: token.id,
                revoked_at,
            });
        }
        if token.uses_left == 0 {
            return Err(EnrollError::TokenSpent(token.id));
        }
        if !token.cidrs.is_empty() && !token.cidrs.iter().any(|n| n.contains(&source)) {
            return Err(EnrollError::SourceNotAllowed {
                address: source,
                what: "token".into(),
                allowed: join_nets(&token.cidrs),
            });
        }
        let orphaned = || EnrollError::TokenOrphaned {
            id: token.id.clone(),
            group: token.group.clone(),
        };
        let group = self
            .store
            .group(&token.group)?
            .ok_or_else(|| EnrollError::GroupMissing(token.group.clone()))?;
        if token.group_id.is_empty() || group.id != token.group_id {
            return Err(orphaned());
        }
        let group = group.group;
        if !group.allows_source(source) {
            return Err(EnrollError::SourceNotAllowed {
                address: source,
                what: format!("group {}", group.name),
                allowed: join_nets(&group.allowed_cidrs),
            });
        }
        let key = parse_csr(&req.csr_der)?;
        if !key.requested_names.is_empty() {
            tracing::info!(names = ?key.requested_names, "CSR asked for names; ignored, the group sets the identity");
        }
        let id = group
            .spiffe_id(self.ca.trust_domain())
            .map_err(|e| EnrollError::GroupMissing(format!("{} ({e})", group.name)))?;
        let not_after = now + self.ttl_secs();
        let (der, serial) = self
            .ca
            .issue_workload(&key, &id, now - self.backdate(), not_after)?;
        let hostname: String = req
            .hostname
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            .take(253)
            .collect();
        let agent = AgentRecord {
            id: new_agent_id(),
            group: group.name.clone(),
            spiffe_id: id.to_string(),
            hostname,
            address: source,
            token_id: token.id.clone(),
            joined_at: now,
            serial: serial.clone(),
            not_after,
            renewed_at: None,
            renewals: 0,
            removed_at: None,
            live_certs: vec![crate::store::LiveCert {
                serial: serial.clone(),
                not_after,
            }],
        };
        let cert = CertRecord {
            serial,
            agent_id: agent.id.clone(),
            spiffe_id: agent.spiffe_id.clone(),
            not_before: now - self.backdate(),
            not_after,
            reason: "join".into(),
        };
        let agent = self
            .commit
            .commit(Enrollment::Join {
                token_id: token.id.clone(),
                agent,
                cert,
            })
            .await?;
        tracing::info!(agent = %agent.id, identity = %agent.spiffe_id, %source, token = %token.id, "agent joined");
        Ok(self.issued(&agent, der))
    }

    /// Renews the certificate of the agent presenting `peer_chain`.
    pub async fn renew(
        &self,
        peer_chain: Option<&[CertificateDer<'static>]>,
        req: &RenewRequest,
    ) -> Result<Issued, EnrollError> {
        let leaf = peer_chain
            .and_then(|c| c.first())
            .ok_or(EnrollError::NotAuthenticated)?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|_| EnrollError::UnknownCertificate("(unparseable)".into()))?;
        let serial = hex(cert.raw_serial());
        let record = self
            .store
            .cert(&serial)?
            .ok_or_else(|| EnrollError::UnknownCertificate(serial.clone()))?;
        let agent = self
            .store
            .agent(&record.agent_id)?
            .ok_or_else(|| EnrollError::UnknownCertificate(serial.clone()))?;
        if agent.removed_at.is_some() {
            return Err(EnrollError::AgentRemoved(agent.id));
        }
        let key = parse_csr(&req.csr_der)?;
        let id: SpiffeId = agent
            .spiffe_id
            .parse()
            .map_err(|_| EnrollError::UnknownCertificate(serial.clone()))?;
        let now = now_unix();
        let not_after = now + self.ttl_secs();
        let (der, new_serial) =
            self.ca
                .issue_workload(&key, &id, now - self.backdate(), not_after)?;
        let cert = CertRecord {
            serial: new_serial,
            agent_id: agent.id.clone(),
            spiffe_id: agent.spiffe_id.clone(),
            not_before: now - self.backdate(),
            not_after,
            reason: "renew".into(),
        };
        let agent = self
            .commit
            .commit(Enrollment::Renewal {
                agent_id: agent.id.clone(),
                cert,
                now,
            })
            .await?;
        tracing::info!(agent = %agent.id, identity = %agent.spiffe_id, renewals = agent.renewals, "certificate renewed");
        Ok(self.issued(&agent, der))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CaConfig;
    use crate::store::{GroupRecord, SledStore, TokenRecord};
    use causeway_api::WorkloadGroup;

    fn csr() -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    /// A token is refused, with what to do, when the group now carrying its group's name
    /// is another group (ids differ), when it has no group id (an orphan left by the
    /// schema 2 migration), and once revoked; a token bound to the group joins.
    #[tokio::test(flavor = "current_thread")]
    async fn tokens_join_only_the_group_they_were_made_for() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::reopen(dir.path()).unwrap());
        let td = "causeway.local".parse().unwrap();
        let now = now_unix();
        let ca =
            Arc::new(Ca::load_or_create(store.as_ref(), &CaConfig::default(), &td, now).unwrap());
        store
            .create_group(&GroupRecord {
                group: WorkloadGroup {
                    name: "g2".into(),
                    namespace: "payments".into(),
                    service_account: "admin".into(),
                    service: None,
                    ports: vec![],
                    labels: Default::default(),
                    allowed_cidrs: vec![],
                    mtls: Default::default(),
                    registry_source: None,
                },
                id: "g-new".into(),
                created_at: now,
            })
            .unwrap();
        let secret = b"0123456789abcdef0123456789abcdef".to_vec();
        let token = |id: &str, group_id: &str| TokenRecord {
            id: id.into(),
            secret_sha256: sha256_hex(&secret),
            group: "g2".into(),
            group_id: group_id.into(),
            revoked_at: None,
            created_at: now,
            expires_at: now + 3600,
            uses_total: 5,
            uses_left: 5,
            cidrs: vec![],
        };
        for (id, gid) in [("earlier", "g-old"), ("orphan", ""), ("bound", "g-new")] {
            store.create_token(&token(id, gid)).unwrap();
        }
        let enroller = Enroller::new(store.clone(), ca, Duration::from_secs(3600));
        let join = |id: &str| JoinRequest {
            token_id: id.into(),
            secret: secret.clone(),
            csr_der: csr(),
            hostname: "vm".into(),
        };
        let source: IpAddr = "127.0.0.1".parse().unwrap();
        for id in ["earlier", "orphan"] {
            let err = enroller.join(&join(id), source).await.unwrap_err();
            assert!(
                matches!(err, EnrollError::TokenOrphaned { .. })
                    && err.to_string().contains("earlier group named \"g2\"")
                    && err.to_string().contains("token create --group g2"),
                "{id}: {err}"
            );
        }
        let issued = enroller.join(&join("bound"), source).await.unwrap();
        assert_eq!(
            issued.spiffe_id,
            "spiffe://causeway.local/ns/payments/sa/admin"
        );
        store.revoke_token("bound", now).unwrap();
        let err = enroller.join(&join("bound"), source).await.unwrap_err();
        assert!(
            matches!(err, EnrollError::TokenRevoked { .. }) && err.to_string().contains("revoked"),
            "{err}"
        );
        assert_eq!(store.agents().unwrap().len(), 1);
    }
}
