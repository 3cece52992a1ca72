//! The gateway: the internet-facing server. One TLS port serves devices (HTTP/1.1 and HTTP/2)
//! and connector channels (ALPN `portcullis-tunnel/1`). Devices are authenticated per route;
//! their requests go to a connector over a held channel; every refusal names its hop.
//!
//! This file starts, stops and reloads a gateway. A connection is taken in by `accept`
//! (caps, placement, handshake, then a channel, kept in [`channels`], or a device); a device's
//! request goes through `forward` (authenticate, rewrite for the channel, send on one of
//! [`channels`]). Configuration is `config`, connector policy `connectors`, the server
//! certificate `tls`, a device's state `device`, ServiceMetadata `metadata`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pki::RootSet;
use runtime::shards::{ShardCounts, Shards};

mod accept;
pub mod channels;
mod checks;
mod config;
mod connectors;
mod control;
mod device;
pub mod device_auth;
mod forward;
#[doc(hidden)]
pub mod fuzzing;
mod idle;
mod limits;
mod message_id;
mod metadata;
mod metrics;
mod proxy_protocol;
mod refused;
mod tls;
pub mod token;

use arc_swap::ArcSwap;
use channels::Registry;
pub use checks::ProbeSettings;
use config::client_cert_header;
pub use config::{AllowedConnector, BoundConnector, GatewayConfig};
use connectors::{load_connector_roots, Connectors};
pub use control::GatewayControl;
use device_auth::DeviceAuth;
use message_id::MessageIds;
pub use proxy_protocol::{ProxyProtocol, ProxyVersion};
use tls::server_tls;

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
    listening: runtime::listener::Listening,
    shared: Arc<Shared>,
    /// `channel_listen`'s listener, and its own room for channels' handshakes.
    channel_listening: Option<(runtime::listener::Listening, Arc<limits::Limits>)>,
    /// What reloads, the status and the admin surface use.
    handle: control::Handle,
}

impl RunningGateway {
    /// Stops accepting; connections already open go on until the process ends.
    pub async fn stop(self) {
        self.listening.stop().await;
        if let Some((listening, _)) = self.channel_listening {
            listening.stop().await;
        }
    }

    /// Where `channel_listen` listens, when set.
    pub fn channel_addr(&self) -> Option<SocketAddr> {
        self.channel_listening.as_ref().map(|(l, _)| l.addr)
    }

    /// Stops accepting, then drains the device connections: each answers the request under
    /// way, if any, and closes (an idle one at once). Waits for them at most `limit`; the
    /// channels serve until then. Says in the log how it went.
    pub async fn stop_gracefully(self, limit: Duration) {
        let counts = self.listening.open_counts();
        let open = || counts.all().iter().sum::<usize>();
        self.listening.stop().await;
        if let Some((listening, _)) = self.channel_listening {
            listening.stop().await;
        }
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
        self.handle.shards_status()
    }

    /// Device connections against their caps, and the refusals and closes since start
    /// (handshake, first-request and idle deadlines), for the admin surface's status.
    pub fn connections_status(&self) -> serde_json::Value {
        self.handle.connections_status()
    }

    /// Applies what can change while running from a freshly loaded configuration: `verbose`,
    /// and how devices are judged (trusted roots, CRLs and their policy, token keys and
    /// revoked token ids), the connectors allowed, the server certificate, `ready_endpoints`,
    /// `[probe]` (its schedule started, changed or stopped).
    /// Open connections are judged again on their next request. Says what applies now; on an
    /// error nothing changes.
    pub fn reload(&self, config: &GatewayConfig) -> Result<String, GatewayError> {
        self.handle.reload(config)
    }

    /// The admin surface's view of this gateway (`runtime::admin::serve` serves it), which
    /// reloads from the configuration file at `path`.
    pub fn control(&self, path: std::path::PathBuf) -> GatewayControl {
        GatewayControl {
            path,
            gateway: self.handle.clone(),
        }
    }
}

