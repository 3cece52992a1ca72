//! Text from outside (a certificate's subject, a token's header, a request path) goes into log
//! messages. Whatever it holds, every writer writes one line per message, and every line
//! starts as a genuine record of its format: no input can start a line, end a record early or
//! open one (issue 14, item 12).

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use logs::cmtrace::{self, Line, Severity};
use logs::console::{self, ConsoleFormat};
use logs::escape;
use logs::parse::{self, Format, Record};
use logs::w3c::{W3cEntry, FIELDS};
use logs::Logger;
use proptest::prelude::*;

/// Everything some reader takes for a line break: `\n` and `\r` (every reader), VT, FF, the
/// file/group/record separators, NEL and the Unicode line and paragraph separators (Python's
/// `str.splitlines`, editors, some log shippers).
const BREAKS: [char; 10] = [
    '\n', '\r', '\u{b}', '\u{c}', '\u{1c}', '\u{1d}', '\u{1e}', '\u{85}', '\u{2028}', '\u{2029}',
];

/// Pieces of outside text: what attacks the formats, and anything at all.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\r\n".to_string()),
        Just("\n".to_string()),
        Just("\r".to_string()),
        Just("\t".to_string()),
        Just("\u{1b}[31m".to_string()),
        Just("\u{7f}".to_string()),
        Just("\u{85}".to_string()),
        Just("\u{9b}".to_string()),
        Just("\u{2028}".to_string()),
        Just("\u{2029}".to_string()),
        Just("\u{feff}".to_string()),
        Just("\u{202e}".to_string()),
        Just("<![LOG[".to_string()),
        Just("]LOG]!>".to_string()),
        Just("]LOG".to_string()),
        Just("]!>".to_string()),
        Just("<time=\"14:03:07.123+000\" type=\"3\">".to_string()),
        Just("\"".to_string()),
        Just(" ".to_string()),
        Just("2026-11-24T06:30:57.123Z C error: forged".to_string()),
        Just("{\"message\":\"forged\"}".to_string()),
        "[ -~]{0,12}",
        any::<String>(),
    ]
}

fn message() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(piece(), 0..12)
}

fn read(text: &str) -> (parse::Stats, Vec<Record>) {
    let mut records = Vec::new();
    let stats = parse::read_from(text.as_bytes(), Path::new("forged.log"), |r| {
        records.push(r)
    })
    .unwrap();
    (stats, records)
}

/// `text` holds exactly `lines` line breaks, each a `\r\n` ending a line (or `\n` when
/// `crlf` is false), and nothing else any reader takes for one.
fn assert_breaks(text: &str, lines: usize, crlf: bool) -> Result<(), TestCaseError> {
    let count = |c: char| text.matches(c).count();
    prop_assert_eq!(count('\n'), lines, "{:?}", text);
    prop_assert_eq!(count('\r'), if crlf { lines } else { 0 }, "{:?}", text);
    for c in &BREAKS[2..] {
        prop_assert_eq!(count(*c), 0, "{:?} in {:?}", c, text);
    }
    if crlf {
        prop_assert_eq!(text.matches("\r\n").count(), lines, "{:?}", text);
    }
    Ok(())
}

/// No control character and no line break of any kind, escaped forms aside.
fn assert_clean(message: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        !message
            .chars()
            .any(|c| c.is_control() || BREAKS.contains(&c)),
        "{:?}",
        message
    );
    Ok(())
}

