//! IIS W3C extended logs. The `#Fields:` directive names the columns (and may change them
//! mid-file, as IIS does when logging settings change); other directives are skipped. Before
//! any `#Fields:` (a pasted line, a header cut off), IIS's default field list of the
//! reference management point is assumed.

use std::sync::LazyLock;

use regex::Regex;

use super::{Format, LineParser, Out, Record, Severity};

/// The fields the reference management point writes, IIS's usual choice.
pub const DEFAULT_FIELDS: &str = "date time s-ip cs-method cs-uri-stem cs-uri-query s-port cs-username c-ip cs(User-Agent) cs(Referer) sc-status sc-substatus sc-win32-status sc-bytes time-taken";

static HEADERLESS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} \S+ [A-Z_]{3,16} /\S* ")
        .expect("a valid literal regex")
});

pub(crate) fn is_directive(line: &str) -> bool {
    [
        "#Fields:",
        "#Software:",
        "#Version:",
        "#Date:",
        "#Start-Date:",
    ]
    .iter()
    .any(|d| line.starts_with(d))
}

/// A data line of the default layout without its header (`date time s-ip METHOD /stem ...`).
pub(crate) fn is_headerless_line(line: &str) -> bool {
    HEADERLESS.is_match(line)
}

pub(crate) struct W3cParser {
    names: Vec<String>,
}

impl Default for W3cParser {
    fn default() -> Self {
        W3cParser {
            names: DEFAULT_FIELDS.split(' ').map(str::to_string).collect(),
        }
    }
}

impl LineParser for W3cParser {
    fn line(&mut self, n: u64, text: &str, out: &mut Out<'_>) {
        let text = text.trim_start_matches('\u{feff}').trim_end();
        if let Some(directive) = text.strip_prefix('#') {
            if let Some(fields) = directive.strip_prefix("Fields:") {
                self.names = fields.split_whitespace().map(str::to_string).collect();
            }
            return;
        }
        if text.trim_start().is_empty() {
            return;
        }
        let values: Vec<&str> = text.split_whitespace().collect();
        if values.len() != self.names.len() {
            out.skip(
                n,
                format!(
                    "{} values where #Fields names {}",
                    values.len(),
                    self.names.len()
                ),
            );
            return;
        }
        let fields: Vec<(String, String)> = self
            .names
            .iter()
            .zip(&values)
            .map(|(n, v)| (n.clone(), (*v).to_string()))
            .collect();
        let get = |name: &str| super::field_in(&fields, name);
        let time = match (get("date"), get("time")) {
            (Some(d), Some(t)) => Some(format!("{d} {t}")),
            (_, t) => t.map(str::to_string),
        };
        let severity = get("sc-status")
            .and_then(|s| s.parse::<u16>().ok())
            .map(|s| match s {
                500.. => Severity::Error,
                400..=499 => Severity::Warning,
                _ => Severity::Info,
            });
        out.emit(Record {
            line: n,
            format: Format::W3c,
            time,
            component: None,
            severity,
            message: text.to_string(),
            fields,
        });
    }

    fn overlong(&mut self, n: u64, out: &mut Out<'_>) {
        out.skip(n, format!("line {}", super::too_long()));
    }

    fn finish(&mut self, _out: &mut Out<'_>) {}
}
