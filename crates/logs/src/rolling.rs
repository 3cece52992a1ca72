//! The rolling log file every writer appends to: a queue that batches appends into few writes,
//! a writer thread for lines that may wait [`LINGER`], rollover to `.lo_` at a size limit, and
//! what happens while the disk is full (lines held, then a gap line where they were lost).
//! [`crate::cmtrace`] makes the lines; this module only writes them.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// A log file that rolls over at a size limit as Configuration Manager's do: when the next line
/// would take the file past the limit, the file becomes `name.lo_` (replacing the previous
/// one) and a new `name.log` starts. Rollover happens between appends, never inside one, so no
/// line is torn or lost across it.
///
/// Writers never wait on one another's disk writes. Every append is queued under a short lock;
/// whoever then writes takes everything queued (its own lines and those queued meanwhile) in
/// one system call per batch, until the queue is empty.
/// - [`RollingFile::append`] writes before it returns, unless a write is under way, in which
///   case that writer takes the line too and this caller goes on at once.
/// - [`RollingFile::append_soon`] leaves the line to a writer thread that wakes at most every
///   [`LINGER`]: a busy component's per-request lines then cost a copy, not a write each.
///   [`RollingFile::flush`] and dropping the file write whatever is still queued.
pub struct RollingFile {
    inner: Arc<Inner>,
    /// The writer thread behind `append_soon`, started by its first call.
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How long a line given to [`RollingFile::append_soon`] may wait for its write: long enough
/// to gather a busy component's lines into one write, short enough that anyone watching the
/// file sees them at once.
pub const LINGER: Duration = Duration::from_millis(2);

struct Inner {
    path: PathBuf,
    rolled: PathBuf,
    max_bytes: u64,
    /// Written first in every new file (W3C's directives); made when the file starts.
    header: Option<Header>,
    /// Called right after each rollover, with the rolled file's path, before any later line
    /// can roll it away (archiving, tests).
    on_rollover: OnceLock<RolloverHook>,
    /// Makes the line written where lines were lost (how many, and the write error), once
    /// the file can be written again.
    gap_line: OnceLock<GapLine>,
    /// How much text is held while the file cannot be written; lines beyond are lost.
    hold_limit: usize,
    queue: Mutex<Queue>,
    /// Wakes the writer thread when a line is left to it, or when the file is dropped.
    wake: Condvar,
    /// Touched only by the caller that holds `Queue::writing`.
    state: Mutex<FileState>,
}

type Header = Box<dyn Fn() -> String + Send + Sync>;
type RolloverHook = Box<dyn Fn(&Path) + Send + Sync>;
type GapLine = Box<dyn Fn(u64, &str) -> String + Send + Sync>;

#[derive(Default)]
struct Queue {
    /// The queued appends' text, back to back.
    bytes: Vec<u8>,
    /// Where each queued append ends in `bytes`: rollover decisions are made per append.
    ends: Vec<usize>,
    /// Whether some caller is writing the queue out now.
    writing: bool,
    /// Whether the writer thread has been woken for lines and has not taken them yet.
    flush_due: bool,
    /// Set when the file is dropped: the writer thread writes what is left and ends.
    stop: bool,
    /// Why the last write failed, while it has not succeeded since: the queue then holds the
    /// lines not written, to be written when the file can be (a disk that filled, say).
    failure: Option<String>,
    /// Appends refused while the held lines were at the hold limit.
    lost: u64,
    /// Every append lost since the file was opened (`lost` starts again at each gap line):
    /// what `portcullis_log_lines_lost_total` says.
    lost_total: u64,
}

impl Queue {
    /// Queues `text`, unless writes are failing and it does not fit in `hold_limit` (or a
    /// line before it did not: the lost lines stay one run, marked by one gap line): the line
    /// is then counted lost, and false returned.
    fn push(&mut self, text: &str, hold_limit: usize) -> bool {
        if self.failure.is_some() && (self.lost > 0 || self.bytes.len() + text.len() > hold_limit) {
            self.lost += 1;
            self.lost_total += 1;
            return false;
        }
        self.bytes.extend_from_slice(text.as_bytes());
        self.ends.push(self.bytes.len());
        true
    }

