//! The connector's configuration file: `ConnectorConfig` and its endpoints, the defaults, and
//! the validation `load` does before anything starts.

use std::path::{Path, PathBuf};

use hyper::Uri;
use pki::crl::CrlPolicy;
use runtime::config::{self, ConfigError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The endpoint id devices use in their URLs.
    pub id: u64,
    /// The site role, e.g. "SMS_MP".
    pub name: String,
    /// The internal base URL, e.g. "https://InternalMP.contoso.com".
    pub url: String,
}

/// `portcullis connector --config FILE`. Built in code with [`ConnectorConfig::new`] or
/// [`ConnectorConfig::lab`] and written with [`ConnectorConfig::write`]: what is written is
/// what `load` reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    /// Names this connector in the gateway's logs and ServiceMetadata.
    pub connector_id: String,
    /// Every gateway, as "host:port"; the connector holds channels to each instance. A host
    /// that is a DNS name stands for every address it resolves to (an instance set, such as
    /// a Kubernetes headless Service), resolved again every `gateway_resolve_secs`.
    pub gateways: Vec<String>,
    /// Seconds between resolutions of the `gateways` entries that are names (default 60, 1 to
    /// 3600); also the longest one resolution may take. A new instance gets its channels
    /// within this; one gone from the answer is let go (its channels drained).
    #[serde(default = "default_resolve_secs")]
    pub gateway_resolve_secs: u64,
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
    /// Seconds the connector waits for an endpoint's answer to begin, its connection and TLS
    /// handshake included (default 60): past it the device gets 504
    /// `CMGConnector_Endpointtimeout`. Announced to the gateways in the hello: keep it below
    /// their `request_timeout_secs` (120 by default), which would otherwise strike first with
    /// the gateway's 504 `CMGService_Connectortimeout` (the gateway warns when a channel opens).
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
    /// The local admin surface (`GET /status`, `PUT /verbose`, `POST /reload`, `GET /metrics`,
    /// `/healthz`, `/readyz`), loopback only.
    #[serde(default)]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// A second, read-only surface for probes and scrapes from outside the host (the kubelet,
    /// Prometheus): `GET`/`HEAD` of `/healthz`, `/readyz` and `/metrics` only, with the admin
    /// surface's answers, to any `Host`. Any address ("0.0.0.0:9100"); none by default. Takes
    /// effect at the next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Worker threads (default: one per CPU). Each runs its own single-threaded runtime (a
    /// shard) and keeps the connections it was given; see `runtime::shards`. On a host shared
    /// with other busy processes fewer are cheaper per request.
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

