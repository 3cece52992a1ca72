//! One load-generator process of `bench connections`: this binary re-run as the hidden
//! `portcullis bench connections-worker`, holding its share of the connections (a process may
//! hold only so many descriptors). It talks to the bench over its standard input and output,
//! one JSON object or word a line:
//!
//! ```text
//! bench -> worker   {Job}                 what to open: targets, sources, certificates
//! worker -> bench   {"phase":"issuing",..} every 1,000 certificates, then {"phase":"ready"}
//! bench -> worker   open
//! worker -> bench   {"phase":"opening",..} every second, then {"phase":"opened",..}
//! bench -> worker   request               (--request) one request on every open connection
//! worker -> bench   {"phase":"requesting",..} every second, then {"phase":"requested",..}
//! bench -> worker   report
//! worker -> bench   {"phase":"held",..}   connections still open, per target, and its RSS
//! bench -> worker   (end of input)        the worker closes everything and exits
//! ```
//!
//! End of input at any point ends the worker, so it never outlives the bench.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::devices::{DeviceSet, Issuer};

/// What one worker opens: connections `first .. first + count` of the whole bench.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub ca_cert: std::path::PathBuf,
    pub ca_key: std::path::PathBuf,
    pub first: usize,
    pub count: usize,
    /// Distinct certificates this worker issues and uses in turn.
    pub devices: usize,
    /// Gateway instances: connection `i` of the bench goes to `targets[i % len]`.
    pub targets: Vec<SocketAddr>,
    /// Source addresses of the whole bench: connection `i` binds `source(i % sources)`.
    pub sources: usize,
    /// Handshakes in flight at once in this worker.
    pub concurrency: usize,
    pub request_first: bool,
}

/// In the order they come: a status never goes back to an earlier one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Issuing,
    Ready,
    Opening,
    Opened,
    Requesting,
    Requested,
    Held,
}

/// A worker's state, as it reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub phase: Phase,
    pub issued: usize,
    pub opened: usize,
    pub answered: usize,
    pub failed: usize,
    pub failures: BTreeMap<String, usize>,
    /// Seconds from `open` to the last handshake (or failure).
    pub open_s: f64,
    /// Connections whose request is done (answered or failed), with `--request`.
    pub requested: usize,
    pub held: usize,
    pub held_per_target: Vec<usize>,
    pub rss_kib: u64,
}

/// The `n`th source address (0-based): 127.0.1.1, 127.0.1.2, ... then 127.0.2.x.
pub fn source(n: usize) -> Ipv4Addr {
    let n = n as u32 + 1;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 1, 0)) + n + n / 255)
}

fn say(status: &Status) {
    let mut out = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(status) {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// The worker: reads its job from standard input and follows the protocol above.
pub fn main() -> Result<(), String> {
    runtime::listener::raise_fd_limit();
    let (lines, commands) = std::sync::mpsc::channel::<String>();
    // Standard input, line by line; end of input (or an error) ends the channel.
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(line) => {
                    if lines.send(line).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    let job: Job = commands
        .recv()
        .map_err(|_| "no job on standard input".to_string())
        .and_then(|line| serde_json::from_str(&line).map_err(|e| format!("job: {e}")))?;
    if job.targets.is_empty() || job.sources == 0 {
        return Err("job: no targets or no sources".into());
    }
    let issuer = Issuer {
        ca_cert: job.ca_cert.clone(),
        ca_key: job.ca_key.clone(),
        server_roots: vec![job.ca_cert.clone()],
    };
    let devices = DeviceSet::issue(
        &issuer,
        job.first,
        job.devices.clamp(1, job.count.max(1)),
        &mut |n| {
            say(&Status {
                issued: n,
                ..Status::default()
            })
        },
    )?;
    say(&Status {
        phase: Phase::Ready,
        issued: devices.len(),
        ..Status::default()
    });
    match commands.recv().as_deref() {
        Ok("open") => {}
        _ => return Ok(()),
    }
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(hold(&job, &devices, commands));
    Ok(())
}

/// Counters the connections' tasks share.
#[derive(Default)]
struct Counts {
    opened: AtomicUsize,
    answered: AtomicUsize,
    failed: AtomicUsize,
    requested: AtomicUsize,
    failures: Mutex<BTreeMap<String, usize>>,
}

impl Counts {
    fn fail(&self, kind: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        *self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_default() += 1;
    }

    fn status(&self, phase: Phase, issued: usize) -> Status {
        Status {
            phase,
            issued,
            opened: self.opened.load(Ordering::Relaxed),
            answered: self.answered.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            requested: self.requested.load(Ordering::Relaxed),
            failures: self
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            ..Status::default()
        }
    }
}

/// A progress line every second, in `phase`, until aborted.
fn ticker(counts: &Arc<Counts>, phase: Phase, issued: usize) -> tokio::task::JoinHandle<()> {
    let counts = counts.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            say(&counts.status(phase, issued));
        }
    })
}

