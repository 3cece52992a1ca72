//! What a process costs, from Linux's `/proc`: CPU seconds (user + system, all threads) and
//! peak resident memory (`VmHWM`), and a process's descendants (nginx's workers).

use std::path::Path;

/// `/proc/<pid>/stat` counts CPU time in clock ticks of `USER_HZ`, which Linux fixes at 100
/// for every architecture's user-space ABI.
const USER_HZ: f64 = 100.0;

/// The fields of `/proc/<pid>/stat` after the command name, which is in parentheses and may
/// itself hold spaces and parentheses (so the last `)` ends it).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

// Field numbers from proc(5), counted from 1 with pid = 1 and comm = 2; `stat_fields` starts
// at field 3 (state).
const PPID: usize = 4 - 3;
const UTIME: usize = 14 - 3;
const STIME: usize = 15 - 3;
const STARTTIME: usize = 22 - 3;

/// User plus system CPU seconds the process has used so far; `None` when it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let fields = stat_fields(pid)?;
    let utime: u64 = fields.get(UTIME)?.parse().ok()?;
    let stime: u64 = fields.get(STIME)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// When the process started (clock ticks after boot): with the pid, names the process even
/// after the pid could have been reused.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(STARTTIME)?.parse().ok()
}

fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(PPID)?.parse().ok()
}

/// Peak resident set size in KiB (`VmHWM` in `/proc/<pid>/status`); `None` when it is gone.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Resident set size now in KiB (`VmRSS`); `None` when it is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Open file descriptors (`/proc/<pid>/fd`); `None` when it is gone.
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// Every process whose parent chain reaches one of `roots` (not the roots themselves).
pub fn descendants(roots: &[u32]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(Path::new("/proc")) else {
        return Vec::new();
    };
    let parents: Vec<(u32, u32)> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, parent_of(pid)?)))
        .collect();
    let mut found: Vec<u32> = Vec::new();
    let mut frontier: Vec<u32> = roots.to_vec();
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid) in &parents {
            if ppid == parent && !found.contains(&pid) && !roots.contains(&pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(peak_rss_kib(me).is_some_and(|k| k > 0));
        assert!(start_time(me).is_some());
        assert!(rss_kib(me).is_some_and(|k| k > 0));
        assert!(open_fds(me).is_some_and(|n| n >= 3));
        assert!(cpu_seconds(u32::MAX).is_none());
    }

    #[test]
    fn finds_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep runs");
        let found = descendants(&[std::process::id()]);
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.contains(&child.id()), "{found:?}");
    }
}
