//! Bytes to lines: the encoding sniff, a streaming UTF-16 decoder, and a line reader whose
//! buffer never grows past its cap, whatever the file holds.

use std::io::{self, BufRead, Read};

/// How a file's bytes are text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// UTF-8 without a byte order mark; lines that are not UTF-8 are read as Windows-1252.
    Utf8,
    /// UTF-8 with a byte order mark.
    Utf8Bom,
    /// UTF-16 little-endian (with a byte order mark, or recognised by its NUL pattern).
    Utf16Le,
    /// UTF-16 big-endian.
    Utf16Be,
}

impl Encoding {
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Utf8 => "UTF-8",
            Encoding::Utf8Bom => "UTF-8 with BOM",
            Encoding::Utf16Le => "UTF-16LE",
            Encoding::Utf16Be => "UTF-16BE",
        }
    }
}

/// What the first bytes say: the encoding, how many bytes of byte order mark to drop, or why
/// this is not text.
pub(crate) fn sniff_encoding(head: &[u8]) -> Result<(Encoding, usize), String> {
    if head.starts_with(&[0xEF, 0xBB, 0xBF]) {
        return check_text(Encoding::Utf8Bom, &head[3..]).map(|e| (e, 3));
    }
    if head.starts_with(&[0xFF, 0xFE]) {
        return check_text(Encoding::Utf16Le, &head[2..]).map(|e| (e, 2));
    }
    if head.starts_with(&[0xFE, 0xFF]) {
        return check_text(Encoding::Utf16Be, &head[2..]).map(|e| (e, 2));
    }
    // Without a BOM, mostly-ASCII UTF-16 has a NUL in every other byte.
    let pairs = head.len() / 2;
    if pairs >= 2 {
        let even_nul = head
            .iter()
            .step_by(2)
            .take(pairs)
            .filter(|b| **b == 0)
            .count();
        let odd_nul = head
            .iter()
            .skip(1)
            .step_by(2)
            .take(pairs)
            .filter(|b| **b == 0)
            .count();
        if odd_nul * 10 >= pairs * 7 && even_nul * 10 <= pairs {
            return check_text(Encoding::Utf16Le, head).map(|e| (e, 0));
        }
        if even_nul * 10 >= pairs * 7 && odd_nul * 10 <= pairs {
            return check_text(Encoding::Utf16Be, head).map(|e| (e, 0));
        }
    }
    check_text(Encoding::Utf8, head).map(|e| (e, 0))
}

/// Refuses binary data: more than one character in 20 a control character other than tab,
/// line breaks, form feed and escape (NUL padding aside).
fn check_text(encoding: Encoding, body: &[u8]) -> Result<Encoding, String> {
    let (total, bad) = match encoding {
        Encoding::Utf8 | Encoding::Utf8Bom => {
            // Runs of 16 NULs or more are padding (Windows leaves them after a crash), not
            // content; shorter ones count against the file.
            let (mut total, mut bad, mut i) = (0, 0, 0);
            while i < body.len() {
                if body[i] == 0 {
                    let start = i;
                    while i < body.len() && body[i] == 0 {
                        i += 1;
                    }
                    if i - start < 16 {
                        total += i - start;
                        bad += i - start;
                    }
                    continue;
                }
                total += 1;
                if is_binary_char(u32::from(body[i])) {
                    bad += 1;
                }
                i += 1;
            }
            (total, bad)
        }
        Encoding::Utf16Le | Encoding::Utf16Be => {
            let units = body.chunks_exact(2).map(|p| unit(encoding, p[0], p[1]));
            let mut total = 0;
            let mut bad = 0;
            for c in char::decode_utf16(units) {
                total += 1;
                if c.map(|c| is_binary_char(u32::from(c))).unwrap_or(true) {
                    bad += 1;
                }
            }
            (total, bad)
        }
    };
    if bad * 20 > total {
        let what = if matches!(encoding, Encoding::Utf16Le | Encoding::Utf16Be) {
            format!(
                "{bad} of the first {total} characters (read as {}) are control characters or invalid",
                encoding.name()
            )
        } else {
            format!("{bad} of the first {total} bytes are NUL or control bytes")
        };
        return Err(what);
    }
    Ok(encoding)
}

