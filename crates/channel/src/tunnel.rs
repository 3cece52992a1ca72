//! The channel: the connector dials the gateway over TLS with ALPN [`ALPN`]; on that connection
//! the gateway is the HTTP/2 *client* and the connector the HTTP/2 *server*. A device's request
//! becomes one HTTP/2 request on a channel; bodies stream both ways with HTTP/2 flow control.
//!
//! The gateway's first request on a new channel is `GET` [`HELLO_PATH`]: the connector says who
//! it is and which endpoints it serves. Metadata rides in `x-portcullis-*` headers, which the
//! gateway strips from what devices send.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use serde::{Deserialize, Serialize};

use crate::refusal::{Cause, Refusal};
use crate::shards::Shards;

pub const ALPN: &[u8] = b"portcullis-tunnel/1";

/// The HPACK table each end of a channel offers the other (HTTP/2's default is 4 KiB): room
/// for the per-connection metadata of a few hundred devices, so a kept device's
/// `x-portcullis-device` line goes as a table index instead of a literal the other end must
/// decode.
pub const HPACK_TABLE_BYTES: u32 = 64 * 1024;
pub const HELLO_PATH: &str = "/_portcullis/v1/hello";

/// Streams one channel carries at once: the connector's HTTP/2 server says so in
/// SETTINGS_MAX_CONCURRENT_STREAMS, and the gateway never opens more (a slot is taken from
/// [`Channel`]'s semaphore before a stream is opened), so h2's own unbounded queue of streams
/// waiting to open stays empty.
pub const CHANNEL_MAX_STREAMS: u32 = 256;

/// Each stream's flow-control window on a channel, both ways (responses into the gateway,
/// requests into the connector): what one stream whose reader stalled (a device that stopped
/// reading its answer, an endpoint that stopped reading its body) can hold unread.
pub const CHANNEL_STREAM_WINDOW: u32 = 256 * 1024;

/// The connection's window: room for every stream's window at once, so that bytes a stalled
/// reader has not taken never count against the other streams. A smaller connection window
/// let four stalled devices (1 MiB each) freeze a 4 MiB channel for everyone. The memory this
/// allows (64 MiB a channel, only with every stream stalled) is bounded by the stream slots
/// and freed when the idle timeouts reset the stalled streams.
pub const CHANNEL_CONNECTION_WINDOW: u32 = CHANNEL_MAX_STREAMS * CHANNEL_STREAM_WINDOW;

/// Header names on the channel. Anything starting with [`headers::PREFIX`] that a device sends
/// is dropped by the gateway.
pub mod headers {
    use hyper::header::HeaderName;

    // Names made at compile time: a `&str` name is parsed and hashed again on every insert
    // and lookup, thousands of instructions per request across the metadata headers.
    pub const PREFIX: &str = "x-portcullis-";
    pub const MESSAGE_ID: HeaderName = HeaderName::from_static("x-portcullis-message-id");
    pub const ENDPOINT: HeaderName = HeaderName::from_static("x-portcullis-endpoint");
    /// Who the device is, as one line of text: `<subject> (<thumbprint>) from <address>` for a
    /// certificate, `<subject> (token <id>) from <address>` for a token (SERVERAUTH routes).
    pub const DEVICE: HeaderName = HeaderName::from_static("x-portcullis-device");
    /// The status text, for HTTP/2 hops where there is no reason phrase.
    pub const STATUS_TEXT: HeaderName = HeaderName::from_static("x-portcullis-status-text");
    /// On a connector's answer: this channel is about to be drained (GOAWAY), so the gateway
    /// sends it no new request. Said for a while before the GOAWAY, so that no request is on
    /// its way when it comes.
    pub const DRAINING: HeaderName = HeaderName::from_static("x-portcullis-draining");
    /// On the hello request: how many worker threads (shards) the gateway runs, so that the
    /// connector can open a channel for each and no gateway thread sends through another's.
    pub const GATEWAY_THREADS: HeaderName = HeaderName::from_static("x-portcullis-gateway-threads");
    /// The device's address, for endpoints, set by the gateway (the device's own dropped).
    pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

    /// Drops hop-by-hop headers, those the `Connection` header names, and every
    /// `x-portcullis-*` header, in place, in one pass over the names (allocating only when
    /// there is something to drop). What the connector does to what the gateway sends.
    pub fn strip(map: &mut hyper::HeaderMap) {
        strip_where(map, false);
    }

    /// [`strip`], and also every header that tells an endpoint who called or how
    /// ([`is_forwarding_lower`]): the gateway's cleaning of what a device sends, before it sets
    /// its own. An endpoint behind a proxy may trust these (IIS ARR's `X-ARR-ClientCert`, a
    /// client address in `X-Forwarded-For`), so a device must not write them.
    pub fn strip_device(map: &mut hyper::HeaderMap) {
        strip_where(map, true);
    }

