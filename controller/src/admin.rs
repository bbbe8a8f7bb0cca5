//! The admin HTTP API (axum) used by `causewayctl`. Every route but `/healthz` needs the
//! admin credential (`Authorization: Bearer <contents of admin.token>`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use causeway_api::admin::{
    AgentView, CaView, CertView, ErrorBody, GroupCreate, GroupView, LiveCertView, MeshStatus,
    ServiceView, SessionView, SourceView, TokenCreate, TokenCreated, TokenState, TokenView,
};
use causeway_api::{JoinToken, MtlsMode, PortSpec, WorkloadGroup, hex};

use crate::ca::{Ca, to_pem};
use crate::config::TokenConfig;
use crate::enroll::{now_unix, random_hex, sha256_hex};
use crate::mesh::Mesh;
use crate::store::{AgentRecord, CertRecord, GroupRecord, Store, StoreError, TokenRecord};

/// What the admin handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The CA.
    pub ca: Arc<Ca>,
    /// SHA-256 (hex) of the admin credential.
    pub credential_sha256: String,
    /// Token settings.
    pub tokens: TokenConfig,
    /// `host:port` written into join tokens.
    pub advertise: String,
    /// The mesh hub.
    pub mesh: Arc<Mesh>,
}

/// An error answer: status and message, sent as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    /// An answer with this status and message.
    pub fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self(status, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::Exists { .. } | StoreError::Conflict(_) => StatusCode::CONFLICT,
            StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// Largest body of `causewayctl apply` and `delete` (`/v1/policies/*`, `/v1/routes/*`): a
/// mesh's policy set in one file (1,000 AuthorizationPolicies are about 0.5 MiB) is applied
/// in one all-or-nothing call; every other route keeps 64 KiB.
pub const APPLY_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// The router with every route.
pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/v1/ca", get(ca_show))
        .route("/v1/groups", get(group_list).post(group_create))
        .route("/v1/groups/{name}", get(group_show).delete(group_delete))
        .route("/v1/tokens", post(token_create).get(token_list))
        .route("/v1/tokens/{id}", delete(token_revoke))
        .route("/v1/agents", get(agent_list))
        .route("/v1/agents/{id}", delete(agent_remove).get(agent_show))
        .route("/v1/certificates", get(cert_list))
        .route("/v1/mesh", get(mesh_status))
        .route("/v1/traffic", get(traffic))
        .route("/v1/registry", get(registry_list))
        .route("/v1/registry/sources", get(registry_sources))
        .route("/v1/registry/conflicts", get(registry_conflicts))
        .route("/v1/registry/{namespace}/{name}", get(registry_show))
        .route("/v1/policies", get(crate::policy_admin::list))
        .route(
            "/v1/policies/apply",
            post(crate::policy_admin::apply).layer(DefaultBodyLimit::max(APPLY_BODY_LIMIT)),
        )
        .route(
            "/v1/policies/delete",
            post(crate::policy_admin::delete).layer(DefaultBodyLimit::max(APPLY_BODY_LIMIT)),
        )
        .route("/v1/routes", get(crate::route_admin::list))
        .route(
            "/v1/routes/apply",
            post(crate::route_admin::apply).layer(DefaultBodyLimit::max(APPLY_BODY_LIMIT)),
        )
        .route(
            "/v1/routes/delete",
            post(crate::route_admin::delete).layer(DefaultBodyLimit::max(APPLY_BODY_LIMIT)),
        )
        .route("/v1/why", post(crate::policy_admin::why))
        .route("/v1/analyze", crate::analyze::route())
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(api)
        .merge(crate::ui::router(state.clone()))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
}

async fn auth(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(p) if sha256_hex(p.as_bytes()) == state.credential_sha256 => next.run(req).await,
        Some(_) => ApiError(
            StatusCode::UNAUTHORIZED,
            "admin credential does not match this controller's admin.token".into(),
        )
        .into_response(),
        None => ApiError(
            StatusCode::UNAUTHORIZED,
            "missing admin credential: send `Authorization: Bearer <admin.token>` (causewayctl reads --admin-token-file or CAUSEWAY_ADMIN_TOKEN_FILE)".into(),
        )
        .into_response(),
    }
}

