//! Tokens from OpenID Connect issuers (Entra ID, Okta, Keycloak, ADFS, ...): the
//! `[[tokens.oidc]]` tables. Each issuer's discovery document is read at start and its JWKS
//! fetched and cached ([`Issuer`]); the keys are fetched again every `refresh_secs` and when a
//! token names a key id the cache does not hold, never more often than every
//! `min_refresh_secs`, so a flood of bad tokens cannot hammer the provider. While the provider
//! is unreachable the cached keys keep working; with none ever fetched its tokens get 503
//! `CMGService_Tokenkeysunavailable`. The issuer's state outlives reloads that leave its table
//! as it was.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, Validation};
use logs::Log;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::fetch::Fetcher;
use super::jwks::{KeySet, ALLOWED};

/// One `[[tokens.oidc]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OidcSettings {
    /// The issuer, exactly as its tokens' `iss` and its discovery document say (https).
    pub issuer: String,
    /// The audience(s) the gateway's tokens are issued for (`aud`): one, or a list.
    #[serde(deserialize_with = "one_or_many")]
    pub audience: Vec<String>,
    /// PEM files with the roots for reaching the issuer; the system's trust store when empty.
    #[serde(default)]
    pub ca: Vec<PathBuf>,
    /// Entra ID tenant ids (`tid`) accepted; any when empty.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// The claim that names the device or user to the connector.
    #[serde(default = "default_identity_claim")]
    pub identity_claim: String,
    /// Claims the token must carry, with these values (a list claim must contain the value).
    #[serde(default)]
    pub required_claims: BTreeMap<String, String>,
    /// How often the JWKS is fetched again, in seconds.
    #[serde(default = "default_refresh_secs")]
    pub refresh_secs: u64,
    /// The floor on fetches: never two within this many seconds (also the retry interval
    /// while no keys were ever fetched).
    #[serde(default = "default_min_refresh_secs")]
    pub min_refresh_secs: u64,
    /// The bound on one fetch (connect, TLS, answer), in seconds.
    #[serde(default = "default_fetch_timeout_secs")]
    pub fetch_timeout_secs: u64,
    /// The bound on the discovery document and the JWKS, in bytes.
    #[serde(default = "default_max_document_bytes")]
    pub max_document_bytes: u64,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

fn default_identity_claim() -> String {
    "sub".into()
}
fn default_refresh_secs() -> u64 {
    3600
}
fn default_min_refresh_secs() -> u64 {
    60
}
fn default_fetch_timeout_secs() -> u64 {
    10
}
fn default_max_document_bytes() -> u64 {
    256 * 1024
}

/// The bounds on the tables' numbers: (key, least, most).
const BOUNDS: [(&str, u64, u64); 4] = [
    ("tokens.oidc.refresh_secs", 1, 7 * 86_400),
    ("tokens.oidc.min_refresh_secs", 1, 86_400),
    ("tokens.oidc.fetch_timeout_secs", 1, 300),
    ("tokens.oidc.max_document_bytes", 1024, 16 * 1024 * 1024),
];

impl OidcSettings {
    /// A table for `issuer` and `audience`, every other key at its default.
    pub fn new(issuer: &str, audience: &str) -> OidcSettings {
        OidcSettings {
            issuer: issuer.into(),
            audience: vec![audience.into()],
            ca: Vec::new(),
            tenants: Vec::new(),
            identity_claim: default_identity_claim(),
            required_claims: BTreeMap::new(),
            refresh_secs: default_refresh_secs(),
            min_refresh_secs: default_min_refresh_secs(),
            fetch_timeout_secs: default_fetch_timeout_secs(),
            max_document_bytes: default_max_document_bytes(),
        }
    }

