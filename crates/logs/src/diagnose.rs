//! The rules behind `portcullis doctor logs`: records in, known failures out.
//!
//! The rules are data, in `rules.toml` (embedded; [`Rules::builtin`]), checked when loaded:
//! every regex compiles, ids are unique, every `{name}` a text interpolates is a capture some
//! pattern of that rule can make. A rule has:
//!
//! - `id`, `title` (the finding), `cause` and `resolution`;
//! - `match`: matchers, any of which makes a record *evidence* for the rule. A matcher has a
//!   `message` regex, `fields` (W3C field name to a regex the whole value must match, e.g.
//!   `sc-status = "403"`), and/or a `component` regex; all it names must hold;
//! - `supporting`: regexes for lines that explain a finding wherever they appear, in any file
//!   (the connector's certificate filter trail for the 403 it causes); shown only when the
//!   rule fired;
//! - `before` / `after`: regexes for the record right before / after an evidence record in the
//!   same file (the `[CCMHTTP] ERROR: URL=...` line before `StatusText=`), shown as supporting;
//! - `absorbed_by`: ids of (earlier) rules that tell the same failure more precisely. When one
//!   of them fired, this rule's evidence joins the first of them to appear instead of making a
//!   finding of its own.
//!
//! **One record is evidence for at most one rule: the first in table order that matches.** So
//! specific rules come before general ones (403.13/16/17 before any 403). Named capture groups
//! (`(?P<url>...)`) and W3C fields (as `sc_status`, `cs_uri_stem`, `cs_user_agent`...) fill
//! `{url}` or `{url|fallback}` in the title, cause and resolution; the first value seen wins,
//! evidence before context.
//!
//! **Correlation.** The same failure seen from different hops is one finding: the device's
//! `StatusText= CMGConnector_Clientcertificaterequired`, the connector's `Received response
//! ... 403 CMGConnector_Clientcertificaterequired` and the endpoint's IIS `403 7` line are all
//! evidence for `connector-client-cert-required`, because IIS's 403.7 *is* what the connector
//! turns into that status text. Where the endpoint names a more precise cause (403.16 for a
//! `CMGConnector_Forbidden`), the precise rule absorbs the general one. Findings are ordered by
//! their first evidence, in the order files were read.
//!
//! **Outside text picks no rule.** Portcullis's own lines quote what devices sent: a refused
//! certificate's subject or token's header in a refusal's reason, a device's path in the
//! connector's `Forwarding proxy message`/`Received response` lines and in the per-request
//! `Message` lines. A status text quoted so is not the line's own, so a rule is chosen on the
//! line with those parts masked ([`own_text`]); its captures still come from the whole line.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::LazyLock;

use regex::{Regex, RegexSet};
use serde::{Deserialize, Serialize};

use crate::parse::{self, ParseError, Record, Stats};

/// The rule table shipped with Portcullis.
pub const BUILTIN_RULES: &str = include_str!("../rules.toml");

/// Evidence lines a finding keeps (all of them are counted).
pub const MAX_EVIDENCE: usize = 50;
/// Supporting lines a finding keeps (distinct texts).
pub const MAX_SUPPORTING: usize = 50;
/// Evidence lines shown per finding in text.
pub const SHOWN_EVIDENCE: usize = 5;
/// Supporting lines shown per finding in text.
pub const SHOWN_SUPPORTING: usize = 12;
/// Characters of a line kept as evidence text.
const MAX_TEXT: usize = 600;
/// Bytes of the previous record kept for `before` context.
const MAX_CONTEXT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("the rule table is not valid TOML: {0}")]
    Toml(String),
    #[error("rule {index} ({id}): {what}")]
    Rule {
        index: usize,
        id: String,
        what: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    rule: Vec<RuleSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    id: String,
    title: String,
    cause: String,
    resolution: String,
    #[serde(rename = "match")]
    matchers: Vec<MatcherSpec>,
    #[serde(default)]
    supporting: Vec<String>,
    #[serde(default)]
    before: Vec<String>,
    #[serde(default)]
    after: Vec<String>,
    #[serde(default)]
    absorbed_by: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatcherSpec {
    message: Option<String>,
    component: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, String>,
}

struct Matcher {
    /// Index into `Rules::message_set` and `Rules::message_regexes`.
    message: Option<usize>,
    component: Option<Regex>,
    fields: Vec<(String, Regex)>,
}

struct Rule {
    id: String,
    title: String,
    cause: String,
    resolution: String,
    matchers: Vec<Matcher>,
    before: Vec<Regex>,
    after: Vec<Regex>,
    absorbed_by: Vec<usize>,
}

/// A validated rule table.
pub struct Rules {
    rules: Vec<Rule>,
    message_set: RegexSet,
    message_regexes: Vec<Regex>,
    /// Supporting patterns of every rule: one set, and which rule each belongs to.
    support_set: RegexSet,
    support_regexes: Vec<(usize, Regex)>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("ids", &self.ids().collect::<Vec<_>>())
            .finish()
    }
}

