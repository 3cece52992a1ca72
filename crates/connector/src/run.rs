//! The running connector: picks its client certificate, dials every gateway (N channels each,
//! reconnecting with backoff and jitter), and serves the gateway's requests on each channel by
//! forwarding them to the endpoint they name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use channel::config::{self, ConfigError};
use channel::refusal::Refusal;
use channel::shards::Shards;
use channel::tunnel::{self, headers, refusal_response, Body, EndpointInfo, Hello, Served};
use hyper::body::Incoming;
use hyper::{Request, Response, Uri};
use pki::{select_client_cert, CertStore, Pkcs12Password, RootSet};
use ring::rand::SecureRandom;
use rustls_pki_types::ServerName;
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::watch;

use logs::cmtrace::Severity;

use crate::endpoint::{
    endpoint_url, forwarding_parts, lock, received_line, received_parts, EndpointClient,
    EndpointTrust,
};
use pki::crl::{CrlPolicy, RevocationList};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The endpoint id devices use in their URLs.
    pub id: u64,
    /// The site role, e.g. "SMS_MP".
    pub name: String,
    /// The internal base URL, e.g. "https://InternalMP.contoso.com".
    pub url: String,
}

/// `portcullis connector --config FILE`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    /// Names this connector in the gateway's logs and ServiceMetadata.
    pub connector_id: String,
    /// Every gateway instance, as "host:port"; the connector holds channels to each.
    pub gateways: Vec<String>,
    /// The name the gateways' server certificate must carry (default: each gateway's host).
    #[serde(default)]
    pub gateway_server_name: Option<String>,
    /// Roots the gateways' server certificate must chain to.
    pub gateway_roots: Vec<PathBuf>,
    /// Channels per gateway instance.
    #[serde(default = "default_channels")]
    pub channels_per_gateway: usize,
    /// Whether a gateway that says (in its hello) that it runs more worker threads than
    /// `channels_per_gateway` gets a channel for each (64 at most); false holds the count.
    #[serde(default = "default_true")]
    pub channels_follow_gateway_threads: bool,
    /// The certificate the connector presents when it dials a gateway, and its key.
    pub channel_cert: PathBuf,
    pub channel_key: PathBuf,
    /// The store the client-authentication filter chain reads, and the allowed root CAs.
    pub client_cert_store: PathBuf,
    pub allowed_roots: Vec<PathBuf>,
    /// Environment variable holding the password of .pfx/.p12 files in the store.
    #[serde(default = "default_pfx_env")]
    pub pfx_password_env: String,
    /// Roots the endpoints' server certificates must chain to.
    pub endpoint_roots: Vec<PathBuf>,
    /// CRLs (from the endpoint roots) the endpoints' server certificates are checked against;
    /// empty: no revocation check. Re-read on reload.
    #[serde(default)]
    pub endpoint_crls: Vec<PathBuf>,
    /// An endpoint whose issuer has no current CRL in `endpoint_crls`: "refuse" or
    /// "allow-and-warn".
    #[serde(default)]
    pub endpoint_crl_policy: CrlPolicy,
    pub endpoints: Vec<EndpointConfig>,
    /// Seconds an endpoint may take to answer.
    #[serde(default = "default_endpoint_timeout")]
    pub endpoint_timeout_secs: u64,
    /// The largest request header block a channel takes from a gateway, counted as HPACK
    /// does (each field's name and value and 32). Announced in the hello: a gateway sends
    /// nothing larger (its devices get 431), so keep it at least the gateways' own
    /// `max_request_header_bytes` (which counts the metadata they add).
    #[serde(default = "default_max_request_header_bytes")]
    pub max_request_header_bytes: u32,
    /// Verbose logging: the whole certificate filter trail, not only its outcome, and a line
    /// per message with the device and the certificate presented. Changes on reload (SIGHUP)
    /// or an admin call, without a restart.
    #[serde(default)]
    pub verbose: bool,
    /// Where the log goes: `[log]` file, max_size_kib, console.
    #[serde(default)]
    pub log: logs::logger::LogSettings,
    /// The local admin surface (`GET /status`, `PUT /verbose`, `POST /reload`), loopback only.
    #[serde(default)]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Worker threads (default: one per CPU). Each runs its own single-threaded runtime (a
    /// shard) and keeps the connections it was given; see `channel::shards`. On a host shared
    /// with other busy processes fewer are cheaper per request.
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