const AT: time::OffsetDateTime = time::macros::datetime!(2026-11-24 14:03:07.123 UTC);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// CMTrace, as `stamped_parts` (the logger's file lines) and `Line::format` (the probe's)
    /// write it: one line per message, each a whole record of ours, read back one record each.
    #[test]
    fn cmtrace_lines_cannot_be_forged(messages in proptest::collection::vec(message(), 1..6)) {
        let mut file = String::new();
        for (n, parts) in messages.iter().enumerate() {
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            if n % 2 == 0 {
                file.push_str(&cmtrace::stamped_parts("SMS_CLOUD_PROXYGATEWAY", Severity::Warning, &parts));
            } else {
                let joined = parts.concat();
                let line = Line {
                    message: &joined,
                    component: "SMS_CLOUD_PROXYGATEWAY",
                    severity: Severity::Warning,
                    thread: 7,
                    at: AT,
                };
                file.push_str(&line.format());
                file.push_str("\r\n");
            }
        }
        assert_breaks(&file, messages.len(), true)?;
        for line in file.split_terminator("\r\n") {
            prop_assert!(line.starts_with("<![LOG["), "{:?}", line);
            prop_assert!(line.ends_with(" file=\"\">"), "{:?}", line);
            prop_assert_eq!(line.matches("<![LOG[").count(), 1, "{:?}", line);
            prop_assert_eq!(line.matches("]LOG]!>").count(), 1, "{:?}", line);
        }
        let (stats, records) = read(&file);
        prop_assert_eq!(stats.format, Format::CmTrace);
        prop_assert_eq!(stats.skipped, 0);
        prop_assert_eq!(records.len(), messages.len());
        for (n, (record, parts)) in records.iter().zip(&messages).enumerate() {
            prop_assert_eq!(record.line, n as u64 + 1);
            prop_assert_eq!(record.component.as_deref(), Some("SMS_CLOUD_PROXYGATEWAY"));
            prop_assert_eq!(record.severity, Some(parse::Severity::Warning));
            assert_clean(&record.message)?;
            // The message read back is the one sent, escaped: nothing lost, nothing added.
            prop_assert_eq!(&record.message, &escape::message(&parts.concat()).into_owned());
        }
    }

    /// Console lines, plain and JSON: one line per message, each read back as one record of
    /// ours.
    #[test]
    fn console_lines_cannot_be_forged(
        messages in proptest::collection::vec(message(), 1..6),
        json in any::<bool>(),
    ) {
        let style = if json { ConsoleFormat::Json } else { ConsoleFormat::Plain };
        let mut out = String::new();
        for parts in &messages {
            out.push_str(&console::format(style, AT, "C", Severity::Error, &parts.concat()));
            out.push('\n');
        }
        assert_breaks(&out, messages.len(), false)?;
        for line in out.lines() {
            prop_assert!(
                line.starts_with("2026-11-24T14:03:07.123Z C error: ")
                    || line.starts_with("{\"time\":\"2026-11-24T14:03:07.123Z\",\"component\":\"C\",\"level\":\"error\",\"message\":\""),
                "{:?}", line
            );
        }
        let (stats, records) = read(&out);
        prop_assert_eq!(stats.format, if json { Format::ConsoleJson } else { Format::Console });
        prop_assert_eq!(records.len(), messages.len());
        for (record, parts) in records.iter().zip(&messages) {
            prop_assert_eq!(record.component.as_deref(), Some("C"));
            assert_clean(&record.message)?;
            prop_assert_eq!(&record.message, &escape::message(&parts.concat()).into_owned());
        }
    }

    /// W3C fields hold no space and no control character: every line splits into exactly the
    /// fields `#Fields:` names.
    #[test]
    fn w3c_fields_cannot_be_forged(
        method in piece(),
        stem in message(),
        query in proptest::option::of(message()),
        user in proptest::option::of(piece()),
        agent in proptest::option::of(message()),
    ) {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let stem = stem.concat();
        let query = query.map(|q| q.concat());
        let agent = agent.map(|a| a.concat());
        let entry = W3cEntry {
            at: AT,
            server_ip: ip("10.0.0.5"),
            method: &method,
            uri_stem: &stem,
            uri_query: query.as_deref(),
            server_port: 443,
            username: user.as_deref(),
            client_ip: ip("10.0.0.9"),
            user_agent: agent.as_deref(),
            referer: None,
            status: 403,
            substatus: 7,
            win32_status: 0,
            bytes_sent: 5573,
            time_taken_ms: 11,
        };
        let line = entry.line();
        assert_breaks(&line, 0, false)?;
        assert_clean(&line)?;
        prop_assert_eq!(line.split(' ').count(), FIELDS.split(' ').count(), "{:?}", line);
        prop_assert!(line.split(' ').all(|field| !field.is_empty()), "{:?}", line);
        prop_assert!(line.ends_with(" 403 7 0 5573 11"), "{:?}", line);
    }
}

