//! Idle timeouts around what moves between a device and a channel, as wrappers: the device's
//! request body ([`DeviceBody`]), the connector's answer body ([`AnswerBody`]) and the device's
//! connection itself ([`StallGuard`], for a device that stops reading). Each timer runs only
//! while its side is waited for, and costs nothing until a wait first happens (no task and no
//! timer for an answer that is there when read).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use channel::refusal::{Cause, Refusal};
use channel::tunnel::BoxError;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::channels::ChannelBody;
use crate::device::Device;
use crate::Log;

/// Arms `idle` for `limit` from now if this is the first wait since progress, and polls it:
/// true once the wait has lasted `limit`.
fn waited_too_long(
    mut idle: Pin<&mut Option<Sleep>>,
    waiting: &mut bool,
    limit: Duration,
    cx: &mut Context<'_>,
) -> bool {
    if !*waiting {
        *waiting = true;
        let deadline = Instant::now() + limit;
        match idle.as_mut().as_pin_mut() {
            // Moving a registered timer later takes no lock in tokio.
            Some(sleep) => sleep.reset(deadline),
            None => idle.set(Some(tokio::time::sleep_until(deadline))),
        }
    }
    idle.as_pin_mut()
        .is_some_and(|sleep| sleep.poll(cx).is_ready())
}

/// Why a device's request body ended early: it sent nothing for the device idle timeout.
#[derive(Debug)]
pub struct BodyStalled(pub Duration);

impl std::fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the device sent nothing of its body for {} s",
            self.0.as_secs()
        )
    }
}

impl std::error::Error for BodyStalled {}

/// What the request's handler and its answer learn of a device's body on its way to a
/// channel: whether the device stalled sending it, whether it ended (read whole, by the
/// channel or drained after it), and whether that is settled (ended, or given up on).
#[derive(Default)]
pub struct BodyWatch {
    stalled: AtomicBool,
    ended: AtomicBool,
    settled: AtomicBool,
    changed: tokio::sync::Notify,
}

impl BodyWatch {
    /// The device sent nothing of it for the device idle timeout: its stream was reset.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// It was read to its end.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    pub(crate) fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.settle();
    }

    /// Nothing more will be read of it.
    pub(crate) fn settle(&self) {
        self.settled.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Waits at most `within` for it to be settled; whether it ended.
    pub(crate) async fn wait_ended(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so that a change between the two is not missed.
            changed.as_mut().enable();
            if self.settled.load(Ordering::Acquire) {
                return self.ended();
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.ended();
            }
        }
    }
}

/// How much of a body left unread is drained, and for how long (`refused_body_drain_bytes`,
/// `refused_body_drain_timeout_secs`); see `refused`.
#[derive(Clone, Copy, Debug)]
pub struct Drain {
    pub bytes: u64,
    pub time: Duration,
}

pin_project_lite::pin_project! {
    /// A device's request body that ends in an error (and so resets its channel stream) when
    /// the device sends nothing of it for `limit` while the channel waits for it. `watch`
    /// says so, and when it ends, to the request's handler and answer. Over HTTP/1.1
    /// (`drain`), what is left of it when it is dropped before its end (the connector answered
    /// or refused early, the channel failed) is drained, so that the connection serves the
    /// device's next request (hyper closes one whose body was left unread).
    pub struct DeviceBody {
        // Unpinned (an `Incoming` is `Unpin`), to be taken out and drained on drop.
        inner: Option<Incoming>,
        #[pin]
        idle: Option<Sleep>,
        waiting: bool,
        limit: Duration,
        watch: Arc<BodyWatch>,
        drain: Option<Drain>,
    }

    impl PinnedDrop for DeviceBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let Some(body) = this.inner.take() else {
                return;
            };
            match *this.drain {
                Some(drain)
                    if !this.watch.settled.load(Ordering::Acquire)
                        && !this.watch.stalled()
                        && !hyper::body::Body::is_end_stream(&body) =>
                {
                    crate::refused::drain_later(body, drain, this.watch.clone());
                }
                _ => this.watch.settle(),
            }
        }
    }
}

impl DeviceBody {
    pub fn new(
        inner: Incoming,
        limit: Duration,
        watch: Arc<BodyWatch>,
        drain: Option<Drain>,
    ) -> DeviceBody {
        DeviceBody {
            inner: Some(inner),
            idle: None,
            waiting: false,
            limit,
            watch,
            drain,
        }
    }
}

