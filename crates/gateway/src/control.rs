//! A running gateway as its admin surface sees it: [`Handle`] (reload, status, metrics,
//! readiness; what `RunningGateway` delegates to) and [`GatewayControl`], its
//! `runtime::admin::Control`, which `portcullis gateway`, `portcullis dev` and the tests serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use logs::Log;
use runtime::admin::{Control, ReloadError};
use runtime::metrics::{Expiry, Readiness};
use runtime::page::{Cell, Page, Section, Tone};
use runtime::shards::ShardCounts;
use time::OffsetDateTime;

use crate::channels::Registry;
use crate::config::client_cert_header;
use crate::connectors::{load_connector_roots, Connectors};
use crate::device_auth::DeviceAuth;
use crate::tls::server_tls;
use crate::{limits, load_device_auth, GatewayConfig, GatewayError, Shared};

/// What reloading, the status and the metrics need of a running gateway; cheap to clone.
#[derive(Clone)]
pub(crate) struct Handle {
    /// Where devices and channels connect (`listen`).
    pub(crate) addr: SocketAddr,
    pub(crate) shared: Arc<Shared>,
    pub(crate) registry: Arc<Registry>,
    /// Connections open on `listen`, per shard.
    pub(crate) open: ShardCounts,
    /// `channel_listen`'s address and its room for channels' handshakes.
    pub(crate) channel_listen: Option<(SocketAddr, Arc<limits::Limits>)>,
}

impl Handle {
    /// See `RunningGateway::reload`.
    pub(crate) fn reload(&self, config: &GatewayConfig) -> Result<String, GatewayError> {
        let generation = self.shared.auth.load().generation + 1;
        // Everything that can fail is done before anything is swapped in.
        let connector_roots = load_connector_roots(config)?;
        let auth = load_device_auth(
            config,
            generation,
            &connector_roots,
            &self.shared.log,
            Some(&self.shared.auth.load()),
        )?;
        let connectors = Connectors::load(config, connector_roots, &auth)?;
        let (tls, certificate) = server_tls(
            config,
            &auth,
            &connectors.roots,
            Some(&self.shared.tls.load()),
        )?;
        let described = auth.describe();
        let certificates = certificates(config, &auth, &connectors);
        // Before the new generation: connections judged again under it make their header
        // with this name.
        self.shared
            .cert_header
            .store(client_cert_header(config).map(Arc::new));
        self.shared.auth.store(Arc::new(auth));
        self.shared.tls.store(Arc::new(tls));
        // Channels of connectors no longer allowed (or trusted) are closed now.
        let now = OffsetDateTime::now_utc();
        let mut closed = Vec::new();
        for channel in self.registry.all() {
            let judged = connectors
                .judge(Some(&channel.peer_cert), now)
                .and_then(|cert| connectors.admits(&cert, &channel.hello));
            if let Err(why) = judged {
                channel.close(&why.to_string());
                self.shared.log.warn(&format!(
                    "Closed channel {} of connector {}: {why}",
                    channel.id, channel.hello.connector_id
                ));
                closed.push(channel.id);
            }
        }
        self.shared.connectors.store(Arc::new(connectors));
        self.shared
            .metrics
            .reloaded(config.ready_endpoints.clone(), certificates);
        let was = self.shared.log.set_verbose(config.verbose);
        let probe = self
            .shared
            .checks
            .apply(config.probe.as_ref(), self.addr, &self.shared)
            .map(|said| format!("; probe: {said}"))
            .unwrap_or_default();
        Ok(format!(
            "verbose {}{}; devices: {described}; server certificate for new connections: {certificate}; connectors: {}{probe} (listen, proxy_protocol, the connection caps and timeouts take effect at the next start)",
            if config.verbose { "on" } else { "off" },
            if was == config.verbose { "" } else { " (changed)" },
            if closed.is_empty() {
                "every open channel still allowed".to_string()
            } else {
                format!("{} channel(s) closed, no longer allowed", closed.len())
            },
        ))
    }

