//! Every stage of the filter chain, and each reason it gives, on certificates made here.

mod common;

use common::*;
use pki::lab::{ExtendedKeyUsagePurpose, KeyUsagePurpose};
use pki::{Fate, KeyState, Rejection, Stage};
use time::Duration;

fn rejection_of(selection: &pki::Selection, store: &pki::CertStore, cn: &str) -> Rejection {
    let judged = selection
        .judged
        .iter()
        .find(|j| store.entries[j.entry].cert.subject.contains(cn))
        .unwrap_or_else(|| panic!("{cn} not judged"));
    match &judged.fate {
        Fate::Rejected { rejection } => rejection.clone(),
        other => panic!("{cn} was not rejected: {other:?}"),
    }
}

#[test]
fn a_good_client_certificate_is_selected() {
    let dir = tempdir();
    let ca = root("Good Root");
    put(
        dir.path(),
        "client",
        &ca.issue(&client("good-client")).unwrap(),
        true,
    );
    let (store, sel) = judge(dir.path(), &[&ca]);
    assert_eq!(sel.selected, Some(0));
    assert_eq!(store.entries[0].key, KeyState::Usable);
    assert!(store.entries[0].usable_key().is_some());
    for stage in Stage::ALL {
        assert_eq!(sel.surviving(stage), Some(1), "{stage:?}");
    }
    let text = lines(&sel);
    assert!(
        text.last().unwrap().starts_with(
            "Selected client authentication cert: CN=good-client, O=Portcullis Lab (thumbprint "
        ),
        "{text:?}"
    );
    assert!(text
        .last()
        .unwrap()
        .ends_with("the only certificate that passed every stage"));
}

#[test]
fn digital_signature_stage_rejects_missing_and_other_key_usage() {
    let dir = tempdir();
    let ca = root("Root");
    let mut no_ku = client("no-ku");
    no_ku.key_usages.clear();
    let mut ke_only = client("ke-only");
    ke_only.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    put(dir.path(), "a", &ca.issue(&no_ku).unwrap(), true);
    put(dir.path(), "b", &ca.issue(&ke_only).unwrap(), true);
    let (store, sel) = judge(dir.path(), &[&ca]);
    assert_eq!(rejection_of(&sel, &store, "no-ku"), Rejection::NoKeyUsage);
    assert_eq!(
        rejection_of(&sel, &store, "ke-only"),
        Rejection::NoDigitalSignature {
            key_usage: vec!["Key Encipherment".into()]
        }
    );
    let text = lines(&sel);
    assert!(
        text[0].starts_with("No digital signature cert: CN=no-ku, O=Portcullis Lab (thumbprint ")
    );
    assert!(text[0].ends_with("has no key usage extension, so digital signature is not allowed"));
    assert!(
        text[1].ends_with("key usage is Key Encipherment without Digital Signature"),
        "{}",
        text[1]
    );
    assert_eq!(text[2], "Filtered cert count with digital signature: 0");
    assert_eq!(sel.selected, None);
    assert!(text
        .last()
        .unwrap()
        .starts_with("No client authentication cert selected"));
}

#[test]
fn allowed_root_stage_names_the_foreign_root_and_the_missing_issuer() {
    let dir = tempdir();
    let allowed = root("Allowed Root");
    let other = root("Other Root");
    let hidden_parent = root("Hidden Root");
    let hidden_intermediate = hidden_parent
        .new_intermediate("Hidden Issuing CA", 3)
        .unwrap();
    put(
        dir.path(),
        "a-foreign",
        &other.issue(&client("foreign")).unwrap(),
        true,
    );
    // Its issuer is nowhere in the store and not an allowed root.
    put(
        dir.path(),
        "b-orphan",
        &hidden_intermediate.issue(&client("orphan")).unwrap(),
        true,
    );
    // The other root itself sits in the store too (as Windows stores often hold CA certs).
    put(dir.path(), "c-other-root", other.cert(), false);
    let (store, sel) = judge(dir.path(), &[&allowed]);
    assert_eq!(
        rejection_of(&sel, &store, "foreign"),
        Rejection::RootNotAllowed {
            root: "CN=Other Root, O=Portcullis Lab".into()
        }
    );
    assert_eq!(
        rejection_of(&sel, &store, "orphan"),
        Rejection::ChainIncomplete {
            missing_issuer: "CN=Hidden Issuing CA, O=Portcullis Lab".into()
        }
    );
    let text = lines(&sel);
    assert!(text
        .iter()
        .any(|l| l.starts_with("Not allowed cert: CN=foreign, O=Portcullis Lab")
            && l.ends_with("chains to root \"CN=Other Root, O=Portcullis Lab\", which is not an allowed root CA")));
    let orphan_chain = &sel.judged.iter().find(|j| j.entry == 1).unwrap().chain;
    assert!(
        orphan_chain.describe().contains("not found"),
        "{}",
        orphan_chain.describe()
    );
}

