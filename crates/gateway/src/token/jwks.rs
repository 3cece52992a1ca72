//! An OpenID Connect issuer's signing keys, read from its JWKS: RSA keys (RS256, PS256) and
//! P-256 keys (ES256) only. Symmetric (`oct`) keys, other curves and other algorithms are left
//! out, so a token signed with `none` or HMAC can never find a key here.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use time::OffsetDateTime;

/// The algorithms an OIDC issuer's tokens may be signed with.
pub const ALLOWED: [Algorithm; 3] = [Algorithm::RS256, Algorithm::PS256, Algorithm::ES256];

/// The most keys read from one JWKS (providers publish a handful).
pub const MAX_KEYS: usize = 64;

/// The most key ids named in a message.
const SHOWN_KIDS: usize = 8;

pub struct Key {
    pub kid: Option<String>,
    pub algorithms: Vec<Algorithm>,
    pub key: DecodingKey,
}

pub struct KeySet {
    pub keys: Vec<Key>,
    /// Where they came from, and when.
    pub uri: String,
    pub fetched: OffsetDateTime,
    /// Entries left out (other key types or algorithms, encryption keys, unreadable).
    pub skipped: usize,
}

impl KeySet {
    /// Reads a JWKS document. An empty result is an error: no token could be checked.
    pub fn parse(
        document: &serde_json::Map<String, serde_json::Value>,
        uri: &str,
        fetched: OffsetDateTime,
    ) -> Result<KeySet, String> {
        let Some(serde_json::Value::Array(entries)) = document.get("keys") else {
            return Err(format!("{uri}: no \"keys\" array in the JWKS"));
        };
        let mut keys = Vec::new();
        let mut skipped = 0;
        for entry in entries.iter().take(MAX_KEYS) {
            match read_key(entry) {
                Some(key) => keys.push(key),
                None => skipped += 1,
            }
        }
        skipped += entries.len().saturating_sub(MAX_KEYS);
        if keys.is_empty() {
            return Err(format!(
                "{uri}: the JWKS holds no RS256, PS256 or ES256 signing key ({} entr{} left out)",
                skipped,
                if skipped == 1 { "y" } else { "ies" }
            ));
        }
        Ok(KeySet {
            keys,
            uri: uri.to_string(),
            fetched,
            skipped,
        })
    }

    /// The key ids, for the log and for an unknown key's message: the first
    /// [`SHOWN_KIDS`], each cut to 120 characters.
    pub fn kids(&self) -> String {
        let mut kids: Vec<String> = self
            .keys
            .iter()
            .take(SHOWN_KIDS)
            .map(|k| {
                format!(
                    "{:?}",
                    super::oidc::shown(k.kid.as_deref().unwrap_or("(none)"))
                )
            })
            .collect();
        if self.keys.len() > SHOWN_KIDS {
            kids.push(format!("and {} more", self.keys.len() - SHOWN_KIDS));
        }
        kids.join(", ")
    }
}

fn read_key(entry: &serde_json::Value) -> Option<Key> {
    let jwk: Jwk = serde_json::from_value(entry.clone()).ok()?;
    if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let stated = jwk.common.key_algorithm;
    let algorithms = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => match stated {
            None => vec![Algorithm::RS256, Algorithm::PS256],
            Some(KeyAlgorithm::RS256) => vec![Algorithm::RS256],
            Some(KeyAlgorithm::PS256) => vec![Algorithm::PS256],
            Some(_) => return None,
        },
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => match stated {
            None | Some(KeyAlgorithm::ES256) => vec![Algorithm::ES256],
            Some(_) => return None,
        },
        _ => return None,
    };
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    Some(Key {
        kid: jwk.common.key_id.clone(),
        algorithms,
        key,
    })
}
