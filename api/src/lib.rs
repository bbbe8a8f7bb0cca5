//! `causeway-api`: the domain model and wire messages of Causeway.
//!
//! What it does: defines identities (trust domains, SPIFFE IDs), workload groups, join
//! tokens and their text encoding, the control-protocol messages with their framing, and
//! the policy resources (Istio's AuthorizationPolicy and PeerAuthentication) with their
//! evaluator, with validation for each.
//!
//! What it does not: open sockets, read clocks, spawn tasks or touch files. Everything
//! here is pure and unit-tested; callers pass in the current time where it matters.

pub mod duration;
pub mod group;
pub mod identity;
pub mod pem;
pub mod policy;
pub mod push;
pub mod registry;
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

#[cfg(test)]
mod tests {
    use super::*;

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
