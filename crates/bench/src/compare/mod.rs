//! `portcullis bench compare`: the same management point behind each system, the same load.
//!
//! One run, everything on loopback, all state in a temporary directory: a lab PKI, one
//! reference management point (`portcullis mp`, client certificates required) shared by every
//! system, and for each system and mode a fresh bring-up (so peak RSS is that run's), a
//! readiness wait, a warm-up, the measured load, and a stop:
//!
//! - `direct`: devices straight to the management point (no proxy processes);
//! - `portcullis`: `portcullis gateway` and `portcullis connector`;
//! - `nginx+rathole`: nginx terminating device mutual TLS and proxying (TLS with the
//!   connector's client-authentication certificate) into a rathole tunnel, plain TCP between
//!   rathole's server and its client beside the management point;
//! - `nginx`: nginx as a single-hop mutual-TLS reverse proxy.
//!
//! CPU seconds and peak RSS are those of the system's own processes (nginx's workers
//! included), read from `/proc`. Every child is stopped when its run ends, and by a drop
//! guard on any error or panic.
//!
//! Here: the options, the sequence of runs and the median round; `tools` finds nginx, rathole
//! and a baseline build; `systems` brings each system up; `procs` runs and stops their
//! processes; `measure` waits for a system and loads it; `report` prints the table and JSON.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::load::{self, LoadOptions, LoadReport, Mode};
use crate::procstat;

/// The script that installs nginx and rathole, named whenever one is missing.
pub const INSTALL_SCRIPT: &str = "scripts/install-bench-tools.sh";

/// The endpoint id the connector serves the management point under.
const ENDPOINT_ID: u64 = 72057594037927939;
const MP_PATH: &str = "/SMS_MP/.sms_aut?MPLIST";
const DEVICE: &str = "device-001";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum System {
    #[serde(rename = "direct")]
    Direct,
    #[serde(rename = "portcullis")]
    Portcullis,
    /// Portcullis from another binary (`--baseline`, e.g. a build of an earlier commit), run
    /// with the same configuration in the same run, so a change's cost shows side by side.
    #[serde(rename = "portcullis-baseline")]
    PortcullisBaseline,
    #[serde(rename = "nginx+rathole")]
    NginxRathole,
    #[serde(rename = "nginx")]
    Nginx,
}

impl System {
    pub const ALL: [System; 4] = [
        System::Direct,
        System::Portcullis,
        System::NginxRathole,
        System::Nginx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::Direct => "direct",
            System::Portcullis => "portcullis",
            System::PortcullisBaseline => "portcullis-baseline",
            System::NginxRathole => "nginx+rathole",
            System::Nginx => "nginx",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// The `portcullis` binary that runs `mp`, `gateway` and `connector`.
    pub program: PathBuf,
    /// The `portcullis` binary `portcullis-baseline` runs, when that system is asked for.
    pub baseline: Option<PathBuf>,
    pub systems: Vec<System>,
    pub modes: Vec<Mode>,
    /// Concurrent device connections: each system and mode runs once with each count.
    pub connections: Vec<usize>,
    /// The measured load of each run.
    pub duration: Duration,
    /// Load before each measured run, not counted (zero: none).
    pub warmup: Duration,
    /// nginx to use (default: /usr/sbin/nginx, then `nginx` on PATH).
    pub nginx: Option<PathBuf>,
    /// rathole to use (default: `rathole` on PATH, then target/bench-tools/bin/rathole).
    pub rathole: Option<PathBuf>,
    /// How long a system may take to answer its first request.
    pub ready_timeout: Duration,
    /// Keep the temporary directory (configurations, logs, PKI) instead of removing it.
    pub keep: bool,
    /// Progress lines on standard error.
    pub progress: bool,
    /// Times the whole sequence of systems and modes is run; each row is the round with the
    /// median req/s, so a noisy machine's drift touches every system alike.
    pub rounds: usize,
    /// Worker threads of every process under test (the gateway's and the connector's
    /// runtimes, nginx's worker processes, rathole's runtime); none: each one's default.
    pub threads: Option<usize>,
    /// A total request rate (open loop, latency from each request's due time); none: closed
    /// loop, each connection as fast as answers come.
    pub rate: Option<f64>,
    /// A fleet: each connection a device with a certificate of its own, all connected before
    /// the clock starts, the warm-up on the same connections (`--devices`).
    pub fleet: bool,
}

impl CompareOptions {
    pub fn new(program: PathBuf) -> CompareOptions {
        CompareOptions {
            program,
            baseline: None,
            systems: System::ALL.to_vec(),
            modes: vec![Mode::Keepalive, Mode::Handshake],
            connections: vec![32],
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            nginx: None,
            rathole: None,
            ready_timeout: Duration::from_secs(20),
            keep: false,
            progress: true,
            rounds: 1,
            threads: None,
            rate: None,
            fleet: false,
        }
    }
}

/// One system under one mode.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub system: System,
    pub mode: Mode,
    /// Concurrent device connections of the run.
    pub connections: usize,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU seconds of the system's processes over the measured run (0 for `direct`).
    pub cpu_s: f64,
    /// `cpu_s` per request answered in the measured run, in microseconds (0 for `direct`):
    /// what the system spends on a request, apart from the load generator and the management
    /// point that share the machine with it.
    pub cpu_us_per_request: f64,
    /// Sum of the system's processes' peak RSS (0 for `direct`).
    pub peak_rss_mib: f64,
    pub errors: u64,
    pub ok: u64,
    pub p90_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// req/s relative to `portcullis` in the same mode (`None` when it did not run).
    pub vs_portcullis: Option<f64>,
    /// req/s of every round that completed, in the order run; the row is the median one.
    pub rps_rounds: Vec<f64>,
    /// The system's processes measured (0 for `direct`).
    pub processes: usize,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Connections (devices) with at least one 2xx answer in the measured run.
    pub answered_connections: usize,
}

