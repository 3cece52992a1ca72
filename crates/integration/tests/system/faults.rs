//! The fault drill's findings (issue 16): a refused request's body left unread broke the
//! device's keep-alive connection; a gateway just (re)started told devices their endpoint did
//! not exist while its connectors were still redialling; a hanging endpoint's timeouts were
//! not one story, and requests abandoned by their devices left no trace.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;
use bytes::Bytes;
use connector::run::EndpointConfig;
use testkit::*;

/// An endpoint id no connector announces.
const UNKNOWN: u64 = 4321;
/// The id of the endpoint that never answers (`hanging_endpoint`).
const HANGING: u64 = 5555;
/// The id of an endpoint whose port is closed.
const UNREACHABLE: u64 = 6666;

fn unknown_path() -> String {
    format!("/CCM_PROXY_MUTUALAUTH/{UNKNOWN}/SMS_MP/.sms_aut?MPLIST")
}

fn get_mplist() -> String {
    format!(
        "GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n",
        proxied(MPLIST)
    )
}

/// A request's head with `framing` (`Content-Length: n` or `Transfer-Encoding: chunked`).
fn head(method: &str, path: &str, framing: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{framing}\r\n\r\n")
}

/// Sends a request with `body` (chunked or with a length), the head first and the body a
/// moment later, as a device on a slow uplink sends it: the gateway refuses on the head
/// alone, before the body has come. Then its answer, and the answer to a GET on the same
/// connection.
async fn refused_then_next(
    raw: &mut Raw,
    method: &str,
    path: &str,
    body: &[u8],
    chunked: bool,
) -> (Answer, Answer) {
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {}", body.len())
    };
    raw.send(head(method, path, &framing).as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    if chunked {
        raw.send(format!("{:x}\r\n", body.len()).as_bytes()).await;
        raw.send(body).await;
        raw.send(b"\r\n0\r\n\r\n").await;
    } else {
        raw.send(body).await;
    }
    let refused = raw.answer().await;
    // A connection closed after the refusal fails here, or in `answer` (EOF).
    let sent = async {
        use tokio::io::AsyncWriteExt;
        raw.stream.write_all(get_mplist().as_bytes()).await?;
        raw.stream.flush().await
    };
    if let Err(e) = sent.await {
        panic!(
            "{method} {path}: the next request cannot be sent after {} {} {:?}: {e}",
            refused.status, refused.reason, refused.headers
        );
    }
    let next = raw.answer().await;
    (refused, next)
}

/// Whether the gateway closes the connection (EOF or an error) within `limit`, reading and
/// dropping whatever comes before.
async fn closed_within(raw: &mut Raw, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + limit;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, raw.stream.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Waits (at most 15 s) for a line of `lines` holding every one of `words`; the line.
async fn line_with(lines: &Arc<Mutex<Vec<String>>>, words: &[&str]) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| words.iter().all(|w| l.contains(w)))
            .cloned();
        if found.is_some() || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn logged(lines: &Arc<Mutex<Vec<String>>>) -> String {
    lines.lock().unwrap().join("\n")
}

