//! Counting one fault's requests against its targets, and the report's text.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::drive::{Outcome, PostIds, Record};
use super::{FaultReport, FaultsReport};

/// Whether a failed request is one the fault may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Allowed {
    No,
    /// An answer with a Portcullis status text.
    Named,
    /// A transport error: its connection was held by the process the fault killed.
    CutByKill,
}

/// Time the machine may add to a promised bound before it counts as missed: processes
/// scheduled late on a shared machine, the drill's own polling.
pub(super) const SLACK: Duration = Duration::from_millis(500);

/// Every status text Portcullis sends (`channel::refusal`).
fn status_texts() -> &'static Vec<&'static str> {
    static TEXTS: OnceLock<Vec<&'static str>> = OnceLock::new();
    TEXTS.get_or_init(|| {
        channel::refusal::Cause::examples()
            .into_iter()
            .map(|cause| channel::refusal::Refusal::new(cause).text)
            .collect()
    })
}

pub(super) fn is_status_text(text: &str) -> bool {
    status_texts().contains(&text)
}

/// What one fault's window held.
pub(super) struct Window<'a> {
    pub(super) fault: &'a str,
    pub(super) records: &'a [Record],
    /// Recovery is counted from here: the fault, or its repair.
    pub(super) recover_from: Instant,
    pub(super) deadline: Duration,
    pub(super) allowed: &'a dyn Fn(&Record) -> Allowed,
}

/// Counts the window's requests, checks POST ids against the management point's log, and
/// names every target missed.
pub(super) fn count(window: &Window, ids: &mut PostIds) -> FaultReport {
    let mut report = FaultReport {
        fault: window.fault.to_string(),
        deadline_ms: window.deadline.as_millis() as u64,
        ..FaultReport::default()
    };
    ids.read();
    let mut not_allowed: std::collections::BTreeMap<String, u64> = Default::default();
    for record in window.records {
        report.sent += 1;
        if record.kind == super::drive::Kind::Post && ids.take(record.id) > 1 {
            report.duplicated += 1;
        }
        let allowed = (window.allowed)(record);
        match &record.outcome {
            Outcome::Ok => {
                report.ok += 1;
                if record.started >= window.recover_from {
                    let ms = record
                        .answered()
                        .saturating_duration_since(window.recover_from)
                        .as_millis() as u64;
                    report.recovery_ms = Some(report.recovery_ms.map_or(ms, |r| r.min(ms)));
                }
            }
            Outcome::Status(status, text) if is_status_text(text) => {
                *report.named.entry(text.clone()).or_default() += 1;
                if allowed != Allowed::Named {
                    *not_allowed.entry(format!("{status} {text}")).or_default() += 1;
                }
            }
            Outcome::Status(status, text) => {
                *report
                    .unnamed
                    .entry(format!("{status} {text}"))
                    .or_default() += 1;
            }
            Outcome::Transport(what) => {
                report.transport_errors += 1;
                if allowed == Allowed::CutByKill {
                    report.cut_by_kill += 1;
                } else {
                    *not_allowed.entry(what.clone()).or_default() += 1;
                }
            }
            Outcome::Hung => report.hung += 1,
        }
    }
    if report.hung > 0 {
        report.targets_missed.push(format!(
            "{} request(s) hung (no answer within {} ms)",
            report.hung, report.deadline_ms
        ));
    }
    if report.duplicated > 0 {
        report.targets_missed.push(format!(
            "{} POST(s) reached the management point twice",
            report.duplicated
        ));
    }
    if !report.unnamed.is_empty() {
        report.targets_missed.push(format!(
            "answers without a status text that names the hop: {}",
            list(report.unnamed.iter().map(|(k, v)| (k.as_str(), *v)))
        ));
    }
    if !not_allowed.is_empty() {
        report.targets_missed.push(format!(
            "failures this fault must not cause: {}",
            list(not_allowed.iter().map(|(k, v)| (k.as_str(), *v)))
        ));
    }
    if report.ok == 0 {
        report
            .targets_missed
            .push("no request succeeded in the window".into());
    }
    report
}

