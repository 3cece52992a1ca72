//! The request path: a device's request checked, authenticated, rewritten for the channel and
//! sent; the connector's answer (or the refusal) back to the device.

use std::sync::Arc;

use channel::refusal::{Cause, Refusal};
use channel::route::{self, Auth, Route};
use channel::tunnel::{self, headers, Body};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response};
use time::OffsetDateTime;

use crate::channels::Channel;
use crate::device::{header_safe, never_indexed, Device, DeviceState, Identity};
use crate::metadata::{metadata_view, service_metadata};
use crate::{idle, refused, token, Shared};

/// The methods the gateway forwards: HTTP's own but CONNECT (a tunnel, which HTTP/2 carries
/// without a path: the connector refused each such stream, and h2 closes a channel after
/// 1,024 refusals) and TRACE (it echoes headers back); and Configuration Manager's extension
/// methods: `CCM_POST` (its clients' requests to a management point) and `BITS_POST` (BITS
/// uploads), and WebDAV's `PROPFIND` (BITS and distribution points list content with it).
/// Anything else gets 405 with `Allow`.
pub(crate) const FORWARDED_METHODS: &str =
    "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, CCM_POST, BITS_POST, PROPFIND";

fn is_forwarded(method: &hyper::Method) -> bool {
    use hyper::Method;
    matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::OPTIONS
    ) || matches!(method.as_str(), "CCM_POST" | "BITS_POST" | "PROPFIND")
}

/// A header block's size as HPACK counts it (RFC 7541 4.1: name, value and 32 a field), with
/// the pseudo-header fields the request goes on the channel with (`:method`, `:scheme`,
/// `:path`; h2 sends no `:authority` for a path-only URI).
fn header_block_size(parts: &hyper::http::request::Parts) -> usize {
    let pseudo = (7 + parts.method.as_str().len() + 32)
        + (7 + 5 + 32)
        + (5 + parts.uri.path_and_query().map_or(1, |p| p.as_str().len()) + 32);
    parts.headers.iter().fold(pseudo, |size, (name, value)| {
        size + name.as_str().len() + value.len() + 32
    })
}

/// What a request's refusal needs of it, kept by [`handle`] while the request is routed: its
/// message id (every log line about the request names it), and its body while the gateway
/// still holds it, or, once it went on a channel, how it fared there.
pub(crate) struct Pending {
    pub(crate) message_id: String,
    pub(crate) body: Option<Incoming>,
    pub(crate) watch: Option<Arc<idle::BodyWatch>>,
    /// The device connection's HTTP version: over HTTP/1.1 a body left unread is drained.
    pub(crate) version: hyper::Version,
}

pub(crate) async fn handle(
    request: Request<Incoming>,
    shared: &Shared,
    device: &Arc<Device>,
) -> Response<Body> {
    let counting = crate::metrics::GatewayMetrics::start(request.uri());
    // The body is held apart from the head: should the request be refused before the body
    // goes on a channel, what the device still sends of it is read here (`refused`).
    let (parts, body) = request.into_parts();
    let mut pending = Pending {
        message_id: shared.message_ids.next(),
        body: Some(body),
        watch: None,
        version: parts.version,
    };
    let (response, refusal) =
        match route_request(Request::from_parts(parts, ()), &mut pending, shared, device).await {
            Ok(response) => (response, None),
            Err(refusal) => (
                refused::answer(refusal.clone(), pending, shared, device).await,
                Some(refusal),
            ),
        };
    (shared.metrics).count(
        counting,
        &response,
        refusal.as_ref(),
        &shared.registry,
        device.addr,
    );
    response
}

