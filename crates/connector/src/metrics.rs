//! The connector's Prometheus series (see `runtime::metrics` for the crate and the costs):
//! requests by endpoint, status and status text with the endpoint's time, channels held per
//! gateway, whether a client certificate is selected; and what `GET /readyz` says.
//!
//! A request is counted once, in `Service::handle`, when its answer's head (the endpoint's or
//! the refusal) is known.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;
use std::time::Instant;

use channel::refusal::Refusal;
use channel::tunnel::{headers, Body};
use hyper::Response;
use runtime::activity::{History, RateKey, Recent, RecentRefusal};
use runtime::metrics::{Expiry, Readiness, Registry, StatusText, Tally};

use crate::config::{split_host_port, ConnectorConfig};

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

/// One configured gateway and the channels held to it now.
struct Gateway {
    host: String,
    port: u16,
    /// As the configuration names it: the `gateway` label.
    label: String,
    held: AtomicUsize,
}

pub(crate) struct ConnectorMetrics {
    registry: Registry,
    requests: Tally<RequestKey>,
    gateways: Vec<Gateway>,
    /// The client certificate, the roots, the CRLs, the channel certificate; swapped on reload.
    certificates: RwLock<Vec<Expiry>>,
    /// For the status page: totals by status text over the last minutes, the last refusals.
    pub(crate) history: History,
    pub(crate) recent: Recent,
}

/// A channel held to a gateway, counted until dropped.
pub(crate) struct Held<'a>(Option<&'a AtomicUsize>);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(held) = self.0 {
            held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl ConnectorMetrics {
    pub(crate) fn new(shards: usize, config: &ConnectorConfig) -> ConnectorMetrics {
        ConnectorMetrics {
            registry: Registry::new(&[DURATION]),
            requests: Tally::new(shards),
            gateways: config
                .gateways
                .iter()
                .filter_map(|g| {
                    split_host_port(g).map(|(host, port)| Gateway {
                        host,
                        port,
                        label: g.clone(),
                        held: AtomicUsize::new(0),
                    })
                })
                .collect(),
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

    /// A channel to `host`:`port` is up until the returned guard is dropped.
    pub(crate) fn held(&self, host: &str, port: u16) -> Held<'_> {
        let gateway = self
            .gateways
            .iter()
            .find(|g| g.port == port && g.host == host)
            .map(|g| &g.held);
        if let Some(held) = gateway {
            held.fetch_add(1, Ordering::Relaxed);
        }
        Held(gateway)
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

    /// Channels held to each configured gateway now, by its name in the configuration.
    pub(crate) fn channels(&self) -> Vec<(String, usize)> {
        self.gateways
            .iter()
            .map(|g| (g.label.clone(), g.held.load(Ordering::Relaxed)))
            .collect()
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
        for (gateway, held) in self.channels() {
            now.gauge(
                "portcullis_connector_channels",
                "Channels held now, by gateway as the configuration names it.",
                &[("gateway", &gateway)],
            )
            .set(held as f64);
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

    /// Ready when a channel is held to every gateway and, where an endpoint is called over
    /// HTTPS (SPEC: such endpoints require the connector's client certificate), a client
    /// certificate is selected.
    pub(crate) fn readiness(
        &self,
        client_certificate: Option<String>,
        https_endpoints: Vec<u64>,
    ) -> Readiness {
        let mut missing = Vec::new();
        let channels = self.channels();
        for (gateway, held) in &channels {
            if *held == 0 {
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
        detail.insert(
            "channels".into(),
            channels
                .iter()
                .map(|(gateway, held)| serde_json::json!({"gateway": gateway, "channels": held}))
                .collect::<Vec<_>>()
                .into(),
        );
        detail.insert("client_certificate".into(), client_certificate.into());
        Readiness { missing, detail }
    }
}

/// What the connector answers for an endpoint id it does not serve.
const UNKNOWN_ENDPOINT: &str = "CMGService_Unknownendpoint";
