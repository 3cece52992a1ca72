//! Hostile and broken input: each gives an error that names the file and the problem, never a
//! panic.

mod common;

use common::*;
use pki::{CertStore, Pkcs12Password, PkiError, RootSet};

fn load_err(dir: &std::path::Path) -> String {
    match CertStore::load(dir, &Pkcs12Password::empty()) {
        Ok(store) => panic!("expected an error, loaded {} entries", store.entries.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_missing_path_is_named() {
    let dir = tempdir();
    let missing = dir.path().join("nope");
    let err = CertStore::load(&missing, &Pkcs12Password::empty()).unwrap_err();
    assert!(matches!(err, PkiError::NotFound { .. }));
    assert_eq!(
        err.to_string(),
        format!("{}: no such file or directory", missing.display())
    );
    let err = RootSet::load(std::slice::from_ref(&missing)).unwrap_err();
    assert!(err.to_string().contains("nope: no such file or directory"));
}

#[test]
fn an_empty_directory_is_an_empty_store() {
    let dir = tempdir();
    write(dir.path(), "README.txt", "not a certificate");
    let err = load_err(dir.path());
    assert!(err.contains("the directory holds no certificates"), "{err}");
    assert!(err.starts_with(&dir.path().display().to_string()));
}

#[test]
fn garbage_with_a_certificate_extension_is_named() {
    let dir = tempdir();
    write(dir.path(), "junk.crt", [0xde, 0xad, 0xbe, 0xef, 0x00, 0x01]);
    let err = load_err(dir.path());
    assert!(
        err.contains("junk.crt") && err.contains("neither a PEM block nor a DER certificate"),
        "{err}"
    );

    let dir = tempdir();
    write(dir.path(), "text.pem", "hello, I am not PEM at all\n");
    let err = load_err(dir.path());
    assert!(err.contains("text.pem"), "{err}");

    // DER-looking bytes that are not a certificate.
    let dir = tempdir();
    write(dir.path(), "fake.der", [0x30, 0x03, 0x02, 0x01, 0x01]);
    let err = load_err(dir.path());
    assert!(
        err.contains("fake.der: certificate #1 cannot be parsed"),
        "{err}"
    );

    // A PEM block whose base64 is fine but whose contents are not a certificate.
    let dir = tempdir();
    write(
        dir.path(),
        "bad.crt",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let err = load_err(dir.path());
    assert!(
        err.contains("bad.crt: certificate #1 cannot be parsed"),
        "{err}"
    );
}

#[test]
fn truncated_pem_is_named() {
    let dir = tempdir();
    let ca = root("Root");
    let issued = ca.issue(&client("cut")).unwrap();
    let half = &issued.cert_pem[..issued.cert_pem.len() / 2];
    write(dir.path(), "cut.crt", half);
    let err = load_err(dir.path());
    assert!(err.contains("cut.crt: bad PEM: truncated"), "{err}");
    assert!(err.contains("-----END CERTIFICATE-----"), "{err}");

    let dir = tempdir();
    write(dir.path(), "c.crt", &issued.cert_pem);
    write(
        dir.path(),
        "c.key",
        &issued.key_pem[..issued.key_pem.len() - 30],
    );
    let err = load_err(dir.path());
    assert!(err.contains("c.key: bad PEM"), "{err}");

    // A damaged BEGIN line would otherwise make the block vanish without a word.
    let dir = tempdir();
    write(
        dir.path(),
        "d.pem",
        format!(
            "{}{}",
            issued
                .cert_pem
                .replace("BEGIN CERTIFICATE", "BEGIN CERTIFIXATE"),
            issued.key_pem
        ),
    );
    let err = load_err(dir.path());
    assert!(
        err.contains("d.pem: bad PEM: unknown block \"-----BEGIN CERTIFIXATE-----\""),
        "{err}"
    );

    // Corrupt base64 in the middle of a block.
    let dir = tempdir();
    let corrupt = issued.cert_pem.replacen('M', "!", 3);
    write(dir.path(), "corrupt.crt", corrupt);
    let err = load_err(dir.path());
    assert!(err.contains("corrupt.crt: bad PEM"), "{err}");
}

#[test]
fn an_encrypted_pem_key_says_how_to_fix_it() {
    let dir = tempdir();
    let ca = root("Root");
    let issued = ca.issue(&client("enc")).unwrap();
    write(dir.path(), "enc.crt", &issued.cert_pem);
    write(
        dir.path(),
        "enc.key",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
    );
    let err = load_err(dir.path());
    assert!(
        err.contains("enc.key: holds an encrypted private key"),
        "{err}"
    );
}

#[test]
fn a_garbage_pfx_is_named() {
    let dir = tempdir();
    write(dir.path(), "junk.pfx", b"definitely not PKCS#12");
    let err = load_err(dir.path());
    assert!(
        err.contains("junk.pfx: cannot read PKCS#12: not a PKCS#12 file"),
        "{err}"
    );
}

#[test]
fn an_oversized_file_is_refused_without_reading_it_whole() {
    let dir = tempdir();
    let file = std::fs::File::create(dir.path().join("huge.crt")).unwrap();
    file.set_len(pki::MAX_FILE_BYTES + 1).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("huge.crt: is ") && err.contains("limit"),
        "{err}"
    );
}

#[test]
fn allowed_roots_without_a_certificate_are_an_error() {
    let dir = tempdir();
    let empty = dir.path().join("roots");
    std::fs::create_dir(&empty).unwrap();
    let err = RootSet::load(&[empty]).unwrap_err().to_string();
    assert!(err.ends_with("roots: holds no certificates"), "{err}");
    let key_only = write(dir.path(), "only.pem", root("R").cert().key_pem.clone());
    let err = RootSet::load(&[key_only]).unwrap_err().to_string();
    assert!(err.ends_with("only.pem: holds no certificates"), "{err}");
}

#[test]
fn stray_keys_and_other_files_are_reported_not_lost() {
    let dir = tempdir();
    let ca = root("Root");
    let issued = ca.issue(&client("ok")).unwrap();
    put(dir.path(), "ok", &issued, true);
    write(
        dir.path(),
        "orphan.key",
        ca.issue(&client("x")).unwrap().key_pem,
    );
    write(dir.path(), "notes.txt", "hi");
    let store = load(dir.path());
    assert_eq!(store.entries.len(), 1);
    assert!(
        store.notes.iter().any(|n| n.contains("orphan.key")),
        "{:?}",
        store.notes
    );
    assert!(store.ignored.iter().any(|p| p.ends_with("notes.txt")));
}

#[cfg(unix)]
#[test]
fn a_fifo_is_refused_instead_of_blocking() {
    let dir = tempdir();
    let fifo = dir.path().join("pipe.crt");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let err = CertStore::load(&fifo, &Pkcs12Password::empty())
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("pipe.crt: is not a regular file or directory"),
        "{err}"
    );
    let err = RootSet::load(&[fifo]).unwrap_err().to_string();
    assert!(
        err.ends_with("pipe.crt: is not a regular file or directory"),
        "{err}"
    );
}
