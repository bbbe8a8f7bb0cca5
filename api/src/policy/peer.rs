//! PeerAuthentication: the effective mutual-TLS mode of one workload port.
//!
//! Istio's resolution: a workload-level policy (in the workload's namespace, with a selector
//! that matches) overrides the namespace-level one (no selector), which overrides the
//! mesh-level one (root namespace, no selector). UNSET inherits from the level above; the top
//! defaults to PERMISSIVE. A port listed in the workload-level policy's `portLevelMtls` takes
//! that mode (UNSET there inherits the policy's own mode). Among several policies at one
//! level, the oldest wins (here: the first applied, by the store's sequence number).

use serde::{Deserialize, Serialize};

use super::ROOT_NAMESPACE;
use super::authz::Workload;
use super::resource::{MtlsModeSpec, PeerAuthentication};

/// The effective mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PeerMode {
    /// Only mesh (mutual TLS) connections.
    Strict,
    /// Mesh and plaintext.
    Permissive,
    /// Mutual TLS not required: plaintext accepted, as PERMISSIVE (mesh connections from
    /// other agents are still accepted: the client side chooses).
    Disable,
}

impl PeerMode {
    /// Whether plaintext is let in (subject to authorization).
    pub fn allows_plaintext(self) -> bool {
        !matches!(self, PeerMode::Strict)
    }
}

impl std::fmt::Display for PeerMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PeerMode::Strict => "STRICT",
            PeerMode::Permissive => "PERMISSIVE",
            PeerMode::Disable => "DISABLE",
        })
    }
}

fn concrete(m: MtlsModeSpec) -> Option<PeerMode> {
    match m {
        MtlsModeSpec::Unset => None,
        MtlsModeSpec::Strict => Some(PeerMode::Strict),
        MtlsModeSpec::Permissive => Some(PeerMode::Permissive),
        MtlsModeSpec::Disable => Some(PeerMode::Disable),
    }
}

/// The effective mode of `port` of workload `w`, and the `namespace/name` of the policy that
/// set it (`None`: the default, PERMISSIVE). `policies` pairs each policy with its sequence
/// number (lower = older).
pub fn effective_mode<'a>(
    policies: impl IntoIterator<Item = (u64, &'a PeerAuthentication)>,
    w: Workload<'_>,
    port: u16,
) -> (PeerMode, Option<String>) {
    let mut mesh: Option<(u64, &PeerAuthentication)> = None;
    let mut namespace: Option<(u64, &PeerAuthentication)> = None;
    let mut workload: Option<(u64, &PeerAuthentication)> = None;
    let older = |slot: &mut Option<(u64, &'a PeerAuthentication)>,
                 cand: (u64, &'a PeerAuthentication)| {
        if slot.is_none_or(|(seq, _)| cand.0 < seq) {
            *slot = Some(cand);
        }
    };
    for (seq, p) in policies {
        let ns = p.metadata.namespace();
        let selector = p
            .spec
            .selector
            .as_ref()
            .filter(|s| !s.match_labels.is_empty());
        if let Some(sel) = selector {
            if ns == w.namespace && sel.matches(w.labels) {
                older(&mut workload, (seq, p));
            }
        } else if ns == w.namespace {
            older(&mut namespace, (seq, p));
        } else if ns == ROOT_NAMESPACE {
            older(&mut mesh, (seq, p));
        }
    }
    let id = |p: &PeerAuthentication| format!("{}/{}", p.metadata.namespace(), p.metadata.name);
    let mode_of = |p: &PeerAuthentication| concrete(p.spec.mtls.clone().unwrap_or_default().mode);
    let mut result = (PeerMode::Permissive, None);
    for (_, p) in [mesh, namespace].into_iter().flatten() {
        if let Some(m) = mode_of(p) {
            result = (m, Some(id(p)));
        }
    }
    if let Some((_, p)) = workload {
        if let Some(m) = mode_of(p) {
            result = (m, Some(id(p)));
        }
        if let Some(m) = p
            .spec
            .port_level_mtls
            .get(&port.to_string())
            .and_then(|m| concrete(m.mode))
        {
            result = (m, Some(id(p)));
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::policy::resource::{Resource, decode_documents};

    fn pa(yaml: &str) -> PeerAuthentication {
        let text = format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n{yaml}");
        match decode_documents("t", &text).unwrap().remove(0) {
            Resource::PeerAuthentication(p) => p,
            _ => unreachable!(),
        }
    }

    #[test]
    fn levels_inherit_and_override() {
        let labels: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
        let w = Workload {
            namespace: "shop",
            labels: &labels,
        };
        let mesh =
            pa("metadata: {name: m, namespace: causeway-system}\nspec: {mtls: {mode: STRICT}}\n");
        let ns_unset = pa("metadata: {name: n, namespace: shop}\nspec: {}\n");
        let ns_perm =
            pa("metadata: {name: n2, namespace: shop}\nspec: {mtls: {mode: PERMISSIVE}}\n");
        let wl = pa(
            "metadata: {name: w, namespace: shop}\nspec: {selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: DISABLE}, 9090: {mode: UNSET}}}\n",
        );
        let other_ns_wl = pa(
            "metadata: {name: o, namespace: other}\nspec: {selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}\n",
        );

        assert_eq!(effective_mode([], w, 80), (PeerMode::Permissive, None));
        assert_eq!(effective_mode([(1, &mesh)], w, 80).0, PeerMode::Strict);
        // UNSET at namespace level inherits the mesh's STRICT.
        assert_eq!(
            effective_mode([(1, &mesh), (2, &ns_unset)], w, 80),
            (PeerMode::Strict, Some("causeway-system/m".into()))
        );
        // The older of two namespace-level policies wins.
        assert_eq!(
            effective_mode([(1, &mesh), (3, &ns_perm), (2, &ns_unset)], w, 80).0,
            PeerMode::Strict
        );
        assert_eq!(
            effective_mode([(1, &mesh), (2, &ns_perm)], w, 80).0,
            PeerMode::Permissive
        );
        // Port-level exception; other ports and a port-level UNSET inherit.
        let all = [(1, &mesh), (2, &wl), (3, &other_ns_wl)];
        assert_eq!(
            effective_mode(all, w, 8080),
            (PeerMode::Disable, Some("shop/w".into()))
        );
        assert_eq!(effective_mode(all, w, 80).0, PeerMode::Strict);
        assert_eq!(effective_mode(all, w, 9090).0, PeerMode::Strict);
        assert!(!PeerMode::Strict.allows_plaintext());
    }
}
