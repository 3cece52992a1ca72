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
    ) -> Result<Box<pki::cert::Certificate>, ConnectorRefused> {
        let cert = if self.pinned {
            let Some(der) = leaf else {
                return Err(ConnectorRefused::NoCertificate);
            };
            let cert =
                pki::cert::Certificate::from_der(der).map_err(ConnectorRefused::Unparsable)?;
            if now < cert.not_before || now > cert.not_after {
                return Err(ConnectorRefused::NotTimeValid {
                    detail: format!(
                        "{} is valid from {} to {}",
                        cert.label(),
                        pki::filter::date_text(cert.not_before),
                        pki::filter::date_text(cert.not_after)
                    ),
                });
            }
            Box::new(cert)
        } else {
            match judge_peer(leaf, &self.roots, &[], now) {
                PeerCert::Trusted(cert) => cert,
                PeerCert::None => return Err(ConnectorRefused::NoCertificate),
                PeerCert::Untrusted { detail } => {
                    return Err(ConnectorRefused::Untrusted { detail })
                }
                PeerCert::NotTimeValid { detail } => {
                    return Err(ConnectorRefused::NotTimeValid { detail })
                }
                PeerCert::Revoked { detail } => return Err(ConnectorRefused::Revoked { detail }),
            }
        };
        if !self.allowed.iter().any(|a| self.names(a, &cert)) {
            return Err(ConnectorRefused::NotAllowed {
                label: cert.label(),
            });
        }
        // A connector's certificate is issued for this: unlike a device's, an absent EKU is
        // not read as "any purpose".
        cert.client_auth_usage(false)
            .map_err(|why| ConnectorRefused::NoClientAuth { why })?;
        if let Some((crls, unreadable)) = &self.revocation {
            match pki::crl::status(&cert, crls, now) {
                pki::crl::RevocationStatus::Good => {}
                pki::crl::RevocationStatus::Revoked { detail } => {
                    return Err(ConnectorRefused::Revoked { detail })
                }
                // Unknown is refused whatever crl_policy says for devices: a gateway has few
                // connectors, and each is given every device's traffic for its endpoints.
                // A pinned certificate's trust is its pin, so no CRL from its issuer is fine.
                pki::crl::RevocationStatus::Unknown { .. } if self.pinned => {}
                pki::crl::RevocationStatus::Unknown { why } => {
                    return Err(ConnectorRefused::RevocationUnknown {
                        label: cert.label(),
                        why,
                        unreadable: unreadable.clone(),
                    })
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
    ) -> Result<(), ConnectorRefused> {
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
        Err(ConnectorRefused::Unbound {
            connector_id: hello.connector_id.clone(),
            label: cert.label(),
            endpoints: refused,
            name: cert.common_name().unwrap_or(&cert.thumbprint).to_string(),
        })
    }
}

/// The roots connector certificates must chain to: none when they are pinned.
pub(crate) fn load_connector_roots(config: &GatewayConfig) -> Result<RootSet, GatewayError> {
    if config.connector_roots.is_empty() {
        return Ok(RootSet::default());
    }
    Ok(RootSet::load(&config.connector_roots)?)
}

/// Why a connector may not hold a channel (or may not announce what it did): the text after
/// "Refused a connector channel from {peer}: " or "Closed channel {id} of connector {id}: ".
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectorRefused {
    #[error("it presented no certificate")]
    NoCertificate,
    /// Pinned: the certificate is not one `pki` can read.
    #[error("its certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("its certificate is not trusted: {detail}")]
    Untrusted { detail: String },
    #[error("its certificate is not valid now: {detail}")]
    NotTimeValid { detail: String },
    #[error("its certificate is revoked: {detail}")]
    Revoked { detail: String },
    /// Trusted, but named by no entry of `allowed_connectors`.
    #[error("{label} is not in allowed_connectors")]
    NotAllowed { label: String },
    /// No Client Authentication in its enhanced key usage: `why` says what it has instead.
    #[error("{why}; issue the connector's channel certificate with Client Authentication in its enhanced key usage")]
    NoClientAuth { why: String },
    /// Revocation is checked and no CRL answers for it.
    #[error(
        "the revocation status of {label} is unknown ({why}{}); connectors are refused when it is: add the CRL of its issuer to crls",
        unreadable_crls(unreadable)
    )]
    RevocationUnknown {
        label: String,
        why: String,
        /// The gateway's CRLs that could not be read, each with why.
        unreadable: Vec<String>,
    },
    /// Its hello announced endpoints `allowed_connectors` does not bind to it, each as
    /// "id (name)"; `name` is what its entry would be named by (its CN, else its thumbprint).
    #[error(
        "connector {connector_id} ({label}) announced endpoint(s) {} that allowed_connectors does not bind to it; bind them to it ({{ name = \"{name}\", endpoints = [...] }}) or take them out of the connector's [[endpoints]]",
        endpoints.join(", ")
    )]
    Unbound {
        connector_id: String,
        label: String,
        endpoints: Vec<String>,
        name: String,
    },
}

fn unreadable_crls(unreadable: &[String]) -> String {
    if unreadable.is_empty() {
        String::new()
    } else {
        format!("; unreadable CRL: {}", unreadable.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::ConnectorRefused;

    /// The log says these texts after "Refused a connector channel from {peer}: ", and the
    /// doctor's rules read them: each variant's text is the one the refusal had as a String.
    #[test]
    fn a_refusal_reads_as_the_log_line_said_it() {
        let label = "CN=c (thumbprint 0A1B)".to_string();
        let cases = [
            (
                ConnectorRefused::NoCertificate,
                "it presented no certificate".to_string(),
            ),
            (
                ConnectorRefused::NotAllowed {
                    label: label.clone(),
                },
                format!("{label} is not in allowed_connectors"),
            ),
            (
                ConnectorRefused::NoClientAuth {
                    why: "no Client Authentication".into(),
                },
                "no Client Authentication; issue the connector's channel certificate with Client Authentication in its enhanced key usage".into(),
            ),
            (
                ConnectorRefused::RevocationUnknown {
                    label: label.clone(),
                    why: "no CRL".into(),
                    unreadable: Vec::new(),
                },
                format!("the revocation status of {label} is unknown (no CRL); connectors are refused when it is: add the CRL of its issuer to crls"),
            ),
            (
                ConnectorRefused::RevocationUnknown {
                    label: label.clone(),
                    why: "no CRL".into(),
                    unreadable: vec!["a.crl: gone".into(), "b.crl: bad".into()],
                },
                format!("the revocation status of {label} is unknown (no CRL; unreadable CRL: a.crl: gone; b.crl: bad); connectors are refused when it is: add the CRL of its issuer to crls"),
            ),
            (
                ConnectorRefused::Unbound {
                    connector_id: "branch".into(),
                    label: label.clone(),
                    endpoints: vec!["3456 (SMS_MP)".into(), "7 (X)".into()],
                    name: "c".into(),
                },
                format!("connector branch ({label}) announced endpoint(s) 3456 (SMS_MP), 7 (X) that allowed_connectors does not bind to it; bind them to it ({{ name = \"c\", endpoints = [...] }}) or take them out of the connector's [[endpoints]]"),
            ),
        ];
        for (refused, said) in cases {
            assert_eq!(refused.to_string(), said);
        }
    }
}
