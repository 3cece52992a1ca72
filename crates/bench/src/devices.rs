//! A fleet of device identities for the benches: a certificate of its own for every device,
//! issued on the spot (rcgen, ECDSA P-256) by a root the server trusts, each as a TLS client
//! configuration ready to connect.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rustls_pki_types::pem::PemObject;

/// Where device certificates come from: a CA certificate and its key (a lab's
/// `ca/root.crt` and `ca/root.key`), and the roots the server's certificate chains to.
#[derive(Debug, Clone)]
pub struct Issuer {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_roots: Vec<PathBuf>,
}

impl Issuer {
    /// A lab directory's root, which issues device certificates and the gateway's.
    pub fn lab(dir: &Path) -> Issuer {
        Issuer {
            ca_cert: dir.join(pki::lab::layout::ROOT_CERT),
            ca_key: dir.join(pki::lab::layout::ROOT_KEY),
            server_roots: vec![dir.join(pki::lab::layout::ROOT_CERT)],
        }
    }
}

/// Devices' TLS client configurations, one per device.
#[derive(Clone)]
pub struct DeviceSet {
    pub tls: Vec<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for DeviceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceSet({} devices)", self.tls.len())
    }
}

impl DeviceSet {
    pub fn len(&self) -> usize {
        self.tls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tls.is_empty()
    }

    /// Issues `count` device certificates, subjects `BENCH-DEVICE-<first + n + 1>`, calling
    /// `progress(issued)` every 1,000 (a few seconds for tens of thousands).
    pub fn issue(
        issuer: &Issuer,
        first: usize,
        count: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<DeviceSet, String> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
        };
        let ca = pki::lab::LabCa::from_pem(&read(&issuer.ca_cert)?, &read(&issuer.ca_key)?)
            .map_err(|e| format!("the device issuer {}: {e}", issuer.ca_cert.display()))?;
        let roots = pki::RootSet::load(&issuer.server_roots).map_err(|e| format!("roots: {e}"))?;
        let mut tls = Vec::with_capacity(count);
        for n in 0..count {
            if n > 0 && n % 1000 == 0 {
                progress(n);
            }
            let device = ca
                .issue(&pki::lab::LeafSpec::client_auth(
                    &format!("BENCH-DEVICE-{:06}", first + n + 1),
                    30,
                ))
                .map_err(|e| format!("issuing a device certificate: {e}"))?;
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(device.key_pem.as_bytes())
                .map_err(|e| format!("a device key: {e}"))?;
            let mut config = pki::tls::client_config(&roots)
                .map_err(|e| format!("TLS: {e}"))?
                .with_client_auth_cert(
                    vec![rustls_pki_types::CertificateDer::from(device.cert_der)],
                    key,
                )
                .map_err(|e| format!("TLS: {e}"))?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            // A device resumes its own session with one gateway: a few tickets, not the
            // default cache of 256 in each of tens of thousands of configurations.
            config.resumption = rustls::client::Resumption::in_memory_sessions(4);
            tls.push(tokio_rustls::TlsConnector::from(Arc::new(config)));
        }
        progress(count);
        Ok(DeviceSet { tls })
    }

    /// [`DeviceSet::issue`] with a progress line on standard error every 5,000 when `shown`.
    pub fn issue_showing(issuer: &Issuer, count: usize, shown: bool) -> Result<DeviceSet, String> {
        let started = Instant::now();
        DeviceSet::issue(issuer, 0, count, &mut |n| {
            if shown && (n % 5000 == 0 || n == count) && count >= 2000 {
                eprintln!(
                    "{:>6.1} s  {n} of {count} device certificates issued",
                    started.elapsed().as_secs_f64()
                );
            }
        })
    }
}
