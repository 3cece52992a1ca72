//! The gateway: the internet-facing server. One TLS port serves devices (HTTP/1.1 and HTTP/2)
//! and connector channels (ALPN `portcullis-tunnel/1`). Devices are authenticated per route;
//! their requests go to a connector over a held channel; every refusal names its hop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use channel::config::{self, ConfigError};
use channel::refusal::{Cause, Refusal};
use channel::route::{self, Auth, Route};
use channel::shards::{Held, ShardCounts, Shards};
use channel::tunnel::{self, headers, refusal_response, Body, Registry};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use logs::cmtrace::Severity;
use pki::tls::{judge_peer, PeerCert};
use pki::RootSet;
use ring::rand::SecureRandom;
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::io::AsyncBufReadExt;
use tokio_rustls::server::StartHandshake;
use tokio_rustls::LazyConfigAcceptor;

pub mod device_auth;
mod idle;
pub mod token;

use arc_swap::ArcSwap;
use device_auth::{DeviceAuth, Judgement};
use pki::crl::CrlPolicy;

/// `portcullis gateway --config FILE`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address for devices and connector channels (default "0.0.0.0:443").
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The gateway's server certificate (PEM, leaf first) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Roots device certificates must chain to on CCM_PROXY_MUTUALAUTH routes.
    pub trusted_roots: Vec<PathBuf>,
    /// Roots connector channel certificates must chain to (default: `trusted_roots`).
    #[serde(default)]
    pub connector_roots: Vec<PathBuf>,
    /// Connectors allowed to open channels: certificate subject CNs or SHA-1 thumbprints.
    pub allowed_connectors: Vec<String>,
    /// Seconds to wait for a connector's answer to start.
    #[serde(default = "default_timeout")]
    pub request_timeout_secs: u64,
    /// Verbose logging: a line per device request and per channel event. Changes on reload
    /// (SIGHUP) or an admin call, without a restart.
    #[serde(default)]
    pub verbose: bool,
    /// Where the log goes: `[log]` file, max_size_kib, console.
    #[serde(default)]
    pub log: logs::logger::LogSettings,
    /// The local admin surface (`GET /status`, `PUT /verbose`, `POST /reload`), loopback only.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// Worker threads (default: one per CPU). Each runs its own single-threaded runtime (a
    /// shard) and keeps the connections it was given; see `channel::shards`. On a host shared
    /// with other busy processes fewer are cheaper per request.
    #[serde(default)]
    pub worker_threads: Option<usize>,
    /// Check device certificates against the CRLs in `crls` (reloaded on SIGHUP).
    #[serde(default)]
    pub verify_client_revocation: bool,
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// When a device certificate's revocation status is unknown: "refuse" or "allow-and-warn".
    #[serde(default)]
    pub crl_policy: CrlPolicy,
    /// Site token keys and checks for CCM_PROXY_SERVERAUTH routes.
    #[serde(default)]
    pub tokens: Option<token::TokenSettings>,
    /// TLS versions and cipher suites offered to devices and connectors.
    #[serde(default)]
    pub tls: pki::tls::TlsPolicy,
    /// Requests one device connection may have in flight through channels at once; more
    /// are refused with 429 `CMGService_Toomanyrequests`. An HTTP/2 device is offered twice
    /// as many streams (SETTINGS_MAX_CONCURRENT_STREAMS), so that it hears why.
    #[serde(default = "default_max_streams_per_device")]
    pub max_streams_per_device: usize,
    /// Requests that may wait, across all channels, for a free stream slot (each channel
    /// carries at most what its connector allows at once); more are refused with 503
    /// `CMGService_Channelbusy`. 0: none waits.
    #[serde(default = "default_max_queued_requests")]
    pub max_queued_requests: usize,
    /// Seconds a device may go without sending any of its request body, or without taking
    /// any of what the gateway writes to it, before its stream is reset (or its connection
    /// cut): 408 `CMGService_Devicestalled`.
    #[serde(default = "default_idle_timeout")]
    pub device_idle_timeout_secs: u64,
    /// Seconds a connector may go without sending any of an answer's body once its head has
    /// come: then the device's stream (HTTP/2) or connection (HTTP/1.1) is cut, and
    /// `CMGService_Connectorstalled` (504) logged.
    #[serde(default = "default_idle_timeout")]
    pub connector_idle_timeout_secs: u64,
}

fn default_max_streams_per_device() -> usize {
    64
}

fn default_max_queued_requests() -> usize {
    tunnel::DEFAULT_MAX_QUEUED_REQUESTS
}

fn default_idle_timeout() -> u64 {
    30
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}

fn default_timeout() -> u64 {
    120
}

