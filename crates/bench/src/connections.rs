//! `portcullis bench connections`: many idle device connections with mutual TLS held open to
//! one gateway, to measure what each costs the gateway in memory and how fast they open.
//!
//! The bench starts its own gateway process (this binary, a fresh lab PKI) so it can read the
//! gateway's memory, opens the connections from many source addresses across 127.0.0.0/8 (one
//! address has only some 28,000 ports toward one server port), holds them, and reads the
//! gateway's resident memory again.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

#[derive(Debug, Clone)]
pub struct ConnectionsOptions {
    /// This very binary: the gateway is started from it.
    pub program: PathBuf,
    pub count: usize,
    /// Handshakes in flight at once while opening.
    pub concurrency: usize,
    /// How long to hold the connections before measuring.
    pub hold: Duration,
    /// Each connection first asks the gateway for its ServiceMetadata (HTTP/1.1 keep-alive)
    /// and reads the answer, then idles: a device between two polls, which is how a fleet's
    /// connections mostly sit. Without it the connections idle before their first request.
    pub request_first: bool,
    /// Distinct device certificates, used in turn (0: one per connection, as a fleet has).
    /// With fewer, connections share certificates, and with them the gateway's judgement of
    /// each, which a fleet of distinct devices does not.
    pub devices: usize,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectionsReport {
    pub requested: usize,
    pub opened: usize,
    /// Connections still open after the hold.
    pub held: usize,
    pub failures: BTreeMap<String, usize>,
    pub open_s: f64,
    pub opened_per_s: f64,
    pub gateway_rss_before_mib: f64,
    pub gateway_rss_after_mib: f64,
    /// (after - before) / held, in KiB.
    pub rss_per_connection_kib: f64,
    /// The open-file limit of this process (the gateway raises its own likewise).
    pub fd_limit: u64,
    pub source_addresses: usize,
    /// Whether each connection made one request before idling (`--request`).
    pub request_first: bool,
    /// Connections whose request was answered (2xx, body read to its end).
    pub answered: usize,
    /// Distinct device certificates the connections presented.
    pub devices: usize,
}

impl ConnectionsReport {
    pub fn render_text(&self) -> String {
        let mut out = format!(
            "{} of {} idle mutual-TLS connections{} opened in {:.2} s ({:.0}/s) from {} source addresses with {} device certificate(s); {} still open after the hold\n  gateway RSS: {:.1} MiB before, {:.1} MiB after: {:.1} KiB per connection\n  open-file limit: {}\n",
            self.opened,
            self.requested,
            if self.request_first {
                " (each after one keep-alive request)"
            } else {
                ""
            },
            self.open_s,
            self.opened_per_s,
            self.source_addresses,
            self.devices,
            self.held,
            self.gateway_rss_before_mib,
            self.gateway_rss_after_mib,
            self.rss_per_connection_kib,
            self.fd_limit
        );
        for (kind, n) in &self.failures {
            out.push_str(&format!("  failed: {n} x {kind}\n"));
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionsError {
    #[error("{0}")]
    Setup(String),
}

/// Connections per source address: one address has 28,232 ephemeral ports, but the kernel finds
/// a free one for bind() more slowly the more are taken, so few per address opens fastest.
const PER_SOURCE: usize = 1_000;

/// Kills the gateway when the bench ends, however it ends.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Resident memory of `pid` in KiB (VmRSS), 0 when unreadable.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// A `kB` line of /proc/<pid>/status.
pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn free_port() -> Result<u16, ConnectionsError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ConnectionsError::Setup(format!("no free port: {e}")))
}

fn start_gateway(
    program: &Path,
    dir: &Path,
    count: usize,
) -> Result<(Gateway, u16), ConnectionsError> {
    let setup =
        |what: &str, e: &dyn std::fmt::Display| ConnectionsError::Setup(format!("{what}: {e}"));
    pki::lab::LabPki::issue(&pki::lab::LabOptions::default())
        .and_then(|lab| lab.write(dir, false))
        .map_err(|e| setup("lab PKI", &e))?;
    let port = free_port()?;
    // Written where the lab is, so the lab's relative paths hold.
    let mut gateway = gateway::GatewayConfig::lab();
    gateway.listen = SocketAddr::from(([127, 0, 0, 1], port));
    gateway.log.file = Some("gateway.log".into());
    gateway.log.console = logs::logger::ConsoleSetting::Off;
    held_open(&mut gateway, count);
    let config = dir.join("gateway.toml");
    gateway
        .write(&config)
        .map_err(|e| setup("writing gateway.toml", &e))?;
    let child = Command::new(program)
        .args(["gateway", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| setup(&format!("starting {}", program.display()), &e))?;
    let gateway = Gateway(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
            return Err(ConnectionsError::Setup(format!(
                "the gateway did not listen on {port} within 20 s; its log:\n{log}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((gateway, port))
}

/// The gateway settings that let the bench hold `count` connections that never send a
/// request (or idle after one) for as long as it likes: caps above the count, from any one
/// source address too, and the first-request and idle deadlines at their longest. A gateway
/// facing devices keeps its defaults (see `GatewayConfig`).
fn held_open(config: &mut gateway::GatewayConfig, count: usize) {
    config.max_connections = count + 64;
    config.max_connections_per_address = count + 64;
    config.handshake_timeout_secs = 60;
    config.first_request_timeout_secs = 86_400;
    config.idle_timeout_secs = 86_400;
}

pub async fn run(options: &ConnectionsOptions) -> Result<ConnectionsReport, ConnectionsError> {
    let fd_limit = runtime::listener::raise_fd_limit();
    if options.count == 0 {
        return Err(ConnectionsError::Setup("--count must be at least 1".into()));
    }
    // Each connection is one descriptor here and one in the gateway.
    if fd_limit > 0 && options.count as u64 + 64 > fd_limit {
        return Err(ConnectionsError::Setup(format!(
            "--count {} needs more open files than this machine allows ({fd_limit}: `ulimit -Hn`); the gateway needs as many. Raise the hard limit (as root: ulimit -Hn, or LimitNOFILE= in a systemd unit) or ask for fewer",
            options.count
        )));
    }
    let dir = tempfile_dir()?;
    let (gateway, port) = start_gateway(&options.program, dir.path(), options.count)?;
    let pid = gateway.0.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid);

    let devices = if options.devices == 0 {
        options.count
    } else {
        options.devices.min(options.count)
    };
    let connectors = device_connectors(dir.path(), devices, options.progress)?;
    let name = rustls_pki_types::ServerName::try_from("localhost")
        .map_err(|e| ConnectionsError::Setup(e.to_string()))?;
    let target = SocketAddr::from(([127, 0, 0, 1], port));
    let sources = options.count.div_ceil(PER_SOURCE).max(1);
    let gate = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let opened = Arc::new(AtomicUsize::new(0));
    let open_now = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let started = Instant::now();
    let progress = options.progress.then(|| {
        let opened = opened.clone();
        let count = options.count;
        tokio::spawn(async move {
            let terminal = std::io::stderr().is_terminal();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let line = format!(
                    "{:>5.1} s  {} of {count} connections open",
                    started.elapsed().as_secs_f64(),
                    opened.load(Ordering::Relaxed)
                );
                if terminal {
                    eprint!("\r{line}   ");
                } else {
                    eprintln!("{line}");
                }
            }
        })
    });
    let mut tasks = Vec::with_capacity(options.count);
    let (release, released) = tokio::sync::watch::channel(false);
    for i in 0..options.count {
        // 127.0.1.1, 127.0.1.2, ... (then 127.0.2.x ...): spread so no address runs short.
        let n = (i % sources) as u32 + 1;
        let source = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 1, 0)) + n + n / 255);
        let permit = gate.clone().acquire_owned().await;
        let connector = connectors[i % connectors.len()].clone();
        let name = name.clone();
        let opened = opened.clone();
        let open_now = open_now.clone();
        let answered = answered.clone();
        let failures = failures.clone();
        let mut released = released.clone();
        let request_first = options.request_first;
        tasks.push(tokio::spawn(async move {
            let attempt = async {
                let socket =
                    tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {}", e.kind()))?;
                socket
                    .bind(SocketAddr::from((source, 0)))
                    .map_err(|e| format!("bind {source}: {}", e.kind()))?;
                let tcp = socket
                    .connect(target)
                    .await
                    .map_err(|e| format!("connect: {}", e.kind()))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("tls: {e}"))?;
                if request_first {
                    ask_service_metadata(tls).await.map(Held::Http)
                } else {
                    Ok(Held::Tls(Box::new(tls)))
                }
            };
            let stream = tokio::time::timeout(Duration::from_secs(30), attempt).await;
            drop(permit);
            let held = match stream {
                Ok(Ok(stream)) => stream,
                Ok(Err(kind)) => {
                    *failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(kind)
                        .or_default() += 1;
                    return;
                }
                Err(_) => {
                    *failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry("timeout: 30 s".into())
                        .or_default() += 1;
                    return;
                }
            };
            opened.fetch_add(1, Ordering::Relaxed);
            open_now.fetch_add(1, Ordering::Relaxed);
            if matches!(held, Held::Http(_)) {
                answered.fetch_add(1, Ordering::Relaxed);
            }
            // Idle: wait for the gateway to close it, or for the bench to end.
            match held {
                Held::Tls(mut stream) => {
                    let mut byte = [0u8; 1];
                    tokio::select! {
                        _ = stream.read(&mut byte) => {}
                        _ = released.changed() => {}
                    }
                }
                Held::Http(mut kept) => {
                    tokio::select! {
                        _ = &mut kept.connection => {}
                        _ = released.changed() => {}
                    }
                    kept.connection.abort();
                }
            }
            open_now.fetch_sub(1, Ordering::Relaxed);
        }));
    }
    // Every attempt has finished its handshake (or failed) once all permits are free again.
    let _all = gate
        .acquire_many(options.concurrency.max(1) as u32)
        .await
        .map_err(|e| ConnectionsError::Setup(e.to_string()))?;
    let open_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(options.hold).await;
    let after = rss_kib(pid);
    let held = open_now.load(Ordering::Relaxed);
    if let Some(progress) = progress {
        progress.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    let _ = release.send(true);
    for task in tasks {
        let _ = task.await;
    }
    drop(gateway);
    let opened = opened.load(Ordering::Relaxed);
    let failures = failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(ConnectionsReport {
        requested: options.count,
        opened,
        held,
        failures,
        open_s,
        opened_per_s: if open_s > 0.0 {
            opened as f64 / open_s
        } else {
            0.0
        },
        gateway_rss_before_mib: before as f64 / 1024.0,
        gateway_rss_after_mib: after as f64 / 1024.0,
        rss_per_connection_kib: if held > 0 {
            after.saturating_sub(before) as f64 / held as f64
        } else {
            0.0
        },
        fd_limit,
        source_addresses: sources,
        request_first: options.request_first,
        answered: answered.load(Ordering::Relaxed),
        devices,
    })
}

/// TLS clients for `devices` device certificates, issued here by the lab's root CA (the one the
/// gateway trusts), each its own subject and key.
fn device_connectors(
    lab: &Path,
    devices: usize,
    progress: bool,
) -> Result<Vec<tokio_rustls::TlsConnector>, ConnectionsError> {
    use rustls_pki_types::pem::PemObject;
    let setup = |what: &str, e: &dyn std::fmt::Display| {
        ConnectionsError::Setup(format!("device certificates: {what}: {e}"))
    };
    let read = |name: &str| {
        std::fs::read_to_string(lab.join(name)).map_err(|e| setup(&format!("reading {name}"), &e))
    };
    let ca = pki::lab::LabCa::from_pem(&read("ca/root.crt")?, &read("ca/root.key")?)
        .map_err(|e| setup("the lab root", &e))?;
    let roots = pki::RootSet::load(&[lab.join("ca/root.crt")]).map_err(|e| setup("roots", &e))?;
    let started = Instant::now();
    let mut connectors = Vec::with_capacity(devices);
    for i in 0..devices {
        if progress && i > 0 && i % 2000 == 0 {
            eprintln!(
                "{:>5.1} s  {i} of {devices} device certificates issued",
                started.elapsed().as_secs_f64()
            );
        }
        let device = ca
            .issue(&pki::lab::LeafSpec::client_auth(
                &format!("BENCH-DEVICE-{:05}", i + 1),
                30,
            ))
            .map_err(|e| setup("issuing", &e))?;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(device.key_pem.as_bytes())
            .map_err(|e| setup("a key", &e))?;
        let mut tls = pki::tls::client_config(&roots)
            .map_err(|e| setup("TLS", &e))?
            .with_client_auth_cert(
                vec![rustls_pki_types::CertificateDer::from(device.cert_der)],
                key,
            )
            .map_err(|e| setup("TLS", &e))?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        connectors.push(tokio_rustls::TlsConnector::from(Arc::new(tls)));
    }
    Ok(connectors)
}

type DeviceTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// What an open connection keeps on the bench's side while it idles.
enum Held {
    Tls(Box<DeviceTls>),
    Http(KeptAlive),
}

/// A connection that made its request: the sender (dropping it would close the connection)
/// and the task driving it, which ends when the gateway closes the connection.
struct KeptAlive {
    _sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    connection: tokio::task::JoinHandle<()>,
}

/// One keep-alive `GET /CCM_PROXY_MUTUALAUTH/ServiceMetadata`, answered by the gateway itself
/// (no connector needed), read to its end; the connection stays open.
async fn ask_service_metadata(tls: DeviceTls) -> Result<KeptAlive, String> {
    use http_body_util::BodyExt;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| format!("http: {e}"))?;
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = hyper::Request::get("/CCM_PROXY_MUTUALAUTH/ServiceMetadata")
        .header(hyper::header::HOST, "localhost")
        .body(http_body_util::Empty::new())
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("answer body: {e}"))?;
    if !status.is_success() {
        return Err(format!("answer: HTTP {status}"));
    }
    Ok(KeptAlive {
        _sender: sender,
        connection,
    })
}

fn tempfile_dir() -> Result<tempfile::TempDir, ConnectionsError> {
    tempfile::tempdir().map_err(|e| ConnectionsError::Setup(format!("temporary directory: {e}")))
}
