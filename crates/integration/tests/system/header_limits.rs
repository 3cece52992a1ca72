//! Header blocks and answers from outside do not close a channel every other device shares,
//! nor steer the gateway: an oversized request gets 431 while an upload beside it completes, a
//! connector's smaller budget is honoured, a connector's oversized answer headers and pushes are
//! refused, and an endpoint's answer headers steer nothing. Every attack bounded in count and
//! time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use testkit::*;

/// A request body that comes as the test sends it.
struct Trickle(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Trickle {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|data| Ok(hyper::body::Frame::data(data))))
    }
}

/// A POST to the management point's echo whose body is under way: "first " is sent, the rest
/// is the test's to send on the returned sender; the task gives the status and the body.
async fn upload_under_way(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> (
    tokio::sync::mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<(u16, Result<Bytes, hyper::Error>)>,
) {
    let stream = tls_to(port, tls).await;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Trickle>(TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let (more, rest) = tokio::sync::mpsc::channel(4);
    let request = hyper::Request::post(proxied("/portcullis/echo"))
        .header(hyper::header::HOST, "localhost")
        .body(Trickle(rest))
        .unwrap();
    more.send(Bytes::from_static(b"first ")).await.unwrap();
    let answer = tokio::spawn(async move {
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.into_body().collect().await.map(|b| b.to_bytes()),
        )
    });
    // Under way: its headers and first bytes are on the channel.
    tokio::time::sleep(Duration::from_millis(200)).await;
    (more, answer)
}

/// Item 1: a request whose headers are over the budget is refused at the gateway with 431 and
/// never reaches the channel; an upload on that channel meanwhile completes.
#[test]
fn an_oversized_request_gets_431_and_the_upload_beside_it_on_the_channel_completes() {
    let system = one_channel();
    let ids = system.channel_ids();
    let port = system.gateway_port();
    let tls = system.device_tls();
    let h2_tls = h2_tls(&system);
    system.runtime.block_on(async {
        let (more, upload) = upload_under_way(port, tls.clone()).await;
        // HTTP/1.1, a 70 KiB header, four times over one keep-alive connection.
        let mut raw = Raw::connect(port, tls.clone()).await;
        let big = "a".repeat(70 * 1024);
        for _ in 0..4 {
            raw.send(
                format!(
                    "GET {} HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\n\r\n",
                    proxied(MPLIST)
                )
                .as_bytes(),
            )
            .await;
            let answer = raw.answer().await;
            assert_eq!(
                (answer.status, answer.reason.as_str()),
                (431, "CMGService_Requestheaderstoolarge"),
                "{}",
                String::from_utf8_lossy(&answer.body)
            );
        }
        // Just over the budget with the gateway's metadata: refused by the gateway itself.
        raw.send(
            format!(
                "GET {} HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
                proxied(MPLIST),
                "c".repeat(32 * 1024 - 100)
            )
            .as_bytes(),
        )
        .await;
        let answer = raw.answer().await;
        assert_eq!(
            (answer.status, answer.reason.as_str()),
            (431, "CMGService_Requestheaderstoolarge")
        );
        assert!(
            String::from_utf8_lossy(&answer.body).contains("max_request_header_bytes"),
            "{answer:?}"
        );
        // HTTP/2, a 40 KiB header: h2 refuses it with 431 itself (the device's own
        // connection's limit, the same budget).
        let mut h2 = h2_device(port, h2_tls.clone()).await;
        let request = hyper::Request::get(h2_uri(MPLIST))
            .header("x-big", "b".repeat(40 * 1024))
            .body(())
            .unwrap();
        let (response, _) = h2.send_request(request, true).unwrap();
        match h2_answer(response).await {
            Ok((status, _)) => assert_eq!(status, 431),
            Err(e) => assert_eq!(e.reason(), Some(h2::Reason::REFUSED_STREAM), "{e}"),
        }
        // Within the budget, a large header still goes through.
        raw.send(
            format!(
                "GET {} HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
                proxied(MPLIST),
                "d".repeat(30 * 1024)
            )
            .as_bytes(),
        )
        .await;
        let answer = raw.answer().await;
        assert_eq!(answer.status, 200, "{answer:?}");
        // The upload that was on the channel all along completes.
        more.send(Bytes::from_static(b"second ")).await.unwrap();
        more.send(Bytes::from_static(b"last")).await.unwrap();
        drop(more);
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), upload)
            .await
            .expect("the upload answered")
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(&body.unwrap()[..], b"first second last");
    });
    assert_eq!(system.channel_ids(), ids);
    assert_eq!(channels_opened(&system), 1);
    system.stop();
}

