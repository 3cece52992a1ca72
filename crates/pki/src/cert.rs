//! One parsed X.509 certificate, owned, with the facts the filter chain and the doctor need.

use ring::digest;
use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// The client authentication extended key usage (RFC 5280 id-kp-clientAuth).
pub const OID_CLIENT_AUTH: &str = "1.3.6.1.5.5.7.3.2";

/// Key usage as the certificate states it. `None` in [`Certificate::key_usage`] means the
/// extension is absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyUsage {
    pub digital_signature: bool,
    pub key_cert_sign: bool,
    /// Names of every bit that is set, as Windows shows them ("Digital Signature", ...).
    pub names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtendedKeyUsage {
    pub client_auth: bool,
    pub server_auth: bool,
    /// Every purpose, as a dotted OID followed by its common name where one is known.
    pub purposes: Vec<String>,
}

/// A parsed certificate. Holds its DER so the chain builder can verify signatures with it.
#[derive(Debug, Clone, Serialize)]
pub struct Certificate {
    pub subject: String,
    pub issuer: String,
    /// Subject alternative names: `DNS:host`, `IP:1.2.3.4`, `email:a@b`, `URI:...`.
    pub sans: Vec<String>,
    /// Upper-case hex, no separators.
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    pub key_usage: Option<KeyUsage>,
    pub extended_key_usage: Option<ExtendedKeyUsage>,
    pub is_ca: bool,
    /// SHA-1 of the DER, upper-case hex: what Windows calls the thumbprint.
    pub thumbprint: String,
    pub sha256: String,
    /// Problems found while reading extensions (a duplicated or malformed extension). The
    /// certificate still loads; the stage that needs the extension treats it as absent.
    pub extension_problems: Vec<String>,
    /// The subject's CN attributes as parsed (RFC 5280 AttributeTypeAndValue), in DER order;
    /// a value that is not a string type is left out. Names that decide anything (the
    /// connector allow-list, the filter chain's shared-name check) are read from here, never
    /// from the printed [`Certificate::subject`], where an O of `Contoso, CN=X` reads as a CN.
    #[serde(skip)]
    common_names: Vec<String>,
    #[serde(skip)]
    der: Vec<u8>,
    #[serde(skip)]
    subject_raw: Vec<u8>,
    #[serde(skip)]
    issuer_raw: Vec<u8>,
    #[serde(skip)]
    spki_raw: Vec<u8>,
}

impl PartialEq for Certificate {
    fn eq(&self, other: &Self) -> bool {
        self.der == other.der
    }
}
impl Eq for Certificate {}

