//! The one error type of this crate. Every variant names the file (or directory) and what was
//! wrong with it, because the person reading it has to go and fix that file.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: no such file or directory")]
    NotFound { path: PathBuf },

    #[error("{path}: is not a regular file or directory")]
    NotRegularFile { path: PathBuf },

    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{path}: is {size} bytes, larger than the {limit}-byte limit for a certificate or key file"
    )]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },

    #[error("{path}: bad PEM: {reason}")]
    Pem { path: PathBuf, reason: String },

    #[error("{path}: holds neither a PEM block nor a DER certificate (is it a certificate or key file at all?)")]
    NotCertificateOrKey { path: PathBuf },

    #[error("{path}: certificate #{index} cannot be parsed: {reason}")]
    Certificate {
        path: PathBuf,
        index: usize,
        reason: String,
    },

    #[error("{path}: holds an encrypted private key; Portcullis reads unencrypted keys only (decrypt it with `openssl pkey -in {path} -out KEYFILE`, readable by the service account only) or use a password-protected .pfx")]
    EncryptedKey { path: PathBuf },

    #[error("{path}: wrong PKCS#12 password (it was taken from {source_of_password})")]
    Pkcs12WrongPassword {
        path: PathBuf,
        source_of_password: String,
    },

    #[error("{path}: cannot read PKCS#12: {reason}")]
    Pkcs12 { path: PathBuf, reason: String },

    #[error(
        "{path}: the directory holds no certificates (looked for .crt .cer .pem .der .pfx .p12){detail}"
    )]
    EmptyStore { path: PathBuf, detail: String },

    #[error("{path}: holds no certificates")]
    NoCertificates { path: PathBuf },

    #[error("{key}: this private key does not belong to the certificate in {cert}")]
    KeyMismatch { key: PathBuf, cert: PathBuf },

    #[error("{path}: bad certificate revocation list: {reason}")]
    Crl { path: PathBuf, reason: String },

    #[error("{path}: {reason}")]
    Write { path: PathBuf, reason: String },

    #[error("issuing the lab certificate {what}: {reason}")]
    Issue { what: String, reason: String },
}

impl PkiError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            PkiError::NotFound { path }
        } else {
            PkiError::Io { path, source }
        }
    }
}

pub type Result<T, E = PkiError> = std::result::Result<T, E>;
