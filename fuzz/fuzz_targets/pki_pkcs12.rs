//! A PKCS#12 file (.pfx/.p12) read with a password, as a connector's store holds one.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.pfx");
    let password = pki::Pkcs12Password::new("fuzz", "the fuzz target's password");
    match pki::read_bytes(path, data, &password) {
        Ok(items) => {
            for cert in &items.certs {
                portcullis_fuzz::use_certificate(cert);
            }
            for key in &items.keys {
                let _ = pki::key_spki(key);
            }
        }
        Err(e) => portcullis_fuzz::logged(&e.to_string()),
    }
});
