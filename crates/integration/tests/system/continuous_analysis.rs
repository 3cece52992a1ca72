//! The connection analyzer, continuously (`[probe]`): the gateway checks every hop against
//! itself on a schedule, exports each hop's last result, and a broken hop shows at the next
//! run, on `/metrics`, in the log and on the status page, before any device asks.

use std::time::{Duration, Instant};

use gateway::ProbeSettings;
use testkit::*;

/// The value of `portcullis_probe_success` for `hop` of the lab's endpoint, once present.
fn success(text: &str, hop: &str) -> Option<f64> {
    let wanted = format!("endpoint=\"{ENDPOINT}\",hop=\"{hop}\"");
    text.lines()
        .find(|l| l.starts_with("portcullis_probe_success{") && l.contains(&wanted))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Scrapes the gateway until `hop` has `value`, for at most 60 s (a run every 10 s).
fn wait_for(addr: std::net::SocketAddr, hop: &str, value: f64) -> String {
    wait_until(addr, &format!("{hop} {value}"), |text| {
        success(text, hop) == Some(value)
    })
}

/// Scrapes the gateway until `done` says so, for at most 60 s; `what` names it.
fn wait_until(addr: std::net::SocketAddr, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, text) = http_get(addr, "/metrics");
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "never {what} within 60 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `[probe]` table with device-001's certificate, every `interval_secs`, for `endpoints`.
fn with_certificate(interval_secs: u64, endpoints: Vec<u64>) -> ProbeSettings {
    let mut probe = ProbeSettings::new(
        "devices/device-001.crt".into(),
        "devices/device-001.key".into(),
        vec!["ca/root.crt".into()],
    );
    probe.interval_secs = interval_secs;
    probe.endpoints = endpoints;
    probe
}

#[test]
fn the_gateway_checks_every_hop_itself_and_a_broken_one_shows_at_the_next_run() {
    let mut system = System::builder()
        .gateway(|g| {
            let mut probe = ProbeSettings::new(
                "devices/device-001.crt".into(),
                "devices/device-001.key".into(),
                vec!["ca/root.crt".into()],
            );
            probe.interval_secs = 10;
            g.probe = Some(probe);
        })
        .start();
    assert!(system.wait_for_channels(2));
    let [gateway, _] = system.admin();
    // Every hop passes, the last one a real request through the channel to the endpoint.
    let text = wait_for(gateway, "request", 1.0);
    for hop in [
        "dns",
        "tcp",
        "tls",
        "device_auth",
        "service_metadata",
        "channel",
        "connector_certificate",
    ] {
        assert_eq!(success(&text, hop), Some(1.0), "{hop}:\n{text}");
    }
    assert!(
        text.contains(&format!(
            "portcullis_probe_duration_seconds{{endpoint=\"{ENDPOINT}\",hop=\"request\"}}"
        )),
        "{text}"
    );

    // The connector goes: the next run stops at the channel, before any device asked.
    let connector = system.connector.take().unwrap();
    system.runtime.block_on(connector.stop());
    let text = wait_for(gateway, "channel", 0.0);
    assert_eq!(success(&text, "service_metadata"), Some(1.0), "{text}");
    assert_eq!(success(&text, "request"), None, "not reached:\n{text}");
    assert_logged(
        &system.gateway_log,
        &format!("Continuous analysis of endpoint {ENDPOINT}: step 6"),
    );
    let (_, page) = http_get(gateway, "/");
    let table = page
        .split("<table id=\"probe\"")
        .nth(1)
        .expect("the probe table on the status page");
    assert!(
        table.contains("<td>6 channel</td><td class=\"bad\">failed</td>"),
        "{table}"
    );
    assert!(
        table.contains("<td>8 request</td><td>not reached</td>"),
        "{table}"
    );
    system.stop();
}

/// `[probe]` follows reloads: added, it starts; changed, the new schedule applies; removed,
/// the task stops and its series leave `/metrics` (a last value kept would keep an alert
/// firing, or quiet, for a check nobody runs; `absent()` sees them gone), and the status page
/// drops the table.
#[test]
fn a_reload_starts_changes_and_stops_the_continuous_analysis() {
    let mut system = System::builder().start();
    assert!(system.wait_for_channels(2));
    let [gateway, _] = system.admin();
    let (_, text) = http_get(gateway, "/metrics");
    assert!(!text.contains("portcullis_probe_success"), "{text}");

    // Added by a reload: it runs, without a restart.
    let said = system
        .reload_gateway(|g| g.probe = Some(with_certificate(10, vec![])))
        .unwrap();
    assert!(said.contains("probe: started"), "{said}");
    wait_for(gateway, "request", 1.0);
    assert_logged(
        &system.gateway_log,
        "Continuous analysis ([probe]) started: every 10 s",
    );

    // Changed: another endpoint (one nobody announced) at another interval.
    let said = system
        .reload_gateway(|g| g.probe = Some(with_certificate(20, vec![99])))
        .unwrap();
    assert!(said.contains("probe: changed"), "{said}");
    let text = wait_until(gateway, "endpoint 99 checked, the lab's dropped", |text| {
        text.contains("portcullis_probe_success{endpoint=\"99\",hop=\"channel\"} 0")
            && success(text, "request").is_none()
    });
    let lab_endpoint = format!("endpoint=\"{ENDPOINT}\"");
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("portcullis_probe_") && l.contains(&lab_endpoint)),
        "{text}"
    );
    assert_logged(
        &system.gateway_log,
        "Continuous analysis ([probe]) changed: interval_secs 10 -> 20, endpoints every announced -> [99]",
    );

    // Removed: the series go at once, and no run brings them back.
    let said = system.reload_gateway(|g| g.probe = None).unwrap();
    assert!(said.contains("probe: stopped"), "{said}");
    assert_logged(&system.gateway_log, "Continuous analysis ([probe]) stopped");
    let gone = || {
        let (_, text) = http_get(gateway, "/metrics");
        assert!(!text.contains("portcullis_probe_"), "{text}");
        let (_, page) = http_get(gateway, "/");
        assert!(!page.contains("<table id=\"probe\""), "{page}");
    };
    gone();
    // Longer than a changed schedule's first run (5 s) and a run of every hop.
    std::thread::sleep(Duration::from_secs(12));
    gone();
    system.stop();
}

