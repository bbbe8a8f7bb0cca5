//! The resources in Istio's YAML shape, and decoding them from multi-document YAML or JSON.
//!
//! `metadata` accepts whatever `kubectl get -o yaml` prints (uid, resourceVersion,
//! annotations…) and keeps only what Causeway uses; `spec` refuses unknown fields, as Istio's
//! validation does, so that a typo is an error and not a silently wider policy.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The API group and the versions accepted for both kinds.
pub const API_GROUP: &str = "security.istio.io";
/// The versions of [`API_GROUP`] accepted on input.
pub const API_VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// The kinds of policy resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// `AuthorizationPolicy`.
    AuthorizationPolicy,
    /// `PeerAuthentication`.
    PeerAuthentication,
    /// `RequestAuthentication` (JWT rules).
    RequestAuthentication,
}

impl Kind {
    /// Every kind, in display order.
    pub const ALL: [Kind; 3] = [
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::RequestAuthentication,
    ];

    /// The kind's name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::RequestAuthentication => "RequestAuthentication",
        }
    }

    /// Parses a kind as `kubectl`/`istioctl` users type it: the kind, its plural or its short
    /// name, in any case (`AuthorizationPolicy`, `authorizationpolicies`, `ap`, `pa`…).
    pub fn from_cli(name: &str) -> Option<Kind> {
        match name.to_ascii_lowercase().as_str() {
            "authorizationpolicy" | "authorizationpolicies" | "ap" => {
                Some(Kind::AuthorizationPolicy)
            }
            "peerauthentication" | "peerauthentications" | "pa" => Some(Kind::PeerAuthentication),
            "requestauthentication" | "requestauthentications" | "ra" => {
                Some(Kind::RequestAuthentication)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The metadata Causeway keeps. Other metadata fields are accepted and dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The resource's name.
    #[serde(default)]
    pub name: String,
    /// Its namespace; `default` when absent, as `kubectl apply` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels, kept for display.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations, kept for display.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Metadata {
    /// The namespace, `default` when absent.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// `spec.selector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    /// Labels a workload must all carry, with these values.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl Selector {
    /// Whether `labels` carries every label of the selector.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
    }
}

/// `spec.action`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    /// Allow what matches; with at least one ALLOW policy, deny the rest.
    #[default]
    #[serde(rename = "ALLOW")]
    Allow,
    /// Deny what matches, before any ALLOW policy is looked at.
    #[serde(rename = "DENY")]
    Deny,
    /// Record what matches; does not change the decision.
    #[serde(rename = "AUDIT")]
    Audit,
    /// Delegate to an external authorizer (not supported: refused by validation).
    #[serde(rename = "CUSTOM")]
    Custom,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        })
    }
}

fn is_empty<T>(v: &[T]) -> bool {
    v.is_empty()
}

/// `rules[].from[].source`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    /// Peer identities, `<trust-domain>/ns/<ns>/sa/<sa>`.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub principals: Vec<String>,
    /// Negative of `principals`.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub not_principals: Vec<String>,
    /// Request principals (`iss/sub` of a validated JWT); HTTP only.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub request_principals: Vec<String>,
    /// Negative of `request_principals`; HTTP only.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub not_request_principals: Vec<String>,
    /// Namespaces of the peer identity.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub namespaces: Vec<String>,
    /// Negative of `namespaces`.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub not_namespaces: Vec<String>,
    /// Service accounts of the peer identity, `ns/sa` (or `sa` in the policy's namespace).
    #[serde(default, skip_serializing_if = "is_empty")]
    pub service_accounts: Vec<String>,
    /// Negative of `service_accounts`.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub not_service_accounts: Vec<String>,
    /// Source addresses or CIDRs of the connection's peer.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub ip_blocks: Vec<String>,
    /// Negative of `ip_blocks`.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// Addresses or CIDRs of the original client (the peer's address when no proxy header says otherwise).
    #[serde(default, skip_serializing_if = "is_empty")]
    pub remote_ip_blocks: Vec<String>,
    /// Negative of `remote_ip_blocks`.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// `rules[].from[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    /// The source this entry matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// `rules[].to[].operation`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    /// HTTP hosts (the Host/authority header); HTTP only.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub hosts: Vec<String>,
    /// Negative of `hosts`; HTTP only.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub not_hosts: Vec<String>,
    /// Destination ports, as strings of numbers.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub ports: Vec<String>,
    /// Negative of `ports`.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub not_ports: Vec<String>,
    /// HTTP methods; HTTP only.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub methods: Vec<String>,
    /// Negative of `methods`; HTTP only.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub not_methods: Vec<String>,
    /// HTTP paths; HTTP only.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub paths: Vec<String>,
    /// Negative of `paths`; HTTP only.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub not_paths: Vec<String>,
}

