//! The device-side probe: one HTTPS request as a Configuration Manager client makes it, reported
//! as the client's `LocationServices.log` reports it:
//!
//! ```text
//! [CCMHTTP] ERROR: URL=https://cmg.contoso.com/CCM_PROXY_MUTUALAUTH/3456/SMS_MP/.sms_aut?SITESIGNCERT, Port=443, Options=31, Code=0, Text=CCM_E_BAD_HTTP_STATUS_CODE
//! [CCMHTTP] ERROR INFO: StatusCode= 403 StatusText= CMGConnector_Clientcertificaterequired
//! ```
//!
//! Transport failures carry the WinHTTP error the client would log (0x80072f8f for a TLS
//! failure, 0x80072efd when nothing answers, ...), followed by the cause in plain words.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Uri;
use hyper_util::rt::TokioIo;
use logs::cmtrace::Severity;
use pki::RootSet;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

/// How much of a response body the probe keeps when nothing asks for more; the rest is
/// counted, not kept.
pub const DEFAULT_KEPT_BODY: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub url: String,
    /// Roots that the gateway's server certificate must chain to.
    pub ca: Vec<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// A bearer token for `CCM_PROXY_SERVERAUTH` routes.
    pub token: Option<String>,
    pub timeout: Duration,
    /// Offer HTTP/2 (the Configuration Manager client speaks HTTP/1.1).
    pub http2: bool,
    /// Keep at most this many bytes of the response body.
    pub keep_body: usize,
}

/// Bad local input: the probe could not even start.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("URL \"{url}\": {reason}")]
    Url { url: String, reason: String },
    #[error("--cert and --key go together: {0}")]
    CertWithoutKey(&'static str),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success { status: u16 },
    HttpError { status: u16, text: String },
    Transport { code: u32, text: &'static str },
}

#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub outcome: Outcome,
    /// What the client's log would say, line by line.
    pub lines: Vec<(Severity, String)>,
    /// The start of the response body (at most `keep_body` bytes) and its full length.
    pub body: Bytes,
    pub body_len: u64,
}

impl ProbeReport {
    pub fn succeeded(&self) -> bool {
        matches!(self.outcome, Outcome::Success { .. })
    }
}

struct Target {
    uri: Uri,
    host: String,
    port: u16,
}

fn parse_url(url: &str) -> Result<Target, ProbeError> {
    let bad = |reason: &str| ProbeError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("only https:// URLs (devices always use TLS)"));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    Ok(Target { uri, host, port })
}

/// A device's TLS client: trusts `ca`, presents `cert`/`key` when given, offers h2 first
/// when `http2` (else HTTP/1.1 only, like the Configuration Manager client).
pub fn device_tls(
    ca: &[PathBuf],
    cert: Option<&Path>,
    key: Option<&Path>,
    http2: bool,
) -> Result<rustls::ClientConfig, ProbeError> {
    let roots = RootSet::load(ca)?;
    let builder = pki::tls::client_config(&roots)?;
    let mut tls = match (cert, key) {
        (Some(cert), Some(key)) => {
            let id = pki::tls::Identity::load(cert, key)?;
            builder.with_client_auth_cert(id.chain, id.key)?
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => return Err(ProbeError::CertWithoutKey("--cert given without --key")),
        (None, Some(_)) => return Err(ProbeError::CertWithoutKey("--key given without --cert")),
    };
    tls.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(tls)
}

/// The host part of an https:// URL as a TLS server name, and its port.
pub fn server_name_of(url: &str) -> Result<(ServerName<'static>, String, u16), ProbeError> {
    let target = parse_url(url)?;
    let name = ServerName::try_from(target.host.clone()).map_err(|_| ProbeError::Url {
        url: url.to_string(),
        reason: format!("\"{}\" is not a valid host name", target.host),
    })?;
    Ok((name, target.host, target.port))
}

pub async fn probe(options: &ProbeOptions) -> Result<ProbeReport, ProbeError> {
    let target = parse_url(&options.url)?;
    let tls = device_tls(
        &options.ca,
        options.cert.as_deref(),
        options.key.as_deref(),
        options.http2,
    )?;
    let (server_name, _, _) = server_name_of(&options.url)?;

    let attempt = exchange(&target, server_name, Arc::new(tls), options);
    let result = match tokio::time::timeout(options.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(Failure {
            code: 0x8007_2ee2,
            text: "ERROR_WINHTTP_TIMEOUT",
            cause: format!(
                "no complete answer within {} s",
                options.timeout.as_secs_f32()
            ),
            secure_flag: None,
        }),
    };
    Ok(report(&options.url, target.port, result))
}

struct Failure {
    code: u32,
    text: &'static str,
    cause: String,
    /// For a TLS failure, the flag WinHTTP's secure-failure callback would set.
    secure_flag: Option<SecureFlag>,
}

/// One of WinHTTP's secure-failure flags (`WINHTTP_CALLBACK_STATUS_FLAG_*`), which the
/// Configuration Manager client logs when a TLS handshake fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecureFlag {
    pub value: u32,
    /// The name after `WINHTTP_CALLBACK_STATUS_FLAG_`, e.g. `INVALID_CA`.
    pub name: &'static str,
}