/// `[probe]` with a site token instead of a certificate: step 4 is the token's (`hop="token"`),
/// checked by the real request on CCM_PROXY_SERVERAUTH; every hop passes and the status page
/// shows it. A token the gateway refuses shows there with the gateway's reason.
#[test]
fn the_continuous_analysis_checks_a_token_when_given_one() {
    // The site's key pair made before the gateway starts, so [probe] can hold a token.
    let site = tempfile::tempdir().unwrap();
    let (private, public) = pki::lab::token_key_pair(true).unwrap();
    std::fs::write(site.path().join("token.key"), private).unwrap();
    std::fs::write(site.path().join("token.pub"), public).unwrap();
    let issue = |issued: time::OffsetDateTime| {
        gateway::token::issue(
            &site.path().join("token.key"),
            &gateway::token::IssueRequest {
                subject: "PROBE-DEVICE".into(),
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
    };
    let good = issue(time::OffsetDateTime::now_utc());
    let public = site.path().join("token.pub");
    let mut system = System::builder()
        .gateway(|g| {
            g.tokens = Some(gateway::token::TokenSettings::new(vec![public]));
            let mut probe = ProbeSettings::with_token(good, vec!["ca/root.crt".into()]);
            probe.interval_secs = 10;
            g.probe = Some(probe);
        })
        .start();
    assert!(system.wait_for_channels(2));
    let [gateway, _] = system.admin();
    let text = wait_for(gateway, "request", 1.0);
    assert_eq!(success(&text, "token"), Some(1.0), "{text}");
    assert_eq!(success(&text, "device_auth"), None, "{text}");
    let (_, page) = http_get(gateway, "/");
    let table = page
        .split("<table id=\"probe\"")
        .nth(1)
        .expect("the probe table on the status page");
    assert!(
        table.contains("<td>4 token</td><td class=\"good\">passed</td>"),
        "{table}"
    );
    assert!(
        table.contains("sub &quot;PROBE-DEVICE&quot;") || table.contains("sub \"PROBE-DEVICE\""),
        "{table}"
    );

    // An expired token from the command: the token hop fails with the gateway's reason.
    let expired = issue(time::OffsetDateTime::now_utc() - time::Duration::days(3));
    let file = system.path("probe-token.txt");
    std::fs::write(&file, &expired).unwrap();
    let command = format!("cat {}", file.display());
    system
        .reload_gateway(|g| {
            let mut probe = g.probe.clone().unwrap();
            probe.token = None;
            probe.token_command = Some(command);
            g.probe = Some(probe);
        })
        .unwrap();
    wait_for(gateway, "token", 0.0);
    assert_logged(
        &system.gateway_log,
        &format!("Continuous analysis of endpoint {ENDPOINT}: step 4 (Device token"),
    );
    assert_logged(&system.gateway_log, "the token expired at");
    system.stop();
}
