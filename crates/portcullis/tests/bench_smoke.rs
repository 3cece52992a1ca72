//! `portcullis bench load`, `bench compare`, `bench connections` and `bench faults`, briefly, as processes: they run,
//! every request is answered, the JSON has what it promises. No performance assertions.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{start_dev, text, try_lines, Child};

/// `portcullis dev --port 0` in `dir`: the process and the device URL of its "Try:" lines.
fn start_dev_url(dir: &Path) -> (Child, String) {
    let (child, shown) = start_dev(dir, &[]);
    let url = try_lines(&shown)
        .iter()
        .find(|l| l.starts_with("curl") && l.contains("--cert"))
        .and_then(|l| l.split('\'').nth(1).map(str::to_string))
        .unwrap_or_else(|| panic!("no device URL in dev's output:\n{shown}"));
    (child, url)
}

#[test]
fn bench_load_against_dev_in_both_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let (_dev, url) = start_dev_url(tmp.path());
    let lab = tmp.path().join("portcullis-dev");
    for mode in ["keepalive", "handshake"] {
        let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["bench", "load", &url, "--ca"])
            .arg(lab.join("ca/root.crt"))
            .arg("--cert")
            .arg(lab.join("devices/device-001.crt"))
            .arg("--key")
            .arg(lab.join("devices/device-001.key"))
            .args([
                "--mode",
                mode,
                "--connections",
                "4",
                "--duration",
                "0.5",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{mode}: {}", text(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{mode}: not JSON ({e}): {}", text(&out)));
        assert_eq!(report["mode"], mode, "{report}");
        assert!(report["ok"].as_u64().unwrap_or(0) > 0, "{report}");
        assert_eq!(report["errors"], 0, "{report}");
        assert!(report["rps"].as_f64().unwrap_or(0.0) > 0.0, "{report}");
        assert!(report["latency"]["p99_ms"].as_f64().is_some(), "{report}");
    }
}

#[test]
fn bench_connections_holds_idle_connections_before_and_after_a_request() {
    // A certificate per connection by default; --devices shares fewer among them.
    for (request, devices) in [(false, None), (true, Some(3))] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_portcullis"));
        command.args([
            "bench",
            "connections",
            "--count",
            "12",
            "--hold",
            "0.2",
            "--json",
        ]);
        if request {
            command.arg("--request");
        }
        if let Some(devices) = devices {
            command.args(["--devices", &devices.to_string()]);
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "request {request}: {}", text(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out)));
        assert_eq!(report["opened"], 12, "{report}");
        assert_eq!(report["held"], 12, "{report}");
        assert_eq!(report["request_first"], request, "{report}");
        assert_eq!(report["answered"], if request { 12 } else { 0 }, "{report}");
        assert_eq!(report["devices"], devices.unwrap_or(12), "{report}");
        assert!(
            report["rss_per_connection_kib"].as_f64().is_some(),
            "{report}"
        );
    }
}

/// The bench's gateway must not close what it holds: its idle connections outlive the
/// default first-request deadline (10 s) of a gateway facing devices.
#[test]
fn bench_connections_holds_idle_connections_past_the_first_request_deadline() {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "bench",
            "connections",
            "--count",
            "6",
            "--hold",
            "12",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out)));
    assert_eq!(report["opened"], 6, "{report}");
    assert_eq!(report["held"], 6, "{report}");
}

/// rathole where `bench compare` looks for it: on PATH, or target/bench-tools/bin.
fn rathole_found() -> bool {
    let program = PathBuf::from(env!("CARGO_BIN_EXE_portcullis"));
    let in_target = program
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("bench-tools/bin/rathole"));
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("rathole"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    in_target.into_iter().chain(on_path).any(|p| p.is_file())
}

