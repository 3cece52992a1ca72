//! The tests of `refusal` (a file of their own, to keep `refusal.rs` short).

use super::*;

#[test]
fn every_refusal_has_a_status_text_in_the_original_style_and_a_remedy() {
    let all = Cause::examples();
    let mut texts = std::collections::HashSet::new();
    let count = all.len();
    for cause in all {
        let r = Refusal::new(cause);
        assert!(
            r.text.starts_with("CMGService_") || r.text.starts_with("CMGConnector_"),
            "{r}"
        );
        assert!(
            r.text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "a reason phrase: {r}"
        );
        assert!((400..600).contains(&r.status));
        assert!(r.remedy().ends_with('.') && !r.reason().is_empty());
        texts.insert(r.text);
    }
    assert_eq!(texts.len(), count, "each cause has its own status text");
}

/// README's status-text table: a row per example, in order, five cells each, every
/// summary a sentence of its own.
#[test]
fn the_status_text_table_has_a_row_per_cause() {
    let table = status_text_table();
    let rows: Vec<&str> = table.lines().collect();
    let all = Cause::examples();
    assert_eq!(rows.len(), all.len() + 2, "{table}");
    assert_eq!(
        rows[0],
        "| status | status text | hop | when | what to do |"
    );
    for (row, cause) in rows[2..].iter().zip(all) {
        let r = Refusal::new(cause);
        assert!(
            row.starts_with(&format!(
                "| {} | `{}` | {} | ",
                r.status,
                r.text,
                r.hop.describe()
            )),
            "{row}"
        );
        let remedy = r.remedy().replace('|', "\\|").replace('<', "&lt;");
        assert!(row.ends_with(&format!(" | {remedy} |")), "{row}");
        let summary = r.cause.summary();
        assert!(
            summary.ends_with('.') && !summary.contains('\n'),
            "{summary}"
        );
        assert_eq!(
            row.matches(" | ").count() - row.matches("\\|").count(),
            4,
            "{row}"
        );
    }
}
