//! Each fault: inject it under load, hold it, repair it, wait until the lab is whole again,
//! and count the window's requests against what the design promises for it.
//!
//! The bounds come from the configuration the lab runs: the channel keep-alive
//! (`channel::tunnel::KEEPALIVE_INTERVAL` + `KEEPALIVE_TIMEOUT`), the connector's redial
//! backoff (`connector::redial_bound`) and `endpoint_timeout_secs`.

use std::time::{Duration, Instant};

use channel::tunnel::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use rustix::process::Signal;

use super::drive::{Driver, Kind, Outcome, PostIds, Record, SPECIAL_HANG, SPECIAL_NONE};
use super::drive::{SPECIAL_TRICKLE, TRICKLE_CHUNKS, TRICKLE_EVERY};
use super::lab::{DrillLab, ENDPOINT_TIMEOUT, SPARE_ENDPOINT};
use super::tally::{self, Allowed, Window};
use super::{Fault, FaultReport, FaultsOptions};

/// Steady load before each fault and after the lab is whole again.
const STEADY: Duration = Duration::from_secs(1);
/// How long a request may take when nothing in the fault should make it slow.
const BASE_DEADLINE: Duration = Duration::from_secs(5);
/// Requests "already on" a killed process's channels or connections: those started before the
/// kill, or this soon after it (the close reaching the other side).
const GRACE: Duration = Duration::from_secs(1);
/// A process started anew: its start, its TLS handshakes and hello.
const STARTUP: Duration = Duration::from_secs(2);
/// After a repair, the first request that must succeed: the next one to go out.
const NEXT_REQUEST: Duration = Duration::from_secs(1);

fn keepalive_bound() -> Duration {
    KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT
}

fn trickle_time() -> Duration {
    TRICKLE_EVERY * TRICKLE_CHUNKS as u32
}

/// The promise of each fault, in words, with the figures of this lab.
pub(super) fn promise(fault: Fault) -> String {
    let keepalive = keepalive_bound().as_secs();
    match fault {
        Fault::KillConnector => format!("kill -9 of one of two connectors: requests go on through the other; only requests already on its channels (started up to {} ms after the kill) may fail, each with a status text. Bound: the last failure within {} ms of the kill", GRACE.as_millis(), GRACE.as_millis()),
        Fault::KillAllConnectors => format!("kill -9 of both connectors: prompt refusals with a status text (none hangs past {} s); restarted, 2xx within {} ms (start-up; a new connector dials at once)", BASE_DEADLINE.as_secs(), (STARTUP + NEXT_REQUEST).as_millis()),
        Fault::StopConnector => format!("SIGSTOP of one connector: its channels leave within the keep-alive bound ({}+{} = {keepalive} s), so no request waits past it; failures only on requests that reached the frozen channels. Bound: the last failure answered within {keepalive} s of the stop", KEEPALIVE_INTERVAL.as_secs(), KEEPALIVE_TIMEOUT.as_secs()),
        Fault::KillGateway => format!("kill -9 of one gateway instance: its devices reconnect to the other; only requests on its connections at the kill fail (transport). Restarted, devices come back to it at once; until its channels are back they may get a 503 with a status text (not a 404). Bound: after its restart every channel is back within the connectors' redial backoff (connector::redial_bound of the outage) + {} ms start-up", STARTUP.as_millis()),
        Fault::EndpointDown => format!("the management point killed: refusals with a status text (502) while it is down; restarted, 2xx within {} ms", NEXT_REQUEST.as_millis()),
        Fault::EndpointHang => format!("an endpoint that accepts and never answers: a 504 with a status text within endpoint_timeout_secs ({} s); other requests unaffected. Bound: the slowest answer to a request to it", ENDPOINT_TIMEOUT.as_secs()),
        Fault::EndpointSlowBody => format!("an endpoint that trickles its body ({TRICKLE_CHUNKS} chunks, one every {} ms): the whole body reaches the device; other requests unaffected. Bound: the slowest such request within the trickle's {} ms", TRICKLE_EVERY.as_millis(), trickle_time().as_millis()),
        Fault::ReloadGateway => "SIGHUP of both gateways under load, twice (client_cert_header set, then removed): nothing lost".into(),
        Fault::ReloadConnector => "SIGHUP of one connector under load, twice (an endpoint added, then removed: its hello changes and its channels reopen one at a time): nothing lost".into(),
        Fault::LogDiskFull => "gateway-1's log on a full filesystem (a tmpfs), verbose on: requests unaffected; the lines lost are counted in the log once it can be written".into(),
    }
}

