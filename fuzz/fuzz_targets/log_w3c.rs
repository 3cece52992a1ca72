//! `doctor logs` reading a file as W3c, whatever is in it (the encoding is still sniffed).
#![no_main]
use libfuzzer_sys::fuzz_target;
use logs::parse::Format;

fuzz_target!(|data: &[u8]| portcullis_fuzz::read_log_as(Format::W3c, data));
