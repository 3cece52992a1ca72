//! README's "Status texts" table is the refusal table in the code, so it cannot drift.
//!
//! The block between `<!-- status-texts:begin -->` and `<!-- status-texts:end -->` in
//! README.md must be exactly `channel::refusal::status_text_table()`. When it is not, this
//! test fails and prints the block expected. After changing a refusal (its status text, hop,
//! summary or remedy), rewrite README's block with
//!
//! ```text
//! PORTCULLIS_UPDATE_README=1 cargo test -p portcullis --test readme
//! ```
//!
//! which replaces the block in place (nothing else in README changes) and then passes.

use std::path::PathBuf;

const BEGIN: &str = "<!-- status-texts:begin -->\n";
const END: &str = "<!-- status-texts:end -->";

fn readme() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../README.md")
}

#[test]
fn readme_status_texts_are_the_refusal_table() {
    let path = readme();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: cannot be read: {e}", path.display()));
    // The block's text lies between the end of the begin marker's line and the end marker.
    let (Some(begin), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        panic!(
            "{}: no {BEGIN:?} ... {END:?} block; README's \"## Status texts\" section holds it",
            path.display()
        );
    };
    let start = begin + BEGIN.len();
    assert!(start <= end, "{END:?} comes before {BEGIN:?}");
    let expected = channel::refusal::status_text_table();
    if text[start..end] == expected {
        return;
    }
    if std::env::var("PORTCULLIS_UPDATE_README").as_deref() == Ok("1") {
        let updated = format!("{}{expected}{}", &text[..start], &text[end..]);
        std::fs::write(&path, updated)
            .unwrap_or_else(|e| panic!("{}: cannot be written: {e}", path.display()));
        eprintln!("{}: status-text table rewritten", path.display());
        return;
    }
    panic!(
        "README.md's status-text table differs from the refusal table in the code \
         (crates/channel/src/refusal.rs). Rewrite it with\n  \
         PORTCULLIS_UPDATE_README=1 cargo test -p portcullis --test readme\n\
         or put this between the markers:\n\n{BEGIN}{expected}{END}\n"
    );
}
