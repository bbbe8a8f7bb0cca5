//! The web UI: read-only pages on the admin listener under `/ui/`, embedded in the
//! binary (plain HTML, CSS and JavaScript from `ui/assets/`; nothing fetched at run time).
//!
//! **Login.** `causewayctl ui` asks `POST /v1/ui/login-codes` (admin credential) for a
//! one-time code valid [`LOGIN_CODE_TTL`] and prints `<controller>/ui/login#code=CODE`:
//! the code is in the fragment, which browsers never send, so it is in no request line or
//! log. The login page posts it to `POST /ui/api/session` once; the answer sets the
//! session cookie [`COOKIE`] (`HttpOnly; SameSite=Strict; Path=/; Max-Age` =
//! [`SESSION_TTL`], `Secure` when the page came over https). The admin token pasted into
//! the login form works the same way. Sessions and codes are random ids kept in memory
//! (hashed): a controller restart logs every browser out. Secrets are compared in
//! constant time (the admin token) or looked up by their SHA-256 (codes, sessions).
//!
//! **Every** page and `/ui/api/` request needs the cookie (401 with a message otherwise;
//! pages answer 401 with a link and a refresh to the login page); only the login page
//! and the static assets are public. Every answer carries [`CSP`], `X-Frame-Options:
//! DENY`, `Cache-Control: no-store` and `X-Content-Type-Options: nosniff`.
//!
//! **Data.** JSON under `/ui/api/`, built from the same in-process state as the admin
//! API (store, mesh); lists are paged and filtered on the server (`q`, `page`,
//! `per_page`), so 10k services answer one page at a time. `why` calls the admin API's
//! own handler ([`crate::policy_admin`]). `/ui/api/version` is the cheap tag the pages
//! poll to refresh when something changed. `/ui/api/traffic` answers the edges merged
//! from the agents' traffic summaries (the traffic page polls it).

