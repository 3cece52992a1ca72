//! Helpers shared by the pki integration tests: certificates made on the spot, written to a
//! temporary store directory, judged by the real filter chain.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use pki::lab::{Issued, LabCa, LeafSpec};
use pki::{select_client_cert, CertStore, Pkcs12Password, RootSet, Selection};
use time::OffsetDateTime;

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

pub fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write test file");
    path
}

/// Writes `name.crt` and, when `with_key`, `name.key`.
pub fn put(dir: &Path, name: &str, issued: &Issued, with_key: bool) {
    write(dir, &format!("{name}.crt"), &issued.cert_pem);
    if with_key {
        write(dir, &format!("{name}.key"), &issued.key_pem);
    }
}

pub fn root(name: &str) -> LabCa {
    LabCa::new_root(name, 5).expect("root CA")
}

pub fn roots(cas: &[&LabCa]) -> RootSet {
    RootSet::from_certs(
        cas.iter()
            .map(|ca| pki::Certificate::from_der(&ca.cert().cert_der).expect("CA parses"))
            .collect(),
    )
}

pub fn load(dir: &Path) -> CertStore {
    CertStore::load(dir, &Pkcs12Password::empty()).expect("store loads")
}

pub fn judge(dir: &Path, allowed: &[&LabCa]) -> (CertStore, Selection) {
    let store = load(dir);
    let selection = select_client_cert(&store, &roots(allowed), OffsetDateTime::now_utc());
    (store, selection)
}

pub fn lines(selection: &Selection) -> Vec<String> {
    selection.trail.iter().map(|l| l.to_string()).collect()
}

pub fn client(name: &str) -> LeafSpec {
    LeafSpec::client_auth(name, 365)
}
