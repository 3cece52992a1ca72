//! The local admin surface every long-running component offers on a loopback address:
//!
//! | request | does |
//! |---|---|
//! | `GET /status` | the component, its verbose setting and what the component adds (JSON) |
//! | `PUT /verbose` with body `on` or `off` | verbose logging on or off, at once, no restart |
//! | `POST /reload` | re-read the configuration file, as SIGHUP does |
//! | `GET /metrics` | Prometheus text: the component's series and [`crate::metrics::common`]'s |
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 when the component can serve, else 503; JSON saying what is missing |
//! | `GET /` | the status page ([`crate::page`]): HTML, no script, refreshing itself |
//!
//! It has no authentication of its own, so it listens on loopback only: whoever can reach it
//! is already on the machine (config loading refuses any other address). A web page open in a
//! browser on that machine can reach it too, so it also refuses what only a browser sends:
//! a `Host` that is not a loopback name or address (a page whose name was rebound to
//! 127.0.0.1 reading `/status`), and on calls that change something an `Origin` header or a
//! content type a form can send without a preflight (`application/x-www-form-urlencoded`,
//! `multipart/form-data`, `text/plain`). The `/verbose` body is `on` or `off`, sent with no
//! content type or as JSON: `curl -X PUT -H 'Content-Type: application/json' --data '"on"'`.
//!
//! A second, read-only surface ([`serve_metrics`], `metrics_listen`) answers `GET`/`HEAD` of
//! `/healthz`, `/readyz` and `/metrics` alone, with the same answers ([`probed`] makes them for
//! both), on any address and to any `Host`: the kubelet's probes and Prometheus, from outside.

use std::net::SocketAddr;
use std::sync::Arc;

use channel::tunnel::{full, Body};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use logs::Log;

use crate::listener::{self, Listening};
use crate::metrics::{Expiry, Readiness};
use crate::page::Page;

/// Why a reload was refused; the running settings stay. It reads as the error inside it: the
/// admin sees that text in the log and in the answer to `POST /reload`.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The configuration file cannot be read or is not valid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The component cannot run with the new settings (a certificate that does not load, say).
    #[error(transparent)]
    Refused(Box<dyn std::error::Error + Send + Sync>),
}

/// What a component lets an admin do while it runs.
pub trait Control: Send + Sync + 'static {
    fn log(&self) -> &Log;

    /// Re-reads the configuration and applies what can change while running; says what changed.
    fn reload(&self) -> Result<String, ReloadError>;

    /// Turns verbose logging on or off.
    fn set_verbose(&self, on: bool, by: &str) {
        let was = self.log().set_verbose(on);
        if was != on {
            self.log().info(&format!(
                "Verbose logging turned {} ({by})",
                if on { "on" } else { "off" }
            ));
            if on {
                self.verbose_turned_on();
            }
        }
    }

    /// What verbose adds at the moment it is turned on (the connector replays its certificate
    /// filter trail); nothing by default.
    fn verbose_turned_on(&self) {}

    /// Extra fields for `GET /status`.
    fn status(&self) -> serde_json::Value {
        serde_json::json!({})
    }

    /// The component's own series for `GET /metrics` (Prometheus text); the admin surface
    /// adds the certificates', the log's and the build's ([`crate::metrics::common`]).
    fn metrics(&self) -> String {
        String::new()
    }

    /// The certificates and CRLs the component uses or trusts, with their ends.
    fn certificates(&self) -> Vec<Expiry> {
        Vec::new()
    }

    /// What `GET /readyz` answers; ready unless the component says what is missing.
    fn readiness(&self) -> Readiness {
        Readiness::default()
    }

    /// What the status page at `/` shows; by default its readiness and certificates.
    fn page(&self) -> Page {
        Page {
            component: self.log().component().to_string(),
            readiness: self.readiness(),
            certificates: self.certificates(),
            ..Page::default()
        }
    }
}

/// Logs a reload's outcome (a refused reload keeps the running settings) and hands it on.
pub fn reloaded(
    log: &Log,
    path: &std::path::Path,
    outcome: Result<String, ReloadError>,
) -> Result<String, ReloadError> {
    match outcome {
        Ok(summary) => {
            log.info(&format!(
                "Configuration reloaded from {}: {summary}",
                path.display()
            ));
            Ok(summary)
        }
        Err(why) => {
            log.error(&format!(
                "Configuration reload refused, the running settings stay: {why}"
            ));
            Err(why)
        }
    }
}

/// Is `addr` one the admin surface may listen on?
pub fn is_allowed_address(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Serves the admin surface on `addr` (loopback) until stopped.
pub async fn serve(addr: SocketAddr, control: Arc<dyn Control>) -> std::io::Result<Listening> {
    if !is_allowed_address(&addr) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the admin surface listens on loopback only, not {addr}"),
        ));
    }
    serve_surface(addr, control, Surface::Admin).await
}

