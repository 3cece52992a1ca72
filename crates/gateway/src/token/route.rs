//! Which check a token goes to: the site's keys, or the `[[tokens.oidc]]` issuer its
//! (unverified) `iss` names; and, for a request, [`TokenPolicy::authorize`], which waits for
//! an OIDC issuer's keys to be fetched again when the token names a key not cached.

use std::sync::Arc;

use base64::Engine as _;
use channel::refusal::Cause;
use time::OffsetDateTime;

use super::{bearer, oidc, Claims, TokenPolicy, TokenSettings};

/// What is wrong with the `[[tokens.oidc]]` tables, as the key and why.
pub fn oidc_problem(settings: &TokenSettings) -> Option<(&'static str, String)> {
    for (i, issuer) in settings.oidc.iter().enumerate() {
        if let Some(problem) = issuer.problem() {
            return Some(problem);
        }
        if settings.oidc[..i].iter().any(|o| o.issuer == issuer.issuer) {
            return Some((
                "tokens.oidc.issuer",
                format!(
                    "{:?} has two [[tokens.oidc]] tables: merge them (audience takes a list)",
                    issuer.issuer
                ),
            ));
        }
        if !settings.keys.is_empty() && issuer.issuer == settings.issuer {
            return Some((
                "tokens.oidc.issuer",
                format!("{:?} is also the site tokens' issuer (tokens.issuer): a token must say which it is", issuer.issuer),
            ));
        }
    }
    None
}

/// Which check a token goes to, from its (unverified) header and issuer.
pub(super) enum Route<'p, 't> {
    Site,
    Oidc(
        &'p Arc<oidc::Issuer>,
        &'t str,
        serde_json::Map<String, serde_json::Value>,
    ),
    Refused(String),
}

/// A JWT's header and payload as JSON objects, before any signature is checked.
fn peek(token: &str) -> Option<[serde_json::Map<String, serde_json::Value>; 2]> {
    let mut parts = token.split('.');
    let mut part = || -> Option<serde_json::Map<String, serde_json::Value>> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts.next()?)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    Some([part()?, part()?])
}

impl TokenPolicy {
    /// Takes over `previous`'s OIDC issuers (their cached keys and their refresh) where the
    /// table is the same, so a reload neither forgets keys nor fetches them again.
    pub fn adopt(&mut self, previous: &TokenPolicy) {
        for issuer in &mut self.issuers {
            if let Some(kept) = previous
                .issuers
                .iter()
                .find(|p| p.settings == issuer.settings)
            {
                *issuer = kept.clone();
            }
        }
    }

    /// Starts fetching the OIDC issuers' keys (the ones not already at it), logging to `log`.
    pub fn start(&self, log: &logs::Log) {
        for issuer in &self.issuers {
            issuer.start(log);
        }
    }

    pub(super) fn route<'p, 't>(&'p self, token: &'t str) -> Route<'p, 't> {
        if self.issuers.is_empty() {
            return Route::Site;
        }
        let Some([header, payload]) = peek(token) else {
            return match self.keys.is_empty() {
                false => Route::Site,
                true => Route::Refused("the token is not a JWT".into()),
            };
        };
        let iss = payload.get("iss").and_then(|i| i.as_str()).unwrap_or("");
        if let Some(issuer) = self.issuers.iter().find(|i| i.settings.issuer == iss) {
            return Route::Oidc(issuer, token, header);
        }
        if !self.keys.is_empty() && iss == self.issuer {
            return Route::Site;
        }
        let mut accepted: Vec<String> = self
            .issuers
            .iter()
            .map(|i| format!("{:?}", i.settings.issuer))
            .collect();
        if !self.keys.is_empty() {
            accepted.insert(0, format!("{:?}", self.issuer));
        }
        Route::Refused(format!(
            "wrong issuer: the token was issued by {:?}; the gateway accepts {}",
            oidc::shown(iss),
            accepted.join(", ")
        ))
    }

    /// [`TokenPolicy::check`] for a request: a token from an OIDC issuer naming a key the
    /// cache does not hold (or before any key was fetched) waits for the issuer's keys to be
    /// fetched again (at most once per `min_refresh_secs`). Gives the claims or the refusal.
    pub async fn authorize(
        &self,
        authorization: Option<&str>,
        endpoint: u64,
        path: &str,
        now: OffsetDateTime,
    ) -> Result<Claims, Cause> {
        let token = bearer(authorization).map_err(|check| Cause::InvalidToken { check })?;
        let Route::Oidc(issuer, token, header) = self.route(token) else {
            return self
                .check(authorization, endpoint, path, now)
                .map_err(|check| Cause::InvalidToken { check });
        };
        issuer.ensure_started();
        let mut result = issuer.verify(token, &header, self.leeway, now);
        if matches!(
            result,
            Err(oidc::Failure::UnknownKey(_) | oidc::Failure::NoKeys { .. })
        ) {
            issuer.refresh().await;
            result = issuer.verify(token, &header, self.leeway, OffsetDateTime::now_utc());
        }
        result.map_err(|failure| match failure {
            oidc::Failure::Invalid(check) | oidc::Failure::UnknownKey(check) => {
                Cause::InvalidToken { check }
            }
            oidc::Failure::NoKeys { issuer, detail } => {
                Cause::TokenKeysUnavailable { issuer, detail }
            }
        })
    }
}
