//! A connector's connection taken in as a channel: the HTTP/2 client handshake, the driver
//! that keeps it alive (`health::watch`), removes it when it ends and says why in the log,
//! the hello, and registration.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use channel::ended::h2_error_text;
use channel::tunnel::{
    empty, headers, AfterOthers, Hello, SmallFrames, CHANNEL_CONNECTION_WINDOW,
    CHANNEL_MAX_STREAMS, CHANNEL_STREAM_WINDOW, HELLO_PATH, HPACK_TABLE_BYTES,
};
use http_body_util::BodyExt;
use hyper::Request;
use logs::Log;
use runtime::shards::Shards;

use super::health::{seconds, watch, Health, KeepAlive, Silence, Watched, Who};
use super::send::{send_on, SendOnError};
use super::{Channel, Registry};

/// Who dialled in, as the TLS handshake and the connector policy found it.
pub struct Dialled {
    /// The connector's certificate subject, for logs and status.
    pub peer: String,
    /// The connector's certificate (DER), to judge it again after a reload.
    pub peer_cert: Vec<u8>,
    /// Where it dialled from.
    pub addr: SocketAddr,
}

/// What every channel of a gateway runs with.
#[derive(Clone)]
pub struct Settings {
    /// Told to the connector in the hello request.
    pub gateway_threads: usize,
    /// An answer whose header block is over it (counted as HPACK does) is refused.
    pub max_response_header_bytes: u32,
    pub keepalive: KeepAlive,
    /// Where a channel's life is told: unanswered PINGs, its end and why.
    pub log: Log,
}

/// The largest hello the gateway reads.
const MAX_HELLO_BYTES: usize = 1024 * 1024;

/// Why a connector's connection did not become a channel. `R` is why `admit` refused its hello.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError<R> {
    #[error("HTTP/2 handshake on the channel failed: {0}")]
    Handshake(h2::Error),
    #[error("the connector's hello failed: {0}")]
    Hello(HelloError),
    /// The hello announced what this connector may not serve.
    #[error("refused: {0}")]
    Refused(R),
}

/// Why the gateway did not get the connector's hello.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The hello request could not be made.
    #[error("{0}")]
    Request(hyper::http::Error),
    /// h2 failed the hello request (the channel takes no stream, or the stream failed).
    #[error("{0}")]
    Send(h2::Error),
    #[error("answered {0}")]
    Status(hyper::StatusCode),
    /// The answer's body failed, or was over `MAX_HELLO_BYTES`.
    #[error("reading it: {0}")]
    Read(Box<dyn std::error::Error + Send + Sync>),
    #[error("it is not a hello: {0}")]
    NotAHello(serde_json::Error),
    #[error("no answer within 10 s")]
    Timeout,
}

