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
mod limits;
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
    /// A second address for connector channels only, as the original has its connection
    /// point ports: no device cap applies there and no device is served. Optional; channels
    /// may still come to `listen`.
    #[serde(default)]
    pub channel_listen: Option<SocketAddr>,
    /// The gateway's server certificate (PEM, leaf first) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Roots device certificates must chain to on CCM_PROXY_MUTUALAUTH routes.
    pub trusted_roots: Vec<PathBuf>,
    /// Roots connector channel certificates must chain to. Connectors have a trust of their
    /// own: `trusted_roots` (the device roots) are never used for them, so a CA that issues
    /// device certificates cannot issue a connector. Required, unless every entry of
    /// `allowed_connectors` is a SHA-1 thumbprint: the connectors are then pinned, and the
    /// pinned certificate itself is the trust (no chain is built; it must still be valid now
    /// and state Client Authentication; revoked by a CRL at hand, it is refused, and with no
    /// CRL from its issuer it is let in, since removing the thumbprint and reloading revokes a
    /// pin).
    #[serde(default)]
    pub connector_roots: Vec<PathBuf>,
    /// Connectors allowed to open channels, by their certificate's subject CN (read from the
    /// parsed certificate; a subject with two CNs matches by thumbprint only) or SHA-1
    /// thumbprint. An entry may bind a connector to endpoints:
    /// `{ name = "Branch Connector", endpoints = [3456, 3457] }`. A bound endpoint may be
    /// announced only by the connectors bound to it; a plain entry (a string) may announce any
    /// endpoint that no entry binds. A hello announcing an endpoint outside this is refused,
    /// its channel closed, and logged with the connector and the endpoint ids.
    pub allowed_connectors: Vec<AllowedConnector>,
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
    /// A request header in which endpoints get the device's trusted certificate, its DER in
    /// base64, as IIS ARR sends it (e.g. "X-ARR-ClientCert"); none by default. A device's own
    /// copy never passes. Changes on reload.
    #[serde(default)]
    pub client_cert_header: Option<String>,
    /// Seconds from accepting a connection to the end of its TLS handshake (default 10).
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_secs: u64,
    /// Seconds a device has after its handshake to send its first request (default 10).
    #[serde(default = "default_first_request_timeout")]
    pub first_request_timeout_secs: u64,
    /// Seconds a device connection may stay open with no request under way (default 120,
    /// IIS's connectionTimeout). HTTP/1.1 kept-alive connections get at most 30 s.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Seconds between HTTP/2 PINGs to a device that has sent nothing meanwhile; one not
    /// answered within 20 s closes the connection (default 30; 0: none).
    #[serde(default = "default_http2_keepalive")]
    pub http2_keepalive_secs: u64,
    /// Device connections held at once, in total (default 16,000).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Device connections held at once from one source address (IPv6: one /64) (default 1,000).
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
    /// Connections let in beyond the device caps to show a connector's ClientHello (the
    /// channel ALPN); any other is closed (default 256).
    #[serde(default = "default_reserved_for_channels")]
    pub reserved_for_channels: usize,
    /// The largest request header block the gateway forwards, counted as HPACK does (each
    /// field's name and value and 32, the request's method and path included) with the
    /// metadata headers the gateway adds; over it a device gets 431. A connector announcing a
    /// smaller `max_request_header_bytes` in its hello gets nothing over its own (and a warning
    /// is logged when its channel opens).
    #[serde(default = "default_max_request_header_bytes")]
    pub max_request_header_bytes: u32,
    /// The largest answer header block taken from a connector (counted likewise); over it the
    /// device gets 502 CMGService_Badconnectoranswer.
    #[serde(default = "default_max_response_header_bytes")]
    pub max_response_header_bytes: u32,
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
    #[serde(default = "default_stall_timeout")]
    pub device_idle_timeout_secs: u64,
    /// Seconds a connector may go without sending any of an answer's body once its head has
    /// come: then the device's stream (HTTP/2) or connection (HTTP/1.1) is cut, and
    /// `CMGService_Connectorstalled` (504) logged.
    #[serde(default = "default_stall_timeout")]
    pub connector_idle_timeout_secs: u64,
}