    /// What is wrong with the table, as the key and why.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        let this = format!("in the [[tokens.oidc]] table of issuer {:?}", self.issuer);
        match self.issuer.parse::<hyper::Uri>() {
            Ok(uri) if uri.scheme_str() == Some("https") && uri.host().is_some() && uri.query().is_none() => {}
            _ => {
                return Some((
                    "tokens.oidc.issuer",
                    format!("{:?} is not an https:// URL (e.g. https://login.microsoftonline.com/<tenant id>/v2.0)", self.issuer),
                ))
            }
        }
        if self.audience.is_empty() || self.audience.iter().any(|a| a.trim().is_empty()) {
            return Some((
                "tokens.oidc.audience",
                format!("{this}: name the audience the tokens are issued for (the app registration's Application ID URI or client id), no empty value"),
            ));
        }
        if self.tenants.iter().any(|t| t.trim().is_empty()) {
            return Some(("tokens.oidc.tenants", format!("{this}: an empty tenant id")));
        }
        if self.identity_claim.trim().is_empty() {
            return Some((
                "tokens.oidc.identity_claim",
                format!("{this}: name the claim that names the device (sub by default)"),
            ));
        }
        if self.required_claims.keys().any(|k| k.trim().is_empty()) {
            return Some((
                "tokens.oidc.required_claims",
                format!("{this}: a claim with no name"),
            ));
        }
        let values = [
            self.refresh_secs,
            self.min_refresh_secs,
            self.fetch_timeout_secs,
            self.max_document_bytes,
        ];
        for ((key, least, most), value) in BOUNDS.iter().zip(values) {
            if value < *least || value > *most {
                return Some((key, format!("{this}: must be between {least} and {most}")));
            }
        }
        if self.min_refresh_secs > self.refresh_secs {
            return Some((
                "tokens.oidc.min_refresh_secs",
                format!(
                    "{this}: must not be over refresh_secs ({})",
                    self.refresh_secs
                ),
            ));
        }
        None
    }
}

/// Provider text as it is shown in a message or a log line: at most 120 characters.
pub fn shown(text: &str) -> String {
    match text.char_indices().nth(120) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

/// Why an OIDC token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A check failed: 401, the text naming it.
    Invalid(String),
    /// The token names a key id the cached JWKS does not hold (401 after a refresh).
    UnknownKey(String),
    /// No keys were ever fetched from the issuer: 503.
    NoKeys { issuer: String, detail: String },
}

/// An issuer's keys and how they are kept fresh.
pub struct Issuer {
    pub settings: OidcSettings,
    fetcher: Fetcher,
    keys: RwLock<Option<Arc<KeySet>>>,
    /// The last fetch's error, for the 503's text.
    last_error: RwLock<String>,
    /// Held while fetching: callers wanting fresh keys wait for the fetch under way.
    refresh: tokio::sync::Mutex<Option<Instant>>,
    log: OnceLock<Log>,
    started: AtomicBool,
    /// Set while the last fetch failed, so its recovery is logged once.
    failing: AtomicBool,
}

impl Issuer {
    pub fn new(settings: OidcSettings) -> Result<Issuer, String> {
        let tls = super::fetch::client_tls(&settings.ca)?;
        Ok(Issuer {
            fetcher: Fetcher {
                tls: Arc::new(tls),
                timeout: Duration::from_secs(settings.fetch_timeout_secs),
                max_bytes: usize::try_from(settings.max_document_bytes).unwrap_or(usize::MAX),
            },
            settings,
            keys: RwLock::new(None),
            last_error: RwLock::new("the first fetch has not finished yet".into()),
            refresh: tokio::sync::Mutex::new(None),
            log: OnceLock::new(),
            started: AtomicBool::new(false),
            failing: AtomicBool::new(false),
        })
    }

    fn keys(&self) -> Option<Arc<KeySet>> {
        self.keys.read().ok().and_then(|k| k.clone())
    }

    /// Starts fetching the keys now and every `refresh_secs` (every `min_refresh_secs` while
    /// none were ever fetched), for as long as a policy holds this issuer. Once per issuer.
    pub fn start(self: &Arc<Self>, log: &Log) {
        let _ = self.log.set(log.clone());
        self.ensure_started();
    }

