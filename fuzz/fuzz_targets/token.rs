//! Device tokens (CCM_PROXY_SERVERAUTH), checked with the lab's site keys. The first byte picks
//! what the rest is: an `Authorization` header's value as a device sends it; or claims (and a
//! JOSE header) signed by the site's Ed25519 or P-256 key, as a site could sign them, to reach
//! the checks after the signature.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let lab = gateway::fuzzing::lab();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // Endpoint 3456 on a device path, or a registration path (bulk tokens).
    let (endpoint, path) = if mode & 0x80 == 0 {
        (3456, "/SMS_MP/.sms_aut")
    } else {
        (9, "/CCM_System_TokenAuth/Request")
    };
    let authorization = match mode % 3 {
        0 => String::from_utf8_lossy(rest).into_owned(),
        1 => match lab.sign(br#"{"alg":"EdDSA","typ":"JWT"}"#, rest, true) {
            Some(token) => format!("Bearer {token}"),
            None => return,
        },
        _ => {
            let (header, claims) = match rest.iter().position(|&b| b == 0) {
                Some(at) => (&rest[..at], &rest[at + 1..]),
                None => (&br#"{"alg":"ES256"}"#[..], rest),
            };
            match lab.sign(header, claims, false) {
                Some(token) => format!("Bearer {token}"),
                None => return,
            }
        }
    };
    let _ = lab.check_token(Some(&authorization), endpoint, path);
});
