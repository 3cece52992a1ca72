//! What the binary's test files share: running `portcullis`, reading its output, and
//! `portcullis dev` as a process that is killed when the test ends.
#![allow(dead_code)]

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Output, Stdio};

pub fn portcullis(args: &[&str]) -> Output {
    portcullis_in(Path::new("."), args, &[])
}

pub fn portcullis_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.args(args).current_dir(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("portcullis runs")
}

/// Standard output then standard error, for messages and assertions.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// A child process killed when dropped (also when an assertion fails).
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `portcullis dev --port 0 EXTRA` in `dir` and reads its output up to the "Running"
/// line; the rest is drained so the child never blocks on a full pipe.
pub fn start_dev(dir: &Path, extra: &[&str]) -> (Child, String) {
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["dev", "--port", "0"])
            .args(extra)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .spawn()
            .expect("portcullis dev starts"),
    );
    let mut reader = std::io::BufReader::new(child.0.stdout.take().expect("piped stdout"));
    let mut shown = String::new();
    for _ in 0..200 {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        shown.push_str(&line);
        if line.starts_with("Running; press Ctrl-C") {
            break;
        }
    }
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    (child, shown)
}

/// The command lines under "Try:" in dev's output.
pub fn try_lines(shown: &str) -> Vec<String> {
    shown
        .lines()
        .skip_while(|l| *l != "Try:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| l.trim().to_string())
        .collect()
}