fn is_binary_char(c: u32) -> bool {
    (c < 0x20 && !matches!(c, 0x09 | 0x0A | 0x0C | 0x0D | 0x1B)) || c == 0x7F
}

fn unit(encoding: Encoding, a: u8, b: u8) -> u16 {
    match encoding {
        Encoding::Utf16Be => u16::from_be_bytes([a, b]),
        _ => u16::from_le_bytes([a, b]),
    }
}

/// Decodes text of the sniffed head (for format detection), lossily.
pub(crate) fn decode_head(encoding: Encoding, body: &[u8]) -> String {
    match encoding {
        Encoding::Utf8 | Encoding::Utf8Bom => String::from_utf8_lossy(body).into_owned(),
        Encoding::Utf16Le | Encoding::Utf16Be => {
            let units = body.chunks_exact(2).map(|p| unit(encoding, p[0], p[1]));
            char::decode_utf16(units)
                .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                .collect()
        }
    }
}

/// UTF-16 in, UTF-8 out, a chunk at a time. Unpaired surrogates become U+FFFD; a surrogate
/// pair split across reads is kept whole.
pub(crate) struct Utf16ToUtf8<R> {
    inner: R,
    big_endian: bool,
    /// An odd byte left from the last read.
    odd: Option<u8>,
    /// A high surrogate waiting for its partner.
    high: Option<u16>,
    out: Vec<u8>,
    pos: usize,
    eof: bool,
}

impl<R: Read> Utf16ToUtf8<R> {
    pub(crate) fn new(inner: R, big_endian: bool) -> Self {
        Utf16ToUtf8 {
            inner,
            big_endian,
            odd: None,
            high: None,
            out: Vec::with_capacity(16 * 1024),
            pos: 0,
            eof: false,
        }
    }

