//! Records matched to rules: the rule a record is evidence for (chosen on its own text), the
//! supporting and context lines, and, when the records are all read, absorption into findings.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;

use super::render::{Evidence, FileSummary, Finding, Report, Skip};
use super::rules::{capture_name, fill, Rules};
use crate::parse::{self, ParseError, Record, Stats};

/// Evidence lines a finding keeps (all of them are counted).
pub const MAX_EVIDENCE: usize = 50;
/// Supporting lines a finding keeps (distinct texts).
pub const MAX_SUPPORTING: usize = 50;
/// Characters of a line kept as evidence text.
const MAX_TEXT: usize = 600;
/// Bytes of the previous record kept for `before` context.
const MAX_CONTEXT: usize = 64 * 1024;

impl Rules {
    /// The id of the rule `record` is evidence for, if any.
    pub fn rule_for(&self, record: &Record) -> Option<&str> {
        self.classify(record, false)
            .map(|(i, _)| self.rules[i].id.as_str())
    }

    /// The first rule whose matcher holds, with its captures when asked. The rule is chosen
    /// on the record's own text ([`own_text`]); captures come from the whole message when a
    /// pattern of that rule matches it.
    fn classify(&self, record: &Record, want: bool) -> Option<(usize, Vec<(String, String)>)> {
        let own = own_text(&record.message);
        let hits = self.message_set.matches(&own);
        for (index, rule) in self.rules.iter().enumerate() {
            for m in &rule.matchers {
                if let Some(i) = m.message {
                    if !hits.matched(i) {
                        continue;
                    }
                }
                if let Some(c) = &m.component {
                    if !record.component.as_deref().is_some_and(|v| c.is_match(v)) {
                        continue;
                    }
                }
                if !m
                    .fields
                    .iter()
                    .all(|(name, r)| record.field(name).is_some_and(|v| r.is_match(v)))
                {
                    continue;
                }
                let mut captures = Vec::new();
                if want {
                    if let Some(i) = m.message {
                        let whole = match own {
                            Cow::Borrowed(_) => None,
                            // The masked parts hold what the captures quote (a reason).
                            Cow::Owned(_) => rule
                                .matchers
                                .iter()
                                .filter_map(|m| m.message)
                                .find(|&j| self.message_regexes[j].is_match(&record.message)),
                        };
                        match whole {
                            Some(j) => {
                                collect(&self.message_regexes[j], &record.message, &mut captures)
                            }
                            None => collect(&self.message_regexes[i], &own, &mut captures),
                        }
                    }
                    if !m.fields.is_empty() {
                        captures.extend(
                            record
                                .fields
                                .iter()
                                .map(|(n, v)| (capture_name(n), v.clone())),
                        );
                    }
                }
                return Some((index, captures));
            }
        }
        None
    }
}

/// Portcullis's own lines that quote outside text: the prefix a line starts with, and a
/// regex whose groups `own` and `tail` are what is ours (the quote between them, or after
/// `own`, becomes `-`).
static OWN_LINES: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    [
        // The gateway's refusals: the status text is ours, the reason may quote the device.
        // A refused token's check is named by words of ours before the quoted part.
        (
            "Refused ",
            r"^(?P<own>Refused (?:a request|message \S+) from device \S+: 401 CMGService_Invalid_Token \([^)]*\): the device's token was refused: (?:wrong audience|wrong issuer|wrong tenant|expired|not yet valid|unknown key|bad signature|missing claim|mismatched claim|algorithm not allowed): ).+$",
        ),
        (
            "Refused a request from device ",
            r"^(?P<own>Refused a request from device \S+: \d{3} \S+ \([^)]*\): ).+$",
        ),
        // The same since it names the message.
        (
            "Refused message ",
            r"^(?P<own>Refused message \S+ from device \S+: \d{3} \S+ \([^)]*\): ).+$",
        ),
        // The connector's per-request lines: the URL ends with the device's path.
        (
            "Forwarding proxy message ",
            r"^(?P<own>Forwarding proxy message \S+ to URL: )\S+$",
        ),
        (
            "Received response ",
            r"^(?P<own>Received response )\S+(?P<tail> for message \S+: HTTP/1\.1 .*)$",
        ),
        // Verbose per-request lines: the gateway's (method and path) and the connector's (the
        // device certificate's subject).
        (
            "Message ",
            r"^(?P<own>Message \S+: )(?:[A-Z]+ \S+ from device |device ).*$",
        ),
        // The connector's line for a request the gateway withdrew: the URL, as above.
        (
            "Message ",
            r"^(?P<own>Message \S+: the gateway withdrew the request after \d+ ms, before )\S+(?P<tail> answered .*)$",
        ),
    ]
    .into_iter()
    .map(|(prefix, pattern)| (prefix, Regex::new(pattern).expect("a valid literal regex")))
    .collect()
});

