//! End-user authentication with JWTs, as Istio's `RequestAuthentication` does it: find the
//! token of a request where the rules say, check it against the issuer's keys (signature,
//! `exp`/`nbf` with a clock-skew allowance, issuer, audience), and give the authorization
//! evaluator its request principal (`iss/sub`) and claims.
//!
//! What it does not: fetch key sets (the agent's JWKS cache does, and hands a [`KeySet`] in)
//! or answer the request (the caller answers 401 with [`www_authenticate`]). The signature
//! check is the `jsonwebtoken` crate's (ring); nothing here is hand-written crypto.
//!
//! Istio's semantics: a request without a token passes authentication and is left to
//! authorization (`requestPrincipals: ["*"]` then denies it); a token that is present but
//! invalid is refused (401).

use std::collections::HashSet;
use std::fmt;

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::authz::Workload;
use super::resource::{JwtRule, RequestAuthentication};

/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const CLOCK_SKEW_SECS: u64 = 60;

/// The longest token accepted, in bytes: a larger one is refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The algorithms accepted: asymmetric only (a JWKS never shares a secret).
pub const ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// A validated token: what authorization sees of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Authenticated {
    /// `iss/sub`, Istio's request principal.
    pub request_principal: String,
    /// Every claim of the payload.
    pub claims: serde_json::Value,
    /// `aud`, as a list (a single string becomes one entry).
    pub audiences: Vec<String>,
    /// `azp`, the authorized presenter, when present.
    pub presenter: Option<String>,
    /// Index of the rule (`spec.jwtRules[i]`) that accepted it.
    pub rule: usize,
}

/// Why a token present in the request is refused: the caller answers 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    /// The token's `kid` is not in the issuer's key set: the caller may refresh the set once
    /// and try again ([`JwtError::unknown_kid`]).
    UnknownKid {
        /// The issuer.
        issuer: String,
        /// The key id the token names.
        kid: String,
    },
    /// Anything else, with the reason.
    Invalid(String),
}

impl JwtError {
    /// The key id when the failure is an unknown `kid` (worth one refresh of the key set).
    pub fn unknown_kid(&self) -> Option<&str> {
        match self {
            JwtError::UnknownKid { kid, .. } => Some(kid),
            JwtError::Invalid(_) => None,
        }
    }
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwtError::UnknownKid { issuer, kid } => write!(
                f,
                "the token's key id {kid:?} is not in the key set of issuer {issuer:?}"
            ),
            JwtError::Invalid(reason) => f.write_str(reason),
        }
    }
}

impl std::error::Error for JwtError {}

fn invalid(reason: impl Into<String>) -> JwtError {
    JwtError::Invalid(reason.into())
}

/// One usable key of a key set.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    /// The algorithms this key may verify (from its type, curve and `alg`).
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// An issuer's public keys, parsed from a JSON Web Key Set. Keys of unsupported types and
/// malformed keys are left out (each named in [`KeySet::skipped`]); a set with no usable key
/// is an error.
#[derive(Clone)]
pub struct KeySet {
    keys: Vec<Key>,
    skipped: Vec<String>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field(
                "kids",
                &self.keys.iter().map(|k| k.kid.clone()).collect::<Vec<_>>(),
            )
            .field("skipped", &self.skipped)
            .finish()
    }
}

/// The largest JWKS document accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