    /// [`Issuer::start`] once it can: a policy loaded outside the runtime (a reload from a
    /// plain thread) starts on its first token.
    pub fn ensure_started(self: &Arc<Self>) {
        if self.started.load(Ordering::Relaxed) || self.log.get().is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let issuer = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                let Some(strong) = issuer.upgrade() else {
                    return;
                };
                strong.refresh().await;
                let wait = if strong.keys().is_some() {
                    strong.settings.refresh_secs
                } else {
                    strong.settings.min_refresh_secs
                };
                drop(strong);
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
        });
    }

    /// Fetches the keys again unless a fetch started less than `min_refresh_secs` ago (then
    /// waits for it, if it is under way).
    pub async fn refresh(&self) {
        let mut last = self.refresh.lock().await;
        let floor = Duration::from_secs(self.settings.min_refresh_secs);
        if last.is_some_and(|at| at.elapsed() < floor) {
            return;
        }
        *last = Some(Instant::now());
        let result = self.fetch().await;
        let log = self.log.get();
        let issuer = &self.settings.issuer;
        match result {
            Ok(set) => {
                let before = self.keys();
                let changed = before.as_ref().is_none_or(|b| {
                    !b.keys
                        .iter()
                        .map(|k| &k.kid)
                        .eq(set.keys.iter().map(|k| &k.kid))
                });
                let recovered = self.failing.swap(false, Ordering::Relaxed);
                if let (true, false, Some(log)) = (recovered, changed, log) {
                    log.info(&format!(
                        "OIDC issuer {issuer} is reachable again: its keys are as cached (key ids {})",
                        set.kids()
                    ));
                }
                if changed {
                    if let Some(log) = log {
                        log.info(&format!(
                            "OIDC issuer {issuer}: {} signing key(s) from {} (key ids {}; {} entr{} left out: not RS256, PS256 or ES256 signing keys)",
                            set.keys.len(),
                            shown(&set.uri),
                            set.kids(),
                            set.skipped,
                            if set.skipped == 1 { "y" } else { "ies" }
                        ));
                    }
                }
                if let Ok(mut keys) = self.keys.write() {
                    *keys = Some(Arc::new(set));
                }
            }
            Err(e) => {
                self.failing.store(true, Ordering::Relaxed);
                let e = shown(&e);
                match (self.keys(), log) {
                    (Some(cached), Some(log)) => log.warn(&format!(
                        "OIDC issuer {issuer} is unreachable: {e}; the {} cached key(s) fetched at {} keep working (fetched again in {} s, refresh_secs, or sooner for a token naming a key not cached)",
                        cached.keys.len(),
                        pki::filter::date_text(cached.fetched),
                        self.settings.refresh_secs,
                    )),
                    (None, Some(log)) => log.error(&format!(
                        "OIDC issuer {issuer}: no signing keys: {e}; its tokens are refused with 503 CMGService_Tokenkeysunavailable until they can be fetched (retrying every {} s, min_refresh_secs)",
                        self.settings.min_refresh_secs
                    )),
                    _ => {}
                }
                if let Ok(mut last) = self.last_error.write() {
                    *last = e;
                }
            }
        }
    }

    /// Discovery, then the JWKS it names.
    async fn fetch(&self) -> Result<KeySet, String> {
        let issuer = &self.settings.issuer;
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let discovery = self.fetcher.json(&url).await?;
        let said = discovery.get("issuer").and_then(|v| v.as_str());
        if said != Some(issuer.as_str()) {
            return Err(format!(
                "{url} names issuer {:?}, not {issuer:?} (the issuer key must be the provider's issuer exactly)",
                shown(said.unwrap_or("(none)"))
            ));
        }
        let Some(jwks_uri) = discovery.get("jwks_uri").and_then(|v| v.as_str()) else {
            return Err(format!("{url} names no jwks_uri"));
        };
        let jwks = self.fetcher.json(jwks_uri).await?;
        KeySet::parse(&jwks, &shown(jwks_uri), OffsetDateTime::now_utc())
    }

    /// Checks a token whose (unverified) `iss` is this issuer, with the cached keys.
    pub fn verify(
        &self,
        token: &str,
        header: &serde_json::Map<String, serde_json::Value>,
        leeway: i64,
        now: OffsetDateTime,
    ) -> Result<super::Claims, Failure> {
        let issuer = &self.settings.issuer;
        let invalid = |text: String| Err(Failure::Invalid(text));
        let alg = header
            .get("alg")
            .and_then(|a| a.as_str())
            .unwrap_or("(none)");
        let algorithm = match alg.parse::<Algorithm>() {
            Ok(a) if ALLOWED.contains(&a) => a,
            _ => {
                return invalid(format!(
                    "algorithm not allowed: the token is signed with {:?}; tokens from {issuer} must be RS256, PS256 or ES256 (never none or HMAC)",
                    shown(alg)
                ))
            }
        };
        let Some(keys) = self.keys() else {
            let detail = self
                .last_error
                .read()
                .map(|e| e.clone())
                .unwrap_or_default();
            return Err(Failure::NoKeys {
                issuer: issuer.clone(),
                detail,
            });
        };
        let kid = header.get("kid").and_then(|k| k.as_str());
        let candidates: Vec<_> = keys
            .keys
            .iter()
            .filter(|k| k.algorithms.contains(&algorithm))
            .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
            .collect();
        if candidates.is_empty() {
            return Err(Failure::UnknownKey(format!(
                "unknown key: the token is signed with key id {:?} ({alg}), which {issuer} does not publish now (its keys, fetched at {}: {}): a token signed with a removed key must be renewed",
                shown(kid.unwrap_or("(none)")),
                pki::filter::date_text(keys.fetched),
                keys.kids()
            )));
        }
        let mut validation = Validation::new(algorithm);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let mut claims = None;
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &key.key,
                &validation,
            ) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::InvalidSignature => {}
                Err(e) => return invalid(format!("the token cannot be read: {e}")),
            }
        }
        let Some(claims) = claims else {
            return invalid(format!(
                "bad signature: the token's signature does not verify with {issuer}'s key {:?} (the token was altered, or signed by another key under that id)",
                shown(kid.unwrap_or("(none)"))
            ));
        };
        self.check_claims(&claims, leeway, now)
            .map_err(Failure::Invalid)
    }

    fn check_claims(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
        leeway: i64,
        now: OffsetDateTime,
    ) -> Result<super::Claims, String> {
        let s = &self.settings;
        let issuer = &s.issuer;
        let text = |name: &str| claims.get(name).and_then(|v| v.as_str());
        let number = |name: &str| claims.get(name).and_then(|v| v.as_i64());
        if text("iss") != Some(issuer.as_str()) {
            return Err(format!(
                "wrong issuer: the token was issued by {:?}; the gateway expects {issuer:?}",
                shown(text("iss").unwrap_or(""))
            ));
        }
        let at = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t)
                .map(pki::filter::date_text)
                .unwrap_or_else(|_| t.to_string())
        };
        let now = now.unix_timestamp();
        let Some(exp) = number("exp") else {
            return Err("missing claim: the token has no expiry (exp)".into());
        };
        if exp.saturating_add(leeway) < now {
            return Err(format!(
                "expired: the token expired at {} (the gateway allows {leeway} s of clock skew, tokens.leeway_secs)",
                at(exp)
            ));
        }
        if let Some(nbf) = number("nbf") {
            if nbf.saturating_sub(leeway) > now {
                return Err(format!(
                    "not yet valid: the token is not valid before {} (the gateway allows {leeway} s of clock skew, tokens.leeway_secs): check the device's and the gateway's clocks",
                    at(nbf)
                ));
            }
        }
        let audiences: Vec<&str> = match claims.get("aud") {
            Some(serde_json::Value::String(one)) => vec![one.as_str()],
            Some(serde_json::Value::Array(many)) => {
                many.iter().filter_map(|a| a.as_str()).collect()
            }
            _ => Vec::new(),
        };
        let Some(audience) = audiences
            .iter()
            .find(|a| s.audience.iter().any(|b| b == *a))
        else {
            return Err(format!(
                "wrong audience: the token was issued for audience {:?}; the gateway expects {:?} for issuer {issuer}: check the app registration the device asks its token for",
                shown(&audiences.join(" ")),
                s.audience.join(" ")
            ));
        };
        if !s.tenants.is_empty() {
            match text("tid") {
                None => {
                    return Err(format!(
                        "missing claim: the token has no tenant (tid); the gateway accepts tenant(s) {:?} of {issuer}",
                        s.tenants.join(" ")
                    ))
                }
                Some(tid) if !s.tenants.iter().any(|t| t == tid) => {
                    return Err(format!(
                        "wrong tenant: the token is from tenant {:?}; the gateway accepts tenant(s) {:?}: add the tenant to tokens.oidc tenants if it is yours",
                        shown(tid),
                        s.tenants.join(" ")
                    ))
                }
                Some(_) => {}
            }
        }
        for (name, want) in &s.required_claims {
            let matches = |v: &serde_json::Value| match v {
                serde_json::Value::String(t) => t == want,
                serde_json::Value::Number(_) | serde_json::Value::Bool(_) => {
                    want.parse::<serde_json::Value>().is_ok_and(|w| w == *v)
                }
                _ => false,
            };
            match claims.get(name) {
                None => {
                    return Err(format!(
                        "missing claim: the token has no {name:?} claim; required_claims asks for {name:?} = {want:?}: grant it to the device's app or user at the provider"
                    ))
                }
                Some(serde_json::Value::Array(values)) if values.iter().any(matches) => {}
                Some(value) if matches(value) => {}
                Some(value) => {
                    return Err(format!(
                        "mismatched claim: the token's {name:?} claim is {}; required_claims asks for {want:?}: grant it to the device's app or user at the provider",
                        shown(&value.to_string())
                    ))
                }
            }
        }
        let identity = match claims.get(&s.identity_claim) {
            Some(serde_json::Value::String(t)) if !t.is_empty() => t.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => {
                return Err(format!(
                    "missing claim: the token has no {:?} claim (identity_claim) naming the device",
                    s.identity_claim
                ))
            }
        };
        let id = text("jti").or_else(|| text("uti")).unwrap_or("");
        Ok(super::Claims {
            iss: Some(issuer.clone()),
            aud: Some(audience.to_string()),
            sub: Some(identity),
            exp: Some(exp),
            nbf: number("nbf"),
            iat: number("iat"),
            jti: Some(shown(id)),
            endpoints: Vec::new(),
            kind: super::TokenKind::Device,
        })
    }
}

#[cfg(test)]
#[path = "oidc_tests.rs"]
mod tests;
