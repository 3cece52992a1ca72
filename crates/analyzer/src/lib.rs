//! The connection analyzer behind `portcullis analyze`: checks the path a device takes, hop by
//! hop, and stops at the first failure, naming it, its cause and its fix.
//!
//! 1. name resolution of the gateway;
//! 2. TCP;
//! 3. TLS with the gateway's server certificate (chain, name, expiry);
//! 4. device authentication (or, with a token, the token: see [`token`]);
//! 5. ServiceMetadata;
//! 6. a live channel for the endpoint;
//! 7. the connector's certificate choice;
//! 8. a real request to the endpoint.
//!
//! Device authentication is checked without reaching any endpoint: the gateway judges the
//! device before it looks for a channel, so a request for endpoint 0 (never announced) comes
//! back `404 CMGService_Unknownendpoint` (or, in a gateway's first seconds, `503
//! CMGService_Gatewaystarting`) exactly when the device passed. A token is checked with the
//! real request on `CCM_PROXY_SERVERAUTH` instead, and ServiceMetadata and the last request
//! take that route with the token too.

mod network;
pub mod token;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pki::RootSet;
use serde::Serialize;
use time::OffsetDateTime;

use network::{connect, handshake, resolve};
use probe::{Outcome, ProbeOptions};
pub use token::TokenSource;

/// Each step's short name (the `hop` label of `portcullis_probe_*`), with a certificate.
pub const CERTIFICATE_HOPS: [&str; STEPS] = [
    "dns",
    "tcp",
    "tls",
    "device_auth",
    "service_metadata",
    "channel",
    "connector_certificate",
    "request",
];

/// Each step's short name with a token: step 4 is the token's.
pub const TOKEN_HOPS: [&str; STEPS] = [
    "dns",
    "tcp",
    "tls",
    "token",
    "service_metadata",
    "channel",
    "connector_certificate",
    "request",
];

/// What to analyze (`analyze.toml`).
#[derive(Debug, Clone)]
pub struct AnalyzeOptions {
    /// `https://host[:port]`: the gateway as devices name it.
    pub gateway: String,
    /// Roots the gateway's server certificate must chain to.
    pub ca: Vec<PathBuf>,
    pub endpoint: u64,
    /// The endpoint path and query for the real request, e.g. `SMS_MP/.sms_aut?MPLIST`.
    pub path: String,
    pub device_cert: Option<PathBuf>,
    pub device_key: Option<PathBuf>,
    /// A site token instead of the device certificate: step 4 checks it on
    /// `CCM_PROXY_SERVERAUTH`, and the later requests present it there.
    pub token: Option<TokenSource>,
    pub timeout: Duration,
    /// The connector's store, checked here too when the analyzer runs beside the connector.
    pub connector_store: Option<LocalStore>,
}

#[derive(Debug, Clone)]
pub struct LocalStore {
    pub store: PathBuf,
    pub allowed_roots: Vec<PathBuf>,
    pub pfx_password_env: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub number: usize,
    /// The step's short name: one of [`CERTIFICATE_HOPS`] or [`TOKEN_HOPS`].
    pub hop: &'static str,
    pub name: String,
    pub passed: bool,
    pub millis: f64,
    /// What was found (addresses, certificate, endpoints...).
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    pub gateway: String,
    pub endpoint: u64,
    pub steps: Vec<Step>,
    /// The number of steps there are; fewer ran when one failed.
    pub total: usize,
    /// The short names of all the steps, run or not.
    #[serde(skip)]
    pub hops: [&'static str; STEPS],
}

impl Analysis {
    pub fn passed(&self) -> bool {
        self.steps.len() == self.total && self.steps.iter().all(|s| s.passed)
    }

