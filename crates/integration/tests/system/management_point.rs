//! The reference management point over real TLS on loopback, driven by curl (installed by
//! `.ci/run`), with lab certificates made by our lab PKI and by hand.

use std::path::Path;
use std::process::{Command, Output};

use mp::{self, ClientCertMode, MpConfig};
use pki::lab::{LabCa, LeafSpec};
use testkit::lab::{with_mp, Lab};

fn curl(lab: &Lab, url: &str, cert: Option<(&Path, &Path)>, extra: &[&str]) -> Output {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "--cacert"])
        .arg(lab.path("ca/root.crt"));
    if let Some((c, k)) = cert {
        cmd.arg("--cert").arg(c).arg("--key").arg(k);
    }
    cmd.args(extra).arg(url);
    cmd.output()
        .expect("curl must be installed (apt-get install curl)")
}

fn status_and_body(out: &Output) -> (String, String) {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.to_string(), body.to_string())
}

#[test]
fn iis_substatus_for_each_client_certificate_case() {
    let lab = Lab::new();
    let device = (
        lab.path("devices/device-001.crt"),
        lab.path("devices/device-001.key"),
    );
    // A device certificate from another root, and an expired one from the lab root.
    let stranger = LabCa::new_root("Stranger Root", 1)
        .unwrap()
        .issue(&LeafSpec::client_auth("STRANGER", 30))
        .unwrap();
    std::fs::write(lab.path("stranger.crt"), &stranger.cert_pem).unwrap();
    std::fs::write(lab.path("stranger.key"), &stranger.key_pem).unwrap();
    let root_key = std::fs::read_to_string(lab.path("ca/root.key")).unwrap();
    let root_cert = std::fs::read_to_string(lab.path("ca/root.crt")).unwrap();
    let lab_root = LabCa::from_pem(&root_cert, &root_key).unwrap();
    let mut old = LeafSpec::client_auth("EXPIRED", 30);
    old.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(60);
    old.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let expired = lab_root.issue(&old).unwrap();
    std::fs::write(lab.path("expired.crt"), &expired.cert_pem).unwrap();
    std::fs::write(lab.path("expired.key"), &expired.key_pem).unwrap();

    with_mp(
        &lab,
        |_| {},
        |base| {
            let url = format!("{base}/SMS_MP/.sms_aut?MPLIST");
            let w = ["-w", "\n%{http_code}"];
            for http in ["--http1.1", "--http2"] {
                let (status, body) = status_and_body(&curl(
                    &lab,
                    &url,
                    Some((&device.0, &device.1)),
                    &[w[0], w[1], http],
                ));
                assert_eq!(status, "200", "{http}");
                assert!(
                    body.starts_with("<MPList><MP Name=\"MP.PORTCULLIS.LAB\""),
                    "{body}"
                );
            }
            let cases = [
                (None, "7", "Client certificate required"),
                (
                    Some((lab.path("stranger.crt"), lab.path("stranger.key"))),
                    "16",
                    "untrusted",
                ),
                (
                    Some((lab.path("expired.crt"), lab.path("expired.key"))),
                    "17",
                    "expired",
                ),
            ];
            for (cert, sub, words) in cases {
                let cert_ref = cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
                let (status, body) = status_and_body(&curl(&lab, &url, cert_ref, &w));
                assert_eq!(status, "403", "sub-status {sub}");
                assert!(
                    body.contains(&format!("HTTP Error 403.{sub} - Forbidden"))
                        && body.contains(words),
                    "{body}"
                );
            }
            let (status, _) = status_and_body(&curl(
                &lab,
                &format!("{base}/elsewhere"),
                Some((&device.0, &device.1)),
                &w,
            ));
            assert_eq!(status, "404");
        },
    );

    let log = lab.w3c();
    assert!(log.contains("#Fields: date time s-ip cs-method cs-uri-stem cs-uri-query s-port cs-username c-ip cs(User-Agent) cs(Referer) sc-status sc-substatus sc-win32-status sc-bytes time-taken\r\n"), "{log}");
    for (stem, result) in [
        ("/SMS_MP/.sms_aut MPLIST", "200 0 0"),
        ("/SMS_MP/.sms_aut MPLIST", "403 7 0"),
        ("/SMS_MP/.sms_aut MPLIST", "403 16 0"),
        ("/SMS_MP/.sms_aut MPLIST", "403 17 0"),
        ("/elsewhere -", "404 0 0"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!(" GET {stem} "))
                    && l.contains(&format!(" - {result} "))),
            "no {stem} line with {result} in {log}"
        );
    }
    let seven = log.lines().find(|l| l.contains(" 403 7 ")).unwrap();
    let fields: Vec<&str> = seven.split(' ').collect();
    assert_eq!(fields.len(), 16, "{seven}");
    assert_eq!(
        &fields[2..9],
        &[
            "127.0.0.1",
            "GET",
            "/SMS_MP/.sms_aut",
            "MPLIST",
            fields[6],
            "-",
            "127.0.0.1"
        ]
    );
}

