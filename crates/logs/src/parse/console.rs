//! Portcullis console lines (see [`crate::console::format`]): plain, where a message continues
//! on lines indented by two spaces, and JSON, one object a line. Plain lines also come in an
//! older shape without the date: `06:30:57.123 COMPONENT info: message`. Lines of neither
//! shape are read as plain text.

use std::sync::LazyLock;

use regex::Regex;

use super::{text, Format, LineParser, Out, Record, Severity, MAX_RECORD};

static PLAIN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?|\d{2}:\d{2}:\d{2}(?:\.\d+)?) (\S+) (info|warning|warn|error|debug|trace|verbose): ?(.*)$",
    )
    .expect("a valid literal regex")
});

pub(crate) fn is_plain(line: &str) -> bool {
    PLAIN.is_match(line)
}

pub(crate) fn is_json(line: &str) -> bool {
    line.starts_with('{') && json(line).is_some()
}

fn severity(level: &str) -> Option<Severity> {
    match level.to_ascii_lowercase().as_str() {
        "info" | "information" | "debug" | "trace" | "verbose" => Some(Severity::Info),
        "warning" | "warn" => Some(Severity::Warning),
        "error" | "err" | "fatal" | "critical" => Some(Severity::Error),
        _ => None,
    }
}

#[derive(Default)]
pub(crate) struct PlainParser {
    pending: Option<Record>,
    /// The pending record grew past the cap: drop its continuation lines.
    discarding: bool,
}

impl PlainParser {
    fn flush(&mut self, out: &mut Out<'_>) {
        if let Some(r) = self.pending.take() {
            out.emit(r);
        }
        self.discarding = false;
    }
}

impl LineParser for PlainParser {
    fn line(&mut self, n: u64, text: &str, out: &mut Out<'_>) {
        let text = text.trim_start_matches('\u{feff}');
        if let Some(rest) = text.strip_prefix("  ") {
            if self.discarding {
                return;
            }
            if let Some(r) = &mut self.pending {
                r.message.push('\n');
                r.message.push_str(rest);
                if r.message.len() > MAX_RECORD {
                    let line = r.line;
                    self.pending = None;
                    self.discarding = true;
                    out.skip(line, format!("record {}", super::too_long()));
                }
                return;
            }
        }
        self.flush(out);
        if let Some(c) = PLAIN.captures(text) {
            let part = |i: usize| c.get(i).map_or("", |m| m.as_str());
            self.pending = Some(Record {
                line: n,
                format: Format::Console,
                time: Some(part(1).to_string()),
                component: Some(part(2).to_string()),
                severity: severity(part(3)),
                message: part(4).to_string(),
                fields: Vec::new(),
            });
        } else if let Some(r) = text::record(n, text) {
            out.emit(r);
        }
    }

    fn overlong(&mut self, n: u64, out: &mut Out<'_>) {
        self.flush(out);
        out.skip(n, format!("line {}", super::too_long()));
    }

    fn finish(&mut self, out: &mut Out<'_>) {
        self.flush(out);
    }
}

#[derive(serde::Deserialize)]
struct JsonLine {
    #[serde(default, alias = "timestamp")]
    time: Option<String>,
    #[serde(default)]
    component: Option<String>,
    #[serde(default)]
    level: Option<String>,
    #[serde(default, alias = "msg")]
    message: Option<String>,
}

fn json(line: &str) -> Option<JsonLine> {
    serde_json::from_str::<JsonLine>(line)
        .ok()
        .filter(|j| j.message.is_some())
}

pub(crate) struct JsonParser;

impl LineParser for JsonParser {
    fn line(&mut self, n: u64, text: &str, out: &mut Out<'_>) {
        let trimmed = text.trim_start_matches('\u{feff}').trim();
        let parsed = if trimmed.starts_with('{') {
            json(trimmed)
        } else {
            None
        };
        match parsed {
            Some(j) => out.emit(Record {
                line: n,
                format: Format::ConsoleJson,
                time: j.time,
                component: j.component,
                severity: j.level.as_deref().and_then(severity),
                message: j.message.unwrap_or_default(),
                fields: Vec::new(),
            }),
            None => {
                if let Some(r) = text::record(n, text) {
                    out.emit(r);
                }
            }
        }
    }

    fn overlong(&mut self, n: u64, out: &mut Out<'_>) {
        out.skip(n, format!("line {}", super::too_long()));
    }

    fn finish(&mut self, _out: &mut Out<'_>) {}
}
