//! The processes under test: started with their output kept, stopped (with every descendant)
//! when dropped.

use super::*;

/// A child process that is stopped when dropped: SIGTERM, a bounded wait, then SIGKILL for
/// it and for every descendant it had (nginx's workers).
pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) child: Child,
    /// Its standard output and error.
    pub(crate) output: PathBuf,
    /// Other logs worth showing when it fails (nginx's error log).
    pub(crate) logs: Vec<PathBuf>,
}

impl Proc {
    pub(crate) fn spawn(
        name: &str,
        mut command: Command,
        dir: &Path,
        logs: Vec<PathBuf>,
    ) -> Result<Proc, String> {
        let output = dir.join(format!("{}.out", name.replace([' ', '+'], "-")));
        let file =
            File::create(&output).map_err(|e| format!("creating {}: {e}", output.display()))?;
        let err = file
            .try_clone()
            .map_err(|e| format!("creating {}: {e}", output.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err));
        let child = command
            .spawn()
            .map_err(|e| format!("starting {name} ({:?}): {e}", command.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            output,
            logs,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(why)` when it has exited.
    pub(crate) fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited ({status})", self.name)),
            Ok(None) => None,
            Err(e) => Some(format!("{}: {e}", self.name)),
        }
    }

    /// The last lines of its output and logs.
    pub(crate) fn tail(&self) -> String {
        let mut out = String::new();
        for file in std::iter::once(&self.output).chain(&self.logs) {
            let text = tail_of(file, 20);
            if !text.trim().is_empty() {
                out.push_str(&format!(
                    "\n  --- {} ({}) ---\n{}",
                    self.name,
                    file.display(),
                    text.trim_end()
                ));
            }
        }
        out
    }

    /// Sends `signal` to it (SIGSTOP, SIGCONT, SIGHUP), unless it has exited.
    pub(crate) fn signal(&mut self, signal: rustix::process::Signal) {
        if self.exited().is_none() {
            self::signal(self.pid(), signal);
        }
    }

    /// `kill -9`, and waits for it to be gone: no graceful stop, as a crash or an OOM kill.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let family: Vec<(u32, Option<u64>)> = procstat::descendants(&[self.pid()])
            .into_iter()
            .map(|pid| (pid, procstat::start_time(pid)))
            .collect();
        // A stopped process (SIGSTOP) would hold SIGTERM until it ran again.
        signal(self.pid(), rustix::process::Signal::CONT);
        signal(self.pid(), rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for (pid, started) in family {
            // Only the same process: a pid can be reused once its owner is gone.
            if started.is_some() && procstat::start_time(pid) == started {
                signal(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn signal(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// The last `lines` lines of a file (from at most its last 16 KiB).
pub(crate) fn tail_of(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(16 * 1024)))
        .is_err()
    {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