/// `message` with the outside text of Portcullis's own line shapes ([`OWN_LINES`]) written
/// as `-`; any other message as it is.
fn own_text(message: &str) -> Cow<'_, str> {
    for (prefix, shape) in OWN_LINES.iter() {
        if !message.starts_with(prefix) {
            continue;
        }
        if let Some(c) = shape.captures(message) {
            let part = |name: &str| c.name(name).map_or("", |m| m.as_str());
            return Cow::Owned(format!("{}-{}", part("own"), part("tail")));
        }
    }
    Cow::Borrowed(message)
}

fn collect(regex: &Regex, text: &str, into: &mut Vec<(String, String)>) {
    if let Some(c) = regex.captures(text) {
        for name in regex.capture_names().flatten() {
            if let Some(m) = c.name(name) {
                into.push((name.to_string(), m.as_str().to_string()));
            }
        }
    }
}

#[derive(Default)]
struct Seen {
    /// Sequence number of the first evidence.
    first: Option<u64>,
    count: u64,
    evidence: Vec<(u64, Evidence)>,
    captures: BTreeMap<String, String>,
    context_captures: BTreeMap<String, String>,
    supporting: Vec<(u64, Evidence)>,
    supporting_texts: HashSet<String>,
}

impl Seen {
    fn support(&mut self, seq: u64, file: &str, line: u64, text: &str) {
        if self.supporting.len() >= MAX_SUPPORTING {
            return;
        }
        let text = shorten(text);
        if self.supporting_texts.insert(text.clone()) {
            self.supporting.push((
                seq,
                Evidence {
                    file: file.to_string(),
                    line,
                    text,
                },
            ));
        }
    }

    fn context_capture(&mut self, name: String, value: String) {
        self.context_captures
            .entry(name)
            .or_insert_with(|| shown(value));
    }
}

/// A captured value as the report shows it: controls escaped, as in [`shorten`].
fn shown(value: String) -> String {
    match crate::escape::message(&value) {
        Cow::Borrowed(_) => value,
        Cow::Owned(escaped) => escaped,
    }
}

/// A line as shown: one line, at most [`MAX_TEXT`] characters, its controls escaped (a log
/// from anywhere must not drive the admin's terminal or start a line of the report).
fn shorten(text: &str) -> String {
    let mut out = String::new();
    for (i, part) in text.split('\n').enumerate() {
        if i > 0 {
            out.push_str(" | ");
        }
        out.push_str(part.trim_end_matches('\r'));
    }
    if let Cow::Owned(escaped) = crate::escape::message(&out) {
        out = escaped;
    }
    if out.chars().count() > MAX_TEXT {
        out = out.chars().take(MAX_TEXT).collect::<String>() + "...";
    }
    out
}

/// The last record of the file being read, for `before`/`after` context.
struct Context {
    file: String,
    previous: Option<(u64, String)>,
    /// Rules whose evidence was the previous record.
    awaiting_after: Vec<usize>,
}

