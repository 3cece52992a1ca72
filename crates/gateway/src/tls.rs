//! The TLS configuration the gateway's listeners hand new connections.

use channel::tunnel;
use pki::RootSet;

use crate::config::GatewayConfig;
use crate::device_auth::DeviceAuth;
use crate::GatewayError;

/// The TLS configuration for new connections: the server certificate and key, the CA hints
/// (device and connector roots) and `[tls]`; and the certificate's label. Session tickets
/// issued under `previous` stay good, so devices resume across a reload.
pub(crate) fn server_tls(
    config: &GatewayConfig,
    auth: &DeviceAuth,
    connector_roots: &RootSet,
    previous: Option<&rustls::ServerConfig>,
) -> Result<(rustls::ServerConfig, String), GatewayError> {
    let identity = pki::tls::Identity::load(&config.cert, &config.key)?;
    let certificate = identity
        .chain
        .first()
        .and_then(|leaf| pki::cert::Certificate::from_der(leaf.as_ref()).ok())
        .map(|leaf| leaf.label())
        .unwrap_or_else(|| "(unreadable)".into());
    let mut hint_roots = auth.roots.clone();
    hint_roots
        .certs
        .extend(connector_roots.certs.iter().cloned());
    let mut tls = pki::tls::server_config_with_policy(
        identity,
        &hint_roots,
        true,
        &[tunnel::ALPN, b"h2", b"http/1.1"],
        &config.tls,
    )?;
    if let Some(previous) = previous {
        tls.ticketer = previous.ticketer.clone();
        tls.session_storage = previous.session_storage.clone();
    }
    Ok((tls, certificate))
}