    /// Puts back what a failed write left of `batch` (from byte `written` on: the rest of a
    /// line cut short, then whole ones) in front of what was queued meanwhile.
    fn hold_unwritten(&mut self, batch: &Queue, written: usize) {
        let rest = &batch.bytes[written.min(batch.bytes.len())..];
        let first = batch.ends.partition_point(|&end| end <= written);
        let mut bytes = Vec::with_capacity(rest.len() + self.bytes.len());
        bytes.extend_from_slice(rest);
        bytes.extend_from_slice(&self.bytes);
        let mut ends: Vec<usize> = batch.ends[first..].iter().map(|e| e - written).collect();
        ends.extend(self.ends.iter().map(|e| e + rest.len()));
        self.bytes = bytes;
        self.ends = ends;
    }

    /// Puts `text` (whole lines) before everything queued.
    fn push_front(&mut self, text: &str) {
        self.bytes.splice(0..0, text.bytes());
        for end in &mut self.ends {
            *end += text.len();
        }
        self.ends.insert(0, text.len());
    }
}

struct FileState {
    file: File,
    size: u64,
    /// Whether the current file holds any line (a header alone never rolls over).
    has_lines: bool,
}

/// Queued text beyond which callers wait for the write under way.
const MAX_QUEUED_BYTES: usize = 4 * 1024 * 1024;

/// A poisoned lock only means a writer panicked mid-call (a rollover hook, say); the queue
/// changes only by whole pushes and swaps, and the file state stays usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
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
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                rolled: rolled_name(path),
                max_bytes: max_bytes.max(1),
                header,
                on_rollover: OnceLock::new(),
                gap_line: OnceLock::new(),
                hold_limit: MAX_QUEUED_BYTES,
                queue: Mutex::new(Queue::default()),
                wake: Condvar::new(),
                state: Mutex::new(FileState {
                    file,
                    size,
                    has_lines,
                }),
            }),
            flusher: Mutex::new(None),
        })
    }

    /// Calls `hook` with the rolled file's path after each rollover, while no other line can
    /// be written. Only the first hook set counts.
    pub fn with_rollover_hook(self, hook: impl Fn(&Path) + Send + Sync + 'static) -> Self {
        let _ = self.inner.on_rollover.set(Box::new(hook));
        self
    }

    /// Holds at most `bytes` of lines while the file cannot be written (4 MiB unless set; set
    /// right after opening).
    pub fn with_hold_limit(mut self, bytes: usize) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.hold_limit = bytes;
        }
        self
    }

    /// Writes `make(lost, error)` (whole lines) where lines were lost, once the file can be
    /// written again after failing. Only the first one set counts.
    pub fn with_gap_line(self, make: impl Fn(u64, &str) -> String + Send + Sync + 'static) -> Self {
        let _ = self.inner.gap_line.set(Box::new(make));
        self
    }

    /// Appends `text` (one or more whole lines, line breaks included) and writes it, with
    /// anything queued before it, before returning; when another caller is writing at the
    /// moment, that caller writes `text` too and this one returns at once. An error writing is
    /// returned to the caller that was writing.
    ///
    /// While the file cannot be written (a full disk), what was not written is held, up to
    /// 4 MiB, and written with the next line that can be; lines beyond are counted, and the
    /// count is written where they were lost (see [`RollingFile::with_gap_line`]). The failure
    /// and the recovery are told on standard error.
    pub fn append(&self, text: &str) -> io::Result<()> {
        let mut queue = lock(&self.inner.queue);
        // A line refused for want of room still tries the write, which may find room again.
        let held = queue.push(text, self.inner.hold_limit);
        let written = if queue.writing {
            self.inner.hold_back_if_behind(queue);
            Ok(())
        } else {
            self.inner.write_queued(queue)
        };
        if held {
            written
        } else {
            Err(not_written(&self.inner.path))
        }
    }

    /// Appends `text` (whole lines) for the writer thread to write within [`LINGER`], in order
    /// with every other append. For lines written on every request.
    pub fn append_soon(&self, text: &str) {
        let mut queue = lock(&self.inner.queue);
        // Refused or not, the writer is woken: its write may find room again.
        queue.push(text, self.inner.hold_limit);
        if queue.writing || queue.flush_due {
            // A writer under way or already woken takes this line too.
            self.inner.hold_back_if_behind(queue);
            return;
        }
        queue.flush_due = true;
        drop(queue);
        self.start_flusher();
        self.inner.wake.notify_one();
    }

    /// Writes everything queued so far before returning.
    /// Lines lost since the file was opened: appends refused while the disk was full and
    /// the held lines at their limit.
    pub fn lines_lost(&self) -> u64 {
        lock(&self.inner.queue).lost_total
    }

    pub fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn start_flusher(&self) {
        let mut flusher = lock(&self.flusher);
        if flusher.is_none() {
            let inner = self.inner.clone();
            // Without the thread, lines are still written by the next append or flush.
            *flusher = std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || inner.flusher_loop())
                .ok();
        }
    }
}

