//! The connector's calls to internal endpoints: a pooled, keep-alive HTTPS client that presents
//! the client-authentication certificate the filter chain selected, and the mapping of what
//! comes back (or what goes wrong) to a [`Refusal`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use channel::refusal::{classify_endpoint_answer, Cause, Refusal};
use channel::shards::Shards;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response, Uri};
use hyper_util::rt::TokioIo;
use pki::crl::{CrlPolicy, RevocationList};
use pki::{CertStore, RootSet};

pub type Body = channel::tunnel::Body;

/// IIS's sub-status (403.7, 403.16) as the reference management point reports it; a name made
/// at compile time, as it is looked up on every answer.
const IIS_SUBSTATUS: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static("x-iis-substatus");

#[derive(Debug, thiserror::Error)]
pub enum EndpointClientError {
    #[error("TLS setup for endpoint calls: {0}")]
    Tls(#[from] rustls::Error),
}

/// What the endpoint said, when it is to be passed to the device as it is.
pub type Answer = Response<Incoming>;

/// What the endpoints' server certificates are checked against.
pub struct EndpointTrust {
    pub roots: RootSet,
    /// When not empty, each endpoint's certificate is checked against these CRLs.
    pub crls: Vec<RevocationList>,
    /// Whether an endpoint whose issuer has no current CRL here is refused or accepted.
    pub crl_policy: CrlPolicy,
}

impl From<RootSet> for EndpointTrust {
    fn from(roots: RootSet) -> Self {
        EndpointTrust {
            roots,
            crls: Vec::new(),
            crl_policy: CrlPolicy::Refuse,
        }
    }
}

pub struct EndpointClient {
    pool: Pool,
    /// The client certificate presented (the filter chain selected one and its key is usable).
    certificate: Option<String>,
    timeout: Duration,
}

impl EndpointClient {
    /// `selected` is the store entry the filter chain chose (none: calls go without a client
    /// certificate, and endpoints that require one answer 403.7). `trust` holds the roots the
    /// endpoints' server certificates must chain to.
    pub fn new(
        store: &CertStore,
        selected: Option<usize>,
        trust: &EndpointTrust,
        timeout: Duration,
    ) -> Result<EndpointClient, EndpointClientError> {
        let builder = if trust.crls.is_empty() {
            pki::tls::client_config(&trust.roots)?
        } else {
            pki::tls::client_config_checking_revocation(
                &trust.roots,
                &trust.crls,
                trust.crl_policy == CrlPolicy::AllowAndWarn,
            )?
        };
        let identity = selected
            .and_then(|i| store.entries.get(i))
            .and_then(|entry| entry.usable_key().map(|key| (entry, key.clone_key())));
        let certificate = identity.as_ref().map(|(entry, _)| entry.cert.label());
        let mut tls = match identity {
            Some((entry, key)) => {
                let mut chain = vec![entry.cert.der().to_vec().into()];
                // Send the intermediates the store holds, so the endpoint can build the chain.
                chain.extend(
                    store
                        .chain_certs
                        .iter()
                        .filter(|c| !c.is_self_issued())
                        .map(|c| c.der().to_vec().into()),
                );
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(EndpointClient {
            pool: Pool::new(tls),
            certificate,
            timeout,
        })
    }

    pub fn presents_certificate(&self) -> bool {
        self.certificate.is_some()
    }

    /// The presented certificate's subject and thumbprint, if there is one.
    pub fn selected_label(&self) -> Option<String> {
        self.certificate.clone()
    }

    /// Sends `request` (its URI is the endpoint's full URL, `url` as text, for refusals). An
    /// answer the device should see as it is comes back as `Ok`; a refusal the connector
    /// recognises as `Err`.
    pub async fn forward(&self, request: Request<Body>, url: &str) -> Result<Answer, Refusal> {
        let call = self.pool.send(request);
        let response = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => {
                return Err(Refusal::new(Cause::EndpointTimeout {
                    url: url.to_string(),
                    seconds: self.timeout.as_secs(),
                }))
            }
            Ok(Err(e)) => return Err(self.transport_refusal(url.to_string(), &e)),
            Ok(Ok(response)) => response,
        };
        let substatus = response
            .headers()
            .get(&IIS_SUBSTATUS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        match classify_endpoint_answer(
            url,
            response.status().as_u16(),
            substatus,
            self.presents_certificate(),
        ) {
            Some(refusal) => Err(refusal),
            None => Ok(response),
        }
    }

    fn transport_refusal(&self, url: String, error: &(dyn std::error::Error + 'static)) -> Refusal {
        match find_tls_error(error) {
            // TLS 1.3 servers that demand a certificate say so with an alert.
            Some(rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired)) => {
                Refusal::new(Cause::EndpointNeedsClientCertificate {
                    url,
                    presented: self.presents_certificate(),
                })
            }
            Some(tls) => Refusal::new(Cause::EndpointTlsFailed {
                url,
                detail: tls.to_string(),
            }),
            None => Refusal::new(Cause::EndpointUnreachable {
                url,
                detail: error_chain(error),
            }),
        }
    }
}

/// Why a call to an endpoint got no answer; the cause (I/O, TLS, HTTP) is the source.
#[derive(Debug, thiserror::Error)]
enum CallError {
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
/// Written on hyper's connection API instead of hyper-util's pooled client, which cost the
/// connector about 14k instructions per request in boxed futures, pool hashing and moves
/// (callgrind): endpoints are few, so each keeps a short list, scanned for a connection that
/// is ready for its next request.
struct Pool {
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
    fn new(tls: rustls::ClientConfig) -> Pool {
        Pool {
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            endpoints: Mutex::new(Vec::new()),
        }
    }

    async fn send(&self, mut request: Request<Body>) -> Result<Answer, CallError> {
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

/// A lock that a panic elsewhere does not poison: what these mutexes guard (the pool's lists,
/// the connector's task list) changes only in whole steps.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The rustls error somewhere in the chain of causes, if the failure was TLS. The TLS layers
/// wrap it in `io::Error`s, sometimes one inside another, whose `source()` skips the wrapped
/// error itself, so each one is opened with `get_ref`.
fn find_tls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current: Option<&'a (dyn std::error::Error + 'static)> = Some(error);
    let mut depth = 0;
    while let Some(e) = current {
        depth += 1;
        if depth > 16 {
            return None;
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        current = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// Every cause in the chain, most specific last: "client error (Connect): tcp connect error: Connection refused".
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut current = error.source();
    while let Some(e) = current {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

/// Where one request goes: the endpoint's URL for the call and as text for the log lines.
pub struct EndpointUrl {
    pub uri: Uri,
    pub text: String,
}

/// Joins an endpoint's base URL with the device's path and query. The text is made by
/// appending, not by formatting the URI (which cost the connector 1.4k instructions a request).
pub fn endpoint_url(
    base: &Uri,
    path: &str,
    query: Option<&str>,
) -> Result<EndpointUrl, hyper::http::Error> {
    let base_path = base.path().trim_end_matches('/');
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or("");
    let mut text = String::with_capacity(
        scheme.len()
            + authority.len()
            + base_path.len()
            + path.len()
            + 8
            + query.map_or(0, str::len),
    );
    text.push_str(scheme);
    text.push_str("://");
    text.push_str(authority);
    let origin = text.len();
    text.push_str(base_path);
    if !path.starts_with('/') {
        text.push('/');
    }
    text.push_str(path);
    if let Some(query) = query {
        text.push('?');
        text.push_str(query);
    }
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(hyper::http::uri::PathAndQuery::from_maybe_shared(
        bytes::Bytes::copy_from_slice(&text.as_bytes()[origin..]),
    )?);
    Ok(EndpointUrl {
        uri: Uri::from_parts(parts)?,
        text,
    })
}

/// The connector's log lines for one message, worded as the original product words them.
pub fn forwarding_line(message_id: &str, url: &str) -> String {
    forwarding_parts(message_id, url).concat()
}

pub fn received_line(message_id: &str, url: &str, status: u16, text: &str) -> String {
    received_parts(message_id, url, &status.to_string(), text).concat()
}

/// [`forwarding_line`] in the parts [`logs::Logger::info_parts`] takes (every request's line).
pub fn forwarding_parts<'a>(message_id: &'a str, url: &'a str) -> [&'a str; 4] {
    ["Forwarding proxy message ", message_id, " to URL: ", url]
}

/// [`received_line`] in parts, the status as its three digits.
pub fn received_parts<'a>(
    message_id: &'a str,
    url: &'a str,
    status: &'a str,
    text: &'a str,
) -> [&'a str; 8] {
    [
        "Received response ",
        url,
        " for message ",
        message_id,
        ": HTTP/1.1 ",
        status,
        " ",
        text,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request's future is moved whole into its task: connecting, which is rare, stays
    /// out of line (in line it made the future over 3 KiB).
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

    #[test]
    fn urls_join_without_double_slashes() {
        let base: Uri = "https://InternalMP.contoso.com".parse().unwrap();
        // The text is what the URI says.
        let both = |base: &Uri, path, query| {
            let url = endpoint_url(base, path, query).unwrap();
            assert_eq!(url.uri.to_string(), url.text);
            url.text
        };
        assert_eq!(
            both(&base, "/SMS_MP/.sms_aut", Some("SITESIGNCERT")),
            "https://InternalMP.contoso.com/SMS_MP/.sms_aut?SITESIGNCERT"
        );
        let base: Uri = "https://mp:8443/prefix/".parse().unwrap();
        assert_eq!(both(&base, "/x", None), "https://mp:8443/prefix/x");
        assert_eq!(both(&base, "", None), "https://mp:8443/prefix/");
        assert_eq!(both(&base, "y", Some("")), "https://mp:8443/prefix/y?");
        // A character no URL may hold is refused, not passed on.
        assert!(endpoint_url(&base, "/a b", None).is_err());
    }

    #[test]
    fn the_seed_log_lines() {
        let url = "https://InternalMP.contoso.com/SMS_MP/.sms_aut?SITESIGNCERT";
        assert_eq!(
            forwarding_line("1f3c", url),
            "Forwarding proxy message 1f3c to URL: https://InternalMP.contoso.com/SMS_MP/.sms_aut?SITESIGNCERT"
        );
        assert_eq!(
            received_line("1f3c", url, 403, "CMGConnector_Clientcertificaterequired"),
            "Received response https://InternalMP.contoso.com/SMS_MP/.sms_aut?SITESIGNCERT for message 1f3c: HTTP/1.1 403 CMGConnector_Clientcertificaterequired"
        );
    }
}