/// The secure-failure flag for a failed handshake, from the rustls error inside `error`.
pub fn secure_failure_flag(error: &std::io::Error) -> SecureFlag {
    use rustls::CertificateError as C;
    let flag = |value, name| SecureFlag { value, name };
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(certificate)) => match certificate {
            C::UnknownIssuer | C::BadSignature => flag(0x8, "INVALID_CA"),
            C::NotValidForName | C::NotValidForNameContext { .. } => flag(0x10, "CERT_CN_INVALID"),
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => flag(0x20, "CERT_DATE_INVALID"),
            C::Revoked => flag(0x4, "CERT_REVOKED"),
            C::UnknownRevocationStatus
            | C::ExpiredRevocationList
            | C::ExpiredRevocationListContext { .. } => flag(0x1, "CERT_REV_FAILED"),
            _ => flag(0x2, "INVALID_CERT"),
        },
        _ => flag(0x8000_0000, "SECURITY_CHANNEL_ERROR"),
    }
}

struct Answer {
    status: u16,
    reason: String,
    body: Bytes,
    body_len: u64,
}

async fn exchange(
    target: &Target,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    options: &ProbeOptions,
) -> Result<Answer, Failure> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| {
            let (code, text) = match e.kind() {
                std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::HostUnreachable
                | std::io::ErrorKind::NetworkUnreachable => {
                    (0x8007_2efd, "ERROR_WINHTTP_CANNOT_CONNECT")
                }
                _ if e.to_string().contains("lookup") || e.to_string().contains("resolve") => {
                    (0x8007_2ee7, "ERROR_WINHTTP_NAME_NOT_RESOLVED")
                }
                _ => (0x8007_2efd, "ERROR_WINHTTP_CANNOT_CONNECT"),
            };
            Failure {
                code,
                text,
                cause: format!("cannot connect to {}:{}: {e}", target.host, target.port),
                secure_flag: None,
            }
        })?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(|e| Failure {
            code: 0x8007_2f8f,
            text: "ERROR_WINHTTP_SECURE_FAILURE",
            cause: format!("TLS with {} failed: {e}", target.host),
            secure_flag: Some(secure_failure_flag(&e)),
        })?;
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(stream);
    let connection_error = |e: hyper::Error| Failure {
        code: 0x8007_2efe,
        text: "ERROR_WINHTTP_CONNECTION_ERROR",
        cause: format!("the connection failed: {e}"),
        secure_flag: None,
    };

    let path = target
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut request = hyper::Request::get(if h2 {
        target.uri.to_string()
    } else {
        path.to_string()
    })
    .header(hyper::header::USER_AGENT, "SMS CCM 5.0")
    .header(hyper::header::ACCEPT, "*/*");
    if !h2 {
        let host = match target.port {
            443 => target.host.clone(),
            port => format!("{}:{port}", target.host),
        };
        request = request.header(hyper::header::HOST, host);
    }
    if let Some(token) = &options.token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(Empty::<Bytes>::new()).map_err(|e| Failure {
        code: 0x8007_2efe,
        text: "ERROR_WINHTTP_CONNECTION_ERROR",
        cause: format!("cannot build the request: {e}"),
        secure_flag: None,
    })?;

    let response = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(connection_error)?;
        tokio::spawn(conn);
        sender
            .send_request(request)
            .await
            .map_err(connection_error)?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(connection_error)?;
        tokio::spawn(conn);
        sender
            .send_request(request)
            .await
            .map_err(connection_error)?
    };
    let status = response.status().as_u16();
    // HTTP/1.1 carries the reason phrase (where the status text lives); HTTP/2 has none, so the
    // gateway repeats it in a header.
    let reason = response
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).to_string())
        .or_else(|| {
            response
                .headers()
                .get("x-portcullis-status-text")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| {
            response
                .status()
                .canonical_reason()
                .unwrap_or("")
                .to_string()
        });
    let mut body = response.into_body();
    let mut kept = Vec::new();
    let mut body_len = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(connection_error)?;
        if let Ok(data) = frame.into_data() {
            body_len += data.len() as u64;
            let room = options.keep_body.saturating_sub(kept.len());
            kept.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    Ok(Answer {
        status,
        reason,
        body: kept.into(),
        body_len,
    })
}

fn report(url: &str, port: u16, result: Result<Answer, Failure>) -> ProbeReport {
    let mut lines = Vec::new();
    match result {
        Ok(answer) if (200..300).contains(&answer.status) => {
            lines.push((
                Severity::Info,
                format!(
                    "[CCMHTTP] OK: URL={url}, Port={port}, StatusCode= {} StatusText= {}, Bytes={}",
                    answer.status, answer.reason, answer.body_len
                ),
            ));
            ProbeReport {
                outcome: Outcome::Success {
                    status: answer.status,
                },
                lines,
                body: answer.body,
                body_len: answer.body_len,
            }
        }
        Ok(answer) => {
            lines.push((
                Severity::Error,
                format!("[CCMHTTP] ERROR: URL={url}, Port={port}, Options=31, Code=0, Text=CCM_E_BAD_HTTP_STATUS_CODE"),
            ));
            lines.push((
                Severity::Error,
                format!(
                    "[CCMHTTP] ERROR INFO: StatusCode= {} StatusText= {}",
                    answer.status, answer.reason
                ),
            ));
            let explained = explanation(&answer.body);
            if !explained.is_empty() {
                lines.push((Severity::Error, format!("[CCMHTTP] Response: {explained}")));
            }
            ProbeReport {
                outcome: Outcome::HttpError {
                    status: answer.status,
                    text: answer.reason,
                },
                lines,
                body: answer.body,
                body_len: answer.body_len,
            }
        }
        Err(failure) => {
            if let Some(flag) = failure.secure_flag {
                // What the client's WinHTTP callback logs before the error itself.
                for line in [
                    "WINHTTP_CALLBACK_STATUS_SECURE_FAILURE Encountered".to_string(),
                    format!("dwStatusInformation is 0x{:x}", flag.value),
                    format!("WINHTTP_CALLBACK_STATUS_FLAG_{} is set", flag.name),
                ] {
                    lines.push((
                        Severity::Error,
                        format!("[CCMHTTP] AsyncCallback(): {line}"),
                    ));
                }
            }
            lines.push((
                Severity::Error,
                format!(
                    "[CCMHTTP] ERROR: URL={url}, Port={port}, Options=31, Code=0x{:08x}, Text={}",
                    failure.code, failure.text
                ),
            ));
            lines.push((
                Severity::Error,
                format!("[CCMHTTP] ERROR INFO: {}", failure.cause),
            ));
            ProbeReport {
                outcome: Outcome::Transport {
                    code: failure.code,
                    text: failure.text,
                },
                lines,
                body: Bytes::new(),
                body_len: 0,
            }
        }
    }
}

/// The body's text on one line (tags stripped from an HTML page), at most 400 characters.
fn explanation(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    if !text.trim_start().starts_with('<') {
        let words: Vec<&str> = text.split_whitespace().collect();
        return words.join(" ").chars().take(400).collect();
    }
    let mut plain = String::new();
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                plain.push(' ');
            }
            _ if !in_tag => plain.push(if c.is_control() { ' ' } else { c }),
            _ => {}
        }
    }
    let words: Vec<&str> = plain.split_whitespace().collect();
    let joined = words.join(" ");
    joined.chars().take(400).collect()
}
