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
    let lab = Lab { dir: lab };

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
    let measured = bring_up(system, &run_dir, lab, mp, tools, options).and_then(|mut up| {
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

/// The lab PKI's files.
struct Lab {
    dir: PathBuf,
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
fn free_ports(n: usize) -> Result<Vec<u16>, CompareError> {
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

// ---------------------------------------------------------------------------------------
// Tools

struct Tools {
    nginx: Result<PathBuf, String>,
    rathole: Result<PathBuf, String>,
    baseline: Result<PathBuf, String>,
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Tools {
    fn find(options: &CompareOptions) -> Tools {
        let nginx = match &options.nginx {
            Some(p) if is_executable(p) => Ok(p.clone()),
            Some(p) => Err(format!(
                "nginx not found at {} (--nginx); {INSTALL_SCRIPT} installs it",
                p.display()
            )),
            None => Some(PathBuf::from("/usr/sbin/nginx"))
                .filter(|p| is_executable(p))
                .or_else(|| on_path("nginx"))
                .ok_or_else(|| {
                    format!(
                        "nginx not found (/usr/sbin/nginx or on PATH); run {INSTALL_SCRIPT} (apt-get install nginx)"
                    )
                }),
        };
        let rathole = match &options.rathole {
            Some(p) if is_executable(p) => Ok(p.clone()),
            Some(p) => Err(format!(
                "rathole not found at {} (--rathole); {INSTALL_SCRIPT} installs it",
                p.display()
            )),
            None => {
                let mut places = vec![PathBuf::from("target/bench-tools/bin/rathole")];
                // target/release/portcullis -> target/bench-tools/bin/rathole
                if let Some(target) = options.program.parent().and_then(Path::parent) {
                    places.push(target.join("bench-tools/bin/rathole"));
                }
                on_path("rathole")
                    .or_else(|| places.into_iter().find(|p| is_executable(p)))
                    .ok_or_else(|| {
                        format!(
                            "rathole not found (on PATH or in target/bench-tools/bin); run {INSTALL_SCRIPT}"
                        )
                    })
            }
        };
        let baseline = match &options.baseline {
            Some(p) if is_executable(p) => Ok(p.clone()),
            Some(p) => Err(format!(
                "the baseline portcullis {} is not an executable file (--baseline)",
                p.display()
            )),
            None => Err("no baseline binary given (--baseline FILE)".into()),
        };
        Tools {
            nginx,
            rathole,
            baseline,
        }
    }

    fn missing_for(&self, system: System) -> Option<String> {
        let needs: &[&Result<PathBuf, String>] = match system {
            System::Direct | System::Portcullis => &[],
            System::PortcullisBaseline => &[&self.baseline],
            System::Nginx => &[&self.nginx],
            System::NginxRathole => &[&self.nginx, &self.rathole],
        };
        let missing: Vec<&str> = needs
            .iter()
            .filter_map(|t| t.as_ref().err().map(String::as_str))
            .collect();
        (!missing.is_empty()).then(|| missing.join("; "))
    }

    fn nginx(&self) -> Result<&Path, String> {
        self.nginx.as_deref().map_err(Clone::clone)
    }
    fn rathole(&self) -> Result<&Path, String> {
        self.rathole.as_deref().map_err(Clone::clone)
    }
    fn baseline(&self) -> Result<&Path, String> {
        self.baseline.as_deref().map_err(Clone::clone)
    }
}

// ---------------------------------------------------------------------------------------
// Processes

/// A child process that is stopped when dropped: SIGTERM, a bounded wait, then SIGKILL for
/// it and for every descendant it had (nginx's workers).
struct Proc {
    name: String,
    child: Child,
    /// Its standard output and error.
    output: PathBuf,
    /// Other logs worth showing when it fails (nginx's error log).
    logs: Vec<PathBuf>,
}

impl Proc {
    fn spawn(
        name: &str,
        mut command: Command,
        dir: &Path,
        logs: Vec<PathBuf>,
    ) -> Result<Proc, String> {
        let output = dir.join(format!("{}.out", name.replace([' ', '+'], "-")));
        let file =
            File::create(&output).map_err(|e| format!("creating {}: {e}", output.display()))?;
        let err = file
            .try_clone()
            .map_err(|e| format!("creating {}: {e}", output.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err));
        let child = command
            .spawn()
            .map_err(|e| format!("starting {name} ({:?}): {e}", command.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            output,
            logs,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(why)` when it has exited.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited ({status})", self.name)),
            Ok(None) => None,
            Err(e) => Some(format!("{}: {e}", self.name)),
        }
    }

    /// The last lines of its output and logs.
    fn tail(&self) -> String {
        let mut out = String::new();
        for file in std::iter::once(&self.output).chain(&self.logs) {
            let text = tail_of(file, 20);
            if !text.trim().is_empty() {
                out.push_str(&format!(
                    "\n  --- {} ({}) ---\n{}",
                    self.name,
                    file.display(),
                    text.trim_end()
                ));
            }
        }
        out
    }

    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let family: Vec<(u32, Option<u64>)> = procstat::descendants(&[self.pid()])
            .into_iter()
            .map(|pid| (pid, procstat::start_time(pid)))
            .collect();
        signal(self.pid(), rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for (pid, started) in family {
            // Only the same process: a pid can be reused once its owner is gone.
            if started.is_some() && procstat::start_time(pid) == started {
                signal(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// The last `lines` lines of a file (from at most its last 16 KiB).
fn tail_of(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(16 * 1024)))
        .is_err()
    {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// The management point

struct Mp {
    proc: Proc,
    port: u16,
}

fn start_mp(dir: &Path, lab: &Lab, options: &CompareOptions) -> Result<Mp, CompareError> {
    let config = dir.join("mp.toml");
    write(
        &config,
        &format!(
            "listen = \"127.0.0.1:0\"\ncert = {}\nkey = {}\nclient_certificates = \"require\"\ntrusted_roots = [{}]\n",
            q(&lab.file(pki::lab::layout::MP_CERT)),
            q(&lab.file(pki::lab::layout::MP_KEY)),
            q(&lab.root()),
        ),
    )?;
    let mut command = Command::new(&options.program);
    command.arg("mp").arg("--config").arg(&config);
    let mut proc =
        Proc::spawn("management point", command, dir, vec![]).map_err(CompareError::Start)?;
    let deadline = Instant::now() + options.ready_timeout;
    loop {
        let said = std::fs::read_to_string(&proc.output).unwrap_or_default();
        if let Some(port) = said
            .lines()
            .find_map(|l| l.split("listening on https://").nth(1))
            .and_then(|addr| addr.trim().rsplit(':').next()?.parse::<u16>().ok())
        {
            return Ok(Mp { proc, port });
        }
        if let Some(why) = proc.exited() {
            return Err(CompareError::Start(format!(
                "the reference management point did not start: {why}{}",
                proc.tail()
            )));
        }
        if Instant::now() > deadline {
            return Err(CompareError::Start(format!(
                "the reference management point did not say where it listens within {:.0} s{}",
                options.ready_timeout.as_secs_f64(),
                proc.tail()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// Systems

/// A system brought up: its processes (stopped when dropped) and where devices call.
struct Up {
    procs: Vec<Proc>,
    url: String,
}

impl Up {
    fn tails(&self) -> String {
        self.procs.iter().map(Proc::tail).collect()
    }
}

fn bring_up(
    system: System,
    dir: &Path,
    lab: &Lab,
    mp: &Mp,
    tools: &Tools,
    options: &CompareOptions,
) -> Result<Up, String> {
    let direct = format!("https://localhost:{}{MP_PATH}", mp.port);
    let err = |e: CompareError| e.to_string();
    match system {
        System::Direct => Ok(Up {
            procs: vec![],
            url: direct,
        }),
        System::Portcullis | System::PortcullisBaseline => {
            let program = match system {
                System::PortcullisBaseline => tools.baseline()?,
                _ => options.program.as_path(),
            };
            let [gw] = free_ports(1).map_err(err)?[..] else {
                return Err("no free port".into());
            };
            let threads_setting = options
                .threads
                .map(|n| format!("worker_threads = {n}\n"))
                .unwrap_or_default();
            let gateway = dir.join("gateway.toml");
            write(
                &gateway,
                &format!(
                    "listen = \"127.0.0.1:{gw}\"\ncert = {}\nkey = {}\ntrusted_roots = [{}]\nconnector_roots = [{}]\nallowed_connectors = [\"Portcullis Connector Channel\"]\n{threads}\n[log]\nfile = {}\nconsole = \"off\"\n",
                    q(&lab.file(pki::lab::layout::GATEWAY_CERT)),
                    q(&lab.file(pki::lab::layout::GATEWAY_KEY)),
                    q(&lab.root()),
                    q(&lab.file(pki::lab::layout::CONNECTOR_ROOTS)),
                    q(&dir.join("SMS_Cloud_ProxyGateway.log")),
                    threads = threads_setting,
                ),
            )
            .map_err(err)?;
            let connector = dir.join("connector.toml");
            write(
                &connector,
                &format!(
                    "connector_id = \"bench\"\ngateways = [\"localhost:{gw}\"]\ngateway_roots = [{root}]\nchannel_cert = {}\nchannel_key = {}\nclient_cert_store = {}\nallowed_roots = [{root}]\nendpoint_roots = [{root}]\n{threads}\n[log]\nfile = {}\nconsole = \"off\"\n\n[[endpoints]]\nid = {ENDPOINT_ID}\nname = \"SMS_MP\"\nurl = \"https://localhost:{}\"\n",
                    q(&lab.file(pki::lab::layout::CHANNEL_CERT)),
                    q(&lab.file(pki::lab::layout::CHANNEL_KEY)),
                    q(&lab.file(pki::lab::layout::CONNECTOR_STORE)),
                    q(&dir.join("SMS_Cloud_ProxyConnector.log")),
                    mp.port,
                    root = q(&lab.root()),
                    threads = threads_setting,
                ),
            )
            .map_err(err)?;
            let mut procs = Vec::new();
            let mut command = Command::new(program);
            command.arg("gateway").arg("--config").arg(&gateway);
            procs.push(Proc::spawn(
                "gateway",
                command,
                dir,
                vec![dir.join("SMS_Cloud_ProxyGateway.log")],
            )?);
            let mut command = Command::new(program);
            command.arg("connector").arg("--config").arg(&connector);
            procs.push(Proc::spawn(
                "connector",
                command,
                dir,
                vec![dir.join("SMS_Cloud_ProxyConnector.log")],
            )?);
            Ok(Up {
                procs,
                url: format!("https://localhost:{gw}/CCM_PROXY_MUTUALAUTH/{ENDPOINT_ID}{MP_PATH}"),
            })
        }
        System::Nginx => {
            let [port] = free_ports(1).map_err(err)?[..] else {
                return Err("no free port".into());
            };
            let nginx = start_nginx(tools.nginx()?, dir, lab, port, mp.port, options.threads)?;
            Ok(Up {
                procs: vec![nginx],
                url: format!("https://localhost:{port}{MP_PATH}"),
            })
        }
        System::NginxRathole => {
            let [port, control, service] = free_ports(3).map_err(err)?[..] else {
                return Err("no free port".into());
            };
            let rathole = tools.rathole()?;
            let token = format!(
                "bench-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            );
            let server = dir.join("rathole-server.toml");
            write(
                &server,
                &format!(
                    "[server]\nbind_addr = \"127.0.0.1:{control}\"\n\n[server.transport]\ntype = \"tcp\"\n\n[server.services.mp]\ntoken = \"{token}\"\nbind_addr = \"127.0.0.1:{service}\"\n"
                ),
            )
            .map_err(err)?;
            let client = dir.join("rathole-client.toml");
            write(
                &client,
                &format!(
                    "[client]\nremote_addr = \"127.0.0.1:{control}\"\n\n[client.transport]\ntype = \"tcp\"\n\n[client.services.mp]\ntoken = \"{token}\"\nlocal_addr = \"127.0.0.1:{}\"\n",
                    mp.port
                ),
            )
            .map_err(err)?;
            let mut procs = Vec::new();
            for (name, role, config) in [
                ("rathole server", "--server", &server),
                ("rathole client", "--client", &client),
            ] {
                let mut command = Command::new(rathole);
                // Warnings only: no line per connection.
                command.env("RUST_LOG", "warn").arg(role).arg(config);
                if let Some(threads) = options.threads {
                    // rathole's runtime is tokio's default one, which reads this.
                    command.env("TOKIO_WORKER_THREADS", threads.to_string());
                }
                procs.push(Proc::spawn(name, command, dir, vec![])?);
            }
            procs.insert(
                0,
                start_nginx(tools.nginx()?, dir, lab, port, service, options.threads)?,
            );
            Ok(Up {
                procs,
                url: format!("https://localhost:{port}{MP_PATH}"),
            })
        }
    }
}

/// nginx on 127.0.0.1:`port` terminating device mutual TLS, proxying over TLS (presenting
/// the connector's client-authentication certificate, checking the management point's) to
/// 127.0.0.1:`upstream` with a pool of kept-alive connections.
fn start_nginx(
    nginx: &Path,
    dir: &Path,
    lab: &Lab,
    port: u16,
    upstream: u16,
    threads: Option<usize>,
) -> Result<Proc, String> {
    let workers = threads.map_or_else(|| "auto".to_string(), |n| n.to_string());
    let temp = dir.join("nginx-temp");
    std::fs::create_dir_all(&temp).map_err(|e| format!("creating {}: {e}", temp.display()))?;
    let error_log = dir.join("nginx-error.log");
    // As root, nginx would run its workers as `nobody`, which cannot enter the private
    // temporary directory.
    let user = if rustix::process::geteuid().is_root() {
        "user root;\n"
    } else {
        ""
    };
    let conf = dir.join("nginx.conf");
    let root = q(&lab.root());
    write(
        &conf,
        &format!(
            r#"# Generated by portcullis bench compare.
{user}worker_processes {workers};
daemon off;
master_process on;
pid {pid};
error_log {error_log} warn;
worker_rlimit_nofile 65536;

events {{
    worker_connections 16384;
}}

http {{
    access_log off;
    # Devices keep their connection; nginx's default closes it after 1000 requests, which
    # at these rates is every few seconds per connection.
    keepalive_requests 1000000;
    client_body_temp_path {t}/client;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;

    upstream management_point {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}

    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {root};
        ssl_verify_client on;
        ssl_session_cache shared:SSL:10m;

        location / {{
            proxy_pass https://management_point;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_ssl_certificate {client_cert};
            proxy_ssl_certificate_key {client_key};
            proxy_ssl_trusted_certificate {root};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}
    }}
}}
"#,
            pid = q(&dir.join("nginx.pid")),
            error_log = q(&error_log),
            t = temp.display(),
            cert = q(&lab.file(pki::lab::layout::GATEWAY_CERT)),
            key = q(&lab.file(pki::lab::layout::GATEWAY_KEY)),
            client_cert = q(&lab.file(pki::lab::layout::CLIENT_AUTH_CERT)),
            client_key = q(&lab.file(pki::lab::layout::CLIENT_AUTH_KEY)),
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut command = Command::new(nginx);
    command
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(&error_log)
        .arg("-c")
        .arg(&conf);
    Proc::spawn("nginx", command, dir, vec![error_log])
}

// ---------------------------------------------------------------------------------------
// Load

fn load_options(url: &str, lab: &Lab, mode: Mode, connections: usize) -> LoadOptions {
    let (cert, key) = lab.device();
    LoadOptions {
        url: url.to_string(),
        ca: vec![lab.root()],
        cert: Some(cert),
        key: Some(key),
        connections,
        mode,
        rate: None,
        duration: None,
        requests: None,
        tls_resumption: false,
        timeout: Duration::from_secs(10),
        progress: false,
    }
}

type Measured = (LoadReport, f64, u64, usize);

fn measure(
    runtime: &tokio::runtime::Runtime,
    up: &mut Up,
    lab: &Lab,
    mode: Mode,
    connections: usize,
    options: &CompareOptions,
    mp: &mut Mp,
) -> Result<Measured, String> {
    wait_ready(runtime, up, lab, options, mp)?;
    if !options.warmup.is_zero() {
        let mut warm = load_options(&up.url, lab, mode, connections);
        warm.duration = Some(options.warmup);
        runtime
            .block_on(load::run(&warm))
            .map_err(|e| format!("warm-up: {e}"))?;
    }
    let mut pids: Vec<u32> = up.procs.iter().map(Proc::pid).collect();
    pids.extend(procstat::descendants(&pids));
    let cpu = |pids: &[u32]| -> f64 { pids.iter().filter_map(|&p| procstat::cpu_seconds(p)).sum() };
    let before = cpu(&pids);
    let mut measured = load_options(&up.url, lab, mode, connections);
    measured.duration = Some(options.duration);
    measured.progress = options.progress;
    let report = runtime
        .block_on(load::run(&measured))
        .map_err(|e| e.to_string())?;
    let cpu_s = (cpu(&pids) - before).max(0.0);
    let peak_rss_kib = pids.iter().filter_map(|&p| procstat::peak_rss_kib(p)).sum();
    Ok((report, cpu_s, peak_rss_kib, pids.len()))
}

/// Waits, bounded, until one device request through the system is answered 2xx.
fn wait_ready(
    runtime: &tokio::runtime::Runtime,
    up: &mut Up,
    lab: &Lab,
    options: &CompareOptions,
    mp: &mut Mp,
) -> Result<(), String> {
    let mut probe = load_options(&up.url, lab, Mode::Handshake, 1);
    probe.requests = Some(1);
    probe.duration = Some(Duration::from_secs(3));
    probe.timeout = Duration::from_secs(2);
    let started = Instant::now();
    let mut last = String::from("no answer yet");
    loop {
        for proc in &mut up.procs {
            if let Some(why) = proc.exited() {
                return Err(format!("{why} before answering"));
            }
        }
        if let Some(why) = mp.proc.exited() {
            return Err(format!(
                "the reference management point stopped: {why}{}",
                mp.proc.tail()
            ));
        }
        match runtime.block_on(load::run(&probe)) {
            Ok(report) if report.ok == 1 => return Ok(()),
            Ok(report) => {
                if let Some(kind) = report.errors_by_kind.keys().next() {
                    last = kind.clone();
                }
            }
            Err(e) => last = e.to_string(),
        }
        if started.elapsed() > options.ready_timeout {
            return Err(format!(
                "no 2xx answer at {} within {:.0} s (last: {last})",
                up.url,
                options.ready_timeout.as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------
// Output

impl CompareReport {
    /// The table, with the skipped and failed systems after it.
    pub fn render_text(&self) -> String {
        let counts: Vec<String> = self.connections.iter().map(|c| c.to_string()).collect();
        let sweep = self.connections.len() > 1;
        let mut out = format!(
            "{} connections{}, {:.1} s per run after {:.1} s of warm-up; device {DEVICE}, GET {MP_PATH}\n\
             CPU s, CPU us/req (per request answered) and peak RSS: the system's own processes (the shared management point and the load generator are not counted)\n",
            counts.join(", "),
            if sweep {
                " (a run with each; rows compare with portcullis at the same count)"
            } else {
                ""
            },
            self.duration_s,
            self.warmup_s
        );
        if let Some(threads) = self.threads {
            out.push_str(&format!(
                "{threads} worker thread(s) in every process under test (gateway, connector, nginx, rathole)\n"
            ));
        }
        if self.rounds > 1 {
            out.push_str(&format!(
                "{} rounds, systems in turn: each row is its median round by req/s (the range is every round's); errors are summed\n",
                self.rounds
            ));
        }
        out.push('\n');
        let ranges = self.rounds > 1;
        let header = [
            "system",
            "mode",
            if sweep { "devices" } else { "" },
            "req/s",
            if ranges { "req/s range" } else { "" },
            "p50 ms",
            "p99 ms",
            "CPU s",
            "CPU us/req",
            "peak RSS MiB",
            "errors",
            "vs portcullis",
        ];
        let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
        for r in &self.rows {
            let proxy = r.system != System::Direct;
            table.push(vec![
                r.system.name().to_string(),
                r.mode.name().to_string(),
                if sweep {
                    r.connections.to_string()
                } else {
                    String::new()
                },
                format!("{:.0}", r.rps),
                if ranges {
                    let low = r.rps_rounds.iter().copied().fold(f64::INFINITY, f64::min);
                    let high = r.rps_rounds.iter().copied().fold(0.0, f64::max);
                    format!("{low:.0}-{high:.0}")
                } else {
                    String::new()
                },
                format!("{:.2}", r.p50_ms),
                format!("{:.2}", r.p99_ms),
                if proxy {
                    format!("{:.2}", r.cpu_s)
                } else {
                    "-".into()
                },
                if proxy {
                    format!("{:.0}", r.cpu_us_per_request)
                } else {
                    "-".into()
                },
                if proxy {
                    format!("{:.1}", r.peak_rss_mib)
                } else {
                    "-".into()
                },
                r.errors.to_string(),
                r.vs_portcullis
                    .map(|x| format!("{x:.2}x"))
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| table.iter().map(|row| row[c].len()).max().unwrap_or(0))
            .collect();
        for row in &table {
            let line: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, cell)| {
                    if c < 2 {
                        format!("{cell:<w$}", w = widths[c])
                    } else {
                        format!("{cell:>w$}", w = widths[c])
                    }
                })
                .collect();
            let line: Vec<String> = line.into_iter().filter(|cell| !cell.is_empty()).collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        for r in self.rows.iter().filter(|r| !r.errors_by_kind.is_empty()) {
            out.push_str(&format!(
                "\n{} {} errors:\n",
                r.system.name(),
                r.mode.name()
            ));
            for (kind, n) in &r.errors_by_kind {
                out.push_str(&format!("  {n:>8}  {kind}\n"));
            }
        }
        for s in &self.skipped {
            out.push_str(&format!("\nskipped {}: {}\n", s.system.name(), s.reason));
        }
        for f in &self.failed {
            out.push_str(&format!(
                "\nFAILED {} {}: {}\n",
                f.system.name(),
                f.mode.map(Mode::name).unwrap_or("-"),
                f.reason
            ));
        }
        if let Some(dir) = &self.dir {
            out.push_str(&format!(
                "\nkept: {} (configurations, logs, the lab PKI)\n",
                dir.display()
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bad options are refused before anything starts, each named.
    #[test]
    fn options_out_of_range_are_refused_by_name() {
        let base = CompareOptions::new(PathBuf::from("/nonexistent/portcullis"));
        for (edit, needle) in [
            (
                CompareOptions {
                    rounds: 0,
                    ..base.clone()
                },
                "--rounds",
            ),
            (
                CompareOptions {
                    threads: Some(0),
                    ..base.clone()
                },
                "--threads: 0 is not a thread count",
            ),
            (
                CompareOptions {
                    threads: Some(5000),
                    ..base.clone()
                },
                "--threads: 5000",
            ),
            (
                CompareOptions {
                    connections: vec![32, 0],
                    ..base.clone()
                },
                "--connections",
            ),
        ] {
            let error = run(&edit).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains(needle), "{needle:?} not in {error:?}");
        }
    }

    fn row(rps: f64, errors: u64) -> Row {
        Row {
            system: System::Portcullis,
            mode: Mode::Keepalive,
            connections: 32,
            rps,
            p50_ms: rps / 1000.0,
            p99_ms: 0.0,
            cpu_s: 0.0,
            cpu_us_per_request: 0.0,
            peak_rss_mib: 0.0,
            errors,
            ok: 10,
            p90_ms: 0.0,
            p999_ms: 0.0,
            max_ms: 0.0,
            vs_portcullis: None,
            rps_rounds: vec![rps],
            processes: 2,
            errors_by_kind: if errors > 0 {
                BTreeMap::from([("503 CMGService_Noconnectorchannel".to_string(), errors)])
            } else {
                BTreeMap::new()
            },
        }
    }

    #[test]
    fn the_median_round_stands_for_the_rounds_and_no_error_is_hidden() {
        let median = median_round(vec![row(900.0, 0), row(1500.0, 2), row(1000.0, 1)]).unwrap();
        assert_eq!(median.rps, 1000.0);
        assert_eq!(median.p50_ms, 1.0, "the median round's own latency");
        assert_eq!(median.rps_rounds, [900.0, 1500.0, 1000.0]);
        assert_eq!((median.errors, median.ok), (3, 30));
        assert_eq!(
            median.errors_by_kind["503 CMGService_Noconnectorchannel"],
            3
        );
        // An even count takes the lower middle; no rounds, no row.
        assert_eq!(
            median_round(vec![row(2.0, 0), row(1.0, 0)]).unwrap().rps,
            1.0
        );
        assert!(median_round(Vec::new()).is_none());
    }
}
