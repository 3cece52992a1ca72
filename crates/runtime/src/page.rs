//! The status page at `/` on the admin surface: HTML made on the server, no script, no
//! resource from anywhere (styles inline; `Content-Security-Policy: default-src 'none'`), a
//! `<meta http-equiv="refresh">` to keep it current. A component describes what it has
//! ([`Page`]: its facts, its own tables such as channels and endpoints, rates, certificates,
//! refusals) and [`render`] writes it. Every text goes through [`escape`]: a certificate
//! subject, a refusal's reason or anything else from outside never reaches the HTML as markup.

use std::fmt::Write;

use time::OffsetDateTime;

use crate::activity::{explain, Rate, RecentRefusal};
use crate::metrics::{Expiry, Readiness};

/// Seconds between the page's own refreshes.
pub const REFRESH_SECS: u32 = 10;

/// Certificates ending within this many days are marked.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// How a cell reads: plain, good (green), bad (red) or a warning (amber).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tone {
    #[default]
    Plain,
    Good,
    Bad,
    Warn,
}

impl Tone {
    fn class(self) -> &'static str {
        match self {
            Tone::Plain => "",
            Tone::Good => " class=\"good\"",
            Tone::Bad => " class=\"bad\"",
            Tone::Warn => " class=\"warn\"",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Cell {
    pub text: String,
    pub tone: Tone,
}

impl Cell {
    pub fn new(text: impl Into<String>) -> Cell {
        Cell {
            text: text.into(),
            tone: Tone::Plain,
        }
    }

    pub fn toned(text: impl Into<String>, tone: Tone) -> Cell {
        Cell {
            text: text.into(),
            tone,
        }
    }
}

/// A table of the component's own: its channels, its endpoints.
#[derive(Debug, Clone, Default)]
pub struct Section {
    /// The `id` of the table (tests and links find it by this).
    pub id: &'static str,
    pub title: String,
    /// A sentence under the title.
    pub note: String,
    pub head: Vec<&'static str>,
    pub rows: Vec<Vec<Cell>>,
    /// Said instead of an empty table.
    pub empty: String,
}

/// What a component shows on its status page.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// "gateway" or "connector".
    pub component: String,
    /// Short facts, each a name and a value (version, listen address, verbose...).
    pub facts: Vec<(String, String)>,
    pub readiness: Readiness,
    pub sections: Vec<Section>,
    pub rates: Vec<Rate>,
    pub certificates: Vec<Expiry>,
    pub refusals: Vec<RecentRefusal>,
}

/// `text` as HTML text or an attribute value: `&`, `<`, `>`, `"` and `'` escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Controls would be shown as nothing, or break the line: shown as their escape.
            c if c.is_control() && c != '\n' && c != '\t' => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1f23;background:#fff}\
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.6em 0 .3em}\
p.note{margin:.2em 0 .5em;color:#57606a}\
table{border-collapse:collapse;margin:.3em 0;min-width:30em;max-width:100%}\
th,td{border:1px solid #d0d7de;padding:.25em .6em;text-align:left;vertical-align:top}\
th{background:#f6f8fa;white-space:nowrap}td.num{text-align:right}td.when{white-space:nowrap}\
td.long{overflow-wrap:anywhere;min-width:14em}\
.good{color:#116329;font-weight:600}.bad{color:#b42318;font-weight:600}.warn{color:#9a6700;font-weight:600}\
dl{display:grid;grid-template-columns:max-content auto;gap:.1em 1em;margin:.3em 0}dt{color:#57606a}dd{margin:0}\
.why{font-size:.9em;color:#3b4148;max-width:60em}.why b{color:#1b1f23}";

fn cell(out: &mut String, cell: &Cell) {
    let _ = write!(out, "<td{}>{}</td>", cell.tone.class(), escape(&cell.text));
}

fn table(out: &mut String, id: &str, head: &[&str], rows: &[Vec<Cell>]) {
    let _ = write!(out, "<table id=\"{}\"><thead><tr>", escape(id));
    for h in head {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for c in row {
            cell(out, c);
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
}

fn section(out: &mut String, s: &Section) {
    let _ = write!(out, "<h2>{}</h2>", escape(&s.title));
    if !s.note.is_empty() {
        let _ = write!(out, "<p class=\"note\">{}</p>", escape(&s.note));
    }
    if s.rows.is_empty() {
        let _ = write!(
            out,
            "<p id=\"{}\" class=\"warn\">{}</p>",
            escape(s.id),
            escape(&s.empty)
        );
    } else {
        table(out, s.id, &s.head, &s.rows);
    }
}

/// The doctor's cause and fix as a cell's HTML.
fn explanation(status: u16, text: &str) -> String {
    match explain(status, text) {
        Some(e) => format!(
            "<div class=\"why\"><b>{}</b><br><b>Cause:</b> {}<br><b>Fix:</b> {}</div>",
            escape(&e.title),
            escape(e.cause.trim()),
            escape(e.resolution.trim())
        ),
        None => String::new(),
    }
}

/// The page, as of `now`.
pub fn render(page: &Page, now: OffsetDateTime) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let title = format!("Portcullis {}", page.component);
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>{}</title><style>{STYLE}</style></head><body>",
        escape(&title)
    );
    let _ = write!(out, "<h1>{}</h1>", escape(&title));
    let (state, tone) = if page.readiness.is_ready() {
        ("ready", Tone::Good)
    } else {
        ("not ready", Tone::Bad)
    };
    out.push_str("<dl id=\"facts\">");
    let _ = write!(
        out,
        "<dt>readiness</dt><dd id=\"readiness\"{}>{state}</dd>",
        tone.class()
    );
    for missing in &page.readiness.missing {
        let _ = write!(
            out,
            "<dt>missing</dt><dd class=\"bad\">{}</dd>",
            escape(missing)
        );
    }
    for (name, value) in &page.facts {
        let _ = write!(out, "<dt>{}</dt><dd>{}</dd>", escape(name), escape(value));
    }
    let _ = write!(
        out,
        "<dt>shown</dt><dd>{} UTC, refreshed every {REFRESH_SECS} s</dd></dl>",
        escape(&clock(now))
    );
    for s in &page.sections {
        section(&mut out, s);
    }

    out.push_str("<h2>Requests by status text</h2><p class=\"note\">Answers and refusals counted over the last minute, the last five minutes and since start; each refusal with the cause and fix <code>portcullis doctor logs</code> gives.</p>");
    if page.rates.is_empty() {
        out.push_str("<p id=\"rates\" class=\"note\">No request yet.</p>");
    } else {
        out.push_str("<table id=\"rates\"><thead><tr><th>status</th><th>status text</th><th>last minute</th><th>last 5 minutes</th><th>since start</th><th>cause and fix</th></tr></thead><tbody>");
        for r in &page.rates {
            let tone = if r.refusal || r.status >= 500 {
                Tone::Bad
            } else {
                Tone::Plain
            };
            out.push_str("<tr>");
            let _ = write!(out, "<td class=\"num\">{}</td>", r.status);
            cell(&mut out, &Cell::toned(r.text, tone));
            for n in [r.last_minute, r.last_five_minutes, r.since_start] {
                let _ = write!(out, "<td class=\"num\">{n}</td>");
            }
            let why = if r.refusal {
                explanation(r.status, r.text)
            } else {
                String::new()
            };
            let _ = write!(out, "<td>{why}</td></tr>");
        }
        out.push_str("</tbody></table>");
    }

    out.push_str("<h2>Certificates</h2>");
    if page.certificates.is_empty() {
        out.push_str("<p id=\"certificates\" class=\"note\">None loaded.</p>");
    } else {
        let rows: Vec<Vec<Cell>> = page
            .certificates
            .iter()
            .map(|c| {
                let days = c.days_left(now);
                let tone = if days < 0 {
                    Tone::Bad
                } else if days <= EXPIRY_WARNING_DAYS {
                    Tone::Warn
                } else {
                    Tone::Good
                };
                let left = if days < 0 {
                    format!("expired {} days ago", -days)
                } else {
                    format!("{days} days")
                };
                vec![
                    Cell::new(c.role),
                    Cell::new(c.subject.clone()),
                    Cell::new(c.thumbprint.clone()),
                    Cell::new(clock(c.expires)),
                    Cell::toned(left, tone),
                ]
            })
            .collect();
        table(
            &mut out,
            "certificates",
            &["role", "subject", "thumbprint", "ends (UTC)", "left"],
            &rows,
        );
    }

    let _ = write!(
        out,
        "<h2>Last refusals</h2><p class=\"note\">The newest {} refusals, newest first.</p>",
        crate::activity::RECENT_REFUSALS
    );
    if page.refusals.is_empty() {
        out.push_str("<p id=\"refusals\" class=\"note\">None since start.</p>");
    } else {
        out.push_str("<table id=\"refusals\"><thead><tr><th>when (UTC)</th><th>status</th><th>status text</th><th>endpoint</th><th>from</th><th>why</th></tr></thead><tbody>");
        for r in &page.refusals {
            let _ = write!(
                out,
                "<tr><td class=\"when\">{}</td><td class=\"num\">{}</td>",
                escape(&clock(r.at)),
                r.status
            );
            for c in [
                Cell::toned(r.text, Tone::Bad),
                Cell::new(r.endpoint.clone()),
                Cell::new(r.from.clone()),
            ] {
                cell(&mut out, &c);
            }
            let _ = write!(
                out,
                "<td class=\"long\">{}</td></tr><tr><td></td><td colspan=\"5\">{}</td></tr>",
                escape(&r.reason),
                explanation(r.status, r.text)
            );
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</body></html>\n");
    out
}

/// `YYYY-MM-DD HH:MM:SS`.
fn clock(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_text_is_never_markup() {
        assert_eq!(
            escape("<img src=x onerror='alert(1)'> & \"q\""),
            "&lt;img src=x onerror=&#39;alert(1)&#39;&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(escape("a\u{1b}[31mb"), "a\\u{1b}[31mb");
        let page = Page {
            component: "gateway".into(),
            sections: vec![Section {
                id: "channels",
                title: "<b>t</b>".into(),
                head: vec!["x"],
                rows: vec![vec![Cell::new("</td><script>x</script>")]],
                ..Section::default()
            }],
            refusals: vec![RecentRefusal {
                at: OffsetDateTime::now_utc(),
                status: 403,
                text: "CMGService_Untrustedclientcertificate",
                endpoint: "7".into(),
                from: "127.0.0.1:5".into(),
                reason: "issuer CN=<script>alert(1)</script>".into(),
            }],
            ..Page::default()
        };
        let html = render(&page, OffsetDateTime::now_utc());
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<b>t</b>"), "{html}");
        assert!(html.contains("CN=&lt;script&gt;alert(1)&lt;/script&gt;"));
        // The refusal comes with the doctor's explanation.
        assert!(html.contains("Fix:"), "{html}");
    }
}
