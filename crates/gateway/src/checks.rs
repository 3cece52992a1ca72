//! The connection analyzer, continuously (`[probe]` in the gateway's configuration): every
//! `interval_secs` the gateway runs `portcullis analyze`'s checks against itself, as a device
//! with the configured certificate would reach it, for each endpoint: name resolution, TCP,
//! TLS, device authentication, ServiceMetadata, a live channel, the connector's certificate and
//! a real request through the channel to the endpoint. The last result of each hop is exported
//! (`portcullis_probe_success{endpoint,hop}`, `portcullis_probe_duration_seconds{endpoint,hop}`)
//! and shown on the status page, so a broken hop alerts before devices report it. A run that
//! fails, and the first that passes again, are logged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use analyzer::{Analysis, AnalyzeOptions};
use runtime::metrics::Registry;
use runtime::page::{Cell, Section, Tone};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::Shared;

/// The `[probe]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSettings {
    /// The device certificate and key the checks present (a device certificate the gateway's
    /// `trusted_roots` trust, kept for this).
    pub device_cert: PathBuf,
    pub device_key: PathBuf,
    /// Roots the gateway's server certificate must chain to, as devices have them.
    pub ca: Vec<PathBuf>,
    /// The gateway as the checks name it; default `https://localhost:<listen port>`. Its
    /// name must be one the server certificate holds.
    #[serde(default)]
    pub url: Option<String>,
    /// Endpoint ids to check; default every endpoint a connector has announced.
    #[serde(default)]
    pub endpoints: Vec<u64>,
    /// The endpoint path and query of the real request.
    #[serde(default = "default_path")]
    pub path: String,
    /// Seconds between runs (10 to 86,400; default 60).
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    /// Seconds each check may take (1 to 300; default 10).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_path() -> String {
    "SMS_MP/.sms_aut?MPLIST".into()
}

fn default_interval() -> u64 {
    60
}

fn default_timeout() -> u64 {
    10
}

impl ProbeSettings {
    /// The required keys, every other at its default.
    pub fn new(device_cert: PathBuf, device_key: PathBuf, ca: Vec<PathBuf>) -> ProbeSettings {
        ProbeSettings {
            device_cert,
            device_key,
            ca,
            url: None,
            endpoints: Vec::new(),
            path: default_path(),
            interval_secs: default_interval(),
            timeout_secs: default_timeout(),
        }
    }

    /// What is wrong with the settings, as a key and a reason.
    pub(crate) fn problem(&self) -> Option<(&'static str, String)> {
        if !(10..=86_400).contains(&self.interval_secs) {
            return Some(("probe.interval_secs", "must be between 10 and 86400".into()));
        }
        if !(1..=300).contains(&self.timeout_secs) {
            return Some(("probe.timeout_secs", "must be between 1 and 300".into()));
        }
        if self.ca.is_empty() {
            return Some((
                "probe.ca",
                "list the root CA file(s) the gateway's server certificate chains to".into(),
            ));
        }
        if let Some(url) = &self.url {
            if !url.starts_with("https://") {
                return Some((
                    "probe.url",
                    format!("\"{url}\": give it as https://host[:port]"),
                ));
            }
        }
        None
    }
}

/// The hops, by the analyzer's step number: the `hop` label.
pub const HOPS: [&str; 8] = [
    "dns",
    "tcp",
    "tls",
    "device_auth",
    "service_metadata",
    "channel",
    "connector_certificate",
    "request",
];

/// The last run's analysis of each endpoint.
#[derive(Default)]
pub(crate) struct Checks {
    last: Mutex<BTreeMap<u64, (OffsetDateTime, Analysis)>>,
}