use std::collections::HashMap;
use std::hash::{Hash as _, Hasher as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use causeway_api::policy::api::{WhyRequest, WhyResponse};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::admin::{AdminState, ApiError};
use crate::enroll::{now_unix, random_hex, sha256_hex};
use crate::mesh::{EndpointView, ServiceView};

/// How long a login code from `causewayctl ui` may be redeemed (once).
pub const LOGIN_CODE_TTL: Duration = Duration::from_secs(60);
/// How long a browser session lasts (the cookie's Max-Age).
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The session cookie's name.
pub const COOKIE: &str = "causeway_ui";
/// Longest search string accepted.
pub const MAX_QUERY: usize = 256;
/// Most rows in one page of a list.
pub const MAX_PER_PAGE: usize = 500;
const DEFAULT_PER_PAGE: usize = 50;
/// Unredeemed login codes kept at once (the oldest goes first).
const MAX_CODES: usize = 256;
/// Sessions kept at once (the oldest goes first).
const MAX_SESSIONS: usize = 4096;
/// How long a redeemed code is remembered, to tell a replay from a mistyped code.
const USED_MEMORY: Duration = Duration::from_secs(600);
/// Certificates expiring within this are called out on the overview.
const EXPIRY_WARNING_SECS: i64 = 24 * 3600;

/// The Content-Security-Policy of every UI answer: only this origin's files, no inline
/// script or style, no framing.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const SHELL_HTML: &str = include_str!("assets/shell.html");
const LOGIN_HTML: &str = include_str!("assets/login.html");
const APP_JS: &str = include_str!("assets/app.js");
const LOGIN_JS: &str = include_str!("assets/login.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// The pages: path, title, and the name the script renders by.
const PAGES: [(&str, &str, &str); 5] = [
    ("/ui/", "Overview", "overview"),
    ("/ui/services", "Services", "services"),
    ("/ui/agents", "Agents", "agents"),
    ("/ui/traffic", "Traffic", "traffic"),
    ("/ui/policy", "Policy", "policy"),
];

#[derive(Default)]
struct Secrets {
    /// SHA-256 (hex) of unredeemed login codes → expiry.
    codes: HashMap<String, Instant>,
    /// SHA-256 (hex) of redeemed codes → when they were redeemed.
    used: HashMap<String, Instant>,
    /// SHA-256 (hex) of session ids → expiry.
    sessions: HashMap<String, Instant>,
}

impl Secrets {
    fn prune(&mut self, now: Instant) {
        self.codes.retain(|_, exp| *exp > now);
        self.sessions.retain(|_, exp| *exp > now);
        self.used
            .retain(|_, at| now.duration_since(*at) < USED_MEMORY);
    }

    /// Keeps a new login code (by its hash) until `now + LOGIN_CODE_TTL`.
    fn issue_code(&mut self, key: String, now: Instant) {
        self.prune(now);
        make_room(&mut self.codes, MAX_CODES);
        self.codes.insert(key, now + LOGIN_CODE_TTL);
    }

    /// Redeems a login code (by its hash) once; else the message to show.
    fn redeem(&mut self, key: String, now: Instant) -> Result<(), String> {
        let found = self.codes.remove(&key);
        self.prune(now);
        match found {
            Some(exp) if exp > now => {
                make_room(&mut self.used, MAX_CODES);
                self.used.insert(key, now);
                Ok(())
            }
            _ if self.used.contains_key(&key) => Err(
                "this login code was already used: each code works once; run `causewayctl ui` for a new one".into(),
            ),
            Some(_) => Err(format!(
                "this login code expired (codes last {} s): run `causewayctl ui` for a new one",
                LOGIN_CODE_TTL.as_secs()
            )),
            None => Err(format!(
                "this login code is unknown or expired (codes last {} s and work once): run `causewayctl ui` for a new one",
                LOGIN_CODE_TTL.as_secs()
            )),
        }
    }

    /// Starts a session (by the hash of its id) until `now + SESSION_TTL`.
    fn start_session(&mut self, key: String, now: Instant) {
        make_room(&mut self.sessions, MAX_SESSIONS);
        self.sessions.insert(key, now + SESSION_TTL);
    }

    /// Whether the session (by the hash of its id) is live; else the message to show.
    fn check(&mut self, key: &str, now: Instant) -> Result<(), String> {
        match self.sessions.get(key) {
            Some(exp) if *exp > now => Ok(()),
            Some(_) => {
                self.sessions.remove(key);
                Err(format!(
                    "your session expired (sessions last {} h): log in again with `causewayctl ui`",
                    SESSION_TTL.as_secs() / 3600
                ))
            }
            None => Err("this session is not known to the controller (it expired, was logged out, was forged, or the controller restarted): log in again with `causewayctl ui`".into()),
        }
    }
}

/// Drops the entry that expires first until `map` has room for one more.
fn make_room(map: &mut HashMap<String, Instant>, cap: usize) {
    while map.len() >= cap {
        let Some(oldest) = map.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone()) else {
            break;
        };
        map.remove(&oldest);
    }
}

/// The services of one mesh version, with their search text (built once per version).
struct ServiceCache {
    version: u64,
    rows: Arc<Vec<(String, ServiceView)>>,
}

#[derive(Clone)]
struct Ui {
    admin: AdminState,
    secrets: Arc<Mutex<Secrets>>,
    services: Arc<Mutex<Option<ServiceCache>>>,
}

impl Ui {
    fn secrets(&self) -> std::sync::MutexGuard<'_, Secrets> {
        self.secrets.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn services(&self) -> Arc<Vec<(String, ServiceView)>> {
        let version = self.admin.mesh.version();
        let mut cache = self.services.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.as_ref().filter(|c| c.version == version) {
            return c.rows.clone();
        }
        let rows: Arc<Vec<(String, ServiceView)>> = Arc::new(
            self.admin
                .mesh
                .services()
                .into_iter()
                .map(|s| (search_text_of(&s), s))
                .collect(),
        );
        *cache = Some(ServiceCache {
            version,
            rows: rows.clone(),
        });
        rows
    }
}

fn search_text_of(s: &ServiceView) -> String {
    let mut t = format!("{}/{} {}.{}", s.namespace, s.name, s.name, s.namespace);
    if let Some(vip) = s.vip {
        t.push_str(&format!(" {vip}"));
    }
    for src in &s.sources {
        t.push(' ');
        t.push_str(src);
    }
    for e in &s.endpoints {
        t.push(' ');
        t.push_str(&e.address);
        if let Some(id) = &e.identity {
            t.push(' ');
            t.push_str(id);
        }
    }
    t.to_lowercase()
}

/// The UI's routes, to merge into the admin router.
pub fn router<S: Clone + Send + Sync + 'static>(admin: AdminState) -> Router<S> {
    let ui = Ui {
        admin,
        secrets: Arc::default(),
        services: Arc::default(),
    };
    let mut r = Router::new()
        .route("/ui", get(|| async { redirect("/ui/") }))
        .route("/ui/login", get(login_page))
        .route(
            "/ui/assets/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/ui/assets/login.js",
            get(|| async { asset(LOGIN_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/ui/assets/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/ui/api/session",
            post(session_create).delete(session_delete),
        )
        .route("/ui/api/version", get(version))
        .route("/ui/api/overview", get(overview))
        .route("/ui/api/services", get(services))
        .route("/ui/api/agents", get(agents))
        .route("/ui/api/traffic", get(traffic))
        .route("/ui/api/policies", get(policies))
        .route("/ui/api/why", post(why))
        .route("/v1/ui/login-codes", post(login_code_create));
    for (path, title, name) in PAGES {
        r = r.route(
            path,
            get(move |State(ui): State<Ui>, headers: HeaderMap| async move {
                page(&ui, &headers, path, title, name)
            }),
        );
    }
    r.layer(axum::middleware::from_fn(security_headers))
        .with_state(ui)
}

/// Adds the security headers to every UI answer (the login-code route is the admin API's).
async fn security_headers(req: Request, next: Next) -> Response {
    let ui = req.uri().path().starts_with("/ui");
    let mut resp = next.run(req).await;
    if ui {
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    resp
}

fn redirect(to: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn login_page() -> Response {
    html(StatusCode::OK, LOGIN_HTML.to_owned())
}

fn page(ui: &Ui, headers: &HeaderMap, path: &str, title: &str, name: &str) -> Response {
    if let Err(why) = check_session(ui, headers) {
        return html(
            StatusCode::UNAUTHORIZED,
            format!(
                "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0; url=/ui/login\"><title>Log in · Causeway</title><link rel=\"icon\" href=\"data:,\"></head><body><main><h1>Not logged in</h1><p>{}</p><p><a href=\"/ui/login\">Log in</a></p></main></body></html>",
                escape(&why)
            ),
        );
    }
    let nav: String = PAGES
        .iter()
        .map(|(p, t, _)| {
            let current = if *p == path {
                " aria-current=\"page\""
            } else {
                ""
            };
            format!("<li><a href=\"{p}\"{current}>{t}</a></li>")
        })
        .collect();
    html(
        StatusCode::OK,
        SHELL_HTML
            .replace("{{title}}", title)
            .replace("{{page}}", name)
            .replace("{{nav}}", &nav),
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Equal bytes, in time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorized(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, msg)
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Whether the request carries a live session cookie; else the message to show.
fn check_session(ui: &Ui, headers: &HeaderMap) -> Result<(), String> {
    let Some(id) = cookie_value(headers, COOKIE) else {
        return Err("not logged in: open the URL that `causewayctl ui` prints, or paste the admin token at /ui/login".into());
    };
    ui.secrets()
        .check(&sha256_hex(id.as_bytes()), Instant::now())
}

/// Every `/ui/api/` data handler starts here.
fn authed(ui: &Ui, headers: &HeaderMap) -> Result<(), ApiError> {
    check_session(ui, headers).map_err(unauthorized)
}

/// `POST /v1/ui/login-codes`: a one-time login code (admin credential required).
async fn login_code_create(
    State(ui): State<Ui>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<causeway_api::admin::LoginCode>), ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| unauthorized("missing admin credential: send `Authorization: Bearer <admin.token>` (causewayctl reads --admin-token-file or CAUSEWAY_ADMIN_TOKEN_FILE)"))?;
    if !constant_time_eq(
        sha256_hex(presented.as_bytes()).as_bytes(),
        ui.admin.credential_sha256.as_bytes(),
    ) {
        return Err(unauthorized(
            "admin credential does not match this controller's admin.token",
        ));
    }
    let code = random_hex(20);
    ui.secrets()
        .issue_code(sha256_hex(code.as_bytes()), Instant::now());
    tracing::info!("web UI login code issued");
    Ok((
        StatusCode::CREATED,
        Json(causeway_api::admin::LoginCode {
            path: format!("/ui/login#code={code}"),
            code,
            expires_in_secs: LOGIN_CODE_TTL.as_secs(),
        }),
    ))
}

/// Body of `POST /ui/api/session`: a login code or the admin token.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

async fn session_create(
    State(ui): State<Ui>,
    headers: HeaderMap,
    body: Result<Json<Login>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(login) = body.map_err(|e| {
        bad(format!(
            "login request: {}; send {{\"code\": \"...\"}} or {{\"token\": \"...\"}}",
            e.body_text()
        ))
    })?;
    let now = Instant::now();
    match (
        login.code.as_deref().map(str::trim),
        login.token.as_deref().map(str::trim),
    ) {
        (Some(code), None) if !code.is_empty() => {
            let redeemed = ui.secrets().redeem(sha256_hex(code.as_bytes()), now);
            if let Err(msg) = redeemed {
                tracing::warn!(reason = %msg, "web UI login refused");
                return Err(unauthorized(msg));
            }
        }
        (None, Some(token)) if !token.is_empty() => {
            if !constant_time_eq(
                sha256_hex(token.as_bytes()).as_bytes(),
                ui.admin.credential_sha256.as_bytes(),
            ) {
                tracing::warn!("web UI login refused: wrong admin token");
                return Err(unauthorized(
                    "this is not the controller's admin token (the contents of <data-dir>/admin.token)",
                ));
            }
        }
        _ => {
            return Err(bad(
                "give either a login code (from `causewayctl ui`) or the admin token, not both or neither",
            ));
        }
    }
    let id = random_hex(32);
    ui.secrets().start_session(sha256_hex(id.as_bytes()), now);
    tracing::info!("web UI session started");
    // `Secure` when the page is served over https (the browser says so in Origin).
    let secure = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|o| o.starts_with("https://"));
    let cookie = format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    );
    Ok((
        [(header::SET_COOKIE, cookie)],
        Json(json!({"ok": true, "expires_in_secs": SESSION_TTL.as_secs(), "next": "/ui/services"})),
    )
        .into_response())
}

/// `DELETE /ui/api/session`: logs out.
async fn session_delete(State(ui): State<Ui>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie_value(&headers, COOKIE) {
        ui.secrets().sessions.remove(&sha256_hex(id.as_bytes()));
    }
    (
        StatusCode::NO_CONTENT,
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        )],
    )
        .into_response()
}

/// `GET /ui/api/version`: a tag that changes when anything the pages show changes.
async fn version(State(ui): State<Ui>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authed(&ui, &headers)?;
    let mesh = &ui.admin.mesh;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    mesh.version().hash(&mut h);
    for (id, s) in mesh.sessions() {
        (
            id,
            s.connected,
            s.acked_version,
            s.sent_version,
            s.generation,
        )
            .hash(&mut h);
        s.last_nack.map(|n| n.version).hash(&mut h);
        s.recent_denials.len().hash(&mut h);
    }
    for a in ui.admin.store.agents()? {
        (a.id, a.not_after, a.removed_at).hash(&mut h);
    }
    for src in mesh.sources() {
        (src.name, src.state, src.last_error).hash(&mut h);
    }
    Ok(Json(json!({
        "version": mesh.version(),
        "etag": format!("{:016x}", h.finish()),
    })))
}

async fn overview(State(ui): State<Ui>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authed(&ui, &headers)?;
    let mesh = &ui.admin.mesh;
    let version = mesh.version();
    let sessions = mesh.sessions();
    let agents = ui.admin.store.agents()?;
    let live: Vec<_> = agents.iter().filter(|a| a.removed_at.is_none()).collect();
    let now = now_unix();
    let mut connected = 0;
    let mut behind = 0;
    let mut nacking = 0;
    for a in &live {
        if let Some(s) = sessions.get(&a.id) {
            if s.connected {
                connected += 1;
                if s.acked_version < version {
                    behind += 1;
                }
            }
            if s.last_nack
                .as_ref()
                .is_some_and(|n| n.version > s.acked_version)
            {
                nacking += 1;
            }
        }
    }
    let mut expiring: Vec<Value> = live
        .iter()
        .filter(|a| a.not_after - now < EXPIRY_WARNING_SECS)
        .map(|a| {
            json!({
                "agent": a.id, "group": a.group, "hostname": a.hostname,
                "identity": a.spiffe_id, "not_after": a.not_after,
            })
        })
        .collect();
    expiring.sort_by_key(|v| v["not_after"].as_i64());
    let expiring_count = expiring.len();
    expiring.truncate(50);
    let services = ui.services();
    Ok(Json(json!({
        "now": now,
        "version": version,
        "durable_version": mesh.durable_version(),
        "agents": {"total": live.len(), "connected": connected, "removed": agents.len() - live.len()},
        "agents_behind": behind,
        "agents_nacking": nacking,
        "certs_expiring_within_secs": EXPIRY_WARNING_SECS,
        "certs_expiring_count": expiring_count,
        "certs_expiring": expiring,
        "services": services.len(),
        "conflicts": mesh.conflicts().len(),
        "sources": mesh.sources(),
        "policies": mesh.policies().len(),
    })))
}

/// `q`, `page` and `per_page` of the list endpoints, checked with clear messages.
#[derive(Deserialize)]
struct ListParams {
    q: Option<String>,
    page: Option<String>,
    per_page: Option<String>,
}

struct Paging {
    q: String,
    page: usize,
    per_page: usize,
}

impl ListParams {
    fn check(self) -> Result<Paging, ApiError> {
        let q = self.q.unwrap_or_default();
        let chars = q.chars().count();
        if chars > MAX_QUERY {
            return Err(bad(format!(
                "search text is {chars} characters long; at most {MAX_QUERY} are accepted: shorten it"
            )));
        }
        let num = |name: &str, v: Option<String>, default: usize, max: usize| match v {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| {
                    bad(format!(
                        "{name} = {:?}: expected a whole number from 1 to {max}",
                        v.chars().take(40).collect::<String>()
                    ))
                }),
        };
        Ok(Paging {
            q: q.trim().to_lowercase(),
            page: num("page", self.page, 1, 1_000_000)?,
            per_page: num("per_page", self.per_page, DEFAULT_PER_PAGE, MAX_PER_PAGE)?,
        })
    }
}