/// A device's request, checked and parsed, in three steps: [`authenticate`] (who the device
/// is), [`rewrite_for_channel`] (the request as it goes on the channel) and [`send`] (on the
/// channel, within the timeout, and the answer fixed up for the device).
async fn route_request(
    request: Request<()>,
    pending: &mut Pending,
    shared: &Shared,
    device: &Arc<Device>,
) -> Result<Response<Body>, Refusal> {
    let target = checked_target(&request)?;
    let (auth, endpoint, path, forward_target) = match parse_route(&target)? {
        Route::ServiceMetadata { auth } => {
            let view = metadata_view(&request, auth, shared, device);
            return Ok(service_metadata(shared, view));
        }
        Route::Proxy {
            auth,
            endpoint,
            path,
            target,
            ..
        } => (auth, endpoint, path, target),
    };
    let mut state = None;
    let claims = match auth {
        Auth::Token => Some(token_claims(&request, endpoint, path, shared).await?),
        Auth::MutualTls => None,
    };
    let identity = authenticate(claims, shared, device, &mut state)?;
    // The device connection's share of channel streams; counted until the answer's body is
    // dropped.
    let in_flight = idle::InFlight::enter(device, shared.max_streams_per_device)?;
    // Picked before the rewrite: the header budget is the channel's connector's too.
    let channel = shared
        .registry
        .pick(endpoint)
        .map_err(|refusal| while_starting(refusal, shared))?;
    let started = std::time::Instant::now();

    let forward = rewrite_for_channel(
        request,
        pending,
        forward_target,
        endpoint,
        &identity,
        &channel,
        shared,
        device,
    )?;
    shared.log.verbose(|| {
        format!(
            "Message {}: {} {} from device {} ({}) to endpoint {endpoint} over channel {} of connector {}",
            pending.message_id,
            forward.method(),
            forward.uri(),
            device.addr,
            identity,
            channel.id,
            channel.hello.connector_id,
        )
    });
    send(
        forward, &channel, endpoint, started, in_flight, pending, shared, device,
    )
    .await
}

/// An endpoint nobody has announced is [`Cause::GatewayStarting`] rather than
/// [`Cause::UnknownEndpoint`] for `startup_grace_secs` after the gateway starts: the
/// connectors may still be redialling it.
fn while_starting(refusal: Refusal, shared: &Shared) -> Refusal {
    match refusal.cause {
        Cause::UnknownEndpoint { endpoint } if shared.epoch.elapsed() < shared.startup_grace => {
            Refusal::new(Cause::GatewayStarting {
                endpoint,
                since_secs: shared.epoch.elapsed().as_secs(),
                grace_secs: shared.startup_grace.as_secs(),
            })
        }
        _ => refusal,
    }
}

/// The request target of a request the gateway takes on (a method it forwards, transfer
/// codings it can pass on): the first checks, before the route and anyone's authentication.
pub(crate) fn checked_target<B>(request: &Request<B>) -> Result<String, Refusal> {
    // First: a CONNECT in authority form has no path to route by, and is still a CONNECT.
    if !is_forwarded(request.method()) {
        return Err(Refusal::new(Cause::MethodNotAllowed {
            method: header_safe(request.method().as_str()),
        }));
    }
    refuse_transfer_codings(request.headers())?;
    // Copied, to outlive the request's taking apart. (A clone of the PathAndQuery, which
    // shares its bytes, measured no better.)
    Ok(request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into()))
}

/// The route of a request target, or the refusal a device gets for it.
pub(crate) fn parse_route(target: &str) -> Result<Route<'_>, Refusal> {
    route::parse(target).map_err(|e| {
        Refusal::new(Cause::BadRoute {
            detail: e.to_string(),
        })
    })
}

/// The claims of the request's token, checked for `endpoint` and `path` (an OIDC issuer's
/// keys may be fetched first: see [`crate::token::TokenPolicy::authorize`]).
async fn token_claims(
    request: &Request<()>,
    endpoint: u64,
    path: &str,
    shared: &Shared,
) -> Result<token::Claims, Refusal> {
    let auth = shared.auth.load_full();
    let Some(tokens) = &auth.tokens else {
        return Err(Refusal::new(Cause::InvalidToken {
            check: "token authentication is not configured on this gateway ([tokens] keys)".into(),
        }));
    };
    let authorization = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    tokens
        .authorize(authorization, endpoint, path, OffsetDateTime::now_utc())
        .await
        .map_err(Refusal::new)
}

