//! Admin API for policy resources (`/v1/policies`) and `why` (`/v1/why`).
//!
//! Apply validates every resource of a request and applies nothing when one is invalid;
//! the change is one mesh version, pushed to agents like a registry change. `why` evaluates
//! with the controller's current view (registry, agents, policies) and the same evaluator
//! the agents enforce with.

use std::collections::BTreeMap;
use std::net::IpAddr;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use causeway_api::policy::api::{
    ApplyRequest, ApplyResponse, ApplyResult, DeleteRequest, DeleteResponse, PolicyItem,
    WhyRequest, WhyResponse, WhyStep,
};
use causeway_api::policy::jwt;
use causeway_api::policy::validate::validate;
use causeway_api::policy::{
    HttpAttributes, JwtRule, Kind, PolicySet, Request, Resource, Workload, effective_mode,
};
use serde::Deserialize;

use crate::admin::{AdminState, ApiError};
use crate::mesh::{EndpointView, PolicyOutcome, ServiceView};

/// The workload-level PeerAuthentication that `group create --mtls MODE` stands for:
/// `group-<name>` in the group's namespace, selecting `causeway.io/group: <name>`.
pub fn group_peer_authentication(group: &causeway_api::WorkloadGroup) -> Resource {
    let mode = match group.mtls {
        causeway_api::MtlsMode::Strict => "STRICT",
        causeway_api::MtlsMode::Permissive => "PERMISSIVE",
    };
    let value = serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {
            "name": format!("group-{}", group.name),
            "namespace": group.namespace,
            "annotations": {"causeway.io/written-by": "causewayctl group create --mtls"},
        },
        "spec": {
            "selector": {"matchLabels": {causeway_api::policy::GROUP_LABEL: group.name}},
            "mtls": {"mode": mode},
        },
    });
    causeway_api::policy::resource::decode_value(value)
        .expect("the group's PeerAuthentication is well formed")
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}

/// `POST /v1/policies/apply`.
pub(crate) async fn apply(
    State(s): State<AdminState>,
    Json(body): Json<ApplyRequest>,
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
    let names: Vec<String> = body.resources.iter().map(Resource::display_name).collect();
    let dry_run = body.dry_run;
    let applied = s.mesh.apply_policies(body.resources, dry_run).await?;
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

/// Query of `GET /v1/policies`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    /// A kind as the CLI accepts it (`ap`, `AuthorizationPolicy`, …).
    kind: Option<String>,
    /// Only this namespace.
    namespace: Option<String>,
    /// Only this name.
    name: Option<String>,
}