/// A system that was not measured, and why.
#[derive(Debug, Clone, Serialize)]
pub struct NotRun {
    pub system: System,
    /// `None`: every mode (a missing tool).
    pub mode: Option<Mode>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub rows: Vec<Row>,
    /// Systems skipped because a tool is missing.
    pub skipped: Vec<NotRun>,
    /// Runs that failed (the system did not come up, or the load could not start).
    pub failed: Vec<NotRun>,
    /// The connection counts run (`--connections`), in order.
    pub connections: Vec<usize>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub rounds: usize,
    /// Worker threads of each process under test (`--threads`); none: their defaults.
    pub threads: Option<usize>,
    /// The total request rate (`--rate`); none: closed loop.
    pub rate: Option<f64>,
    /// Whether every connection was a device of its own (`--devices`).
    pub fleet: bool,
    /// The kept temporary directory (`--keep`).
    pub dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("{0}")]
    Options(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("making the lab PKI: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("{0}")]
    Start(String),
    #[error("{0}")]
    Load(#[from] load::LoadError),
    #[error("{0}")]
    Config(#[from] runtime::config::ConfigError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CompareError {
    let what = what.into();
    move |source| CompareError::Io { what, source }
}

/// Runs the comparison: every system in `options.systems` under every mode in
/// `options.modes`, one after another. A missing tool skips its system; a system that does not
/// come up is recorded in `failed` and the others still run.
pub fn run(options: &CompareOptions) -> Result<CompareReport, CompareError> {
    if options.systems.is_empty() || options.modes.is_empty() {
        return Err(CompareError::Options(
            "no systems or no modes to compare".into(),
        ));
    }
    // The load generator's own bound, checked before any system is brought up.
    if options.connections.is_empty()
        || options
            .connections
            .iter()
            .any(|&c| c == 0 || c > load::MAX_CONNECTIONS)
    {
        return Err(CompareError::Options(format!(
            "--connections must be between 1 and {} (each of a list)",
            load::MAX_CONNECTIONS
        )));
    }
    if options.duration.is_zero() {
        return Err(CompareError::Options("--duration must be positive".into()));
    }
    if !(1..=100).contains(&options.rounds) {
        return Err(CompareError::Options(
            "--rounds must be between 1 and 100".into(),
        ));
    }
    if options.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(CompareError::Options(
            "--rate must be a positive number".into(),
        ));
    }
    if let Some(reason) = runtime::config::worker_threads_problem(options.threads) {
        return Err(CompareError::Options(format!("--threads: {reason}")));
    }
    let mut systems: Vec<System> = Vec::new();
    for s in &options.systems {
        if !systems.contains(s) {
            systems.push(*s);
        }
    }
    let mut modes: Vec<Mode> = Vec::new();
    for m in &options.modes {
        if !modes.contains(m) {
            modes.push(*m);
        }
    }
    let mut counts: Vec<usize> = Vec::new();
    for c in &options.connections {
        if !counts.contains(c) {
            counts.push(*c);
        }
    }

    let tools = Tools::find(options);
    let mut skipped = Vec::new();
    systems.retain(|&system| match tools.missing_for(system) {
        Some(reason) => {
            if options.progress {
                eprintln!("bench compare: skipping {}: {reason}", system.name());
            }
            skipped.push(NotRun {
                system,
                mode: None,
                reason,
            });
            false
        }
        None => true,
    });

    let tmp = tempfile::Builder::new()
        .prefix("portcullis-bench-")
        .tempdir()
        .map_err(io("creating a temporary directory"))?;
    let outcome = run_in(tmp.path(), options, &tools, &systems, &modes, &counts);
    let dir = if options.keep { Some(tmp.keep()) } else { None };
    let (rows, failed) = match (outcome, &dir) {
        (Ok(outcome), _) => outcome,
        (Err(e), Some(dir)) => {
            return Err(CompareError::Start(format!("{e}\nkept: {}", dir.display())))
        }
        (Err(e), None) => return Err(e),
    };
    Ok(CompareReport {
        rows,
        skipped,
        failed,
        connections: counts,
        duration_s: options.duration.as_secs_f64(),
        warmup_s: options.warmup.as_secs_f64(),
        rounds: options.rounds,
        threads: options.threads,
        rate: options.rate,
        fleet: options.fleet,
        dir,
    })
}

type Outcome = (Vec<Row>, Vec<NotRun>);

fn run_in(
    dir: &Path,
    options: &CompareOptions,
    tools: &Tools,
    systems: &[System],
    modes: &[Mode],
    counts: &[usize],
) -> Result<Outcome, CompareError> {
    let lab = dir.join("lab");
    pki::lab::LabPki::issue(&pki::lab::LabOptions {
        devices: 1,
        ..Default::default()
    })?
    .write(&lab, false)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io("starting the async runtime"))?;
    // A fleet's certificates, issued once for the largest count; a run uses the first ones.
    let devices = if options.fleet {
        let most = counts.iter().copied().max().unwrap_or(1);
        Some(
            crate::devices::DeviceSet::issue_showing(
                &crate::devices::Issuer::lab(&lab),
                most,
                options.progress,
            )
            .map_err(CompareError::Start)?,
        )
    } else {
        None
    };
    let lab = Lab { dir: lab, devices };

    let mut mp = start_mp(dir, &lab, options)?;
    // (mode, connections): what each system is run under, in order.
    let workloads: Vec<(Mode, usize)> = modes
        .iter()
        .flat_map(|&mode| counts.iter().map(move |&c| (mode, c)))
        .collect();
    let mut rounds: Vec<Vec<Row>> = vec![Vec::new(); systems.len() * workloads.len()];
    let mut failed = Vec::new();
    let total = systems.len() * workloads.len() * options.rounds;
    let mut n = 0;
    for round in 1..=options.rounds {
        for (s, &system) in systems.iter().enumerate() {
            for (w, &(mode, connections)) in workloads.iter().enumerate() {
                n += 1;
                let mut what = format!("{} {}", system.name(), mode.name());
                if counts.len() > 1 {
                    what.push_str(&format!(" {connections} devices"));
                }
                if options.rounds > 1 {
                    what.push_str(&format!(" (round {round}/{})", options.rounds));
                }
                let run = Run {
                    system,
                    mode,
                    connections,
                    what: &what,
                    n,
                    total,
                };
                match run_once(&runtime, dir, &lab, &mut mp, tools, options, &run) {
                    Ok(row) => rounds[s * workloads.len() + w].push(row),
                    Err(reason) => failed.push(NotRun {
                        system,
                        mode: Some(mode),
                        reason: if counts.len() > 1 {
                            format!("{connections} devices: {reason}")
                        } else {
                            reason
                        },
                    }),
                }
            }
        }
    }
    let mut rows: Vec<Row> = rounds.into_iter().filter_map(median_round).collect();
    drop(mp);
    let reference: BTreeMap<(&str, usize), f64> = rows
        .iter()
        .filter(|r| r.system == System::Portcullis)
        .map(|r| ((r.mode.name(), r.connections), r.rps))
        .collect();
    for row in &mut rows {
        row.vs_portcullis = reference
            .get(&(row.mode.name(), row.connections))
            .filter(|rps| **rps > 0.0)
            .map(|rps| row.rps / rps);
    }
    Ok((rows, failed))
}

/// One run: a system under one mode and one connection count, and where it stands in the
/// sequence (for the progress lines).
struct Run<'a> {
    system: System,
    mode: Mode,
    connections: usize,
    what: &'a str,
    n: usize,
    total: usize,
}

