//! `metrics_listen`: the read-only health and metrics surface of `portcullis gateway` and
//! `portcullis connector`, as processes, on 127.0.0.9 (any address would do: it is not the
//! admin surface's loopback-only rule that lets these tests reach it). It answers the probes
//! and the scrape to a Host the admin surface refuses, and nothing else.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use connector::run::{ConnectorConfig, EndpointConfig};
use gateway::GatewayConfig;

use crate::common::p;
use crate::support::*;

/// The name a Service gives a pod in Kubernetes, which is no loopback name.
const SERVICE_HOST: &str = "portcullis-gateway.portcullis.svc:9100";

/// A free port on 127.0.0.9.
fn metrics_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.9:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `curl -X METHOD` (HEAD: `-I`) with `Host: host`: the body and the status code ("000": no
/// answer, such as a refused connection).
fn call(method: &str, url: &str, host: &str) -> (String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"]);
    cmd.args(["-H", &format!("Host: {host}")]);
    match method {
        "HEAD" => cmd.arg("-I"),
        _ => cmd.args(["-X", method]),
    };
    // Bodies a caller could send: never read, and they change nothing.
    if matches!(method, "PUT" | "POST") {
        cmd.args(["-H", "Content-Type: application/json", "--data", "\"on\""]);
    }
    let out = cmd.arg(url).output().expect("curl must be installed");
    let all = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = all.rsplit_once('\n').unwrap_or((&all, ""));
    (body.to_string(), code.to_string())
}

/// GET `url` with `Host: SERVICE_HOST` until it answers `code` (at most 30 s); the last answer.
fn wait_for(url: &str, code: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = call("GET", url, SERVICE_HOST);
        if answer.1 == code || Instant::now() > deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn metrics_listen_answers_the_probes_and_the_scrape_to_any_host() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let (_mp, mp_port) = spawn_mp(&lab);
    let (port, admin) = (free_port(), free_port());
    let (gateway_metrics, connector_metrics) = (metrics_addr(), metrics_addr());
    let config = gateway_config(&lab, port, |g| {
        g.admin_listen = Some(loopback(admin));
        g.metrics_listen = Some(gateway_metrics);
    });
    let _gateway = spawn_until(&["gateway", "--config", p(&config)], "Gateway listening");
    let url = |path: &str| format!("http://{gateway_metrics}{path}");

    let (body, code) = wait_for(&url("/healthz"), "200");
    assert_eq!((body.trim(), code.as_str()), ("ok", "200"), "/healthz");
    let (_, code) = call("HEAD", &url("/healthz"), SERVICE_HOST);
    assert_eq!(code, "200", "HEAD /healthz");
    // The admin surface refuses that Host: a web page's name rebound to it.
    let (body, code) = call(
        "GET",
        &format!("http://127.0.0.1:{admin}/healthz"),
        SERVICE_HOST,
    );
    assert_eq!(
        code, "403",
        "the admin surface with Host {SERVICE_HOST}: {body}"
    );
    // No connector yet: not ready, and the same JSON as the admin surface's.
    let (body, code) = call("GET", &url("/readyz"), SERVICE_HOST);
    assert_eq!(code, "503", "/readyz with no connector: {body}");
    let (admin_body, _) = admin_call("GET", &format!("http://127.0.0.1:{admin}/readyz"), None);
    assert_eq!(body, admin_body, "/readyz on both surfaces");
    let (body, code) = call("GET", &url("/metrics"), SERVICE_HOST);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("portcullis_build_info"), "{body}");
    assert!(
        body.contains("portcullis_gateway_tls_handshakes_total"),
        "{body}"
    );

    connector_config(
        &lab.join("connector.toml"),
        &[port],
        &mp_port,
        "connector/store",
        |c| c.metrics_listen = Some(connector_metrics),
    );
    let _connector = spawn_until(
        &["connector", "--config", p(&lab.join("connector.toml"))],
        "Maintaining connections...",
    );
    let (body, code) = wait_for(&url("/readyz"), "200");
    assert_eq!(
        code, "200",
        "/readyz once the connector holds channels: {body}"
    );
    let connector_url = |path: &str| format!("http://{connector_metrics}{path}");
    let (body, code) = wait_for(&connector_url("/readyz"), "200");
    assert_eq!(code, "200", "the connector's /readyz: {body}");
    let (body, code) = call("GET", &connector_url("/metrics"), SERVICE_HOST);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("portcullis_build_info"), "{body}");
    assert!(body.contains("portcullis_connector_channels"), "{body}");
}

