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
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, text) = http_get(addr, "/metrics");
        if success(&text, hop) == Some(value) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{hop} never {value} within 60 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
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
