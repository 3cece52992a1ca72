//! Connections that never speak, idle connections, and caps on device connections: real
//! sockets on loopback, real TLS, every attack bounded in count and time.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use testkit::*;

use crate::support::doctor_on_gateway_line;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

type DeviceTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TCP connection to the gateway from `source` (any of 127.0.0.0/8).
async fn tcp_from(source: Ipv4Addr, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
}

/// A TLS connection to the gateway from `source`, its handshake done.
async fn tls_from(source: Ipv4Addr, port: u16, tls: Arc<rustls::ClientConfig>) -> DeviceTls {
    let tcp = tcp_from(source, port).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .expect("handshake within 10 s")
    .expect("handshake")
}

/// How long until the gateway closes `stream` (reads to its end, whatever comes), or None if
/// it is still open after `limit`.
async fn closed_within<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let read_to_end = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read_to_end)
        .await
        .ok()
        .map(|()| started.elapsed())
}

fn lab_tls(system: &System, device: Option<&str>, http2: bool) -> Arc<rustls::ClientConfig> {
    let cert = device.map(|d| system.path(&format!("devices/{d}.crt")));
    let key = device.map(|d| system.path(&format!("devices/{d}.key")));
    Arc::new(
        probe::device_tls(
            &[system.path("ca/root.crt")],
            cert.as_deref(),
            key.as_deref(),
            http2,
        )
        .unwrap(),
    )
}