impl KeySet {
    /// Parses a JWKS document (`{"keys": [...]}`).
    pub fn from_json(text: &str) -> Result<KeySet, String> {
        if text.len() > MAX_JWKS_BYTES {
            return Err(format!(
                "the key set is {} bytes, over the {MAX_JWKS_BYTES}-byte limit",
                text.len()
            ));
        }
        let doc: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("the key set is not JSON: {e}"))?;
        let Some(keys) = doc.get("keys").and_then(|k| k.as_array()) else {
            return Err(
                "the key set has no \"keys\" array (expected {\"keys\": [{\"kty\": ...}]})"
                    .to_owned(),
            );
        };
        let mut set = KeySet {
            keys: Vec::new(),
            skipped: Vec::new(),
        };
        for (i, raw) in keys.iter().enumerate() {
            match parse_key(raw) {
                Ok(k) => set.keys.push(k),
                Err(e) => set.skipped.push(format!("keys[{i}]: {e}")),
            }
        }
        if set.keys.is_empty() {
            return Err(if set.skipped.is_empty() {
                "the key set has no keys".to_owned()
            } else {
                format!("the key set has no usable key: {}", set.skipped.join("; "))
            });
        }
        Ok(set)
    }

    /// The keys left out, each with its position and why.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// Whether a key with this id is in the set.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// The number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set has no usable key (never true for a set from [`KeySet::from_json`]).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn parse_key(raw: &serde_json::Value) -> Result<Key, String> {
    let kid = raw.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
    let name = kid
        .as_deref()
        .map(|k| format!("key {k:?}"))
        .unwrap_or_else(|| "key".to_owned());
    if raw.get("kty").and_then(|k| k.as_str()) == Some("oct") {
        return Err(format!(
            "{name}: symmetric (kty \"oct\") keys are not accepted; publish the issuer's public keys"
        ));
    }
    let jwk: Jwk = serde_json::from_value(raw.clone())
        .map_err(|e| format!("{name}: not a supported JSON Web Key: {e}"))?;
    if matches!(
        jwk.common.public_key_use,
        Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
    ) {
        return Err(format!(
            "{name}: \"use\": \"enc\" marks an encryption key, not a signing key"
        ));
    }
    let by_type: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            ref other => return Err(format!("{name}: curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            ref other => return Err(format!("{name}: curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err(format!("{name}: symmetric keys are not accepted"));
        }
    };
    let algorithms = match jwk.common.key_algorithm {
        None => by_type,
        Some(ka) => {
            let alg = ka
                .to_string()
                .parse::<Algorithm>()
                .map_err(|_| format!("{name}: \"alg\" {ka} is not a signature algorithm"))?;
            if !by_type.contains(&alg) {
                return Err(format!(
                    "{name}: \"alg\" {alg:?} does not fit the key's type"
                ));
            }
            vec![alg]
        }
    };
    // Check the key material now, so that a malformed key is named here and not at the
    // first request.
    let key_bytes_ok = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            b64(&p.n).is_some_and(|n| n.len() >= 256) && b64(&p.e).is_some()
        }
        AlgorithmParameters::EllipticCurve(p) => {
            let want = if p.curve == EllipticCurve::P256 {
                32
            } else {
                48
            };
            b64(&p.x).is_some_and(|x| x.len() == want) && b64(&p.y).is_some_and(|y| y.len() == want)
        }
        AlgorithmParameters::OctetKeyPair(p) => b64(&p.x).is_some_and(|x| x.len() == 32),
        AlgorithmParameters::OctetKey(_) => false,
    };
    if !key_bytes_ok {
        return Err(format!(
            "{name}: malformed key material (bad base64url, wrong length, or an RSA modulus under 2048 bits)"
        ));
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("{name}: {e}"))?;
    Ok(Key {
        kid,
        algorithms,
        key,
    })
}

fn b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

/// The `jwtRules` of the RequestAuthentications that select `w` (its namespace or the root
/// namespace, and a selector its labels match; no selector: the whole namespace, as for
/// AuthorizationPolicy), each with its resource's `namespace/name`, in the order given.
pub fn rules_for<'a>(
    ras: impl IntoIterator<Item = &'a RequestAuthentication>,
    w: Workload<'_>,
) -> Vec<(String, JwtRule)> {
    ras.into_iter()
        .filter(|ra| {
            let ns = ra.metadata.namespace();
            (ns == w.namespace || ns == super::ROOT_NAMESPACE)
                && ra
                    .spec
                    .selector
                    .as_ref()
                    .is_none_or(|s| s.matches(w.labels))
        })
        .flat_map(|ra| {
            let id = format!("{}/{}", ra.metadata.namespace(), ra.metadata.name);
            ra.spec
                .jwt_rules
                .iter()
                .map(move |r| (id.clone(), r.clone()))
        })
        .collect()
}