    pub fn render_text(&self) -> String {
        let mut out = format!(
            "Connection analysis: {} for endpoint {}\n\n",
            self.gateway, self.endpoint
        );
        for s in &self.steps {
            out.push_str(&format!(
                "[{}/{}] {}  {:<48} {:>9.1} ms\n",
                s.number,
                self.total,
                if s.passed { "PASS" } else { "FAIL" },
                s.name,
                s.millis
            ));
            if !s.detail.is_empty() {
                out.push_str(&format!("       {}\n", s.detail));
            }
            if let Some(cause) = &s.cause {
                out.push_str(&format!("       cause: {cause}\n"));
            }
            if let Some(fix) = &s.fix {
                out.push_str(&format!("       fix:   {fix}\n"));
            }
        }
        match self.steps.iter().find(|s| !s.passed) {
            Some(s) => out.push_str(&format!(
                "\nStopped at step {} of {}: {}.\n",
                s.number, self.total, s.name
            )),
            None => out.push_str(&format!("\nAll {} steps passed.\n", self.total)),
        }
        out
    }
}

/// A step's outcome: what was found, or why it failed and the fix.
pub(crate) type Checked<T> = Result<(T, String), (String, String)>;

pub const STEPS: usize = 8;

struct Run {
    steps: Vec<Step>,
    hops: [&'static str; STEPS],
}

impl Run {
    /// Runs one step, records it, and gives its value when it passed.
    async fn step<T>(
        &mut self,
        name: String,
        check: impl std::future::Future<Output = Checked<T>>,
    ) -> Option<T> {
        let started = Instant::now();
        let outcome = check.await;
        let millis = started.elapsed().as_secs_f64() * 1000.0;
        let number = self.steps.len() + 1;
        let hop = self.hops.get(number - 1).copied().unwrap_or("");
        let (value, step) = match outcome {
            Ok((value, detail)) => (
                Some(value),
                Step {
                    number,
                    hop,
                    name,
                    passed: true,
                    millis,
                    detail,
                    cause: None,
                    fix: None,
                },
            ),
            Err((cause, fix)) => (
                None,
                Step {
                    number,
                    hop,
                    name,
                    passed: false,
                    millis,
                    detail: String::new(),
                    cause: Some(cause),
                    fix: Some(fix),
                },
            ),
        };
        self.steps.push(step);
        value
    }
}

/// Bad options: the analysis could not start.
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error("gateway \"{0}\": give it as https://host[:port]")]
    Gateway(String),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

pub async fn analyze(options: &AnalyzeOptions) -> Result<Analysis, AnalyzeError> {
    let (host, port) = gateway_host_port(&options.gateway)
        .ok_or_else(|| AnalyzeError::Gateway(options.gateway.clone()))?;
    let roots = RootSet::load(&options.ca)?;
    let tls = Arc::new(pki::tls::client_config(&roots)?.with_no_client_auth());
    let hops = if options.token.is_some() {
        TOKEN_HOPS
    } else {
        CERTIFICATE_HOPS
    };
    let mut run = Run {
        steps: Vec::new(),
        hops,
    };
    let analysis = |run: Run| Analysis {
        gateway: options.gateway.clone(),
        endpoint: options.endpoint,
        steps: run.steps,
        total: STEPS,
        hops,
    };
    let timeout = options.timeout;

    let Some(addresses) = run
        .step(
            format!("Name resolution of {host}"),
            resolve(&host, port, timeout),
        )
        .await
    else {
        return Ok(analysis(run));
    };
    let Some(tcp) = run
        .step(
            format!("TCP connection to port {port}"),
            connect(&addresses, timeout),
        )
        .await
    else {
        return Ok(analysis(run));
    };
    if run
        .step(
            "TLS with the gateway's server certificate".into(),
            handshake(tcp, &host, tls, timeout),
        )
        .await
        .is_none()
    {
        return Ok(analysis(run));
    }
    let base = format!("https://{}", authority(&host, port));
    let path = options.path.trim_start_matches('/');
    let endpoint_path = format!("{}/{path}", options.endpoint);
    // With a token: its route, the token presented, no certificate.
    let mut token = None;
    if let Some(source) = &options.token {
        let mut stated = String::new();
        let checked = token::token_auth(source, timeout, &mut stated, |token| ProbeOptions {
            url: format!("{base}/CCM_PROXY_SERVERAUTH/{endpoint_path}"),
            ca: options.ca.clone(),
            cert: None,
            key: None,
            token: Some(token.to_string()),
            timeout,
            http2: false,
            keep_body: probe::DEFAULT_KEPT_BODY,
        });
        token = run
            .step(
                format!("Device token (request to endpoint {})", options.endpoint),
                checked,
            )
            .await;
        if token.is_none() {
            // A failed step shows what the token states next to the gateway's answer.
            if let Some(step) = run.steps.last_mut() {
                step.detail = stated;
            }
            return Ok(analysis(run));
        }
    }
    let route = if token.is_some() {
        "CCM_PROXY_SERVERAUTH"
    } else {
        "CCM_PROXY_MUTUALAUTH"
    };
    let request = |path: String| ProbeOptions {
        url: format!("{base}/{route}/{path}"),
        ca: options.ca.clone(),
        cert: token
            .is_none()
            .then(|| options.device_cert.clone())
            .flatten(),
        key: token
            .is_none()
            .then(|| options.device_key.clone())
            .flatten(),
        token: token.clone(),
        timeout,
        http2: false,
        keep_body: probe::DEFAULT_KEPT_BODY,
    };
    if token.is_none()
        && run
            .step(
                "Device authentication".into(),
                device_auth(options, request("0/portcullis-analyze".into())),
            )
            .await
            .is_none()
    {
        return Ok(analysis(run));
    }
    let Some(metadata) = run
        .step(
            "ServiceMetadata".into(),
            service_metadata(request("ServiceMetadata".into())),
        )
        .await
    else {
        return Ok(analysis(run));
    };
    if run
        .step(
            format!("A live channel for endpoint {}", options.endpoint),
            async { live_channel(&metadata, options.endpoint) },
        )
        .await
        .is_none()
    {
        return Ok(analysis(run));
    }
    if run
        .step("The connector's client certificate".into(), async {
            connector_certificate(&metadata, options.connector_store.as_ref())
        })
        .await
        .is_none()
    {
        return Ok(analysis(run));
    }
    run.step(
        format!("A request to the endpoint ({path})"),
        endpoint_request(request(endpoint_path)),
    )
    .await;
    Ok(analysis(run))
}

/// `https://host[:port]` (a path after it is ignored) -> host and port.
fn gateway_host_port(gateway: &str) -> Option<(String, u16)> {
    let uri: hyper::Uri = gateway.parse().ok()?;
    if uri.scheme_str() != Some("https") {
        return None;
    }
    let host = uri
        .host()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Some((host, uri.port_u16().unwrap_or(443)))
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The gateway's status text and the reason and remedy lines of its explaining body.
pub(crate) fn refusal_words(status: u16, text: &str, body: &[u8]) -> (String, String) {
    let body = String::from_utf8_lossy(body);
    let field = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .map(str::to_string)
    };
    let reason = field("reason:").unwrap_or_default();
    let cause = if reason.is_empty() {
        format!("{status} {text}")
    } else {
        format!("{status} {text}: {reason}")
    };
    (cause, field("remedy:").unwrap_or_default())
}

async fn device_auth(options: &AnalyzeOptions, request: ProbeOptions) -> Checked<()> {
    if options.device_cert.is_none() {
        return Err((
            "no device certificate configured (device_cert, device_key), and no token".into(),
            "Name a device's client authentication certificate and key in the analyzer's configuration, or give a device token (--token, --token-command).".into(),
        ));
    }
    let report = probe::probe(&request).await.map_err(|e| {
        (
            e.to_string(),
            "Check the device certificate and key files.".into(),
        )
    })?;
    match &report.outcome {
        // A gateway in its first seconds (startup_grace_secs) says so for an endpoint nobody
        // announced; it too has judged the device first.
        Outcome::HttpError { status, text }
            if matches!(
                (*status, text.as_str()),
                (404, "CMGService_Unknownendpoint") | (503, "CMGService_Gatewaystarting")
            ) =>
        {
            Ok((
            (),
            "the gateway accepted the device's certificate on CCM_PROXY_MUTUALAUTH".into(),
            ))
        }
        Outcome::HttpError { status, text } if text.starts_with("CMGService_") => {
            let (cause, remedy) = refusal_words(*status, text, &report.body);
            Err((cause, remedy))
        }
        Outcome::HttpError { status, text } => Err((
            format!("the server answered {status} {text}, not as a Portcullis gateway does"),
            "Check that the address is the gateway's, not the endpoint's or a proxy's.".into(),
        )),
        Outcome::Success { status } => Err((
            format!("the server answered {status} for an endpoint that cannot exist: it is not a Portcullis gateway"),
            "Check that the address is the gateway's.".into(),
        )),
        Outcome::Transport { text, .. } => Err((
            format!("{text}: {}", transport_cause(&report.lines)),
            "Check the device certificate: the gateway must be able to complete a handshake with it.".into(),
        )),
    }
}

pub(crate) fn transport_cause(lines: &[(logs::cmtrace::Severity, String)]) -> String {
    lines
        .iter()
        .rev()
        .find_map(|(_, l)| l.strip_prefix("[CCMHTTP] ERROR INFO: "))
        .unwrap_or("the connection failed")
        .to_string()
}

async fn service_metadata(request: ProbeOptions) -> Checked<serde_json::Value> {
    let report = probe::probe(&request)
        .await
        .map_err(|e| (e.to_string(), "Check the analyzer's configuration.".into()))?;
    let fix = "Check that the address is a Portcullis gateway and its version.";
    match &report.outcome {
        Outcome::Success { .. } => {
            let value: serde_json::Value = serde_json::from_slice(&report.body)
                .map_err(|e| (format!("ServiceMetadata is not JSON: {e}"), fix.to_string()))?;
            // A token for some endpoints only is shown those endpoints, not the channel count.
            let channels = match value["channels"].as_u64() {
                Some(n) => format!("{n} channel(s)"),
                None => "channels not shown to this token".into(),
            };
            let detail = format!(
                "{} {}, {channels}, {} endpoint(s) known",
                value["service"].as_str().unwrap_or("?"),
                value["version"].as_str().unwrap_or("?"),
                value["endpoints"].as_array().map_or(0, Vec::len),
            );
            Ok((value, detail))
        }
        Outcome::HttpError { status, text } => Err((
            format!("ServiceMetadata answered {status} {text}"),
            fix.into(),
        )),
        Outcome::Transport { text, .. } => Err((
            format!("{text}: {}", transport_cause(&report.lines)),
            fix.into(),
        )),
    }
}

fn live_channel(metadata: &serde_json::Value, endpoint: u64) -> Checked<()> {
    let endpoints = metadata["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let found = endpoints
        .iter()
        .find(|e| e["id"].as_u64() == Some(endpoint));
    let known: Vec<String> = endpoints
        .iter()
        .map(|e| {
            format!(
                "{} ({})",
                e["id"].as_u64().unwrap_or(0),
                e["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    match found {
        None => Err((
            format!(
                "no connector has announced endpoint {endpoint} to this gateway (known: {})",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ),
            "Check the endpoint id against the connector's [[endpoints]], and that a connector serving it has reached this gateway (its log says \"Maintaining connections...\").".into(),
        )),
        Some(e) if e["channels"].as_u64().unwrap_or(0) == 0 => Err((
            format!("endpoint {endpoint} is known but no connector holds a channel for it now"),
            "Start the connector, and check its log for why its channels to this gateway fail (TLS, allowed_connectors, network).".into(),
        )),
        Some(e) => Ok((
            (),
            format!(
                "{} channel(s) for endpoint {endpoint} ({})",
                e["channels"].as_u64().unwrap_or(0),
                e["name"].as_str().unwrap_or("?")
            ),
        )),
    }
}

fn connector_certificate(metadata: &serde_json::Value, local: Option<&LocalStore>) -> Checked<()> {
    let fix = "Run `portcullis doctor certs` on the connector's store and apply the fix it names; then reload the connector (SIGHUP).";
    if let Some(local) = local {
        let store = pki::CertStore::load(
            &local.store,
            &pki::Pkcs12Password::from_env(&local.pfx_password_env),
        )
        .map_err(|e| (e.to_string(), fix.to_string()))?;
        let allowed =
            RootSet::load(&local.allowed_roots).map_err(|e| (e.to_string(), fix.to_string()))?;
        let selection = pki::select_client_cert(&store, &allowed, OffsetDateTime::now_utc());
        let Some(chosen) = selection.selected.and_then(|i| store.entries.get(i)) else {
            let trail: Vec<String> = selection.trail.iter().map(|l| l.to_string()).collect();
            return Err((
                format!(
                    "the connector's store {} has no usable client authentication certificate; endpoints requiring one answer 403 CMGConnector_Clientcertificaterequired. Filter trail: {}",
                    local.store.display(),
                    trail.join(" | ")
                ),
                fix.into(),
            ));
        };
        return Ok(((), format!("the store selects {}", chosen.cert.label())));
    }
    let Some(connectors) = metadata["connectors"].as_array().cloned() else {
        // What a token for some endpoints only is shown: the request in the next step tells.
        return Ok((
            (),
            "not shown to a token for some endpoints only; the request to the endpoint tells"
                .into(),
        ));
    };
    let without: Vec<&str> = connectors
        .iter()
        .filter(|c| c["has_client_certificate"].as_bool() != Some(true))
        .filter_map(|c| c["connector_id"].as_str())
        .collect();
    if connectors.is_empty() {
        return Err((
            "the gateway reports no connector".into(),
            "Start a connector for this gateway.".into(),
        ));
    }
    if !without.is_empty() {
        return Err((
            format!(
                "connector {} has no client authentication certificate to present; endpoints requiring one answer 403 CMGConnector_Clientcertificaterequired",
                without.join(", ")
            ),
            fix.into(),
        ));
    }
    Ok((
        (),
        format!(
            "{} connector(s) present a client authentication certificate",
            connectors.len()
        ),
    ))
}

async fn endpoint_request(request: ProbeOptions) -> Checked<()> {
    let report = probe::probe(&request)
        .await
        .map_err(|e| (e.to_string(), "Check the analyzer's configuration.".into()))?;
    match &report.outcome {
        Outcome::Success { status } => Ok(((), format!("{status}, {} bytes", report.body_len))),
        Outcome::HttpError { status, text } => {
            let (cause, remedy) = refusal_words(*status, text, &report.body);
            let remedy = if remedy.is_empty() {
                "Read the endpoint's own logs (IIS W3C), and run `portcullis doctor logs` on them."
                    .into()
            } else {
                remedy
            };
            Err((cause, remedy))
        }
        Outcome::Transport { text, .. } => Err((
            format!("{text}: {}", transport_cause(&report.lines)),
            "Check the gateway's log for this request.".into(),
        )),
    }
}
