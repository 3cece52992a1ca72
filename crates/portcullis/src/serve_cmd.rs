//! `portcullis gateway` and `portcullis connector`: run one component until Ctrl-C or SIGTERM,
//! logging to standard output and to a CMTrace file; SIGHUP or the admin surface's
//! `POST /reload` re-reads the configuration, `PUT /verbose` turns verbose logging on or off.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use logs::logger::{ConsoleSetting, LogSettings};
use logs::{Log, Logger};
use runtime::admin::Control;
use runtime::shards::{ShardThreads, Shards};

/// Run a gateway instance.
///
/// One TLS port serves devices (HTTP/1.1 and HTTP/2) and connector channels (ALPN
/// portcullis-tunnel/1). Configuration (TOML; paths relative to the file):
///
///   listen = "0.0.0.0:443"                  # optional; this is the default
///   cert = "gateway/server.crt"
///   key = "gateway/server.key"
///   trusted_roots = ["ca/root.crt"]          # device certificates chain to these
///   connector_roots = ["ca/connector-roots.crt"]   # connector certificates chain to these;
///                                            # never trusted_roots. Optional only when every
///                                            # allowed_connectors entry is a SHA-1 thumbprint
///                                            # (pinned: the certificate itself is trusted)
///   allowed_connectors = ["Portcullis Connector Channel",   # CN or SHA-1 thumbprint, or
///     { name = "Branch Connector", endpoints = [3456] }]     # bound to its endpoints: a
///                                            # bound endpoint only from connectors bound to it
///   verify_client_revocation = false         # check device and connector certificates
///                                            # against crls (a connector of unknown status
///                                            # is refused)
///   request_timeout_secs = 120               # optional; see Timeouts below
///   startup_grace_secs = 35                  # optional; see Timeouts below
///   refused_body_drain_bytes = 1048576       # optional: of a refused request's body, what is
///                                            # read and thrown away so that the device's
///                                            # HTTP/1.1 connection serves its next request;
///                                            # a larger body gets Connection: close
///   crls = ["ca/root.crl"]                   # re-read on SIGHUP
///   crl_policy = "refuse"                    # or "allow-and-warn" (no current CRL)
///   verbose = false                          # a line per request; SIGHUP or PUT /verbose
///   admin_listen = "127.0.0.1:9441"          # optional; loopback only
///   metrics_listen = "0.0.0.0:9100"          # optional, any address: the read-only health
///                                            # and metrics surface for probes and scrapes
///                                            # from outside (the kubelet, Prometheus)
///   ready_endpoints = [3456]                 # optional: GET /readyz is 200 once a channel
///                                            # serves each (default: once any channel is held)
///   worker_threads = 2                       # optional; default one per CPU
///   client_cert_header = "X-ARR-ClientCert"  # optional: endpoints get the trusted device
///                                            # certificate (DER, base64), as IIS ARR sends it
///
///   [log]                                    # optional
///   file = "logs/SMS_Cloud_ProxyGateway.log" # CMTrace; rolls over to .lo_
///   max_size_kib = 10240
///   console = "plain"                        # plain, json or off
///
///   [tokens]                                 # optional: CCM_PROXY_SERVERAUTH routes
///   keys = ["site/token.pub"]                # the site's public key(s); several to rotate
///   issuer = "portcullis-site"               # the defaults
///   audience = "portcullis-gateway"
///   revoked = "site/revoked-tokens.txt"      # optional: token ids, one per line
///   leeway_secs = 60                         # clock skew allowed, at most 86400
///   registration_paths = ["ccm_system_tokenauth/request"]   # where bulk tokens enrol
///
///   [[tokens.oidc]]                          # optional, repeatable: an OpenID Connect issuer
///   issuer = "https://login.microsoftonline.com/<tenant id>/v2.0"
///   audience = ["api://portcullis-gateway"]  # one, or a list
///   tenants = ["<tenant id>"]                # optional: tid allow-list
///   identity_claim = "sub"                   # names the device to the connector
///   required_claims = { roles = "Portcullis.Device" }   # optional
///   ca = ["entra-roots.pem"]                 # optional; the system's roots when left out
///   refresh_secs = 3600                      # JWKS fetched again (1 to 604800)
///   min_refresh_secs = 60                    # never more often (1 to 86400)
///   fetch_timeout_secs = 10                  # 1 to 300
///   max_document_bytes = 262144              # 1024 to 16777216
///
///   [probe]                                  # optional: the connection analyzer, run by the
///                                            # gateway against itself on a schedule
///   device_cert = "probe/device.crt"         # a device certificate trusted_roots trust
///   device_key = "probe/device.key"
///   # or, instead of device_cert and device_key, a device token on CCM_PROXY_SERVERAUTH:
///   # token = "eyJ..."                       # the token itself, or
///   # token_command = "cat /run/secrets/probe-token"   # sh -c, prints it (each run)
///   ca = ["ca/root.crt"]                     # roots the server certificate chains to
///   url = "https://cmg.contoso.com"          # optional; default https://localhost:<port>
///   endpoints = [3456]                       # optional; default every announced endpoint
///   path = "SMS_MP/.sms_aut?MPLIST"          # the real request's path (the default)
///   interval_secs = 60                       # 10 to 86400
///   timeout_secs = 10
///
///   [tls]                                    # optional
///   min_version = "1.2"                      # or "1.3"
///   cipher_suites = []                       # empty: all of rustls' safe suites
///
/// Timeouts along a device's request (optional keys, their defaults; what the device sees):
///   handshake_timeout_secs = 10        the TLS handshake, from accept: connection closed
///   first_request_timeout_secs = 10    the first request after it: connection closed
///   idle_timeout_secs = 120            no request under way (HTTP/1.1: at most 30): closed
///   http2_keepalive_secs = 30          PING a quiet HTTP/2 device (0: none), 20 s to answer
///   device_idle_timeout_secs = 30      a device sending none of its body or taking none of
///                                      the answer: 408 CMGService_Devicestalled
///   refused_body_drain_timeout_secs = 5  the rest of a refused request's body: past it the
///                                      refusal says Connection: close
///   startup_grace_secs = 35            after a start, an endpoint no connector has announced
///                                      yet: 503 CMGService_Gatewaystarting (Retry-After);
///                                      after it 404 CMGService_Unknownendpoint (0: none)
///   (connector) endpoint_timeout_secs = 60   the endpoint's answer to begin:
///                                      504 CMGConnector_Endpointtimeout
///   request_timeout_secs = 120         the connector's answer to begin:
///                                      504 CMGService_Connectortimeout
///   connector_idle_timeout_secs = 30   a connector sending nothing more of an answer it
///                                      began: the answer is cut, 504 CMGService_Connectorstalled
///                                      logged
/// Keep request_timeout_secs above every connector's endpoint_timeout_secs, so that a slow
/// endpoint is named by the connector; each connector announces its own when its channel
/// opens, and the log warns when it is not below.
///
/// Signals: SIGHUP re-reads the file and applies at once `verbose` and how devices are judged
/// (trusted roots, CRLs, token keys, revoked tokens, client_cert_header); open connections
/// are judged again. The server certificate and key (renewed in place or named anew) and
/// [tls] serve new connections; a key that does not match its certificate is refused, the
/// running one kept.
/// allowed_connectors and connector_roots apply at once: the channels of a connector no
/// longer allowed, or announcing an endpoint no longer bound to it, are closed, and its
/// redials refused. [probe] starts, changes or stops its schedule at once (the log says
/// what changed); its series leave /metrics when it is removed.
/// Ctrl-C or SIGTERM stops, gracefully: no new connection is taken, each device connection
/// answers the request under way (for at most 10 s) and closes, idle ones at once.
/// Admin surface (admin_listen): GET /status (with each worker thread's device connections and
/// channels), PUT /verbose with body on|off (as JSON or with no Content-Type), POST /reload,
/// e.g. curl -X PUT -H 'Content-Type: application/json' --data '"on"' http://127.0.0.1:9441/verbose
/// (loopback Host only; a call with an Origin header or a form's content type is refused);
/// GET /metrics (Prometheus text: portcullis_gateway_requests_total, ..._channels,
/// portcullis_certificate_expiry_timestamp_seconds ...), GET /healthz (200 while serving),
/// GET /readyz (200, or 503 with the endpoints missing a channel, as JSON).
/// Health and metrics surface (metrics_listen): GET or HEAD of /healthz, /readyz and /metrics
/// only, the admin surface's answers, any Host; anything else 404 or 405. It changes nothing.
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct GatewayArgs {
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Write the service log, in CMTrace format, here (overrides [log] file).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Standard output: plain lines, JSON lines, or nothing (overrides [log] console).
    #[arg(long, value_name = "STYLE")]
    pub console: Option<ConsoleSetting>,
}

