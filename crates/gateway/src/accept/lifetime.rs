//! When a device connection ends besides its own closing: an HTTP/2 one idle too long
//! ([`Idle`], counting its streams open with [`OpenStream`] and [`Counted`]), and any one when
//! the gateway stops gracefully ([`Drainable`]).

use std::sync::Arc;
use std::time::Duration;

use channel::tunnel::{self, Body};

use crate::device::Device;
use crate::Shared;

/// How long an idle HTTP/2 device has to close after its GOAWAY before it is cut.
const GOAWAY_GRACE: Duration = Duration::from_secs(5);

/// An HTTP/2 stream open on a device connection, until dropped with its answer's body.
pub(super) struct OpenStream {
    device: Arc<Device>,
    epoch: tokio::time::Instant,
}

impl OpenStream {
    pub(super) fn new(device: &Arc<Device>, epoch: tokio::time::Instant) -> OpenStream {
        device
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        OpenStream {
            device: device.clone(),
            epoch,
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        // Milliseconds since the epoch, plus one: 0 says no stream has ended yet.
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.device
            .last_stream_end
            .fetch_max(ms, std::sync::atomic::Ordering::AcqRel);
        self.device
            .streams
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// An answer's body with its stream's [`OpenStream`].
    pub(super) struct Counted {
        #[pin]
        pub(super) body: Body,
        pub(super) _open: OpenStream,
    }
}

impl hyper::body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = tunnel::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/2 device connection closed (GOAWAY, then cut after `GOAWAY_GRACE`) once it has
    /// had no stream open for `idle_timeout_secs`, or none at all by its first-request
    /// deadline: hyper's HTTP/2 server has no idle timeout of its own. Its timer is reset only
    /// when it fires, not per stream.
    pub(super) struct Idle<F> {
        #[pin]
        pub(super) served: F,
        #[pin]
        pub(super) sleep: tokio::time::Sleep,
        pub(super) device: Arc<Device>,
        pub(super) shared: Arc<Shared>,
        pub(super) first_deadline: tokio::time::Instant,
        pub(super) closing: bool,
        pub(super) drain: fn(std::pin::Pin<&mut F>),
    }
}

impl<F> Idle<F> {
    /// GOAWAY: the streams open are answered, no new one is taken.
    pub(super) fn shut(self: std::pin::Pin<&mut Self>) {
        let this = self.project();
        if !*this.closing {
            *this.closing = true;
            (this.drain)(this.served);
        }
    }
}

impl<F: std::future::Future> std::future::Future for Idle<F> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::sync::atomic::Ordering;
        use std::task::Poll;
        if self.as_mut().project().served.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        while self.as_mut().project().sleep.poll(cx).is_ready() {
            let this = self.as_mut().project();
            let now = tokio::time::Instant::now();
            let open = this.device.streams.load(Ordering::Acquire) > 0;
            if *this.closing {
                if !open {
                    // Told to go, nothing under way, and still here: cut.
                    return Poll::Ready(());
                }
                // Its streams are answered first (a graceful stop waits for them).
                this.sleep.reset(now + GOAWAY_GRACE);
                continue;
            }
            let ended = this.device.last_stream_end.load(Ordering::Acquire);
            let due = if open {
                now + this.shared.idle
            } else if ended == 0 {
                *this.first_deadline
            } else {
                this.shared.epoch + Duration::from_millis(ended - 1) + this.shared.idle
            };
            if due > now {
                this.sleep.reset(due);
                continue;
            }
            let counts = &this.shared.limits.counts;
            if ended == 0 {
                &counts.closed_first_request_timeout
            } else {
                &counts.closed_idle
            }
            .fetch_add(1, Ordering::Relaxed);
            this.sleep.reset(now + GOAWAY_GRACE);
            self.as_mut().shut();
            if self.as_mut().project().served.poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

pin_project_lite::pin_project! {
    /// A device connection that drains when the gateway stops gracefully: the request under
    /// way is answered, then it closes (an idle one at once). Not a `select!` in the async fn
    /// that serves the connection: that made every idle connection's future much larger; this
    /// adds only its own few fields.
    pub(super) struct Drainable<F> {
        #[pin]
        served: F,
        #[pin]
        stop: tokio::sync::futures::OwnedNotified,
        shared: Arc<Shared>,
        draining: bool,
        drain: fn(std::pin::Pin<&mut F>),
    }
}

impl<F> Drainable<F> {
    /// `served`, told `drain` once the gateway stops (now, if it already has).
    pub(super) fn new(
        served: F,
        shared: Arc<Shared>,
        drain: fn(std::pin::Pin<&mut F>),
    ) -> Drainable<F> {
        Drainable {
            served,
            stop: shared.stop.clone().notified_owned(),
            shared,
            draining: false,
            drain,
        }
    }
}

impl<F: std::future::Future> std::future::Future for Drainable<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let mut this = self.project();
        if !*this.draining {
            // The flag covers a stop told before this connection first waited for it.
            let told = this.stop.as_mut().poll(cx).is_ready();
            if told
                || this
                    .shared
                    .stopping
                    .load(std::sync::atomic::Ordering::SeqCst)
            {
                *this.draining = true;
                (this.drain)(this.served.as_mut());
            }
        }
        this.served.poll(cx)
    }
}