impl GatewayConfig {
    pub fn load(path: &Path) -> Result<GatewayConfig, ConfigError> {
        let mut cfg: GatewayConfig = config::load_toml(path)?;
        cfg.cert = config::resolve(path, &cfg.cert);
        cfg.key = config::resolve(path, &cfg.key);
        cfg.trusted_roots = cfg
            .trusted_roots
            .iter()
            .map(|p| config::resolve(path, p))
            .collect();
        cfg.connector_roots = cfg
            .connector_roots
            .iter()
            .map(|p| config::resolve(path, p))
            .collect();
        cfg.log.file = cfg.log.file.as_deref().map(|p| config::resolve(path, p));
        cfg.crls = cfg.crls.iter().map(|p| config::resolve(path, p)).collect();
        if let Some(tokens) = &mut cfg.tokens {
            tokens.keys = tokens
                .keys
                .iter()
                .map(|p| config::resolve(path, p))
                .collect();
            tokens.revoked = tokens.revoked.as_deref().map(|p| config::resolve(path, p));
        }
        let invalid = |key, reason: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            reason: reason.to_string(),
        };
        if let Some((key, reason)) = cfg.log.problem() {
            return Err(invalid(key, &reason));
        }
        if let Some(addr) = cfg
            .admin_listen
            .filter(|a| !channel::admin::is_allowed_address(a))
        {
            return Err(invalid(
                "admin_listen",
                &format!("{addr} is not a loopback address; the admin surface has no authentication of its own, so it listens on 127.0.0.1 or ::1 only"),
            ));
        }
        if cfg.verify_client_revocation && cfg.crls.is_empty() {
            return Err(invalid(
                "crls",
                "verify_client_revocation is on: list the CRL file(s) of the device certificates' issuers",
            ));
        }
        if cfg.tokens.as_ref().is_some_and(|t| t.keys.is_empty()) {
            return Err(invalid(
                "tokens.keys",
                "list at least one site public key (PEM) to check tokens with",
            ));
        }
        if let Err(reason) = cfg.tls.check() {
            return Err(invalid("tls", &reason));
        }
        if cfg.trusted_roots.is_empty() {
            return Err(invalid(
                "trusted_roots",
                "at least one root CA file is needed for device certificates",
            ));
        }
        if cfg.allowed_connectors.iter().all(|c| c.trim().is_empty()) {
            return Err(invalid(
                "allowed_connectors",
                "name at least one connector (its certificate's CN or thumbprint); without one no channel can open",
            ));
        }
        if let Some(reason) = channel::config::worker_threads_problem(cfg.worker_threads) {
            return Err(invalid("worker_threads", &reason));
        }
        if cfg.request_timeout_secs == 0 || cfg.request_timeout_secs > 3600 {
            return Err(invalid(
                "request_timeout_secs",
                "must be between 1 and 3600",
            ));
        }
        if cfg.max_streams_per_device == 0 || cfg.max_streams_per_device > 10_000 {
            return Err(invalid(
                "max_streams_per_device",
                "must be between 1 and 10000",
            ));
        }
        if cfg.max_queued_requests > 1_000_000 {
            return Err(invalid(
                "max_queued_requests",
                "must be at most 1000000 (0: no request waits for a channel slot)",
            ));
        }
        for (key, secs) in [
            ("device_idle_timeout_secs", cfg.device_idle_timeout_secs),
            (
                "connector_idle_timeout_secs",
                cfg.connector_idle_timeout_secs,
            ),
        ] {
            if secs == 0 || secs > 3600 {
                return Err(invalid(key, "must be between 1 and 3600"));
            }
        }
        Ok(cfg)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Auth(#[from] device_auth::AuthError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub use logs::Log;

pub struct RunningGateway {
    pub addr: SocketAddr,
    pub registry: Arc<Registry>,
    listening: channel::listener::Listening,
    shared: Arc<Shared>,
}

impl RunningGateway {
    /// Stops accepting; connections already open go on until the process ends.
    pub async fn stop(self) {
        self.listening.stop().await;
    }

    /// Stops accepting, then drains the device connections: each answers the request under
    /// way, if any, and closes (an idle one at once). Waits for them at most `limit`; the
    /// channels serve until then. Says in the log how it went.
    pub async fn stop_gracefully(self, limit: Duration) {
        let counts = self.listening.open_counts();
        let open = || counts.all().iter().sum::<usize>();
        self.listening.stop().await;
        // Counted before they are told: idle ones close at once, on their own threads.
        let before = open();
        self.shared
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.stop.notify_waiters();
        let deadline = tokio::time::Instant::now() + limit;
        while open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match open() {
            0 => self.shared.log.info(&format!(
                "Stopping: {before} device connection(s) drained, no request under way was cut"
            )),
            left => self.shared.log.warn(&format!(
                "Stopping: {left} device connection(s) still busy after {} s are closed",
                limit.as_secs()
            )),
        }
    }

    pub fn log(&self) -> &Log {
        &self.shared.log
    }

    /// Device connections open now on each shard. A channel counts only until it is
    /// registered: its connection is then driven by a task of its own, on the shard it was
    /// placed on (`Registry::channels_on`).
    pub fn connections_per_shard(&self) -> Vec<usize> {
        self.listening.open_per_shard()
    }

    /// Each shard's device connections and channels now, for the admin surface's status.
    pub fn shards_status(&self) -> serde_json::Value {
        let devices = self.connections_per_shard();
        let shards: Vec<serde_json::Value> = devices
            .iter()
            .enumerate()
            .map(|(shard, devices)| {
                serde_json::json!({
                    "devices": devices,
                    "channels": self.registry.channels_on(shard),
                })
            })
            .collect();
        serde_json::Value::Array(shards)
    }

    /// Applies what can change while running from a freshly loaded configuration: `verbose`,
    /// and how devices are judged (trusted roots, CRLs and their policy, token keys and
    /// revoked token ids). Open connections are judged again on their next request. Says what
    /// applies now; on an error nothing changes.
    pub fn reload(&self, config: &GatewayConfig) -> Result<String, GatewayError> {
        let generation = self.shared.auth.load().generation + 1;
        let auth = load_device_auth(config, generation, &self.shared.log)?;
        // Everything that can fail is done before anything is swapped in.
        let connectors = Connectors::load(config, &auth)?;
        let (tls, certificate) = server_tls(
            config,
            &auth,
            &connectors.roots,
            Some(&self.shared.tls.load()),
        )?;
        let described = auth.describe();
        self.shared.auth.store(Arc::new(auth));
        self.shared.tls.store(Arc::new(tls));
        // Channels of connectors no longer allowed (or trusted) are closed now.
        let now = OffsetDateTime::now_utc();
        let mut closed = Vec::new();
        for channel in self.registry.all() {
            if let Err(why) = connectors.judge(Some(&channel.peer_cert), now) {
                channel.close();
                self.shared.log.warn(&format!(
                    "Closed channel {} of connector {}: {why}",
                    channel.id, channel.hello.connector_id
                ));
                closed.push(channel.id);
            }
        }
        self.shared.connectors.store(Arc::new(connectors));
        let was = self.shared.log.set_verbose(config.verbose);
        Ok(format!(
            "verbose {}{}; devices: {described}; server certificate for new connections: {certificate}; connectors: {} (listen takes effect at the next start)",
            if config.verbose { "on" } else { "off" },
            if was == config.verbose { "" } else { " (changed)" },
            if closed.is_empty() {
                "every open channel still allowed".to_string()
            } else {
                format!("{} channel(s) closed, no longer allowed", closed.len())
            },
        ))
    }
}

struct Shared {
    /// The TLS configuration new connections get (server certificate, CA hints, `[tls]`).
    tls: ArcSwap<rustls::ServerConfig>,
    auth: ArcSwap<DeviceAuth>,
    connectors: ArcSwap<Connectors>,
    registry: Arc<Registry>,
    timeout: Duration,
    /// `max_streams_per_device`, `device_idle_timeout_secs`, `connector_idle_timeout_secs`.
    max_streams_per_device: usize,
    device_idle: Duration,
    connector_idle: Duration,
    log: Log,
    message_ids: MessageIds,
    shards: Shards,
    /// Channels on their way to each shard, not yet in the registry.
    placing: ShardCounts,
    /// Set when the gateway stops gracefully, and `stop` told: device connections drain.
    stopping: std::sync::atomic::AtomicBool,
    stop: Arc<tokio::sync::Notify>,
}

impl Shared {
    /// The shard a new channel goes to: the one driving fewest (this one on a tie), counted
    /// as on its way there until the returned guard is dropped (registered or failed).
    fn place_channel(&self) -> Held {
        let here = Shards::here();
        let shard = (0..self.shards.len())
            .min_by_key(|&i| {
                (
                    self.registry.channels_on(i) + self.placing.get(i),
                    i != here,
                )
            })
            .unwrap_or(here);
        self.placing.hold(shard)
    }
}

/// How long a device or connector has for its whole TLS handshake.
const HANDSHAKE_TIME: Duration = Duration::from_secs(30);

/// Starts a gateway on the runtime it is called on.
pub async fn start(config: GatewayConfig, log: Log) -> Result<RunningGateway, GatewayError> {
    start_on(config, log, Shards::current()).await
}

/// Starts a gateway whose connections are spread over `shards`: every shard accepts devices,
/// and each connector channel is moved to the shard driving fewest, so that each shard's
/// devices find a channel on their own thread.
pub async fn start_on(
    config: GatewayConfig,
    log: Log,
    shards: Shards,
) -> Result<RunningGateway, GatewayError> {
    log.set_verbose(config.verbose);
    let auth = load_device_auth(&config, 0, &log)?;
    log.info(&format!("Devices: {}", auth.describe()));
    let connectors = Connectors::load(&config, &auth)?;
    let (tls, _) = server_tls(&config, &auth, &connectors.roots, None)?;
    let registry = Arc::new(Registry::default());
    registry.set_max_queued(config.max_queued_requests);
    let shared = Arc::new(Shared {
        tls: ArcSwap::from_pointee(tls),
        auth: ArcSwap::from_pointee(auth),
        connectors: ArcSwap::from_pointee(connectors),
        registry: registry.clone(),
        timeout: Duration::from_secs(config.request_timeout_secs),
        max_streams_per_device: config.max_streams_per_device,
        device_idle: Duration::from_secs(config.device_idle_timeout_secs),
        connector_idle: Duration::from_secs(config.connector_idle_timeout_secs),
        log,
        message_ids: MessageIds::new(&ring::rand::SystemRandom::new()),
        placing: ShardCounts::new(shards.len()),
        shards: shards.clone(),
        stopping: std::sync::atomic::AtomicBool::new(false),
        stop: Arc::new(tokio::sync::Notify::new()),
    });
    let handler_shared = shared.clone();
    let listening = channel::listener::listen_on(config.listen, &shards, move |tcp, peer| {
        // The configuration of this moment: a reload swaps in a new server certificate.
        connection(
            handler_shared.tls.load_full(),
            tcp,
            peer,
            handler_shared.clone(),
        )
    })
    .await
    .map_err(|source| GatewayError::Listen {
        addr: config.listen,
        source,
    })?;
    shared.log.info(&format!(
        "Gateway listening on {} for devices and connector channels ({} worker thread{})",
        listening.addr,
        shards.len(),
        if shards.len() == 1 { "" } else { "s" }
    ));
    Ok(RunningGateway {
        addr: listening.addr,
        registry,
        listening,
        shared,
    })
}

/// Which connectors may open channels: the roots their certificates must chain to
/// (`connector_roots`, else the device roots) and the names (CN) or thumbprints allowed.
struct Connectors {
    roots: RootSet,
    allowed: Vec<String>,
}

impl Connectors {
    fn load(config: &GatewayConfig, auth: &DeviceAuth) -> Result<Connectors, GatewayError> {
        let roots = if config.connector_roots.is_empty() {
            auth.roots.clone()
        } else {
            RootSet::load(&config.connector_roots)?
        };
        Ok(Connectors {
            roots,
            allowed: config
                .allowed_connectors
                .iter()
                .map(|c| c.trim().to_string())
                .collect(),
        })
    }

    /// The connector's certificate, if it may hold a channel; else why not.
    fn judge(
        &self,
        leaf: Option<&[u8]>,
        now: OffsetDateTime,
    ) -> Result<Box<pki::cert::Certificate>, String> {
        let cert = match judge_peer(leaf, &self.roots, &[], now) {
            PeerCert::Trusted(cert) => cert,
            other => return Err(describe_peer(&other)),
        };
        let cn = pki::cert::common_name(&cert.subject).unwrap_or("");
        let allowed = self
            .allowed
            .iter()
            .any(|a| a.eq_ignore_ascii_case(cn) || a.eq_ignore_ascii_case(&cert.thumbprint));
        if allowed {
            Ok(cert)
        } else {
            Err(format!("{} is not in allowed_connectors", cert.label()))
        }
    }
}

/// The TLS configuration for new connections: the server certificate and key, the CA hints
/// (device and connector roots) and `[tls]`; and the certificate's label. Session tickets
/// issued under `previous` stay good, so devices resume across a reload.
fn server_tls(
    config: &GatewayConfig,
    auth: &DeviceAuth,
    connector_roots: &RootSet,
    previous: Option<&rustls::ServerConfig>,
) -> Result<(rustls::ServerConfig, String), GatewayError> {
    let identity = pki::tls::Identity::load(&config.cert, &config.key)?;
    let certificate = identity
        .chain
        .first()
        .and_then(|leaf| pki::cert::Certificate::from_der(leaf.as_ref()).ok())
        .map(|leaf| leaf.label())
        .unwrap_or_else(|| "(unreadable)".into());
    let mut hint_roots = auth.roots.clone();
    hint_roots
        .certs
        .extend(connector_roots.certs.iter().cloned());
    let mut tls = pki::tls::server_config_with_policy(
        identity,
        &hint_roots,
        true,
        &[tunnel::ALPN, b"h2", b"http/1.1"],
        &config.tls,
    )?;
    if let Some(previous) = previous {
        tls.ticketer = previous.ticketer.clone();
        tls.session_storage = previous.session_storage.clone();
    }
    Ok((tls, certificate))
}

/// Loads how devices are judged, logging every CRL that cannot be used (the CRL policy then
/// decides for the devices it would have covered).
fn load_device_auth(
    config: &GatewayConfig,
    generation: u64,
    log: &Log,
) -> Result<DeviceAuth, GatewayError> {
    let auth = DeviceAuth::load(
        generation,
        &config.trusted_roots,
        config
            .verify_client_revocation
            .then_some((config.crls.as_slice(), config.crl_policy)),
        config.tokens.as_ref(),
    )?;
    for problem in auth.revocation.iter().flat_map(|r| &r.unreadable) {
        log.error(&format!("CRL cannot be used: {problem}"));
    }
    Ok(auth)
}

async fn connection(
    tls: Arc<rustls::ServerConfig>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
) {
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIME;
    // The ClientHello is read and judged in a block of its own: a local moved away still keeps
    // its room in an async fn's future until its scope ends, and the handshake's state would
    // ride along, dead, for as long as the connection is served.
    let (start, placed) = {
        let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
        let start = match tokio::time::timeout_at(deadline, hello).await {
            Ok(Ok(start)) => start,
            // Failed handshakes are the client's business (and very common on the internet).
            _ => return,
        };
        let mut placed = None;
        if shared.shards.len() > 1 && offers_channel(&start.client_hello()) {
            let place = shared.place_channel();
            if place.shard() != Shards::here() {
                // The channel moves before its handshake: its socket leaves this shard's event
                // loop for the other's, with the ClientHello already read.
                let StartHandshake { accepted, io, .. } = start;
                let target = place.shard();
                let Ok(io) = shared.shards.adopt(target, io) else {
                    return;
                };
                let moved_shared = shared.clone();
                shared.shards.spawn_on(target, async move {
                    let start = Box::new(StartHandshake::from_parts(accepted, io));
                    handshake_and_serve(start, tls, deadline, peer, moved_shared, Some(place))
                        .await;
                });
                return;
            }
            placed = Some(place);
        }
        (Box::new(start), placed)
    };
    handshake_and_serve(start, tls, deadline, peer, shared, placed).await
}

/// The value, its box freed on return.
#[allow(clippy::boxed_local)] // taking the box is the point: it is freed here
fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

/// Whether a ClientHello offers the channel protocol (a connector dialling in).
fn offers_channel(hello: &rustls::server::ClientHello<'_>) -> bool {
    hello
        .alpn()
        .is_some_and(|mut offered| offered.any(|p| p == tunnel::ALPN))
}

/// Finishes the TLS handshake and serves the connection: a channel or a device. The handshake
/// comes boxed and the stream is boxed once made: an async fn keeps room for its arguments,
/// and for a local moved away until its scope ends, and every idle device connection would
/// carry a dead copy of them beside the live one.
async fn handshake_and_serve(
    start: Box<StartHandshake<tokio::net::TcpStream>>,
    config: Arc<rustls::ServerConfig>,
    deadline: tokio::time::Instant,
    peer: SocketAddr,
    shared: Arc<Shared>,
    placed: Option<Held>,
) {
    // Taken out of its box by a call of its own, so that the box is freed now: moved out of
    // in place, the box's memory would stay allocated until this fn returns, that is for as
    // long as the device stays (1.4 KiB each).
    let tls = match tokio::time::timeout_at(deadline, unbox(start).into_stream(config)).await {
        Ok(Ok(tls)) => Box::new(tls),
        _ => return,
    };
    let (_, session) = tls.get_ref();
    let is_channel = session.alpn_protocol() == Some(tunnel::ALPN);
    let leaf = session
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let now = OffsetDateTime::now_utc();
    if is_channel {
        let cert = match shared.connectors.load().judge(leaf.as_deref(), now) {
            Ok(cert) => cert,
            Err(why) => {
                shared
                    .log
                    .error(&format!("Refused a connector channel from {peer}: {why}"));
                return;
            }
        };
        let accepted = tunnel::accept(
            tls,
            cert.label(),
            leaf.unwrap_or_default(),
            shared.registry.clone(),
            shared.shards.len(),
        )
        .await;
        // Registered (or failed): the registry now counts it on its shard.
        drop(placed);
        match accepted {
            Ok(ch) => {
                let endpoints: Vec<String> = ch
                    .hello
                    .endpoints
                    .iter()
                    .map(|e| format!("{} ({})", e.id, e.name))
                    .collect();
                shared.log.info(&format!(
                    "Connector {} opened channel {} from {peer}, serving endpoints {}",
                    ch.hello.connector_id,
                    ch.id,
                    endpoints.join(", ")
                ));
            }
            Err(e) => shared
                .log
                .error(&format!("Channel from {peer} failed: {e}")),
        }
        return;
    }

    // Offered the channel protocol but chose a device one: nothing was placed.
    drop(placed);
    let judgement = shared.auth.load().judge(leaf.as_deref(), now);
    let device = Arc::new(Device {
        addr: peer,
        leaf,
        state: std::sync::Mutex::new(Arc::new(DeviceState::new(judgement, peer, &shared.log))),
        in_flight: std::sync::atomic::AtomicUsize::new(0),
        write_stalled: std::sync::atomic::AtomicBool::new(false),
    });
    let watched = device.clone();
    let drain_shared = shared.clone();
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let device = device.clone();
        // Boxed: hyper keeps room for one request's future (3.3 KiB) in every HTTP/1.1
        // connection for as long as it is open, so each idle keep-alive device paid for it.
        Box::pin(
            async move { Ok::<_, std::convert::Infallible>(handle(req, &shared, &device).await) },
        )
    });
    // hyper's connection state is made once the device has sent something: until then an
    // idle connection holds only its TLS stream. A stop meanwhile closes it at once.
    let mut tls = tls;
    let stop = drain_shared.stop.clone().notified_owned();
    if drain_shared
        .stopping
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return;
    }
    let sent = tokio::select! {
        first = tls.fill_buf() => matches!(first, Ok(bytes) if !bytes.is_empty()),
        () = stop => false,
    };
    if !sent {
        return;
    }
    // The protocol is the one ALPN chose: HTTP/2 only as "h2" (RFC 9113 3.2: over TLS it is
    // never spoken without it), else HTTP/1.1. Not hyper-util's auto server, which reads the
    // first bytes itself to tell them apart and hands them on through a rewinding wrapper,
    // after which hyper doubled its read buffer to 16 KiB on every connection.
    let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    // A device that takes nothing of what is written to it is cut (and logged below).
    let device_idle = drain_shared.device_idle;
    let tls = idle::StallGuard::new(tls, device_idle, watched.clone());
    if is_h2 {
        // Twice the device's share of streams in flight: the streams over it are answered
        // 429 with a status text, rather than refused by HTTP/2 without one.
        let streams = u32::try_from(drain_shared.max_streams_per_device.saturating_mul(2))
            .unwrap_or(u32::MAX);
        // Each stream's task is watched for a device that stops taking that stream's answer.
        let executor = idle::DeviceStreams {
            limit: device_idle,
            log: drain_shared.log.clone(),
            peer,
        };
        let served = hyper::server::conn::http2::Builder::new(executor)
            .timer(hyper_util::rt::TokioTimer::new())
            .max_concurrent_streams(streams)
            .serve_connection(TokioIo::new(tls), service);
        let _ = Drainable::new(served, drain_shared.clone(), |served| {
            served.graceful_shutdown()
        })
        .await;
    } else {
        // With a timer, hyper drops an HTTP/1.1 client that takes over 30 s to send its
        // request headers (slow-loris).
        let served = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(tls), service);
        let _ = Drainable::new(served, drain_shared.clone(), |served| {
            served.graceful_shutdown()
        })
        .await;
    }
    if watched
        .write_stalled
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        let refusal = Refusal::new(Cause::DeviceStalled {
            what: "stopped reading the answer".into(),
            seconds: device_idle.as_secs(),
        });
        drain_shared.log.warn(&format!(
            "Cut the connection of device {peer}: {refusal}; its requests' channel streams are reset"
        ));
    }
}