/// Run a connector.
///
/// Picks its client authentication certificate with the filter chain, dials every gateway
/// (channels_per_gateway each, more if a gateway says it runs more worker threads;
/// reconnecting with backoff and jitter) and forwards requests to its endpoints.
/// Configuration (TOML; paths relative to the file):
///
///   connector_id = "connector-1"
///   gateways = ["cmg.contoso.com:443"]         # a name stands for every address it
///                                            # resolves to (an instance set): channels to
///                                            # each, the certificate checked against the name
///   gateway_resolve_secs = 60                # optional, 1 to 3600: names resolved again;
///                                            # new instances get channels, vanished ones
///                                            # drain; a failed lookup keeps the last set
///   channels_per_gateway = 2                 # optional; 2 by default, 1 to 64; raised (to
///                                            # 64 at most) to a gateway's worker_threads, told
///                                            # in its hello, so each of its threads drives a
///                                            # channel of its own
///   channels_follow_gateway_threads = true   # optional; false: exactly channels_per_gateway
///   gateway_roots = ["ca/root.crt"]
///   channel_cert = "connector/channel.crt"
///   channel_key = "connector/channel.key"
///   client_cert_store = "connector/store"
///   allowed_roots = ["ca/root.crt"]
///   endpoint_roots = ["ca/root.crt"]
///   endpoint_crls = ["ca/root.crl"]          # optional: check endpoints' certificates
///   endpoint_crl_policy = "refuse"           # or "allow-and-warn" (no current CRL)
///   endpoint_timeout_secs = 60               # optional: the endpoint's answer to begin
///                                            # (connection and TLS included); past it the
///                                            # device gets 504 CMGConnector_Endpointtimeout.
///                                            # Keep it below the gateways'
///                                            # request_timeout_secs (120 by default), or the
///                                            # gateway's 504 CMGService_Connectortimeout comes
///                                            # first; it is announced to the gateways, which
///                                            # warn when it is not below theirs
///   max_request_header_bytes = 65536         # optional: the largest request header block a
///                                            # channel takes; at least the gateways' own
///   verbose = false                          # the whole filter trail, a line per message
///   admin_listen = "127.0.0.1:9442"          # optional; loopback only
///   metrics_listen = "0.0.0.0:9100"          # optional, any address: the read-only health
///                                            # and metrics surface for probes and scrapes
///                                            # from outside (the kubelet, Prometheus)
///   worker_threads = 2                       # optional; default one per CPU
///
///   [log]                                    # optional
///   file = "logs/SMS_Cloud_ProxyConnector.log"   # CMTrace; rolls over to .lo_
///   max_size_kib = 10240
///   console = "plain"                        # plain, json or off
///
///   [[endpoints]]
///   id = 72057594037927939
///   name = "SMS_MP"
///   url = "https://InternalMP.contoso.com"
///
/// Signals: SIGHUP re-reads the file: `verbose` and the endpoints apply at once, and the store
/// is read and the filter chain runs again (a new certificate serves the next request). When
/// the endpoints or whether there is a certificate at all change, the channels drain and
/// reopen one at a time, 1 s apart, so that the gateways route the new endpoints and their
/// ServiceMetadata says so. The reload's log line names changed settings that wait for a
/// restart (gateways, channel certificate, worker_threads, admin_listen, metrics_listen,
/// [log], ...).
/// A request the gateway withdraws before the endpoint answered (its device went away, or the
/// gateway's request_timeout_secs struck) is logged with its message id, and the call to the
/// endpoint abandoned.
/// Ctrl-C or SIGTERM stops, gracefully: each channel tells its gateway it is draining, takes
/// no new request and answers those under way (for at most 10 s) before it closes, so a
/// rolling restart of connectors cuts no request.
///
/// Admin surface (admin_listen): GET /status (the client certificate presented,
/// channels_kept: channels held or being redialled, and instances: each gateway instance,
/// its address and channels), PUT /verbose with
/// body on|off as JSON or with no Content-Type (turning it on logs the filter trail of the
/// current choice), POST /reload; GET /metrics (Prometheus text:
/// portcullis_connector_requests_total, ..._channels, ..._client_certificate_selected ...),
/// GET /healthz, GET /readyz (503 until a channel is held to every gateway instance and, with HTTPS
/// endpoints, a client certificate is selected; the JSON says what is missing).
/// Health and metrics surface (metrics_listen): GET or HEAD of /healthz, /readyz and /metrics
/// only, the admin surface's answers, any Host; anything else 404 or 405. It changes nothing.
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct ConnectorArgs {
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Write the log, in CMTrace format, here (e.g. SMS_Cloud_ProxyConnector.log; overrides
    /// [log] file).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Standard output: plain lines, JSON lines, or nothing (overrides [log] console).
    #[arg(long, value_name = "STYLE")]
    pub console: Option<ConsoleSetting>,
}

/// The logger a component's `[log]` settings describe, with the command line's `--log` and
/// `--console` taking precedence.
pub fn logger(
    component: &str,
    settings: &LogSettings,
    file: Option<&PathBuf>,
    console: Option<ConsoleSetting>,
) -> anyhow::Result<Logger> {
    let mut settings = settings.clone();
    if let Some(file) = file {
        settings.file = Some(file.clone());
    }
    if let Some(console) = console {
        settings.console = console;
    }
    settings.logger(component).with_context(|| {
        format!(
            "{}: cannot open the log",
            settings.file.as_deref().unwrap_or(Path::new("-")).display()
        )
    })
}

/// Serves the admin surface when the configuration asks for one, and says where.
pub async fn admin(
    addr: Option<SocketAddr>,
    control: Arc<dyn Control>,
) -> anyhow::Result<Option<runtime::listener::Listening>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listening = runtime::admin::serve(addr, control.clone())
        .await
        .with_context(|| format!("admin_listen {addr}: cannot listen"))?;
    control.log().info(&format!(
        "Admin surface on http://{0}: the status page http://{0}/, GET /status, /metrics, /healthz, /readyz, PUT /verbose (on|off), POST /reload",
        listening.addr
    ));
    Ok(Some(listening))
}