#[test]
fn bench_compare_runs_every_system_it_can_and_reports_each_row() {
    let mut systems = vec!["direct", "portcullis"];
    if Path::new("/usr/sbin/nginx").exists() {
        systems.push("nginx");
        if rathole_found() {
            systems.push("nginx+rathole");
        } else {
            eprintln!(
                "rathole not installed (scripts/install-bench-tools.sh): nginx+rathole not run"
            );
        }
    } else {
        eprintln!("nginx not installed (scripts/install-bench-tools.sh): nginx systems not run");
    }
    let (out, report) = compare_json(
        &systems,
        &["--duration", "0.5", "--warmup", "0.1", "--connections", "4"],
    );
    let said = text(&out);
    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), systems.len() * 2, "{said}");
    for system in &systems {
        for mode in ["keepalive", "handshake"] {
            let row = rows
                .iter()
                .find(|r| r["system"] == *system && r["mode"] == mode)
                .unwrap_or_else(|| panic!("no {system} {mode} row: {said}"));
            assert!(row["rps"].as_f64().unwrap_or(0.0) > 0.0, "{row}");
            assert_eq!(row["errors"], 0, "{row}");
            for key in [
                "p50_ms",
                "p99_ms",
                "cpu_s",
                "cpu_us_per_request",
                "peak_rss_mib",
            ] {
                assert!(row[key].as_f64().is_some(), "{key} in {row}");
            }
            // CPU per request is the run's CPU over the requests it answered.
            let per_request =
                row["cpu_s"].as_f64().unwrap_or(0.0) * 1e6 / row["ok"].as_f64().unwrap_or(1.0);
            let said_per_request = row["cpu_us_per_request"].as_f64().unwrap_or(-1.0);
            assert!(
                (per_request - said_per_request).abs() <= 1e-6 * per_request.max(1.0),
                "{row}"
            );
            let proxy = *system != "direct";
            assert_eq!(
                row["peak_rss_mib"].as_f64().unwrap_or(0.0) > 0.0,
                proxy,
                "{row}"
            );
            if *system == "portcullis" {
                assert_eq!(row["vs_portcullis"].as_f64(), Some(1.0), "{row}");
            }
        }
    }
    assert!(
        report["failed"].as_array().is_some_and(|f| f.is_empty()),
        "{said}"
    );
    // Progress on standard error names each run.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("portcullis keepalive"), "{stderr}");
}

#[test]
fn bench_compare_runs_each_connection_count_and_compares_within_it() {
    let (out, report) = compare_json(
        &["portcullis"],
        &[
            "--modes",
            "keepalive",
            "--connections",
            "2,4",
            "--duration",
            "0.3",
            "--warmup",
            "0",
        ],
    );
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert_eq!(report["connections"], serde_json::json!([2, 4]), "{said}");
    let rows = report["rows"].as_array().expect("rows");
    let counts: Vec<u64> = rows
        .iter()
        .map(|r| r["connections"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(counts, [2, 4], "{said}");
    for row in rows {
        assert_eq!(row["vs_portcullis"].as_f64(), Some(1.0), "{row}");
        assert!(row["ok"].as_u64().unwrap_or(0) > 0, "{row}");
    }
    let shown = String::from_utf8_lossy(&out.stderr);
    assert!(shown.contains("portcullis keepalive 4 devices"), "{shown}");
}

/// `--baseline` runs another binary (here this one again) as portcullis-baseline right after
/// portcullis, compared with it; a baseline that is not there is skipped, named.
#[test]
fn bench_compare_runs_a_baseline_binary_beside_portcullis() {
    let (out, report) = compare_json(
        &["portcullis"],
        &[
            "--baseline",
            env!("CARGO_BIN_EXE_portcullis"),
            "--modes",
            "keepalive",
            "--connections",
            "2",
            "--duration",
            "0.3",
            "--warmup",
            "0",
        ],
    );
    let said = text(&out);
    let rows = report["rows"].as_array().expect("rows");
    let systems: Vec<&str> = rows
        .iter()
        .map(|r| r["system"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(systems, ["portcullis", "portcullis-baseline"], "{said}");
    assert!(rows[1]["ok"].as_u64().unwrap_or(0) > 0, "{said}");
    assert!(rows[1]["vs_portcullis"].as_f64().is_some(), "{said}");

    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "bench",
            "compare",
            "--json",
            "--systems",
            "portcullis-baseline",
        ])
        .args(["--baseline", "/nonexistent/portcullis", "--duration", "0.2"])
        .output()
        .unwrap();
    let said = text(&out);
    assert!(said.contains("skipping portcullis-baseline"), "{said}");
    assert!(said.contains("/nonexistent/portcullis"), "{said}");
}

#[test]
fn bench_compare_names_the_install_script_for_a_missing_tool() {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "bench",
            "compare",
            "--systems",
            "nginx",
            "--modes",
            "keepalive",
        ])
        .args([
            "--nginx",
            "/nonexistent/nginx",
            "--duration",
            "0.2",
            "--json",
        ])
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {said}"));
    assert_eq!(report["rows"].as_array().map(Vec::len), Some(0), "{said}");
    assert_eq!(report["skipped"][0]["system"], "nginx", "{said}");
    assert!(said.contains("skipping nginx"), "{said}");
    assert!(said.contains("scripts/install-bench-tools.sh"), "{said}");
}

