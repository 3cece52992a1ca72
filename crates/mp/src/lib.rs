//! The reference management point: an HTTPS endpoint that behaves like a Configuration Manager
//! management point behind IIS, for labs and tests.
//!
//! Client certificates follow IIS's settings: `ignore`, `accept` or `require`. Like IIS, the TLS
//! handshake accepts any client certificate; the request is then refused with IIS's 403
//! sub-status: 7 no certificate, 16 untrusted, 17 expired or not yet valid. Every request is
//! logged as an IIS W3C line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pki::tls::{judge_peer, PeerCert};
use pki::RootSet;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_rustls::TlsAcceptor;

use logs::w3c::{W3cEntry, W3cLog};
use runtime::config::{self, ConfigError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertMode {
    /// Never look at client certificates.
    Ignore,
    /// Check one when presented; allow requests without one.
    Accept,
    /// Refuse requests without a trusted, valid client certificate (the management point's
    /// HTTPS setting).
    #[default]
    Require,
}

/// `portcullis mp --config FILE`. Built in code with [`MpConfig::new`] or [`MpConfig::lab`]
/// and written with [`MpConfig::write`]: what is written is what `load` reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MpConfig {
    /// Address to listen on, e.g. "127.0.0.1:8443".
    pub listen: SocketAddr,
    /// Server certificate (PEM, leaf first) and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub client_certificates: ClientCertMode,
    /// Roots a client certificate must chain to (files or directories).
    #[serde(default)]
    pub trusted_roots: Vec<PathBuf>,
    /// Certificate revocation lists (PEM or DER) signed by a trusted root: a revoked client
    /// certificate gets 403.13.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// IIS-style W3C log file; none when absent.
    pub w3c_log: Option<PathBuf>,
    /// The W3C log's c-ip from the last address of `X-Forwarded-For` when a request has one
    /// (the device's, as the connector sends it; IIS logs it so as a custom field), else the
    /// connection's (the default, as IIS).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub w3c_client_ip_forwarded: bool,
    /// The management point's name in its answers.
    #[serde(default = "default_name")]
    pub name: String,
    /// Site code in its answers.
    #[serde(default = "default_site_code")]
    pub site_code: String,
}

fn default_name() -> String {
    "mp.portcullis.lab".into()
}

fn default_site_code() -> String {
    "PCL".into()
}

impl MpConfig {
    /// The keys a management point requiring client certificates (the default) needs; every
    /// other at the default a file without it gets (the same functions serde uses, so the
    /// two cannot differ).
    pub fn new(
        listen: SocketAddr,
        cert: PathBuf,
        key: PathBuf,
        trusted_roots: Vec<PathBuf>,
    ) -> MpConfig {
        MpConfig {
            listen,
            cert,
            key,
            client_certificates: ClientCertMode::default(),
            trusted_roots,
            crls: Vec::new(),
            w3c_log: None,
            w3c_client_ip_forwarded: false,
            name: default_name(),
            site_code: default_site_code(),
        }
    }

    /// The management point of a lab PKI as `portcullis pki init` lays it out, its paths
    /// relative to the lab's directory (write the file there, or
    /// [`MpConfig::resolve_paths`] first), on a free port of 127.0.0.1, requiring client
    /// certificates from the lab root.
    pub fn lab() -> MpConfig {
        use pki::lab::layout;
        MpConfig::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            layout::MP_CERT.into(),
            layout::MP_KEY.into(),
            vec![layout::ROOT_CERT.into()],
        )
    }

    /// Writes the configuration file `load` reads.
    pub fn write(&self, path: &Path) -> Result<(), ConfigError> {
        config::write_toml(path, self)
    }

    /// Reads every relative path from `dir`, as `load` does from the file's directory.
    pub fn resolve_paths(&mut self, dir: &Path) {
        let resolve = |p: &PathBuf| config::resolve_in(dir, p);
        self.cert = resolve(&self.cert);
        self.key = resolve(&self.key);
        self.trusted_roots = self.trusted_roots.iter().map(resolve).collect();
        self.w3c_log = self.w3c_log.as_ref().map(resolve);
        self.crls = self.crls.iter().map(resolve).collect();
    }

    /// Reads and validates the file; relative paths are taken from the file's directory.
    pub fn load(path: &Path) -> Result<MpConfig, ConfigError> {
        MpConfig::parse(&config::read_text(path)?, path)
    }

    /// What [`MpConfig::load`] does with the file's text once read: parsed and checked, its
    /// relative paths taken from `path`'s directory, and `path` named in every error.
    pub fn parse(text: &str, path: &Path) -> Result<MpConfig, ConfigError> {
        let mut cfg: MpConfig = config::parse_toml(text, path)?;
        cfg.resolve_paths(config::dir_of(path));
        if cfg.client_certificates != ClientCertMode::Ignore && cfg.trusted_roots.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "trusted_roots",
                reason: "client_certificates is \"accept\" or \"require\" (the default), so the roots client certificates must chain to are needed".into(),
            });
        }
        if cfg.site_code.len() != 3 || !cfg.site_code.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "site_code",
                reason: format!("\"{}\" is not a three-character site code", cfg.site_code),
            });
        }
        Ok(cfg)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MpError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot open the W3C log: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A management point that is serving. Dropping it does not stop it; call [`RunningMp::stop`].
