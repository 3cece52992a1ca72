//! The forwarding service on each channel: the gateway's hello is answered with who this
//! connector is and which endpoints it serves; every other request goes on to the endpoint it
//! names, and the endpoint's answer comes back on the channel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use channel::refusal::Refusal;
use channel::tunnel::{self, headers, refusal_response, Body, Hello};
use hyper::body::Incoming;
use hyper::{Request, Response, Uri};
use logs::cmtrace::Severity;
use tokio::sync::watch;

use crate::endpoint::{
    endpoint_url, forwarding_parts, received_line, received_parts, EndpointClient,
};
use crate::lock;
use crate::run::Log;

pub(crate) struct Service {
    /// What the hello says; the certificate part changes on a reload.
    pub(crate) hello: Mutex<Hello>,
    /// Counts changes of the hello: each channel drains and is dialled again when it moves,
    /// one at a time, so the gateways hear the new hello.
    pub(crate) hello_changes: watch::Sender<u64>,
    /// Endpoint ids and their URLs; a reload may swap in new ones.
    pub(crate) endpoints: ArcSwap<HashMap<u64, Uri>>,
    pub(crate) client: ArcSwap<EndpointClient>,
    /// The last filter trail, replayed when verbose is turned on while running.
    pub(crate) trail: Mutex<Vec<(Severity, String)>>,
    pub(crate) log: Log,
}

/// What the requests on one channel share: the service, where that channel's gateway leaves
/// how many worker threads it runs, whether the channel is draining, and the small DATA frames
/// its answers have spent of the gateway's budget.
pub(crate) struct PerChannel {
    pub(crate) service: Arc<Service>,
    pub(crate) announced: Arc<watch::Sender<usize>>,
    /// Set when this channel's turn to drain has come: its answers then say so.
    pub(crate) draining: Arc<AtomicBool>,
    pub(crate) frames: Arc<tunnel::SmallFrames>,
    /// Told once the gateway has asked for the hello: `Some` of the gateway's id for the
    /// channel (0 from a gateway that does not say it).
    pub(crate) greeted: watch::Sender<Option<u64>>,
}

