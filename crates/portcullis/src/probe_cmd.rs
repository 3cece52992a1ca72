//! `portcullis probe URL ...`: a device-side request.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use logs::cmtrace;
use probe::{self, ProbeOptions};

/// Make one request as a managed device does, and report it as the client's
/// LocationServices.log does.
///
/// On an HTTP error it prints the client's two lines
///   [CCMHTTP] ERROR: URL=..., Port=..., Options=31, Code=0, Text=CCM_E_BAD_HTTP_STATUS_CODE
///   [CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= CMGConnector_Clientcertificaterequired
/// and the explanation the gateway sent. A transport failure carries the WinHTTP code the
/// client would log (0x80072f8f TLS, 0x80072efd cannot connect, 0x80072ee2 timeout).
///
/// Exit status: 0 on a 2xx answer; 1 on any other answer or a transport failure; 2 on bad
/// usage or unreadable input (certificate files, URL).
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// A bearer token, for CCM_PROXY_SERVERAUTH routes.
    #[arg(long, value_name = "T")]
    pub token: Option<String>,
    /// Append the lines, in CMTrace format, to this log (e.g. LocationServices.log).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Write the response body here (up to 256 MiB).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
    /// Offer HTTP/2 (the Configuration Manager client uses HTTP/1.1).
    #[arg(long)]
    pub http2: bool,
}

/// What a device request needs: where, whom to trust, and the device's certificate. Shared by
/// `probe` and `bench load`.
#[derive(Args)]
pub struct DeviceArgs {
    /// The URL, e.g. https://localhost:8443/CCM_PROXY_MUTUALAUTH/72057594037927939/SMS_MP/.sms_aut?MPLIST
    pub url: String,
    /// Root CA(s) the gateway's server certificate must chain to (file or directory; repeat).
    #[arg(long, value_name = "F", required = true)]
    pub ca: Vec<PathBuf>,
    /// The device's client certificate (PEM), for CCM_PROXY_MUTUALAUTH routes.
    #[arg(long, value_name = "F", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert.
    #[arg(long, value_name = "F", requires = "cert")]
    pub key: Option<PathBuf>,
}

const MAX_OUTPUT_BODY: usize = 256 * 1024 * 1024;

pub fn run(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    let options = ProbeOptions {
        url: args.device.url.clone(),
        ca: args.device.ca.clone(),
        cert: args.device.cert.clone(),
        key: args.device.key.clone(),
        token: args.token.clone(),
        timeout: Duration::from_secs(args.timeout.max(1)),
        http2: args.http2,
        keep_body: if args.output.is_some() {
            MAX_OUTPUT_BODY
        } else {
            probe::DEFAULT_KEPT_BODY
        },
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let report = runtime.block_on(probe::probe(&options))?;
    for (_, line) in &report.lines {
        // The lines quote the server's answer: escaped as in the log, one line each.
        println!("{}", logs::escape::message(line));
    }
    if let Some(path) = &args.log {
        // Rolls over to LocationServices.lo_ like the client's own log.
        let file = cmtrace::RollingFile::open(path, cmtrace::DEFAULT_MAX_BYTES)
            .with_context(|| format!("{}: cannot open the log", path.display()))?;
        let now = time::OffsetDateTime::now_utc();
        let mut text = String::new();
        for (severity, line) in &report.lines {
            let entry = cmtrace::Line {
                message: line,
                component: "LocationServices",
                severity: *severity,
                thread: u64::from(std::process::id()),
                at: now,
            };
            text.push_str(&entry.format());
            text.push_str("\r\n");
        }
        file.append(&text)
            .with_context(|| format!("{}: cannot write the log", path.display()))?;
    }
    if let Some(path) = &args.output {
        std::fs::write(path, &report.body)
            .with_context(|| format!("{}: cannot write the body", path.display()))?;
    }
    Ok(if report.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
