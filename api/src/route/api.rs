//! The admin API's routing requests and answers (`/v1/routes`), shared by the controller's
//! handlers and `causewayctl`. Answers have the policy API's shapes
//! ([`crate::policy::api`]).

use serde::{Deserialize, Serialize};

use super::RouteResource;

pub use crate::policy::api::{ApplyResponse, ApplyResult, DeleteRequest, DeleteResponse};

/// `POST /v1/routes/apply`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteApplyRequest {
    /// The resources, applied all-or-nothing in one mesh version.
    pub resources: Vec<RouteResource>,
    /// Validate and report what would change; write nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// One stored resource, as `GET /v1/routes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteItem {
    /// `Kind/namespace/name`.
    pub key: String,
    /// Creation order (lower is older).
    pub seq: u64,
    /// The mesh version that last changed it.
    pub version: u64,
    /// The resource.
    pub resource: RouteResource,
}
