//! Reading certificate and key files: PEM (any mix of certificates and keys), DER certificates,
//! DER PKCS#8 keys, and PKCS#12. Every failure names the file.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::{PemObject, SectionKind};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};

use crate::cert::Certificate;
use crate::error::{PkiError, Result};

/// Certificate and key files are small; anything bigger is a mistake or hostile.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// What one file held, in file order.
#[derive(Debug, Default)]
pub struct FileItems {
    pub certs: Vec<Certificate>,
    pub keys: Vec<PrivateKeyDer<'static>>,
}

/// The password for PKCS#12 files, and where it came from (said in the wrong-password error).
#[derive(Clone)]
pub struct Pkcs12Password {
    value: String,
    source: String,
}

impl Pkcs12Password {
    pub fn new(value: impl Into<String>, source: impl Into<String>) -> Self {
        Pkcs12Password {
            value: value.into(),
            source: source.into(),
        }
    }

    /// An empty password, as `openssl pkcs12 -export -passout pass:` writes.
    pub fn empty() -> Self {
        Pkcs12Password::new("", "no password given (empty password tried)")
    }

    /// The password in environment variable `var`, or the empty password when it is unset.
    pub fn from_env(var: &str) -> Self {
        match std::env::var(var) {
            Ok(v) => Pkcs12Password::new(v, format!("environment variable {var}")),
            Err(_) => Pkcs12Password::new(
                "",
                format!("no password given: environment variable {var} is unset, so the empty password was tried"),
            ),
        }
    }
}

impl std::fmt::Debug for Pkcs12Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password itself.
        f.debug_struct("Pkcs12Password")
            .field("source", &self.source)
            .finish()
    }
}

pub(crate) fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| PkiError::io(path, e))?;
    if !meta.is_file() {
        // A FIFO or device would block the read or never end.
        return Err(PkiError::NotRegularFile {
            path: path.to_path_buf(),
        });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(PkiError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
            limit: MAX_FILE_BYTES,
        });
    }
    std::fs::read(path).map_err(|e| PkiError::io(path, e))
}

pub(crate) fn is_pkcs12_name(path: &Path) -> bool {
    matches!(extension(path).as_deref(), Some("pfx" | "p12"))
}

pub(crate) fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
}

/// Reads a file as PKCS#12 (by its extension) or as PEM/DER.
pub(crate) fn read_file(path: &Path, password: &Pkcs12Password) -> Result<FileItems> {
    read_bytes(path, &read_limited(path)?, password)
}

/// What [`read_file`] makes of the bytes of the file at `path` (its extension picks PKCS#12 or
/// PEM/DER; it is named in errors): every certificate and store is read through here.
pub fn read_bytes(path: &Path, bytes: &[u8], password: &Pkcs12Password) -> Result<FileItems> {
    if is_pkcs12_name(path) {
        parse_pkcs12(path, bytes, password)
    } else {
        parse_pem_or_der(path, bytes)
    }
}

pub(crate) fn parse_pem_or_der(path: &Path, bytes: &[u8]) -> Result<FileItems> {
    let has_pem_marker = bytes.windows(11).any(|w| w == b"-----BEGIN ");
    if !has_pem_marker {
        return parse_der(path, bytes);
    }
    if contains(bytes, b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || contains(bytes, b"Proc-Type: 4,ENCRYPTED")
    {
        return Err(PkiError::EncryptedKey {
            path: path.to_path_buf(),
        });
    }
    if let Some(label) = unknown_pem_label(bytes) {
        return Err(PkiError::Pem {
            path: path.to_path_buf(),
            reason: format!(
                "unknown block \"-----BEGIN {label}-----\" (damaged, or not a certificate or key)"
            ),
        });
    }
    let mut items = FileItems::default();
    for section in <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(bytes) {
        let (kind, der) = section.map_err(|e| PkiError::Pem {
            path: path.to_path_buf(),
            reason: pem_error_text(&e),
        })?;
        match kind {
            SectionKind::Certificate => {
                let index = items.certs.len() + 1;
                let cert = Certificate::from_der(&der).map_err(|reason| PkiError::Certificate {
                    path: path.to_path_buf(),
                    index,
                    reason,
                })?;
                items.certs.push(cert);
            }
            SectionKind::PrivateKey => items.keys.push(PrivatePkcs8KeyDer::from(der).into()),
            SectionKind::RsaPrivateKey => items.keys.push(PrivatePkcs1KeyDer::from(der).into()),
            SectionKind::EcPrivateKey => items.keys.push(PrivateSec1KeyDer::from(der).into()),
            // CRLs, CSRs, public keys: not ours to judge here.
            _ => {}
        }
    }
    if items.certs.is_empty() && items.keys.is_empty() {
        return Err(PkiError::Pem {
            path: path.to_path_buf(),
            reason: "no CERTIFICATE or PRIVATE KEY block in it".into(),
        });
    }
    Ok(items)
}

fn parse_der(path: &Path, bytes: &[u8]) -> Result<FileItems> {
    if bytes.is_empty() {
        return Err(PkiError::Pem {
            path: path.to_path_buf(),
            reason: "the file is empty".into(),
        });
    }
    // A DER file is either one certificate or one PKCS#8 key; the first byte is a SEQUENCE tag.
    if bytes[0] != 0x30 {
        return Err(PkiError::NotCertificateOrKey {
            path: path.to_path_buf(),
        });
    }
    match Certificate::from_der(bytes) {
        Ok(cert) => Ok(FileItems {
            certs: vec![cert],
            keys: vec![],
        }),
        Err(cert_reason) => {
            let key: PrivateKeyDer<'static> = PrivatePkcs8KeyDer::from(bytes.to_vec()).into();
            if key_spki(&key).is_ok() {
                Ok(FileItems {
                    certs: vec![],
                    keys: vec![key],
                })
            } else {
                Err(PkiError::Certificate {
                    path: path.to_path_buf(),
                    index: 1,
                    reason: format!("DER data is neither a certificate ({cert_reason}) nor a PKCS#8 private key"),
                })
            }
        }
    }
}

fn pem_error_text(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => {
            let label = String::from_utf8_lossy(end_marker);
            let label = label.trim_start_matches("-----END ").trim_end_matches('-');
            format!("truncated: the {label} block has no \"-----END {label}-----\" line")
        }
        E::IllegalSectionStart { line } => format!(
            "malformed BEGIN line \"{}\"",
            String::from_utf8_lossy(&line[..line.len().min(80)])
        ),
        E::Base64Decode(msg) => format!("base64 inside a block is corrupt ({msg})"),
        other => other.to_string(),
    }
}