/// Item 1, the two ends agreeing: a connector that takes less than the gateway's budget says so
/// in its hello, and the gateway holds its devices to the smaller limit (431 with its status
/// text) instead of sending what the connector's h2 would refuse.
#[test]
fn a_connector_taking_less_than_the_gateway_is_sent_nothing_larger() {
    let system = System::builder()
        .connector(|c, _| {
            c.channels_per_gateway = 1;
            c.max_request_header_bytes = 8192;
        })
        .start();
    assert!(system.wait_for_channels(1));
    let ids = system.channel_ids();
    assert_logged(
        &system.gateway_log,
        "takes request headers up to 8192 bytes, less than this gateway's max_request_header_bytes (32768)",
    );
    let port = system.gateway_port();
    let tls = system.device_tls();
    system.runtime.block_on(async {
        let mut raw = Raw::connect(port, tls).await;
        for (size, status) in [(10 * 1024, 431), (6 * 1024, 200)] {
            raw.send(
                format!(
                    "GET {} HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
                    proxied(MPLIST),
                    "e".repeat(size)
                )
                .as_bytes(),
            )
            .await;
            let answer = raw.answer().await;
            assert_eq!(answer.status, status, "{answer:?}");
            if status == 431 {
                assert_eq!(answer.reason, "CMGService_Requestheaderstoolarge");
                assert!(String::from_utf8_lossy(&answer.body)
                    .contains("over the gateway's limit of 8192"));
            }
        }
    });
    assert_eq!(system.channel_ids(), ids);
    system.stop();
}

/// A connector of the test's own, built from the `h2` crate: it dials the gateway with the
/// lab's connector channel certificate, answers the hello for [`ENDPOINT`], and then answers
/// `/huge` with a ~100 KiB header block, `/enormous` with a ~300 KiB one, `/push` after trying
/// a PUSH_PROMISE, anything else with 200 "fine". What it saw goes to the returned receiver.
async fn fake_connector(
    system: &System,
    port: u16,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let identity = pki::tls::Identity::load(
        &system.path("connector/channel.crt"),
        &system.path("connector/channel.key"),
    )
    .unwrap();
    let roots = pki::RootSet::load(&[system.path("ca/root.crt")]).unwrap();
    let mut tls = pki::tls::client_config(&roots)
        .unwrap()
        .with_client_auth_cert(identity.chain, identity.key)
        .unwrap();
    tls.alpn_protocols = vec![channel::tunnel::ALPN.to_vec()];
    let stream = tls_to(port, Arc::new(tls)).await;
    let (events, seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut connection = h2::server::handshake(stream).await.unwrap();
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            let path = request.uri().path().to_string();
            let fill = |response: &mut hyper::Response<()>, kib: usize| {
                for i in 0..kib {
                    response.headers_mut().insert(
                        hyper::header::HeaderName::try_from(format!("x-huge-{i}")).unwrap(),
                        hyper::header::HeaderValue::from_str(&"h".repeat(1000)).unwrap(),
                    );
                }
            };
            if path == channel::tunnel::HELLO_PATH {
                let hello = channel::tunnel::Hello {
                    connector_id: "fake-connector".into(),
                    version: "0".into(),
                    endpoints: vec![channel::tunnel::EndpointInfo {
                        id: ENDPOINT,
                        name: "SMS_MP".into(),
                    }],
                    has_client_certificate: true,
                    max_request_header_bytes: None,
                    endpoint_timeout_secs: None,
                };
                let body = Bytes::from(serde_json::to_vec(&hello).unwrap());
                if let Ok(mut stream) = respond.send_response(hyper::Response::new(()), false) {
                    let _ = stream.send_data(body, true);
                }
                continue;
            }
            let mut response = hyper::Response::new(());
            if path.ends_with("/huge") {
                fill(&mut response, 100);
            } else if path.ends_with("/enormous") {
                fill(&mut response, 300);
            } else if path.ends_with("/push") {
                let promise = hyper::Request::get("https://localhost/pushed")
                    .body(())
                    .unwrap();
                let _ = events.send(match respond.push_request(promise) {
                    Ok(_) => "push sent".to_string(),
                    Err(e) => format!("push refused: {e}"),
                });
            }
            let sent = respond
                .send_response(response, false)
                .and_then(|mut stream| stream.send_data(Bytes::from_static(b"fine"), true));
            let _ = events.send(format!(
                "{path}: {}",
                if sent.is_ok() { "answered" } else { "not sent" }
            ));
        }
        let _ = events.send("channel ended".to_string());
    });
    seen
}

