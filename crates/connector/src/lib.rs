//! The connector: inside the private network, it holds channels to the gateways and forwards
//! each proxied request to its endpoint over HTTPS with the client-authentication certificate
//! its filter chain selected.
//!
//! - [`config`]: the configuration file and its validation.
//! - [`run`]: start, reload and stop.
//! - `client_cert`: the client certificate the filter chain chooses.
//! - `instances`: each `gateways` entry's instances (a DNS name: every address, re-resolved).
//! - `dial`: the dial loops that hold the channels to each gateway instance.
//! - `channel_server`: the HTTP/2 server on a dialled channel.
//! - `service`: the hello, and forwarding each request to its endpoint.
//! - `metrics`: the Prometheus series and readiness; [`control`]: the admin surface's view.
//! - [`endpoint`]: the calls to the endpoints (client, keep-alive pool, URLs, what answers mean).

mod channel_server;
mod client_cert;
pub mod config;
pub mod control;
mod dial;
pub use dial::redial_bound;
pub mod endpoint;
mod instances;
mod metrics;
pub mod run;
mod service;

/// A lock that a panic elsewhere does not poison: what these mutexes guard (the pool's lists,
/// the connector's task list) changes only in whole steps.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
