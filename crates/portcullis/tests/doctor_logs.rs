//! `portcullis doctor logs`, driven as a process on logs in the shapes the original product
//! writes them, and every refusal Portcullis emits recognised by the rule table.

mod common;

use std::process::Output;

use channel::refusal::{Cause, Refusal};
use common::{p, portcullis, text};
use logs::diagnose::{Diagnosis, Rules};

fn doctor_logs(args: &[&str]) -> Output {
    let mut all = vec!["doctor", "logs"];
    all.extend_from_slice(args);
    portcullis(&all)
}

/// A CMTrace line as Configuration Manager writes it (UTC+8 offset, as in the field).
fn cm(message: &str, component: &str, kind: u8, thread: u32) -> String {
    format!(
        "<![LOG[{message}]LOG]!><time=\"07:44:31.812+480\" date=\"11-24-2026\" component=\"{component}\" context=\"\" type=\"{kind}\" thread=\"{thread}\" file=\"\">\r\n"
    )
}

fn location_services() -> String {
    [
        ("Current AD site of machine is Default-First-Site-Name", 1),
        ("Getting the signing certificate from the site's management point", 1),
        ("[CCMHTTP] ERROR: URL=https://cmgsccm.contoso.com/CCM_PROXY_MUTUALAUTH/3456/SMS_MP/.sms_aut?SITESIGNCERT, Port=443, Options=31, Code=0, Text=CCM_E_BAD_HTTP_STATUS_CODE", 3),
        ("[CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= CMGConnector_Clientcertificaterequired", 3),
    ]
    .iter()
    .map(|(m, kind)| cm(m, "LocationServices", *kind, 5460))
    .collect()
}

fn proxy_connector() -> String {
    [
        "Filtered cert count with digital signature: 7",
        "Not allowed cert: CN=old.contoso.com; Issuer=CN=Contoso Old Root",
        "No private key cert: CN=nokey.contoso.com",
        "Filtered cert count with allowed root CA: 3",
        "Filtered cert count with private key: 3",
        "Not client auth cert: CN=web.contoso.com",
        "Filtered cert count with client auth: 0",
        "Maintaining connections...",
        "Forwarding proxy message 1f3c9b2e-8c1d-4b7a-9f0e-2d6c5a4b3e21 to URL: https://InternalMP.contoso.com/SMS_MP/.sms_aut?SITESIGNCERT",
        "Received response https://InternalMP.contoso.com/SMS_MP/.sms_aut?SITESIGNCERT for message 1f3c9b2e-8c1d-4b7a-9f0e-2d6c5a4b3e21: HTTP/1.1 403 CMGConnector_Clientcertificaterequired",
    ]
    .iter()
    .map(|m| cm(m, "SMS_CLOUD_PROXYCONNECTOR", 1, 12))
    .collect()
}

const IIS: &str = "#Software: Microsoft Internet Information Services 10.0\r\n\
#Version: 1.0\r\n\
#Date: 2026-11-24 14:00:00\r\n\
#Fields: date time s-ip cs-method cs-uri-stem cs-uri-query s-port cs-username c-ip cs(User-Agent) cs(Referer) sc-status sc-substatus sc-win32-status sc-bytes time-taken\r\n\
2026-11-24 14:02:59 10.0.0.5 GET /SMS_MP/.sms_aut MPLIST 443 - 10.0.0.7 SMS+CCM+5.0 - 200 0 0 2212 15\r\n\
2026-11-24 14:03:07 10.0.0.5 GET /SMS_MP/.sms_aut SITESIGNCERT 443 - 10.0.0.9 SMS+CCM+5.0 - 403 7 0 5573 11\r\n";

fn utf16le_with_bom(text: &str) -> Vec<u8> {
    let mut out = vec![0xFF, 0xFE];
    for unit in text.encode_utf16() {
        out.extend_from_slice(&unit.to_le_bytes());
    }
    out
}