pin_project_lite::pin_project! {
    /// A device connection that drains when the gateway stops gracefully: the request under
    /// way is answered, then it closes (an idle one at once). Not a `select!` in the async fn
    /// that serves the connection: that made every idle connection's future 1.8 KiB larger;
    /// this adds 80 bytes.
    struct Drainable<F> {
        #[pin]
        served: F,
        #[pin]
        stop: tokio::sync::futures::OwnedNotified,
        shared: Arc<Shared>,
        draining: bool,
        drain: fn(std::pin::Pin<&mut F>),
    }
}

impl<F> Drainable<F> {
    /// `served`, told `drain` once the gateway stops (now, if it already has).
    fn new(served: F, shared: Arc<Shared>, drain: fn(std::pin::Pin<&mut F>)) -> Drainable<F> {
        Drainable {
            served,
            stop: shared.stop.clone().notified_owned(),
            shared,
            draining: false,
            drain,
        }
    }
}

impl<F: std::future::Future> std::future::Future for Drainable<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let mut this = self.project();
        if !*this.draining {
            // The flag covers a stop told before this connection first waited for it.
            let told = this.stop.as_mut().poll(cx).is_ready();
            if told
                || this
                    .shared
                    .stopping
                    .load(std::sync::atomic::Ordering::SeqCst)
            {
                *this.draining = true;
                (this.drain)(this.served.as_mut());
            }
        }
        this.served.poll(cx)
    }
}

