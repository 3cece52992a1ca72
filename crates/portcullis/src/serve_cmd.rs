//! `portcullis gateway` and `portcullis connector`: run one component until Ctrl-C, logging
//! to standard output and, with `--log`, to a CMTrace file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use logs::cmtrace::{FileLog, Severity};

/// Run a gateway instance.
///
/// One TLS port serves devices (HTTP/1.1 and HTTP/2) and connector channels (ALPN
/// portcullis-tunnel/1). Configuration (TOML; paths relative to the file):
///
///   listen = "0.0.0.0:443"                  # optional; this is the default
///   cert = "gateway/server.crt"
///   key = "gateway/server.key"
///   trusted_roots = ["ca/root.crt"]          # device certificates chain to these
///   connector_roots = ["ca/root.crt"]        # optional; default trusted_roots
///   allowed_connectors = ["Portcullis Connector Channel"]   # CN or SHA-1 thumbprint
///   request_timeout_secs = 120               # optional
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct GatewayArgs {
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Also write the service log, in CMTrace format, here.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
}

/// Run a connector.
///
/// Picks its client authentication certificate with the filter chain, dials every gateway
/// (channels_per_gateway each, reconnecting with backoff and jitter) and forwards requests to
/// its endpoints. Configuration (TOML; paths relative to the file):
///
///   connector_id = "connector-1"
///   gateways = ["cmg.contoso.com:443"]
///   gateway_roots = ["ca/root.crt"]
///   channel_cert = "connector/channel.crt"
///   channel_key = "connector/channel.key"
///   client_cert_store = "connector/store"
///   allowed_roots = ["ca/root.crt"]
///   endpoint_roots = ["ca/root.crt"]
///   verbose = false                          # true: log the whole filter trail
///
///   [[endpoints]]
///   id = 72057594037927939
///   name = "SMS_MP"
///   url = "https://InternalMP.contoso.com"
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct ConnectorArgs {
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Also write the log, in CMTrace format, here (e.g. SMS_Cloud_ProxyConnector.log).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
}

/// A log that appends each line to a CMTrace file when one is given and, when `console`,
/// prints it with its time.
pub fn log_to(
    component: &'static str,
    file: Option<&PathBuf>,
    console: bool,
) -> anyhow::Result<logs::Log> {
    let file = match file {
        Some(path) => Some(
            FileLog::open(path, component)
                .with_context(|| format!("{}: cannot open the log", path.display()))?,
        ),
        None => None,
    };
    Ok(Arc::new(move |severity: u8, line: &str| {
        if let Some(file) = &file {
            // A full disk must not stop the service; the console still has the line.
            let _ = file.write(Severity::from_number(severity), line);
        }
        if !console {
            return;
        }
        let now = time::OffsetDateTime::now_utc();
        let level = match severity {
            1 => "info",
            2 => "warning",
            _ => "error",
        };
        println!(
            "{:02}:{:02}:{:02}.{:03} {component} {level}: {line}",
            now.hour(),
            now.minute(),
            now.second(),
            now.millisecond()
        );
    }))
}

pub fn gateway(args: GatewayArgs) -> anyhow::Result<ExitCode> {
    let config = gateway::GatewayConfig::load(&args.config)?;
    let log = log_to("SMS_CLOUD_PROXY_GATEWAY", args.log.as_ref(), true)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let running = gateway::start(config, log).await?;
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        running.stop().await;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn connector(args: ConnectorArgs) -> anyhow::Result<ExitCode> {
    let config = connector::run::ConnectorConfig::load(&args.config)?;
    let log = log_to("SMS_CLOUD_PROXYCONNECTOR", args.log.as_ref(), true)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let running = connector::run::start(config, log).await?;
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        running.stop().await;
        Ok(ExitCode::SUCCESS)
    })
}