fn default_channels() -> usize {
    2
}
fn default_true() -> bool {
    true
}
fn default_pfx_env() -> String {
    "PORTCULLIS_PFX_PASSWORD".into()
}
fn default_endpoint_timeout() -> u64 {
    60
}
/// Twice the gateway's default, so a gateway may raise its own somewhat.
fn default_max_request_header_bytes() -> u32 {
    64 * 1024
}

impl ConnectorConfig {
    pub fn load(path: &Path) -> Result<ConnectorConfig, ConfigError> {
        let mut cfg: ConnectorConfig = config::load_toml(path)?;
        let resolve_all = |paths: &[PathBuf]| {
            paths
                .iter()
                .map(|p| config::resolve(path, p))
                .collect::<Vec<_>>()
        };
        cfg.gateway_roots = resolve_all(&cfg.gateway_roots);
        cfg.allowed_roots = resolve_all(&cfg.allowed_roots);
        cfg.endpoint_roots = resolve_all(&cfg.endpoint_roots);
        cfg.endpoint_crls = resolve_all(&cfg.endpoint_crls);
        cfg.channel_cert = config::resolve(path, &cfg.channel_cert);
        cfg.channel_key = config::resolve(path, &cfg.channel_key);
        cfg.client_cert_store = config::resolve(path, &cfg.client_cert_store);
        cfg.log.file = cfg.log.file.as_deref().map(|p| config::resolve(path, p));
        let invalid = |key, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            reason,
        };
        if let Some((key, reason)) = cfg.log.problem() {
            return Err(invalid(key, reason));
        }
        if let Some(addr) = cfg
            .admin_listen
            .filter(|a| !channel::admin::is_allowed_address(a))
        {
            return Err(invalid(
                "admin_listen",
                format!("{addr} is not a loopback address; the admin surface has no authentication of its own, so it listens on 127.0.0.1 or ::1 only"),
            ));
        }
        if let Some(reason) = channel::config::worker_threads_problem(cfg.worker_threads) {
            return Err(invalid("worker_threads", reason));
        }
        if cfg.gateways.is_empty() {
            return Err(invalid(
                "gateways",
                "list at least one gateway as \"host:port\"".into(),
            ));
        }
        for g in &cfg.gateways {
            if split_host_port(g).is_none() {
                return Err(invalid("gateways", format!("\"{g}\" is not \"host:port\"")));
            }
        }
        if cfg.channels_per_gateway == 0 || cfg.channels_per_gateway > 64 {
            return Err(invalid(
                "channels_per_gateway",
                "must be between 1 and 64".into(),
            ));
        }
        if cfg.endpoints.is_empty() {
            return Err(invalid(
                "endpoints",
                "list at least one endpoint ([[endpoints]] id, name, url)".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for e in &cfg.endpoints {
            if !seen.insert(e.id) {
                return Err(invalid(
                    "endpoints",
                    format!("endpoint id {} is listed twice", e.id),
                ));
            }
            match e.url.parse::<Uri>() {
                Ok(uri) if uri.scheme_str() == Some("https") && uri.host().is_some() => {}
                _ => {
                    return Err(invalid(
                        "endpoints",
                        format!("endpoint {}: \"{}\" is not an https:// URL", e.id, e.url),
                    ))
                }
            }
        }
        for (key, roots) in [
            ("gateway_roots", &cfg.gateway_roots),
            ("allowed_roots", &cfg.allowed_roots),
            ("endpoint_roots", &cfg.endpoint_roots),
        ] {
            if roots.is_empty() {
                return Err(invalid(key, "list at least one root CA file".into()));
            }
        }
        if !(4 * 1024..=1024 * 1024).contains(&cfg.max_request_header_bytes) {
            return Err(invalid(
                "max_request_header_bytes",
                "must be between 4096 and 1048576 (and at least the gateways' max_request_header_bytes)".into(),
            ));
        }
        if cfg.endpoint_timeout_secs == 0 || cfg.endpoint_timeout_secs > 3600 {
            return Err(invalid(
                "endpoint_timeout_secs",
                "must be between 1 and 3600".into(),
            ));
        }
        Ok(cfg)
    }
}

fn split_host_port(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Endpoint(#[from] crate::endpoint::EndpointClientError),
}

pub use logs::Log;

pub struct RunningConnector {
    stop: watch::Sender<bool>,
    dialer: Dialer,
    service: Arc<Service>,
    /// The configuration it started with: what a reload cannot change is compared with it.
    started: ConnectorConfig,
}

impl RunningConnector {
    /// Stops at once: what is on the channels is cut.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.finish_tasks(tokio::time::Instant::now()).await;
    }

    /// Waits for every task until `deadline`, then aborts what is left; says how many were
    /// cut. A widening task may start a dial while the first ones end: until none is left.
    async fn finish_tasks(&self, deadline: tokio::time::Instant) -> usize {
        let mut cut = 0;
        loop {
            let tasks = std::mem::take(&mut lock(&self.dialer.tasks).handles);
            if tasks.is_empty() {
                return cut;
            }
            for mut task in tasks {
                if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                    cut += 1;
                    task.abort();
                    let _ = task.await;
                }
            }
        }
    }

    /// Stops after draining: each channel tells its gateway it is draining (the gateway sends
    /// it nothing new), says GOAWAY, and answers the requests under way for at most `limit`
    /// before it closes. The gateways meanwhile send through other connectors' channels.
    pub async fn stop_gracefully(self, limit: Duration) {
        let _ = self.stop.send(true);
        let cut = self
            .finish_tasks(tokio::time::Instant::now() + DRAIN_NOTICE + limit)
            .await;
        if cut > 0 {
            self.service.log.warn(&format!(
                "Stopping: {cut} channel(s) still had requests under way after {} s and were closed",
                limit.as_secs()
            ));
        } else {
            self.service
                .log
                .info("Stopping: every channel drained, no request under way was cut");
        }
    }

    /// Channels being dialled or held, over all gateways (each dial loop holds at most one).
    pub fn dial_loops(&self) -> usize {
        lock(&self.dialer.tasks).dials
    }

    pub fn log(&self) -> &Log {
        &self.service.log
    }

    /// Applies what can change while running from a freshly loaded configuration: `verbose`,
    /// and the client certificate (the store is read and the filter chain runs again; the
    /// new choice serves the next request). Says what changed.
    pub fn reload(&self, config: &ConnectorConfig) -> Result<String, ConnectorError> {
        let mut changed = Vec::new();
        if self.service.log.set_verbose(config.verbose) != config.verbose {
            changed.push(format!(
                "verbose {}",
                if config.verbose { "on" } else { "off" }
            ));
        }
        let choice = choose_client_certificate(config, &self.service.log)?;
        let label = choice.label.clone();
        *self.service.trail.lock().unwrap_or_else(|p| p.into_inner()) = choice.trail;
        self.service.client.store(Arc::new(choice.client));
        changed.push(format!(
            "client certificate re-selected: {}",
            label.as_deref().unwrap_or("none")
        ));
        // The endpoints: requests use the new table at once.
        let urls = endpoint_urls(config);
        if **self.service.endpoints.load() != urls {
            let mut listed: Vec<String> = config
                .endpoints
                .iter()
                .map(|e| format!("{} ({}) {}", e.id, e.name, e.url))
                .collect();
            listed.sort();
            changed.push(format!("endpoints now {}", listed.join(", ")));
            self.service.endpoints.store(Arc::new(urls));
        }
        // Whether there is a certificate at all, and the endpoints, are in the hello, which
        // the gateways use (routing, and ServiceMetadata, read by `portcullis analyze`): they
        // must hear of a change.
        let has_certificate = label.is_some();
        let infos = endpoint_infos(config);
        let hello_changed = {
            let mut hello = lock(&self.service.hello);
            let changed =
                hello.has_client_certificate != has_certificate || hello.endpoints != infos;
            hello.has_client_certificate = has_certificate;
            hello.endpoints = infos;
            changed
        };
        if hello_changed {
            self.service.hello_changes.send_modify(|n| *n += 1);
            changed.push(format!(
                "channels reopen one at a time ({} s apart) to give the gateways the new hello",
                REOPEN_STAGGER.as_secs()
            ));
        }
        let need_restart = restart_only_changes(&self.started, config);
        if !need_restart.is_empty() {
            changed.push(format!(
                "not applied until the connector restarts: {}",
                need_restart.join(", ")
            ));
        }
        Ok(changed.join("; "))
    }

    /// Logs the certificate filter trail of the current choice (what verbose adds when it is
    /// turned on while running).
    pub fn log_trail(&self) {
        let trail = self.service.trail.lock().unwrap_or_else(|p| p.into_inner());
        for (severity, line) in trail.iter() {
            self.service.log.write(*severity, line);
        }
    }

    /// The chosen client certificate, if any.
    pub fn client_certificate(&self) -> Option<String> {
        self.service.client.load().selected_label()
    }
}

/// Each endpoint's id and URL, as the configuration gives them (validated by `load`).
fn endpoint_urls(config: &ConnectorConfig) -> HashMap<u64, Uri> {
    config
        .endpoints
        .iter()
        .filter_map(|e| e.url.parse::<Uri>().ok().map(|u| (e.id, u)))
        .collect()
}

/// The endpoints as the hello announces them.
fn endpoint_infos(config: &ConnectorConfig) -> Vec<EndpointInfo> {
    config
        .endpoints
        .iter()
        .map(|e| EndpointInfo {
            id: e.id,
            name: e.name.clone(),
        })
        .collect()
}

/// The settings a reload cannot apply to a running connector, named as in the file, that
/// differ between `running` and `loaded`.
fn restart_only_changes(running: &ConnectorConfig, loaded: &ConnectorConfig) -> Vec<&'static str> {
    // Each key as the file names it, and the fields it covers.
    macro_rules! differing {
        ($($key:literal: $($field:ident),+;)*) => {{
            let mut changed = Vec::new();
            $(if false $(|| running.$field != loaded.$field)+ {
                changed.push($key);
            })*
            changed
        }};
    }
    differing! {
        "connector_id": connector_id;
        "gateways": gateways;
        "gateway_server_name": gateway_server_name;
        "gateway_roots": gateway_roots;
        "channels_per_gateway": channels_per_gateway;
        "channels_follow_gateway_threads": channels_follow_gateway_threads;
        "channel_cert": channel_cert, channel_key;
        "worker_threads": worker_threads;
        "admin_listen": admin_listen;
        "max_request_header_bytes": max_request_header_bytes;
        "[log]": log;
    }
}

