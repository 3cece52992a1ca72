//! The device-side probe against a real management point on loopback, and against sockets
//! that refuse, stall, or present an untrusted certificate.

use std::time::Duration;

use probe::{self, Outcome, ProbeOptions, DEFAULT_KEPT_BODY};
use testkit::lab::{with_mp, Lab};

fn options(lab: &Lab, url: String, with_device_cert: bool) -> ProbeOptions {
    ProbeOptions {
        url,
        ca: vec![lab.path("ca/root.crt")],
        cert: with_device_cert.then(|| lab.path("devices/device-001.crt")),
        key: with_device_cert.then(|| lab.path("devices/device-001.key")),
        token: None,
        timeout: Duration::from_secs(10),
        http2: false,
        keep_body: DEFAULT_KEPT_BODY,
    }
}

fn run(options: &ProbeOptions) -> probe::ProbeReport {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(probe::probe(options))
        .expect("probe starts")
}

fn text(report: &probe::ProbeReport) -> Vec<String> {
    report.lines.iter().map(|(_, l)| l.clone()).collect()
}

#[test]
fn success_and_the_location_services_error_lines() {
    let lab = Lab::new();
    with_mp(
        &lab,
        |_| {},
        |base| {
            let url = format!("{base}/SMS_MP/.sms_aut?MPLIST");
            for http2 in [false, true] {
                let mut o = options(&lab, url.clone(), true);
                o.http2 = http2;
                let report = run(&o);
                assert_eq!(
                    report.outcome,
                    Outcome::Success { status: 200 },
                    "{:?}",
                    text(&report)
                );
                assert!(report.body.starts_with(b"<MPList>"));
                assert!(text(&report)[0].starts_with(&format!("[CCMHTTP] OK: URL={url}, Port=")));
            }

            let report = run(&options(
                &lab,
                format!("{base}/SMS_MP/.sms_aut?SITESIGNCERT"),
                false,
            ));
            let lines = text(&report);
            let port = base.rsplit(':').next().unwrap();
            assert_eq!(
            lines[0],
            format!("[CCMHTTP] ERROR: URL={base}/SMS_MP/.sms_aut?SITESIGNCERT, Port={port}, Options=31, Code=0, Text=CCM_E_BAD_HTTP_STATUS_CODE")
        );
            assert_eq!(
                lines[1],
                "[CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= Forbidden"
            );
            assert!(
                lines[2].contains("403.7 - Forbidden: Client certificate required"),
                "{}",
                lines[2]
            );
            assert_eq!(
                report.outcome,
                Outcome::HttpError {
                    status: 403,
                    text: "Forbidden".into()
                }
            );
        },
    );
}

#[test]
fn an_untrusted_server_certificate_is_a_secure_failure() {
    let lab = Lab::new();
    with_mp(
        &lab,
        |_| {},
        |base| {
            let mut o = options(&lab, format!("{base}/SMS_MP/.sms_aut?MPLIST"), true);
            // Trusting only some other certificate: the server's chain is unknown.
            o.ca = vec![lab.path("devices/device-002.crt")];
            let report = run(&o);
            assert_eq!(
                report.outcome,
                Outcome::Transport {
                    code: 0x8007_2f8f,
                    text: "ERROR_WINHTTP_SECURE_FAILURE"
                }
            );
            // As the client logs it: WinHTTP's callback with its flag, then the error.
            assert_eq!(
                text(&report)[..3],
                [
                    "[CCMHTTP] AsyncCallback(): WINHTTP_CALLBACK_STATUS_SECURE_FAILURE Encountered",
                    "[CCMHTTP] AsyncCallback(): dwStatusInformation is 0x8",
                    "[CCMHTTP] AsyncCallback(): WINHTTP_CALLBACK_STATUS_FLAG_INVALID_CA is set",
                ]
            );
            assert!(text(&report)[3].contains("Code=0x80072f8f, Text=ERROR_WINHTTP_SECURE_FAILURE"));
            assert!(
                text(&report)[4].contains("UnknownIssuer"),
                "{:?}",
                text(&report)
            );
        },
    );
}

#[test]
fn nothing_listening_and_a_silent_server() {
    let lab = Lab::new();
    // A port that was free a moment ago: connection refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let report = run(&options(&lab, format!("https://127.0.0.1:{port}/x"), false));
    assert_eq!(
        report.outcome,
        Outcome::Transport {
            code: 0x8007_2efd,
            text: "ERROR_WINHTTP_CANNOT_CONNECT"
        }
    );

    // Accepts and never answers: the probe gives up at its timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut o = options(&lab, format!("https://127.0.0.1:{port}/x"), false);
    o.timeout = Duration::from_millis(500);
    let report = run(&o);
    assert_eq!(
        report.outcome,
        Outcome::Transport {
            code: 0x8007_2ee2,
            text: "ERROR_WINHTTP_TIMEOUT"
        }
    );
    drop(silent);
}

#[test]
fn bad_local_input_is_an_error_not_an_outcome() {
    let lab = Lab::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let plain = options(&lab, "http://localhost/x".into(), false);
    let err = runtime
        .block_on(probe::probe(&plain))
        .unwrap_err()
        .to_string();
    assert!(err.contains("only https:// URLs"), "{err}");
    let mut missing = options(&lab, "https://localhost/x".into(), false);
    missing.ca = vec![lab.path("nope.crt")];
    let err = runtime
        .block_on(probe::probe(&missing))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.crt: no such file or directory"), "{err}");
    let mut half = options(&lab, "https://localhost/x".into(), true);
    half.key = None;
    let err = runtime
        .block_on(probe::probe(&half))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--cert given without --key"), "{err}");
}