/// Finding 1: a refusal sent before the request's body came (unknown endpoint, a route that is
/// none, a method not forwarded, a missing token, no channel) closed the device's keep-alive
/// connection without a word, and its next request met a bare TLS EOF (before: "the gateway
/// closed the connection" on the GET after the first refusal). The gateway now reads what is
/// left of the body (bounded) and the connection serves the next request; each refusal's log
/// line names its message.
#[test]
fn a_refused_body_is_read_so_the_keep_alive_connection_serves_the_next_request() {
    let mut system = one_channel();
    let port = system.gateway_port();
    let tls = system.device_tls();
    let body = vec![b'b'; 4096];
    let cases = [
        ("POST", unknown_path(), 404, "CMGService_Unknownendpoint"),
        ("POST", "/nowhere".to_string(), 404, "CMGService_BadRoute"),
        ("TRACE", proxied(MPLIST), 405, "CMGService_Methodnotallowed"),
        (
            "POST",
            format!("/CCM_PROXY_SERVERAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST"),
            401,
            "CMGService_Invalid_Token",
        ),
    ];
    system.runtime.block_on(async {
        for (method, path, status, text) in &cases {
            for chunked in [false, true] {
                let mut raw = Raw::connect(port, tls.clone()).await;
                let (refused, next) =
                    refused_then_next(&mut raw, method, path, &body, chunked).await;
                let case = format!("{method} {path} chunked={chunked}");
                assert_eq!(
                    (refused.status, refused.reason.as_str()),
                    (*status, *text),
                    "{case}"
                );
                assert_eq!(refused.header("connection"), None, "{case}");
                assert_eq!(next.status, 200, "{case}: {next:?}");
            }
        }
    });
    let line = logged(&system.gateway_log)
        .lines()
        .find(|l| l.contains("CMGService_Unknownendpoint"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        line.starts_with("Refused message ") && line.contains(" from device 127.0.0.1:"),
        "{line}"
    );

    // No channel for the endpoint: 503, and the connection answers the next request (a 503
    // again, as the channel is still gone).
    let connector = system.connector.take().expect("the connector runs");
    system.runtime.block_on(connector.stop());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !system.channel_ids().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(system.channel_ids().is_empty());
    system.runtime.block_on(async {
        for chunked in [false, true] {
            let mut raw = Raw::connect(port, tls.clone()).await;
            let (refused, next) = refused_then_next(
                &mut raw,
                "POST",
                &proxied("/portcullis/echo"),
                &body,
                chunked,
            )
            .await;
            assert_eq!(
                (refused.status, refused.reason.as_str()),
                (503, "CMGService_Noconnectorchannel")
            );
            assert_eq!(
                (next.status, next.reason.as_str()),
                (503, "CMGService_Noconnectorchannel")
            );
        }
    });
    system.stop();
}

/// Finding 1, at the far end: the connector's refusal (here the endpoint is unreachable)
/// comes back before the device has sent its body; the connection still serves the device's
/// next request (before: with a body of 256 KiB, "the gateway closed the connection"), and a
/// body over the bound gets `Connection: close`.
#[test]
fn a_connector_refusal_before_the_body_came_leaves_the_connection_usable() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let system = System::builder()
        .gateway(|g| {
            g.refused_body_drain_bytes = 300 * 1024;
            g.refused_body_drain_timeout_secs = 2;
        })
        .connector(move |c, _| {
            c.channels_per_gateway = 1;
            c.endpoints.push(EndpointConfig {
                id: UNREACHABLE,
                name: "SMS_GONE".into(),
                url: format!("https://localhost:{closed_port}"),
            });
        })
        .start();
    assert!(system.wait_for_channels(1));
    let port = system.gateway_port();
    let tls = system.device_tls();
    let path = format!("/CCM_PROXY_MUTUALAUTH/{UNREACHABLE}/SMS_MP/.sms_aut?MPLIST");
    system.runtime.block_on(async {
        for size in [4 * 1024, 256 * 1024] {
            for chunked in [false, true] {
                let mut raw = Raw::connect(port, tls.clone()).await;
                let (refused, next) =
                    refused_then_next(&mut raw, "POST", &path, &vec![b'b'; size], chunked).await;
                assert_eq!(
                    (refused.status, refused.reason.as_str()),
                    (502, "CMGConnector_Endpointunreachable")
                );
                assert_eq!(refused.header("connection"), None);
                assert_eq!(next.status, 200, "{size} chunked={chunked}: {next:?}");
            }
        }
        // Over the bound: the answer says the connection closes, and it does.
        let mut raw = Raw::connect(port, tls.clone()).await;
        raw.send(head("POST", &path, "Content-Length: 1048576").as_bytes())
            .await;
        let refused = raw.answer().await;
        assert_eq!(refused.status, 502);
        assert_eq!(refused.header("connection"), Some("close"), "{refused:?}");
        assert!(closed_within(&mut raw, Duration::from_secs(30)).await);
    });
    assert!(
        logged(&system.gateway_log).lines().any(|l| l.contains(
            ": the connector's answer 502 CMGConnector_Endpointunreachable to device 127.0.0.1:"
        ) && l
            .contains("says Connection: close, as its body, sent on towards the connector, was not read whole")),
        "{}",
        logged(&system.gateway_log)
    );
    system.stop();
}