fn describe_peer(judged: &PeerCert) -> String {
    match judged {
        PeerCert::None => "it presented no certificate".into(),
        PeerCert::Trusted(cert) => format!("{} is trusted", cert.label()),
        PeerCert::Untrusted { detail } => format!("its certificate is not trusted: {detail}"),
        PeerCert::NotTimeValid { detail } => format!("its certificate is not valid now: {detail}"),
        PeerCert::Revoked { detail } => format!("its certificate is revoked: {detail}"),
    }
}

struct Device {
    addr: SocketAddr,
    /// The certificate it presented (DER), kept to judge it again after a reload.
    leaf: Option<Vec<u8>>,
    state: std::sync::Mutex<Arc<DeviceState>>,
    /// Its requests in flight through channels now (`max_streams_per_device`).
    in_flight: std::sync::atomic::AtomicUsize,
    /// Set when the connection was cut because the device took nothing written to it.
    write_stalled: std::sync::atomic::AtomicBool,
}

/// A device connection's judged certificate, as of one [`DeviceAuth`] generation.
struct DeviceState {
    judgement: Judgement,
    /// Who the device is, for the connector: the trusted certificate's subject and thumbprint
    /// and the device's address, as one header value made once per judgement (one HPACK
    /// table entry per connection rather than three lookups per request).
    device_header: HeaderValue,
}

