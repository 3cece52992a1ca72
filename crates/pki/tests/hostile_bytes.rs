//! Whatever bytes a store file holds, loading returns a store or an error naming the file:
//! never a panic. Random bytes, and valid PEM, DER and PKCS#12 with bytes flipped or cut.

mod common;

use common::*;
use pki::{CertStore, Pkcs12Password};
use proptest::prelude::*;

fn check(name: &str, bytes: &[u8]) {
    let dir = tempdir();
    write(dir.path(), name, bytes);
    match CertStore::load(dir.path(), &Pkcs12Password::new("pw", "the test")) {
        Ok(store) => assert!(!store.entries.is_empty()),
        Err(e) => assert!(
            e.to_string().contains(name),
            "error does not name {name}: {e}"
        ),
    }
}

fn valid_files() -> Vec<(&'static str, Vec<u8>)> {
    let ca = root("Fuzz Root");
    let issued = ca.issue(&client("fuzz")).unwrap();
    let pem = format!("{}{}", issued.cert_pem, issued.key_pem).into_bytes();
    let der = issued.cert_der.clone();
    // A PKCS#12 made by openssl when it is there; the PEM and DER cases run regardless.
    let mut files = vec![("both.pem", pem), ("cert.cer", der)];
    let tmp = tempdir();
    std::fs::write(tmp.path().join("c.pem"), &issued.cert_pem).unwrap();
    std::fs::write(tmp.path().join("k.pem"), &issued.key_pem).unwrap();
    let made = std::process::Command::new("openssl")
        .args([
            "pkcs12", "-export", "-in", "c.pem", "-inkey", "k.pem", "-out", "x.pfx", "-passout",
            "pass:pw",
        ])
        .current_dir(tmp.path())
        .status()
        .is_ok_and(|s| s.success());
    if made {
        files.push((
            "bundle.pfx",
            std::fs::read(tmp.path().join("x.pfx")).unwrap(),
        ));
    }
    files
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), ext in 0usize..5) {
        let name = ["x.crt", "x.pem", "x.key", "x.pfx", "x.der"][ext];
        check(name, &bytes);
    }

    #[test]
    fn damaged_valid_files_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        for (name, mut bytes) in valid_files() {
            for (at, value) in &flips {
                let i = at % bytes.len();
                bytes[i] ^= value | 1;
            }
            check(name, &bytes);
            let keep = cut % bytes.len();
            check(name, &bytes[..keep]);
        }
    }
}
