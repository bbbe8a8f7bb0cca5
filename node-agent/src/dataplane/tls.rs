//! Mutual TLS for the tunnel: the workload certificate on both sides, the trust bundle as
//! roots, the peer's SPIFFE ID (URI SAN) checked against the identity the mesh says the
//! endpoint has, and the pushed deny list of certificate serials.
//!
//! Workload certificates carry only a URI SAN, so the client cannot use rustls' DNS-name
//! server verifier. It verifies the chain with webpki's client-certificate path instead
//! (same chain building and signature checks against the bundle; the certificates carry
//! both serverAuth and clientAuth EKUs) and then compares the SPIFFE ID itself.

use std::collections::BTreeSet;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::identity::{Identity, cert_facts};

/// ALPN of the tunnel protocol.
pub const ALPN: &[u8] = b"causeway-tunnel/1";
/// ALPN offered and accepted on TCP: the multiplexed protocol first, then the
/// one-connection-per-stream one (agents of older versions).
pub const TCP_ALPN: [&[u8]; 2] = [super::mux::ALPN_MUX, ALPN];
/// Name sent in SNI (not used for verification).
pub const SERVER_NAME: &str = "causeway-agent";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The identity files are unusable for TLS.
    #[error("the workload identity cannot be used for the tunnel: {0}")]
    Identity(String),
}

/// ring, with AES-128-GCM first. ring's default puts AES-256-GCM first; both ends of the
/// tunnel are agents, so the client's order decides, and AES-128 does 10 rounds per block
/// instead of 14 (the TLS 1.3 mandatory suite; BoringSSL also prefers it with AES
/// hardware). The other TLS 1.3 suites stay accepted.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn roots(bundle: &[Vec<u8>]) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for der in bundle {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| TlsError::Identity(format!("trust bundle: {e}")))?;
    }
    Ok(Arc::new(roots))
}

fn chain_and_key(
    id: &Identity,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = id
        .chain_der
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    let key = causeway_api::pem::decode_all(&id.key_pem, "PRIVATE KEY")
        .into_iter()
        .next()
        .ok_or_else(|| TlsError::Identity("key.pem: no PKCS#8 PRIVATE KEY block".into()))?;
    Ok((chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key))))
}

fn chain_verifier(bundle: &[Vec<u8>]) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    rustls::server::WebPkiClientVerifier::builder_with_provider(roots(bundle)?, provider())
        .build()
        .map_err(|e| TlsError::Identity(format!("trust bundle: {e}")))
}

/// The server side (inbound): requires a client certificate chaining to `bundle`.
pub fn server_config(id: &Identity, bundle: &[Vec<u8>]) -> Result<rustls::ServerConfig, TlsError> {
    let (chain, key) = chain_and_key(id)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Identity(e.to_string()))?
        .with_client_cert_verifier(chain_verifier(bundle)?)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Identity(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // Tunnel clients never resume (each connection verifies the full chain and the
    // expected identity), so tickets would only cost a seal and a record per connection.
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// The client side (outbound) towards a peer that must present `expected` (a SPIFFE ID).
pub fn client_config(
    id: &Identity,
    bundle: &[Vec<u8>],
    expected: &str,
    deny: Arc<BTreeSet<String>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let (chain, key) = chain_and_key(id)?;
    let verifier = Arc::new(PeerVerifier {
        chain: chain_verifier(bundle)?,
        expected: expected.to_owned(),
        deny,
        provider: provider(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Identity(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Identity(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // No session resumption: every tunnel connection is verified in full against the
    // expected identity and the deny list, so a ticket cache (rustls sizes it for 256
    // servers up front) would only take memory.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// What a verified peer certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFacts {
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// Serial, hex.
    pub serial: String,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

impl PeerFacts {
    /// Whether a connection authenticated with this certificate may still carry new
    /// streams: not on the deny list pushed since, and not expired since. A pooled
    /// connection outlives its handshake, so this is checked again on every reuse.
    pub fn still_trusted(&self, deny: &BTreeSet<String>) -> Result<(), String> {
        if deny.contains(&self.serial) {
            return Err(format!(
                "peer certificate serial {} ({}) is on the deny list",
                self.serial, self.spiffe_id
            ));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if now >= self.not_after {
            return Err(format!(
                "peer certificate serial {} ({}) expired at {} (Unix seconds)",
                self.serial, self.spiffe_id, self.not_after
            ));
        }
        Ok(())
    }
}

/// Reads the peer's SPIFFE ID and serial from its leaf certificate.
pub fn peer_facts(leaf: &[u8]) -> Result<PeerFacts, String> {
    let f = cert_facts(leaf)?;
    Ok(PeerFacts {
        spiffe_id: f.spiffe_id.to_string(),
        serial: f.serial,
        not_after: f.not_after,
    })
}

/// Checks a peer certificate against the expected identity and the deny list.
pub fn check_peer(
    leaf: &[u8],
    expected: Option<&str>,
    deny: &BTreeSet<String>,
) -> Result<PeerFacts, String> {
    let facts = peer_facts(leaf)?;
    if deny.contains(&facts.serial) {
        return Err(format!(
            "peer certificate serial {} ({}) is on the deny list",
            facts.serial, facts.spiffe_id
        ));
    }
    if let Some(e) = expected
        && facts.spiffe_id != e
    {
        return Err(format!(
            "peer presented identity {}, but the endpoint's identity is {e}",
            facts.spiffe_id
        ));
    }
    Ok(facts)
}

#[derive(Debug)]
struct PeerVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    expected: String,
    deny: Arc<BTreeSet<String>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        check_peer(end_entity, Some(&self.expected), &self.deny).map_err(rustls::Error::General)?;
        Ok(ServerCertVerified::assertion())
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
