//! The CMTrace log line, as Configuration Manager components write it:
//!
//! ```text
//! <![LOG[message]LOG]!><time="14:03:07.123+000" date="11-24-2026" component="SMS_CLOUD_PROXYCONNECTOR" context="" type="1" thread="12" file="">
//! ```
//!
//! `time` ends with the offset from UTC in minutes, signed (`+000`, `-300`); `type` is 1 info,
//! 2 warning, 3 error.

use time::OffsetDateTime;

// The rolling file lived here first; its paths stay.
pub use crate::rolling::{RollingFile, DEFAULT_MAX_BYTES, LINGER};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info = 1,
    Warning = 2,
    Error = 3,
}

/// One line's fields.
#[derive(Debug, Clone)]
pub struct Line<'a> {
    pub message: &'a str,
    pub component: &'a str,
    pub severity: Severity,
    pub thread: u64,
    pub at: OffsetDateTime,
}

impl Line<'_> {
    /// The line, without its line break. The message is written as [`crate::escape`] says:
    /// one line, neither marker whole.
    pub fn format(&self) -> String {
        let mut text = String::with_capacity(self.message.len() + 160);
        self.write_to(&mut text);
        text
    }

    /// Appends the line to `text`.
    fn write_to(&self, text: &mut String) {
        let mut time = String::with_capacity(TIME_FIELDS_LEN);
        push_time_fields(&mut time, self.at);
        write_line(
            text,
            &[self.message],
            &time,
            self.component,
            self.severity,
            self.thread,
        );
    }
}

/// Appends one line: the message (its parts joined), then the attributes, `time_fields` being
/// [`push_time_fields`]'s text. One allocation per line, none when the message and the
/// component need no escaping: the connector writes two of these per request.
fn write_line(
    text: &mut String,
    message: &[&str],
    time_fields: &str,
    component: &str,
    severity: Severity,
    thread: u64,
) {
    text.push_str("<![LOG[");
    let start = text.len();
    for part in message {
        text.push_str(part);
    }
    // The message may hold outside text: a line break would start a record of its own, an end
    // marker (even across parts) would end this one early. See `crate::escape`.
    crate::escape::neutralise_from(text, start);
    text.push_str("]LOG]!><time=\"");
    text.push_str(time_fields);
    text.push_str("\" component=\"");
    if component.contains('"') {
        text.push_str(&component.replace('"', "'"));
    } else {
        text.push_str(component);
    }
    text.push_str("\" context=\"\" type=\"");
    push_digits(text, severity as u64, 1);
    text.push_str("\" thread=\"");
    push_digits(text, thread, 1);
    text.push_str("\" file=\"\">");
}

/// `14:03:07.123+000" date="11-24-2026`: what lies between `time="` and the date's closing
/// quote.
const TIME_FIELDS_LEN: usize = 34;

fn push_time_fields(text: &mut String, at: OffsetDateTime) {
    let offset_minutes = at.offset().whole_minutes();
    push_digits(text, u64::from(at.hour()), 2);
    text.push(':');
    push_digits(text, u64::from(at.minute()), 2);
    text.push(':');
    push_digits(text, u64::from(at.second()), 2);
    text.push('.');
    push_digits(text, u64::from(at.millisecond()), 3);
    text.push(if offset_minutes < 0 { '-' } else { '+' });
    push_digits(text, u64::from(offset_minutes.unsigned_abs()), 3);
    text.push_str("\" date=\"");
    push_digits(text, u64::from(u8::from(at.month())), 2);
    text.push('-');
    push_digits(text, u64::from(at.day()), 2);
    text.push('-');
    // Years before 1 are not a log's; they print as 0000.
    push_digits(text, u64::try_from(at.year()).unwrap_or(0), 4);
}

/// `n` in decimal, zero-padded to at least `width` digits, written into a stack buffer and
/// pushed once: core::fmt's padded numbers cost far more, and a line has several.
fn push_digits(text: &mut String, n: u64, width: usize) {
    let mut digits = [b'0'; 24];
    let mut start = digits.len();
    let mut rest = n;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    start = start.min(digits.len() - width.min(digits.len()));
    // Only ASCII digits were written.
    text.push_str(std::str::from_utf8(&digits[start..]).unwrap_or("0"));
}

/// A CMTrace line for `component`, stamped now, with its CMTrace line break.
pub fn stamped(component: &str, severity: Severity, message: &str) -> String {
    stamped_parts(component, severity, &[message])
}

