//! Zero-trust policy: Istio's `AuthorizationPolicy`, `PeerAuthentication` and
//! `RequestAuthentication`
//! (`security.istio.io/v1` and `v1beta1`), decoded from the YAML users already have,
//! validated as Istio validates them, and evaluated with Istio's documented semantics.
//!
//! What it does: [`resource`] decodes multi-document YAML or JSON into typed resources with
//! errors that name the file, the document and the field path; [`validate`] checks each
//! resource and reports every problem at once; [`authz`] compiles authorization policies
//! into matchers and decides a connection or request (DENY before ALLOW, a workload with an
//! ALLOW policy denies what matches none), with an explanation of each step for `why`;
//! [`peer`] resolves the effective PeerAuthentication mode of a workload port; [`jwt`]
//! finds and verifies the JWT of a request against a RequestAuthentication's rules.
//!
//! What it does not: store, push or enforce anything. The controller stores and pushes the
//! resources, the destination agent enforces the decision, `causewayctl why` prints the
//! explanation; all of them use this one evaluator.

pub mod api;
pub mod authz;
pub mod jwt;
pub mod peer;
pub mod resource;
pub mod validate;

pub use authz::{CompiledPolicy, Decision, HttpAttributes, PolicySet, Request, Verdict, Workload};
pub use peer::{PeerMode, effective_mode};
pub use resource::{
    Action, AuthorizationPolicy, DecodeError, JwtRule, Kind, Metadata, PeerAuthentication,
    RequestAuthentication, Resource, decode_documents, decode_documents_indexed,
};

/// Istio's root namespace, here: policies in it apply to the whole mesh.
pub const ROOT_NAMESPACE: &str = "causeway-system";

/// The label every workload of a group carries implicitly, with the group's name.
pub const GROUP_LABEL: &str = "causeway.io/group";
