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
    /// A fleet: --devices N --rate R --issuer-key ca/root.key: N devices, each with a
    /// certificate of its own (issued at the start) and one kept-alive connection, all
    /// connected before the clock starts, polling R requests/s in all (open loop: each device
    /// every N/R seconds, latency from when its request was due).
    ///
    /// Prints requests/s, latency p50/p90/p99/p99.9/max (HdrHistogram) and errors by status
    /// text; --json prints the same as one object.
    ///
    /// Exit status: 0 when every request got a 2xx answer; 1 when any failed; 2 on bad usage.
    Load(LoadArgs),
    /// Hold many idle device connections (mutual TLS) to a set of gateway instances and report
    /// their memory per connection and how fast they opened.
    ///
    /// Starts its own gateway processes (a fresh lab PKI in a temporary directory), --instances
    /// of them, instance k on 127.0.0.k, and reads their resident memory. Load-generator
    /// processes (this binary again) issue a device certificate for each connection (rcgen,
    /// ECDSA P-256) and open --count connections, spread evenly over the instances, from source
    /// addresses spread over 127.0.1.0 and up (1,000 per address); they hold them for --hold
    /// seconds, and the instances' memory is read again. Each connection is one open file in a
    /// load generator and one in a gateway instance: as many load generators run as the hard
    /// open-file limit (`ulimit -Hn`) needs, and each instance must fit its share under it.
    ///
    /// Prints a table: held, RSS before and after and KiB per connection for each instance and
    /// for all; --json prints the same as one object ("held", "rss_per_connection_kib",
    /// "instances": [{"address", "held", "rss_per_connection_kib", ...}], "opened_per_s", ...).
    ///
    /// Exit status: 0 when every connection opened and was still open after the hold; 1
    /// otherwise; 2 on bad usage.
    Connections(ConnectionsArgs),
    /// A load generator of `bench connections` (its own protocol on standard input and
    /// output; not for use by hand).
    #[command(hide = true, name = "connections-worker")]
    ConnectionsWorker,
    /// Measure Portcullis side by side with nginx+rathole and nginx, behind the same management
    /// point, under the same load.
    ///
    /// One run on loopback, all state in a temporary directory (removed at the end unless
    /// --keep): a lab PKI, one reference management point (`portcullis mp`, client
    /// certificates required) shared by every system, then for each system, mode and
    /// connection count a fresh start, a wait until it answers (at most 20 s), --warmup
    /// seconds of load, --duration seconds measured, and a stop. Systems:
    ///
    ///   direct          devices straight to the management point (the floor; no proxy)
    ///   portcullis      device -> gateway -> channel -> connector -> management point
    ///   nginx+rathole   nginx terminating device mutual TLS, proxying over TLS (the
    ///                   connector's client-auth certificate, upstream keep-alive pool) into a
    ///                   rathole tunnel (plain TCP transport) whose client sits beside the
    ///                   management point
    ///   nginx           nginx as a single-hop mutual-TLS reverse proxy
    ///
    /// Modes: keepalive (HTTP/1.1 keep-alive) and handshake (a new TCP connection and full TLS
    /// handshake per request). Every run: --connections devices with certificate device-001,
    /// closed loop, GET /SMS_MP/.sms_aut?MPLIST. A list (-c 32,128) runs each count in turn
    /// and adds a devices column; ratios compare rows at the same count.
    ///
    /// A fleet, open loop: --devices N --rate R. N devices, each with a certificate of its
    /// own (issued at the start) and one kept-alive connection, from source addresses spread
    /// over 127.0.2.0 and up, all connected before the clock starts; then --warmup seconds and
    /// --duration seconds measured on the same connections, R requests/s in all, latency
    /// measured from each request's due time (no coordinated omission), CPU time read at the
    /// measured run's start and end. E.g. --devices 1000,10000 --rate 2000.
    ///
    /// Prints one table: req/s, p50/p99 latency, the CPU seconds (user + system over the
    /// measured run), the same per request answered (microseconds: what the system itself
    /// spends on one, apart from the load generator and the management point that share the
    /// machine) and summed peak RSS (VmHWM) of the system's own processes (nginx's workers
    /// included; "-" for direct), errors, and each row's req/s relative to portcullis in the
    /// same mode. --json prints {"rows":[{"system", "mode", "rps", "p50_ms", "p99_ms",
    /// "cpu_s", "cpu_us_per_request", "peak_rss_mib", "errors", ...}], "skipped": [...],
    /// "failed": [...]}.
    ///
    /// On a shared machine one run can be 20% off the next. --rounds N runs the whole
    /// sequence N times, systems in turn, and reports each system's median round, with every
    /// round's req/s ("rps_rounds" in JSON): e.g. --rounds 5 -d 6 --modes keepalive.
    ///
    /// Tools: nginx (Debian's /usr/sbin/nginx, or on PATH) and rathole (on PATH, or
    /// target/bench-tools/bin/rathole). scripts/install-bench-tools.sh installs both
    /// (apt-get install nginx; cargo install rathole --root target/bench-tools). A system
    /// whose tool is missing is skipped with a line saying so.
    ///
    /// The load generator runs in this process, on the same machine: the figures are only
    /// comparable with each other, and only when the machine is otherwise idle. Use a release
    /// build (cargo build --release -p portcullis).
    ///
    /// Exit status: 0 when every run completed with no errors; 1 when a run failed or had
    /// errors, or a requested system was skipped; 2 on bad usage.
    #[command(verbatim_doc_comment)]
    Compare(CompareArgs),
    /// The fault drill: inject faults into a lab under steady device load, and report what
    /// devices saw against what the design promises.
    ///
    /// Brings up its own lab on loopback, all state in a temporary directory (removed at the
    /// end unless --keep): a lab PKI, two gateway instances, two connectors each holding 2
    /// channels to both, the reference management point (its W3C log records every request's
    /// id), each a process of this binary. --devices devices (each its own certificate and
    /// kept-alive connection, split over the two gateways, taking the other one when a new
    /// connection to theirs fails) send --rate requests/s in all: GETs, and POSTs with a body,
    /// each with a unique id. Then each fault in turn, held --duration seconds:
    ///
    ///   kill-connector        kill -9 of one of two connectors (restarted after)
    ///   kill-all-connectors   kill -9 of both (restarted after)
    ///   stop-connector        SIGSTOP of one connector past the channel keep-alive bound,
    ///                         then SIGCONT
    ///   kill-gateway          kill -9 of one gateway instance (restarted after)
    ///   endpoint-down         the management point killed (restarted after)
    ///   endpoint-hang         a quarter of requests to an endpoint that accepts and never
    ///                         answers
    ///   endpoint-slow-body    a quarter of requests to a path whose body trickles
    ///   reload-gateway        SIGHUP of both gateways under load, twice
    ///   reload-connector      SIGHUP of one connector under load, twice (its hello changes)
    ///   log-disk-full         gateway-1's log on a full tmpfs (needs mount; else skipped)
    ///
    /// For each fault: requests sent, answered 2xx, answered with each status text (named),
    /// transport errors, hung (no answer within the deadline), duplicated (a POST that reached
    /// the management point twice), recovery_ms (from the fault, or its repair when it takes
    /// the whole path down, to the first 2xx after it), the bound the design promises and the
    /// figure measured against it, and every target missed. Targets: nothing hung, nothing
    /// duplicated, every failure named and one the fault may cause (transport errors only for
    /// requests on connections of a process killed), the bound met. --json prints
    /// {"faults":[{"fault","sent","ok","named":{...},"transport_errors","hung","duplicated",
    /// "recovery_ms","bound_ms","measured_ms","bound_met","targets_missed":[...]...}]}.
    ///
    /// --soak MINUTES runs the load that long with a fault at the start of every minute
    /// (cycling through --faults; by default every fault but kill-all-connectors, so that
    /// gateway-1 and connector-1 live throughout), and reads the gateways' and connectors'
    /// resident memory (VmRSS) and open descriptors after a warm-up (each fault once, then
    /// --warmup seconds of load) and at the end: a process that lived through it must grow at
    /// most 5%.
    ///
    /// Use a release build for figures (cargo build --release -p portcullis).
    ///
    /// Exit status: 0 when every target was met; 1 when one was missed; 2 on bad usage.
    #[command(verbatim_doc_comment)]
    Faults(FaultsArgs),
}

