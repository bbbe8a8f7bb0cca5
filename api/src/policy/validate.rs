//! Validation of decoded resources, following what Istio's validation accepts and refuses,
//! with every problem reported at once and each named by its field path.

use std::net::IpAddr;

use ipnet::IpNet;

use super::resource::{
    Action, AuthorizationPolicy, Condition, PeerAuthentication, RequestAuthentication, Resource,
};
use crate::identity::validate_label;

/// One problem: the field path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field path, e.g. `spec.rules[0].from[0].source.ipBlocks[1]`.
    pub path: String,
    /// What is wrong, naming the value and what is accepted.
    pub message: String,
}

fn problem(path: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        path: path.into(),
        message: message.into(),
    }
}

/// The `when` keys Causeway understands: (key or key prefix, takes an address/CIDR value,
/// needs HTTP).
pub(crate) const CONDITION_KEYS: &[(&str, ValueKind, bool)] = &[
    ("source.ip", ValueKind::Cidr, false),
    ("remote.ip", ValueKind::Cidr, false),
    ("source.namespace", ValueKind::Text, false),
    ("source.principal", ValueKind::Text, false),
    ("source.serviceAccount", ValueKind::Text, false),
    ("destination.ip", ValueKind::Cidr, false),
    ("destination.port", ValueKind::Port, false),
    ("connection.sni", ValueKind::Text, false),
    ("request.auth.principal", ValueKind::Text, true),
    ("request.auth.audiences", ValueKind::Text, true),
    ("request.auth.presenter", ValueKind::Text, true),
];

/// How a condition's values are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ValueKind {
    /// An address or CIDR.
    Cidr,
    /// A port number.
    Port,
    /// A string, with `*` prefix/suffix wildcards.
    Text,
}

/// What a `when` key refers to; `None` when Causeway does not know the key.
pub(crate) fn condition_key(key: &str) -> Option<(ValueKind, bool)> {
    if let Some((_, kind, http)) = CONDITION_KEYS.iter().find(|(k, _, _)| *k == key) {
        return Some((*kind, *http));
    }
    let bracketed = |prefix: &str| {
        key.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('['))
            .is_some_and(|rest| rest.ends_with(']') && rest.len() > 1)
    };
    if bracketed("request.headers") || bracketed("request.auth.claims") {
        return Some((ValueKind::Text, true));
    }
    None
}

/// Parses an address or CIDR as Istio accepts them (`10.0.0.1`, `10.0.0.0/8`, `::1`).
pub(crate) fn parse_cidr(text: &str) -> Option<IpNet> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Some(net);
    }
    text.parse::<IpAddr>().ok().map(IpNet::from)
}

/// Parses a port as Istio accepts it in `ports`/`destination.port`: a number 0..=65535.
pub(crate) fn parse_port(text: &str) -> Option<u16> {
    text.trim().parse().ok()
}

/// Validates any resource.
pub fn validate(resource: &Resource) -> Vec<Problem> {
    let mut out = validate_metadata(resource);
    match resource {
        Resource::AuthorizationPolicy(p) => out.extend(validate_authorization_policy(p)),
        Resource::PeerAuthentication(p) => out.extend(validate_peer_authentication(p)),
        Resource::RequestAuthentication(p) => out.extend(validate_request_authentication(p)),
    }
    out
}

fn validate_metadata(resource: &Resource) -> Vec<Problem> {
    let m = resource.metadata();
    let mut out = Vec::new();
    if let Err(e) = validate_label("name", &m.name) {
        out.push(problem("metadata.name", format!("{e}")));
    }
    if let Err(e) = validate_label("namespace", m.namespace()) {
        out.push(problem("metadata.namespace", format!("{e}")));
    }
    out
}