    fn refill(&mut self) -> io::Result<()> {
        let mut raw = [0u8; 8 * 1024];
        self.out.clear();
        self.pos = 0;
        while self.out.is_empty() && !self.eof {
            let mut start = 0;
            if let Some(b) = self.odd.take() {
                raw[0] = b;
                start = 1;
            }
            let n = loop {
                match self.inner.read(&mut raw[start..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            let len = start + n;
            if n == 0 {
                self.eof = true;
                if len == 1 || self.high.is_some() {
                    // A lone byte or a high surrogate at the end of the file.
                    self.high = None;
                    push_char(&mut self.out, char::REPLACEMENT_CHARACTER);
                }
                break;
            }
            let whole = len - len % 2;
            if len % 2 == 1 {
                self.odd = Some(raw[len - 1]);
            }
            for pair in raw[..whole].chunks_exact(2) {
                let u = if self.big_endian {
                    u16::from_be_bytes([pair[0], pair[1]])
                } else {
                    u16::from_le_bytes([pair[0], pair[1]])
                };
                self.unit(u);
            }
        }
        Ok(())
    }

    fn unit(&mut self, u: u16) {
        match (self.high.take(), u) {
            (Some(high), 0xDC00..=0xDFFF) => {
                let c = 0x10000 + ((u32::from(high) - 0xD800) << 10) + (u32::from(u) - 0xDC00);
                push_char(
                    &mut self.out,
                    char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER),
                );
            }
            (high, 0xD800..=0xDBFF) => {
                if high.is_some() {
                    push_char(&mut self.out, char::REPLACEMENT_CHARACTER);
                }
                self.high = Some(u);
            }
            (high, _) => {
                if high.is_some() {
                    push_char(&mut self.out, char::REPLACEMENT_CHARACTER);
                }
                push_char(
                    &mut self.out,
                    char::from_u32(u32::from(u)).unwrap_or(char::REPLACEMENT_CHARACTER),
                );
            }
        }
    }
}

fn push_char(out: &mut Vec<u8>, c: char) {
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

impl<R: Read> Read for Utf16ToUtf8<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.out.len() {
            self.refill()?;
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// One physical line as the line reader returns it.
pub(crate) enum RawLine<'a> {
    /// The line's text, without its line break (`\n` or `\r\n`).
    Text(&'a str),
    /// The line was longer than the cap; its bytes were read and dropped.
    Overlong,
}

/// Splits a byte stream into lines, holding at most `cap` bytes of one line: the rest of a
/// longer line is read and dropped, so a multi-gigabyte file of one line costs `cap` bytes.
pub(crate) struct LineReader<R> {
    inner: R,
    cap: usize,
    buf: Vec<u8>,
    text: String,
    number: u64,
}

impl<R: BufRead> LineReader<R> {
    pub(crate) fn new(inner: R, cap: usize) -> Self {
        LineReader {
            inner,
            cap,
            buf: Vec::new(),
            text: String::new(),
            number: 0,
        }
    }

    /// The next line and its 1-based number, or `None` at the end.
    pub(crate) fn next_line(&mut self) -> io::Result<Option<(u64, RawLine<'_>)>> {
        self.buf.clear();
        let mut overlong = false;
        let mut any = false;
        loop {
            let available = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                if !any {
                    return Ok(None);
                }
                break;
            }
            any = true;
            let (chunk, used, done) = match available.iter().position(|b| *b == b'\n') {
                Some(i) => (&available[..i], i + 1, true),
                None => (available, available.len(), false),
            };
            if !overlong {
                if self.buf.len() + chunk.len() > self.cap {
                    overlong = true;
                    self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            self.inner.consume(used);
            if done {
                break;
            }
        }
        self.number += 1;
        if overlong {
            return Ok(Some((self.number, RawLine::Overlong)));
        }
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        self.text.clear();
        match std::str::from_utf8(&self.buf) {
            Ok(s) => self.text.push_str(s),
            Err(_) => windows_1252(&self.buf, &mut self.text),
        }
        if self.text.contains('\0') {
            // Windows pads some logs with NULs after a crash.
            self.text.retain(|c| c != '\0');
        }
        Ok(Some((self.number, RawLine::Text(&self.text))))
    }
}

/// Windows-1252 to text: what a line that is not UTF-8 most likely is on Windows.
pub(crate) fn windows_1252(bytes: &[u8], out: &mut String) {
    const HIGH: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8D}', 'Ž',
        '\u{8F}', '\u{90}', '‘', '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9D}',
        'ž', 'Ÿ',
    ];
    out.reserve(bytes.len());
    for &b in bytes {
        let c = match b {
            0x80..=0x9F => HIGH[usize::from(b - 0x80)],
            _ => char::from(b),
        };
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs() {
        assert_eq!(sniff_encoding(b"hello\r\n").unwrap(), (Encoding::Utf8, 0));
        assert_eq!(
            sniff_encoding(b"\xEF\xBB\xBFhello").unwrap(),
            (Encoding::Utf8Bom, 3)
        );
        assert_eq!(
            sniff_encoding(b"\xFF\xFEh\0i\0").unwrap(),
            (Encoding::Utf16Le, 2)
        );
        assert_eq!(
            sniff_encoding(b"h\0e\0l\0l\0").unwrap(),
            (Encoding::Utf16Le, 0)
        );
        assert_eq!(
            sniff_encoding(b"\0h\0e\0l\0l").unwrap(),
            (Encoding::Utf16Be, 0)
        );
        assert!(sniff_encoding(b"\0\0\0\0\x01\x02\x03abc").is_err());
    }

    #[test]
    fn utf16_pairs_split_across_reads() {
        // U+1F600 as a surrogate pair, then "a", fed one byte at a time.
        struct OneByte<'a>(&'a [u8]);
        impl Read for OneByte<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() || buf.is_empty() {
                    return Ok(0);
                }
                buf[0] = self.0[0];
                self.0 = &self.0[1..];
                Ok(1)
            }
        }
        let bytes = [0x3D, 0xD8, 0x00, 0xDE, b'a', 0];
        let mut out = String::new();
        Utf16ToUtf8::new(OneByte(&bytes), false)
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "\u{1F600}a");
    }

    #[test]
    fn cp1252() {
        let mut s = String::new();
        windows_1252(b"caf\xE9 \x80", &mut s);
        assert_eq!(s, "café €");
    }
}
