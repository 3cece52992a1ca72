//! A certificate store read from a directory: what Windows calls the machine's personal store.
//!
//! Layout understood, in any mix:
//! - `name.crt` (or `.cer`, `.pem`, `.der`) with its key in `name.key`;
//! - one `.pem` holding a certificate and its key (and perhaps its chain);
//! - `name.pfx` / `name.p12` (PKCS#12), with the password given by the caller;
//! - a certificate with no key at all (the filter chain rejects it, and says so).
//!
//! In each file the first certificate, and every certificate a key in the file (or in the
//! same-named `.key`) belongs to, is a store entry. Further CA certificates in a file are chain
//! certificates: they help build chains but are not candidates. Files with other extensions
//! are ignored and listed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::PrivateKeyDer;
use serde::Serialize;

use crate::cert::Certificate;
use crate::error::{PkiError, Result};
use crate::load::{self, extension, key_spki, FileItems, Pkcs12Password};

/// Whether a certificate comes with a private key Portcullis can sign with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum KeyState {
    /// No private key anywhere for this certificate.
    Absent,
    /// A key that matches the certificate and that rustls can sign with.
    Usable,
    /// A key is there but cannot be used; says why.
    Unusable(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreEntry {
    pub cert: Certificate,
    pub key: KeyState,
    /// The file the certificate was read from.
    pub source: PathBuf,
    /// The file its key was read from, when that is another file.
    pub key_source: Option<PathBuf>,
    #[serde(skip)]
    key_der: Option<Arc<PrivateKeyDer<'static>>>,
}

impl StoreEntry {
    /// The private key, when it is [`KeyState::Usable`].
    pub fn usable_key(&self) -> Option<&PrivateKeyDer<'static>> {
        match self.key {
            KeyState::Usable => self.key_der.as_deref(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CertStore {
    pub location: PathBuf,
    /// Candidates for the filter chain, in file-name order.
    pub entries: Vec<StoreEntry>,
    /// Extra CA certificates found in bundles: used to build chains only.
    pub chain_certs: Vec<Certificate>,
    /// Files skipped because their extension is not a certificate or key extension.
    pub ignored: Vec<PathBuf>,
    /// Things worth knowing that are not errors (a stray key, a duplicate certificate).
    pub notes: Vec<String>,
}

const CERT_EXTENSIONS: [&str; 6] = ["crt", "cer", "pem", "der", "pfx", "p12"];

impl CertStore {
    /// Loads a store from a directory (or from a single certificate file). Any certificate or
    /// key file that cannot be read is an error naming it; nothing is skipped silently.
    pub fn load(location: &Path, password: &Pkcs12Password) -> Result<CertStore> {
        let meta = std::fs::metadata(location).map_err(|e| PkiError::io(location, e))?;
        let files = if meta.is_dir() {
            load::sorted_files(location)?
        } else {
            vec![location.to_path_buf()]
        };
        let mut store = CertStore {
            location: location.to_path_buf(),
            ..CertStore::default()
        };

        // Keys in a key-only file (name.key, or a .pem with keys only) belong to the
        // certificate file(s) named name.*.
        let mut key_files: BTreeMap<String, (PathBuf, Vec<PrivateKeyDer<'static>>)> =
            BTreeMap::new();
        let mut cert_files = Vec::new();
        for file in files {
            match extension(&file).as_deref() {
                Some(ext) if ext == "key" || CERT_EXTENSIONS.contains(&ext) => {
                    let items = load::read_file(&file, password)?;
                    if items.certs.is_empty() {
                        key_files.insert(stem(&file), (file, items.keys));
                    } else {
                        cert_files.push((file, items));
                    }
                }
                _ => store.ignored.push(file),
            }
        }

        for (file, items) in cert_files {
            let sibling = key_files.remove(&stem(&file));
            store.add_file(&file, items, sibling);
        }
        let stray: Vec<String> = key_files
            .into_values()
            .map(|(path, _)| path.display().to_string())
            .collect();
        for path in &stray {
            store.notes.push(format!(
                "{path}: a private key with no certificate file of the same name beside it; ignored"
            ));
        }
        if store.entries.is_empty() {
            let detail = if stray.is_empty() {
                String::new()
            } else {
                format!("; only private keys were found, in {}", stray.join(", "))
            };
            return Err(PkiError::EmptyStore {
                path: location.to_path_buf(),
                detail,
            });
        }
        Ok(store)
    }

    fn add_file(
        &mut self,
        file: &Path,
        items: FileItems,
        sibling: Option<(PathBuf, Vec<PrivateKeyDer<'static>>)>,
    ) {
        let mut keys: Vec<FoundKey> = items
            .keys
            .into_iter()
            .map(|der| FoundKey::new(der, None))
            .collect();
        if let Some((path, sibling_keys)) = sibling {
            keys.extend(
                sibling_keys
                    .into_iter()
                    .map(|der| FoundKey::new(der, Some(path.clone()))),
            );
        }
        let mut key_used = vec![false; keys.len()];

        for (i, cert) in items.certs.into_iter().enumerate() {
            let matching = keys
                .iter()
                .position(|k| k.spki.as_ref().is_ok_and(|s| s.as_slice() == cert.spki()));
            let (key, key_der, key_source) = match matching {
                Some(k) => {
                    key_used[k] = true;
                    (
                        KeyState::Usable,
                        Some(Arc::new(keys[k].der.clone_key())),
                        keys[k].source.clone(),
                    )
                }
                None if i == 0 => match keys.first().map(|k| (&k.source, &k.spki)) {
                    // The file's own certificate with a key that is not its key: say so.
                    Some((source, Ok(_))) => {
                        key_used[0] = true;
                        (
                            KeyState::Unusable(
                                "the private key beside it does not match the certificate's public key".into(),
                            ),
                            None,
                            source.clone(),
                        )
                    }
                    Some((source, Err(why))) => {
                        key_used[0] = true;
                        (
                            KeyState::Unusable(format!("the private key cannot be used: {why}")),
                            None,
                            source.clone(),
                        )
                    }
                    None => (KeyState::Absent, None, None),
                },
                None if cert.is_ca => {
                    self.add_chain_cert(cert);
                    continue;
                }
                None => (KeyState::Absent, None, None),
            };
            self.add_entry(StoreEntry {
                cert,
                key,
                source: file.to_path_buf(),
                key_source,
                key_der,
            });
        }
        for (key, used) in keys.iter().zip(key_used) {
            if !used {
                let from = key.source.as_deref().unwrap_or(file);
                self.notes.push(format!(
                    "{}: holds a private key that matches no certificate in {}; ignored",
                    from.display(),
                    file.display()
                ));
            }
        }
    }

    fn add_entry(&mut self, entry: StoreEntry) {
        if let Some(existing) = self
            .entries
            .iter_mut()
            .find(|e| e.cert.thumbprint == entry.cert.thumbprint)
        {
            self.notes.push(format!(
                "{} and {} hold the same certificate {}; counted once",
                existing.source.display(),
                entry.source.display(),
                entry.cert.label()
            ));
            // Keep the copy whose key can be used.
            if existing.key != KeyState::Usable && entry.key == KeyState::Usable {
                *existing = entry;
            }
            return;
        }
        self.entries.push(entry);
    }

    fn add_chain_cert(&mut self, cert: Certificate) {
        if !self.chain_certs.contains(&cert) {
            self.chain_certs.push(cert);
        }
    }
}

/// A private key found for a certificate file, where it came from (when not that file), and
/// its public half, or why rustls cannot use it.
struct FoundKey {
    der: PrivateKeyDer<'static>,
    source: Option<PathBuf>,
    spki: std::result::Result<Vec<u8>, String>,
}

impl FoundKey {
    fn new(der: PrivateKeyDer<'static>, source: Option<PathBuf>) -> FoundKey {
        let spki = key_spki(&der);
        FoundKey { der, source, spki }
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
