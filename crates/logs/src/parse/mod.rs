//! Reading logs back: CMTrace (and the older SMS `$$<` lines), IIS W3C extended, Portcullis
//! console lines (plain and JSON), and any other text line by line.
//!
//! Hostile files included. Reading is streaming: the format and encoding are sniffed from the
//! first 8 KiB (never the file name), and no line or record is held past [`MAX_RECORD`] bytes:
//! a longer one is skipped and counted with the line it began on, so a multi-gigabyte file of
//! one line costs a megabyte. UTF-8 (with or without BOM) and UTF-16 (LE or BE, with BOM, or
//! LE/BE recognised by the NUL in every other byte) are decoded as they stream; a line that is
//! not valid UTF-8 is read as Windows-1252. A file whose first bytes are mostly NUL or control
//! bytes is refused as "not a text log". Nothing here panics on any input.
//!
//! ```no_run
//! let stats = logs::parse::read_path(std::path::Path::new("LocationServices.log"), |record| {
//!     println!("{}: {}", record.line, record.message);
//! })?;
//! println!("{} records, {} skipped", stats.records, stats.skipped);
//! # Ok::<(), logs::parse::ParseError>(())
//! ```

mod cmtrace;
mod console;
mod decode;
mod text;
mod w3c;

use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

pub use crate::cmtrace::Severity;
pub use decode::Encoding;
pub use w3c::DEFAULT_FIELDS as W3C_DEFAULT_FIELDS;

/// The most a record (or one physical line) may hold; longer ones are skipped and counted.
pub const MAX_RECORD: usize = 1024 * 1024;
/// How many bytes the format and encoding are sniffed from.
pub const SNIFF_BYTES: usize = 8 * 1024;
/// How many skipped records are described in [`Stats::skipped_examples`].
pub const MAX_SKIP_EXAMPLES: usize = 5;

/// What a file (or one record in it) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `<![LOG[message]LOG]!><time="..." date="..." component="..." ... type="1" ...>`.
    CmTrace,
    /// Older SMS logs: `message  $$<Component><date time><thread=...>`.
    SmsLegacy,
    /// IIS W3C extended, driven by its `#Fields:` directive.
    W3c,
    /// `2026-11-25T06:30:57.123Z COMPONENT info: message` (or the older `06:30:57.123 ...`).
    Console,
    /// `{"time":...,"component":...,"level":...,"message":...}`, one object a line.
    ConsoleJson,
    /// Any other text, a message a line.
    Text,
    /// A file with no bytes at all (only ever a file's format, never a record's).
    Empty,
}

impl Format {
    /// A stable name, for JSON.
    pub fn name(self) -> &'static str {
        match self {
            Format::CmTrace => "cmtrace",
            Format::SmsLegacy => "sms-legacy",
            Format::W3c => "w3c",
            Format::Console => "console",
            Format::ConsoleJson => "console-json",
            Format::Text => "text",
            Format::Empty => "empty",
        }
    }

    /// As people call it.
    pub fn describe(self) -> &'static str {
        match self {
            Format::CmTrace => "CMTrace",
            Format::SmsLegacy => "SMS log (legacy $$< lines)",
            Format::W3c => "IIS W3C extended",
            Format::Console => "Portcullis console",
            Format::ConsoleJson => "Portcullis console (JSON)",
            Format::Text => "plain text",
            Format::Empty => "empty",
        }
    }
}

/// One log record: a message with what its format says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// 1-based number of the record's first physical line.
    pub line: u64,
    pub format: Format,
    /// As the file writes it: CMTrace `date time` (`11-24-2026 14:03:07.123+000`), W3C
    /// `date time`, the console's timestamp.
    pub time: Option<String>,
    pub component: Option<String>,
    /// CMTrace `type` 0 and 1 are info, 2 warning, 3 error; W3C status 4xx is a warning and
    /// 5xx an error; unknown values are `None`.
    pub severity: Option<Severity>,
    /// The message; lines of a multi-line message joined by `\n`. For W3C, the whole line.
    pub message: String,
    /// W3C: field name (as `#Fields:` spells it) to value. CMTrace: the attributes as written
    /// (`thread`, `file`, `context`, ...). Empty otherwise.
    pub fields: Vec<(String, String)>,
}

impl Record {
    /// A field's value by name, ignoring ASCII case.
    pub fn field(&self, name: &str) -> Option<&str> {
        field_in(&self.fields, name)
    }
}

/// The value of field `name` (without regard to case) among `fields`.
fn field_in<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// What reading a file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub format: Format,
    pub encoding: Encoding,
    pub records: u64,
    pub skipped: u64,
    /// The first [`MAX_SKIP_EXAMPLES`] skipped records: the line each began on, and why.
    pub skipped_examples: Vec<(u64, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("{} is a directory, not a log file", path.display())]
    IsDirectory { path: PathBuf },
    #[error("cannot read {} (after line {line}): {source}", path.display())]
    Read {
        path: PathBuf,
        line: u64,
        source: io::Error,
    },
    #[error("not a text log: {}: {why}", path.display())]
    NotText { path: PathBuf, why: String },
}

/// Reads the file at `path`, calling `on_record` for each record in file order.
pub fn read_path(path: &Path, on_record: impl FnMut(Record)) -> Result<Stats, ParseError> {
    let open = |source| ParseError::Open {
        path: path.to_path_buf(),
        source,
    };
    if std::fs::metadata(path).map_err(open)?.is_dir() {
        return Err(ParseError::IsDirectory {
            path: path.to_path_buf(),
        });
    }
    let file = std::fs::File::open(path).map_err(open)?;
    read_from(file, path, on_record)
}

