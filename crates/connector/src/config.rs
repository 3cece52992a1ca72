//! The connector's configuration file: `ConnectorConfig` and its endpoints, the defaults, and
//! the validation `load` does before anything starts.

use std::path::{Path, PathBuf};

use hyper::Uri;
use pki::crl::CrlPolicy;
use runtime::config::{self, ConfigError};
use serde::Deserialize;

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
    /// shard) and keeps the connections it was given; see `runtime::shards`. On a host shared
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
            .filter(|a| !runtime::admin::is_allowed_address(a))
        {
            return Err(invalid(
                "admin_listen",
                format!("{addr} is not a loopback address; the admin surface has no authentication of its own, so it listens on 127.0.0.1 or ::1 only"),
            ));
        }
        if let Some(reason) = runtime::config::worker_threads_problem(cfg.worker_threads) {
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

pub(crate) fn split_host_port(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}