/// A field name as a capture name: `cs(User-Agent)` is `cs_user_agent`.
fn capture_name(field: &str) -> String {
    let mut out = String::new();
    for c in field.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_matches('_').to_string()
}

/// `{name}` or `{name|fallback}` in a template.
fn placeholders(
    template: &str,
) -> impl Iterator<Item = (std::ops::Range<usize>, &str, Option<&str>)> {
    let mut at = 0;
    std::iter::from_fn(move || loop {
        let open = at + template.get(at..)?.find('{')?;
        let close = template[open..].find('}').map(|c| open + c)?;
        at = open + 1;
        let inner = &template[open + 1..close];
        let (name, fallback) = match inner.split_once('|') {
            Some((n, f)) => (n, Some(f)),
            None => (inner, None),
        };
        if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            at = close + 1;
            return Some((open..close + 1, name, fallback));
        }
    })
}

fn fill(template: &str, captures: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut last = 0;
    for (range, name, fallback) in placeholders(template) {
        out.push_str(&template[last..range.start]);
        match (captures.get(name), fallback) {
            (Some(v), _) => out.push_str(v),
            (None, Some(f)) => out.push_str(f),
            (None, None) => out.push_str(name),
        }
        last = range.end;
    }
    out.push_str(&template[last..]);
    out
}

impl Rules {
    /// The embedded table.
    pub fn builtin() -> Result<Rules, RulesError> {
        Rules::from_toml(BUILTIN_RULES)
    }