/// `rules[].to[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct To {
    /// The operation this entry matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

/// `rules[].when[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    /// The attribute, e.g. `source.ip` or `request.headers[x-user]`.
    #[serde(default)]
    pub key: String,
    /// Values of which the attribute must match one.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub values: Vec<String>,
    /// Values of which the attribute must match none.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub not_values: Vec<String>,
}

/// `spec.rules[]`: `from`, `to` and `when` must all match (an absent one matches anything).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Sources; one must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<From>>,
    /// Operations; one must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<To>>,
    /// Conditions; all must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Vec<Condition>>,
}

/// `AuthorizationPolicy.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads the policy applies to; absent: every workload in the namespace (the mesh, in
    /// the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Gateway/waypoint attachment (refused by validation: no gateways on VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<serde_json::Value>,
    /// Gateway/waypoint attachment (refused by validation: no gateways on VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<Vec<serde_json::Value>>,
    /// What to do with a match.
    #[serde(default)]
    pub action: Action,
    /// External authorizer for CUSTOM (refused by validation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<serde_json::Value>,
    /// Rules; a request matching any of them matches the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule>>,
}

/// An `AuthorizationPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    /// `security.istio.io/v1` or `security.istio.io/v1beta1`.
    pub api_version: String,
    /// Always `AuthorizationPolicy`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: Metadata,
    /// The policy.
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

/// `mtls` of a PeerAuthentication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    /// The mode; absent means UNSET.
    #[serde(default)]
    pub mode: MtlsModeSpec,
}

/// `mtls.mode` as written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MtlsModeSpec {
    /// Inherit from the parent scope (namespace, then mesh; PERMISSIVE at the top).
    #[default]
    #[serde(rename = "UNSET")]
    Unset,
    /// Plaintext is refused; only mesh (mutual TLS) traffic is accepted.
    #[serde(rename = "STRICT")]
    Strict,
    /// Plaintext and mesh traffic are both accepted.
    #[serde(rename = "PERMISSIVE")]
    Permissive,
    /// Mutual TLS is not required: plaintext is accepted (as PERMISSIVE, see ARCHITECTURE).
    #[serde(rename = "DISABLE")]
    Disable,
}

/// `PeerAuthentication.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads it applies to; absent: the namespace (the mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// The mode for every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Per-port modes, keyed by the workload's port number (needs a selector).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<String, Mtls>,
}

/// A `PeerAuthentication`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    /// `security.istio.io/v1` or `security.istio.io/v1beta1`.
    pub api_version: String,
    /// Always `PeerAuthentication`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: Metadata,
    /// The policy.
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

/// `jwtRules[].fromHeaders[]`: a header that carries the token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtHeader {
    /// The header's name.
    #[serde(default)]
    pub name: String,
    /// A prefix to strip from the value (e.g. `Bearer `); absent: the whole value.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// `jwtRules[].outputClaimToHeaders[]`: copy one claim of a valid token to a request header.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeader {
    /// The header to set.
    #[serde(default)]
    pub header: String,
    /// The claim (a `.`-separated path for nested claims).
    #[serde(default)]
    pub claim: String,
}

