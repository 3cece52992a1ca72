//! The rule table on lines in the shapes the original product (and Portcullis) write them.

use logs::diagnose::{Diagnosis, Report, Rules};

/// A CMTrace line as Configuration Manager writes it.
fn cm(message: &str, component: &str, kind: u8) -> String {
    format!(
        "<![LOG[{message}]LOG]!><time=\"10:11:12.345+480\" date=\"11-24-2026\" component=\"{component}\" context=\"\" type=\"{kind}\" thread=\"5460\" file=\"\">\r\n"
    )
}

fn diagnose(files: &[(&str, String)]) -> Report {
    static RULES: std::sync::OnceLock<Rules> = std::sync::OnceLock::new();
    let rules = RULES.get_or_init(|| Rules::builtin().unwrap_or_else(|e| panic!("{e}")));
    let mut d = Diagnosis::new(rules);
    for (name, text) in files {
        d.read_from(text.as_bytes(), name)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    d.finish()
}

fn ids(report: &Report) -> Vec<&str> {
    report.findings.iter().map(|f| f.id.as_str()).collect()
}

const W3C_HEADER: &str = "#Software: Microsoft Internet Information Services 10.0\r\n#Version: 1.0\r\n#Date: 2026-11-24 14:00:00\r\n#Fields: date time s-ip cs-method cs-uri-stem cs-uri-query s-port cs-username c-ip cs(User-Agent) cs(Referer) sc-status sc-substatus sc-win32-status sc-bytes time-taken\r\n";

fn w3c(status: u16, substatus: u16) -> String {
    format!("2026-11-24 14:03:07 10.0.0.5 GET /SMS_MP/.sms_aut SITESIGNCERT 443 - 10.0.0.9 SMS+CCM+5.0 - {status} {substatus} 0 5573 11\r\n")
}

fn device_status(status: u16, text: &str) -> String {
    cm("[CCMHTTP] ERROR: URL=https://cmgsccm.contoso.com/CCM_PROXY_MUTUALAUTH/3456/SMS_MP/.sms_aut?SITESIGNCERT, Port=443, Options=31, Code=0, Text=CCM_E_BAD_HTTP_STATUS_CODE", "LocationServices", 3)
        + &cm(&format!("[CCMHTTP] ERROR INFO: StatusCode= {status} StatusText= {text}"), "LocationServices", 3)
}

fn seed_trail() -> String {
    [
        "Filtered cert count with digital signature: 7",
        "Not allowed cert: CN=old.contoso.com; Issuer=CN=Other Root",
        "No private key cert: CN=nokey.contoso.com",
        "Filtered cert count with allowed root CA: 3",
        "Filtered cert count with private key: 3",
        "Not client auth cert: CN=web.contoso.com",
        "Filtered cert count with client auth: 0",
        "Maintaining connections...",
    ]
    .iter()
    .map(|m| cm(m, "SMS_CLOUD_PROXYCONNECTOR", 1))
    .collect()
}

#[test]
fn the_seed_case_is_one_finding_across_device_connector_and_iis() {
    let connector = seed_trail()
        + &cm("Forwarding proxy message 1f3c-77 to URL: https://InternalMP.contoso.com/SMS_MP/.sms_aut?SITESIGNCERT", "SMS_CLOUD_PROXYCONNECTOR", 1)
        + &cm("Received response https://InternalMP.contoso.com/SMS_MP/.sms_aut?SITESIGNCERT for message 1f3c-77: HTTP/1.1 403 CMGConnector_Clientcertificaterequired", "SMS_CLOUD_PROXYCONNECTOR", 3);
    let report = diagnose(&[
        (
            "LocationServices.log",
            device_status(403, "CMGConnector_Clientcertificaterequired"),
        ),
        ("SMS_Cloud_ProxyConnector.log", connector),
        (
            "u_ex261124.log",
            format!("{W3C_HEADER}{}{}", w3c(200, 0), w3c(403, 7)),
        ),
    ]);
    assert_eq!(
        ids(&report),
        ["connector-client-cert-required"],
        "{report:#?}"
    );
    let f = &report.findings[0];
    // Device line, connector line, IIS line; the trail's "client auth: 0" (absorbed) stays
    // with the trail in the supporting lines.
    assert_eq!(f.count, 3, "{f:#?}");
    let places: Vec<String> = f
        .evidence
        .iter()
        .map(|e| format!("{}:{}", e.file, e.line))
        .collect();
    assert_eq!(
        places,
        [
            "LocationServices.log:2",
            "SMS_Cloud_ProxyConnector.log:10",
            "u_ex261124.log:6"
        ]
    );
    assert!(f.evidence[2].text.ends_with("403 7 0 5573 11"));
    // The endpoint's URL, from the connector's line (evidence captures win over context).
    assert!(
        f.cause
            .contains("behind https://InternalMP.contoso.com/SMS_MP/.sms_aut?SITESIGNCERT"),
        "{}",
        f.cause
    );
    let supporting: Vec<&str> = f.supporting.iter().map(|e| e.text.as_str()).collect();
    assert!(
        supporting.contains(&"Not client auth cert: CN=web.contoso.com"),
        "{supporting:?}"
    );
    assert!(supporting.contains(&"Filtered cert count with digital signature: 7"));
    assert!(supporting.contains(&"Maintaining connections..."));
    assert!(supporting.contains(&"Filtered cert count with client auth: 0"));
    assert!(
        supporting[0].starts_with("[CCMHTTP] ERROR: URL="),
        "{supporting:?}"
    );
    assert!(f.resolution.contains("Client Authentication"));

    let text = report.render_text();
    assert!(text.contains("LocationServices.log:2: [CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= CMGConnector_Clientcertificaterequired"), "{text}");
    assert!(text.contains("1 known failure found."), "{text}");
    assert!(
        text.contains("u_ex261124.log: IIS W3C extended, UTF-8, 2 records"),
        "{text}"
    );
}

#[test]
fn a_trail_ending_at_client_auth_zero_alone_is_a_finding() {
    let report = diagnose(&[("SMS_Cloud_ProxyConnector.log", seed_trail())]);
    assert_eq!(ids(&report), ["connector-no-client-auth-cert"]);
    let f = &report.findings[0];
    assert!(f.cause.contains("at the client auth stage"), "{}", f.cause);
    assert_eq!(f.evidence[0].line, 7);
    assert_eq!(f.supporting.len(), 7, "{:#?}", f.supporting);
}

#[test]
fn winhttp_flags_each_name_their_cause() {
    let secure = cm("[CCMHTTP] ERROR: URL=https://cmgsccm.contoso.com/CCM_Proxy_MutualAuth/72057594037927940/SMS_MP/.sms_aut?MPLIST, Port=443, Options=1472, Code=12175, Text=ERROR_WINHTTP_SECURE_FAILURE", "CcmMessaging", 3);
    for (flag, id, words) in [
        (
            "CERT_REV_FAILED",
            "winhttp-cert-rev-failed",
            "revocation list",
        ),
        ("INVALID_CA", "winhttp-invalid-ca", "Trusted Root"),
        (
            "CERT_CN_INVALID",
            "winhttp-cert-cn-invalid",
            "subject alternative name",
        ),
        (
            "CERT_DATE_INVALID",
            "winhttp-cert-date-invalid",
            "validity period",
        ),
    ] {
        let log = cm(
            "[CCMHTTP] AsyncCallback(): WINHTTP_CALLBACK_STATUS_SECURE_FAILURE Encountered",
            "CcmMessaging",
            1,
        ) + &cm(
            &format!("[CCMHTTP] AsyncCallback(): WINHTTP_CALLBACK_STATUS_FLAG_{flag} is set"),
            "CcmMessaging",
            1,
        ) + &secure;
        let report = diagnose(&[("CcmMessaging.log", log)]);
        assert_eq!(ids(&report), [id], "{flag}: {report:#?}");
        let f = &report.findings[0];
        assert_eq!(
            f.count, 3,
            "the bare secure-failure lines join the flag's finding"
        );
        assert!(f.cause.contains(words), "{}", f.cause);
        assert!(
            f.cause
                .contains("https://cmgsccm.contoso.com/CCM_Proxy_MutualAuth"),
            "{}",
            f.cause
        );
    }
    // Two flags on one failure: two findings.
    let log = cm(
        "[CCMHTTP] AsyncCallback(): WINHTTP_CALLBACK_STATUS_FLAG_INVALID_CA is set",
        "CcmMessaging",
        1,
    ) + &cm(
        "[CCMHTTP] AsyncCallback(): WINHTTP_CALLBACK_STATUS_FLAG_CERT_CN_INVALID is set",
        "CcmMessaging",
        1,
    ) + &secure;
    assert_eq!(
        ids(&diagnose(&[("CcmMessaging.log", log)])),
        ["winhttp-invalid-ca", "winhttp-cert-cn-invalid"]
    );
}

#[test]
fn a_bare_secure_failure_in_any_spelling() {
    for line in [
        "[CCMHTTP] ERROR: URL=https://cmg/CCM_PROXY_MUTUALAUTH/1/SMS_MP/.sms_aut?MPLIST, Port=443, Options=31, Code=0x80072f8f, Text=ERROR_WINHTTP_SECURE_FAILURE",
        "Failed to send request to cmg. Error 0x80072F8F",
        "Request failed with error 0x2f8f",
        "WinHttpSendRequest failed: error 12175",
        "hr = -2147012721",
    ] {
        let report = diagnose(&[("LocationServices.log", cm(line, "LocationServices", 3))]);
        assert_eq!(ids(&report), ["winhttp-secure-failure"], "{line}");
    }
    // Our probe's own second line names the rustls reason: that decides the flag.
    let probe = cm("[CCMHTTP] ERROR: URL=https://cmg:8443/CCM_PROXY_MUTUALAUTH/1/SMS_MP/.sms_aut?MPLIST, Port=8443, Options=31, Code=0x80072f8f, Text=ERROR_WINHTTP_SECURE_FAILURE", "LocationServices", 3)
        + &cm("[CCMHTTP] ERROR INFO: TLS with cmg failed: invalid peer certificate: UnknownIssuer", "LocationServices", 3);
    let report = diagnose(&[("LocationServices.log", probe)]);
    assert_eq!(ids(&report), ["winhttp-invalid-ca"]);
    assert!(
        report.findings[0].cause.contains("https://cmg:8443/"),
        "{}",
        report.findings[0].cause
    );
}

#[test]
fn iis_403_substatus_decides_and_absorbs_the_device_view() {
    for (sub, id) in [
        (13, "endpoint-forbidden-revoked"),
        (16, "endpoint-forbidden-untrusted"),
        (17, "endpoint-forbidden-expired"),
        (4, "endpoint-forbidden"),
    ] {
        let report = diagnose(&[
            (
                "LocationServices.log",
                device_status(403, "CMGConnector_Forbidden"),
            ),
            ("u_ex261124.log", format!("{W3C_HEADER}{}", w3c(403, sub))),
        ]);
        assert_eq!(ids(&report), [id], "403.{sub}: {report:#?}");
        assert_eq!(report.findings[0].count, 2);
    }
    let report = diagnose(&[(
        "LocationServices.log",
        device_status(403, "CMGConnector_Forbidden"),
    )]);
    assert_eq!(ids(&report), ["endpoint-forbidden"]);
}

#[test]
fn other_status_texts_of_the_original() {
    for (status, text, id) in [
        (401, "CMGConnector_Unauthorized", "endpoint-unauthorized"),
        (
            500,
            "CMGConnector_InternalServerError",
            "endpoint-internal-error",
        ),
        (401, "CMGService_Invalid_Token", "token-invalid"),
    ] {
        let report = diagnose(&[("LocationServices.log", device_status(status, text))]);
        assert_eq!(ids(&report), [id], "{text}");
        assert!(
            report.findings[0]
                .cause
                .contains("https://cmgsccm.contoso.com/")
                || id == "token-invalid"
        );
    }
    let report = diagnose(&[("u_ex261124.log", format!("{W3C_HEADER}{}", w3c(500, 0)))]);
    assert_eq!(ids(&report), ["endpoint-internal-error"]);
}

#[test]
fn connector_channel_failures() {
    let connector = cm("Maintaining connections...", "SMS_CLOUD_PROXYCONNECTOR", 1)
        + &cm("Channel 1 to gateway cmg.contoso.com:443: TLS failed: invalid peer certificate: UnknownIssuer; retrying", "SMS_CLOUD_PROXYCONNECTOR", 3)
        + &cm("Channel 2 to gateway cmg2.contoso.com:443@10.0.0.6: cannot connect: Connection refused (os error 111); retrying", "SMS_CLOUD_PROXYCONNECTOR", 3);
    let report = diagnose(&[("SMS_Cloud_ProxyConnector.log", connector.clone())]);
    assert_eq!(
        ids(&report),
        ["connector-channel-tls", "connector-channel-connect"]
    );
    assert!(report.findings[0].cause.contains("cmg.contoso.com:443"));
    assert!(report.findings[0].cause.contains("UnknownIssuer"));
    assert!(report.findings[1].cause.contains("Connection refused"));
    // An instance of a name entry (connector::instances) is named NAME:PORT@IP.
    assert!(report.findings[1]
        .cause
        .contains("cmg2.contoso.com:443@10.0.0.6"));

    // A name entry that does not resolve (connector::instances).
    let unresolved = cm("Cannot resolve gateway gw.contoso.com:443: failed to lookup address information: Name or service not known; keeping the last known 2 instance(s) (10.0.0.5, 10.0.0.6) and their channels; trying again in 60 s", "SMS_CLOUD_PROXYCONNECTOR", 3);
    let report = diagnose(&[("SMS_Cloud_ProxyConnector.log", unresolved)]);
    assert_eq!(ids(&report), ["connector-gateway-unresolved"]);
    assert!(report.findings[0].cause.contains("gw.contoso.com:443"));
    assert!(report.findings[0]
        .cause
        .contains("Name or service not known"));
    assert!(report.findings[0].cause.contains("10.0.0.5, 10.0.0.6"));

    let gateway = "2026-11-25T06:30:57.123Z PORTCULLIS_GATEWAY error: Refused a connector channel from 10.0.0.9:50211: CN=connector.contoso.com is not in allowed_connectors\n";
    let report = diagnose(&[
        ("SMS_Cloud_ProxyConnector.log", connector),
        ("gateway.log", gateway.to_string()),
    ]);
    assert_eq!(
        ids(&report),
        ["gateway-refused-connector", "connector-channel-connect"]
    );
    assert_eq!(report.findings[0].count, 2);
    assert!(report.findings[0]
        .cause
        .contains("not in allowed_connectors"));
}

/// Issue 16: a connector that stops answering the gateway's keep-alive PINGs (frozen), as the
/// gateway's log tells it, is one finding naming the connector; a connector refused after
/// TLS, as the connector's own log tells it, points at the gateway's reason and joins it.
#[test]
fn a_frozen_connector_and_a_channel_closed_before_its_hello() {
    let gateway = "2026-11-25T06:30:57.123Z PORTCULLIS_GATEWAY warning: Connector branch-01 channel 7 from 10.0.0.9:50211: keep-alive PING unanswered for 1.25 s; no new request goes to the channel until it answers\n\
        2026-11-25T06:30:57.900Z PORTCULLIS_GATEWAY warning: Refused a request from device 203.0.113.7:50123: 503 CMGService_Connectorunresponsive (gateway -> connector): every channel for endpoint 3456 has left the gateway's keep-alive PING unanswered, the longest silent for 1.900 s\n\
        2026-11-25T06:31:02.123Z PORTCULLIS_GATEWAY warning: Connector branch-01 lost channel 7 from 10.0.0.9:50211: keep-alive PINGs unanswered for 5.01 s (nothing read from the connector meanwhile): the gateway dropped the channel\n";
    let report = diagnose(&[("gateway.log", gateway.to_string())]);
    assert_eq!(ids(&report), ["connector-unresponsive"]);
    assert_eq!(report.findings[0].count, 3);
    assert!(
        report.findings[0].cause.contains("branch-01"),
        "{}",
        report.findings[0].cause
    );

    let connector = cm("Channel 1 to gateway cmg.contoso.com:443: channel lost before the gateway asked for the hello: the connection ended without a GOAWAY or TLS close_notify (the gateway stopped, or the network cut it), as a gateway does at once to a connector it does not trust or allow (its log says why: \"Refused a connector channel from ...\"); retrying", "SMS_CLOUD_PROXYCONNECTOR", 3);
    let report = diagnose(&[("SMS_Cloud_ProxyConnector.log", connector.clone())]);
    assert_eq!(ids(&report), ["connector-channel-refused-before-hello"]);
    assert!(report.findings[0].cause.contains("cmg.contoso.com:443"));

    let gateway = "2026-11-25T06:30:57.123Z PORTCULLIS_GATEWAY error: Refused a connector channel from 10.0.0.9:50211: CN=connector.contoso.com is not in allowed_connectors\n";
    let report = diagnose(&[
        ("SMS_Cloud_ProxyConnector.log", connector),
        ("gateway.log", gateway.to_string()),
    ]);
    assert_eq!(ids(&report), ["gateway-refused-connector"]);
    assert_eq!(report.findings[0].count, 2);
}

/// The gateway's refusals of a connector for its certificate's usage or for endpoints not
/// bound to it are named by the same rule, with the gateway's reason.
#[test]
fn a_connector_refused_for_its_usage_or_its_endpoints() {
    for why in [
        "CN=Portcullis Connector Channel, O=Contoso (thumbprint 0A1B) has enhanced key usage 1.3.6.1.5.5.7.3.1 (Server Authentication) without Client Authentication (1.3.6.1.5.5.7.3.2); issue the connector's channel certificate with Client Authentication in its enhanced key usage",
        "connector branch (CN=Branch Connector, O=Contoso (thumbprint 0A1B)) announced endpoint(s) 3456 (SMS_MP) that allowed_connectors does not bind to it; bind them to it ({ name = \"Branch Connector\", endpoints = [...] }) or take them out of the connector's [[endpoints]]",
    ] {
        let gateway = format!("2026-11-25T06:30:57.123Z PORTCULLIS_GATEWAY error: Refused a connector channel from 10.0.0.9:50211: {why}\n");
        let report = diagnose(&[("gateway.log", gateway)]);
        assert_eq!(ids(&report), ["gateway-refused-connector"]);
        assert!(report.findings[0].cause.contains(why), "{}", report.findings[0].cause);
        assert!(
            report.findings[0].resolution.contains("Client Authentication")
                && report.findings[0].resolution.contains("endpoints = [...]"),
            "{}",
            report.findings[0].resolution
        );
    }
}

#[test]
fn clean_logs_find_nothing() {
    let connector = cm(
        "Selected client authentication cert: CN=connector.contoso.com: latest expiry",
        "SMS_CLOUD_PROXYCONNECTOR",
        1,
    ) + &cm(
        "Filtered cert count with client auth: 1",
        "SMS_CLOUD_PROXYCONNECTOR",
        1,
    ) + &cm("Maintaining connections...", "SMS_CLOUD_PROXYCONNECTOR", 1)
        + &cm(
            "Received response https://mp/SMS_MP/.sms_aut?MPLIST for message 1: HTTP/1.1 200 OK",
            "SMS_CLOUD_PROXYCONNECTOR",
            1,
        );
    let device = cm("[CCMHTTP] OK: URL=https://cmg/CCM_PROXY_MUTUALAUTH/1/SMS_MP/.sms_aut?MPLIST, Port=443, StatusCode= 200 StatusText= OK, Bytes=512", "LocationServices", 1);
    let report = diagnose(&[
        ("SMS_Cloud_ProxyConnector.log", connector),
        ("LocationServices.log", device),
        ("u_ex261124.log", format!("{W3C_HEADER}{}", w3c(200, 0))),
        ("empty.log", String::new()),
    ]);
    assert!(report.findings.is_empty(), "{report:#?}");
    assert!(report
        .render_text()
        .contains("No known failure found in 6 records from 4 files."));
}

#[test]
fn evidence_is_capped_and_counted_and_json_has_the_documented_shape() {
    let many: String = (0..60)
        .map(|_| device_status(401, "CMGConnector_Unauthorized"))
        .collect();
    let report = diagnose(&[("LocationServices.log", many)]);
    let f = &report.findings[0];
    assert_eq!(f.count, 60);
    assert_eq!(f.evidence.len(), logs::diagnose::MAX_EVIDENCE);
    assert!(report.render_text().contains("and 55 more"));
    let json = serde_json::to_value(&report).unwrap();
    let finding = &json["findings"][0];
    for key in [
        "id",
        "title",
        "cause",
        "resolution",
        "evidence",
        "supporting",
        "count",
    ] {
        assert!(!finding[key].is_null(), "{key} in {finding}");
    }
    assert_eq!(finding["evidence"][0]["file"], "LocationServices.log");
    assert_eq!(finding["evidence"][0]["line"], 2);
    assert_eq!(json["files"][0]["format"], "cmtrace");
    assert_eq!(json["files"][0]["records"], 120);
    assert_eq!(json["files"][0]["skipped"], 0);
}

#[test]
fn findings_come_in_order_of_first_appearance() {
    let log = device_status(500, "CMGConnector_InternalServerError")
        + &device_status(401, "CMGConnector_Unauthorized")
        + &device_status(500, "CMGConnector_InternalServerError");
    let report = diagnose(&[("LocationServices.log", log)]);
    assert_eq!(
        ids(&report),
        ["endpoint-internal-error", "endpoint-unauthorized"]
    );
    assert_eq!(report.findings[0].count, 2);
}

mod never_panics {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn on_any_text(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("CMGConnector_Forbidden".to_string()),
                    Just("[CCMHTTP] ERROR: URL=".to_string()),
                    Just("Code=12175".to_string()),
                    Just("Refused a request from device ".to_string()),
                    Just("Refused message 1f3c from device ".to_string()),
                    Just("Filtered cert count with client auth: 0".to_string()),
                    Just("#Fields: sc-status sc-substatus\n".to_string()),
                    Just("403 7\n".to_string()),
                    Just("\r\n".to_string()),
                    "\\PC{0,40}",
                ],
                0..40,
            ),
            wide in 0usize..3,
        ) {
            let mut text: String = parts.concat();
            // Long non-ASCII messages cross the context and evidence caps mid-character.
            for _ in 0..wide {
                text.push_str(&"é😀".repeat(11_000));
            }
            let report = diagnose(&[("random.log", text)]);
            let _ = report.render_text();
            prop_assert!(serde_json::to_string(&report).is_ok());
        }
    }
}