impl hyper::body::Body for DeviceBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(&mut *inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.waiting = false;
                if frame.is_none() || inner.is_end_stream() {
                    this.watch.end();
                }
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => {
                if waited_too_long(this.idle, this.waiting, *this.limit, cx) {
                    this.watch.stalled.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(Box::new(BodyStalled(*this.limit)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(|inner| inner.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner
            .as_ref()
            .map_or(hyper::body::SizeHint::with_exact(0), |inner| {
                inner.size_hint()
            })
    }
}

/// Counts a request in its device connection's requests in flight until dropped (with the
/// answer's body, or with the request when it got no answer).
pub struct InFlight(Arc<Device>);

impl InFlight {
    /// The request counted, unless the device connection already has `limit` in flight.
    pub fn enter(device: &Arc<Device>, limit: usize) -> Result<InFlight, Refusal> {
        let before = device.in_flight.fetch_add(1, Ordering::Relaxed);
        let counted = InFlight(device.clone());
        if before >= limit {
            return Err(Refusal::new(Cause::TooManyRequests { limit }));
        }
        Ok(counted)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// The connector's answer body on its way to a device. When the connector sends nothing
    /// for `limit` while the device waits for more, it ends in an error, logged as
    /// [`Cause::ConnectorStalled`]: the answer's head has gone, so the device's HTTP/2
    /// stream is reset, or its HTTP/1.1 connection closed. Dropping it resets the channel
    /// stream and frees its slot and its device's count.
    pub struct AnswerBody {
        #[pin]
        inner: ChannelBody,
        #[pin]
        idle: Option<Sleep>,
        waiting: bool,
        limit: Duration,
        log: Log,
        message_id: String,
        // Its `Device` also gives the address for the log.
        in_flight: InFlight,
        // Says when the device's request body stalled (the channel stream was reset for it).
        device_body: Option<Arc<BodyWatch>>,
        device_limit: Duration,
        // The device's HTTP/2 stream, told when the device's turn begins and ends.
        watch: Option<Arc<StreamWatch>>,
    }
}

impl AnswerBody {
    #[allow(clippy::too_many_arguments)] // what the log line needs, moved in once
    pub fn new(
        inner: ChannelBody,
        limit: Duration,
        log: Log,
        message_id: String,
        in_flight: InFlight,
        device_body: Option<Arc<BodyWatch>>,
        device_limit: Duration,
    ) -> AnswerBody {
        // The head is handed over now: the device's turn until hyper asks for the body.
        let watch = stream_watch();
        if let Some(watch) = &watch {
            watch.delivered();
        }
        AnswerBody {
            inner,
            idle: None,
            waiting: false,
            limit,
            log,
            message_id,
            in_flight,
            device_body,
            device_limit,
            watch,
        }
    }
}

impl hyper::body::Body for AnswerBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(watch) = this.watch {
            watch.asked();
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                if this.device_body.as_ref().is_some_and(|w| w.stalled()) {
                    let refusal = Refusal::new(Cause::DeviceStalled {
                        what: "stopped sending its body".into(),
                        seconds: this.device_limit.as_secs(),
                    });
                    this.log.warn(&format!(
                        "Reset message {} of device {}: {refusal}; the answer had begun, so the device's stream or connection is cut",
                        this.message_id, this.in_flight.0.addr
                    ));
                }
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(frame) => {
                *this.waiting = false;
                if let (Some(watch), Some(_)) = (this.watch, &frame) {
                    watch.delivered();
                }
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => {
                if waited_too_long(this.idle, this.waiting, *this.limit, cx) {
                    let refusal = Refusal::new(Cause::ConnectorStalled {
                        seconds: this.limit.as_secs(),
                    });
                    this.log.error(&format!(
                        "Cut the answer to message {} of device {}: {refusal}; its head was already sent, so the device's stream (HTTP/2) or connection (HTTP/1.1) is cut and the channel stream reset",
                        this.message_id, this.in_flight.0.addr
                    ));
                    return Poll::Ready(Some(Err(refusal.to_string().into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        hyper::body::Body::is_end_stream(&self.inner)
    }
}

/// A device connection that fails once the device has taken none of what the gateway writes
/// for `limit` (nginx's `send_timeout`): a device that stops reading its answers. hyper then
/// drops the connection, and with it the answers' channel streams, which frees what they held
/// of their channel. Says so in its device's `write_stalled`.
pub struct StallGuard<IO> {
    io: IO,
    /// Boxed: made only once a write has had to wait, and most connections never wait.
    idle: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    limit: Duration,
    device: Arc<Device>,
}

impl<IO> StallGuard<IO> {
    pub fn new(io: IO, limit: Duration, device: Arc<Device>) -> StallGuard<IO> {
        StallGuard {
            io,
            idle: None,
            waiting: false,
            limit,
            device,
        }
    }

    /// What a write that returned `polled` means: its result, or an error once the device
    /// has taken nothing for `limit`.
    fn watch<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.waiting = false;
            return polled;
        }
        if !self.waiting {
            self.waiting = true;
            let deadline = Instant::now() + self.limit;
            match &mut self.idle {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.idle = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let fired = self
            .idle
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
        if fired {
            self.device.write_stalled.store(true, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the device stopped reading",
            )));
        }
        Poll::Pending
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StallGuard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for StallGuard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(polled, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(polled, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(polled, cx)
    }
}

/// Whether a device's HTTP/2 stream waits on the device: shared by the stream's task
/// ([`DeviceStreams`]) and its answer's body ([`AnswerBody`]). One number: the answer's
/// deliveries so far, doubled, plus 1 while the last one has not yet been taken (hyper waits
/// for the device's flow-control window before it asks the body for more).
#[derive(Default)]
pub struct StreamWatch(AtomicU64);

impl StreamWatch {
    /// The answer's head or a piece of its body was handed to hyper: the device's turn.
    fn delivered(&self) {
        let deliveries = self.0.load(Ordering::Relaxed) >> 1;
        self.0.store(((deliveries + 1) << 1) | 1, Ordering::Relaxed);
    }

    /// hyper asks the body for more: the device took what it had.
    fn asked(&self) {
        let now = self.0.load(Ordering::Relaxed);
        self.0.store(now & !1, Ordering::Relaxed);
    }
}

tokio::task_local! {
    /// The stream a device's HTTP/2 request is served on, for its answer's body to report to.
    static STREAM_WATCH: Arc<StreamWatch>;
}

/// The watch of the HTTP/2 stream being served, if any (none over HTTP/1.1, where
/// [`StallGuard`] sees a device that stops reading).
pub fn stream_watch() -> Option<Arc<StreamWatch>> {
    STREAM_WATCH.try_with(Arc::clone).ok()
}

/// The executor of a device's HTTP/2 connection: hyper runs each stream as a task of its own,
/// and each is watched here. A stream whose answer waits on the device's flow-control window
/// for `limit` (the device reads its connection but not that stream) ends, which resets it
/// towards the device and drops its answer's body, freeing the channel stream and its slot.
/// A device that reads nothing at all is [`StallGuard`]'s.
#[derive(Clone)]
pub struct DeviceStreams {
    pub limit: Duration,
    pub log: Log,
    pub peer: std::net::SocketAddr,
}

impl<F> hyper::rt::Executor<F> for DeviceStreams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let watch = Arc::new(StreamWatch::default());
        tokio::spawn(Watched {
            inner: STREAM_WATCH.scope(watch.clone(), fut),
            watch,
            seen: 0,
            idle: None,
            streams: self.clone(),
        });
    }
}

pin_project_lite::pin_project! {
    struct Watched<F: Future> {
        #[pin]
        inner: tokio::task::futures::TaskLocalFuture<Arc<StreamWatch>, F>,
        watch: Arc<StreamWatch>,
        // The watch's value when the wait now timed began.
        seen: u64,
        idle: Option<Pin<Box<Sleep>>>,
        streams: DeviceStreams,
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.inner.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let now = this.watch.0.load(Ordering::Relaxed);
        if now & 1 == 0 {
            // Not the device's turn: nothing to time.
            *this.seen = 0;
            return Poll::Pending;
        }
        if now != *this.seen {
            // A new wait on the device begins.
            *this.seen = now;
            let deadline = Instant::now() + this.streams.limit;
            match this.idle {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => *this.idle = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let fired = this
            .idle
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
        if fired {
            let refusal = Refusal::new(Cause::DeviceStalled {
                what: "stopped reading the answer".into(),
                seconds: this.streams.limit.as_secs(),
            });
            this.streams.log.warn(&format!(
                "Reset a stream of device {}: {refusal}; its channel stream is reset",
                this.streams.peer
            ));
            // Dropping the stream's task resets it, and its answer's channel stream.
            return Poll::Ready(());
        }
        Poll::Pending
    }
}
