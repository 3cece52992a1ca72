//! IIS W3C extended log lines, as the management point's IIS writes them. The seed case:
//! `2026-11-24 14:03:07 10.0.0.5 GET /SMS_MP/.sms_aut SITESIGNCERT 443 - 10.0.0.9 SMS+CCM+5.0 - 403 7 0 5573 11`

use std::net::IpAddr;
use std::path::Path;

use crate::rolling::{RollingFile, DEFAULT_MAX_BYTES};

use time::OffsetDateTime;

pub const FIELDS: &str = "date time s-ip cs-method cs-uri-stem cs-uri-query s-port cs-username c-ip cs(User-Agent) cs(Referer) sc-status sc-substatus sc-win32-status sc-bytes time-taken";

/// One request, as logged.
#[derive(Debug, Clone)]
pub struct W3cEntry<'a> {
    pub at: OffsetDateTime,
    pub server_ip: IpAddr,
    pub method: &'a str,
    pub uri_stem: &'a str,
    pub uri_query: Option<&'a str>,
    pub server_port: u16,
    pub username: Option<&'a str>,
    pub client_ip: IpAddr,
    pub user_agent: Option<&'a str>,
    pub referer: Option<&'a str>,
    pub status: u16,
    pub substatus: u16,
    pub win32_status: u32,
    pub bytes_sent: u64,
    pub time_taken_ms: u64,
}

/// IIS writes `-` for an empty field and `+` for a space, so every line splits on spaces;
/// controls are escaped as in every log (see [`crate::escape`]).
fn field(value: Option<&str>) -> String {
    let mut out = String::with_capacity(value.map_or(1, str::len));
    crate::escape::push_field(&mut out, value);
    out
}

impl W3cEntry<'_> {
    pub fn line(&self) -> String {
        let at = self.at.to_offset(time::UtcOffset::UTC);
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} {} {} {} {} {} {} {} {} {} {} {} {} {} {}",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second(),
            self.server_ip,
            field(Some(self.method)),
            field(Some(self.uri_stem)),
            field(self.uri_query),
            self.server_port,
            field(self.username),
            self.client_ip,
            field(self.user_agent),
            field(self.referer),
            self.status,
            self.substatus,
            self.win32_status,
            self.bytes_sent,
            self.time_taken_ms,
        )
    }
}

/// A W3C log file with its directives (`#Software`, `#Version`, `#Date`, `#Fields`) at the top
/// of every file, rolling over to `.lo_` at a size limit. Each line is written whole, so
/// concurrent requests never interleave.
pub struct W3cLog {
    file: RollingFile,
}

impl W3cLog {
    pub fn open(path: &Path) -> std::io::Result<W3cLog> {
        Self::open_with_limit(path, DEFAULT_MAX_BYTES)
    }

    pub fn open_with_limit(path: &Path, max_bytes: u64) -> std::io::Result<W3cLog> {
        let file = RollingFile::open_with_header(path, max_bytes, Some(Box::new(header)))?
            .with_gap_line(|lost, why| {
                let remark = crate::logger::lost_lines(lost, why);
                format!("#Remark: {}\r\n", crate::escape::message(&remark))
            });
        Ok(W3cLog { file })
    }

    pub fn write(&self, entry: &W3cEntry<'_>) -> std::io::Result<()> {
        let mut line = entry.line();
        line.push_str("\r\n");
        self.file.append(&line)
    }
}

/// The directives IIS writes at the top of each log file.
fn header() -> String {
    let now = OffsetDateTime::now_utc();
    format!(
        "#Software: Portcullis reference management point\r\n#Version: 1.0\r\n#Date: {:04}-{:02}-{:02} {:02}:{:02}:{:02}\r\n#Fields: {FIELDS}\r\n",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}
