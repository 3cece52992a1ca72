//! Lab certificate issuance with rcgen: a root CA and every certificate a Portcullis lab needs,
//! with the key usages and EKUs a real deployment would have. Tests use [`LabCa`] to make the
//! odd certificates (no key usage, wrong EKU, expired, ...) that the filter chain must refuse.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, IsCa, Issuer, KeyPair, SerialNumber,
};
pub use rcgen::{DnType, ExtendedKeyUsagePurpose, KeyUsagePurpose};
use ring::rand::SecureRandom;
use time::{Duration, OffsetDateTime};

use crate::error::{PkiError, Result};

/// A certificate and its key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
}

/// What a leaf certificate should say.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub common_name: String,
    /// DNS names or IP addresses.
    pub sans: Vec<String>,
    pub key_usages: Vec<KeyUsagePurpose>,
    pub extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// A client-authentication certificate valid from an hour ago for `days` days.
    pub fn client_auth(common_name: &str, days: i64) -> LeafSpec {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            common_name: common_name.into(),
            sans: Vec::new(),
            key_usages: vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
            extended_key_usages: vec![ExtendedKeyUsagePurpose::ClientAuth],
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }

    /// A TLS server certificate for `hosts`.
    pub fn server_auth(common_name: &str, hosts: &[String], days: i64) -> LeafSpec {
        LeafSpec {
            sans: hosts.to_vec(),
            extended_key_usages: vec![ExtendedKeyUsagePurpose::ServerAuth],
            ..LeafSpec::client_auth(common_name, days)
        }
    }
}

/// A certificate authority that can issue.
pub struct LabCa {
    issuer: Issuer<'static, KeyPair>,
    issued: Issued,
}

impl LabCa {
    /// A self-signed root CA valid for `years`.
    pub fn new_root(common_name: &str, years: i64) -> Result<LabCa> {
        LabCa::new_ca(common_name, years, None)
    }

    /// An intermediate CA under this one.
    pub fn new_intermediate(&self, common_name: &str, years: i64) -> Result<LabCa> {
        LabCa::new_ca(common_name, years, Some(self))
    }

    /// A CA signed by `parent`, or by itself when there is none.
    fn new_ca(common_name: &str, years: i64, parent: Option<&LabCa>) -> Result<LabCa> {
        let key = new_key(common_name)?;
        let params = ca_params(common_name, years)?;
        let cert = match parent {
            Some(parent) => params.signed_by(&key, &parent.issuer),
            None => params.self_signed(&key),
        }
        .map_err(|e| issue_error(common_name, e))?;
        Ok(LabCa {
            issued: Issued {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                cert_der: cert.der().to_vec(),
            },
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its certificate and key (PEM), e.g. a lab root written earlier.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<LabCa> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| issue_error("CA from PEM", e))?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| issue_error("CA from PEM", e))?;
        let cert_der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c.to_vec())
            .map_err(|e| PkiError::Issue {
                what: "CA from PEM".into(),
                reason: e.to_string(),
            })?;
        Ok(LabCa {
            issued: Issued {
                cert_pem: cert_pem.to_string(),
                key_pem: key_pem.to_string(),
                cert_der,
            },
            issuer,
        })
    }

    /// A CRL (PEM) signed by this CA, revoking the certificates given (DER), valid for `days`.
    pub fn crl(&self, revoked: &[&[u8]], days: i64) -> Result<String> {
        use x509_parser::prelude::FromDer;
        let now = OffsetDateTime::now_utc();
        let mut revoked_certs = Vec::new();
        for der in revoked {
            let (_, cert) =
                x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| {
                    PkiError::Issue {
                        what: "CRL".into(),
                        reason: format!("a certificate to revoke cannot be read: {e}"),
                    }
                })?;
            revoked_certs.push(rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(cert.raw_serial()),
                revocation_time: now - Duration::minutes(5),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(days),
            crl_number: random_serial("CRL")?,
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|e| issue_error("CRL", e))?;
        crl.pem().map_err(|e| issue_error("CRL", e))
    }

    pub fn cert(&self) -> &Issued {
        &self.issued
    }

    /// Issues a leaf certificate with a new ECDSA P-256 key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued> {
        self.issue_named(spec, common_name_dn(&spec.common_name))
    }

    /// Issues a leaf certificate whose subject is `subject`'s attributes, in order (one RDN
    /// each), instead of `O=Portcullis Lab, CN=<spec.common_name>`: tests make crafted names
    /// with it, e.g. an O holding `, CN=...` or two CNs.
    pub fn issue_with_subject(
        &self,
        spec: &LeafSpec,
        subject: &[(DnType, &str)],
    ) -> Result<Issued> {
        let mut dn = DistinguishedName::new();
        for (kind, value) in subject {
            dn.push(kind.clone(), *value);
        }
        self.issue_named(spec, dn)
    }

    fn issue_named(&self, spec: &LeafSpec, dn: DistinguishedName) -> Result<Issued> {
        let name = &spec.common_name;
        let key = new_key(name)?;
        let mut params =
            CertificateParams::new(spec.sans.clone()).map_err(|e| issue_error(name, e))?;
        params.distinguished_name = dn;
        params.key_usages = spec.key_usages.clone();
        params.extended_key_usages = spec.extended_key_usages.clone();
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.serial_number = Some(random_serial(name)?);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| issue_error(name, e))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
        })
    }
}

