//! Names that decide anything are read from the certificate's parsed attributes, never from
//! its printed subject (issue 14, item 7): an O of `Contoso, CN=X` prints like a CN of X.

mod common;

use common::*;
use pki::lab::DnType;

/// The chosen certificate's real CN is shared with another machine's certificate, but its O
/// spells another CN first in print: the shared name is still found.
#[test]
fn the_shared_name_check_reads_the_cn_attribute_not_the_printed_subject() {
    let dir = tempdir();
    let ca = root("Root");
    // Later expiry: the one chosen.
    let mut mine = client("HOST-1");
    mine.not_after += time::Duration::days(30);
    let crafted = ca
        .issue_with_subject(
            &mine,
            &[
                (DnType::CommonName, "HOST-1"),
                (DnType::OrganizationName, "Contoso, CN=Decoy"),
            ],
        )
        .unwrap();
    put(dir.path(), "a", &crafted, true);
    put(dir.path(), "b", &ca.issue(&client("HOST-1")).unwrap(), true);
    let (store, sel) = judge(dir.path(), &[&ca]);
    let chosen = &store.entries[sel.selected.unwrap()].cert;
    assert_eq!(chosen.subject, "O=Contoso, CN=Decoy, CN=HOST-1");
    assert_eq!(chosen.common_name(), Some("HOST-1"));
    let text = lines(&sel);
    assert!(
        text.iter()
            .any(|l| l.contains("shares the name \"CN=HOST-1\"")),
        "{text:#?}"
    );
}

/// Another certificate whose O prints as `CN=HOST-2` does not share the chosen one's name.
#[test]
fn an_organization_that_prints_like_a_cn_shares_no_name() {
    let dir = tempdir();
    let ca = root("Root");
    let mut mine = client("HOST-2");
    mine.not_after += time::Duration::days(30);
    put(dir.path(), "a", &ca.issue(&mine).unwrap(), true);
    let other = ca
        .issue_with_subject(
            &client("OTHER"),
            &[
                (DnType::CommonName, "OTHER"),
                (DnType::OrganizationName, "x, CN=HOST-2"),
            ],
        )
        .unwrap();
    put(dir.path(), "b", &other, true);
    let (_, sel) = judge(dir.path(), &[&ca]);
    let text = lines(&sel);
    assert!(
        !text.iter().any(|l| l.contains("shares the name")),
        "{text:#?}"
    );
}

/// A subject with two CN attributes has no one common name: a name check cannot pass on
/// either (the allow-list then matches by thumbprint only).
#[test]
fn two_common_names_make_no_common_name() {
    let ca = root("Root");
    let issued = ca
        .issue_with_subject(
            &client("A"),
            &[
                (DnType::CommonName, "Evil"),
                // The CN OID again, as a type of its own: rcgen keeps one value per type.
                (
                    DnType::CustomDnType(vec![2, 5, 4, 3]),
                    "Portcullis Connector Channel",
                ),
            ],
        )
        .unwrap();
    let cert = pki::Certificate::from_der(&issued.cert_der).unwrap();
    assert_eq!(cert.common_name(), None, "{}", cert.subject);
    let names = cert.machine_names();
    assert!(
        names.contains(&"CN=Evil".to_string())
            && names.contains(&"CN=Portcullis Connector Channel".to_string()),
        "{names:?}"
    );
    let single = pki::Certificate::from_der(&ca.issue(&client("Solo")).unwrap().cert_der).unwrap();
    assert_eq!(single.common_name(), Some("Solo"));
}
