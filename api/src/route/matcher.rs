//! Request matching of VirtualService `http[].match[]` entries, shared by the source
//! agent's route table (evaluated per request) and the controller's `why` (which also
//! wants the first condition that did not hold): one implementation, so `why` explains
//! exactly what the agents do.
//!
//! A [`RequestMatch`] is compiled once from an [`HttpMatchRequest`] (regexes, header
//! names); [`RequestMatch::check`] borrows the request ([`RequestAttrs`]) and allocates
//! nothing: it returns the matched path prefix length or the first [`Miss`].
//! Source conditions (`sourceLabels`, `sourceNamespace`) are about the calling workload,
//! not the request: [`source_applies`] decides them once per source.

use std::collections::BTreeMap;
use std::fmt;

use http::HeaderMap;
use http::header::HeaderName;
use regex_syntax::hir::literal::{ExtractKind, Extractor};

use super::resource::{HttpMatchRequest, StringMatch};

/// A compiled string match.
#[derive(Debug, Clone)]
pub enum StringMatcher {
    /// `exact`.
    Exact(String),
    /// `prefix`.
    Prefix(String),
    /// `regex`, anchored at both ends (RE2 full match, as Envoy).
    Regex(FullMatch),
    /// `{}`: any value, the header must be present.
    Any,
}

/// A regex that must match the whole value, with the literal prefix and suffix every
/// such value has (from the pattern's syntax, e.g. `/items/` and `/r7` for
/// `/items/[0-9]+/r7`). Most values that fail, fail on those two byte comparisons, so the
/// regex engine runs only for values that could match: with 1,000 VirtualServices a
/// request not taken by a host's regex routes stays within the p99 budget.
#[derive(Debug, Clone)]
pub struct FullMatch {
    re: regex::Regex,
    prefix: Box<[u8]>,
    suffix: Box<[u8]>,
}

impl FullMatch {
    /// Compiles `pattern` anchored at both ends.
    pub fn compile(pattern: &str) -> Result<FullMatch, regex::Error> {
        let re = regex::Regex::new(&format!("^(?:{pattern})$"))?;
        // The literals are taken from the unanchored pattern: a full match is one of its
        // matches, so it starts with a prefix literal and ends with a suffix literal of
        // it. Whatever the extractor cannot bound (an infinite sequence) gives the empty
        // literal, which every value has. The parser is the one `regex` uses, with the
        // same (default) syntax, so both read the pattern alike.
        let (prefix, suffix) = match regex_syntax::Parser::new().parse(pattern) {
            Ok(hir) => {
                let prefix = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
                let suffix = Extractor::new().kind(ExtractKind::Suffix).extract(&hir);
                let own = |lcp: Option<&[u8]>| lcp.map(Box::<[u8]>::from).unwrap_or_default();
                (
                    own(prefix.longest_common_prefix()),
                    own(suffix.longest_common_suffix()),
                )
            }
            Err(_) => Default::default(),
        };
        Ok(FullMatch { re, prefix, suffix })
    }

    fn nothing(_: regex::Error) -> FullMatch {
        FullMatch {
            re: regex::Regex::new("[^\\s\\S]").expect("a regex matching nothing"),
            prefix: Box::default(),
            suffix: Box::default(),
        }
    }

    /// Whether the whole of `v` matches.
    pub fn is_match(&self, v: &str) -> bool {
        let b = v.as_bytes();
        b.starts_with(&self.prefix) && b.ends_with(&self.suffix) && self.re.is_match(v)
    }
}

impl StringMatcher {
    /// Compiles `m`; with `ignore_case` the exact and prefix values are folded to lower
    /// case (the comparison folds the request's).
    pub fn compile(m: &StringMatch, ignore_case: bool) -> StringMatcher {
        let fold = |s: &String| {
            if ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.clone()
            }
        };
        if let Some(e) = &m.exact {
            StringMatcher::Exact(fold(e))
        } else if let Some(p) = &m.prefix {
            StringMatcher::Prefix(fold(p))
        } else if let Some(r) = &m.regex {
            // Validated on apply and on receipt; a regex that does not compile cannot get
            // here, and would match nothing rather than everything.
            StringMatcher::Regex(FullMatch::compile(r).unwrap_or_else(FullMatch::nothing))
        } else {
            StringMatcher::Any
        }
    }

    /// Whether this is a regex (evaluated after the cheaper comparisons).
    pub fn is_regex(&self) -> bool {
        matches!(self, StringMatcher::Regex(_))
    }

    /// Whether `v` matches; `Some(len)` is the length of the matched prefix (for a
    /// rewrite), the whole value's otherwise.
    pub fn matches(&self, v: &str, ignore_case: bool) -> Option<usize> {
        match self {
            StringMatcher::Exact(e) => {
                let ok = if ignore_case {
                    v.eq_ignore_ascii_case(e)
                } else {
                    v == e
                };
                ok.then_some(v.len())
            }
            StringMatcher::Prefix(p) => {
                let ok = v.len() >= p.len()
                    && if ignore_case {
                        v.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
                    } else {
                        v.starts_with(p.as_str())
                    };
                ok.then_some(p.len())
            }
            StringMatcher::Regex(r) => r.is_match(v).then_some(v.len()),
            StringMatcher::Any => Some(v.len()),
        }
    }
}