/// Records in, a [`Report`] out.
pub struct Diagnosis<'r> {
    rules: &'r Rules,
    seen: Vec<Seen>,
    files: Vec<FileSummary>,
    notes: Vec<String>,
    seq: u64,
    context: Option<Context>,
}

impl<'r> Diagnosis<'r> {
    pub fn new(rules: &'r Rules) -> Self {
        Diagnosis {
            rules,
            seen: rules.rules.iter().map(|_| Seen::default()).collect(),
            files: Vec::new(),
            notes: Vec::new(),
            seq: 0,
            context: None,
        }
    }

    /// Reads a file and diagnoses its records.
    pub fn read_path(&mut self, path: &Path) -> Result<&FileSummary, ParseError> {
        let name = path.display().to_string();
        let stats = parse::read_path(path, |r| self.record(&name, &r))?;
        Ok(self.file_read(&name, &stats))
    }

    /// Reads a log from a reader; `name` is how evidence names it.
    pub fn read_from(
        &mut self,
        reader: impl std::io::Read,
        name: &str,
    ) -> Result<&FileSummary, ParseError> {
        let stats = parse::read_from(reader, Path::new(name), |r| self.record(name, &r))?;
        Ok(self.file_read(name, &stats))
    }

    /// Notes that a file was read (for callers that feed [`Diagnosis::record`] themselves).
    pub fn file_read(&mut self, name: &str, stats: &Stats) -> &FileSummary {
        self.context = None;
        self.files.push(FileSummary {
            path: name.to_string(),
            format: stats.format.name(),
            format_described: stats.format.describe(),
            encoding: stats.encoding.name(),
            records: stats.records,
            skipped: stats.skipped,
            skipped_examples: stats
                .skipped_examples
                .iter()
                .map(|(line, why)| Skip {
                    line: *line,
                    why: why.clone(),
                })
                .collect(),
        });
        &self.files[self.files.len() - 1]
    }

    /// Something passed over, for the report.
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// One record of `file`, in file order.
    pub fn record(&mut self, file: &str, record: &Record) {
        self.seq += 1;
        let seq = self.seq;
        let rules = self.rules;
        if self.context.as_ref().is_none_or(|c| c.file != file) {
            self.context = Some(Context {
                file: file.to_string(),
                previous: None,
                awaiting_after: Vec::new(),
            });
        }
        let Some(context) = self.context.as_mut() else {
            return;
        };
        // The record after an evidence record.
        for index in std::mem::take(&mut context.awaiting_after) {
            for r in &rules.rules[index].after {
                if r.is_match(&record.message) {
                    let seen = &mut self.seen[index];
                    seen.support(seq, file, record.line, &record.message);
                    let mut caps = Vec::new();
                    collect(r, &record.message, &mut caps);
                    for (n, v) in caps {
                        seen.context_capture(n, v);
                    }
                    break;
                }
            }
        }
        // Supporting lines, for whichever rule fires.
        let hits = rules.support_set.matches(&record.message);
        for i in hits.iter() {
            let (index, r) = &rules.support_regexes[i];
            let seen = &mut self.seen[*index];
            seen.support(seq, file, record.line, &record.message);
            let mut caps = Vec::new();
            collect(r, &record.message, &mut caps);
            for (n, v) in caps {
                seen.context_capture(n, v);
            }
        }
        // Evidence.
        if let Some((index, captures)) = rules.classify(record, true) {
            let rule = &rules.rules[index];
            let seen = &mut self.seen[index];
            seen.first.get_or_insert(seq);
            seen.count += 1;
            if seen.evidence.len() < MAX_EVIDENCE {
                seen.evidence.push((
                    seq,
                    Evidence {
                        file: file.to_string(),
                        line: record.line,
                        text: shorten(&record.message),
                    },
                ));
            }
            for (n, v) in captures {
                seen.captures.entry(n).or_insert_with(|| shown(v));
            }
            if let Some((line, previous)) = &context.previous {
                for r in &rule.before {
                    if r.is_match(previous) {
                        seen.support(seq - 1, file, *line, previous);
                        let mut caps = Vec::new();
                        collect(r, previous, &mut caps);
                        for (n, v) in caps {
                            seen.context_capture(n, v);
                        }
                        break;
                    }
                }
            }
            if !rule.after.is_empty() {
                context.awaiting_after.push(index);
            }
        }
        let mut end = record.message.len().min(MAX_CONTEXT);
        while !record.message.is_char_boundary(end) {
            end -= 1;
        }
        let kept = &record.message[..end];
        match &mut context.previous {
            Some((line, text)) => {
                *line = record.line;
                text.clear();
                text.push_str(kept);
            }
            None => context.previous = Some((record.line, kept.to_string())),
        }
    }