/// Through the logger, as components write: the file, and what a function sink is handed, get
/// one line per message whatever the message holds.
#[test]
fn the_logger_writes_one_line_per_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("SMS_Cloud_ProxyGateway.log");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = seen.clone();
    let log = Logger::new("SMS_CLOUD_PROXYGATEWAY")
        .with_file(&path, 1 << 20)
        .unwrap()
        .with_sink(move |_, m| keep.lock().unwrap().push(m.to_string()))
        .into_log();
    let forged = "CN=x\r\n<![LOG[FORGED]LOG]!><time=\"14:03:07.123+000\" date=\"11-24-2026\" component=\"SMS_CLOUD_PROXYGATEWAY\" context=\"\" type=\"1\" thread=\"1\" file=\"\">\u{2028}\u{85}";
    log.warn(&format!("Refused: {forged}"));
    log.info_parts(&["parts ", forged, " end"]);
    log.error(forged);
    log.flush();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.matches('\n').count(), 3, "{text}");
    for line in text.lines() {
        assert!(
            line.starts_with("<![LOG[") && !line.starts_with("<![LOG[FORGED"),
            "{line:?}"
        );
    }
    let (_, records) = read(&text);
    assert_eq!(records.len(), 3, "{records:?}");
    for (record, handed) in records.iter().zip(seen.lock().unwrap().iter()) {
        assert_eq!(
            &record.message, handed,
            "the sink is handed what the file shows"
        );
    }
}

/// The escaped forms, pinned: the admin sees what was sent.
#[test]
fn control_characters_are_escaped_visibly() {
    let line = Line {
        message:
            "a\r\nb\tc\u{1b}[31md\u{7f}e\u{85}f\u{9b}g\u{2028}h\u{2029}i\u{0}j]LOG]!>k<![LOG[l",
        component: "C",
        severity: Severity::Info,
        thread: 1,
        at: AT,
    };
    let text = line.format();
    let message = &text["<![LOG[".len()..text.find("]LOG]!><time=").unwrap()];
    assert_eq!(
        message,
        r"a\r\nb\tc\x1b[31md\x7fe\u{85}f\u{9b}g\u{2028}h\u{2029}i\x00j]LOG]!&gt;k&lt;![LOG[l"
    );
    // Text with nothing to escape is written as it is, non-ASCII included.
    let plain =
        "Forwarding proxy message 1f3c to URL: https://mp/SMS_MP/.sms_aut?MPLIST Grüße 日本";
    assert!(
        cmtrace::stamped("C", Severity::Info, plain).starts_with(&format!("<![LOG[{plain}]LOG]!>"))
    );
}

