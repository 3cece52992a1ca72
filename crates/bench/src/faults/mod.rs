//! `portcullis bench faults`: the fault drill. A lab of its own on loopback (two gateway
//! instances, two connectors each holding channels to both, the reference management point,
//! all processes of this binary), steady device load with an id on every request, then each
//! fault in turn, bounded in time, with what devices saw counted against what the design
//! promises.
//!
//! Here: the faults, the options, the report and the sequence; `lab` brings the processes up
//! and restarts them; `drive` is the devices; `inject` injects each fault and says what it
//! may cost; `tally` counts a fault's requests against its targets; `soak` runs a fault a
//! minute and watches the processes' memory and descriptors.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

mod drive;
mod inject;
mod lab;
mod soak;
mod tally;

pub use soak::{ProcessGrowth, SoakReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    KillConnector,
    KillAllConnectors,
    StopConnector,
    KillGateway,
    EndpointDown,
    EndpointHang,
    EndpointSlowBody,
    ReloadGateway,
    ReloadConnector,
    LogDiskFull,
}

impl Fault {
    pub const ALL: [Fault; 10] = [
        Fault::KillConnector,
        Fault::KillAllConnectors,
        Fault::StopConnector,
        Fault::KillGateway,
        Fault::EndpointDown,
        Fault::EndpointHang,
        Fault::EndpointSlowBody,
        Fault::ReloadGateway,
        Fault::ReloadConnector,
        Fault::LogDiskFull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillConnector => "kill-connector",
            Fault::KillAllConnectors => "kill-all-connectors",
            Fault::StopConnector => "stop-connector",
            Fault::KillGateway => "kill-gateway",
            Fault::EndpointDown => "endpoint-down",
            Fault::EndpointHang => "endpoint-hang",
            Fault::EndpointSlowBody => "endpoint-slow-body",
            Fault::ReloadGateway => "reload-gateway",
            Fault::ReloadConnector => "reload-connector",
            Fault::LogDiskFull => "log-disk-full",
        }
    }

    pub fn from_name(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == name)
    }
}

#[derive(Debug, Clone)]
pub struct FaultsOptions {
    /// The `portcullis` binary that runs `mp`, `gateway` and `connector`.
    pub program: PathBuf,
    pub faults: Vec<Fault>,
    /// How long each fault is held (a fault that needs longer to show, stop-connector, holds
    /// for its bound and a little more).
    pub duration: Duration,
    /// Devices, each with its own kept-alive connection, split over the two gateways.
    pub devices: usize,
    /// Requests per second, over all devices.
    pub rate: f64,
    /// Soak: this long, a fault a minute (cycling through `faults`).
    pub soak: Option<Duration>,
    /// Load before the soak's first reading of memory and descriptors.
    pub warmup: Duration,
    /// How long the lab may take to come up, and to be whole again after a fault.
    pub ready_timeout: Duration,
    /// Keep the temporary directory (configurations, logs, lab PKI).
    pub keep: bool,
    /// Progress lines on standard error.
    pub progress: bool,
}

impl FaultsOptions {
    pub fn new(program: PathBuf) -> FaultsOptions {
        FaultsOptions {
            program,
            faults: Fault::ALL.to_vec(),
            duration: Duration::from_secs(3),
            devices: 8,
            rate: 80.0,
            soak: None,
            warmup: Duration::from_secs(120),
            ready_timeout: Duration::from_secs(30),
            keep: false,
            progress: true,
        }
    }
}

/// What devices saw during one fault, against its targets.
#[derive(Debug, Clone, Serialize, Default)]
pub struct FaultReport {
    pub fault: String,
    /// Requests started during the fault's window.
    pub sent: u64,
    /// Answered 2xx, with the whole body.
    pub ok: u64,
    /// Answered with a Portcullis status text (`CMGService_*`, `CMGConnector_*`), by text.
    pub named: BTreeMap<String, u64>,
    /// Answered non-2xx without a Portcullis status text, by "status text".
    pub unnamed: BTreeMap<String, u64>,
    /// The connection failed (refused, reset, closed before the answer, a body cut short).
    pub transport_errors: u64,
    /// Of `transport_errors`: requests whose connection was held by the process the fault
    /// killed, started before it died (allowed).
    pub cut_by_kill: u64,
    /// No answer within the deadline.
    pub hung: u64,
    /// POSTs that reached the management point more than once (its W3C log, by id).
    pub duplicated: u64,
    /// From the fault (or its repair, for faults that take the whole path down) to the first
    /// 2xx of a request started after it.
    pub recovery_ms: Option<u64>,
    /// The longest a request could wait before being called hung.
    pub deadline_ms: u64,
    /// What the design promises for this fault, in words.
    pub promise: String,
    /// The promised bound on `measured_ms`, derived from the configuration.
    pub bound_ms: Option<u64>,
    /// The figure the bound is for (see `promise`).
    pub measured_ms: Option<u64>,
    pub bound_met: Option<bool>,
    /// Every target missed, in words; empty when all were met.
    pub targets_missed: Vec<String>,
    /// Why the fault was not run (e.g. no tmpfs could be mounted).
    pub skipped: Option<String>,
    /// What else was seen (lines lost from a full log, reloads applied).
    pub notes: Vec<String>,
}