impl DeviceState {
    fn new(judgement: Judgement, addr: SocketAddr, log: &Log) -> DeviceState {
        if let Some(warning) = &judgement.warning {
            log.warn(&format!("Device {addr}: {warning}"));
        }
        let device_header = match &judgement.cert {
            Ok(cert) => header_value(&format!(
                "{} ({}) from {addr}",
                cert.subject, cert.thumbprint
            )),
            Err(_) => HeaderValue::from_static(""),
        };
        DeviceState {
            judgement,
            device_header,
        }
    }
}

impl Device {
    /// The judgement under the gateway's current settings: judged again when a reload has
    /// changed them since.
    fn state(&self, shared: &Shared) -> Arc<DeviceState> {
        let auth = shared.auth.load();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.judgement.generation != auth.generation {
            let judgement = auth.judge(self.leaf.as_deref(), OffsetDateTime::now_utc());
            *state = Arc::new(DeviceState::new(judgement, self.addr, &shared.log));
        }
        state.clone()
    }
}

/// The device identity a request carries to the connector.
enum Identity<'a> {
    Certificate {
        thumbprint: &'a str,
        /// What the connector is told: [`DeviceState::device_header`].
        header: &'a HeaderValue,
    },
    Token {
        subject: String,
        id: String,
    },
}