/// The gateway's lines for a stall after an answer began (no "Refused a request" then: the
/// head had gone) name the cause and the timeout.
#[test]
fn stalls_cut_after_the_answer_began() {
    let gateway = cm(
        "Cut the connection of device 203.0.113.7:50211: 408 CMGService_Devicestalled (device -> gateway): the device stopped reading the answer for 30 s; its requests' channel streams are reset",
        "PORTCULLIS_GATEWAY",
        2,
    ) + &cm(
        "Cut the answer to message 1f3c of device 203.0.113.8:40000: 504 CMGService_Connectorstalled (gateway -> connector): the connector started its answer and then sent nothing for 30 s; its head was already sent, so the device's stream (HTTP/2) or connection (HTTP/1.1) is cut and the channel stream reset",
        "PORTCULLIS_GATEWAY",
        3,
    );
    let report = diagnose(&[("gateway.log", gateway)]);
    assert_eq!(ids(&report), ["device-stalled", "connector-stalled"]);
    assert!(
        report.findings[0]
            .cause
            .contains("the device stopped reading the answer for 30 s"),
        "{}",
        report.findings[0].cause
    );
    assert!(
        report.findings[1].cause.contains("sent nothing for 30 s"),
        "{}",
        report.findings[1].cause
    );
}

/// The line a component writes where its log lost lines (a full disk) names its own finding.
#[test]
fn lost_log_lines_are_a_finding() {
    let message = logs::logger::lost_lines(42, "No space left on device (os error 28)");
    let report = diagnose(&[(
        "SMS_Cloud_ProxyGateway.log",
        cm(&message, "SMS_CLOUD_PROXY_GATEWAY", 2),
    )]);
    assert_eq!(ids(&report), ["log-lines-lost"], "{report:#?}");
    let finding = &report.findings[0];
    assert!(
        finding.title.starts_with("42 log line(s) were lost"),
        "{}",
        finding.title
    );
    assert!(
        finding.cause.contains("No space left on device"),
        "{}",
        finding.cause
    );
}
