//! The load generator behind `portcullis bench load`: devices with mutual TLS making HTTP/1.1
//! requests, over kept-alive connections or with a new TLS handshake per request, as fast as
//! answers come (closed loop) or at a fixed total rate, for a duration or a request count.
//!
//! At a fixed rate, latency is measured from when each request was due, not when it was sent,
//! so a stalled server is not hidden by the generator waiting for it (coordinated omission).
//!
//! As a fleet ([`LoadOptions::devices`]): every connection a device with a certificate of its
//! own, from source addresses spread over 127.0.2.0 and up when the server is on loopback
//! (as devices come from many addresses), all connected before the clock starts
//! ([`LoadOptions::connect_first`]), polling at the total rate.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::devices::DeviceSet;

mod target;

use target::{connect_all, fleet_source};
pub use target::{exchange, send, Answer, Identity, Sender, Target};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// HTTP/1.1 keep-alive: one TLS handshake per connection.
    Keepalive,
    /// A new TCP connection and TLS handshake for every request.
    Handshake,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Keepalive => "keepalive",
            Mode::Handshake => "handshake",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `https://host:port/path?query`.
    pub url: String,
    pub ca: Vec<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Concurrent connections (closed loop: requests in flight).
    pub connections: usize,
    pub mode: Mode,
    /// Total requests per second; `None`: as fast as answers come.
    pub rate: Option<f64>,
    /// Stop after this long...
    pub duration: Option<Duration>,
    /// ...or after this many requests, whichever comes first.
    pub requests: Option<u64>,
    /// In handshake mode, resume TLS sessions (devices do); off, every handshake is full.
    pub tls_resumption: bool,
    /// A request that takes longer is an error.
    pub timeout: Duration,
    /// A progress line on standard error while it runs.
    pub progress: bool,
    /// A fleet: connection `n` is device `n` of the set (its own certificate, instead of
    /// `cert`), from a source address of its own group of 500 when the server is on loopback.
    pub devices: Option<DeviceSet>,
    /// Open every connection (256 handshakes at a time) before the clock starts: devices are
    /// connected before they poll, so no request's latency holds a handshake.
    pub connect_first: bool,
    /// Load for this long before the measured run (after connecting), on the same
    /// connections, not counted.
    pub warmup: Duration,
    /// Told when the measured run starts and ends (e.g. to read CPU time there).
    pub marks: Option<Marks>,
}

impl LoadOptions {
    /// Closed loop over `connections` kept-alive connections of one device, for 10 s.
    pub fn new(url: &str, ca: Vec<PathBuf>, connections: usize) -> LoadOptions {
        LoadOptions {
            url: url.to_string(),
            ca,
            cert: None,
            key: None,
            connections,
            mode: Mode::Keepalive,
            rate: None,
            duration: None,
            requests: None,
            tls_resumption: false,
            timeout: Duration::from_secs(30),
            progress: false,
            devices: None,
            connect_first: false,
            warmup: Duration::ZERO,
            marks: None,
        }
    }
}

/// Where a run stands, for [`LoadOptions::marks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    MeasureStart,
    MeasureEnd,
}

/// A callback for each [`Mark`].
#[derive(Clone)]
pub struct Marks(pub Arc<dyn Fn(Mark) + Send + Sync>);

impl std::fmt::Debug for Marks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Marks")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Setup(#[from] probe::ProbeError),
    #[error("{0}")]
    Options(String),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub url: String,
    pub mode: Mode,
    pub connections: usize,
    pub elapsed_s: f64,
    /// Requests answered 2xx.
    pub ok: u64,
    /// Everything else: non-2xx answers and transport failures.
    pub errors: u64,
    /// Errors by what they were: `403 CMGConnector_Clientcertificaterequired`, `tls: ...`.
    pub errors_by_kind: BTreeMap<String, u64>,
    pub rps: f64,
    /// Latency of answered requests (2xx or not).
    pub latency: Latency,
    pub body_bytes: u64,
    /// Devices with a certificate of their own (0: every connection the one `--cert`).
    pub devices: usize,
    /// The total rate asked for (none: closed loop).
    pub rate: Option<f64>,
    /// Connections open before the clock started (`connect_first`).
    pub connected_first: usize,
    /// Connections (devices) with at least one 2xx answer in the measured run.
    pub answered_connections: usize,
}

