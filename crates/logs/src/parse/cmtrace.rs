//! CMTrace records. A record starts with `<![LOG[` at the start of a line and runs, over as
//! many lines as its message takes, to `]LOG]!>` and the attribute part `<time="..." ...>`.
//! Attributes are read by name in any order; unknown ones are kept.
//!
//! A record whose end marker never comes is skipped (and counted, with the line it began on)
//! when the next record starts, when it grows past the cap, or at the end of the file. Text
//! outside records is read as plain text, so rules still see it.

use super::{text, Format, LineParser, Out, Record, Severity, MAX_RECORD};

pub(crate) const START: &str = "<![LOG[";
pub(crate) const END: &str = "]LOG]!>";

#[derive(Default)]
enum State {
    #[default]
    Idle,
    /// Inside a record that began on `line`.
    In { line: u64, message: String },
    /// Dropping the rest of a record already skipped.
    Discard,
}

#[derive(Default)]
pub(crate) struct CmTraceParser {
    state: State,
}

impl CmTraceParser {
    /// One segment of text: a whole physical line, or what follows a record that ended
    /// mid-line. `continues` says whether it starts a new physical line.
    fn segment(&mut self, n: u64, mut seg: &str, mut continues: bool, out: &mut Out<'_>) {
        // Each pass consumes a prefix of `seg`; at most one record per pass.
        loop {
            match std::mem::take(&mut self.state) {
                State::Idle => {
                    let trimmed = seg.trim_start_matches([' ', '\t', '\u{feff}']);
                    let Some(at) = trimmed.find(START) else {
                        if let Some(r) = text::record(n, seg) {
                            out.emit(r);
                        }
                        return;
                    };
                    if let Some(r) = text::record(n, &trimmed[..at]) {
                        out.emit(r);
                    }
                    self.state = State::In {
                        line: n,
                        message: String::new(),
                    };
                    seg = &trimmed[at + START.len()..];
                    continues = false;
                }
                State::In { line, mut message } => {
                    if continues && seg.trim_start().starts_with(START) {
                        out.skip(line, format!("no end marker {END} before the next record"));
                        continue; // Idle now: the new record.
                    }
                    let Some(end) = seg.find(END) else {
                        if continues {
                            message.push('\n');
                        }
                        message.push_str(seg);
                        if message.len() > MAX_RECORD {
                            out.skip(line, format!("record {}", super::too_long()));
                            self.state = State::Discard;
                        } else {
                            self.state = State::In { line, message };
                        }
                        return;
                    };
                    if continues {
                        message.push('\n');
                    }
                    message.push_str(&seg[..end]);
                    if message.len() > MAX_RECORD {
                        out.skip(line, format!("record {}", super::too_long()));
                        return;
                    }
                    let (attributes, used) = attributes(&seg[end + END.len()..]);
                    out.emit(build(line, message, attributes));
                    let rest = &seg[end + END.len() + used..];
                    if !rest.contains(START) {
                        return;
                    }
                    seg = rest;
                    continues = false;
                }
                State::Discard => {
                    if seg.trim_start().starts_with(START) {
                        continue;
                    }
                    if let Some(end) = seg.find(END) {
                        let (_, used) = attributes(&seg[end + END.len()..]);
                        let rest = &seg[end + END.len() + used..];
                        if rest.contains(START) {
                            seg = rest;
                            continues = false;
                            continue;
                        }
                        return;
                    }
                    self.state = State::Discard;
                    return;
                }
            }
        }
    }
}

impl LineParser for CmTraceParser {
    fn line(&mut self, n: u64, text: &str, out: &mut Out<'_>) {
        self.segment(n, text, true, out);
    }

    fn overlong(&mut self, n: u64, out: &mut Out<'_>) {
        match std::mem::take(&mut self.state) {
            State::In { line, .. } => {
                out.skip(line, format!("record {}", super::too_long()));
                self.state = State::Discard;
            }
            State::Idle => out.skip(n, format!("line {}", super::too_long())),
            State::Discard => self.state = State::Discard,
        }
    }

    fn finish(&mut self, out: &mut Out<'_>) {
        if let State::In { line, .. } = std::mem::take(&mut self.state) {
            out.skip(
                line,
                format!("no end marker {END} before the end of the file"),
            );
        }
    }
}

/// `<time="14:03:07.123+000" date="11-24-2026" component="X" ...>`: the pairs, and how many
/// bytes they took (through the closing `>`). Stops quietly at anything malformed.
fn attributes(s: &str) -> (Vec<(String, String)>, usize) {
    let b = s.as_bytes();
    let mut out = Vec::new();
    if b.first() != Some(&b'<') {
        return (out, 0);
    }
    let mut i = 1;
    loop {
        while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
            i += 1;
        }
        if i >= b.len() {
            return (out, i);
        }
        if b[i] == b'>' {
            return (out, i + 1);
        }
        let name_start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'-') {
            i += 1;
        }
        if i == name_start || i + 1 >= b.len() || b[i] != b'=' || b[i + 1] != b'"' {
            return (out, i);
        }
        let name = &s[name_start..i];
        let value_start = i + 2;
        match s[value_start..].find('"') {
            Some(q) => {
                out.push((
                    name.to_string(),
                    s[value_start..value_start + q].to_string(),
                ));
                i = value_start + q + 1;
            }
            None => return (out, b.len()),
        }
    }
}

fn build(line: u64, message: String, fields: Vec<(String, String)>) -> Record {
    let get = |name: &str| super::field_in(&fields, name);
    let time = match (get("date"), get("time")) {
        (Some(d), Some(t)) => Some(format!("{d} {t}")),
        (None, Some(t)) => Some(t.to_string()),
        (Some(d), None) => Some(d.to_string()),
        (None, None) => None,
    };
    let severity = match get("type").map(str::trim) {
        Some("0" | "1") => Some(Severity::Info),
        Some("2") => Some(Severity::Warning),
        Some("3") => Some(Severity::Error),
        _ => None,
    };
    let component = get("component")
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    Record {
        line,
        format: Format::CmTrace,
        time,
        component,
        severity,
        message,
        fields,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_parts() {
        let (a, used) = attributes("<time=\"1\" b=\"two words\">tail");
        assert_eq!(used, "<time=\"1\" b=\"two words\">".len());
        assert_eq!(a[1], ("b".to_string(), "two words".to_string()));
        assert_eq!(attributes("no").1, 0);
        let (a, _) = attributes("<x=\"unterminated");
        assert!(a.is_empty());
    }
}