    /// See `RunningGateway::shards_status`.
    pub(crate) fn shards_status(&self) -> serde_json::Value {
        let shards: Vec<serde_json::Value> = self
            .open
            .all()
            .iter()
            .enumerate()
            .map(|(shard, devices)| {
                serde_json::json!({
                    "devices": devices,
                    "channels": self.registry.channels_on(shard),
                })
            })
            .collect();
        serde_json::Value::Array(shards)
    }

    /// See `RunningGateway::connections_status`.
    pub(crate) fn connections_status(&self) -> serde_json::Value {
        let mut status = self.shared.limits.status();
        if let (Some((addr, limits)), Some(all)) = (&self.channel_listen, status.as_object_mut()) {
            let mut channels = limits.status();
            if let Some(channels) = channels.as_object_mut() {
                channels.insert("address".into(), addr.to_string().into());
            }
            all.insert("channel_listen".into(), channels);
        }
        if let (Some(proxies), Some(all)) = (&self.shared.proxies, status.as_object_mut()) {
            all.insert("proxy_protocol".into(), proxies.status());
        }
        status
    }

    fn metrics(&self) -> String {
        let timeouts = |l: &limits::Limits| {
            l.counts
                .closed_handshake_timeout
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let handshake_timeouts = timeouts(&self.shared.limits)
            + self
                .channel_listen
                .as_ref()
                .map_or(0, |(_, limits)| timeouts(limits));
        let mut text = self.shared.metrics.render(
            self.open.all().iter().sum(),
            handshake_timeouts,
            &self.registry,
        );
        {
            let now = runtime::metrics::Registry::new(&[]);
            self.shared.checks.render(&now);
            text.push_str(&now.render());
        }
        text
    }
}

impl Handle {
    /// The status page: connectors and their channels, endpoints and whether a channel serves
    /// each, rates, certificates, the last refusals.
    fn page(&self) -> Page {
        let metrics = &self.shared.metrics;
        let yes_no = |ok: bool, no: &str| {
            if ok {
                Cell::toned("yes", Tone::Good)
            } else {
                Cell::toned(no, Tone::Bad)
            }
        };
        let connectors = Section {
            id: "connectors",
            title: "Channels per connector".into(),
            note: "Each connector holding channels to this gateway instance, and whether its hello says it has a client certificate for its endpoints.".into(),
            head: vec!["connector", "channels", "client certificate"],
            rows: self
                .registry
                .connectors()
                .into_iter()
                .map(|(id, channels, has_certificate)| {
                    vec![
                        Cell::new(id),
                        Cell::new(channels.to_string()),
                        yes_no(has_certificate, "none: 403 CMGConnector_Clientcertificaterequired"),
                    ]
                })
                .collect(),
            empty: "No connector holds a channel to this gateway.".into(),
        };
        let mut all = self.registry.all();
        all.sort_by_key(|c| c.id);
        let channels = Section {
            id: "channels",
            title: format!("Channels of this gateway instance ({})", self.addr),
            note: "Every channel held now: its connector, the worker thread driving it, the requests on it.".into(),
            head: vec!["channel", "connector", "worker thread", "requests in flight", "endpoints"],
            rows: all
                .iter()
                .map(|c| {
                    let endpoints: Vec<String> =
                        c.hello.endpoints.iter().map(|e| e.id.to_string()).collect();
                    vec![
                        Cell::new(c.id.to_string()),
                        Cell::new(c.hello.connector_id.clone()),
                        Cell::new(c.shard.to_string()),
                        Cell::new(c.outstanding().to_string()),
                        Cell::new(endpoints.join(", ")),
                    ]
                })
                .collect(),
            empty: "No channel.".into(),
        };
        let wanted = metrics.ready_endpoints();
        let mut endpoints: Vec<Vec<Cell>> = self
            .registry
            .endpoints()
            .into_iter()
            .map(|(id, name, live)| {
                vec![
                    Cell::new(id.to_string()),
                    Cell::new(name),
                    Cell::new(live.to_string()),
                    yes_no(live > 0, "no: 503 CMGService_Noconnectorchannel"),
                    Cell::new(if wanted.contains(&id) { "yes" } else { "" }),
                ]
            })
            .collect();
        for id in wanted {
            if !self.registry.is_known(id) {
                endpoints.push(vec![
                    Cell::new(id.to_string()),
                    Cell::new(""),
                    Cell::new("0"),
                    yes_no(false, "no: no connector announced it"),
                    Cell::new("yes"),
                ]);
            }
        }
        let endpoints = Section {
            id: "endpoints",
            title: "Endpoints".into(),
            note: "Every endpoint a connector announced since start (and each of ready_endpoints), and whether a channel serves it now.".into(),
            head: vec!["endpoint", "name", "channels", "served", "in ready_endpoints"],
            rows: endpoints,
            empty: "No connector has announced an endpoint yet.".into(),
        };
        let totals = metrics.rate_totals();
        Page {
            component: "gateway".into(),
            facts: vec![
                ("version".into(), env!("CARGO_PKG_VERSION").into()),
                ("listening".into(), self.addr.to_string()),
                ("worker threads".into(), self.open.all().len().to_string()),
                (
                    "device connections".into(),
                    self.open.all().iter().sum::<usize>().to_string(),
                ),
                (
                    "verbose log".into(),
                    if self.shared.log.is_verbose() {
                        "on"
                    } else {
                        "off"
                    }
                    .into(),
                ),
            ],
            readiness: metrics.readiness(&self.registry),
            sections: [connectors, channels, endpoints]
                .into_iter()
                .chain(self.shared.checks.section())
                .collect(),
            rates: metrics.history.rates(&totals),
            certificates: metrics.certificates(),
            refusals: metrics.recent.list(),
        }
    }
}

/// The certificates a gateway uses and trusts, with their ends: its server certificate, the
/// device and connector roots, and the CRLs' next updates.
pub(crate) fn certificates(
    config: &GatewayConfig,
    auth: &DeviceAuth,
    connectors: &Connectors,
) -> Vec<Expiry> {
    let mut all = Vec::new();
    if let Some(leaf) = pki::tls::Identity::load(&config.cert, &config.key)
        .ok()
        .and_then(|i| i.chain.into_iter().next())
        .and_then(|leaf| pki::Certificate::from_der(leaf.as_ref()).ok())
    {
        all.push(Expiry::of("server", &leaf));
    }
    all.extend(runtime::metrics::roots_expiry("trusted_root", &auth.roots));
    all.extend(runtime::metrics::roots_expiry(
        "connector_root",
        &connectors.roots,
    ));
    for crl in auth.revocation.iter().flat_map(|r| &r.crls) {
        if let Some(next_update) = crl.next_update {
            all.push(Expiry {
                role: "crl",
                subject: crl.issuer.clone(),
                thumbprint: String::new(),
                expires: next_update,
            });
        }
    }
    all
}

/// The admin surface's view of a running gateway, reloading from the file at `path`.
pub struct GatewayControl {
    pub(crate) path: PathBuf,
    pub(crate) gateway: Handle,
}

impl Control for GatewayControl {
    fn log(&self) -> &Log {
        &self.gateway.shared.log
    }

    fn reload(&self) -> Result<String, ReloadError> {
        let loaded = GatewayConfig::load(&self.path)
            .map_err(ReloadError::from)
            .and_then(|c| {
                self.gateway
                    .reload(&c)
                    .map_err(|e| ReloadError::Refused(Box::new(e)))
            });
        runtime::admin::reloaded(self.log(), &self.path, loaded)
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "shards": self.gateway.shards_status(),
            "connections": self.gateway.connections_status(),
        })
    }

    fn metrics(&self) -> String {
        self.gateway.metrics()
    }

    fn certificates(&self) -> Vec<Expiry> {
        self.gateway.shared.metrics.certificates()
    }

    fn readiness(&self) -> Readiness {
        self.gateway.shared.metrics.readiness(&self.registry())
    }

    fn page(&self) -> Page {
        self.gateway.page()
    }
}

impl GatewayControl {
    fn registry(&self) -> Arc<Registry> {
        self.gateway.registry.clone()
    }
}