/// Reads a log from any reader; `name` is only used in errors.
pub fn read_from(
    reader: impl Read,
    name: &Path,
    on_record: impl FnMut(Record),
) -> Result<Stats, ParseError> {
    read_as(None, reader, name, on_record)
}

/// [`read_from`], read as `format` when one is given instead of the format the first bytes
/// tell (the encoding is still sniffed): how the fuzz targets reach each format's parser with
/// any input.
pub fn read_as(
    format: Option<Format>,
    mut reader: impl Read,
    name: &Path,
    mut on_record: impl FnMut(Record),
) -> Result<Stats, ParseError> {
    let read_error = |line, source| ParseError::Read {
        path: name.to_path_buf(),
        line,
        source,
    };
    let mut head = Vec::with_capacity(SNIFF_BYTES);
    (&mut reader)
        .take(SNIFF_BYTES as u64)
        .read_to_end(&mut head)
        .map_err(|e| read_error(0, e))?;
    let (encoding, bom) = decode::sniff_encoding(&head).map_err(|why| ParseError::NotText {
        path: name.to_path_buf(),
        why,
    })?;
    let format = match format {
        Some(format) => format,
        None if head.is_empty() => Format::Empty,
        None => detect(&decode::decode_head(encoding, &head[bom..])),
    };
    let mut stats = Stats {
        format,
        encoding,
        records: 0,
        skipped: 0,
        skipped_examples: Vec::new(),
    };
    let stream = io::Cursor::new(head).chain(reader);
    let mut out = Out {
        on_record: &mut on_record,
        stats: &mut stats,
    };
    let mut parser = parser_for(format);
    let result = match encoding {
        Encoding::Utf8 | Encoding::Utf8Bom => {
            let mut stream = stream;
            // Drop the BOM without a second buffer.
            let mut skip = [0u8; 3];
            stream
                .read_exact(&mut skip[..bom])
                .map_err(|e| read_error(0, e))?;
            feed(
                decode::LineReader::new(BufReader::with_capacity(64 * 1024, stream), MAX_RECORD),
                parser.as_mut(),
                &mut out,
            )
        }
        Encoding::Utf16Le | Encoding::Utf16Be => {
            let mut stream = stream;
            let mut skip = [0u8; 2];
            stream
                .read_exact(&mut skip[..bom])
                .map_err(|e| read_error(0, e))?;
            let utf8 = decode::Utf16ToUtf8::new(stream, encoding == Encoding::Utf16Be);
            feed(
                decode::LineReader::new(BufReader::with_capacity(64 * 1024, utf8), MAX_RECORD),
                parser.as_mut(),
                &mut out,
            )
        }
    };
    result.map_err(|(line, e)| read_error(line, e))?;
    Ok(stats)
}

fn feed<R: io::BufRead>(
    mut lines: decode::LineReader<R>,
    parser: &mut dyn LineParser,
    out: &mut Out<'_>,
) -> Result<(), (u64, io::Error)> {
    let mut last = 0;
    loop {
        match lines.next_line() {
            Ok(Some((n, decode::RawLine::Text(text)))) => {
                last = n;
                parser.line(n, text, out);
            }
            Ok(Some((n, decode::RawLine::Overlong))) => {
                last = n;
                parser.overlong(n, out);
            }
            Ok(None) => break,
            Err(e) => return Err((last, e)),
        }
    }
    parser.finish(out);
    Ok(())
}

/// Where parsers put what they found.
pub(crate) struct Out<'a> {
    on_record: &'a mut dyn FnMut(Record),
    stats: &'a mut Stats,
}

impl Out<'_> {
    pub(crate) fn emit(&mut self, record: Record) {
        self.stats.records += 1;
        (self.on_record)(record);
    }

    pub(crate) fn skip(&mut self, line: u64, why: impl Into<String>) {
        self.stats.skipped += 1;
        if self.stats.skipped_examples.len() < MAX_SKIP_EXAMPLES {
            self.stats.skipped_examples.push((line, why.into()));
        }
    }
}

/// A format's reader: physical lines in, records out.
pub(crate) trait LineParser {
    fn line(&mut self, n: u64, text: &str, out: &mut Out<'_>);
    /// Line `n` was longer than [`MAX_RECORD`] and is gone.
    fn overlong(&mut self, n: u64, out: &mut Out<'_>);
    fn finish(&mut self, out: &mut Out<'_>);
}

fn parser_for(format: Format) -> Box<dyn LineParser> {
    match format {
        Format::CmTrace => Box::new(cmtrace::CmTraceParser::default()),
        Format::W3c => Box::new(w3c::W3cParser::default()),
        Format::Console => Box::new(console::PlainParser::default()),
        Format::ConsoleJson => Box::new(console::JsonParser),
        Format::SmsLegacy | Format::Text | Format::Empty => Box::new(text::TextParser),
    }
}

/// The format of a file from its first few KiB of text.
fn detect(head: &str) -> Format {
    if head.contains(cmtrace::START) {
        return Format::CmTrace;
    }
    let lines = head
        .lines()
        .map(|l| l.trim_start_matches('\u{feff}').trim_end())
        .filter(|l| !l.is_empty())
        .take(20);
    for line in lines {
        if w3c::is_directive(line) || w3c::is_headerless_line(line) {
            return Format::W3c;
        }
        if console::is_plain(line) {
            return Format::Console;
        }
        if console::is_json(line) {
            return Format::ConsoleJson;
        }
        if text::is_legacy(line) {
            return Format::SmsLegacy;
        }
    }
    Format::Text
}

/// Words for a too-long record.
pub(crate) fn too_long() -> String {
    format!("longer than {} KiB", MAX_RECORD / 1024)
}