#[test]
fn an_intermediate_bundled_in_the_pem_completes_the_chain() {
    let dir = tempdir();
    let allowed = root("Allowed Root");
    let issuing = allowed.new_intermediate("Issuing CA", 3).unwrap();
    let leaf = issuing.issue(&client("via-intermediate")).unwrap();
    let bundle = format!(
        "{}{}{}",
        leaf.cert_pem,
        issuing.cert().cert_pem,
        leaf.key_pem
    );
    write(dir.path(), "bundle.pem", bundle);
    let (store, sel) = judge(dir.path(), &[&allowed]);
    assert_eq!(
        store.entries.len(),
        1,
        "the intermediate is a chain certificate, not a candidate"
    );
    assert_eq!(store.chain_certs.len(), 1);
    assert_eq!(sel.selected, Some(0));
    assert_eq!(sel.judged[0].chain.certs.len(), 3);
    assert!(sel.judged[0]
        .chain
        .describe()
        .ends_with("CN=Allowed Root, O=Portcullis Lab (root)"));
}

#[test]
fn keyless_certificates_drop_in_the_root_pass_and_bad_keys_in_the_key_stage() {
    let dir = tempdir();
    let ca = root("Root");
    let no_key = ca.issue(&client("no-key")).unwrap();
    let wrong_key_cert = ca.issue(&client("wrong-key")).unwrap();
    let someone_else = ca.issue(&client("someone-else")).unwrap();
    put(dir.path(), "a", &no_key, false);
    write(dir.path(), "b.crt", &wrong_key_cert.cert_pem);
    write(dir.path(), "b.key", &someone_else.key_pem);
    let (store, sel) = judge(dir.path(), &[&ca]);
    assert_eq!(
        rejection_of(&sel, &store, "no-key"),
        Rejection::NoPrivateKey
    );
    assert!(matches!(
        rejection_of(&sel, &store, "wrong-key"),
        Rejection::KeyUnusable { why } if why.contains("does not match")
    ));
    let text = lines(&sel);
    let expected_order = [
        "Filtered cert count with digital signature: 2",
        "No private key cert: CN=no-key, O=Portcullis Lab",
        "Filtered cert count with allowed root CA: 1",
        "No private key cert: CN=wrong-key, O=Portcullis Lab",
        "Filtered cert count with private key: 0",
    ];
    for (line, want) in text.iter().zip(expected_order) {
        assert!(
            line.starts_with(want),
            "{line:?} should start with {want:?}; trail {text:?}"
        );
    }
}

#[test]
fn client_auth_stage_rejects_missing_and_other_ekus() {
    let dir = tempdir();
    let ca = root("Root");
    let mut no_eku = client("no-eku");
    no_eku.extended_key_usages.clear();
    let mut server = client("server-only");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    put(dir.path(), "a", &ca.issue(&no_eku).unwrap(), true);
    put(dir.path(), "b", &ca.issue(&server).unwrap(), true);
    let (store, sel) = judge(dir.path(), &[&ca]);
    assert_eq!(
        rejection_of(&sel, &store, "no-eku"),
        Rejection::NoExtendedKeyUsage
    );
    assert_eq!(
        rejection_of(&sel, &store, "server-only"),
        Rejection::NotClientAuth {
            purposes: vec!["1.3.6.1.5.5.7.3.1 (Server Authentication)".into()]
        }
    );
    assert!(lines(&sel).iter().any(|l| l.starts_with("Not client auth cert: CN=server-only, O=Portcullis Lab")
        && l.ends_with("enhanced key usage is 1.3.6.1.5.5.7.3.1 (Server Authentication) without Client Authentication (1.3.6.1.5.5.7.3.2)")));
}