fn ca_params(common_name: &str, years: i64) -> Result<CertificateParams> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name_dn(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(365 * years);
    params.serial_number = Some(random_serial(common_name)?);
    Ok(params)
}

fn common_name_dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Portcullis Lab");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn new_key(what: &str) -> Result<KeyPair> {
    KeyPair::generate().map_err(|e| issue_error(what, e))
}

fn random_serial(what: &str) -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Issue {
            what: what.into(),
            reason: "the system random generator failed".into(),
        })?;
    bytes[0] &= 0x7f; // a positive INTEGER
    Ok(SerialNumber::from_slice(&bytes))
}

fn issue_error(what: &str, e: rcgen::Error) -> PkiError {
    PkiError::Issue {
        what: what.into(),
        reason: e.to_string(),
    }
}

/// Options for [`LabPki::issue`].
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Names and addresses the gateway (and the reference management point) answer on.
    pub hosts: Vec<String>,
    /// How many device certificates.
    pub devices: usize,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
            devices: 2,
        }
    }
}

/// Most device certificates `pki init` will make in one go (each is a key generation).
pub const MAX_LAB_DEVICES: usize = 10_000;

/// The subject CN of the lab's connector channel certificate: what a lab gateway's
/// `allowed_connectors` names.
pub const CHANNEL_CN: &str = "Portcullis Connector Channel";

/// One file of the lab PKI: where it goes, what it is for, what it holds.
#[derive(Debug, Clone)]
pub struct LabFile {
    pub path: PathBuf,
    pub purpose: String,
    pub contents: String,
    pub secret: bool,
}

/// Where each part of a lab PKI lives, relative to its directory.
pub mod layout {
    pub const ROOT_CERT: &str = "ca/root.crt";
    pub const ROOT_KEY: &str = "ca/root.key";
    /// The roots the gateway's `connector_roots` names. In the lab a copy of the root CA; in
    /// production the CA that issues connector channel certificates and no device's.
    pub const CONNECTOR_ROOTS: &str = "ca/connector-roots.crt";
    pub const GATEWAY_CERT: &str = "gateway/server.crt";
    pub const GATEWAY_KEY: &str = "gateway/server.key";
    pub const MP_CERT: &str = "mp/server.crt";
    pub const MP_KEY: &str = "mp/server.key";
    pub const CHANNEL_CERT: &str = "connector/channel.crt";
    pub const CHANNEL_KEY: &str = "connector/channel.key";
    /// The directory the connector's filter chain reads.
    pub const CONNECTOR_STORE: &str = "connector/store";
    pub const CLIENT_AUTH_CERT: &str = "connector/store/client-auth.crt";
    pub const CLIENT_AUTH_KEY: &str = "connector/store/client-auth.key";
    pub const DEVICES: &str = "devices";
    pub const README: &str = "README.md";
    pub const SITE_TOKEN_KEY: &str = "site/token.key";
    pub const SITE_TOKEN_PUB: &str = "site/token.pub";
}

/// A new site token key pair: the private key (PEM PKCS#8) and its public key (PEM SPKI).
/// P-256 for ES256, or Ed25519 for EdDSA.
pub fn token_key_pair(ed25519: bool) -> Result<(String, String)> {
    let algorithm = if ed25519 {
        &rcgen::PKCS_ED25519
    } else {
        &rcgen::PKCS_ECDSA_P256_SHA256
    };
    let pair = rcgen::KeyPair::generate_for(algorithm).map_err(|e| PkiError::Issue {
        what: "site token key".into(),
        reason: e.to_string(),
    })?;
    Ok((pair.serialize_pem(), pair.public_key_pem()))
}

pub struct LabPki {
    pub files: Vec<LabFile>,
}

