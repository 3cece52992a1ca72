//! How the gateway judges devices: the roots their certificates must chain to, the CRLs that
//! may revoke them and what to do when revocation cannot be checked, and the site's token
//! keys. Built from the configuration at start and again on every reload, then swapped in
//! whole; a connection judged under an older one is judged again on its next request, so a
//! revocation or a key leaving the configuration takes effect at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use channel::refusal::Cause;
use pki::crl::{CrlPolicy, RevocationList, RevocationStatus};
use pki::tls::{judge_peer, PeerCert};
use pki::{Certificate, RootSet};
use time::OffsetDateTime;

use crate::token::{TokenPolicy, TokenSettings};

pub struct DeviceAuth {
    /// Bumped on every reload; connections judged under an older one are judged again.
    pub generation: u64,
    pub roots: RootSet,
    /// Present when `verify_client_revocation` is on.
    pub revocation: Option<Revocation>,
    /// Present when `[tokens]` is configured.
    pub tokens: Option<TokenPolicy>,
    /// Devices already judged trusted under these settings, so a device that reconnects
    /// costs no chain verification (one P-256 signature check each).
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    /// The earliest moment a trusted root stops being valid: no cached judgement outlives it.
    roots_valid_until: OffsetDateTime,
}

/// A device certificate judged trusted, and how long that judgement may be reused.
struct Cached {
    /// Shared with every connection judged by this entry: one copy per device, not one per
    /// connection beside the cache's (a certificate with its raw parts is ~1.5 KiB).
    cert: Arc<Certificate>,
    warning: Option<String>,
    valid_from: OffsetDateTime,
    valid_until: OffsetDateTime,
    stored: Instant,
}

/// The most device certificates remembered; past it the cache starts over.
const CACHE_ENTRIES: usize = 16_384;
/// A cached judgement is redone after this long, so a CRL going stale is noticed.
const CACHE_TTL: Duration = Duration::from_secs(300);

pub struct Revocation {
    pub crls: Vec<RevocationList>,
    /// CRL files that could not be read or verified, with why.
    pub unreadable: Vec<String>,
    pub policy: CrlPolicy,
}

/// A device connection's certificate, as judged.
#[derive(Clone)]
pub struct Judgement {
    pub generation: u64,
    pub cert: Result<Arc<Certificate>, Cause>,
    /// Set when the device was let in with its revocation status unknown (allow-and-warn).
    pub warning: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("[tokens]: {0}")]
    Token(#[from] crate::token::TokenError),
}

impl DeviceAuth {
    /// Loads roots, CRLs and token keys. Unreadable CRLs are not fatal: they are reported and
    /// the CRL policy decides for the devices they would have covered.
    pub fn load(
        generation: u64,
        trusted_roots: &[PathBuf],
        revocation: Option<(&[PathBuf], CrlPolicy)>,
        tokens: Option<&TokenSettings>,
    ) -> Result<DeviceAuth, AuthError> {
        DeviceAuth::load_with_crl_issuers(
            generation,
            trusted_roots,
            &RootSet::default(),
            revocation,
            tokens,
        )
    }

    /// [`DeviceAuth::load`], where a CRL may also be signed by one of `more_issuers` (the
    /// connector roots: the gateway reads its CRLs once, for devices and connectors).
    pub fn load_with_crl_issuers(
        generation: u64,
        trusted_roots: &[PathBuf],
        more_issuers: &RootSet,
        revocation: Option<(&[PathBuf], CrlPolicy)>,
        tokens: Option<&TokenSettings>,
    ) -> Result<DeviceAuth, AuthError> {
        let roots = RootSet::load(trusted_roots)?;
        let revocation = revocation.map(|(files, policy)| {
            let mut issuers = roots.clone();
            issuers.certs.extend(more_issuers.certs.iter().cloned());
            let mut crls = Vec::new();
            let mut unreadable = Vec::new();
            for file in files {
                match RevocationList::load(file, &issuers) {
                    Ok(crl) => crls.push(crl),
                    Err(e) => unreadable.push(e.to_string()),
                }
            }
            Revocation {
                crls,
                unreadable,
                policy,
            }
        });
        let tokens = tokens.map(TokenPolicy::load).transpose()?;
        let roots_valid_until = roots
            .certs
            .iter()
            .map(|r| r.not_after)
            .min()
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        Ok(DeviceAuth {
            generation,
            roots,
            revocation,
            tokens,
            cache: Mutex::new(HashMap::new()),
            roots_valid_until,
        })
    }

    /// One line for the log: what devices are judged against now.
    pub fn describe(&self) -> String {
        let mut parts = vec![format!("{} trusted root(s)", self.roots.certs.len())];
        match &self.revocation {
            Some(r) => parts.push(format!(
                "revocation checked with {} CRL(s){} (unknown status: {})",
                r.crls.len(),
                if r.unreadable.is_empty() {
                    String::new()
                } else {
                    format!(", {} unreadable", r.unreadable.len())
                },
                match r.policy {
                    CrlPolicy::Refuse => "refuse",
                    CrlPolicy::AllowAndWarn => "allow and warn",
                }
            )),
            None => parts.push("revocation not checked".into()),
        }
        match &self.tokens {
            Some(t) => parts.push(format!("tokens: {}", t.describe())),
            None => parts.push("no token keys (CCM_PROXY_SERVERAUTH refused)".into()),
        }
        parts.join("; ")
    }

