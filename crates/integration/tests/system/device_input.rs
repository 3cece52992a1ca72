//! What reaches an endpoint, and what the gateway tells strangers: device headers an endpoint
//! may trust are the gateway's, transfer codings it cannot forward are refused, encoded paths
//! never leave the gateway, and ServiceMetadata names connectors and endpoints to authenticated
//! devices only.

use std::net::TcpListener;
use std::path::Path;

use gateway::token::{self, IssueRequest, TokenKind};
use probe::Outcome;
use testkit::*;
use time::OffsetDateTime;

/// The endpoint id of the header echo endpoint.
const HEADERS: u64 = 9;

/// A small HTTPS endpoint that answers every request with the headers it got, one
/// `name: value` line each: what an endpoint behind the connector is told. It serves on its own
/// thread until the test process ends.
fn serve_header_echo(lab: &Path, listener: TcpListener) {
    let identity =
        pki::tls::Identity::load(&lab.join("mp/server.crt"), &lab.join("mp/server.key")).unwrap();
    let tls =
        pki::tls::server_config(identity, &pki::RootSet::default(), false, &[b"http/1.1"]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        |request: hyper::Request<hyper::body::Incoming>| async move {
                            let mut text = String::new();
                            for (name, value) in request.headers() {
                                text.push_str(&format!(
                                    "{name}: {}\n",
                                    String::from_utf8_lossy(value.as_bytes())
                                ));
                            }
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(text)),
                            ))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
    });
}

/// The usual system, with endpoint [`HEADERS`] served by [`serve_header_echo`].
fn system_with_header_echo() -> System {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    System::builder()
        .connector(move |c, lab| {
            serve_header_echo(lab, listener);
            c.endpoints.push(EndpointConfig {
                id: HEADERS,
                name: "HEADERS".into(),
                url: format!("https://localhost:{port}"),
            });
        })
        .start()
}

/// The headers endpoint [`HEADERS`] got from a curl request carrying `extra` arguments, as
/// lower-case `name: value` lines.
fn headers_seen(system: &System, extra: &[&str]) -> Vec<String> {
    let out = curl(
        system,
        &format!("/CCM_PROXY_MUTUALAUTH/{HEADERS}/whoami"),
        extra,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_ascii_lowercase)
        .collect()
}

const FORGED: &[&str] = &[
    "X-Forwarded-For: 203.0.113.66",
    "Forwarded: for=203.0.113.66;proto=https",
    "X-Real-IP: 203.0.113.66",
    "X-ARR-ClientCert: forged",
    "X-SSL-Client-Cert: forged",
    "X-SSL-Client-Verify: SUCCESS",
    "X-SSL-Client-S-DN: CN=admin",
    "X-Client-Cert: forged",
    "X-Forwarded-Client-Cert: forged",
    "X-Forwarded-Proto: http",
    "X-Forwarded-Host: intranet.contoso.com",
    "Connection: keep-alive, X-Hop-Secret",
    "X-Hop-Secret: hop only",
];