/// Serves the read-only health and metrics surface when the configuration asks for one
/// (`metrics_listen`), and says where.
pub async fn metrics(
    addr: Option<SocketAddr>,
    control: Arc<dyn Control>,
) -> anyhow::Result<Option<runtime::listener::Listening>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listening = runtime::admin::serve_metrics(addr, control.clone())
        .await
        .with_context(|| format!("metrics_listen {addr}: cannot listen"))?;
    control.log().info(&format!(
        "Health and metrics surface (read-only, any Host) on http://{}: GET /healthz, /readyz, /metrics",
        listening.addr
    ));
    Ok(Some(listening))
}

/// Where a component serves its admin surface and its read-only health and metrics surface.
#[derive(Clone, Copy)]
pub struct Surfaces {
    pub admin_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
}

/// Serves the admin surface and the health and metrics surface (those configured) and reloads
/// on SIGHUP until Ctrl-C or SIGTERM; then stops the component while both still answer, so the
/// probes and the scrape see its whole drain, stops them and writes out the log.
async fn serve_then_stop<R, F>(
    surfaces: Surfaces,
    control: Arc<dyn Control>,
    running: R,
    log: &Log,
    stop: impl FnOnce(R) -> F,
) -> anyhow::Result<ExitCode>
where
    F: std::future::Future<Output = ()>,
{
    let mut listening = Vec::new();
    let served = async {
        listening.extend(admin(surfaces.admin_listen, control.clone()).await?);
        listening.extend(metrics(surfaces.metrics_listen, control.clone()).await?);
        until_stopped(&*control).await
    }
    .await;
    stop(running).await;
    for surface in listening {
        surface.stop().await;
    }
    log.flush();
    served.map(|()| ExitCode::SUCCESS)
}

