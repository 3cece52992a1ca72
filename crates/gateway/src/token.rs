//! Site-issued device tokens for `CCM_PROXY_SERVERAUTH` routes: standard JWTs (ES256 or EdDSA)
//! with issuer, audience, expiry, not-before, a token id and the device as subject, signed by
//! the site's key and checked by the gateway with the site's public key(s). Several keys may be
//! configured at once, so a key can be rotated: tokens signed by a key that left the
//! configuration stop working at the next reload.
//!
//! A bulk registration token (`kind = "bulk"`) is long-lived and only enrols: the gateway
//! accepts it on the registration paths alone, where a device trades it for its own token.
//!
//! Every refusal names the check that failed; the gateway sends it as
//! `401 CMGService_Invalid_Token`.
//!
//! Tokens from OpenID Connect issuers (`[[tokens.oidc]]`, e.g. Entra ID) are told apart by
//! their `iss` and checked in [`oidc`] with the issuer's published keys.

mod fetch;
mod jwks;
pub mod oidc;
mod route;

pub use route::oidc_problem;
use route::Route;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rustls_pki_types::pem::{PemObject, SectionKind};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The claims of a Portcullis device token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: Option<String>,
    pub aud: Option<String>,
    pub sub: Option<String>,
    pub exp: Option<i64>,
    pub nbf: Option<i64>,
    pub iat: Option<i64>,
    pub jti: Option<String>,
    /// Endpoint ids the token is good for; empty: every endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<u64>,
    #[serde(default)]
    pub kind: TokenKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// One device's token, used on every request.
    #[default]
    Device,
    /// A bulk registration token: enrols devices, nothing else.
    Bulk,
}

/// The `[tokens]` table of the gateway's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// The site's public keys (PEM `PUBLIC KEY`, P-256 or Ed25519); several during a rotation.
    /// May be empty when `[[tokens.oidc]]` issuers are configured.
    #[serde(default)]
    pub keys: Vec<PathBuf>,
    #[serde(default = "default_issuer")]
    pub issuer: String,
    #[serde(default = "default_audience")]
    pub audience: String,
    /// A file of revoked token ids, one per line (`#` starts a comment).
    #[serde(default)]
    pub revoked: Option<PathBuf>,
    /// Clock skew allowed on expiry and not-before, in seconds (at most a day).
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Endpoint paths (after the endpoint id) where a bulk registration token is accepted.
    #[serde(default = "default_registration_paths")]
    pub registration_paths: Vec<String>,
    /// OpenID Connect issuers whose tokens are accepted beside the site's (`[[tokens.oidc]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub oidc: Vec<oidc::OidcSettings>,
}

impl TokenSettings {
    /// Checks against `keys`, every other key at the default a `[tokens]` table without it
    /// gets.
    pub fn new(keys: Vec<PathBuf>) -> TokenSettings {
        TokenSettings {
            keys,
            issuer: default_issuer(),
            audience: default_audience(),
            revoked: None,
            leeway_secs: default_leeway(),
            registration_paths: default_registration_paths(),
            oidc: Vec::new(),
        }
    }
}

pub fn default_issuer() -> String {
    "portcullis-site".into()
}
pub fn default_audience() -> String {
    "portcullis-gateway".into()
}
fn default_leeway() -> u64 {
    60
}

/// The most clock skew `leeway_secs` may allow: a day.
pub const MAX_LEEWAY_SECS: u64 = 86_400;
fn default_registration_paths() -> Vec<String> {
    vec!["ccm_system_tokenauth/request".into()]
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("cannot sign the token: {0}")]
    Sign(String),
    #[error("[[tokens.oidc]] issuer {issuer}: ca: {reason}")]
    Oidc { issuer: String, reason: String },
}

/// A configured public key and the algorithm it verifies.
struct SiteKey {
    source: PathBuf,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// What the gateway checks tokens against; built from [`TokenSettings`] at start and reload.
pub struct TokenPolicy {
    keys: Vec<SiteKey>,
    issuer: String,
    audience: String,
    revoked: HashSet<String>,
    leeway: i64,
    registration_paths: Vec<String>,
    /// The `[[tokens.oidc]]` issuers, kept across reloads that leave them as they were.
    issuers: Vec<Arc<oidc::Issuer>>,
}

/// The cap on key and revocation files: they are small; anything big is a mistake.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

fn read_small(path: &Path) -> Result<Vec<u8>, TokenError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(TokenError::Key {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_FILE_BYTES} bytes: not a key file"),
        });
    }
    Ok(bytes)
}