/// Runs one fault: its report, with every target missed named.
pub(super) fn run_fault(
    lab: &mut DrillLab,
    driver: &Driver,
    ids: &mut PostIds,
    fault: Fault,
    options: &FaultsOptions,
) -> FaultReport {
    let not_run = |why: String| {
        FaultReport {
            fault: fault.name().into(),
            promise: promise(fault),
            ..FaultReport::default()
        }
        .with_miss(why)
    };
    if let Err(why) = lab.wait_whole(options.ready_timeout) {
        return not_run(format!("the lab was not whole before the fault: {why}"));
    }
    let skip = match (fault, &lab.disk) {
        (Fault::LogDiskFull, Err(why)) => Some(why.clone()),
        _ => None,
    };
    if let Some(why) = skip {
        return FaultReport {
            fault: fault.name().into(),
            promise: promise(fault),
            skipped: Some(format!("skipped: no small filesystem for the log: {why}")),
            ..FaultReport::default()
        };
    }
    let mut drill = Drill {
        lab,
        driver,
        options,
        problems: Vec::new(),
        notes: Vec::new(),
    };
    let outcome = match fault {
        Fault::KillConnector => drill.kill_connector(),
        Fault::KillAllConnectors => drill.kill_all_connectors(),
        Fault::StopConnector => drill.stop_connector(),
        Fault::KillGateway => drill.kill_gateway(),
        Fault::EndpointDown => drill.endpoint_down(),
        Fault::EndpointHang => drill.endpoint_hang(),
        Fault::EndpointSlowBody => drill.endpoint_slow_body(),
        Fault::ReloadGateway => drill.reload_gateway(),
        Fault::ReloadConnector => drill.reload_connector(),
        Fault::LogDiskFull => drill.log_disk_full(),
    };
    // Whole again, then a moment of steady load that counts with the fault.
    if let Err(why) = drill.lab.wait_whole(options.ready_timeout) {
        drill.problems.push(format!(
            "the lab was not whole again after the fault: {why}"
        ));
    }
    std::thread::sleep(STEADY);
    let records = driver.take_until(Instant::now());
    let window = Window {
        fault: fault.name(),
        records: &records,
        recover_from: outcome.recover_from,
        deadline: driver.deadline(),
        allowed: &*outcome.allowed,
    };
    let mut report = tally::count(&window, ids);
    let measured = (outcome.measured)(&records);
    tally::bound(&mut report, promise(fault), outcome.bound, measured);
    report.targets_missed.extend(drill.problems);
    report.notes.extend(drill.notes);
    driver.set_deadline(BASE_DEADLINE);
    report
}

impl FaultReport {
    fn with_miss(mut self, why: String) -> FaultReport {
        self.targets_missed.push(why);
        self
    }
}

/// The figure a fault's bound is for, from the window's records.
type Measure = Box<dyn Fn(&[Record]) -> Option<Duration>>;
/// Which failures a fault may cause.
type Rule = Box<dyn Fn(&Record) -> Allowed>;

/// What a fault tells the tally.
struct Judged {
    recover_from: Instant,
    allowed: Rule,
    bound: Option<Duration>,
    measured: Measure,
}

struct Drill<'a> {
    lab: &'a mut DrillLab,
    driver: &'a Driver,
    options: &'a FaultsOptions,
    /// Steps of the drill that failed (a process that did not restart): targets missed.
    problems: Vec<String>,
    notes: Vec<String>,
}

fn failed(record: &Record) -> bool {
    record.outcome != Outcome::Ok
}

/// From `at` to the answer of the last failed request (zero when none failed).
fn last_failure_after(at: Instant) -> Measure {
    Box::new(move |records| {
        Some(
            records
                .iter()
                .filter(|r| failed(r))
                .map(|r| r.answered().saturating_duration_since(at))
                .max()
                .unwrap_or(Duration::ZERO),
        )
    })
}

/// From `from` to the first 2xx of a request started after it.
fn recovery_after(from: Instant) -> Measure {
    Box::new(move |records| {
        records
            .iter()
            .filter(|r| r.outcome == Outcome::Ok && r.started >= from)
            .map(|r| r.answered().saturating_duration_since(from))
            .min()
    })
}

