//! The host's identity on disk: `key.pem` (0600, made here, never sent), `cert.pem`
//! (certificate then intermediates), `bundle.pem` (trusted roots) and `agent.json`.
//!
//! Replacing key and certificate is crash-safe: both are written as `*.next` first, then
//! renamed key-first; a start after a crash between the renames finishes the swap.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use causeway_api::wire::Issued;
use causeway_api::{SpiffeId, hex, pem};
use serde::{Deserialize, Serialize};

/// Private key file.
pub const KEY_FILE: &str = "key.pem";
/// Certificate chain file.
pub const CERT_FILE: &str = "cert.pem";
/// Trust bundle file.
pub const BUNDLE_FILE: &str = "bundle.pem";
/// Enrollment facts.
pub const AGENT_FILE: &str = "agent.json";

/// Why the identity could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The host has not joined.
    #[error("no identity in {0}: join first with `causeway-agent join TOKEN --state-dir {0}`")]
    NotJoined(PathBuf),
    /// A file's content is wrong.
    #[error("{path} is invalid: {message}; re-join with a new token if it cannot be restored")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Key generation or CSR creation failed.
    #[error("cannot create a key or CSR: {0}")]
    Crypto(#[from] rcgen::Error),
}

/// Facts about the enrollment, kept in `agent.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentInfo {
    /// The agent's id in the controller.
    pub agent_id: String,
    /// `host:port` of the controller's control endpoint.
    pub controller: String,
    /// The workload group.
    pub group: String,
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// SHA-256 (hex) of the CA the join pinned.
    pub ca_fingerprint: String,
    /// Unix seconds.
    pub joined_at: i64,
}

/// The identity as loaded from disk.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Enrollment facts.
    pub info: AgentInfo,
    /// PEM of the private key.
    pub key_pem: String,
    /// Certificate then intermediates, DER.
    pub chain_der: Vec<Vec<u8>>,
    /// Trusted roots, DER.
    pub bundle_der: Vec<Vec<u8>>,
    /// The SPIFFE ID in the certificate.
    pub spiffe_id: SpiffeId,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Serial, hex.
    pub serial: String,
}

/// Facts read from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// The URI SAN as a SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Serial, hex.
    pub serial: String,
}

/// Reads identity, validity and serial from a certificate.
pub fn cert_facts(der: &[u8]) -> Result<CertFacts, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .ok_or("no subjectAltName")?;
    let uri = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .ok_or("no URI subjectAltName")?;
    Ok(CertFacts {
        spiffe_id: uri.parse().map_err(|e| format!("{e}"))?,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial: hex(cert.raw_serial()),
    })
}

/// A fresh ECDSA P-256 key and a CSR for it that asks for no names.
pub fn new_key_and_csr() -> Result<(rcgen::KeyPair, Vec<u8>), IdentityError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// The agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError {
    let path = path.to_owned();
    move |source| IdentityError::Io {
        action,
        path,
        source,
    }
}