/// PEM labels we read or knowingly pass over; any other label is most likely a damaged
/// `BEGIN` line, which the PEM reader would skip without a word.
const KNOWN_PEM_LABELS: [&str; 13] = [
    "CERTIFICATE",
    "TRUSTED CERTIFICATE",
    "PRIVATE KEY",
    "RSA PRIVATE KEY",
    "EC PRIVATE KEY",
    "X509 CRL",
    "CERTIFICATE REQUEST",
    "NEW CERTIFICATE REQUEST",
    "PUBLIC KEY",
    "RSA PUBLIC KEY",
    "EC PARAMETERS",
    "DH PARAMETERS",
    "PKCS7",
];

fn unknown_pem_label(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("-----BEGIN "))
        .filter_map(|rest| rest.strip_suffix("-----"))
        .find(|label| !KNOWN_PEM_LABELS.contains(label))
        .map(|label| label.chars().take(60).collect())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub(crate) fn parse_pkcs12(
    path: &Path,
    bytes: &[u8],
    password: &Pkcs12Password,
) -> Result<FileItems> {
    use p12_keystore::error::Error as P12Error;
    let archive =
        p12_keystore::Pkcs12Archive::from_pkcs12(bytes, &password.value).map_err(|e| match e {
            P12Error::MacError(_) => PkiError::Pkcs12WrongPassword {
                path: path.to_path_buf(),
                source_of_password: password.source.clone(),
            },
            P12Error::DerError(_) | P12Error::InvalidVersion => PkiError::Pkcs12 {
                path: path.to_path_buf(),
                reason: format!("not a PKCS#12 file, or a damaged one ({e})"),
            },
            other => PkiError::Pkcs12 {
                path: path.to_path_buf(),
                reason: other.to_string(),
            },
        })?;
    let mut items = FileItems::default();
    for (i, bag) in archive.certs.iter().enumerate() {
        let cert =
            Certificate::from_der(bag.cert.as_der()).map_err(|reason| PkiError::Certificate {
                path: path.to_path_buf(),
                index: i + 1,
                reason,
            })?;
        items.certs.push(cert);
    }
    for bag in archive.keys {
        items
            .keys
            .push(PrivatePkcs8KeyDer::from(bag.key.as_der().to_vec()).into());
    }
    if items.certs.is_empty() {
        return Err(PkiError::NoCertificates {
            path: path.to_path_buf(),
        });
    }
    Ok(items)
}

/// The SubjectPublicKeyInfo of a private key, as rustls (which will sign with it) sees it.
/// An error means rustls cannot use the key at all.
pub fn key_spki(key: &PrivateKeyDer<'_>) -> std::result::Result<Vec<u8>, String> {
    let signing = rustls::crypto::ring::sign::any_supported_type(key).map_err(|e| match e {
        rustls::Error::General(msg) => msg,
        other => other.to_string(),
    })?;
    signing
        .public_key()
        .map(|spki| spki.as_ref().to_vec())
        .ok_or_else(|| "the key type does not expose its public key".to_string())
}

/// Reads every certificate in a list of files and directories (PEM or DER; keys ignored).
pub(crate) fn read_certificates(paths: &[PathBuf]) -> Result<Vec<Certificate>> {
    let mut certs = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| PkiError::io(path, e))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            for file in sorted_files(path)? {
                if matches!(
                    extension(&file).as_deref(),
                    Some("crt" | "cer" | "pem" | "der")
                ) {
                    found.extend(read_file(&file, &Pkcs12Password::empty())?.certs);
                }
            }
            if found.is_empty() {
                return Err(PkiError::NoCertificates { path: path.clone() });
            }
            certs.extend(found);
        } else {
            let items = read_file(path, &Pkcs12Password::empty())?;
            if items.certs.is_empty() {
                return Err(PkiError::NoCertificates { path: path.clone() });
            }
            certs.extend(items.certs);
        }
    }
    Ok(certs)
}

/// Regular files of a directory, sorted by name so every run reads them in the same order.
pub(crate) fn sorted_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| PkiError::io(dir, e))? {
        let entry = entry.map_err(|e| PkiError::io(dir, e))?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
