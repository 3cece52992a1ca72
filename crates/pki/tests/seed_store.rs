//! The seed case: a store that reproduces the original connector's log,
//!
//! ```text
//! Filtered cert count with digital signature: 7
//! Not allowed cert: <certificate>
//! No private key cert: <certificate>
//! Filtered cert count with allowed root CA: 3
//! Filtered cert count with private key: 3
//! Not client auth cert: <certificate>
//! Filtered cert count with client auth: 0
//! ```
//!
//! 7 certificates with digital signature, 4 of them not allowed or without a private key, the
//! other 3 without client authentication.

mod common;

use common::*;
use pki::lab::{ExtendedKeyUsagePurpose, KeyUsagePurpose};

#[test]
fn the_seed_store_gives_the_seed_trail() {
    let dir = tempdir();
    let allowed = root("Contoso Root CA");
    let other = root("Fabrikam Root CA");

    let mut server_only = client("mp-server");
    server_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let mut no_eku = client("no-eku");
    no_eku.extended_key_usages.clear();
    let mut code_signing = client("code-signing");
    code_signing.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    // An eighth certificate without digital signature is dropped before the first count.
    let mut encipher_only = client("encipher-only");
    encipher_only.key_usages = vec![KeyUsagePurpose::KeyEncipherment];

    // File names fix the store order; the rejection lines group by kind whatever the order.
    put(
        dir.path(),
        "1-no-key-a",
        &allowed.issue(&client("no-key-a")).unwrap(),
        false,
    );
    put(
        dir.path(),
        "2-foreign-a",
        &other.issue(&client("foreign-a")).unwrap(),
        true,
    );
    put(
        dir.path(),
        "3-mp-server",
        &allowed.issue(&server_only).unwrap(),
        true,
    );
    put(
        dir.path(),
        "4-no-eku",
        &allowed.issue(&no_eku).unwrap(),
        true,
    );
    put(
        dir.path(),
        "5-no-key-b",
        &allowed.issue(&client("no-key-b")).unwrap(),
        false,
    );
    put(
        dir.path(),
        "6-code-signing",
        &allowed.issue(&code_signing).unwrap(),
        true,
    );
    put(
        dir.path(),
        "7-foreign-b",
        &other.issue(&client("foreign-b")).unwrap(),
        true,
    );
    put(
        dir.path(),
        "8-encipher-only",
        &allowed.issue(&encipher_only).unwrap(),
        true,
    );

    let (_, selection) = judge(dir.path(), &[&allowed]);
    let text = lines(&selection);
    let expected: [(&str, Option<&str>); 14] = [
        (
            "No digital signature cert: CN=encipher-only, O=Portcullis Lab (thumbprint ",
            None,
        ),
        ("Filtered cert count with digital signature: 7", None),
        (
            "Not allowed cert: CN=foreign-a, O=Portcullis Lab (thumbprint ",
            Some("Fabrikam Root CA"),
        ),
        (
            "Not allowed cert: CN=foreign-b, O=Portcullis Lab (thumbprint ",
            Some("Fabrikam Root CA"),
        ),
        (
            "No private key cert: CN=no-key-a, O=Portcullis Lab (thumbprint ",
            Some("has no private key"),
        ),
        (
            "No private key cert: CN=no-key-b, O=Portcullis Lab (thumbprint ",
            Some("has no private key"),
        ),
        ("Filtered cert count with allowed root CA: 3", None),
        ("Filtered cert count with private key: 3", None),
        (
            "Not client auth cert: CN=mp-server, O=Portcullis Lab (thumbprint ",
            Some("Server Authentication"),
        ),
        (
            "Not client auth cert: CN=no-eku, O=Portcullis Lab (thumbprint ",
            Some("no enhanced key usage"),
        ),
        (
            "Not client auth cert: CN=code-signing, O=Portcullis Lab (thumbprint ",
            Some("Code Signing"),
        ),
        ("Filtered cert count with client auth: 0", None),
        ("Filtered cert count with time validity: 0", None),
        (
            "No client authentication cert selected: ",
            Some("403 CMGConnector_Clientcertificaterequired"),
        ),
    ];
    assert_eq!(text.len(), expected.len(), "trail: {text:#?}");
    for (line, (start, inner)) in text.iter().zip(expected) {
        assert!(
            line.starts_with(start),
            "{line:?} should start with {start:?}"
        );
        if let Some(inner) = inner {
            assert!(line.contains(inner), "{line:?} should contain {inner:?}");
        }
    }
    // The count lines are exactly the seed's, in the seed's order.
    let counts: Vec<&String> = text
        .iter()
        .filter(|l| l.starts_with("Filtered cert count"))
        .collect();
    assert_eq!(
        counts[..4],
        [
            "Filtered cert count with digital signature: 7",
            "Filtered cert count with allowed root CA: 3",
            "Filtered cert count with private key: 3",
            "Filtered cert count with client auth: 0",
        ]
    );
    assert_eq!(selection.selected, None);
}