/// Headers an endpoint may trust (the device's address, its certificate) are the gateway's:
/// forged copies from the device do not arrive, and neither do headers it named in
/// `Connection`; the gateway's own say the device's real address, and, when configured, its
/// certificate as IIS ARR passes it.
#[test]
fn headers_an_endpoint_may_trust_are_set_by_the_gateway_not_the_device() {
    let system = system_with_header_echo();
    assert!(system.wait_for_channels(2));
    for http in ["--http1.1", "--http2"] {
        let mut args = vec![http];
        for header in FORGED {
            args.extend(["-H", header]);
        }
        let seen = headers_seen(&system, &args);
        // Over HTTP/2 there is no Connection header (curl leaves it out): X-Hop-Secret is
        // then an ordinary header.
        let hop = if http == "--http1.1" {
            "x-hop-secret"
        } else {
            "forged"
        };
        for forged in [
            "203.0.113.66",
            "forged",
            "x-ssl-client",
            hop,
            "x-real-ip",
            "x-forwarded-proto",
            "x-forwarded-host",
            "intranet",
        ] {
            assert!(
                !seen.iter().any(|l| l.contains(forged)),
                "{http}: {forged} arrived: {seen:#?}"
            );
        }
        assert!(
            seen.contains(&"x-forwarded-for: 127.0.0.1".to_string()),
            "{http}: {seen:#?}"
        );
        assert!(
            seen.contains(&"forwarded: for=127.0.0.1;proto=https".to_string()),
            "{http}: {seen:#?}"
        );
        // Not configured: no certificate header.
        assert!(
            !seen.iter().any(|l| l.starts_with("x-arr-clientcert:")),
            "{http}: {seen:#?}"
        );
    }

    // Configured by a reload: the trusted certificate, its DER in base64 (the PEM's body).
    system
        .reload_gateway(|g| g.client_cert_header = Some("X-ARR-ClientCert".into()))
        .unwrap();
    let pem = std::fs::read_to_string(system.path("devices/device-001.crt")).unwrap();
    let der_base64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect::<String>()
        .to_ascii_lowercase();
    for http in ["--http1.1", "--http2"] {
        let seen = headers_seen(&system, &[http, "-H", "X-ARR-ClientCert: forged"]);
        let sent: Vec<&String> = seen
            .iter()
            .filter(|l| l.starts_with("x-arr-clientcert:"))
            .collect();
        assert_eq!(sent, [&format!("x-arr-clientcert: {der_base64}")], "{http}");
    }
    // A name of the operator's own, outside those every device request is cleaned of: the
    // device's copy never passes, on a token route (no certificate judged) either.
    system
        .reload_gateway(|g| {
            g.client_cert_header = Some("X-Device-Cert".into());
            g.tokens = Some(TokenSettings::new(vec!["site/token.pub".into()]));
        })
        .unwrap();
    let seen = headers_seen(&system, &["-H", "X-Device-Cert: forged"]);
    assert!(
        seen.contains(&format!("x-device-cert: {der_base64}")),
        "{seen:#?}"
    );
    let token = token_for(&system, Vec::new());
    let out = curl(
        &system,
        &format!("/CCM_PROXY_SERVERAUTH/{HEADERS}/whoami"),
        &[
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-H",
            "X-Device-Cert: forged",
        ],
    );
    let seen = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(seen.contains("x-forwarded-for: 127.0.0.1"), "{seen}");
    assert!(!seen.contains("x-device-cert"), "{seen}");
    // A name the gateway cannot use is refused with the key named.
    let refused = system
        .reload_gateway(|g| g.client_cert_header = Some("x-portcullis-device".into()))
        .unwrap_err();
    assert!(refused.contains("client_cert_header"), "{refused}");
    system.stop();
}

