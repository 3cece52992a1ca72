//! The gateway's end of the channels: a connector's connection taken in as a channel
//! ([`accept()`]: HTTP/2 client handshake, the hello, registration), the channels by endpoint
//! ([`Registry`]: pick, the queue for stream slots, what status shows), and a device's request
//! sent on one (`send`: stream slots, h2 directly, the request body streamed, the answer's
//! body as [`ChannelBody`]). What both ends share (ALPN, the hello, header names, windows,
//! bodies) is `channel::tunnel`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use channel::tunnel::{Hello, SmallFrames};

mod accept;
mod health;
mod registry;
mod send;

pub(crate) use accept::parse_hello;
pub use accept::{accept, AcceptError, Dialled, HelloError, Settings};
pub use health::{KeepAlive, DEFAULT_KEEPALIVE_TIMEOUT, DEFAULT_UNRESPONSIVE_AFTER};
pub use registry::{Queue, Registry, DEFAULT_MAX_QUEUED_REQUESTS};
pub use send::ChannelBody;

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
    /// (at most [`CHANNEL_MAX_STREAMS`](channel::tunnel::CHANNEL_MAX_STREAMS)); a request takes one before its stream is opened and
    /// holds it until its answer's body is dropped. Closed when the channel ends.
    slots: Arc<tokio::sync::Semaphore>,
    /// Its connector's signs of life (`pick` passes by a channel gone silent), and why it was
    /// dropped.
    health: Arc<health::Health>,
}

impl Channel {
    /// Closes the channel now (its connector is no longer allowed: `why`): what was on it
    /// fails, told `why`, and it leaves the registry.
    pub fn close(&self, why: &str) {
        self.health
            .set_lost(format!("the gateway closed the channel: {why}"));
        self.closing.store(true, Ordering::Relaxed);
        // A permit is kept if the driver is not waiting at this moment.
        self.close.notify_one();
    }

    /// Whether the channel has refused a new request (see `send::SendError::Closing`).
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// How long its connector has left a keep-alive PING unanswered, in milliseconds, once
    /// that is over `channel_unresponsive_after_ms` (`None`: it answers).
    pub fn silent_ms(&self) -> Option<u64> {
        self.health.silent()
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
}
