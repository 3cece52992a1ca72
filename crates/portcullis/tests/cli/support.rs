//! What several command tests share: a lab made by the binary, exit codes and output,
//! processes started and waited for, configuration files for them, and the admin surface.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use connector::run::{ConnectorConfig, EndpointConfig};
use gateway::GatewayConfig;

use crate::common::{p, portcullis, text, Child};

pub fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("the openssl command line must be installed (apt-get install openssl)")
}

/// The process exited with `code` and said `needle` (on stdout or stderr).
pub fn expect_exit(out: &Output, code: i32, needle: &str) {
    let said = text(out);
    assert_eq!(out.status.code(), Some(code), "{said}");
    assert!(said.contains(needle), "expected {needle:?} in: {said}");
}

/// A lab PKI in `dir/lab`, made by the binary.
pub fn new_lab(dir: &Path) -> std::path::PathBuf {
    let lab = dir.join("lab");
    let out = portcullis(&["pki", "init", "--out", p(&lab)]);
    assert!(out.status.success(), "{}", text(&out));
    lab
}

/// Runs `portcullis doctor logs --json` on `paths` and checks its exit status.
pub fn doctor_logs(paths: &[&Path], code: i32) -> serde_json::Value {
    let mut args = vec!["doctor", "logs", "--json"];
    args.extend(paths.iter().map(|path| p(path)));
    let out = portcullis(&args);
    assert_eq!(out.status.code(), Some(code), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The finding with rule `id` in a `doctor logs --json` report.
pub fn finding<'a>(report: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == id)
        .unwrap_or_else(|| panic!("no {id} finding in {report}"))
}

/// Runs `portcullis analyze --json` and checks its exit status.
pub fn analyze(config: &Path, code: i32) -> serde_json::Value {
    let out = portcullis(&["analyze", "--config", p(config), "--json"]);
    assert_eq!(out.status.code(), Some(code), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `analyze` on `config` and checks it stopped at `step` (the last it ran) with a cause
/// holding `cause` and a fix.
pub fn assert_stops_at(config: &Path, step: u64, cause: &str) {
    let analysis = analyze(config, 1);
    let steps = analysis["steps"].as_array().unwrap();
    let failed = steps.iter().find(|s| s["passed"] == false);
    let number = failed.map_or(0, |s| s["number"].as_u64().unwrap());
    assert_eq!(number, step, "{}: {analysis}", config.display());
    assert_eq!(steps.len() as u64, step, "{analysis}");
    let failed = &steps[step as usize - 1];
    assert!(
        failed["cause"].as_str().unwrap().contains(cause),
        "{}: {analysis}",
        config.display()
    );
    assert!(!failed["fix"].as_str().unwrap().is_empty(), "{analysis}");
}

/// Starts `portcullis ARGS` and returns it with the first stdout line that contains `marker`.
pub fn spawn_until(args: &[&str], marker: &str) -> (Child, String) {
    use std::io::BufRead;
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let mut reader = std::io::BufReader::new(stdout);
    let mut found = String::new();
    for _ in 0..100 {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if line.contains(marker) {
            found = line;
            break;
        }
    }
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    (child, found)
}

/// The reference management point as a process on a free port: the process and its port.
pub fn spawn_mp(lab: &Path) -> (Child, String) {
    let mut config = mp::MpConfig::lab();
    config.w3c_log = Some("logs/u_ex.log".into());
    config.write(&lab.join("mp.toml")).unwrap();
    let (mp, line) = spawn_until(&["mp", "--config", p(&lab.join("mp.toml"))], "listening on");
    let port = line.trim().rsplit(':').next().unwrap().to_string();
    (mp, port)
}

/// Writes `lab/gateway-<port>.toml` listening on `port`: the lab's gateway, changed by `change`.
/// keys, and returns its path.
pub fn gateway_config(lab: &Path, port: u16, change: impl FnOnce(&mut GatewayConfig)) -> PathBuf {
    let file = lab.join(format!("gateway-{port}.toml"));
    let mut config = GatewayConfig::lab();
    config.listen = loopback(port);
    change(&mut config);
    config.write(&file).unwrap();
    file
}

/// 127.0.0.1 and `port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Writes `file` (in the lab): a connector for gateways on `ports`, endpoint 7 at the
/// management point on `mp_port`, the client certificate store `store`, changed by `change`.
pub fn connector_config(
    file: &Path,
    ports: &[u16],
    mp_port: &str,
    store: &str,
    change: impl FnOnce(&mut ConnectorConfig),
) {
    let mut config = ConnectorConfig::lab(
        "c1",
        ports.iter().map(|p| format!("localhost:{p}")).collect(),
        vec![EndpointConfig {
            id: 7,
            name: "SMS_MP".into(),
            url: format!("https://localhost:{mp_port}"),
        }],
    );
    config.client_cert_store = store.into();
    change(&mut config);
    config.write(file).unwrap();
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Channels the gateway on `port` reports in ServiceMetadata to device-001 (0 when it does not
/// answer; anonymous callers are not told).
pub fn channels_at(lab: &Path, port: u16) -> u64 {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(lab.join("ca/root.crt"))
        .arg("--cert")
        .arg(lab.join("devices/device-001.crt"))
        .arg("--key")
        .arg(lab.join("devices/device-001.key"))
        .arg(format!(
            "https://localhost:{port}/CCM_PROXY_MUTUALAUTH/ServiceMetadata"
        ))
        .output()
        .expect("curl must be installed");
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["channels"].as_u64())
        .unwrap_or(0)
}

pub fn wait_for_channels(lab: &Path, port: u16, n: u64) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if channels_at(lab, port) >= n {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

/// Waits up to 10 s for `path` to hold `needle` `times` times or more; returns the text.
pub fn wait_for_text(path: &Path, needle: &str, times: usize) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.matches(needle).count() >= times || std::time::Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub fn admin_call(method: &str, url: &str, body: Option<&str>) -> (String, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "5",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ]);
    // As JSON: the admin surface refuses the form content type curl --data sends by default.
    if let Some(body) = body {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data",
            &format!("\"{body}\""),
        ]);
    }
    let out = cmd.arg(url).output().expect("curl must be installed");
    let all = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = all.rsplit_once('\n').unwrap_or((&all, ""));
    (body.to_string(), code.to_string())
}
