//! Every command's `--help`, site tokens, and the management point and probe as processes.

use std::process::Command;

use crate::common::{p, portcullis, text, Child};
use crate::support::*;

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["pki", "init", "--help"],
        vec!["doctor", "certs", "--help"],
        vec!["dev", "--help"],
    ] {
        let out = portcullis(&args);
        assert!(out.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: portcullis"));
    }
    let out = portcullis(&["doctor", "certs", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("Exit status: 0 a certificate is selected; 1 none is; 2 bad usage"));
    // Each long-running or configured command's help shows its configuration.
    for (args, needle) in [
        (vec!["gateway", "--help"], "[tokens]"),
        (vec!["connector", "--help"], "admin_listen"),
        (vec!["gateway", "--help"], "metrics_listen"),
        (vec!["connector", "--help"], "metrics_listen"),
        (vec!["analyze", "--help"], "connector_config"),
        (vec!["analyze", "--help"], "--token-command <CMD>"),
        (vec!["mp", "--help"], "client_certificates"),
        (vec!["probe", "--help"], "Exit status"),
        (vec!["token", "issue", "--help"], "--subject"),
        (vec!["token", "keygen", "--help"], "rotation"),
    ] {
        let out = portcullis(&args);
        assert!(out.status.success(), "{args:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains(needle), "{args:?}: {help}");
    }
    // The timeouts along a request, each with its default as the configuration has it, in
    // both components' help.
    let gateway = serde_json::to_value(gateway::GatewayConfig::lab()).expect("JSON");
    let connector = serde_json::to_value(connector::run::ConnectorConfig::lab(
        "c",
        Vec::new(),
        Vec::new(),
    ))
    .expect("JSON");
    let gateway_keys = [
        "handshake_timeout_secs",
        "first_request_timeout_secs",
        "idle_timeout_secs",
        "http2_keepalive_secs",
        "device_idle_timeout_secs",
        "refused_body_drain_timeout_secs",
        "refused_body_drain_bytes",
        "startup_grace_secs",
        "request_timeout_secs",
        "connector_idle_timeout_secs",
    ];
    let gateway_help =
        String::from_utf8_lossy(&portcullis(&["gateway", "--help"]).stdout).into_owned();
    let connector_help =
        String::from_utf8_lossy(&portcullis(&["connector", "--help"]).stdout).into_owned();
    let endpoint_timeout = format!(
        "endpoint_timeout_secs = {}",
        connector["endpoint_timeout_secs"]
    );
    for key in gateway_keys {
        let line = format!("{key} = {}", gateway[key]);
        assert!(
            gateway_help.contains(&line),
            "gateway --help lacks {line}: {gateway_help}"
        );
    }
    for (help, line) in [
        (&gateway_help, &endpoint_timeout),
        (&connector_help, &endpoint_timeout),
        (&connector_help, &"request_timeout_secs".to_string()),
    ] {
        assert!(help.contains(line.as_str()), "{line}: {help}");
    }
}

/// The token commands: a key pair, then a token the gateway's checks accept (ES256 and
/// EdDSA), with bad input named.
#[test]
fn token_keygen_and_issue() {
    let tmp = tempfile::tempdir().unwrap();
    for (dir, flag, alg) in [("es", None, "ES256"), ("ed", Some("--ed25519"), "EdDSA")] {
        let out_dir = tmp.path().join(dir);
        let mut args = vec!["token", "keygen", "--out", p(&out_dir)];
        args.extend(flag);
        let out = portcullis(&args);
        assert!(out.status.success(), "{}", text(&out));
        expect_exit(&portcullis(&args), 2, "already there");
        let key = out_dir.join("token.key");
        let out = portcullis(&[
            "token",
            "issue",
            "--key",
            p(&key),
            "--subject",
            "DEVICE-9",
            "--days",
            "2",
            "--endpoints",
            "7,8",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains("token id (jti): "));
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let settings = gateway::token::TokenSettings {
            keys: vec![out_dir.join("token.pub")],
            issuer: gateway::token::default_issuer(),
            audience: gateway::token::default_audience(),
            revoked: None,
            leeway_secs: 60,
            registration_paths: vec![],
            oidc: Vec::new(),
        };
        let policy = gateway::token::TokenPolicy::load(&settings).unwrap();
        let bearer = format!("Bearer {token}");
        let claims = policy
            .check(
                Some(&bearer),
                8,
                "SMS_MP/.sms_aut",
                time::OffsetDateTime::now_utc(),
            )
            .unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(claims.sub.as_deref(), Some("DEVICE-9"));
        assert_eq!(claims.endpoints, [7, 8]);
    }
    expect_exit(
        &portcullis(&["token", "issue", "--key", "/no/such.key", "--subject", "D"]),
        2,
        "/no/such.key",
    );
    expect_exit(
        &portcullis(&[
            "token",
            "issue",
            "--key",
            p(&tmp.path().join("es/token.pub")),
            "--subject",
            "D",
        ]),
        2,
        "not a private key",
    );
    expect_exit(
        &portcullis(&[
            "token",
            "issue",
            "--key",
            p(&tmp.path().join("es/token.key")),
            "--subject",
            "D",
            "--days",
            "0",
        ]),
        2,
        "--days",
    );
}

#[test]
fn mp_and_probe_as_processes_with_a_location_services_log() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let config = lab.join("mp.toml");
    mp::MpConfig::lab().write(&config).unwrap();
    let mut mp = Child(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["mp", "--config", p(&config)])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    std::io::BufReader::new(mp.0.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let base = first
        .trim()
        .strip_prefix("reference management point listening on https://127.0.0.1:")
        .map(|port| format!("https://localhost:{port}"))
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"));

    let log = tmp.path().join("LocationServices.log");
    let url = format!("{base}/SMS_MP/.sms_aut?SITESIGNCERT");
    let root = lab.join("ca/root.crt");
    let out = portcullis(&["probe", &url, "--ca", p(&root), "--log", p(&log)]);
    expect_exit(
        &out,
        1,
        "[CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= Forbidden",
    );
    let written = std::fs::read_to_string(&log).unwrap();
    let first_line = written.lines().next().unwrap();
    assert!(
        first_line.starts_with(&format!(
            "<![LOG[[CCMHTTP] ERROR: URL={url}, Port={}, Options=31, Code=0, Text=CCM_E_BAD_HTTP_STATUS_CODE]LOG]!><time=\"",
            base.rsplit(':').next().unwrap()
        )),
        "{first_line}"
    );
    assert!(first_line.contains("component=\"LocationServices\" context=\"\" type=\"3\" thread=\""));

    let device = lab.join("devices/device-001.crt");
    let key = lab.join("devices/device-001.key");
    let body = tmp.path().join("mplist.xml");
    let mplist = format!("{base}/SMS_MP/.sms_aut?MPLIST");
    let out = portcullis(&[
        "probe",
        &mplist,
        "--ca",
        p(&root),
        "--cert",
        p(&device),
        "--key",
        p(&key),
        "-o",
        p(&body),
    ]);
    expect_exit(&out, 0, "StatusCode= 200 StatusText= OK");
    assert!(std::fs::read_to_string(&body)
        .unwrap()
        .starts_with("<MPList>"));
}
