//! Keep-alive HTTP/1.1 connections to the endpoints, over TLS: each shard keeps its own, and a
//! request that finds the connection closed under it is sent again when that is safe.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use runtime::shards::Shards;

use super::{Answer, Body};
use crate::lock;

/// Why a call to an endpoint got no answer; the cause (I/O, TLS, HTTP) is the source.
#[derive(Debug, thiserror::Error)]
pub(super) enum CallError {
    #[error("the endpoint URL {0} has no https host")]
    NotHttps(String),
    #[error("connecting to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("TLS handshake with {0}")]
    Tls(String, #[source] std::io::Error),
    #[error("HTTP/1.1 with {0}")]
    Http(String, #[source] hyper::Error),
}

/// Keep-alive HTTP/1.1 connections to the endpoints, over TLS, reused most recent first.
///
/// Written on hyper's connection API instead of hyper-util's pooled client, whose boxed
/// futures, pool hashing and moves cost every request more than this does (see ARCHITECTURE.md,
/// "Performance notes"): endpoints are few, so each keeps a short list, scanned for a
/// connection that is ready for its next request.
pub(super) struct Pool {
    tls: tokio_rustls::TlsConnector,
    endpoints: Mutex<Vec<EndpointConnections>>,
}

struct EndpointConnections {
    /// The endpoint URL's authority as written there (the scheme is always https) and the
    /// shard whose thread drives these connections: the key. A connection is used only by
    /// the shard it was opened on, so no request wakes another thread.
    key: String,
    shard: usize,
    target: Arc<Target>,
    idle: Vec<Pooled>,
}

struct Pooled {
    sender: http1::SendRequest<Body>,
    last_used: Instant,
}

/// A connection unused this long is closed rather than reused (IIS closes its own after 120 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Connections kept per endpoint; more are closed when their request is done.
const MAX_KEPT: usize = 256;

impl Pool {
    pub(super) fn new(tls: rustls::ClientConfig) -> Pool {
        Pool {
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            endpoints: Mutex::new(Vec::new()),
        }
    }

    pub(super) async fn send(&self, mut request: Request<Body>) -> Result<Answer, CallError> {
        let (target, kept) = self.checkout(request.uri())?;
        // HTTP/1.1 wants the origin form and a Host header (the device's was removed).
        let origin = request
            .uri()
            .path_and_query()
            .map(|pq| Uri::from(pq.clone()))
            .unwrap_or_else(|| Uri::from_static("/"));
        *request.uri_mut() = origin;
        request
            .headers_mut()
            .insert(hyper::header::HOST, target.host_header.clone());
        if let Some(mut sender) = kept {
            // An endpoint may close a kept connection just as a request goes out on it (its
            // idle timeout). A request without a body that cannot change anything (GET, HEAD)
            // is then sent again, as nginx does; its head is kept for that.
            let again = RepeatableHead::of(&request);
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.put_back(&target, sender);
                    return Ok(response);
                }
                Err(mut failed) => match (failed.take_message(), again) {
                    // The request had not gone out: it is whole, so it goes again.
                    (Some(unsent), _) => request = unsent,
                    (None, Some(again)) if closed_before_answering(failed.error()) => {
                        request = again.into_request();
                    }
                    (None, _) => {
                        return Err(CallError::Http(
                            target.authority.clone(),
                            failed.into_error(),
                        ));
                    }
                },
            }
        }
        // Boxed: connecting is rare, and its future in line would make every request's future
        // (moved whole into its task) several times larger.
        let mut sender = Box::pin(self.connect(&target)).await?;
        match sender.send_request(request).await {
            Ok(response) => {
                self.put_back(&target, sender);
                Ok(response)
            }
            Err(e) => Err(CallError::Http(target.authority.clone(), e)),
        }
    }

    /// Where `uri` points (worked out once per endpoint) and the most recently used connection
    /// to it that can take a request now; closed and stale ones are dropped on the way. One
    /// whose answer was read a moment ago may not say it is ready until its task runs again;
    /// the request then opens another, and the pool holds one connection more than the
    /// requests in flight.
    fn checkout(
        &self,
        uri: &Uri,
    ) -> Result<(Arc<Target>, Option<http1::SendRequest<Body>>), CallError> {
        let (Some("https"), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(CallError::NotHttps(uri.to_string()));
        };
        let shard = Shards::here();
        let mut endpoints = lock(&self.endpoints);
        let found = endpoints
            .iter()
            .position(|e| e.shard == shard && e.key == authority.as_str());
        let endpoint = match found {
            Some(i) => &mut endpoints[i],
            None => {
                let target = Target::of(uri).ok_or_else(|| CallError::NotHttps(uri.to_string()))?;
                endpoints.push(EndpointConnections {
                    key: authority.to_string(),
                    shard,
                    target: Arc::new(target),
                    idle: Vec::new(),
                });
                let last = endpoints.len() - 1;
                &mut endpoints[last]
            }
        };
        let now = Instant::now();
        endpoint
            .idle
            .retain(|p| !p.sender.is_closed() && now.duration_since(p.last_used) < IDLE_TIMEOUT);
        let kept = endpoint
            .idle
            .iter()
            .rposition(|p| p.sender.is_ready())
            .map(|ready| endpoint.idle.swap_remove(ready).sender);
        Ok((endpoint.target.clone(), kept))
    }

