//! The connector's calls to internal endpoints: a pooled, keep-alive HTTPS client that presents
//! the client-authentication certificate the filter chain selected, and the mapping of what
//! comes back (or what goes wrong) to a [`Refusal`].

use std::time::Duration;

use bytes::Bytes;
use channel::refusal::{classify_endpoint_answer, Cause, Refusal};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::{Request, Response, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pki::crl::{CrlPolicy, RevocationList};
use pki::{CertStore, RootSet};

pub type Body = BoxBody<Bytes, hyper::Error>;

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
    client: Client<HttpsConnector<HttpConnector>, Body>,
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
        let tls = match identity {
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
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Ok(EndpointClient {
            client,
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
        let call = self.client.request(request);
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
            .get("x-iis-substatus")
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

    fn transport_refusal(&self, url: String, error: &hyper_util::client::legacy::Error) -> Refusal {
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

/// Joins an endpoint's base URL with the device's path and query.
pub fn endpoint_url(
    base: &Uri,
    path: &str,
    query: Option<&str>,
) -> Result<Uri, hyper::http::Error> {
    let base_path = base.path().trim_end_matches('/');
    let target = match query {
        Some(q) => format!("{base_path}{path}?{q}"),
        None => format!("{base_path}{path}"),
    };
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(target.parse()?);
    Ok(Uri::from_parts(parts)?)
}

/// The connector's log lines for one message, worded as the original product words them.
pub fn forwarding_line(message_id: &str, url: &str) -> String {
    format!("Forwarding proxy message {message_id} to URL: {url}")
}

pub fn received_line(message_id: &str, url: &str, status: u16, text: &str) -> String {
    format!("Received response {url} for message {message_id}: HTTP/1.1 {status} {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_join_without_double_slashes() {
        let base: Uri = "https://InternalMP.contoso.com".parse().unwrap();
        assert_eq!(
            endpoint_url(&base, "/SMS_MP/.sms_aut", Some("SITESIGNCERT"))
                .unwrap()
                .to_string(),
            "https://InternalMP.contoso.com/SMS_MP/.sms_aut?SITESIGNCERT"
        );
        let base: Uri = "https://mp:8443/prefix/".parse().unwrap();
        assert_eq!(
            endpoint_url(&base, "/x", None).unwrap().to_string(),
            "https://mp:8443/prefix/x"
        );
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
