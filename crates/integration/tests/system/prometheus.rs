//! A real Prometheus (Debian's `prometheus`) scraping a running gateway and connector on
//! loopback, with `deploy/prometheus/alerts.yml` loaded, and a series read back through its
//! query API. The rules' own checks (`promtool check rules`, `promtool test rules`) run here
//! too, as `.ci/run` runs them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::*;

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus")
}

/// A Prometheus server, killed when dropped (a test that fails leaves none behind).
struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `text` for a URL's query string.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Starts Prometheus scraping `targets` every second, with the alert rules, its data in `dir`.
fn start_prometheus(dir: &Path, targets: &[SocketAddr]) -> Prometheus {
    let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - '{}'\nscrape_configs:\n  - job_name: portcullis\n    static_configs:\n      - targets: [{}]\n",
            rules_dir().join("alerts.yml").display(),
            targets.join(", ")
        ),
    )
    .unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus must be installed (Debian's prometheus package; .ci/run installs it)");
    Prometheus { child, addr }
}

/// Waits (at most 60 s) until Prometheus takes connections.
fn wait_listening(prometheus: &mut Prometheus) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(prometheus.addr).is_err() {
        if let Ok(Some(status)) = prometheus.child.try_wait() {
            panic!("prometheus ended: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "prometheus not listening after 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The query API's answer for `query`, as JSON (`data.result`), or None while it has none.
fn query(prometheus: &Prometheus, query: &str) -> Option<serde_json::Value> {
    let path = format!("/api/v1/query?query={}", percent_encoded(query));
    let answer = http_get(prometheus.addr, &path);
    let json: serde_json::Value = serde_json::from_str(&answer.1).ok()?;
    (json["status"] == "success").then(|| json["data"]["result"].clone())
}

/// Reads `path` of Prometheus' API until `wanted` holds of its JSON, for at most 60 s.
fn api_until(
    prometheus: &Prometheus,
    path: &str,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let json: serde_json::Value =
            serde_json::from_str(&http_get(prometheus.addr, path).1).unwrap_or_default();
        if wanted(&json) {
            return json;
        }
        assert!(Instant::now() < deadline, "{path}: after 60 s {json}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Queries until `wanted` holds of the result, for at most 60 s.
fn query_until(
    prometheus: &Prometheus,
    q: &str,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let result = query(prometheus, q);
        if let Some(result) = &result {
            if wanted(result) {
                return result.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{q}: after 60 s Prometheus answers {result:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The first sample's value of a vector result.
fn first_value(result: &serde_json::Value) -> Option<f64> {
    result[0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn a_real_prometheus_scrapes_both_components_and_reads_a_series_back() {
    let mut system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    let [gateway, connector] = system.admin();
    let path = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST");
    for _ in 0..5 {
        let ok = system.probe(&path, Some("device-001"));
        assert_eq!(ok.outcome, probe::Outcome::Success { status: 200 });
    }
    let dir = tempfile::tempdir().unwrap();
    let mut prometheus = start_prometheus(dir.path(), &[gateway, connector]);
    wait_listening(&mut prometheus);

    // Both targets up: scraped, and what they said parsed.
    let up = query_until(&prometheus, "sum(up{job=\"portcullis\"})", |r| {
        first_value(r) == Some(2.0)
    });
    assert_eq!(first_value(&up), Some(2.0));
    // The five requests, read back from Prometheus' store, with their labels.
    let requests = format!(
        "portcullis_gateway_requests_total{{route=\"mutualauth\",endpoint=\"{ENDPOINT}\",status=\"200\",status_text=\"OK\"}}"
    );
    let result = query_until(&prometheus, &requests, |r| first_value(r) == Some(5.0));
    assert_eq!(
        result[0]["metric"]["instance"],
        gateway.to_string(),
        "{result}"
    );
    let selected = query_until(
        &prometheus,
        "portcullis_connector_client_certificate_selected",
        |r| first_value(r).is_some(),
    );
    assert_eq!(first_value(&selected), Some(1.0), "{selected}");
    assert_eq!(selected[0]["metric"]["instance"], connector.to_string());
    // The rules loaded and evaluated: nothing fires on a healthy lab.
    let rules = api_until(&prometheus, "/api/v1/rules?type=alert", |json| {
        let rules = json["data"]["groups"][0]["rules"].as_array();
        rules.is_some_and(|r| r.len() == 6 && r.iter().all(|rule| rule["health"] == "ok"))
    });
    for rule in rules["data"]["groups"][0]["rules"].as_array().unwrap() {
        assert_eq!(rule["state"], "inactive", "{rule}");
    }
    drop(prometheus);
    system.stop();
}

#[test]
fn the_alert_rules_pass_promtool() {
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(rules_dir())
            .output()
            .expect("promtool must be installed (Debian's prometheus package)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