    /// Keeps `sender` for later requests. Its response body may still be streaming; it is
    /// taken again only once it says it is ready.
    fn put_back(&self, target: &Arc<Target>, sender: http1::SendRequest<Body>) {
        let mut endpoints = lock(&self.endpoints);
        if let Some(endpoint) = endpoints
            .iter_mut()
            .find(|e| Arc::ptr_eq(&e.target, target))
        {
            if endpoint.idle.len() < MAX_KEPT {
                endpoint.idle.push(Pooled {
                    sender,
                    last_used: Instant::now(),
                });
            }
        }
    }

    async fn connect(&self, target: &Target) -> Result<http1::SendRequest<Body>, CallError> {
        let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| CallError::Connect(target.authority.clone(), e))?;
        // Requests are small and latency matters more than packet count.
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(target.host.clone()).map_err(|e| {
            CallError::Tls(
                target.authority.clone(),
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            )
        })?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| CallError::Tls(target.authority.clone(), e))?;
        let (sender, connection) = http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| CallError::Http(target.authority.clone(), e))?;
        // The connection's own errors reach the request that was on it.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}

/// The head of a request that may be sent twice: GET or HEAD with an empty body.
struct RepeatableHead {
    method: hyper::Method,
    uri: Uri,
    headers: hyper::HeaderMap,
}

impl RepeatableHead {
    fn of(request: &Request<Body>) -> Option<RepeatableHead> {
        use hyper::body::Body as _;
        let method = request.method();
        ((method == hyper::Method::GET || method == hyper::Method::HEAD)
            && request.body().is_end_stream())
        .then(|| RepeatableHead {
            method: method.clone(),
            uri: request.uri().clone(),
            headers: request.headers().clone(),
        })
    }

    fn into_request(self) -> Request<Body> {
        let mut request = Request::new(channel::tunnel::empty());
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.headers_mut() = self.headers;
        request
    }
}

/// Whether the connection ended before any answer: the request did not reach the endpoint's
/// application, or reached it and was cut off with no reply.
fn closed_before_answering(error: &hyper::Error) -> bool {
    error.is_incomplete_message() || error.is_canceled() || error.is_closed() || {
        use std::error::Error as _;
        error.source().is_some_and(|s| s.is::<std::io::Error>())
    }
}

/// Where an endpoint URL points.
struct Target {
    /// Host name or address, without IPv6 brackets: for DNS, TCP and the TLS server name.
    host: String,
    port: u16,
    /// `host:port`, for messages.
    authority: String,
    /// The Host header: the port only when it is not 443.
    host_header: hyper::header::HeaderValue,
}

impl Target {
    fn of(uri: &Uri) -> Option<Target> {
        if uri.scheme_str() != Some("https") {
            return None;
        }
        let authority = uri.authority()?;
        let bracketed = authority.host();
        let host = bracketed.trim_start_matches('[').trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(443);
        let host_header = if port == 443 {
            bracketed.to_string()
        } else {
            format!("{bracketed}:{port}")
        };
        Some(Target {
            host: host.to_string(),
            port,
            authority: format!("{bracketed}:{port}"),
            host_header: hyper::header::HeaderValue::from_str(&host_header).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pki::RootSet;

    /// Every request's future is moved whole into its task: connecting, which is rare, stays
    /// out of line (in line it made the future several times larger).
    #[test]
    fn a_request_future_does_not_carry_the_connect_path() {
        let pool = Pool::new(
            pki::tls::client_config(&RootSet::default())
                .unwrap()
                .with_no_client_auth(),
        );
        let request = Request::get("https://mp/")
            .body(channel::tunnel::empty())
            .unwrap();
        let size = std::mem::size_of_val(&pool.send(request));
        assert!(size < 2048, "{size} bytes");
    }
}