pub struct RunningMp {
    pub addr: SocketAddr,
    listening: runtime::listener::Listening,
}

impl RunningMp {
    pub async fn stop(self) {
        self.listening.stop().await;
    }
}

struct Shared {
    config: MpConfig,
    roots: RootSet,
    crls: Vec<pki::crl::RevocationList>,
    log: Option<W3cLog>,
    site_sign_cert_hex: String,
}

/// Binds and starts serving in the background.
pub async fn start(config: MpConfig) -> Result<RunningMp, MpError> {
    let identity = pki::tls::Identity::load(&config.cert, &config.key)?;
    let roots = if config.trusted_roots.is_empty() {
        RootSet::default()
    } else {
        RootSet::load(&config.trusted_roots)?
    };
    let site_sign_cert_hex = pki::cert::hex_upper(identity.chain[0].as_ref());
    let tls = pki::tls::server_config(
        identity,
        &roots,
        config.client_certificates != ClientCertMode::Ignore,
        &[b"h2", b"http/1.1"],
    )?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));

    let log = match &config.w3c_log {
        Some(path) => Some(W3cLog::open(path).map_err(|source| MpError::Log {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    let crls = pki::crl::RevocationList::load_all(&config.crls, &roots)?;
    let config_listen = config.listen;
    let shared = Arc::new(Shared {
        config,
        roots,
        crls,
        log,
        site_sign_cert_hex,
    });
    let listening = runtime::listener::listen(config_listen, move |tcp, peer| {
        connection(acceptor.clone(), tcp, peer, shared.clone())
    })
    .await
    .map_err(|source| MpError::Listen {
        addr: config_listen,
        source,
    })?;
    Ok(RunningMp {
        addr: listening.addr,
        listening,
    })
}

async fn connection(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
) {
    let Ok(local) = tcp.local_addr() else {
        return;
    };
    // A client that never finishes its handshake must not hold a task forever.
    let handshake = tokio::time::timeout(std::time::Duration::from_secs(30), acceptor.accept(tcp));
    let Ok(Ok(tls)) = handshake.await else {
        return;
    };
    let client_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|der| der.as_ref().to_vec());
    let conn = Arc::new(ConnInfo {
        peer,
        local,
        client_cert: judge_peer(
            client_cert.as_deref(),
            &shared.roots,
            &shared.crls,
            OffsetDateTime::now_utc(),
        ),
    });
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(req, &shared, &conn).await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

struct ConnInfo {
    peer: SocketAddr,
    local: SocketAddr,
    client_cert: PeerCert,
}

type Body = BoxBody<Bytes, hyper::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

async fn handle(req: Request<Incoming>, shared: &Shared, conn: &ConnInfo) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let user_agent = req
        .headers()
        .get(hyper::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let forwarded = shared
        .config
        .w3c_client_ip_forwarded
        .then(|| req.headers().get("x-forwarded-for"))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|last| last.trim().parse::<std::net::IpAddr>().ok());
    let request_length = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());

    let (status, substatus, response) = respond(req, shared, conn);
    let bytes_sent = match response.body().size_hint().exact() {
        Some(n) => n,
        None => request_length.unwrap_or(0),
    };
    if let Some(log) = &shared.log {
        let entry = W3cEntry {
            at: OffsetDateTime::now_utc(),
            server_ip: conn.local.ip(),
            method: method.as_str(),
            uri_stem: &path,
            uri_query: query.as_deref(),
            server_port: conn.local.port(),
            // IIS logs a user only when a certificate is mapped to an account; none is here.
            username: None,
            client_ip: forwarded.unwrap_or(conn.peer.ip()),
            user_agent: user_agent.as_deref(),
            referer: None,
            status,
            substatus,
            win32_status: 0,
            bytes_sent,
            time_taken_ms: started.elapsed().as_millis() as u64,
        };
        // A full disk must not take the management point down; the request is still served.
        let _ = log.write(&entry);
    }
    response
}

/// The status, IIS sub-status and response for one request.
fn respond(req: Request<Incoming>, shared: &Shared, conn: &ConnInfo) -> (u16, u16, Response<Body>) {
    let mode = shared.config.client_certificates;
    let refusal = match (&conn.client_cert, mode) {
        (_, ClientCertMode::Ignore) => None,
        (PeerCert::None, ClientCertMode::Require) => Some(7),
        (PeerCert::Untrusted { .. }, _) => Some(16),
        (PeerCert::NotTimeValid { .. }, _) => Some(17),
        (PeerCert::Revoked { .. }, _) => Some(13),
        _ => None,
    };
    if let Some(sub) = refusal {
        return (403, sub, iis_error(403, sub));
    }

    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    if path.eq_ignore_ascii_case("/SMS_MP/.sms_aut") && req.method() == Method::GET {
        let cfg = &shared.config;
        let body = match query.to_ascii_uppercase().as_str() {
            "MPLIST" => Some(format!(
                "<MPList><MP Name=\"{}\" FQDN=\"{}\"><Version>9128</Version><Capabilities SchemaVersion=\"1.0\"><Property Name=\"SSLState\" Value=\"63\"/></Capabilities></MP></MPList>",
                cfg.name.to_ascii_uppercase(),
                cfg.name
            )),
            "MPLIST2" => Some(format!(
                "<MPList><MP Name=\"{}\" FQDN=\"{}\" SiteCode=\"{}\"><Version>9128</Version><Capabilities SchemaVersion=\"1.0\"><Property Name=\"SSLState\" Value=\"63\"/></Capabilities><Signature>{}</Signature></MP></MPList>",
                cfg.name.to_ascii_uppercase(),
                cfg.name,
                cfg.site_code,
                &shared.site_sign_cert_hex[..shared.site_sign_cert_hex.len().min(64)]
            )),
            "SITESIGNCERT" => Some(shared.site_sign_cert_hex.clone()),
            "MPKEYINFORMATION" => Some(format!(
                "<MPKEYINFORMATION><VERSION>1</VERSION><SITECODE>{}</SITECODE><SIGNINGKEY>{}</SIGNINGKEY></MPKEYINFORMATION>",
                cfg.site_code,
                &shared.site_sign_cert_hex[..shared.site_sign_cert_hex.len().min(128)]
            )),
            _ => None,
        };
        if let Some(body) = body {
            let response = Response::builder()
                .header(hyper::header::CONTENT_TYPE, "text/xml")
                .body(full(body))
                .unwrap_or_else(|_| Response::new(full("")));
            return (200, 0, response);
        }
    }
    // Streams the request body back as it arrives: for large transfers both ways.
    if path == "/portcullis/echo" && req.method() == Method::POST {
        let response = Response::builder()
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .body(req.into_body().boxed())
            .unwrap_or_else(|_| Response::new(full("")));
        return (200, 0, response);
    }
    // Answers the query string back: a request the W3C log records by its query (the fault
    // drill's ids), and whose answer shows which request it belongs to.
    if path == "/portcullis/echo" && req.method() == Method::GET {
        let response = Response::builder()
            .header(hyper::header::CONTENT_TYPE, "text/plain")
            .body(full(query.to_string()))
            .unwrap_or_else(|_| Response::new(full("")));
        return (200, 0, response);
    }
    // A body that trickles: the head at once, then `chunks` chunks of `bytes` bytes, one every
    // `every_ms` milliseconds (an endpoint slow to send what it has started).
    if path == "/portcullis/trickle" && req.method() == Method::GET {
        if let Some(trickle) = Trickle::of_query(query) {
            let length = trickle.length();
            let response = Response::builder()
                .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
                .header(hyper::header::CONTENT_LENGTH, length)
                .body(trickle.boxed())
                .unwrap_or_else(|_| Response::new(full("")));
            return (200, 0, response);
        }
    }
    (404, 0, iis_error(404, 0))
}

/// The body of `GET /portcullis/trickle?chunks=N&bytes=B&every_ms=M`.
struct Trickle {
    left: u32,
    chunk: Bytes,
    every: std::time::Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Trickle {
    /// The most chunks, bytes per chunk and milliseconds between them a query may ask for:
    /// one trickle holds the connection for at most 1,000 x 10 s.
    const MAX_CHUNKS: u32 = 1_000;
    const MAX_CHUNK_BYTES: usize = 64 * 1024;
    const MAX_EVERY_MS: u64 = 10_000;

    /// `None` when a value is missing, not a number, or over its bound.
    fn of_query(query: &str) -> Option<Trickle> {
        let value = |key: &str| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
        };
        let chunks = u32::try_from(value("chunks")?)
            .ok()
            .filter(|&n| n <= Self::MAX_CHUNKS)?;
        let bytes = usize::try_from(value("bytes")?)
            .ok()
            .filter(|&n| n <= Self::MAX_CHUNK_BYTES)?;
        let every = value("every_ms").filter(|&ms| ms <= Self::MAX_EVERY_MS)?;
        let every = std::time::Duration::from_millis(every);
        Some(Trickle {
            left: chunks,
            chunk: Bytes::from(vec![b'.'; bytes]),
            every,
            sleep: Box::pin(tokio::time::sleep(every)),
        })
    }

    fn length(&self) -> u64 {
        u64::from(self.left) * self.chunk.len() as u64
    }
}

impl hyper::body::Body for Trickle {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        use std::future::Future;
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return std::task::Poll::Pending;
        }
        self.left -= 1;
        let next = tokio::time::Instant::now() + self.every;
        self.sleep.as_mut().reset(next);
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(self.chunk.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.length())
    }
}

