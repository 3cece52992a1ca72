//! `portcullis bench ...`: load, idle connections, and the side-by-side comparison.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bench::load::{LoadOptions, Mode};
use clap::{Args, Subcommand, ValueEnum};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Drive a gateway (or any HTTPS server) with device requests and report throughput and
    /// latency.
    ///
    /// Each connection is a device with mutual TLS making HTTP/1.1 GET requests: kept alive
    /// (--mode keepalive) or with a new TCP connection and TLS handshake for every request
    /// (--mode handshake). Closed loop by default (each connection sends its next request when
    /// the last is answered); --rate sets a fixed total rate instead, with latency measured from
    /// when each request was due. Runs for --duration or --requests, whichever ends first
    /// (default 10 s), with a progress line on standard error.
    ///
    /// Prints requests/s, latency p50/p90/p99/p99.9/max (HdrHistogram) and errors by status
    /// text; --json prints the same as one object.
    ///
    /// Exit status: 0 when every request got a 2xx answer; 1 when any failed; 2 on bad usage.
    Load(LoadArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Keepalive,
    Handshake,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Keepalive => Mode::Keepalive,
            ModeArg::Handshake => Mode::Handshake,
        }
    }
}

#[derive(Args)]
pub struct LoadArgs {
    /// e.g. https://localhost:8443/CCM_PROXY_MUTUALAUTH/72057594037927939/SMS_MP/.sms_aut?MPLIST
    pub url: String,
    /// Root CA(s) the server's certificate must chain to.
    #[arg(long, value_name = "F", required = true)]
    pub ca: Vec<PathBuf>,
    /// The device's client certificate (PEM) and key.
    #[arg(long, value_name = "F", requires = "key")]
    pub cert: Option<PathBuf>,
    #[arg(long, value_name = "F", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Concurrent connections.
    #[arg(long, short = 'c', value_name = "N", default_value_t = 32)]
    pub connections: usize,
    #[arg(long, value_enum, default_value_t = ModeArg::Keepalive)]
    pub mode: ModeArg,
    /// Total requests per second (default: as fast as answers come).
    #[arg(long, value_name = "RPS")]
    pub rate: Option<f64>,
    /// How long to run, in seconds.
    #[arg(long, short = 'd', value_name = "SECS")]
    pub duration: Option<f64>,
    /// How many requests to make.
    #[arg(long, short = 'n', value_name = "N")]
    pub requests: Option<u64>,
    /// In handshake mode, resume TLS sessions as devices do (default: a full handshake each
    /// time).
    #[arg(long)]
    pub tls_resumption: bool,
    /// Seconds a request may take before it counts as an error.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub timeout: f64,
    #[arg(long)]
    pub json: bool,
}

fn seconds(value: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{what}: {value} is not a positive number of seconds"))
}

pub fn run(command: BenchCommand) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Load(args) => load(args),
    }
}

fn load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let options = LoadOptions {
        url: args.url,
        ca: args.ca,
        cert: args.cert,
        key: args.key,
        connections: args.connections,
        mode: args.mode.into(),
        rate: args.rate,
        duration: args.duration.map(|d| seconds(d, "--duration")).transpose()?,
        requests: args.requests,
        tls_resumption: args.tls_resumption,
        timeout: seconds(args.timeout, "--timeout")?,
        progress: true,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let report = runtime.block_on(bench::load::run(&options))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render_text());
    }
    Ok(if report.errors == 0 && report.ok > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