#[test]
fn bench_compare_threads_reach_every_process_under_test() {
    let mut systems = vec!["portcullis"];
    if Path::new("/usr/sbin/nginx").exists() {
        systems.push("nginx");
    }
    let (out, report) = compare_json(
        &systems,
        &[
            "--modes",
            "keepalive",
            "--threads",
            "1",
            "--keep",
            "--duration",
            "0.3",
            "--warmup",
            "0",
            "--connections",
            "2",
        ],
    );
    let said = text(&out);
    assert_eq!(report["threads"], 1, "{said}");
    let dir = Path::new(report["dir"].as_str().expect("the kept directory"));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    // Each run has its directory, named after the system, the mode and the connections.
    for config in ["gateway.toml", "connector.toml"] {
        let text = read(&format!("portcullis-keepalive-2/{config}"));
        assert!(text.contains("worker_threads = 1\n"), "{config}: {text}");
    }
    if systems.contains(&"nginx") {
        let text = read("nginx-keepalive-2/nginx.conf");
        assert!(text.contains("worker_processes 1;"), "{text}");
    }
    let _ = std::fs::remove_dir_all(dir);

    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["bench", "compare", "--threads", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--threads"), "{}", text(&out));
}

/// `bench compare --json` of `systems` with `args`: it succeeded, and its report.
fn compare_json(systems: &[&str], args: &[&str]) -> (std::process::Output, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "bench",
            "compare",
            "--json",
            "--systems",
            &systems.join(","),
        ])
        .args(args)
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {said}"));
    (out, report)
}

/// `bench faults`, two faults briefly: the report has each fault's counts, nothing hung, no
/// POST reached the management point twice, and the hanging endpoint was answered with its
/// status text. Whether every bound was met is the drill's own verdict (exit 0 or 1), not
/// asserted here: a noisy machine may miss one.
#[test]
fn bench_faults_reports_each_fault_with_nothing_hung_or_duplicated() {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "bench",
            "faults",
            "--faults",
            "kill-connector,endpoint-hang",
            "--duration",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    let said = text(&out);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{said}");
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {said}"));
    let faults = report["faults"].as_array().expect("faults");
    let names: Vec<&str> = faults.iter().filter_map(|f| f["fault"].as_str()).collect();
    assert_eq!(names, ["kill-connector", "endpoint-hang"], "{said}");
    for fault in faults {
        for key in ["sent", "ok", "transport_errors", "hung", "duplicated"] {
            assert!(fault[key].is_u64(), "{key} in {fault}");
        }
        assert!(fault["named"].is_object(), "{fault}");
        assert!(fault.get("recovery_ms").is_some(), "{fault}");
        assert!(fault["bound_ms"].is_u64(), "{fault}");
        assert!(fault["targets_missed"].is_array(), "{fault}");
        assert!(fault["ok"].as_u64() > Some(0), "{fault}");
        assert_eq!(fault["hung"], 0, "{fault}");
        assert_eq!(fault["duplicated"], 0, "{fault}");
    }
    assert!(
        faults[1]["named"]["CMGConnector_Endpointtimeout"].as_u64() > Some(0),
        "{}",
        faults[1]
    );
    // The exit status follows the verdict.
    let missed = faults
        .iter()
        .any(|f| !f["targets_missed"].as_array().is_some_and(|m| m.is_empty()));
    assert_eq!(out.status.success(), !missed, "{said}");
}

#[test]
fn bench_faults_names_the_faults_when_one_is_unknown() {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "bench",
            "faults",
            "--faults",
            "kill-connector,unplug-the-datacentre",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    for needle in ["unplug-the-datacentre", "stop-connector", "log-disk-full"] {
        assert!(text(&out).contains(needle), "{needle}: {}", text(&out));
    }
}