/// The slowest request of `kind`.
fn slowest(kind: Kind) -> Measure {
    Box::new(move |records| {
        records
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.took)
            .max()
    })
}

/// Named failures of requests started within `from..until`.
fn named_between(from: Instant, until: Instant) -> Rule {
    Box::new(move |r| {
        if r.started >= from && r.started < until {
            Allowed::Named
        } else {
            Allowed::No
        }
    })
}

fn nothing_allowed() -> Rule {
    Box::new(|_| Allowed::No)
}

impl Drill<'_> {
    fn step(&mut self, what: &str, result: Result<(), String>) {
        if let Err(why) = result {
            self.problems.push(format!("{what}: {why}"));
        }
    }

    fn hold(&self, at_least: Duration) {
        std::thread::sleep(self.options.duration.max(at_least));
    }

    fn kill_connector(&mut self) -> Judged {
        self.driver.set_deadline(BASE_DEADLINE);
        std::thread::sleep(STEADY);
        let at = Instant::now();
        self.lab.connectors[1].kill();
        self.hold(Duration::ZERO);
        let restarted = self.lab.start_connector(1);
        self.step("restarting connector-2", restarted);
        Judged {
            recover_from: at,
            allowed: named_between(at - BASE_DEADLINE, at + GRACE),
            bound: Some(GRACE),
            measured: last_failure_after(at),
        }
    }

    fn kill_all_connectors(&mut self) -> Judged {
        self.driver.set_deadline(BASE_DEADLINE);
        std::thread::sleep(STEADY);
        let at = Instant::now();
        for connector in &mut self.lab.connectors {
            connector.kill();
        }
        self.hold(Duration::ZERO);
        let repaired = Instant::now();
        for i in 0..self.lab.connectors.len() {
            let restarted = self.lab.start_connector(i);
            self.step("restarting a connector", restarted);
        }
        let bound = STARTUP + NEXT_REQUEST;
        Judged {
            recover_from: repaired,
            allowed: named_between(at - BASE_DEADLINE, repaired + bound),
            bound: Some(bound),
            measured: recovery_after(repaired),
        }
    }

    fn stop_connector(&mut self) -> Judged {
        let bound = keepalive_bound();
        self.driver.set_deadline(bound + BASE_DEADLINE);
        std::thread::sleep(STEADY);
        let at = Instant::now();
        self.lab.connectors[1].signal(Signal::STOP);
        self.hold(bound + Duration::from_secs(2));
        self.lab.connectors[1].signal(Signal::CONT);
        Judged {
            recover_from: at,
            allowed: named_between(at - BASE_DEADLINE, at + bound),
            bound: Some(bound),
            measured: last_failure_after(at),
        }
    }

    fn kill_gateway(&mut self) -> Judged {
        self.driver.set_deadline(BASE_DEADLINE);
        std::thread::sleep(STEADY);
        let at = Instant::now();
        self.lab.gateways[1].kill();
        self.hold(Duration::ZERO);
        let outage = at.elapsed();
        let bound = connector::redial_bound(outage) + STARTUP;
        let restarted = self.lab.start_gateway(1, self.options.ready_timeout);
        let started = Instant::now();
        self.step("restarting gateway-2", restarted);
        // Devices find the instance again as soon as it answers (its address is back in the
        // set), before its channels are: every device takes a new connection, home first.
        self.driver.rehome();
        // Until every channel is back at the restarted instance, bounded.
        let whole = self.lab.whole_channels();
        let give_up = started + bound + Duration::from_secs(5);
        let mut back = None;
        while Instant::now() < give_up {
            if self.lab.channels(1).is_ok_and(|n| n >= whole) {
                back = Some(started.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.notes.push(format!(
            "gateway-2 down {} ms; its channels back {} after its restart",
            outage.as_millis(),
            back.map_or("not".into(), |b| format!("{} ms", b.as_millis()))
        ));
        Judged {
            recover_from: at,
            allowed: Box::new(move |r| match &r.outcome {
                Outcome::Transport(_) if r.instance == 1 && r.started < at + GRACE => {
                    Allowed::CutByKill
                }
                // At the restarted instance before its channels were back: a 503 (try again
                // soon), not a 404 (the endpoint is known; no connector has reached it yet).
                Outcome::Status(503, _) if r.instance == 1 && r.started >= started => {
                    Allowed::Named
                }
                _ => Allowed::No,
            }),
            bound: Some(bound),
            measured: Box::new(move |_| back),
        }
    }

    fn endpoint_down(&mut self) -> Judged {
        self.driver.set_deadline(BASE_DEADLINE);
        std::thread::sleep(STEADY);
        let at = Instant::now();
        self.lab.mp.kill();
        self.hold(Duration::ZERO);
        let restarted = self.lab.start_mp(self.options.ready_timeout);
        let repaired = Instant::now();
        self.step("restarting the management point", restarted);
        Judged {
            recover_from: repaired,
            // A 502: the endpoint cannot be reached.
            allowed: Box::new(move |r| match r.outcome {
                Outcome::Status(502, _)
                    if r.started >= at - BASE_DEADLINE && r.started < repaired + NEXT_REQUEST =>
                {
                    Allowed::Named
                }
                _ => Allowed::No,
            }),
            bound: Some(NEXT_REQUEST),
            measured: recovery_after(repaired),
        }
    }

    fn endpoint_hang(&mut self) -> Judged {
        self.driver.set_deadline(ENDPOINT_TIMEOUT + BASE_DEADLINE);
        std::thread::sleep(STEADY);
        let at = Instant::now();
        self.driver.set_special(SPECIAL_HANG);
        self.hold(ENDPOINT_TIMEOUT + Duration::from_secs(1));
        self.driver.set_special(SPECIAL_NONE);
        Judged {
            recover_from: at,
            allowed: Box::new(|r| match (&r.outcome, r.kind) {
                (Outcome::Status(504, _), Kind::Hang) => Allowed::Named,
                _ => Allowed::No,
            }),
            bound: Some(ENDPOINT_TIMEOUT),
            measured: slowest(Kind::Hang),
        }
    }

    fn endpoint_slow_body(&mut self) -> Judged {
        self.driver.set_deadline(trickle_time() + BASE_DEADLINE);
        std::thread::sleep(STEADY);
        let at = Instant::now();
        self.driver.set_special(SPECIAL_TRICKLE);
        self.hold(trickle_time() * 2);
        self.driver.set_special(SPECIAL_NONE);
        Judged {
            recover_from: at,
            allowed: nothing_allowed(),
            bound: Some(trickle_time()),
            measured: slowest(Kind::Trickle),
        }
    }

    fn reload_gateway(&mut self) -> Judged {
        self.driver.set_deadline(BASE_DEADLINE);
        std::thread::sleep(STEADY);
        let logs = self.lab.gateway_logs.clone();
        let before: usize = logs.iter().map(|l| reloads_in(l)).sum();
        let at = Instant::now();
        for header in [Some("X-ARR-ClientCert".to_string()), None] {
            for i in 0..self.lab.gateways.len() {
                let header = header.clone();
                let written = self
                    .lab
                    .rewrite_gateway(i, move |c| c.client_cert_header = header);
                self.step("rewriting a gateway's configuration", written);
                self.lab.gateways[i].signal(Signal::HUP);
            }
            std::thread::sleep(self.options.duration / 2);
        }
        self.reloads_applied(&logs, before, 2 * self.lab.gateways.len());
        Judged {
            recover_from: at,
            allowed: nothing_allowed(),
            bound: None,
            measured: Box::new(|_| None),
        }
    }

    fn reload_connector(&mut self) -> Judged {
        self.driver.set_deadline(BASE_DEADLINE);
        std::thread::sleep(STEADY);
        let log = self.lab.connector_configs[1].0.log.file.clone();
        let logs: Vec<_> = log.into_iter().collect();
        let before: usize = logs.iter().map(|l| reloads_in(l)).sum();
        let at = Instant::now();
        let mp = self.lab.connector_configs[1].0.endpoints[0].url.clone();
        for add in [true, false] {
            let url = mp.clone();
            let written = self.lab.rewrite_connector(1, move |c| {
                c.endpoints.retain(|e| e.id != SPARE_ENDPOINT);
                if add {
                    c.endpoints.push(connector::config::EndpointConfig {
                        id: SPARE_ENDPOINT,
                        name: "SMS_MP".into(),
                        url,
                    });
                }
            });
            self.step("rewriting connector-2's configuration", written);
            self.lab.connectors[1].signal(Signal::HUP);
            // Its channels reopen one at a time, 1 s apart.
            std::thread::sleep((self.options.duration / 2).max(Duration::from_secs(
                super::lab::CHANNELS_PER_GATEWAY as u64 + 1,
            )));
        }
        self.reloads_applied(&logs, before, 2);
        Judged {
            recover_from: at,
            allowed: nothing_allowed(),
            bound: None,
            measured: Box::new(|_| None),
        }
    }

    fn reloads_applied(&mut self, logs: &[std::path::PathBuf], before: usize, wanted: usize) {
        // The log writes within its linger; bounded.
        let give_up = Instant::now() + Duration::from_secs(3);
        let mut applied = 0;
        while Instant::now() < give_up {
            applied = logs.iter().map(|l| reloads_in(l)).sum::<usize>() - before;
            if applied >= wanted {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.notes
            .push(format!("reloads applied (logged): {applied} of {wanted}"));
        if applied < wanted {
            self.problems.push(format!(
                "only {applied} of {wanted} reloads were applied (\"Configuration reloaded\" in the logs)"
            ));
        }
    }

    fn log_disk_full(&mut self) -> Judged {
        self.driver.set_deadline(BASE_DEADLINE);
        std::thread::sleep(STEADY);
        let log = self.lab.gateway_logs[0].clone();
        let lost_before = lost_lines_in(&log);
        let mount = match &self.lab.disk {
            Ok(disk) => disk.mount.clone(),
            Err(_) => self.lab.dir.clone(),
        };
        let filler = mount.join("filler");
        let at = Instant::now();
        let filled = fill(&filler);
        self.step("filling the log's filesystem", filled);
        let verbose = self.lab.set_gateway_verbose(0, true);
        self.step("turning gateway-1's verbose logging on", verbose);
        self.hold(Duration::ZERO);
        let _ = std::fs::remove_file(&filler);
        let quiet = self.lab.set_gateway_verbose(0, false);
        self.step("turning gateway-1's verbose logging off", quiet);
        // The logger says on standard error when its file cannot be written, and when it can
        // again (with the next line it writes), with how many lines were lost meanwhile; the
        // log then holds a gap line with that count. Bounded.
        let give_up = Instant::now() + Duration::from_secs(5);
        let mut said = self.lab.gateways[0].said();
        while Instant::now() < give_up && !said.contains("written again after failing") {
            std::thread::sleep(Duration::from_millis(100));
            said = self.lab.gateways[0].said();
        }
        std::thread::sleep(Duration::from_millis(200));
        let lost = lost_lines_in(&log).saturating_sub(lost_before);
        if !said.contains("cannot be written") {
            self.problems.push(
                "gateway-1 never found its log unwritable: the disk did not fill for it".into(),
            );
        }
        let again = said
            .lines()
            .rfind(|l| l.contains("written again after failing"))
            .map(str::to_string);
        match again {
            Some(line) => self.notes.push(format!(
                "gateway-1's log was full, its lines held, then written again; {lost} line(s) lost (its gap line). It said: {}",
                logs::escape::message(line.trim())
            )),
            None => self.problems.push(format!(
                "gateway-1's log was not written again after room was made ({lost} line(s) counted lost)"
            )),
        }
        Judged {
            recover_from: at,
            allowed: nothing_allowed(),
            bound: None,
            measured: Box::new(|_| None),
        }
    }
}

/// Fills the filesystem holding `filler`, bounded: until a write fails for want of room.
fn fill(filler: &std::path::Path) -> Result<(), String> {
    use std::io::Write;
    let mut file = std::fs::File::create(filler).map_err(|e| e.to_string())?;
    let chunk = vec![0u8; 64 * 1024];
    // At most 1 GiB: the tmpfs is a few MiB.
    for _ in 0..16 * 1024 {
        if let Err(e) = file.write_all(&chunk).and_then(|()| file.sync_data()) {
            return if e.raw_os_error() == Some(28) {
                Ok(())
            } else {
                Err(e.to_string())
            };
        }
    }
    Err("still not full after 1 GiB: not a small filesystem".into())
}

/// "Configuration reloaded" lines in a component's log.
fn reloads_in(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("Configuration reloaded")
        .count()
}

/// Lines a log says it lost (`logs::logger::lost_lines`), summed.
fn lost_lines_in(log: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let before = line.split(" log line(s) were lost here").next()?;
            if before.len() == line.len() {
                return None;
            }
            let digits: String = before
                .chars()
                .rev()
                .take_while(char::is_ascii_digit)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            digits.parse::<u64>().ok()
        })
        .sum()
}