/// Writes `data` to `path` through a temporary file and a rename, with `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("cannot create", &tmp))?;
    f.write_all(data).map_err(io("cannot write", &tmp))?;
    f.sync_all().map_err(io("cannot sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("cannot rename into", path))
}

impl StateDir {
    /// The state directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// A file in it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Creates the directory (0700) if needed.
    pub fn ensure(&self) -> Result<(), IdentityError> {
        std::fs::create_dir_all(&self.root).map_err(io("cannot create", &self.root))?;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
            .map_err(io("cannot set permissions on", &self.root))
    }

    /// Whether the host has joined.
    pub fn is_joined(&self) -> bool {
        self.file(AGENT_FILE).exists()
    }

    /// Finishes a key/certificate swap interrupted by a crash.
    fn recover(&self) -> Result<(), IdentityError> {
        let (key_next, cert_next) = (self.file("key.pem.next"), self.file("cert.pem.next"));
        if key_next.exists() && cert_next.exists() {
            std::fs::rename(&key_next, self.file(KEY_FILE))
                .map_err(io("cannot rename", &key_next))?;
        }
        if cert_next.exists() && !key_next.exists() {
            std::fs::rename(&cert_next, self.file(CERT_FILE))
                .map_err(io("cannot rename", &cert_next))?;
        }
        Ok(())
    }

    /// Loads the identity.
    pub fn load(&self) -> Result<Identity, IdentityError> {
        if !self.is_joined() {
            return Err(IdentityError::NotJoined(self.root.clone()));
        }
        self.recover()?;
        let read = |name: &str| {
            let p = self.file(name);
            std::fs::read_to_string(&p).map_err(io("cannot read", &p))
        };
        let invalid = |name: &str, message: String| IdentityError::Invalid {
            path: self.file(name),
            message,
        };
        let info: AgentInfo = serde_json::from_str(&read(AGENT_FILE)?)
            .map_err(|e| invalid(AGENT_FILE, e.to_string()))?;
        let key_pem = read(KEY_FILE)?;
        let chain_der = pem::decode_all(&read(CERT_FILE)?, "CERTIFICATE");
        let bundle_der = pem::decode_all(&read(BUNDLE_FILE)?, "CERTIFICATE");
        let leaf = chain_der
            .first()
            .ok_or_else(|| invalid(CERT_FILE, "no certificate".into()))?;
        if bundle_der.is_empty() {
            return Err(invalid(BUNDLE_FILE, "no certificate".into()));
        }
        let facts = cert_facts(leaf).map_err(|m| invalid(CERT_FILE, m))?;
        let key =
            rcgen::KeyPair::from_pem(&key_pem).map_err(|e| invalid(KEY_FILE, e.to_string()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| invalid(CERT_FILE, e.to_string()))?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(invalid(
                KEY_FILE,
                "the key does not belong to cert.pem".into(),
            ));
        }
        Ok(Identity {
            info,
            key_pem,
            chain_der,
            bundle_der,
            spiffe_id: facts.spiffe_id,
            not_before: facts.not_before,
            not_after: facts.not_after,
            serial: facts.serial,
        })
    }

    /// Stores a newly issued certificate with its key (join or renewal).
    pub fn save(
        &self,
        key: &rcgen::KeyPair,
        issued: &Issued,
        info: &AgentInfo,
    ) -> Result<(), IdentityError> {
        self.ensure()?;
        let cert_pem: String = issued
            .cert_chain_der
            .iter()
            .map(|d| pem::encode("CERTIFICATE", d))
            .collect();
        let bundle_pem: String = issued
            .trust_bundle_der
            .iter()
            .map(|d| pem::encode("CERTIFICATE", d))
            .collect();
        let (key_next, cert_next) = (self.file("key.pem.next"), self.file("cert.pem.next"));
        write_atomic(&key_next, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&cert_next, cert_pem.as_bytes(), 0o644)?;
        write_atomic(&self.file(BUNDLE_FILE), bundle_pem.as_bytes(), 0o644)?;
        let info_json = serde_json::to_vec_pretty(info).expect("serializable");
        write_atomic(&self.file(AGENT_FILE), &info_json, 0o644)?;
        std::fs::rename(&key_next, self.file(KEY_FILE)).map_err(io("cannot rename", &key_next))?;
        std::fs::rename(&cert_next, self.file(CERT_FILE))
            .map_err(io("cannot rename", &cert_next))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_asks_for_no_names() {
        let (_key, csr) = new_key_and_csr().unwrap();
        let (_, parsed) =
            <x509_parser::certification_request::X509CertificationRequest<'_> as x509_parser::prelude::FromDer<'_, _>>::from_der(&csr).unwrap();
        assert_eq!(
            parsed
                .certification_request_info
                .subject
                .iter_attributes()
                .count(),
            0
        );
        assert!(
            parsed
                .requested_extensions()
                .is_none_or(|mut e| e.next().is_none())
        );
    }

    #[test]
    fn not_joined_says_how() {
        let dir = tempfile::tempdir().unwrap();
        let err = StateDir::new(dir.path()).load().unwrap_err();
        assert!(err.to_string().contains("causeway-agent join"), "{err}");
    }
}
