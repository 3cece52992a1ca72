//! The token hop (`--token`, `--token-command`, `[probe] token`/`token_command`): where a
//! device presents a token (the site's, or an OpenID Connect provider's) on
//! `CCM_PROXY_SERVERAUTH` instead of a certificate. The token is read locally first (three
//! base64url parts, JSON header and payload) and its deciding claims shown as the token states
//! them, unverified: only the gateway's answer says whether it is good.

use std::time::Duration;

use base64::engine::{general_purpose::GeneralPurpose, DecodePaddingMode, GeneralPurposeConfig};
use base64::Engine;
use time::OffsetDateTime;
use tokio::io::AsyncReadExt;

/// Where the token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The token itself.
    Value(String),
    /// A shell command (`sh -c`) that prints the token on its standard output; run for each
    /// analysis, so a short-lived token is fetched fresh.
    Command(String),
}

impl std::fmt::Debug for TokenSource {
    // The token is a credential: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Value(_) => f.write_str("Value(..)"),
            TokenSource::Command(command) => write!(f, "Command({command:?})"),
        }
    }
}

/// The most a token command may print: a token is a few KiB at most.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;
/// What of a failed token command's standard error is kept for the cause.
const MAX_STDERR_BYTES: usize = 4 * 1024;

impl TokenSource {
    /// The token, trimmed: the value, or what the command printed within `timeout`. The error
    /// says what went wrong in a sentence.
    pub async fn get(&self, timeout: Duration) -> Result<String, String> {
        match self {
            TokenSource::Value(token) => {
                let token = token.trim();
                if token.is_empty() {
                    return Err("the token is empty".into());
                }
                Ok(token.to_string())
            }
            TokenSource::Command(command) => run_command(command, timeout).await,
        }
    }
}

async fn read_capped(
    pipe: Option<impl tokio::io::AsyncRead + Unpin>,
    cap: usize,
) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    if let Some(pipe) = pipe {
        // Dropped at the end: a command printing more than the cap gets a broken pipe.
        pipe.take(cap as u64 + 1).read_to_end(&mut bytes).await?;
    }
    Ok(bytes)
}

async fn run_command(command: &str, timeout: Duration) -> Result<String, String> {
    let shown = logs::escape::message(command).into_owned();
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("the token command `{shown}` cannot start (sh -c): {e}"))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let work = async {
        let (out, err) = tokio::join!(
            read_capped(stdout, MAX_TOKEN_BYTES),
            read_capped(stderr, MAX_STDERR_BYTES)
        );
        (out, err, child.wait().await)
    };
    // On the timeout the future, and with it the child, is dropped: killed (kill_on_drop).
    let Ok((out, err, status)) = tokio::time::timeout(timeout, work).await else {
        return Err(format!(
            "the token command `{shown}` did not finish within {} s (it was stopped)",
            timeout.as_secs_f32()
        ));
    };
    let out = out.map_err(|e| format!("the token command `{shown}`: reading its output: {e}"))?;
    let status = status.map_err(|e| format!("the token command `{shown}`: {e}"))?;
    if out.len() > MAX_TOKEN_BYTES {
        return Err(format!(
            "the token command `{shown}` printed more than {MAX_TOKEN_BYTES} bytes: not a token"
        ));
    }
    let err = err.unwrap_or_default();
    if !status.success() {
        let said = String::from_utf8_lossy(&err);
        let said = said.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let said = if said.is_empty() {
            "nothing on standard error".to_string()
        } else {
            format!("\"{}\"", logs::escape::message(cut(said.trim(), 300)))
        };
        return Err(format!(
            "the token command `{shown}` failed ({status}); it said {said}"
        ));
    }
    let text = String::from_utf8(out)
        .map_err(|_| format!("the token command `{shown}` printed something that is not text"))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "the token command `{shown}` printed nothing on standard output"
        ));
    }
    Ok(token.to_string())
}

