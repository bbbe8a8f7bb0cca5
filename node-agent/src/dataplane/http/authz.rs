//! The request path of the destination agent on HTTP ports: end-user authentication
//! (RequestAuthentication, JWTs) and authorization (AuthorizationPolicy with the request's
//! HTTP attributes), decided per request before it is forwarded to the application.
//!
//! What it does, in Envoy's order (jwt_authn, then RBAC), for each request of a tunnel
//! stream on a port the workload declares HTTP ([`RequestAuthz`], an [`Admission`]):
//!
//! 1. The path is normalised as Istio's default (`BASE`, RFC 3986 dot segments, `%2e`
//!    counted as a dot), and the application gets the normalised path: a rule on
//!    `/private/*` cannot be passed by `/public/../private/x`.
//! 2. When RequestAuthentications select the workload: the token is taken from the
//!    rules' locations and verified (`causeway_api::policy::jwt`, keys from the agent's
//!    [`JwksCache`]). A token present but invalid is answered 401 `Jwt verification fails`
//!    with `WWW-Authenticate` and the reason is logged; no token passes (Istio:
//!    authorization decides; `requestPrincipals: ["*"]` then denies).
//! 3. The AuthorizationPolicies decide with the peer's principal, the request's host,
//!    method, path, the headers the policies read and the token's principal and claims; a
//!    denial is answered 403 `RBAC: access denied` (flag `RBAC`), logged, counted and
//!    reported to the controller like a connection's.
//! 4. Allowed with a valid token: the token's header is removed unless the rule says
//!    `forwardOriginalToken: true` (Istio's default), and `outputPayloadToHeader` /
//!    `outputClaimToHeaders` are written.
//!
//! What it does not: decide connections (the tunnel does that for TCP ports, `tunnel/
//! authorize.rs`), or fetch keys itself (the cache does, warmed by the tunnel when the
//! rules change).

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use ::http::header::{self, HeaderName, HeaderValue};
use ::http::request::Parts;
use ::http::{StatusCode, Uri};
use causeway_api::policy::jwt::{self, Authenticated, JwtError, TokenLocation, TokenRequest};
use causeway_api::policy::{HttpAttributes, JwtRule};

use super::client::{Admission, Refusal};
use super::record::ResponseFlags;
use crate::dataplane::authz::LocalAuthz;
use crate::jwks::JwksCache;

/// Envoy's body of a request denied by RBAC.
pub const RBAC_DENIED_BODY: &str = "RBAC: access denied";

/// Envoy's body of a request whose JWT failed verification.
pub const JWT_FAILED_BODY: &str = "Jwt verification fails";

/// Per-request authentication and authorization of one inbound tunnel stream.
pub struct RequestAuthz {
    /// The authorization view of this host's workload (policies and JWT rules), as the
    /// tunnel rebuilds it: each request reads the current one.
    pub authz: tokio::sync::watch::Receiver<Arc<LocalAuthz>>,
    /// The agent's key sets.
    pub jwks: Arc<JwksCache>,
    /// The peer agent's SPIFFE ID (the workload principal).
    pub peer: Arc<str>,
    /// The stream's source address.
    pub source: IpAddr,
    /// This workload's address.
    pub destination: IpAddr,
    /// The application port.
    pub port: u16,
}

impl std::fmt::Debug for RequestAuthz {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestAuthz")
            .field("peer", &self.peer)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Admission for RequestAuthz {
    fn admit<'a>(
        &'a self,
        head: &'a mut Parts,
    ) -> Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send + 'a>> {
        Box::pin(async move {
            let view = self.authz.borrow().clone();
            check(&view, &self.jwks, self, head).await
        })
    }
}

fn is_dot(s: &str) -> bool {
    s == "." || s.eq_ignore_ascii_case("%2e")
}

fn is_dot_dot(s: &str) -> bool {
    match s.len() {
        2 => s == "..",
        4 => s.eq_ignore_ascii_case(".%2e") || s.eq_ignore_ascii_case("%2e."),
        6 => s.eq_ignore_ascii_case("%2e%2e"),
        _ => false,
    }
}

/// The path with its dot segments removed (RFC 3986 §5.2.4, `%2e` counted as `.`), as
/// Envoy's `normalize_path` (Istio's default `BASE` normalisation) does; `None` when it has
/// none (the common case, without allocating).
pub fn normalize_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix('/')?;
    if !rest.split('/').any(|s| is_dot(s) || is_dot_dot(s)) {
        return None;
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, s) in segments.iter().enumerate() {
        if is_dot(s) || is_dot_dot(s) {
            if is_dot_dot(s) {
                out.pop();
            }
            if i == last {
                out.push("");
            }
            continue;
        }
        out.push(s);
    }
    Some(format!("/{}", out.join("/")))
}

