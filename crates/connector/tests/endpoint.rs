//! The connector's endpoint calls against the reference management point, over real TLS on
//! loopback: the seed's 403 reproduced at the hop where it happens.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use channel::refusal::{Cause, Hop};
use connector::endpoint::{endpoint_url, EndpointClient};
use http_body_util::{BodyExt, Full};
use mp::{self, MpConfig};
use pki::lab::{LabCa, LabOptions, LabPki, LeafSpec};
use pki::{select_client_cert, CertStore, Pkcs12Password, RootSet};

struct Lab {
    dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        LabPki::issue(&LabOptions::default())
            .unwrap()
            .write(dir.path(), false)
            .unwrap();
        Lab {
            dir,
            runtime: tokio::runtime::Runtime::new().unwrap(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn start_mp(&self) -> mp::RunningMp {
        let config = self.path("mp.toml");
        std::fs::write(
            &config,
            "listen = \"127.0.0.1:0\"\ncert = \"mp/server.crt\"\nkey = \"mp/server.key\"\ntrusted_roots = [\"ca/root.crt\"]\nw3c_log = \"logs/u_ex.log\"\n",
        )
        .unwrap();
        self.runtime
            .block_on(mp::start(MpConfig::load(&config).unwrap()))
            .unwrap()
    }

    /// An endpoint client built the way the connector builds it: the filter chain on `store`.
    fn client(&self, store: &Path, allowed: &[PathBuf], trust: &str) -> EndpointClient {
        let store = CertStore::load(store, &Pkcs12Password::empty()).unwrap();
        let allowed = RootSet::load(allowed).unwrap();
        let selection = select_client_cert(&store, &allowed, time::OffsetDateTime::now_utc());
        let trust = RootSet::load(&[self.path(trust)]).unwrap();
        EndpointClient::new(
            &store,
            selection.selected,
            &trust.into(),
            Duration::from_secs(10),
        )
        .unwrap()
    }

    fn get(
        &self,
        client: &EndpointClient,
        port: u16,
        path: &str,
        query: Option<&str>,
    ) -> Result<(u16, Bytes), channel::refusal::Refusal> {
        let base = format!("https://localhost:{port}").parse().unwrap();
        let url = endpoint_url(&base, path, query).unwrap();
        let request = hyper::Request::get(url.uri)
            .body(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap();
        self.runtime.block_on(async {
            let response = client.forward(request, &url.text).await?;
            let status = response.status().as_u16();
            Ok((
                status,
                response.into_body().collect().await.unwrap().to_bytes(),
            ))
        })
    }
}

#[test]
fn the_selected_certificate_gets_the_management_points_answer() {
    let lab = Lab::new();
    let mp = lab.start_mp();
    let client = lab.client(
        &lab.path("connector/store"),
        &[lab.path("ca/root.crt")],
        "ca/root.crt",
    );
    assert!(client.presents_certificate());
    let (status, body) = lab
        .get(&client, mp.addr.port(), "/SMS_MP/.sms_aut", Some("MPLIST"))
        .unwrap();
    assert_eq!(status, 200);
    assert!(body.starts_with(b"<MPList>"));
    // An answer the connector does not map (404) passes as it is.
    let (status, _) = lab.get(&client, mp.addr.port(), "/nowhere", None).unwrap();
    assert_eq!(status, 404);
    lab.runtime.block_on(mp.stop());
}

#[test]
fn no_client_certificate_gives_the_seeds_403() {
    let lab = Lab::new();
    let mp = lab.start_mp();
    // The seed's store: certificates, but none with client auth and a key.
    let store = lab.path("bad-store");
    std::fs::create_dir(&store).unwrap();
    std::fs::copy(lab.path("gateway/server.crt"), store.join("server.crt")).unwrap();
    std::fs::copy(lab.path("gateway/server.key"), store.join("server.key")).unwrap();
    let client = lab.client(&store, &[lab.path("ca/root.crt")], "ca/root.crt");
    assert!(!client.presents_certificate());
    let refusal = lab
        .get(
            &client,
            mp.addr.port(),
            "/SMS_MP/.sms_aut",
            Some("SITESIGNCERT"),
        )
        .unwrap_err();
    assert_eq!(
        (refusal.status, refusal.text, refusal.hop),
        (
            403,
            "CMGConnector_Clientcertificaterequired",
            Hop::ConnectorToEndpoint
        )
    );
    assert!(matches!(
        refusal.cause,
        Cause::EndpointNeedsClientCertificate {
            presented: false,
            ..
        }
    ));
    lab.runtime.block_on(mp.stop());
    let w3c = std::fs::read_to_string(lab.path("logs/u_ex.log")).unwrap();
    assert!(
        w3c.lines()
            .any(|l| l.contains(" GET /SMS_MP/.sms_aut SITESIGNCERT ") && l.contains(" 403 7 0 ")),
        "{w3c}"
    );
}

#[test]
fn a_certificate_the_endpoint_does_not_trust_is_forbidden() {
    let lab = Lab::new();
    let mp = lab.start_mp();
    let stranger_root = LabCa::new_root("Stranger Root", 1).unwrap();
    let cert = stranger_root
        .issue(&LeafSpec::client_auth("connector-elsewhere", 30))
        .unwrap();
    let store = lab.path("stranger-store");
    std::fs::create_dir(&store).unwrap();
    std::fs::write(store.join("c.crt"), &cert.cert_pem).unwrap();
    std::fs::write(store.join("c.key"), &cert.key_pem).unwrap();
    std::fs::write(
        lab.path("stranger-root.crt"),
        &stranger_root.cert().cert_pem,
    )
    .unwrap();
    // The connector allows that root, so it selects the certificate; the endpoint does not trust it.
    let client = lab.client(&store, &[lab.path("stranger-root.crt")], "ca/root.crt");
    assert!(client.presents_certificate());
    let refusal = lab
        .get(&client, mp.addr.port(), "/SMS_MP/.sms_aut", Some("MPLIST"))
        .unwrap_err();
    assert_eq!(refusal.text, "CMGConnector_Forbidden");
    assert!(refusal.reason().contains("403.16"), "{}", refusal.reason());
    lab.runtime.block_on(mp.stop());
}

#[test]
fn tls_failures_and_unreachable_endpoints_are_named() {
    let lab = Lab::new();
    let mp = lab.start_mp();
    // Trusting only a device certificate: the endpoint's server certificate is unknown.
    let client = lab.client(
        &lab.path("connector/store"),
        &[lab.path("ca/root.crt")],
        "devices/device-001.crt",
    );
    let refusal = lab
        .get(&client, mp.addr.port(), "/SMS_MP/.sms_aut", Some("MPLIST"))
        .unwrap_err();
    assert_eq!(
        (refusal.status, refusal.text),
        (502, "CMGConnector_Endpointtlsfailed")
    );
    assert!(
        refusal.reason().contains("UnknownIssuer"),
        "{}",
        refusal.reason()
    );
    let port = mp.addr.port();
    lab.runtime.block_on(mp.stop());

    let client = lab.client(
        &lab.path("connector/store"),
        &[lab.path("ca/root.crt")],
        "ca/root.crt",
    );
    let refusal = lab
        .get(&client, port, "/SMS_MP/.sms_aut", Some("MPLIST"))
        .unwrap_err();
    assert_eq!(
        (refusal.status, refusal.text),
        (502, "CMGConnector_Endpointunreachable")
    );
    assert!(
        refusal.reason().to_lowercase().contains("refused"),
        "{}",
        refusal.reason()
    );
}

#[test]
fn a_large_body_streams_both_ways_through_the_client() {
    let lab = Lab::new();
    let mp = lab.start_mp();
    let client = lab.client(
        &lab.path("connector/store"),
        &[lab.path("ca/root.crt")],
        "ca/root.crt",
    );
    let blob: Bytes = (0..6 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect::<Vec<u8>>()
        .into();
    let base = format!("https://localhost:{}", mp.addr.port())
        .parse()
        .unwrap();
    let request = hyper::Request::post(endpoint_url(&base, "/portcullis/echo", None).unwrap().uri)
        .body(
            Full::new(blob.clone())
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let echoed = lab.runtime.block_on(async {
        let response = client.forward(request, "echo").await.unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    });
    assert!(echoed == blob, "echo differs: {} bytes back", echoed.len());
    lab.runtime.block_on(mp.stop());
}

/// The connector checks the endpoint's server certificate against CRLs when given some: a
/// revoked certificate is a named TLS failure, an unlisted one passes, and an endpoint whose
/// issuer has no CRL here follows the policy.
#[test]
fn endpoint_server_certificates_are_checked_against_crls() {
    use pki::crl::{CrlPolicy, RevocationList};

    let lab = Lab::new();
    let mp = lab.start_mp();
    let root = LabCa::from_pem(
        &std::fs::read_to_string(lab.path("ca/root.crt")).unwrap(),
        &std::fs::read_to_string(lab.path("ca/root.key")).unwrap(),
    )
    .unwrap();
    let mp_der = RootSet::load(&[lab.path("mp/server.crt")]).unwrap().certs[0]
        .der()
        .to_vec();
    std::fs::write(lab.path("revoked.crl"), root.crl(&[&mp_der], 7).unwrap()).unwrap();
    std::fs::write(lab.path("empty.crl"), root.crl(&[], 7).unwrap()).unwrap();
    let stranger = LabCa::new_root("Stranger Root", 1).unwrap();
    let store = CertStore::load(&lab.path("connector/store"), &Pkcs12Password::empty()).unwrap();
    let roots = RootSet::load(&[lab.path("ca/root.crt")]).unwrap();
    let selected = select_client_cert(&store, &roots, time::OffsetDateTime::now_utc()).selected;
    let client = |crl: Option<&str>, extra_root: bool, policy| {
        let mut trust_roots = roots.clone();
        if extra_root {
            trust_roots
                .certs
                .push(pki::Certificate::from_der(&stranger.cert().cert_der).unwrap());
        }
        let crls = match crl {
            Some(file) => vec![RevocationList::load(&lab.path(file), &trust_roots).unwrap()],
            None => Vec::new(),
        };
        let trust = connector::endpoint::EndpointTrust {
            roots: trust_roots,
            crls,
            crl_policy: policy,
        };
        EndpointClient::new(&store, selected, &trust, Duration::from_secs(10)).unwrap()
    };
    let port = mp.addr.port();
    let get = |c: &EndpointClient| lab.get(c, port, "/SMS_MP/.sms_aut", Some("MPLIST"));

    let refusal = get(&client(Some("revoked.crl"), false, CrlPolicy::Refuse)).unwrap_err();
    assert_eq!(refusal.text, "CMGConnector_Endpointtlsfailed");
    assert!(refusal.reason().contains("Revoked"), "{}", refusal.reason());
    assert_eq!(
        get(&client(Some("empty.crl"), false, CrlPolicy::Refuse))
            .unwrap()
            .0,
        200
    );
    // Only a CRL from another CA: the endpoint's status is unknown.
    std::fs::write(lab.path("stranger.crl"), stranger.crl(&[], 7).unwrap()).unwrap();
    let refusal = get(&client(Some("stranger.crl"), true, CrlPolicy::Refuse)).unwrap_err();
    assert!(
        refusal.reason().contains("UnknownRevocationStatus"),
        "{}",
        refusal.reason()
    );
    assert_eq!(
        get(&client(Some("stranger.crl"), true, CrlPolicy::AllowAndWarn))
            .unwrap()
            .0,
        200
    );
    lab.runtime.block_on(mp.stop());
}

/// A bare HTTP/1.1 endpoint over TLS that answers every request `200 ok` claiming keep-alive,
/// counts the connections it accepts, and after `answers_per_connection` answers waits for the
/// next request and closes the connection without answering it: an endpoint's idle timeout
/// striking just as a kept connection is used again.
async fn counting_endpoint(
    lab: &Lab,
    answers_per_connection: usize,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let identity =
        pki::tls::Identity::load(&lab.path("mp/server.crt"), &lab.path("mp/server.key")).unwrap();
    let roots = RootSet::load(&[lab.path("ca/root.crt")]).unwrap();
    let config = pki::tls::server_config(identity, &roots, false, &[b"http/1.1"]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut seen = Vec::new();
                let mut answered = 0;
                let mut buf = [0u8; 4096];
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        if answered == answers_per_connection {
                            // Closed with the request unanswered.
                            return;
                        }
                        let answer = b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok";
                        if tls.write_all(answer).await.is_err() {
                            return;
                        }
                        answered += 1;
                    }
                }
            });
        }
    });
    (port, accepted)
}