/// `spec.jwtRules[]`: one accepted issuer and how to find and check its tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtRule {
    /// The `iss` a token must carry.
    #[serde(default)]
    pub issuer: String,
    /// Accepted `aud` values; empty: any audience is accepted.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub audiences: Vec<String>,
    /// The HTTPS URL of the issuer's JSON Web Key Set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The JSON Web Key Set inline, as a JSON string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Headers that carry the token; with none of the three `from*`: `Authorization: Bearer`.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters that carry the token.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub from_params: Vec<String>,
    /// Cookies that carry the token.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub from_cookies: Vec<String>,
    /// A header to which the token's payload (base64url JSON) is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    /// Claims copied to request headers.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Keep the token in the request forwarded to the workload (default: removed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_original_token: bool,
    /// Istio's request timeout for fetching the JWKS (accepted, as a duration string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// `RequestAuthentication.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// Workloads it applies to; absent: the namespace (the mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Gateway/waypoint attachment (refused by validation: no gateways on VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<serde_json::Value>,
    /// Gateway/waypoint attachment (refused by validation: no gateways on VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<Vec<serde_json::Value>>,
    /// The accepted issuers.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub jwt_rules: Vec<JwtRule>,
}

/// A `RequestAuthentication`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthentication {
    /// `security.istio.io/v1` or `security.istio.io/v1beta1`.
    pub api_version: String,
    /// Always `RequestAuthentication`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: Metadata,
    /// The rules.
    #[serde(default)]
    pub spec: RequestAuthenticationSpec,
}

/// One decoded resource. Serialises in Istio's shape; deserialises by its `kind` (through
/// [`decode_value`]), never by guessing from the fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Resource {
    /// An AuthorizationPolicy.
    AuthorizationPolicy(AuthorizationPolicy),
    /// A PeerAuthentication.
    PeerAuthentication(PeerAuthentication),
    /// A RequestAuthentication.
    RequestAuthentication(RequestAuthentication),
}

impl<'de> Deserialize<'de> for Resource {
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

impl Resource {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Resource::PeerAuthentication(_) => Kind::PeerAuthentication,
            Resource::RequestAuthentication(_) => Kind::RequestAuthentication,
        }
    }

    /// Its metadata.
    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::AuthorizationPolicy(p) => &p.metadata,
            Resource::PeerAuthentication(p) => &p.metadata,
            Resource::RequestAuthentication(p) => &p.metadata,
        }
    }

    /// Mutable metadata (to fill the namespace from `-n`).
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        match self {
            Resource::AuthorizationPolicy(p) => &mut p.metadata,
            Resource::PeerAuthentication(p) => &mut p.metadata,
            Resource::RequestAuthentication(p) => &mut p.metadata,
        }
    }

    /// `Kind namespace/name`, as messages name a resource.
    pub fn display_name(&self) -> String {
        let m = self.metadata();
        format!("{} {}/{}", self.kind(), m.namespace(), m.name)
    }
}

/// Why a document could not be decoded or validated: where, and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin} doc {doc}: {path}{sep}{message}", sep = if path.is_empty() { "" } else { ": " })]
pub struct DecodeError {
    /// The file (or `-` for standard input).
    pub origin: String,
    /// The document's position in the file, from 1.
    pub doc: usize,
    /// The field path, e.g. `spec.rules[0].from[0].source.ipBlocks[1]` (empty: the document).
    pub path: String,
    /// What is wrong and what is accepted.
    pub message: String,
}

/// Decodes every document of a YAML (or JSON) text. Empty documents are skipped. Returns
/// every decoding error of every document; a caller applies nothing when there is any.
pub fn decode_documents(origin: &str, text: &str) -> Result<Vec<Resource>, Vec<DecodeError>> {
    decode_documents_indexed(origin, text).map(|docs| docs.into_iter().map(|(_, r)| r).collect())
}