/// Finding 1, past the bound: a refused body larger than `refused_body_drain_bytes` (declared
/// or sent), or one that does not come within `refused_body_drain_timeout_secs`, is answered
/// with `Connection: close` (before: no such header, the connection closed unannounced), the
/// connection then closes, and the log says why. A body of exactly the bound is read and the
/// connection kept.
#[test]
fn a_refused_body_over_the_bound_is_answered_with_connection_close() {
    let system = one_channel_with(|g| {
        g.refused_body_drain_bytes = 64 * 1024;
        g.refused_body_drain_timeout_secs = 2;
    });
    let port = system.gateway_port();
    let tls = system.device_tls();
    let path = unknown_path();
    system.runtime.block_on(async {
        // At the bound: read, and the connection kept.
        let mut raw = Raw::connect(port, tls.clone()).await;
        let (refused, next) =
            refused_then_next(&mut raw, "POST", &path, &vec![b'b'; 64 * 1024], false).await;
        assert_eq!(refused.status, 404);
        assert_eq!(refused.header("connection"), None);
        assert_eq!(next.status, 200);

        // Declared over the bound: answered at once, without waiting for the body.
        let mut raw = Raw::connect(port, tls.clone()).await;
        raw.send(head("POST", &path, "Content-Length: 1048576").as_bytes())
            .await;
        let refused = raw.answer().await;
        assert_eq!(
            (refused.status, refused.reason.as_str()),
            (404, "CMGService_Unknownendpoint")
        );
        assert_eq!(refused.header("connection"), Some("close"), "{refused:?}");
        assert!(closed_within(&mut raw, Duration::from_secs(30)).await);

        // Sent over the bound, chunked (its length unknown until it is read).
        let mut raw = Raw::connect(port, tls.clone()).await;
        raw.send(head("POST", &path, "Transfer-Encoding: chunked").as_bytes())
            .await;
        let chunk = [b"2000\r\n".as_slice(), &[b'c'; 0x2000], b"\r\n"].concat();
        for _ in 0..16 {
            raw.send(&chunk).await;
        }
        let refused = raw.answer().await;
        assert_eq!(refused.status, 404);
        assert_eq!(refused.header("connection"), Some("close"), "{refused:?}");
        assert!(closed_within(&mut raw, Duration::from_secs(30)).await);

        // Too slow: 10 of 1,000 bytes, then nothing.
        let mut raw = Raw::connect(port, tls.clone()).await;
        raw.send(head("POST", &path, "Content-Length: 1000").as_bytes())
            .await;
        raw.send(&[b's'; 10]).await;
        let refused = raw.answer().await;
        assert_eq!(refused.status, 404);
        assert_eq!(refused.header("connection"), Some("close"), "{refused:?}");
        assert!(closed_within(&mut raw, Duration::from_secs(30)).await);
    });
    let log = logged(&system.gateway_log);
    for why in [
        "its body of 1048576 bytes is larger than the gateway reads of a refused request's (refused_body_drain_bytes, 65536)",
        "its body is larger than the gateway reads of a refused request's",
        "the rest of its body did not come within refused_body_drain_timeout_secs (2 s; 10 bytes came)",
    ] {
        assert!(
            log.lines().any(|l| l.starts_with("Message ")
                && l.contains(": the refusal's answer to device 127.0.0.1:")
                && l.contains(&format!("says Connection: close, as {why}"))),
            "{why}:\n{log}"
        );
    }
    system.stop();
}

