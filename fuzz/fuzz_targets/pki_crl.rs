//! A CRL file (PEM or DER), verified against the lab root and asked about a certificate.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pki::crl::RevocationList;

fuzz_target!(|data: &[u8]| {
    let lab = portcullis_fuzz::pki_lab();
    match RevocationList::from_bytes(std::path::Path::new("fuzz.crl"), data.to_vec(), &lab.roots) {
        Ok(crl) => {
            let _ = crl.revokes(&lab.leaf);
            let _ = pki::crl::status(&lab.leaf, &[crl], time::OffsetDateTime::now_utc());
        }
        Err(e) => portcullis_fuzz::logged(&e.to_string()),
    }
});