impl LabPki {
    pub fn issue(options: &LabOptions) -> Result<LabPki> {
        if options.hosts.is_empty() {
            return Err(PkiError::Issue {
                what: "gateway server certificate".into(),
                reason: "no host names given".into(),
            });
        }
        if let Some(bad) = options.hosts.iter().find(|h| !valid_host(h)) {
            return Err(PkiError::Issue {
                what: "gateway server certificate".into(),
                reason: format!("\"{bad}\" is not a DNS name or an IP address"),
            });
        }
        if options.devices > MAX_LAB_DEVICES {
            return Err(PkiError::Issue {
                what: "device certificates".into(),
                reason: format!(
                    "{} devices asked for; at most {MAX_LAB_DEVICES}",
                    options.devices
                ),
            });
        }
        let root = LabCa::new_root("Portcullis Lab Root CA", 10)?;
        let mut files = Vec::new();
        let mut pair = |cert: &str, key: &str, purpose: &str, issued: &Issued| {
            files.push(LabFile {
                path: cert.into(),
                purpose: purpose.into(),
                contents: issued.cert_pem.clone(),
                secret: false,
            });
            files.push(LabFile {
                path: key.into(),
                purpose: format!("private key of {cert}"),
                contents: issued.key_pem.clone(),
                secret: true,
            });
        };
        pair(
            layout::ROOT_CERT,
            layout::ROOT_KEY,
            "lab root CA: the gateway's trusted root for devices, the connector's allowed root CA, and the CA curl and probe trust (--cacert / --ca)",
            root.cert(),
        );
        let days = 825;
        let servers = [
            (
                layout::GATEWAY_CERT,
                layout::GATEWAY_KEY,
                "Portcullis Gateway",
                "gateway TLS server",
            ),
            (
                layout::MP_CERT,
                layout::MP_KEY,
                "Portcullis Reference Management Point",
                "reference management point's HTTPS server",
            ),
        ];
        for (cert, key, name, what) in servers {
            pair(
                cert,
                key,
                &format!("{what} certificate for {}", options.hosts.join(", ")),
                &root.issue(&LeafSpec::server_auth(name, &options.hosts, days))?,
            );
        }
        let mut channel = LeafSpec::client_auth(CHANNEL_CN, days);
        channel.sans = vec!["connector-channel.portcullis.lab".into()];
        pair(
            layout::CHANNEL_CERT,
            layout::CHANNEL_KEY,
            "connector's channel certificate: it presents this when it dials the gateway",
            &root.issue(&channel)?,
        );
        let mut client = LeafSpec::client_auth("Portcullis Connector", days);
        client.sans = vec!["connector.portcullis.lab".into()];
        pair(
            layout::CLIENT_AUTH_CERT,
            layout::CLIENT_AUTH_KEY,
            "connector's client authentication certificate, in the store its filter chain reads; it presents this to HTTPS endpoints",
            &root.issue(&client)?,
        );
        for n in 1..=options.devices {
            let name = format!("device-{n:03}");
            let mut device = LeafSpec::client_auth(&name.to_ascii_uppercase(), days);
            device.sans = vec![format!("{name}.portcullis.lab")];
            pair(
                &format!("{}/{name}.crt", layout::DEVICES),
                &format!("{}/{name}.key", layout::DEVICES),
                "device client certificate (curl --cert / probe --cert)",
                &root.issue(&device)?,
            );
        }
        files.push(LabFile {
            path: layout::CONNECTOR_ROOTS.into(),
            purpose: "the gateway's connector_roots: connector channel certificates must chain to these (in this lab the same root CA; in production the CA that issues connectors and no devices)".into(),
            contents: root.cert().cert_pem.clone(),
            secret: false,
        });
        let (token_key, token_pub) = token_key_pair(false)?;
        files.push(LabFile {
            path: layout::SITE_TOKEN_KEY.into(),
            purpose: "the site's token signing key (ES256): `portcullis token issue --key` signs device tokens with it".into(),
            contents: token_key,
            secret: true,
        });
        files.push(LabFile {
            path: layout::SITE_TOKEN_PUB.into(),
            purpose: "the site's token public key: the gateway's [tokens] keys check CCM_PROXY_SERVERAUTH tokens with it".into(),
            contents: token_pub,
            secret: false,
        });
        let readme = readme_text(&files);
        files.push(LabFile {
            path: layout::README.into(),
            purpose: "this list".into(),
            contents: readme,
            secret: false,
        });
        Ok(LabPki { files })
    }

    /// Writes every file under `dir`. Keys are readable by the owner only. Refuses to replace
    /// an existing lab PKI unless `force`, because its certificates may be deployed already.
    pub fn write(&self, dir: &Path, force: bool) -> Result<()> {
        let root = dir.join(layout::ROOT_CERT);
        if !force && root.exists() {
            return Err(PkiError::Write {
                path: dir.to_path_buf(),
                reason: format!(
                    "already holds a lab PKI ({} exists); pass --force to replace it",
                    root.display()
                ),
            });
        }
        for file in &self.files {
            let path = dir.join(&file.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| write_error(parent, e))?;
            }
            write_file(&path, file.contents.as_bytes(), file.secret)
                .map_err(|e| write_error(&path, e))?;
        }
        Ok(())
    }
}

fn write_error(path: &Path, e: std::io::Error) -> PkiError {
    PkiError::Write {
        path: path.to_path_buf(),
        reason: format!("cannot write: {e}"),
    }
}

/// Writes `contents` to `path`; a `secret` (a private key) is readable by its owner only.
pub fn write_file(path: &Path, contents: &[u8], secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let host = host.strip_prefix("*.").unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn readme_text(files: &[LabFile]) -> String {
    let mut text = String::from(
        "# Portcullis lab PKI\n\n\
         Made by `portcullis pki init`. For labs and tests only: the root CA's key is here in the clear.\n\n\
         | file | use |\n|---|---|\n",
    );
    for file in files {
        text.push_str(&format!(
            "| `{}` | {} |\n",
            file.path.display(),
            file.purpose
        ));
    }
    text.push_str(
        "\nCheck the connector's certificate choice:\n\n\
         ```\nportcullis doctor certs --store connector/store --allowed-roots ca/root.crt\n```\n",
    );
    text
}
