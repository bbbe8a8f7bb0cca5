//! The agent's cache of JSON Web Key Sets for RequestAuthentication issuers.
//!
//! What it does: fetches each rule's `jwksUri` over HTTPS (rustls with ring, verified
//! against the system roots plus `[jwt] ca_file`), keeps the parsed [`KeySet`] per URI for
//! `refresh_interval`, fetches again at once when a token names a `kid` the set lacks (at
//! most once per `unknown_kid_interval`), retries a failed fetch a bounded number of times
//! with the shared backoff, and keeps the last good set through an outage of the endpoint
//! (later fetches wait for the backoff, so a down endpoint is not hammered by requests).
//! Inline `jwks` are parsed once and kept too.
//!
//! Verified tokens are cached ([`verified`], [`JwksCache::verify_token_cached`]): a token
//! seen before under the same rules and key sets is not verified again until its `exp`. A
//! fetched set that differs from the last one (rotation, a removed key) empties that cache.
//!
//! What it does not: answer requests. [`JwksCache::authenticate`] gives the request path
//! `Ok(None)` (no token), `Ok(Some)` (valid) or `Err` (answer 401 with
//! [`causeway_api::policy::jwt::www_authenticate`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_api::backoff::Backoff;
use causeway_api::policy::JwtRule;
use causeway_api::policy::jwt::{self, Authenticated, JwtError, KeySet, TokenRequest};
use tokio::time::Instant;

use crate::config::JwtConfig;

pub mod verified;

use verified::VerifiedTokens;

/// Timing of fetches.
#[derive(Debug, Clone)]
pub struct JwksOptions {
    /// How long a fetched set is used before it is fetched again.
    pub refresh_interval: Duration,
    /// Least time between two fetches caused by an unknown `kid`.
    pub unknown_kid_interval: Duration,
    /// Timeout of one attempt.
    pub fetch_timeout: Duration,
    /// Attempts of one fetch before it counts as failed.
    pub attempts: u32,
    /// First backoff bound between attempts and between failed fetches.
    pub backoff_base: Duration,
    /// Largest backoff bound.
    pub backoff_cap: Duration,
}

impl From<&JwtConfig> for JwksOptions {
    fn from(c: &JwtConfig) -> Self {
        JwksOptions {
            refresh_interval: c.refresh_interval,
            unknown_kid_interval: c.unknown_kid_interval,
            fetch_timeout: c.fetch_timeout,
            attempts: 3,
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(60),
        }
    }
}

/// One URI's state.
struct Entry {
    keys: Option<Arc<KeySet>>,
    /// No fetch before this (except for an unknown `kid`).
    next_fetch: Option<Instant>,
    /// The last fetch caused by an unknown `kid`.
    last_kid_fetch: Option<Instant>,
    /// Failed fetches in a row, for the delay before the next one.
    backoff: Backoff,
    last_error: Option<String>,
    /// SHA-256 of the body of the last good fetch (a different one is a key change).
    digest: Option<[u8; 32]>,
}

/// Key sets per `jwksUri` (and per inline `jwks` text).
pub struct JwksCache {
    client: reqwest::Client,
    opts: JwksOptions,
    entries: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Entry>>>>,
    inline: Mutex<HashMap<String, Result<Arc<KeySet>, String>>>,
    verified: VerifiedTokens,
}

/// Why the cache could not be built.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// `[jwt] ca_file` could not be read.
    #[error("jwt.ca_file {path}: cannot read it: {source}")]
    CaFile {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `[jwt] ca_file` holds no usable certificate, or the client could not be built.
    #[error("jwt.ca_file {path}: {message}")]
    Client {
        /// The file (or `-` without one).
        path: String,
        /// What went wrong.
        message: String,
    },
}

impl JwksCache {
    /// A cache for the agent's `[jwt]` settings.
    pub fn from_config(c: &JwtConfig) -> Result<JwksCache, JwksError> {
        Ok(JwksCache::new(c.ca_file.as_deref(), JwksOptions::from(c))?
            .with_verified_tokens(c.verified_tokens, verified::system_clock()))
    }

    /// The same cache with a verified-token cache of `entries` (0: none) reading `clock`
    /// (by default [`verified::DEFAULT_ENTRIES`] and the system clock).
    pub fn with_verified_tokens(mut self, entries: usize, clock: verified::Clock) -> JwksCache {
        self.verified = VerifiedTokens::new(entries, clock);
        self
    }