impl Checks {
    fn last(&self) -> BTreeMap<u64, (OffsetDateTime, Analysis)> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Adds the series of the last results to `now`.
    pub(crate) fn render(&self, now: &Registry) {
        for (endpoint, (_, analysis)) in self.last() {
            for step in &analysis.steps {
                let Some(hop) = HOPS.get(step.number.saturating_sub(1)) else {
                    continue;
                };
                let labels = [("endpoint", endpoint.to_string()), ("hop", (*hop).into())];
                let labels: Vec<(&'static str, &str)> =
                    labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                now.gauge(
                    "portcullis_probe_success",
                    "1 when the gateway's own last check of this hop for this endpoint passed, 0 when it failed ([probe]; hops after a failure are not checked).",
                    &labels,
                )
                .set(if step.passed { 1.0 } else { 0.0 });
                now.gauge(
                    "portcullis_probe_duration_seconds",
                    "How long the gateway's own last check of this hop for this endpoint took.",
                    &labels,
                )
                .set(step.millis / 1000.0);
            }
        }
    }

    /// The status page's table: each endpoint's hops as last checked.
    pub(crate) fn section(&self) -> Section {
        let mut rows = Vec::new();
        for (endpoint, (at, analysis)) in self.last() {
            for (i, hop) in HOPS.iter().enumerate() {
                let step = analysis.steps.get(i);
                let (state, what) = match step {
                    Some(s) if s.passed => (Cell::toned("passed", Tone::Good), s.detail.clone()),
                    Some(s) => (
                        Cell::toned("failed", Tone::Bad),
                        format!(
                            "{} Fix: {}",
                            s.cause.clone().unwrap_or_default(),
                            s.fix.clone().unwrap_or_default()
                        ),
                    ),
                    None => (Cell::new("not reached"), String::new()),
                };
                rows.push(vec![
                    Cell::new(endpoint.to_string()),
                    Cell::new(format!("{} {hop}", i + 1)),
                    state,
                    Cell::new(step.map(|s| format!("{:.1}", s.millis)).unwrap_or_default()),
                    Cell::new(what),
                    Cell::new(format!(
                        "{:02}:{:02}:{:02}",
                        at.hour(),
                        at.minute(),
                        at.second()
                    )),
                ]);
            }
        }
        Section {
            id: "probe",
            title: "Continuous analysis ([probe])".into(),
            note: "The gateway's own last check of each hop, as a device reaches it, per endpoint (portcullis analyze's checks).".into(),
            head: vec!["endpoint", "hop", "result", "ms", "found, or cause and fix", "at (UTC)"],
            rows,
            empty: "No run has finished yet.".into(),
        }
    }
}

/// Runs the checks every `interval_secs` while the gateway is there (`shared` alive).
pub(crate) fn start(settings: ProbeSettings, listen: SocketAddr, shared: Weak<Shared>) {
    let url = settings
        .url
        .clone()
        .unwrap_or_else(|| format!("https://localhost:{}", listen.port()));
    tokio::spawn(async move {
        let interval = Duration::from_secs(settings.interval_secs);
        loop {
            // The first run waits a little: connectors dial in after the gateway starts.
            tokio::time::sleep(interval.min(Duration::from_secs(5))).await;
            let Some(endpoints) = shared.upgrade().map(|s| {
                if settings.endpoints.is_empty() {
                    s.registry
                        .endpoints()
                        .into_iter()
                        .map(|(id, ..)| id)
                        .collect()
                } else {
                    settings.endpoints.clone()
                }
            }) else {
                return;
            };
            for endpoint in endpoints {
                let options = AnalyzeOptions {
                    gateway: url.clone(),
                    ca: settings.ca.clone(),
                    endpoint,
                    path: settings.path.clone(),
                    device_cert: Some(settings.device_cert.clone()),
                    device_key: Some(settings.device_key.clone()),
                    timeout: Duration::from_secs(settings.timeout_secs),
                    connector_store: None,
                };
                let analysis = analyzer::analyze(&options).await;
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                record(&shared, endpoint, analysis);
            }
            tokio::time::sleep(interval.saturating_sub(Duration::from_secs(5))).await;
        }
    });
}

/// Keeps a run's result and logs a change: a failure, or the first pass after one.
fn record(shared: &Arc<Shared>, endpoint: u64, analysis: Result<Analysis, analyzer::AnalyzeError>) {
    let analysis = match analysis {
        Ok(analysis) => analysis,
        Err(why) => {
            shared.log.error(&format!(
                "Continuous analysis of endpoint {endpoint} cannot run: {why} ([probe])"
            ));
            return;
        }
    };
    let Some(checks) = &shared.checks else {
        return;
    };
    let mut last = checks.last.lock().unwrap_or_else(|p| p.into_inner());
    let passed_before = last.get(&endpoint).map(|(_, a)| a.passed());
    match analysis.steps.iter().find(|s| !s.passed) {
        Some(failed) => shared.log.warn(&format!(
            "Continuous analysis of endpoint {endpoint}: step {} ({}) failed: {} {}",
            failed.number,
            failed.name,
            failed.cause.as_deref().unwrap_or(""),
            failed.fix.as_deref().unwrap_or("")
        )),
        None if passed_before == Some(false) => shared.log.info(&format!(
            "Continuous analysis of endpoint {endpoint}: every step passes again"
        )),
        None => {}
    }
    last.insert(endpoint, (OffsetDateTime::now_utc(), analysis));
}
