//! Whether a channel's connector is alive. Anything read from its connection is a sign of
//! life (`Watched` counts reads, which costs a store per read and no clock); a channel quiet
//! for a while is sent a PING. When the connector has shown no life for
//! `unresponsive_after` with a PING out, the channel is unresponsive: `Registry::pick` passes
//! it by, so that no new request waits on a frozen connector. Past `timeout` the channel is
//! dropped, its cause named for the log and for the requests that were on it.
//!
//! Before this, the only check was h2's PING every 5 s with 5 s to answer: a frozen
//! connector was dropped 5-10 s after it froze and kept getting new requests meanwhile.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use logs::Log;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// `channel_unresponsive_after_ms` unless the gateway sets another.
pub const DEFAULT_UNRESPONSIVE_AFTER: Duration = Duration::from_millis(1000);
/// `channel_keepalive_timeout_secs` unless the gateway sets another.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connector may stay silent (nothing read from its channel, a PING unanswered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// Then no new request goes to the channel.
    pub unresponsive_after: Duration,
    /// Then the channel is dropped.
    pub timeout: Duration,
}

impl Default for KeepAlive {
    fn default() -> KeepAlive {
        KeepAlive {
            unresponsive_after: DEFAULT_UNRESPONSIVE_AFTER,
            timeout: DEFAULT_KEEPALIVE_TIMEOUT,
        }
    }
}

/// One channel's signs of life, shared by its connection's reader, its driver and `pick`.
#[derive(Default)]
pub(super) struct Health {
    /// Reads that brought bytes: bumped by the one task that drives the connection.
    reads: AtomicU64,
    /// How long the connector has been silent with a PING out, in milliseconds, once that is
    /// over `unresponsive_after`; 0 while it answers.
    silent_ms: AtomicU64,
    /// Why the gateway dropped the channel, for the requests that were on it.
    lost: OnceLock<String>,
    /// Set when an answer said the connector is draining the channel.
    drained: AtomicBool,
    /// Whose channel it is, once the hello has named the connector: the log says nothing of
    /// a channel before (its failure to open is logged where it was accepted).
    pub(super) who: OnceLock<Who>,
}

/// A channel as the log names it.
pub(super) struct Who {
    pub(super) connector: String,
    pub(super) channel: u64,
    pub(super) from: std::net::SocketAddr,
}

impl std::fmt::Display for Who {
    /// "lab-connector channel 7 from 127.0.0.1:50211", after "Connector ".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} channel {} from {}",
            self.connector, self.channel, self.from
        )
    }
}

impl Health {
    /// How long the connector has been silent past `unresponsive_after` (`None`: it answers).
    pub(super) fn silent(&self) -> Option<u64> {
        match self.silent_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }

    /// Why the gateway dropped the channel, once it has.
    pub(super) fn lost(&self) -> Option<&str> {
        self.lost.get().map(String::as_str)
    }

    pub(super) fn set_lost(&self, why: String) {
        let _ = self.lost.set(why);
    }

    pub(super) fn drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    pub(super) fn set_drained(&self) {
        self.drained.store(true, Ordering::Relaxed);
    }
}

/// A channel's connection, its reads counted in [`Health`].
pub(super) struct Watched<IO> {
    io: IO,
    health: std::sync::Arc<Health>,
}

impl<IO> Watched<IO> {
    pub(super) fn new(io: IO, health: std::sync::Arc<Health>) -> Watched<IO> {
        Watched { io, health }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            // Only the connection's own task writes it: no read-modify-write needed.
            let reads = &this.health.reads;
            reads.store(
                reads.load(Ordering::Relaxed).wrapping_add(1),
                Ordering::Relaxed,
            );
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Why [`watch`] gave the channel up.
pub(super) enum Silence {
    /// No life for the keep-alive timeout, a PING unanswered all along.
    Unanswered(Duration),
    /// h2 refused the PING: the connection is going.
    PingFailed(h2::Error),
}

/// Watches a channel's signs of life until the connector has been silent for
/// `keepalive.timeout`. A channel that reads something within half of `unresponsive_after` is
/// alive and costs one timer wake-up per half; one quiet that long is sent a PING, and then
/// looked at every quarter until the answer: silent (nothing read) for `unresponsive_after`
/// since its last sign of life, it is marked unresponsive and logged, and marked and logged
/// again when life returns. Time this gateway's own thread did not run (a timer come late: the
/// connection, driven by the same task, could not read either) is not counted against the
/// connector.
pub(super) async fn watch(
    mut pings: h2::PingPong,
    health: &Health,
    keepalive: KeepAlive,
    log: &Log,
) -> Silence {
    let quiet = keepalive.unresponsive_after / 2;
    let step = (keepalive.unresponsive_after / 4).max(Duration::from_millis(5));
    let reads = || health.reads.load(Ordering::Relaxed);
    let mut seen = reads();
    let mut last_life = Instant::now();
    loop {
        // Reads are life enough: a PING only for a channel quiet for `quiet`.
        loop {
            let due = Instant::now() + quiet;
            tokio::time::sleep_until(due).await;
            let now = Instant::now();
            let read = reads();
            if read != seen || now - due > step {
                seen = read;
                last_life = now;
                continue;
            }
            break;
        }
        if let Err(e) = pings.send_ping(h2::Ping::opaque()) {
            return Silence::PingFailed(e);
        }
        let mut next = last_life + keepalive.unresponsive_after;
        loop {
            tokio::select! {
                pong = std::future::poll_fn(|cx| pings.poll_pong(cx)) => {
                    if let Err(e) = pong {
                        return Silence::PingFailed(e);
                    }
                    seen = reads();
                    alive(health, log, last_life.elapsed());
                    last_life = Instant::now();
                    break;
                }
                () = tokio::time::sleep_until(next) => {
                    let now = Instant::now();
                    let late = now - next;
                    if late > step {
                        last_life = (last_life + late).min(now);
                    }
                    let read = reads();
                    if read != seen {
                        seen = read;
                        alive(health, log, now - last_life);
                        last_life = now;
                    }
                    let silent = now - last_life;
                    if silent >= keepalive.unresponsive_after {
                        let ms = u64::try_from(silent.as_millis()).unwrap_or(u64::MAX).max(1);
                        if health.silent_ms.swap(ms, Ordering::Relaxed) == 0 {
                            if let Some(who) = health.who.get() {
                                log.warn(&format!(
                                    "Connector {who}: keep-alive PING unanswered for {}; no new request goes to the channel until it answers",
                                    seconds(silent)
                                ));
                            }
                        }
                    }
                    if silent >= keepalive.timeout {
                        return Silence::Unanswered(silent);
                    }
                    next = now + step;
                }
            }
        }
    }
}

/// The connector showed life after `silent`: a channel marked unresponsive takes requests
/// again, and the log says so.
fn alive(health: &Health, log: &Log, silent: Duration) {
    if health.silent_ms.swap(0, Ordering::Relaxed) != 0 {
        if let Some(who) = health.who.get() {
            log.info(&format!(
                "Connector {who}: heard from again after {} of silence; requests go to the channel again",
                seconds(silent)
            ));
        }
    }
}

/// A duration as the log says it: "1.25 s".
pub(super) fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