/// Runs until Ctrl-C or SIGTERM; SIGHUP reloads the configuration.
pub async fn until_stopped(control: &dyn Control) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
        let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    control.log().info("SIGHUP: reloading the configuration");
                    let _ = control.reload();
                }
                _ = terminate.recv() => return Ok(()),
                stopped = tokio::signal::ctrl_c() => return stopped.context("waiting for Ctrl-C"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = control;
        tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
    }
}

/// A service's shards: `threads` single-threaded runtimes, or one per CPU.
pub fn shards(threads: Option<usize>) -> anyhow::Result<(Shards, ShardThreads)> {
    let count = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
    });
    Shards::spawn(count).context("starting the shards' runtimes")
}

/// A service's shards (see [`shards`]) and the runtime of its main thread, which handles
/// signals and the admin surface.
fn runtimes(
    threads: Option<usize>,
) -> anyhow::Result<(tokio::runtime::Runtime, Shards, ShardThreads)> {
    let (shards, threads) = shards(threads)?;
    let main = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the main runtime")?;
    Ok((main, shards, threads))
}

pub fn gateway(args: GatewayArgs) -> anyhow::Result<ExitCode> {
    let config = gateway::GatewayConfig::load(&args.config)?;
    let log = logger(
        "SMS_CLOUD_PROXY_GATEWAY",
        &config.log,
        args.log.as_ref(),
        args.console,
    )?;
    let (runtime, shards, _threads) = runtimes(config.worker_threads)?;
    runtime.block_on(async {
        let surfaces = Surfaces {
            admin_listen: config.admin_listen,
            metrics_listen: config.metrics_listen,
        };
        let log = log.into_log();
        let files = runtime::listener::raise_fd_limit();
        log.info(&format!(
            "Open-file limit: {files} (each device or channel connection takes one)"
        ));
        // The caps are what keep descriptors for channels; past the limit they cannot.
        let wanted = (config.max_connections + config.reserved_for_channels) as u64 + 1_000;
        if files > 0 && wanted > files {
            log.warn(&format!(
                "max_connections ({}) and reserved_for_channels ({}) leave fewer than 1,000 of the {files} open files for channels, logs and the rest: when descriptors run out, connectors are locked out too. Lower max_connections or raise the limit (LimitNOFILE=)",
                config.max_connections, config.reserved_for_channels
            ));
        }
        let running = gateway::start_on(config, log.clone(), shards).await?;
        let control = running.control(args.config.clone());
        serve_then_stop(surfaces, Arc::new(control), running, &log, |r| {
            r.stop_gracefully(STOP_DRAIN)
        })
        .await
    })
}

/// How long a stopping gateway or connector waits for the requests under way.
const STOP_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

pub fn connector(args: ConnectorArgs) -> anyhow::Result<ExitCode> {
    let config = connector::run::ConnectorConfig::load(&args.config)?;
    let log = logger(
        "SMS_CLOUD_PROXYCONNECTOR",
        &config.log,
        args.log.as_ref(),
        args.console,
    )?;
    let (runtime, shards, _threads) = runtimes(config.worker_threads)?;
    runtime.block_on(async {
        let surfaces = Surfaces {
            admin_listen: config.admin_listen,
            metrics_listen: config.metrics_listen,
        };
        let log = log.into_log();
        let running = connector::run::start_on(config, log.clone(), shards).await?;
        let control = running.control(args.config.clone());
        serve_then_stop(surfaces, Arc::new(control), running, &log, |r| {
            r.stop_gracefully(STOP_DRAIN)
        })
        .await
    })
}
