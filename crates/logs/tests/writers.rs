//! The writers: CMTrace and W3C line shapes pinned byte for byte, and rollover under
//! concurrent writers losing or tearing no line.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use logs::cmtrace::{Line, Severity};
use logs::rolling::RollingFile;
use logs::w3c::{W3cEntry, W3cLog, FIELDS};
use logs::Logger;

#[test]
fn cmtrace_golden_lines() {
    let at = time::macros::datetime!(2026-11-24 14:03:07.123 UTC);
    let cases = [
        (
            Severity::Info,
            "Maintaining connections...",
            "<![LOG[Maintaining connections...]LOG]!><time=\"14:03:07.123+000\" date=\"11-24-2026\" component=\"SMS_CLOUD_PROXYCONNECTOR\" context=\"\" type=\"1\" thread=\"7\" file=\"\">",
        ),
        (
            Severity::Warning,
            "Filtered cert count with client auth: 0",
            "<![LOG[Filtered cert count with client auth: 0]LOG]!><time=\"14:03:07.123+000\" date=\"11-24-2026\" component=\"SMS_CLOUD_PROXYCONNECTOR\" context=\"\" type=\"2\" thread=\"7\" file=\"\">",
        ),
        (
            Severity::Error,
            // A message is one line: outside text in it cannot start a record (issue 14).
            "first line\r\nsecond line",
            "<![LOG[first line\\r\\nsecond line]LOG]!><time=\"14:03:07.123+000\" date=\"11-24-2026\" component=\"SMS_CLOUD_PROXYCONNECTOR\" context=\"\" type=\"3\" thread=\"7\" file=\"\">",
        ),
    ];
    for (severity, message, expected) in cases {
        let line = Line {
            message,
            component: "SMS_CLOUD_PROXYCONNECTOR",
            severity,
            thread: 7,
            at,
        };
        assert_eq!(line.format(), expected);
    }
    // Another zone: the offset is minutes, signed, three digits; local date and time.
    let east = Line {
        message: "m",
        component: "C",
        severity: Severity::Info,
        thread: 1,
        at: time::macros::datetime!(2026-12-31 23:59:59.999 +08:00),
    };
    assert!(east
        .format()
        .contains("time=\"23:59:59.999+480\" date=\"12-31-2026\""));
}

#[test]
fn w3c_golden_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u_ex261124.log");
    let log = W3cLog::open(&path).unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    log.write(&W3cEntry {
        at: time::macros::datetime!(2026-11-24 14:03:07 UTC),
        server_ip: ip("10.0.0.5"),
        method: "GET",
        uri_stem: "/SMS_MP/.sms_aut",
        uri_query: Some("SITESIGNCERT"),
        server_port: 443,
        username: None,
        client_ip: ip("10.0.0.9"),
        user_agent: Some("SMS CCM 5.0"),
        referer: None,
        status: 403,
        substatus: 7,
        win32_status: 0,
        bytes_sent: 5573,
        time_taken_ms: 11,
    })
    .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.split("\r\n").collect();
    assert_eq!(lines[0], "#Software: Portcullis reference management point");
    assert_eq!(lines[1], "#Version: 1.0");
    assert!(lines[2].starts_with("#Date: 20"), "{}", lines[2]);
    assert_eq!(lines[3], format!("#Fields: {FIELDS}"));
    assert_eq!(
        lines[4],
        "2026-11-24 14:03:07 10.0.0.5 GET /SMS_MP/.sms_aut SITESIGNCERT 443 - 10.0.0.9 SMS+CCM+5.0 - 403 7 0 5573 11"
    );
    // Every field is one space-separated word, as many as #Fields names.
    assert_eq!(lines[4].split(' ').count(), FIELDS.split(' ').count());
    assert_eq!(lines[5], "");
    assert_eq!(lines.len(), 6);
}

#[test]
fn w3c_rollover_repeats_the_directives() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u_ex.log");
    let log = W3cLog::open_with_limit(&path, 600).unwrap();
    let ip = "127.0.0.1".parse::<IpAddr>().unwrap();
    for n in 0..20u64 {
        log.write(&W3cEntry {
            at: time::OffsetDateTime::now_utc(),
            server_ip: ip,
            method: "GET",
            uri_stem: "/SMS_MP/.sms_aut",
            uri_query: Some("MPLIST"),
            server_port: 443,
            username: None,
            client_ip: ip,
            user_agent: None,
            referer: None,
            status: 200,
            substatus: 0,
            win32_status: 0,
            bytes_sent: n,
            time_taken_ms: 1,
        })
        .unwrap();
    }
    for file in [path.clone(), path.with_extension("lo_")] {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("#Software:"), "{}", file.display());
        assert!(text.contains("#Fields: "), "{}", file.display());
    }
}

