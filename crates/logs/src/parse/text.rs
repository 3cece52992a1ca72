//! Plain text, a message a line, and the older SMS log lines
//! (`message  $$<Component><date time><thread=1234 (0x4D2)>`) where they appear.

use std::sync::LazyLock;

use regex::Regex;

use super::{Format, LineParser, Out, Record};

static LEGACY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?s)(.*?)\s*\$\$<([^>]*)><([^>]*)><thread=([^>]*)>\s*$")
        .expect("a valid literal regex")
});

pub(crate) fn is_legacy(line: &str) -> bool {
    line.contains("$$<") && LEGACY.is_match(line)
}

pub(crate) struct TextParser;

impl LineParser for TextParser {
    fn line(&mut self, n: u64, text: &str, out: &mut Out<'_>) {
        if let Some(record) = record(n, text) {
            out.emit(record);
        }
    }

    fn overlong(&mut self, n: u64, out: &mut Out<'_>) {
        out.skip(n, format!("line {}", super::too_long()));
    }

    fn finish(&mut self, _out: &mut Out<'_>) {}
}

/// A record from one line of text that no format claims; `None` for a blank line.
pub(crate) fn record(n: u64, text: &str) -> Option<Record> {
    let text = text.trim_start_matches('\u{feff}').trim_end();
    if text.trim_start().is_empty() {
        return None;
    }
    if text.contains("$$<") {
        if let Some(c) = LEGACY.captures(text) {
            let thread = c.get(4).map_or("", |m| m.as_str());
            return Some(Record {
                line: n,
                format: Format::SmsLegacy,
                time: c.get(3).map(|m| m.as_str().to_string()),
                component: c
                    .get(2)
                    .map(|m| m.as_str().to_string())
                    .filter(|s| !s.is_empty()),
                severity: None,
                message: c.get(1).map_or("", |m| m.as_str()).to_string(),
                fields: vec![("thread".into(), thread.to_string())],
            });
        }
    }
    Some(Record {
        line: n,
        format: Format::Text,
        time: None,
        component: None,
        severity: None,
        message: text.to_string(),
        fields: Vec::new(),
    })
}
