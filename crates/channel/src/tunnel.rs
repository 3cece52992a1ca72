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
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};

use crate::refusal::{Cause, Refusal};
use crate::shards::Shards;

pub const ALPN: &[u8] = b"portcullis-tunnel/1";

/// The HPACK table each end of a channel offers the other (HTTP/2's default is 4 KiB): room
/// for the per-connection metadata of a few hundred devices, so a kept device's
/// `x-portcullis-device` line goes as a table index instead of a literal the other end must
/// decode.
const HPACK_TABLE_BYTES: u32 = 64 * 1024;
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

    /// Drops hop-by-hop headers and every `x-portcullis-*` header, in place, in one pass over
    /// the names (allocating only when there is something to drop).
    pub fn strip(map: &mut hyper::HeaderMap) {
        // A HeaderName is always lower case, so exact comparisons suffice here.
        let mut unwanted = Vec::new();
        for name in map.keys() {
            let text = name.as_str();
            if text.starts_with(PREFIX) || is_hop_by_hop_lower(text) {
                unwanted.push(name.clone());
            }
        }
        for name in unwanted {
            map.remove(&name);
        }
    }

    /// Connection-specific headers that must not cross a hop (RFC 9110 7.6.1), lower case.
    fn is_hop_by_hop_lower(name: &str) -> bool {
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
        let mut answered = send_on(&self.sender, request, Some(slot)).await;
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
            SendOnError::Failed(e) => SendError::Refused(Refusal::new(Cause::ChannelBroken {
                detail: e.to_string(),
            })),
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
}

impl std::fmt::Display for AcceptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AcceptError::Handshake(e) => write!(f, "HTTP/2 handshake on the channel failed: {e}"),
            AcceptError::Hello(why) => write!(f, "the connector's hello failed: {why}"),
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
        tokio::spawn(stream_body(body, stream));
    }
    Ok(response.await?.map(|recv| ChannelBody::new(recv, slot)))
}

/// Streams a request body into its HTTP/2 stream as the peer's flow control allows.
async fn stream_body(mut body: Body, mut stream: h2::SendStream<Bytes>) {
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
        while !data.is_empty() {
            stream.reserve_capacity(data.len());
            // h2 answers Pending, not a room of 0, while the window is shut.
            match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(room)) => {
                    let chunk = data.split_to(room.min(data.len()));
                    if stream.send_data(chunk, false).is_err() {
                        return;
                    }
                }
                // The stream was reset or the channel went: nobody reads the rest.
                Some(Err(_)) | None => return,
            }
        }
    }
    let _ = stream.send_data(Bytes::new(), true);
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
/// `gateway_threads`.
pub async fn accept<IO>(
    io: IO,
    peer: String,
    peer_cert: Vec<u8>,
    registry: Arc<Registry>,
    gateway_threads: usize,
) -> Result<Arc<Channel>, AcceptError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_window_size(CHANNEL_STREAM_WINDOW)
        .initial_connection_window_size(CHANNEL_CONNECTION_WINDOW)
        .header_table_size(HPACK_TABLE_BYTES)
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
    let hello = async {
        let request = Request::get(HELLO_PATH)
            .header(headers::GATEWAY_THREADS, gateway_threads)
            .body(empty())
            .map_err(|e| e.to_string())?;
        let response = send_on(&hello_sender, request, None)
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
        slots,
    });
    registry.add(channel.clone());
    Ok(channel)
}

/// How a channel served by [`serve`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// The gateway closed it, or it broke.
    Closed,
    /// Drained on request: the requests under way were answered, no new one was taken.
    Drained,
}

/// Connector side: serves the gateway's requests on a dialled channel until it ends, or until
/// `drain` completes: the channel then says GOAWAY, answers what it has taken, and ends. (The
/// service should say [`headers::DRAINING`] on its answers for a while before, so that the
/// gateway has stopped sending when the GOAWAY comes: a request it sent just as the GOAWAY
/// arrived could be refused, unprocessed, with nothing to send it again from.)
pub async fn serve<IO, S>(
    io: IO,
    service: S,
    drain: impl Future<Output = ()>,
) -> Result<Served, hyper::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        // Explicit windows and no adaptive_window: hyper's adaptive_window(true) sets both
        // windows back to 65,535 (and lets BDP probing grow them without this bound).
        .initial_stream_window_size(CHANNEL_STREAM_WINDOW)
        .initial_connection_window_size(CHANNEL_CONNECTION_WINDOW)
        .max_concurrent_streams(CHANNEL_MAX_STREAMS)
        // A stream the gateway opens and resets before it was taken up (its device left just
        // as it got its slot) counts against hyper's rapid-reset guard (20 by default, then
        // GOAWAY). The gateway never has more than CHANNEL_MAX_STREAMS streams open, so that
        // many such resets at once is the most an honest gateway can send.
        .max_pending_accept_reset_streams(CHANNEL_MAX_STREAMS as usize)
        .header_table_size(HPACK_TABLE_BYTES)
        .serve_connection(TokioIo::new(io), service);
    let mut connection = AfterOthers::new(connection);
    tokio::select! {
        ended = &mut connection => return ended.map(|()| Served::Closed),
        () = drain => {}
    }
    std::pin::Pin::new(&mut connection.inner).graceful_shutdown();
    // The gateway closes its end once it has its answers, often before hyper has said its
    // last GOAWAY: an error here ends a drained channel too.
    let _ = connection.await;
    Ok(Served::Drained)
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
                };
                let body = Bytes::from(serde_json::to_vec(&hello).expect("json"));
                let mut stream = respond
                    .send_response(Response::new(()), false)
                    .expect("respond");
                stream.send_data(body, true).expect("hello body");
            }
        });
        let registry = Arc::new(Registry::default());
        let channel = accept(gateway_end, "c".into(), Vec::new(), registry.clone(), 1)
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
