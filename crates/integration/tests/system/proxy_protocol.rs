//! Devices behind an L4 load balancer: Debian's haproxy in TCP mode in front of the gateway,
//! sending the PROXY protocol (v2 and v1), on loopback. The device connects from 127.0.0.7
//! (its socket bound there), haproxy from 127.0.0.5 (its `source`); the gateway must see,
//! log, cap and forward 127.0.0.7.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::{ProxyProtocol, ProxyVersion};
use testkit::*;

use crate::support::doctor_on_gateway_line;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROXY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
const DEVICE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 7);
const METADATA: &str = "/CCM_PROXY_MUTUALAUTH/ServiceMetadata";

/// haproxy in TCP mode, in the foreground, killed when dropped.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// haproxy listening on `PROXY`, passing each connection to the gateway from `source` with
/// `send` ("send-proxy-v2", "send-proxy"). Waits (at most 10 s) until it accepts.
fn haproxy(system: &System, source: Ipv4Addr, send: &str) -> Haproxy {
    let port = std::net::TcpListener::bind((PROXY, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = system.path(&format!("haproxy-{port}.cfg"));
    std::fs::write(
        &config,
        format!(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend devices\n  bind {PROXY}:{port}\n  default_backend gateway\n\
             backend gateway\n  server gateway 127.0.0.1:{} {send} source {source}\n",
            system.gateway_port()
        ),
    )
    .unwrap();
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy must be installed (apt-get install haproxy)");
    let addr = SocketAddr::from((PROXY, port));
    let haproxy = Haproxy { child, addr };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
        assert!(Instant::now() < deadline, "haproxy not listening on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
    haproxy
}

/// `curl` from `source` through haproxy, device-001's certificate: its output.
fn curl_via(
    system: &System,
    haproxy: &Haproxy,
    source: Ipv4Addr,
    path: &str,
) -> std::process::Output {
    let port = haproxy.addr.port();
    Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--interface",
            &source.to_string(),
        ])
        .arg("--resolve")
        .arg(format!("localhost:{port}:{PROXY}"))
        .arg("--cacert")
        .arg(system.path("ca/root.crt"))
        .arg("--cert")
        .arg(system.path("devices/device-001.crt"))
        .arg("--key")
        .arg(system.path("devices/device-001.key"))
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .expect("curl")
}

fn behind_proxy(version: ProxyVersion) -> System {
    System::builder()
        .gateway(move |g| {
            g.verbose = true;
            g.proxy_protocol = Some(ProxyProtocol::new(version, vec![PROXY.to_string()]));
        })
        .start()
}

/// A request through haproxy `send`ing the PROXY protocol: the management point's W3C log
/// and the gateway's log show the device's address, never haproxy's.
fn device_seen_through(version: ProxyVersion, send: &str) {
    let system = behind_proxy(version);
    assert!(system.wait_for_channels(1));
    let haproxy = haproxy(&system, PROXY, send);
    let path = format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST");
    let out = curl_via(&system, &haproxy, DEVICE, &path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w3c = std::fs::read_to_string(system.path("logs/u_ex.log")).unwrap();
    let line = w3c
        .lines()
        .find(|l| l.contains(" /SMS_MP/.sms_aut MPLIST "))
        .unwrap_or_else(|| panic!("no request in {w3c}"));
    assert!(line.contains(" 127.0.0.7 "), "{line}");
    assert!(!line.contains("127.0.0.5"), "{line}");
    assert_logged(&system.gateway_log, "from device 127.0.0.7:");
    let log = system.gateway_log.lock().unwrap().join("\n");
    assert!(!log.contains("from device 127.0.0.5"), "{log}");
    drop(haproxy);
    system.stop();
}

#[test]
fn a_device_behind_haproxy_send_proxy_v2_is_known_by_its_own_address() {
    device_seen_through(ProxyVersion::V2, "send-proxy-v2");
}

#[test]
fn a_device_behind_haproxy_send_proxy_v1_is_known_by_its_own_address() {
    device_seen_through(ProxyVersion::V1, "send-proxy");
}

/// A TLS connection to `to` from `source`, its handshake done, or the error.
async fn tls_via(
    source: Ipv4Addr,
    to: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let tcp = socket.connect(to).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .unwrap_or_else(|_| Err(std::io::Error::other("no handshake within 10 s")))
}

/// A request's answer on a held HTTP/1.1 connection: its status line.
async fn get(stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    let request = format!("GET {METADATA} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn the_per_address_cap_counts_the_device_behind_the_proxy() {
    let system = System::builder()
        .gateway(|g| {
            g.max_connections_per_address = 2;
            g.proxy_protocol = Some(ProxyProtocol::new(
                ProxyVersion::Any,
                vec!["127.0.0.4/31".into()],
            ));
        })
        .start();
    assert!(system.wait_for_channels(1));
    let haproxy = haproxy(&system, PROXY, "send-proxy-v2");
    let tls = system.device_tls();
    let to = haproxy.addr;
    system.runtime.block_on(async {
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = tls_via(DEVICE, to, tls.clone())
                .await
                .expect("within the cap");
            assert!(get(&mut stream).await.starts_with("HTTP/1.1 200"));
            held.push(stream);
        }
        // The third from the same device is over its cap (haproxy's address holds none).
        let third = tls_via(DEVICE, to, tls.clone()).await;
        assert!(
            third.is_err(),
            "a third connection from 127.0.0.7 was let in"
        );
        // Another device through the same haproxy is let in.
        let mut other = tls_via(Ipv4Addr::new(127, 0, 0, 8), to, tls.clone())
            .await
            .expect("another device");
        assert!(get(&mut other).await.starts_with("HTTP/1.1 200"));
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = || {
        system.gateway.as_ref().unwrap().connections_status()["refused"]
            ["max_connections_per_address"]
            .as_u64()
    };
    while refused() != Some(1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(refused(), Some(1));
    assert_logged(&system.gateway_log, "the latest from 127.0.0.7:");
    drop(haproxy);
    system.stop();
}

/// Waits (at most 10 s) for a gateway log line containing `text`.
fn wait_logged(system: &System, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !system
        .gateway_log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains(text))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_logged(&system.gateway_log, text);
}

#[test]
fn a_proxy_header_from_an_address_not_configured_is_refused() {
    let system = behind_proxy(ProxyVersion::V2);
    assert!(system.wait_for_channels(1));
    // haproxy connecting from 127.0.0.6, which is not in proxy_protocol.proxies.
    let haproxy = haproxy(&system, Ipv4Addr::new(127, 0, 0, 6), "send-proxy-v2");
    let out = curl_via(&system, &haproxy, DEVICE, METADATA);
    assert!(!out.status.success(), "let in through an unlisted proxy");
    wait_logged(&system, "Refused a connection from 127.0.0.6:");
    assert_logged(
        &system.gateway_log,
        "it sent a PROXY protocol header, and 127.0.0.6 is not in proxy_protocol.proxies",
    );
    let status = system.gateway.as_ref().unwrap().connections_status();
    assert!(
        status["proxy_protocol"]["refused_header_from_unlisted_address"].as_u64() >= Some(1),
        "{status}"
    );
    // `portcullis doctor logs` explains the line.
    let (line, findings) = doctor_on_gateway_line(&system, "Refused a connection from 127.0.0.6:");
    assert_eq!(findings.len(), 1, "{line}");
    assert_eq!(findings[0].id, "proxy-protocol-refused");
    assert!(
        findings[0]
            .cause
            .contains("127.0.0.6 is not in proxy_protocol.proxies"),
        "{}",
        findings[0].cause
    );
    drop(haproxy);
    system.stop();
}

#[test]
fn a_proxy_address_without_a_header_is_refused_and_a_stalled_header_cut() {
    let system = System::builder()
        .gateway(|g| {
            let mut proxy = ProxyProtocol::new(ProxyVersion::V2, vec![PROXY.to_string()]);
            proxy.header_timeout_secs = 1;
            g.proxy_protocol = Some(proxy);
        })
        .start();
    assert!(system.wait_for_channels(1));
    let gateway = SocketAddr::from(([127, 0, 0, 1], system.gateway_port()));
    let tls = system.device_tls();
    system.runtime.block_on(async {
        // From the proxy's address, TLS straight away: no header.
        assert!(tls_via(PROXY, gateway, tls.clone()).await.is_err());
        // A device direct from elsewhere is served as it is.
        let mut direct = tls_via(DEVICE, gateway, tls.clone()).await.expect("direct");
        assert!(get(&mut direct).await.starts_with("HTTP/1.1 200"));
    });
    wait_logged(
        &system,
        "Refused a connection from load balancer 127.0.0.5:",
    );
    assert_logged(
        &system.gateway_log,
        "it sent no PROXY header but a TLS handshake",
    );
    let status = system.gateway.as_ref().unwrap().connections_status();
    assert!(
        status["proxy_protocol"]["refused_no_valid_header_from_proxy"].as_u64() >= Some(1),
        "{status}"
    );
    // A header begun and never ended: cut after header_timeout_secs (1 s; 10 s is "no hang").
    std::thread::sleep(Duration::from_millis(1100));
    let cut = system.runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((PROXY, 0))).unwrap();
        let mut tcp = socket.connect(gateway).await.unwrap();
        // v2's signature, its version and command, and no more.
        tcp.write_all(b"\r\n\r\n\0\r\nQUIT\n\x21\x11")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .is_ok()
    });
    assert!(cut, "a stalled PROXY header still open after 10 s");
    wait_logged(
        &system,
        "no complete PROXY header within proxy_protocol.header_timeout_secs (1 s)",
    );
    system.stop();
}