/// Claims given as `(name, value)` pairs (`causewayctl why --claim`) as a JWT payload: a
/// name repeated gives a list; a name written as Istio's nested form `[a][b]` sets a
/// nested claim.
pub fn claims_from_pairs(pairs: &[(String, String)]) -> serde_json::Value {
    let mut root = serde_json::Map::new();
    for (name, value) in pairs {
        let path: Vec<&str> = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
            Some(inner) => inner.split("][").collect(),
            None => vec![name.as_str()],
        };
        let Some((last, parents)) = path.split_last() else {
            continue;
        };
        let mut cur = &mut root;
        for p in parents {
            let next = cur
                .entry((*p).to_owned())
                .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
            if !next.is_object() {
                *next = serde_json::Value::Object(serde_json::Map::new());
            }
            let serde_json::Value::Object(m) = next else {
                unreachable!("made an object above")
            };
            cur = m;
        }
        let v = serde_json::Value::String(value.clone());
        match cur.get_mut(*last) {
            Some(serde_json::Value::Array(list)) => list.push(v),
            Some(old) => {
                let first = old.take();
                *old = serde_json::Value::Array(vec![first, v]);
            }
            None => {
                cur.insert((*last).to_owned(), v);
            }
        }
    }
    serde_json::Value::Object(root)
}

/// What authorization sees of a payload taken as valid (`why --claim` without a token):
/// the request principal `iss/sub` when both are there.
pub fn from_claims(claims: serde_json::Value) -> Authenticated {
    let mut a = authenticated(claims, 0);
    if a.claims.get("iss").is_none() || a.claims.get("sub").is_none() {
        a.request_principal.clear();
    }
    a
}

/// Whether a payload's `exp`/`nbf` are outside the clock-skew allowance now (for a token
/// whose signature cannot be checked): the reason, or `None`.
pub fn time_problem(claims: &serde_json::Value) -> Option<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if let Some(exp) = claims.get("exp").and_then(|v| v.as_u64())
        && exp + CLOCK_SKEW_SECS < now
    {
        return Some(format!(
            "the token expired (exp {exp}, more than {CLOCK_SKEW_SECS} s ago)"
        ));
    }
    if let Some(nbf) = claims.get("nbf").and_then(|v| v.as_u64())
        && nbf > now + CLOCK_SKEW_SECS
    {
        return Some(format!(
            "the token is not valid yet (nbf {nbf}, more than {CLOCK_SKEW_SECS} s ahead)"
        ));
    }
    None
}

/// The parts of a request a token can come from.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenRequest<'a> {
    /// Every header, name and value (names in any case).
    pub headers: &'a [(&'a str, &'a str)],
    /// The query string, without `?`.
    pub query: Option<&'a str>,
}

impl<'a> TokenRequest<'a> {
    fn headers(&self, name: &str) -> impl Iterator<Item = &'a str> + '_ {
        let name = name.to_owned();
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(&name))
            .map(|(_, v)| *v)
    }

    fn param(&self, name: &str) -> Option<&'a str> {
        self.query?
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    fn cookie(&self, name: &str) -> Option<&'a str> {
        self.headers("cookie")
            .flat_map(|h| h.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.trim_matches('"'))
    }
}

/// Where a token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenLocation {
    /// A header (name, prefix stripped).
    Header(String, String),
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