impl Drop for RollingFile {
    fn drop(&mut self) {
        lock(&self.inner.queue).stop = true;
        self.inner.wake.notify_one();
        match lock(&self.flusher).take() {
            Some(thread) => {
                let _ = thread.join();
            }
            None => {
                let _ = self.inner.flush();
            }
        }
        let queue = lock(&self.inner.queue);
        if let Some(failure) = &queue.failure {
            eprintln!(
                "{}: {} line(s) could not be written before closing ({failure}); {} more were lost",
                self.inner.path.display(),
                queue.ends.len(),
                queue.lost
            );
        }
    }
}

fn not_written(path: &Path) -> io::Error {
    io::Error::other(format!(
        "{} cannot be written and holds as much as it may: a line was lost",
        path.display()
    ))
}

impl Inner {
    /// With the queue past its bound, waits for the write under way: a stalled disk then holds
    /// callers back instead of filling memory.
    fn hold_back_if_behind(&self, queue: MutexGuard<'_, Queue>) {
        let behind = queue.bytes.len() > MAX_QUEUED_BYTES;
        drop(queue);
        if behind {
            drop(lock(&self.state));
        }
    }

    fn flusher_loop(&self) {
        loop {
            let mut queue = lock(&self.queue);
            while !queue.flush_due && !queue.stop {
                queue = self.wake.wait(queue).unwrap_or_else(|p| p.into_inner());
            }
            if queue.stop {
                drop(queue);
                let _ = self.flush();
                return;
            }
            drop(queue);
            // Lines queued meanwhile share the write.
            std::thread::sleep(LINGER);
            let mut queue = lock(&self.queue);
            queue.flush_due = false;
            if queue.writing {
                continue;
            }
            // Nobody waits for these lines; a failed write is the next append's to report.
            let _ = self.write_queued(queue);
        }
    }

    fn flush(&self) -> io::Result<()> {
        loop {
            let queue = lock(&self.queue);
            if !queue.writing {
                if queue.ends.is_empty() {
                    return Ok(());
                }
                return self.write_queued(queue);
            }
            drop(queue);
            // Someone else is writing; wait for that write, then look again.
            drop(lock(&self.state));
            std::thread::yield_now();
        }
    }