impl fmt::Display for StringMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatcher::Exact(e) => write!(f, "exact {e:?}"),
            StringMatcher::Prefix(p) => write!(f, "prefix {p:?}"),
            StringMatcher::Regex(r) => {
                let s = r.re.as_str();
                let inner = s
                    .strip_prefix("^(?:")
                    .and_then(|s| s.strip_suffix(")$"))
                    .unwrap_or(s);
                write!(f, "regex {inner:?}")
            }
            StringMatcher::Any => f.write_str("present"),
        }
    }
}

/// The attributes of a request that a match looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestAttrs<'a> {
    /// The path, without the query.
    pub path: &'a str,
    /// The query, without `?` (empty: none).
    pub query: &'a str,
    /// The method.
    pub method: &'a str,
    /// The authority (`:authority` or `Host`).
    pub authority: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The destination port the application dialled.
    pub port: u16,
}

/// The value of query parameter `key` in `query` (the first one; `""` without `=`).
pub fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// One compiled `match` entry (its request conditions; the source conditions are
/// decided by [`source_applies`]).
#[derive(Debug, Clone)]
pub struct RequestMatch {
    uri: Option<(StringMatcher, bool)>,
    method: Option<StringMatcher>,
    authority: Option<StringMatcher>,
    headers: Vec<(HeaderName, StringMatcher)>,
    without_headers: Vec<(HeaderName, StringMatcher)>,
    query: Vec<(String, StringMatcher)>,
    port: Option<u16>,
}

/// The first condition of a [`RequestMatch`] that a request did not meet.
#[derive(Debug, Clone, Copy)]
pub enum Miss<'m, 'r> {
    /// `port`: the request's port differs.
    Port {
        /// The match's port.
        want: u16,
        /// The request's.
        got: u16,
    },
    /// `method`.
    Method(&'m StringMatcher, &'r str),
    /// `authority`.
    Authority(&'m StringMatcher, &'r str),
    /// `headers.NAME`: absent (`None`) or another value.
    Header(&'m HeaderName, &'m StringMatcher, Option<&'r str>),
    /// `withoutHeaders.NAME`: present with a matching value.
    WithoutHeader(&'m HeaderName, &'m StringMatcher, &'r str),
    /// `queryParams.KEY`: absent or another value.
    Query(&'m str, &'m StringMatcher, Option<&'r str>),
    /// `uri`.
    Uri(&'m StringMatcher, &'r str),
}

impl fmt::Display for Miss<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let got = |v: Option<&str>| v.map_or_else(|| "absent".to_owned(), |v| format!("{v:?}"));
        match self {
            Miss::Port { want, got } => write!(f, "port: {got} is not {want}"),
            Miss::Method(m, v) => write!(f, "method: {v:?} does not match {m}"),
            Miss::Authority(m, v) => write!(f, "authority: {v:?} does not match {m}"),
            Miss::Header(n, m, v) => write!(f, "headers.{n}: {} does not match {m}", got(*v)),
            Miss::WithoutHeader(n, m, v) => {
                write!(f, "withoutHeaders.{n}: {v:?} matches {m}")
            }
            Miss::Query(k, m, v) => {
                write!(f, "queryParams.{k}: {} does not match {m}", got(*v))
            }
            Miss::Uri(m, v) => write!(f, "uri: {v:?} does not match {m}"),
        }
    }
}

impl RequestMatch {
    /// Compiles the request conditions of `m`.
    pub fn compile(m: &HttpMatchRequest) -> RequestMatch {
        let ic = m.ignore_uri_case.unwrap_or(false);
        let header_matches = |map: &BTreeMap<String, StringMatch>| {
            map.iter()
                .filter_map(|(k, v)| {
                    Some((
                        HeaderName::from_bytes(k.as_bytes()).ok()?,
                        StringMatcher::compile(v, false),
                    ))
                })
                .collect::<Vec<_>>()
        };
        RequestMatch {
            uri: m.uri.as_ref().map(|u| (StringMatcher::compile(u, ic), ic)),
            method: m.method.as_ref().map(|s| StringMatcher::compile(s, false)),
            authority: m
                .authority
                .as_ref()
                .map(|s| StringMatcher::compile(s, false)),
            headers: header_matches(&m.headers),
            without_headers: header_matches(&m.without_headers),
            query: m
                .query_params
                .iter()
                .map(|(k, v)| (k.clone(), StringMatcher::compile(v, false)))
                .collect(),
            port: m.port.and_then(|p| u16::try_from(p).ok()),
        }
    }