/// Finding 1 over HTTP/2: a refused stream whose body is still coming is answered, then reset
/// with NO_ERROR (RFC 9113 8.1: the device stops sending), and the connection serves the
/// next stream.
#[test]
fn a_refused_http2_stream_is_reset_with_no_error_and_the_connection_carries_on() {
    let system = one_channel();
    let port = system.gateway_port();
    let tls = h2_tls(&system);
    system.runtime.block_on(async {
        let mut h2 = h2_device(port, tls).await;
        let request = hyper::Request::post(format!("https://localhost{}", unknown_path()))
            .body(())
            .unwrap();
        let (response, mut body) = h2.send_request(request, false).unwrap();
        body.send_data(Bytes::from(vec![b'b'; 4096]), false)
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("an answer")
            .expect("a response");
        assert_eq!(response.status(), 404);
        assert_eq!(
            response.headers()["x-portcullis-status-text"],
            "CMGService_Unknownendpoint"
        );
        let reset = tokio::time::timeout(
            Duration::from_secs(10),
            std::future::poll_fn(|cx| body.poll_reset(cx)),
        )
        .await
        .expect("the stream is reset")
        .expect("a reason");
        assert_eq!(reset, h2::Reason::NO_ERROR);

        let mut h2 = h2.ready().await.expect("the connection carries on");
        let request = hyper::Request::get(h2_uri(MPLIST)).body(()).unwrap();
        let (response, _) = h2.send_request(request, true).unwrap();
        let (status, _) = h2_answer(response).await.unwrap();
        assert_eq!(status, 200);
    });
    system.stop();
}

fn probed(system: &System, path: &str) -> probe::Outcome {
    system.probe(path, Some("device-001")).outcome
}

/// Finding 2: for `startup_grace_secs` after a gateway starts, an endpoint no connector has
/// announced yet is 503 `CMGService_Gatewaystarting` with Retry-After (before: 404
/// `CMGService_Unknownendpoint`, "no connector has ever announced the endpoint", while the
/// connectors were still redialling); once the connector comes, it is served. With no grace,
/// or after it, 404 as before.
#[test]
fn a_gateway_just_started_says_so_until_its_connectors_come() {
    let mut system = System::builder()
        .gateway(|g| g.startup_grace_secs = 60)
        .hold_connector()
        .start();
    assert_eq!(
        probed(&system, &mp_path()),
        probe::Outcome::HttpError {
            status: 503,
            text: "CMGService_Gatewaystarting".into()
        }
    );
    let port = system.gateway_port();
    let tls = system.device_tls();
    let answer = system.runtime.block_on(async {
        let mut raw = Raw::connect(port, tls).await;
        raw.send(get_mplist().as_bytes()).await;
        raw.answer().await
    });
    assert_eq!(answer.status, 503);
    let retry: u64 = answer
        .header("retry-after")
        .and_then(|r| r.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry), "{retry}");
    let body = String::from_utf8_lossy(&answer.body);
    assert!(body.contains("startup_grace_secs"), "{body}");
    assert_logged(&system.gateway_log, "503 CMGService_Gatewaystarting");

    system.start_connector();
    assert!(system.wait_for_channels(1));
    assert_eq!(
        probed(&system, &mp_path()),
        probe::Outcome::Success { status: 200 }
    );
    // Still within the grace: an id nobody announced may yet come with another connector.
    assert!(matches!(
        probed(&system, &unknown_path()),
        probe::Outcome::HttpError { status: 503, text } if text == "CMGService_Gatewaystarting"
    ));
    system.stop();

    // No grace: 404 at once.
    let system = System::builder().hold_connector().start();
    assert_eq!(
        probed(&system, &mp_path()),
        probe::Outcome::HttpError {
            status: 404,
            text: "CMGService_Unknownendpoint".into()
        }
    );
    system.stop();

    // After the grace: 404.
    let system = System::builder()
        .gateway(|g| g.startup_grace_secs = 1)
        .hold_connector()
        .start();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        probed(&system, &mp_path()),
        probe::Outcome::HttpError {
            status: 404,
            text: "CMGService_Unknownendpoint".into()
        }
    );
    system.stop();
}

