//! Graceful stops: a connector or a gateway told to stop answers the request under way
//! before it goes, on shards of their own as their commands run them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use http_body_util::BodyExt;
use testkit::*;

/// A connector stopped gracefully while a device's request is under way, its body still
/// coming: the request is answered whole, then the channels close.
#[test]
fn a_connector_stopping_gracefully_answers_the_request_under_way() {
    let (mut system, port, tls) = two_shards_with_channels();
    let connector = system.connector.take().unwrap();
    let (status, body) = system.runtime.block_on(async {
        let (more, answer) = trickled_echo(port, tls).await;
        let stopping = tokio::spawn(connector.stop_gracefully(Duration::from_secs(10)));
        // Past the draining notice: the GOAWAY has gone out; the request is still coming.
        tokio::time::sleep(Duration::from_millis(600)).await;
        finish_trickle(more).await;
        let answered = answer.await.unwrap();
        stopping.await.unwrap();
        answered
    });
    assert_eq!(status, 200);
    assert_eq!(body.unwrap(), "first second last");
    assert_logged(
        &system.connector_log,
        "Stopping: every channel drained, no request under way was cut",
    );
    system.stop();
}

/// A gateway stopped gracefully while one device's request is under way (its body still
/// coming), another device's connection is idle after a request and a third has sent nothing
/// since its handshake: the request is answered whole, both quiet connections are closed at
/// once, and the gateway says it cut nothing.
#[test]
fn a_gateway_stopping_gracefully_answers_the_request_under_way() {
    use tokio::io::AsyncReadExt;
    let (mut system, port, tls) = two_shards_with_channels();
    let path = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST");
    let gateway = system.gateway.take().unwrap();
    let (status, body, idle_closed_in, silent_closed_in) = system.runtime.block_on(async {
        let mut idle = connect::<http_body_util::Empty<bytes::Bytes>>(port, tls.clone()).await;
        assert_eq!(get(&mut idle, &path).await.0, 200);
        let mut silent = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap(),
            )
            .await
            .unwrap();
        let (more, answer) = trickled_echo(port, tls).await;
        let stopping = tokio::spawn(gateway.stop_gracefully(Duration::from_secs(10)));
        let asked = Instant::now();
        // The connection that never sent a byte ends: its read says so.
        let _ = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut [0u8; 1])).await;
        let silent_closed_in = asked.elapsed();
        // The idle connection is closed by the gateway: hyper's handle says so.
        while !idle.is_closed() && asked.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let idle_closed_in = asked.elapsed();
        tokio::time::sleep(Duration::from_millis(200)).await;
        finish_trickle(more).await;
        let (status, body) = answer.await.unwrap();
        stopping.await.unwrap();
        (status, body, idle_closed_in, silent_closed_in)
    });
    assert_eq!(status, 200);
    assert_eq!(body.unwrap(), "first second last");
    assert!(
        idle_closed_in < Duration::from_secs(5),
        "{idle_closed_in:?}"
    );
    assert!(
        silent_closed_in < Duration::from_secs(5),
        "{silent_closed_in:?}"
    );
    assert_logged(
        &system.gateway_log,
        "Stopping: 3 device connection(s) drained, no request under way was cut",
    );
    system.stop();
}

/// A system on two shards each, its two channels up; the gateway's port and device-001's TLS
/// client.
fn two_shards_with_channels() -> (System, u16, Arc<rustls::ClientConfig>) {
    let system = System::start_on_shards(2);
    assert!(system.wait_for_channels(2));
    let port = system.gateway_port();
    let tls = system.device_tls();
    (system, port, tls)
}

/// Starts a POST to the management point's echo, from device-001, whose body comes as the test
/// sends it: "first " goes at once, and 100 ms later the request is under way. The rest is
/// [`finish_trickle`]'s; the task gives the answer's status and body.
async fn trickled_echo(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> (
    tokio::sync::mpsc::Sender<bytes::Bytes>,
    tokio::task::JoinHandle<(u16, Result<bytes::Bytes, hyper::Error>)>,
) {
    let echo = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/portcullis/echo");
    let mut sender = connect::<Trickle>(port, tls).await;
    let (more, body) = Trickle::new();
    let request = hyper::Request::post(echo.as_str())
        .header(hyper::header::HOST, "localhost")
        .body(body)
        .unwrap();
    more.send(bytes::Bytes::from_static(b"first "))
        .await
        .unwrap();
    let answer = tokio::spawn(async move {
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.into_body().collect().await.map(|b| b.to_bytes()),
        )
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    (more, answer)
}

/// Sends the rest of [`trickled_echo`]'s body, "second last", and ends it.
async fn finish_trickle(more: tokio::sync::mpsc::Sender<bytes::Bytes>) {
    more.send(bytes::Bytes::from_static(b"second "))
        .await
        .unwrap();
    more.send(bytes::Bytes::from_static(b"last")).await.unwrap();
}

/// A request body that comes as the test sends it.
struct Trickle(tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl Trickle {
    fn new() -> (tokio::sync::mpsc::Sender<bytes::Bytes>, Trickle) {
        let (more, rest) = tokio::sync::mpsc::channel(4);
        (more, Trickle(rest))
    }
}

impl hyper::body::Body for Trickle {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|data| Ok(hyper::body::Frame::data(data))))
    }
}