/// [`decode_documents`], with each resource's document number (from 1) in the file.
pub fn decode_documents_indexed(
    origin: &str,
    text: &str,
) -> Result<Vec<(usize, Resource)>, Vec<DecodeError>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let err = |path: String, message: String| DecodeError {
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
                // The YAML stream cannot be resumed after a syntax error.
                break;
            }
        };
        match decode_value(value) {
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

/// Decodes one document already parsed to a JSON value; the error is (field path, message).
pub fn decode_value(value: serde_json::Value) -> Result<Resource, (String, String)> {
    let obj = value.as_object().ok_or_else(|| {
        (
            String::new(),
            "expected a mapping with apiVersion, kind, metadata and spec".to_owned(),
        )
    })?;
    let kind = obj.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let api_version = obj.get("apiVersion").and_then(|k| k.as_str()).unwrap_or("");
    let kind = match kind {
        "AuthorizationPolicy" => Kind::AuthorizationPolicy,
        "PeerAuthentication" => Kind::PeerAuthentication,
        "RequestAuthentication" => Kind::RequestAuthentication,
        "" => {
            return Err((
                "kind".to_owned(),
                "missing; expected AuthorizationPolicy, PeerAuthentication or RequestAuthentication".to_owned(),
            ));
        }
        other => {
            return Err((
                "kind".to_owned(),
                format!(
                    "unknown kind {other:?}; Causeway accepts AuthorizationPolicy, PeerAuthentication and RequestAuthentication ({API_GROUP}/v1)"
                ),
            ));
        }
    };
    let version_ok = api_version
        .strip_prefix(API_GROUP)
        .and_then(|v| v.strip_prefix('/'))
        .is_some_and(|v| API_VERSIONS.contains(&v));
    if !version_ok {
        return Err((
            "apiVersion".to_owned(),
            format!("{api_version:?} is not accepted for {kind}; use {API_GROUP}/v1 (or v1beta1)"),
        ));
    }
    let name = obj
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
    Ok(match kind {
        Kind::AuthorizationPolicy => {
            Resource::AuthorizationPolicy(serde_path_to_error::deserialize(value).map_err(typed)?)
        }
        Kind::PeerAuthentication => {
            Resource::PeerAuthentication(serde_path_to_error::deserialize(value).map_err(typed)?)
        }
        Kind::RequestAuthentication => {
            Resource::RequestAuthentication(serde_path_to_error::deserialize(value).map_err(typed)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_both_kinds_and_versions_from_one_stream() {
        let text = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-cart
  namespace: shop
  uid: 1234
  resourceVersion: "99"
spec:
  selector:
    matchLabels: {app: cart}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["causeway.local/ns/shop/sa/web"]
    to:
    - operation:
        ports: ["8080"]
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: strict}
spec:
  mtls: {mode: STRICT}
  selector: {matchLabels: {app: cart}}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
---
"#;
        let docs = decode_documents("p.yaml", text).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(
            docs[0].display_name(),
            "AuthorizationPolicy shop/allow-cart"
        );
        assert_eq!(docs[1].display_name(), "PeerAuthentication default/strict");
        let Resource::PeerAuthentication(pa) = &docs[1] else {
            panic!()
        };
        assert_eq!(
            pa.spec.port_level_mtls["8080"].mode,
            MtlsModeSpec::Permissive
        );
    }

    #[test]
    fn request_authentication_decodes_in_istio_shape() {
        let text = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  jwtRules:
  - issuer: https://issuer.example
    audiences: [cart, shop]
    jwksUri: https://issuer.example/.well-known/jwks.json
    fromHeaders:
    - {name: x-jwt, prefix: "Bearer "}
    fromParams: [access_token]
    fromCookies: [session]
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders:
    - {header: x-user, claim: sub}
    forwardOriginalToken: true
---
apiVersion: security.istio.io/v1beta1
kind: RequestAuthentication
metadata: {name: inline}
spec:
  jwtRules:
  - issuer: me
    jwks: '{"keys":[]}'
"#;
        let docs = decode_documents("ra.yaml", text).unwrap();
        assert_eq!(docs[0].kind(), Kind::RequestAuthentication);
        assert_eq!(docs[0].display_name(), "RequestAuthentication shop/jwt");
        let Resource::RequestAuthentication(ra) = &docs[0] else {
            panic!()
        };
        let rule = &ra.spec.jwt_rules[0];
        assert_eq!(rule.audiences, ["cart", "shop"]);
        assert_eq!(rule.from_headers[0].prefix, "Bearer ");
        assert_eq!(rule.from_params, ["access_token"]);
        assert_eq!(rule.from_cookies, ["session"]);
        assert_eq!(rule.output_claim_to_headers[0].claim, "sub");
        assert!(rule.forward_original_token);
        let back: Resource =
            serde_json::from_str(&serde_json::to_string(&docs[0]).unwrap()).unwrap();
        assert_eq!(&back, &docs[0]);
        let Resource::RequestAuthentication(inline) = &docs[1] else {
            panic!()
        };
        assert_eq!(
            inline.spec.jwt_rules[0].jwks.as_deref(),
            Some(r#"{"keys":[]}"#)
        );
        assert_eq!(Kind::from_cli("ra"), Some(Kind::RequestAuthentication));
        assert_eq!(
            Kind::from_cli("RequestAuthentications"),
            Some(Kind::RequestAuthentication)
        );
        // A typo in a rule is an error with its path.
        let e = decode_documents(
            "ra.yaml",
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: a}\nspec:\n  jwtRules:\n  - issuer: x\n    jwksURI: https://x\n",
        )
        .unwrap_err();
        assert!(
            e[0].to_string()
                .starts_with("ra.yaml doc 1: spec.jwtRules[0].jwksURI: unknown field `jwksURI`"),
            "{}",
            e[0]
        );
    }

    #[test]
    fn resources_deserialise_by_kind_not_by_shape() {
        // A PeerAuthentication whose spec would also fit an AuthorizationPolicy.
        let json = r#"{"apiVersion":"security.istio.io/v1","kind":"PeerAuthentication","metadata":{"name":"p"},"spec":{"selector":{"matchLabels":{"a":"b"}}}}"#;
        let r: Resource = serde_json::from_str(json).unwrap();
        assert_eq!(r.kind(), Kind::PeerAuthentication);
        let back: Resource = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let bad = r#"{"apiVersion":"security.istio.io/v1","kind":"Nope","metadata":{"name":"p"}}"#;
        assert!(
            serde_json::from_str::<Resource>(bad)
                .unwrap_err()
                .to_string()
                .contains("unknown kind")
        );
    }

    #[test]
    fn json_input_is_accepted() {
        let text = r#"{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"x","namespace":"a"},"spec":{"action":"DENY","rules":[{}]}}"#;
        let docs = decode_documents("p.json", text).unwrap();
        let Resource::AuthorizationPolicy(p) = &docs[0] else {
            panic!()
        };
        assert_eq!(p.spec.action, Action::Deny);
    }

    #[test]
    fn errors_name_file_document_and_field_path() {
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: b}\nspec:\n  rules:\n  - from:\n    - source:\n        principal: [x]\n";
        let errs = decode_documents("policy.yaml", text).unwrap_err();
        assert_eq!(errs.len(), 1);
        let msg = errs[0].to_string();
        assert!(
            msg.starts_with(
                "policy.yaml doc 2: spec.rules[0].from[0].source.principal: unknown field `principal`, expected one of `principals`"
            ),
            "{msg}"
        );
    }

    #[test]
    fn unknown_kind_version_action_and_bad_yaml_are_errors() {
        let e = decode_documents(
            "f",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
        )
        .unwrap_err();
        assert!(
            e[0].to_string().contains("unknown kind \"ConfigMap\""),
            "{}",
            e[0]
        );
        let e = decode_documents(
            "f",
            "apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: a}\n",
        )
        .unwrap_err();
        assert!(e[0].to_string().contains("apiVersion"), "{}", e[0]);
        let e = decode_documents("f", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec: {action: PERMIT}\n").unwrap_err();
        assert!(
            e[0].to_string().contains("spec.action") && e[0].to_string().contains("PERMIT"),
            "{}",
            e[0]
        );
        let e = decode_documents("f", "apiVersion: [unclosed\n").unwrap_err();
        assert!(e[0].to_string().contains("not valid YAML"), "{}", e[0]);
        let e = decode_documents(
            "f",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {}\n",
        )
        .unwrap_err();
        assert_eq!(e[0].path, "metadata.name");
    }
}
