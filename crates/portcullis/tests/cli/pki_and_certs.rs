//! `portcullis pki init` and `portcullis doctor certs`: the lab PKI checked with openssl for
//! each purpose, and the certificate filter chain's verdict on a store, with bad input named.

use crate::common::{p, portcullis, portcullis_in, text};
use crate::support::*;

#[test]
fn pki_init_then_doctor_certs_selects_the_client_auth_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = tmp.path().join("lab");
    let out = portcullis(&["pki", "init", "--out", p(&lab), "--devices", "3"]);
    assert!(out.status.success(), "{}", text(&out));
    for file in [
        "README.md",
        "ca/root.crt",
        "gateway/server.key",
        "connector/channel.crt",
        "devices/device-003.key",
    ] {
        assert!(lab.join(file).is_file(), "{file} missing");
    }
    let readme = std::fs::read_to_string(lab.join("README.md")).unwrap();
    assert!(
        readme.contains("`connector/store/client-auth.crt`")
            && readme.contains("`devices/device-003.crt`")
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(lab.join("ca/root.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "keys are owner-only");
    }

    let store = lab.join("connector/store");
    let root = lab.join("ca/root.crt");
    let out = portcullis(&[
        "doctor",
        "certs",
        "--store",
        p(&store),
        "--allowed-roots",
        p(&root),
    ]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(
        shown.contains("  Filtered cert count with client auth: 1\n"),
        "{shown}"
    );
    assert!(
        shown.contains("Selected: #1 CN=Portcullis Connector, O=Portcullis Lab (thumbprint "),
        "{shown}"
    );

    let out = portcullis(&[
        "doctor",
        "certs",
        "--store",
        p(&store),
        "--allowed-roots",
        p(&root),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(
        json["selected"]["subject"],
        "CN=Portcullis Connector, O=Portcullis Lab"
    );
    assert_eq!(json["certificates"][0]["fate"], "selected");
    assert_eq!(
        json["trail"][0],
        "Filtered cert count with digital signature: 1"
    );

    // Far in the future the certificate has expired: nothing is selected.
    let out = portcullis(&[
        "doctor",
        "certs",
        "--store",
        p(&store),
        "--allowed-roots",
        p(&root),
        "--at",
        "2099-01-01T00:00:00Z",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("Not time valid cert: CN=Portcullis Connector"));
}

#[test]
fn lab_certificates_verify_with_openssl_for_their_purpose() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = tmp.path();
    let out = portcullis(&[
        "pki",
        "init",
        "--out",
        p(lab),
        "--hosts",
        "cmg.contoso.test,10.1.2.3",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let root = lab.join("ca/root.crt");
    for (cert, purpose) in [
        ("gateway/server.crt", "sslserver"),
        ("mp/server.crt", "sslserver"),
        ("connector/channel.crt", "sslclient"),
        ("connector/store/client-auth.crt", "sslclient"),
        ("devices/device-001.crt", "sslclient"),
    ] {
        let out = openssl(&[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            p(&root),
            p(&lab.join(cert)),
        ]);
        assert!(out.status.success(), "{cert} for {purpose}: {}", text(&out));
    }
    let out = openssl(&[
        "x509",
        "-noout",
        "-ext",
        "subjectAltName",
        "-in",
        p(&lab.join("gateway/server.crt")),
    ]);
    let sans = text(&out);
    assert!(
        sans.contains("DNS:cmg.contoso.test") && sans.contains("IP Address:10.1.2.3"),
        "{sans}"
    );
    // The gateway certificate must not be usable as a device certificate.
    let out = openssl(&[
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        p(&root),
        p(&lab.join("gateway/server.crt")),
    ]);
    assert!(!out.status.success());
}

#[test]
fn pki_init_refuses_to_overwrite_and_bad_hosts() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let before = std::fs::read(lab.join("ca/root.crt")).unwrap();
    let out = portcullis(&["pki", "init", "--out", p(&lab)]);
    expect_exit(&out, 2, "already holds a lab PKI");
    expect_exit(&out, 2, "pass --force to replace it");
    assert_eq!(
        std::fs::read(lab.join("ca/root.crt")).unwrap(),
        before,
        "nothing was replaced"
    );
    assert!(portcullis(&["pki", "init", "--out", p(&lab), "--force"])
        .status
        .success());
    assert_ne!(std::fs::read(lab.join("ca/root.crt")).unwrap(), before);

    let out = portcullis(&[
        "pki",
        "init",
        "--out",
        p(&tmp.path().join("x")),
        "--hosts",
        "good.host,bad host",
    ]);
    expect_exit(&out, 2, "\"bad host\" is not a DNS name or an IP address");
}

#[test]
fn doctor_certs_exits_1_and_explains_when_the_client_auth_certificate_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    // The seed's mistake: the store holds the channel certificate without its key, and a
    // server certificate, but no client authentication certificate with a key.
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::fs::copy(lab.join("connector/channel.crt"), store.join("channel.crt")).unwrap();
    std::fs::copy(lab.join("gateway/server.crt"), store.join("server.crt")).unwrap();
    std::fs::copy(lab.join("gateway/server.key"), store.join("server.key")).unwrap();
    let out = portcullis(&[
        "doctor",
        "certs",
        "--store",
        p(&store),
        "--allowed-roots",
        p(&lab.join("ca/root.crt")),
    ]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains("No private key cert: CN=Portcullis Connector Channel"),
        "{shown}"
    );
    assert!(
        shown.contains("Not client auth cert: CN=Portcullis Gateway"),
        "{shown}"
    );
    assert!(shown.contains("Filtered cert count with client auth: 0"));
    assert!(
        shown.contains("Import the certificate with its private key"),
        "the fix is printed: {shown}"
    );
    assert!(
        shown.contains("Selected: none")
            && shown.contains("CMGConnector_Clientcertificaterequired")
    );
}

#[test]
fn doctor_certs_bad_input_exits_2_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let out = portcullis(&[
        "doctor",
        "certs",
        "--store",
        p(&missing),
        "--allowed-roots",
        p(&missing),
    ]);
    expect_exit(&out, 2, "missing: no such file or directory");

    let out = portcullis(&["doctor", "certs", "--store", p(tmp.path())]);
    assert_eq!(out.status.code(), Some(2), "usage error: {}", text(&out));
    assert!(text(&out).contains("--allowed-roots"));

    let out = portcullis(&[
        "doctor",
        "certs",
        "--store",
        "x",
        "--allowed-roots",
        "y",
        "--at",
        "tomorrow",
    ]);
    expect_exit(&out, 2, "is not an RFC 3339 time");

    let lab = new_lab(tmp.path());
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = portcullis(&[
        "doctor",
        "certs",
        "--store",
        p(&empty),
        "--allowed-roots",
        p(&lab.join("ca/root.crt")),
    ]);
    expect_exit(&out, 2, "the directory holds no certificates");
}

#[test]
fn doctor_certs_reads_a_pfx_with_the_password_from_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let out = openssl(&[
        "pkcs12",
        "-export",
        "-inkey",
        p(&lab.join("connector/store/client-auth.key")),
        "-in",
        p(&lab.join("connector/store/client-auth.crt")),
        "-out",
        p(&store.join("connector.pfx")),
        "-passout",
        "pass:Pa55word",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let root = lab.join("ca/root.crt");
    let args = [
        "doctor",
        "certs",
        "--store",
        p(&store),
        "--allowed-roots",
        p(&root),
        "--pfx-password-env",
        "MY_PFX_PW",
    ];
    let out = portcullis_in(tmp.path(), &args, &[("MY_PFX_PW", "Pa55word")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = portcullis_in(tmp.path(), &args, &[("MY_PFX_PW", "nope")]);
    expect_exit(
        &out,
        2,
        "connector.pfx: wrong PKCS#12 password (it was taken from environment variable MY_PFX_PW)",
    );
}
