//! A device connection's state: its address and certificate, its judgement under the current
//! settings (judged again after a reload), the headers that say who it is, and the identity a
//! request carries to the connector.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::header::HeaderValue;
use time::OffsetDateTime;

use crate::device_auth::Judgement;
use crate::Shared;

pub(crate) struct Device {
    pub(crate) addr: SocketAddr,
    pub(crate) state: std::sync::Mutex<Arc<DeviceState>>,
    /// HTTP/2 streams open now, and when the last one ended (see `accept::OpenStream`).
    pub(crate) streams: std::sync::atomic::AtomicUsize,
    pub(crate) last_stream_end: std::sync::atomic::AtomicU64,
    /// Its requests in flight through channels now (`max_streams_per_device`).
    pub(crate) in_flight: std::sync::atomic::AtomicUsize,
    /// Set when the connection was cut because the device took nothing written to it.
    pub(crate) write_stalled: std::sync::atomic::AtomicBool,
}

/// A device connection's judged certificate, as of one
/// [`DeviceAuth`](crate::device_auth::DeviceAuth) generation.
pub(crate) struct DeviceState {
    pub(crate) judgement: Judgement,
    /// Who the device is, for the connector: the trusted certificate's subject and thumbprint
    /// and the device's address, as one header value made once per judgement (one HPACK
    /// table entry per connection rather than three lookups per request).
    pub(crate) device_header: HeaderValue,
    /// `client_cert_header` and the trusted certificate's DER in base64, when configured (and
    /// the certificate trusted).
    pub(crate) cert_header: Option<Box<(hyper::header::HeaderName, HeaderValue)>>,
    /// The certificate the device presented (DER), kept to judge it again after a reload,
    /// when the judgement holds none: a trusted one's is its `Certificate::der`, not copied
    /// (a second copy per connection was most of what a device's state held).
    untrusted_leaf: Option<Box<[u8]>>,
}

impl DeviceState {
    /// `leaf` is the certificate the device presented (DER), judged as `judgement`.
    pub(crate) fn new(
        judgement: Judgement,
        leaf: Option<&[u8]>,
        addr: SocketAddr,
        shared: &Shared,
    ) -> DeviceState {
        if let Some(warning) = &judgement.warning {
            shared.log.warn(&format!("Device {addr}: {warning}"));
        }
        let cert_header = match (&judgement.cert, shared.cert_header.load_full()) {
            // Base64 is always a valid value; were it not, the device's copy is still replaced.
            (Ok(cert), Some(name)) => Some(Box::new((
                (*name).clone(),
                HeaderValue::try_from(base64(cert.der()))
                    .unwrap_or_else(|_| HeaderValue::from_static("")),
            ))),
            _ => None,
        };
        let device_header = match &judgement.cert {
            Ok(cert) => header_value(&format!(
                "{} ({}) from {addr}",
                cert.subject, cert.thumbprint
            )),
            Err(_) => HeaderValue::from_static(""),
        };
        let untrusted_leaf = kept_leaf(&judgement, leaf);
        DeviceState {
            judgement,
            device_header,
            cert_header,
            untrusted_leaf,
        }
    }

    /// The certificate the device presented (DER), if it presented one.
    pub(crate) fn leaf(&self) -> Option<&[u8]> {
        presented(&self.judgement, self.untrusted_leaf.as_deref())
    }
}

/// What a device's state keeps of the certificate it presented, besides its judgement: a copy
/// only when the judgement holds no certificate.
fn kept_leaf(judgement: &Judgement, leaf: Option<&[u8]>) -> Option<Box<[u8]>> {
    match &judgement.cert {
        Ok(_) => None,
        Err(_) => leaf.map(Box::from),
    }
}

/// The certificate a device presented: the trusted one's DER, else the copy kept.
fn presented<'a>(judgement: &'a Judgement, kept: Option<&'a [u8]>) -> Option<&'a [u8]> {
    match &judgement.cert {
        Ok(cert) => Some(cert.der()),
        Err(_) => kept,
    }
}

