//! Device authentication through a running gateway: certificates checked for Client
//! Authentication, site tokens on CCM_PROXY_SERVERAUTH routes with every refusal reason and a
//! key rotation, and device certificates revoked by a CRL made with the `openssl ca` command
//! line. Settings change by reloading the running gateway, as SIGHUP does: nothing restarts.

use std::path::Path;
use std::process::Command;

use crate::support::*;
use gateway::token::{self, IssueRequest, TokenKind};
use pki::lab::LeafSpec;
use probe::Outcome;
use testkit::*;
use time::OffsetDateTime;

const MPLIST: &str = "SMS_MP/.sms_aut?MPLIST";

fn request(subject: &str) -> IssueRequest {
    IssueRequest {
        subject: subject.into(),
        days: 7,
        endpoints: Vec::new(),
        issuer: token::default_issuer(),
        audience: token::default_audience(),
        kind: TokenKind::Device,
        not_before_offset_secs: 0,
    }
}

fn issue(system: &System, key: &str, request: &IssueRequest) -> (String, String) {
    token::issue(&system.path(key), request, OffsetDateTime::now_utc()).unwrap()
}

/// The status text and body of a SERVERAUTH request carrying `token`.
fn with_token(system: &System, token: Option<&str>, path: &str) -> (u16, String, String) {
    let report = system.probe_with(
        &format!("/CCM_PROXY_SERVERAUTH/{ENDPOINT}/{path}"),
        None,
        token,
    );
    let body = String::from_utf8_lossy(&report.body).to_string();
    match report.outcome {
        Outcome::Success { status } => (status, "OK".into(), body),
        Outcome::HttpError { status, text } => (status, text, body),
        other => panic!("transport failure: {other:?} {:?}", report.lines),
    }
}

fn assert_refused(system: &System, token: Option<&str>, path: &str, check: &str) {
    let (status, text, body) = with_token(system, token, path);
    assert_eq!(
        (status, text.as_str()),
        (401, "CMGService_Invalid_Token"),
        "{body}"
    );
    assert!(body.contains(check), "expected \"{check}\" in: {body}");
}

