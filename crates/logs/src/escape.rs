//! Log messages made safe to write: the one place every writer (CMTrace, W3C, the console in
//! plain and JSON, the logger's function sinks) neutralises what a message holds.
//!
//! **Where outside text ends.** Most messages are sentences of ours with outside text
//! formatted into them: a certificate's subject, a token header's algorithm, a request path,
//! an endpoint's URL or answer, an error from a library that quotes its input. A writer cannot
//! tell which characters came from where, so it treats every message as outside text, whole:
//!
//! - **A message is one line.** Control characters (C0 including CR, LF and TAB; DEL; C1
//!   including NEL), the Unicode line and paragraph separators, the bidirectional overrides
//!   and isolates, and the byte order mark are written as visible escapes: `\r`, `\n`, `\t`,
//!   `\x1b` (other C0 and DEL), `\u{85}`, `\u{2028}` (the rest). The admin still sees what was
//!   sent, and no reader (CMTrace, Notepad, `doctor logs`, a log shipper splitting on any
//!   Unicode line break) sees a line start inside a message.
//! - **A message cannot end its CMTrace record early or open another:** `]LOG]!>` is written
//!   `]LOG]!&gt;` and `<![LOG[` is written `&lt;![LOG[`, in every format, so a message reads
//!   the same from any of them.
//!
//! Portcullis's own messages need no control character: what would be several lines is
//! several messages (the connector's certificate filter trail is written a line per stage). An
//! error quoting a file with line breaks (TOML's errors draw the offending line) reads as `\n`
//! escapes on one line. A backslash is not escaped (Windows paths stay readable), so a message
//! holding a literal `\n` reads like an escaped line break: visible either way, never a break.
//!
//! W3C fields ([`push_field`]) get the same escapes, and a space is written `+` as IIS does,
//! so every line splits into exactly its `#Fields:`.

use std::borrow::Cow;

/// The CMTrace record's start and end markers.
const START: &str = "<![LOG[";
const END: &str = "]LOG]!>";
const START_DEFUSED: &str = "&lt;![LOG[";
const END_DEFUSED: &str = "]LOG]!&gt;";

/// Whether `c` is written as an escape: controls, and what some reader takes for a line break
/// or uses to reorder what the admin sees.
pub fn is_escaped(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}'
        )
}

/// Bytes after which a message may need work: C0 controls, DEL, the UTF-8 lead bytes of
/// U+0080-U+00BF (C1 controls) and of U+2000-U+2FFF and U+F000-U+FFFF (separators,
/// bidirectional controls, the byte order mark), and the first bytes of both markers. Text of
/// none of them (most lines: the connector's two per request) is written as it is.
const fn suspect_bytes() -> [bool; 256] {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[0x7f] = true;
    table[0xc2] = true;
    table[0xe2] = true;
    table[0xef] = true;
    table[b'<' as usize] = true;
    table[b']' as usize] = true;
    table
}

static SUSPECT: [bool; 256] = suspect_bytes();

fn is_plain(text: &str) -> bool {
    !text.bytes().any(|b| SUSPECT[usize::from(b)])
}

/// Appends the escape for `c` (see [`is_escaped`]).
fn push_escape(out: &mut String, c: char) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match c {
        '\r' => out.push_str("\\r"),
        '\n' => out.push_str("\\n"),
        '\t' => out.push_str("\\t"),
        '\0'..='\u{1f}' | '\u{7f}' => {
            let b = c as u8;
            out.push_str("\\x");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        _ => {
            // `\u{85}`, `\u{2028}`: as Rust writes them.
            for e in c.escape_unicode() {
                out.push(e);
            }
        }
    }
}

/// Appends `text` with every character [`is_escaped`] says escaped, and each space as `+`
/// when `plus_for_space`.
fn push_escaped(out: &mut String, text: &str, plus_for_space: bool) {
    let mut from = 0;
    for (at, c) in text.char_indices() {
        let space = plus_for_space && c == ' ';
        if space || is_escaped(c) {
            out.push_str(&text[from..at]);
            if space {
                out.push('+');
            } else {
                push_escape(out, c);
            }
            from = at + c.len_utf8();
        }
    }
    out.push_str(&text[from..]);
}

/// `text` as a log message is written: borrowed when nothing in it needs escaping.
pub fn message(text: &str) -> Cow<'_, str> {
    if is_plain(text) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    out.push_str(text);
    neutralise_from(&mut out, 0);
    // Escapes and defused markers only lengthen: the same length is the same text.
    if out.len() == text.len() {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(out)
    }
}

/// Makes the message appended to `out` from `start` on safe, in place. Writers push a
/// message's parts as they are and call this once: a marker split across parts is caught
/// too, and a plain message costs one scan and no allocation.
pub fn neutralise_from(out: &mut String, start: usize) {
    if is_plain(&out[start..]) {
        return;
    }
    if out[start..].chars().any(is_escaped) {
        let mut escaped = String::with_capacity(out.len() - start + 16);
        push_escaped(&mut escaped, &out[start..], false);
        out.truncate(start);
        out.push_str(&escaped);
    }
    defuse_markers(out, start);
}

/// Rewrites both CMTrace markers in `out[start..]`. Escapes hold no `<`, `]`, `!` or `>`, and
/// neither marker's end begins the other, so one pass after escaping leaves neither.
fn defuse_markers(out: &mut String, start: usize) {
    let text = &out[start..];
    if !text.contains(START) && !text.contains(END) {
        return;
    }
    let defused = text.replace(END, END_DEFUSED).replace(START, START_DEFUSED);
    out.truncate(start);
    out.push_str(&defused);
}

/// Appends a W3C field's value: escaped as a message is, a space as `+` (as IIS writes
/// them), `-` for an empty value.
pub fn push_field(out: &mut String, value: Option<&str>) {
    match value {
        None | Some("") => out.push('-'),
        Some(v) if !v.bytes().any(|b| b == b' ' || SUSPECT[usize::from(b)]) => out.push_str(v),
        Some(v) => push_escaped(out, v, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_markers() {
        assert_eq!(message("plain text, Grüße"), "plain text, Grüße");
        assert!(matches!(message("a <b> [c] € ©"), Cow::Borrowed(_)));
        assert_eq!(
            message("a\r\nb\t\u{1b}\u{7f}\u{0}\u{85}\u{9b}\u{2028}\u{2029}\u{202e}\u{feff}"),
            r"a\r\nb\t\x1b\x7f\x00\u{85}\u{9b}\u{2028}\u{2029}\u{202e}\u{feff}"
        );
        assert_eq!(message("x]LOG]!>y<![LOG[z"), "x]LOG]!&gt;y&lt;![LOG[z");
        // A marker made whole only once a control between its halves is gone stays split.
        assert_eq!(message("]LOG\n]!>"), r"]LOG\n]!>");
        let mut out = String::from("<![LOG[");
        out.push_str("a ]LOG");
        out.push_str("]!> b\r\n");
        neutralise_from(&mut out, 7);
        assert_eq!(out, r"<![LOG[a ]LOG]!&gt; b\r\n");
    }

    #[test]
    fn fields() {
        let field = |v: Option<&str>| {
            let mut out = String::new();
            push_field(&mut out, v);
            out
        };
        assert_eq!(field(None), "-");
        assert_eq!(field(Some("")), "-");
        assert_eq!(field(Some("SMS CCM 5.0")), "SMS+CCM+5.0");
        assert_eq!(field(Some("a\r\nb\u{2028}c")), r"a\r\nb\u{2028}c");
        assert_eq!(field(Some("/SMS_MP/.sms_aut")), "/SMS_MP/.sms_aut");
    }
}