    /// Judges a device's leaf certificate (DER): trusted root, validity, then revocation. A
    /// certificate judged trusted before under these settings is taken from the cache while
    /// it and the roots are valid and for at most [`CACHE_TTL`].
    pub fn judge(&self, leaf: Option<&[u8]>, now: OffsetDateTime) -> Judgement {
        let Some(der) = leaf else {
            return self.judge_uncached(None, now);
        };
        let mut key = [0u8; 32];
        key.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(hit) = cache.get(&key) {
                if now >= hit.valid_from
                    && now <= hit.valid_until
                    && hit.stored.elapsed() < CACHE_TTL
                {
                    return Judgement {
                        generation: self.generation,
                        cert: Ok(hit.cert.clone()),
                        warning: hit.warning.clone(),
                    };
                }
            }
        }
        let judged = self.judge_uncached(leaf, now);
        if let Ok(cert) = &judged.cert {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(
                key,
                Cached {
                    cert: cert.clone(),
                    warning: judged.warning.clone(),
                    valid_from: cert.not_before,
                    valid_until: cert.not_after.min(self.roots_valid_until),
                    stored: Instant::now(),
                },
            );
        }
        judged
    }

    fn judge_uncached(&self, leaf: Option<&[u8]>, now: OffsetDateTime) -> Judgement {
        let judged = |cert, warning| Judgement {
            generation: self.generation,
            cert,
            warning,
        };
        let cert = match judge_peer(leaf, &self.roots, &[], now) {
            PeerCert::Trusted(cert) => Arc::<Certificate>::from(cert),
            PeerCert::None => return judged(Err(Cause::DeviceCertificateMissing), None),
            PeerCert::Untrusted { detail } => {
                return judged(Err(Cause::DeviceCertificateUntrusted { detail }), None)
            }
            PeerCert::NotTimeValid { detail } => {
                return judged(Err(Cause::DeviceCertificateNotTimeValid { detail }), None)
            }
            PeerCert::Revoked { detail } => {
                return judged(Err(Cause::DeviceCertificateRevoked { detail }), None)
            }
        };
        // Only a certificate for client authentication identifies a device (the gateway's
        // own server certificate chains to a trusted root too). An absent extended key usage
        // means any purpose (RFC 5280 4.2.1.12), and Windows and IIS accept it for client
        // authentication, so device fleets with such certificates keep working.
        if let Err(detail) = cert.client_auth_usage(true) {
            return judged(Err(Cause::DeviceCertificateWrongUsage { detail }), None);
        }
        let Some(revocation) = &self.revocation else {
            return judged(Ok(cert), None);
        };
        match pki::crl::status(&cert, &revocation.crls, now) {
            RevocationStatus::Good => judged(Ok(cert), None),
            RevocationStatus::Revoked { detail } => {
                judged(Err(Cause::DeviceCertificateRevoked { detail }), None)
            }
            RevocationStatus::Unknown { why } => {
                let mut detail = format!("{}: {why}", cert.label());
                if !revocation.unreadable.is_empty() {
                    detail.push_str(&format!(
                        " (unreadable CRL: {})",
                        revocation.unreadable.join("; ")
                    ));
                }
                match revocation.policy {
                    CrlPolicy::Refuse => {
                        judged(Err(Cause::DeviceRevocationUnknown { detail }), None)
                    }
                    CrlPolicy::AllowAndWarn => judged(
                        Ok(cert),
                        Some(format!(
                            "Revocation status unknown, allowed by crl_policy = \"allow-and-warn\": {detail}"
                        )),
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pki::lab::{LabCa, LeafSpec};

    /// A device judged again (another connection of it) gets the cached judgement's own
    /// certificate, not a copy: each copy is ~1.5 KiB held for as long as a connection stays.
    #[test]
    fn a_cached_judgement_shares_its_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let root = LabCa::new_root("Test Root", 5).unwrap();
        let root_file = dir.path().join("root.crt");
        std::fs::write(&root_file, &root.cert().cert_pem).unwrap();
        let device = root.issue(&LeafSpec::client_auth("DEVICE-1", 30)).unwrap();
        let auth = DeviceAuth::load(1, &[root_file], None, None).unwrap();
        let now = OffsetDateTime::now_utc();
        let first = auth.judge(Some(&device.cert_der), now);
        let second = auth.judge(Some(&device.cert_der), now);
        let (Ok(first), Ok(second)) = (&first.cert, &second.cert) else {
            panic!("not trusted: {:?} {:?}", first.cert, second.cert);
        };
        assert!(
            first.subject.starts_with("CN=DEVICE-1"),
            "{}",
            first.subject
        );
        assert!(Arc::ptr_eq(first, second));
    }
}
