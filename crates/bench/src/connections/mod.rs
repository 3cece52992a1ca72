//! `portcullis bench connections`: many idle device connections with mutual TLS held open to
//! one gateway or a set of gateway instances, to measure what each costs a gateway in memory
//! and how fast they open.
//!
//! The bench starts its own gateway processes (this binary, a fresh lab PKI), instance `k` on
//! 127.0.0.`k` (each address its own port space toward it), reads their memory, and has
//! load-generator processes ([`worker`]: this binary again, a hidden subcommand) open the
//! connections: a process may hold only so many descriptors (`ulimit -Hn`), so as many
//! processes as that needs. Connection `i` goes to instance `i % instances` from source address
//! `i % sources` across 127.0.1.0 and up (one source address has some 28,000 ephemeral ports,
//! taken by bind() whatever the destination), with a certificate of its own. Once all are
//! open and held, the gateways' resident memory is read again.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncReadExt;

mod generators;
pub mod worker;

use generators::{spawn_generators, ProgressLine};
use worker::{Job, Phase, Status};

#[derive(Debug, Clone)]
pub struct ConnectionsOptions {
    /// This very binary: the gateways and the load generators are started from it.
    pub program: PathBuf,
    pub count: usize,
    /// Gateway instances, on 127.0.0.1, 127.0.0.2, ...; connections spread evenly.
    pub instances: usize,
    /// Handshakes in flight at once while opening, over all load generators.
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
    /// Connections per load-generator process (0: as many as the open-file limit allows).
    pub per_process: usize,
    pub progress: bool,
}

/// One gateway instance's share.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceReport {
    pub address: SocketAddr,
    /// Connections to it still open after the hold.
    pub held: usize,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    /// (after - before) / held, in KiB.
    pub rss_per_connection_kib: f64,
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
    /// With `--request`: seconds for every open connection to make its request, once all were
    /// open (0 without).
    pub request_s: f64,
    /// Summed over the instances.
    pub gateway_rss_before_mib: f64,
    pub gateway_rss_after_mib: f64,
    /// Over all instances: (after - before) / held, in KiB.
    pub rss_per_connection_kib: f64,
    /// Each gateway instance: its address, connections held, its RSS per connection.
    pub instances: Vec<InstanceReport>,
    /// Load-generator processes, and their summed RSS with everything held.
    pub processes: usize,
    pub generator_rss_mib: f64,
    /// The open-file limit of this process (the gateways and load generators raise theirs
    /// likewise).
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
            "{} of {} idle mutual-TLS connections{} opened in {:.2} s ({:.0}/s) to {} gateway instance(s) from {} load-generator process(es), {} source addresses, {} device certificate(s); {} still open after the hold\n",
            self.opened,
            self.requested,
            if self.request_first {
                " (each then making one keep-alive request)"
            } else {
                ""
            },
            self.open_s,
            self.opened_per_s,
            self.instances.len(),
            self.processes,
            self.source_addresses,
            self.devices,
            self.held,
        );
        if self.request_first {
            out.push_str(&format!(
                "  then every one made its request: {} answered in {:.2} s\n",
                self.answered, self.request_s
            ));
        }
        out.push_str(&format!(
            "  {:<22} {:>8} {:>12} {:>12} {:>15}\n",
            "instance", "held", "RSS before", "RSS after", "KiB/connection"
        ));
        for i in &self.instances {
            out.push_str(&format!(
                "  {:<22} {:>8} {:>8.1} MiB {:>8.1} MiB {:>15.1}\n",
                i.address.to_string(),
                i.held,
                i.rss_before_mib,
                i.rss_after_mib,
                i.rss_per_connection_kib
            ));
        }
        out.push_str(&format!(
            "  {:<22} {:>8} {:>8.1} MiB {:>8.1} MiB {:>15.1}\n  load generators: {} process(es), {:.1} MiB RSS in all\n  open-file limit: {}\n",
            "all",
            self.held,
            self.gateway_rss_before_mib,
            self.gateway_rss_after_mib,
            self.rss_per_connection_kib,
            self.processes,
            self.generator_rss_mib,
            self.fd_limit
        ));
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

/// Descriptors a load generator keeps for itself beside its connections.
const GENERATOR_SPARE_FDS: u64 = 512;

/// The most gateway instances (each its own loopback address).
pub const MAX_INSTANCES: usize = 64;

/// A child process killed when the bench ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
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

