//! `doctor logs` reading a file as W3c, whatever is in it (the encoding is still sniffed).
#![no_main]
use libfuzzer_sys::fuzz_target;
use logs::parse::{self, Format};

fuzz_target!(|data: &[u8]| {
    let mut records = 0u64;
    let mut last = 0;
    let read = parse::read_as(
        Some(Format::W3c),
        data,
        std::path::Path::new("fuzz.log"),
        |r| {
            assert!(r.line >= last, "records in file order");
            last = r.line;
            records += 1;
        },
    );
    if let Ok(stats) = read {
        assert_eq!(stats.records, records);
    }
});