async fn ca_show(State(s): State<AdminState>) -> Json<CaView> {
    Json(CaView {
        fingerprint: hex(&s.ca.fingerprint()),
        mode: s.ca.mode().to_owned(),
        trust_domain: s.ca.trust_domain().to_string(),
        certificate_chain_pem: s
            .ca
            .chain_der()
            .iter()
            .map(|d| to_pem("CERTIFICATE", d))
            .collect(),
        trust_bundle_pem: s
            .ca
            .bundle_der()
            .iter()
            .map(|d| to_pem("CERTIFICATE", d))
            .collect(),
    })
}

fn group_view(g: GroupRecord) -> GroupView {
    GroupView {
        group: g.group,
        id: g.id,
        created_at: g.created_at,
    }
}

async fn group_create(
    State(s): State<AdminState>,
    Json(body): Json<GroupCreate>,
) -> Result<(StatusCode, Json<GroupView>), ApiError> {
    let mut errors = Vec::new();
    let ports: Vec<PortSpec> = body
        .ports
        .iter()
        .filter_map(|p| p.parse().map_err(|e| errors.push(format!("{e}"))).ok())
        .collect();
    let body_mtls_given = body.mtls.is_some();
    let mtls: MtlsMode = match body.mtls.as_deref() {
        None => MtlsMode::default(),
        Some(m) => m.parse().unwrap_or_else(|e| {
            errors.push(format!("{e}"));
            MtlsMode::default()
        }),
    };
    let group = WorkloadGroup {
        name: body.name,
        namespace: body.namespace,
        service_account: body.service_account,
        service: body.service,
        ports,
        labels: body.labels,
        allowed_cidrs: body.allowed_cidrs,
        mtls,
        registry_source: body.registry_source,
    };
    if let Err(es) = group.validate() {
        errors.extend(es.iter().map(ToString::to_string));
    }
    if !errors.is_empty() {
        return Err(bad_request(format!("invalid group: {}", errors.join("; "))));
    }
    let record = GroupRecord {
        group,
        id: crate::enroll::new_group_id(),
        created_at: now_unix(),
    };
    let explicit_mtls = body_mtls_given;
    s.store.create_group(&record)?;
    s.store.flush()?;
    if explicit_mtls {
        // `--mtls` is a shorthand: it writes the equivalent workload-level
        // PeerAuthentication, which `get pa` shows and a later `apply` may replace.
        let pa = crate::policy_admin::group_peer_authentication(&record.group);
        s.mesh.apply_policies(vec![pa], false).await?;
        s.store.flush()?;
    }
    Ok((StatusCode::CREATED, Json(group_view(record))))
}

async fn group_list(State(s): State<AdminState>) -> Result<Json<Vec<GroupView>>, ApiError> {
    Ok(Json(
        s.store.groups()?.into_iter().map(group_view).collect(),
    ))
}

async fn group_show(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<GroupView>, ApiError> {
    s.store
        .group(&name)?
        .map(|g| Json(group_view(g)))
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("group {name:?} does not exist; see `causewayctl group list`"),
            )
        })
}

async fn group_delete(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let group = s.store.group(&name)?;
    let tokens = s.store.delete_group(&name)?;
    s.store.flush()?;
    // The PeerAuthentication its `--mtls` wrote goes with it.
    if let Some(g) = group {
        let key = crate::store::PolicyRecord::key_of(
            &crate::policy_admin::group_peer_authentication(&g.group),
        );
        if s.mesh.policies().contains_key(&key) {
            s.mesh.delete_policies(&[key]).await?;
            s.store.flush()?;
        }
    }
    tracing::info!(group = %name, tokens, "group deleted with its join tokens");
    Ok(StatusCode::NO_CONTENT)
}