/// Waits (at most 10 s) until the gateway holds at most `n` device connections: one closed
/// by the test is given back when the gateway has seen it close.
fn wait_for_devices_at_most(system: &System, n: u64) {
    let gateway = system.gateway.as_ref().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateway.connections_status()["devices"].as_u64() > Some(n) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

const METADATA: &str = "/CCM_PROXY_MUTUALAUTH/ServiceMetadata";

fn get(path: &str) -> hyper::Request<http_body_util::Empty<bytes::Bytes>> {
    hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// A keep-alive HTTP/1.1 device connection from `source` that made one ServiceMetadata
/// request, answered 200; the task driving it ends when the gateway closes it.
async fn http1_after_a_request(
    source: Ipv4Addr,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> (
    hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let stream = tls_from(source, port, tls).await;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender.send_request(get(METADATA)).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    (sender, driver)
}

#[test]
fn connections_that_never_speak_are_closed_at_the_deadlines() {
    let system = System::builder()
        .gateway(|g| {
            g.handshake_timeout_secs = 2;
            g.first_request_timeout_secs = 2;
        })
        .start();
    assert!(system.wait_for_channels(1));
    let port = system.gateway_port();
    let with_cert = lab_tls(&system, Some("device-001"), false);
    let without_cert = lab_tls(&system, None, false);
    let h2 = lab_tls(&system, Some("device-001"), true);
    let local = Ipv4Addr::LOCALHOST;
    let closed = system.runtime.block_on(async {
        // Generous: the deadlines are 2 s; before, these stayed 30 s (no ClientHello) or for
        // ever (TLS done, nothing sent).
        let limit = Duration::from_secs(8);
        let no_client_hello = async {
            let mut tcp = tcp_from(local, port).await.unwrap();
            closed_within(&mut tcp, limit).await
        };
        let silent_with_certificate = async {
            let mut tls = tls_from(local, port, with_cert).await;
            closed_within(&mut tls, limit).await
        };
        let silent_without_certificate = async {
            let mut tls = tls_from(local, port, without_cert).await;
            closed_within(&mut tls, limit).await
        };
        let preface_then_silence = async {
            let mut tls = tls_from(local, port, h2).await;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .unwrap();
            tls.flush().await.unwrap();
            closed_within(&mut tls, limit).await
        };
        tokio::join!(
            no_client_hello,
            silent_with_certificate,
            silent_without_certificate,
            preface_then_silence
        )
    });
    // Each closed within the limit: (no ClientHello, TLS with a certificate, TLS without one,
    // an HTTP/2 preface) and when.
    let (a, b, c, d) = closed;
    assert!(
        a.is_some() && b.is_some() && c.is_some() && d.is_some(),
        "closed after (None: still open after 8 s): {closed:?}"
    );
    // Devices that do speak are still served.
    let report = system.probe(METADATA, Some("device-001"));
    assert!(report.succeeded(), "{report:?}");
    // And the admin surface's status counts the closes.
    let status = system.gateway.as_ref().unwrap().connections_status();
    assert_eq!(status["closed"]["handshake_timeout"], 1, "{status}");
    assert_eq!(status["closed"]["first_request_timeout"], 3, "{status}");
    system.stop();
}

#[test]
fn idle_device_connections_are_closed_after_the_idle_timeout() {
    let system = System::builder()
        .gateway(|g| g.idle_timeout_secs = 2)
        .start();
    assert!(system.wait_for_channels(1));
    let port = system.gateway_port();
    let http1 = lab_tls(&system, Some("device-001"), false);
    let h2 = lab_tls(&system, Some("device-001"), true);
    let local = Ipv4Addr::LOCALHOST;
    system.runtime.block_on(async {
        // Before: hyper's header read timeout closed this one after 30 s.
        let (_sender, driver) = http1_after_a_request(local, port, http1).await;
        let kept = tokio::time::timeout(Duration::from_secs(10), driver).await;
        assert!(
            kept.is_ok(),
            "an idle HTTP/1.1 keep-alive connection stayed open 10 s"
        );

        // Before: an idle HTTP/2 connection stayed for ever.
        let stream = tls_from(local, port, h2).await;
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        let mut driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        // A connection in use is not idle: a request a second for 4 s, twice the timeout.
        for _ in 0..4 {
            let response = sender.send_request(get(METADATA)).await.unwrap();
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(!driver.is_finished(), "closed while in use");
        let idle = tokio::time::timeout(Duration::from_secs(10), &mut driver).await;
        assert!(idle.is_ok(), "an idle HTTP/2 connection stayed open 10 s");
    });
    let status = system.gateway.as_ref().unwrap().connections_status();
    assert_eq!(status["closed"]["idle_timeout"], 2, "{status}");
    system.stop();
}

/// How many refusals the gateway's rate-limited lines report, and in how many lines.
fn refusals_logged(system: &System) -> (usize, usize) {
    let log = system.gateway_log.lock().unwrap();
    let lines: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("CMGService_Toomanyconnections"))
        .collect();
    let count = lines
        .iter()
        .filter_map(|l| {
            let rest = &l[l.find("Refused ")? + "Refused ".len()..];
            rest.split(' ').next()?.parse::<usize>().ok()
        })
        .sum();
    (lines.len(), count)
}

#[test]
fn connections_over_the_per_address_cap_are_refused_and_logged_at_a_bounded_rate() {
    let system = System::builder()
        .gateway(|g| {
            g.max_connections_per_address = 5;
            g.first_request_timeout_secs = 60;
        })
        .start();
    assert!(system.wait_for_channels(1));
    let port = system.gateway_port();
    let tls = lab_tls(&system, Some("device-001"), false);
    let one = Ipv4Addr::new(127, 0, 0, 1);
    let other = Ipv4Addr::new(127, 0, 0, 2);
    const REFUSED: usize = 200;
    system.runtime.block_on(async {
        // Five devices from 127.0.0.1 take its share, and hold it.
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(tls_from(one, port, tls.clone()).await);
        }
        // 200 more from the same address: each closed before any TLS (8 of them may wait 3 s
        // in the room kept for channels).
        let attempts = (0..REFUSED).map(|_| async move {
            let Ok(mut tcp) = tcp_from(one, port).await else {
                return Some(Duration::ZERO); // refused outright counts as closed
            };
            // At once, or after up to 3 s in the room for channels: 10 s is generous.
            closed_within(&mut tcp, Duration::from_secs(10)).await
        });
        let outcomes = futures_join_all(attempts).await;
        let open = outcomes.iter().filter(|o| o.is_none()).count();
        assert_eq!(open, 0, "{open} of {REFUSED} over the cap were held");

        // Another address still gets in and is answered.
        let (_sender, _driver) = http1_after_a_request(other, port, tls.clone()).await;
        drop(held);
    });
    // At most a line a second, with the count since the last: all 200 within a few lines.
    let deadline = Instant::now() + Duration::from_secs(5);
    while refusals_logged(&system).1 < REFUSED && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (lines, count) = refusals_logged(&system);
    assert_eq!(count, REFUSED, "refusals reported in the log");
    assert!(
        (1..=6).contains(&lines),
        "{lines} lines for {REFUSED} refusals"
    );
    assert_logged(&system.gateway_log, "from 127.0.0.1");
    let status = system.gateway.as_ref().unwrap().connections_status();
    assert_eq!(
        status["refused"]["max_connections_per_address"], REFUSED,
        "{status}"
    );
    // `doctor logs` names the cause from such a line, with the address and the cap.
    let (line, findings) = doctor_on_gateway_line(&system, "CMGService_Toomanyconnections");
    assert_eq!(findings.len(), 1, "{line}");
    assert_eq!(findings[0].id, "too-many-connections");
    assert!(
        findings[0]
            .cause
            .contains("5 device connections from 127.0.0.1"),
        "{}",
        findings[0].cause
    );
    system.stop();
}

#[test]
fn a_connector_opens_its_channels_while_devices_hold_every_device_slot() {
    let mut system = System::builder()
        .gateway(|g| {
            g.max_connections = 4;
            g.first_request_timeout_secs = 60;
        })
        .start();
    assert!(system.wait_for_channels(1));
    let port = system.gateway_port();
    let tls = lab_tls(&system, Some("device-001"), false);
    let channels = system.gateway.as_ref().unwrap().registry.channel_count();
    // The connector goes away; its channels close.
    let connector = system.connector.take().unwrap();
    system.runtime.block_on(connector.stop());
    let deadline = Instant::now() + Duration::from_secs(10);
    while system.gateway.as_ref().unwrap().registry.channel_count() > 0 && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Four devices from four addresses hold every device slot.
    let held = system.runtime.block_on(async {
        let mut held = Vec::new();
        for i in 0..4 {
            held.push(tls_from(Ipv4Addr::new(127, 0, 3, i + 1), port, tls.clone()).await);
        }
        held
    });
    // Meanwhile, for 8 s: one silent connection from each of 50 more addresses, and from one
    // address 100 at a time, each made again 250 ms after it is closed (at most 4,000 in all;
    // 300 at a time starved a loaded 2-core machine so that closes came late).
    let flood = system.runtime.spawn(async move {
        let started = Instant::now();
        let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let spread = (0..50u8).map(|i| async move {
            let Ok(mut tcp) = tcp_from(Ipv4Addr::new(127, 0, 4, i + 1), port).await else {
                return 0;
            };
            usize::from(
                closed_within(&mut tcp, Duration::from_secs(12))
                    .await
                    .is_none(),
            )
        });
        let from_one = (0..100).map(|_| {
            let attempts = attempts.clone();
            async move {
                let mut held_long = 0;
                while started.elapsed() < Duration::from_secs(8)
                    && attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 4_000
                {
                    if let Ok(mut tcp) = tcp_from(Ipv4Addr::new(127, 0, 5, 1), port).await {
                        // Up to 3 s in the room for channels, then closed: 15 s is generous.
                        if closed_within(&mut tcp, Duration::from_secs(15))
                            .await
                            .is_none()
                        {
                            held_long += 1;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                held_long
            }
        });
        let spread: usize = futures_join_all(spread).await.into_iter().sum();
        let from_one: usize = futures_join_all(from_one).await.into_iter().sum();
        (spread, from_one)
    });
    std::thread::sleep(Duration::from_millis(500));
    // The connector comes back during the flood and opens its channels through the room
    // kept for them.
    system.start_connector();
    assert!(
        system.wait_for_channels_within(channels, Duration::from_secs(6)),
        "the connector could not open its channels while devices held every slot and more flooded"
    );
    let (spread, from_one) = system.runtime.block_on(flood).unwrap();
    assert_eq!(
        (spread, from_one),
        (0, 0),
        "connections over the cap held (of 50 addresses, from one address)"
    );
    // A device slot given back serves a device over them.
    drop(held);
    wait_for_devices_at_most(&system, 0);
    let report = system.probe(
        "/CCM_PROXY_MUTUALAUTH/72057594037927939/SMS_MP/.sms_aut?MPLIST",
        Some("device-001"),
    );
    assert!(report.succeeded(), "{report:?}");
    system.stop();
}

#[test]
fn a_channel_listener_takes_connectors_only_whatever_devices_do() {
    let mut system = System::builder()
        .gateway(|g| {
            g.max_connections = 2;
            g.first_request_timeout_secs = 60;
            g.channel_listen = Some("127.0.0.1:0".parse().unwrap());
        })
        .start();
    assert!(system.wait_for_channels(1));
    let gateway = system.gateway.as_ref().unwrap();
    let (port, channel_port) = (gateway.addr.port(), gateway.channel_addr().unwrap().port());
    let channels = gateway.registry.channel_count();
    let tls = lab_tls(&system, Some("device-001"), false);
    let connector = system.connector.take().unwrap();
    system.runtime.block_on(connector.stop());
    let deadline = Instant::now() + Duration::from_secs(10);
    while system.gateway.as_ref().unwrap().registry.channel_count() > 0 && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (held, flood) = system.runtime.block_on(async {
        // Devices hold every device slot, and silent connections from 40 addresses fill the
        // room kept for channels on the device port (8 each, 320 for its 256).
        let mut held = Vec::new();
        for i in 0..2 {
            held.push(tls_from(Ipv4Addr::new(127, 0, 3, i + 1), port, tls.clone()).await);
        }
        let mut flood = Vec::new();
        for i in 0..320u32 {
            let source = Ipv4Addr::new(127, 0, 6, (i / 8) as u8 + 1);
            if let Ok(tcp) = tcp_from(source, port).await {
                flood.push(tcp);
            }
        }
        // A device on the channel listener is closed before any handshake.
        let tcp = tcp_from(Ipv4Addr::new(127, 0, 7, 1), channel_port)
            .await
            .unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let device = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp),
        )
        .await
        .expect("closed within 10 s");
        assert!(
            device.is_err(),
            "a device was served on the channel listener"
        );
        (held, flood)
    });
    // The connector, pointed at the channel listener, opens its channels.
    system.edit_connector(|c| c.gateways = vec![format!("localhost:{channel_port}")]);
    system.start_connector();
    assert!(
        system.wait_for_channels_within(channels, Duration::from_secs(10)),
        "the connector could not open its channels on the channel listener"
    );
    drop(flood);
    drop(held);
    wait_for_devices_at_most(&system, 0);
    let report = system.probe(
        "/CCM_PROXY_MUTUALAUTH/72057594037927939/SMS_MP/.sms_aut?MPLIST",
        Some("device-001"),
    );
    assert!(report.succeeded(), "{report:?}");
    let status = system.gateway.as_ref().unwrap().connections_status();
    assert_eq!(
        status["channel_listen"]["refused"]["max_connections"], 1,
        "{status}"
    );
    system.stop();
}

#[test]
fn a_bad_limit_is_refused_at_start_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value) in [
        ("max_connections", "0"),
        ("max_connections_per_address", "0"),
        ("handshake_timeout_secs", "0"),
        ("first_request_timeout_secs", "0"),
        ("idle_timeout_secs", "100000"),
    ] {
        let file = dir.path().join("gateway.toml");
        std::fs::write(
            &file,
            format!("cert = \"c\"\nkey = \"k\"\ntrusted_roots = [\"r\"]\nconnector_roots = [\"r\"]\nallowed_connectors = [\"x\"]\n{key} = {value}\n"),
        )
        .unwrap();
        let err = gateway::GatewayConfig::load(&file).expect_err("refused");
        assert!(err.to_string().contains(key), "{err}");
    }
}

/// Runs every future at once (the test's own tiny join_all, bounded by its input).
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}
