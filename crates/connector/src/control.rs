//! A running connector as its admin surface sees it: [`ConnectorControl`], its
//! `runtime::admin::Control`, which `portcullis connector`, `portcullis dev` and the tests
//! serve. Made by `RunningConnector::control`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use logs::Log;
use runtime::admin::{Control, ReloadError};
use runtime::metrics::{Expiry, Readiness};
use runtime::page::{Cell, Page, Section, Tone};

use crate::config::ConnectorConfig;
use crate::dial::Tasks;
use crate::lock;
use crate::service::Service;

/// Reloads from the file at `path` (SIGHUP or `POST /reload`); turning verbose on replays the
/// certificate filter trail of the current choice.
pub struct ConnectorControl {
    pub(crate) path: PathBuf,
    pub(crate) service: Arc<Service>,
    pub(crate) tasks: Arc<Mutex<Tasks>>,
    /// The configuration it started with: what a reload cannot change is compared with it.
    pub(crate) started: Arc<ConnectorConfig>,
}

impl ConnectorControl {
    fn client_certificate(&self) -> Option<String> {
        self.service.client.load().selected_label()
    }
}

impl Control for ConnectorControl {
    fn log(&self) -> &Log {
        &self.service.log
    }

    fn reload(&self) -> Result<String, ReloadError> {
        let loaded = ConnectorConfig::load(&self.path)
            .map_err(ReloadError::from)
            .and_then(|c| {
                crate::run::reload(&self.service, &self.started, &c)
                    .map_err(|e| ReloadError::Refused(Box::new(e)))
            });
        runtime::admin::reloaded(self.log(), &self.path, loaded)
    }

    fn verbose_turned_on(&self) {
        let trail = lock(&self.service.trail);
        for (severity, line) in trail.iter() {
            self.service.log.write(*severity, line);
        }
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "client_certificate": self.client_certificate(),
            "channels_kept": lock(&self.tasks).live.load(std::sync::atomic::Ordering::Relaxed),
            "instances": crate::metrics::instances_json(&self.service.metrics.channels()),
        })
    }

    fn metrics(&self) -> String {
        self.service
            .metrics
            .render(self.client_certificate().is_some())
    }

    fn certificates(&self) -> Vec<Expiry> {
        self.service.metrics.certificates()
    }

    fn page(&self) -> Page {
        let metrics = &self.service.metrics;
        let certificate = self.client_certificate();
        let channels = metrics.channels();
        let held: usize = channels
            .iter()
            .flat_map(|e| &e.instances)
            .map(|i| i.channels)
            .sum();
        let mut rows = Vec::new();
        for entry in channels {
            if let Some(why) = &entry.unresolved {
                rows.push(vec![
                    Cell::new(entry.gateway.clone()),
                    Cell::toned(format!("none known: {why}"), Tone::Bad),
                    Cell::toned("0", Tone::Bad),
                ]);
            }
            for instance in entry.instances {
                let n = instance.channels;
                let tone = if n > 0 { Tone::Good } else { Tone::Bad };
                rows.push(vec![
                    Cell::new(entry.gateway.clone()),
                    Cell::new(instance.address.to_string()),
                    Cell::toned(n.to_string(), tone),
                ]);
            }
        }
        let gateways = Section {
            id: "channels",
            title: "Channels per gateway instance".into(),
            note: "Each gateway instance: the entry in the configuration, the address (a name stands for every address it resolves to, resolved again every gateway_resolve_secs) and the channels held to it now (the log's \"Channel N to gateway\" and \"Cannot resolve gateway\" lines say why one is missing).".into(),
            head: vec!["gateway", "address", "channels"],
            rows,
            empty: "No gateway is configured.".into(),
        };
        let mut endpoints: Vec<(u64, String)> = self
            .service
            .endpoints
            .load()
            .iter()
            .map(|(id, url)| (*id, url.to_string()))
            .collect();
        endpoints.sort();
        let names = crate::lock(&self.service.hello).endpoints.clone();
        let endpoints = Section {
            id: "endpoints",
            title: "Endpoints".into(),
            note: "Each endpoint this connector forwards to, and whether devices can reach it now: a channel held to a gateway and, over HTTPS, a client certificate to present.".into(),
            head: vec!["endpoint", "name", "URL", "served"],
            rows: endpoints
                .into_iter()
                .map(|(id, url)| {
                    let name = names
                        .iter()
                        .find(|e| e.id == id)
                        .map(|e| e.name.clone())
                        .unwrap_or_default();
                    let served = if held == 0 {
                        Cell::toned("no: no channel to any gateway", Tone::Bad)
                    } else if certificate.is_none() && url.starts_with("https:") {
                        Cell::toned(
                            "no client certificate: 403 CMGConnector_Clientcertificaterequired",
                            Tone::Bad,
                        )
                    } else {
                        Cell::toned("yes", Tone::Good)
                    };
                    vec![Cell::new(id.to_string()), Cell::new(name), Cell::new(url), served]
                })
                .collect(),
            empty: "No endpoint is configured.".into(),
        };
        let totals = metrics.rate_totals();
        Page {
            component: "connector".into(),
            facts: vec![
                ("connector id".into(), self.started.connector_id.clone()),
                ("version".into(), env!("CARGO_PKG_VERSION").into()),
                (
                    "client certificate".into(),
                    certificate.unwrap_or_else(|| "none selected".into()),
                ),
                (
                    "verbose log".into(),
                    if self.service.log.is_verbose() {
                        "on"
                    } else {
                        "off"
                    }
                    .into(),
                ),
            ],
            readiness: self.readiness(),
            sections: vec![gateways, endpoints],
            rates: metrics.history.rates(&totals),
            certificates: metrics.certificates(),
            refusals: metrics.recent.list(),
        }
    }

    fn readiness(&self) -> Readiness {
        let mut https: Vec<u64> = self
            .service
            .endpoints
            .load()
            .iter()
            .filter(|(_, url)| url.scheme_str() == Some("https"))
            .map(|(id, _)| *id)
            .collect();
        https.sort_unstable();
        self.service
            .metrics
            .readiness(self.client_certificate(), https)
    }
}
