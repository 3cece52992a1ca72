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
            verbose: false,
            log: logs::logger::LogSettings::default(),
            admin_listen: None,
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
        if let Some(tokens) = &mut self.tokens {
            tokens.keys = tokens.keys.iter().map(resolve).collect();
            tokens.revoked = tokens.revoked.as_ref().map(resolve);
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
        if cfg.tokens.as_ref().is_some_and(|t| t.keys.is_empty()) {
            return Err(invalid(
                "tokens.keys",
                "list at least one site public key (PEM) to check tokens with",
            ));
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
pub(crate) fn client_cert_header(config: &GatewayConfig) -> Option<hyper::header::HeaderName> {
    config
        .client_cert_header
        .as_deref()
        .and_then(|name| client_cert_header_problem(name).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use logs::logger::ConsoleSetting;
    use pki::tls::TlsVersion;

    /// The keys of `config` still at their value in `base`: a round trip that leaves a key
    /// alone would not notice the writer dropping or misspelling it.
    fn unchanged_keys(config: &GatewayConfig, base: &GatewayConfig) -> Vec<String> {
        let json = |c| serde_json::to_value(c).expect("a configuration is JSON");
        let (config, base) = (json(config), json(base));
        let base = base.as_object().expect("a table");
        let config = config.as_object().expect("a table");
        config
            .iter()
            .filter(|(key, value)| base.get(key.as_str()) == Some(value))
            .map(|(key, _)| key.clone())
            .collect()
    }

    #[test]
    fn a_written_configuration_loads_as_it_was_built() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = GatewayConfig::lab();
        config.listen = "127.0.0.1:8443".parse().unwrap();
        config.channel_listen = Some("127.0.0.1:8444".parse().unwrap());
        config.cert = "other/server.crt".into();
        config.key = "/etc/portcullis/server.key".into();
        config.trusted_roots.push("ca/second-root.crt".into());
        config
            .connector_roots
            .push("/etc/portcullis/connectors.crt".into());
        config
            .allowed_connectors
            .push(AllowedConnector::Bound(BoundConnector {
                name: "Branch Connector".into(),
                endpoints: vec![3456, 72057594037927939],
            }));
        config.request_timeout_secs = 30;
        config.verbose = true;
        config.log.file = Some("logs/SMS_Cloud_ProxyGateway.log".into());
        config.log.max_size_kib = 2048;
        config.log.console = ConsoleSetting::Off;
        config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        config.worker_threads = Some(3);
        config.verify_client_revocation = true;
        config.crls = vec!["ca/root.crl".into()];
        config.crl_policy = CrlPolicy::AllowAndWarn;
        let mut tokens = token::TokenSettings::new(vec!["site/token.pub".into()]);
        tokens.revoked = Some("site/revoked.txt".into());
        tokens.leeway_secs = 5;
        config.tokens = Some(tokens);
        config.tls.min_version = TlsVersion::Tls13;
        config.tls.cipher_suites = vec!["TLS13_AES_256_GCM_SHA384".into()];
        config.client_cert_header = Some("X-ARR-ClientCert".into());
        config.handshake_timeout_secs = 5;
        config.first_request_timeout_secs = 86_400;
        config.idle_timeout_secs = 600;
        config.http2_keepalive_secs = 0;
        config.max_connections = 100;
        config.max_connections_per_address = 10;
        config.reserved_for_channels = 8;
        config.max_request_header_bytes = 16 * 1024;
        config.max_response_header_bytes = 128 * 1024;
        config.max_streams_per_device = 4;
        config.max_queued_requests = 0;
        config.device_idle_timeout_secs = 5;
        config.connector_idle_timeout_secs = 7;
        let unchanged = unchanged_keys(&config, &GatewayConfig::lab());
        assert!(
            unchanged.is_empty(),
            "set these keys too, so that the round trip covers them: {unchanged:?}"
        );

        let path = dir.path().join("gateway.toml");
        config.write(&path).unwrap();
        let loaded = GatewayConfig::load(&path).unwrap();
        config.resolve_paths(dir.path());
        assert_eq!(loaded, config);
        assert!(loaded.log.file.as_ref().unwrap().starts_with(dir.path()));
        assert_eq!(loaded.key, Path::new("/etc/portcullis/server.key"));
    }

    #[test]
    fn the_lab_gateway_writes_only_what_it_sets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        GatewayConfig::lab().write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        // Options left out are not written (TOML has no null), enums in the file's spelling.
        assert!(
            !text.contains("tokens") && !text.contains("admin_listen"),
            "{text}"
        );
        assert!(text.contains("crl_policy = \"refuse\""), "{text}");
        assert!(text.contains("min_version = \"1.2\""), "{text}");
        assert!(
            text.contains("allowed_connectors = [\"Portcullis Connector Channel\"]"),
            "{text}"
        );
        let mut expected = GatewayConfig::lab();
        expected.resolve_paths(dir.path());
        assert_eq!(GatewayConfig::load(&path).unwrap(), expected);
    }

    #[test]
    fn new_has_the_defaults_of_a_file_with_only_the_required_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            "cert = \"server.crt\"\nkey = \"server.key\"\ntrusted_roots = [\"root.crt\"]\n\
             connector_roots = [\"connectors.crt\"]\nallowed_connectors = [\"Branch\"]\n\
             \n[tokens]\nkeys = [\"token.pub\"]\n",
        )
        .unwrap();
        let mut built = GatewayConfig::new(
            "server.crt".into(),
            "server.key".into(),
            vec!["root.crt".into()],
            vec!["connectors.crt".into()],
            vec![AllowedConnector::Name("Branch".into())],
        );
        built.tokens = Some(token::TokenSettings::new(vec!["token.pub".into()]));
        built.resolve_paths(dir.path());
        assert_eq!(GatewayConfig::load(&path).unwrap(), built);
    }
}