/// The locations a rule reads, in order: its `fromHeaders`, `fromParams` and
/// `fromCookies`; with none of them, Istio's default: `Authorization: Bearer <token>`, then
/// the `access_token` query parameter.
pub fn locations(rule: &JwtRule) -> Vec<TokenLocation> {
    if rule.from_headers.is_empty() && rule.from_params.is_empty() && rule.from_cookies.is_empty() {
        return vec![
            TokenLocation::Header("authorization".to_owned(), "Bearer ".to_owned()),
            TokenLocation::Param("access_token".to_owned()),
        ];
    }
    let mut out: Vec<TokenLocation> = rule
        .from_headers
        .iter()
        .map(|h| TokenLocation::Header(h.name.clone(), h.prefix.clone()))
        .collect();
    out.extend(rule.from_params.iter().cloned().map(TokenLocation::Param));
    out.extend(rule.from_cookies.iter().cloned().map(TokenLocation::Cookie));
    out
}

/// The first token found in any rule's locations, with the location. A header present with
/// the wrong prefix (e.g. `Authorization: Basic ...`) carries no token.
pub fn extract<'a>(rules: &[JwtRule], req: &TokenRequest<'a>) -> Option<(&'a str, TokenLocation)> {
    for rule in rules {
        for loc in locations(rule) {
            let found = match &loc {
                TokenLocation::Header(name, prefix) => req.headers(name).find_map(|v| {
                    if prefix.is_empty() {
                        Some(v.trim())
                    } else if v.len() >= prefix.len()
                        && v.is_char_boundary(prefix.len())
                        && v[..prefix.len()].eq_ignore_ascii_case(prefix)
                    {
                        Some(v[prefix.len()..].trim())
                    } else {
                        None
                    }
                }),
                TokenLocation::Param(name) => req.param(name),
                TokenLocation::Cookie(name) => req.cookie(name),
            };
            if let Some(t) = found.filter(|t| !t.is_empty()) {
                return Some((t, loc));
            }
        }
    }
    None
}

/// The unverified header and payload of a token, to pick the rule (by `iss`) and the key
/// (by `kid`). Refuses `alg: none` and anything that is not three base64url parts.
fn peek(token: &str) -> Result<(serde_json::Value, serde_json::Value), JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(invalid(format!(
            "the token is {} bytes, over the {MAX_TOKEN_BYTES}-byte limit",
            token.len()
        )));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(invalid(format!(
            "malformed token: a JWT has 3 dot-separated parts, this one has {}",
            parts.len()
        )));
    }
    let part = |i: usize, what: &str| -> Result<serde_json::Value, JwtError> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[i])
            .map_err(|_| invalid(format!("malformed token: the {what} is not base64url")))?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|_| invalid(format!("malformed token: the {what} is not JSON")))?;
        if !v.is_object() {
            return Err(invalid(format!(
                "malformed token: the {what} is not a JSON object"
            )));
        }
        Ok(v)
    };
    let header = part(0, "header")?;
    let payload = part(1, "payload")?;
    let alg = header.get("alg").and_then(|a| a.as_str()).unwrap_or("");
    if alg.eq_ignore_ascii_case("none") {
        return Err(invalid(
            "alg \"none\" is refused: an unsigned token is never accepted",
        ));
    }
    if parts[2].is_empty() {
        return Err(invalid("the token has no signature"));
    }
    Ok((header, payload))
}

/// Authenticates a request: `Ok(None)` without a token (left to authorization),
/// `Ok(Some(_))` for a valid token, `Err` for a token present but invalid (answer 401).
/// `keys(rule_index)` gives the key set of `rules[rule_index]` (`None`: not fetched yet or
/// unavailable, and the token is refused).
pub fn authenticate<'k>(
    rules: &[JwtRule],
    req: &TokenRequest<'_>,
    keys: impl Fn(usize) -> Option<&'k KeySet>,
) -> Result<Option<Authenticated>, JwtError> {
    let Some((token, _)) = extract(rules, req) else {
        return Ok(None);
    };
    verify(rules, token, keys).map(Some)
}

/// The index of the rule a token is for (by its `iss`), from its unverified payload; `Err`
/// for a token that is malformed, unsigned, too large or from an issuer no rule accepts.
/// Lets a caller fetch only that issuer's key set.
pub fn rule_for(rules: &[JwtRule], token: &str) -> Result<usize, JwtError> {
    let (_, payload) = peek(token)?;
    issuer_rule(rules, &payload).map(|(i, _)| i)
}