fn default_channels() -> usize {
    2
}
fn default_resolve_secs() -> u64 {
    60
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
    /// The required keys; every other at the default a file without it gets (the same
    /// functions serde uses, so the two cannot differ).
    // One argument per required key, so that none can be left out.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        connector_id: String,
        gateways: Vec<String>,
        gateway_roots: Vec<PathBuf>,
        channel_cert: PathBuf,
        channel_key: PathBuf,
        client_cert_store: PathBuf,
        allowed_roots: Vec<PathBuf>,
        endpoint_roots: Vec<PathBuf>,
        endpoints: Vec<EndpointConfig>,
    ) -> ConnectorConfig {
        ConnectorConfig {
            connector_id,
            gateways,
            gateway_resolve_secs: default_resolve_secs(),
            gateway_server_name: None,
            gateway_roots,
            channels_per_gateway: default_channels(),
            channels_follow_gateway_threads: default_true(),
            channel_cert,
            channel_key,
            client_cert_store,
            allowed_roots,
            pfx_password_env: default_pfx_env(),
            endpoint_roots,
            endpoint_crls: Vec::new(),
            endpoint_crl_policy: CrlPolicy::default(),
            endpoints,
            endpoint_timeout_secs: default_endpoint_timeout(),
            max_request_header_bytes: default_max_request_header_bytes(),
            verbose: false,
            log: logs::logger::LogSettings::default(),
            admin_listen: None,
            metrics_listen: None,
            worker_threads: None,
        }
    }

    /// The connector of a lab PKI as `portcullis pki init` lays it out, its paths relative to
    /// the lab's directory (write the file there, or [`ConnectorConfig::resolve_paths`]
    /// first): the lab root trusted for gateways, client certificates and endpoints alike.
    pub fn lab(
        connector_id: impl Into<String>,
        gateways: Vec<String>,
        endpoints: Vec<EndpointConfig>,
    ) -> ConnectorConfig {
        use pki::lab::layout;
        ConnectorConfig::new(
            connector_id.into(),
            gateways,
            vec![layout::ROOT_CERT.into()],
            layout::CHANNEL_CERT.into(),
            layout::CHANNEL_KEY.into(),
            layout::CONNECTOR_STORE.into(),
            vec![layout::ROOT_CERT.into()],
            vec![layout::ROOT_CERT.into()],
            endpoints,
        )
    }

    /// Writes the configuration file `load` reads.
    pub fn write(&self, path: &Path) -> Result<(), ConfigError> {
        config::write_toml(path, self)
    }

    /// Reads every relative path from `dir`, as `load` does from the file's directory.
    pub fn resolve_paths(&mut self, dir: &Path) {
        let resolve = |p: &PathBuf| config::resolve_in(dir, p);
        let resolve_all = |paths: &[PathBuf]| paths.iter().map(resolve).collect::<Vec<_>>();
        self.gateway_roots = resolve_all(&self.gateway_roots);
        self.allowed_roots = resolve_all(&self.allowed_roots);
        self.endpoint_roots = resolve_all(&self.endpoint_roots);
        self.endpoint_crls = resolve_all(&self.endpoint_crls);
        self.channel_cert = resolve(&self.channel_cert);
        self.channel_key = resolve(&self.channel_key);
        self.client_cert_store = resolve(&self.client_cert_store);
        self.log.file = self.log.file.as_ref().map(resolve);
    }

    pub fn load(path: &Path) -> Result<ConnectorConfig, ConfigError> {
        ConnectorConfig::parse(&config::read_text(path)?, path)
    }

    /// What [`ConnectorConfig::load`] does with the file's text once read: parsed and checked, its
    /// relative paths taken from `path`'s directory, and `path` named in every error.
    pub fn parse(text: &str, path: &Path) -> Result<ConnectorConfig, ConfigError> {
        let mut cfg: ConnectorConfig = config::parse_toml(text, path)?;
        cfg.resolve_paths(config::dir_of(path));
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
        if let Some(reason) = runtime::admin::metrics_listen_problem(
            cfg.metrics_listen,
            &[("admin_listen", cfg.admin_listen)],
        ) {
            return Err(invalid("metrics_listen", reason));
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
        if !(1..=3600).contains(&cfg.gateway_resolve_secs) {
            return Err(invalid(
                "gateway_resolve_secs",
                "must be between 1 and 3600".into(),
            ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use logs::logger::ConsoleSetting;

    fn mp_endpoint() -> EndpointConfig {
        EndpointConfig {
            id: 72057594037927939,
            name: "SMS_MP".into(),
            url: "https://localhost:8443".into(),
        }
    }

    #[test]
    fn a_written_configuration_loads_as_it_was_built() {
        let dir = tempfile::tempdir().unwrap();
        let lab = ConnectorConfig::lab("lab", vec!["localhost:443".into()], vec![mp_endpoint()]);
        let mut config = lab.clone();
        config.connector_id = "branch-connector".into();
        config.gateways.push("[::1]:8443".into());
        config.gateway_server_name = Some("cmg.contoso.com".into());
        config.gateway_resolve_secs = 30;
        config.gateway_roots = vec!["/etc/portcullis/gateway-root.crt".into()];
        config.channels_per_gateway = 4;
        config.channels_follow_gateway_threads = false;
        config.channel_cert = "other/channel.crt".into();
        config.channel_key = "other/channel.key".into();
        config.client_cert_store = "other/store".into();
        config.allowed_roots.push("ca/second-root.crt".into());
        config.pfx_password_env = "BRANCH_PFX_PASSWORD".into();
        config.endpoint_roots = vec!["ca/endpoint-root.crt".into()];
        config.endpoint_crls = vec!["ca/endpoint-root.crl".into()];
        config.endpoint_crl_policy = CrlPolicy::AllowAndWarn;
        config.endpoints.push(EndpointConfig {
            id: 72057594037927940,
            name: "SMS_DP_SMSPKG$".into(),
            url: "https://dp.contoso.com:443/".into(),
        });
        config.endpoint_timeout_secs = 5;
        config.max_request_header_bytes = 16 * 1024;
        config.verbose = true;
        config.log.file = Some("logs/SMS_Cloud_ProxyConnector.log".into());
        config.log.max_size_kib = 2048;
        config.log.console = ConsoleSetting::Json;
        config.admin_listen = Some("[::1]:0".parse().unwrap());
        config.worker_threads = Some(2);
        let unchanged = config::keys_with_equal_values(&config, &lab);
        assert!(
            unchanged.is_empty(),
            "set these keys too, so that the round trip covers them: {unchanged:?}"
        );

        let path = dir.path().join("connector.toml");
        config.write(&path).unwrap();
        let loaded = ConnectorConfig::load(&path).unwrap();
        config.resolve_paths(dir.path());
        assert_eq!(loaded, config);
        assert_eq!(
            loaded.gateway_roots,
            vec![PathBuf::from("/etc/portcullis/gateway-root.crt")]
        );
    }

    #[test]
    fn the_lab_connector_loads_from_the_lab_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("connector.toml");
        let config = ConnectorConfig::lab("lab", vec!["localhost:443".into()], vec![mp_endpoint()]);
        config.write(&path).unwrap();
        let loaded = ConnectorConfig::load(&path).unwrap();
        assert_eq!(
            loaded.channel_cert,
            dir.path().join(pki::lab::layout::CHANNEL_CERT)
        );
        let mut expected = config;
        expected.resolve_paths(dir.path());
        assert_eq!(loaded, expected);
    }

    #[test]
    fn new_has_the_defaults_of_a_file_with_only_the_required_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("connector.toml");
        std::fs::write(
            &path,
            "connector_id = \"c\"\ngateways = [\"localhost:443\"]\ngateway_roots = [\"g.crt\"]\n\
             channel_cert = \"channel.crt\"\nchannel_key = \"channel.key\"\n\
             client_cert_store = \"store\"\nallowed_roots = [\"a.crt\"]\n\
             endpoint_roots = [\"e.crt\"]\n\n[[endpoints]]\nid = 72057594037927939\n\
             name = \"SMS_MP\"\nurl = \"https://localhost:8443\"\n",
        )
        .unwrap();
        let mut built = ConnectorConfig::new(
            "c".into(),
            vec!["localhost:443".into()],
            vec!["g.crt".into()],
            "channel.crt".into(),
            "channel.key".into(),
            "store".into(),
            vec!["a.crt".into()],
            vec!["e.crt".into()],
            vec![mp_endpoint()],
        );
        built.resolve_paths(dir.path());
        assert_eq!(ConnectorConfig::load(&path).unwrap(), built);
    }
}

#[cfg(test)]
mod resolve_tests {
    use super::*;

    /// `gateway_resolve_secs` outside 1..=3600 is refused at load, naming the key; 60 by default.
    #[test]
    fn the_resolve_interval_has_a_default_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("connector.toml");
        let mut config = ConnectorConfig::lab(
            "c",
            vec!["gw.contoso.com:443".into()],
            vec![EndpointConfig {
                id: 7,
                name: "SMS_MP".into(),
                url: "https://localhost:8443".into(),
            }],
        );
        assert_eq!(config.gateway_resolve_secs, 60);
        for (secs, accepted) in [(0, false), (1, true), (3600, true), (3601, false)] {
            config.gateway_resolve_secs = secs;
            config.write(&path).unwrap();
            match ConnectorConfig::load(&path) {
                Ok(loaded) => {
                    assert!(accepted, "{secs} accepted");
                    assert_eq!(loaded.gateway_resolve_secs, secs);
                }
                Err(e) => {
                    assert!(!accepted, "{secs}: {e}");
                    let text = e.to_string();
                    assert!(
                        text.contains("gateway_resolve_secs") && text.contains("1 and 3600"),
                        "{text}"
                    );
                }
            }
        }
    }
}
