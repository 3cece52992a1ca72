//! `bench faults --soak MINUTES`: the load for that long, a fault injected at the start of
//! every minute (cycling through the faults), and the gateways' and connectors' resident
//! memory (`VmRSS`) and open descriptors read after the warm-up (each fault once, then steady
//! load) and at the end. A process
//! that lived through the whole soak must not have grown more than [`MAX_GROWTH_PCT`]; one
//! the faults restarted is shown, not judged.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::drive::{Driver, PostIds};
use super::lab::DrillLab;
use super::tally::{self, Allowed, Window};
use super::{inject, FaultReport, FaultsOptions};
use crate::procstat;

/// The most a process may grow over a soak, after its warm-up.
pub const MAX_GROWTH_PCT: f64 = 5.0;

#[derive(Debug, Clone, Serialize)]
pub struct ProcessGrowth {
    pub name: String,
    pub pid_start: Option<u32>,
    pub pid_end: Option<u32>,
    /// The same process at both readings (not restarted by a fault).
    pub same_process: bool,
    pub rss_kib_start: Option<u64>,
    pub rss_kib_end: Option<u64>,
    pub rss_growth_pct: Option<f64>,
    pub fds_start: Option<u64>,
    pub fds_end: Option<u64>,
    pub fd_growth_pct: Option<f64>,
    /// Within [`MAX_GROWTH_PCT`]; `None` when not judged (restarted).
    pub passed: Option<bool>,
    /// Its resident memory at the end of each minute (whichever process held the name then):
    /// whether growth levels off or goes on.
    pub rss_kib_by_minute: Vec<Option<u64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub minutes: u64,
    pub warmup_s: f64,
    pub faults_injected: usize,
    pub max_growth_pct: f64,
    pub processes: Vec<ProcessGrowth>,
    /// Every process judged grew within the bound, at least one was judged, and the load
    /// between faults met its targets (the report's `steady` row).
    pub passed: bool,
}

impl SoakReport {
    pub fn render_text(&self) -> String {
        let mut out = format!(
            "\nsoak: {} minute(s), {} fault(s), readings after {:.0} s warm-up and at the end (growth at most {:.0}%)\n{:<14} {:>9} {:>9} {:>7} {:>6} {:>6} {:>7}  {}\n",
            self.minutes,
            self.faults_injected,
            self.warmup_s,
            self.max_growth_pct,
            "process",
            "rss_kib",
            "rss_kib",
            "rss%",
            "fds",
            "fds",
            "fds%",
            "result"
        );
        let n = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| v.to_string());
        let pct = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:+.1}"));
        for p in &self.processes {
            out.push_str(&format!(
                "{:<14} {:>9} {:>9} {:>7} {:>6} {:>6} {:>7}  {}\n",
                p.name,
                n(p.rss_kib_start),
                n(p.rss_kib_end),
                pct(p.rss_growth_pct),
                n(p.fds_start),
                n(p.fds_end),
                pct(p.fd_growth_pct),
                match p.passed {
                    Some(true) => "ok",
                    Some(false) => "GREW",
                    None => "restarted, not judged",
                }
            ));
        }
        out.push_str(&format!(
            "soak: {}\n",
            if self.passed { "passed" } else { "FAILED" }
        ));
        out
    }
}

struct Reading {
    name: String,
    pid: Option<u32>,
    started: Option<u64>,
    rss_kib: Option<u64>,
    fds: Option<u64>,
}

/// Each gateway's and connector's memory and descriptors, with every device back on its home
/// gateway and every channel held, so that two readings compare like with like.
fn read(lab: &mut DrillLab, driver: &Driver, options: &FaultsOptions) -> Vec<Reading> {
    driver.rehome();
    let _ = lab.wait_whole(options.ready_timeout);
    std::thread::sleep(Duration::from_secs(3));
    lab.watched()
        .into_iter()
        .map(|(name, pid)| Reading {
            name,
            pid,
            started: pid.and_then(procstat::start_time),
            rss_kib: pid.and_then(procstat::rss_kib),
            fds: pid.and_then(procstat::open_fds),
        })
        .collect()
}

fn growth(start: Option<u64>, end: Option<u64>) -> Option<f64> {
    match (start, end) {
        (Some(s), Some(e)) if s > 0 => Some((e as f64 - s as f64) * 100.0 / s as f64),
        _ => None,
    }
}