    /// The cache of verified tokens.
    pub fn verified(&self) -> &VerifiedTokens {
        &self.verified
    }

    /// A cache that trusts the system roots plus the CAs in `ca_file` (PEM).
    pub fn new(ca_file: Option<&Path>, opts: JwksOptions) -> Result<JwksCache, JwksError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = || {
            reqwest::Client::builder()
                .https_only(true)
                .connect_timeout(opts.fetch_timeout)
                .timeout(opts.fetch_timeout)
                .redirect(reqwest::redirect::Policy::limited(3))
        };
        let mut builder = base();
        let mut extra = Vec::new();
        let shown = ca_file.map_or("-".to_owned(), |p| p.display().to_string());
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|source| JwksError::CaFile {
                path: shown.clone(),
                source,
            })?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| JwksError::Client {
                    path: shown.clone(),
                    message: format!("not a PEM certificate bundle: {e}"),
                })?;
            if certs.is_empty() {
                return Err(JwksError::Client {
                    path: shown,
                    message: "no certificate in the file (expected PEM CERTIFICATE blocks)"
                        .to_owned(),
                });
            }
            for cert in certs {
                extra.push(cert.clone());
                builder = builder.tls_certs_merge([cert]);
            }
        }
        let client = match builder.build() {
            Ok(c) => c,
            // The system's roots could not be loaded (a minimal host without the
            // ca-certificates package): the agent still starts, with the configured CAs
            // alone; a key set on a public issuer then fails to fetch, logged with the URI
            // (and inline key sets and tokens without a rule keep working).
            Err(e) => {
                let fallback =
                    base()
                        .tls_certs_only(extra)
                        .build()
                        .map_err(|e| JwksError::Client {
                            path: shown.clone(),
                            message: e.to_string(),
                        })?;
                tracing::warn!(
                    error = %error_chain(&e),
                    ca_file = %shown,
                    "the system's CA certificates could not be loaded; key sets (jwksUri) are fetched trusting only [jwt] ca_file. Install the ca-certificates package to trust public issuers"
                );
                fallback
            }
        };
        Ok(JwksCache {
            client,
            opts,
            entries: Mutex::new(HashMap::new()),
            inline: Mutex::new(HashMap::new()),
            verified: VerifiedTokens::new(verified::DEFAULT_ENTRIES, verified::system_clock()),
        })
    }

    fn entry(&self, uri: &str) -> Arc<tokio::sync::Mutex<Entry>> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up before `entry`, which would copy the URI on every request.
        if let Some(e) = entries.get(uri) {
            return e.clone();
        }
        entries
            .entry(uri.to_owned())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(Entry {
                    keys: None,
                    next_fetch: None,
                    last_kid_fetch: None,
                    backoff: Backoff::new(self.opts.backoff_base, self.opts.backoff_cap),
                    last_error: None,
                    digest: None,
                }))
            })
            .clone()
    }

    /// The key set of `uri`: the cached one while fresh, else fetched (the last good set
    /// when the fetch fails). `Err` only when no set was ever fetched.
    pub async fn keys(&self, uri: &str) -> Result<Arc<KeySet>, String> {
        let entry = self.entry(uri);
        let mut e = entry.lock().await;
        let due = e.next_fetch.is_none_or(|t| Instant::now() >= t);
        if due {
            self.fetch_into(uri, &mut e).await;
        }
        e.keys.clone().ok_or_else(|| {
            format!(
                "no key set for {uri}: {}",
                e.last_error.as_deref().unwrap_or("not fetched yet")
            )
        })
    }

    /// Fetches `uri` again because a token named `kid`, unless the set already has it or
    /// such a fetch happened less than `unknown_kid_interval` ago.
    pub async fn refresh_for_kid(&self, uri: &str, kid: &str) -> Result<Arc<KeySet>, String> {
        let entry = self.entry(uri);
        let mut e = entry.lock().await;
        let has = e.keys.as_ref().is_some_and(|k| k.has_kid(kid));
        let recent = e
            .last_kid_fetch
            .is_some_and(|t| t.elapsed() < self.opts.unknown_kid_interval);
        if !has && !recent {
            e.last_kid_fetch = Some(Instant::now());
            self.fetch_into(uri, &mut e).await;
        }
        e.keys.clone().ok_or_else(|| {
            format!(
                "no key set for {uri}: {}",
                e.last_error.as_deref().unwrap_or("not fetched yet")
            )
        })
    }

    /// The cached set of `uri`, without fetching.
    pub fn cached(&self, uri: &str) -> Option<Arc<KeySet>> {
        let entry = self.entry(uri);
        let e = entry.try_lock().ok()?;
        e.keys.clone()
    }

    /// One fetch with bounded retries; updates the entry either way.
    async fn fetch_into(&self, uri: &str, e: &mut Entry) {
        let mut attempt_backoff = Backoff::new(self.opts.backoff_base, self.opts.backoff_cap);
        let mut last = String::new();
        for attempt in 0..self.opts.attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(attempt_backoff.next_delay()).await;
            }
            match self.fetch_once(uri).await {
                Ok((set, digest)) => {
                    for s in set.skipped() {
                        tracing::warn!(uri, "JWKS key left out: {s}");
                    }
                    self.store_fetched(uri, e, set, digest);
                    return;
                }
                Err(err) => last = err,
            }
        }
        let delay = e.backoff.next_delay().max(self.opts.backoff_base);
        tracing::warn!(
            uri,
            error = %last,
            kept_last_good = e.keys.is_some(),
            retry_in = ?delay,
            "JWKS fetch failed"
        );
        e.last_error = Some(last);
        e.next_fetch = Some(Instant::now() + delay);
    }

    /// Keeps a fetched set; a set whose body differs from the last good one's (a rotation,
    /// a removed key) empties the verified-token cache, so no token verified under the old
    /// keys is taken without checking it again.
    fn store_fetched(&self, uri: &str, e: &mut Entry, set: KeySet, digest: [u8; 32]) {
        if e.digest.is_some_and(|d| d != digest) {
            tracing::info!(
                uri,
                "the key set changed; cached token verifications are dropped"
            );
            self.verified.invalidate();
        }
        e.digest = Some(digest);
        e.keys = Some(Arc::new(set));
        e.last_error = None;
        e.backoff.reset();
        e.next_fetch = Some(Instant::now() + self.opts.refresh_interval);
    }

    /// Stores `json` as if fetched from `uri` (tests of what a fetch changes).
    #[cfg(test)]
    pub(crate) fn store_fetched_json(&self, uri: &str, json: &str) {
        let set = KeySet::from_json(json).expect("test key set parses");
        let entry = self.entry(uri);
        let mut e = entry.try_lock().expect("no fetch in flight in the test");
        self.store_fetched(uri, &mut e, set, sha256(json.as_bytes()));
        e.next_fetch = Some(Instant::now() + Duration::from_secs(3600));
    }

    async fn fetch_once(&self, uri: &str) -> Result<(KeySet, [u8; 32]), String> {
        let mut resp = self
            .client
            .get(uri)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("GET {uri}: {}", error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(format!("GET {uri}: HTTP {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("GET {uri}: reading the body: {}", error_chain(&e)))?
        {
            if body.len() + chunk.len() > jwt::MAX_JWKS_BYTES {
                return Err(format!(
                    "GET {uri}: the key set is over the {}-byte limit",
                    jwt::MAX_JWKS_BYTES
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let text =
            std::str::from_utf8(&body).map_err(|_| format!("GET {uri}: the body is not UTF-8"))?;
        let set = KeySet::from_json(text).map_err(|e| format!("GET {uri}: {e}"))?;
        Ok((set, sha256(&body)))
    }

    fn inline_keys(&self, jwks: &str) -> Result<Arc<KeySet>, String> {
        let mut inline = self.inline.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up before `entry`, which would copy the whole key set text on every
        // request.
        if let Some(k) = inline.get(jwks) {
            return k.clone();
        }
        inline
            .entry(jwks.to_owned())
            .or_insert_with(|| KeySet::from_json(jwks).map(Arc::new))
            .clone()
    }

    async fn keys_for(&self, rule: &JwtRule) -> Option<Arc<KeySet>> {
        if let Some(jwks) = &rule.jwks {
            return self.inline_keys(jwks).ok();
        }
        self.keys(rule.jwks_uri.as_deref()?).await.ok()
    }

    /// Authenticates a request against `rules`: `Ok(None)` without a token, `Ok(Some)` for
    /// a valid one, `Err` (answer 401) for an invalid one. A token whose `kid` is unknown
    /// makes one refresh of its issuer's set (rate-limited) and is checked again.
    pub async fn authenticate(
        &self,
        rules: &[JwtRule],
        req: &TokenRequest<'_>,
    ) -> Result<Option<Authenticated>, JwtError> {
        let Some((token, _)) = jwt::extract(rules, req) else {
            return Ok(None);
        };
        self.verify_token(rules, token).await.map(Some)
    }

    /// Verifies a token against `rules`. Only the key set of the token's issuer is looked
    /// up (a slow or failing endpoint of another issuer does not hold the request); a
    /// token whose `kid` is unknown makes one refresh of that set (rate-limited) and is
    /// checked again.
    pub async fn verify_token(
        &self,
        rules: &[JwtRule],
        token: &str,
    ) -> Result<Authenticated, JwtError> {
        let i = jwt::rule_for(rules, token)?;
        let set = self.keys_for(&rules[i]).await;
        let first = jwt::verify(rules, token, |j| if j == i { set.as_deref() } else { None });
        match first {
            Err(JwtError::UnknownKid { issuer, kid }) => {
                let Some(uri) = rules[i].jwks_uri.as_deref() else {
                    return Err(JwtError::UnknownKid { issuer, kid });
                };
                let set = self.refresh_for_kid(uri, &kid).await.ok();
                jwt::verify(rules, token, |j| if j == i { set.as_deref() } else { None })
            }
            other => other,
        }
    }

    /// Verifies a token against `rules` as [`Self::verify_token`] does, through the cache of
    /// verified tokens: a token verified before under the same rules (`rules_id`, from
    /// [`rules_id`]) and key sets, before its `exp`, is taken without checking its signature
    /// again. A verified token is also checked against the cache's clock (its `exp`/`nbf`
    /// with [`jwt::CLOCK_SKEW_SECS`]), so the cache never accepts what its clock refuses.
    pub async fn verify_token_cached(
        &self,
        rules: &[JwtRule],
        rules_id: u64,
        token: &str,
    ) -> Result<Arc<Authenticated>, JwtError> {
        let key = self.verified.key(rules_id, token);
        if let Some(k) = &key
            && let Some(auth) = self.verified.get(k)
        {
            return Ok(auth);
        }
        let generation = self.verified.generation();
        let auth = self.verify_token(rules, token).await?;
        let now = self.verified.now();
        let claim = |k: &str| auth.claims.get(k).and_then(|v| v.as_u64());
        if let Some(exp) = claim("exp")
            && exp.saturating_add(jwt::CLOCK_SKEW_SECS) < now
        {
            return Err(JwtError::Invalid(format!(
                "the token expired (exp {exp}, more than {} s ago)",
                jwt::CLOCK_SKEW_SECS
            )));
        }
        if let Some(nbf) = claim("nbf")
            && nbf > now.saturating_add(jwt::CLOCK_SKEW_SECS)
        {
            return Err(JwtError::Invalid(format!(
                "the token is not valid yet (nbf {nbf}, more than {} s ahead)",
                jwt::CLOCK_SKEW_SECS
            )));
        }
        let auth = Arc::new(auth);
        if let Some(k) = key {
            self.verified.insert(k, auth.clone(), generation);
        }
        Ok(auth)
    }

    /// Fetches the key sets of `rules`' `jwksUri`s that are due (first use, or older than
    /// `refresh_interval`), so requests find them warm; inline sets are parsed once. A
    /// failure is logged by the fetch and keeps the last good set.
    pub async fn prefetch(&self, rules: &[JwtRule]) {
        for rule in rules {
            if let Some(jwks) = &rule.jwks {
                if let Err(e) = self.inline_keys(jwks) {
                    tracing::warn!(issuer = %rule.issuer, error = %e, "inline jwks of a RequestAuthentication rule is unusable");
                }
            } else if let Some(uri) = &rule.jwks_uri {
                let _ = self.keys(uri).await;
            }
        }
    }

    /// How long a fetched set is used before it is fetched again.
    pub fn refresh_interval(&self) -> Duration {
        self.opts.refresh_interval
    }
}

/// The identity of a list of `jwtRules` for the verified-token cache: equal for equal rules
/// (in the same order), different when any field of any rule differs. Computed once per
/// change of the rules, not per request.
pub fn rules_id(rules: &[JwtRule]) -> u64 {
    let json = serde_json::to_vec(rules).unwrap_or_default();
    let d = sha256(&json);
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}