    /// A table from TOML text, validated.
    pub fn from_toml(text: &str) -> Result<Rules, RulesError> {
        let table: Table = toml::from_str(text).map_err(|e| RulesError::Toml(e.to_string()))?;
        let mut rules = Vec::new();
        let mut message_patterns = Vec::new();
        let mut message_regexes = Vec::new();
        let mut support_patterns = Vec::new();
        let mut support_regexes = Vec::new();
        let mut seen = HashSet::new();
        let mut names_per_rule: Vec<HashSet<String>> = Vec::new();
        for (index, spec) in table.rule.iter().enumerate() {
            let bad = |what: String| RulesError::Rule {
                index: index + 1,
                id: spec.id.clone(),
                what,
            };
            let regex = |kind: &str, pattern: &str| {
                // A Unicode word boundary sends the regex engine down its slow path on
                // non-ASCII text; the table writes ASCII ones.
                let bare = pattern.replace(r"(?-u:\b)", "").replace(r"(?-u:\B)", "");
                if bare.contains(r"\b") || bare.contains(r"\B") {
                    return Err(bad(format!(
                        "{kind} regex {pattern:?}: write word boundaries as (?-u:\\b), ASCII"
                    )));
                }
                Regex::new(pattern).map_err(|e| bad(format!("{kind} regex {pattern:?}: {e}")))
            };
            if spec.id.is_empty()
                || !spec
                    .id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(bad("the id must be lower-case letters, digits and -".into()));
            }
            if !seen.insert(spec.id.clone()) {
                return Err(bad("the id is used by an earlier rule".into()));
            }
            for (name, text) in [
                ("title", &spec.title),
                ("cause", &spec.cause),
                ("resolution", &spec.resolution),
            ] {
                if text.trim().is_empty() {
                    return Err(bad(format!("{name} is empty")));
                }
            }
            if spec.matchers.is_empty() {
                return Err(bad("no match = [...]: it could never fire".into()));
            }
            let mut names: HashSet<String> = HashSet::new();
            let mut matchers = Vec::new();
            for m in &spec.matchers {
                if m.message.is_none() && m.fields.is_empty() && m.component.is_none() {
                    return Err(bad("a matcher with no message, fields or component".into()));
                }
                let message = match &m.message {
                    Some(p) => {
                        let r = regex("message", p)?;
                        names.extend(r.capture_names().flatten().map(str::to_string));
                        message_patterns.push(p.clone());
                        message_regexes.push(r);
                        Some(message_regexes.len() - 1)
                    }
                    None => None,
                };
                let mut fields = Vec::new();
                for (name, pattern) in &m.fields {
                    let r = regex(&format!("field {name}"), &format!("^(?:{pattern})$"))?;
                    fields.push((name.clone(), r));
                }
                if !m.fields.is_empty() {
                    // W3C records: every field can be interpolated.
                    names.extend(
                        parse::W3C_DEFAULT_FIELDS
                            .split(' ')
                            .chain(m.fields.keys().map(String::as_str))
                            .map(capture_name),
                    );
                }
                matchers.push(Matcher {
                    message,
                    component: m
                        .component
                        .as_deref()
                        .map(|p| regex("component", p))
                        .transpose()?,
                    fields,
                });
            }
            let mut context = |kind: &str, patterns: &[String]| {
                patterns
                    .iter()
                    .map(|p| {
                        let r = regex(kind, p)?;
                        names.extend(r.capture_names().flatten().map(str::to_string));
                        Ok(r)
                    })
                    .collect::<Result<Vec<_>, RulesError>>()
            };
            let before = context("before", &spec.before)?;
            let after = context("after", &spec.after)?;
            for r in context("supporting", &spec.supporting)? {
                support_patterns.push(r.as_str().to_string());
                support_regexes.push((index, r));
            }
            names_per_rule.push(names);
            let mut absorbed_by = Vec::new();
            for id in &spec.absorbed_by {
                match table.rule[..index].iter().position(|r| &r.id == id) {
                    Some(i) => absorbed_by.push(i),
                    None => {
                        return Err(bad(format!(
                            "absorbed_by names {id:?}, which is not an earlier rule"
                        )))
                    }
                }
            }
            rules.push(Rule {
                id: spec.id.clone(),
                title: spec.title.trim().to_string(),
                cause: spec.cause.trim().to_string(),
                resolution: spec.resolution.trim().to_string(),
                matchers,
                before,
                after,
                absorbed_by,
            });
        }
        // Placeholders: captured by the rule, or by a rule absorbed into it.
        for (index, (rule, spec)) in rules.iter().zip(&table.rule).enumerate() {
            let mut names = names_per_rule[index].clone();
            for (other, r) in rules.iter().enumerate() {
                if r.absorbed_by.contains(&index) {
                    names.extend(names_per_rule[other].iter().cloned());
                }
            }
            for (what, text) in [
                ("title", &spec.title),
                ("cause", &spec.cause),
                ("resolution", &spec.resolution),
            ] {
                for (_, name, _) in placeholders(text) {
                    if !names.contains(name) {
                        return Err(RulesError::Rule {
                            index: index + 1,
                            id: rule.id.clone(),
                            what: format!(
                                "the {what} uses {{{name}}}, which no pattern of this rule (or of a rule absorbed into it) captures"
                            ),
                        });
                    }
                }
            }
        }
        let set = |patterns: Vec<String>| {
            RegexSet::new(patterns).map_err(|e| RulesError::Toml(format!("regex set: {e}")))
        };
        Ok(Rules {
            rules,
            message_set: set(message_patterns)?,
            message_regexes,
            support_set: set(support_patterns)?,
            support_regexes,
        })
    }

    /// Rule ids in table order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.id.as_str())
    }

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
        (
            "Refused a request from device ",
            r"^(?P<own>Refused a request from device \S+: \d{3} \S+ \([^)]*\): ).+$",
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
    /// The first [`MAX_EVIDENCE`] evidence lines, in the order read.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_table_loads() {
        let rules = Rules::builtin().unwrap_or_else(|e| panic!("{e}"));
        assert!(rules.ids().count() >= 30);
    }

    #[test]
    fn bad_tables_are_refused_with_the_rule_named() {
        let rule = |extra: &str| {
            format!(
                "[[rule]]\nid = \"x\"\ntitle = \"t\"\ncause = \"c\"\nresolution = \"r\"\n{extra}\n"
            )
        };
        let err = Rules::from_toml(&rule("match = [{ message = '(unclosed' }]")).unwrap_err();
        assert!(
            err.to_string().contains("rule 1 (x): message regex"),
            "{err}"
        );
        let err = Rules::from_toml(&rule(r"match = [{ message = '\bx' }]")).unwrap_err();
        assert!(err.to_string().contains("(?-u:\\b)"), "{err}");
        assert!(Rules::from_toml(&rule(r"match = [{ message = '(?-u:\b)x' }]")).is_ok());
        let err = Rules::from_toml(&rule("match = []")).unwrap_err();
        assert!(err.to_string().contains("never fire"), "{err}");
        let err = Rules::from_toml(&rule("match = [{ message = 'a' }]\nabsorbed_by = ['y']"))
            .unwrap_err();
        assert!(err.to_string().contains("not an earlier rule"), "{err}");
        let err = Rules::from_toml(&rule("match = [{ mesage = 'a' }]")).unwrap_err();
        assert!(err.to_string().contains("mesage"), "{err}");
        let bad_capture = "[[rule]]\nid = \"x\"\ntitle = \"t\"\ncause = \"c {url}\"\nresolution = \"r\"\nmatch = [{ message = 'a' }]\n";
        let err = Rules::from_toml(bad_capture).unwrap_err();
        assert!(err.to_string().contains("{url}"), "{err}");
        let two = format!(
            "{}{}",
            rule("match = [{ message = 'a' }]"),
            rule("match = [{ message = 'a' }]")
        );
        assert!(Rules::from_toml(&two)
            .unwrap_err()
            .to_string()
            .contains("earlier rule"));
    }

    #[test]
    fn templates() {
        let mut caps = BTreeMap::new();
        caps.insert("url".to_string(), "https://mp".to_string());
        assert_eq!(
            fill("at {url} {x|y} {not a name} {", &caps),
            "at https://mp y {not a name} {"
        );
        assert_eq!(capture_name("cs(User-Agent)"), "cs_user_agent");
        assert_eq!(capture_name("sc-substatus"), "sc_substatus");
    }
}