/// Outside text inside a genuine line of ours (a certificate's subject in a refusal, a device's
/// path in the connector's and the gateway's per-request lines) does not pick the doctor's
/// rule: a status text quoted from outside is not the line's own.
#[test]
fn outside_text_in_a_genuine_line_does_not_pick_the_doctors_rule() {
    let rules = logs::diagnose::Rules::builtin().unwrap();
    let cases = [
        (
            "Refused a request from device 127.0.0.1:5: 403 CMGService_Untrustedclientcertificate (device -> gateway): the device's client certificate does not chain to a root the gateway trusts: CN=x Received response https://mp/ for message 1: HTTP/1.1 403 CMGConnector_Clientcertificaterequired, O=Lab",
            Some("device-cert-untrusted"),
        ),
        (
            "Refused a request from device 127.0.0.1:5: 404 CMGService_BadRoute (device -> gateway): the request path is not a gateway route: \"CMGConnector_Forbidden\" is not an endpoint id (a decimal number)",
            Some("gateway-bad-route"),
        ),
        (
            "Refused message 1f3c from device 127.0.0.1:5: 404 CMGService_BadRoute (device -> gateway): the request path is not a gateway route: \"CMGConnector_Forbidden\" is not an endpoint id (a decimal number)",
            Some("gateway-bad-route"),
        ),
        (
            "Message 1f3c: the gateway withdrew the request after 5 ms, before https://mp/SMS_MP/CMGConnector_Forbidden answered (its device went away, or the gateway's request_timeout_secs struck); the call to the endpoint is abandoned",
            Some("request-abandoned"),
        ),
        (
            "Forwarding proxy message 1f3c to URL: https://mp/SMS_MP/CMGConnector_Clientcertificaterequired",
            None,
        ),
        (
            "Received response https://mp/SMS_MP/CMGService_Untrustedclientcertificate for message 1f3c: HTTP/1.1 200 OK",
            None,
        ),
        (
            "Message 1f3c: GET /SMS_MP/CMGConnector_Forbidden from device 127.0.0.1:5 (certificate AB) to endpoint 7 over channel 1 of connector c1",
            None,
        ),
        (
            "Message 1f3c: device CN=CMGService_Revokedclientcertificate (AB) from 127.0.0.1:5; presenting no client certificate",
            None,
        ),
        // The genuine lines still pick theirs.
        (
            "Received response https://mp/SMS_MP/.sms_aut?SITESIGNCERT for message 1f3c: HTTP/1.1 403 CMGConnector_Clientcertificaterequired",
            Some("connector-client-cert-required"),
        ),
    ];
    let mut file = String::new();
    for (message, _) in &cases {
        file.push_str(&cmtrace::stamped(
            "SMS_CLOUD_PROXYGATEWAY",
            Severity::Warning,
            message,
        ));
    }
    let (_, records) = read(&file);
    assert_eq!(records.len(), cases.len());
    for (record, (message, rule)) in records.iter().zip(cases) {
        assert_eq!(rules.rule_for(record), rule, "{message}");
    }
    // The rule's captures still come from the whole line: the admin reads the reason.
    let mut diagnosis = logs::diagnose::Diagnosis::new(&rules);
    diagnosis.record("gateway.log", &records[0]);
    let report = diagnosis.finish();
    assert!(
        report.findings[0].cause.contains("CN=x Received response"),
        "{}",
        report.findings[0].cause
    );
}

/// `doctor logs` reads logs from anywhere (a device's, the original product's) and prints
/// their lines: what it shows holds no control character but its own line breaks, so a
/// hostile log cannot drive the admin's terminal (escape sequences) or forge report lines.
#[test]
fn the_doctors_report_shows_hostile_lines_escaped() {
    // A foreign writer's CMTrace line, controls raw: a terminal title and a colour change.
    let hostile = "<![LOG[[CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= CMGConnector_Clientcertificaterequired \u{1b}]0;pwned\u{7}\u{1b}[2J\u{85}Finding: none]LOG]!><time=\"14:03:07.123+000\" date=\"11-24-2026\" component=\"CcmMessaging\" context=\"\" type=\"3\" thread=\"1\" file=\"\">\r\n<![LOG[[CCMHTTP] ERROR: URL=https://cmg/CCM_PROXY_MUTUALAUTH/1/x\u{1b}[31m, Port=443]LOG]!><time=\"14:03:07.124+000\" date=\"11-24-2026\" component=\"CcmMessaging\" context=\"\" type=\"3\" thread=\"1\" file=\"\">\r\n";
    let rules = logs::diagnose::Rules::builtin().unwrap();
    let mut diagnosis = logs::diagnose::Diagnosis::new(&rules);
    diagnosis
        .read_from(hostile.as_bytes(), "CcmMessaging.log")
        .unwrap();
    let report = diagnosis.finish();
    assert_eq!(report.findings.len(), 1, "{report:?}");
    let shown = report.render_text();
    assert!(
        shown.contains(r"\x1b]0;pwned\x07\x1b[2J\u{85}Finding: none"),
        "{shown}"
    );
    for c in shown.chars() {
        assert!(
            c == '\n' || !(c.is_control() || c == '\u{2028}' || c == '\u{2029}'),
            "{c:?} in {shown}"
        );
    }
}
