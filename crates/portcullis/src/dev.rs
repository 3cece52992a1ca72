//! `portcullis dev`: the whole system on this machine, wired up on loopback: a lab PKI (made
//! once, reused), the reference management point, a gateway and a connector, and the lines
//! to try printed. Runs until Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use connector::run::{ConnectorConfig, EndpointConfig};
use gateway::GatewayConfig;
use logs::logger::ConsoleSetting;
use mp::MpConfig;
use pki::lab::layout;

use crate::analyze_cmd::AnalyzeConfig;
use crate::pki_cmd;
use crate::serve_cmd::admin;

/// The endpoint id of the lab's management point, in Configuration Manager's style.
pub const DEV_ENDPOINT: u64 = 72057594037927939;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Everything as it should be.
    Healthy,
    /// The seed's failure: the connector's store holds no usable client authentication
    /// certificate, so the management point answers 403.7 and devices see
    /// 403 CMGConnector_Clientcertificaterequired.
    MissingClientCert,
}

#[derive(Args)]
pub struct DevArgs {
    /// Where the lab keeps its state (PKI, configs, logs); reused on the next start.
    #[arg(long, value_name = "DIR", default_value = "portcullis-dev")]
    pub dir: PathBuf,
    /// The gateway's port on 127.0.0.1 (0: any free port).
    #[arg(long, value_name = "PORT", default_value_t = 8443)]
    pub port: u16,
    /// Start with a known failure, to see how Portcullis explains it.
    #[arg(long, value_enum, default_value_t = Scenario::Healthy)]
    pub scenario: Scenario,
}

pub fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.dir;
    if dir.join(layout::ROOT_CERT).exists() {
        println!("Lab PKI: reusing {}", dir.display());
    } else {
        pki_cmd::init(&pki_cmd::InitArgs {
            out: dir.clone(),
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
            devices: 2,
            force: false,
        })?;
        println!(
            "Lab PKI: wrote {} (its README.md lists every file)",
            dir.display()
        );
    }
    if !dir.join(layout::SITE_TOKEN_KEY).exists() {
        // A lab made before site token keys existed: add them.
        let (key, public) = pki::lab::token_key_pair(false)?;
        let site = dir.join(layout::SITE_TOKEN_KEY);
        if let Some(parent) = site.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        pki::lab::write_file(&site, key.as_bytes(), true)
            .with_context(|| format!("writing {}", site.display()))?;
        std::fs::write(dir.join(layout::SITE_TOKEN_PUB), public)
            .with_context(|| format!("writing {}", layout::SITE_TOKEN_PUB))?;
    }
    if !dir.join(layout::CONNECTOR_ROOTS).exists() {
        // A lab made before connectors had roots of their own: the lab root is theirs too.
        std::fs::copy(
            dir.join(layout::ROOT_CERT),
            dir.join(layout::CONNECTOR_ROOTS),
        )
        .with_context(|| format!("writing {}", layout::CONNECTOR_ROOTS))?;
    }
    let store = match args.scenario {
        Scenario::Healthy => layout::CONNECTOR_STORE.to_string(),
        Scenario::MissingClientCert => seed_store(dir)?,
    };
    // The gateway and the connector each on shards of their own, as their commands run them;
    // the management point and the admin surfaces on the runtime of this thread.
    let (gateway_shards, _gateway_threads) = crate::serve_cmd::shards(None)?;
    let (connector_shards, _connector_threads) = crate::serve_cmd::shards(None)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(serve(
        dir,
        args.port,
        &store,
        [gateway_shards, connector_shards],
    ))
}