    /// `Some(length of the path prefix matched)` when the request matches.
    pub fn eval(&self, r: &RequestAttrs<'_>) -> Option<usize> {
        self.check(r).ok()
    }

    /// The length of the path prefix matched, or the first condition that did not hold.
    /// Every condition must hold, so the order only decides which failing one is named
    /// and what a route not taken costs: the port first, then the exact, prefix and
    /// presence comparisons, then the regexes (each pass in the order method, authority,
    /// headers, withoutHeaders, queryParams, uri). A route not taken is usually decided
    /// by a cheap comparison; a regex runs only when everything cheaper held.
    pub fn check<'m, 'r>(&'m self, r: &RequestAttrs<'r>) -> Result<usize, Miss<'m, 'r>> {
        if let Some(want) = self.port
            && want != r.port
        {
            return Err(Miss::Port { want, got: r.port });
        }
        let mut uri_len = None;
        for regex in [false, true] {
            if let Some(m) = &self.method
                && m.is_regex() == regex
                && m.matches(r.method, false).is_none()
            {
                return Err(Miss::Method(m, r.method));
            }
            if let Some(m) = &self.authority
                && m.is_regex() == regex
                && m.matches(r.authority, false).is_none()
            {
                return Err(Miss::Authority(m, r.authority));
            }
            for (name, m) in self.headers.iter().filter(|(_, m)| m.is_regex() == regex) {
                let v = r.headers.get(name).and_then(|v| v.to_str().ok());
                if v.and_then(|v| m.matches(v, false)).is_none() {
                    return Err(Miss::Header(name, m, v));
                }
            }
            for (name, m) in self
                .without_headers
                .iter()
                .filter(|(_, m)| m.is_regex() == regex)
            {
                if let Some(v) = r.headers.get(name).and_then(|v| v.to_str().ok())
                    && m.matches(v, false).is_some()
                {
                    return Err(Miss::WithoutHeader(name, m, v));
                }
            }
            for (key, m) in self.query.iter().filter(|(_, m)| m.is_regex() == regex) {
                let v = query_value(r.query, key);
                if v.and_then(|v| m.matches(v, false)).is_none() {
                    return Err(Miss::Query(key, m, v));
                }
            }
            if let Some((m, ignore_case)) = &self.uri
                && m.is_regex() == regex
            {
                uri_len = Some(
                    m.matches(r.path, *ignore_case)
                        .ok_or(Miss::Uri(m, r.path))?,
                );
            }
        }
        Ok(uri_len.unwrap_or(r.path.len()))
    }
}

/// Whether an endpoint with `labels` belongs to a subset selecting `subset` (every label
/// of the subset, with the same value; an empty subset selects every endpoint).
pub fn subset_selects(
    subset: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    subset.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether a match's source conditions hold for a workload with `labels` in
/// `namespace` (Istio: every `sourceLabels` entry, and `sourceNamespace` when set).
pub fn source_applies(
    source_labels: &BTreeMap<String, String>,
    source_namespace: Option<&String>,
    labels: &BTreeMap<String, String>,
    namespace: Option<&String>,
) -> bool {
    source_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        && source_namespace.is_none_or(|n| namespace == Some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs<'a>(path: &'a str, query: &'a str, h: &'a HeaderMap) -> RequestAttrs<'a> {
        RequestAttrs {
            path,
            query,
            method: "GET",
            authority: "web",
            headers: h,
            port: 8080,
        }
    }

    fn sm(exact: Option<&str>, prefix: Option<&str>, regex: Option<&str>) -> StringMatch {
        StringMatch {
            exact: exact.map(str::to_owned),
            prefix: prefix.map(str::to_owned),
            regex: regex.map(str::to_owned),
        }
    }

    #[test]
    fn check_names_the_first_condition_that_did_not_hold() {
        let m = RequestMatch::compile(&HttpMatchRequest {
            uri: Some(sm(None, Some("/api"), None)),
            headers: [("x-canary".to_owned(), sm(Some("1"), None, None))].into(),
            query_params: [("v".to_owned(), sm(None, None, Some("[0-9]+")))].into(),
            ..HttpMatchRequest::default()
        });
        let mut h = HeaderMap::new();
        assert_eq!(
            m.check(&attrs("/api/x", "v=2", &h))
                .unwrap_err()
                .to_string(),
            "headers.x-canary: absent does not match exact \"1\""
        );
        h.insert("x-canary", "0".parse().unwrap());
        assert_eq!(
            m.check(&attrs("/api/x", "v=2", &h))
                .unwrap_err()
                .to_string(),
            "headers.x-canary: \"0\" does not match exact \"1\""
        );
        h.insert("x-canary", "1".parse().unwrap());
        assert_eq!(
            m.check(&attrs("/api/x", "v=a", &h))
                .unwrap_err()
                .to_string(),
            "queryParams.v: \"a\" does not match regex \"[0-9]+\""
        );
        assert_eq!(
            m.check(&attrs("/web", "v=2", &h)).unwrap_err().to_string(),
            "uri: \"/web\" does not match prefix \"/api\""
        );
        assert_eq!(m.check(&attrs("/api/x", "v=2", &h)).unwrap(), 4);
        assert_eq!(m.eval(&attrs("/api/x", "v=2", &h)), Some(4));
        let port = RequestMatch::compile(&HttpMatchRequest {
            port: Some(9090),
            ..HttpMatchRequest::default()
        });
        assert_eq!(
            port.check(&attrs("/", "", &h)).unwrap_err().to_string(),
            "port: 8080 is not 9090"
        );
    }

    #[test]
    fn ignore_uri_case_and_without_headers() {
        let m = RequestMatch::compile(&HttpMatchRequest {
            uri: Some(sm(Some("/Login"), None, None)),
            ignore_uri_case: Some(true),
            without_headers: [("x-debug".to_owned(), StringMatch::default())].into(),
            ..HttpMatchRequest::default()
        });
        let mut h = HeaderMap::new();
        assert!(m.eval(&attrs("/LOGIN", "", &h)).is_some());
        h.insert("x-debug", "yes".parse().unwrap());
        assert_eq!(
            m.check(&attrs("/login", "", &h)).unwrap_err().to_string(),
            "withoutHeaders.x-debug: \"yes\" matches present"
        );
    }

    #[test]
    fn source_conditions() {
        let labels: BTreeMap<String, String> = [("app".to_owned(), "shop".to_owned())].into();
        let want: BTreeMap<String, String> = labels.clone();
        let ns = "default".to_owned();
        assert!(source_applies(&want, Some(&ns), &labels, Some(&ns)));
        assert!(!source_applies(&want, Some(&ns), &labels, None));
        assert!(!source_applies(&want, None, &BTreeMap::new(), Some(&ns)));
        assert!(source_applies(
            &BTreeMap::new(),
            None,
            &BTreeMap::new(),
            None
        ));
    }

    #[test]
    fn full_match_literals_are_what_every_match_starts_and_ends_with() {
        let f = FullMatch::compile("/items/[0-9]+/r7").unwrap();
        assert_eq!((&*f.prefix, &*f.suffix), (&b"/items/"[..], &b"/r7"[..]));
        let f = FullMatch::compile("foo|fob").unwrap();
        assert_eq!((&*f.prefix, &*f.suffix), (&b"fo"[..], &b""[..]));
        // Nothing bounds `.*`: the filter passes every value to the regex.
        let f = FullMatch::compile(".*x.*").unwrap();
        assert_eq!((&*f.prefix, &*f.suffix), (&b""[..], &b""[..]));
    }

    /// The literal filter only skips values the regex would refuse: the answers are the
    /// plain anchored regex's for patterns whose prefix and suffix overlap, fold case,
    /// alternate, repeat, or are not ASCII.
    #[test]
    fn full_match_answers_as_the_anchored_regex() {
        let patterns = [
            "/items/[0-9]+/r7",
            "abc",
            "a",
            "(?i)abc",
            "(?i)/api/v[12]/.*",
            "foo|fob",
            "ab|abab",
            "(ab)+",
            "yes|1",
            "é+/ü",
            ".*",
            "",
            "x?",
            "/static/.*\\.(css|js)",
            "[a-c]{2}z",
        ];
        let values = [
            "",
            "a",
            "abc",
            "ABC",
            "aBc",
            "abcabc",
            "abab",
            "ab",
            "fo",
            "foo",
            "fob",
            "/items/42/r7",
            "/items/42/none",
            "/items/x/r7",
            "/items//r7",
            "/items/42/r77",
            "/API/V1/x",
            "/api/v3/x",
            "yes",
            "1",
            "yes1",
            "éé/ü",
            "/ü",
            "é/u",
            "/static/a.css",
            "/static/a.cs",
            "acz",
            "abz",
            "az",
            "x",
            "xx",
        ];
        for p in patterns {
            let f = FullMatch::compile(p).unwrap();
            let plain = regex::Regex::new(&format!("^(?:{p})$")).unwrap();
            for v in values {
                assert_eq!(
                    f.is_match(v),
                    plain.is_match(v),
                    "pattern {p:?}, value {v:?}"
                );
            }
        }
        assert!(FullMatch::compile("(").is_err());
    }
}