/// One page of `matching` as JSON, with the counts the pager shows.
fn paged<T: Serialize>(p: &Paging, all: usize, matching: Vec<T>) -> Value {
    let total = matching.len();
    let pages = total.div_ceil(p.per_page).max(1);
    let items: Vec<T> = matching
        .into_iter()
        .skip((p.page - 1).saturating_mul(p.per_page))
        .take(p.per_page)
        .collect();
    json!({
        "q": p.q, "page": p.page, "per_page": p.per_page, "pages": pages,
        "total": total, "all": all, "items": items,
    })
}

#[derive(Serialize)]
struct ServiceRow<'a> {
    key: String,
    namespace: &'a str,
    name: &'a str,
    vip: Option<std::net::Ipv4Addr>,
    ports: Vec<String>,
    sources: &'a std::collections::BTreeSet<String>,
    healthy: usize,
    endpoints: &'a [EndpointView],
    conflicts: Vec<String>,
}

/// A conflict in one sentence, and the service it concerns.
fn describe_conflict(c: &causeway_api::registry::Conflict) -> (String, String) {
    let v = serde_json::to_value(c).unwrap_or(Value::Null);
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let list = |k: &str| {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let text = match v["kind"].as_str().unwrap_or_default() {
        "port_mismatch" => format!(
            "port {} has different numbers: {}",
            s("port"),
            v["numbers"]
                .as_object()
                .map(|m| m
                    .iter()
                    .map(|(n, srcs)| format!(
                        "{n} in {}",
                        srcs.as_array()
                            .map(|a| a
                                .iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(", "))
                            .unwrap_or_default()
                    ))
                    .collect::<Vec<_>>()
                    .join("; "))
                .unwrap_or_default()
        ),
        "duplicate_address" => format!(
            "address {} is listed by several sources: {}",
            s("address"),
            list("sources")
        ),
        "invalid_endpoint" => format!(
            "endpoint {} from {} refused: {}",
            s("address"),
            s("source"),
            s("reason")
        ),
        "synced_copy" => format!(
            "copy of {} from {} dropped in favour of {}",
            s("address"),
            s("copy_source"),
            s("original_source")
        ),
        _ => v.to_string(),
    };
    (s("service"), text)
}

async fn services(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    authed(&ui, &headers)?;
    let p = params.check()?;
    let rows = ui.services();
    let mut conflicts: HashMap<String, Vec<String>> = HashMap::new();
    for c in ui.admin.mesh.conflicts() {
        let (service, text) = describe_conflict(&c);
        conflicts.entry(service).or_default().push(text);
    }
    let matching: Vec<ServiceRow<'_>> = rows
        .iter()
        .filter(|(text, _)| p.q.is_empty() || text.contains(&p.q))
        .map(|(_, s)| {
            let key = format!("{}/{}", s.namespace, s.name);
            let mut ports: Vec<String> = s
                .endpoints
                .iter()
                .flat_map(|e| e.ports.iter().map(|(n, p)| format!("{n}:{p}")))
                .collect();
            ports.sort();
            ports.dedup();
            ServiceRow {
                conflicts: conflicts.get(&key).cloned().unwrap_or_default(),
                key,
                namespace: &s.namespace,
                name: &s.name,
                vip: s.vip,
                ports,
                sources: &s.sources,
                healthy: s.endpoints.iter().filter(|e| e.healthy).count(),
                endpoints: &s.endpoints,
            }
        })
        .collect();
    let mut out = paged(&p, rows.len(), matching);
    out["version"] = json!(ui.admin.mesh.version());
    out["conflicts"] = json!(conflicts.values().map(Vec::len).sum::<usize>());
    Ok(Json(out))
}

async fn agents(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    authed(&ui, &headers)?;
    let p = params.check()?;
    let version = ui.admin.mesh.version();
    let sessions = ui.admin.mesh.sessions();
    let now = now_unix();
    let all = ui.admin.store.agents()?;
    let total = all.len();
    let matching: Vec<Value> = all
        .into_iter()
        .filter(|a| {
            p.q.is_empty()
                || format!(
                    "{} {} {} {} {}",
                    a.id, a.spiffe_id, a.group, a.hostname, a.address
                )
                .to_lowercase()
                .contains(&p.q)
        })
        .map(|a| {
            let s = sessions.get(&a.id);
            let connected = s.is_some_and(|s| s.connected);
            let state = if a.removed_at.is_some() {
                "removed"
            } else if connected {
                "connected"
            } else {
                "disconnected"
            };
            json!({
                "id": a.id,
                "identity": a.spiffe_id,
                "group": a.group,
                "hostname": a.hostname,
                "address": a.address,
                "joined_at": a.joined_at,
                "not_after": a.not_after,
                "expires_in_secs": a.not_after - now,
                "renewals": a.renewals,
                "state": state,
                "connected": connected,
                "acked_version": s.map(|s| s.acked_version),
                "sent_version": s.map(|s| s.sent_version),
                "behind": s.map(|s| version.saturating_sub(s.acked_version)),
                "last_nack": s.and_then(|s| s.last_nack.clone()),
                "registration_error": s.and_then(|s| s.registration_error.clone()),
            })
        })
        .collect();
    let mut out = paged(&p, total, matching);
    out["version"] = json!(version);
    out["now"] = json!(now);
    Ok(Json(out))
}

/// `GET /ui/api/traffic`: the edges of `GET /v1/traffic` ([`crate::traffic`]), and a
/// `message` when there are none.
async fn traffic(State(ui): State<Ui>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authed(&ui, &headers)?;
    let view = ui.admin.mesh.traffic();
    let mut out = json!(view);
    if view.edges.is_empty() {
        out["message"] = json!(format!(
            "no traffic data yet: no agent reported proxied traffic in the last {} s (agents report every few seconds while they proxy requests, with [telemetry] metrics = true)",
            crate::traffic::FRESH.as_secs()
        ));
    }
    Ok(Json(out))
}

async fn policies(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    authed(&ui, &headers)?;
    let p = params.check()?;
    let all = ui.admin.mesh.policies();
    let total = all.len();
    let matching: Vec<Value> = all
        .into_iter()
        .filter(|(key, _)| p.q.is_empty() || key.to_lowercase().contains(&p.q))
        .map(|(key, r)| {
            json!({
                "key": key,
                "kind": r.resource.kind().as_str(),
                "namespace": r.resource.metadata().namespace(),
                "name": r.resource.metadata().name,
                "version": r.version,
                "resource": r.resource,
            })
        })
        .collect();
    Ok(Json(paged(&p, total, matching)))
}

/// `POST /ui/api/why`: the admin API's `why`, the evaluator `causewayctl why` uses.
async fn why(
    State(ui): State<Ui>,
    headers: HeaderMap,
    body: Result<Json<WhyRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<WhyResponse>, ApiError> {
    authed(&ui, &headers)?;
    let Json(req) = body.map_err(|e| bad(format!("why request: {}", e.body_text())))?;
    if req.from.trim().is_empty() || req.to.trim().is_empty() {
        return Err(bad(
            "give From (a group, an agent id or an address) and To (a service NAME[.NAMESPACE][:PORT] or an address)",
        ));
    }
    crate::policy_admin::why(State(ui.admin.clone()), Json(req)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_work_once_and_expire_and_sessions_expire() {
        let t0 = Instant::now();
        let mut s = Secrets::default();
        s.issue_code("a".into(), t0);
        s.issue_code("b".into(), t0);
        assert_eq!(s.redeem("a".into(), t0 + Duration::from_secs(1)), Ok(()));
        let again = s
            .redeem("a".into(), t0 + Duration::from_secs(2))
            .unwrap_err();
        assert!(again.contains("already used"), "{again}");
        let late = s
            .redeem("b".into(), t0 + LOGIN_CODE_TTL + Duration::from_secs(1))
            .unwrap_err();
        assert!(late.contains("expired"), "{late}");
        let unknown = s.redeem("c".into(), t0).unwrap_err();
        assert!(unknown.contains("unknown"), "{unknown}");

        s.start_session("s".into(), t0);
        assert_eq!(
            s.check("s", t0 + SESSION_TTL - Duration::from_secs(1)),
            Ok(())
        );
        let expired = s.check("s", t0 + SESSION_TTL).unwrap_err();
        assert!(expired.contains("expired"), "{expired}");
        let forged = s.check("s", t0).unwrap_err();
        assert!(forged.contains("not known"), "{forged}");
    }

    #[test]
    fn the_oldest_code_makes_room() {
        let t0 = Instant::now();
        let mut s = Secrets::default();
        for i in 0..=MAX_CODES {
            s.issue_code(
                format!("{i}"),
                t0 + Duration::from_millis(u64::try_from(i).unwrap()),
            );
        }
        assert_eq!(s.codes.len(), MAX_CODES);
        assert!(!s.codes.contains_key("0"));
        assert!(s.codes.contains_key(&format!("{MAX_CODES}")));
    }

    #[test]
    fn constant_time_eq_compares_bytes() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; causeway_ui=xyz ; b=2"),
        );
        assert_eq!(cookie_value(&h, COOKIE), Some("xyz"));
        assert_eq!(cookie_value(&h, "c"), None);
    }

    #[test]
    fn paging_rejects_bad_numbers_and_long_searches() {
        let p = |q: &str, page: Option<&str>, per: Option<&str>| {
            ListParams {
                q: Some(q.into()),
                page: page.map(Into::into),
                per_page: per.map(Into::into),
            }
            .check()
        };
        assert!(p(&"x".repeat(MAX_QUERY), None, None).is_ok());
        assert!(p(&"x".repeat(MAX_QUERY + 1), None, None).is_err());
        assert!(p("", Some("0"), None).is_err());
        assert!(p("", None, Some("501")).is_err());
        let ok = p(" Web ", Some("2"), Some("10")).unwrap();
        assert_eq!((ok.q.as_str(), ok.page, ok.per_page), ("web", 2, 10));
        let page = paged(&ok, 25, (0..25).collect::<Vec<_>>());
        assert_eq!(
            page["items"],
            json!([10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
        );
        assert_eq!(page["pages"], 3);
    }
}