#[test]
fn time_validity_stage_rejects_expired_and_future_certificates() {
    let dir = tempdir();
    let ca = root("Root");
    let now = time::OffsetDateTime::now_utc();
    let mut expired = client("expired");
    expired.not_before = now - Duration::days(30);
    expired.not_after = now - Duration::days(1);
    let mut future = client("future");
    future.not_before = now + Duration::days(2);
    future.not_after = now + Duration::days(30);
    put(dir.path(), "a", &ca.issue(&expired).unwrap(), true);
    put(dir.path(), "b", &ca.issue(&future).unwrap(), true);
    let (store, sel) = judge(dir.path(), &[&ca]);
    assert!(matches!(
        rejection_of(&sel, &store, "expired"),
        Rejection::Expired { .. }
    ));
    assert!(matches!(
        rejection_of(&sel, &store, "future"),
        Rejection::NotYetValid { .. }
    ));
    assert_eq!(sel.surviving(Stage::ClientAuth), Some(2));
    assert_eq!(sel.surviving(Stage::TimeValidity), Some(0));
    assert!(lines(&sel).iter().any(|l| l
        .starts_with("Not time valid cert: CN=expired, O=Portcullis Lab")
        && l.contains("expired on ")));
}

#[test]
fn latest_expiry_wins_and_the_thumbprint_breaks_ties() {
    let dir = tempdir();
    let ca = root("Root");
    let now = time::OffsetDateTime::now_utc();
    let mut short = client("short");
    short.not_after = now + Duration::days(10);
    let mut long = client("long");
    long.not_after = now + Duration::days(400);
    put(dir.path(), "a-long", &ca.issue(&long).unwrap(), true);
    put(dir.path(), "b-short", &ca.issue(&short).unwrap(), true);
    let (store, sel) = judge(dir.path(), &[&ca]);
    let chosen = &store.entries[sel.selected.unwrap()].cert;
    assert!(chosen.subject.starts_with("CN=long,"));
    assert!(lines(&sel)
        .iter()
        .any(|l| l.contains("latest expiry (") && l.contains("of the 2 certificates")));

    // Same expiry to the second: the lowest thumbprint, whatever the file order.
    let dir = tempdir();
    let mut twin = client("twin-a");
    twin.not_after = now + Duration::days(100);
    let a = ca.issue(&twin).unwrap();
    twin.common_name = "twin-b".into();
    let b = ca.issue(&twin).unwrap();
    put(dir.path(), "1", &a, true);
    put(dir.path(), "2", &b, true);
    let (store, sel) = judge(dir.path(), &[&ca]);
    let mut thumbs: Vec<_> = store
        .entries
        .iter()
        .map(|e| e.cert.thumbprint.clone())
        .collect();
    thumbs.sort();
    assert_eq!(
        store.entries[sel.selected.unwrap()].cert.thumbprint,
        thumbs[0]
    );
    assert!(lines(&sel)
        .iter()
        .any(|l| l.contains("the lowest thumbprint breaks the tie")));
}

#[test]
fn a_name_shared_with_another_machines_certificate_is_flagged() {
    let dir = tempdir();
    let ca = root("Root");
    let mut mine = client("shared-name");
    mine.sans = vec!["host1.contoso.com".into()];
    let mut theirs = client("other-machine");
    theirs.sans = vec!["host1.contoso.com".into()];
    theirs.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    put(dir.path(), "a", &ca.issue(&mine).unwrap(), true);
    put(dir.path(), "b", &ca.issue(&theirs).unwrap(), true);
    let (_, sel) = judge(dir.path(), &[&ca]);
    let text = lines(&sel);
    let warning = text
        .iter()
        .find(|l| l.contains("shares the name"))
        .expect("a shared-name line");
    assert!(
        warning.contains("\"DNS:host1.contoso.com\"") && warning.contains("CN=other-machine"),
        "{warning}"
    );
    assert!(warning.ends_with("the subject name or a SAN must be unique to this machine"));

    // No such line when every name is unique.
    let dir = tempdir();
    put(dir.path(), "a", &ca.issue(&client("unique")).unwrap(), true);
    let (_, sel) = judge(dir.path(), &[&ca]);
    assert!(!lines(&sel).iter().any(|l| l.contains("shares the name")));
}

#[test]
fn every_rejection_has_a_reason_and_a_fix() {
    let now = time::OffsetDateTime::now_utc();
    let all = [
        Rejection::NoKeyUsage,
        Rejection::NoDigitalSignature { key_usage: vec![] },
        Rejection::ChainIncomplete {
            missing_issuer: "X".into(),
        },
        Rejection::RootNotAllowed { root: "X".into() },
        Rejection::ChainTooLong,
        Rejection::NoPrivateKey,
        Rejection::KeyUnusable { why: "bad".into() },
        Rejection::NoExtendedKeyUsage,
        Rejection::NotClientAuth { purposes: vec![] },
        Rejection::NotYetValid { not_before: now },
        Rejection::Expired { not_after: now },
    ];
    for r in all {
        assert!(!r.reason().is_empty() && r.fix().ends_with('.'), "{r:?}");
    }
}
