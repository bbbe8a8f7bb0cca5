//! Traffic management resources (issue 21): Istio's `VirtualService` and `DestinationRule`
//! (`networking.istio.io/v1`, `v1beta1`, `v1alpha3`), decoded from the YAML users already
//! have and validated with every problem named by its field path.
//!
//! What it does: [`resource`] holds the types in Istio's shape; [`decode_value`] turns one
//! parsed document into a typed resource (errors name the field path); [`validate`] checks
//! one resource, [`validate::check_subsets`] checks a VirtualService's subsets against the
//! DestinationRules for their hosts.
//!
//! The controller stores them next to the policies (same apply/get/delete machinery, one
//! mesh version per apply) and pushes them to agents under the required feature
//! [`crate::push::FEATURE_ROUTE`]; the source agent compiles them into its route table.

pub mod api;
pub mod matcher;
pub mod resource;
pub mod validate;
pub mod why;

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

/// Equality of validated resources: their only floating-point fields are percentages,
/// which validation keeps within 0..=100 (never NaN).
impl Eq for RouteResource {}

impl<'de> serde::Deserialize<'de> for RouteResource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        decode_value(value).map_err(|(path, msg)| {
            serde::de::Error::custom(if path.is_empty() {
                msg
            } else {
                format!("{path}: {msg}")
            })
        })
    }
}

/// The two kinds, as keys and `causewayctl get` name them.
pub const VIRTUAL_SERVICE: &str = "VirtualService";
/// See [`VIRTUAL_SERVICE`].
pub const DESTINATION_RULE: &str = "DestinationRule";

/// The kind a `causewayctl get/delete` argument names: `vs`, `virtualservice(s)`, `dr`,
/// `destinationrule(s)` (any case), or the kind itself.
pub fn kind_from_cli(name: &str) -> Option<&'static str> {
    match name.to_ascii_lowercase().as_str() {
        "vs" | "virtualservice" | "virtualservices" => Some(VIRTUAL_SERVICE),
        "dr" | "destinationrule" | "destinationrules" => Some(DESTINATION_RULE),
        _ => None,
    }
}

impl RouteResource {
    /// Its kind.
    pub fn kind(&self) -> &'static str {
        match self {
            RouteResource::VirtualService(_) => VIRTUAL_SERVICE,
            RouteResource::DestinationRule(_) => DESTINATION_RULE,
        }
    }

    /// Its metadata.
    pub fn metadata(&self) -> &crate::policy::Metadata {
        match self {
            RouteResource::VirtualService(v) => &v.metadata,
            RouteResource::DestinationRule(d) => &d.metadata,
        }
    }

    /// Mutable metadata (to fill the namespace from `-n`).
    pub fn metadata_mut(&mut self) -> &mut crate::policy::Metadata {
        match self {
            RouteResource::VirtualService(v) => &mut v.metadata,
            RouteResource::DestinationRule(d) => &mut d.metadata,
        }
    }

    /// The store and wire key: `Kind/namespace/name`.
    pub fn key(&self) -> String {
        let m = self.metadata();
        format!("{}/{}/{}", self.kind(), m.namespace(), m.name)
    }

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

/// Every problem of a set of resources taken together: each VirtualService's subsets
/// against the DestinationRules of the set, as `(VirtualService key, problem)`.
pub fn check_set(resources: &[&RouteResource]) -> Vec<(String, Problem)> {
    let rules: Vec<&DestinationRule> = resources
        .iter()
        .filter_map(|r| match r {
            RouteResource::DestinationRule(d) => Some(&**d),
            RouteResource::VirtualService(_) => None,
        })
        .collect();
    let mut out = Vec::new();
    for r in resources {
        if let RouteResource::VirtualService(v) = *r {
            for p in validate::check_subsets(v, &rules) {
                out.push((r.key(), p));
            }
        }
    }
    out
}

/// One document of a file that mixes policy and routing resources.
#[derive(Debug, Clone, PartialEq)]
pub enum AnyResource {
    /// AuthorizationPolicy, PeerAuthentication, RequestAuthentication.
    Policy(Box<crate::policy::Resource>),
    /// VirtualService, DestinationRule.
    Route(RouteResource),
}

/// Decodes every document of a YAML (or JSON) text into policy or routing resources, with
/// each one's document number (from 1). Empty documents are skipped; every error of every
/// document is returned.
pub fn decode_documents_indexed(
    origin: &str,
    text: &str,
) -> Result<Vec<(usize, AnyResource)>, Vec<crate::policy::resource::DecodeError>> {
    use serde::Deserialize as _;
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let err = |path: String, message: String| crate::policy::resource::DecodeError {
            origin: origin.to_owned(),
            doc: n,
            path,
            message,
        };
        let value = match serde_json::Value::deserialize(doc) {
            Ok(serde_json::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(err(String::new(), format!("not valid YAML: {e}")));
                break;
            }
        };
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let decoded = if is_route_kind(kind) {
            decode_value(value).map(AnyResource::Route)
        } else {
            crate::policy::resource::decode_value(value)
                .map(|r| AnyResource::Policy(Box::new(r)))
                .map_err(|(path, msg)| {
                    if path == "kind" {
                        (
                            path,
                            format!(
                                "{msg}; for traffic management VirtualService and DestinationRule ({}/v1)",
                                resource::API_GROUP
                            ),
                        )
                    } else {
                        (path, msg)
                    }
                })
        };
        match decoded {
            Ok(r) => out.push((n, r)),
            Err((path, message)) => errors.push(err(path, message)),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
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
