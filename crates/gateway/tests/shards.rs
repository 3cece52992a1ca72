//! The gateway and the connector on shards of their own, as their commands run them: channels
//! are spread over the gateway's shards, device connections too, and every device is served
//! whichever shard took it.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

#[test]
fn channels_and_devices_are_spread_over_the_shards_and_all_served() {
    let system = System::start_on_shards(2);
    assert!(
        system.wait_for_channels(2),
        "channels: {:?}",
        system.gateway_log.lock().unwrap()
    );
    let gateway = system.gateway.as_ref().unwrap();
    // Both channels arrive at once; each goes to the shard driving fewer, so each shard's
    // devices have one on their own thread.
    assert_eq!(
        (
            gateway.registry.channels_on(0),
            gateway.registry.channels_on(1)
        ),
        (1, 1)
    );

    let tls = system.device_tls();
    let port = gateway.addr.port();
    let path = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST");
    let mut devices = system.runtime.block_on(async {
        // Seven devices connect at once and stay; then each sends two requests.
        let connecting: Vec<_> = (0..7)
            .map(|_| tokio::spawn(connect(port, tls.clone())))
            .collect();
        let mut senders = Vec::new();
        for device in connecting {
            senders.push(device.await.unwrap());
        }
        settle(gateway, 7).await;
        let mut spread = gateway.connections_per_shard();
        spread.sort();
        assert_eq!(spread, [3, 4], "device connections per shard");
        for round in 0..2 {
            for (device, sender) in senders.iter_mut().enumerate() {
                let (status, body) = get(sender, &path).await;
                assert!(
                    status == 200 && body.starts_with(b"<MPList>"),
                    "device {device}, round {round}: {status} {}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
        drop(senders);
        settle(gateway, 0).await;
        // Now one at a time, noting the shard each lands on.
        let mut devices = Vec::new();
        for n in 1..=8 {
            let before = gateway.connections_per_shard();
            let sender = connect(port, tls.clone()).await;
            settle(gateway, n).await;
            let after = gateway.connections_per_shard();
            let shard = (0..2).find(|&i| after[i] > before[i]).unwrap();
            devices.push((shard, sender));
        }
        devices
    });

    // The devices of shard 0 leave; shard 1 keeps at least three (a shard takes a new
    // connection unless it holds two more than the other).
    devices.retain(|(shard, _)| *shard == 1);
    let left = devices.len();
    assert!(left >= 3, "{left} devices on shard 1 of 8");
    system
        .runtime
        .block_on(settle(system.gateway.as_ref().unwrap(), left));
    assert_eq!(
        system.gateway.as_ref().unwrap().connections_per_shard(),
        [0, left]
    );

    // The connector restarts: both new channels are accepted by shard 0, the one with fewer
    // connections (or moved there); they still end one on each shard.
    let mut system = system;
    let connector = system.connector.take().unwrap();
    system.runtime.block_on(connector.stop());
    let deadline = Instant::now() + Duration::from_secs(10);
    while system.gateway.as_ref().unwrap().registry.channel_count() > 0 && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (shards, threads) = runtime::shards::Shards::spawn(2).unwrap();
    let config = connector::run::ConnectorConfig::load(&system.path("connector.toml")).unwrap();
    let log = recorder(&system.connector_log);
    system.connector = Some(
        system
            .runtime
            .block_on(connector::run::start_on(config, log, shards))
            .unwrap(),
    );
    assert!(system.wait_for_channels(2));
    let gateway = system.gateway.as_ref().unwrap();
    assert_eq!(
        (
            gateway.registry.channels_on(0),
            gateway.registry.channels_on(1)
        ),
        (1, 1)
    );
    system.runtime.block_on(async {
        for (_, sender) in &mut devices {
            assert_eq!(get(sender, &path).await.0, 200);
        }
    });
    drop(devices);
    system.stop();
    drop(threads);
}

/// One channel for two gateway shards (a connector told to hold one): the devices of the shard
/// without one send over the other's, bodies both ways included.
#[test]
fn devices_on_a_shard_without_a_channel_use_another_shards() {
    let system = System::start_on_shards_with(
        2,
        connector_settings("channels_per_gateway = 1\nchannels_follow_gateway_threads = false\n"),
    );
    assert!(system.wait_for_channels(1));
    let gateway = system.gateway.as_ref().unwrap();
    assert_eq!(gateway.registry.channel_count(), 1);
    let tls = system.device_tls();
    let port = gateway.addr.port();
    let echo = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/portcullis/echo");
    let body: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    system.runtime.block_on(async {
        let connecting: Vec<_> = (0..6)
            .map(|_| {
                tokio::spawn(connect::<http_body_util::Full<bytes::Bytes>>(
                    port,
                    tls.clone(),
                ))
            })
            .collect();
        let mut senders = Vec::new();
        for device in connecting {
            senders.push(device.await.unwrap());
        }
        settle(gateway, 6).await;
        assert!(
            gateway.connections_per_shard().iter().all(|&n| n >= 2),
            "{:?}",
            gateway.connections_per_shard()
        );
        for (device, sender) in senders.iter_mut().enumerate() {
            let request = hyper::Request::post(echo.as_str())
                .header(hyper::header::HOST, "localhost")
                .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            let status = response.status();
            let back = response.into_body().collect().await.unwrap().to_bytes();
            assert!(
                status == 200 && back == body,
                "device {device}: {status}, {} bytes back",
                back.len()
            );
        }
    });
    system.stop();
}

/// A connector told to hold one channel to a gateway running three worker threads opens one
/// for each, as the gateway's hello says how many it runs; they end one on each shard.
#[test]
fn the_connector_opens_a_channel_for_each_gateway_thread() {
    let system = System::start_on_shards_with(3, connector_settings("channels_per_gateway = 1\n"));
    assert!(
        system.wait_for_channels(3),
        "{:?}",
        system.connector_log.lock().unwrap()
    );
    let gateway = system.gateway.as_ref().unwrap();
    let per_shard: Vec<usize> = (0..3).map(|s| gateway.registry.channels_on(s)).collect();
    assert_eq!(per_shard, [1, 1, 1]);
    assert_eq!(system.connector.as_ref().unwrap().dial_loops(), 3);
    assert_logged(
        &system.connector_log,
        "runs 3 worker threads: opening 2 more channel(s) to it, 3 in all",
    );
    system.stop();
}

/// The seed failure mended while running: the connector's store gets its client certificate
/// and the connector reloads. Its channels then drain and reopen one at a time, so the
/// gateway's ServiceMetadata (what `portcullis analyze` reads) says it has one now, and eight
/// devices sending all the while get every answer: a request the draining channel no longer
/// takes goes on the other.
#[test]
fn a_certificate_given_by_a_reload_reaches_the_gateway_with_no_request_refused() {
    let system = System::start_on_shards_with(2, |lab| {
        // As in the seed: a server certificate, nothing for client authentication.
        std::fs::create_dir_all(lab.join("connector/later")).unwrap();
        for file in ["server.crt", "server.key"] {
            std::fs::copy(
                lab.join(format!("gateway/{file}")),
                lab.join(format!("connector/later/{file}")),
            )
            .unwrap();
        }
        let file = lab.join("connector.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        let text = text.replace("\"connector/store\"", "\"connector/later\"");
        std::fs::write(&file, text).unwrap();
    });
    assert!(system.wait_for_channels(2));
    let gateway = system.gateway.as_ref().unwrap();
    assert_eq!(
        gateway.registry.connectors(),
        [("lab-connector".to_string(), 2, false)]
    );
    let tls = system.device_tls();
    let port = gateway.addr.port();
    let path = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST");
    let mut sender = system.runtime.block_on(connect(port, tls.clone()));
    assert_eq!(system.runtime.block_on(get(&mut sender, &path)).0, 403);

    for file in ["client-auth.crt", "client-auth.key"] {
        std::fs::copy(
            system.path(&format!("connector/store/{file}")),
            system.path(&format!("connector/later/{file}")),
        )
        .unwrap();
    }
    let drained = || {
        system
            .connector_log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("drained to give it the new hello"))
            .count()
    };
    let statuses = system.runtime.block_on(async {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let devices: Vec<_> = (0..8)
            .map(|_| {
                let (tls, path, stop) = (tls.clone(), path.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut sender: Sender = connect(port, tls).await;
                    let mut statuses = std::collections::BTreeMap::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let request = hyper::Request::get(path.as_str())
                            .header(hyper::header::HOST, "localhost")
                            .body(http_body_util::Empty::new())
                            .unwrap();
                        let response = sender.send_request(request).await.unwrap();
                        // The channel's draining notice is the gateway's, not the device's.
                        assert!(!response.headers().contains_key("x-portcullis-draining"));
                        let status = response.status().as_u16();
                        response.into_body().collect().await.unwrap();
                        *statuses.entry(status).or_insert(0) += 1;
                    }
                    statuses
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let config = connector::run::ConnectorConfig::load(&system.path("connector.toml")).unwrap();
        let summary = system.connector.as_ref().unwrap().reload(&config).unwrap();
        assert!(
            summary.contains("channels reopen one at a time"),
            "{summary}"
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while (drained() < 2 || gateway.registry.channel_count() < 2) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all = std::collections::BTreeMap::new();
        for device in devices {
            for (status, n) in device.await.unwrap() {
                *all.entry(status).or_insert(0) += n;
            }
        }
        all
    });
    assert_eq!(drained(), 2, "{:?}", system.connector_log.lock().unwrap());
    assert!(system.wait_for_channels(2));
    assert_eq!(
        gateway.registry.connectors(),
        [("lab-connector".to_string(), 2, true)]
    );
    // Before the reload 403 (no client certificate), after it 200: nothing else.
    assert!(
        statuses.keys().all(|s| [200, 403].contains(s)) && statuses.get(&200) > Some(&0),
        "{statuses:?} {:?}",
        system
            .gateway_log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| !l.contains("Message "))
            .collect::<Vec<_>>()
    );
    drop(sender);
    system.stop();
}

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

/// Adds `settings` (top-level TOML lines) to the lab's connector.toml.
fn connector_settings(settings: &'static str) -> impl FnOnce(&std::path::Path) {
    move |lab| {
        let file = lab.join("connector.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        let text = text.replace("verbose = true\n", &format!("verbose = true\n{settings}"));
        std::fs::write(&file, text).unwrap();
    }
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// A device connection to the gateway, TLS with device-001's certificate, HTTP/1.1, for
/// requests with bodies of type `B`.
async fn connect<B>(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn get(sender: &mut Sender, path: &str) -> (u16, bytes::Bytes) {
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// Waits (at most 10 s) until the gateway counts `open` connections.
async fn settle(gateway: &gateway::RunningGateway, open: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateway.connections_per_shard().iter().sum::<usize>() != open && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