#[derive(Args)]
pub struct FaultsArgs {
    /// Faults to inject, in this order, comma-separated (default: all).
    #[arg(long, value_name = "FAULT[,FAULT...]", value_delimiter = ',')]
    pub faults: Vec<String>,
    /// Seconds each fault is held.
    #[arg(long, short = 'd', value_name = "SECS", default_value_t = 3.0)]
    pub duration: f64,
    /// Devices, each with its own connection.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub devices: usize,
    /// Requests per second over all devices.
    #[arg(long, value_name = "RPS", default_value_t = 80.0)]
    pub rate: f64,
    /// Run for this many minutes, a fault every minute, and check the processes' growth.
    #[arg(long, value_name = "MINUTES", value_parser = clap::value_parser!(u64).range(1..=1440))]
    pub soak: Option<u64>,
    /// Seconds of steady load before the soak's first reading (after each fault once): the
    /// connectors' memory rises over their first minutes of load before it levels off.
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    pub warmup: f64,
    /// Keep the temporary directory (configurations, logs, lab PKI) and print where it is.
    #[arg(long)]
    pub keep: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ConnectionsArgs {
    /// How many connections.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub count: usize,
    /// Gateway instances, on 127.0.0.1, 127.0.0.2, ...; the connections are spread evenly.
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub instances: u16,
    /// Connections per load-generator process (default: as many as the open-file limit
    /// allows, less 512).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub per_process: Option<u64>,
    /// Handshakes in flight at once while opening (1 to 65536).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub concurrency: u32,
    /// Seconds to hold them before measuring.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub hold: f64,
    /// Once all are open, each connection makes one keep-alive request (the gateway's
    /// ServiceMetadata) and then idles, as a device does between polls; without it they idle
    /// from the handshake. The gateway closes a kept-alive HTTP/1.1 connection after 30 s
    /// idle, so --hold less than that.
    #[arg(long)]
    pub request: bool,
    /// Distinct device certificates, used in turn (default: one per connection, as a fleet
    /// has; they are issued at the start, a few seconds for tens of thousands). Fewer make
    /// connections share a certificate and the gateway's cached judgement of it.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub devices: Option<u64>,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
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
    #[command(flatten)]
    pub device: crate::probe_cmd::DeviceArgs,
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
    /// A fleet of N devices instead of --connections: each its own certificate (issued at the
    /// start by --issuer-key) and its own kept-alive connection, all connected before the
    /// clock starts, from source addresses spread over 127.0.2.0 and up (500 each) when the
    /// server is on loopback.
    #[arg(long, value_name = "N", conflicts_with_all = ["connections", "cert"], requires = "issuer_key")]
    pub devices: Option<usize>,
    /// The private key of the CA that issues the --devices certificates (a lab's
    /// ca/root.key); the server must trust that CA for devices.
    #[arg(long, value_name = "F")]
    pub issuer_key: Option<PathBuf>,
    /// The certificate of that CA (default: the first --ca).
    #[arg(long, value_name = "F", requires = "issuer_key")]
    pub issuer_cert: Option<PathBuf>,
    /// Seconds of load before the measured run, on the same connections, not counted.
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    pub warmup: f64,
    #[arg(long)]
    pub json: bool,
}

/// Prints a bench's report as JSON or text; exit 0 when the run was `clean`, 1 otherwise.
fn show(
    report: &impl serde::Serialize,
    text: &str,
    json: bool,
    clean: bool,
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{text}");
    }
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
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
        BenchCommand::Connections(args) => connections(args),
        BenchCommand::ConnectionsWorker => {
            bench::connections::worker::main().map_err(anyhow::Error::msg)?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Compare(args) => compare(args),
        BenchCommand::Faults(args) => faults(args),
    }
}

