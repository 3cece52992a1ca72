//! What several features' tests share: device connections over HTTP/1.1 and HTTP/2 with
//! device-001's certificate, raw requests, a system with one channel, and waits on the logs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use testkit::*;

pub type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// A device connection to the gateway, TLS with device-001's certificate, HTTP/1.1, for
/// requests with bodies of type `B`.
pub async fn connect<B>(
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

pub async fn get(sender: &mut Sender, path: &str) -> (u16, bytes::Bytes) {
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

pub fn mp_path() -> String {
    format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}/SMS_MP/.sms_aut?MPLIST")
}

/// Waits (at most 10 s) for a gateway log line containing every one of `words`.
pub fn wait_logged(system: &System, words: &[&str]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = system
            .gateway_log
            .lock()
            .unwrap()
            .iter()
            .any(|l| words.iter().all(|w| l.contains(w)));
        if found || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub const MPLIST: &str = "/SMS_MP/.sms_aut?MPLIST";

/// The usual system with one channel, so that every request shares it.
pub fn one_channel() -> System {
    one_channel_with(|_| {})
}

/// [`one_channel`], with the gateway's configuration changed by `change`.
pub fn one_channel_with(change: impl FnOnce(&mut GatewayConfig)) -> System {
    let system = System::builder()
        .gateway(change)
        .connector(|c, _| c.channels_per_gateway = 1)
        .start();
    assert!(system.wait_for_channels(1));
    system
}

/// How many channels the gateway's log says were opened.
pub fn channels_opened(system: &System) -> usize {
    system
        .gateway_log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(" opened channel "))
        .count()
}

pub fn proxied(path: &str) -> String {
    format!("/CCM_PROXY_MUTUALAUTH/{ENDPOINT}{path}")
}

/// device-001's TLS client offering h2.
pub fn h2_tls(system: &System) -> Arc<rustls::ClientConfig> {
    Arc::new(
        probe::device_tls(
            &[system.path("ca/root.crt")],
            Some(&system.path("devices/device-001.crt")),
            Some(&system.path("devices/device-001.key")),
            true,
        )
        .unwrap(),
    )
}

pub async fn tls_to(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let _ = tcp.set_nodelay(true);
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap()
}

/// An HTTP/2 device connection (the `h2` crate: it sends frames as the test says).
pub async fn h2_device(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> h2::client::SendRequest<Bytes> {
    let stream = tls_to(port, tls).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // A large window, and so a large budget for small frames: the device here is the
    // attacker, not what is judged.
    let (sender, connection) = h2::client::Builder::new()
        .initial_connection_window_size(16 * 1024 * 1024)
        .handshake::<_, Bytes>(stream)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender.ready().await.unwrap()
}

pub fn h2_uri(path: &str) -> String {
    format!("https://localhost{}", proxied(path))
}

/// An h2 response's status and whole body.
pub async fn h2_answer(response: h2::client::ResponseFuture) -> Result<(u16, Vec<u8>), h2::Error> {
    let response = response.await?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(data) = body.data().await {
        let data = data?;
        let _ = body.flow_control().release_capacity(data.len());
        bytes.extend_from_slice(&data);
    }
    Ok((status, bytes))
}

/// A raw HTTP/1.1 device connection: requests written as the test writes them, answers read
/// one by one (pipelining allowed).
pub struct Raw {
    pub stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    pub buf: Vec<u8>,
}

#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Raw {
    pub async fn connect(port: u16, tls: Arc<rustls::ClientConfig>) -> Raw {
        Raw {
            stream: tls_to(port, tls).await,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    pub async fn fill(&mut self) {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut chunk))
            .await
            .expect("an answer within 30 s")
            .unwrap_or(0);
        assert!(n > 0, "the gateway closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Up to the next CRLF, taken out of the buffer.
    pub async fn line(&mut self) -> String {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return line;
            }
            self.fill().await;
        }
    }

    pub async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            self.fill().await;
        }
        self.buf.drain(..n).collect()
    }

    pub async fn answer(&mut self) -> Answer {
        let status_line = self.line().await;
        let mut parts = status_line.splitn(3, ' ');
        let _version = parts.next();
        let status = parts.next().unwrap_or("0").parse().unwrap_or(0);
        let reason = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_string(), value.trim().to_string()));
            }
        }
        let mut answer = Answer {
            status,
            reason,
            headers,
            body: Vec::new(),
        };
        if let Some(length) = answer.header("content-length") {
            let length: usize = length.parse().unwrap();
            answer.body = self.take(length).await;
        } else if answer
            .header("transfer-encoding")
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let size = usize::from_str_radix(self.line().await.trim(), 16).unwrap();
                let chunk = self.take(size + 2).await;
                if size == 0 {
                    break;
                }
                answer.body.extend_from_slice(&chunk[..size]);
            }
        }
        answer
    }
}

/// The first line of the gateway's log that holds `words`, and what `portcullis doctor logs`
/// finds in it written as a CMTrace record (the gateway's file format).
pub fn doctor_on_gateway_line(
    system: &System,
    words: &str,
) -> (String, Vec<logs::diagnose::Finding>) {
    let line = system
        .gateway_log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains(words))
        .cloned()
        .unwrap_or_else(|| panic!("no gateway log line holds {words:?}"));
    let record = logs::cmtrace::Line {
        message: &line,
        component: "SMS_CLOUD_PROXY_GATEWAY",
        severity: logs::cmtrace::Severity::Warning,
        thread: 1,
        at: time::OffsetDateTime::now_utc(),
    }
    .format()
        + "\r\n";
    let rules = logs::diagnose::Rules::builtin().unwrap();
    let mut diagnosis = logs::diagnose::Diagnosis::new(&rules);
    diagnosis
        .read_from(record.as_bytes(), "gateway.log")
        .unwrap();
    (line, diagnosis.finish().findings)
}