/// One run, the system brought up fresh: its row, or why it could not be measured.
fn run_once(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    lab: &Lab,
    mp: &mut Mp,
    tools: &Tools,
    options: &CompareOptions,
    run: &Run,
) -> Result<Row, String> {
    let Run {
        system,
        mode,
        connections,
        what,
        n,
        total,
    } = *run;
    if options.progress {
        eprintln!(
            "bench compare [{n}/{total}] {what}: starting; then {:.1} s warm-up, {:.1} s measured, {connections} connections",
            options.warmup.as_secs_f64(),
            options.duration.as_secs_f64(),
        );
    }
    let run_dir = dir.join(format!("{}-{}-{connections}", slug(system), mode.name()));
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| format!("creating {}: {e}", run_dir.display()))?;
    let measured =
        bring_up(system, &run_dir, lab, mp, tools, options, connections).and_then(|mut up| {
            measure(runtime, &mut up, lab, mode, connections, options, mp)
                .map_err(|e| format!("{e}{}", up.tails()))
        });
    match measured {
        Ok((report, cpu_s, peak_rss_kib, processes)) => {
            if options.progress {
                eprintln!(
                    "bench compare [{n}/{total}] {what}: {:.0} req/s, p99 {:.2} ms, {} errors",
                    report.rps, report.latency.p99_ms, report.errors
                );
            }
            Ok(Row {
                system,
                mode,
                connections,
                rps: report.rps,
                p50_ms: report.latency.p50_ms,
                p99_ms: report.latency.p99_ms,
                cpu_s,
                cpu_us_per_request: if report.ok > 0 {
                    cpu_s * 1e6 / report.ok as f64
                } else {
                    0.0
                },
                peak_rss_mib: peak_rss_kib as f64 / 1024.0,
                errors: report.errors,
                ok: report.ok,
                p90_ms: report.latency.p90_ms,
                p999_ms: report.latency.p999_ms,
                max_ms: report.latency.max_ms,
                vs_portcullis: None,
                rps_rounds: vec![report.rps],
                processes,
                errors_by_kind: report.errors_by_kind,
                answered_connections: report.answered_connections,
            })
        }
        Err(reason) => {
            if options.progress {
                eprintln!("bench compare [{n}/{total}] {what}: FAILED: {reason}");
            }
            Err(reason)
        }
    }
}

