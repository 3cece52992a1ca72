//! A connector's connection taken in as a channel: the HTTP/2 client handshake, the driver
//! that keeps it alive and removes it when it ends, the hello, and registration.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use channel::tunnel::{
    empty, headers, AfterOthers, Hello, SmallFrames, CHANNEL_CONNECTION_WINDOW,
    CHANNEL_MAX_STREAMS, CHANNEL_STREAM_WINDOW, HELLO_PATH, HPACK_TABLE_BYTES, KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT,
};
use http_body_util::BodyExt;
use hyper::Request;
use runtime::shards::Shards;

use super::send::{send_on, SendOnError};
use super::{Channel, Registry};

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
/// ends (including when PINGs go unanswered). The hello tells the connector the gateway's
/// `gateway_threads`. `admit` judges the connector's hello before the channel is registered
/// (the endpoints it may announce): refused, the channel closes without ever taking a request.
/// An answer whose header block is over `max_response_header_bytes`
/// (counted as HPACK does) is refused, and so is every pushed stream.
pub async fn accept<IO, R>(
    io: IO,
    peer: String,
    peer_cert: Vec<u8>,
    registry: Arc<Registry>,
    gateway_threads: usize,
    max_response_header_bytes: u32,
    admit: impl FnOnce(&Hello) -> Result<(), R>,
) -> Result<Arc<Channel>, AcceptError<R>>
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

/// The connector's hello, from the body of its answer to the hello request.
pub(crate) fn parse_hello(body: &[u8]) -> Result<Hello, HelloError> {
    serde_json::from_slice::<Hello>(body).map_err(HelloError::NotAHello)
}