/// Who the device is, as the connector will be told: a certificate (its judgement under the
/// current settings, kept in `state`), or the subject of the token's `claims` (checked, on a
/// token route).
fn authenticate<'s>(
    claims: Option<token::Claims>,
    shared: &Shared,
    device: &Device,
    state: &'s mut Option<Arc<DeviceState>>,
) -> Result<Identity<'s>, Refusal> {
    Ok(match claims {
        None => {
            let state: &'s Arc<DeviceState> = state.insert(device.state(shared));
            match &state.judgement.cert {
                Ok(cert) => Identity::Certificate {
                    thumbprint: &cert.thumbprint,
                    header: &state.device_header,
                    cert_header: state.cert_header.as_deref(),
                },
                Err(cause) => return Err(Refusal::new(cause.clone())),
            }
        }
        Some(claims) => Identity::Token {
            subject: claims.sub.unwrap_or_default(),
            id: claims.jti.unwrap_or_default(),
        },
    })
}

/// The request as it goes on `channel`: its head rewritten ([`rewrite_head`]) within the
/// header budget of the gateway and of the channel's connector, and a body watched for stalls
/// (taken from `pending`, which keeps its watch).
#[allow(clippy::too_many_arguments)] // each is one thing the request is made of
fn rewrite_for_channel(
    request: Request<()>,
    pending: &mut Pending,
    forward_target: &str,
    endpoint: u64,
    identity: &Identity<'_>,
    channel: &Channel,
    shared: &Shared,
    device: &Device,
) -> Result<Request<Body>, Refusal> {
    let (mut parts, ()) = request.into_parts();
    // The connector's own limit, announced in its hello, is the budget when it is the
    // smaller.
    let limit = channel
        .hello
        .max_request_header_bytes
        .map_or(shared.max_request_header_bytes, |theirs| {
            shared.max_request_header_bytes.min(theirs as usize)
        });
    rewrite_head(
        &mut parts,
        &Rewrite {
            forward_target,
            endpoint,
            message_id: &pending.message_id,
            identity,
            device: device.addr,
            cert_header: shared.cert_header.load().as_deref(),
            limit,
        },
    )?;
    // Checked before the body is taken: a refusal until here still has it to read.
    let Some(body) = pending.body.take() else {
        return Err(Refusal::new(Cause::ChannelBroken {
            detail: "the request's body was already taken".into(),
        }));
    };
    // A body the device stops sending resets its stream after device_idle_timeout_secs, and
    // a refusal after this learns whether it ended. Only a request with a body pays for the
    // watch.
    let body = if hyper::body::Body::is_end_stream(&body) {
        tunnel::boxed(body)
    } else {
        let watch = Arc::new(idle::BodyWatch::default());
        pending.watch = Some(watch.clone());
        let drain = (pending.version != hyper::Version::HTTP_2).then_some(idle::Drain {
            bytes: shared.refused_body_drain_bytes,
            time: shared.refused_body_drain_time,
        });
        tunnel::boxed(idle::DeviceBody::new(
            body,
            shared.device_idle,
            watch,
            drain,
        ))
    };
    Ok(Request::from_parts(parts, body))
}

/// What [`rewrite_head`] puts in a request's head.
pub(crate) struct Rewrite<'a> {
    /// The path and query after the endpoint id, as the device sent them.
    pub(crate) forward_target: &'a str,
    pub(crate) endpoint: u64,
    pub(crate) message_id: &'a str,
    pub(crate) identity: &'a Identity<'a>,
    pub(crate) device: std::net::SocketAddr,
    /// `client_cert_header`, when configured.
    pub(crate) cert_header: Option<&'a hyper::header::HeaderName>,
    /// The header budget: what goes on the channel, metadata included.
    pub(crate) limit: usize,
}

