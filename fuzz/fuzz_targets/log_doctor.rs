//! `doctor logs` on a file of anything: the format and encoding sniffed, every record matched
//! against the built-in rules, and the report rendered as text and JSON.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use logs::diagnose::{Diagnosis, Rules};

fuzz_target!(|data: &[u8]| {
    static RULES: OnceLock<Rules> = OnceLock::new();
    let rules = RULES.get_or_init(|| match Rules::builtin() {
        Ok(rules) => rules,
        Err(e) => panic!("built-in rules: {e}"),
    });
    let mut diagnosis = Diagnosis::new(rules);
    let _ = diagnosis.read_from(data, "fuzz.log");
    let report = diagnosis.finish();
    let _ = report.render_text();
    let _ = serde_json::to_string(&report);
});