async fn token_create(
    State(s): State<AdminState>,
    Json(body): Json<TokenCreate>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    let Some(group) = s.store.group(&body.group)? else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "group {:?} does not exist; create it with `causewayctl group create {} --namespace NS --service-account SA`",
                body.group, body.group
            ),
        ));
    };
    let ttl = body
        .ttl_secs
        .map(Duration::from_secs)
        .unwrap_or(s.tokens.default_ttl);
    if ttl.is_zero() || ttl > s.tokens.max_ttl {
        return Err(bad_request(format!(
            "ttl {} is out of range: must be above zero and at most {} (tokens.max_ttl)",
            humantime::format_duration(ttl),
            humantime::format_duration(s.tokens.max_ttl)
        )));
    }
    let uses = body.uses.unwrap_or(1);
    if uses == 0 || uses > 100_000 {
        return Err(bad_request(format!(
            "uses = {uses}: must be between 1 and 100000"
        )));
    }
    let mut secret = [0u8; causeway_api::token::SECRET_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret).map_err(
        |_| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "random generator failed".into(),
            )
        },
    )?;
    let now = now_unix();
    let record = TokenRecord {
        id: random_hex(8),
        secret_sha256: sha256_hex(&secret),
        group: body.group.clone(),
        group_id: group.id,
        revoked_at: None,
        created_at: now,
        expires_at: now + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 4),
        uses_total: uses,
        uses_left: uses,
        cidrs: body.cidrs.clone(),
    };
    s.store.create_token(&record)?;
    s.store.flush()?;
    let token = JoinToken {
        controller: s.advertise.clone(),
        ca_fingerprint: s.ca.fingerprint(),
        id: record.id.clone(),
        secret,
    };
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            token: token.encode(),
            id: record.id,
            group: record.group,
            expires_at: record.expires_at,
            uses,
            cidrs: record.cidrs,
            controller: s.advertise,
        }),
    ))
}

/// A token as the API shows it. `group_id` is the id of the group now named as the
/// token's group, if any.
fn token_view(t: TokenRecord, group_id: Option<&str>, now: i64) -> TokenView {
    let state = if t.revoked_at.is_some() {
        TokenState::Revoked
    } else if t.group_id.is_empty() || group_id != Some(t.group_id.as_str()) {
        TokenState::Orphaned
    } else if now >= t.expires_at {
        TokenState::Expired
    } else if t.uses_left == 0 {
        TokenState::Spent
    } else {
        TokenState::Active
    };
    TokenView {
        id: t.id,
        group: t.group,
        group_id: t.group_id,
        state,
        created_at: t.created_at,
        expires_at: t.expires_at,
        revoked_at: t.revoked_at,
        uses_total: t.uses_total,
        uses_left: t.uses_left,
        cidrs: t.cidrs,
    }
}

async fn token_list(State(s): State<AdminState>) -> Result<Json<Vec<TokenView>>, ApiError> {
    let groups: std::collections::BTreeMap<String, String> = s
        .store
        .groups()?
        .into_iter()
        .map(|g| (g.group.name, g.id))
        .collect();
    let now = now_unix();
    Ok(Json(
        s.store
            .tokens()?
            .into_iter()
            .map(|t| {
                let gid = groups.get(&t.group).map(String::as_str);
                token_view(t, gid, now)
            })
            .collect(),
    ))
}

/// `DELETE /v1/tokens/{id}`: revokes the token at once (the record stays, listed as
/// revoked). Agents that joined with it keep their identity; remove them on their own.
async fn token_revoke(
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    let token = s.store.revoke_token(&id, now_unix()).map_err(|e| match e {
        StoreError::NotFound { .. } => ApiError(
            StatusCode::NOT_FOUND,
            format!("join token {id:?} does not exist; see `causewayctl token list`"),
        ),
        other => other.into(),
    })?;
    s.store.flush()?;
    tracing::info!(token = %id, group = %token.group, "join token revoked");
    let gid = s.store.group(&token.group)?.map(|g| g.id);
    Ok(Json(token_view(token, gid.as_deref(), now_unix())))
}