    /// Takes `Queue::writing` (the caller saw it free under this lock), writes the queue out
    /// until it is empty, then gives the flag up.
    fn write_queued(&self, mut queue: MutexGuard<'_, Queue>) -> io::Result<()> {
        queue.writing = true;
        drop(queue);
        // Should a write panic (a rollover hook, say), the next caller must be able to write.
        let _release = ReleaseOnPanic(&self.queue);
        let mut batch = Queue::default();
        loop {
            {
                let mut queue = lock(&self.queue);
                if queue.failure.is_some() && !batch.ends.is_empty() {
                    // The batch before this one was written: the file can be written again.
                    self.written_again(&mut queue);
                }
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
                    return Ok(());
                }
            }
            match self.write_batch(&batch) {
                Ok(()) => {}
                Err((written, e)) => {
                    // What was not written goes back, for the next write to try; this one
                    // stops here rather than retrying at once.
                    let mut queue = lock(&self.queue);
                    queue.hold_unwritten(&batch, written);
                    queue.writing = false;
                    if queue.failure.is_none() {
                        eprintln!(
                            "{}: cannot be written ({e}); its lines are held (up to {} KiB) and written when it can be",
                            self.path.display(),
                            self.hold_limit / 1024
                        );
                    }
                    queue.failure = Some(e.to_string());
                    return Err(e);
                }
            }
        }
    }

    /// After writes had been failing, one succeeded: says so, and puts the line that counts
    /// the lines lost first in the queue.
    fn written_again(&self, queue: &mut Queue) {
        let Some(failure) = queue.failure.take() else {
            return;
        };
        let lost = std::mem::take(&mut queue.lost);
        eprintln!(
            "{}: written again after failing ({failure}); {lost} line(s) were lost meanwhile",
            self.path.display()
        );
        if lost > 0 {
            if let Some(make) = self.gap_line.get() {
                let line = make(lost, &failure);
                queue.push_front(&line);
            }
        }
    }

    /// Writes queued appends in as few writes as the rollover rule allows. On failure, says
    /// how many of the batch's bytes were written.
    fn write_batch(&self, batch: &Queue) -> Result<(), (usize, io::Error)> {
        let mut state = lock(&self.state);
        let mut start = 0;
        // Appends from `start` up to `until` go in the next write.
        let mut until = 0;
        let mut size = state.size;
        for &end in &batch.ends {
            let len = (end - until) as u64;
            let has_lines = state.has_lines || until > start;
            if has_lines && size + len > self.max_bytes {
                write_counted(&mut state, &batch.bytes[start..until])
                    .map_err(|(n, e)| (start + n, e))?;
                self.roll_over(&mut state).map_err(|e| (until, e))?;
                start = until;
                size = state.size;
            }
            size += len;
            until = end;
        }
        write_counted(&mut state, &batch.bytes[start..until]).map_err(|(n, e)| (start + n, e))
    }

    fn roll_over(&self, state: &mut FileState) -> io::Result<()> {
        state.file.flush()?;
        std::fs::rename(&self.path, &self.rolled)?;
        if let Some(hook) = self.on_rollover.get() {
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

/// Writes `bytes` whole, keeping the file's size and saying, on failure, how many were written
/// (a disk that fills takes part of a write, then refuses the rest).
fn write_counted(state: &mut FileState, bytes: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < bytes.len() {
        match state.file.write(&bytes[done..]) {
            Ok(0) => return Err((done, io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                done += n;
                state.size += n as u64;
                state.has_lines = true;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

struct ReleaseOnPanic<'a>(&'a Mutex<Queue>);

impl Drop for ReleaseOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            lock(self.0).writing = false;
        }
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
        file.inner.write_batch(&batch).unwrap();
        let mut files = rolled.lock().unwrap().clone();
        files.push(std::fs::read_to_string(&path).unwrap());
        assert!(files.len() > 10, "{} files", files.len());
        for text in &files {
            assert!(text.len() <= 100 && !text.is_empty(), "{text:?}");
        }
        assert_eq!(files.concat(), expected);
    }

    /// Lines left to the writer thread reach the file by themselves, soon, and those still
    /// queued when the file is dropped are written then.
    #[test]
    fn lines_left_to_the_writer_thread_are_written_soon_and_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let file = RollingFile::open(&path, 1 << 20).unwrap();
        file.append_soon("first\r\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&path).unwrap() != "first\r\n" {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        for n in 0..1000 {
            file.append_soon(&format!("{n}\r\n"));
        }
        drop(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1001);
        assert!(text.ends_with("\r\n999\r\n"), "{text}");
    }
}
