//! The running connector: `start` picks its client certificate and starts the dial loops
//! ([`crate::dial`]), `reload` applies what a changed configuration may change while running,
//! and `stop` ends it (at once or after draining).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use channel::tunnel::{self, EndpointInfo, Hello};
use hyper::Uri;
use pki::RootSet;
use runtime::shards::Shards;
use tokio::sync::watch;

use crate::client_cert::choose_client_certificate;
pub use crate::config::{ConnectorConfig, EndpointConfig};
use crate::dial::{Dialer, Tasks, DRAIN_NOTICE, REOPEN_STAGGER};
use crate::instances::Kit;
use crate::lock;
use crate::service::Service;

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Endpoint(#[from] crate::endpoint::EndpointClientError),
}

pub use logs::Log;

pub struct RunningConnector {
    stop: watch::Sender<bool>,
    dialer: Dialer,
    service: Arc<Service>,
    /// The configuration it started with: what a reload cannot change is compared with it.
    started: Arc<ConnectorConfig>,
}

impl RunningConnector {
    /// Stops at once: what is on the channels is cut.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.finish_tasks(tokio::time::Instant::now()).await;
    }

    /// Waits for every task until `deadline`, then aborts what is left; says how many were
    /// cut. A widening task may start a dial while the first ones end: until none is left.
    async fn finish_tasks(&self, deadline: tokio::time::Instant) -> usize {
        let mut cut = 0;
        loop {
            let tasks = std::mem::take(&mut lock(&self.dialer.tasks).handles);
            if tasks.is_empty() {
                return cut;
            }
            for mut task in tasks {
                if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                    cut += 1;
                    task.abort();
                    let _ = task.await;
                }
            }
        }
    }

    /// Stops after draining: each channel tells its gateway it is draining (the gateway sends
    /// it nothing new), says GOAWAY, and answers the requests under way for at most `limit`
    /// before it closes. The gateways meanwhile send through other connectors' channels.
    pub async fn stop_gracefully(self, limit: Duration) {
        let _ = self.stop.send(true);
        let cut = self
            .finish_tasks(tokio::time::Instant::now() + DRAIN_NOTICE + limit)
            .await;
        if cut > 0 {
            self.service.log.warn(&format!(
                "Stopping: {cut} channel(s) still had requests under way after {} s and were closed",
                limit.as_secs()
            ));
        } else {
            self.service
                .log
                .info("Stopping: every channel drained, no request under way was cut");
        }
    }

    /// Channels being dialled or held, over all gateway instances (each dial loop holds at
    /// most one).
    pub fn dial_loops(&self) -> usize {
        lock(&self.dialer.tasks)
            .live
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn log(&self) -> &Log {
        &self.service.log
    }

    /// Applies what can change while running from a freshly loaded configuration: `verbose`,
    /// and the client certificate (the store is read and the filter chain runs again; the
    /// new choice serves the next request). Says what changed.
    pub fn reload(&self, config: &ConnectorConfig) -> Result<String, ConnectorError> {
        reload(&self.service, &self.started, config)
    }

    /// The admin surface's view of this connector (`runtime::admin::serve` serves it), which
    /// reloads from the configuration file at `path`.
    pub fn control(&self, path: std::path::PathBuf) -> crate::control::ConnectorControl {
        crate::control::ConnectorControl {
            path,
            service: self.service.clone(),
            tasks: self.dialer.tasks.clone(),
            started: self.started.clone(),
        }
    }

    /// Logs the certificate filter trail of the current choice (what verbose adds when it is
    /// turned on while running).
    pub fn log_trail(&self) {
        let trail = self.service.trail.lock().unwrap_or_else(|p| p.into_inner());
        for (severity, line) in trail.iter() {
            self.service.log.write(*severity, line);
        }
    }

    /// The chosen client certificate, if any.
    pub fn client_certificate(&self) -> Option<String> {
        self.service.client.load().selected_label()
    }
}

/// Applies what can change while running from a freshly loaded configuration: `verbose`,
/// and the client certificate (the store is read and the filter chain runs again; the
/// new choice serves the next request). Says what changed.
pub(crate) fn reload(
    service: &Service,
    started: &ConnectorConfig,
    config: &ConnectorConfig,
) -> Result<String, ConnectorError> {
    let mut changed = Vec::new();
    if service.log.set_verbose(config.verbose) != config.verbose {
        changed.push(format!(
            "verbose {}",
            if config.verbose { "on" } else { "off" }
        ));
    }
    let choice = choose_client_certificate(config, &service.log)?;
    let label = choice.label.clone();
    *service.trail.lock().unwrap_or_else(|p| p.into_inner()) = choice.trail;
    service
        .metrics
        .set_certificates(config, choice.certificates);
    service.client.store(Arc::new(choice.client));
    changed.push(format!(
        "client certificate re-selected: {}",
        label.as_deref().unwrap_or("none")
    ));
    // The endpoints: requests use the new table at once.
    let urls = endpoint_urls(config);
    if **service.endpoints.load() != urls {
        let mut listed: Vec<String> = config
            .endpoints
            .iter()
            .map(|e| format!("{} ({}) {}", e.id, e.name, e.url))
            .collect();
        listed.sort();
        changed.push(format!("endpoints now {}", listed.join(", ")));
        service.endpoints.store(Arc::new(urls));
    }
    // Whether there is a certificate at all, and the endpoints, are in the hello, which
    // the gateways use (routing, and ServiceMetadata, read by `portcullis analyze`): they
    // must hear of a change.
    let has_certificate = label.is_some();
    let infos = endpoint_infos(config);
    let hello_changed = {
        let mut hello = lock(&service.hello);
        let timeout = Some(config.endpoint_timeout_secs);
        let changed = hello.has_client_certificate != has_certificate
            || hello.endpoints != infos
            || hello.endpoint_timeout_secs != timeout;
        hello.has_client_certificate = has_certificate;
        hello.endpoints = infos;
        // The gateways check their request_timeout_secs against it.
        hello.endpoint_timeout_secs = timeout;
        changed
    };
    if hello_changed {
        service.hello_changes.send_modify(|n| *n += 1);
        changed.push(format!(
            "channels reopen one at a time ({} s apart) to give the gateways the new hello",
            REOPEN_STAGGER.as_secs()
        ));
    }
    let need_restart = restart_only_changes(started, config);
    if !need_restart.is_empty() {
        changed.push(format!(
            "not applied until the connector restarts: {}",
            need_restart.join(", ")
        ));
    }
    Ok(changed.join("; "))
}

