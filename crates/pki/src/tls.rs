//! A server's (or client's) own certificate and key, read from files, ready for rustls.

use std::path::Path;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{PkiError, Result};
use crate::load::{self, key_spki, Pkcs12Password};

/// A certificate chain (leaf first) and the leaf's private key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Reads the chain from `cert` and the key from `key` (PEM or DER; both may be one file),
    /// and checks that the key belongs to the leaf.
    pub fn load(cert: &Path, key: &Path) -> Result<Identity> {
        let certs = load::read_file(cert, &Pkcs12Password::empty())?.certs;
        let Some(leaf) = certs.first() else {
            return Err(PkiError::NoCertificates {
                path: cert.to_path_buf(),
            });
        };
        let keys = load::read_file(key, &Pkcs12Password::empty())?.keys;
        let Some(key_der) = keys.into_iter().next() else {
            return Err(PkiError::Pem {
                path: key.to_path_buf(),
                reason: "no PRIVATE KEY block in it".into(),
            });
        };
        match key_spki(&key_der) {
            Ok(spki) if spki == leaf.spki() => {}
            Ok(_) => {
                return Err(PkiError::KeyMismatch {
                    key: key.to_path_buf(),
                    cert: cert.to_path_buf(),
                })
            }
            Err(why) => {
                return Err(PkiError::Pem {
                    path: key.to_path_buf(),
                    reason: format!("the private key cannot be used: {why}"),
                })
            }
        }
        Ok(Identity {
            chain: certs
                .iter()
                .map(|c| CertificateDer::from(c.der().to_vec()))
                .collect(),
            key: key_der,
        })
    }
}