/// Gateway side: drives a freshly accepted channel connection. Returns once the channel is
/// registered; the connection keeps running in the background and leaves the registry when it
/// ends, or when the connector stays silent (`health::watch`), the cause logged. The hello
/// tells the connector the gateway's `gateway_threads` and the channel's id. `admit` judges
/// the connector's hello before the channel is registered (the endpoints it may announce):
/// refused, the channel closes without ever taking a request. An answer whose header block
/// is over `max_response_header_bytes` (counted as HPACK does) is refused, and so is every
/// pushed stream.
pub async fn accept<IO, R>(
    io: IO,
    dialled: Dialled,
    registry: Arc<Registry>,
    settings: &Settings,
    admit: impl FnOnce(&Hello) -> Result<(), R>,
) -> Result<Arc<Channel>, AcceptError<R>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let health = Arc::new(Health::default());
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_window_size(CHANNEL_STREAM_WINDOW)
        .initial_connection_window_size(CHANNEL_CONNECTION_WINDOW)
        .header_table_size(HPACK_TABLE_BYTES)
        // A connector is outside input too: h2's defaults take header blocks up to 16 MiB
        // and keep every stream it pushes.
        .max_header_list_size(settings.max_response_header_bytes)
        .enable_push(false)
        .handshake::<_, Bytes>(Watched::new(io, health.clone()))
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
    let driver_health = health.clone();
    let keepalive = settings.keepalive;
    let log = settings.log.clone();
    tokio::spawn(async move {
        let health = driver_health;
        let silence = async {
            match pings {
                Some(pings) => watch(pings, &health, keepalive, &log).await,
                None => std::future::pending().await,
            }
        };
        let ended = tokio::select! {
            ended = AfterOthers::new(&mut connection) => Ended::Connection(ended),
            silence = silence => Ended::Silent(silence),
            _ = closed.notified() => Ended::Closed,
        };
        // Requests waiting for a slot go to another channel.
        driver_slots.close();
        let removed = driver_registry.remove(id);
        let told = ended.told(&health, removed.as_deref());
        // The gateway's own reason to drop it, named before the connection is dropped: the
        // requests it fails read it (h2 would tell them "broken pipe"). A connection that
        // failed tells its streams its error itself.
        if let (Ended::Silent(Silence::Unanswered(_)), Some((_, why))) = (&ended, &told) {
            health.set_lost(why.clone());
        }
        if let (Some((warn, why)), Some(who)) = (told, health.who.get()) {
            let on_it = removed.map_or(0, |c| c.outstanding());
            let line = format!(
                "Connector {} lost channel {} from {}: {why}{}",
                who.connector,
                who.channel,
                who.from,
                match on_it {
                    0 => String::new(),
                    n => format!("; {n} request(s) were on it"),
                }
            );
            if warn {
                log.warn(&line);
            } else {
                log.info(&line);
            }
        }
        // Dropping the connection fails every request still on it.
        drop(connection);
    });

    let hello_sender = sender.clone();
    let frames = Arc::new(SmallFrames::default());
    let hello = async {
        let request = Request::get(HELLO_PATH)
            .header(headers::GATEWAY_THREADS, settings.gateway_threads)
            .header(headers::CHANNEL_ID, id)
            .body(empty())
            .map_err(HelloError::Request)?;
        let response = send_on(&hello_sender, request, &frames, None)
            .await
            .map_err(|e| match e {
                SendOnError::NotReady(_, e) | SendOnError::Failed(e) => HelloError::Send(e),
            })?;
        if !response.status().is_success() {
            return Err(HelloError::Status(response.status()));
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_HELLO_BYTES)
            .collect()
            .await
            .map_err(HelloError::Read)?
            .to_bytes();
        parse_hello(&body)
    };
    let hello = tokio::time::timeout(Duration::from_secs(10), hello)
        .await
        .map_err(|_| AcceptError::Hello(HelloError::Timeout))?
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
    let _ = health.who.set(Who {
        connector: hello.connector_id.clone(),
        channel: id,
        from: dialled.addr,
    });
    let channel = Arc::new(Channel {
        id,
        hello,
        peer: dialled.peer,
        shard: Shards::here(),
        sender,
        outstanding: AtomicUsize::new(0),
        closing: AtomicBool::new(false),
        peer_cert: dialled.peer_cert,
        close,
        frames,
        slots,
        health,
    });
    registry.add(channel.clone());
    // The driver may have ended before the channel was added: it closed the slots first.
    if channel.slots.is_closed() {
        registry.remove(id);
    }
    Ok(channel)
}

/// The connector's hello, from the body of its answer to the hello request.
pub(crate) fn parse_hello(body: &[u8]) -> Result<Hello, HelloError> {
    serde_json::from_slice::<Hello>(body).map_err(HelloError::NotAHello)
}

/// How a channel's driver ended.
enum Ended {
    /// The connection ended: the connector closed it, or h2 or the network failed it.
    Connection(Result<(), h2::Error>),
    /// The connector stayed silent (or the PING could not go).
    Silent(Silence),
    /// The gateway closed it ([`Channel::close`]), which logged why.
    Closed,
}

impl Ended {
    /// What the log says after "Connector X lost channel N from ADDR: ", and whether as a
    /// warning; `None` when the closer has said it. `channel` (once registered) tells a
    /// connection that ended cleanly by what h2 remembers of it: a GOAWAY received (and its
    /// debug data), or the connection's end without one.
    fn told(&self, health: &Health, channel: Option<&Channel>) -> Option<(bool, String)> {
        match self {
            Ended::Silent(Silence::Unanswered(silent)) => Some((
                true,
                format!(
                    "keep-alive PINGs unanswered for {} (nothing read from the connector meanwhile): the gateway dropped the channel",
                    seconds(*silent)
                ),
            )),
            Ended::Silent(Silence::PingFailed(e)) | Ended::Connection(Err(e)) => {
                Some((true, h2_error_text(e, "the connector", "the gateway")))
            }
            Ended::Connection(Ok(())) => {
                // h2 keeps the connection's error for new requests: a GOAWAY received, or
                // the broken pipe of its end.
                let remembered = channel.and_then(|c| {
                    let mut sender = c.sender.clone();
                    let waker = std::task::Waker::noop();
                    match sender.poll_ready(&mut std::task::Context::from_waker(waker)) {
                        std::task::Poll::Ready(Err(e)) => Some(e),
                        _ => None,
                    }
                });
                let goaway = remembered.as_ref().filter(|e| e.is_go_away() && e.is_remote());
                Some(match goaway {
                    Some(e) if e.reason() == Some(h2::Reason::NO_ERROR) => (
                        false,
                        if health.drained() {
                            "the connector drained it: GOAWAY NO_ERROR after its draining notice (its hello changed, or it is stopping)".into()
                        } else {
                            "the connector closed it: GOAWAY NO_ERROR, a graceful close (its hello changed, or it is stopping)".into()
                        },
                    ),
                    Some(e) => (true, h2_error_text(e, "the connector", "the gateway")),
                    None => (
                        true,
                        "the connector ended the connection without a GOAWAY".into(),
                    ),
                })
            }
            Ended::Closed => None,
        }
    }
}
