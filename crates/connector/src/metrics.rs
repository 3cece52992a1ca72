//! The connector's Prometheus series (see `runtime::metrics` for the crate and the costs):
//! requests by endpoint, status and status text with the endpoint's time, channels held per
//! gateway instance, whether a client certificate is selected; and what `GET /readyz` says.
//!
//! A request is counted once, in `Service::handle`, when its answer's head (the endpoint's or
//! the refusal) is known.

use std::sync::RwLock;
use std::time::Instant;

use channel::refusal::Refusal;
use channel::tunnel::{headers, Body};
use hyper::Response;
use runtime::activity::{History, RateKey, Recent, RecentRefusal};
use runtime::metrics::{Expiry, Readiness, Registry, StatusText, Tally};

use crate::config::ConnectorConfig;
use crate::instances::{Entries, EntryNow};

const REQUESTS: &str = "portcullis_connector_requests_total";
const DURATION: &str = "portcullis_connector_endpoint_duration_seconds";

/// The `endpoint` label: a configured endpoint id, or "other" (the gateway asked for one this
/// connector does not serve: 404 `CMGService_Unknownendpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Endpoint {
    Id(u64),
    Other,
}

impl Endpoint {
    fn label(self) -> String {
        match self {
            Endpoint::Id(id) => id.to_string(),
            Endpoint::Other => "other".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct RequestKey {
    endpoint: Endpoint,
    status: u16,
    text: StatusText,
}

/// A refusal the connector made, in its response's extensions: what the status page lists.
#[derive(Clone)]
pub(crate) struct Refused {
    pub(crate) refusal: Refusal,
    pub(crate) message_id: String,
}

/// A request being counted: the endpoint id the gateway named, and when it came.
pub(crate) struct Counting {
    endpoint: Option<u64>,
    started: Instant,
}

pub(crate) struct ConnectorMetrics {
    registry: Registry,
    requests: Tally<RequestKey>,
    /// Each `gateways` entry and its instances now (`crate::instances`).
    pub(crate) entries: Entries,
    /// The client certificate, the roots, the CRLs, the channel certificate; swapped on reload.
    certificates: RwLock<Vec<Expiry>>,
    /// For the status page: totals by status text over the last minutes, the last refusals.
    pub(crate) history: History,
    pub(crate) recent: Recent,
}

impl ConnectorMetrics {
    pub(crate) fn new(shards: usize, config: &ConnectorConfig) -> ConnectorMetrics {
        ConnectorMetrics {
            registry: Registry::new(&[DURATION]),
            requests: Tally::new(shards),
            entries: Entries::new(config),
            certificates: RwLock::new(Vec::new()),
            history: History::default(),
            recent: Recent::default(),
        }
    }

    /// The certificates as chosen and loaded now: `chosen` (the client certificate, allowed
    /// and endpoint roots, endpoint CRLs) and, from `config`, the channel certificate and the
    /// gateway roots.
    pub(crate) fn set_certificates(&self, config: &ConnectorConfig, chosen: Vec<Expiry>) {
        let mut all = chosen;
        if let Some(leaf) = pki::tls::Identity::load(&config.channel_cert, &config.channel_key)
            .ok()
            .and_then(|i| i.chain.into_iter().next())
            .and_then(|leaf| pki::Certificate::from_der(leaf.as_ref()).ok())
        {
            all.push(Expiry::of("channel", &leaf));
        }
        if let Ok(roots) = pki::RootSet::load(&config.gateway_roots) {
            all.extend(runtime::metrics::roots_expiry("gateway_root", &roots));
        }
        *self.certificates.write().unwrap_or_else(|p| p.into_inner()) = all;
    }

    pub(crate) fn certificates(&self) -> Vec<Expiry> {
        self.certificates
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A request for `endpoint` (the id the gateway sent) has come.
    pub(crate) fn start(endpoint: Option<u64>) -> Counting {
        Counting {
            endpoint,
            started: Instant::now(),
        }
    }

    /// The answer's head is known.
    pub(crate) fn count(&self, counting: Counting, response: &Response<Body>) {
        let status = response.status().as_u16();
        let text = StatusText::of(
            response
                .headers()
                .get(headers::STATUS_TEXT)
                .map(|v| v.as_bytes()),
        );
        // Only an id this connector serves gets past the refusal for an unknown one.
        let endpoint = match counting.endpoint {
            Some(id) if !(text.is_refusal() && text.label(status) == UNKNOWN_ENDPOINT) => {
                Endpoint::Id(id)
            }
            _ => Endpoint::Other,
        };
        if let Some(refused) = response.extensions().get::<Refused>() {
            self.recent.push(RecentRefusal {
                at: time::OffsetDateTime::now_utc(),
                status,
                text: text.label(status),
                endpoint: endpoint.label(),
                from: format!("message {}", refused.message_id),
                reason: format!(
                    "{} ({})",
                    refused.refusal.reason(),
                    refused.refusal.hop.describe()
                ),
            });
        }
        let key = RequestKey {
            endpoint,
            status,
            text,
        };
        self.requests
            .add(key, counting.started.elapsed().as_secs_f64(), |key| {
                self.registry.histogram(
                    DURATION,
                    "Time from a request on a channel to the endpoint's answer head (or the refusal), by endpoint.",
                    &[("endpoint", &key.endpoint.label())],
                )
            });
    }

    /// Folds histogram samples into buckets (see `runtime::metrics::Registry::upkeep`) and
    /// samples the totals for the status page's rates.
    pub(crate) fn upkeep(&self) {
        self.registry.upkeep();
        self.history.sample(self.rate_totals());
    }

    /// Requests by status and status text since start.
    pub(crate) fn rate_totals(&self) -> std::collections::HashMap<RateKey, u64> {
        runtime::activity::totals_by_status(self.requests.totals(), |k| (k.status, k.text))
    }

    /// Each configured gateway now: its instances and the channels held to each.
    pub(crate) fn channels(&self) -> Vec<EntryNow> {
        self.entries.now()
    }

    /// The series, as scraped now; `has_client_certificate`: whether the filter chain chose one.
    pub(crate) fn render(&self, has_client_certificate: bool) -> String {
        for (key, total) in self.requests.totals() {
            self.registry
                .counter(
                    REQUESTS,
                    "Requests forwarded to endpoints or refused, by endpoint id, HTTP status and status text.",
                    &[
                        ("endpoint", &key.endpoint.label()),
                        ("status", &key.status.to_string()),
                        ("status_text", key.text.label(key.status)),
                    ],
                )
                .absolute(total);
        }
        let mut text = self.registry.render();
        let now = Registry::new(&[]);
        // Built anew at each scrape: a vanished instance's series goes with it.
        for entry in self.channels() {
            now.gauge(
                "portcullis_connector_gateway_instances",
                "Instances each gateway entry stands for now (a name: the addresses it resolves to, the last known while resolving fails).",
                &[("gateway", &entry.gateway)],
            )
            .set(entry.instances.len() as f64);
            for instance in entry.instances {
                now.gauge(
                    "portcullis_connector_channels",
                    "Channels held now, by gateway as the configuration names it and instance address.",
                    &[
                        ("gateway", &entry.gateway),
                        ("address", &instance.address.to_string()),
                    ],
                )
                .set(instance.channels as f64);
            }
        }
        now.gauge(
            "portcullis_connector_client_certificate_selected",
            "1 when the filter chain selected a client authentication certificate for the endpoints, 0 when none survived (endpoints requiring one answer 403 CMGConnector_Clientcertificaterequired).",
            &[],
        )
        .set(if has_client_certificate { 1.0 } else { 0.0 });
        text.push_str(&now.render());
        text
    }

    /// Ready when a channel is held to every gateway instance (each entry resolved) and,
    /// where an endpoint is called over
    /// HTTPS (SPEC: such endpoints require the connector's client certificate), a client
    /// certificate is selected.
    pub(crate) fn readiness(
        &self,
        client_certificate: Option<String>,
        https_endpoints: Vec<u64>,
    ) -> Readiness {
        let mut missing = Vec::new();
        let channels = self.channels();
        for entry in &channels {
            if let Some(why) = &entry.unresolved {
                missing.push(format!(
                    "gateway {}: no instance known: {why} (the log's \"Cannot resolve gateway\" lines say more)",
                    entry.gateway
                ));
            }
            for instance in entry.instances.iter().filter(|i| i.channels == 0) {
                let gateway = &instance.label;
                missing.push(format!(
                    "gateway {gateway}: no channel held (the log's \"Channel N to gateway {gateway}\" lines say why)"
                ));
            }
        }
        if client_certificate.is_none() && !https_endpoints.is_empty() {
            missing.push(format!(
                "no client authentication certificate selected for the HTTPS endpoints {https_endpoints:?}: they will answer 403 CMGConnector_Clientcertificaterequired (portcullis doctor certs --store DIR --allowed-roots FILE names the stage that dropped each certificate)"
            ));
        }
        let mut detail = serde_json::Map::new();
        detail.insert("channels".into(), instances_json(&channels).into());
        detail.insert("client_certificate".into(), client_certificate.into());
        Readiness { missing, detail }
    }
}

/// What the connector answers for an endpoint id it does not serve.
const UNKNOWN_ENDPOINT: &str = "CMGService_Unknownendpoint";

/// Each instance as `/status` and `/readyz` list it: the entry, the address, the channels
/// held; an entry with no instance known as the entry and why.
pub(crate) fn instances_json(entries: &[EntryNow]) -> Vec<serde_json::Value> {
    let mut listed = Vec::new();
    for entry in entries {
        if let Some(why) = &entry.unresolved {
            listed.push(serde_json::json!({
                "gateway": entry.gateway, "address": null, "channels": 0, "unresolved": why,
            }));
        }
        for instance in &entry.instances {
            listed.push(serde_json::json!({
                "gateway": entry.gateway,
                "address": instance.address.to_string(),
                "channels": instance.channels,
            }));
        }
    }
    listed
}