impl PerChannel {
    /// Answers one request from the gateway on this channel, saying on the answer when the
    /// channel is draining.
    pub(crate) async fn answer(&self, request: Request<Incoming>) -> Response<Body> {
        let hello = is_hello(&request).then(|| {
            header_text_of(request.headers(), &headers::CHANNEL_ID)
                .and_then(|id| id.parse::<u64>().ok())
                .unwrap_or(0)
        });
        let mut response = self
            .service
            .handle(request, &self.announced, &self.frames)
            .await;
        if let Some(id) = hello {
            self.greeted.send_replace(Some(id));
        }
        if self.draining.load(Ordering::Relaxed) {
            response.headers_mut().insert(
                headers::DRAINING,
                hyper::header::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

impl Service {
    /// Serves one request from a gateway: its hello, or a device's request to forward;
    /// `announced` is where that gateway's hello leaves how many worker threads it runs.
    async fn handle(
        &self,
        request: Request<Incoming>,
        announced: &watch::Sender<usize>,
        frames: &Arc<tunnel::SmallFrames>,
    ) -> Response<Body> {
        if is_hello(&request) {
            return self.answer_hello(&request, announced);
        }
        self.forward(request, frames).await
    }

    /// Answers the gateway's hello: notes how many worker threads it runs, and says who this
    /// connector is and which endpoints it serves.
    fn answer_hello(
        &self,
        request: &Request<Incoming>,
        announced: &watch::Sender<usize>,
    ) -> Response<Body> {
        let threads = header_text_of(request.headers(), &headers::GATEWAY_THREADS)
            .and_then(|t| t.parse::<usize>().ok());
        if let Some(threads) = threads {
            announced.send_if_modified(|most| {
                let more = threads > *most;
                if more {
                    *most = threads;
                }
                more
            });
        }
        let body = serde_json::to_vec(&*lock(&self.hello)).unwrap_or_default();
        Response::builder()
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(tunnel::full(body))
            .unwrap_or_else(|_| Response::new(tunnel::empty()))
    }

    /// Forwards a device's request to the endpoint it names, and passes back the endpoint's
    /// answer, or the refusal for what went wrong.
    async fn forward(
        &self,
        request: Request<Incoming>,
        frames: &Arc<tunnel::SmallFrames>,
    ) -> Response<Body> {
        // The request goes on as it came, edited in place: the endpoint's URL, and without
        // the channel's metadata or hop-by-hop headers. The message id is taken out of the
        // headers, not copied.
        let (mut parts, body) = request.into_parts();
        let message_id_value = parts.headers.remove(&headers::MESSAGE_ID);
        let message_id = message_id_value
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let endpoint =
            header_text_of(&parts.headers, &headers::ENDPOINT).and_then(|e| e.parse::<u64>().ok());
        let endpoints = self.endpoints.load();
        let Some(base) = endpoint.and_then(|e| endpoints.get(&e)) else {
            let refusal = Refusal::new(channel::refusal::Cause::UnknownEndpoint {
                endpoint: endpoint.unwrap_or(0),
            });
            self.log.error(&format!("Message {message_id}: {refusal}"));
            return refusal_response(&refusal);
        };
        let joined = endpoint_url(base, parts.uri.path(), parts.uri.query());
        drop(endpoints);
        let url = match joined {
            Ok(url) => url,
            Err(e) => {
                let refusal = Refusal::new(channel::refusal::Cause::BadRoute {
                    detail: e.to_string(),
                });
                return refusal_response(&refusal);
            }
        };
        let url_text = url.text;
        self.log
            .info_parts(&forwarding_parts(message_id, &url_text));
        // The client of this moment: a reload swaps in a new one for later requests.
        let client = self.client.load_full();
        self.log.verbose(|| {
            format!(
                "Message {message_id}: device {}; presenting {}",
                header_text_of(&parts.headers, &headers::DEVICE).unwrap_or("-"),
                client
                    .selected_label()
                    .map(|c| format!("client certificate {c}"))
                    .unwrap_or_else(|| "no client certificate".into()),
            )
        });
        parts.uri = url.uri;
        // It came over the channel as HTTP/2; to the endpoint it goes as HTTP/1.1.
        parts.version = hyper::Version::HTTP_11;
        // Who called, for the endpoint, from the gateway's word (read before `strip` drops it).
        let forwarded = parts
            .headers
            .get(&headers::DEVICE)
            .and_then(forwarded_for_device);
        headers::strip(&mut parts.headers);
        if let Some([forwarded_for, forwarded]) = forwarded {
            parts
                .headers
                .insert(headers::X_FORWARDED_FOR, forwarded_for);
            parts.headers.insert(hyper::header::FORWARDED, forwarded);
        }
        let forward = Request::from_parts(parts, tunnel::boxed(body));
        let started = Instant::now();
        // Dropped with this future when the gateway resets the stream before the endpoint
        // answers (its device went away, or its request_timeout_secs struck): says so.
        let withdrawn = Withdrawn {
            log: &self.log,
            message_id,
            url: &url_text,
            started,
            armed: true,
        };
        let outcome = client.forward(forward, &url_text).await;
        withdrawn.disarm();
        self.log.verbose(|| {
            format!(
                "Message {message_id}: endpoint call took {} ms",
                started.elapsed().as_millis()
            )
        });
        match outcome {
            Ok(answer) => {
                let status = answer.status();
                self.log.info_parts(&received_parts(
                    message_id,
                    &url_text,
                    status.as_str(),
                    status.canonical_reason().unwrap_or(""),
                ));
                let (mut parts, body) = answer.into_parts();
                // The gateway reads x-portcullis-* on answers (a status text, the draining
                // notice): only the connector's own may carry them, never an endpoint's.
                strip_metadata(&mut parts.headers);
                // Gathered, so that an endpoint's small pieces do not spend the gateway's
                // budget for small frames and close the channel.
                Response::from_parts(
                    parts,
                    tunnel::boxed(tunnel::Coalesced::new(body, frames.clone())),
                )
            }
            Err(refusal) => {
                self.log.error(&received_line(
                    message_id,
                    &url_text,
                    refusal.status,
                    refusal.text,
                ));
                self.log.error(&format!(
                    "Message {message_id}: {}. {}",
                    refusal.reason(),
                    refusal.remedy()
                ));
                refusal_response(&refusal)
            }
        }
    }
}

/// Logs, when dropped armed, that the gateway withdrew a request before its endpoint answered:
/// hyper drops a stream's future when the gateway resets the stream, and with it the call to
/// the endpoint.
struct Withdrawn<'a> {
    log: &'a Log,
    message_id: &'a str,
    url: &'a str,
    started: Instant,
    armed: bool,
}

impl Withdrawn<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Withdrawn<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.log.warn(&format!(
                "Message {}: the gateway withdrew the request after {} ms, before {} answered (its device went away, or the gateway's request_timeout_secs struck); the call to the endpoint is abandoned",
                self.message_id,
                self.started.elapsed().as_millis(),
                self.url
            ));
        }
    }
}

