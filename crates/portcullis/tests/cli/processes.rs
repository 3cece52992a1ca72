//! `portcullis gateway` and `portcullis connector` as processes: two gateways and a restart,
//! verbose logging changed through the admin surface, and a frozen connector.

use std::process::Command;

use crate::common::{p, portcullis};
use crate::support::*;

#[test]
fn two_gateways_one_connector_and_a_gateway_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let (_mp, mp_port) = spawn_mp(&lab);
    let ports = [free_port(), free_port()];
    let configs = [
        gateway_config(&lab, ports[0], |_| {}),
        gateway_config(&lab, ports[1], |_| {}),
    ];
    let mut gateway_a = spawn_until(
        &["gateway", "--config", p(&configs[0])],
        "Gateway listening",
    )
    .0;
    let _gateway_b = spawn_until(
        &["gateway", "--config", p(&configs[1])],
        "Gateway listening",
    )
    .0;
    connector_config(
        &lab.join("connector.toml"),
        &ports,
        &mp_port,
        "connector/store",
        |_| {},
    );
    let log = tmp.path().join("SMS_Cloud_ProxyConnector.log");
    let _connector = spawn_until(
        &[
            "connector",
            "--config",
            p(&lab.join("connector.toml")),
            "--log",
            p(&log),
        ],
        "Maintaining connections...",
    );
    let root = lab.join("ca/root.crt");
    let cert = lab.join("devices/device-001.crt");
    let key = lab.join("devices/device-001.key");
    let probe_through = |port: u16| {
        let url = format!("https://localhost:{port}/CCM_PROXY_MUTUALAUTH/7/SMS_MP/.sms_aut?MPLIST");
        portcullis(&[
            "probe",
            &url,
            "--ca",
            p(&root),
            "--cert",
            p(&cert),
            "--key",
            p(&key),
        ])
    };
    for port in ports {
        assert!(
            wait_for_channels(&lab, port, 2),
            "gateway {port} never got its channels"
        );
        expect_exit(&probe_through(port), 0, "StatusCode= 200 StatusText= OK");
    }

    // Kill gateway A outright; B keeps serving; A comes back on the same port and the
    // connector, never restarted, dials it again.
    drop(gateway_a);
    expect_exit(
        &probe_through(ports[0]),
        1,
        "Code=0x80072efd, Text=ERROR_WINHTTP_CANNOT_CONNECT",
    );
    expect_exit(&probe_through(ports[1]), 0, "StatusCode= 200");
    gateway_a = spawn_until(
        &["gateway", "--config", p(&configs[0])],
        "Gateway listening",
    )
    .0;
    assert!(
        wait_for_channels(&lab, ports[0], 2),
        "the connector did not come back to gateway A"
    );
    expect_exit(&probe_through(ports[0]), 0, "StatusCode= 200");
    drop(gateway_a);
    let written = std::fs::read_to_string(&log).unwrap();
    let gateway_a = format!("to gateway localhost:{}", ports[0]);
    assert!(
        written
            .lines()
            .any(|l| l.contains(&gateway_a)
                && (l.contains("reconnecting") || l.contains("retrying"))),
        "{written}"
    );
}