/// Validates an AuthorizationPolicy as Istio does.
pub fn validate_authorization_policy(p: &AuthorizationPolicy) -> Vec<Problem> {
    let mut out = Vec::new();
    let spec = &p.spec;
    if spec.target_ref.is_some() || spec.target_refs.is_some() {
        out.push(problem(
            if spec.target_ref.is_some() { "spec.targetRef" } else { "spec.targetRefs" },
            "targetRef attaches a policy to a gateway or waypoint, which a VM mesh does not have; select workloads with spec.selector.matchLabels",
        ));
    }
    match spec.action {
        Action::Custom => out.push(problem(
            "spec.action",
            "CUSTOM (an external authorizer) is not supported by Causeway; use ALLOW, DENY or AUDIT",
        )),
        _ if spec.provider.is_some() => out.push(problem(
            "spec.provider",
            format!("provider is only valid with action CUSTOM, not {}", spec.action),
        )),
        _ => {}
    }
    if let Some(sel) = &spec.selector {
        for (k, v) in &sel.match_labels {
            if k.is_empty() {
                out.push(problem(
                    "spec.selector.matchLabels",
                    "a label key must not be empty",
                ));
            }
            if v.contains('*') {
                out.push(problem(
                    format!("spec.selector.matchLabels.{k}"),
                    format!("{v:?}: wildcards are not allowed in label values"),
                ));
            }
        }
    }
    for (ri, rule) in spec.rules.iter().flatten().enumerate() {
        let rp = format!("spec.rules[{ri}]");
        if let Some(from) = &rule.from {
            if from.is_empty() {
                out.push(problem(
                    format!("{rp}.from"),
                    "`from` must not be empty when given; remove it to match any source",
                ));
            }
            for (fi, f) in from.iter().enumerate() {
                let fp = format!("{rp}.from[{fi}].source");
                let Some(s) = &f.source else {
                    out.push(problem(fp, "`source` must be given in each `from` entry"));
                    continue;
                };
                let lists: [(&str, &Vec<String>); 12] = [
                    ("principals", &s.principals),
                    ("notPrincipals", &s.not_principals),
                    ("requestPrincipals", &s.request_principals),
                    ("notRequestPrincipals", &s.not_request_principals),
                    ("namespaces", &s.namespaces),
                    ("notNamespaces", &s.not_namespaces),
                    ("serviceAccounts", &s.service_accounts),
                    ("notServiceAccounts", &s.not_service_accounts),
                    ("ipBlocks", &s.ip_blocks),
                    ("notIpBlocks", &s.not_ip_blocks),
                    ("remoteIpBlocks", &s.remote_ip_blocks),
                    ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                ];
                if lists.iter().all(|(_, l)| l.is_empty()) {
                    out.push(problem(fp.clone(), "`source` must set at least one field"));
                }
                for (name, list) in lists {
                    for (i, v) in list.iter().enumerate() {
                        let path = format!("{fp}.{name}[{i}]");
                        if v.is_empty() {
                            out.push(problem(path, "empty value; remove it or give a value"));
                        } else if name.to_ascii_lowercase().contains("ipblocks") {
                            if parse_cidr(v).is_none() {
                                out.push(problem(path, format!("{v:?} is not a CIDR or IP address (expected e.g. 10.0.0.0/8 or 10.1.2.3)")));
                            }
                        } else if name.to_ascii_lowercase().contains("serviceaccounts") {
                            if v.contains('*') || v.split('/').count() > 2 {
                                out.push(problem(path, format!("{v:?}: expected NAMESPACE/SERVICE_ACCOUNT or SERVICE_ACCOUNT, without wildcards")));
                            }
                        } else if let Some(m) = bad_wildcard(v) {
                            out.push(problem(path, m));
                        }
                    }
                }
                if !s.service_accounts.is_empty()
                    && (!s.principals.is_empty() || !s.not_principals.is_empty())
                {
                    out.push(problem(
                        fp,
                        "serviceAccounts cannot be combined with principals or notPrincipals",
                    ));
                }
            }
        }
        if let Some(to) = &rule.to {
            if to.is_empty() {
                out.push(problem(
                    format!("{rp}.to"),
                    "`to` must not be empty when given; remove it to match any operation",
                ));
            }
            for (ti, t) in to.iter().enumerate() {
                let tp = format!("{rp}.to[{ti}].operation");
                let Some(o) = &t.operation else {
                    out.push(problem(tp, "`operation` must be given in each `to` entry"));
                    continue;
                };
                let lists: [(&str, &Vec<String>); 8] = [
                    ("hosts", &o.hosts),
                    ("notHosts", &o.not_hosts),
                    ("ports", &o.ports),
                    ("notPorts", &o.not_ports),
                    ("methods", &o.methods),
                    ("notMethods", &o.not_methods),
                    ("paths", &o.paths),
                    ("notPaths", &o.not_paths),
                ];
                if lists.iter().all(|(_, l)| l.is_empty()) {
                    out.push(problem(
                        tp.clone(),
                        "`operation` must set at least one field",
                    ));
                }
                for (name, list) in lists {
                    for (i, v) in list.iter().enumerate() {
                        let path = format!("{tp}.{name}[{i}]");
                        if v.is_empty() {
                            out.push(problem(path, "empty value; remove it or give a value"));
                        } else if name.ends_with("orts") {
                            if parse_port(v).is_none() {
                                out.push(problem(
                                    path,
                                    format!("{v:?} is not a port number (0-65535)"),
                                ));
                            }
                        } else if name.ends_with("aths") {
                            if let Some(m) = bad_path(v) {
                                out.push(problem(path, m));
                            }
                        } else if let Some(m) = bad_wildcard(v) {
                            out.push(problem(path, m));
                        }
                    }
                }
            }
        }
        for (ci, c) in rule.when.iter().flatten().enumerate() {
            out.extend(validate_condition(&format!("{rp}.when[{ci}]"), c));
        }
    }
    out
}