#[test]
fn ignore_and_accept_modes() {
    let lab = Lab::new();
    with_mp(
        &lab,
        |c| c.client_certificates = ClientCertMode::Accept,
        |base| {
            let (status, _) = status_and_body(&curl(
                &lab,
                &format!("{base}/SMS_MP/.sms_aut?MPKEYINFORMATION"),
                None,
                &["-w", "\n%{http_code}"],
            ));
            assert_eq!(status, "200", "accept allows no certificate");
        },
    );
    let lab = Lab::new();
    with_mp(
        &lab,
        |c| c.client_certificates = ClientCertMode::Ignore,
        |base| {
            let (status, body) = status_and_body(&curl(
                &lab,
                &format!("{base}/SMS_MP/.sms_aut?SITESIGNCERT"),
                None,
                &["-w", "\n%{http_code}"],
            ));
            assert_eq!(status, "200");
            assert!(
                body.len() > 100 && body.chars().all(|c| c.is_ascii_hexdigit()),
                "{body}"
            );
        },
    );
}

#[test]
fn a_large_body_streams_back_byte_for_byte() {
    let lab = Lab::new();
    let blob: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let input = lab.path("blob.bin");
    std::fs::write(&input, &blob).unwrap();
    let output = lab.path("echo.bin");
    let device = (
        lab.path("devices/device-001.crt"),
        lab.path("devices/device-001.key"),
    );
    with_mp(
        &lab,
        |_| {},
        |base| {
            for http in ["--http1.1", "--http2"] {
                let data = format!("@{}", input.display());
                let out = curl(
                    &lab,
                    &format!("{base}/portcullis/echo"),
                    Some((&device.0, &device.1)),
                    &[http, "--data-binary", &data, "-o", output.to_str().unwrap()],
                );
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(
                    std::fs::read(&output).unwrap() == blob,
                    "{http}: echo differs"
                );
            }
        },
    );
}

/// The fault drill's paths: a GET of /portcullis/echo answers its query back (and the W3C log
/// records the query, the drill's id); /portcullis/trickle sends its body a chunk at a time,
/// all of it, and refuses (404) values over its bounds.
#[test]
fn echo_answers_a_get_with_its_query_and_trickle_sends_its_whole_body_slowly() {
    let lab = Lab::new();
    let device = (
        lab.path("devices/device-001.crt"),
        lab.path("devices/device-001.key"),
    );
    let log = lab.path("w3c/u_ex.log");
    let w3c = log.clone();
    with_mp(
        &lab,
        move |c| c.w3c_log = Some(w3c),
        |base| {
            let w = ["-w", "\n%{http_code}"];
            let get = |path: &str| {
                status_and_body(&curl(
                    &lab,
                    &format!("{base}{path}"),
                    Some((&device.0, &device.1)),
                    &w,
                ))
            };
            assert_eq!(
                get("/portcullis/echo?drill=42"),
                ("200".into(), "drill=42".into())
            );
            let started = std::time::Instant::now();
            let (status, body) =
                get("/portcullis/trickle?chunks=3&bytes=100&every_ms=200&drill=43");
            assert_eq!((status.as_str(), body.len()), ("200", 300), "{body}");
            // Three chunks 200 ms apart: not all at once (a generous lower bound).
            assert!(started.elapsed() >= std::time::Duration::from_millis(500));
            for over in [
                "chunks=1001&bytes=1&every_ms=1",
                "chunks=1&bytes=65537&every_ms=1",
                "chunks=1&bytes=1&every_ms=10001",
                "chunks=1&bytes=1",
            ] {
                let (status, _) = get(&format!("/portcullis/trickle?{over}"));
                assert_eq!(status, "404", "{over}");
            }
        },
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(" GET /portcullis/echo drill=42 "),
        "{logged}"
    );
}

