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
/// one) and a new `name.log` starts.
///
/// Writers never wait on one another's disk writes: [`RollingFile::append`] queues its lines
/// under a short lock, and whichever caller finds no write in progress writes everything queued
/// (its own lines and those queued meanwhile) in one system call per batch, until the queue is
/// empty. A busy component's lines thus cost a copy, not a contended lock and a write each,
/// and every line is still written whole, once, in order, before any caller that could see it
/// has gone on for long. Rollover happens between queued appends, never inside one.
pub struct RollingFile {
    path: PathBuf,
    rolled: PathBuf,
    max_bytes: u64,
    /// Written first in every new file (W3C's directives); made when the file starts.
    header: Option<Header>,
    /// Called right after each rollover, with the rolled file's path, before any later line
    /// can roll it away (archiving, tests).
    on_rollover: Option<RolloverHook>,
    queue: Mutex<Queue>,
    /// Touched only by the caller that holds `Queue::writing`.
    state: Mutex<FileState>,
}

type Header = Box<dyn Fn() -> String + Send + Sync>;
type RolloverHook = Box<dyn Fn(&Path) + Send + Sync>;

#[derive(Default)]
struct Queue {
    /// The queued appends' text, back to back.
    bytes: Vec<u8>,
    /// Where each queued append ends in `bytes`: rollover decisions are made per append.
    ends: Vec<usize>,
    /// Whether some caller is writing the queue out now.
    writing: bool,
}

struct FileState {
    file: File,
    size: u64,
    /// Whether the current file holds any line (a header alone never rolls over).
    has_lines: bool,
}

/// Queued text beyond which callers wait for the write under way.
const MAX_QUEUED_BYTES: usize = 4 * 1024 * 1024;

struct ReleaseOnPanic<'a>(&'a Mutex<Queue>);

impl Drop for ReleaseOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).writing = false;
        }
    }
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
            queue: Mutex::new(Queue::default()),
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

    /// Appends `text` (one or more whole lines, line breaks included). When another caller is
    /// writing at the moment, that caller writes `text` too and this one returns at once;
    /// an error writing is returned to the caller that was writing.
    pub fn append(&self, text: &str) -> io::Result<()> {
        let mut batch = {
            // A poisoned lock only means another writer panicked mid-call; the queue is whole
            // (it changes only by complete pushes and swaps).
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.bytes.extend_from_slice(text.as_bytes());
            let end = queue.bytes.len();
            queue.ends.push(end);
            if queue.writing {
                let backlog = queue.bytes.len();
                drop(queue);
                if backlog > MAX_QUEUED_BYTES {
                    // The disk is slower than the callers: wait for the write under way, so
                    // a stalled disk holds callers back instead of filling memory.
                    drop(self.state.lock().unwrap_or_else(|p| p.into_inner()));
                }
                return Ok(());
            }
            queue.writing = true;
            Queue::default()
        };
        // Should a write panic (a rollover hook, say), the next caller must be able to write.
        let _release = ReleaseOnPanic(&self.queue);
        let mut outcome = Ok(());
        loop {
            {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                batch.bytes.clear();
                batch.ends.clear();
                std::mem::swap(&mut queue.bytes, &mut batch.bytes);
                std::mem::swap(&mut queue.ends, &mut batch.ends);
                if batch.ends.is_empty() {
                    queue.writing = false;
                    // The emptied buffers go back, so a steady writer allocates nothing.
                    if queue.bytes.capacity() < batch.bytes.capacity() {
                        std::mem::swap(&mut queue.bytes, &mut batch.bytes);
                        std::mem::swap(&mut queue.ends, &mut batch.ends);
                    }
                    return outcome;
                }
            }
            if let Err(e) = self.write_batch(&batch) {
                outcome = Err(e);
            }
        }
    }

    /// Writes queued appends in as few writes as the rollover rule allows.
    fn write_batch(&self, batch: &Queue) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut start = 0;
        // Appends from `start` up to `until` go in the next write.
        let mut until = 0;
        let mut size = state.size;
        for &end in &batch.ends {
            let len = (end - until) as u64;
            let has_lines = state.has_lines || until > start;
            if has_lines && size + len > self.max_bytes {
                state.file.write_all(&batch.bytes[start..until])?;
                state.has_lines |= until > start;
                self.roll_over(&mut state)?;
                start = until;
                size = state.size;
            }
            size += len;
            until = end;
        }
        state.file.write_all(&batch.bytes[start..until])?;
        state.size = size;
        state.has_lines |= until > start;
        Ok(())
    }

    fn roll_over(&self, state: &mut FileState) -> io::Result<()> {
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
        state.has_lines = false;
        if let Some(header) = &self.header {
            let text = header();
            state.file.write_all(text.as_bytes())?;
            state.size = text.len() as u64;
        }
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

    /// One queued batch that holds several files' worth of appends rolls over between appends,
    /// as many times as it needs, and writes each append once.
    #[test]
    fn a_batch_rolls_over_between_its_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let rolled = std::sync::Arc::new(Mutex::new(Vec::new()));
        let keep = rolled.clone();
        let file = RollingFile::open(&path, 100)
            .unwrap()
            .with_rollover_hook(move |p| {
                keep.lock()
                    .unwrap()
                    .push(std::fs::read_to_string(p).unwrap())
            });
        let mut batch = Queue::default();
        let mut expected = String::new();
        for n in 0..40 {
            // 3 to 60 bytes: some appends share a file, one per file near the limit.
            let text = format!("{n:02}{}\r\n", "y".repeat(n * 7 % 57));
            expected.push_str(&text);
            batch.bytes.extend_from_slice(text.as_bytes());
            batch.ends.push(batch.bytes.len());
        }
        file.write_batch(&batch).unwrap();
        let mut files = rolled.lock().unwrap().clone();
        files.push(std::fs::read_to_string(&path).unwrap());
        assert!(files.len() > 10, "{} files", files.len());
        for text in &files {
            assert!(text.len() <= 100 && !text.is_empty(), "{text:?}");
        }
        assert_eq!(files.concat(), expected);
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
}
