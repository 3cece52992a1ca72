//! Bringing each system up behind the reference management point: its configuration files,
//! its processes, the URL devices use.

use super::*;

pub(super) struct Mp {
    pub(super) proc: Proc,
    pub(super) port: u16,
}

pub(super) fn start_mp(
    dir: &Path,
    lab: &Lab,
    options: &CompareOptions,
) -> Result<Mp, CompareError> {
    let config = dir.join("mp.toml");
    // The lab's files by their absolute paths: the configuration files are not in the lab.
    let mut mp_config = mp::MpConfig::lab();
    mp_config.resolve_paths(&lab.dir);
    mp_config.client_certificates = mp::ClientCertMode::Require;
    mp_config.write(&config)?;
    let mut command = Command::new(&options.program);
    command.arg("mp").arg("--config").arg(&config);
    let mut proc =
        Proc::spawn("management point", command, dir, vec![]).map_err(CompareError::Start)?;
    let deadline = Instant::now() + options.ready_timeout;
    loop {
        let said = std::fs::read_to_string(&proc.output).unwrap_or_default();
        if let Some(port) = said
            .lines()
            .find_map(|l| l.split("listening on https://").nth(1))
            .and_then(|addr| addr.trim().rsplit(':').next()?.parse::<u16>().ok())
        {
            return Ok(Mp { proc, port });
        }
        if let Some(why) = proc.exited() {
            return Err(CompareError::Start(format!(
                "the reference management point did not start: {why}{}",
                proc.tail()
            )));
        }
        if Instant::now() > deadline {
            return Err(CompareError::Start(format!(
                "the reference management point did not say where it listens within {:.0} s{}",
                options.ready_timeout.as_secs_f64(),
                proc.tail()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// Systems

/// A system brought up: its processes (stopped when dropped) and where devices call.
pub(super) struct Up {
    pub(super) procs: Vec<Proc>,
    pub(super) url: String,
}

impl Up {
    pub(super) fn tails(&self) -> String {
        self.procs.iter().map(Proc::tail).collect()
    }
}

pub(super) fn bring_up(
    system: System,
    dir: &Path,
    lab: &Lab,
    mp: &Mp,
    tools: &Tools,
    options: &CompareOptions,
    connections: usize,
) -> Result<Up, String> {
    let direct = format!("https://localhost:{}{MP_PATH}", mp.port);
    let err = |e: CompareError| e.to_string();
    match system {
        System::Direct => Ok(Up {
            procs: vec![],
            url: direct,
        }),
        System::Portcullis | System::PortcullisBaseline => {
            let program = match system {
                System::PortcullisBaseline => tools.baseline()?,
                _ => options.program.as_path(),
            };
            let [gw] = free_ports(1).map_err(err)?[..] else {
                return Err("no free port".into());
            };
            // The lab's files by their absolute paths: the configuration files are in the
            // run's directory, not the lab's.
            let mut gateway_config = gateway::GatewayConfig::lab();
            gateway_config.resolve_paths(&lab.dir);
            gateway_config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], gw));
            gateway_config.worker_threads = options.threads;
            gateway_config.log.file = Some(dir.join("SMS_Cloud_ProxyGateway.log"));
            gateway_config.log.console = logs::logger::ConsoleSetting::Off;
            let gateway = dir.join("gateway.toml");
            gateway_config.write(&gateway).map_err(|e| e.to_string())?;
            let mut connector_config = connector::config::ConnectorConfig::lab(
                "bench",
                vec![format!("127.0.0.1:{gw}")],
                vec![connector::config::EndpointConfig {
                    id: ENDPOINT_ID,
                    name: "SMS_MP".into(),
                    url: format!("https://localhost:{}", mp.port),
                }],
            );
            connector_config.resolve_paths(&lab.dir);
            // By address (see faults::lab): the certificate is checked against "localhost".
            connector_config.gateway_server_name = Some("localhost".into());
            connector_config.worker_threads = options.threads;
            connector_config.log.file = Some(dir.join("SMS_Cloud_ProxyConnector.log"));
            connector_config.log.console = logs::logger::ConsoleSetting::Off;
            let connector = dir.join("connector.toml");
            connector_config
                .write(&connector)
                .map_err(|e| e.to_string())?;
            let mut procs = Vec::new();
            let mut command = Command::new(program);
            command.arg("gateway").arg("--config").arg(&gateway);
            procs.push(Proc::spawn(
                "gateway",
                command,
                dir,
                vec![dir.join("SMS_Cloud_ProxyGateway.log")],
            )?);
            let mut command = Command::new(program);
            command.arg("connector").arg("--config").arg(&connector);
            procs.push(Proc::spawn(
                "connector",
                command,
                dir,
                vec![dir.join("SMS_Cloud_ProxyConnector.log")],
            )?);
            Ok(Up {
                procs,
                url: format!("https://localhost:{gw}/CCM_PROXY_MUTUALAUTH/{ENDPOINT_ID}{MP_PATH}"),
            })
        }
        System::Nginx => {
            let [port] = free_ports(1).map_err(err)?[..] else {
                return Err("no free port".into());
            };
            let nginx = Nginx {
                port,
                upstream: mp.port,
                threads: options.threads,
                connections,
            };
            let nginx = start_nginx(tools.nginx()?, dir, lab, &nginx)?;
            Ok(Up {
                procs: vec![nginx],
                url: format!("https://localhost:{port}{MP_PATH}"),
            })
        }
        System::NginxRathole => {
            let [port, control, service] = free_ports(3).map_err(err)?[..] else {
                return Err("no free port".into());
            };
            let rathole = tools.rathole()?;
            let token = format!(
                "bench-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            );
            let server = dir.join("rathole-server.toml");
            write(
                &server,
                &format!(
                    "[server]\nbind_addr = \"127.0.0.1:{control}\"\n\n[server.transport]\ntype = \"tcp\"\n\n[server.transport.tcp]\nnodelay = true\n\n[server.services.mp]\ntoken = \"{token}\"\nbind_addr = \"127.0.0.1:{service}\"\nnodelay = true\n"
                ),
            )
            .map_err(err)?;
            let client = dir.join("rathole-client.toml");
            write(
                &client,
                &format!(
                    "[client]\nremote_addr = \"127.0.0.1:{control}\"\n\n[client.transport]\ntype = \"tcp\"\n\n[client.transport.tcp]\nnodelay = true\n\n[client.services.mp]\ntoken = \"{token}\"\nlocal_addr = \"127.0.0.1:{}\"\nnodelay = true\n",
                    mp.port
                ),
            )
            .map_err(err)?;
            let mut procs = Vec::new();
            for (name, role, config) in [
                ("rathole server", "--server", &server),
                ("rathole client", "--client", &client),
            ] {
                let mut command = Command::new(rathole);
                // Warnings only: no line per connection.
                command.env("RUST_LOG", "warn").arg(role).arg(config);
                if let Some(threads) = options.threads {
                    // rathole's runtime is tokio's default one, which reads this.
                    command.env("TOKIO_WORKER_THREADS", threads.to_string());
                }
                procs.push(Proc::spawn(name, command, dir, vec![])?);
            }
            let nginx = Nginx {
                port,
                upstream: service,
                threads: options.threads,
                connections,
            };
            procs.insert(0, start_nginx(tools.nginx()?, dir, lab, &nginx)?);
            Ok(Up {
                procs,
                url: format!("https://localhost:{port}{MP_PATH}"),
            })
        }
    }
}

/// An nginx to start: where devices call, where it proxies to, and the load it is tuned for.
pub(super) struct Nginx {
    pub(super) port: u16,
    pub(super) upstream: u16,
    pub(super) threads: Option<usize>,
    /// Concurrent device connections of the run.
    pub(super) connections: usize,
}

/// nginx on 127.0.0.1:`port` terminating device mutual TLS, proxying over TLS (presenting
/// the connector's client-authentication certificate, checking the management point's) to
/// 127.0.0.1:`upstream` with a pool of kept-alive connections.
///
/// Tuned for the run as its operators would: the upstream keep-alive pool holds as many idle
/// connections per worker as there are devices (at most one request in flight each, so no
/// request pays a new TLS handshake to the upstream once warm), upstream connections live
/// for a million requests and five minutes idle, worker_connections fits every device and
/// its upstream connection in one worker, and `reuseport` spreads the devices' connections
/// evenly over the workers.
pub(super) fn start_nginx(
    nginx: &Path,
    dir: &Path,
    lab: &Lab,
    tuned: &Nginx,
) -> Result<Proc, String> {
    let Nginx {
        port,
        upstream,
        threads,
        connections,
    } = *tuned;
    let workers = threads.map_or_else(|| "auto".to_string(), |n| n.to_string());
    let pool = connections.max(64);
    let worker_connections = (2 * connections + 1024).clamp(16_384, 65_000);
    let temp = dir.join("nginx-temp");
    std::fs::create_dir_all(&temp).map_err(|e| format!("creating {}: {e}", temp.display()))?;
    let error_log = dir.join("nginx-error.log");
    // As root, nginx would run its workers as `nobody`, which cannot enter the private
    // temporary directory.
    let user = if rustix::process::geteuid().is_root() {
        "user root;\n"
    } else {
        ""
    };
    let conf = dir.join("nginx.conf");
    let root = q(&lab.root());
    write(
        &conf,
        &format!(
            r#"# Generated by portcullis bench compare.
{user}worker_processes {workers};
daemon off;
master_process on;
pid {pid};
error_log {error_log} warn;
worker_rlimit_nofile 131072;

events {{
    worker_connections {worker_connections};
}}

http {{
    access_log off;
    # Devices keep their connection; nginx's default closes it after 1000 requests, which
    # at these rates is every few seconds per connection.
    keepalive_requests 1000000;
    client_body_temp_path {t}/client;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;

    upstream management_point {{
        server 127.0.0.1:{upstream};
        keepalive {pool};
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}

    server {{
        listen 127.0.0.1:{port} ssl reuseport;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {root};
        ssl_verify_client on;
        ssl_session_cache shared:SSL:10m;

        location / {{
            proxy_pass https://management_point;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_ssl_certificate {client_cert};
            proxy_ssl_certificate_key {client_key};
            proxy_ssl_trusted_certificate {root};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}
    }}
}}
"#,
            pid = q(&dir.join("nginx.pid")),
            error_log = q(&error_log),
            t = temp.display(),
            cert = q(&lab.file(pki::lab::layout::GATEWAY_CERT)),
            key = q(&lab.file(pki::lab::layout::GATEWAY_KEY)),
            client_cert = q(&lab.file(pki::lab::layout::CLIENT_AUTH_CERT)),
            client_key = q(&lab.file(pki::lab::layout::CLIENT_AUTH_KEY)),
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut command = Command::new(nginx);
    command
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(&error_log)
        .arg("-c")
        .arg(&conf);
    Proc::spawn("nginx", command, dir, vec![error_log])
}
