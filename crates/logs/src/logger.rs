//! What components log through. A [`Logger`] writes each line to its sinks (a CMTrace file
//! with rollover, the console in plain or JSON, or a function for tests) and holds the
//! verbose switch, which can be flipped while the component runs: a config reload or an
//! admin call changes what the next line does, with no restart.
//!
//! Every sink is handed the message as [`crate::escape`] writes it, one line whatever it
//! holds: callers format outside text into messages freely, and write several messages for
//! several lines.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use time::OffsetDateTime;

use crate::cmtrace::{self, Severity};
use crate::console::{self, ConsoleFormat};
use crate::rolling::{self, RollingFile};

/// A logger shared by every task of a component.
pub type Log = Arc<Logger>;

type SinkFn = Box<dyn Fn(Severity, &str) + Send + Sync>;

enum Sink {
    File(RollingFile),
    Console(ConsoleFormat),
    Func(SinkFn),
}

pub struct Logger {
    component: String,
    sinks: Vec<Sink>,
    verbose: AtomicBool,
}

impl Logger {
    /// A logger for `component` (CMTrace's `component` attribute) with no sinks yet.
    pub fn new(component: &str) -> Logger {
        Logger {
            component: component.to_string(),
            sinks: Vec::new(),
            verbose: AtomicBool::new(false),
        }
    }

    /// Also write CMTrace lines to `path`, rolling over to `.lo_` at `max_bytes`. Should the
    /// file become unwritable (a full disk), its lines are held and written when it can be;
    /// a warning line says how many were lost where they were.
    pub fn with_file(mut self, path: &Path, max_bytes: u64) -> std::io::Result<Logger> {
        let component = self.component.clone();
        let file = RollingFile::open(path, max_bytes)?.with_gap_line(move |lost, why| {
            cmtrace::stamped_parts(&component, Severity::Warning, &[&lost_lines(lost, why)])
        });
        self.sinks.push(Sink::File(file));
        Ok(self)
    }

    /// Also write CMTrace lines to a file already opened (with a rollover hook, say).
    pub fn with_rolling_file(mut self, file: RollingFile) -> Logger {
        self.sinks.push(Sink::File(file));
        self
    }

    /// Also print each line on standard output.
    pub fn with_console(mut self, format: ConsoleFormat) -> Logger {
        self.sinks.push(Sink::Console(format));
        self
    }

    /// Also hand each line to `sink` (tests record lines this way).
    pub fn with_sink(mut self, sink: impl Fn(Severity, &str) + Send + Sync + 'static) -> Logger {
        self.sinks.push(Sink::Func(Box::new(sink)));
        self
    }

    pub fn into_log(self) -> Log {
        Arc::new(self)
    }

    pub fn component(&self) -> &str {
        &self.component
    }

    pub fn is_verbose(&self) -> bool {
        self.verbose.load(Ordering::Relaxed)
    }

    /// Turns verbose lines on or off; returns the previous setting.
    pub fn set_verbose(&self, on: bool) -> bool {
        self.verbose.swap(on, Ordering::Relaxed)
    }

    pub fn info(&self, message: &str) {
        self.write(Severity::Info, message);
    }

    /// An informational line given in parts, written to a file without joining them into a
    /// message first: for the lines a component writes on every request.
    pub fn info_parts(&self, message: &[&str]) {
        self.write_parts(Severity::Info, message);
    }

    pub fn warn(&self, message: &str) {
        self.write(Severity::Warning, message);
    }

    pub fn error(&self, message: &str) {
        self.write(Severity::Error, message);
    }

    /// An informational line written only while verbose is on. The message is built only
    /// then, so verbose lines cost nothing on the hot path when off.
    pub fn verbose(&self, message: impl FnOnce() -> String) {
        if self.is_verbose() {
            self.write(Severity::Info, &message());
        }
    }

    /// Lines its file lost (see [`RollingFile::lines_lost`]); console and test sinks lose none.
    pub fn lines_lost(&self) -> u64 {
        self.sinks
            .iter()
            .map(|sink| match sink {
                Sink::File(file) => file.lines_lost(),
                _ => 0,
            })
            .sum()
    }

