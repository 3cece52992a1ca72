//! The comparison as a table and as JSON.

use super::*;

impl CompareReport {
    /// A proxy's CPU per request relative to portcullis's at the same mode and count.
    fn cpu_vs_portcullis(&self, row: &Row) -> Option<f64> {
        if row.system == System::Direct {
            return None;
        }
        self.rows
            .iter()
            .find(|p| {
                p.system == System::Portcullis
                    && p.mode == row.mode
                    && p.connections == row.connections
            })
            .map(|p| p.cpu_us_per_request)
            .filter(|&us| us > 0.0)
            .map(|us| row.cpu_us_per_request / us)
    }

    /// The table, with the skipped and failed systems after it.
    pub fn render_text(&self) -> String {
        let counts: Vec<String> = self.connections.iter().map(|c| c.to_string()).collect();
        let sweep = self.connections.len() > 1;
        let mut out = format!(
            "{} {}{}{}, {}, {:.1} s per run after {:.1} s of warm-up; GET {MP_PATH}\n\
             CPU s, CPU us/req (per request answered) and peak RSS: the system's own processes (the shared management point and the load generator are not counted)\n",
            counts.join(", "),
            if self.fleet {
                "devices, each with a certificate of its own and one kept-alive connection, connected before the clock starts"
            } else {
                "connections of device " 
            },
            if self.fleet { String::new() } else { DEVICE.to_string() },
            if sweep {
                " (a run with each; rows compare with portcullis at the same count)"
            } else {
                ""
            },
            match self.rate {
                Some(rate) => format!("open loop at {rate} req/s in all (latency from each request's due time)"),
                None => "closed loop".to_string(),
            },
            self.duration_s,
            self.warmup_s
        );
        if let Some(threads) = self.threads {
            out.push_str(&format!(
                "{threads} worker thread(s) in every process under test (gateway, connector, nginx, rathole)\n"
            ));
        }
        if self.rounds > 1 {
            out.push_str(&format!(
                "{} rounds, systems in turn: each row is its median round by req/s (the range is every round's); errors are summed\n",
                self.rounds
            ));
        }
        out.push('\n');
        let ranges = self.rounds > 1;
        let header = [
            "system",
            "mode",
            if sweep { "devices" } else { "" },
            "req/s",
            if ranges { "req/s range" } else { "" },
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "CPU s",
            "CPU us/req",
            "peak RSS MiB",
            "errors",
            // At a fixed rate every system answers the same req/s: its cost is what differs.
            if self.rate.is_some() {
                "CPU/req vs portcullis"
            } else {
                "vs portcullis"
            },
        ];
        let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
        for r in &self.rows {
            let proxy = r.system != System::Direct;
            table.push(vec![
                r.system.name().to_string(),
                r.mode.name().to_string(),
                if sweep {
                    r.connections.to_string()
                } else {
                    String::new()
                },
                format!("{:.0}", r.rps),
                if ranges {
                    let low = r.rps_rounds.iter().copied().fold(f64::INFINITY, f64::min);
                    let high = r.rps_rounds.iter().copied().fold(0.0, f64::max);
                    format!("{low:.0}-{high:.0}")
                } else {
                    String::new()
                },
                format!("{:.2}", r.p50_ms),
                format!("{:.2}", r.p99_ms),
                format!("{:.2}", r.p999_ms),
                if proxy {
                    format!("{:.2}", r.cpu_s)
                } else {
                    "-".into()
                },
                if proxy {
                    format!("{:.0}", r.cpu_us_per_request)
                } else {
                    "-".into()
                },
                if proxy {
                    format!("{:.1}", r.peak_rss_mib)
                } else {
                    "-".into()
                },
                r.errors.to_string(),
                if self.rate.is_some() {
                    self.cpu_vs_portcullis(r)
                        .map(|x| format!("{x:.2}x"))
                        .unwrap_or_else(|| "-".into())
                } else {
                    r.vs_portcullis
                        .map(|x| format!("{x:.2}x"))
                        .unwrap_or_else(|| "-".into())
                },
            ]);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| table.iter().map(|row| row[c].len()).max().unwrap_or(0))
            .collect();
        for row in &table {
            let line: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, cell)| {
                    if c < 2 {
                        format!("{cell:<w$}", w = widths[c])
                    } else {
                        format!("{cell:>w$}", w = widths[c])
                    }
                })
                .collect();
            let line: Vec<String> = line.into_iter().filter(|cell| !cell.is_empty()).collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        for r in self.rows.iter().filter(|r| !r.errors_by_kind.is_empty()) {
            out.push_str(&format!(
                "\n{} {} errors:\n",
                r.system.name(),
                r.mode.name()
            ));
            for (kind, n) in &r.errors_by_kind {
                out.push_str(&format!("  {n:>8}  {kind}\n"));
            }
        }
        for s in &self.skipped {
            out.push_str(&format!("\nskipped {}: {}\n", s.system.name(), s.reason));
        }
        for f in &self.failed {
            out.push_str(&format!(
                "\nFAILED {} {}: {}\n",
                f.system.name(),
                f.mode.map(Mode::name).unwrap_or("-"),
                f.reason
            ));
        }
        if let Some(dir) = &self.dir {
            out.push_str(&format!(
                "\nkept: {} (configurations, logs, the lab PKI)\n",
                dir.display()
            ));
        }
        out
    }
}
