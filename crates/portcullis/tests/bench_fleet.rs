//! Fleets at small scale, as processes: `bench connections --instances` (connections spread
//! over gateway instances and load-generator processes, a certificate each), `bench load
//! --devices --rate` and `bench compare --devices --rate` (open loop, a certificate and a
//! connection per device). They run, every device is held or answered, the JSON has what it
//! promises. No performance assertions.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{start_dev, text, try_lines};

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(out)))
}

/// 300 connections over 3 instances and 3 load-generator processes (100 each): every one
/// held, a third on each instance, a certificate each; with --request every one answered.
#[test]
fn bench_connections_spreads_devices_over_instances_and_load_generators() {
    for request in [false, true] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_portcullis"));
        command.args([
            "bench",
            "connections",
            "--count",
            "300",
            "--instances",
            "3",
            "--per-process",
            "100",
            "--hold",
            "0.2",
            "--json",
        ]);
        if request {
            command.arg("--request");
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "request {request}: {}", text(&out));
        let report = json(&out);
        assert_eq!(report["opened"], 300, "{report}");
        assert_eq!(report["held"], 300, "{report}");
        assert_eq!(
            report["answered"],
            if request { 300 } else { 0 },
            "{report}"
        );
        assert_eq!(report["devices"], 300, "{report}");
        assert_eq!(report["processes"], 3, "{report}");
        assert!(
            report["rss_per_connection_kib"].as_f64().is_some(),
            "{report}"
        );
        assert!(
            report["opened_per_s"].as_f64().unwrap_or(0.0) > 0.0,
            "{report}"
        );
        let instances = report["instances"].as_array().expect("instances");
        let addresses: Vec<&str> = instances
            .iter()
            .map(|i| i["address"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(addresses.len(), 3, "{report}");
        for (k, address) in addresses.iter().enumerate() {
            assert!(
                address.starts_with(&format!("127.0.0.{}:", k + 1)),
                "{report}"
            );
        }
        for instance in instances {
            assert_eq!(instance["held"], 100, "{report}");
            assert!(
                instance["rss_per_connection_kib"].as_f64().is_some(),
                "{report}"
            );
        }
    }
}

/// More connections per instance than a process may hold is refused by name, before anything
/// starts.
#[test]
fn bench_connections_asks_for_more_instances_past_the_open_file_limit() {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["bench", "connections", "--count", "10000000", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("--instances"), "{}", text(&out));
}

fn lab_of_dev(dir: &Path) -> PathBuf {
    dir.join("portcullis-dev")
}

/// 50 devices at 100 requests/s in all for two seconds (after one of warm-up) against
/// `portcullis dev`:
/// each its own certificate and connection, all connected first, every one answered.
#[test]
fn bench_load_drives_a_fleet_at_a_fixed_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let (_dev, shown) = start_dev(tmp.path(), &[]);
    let url = try_lines(&shown)
        .iter()
        .find(|l| l.starts_with("curl") && l.contains("--cert"))
        .and_then(|l| l.split('\'').nth(1).map(str::to_string))
        .unwrap_or_else(|| panic!("no device URL in dev's output:\n{shown}"));
    let lab = lab_of_dev(tmp.path());
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["bench", "load", &url, "--ca"])
        .arg(lab.join("ca/root.crt"))
        .arg("--issuer-key")
        .arg(lab.join("ca/root.key"))
        .args([
            "--devices",
            "50",
            "--rate",
            "100",
            "--duration",
            "2",
            "--warmup",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let report = json(&out);
    assert_eq!(report["devices"], 50, "{report}");
    assert_eq!(report["connections"], 50, "{report}");
    assert_eq!(report["connected_first"], 50, "{report}");
    assert_eq!(report["answered_connections"], 50, "{report}");
    assert_eq!(report["rate"], 100.0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    for key in ["p50_ms", "p99_ms", "p999_ms"] {
        assert!(report["latency"][key].as_f64().is_some(), "{key}: {report}");
    }

    // --devices needs the key that issues their certificates.
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["bench", "load", &url, "--ca"])
        .arg(lab.join("ca/root.crt"))
        .args(["--devices", "5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--issuer-key"), "{}", text(&out));
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

/// `bench compare --devices 50 --rate 100`: every system it can run, keep-alive only, every
/// device answered in every row, p99.9 and CPU per request reported; nginx sized for the
/// devices.
#[test]
fn bench_compare_runs_a_fleet_at_a_fixed_rate_against_every_system() {
    let mut systems = vec!["direct", "portcullis"];
    if Path::new("/usr/sbin/nginx").exists() {
        systems.push("nginx");
        if rathole_found() {
            systems.push("nginx+rathole");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["bench", "compare", "--json", "--keep", "--systems"])
        .arg(systems.join(","))
        .args([
            "--devices",
            "50",
            "--rate",
            "100",
            "--duration",
            "2",
            "--warmup",
            "1",
        ])
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    let report = json(&out);
    assert_eq!(report["fleet"], true, "{report}");
    assert_eq!(report["rate"], 100.0, "{report}");
    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), systems.len(), "{said}");
    for system in &systems {
        let row = rows
            .iter()
            .find(|r| r["system"] == *system)
            .unwrap_or_else(|| panic!("no {system} row: {said}"));
        assert_eq!(row["mode"], "keepalive", "{row}");
        assert_eq!(row["connections"], 50, "{row}");
        assert_eq!(row["answered_connections"], 50, "{row}");
        assert_eq!(row["errors"], 0, "{row}");
        for key in [
            "p50_ms",
            "p99_ms",
            "p999_ms",
            "cpu_us_per_request",
            "peak_rss_mib",
        ] {
            assert!(row[key].as_f64().is_some(), "{key} in {row}");
        }
    }
    // nginx's upstream pool and worker_connections are sized for the devices.
    let dir = PathBuf::from(report["dir"].as_str().expect("kept dir"));
    if systems.contains(&"nginx") {
        let conf = std::fs::read_to_string(dir.join("nginx-keepalive-50/nginx.conf")).unwrap();
        assert!(conf.contains("keepalive 64;"), "{conf}");
        assert!(conf.contains("keepalive_requests 1000000;"), "{conf}");
        assert!(conf.contains("reuseport"), "{conf}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