/// Item 10: the gateway takes from a connector no header block over its budget and no pushed
/// stream. A block over the budget gets the device 502 and leaves the channel; one over four
/// times it makes h2 close the channel (GOAWAY), and the device still gets 502 with the text.
#[test]
fn a_connectors_oversized_answer_headers_and_pushes_are_refused() {
    let mut system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    let connector = system.connector.take().unwrap();
    system.runtime.block_on(connector.stop());
    let deadline = Instant::now() + Duration::from_secs(15);
    while !system.channel_ids().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(system.channel_ids().is_empty());
    let port = system.gateway_port();
    let tls = system.device_tls();
    system.runtime.block_on(async {
        let mut seen = fake_connector(&system, port).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while system.channel_ids().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ids = system.channel_ids();
        assert_eq!(ids.len(), 1);
        let mut raw = Raw::connect(port, tls.clone()).await;
        let mut get = async |path: &str| {
            raw.send(
                format!("GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n", proxied(path)).as_bytes(),
            )
            .await;
            raw.answer().await
        };
        let huge = get("/huge").await;
        assert_eq!(
            (huge.status, huge.reason.as_str(), huge.headers.len() < 20),
            (502, "CMGService_Badconnectoranswer", true),
            "{} headers: {}",
            huge.headers.len(),
            String::from_utf8_lossy(&huge.body)
        );
        assert!(
            String::from_utf8_lossy(&huge.body).contains("max_response_header_bytes"),
            "{}",
            String::from_utf8_lossy(&huge.body)
        );
        // The channel took that in its stride.
        let fine = get("/fine").await;
        assert_eq!((fine.status, &fine.body[..]), (200, &b"fine"[..]));
        let pushed = get("/push").await;
        assert_eq!(pushed.status, 200);
        assert_eq!(system.channel_ids(), ids);
        let mut said = Vec::new();
        while let Ok(line) = seen.try_recv() {
            said.push(line);
        }
        assert!(
            said.iter().any(|l| l.starts_with("push refused")),
            "the gateway's SETTINGS disable push: {said:?}"
        );
        // Past four times the budget h2 closes the channel itself; the device is told why.
        let enormous = get("/enormous").await;
        assert_eq!(
            (enormous.status, enormous.reason.as_str()),
            (502, "CMGService_Badconnectoranswer"),
            "{}",
            String::from_utf8_lossy(&enormous.body)
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while !system.channel_ids().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(system.channel_ids().is_empty(), "h2 closed that channel");
    });
    system.stop();
}

/// An endpoint of the test's own on the management point's certificate: it answers every
/// request with 200 OK and headers claiming to be the channel's metadata, and
/// `/_portcullis/v1/hello` with a page of its own. Serves on its own thread until the test ends.
fn forging_endpoint(lab: &std::path::Path) -> u16 {
    let identity =
        pki::tls::Identity::load(&lab.join("mp/server.crt"), &lab.join("mp/server.key")).unwrap();
    let roots = pki::RootSet::load(&[lab.join("ca/root.crt")]).unwrap();
    let tls = Arc::new(pki::tls::server_config(identity, &roots, false, &[b"http/1.1"]).unwrap());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Ok(stream) = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await else {
                        return;
                    };
                    let service =
                        hyper::service::service_fn(|request: hyper::Request<_>| async move {
                            let _: &hyper::body::Incoming = request.body();
                            let response = if request.uri().path() == channel::tunnel::HELLO_PATH {
                                hyper::Response::new(http_body_util::Full::new(Bytes::from_static(
                                    b"the endpoint's own page",
                                )))
                            } else {
                                hyper::Response::builder()
                                    .header("x-portcullis-draining", "1")
                                    .header("x-portcullis-status-text", "Forged")
                                    .header("x-portcullis-message-id", "forged")
                                    .body(http_body_util::Full::new(Bytes::from_static(
                                        b"endpoint answer",
                                    )))
                                    .unwrap()
                            };
                            Ok::<_, std::convert::Infallible>(response)
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    port
}

/// Item 11: an endpoint's `x-portcullis-*` answer headers steer nothing (the channel is not
/// taken for draining, the reason phrase is the endpoint's), and a device's request to the
/// hello path reaches the endpoint instead of being answered with the connector's hello.
#[test]
fn an_endpoints_answer_headers_steer_nothing_and_the_hello_path_is_the_endpoints() {
    let system = System::builder()
        .connector(|c, lab| {
            let endpoint = forging_endpoint(lab);
            c.endpoints[0].url = format!("https://localhost:{endpoint}");
        })
        .start();
    assert!(system.wait_for_channels(2));
    let ids = system.channel_ids();
    let port = system.gateway_port();
    let tls = system.device_tls();
    system.runtime.block_on(async {
        let mut raw = Raw::connect(port, tls.clone()).await;
        // The hello path from a device goes to the endpoint, like any other path.
        raw.send(
            format!(
                "GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n",
                proxied("/_portcullis/v1/hello")
            )
            .as_bytes(),
        )
        .await;
        let hello = raw.answer().await;
        assert_eq!(
            (hello.status, String::from_utf8_lossy(&hello.body).as_ref()),
            (200, "the endpoint's own page")
        );
        let mut answers = Vec::new();
        for _ in 0..6 {
            raw.send(
                format!(
                    "GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n",
                    proxied("/SMS_MP/anything")
                )
                .as_bytes(),
            )
            .await;
            let answer = raw.answer().await;
            let forged = answer
                .headers
                .iter()
                .filter(|(name, _)| name.to_ascii_lowercase().starts_with("x-portcullis-"))
                .count();
            answers.push((answer.status, answer.reason.clone(), forged));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(answers, vec![(200, "OK".to_string(), 0); 6]);
    });
    assert_eq!(system.channel_ids(), ids);
    system.stop();
}
