//! A store made by the `openssl` command line, not by our code, read and judged.
//! Needs `openssl` on PATH (`.ci/run` installs it); fails, rather than skips, without it.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use pki::{
    select_client_cert, CertStore, Fate, KeyState, Pkcs12Password, PkiError, Rejection, RootSet,
};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command line must be installed (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issues `name.crt` from the CA in `ca/`, with the key already in `name.key`.
fn sign(work: &Path, name: &str, days: &str, extensions: &str) {
    std::fs::write(work.join(format!("{name}.ext")), extensions).unwrap();
    openssl(
        work,
        &[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/O=Contoso/CN={name}"),
        ],
    );
    openssl(
        work,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            days,
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

/// A P-256 key in SEC1 form ("EC PRIVATE KEY"), as `openssl ecparam` writes it.
fn ec_key(work: &Path, name: &str) {
    let file = format!("{name}.key");
    openssl(
        work,
        &[
            "ecparam",
            "-genkey",
            "-name",
            "prime256v1",
            "-noout",
            "-out",
            &file,
        ],
    );
}

const CLIENT_EXT: &str = "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\nsubjectAltName=DNS:host1.contoso.com\n";

struct OpensslLab {
    _tmp: tempfile::TempDir,
    store: std::path::PathBuf,
    ca: std::path::PathBuf,
}

fn make_lab() -> OpensslLab {
    let tmp = tempdir();
    let work = tmp.path().join("work");
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&store).unwrap();
    openssl(
        &work,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "90",
            "-subj",
            "/O=Contoso/CN=OpenSSL Root CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    // Serials start with the top bit set, so DER adds a sign byte that openssl's -serial output
    // leaves out: the serial comparison below covers that case every run, not by chance.
    std::fs::write(
        work.join("ca.srl"),
        "8A5F000000000000000000000000000000000001\n",
    )
    .unwrap();
    // RSA client certificate with a PKCS#8 key.
    openssl(
        &work,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa-client.key",
        ],
    );
    sign(&work, "rsa-client", "30", CLIENT_EXT);
    // Server-only certificate with a SEC1 ("EC PRIVATE KEY") key.
    ec_key(&work, "server");
    sign(
        &work,
        "server",
        "30",
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    );
    // A 1024-bit RSA key in PKCS#1 form: too weak for rustls to sign with.
    openssl(
        &work,
        &["genrsa", "-traditional", "-out", "weak.key", "1024"],
    );
    sign(&work, "weak", "30", CLIENT_EXT);
    // A longer-lived client certificate shipped as a password-protected PKCS#12 with its chain.
    ec_key(&work, "pfx-client");
    sign(&work, "pfx-client", "60", CLIENT_EXT);
    openssl(
        &work,
        &[
            "pkcs12",
            "-export",
            "-inkey",
            "pfx-client.key",
            "-in",
            "pfx-client.crt",
            "-certfile",
            "ca.crt",
            "-out",
            "pfx-client.pfx",
            "-passout",
            "pass:s3cret",
        ],
    );
    // The same kind of bundle with the older 3DES encryption Windows still exports.
    ec_key(&work, "legacy");
    sign(&work, "legacy", "20", CLIENT_EXT);
    openssl(
        &work,
        &[
            "pkcs12",
            "-export",
            "-inkey",
            "legacy.key",
            "-in",
            "legacy.crt",
            "-out",
            "legacy.p12",
            "-keypbe",
            "PBE-SHA1-3DES",
            "-certpbe",
            "PBE-SHA1-3DES",
            "-macalg",
            "sha1",
            "-passout",
            "pass:s3cret",
        ],
    );
    // A certificate with no key at all, in DER.
    openssl(
        &work,
        &[
            "x509",
            "-in",
            "rsa-client.crt",
            "-outform",
            "DER",
            "-out",
            "keyless.cer",
        ],
    );

    for file in [
        "rsa-client.crt",
        "rsa-client.key",
        "server.crt",
        "server.key",
        "weak.crt",
        "weak.key",
        "pfx-client.pfx",
        "legacy.p12",
    ] {
        std::fs::copy(work.join(file), store.join(file)).unwrap();
    }
    OpensslLab {
        store,
        ca: work.join("ca.crt"),
        _tmp: tmp,
    }
}

fn fate_of<'a>(store: &CertStore, sel: &'a pki::Selection, cn: &str) -> &'a Fate {
    &sel.judged
        .iter()
        .find(|j| {
            store.entries[j.entry]
                .cert
                .subject
                .starts_with(&format!("CN={cn},"))
        })
        .unwrap_or_else(|| panic!("{cn} not in the store"))
        .fate
}

