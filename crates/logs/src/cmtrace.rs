//! The CMTrace log line, as Configuration Manager components write it:
//!
//! ```text
//! <![LOG[message]LOG]!><time="14:03:07.123+000" date="11-24-2026" component="SMS_CLOUD_PROXYCONNECTOR" context="" type="1" thread="12" file="">
//! ```
//!
//! `time` ends with the offset from UTC in minutes, signed (`+000`, `-300`); `type` is 1 info,
//! 2 warning, 3 error.

use time::OffsetDateTime;

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
    /// The line, without its line break. A message holding `]LOG]!>` would end the message
    /// early for every reader, so that marker is defused.
    pub fn format(&self) -> String {
        let at = self.at;
        let offset_minutes = at.offset().whole_minutes();
        let sign = if offset_minutes < 0 { '-' } else { '+' };
        format!(
            "<![LOG[{}]LOG]!><time=\"{:02}:{:02}:{:02}.{:03}{}{:03}\" date=\"{:02}-{:02}-{:04}\" component=\"{}\" context=\"\" type=\"{}\" thread=\"{}\" file=\"\">",
            self.message.replace("]LOG]!>", "]LOG]!&gt;"),
            at.hour(),
            at.minute(),
            at.second(),
            at.millisecond(),
            sign,
            offset_minutes.unsigned_abs(),
            u8::from(at.month()),
            at.day(),
            at.year(),
            self.component.replace('"', "'"),
            self.severity as u8,
            self.thread,
        )
    }
}

/// An append-only CMTrace log file. Each line is written whole under a lock, so lines from
/// many tasks never interleave. (Rollover to `.lo_` comes with the logs issue.)
pub struct FileLog {
    component: String,
    file: std::sync::Mutex<std::fs::File>,
}

impl FileLog {
    pub fn open(path: &std::path::Path, component: &str) -> std::io::Result<FileLog> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(FileLog {
            component: component.to_string(),
            file: std::sync::Mutex::new(file),
        })
    }

    pub fn write(&self, severity: Severity, message: &str) -> std::io::Result<()> {
        use std::io::Write;
        let line = Line {
            message,
            component: &self.component,
            severity,
            thread: thread_number(),
            at: OffsetDateTime::now_utc(),
        };
        let mut text = line.format();
        text.push_str("\r\n");
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(text.as_bytes())
    }
}

impl Severity {
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
}
