//! The gateway's Prometheus series (see `runtime::metrics` for the crate and the costs):
//! requests by route, endpoint, status and status text with their duration, TLS handshakes,
//! device connections and channels per connector; and what `GET /readyz` says.
//!
//! A request is counted once, in `forward::handle`, when its answer's head (or its refusal)
//! is known: [`GatewayMetrics::start`] before, [`GatewayMetrics::count`] after.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Instant;

use channel::refusal::{Cause, Refusal};
use channel::tunnel::{headers, Body};
use hyper::Response;
use runtime::activity::{History, RateKey, Recent, RecentRefusal};
use runtime::metrics::{Expiry, Readiness, Registry, StatusText, Tally};

use crate::channels;

const REQUESTS: &str = "portcullis_gateway_requests_total";
const DURATION: &str = "portcullis_gateway_request_duration_seconds";

/// The `route` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Route {
    MutualAuth,
    ServerAuth,
    Metadata,
    /// Not a gateway route (404 `CMGService_BadRoute`).
    None,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::MutualAuth => "mutualauth",
            Route::ServerAuth => "serverauth",
            Route::Metadata => "metadata",
            Route::None => "none",
        }
    }
}

/// The `endpoint` label: an id some connector announced or `ready_endpoints` names, "other"
/// for any other id a device wrote, "none" where the request named none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Endpoint {
    Id(u64),
    Other,
    None,
}

