//! A running gateway as its admin surface sees it: [`Handle`] (reload, status, metrics,
//! readiness; what `RunningGateway` delegates to) and [`GatewayControl`], its
//! `runtime::admin::Control`, which `portcullis gateway`, `portcullis dev` and the tests serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use logs::Log;
use runtime::admin::{Control, ReloadError};
use runtime::metrics::{Expiry, Readiness};
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
        let auth = load_device_auth(config, generation, &connector_roots, &self.shared.log)?;
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
                channel.close();
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
        Ok(format!(
            "verbose {}{}; devices: {described}; server certificate for new connections: {certificate}; connectors: {} (listen, the connection caps and timeouts take effect at the next start)",
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
        self.shared.metrics.render(
            self.open.all().iter().sum(),
            handshake_timeouts,
            &self.registry,
        )
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
}

impl GatewayControl {
    fn registry(&self) -> Arc<Registry> {
        self.gateway.registry.clone()
    }
}