/// An HTTPS endpoint that completes the TLS handshake, reads what it is sent and never
/// answers, on `listener` (bound before the system started, so its port is in the
/// connector's configuration), with the lab's management point certificate.
fn hanging_endpoint(system: &System, listener: TcpListener) {
    let identity = pki::tls::Identity::load(
        &system.path(pki::lab::layout::MP_CERT),
        &system.path(pki::lab::layout::MP_KEY),
    )
    .unwrap();
    let config = pki::tls::server_config(
        identity,
        &pki::RootSet::from_certs(Vec::new()),
        false,
        &[b"http/1.1"],
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    listener.set_nonblocking(true).unwrap();
    system.runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        // At most 100 connections, each held at most 60 s.
        for _ in 0..100 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let silent = async {
                    let mut tls = acceptor.accept(tcp).await.ok()?;
                    let mut buf = [0u8; 4096];
                    while tls.read(&mut buf).await.ok()? > 0 {}
                    Some(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(60), silent).await;
            });
        }
    });
}

/// The usual system, with one channel, and the endpoint [`HANGING`] that never answers; the
/// connector waits `endpoint_timeout` for it and the gateway `request_timeout` for the
/// connector.
fn with_hanging_endpoint(endpoint_timeout: u64, request_timeout: u64) -> System {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let system = System::builder()
        .gateway(move |g| g.request_timeout_secs = request_timeout)
        .connector(move |c, _| {
            c.channels_per_gateway = 1;
            c.endpoint_timeout_secs = endpoint_timeout;
            c.endpoints.push(EndpointConfig {
                id: HANGING,
                name: "SMS_HANG".into(),
                url: format!("https://localhost:{port}"),
            });
        })
        .start();
    assert!(system.wait_for_channels(1));
    hanging_endpoint(&system, listener);
    system
}

fn hanging_path(name: &str) -> String {
    format!("/CCM_PROXY_MUTUALAUTH/{HANGING}/{name}")
}

/// Finding 4: the device gets the connector's 504 `CMGConnector_Endpointtimeout`, naming the
/// endpoint, when the connector's `endpoint_timeout_secs` is below the gateway's
/// `request_timeout_secs` (announced in the hello; no warning); and when it is not, the
/// gateway's 504 comes first and the gateway's log says so when the channel opens (before: no
/// word), and the connector logs the request the gateway withdrew (before: nothing).
#[test]
fn a_hanging_endpoint_is_named_by_the_connector_before_the_gateway_gives_up() {
    let system = with_hanging_endpoint(2, 20);
    let started = Instant::now();
    assert_eq!(
        probed(&system, &hanging_path("hang")),
        probe::Outcome::HttpError {
            status: 504,
            text: "CMGConnector_Endpointtimeout".into()
        }
    );
    assert!(started.elapsed() < Duration::from_secs(15), "no hang");
    assert_logged(
        &system.connector_log,
        "(the connector's endpoint_timeout_secs)",
    );
    assert!(!logged(&system.gateway_log).contains("(endpoint_timeout_secs)"));
    system.stop();

    // The gateway gives up first: it says so when the channel opens.
    let system = with_hanging_endpoint(10, 2);
    assert_logged(
        &system.gateway_log,
        "Connector lab-connector waits up to 10 s for its endpoints (endpoint_timeout_secs), and this gateway waits 2 s for the connector (request_timeout_secs)",
    );
    assert_eq!(
        probed(&system, &hanging_path("gateway-first")),
        probe::Outcome::HttpError {
            status: 504,
            text: "CMGService_Connectortimeout".into()
        }
    );
    let connector_log = system.connector_log.clone();
    let withdrawn = system.runtime.block_on(async {
        let forwarded = line_with(
            &connector_log,
            &["Forwarding proxy message ", "/gateway-first"],
        )
        .await
        .expect("forwarded");
        let id = message_id(&forwarded);
        line_with(
            &connector_log,
            &[&format!("Message {id}: the gateway withdrew")],
        )
        .await
    });
    assert!(withdrawn.is_some(), "{}", logged(&system.connector_log));
    system.stop();
}