impl Endpoint {
    fn label(self) -> String {
        match self {
            Endpoint::Id(id) => id.to_string(),
            Endpoint::Other => "other".into(),
            Endpoint::None => "none".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct RequestKey {
    route: Route,
    endpoint: Endpoint,
    status: u16,
    text: StatusText,
}

/// A request being counted: what its path says, and when it came.
pub(crate) struct Counting {
    route: Route,
    endpoint: Option<u64>,
    started: Instant,
}

pub(crate) struct GatewayMetrics {
    registry: Registry,
    requests: Tally<RequestKey>,
    handshakes_ok: AtomicU64,
    handshakes_failed: AtomicU64,
    /// `ready_endpoints`, swapped on reload.
    ready_endpoints: RwLock<Vec<u64>>,
    /// The server certificate, the device and connector roots, the CRLs; swapped on reload.
    certificates: RwLock<Vec<Expiry>>,
    /// For the status page: totals by status text over the last minutes, the last refusals.
    pub(crate) history: History,
    pub(crate) recent: Recent,
}

impl GatewayMetrics {
    pub(crate) fn new(shards: usize, ready_endpoints: Vec<u64>, certificates: Vec<Expiry>) -> Self {
        GatewayMetrics {
            registry: Registry::new(&[DURATION]),
            requests: Tally::new(shards),
            handshakes_ok: AtomicU64::new(0),
            handshakes_failed: AtomicU64::new(0),
            ready_endpoints: RwLock::new(ready_endpoints),
            certificates: RwLock::new(certificates),
            history: History::default(),
            recent: Recent::default(),
        }
    }

    /// What a reload changes: `ready_endpoints` and the certificates.
    pub(crate) fn reloaded(&self, ready_endpoints: Vec<u64>, certificates: Vec<Expiry>) {
        *self
            .ready_endpoints
            .write()
            .unwrap_or_else(|p| p.into_inner()) = ready_endpoints;
        *self.certificates.write().unwrap_or_else(|p| p.into_inner()) = certificates;
    }

    pub(crate) fn certificates(&self) -> Vec<Expiry> {
        self.certificates
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn ready_endpoints(&self) -> Vec<u64> {
        self.ready_endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A request has come: its route and endpoint id, read from the path the way
    /// `route::parse` reads them (prefixes without regard to case), without its checks.
    pub(crate) fn start(uri: &hyper::Uri) -> Counting {
        let path = uri.path().as_bytes();
        let prefixed = |prefix: &str| {
            path.len() >= prefix.len()
                && path[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
        };
        let (route, rest) = if prefixed(channel::route::MUTUALAUTH) {
            (Route::MutualAuth, &path[channel::route::MUTUALAUTH.len()..])
        } else if prefixed(channel::route::SERVERAUTH) {
            (Route::ServerAuth, &path[channel::route::SERVERAUTH.len()..])
        } else {
            (Route::None, &path[..0])
        };
        let segment = rest.split(|b| *b == b'/').next().unwrap_or_default();
        let (route, endpoint) =
            if route != Route::None && segment.eq_ignore_ascii_case(b"ServiceMetadata") {
                (Route::Metadata, None)
            } else {
                let digits = !segment.is_empty() && segment.iter().all(u8::is_ascii_digit);
                let id = std::str::from_utf8(segment)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok());
                (route, id.filter(|_| digits))
            };
        Counting {
            route,
            endpoint,
            started: Instant::now(),
        }
    }

    /// The request's answer head is known: `refusal` when the gateway refused it itself;
    /// `device` is who asked (for the status page's last refusals, never a label).
    pub(crate) fn count(
        &self,
        counting: Counting,
        response: &Response<Body>,
        refusal: Option<&Refusal>,
        channels: &channels::Registry,
        device: std::net::SocketAddr,
    ) {
        let status = response.status().as_u16();
        let text = match refusal {
            Some(refusal) => StatusText::of_text(refusal.text),
            None => StatusText::of(
                response
                    .headers()
                    .get(headers::STATUS_TEXT)
                    .map(|v| v.as_bytes()),
            ),
        };
        let endpoint = match (counting.endpoint, refusal) {
            (None, _) => Endpoint::None,
            // Answered through a channel: a connector announced it.
            (Some(id), None) => Endpoint::Id(id),
            (
                Some(_),
                Some(Refusal {
                    cause: Cause::UnknownEndpoint { .. },
                    ..
                }),
            ) => Endpoint::Other,
            (Some(id), Some(_)) => {
                if channels.is_known(id) || self.ready_endpoints().contains(&id) {
                    Endpoint::Id(id)
                } else {
                    Endpoint::Other
                }
            }
        };
        if refusal.is_some() || text.is_refusal() {
            self.recent.push(RecentRefusal {
                at: time::OffsetDateTime::now_utc(),
                status,
                text: text.label(status),
                endpoint: endpoint.label(),
                from: device.to_string(),
                reason: match refusal {
                    Some(refusal) => format!("{} ({})", refusal.reason(), refusal.hop.describe()),
                    None => "refused by the connector: its status page and log say why".into(),
                },
            });
        }
        let key = RequestKey {
            route: counting.route,
            endpoint,
            status,
            text,
        };
        self.requests
            .add(key, counting.started.elapsed().as_secs_f64(), |key| {
                self.registry.histogram(
                    DURATION,
                    "Time from a device's request to its answer's head (or refusal), by endpoint.",
                    &[("endpoint", &key.endpoint.label())],
                )
            });
    }

    /// A TLS handshake with a device or a connector ended (a timeout is counted by `limits`).
    pub(crate) fn handshake(&self, ok: bool) {
        let counter = if ok {
            &self.handshakes_ok
        } else {
            &self.handshakes_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
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

    /// The series, as scraped now: `devices` device connections open, `handshake_timeouts`
    /// from the connection counts.
    pub(crate) fn render(
        &self,
        devices: usize,
        handshake_timeouts: u64,
        channels: &channels::Registry,
    ) -> String {
        for (key, total) in self.requests.totals() {
            self.registry
                .counter(
                    REQUESTS,
                    "Device requests answered or refused, by route, endpoint id, HTTP status and status text.",
                    &[
                        ("route", key.route.label()),
                        ("endpoint", &key.endpoint.label()),
                        ("status", &key.status.to_string()),
                        ("status_text", key.text.label(key.status)),
                    ],
                )
                .absolute(total);
        }
        for (result, n) in [
            ("ok", self.handshakes_ok.load(Ordering::Relaxed)),
            ("failed", self.handshakes_failed.load(Ordering::Relaxed)),
            ("timeout", handshake_timeouts),
        ] {
            self.registry
                .counter(
                    "portcullis_gateway_tls_handshakes_total",
                    "TLS handshakes with devices and connectors, by result (ok, failed, timeout).",
                    &[("result", result)],
                )
                .absolute(n);
        }
        let mut text = self.registry.render();
        let now = Registry::new(&[]);
        now.gauge(
            "portcullis_gateway_device_connections",
            "Device connections open now (channels until their hello is done).",
            &[],
        )
        .set(devices as f64);
        for (connector, held, _) in channels.connectors() {
            now.gauge(
                "portcullis_gateway_channels",
                "Channels held now, by connector id.",
                &[("connector", &connector)],
            )
            .set(held as f64);
        }
        // Every endpoint a connector announced and each of ready_endpoints: 0 is an endpoint
        // devices cannot reach (the alert PortcullisEndpointWithoutChannel).
        let mut endpoints: Vec<(u64, usize)> = channels
            .endpoints()
            .into_iter()
            .map(|(id, _, live)| (id, live))
            .collect();
        for id in self.ready_endpoints() {
            if !endpoints.iter().any(|(e, _)| *e == id) {
                endpoints.push((id, 0));
            }
        }
        for (id, live) in endpoints {
            now.gauge(
                "portcullis_gateway_endpoint_channels",
                "Channels serving each endpoint now: every endpoint a connector announced since start, and each of ready_endpoints.",
                &[("endpoint", &id.to_string())],
            )
            .set(live as f64);
        }
        text.push_str(&now.render());
        text
    }

    /// Ready when a channel serves every endpoint of `ready_endpoints`, or, without them, when
    /// any channel is held.
    pub(crate) fn readiness(&self, channels: &channels::Registry) -> Readiness {
        let endpoints = channels.endpoints();
        let wanted = self.ready_endpoints();
        let mut missing = Vec::new();
        if wanted.is_empty() {
            if channels.channel_count() == 0 {
                missing.push("no connector holds a channel to this gateway".to_string());
            }
        } else {
            for id in &wanted {
                match endpoints.iter().find(|(e, ..)| e == id) {
                    Some((_, _, live)) if *live > 0 => {}
                    Some((_, name, _)) => missing.push(format!(
                        "endpoint {id} ({name}): no connector serving it holds a channel now"
                    )),
                    None => missing.push(format!(
                        "endpoint {id}: no connector has announced it (ready_endpoints)"
                    )),
                }
            }
        }
        let mut detail = serde_json::Map::new();
        detail.insert("channels".into(), channels.channel_count().into());
        detail.insert("ready_endpoints".into(), wanted.into());
        detail.insert(
            "endpoints".into(),
            endpoints
                .iter()
                .map(|(id, name, live)| serde_json::json!({"id": id, "name": name, "channels": live}))
                .collect::<Vec<_>>()
                .into(),
        );
        Readiness { missing, detail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_and_endpoint_come_from_the_path_as_route_parse_reads_them() {
        let of = |path: &str| {
            let c = GatewayMetrics::start(&path.parse().unwrap());
            (c.route, c.endpoint)
        };
        assert_eq!(
            of("/CCM_PROXY_MUTUALAUTH/3456/SMS_MP/.sms_aut?SITESIGNCERT"),
            (Route::MutualAuth, Some(3456))
        );
        assert_eq!(of("/ccm_proxy_serverauth/7"), (Route::ServerAuth, Some(7)));
        assert_eq!(
            of("/CCM_PROXY_SERVERAUTH/servicemetadata"),
            (Route::Metadata, None)
        );
        assert_eq!(of("/CCM_PROXY_MUTUALAUTH/+7/x"), (Route::MutualAuth, None));
        assert_eq!(
            of("/CCM_PROXY_MUTUALAUTH/99999999999999999999999/x"),
            (Route::MutualAuth, None)
        );
        assert_eq!(of("/SMS_MP/.sms_aut"), (Route::None, None));
        assert_eq!(of("/"), (Route::None, None));
    }
}