#[test]
fn metrics_listen_refuses_everything_else_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let (port, admin, metrics) = (free_port(), free_port(), metrics_addr());
    let write = |verbose: bool| {
        gateway_config(&lab, port, |g| {
            g.verbose = verbose;
            g.admin_listen = Some(loopback(admin));
            g.metrics_listen = Some(metrics);
        })
    };
    let config = write(false);
    let _gateway = spawn_until(&["gateway", "--config", p(&config)], "Gateway listening");
    let url = |path: &str| format!("http://{metrics}{path}");
    let (_, code) = wait_for(&url("/healthz"), "200");
    assert_eq!(code, "200", "the surface never answered");
    // The file now says verbose = true: a reload would turn it on, and so would PUT /verbose.
    write(true);
    for (method, path, refused) in [
        ("POST", "/reload", "404"),
        ("PUT", "/verbose", "404"),
        ("POST", "/verbose", "404"),
        ("GET", "/status", "404"),
        ("GET", "/", "404"),
        ("GET", "/metrics/", "404"),
        ("POST", "/readyz", "405"),
        ("PUT", "/metrics", "405"),
        ("DELETE", "/healthz", "405"),
    ] {
        for host in [SERVICE_HOST, "127.0.0.1"] {
            let (body, code) = call(method, &url(path), host);
            assert_eq!(code, refused, "{method} {path} (Host {host}): {body}");
            assert!(
                body.contains("GET /healthz, GET /readyz, GET /metrics"),
                "{method} {path}: {body}"
            );
        }
    }
    let status = |what: &str| {
        let (body, code) = admin_call("GET", &format!("http://127.0.0.1:{admin}/status"), None);
        assert_eq!(code, "200", "{body}");
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(status["verbose"].is_boolean(), "{what}: {status}");
        status["verbose"] == true
    };
    assert!(
        !status("after the calls"),
        "verbose is on: the read-only surface reloaded or set it"
    );
    // The admin surface's reload does read the file: the check above can see a reload.
    let (body, code) = admin_call("POST", &format!("http://127.0.0.1:{admin}/reload"), None);
    assert_eq!(code, "200", "{body}");
    assert!(status("after the admin surface's reload"));
}

#[test]
fn metrics_listen_must_be_an_address_of_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("config.toml");
    // Written as a typed configuration, then loaded as the binary loads it.
    let load_gateway = |config: &GatewayConfig| {
        config.write(&file).unwrap();
        GatewayConfig::load(&file).map(|_| ())
    };
    let taken: SocketAddr = "127.0.0.1:9441".parse().unwrap();
    for key in ["listen", "channel_listen", "admin_listen"] {
        let mut config = GatewayConfig::lab();
        config.listen = "0.0.0.0:8443".parse().unwrap();
        config.channel_listen = Some("0.0.0.0:9443".parse().unwrap());
        config.admin_listen = Some("127.0.0.1:9442".parse().unwrap());
        match key {
            "listen" => config.listen = taken,
            "channel_listen" => config.channel_listen = Some(taken),
            _ => config.admin_listen = Some(taken),
        }
        config.metrics_listen = Some(taken);
        let error = load_gateway(&config)
            .expect_err("metrics_listen on another key's address")
            .to_string();
        assert!(
            error.contains("key `metrics_listen`") && error.contains(&format!("is also {key}:")),
            "{key}: {error}"
        );
        // Its own address loads.
        config.metrics_listen = Some("0.0.0.0:9100".parse().unwrap());
        load_gateway(&config).unwrap_or_else(|e| panic!("metrics_listen on 0.0.0.0:9100: {e}"));
    }
    let mut config = ConnectorConfig::lab(
        "c1",
        vec!["localhost:443".into()],
        vec![EndpointConfig {
            id: 7,
            name: "SMS_MP".into(),
            url: "https://localhost:8443".into(),
        }],
    );
    config.admin_listen = Some(taken);
    config.metrics_listen = Some(taken);
    config.write(&file).unwrap();
    let error = ConnectorConfig::load(&file)
        .expect_err("the connector's metrics_listen on admin_listen")
        .to_string();
    assert!(
        error.contains("key `metrics_listen`") && error.contains("is also admin_listen:"),
        "{error}"
    );
}