/// Whether `request` is the gateway's own hello. Only it is answered so: a device's request
/// forwarded to the same path carries a message id and an endpoint, and goes to that endpoint.
fn is_hello(request: &Request<Incoming>) -> bool {
    request.uri().path() == tunnel::HELLO_PATH
        && !request.headers().contains_key(&headers::MESSAGE_ID)
        && !request.headers().contains_key(&headers::ENDPOINT)
}

/// Drops every `x-portcullis-*` header, in place; allocates only when there is one.
fn strip_metadata(map: &mut hyper::HeaderMap) {
    let unwanted: Vec<hyper::header::HeaderName> = map
        .keys()
        .filter(|name| name.as_str().starts_with(headers::PREFIX))
        .cloned()
        .collect();
    for name in unwanted {
        map.remove(&name);
    }
}

/// [`forwarded_headers`] for a device line, remembered per thread: a kept-alive device sends
/// the same line with every request, and parsing and formatting it each time cost more than
/// looking it up. At most `FORWARDED_KEPT` lines are kept; past that the memory starts anew.
fn forwarded_for_device(
    device_line: &hyper::header::HeaderValue,
) -> Option<[hyper::header::HeaderValue; 2]> {
    const FORWARDED_KEPT: usize = 4096;
    type Kept = std::collections::HashMap<
        hyper::header::HeaderValue,
        Option<[hyper::header::HeaderValue; 2]>,
    >;
    thread_local! {
        static KEPT: std::cell::RefCell<Kept> = std::cell::RefCell::new(Kept::new());
    }
    KEPT.with(|kept| {
        let mut kept = kept.borrow_mut();
        if let Some(values) = kept.get(device_line) {
            return values.clone();
        }
        if kept.len() >= FORWARDED_KEPT {
            kept.clear();
        }
        let values = forwarded_headers(device_line.as_bytes());
        kept.insert(device_line.clone(), values.clone());
        values
    })
}

/// `X-Forwarded-For` and `Forwarded` (RFC 7239 4: an IPv6 address in brackets and quotes)
/// for the device a gateway's `x-portcullis-device` line names: the address after its last
/// " from ", which the gateway always writes last (a subject that spells " from " comes
/// before it). None when the line ends in no address.
fn forwarded_headers(device_line: &[u8]) -> Option<[hyper::header::HeaderValue; 2]> {
    let line = std::str::from_utf8(device_line).ok()?;
    let (_, address) = line.rsplit_once(" from ")?;
    let ip = address.parse::<std::net::SocketAddr>().ok()?.ip();
    let forwarded = match ip {
        std::net::IpAddr::V4(v4) => format!("for={v4};proto=https"),
        std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto=https"),
    };
    Some([
        hyper::header::HeaderValue::try_from(ip.to_string()).ok()?,
        hyper::header::HeaderValue::try_from(forwarded).ok()?,
    ])
}

fn header_text_of<'a>(
    headers: &'a hyper::HeaderMap,
    name: &hyper::header::HeaderName,
) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::forwarded_headers;

    /// The device's address is the line's last " from ": a subject spelling another one comes
    /// before it and is not taken.
    #[test]
    fn forwarded_headers_come_from_the_address_the_gateway_wrote_last() {
        let [xff, forwarded] =
            forwarded_headers(b"CN=x from 6.6.6.6:1 (0123ABCD) from 127.0.0.1:50123")
                .expect("an address");
        assert_eq!(xff, "127.0.0.1");
        assert_eq!(forwarded, "for=127.0.0.1;proto=https");
        let [xff, forwarded] =
            forwarded_headers(b"CN=d (token 7) from [2001:db8::1]:443").expect("an address");
        assert_eq!(xff, "2001:db8::1");
        assert_eq!(forwarded, "for=\"[2001:db8::1]\";proto=https");
        assert!(forwarded_headers(b"CN=x from nowhere").is_none());
        // Remembered per thread: the second lookup gives what the first made.
        let line = hyper::header::HeaderValue::from_static("CN=d (AB) from 10.0.0.7:4431");
        let first = super::forwarded_for_device(&line).expect("an address");
        assert_eq!(super::forwarded_for_device(&line), Some(first.clone()));
        assert_eq!(first[0], "10.0.0.7");
        assert!(forwarded_headers(b"").is_none());
    }
}