    fn strip_where(map: &mut hyper::HeaderMap, forwarding: bool) {
        // A HeaderName is always lower case, so exact comparisons suffice here.
        let mut unwanted = Vec::new();
        let mut connection = false;
        for name in map.keys() {
            let text = name.as_str();
            connection |= text == "connection";
            if text.starts_with(PREFIX)
                || is_hop_by_hop_lower(text)
                || (forwarding && is_forwarding_lower(text))
            {
                unwanted.push(name.clone());
            }
        }
        // Headers the device named as its connection's own (RFC 9110 7.6.1): no further.
        // Looked up only when there is a Connection header (never over HTTP/2).
        for value in connection
            .then(|| map.get_all(hyper::header::CONNECTION))
            .into_iter()
            .flatten()
        {
            for token in value.to_str().unwrap_or("").split(',') {
                let token = token.trim();
                if map.contains_key(token) {
                    if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                        unwanted.push(name);
                    }
                }
            }
        }
        for name in unwanted {
            map.remove(&name);
        }
    }

    /// Headers that say who the client is, what certificate it showed, or how it reached a
    /// proxy, lower case: set by proxies (IIS ARR, nginx, Envoy, load balancers) for the
    /// servers behind them, never by a client.
    pub fn is_forwarding_lower(name: &str) -> bool {
        name.starts_with("x-forwarded-")
            || name.starts_with("x-ssl-")
            || name.starts_with("x-arr-")
            || matches!(
                name,
                "forwarded"
                    | "x-real-ip"
                    | "x-client-ip"
                    | "x-client-cert"
                    | "x-client-verify"
                    | "true-client-ip"
                    | "x-cluster-client-ip"
                    | "x-original-url"
                    | "x-rewrite-url"
                    | "ms-aspnetcore-clientcert"
            )
    }

    /// Connection-specific headers that must not cross a hop (RFC 9110 7.6.1), lower case.
    pub fn is_hop_by_hop_lower(name: &str) -> bool {
        matches!(
            name,
            "connection"
                | "keep-alive"
                | "proxy-connection"
                | "transfer-encoding"
                | "upgrade"
                | "te"
                | "trailer"
                | "host"
        )
    }
}

/// Any body error, boxed: the channel's bodies come from hyper (devices, endpoints) and from
/// h2 (the gateway's end of a channel).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Any body whose errors can be boxed, as a channel [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub id: u64,
    /// The site role, e.g. `SMS_MP`.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub connector_id: String,
    pub version: String,
    pub endpoints: Vec<EndpointInfo>,
    /// Whether the connector has a client authentication certificate to present to its
    /// endpoints (absent from older connectors: unknown, read as false).
    #[serde(default)]
    pub has_client_certificate: bool,
    /// The largest request header block the connector's channels take (its
    /// `max_request_header_bytes`, counted as HPACK does): the gateway sends none larger,
    /// whatever its own budget. Absent from older connectors: the gateway's budget alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_header_bytes: Option<u32>,
}

/// How long a channel may stay silent before a PING must be answered.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest hello the gateway reads.
const MAX_HELLO_BYTES: usize = 1024 * 1024;

/// One live channel, gateway side.
pub struct Channel {
    pub id: u64,
    pub hello: Hello,
    /// The connector's certificate subject, for logs and status.
    pub peer: String,
    /// The shard whose thread drives this channel's connection.
    pub shard: usize,
    sender: h2::client::SendRequest<Bytes>,
    outstanding: AtomicUsize,
    /// Set once the channel refused a new request (the connector said GOAWAY to drain it, or
    /// it broke), or was closed: `pick` passes it by from then on.
    closing: AtomicBool,
    /// The connector's certificate (DER), to judge it again after a reload.
    pub peer_cert: Vec<u8>,
    /// Told by [`Channel::close`]: the connection's driver drops it.
    close: Arc<tokio::sync::Notify>,
    /// The small DATA frames sent on this channel that the connector's h2 still counts.
    frames: Arc<SmallFrames>,
    /// The channel's stream slots: as many permits as the connector allows streams at once
    /// (at most [`CHANNEL_MAX_STREAMS`]); a request takes one before its stream is opened and
    /// holds it until its answer's body is dropped. Closed when the channel ends.
    slots: Arc<tokio::sync::Semaphore>,
}

/// Why a channel gave no answer's head.
enum SendError {
    /// The channel takes no new requests (drained by its connector, or broken): the request
    /// was not sent and comes back whole, for another channel.
    Closing(Box<Request<Body>>),
    /// What to tell the device.
    Refused(Refusal),
}

impl SendError {
    fn into_refusal(self) -> Refusal {
        match self {
            SendError::Closing(_) => Refusal::new(Cause::ChannelBroken {
                detail: "it takes no new requests (its connector closed it)".into(),
            }),
            SendError::Refused(refusal) => refusal,
        }
    }
}

