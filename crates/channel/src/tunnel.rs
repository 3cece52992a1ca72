//! The channel: the connector dials the gateway over TLS with ALPN [`ALPN`]; on that connection
//! the gateway is the HTTP/2 *client* and the connector the HTTP/2 *server*. A device's request
//! becomes one HTTP/2 request on a channel; bodies stream both ways with HTTP/2 flow control.
//!
//! The gateway's first request on a new channel is `GET` [`HELLO_PATH`]: the connector says who
//! it is and which endpoints it serves. Metadata rides in `x-portcullis-*` headers, which the
//! gateway strips from what devices send.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::Response;
use serde::{Deserialize, Serialize};

use crate::refusal::Refusal;

pub const ALPN: &[u8] = b"portcullis-tunnel/1";

/// The HPACK table each end of a channel offers the other (HTTP/2's default is 4 KiB): room
/// for the per-connection metadata of a few hundred devices, so a kept device's
/// `x-portcullis-device` line goes as a table index instead of a literal the other end must
/// decode.
pub const HPACK_TABLE_BYTES: u32 = 64 * 1024;
pub const HELLO_PATH: &str = "/_portcullis/v1/hello";

/// Streams one channel carries at once: the connector's HTTP/2 server says so in
/// SETTINGS_MAX_CONCURRENT_STREAMS, and the gateway never opens more (a slot is taken from
/// a `Channel`'s semaphore before a stream is opened), so h2's own unbounded queue of streams
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
    /// On the hello request: the gateway's id for the channel, so both logs name it alike.
    pub const CHANNEL_ID: HeaderName = HeaderName::from_static("x-portcullis-channel");
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
    /// How long the connector waits for an endpoint's answer (its `endpoint_timeout_secs`):
    /// the gateway warns when its own `request_timeout_secs` is not above it, as its devices
    /// would then get the gateway's 504 rather than the connector's, which names the endpoint.
    /// Absent from older connectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_timeout_secs: Option<u64>,
}

/// How long a channel may stay silent before the connector PINGs its gateway, and how long the
/// answer may take (the gateway watches its end more closely: `gateway::channels::KeepAlive`).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// What h2 (0.4) counts against a connection's budget for small DATA frames: each frame that
/// is not its stream's last and carries fewer than this many bytes costs the difference; a
/// larger one gives back its excess. The budget (at least 25,600, half the connection window
/// when one is set) is never otherwise restored, and when it runs out h2 closes the connection
/// with GOAWAY ENHANCE_YOUR_CALM (`too_many_data_frames`).
pub const SMALL_FRAME: usize = 256;
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
}
