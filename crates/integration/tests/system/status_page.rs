//! The status page at `/` of a running gateway and connector, loaded in a real browser
//! (Debian's chromium, headless, as a process): the channel tables, a refusal with the
//! doctor's cause and fix in the rendered DOM, a certificate subject full of markup shown as
//! text and never as elements, and a screenshot (`docs/status-page.png` with
//! `PORTCULLIS_UPDATE_SCREENSHOT=1`).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use pki::lab::{LabCa, LeafSpec};
use testkit::*;

/// Runs chromium headless with `args` on `url`, bounded to 90 s. Nothing leaves loopback:
/// every name but localhost and 127.0.0.1 resolves to nothing, any other request would go to a proxy on a
/// closed loopback port, and the background services (updates, sync, safe browsing...) are off.
fn chromium(profile: &Path, args: &[&str], url: &str) -> Output {
    let binary = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("chromium must be installed (Debian's chromium; .ci/run installs it)");
    let mut child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-sync",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--no-pings",
            "--metrics-recording-only",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
            "--proxy-server=127.0.0.1:9",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "chromium took over 90 s on {url}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

/// The DOM chromium built from `url`, serialised.
fn dump_dom(profile: &Path, url: &str) -> String {
    let out = chromium(profile, &["--dump-dom"], url);
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    // Its D-Bus complaints (no bus in a container) are noise; the rest says why a page failed.
    let said: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains("dbus"))
        .map(str::to_string)
        .collect();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "{url}: {:?}, {dom}\n{}",
        out.status,
        said.join("\n")
    );
    dom
}

/// Text as a browser serialises a text node: `&`, `<` and `>` escaped.
fn as_dom_text(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The `<table id="...">` element of `dom`, whole.
fn table<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("<table id=\"{id}\""))
        .unwrap_or_else(|| panic!("no table {id} in:\n{dom}"));
    let end = dom[start..]
        .find("</table>")
        .map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

#[test]
fn the_status_page_shows_channels_and_a_refusal_explained_in_a_real_browser() {
    let mut system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    // A device whose certificate names itself and its issuer in markup: refused, and its
    // issuer quoted in the refusal's reason.
    let hostile_root = "<img src=x onerror=alert(1)> Root";
    let hostile = LabCa::new_root(hostile_root, 1)
        .unwrap()
        .issue(&LeafSpec::client_auth("<script>alert(2)</script>", 30))
        .unwrap();
    std::fs::write(system.path("devices/hostile.crt"), &hostile.cert_pem).unwrap();
    std::fs::write(system.path("devices/hostile.key"), &hostile.key_pem).unwrap();
    let path = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST");
    let refused = system.probe(&path, Some("hostile"));
    assert_eq!(
        refused.outcome,
        probe::Outcome::HttpError {
            status: 403,
            text: "CMGService_Untrustedclientcertificate".into()
        }
    );
    for _ in 0..3 {
        let ok = system.probe(&path, Some("device-001"));
        assert_eq!(ok.outcome, probe::Outcome::Success { status: 200 });
    }
    let [gateway, connector] = system.admin();
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{gateway}/");

    let dom = dump_dom(profile.path(), &url);
    assert!(dom.contains("<title>Portcullis gateway</title>"), "{dom}");
    // The channels: per connector, and each of this instance's.
    let connectors = table(&dom, "connectors");
    assert!(
        connectors.contains("<td>lab-connector</td><td>2</td><td class=\"good\">yes</td>"),
        "{connectors}"
    );
    let channels = table(&dom, "channels");
    assert_eq!(
        channels.matches("<td>lab-connector</td>").count(),
        2,
        "{channels}"
    );
    let endpoints = table(&dom, "endpoints");
    assert!(
        endpoints.contains(&format!(
            "<td>{ENDPOINT}</td><td>SMS_MP</td><td>2</td><td class=\"good\">yes</td>"
        )),
        "{endpoints}"
    );
    // The refusal, with the doctor's cause and fix, and its rate beside the answers'.
    let explained = runtime::activity::explain(403, "CMGService_Untrustedclientcertificate")
        .expect("the doctor explains it");
    let refusals = table(&dom, "refusals");
    assert!(
        refusals.contains("CMGService_Untrustedclientcertificate"),
        "{refusals}"
    );
    assert!(
        refusals.contains(&as_dom_text(&explained.title)),
        "{refusals}"
    );
    assert!(
        refusals.contains(&as_dom_text(explained.resolution.trim())),
        "{refusals}"
    );
    let rates = table(&dom, "rates");
    assert!(
        rates.contains("CMGService_Untrustedclientcertificate"),
        "{rates}"
    );
    assert!(
        rates.contains(
            "<td class=\"bad\">CMGService_Untrustedclientcertificate</td><td class=\"num\">1</td>"
        ),
        "{rates}"
    );
    assert!(
        rates.contains("<td>OK</td><td class=\"num\">3</td>"),
        "{rates}"
    );
    // The issuer's name is text on the page, never an element: the browser built no <img>
    // and no <script> from it.
    assert!(
        refusals.contains(&as_dom_text(hostile_root)),
        "the issuer is not quoted: {refusals}"
    );
    assert!(!dom.contains("<img"), "{dom}");
    assert!(!dom.contains("<script"), "{dom}");
    assert!(table(&dom, "certificates").contains("days"), "{dom}");

    // The connector's page: its channels per gateway instance.
    let out = chromium(
        profile.path(),
        &["--dump-dom"],
        &format!("http://{connector}/"),
    );
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    let gateways = table(&dom, "channels");
    // Each instance: the entry, the address (here the entry is the address), the channels.
    let port = system.gateway_port();
    assert!(
        gateways.contains(&format!(
            "<td>127.0.0.1:{port}</td><td>127.0.0.1:{port}</td><td class=\"good\">"
        )),
        "{gateways}"
    );
    assert!(
        dom.contains("<dd id=\"readiness\" class=\"good\">ready</dd>"),
        "{dom}"
    );

    // A screenshot, as README shows it.
    let shot = profile.path().join("status-page.png");
    let out = chromium(
        profile.path(),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1100,1500",
        ],
        &url,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 20_000, "a blank page? {} bytes", png.len());
    if std::env::var_os("PORTCULLIS_UPDATE_SCREENSHOT").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/status-page.png");
        std::fs::write(&docs, &png).unwrap();
    }
    system.stop();
}
