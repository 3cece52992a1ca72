//! `portcullis analyze` and `portcullis doctor logs` on systems broken on purpose: each names
//! the hop, the cause and the fix.

use std::path::Path;

use crate::common::{p, portcullis, start_dev, text};
use crate::support::*;

/// Our own failing scenarios, as processes writing their logs: an untrusted device
/// certificate, an expired token, and no channel for the endpoint. `doctor logs` on the
/// gateway's and the connector's logs names each cause.
#[test]
fn doctor_logs_names_the_cause_of_our_own_failing_scenarios() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let other = new_lab(&tmp.path().join("elsewhere"));
    let (_mp, mp_port) = spawn_mp(&lab);
    let port = free_port();
    let gateway_log = lab.join("logs/SMS_Cloud_ProxyGateway.log");
    let config = gateway_config(&lab, port, |g| {
        g.log.file = Some("logs/SMS_Cloud_ProxyGateway.log".into());
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
        |c| c.log.file = Some("logs/SMS_Cloud_ProxyConnector.log".into()),
    );
    let connector = spawn_until(
        &["connector", "--config", p(&lab.join("connector.toml"))],
        "Maintaining connections...",
    )
    .0;
    assert!(wait_for_channels(&lab, port, 2));
    let url = format!("https://localhost:{port}/CCM_PROXY_MUTUALAUTH/7/SMS_MP/.sms_aut?MPLIST");
    let root = lab.join("ca/root.crt");
    // A device of `pki` (a lab directory) probes the MUTUALAUTH URL.
    let probe_as = |pki: &Path| {
        portcullis(&[
            "probe",
            &url,
            "--ca",
            p(&root),
            "--cert",
            p(&pki.join("devices/device-001.crt")),
            "--key",
            p(&pki.join("devices/device-001.key")),
        ])
    };
    expect_exit(
        &probe_as(&other),
        1,
        "CMGService_Untrustedclientcertificate",
    );
    let expired = gateway::token::issue(
        &lab.join("site/token.key"),
        &gateway::token::IssueRequest {
            subject: "DEVICE-OLD".into(),
            days: 1,
            endpoints: vec![],
            issuer: gateway::token::default_issuer(),
            audience: gateway::token::default_audience(),
            kind: gateway::token::TokenKind::Device,
            not_before_offset_secs: 0,
        },
        time::OffsetDateTime::now_utc() - time::Duration::days(3),
    )
    .unwrap()
    .0;
    let token_url = url.replace("MUTUALAUTH", "SERVERAUTH");
    expect_exit(
        &portcullis(&["probe", &token_url, "--ca", p(&root), "--token", &expired]),
        1,
        "CMGService_Invalid_Token",
    );
    drop(connector);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while channels_at(&lab, port) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    expect_exit(&probe_as(&lab), 1, "CMGService_Noconnectorchannel");
    wait_for_text(&gateway_log, "CMGService_Noconnectorchannel", 1);

    let report = doctor_logs(&[&lab.join("logs")], 1);
    let untrusted = finding(&report, "device-cert-untrusted");
    assert!(untrusted["evidence"]
        .to_string()
        .contains("SMS_Cloud_ProxyGateway.log"));
    let token = finding(&report, "token-invalid");
    assert!(
        token["cause"].as_str().unwrap().contains("expired"),
        "{token}"
    );
    finding(&report, "no-connector-channel");
    // The text form says the same, with its resolution.
    let out = portcullis(&["doctor", "logs", p(&gateway_log)]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("CMGService_Noconnectorchannel"), "{shown}");
    assert!(shown.contains("Resolution:"), "{shown}");
}

#[test]
fn analyze_passes_a_healthy_system_and_stops_at_each_broken_hop() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, shown) = start_dev(tmp.path(), &[]);
    let dev = tmp.path().join("portcullis-dev");
    let healthy = std::fs::read_to_string(dev.join("analyze.toml")).unwrap();
    let analysis = analyze(&dev.join("analyze.toml"), 0);
    let steps = analysis["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 8, "{analysis}");
    assert!(steps.iter().all(|s| s["passed"] == true), "{analysis}");

    let gateway = healthy
        .lines()
        .find_map(|l| l.strip_prefix("gateway = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let mp = shown
        .lines()
        .find_map(|l| l.strip_prefix("Reference management point: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let other = new_lab(tmp.path());
    let other_root = p(&other.join("ca/root.crt")).to_string();
    let other_cert = p(&other.join("devices/device-001.crt")).to_string();
    let other_key = p(&other.join("devices/device-001.key")).to_string();
    let cases: Vec<(&str, String, String, u64, &str)> = vec![
        (
            "unresolvable name",
            gateway.clone(),
            "https://no-such-gateway.invalid:8443".into(),
            1,
            "does not resolve",
        ),
        (
            "closed port",
            gateway.clone(),
            format!("https://127.0.0.1:{}", free_port()),
            2,
            "cannot connect",
        ),
        (
            "untrusted gateway certificate",
            "ca/root.crt".into(),
            other_root,
            3,
            "INVALID_CA",
        ),
        (
            "untrusted device",
            "devices/device-001.crt".into(),
            other_cert,
            4,
            "CMGService_Untrustedclientcertificate",
        ),
        (
            "not a gateway",
            gateway.clone(),
            mp,
            4,
            "not as a Portcullis gateway",
        ),
        (
            "unknown endpoint",
            "endpoint = 72057594037927939".into(),
            "endpoint = 12345".into(),
            6,
            "no connector has announced endpoint 12345",
        ),
        (
            "endpoint refusal",
            "?MPLIST".into(),
            "?NOSUCHTHING".into(),
            8,
            "",
        ),
    ];
    for (name, from, to, step, cause) in cases {
        let mut config = healthy.replace(&from, &to);
        if name == "untrusted device" {
            config = config.replace("devices/device-001.key", &other_key);
        }
        assert_ne!(config, healthy, "{name}");
        let file = dev.join(format!("analyze-{}.toml", name.replace(' ', "-")));
        std::fs::write(&file, config).unwrap();
        assert_stops_at(&file, step, cause);
    }
    drop(child);

    // A bad configuration is refused with the key named.
    let file = dev.join("analyze-broken.toml");
    std::fs::write(&file, healthy.replace("https://", "http://")).unwrap();
    expect_exit(
        &portcullis(&["analyze", "--config", p(&file)]),
        2,
        "key `gateway`",
    );
}