/// SIGTERM: the gateway drains the request under way (at most 10 s), and its health and
/// metrics surface answers all along, as the probes and the last scrape need (as a sidecar's
/// would, stopped after the gateway).
#[test]
fn metrics_listen_answers_through_the_drain() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let (_mp, mp_port) = spawn_mp(&lab);
    let (port, metrics) = (free_port(), metrics_addr());
    let config = gateway_config(&lab, port, |g| g.metrics_listen = Some(metrics));
    let (mut gateway, _) = spawn_until(&["gateway", "--config", p(&config)], "Gateway listening");
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
    );
    assert!(wait_for_channels(&lab, port, 2), "no channels");
    // A device's request whose answer takes 4 s: 20 chunks, 200 ms apart.
    let mut device = crate::common::Child(
        Command::new("curl")
            .args(["-sS", "--max-time", "30", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg("--cacert")
            .arg(lab.join("ca/root.crt"))
            .arg("--cert")
            .arg(lab.join("devices/device-001.crt"))
            .arg("--key")
            .arg(lab.join("devices/device-001.key"))
            .arg(format!(
                "https://localhost:{port}/CCM_PROXY_MUTUALAUTH/7/portcullis/trickle?chunks=20&bytes=100&every_ms=200"
            ))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("curl must be installed"),
    );
    let url = |path: &str| format!("http://{metrics}{path}");
    let deadline = Instant::now() + Duration::from_secs(10);
    // Under way once its answer's head is counted (the body follows for 4 s).
    let answering = |metrics: &str| {
        metrics.lines().any(|l| {
            l.starts_with("portcullis_gateway_requests_total{") && l.contains("endpoint=\"7\"")
        })
    };
    while !answering(&call("GET", &url("/metrics"), SERVICE_HOST).0) {
        assert!(
            Instant::now() < deadline,
            "the device's request never began"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = libc::pid_t::try_from(gateway.0.id()).expect("a pid fits pid_t");
    // SAFETY: signals a child process this test started and still holds.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM");
    // The drain has begun once the device port takes no connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(loopback(port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the gateway never stopped accepting"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (body, code) = call("GET", &url("/healthz"), SERVICE_HOST);
    let (metrics_body, metrics_code) = call("GET", &url("/metrics"), SERVICE_HOST);
    assert!(
        gateway.0.try_wait().unwrap().is_none(),
        "the gateway was to be still draining"
    );
    if let Some(ended) = device.0.try_wait().unwrap() {
        let mut said = String::new();
        if let Some(mut stdout) = device.0.stdout.take() {
            std::io::Read::read_to_string(&mut stdout, &mut said).unwrap();
        }
        panic!("the device's request was to be still under way: {ended}, {said}");
    }
    assert_eq!(code, "200", "/healthz during the drain: {body}");
    assert_eq!(
        metrics_code, "200",
        "/metrics during the drain: {metrics_body}"
    );
    // The request is answered whole, and the gateway ends.
    let deadline = Instant::now() + Duration::from_secs(20);
    while gateway.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the gateway did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = std::mem::replace(
        &mut device.0,
        Command::new("true").spawn().expect("true runs"),
    )
    .wait_with_output()
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "the device's answer"
    );
}
