//! The bench's side of its load generators: starting them with their jobs, telling them
//! what to do, and following their statuses (see [`super::worker`] for the protocol).

use super::*;

/// A load-generator process and the pipe it is told what to do on.
pub(super) struct Generator {
    pub(super) process: Killed,
    pub(super) stdin: Option<ChildStdin>,
}

impl Generator {
    pub(super) fn tell(&mut self, line: &str) -> Result<(), ConnectionsError> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| ConnectionsError::Setup("a load generator's input is closed".into()))?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(|e| ConnectionsError::Setup(format!("telling a load generator: {e}")))
    }
}

/// A progress line from the generators' statuses.
pub(super) type ProgressLine<'a> = dyn Fn(&[Status]) -> String + 'a;

/// The generators' latest statuses, fed by one reader thread each.
pub(super) struct Statuses {
    pub(super) latest: Vec<Status>,
    updates: mpsc::Receiver<(usize, Option<Status>)>,
    ended: Vec<bool>,
}

impl Statuses {
    /// Takes updates until every generator is in `phase` (or past it), printing `line` every
    /// second when shown; bounded by `limit`.
    pub(super) fn wait_all(
        &mut self,
        phase: Phase,
        limit: Duration,
        started: Instant,
        progress: Option<&ProgressLine<'_>>,
    ) -> Result<(), ConnectionsError> {
        let deadline = Instant::now() + limit;
        let mut next_line = Instant::now() + Duration::from_secs(1);
        let terminal = std::io::stderr().is_terminal();
        while self.latest.iter().any(|s| s.phase < phase) {
            if let Some(k) = self.ended.iter().position(|e| *e) {
                return Err(ConnectionsError::Setup(format!(
                    "load generator {} ended before reporting {phase:?} (its errors are above)",
                    k + 1
                )));
            }
            let now = Instant::now();
            if now > deadline {
                return Err(ConnectionsError::Setup(format!(
                    "the load generators did not all reach {phase:?} within {:.0} s",
                    limit.as_secs_f64()
                )));
            }
            if let Some(line) = progress.filter(|_| now >= next_line) {
                let line = format!(
                    "{:>6.1} s  {}",
                    started.elapsed().as_secs_f64(),
                    line(&self.latest)
                );
                if terminal {
                    eprint!("\r{line}   ");
                } else {
                    eprintln!("{line}");
                }
                next_line = now + Duration::from_secs(1);
            }
            match self.updates.recv_timeout(Duration::from_millis(200)) {
                // A progress line written just before the phase changed may come after it.
                Ok((k, Some(status))) if status.phase >= self.latest[k].phase => {
                    self.latest[k] = status
                }
                Ok((_, Some(_))) => {}
                Ok((k, None)) => self.ended[k] = true,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(ConnectionsError::Setup("the load generators ended".into()))
                }
            }
        }
        if progress.is_some() && terminal {
            eprintln!();
        }
        Ok(())
    }
}

pub(super) fn spawn_generators(
    program: &Path,
    jobs: &[Job],
) -> Result<(Vec<Generator>, Statuses), ConnectionsError> {
    let (tx, updates) = mpsc::channel();
    let mut generators = Vec::with_capacity(jobs.len());
    for (k, job) in jobs.iter().enumerate() {
        let mut child = Command::new(program)
            .args(["bench", "connections-worker"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                ConnectionsError::Setup(format!(
                    "starting a load generator {}: {e}",
                    program.display()
                ))
            })?;
        let stdout = child.stdout.take();
        let stdin = child.stdin.take();
        let mut generator = Generator {
            process: Killed(child),
            stdin,
        };
        let line = serde_json::to_string(job)
            .map_err(|e| ConnectionsError::Setup(format!("a load generator's job: {e}")))?;
        generator.tell(&line)?;
        let tx = tx.clone();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(status) = serde_json::from_str::<Status>(&line) {
                        if tx.send((k, Some(status))).is_err() {
                            return;
                        }
                    }
                }
                let _ = tx.send((k, None));
            });
        }
        generators.push(generator);
    }
    let statuses = Statuses {
        latest: vec![Status::default(); jobs.len()],
        updates,
        ended: vec![false; jobs.len()],
    };
    Ok((generators, statuses))
}
