//! A server's (or client's) own certificate and key, read from files, ready for rustls.

use std::path::Path;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use time::OffsetDateTime;

use crate::cert::Certificate;
use crate::error::{PkiError, Result};
use crate::filter::date_text;
use crate::load::{self, key_spki, Pkcs12Password};
use crate::roots::RootSet;

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

/// `roots` as rustls trust anchors.
fn root_store(roots: &RootSet) -> std::result::Result<rustls::RootCertStore, rustls::Error> {
    let mut store = rustls::RootCertStore::empty();
    for root in &roots.certs {
        store.add(CertificateDer::from(root.der().to_vec()))?;
    }
    Ok(store)
}

/// A rustls client configuration that trusts `roots`, waiting for its client-auth choice.
pub fn client_config(
    roots: &RootSet,
) -> std::result::Result<
    rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    rustls::Error,
> {
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(roots)?),
    )
}

/// A rustls client configuration that trusts `roots` and checks the server's certificate
/// against `crls` (its own certificate only; the CAs are the configured roots). With
/// `allow_unknown`, a server whose issuer has no current CRL here is accepted; otherwise it is
/// refused as unknown. A CRL past its next update counts as unknown.
pub fn client_config_checking_revocation(
    roots: &RootSet,
    crls: &[crate::crl::RevocationList],
    allow_unknown: bool,
) -> std::result::Result<
    rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    rustls::Error,
> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut builder = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(root_store(roots)?),
        provider.clone(),
    )
    .with_crls(
        crls.iter()
            .map(|crl| rustls_pki_types::CertificateRevocationListDer::from(crl.der().to_vec())),
    )
    .only_check_end_entity_revocation()
    .enforce_revocation_expiration();
    if allow_unknown {
        builder = builder.allow_unknown_revocation_status();
    }
    let verifier = builder
        .build()
        .map_err(|e| rustls::Error::General(format!("server certificate verifier: {e}")))?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier))
}

/// Which TLS versions and cipher suites a server offers: TLS 1.2 as the floor, TLS 1.3
/// preferred, and only suites rustls implements (all AEAD with forward secrecy), so no
/// configuration can pick an unsafe one.
///
/// ```toml
/// [tls]
/// min_version = "1.2"        # or "1.3"
/// cipher_suites = ["TLS13_AES_256_GCM_SHA384", "TLS13_AES_128_GCM_SHA256", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPolicy {
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Empty: every suite rustls offers, in its order of preference.
    #[serde(default)]
    pub cipher_suites: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

impl TlsPolicy {
    /// Why this policy cannot be used, naming the suite or the version.
    pub fn check(&self) -> std::result::Result<(), String> {
        self.provider().map(|_| ())
    }

    fn versions(&self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        match self.min_version {
            TlsVersion::Tls12 => rustls::DEFAULT_VERSIONS,
            TlsVersion::Tls13 => &TLS13_ONLY,
        }
    }