/// Which JWT algorithm a PEM key is for: P-256 keys sign ES256, Ed25519 keys EdDSA.
fn key_algorithm(pem: &[u8], path: &Path) -> Result<Algorithm, TokenError> {
    let bad = |reason: &str| TokenError::Key {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let der = <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .find(|(kind, _)| matches!(kind, SectionKind::PublicKey | SectionKind::PrivateKey))
        .map(|(_, der)| der)
        .ok_or_else(|| bad("no PUBLIC KEY or PRIVATE KEY (PKCS#8) block in it"))?;
    // The algorithm identifiers inside the key's DER: id-Ed25519, and prime256v1.
    const ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
    const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    if der.windows(ED25519.len()).any(|w| w == ED25519) {
        Ok(Algorithm::EdDSA)
    } else if der.windows(P256.len()).any(|w| w == P256) {
        Ok(Algorithm::ES256)
    } else {
        Err(bad("not a P-256 (ES256) or Ed25519 (EdDSA) key"))
    }
}

impl TokenPolicy {
    pub fn load(settings: &TokenSettings) -> Result<TokenPolicy, TokenError> {
        let mut keys = Vec::new();
        for path in &settings.keys {
            let pem = read_small(path)?;
            let algorithm = key_algorithm(&pem, path)?;
            let key = match algorithm {
                Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                _ => DecodingKey::from_ec_pem(&pem),
            }
            .map_err(|e| TokenError::Key {
                path: path.clone(),
                reason: format!("not a public key PEM (BEGIN PUBLIC KEY): {e}"),
            })?;
            keys.push(SiteKey {
                source: path.clone(),
                algorithm,
                key,
            });
        }
        let mut revoked = HashSet::new();
        if let Some(path) = &settings.revoked {
            let text = read_small(path)?;
            for line in String::from_utf8_lossy(&text).lines() {
                let id = line.split('#').next().unwrap_or("").trim();
                if !id.is_empty() {
                    revoked.insert(id.to_string());
                }
            }
        }
        Ok(TokenPolicy {
            keys,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            revoked,
            leeway: i64::try_from(settings.leeway_secs).unwrap_or(i64::MAX),
            issuers: settings
                .oidc
                .iter()
                .map(|o| {
                    oidc::Issuer::new(o.clone())
                        .map(Arc::new)
                        .map_err(|reason| TokenError::Oidc {
                            issuer: o.issuer.clone(),
                            reason,
                        })
                })
                .collect::<Result<_, _>>()?,
            registration_paths: settings
                .registration_paths
                .iter()
                .map(|p| p.trim_start_matches('/').to_ascii_lowercase())
                .collect(),
        })
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Checks the `Authorization` header's token for a request to `endpoint` at `path`
    /// (the endpoint path, without its query). Gives the claims, or the check that failed.
    pub fn check(
        &self,
        authorization: Option<&str>,
        endpoint: u64,
        path: &str,
        now: OffsetDateTime,
    ) -> Result<Claims, String> {
        let claims = self.verify(authorization, now)?;
        if !claims.endpoints.is_empty() && !claims.endpoints.contains(&endpoint) {
            return Err(format!("the token is not valid for endpoint {endpoint}"));
        }
        if claims.kind == TokenKind::Bulk {
            let path = path.trim_start_matches('/').to_ascii_lowercase();
            if !self.registration_paths.contains(&path) {
                return Err(format!(
                    "a bulk registration token only enrols devices ({}); use the device's own token here",
                    self.registration_paths.join(", ")
                ));
            }
        }
        Ok(claims)
    }

    /// The token's own checks (signature, times, issuer, audience, id, subject), whatever
    /// endpoint or path it is used for: what ServiceMetadata asks of a token.
    pub fn verify(
        &self,
        authorization: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Claims, String> {
        let token = bearer(authorization)?;
        match self.route(token) {
            Route::Site => {}
            Route::Oidc(issuer, token, header) => {
                return issuer
                    .verify(token, &header, self.leeway, now)
                    .map_err(|failure| match failure {
                        oidc::Failure::Invalid(check) | oidc::Failure::UnknownKey(check) => check,
                        oidc::Failure::NoKeys { issuer, detail } => {
                            format!("the gateway has no signing keys from {issuer} yet: {detail}")
                        }
                    })
            }
            Route::Refused(check) => return Err(check),
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| format!("the token is not a JWT: {e}"))?;
        if !matches!(header.alg, Algorithm::ES256 | Algorithm::EdDSA) {
            return Err(format!(
                "algorithm {:?} is not accepted (ES256 or EdDSA only)",
                header.alg
            ));
        }
        let mut validation = Validation::new(header.alg);
        // Times, issuer and audience are checked below, each with its own message.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let mut claims = None;
        for key in self.keys.iter().filter(|k| k.algorithm == header.alg) {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::InvalidSignature => {}
                Err(e) => return Err(format!("the token cannot be read: {e}")),
            }
        }
        let Some(claims) = claims else {
            return Err(format!(
                "the signature does not verify with any of the gateway's {} site key(s) for {:?} (the token was altered, or signed by a key not in [tokens] keys)",
                self.keys.iter().filter(|k| k.algorithm == header.alg).count(),
                header.alg
            ));
        };
        let now = now.unix_timestamp();
        let at = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t)
                .map(pki::filter::date_text)
                .unwrap_or_else(|_| t.to_string())
        };
        match claims.exp {
            None => return Err("the token has no expiry (exp)".into()),
            // Saturating: the times are the signer's, anywhere on the clock.
            Some(exp) if exp.saturating_add(self.leeway) < now => {
                return Err(format!("the token expired at {}", at(exp)))
            }
            _ => {}
        }
        if let Some(nbf) = claims.nbf {
            if nbf.saturating_sub(self.leeway) > now {
                return Err(format!("the token is not valid before {}", at(nbf)));
            }
        }
        if claims.iss.as_deref() != Some(self.issuer.as_str()) {
            return Err(format!(
                "the token was issued by \"{}\"; this gateway accepts \"{}\"",
                claims.iss.as_deref().unwrap_or(""),
                self.issuer
            ));
        }
        if claims.aud.as_deref() != Some(self.audience.as_str()) {
            return Err(format!(
                "the token is for audience \"{}\"; this gateway is \"{}\"",
                claims.aud.as_deref().unwrap_or(""),
                self.audience
            ));
        }
        let Some(jti) = claims.jti.as_deref() else {
            return Err("the token has no token id (jti)".into());
        };
        if self.revoked.contains(jti) {
            return Err(format!("token id {jti} is revoked"));
        }
        if claims.sub.as_deref().is_none_or(str::is_empty) {
            return Err("the token names no device (sub)".into());
        }
        Ok(claims)
    }

    /// The key files in use, for the log.
    pub fn describe(&self) -> String {
        let keys: Vec<String> = self
            .keys
            .iter()
            .map(|k| format!("{} ({:?})", k.source.display(), k.algorithm))
            .collect();
        let oidc: Vec<String> = self
            .issuers
            .iter()
            .map(|i| {
                format!(
                    "{} (audience {})",
                    i.settings.issuer,
                    i.settings.audience.join(" ")
                )
            })
            .collect();
        format!(
            "{} key(s) [{}], issuer \"{}\", audience \"{}\", {} revoked token id(s){}",
            self.keys.len(),
            keys.join(", "),
            self.issuer,
            self.audience,
            self.revoked.len(),
            if oidc.is_empty() {
                String::new()
            } else {
                format!(", OIDC issuer(s) {}", oidc.join(", "))
            }
        )
    }
}