struct Service {
    /// What the hello says; the certificate part changes on a reload.
    hello: Mutex<Hello>,
    /// Counts changes of the hello: each channel drains and is dialled again when it moves,
    /// one at a time, so the gateways hear the new hello.
    hello_changes: watch::Sender<u64>,
    /// Endpoint ids and their URLs; a reload may swap in new ones.
    endpoints: ArcSwap<HashMap<u64, Uri>>,
    client: ArcSwap<EndpointClient>,
    /// The last filter trail, replayed when verbose is turned on while running.
    trail: Mutex<Vec<(Severity, String)>>,
    log: Log,
}

/// The outcome of running the filter chain on the configured store.
struct Choice {
    client: EndpointClient,
    label: Option<String>,
    trail: Vec<(Severity, String)>,
}

/// Reads the store, runs the filter chain and logs it (the whole trail when verbose, the
/// outcome always), and builds the endpoint client that presents the chosen certificate.
fn choose_client_certificate(
    config: &ConnectorConfig,
    log: &Log,
) -> Result<Choice, ConnectorError> {
    let store = CertStore::load(
        &config.client_cert_store,
        &Pkcs12Password::from_env(&config.pfx_password_env),
    )?;
    let allowed = RootSet::load(&config.allowed_roots)?;
    let selection = select_client_cert(&store, &allowed, OffsetDateTime::now_utc());
    let mut trail = Vec::new();
    for line in &selection.trail {
        let severity = Severity::from_number(line.severity());
        let text = line.to_string();
        let outcome = line.severity() > 1 || matches!(line, pki::TrailLine::Selected { .. });
        if outcome {
            log.write(severity, &text);
        } else {
            log.verbose(|| text.clone());
        }
        trail.push((severity, text));
    }
    let roots = RootSet::load(&config.endpoint_roots)?;
    let trust = EndpointTrust {
        crls: RevocationList::load_all(&config.endpoint_crls, &roots)?,
        roots,
        crl_policy: config.endpoint_crl_policy,
    };
    if !trust.crls.is_empty() {
        log.info(&format!(
            "Endpoint server certificates are checked against {} CRL(s); an endpoint whose issuer has no current CRL is {}",
            trust.crls.len(),
            match trust.crl_policy {
                CrlPolicy::Refuse => "refused",
                CrlPolicy::AllowAndWarn => "allowed",
            }
        ));
    }
    let client = EndpointClient::new(
        &store,
        selection.selected,
        &trust,
        Duration::from_secs(config.endpoint_timeout_secs),
    )?;
    Ok(Choice {
        label: client.selected_label(),
        client,
        trail,
    })
}