impl LoadReport {
    pub fn render_text(&self) -> String {
        let l = &self.latency;
        let mut out = format!(
            "{} {} connection(s){}, {} mode, {}, {:.1} s\n  requests: {} ok, {} errors, {:.0} req/s, {:.1} MiB of bodies\n  latency:  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  (mean {:.2} ms)\n",
            self.url,
            self.connections,
            if self.devices > 0 {
                format!(" of {} devices with a certificate each", self.devices)
            } else {
                String::new()
            },
            self.mode.name(),
            match self.rate {
                Some(rate) => format!("open loop at {rate} req/s"),
                None => "closed loop".to_string(),
            },
            self.elapsed_s,
            self.ok,
            self.errors,
            self.rps,
            self.body_bytes as f64 / (1024.0 * 1024.0),
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms,
            l.mean_ms
        );
        if !self.errors_by_kind.is_empty() {
            out.push_str("  errors by kind:\n");
            for (kind, n) in &self.errors_by_kind {
                out.push_str(&format!("    {n:>8}  {kind}\n"));
            }
        }
        out
    }
}

/// What every worker shares.
struct Shared {
    target: Arc<Target>,
    path: String,
    deadline: Option<Instant>,
    /// Requests due before this are made but not counted (the warm-up).
    measure_from: Instant,
    /// Requests started so far, against `requests`.
    started: AtomicU64,
    limit: Option<u64>,
    done: AtomicU64,
    failed: AtomicU64,
    timeout: Duration,
}

impl Shared {
    /// Whether another request may start now.
    fn ticket(&self) -> bool {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        match self.limit {
            Some(limit) => self.started.fetch_add(1, Ordering::Relaxed) < limit,
            None => true,
        }
    }
}

/// One worker's tallies, merged at the end.
struct Tally {
    histogram: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    ok: u64,
    failed: u64,
    bytes: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            // 1 µs to 5 minutes at 3 significant figures: constant bounds that always hold.
            histogram: Histogram::new_with_bounds(1, 300_000_000, 3)
                .expect("constant histogram bounds"),
            errors: BTreeMap::new(),
            ok: 0,
            failed: 0,
            bytes: 0,
        }
    }

    fn error(&mut self, shared: &Shared, kind: String) {
        self.failed += 1;
        shared.failed.fetch_add(1, Ordering::Relaxed);
        *self.errors.entry(kind).or_default() += 1;
    }
}

/// The most connections one run may open.
pub const MAX_CONNECTIONS: usize = 100_000;

