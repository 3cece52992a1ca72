//! The connector's calls to internal endpoints: a pooled, keep-alive HTTPS client that presents
//! the client-authentication certificate the filter chain selected, and the mapping of what
//! comes back (or what goes wrong) to a [`Refusal`].
//!
//! - [`EndpointClient`] (here): the client, and what a failed call means.
//! - `pool`: the keep-alive connections to each endpoint.
//! - `url`: joining an endpoint's base URL with the device's path.
//! - `classify`: what an endpoint's answer means for the device.

mod classify;
mod pool;
mod url;

use std::time::Duration;

use channel::refusal::{Cause, Refusal};
use hyper::body::Incoming;
use hyper::{Request, Response};
use pki::crl::{CrlPolicy, RevocationList};
use pki::{CertStore, RootSet};

pub use classify::classify_endpoint_answer;
use pool::Pool;
pub use url::{endpoint_url, EndpointUrl};

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