/// `GET /v1/policies`.
pub(crate) async fn list(
    State(s): State<AdminState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<PolicyItem>>, ApiError> {
    let kind = match q.kind.as_deref() {
        None => None,
        Some(k) => Some(Kind::from_cli(k).ok_or_else(|| {
            bad(format!(
                "unknown kind {k:?}: expected authorizationpolicies (ap), peerauthentications (pa) or requestauthentications (ra)"
            ))
        })?),
    };
    let items = s
        .mesh
        .policies()
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
        .map(|(key, r)| PolicyItem {
            key,
            seq: r.seq,
            version: r.version,
            resource: r.resource,
        })
        .collect();
    Ok(Json(items))
}

/// `POST /v1/policies/delete`.
pub(crate) async fn delete(
    State(s): State<AdminState>,
    Json(body): Json<DeleteRequest>,
) -> Result<Json<DeleteResponse>, ApiError> {
    if body.keys.is_empty() {
        return Err(bad("no resources named: give keys Kind/namespace/name"));
    }
    let version = s.mesh.delete_policies(&body.keys).await?;
    s.store.flush()?;
    Ok(Json(DeleteResponse {
        version,
        deleted: body.keys,
    }))
}

/// The source of a `why` question.
struct Source {
    principal: Option<String>,
    ip: Option<IpAddr>,
    detail: String,
}

fn resolve_source(s: &AdminState, from: &str) -> Result<Source, ApiError> {
    let td = s.ca.trust_domain().to_string();
    let agents = s.store.agents()?;
    let live = |a: &&crate::store::AgentRecord| a.removed_at.is_none();
    let principal_of = |spiffe: &str| {
        spiffe
            .strip_prefix("spiffe://")
            .unwrap_or(spiffe)
            .to_owned()
    };
    if let Ok(ip) = from.parse::<IpAddr>() {
        return Ok(match agents.iter().filter(live).find(|a| a.address == ip) {
            Some(a) => Source {
                principal: Some(principal_of(&a.spiffe_id)),
                ip: Some(ip),
                detail: format!(
                    "{ip} is agent {} ({}): mutual TLS as {}",
                    a.id, a.group, a.spiffe_id
                ),
            },
            None => Source {
                principal: None,
                ip: Some(ip),
                detail: format!("{ip} runs no agent: plaintext, no principal"),
            },
        });
    }
    if let Some(g) = s.store.group(from)? {
        let principal = format!(
            "{td}/ns/{}/sa/{}",
            g.group.namespace, g.group.service_account
        );
        let agent = agents.iter().filter(live).find(|a| a.group == from);
        return Ok(Source {
            detail: format!(
                "group {from}: mutual TLS as spiffe://{principal}{}",
                agent.map_or_else(
                    || " (no agent joined yet; ip rules are evaluated without an address)"
                        .to_owned(),
                    |a| format!(", from {} (agent {})", a.address, a.id)
                )
            ),
            principal: Some(principal),
            ip: agent.map(|a| a.address),
        });
    }
    if let Some(a) = agents.iter().find(|a| a.id == from) {
        if a.removed_at.is_some() {
            return Err(bad(format!(
                "agent {from} was removed: its certificates are denied, so it cannot connect at all"
            )));
        }
        return Ok(Source {
            principal: Some(principal_of(&a.spiffe_id)),
            ip: Some(a.address),
            detail: format!(
                "agent {from} ({}): mutual TLS as {}, from {}",
                a.group, a.spiffe_id, a.address
            ),
        });
    }
    Err(bad(format!(
        "--from {from:?} is not a group, an agent id or an IP address (see `causewayctl group list` and `agent list`)"
    )))
}

/// Splits `host[:port]` (also `[v6]:port` and a bare IPv6 address).
fn split_port(to: &str) -> Result<(&str, Option<u16>), ApiError> {
    if to.parse::<IpAddr>().is_ok() {
        return Ok((to, None));
    }
    if let Some(rest) = to.strip_prefix('[') {
        let (host, port) = rest
            .split_once("]:")
            .ok_or_else(|| bad(format!("--to {to:?}: expected [IPv6]:PORT")))?;
        let port = port
            .parse()
            .map_err(|_| bad(format!("--to {to:?}: port {port:?} is not 1-65535")))?;
        return Ok((host, Some(port)));
    }
    match to.rsplit_once(':') {
        Some((host, port)) => {
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(format!("--to {to:?}: port {port:?} is not 1-65535")))?;
            Ok((host, Some(port)))
        }
        None => Ok((to, None)),
    }
}

