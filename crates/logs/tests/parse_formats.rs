//! Reading each format back: golden records, and writer -> parser round trips.

use std::path::Path;

use logs::cmtrace::{Line, Severity};
use logs::console::{self, ConsoleFormat};
use logs::parse::{self, Encoding, Format, Record, Stats};

fn read(bytes: &[u8]) -> (Stats, Vec<Record>) {
    let mut records = Vec::new();
    let stats = parse::read_from(bytes, Path::new("test.log"), |r| records.push(r))
        .unwrap_or_else(|e| panic!("{e}"));
    (stats, records)
}

#[test]
fn cmtrace_multi_line_and_varied_attributes() {
    let text = concat!(
        "<![LOG[[CCMHTTP] ERROR: URL=https://cmgsccm.contoso.com/CCM_PROXY_MUTUALAUTH/3456/SMS_MP/.sms_aut?SITESIGNCERT, Port=443, Options=31, Code=0, Text=CCM_E_BAD_HTTP_STATUS_CODE]LOG]!><time=\"14:03:07.123+480\" date=\"11-24-2026\" component=\"LocationServices\" context=\"\" type=\"3\" thread=\"5460\" file=\"ccmhttp.cpp:123\">\r\n",
        "<![LOG[Current AD site of machine is Default-First-Site-Name\r\n",
        "second line of the message\r\n",
        "\r\n",
        "last]LOG]!><time=\"14:03:08.000-300\" date=\"11-24-2026\" component=\"LocationServices\" context=\"\" type=\"0\" thread=\"4294967295\" file=\"\">\r\n",
        "<![LOG[attributes in another order]LOG]!><type=\"2\" component=\"ClientIDManagerStartup\" thread=\"1\" date=\"01-02-2026\" time=\"03:04:05.006+000\" extra=\"kept\">",
    );
    let (stats, records) = read(text.as_bytes());
    assert_eq!(stats.format, Format::CmTrace);
    assert_eq!(stats.encoding, Encoding::Utf8);
    assert_eq!((stats.records, stats.skipped), (3, 0));
    assert_eq!(records[0].line, 1);
    assert_eq!(records[0].severity, Some(Severity::Error));
    assert_eq!(records[0].component.as_deref(), Some("LocationServices"));
    assert_eq!(
        records[0].time.as_deref(),
        Some("11-24-2026 14:03:07.123+480")
    );
    assert_eq!(records[0].field("file"), Some("ccmhttp.cpp:123"));
    assert_eq!(records[0].field("thread"), Some("5460"));
    assert!(records[0]
        .message
        .starts_with("[CCMHTTP] ERROR: URL=https://cmgsccm"));
    assert_eq!(records[1].line, 2);
    assert_eq!(
        records[1].message,
        "Current AD site of machine is Default-First-Site-Name\nsecond line of the message\n\nlast"
    );
    assert_eq!(records[1].severity, Some(Severity::Info), "type 0 is info");
    assert_eq!(records[1].field("thread"), Some("4294967295"));
    assert_eq!(records[2].line, 6);
    assert_eq!(records[2].severity, Some(Severity::Warning));
    assert_eq!(
        records[2].component.as_deref(),
        Some("ClientIDManagerStartup")
    );
    assert_eq!(records[2].field("extra"), Some("kept"));
}

#[test]
fn cmtrace_round_trip_from_the_writer() {
    let at = time::macros::datetime!(2026-11-24 14:03:07.123 -05:00);
    let mut file = String::new();
    let cases = [
        ("Maintaining connections...", Severity::Info),
        ("Filtered cert count with client auth: 0", Severity::Warning),
        ("two\r\nlines", Severity::Error),
        ("hostile ]LOG]!><time=\"x\" and more", Severity::Error),
    ];
    for (message, severity) in cases {
        let line = Line {
            message,
            component: "SMS_CLOUD_PROXYCONNECTOR",
            severity,
            thread: 12,
            at,
        };
        file.push_str(&line.format());
        file.push_str("\r\n");
    }
    let (stats, records) = read(file.as_bytes());
    assert_eq!((stats.records, stats.skipped), (4, 0));
    for (r, (message, severity)) in records.iter().zip(cases) {
        // A message is one line, its line breaks and markers escaped (issue 14).
        assert_eq!(r.message, logs::escape::message(message));
        assert_eq!(r.severity, Some(severity));
        assert_eq!(r.component.as_deref(), Some("SMS_CLOUD_PROXYCONNECTOR"));
        assert_eq!(r.time.as_deref(), Some("11-24-2026 14:03:07.123-300"));
    }
    assert_eq!(records[2].message, r"two\r\nlines");
    assert_eq!(records[3].line, 4, "one line per message");
}

#[test]
fn sms_legacy_lines() {
    let text = "SMS_EXECUTIVE started.  $$<SMS_EXECUTIVE><11-24-2026 14:03:07.123+480><thread=5460 (0x1554)>\r\nstray text\r\n";
    let (stats, records) = read(text.as_bytes());
    assert_eq!(stats.format, Format::SmsLegacy);
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].message, "SMS_EXECUTIVE started.");
    assert_eq!(records[0].component.as_deref(), Some("SMS_EXECUTIVE"));
    assert_eq!(records[0].field("thread"), Some("5460 (0x1554)"));
    assert_eq!(records[1].format, Format::Text);
}

