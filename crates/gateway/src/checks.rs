//! The connection analyzer, continuously (`[probe]` in the gateway's configuration): every
//! `interval_secs` the gateway runs `portcullis analyze`'s checks against itself, as a device
//! with the configured certificate or token would reach it, for each endpoint: name
//! resolution, TCP, TLS, device authentication (or the token), ServiceMetadata, a live
//! channel, the connector's certificate and a real request through the channel to the
//! endpoint. The last result of each hop is exported (`portcullis_probe_success{endpoint,hop}`,
//! `portcullis_probe_duration_seconds{endpoint,hop}`) and shown on the status page, so a broken
//! hop alerts before devices report it. A run that fails, and the first that passes again, are
//! logged. A reload starts, changes or stops the schedule ([`Checks::apply`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use analyzer::{Analysis, AnalyzeOptions, TokenSource};
use runtime::metrics::Registry;
use runtime::page::{Cell, Section, Tone};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::Shared;

/// The `[probe]` table.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSettings {
    /// The device certificate and key the checks present (a device certificate the gateway's
    /// `trusted_roots` trust, kept for this); or, instead, `token` or `token_command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_key: Option<PathBuf>,
    /// A device token the checks present on `CCM_PROXY_SERVERAUTH` instead of a certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A command (`sh -c`) printing the device token, run before each endpoint's checks
    /// (within `timeout_secs`), so a short-lived token is fetched fresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_command: Option<String>,
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

impl std::fmt::Debug for ProbeSettings {
    // The token is a credential: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeSettings")
            .field("credentials", &self.credentials())
            .field("ca", &self.ca)
            .field("url", &self.url)
            .field("endpoints", &self.endpoints)
            .field("path", &self.path)
            .field("interval_secs", &self.interval_secs)
            .field("timeout_secs", &self.timeout_secs)
            .finish()
    }
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
    /// Checks with a device certificate, every other key at its default.
    pub fn new(device_cert: PathBuf, device_key: PathBuf, ca: Vec<PathBuf>) -> ProbeSettings {
        ProbeSettings {
            device_cert: Some(device_cert),
            device_key: Some(device_key),
            token: None,
            ..ProbeSettings::with_token(String::new(), ca)
        }
    }

    /// Checks with a device token, every other key at its default.
    pub fn with_token(token: String, ca: Vec<PathBuf>) -> ProbeSettings {
        ProbeSettings {
            device_cert: None,
            device_key: None,
            token: Some(token),
            token_command: None,
            ca,
            url: None,
            endpoints: Vec::new(),
            path: default_path(),
            interval_secs: default_interval(),
            timeout_secs: default_timeout(),
        }
    }

    /// What the checks present, in words (never the token itself).
    pub(crate) fn credentials(&self) -> String {
        match (&self.device_cert, &self.token, &self.token_command) {
            (Some(cert), ..) => format!("device certificate {}", cert.display()),
            (None, Some(_), _) => "a token (token)".into(),
            // The program only: an argument may be a secret (a client secret on the command line).
            (None, None, Some(command)) => format!(
                "a token from the command `{}` (token_command; its arguments are not logged)",
                command.split_whitespace().next().unwrap_or_default()
            ),
            (None, None, None) => "nothing".into(),
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
        let certificate = self.device_cert.is_some() || self.device_key.is_some();
        let token = self.token.is_some() || self.token_command.is_some();
        if certificate && token {
            return Some((
                "probe.token",
                "give device_cert and device_key, or token or token_command, not both".into(),
            ));
        }
        if !certificate && !token {
            return Some((
                "probe.device_cert",
                "give device_cert and device_key (a device certificate), or token or token_command (a device token)".into(),
            ));
        }
        if certificate && (self.device_cert.is_none() || self.device_key.is_none()) {
            let missing = if self.device_cert.is_none() {
                "probe.device_cert"
            } else {
                "probe.device_key"
            };
            return Some((missing, "device_cert and device_key go together".into()));
        }
        if self.token.is_some() && self.token_command.is_some() {
            return Some((
                "probe.token_command",
                "give token or token_command, not both".into(),
            ));
        }
        if self.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Some(("probe.token", "is empty".into()));
        }
        if self
            .token_command
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Some(("probe.token_command", "is empty".into()));
        }
        None
    }

    fn token_source(&self) -> Option<TokenSource> {
        match (&self.token, &self.token_command) {
            (Some(token), _) => Some(TokenSource::Value(token.clone())),
            (None, Some(command)) => Some(TokenSource::Command(command.clone())),
            (None, None) => None,
        }
    }

    fn endpoints_text(&self) -> String {
        if self.endpoints.is_empty() {
            "every announced".into()
        } else {
            format!("{:?}", self.endpoints)
        }
    }

    /// What differs from `before`, key by key (the token's value never shown).
    fn changes(&self, before: &ProbeSettings) -> Vec<String> {
        let mut changed = Vec::new();
        let mut key = |name: &str, was: String, now: String| {
            if was != now {
                changed.push(format!("{name} {was} -> {now}"));
            }
        };
        key(
            "interval_secs",
            before.interval_secs.to_string(),
            self.interval_secs.to_string(),
        );
        key("endpoints", before.endpoints_text(), self.endpoints_text());
        key(
            "timeout_secs",
            before.timeout_secs.to_string(),
            self.timeout_secs.to_string(),
        );
        key("path", before.path.clone(), self.path.clone());
        key(
            "url",
            before.url.clone().unwrap_or_else(|| "(default)".into()),
            self.url.clone().unwrap_or_else(|| "(default)".into()),
        );
        key("ca", format!("{:?}", before.ca), format!("{:?}", self.ca));
        key("credentials", before.credentials(), self.credentials());
        if changed.is_empty()
            && (self.token != before.token || self.device_key != before.device_key)
        {
            changed.push("credentials: a new token or key".into());
        }
        changed
    }
}

