//! The certificate authority: a generated ECDSA P-256 root kept in the store, or an
//! operator-supplied intermediate. Issues workload certificates whose only identity is
//! the SPIFFE ID given by the caller, and the controller's own serving certificate.

use std::path::Path;

use causeway_api::{SpiffeId, TrustDomain, hex};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::SecureRandom as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::config::CaConfig;
use crate::store::{CaRecord, Store, StoreError};

/// The DNS name agents expect on the controller's control endpoint.
pub const CONTROLLER_SERVER_NAME: &str = "causeway-controller";

/// Why the CA could not be loaded or could not sign.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An operator file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// PEM or DER content is wrong.
    #[error("{what} is invalid: {message}")]
    Invalid {
        /// Which file or record.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// The configured CA differs from the one in the store.
    #[error(
        "the store holds CA {stored} ({stored_mode}), but the configuration gives CA {configured} ({configured_mode}); a restart never changes the CA: restore the original ca settings, or start with a new data_dir to build a new mesh"
    )]
    Changed {
        /// Fingerprint in the store.
        stored: String,
        /// Its mode.
        stored_mode: String,
        /// Fingerprint from the configuration.
        configured: String,
        /// Its mode.
        configured_mode: String,
    },
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(#[from] rcgen::Error),
    /// The system random generator failed.
    #[error("system random number generator failed")]
    Random,
}

/// A loaded CA, ready to sign.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    chain_der: Vec<Vec<u8>>,
    bundle_der: Vec<Vec<u8>>,
    fingerprint: [u8; 32],
    mode: &'static str,
    trust_domain: TrustDomain,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &hex(&self.fingerprint))
            .field("mode", &self.mode)
            .finish()
    }
}

/// SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn pem_certs(what: &str, pem_text: &str) -> Result<Vec<Vec<u8>>, CaError> {
    let certs: Vec<Vec<u8>> = pem_text_blocks(pem_text, "CERTIFICATE");
    if certs.is_empty() {
        return Err(CaError::Invalid {
            what: what.to_owned(),
            message: "no PEM CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Extracts the DER of every PEM block with the given label.
pub fn pem_text_blocks(text: &str, label: &str) -> Vec<Vec<u8>> {
    causeway_api::pem::decode_all(text, label)
}

/// PEM-encodes DER with a label.
pub fn to_pem(label: &str, der: &[u8]) -> String {
    causeway_api::pem::encode(label, der)
}

fn unix(t: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A strictly increasing number per process, from the wall clock in nanoseconds: keys
/// built on it sort in issue order, so the store appends them instead of rewriting
/// pages all over its trees (random keys cost ~10 KiB of sled writes per certificate).
pub fn time_ordered() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX >> 1))
        .unwrap_or(0);
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

/// A certificate serial: 8 bytes that increase in issue order (see [`time_ordered`]),
/// then 8 random bytes (64 bits of entropy, as the CA/Browser Forum asks of public CAs).
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&time_ordered().to_be_bytes());
    ring::rand::SystemRandom::new()
        .fill(&mut bytes[8..])
        .map_err(|_| CaError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

impl Ca {
    /// Loads the CA from the store, or creates it at first start (generated root or the
    /// configured intermediate). Refuses to start if the configuration names another CA.
    pub fn load_or_create(
        store: &dyn Store,
        cfg: &CaConfig,
        td: &TrustDomain,
        now: i64,
    ) -> Result<Self, CaError> {
        let configured = match (&cfg.intermediate_cert_chain, &cfg.intermediate_key) {
            (Some(chain), Some(key)) => Some(Self::read_intermediate(chain, key, now)?),
            _ => None,
        };
        let stored = store.ca()?;
        let record = match (stored, configured) {
            (Some(stored), Some(conf)) => {
                if stored.fingerprint != conf.fingerprint {
                    return Err(CaError::Changed {
                        stored: stored.fingerprint,
                        stored_mode: stored.mode,
                        configured: conf.fingerprint,
                        configured_mode: conf.mode,
                    });
                }
                conf
            }
            (Some(stored), None) => {
                if stored.mode != "generated" {
                    return Err(CaError::Changed {
                        stored: stored.fingerprint,
                        stored_mode: stored.mode,
                        configured: "(none: would generate a new root)".into(),
                        configured_mode: "generated".into(),
                    });
                }
                stored
            }
            (None, Some(conf)) => {
                let mut to_store = conf.clone();
                to_store.key_pem = String::new();
                store.init_ca(&to_store)?;
                conf
            }
            (None, None) => {
                let generated = Self::generate_root(td, now)?;
                // init_ca keeps an existing CA if another writer got there first.
                store.init_ca(&generated)?
            }
        };
        Self::from_record(&record, td)
    }

    fn generate_root(td: &TrustDomain, now: i64) -> Result<CaRecord, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Causeway");
        dn.push(DnType::CommonName, format!("Causeway root CA for {td}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = unix(now - 3600);
        params.not_after = unix(now + 10 * 365 * 24 * 3600);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(CaRecord {
            fingerprint: hex(&fingerprint(cert.der())),
            trust_bundle: vec![cert_pem.clone()],
            cert_pem,
            key_pem: key.serialize_pem(),
            mode: "generated".into(),
            created_at: now,
        })
    }

    fn read_intermediate(chain: &Path, key: &Path, now: i64) -> Result<CaRecord, CaError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let chain_text = read(chain)?;
        let key_pem = read(key)?;
        let certs = pem_certs(&chain.display().to_string(), &chain_text)?;
        let root = certs.last().expect("non-empty");
        Ok(CaRecord {
            // The whole chain: the signing CA first, then what is above it.
            cert_pem: chain_text.clone(),
            key_pem,
            fingerprint: hex(&fingerprint(&certs[0])),
            mode: "intermediate".into(),
            trust_bundle: vec![to_pem("CERTIFICATE", root)],
            created_at: now,
        })
    }

    fn from_record(record: &CaRecord, td: &TrustDomain) -> Result<Self, CaError> {
        let invalid = |message: String| CaError::Invalid {
            what: format!("CA ({})", record.mode),
            message,
        };
        let chain_der = pem_certs("CA certificate", &record.cert_pem)?;
        let key = KeyPair::from_pem(&record.key_pem)
            .map_err(|e| invalid(format!("cannot read the CA key: {e}")))?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(invalid("the CA key must be ECDSA P-256".into()));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(&chain_der[0])
            .map_err(|e| invalid(format!("cannot parse the CA certificate: {e}")))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(invalid(
                "the CA key does not belong to the CA certificate (first certificate of the chain)"
                    .into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(chain_der[0].clone()), key)
            .map_err(|e| invalid(format!("cannot use the CA certificate: {e}")))?;
        let mut bundle_der = Vec::new();
        for pem in &record.trust_bundle {
            bundle_der.extend(pem_certs("trust bundle", pem)?);
        }
        Ok(Self {
            issuer,
            fingerprint: fingerprint(&chain_der[0]),
            chain_der,
            bundle_der,
            mode: if record.mode == "generated" {
                "generated"
            } else {
                "intermediate"
            },
            trust_domain: td.clone(),
        })
    }

    /// SHA-256 of the signing CA's certificate (what join tokens pin).
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// "generated" or "intermediate".
    pub fn mode(&self) -> &'static str {
        self.mode
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The signing CA certificate and the chain above it (DER), sent after every leaf.
    pub fn chain_der(&self) -> &[Vec<u8>] {
        &self.chain_der
    }

    /// The roots every agent trusts (DER).
    pub fn bundle_der(&self) -> &[Vec<u8>] {
        &self.bundle_der
    }

    /// Issues a workload certificate for `key` whose only name is `id`.
    /// Returns the DER and the serial (hex).
    pub fn issue_workload(
        &self,
        key: &impl PublicKeyData,
        id: &SpiffeId,
        not_before: i64,
        not_after: i64,
    ) -> Result<(Vec<u8>, String), CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Sign(e))?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = unix(not_before);
        params.not_after = unix(not_after);
        let serial = random_serial()?;
        let serial_hex = hex(&serial.to_bytes());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(key, &self.issuer)?;
        Ok((cert.der().to_vec(), serial_hex))
    }

    /// Issues the controller's serving certificate with a fresh key.
    pub fn issue_server(
        &self,
        now: i64,
        lifetime_secs: i64,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec![CONTROLLER_SERVER_NAME.to_owned()])?;
        params.distinguished_name = DistinguishedName::new();
        let id = SpiffeId::new(self.trust_domain.clone(), "causeway-system", "controller")
            .expect("static labels are valid");
        params.subject_alt_names.push(SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Sign(e))?,
        ));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = unix(now - 300);
        params.not_after = unix(now + lifetime_secs);
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(
            self.chain_der
                .iter()
                .map(|d| CertificateDer::from(d.clone())),
        );
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((chain, key_der))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn td() -> TrustDomain {
        "causeway.local".parse().unwrap()
    }

    #[test]
    fn generated_root_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let fp1 = {
            let store = SledStore::reopen(dir.path()).unwrap();
            Ca::load_or_create(&store, &CaConfig::default(), &td(), 1_000_000)
                .unwrap()
                .fingerprint()
        };
        let store = SledStore::reopen(dir.path()).unwrap();
        let ca = Ca::load_or_create(&store, &CaConfig::default(), &td(), 2_000_000).unwrap();
        assert_eq!(ca.fingerprint(), fp1);
        assert_eq!(ca.mode(), "generated");
    }

    #[test]
    fn workload_cert_carries_only_the_spiffe_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::reopen(dir.path()).unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let ca = Ca::load_or_create(&store, &CaConfig::default(), &td(), now).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let id: SpiffeId = "spiffe://causeway.local/ns/default/sa/web".parse().unwrap();
        let (der, serial) = ca.issue_workload(&key, &id, now, now + 3600).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, vec![format!("URI({id})")]);
        assert_eq!(hex(cert.raw_serial()), serial);
        assert_eq!(cert.validity().not_after.timestamp(), now + 3600);
    }

    #[test]
    fn intermediate_from_files_and_change_refused() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        // A company root and an intermediate signed by it.
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut root_params = CertificateParams::new(vec![]).unwrap();
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = rcgen::CertifiedIssuer::self_signed(root_params, root_key).unwrap();
        let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut int_params = CertificateParams::new(vec![]).unwrap();
        int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let int_cert = int_params.signed_by(&int_key, &root).unwrap();
        let chain = dir.path().join("chain.pem");
        let keyf = dir.path().join("key.pem");
        std::fs::write(&chain, format!("{}{}", int_cert.pem(), root.pem())).unwrap();
        std::fs::write(&keyf, int_key.serialize_pem()).unwrap();
        let cfg = CaConfig {
            intermediate_cert_chain: Some(chain),
            intermediate_key: Some(keyf.clone()),
            ..CaConfig::default()
        };
        let store = SledStore::reopen(&dir.path().join("db")).unwrap();
        let ca = Ca::load_or_create(&store, &cfg, &td(), now).unwrap();
        assert_eq!(ca.mode(), "intermediate");
        assert_eq!(ca.fingerprint(), fingerprint(int_cert.der()));
        assert_eq!(ca.bundle_der(), &[root.der().to_vec()]);
        assert!(
            store.ca().unwrap().unwrap().key_pem.is_empty(),
            "operator key is not copied into the store"
        );
        // Dropping the intermediate from the config would silently mint a new root: refused.
        let err = Ca::load_or_create(&store, &CaConfig::default(), &td(), now).unwrap_err();
        assert!(matches!(err, CaError::Changed { .. }), "{err}");
        // A key that does not match the certificate is refused.
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(&keyf, other.serialize_pem()).unwrap();
        let err = Ca::load_or_create(&store, &cfg, &td(), now).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }
}