impl Channel {
    /// Sends one request over the channel, counting it as outstanding while it is in flight.
    /// Counted down when the answer's head arrives, or when the caller stops waiting (its
    /// device went away, its timeout struck): else the count only grows, and `pick` avoids a
    /// channel for requests long gone.
    ///
    /// A stream slot is taken first: at once if one is free, else the request waits for one
    /// in the gateway's queue (bounded by `queue`; over it: [`Cause::ChannelsBusy`]). A
    /// request whose device goes away while it waits is dropped with this future and sends
    /// nothing on the channel.
    async fn send(
        &self,
        request: Request<Body>,
        endpoint: u64,
        queue: &Queue,
    ) -> Result<Response<ChannelBody>, SendError> {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&self.outstanding);
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(tokio::sync::TryAcquireError::Closed) => {
                self.closing.store(true, Ordering::Relaxed);
                return Err(SendError::Closing(Box::new(request)));
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                let Some(_queued) = queue.enter() else {
                    return Err(SendError::Refused(Refusal::new(Cause::ChannelsBusy {
                        endpoint,
                    })));
                };
                let slot = match self.slots.clone().acquire_owned().await {
                    Ok(slot) => slot,
                    Err(_) => {
                        self.closing.store(true, Ordering::Relaxed);
                        return Err(SendError::Closing(Box::new(request)));
                    }
                };
                // A slot is often freed because a device left, and the same departure
                // abandons requests waiting here; the wake-ups that say so to their servers
                // (hyper checks for a reset stream or a closed connection when this future is
                // pending) come after this one. Yield once so that an abandoned request is
                // dropped here, having sent nothing, rather than sent and reset at once.
                tokio::task::yield_now().await;
                slot
            }
        };
        let mut answered = send_on(&self.sender, request, &self.frames, Some(slot)).await;
        if let Ok(response) = &mut answered {
            // For this gateway, not for the device.
            if response.headers_mut().remove(&headers::DRAINING).is_some() {
                self.closing.store(true, Ordering::Relaxed);
            }
        }
        answered.map_err(|e| match e {
            SendOnError::NotReady(request, _) => {
                self.closing.store(true, Ordering::Relaxed);
                SendError::Closing(request)
            }
            SendOnError::Failed(e) => SendError::Refused(Refusal::new(refused_answer(&e))),
        })
    }

    /// Closes the channel now (its connector is no longer allowed): what was on it fails, and
    /// it leaves the registry.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
        // A permit is kept if the driver is not waiting at this moment.
        self.close.notify_one();
    }

    /// Whether the channel has refused a new request (see [`SendError::Closing`]).
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// What to tell the device when h2 failed its request. The gateway's own h2 refusing what the
/// connector sent (an answer's header block over `max_response_header_bytes`, a PUSH_PROMISE
/// the gateway's SETTINGS disabled) is the connector's answer breaking the channel's rules;
/// anything else is the channel failing.
fn refused_answer(e: &h2::Error) -> Cause {
    let local = !e.is_remote() && !e.is_io();
    match e.reason() {
        // The gateway's h2 resets a stream whose answer it refuses: a header block over the
        // limit (up to four times it; past that it closes the whole channel, below), or one
        // otherwise malformed. The channel carries on.
        Some(h2::Reason::PROTOCOL_ERROR | h2::Reason::REFUSED_STREAM) if local && e.is_reset() => {
            Cause::BadConnectorAnswer {
                detail: "its answer's header block is larger than the gateway takes (max_response_header_bytes) or malformed".into(),
            }
        }
        Some(h2::Reason::ENHANCE_YOUR_CALM | h2::Reason::PROTOCOL_ERROR | h2::Reason::COMPRESSION_ERROR)
            if local && e.is_go_away() =>
        {
            Cause::BadConnectorAnswer {
                detail: format!("it broke the channel's rules ({e}: a header block over four times max_response_header_bytes, or a PUSH_PROMISE, which the gateway disables), so the gateway closed the channel"),
            }
        }
        _ => Cause::ChannelBroken {
            detail: e.to_string(),
        },
    }
}

/// One request counted in [`Channel::outstanding`] until dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Requests waiting for a stream slot, across every channel of the gateway, and how many may.
pub struct Queue {
    waiting: AtomicUsize,
    limit: AtomicUsize,
}

/// `max_queued_requests` unless the gateway sets another.
pub const DEFAULT_MAX_QUEUED_REQUESTS: usize = 4096;

impl Default for Queue {
    fn default() -> Queue {
        Queue {
            waiting: AtomicUsize::new(0),
            limit: AtomicUsize::new(DEFAULT_MAX_QUEUED_REQUESTS),
        }
    }
}

impl Queue {
    /// A place in the queue, held until dropped; none when it is full.
    fn enter(&self) -> Option<Queued<'_>> {
        let limit = self.limit.load(Ordering::Relaxed);
        let before = self.waiting.fetch_add(1, Ordering::Relaxed);
        let place = Queued(&self.waiting);
        (before < limit).then_some(place)
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// One request counted in [`Queue::waiting`] until dropped.
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The channels that end at this gateway instance, by endpoint id.
#[derive(Default)]
pub struct Registry {
    channels: RwLock<Vec<Arc<Channel>>>,
    /// Endpoints some connector has announced since start, with their names.
    known: RwLock<HashMap<u64, String>>,
    next_id: AtomicU64,
    /// Requests waiting for a stream slot on some channel.
    pub queue: Queue,
}

impl Registry {
    /// How many requests may wait for a stream slot at once (`max_queued_requests`).
    pub fn set_max_queued(&self, limit: usize) {
        self.queue.limit.store(limit, Ordering::Relaxed);
    }

    fn add(&self, channel: Arc<Channel>) {
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        for e in &channel.hello.endpoints {
            known.insert(e.id, e.name.clone());
        }
        drop(known);
        self.channels
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(channel);
    }

    fn remove(&self, id: u64) {
        self.channels
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|c| c.id != id);
    }