fn faults(args: FaultsArgs) -> anyhow::Result<ExitCode> {
    use bench::faults::{Fault, FaultsOptions};
    let mut options = FaultsOptions::new(std::env::current_exe().context("finding this program")?);
    if !args.faults.is_empty() {
        options.faults = args
            .faults
            .iter()
            .map(|name| {
                Fault::from_name(name.trim()).with_context(|| {
                    let all: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                    format!("--faults: no fault \"{name}\" (faults: {})", all.join(", "))
                })
            })
            .collect::<anyhow::Result<_>>()?;
    } else if args.soak.is_some() {
        options.faults.retain(|&f| f != Fault::KillAllConnectors);
    }
    options.duration = seconds(args.duration, "--duration")?;
    options.devices = args.devices;
    options.rate = args.rate;
    options.soak = args.soak.map(|m| Duration::from_secs(m * 60));
    options.warmup = seconds(args.warmup, "--warmup")?;
    options.keep = args.keep;
    let report = bench::faults::run(&options)?;
    show(&report, &report.render_text(), args.json, report.passed())
}

fn connections(args: ConnectionsArgs) -> anyhow::Result<ExitCode> {
    let options = bench::connections::ConnectionsOptions {
        program: std::env::current_exe().context("finding this program")?,
        count: args.count,
        instances: usize::from(args.instances),
        per_process: args
            .per_process
            .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX)),
        concurrency: args.concurrency as usize,
        hold: Duration::try_from_secs_f64(args.hold)
            .with_context(|| format!("--hold: {} is not a number of seconds", args.hold))?,
        request_first: args.request,
        devices: args
            .devices
            .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX)),
        progress: true,
    };
    let report = bench::connections::run(&options)?;
    let clean = report.held == report.requested
        && (!report.request_first || report.answered == report.requested);
    show(&report, &report.render_text(), args.json, clean)
}

