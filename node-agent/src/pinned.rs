//! Server verification for the join: the controller's chain must contain the CA whose
//! SHA-256 fingerprint the join token pins, and the leaf must verify against that CA.

use std::sync::{Arc, Mutex};

use causeway_api::hex;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Verifies the controller against a pinned CA fingerprint.
#[derive(Debug)]
pub struct PinnedCa {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
    /// Why the last verification failed, in words for the operator.
    pub failure: Mutex<Option<String>>,
}

impl PinnedCa {
    /// A verifier pinning `fingerprint`.
    pub fn new(fingerprint: [u8; 32], provider: Arc<CryptoProvider>) -> Self {
        Self {
            fingerprint,
            provider,
            failure: Mutex::new(None),
        }
    }

    fn fail(&self, msg: String) -> rustls::Error {
        if let Ok(mut f) = self.failure.lock() {
            *f = Some(msg.clone());
        }
        rustls::Error::General(msg)
    }
}

fn sha256(der: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .try_into()
        .expect("32 bytes")
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(anchor) = intermediates.iter().find(|c| sha256(c) == self.fingerprint) else {
            let offered: Vec<String> = intermediates.iter().map(|c| hex(&sha256(c))).collect();
            return Err(self.fail(format!(
                "the controller's CA does not match the join token: the token pins {}, the controller presented {}; the token belongs to another controller (or the controller's CA changed): create a new token on the right controller",
                hex(&self.fingerprint),
                if offered.is_empty() { "no CA certificate".into() } else { offered.join(", ") }
            )));
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(anchor.clone().into_owned())
            .map_err(|e| self.fail(format!("pinned CA certificate is unusable: {e}")))?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| self.fail(format!("cannot build verifier: {e}")))?;
        inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| {
                self.fail(format!(
                    "the controller's certificate does not verify against the pinned CA: {e}"
                ))
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