/// Each endpoint's id and URL, as the configuration gives them (validated by `load`).
fn endpoint_urls(config: &ConnectorConfig) -> HashMap<u64, Uri> {
    config
        .endpoints
        .iter()
        .filter_map(|e| e.url.parse::<Uri>().ok().map(|u| (e.id, u)))
        .collect()
}

/// The endpoints as the hello announces them.
fn endpoint_infos(config: &ConnectorConfig) -> Vec<EndpointInfo> {
    config
        .endpoints
        .iter()
        .map(|e| EndpointInfo {
            id: e.id,
            name: e.name.clone(),
        })
        .collect()
}

/// The settings a reload cannot apply to a running connector, named as in the file, that
/// differ between `running` and `loaded`.
fn restart_only_changes(running: &ConnectorConfig, loaded: &ConnectorConfig) -> Vec<&'static str> {
    // Each key as the file names it, and the fields it covers.
    macro_rules! differing {
        ($($key:literal: $($field:ident),+;)*) => {{
            let mut changed = Vec::new();
            $(if false $(|| running.$field != loaded.$field)+ {
                changed.push($key);
            })*
            changed
        }};
    }
    differing! {
        "connector_id": connector_id;
        "gateways": gateways;
        "gateway_resolve_secs": gateway_resolve_secs;
        "gateway_server_name": gateway_server_name;
        "gateway_roots": gateway_roots;
        "channels_per_gateway": channels_per_gateway;
        "channels_follow_gateway_threads": channels_follow_gateway_threads;
        "channel_cert": channel_cert, channel_key;
        "worker_threads": worker_threads;
        "admin_listen": admin_listen;
        "metrics_listen": metrics_listen;
        "max_request_header_bytes": max_request_header_bytes;
        "[log]": log;
    }
}
/// Starts a connector on the runtime it is called on.
pub async fn start(config: ConnectorConfig, log: Log) -> Result<RunningConnector, ConnectorError> {
    start_on(config, log, Shards::current()).await
}

/// Starts a connector whose channels are dialled round `shards`: each channel, the requests
/// on it and their endpoint connections are driven by one shard's thread.
pub async fn start_on(
    config: ConnectorConfig,
    log: Log,
    shards: Shards,
) -> Result<RunningConnector, ConnectorError> {
    log.set_verbose(config.verbose);
    let choice = choose_client_certificate(&config, &log)?;
    let service = Arc::new(Service {
        hello_changes: watch::channel(0).0,
        hello: Mutex::new(Hello {
            connector_id: config.connector_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            endpoints: endpoint_infos(&config),
            has_client_certificate: choice.label.is_some(),
            max_request_header_bytes: Some(config.max_request_header_bytes),
            endpoint_timeout_secs: Some(config.endpoint_timeout_secs),
        }),
        endpoints: ArcSwap::from_pointee(endpoint_urls(&config)),
        client: ArcSwap::from_pointee(choice.client),
        trail: Mutex::new(choice.trail),
        log: log.clone(),
        metrics: crate::metrics::ConnectorMetrics::new(shards.len(), &config),
    });
    service
        .metrics
        .set_certificates(&config, choice.certificates);
    upkeep(&service);

    let identity = pki::tls::Identity::load(&config.channel_cert, &config.channel_key)?;
    let mut tls = pki::tls::client_config(&RootSet::load(&config.gateway_roots)?)?
        .with_client_auth_cert(identity.chain, identity.key)?;
    tls.alpn_protocols = vec![tunnel::ALPN.to_vec()];
    let tls = Arc::new(tls);

    log.info("Maintaining connections...");
    let (stop, stopped) = watch::channel(false);
    let dialer = Dialer {
        shards,
        tasks: Arc::new(Mutex::new(Tasks::default())),
        stopped: stopped.clone(),
    };
    // Each entry's instances: its address, or every address its name resolves to, kept by a
    // task of its own (`instances::keep`).
    let kit = Kit {
        dialer: dialer.clone(),
        server_name: config.gateway_server_name.clone(),
        tls,
        service: service.clone(),
        log: log.clone(),
        channels: config.channels_per_gateway,
        follow_threads: config.channels_follow_gateway_threads,
        max_request_header_bytes: config.max_request_header_bytes,
        every: Duration::from_secs(config.gateway_resolve_secs),
    };
    for entry in &service.metrics.entries.0 {
        dialer.spawn(crate::instances::keep(kit.clone(), entry.clone()));
    }
    Ok(RunningConnector {
        stop,
        dialer,
        service,
        started: Arc::new(config),
    })
}

/// Folds the request histograms' samples into buckets every few seconds, for as long as the
/// connector is there (a scrape does it too).
fn upkeep(service: &Arc<Service>) {
    let service = Arc::downgrade(service);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(runtime::metrics::UPKEEP_EVERY).await;
            match service.upgrade() {
                Some(service) => service.metrics.upkeep(),
                None => return,
            }
        }
    });
}
