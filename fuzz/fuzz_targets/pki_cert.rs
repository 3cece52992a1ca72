//! A certificate (DER) as a TLS peer presents it, judged as the gateway judges devices and
//! connectors, and everything read off it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pki::tls::{judge_peer, PeerCert};

fuzz_target!(|data: &[u8]| {
    let lab = portcullis_fuzz::pki_lab();
    match judge_peer(
        Some(data),
        &lab.roots,
        &lab.crls,
        time::OffsetDateTime::now_utc(),
    ) {
        PeerCert::Trusted(cert) => portcullis_fuzz::use_certificate(&cert),
        PeerCert::None => {}
        PeerCert::Untrusted { detail }
        | PeerCert::NotTimeValid { detail }
        | PeerCert::Revoked { detail } => portcullis_fuzz::logged(&detail),
    }
    if let Ok(cert) = pki::Certificate::from_der(data) {
        portcullis_fuzz::use_certificate(&cert);
    }
});