#[test]
fn the_seed_case_from_device_connector_and_iis_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("logs");
    std::fs::create_dir_all(dir.join("iis")).unwrap();
    std::fs::write(dir.join("LocationServices.log"), location_services()).unwrap();
    std::fs::write(dir.join("SMS_Cloud_ProxyConnector.log"), proxy_connector()).unwrap();
    std::fs::write(dir.join("iis/u_ex261124.log"), IIS).unwrap();
    std::fs::write(
        dir.join("capture.etl"),
        [0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0, 0, 1, 2].repeat(64),
    )
    .unwrap();

    let out = doctor_logs(&[p(&dir)]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    for needle in [
        "LocationServices.log: CMTrace, UTF-8, 4 records",
        "u_ex261124.log: IIS W3C extended, UTF-8, 2 records",
        "capture.etl: not a text log",
        "1 known failure found.",
        "403 CMGConnector_Clientcertificaterequired: the endpoint wanted a client certificate",
        "LocationServices.log:4: [CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= CMGConnector_Clientcertificaterequired",
        "SMS_Cloud_ProxyConnector.log:10: Received response https://InternalMP.contoso.com",
        "u_ex261124.log:6: 2026-11-24 14:03:07 10.0.0.5 GET /SMS_MP/.sms_aut SITESIGNCERT 443 - 10.0.0.9 SMS+CCM+5.0 - 403 7 0 5573 11",
        "SMS_Cloud_ProxyConnector.log:6: Not client auth cert: CN=web.contoso.com",
        "SMS_Cloud_ProxyConnector.log:7: Filtered cert count with client auth: 0",
        "LocationServices.log:3: [CCMHTTP] ERROR: URL=https://cmgsccm.contoso.com",
        "Resolution: On the server running the CMG connector point",
    ] {
        assert!(said.contains(needle), "expected {needle:?} in:\n{said}");
    }
    // Evidence before supporting, cause before evidence, resolution last.
    let cause = said.find("Cause:").unwrap();
    let evidence = said.find("Evidence (3 lines)").unwrap();
    let supporting = said.find("Supporting:").unwrap();
    let resolution = said.find("Resolution:").unwrap();
    assert!(
        cause < evidence && evidence < supporting && supporting < resolution,
        "{said}"
    );
}

#[test]
fn a_utf16le_location_services_log() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("LocationServices.log");
    std::fs::write(&path, utf16le_with_bom(&location_services())).unwrap();
    let out = doctor_logs(&[p(&path)]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("CMTrace, UTF-16LE, 4 records"), "{said}");
    assert!(
        said.contains("LocationServices.log:4: [CCMHTTP] ERROR INFO: StatusCode= 403"),
        "{said}"
    );
    // Alone, without the connector's log, the device's view still names the fix.
    assert!(said.contains("portcullis doctor certs"), "{said}");
}