struct Shared {
    /// The TLS configuration new connections get (server certificate, CA hints, `[tls]`).
    tls: ArcSwap<rustls::ServerConfig>,
    auth: ArcSwap<DeviceAuth>,
    /// `client_cert_header`: where endpoints get the device's certificate, if anywhere.
    cert_header: arc_swap::ArcSwapOption<hyper::header::HeaderName>,
    connectors: ArcSwap<Connectors>,
    registry: Arc<Registry>,
    /// `request_timeout_secs`.
    timeout: Duration,
    /// `startup_grace_secs`, counted from `epoch`.
    startup_grace: Duration,
    /// `refused_body_drain_bytes` and `refused_body_drain_timeout_secs`.
    refused_body_drain_bytes: u64,
    refused_body_drain_time: Duration,
    /// `max_request_header_bytes` (`max_response_header_bytes` is in `channel_settings`).
    max_request_header_bytes: usize,
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
    /// Caps on device connections, and the counts `/status` shows.
    limits: Arc<limits::Limits>,
    /// `handshake_timeout_secs`, `first_request_timeout_secs`, `idle_timeout_secs`.
    handshake: Duration,
    first_request: Duration,
    idle: Duration,
    /// `http2_keepalive_secs` (None: 0).
    http2_keepalive: Option<Duration>,
    /// What every channel runs with (`channel_unresponsive_after_ms`,
    /// `channel_keepalive_timeout_secs`, ...).
    channel_settings: channels::Settings,
    /// When the gateway started: what a device's HTTP/2 stream ends are timed from
    /// (milliseconds, in an atomic), and the start of `startup_grace`.
    epoch: tokio::time::Instant,
    /// The Prometheus series and what `/readyz` reads (`metrics`).
    metrics: metrics::GatewayMetrics,
    /// The continuous analyzer: its schedule (`[probe]`) and last results.
    checks: checks::Checks,
    /// `[proxy_protocol]`: the load balancers whose PROXY headers `listen` takes.
    proxies: Option<proxy_protocol::Proxies>,
}

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
    let connector_roots = load_connector_roots(&config)?;
    let auth = load_device_auth(&config, 0, &connector_roots, &log, None)?;
    log.info(&format!("Devices: {}", auth.describe()));
    let connectors = Connectors::load(&config, connector_roots, &auth)?;
    let (tls, _) = server_tls(&config, &auth, &connectors.roots, None)?;
    let gateway_metrics = metrics::GatewayMetrics::new(
        shards.len(),
        config.ready_endpoints.clone(),
        control::certificates(&config, &auth, &connectors),
    );
    let registry = Arc::new(Registry::default());
    registry.set_max_queued(config.max_queued_requests);
    let channel_settings = channels::Settings {
        gateway_threads: shards.len(),
        max_response_header_bytes: config.max_response_header_bytes,
        keepalive: channels::KeepAlive {
            unresponsive_after: Duration::from_millis(config.channel_unresponsive_after_ms),
            timeout: Duration::from_secs(config.channel_keepalive_timeout_secs),
        },
        log: log.clone(),
    };
    let shared = Arc::new(Shared {
        tls: ArcSwap::from_pointee(tls),
        auth: ArcSwap::from_pointee(auth),
        cert_header: arc_swap::ArcSwapOption::from(client_cert_header(&config).map(Arc::new)),
        connectors: ArcSwap::from_pointee(connectors),
        registry: registry.clone(),
        timeout: Duration::from_secs(config.request_timeout_secs),
        startup_grace: Duration::from_secs(config.startup_grace_secs),
        refused_body_drain_bytes: config.refused_body_drain_bytes,
        refused_body_drain_time: Duration::from_secs(config.refused_body_drain_timeout_secs),
        max_request_header_bytes: config.max_request_header_bytes as usize,
        max_streams_per_device: config.max_streams_per_device,
        device_idle: Duration::from_secs(config.device_idle_timeout_secs),
        connector_idle: Duration::from_secs(config.connector_idle_timeout_secs),
        log,
        message_ids: MessageIds::new(&ring::rand::SystemRandom::new()),
        placing: ShardCounts::new(shards.len()),
        shards: shards.clone(),
        stopping: std::sync::atomic::AtomicBool::new(false),
        stop: Arc::new(tokio::sync::Notify::new()),
        limits: Arc::new(limits::Limits::new(
            config.max_connections,
            config.max_connections_per_address,
            config.reserved_for_channels,
        )),
        handshake: Duration::from_secs(config.handshake_timeout_secs),
        first_request: Duration::from_secs(config.first_request_timeout_secs),
        idle: Duration::from_secs(config.idle_timeout_secs),
        http2_keepalive: (config.http2_keepalive_secs > 0)
            .then(|| Duration::from_secs(config.http2_keepalive_secs)),
        channel_settings,
        epoch: tokio::time::Instant::now(),
        metrics: gateway_metrics,
        checks: checks::Checks::new(),
        proxies: config
            .proxy_protocol
            .as_ref()
            .map(proxy_protocol::Proxies::new),
    });
    let listening = listen(config.listen, &shards, &shared, shared.limits.clone(), true).await?;
    shared.log.info(&format!(
        "Gateway listening on {} for devices and connector channels ({} worker thread{})",
        listening.addr,
        shards.len(),
        if shards.len() == 1 { "" } else { "s" }
    ));
    if let Some(proxies) = &shared.proxies {
        shared
            .log
            .info(&format!("On {}: {}", listening.addr, proxies.describe()));
    }
    let channel_listening = match config.channel_listen {
        Some(addr) => {
            // Every connection here is let in only to show a channel's ClientHello: its
            // room is this listener's own, out of reach of the devices on `listen`.
            let limits = Arc::new(limits::Limits::channels_only(config.reserved_for_channels));
            let listening = listen(addr, &shards, &shared, limits.clone(), false).await?;
            shared.log.info(&format!(
                "Gateway listening on {} for connector channels only",
                listening.addr
            ));
            Some((listening, limits))
        }
        None => None,
    };
    upkeep(&shared);
    shared
        .checks
        .apply(config.probe.as_ref(), listening.addr, &shared);
    let handle = control::Handle {
        addr: listening.addr,
        shared: shared.clone(),
        registry: registry.clone(),
        open: listening.open_counts(),
        channel_listen: channel_listening
            .as_ref()
            .map(|(l, limits)| (l.addr, limits.clone())),
    };
    Ok(RunningGateway {
        addr: listening.addr,
        registry,
        listening,
        shared,
        channel_listening,
        handle,
    })
}

