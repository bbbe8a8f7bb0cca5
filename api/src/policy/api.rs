//! The admin API's policy requests and answers, shared by the controller's handlers and
//! `causewayctl` (one contract, one place).

use serde::{Deserialize, Serialize};

use super::resource::Resource;

/// `POST /v1/policies/apply`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    /// The resources, applied all-or-nothing in one mesh version.
    pub resources: Vec<Resource>,
    /// Validate and report what would change; write nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// What applying one resource did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResult {
    /// `Kind namespace/name`.
    pub resource: String,
    /// `created`, `configured` or `unchanged`.
    pub outcome: String,
}

/// Answer to [`ApplyRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// The mesh version carrying the change (the current one when nothing changed).
    pub version: u64,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// One entry per resource, in input order.
    pub results: Vec<ApplyResult>,
}

/// One stored resource, as `GET /v1/policies` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyItem {
    /// `Kind/namespace/name`.
    pub key: String,
    /// Creation order (lower is older).
    pub seq: u64,
    /// The mesh version that last changed it.
    pub version: u64,
    /// The resource.
    pub resource: Resource,
}

/// `POST /v1/policies/delete`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteRequest {
    /// Keys `Kind/namespace/name`; all are deleted, or none when one does not exist.
    pub keys: Vec<String>,
}

/// Answer to [`DeleteRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteResponse {
    /// The mesh version carrying the deletion.
    pub version: u64,
    /// The deleted keys.
    pub deleted: Vec<String>,
}

/// `POST /v1/why`: would a connection (or request) from `from` to `to` be allowed?
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhyRequest {
    /// A group name, an agent id or an IP address.
    pub from: String,
    /// A service (`NAME`, `NAME.NAMESPACE`, a mesh DNS name) or an address, with an
    /// optional `:PORT`.
    pub to: String,
    /// HTTP method, for HTTP-aware evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// HTTP path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// HTTP headers `(name, value)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// A JWT the request carries (`--jwt`): checked against the RequestAuthentications
    /// that select the destination, its principal and claims given to the policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<String>,
    /// Claims `(name, value)` (`--claim`, repeatable; `[a][b]` a nested claim): without
    /// `jwt` the request is taken as carrying a valid token with these claims; with it,
    /// they are added to the token's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<(String, String)>,
}

/// One step of a `why` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhyStep {
    /// What the step is: `source`, `destination`, `peer-authentication`, `policy`, `decision`.
    pub step: String,
    /// The policy it concerns (`namespace/name`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// For policy steps: whether the policy matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<bool>,
    /// One line for the operator.
    pub detail: String,
}

/// Answer to [`WhyRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhyResponse {
    /// `allow` or `deny`.
    pub decision: String,
    /// The deciding policy, `namespace/name`, or `None`.
    pub policy: Option<String>,
    /// Every step, in evaluation order.
    pub steps: Vec<WhyStep>,
    /// The destination agent's latest real refusals of this source (by principal or
    /// address), newest last, as the agent reported them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_denials: Vec<crate::push::Denial>,
    /// How the source's agent routes the request or connection (VirtualService, route,
    /// subset, DestinationRule policy, endpoints); `None` when the port is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<crate::route::why::RouteWhy>,
}