/// Starts a connector on the runtime it is called on.
pub async fn start(config: ConnectorConfig, log: Log) -> Result<RunningConnector, ConnectorError> {
    start_on(config, log, Shards::current()).await
}

/// Starts a connector whose channels are dialled round `shards`: each channel, the requests
/// on it and their endpoint connections are driven by one shard's thread.
pub async fn start_on(
    config: ConnectorConfig,
    log: Log,
    shards: Shards,
) -> Result<RunningConnector, ConnectorError> {
    log.set_verbose(config.verbose);
    let choice = choose_client_certificate(&config, &log)?;
    let service = Arc::new(Service {
        hello_changes: watch::channel(0).0,
        hello: Mutex::new(Hello {
            connector_id: config.connector_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            endpoints: endpoint_infos(&config),
            has_client_certificate: choice.label.is_some(),
            max_request_header_bytes: Some(config.max_request_header_bytes),
        }),
        endpoints: ArcSwap::from_pointee(endpoint_urls(&config)),
        client: ArcSwap::from_pointee(choice.client),
        trail: Mutex::new(choice.trail),
        log: log.clone(),
    });

    let identity = pki::tls::Identity::load(&config.channel_cert, &config.channel_key)?;
    let mut tls = pki::tls::client_config(&RootSet::load(&config.gateway_roots)?)?
        .with_client_auth_cert(identity.chain, identity.key)?;
    tls.alpn_protocols = vec![tunnel::ALPN.to_vec()];
    let tls = Arc::new(tls);

    log.info("Maintaining connections...");
    let (stop, stopped) = watch::channel(false);
    let dialer = Dialer {
        shards,
        tasks: Arc::new(Mutex::new(Tasks::default())),
        stopped: stopped.clone(),
    };
    for gateway in &config.gateways {
        let Some((host, port)) = split_host_port(gateway) else {
            continue;
        };
        let name = config
            .gateway_server_name
            .clone()
            .unwrap_or_else(|| host.clone());
        let (announced, announcements) = watch::channel(config.channels_per_gateway);
        // The template each channel's dial loop is numbered from.
        let first = Dial {
            host: host.clone(),
            port,
            server_name: name.clone(),
            tls: tls.clone(),
            service: service.clone(),
            announced: Arc::new(announced),
            log: log.clone(),
            number: 1,
            max_request_header_bytes: config.max_request_header_bytes,
        };
        for n in 1..=config.channels_per_gateway {
            dialer.start(first.numbered(n));
        }
        if config.channels_follow_gateway_threads {
            let widening = widen(
                dialer.clone(),
                first,
                config.channels_per_gateway,
                announcements,
            );
            lock(&dialer.tasks).handles.push(tokio::spawn(widening));
        }
    }
    Ok(RunningConnector {
        stop,
        dialer,
        service,
        started: config,
    })
}

