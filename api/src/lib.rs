//! `causeway-api`: the domain model and wire messages of Causeway.
//!
//! What it does: defines identities (trust domains, SPIFFE IDs), workload groups, join
//! tokens and their text encoding, the control-protocol messages with their framing, and
//! the policy resources (Istio's AuthorizationPolicy and PeerAuthentication) with their
//! evaluator, with validation for each.
//!
//! What it does not: open sockets, read clocks, spawn tasks or touch files. Everything
//! here is pure and unit-tested; callers pass in the current time where it matters.

pub mod admin;
pub mod analyze;
pub mod backoff;
pub mod duration;
pub mod group;
pub mod identity;
pub mod netvalue;
pub mod pem;
pub mod policy;
pub mod protocol;
pub mod push;
pub mod registry;
pub mod route;
pub mod token;
pub mod wire;

pub use group::{MtlsMode, PortSpec, WorkloadGroup};
pub use identity::{SpiffeId, TrustDomain};
pub use token::JoinToken;

/// Lower-case hex encoding of bytes (fingerprints, ids).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0x0f) as usize] as char);
    }
    out
}

/// Decodes hex (either case, optional `:` separators as printed by openssl).
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let clean: Vec<u8> = text.bytes().filter(|b| *b != b':').collect();
    if !clean.len().is_multiple_of(2) {
        return None;
    }
    clean
        .chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

/// An error and its causes on one line, `outer: cause: root cause`, each cause once: a
/// cause whose text the message already contains (an error that prints its source in its
/// own message, like `cannot read x: No such file`) is not repeated.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrap(String, Option<Box<dyn std::error::Error + 'static>>);
    impl std::fmt::Display for Wrap {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Wrap {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref()
        }
    }

    /// `cannot read x: No such file (os error 2): No such file (os error 2)` was printed
    /// when an error carried its source both in its text and as its source.
    #[test]
    fn error_chain_names_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let io_text = io.to_string();
        let inner = Wrap(format!("cannot read /x: {io_text}"), Some(Box::new(io)));
        let outer = Wrap("cannot start".into(), Some(Box::new(inner)));
        let text = error_chain(&outer);
        assert_eq!(text, format!("cannot start: cannot read /x: {io_text}"));
        assert_eq!(text.matches(&io_text).count(), 1, "{text}");
        let plain = Wrap("a".into(), Some(Box::new(Wrap("b".into(), None))));
        assert_eq!(error_chain(&plain), "a: b");
    }

    #[test]
    fn hex_round_trip() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&bytes), "0001abff");
        assert_eq!(unhex("0001ABFF").unwrap(), bytes);
        assert_eq!(unhex("00:01:ab:ff").unwrap(), bytes);
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }
}
