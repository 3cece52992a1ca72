//! Devices share channels fairly: a device that stops reading, holds many streams, or stops
//! sending its body, and a connector that stops sending an answer, hurt nobody else. Every
//! attack is bounded in count and time, and "promptly" means within generous bounds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use channel::tunnel::{EndpointInfo, Hello, ALPN, HELLO_PATH};
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long an answer may take and still count as prompt here (the failures this guards
/// against took 20 s and more, or never ended).
const PROMPTLY: Duration = Duration::from_secs(6);

/// A TLS connection to the gateway as device-001, offering `alpn`, its socket's receive buffer
/// fixed at `receive_buffer` bytes if given (no autotuning: a device that does not read stops
/// the gateway's writes soon).
async fn device_connection(
    system_paths: &Paths,
    alpn: &[&[u8]],
    receive_buffer: Option<u32>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tls = probe::device_tls(
        std::slice::from_ref(&system_paths.ca),
        Some(&system_paths.cert),
        Some(&system_paths.key),
        false,
    )
    .unwrap();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = receive_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let tcp = socket.connect(system_paths.gateway).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// What a device connection needs, owned, for tasks on the system's runtime.
#[derive(Clone)]
struct Paths {
    ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    gateway: std::net::SocketAddr,
}

fn paths(system: &System, device: &str) -> Paths {
    Paths {
        ca: system.path("ca/root.crt"),
        cert: system.path(&format!("devices/{device}.crt")),
        key: system.path(&format!("devices/{device}.key")),
        gateway: system.gateway.as_ref().unwrap().addr,
    }
}

/// Waits (bounded by `limit`) until `count` stops changing for `quiet`.
fn wait_until_still(count: &AtomicUsize, quiet: Duration, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut last = count.load(Ordering::Relaxed);
    let mut since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = count.load(Ordering::Relaxed);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return;
        }
    }
}

/// Waits (bounded by `limit`) until `done` holds.
fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

fn count_logged(lines: &Arc<std::sync::Mutex<Vec<String>>>, text: &str) -> usize {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(text))
        .count()
}