fn issuer_rule<'p>(
    rules: &[JwtRule],
    payload: &'p serde_json::Value,
) -> Result<(usize, &'p str), JwtError> {
    let iss = payload.get("iss").and_then(|i| i.as_str()).ok_or_else(|| {
        invalid("the token has no \"iss\" (issuer) claim; its issuer must match a jwtRules issuer")
    })?;
    match rules.iter().position(|r| r.issuer == iss) {
        Some(i) => Ok((i, iss)),
        None => {
            let known: Vec<&str> = rules.iter().map(|r| r.issuer.as_str()).collect();
            Err(invalid(format!(
                "issuer {iss:?} is not accepted here (accepted: {})",
                known.join(", ")
            )))
        }
    }
}

/// What a token claims, without checking its signature or times: for `causewayctl why`
/// when the issuer's keys are only at its `jwksUri` (the controller does not fetch them).
/// The token must still be well formed, signed (not `alg: none`) and from a rule's issuer.
pub fn decode_unverified(rules: &[JwtRule], token: &str) -> Result<Authenticated, JwtError> {
    let (_, payload) = peek(token)?;
    let (rule, _) = issuer_rule(rules, &payload)?;
    Ok(authenticated(payload, rule))
}

/// Verifies one token against the rules (the rule is chosen by the token's `iss`).
pub fn verify<'k>(
    rules: &[JwtRule],
    token: &str,
    keys: impl Fn(usize) -> Option<&'k KeySet>,
) -> Result<Authenticated, JwtError> {
    let (header, payload) = peek(token)?;
    let (rule_idx, iss) = issuer_rule(rules, &payload)?;
    let rule = &rules[rule_idx];
    let alg_name = header.get("alg").and_then(|a| a.as_str()).unwrap_or("");
    let alg: Algorithm = alg_name
        .parse()
        .ok()
        .filter(|a| ALGORITHMS.contains(a))
        .ok_or_else(|| {
            invalid(format!(
                "algorithm {alg_name:?} is not accepted (accepted: RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"
            ))
        })?;
    let set = keys(rule_idx).ok_or_else(|| {
        invalid(format!(
            "the key set of issuer {iss:?} is not available (not fetched yet, or its endpoint failed)"
        ))
    })?;
    let kid = header.get("kid").and_then(|k| k.as_str());
    let candidates: Vec<&Key> = set
        .keys
        .iter()
        .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
        .collect();
    if candidates.is_empty() {
        return Err(JwtError::UnknownKid {
            issuer: iss.to_owned(),
            kid: kid.unwrap_or_default().to_owned(),
        });
    }
    let candidates: Vec<&Key> = candidates
        .into_iter()
        .filter(|k| k.algorithms.contains(&alg))
        .collect();
    if candidates.is_empty() {
        return Err(invalid(format!(
            "no key of issuer {iss:?}{} is for algorithm {alg:?}",
            kid.map(|k| format!(" with key id {k:?}"))
                .unwrap_or_default()
        )));
    }
    let mut validation = Validation::new(alg);
    validation.leeway = CLOCK_SKEW_SECS;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.set_issuer(&[rule.issuer.as_str()]);
    if rule.audiences.is_empty() {
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::new();
    } else {
        validation.set_audience(&rule.audiences);
        validation.required_spec_claims = ["aud".to_owned()].into();
    }
    let mut last = None;
    for k in candidates {
        match jsonwebtoken::decode::<serde_json::Value>(token, &k.key, &validation) {
            Ok(data) => return Ok(authenticated(data.claims, rule_idx)),
            Err(e) => {
                let signature = matches!(
                    e.kind(),
                    jsonwebtoken::errors::ErrorKind::InvalidSignature
                        | jsonwebtoken::errors::ErrorKind::Crypto(_)
                );
                last = Some(explain(&e, rule, &payload));
                if !signature {
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| invalid("the token does not verify")))
}

fn explain(
    e: &jsonwebtoken::errors::Error,
    rule: &JwtRule,
    payload: &serde_json::Value,
) -> JwtError {
    use jsonwebtoken::errors::ErrorKind as K;
    let num = |k: &str| payload.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    invalid(match e.kind() {
        K::ExpiredSignature => format!(
            "the token expired (exp {}, more than {CLOCK_SKEW_SECS} s ago)",
            num("exp")
        ),
        K::ImmatureSignature => format!(
            "the token is not valid yet (nbf {}, more than {CLOCK_SKEW_SECS} s ahead)",
            num("nbf")
        ),
        K::InvalidIssuer => format!("the issuer is not {:?}", rule.issuer),
        K::InvalidAudience | K::MissingRequiredClaim(_) => format!(
            "audience {} not accepted (accepted: {})",
            payload
                .get("aud")
                .map(|a| a.to_string())
                .unwrap_or_else(|| "(none)".to_owned()),
            rule.audiences.join(", ")
        ),
        K::InvalidSignature | K::Crypto(_) => {
            "the signature does not verify with the issuer's key".to_owned()
        }
        other => format!("the token is not valid: {other:?}"),
    })
}

fn authenticated(claims: serde_json::Value, rule: usize) -> Authenticated {
    let s = |k: &str| claims.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let request_principal = format!("{}/{}", s("iss"), s("sub"));
    let audiences = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => vec![a.clone()],
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let presenter = claims
        .get("azp")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    Authenticated {
        request_principal,
        claims,
        audiences,
        presenter,
        rule,
    }
}

/// The headers a valid token adds to the request forwarded to the workload, per its rule:
/// `outputPayloadToHeader` (the payload as base64url JSON, as Envoy writes it) and
/// `outputClaimToHeaders` (a claim's value; `a.b` reads a nested claim; strings, numbers and
/// booleans only, and a value with control characters is left out so no header can be
/// injected). Whether to drop the token itself is `rule.forward_original_token` (false:
/// the caller removes it from where [`extract`] found it).
pub fn output_headers(rule: &JwtRule, auth: &Authenticated) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(h) = &rule.output_payload_to_header {
        let json = serde_json::to_vec(&auth.claims).unwrap_or_default();
        out.push((
            h.to_ascii_lowercase(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json),
        ));
    }
    for o in &rule.output_claim_to_headers {
        let mut v = auth.claims.get(&o.claim);
        if v.is_none() {
            v = o
                .claim
                .split('.')
                .try_fold(&auth.claims, |cur, k| cur.get(k));
        }
        let text = match v {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(n @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => n.to_string(),
            _ => continue,
        };
        if text.chars().any(char::is_control) {
            continue;
        }
        out.push((o.header.to_ascii_lowercase(), text));
    }
    out
}

/// The value of the `WWW-Authenticate` header of a 401 for an invalid token (RFC 6750 §3):
/// `Bearer realm="<realm>", error="invalid_token"`. Quotes, backslashes and control
/// characters are removed from the realm so the header stays well-formed.
pub fn www_authenticate(realm: &str) -> String {
    let realm: String = realm
        .chars()
        .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
        .take(256)
        .collect();
    format!("Bearer realm=\"{realm}\", error=\"invalid_token\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::resource::JwtHeader;

    fn rule(issuer: &str) -> JwtRule {
        JwtRule {
            issuer: issuer.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn tokens_are_found_where_the_rule_says() {
        let default = [rule("a")];
        let h = [("Authorization", "Bearer abc.def.ghi")];
        let req = TokenRequest {
            headers: &h,
            query: None,
        };
        assert_eq!(extract(&default, &req).unwrap().0, "abc.def.ghi");
        let basic = [("authorization", "Basic dXNlcjpwdw==")];
        let req = TokenRequest {
            headers: &basic,
            query: Some("x=1&access_token=t.o.k"),
        };
        assert_eq!(extract(&default, &req).unwrap().0, "t.o.k");
        let req = TokenRequest {
            headers: &basic,
            query: None,
        };
        assert!(extract(&default, &req).is_none());
        let custom = [JwtRule {
            from_headers: vec![JwtHeader {
                name: "x-jwt".to_owned(),
                prefix: String::new(),
            }],
            from_params: vec!["tok".to_owned()],
            from_cookies: vec!["session".to_owned()],
            ..rule("b")
        }];
        // With explicit locations, the default ones are not read.
        let req = TokenRequest {
            headers: &h,
            query: Some("access_token=x.y.z"),
        };
        assert!(extract(&custom, &req).is_none());
        let hs = [("X-JWT", " a.b.c ")];
        let req = TokenRequest {
            headers: &hs,
            query: None,
        };
        assert_eq!(extract(&custom, &req).unwrap().0, "a.b.c");
        let req = TokenRequest {
            headers: &[],
            query: Some("tok=p.q.r"),
        };
        assert_eq!(
            extract(&custom, &req).unwrap(),
            ("p.q.r", TokenLocation::Param("tok".to_owned()))
        );
        let c = [("cookie", "a=1; session=c.d.e; z=2")];
        let req = TokenRequest {
            headers: &c,
            query: None,
        };
        assert_eq!(extract(&custom, &req).unwrap().0, "c.d.e");
    }

    #[test]
    fn malformed_and_unsigned_tokens_are_refused_with_a_reason() {
        let set = KeySet {
            keys: Vec::new(),
            skipped: Vec::new(),
        };
        let rules = [rule("me")];
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!("{}.{}.", b(r#"{"alg":"none"}"#), b(r#"{"iss":"me"}"#));
        let e = verify(&rules, &none, |_| Some(&set)).unwrap_err();
        assert!(e.to_string().contains("alg \"none\" is refused"), "{e}");
        let e = verify(&rules, "abc", |_| Some(&set)).unwrap_err();
        assert!(e.to_string().contains("3 dot-separated parts"), "{e}");
        let big = "a".repeat(64 * 1024);
        let e = verify(&rules, &big, |_| Some(&set)).unwrap_err();
        assert!(e.to_string().contains("over the 16384-byte limit"), "{e}");
        let hs = format!("{}.{}.sig", b(r#"{"alg":"HS256"}"#), b(r#"{"iss":"me"}"#));
        let e = verify(&rules, &hs, |_| Some(&set)).unwrap_err();
        assert!(e.to_string().contains("\"HS256\" is not accepted"), "{e}");
        let other = format!("{}.{}.sig", b(r#"{"alg":"RS256"}"#), b(r#"{"iss":"you"}"#));
        let e = verify(&rules, &other, |_| Some(&set)).unwrap_err();
        assert!(
            e.to_string().contains("issuer \"you\" is not accepted"),
            "{e}"
        );
    }

    #[test]
    fn key_sets_skip_bad_keys_and_refuse_empty_ones() {
        let e = KeySet::from_json(r#"{"keys":[]}"#).unwrap_err();
        assert!(e.contains("no keys"), "{e}");
        let e = KeySet::from_json("[1]").unwrap_err();
        assert!(e.contains("no \"keys\" array"), "{e}");
        let e =
            KeySet::from_json(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"s"}]}"#).unwrap_err();
        assert!(e.contains("symmetric"), "{e}");
        let e = KeySet::from_json(
            r#"{"keys":[{"kty":"EC","crv":"P-256","x":"!!","y":"AAAA","kid":"bad"}]}"#,
        )
        .unwrap_err();
        assert!(e.contains("key \"bad\": malformed key material"), "{e}");
        let ok = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"ed","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},{"kty":"RSA","kid":"short","n":"AQAB","e":"AQAB"}]}"#;
        let set = KeySet::from_json(ok).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.has_kid("ed"));
        assert!(set.skipped()[0].starts_with("keys[1]: key \"short\""));
    }

    #[test]
    fn output_headers_follow_the_rule() {
        use crate::policy::resource::ClaimToHeader;
        let auth = authenticated(
            serde_json::json!({"iss": "i", "sub": "s", "n": 3, "org": {"team": "pay"}, "bad": "a\r\nx: y", "list": [1]}),
            0,
        );
        let claim = |header: &str, claim: &str| ClaimToHeader {
            header: header.to_owned(),
            claim: claim.to_owned(),
        };
        let r = JwtRule {
            output_payload_to_header: Some("X-Payload".to_owned()),
            output_claim_to_headers: vec![
                claim("x-sub", "sub"),
                claim("x-n", "n"),
                claim("x-team", "org.team"),
                claim("x-bad", "bad"),
                claim("x-list", "list"),
                claim("x-missing", "nope"),
            ],
            ..rule("i")
        };
        let got = output_headers(&r, &auth);
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&got[0].1)
            .unwrap();
        assert_eq!(got[0].0, "x-payload");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&payload).unwrap(),
            auth.claims
        );
        assert_eq!(
            got[1..],
            [
                ("x-sub".to_owned(), "s".to_owned()),
                ("x-n".to_owned(), "3".to_owned()),
                ("x-team".to_owned(), "pay".to_owned()),
            ]
        );
    }

    #[test]
    fn claims_from_pairs_build_lists_and_nested_claims() {
        let pairs: Vec<(String, String)> = [
            ("iss", "i"),
            ("sub", "s"),
            ("groups", "dev"),
            ("groups", "admin"),
            ("groups", "ops"),
            ("[org][team]", "pay"),
            ("https://example.com/role", "x"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let c = claims_from_pairs(&pairs);
        assert_eq!(
            c,
            serde_json::json!({"iss": "i", "sub": "s", "groups": ["dev", "admin", "ops"],
                "org": {"team": "pay"}, "https://example.com/role": "x"})
        );
        assert_eq!(from_claims(c).request_principal, "i/s");
        let no_sub = from_claims(serde_json::json!({"iss": "i"}));
        assert_eq!(no_sub.request_principal, "");
    }

    #[test]
    fn rules_for_selects_like_authorization_policies() {
        let docs = crate::policy::decode_documents(
            "t",
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: a, namespace: shop}\nspec: {selector: {matchLabels: {app: web}}, jwtRules: [{issuer: one, jwks: x}]}\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: mesh, namespace: causeway-system}\nspec: {jwtRules: [{issuer: two, jwks: x}]}\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: other, namespace: bank}\nspec: {jwtRules: [{issuer: three, jwks: x}]}\n",
        )
        .unwrap();
        let ras: Vec<&RequestAuthentication> = docs
            .iter()
            .filter_map(|r| match r {
                crate::policy::Resource::RequestAuthentication(ra) => Some(ra),
                _ => None,
            })
            .collect();
        let labels = [("app".to_owned(), "web".to_owned())].into();
        let got = |ns: &str, labels: &std::collections::BTreeMap<String, String>| {
            rules_for(
                ras.iter().copied(),
                Workload {
                    namespace: ns,
                    labels,
                },
            )
            .into_iter()
            .map(|(id, r)| format!("{id}:{}", r.issuer))
            .collect::<Vec<_>>()
        };
        assert_eq!(
            got("shop", &labels),
            ["shop/a:one", "causeway-system/mesh:two"]
        );
        assert_eq!(
            got("shop", &Default::default()),
            ["causeway-system/mesh:two"]
        );
        assert_eq!(
            got("bank", &labels),
            ["causeway-system/mesh:two", "bank/other:three"]
        );
    }

    #[test]
    fn the_401_header_is_well_formed() {
        assert_eq!(
            www_authenticate("http://web.shop/api"),
            "Bearer realm=\"http://web.shop/api\", error=\"invalid_token\""
        );
        assert_eq!(
            www_authenticate("a\"b\r\nc\\"),
            "Bearer realm=\"abc\", error=\"invalid_token\""
        );
    }
}
