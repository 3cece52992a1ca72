//! The gateway's configuration file: every key with its default, and what
//! [`GatewayConfig::load`] checks before the gateway starts or reloads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use channel::tunnel::headers;
use pki::crl::CrlPolicy;
use runtime::config::{self, ConfigError};
use serde::{Deserialize, Serialize};

use crate::token;

/// `portcullis gateway --config FILE`. Built in code with [`GatewayConfig::new`] or
/// [`GatewayConfig::lab`] and written with [`GatewayConfig::write`]: what is written is what
/// `load` reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
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
    /// Seconds to wait for a connector's answer to start (default 120); past it the device
    /// gets 504 `CMGService_Connectortimeout`. Keep it above the connectors'
    /// `endpoint_timeout_secs` (60 by default; each announces its own in its hello, and a
    /// warning is logged when a channel's is not below this), so that a slow endpoint is named
    /// by the connector's 504 `CMGConnector_Endpointtimeout`.
    #[serde(default = "default_timeout")]
    pub request_timeout_secs: u64,
    /// Seconds after the gateway starts during which a request for an endpoint no connector
    /// has announced yet gets 503 `CMGService_Gatewaystarting` (with Retry-After) rather than
    /// 404 `CMGService_Unknownendpoint`: a connector redials a gateway that went away with a
    /// backoff of up to 30 s, so after a restart its channels may take that long to come back
    /// (default 35; 0: none).
    #[serde(default = "default_startup_grace")]
    pub startup_grace_secs: u64,
    /// Bytes of a refused request's body that the gateway reads and throws away, so that the
    /// device's HTTP/1.1 connection stays usable for its next request (default 1 MiB). A body
    /// declared larger, or not all sent within `refused_body_drain_timeout_secs`, is answered
    /// with `Connection: close` (and read on for as long again before the connection closes,
    /// as nginx's lingering close, so that the device reads its answer rather than a reset).
    /// HTTP/2 needs none of this: a refused stream is reset with NO_ERROR.
    #[serde(default = "default_refused_body_drain_bytes")]
    pub refused_body_drain_bytes: u64,
    /// Seconds the gateway waits for the rest of a refused request's body (default 5).
    #[serde(default = "default_refused_body_drain_timeout")]
    pub refused_body_drain_timeout_secs: u64,
    /// Verbose logging: a line per device request and per channel event. Changes on reload
    /// (SIGHUP) or an admin call, without a restart.
    #[serde(default)]
    pub verbose: bool,
    /// Where the log goes: `[log]` file, max_size_kib, console.
    #[serde(default)]
    pub log: logs::logger::LogSettings,
    /// The local admin surface (`GET /status`, `PUT /verbose`, `POST /reload`, `GET /metrics`,
    /// `/healthz`, `/readyz`), loopback only.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// A second, read-only surface for probes and scrapes from outside the host (the kubelet,
    /// Prometheus): `GET`/`HEAD` of `/healthz`, `/readyz` and `/metrics` only, with the admin
    /// surface's answers, to any `Host`. Any address ("0.0.0.0:9100"); none by default. Takes
    /// effect at the next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// The connection analyzer, run by the gateway against itself every `interval_secs`
    /// (`[probe]`: device_cert, device_key, ca, url, endpoints, path, interval_secs,
    /// timeout_secs); its last result per hop is on `/metrics` and the status page. Takes
    /// effect at the next start.
    #[serde(default)]
    pub probe: Option<crate::checks::ProbeSettings>,
    /// Endpoint ids the admin surface's `GET /readyz` waits for: ready (200) once a channel
    /// serves each of them; without this key, once any channel is held. Applies on reload.
    /// Not written when empty, so a file written for a lab still loads in builds before the
    /// key (`bench compare --baseline`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ready_endpoints: Vec<u64>,
    /// Worker threads (default: one per CPU). Each runs its own single-threaded runtime (a
    /// shard) and keeps the connections it was given; see `runtime::shards`. On a host shared
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
    /// Milliseconds a connector may go with nothing read from its channel and a keep-alive
    /// PING unanswered before no new request goes to that channel (default 1,000); when every
    /// channel for an endpoint is so, devices get 503 `CMGService_Connectorunresponsive` at
    /// once rather than wait on a frozen connector.
    #[serde(default = "default_channel_unresponsive_after_ms")]
    pub channel_unresponsive_after_ms: u64,
    /// Seconds of such silence before the channel is dropped (default 5): the requests on it
    /// get 502 `CMGService_Channelbroken` saying the PINGs went unanswered.
    #[serde(default = "default_channel_keepalive_timeout_secs")]
    pub channel_keepalive_timeout_secs: u64,
    /// The PROXY protocol on `listen`, for devices behind an L4 load balancer (`[proxy_protocol]`:
    /// version, proxies, header_timeout_secs, max_header_bytes); off without it. Takes
    /// effect at the next start. See `proxy_protocol`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<crate::ProxyProtocol>,
}