/// The round with the median req/s (the lower middle of an even count), carrying every
/// round's req/s, and errors and requests summed over the rounds so none is hidden.
fn median_round(mut runs: Vec<Row>) -> Option<Row> {
    let all: Vec<f64> = runs.iter().map(|r| r.rps).collect();
    let errors: u64 = runs.iter().map(|r| r.errors).sum();
    let ok: u64 = runs.iter().map(|r| r.ok).sum();
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for run in &runs {
        for (kind, count) in &run.errors_by_kind {
            *kinds.entry(kind.clone()).or_default() += count;
        }
    }
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    let middle = runs.len().checked_sub(1)? / 2;
    let mut row = runs.swap_remove(middle);
    row.rps_rounds = all;
    row.errors = errors;
    row.ok = ok;
    row.errors_by_kind = kinds;
    Some(row)
}

fn slug(system: System) -> &'static str {
    match system {
        System::NginxRathole => "nginx-rathole",
        other => other.name(),
    }
}

/// The lab PKI's files, and the fleet's device identities (`--devices`).
struct Lab {
    dir: PathBuf,
    devices: Option<crate::devices::DeviceSet>,
}

impl Lab {
    fn file(&self, relative: &str) -> PathBuf {
        self.dir.join(relative)
    }
    fn root(&self) -> PathBuf {
        self.file(pki::lab::layout::ROOT_CERT)
    }
    fn device(&self) -> (PathBuf, PathBuf) {
        let devices = self.file(pki::lab::layout::DEVICES);
        (
            devices.join(format!("{DEVICE}.crt")),
            devices.join(format!("{DEVICE}.key")),
        )
    }
}

/// A path as a TOML (and nginx) quoted string.
fn q(path: &Path) -> String {
    serde_json::Value::String(path.to_string_lossy().into_owned()).to_string()
}

fn write(path: &Path, contents: &str) -> Result<(), CompareError> {
    std::fs::write(path, contents).map_err(io(format!("writing {}", path.display())))
}

/// Free TCP ports on 127.0.0.1, all different (each listener is held until all are chosen).
pub(crate) fn free_ports(n: usize) -> Result<Vec<u16>, CompareError> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io("finding a free port on 127.0.0.1"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io("finding a free port on 127.0.0.1"))
}

mod measure;
pub(crate) mod procs;
mod report;
mod systems;
mod tools;

use measure::*;
use procs::*;
use systems::*;
use tools::*;

#[cfg(test)]
mod tests;
