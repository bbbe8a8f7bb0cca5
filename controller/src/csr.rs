//! CSR intake: parse, check the signature, accept only the public key.
//!
//! Every name, extension and attribute the CSR asks for is ignored: the certificate's
//! identity comes from the workload group, never from the request.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

/// OID of id-ecPublicKey.
const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
/// OID of the P-256 curve (prime256v1).
const P256: &str = "1.2.840.10045.3.1.7";

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// Empty input.
    #[error("the CSR is empty")]
    Empty,
    /// Not DER of a PKCS#10 request.
    #[error("the CSR is not a valid PKCS#10 request in DER: {0}")]
    Parse(String),
    /// Bytes after the request.
    #[error("the CSR has {0} trailing bytes after the request")]
    Trailing(usize),
    /// The self-signature does not verify.
    #[error("the CSR's signature does not verify: it was not signed by the key it carries")]
    Signature,
    /// Key type not supported.
    #[error("the CSR's key is {0}; Causeway agents use ECDSA P-256 keys")]
    KeyType(String),
}

/// The public key taken from a CSR (uncompressed P-256 point), usable by rcgen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrKey {
    point: Vec<u8>,
    /// The names the CSR asked for (all ignored; kept for the log).
    pub requested_names: Vec<String>,
}

impl rcgen::PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Parses and verifies a CSR, returning only its public key.
pub fn parse_csr(der: &[u8]) -> Result<CsrKey, CsrError> {
    if der.is_empty() {
        return Err(CsrError::Empty);
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Trailing(rest.len()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let alg = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    if alg != EC_PUBLIC_KEY || curve.as_deref() != Some(P256) {
        return Err(CsrError::KeyType(format!(
            "algorithm {alg} curve {}",
            curve.as_deref().unwrap_or("none")
        )));
    }
    let point = spki.subject_public_key.data.to_vec();
    if point.len() != 65 || point[0] != 4 {
        return Err(CsrError::KeyType("a malformed P-256 point".into()));
    }
    csr.verify_signature().map_err(|_| CsrError::Signature)?;
    let mut requested_names = Vec::new();
    for attr in csr.certification_request_info.subject.iter_attributes() {
        if let Ok(s) = attr.as_str() {
            requested_names.push(format!("subject:{s}"));
        }
    }
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    requested_names.push(format!("san:{name}"));
                }
            }
        }
    }
    Ok(CsrKey {
        point,
        requested_names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_with(names: Vec<String>, alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(names).unwrap();
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn accepts_p256_and_reports_requested_names() {
        let der = csr_with(
            vec!["evil.example.com".into()],
            &rcgen::PKCS_ECDSA_P256_SHA256,
        );
        let key = parse_csr(&der).unwrap();
        assert!(
            key.requested_names
                .iter()
                .any(|n| n.contains("evil.example.com"))
        );
    }

    #[test]
    fn refuses_other_key_types() {
        let der = csr_with(vec![], &rcgen::PKCS_ED25519);
        assert!(matches!(parse_csr(&der), Err(CsrError::KeyType(_))));
        let der = csr_with(vec![], &rcgen::PKCS_ECDSA_P384_SHA384);
        assert!(matches!(parse_csr(&der), Err(CsrError::KeyType(_))));
    }

    #[test]
    fn refuses_malformed_and_tampered() {
        assert_eq!(parse_csr(&[]), Err(CsrError::Empty));
        assert!(matches!(parse_csr(b"not a csr"), Err(CsrError::Parse(_))));
        let der = csr_with(vec!["a.example".into()], &rcgen::PKCS_ECDSA_P256_SHA256);
        assert!(matches!(
            parse_csr(&der[..der.len() / 2]),
            Err(CsrError::Parse(_))
        ));
        let mut long = der.clone();
        long.push(0);
        assert_eq!(parse_csr(&long), Err(CsrError::Trailing(1)));
        // Flip a byte inside the requested name: the signature no longer verifies.
        let mut tampered = der.clone();
        let pos = tampered.windows(9).position(|w| w == b"a.example").unwrap();
        tampered[pos] = b'b';
        assert_eq!(parse_csr(&tampered), Err(CsrError::Signature));
    }
}
