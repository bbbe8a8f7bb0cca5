//! Admin API for routing resources (`/v1/routes`): VirtualService and DestinationRule,
//! the same all-or-nothing apply, list and delete as the policies
//! ([`crate::policy_admin`]), stored in their own tree and pushed under the required
//! feature `route/v1`.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use causeway_api::route::api::{
    ApplyResponse, ApplyResult, DeleteRequest, DeleteResponse, RouteApplyRequest, RouteItem,
};
use causeway_api::route::{RouteResource, kind_from_cli, validate};
use serde::Deserialize;

use crate::admin::{AdminState, ApiError};
use crate::mesh::{PolicyOutcome, RoutesRefused};

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}

fn refused(e: RoutesRefused, what: &str) -> ApiError {
    match e {
        RoutesRefused::Invalid(problems) => bad(format!("{what}: {}", problems.join("; "))),
        RoutesRefused::Store(e) => e.into(),
    }
}

/// `POST /v1/routes/apply`.
pub(crate) async fn apply(
    State(s): State<AdminState>,
    Json(body): Json<RouteApplyRequest>,
) -> Result<Json<ApplyResponse>, ApiError> {
    let mut problems = Vec::new();
    for (i, r) in body.resources.iter().enumerate() {
        for p in validate(r) {
            problems.push(format!(
                "resource {} ({}): {}: {}",
                i + 1,
                r.display_name(),
                p.path,
                p.message
            ));
        }
    }
    if !problems.is_empty() {
        return Err(bad(format!("nothing applied: {}", problems.join("; "))));
    }
    let names: Vec<String> = body
        .resources
        .iter()
        .map(RouteResource::display_name)
        .collect();
    let dry_run = body.dry_run;
    let applied = s
        .mesh
        .apply_routes(body.resources, dry_run)
        .await
        .map_err(|e| refused(e, "nothing applied"))?;
    if !dry_run {
        s.store.flush()?;
    }
    Ok(Json(ApplyResponse {
        version: applied.version,
        dry_run,
        results: names
            .into_iter()
            .zip(applied.results)
            .map(|(resource, (_, outcome))| ApplyResult {
                resource,
                outcome: match outcome {
                    PolicyOutcome::Created => "created",
                    PolicyOutcome::Configured => "configured",
                    PolicyOutcome::Unchanged => "unchanged",
                }
                .to_owned(),
            })
            .collect(),
    }))
}

/// Query of `GET /v1/routes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    /// A kind as the CLI accepts it (`vs`, `VirtualService`, `dr`, …).
    kind: Option<String>,
    /// Only this namespace.
    namespace: Option<String>,
    /// Only this name.
    name: Option<String>,
}

/// `GET /v1/routes`.
pub(crate) async fn list(
    State(s): State<AdminState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<RouteItem>>, ApiError> {
    let kind = match q.kind.as_deref() {
        None => None,
        Some(k) => Some(kind_from_cli(k).ok_or_else(|| {
            bad(format!(
                "unknown kind {k:?}: expected virtualservices (vs) or destinationrules (dr)"
            ))
        })?),
    };
    let items = s
        .mesh
        .routes()
        .into_iter()
        .filter(|(_, r)| kind.is_none_or(|k| r.resource.kind() == k))
        .filter(|(_, r)| {
            q.namespace
                .as_deref()
                .is_none_or(|ns| r.resource.metadata().namespace() == ns)
        })
        .filter(|(_, r)| {
            q.name
                .as_deref()
                .is_none_or(|n| r.resource.metadata().name == n)
        })
        .map(|(key, r)| RouteItem {
            key,
            seq: r.seq,
            version: r.version,
            resource: r.resource,
        })
        .collect();
    Ok(Json(items))
}

/// `POST /v1/routes/delete`.
pub(crate) async fn delete(
    State(s): State<AdminState>,
    Json(body): Json<DeleteRequest>,
) -> Result<Json<DeleteResponse>, ApiError> {
    if body.keys.is_empty() {
        return Err(bad("no resources named: give keys Kind/namespace/name"));
    }
    let version = s.mesh.delete_routes(&body.keys).await.map_err(|e| {
        refused(
            e,
            "nothing deleted, the routes that remain would name undefined subsets",
        )
    })?;
    s.store.flush()?;
    Ok(Json(DeleteResponse {
        version,
        deleted: body.keys,
    }))
}
