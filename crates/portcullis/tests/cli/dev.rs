//! `portcullis dev`: the whole system on this machine, the lines it prints working when pasted,
//! and its known-failure scenario explained by analyze and doctor logs.

use std::process::Command;

use crate::common::{p, start_dev, text, try_lines};
use crate::support::*;

#[test]
fn dev_brings_the_whole_system_up_and_its_lines_work_when_pasted() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, shown) = start_dev(tmp.path(), &[]);
    assert!(
        shown.contains("Connector: 2 channel(s) to the gateway"),
        "{shown}"
    );
    let tries = try_lines(&shown);
    assert_eq!(tries.len(), 6, "{shown}");
    for line in &tries {
        let run = Command::new("sh")
            .arg("-c")
            .arg(line)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(run.status.success(), "{line}: {}", text(&run));
        if line.starts_with("curl") && line.contains("MPLIST") {
            // The token line is the only SERVERAUTH one, and it carries the lab's token.
            assert_eq!(
                line.contains("CCM_PROXY_SERVERAUTH"),
                line.contains("Authorization: Bearer ey"),
                "{line}"
            );
            assert!(
                String::from_utf8_lossy(&run.stdout).starts_with("<MPList>"),
                "{}",
                text(&run)
            );
        }
        if line.contains("ServiceMetadata") {
            // With the device's certificate: the detail, not only the health.
            assert!(
                String::from_utf8_lossy(&run.stdout).contains("\"connector_id\":\"dev-connector\""),
                "{}",
                text(&run)
            );
        }
    }
    // The admin lines, pasted, turn verbose logging on (the admin surface refuses the form
    // content type curl --data sends by default).
    let admin: Vec<&str> = shown
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl -X PUT"))
        .collect();
    assert_eq!(admin.len(), 2, "{shown}");
    for line in admin {
        let run = Command::new("sh").arg("-c").arg(line).output().unwrap();
        assert!(
            String::from_utf8_lossy(&run.stdout).contains("\"verbose\":true"),
            "{line}: {}",
            text(&run)
        );
    }
    // Each component's status page, at the address printed beside it.
    let pages: Vec<&str> = shown
        .lines()
        .filter_map(|l| l.split("status page ").nth(1))
        .map(|rest| rest.trim_end_matches(')'))
        .collect();
    assert_eq!(pages.len(), 2, "{shown}");
    for (url, component) in pages.into_iter().zip(["gateway", "connector"]) {
        assert!(
            url.starts_with("http://127.0.0.1:") && url.ends_with('/'),
            "{url}"
        );
        let run = Command::new("curl")
            .args(["-sS", "--max-time", "10", url])
            .output()
            .unwrap();
        let page = String::from_utf8_lossy(&run.stdout);
        assert!(
            page.contains(&format!("<title>Portcullis {component}</title>")),
            "{url}: {}",
            text(&run)
        );
    }
    drop(child);
    let root = std::fs::read(tmp.path().join("portcullis-dev/ca/root.crt")).unwrap();
    let (child, shown) = start_dev(tmp.path(), &[]);
    assert!(shown.contains("reusing portcullis-dev"), "{shown}");
    drop(child);
    assert_eq!(
        std::fs::read(tmp.path().join("portcullis-dev/ca/root.crt")).unwrap(),
        root
    );
}

#[test]
fn dev_missing_client_cert_scenario_shows_the_seed_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, shown) = start_dev(tmp.path(), &["--scenario", "missing-client-cert"]);
    let tries = try_lines(&shown);
    let probe = tries
        .iter()
        .find(|l| l.contains(" probe "))
        .expect("a probe line");
    let run = Command::new("sh")
        .arg("-c")
        .arg(probe)
        .current_dir(tmp.path())
        .output()
        .unwrap();
    expect_exit(
        &run,
        1,
        "[CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= CMGConnector_Clientcertificaterequired",
    );
    // The analyzer, with the store beside it, stops at the connector's certificate.
    assert_stops_at(
        &tmp.path().join("portcullis-dev/analyze.toml"),
        7,
        "Filtered cert count with client auth: 0",
    );
    // The probe's LocationServices.log beside the components' logs: doctor logs names the cause
    // with evidence from the device, the connector and the management point's IIS log.
    let logs = tmp.path().join("portcullis-dev/logs");
    let run = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{probe} --log {}",
            p(&logs.join("LocationServices.log"))
        ))
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1), "{}", text(&run));
    let report = doctor_logs(&[&logs], 1);
    let finding = finding(&report, "connector-client-cert-required");
    let evidence = finding["evidence"].to_string();
    for file in [
        "LocationServices.log",
        "SMS_Cloud_ProxyConnector.log",
        "u_ex.log",
    ] {
        assert!(evidence.contains(file), "{file}: {evidence}");
    }
    assert!(
        finding["supporting"]
            .to_string()
            .contains("Filtered cert count with client auth: 0"),
        "{finding}"
    );
    // Far from the connector, the gateway's ServiceMetadata tells the same.
    let config = tmp.path().join("portcullis-dev/analyze.toml");
    let remote = std::fs::read_to_string(&config)
        .unwrap()
        .replace("connector_config = \"connector.toml\"\n", "");
    let remote_file = tmp.path().join("portcullis-dev/analyze-remote.toml");
    std::fs::write(&remote_file, remote).unwrap();
    assert_stops_at(
        &remote_file,
        7,
        "connector dev-connector has no client authentication certificate",
    );
    drop(child);
    let log = std::fs::read_to_string(
        tmp.path()
            .join("portcullis-dev/logs/SMS_Cloud_ProxyConnector.log"),
    )
    .unwrap();
    assert!(
        log.contains("<![LOG[Filtered cert count with client auth: 0]LOG]!>"),
        "{log}"
    );
    assert!(
        log.contains(": HTTP/1.1 403 CMGConnector_Clientcertificaterequired]LOG]!>"),
        "{log}"
    );
    let w3c = std::fs::read_to_string(tmp.path().join("portcullis-dev/logs/u_ex.log")).unwrap();
    assert!(w3c.contains(" 403 7 0 "), "{w3c}");
}