/// One entry of `allowed_connectors`: a name or thumbprint, or one bound to endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a connector's certificate CN or SHA-1 thumbprint, or a table { name = \"...\", endpoints = [id, ...] }"
)]
pub enum AllowedConnector {
    /// May announce any endpoint no entry binds.
    Name(String),
    Bound(BoundConnector),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundConnector {
    /// The certificate's subject CN or SHA-1 thumbprint.
    pub name: String,
    /// The endpoint ids this connector may announce.
    pub endpoints: Vec<u64>,
}

impl AllowedConnector {
    pub fn name(&self) -> &str {
        match self {
            AllowedConnector::Name(name) => name.trim(),
            AllowedConnector::Bound(bound) => bound.name.trim(),
        }
    }
}

/// A SHA-1 thumbprint as Windows shows it: 40 hex digits.
fn is_thumbprint(name: &str) -> bool {
    name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn default_max_streams_per_device() -> usize {
    64
}

fn default_max_queued_requests() -> usize {
    tunnel::DEFAULT_MAX_QUEUED_REQUESTS
}

fn default_stall_timeout() -> u64 {
    30
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}

fn default_timeout() -> u64 {
    120
}

fn default_handshake_timeout() -> u64 {
    10
}

fn default_first_request_timeout() -> u64 {
    10
}

fn default_idle_timeout() -> u64 {
    120
}

fn default_http2_keepalive() -> u64 {
    30
}

/// Fits a process allowed 20,000 open files (`ulimit -n`), each connection taking one: 16,000
/// devices, 256 held for channels' handshakes, and the rest for channels, logs, CRLs, the
/// admin surface and each shard's own descriptors.
fn default_max_connections() -> usize {
    16_000
}

fn default_max_connections_per_address() -> usize {
    1_000
}

fn default_reserved_for_channels() -> usize {
    256
}

fn default_max_request_header_bytes() -> u32 {
    32 * 1024
}

fn default_max_response_header_bytes() -> u32 {
    64 * 1024
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
        if let Some(name) = &cfg.client_cert_header {
            if let Err(reason) = client_cert_header_problem(name) {
                return Err(invalid("client_cert_header", &reason));
            }
        }
        if cfg.trusted_roots.is_empty() {
            return Err(invalid(
                "trusted_roots",
                "at least one root CA file is needed for device certificates",
            ));
        }
        if cfg.allowed_connectors.iter().all(|c| c.name().is_empty()) {
            return Err(invalid(
                "allowed_connectors",
                "name at least one connector (its certificate's CN or thumbprint); without one no channel can open",
            ));
        }
        for entry in &cfg.allowed_connectors {
            if let AllowedConnector::Bound(bound) = entry {
                if bound.name.trim().is_empty() || bound.endpoints.is_empty() {
                    return Err(invalid(
                        "allowed_connectors",
                        &format!("the entry {{ name = \"{}\", endpoints = {:?} }} needs a name (a CN or thumbprint) and at least one endpoint id", bound.name, bound.endpoints),
                    ));
                }
            }
        }
        let pinned = cfg
            .allowed_connectors
            .iter()
            .filter(|c| !c.name().is_empty())
            .all(|c| is_thumbprint(c.name()));
        if cfg.connector_roots.is_empty() && !pinned {
            return Err(invalid(
                "connector_roots",
                "list the root CA file(s) connector channel certificates must chain to (the device roots in trusted_roots are not used for connectors), or pin every connector in allowed_connectors by its certificate's SHA-1 thumbprint",
            ));
        }
        if let Some(reason) = channel::config::worker_threads_problem(cfg.worker_threads) {
            return Err(invalid("worker_threads", &reason));
        }
        for (key, value) in [
            ("max_request_header_bytes", cfg.max_request_header_bytes),
            ("max_response_header_bytes", cfg.max_response_header_bytes),
        ] {
            if !(4 * 1024..=1024 * 1024).contains(&value) {
                return Err(invalid(key, "must be between 4096 and 1048576"));
            }
        }
        if cfg.request_timeout_secs == 0 || cfg.request_timeout_secs > 3600 {
            return Err(invalid(
                "request_timeout_secs",
                "must be between 1 and 3600",
            ));
        }
        for (key, value, most) in [
            ("handshake_timeout_secs", cfg.handshake_timeout_secs, 300),
            (
                "first_request_timeout_secs",
                cfg.first_request_timeout_secs,
                86_400,
            ),
            ("idle_timeout_secs", cfg.idle_timeout_secs, 86_400),
        ] {
            if value == 0 || value > most {
                return Err(invalid(key, &format!("must be between 1 and {most}")));
            }
        }
        if cfg.http2_keepalive_secs > 86_400 {
            return Err(invalid(
                "http2_keepalive_secs",
                "must be between 0 (no PINGs) and 86400",
            ));
        }
        for (key, value) in [
            ("max_connections", cfg.max_connections),
            (
                "max_connections_per_address",
                cfg.max_connections_per_address,
            ),
        ] {
            if value == 0 || value > 10_000_000 {
                return Err(invalid(key, "must be between 1 and 10000000"));
            }
        }
        if cfg.channel_listen == Some(cfg.listen) && cfg.listen.port() != 0 {
            return Err(invalid(
                "channel_listen",
                "is the same address as listen: give it a port of its own, or leave it out",
            ));
        }
        if cfg.channel_listen.is_some() && cfg.reserved_for_channels == 0 {
            return Err(invalid(
                "reserved_for_channels",
                "is 0, and channel_listen takes no more channel handshakes at once than this: give at least 1",
            ));
        }
        if cfg.reserved_for_channels > 100_000 {
            return Err(invalid(
                "reserved_for_channels",
                "must be between 0 and 100000",
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

/// Whether `name` can carry the device's certificate to endpoints; the name to use if so.
fn client_cert_header_problem(name: &str) -> Result<hyper::header::HeaderName, String> {
    let parsed = hyper::header::HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("\"{name}\" is not a header name"))?;
    let lower = parsed.as_str();
    if lower.starts_with(headers::PREFIX)
        || headers::is_hop_by_hop_lower(lower)
        || matches!(
            lower,
            "content-length"
                | "content-type"
                | "content-encoding"
                | "authorization"
                | "cookie"
                | "x-forwarded-for"
                | "forwarded"
        )
    {
        return Err(format!(
            "\"{name}\" is a header the request needs for something else; name one of its own, e.g. \"X-ARR-ClientCert\""
        ));
    }
    Ok(parsed)
}

/// The configured certificate header, checked by [`GatewayConfig::load`].
fn client_cert_header(config: &GatewayConfig) -> Option<hyper::header::HeaderName> {
    config
        .client_cert_header
        .as_deref()
        .and_then(|name| client_cert_header_problem(name).ok())
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
    /// `channel_listen`'s listener, and its own room for channels' handshakes.
    channel_listening: Option<(channel::listener::Listening, Arc<limits::Limits>)>,
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

    /// Device connections against their caps, and the refusals and closes since start
    /// (handshake, first-request and idle deadlines), for the admin surface's status.
    pub fn connections_status(&self) -> serde_json::Value {
        let mut status = self.shared.limits.status();
        if let (Some((listening, limits)), Some(all)) =
            (&self.channel_listening, status.as_object_mut())
        {
            let mut channels = limits.status();
            if let Some(channels) = channels.as_object_mut() {
                channels.insert("address".into(), listening.addr.to_string().into());
            }
            all.insert("channel_listen".into(), channels);
        }
        status
    }

    /// Applies what can change while running from a freshly loaded configuration: `verbose`,
    /// and how devices are judged (trusted roots, CRLs and their policy, token keys and
    /// revoked token ids). Open connections are judged again on their next request. Says what
    /// applies now; on an error nothing changes.
    pub fn reload(&self, config: &GatewayConfig) -> Result<String, GatewayError> {
        let generation = self.shared.auth.load().generation + 1;
        // Everything that can fail is done before anything is swapped in.
        let connector_roots = load_connector_roots(config)?;
        let auth = load_device_auth(config, generation, &connector_roots, &self.shared.log)?;
        let connectors = Connectors::load(config, connector_roots, &auth)?;
        let (tls, certificate) = server_tls(
            config,
            &auth,
            &connectors.roots,
            Some(&self.shared.tls.load()),
        )?;
        let described = auth.describe();
        // Before the new generation: connections judged again under it make their header
        // with this name.
        self.shared
            .cert_header
            .store(client_cert_header(config).map(Arc::new));
        self.shared.auth.store(Arc::new(auth));
        self.shared.tls.store(Arc::new(tls));
        // Channels of connectors no longer allowed (or trusted) are closed now.
        let now = OffsetDateTime::now_utc();
        let mut closed = Vec::new();
        for channel in self.registry.all() {
            let judged = connectors
                .judge(Some(&channel.peer_cert), now)
                .and_then(|cert| connectors.admits(&cert, &channel.hello));
            if let Err(why) = judged {
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
            "verbose {}{}; devices: {described}; server certificate for new connections: {certificate}; connectors: {} (listen, the connection caps and timeouts take effect at the next start)",
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
    /// `client_cert_header`: where endpoints get the device's certificate, if anywhere.
    cert_header: arc_swap::ArcSwapOption<hyper::header::HeaderName>,
    connectors: ArcSwap<Connectors>,
    registry: Arc<Registry>,
    timeout: Duration,
    /// `max_request_header_bytes` and `max_response_header_bytes`.
    max_request_header_bytes: usize,
    max_response_header_bytes: u32,
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
    /// What a device's HTTP/2 stream ends are timed from (milliseconds, in an atomic).
    epoch: tokio::time::Instant,
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

/// How long an HTTP/1.1 device has for a request's headers (slow-loris), counted from the end
/// of the answer before (hyper's header read timeout starts as the connection turns idle).
const HEADER_TIME: Duration = Duration::from_secs(30);

/// How long a device has to answer an HTTP/2 PING before its connection is closed.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// How long an idle HTTP/2 device has to close after its GOAWAY before it is cut.
const GOAWAY_GRACE: Duration = Duration::from_secs(5);

/// What an HTTP/1.1 device connection's read buffer may hold beyond the header budget (body
/// reads).
const H1_BODY_READ: usize = 64 * 1024;

/// The methods the gateway forwards: HTTP's own but CONNECT (a tunnel, which HTTP/2 carries
/// without a path: the connector refused each such stream, and h2 closes a channel after
/// 1,024 refusals) and TRACE (it echoes headers back); and Configuration Manager's extension
/// methods: `CCM_POST` (its clients' requests to a management point) and `BITS_POST` (BITS
/// uploads), and WebDAV's `PROPFIND` (BITS and distribution points list content with it).
/// Anything else gets 405 with `Allow`.
const FORWARDED_METHODS: &str =
    "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, CCM_POST, BITS_POST, PROPFIND";

fn is_forwarded(method: &hyper::Method) -> bool {
    use hyper::Method;
    matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::OPTIONS
    ) || matches!(method.as_str(), "CCM_POST" | "BITS_POST" | "PROPFIND")
}

/// A header block's size as HPACK counts it (RFC 7541 4.1: name, value and 32 a field), with
/// the pseudo-header fields the request goes on the channel with (`:method`, `:scheme`,
/// `:path`; h2 sends no `:authority` for a path-only URI).
fn header_block_size(parts: &hyper::http::request::Parts) -> usize {
    let pseudo = (7 + parts.method.as_str().len() + 32)
        + (7 + 5 + 32)
        + (5 + parts.uri.path_and_query().map_or(1, |p| p.as_str().len()) + 32);
    parts.headers.iter().fold(pseudo, |size, (name, value)| {
        size + name.as_str().len() + value.len() + 32
    })
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
    let auth = load_device_auth(&config, 0, &connector_roots, &log)?;
    log.info(&format!("Devices: {}", auth.describe()));
    let connectors = Connectors::load(&config, connector_roots, &auth)?;
    let (tls, _) = server_tls(&config, &auth, &connectors.roots, None)?;
    let registry = Arc::new(Registry::default());
    registry.set_max_queued(config.max_queued_requests);
    let shared = Arc::new(Shared {
        tls: ArcSwap::from_pointee(tls),
        auth: ArcSwap::from_pointee(auth),
        cert_header: arc_swap::ArcSwapOption::from(client_cert_header(&config).map(Arc::new)),
        connectors: ArcSwap::from_pointee(connectors),
        registry: registry.clone(),
        timeout: Duration::from_secs(config.request_timeout_secs),
        max_request_header_bytes: config.max_request_header_bytes as usize,
        max_response_header_bytes: config.max_response_header_bytes,
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
        epoch: tokio::time::Instant::now(),
    });
    let handler_shared = shared.clone();
    let listening = channel::listener::listen_on(config.listen, &shards, move |tcp, peer| {
        // Counted before any TLS: over the caps, closed at once (see `limits`).
        let slot = handler_shared.limits.admit(peer, &handler_shared.log);
        // The configuration of this moment: a reload swaps in a new server certificate.
        connection(
            handler_shared.tls.load_full(),
            tcp,
            peer,
            handler_shared.clone(),
            slot,
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
    let channel_listening = match config.channel_listen {
        Some(addr) => {
            // Every connection here is let in only to show a channel's ClientHello: its
            // room is this listener's own, out of reach of the devices on `listen`.
            let limits = Arc::new(limits::Limits::channels_only(config.reserved_for_channels));
            let (handler_shared, handler_limits) = (shared.clone(), limits.clone());
            let listening = channel::listener::listen_on(addr, &shards, move |tcp, peer| {
                let slot = handler_limits.admit(peer, &handler_shared.log);
                connection(
                    handler_shared.tls.load_full(),
                    tcp,
                    peer,
                    handler_shared.clone(),
                    slot,
                )
            })
            .await
            .map_err(|source| GatewayError::Listen { addr, source })?;
            shared.log.info(&format!(
                "Gateway listening on {} for connector channels only",
                listening.addr
            ));
            Some((listening, limits))
        }
        None => None,
    };
    Ok(RunningGateway {
        addr: listening.addr,
        registry,
        listening,
        shared,
        channel_listening,
    })
}

/// Which connectors may open channels: the roots their certificates must chain to
/// (`connector_roots`; none when every connector is pinned by thumbprint), the names (CN) or
/// thumbprints allowed, the endpoints each may announce, and the CRLs to check them against.
struct Connectors {
    roots: RootSet,
    /// No `connector_roots`: every entry is a thumbprint, and the certificate is the trust.
    pinned: bool,
    allowed: Vec<AllowedConnector>,
    /// Present when `verify_client_revocation` is on: the gateway's CRLs (read once, for
    /// devices and connectors) and the ones that could not be read.
    revocation: Option<(Vec<pki::crl::RevocationList>, Vec<String>)>,
}

impl Connectors {
    fn load(
        config: &GatewayConfig,
        roots: RootSet,
        auth: &DeviceAuth,
    ) -> Result<Connectors, GatewayError> {
        Ok(Connectors {
            pinned: config.connector_roots.is_empty(),
            roots,
            allowed: config
                .allowed_connectors
                .iter()
                .filter(|c| !c.name().is_empty())
                .cloned()
                .collect(),
            revocation: auth
                .revocation
                .as_ref()
                .map(|r| (r.crls.clone(), r.unreadable.clone())),
        })
    }

    /// Whether `entry` names this certificate: its thumbprint, or its one CN (from the parsed
    /// subject, never the printed one). Pinned, the thumbprint only: with no roots anyone can
    /// make a certificate whose CN reads like a pinned thumbprint.
    fn names(&self, entry: &AllowedConnector, cert: &pki::cert::Certificate) -> bool {
        let name = entry.name();
        name.eq_ignore_ascii_case(&cert.thumbprint)
            || (!self.pinned
                && cert
                    .common_name()
                    .is_some_and(|cn| name.eq_ignore_ascii_case(cn)))
    }

    /// The connector's certificate, if it may hold a channel; else why not. Checked: trust
    /// (a chain to `connector_roots`, or a pinned thumbprint), validity now, the allow-list,
    /// the Client Authentication EKU, and revocation when the gateway checks it.
    fn judge(
        &self,
        leaf: Option<&[u8]>,
        now: OffsetDateTime,
    ) -> Result<Box<pki::cert::Certificate>, String> {
        let cert = if self.pinned {
            let Some(der) = leaf else {
                return Err(describe_peer(&PeerCert::None));
            };
            let cert = pki::cert::Certificate::from_der(der)
                .map_err(|e| format!("its certificate cannot be parsed: {e}"))?;
            if now < cert.not_before || now > cert.not_after {
                return Err(describe_peer(&PeerCert::NotTimeValid {
                    detail: format!(
                        "{} is valid from {} to {}",
                        cert.label(),
                        pki::filter::date_text(cert.not_before),
                        pki::filter::date_text(cert.not_after)
                    ),
                }));
            }
            Box::new(cert)
        } else {
            match judge_peer(leaf, &self.roots, &[], now) {
                PeerCert::Trusted(cert) => cert,
                other => return Err(describe_peer(&other)),
            }
        };
        if !self.allowed.iter().any(|a| self.names(a, &cert)) {
            return Err(format!("{} is not in allowed_connectors", cert.label()));
        }
        // A connector's certificate is issued for this: unlike a device's, an absent EKU is
        // not read as "any purpose".
        cert.client_auth_usage(false).map_err(|why| {
            format!("{why}; issue the connector's channel certificate with Client Authentication in its enhanced key usage")
        })?;
        if let Some((crls, unreadable)) = &self.revocation {
            match pki::crl::status(&cert, crls, now) {
                pki::crl::RevocationStatus::Good => {}
                pki::crl::RevocationStatus::Revoked { detail } => {
                    return Err(describe_peer(&PeerCert::Revoked { detail }))
                }
                // Unknown is refused whatever crl_policy says for devices: a gateway has few
                // connectors, and each is given every device's traffic for its endpoints.
                // A pinned certificate's trust is its pin, so no CRL from its issuer is fine.
                pki::crl::RevocationStatus::Unknown { .. } if self.pinned => {}
                pki::crl::RevocationStatus::Unknown { why } => {
                    return Err(format!(
                        "the revocation status of {} is unknown ({why}{}); connectors are refused when it is: add the CRL of its issuer to crls",
                        cert.label(),
                        if unreadable.is_empty() {
                            String::new()
                        } else {
                            format!("; unreadable CRL: {}", unreadable.join("; "))
                        }
                    ))
                }
            }
        }
        Ok(cert)
    }

    /// Whether the connector of `cert` may announce every endpoint of `hello`: an endpoint
    /// bound by some entry only by the connectors it binds; any other, by a connector with a
    /// plain entry. Else which endpoints it may not, and the fix.
    fn admits(&self, cert: &pki::cert::Certificate, hello: &tunnel::Hello) -> Result<(), String> {
        let mine: Vec<&AllowedConnector> = self
            .allowed
            .iter()
            .filter(|a| self.names(a, cert))
            .collect();
        let plain = mine.iter().any(|a| matches!(a, AllowedConnector::Name(_)));
        let binds = |a: &AllowedConnector, id: u64| matches!(a, AllowedConnector::Bound(b) if b.endpoints.contains(&id));
        let refused: Vec<String> = hello
            .endpoints
            .iter()
            .filter(|e| {
                let mine_binds = mine.iter().any(|a| binds(a, e.id));
                let anyone_binds = self.allowed.iter().any(|a| binds(a, e.id));
                !(mine_binds || (plain && !anyone_binds))
            })
            .map(|e| format!("{} ({})", e.id, e.name))
            .collect();
        if refused.is_empty() {
            return Ok(());
        }
        Err(format!(
            "connector {} ({}) announced endpoint(s) {} that allowed_connectors does not bind to it; bind them to it ({{ name = \"{}\", endpoints = [...] }}) or take them out of the connector's [[endpoints]]",
            hello.connector_id,
            cert.label(),
            refused.join(", "),
            cert.common_name().unwrap_or(&cert.thumbprint),
        ))
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

/// The roots connector certificates must chain to: none when they are pinned.
fn load_connector_roots(config: &GatewayConfig) -> Result<RootSet, GatewayError> {
    if config.connector_roots.is_empty() {
        return Ok(RootSet::default());
    }
    Ok(RootSet::load(&config.connector_roots)?)
}

/// Loads how devices are judged, logging every CRL that cannot be used (the CRL policy then
/// decides for the devices it would have covered). The CRLs may come from the device roots
/// or the connector roots: connectors are checked against the same ones.
fn load_device_auth(
    config: &GatewayConfig,
    generation: u64,
    connector_roots: &RootSet,
    log: &Log,
) -> Result<DeviceAuth, GatewayError> {
    let auth = DeviceAuth::load_with_crl_issuers(
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
    Ok(auth)
}

async fn connection(
    tls: Arc<rustls::ServerConfig>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    slot: Option<limits::Slot>,
) {
    // Over the caps with no room left: closed now, refusal logged by `admit`. (Kept as the
    // Option it came as: a binding of its own would be one more copy in this future.)
    let Some(over) = slot.as_ref().map(limits::Slot::over) else {
        return;
    };
    let now = tokio::time::Instant::now();
    let deadline = now + shared.handshake;
    // The ClientHello is read and judged in a block of its own: a local moved away still keeps
    // its room in an async fn's future until its scope ends, and the handshake's state would
    // ride along, dead, for as long as the connection is served.
    let (start, placed) = {
        // Let in over a cap only to show a connector's ClientHello, which comes at once.
        let hello_deadline = match over {
            Some(_) => deadline.min(now + limits::ROOM_HELLO_TIME),
            None => deadline,
        };
        let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
        let start = match tokio::time::timeout_at(hello_deadline, hello).await {
            Ok(Ok(start)) => start,
            // Failed handshakes are the client's business (and very common on the internet).
            Ok(Err(_)) => return,
            Err(_) => {
                match (over, &slot) {
                    (Some(cap), Some(slot)) => slot.refused(cap, peer, &shared.log),
                    _ => {
                        let counts = &shared.limits.counts;
                        counts
                            .closed_handshake_timeout
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                return;
            }
        };
        let offers = offers_channel(&start.client_hello());
        if let (Some(cap), false, Some(slot)) = (over, offers, &slot) {
            // Over a cap and not a connector: a device refused, before any handshake.
            slot.refused(cap, peer, &shared.log);
            return;
        }
        let mut placed = None;
        if shared.shards.len() > 1 && offers {
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
                    handshake_and_serve(
                        start,
                        tls,
                        deadline,
                        peer,
                        moved_shared,
                        Some(place),
                        slot,
                    )
                    .await;
                });
                return;
            }
            placed = Some(place);
        }
        (Box::new(start), placed)
    };
    handshake_and_serve(start, tls, deadline, peer, shared, placed, slot).await
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
    slot: Option<limits::Slot>,
) {
    // Taken out of its box by a call of its own, so that the box is freed now: moved out of
    // in place, the box's memory would stay allocated until this fn returns, that is for as
    // long as the device stays (1.4 KiB each).
    let tls = match tokio::time::timeout_at(deadline, unbox(start).into_stream(config)).await {
        Ok(Ok(tls)) => Box::new(tls),
        Ok(Err(_)) => return,
        Err(_) => {
            shared
                .limits
                .counts
                .closed_handshake_timeout
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
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
            shared.max_response_header_bytes,
            |hello| shared.connectors.load().admits(&cert, hello),
        )
        .await;
        // Registered (or failed): the registry now counts it on its shard, and it holds no
        // device slot.
        drop(placed);
        drop(slot);
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
                if let Some(theirs) = ch
                    .hello
                    .max_request_header_bytes
                    .filter(|&theirs| (theirs as usize) < shared.max_request_header_bytes)
                {
                    shared.log.warn(&format!(
                        "Connector {} takes request headers up to {theirs} bytes, less than this gateway's max_request_header_bytes ({}): devices get 431 over {theirs} on its channels; raise the connector's max_request_header_bytes to match",
                        ch.hello.connector_id, shared.max_request_header_bytes
                    ));
                }
            }
            Err(tunnel::AcceptError::Refused(why)) => shared
                .log
                .error(&format!("Refused a connector channel from {peer}: {why}")),
            Err(e) => shared
                .log
                .error(&format!("Channel from {peer} failed: {e}")),
        }
        return;
    }

    // Offered the channel protocol but chose a device one: nothing was placed.
    drop(placed);
    let judgement = shared.auth.load().judge(leaf.as_deref(), now);
    let state = DeviceState::new(judgement, peer, &shared);
    let device = Arc::new(Device {
        addr: peer,
        leaf,
        state: std::sync::Mutex::new(Arc::new(state)),
        forwarded: std::sync::OnceLock::new(),
        streams: std::sync::atomic::AtomicUsize::new(0),
        last_stream_end: std::sync::atomic::AtomicU64::new(0),
        in_flight: std::sync::atomic::AtomicUsize::new(0),
        write_stalled: std::sync::atomic::AtomicBool::new(false),
    });
    let watched = device.clone();
    let first_deadline = tokio::time::Instant::now() + shared.first_request;
    let drain_shared = shared.clone();
    let idle_device = device.clone();
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
        first = tokio::time::timeout_at(first_deadline, tls.fill_buf()) => match first {
            Ok(first) => matches!(first, Ok(bytes) if !bytes.is_empty()),
            Err(_) => {
                drain_shared
                    .limits
                    .counts
                    .closed_first_request_timeout
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                false
            }
        },
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
        // Each stream is counted open until its answer's body is done with, so that the
        // connection is idle only with none open.
        let (epoch, counted_device) = (drain_shared.epoch, idle_device.clone());
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let open = OpenStream::new(&counted_device, epoch);
            let served = hyper::service::Service::call(&service, req);
            async move {
                let response = served.await?;
                Ok::<_, std::convert::Infallible>(
                    response.map(|body| Counted { body, _open: open }),
                )
            }
        });
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
        // h2 answers a header block over the budget with 431 itself (one over four times it
        // closes that device's connection); one within it that the metadata pushes over is
        // refused by `route_request`, with the status text.
        let header_list = u32::try_from(drain_shared.max_request_header_bytes).unwrap_or(u32::MAX);
        let served = hyper::server::conn::http2::Builder::new(executor)
            .timer(hyper_util::rt::TokioTimer::new())
            // PINGs find a device gone without a word; hyper sends one only after a quiet
            // interval.
            .keep_alive_interval(drain_shared.http2_keepalive)
            .keep_alive_timeout(H2_PING_TIMEOUT)
            .max_header_list_size(header_list)
            .max_concurrent_streams(streams)
            .serve_connection(TokioIo::new(tls), service);
        let served = Idle {
            served,
            sleep: tokio::time::sleep_until(first_deadline),
            device: idle_device,
            shared: drain_shared.clone(),
            first_deadline,
            closing: false,
            drain: |served| served.graceful_shutdown(),
        };
        Drainable::new(served, drain_shared.clone(), |idle| idle.shut()).await;
    } else {
        // With a timer, hyper drops an HTTP/1.1 client that takes over 30 s to send its
        // request headers (slow-loris). Its timer starts when the connection turns idle, so
        // it also closes a kept-alive connection with no request: idle_timeout_secs, when
        // that is shorter.
        // The read buffer holds a request's head whole: hyper's default (~400 KiB) took heads
        // far over what the channel carries. Room for the budget and a body's reads beyond it;
        // a head over that gets hyper's own 431, one under it `route_request`'s.
        let buffer = (drain_shared.max_request_header_bytes + H1_BODY_READ).max(8192);
        let served = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(drain_shared.idle.min(HEADER_TIME))
            .max_buf_size(buffer)
            .serve_connection(TokioIo::new(tls), service);
        let counts = drain_shared.limits.clone();
        let served = Drainable::new(served, drain_shared.clone(), |served| {
            served.graceful_shutdown()
        })
        .await;
        if served.is_err_and(|e| e.is_timeout()) {
            counts
                .counts
                .closed_idle
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
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

/// An HTTP/2 stream open on a device connection, until dropped with its answer's body.
struct OpenStream {
    device: Arc<Device>,
    epoch: tokio::time::Instant,
}

impl OpenStream {
    fn new(device: &Arc<Device>, epoch: tokio::time::Instant) -> OpenStream {
        device
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        OpenStream {
            device: device.clone(),
            epoch,
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        // Milliseconds since the epoch, plus one: 0 says no stream has ended yet.
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.device
            .last_stream_end
            .fetch_max(ms, std::sync::atomic::Ordering::AcqRel);
        self.device
            .streams
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// An answer's body with its stream's [`OpenStream`].
    struct Counted {
        #[pin]
        body: Body,
        _open: OpenStream,
    }
}

impl hyper::body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = tunnel::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/2 device connection closed (GOAWAY, then cut after `GOAWAY_GRACE`) once it has
    /// had no stream open for `idle_timeout_secs`, or none at all by its first-request
    /// deadline: hyper's HTTP/2 server has no idle timeout of its own. Its timer is reset only
    /// when it fires, not per stream.
    struct Idle<F> {
        #[pin]
        served: F,
        #[pin]
        sleep: tokio::time::Sleep,
        device: Arc<Device>,
        shared: Arc<Shared>,
        first_deadline: tokio::time::Instant,
        closing: bool,
        drain: fn(std::pin::Pin<&mut F>),
    }
}

impl<F> Idle<F> {
    /// GOAWAY: the streams open are answered, no new one is taken.
    fn shut(self: std::pin::Pin<&mut Self>) {
        let this = self.project();
        if !*this.closing {
            *this.closing = true;
            (this.drain)(this.served);
        }
    }
}

impl<F: std::future::Future> std::future::Future for Idle<F> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::sync::atomic::Ordering;
        use std::task::Poll;
        if self.as_mut().project().served.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        while self.as_mut().project().sleep.poll(cx).is_ready() {
            let this = self.as_mut().project();
            let now = tokio::time::Instant::now();
            let open = this.device.streams.load(Ordering::Acquire) > 0;
            if *this.closing {
                if !open {
                    // Told to go, nothing under way, and still here: cut.
                    return Poll::Ready(());
                }
                // Its streams are answered first (a graceful stop waits for them).
                this.sleep.reset(now + GOAWAY_GRACE);
                continue;
            }
            let ended = this.device.last_stream_end.load(Ordering::Acquire);
            let due = if open {
                now + this.shared.idle
            } else if ended == 0 {
                *this.first_deadline
            } else {
                this.shared.epoch + Duration::from_millis(ended - 1) + this.shared.idle
            };
            if due > now {
                this.sleep.reset(due);
                continue;
            }
            let counts = &this.shared.limits.counts;
            if ended == 0 {
                &counts.closed_first_request_timeout
            } else {
                &counts.closed_idle
            }
            .fetch_add(1, Ordering::Relaxed);
            this.sleep.reset(now + GOAWAY_GRACE);
            self.as_mut().shut();
            if self.as_mut().project().served.poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
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
    /// `X-Forwarded-For` and `Forwarded` with the device's address, made at its first
    /// forwarded request (an idle connection holds 8 bytes for them, not 80 and two values).
    forwarded: std::sync::OnceLock<Box<[HeaderValue; 2]>>,
    /// HTTP/2 streams open now, and when the last one ended (see [`OpenStream`]).
    streams: std::sync::atomic::AtomicUsize,
    last_stream_end: std::sync::atomic::AtomicU64,
    /// Its requests in flight through channels now (`max_streams_per_device`).
    in_flight: std::sync::atomic::AtomicUsize,
    /// Set when the connection was cut because the device took nothing written to it.
    write_stalled: std::sync::atomic::AtomicBool,
}

impl Device {
    /// The values endpoints get in `X-Forwarded-For` and `Forwarded` (RFC 7239: an IPv6
    /// address in brackets and quotes), made once per connection.
    fn forwarded(&self) -> &[HeaderValue; 2] {
        self.forwarded.get_or_init(|| {
            let [forwarded_for, forwarded] = forwarded_texts(self.addr.ip());
            Box::new([header_value(&forwarded_for), header_value(&forwarded)])
        })
    }
}

/// `X-Forwarded-For` and `Forwarded` (RFC 7239 4: an IPv6 address in brackets and quotes)
/// for a device at `ip`.
fn forwarded_texts(ip: std::net::IpAddr) -> [String; 2] {
    let forwarded = match ip {
        std::net::IpAddr::V4(v4) => format!("for={v4};proto=https"),
        std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto=https"),
    };
    [ip.to_string(), forwarded]
}

/// A device connection's judged certificate, as of one [`DeviceAuth`] generation.
struct DeviceState {
    judgement: Judgement,
    /// Who the device is, for the connector: the trusted certificate's subject and thumbprint
    /// and the device's address, as one header value made once per judgement (one HPACK
    /// table entry per connection rather than three lookups per request).
    device_header: HeaderValue,
    /// `client_cert_header` and the trusted certificate's DER in base64, when configured (and
    /// the certificate trusted).
    cert_header: Option<Box<(hyper::header::HeaderName, HeaderValue)>>,
}

impl DeviceState {
    fn new(judgement: Judgement, addr: SocketAddr, shared: &Shared) -> DeviceState {
        if let Some(warning) = &judgement.warning {
            shared.log.warn(&format!("Device {addr}: {warning}"));
        }
        let cert_header = match (&judgement.cert, shared.cert_header.load_full()) {
            // Base64 is always a valid value; were it not, the device's copy is still replaced.
            (Ok(cert), Some(name)) => Some(Box::new((
                (*name).clone(),
                HeaderValue::try_from(base64(cert.der()))
                    .unwrap_or_else(|_| HeaderValue::from_static("")),
            ))),
            _ => None,
        };
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
            cert_header,
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
            *state = Arc::new(DeviceState::new(judgement, self.addr, shared));
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
        /// [`DeviceState::cert_header`].
        cert_header: Option<&'a (hyper::header::HeaderName, HeaderValue)>,
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
            let mut response = refusal_response(&refusal);
            if matches!(refusal.cause, Cause::MethodNotAllowed { .. }) {
                // RFC 9110 15.5.6: a 405 says what the resource does take.
                response.headers_mut().insert(
                    hyper::header::ALLOW,
                    HeaderValue::from_static(FORWARDED_METHODS),
                );
            }
            response
        }
    }
}

async fn route_request(
    request: Request<Incoming>,
    shared: &Shared,
    device: &Arc<Device>,
) -> Result<Response<Body>, Refusal> {
    // First: a CONNECT in authority form has no path to route by, and is still a CONNECT.
    if !is_forwarded(request.method()) {
        return Err(Refusal::new(Cause::MethodNotAllowed {
            method: header_safe(request.method().as_str()),
        }));
    }
    refuse_transfer_codings(request.headers())?;
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
        Route::ServiceMetadata { auth } => {
            let view = metadata_view(&request, auth, shared, device);
            return Ok(service_metadata(shared, view));
        }
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
                    cert_header: state.cert_header.as_deref(),
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
    // The device's own headers go on as they are, minus hop-by-hop ones, any claim to be
    // Portcullis metadata and any header an endpoint may trust to say who called (set below);
    // the map is edited in place rather than rebuilt.
    headers::strip_device(&mut parts.headers);
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
    // Who called, for the endpoint: the gateway's word, made once per connection.
    let [forwarded_for, forwarded] = device.forwarded();
    map.insert(headers::X_FORWARDED_FOR, forwarded_for.clone());
    map.insert(hyper::header::FORWARDED, forwarded.clone());
    match &identity {
        Identity::Certificate {
            cert_header: Some(cert_header),
            ..
        } => {
            map.insert(cert_header.0.clone(), cert_header.1.clone());
        }
        // Not configured when the judgement was made.
        Identity::Certificate { .. } => {}
        // A name of the operator's choosing may be outside what strip_device drops.
        Identity::Token { .. } => {
            if let Some(name) = &*shared.cert_header.load() {
                map.remove(&**name);
            }
        }
    }
    // One budget along the path: what goes on the channel, metadata included, fits what the
    // connector's h2 takes, which would otherwise refuse it (and past four times its limit
    // close the channel, cutting every other device's request on it). The connector's own
    // limit, announced in its hello, is the budget when it is the smaller.
    let limit = channel
        .hello
        .max_request_header_bytes
        .map_or(shared.max_request_header_bytes, |theirs| {
            shared.max_request_header_bytes.min(theirs as usize)
        });
    let size = header_block_size(&parts);
    if size > limit {
        return Err(Refusal::new(Cause::HeadersTooLarge { size, limit }));
    }
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

/// What a ServiceMetadata caller may see.
enum MetadataView {
    /// Not authenticated: the service, its version and whether it is healthy.
    Anonymous,
    /// A trusted device certificate, or a token for every endpoint: channels, endpoints,
    /// connectors.
    Full,
    /// A token for these endpoints only: those endpoints (no connectors: they serve others
    /// too).
    Endpoints(Vec<u64>),
}

/// Whether the caller authenticated as its route asks: a trusted certificate on
/// CCM_PROXY_MUTUALAUTH, a device token on CCM_PROXY_SERVERAUTH. Anything else (none, an
/// untrusted certificate, a bad or bulk token) is anonymous, not refused: the service's health
/// is for anyone.
fn metadata_view(
    request: &Request<Incoming>,
    auth: Auth,
    shared: &Shared,
    device: &Device,
) -> MetadataView {
    match auth {
        Auth::MutualTls => match device.state(shared).judgement.cert {
            Ok(_) => MetadataView::Full,
            Err(_) => MetadataView::Anonymous,
        },
        Auth::Token => {
            let auth = shared.auth.load();
            let Some(tokens) = &auth.tokens else {
                return MetadataView::Anonymous;
            };
            let authorization = request
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            match tokens.verify(authorization, OffsetDateTime::now_utc()) {
                Ok(claims) if claims.kind != token::TokenKind::Device => MetadataView::Anonymous,
                Ok(claims) if claims.endpoints.is_empty() => MetadataView::Full,
                Ok(claims) => MetadataView::Endpoints(claims.endpoints),
                Err(_) => MetadataView::Anonymous,
            }
        }
    }
}

fn service_metadata(shared: &Shared, view: MetadataView) -> Response<Body> {
    let healthy = shared.registry.channel_count() > 0;
    let only = match view {
        MetadataView::Anonymous => {
            let body = serde_json::json!({
                "service": "Portcullis gateway",
                "version": env!("CARGO_PKG_VERSION"),
                "healthy": healthy,
            });
            return json_response(&body);
        }
        MetadataView::Full => None,
        MetadataView::Endpoints(ids) => Some(ids),
    };
    let endpoints: Vec<serde_json::Value> = shared
        .registry
        .endpoints()
        .into_iter()
        .filter(|(id, ..)| only.as_ref().is_none_or(|ids| ids.contains(id)))
        .map(|(id, name, channels)| serde_json::json!({"id": id, "name": name, "channels": channels, "healthy": channels > 0}))
        .collect();
    if only.is_some() {
        let body = serde_json::json!({
            "service": "Portcullis gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "healthy": healthy,
            "endpoints": endpoints,
        });
        return json_response(&body);
    }
    let connectors: Vec<serde_json::Value> = shared
        .registry
        .connectors()
        .into_iter()
        .map(|(id, channels, has_cert)| serde_json::json!({"connector_id": id, "channels": channels, "has_client_certificate": has_cert}))
        .collect();
    let body = serde_json::json!({
        "service": "Portcullis gateway",
        "version": env!("CARGO_PKG_VERSION"),
        "healthy": healthy,
        "channels": shared.registry.channel_count(),
        "endpoints": endpoints,
        "connectors": connectors,
    });
    json_response(&body)
}

fn json_response(body: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(tunnel::full(body.to_string()))
        .unwrap_or_else(|_| Response::new(tunnel::empty()))
}

/// RFC 9112 6.1: a transfer coding the gateway cannot pass on as it came is refused (501).
/// HTTP/1.1 takes `chunked` off a body, and the channel and the endpoint's hop carry their
/// own framing, so any other coding (`gzip, chunked`) would reach the endpoint lost.
fn refuse_transfer_codings(headers: &hyper::HeaderMap) -> Result<(), Refusal> {
    for value in headers.get_all(hyper::header::TRANSFER_ENCODING) {
        let text = value.to_str().unwrap_or("(not text)");
        for coding in text.split(',').map(str::trim) {
            if !coding.is_empty() && !coding.eq_ignore_ascii_case("chunked") {
                return Err(Refusal::new(Cause::TransferCodingUnsupported {
                    coding: coding.chars().take(40).collect(),
                }));
            }
        }
    }
    Ok(())
}

/// Standard base64 with padding (RFC 4648), as IIS ARR sends a client certificate.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                text.push('=');
            }
        }
    }
    text
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

    #[test]
    fn forwarded_quotes_an_ipv6_address() {
        assert_eq!(
            super::forwarded_texts("127.0.0.1".parse().unwrap()),
            ["127.0.0.1", "for=127.0.0.1;proto=https"]
        );
        assert_eq!(
            super::forwarded_texts("2001:db8::1".parse().unwrap()),
            ["2001:db8::1", "for=\"[2001:db8::1]\";proto=https"]
        );
    }

    #[test]
    fn base64_is_rfc_4648() {
        for (bytes, text) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
            (&[0xff, 0xfe, 0x00], "//4A"),
        ] {
            assert_eq!(super::base64(bytes), text);
        }
    }

    /// The size of what `f` returns, found from its type alone: an async fn's future is never
    /// made.
    fn returned_size<F, A, B, C, D, E, R>(_: &F) -> usize
    where
        F: Fn(A, B, C, D, E) -> R,
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