fn load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let devices = match (args.devices, &args.issuer_key) {
        (Some(n), Some(key)) => {
            if n == 0 || n > bench::load::MAX_CONNECTIONS {
                anyhow::bail!(
                    "--devices must be between 1 and {}",
                    bench::load::MAX_CONNECTIONS
                );
            }
            let issuer = bench::devices::Issuer {
                ca_cert: args
                    .issuer_cert
                    .clone()
                    .or_else(|| args.device.ca.first().cloned())
                    .context("--devices: no --issuer-cert and no --ca")?,
                ca_key: key.clone(),
                server_roots: args.device.ca.clone(),
            };
            Some(
                bench::devices::DeviceSet::issue_showing(&issuer, n, true)
                    .map_err(anyhow::Error::msg)
                    .context("--devices")?,
            )
        }
        _ => None,
    };
    let options = LoadOptions {
        url: args.device.url,
        ca: args.device.ca,
        cert: args.device.cert,
        key: args.device.key,
        connections: args.devices.unwrap_or(args.connections),
        connect_first: devices.is_some(),
        devices,
        warmup: if args.warmup == 0.0 {
            Duration::ZERO
        } else {
            seconds(args.warmup, "--warmup")?
        },
        marks: None,
        mode: args.mode.into(),
        rate: args.rate,
        duration: args
            .duration
            .map(|d| seconds(d, "--duration"))
            .transpose()?,
        requests: args.requests,
        tls_resumption: args.tls_resumption,
        timeout: seconds(args.timeout, "--timeout")?,
        progress: true,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let report = runtime.block_on(bench::load::run(&options))?;
    let clean = report.errors == 0 && report.ok > 0;
    show(&report, &report.render_text(), args.json, clean)
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SystemArg {
    Direct,
    Portcullis,
    /// Portcullis from the binary given with --baseline.
    #[value(name = "portcullis-baseline")]
    PortcullisBaseline,
    #[value(name = "nginx+rathole")]
    NginxRathole,
    Nginx,
}

impl From<SystemArg> for bench::compare::System {
    fn from(s: SystemArg) -> Self {
        use bench::compare::System;
        match s {
            SystemArg::Direct => System::Direct,
            SystemArg::Portcullis => System::Portcullis,
            SystemArg::PortcullisBaseline => System::PortcullisBaseline,
            SystemArg::NginxRathole => System::NginxRathole,
            SystemArg::Nginx => System::Nginx,
        }
    }
}

#[derive(Args)]
pub struct CompareArgs {
    /// Systems to run, in this order, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,portcullis,nginx+rathole,nginx"
    )]
    pub systems: Vec<SystemArg>,
    /// Modes to run for each system, comma-separated (default: keepalive,handshake; with
    /// --devices, keepalive).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub modes: Vec<ModeArg>,
    /// Concurrent device connections (closed loop) in every run; a comma-separated list runs
    /// each system and mode once with each count (e.g. 32,128), each row compared with
    /// portcullis at the same count.
    #[arg(
        long,
        short = 'c',
        value_name = "N[,N...]",
        value_delimiter = ',',
        default_value = "32"
    )]
    pub connections: Vec<usize>,
    /// A fleet instead of --connections: N devices, each with a certificate of its own and one
    /// kept-alive connection, all connected before the clock starts, the warm-up on the same
    /// connections; a list (1000,10000) runs each count in turn.
    #[arg(
        long,
        value_name = "N[,N...]",
        value_delimiter = ',',
        conflicts_with = "connections"
    )]
    pub devices: Vec<usize>,
    /// Requests per second in all, open loop (latency from each request's due time), instead
    /// of each connection as fast as answers come.
    #[arg(long, value_name = "RPS")]
    pub rate: Option<f64>,
    /// Seconds of measured load per system and mode.
    #[arg(long, short = 'd', value_name = "SECS", default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before each measured run, not counted (0: none).
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub warmup: f64,
    /// nginx to run (default: /usr/sbin/nginx, then nginx on PATH).
    #[arg(long, value_name = "FILE")]
    pub nginx: Option<PathBuf>,
    /// rathole to run (default: rathole on PATH, then target/bench-tools/bin/rathole).
    #[arg(long, value_name = "FILE")]
    pub rathole: Option<PathBuf>,
    /// Another portcullis binary (e.g. a release build of an earlier commit) to run as system
    /// portcullis-baseline, with the same configuration, right after portcullis in every
    /// round: a change's cost measured side by side in one run. Adds the system if --systems
    /// does not name it.
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<PathBuf>,
    /// Run the whole sequence this many times, systems in turn, and report each system's
    /// median round (with every round's req/s): steadier ratios on a noisy machine.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub rounds: u16,
    /// Worker threads of every process under test: the gateway's and the connector's
    /// runtimes (worker_threads), nginx's worker_processes, rathole's runtime. Default: each
    /// one's own (one per CPU).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    /// Keep the temporary directory (configurations, logs, lab PKI) and print where it is.
    #[arg(long)]
    pub keep: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn compare(args: CompareArgs) -> anyhow::Result<ExitCode> {
    let mut options = bench::compare::CompareOptions::new(
        std::env::current_exe().context("finding this program")?,
    );
    options.systems = args.systems.iter().map(|&s| s.into()).collect();
    use bench::compare::System;
    if args.baseline.is_some() && !options.systems.contains(&System::PortcullisBaseline) {
        // Right after portcullis, so the two see the machine as alike as possible.
        let at = options
            .systems
            .iter()
            .position(|&s| s == System::Portcullis)
            .map_or(options.systems.len(), |i| i + 1);
        options.systems.insert(at, System::PortcullisBaseline);
    }
    options.baseline = args.baseline;
    options.modes = args.modes.iter().map(|&m| m.into()).collect();
    if options.modes.is_empty() {
        options.modes = if args.devices.is_empty() {
            vec![Mode::Keepalive, Mode::Handshake]
        } else {
            vec![Mode::Keepalive]
        };
    }
    options.fleet = !args.devices.is_empty();
    options.connections = if options.fleet {
        args.devices
    } else {
        args.connections
    };
    options.rate = args.rate;
    options.duration = seconds(args.duration, "--duration")?;
    options.warmup = if args.warmup == 0.0 {
        Duration::ZERO
    } else {
        seconds(args.warmup, "--warmup")?
    };
    options.nginx = args.nginx;
    options.rathole = args.rathole;
    options.keep = args.keep;
    options.rounds = usize::from(args.rounds);
    options.threads = args.threads.map(usize::from);
    let report = bench::compare::run(&options)?;
    let clean = report.failed.is_empty()
        && report.skipped.is_empty()
        && report.rows.iter().all(|r| r.errors == 0 && r.ok > 0);
    show(&report, &report.render_text(), args.json, clean)
}
