//! A connector `gateways` entry that is a DNS name: an instance set. Three gateway processes on
//! 127.0.0.2, .3 and .4 behind one name; the connector holds its channels to each; one stops
//! and a fourth (.5) starts, and the channels follow within one re-resolution.
//!
//! The name is resolved through a hosts file the test writes: the connector process runs in a
//! mount namespace of its own (`unshare -m`) where that file is bind-mounted over /etc/hosts, so
//! glibc's getaddrinfo (which the connector's resolver calls, and which reads /etc/hosts anew
//! on each lookup) sees what the test wrote, and nothing else on the machine does. The file is
//! rewritten in place (same inode): a rename would leave the bind mount on the old file.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use connector::run::{ConnectorConfig, EndpointConfig};
use gateway::GatewayConfig;

use crate::common::{p, portcullis, text, Child};
use crate::support::*;

const NAME: &str = "gateways.portcullis.test";

/// The hosts file the connector's namespace sees: localhost (its endpoint is there) and the
/// instances `last` of 127.0.0.x behind [`NAME`]; `None`: the name is not in it.
fn write_hosts(path: &Path, last: Option<&[u8]>) {
    let mut hosts = String::from("127.0.0.1 localhost\n");
    for x in last.unwrap_or_default() {
        hosts.push_str(&format!("127.0.0.{x} {NAME}\n"));
    }
    // In place (truncate and write), so the bind mount sees it.
    std::fs::write(path, hosts).unwrap();
}

/// `unshare -m` must work (the test runs as root, as CI does): say so plainly when it does not.
fn require_unshare() {
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", "mount --bind /etc/hosts /etc/hosts"])
        .output();
    match out {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "this test needs `unshare -m` and `mount --bind` (run it as root in a container that allows mount namespaces): {}",
            text(&out)
        ),
        Err(e) => panic!("this test needs the unshare command (util-linux): {e}"),
    }
}

/// A gateway process listening on 127.0.0.`x`:`port`.
fn spawn_gateway(lab: &Path, x: u8, port: u16) -> Child {
    let file = lab.join(format!("gateway-127.0.0.{x}.toml"));
    let mut config = GatewayConfig::lab();
    config.listen = (Ipv4Addr::new(127, 0, 0, x), port).into();
    config.write(&file).unwrap();
    spawn_until(&["gateway", "--config", p(&file)], "Gateway listening").0
}

/// Channels the gateway on 127.0.0.`x` reports in ServiceMetadata (0 when it does not answer),
/// reached by the instance set's name as the connector reaches it.
fn channels_on(lab: &Path, x: u8, port: u16) -> u64 {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(lab.join("ca/root.crt"))
        .arg("--cert")
        .arg(lab.join("devices/device-001.crt"))
        .arg("--key")
        .arg(lab.join("devices/device-001.key"))
        .arg("--resolve")
        .arg(format!("{NAME}:{port}:127.0.0.{x}"))
        .arg(format!(
            "https://{NAME}:{port}/CCM_PROXY_MUTUALAUTH/ServiceMetadata"
        ))
        .output()
        .expect("curl must be installed");
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["channels"].as_u64())
        .unwrap_or(0)
}

