//! A device's HTTP/1.1 connection: bytes through hyper's server as the gateway builds it, to
//! the gateway's handling of the request (method, transfer codings, route, authentication,
//! the head rewritten for the channel within the header budget).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let answer = gateway::fuzzing::lab().serve_http1(data);
    assert!(answer.is_empty() || answer.starts_with(b"HTTP/1."));
});