/// One entry of `allowed_connectors`: a name or thumbprint, or one bound to endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "a connector's certificate CN or SHA-1 thumbprint, or a table { name = \"...\", endpoints = [id, ...] }"
)]
pub enum AllowedConnector {
    /// May announce any endpoint no entry binds.
    Name(String),
    Bound(BoundConnector),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
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
pub(crate) fn is_thumbprint(name: &str) -> bool {
    name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn default_max_streams_per_device() -> usize {
    64
}

fn default_max_queued_requests() -> usize {
    crate::channels::DEFAULT_MAX_QUEUED_REQUESTS
}

fn default_stall_timeout() -> u64 {
    30
}

fn default_channel_unresponsive_after_ms() -> u64 {
    crate::channels::DEFAULT_UNRESPONSIVE_AFTER.as_millis() as u64
}

fn default_channel_keepalive_timeout_secs() -> u64 {
    crate::channels::DEFAULT_KEEPALIVE_TIMEOUT.as_secs()
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}

fn default_timeout() -> u64 {
    120
}

/// The connectors' longest redial backoff (30 s, `connector::dial`) and a few seconds for
/// the dial itself.
fn default_startup_grace() -> u64 {
    35
}

fn default_refused_body_drain_bytes() -> u64 {
    1024 * 1024
}

fn default_refused_body_drain_timeout() -> u64 {
    5
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
    /// The required keys; every other at the default a file without it gets (the same
    /// functions serde uses, so the two cannot differ).
    pub fn new(
        cert: PathBuf,
        key: PathBuf,
        trusted_roots: Vec<PathBuf>,
        connector_roots: Vec<PathBuf>,
        allowed_connectors: Vec<AllowedConnector>,
    ) -> GatewayConfig {
        GatewayConfig {
            listen: default_listen(),
            channel_listen: None,
            cert,
            key,
            trusted_roots,
            connector_roots,
            allowed_connectors,
            request_timeout_secs: default_timeout(),
            startup_grace_secs: default_startup_grace(),
            refused_body_drain_bytes: default_refused_body_drain_bytes(),
            refused_body_drain_timeout_secs: default_refused_body_drain_timeout(),
            verbose: false,
            log: logs::logger::LogSettings::default(),
            admin_listen: None,
            metrics_listen: None,
            probe: None,
            ready_endpoints: Vec::new(),
            worker_threads: None,
            verify_client_revocation: false,
            crls: Vec::new(),
            crl_policy: CrlPolicy::default(),
            tokens: None,
            tls: pki::tls::TlsPolicy::default(),
            client_cert_header: None,
            handshake_timeout_secs: default_handshake_timeout(),
            first_request_timeout_secs: default_first_request_timeout(),
            idle_timeout_secs: default_idle_timeout(),
            http2_keepalive_secs: default_http2_keepalive(),
            max_connections: default_max_connections(),
            max_connections_per_address: default_max_connections_per_address(),
            reserved_for_channels: default_reserved_for_channels(),
            max_request_header_bytes: default_max_request_header_bytes(),
            max_response_header_bytes: default_max_response_header_bytes(),
            max_streams_per_device: default_max_streams_per_device(),
            max_queued_requests: default_max_queued_requests(),
            device_idle_timeout_secs: default_stall_timeout(),
            connector_idle_timeout_secs: default_stall_timeout(),
            channel_unresponsive_after_ms: default_channel_unresponsive_after_ms(),
            channel_keepalive_timeout_secs: default_channel_keepalive_timeout_secs(),
            proxy_protocol: None,
        }
    }

    /// A gateway of a lab PKI as `portcullis pki init` lays it out, its paths relative to the
    /// lab's directory (write the file there, or [`GatewayConfig::resolve_paths`] first),
    /// letting in the lab's connector.
    pub fn lab() -> GatewayConfig {
        use pki::lab::layout;
        GatewayConfig::new(
            layout::GATEWAY_CERT.into(),
            layout::GATEWAY_KEY.into(),
            vec![layout::ROOT_CERT.into()],
            vec![layout::CONNECTOR_ROOTS.into()],
            vec![AllowedConnector::Name(pki::lab::CHANNEL_CN.into())],
        )
    }

    /// Writes the configuration file `load` reads.
    pub fn write(&self, path: &Path) -> Result<(), ConfigError> {
        config::write_toml(path, self)
    }

    /// Reads every relative path from `dir`, as `load` does from the file's directory.
    pub fn resolve_paths(&mut self, dir: &Path) {
        let resolve = |p: &PathBuf| config::resolve_in(dir, p);
        self.cert = resolve(&self.cert);
        self.key = resolve(&self.key);
        self.trusted_roots = self.trusted_roots.iter().map(resolve).collect();
        self.connector_roots = self.connector_roots.iter().map(resolve).collect();
        self.log.file = self.log.file.as_ref().map(resolve);
        self.crls = self.crls.iter().map(resolve).collect();
        if let Some(probe) = &mut self.probe {
            probe.device_cert = probe.device_cert.as_ref().map(resolve);
            probe.device_key = probe.device_key.as_ref().map(resolve);
            probe.ca = probe.ca.iter().map(resolve).collect();
        }
        if let Some(tokens) = &mut self.tokens {
            tokens.keys = tokens.keys.iter().map(resolve).collect();
            tokens.revoked = tokens.revoked.as_ref().map(resolve);
            for issuer in &mut tokens.oidc {
                issuer.ca = issuer.ca.iter().map(resolve).collect();
            }
        }
    }

    pub fn load(path: &Path) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::parse(&config::read_text(path)?, path)
    }

    /// What [`GatewayConfig::load`] does with the file's text once read: parsed and checked, its
    /// relative paths taken from `path`'s directory, and `path` named in every error.
    pub fn parse(text: &str, path: &Path) -> Result<GatewayConfig, ConfigError> {
        let mut cfg: GatewayConfig = config::parse_toml(text, path)?;
        cfg.resolve_paths(config::dir_of(path));
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
            .filter(|a| !runtime::admin::is_allowed_address(a))
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
        if cfg
            .tokens
            .as_ref()
            .is_some_and(|t| t.keys.is_empty() && t.oidc.is_empty())
        {
            return Err(invalid(
                "tokens.keys",
                "list at least one site public key (PEM) to check tokens with, or an OIDC issuer ([[tokens.oidc]])",
            ));
        }
        if let Some((key, reason)) = cfg.tokens.as_ref().and_then(token::oidc_problem) {
            return Err(invalid(key, &reason));
        }
        if let Some((key, reason)) = cfg.probe.as_ref().and_then(|p| p.problem()) {
            return Err(invalid(key, &reason));
        }
        if let Some((key, reason)) = cfg.proxy_protocol.as_ref().and_then(|p| p.problem()) {
            return Err(invalid(key, &reason));
        }
        if cfg
            .tokens
            .as_ref()
            .is_some_and(|t| t.leeway_secs > token::MAX_LEEWAY_SECS)
        {
            return Err(invalid(
                "tokens.leeway_secs",
                &format!("must be between 0 and {}", token::MAX_LEEWAY_SECS),
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
        if let Some(reason) = runtime::config::worker_threads_problem(cfg.worker_threads) {
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
        if cfg.startup_grace_secs > 3600 {
            return Err(invalid(
                "startup_grace_secs",
                "must be between 0 (none) and 3600",
            ));
        }
        if cfg.refused_body_drain_bytes > 1024 * 1024 * 1024 {
            return Err(invalid(
                "refused_body_drain_bytes",
                "must be between 0 (a refused body is never read: Connection: close) and 1073741824",
            ));
        }
        for (key, value, most) in [
            (
                "refused_body_drain_timeout_secs",
                cfg.refused_body_drain_timeout_secs,
                300,
            ),
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
        if let Some(reason) = runtime::admin::metrics_listen_problem(
            cfg.metrics_listen,
            &[
                ("listen", Some(cfg.listen)),
                ("channel_listen", cfg.channel_listen),
                ("admin_listen", cfg.admin_listen),
            ],
        ) {
            return Err(invalid("metrics_listen", &reason));
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
        if cfg.channel_keepalive_timeout_secs == 0 || cfg.channel_keepalive_timeout_secs > 3600 {
            return Err(invalid(
                "channel_keepalive_timeout_secs",
                "must be between 1 and 3600",
            ));
        }
        if !(20..=60_000).contains(&cfg.channel_unresponsive_after_ms)
            || cfg.channel_unresponsive_after_ms >= cfg.channel_keepalive_timeout_secs * 1000
        {
            return Err(invalid(
                "channel_unresponsive_after_ms",
                "must be between 20 and 60000, and less than channel_keepalive_timeout_secs",
            ));
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
pub(crate) fn client_cert_header(config: &GatewayConfig) -> Option<hyper::header::HeaderName> {
    config
        .client_cert_header
        .as_deref()
        .and_then(|name| client_cert_header_problem(name).ok())
}