fn set_path(uri: &Uri, path: &str) -> Option<Uri> {
    let mut parts = uri.clone().into_parts();
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// The request's host: the URI's authority (HTTP/2 `:authority`, an absolute-form
/// request) or the `Host` header.
fn host_of(head: &Parts) -> &str {
    head.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| head.headers.get(header::HOST)?.to_str().ok())
        .unwrap_or("")
}

/// A header as the evaluator reads it: its values joined with `,` (Envoy's view of a
/// repeated header); the pseudo-headers `:authority`, `:method` and `:path` too.
fn header_value(head: &Parts, name: &str) -> Option<String> {
    match name {
        ":authority" => return Some(host_of(head).to_owned()),
        ":method" => return Some(head.method.as_str().to_owned()),
        ":path" => return head.uri.path_and_query().map(|p| p.as_str().to_owned()),
        _ => {}
    }
    let mut values = head
        .headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    let mut out = first.to_owned();
    for v in values {
        out.push(',');
        out.push_str(v);
    }
    Some(out)
}

fn forbidden() -> Refusal {
    Refusal {
        status: StatusCode::FORBIDDEN,
        body: RBAC_DENIED_BODY,
        headers: Vec::new(),
        flags: ResponseFlags::RBAC_ACCESS_DENIED,
    }
}

fn unauthorized(host: &str, path: &str) -> Refusal {
    let value = jwt::www_authenticate(&format!("http://{host}{path}"));
    Refusal {
        status: StatusCode::UNAUTHORIZED,
        body: JWT_FAILED_BODY,
        headers: HeaderValue::from_str(&value)
            .ok()
            .map(|v| (header::WWW_AUTHENTICATE, v))
            .into_iter()
            .collect(),
        flags: ResponseFlags::NONE,
    }
}

/// The authentication step of a request (module docs, 2.): the token found where `rules`
/// say (headers whose values are not visible ASCII are not read, as
/// [`HeaderValue::to_str`] decides) and verified with `jwks`, through its cache of verified
/// tokens (`rules_id` is [`crate::jwks::rules_id`] of `rules`). `Ok(None)` without rules or
/// without a token, `Err` for a token present but invalid (answer 401). The fuzz target
/// `jwt_request` drives this function.
pub async fn authenticate(
    rules: &[JwtRule],
    rules_id: u64,
    jwks: &JwksCache,
    head: &Parts,
) -> Result<Option<(Arc<Authenticated>, TokenLocation)>, JwtError> {
    if rules.is_empty() {
        return Ok(None);
    }
    let found = {
        let pairs: Vec<(&str, &str)> = head
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
            .collect();
        let req = TokenRequest {
            headers: &pairs,
            query: head.uri.query(),
        };
        jwt::extract(rules, &req).map(|(t, loc)| (t.to_owned(), loc))
    };
    let Some((token, location)) = found else {
        return Ok(None);
    };
    let auth = jwks.verify_token_cached(rules, rules_id, &token).await?;
    Ok(Some((auth, location)))
}

/// Authenticates and authorizes one request (module docs); `head` is changed for the
/// application when it is allowed.
async fn check(
    view: &LocalAuthz,
    jwks: &JwksCache,
    conn: &RequestAuthz,
    head: &mut Parts,
) -> Result<(), Refusal> {
    if let Some(p) = normalize_path(head.uri.path())
        && let Some(uri) = set_path(&head.uri, &p)
    {
        head.uri = uri;
    }
    let rules = view.jwt_rules();
    let auth = match authenticate(rules, view.jwt_rules_id(), jwks, head).await {
        Ok(auth) => auth,
        Err(e) => {
            tracing::warn!(
                peer_identity = %conn.peer,
                method = %head.method,
                path = head.uri.path(),
                reason = %e,
                "request refused: invalid JWT (401)"
            );
            return Err(unauthorized(host_of(head), head.uri.path()));
        }
    };
    let headers: Vec<(String, String)> = view
        .header_names()
        .iter()
        .filter_map(|n| Some((n.clone(), header_value(head, n)?)))
        .collect();
    let http = HttpAttributes {
        host: host_of(head),
        method: head.method.as_str(),
        path: head.uri.path(),
        headers: &headers,
        request_principal: auth.as_ref().map(|(a, _)| a.request_principal.as_str()),
        claims: auth.as_ref().map(|(a, _)| &a.claims),
    };
    let d = view.decide_request(
        Some(&*conn.peer),
        conn.source,
        conn.destination,
        conn.port,
        http,
    );
    if !d.allow {
        tracing::warn!(
            peer_identity = %conn.peer,
            request_principal = http.request_principal.unwrap_or("-"),
            method = %head.method,
            path = head.uri.path(),
            policy = d.policy_label(),
            "request denied by policy (403)"
        );
        return Err(forbidden());
    }
    if let Some((a, location)) = auth {
        let rule = &rules[a.rule];
        if !rule.forward_original_token
            && let TokenLocation::Header(name, _) = &location
        {
            head.headers.remove(name.as_str());
        }
        for (name, value) in jwt::output_headers(rule, &a) {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                head.headers.insert(n, v);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