/// An IIS-style error page; the status line's reason is IIS's.
fn iis_error(status: u16, substatus: u16) -> Response<Body> {
    let (title, text) = match (status, substatus) {
        (403, 7) => (
            "403.7 - Forbidden: Client certificate required",
            "The page you are attempting to access requires your browser to have a Secure Sockets Layer (SSL) client certificate that the Web server recognizes.",
        ),
        (403, 16) => (
            "403.16 - Forbidden: Client certificate is untrusted or invalid",
            "The client certificate used for this request is not trusted by the Web server: it does not chain to a trusted root.",
        ),
        (403, 17) => (
            "403.17 - Forbidden: Client certificate has expired or is not yet valid",
            "The client certificate used for this request has expired or is not yet valid.",
        ),
        (403, 13) => (
            "403.13 - Forbidden: Client certificate revoked",
            "The client certificate used for this request has been revoked by the Web server.",
        ),
        (404, _) => ("404.0 - Not Found", "The resource you are looking for has been removed, had its name changed, or is temporarily unavailable."),
        _ => ("Error", "The request failed."),
    };
    let body = format!(
        "<html><head><title>IIS 10.0 Detailed Error - {title}</title></head><body><h3>HTTP Error {title}</h3><p>{text}</p><p>Module: IIS Web Core; Notification: AuthenticateRequest; Error Code: 0x80070005</p></body></html>"
    );
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(hyper::header::CONTENT_TYPE, "text/html")
        .header("x-iis-substatus", substatus.to_string())
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full("")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_configuration_loads_as_it_was_built() {
        let dir = tempfile::tempdir().unwrap();
        let lab = MpConfig::lab();
        let mut config = lab.clone();
        config.listen = "[::1]:8443".parse().unwrap();
        config.cert = "other/server.crt".into();
        config.key = "/etc/mp/server.key".into();
        config.client_certificates = ClientCertMode::Accept;
        config.trusted_roots.push("ca/second-root.crt".into());
        config.crls = vec!["ca/root.crl".into()];
        config.w3c_log = Some("logs/u_ex.log".into());
        config.name = "mp.contoso.com".into();
        config.site_code = "ABC".into();
        // Every key away from the lab's, so that a key the writer dropped would show.
        let unchanged = config::keys_with_equal_values(&config, &lab);
        assert!(unchanged.is_empty(), "set these keys too: {unchanged:?}");

        let path = dir.path().join("mp.toml");
        config.write(&path).unwrap();
        let loaded = MpConfig::load(&path).unwrap();
        config.resolve_paths(dir.path());
        assert_eq!(loaded, config);
        assert_eq!(loaded.w3c_log, Some(dir.path().join("logs/u_ex.log")));
    }

    #[test]
    fn the_lab_management_point_writes_only_what_it_sets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mp.toml");
        MpConfig::lab().write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("w3c_log"), "{text}");
        assert!(text.contains("client_certificates = \"require\""), "{text}");
        let mut expected = MpConfig::lab();
        expected.resolve_paths(dir.path());
        assert_eq!(MpConfig::load(&path).unwrap(), expected);
    }

    #[test]
    fn new_has_the_defaults_of_a_file_with_only_the_required_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mp.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:0\"\ncert = \"s.crt\"\nkey = \"s.key\"\ntrusted_roots = [\"r.crt\"]\n",
        )
        .unwrap();
        let mut built = MpConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            "s.crt".into(),
            "s.key".into(),
            vec!["r.crt".into()],
        );
        built.resolve_paths(dir.path());
        assert_eq!(MpConfig::load(&path).unwrap(), built);
    }
}