/// A free port on `address`.
fn free_port(address: std::net::Ipv4Addr) -> Result<u16, ConnectionsError> {
    std::net::TcpListener::bind((address, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ConnectionsError::Setup(format!("no free port on {address}: {e}")))
}

/// Gateway instance `n` (1-based) listening on 127.0.0.`n`, holding up to `count`.
fn start_gateway(
    program: &Path,
    dir: &Path,
    n: usize,
    count: usize,
) -> Result<(Killed, SocketAddr), ConnectionsError> {
    let setup =
        |what: &str, e: &dyn std::fmt::Display| ConnectionsError::Setup(format!("{what}: {e}"));
    let address = std::net::Ipv4Addr::new(127, 0, 0, n as u8);
    let listen = SocketAddr::from((address, free_port(address)?));
    // Written where the lab is, so the lab's relative paths hold.
    let mut gateway = gateway::GatewayConfig::lab();
    gateway.listen = listen;
    gateway.log.file = Some(format!("gateway-{n}.log").into());
    gateway.log.console = logs::logger::ConsoleSetting::Off;
    held_open(&mut gateway, count);
    let config = dir.join(format!("gateway-{n}.toml"));
    gateway
        .write(&config)
        .map_err(|e| setup("writing the gateway's configuration", &e))?;
    let child = Command::new(program)
        .args(["gateway", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| setup(&format!("starting {}", program.display()), &e))?;
    Ok((Killed(child), listen))
}

/// Waits, bounded, until every gateway listens.
fn wait_listening(dir: &Path, gateways: &[SocketAddr]) -> Result<(), ConnectionsError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for (k, address) in gateways.iter().enumerate() {
        while std::net::TcpStream::connect(address).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join(format!("gateway-{}.log", k + 1)))
                    .unwrap_or_default();
                return Err(ConnectionsError::Setup(format!(
                    "gateway instance {} did not listen on {address} within 30 s; its log:\n{log}",
                    k + 1
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
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

pub fn run(options: &ConnectionsOptions) -> Result<ConnectionsReport, ConnectionsError> {
    let fd_limit = runtime::listener::raise_fd_limit();
    if options.count == 0 {
        return Err(ConnectionsError::Setup("--count must be at least 1".into()));
    }
    if options.instances == 0 || options.instances > MAX_INSTANCES {
        return Err(ConnectionsError::Setup(format!(
            "--instances must be between 1 and {MAX_INSTANCES}"
        )));
    }
    // Each connection is one descriptor in a gateway instance and one in a load generator.
    let per_instance = options.count.div_ceil(options.instances);
    if fd_limit > 0 && per_instance as u64 + 64 > fd_limit {
        return Err(ConnectionsError::Setup(format!(
            "--count {} over {} instance(s) is {per_instance} connections each, more open files than a process may have here ({fd_limit}: `ulimit -Hn`): ask for more --instances (at least {}), or raise the hard limit (as root: ulimit -Hn, or LimitNOFILE= in a systemd unit)",
            options.count,
            options.instances,
            (options.count as u64).div_ceil(fd_limit.saturating_sub(64).max(1))
        )));
    }
    let most_per_process = if fd_limit > GENERATOR_SPARE_FDS {
        (fd_limit - GENERATOR_SPARE_FDS) as usize
    } else {
        options.count
    };
    let per_process = match options.per_process {
        0 => most_per_process,
        n => n.min(most_per_process),
    };
    let processes = options.count.div_ceil(per_process);
    let dir = tempfile::tempdir()
        .map_err(|e| ConnectionsError::Setup(format!("temporary directory: {e}")))?;
    pki::lab::LabPki::issue(&pki::lab::LabOptions::default())
        .and_then(|lab| lab.write(dir.path(), false))
        .map_err(|e| ConnectionsError::Setup(format!("lab PKI: {e}")))?;
    let mut gateways = Vec::with_capacity(options.instances);
    let mut targets = Vec::with_capacity(options.instances);
    for n in 1..=options.instances {
        let (gateway, address) = start_gateway(&options.program, dir.path(), n, per_instance)?;
        gateways.push(gateway);
        targets.push(address);
    }
    wait_listening(dir.path(), &targets)?;

    let devices = if options.devices == 0 {
        options.count
    } else {
        options.devices.min(options.count)
    };
    let sources = options.count.div_ceil(PER_SOURCE).max(1);
    let issuer = crate::devices::Issuer::lab(dir.path());
    // Processes share the count evenly; each its share of the certificates and handshakes.
    let jobs: Vec<Job> = (0..processes)
        .map(|k| {
            let first = options.count * k / processes;
            let count = options.count * (k + 1) / processes - first;
            Job {
                ca_cert: issuer.ca_cert.clone(),
                ca_key: issuer.ca_key.clone(),
                first,
                count,
                devices: (devices * (k + 1) / processes - devices * k / processes).max(1),
                targets: targets.clone(),
                sources,
                concurrency: (options.concurrency / processes).max(1),
                request_first: options.request_first,
            }
        })
        .collect();
    let issued_devices: usize = jobs.iter().map(|j| j.devices.min(j.count)).sum();
    let started = Instant::now();
    let (mut generators, mut statuses) = spawn_generators(&options.program, &jobs)?;
    let issuing_line = |s: &[Status]| {
        format!(
            "{} of {devices} device certificates issued",
            s.iter().map(|s| s.issued).sum::<usize>()
        )
    };
    // Issuing takes some 0.1 ms a certificate per core, slower on a busy machine.
    let issuing = Duration::from_secs(120 + (devices / 100) as u64);
    statuses.wait_all(
        Phase::Ready,
        issuing,
        started,
        options
            .progress
            .then_some(&issuing_line as &ProgressLine<'_>),
    )?;
    let before: Vec<u64> = gateways.iter().map(|g| rss_kib(g.0.id())).collect();
    let opening = Instant::now();
    for generator in &mut generators {
        generator.tell("open")?;
    }
    let count = options.count;
    let opening_line = move |s: &[Status]| {
        format!(
            "{} of {count} connections open, {} failed",
            s.iter().map(|s| s.opened).sum::<usize>(),
            s.iter().map(|s| s.failed).sum::<usize>()
        )
    };
    // Each connection gives up after 30 s; the bound is far past what the count needs.
    let open_limit = Duration::from_secs(300 + (options.count / 20) as u64);
    statuses.wait_all(
        Phase::Opened,
        open_limit,
        opening,
        options
            .progress
            .then_some(&opening_line as &ProgressLine<'_>),
    )?;
    // From `open` to the last generator's last handshake, as this process saw it.
    let open_s = opening.elapsed().as_secs_f64();
    // With --request, every connection makes its request now that all are open: the gateway
    // closes a kept-alive HTTP/1.1 connection idle for 30 s, which opening 100,000 outlasts.
    let mut request_s = 0.0;
    if options.request_first {
        let requesting = Instant::now();
        for generator in &mut generators {
            generator.tell("request")?;
        }
        let requesting_line = move |s: &[Status]| {
            format!(
                "{} of {count} connections made their request, {} answered",
                s.iter().map(|s| s.requested).sum::<usize>(),
                s.iter().map(|s| s.answered).sum::<usize>()
            )
        };
        statuses.wait_all(
            Phase::Requested,
            open_limit,
            requesting,
            options
                .progress
                .then_some(&requesting_line as &ProgressLine<'_>),
        )?;
        request_s = requesting.elapsed().as_secs_f64();
    }
    std::thread::sleep(options.hold);
    let after: Vec<u64> = gateways.iter().map(|g| rss_kib(g.0.id())).collect();
    for generator in &mut generators {
        generator.tell("report")?;
    }
    statuses.wait_all(Phase::Held, Duration::from_secs(60), started, None)?;
    let finals = statuses.latest.clone();
    // End of input: the generators close their connections and exit.
    for generator in &mut generators {
        generator.stdin = None;
    }
    let stop_deadline = Instant::now() + Duration::from_secs(10);
    for generator in &mut generators {
        while Instant::now() < stop_deadline && matches!(generator.process.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(generators);
    drop(gateways);

    let opened: usize = finals.iter().map(|s| s.opened).sum();
    let held: usize = finals.iter().map(|s| s.held).sum();
    let mut failures = BTreeMap::<String, usize>::new();
    for status in &finals {
        for (kind, n) in &status.failures {
            *failures.entry(kind.clone()).or_default() += n;
        }
    }
    let per_connection = |before: u64, after: u64, held: usize| {
        if held > 0 {
            after.saturating_sub(before) as f64 / held as f64
        } else {
            0.0
        }
    };
    let instances: Vec<InstanceReport> = targets
        .iter()
        .enumerate()
        .map(|(k, &address)| {
            let held: usize = finals
                .iter()
                .map(|s| s.held_per_target.get(k).copied().unwrap_or(0))
                .sum();
            InstanceReport {
                address,
                held,
                rss_before_mib: before[k] as f64 / 1024.0,
                rss_after_mib: after[k] as f64 / 1024.0,
                rss_per_connection_kib: per_connection(before[k], after[k], held),
            }
        })
        .collect();
    let (before_all, after_all): (u64, u64) = (before.iter().sum(), after.iter().sum());
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
        request_s,
        gateway_rss_before_mib: before_all as f64 / 1024.0,
        gateway_rss_after_mib: after_all as f64 / 1024.0,
        rss_per_connection_kib: per_connection(before_all, after_all, held),
        instances,
        processes,
        generator_rss_mib: finals.iter().map(|s| s.rss_kib).sum::<u64>() as f64 / 1024.0,
        fd_limit,
        source_addresses: sources,
        request_first: options.request_first,
        answered: finals.iter().map(|s| s.answered).sum(),
        devices: issued_devices,
    })
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

/// Idles on a held connection until the gateway closes it or the bench releases it.
async fn idle(held: Held, released: &mut tokio::sync::watch::Receiver<bool>) {
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
}