impl std::fmt::Display for Identity<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Certificate { thumbprint, .. } => write!(f, "certificate {thumbprint}"),
            Identity::Token { subject, id } => write!(f, "token {id} for {subject}"),
        }
    }
}

async fn handle(
    request: Request<Incoming>,
    shared: &Shared,
    device: &Arc<Device>,
) -> Response<Body> {
    match route_request(request, shared, device).await {
        Ok(response) => response,
        Err(refusal) => {
            shared.log.write(
                if refusal.status >= 500 {
                    Severity::Error
                } else {
                    Severity::Warning
                },
                &format!("Refused a request from device {}: {refusal}", device.addr),
            );
            refusal_response(&refusal)
        }
    }
}

async fn route_request(
    request: Request<Incoming>,
    shared: &Shared,
    device: &Arc<Device>,
) -> Result<Response<Body>, Refusal> {
    // Copied, to outlive the request's taking apart below. (A clone of the PathAndQuery, which
    // shares its bytes, measured no better: callgrind 59.8k-60.9k against 58.6k-59.6k.)
    let target = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let route = route::parse(&target).map_err(|e| {
        Refusal::new(Cause::BadRoute {
            detail: e.to_string(),
        })
    })?;
    let (auth, endpoint, path, forward_target) = match route {
        Route::ServiceMetadata { .. } => return Ok(service_metadata(shared)),
        Route::Proxy {
            auth,
            endpoint,
            path,
            target,
            ..
        } => (auth, endpoint, path, target),
    };
    // Who the device is, as the connector will be told: a certificate, or a token's subject.
    let state;
    let identity = match auth {
        Auth::MutualTls => {
            state = device.state(shared);
            match &state.judgement.cert {
                Ok(cert) => Identity::Certificate {
                    thumbprint: &cert.thumbprint,
                    header: &state.device_header,
                },
                Err(cause) => return Err(Refusal::new(cause.clone())),
            }
        }
        Auth::Token => {
            let auth = shared.auth.load();
            let Some(tokens) = &auth.tokens else {
                return Err(Refusal::new(Cause::InvalidToken {
                    check: "token authentication is not configured on this gateway ([tokens] keys)"
                        .into(),
                }));
            };
            let authorization = request
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .map(|v| v.to_str().unwrap_or("(not text)"));
            let claims = tokens
                .check(authorization, endpoint, path, OffsetDateTime::now_utc())
                .map_err(|check| Refusal::new(Cause::InvalidToken { check }))?;
            Identity::Token {
                subject: claims.sub.unwrap_or_default(),
                id: claims.jti.unwrap_or_default(),
            }
        }
    };
    // The device connection's share of channel streams; counted until the answer's body is
    // dropped.
    let in_flight = idle::InFlight::enter(device, shared.max_streams_per_device)?;
    let channel = shared.registry.pick(endpoint)?;
    let started = std::time::Instant::now();

    let message_id = shared.message_ids.next();
    // The path and query as the device sent them after the endpoint id, as they are: no
    // formatting (it cost 700 instructions a request), only for a bare `?query` or nothing.
    let uri = if forward_target.starts_with('/') {
        hyper::Uri::try_from(forward_target)
    } else {
        hyper::Uri::try_from(format!("/{forward_target}"))
    };
    let (mut parts, body) = request.into_parts();
    parts.uri = uri.map_err(|e: hyper::http::uri::InvalidUri| {
        Refusal::new(Cause::BadRoute {
            detail: e.to_string(),
        })
    })?;
    // The device's own headers go on as they are, minus hop-by-hop ones and any claim to be
    // Portcullis metadata; the map is edited in place rather than rebuilt.
    headers::strip(&mut parts.headers);
    // What the device's own connection carried (HTTP/2 stream state, upgrades) stays here.
    parts.version = hyper::Version::HTTP_11;
    parts.extensions = hyper::http::Extensions::new();
    let map = &mut parts.headers;
    // The message id, unique to the request, is sent never-indexed so it does not churn the
    // channel's HPACK table; the device line, the same for a connection's every request, is
    // indexed and goes as a table index (the connector decodes every header of every
    // request). Hex digits only: a valid header value as it is, with no sanitising copy.
    let mut id_header =
        HeaderValue::from_str(&message_id).unwrap_or_else(|_| never_indexed(&message_id));
    id_header.set_sensitive(true);
    map.insert(headers::MESSAGE_ID, id_header);
    map.insert(headers::ENDPOINT, HeaderValue::from(endpoint));
    let device_header = match &identity {
        Identity::Certificate { header, .. } => (*header).clone(),
        // A token's id differs from token to token: not worth a table entry.
        Identity::Token { subject, id } => {
            never_indexed(&format!("{subject} (token {id}) from {}", device.addr))
        }
    };
    map.insert(headers::DEVICE, device_header);
    // A body the device stops sending resets its stream after device_idle_timeout_secs. Only
    // a request with a body pays for the flag.
    let device_stalled = (!hyper::body::Body::is_end_stream(&body))
        .then(|| Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let body = match &device_stalled {
        Some(stalled) => tunnel::boxed(idle::DeviceBody::new(
            body,
            shared.device_idle,
            stalled.clone(),
        )),
        None => tunnel::boxed(body),
    };
    let forward = Request::from_parts(parts, body);

    shared.log.verbose(|| {
        format!(
            "Message {message_id}: {} {} from device {} ({}) to endpoint {endpoint} over channel {} of connector {}",
            forward.method(),
            forward.uri(),
            device.addr,
            identity,
            channel.id,
            channel.hello.connector_id,
        )
    });
    let sent = shared.registry.send(&channel, endpoint, forward);
    let stalled_refusal = || {
        Refusal::new(Cause::DeviceStalled {
            what: "stopped sending its body".into(),
            seconds: shared.device_idle.as_secs(),
        })
    };
    let device_did_stall = || {
        device_stalled
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    };
    let response = tokio::time::timeout(shared.timeout, sent)
        .await
        .map_err(|_| {
            Refusal::new(Cause::ConnectorTimeout {
                endpoint,
                seconds: shared.timeout.as_secs(),
            })
        })?
        // The channel stream was reset because the device's body stalled: say that, not
        // that the channel broke.
        .map_err(|refusal| {
            if device_did_stall() {
                stalled_refusal()
            } else {
                refusal
            }
        })?;
    shared.log.verbose(|| {
        format!(
            "Message {message_id}: the connector answered {} after {} ms",
            response.status().as_u16(),
            started.elapsed().as_millis()
        )
    });
    let (mut parts, body) = response.into_parts();
    // The connector's status text becomes the reason phrase devices read over HTTP/1.1.
    if let Some(text) = parts.headers.get(headers::STATUS_TEXT).cloned() {
        if let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(text.as_bytes().to_vec()) {
            parts.extensions.insert(phrase);
        }
    }
    let body = idle::AnswerBody::new(
        body,
        shared.connector_idle,
        shared.log.clone(),
        message_id,
        in_flight,
        device_stalled,
        shared.device_idle,
    );
    Ok(Response::from_parts(parts, tunnel::boxed(body)))
}

fn service_metadata(shared: &Shared) -> Response<Body> {
    let endpoints: Vec<serde_json::Value> = shared
        .registry
        .endpoints()
        .into_iter()
        .map(|(id, name, channels)| serde_json::json!({"id": id, "name": name, "channels": channels, "healthy": channels > 0}))
        .collect();
    let connectors: Vec<serde_json::Value> = shared
        .registry
        .connectors()
        .into_iter()
        .map(|(id, channels, has_cert)| serde_json::json!({"connector_id": id, "channels": channels, "has_client_certificate": has_cert}))
        .collect();
    let body = serde_json::json!({
        "service": "Portcullis gateway",
        "version": env!("CARGO_PKG_VERSION"),
        "channels": shared.registry.channel_count(),
        "endpoints": endpoints,
        "connectors": connectors,
    });
    Response::builder()
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(tunnel::full(body.to_string()))
        .unwrap_or_else(|_| Response::new(tunnel::empty()))
}

/// Message ids: 8 random bytes chosen at start (so two gateway instances or two runs do not
/// repeat each other) and a counter, as 32 hex digits. The id only has to follow one request
/// through the logs; a counter costs no system call per request, where fresh randomness did.
struct MessageIds {
    /// A random 64-bit number in hex, made once: ids from two gateway runs do not collide.
    prefix: String,
    next: std::sync::atomic::AtomicU64,
}

impl MessageIds {
    fn new(random: &ring::rand::SystemRandom) -> MessageIds {
        let mut bytes = [0u8; 8];
        if random.fill(&mut bytes).is_err() {
            let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
            bytes.copy_from_slice(&(nanos as u64).to_be_bytes());
        }
        MessageIds {
            prefix: format!("{:016x}", u64::from_be_bytes(bytes)),
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// The prefix and a counter, 32 lower-case hex digits, made without the formatting
    /// machinery (a format! here was 1.5k instructions of every request).
    fn next(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut id = String::with_capacity(32);
        id.push_str(&self.prefix);
        for shift in (0..16).rev() {
            id.push(char::from(HEX[(n >> (shift * 4)) as usize & 0xf]));
        }
        id
    }
}

/// A header value for text that may hold anything (subjects): made visible ASCII.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::try_from(header_safe(text)).unwrap_or_else(|_| HeaderValue::from_static("?"))
}

/// A header value HPACK must never add to its table.
fn never_indexed(text: &str) -> HeaderValue {
    let mut value = header_value(text);
    value.set_sensitive(true);
    value
}

/// Header values must be visible ASCII; subjects may hold anything.
fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::MessageIds;

    /// The size of what `f` returns, found from its type alone: an async fn's future is never
    /// made.
    fn returned_size<F, A, B, C, D, R>(_: &F) -> usize
    where
        F: Fn(A, B, C, D) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// A device connection's future is held for as long as the device stays; the task holding
    /// it is most of an idle connection's memory. Dead copies (an argument or a local moved
    /// away keeps its room until its scope ends) once made it twice as large; this catches
    /// their return.
    #[test]
    fn a_device_connection_future_stays_small() {
        // 2,512 bytes in a debug build when written; 8,384 with the TLS stream unboxed.
        const LIMIT: usize = 4096;
        let size = returned_size(&super::connection);
        assert!(size <= LIMIT, "{size} bytes");
    }

    #[test]
    fn message_ids_are_the_prefix_and_a_counter_in_hex() {
        let ids = MessageIds::new(&ring::rand::SystemRandom::new());
        let first = ids.next();
        let second = ids.next();
        assert_eq!(first, format!("{}{:016x}", ids.prefix, 1));
        assert_eq!(second, format!("{}{:016x}", ids.prefix, 2));
        ids.next
            .store(0xfedc_ba98_7654_3210, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(&ids.next()[16..], "fedcba9876543210");
        assert!(first.len() == 32 && first.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
