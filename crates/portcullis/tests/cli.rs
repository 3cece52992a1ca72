//! The `portcullis` binary driven as SPEC.md's interface table says, as a real process.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{p, portcullis, portcullis_in, start_dev, text, try_lines, Child};

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("the openssl command line must be installed (apt-get install openssl)")
}

/// The process exited with `code` and said `needle` (on stdout or stderr).
fn expect_exit(out: &Output, code: i32, needle: &str) {
    let said = text(out);
    assert_eq!(out.status.code(), Some(code), "{said}");
    assert!(said.contains(needle), "expected {needle:?} in: {said}");
}

/// A lab PKI in `dir/lab`, made by the binary.
fn new_lab(dir: &Path) -> std::path::PathBuf {
    let lab = dir.join("lab");
    let out = portcullis(&["pki", "init", "--out", p(&lab)]);
    assert!(out.status.success(), "{}", text(&out));
    lab
}

#[test]
fn pki_init_then_doctor_certs_selects_the_client_auth_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = tmp.path().join("lab");
    let out = portcullis(&["pki", "init", "--out", p(&lab), "--devices", "3"]);
    assert!(out.status.success(), "{}", text(&out));
    for file in [
        "README.md",
        "ca/root.crt",
        "gateway/server.key",
        "connector/channel.crt",
        "devices/device-003.key",
    ] {
        assert!(lab.join(file).is_file(), "{file} missing");
    }
    let readme = std::fs::read_to_string(lab.join("README.md")).unwrap();
    assert!(
        readme.contains("`connector/store/client-auth.crt`")
            && readme.contains("`devices/device-003.crt`")
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(lab.join("ca/root.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "keys are owner-only");
    }

    let store = lab.join("connector/store");
    let root = lab.join("ca/root.crt");
    let out = portcullis(&[
        "doctor",
        "certs",
        "--store",
        p(&store),
        "--allowed-roots",
        p(&root),
    ]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(
        shown.contains("  Filtered cert count with client auth: 1\n"),
        "{shown}"
    );
    assert!(
        shown.contains("Selected: #1 CN=Portcullis Connector, O=Portcullis Lab (thumbprint "),
        "{shown}"
    );

    let out = portcullis(&[
        "doctor",
        "certs",
        "--store",
        p(&store),
        "--allowed-roots",
        p(&root),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(
        json["selected"]["subject"],
        "CN=Portcullis Connector, O=Portcullis Lab"
    );
    assert_eq!(json["certificates"][0]["fate"], "selected");
    assert_eq!(
        json["trail"][0],
        "Filtered cert count with digital signature: 1"
    );

    // Far in the future the certificate has expired: nothing is selected.
    let out = portcullis(&[
        "doctor",
        "certs",
        "--store",
        p(&store),
        "--allowed-roots",
        p(&root),
        "--at",
        "2099-01-01T00:00:00Z",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("Not time valid cert: CN=Portcullis Connector"));
}

#[test]
fn lab_certificates_verify_with_openssl_for_their_purpose() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = tmp.path();
    let out = portcullis(&[
        "pki",
        "init",
        "--out",
        p(lab),
        "--hosts",
        "cmg.contoso.test,10.1.2.3",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let root = lab.join("ca/root.crt");
    for (cert, purpose) in [
        ("gateway/server.crt", "sslserver"),
        ("mp/server.crt", "sslserver"),
        ("connector/channel.crt", "sslclient"),
        ("connector/store/client-auth.crt", "sslclient"),
        ("devices/device-001.crt", "sslclient"),
    ] {
        let out = openssl(&[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            p(&root),
            p(&lab.join(cert)),
        ]);
        assert!(out.status.success(), "{cert} for {purpose}: {}", text(&out));
    }
    let out = openssl(&[
        "x509",
        "-noout",
        "-ext",
        "subjectAltName",
        "-in",
        p(&lab.join("gateway/server.crt")),
    ]);
    let sans = text(&out);
    assert!(
        sans.contains("DNS:cmg.contoso.test") && sans.contains("IP Address:10.1.2.3"),
        "{sans}"
    );
    // The gateway certificate must not be usable as a device certificate.
    let out = openssl(&[
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        p(&root),
        p(&lab.join("gateway/server.crt")),
    ]);
    assert!(!out.status.success());
}

#[test]
fn pki_init_refuses_to_overwrite_and_bad_hosts() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let before = std::fs::read(lab.join("ca/root.crt")).unwrap();
    let out = portcullis(&["pki", "init", "--out", p(&lab)]);
    expect_exit(&out, 2, "already holds a lab PKI");
    expect_exit(&out, 2, "pass --force to replace it");
    assert_eq!(
        std::fs::read(lab.join("ca/root.crt")).unwrap(),
        before,
        "nothing was replaced"
    );
    assert!(portcullis(&["pki", "init", "--out", p(&lab), "--force"])
        .status
        .success());
    assert_ne!(std::fs::read(lab.join("ca/root.crt")).unwrap(), before);

    let out = portcullis(&[
        "pki",
        "init",
        "--out",
        p(&tmp.path().join("x")),
        "--hosts",
        "good.host,bad host",
    ]);
    expect_exit(&out, 2, "\"bad host\" is not a DNS name or an IP address");
}

#[test]
fn doctor_certs_exits_1_and_explains_when_the_client_auth_certificate_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    // The seed's mistake: the store holds the channel certificate without its key, and a
    // server certificate, but no client authentication certificate with a key.
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::fs::copy(lab.join("connector/channel.crt"), store.join("channel.crt")).unwrap();
    std::fs::copy(lab.join("gateway/server.crt"), store.join("server.crt")).unwrap();
    std::fs::copy(lab.join("gateway/server.key"), store.join("server.key")).unwrap();
    let out = portcullis(&[
        "doctor",
        "certs",
        "--store",
        p(&store),
        "--allowed-roots",
        p(&lab.join("ca/root.crt")),
    ]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains("No private key cert: CN=Portcullis Connector Channel"),
        "{shown}"
    );
    assert!(
        shown.contains("Not client auth cert: CN=Portcullis Gateway"),
        "{shown}"
    );
    assert!(shown.contains("Filtered cert count with client auth: 0"));
    assert!(
        shown.contains("Import the certificate with its private key"),
        "the fix is printed: {shown}"
    );
    assert!(
        shown.contains("Selected: none")
            && shown.contains("CMGConnector_Clientcertificaterequired")
    );
}

#[test]
fn doctor_certs_bad_input_exits_2_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let out = portcullis(&[
        "doctor",
        "certs",
        "--store",
        p(&missing),
        "--allowed-roots",
        p(&missing),
    ]);
    expect_exit(&out, 2, "missing: no such file or directory");

    let out = portcullis(&["doctor", "certs", "--store", p(tmp.path())]);
    assert_eq!(out.status.code(), Some(2), "usage error: {}", text(&out));
    assert!(text(&out).contains("--allowed-roots"));

    let out = portcullis(&[
        "doctor",
        "certs",
        "--store",
        "x",
        "--allowed-roots",
        "y",
        "--at",
        "tomorrow",
    ]);
    expect_exit(&out, 2, "is not an RFC 3339 time");

    let lab = new_lab(tmp.path());
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = portcullis(&[
        "doctor",
        "certs",
        "--store",
        p(&empty),
        "--allowed-roots",
        p(&lab.join("ca/root.crt")),
    ]);
    expect_exit(&out, 2, "the directory holds no certificates");
}

#[test]
fn doctor_certs_reads_a_pfx_with_the_password_from_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let out = openssl(&[
        "pkcs12",
        "-export",
        "-inkey",
        p(&lab.join("connector/store/client-auth.key")),
        "-in",
        p(&lab.join("connector/store/client-auth.crt")),
        "-out",
        p(&store.join("connector.pfx")),
        "-passout",
        "pass:Pa55word",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let root = lab.join("ca/root.crt");
    let args = [
        "doctor",
        "certs",
        "--store",
        p(&store),
        "--allowed-roots",
        p(&root),
        "--pfx-password-env",
        "MY_PFX_PW",
    ];
    let out = portcullis_in(tmp.path(), &args, &[("MY_PFX_PW", "Pa55word")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = portcullis_in(tmp.path(), &args, &[("MY_PFX_PW", "nope")]);
    expect_exit(
        &out,
        2,
        "connector.pfx: wrong PKCS#12 password (it was taken from environment variable MY_PFX_PW)",
    );
}

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

/// Runs `portcullis doctor logs --json` on `paths` and checks its exit status.
fn doctor_logs(paths: &[&Path], code: i32) -> serde_json::Value {
    let mut args = vec!["doctor", "logs", "--json"];
    args.extend(paths.iter().map(|path| p(path)));
    let out = portcullis(&args);
    assert_eq!(out.status.code(), Some(code), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The finding with rule `id` in a `doctor logs --json` report.
fn finding<'a>(report: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == id)
        .unwrap_or_else(|| panic!("no {id} finding in {report}"))
}

/// Our own failing scenarios, as processes writing their logs: an untrusted device
/// certificate, an expired token, and no channel for the endpoint. `doctor logs` on the
/// gateway's and the connector's logs names each cause.
#[test]
fn doctor_logs_names_the_cause_of_our_own_failing_scenarios() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let other = new_lab(&tmp.path().join("elsewhere"));
    let (_mp, mp_port) = spawn_mp(&lab);
    let port = free_port();
    let gateway_log = lab.join("logs/SMS_Cloud_ProxyGateway.log");
    let config = gateway_config(
        &lab,
        port,
        "\n[log]\nfile = \"logs/SMS_Cloud_ProxyGateway.log\"\n\n[tokens]\nkeys = [\"site/token.pub\"]\n",
    );
    let _gateway = spawn_until(&["gateway", "--config", p(&config)], "Gateway listening");
    std::fs::write(
        lab.join("connector.toml"),
        connector_config(
            &[port],
            &mp_port,
            "connector/store",
            "\n[log]\nfile = \"logs/SMS_Cloud_ProxyConnector.log\"\n",
        ),
    )
    .unwrap();
    let connector = spawn_until(
        &["connector", "--config", p(&lab.join("connector.toml"))],
        "Maintaining connections...",
    )
    .0;
    assert!(wait_for_channels(&lab, port, 2));
    let url = format!("https://localhost:{port}/CCM_PROXY_MUTUALAUTH/7/SMS_MP/.sms_aut?MPLIST");
    let root = lab.join("ca/root.crt");
    // A device of `pki` (a lab directory) probes the MUTUALAUTH URL.
    let probe_as = |pki: &Path| {
        portcullis(&[
            "probe",
            &url,
            "--ca",
            p(&root),
            "--cert",
            p(&pki.join("devices/device-001.crt")),
            "--key",
            p(&pki.join("devices/device-001.key")),
        ])
    };
    expect_exit(
        &probe_as(&other),
        1,
        "CMGService_Untrustedclientcertificate",
    );
    let expired = gateway::token::issue(
        &lab.join("site/token.key"),
        &gateway::token::IssueRequest {
            subject: "DEVICE-OLD".into(),
            days: 1,
            endpoints: vec![],
            issuer: gateway::token::default_issuer(),
            audience: gateway::token::default_audience(),
            kind: gateway::token::TokenKind::Device,
            not_before_offset_secs: 0,
        },
        time::OffsetDateTime::now_utc() - time::Duration::days(3),
    )
    .unwrap()
    .0;
    let token_url = url.replace("MUTUALAUTH", "SERVERAUTH");
    expect_exit(
        &portcullis(&["probe", &token_url, "--ca", p(&root), "--token", &expired]),
        1,
        "CMGService_Invalid_Token",
    );
    drop(connector);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while channels_at(&lab, port) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    expect_exit(&probe_as(&lab), 1, "CMGService_Noconnectorchannel");
    wait_for_text(&gateway_log, "CMGService_Noconnectorchannel", 1);

    let report = doctor_logs(&[&lab.join("logs")], 1);
    let untrusted = finding(&report, "device-cert-untrusted");
    assert!(untrusted["evidence"]
        .to_string()
        .contains("SMS_Cloud_ProxyGateway.log"));
    let token = finding(&report, "token-invalid");
    assert!(
        token["cause"].as_str().unwrap().contains("expired"),
        "{token}"
    );
    finding(&report, "no-connector-channel");
    // The text form says the same, with its resolution.
    let out = portcullis(&["doctor", "logs", p(&gateway_log)]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("CMGService_Noconnectorchannel"), "{shown}");
    assert!(shown.contains("Resolution:"), "{shown}");
}

/// Runs `portcullis analyze --json` and checks its exit status.
fn analyze(config: &Path, code: i32) -> serde_json::Value {
    let out = portcullis(&["analyze", "--config", p(config), "--json"]);
    assert_eq!(out.status.code(), Some(code), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `analyze` on `config` and checks it stopped at `step` (the last it ran) with a cause
/// holding `cause` and a fix.
fn assert_stops_at(config: &Path, step: u64, cause: &str) {
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

#[test]
fn analyze_passes_a_healthy_system_and_stops_at_each_broken_hop() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, shown) = start_dev(tmp.path(), &[]);
    let dev = tmp.path().join("portcullis-dev");
    let healthy = std::fs::read_to_string(dev.join("analyze.toml")).unwrap();
    let analysis = analyze(&dev.join("analyze.toml"), 0);
    let steps = analysis["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 8, "{analysis}");
    assert!(steps.iter().all(|s| s["passed"] == true), "{analysis}");

    let gateway = healthy
        .lines()
        .find_map(|l| l.strip_prefix("gateway = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let mp = shown
        .lines()
        .find_map(|l| l.strip_prefix("Reference management point: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let other = new_lab(tmp.path());
    let other_root = p(&other.join("ca/root.crt")).to_string();
    let other_cert = p(&other.join("devices/device-001.crt")).to_string();
    let other_key = p(&other.join("devices/device-001.key")).to_string();
    let cases: Vec<(&str, String, String, u64, &str)> = vec![
        (
            "unresolvable name",
            gateway.clone(),
            "https://no-such-gateway.invalid:8443".into(),
            1,
            "does not resolve",
        ),
        (
            "closed port",
            gateway.clone(),
            format!("https://127.0.0.1:{}", free_port()),
            2,
            "cannot connect",
        ),
        (
            "untrusted gateway certificate",
            "ca/root.crt".into(),
            other_root,
            3,
            "INVALID_CA",
        ),
        (
            "untrusted device",
            "devices/device-001.crt".into(),
            other_cert,
            4,
            "CMGService_Untrustedclientcertificate",
        ),
        (
            "not a gateway",
            gateway.clone(),
            mp,
            4,
            "not as a Portcullis gateway",
        ),
        (
            "unknown endpoint",
            "endpoint = 72057594037927939".into(),
            "endpoint = 12345".into(),
            6,
            "no connector has announced endpoint 12345",
        ),
        (
            "endpoint refusal",
            "?MPLIST".into(),
            "?NOSUCHTHING".into(),
            8,
            "",
        ),
    ];
    for (name, from, to, step, cause) in cases {
        let mut config = healthy.replace(&from, &to);
        if name == "untrusted device" {
            config = config.replace("devices/device-001.key", &other_key);
        }
        assert_ne!(config, healthy, "{name}");
        let file = dev.join(format!("analyze-{}.toml", name.replace(' ', "-")));
        std::fs::write(&file, config).unwrap();
        assert_stops_at(&file, step, cause);
    }
    drop(child);

    // A bad configuration is refused with the key named.
    let file = dev.join("analyze-broken.toml");
    std::fs::write(&file, healthy.replace("https://", "http://")).unwrap();
    expect_exit(
        &portcullis(&["analyze", "--config", p(&file)]),
        2,
        "key `gateway`",
    );
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["pki", "init", "--help"],
        vec!["doctor", "certs", "--help"],
        vec!["dev", "--help"],
    ] {
        let out = portcullis(&args);
        assert!(out.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: portcullis"));
    }
    let out = portcullis(&["doctor", "certs", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("Exit status: 0 a certificate is selected; 1 none is; 2 bad usage"));
    // Each long-running or configured command's help shows its configuration.
    for (args, needle) in [
        (vec!["gateway", "--help"], "[tokens]"),
        (vec!["connector", "--help"], "admin_listen"),
        (vec!["analyze", "--help"], "connector_config"),
        (vec!["mp", "--help"], "client_certificates"),
        (vec!["probe", "--help"], "Exit status"),
        (vec!["token", "issue", "--help"], "--subject"),
        (vec!["token", "keygen", "--help"], "rotation"),
    ] {
        let out = portcullis(&args);
        assert!(out.status.success(), "{args:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains(needle), "{args:?}: {help}");
    }
}

/// The token commands: a key pair, then a token the gateway's checks accept (ES256 and
/// EdDSA), with bad input named.
#[test]
fn token_keygen_and_issue() {
    let tmp = tempfile::tempdir().unwrap();
    for (dir, flag, alg) in [("es", None, "ES256"), ("ed", Some("--ed25519"), "EdDSA")] {
        let out_dir = tmp.path().join(dir);
        let mut args = vec!["token", "keygen", "--out", p(&out_dir)];
        args.extend(flag);
        let out = portcullis(&args);
        assert!(out.status.success(), "{}", text(&out));
        expect_exit(&portcullis(&args), 2, "already there");
        let key = out_dir.join("token.key");
        let out = portcullis(&[
            "token",
            "issue",
            "--key",
            p(&key),
            "--subject",
            "DEVICE-9",
            "--days",
            "2",
            "--endpoints",
            "7,8",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains("token id (jti): "));
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let settings = gateway::token::TokenSettings {
            keys: vec![out_dir.join("token.pub")],
            issuer: gateway::token::default_issuer(),
            audience: gateway::token::default_audience(),
            revoked: None,
            leeway_secs: 60,
            registration_paths: vec![],
        };
        let policy = gateway::token::TokenPolicy::load(&settings).unwrap();
        let bearer = format!("Bearer {token}");
        let claims = policy
            .check(
                Some(&bearer),
                8,
                "SMS_MP/.sms_aut",
                time::OffsetDateTime::now_utc(),
            )
            .unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(claims.sub.as_deref(), Some("DEVICE-9"));
        assert_eq!(claims.endpoints, [7, 8]);
    }
    expect_exit(
        &portcullis(&["token", "issue", "--key", "/no/such.key", "--subject", "D"]),
        2,
        "/no/such.key",
    );
    expect_exit(
        &portcullis(&[
            "token",
            "issue",
            "--key",
            p(&tmp.path().join("es/token.pub")),
            "--subject",
            "D",
        ]),
        2,
        "not a private key",
    );
    expect_exit(
        &portcullis(&[
            "token",
            "issue",
            "--key",
            p(&tmp.path().join("es/token.key")),
            "--subject",
            "D",
            "--days",
            "0",
        ]),
        2,
        "--days",
    );
}

#[test]
fn mp_and_probe_as_processes_with_a_location_services_log() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let config = lab.join("mp.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\ncert = \"mp/server.crt\"\nkey = \"mp/server.key\"\ntrusted_roots = [\"ca/root.crt\"]\n",
    )
    .unwrap();
    let mut mp = Child(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["mp", "--config", p(&config)])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    std::io::BufReader::new(mp.0.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let base = first
        .trim()
        .strip_prefix("reference management point listening on https://127.0.0.1:")
        .map(|port| format!("https://localhost:{port}"))
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"));

    let log = tmp.path().join("LocationServices.log");
    let url = format!("{base}/SMS_MP/.sms_aut?SITESIGNCERT");
    let root = lab.join("ca/root.crt");
    let out = portcullis(&["probe", &url, "--ca", p(&root), "--log", p(&log)]);
    expect_exit(
        &out,
        1,
        "[CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= Forbidden",
    );
    let written = std::fs::read_to_string(&log).unwrap();
    let first_line = written.lines().next().unwrap();
    assert!(
        first_line.starts_with(&format!(
            "<![LOG[[CCMHTTP] ERROR: URL={url}, Port={}, Options=31, Code=0, Text=CCM_E_BAD_HTTP_STATUS_CODE]LOG]!><time=\"",
            base.rsplit(':').next().unwrap()
        )),
        "{first_line}"
    );
    assert!(first_line.contains("component=\"LocationServices\" context=\"\" type=\"3\" thread=\""));

    let device = lab.join("devices/device-001.crt");
    let key = lab.join("devices/device-001.key");
    let body = tmp.path().join("mplist.xml");
    let mplist = format!("{base}/SMS_MP/.sms_aut?MPLIST");
    let out = portcullis(&[
        "probe",
        &mplist,
        "--ca",
        p(&root),
        "--cert",
        p(&device),
        "--key",
        p(&key),
        "-o",
        p(&body),
    ]);
    expect_exit(&out, 0, "StatusCode= 200 StatusText= OK");
    assert!(std::fs::read_to_string(&body)
        .unwrap()
        .starts_with("<MPList>"));
}

/// Starts `portcullis ARGS` and returns it with the first stdout line that contains `marker`.
fn spawn_until(args: &[&str], marker: &str) -> (Child, String) {
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
fn spawn_mp(lab: &Path) -> (Child, String) {
    std::fs::write(
        lab.join("mp.toml"),
        "listen = \"127.0.0.1:0\"\ncert = \"mp/server.crt\"\nkey = \"mp/server.key\"\ntrusted_roots = [\"ca/root.crt\"]\nw3c_log = \"logs/u_ex.log\"\n",
    )
    .unwrap();
    let (mp, line) = spawn_until(&["mp", "--config", p(&lab.join("mp.toml"))], "listening on");
    let port = line.trim().rsplit(':').next().unwrap().to_string();
    (mp, port)
}

/// Writes `lab/gateway-<port>.toml` listening on `port`, with `extra` TOML after the usual
/// keys, and returns its path.
fn gateway_config(lab: &Path, port: u16, extra: &str) -> PathBuf {
    let file = lab.join(format!("gateway-{port}.toml"));
    std::fs::write(
        &file,
        format!("listen = \"127.0.0.1:{port}\"\ncert = \"gateway/server.crt\"\nkey = \"gateway/server.key\"\ntrusted_roots = [\"ca/root.crt\"]\nconnector_roots = [\"ca/connector-roots.crt\"]\nallowed_connectors = [\"Portcullis Connector Channel\"]\n{extra}"),
    )
    .unwrap();
    file
}

/// A connector configuration for gateways on `ports`, endpoint 7 at the management point on
/// `mp_port`, the client certificate store `store`, and `extra` top-level TOML (which may open
/// tables of its own: it goes before `[[endpoints]]`).
fn connector_config(ports: &[u16], mp_port: &str, store: &str, extra: &str) -> String {
    let gateways: Vec<String> = ports.iter().map(|p| format!("\"localhost:{p}\"")).collect();
    format!(
        "connector_id = \"c1\"\ngateways = [{}]\ngateway_roots = [\"ca/root.crt\"]\nchannel_cert = \"connector/channel.crt\"\nchannel_key = \"connector/channel.key\"\nclient_cert_store = \"{store}\"\nallowed_roots = [\"ca/root.crt\"]\nendpoint_roots = [\"ca/root.crt\"]\n{extra}\n[[endpoints]]\nid = 7\nname = \"SMS_MP\"\nurl = \"https://localhost:{mp_port}\"\n",
        gateways.join(", ")
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Channels the gateway on `port` reports in ServiceMetadata to device-001 (0 when it does not
/// answer; anonymous callers are not told).
fn channels_at(lab: &Path, port: u16) -> u64 {
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

fn wait_for_channels(lab: &Path, port: u16, n: u64) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if channels_at(lab, port) >= n {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

#[test]
fn two_gateways_one_connector_and_a_gateway_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let (_mp, mp_port) = spawn_mp(&lab);
    let ports = [free_port(), free_port()];
    let configs = [
        gateway_config(&lab, ports[0], ""),
        gateway_config(&lab, ports[1], ""),
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
    std::fs::write(
        lab.join("connector.toml"),
        connector_config(&ports, &mp_port, "connector/store", ""),
    )
    .unwrap();
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

/// Waits up to 10 s for `path` to hold `needle` `times` times or more; returns the text.
fn wait_for_text(path: &Path, needle: &str, times: usize) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.matches(needle).count() >= times || std::time::Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn admin_call(method: &str, url: &str, body: Option<&str>) -> (String, String) {
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
            p(&gateway_config(
                &lab,
                port,
                &format!("worker_threads = 3\nadmin_listen = \"127.0.0.1:{gateway_admin}\"\n"),
            )),
        ],
        "Gateway listening",
    );
    let admin = free_port();
    let connector_toml = |verbose: bool| {
        connector_config(
            &[port],
            &mp_port,
            "connector/store",
            &format!("verbose = {verbose}\nadmin_listen = \"127.0.0.1:{admin}\"\n\n[log]\nfile = \"SMS_Cloud_ProxyConnector.log\"\nconsole = \"json\"\n"),
        )
    };
    let config = lab.join("connector.toml");
    std::fs::write(&config, connector_toml(false)).unwrap();
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
    std::fs::write(&config, connector_toml(false)).unwrap();
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
    std::fs::write(&config, connector_toml(true)).unwrap();
    hup();
    wait_for_text(&log, "Configuration reloaded from", 2);
    probe();
    let text = wait_for_text(&log, PER_MESSAGE, 2);
    assert_eq!(text.matches(PER_MESSAGE).count(), 2, "{text}");
    assert_eq!(text.matches(TRAIL).count(), 2, "{text}");
}

/// A connector that stops answering without closing anything (frozen with SIGSTOP, as a hung
/// host or a silently dropped network path looks) is noticed by the gateway's PINGs: its
/// channels leave the registry within the keepalive bound (5 s interval + 5 s timeout), and
/// once it runs again it dials back in.
#[test]
fn a_frozen_connector_leaves_the_gateway_by_its_pings_and_comes_back() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = new_lab(tmp.path());
    let (_mp, mp_port) = spawn_mp(&lab);
    let port = free_port();
    let config = gateway_config(&lab, port, "");
    let _gateway = spawn_until(&["gateway", "--config", p(&config)], "Gateway listening").0;
    std::fs::write(
        lab.join("connector.toml"),
        connector_config(&[port], &mp_port, "connector/store", ""),
    )
    .unwrap();
    let connector = spawn_until(
        &["connector", "--config", p(&lab.join("connector.toml"))],
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
    assert!(
        gone_after >= std::time::Duration::from_secs(4),
        "channels left after {gone_after:?}, before any PING could have gone unanswered"
    );
    assert!(
        wait_for_channels(&lab, port, 2),
        "the connector did not dial back in after it ran again"
    );
}