#[test]
fn tokens_are_checked_end_to_end_and_a_rotated_out_key_stops_working_without_a_restart() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));

    // Before [tokens] is configured, SERVERAUTH is refused and says so.
    let (good, good_id) = issue(&system, "site/token.key", &request("DEVICE-T1"));
    assert_refused(&system, Some(&good), MPLIST, "not configured");

    system
        .reload_gateway(|g| g.tokens = Some(TokenSettings::new(vec!["site/token.pub".into()])))
        .unwrap();
    let (status, _, body) = with_token(&system, Some(&good), MPLIST);
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("<MPList>"), "{body}");
    // The connector is told who the device is: the token's subject and id.
    assert!(
        system
            .connector_log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(&format!(
                "device DEVICE-T1 (token {good_id}) from 127.0.0.1:"
            ))),
        "{:?}",
        system.connector_log.lock().unwrap()
    );

    // Every way a token can be wrong, each named.
    assert_refused(
        &system,
        None,
        MPLIST,
        "no token: send Authorization: Bearer",
    );
    assert_refused(&system, Some("not-a-jwt"), MPLIST, "not a JWT");
    let now = OffsetDateTime::now_utc();
    let expired = token::issue(
        &system.path("site/token.key"),
        &IssueRequest {
            days: 1,
            ..request("DEVICE-OLD")
        },
        now - time::Duration::days(3),
    )
    .unwrap()
    .0;
    assert_refused(&system, Some(&expired), MPLIST, "the token expired at");
    let early = issue(
        &system,
        "site/token.key",
        &IssueRequest {
            not_before_offset_secs: 3600,
            ..request("DEVICE-EARLY")
        },
    )
    .0;
    assert_refused(&system, Some(&early), MPLIST, "not valid before");
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    // Another subject in the payload, the signature kept: tampered.
    let forged = token::issue(
        &system.path("site/token.key"),
        &request("DEVICE-ADMIN"),
        now,
    )
    .unwrap()
    .0;
    parts[1] = forged.split('.').nth(1).unwrap().to_string();
    assert_refused(
        &system,
        Some(&parts.join(".")),
        MPLIST,
        "signature does not verify",
    );
    let wrong_audience = issue(
        &system,
        "site/token.key",
        &IssueRequest {
            audience: "another-gateway".into(),
            ..request("DEVICE-T1")
        },
    )
    .0;
    assert_refused(
        &system,
        Some(&wrong_audience),
        MPLIST,
        "for audience \"another-gateway\"",
    );
    let wrong_issuer = issue(
        &system,
        "site/token.key",
        &IssueRequest {
            issuer: "another-site".into(),
            ..request("DEVICE-T1")
        },
    )
    .0;
    assert_refused(
        &system,
        Some(&wrong_issuer),
        MPLIST,
        "issued by \"another-site\"",
    );
    let elsewhere = issue(
        &system,
        "site/token.key",
        &IssueRequest {
            endpoints: vec![1],
            ..request("DEVICE-T1")
        },
    )
    .0;
    assert_refused(
        &system,
        Some(&elsewhere),
        MPLIST,
        &format!("not valid for endpoint {ENDPOINT}"),
    );
    // "alg": "none" with no signature, and an HMAC token: never accepted.
    let none = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        good.split('.').nth(1).unwrap()
    );
    assert_refused(&system, Some(&none), MPLIST, "not a JWT");
    let hmac = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "X", "exp": now.unix_timestamp() + 60}),
        &jsonwebtoken::EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    assert_refused(
        &system,
        Some(&hmac),
        MPLIST,
        "algorithm HS256 is not accepted",
    );

    // A bulk registration token enrols, and does nothing else.
    let bulk = issue(
        &system,
        "site/token.key",
        &IssueRequest {
            kind: TokenKind::Bulk,
            ..request("BULK-2026")
        },
    )
    .0;
    assert_refused(
        &system,
        Some(&bulk),
        MPLIST,
        "bulk registration token only enrols",
    );
    let (status, text, _) = with_token(&system, Some(&bulk), "ccm_system_tokenauth/request");
    assert_ne!(text, "CMGService_Invalid_Token", "{status}");

    // Revoked by id.
    let (revoked, revoked_id) = issue(&system, "site/token.key", &request("DEVICE-LOST"));
    std::fs::write(
        system.path("site/revoked.txt"),
        format!("# lost devices\n{revoked_id}\n"),
    )
    .unwrap();
    system
        .reload_gateway(|g| {
            let mut tokens = TokenSettings::new(vec!["site/token.pub".into()]);
            tokens.revoked = Some("site/revoked.txt".into());
            g.tokens = Some(tokens);
        })
        .unwrap();
    assert_refused(
        &system,
        Some(&revoked),
        MPLIST,
        &format!("token id {revoked_id} is revoked"),
    );
    assert_eq!(with_token(&system, Some(&good), MPLIST).0, 200);

    // Rotation: a new key beside the old, then the old one leaves; no restart.
    let (key, public) = pki::lab::token_key_pair(true).unwrap();
    std::fs::write(system.path("site/next.key"), key).unwrap();
    std::fs::write(system.path("site/next.pub"), public).unwrap();
    let (next, _) = issue(&system, "site/next.key", &request("DEVICE-T2"));
    assert_refused(&system, Some(&next), MPLIST, "signature does not verify");
    system
        .reload_gateway(|g| {
            g.tokens = Some(TokenSettings::new(vec![
                "site/token.pub".into(),
                "site/next.pub".into(),
            ]))
        })
        .unwrap();
    assert_eq!(with_token(&system, Some(&good), MPLIST).0, 200);
    assert_eq!(with_token(&system, Some(&next), MPLIST).0, 200);
    system
        .reload_gateway(|g| g.tokens = Some(TokenSettings::new(vec!["site/next.pub".into()])))
        .unwrap();
    assert_refused(&system, Some(&good), MPLIST, "signature does not verify");
    assert_eq!(with_token(&system, Some(&next), MPLIST).0, 200);

    // A reload with a bad key file is refused and the running keys stay.
    std::fs::write(system.path("site/broken.pub"), "not a key").unwrap();
    let refused = system
        .reload_gateway(|g| g.tokens = Some(TokenSettings::new(vec!["site/broken.pub".into()])))
        .unwrap_err();
    assert!(refused.contains("site/broken.pub"), "{refused}");
    assert_eq!(with_token(&system, Some(&next), MPLIST).0, 200);
    system.stop();
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl must be installed (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA directory for `openssl ca` around the lab's root certificate and key.
fn openssl_ca(lab: &Path) -> std::path::PathBuf {
    let ca = lab.join("openssl-ca");
    std::fs::create_dir_all(ca.join("new")).unwrap();
    std::fs::write(ca.join("index.txt"), "").unwrap();
    std::fs::write(ca.join("crlnumber"), "1000\n").unwrap();
    std::fs::write(
        ca.join("ca.cnf"),
        format!(
            "[ca]\ndefault_ca = lab\n\n[lab]\ndir = {dir}\ndatabase = $dir/index.txt\nnew_certs_dir = $dir/new\ncertificate = {root}\nprivate_key = {key}\ncrlnumber = $dir/crlnumber\ndefault_md = sha256\ndefault_crl_days = 7\npolicy = anything\n\n[anything]\ncommonName = supplied\n",
            dir = ca.display(),
            root = lab.join("ca/root.crt").display(),
            key = lab.join("ca/root.key").display(),
        ),
    )
    .unwrap();
    ca
}

#[test]
fn a_device_revoked_in_an_openssl_ca_crl_is_refused_and_the_crl_policy_decides_the_unknown() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    let ca = openssl_ca(system.dir.path());
    let cnf = ca.join("ca.cnf");
    let cnf = cnf.to_str().unwrap();
    openssl(&ca, &["ca", "-config", cnf, "-gencrl", "-out", "empty.crl"]);
    let device_001 = system.path("devices/device-001.crt");
    openssl(
        &ca,
        &[
            "ca",
            "-config",
            cnf,
            "-revoke",
            device_001.to_str().unwrap(),
        ],
    );
    openssl(
        &ca,
        &["ca", "-config", cnf, "-gencrl", "-out", "revoked.crl"],
    );

    let path = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/{MPLIST}");
    let status = |device: &str| match system.probe(&path, Some(device)).outcome {
        Outcome::Success { status } => (status, "OK".to_string()),
        Outcome::HttpError { status, text } => (status, text),
        other => panic!("{other:?}"),
    };
    // Refused with 403 and `text`; the body that explains.
    let refused = |device: &str, text: &str| {
        let report = system.probe(&path, Some(device));
        match &report.outcome {
            Outcome::HttpError { status, text: said } => {
                assert_eq!((*status, said.as_str()), (403, text))
            }
            other => panic!("{device}: {other:?}, not 403 {text}"),
        }
        String::from_utf8_lossy(&report.body).into_owned()
    };
    // Revocation checked against one CRL of the openssl CA, with `extra` settings.
    let check_against = |crl: &str, policy: CrlPolicy| {
        system
            .reload_gateway(|g| {
                g.verify_client_revocation = true;
                g.crls = vec![format!("openssl-ca/{crl}").into()];
                g.crl_policy = policy;
            })
            .unwrap()
    };

    // The CRL that lists nothing: the certificate works.
    check_against("empty.crl", CrlPolicy::Refuse);
    assert_eq!(status("device-001").0, 200);

    // The CRL that lists it: refused with a named status; the other device still works.
    check_against("revoked.crl", CrlPolicy::Refuse);
    let body = refused("device-001", "CMGService_Revokedclientcertificate");
    assert!(body.contains("is revoked by"), "{body}");
    assert!(body.contains("revoked.crl"), "{body}");
    assert_eq!(status("device-002").0, 200);

    // A CRL past its next update is stale: the status is unknown, and refused by default.
    openssl(
        &ca,
        &[
            "ca",
            "-config",
            cnf,
            "-gencrl",
            "-crlsec",
            "1",
            "-out",
            "stale.crl",
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    check_against("stale.crl", CrlPolicy::Refuse);
    let body = refused("device-002", "CMGService_Revocationcheckfailed");
    assert!(body.contains("is stale"), "{body}");

    // A CRL that cannot be read: refused by default, let in with a warning when allowed.
    check_against("missing.crl", CrlPolicy::Refuse);
    assert_eq!(
        status("device-002"),
        (403, "CMGService_Revocationcheckfailed".to_string())
    );
    // The device is let in; its connector is not: crl_policy is for devices, and a connector
    // whose status is unknown is refused, so no channel serves the endpoint (503).
    check_against("missing.crl", CrlPolicy::AllowAndWarn);
    assert_eq!(status("device-002").0, 503);
    let log = system.gateway_log.lock().unwrap().join("\n");
    assert!(log.contains("CRL cannot be used"), "{log}");
    assert!(
        log.contains("Revocation status unknown, allowed by crl_policy = \"allow-and-warn\""),
        "{log}"
    );
    assert!(log.contains("connectors are refused when it is"), "{log}");
    drop(log);

    // Revocation off again: the revoked certificate is only judged by its chain, and the
    // connector is back.
    system.reload_gateway(|_| {}).unwrap();
    assert!(system.wait_for_channels_within(2, std::time::Duration::from_secs(40)));
    assert_eq!(status("device-001").0, 200);
    system.stop();
}

#[test]
fn a_bad_tls_or_token_setting_is_refused_at_load_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = "cert = \"c\"\nkey = \"k\"\ntrusted_roots = [\"r\"]\nconnector_roots = [\"cr\"]\nallowed_connectors = [\"x\"]\n";
    for (extra, key, words) in [
        (
            "\n[tls]\ncipher_suites = [\"TLS_RSA_WITH_RC4_128_SHA\"]\n",
            "tls",
            "not one of the safe suites",
        ),
        (
            "\n[tls]\ncipher_suites = [\"TLS13_AES_128_GCM_SHA256\"]\n",
            "tls",
            "no TLS 1.2 suite is listed",
        ),
        (
            "\n[tls]\nmin_version = \"1.0\"\n",
            "min_version",
            "unknown variant",
        ),
        ("\n[tokens]\nkeys = []\n", "tokens.keys", "at least one"),
        ("verify_client_revocation = true\n", "crls", "list the CRL"),
        ("crl_policy = \"maybe\"\n", "crl_policy", "unknown variant"),
    ] {
        let file = dir.path().join("gateway.toml");
        std::fs::write(&file, format!("{base}{extra}")).unwrap();
        let error = gateway::GatewayConfig::load(&file).unwrap_err().to_string();
        assert!(
            error.contains(key) && error.contains(words),
            "{extra}: {error}"
        );
    }
    // TLS 1.3 only, with one suite: accepted.
    std::fs::write(
        dir.path().join("gateway.toml"),
        format!("{base}\n[tls]\nmin_version = \"1.3\"\ncipher_suites = [\"TLS13_AES_256_GCM_SHA384\"]\n"),
    )
    .unwrap();
    gateway::GatewayConfig::load(&dir.path().join("gateway.toml")).unwrap();
}

/// Item 9: the gateway's own server certificate (Server Authentication only) chains to the
/// trusted root but is no device: 403 CMGService_Clientcertificatewrongusage. A device
/// certificate with no extended key usage at all (any purpose, RFC 5280) is accepted.
#[test]
fn a_device_presenting_a_server_certificate_is_refused_for_its_usage() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    std::fs::copy(
        system.path("gateway/server.crt"),
        system.path("devices/gateway-as-device.crt"),
    )
    .unwrap();
    std::fs::copy(
        system.path("gateway/server.key"),
        system.path("devices/gateway-as-device.key"),
    )
    .unwrap();
    let report = system.probe(&mp_path(), Some("gateway-as-device"));
    assert_eq!(
        report.outcome,
        Outcome::HttpError {
            status: 403,
            text: "CMGService_Clientcertificatewrongusage".into()
        },
        "{:?}",
        report.lines
    );
    assert!(wait_logged(
        &system,
        &[
            "Refused message ",
            " from device ",
            "403 CMGService_Clientcertificatewrongusage",
            "1.3.6.1.5.5.7.3.1 (Server Authentication) without Client Authentication",
        ]
    ));

    let mut any_purpose = LeafSpec::client_auth("DEVICE-NO-EKU", 30);
    any_purpose.extended_key_usages.clear();
    let issued = system.lab_root().issue(&any_purpose).unwrap();
    std::fs::write(system.path("devices/no-eku.crt"), &issued.cert_pem).unwrap();
    std::fs::write(system.path("devices/no-eku.key"), &issued.key_pem).unwrap();
    let report = system.probe(&mp_path(), Some("no-eku"));
    assert!(report.succeeded(), "{:?}", report.lines);
    system.stop();
}