/// Folds the request histograms' samples into buckets every few seconds on the first shard,
/// for as long as the gateway is there (a scrape does it too).
fn upkeep(shared: &Arc<Shared>) {
    let shared = Arc::downgrade(shared);
    let task = async move {
        loop {
            tokio::time::sleep(runtime::metrics::UPKEEP_EVERY).await;
            match shared.upgrade() {
                Some(shared) => shared.metrics.upkeep(),
                None => return,
            }
        }
    };
    tokio::spawn(task);
}

/// Accepts on `addr` on every shard: each connection takes a slot of `limits` before any TLS
/// (over the caps it is closed at once, see `limits`), then is served with the TLS
/// configuration of that moment (a reload swaps in a new server certificate). With `proxied`
/// and `[proxy_protocol]`, a load balancer's connection takes its slot once its PROXY header
/// has named the device (`proxy_protocol`).
async fn listen(
    addr: SocketAddr,
    shards: &Shards,
    shared: &Arc<Shared>,
    limits: Arc<limits::Limits>,
    proxied: bool,
) -> Result<runtime::listener::Listening, GatewayError> {
    let shared = shared.clone();
    runtime::listener::listen_on(addr, shards, move |tcp, peer| {
        let proxies = shared.proxies.as_ref().filter(|_| proxied);
        let arrival = match proxies {
            Some(proxies) if proxies.trusts(peer.ip()) => accept::Arrival::Proxied(limits.clone()),
            _ => accept::Arrival::Direct {
                slot: limits.admit(peer, &shared.log),
                refuse_proxy_header: proxies.is_some(),
            },
        };
        accept::connection(shared.tls.load_full(), tcp, peer, shared.clone(), arrival)
    })
    .await
    .map_err(|source| GatewayError::Listen { addr, source })
}

/// Loads how devices are judged, logging every CRL that cannot be used (the CRL policy then
/// decides for the devices it would have covered). The CRLs may come from the device roots
/// or the connector roots: connectors are checked against the same ones. OIDC issuers the
/// `previous` settings had (same table) are kept with their keys; new ones start fetching.
fn load_device_auth(
    config: &GatewayConfig,
    generation: u64,
    connector_roots: &RootSet,
    log: &Log,
    previous: Option<&DeviceAuth>,
) -> Result<DeviceAuth, GatewayError> {
    let mut auth = DeviceAuth::load_with_crl_issuers(
        generation,
        &config.trusted_roots,
        connector_roots,
        config
            .verify_client_revocation
            .then_some((config.crls.as_slice(), config.crl_policy)),
        config.tokens.as_ref(),
    )?;
    for problem in auth.revocation.iter().flat_map(|r| &r.unreadable) {
        log.error(&format!("CRL cannot be used: {problem}"));
    }
    if let Some(tokens) = &mut auth.tokens {
        if let Some(before) = previous.and_then(|p| p.tokens.as_ref()) {
            tokens.adopt(before);
        }
        tokens.start(log);
    }
    Ok(auth)
}