/// Polls `check` for at most `limit` (a generous bound: this is "no hang", not a timing).
fn within(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The addresses the connector's `/status` lists as instances of [`NAME`], sorted.
fn instances_in_status(admin: u16) -> Vec<String> {
    let (body, _) = admin_call("GET", &format!("http://127.0.0.1:{admin}/status"), None);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let mut listed: Vec<String> = status["instances"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|i| i["gateway"].as_str().is_some_and(|g| g.starts_with(NAME)))
                .filter_map(|i| i["address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    listed.sort();
    listed
}

fn addresses(last: &[u8], port: u16) -> Vec<String> {
    last.iter().map(|x| format!("127.0.0.{x}:{port}")).collect()
}

struct Connector {
    _process: Child,
    log: PathBuf,
    admin: u16,
}

impl Connector {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn readyz(&self) -> (String, String) {
        admin_call(
            "GET",
            &format!("http://127.0.0.1:{}/readyz", self.admin),
            None,
        )
    }
}

/// The connector in a mount namespace of its own, /etc/hosts there being `hosts`.
fn spawn_connector(lab: &Path, hosts: &Path, port: u16, mp_port: &str) -> Connector {
    let admin = free_port();
    let mut config = ConnectorConfig::lab(
        "c1",
        vec![format!("{NAME}:{port}")],
        vec![EndpointConfig {
            id: 7,
            name: "SMS_MP".into(),
            url: format!("https://localhost:{mp_port}"),
        }],
    );
    config.channels_per_gateway = 2;
    config.channels_follow_gateway_threads = false;
    config.gateway_resolve_secs = 1;
    config.admin_listen = Some(loopback(admin));
    let file = lab.join("connector.toml");
    config.write(&file).unwrap();
    let log = lab.join("SMS_Cloud_ProxyConnector.log");
    let script = format!(
        "mount --bind '{}' /etc/hosts && exec '{}' connector --config '{}' --log '{}'",
        p(hosts),
        env!("CARGO_BIN_EXE_portcullis"),
        p(&file),
        p(&log)
    );
    let process = Child(
        Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    Connector {
        _process: process,
        log,
        admin,
    }
}

#[test]
fn a_connector_holds_channels_to_every_instance_behind_a_name_and_follows_the_set() {
    require_unshare();
    let tmp = tempfile::tempdir().unwrap();
    let lab = tmp.path().join("lab");
    let out = portcullis(&[
        "pki",
        "init",
        "--out",
        p(&lab),
        "--hosts",
        &format!("localhost,127.0.0.1,{NAME}"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let (_mp, mp_port) = spawn_mp(&lab);
    let port = free_port();
    let mut gateways: Vec<(u8, Option<Child>)> = [2, 3, 4]
        .into_iter()
        .map(|x| (x, Some(spawn_gateway(&lab, x, port))))
        .collect();
    let hosts = tmp.path().join("hosts");
    write_hosts(&hosts, Some(&[2, 3, 4]));
    let connector = spawn_connector(&lab, &hosts, port, &mp_port);

    // Every instance holds the connector's two channels, and the admin surface lists each.
    for (x, _) in &gateways {
        assert!(
            within(Duration::from_secs(30), || channels_on(&lab, *x, port) >= 2),
            "127.0.0.{x} never got the connector's channels: {}",
            connector.log()
        );
    }
    assert!(
        within(Duration::from_secs(10), || instances_in_status(
            connector.admin
        ) == addresses(&[2, 3, 4], port)),
        "{:?}",
        instances_in_status(connector.admin)
    );
    let (body, code) = connector.readyz();
    assert_eq!(code, "200", "{body}");
    for x in [2, 3, 4] {
        assert!(body.contains(&format!("127.0.0.{x}:{port}")), "{body}");
    }

    // The name stops resolving: the connector says so and keeps the instances it knows.
    write_hosts(&hosts, None);
    let log = wait_for_text(&connector.log, "keeping the last known", 1);
    assert!(
        log.lines().any(|l| l.contains("keeping the last known")
            && l.contains(&format!("{NAME}:{port}"))
            && l.contains("3 instance(s)")),
        "{log}"
    );
    assert_eq!(
        instances_in_status(connector.admin),
        addresses(&[2, 3, 4], port)
    );

    // .3 stops and .5 starts; the name now gives .2, .4 and .5.
    gateways[1].1 = None;
    gateways.push((5, Some(spawn_gateway(&lab, 5, port))));
    write_hosts(&hosts, Some(&[2, 4, 5]));
    assert!(
        within(Duration::from_secs(30), || channels_on(&lab, 5, port) >= 2),
        "the new instance 127.0.0.5 never got channels: {}",
        connector.log()
    );
    assert!(
        within(Duration::from_secs(10), || instances_in_status(
            connector.admin
        ) == addresses(&[2, 4, 5], port)),
        "{:?}",
        instances_in_status(connector.admin)
    );
    for x in [2, 4] {
        assert!(channels_on(&lab, x, port) >= 2, "127.0.0.{x}");
    }
    let (body, code) = connector.readyz();
    assert_eq!(code, "200", "{body}");
    assert!(!body.contains(&format!("127.0.0.3:{port}")), "{body}");
    assert!(body.contains(&format!("127.0.0.5:{port}")), "{body}");
    let log = connector.log();
    assert!(
        log.lines().any(|l| l.contains(&format!("127.0.0.3:{port}"))
            && l.contains("no longer")
            && l.contains("draining")),
        "{log}"
    );

    // .4 leaves the answer while it still runs, a request through it under way (a body that
    // trickles for 8 s): its channels drain, the request is answered whole, and .4 is left
    // with no channel.
    let slow = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "--cacert"])
        .arg(lab.join("ca/root.crt"))
        .arg("--cert")
        .arg(lab.join("devices/device-001.crt"))
        .arg("--key")
        .arg(lab.join("devices/device-001.key"))
        .arg("--resolve")
        .arg(format!("{NAME}:{port}:127.0.0.4"))
        .arg(format!(
            "https://{NAME}:{port}/CCM_PROXY_MUTUALAUTH/7/portcullis/trickle?chunks=80&bytes=100&every_ms=100"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl must be installed");
    let mut slow = Guard(Some(slow));
    let log = wait_for_text(&connector.log, "/portcullis/trickle", 1);
    assert!(log.contains("/portcullis/trickle"), "{log}");
    write_hosts(&hosts, Some(&[2, 5]));
    let leaving = format!("Gateway instance 127.0.0.4:{port} is no longer in the answer");
    let log = wait_for_text(&connector.log, &leaving, 1);
    assert!(log.contains(&leaving), "{log}");
    assert!(
        slow.0.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the request through .4 ended before .4 was let go: the test shows nothing (a very slow machine?)"
    );
    let answered = slow.0.take().unwrap().wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&answered.stdout),
        "200 8000",
        "the request under way through the let-go instance was not answered whole: {}",
        connector.log()
    );
    assert!(
        within(Duration::from_secs(30), || channels_on(&lab, 4, port) == 0),
        "127.0.0.4 still holds channels: {}",
        connector.log()
    );
    assert_eq!(
        instances_in_status(connector.admin),
        addresses(&[2, 5], port)
    );
    let log = connector.log();
    assert!(
        log.lines().any(|l| l.contains(&format!(
            "to gateway {NAME}:{port}@127.0.0.4 let go: drained"
        ))),
        "{log}"
    );
    // The channel series: the current instances only, the vanished ones' gone.
    let (metrics, _) = admin_call(
        "GET",
        &format!("http://127.0.0.1:{}/metrics", connector.admin),
        None,
    );
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("portcullis_connector_channels{"))
        .collect();
    for x in [2, 5] {
        let labels = format!("gateway=\"{NAME}:{port}\",address=\"127.0.0.{x}:{port}\"");
        assert!(series.iter().any(|l| l.contains(&labels)), "{metrics}");
    }
    assert_eq!(series.len(), 2, "{metrics}");
}

/// A child process killed when dropped unless taken.
struct Guard(Option<std::process::Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
