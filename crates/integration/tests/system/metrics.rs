//! The admin surfaces' `GET /metrics`, `/healthz` and `/readyz` of a running gateway and
//! connector, scraped over real HTTP: every series the issue names, labels from bounded sets
//! (no device identity, no path, an unknown endpoint id as "other"), Debian's
//! `promtool check metrics` on both outputs, and readiness that follows the channels, the
//! `ready_endpoints` of a reload and the connector's client certificate.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::*;

/// `promtool check metrics` on `text`: its complaints, none when it passes.
fn promtool_check(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (Debian's prometheus package; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The sample lines of `family` (its name followed by `{` or a space).
fn samples<'a>(text: &'a str, family: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

/// The value of the one sample of `family` whose line holds every label in `labels`.
fn value(text: &str, family: &str, labels: &[&str]) -> Option<f64> {
    samples(text, family)
        .into_iter()
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Scrapes until `ready` says the text is what the test waits for (the counts are read from
/// each shard's tally at scrape time, so they are there at once; this bounds the wait for the
/// channels the connector counts as it dials). At most 10 s.
fn scrape_until(addr: std::net::SocketAddr, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, text) = http_get(addr, "/metrics");
        assert_eq!(status, 200, "{text}");
        if ready(&text) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn both_components_expose_every_series_with_bounded_labels_that_promtool_accepts() {
    let mut system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    let [gateway, connector] = system.admin();
    let ok = system.probe(
        &format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST"),
        Some("device-001"),
    );
    assert_eq!(
        ok.outcome,
        probe::Outcome::Success { status: 200 },
        "{:?}",
        ok.lines
    );
    // An endpoint id no connector announced, and a path that is no route: neither the id nor
    // the path may become a label value.
    system.probe(
        "/CCM_PROXY_MUTUALAUTH/424242/secret/path",
        Some("device-001"),
    );
    system.probe("/not/a/route/at/all", Some("device-001"));
    system.probe("/CCM_PROXY_MUTUALAUTH/ServiceMetadata", Some("device-001"));
    // Not TLS at all: a failed handshake.
    {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", system.gateway_port())).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let _ = tcp.read(&mut [0u8; 64]);
    }

    let endpoint = format!("endpoint=\"{ENDPOINT}\"");
    let text = scrape_until(gateway, |t| {
        value(
            t,
            "portcullis_gateway_tls_handshakes_total",
            &["result=\"failed\""],
        ) == Some(1.0)
    });
    for (labels, n) in [
        (
            vec![
                "route=\"mutualauth\"",
                &endpoint,
                "status=\"200\"",
                "status_text=\"OK\"",
            ],
            1.0,
        ),
        (
            vec![
                "route=\"mutualauth\"",
                "endpoint=\"other\"",
                "status=\"404\"",
                "status_text=\"CMGService_Unknownendpoint\"",
            ],
            1.0,
        ),
        (
            vec![
                "route=\"none\"",
                "endpoint=\"none\"",
                "status_text=\"CMGService_BadRoute\"",
            ],
            1.0,
        ),
        (vec!["route=\"metadata\"", "status=\"200\""], 1.0),
    ] {
        assert_eq!(
            value(&text, "portcullis_gateway_requests_total", &labels),
            Some(n),
            "{labels:?} in:\n{text}"
        );
    }
    assert!(
        value(
            &text,
            "portcullis_gateway_request_duration_seconds_count",
            &[&endpoint]
        ) >= Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "portcullis_gateway_channels",
            &["connector=\"lab-connector\""]
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "portcullis_gateway_endpoint_channels", &[&endpoint]),
        Some(2.0),
        "{text}"
    );
    assert!(
        value(
            &text,
            "portcullis_gateway_tls_handshakes_total",
            &["result=\"ok\""]
        ) >= Some(4.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "portcullis_gateway_tls_handshakes_total",
            &["result=\"failed\""]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(value(&text, "portcullis_gateway_device_connections", &[]).is_some());
    for role in ["server", "trusted_root", "connector_root"] {
        let expiry = value(
            &text,
            "portcullis_certificate_expiry_timestamp_seconds",
            &[&format!("role=\"{role}\"")],
        )
        .unwrap_or_else(|| panic!("no {role} certificate in:\n{text}"));
        // The lab's certificates end after now.
        assert!(expiry > time::OffsetDateTime::now_utc().unix_timestamp() as f64);
    }
    assert_eq!(
        value(&text, "portcullis_log_lines_lost_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &text,
            "portcullis_build_info",
            &[&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    // Nothing from the device: its certificate, its path, the id it made up.
    for outside in [
        "device-001",
        "Device 001",
        "secret",
        "not/a/route",
        "424242",
        "SMS_MP",
    ] {
        assert!(!text.contains(outside), "{outside:?} in:\n{text}");
    }
    promtool_check(&text).unwrap_or_else(|e| panic!("promtool: {e}\n{text}"));

    let text = scrape_until(connector, |t| {
        value(
            t,
            "portcullis_connector_requests_total",
            &["status=\"200\""],
        )
        .is_some()
    });
    assert_eq!(
        value(
            &text,
            "portcullis_connector_requests_total",
            &[&endpoint, "status=\"200\"", "status_text=\"OK\""]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        value(
            &text,
            "portcullis_connector_endpoint_duration_seconds_bucket",
            &[&endpoint, "le=\"+Inf\""]
        ) >= Some(1.0),
        "{text}"
    );
    let gateway_name = format!("gateway=\"127.0.0.1:{}\"", system.gateway_port());
    assert!(
        value(&text, "portcullis_connector_channels", &[&gateway_name]) >= Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "portcullis_connector_client_certificate_selected",
            &[]
        ),
        Some(1.0)
    );
    for role in [
        "client",
        "channel",
        "allowed_root",
        "gateway_root",
        "endpoint_root",
    ] {
        assert!(
            value(
                &text,
                "portcullis_certificate_expiry_timestamp_seconds",
                &[&format!("role=\"{role}\"")]
            )
            .is_some(),
            "no {role} certificate in:\n{text}"
        );
    }
    assert!(value(&text, "portcullis_build_info", &[]).is_some());
    promtool_check(&text).unwrap_or_else(|e| panic!("promtool: {e}\n{text}"));

    // The admin surface's rules hold for the new calls too.
    for addr in [gateway, connector] {
        assert_eq!(http_get(addr, "/healthz"), (200, "ok\n".to_string()));
        let out = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Host: evil.example",
            ])
            .arg(format!("http://{addr}/metrics"))
            .output()
            .expect("curl must be installed");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    }
    system.stop();
}

/// The readiness answer, as JSON.
fn readyz(addr: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let (status, body) = http_get(addr, "/readyz");
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, json)
}

#[test]
fn the_gateway_is_ready_once_a_channel_serves_every_ready_endpoint() {
    let mut system = System::builder()
        .gateway(|g| g.ready_endpoints = vec![ENDPOINT, 3456])
        .start();
    assert!(system.wait_for_channels(2));
    let [gateway, connector] = system.admin();
    let (status, body) = readyz(gateway);
    assert_eq!(status, 503, "{body}");
    let missing = body["missing"].to_string();
    assert!(
        missing.contains("endpoint 3456: no connector has announced it"),
        "{body}"
    );
    assert!(!missing.contains(&ENDPOINT.to_string()), "{body}");
    // A reload that leaves out the endpoint nobody serves: ready at once.
    system
        .reload_gateway(|g| g.ready_endpoints = vec![ENDPOINT])
        .unwrap();
    let (status, body) = readyz(gateway);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true);
    assert_eq!(readyz(connector).0, 200, "{}", readyz(connector).1);

    // The connector goes: the endpoint it served has no channel.
    let stopped = system.connector.take().unwrap();
    system.runtime.block_on(stopped.stop());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answer = readyz(gateway);
    while answer.0 != 503 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        answer = readyz(gateway);
    }
    assert_eq!(answer.0, 503, "{}", answer.1);
    assert!(
        answer.1["missing"].to_string().contains(&format!(
            "endpoint {ENDPOINT} (SMS_MP): no connector serving it holds a channel now"
        )),
        "{}",
        answer.1
    );
    // Health is not readiness: the process still serves.
    assert_eq!(http_get(gateway, "/healthz").0, 200);
    system.stop();
}

#[test]
fn a_connector_without_a_client_certificate_or_a_gateway_is_not_ready_and_says_why() {
    // The seed's store (no client authentication certificate), and a second gateway nobody
    // listens on.
    let mut system = System::builder()
        .store("gateway")
        .connector(|c, _| {
            c.gateways.push("127.0.0.1:9".into());
            // A name that resolves to nothing: no instance of it is known.
            c.gateways.push("nowhere.invalid:9".into());
        })
        .start();
    assert!(system.wait_for_channels(2));
    let [gateway, connector] = system.admin();
    let (status, body) = readyz(connector);
    assert_eq!(status, 503, "{body}");
    let missing = body["missing"].to_string();
    assert!(
        missing.contains("gateway 127.0.0.1:9: no channel held"),
        "{body}"
    );
    assert!(
        missing.contains("gateway nowhere.invalid:9: no instance known"),
        "{body}"
    );
    assert!(
        missing.contains("CMGConnector_Clientcertificaterequired")
            && missing.contains("portcullis doctor certs"),
        "{body}"
    );
    assert!(
        !missing.contains(&format!("127.0.0.1:{}", system.gateway_port())),
        "{body}"
    );
    let (_, text) = http_get(connector, "/metrics");
    assert_eq!(
        value(
            &text,
            "portcullis_connector_client_certificate_selected",
            &[]
        ),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "portcullis_connector_channels",
            &["gateway=\"127.0.0.1:9\""]
        ),
        Some(0.0),
        "{text}"
    );
    // The gateway has its channels: ready (no ready_endpoints: any channel will do).
    assert_eq!(readyz(gateway).0, 200);
    system.stop();
}