/// `count` devices at once each echo `blob` over HTTP/1.1 (curl) and read it all: each must
/// get it back whole, promptly.
fn normal_devices_echo(system: &System, count: usize, blob: &[u8]) {
    std::fs::write(system.path("normal.bin"), blob).unwrap();
    let data = format!("@{}", system.path("normal.bin").display());
    let echo = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/portcullis/echo");
    std::thread::scope(|scope| {
        let runs: Vec<_> = (0..count)
            .map(|_| {
                scope.spawn(|| {
                    let started = Instant::now();
                    let out = curl(
                        system,
                        &echo,
                        &["--http1.1", "--max-time", "20", "--data-binary", &data],
                    );
                    (started.elapsed(), out)
                })
            })
            .collect();
        for run in runs {
            let (took, out) = run.join().unwrap();
            assert!(
                out.status.success() && out.stdout == blob,
                "a normal device got {} of {} bytes back after {took:?}: {}",
                out.stdout.len(),
                blob.len(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(took < PROMPTLY, "a normal device waited {took:?}");
        }
    });
}

/// Item 2: twelve devices that POST 16 MiB each to the echo and never read the answer share
/// the one channel with four normal devices; the normal ones are answered in full promptly,
/// and once `device_idle_timeout_secs` has passed the stalled devices are cut and logged.
#[test]
fn devices_that_stop_reading_do_not_hold_up_the_others() {
    let system = System::builder()
        .gateway(|g| g.device_idle_timeout_secs = 12)
        .connector(|c, _| c.channels_per_gateway = 1)
        .start();
    assert!(system.wait_for_channels(1));
    let sent = Arc::new(AtomicUsize::new(0));
    let device = paths(&system, "device-001");
    const BODY: usize = 16 * 1024 * 1024;
    for _ in 0..12 {
        let device = device.clone();
        let sent = sent.clone();
        system.runtime.spawn(async move {
            let mut tls = device_connection(&device, &[b"http/1.1"], Some(16 * 1024)).await;
            let head = format!(
                "POST /CCM_PROXY_MUTUALAUTH/{ENDPOINT}/portcullis/echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: {BODY}\r\n\r\n"
            );
            tls.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![7u8; 64 * 1024];
            // Writes until the path backs up; never reads. Bounded in time.
            let _ = tokio::time::timeout(Duration::from_secs(60), async {
                for _ in 0..BODY / chunk.len() {
                    tls.write_all(&chunk).await?;
                    sent.fetch_add(chunk.len(), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok::<_, std::io::Error>(())
            })
            .await;
        });
    }
    // Until the slow readers' writes have backed up (the channel then holds what they left
    // unread).
    wait_until_still(&sent, Duration::from_millis(1500), Duration::from_secs(20));
    assert!(
        sent.load(Ordering::Relaxed) > 12 * 1024 * 1024,
        "the slow readers sent only {} bytes",
        sent.load(Ordering::Relaxed)
    );

    let blob: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 9) as u8)
        .collect();
    normal_devices_echo(&system, 4, &blob);

    // The stalled devices are cut once the idle timeout has passed, and say why.
    assert!(
        wait_for(Duration::from_secs(40), || count_logged(
            &system.gateway_log,
            "CMGService_Devicestalled"
        ) >= 12),
        "{:#?}",
        system.gateway_log.lock().unwrap()
    );
    assert_logged(
        &system.gateway_log,
        "the device stopped reading the answer for 12 s",
    );
    // And the channel is the one it was.
    assert_eq!(system.gateway.as_ref().unwrap().registry.channel_count(), 1);
    normal_devices_echo(&system, 1, &blob);
    system.stop();
}

/// Opens `streams` POST streams to the echo on one HTTP/2 device connection, sending no body
/// byte, and keeps them open until `leave` is told (or 90 s). Counts the answers' heads by
/// status in `heads` (200, 429, 503, other).
fn hold_streams(
    system: &System,
    streams: usize,
    heads: Arc<[AtomicUsize; 4]>,
    leave: Arc<tokio::sync::Notify>,
) {
    let device = paths(system, "device-001");
    system.runtime.spawn(async move {
        let tls = device_connection(&device, &[b"h2"], None).await;
        // Until the gateway's SETTINGS come, a few streams at a time: h2 would otherwise
        // open all of them at once, and the gateway refuse those over its limit unanswered.
        let (mut client, connection) = h2::client::Builder::new()
            .initial_max_send_streams(8)
            .handshake::<_, Bytes>(tls)
            .await
            .unwrap();
        let driver = tokio::spawn(connection);
        let mut answers = tokio::task::JoinSet::new();
        for _ in 0..streams {
            client = match client.clone().ready().await {
                Ok(client) => client,
                Err(_) => break,
            };
            let request = hyper::Request::post(format!(
                "https://localhost/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/portcullis/echo"
            ))
            .body(())
            .unwrap();
            let Ok((response, body)) = client.send_request(request, false) else {
                break;
            };
            let heads = heads.clone();
            answers.spawn(async move {
                let response = tokio::time::timeout(Duration::from_secs(60), response).await;
                let slot = match &response {
                    Ok(Ok(r)) if r.status() == 200 => 0,
                    Ok(Ok(r)) if r.status() == 429 => {
                        assert_eq!(
                            r.headers()["x-portcullis-status-text"],
                            "CMGService_Toomanyrequests"
                        );
                        1
                    }
                    Ok(Ok(r)) if r.status() == 503 => {
                        assert_eq!(
                            r.headers()["x-portcullis-status-text"],
                            "CMGService_Channelbusy"
                        );
                        2
                    }
                    _ => 3,
                };
                heads[slot].fetch_add(1, Ordering::Relaxed);
                if slot != 0 {
                    // A refusal is read to its end before the stream is let go.
                    if let Ok(Ok(refused)) = response {
                        let mut refused = refused.into_body();
                        while let Some(Ok(_)) = refused.data().await {}
                    }
                    return None;
                }
                // A stream with its answer under way is held open (its body never sent, its
                // answer never read); a refused one is let go, as a client does.
                (slot == 0).then_some((response, body))
            });
        }
        let _ = tokio::time::timeout(Duration::from_secs(90), leave.notified()).await;
        // Leaving: everything dropped at once, the connection with it.
        answers.abort_all();
        drop(client);
        driver.abort();
    });
}

fn heads() -> Arc<[AtomicUsize; 4]> {
    Arc::new(std::array::from_fn(|_| AtomicUsize::new(0)))
}

fn total(heads: &[AtomicUsize; 4]) -> usize {
    heads.iter().map(|h| h.load(Ordering::Relaxed)).sum()
}

fn answered_promptly(system: &System, count: usize) {
    let path = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST");
    for _ in 0..count {
        let started = Instant::now();
        let out = curl(system, &path, &["--max-time", "25", "-w", "%{http_code}"]);
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with("<MPList>") && text.ends_with("200"),
            "after {took:?}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(took < PROMPTLY, "a normal device waited {took:?}");
    }
}

/// Item 4: four HTTP/2 devices each open 200 POST streams and send no body. Each gets its
/// share (`max_streams_per_device`, 64 by default) and 429 for the rest; other devices are
/// answered promptly; when the holders leave, both channels are still there.
#[test]
fn devices_holding_many_streams_get_their_share_and_no_more() {
    let system = System::start("connector/store", "Portcullis Connector Channel");
    assert!(system.wait_for_channels(2));
    let before = system.channel_ids();
    let leave = Arc::new(tokio::sync::Notify::new());
    let holders: Vec<_> = (0..4).map(|_| heads()).collect();
    for h in &holders {
        hold_streams(&system, 200, h.clone(), leave.clone());
    }
    assert!(
        wait_for(Duration::from_secs(15), || holders
            .iter()
            .all(|h| total(h) >= 200)),
        "heads (200, 429, 503, other): {:?}",
        holders
            .iter()
            .map(|h| h
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    answered_promptly(&system, 4);
    for h in &holders {
        let counts: Vec<usize> = h.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(counts, vec![64, 136, 0, 0], "(200, 429, 503, other)");
    }
    assert!(count_logged(&system.gateway_log, "CMGService_Toomanyrequests") >= 4 * 136);

    leave.notify_waiters();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(system.channel_ids(), before, "the channels survive");
    answered_promptly(&system, 4);
    assert_eq!(system.channel_ids(), before);
    system.stop();
}

fn forwarded(system: &System) -> usize {
    count_logged(&system.connector_log, "Forwarding proxy message ")
}

/// Item 4: on one channel of 256 stream slots, an HTTP/2 device opens 300 streams: 256 are
/// sent, 20 wait in the queue (`max_queued_requests = 20`), and the 24 beyond that are
/// refused 503 `CMGService_Channelbusy`. When the device leaves, the requests that were
/// waiting are never sent, though its leaving frees the slots they waited for, and the
/// channel lives on.
#[test]
fn requests_abandoned_while_queued_are_never_sent() {
    let system = System::builder()
        .gateway(|g| {
            g.max_streams_per_device = 300;
            g.max_queued_requests = 20;
        })
        .connector(|c, _| c.channels_per_gateway = 1)
        .start();
    assert!(system.wait_for_channels(1));
    let before = system.channel_ids();
    let leave = Arc::new(tokio::sync::Notify::new());
    let holders: Vec<_> = (0..1).map(|_| heads()).collect();
    for h in &holders {
        hold_streams(&system, 300, h.clone(), leave.clone());
    }
    let counts = || {
        let mut sum = [0usize; 4];
        for h in &holders {
            for (i, c) in h.iter().enumerate() {
                sum[i] += c.load(Ordering::Relaxed);
            }
        }
        sum
    };
    assert!(
        wait_for(Duration::from_secs(20), || counts()[0] + counts()[2] >= 280),
        "heads (200, 429, 503, other): {:?}",
        counts()
    );
    // Nothing more moves: what waits, waits.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(counts(), [256, 0, 24, 0], "(200, 429, 503, other)");
    assert!(wait_for(Duration::from_secs(5), || forwarded(&system) == 256));
    assert_eq!(
        system.gateway.as_ref().unwrap().registry.queue.waiting(),
        20
    );

    leave.notify_waiters();
    assert!(wait_for(Duration::from_secs(10), || system
        .gateway
        .as_ref()
        .unwrap()
        .registry
        .queue
        .waiting()
        == 0));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(forwarded(&system), 256, "an abandoned request was sent");
    assert_eq!(system.channel_ids(), before, "the channel survives");
    answered_promptly(&system, 2);
    assert_eq!(forwarded(&system), 258);
    assert_eq!(system.channel_ids(), before);
    system.stop();
}

/// A connector of the test's own (the h2 server crate over TLS with the lab connector's
/// channel certificate) that answers the hello and then, by path: `/stall` sends a head and
/// a few bytes and then nothing; `/whole-body` reads the whole request body, then answers.
/// It runs until the test's runtime ends.
fn fake_connector(system: &System) {
    let mut tls = probe::device_tls(
        &[system.path("ca/root.crt")],
        Some(&system.path("connector/channel.crt")),
        Some(&system.path("connector/channel.key")),
        false,
    )
    .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let gateway = system.gateway.as_ref().unwrap().addr;
    system.runtime.spawn(async move {
        let tcp = tokio::net::TcpStream::connect(gateway).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .unwrap();
        let mut connection = h2::server::handshake(tls).await.unwrap();
        let mut stalled = Vec::new();
        while let Some(Ok((request, mut respond))) = connection.accept().await {
            let path = request.uri().path().to_string();
            if path == HELLO_PATH {
                let hello = Hello {
                    connector_id: "fake-connector".into(),
                    version: "0".into(),
                    endpoints: vec![EndpointInfo {
                        id: ENDPOINT,
                        name: "SMS_MP".into(),
                    }],
                    has_client_certificate: true,
                    max_request_header_bytes: None,
                    endpoint_timeout_secs: None,
                };
                let mut stream = respond
                    .send_response(hyper::Response::new(()), false)
                    .unwrap();
                stream
                    .send_data(Bytes::from(serde_json::to_vec(&hello).unwrap()), true)
                    .unwrap();
            } else if path == "/stall" {
                let mut stream = respond
                    .send_response(hyper::Response::new(()), false)
                    .unwrap();
                stream
                    .send_data(Bytes::from_static(b"partial"), false)
                    .unwrap();
                // Held, never finished.
                stalled.push((stream, request));
            } else {
                tokio::spawn(async move {
                    let mut body = request.into_body();
                    let mut read = 0;
                    while let Some(Ok(data)) = body.data().await {
                        read += data.len();
                        let _ = body.flow_control().release_capacity(data.len());
                    }
                    if let Ok(mut stream) = respond.send_response(hyper::Response::new(()), false) {
                        let _ = stream.send_data(Bytes::from(format!("read {read}")), true);
                    }
                });
            }
        }
    });
}

/// Item 10 (part): a connector that sends an answer's head and then nothing no longer holds
/// the device: after `connector_idle_timeout_secs` the device's connection (HTTP/1.1) or
/// stream (HTTP/2) is cut and the gateway logs CMGService_Connectorstalled. And a device that
/// stops sending its body gets 408 CMGService_Devicestalled after `device_idle_timeout_secs`.
#[test]
fn stalled_bodies_end_after_their_idle_timeouts() {
    let mut system = System::builder()
        .gateway(|g| {
            g.connector_idle_timeout_secs = 2;
            g.device_idle_timeout_secs = 2;
        })
        .start();
    assert!(system.wait_for_channels(2));
    // Only the test's connector serves the endpoint.
    let connector = system.connector.take().unwrap();
    system.runtime.block_on(connector.stop());
    let registry = system.gateway.as_ref().unwrap().registry.clone();
    assert!(wait_for(Duration::from_secs(15), || registry
        .channel_count()
        == 0));
    fake_connector(&system);
    assert!(system.wait_for_channels(1));

    let stall = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/stall");
    for http in ["--http1.1", "--http2"] {
        let started = Instant::now();
        let out = curl(&system, &stall, &[http, "--max-time", "20"]);
        let took = started.elapsed();
        assert!(!out.status.success(), "{http}: the answer never ended");
        assert_eq!(out.stdout, b"partial", "{http}");
        assert!(took < PROMPTLY, "{http}: the device was held {took:?}");
    }
    assert_eq!(
        count_logged(&system.gateway_log, "CMGService_Connectorstalled"),
        2,
        "{:#?}",
        system.gateway_log.lock().unwrap()
    );
    assert_logged(
        &system.gateway_log,
        "the connector started its answer and then sent nothing for 2 s",
    );

    // A device that sends 10 bytes of a 1,000-byte body, then nothing.
    let device = paths(&system, "device-001");
    let (took, answer) = system.runtime.block_on(async {
        let mut tls = device_connection(&device, &[b"http/1.1"], None).await;
        let head = format!(
            "POST /CCM_PROXY_MUTUALAUTH/{ENDPOINT}/whole-body HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n0123456789"
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(25), tls.read(&mut answer))
            .await
            .map(|r| r.unwrap_or(0))
            .unwrap_or(0);
        answer.truncate(n);
        (started.elapsed(), String::from_utf8_lossy(&answer).to_string())
    });
    assert!(
        answer.starts_with("HTTP/1.1 408 CMGService_Devicestalled"),
        "after {took:?}: {answer}"
    );
    assert!(took < PROMPTLY, "the device was answered after {took:?}");
    assert_logged(
        &system.gateway_log,
        "the device stopped sending its body for 2 s",
    );
    // The channel is untouched: a whole body still gets its answer.
    let whole = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/whole-body");
    let out = curl(&system, &whole, &["--data-binary", "0123456789"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "read 10");
    assert_eq!(registry.channel_count(), 1);
    system.stop();
}

/// Each new limit has a default, and a value out of range is refused at load naming its key.
#[test]
fn the_limits_have_defaults_and_bad_values_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    let usual = "cert = \"server.crt\"\nkey = \"server.key\"\ntrusted_roots = [\"root.crt\"]\nconnector_roots = [\"root.crt\"]\nallowed_connectors = [\"Portcullis Connector Channel\"]\n";
    std::fs::write(&file, usual).unwrap();
    let config = gateway::GatewayConfig::load(&file).unwrap();
    assert_eq!(config.max_streams_per_device, 64);
    assert_eq!(config.max_queued_requests, 4096);
    assert_eq!(config.device_idle_timeout_secs, 30);
    assert_eq!(config.connector_idle_timeout_secs, 30);
    for (bad, key) in [
        ("max_streams_per_device = 0", "max_streams_per_device"),
        ("max_streams_per_device = 10001", "max_streams_per_device"),
        ("max_queued_requests = 1000001", "max_queued_requests"),
        ("device_idle_timeout_secs = 0", "device_idle_timeout_secs"),
        (
            "connector_idle_timeout_secs = 3601",
            "connector_idle_timeout_secs",
        ),
    ] {
        std::fs::write(&file, format!("{usual}{bad}\n")).unwrap();
        let error = gateway::GatewayConfig::load(&file).unwrap_err().to_string();
        assert!(error.contains(key), "{bad}: {error}");
    }
    std::fs::write(&file, format!("{usual}max_queued_requests = 0\n")).unwrap();
    assert_eq!(
        gateway::GatewayConfig::load(&file)
            .unwrap()
            .max_queued_requests,
        0
    );
}

/// Item 2 over HTTP/2: a device that reads its connection but gives one stream no
/// flow-control window (here: an initial window of 0, never raised) has that stream reset
/// after `device_idle_timeout_secs`, which frees its channel stream; its other streams and
/// other devices go on.
#[test]
fn an_http2_stream_the_device_does_not_read_is_reset() {
    let system = System::builder()
        .gateway(|g| g.device_idle_timeout_secs = 2)
        .start();
    assert!(system.wait_for_channels(2));
    let device = paths(&system, "device-001");
    let (took, ended) = system.runtime.block_on(async {
        let tls = device_connection(&device, &[b"h2"], None).await;
        let (mut client, connection) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, Bytes>(tls)
            .await
            .unwrap();
        let driver = tokio::spawn(connection);
        client = client.ready().await.unwrap();
        let request = hyper::Request::get(format!(
            "https://localhost/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST"
        ))
        .body(())
        .unwrap();
        let (response, _) = client.send_request(request, true).unwrap();
        let started = Instant::now();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("the head comes")
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        // Never released: the stream's window stays 0. Bounded.
        let ended = tokio::time::timeout(Duration::from_secs(20), body.data()).await;
        let took = started.elapsed();
        drop(body);
        drop(client);
        driver.abort();
        (took, format!("{ended:?}"))
    });
    assert!(
        ended.contains("Reset") && ended.contains("CANCEL"),
        "after {took:?}: {ended}"
    );
    assert!(took < PROMPTLY, "the stream was held {took:?}");
    assert_logged(&system.gateway_log, "Reset a stream of device");
    assert_logged(
        &system.gateway_log,
        "CMGService_Devicestalled (device -> gateway): the device stopped reading the answer for 2 s",
    );
    answered_promptly(&system, 1);
    system.stop();
}