/// An agent as the API shows it, with its session if it has one.
fn agent_view(
    a: AgentRecord,
    sessions: &std::collections::BTreeMap<String, SessionView>,
) -> AgentView {
    let session = sessions.get(&a.id).cloned();
    AgentView {
        removed: a.removed_at.is_some(),
        id: a.id,
        identity: a.spiffe_id,
        group: a.group,
        hostname: a.hostname,
        address: a.address,
        token_id: a.token_id,
        joined_at: a.joined_at,
        serial: a.serial,
        not_after: a.not_after,
        renewed_at: a.renewed_at,
        renewals: a.renewals,
        removed_at: a.removed_at,
        certificates: a
            .live_certs
            .into_iter()
            .map(|c| LiveCertView {
                serial: c.serial,
                not_after: c.not_after,
            })
            .collect(),
        connected: session.as_ref().is_some_and(|s| s.connected),
        acked_version: session.as_ref().map(|s| s.acked_version),
        session,
    }
}

fn cert_view(c: CertRecord) -> CertView {
    CertView {
        serial: c.serial,
        agent_id: c.agent_id,
        spiffe_id: c.spiffe_id,
        not_before: c.not_before,
        not_after: c.not_after,
        reason: c.reason,
    }
}

async fn agent_list(State(s): State<AdminState>) -> Result<Json<Vec<AgentView>>, ApiError> {
    let sessions = s.mesh.sessions();
    Ok(Json(
        s.store
            .agents()?
            .into_iter()
            .map(|a| agent_view(a, &sessions))
            .collect(),
    ))
}

async fn agent_show(
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    let sessions = s.mesh.sessions();
    s.store
        .agent(&id)?
        .map(|a| Json(agent_view(a, &sessions)))
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("agent {id:?} does not exist; see `causewayctl agent list`"),
            )
        })
}

async fn agent_remove(
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    let agent = s.store.remove_agent(&id, now_unix())?;
    s.store.flush()?;
    s.mesh.agent_removed(&agent.id, &agent.live_certs).await?;
    tracing::info!(agent = %id, denied = agent.live_certs.len(), "agent removed: every unexpired certificate it holds is denied, its renewals are refused");
    // A removed agent is shown without its session (which the removal ends).
    Ok(Json(agent_view(agent, &Default::default())))
}

async fn cert_list(State(s): State<AdminState>) -> Result<Json<Vec<CertView>>, ApiError> {
    Ok(Json(s.store.certs()?.into_iter().map(cert_view).collect()))
}

async fn registry_list(State(s): State<AdminState>) -> Json<Vec<ServiceView>> {
    Json(s.mesh.services())
}

async fn registry_show(
    State(s): State<AdminState>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<ServiceView>, ApiError> {
    s.mesh
        .services()
        .into_iter()
        .find(|v| v.namespace == namespace && v.name == name)
        .map(Json)
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("service {namespace}/{name} is not in the merged registry; see `causewayctl registry list`"),
            )
        })
}

async fn registry_sources(State(s): State<AdminState>) -> Json<Vec<SourceView>> {
    Json(s.mesh.sources())
}

async fn registry_conflicts(
    State(s): State<AdminState>,
) -> Json<Vec<causeway_api::registry::Conflict>> {
    Json(s.mesh.conflicts())
}

/// `GET /v1/traffic`: see [`crate::traffic`].
async fn traffic(State(s): State<AdminState>) -> Json<causeway_api::admin::TrafficView> {
    Json(s.mesh.traffic())
}

async fn mesh_status(State(s): State<AdminState>) -> Json<MeshStatus> {
    let sessions = s.mesh.sessions();
    Json(MeshStatus {
        version: s.mesh.version(),
        durable_version: s.mesh.durable_version(),
        services: s.mesh.service_count(),
        agents_connected: sessions.values().filter(|v| v.connected).count(),
    })
}
