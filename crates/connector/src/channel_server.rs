//! The connector's end of a channel: on the connection it dialled, the connector is the HTTP/2
//! *server* and the gateway the client. [`serve`] runs hyper's HTTP/2 server there with the
//! channel's settings (windows, stream slots, HPACK table, keep-alive) until the channel ends
//! or is drained.

use std::future::Future;

use channel::tunnel::{
    AfterOthers, Body, CHANNEL_CONNECTION_WINDOW, CHANNEL_MAX_STREAMS, CHANNEL_STREAM_WINDOW,
    HPACK_TABLE_BYTES, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT,
};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Streams the gateway has reset before the connector took them, at once, that a channel
/// tolerates (h2's default is 20).
const MAX_PENDING_ACCEPT_RESETS: usize = 4096;

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
/// service should say [`channel::tunnel::headers::DRAINING`] on its answers for a while before, so that the
/// gateway has stopped sending when the GOAWAY comes: a request it sent just as the GOAWAY
/// arrived could be refused, unprocessed, with nothing to send it again from.)
///
/// `max_request_header_bytes` is the largest request header block (counted as HPACK does) it
/// takes: at least what its gateways send (their own `max_request_header_bytes`, which counts
/// their metadata headers too), so that h2 never refuses a request a gateway passed.
pub async fn serve<IO, S>(
    io: IO,
    service: S,
    drain: impl Future<Output = ()>,
    max_request_header_bytes: u32,
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
        .max_header_list_size(max_request_header_bytes)
        // The peer is the connector's own authenticated gateway, which resets a stream for
        // every device that gives up on a request: h2's rapid-reset limits (20 reset streams
        // awaiting accept; 1,024 refused in a channel's life) would close a channel that
        // every device shares because of a few devices' cancellations.
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(None)
        .serve_connection(TokioIo::new(io), service);
    let mut connection = AfterOthers::new(connection);
    tokio::select! {
        ended = &mut connection => return ended.map(|()| Served::Closed),
        () = drain => {}
    }
    std::pin::Pin::new(connection.get_mut()).graceful_shutdown();
    // The gateway closes its end once it has its answers, often before hyper has said its
    // last GOAWAY: an error here ends a drained channel too.
    let _ = connection.await;
    Ok(Served::Drained)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    /// A channel that breaks the peer's HTTP/2 rules ends with GOAWAY ENHANCE_YOUR_CALM, and
    /// each end's log says so by name, with who sent it: hyper alone said "http2 error". Made
    /// real: a gateway end (h2's client) sends more empty DATA frames than h2 takes (100),
    /// so the connector's hyper server says GOAWAY `too_many_data_frames`.
    #[tokio::test]
    async fn a_goaway_enhance_your_calm_is_told_by_name_at_both_ends() {
        let (gateway_end, connector_end) = tokio::io::duplex(1024 * 1024);
        let service = hyper::service::service_fn(|_request: Request<Incoming>| async {
            // Never answers: the body's frames are what is judged.
            std::future::pending::<Result<Response<Body>, std::convert::Infallible>>().await
        });
        let connector = tokio::spawn(serve(
            connector_end,
            service,
            std::future::pending(),
            64 * 1024,
        ));
        let (sender, connection) = h2::client::handshake(gateway_end).await.expect("h2");
        let gateway = tokio::spawn(connection);
        let mut sender = sender.ready().await.expect("ready");
        let request = hyper::Request::post("/upload").body(()).expect("request");
        let (_response, mut body) = sender.send_request(request, false).expect("sent");
        for _ in 0..150 {
            if body.send_data(Bytes::new(), false).is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let limit = std::time::Duration::from_secs(10);
        let connector_ended = tokio::time::timeout(limit, connector)
            .await
            .expect("the connector's end closes")
            .expect("no panic");
        let hyper_error = connector_ended.expect_err("a GOAWAY is an error");
        assert_eq!(
            hyper_error.to_string(),
            "http2 error",
            "what hyper says alone"
        );
        let connector_says =
            channel::ended::error_text(&hyper_error, "the gateway", "this connector");
        assert_eq!(
            connector_says,
            "this connector's HTTP/2 sent GOAWAY ENHANCE_YOUR_CALM (detected excessive load generating behavior) to the gateway, which broke its rules: too many small DATA frames, stream resets or refused streams"
        );
        let gateway_ended = tokio::time::timeout(limit, gateway)
            .await
            .expect("the gateway's end closes")
            .expect("no panic");
        let h2_error = gateway_ended.expect_err("a GOAWAY is an error");
        let gateway_says = channel::ended::h2_error_text(&h2_error, "the connector", "the gateway");
        assert_eq!(
            gateway_says,
            "the connector sent GOAWAY ENHANCE_YOUR_CALM (detected excessive load generating behavior): too many small DATA frames, stream resets or refused streams, debug data \"too_many_data_frames\""
        );
    }
}