/// The continuous analyzer of a running gateway: the schedule now (none without `[probe]`)
/// and the last run's analysis of each endpoint.
pub(crate) struct Checks {
    state: Mutex<State>,
    /// Where the schedule's task runs: the runtime the gateway started on (a reload may come
    /// from any thread).
    runtime: tokio::runtime::Handle,
}

#[derive(Default)]
struct State {
    /// Counts schedules; a result from an older one is dropped.
    generation: u64,
    running: Option<(ProbeSettings, tokio::task::AbortHandle)>,
    last: BTreeMap<u64, (OffsetDateTime, Analysis)>,
}

impl Checks {
    /// No schedule yet; call on the gateway's runtime.
    pub(crate) fn new() -> Checks {
        Checks {
            state: Mutex::default(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the schedule `settings` (None: no schedule): starts, restarts or stops the task,
    /// and says what changed (None: nothing), for the log and the reload's answer.
    pub(crate) fn apply(
        &self,
        settings: Option<&ProbeSettings>,
        listen: SocketAddr,
        shared: &Arc<Shared>,
    ) -> Option<String> {
        let mut state = self.state();
        let before = state.running.as_ref().map(|(s, _)| s.clone());
        let said = match (&before, settings) {
            (None, None) => return None,
            (Some(before), Some(now)) if before == now => return None,
            (None, Some(now)) => format!(
                "started: every {} s, endpoints {}, with {}",
                now.interval_secs,
                now.endpoints_text(),
                now.credentials()
            ),
            (Some(before), Some(now)) => format!("changed: {}", now.changes(before).join(", ")),
            (Some(_), None) => {
                "stopped: its series are removed from /metrics and its table from the status page"
                    .to_string()
            }
        };
        if let Some((_, task)) = state.running.take() {
            task.abort();
        }
        state.generation += 1;
        match settings {
            Some(settings) => {
                let task = self.runtime.spawn(schedule(
                    settings.clone(),
                    listen,
                    Arc::downgrade(shared),
                    state.generation,
                ));
                state.running = Some((settings.clone(), task.abort_handle()));
            }
            None => state.last.clear(),
        }
        drop(state);
        shared
            .log
            .info(&format!("Continuous analysis ([probe]) {said}"));
        Some(said)
    }

    fn last(&self) -> BTreeMap<u64, (OffsetDateTime, Analysis)> {
        self.state().last.clone()
    }

    /// Adds the series of the last results to `now`.
    pub(crate) fn render(&self, now: &Registry) {
        for (endpoint, (_, analysis)) in self.last() {
            for step in &analysis.steps {
                let labels = [("endpoint", endpoint.to_string()), ("hop", step.hop.into())];
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

    /// The status page's table: each endpoint's hops as last checked; None without
    /// `[probe]`.
    pub(crate) fn section(&self) -> Option<Section> {
        let state = self.state();
        state.running.as_ref()?;
        let mut rows = Vec::new();
        for (endpoint, (at, analysis)) in &state.last {
            for (i, hop) in analysis.hops.iter().enumerate() {
                let step = analysis.steps.get(i);
                let (result, what) = match step {
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
                    result,
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
        Some(Section {
            id: "probe",
            title: "Continuous analysis ([probe])".into(),
            note: "The gateway's own last check of each hop, as a device reaches it, per endpoint (portcullis analyze's checks).".into(),
            head: vec!["endpoint", "hop", "result", "ms", "found, or cause and fix", "at (UTC)"],
            rows,
            empty: "No run has finished yet.".into(),
        })
    }

    /// Keeps a run's result and logs a change: a failure, or the first pass after one.
    fn record(&self, shared: &Shared, generation: u64, endpoint: u64, analysis: Analysis) {
        let mut state = self.state();
        if state.generation != generation {
            return;
        }
        let passed_before = state.last.get(&endpoint).map(|(_, a)| a.passed());
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
        state
            .last
            .insert(endpoint, (OffsetDateTime::now_utc(), analysis));
    }

    /// After a run: endpoints it no longer checks leave the table and `/metrics`.
    fn keep_only(&self, generation: u64, endpoints: &[u64]) {
        let mut state = self.state();
        if state.generation == generation {
            state.last.retain(|e, _| endpoints.contains(e));
        }
    }
}

/// Runs the checks every `interval_secs` while the gateway is there (`shared` alive) and the
/// schedule is not replaced (the task is aborted then).
async fn schedule(
    settings: ProbeSettings,
    listen: SocketAddr,
    shared: Weak<Shared>,
    generation: u64,
) {
    let url = settings
        .url
        .clone()
        .unwrap_or_else(|| format!("https://localhost:{}", listen.port()));
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
                    .collect::<Vec<u64>>()
            } else {
                settings.endpoints.clone()
            }
        }) else {
            return;
        };
        // A token command runs once a run, not once an endpoint (it may be slow, or rate
        // limited by the provider); one that fails is left to each analysis to name.
        let token = match settings.token_source() {
            Some(TokenSource::Command(command)) => {
                let source = TokenSource::Command(command);
                match source.get(Duration::from_secs(settings.timeout_secs)).await {
                    Ok(token) => Some(TokenSource::Value(token)),
                    Err(_) => Some(source),
                }
            }
            other => other,
        };
        for &endpoint in &endpoints {
            let options = AnalyzeOptions {
                gateway: url.clone(),
                ca: settings.ca.clone(),
                endpoint,
                path: settings.path.clone(),
                device_cert: settings.device_cert.clone(),
                device_key: settings.device_key.clone(),
                token: token.clone(),
                timeout: Duration::from_secs(settings.timeout_secs),
                connector_store: None,
            };
            let analysis = analyzer::analyze(&options).await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            match analysis {
                Ok(analysis) => shared
                    .checks
                    .record(&shared, generation, endpoint, analysis),
                Err(why) => shared.log.error(&format!(
                    "Continuous analysis of endpoint {endpoint} cannot run: {why} ([probe])"
                )),
            }
        }
        if let Some(shared) = shared.upgrade() {
            shared.checks.keep_only(generation, &endpoints);
        }
        tokio::time::sleep(interval.saturating_sub(Duration::from_secs(5))).await;
    }
}