#[test]
fn json_output() {
    let tmp = tempfile::tempdir().unwrap();
    let device = tmp.path().join("LocationServices.log");
    let connector = tmp.path().join("SMS_Cloud_ProxyConnector.log");
    std::fs::write(&device, location_services()).unwrap();
    std::fs::write(&connector, proxy_connector()).unwrap();
    let out = doctor_logs(&[p(&device), p(&connector), "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let findings = json["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{json:#}");
    let f = &findings[0];
    assert_eq!(f["id"], "connector-client-cert-required");
    assert_eq!(f["count"], 2);
    assert_eq!(f["evidence"][0]["file"], p(&device));
    assert_eq!(f["evidence"][0]["line"], 4);
    assert_eq!(
        f["evidence"][0]["text"],
        "[CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= CMGConnector_Clientcertificaterequired"
    );
    assert!(f["supporting"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["text"] == "Filtered cert count with client auth: 0"));
    for key in ["title", "cause", "resolution"] {
        assert!(f[key].as_str().is_some_and(|s| !s.is_empty()), "{key}");
    }
    let files = json["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(files[0]["path"], p(&device));
    assert_eq!(files[0]["format"], "cmtrace");
    assert_eq!(files[0]["records"], 4);
    assert_eq!(files[0]["skipped"], 0);
}

#[test]
fn a_clean_log_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("SMS_Cloud_ProxyConnector.log");
    let clean: String = [
        "Filtered cert count with client auth: 1",
        "Selected client authentication cert: CN=connector.contoso.com: the only candidate",
        "Maintaining connections...",
        "Received response https://InternalMP.contoso.com/SMS_MP/.sms_aut?MPLIST for message 1: HTTP/1.1 200 OK",
    ]
    .iter()
    .map(|m| cm(m, "SMS_CLOUD_PROXYCONNECTOR", 1, 12))
    .collect();
    std::fs::write(&path, clean).unwrap();
    let out = doctor_logs(&[p(&path)]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("No known failure found in 4 records from 1 file."),
        "{said}"
    );
}

#[test]
fn unreadable_input_exits_2_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("NoSuch.log");
    let out = doctor_logs(&[p(&missing)]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains(p(&missing)), "{said}");

    let binary = tmp.path().join("memory.dmp");
    std::fs::write(&binary, [0u8, 1, 2, 3, 4, 5, 6, 7].repeat(512)).unwrap();
    let out = doctor_logs(&[p(&binary)]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("not a text log"), "{said}");
    assert!(said.contains("memory.dmp"), "{said}");

    let out = doctor_logs(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn help_says_what_it_reads_and_the_exit_codes() {
    let out = doctor_logs(&["--help"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    for needle in [
        "CMTrace",
        "W3C",
        "UTF-16",
        "Exit status",
        "0 no known failure",
        "--json",
    ] {
        assert!(said.contains(needle), "expected {needle:?} in:\n{said}");
    }
}

/// The findings for one log, read in-process.
fn findings(name: &str, log: &str) -> Vec<(String, String, String)> {
    static RULES: std::sync::OnceLock<Rules> = std::sync::OnceLock::new();
    let rules = RULES.get_or_init(|| Rules::builtin().unwrap_or_else(|e| panic!("{e}")));
    let mut d = Diagnosis::new(rules);
    d.read_from(log.as_bytes(), name)
        .unwrap_or_else(|e| panic!("{e}"));
    d.finish()
        .findings
        .into_iter()
        .map(|f| (f.id, f.title, f.cause))
        .collect()
}

#[test]
fn every_status_text_portcullis_sends_is_recognised() {
    let at = time::macros::datetime!(2026-11-24 14:03:07.123 UTC);
    let mut ids = std::collections::HashSet::new();
    for cause in Cause::examples() {
        let refusal = Refusal::new(cause);
        // The gateway's line (as written now, naming the message, and as before), the
        // connector's, and the device's, each alone.
        let lines = [
            (
                "gateway.log",
                format!("Refused message 5f3a9c0e0000000000000001 from device 203.0.113.7:50123: {refusal}"),
            ),
            (
                "gateway.log",
                format!("Refused a request from device 203.0.113.7:50123: {refusal}"),
            ),
            (
                "SMS_Cloud_ProxyConnector.log",
                format!(
                    "Received response https://InternalMP.contoso.com/SMS_MP/.sms_aut?SITESIGNCERT for message 1f3c: HTTP/1.1 {} {}",
                    refusal.status, refusal.text
                ),
            ),
            (
                "LocationServices.log",
                format!(
                    "[CCMHTTP] ERROR INFO: StatusCode= {} StatusText= {}",
                    refusal.status, refusal.text
                ),
            ),
        ];
        for (name, message) in lines {
            let log = logs::cmtrace::Line {
                message: &message,
                component: "PORTCULLIS",
                severity: logs::cmtrace::Severity::Warning,
                thread: 1,
                at,
            }
            .format()
                + "\r\n";
            let found = findings(name, &log);
            assert_eq!(found.len(), 1, "{message}: {found:?}");
            let (id, title, _) = &found[0];
            assert!(
                title.contains(refusal.text),
                "{message}: rule {id} is titled {title:?}"
            );
            ids.insert(id.clone());
        }
    }
    assert_eq!(
        ids.len(),
        Cause::examples().len(),
        "each status text has its own rule: {ids:?}"
    );
}

#[test]
fn the_iis_sub_status_in_a_forbidden_refusal_picks_the_precise_rule() {
    for (sub, id) in [
        (13, "endpoint-forbidden-revoked"),
        (16, "endpoint-forbidden-untrusted"),
        (17, "endpoint-forbidden-expired"),
    ] {
        let refusal = Refusal::new(Cause::EndpointForbidden {
            url: "https://mp/SMS_MP/.sms_aut?MPLIST".into(),
            substatus: Some(sub),
        });
        // The connector logs the status line, then the reason (with the sub-status).
        let log = format!(
            "Received response https://mp/SMS_MP/.sms_aut?MPLIST for message 9: HTTP/1.1 403 {}\nMessage 9: {}. {}\n",
            refusal.text,
            refusal.reason(),
            refusal.remedy()
        );
        let found = findings("connector.txt", &log);
        let ids: Vec<&str> = found.iter().map(|(id, _, _)| id.as_str()).collect();
        assert_eq!(ids, [id], "{log}");
    }
}