fn bearer(authorization: Option<&str>) -> Result<&str, String> {
    let Some(value) = authorization else {
        return Err("no token: send Authorization: Bearer <token>".into());
    };
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err("the Authorization header is not \"Bearer <token>\"".into());
    }
    Ok(token.trim())
}

/// What `portcullis token issue` puts in a token.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub subject: String,
    pub days: u32,
    pub endpoints: Vec<u64>,
    pub issuer: String,
    pub audience: String,
    pub kind: TokenKind,
    /// Not valid before now + this many seconds (tests make not-yet-valid tokens with it).
    pub not_before_offset_secs: i64,
}

/// Signs a token with the site's private key (PEM PKCS#8, P-256 or Ed25519). Returns the
/// token and its id.
pub fn issue(
    key_path: &Path,
    request: &IssueRequest,
    now: OffsetDateTime,
) -> Result<(String, String), TokenError> {
    let pem = read_small(key_path)?;
    let algorithm = key_algorithm(&pem, key_path)?;
    let key = match algorithm {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => EncodingKey::from_ec_pem(&pem),
    }
    .map_err(|e| TokenError::Key {
        path: key_path.to_path_buf(),
        reason: format!("not a private key PEM (BEGIN PRIVATE KEY, PKCS#8): {e}"),
    })?;
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| TokenError::Sign("no randomness for the token id".into()))?;
    let jti = pki::cert::hex_upper(&id).to_ascii_lowercase();
    let now = now.unix_timestamp();
    let claims = Claims {
        iss: Some(request.issuer.clone()),
        aud: Some(request.audience.clone()),
        sub: Some(request.subject.clone()),
        exp: Some(now + i64::from(request.days) * 86_400),
        nbf: Some(now + request.not_before_offset_secs),
        iat: Some(now),
        jti: Some(jti.clone()),
        endpoints: request.endpoints.clone(),
        kind: request.kind,
    };
    let token = jsonwebtoken::encode(&Header::new(algorithm), &claims, &key)
        .map_err(|e| TokenError::Sign(e.to_string()))?;
    Ok((token, jti))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy checking with a new Ed25519 site key, and that key to sign with.
    fn lab_policy(leeway_secs: u64) -> (TokenPolicy, EncodingKey, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (key, public) = pki::lab::token_key_pair(true).expect("a key pair");
        let path = dir.path().join("site.pub");
        std::fs::write(&path, public).expect("the public key written");
        let mut settings = TokenSettings::new(vec![path]);
        settings.leeway_secs = leeway_secs;
        let policy = TokenPolicy::load(&settings).expect("the policy");
        let key = EncodingKey::from_ed_pem(key.as_bytes()).expect("the signing key");
        (policy, key, dir)
    }

    fn check(
        policy: &TokenPolicy,
        key: &EncodingKey,
        exp: i64,
        nbf: Option<i64>,
    ) -> Result<Claims, String> {
        let claims = Claims {
            iss: Some(default_issuer()),
            aud: Some(default_audience()),
            sub: Some("DEVICE-001".into()),
            exp: Some(exp),
            nbf,
            iat: None,
            jti: Some("1".into()),
            endpoints: vec![],
            kind: TokenKind::Device,
        };
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, key).expect("signed");
        policy.check(
            Some(&format!("Bearer {token}")),
            3456,
            "/SMS_MP/.sms_aut",
            OffsetDateTime::now_utc(),
        )
    }

    /// Seen while writing the `token` fuzz target (its signed-claims mode reaches these
    /// checks): the expiry and not-before checks added and took the leeway with overflow, so a
    /// signed token with an expiry near the end of time (or a not-before near its start)
    /// panicked the check in a debug build and, wrapped in a release build, read as expired;
    /// so did every token under a leeway over i64::MAX - now.
    #[test]
    fn times_at_the_ends_of_the_clock_are_compared_without_overflow() {
        let (policy, key, _dir) = lab_policy(60);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!(check(&policy, &key, i64::MAX, None).is_ok());
        assert!(check(&policy, &key, now + 600, Some(i64::MIN)).is_ok());
        let expired = check(&policy, &key, i64::MIN, None).unwrap_err();
        assert!(expired.starts_with("the token expired at"), "{expired}");
        let early = check(&policy, &key, i64::MAX, Some(i64::MAX)).unwrap_err();
        assert!(
            early.starts_with("the token is not valid before"),
            "{early}"
        );
        // The largest leeway the configuration takes: a token an hour old is still good.
        let (policy, key, _dir) = lab_policy(MAX_LEEWAY_SECS);
        assert!(check(&policy, &key, now - 3600, Some(now + 3600)).is_ok());
    }

    /// `leeway_secs` is clock skew: a day at most, named with its key when over.
    #[test]
    fn a_leeway_over_a_day_is_refused_with_its_key() {
        let text = |leeway: u64| {
            format!(
                "cert = \"server.crt\"\nkey = \"server.key\"\ntrusted_roots = [\"root.crt\"]\n\
                 connector_roots = [\"connectors.crt\"]\nallowed_connectors = [\"Branch\"]\n\
                 [tokens]\nkeys = [\"token.pub\"]\nleeway_secs = {leeway}\n"
            )
        };
        let path = Path::new("/etc/portcullis/gateway.toml");
        let loaded = crate::GatewayConfig::parse(&text(MAX_LEEWAY_SECS), path).unwrap();
        assert_eq!(loaded.tokens.unwrap().leeway_secs, MAX_LEEWAY_SECS);
        let refused = crate::GatewayConfig::parse(&text(MAX_LEEWAY_SECS + 1), path)
            .unwrap_err()
            .to_string();
        assert_eq!(
            refused,
            "/etc/portcullis/gateway.toml: key `tokens.leeway_secs`: must be between 0 and 86400"
        );
    }
}