/// The message id of a connector's `Forwarding proxy message <id> to URL: ...` line.
fn message_id(forwarding: &str) -> String {
    forwarding
        .strip_prefix("Forwarding proxy message ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_default()
        .to_string()
}

/// The message id the connector forwarded the request for `path` under.
async fn forwarded_id(connector_log: &Arc<Mutex<Vec<String>>>, path: &str) -> String {
    let forwarded = line_with(connector_log, &["Forwarding proxy message ", path])
        .await
        .expect("forwarded");
    message_id(&forwarded)
}

/// Message `id`, abandoned by its device, has its line in the gateway's log and in the
/// connector's.
async fn assert_abandoned_at_both_ends(
    gateway_log: &Arc<Mutex<Vec<String>>>,
    connector_log: &Arc<Mutex<Vec<String>>>,
    id: &str,
) {
    let gateway = line_with(
        gateway_log,
        &[&format!("Message {id}: abandoned by device ")],
    )
    .await;
    assert!(gateway.is_some(), "{id}:\n{}", logged(gateway_log));
    let connector = line_with(
        connector_log,
        &[&format!("Message {id}: the gateway withdrew")],
    )
    .await;
    assert!(connector.is_some(), "{id}:\n{}", logged(connector_log));
}

/// Finding 4: a device that gives up before its answer (closes its HTTP/1.1 connection, resets
/// its HTTP/2 stream) leaves a line with the message id in the gateway's log and in the
/// connector's (before: neither said anything).
#[test]
fn a_request_its_device_abandons_is_logged_with_its_message_id_at_both_ends() {
    let system = with_hanging_endpoint(30, 40);
    let port = system.gateway_port();
    let (tls, h2_tls) = (system.device_tls(), h2_tls(&system));
    let (gateway_log, connector_log) = (system.gateway_log.clone(), system.connector_log.clone());
    system.runtime.block_on(async {
        // HTTP/1.1: the device closes its connection.
        let mut raw = Raw::connect(port, tls).await;
        raw.send(
            format!(
                "GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n",
                hanging_path("abandoned-h1")
            )
            .as_bytes(),
        )
        .await;
        let id = forwarded_id(&connector_log, "/abandoned-h1").await;
        drop(raw);
        assert_abandoned_at_both_ends(&gateway_log, &connector_log, &id).await;

        // HTTP/2: the device resets its stream, and its connection stays.
        let mut h2 = h2_device(port, h2_tls).await;
        let request =
            hyper::Request::get(format!("https://localhost{}", hanging_path("abandoned-h2")))
                .body(())
                .unwrap();
        let (response, stream) = h2.send_request(request, true).unwrap();
        let id = forwarded_id(&connector_log, "/abandoned-h2").await;
        drop((response, stream));
        assert_abandoned_at_both_ends(&gateway_log, &connector_log, &id).await;
        let mut h2 = h2.ready().await.expect("the connection stays");
        let request = hyper::Request::get(h2_uri(MPLIST)).body(()).unwrap();
        let (response, _) = h2.send_request(request, true).unwrap();
        assert_eq!(h2_answer(response).await.unwrap().0, 200);
    });
    system.stop();
}
