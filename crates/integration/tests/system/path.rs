//! The whole path on loopback with real TLS everywhere: device (curl, probe) -> gateway ->
//! reverse-HTTP/2 channel -> connector -> reference management point, and the status a device
//! gets when a hop refuses it.

use pki::lab::{LabCa, LeafSpec};
use probe::Outcome;
use testkit::*;

#[test]
fn a_device_gets_the_management_points_exact_bytes() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(
        system.wait_for_channels(2),
        "channels: {:?}",
        system.gateway_log.lock().unwrap()
    );
    let path = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST");
    // HTTP/1.1 and HTTP/2 as ALPN chose them, and HTTP/1.1 from a client offering no ALPN.
    for http in [
        &["--http1.1"][..],
        &["--http2"],
        &["--http1.1", "--no-alpn"],
    ] {
        let out = curl(&system, &path, http);
        assert!(
            out.status.success(),
            "{http:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stdout
                .starts_with(b"<MPList><MP Name=\"MP.PORTCULLIS.LAB\""),
            "{http:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // A body streamed both ways, byte for byte.
    let blob: Vec<u8> = (0..50 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 9) as u8)
        .collect();
    std::fs::write(system.path("blob.bin"), &blob).unwrap();
    let data = format!("@{}", system.path("blob.bin").display());
    let echo = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/portcullis/echo");
    for http in ["--http1.1", "--http2"] {
        let out = curl(&system, &echo, &[http, "--data-binary", &data]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stdout == blob,
            "{http}: {} bytes back",
            out.stdout.len()
        );
    }
    let log = system.connector_log.lock().unwrap().clone();
    assert!(
        log.iter().any(|l| l == "Maintaining connections..."),
        "{log:#?}"
    );
    let forwarding = log
        .iter()
        .find(|l| l.starts_with("Forwarding proxy message "))
        .expect("a forwarding line");
    assert!(
        forwarding.ends_with(" to URL: https://localhost:")
            || forwarding.contains("/SMS_MP/.sms_aut?MPLIST"),
        "{forwarding}"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("Received response https://localhost:")
                && l.ends_with(": HTTP/1.1 200 OK")),
        "{log:#?}"
    );

    // ServiceMetadata is answered by the gateway itself.
    let out = curl(&system, "/CCM_PROXY_MUTUALAUTH/ServiceMetadata", &[]);
    let meta = String::from_utf8_lossy(&out.stdout);
    assert!(
        meta.contains(&format!("\"id\":{ENDPOINT}")) && meta.contains("\"name\":\"SMS_MP\""),
        "{meta}"
    );
    system.stop();
}

#[test]
fn the_seed_failure_end_to_end() {
    // The connector's store has no client authentication certificate.
    let system = System::start("gateway", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    let path = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?SITESIGNCERT");
    let report = system.probe(&path, Some("device-001"));
    assert_eq!(
        report.outcome,
        Outcome::HttpError {
            status: 403,
            text: "CMGConnector_Clientcertificaterequired".into()
        },
        "{:?}",
        report.lines
    );
    let lines: Vec<&str> = report.lines.iter().map(|(_, l)| l.as_str()).collect();
    assert!(lines[0].ends_with("Options=31, Code=0, Text=CCM_E_BAD_HTTP_STATUS_CODE"));
    assert_eq!(
        lines[1],
        "[CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= CMGConnector_Clientcertificaterequired"
    );
    assert!(
        lines[2].contains("hop: connector -> endpoint")
            && lines[2].contains("portcullis doctor certs"),
        "{}",
        lines[2]
    );

    let log = system.connector_log.lock().unwrap().clone();
    assert!(
        log.iter()
            .any(|l| l == "Filtered cert count with client auth: 0"),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("Received response https://localhost:")
                && l.contains("/SMS_MP/.sms_aut?SITESIGNCERT for message ")
                && l.ends_with(": HTTP/1.1 403 CMGConnector_Clientcertificaterequired")),
        "{log:#?}"
    );
    let w3c = std::fs::read_to_string(system.path("logs/u_ex.log")).unwrap();
    assert!(
        w3c.lines()
            .any(|l| l.contains(" GET /SMS_MP/.sms_aut SITESIGNCERT ") && l.contains(" 403 7 0 ")),
        "{w3c}"
    );
    system.stop();
}

