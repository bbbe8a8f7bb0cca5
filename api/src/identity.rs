//! Trust domains and SPIFFE IDs (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`).

use std::fmt;
use std::str::FromStr;

/// Why a trust domain, namespace, service account or SPIFFE ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The trust domain is empty, too long, or has characters outside `[a-z0-9.-_]`.
    #[error(
        "invalid trust domain {0:?}: use 1-255 lower-case letters, digits, '.', '-' or '_' (for example \"causeway.local\")"
    )]
    TrustDomain(String),
    /// A namespace or service-account segment is not a DNS-1123 label.
    #[error(
        "invalid {what} {value:?}: use 1-63 lower-case letters, digits or '-', starting and ending with a letter or digit"
    )]
    Segment {
        /// Which segment ("namespace", "service account").
        what: &'static str,
        /// The refused value.
        value: String,
    },
    /// The text is not of the form `spiffe://<td>/ns/<ns>/sa/<sa>`.
    #[error(
        "invalid SPIFFE ID {0:?}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    SpiffeId(String),
}

/// A SPIFFE trust domain such as `causeway.local`.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The trust domain as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
            })
            && !s.starts_with('.')
            && !s.ends_with('.');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdentityError::TrustDomain(s.to_owned()))
        }
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TrustDomain> for String {
    fn from(td: TrustDomain) -> Self {
        td.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a namespace or service account: a DNS-1123 label.
pub fn validate_label(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let bytes = value.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Segment {
            what,
            value: value.to_owned(),
        })
    }
}

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds an ID from its parts, validating each.
    pub fn new(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        validate_label("namespace", namespace)?;
        validate_label("service account", service_account)?;
        Ok(Self {
            trust_domain,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdentityError::SpiffeId(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let td = parts.next().ok_or_else(bad)?;
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        let td: TrustDomain = td.parse()?;
        Self::new(td, ns, sa)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_spiffe_ids() {
        let id: SpiffeId = "spiffe://causeway.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain().as_str(), "causeway.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://causeway.local/ns/default/sa/web");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://causeway.local/ns/default/sa/web\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    }

    #[test]
    fn refuses_malformed_spiffe_ids() {
        for bad in [
            "",
            "spiffe://",
            "http://causeway.local/ns/a/sa/b",
            "spiffe://causeway.local/ns/a",
            "spiffe://causeway.local/ns/a/sa/b/extra",
            "spiffe://causeway.local/sa/a/ns/b",
            "spiffe://Causeway.local/ns/a/sa/b",
            "spiffe://causeway.local/ns/A/sa/b",
            "spiffe://causeway.local/ns/-a/sa/b",
            "spiffe://causeway.local/ns//sa/b",
            "spiffe://causeway.local/ns/a/sa/b c",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "accepted {bad:?}");
        }
        let err = "spiffe://x/ns/a".parse::<SpiffeId>().unwrap_err();
        assert!(
            err.to_string().contains("spiffe://<trust-domain>/ns/"),
            "{err}"
        );
    }

    #[test]
    fn trust_domain_rules() {
        assert!("causeway.local".parse::<TrustDomain>().is_ok());
        assert!("example_corp-1.internal".parse::<TrustDomain>().is_ok());
        assert!("".parse::<TrustDomain>().is_err());
        assert!(".local".parse::<TrustDomain>().is_err());
        assert!("UPPER".parse::<TrustDomain>().is_err());
        assert!("a/b".parse::<TrustDomain>().is_err());
        assert!("x".repeat(256).parse::<TrustDomain>().is_err());
    }
}