/// Serves the read-only health and metrics surface on `addr` (any address: `metrics_listen`)
/// until stopped: `GET`/`HEAD` of `/healthz`, `/readyz` and `/metrics`, answered as the admin
/// surface answers them, whatever the `Host`; anything else 404 or 405 with the three paths.
/// It changes nothing and shows nothing more, so the kubelet's probes and Prometheus may reach
/// it from outside the host. A request's body is never read.
pub async fn serve_metrics(
    addr: SocketAddr,
    control: Arc<dyn Control>,
) -> std::io::Result<Listening> {
    serve_surface(addr, control, Surface::Metrics).await
}

/// Is `metrics_listen` one of the component's other addresses (`others`: key and address)?
/// Then the error's reason; a port 0 is a free port, never the same.
pub fn metrics_listen_problem(
    metrics: Option<SocketAddr>,
    others: &[(&str, Option<SocketAddr>)],
) -> Option<String> {
    let metrics = metrics.filter(|m| m.port() != 0)?;
    let (key, _) = others.iter().find(|(_, other)| *other == Some(metrics))?;
    Some(format!(
        "{metrics} is also {key}: the read-only health and metrics surface needs an address of its own"
    ))
}

/// Connections the metrics surface serves at once (kubelet probes and a few scrapers need a
/// handful); more are closed on arrival.
pub const METRICS_MAX_CONNECTIONS: usize = 64;
/// How long a connection to the metrics surface is served, idle or not.
pub const METRICS_CONNECTION_TIME: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Clone, Copy)]
enum Surface {
    Admin,
    Metrics,
}

/// hyper's defaults (HTTP/1.1 and HTTP/2, their header limits) on `addr`, a task a connection.
async fn serve_surface(
    addr: SocketAddr,
    control: Arc<dyn Control>,
    surface: Surface,
) -> std::io::Result<Listening> {
    // The metrics surface may face a pod network: connections beyond the cap are closed at
    // once, and each connection ends after a while (a probe or a scrape takes milliseconds;
    // a scraper whose keep-alive connection is cut just opens another).
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_MAX_CONNECTIONS));
    listener::listen(addr, move |tcp, _peer| {
        let control = control.clone();
        let slot = match surface {
            Surface::Admin => None,
            Surface::Metrics => Some(slots.clone().try_acquire_owned()),
        };
        async move {
            let Ok(_slot) = slot.transpose() else {
                return;
            };
            let service = hyper::service::service_fn(move |request| {
                let control = control.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(match surface {
                        Surface::Admin => answer(request, &*control).await,
                        Surface::Metrics => answer_metrics(&request, &*control),
                    })
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let serving = builder.serve_connection(TokioIo::new(tcp), service);
            match surface {
                Surface::Admin => {
                    let _ = serving.await;
                }
                Surface::Metrics => {
                    let _ = tokio::time::timeout(METRICS_CONNECTION_TIME, serving).await;
                }
            }
        }
    })
    .await
}

async fn answer(request: Request<Incoming>, control: &dyn Control) -> Response<Body> {
    let (parts, body) = request.into_parts();
    if let Err((status, why)) = from_an_admin_tool(&parts) {
        return plain(status, &why);
    }
    if let Some(response) = probed(&parts.method, parts.uri.path(), control) {
        return response;
    }
    match (&parts.method, parts.uri.path()) {
        (&Method::GET, "/status") => json(StatusCode::OK, &status(control)),
        (&Method::GET | &Method::HEAD, "/") => page(&control.page()),
        (&Method::PUT | &Method::POST, "/verbose") => {
            // The body is one word; anything longer is not a setting.
            let limited = http_body_util::Limited::new(body, 64);
            let text = match limited.collect().await {
                // A JSON string ("on") is the word in quotes.
                Ok(collected) => String::from_utf8_lossy(&collected.to_bytes())
                    .trim()
                    .trim_matches('"')
                    .to_ascii_lowercase(),
                Err(_) => {
                    return plain(
                        StatusCode::BAD_REQUEST,
                        "send \"on\" or \"off\" (at most 64 bytes)\n",
                    )
                }
            };
            let on = match text.as_str() {
                "on" | "true" | "1" => true,
                "off" | "false" | "0" => false,
                _ => {
                    return plain(
                        StatusCode::BAD_REQUEST,
                        &format!("\"{text}\" is not a verbose setting: send \"on\" or \"off\"\n"),
                    )
                }
            };
            control.set_verbose(on, "admin call");
            json(StatusCode::OK, &status(control))
        }
        (&Method::POST, "/reload") => match control.reload() {
            Ok(summary) => plain(StatusCode::OK, &format!("{summary}\n")),
            Err(why) => plain(StatusCode::UNPROCESSABLE_ENTITY, &format!("{why}\n")),
        },
        (_, "/" | "/status" | "/verbose" | "/reload" | "/metrics" | "/healthz" | "/readyz") => {
            plain(StatusCode::METHOD_NOT_ALLOWED, USAGE)
        }
        _ => plain(StatusCode::NOT_FOUND, USAGE),
    }
}

/// The read-only surface's answer; the request's body stays unread (dropped with it).
fn answer_metrics(request: &Request<Incoming>, control: &dyn Control) -> Response<Body> {
    let path = request.uri().path();
    if let Some(response) = probed(request.method(), path, control) {
        return response;
    }
    if matches!(path, "/healthz" | "/readyz" | "/metrics") {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, METRICS_USAGE);
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    plain(StatusCode::NOT_FOUND, METRICS_USAGE)
}

const METRICS_USAGE: &str =
    "the read-only health and metrics surface: GET /healthz, GET /readyz, GET /metrics\n";

/// What both surfaces answer alike, `GET`/`HEAD` of `/metrics`, `/healthz` and `/readyz`;
/// `None` for any other request.
fn probed(method: &Method, path: &str, control: &dyn Control) -> Option<Response<Body>> {
    if !matches!(*method, Method::GET | Method::HEAD) {
        return None;
    }
    Some(match path {
        "/metrics" => {
            let mut text = control.metrics();
            text.push_str(&crate::metrics::common(
                &control.certificates(),
                control.log(),
            ));
            let mut response = plain(StatusCode::OK, &text);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            response
        }
        "/healthz" => plain(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let readiness = control.readiness();
            let status = if readiness.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, &readiness.body())
        }
        _ => return None,
    })
}

