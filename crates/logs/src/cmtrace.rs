//! The CMTrace log line, as Configuration Manager components write it:
//!
//! ```text
//! <![LOG[message]LOG]!><time="14:03:07.123+000" date="11-24-2026" component="SMS_CLOUD_PROXYCONNECTOR" context="" type="1" thread="12" file="">
//! ```
//!
//! `time` ends with the offset from UTC in minutes, signed (`+000`, `-300`); `type` is 1 info,
//! 2 warning, 3 error.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// A log file that rolls over at a size limit as Configuration Manager's do: when the next line
/// would take the file past the limit, the file becomes `name.lo_` (replacing the previous
/// one) and a new `name.log` starts. Lines are written whole under one lock, so no line is
/// torn or lost across a rollover, however many tasks write at once.
pub struct RollingFile {
    path: PathBuf,
    rolled: PathBuf,
    max_bytes: u64,
    /// Written first in every new file (W3C's directives); made when the file starts.
    header: Option<Header>,
    /// Called under the lock right after each rollover, with the rolled file's path, before
    /// any later line can roll it away (archiving, tests).
    on_rollover: Option<RolloverHook>,
    state: Mutex<FileState>,
}

type Header = Box<dyn Fn() -> String + Send + Sync>;
type RolloverHook = Box<dyn Fn(&Path) + Send + Sync>;

struct FileState {
    file: File,
    size: u64,
    /// Whether the current file holds any line (a header alone never rolls over).
    has_lines: bool,
}

/// The default size at which a log rolls over: large enough for a busy connector's verbose
/// lines between two looks, small enough to open in CMTrace.
pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024;

impl RollingFile {
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<RollingFile> {
        Self::open_with_header(path, max_bytes, None)
    }

    /// As [`RollingFile::open`], with `header` written at the start of every new file.
    pub fn open_with_header(
        path: &Path,
        max_bytes: u64,
        header: Option<Header>,
    ) -> io::Result<RollingFile> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let mut file = OpenOptions::new().create(true).append(true).open(path)?;
        let mut size = file.metadata()?.len();
        let has_lines = size > 0;
        if size == 0 {
            if let Some(header) = &header {
                let text = header();
                file.write_all(text.as_bytes())?;
                size = text.len() as u64;
            }
        }
        Ok(RollingFile {
            path: path.to_path_buf(),
            rolled: rolled_name(path),
            max_bytes: max_bytes.max(1),
            header,
            on_rollover: None,
            state: Mutex::new(FileState {
                file,
                size,
                has_lines,
            }),
        })
    }

    /// Calls `hook` with the rolled file's path after each rollover, while no other line can
    /// be written.
    pub fn with_rollover_hook(mut self, hook: impl Fn(&Path) + Send + Sync + 'static) -> Self {
        self.on_rollover = Some(Box::new(hook));
        self
    }

    /// Appends `text` (one or more whole lines, line breaks included).
    pub fn append(&self, text: &str) -> io::Result<()> {
        // A poisoned lock only means another writer panicked mid-call; the file is still fine.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let len = text.len() as u64;
        if state.has_lines && state.size + len > self.max_bytes {
            state.file.flush()?;
            std::fs::rename(&self.path, &self.rolled)?;
            if let Some(hook) = &self.on_rollover {
                hook(&self.rolled);
            }
            state.file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&self.path)?;
            state.size = 0;
            if let Some(header) = &self.header {
                let text = header();
                state.file.write_all(text.as_bytes())?;
                state.size = text.len() as u64;
            }
        }
        state.file.write_all(text.as_bytes())?;
        state.size += len;
        state.has_lines = true;
        Ok(())
    }
}

/// `SMS_Cloud_ProxyConnector.log` -> `SMS_Cloud_ProxyConnector.lo_`.
fn rolled_name(path: &Path) -> PathBuf {
    match path.extension() {
        Some(_) => path.with_extension("lo_"),
        None => {
            let mut name = path.as_os_str().to_owned();
            name.push(".lo_");
            PathBuf::from(name)
        }
    }
}

/// A CMTrace line for `component`, stamped now, with its CMTrace line break.
pub fn stamped(component: &str, severity: Severity, message: &str) -> String {
    let mut text = Line {
        message,
        component,
        severity,
        thread: thread_number(),
        at: OffsetDateTime::now_utc(),
    }
    .format();
    text.push_str("\r\n");
    text
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