pub async fn run(options: &LoadOptions) -> Result<LoadReport, LoadError> {
    if options.connections == 0 || options.connections > MAX_CONNECTIONS {
        return Err(LoadError::Options(format!(
            "--connections must be between 1 and {MAX_CONNECTIONS}"
        )));
    }
    if options.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(LoadError::Options(
            "--rate must be a positive number".into(),
        ));
    }
    if options.devices.as_ref().is_some_and(|d| d.is_empty()) {
        return Err(LoadError::Options("an empty device set".into()));
    }
    let duration = match (options.duration, options.requests) {
        (None, None) => Some(Duration::from_secs(10)),
        (d, _) => d,
    };
    let mut tls = probe::device_tls(
        &options.ca,
        options.cert.as_deref(),
        options.key.as_deref(),
        false,
    )?;
    if options.mode == Mode::Handshake && !options.tls_resumption {
        tls.resumption = rustls::client::Resumption::disabled();
    }
    let target = Arc::new(Target::new(&options.url, tls)?);
    let uri: hyper::Uri = options
        .url
        .parse()
        .map_err(|e| LoadError::Options(format!("URL \"{}\": {e}", options.url)))?;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    // Each connection sends every connections/rate seconds; a rate so small that the interval
    // is not a duration at all is refused rather than allowed to panic.
    let interval = options
        .rate
        .map(|rate| {
            Duration::try_from_secs_f64(options.connections as f64 / rate).map_err(|_| {
                LoadError::Options(format!(
                    "--rate {rate} is too small for {} connections",
                    options.connections
                ))
            })
        })
        .transpose()?;
    let identities: Vec<Identity> = (0..options.connections)
        .map(|n| match &options.devices {
            Some(devices) => Identity {
                tls: Some(devices.tls[n % devices.len()].clone()),
                source: Some(fleet_source(n)),
            },
            None => Identity::default(),
        })
        .collect();
    let mut senders: Vec<Option<Sender>> = (0..options.connections).map(|_| None).collect();
    let mut connected_first = 0;
    if options.connect_first && options.mode == Mode::Keepalive {
        senders = connect_all(&target, &identities, options.progress).await;
        connected_first = senders.iter().filter(|s| s.is_some()).count();
    }
    let started_at = Instant::now();
    let measure_from = started_at + options.warmup;
    let shared = Arc::new(Shared {
        target,
        path,
        deadline: duration.map(|d| measure_from + d),
        measure_from,
        started: AtomicU64::new(0),
        limit: options.requests,
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        timeout: options.timeout,
    });
    let progress = options.progress.then(|| {
        let shared = shared.clone();
        tokio::spawn(progress_line(shared, started_at))
    });
    let start_mark = options.marks.clone().map(|marks| {
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            (marks.0)(Mark::MeasureStart);
        })
    });
    let mut workers = Vec::with_capacity(options.connections);
    for (n, (identity, sender)) in identities.into_iter().zip(senders).enumerate() {
        let shared = shared.clone();
        let mode = options.mode;
        // Spread the first sends over one interval so a fixed rate is smooth from the start.
        let offset = interval.map(|i| i.mul_f64(n as f64 / options.connections as f64));
        workers.push(tokio::spawn(async move {
            let device = Device { identity, sender };
            worker(&shared, mode, interval, offset, started_at, device).await
        }));
    }
    let mut total = Tally::new();
    let mut answered_connections = 0;
    for worker in workers {
        if let Ok(tally) = worker.await {
            if tally.ok > 0 {
                answered_connections += 1;
            }
            let _ = total.histogram.add(&tally.histogram);
            for (kind, n) in tally.errors {
                *total.errors.entry(kind).or_default() += n;
            }
            total.ok += tally.ok;
            total.failed += tally.failed;
            total.bytes += tally.bytes;
        }
    }
    if let Some(marks) = &options.marks {
        if let Some(start) = start_mark {
            // A run shorter than its warm-up still marks its start before its end.
            let _ = start.await;
        }
        (marks.0)(Mark::MeasureEnd);
    }
    if let Some(progress) = progress {
        progress.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    let elapsed = measure_from.elapsed().as_secs_f64();
    let h = &total.histogram;
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(LoadReport {
        url: options.url.clone(),
        mode: options.mode,
        connections: options.connections,
        elapsed_s: elapsed,
        ok: total.ok,
        errors: total.failed,
        errors_by_kind: total.errors,
        rps: if elapsed > 0.0 {
            total.ok as f64 / elapsed
        } else {
            0.0
        },
        latency: if h.is_empty() {
            Latency::default()
        } else {
            Latency {
                p50_ms: ms(h.value_at_quantile(0.50)),
                p90_ms: ms(h.value_at_quantile(0.90)),
                p99_ms: ms(h.value_at_quantile(0.99)),
                p999_ms: ms(h.value_at_quantile(0.999)),
                max_ms: ms(h.max()),
                mean_ms: h.mean() / 1000.0,
            }
        },
        body_bytes: total.bytes,
        devices: options.devices.as_ref().map_or(0, DeviceSet::len),
        rate: options.rate,
        connected_first,
        answered_connections,
    })
}

