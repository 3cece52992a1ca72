//! Why a channel (or a stream on it) ended, in words a log can say: who sent the GOAWAY or
//! the reset, its error code by name, and the debug data that came with it. hyper prints an
//! h2 failure as "http2 error" and h2 itself as "connection error received: detected excessive
//! load generating behavior": neither says which end gave up, nor the code an operator looks up.

use std::error::Error;

/// The most of a GOAWAY's debug data shown (it is the peer's text).
const MAX_DEBUG_DATA: usize = 200;

/// What `e` means on a channel. `peer` names the other end ("the gateway", "connector X"),
/// `this` this end ("this connector", "the gateway").
pub fn h2_error_text(e: &h2::Error, peer: &str, this: &str) -> String {
    let Some(reason) = e.reason() else {
        return match e.get_io() {
            Some(io) => io_text(io, peer),
            None => e.to_string(),
        };
    };
    let code = format!("{reason:?} ({})", reason.description());
    let hint = match reason {
        h2::Reason::ENHANCE_YOUR_CALM => {
            ": too many small DATA frames, stream resets or refused streams"
        }
        h2::Reason::NO_ERROR => ": a graceful close",
        _ => "",
    };
    if e.is_go_away() {
        if e.is_remote() {
            format!(
                "{peer} sent GOAWAY {code}{hint}{}",
                debug_data(&e.to_string())
            )
        } else if e.is_library() {
            format!("{this}'s HTTP/2 sent GOAWAY {code} to {peer}, which broke its rules{hint}")
        } else {
            format!("{this} sent GOAWAY {code}{hint}")
        }
    } else if e.is_reset() {
        if e.is_remote() {
            format!("{peer} reset the stream: {code}")
        } else if e.is_library() {
            format!("{this}'s HTTP/2 reset the stream: {code}")
        } else {
            format!("{this} reset the stream: {code}")
        }
    } else {
        format!("HTTP/2 error {code}")
    }
}

/// What an error whose sources hold an h2 error (hyper's "http2 error") means on a channel,
/// as [`h2_error_text`] says it; hyper's keep-alive timeout by name; anything else as its
/// messages, outermost first.
pub fn error_text(e: &(dyn Error + 'static), peer: &str, this: &str) -> String {
    let mut next = Some(e);
    while let Some(error) = next {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2_error_text(h2, peer, this);
        }
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            if hyper.is_timeout() {
                return format!(
                    "{peer} left {this}'s keep-alive PINGs unanswered for {} s",
                    crate::tunnel::KEEPALIVE_TIMEOUT.as_secs()
                );
            }
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return io_text(io, peer);
        }
        next = error.source();
    }
    chain(e)
}

/// An I/O error on a channel's connection, with what lies inside it (a TLS alert, say).
fn io_text(e: &std::io::Error, peer: &str) -> String {
    let text = chain(e);
    match e.kind() {
        // rustls says no more than this (and a link to its manual).
        std::io::ErrorKind::UnexpectedEof => format!(
            "the connection ended without a GOAWAY or TLS close_notify ({peer} stopped, or the network cut it)"
        ),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted => {
            format!("the connection was reset ({peer} stopped, or the network cut it): {text}")
        }
        _ => format!("I/O error on the connection: {text}"),
    }
}

/// The error's messages, outermost first, each once (many repeat their source's).
fn chain(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(error) = next {
        let more = error.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        next = error.source();
    }
    text
}

/// The debug data h2 prints after a GOAWAY's reason (`... (b"too_many_data_frames")`), shown
/// as text, shortened: it is what the peer chose to say.
fn debug_data(displayed: &str) -> String {
    let Some(start) = displayed.find(" (b\"") else {
        return String::new();
    };
    let data = displayed[start + 4..]
        .strip_suffix("\")")
        .unwrap_or(&displayed[start + 4..]);
    let mut shown: String = data.chars().take(MAX_DEBUG_DATA).collect();
    if shown.len() < data.len() {
        shown.push_str("...");
    }
    format!(", debug data \"{shown}\"")
}