/// Verbose logging turned on and off against a running connector process, by an admin call
/// and by SIGHUP after editing its configuration: what it writes changes, with no restart.
#[test]
fn verbose_logging_changes_while_the_connector_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let (_mp, mp_port) = spawn_mp(&lab);
    let port = free_port();
    let gateway_admin = free_port();
    let _gateway = spawn_until(
        &[
            "gateway",
            "--config",
            p(&gateway_config(&lab, port, |g| {
                g.worker_threads = Some(3);
                g.admin_listen = Some(loopback(gateway_admin));
            })),
        ],
        "Gateway listening",
    );
    let admin = free_port();
    let config = lab.join("connector.toml");
    let connector_toml = |verbose: bool| {
        connector_config(&config, &[port], &mp_port, "connector/store", |c| {
            c.verbose = verbose;
            c.admin_listen = Some(loopback(admin));
            c.log.file = Some("SMS_Cloud_ProxyConnector.log".into());
            c.log.console = logs::logger::ConsoleSetting::Json;
        })
    };
    connector_toml(false);
    let (connector, first) = spawn_until(
        &["connector", "--config", p(&config)],
        "Maintaining connections...",
    );
    // console = "json": standard output carries one JSON object per line.
    let first: serde_json::Value = serde_json::from_str(first.trim()).unwrap();
    assert_eq!(first["message"], "Maintaining connections...");
    assert_eq!(first["component"], "SMS_CLOUD_PROXYCONNECTOR");
    // The connector holds two channels by default; the gateway's hello says it runs three
    // worker threads, and the connector opens a third.
    assert!(
        wait_for_channels(&lab, port, 3),
        "{}",
        std::fs::read_to_string(lab.join("SMS_Cloud_ProxyConnector.log")).unwrap_or_default()
    );
    // The gateway's status shows its three worker threads, a channel on each.
    let (body, code) = admin_call(
        "GET",
        &format!("http://127.0.0.1:{gateway_admin}/status"),
        None,
    );
    assert_eq!(code, "200", "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let shards = status["shards"].as_array().expect("shards");
    let channels: Vec<u64> = shards
        .iter()
        .map(|s| s["channels"].as_u64().unwrap())
        .collect();
    assert_eq!(channels, [1, 1, 1], "{body}");
    // And its device connections against their caps, refusals and closes counted.
    let connections = &status["connections"];
    assert_eq!(connections["max_connections"], 16_000, "{body}");
    assert_eq!(connections["refused"]["max_connections"], 0, "{body}");
    assert!(connections["closed"]["idle_timeout"].is_u64(), "{body}");
    let (body, code) = admin_call("GET", &format!("http://127.0.0.1:{admin}/status"), None);
    assert_eq!(code, "200", "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["channels_kept"], 3, "{body}");
    let log = lab.join("SMS_Cloud_ProxyConnector.log");
    let probe = || {
        let url = format!("https://localhost:{port}/CCM_PROXY_MUTUALAUTH/7/SMS_MP/.sms_aut?MPLIST");
        let out = portcullis(&[
            "probe",
            &url,
            "--ca",
            p(&lab.join("ca/root.crt")),
            "--cert",
            p(&lab.join("devices/device-001.crt")),
            "--key",
            p(&lab.join("devices/device-001.key")),
        ]);
        expect_exit(&out, 0, "StatusCode= 200");
    };
    const PER_MESSAGE: &str = "; presenting client certificate CN=Portcullis Connector";
    const TRAIL: &str = "Filtered cert count with digital signature: 1";

    // Off: the outcome only.
    probe();
    let text = wait_for_text(&log, "Received response", 1);
    assert!(
        text.contains("Selected client authentication cert"),
        "{text}"
    );
    assert!(!text.contains(TRAIL), "{text}");
    assert!(!text.contains(PER_MESSAGE), "{text}");

    // On by an admin call: the trail of the current choice, then a line per message.
    let base = format!("http://127.0.0.1:{admin}");
    let (body, code) = admin_call("PUT", &format!("{base}/verbose"), Some("on"));
    assert_eq!(code, "200", "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["verbose"], true);
    assert_eq!(status["component"], "SMS_CLOUD_PROXYCONNECTOR");
    assert!(status["client_certificate"]
        .as_str()
        .unwrap()
        .contains("CN=Portcullis Connector"));
    probe();
    let text = wait_for_text(&log, PER_MESSAGE, 1);
    assert!(
        text.contains("Verbose logging turned on (admin call)"),
        "{text}"
    );
    assert!(text.contains(TRAIL), "{text}");
    assert_eq!(text.matches(PER_MESSAGE).count(), 1, "{text}");
    // The gateway told the connector who the device is: its certificate and its address.
    assert!(
        text.contains(": device CN=DEVICE-001, O=Portcullis Lab (")
            && text.contains(") from 127.0.0.1:"),
        "{text}"
    );
    let (body, code) = admin_call("PUT", &format!("{base}/verbose"), Some("loud"));
    assert_eq!(code, "400", "{body}");
    assert!(body.contains("\"loud\" is not a verbose setting"), "{body}");

    // Off by SIGHUP after editing the file: messages get no verbose line any more.
    let hup = || {
        let pid = connector.0.id().to_string();
        // The shell's own kill: no procps needed.
        assert!(Command::new("sh")
            .args(["-c", &format!("kill -HUP {pid}")])
            .status()
            .unwrap()
            .success());
    };
    connector_toml(false);
    hup();
    wait_for_text(&log, "Configuration reloaded from", 1);
    probe();
    let text = wait_for_text(&log, "Received response", 3);
    assert_eq!(text.matches(PER_MESSAGE).count(), 1, "{text}");

    // A broken file is refused and the connector keeps serving with what it had.
    std::fs::write(&config, "verbose = maybe\n").unwrap();
    hup();
    let text = wait_for_text(&log, "Configuration reload refused", 1);
    assert!(text.contains("the running settings stay"), "{text}");
    probe();

    // On again by SIGHUP: the filter runs again and its whole trail is written.
    connector_toml(true);
    hup();
    wait_for_text(&log, "Configuration reloaded from", 2);
    probe();
    let text = wait_for_text(&log, PER_MESSAGE, 2);
    assert_eq!(text.matches(PER_MESSAGE).count(), 2, "{text}");
    assert_eq!(text.matches(TRAIL).count(), 2, "{text}");
}

/// A connector that stops answering without closing anything (frozen with SIGSTOP, as a hung
/// host or a silently dropped network path looks) is noticed by the gateway's PINGs: once one
/// is overdue (`channel_unresponsive_after_ms`) the gateway says so in its log, naming the
/// connector, and a device gets 503 `CMGService_Connectorunresponsive` at once rather than
/// wait on it; its channels leave the registry within the keep-alive bound
/// (`channel_keepalive_timeout_secs`, 5 s of silence), the log naming the cause, and once
/// it runs again it dials back in and says so.
///
/// Before (issue 16 item 3): the channels left 5-10 s after the freeze with no line in the
/// gateway's log, and a request meanwhile waited on the frozen connector.
#[test]
fn a_frozen_connector_leaves_the_gateway_by_its_pings_and_comes_back() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let (_mp, mp_port) = spawn_mp(&lab);
    let port = free_port();
    let config = gateway_config(&lab, port, |_| {});
    let gateway_log = tmp.path().join("gateway.log");
    let _gateway = spawn_until(
        &["gateway", "--config", p(&config), "--log", p(&gateway_log)],
        "Gateway listening",
    )
    .0;
    connector_config(
        &lab.join("connector.toml"),
        &[port],
        &mp_port,
        "connector/store",
        |_| {},
    );
    let connector_log = tmp.path().join("SMS_Cloud_ProxyConnector.log");
    let connector = spawn_until(
        &[
            "connector",
            "--config",
            p(&lab.join("connector.toml")),
            "--log",
            p(&connector_log),
        ],
        "Maintaining connections...",
    )
    .0;
    assert!(wait_for_channels(&lab, port, 2), "no channels at first");
    let pid = libc::pid_t::try_from(connector.0.id()).expect("a pid fits pid_t");
    let signal = |signal: libc::c_int| {
        // SAFETY: signals a child process this test started and still holds.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "signal {signal} to {pid}");
    };
    signal(libc::SIGSTOP);
    let frozen = std::time::Instant::now();
    // One line per channel (2).
    let overdue = wait_for_text(&gateway_log, "keep-alive PING unanswered for", 2);
    if overdue.matches("keep-alive PING unanswered for").count() < 2 {
        signal(libc::SIGCONT);
        panic!("no line said the PINGs went unanswered:\n{overdue}");
    }
    assert!(overdue.contains("Connector c1 channel "), "{overdue}");
    eprintln!(
        "both channels unresponsive {:?} after the freeze",
        frozen.elapsed()
    );
    // Nothing waits on the frozen connector: refused at once, named (unless its channels are
    // already gone, on a slow machine).
    let url = format!("https://localhost:{port}/CCM_PROXY_MUTUALAUTH/7/SMS_MP/.sms_aut?MPLIST");
    let root = lab.join("ca/root.crt");
    let cert = lab.join("devices/device-001.crt");
    let key = lab.join("devices/device-001.key");
    let probed = portcullis(&[
        "probe",
        &url,
        "--ca",
        p(&root),
        "--cert",
        p(&cert),
        "--key",
        p(&key),
    ]);
    let said = String::from_utf8_lossy(&probed.stdout).into_owned()
        + &String::from_utf8_lossy(&probed.stderr);
    if !said.contains("CMGService_Noconnectorchannel") {
        assert!(
            said.contains("StatusCode= 503 StatusText= CMGService_Connectorunresponsive"),
            "{said}"
        );
    }
    let deadline = frozen + std::time::Duration::from_secs(25);
    while channels_at(&lab, port) > 0 {
        if std::time::Instant::now() > deadline {
            signal(libc::SIGCONT);
            panic!("the frozen connector's channels were still registered after 25 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let gone_after = frozen.elapsed();
    signal(libc::SIGCONT);
    eprintln!("channels gone {gone_after:?} after the freeze");
    assert!(
        gone_after >= std::time::Duration::from_secs(4),
        "channels left after {gone_after:?}, before the keep-alive timeout could have struck"
    );
    let lost = wait_for_text(&gateway_log, "keep-alive PINGs unanswered for", 2);
    let lost_lines: Vec<&str> = lost
        .lines()
        .filter(|l| {
            l.contains("Connector c1 lost channel ")
                && l.contains("keep-alive PINGs unanswered for")
        })
        .collect();
    assert!(lost_lines.len() >= 2, "{lost}");
    assert!(
        wait_for_channels(&lab, port, 2),
        "the connector did not dial back in after it ran again"
    );
    let back = wait_for_text(&connector_log, " back after ", 2);
    assert!(back.matches(" back after ").count() >= 2, "{back}");
}
