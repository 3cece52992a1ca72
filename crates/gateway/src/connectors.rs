//! Connector policy: which connectors may hold a channel (trust, the allow-list, the Client
//! Authentication EKU, revocation) and which endpoints each may announce.

use channel::tunnel;
use pki::tls::{judge_peer, PeerCert};
use pki::RootSet;
use time::OffsetDateTime;

use crate::config::{AllowedConnector, GatewayConfig};
use crate::device_auth::DeviceAuth;
use crate::GatewayError;

/// Which connectors may open channels: the roots their certificates must chain to
/// (`connector_roots`; none when every connector is pinned by thumbprint), the names (CN) or
/// thumbprints allowed, the endpoints each may announce, and the CRLs to check them against.
pub(crate) struct Connectors {
    pub(crate) roots: RootSet,
    /// No `connector_roots`: every entry is a thumbprint, and the certificate is the trust.
    pinned: bool,
    allowed: Vec<AllowedConnector>,
    /// Present when `verify_client_revocation` is on: the gateway's CRLs (read once, for
    /// devices and connectors) and the ones that could not be read.
    revocation: Option<(Vec<pki::crl::RevocationList>, Vec<String>)>,
}

impl Connectors {
    pub(crate) fn load(
        config: &GatewayConfig,
        roots: RootSet,
        auth: &DeviceAuth,
    ) -> Result<Connectors, GatewayError> {
        Ok(Connectors {
            pinned: config.connector_roots.is_empty(),
            roots,
            allowed: config
                .allowed_connectors
                .iter()
                .filter(|c| !c.name().is_empty())
                .cloned()
                .collect(),
            revocation: auth
                .revocation
                .as_ref()
                .map(|r| (r.crls.clone(), r.unreadable.clone())),
        })
    }

    /// Whether `entry` names this certificate: its thumbprint, or its one CN (from the parsed
    /// subject, never the printed one). Pinned, the thumbprint only: with no roots anyone can
    /// make a certificate whose CN reads like a pinned thumbprint.
    fn names(&self, entry: &AllowedConnector, cert: &pki::cert::Certificate) -> bool {
        let name = entry.name();
        name.eq_ignore_ascii_case(&cert.thumbprint)
            || (!self.pinned
                && cert
                    .common_name()
                    .is_some_and(|cn| name.eq_ignore_ascii_case(cn)))
    }

    /// The connector's certificate, if it may hold a channel; else why not. Checked: trust
    /// (a chain to `connector_roots`, or a pinned thumbprint), validity now, the allow-list,
    /// the Client Authentication EKU, and revocation when the gateway checks it.
    pub(crate) fn judge(
        &self,
        leaf: Option<&[u8]>,
        now: OffsetDateTime,
    ) -> Result<Box<pki::cert::Certificate>, String> {
        let cert = if self.pinned {
            let Some(der) = leaf else {
                return Err(describe_peer(&PeerCert::None));
            };
            let cert = pki::cert::Certificate::from_der(der)
                .map_err(|e| format!("its certificate cannot be parsed: {e}"))?;
            if now < cert.not_before || now > cert.not_after {
                return Err(describe_peer(&PeerCert::NotTimeValid {
                    detail: format!(
                        "{} is valid from {} to {}",
                        cert.label(),
                        pki::filter::date_text(cert.not_before),
                        pki::filter::date_text(cert.not_after)
                    ),
                }));
            }
            Box::new(cert)
        } else {
            match judge_peer(leaf, &self.roots, &[], now) {
                PeerCert::Trusted(cert) => cert,
                other => return Err(describe_peer(&other)),
            }
        };
        if !self.allowed.iter().any(|a| self.names(a, &cert)) {
            return Err(format!("{} is not in allowed_connectors", cert.label()));
        }
        // A connector's certificate is issued for this: unlike a device's, an absent EKU is
        // not read as "any purpose".
        cert.client_auth_usage(false).map_err(|why| {
            format!("{why}; issue the connector's channel certificate with Client Authentication in its enhanced key usage")
        })?;
        if let Some((crls, unreadable)) = &self.revocation {
            match pki::crl::status(&cert, crls, now) {
                pki::crl::RevocationStatus::Good => {}
                pki::crl::RevocationStatus::Revoked { detail } => {
                    return Err(describe_peer(&PeerCert::Revoked { detail }))
                }
                // Unknown is refused whatever crl_policy says for devices: a gateway has few
                // connectors, and each is given every device's traffic for its endpoints.
                // A pinned certificate's trust is its pin, so no CRL from its issuer is fine.
                pki::crl::RevocationStatus::Unknown { .. } if self.pinned => {}
                pki::crl::RevocationStatus::Unknown { why } => {
                    return Err(format!(
                        "the revocation status of {} is unknown ({why}{}); connectors are refused when it is: add the CRL of its issuer to crls",
                        cert.label(),
                        if unreadable.is_empty() {
                            String::new()
                        } else {
                            format!("; unreadable CRL: {}", unreadable.join("; "))
                        }
                    ))
                }
            }
        }
        Ok(cert)
    }

    /// Whether the connector of `cert` may announce every endpoint of `hello`: an endpoint
    /// bound by some entry only by the connectors it binds; any other, by a connector with a
    /// plain entry. Else which endpoints it may not, and the fix.
    pub(crate) fn admits(
        &self,
        cert: &pki::cert::Certificate,
        hello: &tunnel::Hello,
    ) -> Result<(), String> {
        let mine: Vec<&AllowedConnector> = self
            .allowed
            .iter()
            .filter(|a| self.names(a, cert))
            .collect();
        let plain = mine.iter().any(|a| matches!(a, AllowedConnector::Name(_)));
        let binds = |a: &AllowedConnector, id: u64| matches!(a, AllowedConnector::Bound(b) if b.endpoints.contains(&id));
        let refused: Vec<String> = hello
            .endpoints
            .iter()
            .filter(|e| {
                let mine_binds = mine.iter().any(|a| binds(a, e.id));
                let anyone_binds = self.allowed.iter().any(|a| binds(a, e.id));
                !(mine_binds || (plain && !anyone_binds))
            })
            .map(|e| format!("{} ({})", e.id, e.name))
            .collect();
        if refused.is_empty() {
            return Ok(());
        }
        Err(format!(
            "connector {} ({}) announced endpoint(s) {} that allowed_connectors does not bind to it; bind them to it ({{ name = \"{}\", endpoints = [...] }}) or take them out of the connector's [[endpoints]]",
            hello.connector_id,
            cert.label(),
            refused.join(", "),
            cert.common_name().unwrap_or(&cert.thumbprint),
        ))
    }
}

/// The roots connector certificates must chain to: none when they are pinned.
pub(crate) fn load_connector_roots(config: &GatewayConfig) -> Result<RootSet, GatewayError> {
    if config.connector_roots.is_empty() {
        return Ok(RootSet::default());
    }
    Ok(RootSet::load(&config.connector_roots)?)
}

fn describe_peer(judged: &PeerCert) -> String {
    match judged {
        PeerCert::None => "it presented no certificate".into(),
        PeerCert::Trusted(cert) => format!("{} is trusted", cert.label()),
        PeerCert::Untrusted { detail } => format!("its certificate is not trusted: {detail}"),
        PeerCert::NotTimeValid { detail } => format!("its certificate is not valid now: {detail}"),
        PeerCert::Revoked { detail } => format!("its certificate is revoked: {detail}"),
    }
}