#[test]
fn an_openssl_made_store_is_read_and_judged() {
    let lab = make_lab();
    let store = CertStore::load(&lab.store, &Pkcs12Password::new("s3cret", "the test"))
        .expect("store loads");
    let allowed = RootSet::load(std::slice::from_ref(&lab.ca)).unwrap();
    assert_eq!(
        store.entries.len(),
        5,
        "{:#?}",
        store
            .entries
            .iter()
            .map(|e| &e.cert.subject)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        store.chain_certs.len(),
        1,
        "the CA bundled in the .pfx is a chain certificate"
    );

    let sel = select_client_cert(&store, &allowed, time::OffsetDateTime::now_utc());
    assert!(matches!(
        fate_of(&store, &sel, "server"),
        Fate::Rejected {
            rejection: Rejection::NotClientAuth { .. }
        }
    ));
    match fate_of(&store, &sel, "weak") {
        Fate::Rejected {
            rejection: Rejection::KeyUnusable { why },
        } => {
            assert!(why.contains("cannot be used"), "{why}")
        }
        other => panic!("weak: {other:?}"),
    }
    assert!(matches!(fate_of(&store, &sel, "rsa-client"), Fate::Passed));
    assert!(matches!(fate_of(&store, &sel, "legacy"), Fate::Passed));
    // The PKCS#12 one lives longest, so it is chosen.
    assert!(matches!(
        fate_of(&store, &sel, "pfx-client"),
        Fate::Selected
    ));
    let chosen = &store.entries[sel.selected.unwrap()];
    assert_eq!(chosen.key, KeyState::Usable);
    assert!(chosen.source.ends_with("pfx-client.pfx"));

    // Thumbprint and serial agree with openssl's own view of the certificate.
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha1", "-serial", "-in"])
        .arg(lab.ca.with_file_name("pfx-client.crt"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains(&format!("serial={}", chosen.cert.serial)),
        "{text} vs {}",
        chosen.cert.serial
    );
    let fingerprint = text
        .lines()
        .find_map(|l| l.split('=').nth(1).filter(|_| l.contains("Fingerprint")))
        .unwrap();
    assert_eq!(fingerprint.replace(':', ""), chosen.cert.thumbprint);
    assert_eq!(chosen.cert.sans, vec!["DNS:host1.contoso.com".to_string()]);
}

#[test]
fn a_keyless_der_certificate_is_judged_without_a_key() {
    let lab = make_lab();
    let keyless_store = lab.store.with_file_name("keyless");
    std::fs::create_dir_all(&keyless_store).unwrap();
    std::fs::copy(
        lab.ca.with_file_name("keyless.cer"),
        keyless_store.join("keyless.cer"),
    )
    .unwrap();
    let store = CertStore::load(&keyless_store, &Pkcs12Password::empty()).unwrap();
    let allowed = RootSet::load(std::slice::from_ref(&lab.ca)).unwrap();
    let sel = select_client_cert(&store, &allowed, time::OffsetDateTime::now_utc());
    assert_eq!(store.entries[0].key, KeyState::Absent);
    assert!(matches!(
        &sel.judged[0].fate,
        Fate::Rejected {
            rejection: Rejection::NoPrivateKey
        }
    ));
}

#[test]
fn a_wrong_pkcs12_password_names_the_file_and_where_the_password_came_from() {
    let lab = make_lab();
    let err = CertStore::load(
        &lab.store,
        &Pkcs12Password::new("wrong", "environment variable PFX_PW"),
    )
    .unwrap_err();
    assert!(matches!(err, PkiError::Pkcs12WrongPassword { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(
            "legacy.p12: wrong PKCS#12 password (it was taken from environment variable PFX_PW)"
        ),
        "{text}"
    );
}
