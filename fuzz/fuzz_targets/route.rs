//! The device route parser: a request target as hyper hands it to the gateway. What it lets
//! through means, to an endpoint that decodes it once or twice, the path it routed.
#![no_main]
use channel::route::{self, Route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match route::parse(text) {
        Err(e) => portcullis_fuzz::logged(&format!("Refused a request: {e}")),
        Ok(Route::ServiceMetadata { .. }) => {}
        Ok(Route::Proxy {
            path,
            query,
            target,
            ..
        }) => {
            assert!(text.ends_with(target));
            let (sent_path, sent_query) = match target.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (target, None),
            };
            assert_eq!(sent_query, query);
            assert!(path == sent_path || (sent_path.is_empty() && path == "/"));
            let once = decode(path.as_bytes());
            assert_eq!(decode(&once), once, "{path}: decodes to another escape");
            assert!(!once.contains(&b'\\'), "{path}: a backslash once decoded");
            let slashes = |b: &[u8]| b.iter().filter(|&&b| b == b'/').count();
            assert_eq!(
                slashes(&once),
                slashes(path.as_bytes()),
                "{path}: an encoded slash"
            );
            for segment in once.split(|&b| b == b'/') {
                let name = segment.split(|&b| b == b';').next().unwrap_or(b"");
                assert!(
                    name != b"." && name != b"..",
                    "{path}: a dot segment once decoded"
                );
            }
        }
    }
});

/// One percent-decoding (invalid escapes kept as they are).
fn decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(a), Some(b)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((a * 16 + b) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}