/// The seed's store: the channel certificate without its key, and a server certificate.
fn seed_store(dir: &Path) -> anyhow::Result<String> {
    let rel = "scenarios/missing-client-cert/store";
    let store = dir.join(rel);
    std::fs::create_dir_all(&store).with_context(|| format!("creating {}", store.display()))?;
    for (from, to) in [
        (layout::CHANNEL_CERT, "channel.crt"),
        (layout::GATEWAY_CERT, "server.crt"),
        (layout::GATEWAY_KEY, "server.key"),
    ] {
        std::fs::copy(dir.join(from), store.join(to)).with_context(|| format!("copying {from}"))?;
    }
    Ok(rel.to_string())
}

async fn serve(
    dir: &Path,
    port: u16,
    store: &str,
    [gateway_shards, connector_shards]: [runtime::shards::Shards; 2],
) -> anyhow::Result<ExitCode> {
    // The files are written into the lab's directory, so the lab's relative paths hold; the
    // user can read them, and the admin surfaces reload them.
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let mut mp_config = MpConfig::lab();
    mp_config.w3c_log = Some("logs/u_ex.log".into());
    let mp_path = dir.join("mp.toml");
    mp_config.write(&mp_path)?;
    let mp = mp::start(MpConfig::load(&mp_path)?).await?;

    let mut config = GatewayConfig::lab();
    config.listen = loopback(port);
    config.admin_listen = Some(loopback(0));
    config.log.file = Some("logs/SMS_Cloud_ProxyGateway.log".into());
    config.log.console = ConsoleSetting::Off;
    config.tokens = Some(gateway::token::TokenSettings::new(vec![
        layout::SITE_TOKEN_PUB.into(),
    ]));
    let gateway_config = dir.join("gateway.toml");
    config.write(&gateway_config)?;
    let config = GatewayConfig::load(&gateway_config)?;
    let gateway_logger = config.log.logger("SMS_CLOUD_PROXY_GATEWAY")?.into_log();
    let admin_listen = config.admin_listen;
    let gateway = gateway::start_on(config, gateway_logger.clone(), gateway_shards)
        .await
        .with_context(|| {
            format!("starting the gateway (another program on port {port}? try --port 0)")
        })?;
    let gateway_control = Arc::new(gateway.control(gateway_config.clone()));
    let gateway_admin = admin(admin_listen, gateway_control.clone()).await?;

    // The address the gateway listens on, not "localhost": a name stands for every address it
    // resolves to, and where localhost is ::1 too that would be an instance nobody serves.
    let mut config = ConnectorConfig::lab(
        "dev-connector",
        vec![gateway.addr.to_string()],
        vec![EndpointConfig {
            id: DEV_ENDPOINT,
            name: "SMS_MP".into(),
            url: format!("https://localhost:{}", mp.addr.port()),
        }],
    );
    config.client_cert_store = store.into();
    config.gateway_server_name = Some("localhost".into());
    config.verbose = true;
    config.admin_listen = Some(loopback(0));
    config.log.file = Some("logs/SMS_Cloud_ProxyConnector.log".into());
    config.log.console = ConsoleSetting::Off;
    let connector_config = dir.join("connector.toml");
    config.write(&connector_config)?;
    let connector_log = dir.join("logs/SMS_Cloud_ProxyConnector.log");
    let config = ConnectorConfig::load(&connector_config)?;
    let connector_logger = config.log.logger("SMS_CLOUD_PROXYCONNECTOR")?.into_log();
    let admin_listen = config.admin_listen;
    let connector =
        connector::run::start_on(config, connector_logger.clone(), connector_shards).await?;
    let connector_control = Arc::new(connector.control(connector_config.clone()));
    let connector_admin = admin(admin_listen, connector_control.clone()).await?;

    let deadline = Instant::now() + Duration::from_secs(10);
    // The connector opens two channels (its default); wait for both, within bounds.
    while gateway.registry.channel_count() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let channels = gateway.registry.channel_count();

    let g = gateway.addr.port();
    let mut analyze = AnalyzeConfig::new(
        format!("https://localhost:{g}"),
        vec![layout::ROOT_CERT.into()],
        DEV_ENDPOINT,
    );
    analyze.path = "SMS_MP/.sms_aut?MPLIST".into();
    analyze.device_cert = Some("devices/device-001.crt".into());
    analyze.device_key = Some("devices/device-001.key".into());
    analyze.connector_config = Some("connector.toml".into());
    analyze.write(&dir.join("analyze.toml"))?;
    let shown = |p: &str| dir.join(p).display().to_string();
    let (root, cert, key) = (
        shown(layout::ROOT_CERT),
        shown("devices/device-001.crt"),
        shown("devices/device-001.key"),
    );
    let url =
        format!("https://localhost:{g}/CCM_PROXY_MUTUALAUTH/{DEV_ENDPOINT}/SMS_MP/.sms_aut?MPLIST");
    println!(
        "\nReference management point: https://localhost:{} (W3C log {})",
        mp.addr.port(),
        shown("logs/u_ex.log")
    );
    let page = |admin: &Option<runtime::listener::Listening>| {
        admin
            .as_ref()
            .map(|a| format!("; status page http://{}/", a.addr))
            .unwrap_or_default()
    };
    println!(
        "Gateway:   https://localhost:{g} (log {}{})",
        shown("logs/SMS_Cloud_ProxyGateway.log"),
        page(&gateway_admin)
    );
    println!(
        "Connector: {channels} channel(s) to the gateway (log {}{})",
        connector_log.display(),
        page(&connector_admin)
    );
    if channels == 0 {
        println!("warning: no channel came up within 10 s; read the connector's log");
    }
    println!("\nTry:");
    println!("  curl --cacert {root} --cert {cert} --key {key} '{url}'");
    println!(
        "  {} probe '{url}' --ca {root} --cert {cert} --key {key}",
        crate::this_program()
    );
    let (token, _) = gateway::token::issue(
        &dir.join(layout::SITE_TOKEN_KEY),
        &gateway::token::IssueRequest {
            subject: "DEVICE-TOKEN-001".into(),
            days: 7,
            endpoints: vec![DEV_ENDPOINT],
            issuer: gateway::token::default_issuer(),
            audience: gateway::token::default_audience(),
            kind: gateway::token::TokenKind::Device,
            not_before_offset_secs: 0,
        },
        time::OffsetDateTime::now_utc(),
    )?;
    println!(
        "  curl --cacert {root} -H 'Authorization: Bearer {token}' 'https://localhost:{g}/CCM_PROXY_SERVERAUTH/{DEV_ENDPOINT}/SMS_MP/.sms_aut?MPLIST'"
    );
    // Anonymous callers get the service's health only; a device sees endpoints and connectors.
    println!("  curl --cacert {root} --cert {cert} --key {key} 'https://localhost:{g}/CCM_PROXY_MUTUALAUTH/ServiceMetadata'");
    println!(
        "  {} doctor certs --store {} --allowed-roots {root}",
        crate::this_program(),
        shown(store)
    );
    println!(
        "  {} analyze --config {}",
        crate::this_program(),
        shown("analyze.toml")
    );
    println!("\nWhen something fails:");
    println!("  {} doctor logs {}", crate::this_program(), shown("logs"));
    for (name, admin) in [("gateway", &gateway_admin), ("connector", &connector_admin)] {
        if let Some(admin) = admin {
            println!(
                "  curl -X PUT -H 'Content-Type: application/json' --data '\"on\"' http://{}/verbose    # verbose {name} log, no restart",
                admin.addr
            );
        }
    }
    println!("\nRunning; press Ctrl-C to stop.");

    crate::serve_cmd::until_stopped(&*connector_control).await?;
    for admin in [gateway_admin, connector_admin].into_iter().flatten() {
        admin.stop().await;
    }
    drop((gateway_control, connector_control));
    connector.stop().await;
    gateway.stop().await;
    mp.stop().await;
    gateway_logger.flush();
    connector_logger.flush();
    Ok(ExitCode::SUCCESS)
}