impl Device {
    /// The judgement under the gateway's current settings: judged again when a reload has
    /// changed them since.
    pub(crate) fn state(&self, shared: &Shared) -> Arc<DeviceState> {
        let auth = shared.auth.load();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.judgement.generation != auth.generation {
            let leaf = state.leaf();
            let judgement = auth.judge(leaf, OffsetDateTime::now_utc());
            let judged = DeviceState::new(judgement, leaf, self.addr, shared);
            *state = Arc::new(judged);
        }
        state.clone()
    }
}

/// The device identity a request carries to the connector.
pub(crate) enum Identity<'a> {
    Certificate {
        thumbprint: &'a str,
        /// What the connector is told: [`DeviceState::device_header`].
        header: &'a HeaderValue,
        /// [`DeviceState::cert_header`].
        cert_header: Option<&'a (hyper::header::HeaderName, HeaderValue)>,
    },
    Token {
        subject: String,
        id: String,
    },
}

impl std::fmt::Display for Identity<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Certificate { thumbprint, .. } => write!(f, "certificate {thumbprint}"),
            Identity::Token { subject, id } => write!(f, "token {id} for {subject}"),
        }
    }
}

/// Standard base64 with padding (RFC 4648), as IIS ARR sends a client certificate.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                text.push('=');
            }
        }
    }
    text
}

/// A header value for text that may hold anything (subjects): made visible ASCII.
pub(crate) fn header_value(text: &str) -> HeaderValue {
    HeaderValue::try_from(header_safe(text)).unwrap_or_else(|_| HeaderValue::from_static("?"))
}

/// A header value HPACK must never add to its table.
pub(crate) fn never_indexed(text: &str) -> HeaderValue {
    let mut value = header_value(text);
    value.set_sensitive(true);
    value
}

/// Header values must be visible ASCII; subjects may hold anything.
pub(crate) fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use pki::lab::{LabCa, LeafSpec};

    /// A device connection's state holds its certificate once: a trusted device's judgement
    /// has it, and a second copy kept beside it for the judgement after a reload cost every
    /// connection its size again. One refused keeps its copy, to be judged again.
    #[test]
    fn a_device_state_keeps_its_certificate_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = LabCa::new_root("Test Root", 5).unwrap();
        let root_file = dir.path().join("root.crt");
        std::fs::write(&root_file, &root.cert().cert_pem).unwrap();
        let stranger = LabCa::new_root("Other Root", 5).unwrap();
        let auth = crate::device_auth::DeviceAuth::load(1, &[root_file], None, None).unwrap();
        let now = time::OffsetDateTime::now_utc();

        let trusted = root.issue(&LeafSpec::client_auth("DEVICE-1", 30)).unwrap();
        let judgement = auth.judge(Some(&trusted.cert_der), now);
        assert!(judgement.cert.is_ok(), "{:?}", judgement.cert);
        let kept = super::kept_leaf(&judgement, Some(&trusted.cert_der));
        assert!(
            kept.is_none(),
            "a copy of {} bytes",
            kept.map_or(0, |k| k.len())
        );
        assert_eq!(
            super::presented(&judgement, kept.as_deref()),
            Some(&trusted.cert_der[..])
        );

        let refused = stranger
            .issue(&LeafSpec::client_auth("DEVICE-2", 30))
            .unwrap();
        let judgement = auth.judge(Some(&refused.cert_der), now);
        assert!(judgement.cert.is_err());
        let kept = super::kept_leaf(&judgement, Some(&refused.cert_der));
        assert_eq!(
            super::presented(&judgement, kept.as_deref()),
            Some(&refused.cert_der[..])
        );
        assert_eq!(super::presented(&judgement, None), None);
    }

    #[test]
    fn base64_is_rfc_4648() {
        for (bytes, text) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
            (&[0xff, 0xfe, 0x00], "//4A"),
        ] {
            assert_eq!(super::base64(bytes), text);
        }
    }
}
