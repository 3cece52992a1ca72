//! The local admin surface every long-running component offers on a loopback address:
//!
//! | request | does |
//! |---|---|
//! | `GET /status` | the component, its verbose setting and what the component adds (JSON) |
//! | `PUT /verbose` with body `on` or `off` | verbose logging on or off, at once, no restart |
//! | `POST /reload` | re-read the configuration file, as SIGHUP does |
//!
//! It has no authentication of its own, so it listens on loopback only: whoever can reach it
//! is already on the machine (config loading refuses any other address).

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use logs::Log;

use crate::listener::{self, Listening};
use crate::tunnel::{full, Body};

/// What a component lets an admin do while it runs.
pub trait Control: Send + Sync + 'static {
    fn log(&self) -> &Log;

    /// Re-reads the configuration and applies what can change while running; says what changed.
    fn reload(&self) -> Result<String, String>;

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
    listener::listen(addr, move |tcp, _peer| {
        let control = control.clone();
        async move {
            let service = hyper::service::service_fn(move |request| {
                let control = control.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(request, &*control).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        }
    })
    .await
}

async fn answer(request: Request<Incoming>, control: &dyn Control) -> Response<Body> {
    let (parts, body) = request.into_parts();
    match (&parts.method, parts.uri.path()) {
        (&Method::GET, "/status") => json(StatusCode::OK, &status(control)),
        (&Method::PUT | &Method::POST, "/verbose") => {
            // The body is one word; anything longer is not a setting.
            let limited = http_body_util::Limited::new(body, 64);
            let text = match limited.collect().await {
                Ok(collected) => String::from_utf8_lossy(&collected.to_bytes())
                    .trim()
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
        (_, "/status" | "/verbose" | "/reload") => plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /status, PUT /verbose (on|off), POST /reload\n",
        ),
        _ => plain(
            StatusCode::NOT_FOUND,
            "GET /status, PUT /verbose (on|off), POST /reload\n",
        ),
    }
}

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

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(full(text.to_string()));
    *response.status_mut() = status;
    response
}