#[test]
fn kept_connections_are_reused_and_a_get_cut_off_by_a_closing_endpoint_goes_again() {
    let lab = Lab::new();
    let client = lab.client(
        &lab.path("connector/store"),
        &[lab.path("ca/root.crt")],
        "ca/root.crt",
    );
    let _guard = lab.runtime.enter();
    let (keeps, kept_count) = lab.runtime.block_on(counting_endpoint(&lab, usize::MAX));
    for _ in 0..20 {
        assert_eq!(
            lab.get(&client, keeps, "/SMS_MP/.sms_aut", Some("MPLIST"))
                .unwrap()
                .0,
            200
        );
    }
    // A connection whose answer was just read may not say it is ready until its task has run
    // again, so the pool may open another now and then (more often on a loaded machine); far
    // fewer than one per request all the same.
    let opened = kept_count.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=4).contains(&opened),
        "twenty requests one after another opened {opened} connections"
    );

    // This endpoint closes each connection when the second request arrives on it, though it
    // said keep-alive: a GET lost that way goes again on a new connection.
    let (drops, dropped_count) = lab.runtime.block_on(counting_endpoint(&lab, 1));
    for n in 0..20 {
        let answer = lab.get(&client, drops, "/SMS_MP/.sms_aut", Some("MPLIST"));
        assert_eq!(answer.map(|a| a.0).ok(), Some(200), "request {n}");
    }
    assert_eq!(dropped_count.load(std::sync::atomic::Ordering::SeqCst), 20);
}