    /// The channel for `endpoint` with the fewest requests in flight, among those driven by
    /// the calling shard if it has any (a request then wakes no other thread).
    pub fn pick(&self, endpoint: u64) -> Result<Arc<Channel>, Refusal> {
        let here = Shards::here();
        let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
        let best = channels
            .iter()
            .filter(|c| !c.is_closing() && c.hello.endpoints.iter().any(|e| e.id == endpoint))
            .min_by_key(|c| (c.shard != here, c.outstanding()))
            .cloned();
        match best {
            Some(channel) => Ok(channel),
            None if self
                .known
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&endpoint) =>
            {
                Err(Refusal::new(Cause::NoChannel { endpoint }))
            }
            None => Err(Refusal::new(Cause::UnknownEndpoint { endpoint })),
        }
    }

    /// Sends `request` on `channel` (picked for `endpoint`). Should the channel take no new
    /// requests before it took this one (drained by its connector, or broken), the request,
    /// not sent, goes once more on the channel `pick` chooses now (which passes that one by).
    pub async fn send(
        &self,
        channel: &Channel,
        endpoint: u64,
        request: Request<Body>,
    ) -> Result<Response<ChannelBody>, Refusal> {
        match channel.send(request, endpoint, &self.queue).await {
            Err(SendError::Closing(request)) => self
                .pick(endpoint)?
                .send(*request, endpoint, &self.queue)
                .await
                .map_err(SendError::into_refusal),
            sent => sent.map_err(SendError::into_refusal),
        }
    }

    /// Every endpoint announced since start, whether a channel serves it now, and how many.
    pub fn endpoints(&self) -> Vec<(u64, String, usize)> {
        let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<(u64, String, usize)> = known
            .iter()
            .map(|(id, name)| {
                let live = channels
                    .iter()
                    .filter(|c| c.hello.endpoints.iter().any(|e| e.id == *id))
                    .count();
                (*id, name.clone(), live)
            })
            .collect();
        list.sort();
        list
    }

    /// Every connector holding a channel now: its id, its channels, and whether it has a
    /// client authentication certificate for its endpoints, from the hello of its newest
    /// channel (a connector that re-selected its certificate reopens its channels one by
    /// one, and the newest says what it has now).
    pub fn connectors(&self) -> Vec<(String, usize, bool)> {
        let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
        // Id, channels, has a certificate, and the id of the channel that said so.
        let mut list: Vec<(String, usize, bool, u64)> = Vec::new();
        for c in channels.iter() {
            match list.iter_mut().find(|(id, ..)| *id == c.hello.connector_id) {
                Some(entry) => {
                    entry.1 += 1;
                    if c.id > entry.3 {
                        entry.2 = c.hello.has_client_certificate;
                        entry.3 = c.id;
                    }
                }
                None => list.push((
                    c.hello.connector_id.clone(),
                    1,
                    c.hello.has_client_certificate,
                    c.id,
                )),
            }
        }
        let mut list: Vec<(String, usize, bool)> = list
            .into_iter()
            .map(|(id, channels, has_certificate, _)| (id, channels, has_certificate))
            .collect();
        list.sort();
        list
    }

    /// Every channel now.
    pub fn all(&self) -> Vec<Arc<Channel>> {
        self.channels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Channels driven by `shard` now.
    pub fn channels_on(&self, shard: usize) -> usize {
        self.channels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|c| c.shard == shard)
            .count()
    }

    pub fn channel_count(&self) -> usize {
        self.channels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

#[derive(Debug)]
pub enum AcceptError {
    Handshake(h2::Error),
    Hello(String),
    /// The hello announced what this connector may not serve.
    Refused(String),
}

impl std::fmt::Display for AcceptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AcceptError::Handshake(e) => write!(f, "HTTP/2 handshake on the channel failed: {e}"),
            AcceptError::Hello(why) => write!(f, "the connector's hello failed: {why}"),
            AcceptError::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

/// Why [`send_on`] failed.
enum SendOnError {
    /// The connection takes no new stream (GOAWAY received, or broken); nothing was sent.
    NotReady(Box<Request<Body>>, h2::Error),
    Failed(h2::Error),
}

impl From<h2::Error> for SendOnError {
    fn from(e: h2::Error) -> Self {
        SendOnError::Failed(e)
    }
}

impl std::fmt::Display for SendOnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendOnError::NotReady(_, e) | SendOnError::Failed(e) => e.fmt(f),
        }
    }
}

