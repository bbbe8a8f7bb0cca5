//! Traffic management resources (issue 21): Istio's `VirtualService` and `DestinationRule`
//! (`networking.istio.io/v1`, `v1beta1`, `v1alpha3`), decoded from the YAML users already
//! have and validated with every problem named by its field path.
//!
//! What it does: [`resource`] holds the types in Istio's shape; [`decode_value`] turns one
//! parsed document into a typed resource (errors name the field path); [`validate`] checks
//! one resource, [`validate::check_subsets`] checks a VirtualService's subsets against the
//! DestinationRules for their hosts.
//!
//! What it does not do yet: store, push, or route. Those come with the HTTP-aware agent.

pub mod resource;
pub mod validate;

pub use resource::{DestinationRule, VirtualService};

use crate::policy::validate::Problem;

/// One routing resource.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum RouteResource {
    /// A VirtualService.
    VirtualService(Box<VirtualService>),
    /// A DestinationRule.
    DestinationRule(Box<DestinationRule>),
}

impl RouteResource {
    /// `Kind namespace/name`.
    pub fn display_name(&self) -> String {
        match self {
            RouteResource::VirtualService(v) => format!(
                "VirtualService {}/{}",
                v.metadata.namespace(),
                v.metadata.name
            ),
            RouteResource::DestinationRule(d) => format!(
                "DestinationRule {}/{}",
                d.metadata.namespace(),
                d.metadata.name
            ),
        }
    }
}

/// Whether `kind` is one of this module's kinds.
pub fn is_route_kind(kind: &str) -> bool {
    matches!(kind, "VirtualService" | "DestinationRule")
}

/// Decodes one parsed document of kind VirtualService or DestinationRule; the error is
/// (field path, message).
pub fn decode_value(value: serde_json::Value) -> Result<RouteResource, (String, String)> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_owned();
    let api_version = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or("");
    let version_ok = api_version
        .strip_prefix(resource::API_GROUP)
        .and_then(|v| v.strip_prefix('/'))
        .is_some_and(|v| resource::API_VERSIONS.contains(&v));
    if !version_ok {
        return Err((
            "apiVersion".to_owned(),
            format!(
                "{api_version:?} is not accepted for {kind}; use {}/v1 (or v1beta1, v1alpha3)",
                resource::API_GROUP
            ),
        ));
    }
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("");
    if name.is_empty() {
        return Err((
            "metadata.name".to_owned(),
            "missing; every resource needs a name".to_owned(),
        ));
    }
    let typed = |e: serde_path_to_error::Error<serde_json::Error>| {
        (e.path().to_string(), e.into_inner().to_string())
    };
    match kind.as_str() {
        "VirtualService" => Ok(RouteResource::VirtualService(Box::new(
            serde_path_to_error::deserialize(value).map_err(typed)?,
        ))),
        "DestinationRule" => Ok(RouteResource::DestinationRule(Box::new(
            serde_path_to_error::deserialize(value).map_err(typed)?,
        ))),
        other => Err((
            "kind".to_owned(),
            format!("{other:?} is not VirtualService or DestinationRule"),
        )),
    }
}

/// Validates one resource on its own.
pub fn validate(r: &RouteResource) -> Vec<Problem> {
    match r {
        RouteResource::VirtualService(v) => validate::validate_virtual_service(v),
        RouteResource::DestinationRule(d) => validate::validate_destination_rule(d),
    }
}

#[cfg(test)]
mod tests;