fn resolve_service<'a>(
    services: &'a [ServiceView],
    host: &str,
) -> Result<&'a ServiceView, ApiError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return services
            .iter()
            .find(|s| s.vip.map(IpAddr::V4) == Some(ip))
            .or_else(|| {
                services
                    .iter()
                    .find(|s| s.endpoints.iter().any(|e| e.address.parse::<IpAddr>().ok() == Some(ip)))
            })
            .ok_or_else(|| bad(format!("--to {host}: no service has this VIP or endpoint address (see `causewayctl registry list`)")));
    }
    let host = host.trim_end_matches('.');
    let mut labels = host.split('.');
    let name = labels.next().unwrap_or_default();
    let namespace = labels.next();
    let found: Vec<&ServiceView> = services
        .iter()
        .filter(|s| s.name == name && namespace.is_none_or(|ns| s.namespace == ns))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(bad(format!(
            "--to {host}: no service {name}{} in the registry (see `causewayctl registry list`)",
            namespace
                .map(|n| format!(" in namespace {n}"))
                .unwrap_or_default()
        ))),
        many => Err(bad(format!(
            "--to {host}: {} services are named {name} ({}); write NAME.NAMESPACE",
            many.len(),
            many.iter()
                .map(|s| format!("{}.{}", s.name, s.namespace))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn workload_namespace(e: &EndpointView) -> Option<String> {
    let id = e.identity.as_deref()?;
    let rest = &id[id.find("/ns/")? + 4..];
    Some(rest.split('/').next()?.to_owned())
}

/// `POST /v1/why`.
pub(crate) async fn why(
    State(s): State<AdminState>,
    Json(q): Json<WhyRequest>,
) -> Result<Json<WhyResponse>, ApiError> {
    let source = resolve_source(&s, &q.from)?;
    let (host, port) = split_port(&q.to)?;
    let services = s.mesh.services();
    let svc = resolve_service(&services, host)?;
    let routing = route_why(&s, &source, svc, &services, host, port, &q)?;
    let mut steps = vec![WhyStep {
        step: "source".into(),
        policy: None,
        matched: None,
        detail: source.detail.clone(),
    }];
    let workloads: Vec<&EndpointView> = svc
        .endpoints
        .iter()
        .filter(|e| e.identity.is_some())
        .collect();
    let Some(dest) = workloads.first() else {
        steps.push(WhyStep {
            step: "destination".into(),
            policy: None,
            matched: None,
            detail: format!(
                "service {}.{} has no endpoint run by an agent: no agent enforces policy for it, so the connection is not checked",
                svc.name, svc.namespace
            ),
        });
        return Ok(Json(WhyResponse {
            decision: "allow".into(),
            policy: None,
            steps,
            recent_denials: Vec::new(),
            routing,
        }));
    };
    let port = match port {
        Some(p) => p,
        None => match dest.ports.values().next() {
            Some(p) if dest.ports.len() == 1 => *p,
            _ => {
                return Err(bad(format!(
                    "--to {}: the service has ports {:?}; give one as NAME:PORT",
                    q.to, dest.ports
                )));
            }
        },
    };
    let ns = workload_namespace(dest).unwrap_or_else(|| svc.namespace.clone());
    // What the destination agents really refused from this source lately.
    let sessions = s.mesh.sessions();
    let source_spiffe = source.principal.as_ref().map(|p| format!("spiffe://{p}"));
    let source_ip = source.ip.map(|ip| ip.to_string());
    let recent_denials: Vec<causeway_api::push::Denial> = workloads
        .iter()
        .filter_map(|w| w.agent.as_ref().and_then(|a| sessions.get(a)))
        .flat_map(|v| v.recent_denials.iter())
        .filter(|d| {
            source_spiffe.as_deref() == Some(d.source_principal.as_str())
                || (d.source_principal.is_empty()
                    && source_ip.as_deref() == Some(d.source_address.as_str()))
        })
        .rev()
        .take(10)
        .cloned()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    steps.push(WhyStep {
        step: "destination".into(),
        policy: None,
        matched: None,
        detail: format!(
            "service {}.{} port {port}: workload {} in namespace {ns} (agent {}), labels {:?}{}",
            svc.name,
            svc.namespace,
            dest.address,
            dest.agent.as_deref().unwrap_or("-"),
            dest.labels,
            if workloads.len() > 1 {
                format!("; {} more workloads of this service are evaluated the same way when their labels match", workloads.len() - 1)
            } else {
                String::new()
            }
        ),
    });
    let stored = s.mesh.policies();
    let aps: Vec<_> = stored
        .values()
        .filter_map(|r| match &r.resource {
            Resource::AuthorizationPolicy(p) => Some(p),
            _ => None,
        })
        .collect();
    let pas = stored.values().filter_map(|r| match &r.resource {
        Resource::PeerAuthentication(p) => Some((r.seq, p)),
        _ => None,
    });
    let labels: BTreeMap<String, String> = dest.labels.clone();
    let workload = Workload {
        namespace: &ns,
        labels: &labels,
    };
    let (mode, mode_policy) = effective_mode(pas, workload, port);
    steps.push(WhyStep {
        step: "peer-authentication".into(),
        policy: mode_policy.clone(),
        matched: None,
        detail: format!(
            "mTLS mode {mode} on port {port} ({})",
            mode_policy.as_deref().map_or(
                "default: no PeerAuthentication applies".to_owned(),
                |p| format!("from PeerAuthentication {p}")
            )
        ),
    });
    if source.principal.is_none() && !mode.allows_plaintext() {
        steps.push(WhyStep {
            step: "decision".into(),
            policy: mode_policy.clone(),
            matched: None,
            detail: "deny: plaintext is refused in STRICT mode".into(),
        });
        return Ok(Json(WhyResponse {
            decision: "deny".into(),
            policy: mode_policy,
            steps,
            recent_denials,
            routing,
        }));
    }
    let set = PolicySet::new(aps.iter().copied());
    let selected = set.for_workload(workload);
    let dest_ip = dest
        .address
        .parse::<IpAddr>()
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let headers: Vec<(String, String)> = q
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    // The destination agent decides each request of an HTTP port with its attributes
    // (GET / unless told); other ports connection by connection, unless the question
    // gives request attributes.
    let http_port = dest
        .ports
        .iter()
        .find(|(_, p)| **p == port)
        .is_some_and(|(name, _)| causeway_api::protocol::Protocol::from_port_name(name).is_http());
    let asks_http = q.method.is_some()
        || q.path.is_some()
        || !q.headers.is_empty()
        || q.jwt.is_some()
        || !q.claims.is_empty();
    if http_port || asks_http {
        steps.push(WhyStep {
            step: "request".into(),
            policy: None,
            matched: None,
            detail: format!(
                "{} {} (host {host}){}",
                q.method.as_deref().unwrap_or("GET"),
                q.path.as_deref().unwrap_or("/"),
                if http_port {
                    ": the port is HTTP, so the destination's agent decides each request"
                } else {
                    ": the port is not declared HTTP; its agent decides connections (Istio's TCP rules), these attributes show what an HTTP port would do"
                }
            ),
        });
    }
    let ras = stored.values().filter_map(|r| match &r.resource {
        Resource::RequestAuthentication(p) => Some(p),
        _ => None,
    });
    let rules = jwt::rules_for(ras, workload);
    let auth = match request_authentication(&rules, &q, &mut steps) {
        Ok(a) => a,
        Err(policy) => {
            steps.push(WhyStep {
                step: "decision".into(),
                policy: policy.clone(),
                matched: None,
                detail: "deny: the request is answered 401 (invalid token) before any AuthorizationPolicy".into(),
            });
            return Ok(Json(WhyResponse {
                decision: "deny".into(),
                policy,
                steps,
                recent_denials,
                routing,
            }));
        }
    };
    let http = (http_port || asks_http).then(|| HttpAttributes {
        host,
        method: q.method.as_deref().unwrap_or("GET"),
        path: q.path.as_deref().unwrap_or("/"),
        headers: &headers,
        request_principal: auth
            .as_ref()
            .map(|a| a.request_principal.as_str())
            .filter(|p| !p.is_empty()),
        claims: auth.as_ref().map(|a| &a.claims),
    });
    let req = Request {
        principal: source.principal.as_deref(),
        source_ip: source.ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
        remote_ip: None,
        destination_ip: dest_ip,
        destination_port: port,
        sni: None,
        http,
    };
    let d = selected.explain(&req);
    if d.steps.is_empty() {
        steps.push(WhyStep {
            step: "policy".into(),
            policy: None,
            matched: None,
            detail: "no AuthorizationPolicy selects the destination".into(),
        });
    }
    for st in &d.steps {
        steps.push(WhyStep {
            step: "policy".into(),
            policy: Some(st.policy.clone()),
            matched: Some(st.matched),
            detail: format!("{} {}: {}", st.action, st.policy, st.reason),
        });
    }
    steps.push(WhyStep {
        step: "decision".into(),
        policy: d.policy.clone(),
        matched: None,
        detail: format!("{}: {}", d.decision, d.reason),
    });
    Ok(Json(WhyResponse {
        decision: d.decision,
        policy: d.policy,
        steps,
        recent_denials,
        routing,
    }))
}

/// The routing part of `why`: how the source's agent routes the request (HTTP port, or
/// request attributes given) or the connection; `None` when the port is not given and
/// the service has several.
fn route_why(
    s: &AdminState,
    source: &Source,
    svc: &ServiceView,
    services: &[ServiceView],
    host: &str,
    port: Option<u16>,
    q: &WhyRequest,
) -> Result<Option<causeway_api::route::why::RouteWhy>, ApiError> {
    use causeway_api::route::matcher::RequestAttrs;
    let port = match port {
        Some(p) => p,
        None => {
            let ports: std::collections::BTreeSet<u16> = svc
                .endpoints
                .iter()
                .flat_map(|e| e.ports.values().copied())
                .collect();
            match ports.iter().next() {
                Some(p) if ports.len() == 1 => *p,
                _ => return Ok(None),
            }
        }
    };
    // The source workload as its agent sees itself: the labels of the endpoints at its
    // address, the namespace of their identity (else of its principal).
    let mut labels = BTreeMap::new();
    let mut namespace = None;
    if let Some(ip) = source.ip.map(|ip| ip.to_string()) {
        for e in services.iter().flat_map(|s| s.endpoints.iter()) {
            if e.address == ip {
                labels.extend(e.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
                if e.identity.is_some() {
                    namespace = workload_namespace(e);
                }
            }
        }
    }
    if namespace.is_none() {
        namespace = source
            .principal
            .as_deref()
            .and_then(|p| p.split("/ns/").nth(1))
            .and_then(|r| r.split('/').next())
            .map(str::to_owned);
    }
    let http_port = svc.endpoints.iter().any(|e| {
        e.ports.iter().any(|(name, p)| {
            *p == port && causeway_api::protocol::Protocol::from_port_name(name).is_http()
        })
    });
    let asks_http = q.method.is_some() || q.path.is_some() || !q.headers.is_empty();
    let mut headers = http::HeaderMap::new();
    for (k, v) in &q.headers {
        let name = http::header::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
            .map_err(|_| bad(format!("--header {k}={v}: {k:?} is not a header name")))?;
        let value = http::HeaderValue::from_str(v)
            .map_err(|_| bad(format!("--header {k}={v}: {v:?} is not a header value")))?;
        headers.append(name, value);
    }
    let target = q.path.as_deref().unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let authority = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(host)
        .to_owned();
    let stored = s.mesh.routes();
    let routes: Vec<(u64, &causeway_api::route::RouteResource)> =
        stored.values().map(|r| (r.seq, &r.resource)).collect();
    let service = format!("{}/{}", svc.namespace, svc.name);
    Ok(Some(causeway_api::route::why::explain(
        &causeway_api::route::why::WhyInput {
            routes: &routes,
            services,
            service: &service,
            source_labels: &labels,
            source_namespace: namespace.as_ref(),
            port,
            http: (http_port || asks_http).then_some(RequestAttrs {
                path,
                query,
                method: q.method.as_deref().unwrap_or("GET"),
                authority: &authority,
                headers: &headers,
                port,
            }),
        },
    )))
}

/// The RequestAuthentication step of `why`: checks `--jwt` against the rules that select
/// the destination (with an inline key set fully; with a `jwksUri` the controller does not
/// fetch the keys, so the signature is not checked and the claims are decoded) and adds
/// `--claim`s. `Ok(None)`: no token (left to authorization). `Err(policy)`: the agent
/// would answer 401 (the step says why; the policy is the RequestAuthentication's).
fn request_authentication(
    rules: &[(String, JwtRule)],
    q: &WhyRequest,
    steps: &mut Vec<WhyStep>,
) -> Result<Option<jwt::Authenticated>, Option<String>> {
    let mut step = |policy: Option<String>, detail: String| {
        steps.push(WhyStep {
            step: "request-authentication".into(),
            policy,
            matched: None,
            detail,
        })
    };
    let extra = jwt::claims_from_pairs(&q.claims);
    let Some(token) = q.jwt.as_deref() else {
        if q.claims.is_empty() {
            if !rules.is_empty() {
                step(
                    Some(rules[0].0.clone()),
                    "no token (give one with --jwt or --claim): the request passes authentication without a request principal, and the policies decide".into(),
                );
            }
            return Ok(None);
        }
        let a = jwt::from_claims(extra);
        step(
            None,
            format!(
                "claims from --claim taken as a valid token's: {}; request principal {}",
                a.claims,
                if a.request_principal.is_empty() {
                    "none (give --claim iss=... and --claim sub=... for one)".to_owned()
                } else {
                    a.request_principal.clone()
                }
            ),
        );
        return Ok(Some(a));
    };
    if rules.is_empty() {
        step(
            None,
            "no RequestAuthentication selects the destination: the token is not validated and gives no request principal".into(),
        );
        return Ok(None);
    }
    let just_rules: Vec<JwtRule> = rules.iter().map(|(_, r)| r.clone()).collect();
    let refuse = |idx: Option<usize>, e: &dyn std::fmt::Display| {
        (
            idx.map(|i| rules[i].0.clone()),
            format!("401: the destination's agent refuses this token: {e}"),
        )
    };
    let idx = match jwt::rule_for(&just_rules, token) {
        Ok(i) => i,
        Err(e) => {
            let (policy, detail) = refuse(None, &e);
            let policy = policy.or_else(|| Some(rules[0].0.clone()));
            step(policy.clone(), detail);
            return Err(policy);
        }
    };
    let (ra, rule) = &rules[idx];
    let checked = match (&rule.jwks, &rule.jwks_uri) {
        (Some(inline), _) => match jwt::KeySet::from_json(inline) {
            Ok(set) => jwt::verify(&just_rules, token, |i| (i == idx).then_some(&set))
                .map(|a| (a, "signature and times checked with the inline jwks".to_owned())),
            Err(e) => Err(jwt::JwtError::Invalid(format!("the inline jwks is unusable: {e}"))),
        },
        (None, uri) => jwt::decode_unverified(&just_rules, token).and_then(|a| {
            match jwt::time_problem(&a.claims) {
                Some(p) => Err(jwt::JwtError::Invalid(p)),
                None => Ok((
                    a,
                    format!(
                        "signature NOT checked: the keys are at {} and only the agents fetch them; claims decoded, times checked",
                        uri.as_deref().unwrap_or("-")
                    ),
                )),
            }
        }),
    };
    match checked {
        Ok((mut a, how)) => {
            if let (serde_json::Value::Object(c), serde_json::Value::Object(more)) =
                (&mut a.claims, extra)
            {
                c.extend(more);
            }
            step(
                Some(ra.clone()),
                format!(
                    "token of issuer {} ({how}): request principal {}",
                    rule.issuer, a.request_principal
                ),
            );
            Ok(Some(a))
        }
        Err(e) => {
            let (policy, detail) = refuse(Some(idx), &e);
            step(policy.clone(), detail);
            Err(policy)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_port_forms() {
        assert_eq!(split_port("web").unwrap(), ("web", None));
        assert_eq!(
            split_port("web.shop:8080").unwrap(),
            ("web.shop", Some(8080))
        );
        assert_eq!(split_port("10.0.0.1:80").unwrap(), ("10.0.0.1", Some(80)));
        assert_eq!(split_port("::1").unwrap(), ("::1", None));
        assert_eq!(split_port("[::1]:80").unwrap(), ("::1", Some(80)));
        assert!(split_port("web:http").is_err());
        assert!(split_port("web:0").is_err());
    }
}
