//! Minimal PEM encoding and decoding (RFC 7468 text blocks around base64 DER).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// PEM-encodes DER under `label` (e.g. "CERTIFICATE"), 64 characters a line.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER of every well-formed block with `label`, in order; other blocks are skipped.
pub fn decode_all(text: &str, label: &str) -> Vec<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start + begin.len()..];
        let Some(stop) = after.find(&end) else { break };
        let b64: String = after[..stop]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if let Ok(der) = STANDARD.decode(b64) {
            out.push(der);
        }
        rest = &after[stop + end.len()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_several_blocks() {
        let a = vec![1u8; 100];
        let b = vec![2u8; 3];
        let text = format!(
            "junk\n{}{}{}",
            encode("CERTIFICATE", &a),
            encode("PRIVATE KEY", &[9]),
            encode("CERTIFICATE", &b)
        );
        assert_eq!(decode_all(&text, "CERTIFICATE"), vec![a, b]);
        assert_eq!(decode_all(&text, "PRIVATE KEY"), vec![vec![9]]);
        assert!(decode_all("-----BEGIN CERTIFICATE-----\nAAA", "CERTIFICATE").is_empty());
    }
}