impl Certificate {
    /// Parses one DER certificate. The error is x509-parser's description of what was wrong.
    pub fn from_der(der: &[u8]) -> Result<Certificate, String> {
        let (rest, x509) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        if !rest.is_empty() {
            return Err(format!(
                "{} bytes of trailing data after the certificate",
                rest.len()
            ));
        }
        let mut problems = Vec::new();

        let key_usage = match x509.key_usage() {
            Ok(Some(ext)) => {
                let ku = ext.value;
                Some(KeyUsage {
                    digital_signature: ku.digital_signature(),
                    key_cert_sign: ku.key_cert_sign(),
                    names: key_usage_names(ku.flags),
                })
            }
            Ok(None) => None,
            Err(e) => {
                problems.push(format!("key usage extension unreadable: {e}"));
                None
            }
        };

        let extended_key_usage = match x509.extended_key_usage() {
            Ok(Some(ext)) => {
                let eku = ext.value;
                let mut purposes = Vec::new();
                let known = [
                    (eku.any, "2.5.29.37.0 (Any Purpose)"),
                    (eku.server_auth, "1.3.6.1.5.5.7.3.1 (Server Authentication)"),
                    (eku.client_auth, "1.3.6.1.5.5.7.3.2 (Client Authentication)"),
                    (eku.code_signing, "1.3.6.1.5.5.7.3.3 (Code Signing)"),
                    (eku.email_protection, "1.3.6.1.5.5.7.3.4 (Secure Email)"),
                    (eku.time_stamping, "1.3.6.1.5.5.7.3.8 (Time Stamping)"),
                    (eku.ocsp_signing, "1.3.6.1.5.5.7.3.9 (OCSP Signing)"),
                ];
                purposes.extend(
                    known
                        .iter()
                        .filter(|(set, _)| *set)
                        .map(|(_, n)| n.to_string()),
                );
                purposes.extend(eku.other.iter().map(|oid| oid.to_id_string()));
                Some(ExtendedKeyUsage {
                    client_auth: eku.client_auth,
                    server_auth: eku.server_auth,
                    purposes,
                })
            }
            Ok(None) => None,
            Err(e) => {
                problems.push(format!("extended key usage extension unreadable: {e}"));
                None
            }
        };

        let mut sans = Vec::new();
        match x509.subject_alternative_name() {
            Ok(Some(ext)) => {
                for name in &ext.value.general_names {
                    sans.push(match name {
                        GeneralName::DNSName(d) => format!("DNS:{d}"),
                        GeneralName::IPAddress(b) => format!("IP:{}", ip_text(b)),
                        GeneralName::RFC822Name(m) => format!("email:{m}"),
                        GeneralName::URI(u) => format!("URI:{u}"),
                        GeneralName::DirectoryName(n) => format!("DirName:{n}"),
                        other => format!("{other:?}"),
                    });
                }
            }
            Ok(None) => {}
            Err(e) => problems.push(format!(
                "subject alternative name extension unreadable: {e}"
            )),
        }

        let is_ca = match x509.basic_constraints() {
            Ok(Some(bc)) => bc.value.ca,
            Ok(None) => false,
            Err(e) => {
                problems.push(format!("basic constraints extension unreadable: {e}"));
                false
            }
        };

        Ok(Certificate {
            subject: name_text(x509.subject()),
            issuer: name_text(x509.issuer()),
            sans,
            serial: serial_text(x509.raw_serial()),
            not_before: x509.validity().not_before.to_datetime(),
            not_after: x509.validity().not_after.to_datetime(),
            key_usage,
            extended_key_usage,
            is_ca,
            thumbprint: hex_upper(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref()),
            sha256: hex_upper(digest::digest(&digest::SHA256, der).as_ref()),
            extension_problems: problems,
            common_names: x509
                .subject()
                .iter_common_name()
                .filter_map(|attr| attr.as_str().ok().map(str::to_string))
                .collect(),
            der: der.to_vec(),
            subject_raw: x509.subject().as_raw().to_vec(),
            issuer_raw: x509.issuer().as_raw().to_vec(),
            spki_raw: x509.public_key().raw.to_vec(),
        })
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The DER of the issuer name.
    pub fn issuer_der(&self) -> &[u8] {
        &self.issuer_raw
    }

    /// The DER of the subject name (what TLS servers send as CA hints).
    pub fn subject_der(&self) -> &[u8] {
        &self.subject_raw
    }

    /// The DER SubjectPublicKeyInfo, to compare with a private key's public half.
    pub fn spki(&self) -> &[u8] {
        &self.spki_raw
    }

    /// Same subject name bytes and same key: the same CA, even if re-issued or cross-signed.
    pub fn same_entity(&self, other: &Certificate) -> bool {
        self.subject_raw == other.subject_raw && self.spki_raw == other.spki_raw
    }

    pub fn is_self_issued(&self) -> bool {
        self.subject_raw == self.issuer_raw
    }

    /// Could `issuer` have issued `self`? Names must match and the signature must verify.
    pub fn is_signed_by(&self, issuer: &Certificate) -> bool {
        if self.issuer_raw != issuer.subject_raw {
            return false;
        }
        let (Ok((_, me)), Ok((_, them))) = (
            X509Certificate::from_der(&self.der),
            X509Certificate::from_der(&issuer.der),
        ) else {
            return false;
        };
        me.verify_signature(Some(them.public_key())).is_ok()
    }

    /// `subject (thumbprint T)`: how every log line and table names a certificate.
    pub fn label(&self) -> String {
        format!(
            "{} (thumbprint {})",
            display_subject(&self.subject),
            self.thumbprint
        )
    }

    pub fn has_digital_signature(&self) -> bool {
        self.key_usage.as_ref().is_some_and(|k| k.digital_signature)
    }

    pub fn has_client_auth(&self) -> bool {
        self.extended_key_usage
            .as_ref()
            .is_some_and(|e| e.client_auth)
    }

    /// Whether the extended key usage allows TLS client authentication: it states Client
    /// Authentication (1.3.6.1.5.5.7.3.2), or, when `absent_allows`, the extension is absent
    /// (RFC 5280 4.2.1.12: any purpose). Else what it states instead, for the refusal.
    pub fn client_auth_usage(&self, absent_allows: bool) -> Result<(), String> {
        match &self.extended_key_usage {
            Some(eku) if eku.client_auth => Ok(()),
            None if absent_allows && !self.extension_problems.iter().any(|p| p.starts_with("extended key usage")) => Ok(()),
            None => Err(format!(
                "{} has no usable enhanced key usage extension, so Client Authentication (1.3.6.1.5.5.7.3.2) is not stated",
                self.label()
            )),
            Some(eku) => Err(format!(
                "{} has enhanced key usage {} without Client Authentication (1.3.6.1.5.5.7.3.2)",
                self.label(),
                if eku.purposes.is_empty() {
                    "(none)".to_string()
                } else {
                    eku.purposes.join(", ")
                }
            )),
        }
    }

    /// The subject's common name, read from its parsed attributes: `None` when it has no CN,
    /// an empty one, or more than one (which of two names is meant cannot be told, so a name
    /// check must not pass on either).
    pub fn common_name(&self) -> Option<&str> {
        match self.common_names.as_slice() {
            [only] if !only.is_empty() => Some(only),
            _ => None,
        }
    }

    /// The names that identify a machine: every SAN and every CN attribute of the subject (as
    /// `CN=...`), read from the parsed certificate.
    pub fn machine_names(&self) -> Vec<String> {
        let mut names = self.sans.clone();
        names.extend(
            self.common_names
                .iter()
                .filter(|cn| !cn.is_empty())
                .map(|cn| format!("CN={cn}")),
        );
        names
    }
}

fn display_subject(subject: &str) -> &str {
    if subject.is_empty() {
        "(empty subject)"
    } else {
        subject
    }
}

/// A name as Windows and RFC 4514 print it: most specific first (`CN=host, O=Contoso`).
pub(crate) fn name_text(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<_> = name.iter().collect();
    rdns.iter()
        .rev()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| {
                    let key = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                        .map(str::to_string)
                        .unwrap_or_else(|_| attr.attr_type().to_id_string());
                    // A value that is not a string type is shown as RFC 4514's #hex.
                    let value = attr
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|_| format!("#{}", hex_upper(attr.attr_value().data)));
                    format!("{key}={value}")
                })
                .collect::<Vec<_>>()
                .join(" + ")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn ip_text(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string(),
        16 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(bytes);
            std::net::Ipv6Addr::from(octets).to_string()
        }
        _ => hex_upper(bytes),
    }
}