fn validate_condition(path: &str, c: &Condition) -> Vec<Problem> {
    let mut out = Vec::new();
    if c.key.is_empty() {
        out.push(problem(
            format!("{path}.key"),
            "a condition needs a key, e.g. source.ip",
        ));
        return out;
    }
    let Some((kind, _)) = condition_key(&c.key) else {
        out.push(problem(
            format!("{path}.key"),
            format!(
                "unknown key {:?}; supported: source.ip, remote.ip, source.namespace, source.principal, source.serviceAccount, destination.ip, destination.port, connection.sni, request.headers[NAME], request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[NAME]",
                c.key
            ),
        ));
        return out;
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        out.push(problem(
            path.to_owned(),
            format!("condition on {:?} needs values or notValues", c.key),
        ));
    }
    for (field, list) in [("values", &c.values), ("notValues", &c.not_values)] {
        for (i, v) in list.iter().enumerate() {
            let p = format!("{path}.{field}[{i}]");
            match kind {
                ValueKind::Cidr if parse_cidr(v).is_none() => out.push(problem(
                    p,
                    format!("{v:?} is not a CIDR or IP address (expected e.g. 10.0.0.0/8)"),
                )),
                ValueKind::Port if parse_port(v).is_none() => {
                    out.push(problem(p, format!("{v:?} is not a port number (0-65535)")))
                }
                ValueKind::Text => {
                    if let Some(m) = bad_wildcard(v) {
                        out.push(problem(p, m));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// `*` is allowed alone, as a prefix or as a suffix (Istio's string match), not inside.
fn bad_wildcard(v: &str) -> Option<String> {
    if v == "*" {
        return None;
    }
    let inner = v.strip_prefix('*').unwrap_or(v);
    let inner = inner.strip_suffix('*').unwrap_or(inner);
    if inner.contains('*') || (v.starts_with('*') && v.ends_with('*') && v.len() > 1) {
        return Some(format!(
            "{v:?}: `*` is only allowed alone, at the start or at the end"
        ));
    }
    None
}

/// Paths: `*` prefix/suffix, or Istio's templates `{*}` (one segment) and `{**}` (the rest).
fn bad_path(v: &str) -> Option<String> {
    if v.contains('{') {
        if !v.starts_with('/') {
            return Some(format!("{v:?}: a path template must start with /"));
        }
        let segs: Vec<&str> = v.split('/').skip(1).collect();
        for (i, s) in segs.iter().enumerate() {
            match *s {
                "{*}" => {}
                "{**}" if i + 1 == segs.len() => {}
                "{**}" => return Some(format!("{v:?}: {{**}} may only be the last segment")),
                s if s.contains('{') || s.contains('}') || s.contains('*') => {
                    return Some(format!(
                        "{v:?}: a template segment must be exactly {{*}} or {{**}}"
                    ));
                }
                _ => {}
            }
        }
        return None;
    }
    bad_wildcard(v)
}

/// Validates a PeerAuthentication as Istio does.
pub fn validate_peer_authentication(p: &PeerAuthentication) -> Vec<Problem> {
    let mut out = Vec::new();
    let spec = &p.spec;
    if !spec.port_level_mtls.is_empty() {
        if spec
            .selector
            .as_ref()
            .is_none_or(|s| s.match_labels.is_empty())
        {
            out.push(problem(
                "spec.portLevelMtls",
                "portLevelMtls needs a workload selector (spec.selector.matchLabels), as in Istio",
            ));
        }
        for key in spec.port_level_mtls.keys() {
            if !matches!(key.parse::<u16>(), Ok(1..)) {
                out.push(problem(
                    format!("spec.portLevelMtls.{key}"),
                    format!("{key:?} is not a port number (1-65535)"),
                ));
            }
        }
    }
    if let Some(sel) = &spec.selector {
        for (k, v) in &sel.match_labels {
            if v.contains('*') {
                out.push(problem(
                    format!("spec.selector.matchLabels.{k}"),
                    format!("{v:?}: wildcards are not allowed in label values"),
                ));
            }
        }
    }
    out
}

/// Whether `name` is a valid HTTP header name (an RFC 9110 token).
fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Validates a RequestAuthentication as Istio does, plus what Causeway needs to fetch keys:
/// each rule has an issuer, exactly one of an `https://` `jwksUri` and an inline `jwks`
/// that parses, valid header names, and no issuer twice.
pub fn validate_request_authentication(p: &RequestAuthentication) -> Vec<Problem> {
    let mut out = Vec::new();
    let spec = &p.spec;
    if spec.target_ref.is_some() || spec.target_refs.is_some() {
        out.push(problem(
            if spec.target_ref.is_some() { "spec.targetRef" } else { "spec.targetRefs" },
            "targetRef attaches a policy to a gateway or waypoint, which a VM mesh does not have; select workloads with spec.selector.matchLabels",
        ));
    }
    if let Some(sel) = &spec.selector {
        for (k, v) in &sel.match_labels {
            if k.is_empty() {
                out.push(problem(
                    "spec.selector.matchLabels",
                    "a label key must not be empty",
                ));
            }
            if v.contains('*') {
                out.push(problem(
                    format!("spec.selector.matchLabels.{k}"),
                    format!("{v:?}: wildcards are not allowed in label values"),
                ));
            }
        }
    }
    let mut issuers = std::collections::BTreeSet::new();
    for (i, rule) in spec.jwt_rules.iter().enumerate() {
        let rp = format!("spec.jwtRules[{i}]");
        if rule.issuer.trim().is_empty() {
            out.push(problem(
                format!("{rp}.issuer"),
                "missing; give the `iss` value the tokens carry (e.g. https://accounts.example.com)",
            ));
        } else if !issuers.insert(rule.issuer.as_str()) {
            out.push(problem(
                format!("{rp}.issuer"),
                format!(
                    "issuer {:?} appears in more than one rule; merge the rules",
                    rule.issuer
                ),
            ));
        }
        for (ai, a) in rule.audiences.iter().enumerate() {
            if a.is_empty() {
                out.push(problem(
                    format!("{rp}.audiences[{ai}]"),
                    "empty audience; remove it or give a value",
                ));
            }
        }
        match (&rule.jwks_uri, &rule.jwks) {
            (Some(_), Some(_)) => out.push(problem(
                format!("{rp}.jwks"),
                "give either jwksUri or jwks, not both",
            )),
            (None, None) => out.push(problem(
                format!("{rp}.jwksUri"),
                "missing; give the issuer's key set as jwksUri (an https:// URL) or inline as jwks",
            )),
            (Some(uri), None) => {
                let host = uri
                    .strip_prefix("https://")
                    .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or(""));
                match host {
                    None => out.push(problem(
                        format!("{rp}.jwksUri"),
                        format!("{uri:?} is not an https:// URL; keys are only fetched over verified HTTPS"),
                    )),
                    Some(h) if h.is_empty() || h.starts_with(':') || uri.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                        out.push(problem(
                            format!("{rp}.jwksUri"),
                            format!("{uri:?} is not a valid URL (expected https://HOST[:PORT]/PATH)"),
                        ))
                    }
                    Some(_) => {}
                }
            }
            (None, Some(jwks)) => {
                if let Err(e) = super::jwt::KeySet::from_json(jwks) {
                    out.push(problem(format!("{rp}.jwks"), e));
                } else if let Ok(set) = super::jwt::KeySet::from_json(jwks) {
                    for s in set.skipped() {
                        out.push(problem(format!("{rp}.jwks"), s.clone()));
                    }
                }
            }
        }
        for (hi, h) in rule.from_headers.iter().enumerate() {
            if !valid_header_name(&h.name) {
                out.push(problem(
                    format!("{rp}.fromHeaders[{hi}].name"),
                    format!("{:?} is not a valid HTTP header name", h.name),
                ));
            }
        }
        for (pi, v) in rule.from_params.iter().enumerate() {
            if v.is_empty() {
                out.push(problem(
                    format!("{rp}.fromParams[{pi}]"),
                    "empty parameter name",
                ));
            }
        }
        for (ci, v) in rule.from_cookies.iter().enumerate() {
            if v.is_empty() || !valid_header_name(v) {
                out.push(problem(
                    format!("{rp}.fromCookies[{ci}]"),
                    format!("{v:?} is not a valid cookie name"),
                ));
            }
        }
        if let Some(h) = &rule.output_payload_to_header
            && !valid_header_name(h)
        {
            out.push(problem(
                format!("{rp}.outputPayloadToHeader"),
                format!("{h:?} is not a valid HTTP header name"),
            ));
        }
        for (oi, o) in rule.output_claim_to_headers.iter().enumerate() {
            if !valid_header_name(&o.header) {
                out.push(problem(
                    format!("{rp}.outputClaimToHeaders[{oi}].header"),
                    format!("{:?} is not a valid HTTP header name", o.header),
                ));
            }
            if o.claim.is_empty() {
                out.push(problem(
                    format!("{rp}.outputClaimToHeaders[{oi}].claim"),
                    "missing; name the claim to copy (e.g. sub)",
                ));
            }
        }
        if let Some(t) = &rule.timeout
            && humantime::parse_duration(t).is_err()
        {
            out.push(problem(
                format!("{rp}.timeout"),
                format!("{t:?} is not a duration (e.g. 5s)"),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::resource::decode_documents;

    fn problems(yaml: &str) -> Vec<String> {
        let docs = decode_documents("t", yaml).expect("decodes");
        docs.iter()
            .flat_map(validate)
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    const HEAD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\n";

    #[test]
    fn valid_policies_pass() {
        for spec in [
            "spec: {}",
            "spec: {action: DENY, rules: [{}]}",
            "spec:\n  rules:\n  - from:\n    - source: {principals: ['*'], ipBlocks: ['10.0.0.0/8', '10.1.2.3', '::1']}\n    to:\n    - operation: {ports: ['80'], paths: ['/api/*', '*.html', '/v1/{*}/x/{**}'], hosts: ['*.example.com']}\n    when:\n    - key: request.headers[x-user]\n      values: ['alice']\n    - key: destination.port\n      notValues: ['22']",
        ] {
            assert!(
                problems(&format!("{HEAD}{spec}\n")).is_empty(),
                "{spec}: {:?}",
                problems(&format!("{HEAD}{spec}\n"))
            );
        }
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let cases = [
            (
                "spec: {rules: [{from: [{source: {ipBlocks: ['10.0.0.0/8', '10.0.0/8']}}]}]}",
                "spec.rules[0].from[0].source.ipBlocks[1]: \"10.0.0/8\" is not a CIDR",
            ),
            (
                "spec: {rules: [{from: []}]}",
                "spec.rules[0].from: `from` must not be empty",
            ),
            (
                "spec: {rules: [{from: [{}]}]}",
                "spec.rules[0].from[0].source: `source` must be given",
            ),
            (
                "spec: {rules: [{from: [{source: {}}]}]}",
                "spec.rules[0].from[0].source: `source` must set at least one field",
            ),
            (
                "spec: {rules: [{to: [{operation: {ports: ['http']}}]}]}",
                "spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port",
            ),
            (
                "spec: {rules: [{to: [{operation: {}}]}]}",
                "`operation` must set at least one field",
            ),
            (
                "spec: {rules: [{when: [{key: source.ip}]}]}",
                "needs values or notValues",
            ),
            (
                "spec: {rules: [{when: [{key: request.foo, values: [a]}]}]}",
                "unknown key \"request.foo\"",
            ),
            (
                "spec: {rules: [{when: [{key: source.ip, values: [nope]}]}]}",
                "spec.rules[0].when[0].values[0]: \"nope\" is not a CIDR",
            ),
            (
                "spec: {action: CUSTOM, provider: {name: x}}",
                "spec.action: CUSTOM",
            ),
            ("spec: {action: DENY, provider: {name: x}}", "spec.provider"),
            (
                "spec: {rules: [{from: [{source: {principals: ['a*b']}}]}]}",
                "`*` is only allowed",
            ),
            (
                "spec: {targetRefs: [{kind: Gateway, name: g}]}",
                "spec.targetRefs",
            ),
            (
                "spec: {rules: [{to: [{operation: {paths: ['/a/{**}/b']}}]}]}",
                "{**} may only be the last",
            ),
        ];
        for (spec, want) in cases {
            let got = problems(&format!("{HEAD}{spec}\n"));
            assert!(
                got.iter().any(|g| g.contains(want)),
                "{spec}: want {want:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn request_authentication_rules() {
        let ra = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\n";
        let ed = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"ed","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
        for spec in [
            "spec: {}".to_owned(),
            "spec: {jwtRules: [{issuer: a, jwksUri: 'https://idp.example:8443/jwks'}]}".to_owned(),
            format!(
                "spec: {{jwtRules: [{{issuer: a, jwks: '{ed}', fromHeaders: [{{name: x-jwt}}], fromCookies: [s], outputClaimToHeaders: [{{header: x-sub, claim: sub}}], timeout: 5s}}]}}"
            ),
        ] {
            let got = problems(&format!("{ra}{spec}\n"));
            assert!(got.is_empty(), "{spec}: {got:?}");
        }
        let cases = [
            (
                "spec: {jwtRules: [{jwksUri: 'https://x/j'}]}",
                "spec.jwtRules[0].issuer: missing",
            ),
            (
                "spec: {jwtRules: [{issuer: a}]}",
                "spec.jwtRules[0].jwksUri: missing",
            ),
            (
                "spec: {jwtRules: [{issuer: a, jwksUri: 'http://x/j'}]}",
                "spec.jwtRules[0].jwksUri: \"http://x/j\" is not an https:// URL",
            ),
            (
                "spec: {jwtRules: [{issuer: a, jwksUri: 'https:///j'}]}",
                "is not a valid URL",
            ),
            (
                "spec: {jwtRules: [{issuer: a, jwksUri: 'https://x/j', jwks: '{}'}]}",
                "spec.jwtRules[0].jwks: give either jwksUri or jwks, not both",
            ),
            (
                "spec: {jwtRules: [{issuer: a, jwks: 'nope'}]}",
                "spec.jwtRules[0].jwks: the key set is not JSON",
            ),
            (
                "spec: {jwtRules: [{issuer: a, jwksUri: 'https://x/j'}, {issuer: a, jwksUri: 'https://y/j'}]}",
                "spec.jwtRules[1].issuer: issuer \"a\" appears in more than one rule",
            ),
            (
                "spec: {jwtRules: [{issuer: a, jwksUri: 'https://x/j', fromHeaders: [{name: 'bad header'}]}]}",
                "spec.jwtRules[0].fromHeaders[0].name: \"bad header\" is not a valid HTTP header name",
            ),
            (
                "spec: {jwtRules: [{issuer: a, jwksUri: 'https://x/j', outputPayloadToHeader: 'a:b'}]}",
                "spec.jwtRules[0].outputPayloadToHeader",
            ),
            (
                "spec: {jwtRules: [{issuer: a, jwksUri: 'https://x/j', outputClaimToHeaders: [{header: x}]}]}",
                "spec.jwtRules[0].outputClaimToHeaders[0].claim: missing",
            ),
            (
                "spec: {jwtRules: [{issuer: a, jwksUri: 'https://x/j', timeout: soon}]}",
                "spec.jwtRules[0].timeout",
            ),
            (
                "spec: {targetRef: {kind: Gateway, name: g}}",
                "spec.targetRef",
            ),
        ];
        for (spec, want) in cases {
            let got = problems(&format!("{ra}{spec}\n"));
            assert!(
                got.iter().any(|g| g.contains(want)),
                "{spec}: want {want:?}, got {got:?}"
            );
        }
        // Every problem at once.
        let got = problems(&format!(
            "{ra}spec: {{jwtRules: [{{jwksUri: 'http://x'}}, {{issuer: b}}]}}\n"
        ));
        assert_eq!(got.len(), 3, "{got:?}");
    }

    #[test]
    fn peer_authentication_rules() {
        let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: shop}\n";
        assert!(problems(&format!("{pa}spec: {{mtls: {{mode: STRICT}}}}\n")).is_empty());
        let got = problems(&format!(
            "{pa}spec: {{portLevelMtls: {{8080: {{mode: DISABLE}}}}}}\n"
        ));
        assert!(
            got.iter().any(|g| g.contains("needs a workload selector")),
            "{got:?}"
        );
        let got = problems(&format!(
            "{pa}spec: {{selector: {{matchLabels: {{a: b}}}}, portLevelMtls: {{0: {{mode: DISABLE}}}}}}\n"
        ));
        assert!(
            got.iter().any(|g| g.contains("spec.portLevelMtls.0")),
            "{got:?}"
        );
    }
}