async fn progress_line(shared: Arc<Shared>, started: Instant) {
    let terminal = std::io::stderr().is_terminal();
    let every = if terminal {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let mut last = 0u64;
    loop {
        tokio::time::sleep(every).await;
        let done = shared.done.load(Ordering::Relaxed);
        let failed = shared.failed.load(Ordering::Relaxed);
        let line = format!(
            "{:>6.1} s  {done} requests  {:.0} req/s now  {failed} errors",
            started.elapsed().as_secs_f64(),
            (done - last) as f64 / every.as_secs_f64()
        );
        last = done;
        if terminal {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }
}

/// The load generator's request: a GET of the URL's path, as a device's client sends it.
fn get(shared: &Shared) -> Result<Request<Full<Bytes>>, String> {
    Request::get(shared.path.as_str())
        .header(hyper::header::HOST, shared.target.authority.as_str())
        .header(hyper::header::USER_AGENT, "SMS CCM 5.0")
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("request: {e}"))
}

/// One connection's device: how it connects, and its connection when opened beforehand.
struct Device {
    identity: Identity,
    sender: Option<Sender>,
}

async fn worker(
    shared: &Shared,
    mode: Mode,
    interval: Option<Duration>,
    offset: Option<Duration>,
    started: Instant,
    device: Device,
) -> Tally {
    let mut tally = Tally::new();
    let Device {
        identity,
        mut sender,
    } = device;
    let mut due = offset.map(|o| started + o);
    while shared.ticket() {
        // At a fixed rate, wait for this request's turn; latency counts from then.
        let from = match (due, interval) {
            (Some(at), Some(step)) => {
                tokio::time::sleep_until(at.into()).await;
                due = Some(at + step);
                at
            }
            _ => Instant::now(),
        };
        let attempt = async {
            // A kept-alive connection the server has since closed is replaced, as a device's
            // HTTP stack does; so is one that fails before any answer (the server closed it
            // while the request was on its way). Neither is the server failing a request.
            let reused = match (mode, sender.take()) {
                (Mode::Keepalive, Some(s)) if !s.is_closed() => Some(s),
                _ => None,
            };
            let was_reused = reused.is_some();
            let mut current = match reused {
                Some(current) => current,
                None => shared.target.connect_as(&identity).await?,
            };
            let answer = match exchange(&mut current, get(shared)?).await {
                Ok(answer) => answer,
                Err(_) if was_reused => {
                    current = shared.target.connect_as(&identity).await?;
                    exchange(&mut current, get(shared)?).await?
                }
                Err(e) => return Err(e),
            };
            if mode == Mode::Keepalive && !current.is_closed() {
                current.ready().await.ok();
                sender = Some(current);
            }
            Ok::<_, String>(answer)
        };
        let outcome = match tokio::time::timeout(shared.timeout, attempt).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("timeout: no answer within {:?}", shared.timeout)),
        };
        let took = from.elapsed();
        shared.done.fetch_add(1, Ordering::Relaxed);
        // A warm-up request is made but not counted, whatever its outcome.
        let counted = from >= shared.measure_from;
        match outcome {
            Ok(_) if !counted => {}
            Err(_) if !counted => {
                sender = None;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(Answer {
                status,
                text,
                body_bytes,
            }) => {
                let _ = tally.histogram.record((took.as_micros() as u64).max(1));
                tally.bytes += body_bytes;
                if (200..300).contains(&status) {
                    tally.ok += 1;
                } else {
                    tally.error(shared, format!("{status} {text}"));
                }
            }
            Err(kind) => {
                sender = None;
                tally.error(shared, kind);
                // A refused or broken connection must not become a hot loop.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tally
}