fn key_usage_names(flags: u16) -> Vec<String> {
    const NAMES: [&str; 9] = [
        "Digital Signature",
        "Non-Repudiation",
        "Key Encipherment",
        "Data Encipherment",
        "Key Agreement",
        "Certificate Signing",
        "CRL Signing",
        "Encipher Only",
        "Decipher Only",
    ];
    NAMES
        .iter()
        .enumerate()
        .filter(|(bit, _)| flags >> bit & 1 == 1)
        .map(|(_, n)| n.to_string())
        .collect()
}

/// A serial number as the integer's value in hex, the way `openssl x509 -serial` prints it: DER
/// prefixes a 0x00 sign byte when the top bit is set, and that byte is not part of the number.
/// Certificates and CRL entries both go through here, so revocation lookups agree.
pub fn serial_text(raw: &[u8]) -> String {
    let significant = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex_upper(&raw[significant.min(raw.len())..])
}

pub fn hex_upper(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02X}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::serial_text;

    #[test]
    fn serial_text_drops_the_der_sign_byte_only() {
        assert_eq!(serial_text(&[0x00, 0x81, 0x55]), "8155");
        assert_eq!(serial_text(&[0x7F, 0x00]), "7F00");
        assert_eq!(serial_text(&[0x00]), "00");
        assert_eq!(serial_text(&[]), "");
    }
}