/// [`stamped`] for a message given in parts, joined as they are written: no message string is
/// built first.
pub fn stamped_parts(component: &str, severity: Severity, message: &[&str]) -> String {
    let length: usize = message.iter().map(|part| part.len()).sum();
    let mut text = String::with_capacity(length + component.len() + 120);
    let now = std::time::SystemTime::now();
    NOW_FIELDS.with(|cache| {
        let mut cache = cache.borrow_mut();
        // Many lines fall in the same millisecond on a busy component: the time and date text
        // is made once per millisecond per thread.
        let millis = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        if cache.0 != millis || cache.1.is_empty() {
            cache.0 = millis;
            cache.1.clear();
            push_time_fields(&mut cache.1, OffsetDateTime::from(now));
        }
        write_line(
            &mut text,
            message,
            &cache.1,
            component,
            severity,
            thread_number(),
        );
    });
    text.push_str("\r\n");
    text
}

thread_local! {
    /// The millisecond since the epoch and its time fields, as last written on this thread.
    static NOW_FIELDS: std::cell::RefCell<(u128, String)> =
        const { std::cell::RefCell::new((0, String::new())) };
}

impl Severity {
    /// `info`, `warning`, `error`: the console's words.
    pub fn word(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }

    /// 1, 2, 3 as CMTrace numbers them; anything else is an error.
    pub fn from_number(n: u8) -> Severity {
        match n {
            1 => Severity::Info,
            2 => Severity::Warning,
            _ => Severity::Error,
        }
    }
}

/// A small number for the current thread, as CMTrace shows thread ids.
fn thread_number() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local!(static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed));
    ID.with(|id| *id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_padded_and_never_cut() {
        let mut text = String::new();
        for (n, width) in [
            (0, 2),
            (7, 3),
            (59, 2),
            (2026, 4),
            (123456, 2),
            (u64::MAX, 1),
        ] {
            push_digits(&mut text, n, width);
            text.push(' ');
        }
        assert_eq!(text, "00 007 59 2026 123456 18446744073709551615 ");
    }

    #[test]
    fn the_spec_line_shape() {
        let line = Line {
            message: "Forwarding proxy message 1f3c to URL: https://mp/SMS_MP/.sms_aut?MPLIST",
            component: "SMS_CLOUD_PROXYCONNECTOR",
            severity: Severity::Info,
            thread: 12,
            at: time::macros::datetime!(2026-11-24 14:03:07.123 UTC),
        };
        assert_eq!(
            line.format(),
            "<![LOG[Forwarding proxy message 1f3c to URL: https://mp/SMS_MP/.sms_aut?MPLIST]LOG]!><time=\"14:03:07.123+000\" date=\"11-24-2026\" component=\"SMS_CLOUD_PROXYCONNECTOR\" context=\"\" type=\"1\" thread=\"12\" file=\"\">"
        );
    }

    #[test]
    fn negative_offsets_and_hostile_messages() {
        let line = Line {
            message: "evil]LOG]!><time=\"x\"",
            component: "C",
            severity: Severity::Error,
            thread: 1,
            at: time::macros::datetime!(2026-01-02 03:04:05.006 -05:00),
        };
        let text = line.format();
        assert!(
            text.contains("time=\"03:04:05.006-300\" date=\"01-02-2026\""),
            "{text}"
        );
        assert_eq!(text.matches("]LOG]!>").count(), 1, "{text}");
        assert!(text.contains("type=\"3\""));
    }

    /// A message in parts is the message joined; an end marker split across two parts is
    /// defused like a whole one; lines stamped within one millisecond carry the same time
    /// text, which is the time now.
    #[test]
    fn stamped_parts_join_defuse_and_stamp_the_time_now() {
        let before = OffsetDateTime::now_utc();
        let parts = stamped_parts("C", Severity::Info, &["a ]LOG", "]!> b", "", " c"]);
        let whole = stamped("C", Severity::Info, "a ]LOG]!> b c");
        let after = OffsetDateTime::now_utc();
        let tail = |line: &str| line[line.find("\" component=").unwrap()..].to_string();
        assert!(
            parts.starts_with("<![LOG[a ]LOG]!&gt; b c]LOG]!><time=\""),
            "{parts}"
        );
        assert_eq!(parts.matches("]LOG]!>").count(), 1, "{parts}");
        assert_eq!(tail(&parts), tail(&whole));
        assert!(parts.ends_with("\r\n"));
        // The stamp lies between the clock readings around it (to the millisecond).
        let stamp = |at: OffsetDateTime| {
            let mut text = String::new();
            push_time_fields(&mut text, at);
            text
        };
        let field = &parts[parts.find("time=\"").unwrap() + 6..][..TIME_FIELDS_LEN];
        let millis = |at: OffsetDateTime| {
            at.replace_nanosecond(at.millisecond() as u32 * 1_000_000)
                .unwrap()
        };
        let (low, high) = (millis(before), millis(after));
        let mut at = low;
        let mut seen = false;
        while at <= high {
            seen |= stamp(at) == field;
            at += time::Duration::milliseconds(1);
        }
        assert!(seen, "{field} is not between {low} and {high}");
        assert_eq!(stamp(low).len(), TIME_FIELDS_LEN);
    }
}
