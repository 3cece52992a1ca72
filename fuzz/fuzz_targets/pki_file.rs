//! A certificate or key file (PEM with any mix of blocks, DER certificate, DER PKCS#8 key):
//! parsed as stores, roots and server identities read it, each key as rustls will use it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.pem");
    match pki::read_bytes(path, data, &pki::Pkcs12Password::empty()) {
        Ok(items) => {
            for cert in &items.certs {
                portcullis_fuzz::use_certificate(cert);
            }
            for key in &items.keys {
                if let Err(why) = pki::key_spki(key) {
                    portcullis_fuzz::logged(&why);
                }
            }
        }
        Err(e) => portcullis_fuzz::logged(&e.to_string()),
    }
});