#[test]
fn w3c_with_two_fields_directives() {
    let text = "#Software: Microsoft Internet Information Services 10.0\r\n\
#Version: 1.0\r\n\
#Date: 2026-11-24 14:00:00\r\n\
#Fields: date time s-ip cs-method cs-uri-stem cs-uri-query s-port cs-username c-ip cs(User-Agent) cs(Referer) sc-status sc-substatus sc-win32-status sc-bytes time-taken\r\n\
2026-11-24 14:03:07 10.0.0.5 GET /SMS_MP/.sms_aut SITESIGNCERT 443 - 10.0.0.9 SMS+CCM+5.0 - 403 7 0 5573 11\r\n\
#Fields: date time cs-uri-stem sc-status sc-substatus\r\n\
2026-11-24 14:05:00 /SMS_MP/.sms_aut 200 0\r\n\
2026-11-24 14:05:01 too few\r\n";
    let (stats, records) = read(text.as_bytes());
    assert_eq!(stats.format, Format::W3c);
    assert_eq!((stats.records, stats.skipped), (2, 1));
    assert_eq!(stats.skipped_examples[0].0, 8);
    assert!(stats.skipped_examples[0]
        .1
        .contains("4 values where #Fields names 5"));
    let seed = &records[0];
    assert_eq!(seed.line, 5);
    assert_eq!(seed.field("sc-status"), Some("403"));
    assert_eq!(seed.field("sc-substatus"), Some("7"));
    assert_eq!(seed.field("cs(User-Agent)"), Some("SMS+CCM+5.0"));
    assert_eq!(seed.field("c-ip"), Some("10.0.0.9"));
    assert_eq!(seed.time.as_deref(), Some("2026-11-24 14:03:07"));
    assert_eq!(seed.severity, Some(Severity::Warning));
    assert_eq!(
        seed.message,
        "2026-11-24 14:03:07 10.0.0.5 GET /SMS_MP/.sms_aut SITESIGNCERT 443 - 10.0.0.9 SMS+CCM+5.0 - 403 7 0 5573 11"
    );
    assert_eq!(records[1].field("sc-status"), Some("200"));
    assert_eq!(
        records[1].field("s-ip"),
        None,
        "the second #Fields changed the columns"
    );
}

#[test]
fn w3c_line_without_its_header_uses_the_default_fields() {
    let text = "2026-11-24 14:03:07 10.0.0.5 GET /SMS_MP/.sms_aut SITESIGNCERT 443 - 10.0.0.9 SMS+CCM+5.0 - 403 7 0 5573 11\n";
    let (stats, records) = read(text.as_bytes());
    assert_eq!(stats.format, Format::W3c);
    assert_eq!(records[0].field("sc-substatus"), Some("7"));
}

#[test]
fn console_plain_and_json_round_trip() {
    let at = time::macros::datetime!(2026-11-25 06:30:57.123 UTC);
    let cases = [
        (
            "SMS_CLOUD_PROXYCONNECTOR",
            Severity::Info,
            "Maintaining connections...",
        ),
        (
            "PORTCULLIS_GATEWAY",
            Severity::Warning,
            "one\ntwo\n  indented",
        ),
        ("C", Severity::Error, "say \"hi\": ]LOG]!> {json}"),
    ];
    for style in [ConsoleFormat::Plain, ConsoleFormat::Json] {
        let mut file = String::new();
        for (component, severity, message) in cases {
            file.push_str(&console::format(style, at, component, severity, message));
            file.push('\n');
        }
        let (stats, records) = read(file.as_bytes());
        let expected = match style {
            ConsoleFormat::Plain => Format::Console,
            ConsoleFormat::Json => Format::ConsoleJson,
        };
        assert_eq!(stats.format, expected);
        assert_eq!(records.len(), 3, "{style:?}: {records:?}");
        for (r, (component, severity, message)) in records.iter().zip(cases) {
            // One line per message in both styles, line breaks escaped (issue 14).
            assert_eq!(r.message, logs::escape::message(message), "{style:?}");
            assert_eq!(r.component.as_deref(), Some(component));
            assert_eq!(r.severity, Some(severity));
            assert_eq!(r.time.as_deref(), Some("2026-11-25T06:30:57.123Z"));
            assert_eq!(r.format, expected);
        }
        assert_eq!(records[1].message, r"one\ntwo\n  indented");
        assert_eq!(records[2].line, 3, "{style:?}: one line per message");
    }
    // Older Portcullis wrote a plain message's further lines indented by two spaces: they
    // are still read as part of it, and counted.
    let older = "2026-11-25T06:30:57.123Z C warning: one\n  two\n    indented\n2026-11-25T06:30:57.124Z C info: next\n";
    let (_, records) = read(older.as_bytes());
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].message, "one\ntwo\n  indented");
    assert_eq!(records[1].line, 4, "continuation lines are counted");
}

#[test]
fn console_older_shape_without_the_date() {
    let text = "06:30:57.123 SMS_CLOUD_PROXYCONNECTOR error: Channel 1 to gateway cmg:443: cannot connect: refused; retrying\n";
    let (stats, records) = read(text.as_bytes());
    assert_eq!(stats.format, Format::Console);
    assert_eq!(records[0].time.as_deref(), Some("06:30:57.123"));
    assert_eq!(records[0].severity, Some(Severity::Error));
    assert!(records[0].message.starts_with("Channel 1 to gateway"));
}

#[test]
fn plain_text_is_read_line_by_line() {
    let text = "Some forum post header\n\n[CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= CMGConnector_Clientcertificaterequired   \n";
    let (stats, records) = read(text.as_bytes());
    assert_eq!(stats.format, Format::Text);
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].line, 3);
    assert_eq!(
        records[1].message,
        "[CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= CMGConnector_Clientcertificaterequired"
    );
}

#[test]
fn read_path_names_missing_files_and_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.log");
    let err = parse::read_path(&missing, |_| {}).unwrap_err();
    assert!(err.to_string().contains("nope.log"), "{err}");
    let err = parse::read_path(tmp.path(), |_| {}).unwrap_err();
    assert!(err.to_string().contains("is a directory"), "{err}");
}