pub(super) fn run(
    lab: &mut DrillLab,
    driver: &Driver,
    ids: &mut PostIds,
    options: &FaultsOptions,
    length: Duration,
    reports: &mut Vec<FaultReport>,
    progress: &dyn Fn(&str),
) -> SoakReport {
    // The warm-up takes each process to the most it holds in this soak: every fault once (one
    // connector carrying all the load, a gateway's devices moving over), then steady load.
    let mut distinct: Vec<super::Fault> = Vec::new();
    for &fault in &options.faults {
        if !distinct.contains(&fault) {
            distinct.push(fault);
        }
    }
    for fault in distinct {
        progress(&format!("soak warm-up: {}", fault.name()));
        let mut report = inject::run_fault(lab, driver, ids, fault, options);
        progress(&format!("soak warm-up: {}", tally::one_line(&report)));
        report.fault = format!("{} (warm-up)", report.fault);
        reports.push(report);
    }
    progress(&format!(
        "soak: {:.0} s of steady load, then the first reading",
        options.warmup.as_secs_f64()
    ));
    std::thread::sleep(options.warmup);
    let start = read(lab, driver, options);
    let _ = driver.take_until(Instant::now());
    let minutes = length.as_secs().div_ceil(60);
    let mut steady = Vec::new();
    let mut by_minute: Vec<Vec<Option<u64>>> = vec![Vec::new(); start.len()];
    for minute in 0..minutes {
        let began = Instant::now();
        let fault = options.faults[minute as usize % options.faults.len()];
        progress(&format!(
            "soak minute {}/{minutes}: {}",
            minute + 1,
            fault.name()
        ));
        let report = inject::run_fault(lab, driver, ids, fault, options);
        progress(&format!(
            "soak minute {}/{minutes}: {}",
            minute + 1,
            tally::one_line(&report)
        ));
        reports.push(report);
        // Steady load for the rest of the minute, counted apart.
        let rest = Duration::from_secs(60).saturating_sub(began.elapsed());
        std::thread::sleep(rest);
        steady.extend(driver.take_until(Instant::now()));
        for (i, (_, pid)) in lab.watched().into_iter().enumerate() {
            if let Some(series) = by_minute.get_mut(i) {
                series.push(pid.and_then(procstat::rss_kib));
            }
        }
    }
    let end = read(lab, driver, options);
    steady.extend(driver.take_until(Instant::now()));
    let nothing = |_: &super::drive::Record| Allowed::No;
    let window = Window {
        fault: "steady",
        records: &steady,
        recover_from: Instant::now(),
        deadline: driver.deadline(),
        allowed: &nothing,
    };
    let mut between = tally::count(&window, ids);
    between.recovery_ms = None;
    between.promise = "the load between faults: every request 2xx".into();
    let steady_ok = between.passed();
    reports.push(between);

    let processes: Vec<ProcessGrowth> = start
        .iter()
        .zip(&end)
        .zip(by_minute)
        .map(|((s, e), rss_kib_by_minute)| {
            let same = s.pid.is_some() && s.pid == e.pid && s.started == e.started;
            let rss = growth(s.rss_kib, e.rss_kib);
            let fds = growth(s.fds, e.fds);
            let within = |g: Option<f64>| g.is_some_and(|g| g <= MAX_GROWTH_PCT);
            ProcessGrowth {
                name: s.name.clone(),
                pid_start: s.pid,
                pid_end: e.pid,
                same_process: same,
                rss_kib_start: s.rss_kib,
                rss_kib_end: e.rss_kib,
                rss_growth_pct: rss,
                fds_start: s.fds,
                fds_end: e.fds,
                fd_growth_pct: fds,
                passed: same.then(|| within(rss) && within(fds)),
                rss_kib_by_minute,
            }
        })
        .collect();
    let judged: Vec<bool> = processes.iter().filter_map(|p| p.passed).collect();
    SoakReport {
        minutes,
        warmup_s: options.warmup.as_secs_f64(),
        faults_injected: minutes as usize,
        max_growth_pct: MAX_GROWTH_PCT,
        passed: steady_ok && !judged.is_empty() && judged.iter().all(|&p| p),
        processes,
    }
}
