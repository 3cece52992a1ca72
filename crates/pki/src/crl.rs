//! Certificate revocation lists: read (PEM `X509 CRL` or DER), checked against the CA that
//! signed them, and asked whether they revoke a certificate.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::{PemObject, SectionKind};
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::cert::{serial_text, Certificate};
use crate::error::{PkiError, Result};
use crate::load::read_limited;
use crate::roots::RootSet;

/// What to do with a certificate whose revocation status is unknown: no current CRL from its
/// issuer could be read, or its CRL is past its next update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CrlPolicy {
    /// Refuse it (the safe default).
    #[default]
    Refuse,
    /// Accept it and log a warning.
    AllowAndWarn,
}

#[derive(Debug, Clone)]
pub struct RevocationList {
    pub source: PathBuf,
    /// The issuing CA's subject, as printed.
    pub issuer: String,
    pub next_update: Option<OffsetDateTime>,
    issuer_raw: Vec<u8>,
    /// The CRL as read (DER), for rustls' own revocation checks.
    der: Vec<u8>,
    /// Revoked serial numbers, upper-case hex as [`Certificate::serial`].
    serials: HashSet<String>,
}

impl RevocationList {
    /// Reads a CRL and verifies its signature with the CA in `issuers` that issued it: a CRL
    /// nobody trusted signed would let anyone revoke (or un-revoke) anything.
    pub fn load(path: &Path, issuers: &RootSet) -> Result<RevocationList> {
        RevocationList::from_bytes(path, read_limited(path)?, issuers)
    }

    /// What [`RevocationList::load`] makes of the bytes of the file at `path` (named in
    /// errors).
    pub fn from_bytes(path: &Path, bytes: Vec<u8>, issuers: &RootSet) -> Result<RevocationList> {
        let der =
            if bytes.starts_with(b"-----BEGIN") || bytes.windows(11).any(|w| w == b"-----BEGIN ") {
                <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(&bytes)
                    .filter_map(|item| item.ok())
                    .find(|(kind, _)| *kind == SectionKind::Crl)
                    .map(|(_, der)| der)
                    .ok_or_else(|| PkiError::Pem {
                        path: path.to_path_buf(),
                        reason: "no X509 CRL block in it".into(),
                    })?
            } else {
                bytes
            };
        let bad = |reason: String| PkiError::Crl {
            path: path.to_path_buf(),
            reason,
        };
        let (_, crl) = CertificateRevocationList::from_der(&der)
            .map_err(|e| bad(format!("not a CRL: {e}")))?;
        let issuer_raw = crl.issuer().as_raw().to_vec();
        let signer = issuers
            .certs
            .iter()
            .find(|ca| ca.subject_der() == issuer_raw.as_slice())
            .ok_or_else(|| {
                bad(format!(
                    "its issuer \"{}\" is not among the trusted roots",
                    crate::cert::name_text(crl.issuer())
                ))
            })?;
        let (_, signer_x509) = x509_parser::certificate::X509Certificate::from_der(signer.der())
            .map_err(|e| bad(format!("the issuer's certificate cannot be read: {e}")))?;
        crl.verify_signature(signer_x509.public_key())
            .map_err(|_| {
                bad(format!(
                    "its signature does not verify with {}",
                    signer.label()
                ))
            })?;
        Ok(RevocationList {
            source: path.to_path_buf(),
            issuer: signer.subject.clone(),
            next_update: crl.next_update().map(|t| t.to_datetime()),
            issuer_raw,
            der: der.clone(),
            serials: crl
                .iter_revoked_certificates()
                .map(|r| serial_text(r.raw_serial()))
                .collect(),
        })
    }

    pub fn load_all(paths: &[PathBuf], issuers: &RootSet) -> Result<Vec<RevocationList>> {
        paths
            .iter()
            .map(|p| RevocationList::load(p, issuers))
            .collect()
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    pub fn revokes(&self, cert: &Certificate) -> bool {
        cert.issuer_der() == self.issuer_raw.as_slice() && self.serials.contains(&cert.serial)
    }
}

/// What the configured CRLs say about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationStatus {
    /// A current CRL from its issuer does not list it.
    Good,
    Revoked {
        detail: String,
    },
    /// No current CRL from its issuer is at hand: the answer is unknown.
    Unknown {
        why: String,
    },
}

/// Checks `cert` against the CRLs from its issuer. A listing in any of them revokes it; with
/// none from its issuer, or only stale ones (past their next update), the status is unknown.
pub fn status(
    cert: &Certificate,
    crls: &[RevocationList],
    now: OffsetDateTime,
) -> RevocationStatus {
    let from_issuer: Vec<&RevocationList> = crls
        .iter()
        .filter(|crl| crl.issuer_raw.as_slice() == cert.issuer_der())
        .collect();
    if let Some(crl) = from_issuer.iter().find(|crl| crl.revokes(cert)) {
        return RevocationStatus::Revoked {
            detail: format!(
                "{} (serial {}) is revoked by {}",
                cert.label(),
                cert.serial,
                crl.source.display()
            ),
        };
    }
    if from_issuer.is_empty() {
        return RevocationStatus::Unknown {
            why: format!("no CRL from its issuer \"{}\" is loaded", cert.issuer),
        };
    }
    let current = from_issuer
        .iter()
        .any(|crl| crl.next_update.is_none_or(|next| next >= now));
    if !current {
        let stale: Vec<String> = from_issuer
            .iter()
            .map(|crl| {
                format!(
                    "{} (next update was {})",
                    crl.source.display(),
                    crl.next_update
                        .map(crate::filter::date_text)
                        .unwrap_or_default()
                )
            })
            .collect();
        return RevocationStatus::Unknown {
            why: format!(
                "the CRL from \"{}\" is stale: {}",
                cert.issuer,
                stale.join(", ")
            ),
        };
    }
    RevocationStatus::Good
}