/// A device's request head as it goes on a channel: the path after the endpoint id, the
/// device's headers less what it may not send, the metadata (message id, endpoint, device)
/// and forwarded headers, within the header budget (else 431).
pub(crate) fn rewrite_head(
    parts: &mut hyper::http::request::Parts,
    rewrite: &Rewrite<'_>,
) -> Result<(), Refusal> {
    let forward_target = rewrite.forward_target;
    // The path and query as the device sent them after the endpoint id, as they are: no
    // formatting (a cost on every request), only for a bare `?query` or nothing.
    let uri = if forward_target.starts_with('/') {
        hyper::Uri::try_from(forward_target)
    } else {
        hyper::Uri::try_from(format!("/{forward_target}"))
    };
    parts.uri = uri.map_err(|e: hyper::http::uri::InvalidUri| {
        Refusal::new(Cause::BadRoute {
            detail: e.to_string(),
        })
    })?;
    // The device's own headers go on as they are, minus hop-by-hop ones, any claim to be
    // Portcullis metadata and any header an endpoint may trust to say who called (set below);
    // the map is edited in place rather than rebuilt.
    headers::strip_device(&mut parts.headers);
    // What the device's own connection carried (HTTP/2 stream state, upgrades) stays here.
    parts.version = hyper::Version::HTTP_11;
    parts.extensions = hyper::http::Extensions::new();
    let map = &mut parts.headers;
    // The message id, unique to the request, is sent never-indexed so it does not churn the
    // channel's HPACK table; the device line, the same for a connection's every request, is
    // indexed and goes as a table index (the connector decodes every header of every
    // request). Hex digits only: a valid header value as it is, with no sanitising copy.
    let message_id = rewrite.message_id;
    let mut id_header =
        HeaderValue::from_str(message_id).unwrap_or_else(|_| never_indexed(message_id));
    id_header.set_sensitive(true);
    map.insert(headers::MESSAGE_ID, id_header);
    map.insert(headers::ENDPOINT, HeaderValue::from(rewrite.endpoint));
    let device_header = match rewrite.identity {
        Identity::Certificate { header, .. } => (*header).clone(),
        // A token's id differs from token to token: not worth a table entry.
        Identity::Token { subject, id } => {
            never_indexed(&format!("{subject} (token {id}) from {}", rewrite.device))
        }
    };
    // Who called, and from where: the connector gives the endpoint `X-Forwarded-For` and
    // `Forwarded` from this line's address (two more headers on the channel cost both ends'
    // HPACK more than the connector's making them).
    map.insert(headers::DEVICE, device_header);
    match rewrite.identity {
        Identity::Certificate {
            cert_header: Some(cert_header),
            ..
        } => {
            map.insert(cert_header.0.clone(), cert_header.1.clone());
        }
        // Not configured when the judgement was made.
        Identity::Certificate { .. } => {}
        // A name of the operator's choosing may be outside what strip_device drops.
        Identity::Token { .. } => {
            if let Some(name) = rewrite.cert_header {
                map.remove(name);
            }
        }
    }
    // One budget along the path: what goes on the channel, metadata included, fits what the
    // connector's h2 takes, which would otherwise refuse it (and past four times its limit
    // close the channel, cutting every other device's request on it).
    let size = header_block_size(parts);
    if size > rewrite.limit {
        return Err(Refusal::new(Cause::HeadersTooLarge {
            size,
            limit: rewrite.limit,
        }));
    }
    Ok(())
}