/// Opens the job's connections (TLS only), then on `request` makes one request on each
/// (`--request`), reports, holds them until told to report again, and ends at the end of
/// input.
async fn hold(job: &Job, devices: &DeviceSet, commands: std::sync::mpsc::Receiver<String>) {
    let name = match rustls_pki_types::ServerName::try_from("localhost") {
        Ok(name) => name,
        Err(_) => return,
    };
    // Commands arrive on a blocking channel: wait for them off the runtime's threads.
    let (tx, mut commands_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        while let Ok(line) = commands.recv() {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let concurrency = job.concurrency.max(1);
    let gate = Arc::new(Semaphore::new(concurrency));
    let counts = Arc::new(Counts::default());
    let held: Arc<Vec<AtomicUsize>> =
        Arc::new(job.targets.iter().map(|_| AtomicUsize::new(0)).collect());
    let issued = devices.len();
    let started = Instant::now();
    let ticking = ticker(&counts, Phase::Opening, issued);
    let (release, released) = tokio::sync::watch::channel(false);
    let (go, requests) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::with_capacity(job.count);
    for j in 0..job.count {
        let i = job.first + j;
        let source = source(i % job.sources);
        let t = i % job.targets.len();
        let target = job.targets[t];
        let Ok(permit) = gate.clone().acquire_owned().await else {
            break;
        };
        let connector = devices.tls[j % devices.len()].clone();
        let name = name.clone();
        let (counts, held, gate) = (counts.clone(), held.clone(), gate.clone());
        let (mut released, mut requests) = (released.clone(), requests.clone());
        let request_first = job.request_first;
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
                connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("tls: {e}"))
            };
            let outcome = match tokio::time::timeout(Duration::from_secs(30), attempt).await {
                Ok(outcome) => outcome,
                Err(_) => Err("timeout: 30 s".to_string()),
            };
            drop(permit);
            let tls = match outcome {
                Ok(tls) => tls,
                Err(kind) => return counts.fail(kind),
            };
            counts.opened.fetch_add(1, Ordering::Relaxed);
            held[t].fetch_add(1, Ordering::Relaxed);
            let kept = if request_first {
                // The request waits for the bench's word, so that every connection has made
                // it within the gateway's HTTP/1.1 keep-alive bound when memory is read.
                tokio::select! {
                    _ = requests.wait_for(|go| *go) => {}
                    _ = released.changed() => {
                        held[t].fetch_sub(1, Ordering::Relaxed);
                        return;
                    }
                }
                let asked = match gate.acquire().await {
                    Ok(_permit) => tokio::time::timeout(
                        Duration::from_secs(30),
                        super::ask_service_metadata(tls),
                    )
                    .await
                    .unwrap_or_else(|_| Err("request: timeout: 30 s".into())),
                    Err(_) => Err("request: no permit".into()),
                };
                counts.requested.fetch_add(1, Ordering::Relaxed);
                match asked {
                    Ok(kept) => {
                        counts.answered.fetch_add(1, Ordering::Relaxed);
                        super::Held::Http(kept)
                    }
                    Err(kind) => {
                        held[t].fetch_sub(1, Ordering::Relaxed);
                        return counts.fail(kind);
                    }
                }
            } else {
                super::Held::Tls(Box::new(tls))
            };
            super::idle(kept, &mut released).await;
            held[t].fetch_sub(1, Ordering::Relaxed);
        }));
    }
    // Every attempt has finished its handshake (or failed) once all permits are free again.
    drop(gate.acquire_many(concurrency as u32).await);
    let open_s = started.elapsed().as_secs_f64();
    ticking.abort();
    let mut opened = counts.status(Phase::Opened, issued);
    opened.open_s = open_s;
    say(&opened);
    while let Some(command) = commands_rx.recv().await {
        match command.as_str() {
            "request" => {
                let ticking = ticker(&counts, Phase::Requesting, issued);
                let _ = go.send(true);
                // Bounded: each request gives up after 30 s; a connection the gateway closed
                // meanwhile fails at once.
                let deadline = Instant::now() + Duration::from_secs(120 + job.count as u64 / 100);
                while counts.requested.load(Ordering::Relaxed)
                    < counts.opened.load(Ordering::Relaxed)
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                ticking.abort();
                let mut requested = counts.status(Phase::Requested, issued);
                requested.open_s = open_s;
                say(&requested);
            }
            "report" => {
                let per_target: Vec<usize> =
                    held.iter().map(|n| n.load(Ordering::Relaxed)).collect();
                let mut report = counts.status(Phase::Held, issued);
                report.open_s = open_s;
                report.held = per_target.iter().sum();
                report.held_per_target = per_target;
                report.rss_kib = crate::procstat::rss_kib(std::process::id()).unwrap_or(0);
                say(&report);
            }
            _ => {}
        }
    }
    let _ = release.send(true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
}