#[test]
fn devices_are_refused_at_the_gateway_with_a_named_status() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(1));
    let path = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST");
    // A device certificate from another root, and an expired one from the lab root.
    let stranger = LabCa::new_root("Stranger Root", 1)
        .unwrap()
        .issue(&LeafSpec::client_auth("STRANGER", 30))
        .unwrap();
    let root = system.lab_root();
    let mut old = LeafSpec::client_auth("EXPIRED", 30);
    old.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(60);
    old.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let expired = root.issue(&old).unwrap();
    for (name, issued) in [("stranger", &stranger), ("expired", &expired)] {
        std::fs::write(
            system.path(&format!("devices/{name}.crt")),
            &issued.cert_pem,
        )
        .unwrap();
        std::fs::write(system.path(&format!("devices/{name}.key")), &issued.key_pem).unwrap();
    }
    let cases = [
        (
            path.as_str(),
            None,
            403,
            "CMGService_Clientcertificaterequired",
        ),
        (
            path.as_str(),
            Some("stranger"),
            403,
            "CMGService_Untrustedclientcertificate",
        ),
        (
            path.as_str(),
            Some("expired"),
            403,
            "CMGService_Expiredclientcertificate",
        ),
        (
            "/CCM_PROXY_MUTUALAUTH/12345/SMS_MP/.sms_aut?MPLIST",
            Some("device-001"),
            404,
            "CMGService_Unknownendpoint",
        ),
        (
            "/SMS_MP/.sms_aut?MPLIST",
            Some("device-001"),
            404,
            "CMGService_BadRoute",
        ),
    ];
    for (path, device, status, text) in cases {
        let report = system.probe(path, device);
        assert_eq!(
            report.outcome,
            Outcome::HttpError {
                status,
                text: text.into()
            },
            "{path}: {:?}",
            report.lines
        );
    }
    let forwarded = system.connector_lines_starting("Forwarding");
    assert_eq!(forwarded, 0, "refused requests never reach the connector");
    system.stop();
}

#[test]
fn an_endpoint_that_does_not_trust_the_connectors_certificate_is_forbidden() {
    // The connector allows (and so selects) a certificate from a root the management point
    // does not trust: IIS answers 403.16 and the device sees CMGConnector_Forbidden.
    let system = System::builder()
        .store("stranger-store")
        .allowed_roots(&["stranger-root.crt"])
        .prepare(|lab| {
            let root = LabCa::new_root("Stranger Root", 1).unwrap();
            let cert = root
                .issue(&LeafSpec::client_auth("connector-elsewhere", 30))
                .unwrap();
            std::fs::create_dir(lab.join("stranger-store")).unwrap();
            std::fs::write(lab.join("stranger-store/c.crt"), &cert.cert_pem).unwrap();
            std::fs::write(lab.join("stranger-store/c.key"), &cert.key_pem).unwrap();
            std::fs::write(lab.join("stranger-root.crt"), &root.cert().cert_pem).unwrap();
        })
        .start();
    assert!(system.wait_for_channels(2));
    let report = system.probe(
        &format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST"),
        Some("device-001"),
    );
    assert_eq!(
        report.outcome,
        Outcome::HttpError {
            status: 403,
            text: "CMGConnector_Forbidden".into()
        },
        "{:?}",
        report.lines
    );
    assert!(
        report.lines.iter().any(|(_, l)| l.contains("IIS 403.16")),
        "{:?}",
        report.lines
    );
    let w3c = std::fs::read_to_string(system.path("logs/u_ex.log")).unwrap();
    assert!(w3c.contains(" 403 16 0 "), "{w3c}");
    system.stop();
}