/// Sends the request on `channel` (or, should it have stopped taking requests, the one picked
/// now), waits `request_timeout_secs` for the answer's head, and makes the answer the
/// device's: the status text as reason phrase, a body watched for stalls that holds the
/// device's stream share. A device that goes away before the answer comes is logged.
#[allow(clippy::too_many_arguments)] // what the answer and the log need
async fn send(
    forward: Request<Body>,
    channel: &Channel,
    endpoint: u64,
    started: std::time::Instant,
    in_flight: idle::InFlight,
    pending: &mut Pending,
    shared: &Shared,
    device: &Device,
) -> Result<Response<Body>, Refusal> {
    let sent = shared.registry.send(channel, endpoint, forward);
    let stalled_refusal = || {
        Refusal::new(Cause::DeviceStalled {
            what: "stopped sending its body".into(),
            seconds: shared.device_idle.as_secs(),
        })
    };
    let device_did_stall = || pending.watch.as_ref().is_some_and(|w| w.stalled());
    // Dropped with this future when the device goes away (its connection closed, its HTTP/2
    // stream reset) before the answer: says so, with the message id.
    let abandoned = Abandoned {
        log: &shared.log,
        message_id: &pending.message_id,
        device: device.addr,
        started,
        armed: true,
    };
    let response = tokio::time::timeout(shared.timeout, sent).await;
    abandoned.disarm();
    let response = response
        .map_err(|_| {
            Refusal::new(Cause::ConnectorTimeout {
                endpoint,
                seconds: shared.timeout.as_secs(),
            })
        })?
        // The channel stream was reset because the device's body stalled: say that, not
        // that the channel broke.
        .map_err(|refusal| {
            if device_did_stall() {
                stalled_refusal()
            } else {
                refusal
            }
        })?;
    shared.log.verbose(|| {
        format!(
            "Message {}: the connector answered {} after {} ms",
            pending.message_id,
            response.status().as_u16(),
            started.elapsed().as_millis()
        )
    });
    let (mut parts, body) = response.into_parts();
    // The connector's status text becomes the reason phrase devices read over HTTP/1.1.
    if let Some(text) = parts.headers.get(headers::STATUS_TEXT).cloned() {
        if let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(text.as_bytes().to_vec()) {
            parts.extensions.insert(phrase);
        }
        // The connector's refusal (the endpoint's answer or its own) may come before the
        // device's body was read; over HTTP/1.1 the rest is drained, and if that does not end
        // in time the answer says the connection closes.
        if let (hyper::Version::HTTP_10 | hyper::Version::HTTP_11, Some(watch)) =
            (pending.version, &pending.watch)
        {
            if !watch.wait_ended(shared.refused_body_drain_time).await {
                let why = refused::not_read_whole(shared);
                shared.log.warn(&format!(
                    "Message {}: the connector's answer {} {} to device {} says Connection: close, as {why}",
                    pending.message_id,
                    parts.status.as_u16(),
                    String::from_utf8_lossy(text.as_bytes()),
                    device.addr,
                ));
                parts
                    .headers
                    .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
    }
    let body = idle::AnswerBody::new(
        body,
        shared.connector_idle,
        shared.log.clone(),
        std::mem::take(&mut pending.message_id),
        in_flight,
        pending.watch.take(),
        shared.device_idle,
    );
    Ok(Response::from_parts(parts, tunnel::boxed(body)))
}

/// Logs, when dropped armed, that the device went away before its request was answered: hyper
/// drops a request's future when its device's connection closes or its HTTP/2 stream is
/// reset, and the channel stream is reset with it (the connector logs the withdrawal too).
struct Abandoned<'a> {
    log: &'a crate::Log,
    message_id: &'a str,
    device: std::net::SocketAddr,
    started: std::time::Instant,
    armed: bool,
}

impl Abandoned<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.log.warn(&format!(
                "Message {}: abandoned by device {} after {} ms, before the connector answered (its connection closed or its stream was reset); the request is withdrawn from its channel",
                self.message_id,
                self.device,
                self.started.elapsed().as_millis()
            ));
        }
    }
}

/// RFC 9112 6.1: a transfer coding the gateway cannot pass on as it came is refused (501).
/// HTTP/1.1 takes `chunked` off a body, and the channel and the endpoint's hop carry their
/// own framing, so any other coding (`gzip, chunked`) would reach the endpoint lost.
fn refuse_transfer_codings(headers: &hyper::HeaderMap) -> Result<(), Refusal> {
    for value in headers.get_all(hyper::header::TRANSFER_ENCODING) {
        let text = value.to_str().unwrap_or("(not text)");
        for coding in text.split(',').map(str::trim) {
            if !coding.is_empty() && !coding.eq_ignore_ascii_case("chunked") {
                return Err(Refusal::new(Cause::TransferCodingUnsupported {
                    coding: coding.chars().take(40).collect(),
                }));
            }
        }
    }
    Ok(())
}
