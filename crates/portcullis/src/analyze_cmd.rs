//! `portcullis analyze --config FILE`: the connection analyzer.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use analyzer::{AnalyzeOptions, LocalStore, TokenSource};
use anyhow::Context;
use clap::Args;
use runtime::config::{self, ConfigError};
use serde::{Deserialize, Serialize};

/// Check every hop a device's request takes, in order, and stop at the first that fails.
///
/// Steps: 1 name resolution of the gateway, 2 TCP, 3 TLS with the gateway's server
/// certificate (chain, name, expiry), 4 device authentication, 5 ServiceMetadata, 6 a live
/// channel for the endpoint, 7 the connector's client certificate, 8 a real request to the
/// endpoint. Each prints PASS or FAIL and its time; a failure prints its cause and its fix.
///
/// With --token or --token-command the device presents a token on CCM_PROXY_SERVERAUTH
/// instead of a certificate (the file's device_cert and device_key are then not used): step 4
/// is the token, checked with the real request to the endpoint; it shows the gateway's answer
/// (401 CMGService_Invalid_Token names the check that failed) and the claims that decide it
/// (alg, kid, iss, aud, sub, tid, exp and nbf with the time left) as the token states them,
/// unverified. A token that is not a JWT (not three parts, not base64url, not JSON) fails
/// step 4 naming what is wrong, without being sent. ServiceMetadata and the last request take
/// the token's route too.
///
/// Configuration (TOML; paths relative to the file; `portcullis dev` writes one):
///
///   gateway = "https://cmg.contoso.com"      # as devices name it; port 443 unless given
///   ca = ["ca/root.crt"]                     # roots devices trust for the gateway
///   endpoint = 72057594037927939             # the endpoint id
///   path = "SMS_MP/.sms_aut?MPLIST"          # optional; the request to make
///   device_cert = "devices/device-001.crt"   # a device's client certificate and key
///   device_key = "devices/device-001.key"
///   timeout_secs = 10                        # optional; per step
///   connector_config = "connector.toml"      # optional, when run beside the connector:
///                                            # its store is checked here too
///
/// Exit status: 0 when every step passed, 1 when one failed, 2 on a bad configuration.
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct AnalyzeArgs {
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Print the steps as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// A device token (JWT) to present on CCM_PROXY_SERVERAUTH instead of the certificate.
    /// Visible to other users in the process list: prefer --token-command.
    #[arg(long, value_name = "TOKEN", conflicts_with = "token_command")]
    pub token: Option<String>,
    /// A command (run with sh -c) printing the device token on standard output; its output
    /// is trimmed. It must finish within timeout_secs, exit 0 and print something.
    #[arg(long, value_name = "CMD")]
    pub token_command: Option<String>,
}

/// The file `analyze --config` reads (see [`AnalyzeArgs`]); `portcullis dev` writes one.
#[derive(Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AnalyzeConfig {
    pub(crate) gateway: String,
    pub(crate) ca: Vec<PathBuf>,
    pub(crate) endpoint: u64,
    #[serde(default = "default_path")]
    pub(crate) path: String,
    #[serde(default)]
    pub(crate) device_cert: Option<PathBuf>,
    #[serde(default)]
    pub(crate) device_key: Option<PathBuf>,
    #[serde(default = "default_timeout")]
    pub(crate) timeout_secs: u64,
    #[serde(default)]
    pub(crate) connector_config: Option<PathBuf>,
}

impl AnalyzeConfig {
    /// The required keys; every other at the default a file without it gets.
    pub(crate) fn new(gateway: String, ca: Vec<PathBuf>, endpoint: u64) -> AnalyzeConfig {
        AnalyzeConfig {
            gateway,
            ca,
            endpoint,
            path: default_path(),
            device_cert: None,
            device_key: None,
            timeout_secs: default_timeout(),
            connector_config: None,
        }
    }