#[test]
fn bad_configuration_names_the_file_and_the_key() {
    let lab = Lab::new();
    let file = lab.path("bad.toml");
    let cases = [
        ("listen = \"127.0.0.1:0\"\ncert = \"a\"\n", "missing field `key`"),
        ("listen = \"nowhere\"\ncert = \"a\"\nkey = \"b\"\ntrusted_roots = [\"r\"]\n", "listen"),
        ("listen = \"127.0.0.1:0\"\ncert = \"a\"\nkey = \"b\"\ntrusted_roots = [\"r\"]\ncolour = 1\n", "unknown field `colour`"),
        ("listen = \"127.0.0.1:0\"\ncert = \"a\"\nkey = \"b\"\n", "key `trusted_roots`"),
        ("listen = \"127.0.0.1:0\"\ncert = \"a\"\nkey = \"b\"\nclient_certificates = \"maybe\"\n", "unknown variant `maybe`"),
        ("listen = \"127.0.0.1:0\"\ncert = \"a\"\nkey = \"b\"\ntrusted_roots = [\"r\"]\nsite_code = \"TOOLONG\"\n", "key `site_code`"),
        ("this is not toml", "bad.toml"),
    ];
    for (text, needle) in cases {
        std::fs::write(&file, text).unwrap();
        let err = MpConfig::load(&file).unwrap_err().to_string();
        assert!(err.starts_with(&file.display().to_string()), "{err}");
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
    let err = MpConfig::load(&lab.path("missing.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing.toml: cannot read the configuration"),
        "{err}"
    );

    // Files that exist in the config but not on disk fail at start, naming the file.
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\ncert = \"nope.crt\"\nkey = \"nope.key\"\nclient_certificates = \"ignore\"\n").unwrap();
    let cfg = MpConfig::load(&file).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let err = runtime
        .block_on(mp::start(cfg))
        .err()
        .expect("start fails")
        .to_string();
    assert!(err.contains("nope.crt: no such file or directory"), "{err}");
}

#[test]
fn a_revoked_client_certificate_gets_403_13() {
    let lab = Lab::new();
    let root = LabCa::from_pem(
        &std::fs::read_to_string(lab.path("ca/root.crt")).unwrap(),
        &std::fs::read_to_string(lab.path("ca/root.key")).unwrap(),
    )
    .unwrap();
    let revoked = root.issue(&LeafSpec::client_auth("REVOKED", 30)).unwrap();
    std::fs::write(lab.path("revoked.crt"), &revoked.cert_pem).unwrap();
    std::fs::write(lab.path("revoked.key"), &revoked.key_pem).unwrap();
    std::fs::write(
        lab.path("ca/root.crl"),
        root.crl(&[&revoked.cert_der], 7).unwrap(),
    )
    .unwrap();
    let device = (
        lab.path("devices/device-001.crt"),
        lab.path("devices/device-001.key"),
    );
    with_mp(
        &lab,
        |c| c.crls = vec!["ca/root.crl".into()],
        |base| {
            let url = format!("{base}/SMS_MP/.sms_aut?MPLIST");
            let w = ["-w", "\n%{http_code}"];
            let (status, body) = status_and_body(&curl(
                &lab,
                &url,
                Some((&lab.path("revoked.crt"), &lab.path("revoked.key"))),
                &w,
            ));
            assert_eq!(status, "403");
            assert!(
                body.contains("HTTP Error 403.13 - Forbidden: Client certificate revoked"),
                "{body}"
            );
            let (status, _) = status_and_body(&curl(&lab, &url, Some((&device.0, &device.1)), &w));
            assert_eq!(status, "200", "the CRL revokes only what it lists");
        },
    );
    assert!(lab.w3c().contains(" 403 13 0 "), "{}", lab.w3c());

    // A CRL signed by a CA the management point does not trust is refused at start.
    let stranger = LabCa::new_root("Stranger Root", 1).unwrap();
    std::fs::write(
        lab.path("ca/root.crl"),
        stranger.crl(&[&revoked.cert_der], 7).unwrap(),
    )
    .unwrap();
    let config = MpConfig::load(&lab.config(|c| c.crls = vec!["ca/root.crl".into()])).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let err = runtime
        .block_on(mp::start(config))
        .err()
        .expect("start fails")
        .to_string();
    assert!(err.contains("root.crl: bad certificate revocation list: its issuer \"CN=Stranger Root, O=Portcullis Lab\" is not among the trusted roots"), "{err}");
}
