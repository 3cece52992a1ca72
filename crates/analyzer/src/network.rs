//! Steps 1 to 3: name resolution of the gateway, TCP, and TLS with its server certificate,
//! each failure named as a device would see it (the WinHTTP secure-failure flag for TLS).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use time::OffsetDateTime;

use crate::Checked;

pub(crate) async fn resolve(host: &str, port: u16, timeout: Duration) -> Checked<Vec<SocketAddr>> {
    let fix = || {
        format!("Check the DNS record (or hosts file entry) for {host}: devices must resolve the gateway's name to its public address.")
    };
    match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
        Err(_) => Err((
            format!("resolving {host} took longer than {timeout:?}"),
            fix(),
        )),
        Ok(Err(e)) => Err((format!("{host} does not resolve: {e}"), fix())),
        Ok(Ok(found)) => {
            let addresses: Vec<SocketAddr> = found.collect();
            if addresses.is_empty() {
                return Err((format!("{host} resolves to no address"), fix()));
            }
            let shown: Vec<String> = addresses.iter().map(|a| a.ip().to_string()).collect();
            Ok((addresses, format!("{host} -> {}", shown.join(", "))))
        }
    }
}

pub(crate) async fn connect(
    addresses: &[SocketAddr],
    timeout: Duration,
) -> Checked<tokio::net::TcpStream> {
    let mut failures = Vec::new();
    for addr in addresses {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => return Ok((tcp, format!("connected to {addr}"))),
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_) => failures.push(format!("{addr}: no answer within {timeout:?}")),
        }
    }
    Err((
        format!("cannot connect: {}", failures.join("; ")),
        "Check that the gateway is running and listening on this port, and that firewalls and load balancers pass TCP to it.".into(),
    ))
}

pub(crate) async fn handshake(
    tcp: tokio::net::TcpStream,
    host: &str,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Checked<()> {
    let name = ServerName::try_from(host.to_string()).map_err(|_| {
        (
            format!("\"{host}\" is not a valid server name"),
            "Use the gateway's DNS name or IP address.".to_string(),
        )
    })?;
    let connecting = tokio_rustls::TlsConnector::from(tls).connect(name, tcp);
    let stream = match tokio::time::timeout(timeout, connecting).await {
        Err(_) => {
            return Err((
                format!("the TLS handshake took longer than {timeout:?}"),
                "Check that the port serves TLS (not plain HTTP) and nothing in between holds the handshake.".into(),
            ))
        }
        Ok(Err(e)) => return Err(tls_failure(host, &e)),
        Ok(Ok(stream)) => stream,
    };
    let (_, session) = stream.get_ref();
    let leaf = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| pki::cert::Certificate::from_der(c.as_ref()).ok());
    let version = match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2",
        _ => "TLS",
    };
    let Some(leaf) = leaf else {
        return Ok(((), format!("{version}, server certificate not readable")));
    };
    let days = (leaf.not_after - OffsetDateTime::now_utc()).whole_days();
    let mut detail = format!(
        "{version}; {} (expires {}, in {days} days)",
        leaf.label(),
        pki::filter::date_text(leaf.not_after)
    );
    if days < 30 {
        detail.push_str(" - renew it soon");
    }
    Ok(((), detail))
}

/// The cause and fix for a failed handshake, named by the WinHTTP secure-failure flag a
/// device would log for it.
fn tls_failure(host: &str, error: &std::io::Error) -> (String, String) {
    let flag = probe::secure_failure_flag(error);
    let (what, fix) = match flag.name {
        "INVALID_CA" => (
            "the gateway's server certificate does not chain to a trusted root".to_string(),
            "Give devices (and this analyzer's `ca`) the root CA that issued the gateway's certificate, or reissue it from a CA they trust; send the intermediates with the certificate.".to_string(),
        ),
        "CERT_CN_INVALID" => (
            format!("the gateway's server certificate does not name {host}"),
            format!("Reissue the gateway's certificate with {host} in its subject alternative names, or use the name it carries."),
        ),
        "CERT_DATE_INVALID" => (
            "the gateway's server certificate is not valid now".to_string(),
            "Renew the gateway's server certificate (and check the clocks).".to_string(),
        ),
        "CERT_REVOKED" => (
            "the gateway's server certificate is revoked".to_string(),
            "Issue the gateway a new server certificate.".to_string(),
        ),
        "CERT_REV_FAILED" => (
            "the revocation status of the gateway's server certificate cannot be checked".to_string(),
            "Publish a current CRL where devices can fetch it.".to_string(),
        ),
        _ => (
            "the TLS handshake failed".to_string(),
            "Check that the port serves TLS 1.2 or 1.3 with a server certificate devices trust.".to_string(),
        ),
    };
    (
        format!(
            "{what} (WinHTTP 0x80072f8f, WINHTTP_CALLBACK_STATUS_FLAG_{}): {error}",
            flag.name
        ),
        fix,
    )
}
