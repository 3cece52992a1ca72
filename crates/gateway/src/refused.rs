//! A refused request's answer: the refusal as a response, its log line with the message id,
//! and what becomes of a body the device may still be sending.
//!
//! Over HTTP/1.1 a body left unread ends the connection (hyper closes it rather than read on),
//! and a device that was not told so meets a closed connection with its next request. So the
//! gateway reads what is left of a refused request's body, at most `refused_body_drain_bytes`
//! within `refused_body_drain_timeout_secs`, and throws it away: the connection then serves
//! the device's next request. A body larger than that, or slower, is answered with
//! `Connection: close`, and read on for at most as much and as long again while the answer
//! goes out (nginx's lingering close), so that the device reads its answer rather than a reset.
//! Over HTTP/2 none of this is needed: h2 resets a refused stream with NO_ERROR once its answer
//! is sent (RFC 9113 8.1), and the connection carries on.

use std::sync::Arc;
use std::time::Duration;

use channel::refusal::{Cause, Refusal};
use channel::tunnel::{refusal_response, Body};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::Response;
use logs::cmtrace::Severity;
use tokio::time::Instant;

use crate::device::Device;
use crate::forward::{Pending, FORWARDED_METHODS};
use crate::idle::{BodyWatch, Drain};
use crate::Shared;

/// The refusal's answer, once what the device still sends of the request's body is read (or
/// given up on: the answer then says `Connection: close`), and its log line.
pub(crate) async fn answer(
    refusal: Refusal,
    pending: Pending,
    shared: &Shared,
    device: &Device,
) -> Response<Body> {
    let Pending {
        message_id,
        body,
        watch,
        version,
    } = pending;
    // Written first: a device that goes away meanwhile does not take the line with it.
    shared.log.write(
        if refusal.status >= 500 {
            Severity::Error
        } else {
            Severity::Warning
        },
        &format!(
            "Refused message {message_id} from device {}: {refusal}",
            device.addr
        ),
    );
    let unread = match (version, body, watch) {
        // h2 resets the stream once the answer is sent; the connection is not concerned.
        (hyper::Version::HTTP_2, ..) => None,
        (_, Some(body), _) if !hyper::body::Body::is_end_stream(&body) => drain(
            body,
            shared.refused_body_drain_bytes,
            shared.refused_body_drain_time,
        )
        .await
        .err(),
        // The body went on a channel: what it left unread is drained as it is dropped.
        (_, None, Some(watch)) => (!watch.wait_ended(shared.refused_body_drain_time).await)
            .then(|| not_read_whole(shared)),
        _ => None,
    };
    if let Some(why) = &unread {
        shared.log.warn(&format!(
            "Message {message_id}: the refusal's answer to device {} says Connection: close, as {why}",
            device.addr
        ));
    }
    let mut response = refusal_response(&refusal);
    let headers = response.headers_mut();
    match refusal.cause {
        // RFC 9110 15.5.6: a 405 says what the resource does take.
        Cause::MethodNotAllowed { .. } => {
            headers.insert(
                hyper::header::ALLOW,
                HeaderValue::from_static(FORWARDED_METHODS),
            );
        }
        // When the grace period ends, the endpoint is known or unknown for good.
        Cause::GatewayStarting {
            since_secs,
            grace_secs,
            ..
        } => {
            headers.insert(
                hyper::header::RETRY_AFTER,
                HeaderValue::from(grace_secs.saturating_sub(since_secs).max(1)),
            );
        }
        _ => {}
    }
    if unread.is_some() {
        headers.insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads and throws away the rest of `body`: at most `limit` bytes, within `within`. Ok when
/// it ended; otherwise why not, and the body is read on by [`linger`] meanwhile.
async fn drain(mut body: Incoming, limit: u64, within: Duration) -> Result<(), String> {
    // A declared length over the limit is not waited for.
    if let Some(declared) = hyper::body::Body::size_hint(&body)
        .exact()
        .filter(|&n| n > limit)
    {
        linger(body, limit, within);
        return Err(format!(
            "its body of {declared} bytes is larger than the gateway reads of a refused request's (refused_body_drain_bytes, {limit})"
        ));
    }
    let deadline = Instant::now() + within;
    let mut read: u64 = 0;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(None) => return Ok(()),
            Ok(Some(Ok(frame))) => {
                read += frame.data_ref().map_or(0, |data| data.len() as u64);
                if hyper::body::Body::is_end_stream(&body) {
                    return Ok(());
                }
                if read > limit {
                    linger(body, limit, within);
                    return Err(format!(
                        "its body is larger than the gateway reads of a refused request's (refused_body_drain_bytes, {limit})"
                    ));
                }
            }
            Ok(Some(Err(e))) => {
                return Err(format!("its body broke off after {read} bytes ({e})"));
            }
            Err(_) => {
                linger(body, limit, within);
                return Err(format!(
                    "the rest of its body did not come within refused_body_drain_timeout_secs ({} s; {read} bytes came)",
                    within.as_secs()
                ));
            }
        }
    }
}

/// Why the answer says `Connection: close` when a body that went on a channel was not read
/// whole in time.
pub(crate) fn not_read_whole(shared: &Shared) -> String {
    format!(
        "its body, sent on towards the connector, was not read whole within refused_body_drain_bytes ({}) and refused_body_drain_timeout_secs ({} s)",
        shared.refused_body_drain_bytes,
        shared.refused_body_drain_time.as_secs()
    )
}

/// Drains what is left of a body that went on a channel and was dropped before its end, in a
/// task of its own; says in `watch` whether it ended.
pub(crate) fn drain_later(body: Incoming, bounds: Drain, watch: Arc<BodyWatch>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        watch.settle();
        return;
    };
    runtime.spawn(async move {
        if drain(body, bounds.bytes, bounds.time).await.is_ok() {
            watch.end();
        } else {
            watch.settle();
        }
    });
}

/// Reads on what the device sends of `body` while the answer goes out, at most `limit` bytes
/// within `within`, then drops it: hyper closes the connection once the answer is written and
/// the body dropped. Closing at once, with the device's bytes unread, sends it a reset that
/// may destroy the answer before it is read.
fn linger(mut body: Incoming, limit: u64, within: Duration) {
    tokio::spawn(async move {
        let deadline = Instant::now() + within;
        let mut read: u64 = 0;
        while read <= limit {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    read += frame.data_ref().map_or(0, |data| data.len() as u64);
                }
                _ => return,
            }
        }
    });
}
