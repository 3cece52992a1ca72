//! The report: its types (serialized as they are for JSON) and the text `doctor logs` prints.

use serde::Serialize;

/// Evidence lines shown per finding in text.
pub const SHOWN_EVIDENCE: usize = 5;
/// Supporting lines shown per finding in text.
pub const SHOWN_SUPPORTING: usize = 12;

/// One line of a log, where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evidence {
    pub file: String,
    pub line: u64,
    pub text: String,
}

impl std::fmt::Display for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.text)
    }
}

/// A known failure and what shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub id: String,
    pub title: String,
    pub cause: String,
    pub resolution: String,
    /// The first [`MAX_EVIDENCE`](super::MAX_EVIDENCE) evidence lines, in the order read.
    pub evidence: Vec<Evidence>,
    /// Lines that explain it (trail, context), distinct texts, in the order read.
    pub supporting: Vec<Evidence>,
    /// Evidence lines in all.
    pub count: u64,
}

/// A file that was read.
#[derive(Debug, Clone, Serialize)]
pub struct FileSummary {
    pub path: String,
    pub format: &'static str,
    pub encoding: &'static str,
    pub records: u64,
    pub skipped: u64,
    pub skipped_examples: Vec<Skip>,
    #[serde(skip)]
    pub format_described: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skip {
    pub line: u64,
    pub why: String,
}

/// What `doctor logs` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub files: Vec<FileSummary>,
    /// Things the reader passed over (files in a directory that are not text logs, ...).
    pub notes: Vec<String>,
}

impl Report {
    /// Records read in all files.
    pub fn records(&self) -> u64 {
        self.files.iter().map(|f| f.records).sum()
    }

    /// The report as `doctor logs` prints it.
    pub fn render_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let files = self.files.len();
        let _ = writeln!(
            out,
            "Read {files} file{}, {} records:",
            plural(files as u64),
            self.records()
        );
        for f in &self.files {
            let _ = write!(
                out,
                "  {}: {}, {}, {} record{}",
                f.path,
                f.format_described,
                f.encoding,
                f.records,
                plural(f.records)
            );
            if f.skipped > 0 {
                let _ = write!(out, ", {} skipped", f.skipped);
            }
            out.push('\n');
            for s in &f.skipped_examples {
                let _ = writeln!(out, "      skipped line {}: {}", s.line, s.why);
            }
            if f.skipped > f.skipped_examples.len() as u64 {
                let _ = writeln!(
                    out,
                    "      and {} more skipped",
                    f.skipped - f.skipped_examples.len() as u64
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "  note: {n}");
        }
        out.push('\n');
        if self.findings.is_empty() {
            let _ = writeln!(
                out,
                "No known failure found in {} records from {files} file{}.",
                self.records(),
                plural(files as u64)
            );
            return out;
        }
        let n = self.findings.len();
        let _ = writeln!(out, "{n} known failure{} found.", plural(n as u64));
        for (i, f) in self.findings.iter().enumerate() {
            let _ = writeln!(out, "\n[{}] {}  ({})", i + 1, f.title, f.id);
            out.push_str(&wrap("Cause: ", &f.cause));
            let _ = writeln!(out, "    Evidence ({} line{}):", f.count, plural(f.count));
            for e in f.evidence.iter().take(SHOWN_EVIDENCE) {
                let _ = writeln!(out, "      {e}");
            }
            if f.count > SHOWN_EVIDENCE as u64 {
                let _ = writeln!(out, "      and {} more", f.count - SHOWN_EVIDENCE as u64);
            }
            if !f.supporting.is_empty() {
                let _ = writeln!(out, "    Supporting:");
                for e in f.supporting.iter().take(SHOWN_SUPPORTING) {
                    let _ = writeln!(out, "      {e}");
                }
                if f.supporting.len() > SHOWN_SUPPORTING {
                    let _ = writeln!(
                        out,
                        "      and {} more",
                        f.supporting.len() - SHOWN_SUPPORTING
                    );
                }
            }
            out.push_str(&wrap("Resolution: ", &f.resolution));
        }
        out
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `label` and `text` wrapped at 100 columns, indented by four.
fn wrap(label: &str, text: &str) -> String {
    const WIDTH: usize = 100;
    let indent = "    ";
    let mut out = String::new();
    let mut line = format!("{indent}{label}");
    let mut empty = true;
    for word in text.split_whitespace() {
        if !empty && line.chars().count() + 1 + word.chars().count() > WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = format!("{indent}  {word}");
            continue;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    out.push_str(&line);
    out.push('\n');
    out
}
