//! A device's request sent on a channel: a stream slot (or a place in the queue), the request
//! sent with h2 directly, its body streamed under flow control, and the answer's body.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use channel::refusal::{Cause, Refusal};
use channel::tunnel::{headers, Body, Coalesced, SmallFrames, SMALL_FRAME};
use http_body_util::BodyExt;
use hyper::{Request, Response};

use super::{Channel, Queue};

/// Why a channel gave no answer's head.
pub(super) enum SendError {
    /// The channel takes no new requests (drained by its connector, or broken): the request
    /// was not sent and comes back whole, for another channel.
    Closing(Box<Request<Body>>),
    /// What to tell the device.
    Refused(Refusal),
}

impl SendError {
    pub(super) fn into_refusal(self) -> Refusal {
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
    pub(super) async fn send(
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
                self.health.set_drained();
            }
        }
        answered.map_err(|e| match e {
            SendOnError::NotReady(request, _) => {
                self.closing.store(true, Ordering::Relaxed);
                SendError::Closing(request)
            }
            SendOnError::Failed(e) => SendError::Refused(Refusal::new(
                // The gateway dropped the channel (its connector silent, or no longer
                // allowed): that is why, whatever h2 says of the connection it lost.
                match self.health.lost() {
                    Some(why) => Cause::ChannelBroken {
                        detail: format!(
                            "{why} (connector {}, channel {})",
                            self.hello.connector_id, self.id
                        ),
                    },
                    None => refused_answer(&e),
                },
            )),
        })
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
            detail: channel::ended::h2_error_text(e, "the connector", "the gateway"),
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

/// Why [`send_on`] failed.
pub(super) enum SendOnError {
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
pub(super) async fn send_on(
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
    loop {
        // The connector may reset the stream while the device is slow to send (it answered
        // or refused early): then the body is let go at once (the device's connection drains
        // what is left of it, see `idle::DeviceBody`).
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = std::future::poll_fn(|cx| stream.poll_reset(cx)) => return,
        };
        let Some(frame) = frame else {
            break;
        };
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use channel::tunnel::{empty, EndpointInfo, Hello, HELLO_PATH};

    use super::super::{accept, Registry};
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
                    max_request_header_bytes: None,
                    endpoint_timeout_secs: None,
                };
                let body = Bytes::from(serde_json::to_vec(&hello).expect("json"));
                let mut stream = respond
                    .send_response(Response::new(()), false)
                    .expect("respond");
                stream.send_data(body, true).expect("hello body");
            }
        });
        let registry = Arc::new(Registry::default());
        let settings = super::super::Settings {
            gateway_threads: 1,
            max_response_header_bytes: 64 * 1024,
            keepalive: super::super::KeepAlive::default(),
            log: logs::Logger::new("TEST").into_log(),
        };
        let dialled = super::super::Dialled {
            peer: "c".into(),
            peer_cert: Vec::new(),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
        };
        let channel = accept(gateway_end, dialled, registry.clone(), &settings, |_| {
            Ok::<(), std::convert::Infallible>(())
        })
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
