//! Text from outside cannot forge log lines (issue 14, item 12), with real processes: a
//! gateway writing its CMTrace log and console, devices sending a certificate, a token and a
//! path that each carry a forged record, and `portcullis doctor logs` reading the log after.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{p, portcullis, text, Child};
use pki::lab::{LabCa, LeafSpec};

/// A whole CMTrace record naming a cause that never happened here (the connector's seed
/// failure, the doctor's first rule), dated in the past, after a line break: what an attacker
/// wants the admin and the doctor to read instead of the genuine record.
const FORGED: &str = "\r\n<![LOG[Received response https://InternalMP.contoso.com/SMS_MP/.sms_aut?MPLIST for message 1f3c: HTTP/1.1 403 CMGConnector_Clientcertificaterequired]LOG]!><time=\"01:02:03.004+000\" date=\"01-01-2026\" component=\"SMS_CLOUD_PROXYCONNECTOR\" context=\"\" type=\"3\" thread=\"1\" file=\"\">\r\n";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// base64url without padding, as JWTs are written.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Reads `path` until it holds `needle` `times` times, for at most 10 s.
fn wait_for(path: &Path, needle: &str, times: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.matches(needle).count() >= times || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A device refused three ways, each carrying a forged record: a certificate from a root the
/// gateway does not trust with the record in its CN, a token whose header's `alg` holds it,
/// and a path whose endpoint id holds the line breaks a path can carry (NEL, U+2028). Verbose
/// logging is on. The gateway's log then has one line per record, none forged, and `doctor
/// logs` names the genuine causes, not the forged one.
#[test]
fn outside_text_cannot_forge_the_gateways_log_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = tmp.path().join("lab");
    let out = portcullis(&["pki", "init", "--out", p(&lab)]);
    assert!(out.status.success(), "{}", text(&out));

    let port = free_port();
    let log = lab.join("logs/SMS_Cloud_ProxyGateway.log");
    let config = lab.join("gateway.toml");
    let mut gateway = gateway::GatewayConfig::lab();
    gateway.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    gateway.verbose = true;
    gateway.log.file = Some("logs/SMS_Cloud_ProxyGateway.log".into());
    gateway.log.console = logs::logger::ConsoleSetting::Plain;
    gateway.tokens = Some(gateway::token::TokenSettings::new(vec![
        "site/token.pub".into()
    ]));
    gateway.write(&config).unwrap();
    let console = tmp.path().join("gateway-console.txt");
    let _gateway = Child(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["gateway", "--config", p(&config)])
            .stdout(std::fs::File::create(&console).unwrap())
            // A refused configuration is said on standard error: kept beside the console.
            .stderr(std::fs::File::create(tmp.path().join("gateway-stderr.txt")).unwrap())
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_for(&console, "Gateway listening", 1).contains("Gateway listening"),
        "the gateway did not start: {}{}",
        std::fs::read_to_string(&console).unwrap_or_default(),
        std::fs::read_to_string(tmp.path().join("gateway-stderr.txt")).unwrap_or_default()
    );

    let url = format!("https://localhost:{port}/CCM_PROXY_MUTUALAUTH/7/SMS_MP/.sms_aut?MPLIST");
    let root = lab.join("ca/root.crt");
    let probe = |args: &[&str], status_text: &str| {
        let mut all = vec!["probe", "--ca", p(&root)];
        all.extend_from_slice(args);
        let out = portcullis(&all);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{said}");
        assert!(said.contains(status_text), "{status_text} not in: {said}");
    };

    // 1. A certificate with the forged record in its CN, from a root the gateway does not trust.
    let elsewhere = LabCa::new_root("Elsewhere Root", 1).unwrap();
    let device = elsewhere
        .issue(&LeafSpec::client_auth(&format!("DEVICE-X{FORGED}"), 30))
        .unwrap();
    let (cert, key) = (tmp.path().join("forged.crt"), tmp.path().join("forged.key"));
    std::fs::write(&cert, &device.cert_pem).unwrap();
    std::fs::write(&key, &device.key_pem).unwrap();
    probe(
        &[&url, "--cert", p(&cert), "--key", p(&key)],
        "CMGService_Untrustedclientcertificate",
    );

    // 2. A token whose header's algorithm is the forged record.
    let header = serde_json::json!({ "alg": format!("ES256{FORGED}"), "typ": "JWT" });
    let token = format!(
        "{}.{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(b"{\"sub\":\"DEVICE-X\"}"),
        base64url(b"not a signature")
    );
    let token_url = url.replace("MUTUALAUTH", "SERVERAUTH");
    probe(&[&token_url, "--token", &token], "CMGService_Invalid_Token");

    // 3. A path with the line breaks a request target can hold, from a trusted device.
    let path_url = format!(
        "https://localhost:{port}/CCM_PROXY_MUTUALAUTH/7\u{85}FORGED\u{2028}FORGED\u{2029}x/SMS_MP/.sms_aut"
    );
    probe(
        &[
            &path_url,
            "--cert",
            p(&lab.join("devices/device-001.crt")),
            "--key",
            p(&lab.join("devices/device-001.key")),
        ],
        "CMGService_BadRoute",
    );

    let written = wait_for(&log, "Refused message ", 3);
    // Everything wrong is gathered, then shown at once with the log and the doctor's report.
    let mut wrong = Vec::new();
    let lines: Vec<&str> = written.split_terminator("\r\n").collect();
    if written.matches('\n').count() != lines.len() {
        wrong.push("a line break inside a line (not ending it with CRLF)".to_string());
    }
    for (n, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("<![LOG[Received response") {
            wrong.push(format!("line {} starts with the forged record", n + 1));
        } else if !line.starts_with("<![LOG[") {
            wrong.push(format!("line {} is not a record of ours: {line:?}", n + 1));
        }
        if line.matches("]LOG]!>").count() != 1 || line.matches("<![LOG[").count() != 1 {
            wrong.push(format!("line {} is not one whole record", n + 1));
        }
        for c in ['\r', '\u{85}', '\u{2028}', '\u{2029}'] {
            if line.contains(c) {
                wrong.push(format!("line {} holds {c:?}", n + 1));
            }
        }
    }
    // Each attack is in the log, escaped where it was sent, so the admin sees it.
    for seen in [
        r"DEVICE-X\r\n&lt;![LOG[Received response https://InternalMP",
        r"ES256\r\n&lt;![LOG[Received response",
        r"7\u{85}FORGED\u{2028}FORGED\u{2029}x",
    ] {
        if !written.contains(seen) {
            wrong.push(format!("{seen:?} is not in the log"));
        }
    }
    // The console says the same, a line per message.
    let shown = std::fs::read_to_string(&console).unwrap();
    for line in shown
        .lines()
        .filter(|l| l.contains("FORGED") || l.contains("Received response"))
    {
        if !line.starts_with("20") {
            wrong.push(format!("a console line not of ours: {line:?}"));
        }
    }

    // The doctor reads every genuine record and names the genuine causes, not the forged one.
    let out = portcullis(&["doctor", "logs", "--json", p(&log)]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["id"].as_str())
        .collect();
    for id in [
        "device-cert-untrusted",
        "token-invalid",
        "gateway-bad-route",
    ] {
        if !ids.contains(&id) {
            wrong.push(format!("doctor logs: no {id} finding"));
        }
    }
    if ids.contains(&"connector-client-cert-required") {
        wrong.push("doctor logs: the forged record was taken for a finding".into());
    }
    if report["files"][0]["skipped"] != 0 {
        wrong.push(format!(
            "doctor logs skipped records: {}",
            report["files"][0]["skipped_examples"]
        ));
    }
    assert!(
        wrong.is_empty(),
        "{}\n\nthe log:\n{written}\ndoctor logs found: {ids:?}",
        wrong.join("\n")
    );
}