/// Sends `request` on a channel with h2 directly: hyper's HTTP/2 client hands every request to
/// its connection task over a queue and spawns a task per request for the body, which cost the
/// gateway a large share of its instructions per request. Here the device's own task sends
/// and awaits; only a request with a body gets a task, to stream it. `slot`, the stream's
/// place on the channel, is held by the answer's body.
async fn send_on(
    sender: &h2::client::SendRequest<Bytes>,
    request: Request<Body>,
    frames: &Arc<SmallFrames>,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<Response<ChannelBody>, SendOnError> {
    use http_body::Body as _;
    let end = request.body().is_end_stream();
    let mut sender = match sender.clone().ready().await {
        Ok(sender) => sender,
        Err(e) => return Err(SendOnError::NotReady(Box::new(request), e)),
    };
    let (parts, body) = request.into_parts();
    let (response, stream) = sender.send_request(Request::from_parts(parts, ()), end)?;
    if !end {
        tokio::spawn(stream_body(body, stream, frames.clone()));
    }
    Ok(response.await?.map(|recv| ChannelBody::new(recv, slot)))
}

/// Streams a request body into its HTTP/2 stream as the peer's flow control allows. The
/// device's pieces are gathered first ([`Coalesced`]): sent as they came, a device's framing
/// (a byte a DATA frame) would spend the connector's budget for small frames, and h2 closes the
/// whole channel when it runs out. The last piece carries END_STREAM itself (h2 does not count
/// a stream's final frame), not an empty frame after it.
async fn stream_body(body: Body, mut stream: h2::SendStream<Bytes>, frames: Arc<SmallFrames>) {
    let mut body = Coalesced::new(body, frames);
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(_) => {
                // The device's body broke off: so does the stream.
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                }
                return;
            }
        };
        let end = http_body::Body::is_end_stream(&body);
        if data.is_empty() && end {
            break;
        }
        while !data.is_empty() {
            stream.reserve_capacity(data.len());
            // h2 answers Pending, not a room of 0, while the window is shut.
            match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                // A frame under SMALL_FRAME that the piece did not pay for would be charged by
                // the peer: with a little room (a window nearly spent), wait for more. (h2
                // wakes this again only when the stream's capacity grows.)
                Some(Ok(room)) if room < SMALL_FRAME.min(data.len()) => {}
                Some(Ok(room)) => {
                    let chunk = data.split_to(room.min(data.len()));
                    if stream.send_data(chunk, end && data.is_empty()).is_err() {
                        return;
                    }
                }
                // The stream was reset or the channel went: nobody reads the rest.
                Some(Err(_)) | None => return,
            }
        }
        if end {
            return;
        }
    }
    let _ = stream.send_data(Bytes::new(), true);
}

/// What h2 (0.4) counts against a connection's budget for small DATA frames: each frame that
/// is not its stream's last and carries fewer than this many bytes costs the difference; a
/// larger one gives back its excess. The budget (at least 25,600, half the connection window
/// when one is set) is never otherwise restored, and when it runs out h2 closes the connection
/// with GOAWAY ENHANCE_YOUR_CALM (`too_many_data_frames`).
const SMALL_FRAME: usize = 256;
/// How much of that budget one end of a channel lets its small frames use: well under h2's
/// least, so the peer's h2 never closes the channel whatever the devices or endpoints send.
const SMALL_FRAME_ALLOWANCE: usize = 12 * 1024;
/// HTTP/2's default largest frame: h2 splits a larger piece into frames of this size.
const MAX_FRAME: usize = 16 * 1024;

/// The sending end's mirror of the peer's small-frame budget on one channel (shared by every
/// stream on it): small pieces are sent at once while it allows, and otherwise wait to grow
/// (or for their stream's end).
#[derive(Debug, Default)]
pub struct SmallFrames {
    spent: AtomicUsize,
}

impl SmallFrames {
    /// Whether a piece of `len` (< [`SMALL_FRAME`]) bytes may go as a frame of its own now;
    /// if so it is counted.
    fn take(&self, len: usize) -> bool {
        let cost = SMALL_FRAME.saturating_sub(len);
        self.spent
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |spent| {
                (spent + cost <= SMALL_FRAME_ALLOWANCE).then_some(spent + cost)
            })
            .is_ok()
    }

    /// A piece of `len` bytes (at least [`SMALL_FRAME`]) went, not as its stream's last: h2
    /// splits it into frames of at most 16 KiB, each giving back its excess.
    fn give_back(&self, len: usize) {
        // A load first: with nothing spent (the usual case) no write to the shared line.
        if self.spent.load(Ordering::Relaxed) == 0 {
            return;
        }
        let back = len.saturating_sub(SMALL_FRAME * len.div_ceil(MAX_FRAME));
        let _ = self
            .spent
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |spent| {
                Some(spent.saturating_sub(back))
            });
    }
}

pin_project_lite::pin_project! {
    /// A body whose data is gathered before it goes on a channel: small pieces the inner body
    /// has ready are joined without waiting; a piece is then passed on at once,
    /// unless it is small and its channel's [`SmallFrames`] allowance is spent, when it waits
    /// for more data or for the body's end. (A device sending a byte at a time is slowed only
    /// once the whole channel's allowance is used, and its bytes are never lost or reordered.)
    pub struct Coalesced<B> {
        #[pin]
        inner: B,
        held: Option<bytes::BytesMut>,
        first: Option<Bytes>,
        trailers: Option<hyper::HeaderMap>,
        ended: bool,
        frames: Arc<SmallFrames>,
    }
}

impl<B> Coalesced<B> {
    pub fn new(inner: B, frames: Arc<SmallFrames>) -> Coalesced<B> {
        Coalesced {
            inner,
            held: None,
            first: None,
            trailers: None,
            ended: false,
            frames,
        }
    }
}