    /// The ring provider with only the chosen suites, in the order given.
    pub fn provider(&self) -> std::result::Result<rustls::crypto::CryptoProvider, String> {
        let mut provider = rustls::crypto::ring::default_provider();
        let all = provider.cipher_suites.clone();
        let known = || {
            all.iter()
                .map(|s| format!("{:?}", s.suite()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.cipher_suites.is_empty() {
            let mut chosen = Vec::new();
            for name in &self.cipher_suites {
                let suite = all
                    .iter()
                    .find(|s| format!("{:?}", s.suite()).eq_ignore_ascii_case(name.trim()))
                    .ok_or_else(|| {
                        format!(
                            "cipher suite \"{name}\" is not one of the safe suites offered: {}",
                            known()
                        )
                    })?;
                chosen.push(*suite);
            }
            provider.cipher_suites = chosen;
        }
        let has = |version: rustls::ProtocolVersion| {
            provider
                .cipher_suites
                .iter()
                .any(|s| s.version().version == version)
        };
        if !has(rustls::ProtocolVersion::TLSv1_3) {
            return Err("no TLS 1.3 cipher suite is listed: TLS 1.3 is always offered, list at least one TLS13_* suite".into());
        }
        if self.min_version == TlsVersion::Tls12 && !has(rustls::ProtocolVersion::TLSv1_2) {
            return Err("min_version is 1.2 but no TLS 1.2 suite is listed: list a TLS_ECDHE_* suite or set min_version = \"1.3\"".into());
        }
        Ok(provider)
    }
}

/// A rustls server configuration for `identity` that asks for client certificates (when
/// `ask_client_cert`), accepts any at the handshake with `hint_roots` as CA hints, and offers
/// `alpn`. Who is trusted is decided per request with [`judge_peer`].
pub fn server_config(
    identity: Identity,
    hint_roots: &RootSet,
    ask_client_cert: bool,
    alpn: &[&[u8]],
) -> std::result::Result<rustls::ServerConfig, rustls::Error> {
    server_config_with_policy(
        identity,
        hint_roots,
        ask_client_cert,
        alpn,
        &TlsPolicy::default(),
    )
}

/// [`server_config`] with the versions and suites of `policy`.
pub fn server_config_with_policy(
    identity: Identity,
    hint_roots: &RootSet,
    ask_client_cert: bool,
    alpn: &[&[u8]],
    policy: &TlsPolicy,
) -> std::result::Result<rustls::ServerConfig, rustls::Error> {
    let provider = std::sync::Arc::new(policy.provider().map_err(rustls::Error::General)?);
    let verifier = std::sync::Arc::new(AcceptAnyClientCert::new(
        hint_roots,
        provider.signature_verification_algorithms,
        ask_client_cert,
    ));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(policy.versions())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Session tickets let a returning client resume without a full handshake (no signature
    // either way), and cost the server no memory per session: the state travels in the
    // ticket, encrypted with keys that rotate every 6 hours. Resumed sessions keep the
    // client's certificate, so it is judged as on the first connection.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(config)
}

/// What a server makes of the certificate a TLS peer presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerCert {
    None,
    Trusted(Box<Certificate>),
    Untrusted { detail: String },
    NotTimeValid { detail: String },
    Revoked { detail: String },
}

/// Judges a peer's leaf certificate (DER) against `roots` at `now`: it must chain to one of
/// them, it and its chain must be valid now, and no CRL in `crls` may revoke it.
pub fn judge_peer(
    der: Option<&[u8]>,
    roots: &RootSet,
    crls: &[crate::crl::RevocationList],
    now: OffsetDateTime,
) -> PeerCert {
    let Some(der) = der else {
        return PeerCert::None;
    };
    let cert = match Certificate::from_der(der) {
        Ok(cert) => cert,
        Err(e) => {
            return PeerCert::Untrusted {
                detail: format!("the certificate cannot be parsed: {e}"),
            }
        }
    };
    let pool: Vec<&Certificate> = roots.certs.iter().collect();
    let chain = crate::chain::build_to_anchor(&cert, &pool, |c| roots.contains(c));
    if !chain.certs.iter().any(|c| roots.contains(c)) {
        return PeerCert::Untrusted {
            detail: format!(
                "{} (issuer \"{}\"); chain: {}",
                cert.label(),
                cert.issuer,
                chain.describe()
            ),
        };
    }
    if let Some(bad) = chain
        .certs
        .iter()
        .find(|c| now < c.not_before || now > c.not_after)
    {
        return PeerCert::NotTimeValid {
            detail: format!(
                "{} is valid from {} to {}",
                bad.label(),
                date_text(bad.not_before),
                date_text(bad.not_after)
            ),
        };
    }
    if let Some(crl) = crls.iter().find(|crl| crl.revokes(&cert)) {
        return PeerCert::Revoked {
            detail: format!(
                "{} (serial {}) is revoked by {}",
                cert.label(),
                cert.serial,
                crl.source.display()
            ),
        };
    }
    PeerCert::Trusted(Box::new(cert))
}

/// Accepts any client certificate at the handshake (proving only that the client holds its
/// key), so the HTTP layer can refuse with a status that names the problem (IIS's sub-status,
/// or a gateway status text) instead of a bare TLS alert. Sends the roots as CA hints.
#[derive(Debug)]
pub struct AcceptAnyClientCert {
    hints: Vec<DistinguishedName>,
    algorithms: WebPkiSupportedAlgorithms,
    offer: bool,
}

impl AcceptAnyClientCert {
    pub fn new(
        roots: &RootSet,
        algorithms: WebPkiSupportedAlgorithms,
        offer: bool,
    ) -> AcceptAnyClientCert {
        AcceptAnyClientCert {
            hints: roots
                .certs
                .iter()
                .map(|c| DistinguishedName::from(c.subject_der().to_vec()))
                .collect(),
            algorithms,
            offer,
        }
    }
}

impl ClientCertVerifier for AcceptAnyClientCert {
    fn offer_client_auth(&self) -> bool {
        self.offer
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
