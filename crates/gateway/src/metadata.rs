//! ServiceMetadata: the gateway's own answer about its health, channels, endpoints and
//! connectors, as much as the caller's authentication lets it see.

use channel::route::Auth;
use channel::tunnel::{self, Body};
use hyper::{Request, Response};
use time::OffsetDateTime;

use crate::device::Device;
use crate::{token, Shared};

/// What a ServiceMetadata caller may see.
pub(crate) enum MetadataView {
    /// Not authenticated: the service, its version and whether it is healthy.
    Anonymous,
    /// A trusted device certificate, or a token for every endpoint: channels, endpoints,
    /// connectors.
    Full,
    /// A token for these endpoints only: those endpoints (no connectors: they serve others
    /// too).
    Endpoints(Vec<u64>),
}

/// Whether the caller authenticated as its route asks: a trusted certificate on
/// CCM_PROXY_MUTUALAUTH, a device token on CCM_PROXY_SERVERAUTH. Anything else (none, an
/// untrusted certificate, a bad or bulk token) is anonymous, not refused: the service's health
/// is for anyone.
pub(crate) fn metadata_view(
    request: &Request<()>,
    auth: Auth,
    shared: &Shared,
    device: &Device,
) -> MetadataView {
    match auth {
        Auth::MutualTls => match device.state(shared).judgement.cert {
            Ok(_) => MetadataView::Full,
            Err(_) => MetadataView::Anonymous,
        },
        Auth::Token => {
            let auth = shared.auth.load();
            let Some(tokens) = &auth.tokens else {
                return MetadataView::Anonymous;
            };
            let authorization = request
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            match tokens.verify(authorization, OffsetDateTime::now_utc()) {
                Ok(claims) if claims.kind != token::TokenKind::Device => MetadataView::Anonymous,
                Ok(claims) if claims.endpoints.is_empty() => MetadataView::Full,
                Ok(claims) => MetadataView::Endpoints(claims.endpoints),
                Err(_) => MetadataView::Anonymous,
            }
        }
    }
}

pub(crate) fn service_metadata(shared: &Shared, view: MetadataView) -> Response<Body> {
    let healthy = shared.registry.channel_count() > 0;
    let only = match view {
        MetadataView::Anonymous => {
            let body = serde_json::json!({
                "service": "Portcullis gateway",
                "version": env!("CARGO_PKG_VERSION"),
                "healthy": healthy,
            });
            return json_response(&body);
        }
        MetadataView::Full => None,
        MetadataView::Endpoints(ids) => Some(ids),
    };
    let endpoints: Vec<serde_json::Value> = shared
        .registry
        .endpoints()
        .into_iter()
        .filter(|(id, ..)| only.as_ref().is_none_or(|ids| ids.contains(id)))
        .map(|(id, name, channels)| serde_json::json!({"id": id, "name": name, "channels": channels, "healthy": channels > 0}))
        .collect();
    if only.is_some() {
        let body = serde_json::json!({
            "service": "Portcullis gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "healthy": healthy,
            "endpoints": endpoints,
        });
        return json_response(&body);
    }
    let connectors: Vec<serde_json::Value> = shared
        .registry
        .connectors()
        .into_iter()
        .map(|(id, channels, has_cert)| serde_json::json!({"connector_id": id, "channels": channels, "has_client_certificate": has_cert}))
        .collect();
    let body = serde_json::json!({
        "service": "Portcullis gateway",
        "version": env!("CARGO_PKG_VERSION"),
        "healthy": healthy,
        "channels": shared.registry.channel_count(),
        "endpoints": endpoints,
        "connectors": connectors,
    });
    json_response(&body)
}

fn json_response(body: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(tunnel::full(body.to_string()))
        .unwrap_or_else(|_| Response::new(tunnel::empty()))
}