/// The most channels a connector holds to one gateway, however many threads it announces.
const MAX_CHANNELS_PER_GATEWAY: usize = 64;

/// Starts dial loops round the shards and keeps their tasks, for `stop`.
#[derive(Clone)]
struct Dialer {
    shards: Shards,
    tasks: Arc<Mutex<Tasks>>,
    stopped: watch::Receiver<bool>,
}

#[derive(Default)]
struct Tasks {
    /// Dial loops started so far: the next goes to the shard after the last one's.
    dials: usize,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Dialer {
    fn start(&self, dial: Dial) {
        let mut tasks = lock(&self.tasks);
        let shard = tasks.dials;
        tasks.dials += 1;
        let handle = self.shards.spawn_on(shard, dial.run(self.stopped.clone()));
        tasks.handles.push(handle);
    }
}

/// Opens more channels to a gateway when its hello says it runs more worker threads than
/// there are channels to it, so that every gateway thread drives a channel of its own (a device
/// on a thread without one is served through another thread's, at the cost of a cross-thread
/// wake per message). Channels are never closed for a gateway announcing fewer.
async fn widen(
    dialer: Dialer,
    first: Dial,
    mut open: usize,
    mut announced: watch::Receiver<usize>,
) {
    let mut stopped = dialer.stopped.clone();
    loop {
        tokio::select! {
            changed = announced.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = stopped.changed() => return,
        }
        let threads = *announced.borrow_and_update();
        let wanted = threads.min(MAX_CHANNELS_PER_GATEWAY);
        if wanted <= open {
            continue;
        }
        first.log.info(&format!(
            "Gateway {}:{} runs {threads} worker threads: opening {} more channel(s) to it, {wanted} in all",
            first.host,
            first.port,
            wanted - open
        ));
        while open < wanted {
            open += 1;
            dialer.start(first.numbered(open));
        }
    }
}

#[derive(Clone)]
struct Dial {
    host: String,
    port: u16,
    server_name: String,
    tls: Arc<rustls::ClientConfig>,
    service: Arc<Service>,
    /// The most worker threads this gateway has said it runs (at first the configured channel
    /// count): the hello sets it, [`widen`] reads it.
    announced: Arc<watch::Sender<usize>>,
    log: Log,
    number: usize,
    max_request_header_bytes: u32,
}

/// How far apart a connector's channels to one gateway are drained and dialled again after its
/// hello changed, so that the gateway always holds the others meanwhile.
const REOPEN_STAGGER: Duration = Duration::from_secs(1);

/// Resolves once the connector is stopping (or gone).
async fn stop_requested(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// How long a channel's answers say it is draining before its GOAWAY.
const DRAIN_NOTICE: Duration = Duration::from_millis(300);

/// Backoff bounds for redialling a gateway.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A channel that lived this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

impl Dial {
    fn numbered(&self, number: usize) -> Dial {
        Dial {
            number,
            ..self.clone()
        }
    }

    async fn run(self, mut stopped: watch::Receiver<bool>) {
        let random = ring::rand::SystemRandom::new();
        let mut backoff = BACKOFF_FIRST;
        loop {
            let started = Instant::now();
            // A stop drains the channel (see `once`), and the loop ends.
            let outcome = self.once(stopped.clone()).await;
            if *stopped.borrow() {
                return;
            }
            let gateway = format!("{}:{}", self.host, self.port);
            match outcome {
                Ok(Served::Drained) => {
                    // Drained to say a new hello: dialled again at once.
                    self.log.info(&format!(
                        "Channel {} to gateway {gateway} drained to give it the new hello; dialling again",
                        self.number
                    ));
                    backoff = BACKOFF_FIRST;
                    continue;
                }
                Ok(Served::Closed) => self.log.warn(&format!(
                    "Channel {} to gateway {gateway} closed; reconnecting",
                    self.number
                )),
                Err(why) => self.log.error(&format!(
                    "Channel {} to gateway {gateway}: {why}; retrying",
                    self.number
                )),
            }
            if started.elapsed() >= HEALTHY_AFTER {
                backoff = BACKOFF_FIRST;
            }
            // Full jitter in [backoff/2, backoff], so many connectors do not redial in step.
            let mut byte = [0u8; 1];
            let _ = random.fill(&mut byte);
            let wait = backoff / 2 + backoff.mul_f64(f64::from(byte[0]) / 510.0);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                () = stop_requested(&mut stopped) => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Dials the gateway and serves the channel until it ends, or until it has been drained:
    /// when the hello changed (its turn come) or when the connector stops.
    async fn once(&self, mut stopped: watch::Receiver<bool>) -> Result<Served, String> {
        // Changes of the hello from now on: made before dialling, so none is missed.
        let mut hello_changes = self.service.hello_changes.subscribe();
        let tls = tokio::select! {
            tls = self.connect() => tls?,
            () = stop_requested(&mut stopped) => return Ok(Served::Drained),
        };
        // Set when this channel's turn to drain has come: its answers then say so.
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The small DATA frames this channel's answers have spent of the gateway's budget.
        let frames = Arc::new(tunnel::SmallFrames::default());
        let service = Arc::new((
            self.service.clone(),
            self.announced.clone(),
            draining.clone(),
            frames,
        ));
        let hyper_service = hyper::service::service_fn(move |req| {
            let service = service.clone();
            let fut = async move {
                let (service, announced, draining, frames) = &*service;
                let mut response = service.handle(req, announced, frames).await;
                if draining.load(std::sync::atomic::Ordering::Relaxed) {
                    response.headers_mut().insert(
                        headers::DRAINING,
                        hyper::header::HeaderValue::from_static("1"),
                    );
                }
                Ok::<_, std::convert::Infallible>(response)
            };
            // Boxed: hyper spawns each request's future as a task and it is moved whole
            // several times on the way (2.9 KiB each time); boxed, only a pointer moves.
            Box::pin(fut)
        });
        let turn = REOPEN_STAGGER * u32::try_from(self.number.saturating_sub(1)).unwrap_or(0);
        let drain = async move {
            let hello_changed = async {
                if hello_changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(turn).await;
            };
            tokio::select! {
                () = hello_changed => {}
                () = stop_requested(&mut stopped) => {}
            }
            draining.store(true, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(DRAIN_NOTICE).await;
        };
        tunnel::serve(tls, hyper_service, drain, self.max_request_header_bytes)
            .await
            .map_err(|e| format!("channel ended: {e}"))
    }

    async fn connect(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| "TCP connect timed out".to_string())?
        .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.server_name.clone())
            .map_err(|e| format!("bad server name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS failed: {e}"))?;
        if tls.get_ref().1.alpn_protocol() != Some(tunnel::ALPN) {
            return Err("the gateway does not speak the channel protocol (ALPN)".into());
        }
        Ok(tls)
    }
}

impl Service {
    /// Serves one request from a gateway; `announced` is where that gateway's hello leaves
    /// how many worker threads it runs.
    async fn handle(
        &self,
        request: Request<Incoming>,
        announced: &watch::Sender<usize>,
        frames: &Arc<tunnel::SmallFrames>,
    ) -> Response<Body> {
        // Only the gateway's own hello is answered so: a device's request forwarded to the
        // same path carries a message id and an endpoint, and goes to that endpoint.
        if request.uri().path() == tunnel::HELLO_PATH
            && !request.headers().contains_key(&headers::MESSAGE_ID)
            && !request.headers().contains_key(&headers::ENDPOINT)
        {
            let threads = header_text_of(request.headers(), &headers::GATEWAY_THREADS)
                .and_then(|t| t.parse::<usize>().ok());
            if let Some(threads) = threads {
                announced.send_if_modified(|most| {
                    let more = threads > *most;
                    if more {
                        *most = threads;
                    }
                    more
                });
            }
            let body = serde_json::to_vec(&*lock(&self.hello)).unwrap_or_default();
            return Response::builder()
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(tunnel::full(body))
                .unwrap_or_else(|_| Response::new(tunnel::empty()));
        }
        // The request goes on as it came, edited in place: the endpoint's URL, and without
        // the channel's metadata or hop-by-hop headers. The message id is taken out of the
        // headers, not copied.
        let (mut parts, body) = request.into_parts();
        let message_id_value = parts.headers.remove(&headers::MESSAGE_ID);
        let message_id = message_id_value
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let endpoint =
            header_text_of(&parts.headers, &headers::ENDPOINT).and_then(|e| e.parse::<u64>().ok());
        let endpoints = self.endpoints.load();
        let Some(base) = endpoint.and_then(|e| endpoints.get(&e)) else {
            let refusal = Refusal::new(channel::refusal::Cause::UnknownEndpoint {
                endpoint: endpoint.unwrap_or(0),
            });
            self.log.error(&format!("Message {message_id}: {refusal}"));
            return refusal_response(&refusal);
        };
        let joined = endpoint_url(base, parts.uri.path(), parts.uri.query());
        drop(endpoints);
        let url = match joined {
            Ok(url) => url,
            Err(e) => {
                let refusal = Refusal::new(channel::refusal::Cause::BadRoute {
                    detail: e.to_string(),
                });
                return refusal_response(&refusal);
            }
        };
        let url_text = url.text;
        self.log
            .info_parts(&forwarding_parts(message_id, &url_text));
        // The client of this moment: a reload swaps in a new one for later requests.
        let client = self.client.load_full();
        self.log.verbose(|| {
            format!(
                "Message {message_id}: device {}; presenting {}",
                header_text_of(&parts.headers, &headers::DEVICE).unwrap_or("-"),
                client
                    .selected_label()
                    .map(|c| format!("client certificate {c}"))
                    .unwrap_or_else(|| "no client certificate".into()),
            )
        });
        parts.uri = url.uri;
        // It came over the channel as HTTP/2; to the endpoint it goes as HTTP/1.1.
        parts.version = hyper::Version::HTTP_11;
        headers::strip(&mut parts.headers);
        let forward = Request::from_parts(parts, tunnel::boxed(body));
        let started = Instant::now();
        let outcome = client.forward(forward, &url_text).await;
        self.log.verbose(|| {
            format!(
                "Message {message_id}: endpoint call took {} ms",
                started.elapsed().as_millis()
            )
        });
        match outcome {
            Ok(answer) => {
                let status = answer.status();
                self.log.info_parts(&received_parts(
                    message_id,
                    &url_text,
                    status.as_str(),
                    status.canonical_reason().unwrap_or(""),
                ));
                let (mut parts, body) = answer.into_parts();
                // The gateway reads x-portcullis-* on answers (a status text, the draining
                // notice): only the connector's own may carry them, never an endpoint's.
                strip_metadata(&mut parts.headers);
                // Gathered, so that an endpoint's small pieces do not spend the gateway's
                // budget for small frames and close the channel.
                Response::from_parts(
                    parts,
                    tunnel::boxed(tunnel::Coalesced::new(body, frames.clone())),
                )
            }
            Err(refusal) => {
                self.log.error(&received_line(
                    message_id,
                    &url_text,
                    refusal.status,
                    refusal.text,
                ));
                self.log.error(&format!(
                    "Message {message_id}: {}. {}",
                    refusal.reason(),
                    refusal.remedy()
                ));
                refusal_response(&refusal)
            }
        }
    }
}

/// Drops every `x-portcullis-*` header, in place; allocates only when there is one.
fn strip_metadata(map: &mut hyper::HeaderMap) {
    let unwanted: Vec<hyper::header::HeaderName> = map
        .keys()
        .filter(|name| name.as_str().starts_with(headers::PREFIX))
        .cloned()
        .collect();
    for name in unwanted {
        map.remove(&name);
    }
}

fn header_text_of<'a>(
    headers: &'a hyper::HeaderMap,
    name: &hyper::header::HeaderName,
) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}