/// The token hop: gets the token, reads it locally (a malformed one fails here, naming what
/// is wrong, and is not sent), and sends the real request with it; the gateway's answer
/// decides. What the token states is written to `stated` either way. Gives the token.
pub(crate) async fn token_auth(
    source: &TokenSource,
    timeout: Duration,
    stated: &mut String,
    request: impl FnOnce(&str) -> probe::ProbeOptions,
) -> crate::Checked<String> {
    let token = source.get(timeout).await.map_err(|why| {
        let fix = match source {
            TokenSource::Value(_) => "Give the device's token as the site issued it.",
            TokenSource::Command(_) => "Run the command by hand as the user the analyzer (or the gateway) runs as: it must print the device's token on standard output and exit 0.",
        };
        (why, fix.to_string())
    })?;
    let read = read(&token).map_err(|why| {
        (
            why,
            "Give the token as the site issued it: a JWT is three base64url parts, header.payload.signature (portcullis token issue makes one; check for a cut or quoted copy).".to_string(),
        )
    })?;
    *stated = read.describe(OffsetDateTime::now_utc());
    let report = probe::probe(&request(&token)).await.map_err(|e| {
        (
            e.to_string(),
            "Check the analyzer's configuration.".to_string(),
        )
    })?;
    let accepted = |answer: String| Ok((token.clone(), format!("{answer}; {stated}")));
    match &report.outcome {
        probe::Outcome::Success { status } => accepted(format!(
            "the gateway accepted the token on CCM_PROXY_SERVERAUTH and the request reached the endpoint ({status}, {} bytes)",
            report.body_len
        )),
        probe::Outcome::HttpError { status, text } if text == "CMGService_Invalid_Token" => {
            let (cause, remedy) = crate::refusal_words(*status, text, &report.body);
            Err((cause, remedy))
        }
        // The token passed; what stopped the request is for the next steps to name.
        probe::Outcome::HttpError { status, text } => accepted(format!(
            "the gateway accepted the token on CCM_PROXY_SERVERAUTH; the request was then answered {status} {text}"
        )),
        probe::Outcome::Transport { text, .. } => Err((
            format!("{text}: {}", crate::transport_cause(&report.lines)),
            "Check the gateway's log for this request.".into(),
        )),
    }
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A JWT read without checking anything but its shape: header and payload as JSON objects.
#[derive(Debug, Clone)]
pub struct StatedToken {
    pub header: serde_json::Map<String, serde_json::Value>,
    pub claims: serde_json::Map<String, serde_json::Value>,
}

fn base64url() -> GeneralPurpose {
    GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    )
}

/// Reads `token`'s header and payload, or says what is wrong with its shape: not three
/// parts, a part that is not base64url, a header or payload that is not a JSON object.
pub fn read(token: &str) -> Result<StatedToken, String> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(format!(
            "the token is not a JWT: it has {} part(s) separated by '.', a JWT has three (header.payload.signature)",
            parts.len()
        ));
    }
    let names = ["header (part 1)", "payload (part 2)", "signature (part 3)"];
    let mut decoded = Vec::with_capacity(3);
    for (part, name) in parts.iter().zip(names) {
        if part.is_empty() {
            return Err(format!("the token's {name} is empty"));
        }
        let bytes = base64url()
            .decode(part)
            .map_err(|e| format!("the token's {name} is not base64url: {e}"))?;
        decoded.push(bytes);
    }
    let object = |bytes: &[u8], name: &str| match serde_json::from_slice::<serde_json::Value>(bytes)
    {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(format!("the token's {name} is JSON but not an object")),
        Err(e) => Err(format!("the token's {name} is not JSON: {e}")),
    };
    Ok(StatedToken {
        header: object(&decoded[0], names[0])?,
        claims: object(&decoded[1], names[1])?,
    })
}

impl StatedToken {
    /// The claims that decide the gateway's answer, as the token states them, unverified.
    pub fn describe(&self, now: OffsetDateTime) -> String {
        let text = |value: Option<&serde_json::Value>| match value {
            None | Some(serde_json::Value::Null) => "-".to_string(),
            Some(serde_json::Value::String(s)) => {
                format!("\"{}\"", logs::escape::message(cut(s, 200)))
            }
            Some(other) => logs::escape::message(cut(&other.to_string(), 200)).into_owned(),
        };
        let time = |name: &str| {
            let Some(value) = self.claims.get(name) else {
                return "-".to_string();
            };
            let Some(seconds) = value.as_f64() else {
                return format!("{} (not a number of seconds)", text(Some(value)));
            };
            // Whole seconds; a time off the calendar is shown as the number it is.
            let at = OffsetDateTime::from_unix_timestamp(seconds as i64);
            let Ok(at) = at else {
                return format!("{seconds} (not a date)");
            };
            let left = at - now;
            let span = human(left.whole_seconds().unsigned_abs());
            let relative = if left.is_negative() {
                format!("{span} ago")
            } else {
                format!("in {span}")
            };
            format!("{} ({relative})", pki::filter::date_text(at))
        };
        format!(
            "claims as the token states them, unverified: alg {}, kid {}, iss {}, aud {}, sub {}, tid {}, exp {}, nbf {}",
            text(self.header.get("alg")),
            text(self.header.get("kid")),
            text(self.claims.get("iss")),
            text(self.claims.get("aud")),
            text(self.claims.get("sub")),
            text(self.claims.get("tid")),
            time("exp"),
            time("nbf"),
        )
    }
}