impl FaultReport {
    pub fn passed(&self) -> bool {
        self.targets_missed.is_empty()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultsReport {
    pub faults: Vec<FaultReport>,
    pub duration_s: f64,
    pub devices: usize,
    pub rate: f64,
    pub soak: Option<SoakReport>,
    /// The kept temporary directory (`--keep`).
    pub dir: Option<PathBuf>,
}

impl FaultsReport {
    /// Every target met (a skipped fault misses none).
    pub fn passed(&self) -> bool {
        self.faults.iter().all(FaultReport::passed) && self.soak.as_ref().is_none_or(|s| s.passed)
    }

    pub fn render_text(&self) -> String {
        tally::render(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FaultsError {
    #[error("{0}")]
    Options(String),
    #[error("{0}")]
    Start(String),
}

/// The most devices and the highest rate the drill drives: it measures what devices see, not
/// how much the system carries (`bench load` and `bench compare` do).
pub const MAX_DEVICES: usize = 256;
pub const MAX_RATE: f64 = 5_000.0;

pub fn run(options: &FaultsOptions) -> Result<FaultsReport, FaultsError> {
    if options.faults.is_empty() {
        return Err(FaultsError::Options("no faults to inject".into()));
    }
    if !(1..=MAX_DEVICES).contains(&options.devices) {
        return Err(FaultsError::Options(format!(
            "--devices must be between 1 and {MAX_DEVICES}"
        )));
    }
    if !(options.rate >= 1.0 && options.rate <= MAX_RATE) {
        return Err(FaultsError::Options(format!(
            "--rate must be between 1 and {MAX_RATE}"
        )));
    }
    if options.duration < Duration::from_secs(1) || options.duration > Duration::from_secs(600) {
        return Err(FaultsError::Options(
            "--duration must be between 1 and 600 seconds".into(),
        ));
    }
    if options
        .soak
        .is_some_and(|s| s < Duration::from_secs(60) || s > Duration::from_secs(24 * 3600))
    {
        return Err(FaultsError::Options(
            "--soak must be between 1 and 1440 minutes".into(),
        ));
    }
    let tmp = tempfile::Builder::new()
        .prefix("portcullis-faults-")
        .tempdir()
        .map_err(|e| FaultsError::Start(format!("creating a temporary directory: {e}")))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| FaultsError::Start(format!("starting the async runtime: {e}")))?;
    let outcome = run_in(&runtime, tmp.path(), options);
    let dir = if options.keep { Some(tmp.keep()) } else { None };
    let (faults, soak) = match (outcome, &dir) {
        (Ok(outcome), _) => outcome,
        (Err(e), Some(dir)) => {
            return Err(FaultsError::Start(format!("{e}\nkept: {}", dir.display())))
        }
        (Err(e), None) => return Err(e),
    };
    Ok(FaultsReport {
        faults,
        duration_s: options.duration.as_secs_f64(),
        devices: options.devices,
        rate: options.rate,
        soak,
        dir,
    })
}

fn run_in(
    runtime: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    options: &FaultsOptions,
) -> Result<(Vec<FaultReport>, Option<SoakReport>), FaultsError> {
    let progress = |line: &str| {
        if options.progress {
            eprintln!("bench faults: {line}");
        }
    };
    let want_disk = options.faults.contains(&Fault::LogDiskFull);
    progress(&format!("bringing the lab up in {}", dir.display()));
    let mut lab = lab::DrillLab::start(dir, options, want_disk).map_err(FaultsError::Start)?;
    lab.wait_whole(options.ready_timeout)
        .map_err(|e| FaultsError::Start(format!("the lab did not come up: {e}")))?;
    let driver = drive::Driver::start(runtime, &lab, options).map_err(FaultsError::Start)?;
    let mut ids = drive::PostIds::new(&lab.w3c_log);
    let mut reports = Vec::new();
    let soak = match options.soak {
        None => {
            // A moment of steady load first, so that every device has its connection.
            std::thread::sleep(Duration::from_secs(1));
            let _ = driver.take_until(std::time::Instant::now());
            let total = options.faults.len();
            for (n, &fault) in options.faults.iter().enumerate() {
                progress(&format!("[{}/{total}] {}: injecting", n + 1, fault.name()));
                let report = inject::run_fault(&mut lab, &driver, &mut ids, fault, options);
                progress(&format!("[{}/{total}] {}", n + 1, tally::one_line(&report)));
                reports.push(report);
            }
            None
        }
        Some(length) => Some(soak::run(
            &mut lab,
            &driver,
            &mut ids,
            options,
            length,
            &mut reports,
            &progress,
        )),
    };
    driver.stop(runtime);
    Ok((reports, soak))
}