/// Many tasks write numbered lines through one logger while the file rolls over again and
/// again, half of them left to the writer thread and half written by their callers; every rolled file is copied away by the rollover hook before it can be replaced, so
/// each line must be found exactly once, and whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_across_rollovers_lose_and_tear_nothing() {
    const TASKS: usize = 16;
    const LINES: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("SMS_Cloud_ProxyConnector.log");
    let archive = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let keep = archive.clone();
    let file = RollingFile::open(&path, 16 * 1024)
        .unwrap()
        .with_rollover_hook(move |rolled| {
            keep.lock()
                .unwrap()
                .push(std::fs::read_to_string(rolled).unwrap());
        });
    let log = Logger::new("SMS_CLOUD_PROXYCONNECTOR")
        .with_rolling_file(file)
        .into_log();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..LINES {
                let message = format!("task {t} line {n} {}", "x".repeat(n % 50));
                // Informational lines go through the writer thread, warnings are written by
                // their callers: both paths share the queue and the rollovers.
                if t % 2 == 0 {
                    log.info(&message);
                } else {
                    log.warn(&message);
                }
                if n % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    log.flush();
    let rolled = archive.lock().unwrap().clone();
    assert!(rolled.len() >= 5, "only {} rollovers", rolled.len());
    for text in &rolled {
        assert!(text.len() <= 16 * 1024, "a rolled file passed the limit");
    }
    let mut all = rolled.concat();
    all.push_str(&std::fs::read_to_string(&path).unwrap());
    let mut seen = HashSet::new();
    for record in all.split_terminator("\r\n") {
        assert!(
            record.starts_with("<![LOG[task ") && record.ends_with("file=\"\">"),
            "torn line: {record:?}"
        );
        let message = &record[6..record.find("]LOG]!>").unwrap()];
        assert!(seen.insert(message.to_string()), "twice: {message}");
    }
    assert_eq!(seen.len(), TASKS * LINES);
}

/// A tmpfs of `size` mounted at a directory of its own, unmounted when dropped. `None` where
/// mounting is not allowed (the tests that need one run as root, as CI does).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Tmpfs { dir })
    }

    /// A 64 KiB disk, or `None`, said on standard error, where mounting is not allowed.
    fn small_disk() -> Option<Tmpfs> {
        let disk = Tmpfs::mount("64k");
        if disk.is_none() {
            eprintln!("SKIPPED: mounting a tmpfs needs root (CI runs as root)");
        }
        disk
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the file system `dir` is on: writes until the disk refuses.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut filler = std::fs::File::create(path).unwrap();
    let block = [0u8; 4096];
    loop {
        match filler.write(&block) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A disk that fills: the lines that cannot be written are held (up to the hold limit) and
/// written, in order, the line cut short completed, once there is room again; those beyond
/// the limit are counted and the count is written where they were lost.
#[test]
fn a_full_disk_loses_no_held_line_and_counts_the_lost_ones() {
    let Some(disk) = Tmpfs::small_disk() else {
        return;
    };
    let path = disk.path().join("connector.log");
    let file = RollingFile::open(&path, 10 * 1024 * 1024)
        .unwrap()
        .with_hold_limit(2000)
        .with_gap_line(|lost, why| format!("GAP {lost} ({why})\n"));
    file.append("start\n").unwrap();
    // The log's page has room left for some 80 lines; the rest of the disk is taken.
    fill(&disk.path().join("filler"));
    let line = |n: usize| format!("line {n:04} {}\n", "x".repeat(39));
    assert_eq!(line(1).len(), 50);
    let mut refused = 0;
    for n in 1..=200 {
        if file.append(&line(n)).is_err() {
            refused += 1;
        }
    }
    assert!(refused > 0, "the disk never filled");
    std::fs::remove_file(disk.path().join("filler")).unwrap();
    // Refused (lines before it were lost) but its write goes through, with the held lines.
    assert!(file.append("after\n").is_err());
    file.append("final\n").unwrap();
    // The running total (portcullis_log_lines_lost_total) stays after the gap line is due.
    let counted = file.lines_lost();
    drop(file);

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "start");
    let kept = lines[1..]
        .iter()
        .take_while(|l| l.starts_with("line "))
        .count();
    for (i, l) in lines[1..=kept].iter().enumerate() {
        assert_eq!(format!("{l}\n"), line(i + 1), "line {} of the file", i + 2);
    }
    assert!(
        kept < 200,
        "nothing was lost: the hold limit was never reached"
    );
    let lost = 200 - kept + 1;
    assert_eq!(counted, lost as u64, "lines_lost counts each line lost");
    assert!(
        lines[kept + 1].starts_with(&format!("GAP {lost} (")),
        "{:?}",
        &lines[kept + 1..]
    );
    assert_eq!(lines[kept + 2..], ["final"]);
}

/// The same through a component's logger, whose every-request lines are written by its writer
/// thread: none is lost while the disk is full, and all come out in order once it is not.
#[test]
fn a_loggers_lines_wait_out_a_full_disk() {
    let Some(disk) = Tmpfs::small_disk() else {
        return;
    };
    let path = disk.path().join("SMS_Cloud_ProxyConnector.log");
    let logger = Logger::new("SMS_CLOUD_PROXYCONNECTOR")
        .with_file(&path, 10 * 1024 * 1024)
        .unwrap();
    fill(&disk.path().join("filler"));
    for n in 1..=300 {
        logger.info(&format!("Forwarding proxy message {n:04}"));
    }
    std::thread::sleep(logs::rolling::LINGER * 10);
    std::fs::remove_file(disk.path().join("filler")).unwrap();
    logger.info("Forwarding proxy message 0301");
    drop(logger);
    let text = std::fs::read_to_string(&path).unwrap();
    let numbers: Vec<usize> = text
        .lines()
        .map(|l| {
            let at = l.find("message ").expect("a forwarding line") + "message ".len();
            l[at..at + 4].parse().unwrap()
        })
        .collect();
    assert_eq!(numbers, (1..=301).collect::<Vec<_>>());
}