/// A span of seconds in words: "3 d 4 h", "2 h 5 min", "40 s".
fn human(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds % 86_400 / 3600,
        seconds % 3600 / 60,
        seconds % 60,
    );
    if d > 0 {
        format!("{d} d {h} h")
    } else if h > 0 {
        format!("{h} h {m} min")
    } else if m > 0 {
        format!("{m} min {s} s")
    } else {
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(json: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    #[test]
    fn a_malformed_token_is_named_by_what_is_wrong_with_it() {
        let header = encode(r#"{"alg":"ES256","kid":"site-1"}"#);
        let payload = encode(r#"{"iss":"portcullis-site","sub":"DEVICE-001","exp":1}"#);
        let sig = encode("signature");
        let cases = [
            ("just-one-part".to_string(), "it has 1 part(s)"),
            (format!("{header}.{payload}"), "it has 2 part(s)"),
            (format!("{header}.{payload}.{sig}.x"), "it has 4 part(s)"),
            (
                format!("{header}.pay*load.{sig}"),
                "payload (part 2) is not base64url",
            ),
            (format!("{header}..{sig}"), "payload (part 2) is empty"),
            (
                format!("{}.{payload}.{sig}", encode("not json")),
                "header (part 1) is not JSON",
            ),
            (
                format!("{header}.{}.{sig}", encode("[1,2]")),
                "payload (part 2) is JSON but not an object",
            ),
            (
                format!("{header}.{payload}.s%g"),
                "signature (part 3) is not base64url",
            ),
        ];
        for (token, expected) in cases {
            let error = read(&token).unwrap_err();
            assert!(error.contains(expected), "{token}: {error}");
        }
        let stated = read(&format!("{header}.{payload}.{sig}")).unwrap();
        let now = OffsetDateTime::from_unix_timestamp(3601).unwrap();
        let shown = stated.describe(now);
        assert!(shown.contains("alg \"ES256\", kid \"site-1\""), "{shown}");
        assert!(shown.contains("sub \"DEVICE-001\", tid -"), "{shown}");
        assert!(shown.contains("(1 h 0 min ago)"), "{shown}");
        assert!(shown.contains("unverified"), "{shown}");
        // An Entra ID token's shape: an audience list, a tenant, a key id; text from the
        // token escaped like any other outside text.
        let header = encode(r#"{"alg":"RS256","kid":"nOo3ZDrODXEK1jKWhXslHR_KXEg"}"#);
        let payload = encode(
            r#"{"iss":"https://login.microsoftonline.com/t/v2.0","aud":["api://cmg","x"],"tid":"72f988bf","sub":"dev\nice","exp":"soon"}"#,
        );
        let shown = read(&format!("{header}.{payload}.{sig}"))
            .unwrap()
            .describe(now);
        assert!(
            shown.contains("kid \"nOo3ZDrODXEK1jKWhXslHR_KXEg\""),
            "{shown}"
        );
        assert!(shown.contains("aud [\"api://cmg\",\"x\"]"), "{shown}");
        assert!(shown.contains("tid \"72f988bf\""), "{shown}");
        assert!(!shown.contains('\n'), "{shown}");
        assert!(
            shown.contains("exp \"soon\" (not a number of seconds)"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn a_token_command_gives_its_output_trimmed_or_says_why_not() {
        let t = Duration::from_secs(10);
        let get = |c: &str| TokenSource::Command(c.into());
        assert_eq!(get("printf ' a.b.c \\n'").get(t).await.unwrap(), "a.b.c");
        let e = get("true").get(t).await.unwrap_err();
        assert!(e.contains("printed nothing"), "{e}");
        let e = get("echo no key >&2; exit 3").get(t).await.unwrap_err();
        assert!(
            e.contains("exit status: 3") && e.contains("\"no key\""),
            "{e}"
        );
        let e = get("sleep 30")
            .get(Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(e.contains("did not finish within 0.3 s"), "{e}");
        let e = get("head -c 200000 /dev/zero | tr '\\0' a")
            .get(t)
            .await
            .unwrap_err();
        assert!(e.contains("more than 65536 bytes"), "{e}");
        assert_eq!(
            TokenSource::Value(" \n".into()).get(t).await.unwrap_err(),
            "the token is empty"
        );
    }
}