    /// Writes the configuration file `analyze --config` reads.
    pub(crate) fn write(&self, path: &Path) -> Result<(), ConfigError> {
        config::write_toml(path, self)
    }
}

fn default_path() -> String {
    "SMS_MP/.sms_aut?MPLIST".into()
}

fn default_timeout() -> u64 {
    10
}

fn load(path: &Path, token: Option<TokenSource>) -> Result<AnalyzeOptions, ConfigError> {
    let cfg: AnalyzeConfig = config::load_toml(path)?;
    let invalid = |key, reason: &str| ConfigError::Invalid {
        path: path.to_path_buf(),
        key,
        reason: reason.to_string(),
    };
    if cfg.ca.is_empty() {
        return Err(invalid(
            "ca",
            "list the root CA file(s) devices trust for the gateway",
        ));
    }
    if cfg.device_cert.is_some() != cfg.device_key.is_some() {
        return Err(invalid(
            "device_cert",
            "device_cert and device_key go together",
        ));
    }
    if cfg.timeout_secs == 0 || cfg.timeout_secs > 300 {
        return Err(invalid("timeout_secs", "must be between 1 and 300"));
    }
    if !cfg.gateway.starts_with("https://") {
        return Err(invalid(
            "gateway",
            "give the gateway as devices name it: https://host[:port]",
        ));
    }
    let connector_store = match &cfg.connector_config {
        Some(file) => {
            let file = config::resolve(path, file);
            let connector = connector::run::ConnectorConfig::load(&file)?;
            Some(LocalStore {
                store: connector.client_cert_store,
                allowed_roots: connector.allowed_roots,
                pfx_password_env: connector.pfx_password_env,
            })
        }
        None => None,
    };
    let resolve = |p: &PathBuf| config::resolve(path, p);
    Ok(AnalyzeOptions {
        gateway: cfg.gateway,
        ca: cfg.ca.iter().map(resolve).collect(),
        endpoint: cfg.endpoint,
        path: cfg.path,
        device_cert: cfg.device_cert.as_ref().map(resolve),
        device_key: cfg.device_key.as_ref().map(resolve),
        token,
        timeout: Duration::from_secs(cfg.timeout_secs),
        connector_store,
    })
}

pub fn run(args: AnalyzeArgs) -> anyhow::Result<ExitCode> {
    let token = match (args.token, args.token_command) {
        (Some(token), _) => Some(TokenSource::Value(token)),
        (None, Some(command)) => Some(TokenSource::Command(command)),
        (None, None) => None,
    };
    let options = load(&args.config, token)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let analysis = runtime.block_on(analyzer::analyze(&options))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&analysis)?);
    } else {
        print!("{}", analysis.render_text());
    }
    Ok(if analysis.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_has_the_defaults_of_a_file_with_only_the_required_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("analyze.toml");
        std::fs::write(
            &path,
            "gateway = \"https://localhost:8443\"\nca = [\"ca/root.crt\"]\nendpoint = 72057594037927939\n",
        )
        .unwrap();
        let built = AnalyzeConfig::new(
            "https://localhost:8443".into(),
            vec!["ca/root.crt".into()],
            72057594037927939,
        );
        assert_eq!(config::load_toml::<AnalyzeConfig>(&path).unwrap(), built);
    }

    #[test]
    fn a_written_configuration_loads_as_it_was_built() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("analyze.toml");
        let mut built = AnalyzeConfig::new("https://cmg.contoso.com".into(), vec![], 3);
        built.ca = vec!["ca/root.crt".into(), "/etc/ca/other.crt".into()];
        built.path = "SMS_MP/.sms_aut?SITESIGNCERT".into();
        built.device_cert = Some("devices/device-001.crt".into());
        built.device_key = Some("devices/device-001.key".into());
        built.timeout_secs = 3;
        built.connector_config = Some("connector.toml".into());
        built.write(&path).unwrap();
        assert_eq!(config::load_toml::<AnalyzeConfig>(&path).unwrap(), built);
    }
}
