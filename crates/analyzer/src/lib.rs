//! The connection analyzer behind `portcullis analyze`: checks the path a device takes, hop by
//! hop, and stops at the first failure, naming it, its cause and its fix.
//!
//! 1. name resolution of the gateway;
//! 2. TCP;
//! 3. TLS with the gateway's server certificate (chain, name, expiry);
//! 4. device authentication;
//! 5. ServiceMetadata;
//! 6. a live channel for the endpoint;
//! 7. the connector's certificate choice;
//! 8. a real request to the endpoint.
//!
//! Device authentication is checked without reaching any endpoint: the gateway judges the
//! device before it looks for a channel, so a request for endpoint 0 (never announced) comes
//! back `404 CMGService_Unknownendpoint` (or, in a gateway's first seconds, `503
//! CMGService_Gatewaystarting`) exactly when the device passed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pki::RootSet;
use rustls_pki_types::ServerName;
use serde::Serialize;
use time::OffsetDateTime;

use probe::{Outcome, ProbeOptions};

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
type Checked<T> = Result<(T, String), (String, String)>;

const STEPS: usize = 8;

struct Run {
    steps: Vec<Step>,
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
        let (value, step) = match outcome {
            Ok((value, detail)) => (
                Some(value),
                Step {
                    number,
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
    let mut run = Run { steps: Vec::new() };
    let analysis = |run: Run| Analysis {
        gateway: options.gateway.clone(),
        endpoint: options.endpoint,
        steps: run.steps,
        total: STEPS,
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
    let request = |path: String| ProbeOptions {
        url: format!("{base}{path}"),
        ca: options.ca.clone(),
        cert: options.device_cert.clone(),
        key: options.device_key.clone(),
        token: None,
        timeout,
        http2: false,
        keep_body: probe::DEFAULT_KEPT_BODY,
    };
    if run
        .step(
            "Device authentication".into(),
            device_auth(
                options,
                request("/CCM_PROXY_MUTUALAUTH/0/portcullis-analyze".into()),
            ),
        )
        .await
        .is_none()
    {
        return Ok(analysis(run));
    }
    let Some(metadata) = run
        .step(
            "ServiceMetadata".into(),
            service_metadata(request("/CCM_PROXY_MUTUALAUTH/ServiceMetadata".into())),
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
    let path = options.path.trim_start_matches('/');
    run.step(
        format!("A request to the endpoint ({path})"),
        endpoint_request(request(format!(
            "/CCM_PROXY_MUTUALAUTH/{}/{path}",
            options.endpoint
        ))),
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

async fn resolve(host: &str, port: u16, timeout: Duration) -> Checked<Vec<SocketAddr>> {
    let fix = || {
        format!("Check the DNS record (or hosts file entry) for {host}: devices must resolve the gateway's name to its public address.")
    };
    match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
        Err(_) => Err((
            format!("resolving {host} took longer than {timeout:?}"),
            fix(),
        )),
        Ok(Err(e)) => Err((format!("{host} does not resolve: {e}"), fix())),
        Ok(Ok(found)) => {
            let addresses: Vec<SocketAddr> = found.collect();
            if addresses.is_empty() {
                return Err((format!("{host} resolves to no address"), fix()));
            }
            let shown: Vec<String> = addresses.iter().map(|a| a.ip().to_string()).collect();
            Ok((addresses, format!("{host} -> {}", shown.join(", "))))
        }
    }
}

async fn connect(addresses: &[SocketAddr], timeout: Duration) -> Checked<tokio::net::TcpStream> {
    let mut failures = Vec::new();
    for addr in addresses {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => return Ok((tcp, format!("connected to {addr}"))),
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_) => failures.push(format!("{addr}: no answer within {timeout:?}")),
        }
    }
    Err((
        format!("cannot connect: {}", failures.join("; ")),
        "Check that the gateway is running and listening on this port, and that firewalls and load balancers pass TCP to it.".into(),
    ))
}

async fn handshake(
    tcp: tokio::net::TcpStream,
    host: &str,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Checked<()> {
    let name = ServerName::try_from(host.to_string()).map_err(|_| {
        (
            format!("\"{host}\" is not a valid server name"),
            "Use the gateway's DNS name or IP address.".to_string(),
        )
    })?;
    let connecting = tokio_rustls::TlsConnector::from(tls).connect(name, tcp);
    let stream = match tokio::time::timeout(timeout, connecting).await {
        Err(_) => {
            return Err((
                format!("the TLS handshake took longer than {timeout:?}"),
                "Check that the port serves TLS (not plain HTTP) and nothing in between holds the handshake.".into(),
            ))
        }
        Ok(Err(e)) => return Err(tls_failure(host, &e)),
        Ok(Ok(stream)) => stream,
    };
    let (_, session) = stream.get_ref();
    let leaf = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| pki::cert::Certificate::from_der(c.as_ref()).ok());
    let version = match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2",
        _ => "TLS",
    };
    let Some(leaf) = leaf else {
        return Ok(((), format!("{version}, server certificate not readable")));
    };
    let days = (leaf.not_after - OffsetDateTime::now_utc()).whole_days();
    let mut detail = format!(
        "{version}; {} (expires {}, in {days} days)",
        leaf.label(),
        pki::filter::date_text(leaf.not_after)
    );
    if days < 30 {
        detail.push_str(" - renew it soon");
    }
    Ok(((), detail))
}

/// The cause and fix for a failed handshake, named by the WinHTTP secure-failure flag a
/// device would log for it.
fn tls_failure(host: &str, error: &std::io::Error) -> (String, String) {
    let flag = probe::secure_failure_flag(error);
    let (what, fix) = match flag.name {
        "INVALID_CA" => (
            "the gateway's server certificate does not chain to a trusted root".to_string(),
            "Give devices (and this analyzer's `ca`) the root CA that issued the gateway's certificate, or reissue it from a CA they trust; send the intermediates with the certificate.".to_string(),
        ),
        "CERT_CN_INVALID" => (
            format!("the gateway's server certificate does not name {host}"),
            format!("Reissue the gateway's certificate with {host} in its subject alternative names, or use the name it carries."),
        ),
        "CERT_DATE_INVALID" => (
            "the gateway's server certificate is not valid now".to_string(),
            "Renew the gateway's server certificate (and check the clocks).".to_string(),
        ),
        "CERT_REVOKED" => (
            "the gateway's server certificate is revoked".to_string(),
            "Issue the gateway a new server certificate.".to_string(),
        ),
        "CERT_REV_FAILED" => (
            "the revocation status of the gateway's server certificate cannot be checked".to_string(),
            "Publish a current CRL where devices can fetch it.".to_string(),
        ),
        _ => (
            "the TLS handshake failed".to_string(),
            "Check that the port serves TLS 1.2 or 1.3 with a server certificate devices trust.".to_string(),
        ),
    };
    (
        format!(
            "{what} (WinHTTP 0x80072f8f, WINHTTP_CALLBACK_STATUS_FLAG_{}): {error}",
            flag.name
        ),
        fix,
    )
}

/// The gateway's status text and the reason and remedy lines of its explaining body.
fn refusal_words(status: u16, text: &str, body: &[u8]) -> (String, String) {
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
            "no device certificate configured (device_cert, device_key)".into(),
            "Name a device's client authentication certificate and key in the analyzer's configuration.".into(),
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

fn transport_cause(lines: &[(logs::cmtrace::Severity, String)]) -> String {
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
            let detail = format!(
                "{} {}, {} channel(s), {} endpoint(s) known",
                value["service"].as_str().unwrap_or("?"),
                value["version"].as_str().unwrap_or("?"),
                value["channels"].as_u64().unwrap_or(0),
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
    let connectors = metadata["connectors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
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
