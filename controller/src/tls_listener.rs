//! HTTPS for the admin API: the TLS acceptor built from the operator's PEM files. Each
//! handshake runs in its connection's own task, bounded by the header-read timeout and
//! counted against the connection cap ([`crate::admin_server`]), so slow or half-open
//! clients never hold up the others.

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

/// A TLS acceptor from the PEM `cert_pem` chain and `key_pem` (PKCS#8) key.
pub fn acceptor(cert_pem: &str, key_pem: &str) -> anyhow::Result<TlsAcceptor> {
    let certs: Vec<_> = crate::ca::pem_text_blocks(cert_pem, "CERTIFICATE")
        .into_iter()
        .map(rustls::pki_types::CertificateDer::from)
        .collect();
    if certs.is_empty() {
        anyhow::bail!("admin.tls_cert holds no PEM CERTIFICATE block");
    }
    let key = crate::ca::pem_text_blocks(key_pem, "PRIVATE KEY")
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("admin.tls_key holds no PEM PRIVATE KEY (PKCS#8) block"))?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}
