//! Log lines for standard output, for containers: plain text or one JSON object per line.
//!
//! ```text
//! 2026-11-25T06:30:57.123Z SMS_CLOUD_PROXYCONNECTOR info: Maintaining connections...
//! {"time":"2026-11-25T06:30:57.123Z","component":"SMS_CLOUD_PROXYCONNECTOR","level":"info","message":"Maintaining connections..."}
//! ```
//!
//! A message is one line, whatever it holds (see [`crate::escape`]), so every line starts with
//! a time or is a JSON object of ours. (Older Portcullis wrote a multi-line plain message on
//! continuation lines indented by two spaces; the reader still takes those.)

use serde::Serialize;
use time::OffsetDateTime;

use crate::cmtrace::Severity;

/// How console lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleFormat {
    #[default]
    Plain,
    Json,
}

/// `2026-11-25T06:30:57.123Z`: UTC, milliseconds.
pub fn timestamp(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

#[derive(Serialize)]
struct JsonLine<'a> {
    time: &'a str,
    component: &'a str,
    level: &'a str,
    message: &'a str,
}

/// One console line, without its line break.
pub fn format(
    style: ConsoleFormat,
    at: OffsetDateTime,
    component: &str,
    severity: Severity,
    message: &str,
) -> String {
    let time = timestamp(at);
    let message = crate::escape::message(message);
    match style {
        ConsoleFormat::Plain => format!("{time} {component} {}: {message}", severity.word()),
        ConsoleFormat::Json => serde_json::to_string(&JsonLine {
            time: &time,
            component,
            level: severity.word(),
            message: &message,
        })
        // Serialising strings cannot fail; keep a line either way.
        .unwrap_or_else(|_| {
            format!("{{\"time\":\"{time}\",\"level\":\"error\",\"message\":\"unprintable\"}}")
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_json_shapes() {
        let at = time::macros::datetime!(2026-11-25 06:30:57.123 UTC);
        assert_eq!(
            format(
                ConsoleFormat::Plain,
                at,
                "SMS_CLOUD_PROXYCONNECTOR",
                Severity::Info,
                "Maintaining connections..."
            ),
            "2026-11-25T06:30:57.123Z SMS_CLOUD_PROXYCONNECTOR info: Maintaining connections..."
        );
        assert_eq!(
            format(ConsoleFormat::Plain, at, "C", Severity::Warning, "one\ntwo"),
            r"2026-11-25T06:30:57.123Z C warning: one\ntwo"
        );
        assert_eq!(
            format(
                ConsoleFormat::Json,
                at,
                "C",
                Severity::Error,
                "say \"hi\"\n"
            ),
            r#"{"time":"2026-11-25T06:30:57.123Z","component":"C","level":"error","message":"say \"hi\"\\n"}"#
        );
    }
}
