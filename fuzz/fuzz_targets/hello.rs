//! The connector's hello (JSON), as the gateway parses it and judges it by its connector
//! policy, and the log lines it makes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gateway::fuzzing::lab().hello(data);
});
