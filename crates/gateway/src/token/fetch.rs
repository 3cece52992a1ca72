//! The gateway's HTTPS GETs to an OpenID Connect issuer: its discovery document and its JWKS.
//! One request per connection (HTTP/1.1 over rustls), no redirects followed, the whole fetch
//! bounded by `fetch_timeout_secs` and the answer by `max_document_bytes`: what comes back is
//! the provider's text, read as hostile JSON (serde_json's nesting limit applies).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;

/// How an issuer is reached: the roots its certificate must chain to and the bounds.
pub struct Fetcher {
    pub tls: Arc<rustls::ClientConfig>,
    pub timeout: Duration,
    pub max_bytes: usize,
}

impl Fetcher {
    /// GETs `url` (https only) and reads its answer as a JSON object.
    pub async fn json(
        &self,
        url: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, String> {
        let seconds = self.timeout.as_secs();
        match tokio::time::timeout(self.timeout, self.get(url)).await {
            Ok(Ok(bytes)) => match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(serde_json::Value::Object(map)) => Ok(map),
                Ok(_) => Err(format!("{url}: the answer is JSON but not an object")),
                Err(e) => Err(format!("{url}: the answer is not JSON: {e}")),
            },
            Ok(Err(e)) => Err(format!("{url}: {e}")),
            Err(_) => Err(format!(
                "{url}: no complete answer within {seconds} s (fetch_timeout_secs)"
            )),
        }
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err("not an https:// URL".into());
        }
        let host = uri.host().ok_or("no host in the URL")?;
        let port = uri.port_u16().unwrap_or(443);
        let name = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let server_name =
            ServerName::try_from(name.clone()).map_err(|e| format!("host {name}: {e}"))?;
        let tcp = tokio::net::TcpStream::connect((name.as_str(), port))
            .await
            .map_err(|e| format!("cannot connect to {name}:{port}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS with {name}:{port} failed: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP with {name}:{port} failed: {e}"))?;
        // Ends with the fetch: the timeout around it drops the request, and this with it.
        let driver = tokio::spawn(connection);
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or(name);
        let request = hyper::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(hyper::header::HOST, authority)
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, "Portcullis gateway")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| format!("cannot make the request: {e}"))?;
        let answer = sender.send_request(request).await;
        let result = async {
            let response = answer.map_err(|e| format!("no answer: {e}"))?;
            if response.status() != hyper::StatusCode::OK {
                return Err(format!("answered {} (not 200)", response.status()));
            }
            let body = Limited::new(response.into_body(), self.max_bytes)
                .collect()
                .await
                .map_err(|e| {
                    format!(
                        "the answer cannot be read, or is over {} bytes (max_document_bytes): {e}",
                        self.max_bytes
                    )
                })?;
            Ok(body.to_bytes().to_vec())
        }
        .await;
        driver.abort();
        result
    }
}

/// The TLS client configuration for reaching an issuer: the roots in `ca` when given, the
/// system's trust store (rustls-native-certs: the roots the host's admin manages, e.g.
/// /etc/ssl/certs, so a corporate root or a distribution's update counts) when not.
pub fn client_tls(ca: &[std::path::PathBuf]) -> Result<rustls::ClientConfig, String> {
    let builder = if ca.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        let mut store = rustls::RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(format!(
                "no ca listed and no usable root in the system's trust store{}",
                found
                    .errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ));
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(store)
    } else {
        let roots = pki::RootSet::load(ca).map_err(|e| e.to_string())?;
        pki::tls::client_config(&roots).map_err(|e| e.to_string())?
    };
    Ok(builder.with_no_client_auth())
}