/// A request body's transfer coding other than chunked cannot be forwarded as it was sent
/// (HTTP/1.1 de-chunks it and the coding would be lost): refused with 501, never sent on.
#[test]
fn a_transfer_coding_other_than_chunked_is_refused() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    std::fs::write(system.path("small.bin"), b"compressed, say").unwrap();
    let data = format!("@{}", system.path("small.bin").display());
    let echo = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/portcullis/echo");
    let post = |coding: &str| {
        let out = curl(
            &system,
            &echo,
            &[
                "--http1.1",
                "-i",
                "-H",
                &format!("Transfer-Encoding: {coding}"),
                "--data-binary",
                &data,
            ],
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let refused = post("gzip, chunked");
    assert!(
        refused.starts_with("HTTP/1.1 501 CMGService_Transfercodingnotsupported"),
        "{refused}"
    );
    assert!(refused.contains("\"gzip\""), "{refused}");
    let chunked = post("chunked");
    assert!(chunked.starts_with("HTTP/1.1 200"), "{chunked}");
    assert!(chunked.ends_with("compressed, say"), "{chunked}");
    let forwarded = system.connector_lines_starting("Forwarding");
    assert_eq!(
        forwarded, 1,
        "only the chunked request reaches the connector"
    );
    system.stop();
}

/// Paths that mean another path once an endpoint decodes them are refused at the gateway
/// with 404 CMGService_BadRoute, as IIS request filtering refuses them (404.11), and never
/// reach the connector.
#[test]
fn encoded_paths_are_refused_at_the_gateway() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    let base = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP");
    for (tail, says) in [
        ("/%2e%2e/x", "%2e"),
        ("/%2E%2e/x", "%2e"),
        ("/.%2e/x", "%2e"),
        ("/..%2fx", "%2f"),
        ("/..;/x", "\";\" parameters"),
        ("/..%5cx", "%5c"),
        ("/%252e%252e/x", "double escape"),
        ("/%u002e%u002e/x", "%u escape"),
    ] {
        let out = curl(
            &system,
            &format!("{base}{tail}"),
            &["--path-as-is", "-i", "--http1.1"],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with("HTTP/1.1 404 CMGService_BadRoute"),
            "{tail}: {text}"
        );
        assert!(text.contains(says), "{tail}: {text}");
    }
    // A raw backslash: curl sends it as it is with --path-as-is.
    let out = curl(
        &system,
        &format!("{base}\\..\\x"),
        &["--path-as-is", "-i", "--http1.1"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 404 CMGService_BadRoute") || text.starts_with("HTTP/1.1 400"),
        "{text}"
    );
    // The query is the endpoint's business: forwarded (the management point knows no such
    // query, and says so itself).
    let out = curl(
        &system,
        &format!("{base}/.sms_aut?MPLIST&x=%2e%2e%2f"),
        &["--path-as-is", "-i", "--http1.1"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 404 Not Found"), "{text}");
    assert!(text.contains("x-iis-substatus"), "{text}");
    let forwarded = system.connector_lines_starting("Forwarding");
    assert_eq!(forwarded, 1, "only the last request reaches the connector");
    system.stop();
}

fn token_for(system: &System, endpoints: Vec<u64>) -> String {
    let request = IssueRequest {
        subject: "DEVICE-T1".into(),
        days: 7,
        endpoints,
        issuer: token::default_issuer(),
        audience: token::default_audience(),
        kind: TokenKind::Device,
        not_before_offset_secs: 0,
    };
    token::issue(
        &system.path("site/token.key"),
        &request,
        OffsetDateTime::now_utc(),
    )
    .unwrap()
    .0
}

fn metadata(
    system: &System,
    path: &str,
    device: Option<&str>,
    token: Option<&str>,
) -> serde_json::Value {
    let report = system.probe_with(path, device, token);
    assert!(
        matches!(report.outcome, Outcome::Success { status: 200 }),
        "{path}: {:?}",
        report.lines
    );
    serde_json::from_slice(&report.body).unwrap()
}

/// Anonymous callers learn only that the service is there and healthy; connectors and
/// endpoints are told to devices that authenticate (a trusted certificate on MUTUALAUTH, a
/// valid token on SERVERAUTH, which sees only the endpoints it names).
#[test]
fn service_metadata_names_connectors_and_endpoints_to_authenticated_devices_only() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    system
        .reload_gateway(|g| g.tokens = Some(TokenSettings::new(vec!["site/token.pub".into()])))
        .unwrap();
    let mutual = "/CCM_PROXY_MUTUALAUTH/ServiceMetadata";
    let server = "/CCM_PROXY_SERVERAUTH/ServiceMetadata";
    let stranger = LabStranger::new(&system);
    let bad_token = "Bearer not.a.token";
    for (path, device, token) in [
        (mutual, None, None),
        (server, None, None),
        (mutual, Some(stranger.0), None),
        (server, None, Some(bad_token)),
    ] {
        let anonymous = metadata(&system, path, device, token);
        let text = anonymous.to_string();
        assert_eq!(
            anonymous.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["healthy", "service", "version"],
            "{path} {device:?}: {text}"
        );
        assert_eq!(anonymous["healthy"], true, "{text}");
        assert!(
            !text.contains("lab-connector") && !text.contains(&ENDPOINT.to_string()),
            "{text}"
        );
    }
    let full = |value: &serde_json::Value| {
        let text = value.to_string();
        assert!(text.contains(&format!("\"id\":{ENDPOINT}")), "{text}");
        assert!(
            text.contains("\"connector_id\":\"lab-connector\""),
            "{text}"
        );
        assert_eq!(value["channels"], 2, "{text}");
    };
    full(&metadata(&system, mutual, Some("device-001"), None));
    let token = token_for(&system, Vec::new());
    full(&metadata(&system, server, None, Some(&token)));
    // A token for some endpoints sees those only, and no connectors (they serve others too).
    let mine = metadata(
        &system,
        server,
        None,
        Some(&token_for(&system, vec![ENDPOINT])),
    );
    assert_eq!(mine["endpoints"][0]["id"], ENDPOINT, "{mine}");
    assert!(!mine.to_string().contains("lab-connector"), "{mine}");
    let other = metadata(&system, server, None, Some(&token_for(&system, vec![5])));
    assert_eq!(other["endpoints"], serde_json::json!([]), "{other}");
    system.stop();
}

/// A device certificate from a root the gateway does not trust, written into the lab's
/// devices directory.
struct LabStranger(&'static str);

impl LabStranger {
    fn new(system: &System) -> LabStranger {
        let stranger = pki::lab::LabCa::new_root("Stranger Root", 1)
            .unwrap()
            .issue(&pki::lab::LeafSpec::client_auth("STRANGER", 30))
            .unwrap();
        std::fs::write(system.path("devices/stranger.crt"), &stranger.cert_pem).unwrap();
        std::fs::write(system.path("devices/stranger.key"), &stranger.key_pem).unwrap();
        LabStranger("stranger")
    }
}
