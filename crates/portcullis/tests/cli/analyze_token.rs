//! `portcullis analyze --token` / `--token-command`: a device presenting a site token on
//! CCM_PROXY_SERVERAUTH instead of a certificate, against a real gateway, connector and
//! management point (processes, TLS). Step 4 is the token's: the gateway's answer decides,
//! the claims are shown as the token states them.

use std::path::Path;

use crate::common::{p, portcullis, text};
use crate::support::*;

/// A device token for DEVICE-001 signed with `lab`'s site key, issued at `issued`.
fn token(lab: &Path, issued: time::OffsetDateTime) -> String {
    gateway::token::issue(
        &lab.join("site/token.key"),
        &gateway::token::IssueRequest {
            subject: "DEVICE-001".into(),
            days: 1,
            endpoints: vec![],
            issuer: gateway::token::default_issuer(),
            audience: gateway::token::default_audience(),
            kind: gateway::token::TokenKind::Device,
            not_before_offset_secs: 0,
        },
        issued,
    )
    .unwrap()
    .0
}

/// Runs `analyze --json` on `config` with `extra`; checks the exit status.
fn analyze_with(config: &Path, extra: &[&str], code: i32) -> serde_json::Value {
    let mut args = vec!["analyze", "--config", p(config), "--json"];
    args.extend_from_slice(extra);
    let out = portcullis(&args);
    assert_eq!(out.status.code(), Some(code), "{extra:?}: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

/// Step 4 of `analysis`, which must be the last that ran and have failed, with a cause
/// holding `cause`.
fn token_step_fails<'a>(analysis: &'a serde_json::Value, cause: &str) -> &'a serde_json::Value {
    let steps = analysis["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 4, "{analysis}");
    let step = &steps[3];
    assert_eq!(step["hop"], "token", "{analysis}");
    assert_eq!(step["passed"], false, "{analysis}");
    assert!(
        step["cause"].as_str().unwrap().contains(cause),
        "{cause:?} in {analysis}"
    );
    assert!(!step["fix"].as_str().unwrap().is_empty(), "{analysis}");
    step
}

#[test]
fn analyze_with_a_token_checks_it_on_serverauth_and_names_the_gateways_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let other = new_lab(&tmp.path().join("elsewhere"));
    let (_mp, mp_port) = spawn_mp(&lab);
    let port = free_port();
    let config = gateway_config(&lab, port, |g| {
        g.tokens = Some(gateway::token::TokenSettings::new(vec![
            "site/token.pub".into()
        ]));
    });
    let _gateway = spawn_until(&["gateway", "--config", p(&config)], "Gateway listening");
    connector_config(
        &lab.join("connector.toml"),
        &[port],
        &mp_port,
        "connector/store",
        |_| {},
    );
    let _connector = spawn_until(
        &["connector", "--config", p(&lab.join("connector.toml"))],
        "Maintaining connections...",
    )
    .0;
    assert!(wait_for_channels(&lab, port, 2));
    // No device certificate in the file: the token is all the device has.
    let file = lab.join("analyze-token.toml");
    std::fs::write(
        &file,
        format!("gateway = \"https://localhost:{port}\"\nca = [\"ca/root.crt\"]\nendpoint = 7\n"),
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc();

    // A good token: every step passes, the token's the request reaching the endpoint.
    let good = token(&lab, now);
    let analysis = analyze_with(&file, &["--token", &good], 0);
    let steps = analysis["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 8, "{analysis}");
    assert!(steps.iter().all(|s| s["passed"] == true), "{analysis}");
    let detail = steps[3]["detail"].as_str().unwrap();
    assert_eq!(steps[3]["hop"], "token", "{analysis}");
    assert!(
        detail.contains("request reached the endpoint (200"),
        "{detail}"
    );
    for shown in [
        "as the token states them, unverified",
        "alg \"ES256\"",
        "iss \"portcullis-site\"",
        "aud \"portcullis-gateway\"",
        "sub \"DEVICE-001\"",
        "tid -",
        "(in 23 h",
    ] {
        assert!(detail.contains(shown), "{shown:?} in {detail}");
    }
    // The same from a command, its output trimmed; the text form says it too.
    let token_file = lab.join("token.txt");
    std::fs::write(&token_file, format!("\n{good}\n\n")).unwrap();
    let command = format!("cat {}", p(&token_file));
    analyze_with(&file, &["--token-command", &command], 0);
    let out = portcullis(&["analyze", "--config", p(&file), "--token-command", &command]);
    assert!(
        text(&out).contains("[4/8] PASS  Device token"),
        "{}",
        text(&out)
    );

    // Expired, and signed by another site's key: the gateway's reason, and what it read.
    let expired = token(&lab, now - time::Duration::days(3));
    let analysis = analyze_with(&file, &["--token", &expired], 1);
    let step = token_step_fails(&analysis, "401 CMGService_Invalid_Token");
    assert!(
        step["cause"]
            .as_str()
            .unwrap()
            .contains("the token expired at"),
        "{analysis}"
    );
    assert!(
        step["detail"].as_str().unwrap().contains(" ago)"),
        "{analysis}"
    );
    let foreign = token(&other, now);
    let analysis = analyze_with(&file, &["--token", &foreign], 1);
    token_step_fails(&analysis, "the signature does not verify");

    // Malformed: named by what is wrong, never sent, never a panic.
    let (header, rest) = good.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    for (bad, cause) in [
        (format!("{header}.{signature}"), "it has 2 part(s)"),
        (
            format!("{header}.@@@.{signature}"),
            "payload (part 2) is not base64url",
        ),
        (
            format!("{header}.bm90IGpzb24.{signature}"),
            "payload (part 2) is not JSON",
        ),
    ] {
        let analysis = analyze_with(&file, &["--token", &bad], 1);
        token_step_fails(&analysis, cause);
    }

    // A command that fails, prints nothing, or takes too long.
    for (command, cause) in [
        ("echo vault sealed >&2; exit 4", "exit status: 4"),
        ("true", "printed nothing"),
    ] {
        let analysis = analyze_with(&file, &["--token-command", command], 1);
        token_step_fails(&analysis, cause);
    }
    std::fs::write(
        &file,
        format!(
            "gateway = \"https://localhost:{port}\"\nca = [\"ca/root.crt\"]\nendpoint = 7\ntimeout_secs = 1\n"
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let analysis = analyze_with(&file, &["--token-command", "sleep 60"], 1);
    token_step_fails(&analysis, "did not finish within 1 s");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "no hang"
    );

    // Both at once is bad usage.
    let out = portcullis(&[
        "analyze",
        "--config",
        p(&file),
        "--token",
        &good,
        "--token-command",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

/// The probe with a token, added to a running `portcullis gateway` process by SIGHUP: its
/// token hop shows on `/metrics` with no restart, and leaves when `[probe]` goes again.
#[test]
fn sighup_starts_and_stops_the_gateways_token_probe() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let (_mp, mp_port) = spawn_mp(&lab);
    let port = free_port();
    let admin = free_port();
    let write = |probe: Option<gateway::ProbeSettings>| {
        gateway_config(&lab, port, |g| {
            g.admin_listen = Some(loopback(admin));
            g.log.file = Some("logs/SMS_Cloud_ProxyGateway.log".into());
            g.tokens = Some(gateway::token::TokenSettings::new(vec![
                "site/token.pub".into()
            ]));
            g.probe = probe;
        })
    };
    let config = write(None);
    let (gateway, _) = spawn_until(&["gateway", "--config", p(&config)], "Gateway listening");
    connector_config(
        &lab.join("connector.toml"),
        &[port],
        &mp_port,
        "connector/store",
        |_| {},
    );
    let _connector = spawn_until(
        &["connector", "--config", p(&lab.join("connector.toml"))],
        "Maintaining connections...",
    )
    .0;
    assert!(wait_for_channels(&lab, port, 2));
    let token_file = lab.join("probe-token.txt");
    std::fs::write(&token_file, token(&lab, time::OffsetDateTime::now_utc())).unwrap();
    let mut probe = gateway::ProbeSettings::with_token(String::new(), vec!["ca/root.crt".into()]);
    probe.token = None;
    probe.token_command = Some(format!("cat {}", p(&token_file)));
    probe.interval_secs = 10;
    let hup = || {
        // The shell's own kill: no procps needed.
        let pid = gateway.0.id();
        let sent = std::process::Command::new("sh")
            .args(["-c", &format!("kill -HUP {pid}")])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    let metrics = || admin_call("GET", &format!("http://127.0.0.1:{admin}/metrics"), None).0;
    let line = "portcullis_probe_success{endpoint=\"7\",hop=\"token\"} 1";
    assert!(!metrics().contains("portcullis_probe_"));
    write(Some(probe));
    hup();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !metrics().contains(line) {
        assert!(std::time::Instant::now() < deadline, "{}", metrics());
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let log = lab.join("logs/SMS_Cloud_ProxyGateway.log");
    let text = wait_for_text(&log, "Continuous analysis ([probe]) started", 1);
    assert!(
        text.contains(
            "with a token from the command `cat` (token_command; its arguments are not logged)"
        ),
        "the log names the credentials' program, not the token nor the arguments: {text}"
    );
    write(None);
    hup();
    wait_for_text(&log, "Continuous analysis ([probe]) stopped", 1);
    assert!(!metrics().contains("portcullis_probe_"), "{}", metrics());
}