/// Sets the promise, its bound and the figure measured, and says when the bound was missed.
pub(super) fn bound(
    report: &mut FaultReport,
    promise: String,
    bound: Option<Duration>,
    measured: Option<Duration>,
) {
    report.promise = promise;
    report.bound_ms = bound.map(|b| b.as_millis() as u64);
    report.measured_ms = measured.map(|m| m.as_millis() as u64);
    if let Some(bound) = bound {
        let met = measured.is_some_and(|m| m <= bound + SLACK);
        report.bound_met = Some(met);
        if !met {
            report.targets_missed.push(match measured {
                Some(m) => format!(
                    "bound missed: {} ms measured, {} ms promised",
                    m.as_millis(),
                    bound.as_millis()
                ),
                None => format!(
                    "bound missed: not reached within the window ({} ms promised)",
                    bound.as_millis()
                ),
            });
        }
    }
}

fn list<'a>(items: impl Iterator<Item = (&'a str, u64)>) -> String {
    items
        .map(|(what, n)| format!("{n} x {what}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ms(value: Option<u64>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

/// One fault on one line: progress, and the text report's lines under the table.
pub(super) fn one_line(report: &FaultReport) -> String {
    if let Some(why) = &report.skipped {
        return format!("{}: skipped: {why}", report.fault);
    }
    let verdict = if report.passed() {
        "targets met".to_string()
    } else {
        format!("MISSED: {}", report.targets_missed.join("; "))
    };
    format!(
        "{}: {} sent, {} ok, {} named, {} transport, {} hung, {} duplicated, recovery {} ms; {verdict}",
        report.fault,
        report.sent,
        report.ok,
        report.named.values().sum::<u64>(),
        report.transport_errors,
        report.hung,
        report.duplicated,
        ms(report.recovery_ms),
    )
}

pub(super) fn render(report: &FaultsReport) -> String {
    let mut out = format!(
        "{} devices, {:.0} req/s, each fault held {:.0} s\n\n{:<20} {:>6} {:>6} {:>6} {:>5} {:>5} {:>5} {:>5} {:>9} {:>9} {:>9}  {}\n",
        report.devices,
        report.rate,
        report.duration_s,
        "fault",
        "sent",
        "ok",
        "named",
        "trans",
        "hung",
        "dup",
        "cut",
        "recov_ms",
        "meas_ms",
        "bound_ms",
        "result"
    );
    for fault in &report.faults {
        let result = match (&fault.skipped, fault.passed()) {
            (Some(_), _) => "skipped",
            (None, true) => "ok",
            (None, false) => "MISSED",
        };
        out.push_str(&format!(
            "{:<20} {:>6} {:>6} {:>6} {:>5} {:>5} {:>5} {:>5} {:>9} {:>9} {:>9}  {result}\n",
            fault.fault,
            fault.sent,
            fault.ok,
            fault.named.values().sum::<u64>(),
            fault.transport_errors,
            fault.hung,
            fault.duplicated,
            fault.cut_by_kill,
            ms(fault.recovery_ms),
            ms(fault.measured_ms),
            ms(fault.bound_ms),
        ));
    }
    out.push('\n');
    for fault in &report.faults {
        out.push_str(&format!("{}: {}\n", fault.fault, fault.promise));
        for (text, n) in fault.named.iter().chain(&fault.unnamed) {
            out.push_str(&format!("    {n:>6}  {text}\n"));
        }
        for line in fault.targets_missed.iter() {
            out.push_str(&format!("    missed: {line}\n"));
        }
        for line in fault.notes.iter().chain(&fault.skipped) {
            out.push_str(&format!("    {line}\n"));
        }
    }
    if let Some(soak) = &report.soak {
        out.push_str(&soak.render_text());
    }
    if let Some(dir) = &report.dir {
        out.push_str(&format!("kept: {}\n", dir.display()));
    }
    out.push_str(if report.passed() {
        "every target met\n"
    } else {
        "targets missed\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::super::drive::Kind;
    use super::*;

    fn record(id: u64, kind: Kind, at: Instant, outcome: Outcome) -> Record {
        Record {
            id,
            kind,
            instance: 0,
            started: at,
            took: Duration::from_millis(10),
            outcome,
        }
    }

    fn w3c_with(lines: &[&str]) -> (tempfile::TempDir, PostIds) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u_ex.log");
        let mut text =
            String::from("#Fields: date time s-ip cs-method cs-uri-stem cs-uri-query\r\n");
        for line in lines {
            text.push_str(line);
            text.push_str("\r\n");
        }
        std::fs::write(&path, text).unwrap();
        let ids = PostIds::new(&path);
        (dir, ids)
    }

    #[test]
    fn every_kind_of_failure_is_counted_and_only_the_allowed_ones_pass() {
        let t0 = Instant::now();
        let records = vec![
            record(1, Kind::Get, t0, Outcome::Ok),
            record(2, Kind::Post, t0, Outcome::Ok),
            record(
                3,
                Kind::Get,
                t0,
                Outcome::Status(503, "CMGService_Noconnectorchannel".into()),
            ),
            record(4, Kind::Get, t0, Outcome::Status(404, "Not Found".into())),
            record(
                5,
                Kind::Get,
                t0,
                Outcome::Transport("connection: reset".into()),
            ),
            record(6, Kind::Get, t0, Outcome::Hung),
            record(7, Kind::Post, t0 + Duration::from_secs(1), Outcome::Ok),
        ];
        // POST 2 reached the endpoint twice; POST 7 once; a GET twice is no duplicate.
        let (_dir, mut ids) = w3c_with(&[
            "2026-01-01 00:00:00 127.0.0.1 POST /portcullis/echo drill=2 1 -",
            "2026-01-01 00:00:00 127.0.0.1 POST /portcullis/echo drill=2 1 -",
            "2026-01-01 00:00:00 127.0.0.1 POST /portcullis/echo drill=7 1 -",
            "2026-01-01 00:00:00 127.0.0.1 GET /portcullis/echo drill=1 1 -",
            "2026-01-01 00:00:00 127.0.0.1 GET /portcullis/echo drill=1 1 -",
        ]);
        let allowed = |r: &Record| {
            if r.id == 3 {
                Allowed::Named
            } else {
                Allowed::No
            }
        };
        let window = Window {
            fault: "test",
            records: &records,
            recover_from: t0 + Duration::from_millis(500),
            deadline: Duration::from_secs(5),
            allowed: &allowed,
        };
        let report = count(&window, &mut ids);
        assert_eq!((report.sent, report.ok), (7, 3));
        assert_eq!(report.named["CMGService_Noconnectorchannel"], 1);
        assert_eq!(report.unnamed["404 Not Found"], 1);
        assert_eq!((report.transport_errors, report.hung), (1, 1));
        assert_eq!(report.duplicated, 1);
        // The first 2xx of a request started after the recovery point: 7's, 510 ms after.
        assert_eq!(report.recovery_ms, Some(510));
        let missed = report.targets_missed.join("\n");
        for needle in ["hung", "twice", "404 Not Found", "connection: reset"] {
            assert!(missed.contains(needle), "{needle} in {missed}");
        }
        assert!(!missed.contains("Noconnectorchannel"), "{missed}");
    }

    #[test]
    fn a_bound_is_met_within_the_slack_and_missed_past_it_or_when_never_reached() {
        let mut report = FaultReport::default();
        bound(
            &mut report,
            "p".into(),
            Some(Duration::from_secs(1)),
            Some(Duration::from_secs(1) + SLACK),
        );
        assert_eq!(report.bound_met, Some(true));
        assert!(report.passed());
        for measured in [Some(Duration::from_secs(2)), None] {
            let mut report = FaultReport::default();
            bound(
                &mut report,
                "p".into(),
                Some(Duration::from_secs(1)),
                measured,
            );
            assert_eq!(report.bound_met, Some(false));
            assert!(!report.passed());
        }
    }

    #[test]
    fn the_w3c_log_is_read_as_it_grows_and_across_a_roll_over() {
        let (dir, mut ids) = w3c_with(&["x 127.0.0.1 POST /portcullis/echo drill=10 1 -"]);
        ids.read();
        let path = dir.path().join("u_ex.log");
        // Rolled over: the old file renamed with one more line, a new one started.
        let mut old = std::fs::read_to_string(&path).unwrap();
        old.push_str("x 127.0.0.1 POST /portcullis/echo drill=10 1 -\r\n");
        std::fs::write(dir.path().join("u_ex.lo_"), old).unwrap();
        std::fs::write(&path, "x 127.0.0.1 POST /portcullis/echo drill=11 1 -\r\n").unwrap();
        ids.read();
        assert_eq!(ids.take(10), 2);
        assert_eq!(ids.take(11), 1);
        assert_eq!(ids.take(11), 0, "taken ids are forgotten");
    }

    #[test]
    fn status_texts_are_those_portcullis_sends() {
        assert!(is_status_text("CMGService_Noconnectorchannel"));
        assert!(is_status_text("CMGConnector_Endpointtimeout"));
        assert!(!is_status_text("Service Unavailable"));
    }
}