    /// Writes every line given so far to its file: before the component stops.
    pub fn flush(&self) {
        for sink in &self.sinks {
            if let Sink::File(file) = sink {
                let _ = file.flush();
            }
        }
    }

    pub fn write(&self, severity: Severity, message: &str) {
        self.write_parts(severity, &[message]);
    }

    fn write_parts(&self, severity: Severity, parts: &[&str]) {
        for sink in &self.sinks {
            match sink {
                Sink::File(file) => {
                    let line = cmtrace::stamped_parts(&self.component, severity, parts);
                    // Informational lines (every request's) are written within a few
                    // milliseconds, gathered; warnings and errors at once, with everything
                    // before them. A full disk must not stop the service.
                    match severity {
                        Severity::Info => file.append_soon(&line),
                        Severity::Warning | Severity::Error => {
                            let _ = file.append(&line);
                        }
                    }
                }
                Sink::Console(format) => {
                    let line = console::format(
                        *format,
                        OffsetDateTime::now_utc(),
                        &self.component,
                        severity,
                        &joined(parts),
                    );
                    use std::io::Write;
                    // One locked write per line so lines from many threads never interleave.
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                }
                // What the file shows, so what a test records is what an admin reads.
                Sink::Func(f) => f(severity, &crate::escape::message(&joined(parts))),
            }
        }
    }
}

/// The message written where a log file lost lines.
pub fn lost_lines(lost: u64, why: &str) -> String {
    format!("{lost} log line(s) were lost here: the file could not be written ({why})")
}

/// A message given in parts, whole: for the sinks other than files.
fn joined<'a>(parts: &[&'a str]) -> std::borrow::Cow<'a, str> {
    match parts {
        [one] => std::borrow::Cow::Borrowed(one),
        _ => std::borrow::Cow::Owned(parts.concat()),
    }
}

/// The `[log]` table of a component's configuration.
///
/// ```toml
/// [log]
/// file = "logs/SMS_Cloud_ProxyConnector.log"   # CMTrace file (also --log FILE)
/// max_size_kib = 10240                          # roll over to .lo_ at this size
/// console = "plain"                             # plain, json or off
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    #[serde(default)]
    pub file: Option<std::path::PathBuf>,
    #[serde(default = "default_max_size_kib")]
    pub max_size_kib: u64,
    #[serde(default)]
    pub console: ConsoleSetting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleSetting {
    #[default]
    Plain,
    Json,
    Off,
}

impl std::str::FromStr for ConsoleSetting {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "plain" => Ok(ConsoleSetting::Plain),
            "json" => Ok(ConsoleSetting::Json),
            "off" => Ok(ConsoleSetting::Off),
            other => Err(format!(
                "\"{other}\" is not a console style: plain, json or off"
            )),
        }
    }
}

fn default_max_size_kib() -> u64 {
    rolling::DEFAULT_MAX_BYTES / 1024
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            file: None,
            max_size_kib: default_max_size_kib(),
            console: ConsoleSetting::Plain,
        }
    }
}

impl LogSettings {
    /// Why these settings cannot be used, naming the key.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if !(1..=4 * 1024 * 1024).contains(&self.max_size_kib) {
            return Some((
                "log.max_size_kib",
                "must be between 1 and 4194304 (4 GiB)".into(),
            ));
        }
        None
    }

    /// A logger for `component` writing where these settings say.
    pub fn logger(&self, component: &str) -> std::io::Result<Logger> {
        let mut logger = Logger::new(component);
        if let Some(path) = &self.file {
            logger = logger.with_file(path, self.max_size_kib.saturating_mul(1024))?;
        }
        Ok(match self.console {
            ConsoleSetting::Plain => logger.with_console(ConsoleFormat::Plain),
            ConsoleSetting::Json => logger.with_console(ConsoleFormat::Json),
            ConsoleSetting::Off => logger,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn verbose_lines_follow_the_switch() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let log = Logger::new("T")
            .with_sink(move |_, m| record.lock().unwrap().push(m.to_string()))
            .into_log();
        log.verbose(|| "hidden".into());
        log.info("always");
        assert!(!log.set_verbose(true));
        log.verbose(|| "shown".into());
        assert!(log.set_verbose(false));
        log.verbose(|| "hidden again".into());
        assert_eq!(*seen.lock().unwrap(), ["always", "shown"]);
    }
}