    /// The findings, after absorption, in order of first appearance.
    pub fn finish(mut self) -> Report {
        let rules = self.rules;
        // Later rules into earlier ones, so chains of absorption carry through.
        for index in (0..rules.rules.len()).rev() {
            if self.seen[index].first.is_none() {
                continue;
            }
            let target = rules.rules[index]
                .absorbed_by
                .iter()
                .copied()
                .filter(|a| self.seen[*a].first.is_some())
                .min_by_key(|a| self.seen[*a].first);
            let Some(target) = target else { continue };
            let from = std::mem::take(&mut self.seen[index]);
            let into = &mut self.seen[target];
            // Evidence that the absorbing rule calls supporting (the trail's "client auth: 0"
            // under the 403 it causes) stays with the rest of the trail.
            let explains = |text: &str| {
                rules
                    .support_regexes
                    .iter()
                    .any(|(rule, r)| *rule == target && r.is_match(text))
            };
            let mut moved = 0;
            let unkept = from.count - from.evidence.len() as u64;
            for (seq, e) in from.evidence {
                if explains(&e.text) {
                    into.support(seq, &e.file, e.line, &e.text);
                } else {
                    into.evidence.push((seq, e));
                    moved += 1;
                }
            }
            // Evidence past the kept ones cannot be told apart: counted as evidence.
            into.count += moved + unkept;
            if moved + unkept > 0 {
                into.first = into.first.min(from.first).or(from.first);
            }
            into.evidence.sort_by_key(|(seq, _)| *seq);
            into.evidence.truncate(MAX_EVIDENCE);
            for (n, v) in from.captures {
                into.captures.entry(n).or_insert(v);
            }
            for (n, v) in from.context_captures {
                into.context_captures.entry(n).or_insert(v);
            }
            for (seq, e) in from.supporting {
                into.support(seq, &e.file, e.line, &e.text);
            }
            into.supporting.sort_by_key(|(seq, _)| *seq);
        }
        let mut fired: Vec<(u64, Finding)> = Vec::new();
        for (index, seen) in self.seen.into_iter().enumerate() {
            let Some(first) = seen.first else { continue };
            let rule = &rules.rules[index];
            let mut captures = seen.context_captures;
            captures.extend(seen.captures);
            let shown: HashSet<(String, u64)> = seen
                .evidence
                .iter()
                .map(|(_, e)| (e.file.clone(), e.line))
                .collect();
            let mut supporting: Vec<Evidence> = seen
                .supporting
                .into_iter()
                .map(|(_, e)| e)
                .filter(|e| !shown.contains(&(e.file.clone(), e.line)))
                .collect();
            supporting.dedup();
            fired.push((
                first,
                Finding {
                    id: rule.id.clone(),
                    title: fill(&rule.title, &captures),
                    cause: fill(&rule.cause, &captures),
                    resolution: fill(&rule.resolution, &captures),
                    evidence: seen.evidence.into_iter().map(|(_, e)| e).collect(),
                    supporting,
                    count: seen.count,
                },
            ));
        }
        fired.sort_by_key(|(first, _)| *first);
        Report {
            findings: fired.into_iter().map(|(_, f)| f).collect(),
            files: self.files,
            notes: self.notes,
        }
    }
}
