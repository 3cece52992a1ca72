//! Tokens from an OpenID Connect provider no one here wrote: panva's `oidc-provider` (npm,
//! tests/oidc-provider/, installed with `npm ci` by .ci/run), run with HTTPS on loopback with
//! a lab certificate. Its client-credentials grant issues JWT access tokens; the gateway finds
//! the provider's keys by discovery, accepts its tokens, refuses each wrong one naming the
//! check, follows a key rotation without a restart, keeps its cached keys while the provider
//! is down, and answers 503 CMGService_Tokenkeysunavailable while it never had any.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use gateway::token::oidc::OidcSettings;
use pki::lab::{LabCa, LeafSpec};
use probe::Outcome;
use testkit::*;

use crate::support::*;

const AUDIENCE: &str = "api://portcullis-gateway";
const OTHER_AUDIENCE: &str = "api://another-app";

fn provider_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc-provider")
}

/// Installs the pinned oidc-provider (`npm ci`, package-lock.json) unless it is there: the
/// tests then need nothing but `cargo test` (and the npm registry once). Test processes run
/// at once take turns on a lock directory, so one installs and the others find it done.
fn install_provider() {
    let dir = provider_dir();
    let installed = || dir.join("node_modules/oidc-provider/package.json").exists();
    if installed() {
        return;
    }
    // A directory as the lock (made atomically; File::lock is newer than the workspace's
    // rust-version). Whoever waits, waits for the install, at most as long as it may take.
    let lock = dir.join(".install.lock");
    let deadline = Instant::now() + Duration::from_secs(660);
    while std::fs::create_dir(&lock).is_err() {
        if installed() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "another test's npm ci did not finish within 660 s (or left {} behind: remove it)",
            lock.display()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    struct Unlock(PathBuf);
    impl Drop for Unlock {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _unlock = Unlock(lock);
    if installed() {
        return;
    }
    eprintln!(
        "installing the test OpenID provider: npm ci --prefix {}",
        dir.display()
    );
    let mut npm = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--prefix"])
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("npm runs (node 20 or later and npm are needed for the OIDC tests; .ci/run installs them)");
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = npm.try_wait().expect("npm's status") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = npm.kill();
            panic!("npm ci took over 600 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success() && installed(),
        "`npm ci --prefix {}` failed ({status}): install the test OpenID provider by hand (needs node 20 or later and the npm registry)",
        dir.display()
    );
}

/// A running oidc-provider; killed when dropped.
struct Provider {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Provider {
    /// Starts the provider on `port` (0: any) signing with the first of `keys` and publishing
    /// all of them (made in `dir`/keys on first use, kept across restarts).
    fn start(dir: &Path, port: u16, keys: &str) -> Provider {
        install_provider();
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        let mut child = Command::new("node")
            .arg(provider_dir().join("provider.mjs"))
            .env("OIDC_PORT", port.to_string())
            .env("OIDC_CERT", dir.join("provider.crt"))
            .env("OIDC_KEY", dir.join("provider.key"))
            .env("OIDC_KEYS_DIR", dir.join("keys"))
            .env("OIDC_KEYS", keys)
            .env("OIDC_AUDIENCE", AUDIENCE)
            .env("OIDC_OTHER_AUDIENCE", OTHER_AUDIENCE)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node runs (node 20 or later is needed for the OIDC tests)");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the provider says it is listening within 60 s");
        let port = line
            .strip_prefix("listening ")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("not the provider's listening line: {line}"));
        Provider {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    fn issuer(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A client-credentials access token for `client`, for `resource`.
    fn token(&self, client: &str, resource: &str) -> String {
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(self.dir.join("root.crt"))
            .arg(format!("{}/token", self.issuer()))
            .args(["-d", "grant_type=client_credentials"])
            .args(["-d", &format!("client_id={client}")])
            .args(["-d", &format!("client_secret=secret-{client}")])
            .args(["-d", &format!("resource={resource}")])
            .output()
            .unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&output.stdout)));
        answer["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access token: {answer}"))
            .to_string()
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The provider's certificate for 127.0.0.1 and its root, written to `dir`.
fn provider_certificates(dir: &Path) {
    let root = LabCa::new_root("Portcullis Test OIDC Provider Root", 1).unwrap();
    let leaf = root
        .issue(&LeafSpec::server_auth(
            "127.0.0.1",
            &["127.0.0.1".into()],
            30,
        ))
        .unwrap();
    std::fs::write(dir.join("root.crt"), &root.cert().cert_pem).unwrap();
    std::fs::write(dir.join("provider.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.join("provider.key"), &leaf.key_pem).unwrap();
}

/// `[tokens]` with no site key and the provider at `issuer` as the only issuer: tenant-a,
/// the Portcullis.Device role, keys fetched every 2 s (at most every 1 s), no clock skew.
fn tokens_from(issuer: &str, dir: &Path) -> TokenSettings {
    let mut settings = TokenSettings::new(Vec::new());
    settings.leeway_secs = 0;
    let mut oidc = OidcSettings::new(issuer, AUDIENCE);
    oidc.ca = vec![dir.join("root.crt")];
    oidc.tenants = vec!["tenant-a".into()];
    oidc.required_claims
        .insert("roles".into(), "Portcullis.Device".into());
    oidc.refresh_secs = 2;
    oidc.min_refresh_secs = 1;
    settings.oidc = vec![oidc];
    settings
}

/// Status, status text and body of an MPLIST request carrying `token`.
fn with_token(system: &System, token: &str) -> (u16, String, String) {
    let report = system.probe_with(
        &format!("/CCM_PROXY_SERVERAUTH/{ENDPOINT}{MPLIST}"),
        None,
        Some(token),
    );
    let body = String::from_utf8_lossy(&report.body).to_string();
    match report.outcome {
        Outcome::Success { status } => (status, "OK".into(), body),
        Outcome::HttpError { status, text } => (status, text, body),
        other => panic!("transport failure: {other:?} {:?}", report.lines),
    }
}

fn assert_accepted(system: &System, token: &str) {
    let (status, text, body) = with_token(system, token);
    assert_eq!((status, text.as_str()), (200, "OK"), "{body}");
    assert!(body.starts_with("<MPList>"), "{body}");
}

fn assert_refused(system: &System, token: &str, words: &[&str]) {
    let (status, text, body) = with_token(system, token);
    assert_eq!(
        (status, text.as_str()),
        (401, "CMGService_Invalid_Token"),
        "{body}"
    );
    for word in words {
        assert!(body.contains(word), "expected {word:?} in: {body}");
    }
}

/// Polls (every 250 ms, at most `limit`) until `token` is answered with `status`.
fn until_status(system: &System, token: &str, status: u16, limit: Duration) -> (u16, String) {
    let deadline = Instant::now() + limit;
    loop {
        let (got, _, body) = with_token(system, token);
        if got == status || Instant::now() > deadline {
            return (got, body);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `token` with its header or payload JSON changed by `change` (the signature kept).
fn tampered(token: &str, part: usize, change: impl FnOnce(&mut serde_json::Value)) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    let mut json: serde_json::Value =
        serde_json::from_slice(&b64.decode(&parts[part]).unwrap()).unwrap();
    change(&mut json);
    parts[part] = b64.encode(json.to_string());
    parts.join(".")
}

#[test]
fn tokens_of_a_real_oidc_provider_are_checked_and_its_key_rotation_followed_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    provider_certificates(dir.path());
    let provider = Provider::start(dir.path(), 0, "ec-1");
    let issuer = provider.issuer();
    let port = provider.port;
    let tokens = tokens_from(&issuer, dir.path());
    let system = System::builder()
        .gateway(move |g| g.tokens = Some(tokens))
        .start();
    assert!(system.wait_for_channels(2));

    // The happy path: the device is named to the connector by its sub.
    let first = provider.token("device-001", AUDIENCE);
    assert_accepted(&system, &first);
    assert!(wait_logged(
        &system,
        &["OIDC issuer", &issuer, "key ids \"ec-1\""]
    ));
    assert!(
        system
            .connector_log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("device device-001 (token ")),
        "{:?}",
        system.connector_log.lock().unwrap()
    );

    // Every check, named: from the provider itself where it can make the token.
    let other_app = provider.token("device-001", OTHER_AUDIENCE);
    assert_refused(
        &system,
        &other_app,
        &["wrong audience", OTHER_AUDIENCE, AUDIENCE],
    );
    let other_tenant = provider.token("other-tenant", AUDIENCE);
    assert_refused(
        &system,
        &other_tenant,
        &["wrong tenant", "tenant-b", "tenant-a"],
    );
    let no_role = provider.token("no-role", AUDIENCE);
    assert_refused(
        &system,
        &no_role,
        &["missing claim", "\"roles\"", "Portcullis.Device"],
    );
    let short = provider.token("short-lived", AUDIENCE);
    let (status, body) = until_status(&system, &short, 401, Duration::from_secs(20));
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("expired: the token expired at"), "{body}");
    // ... and by changing one of its tokens.
    let elsewhere = tampered(&first, 1, |p| p["iss"] = "https://evil.example/".into());
    assert_refused(
        &system,
        &elsewhere,
        &["wrong issuer", "https://evil.example/", &issuer],
    );
    let altered = tampered(&first, 1, |p| p["sub"] = "device-999".into());
    assert_refused(&system, &altered, &["bad signature", "ec-1"]);
    for alg in ["none", "HS256"] {
        let weak = tampered(&first, 0, |h| h["alg"] = alg.into());
        assert_refused(&system, &weak, &["algorithm not allowed", alg]);
    }

    // Rotation: a new key (RSA) is published beside the old one and signs from now on.
    provider.stop();
    let provider = Provider::start(dir.path(), port, "rsa-2,ec-1");
    let second = provider.token("device-001", AUDIENCE);
    assert!(second.starts_with(&header_prefix("RS256")), "{second}");
    // Fetched again for the new key id (within min_refresh_secs of the last fetch, the
    // token waits for the floor: the device's retry gets in).
    let (status, body) = until_status(&system, &second, 200, Duration::from_secs(20));
    assert_eq!(status, 200, "{body}");
    assert_accepted(&system, &first);
    // The old key leaves: its tokens are refused once the gateway fetched the keys again.
    provider.stop();
    let provider = Provider::start(dir.path(), port, "rsa-2");
    let (status, body) = until_status(&system, &first, 401, Duration::from_secs(30));
    assert_eq!(status, 401, "{body}");
    assert!(
        body.contains("unknown key") && body.contains("ec-1"),
        "{body}"
    );
    assert_accepted(&system, &second);

    // The provider goes away: the cached keys keep working, and the log says so.
    let before = system.gateway_log.lock().unwrap().len();
    provider.stop();
    assert!(
        logged_since(
            &system,
            before,
            &["OIDC issuer", &issuer, "is unreachable", "keep working"]
        ),
        "{:?}",
        oidc_lines(&system)
    );
    assert_accepted(&system, &second);
    // ... and when it is back, the log says that too.
    let before = system.gateway_log.lock().unwrap().len();
    let provider = Provider::start(dir.path(), port, "rsa-2");
    assert!(
        logged_since(
            &system,
            before,
            &["OIDC issuer", &issuer, "is reachable again", "\"rsa-2\""]
        ),
        "{:?}",
        oidc_lines(&system)
    );
    provider.stop();

    // `portcullis doctor logs` on the gateway's log names each failure with its fix.
    let findings = doctor(&system);
    let ids: Vec<&str> = findings.iter().map(|f| f.id.as_str()).collect();
    for id in [
        "token-oidc-wrong-audience",
        "token-oidc-wrong-tenant",
        "token-oidc-missing-claim",
        "token-oidc-expired",
        "token-oidc-wrong-issuer",
        "token-oidc-bad-signature",
        "token-oidc-algorithm",
        "token-oidc-unknown-key",
        "oidc-issuer-unreachable",
    ] {
        assert!(
            ids.contains(&id),
            "{id} not in {ids:?}: {:?}",
            system
                .gateway_log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("Refused"))
                .collect::<Vec<_>>()
        );
    }
    let audience = findings
        .iter()
        .find(|f| f.id == "token-oidc-wrong-audience")
        .unwrap();
    assert!(
        audience.cause.contains(OTHER_AUDIENCE) && audience.cause.contains(AUDIENCE),
        "{}",
        audience.cause
    );
    assert!(
        audience.resolution.contains("app registration"),
        "{}",
        audience.resolution
    );
    system.stop();
}

/// Waits (at most 20 s) for a gateway log line after the first `from` with every one of
/// `words`.
fn logged_since(system: &System, from: usize, words: &[&str]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = system.gateway_log.lock().unwrap()[from..]
            .iter()
            .any(|l| words.iter().all(|w| l.contains(w)));
        if found || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The gateway's log lines about OIDC issuers.
fn oidc_lines(system: &System) -> Vec<String> {
    let lines = system.gateway_log.lock().unwrap();
    lines
        .iter()
        .filter(|l| l.contains("OIDC"))
        .cloned()
        .collect()
}

/// What `portcullis doctor logs` finds in the gateway's log lines so far.
fn doctor(system: &System) -> Vec<logs::diagnose::Finding> {
    let rules = logs::diagnose::Rules::builtin().unwrap();
    let mut diagnosis = logs::diagnose::Diagnosis::new(&rules);
    let log = system.gateway_log.lock().unwrap().join("\r\n") + "\r\n";
    diagnosis.read_from(log.as_bytes(), "gateway.log").unwrap();
    diagnosis.finish().findings
}

/// The start of a JWT whose header is `{"alg":"<alg>",...`: the provider signs with `alg`.
fn header_prefix(alg: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let encoded = b64.encode(format!("{{\"alg\":\"{alg}\""));
    // The last character may carry bits of the next one.
    encoded[..encoded.len() - 1].to_string()
}

#[test]
fn a_provider_down_at_start_gives_503_with_our_status_text_until_its_keys_can_be_fetched() {
    let dir = tempfile::tempdir().unwrap();
    provider_certificates(dir.path());
    let port = {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        free.local_addr().unwrap().port()
    };
    let issuer = format!("https://127.0.0.1:{port}");
    let tokens = tokens_from(&issuer, dir.path());
    let system = System::builder()
        .gateway(move |g| g.tokens = Some(tokens))
        .start();
    assert!(system.wait_for_channels(2));
    // Any token naming the issuer: no key to check it with.
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let unsigned = format!(
        "{}.{}.c2ln",
        b64.encode(r#"{"alg":"ES256","kid":"ec-1"}"#),
        b64.encode(format!(
            r#"{{"iss":"{issuer}","aud":"{AUDIENCE}","sub":"x","exp":4000000000}}"#
        ))
    );
    let (status, text, body) = with_token(&system, &unsigned);
    assert_eq!(
        (status, text.as_str()),
        (503, "CMGService_Tokenkeysunavailable"),
        "{body}"
    );
    assert!(
        body.contains(&issuer) && body.contains("cannot connect"),
        "{body}"
    );
    assert!(wait_logged(
        &system,
        &["OIDC issuer", &issuer, "no signing keys"]
    ));

    // This time the provider signs with PS256 (RSA-PSS).
    let provider = Provider::start(dir.path(), port, "ps-1");
    let token = provider.token("device-001", AUDIENCE);
    assert!(token.starts_with(&header_prefix("PS256")), "{token}");
    let (status, body) = until_status(&system, &token, 200, Duration::from_secs(30));
    assert_eq!(status, 200, "{body}");
    let ids: Vec<String> = doctor(&system).into_iter().map(|f| f.id).collect();
    assert!(
        ids.contains(&"token-keys-unavailable".to_string()),
        "{ids:?}"
    );
    provider.stop();
    system.stop();
}