impl<B> http_body::Body for Coalesced<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        use std::task::Poll;
        let mut this = self.project();
        // What is held so far, taken out: one piece without a copy, more joined.
        fn take(first: &mut Option<Bytes>, held: &mut Option<bytes::BytesMut>) -> Bytes {
            match held.take() {
                Some(joined) => joined.freeze(),
                None => first.take().unwrap_or_default(),
            }
        }
        fn held_len(first: &Option<Bytes>, held: &Option<bytes::BytesMut>) -> usize {
            held.as_ref().map_or(0, |h| h.len()) + first.as_ref().map_or(0, |f| f.len())
        }
        if this.held.is_none() && this.first.is_none() {
            if let Some(trailers) = this.trailers.take() {
                return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
            }
        }
        while !*this.ended && this.trailers.is_none() {
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => {
                        match (this.first.take(), this.held.as_mut()) {
                            (None, None) => *this.first = Some(data),
                            (Some(first), _) => {
                                let mut joined =
                                    bytes::BytesMut::with_capacity(first.len() + data.len());
                                joined.extend_from_slice(&first);
                                joined.extend_from_slice(&data);
                                *this.held = Some(joined);
                            }
                            (None, Some(joined)) => joined.extend_from_slice(&data),
                        }
                        // Gathered only while small: a piece the budget does not charge
                        // goes as it came, never copied (bulk data stays zero-copy).
                        if held_len(this.first, this.held) >= SMALL_FRAME {
                            break;
                        }
                    }
                    // No kind of frame but data and trailers exists.
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            *this.trailers = Some(trailers);
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => *this.ended = true,
                Poll::Pending => break,
            }
        }
        let len = held_len(this.first, this.held);
        if len == 0 {
            if let Some(trailers) = this.trailers.take() {
                return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
            }
            return if *this.ended {
                Poll::Ready(None)
            } else {
                Poll::Pending
            };
        }
        // The last piece goes with END_STREAM and costs nothing.
        if !*this.ended {
            if len >= SMALL_FRAME {
                this.frames.give_back(len);
            } else if !this.frames.take(len) {
                if this.trailers.is_none() {
                    // The inner body is pending and will wake this task with more.
                    return Poll::Pending;
                }
                // Nothing more is coming and the piece cannot go as a frame of its own:
                // it goes last, and the trailers (which no management traffic uses) are
                // dropped rather than the channel put at risk.
                *this.trailers = None;
                *this.ended = true;
            }
        }
        Poll::Ready(Some(Ok(http_body::Frame::data(take(
            this.first, this.held,
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none()
            && self.held.is_none()
            && self.trailers.is_none()
            && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let held = (self.first.as_ref().map_or(0, |f| f.len())
            + self.held.as_ref().map_or(0, |h| h.len())) as u64;
        let inner = self.inner.size_hint();
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

/// A response body arriving on a channel, as an `http_body::Body`; what it reads is released
/// back to the connector's flow-control window at once.
/// Dropping it before its end resets the stream (h2 sends RST_STREAM CANCEL once nothing
/// refers to it), which gives back to the connection's window what it held unread.
pub struct ChannelBody {
    recv: h2::RecvStream,
    data_done: bool,
    /// The stream's slot on the channel ([`Channel::send`]), freed with the body.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl ChannelBody {
    fn new(recv: h2::RecvStream, slot: Option<tokio::sync::OwnedSemaphorePermit>) -> ChannelBody {
        ChannelBody {
            recv,
            data_done: false,
            _slot: slot,
        }
    }
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, h2::Error>>> {
        use std::task::Poll;
        if !self.data_done {
            match self.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => self.data_done = true,
            }
        }
        match self.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => {
                Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
            }
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// Gateway side: drives a freshly accepted channel connection. Returns once the channel is
/// registered; the connection keeps running in the background and leaves the registry when it
/// ends (including when PINGs go unanswered). The hello tells the connector the gateway's
/// `gateway_threads`. `admit` judges the connector's hello before the channel is registered
/// (the endpoints it may announce): refused, the channel closes without ever taking a request.
/// An answer whose header block is over `max_response_header_bytes`
/// (counted as HPACK does) is refused, and so is every pushed stream.
pub async fn accept<IO>(
    io: IO,
    peer: String,
    peer_cert: Vec<u8>,
    registry: Arc<Registry>,
    gateway_threads: usize,
    max_response_header_bytes: u32,
    admit: impl FnOnce(&Hello) -> Result<(), String>,
) -> Result<Arc<Channel>, AcceptError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_window_size(CHANNEL_STREAM_WINDOW)
        .initial_connection_window_size(CHANNEL_CONNECTION_WINDOW)
        .header_table_size(HPACK_TABLE_BYTES)
        // A connector is outside input too: h2's defaults take header blocks up to 16 MiB
        // and keep every stream it pushes.
        .max_header_list_size(max_response_header_bytes)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(AcceptError::Handshake)?;
    let id = registry.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let driver_registry = registry.clone();
    let pings = connection.ping_pong();
    let close = Arc::new(tokio::sync::Notify::new());
    let closed = close.clone();
    // No slot until the connector's SETTINGS are known (they come before the hello's answer).
    let slots = Arc::new(tokio::sync::Semaphore::new(0));
    let driver_slots = slots.clone();
    tokio::spawn(async move {
        // A PING every KEEPALIVE_INTERVAL, answered within KEEPALIVE_TIMEOUT, or the channel
        // is dropped: a connector that vanished without a FIN leaves within ~10 s. Dropping
        // the connection fails every request still on it.
        let keepalive = async move {
            let Some(mut pings) = pings else {
                return;
            };
            loop {
                tokio::time::sleep(KEEPALIVE_INTERVAL).await;
                let answered =
                    tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await;
                if !matches!(answered, Ok(Ok(_))) {
                    return;
                }
            }
        };
        tokio::select! {
            _ = AfterOthers::new(&mut connection) => {}
            _ = keepalive => {}
            _ = closed.notified() => {}
        }
        // Requests waiting for a slot go to another channel.
        driver_slots.close();
        driver_registry.remove(id);
    });

    let hello_sender = sender.clone();
    let frames = Arc::new(SmallFrames::default());
    let hello = async {
        let request = Request::get(HELLO_PATH)
            .header(headers::GATEWAY_THREADS, gateway_threads)
            .body(empty())
            .map_err(|e| e.to_string())?;
        let response = send_on(&hello_sender, request, &frames, None)
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_HELLO_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading it: {e}"))?
            .to_bytes();
        serde_json::from_slice::<Hello>(&body).map_err(|e| format!("it is not a hello: {e}"))
    };
    let hello = tokio::time::timeout(Duration::from_secs(10), hello)
        .await
        .map_err(|_| AcceptError::Hello("no answer within 10 s".into()))?
        .map_err(AcceptError::Hello)?;
    if let Err(why) = admit(&hello) {
        // The driver drops the connection; the channel was never registered.
        close.notify_one();
        return Err(AcceptError::Refused(why));
    }
    // The connector's SETTINGS_MAX_CONCURRENT_STREAMS (none said: h2 reads it as unbounded),
    // and never more than the windows above were sized for.
    let max_streams = sender
        .current_max_send_streams()
        .min(CHANNEL_MAX_STREAMS as usize);
    slots.add_permits(max_streams);
    let channel = Arc::new(Channel {
        id,
        hello,
        peer,
        shard: Shards::here(),
        sender,
        outstanding: AtomicUsize::new(0),
        closing: AtomicBool::new(false),
        peer_cert,
        close,
        frames,
        slots,
    });
    registry.add(channel.clone());
    Ok(channel)
}

/// Polls a channel's connection only after the tasks that were ready when it was woken have
/// run. A device's task that sends a request (or an endpoint call that answers) wakes the
/// connection at once, and tokio runs a task so woken next: the connection then wrote each
/// request to the socket on its own, one system call and one TLS record per request (1.8
/// writes per request in the gateway at 32 devices). Yielding first lets the other devices'
/// tasks queue theirs, and one write carries them all. The wait is for runnable work only,
/// never a timer: on an idle process the connection runs again at once.
pub struct AfterOthers<F> {
    inner: F,
    yielded: bool,
}

impl<F> AfterOthers<F> {
    pub fn new(inner: F) -> AfterOthers<F> {
        AfterOthers {
            inner,
            yielded: false,
        }
    }

    /// The future it polls, e.g. to shut a connection down gracefully.
    pub fn get_mut(&mut self) -> &mut F {
        &mut self.inner
    }
}

impl<F: Future + Unpin> Future for AfterOthers<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        if !self.yielded {
            self.yielded = true;
            // tokio's yield defers this task's wake-up until the worker has run what is
            // ready; its future is needed only for that first poll.
            let yield_now = std::pin::pin!(tokio::task::yield_now());
            let _ = yield_now.poll(cx);
            return std::task::Poll::Pending;
        }
        self.yielded = false;
        std::pin::Pin::new(&mut self.inner).poll(cx)
    }
}

/// The response for a refusal, on any hop: the status, the status text as HTTP/1.1 reason
/// phrase and as a header (HTTP/2 has no reason phrase), and a body that explains.
pub fn refusal_response(refusal: &Refusal) -> Response<Body> {
    let mut response = Response::builder()
        .status(refusal.status)
        .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(headers::STATUS_TEXT, refusal.text)
        .body(full(refusal.body()))
        .unwrap_or_else(|_| Response::new(full(refusal.body())));
    if let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(refusal.text.as_bytes()) {
        response.extensions_mut().insert(phrase);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a device sends is cleaned of what endpoints may trust and of what it named as its
    /// connection's own; what the connector cleans keeps the gateway's forwarding headers.
    #[test]
    fn a_devices_forwarding_and_connection_headers_are_dropped() {
        let mut map = hyper::HeaderMap::new();
        for (name, value) in [
            ("x-forwarded-for", "203.0.113.66"),
            ("forwarded", "for=203.0.113.66"),
            ("x-real-ip", "203.0.113.66"),
            ("x-arr-clientcert", "forged"),
            ("x-ssl-client-cert", "forged"),
            ("x-forwarded-client-cert", "forged"),
            ("x-portcullis-device", "forged"),
            ("connection", "keep-alive, X-Hop"),
            ("x-hop", "1"),
            ("accept", "*/*"),
            ("authorization", "Bearer t"),
        ] {
            map.insert(
                hyper::header::HeaderName::from_static(name),
                hyper::header::HeaderValue::from_static(value),
            );
        }
        let mut connector = map.clone();
        headers::strip_device(&mut map);
        let mut left: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["accept", "authorization"]);
        headers::strip(&mut connector);
        assert!(
            connector.contains_key("x-forwarded-for") && connector.contains_key("x-arr-clientcert")
        );
        assert!(!connector.contains_key("x-hop") && !connector.contains_key("x-portcullis-device"));
    }

    /// A body that yields its pieces as scripted: `None` is one Pending (woken at once).
    struct Script(std::collections::VecDeque<Option<&'static [u8]>>);

    impl http_body::Body for Script {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            match self.0.pop_front() {
                None => std::task::Poll::Ready(None),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    std::task::Poll::Pending
                }
                Some(Some(piece)) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(
                    Bytes::from_static(piece),
                )))),
            }
        }
    }

    /// Each piece `Coalesced` passes on, and whether the body said it was the last.
    async fn pieces(body: Script, frames: &Arc<SmallFrames>) -> Vec<(Bytes, bool)> {
        let mut body = Coalesced::new(body, frames.clone());
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.expect("infallible").into_data().expect("data");
            out.push((data, http_body::Body::is_end_stream(&body)));
        }
        out
    }

    #[tokio::test]
    async fn small_pieces_ready_together_go_as_one_and_the_last_says_so() {
        let frames = Arc::new(SmallFrames::default());
        let script = Script([Some(&b"a"[..]), Some(b"b"), Some(b"c")].into());
        let out = pieces(script, &frames).await;
        assert_eq!(out, vec![(Bytes::from_static(b"abc"), true)]);
        // The last piece is not charged: h2 does not count a stream's final frame.
        assert_eq!(frames.spent.load(Ordering::Relaxed), 0);
    }

    /// A byte at a time, each alone: sent at once while the channel's allowance lasts, then
    /// gathered to SMALL_FRAME bytes (or the end); every byte arrives, in order.
    #[tokio::test]
    async fn a_byte_at_a_time_spends_only_the_allowance() {
        let frames = Arc::new(SmallFrames::default());
        let mut script = std::collections::VecDeque::new();
        for i in 0..2000 {
            script.push_back(Some(&b"0123456789"[i % 10..i % 10 + 1]));
            script.push_back(None);
        }
        let out = pieces(Script(script), &frames).await;
        let all: Vec<u8> = out.iter().flat_map(|(piece, _)| piece.to_vec()).collect();
        let expected: Vec<u8> = (0..2000).map(|i| b'0' + (i % 10) as u8).collect();
        assert_eq!(all, expected);
        // What h2 would charge the channel for these frames stays within the allowance.
        let charged: usize = out
            .iter()
            .filter(|(piece, last)| !last && piece.len() < SMALL_FRAME)
            .map(|(piece, _)| SMALL_FRAME - piece.len())
            .sum();
        assert!(charged <= SMALL_FRAME_ALLOWANCE, "{charged}");
        assert!(out.len() < 200, "{} pieces", out.len());
    }

    #[tokio::test]
    async fn large_pieces_go_as_they_came_and_give_back() {
        static BIG: [u8; 20_000] = [7; 20_000];
        let frames = Arc::new(SmallFrames::default());
        frames.spent.store(5_000, Ordering::Relaxed);
        let out = pieces(
            Script([Some(&BIG[..]), None, Some(&BIG[..])].into()),
            &frames,
        )
        .await;
        assert_eq!(out.len(), 2);
        // Not copied.
        assert_eq!(out[0].0.as_ptr(), BIG.as_ptr());
        // 20,000 bytes go as two frames, giving back 20,000 - 512.
        assert_eq!(frames.spent.load(Ordering::Relaxed), 0);
    }

    /// A request the gateway stops waiting for (its device went away, its timeout struck) no
    /// longer counts as outstanding on its channel: least-outstanding picking would otherwise
    /// shun that channel for good.
    #[tokio::test]
    async fn a_request_given_up_is_no_longer_outstanding() {
        let (gateway_end, connector_end) = tokio::io::duplex(64 * 1024);
        // A connector that answers the hello and never anything else.
        tokio::spawn(async move {
            let mut connection = h2::server::handshake(connector_end).await.expect("h2");
            let mut unanswered = Vec::new();
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                if request.uri().path() != HELLO_PATH {
                    unanswered.push(respond);
                    continue;
                }
                let hello = Hello {
                    connector_id: "c".into(),
                    version: "0".into(),
                    endpoints: vec![EndpointInfo {
                        id: 7,
                        name: "SMS_MP".into(),
                    }],
                    has_client_certificate: true,
                    max_request_header_bytes: None,
                };
                let body = Bytes::from(serde_json::to_vec(&hello).expect("json"));
                let mut stream = respond
                    .send_response(Response::new(()), false)
                    .expect("respond");
                stream.send_data(body, true).expect("hello body");
            }
        });
        let registry = Arc::new(Registry::default());
        let channel = accept(
            gateway_end,
            "c".into(),
            Vec::new(),
            registry.clone(),
            1,
            64 * 1024,
            |_| Ok(()),
        )
        .await
        .expect("channel");
        let request = Request::get("/SMS_MP/.sms_aut?MPLIST")
            .body(empty())
            .expect("request");
        let given_up = tokio::time::timeout(
            Duration::from_millis(100),
            channel.send(request, 7, &registry.queue),
        )
        .await;
        assert!(given_up.is_err(), "the connector never answers");
        assert_eq!(channel.outstanding(), 0);
    }
}