/// Refuses what a web page in a browser on this machine could send, as described above.
fn from_an_admin_tool(parts: &hyper::http::request::Parts) -> Result<(), (StatusCode, String)> {
    // The authority of an absolute-form or HTTP/2 request, and the Host header: each there
    // must name loopback, and one must be there.
    let named = [
        parts.uri.authority().map(|a| a.as_str().as_bytes()),
        parts.headers.get(hyper::header::HOST).map(|h| h.as_bytes()),
    ];
    if named.iter().all(Option::is_none) {
        return Err((
            StatusCode::FORBIDDEN,
            "the admin surface answers requests whose Host is a loopback name or address (localhost, 127.x.x.x, [::1]); this one has none\n"
            .to_string(),
        ));
    }
    for host in named.into_iter().flatten() {
        if !is_loopback_host(host) {
            let shown: String = String::from_utf8_lossy(host)
                .chars()
                .take(100)
                .map(|c| if c.is_ascii_graphic() { c } else { '?' })
                .collect();
            return Err((
                StatusCode::FORBIDDEN,
                format!("the admin surface answers requests whose Host is a loopback name or address (localhost, 127.x.x.x, [::1]), not \"{shown}\": a web page's name rebound to this address is refused\n"),
            ));
        }
    }
    if matches!(parts.method, Method::GET | Method::HEAD) {
        return Ok(());
    }
    if parts.headers.contains_key(hyper::header::ORIGIN) {
        return Err((
            StatusCode::FORBIDDEN,
            "a call that changes something must carry no Origin header: browsers send one for a web page's request (CSRF); admin tools such as curl do not\n"
            .to_string(),
        ));
    }
    for value in parts.headers.get_all(hyper::header::CONTENT_TYPE) {
        let media = value
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim();
        if [
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "text/plain",
        ]
        .iter()
        .any(|form| media.eq_ignore_ascii_case(form))
        {
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Content-Type {media} is one a web page's form can send, so it is refused here: send the body as application/json or with no Content-Type, e.g. curl -X PUT -H 'Content-Type: application/json' --data '\"on\"' http://127.0.0.1:PORT/verbose\n"),
            ));
        }
    }
    Ok(())
}

/// `localhost`, an IPv4 loopback address (127.0.0.0/8) or `[::1]`, with or without a port.
fn is_loopback_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) => {
                let loopback = v6
                    .parse::<std::net::Ipv6Addr>()
                    .is_ok_and(|ip| ip.is_loopback());
                return loopback && (port.is_empty() || is_port(port.strip_prefix(':')));
            }
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) => (name, is_port(Some(port))),
            None => (host, true),
        },
    };
    port && (name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback()))
}

fn is_port(port: Option<&str>) -> bool {
    port.is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

const USAGE: &str =
    "GET /status, PUT /verbose (on|off, as JSON or with no Content-Type), POST /reload, GET /metrics, GET /healthz, GET /readyz, GET / (the status page)\n";

fn status(control: &dyn Control) -> serde_json::Value {
    let mut value = serde_json::json!({
        "component": control.log().component(),
        "version": env!("CARGO_PKG_VERSION"),
        "verbose": control.log().is_verbose(),
    });
    if let (Some(all), serde_json::Value::Object(extra)) = (value.as_object_mut(), control.status())
    {
        all.extend(extra);
    }
    value
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(format!("{value}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// The status page, with headers that keep it to itself: nothing loaded from anywhere, no
/// script, not framed, not cached.
fn page(page: &Page) -> Response<Body> {
    use hyper::header::{self, HeaderValue};
    let html = crate::page::render(page, time::OffsetDateTime::now_utc());
    let mut response = Response::new(full(html));
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(full(text.to_string()));
    *response.status_mut() = status;
    response
}
