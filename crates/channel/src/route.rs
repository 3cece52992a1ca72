//! Device paths: `/CCM_PROXY_MUTUALAUTH/<endpoint id>/<path on the endpoint>` and
//! `/CCM_PROXY_SERVERAUTH/...`, plus `ServiceMetadata` under either prefix.

/// How the device must authenticate on this route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// A client certificate chaining to the gateway's trusted roots.
    MutualTls,
    /// A site-issued bearer token.
    Token,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// Answered by the gateway itself.
    ServiceMetadata { auth: Auth },
    /// Forwarded to endpoint `endpoint`: `path` (starting with `/`) and the query, as sent.
    Proxy {
        auth: Auth,
        endpoint: u64,
        path: &'a str,
        query: Option<&'a str>,
        /// What follows the endpoint id, as sent: the path and query to send on, when it
        /// starts with `/` (else it is empty or `?query`, and the path is `/`).
        target: &'a str,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// Not under `/CCM_PROXY_MUTUALAUTH/` or `/CCM_PROXY_SERVERAUTH/`.
    NotAProxyPath,
    /// The segment after the prefix is not a number.
    BadEndpointId(String),
    /// A path segment of `.` or `..`: it would address something other than what it names.
    DotSegment,
    /// A segment of dots written (partly) as `%2e`: a dot segment once the endpoint decodes it.
    EncodedDotSegment,
    /// A `.` or `..` segment followed by `;` parameters (`..;x`): servers that drop path
    /// parameters (Tomcat, Spring) then see a dot segment.
    DotSegmentParameter,
    /// A `\` in the path: IIS and other Windows servers take it for `/`.
    Backslash,
    /// `%2f` in the path: a `/` that only appears once the endpoint decodes it.
    EncodedSlash,
    /// `%5c` in the path: a `\` (on Windows a `/`) once decoded.
    EncodedBackslash,
    /// `%25` followed by two hex digits: an escape that decodes to another escape, which IIS
    /// request filtering refuses (allowDoubleEscaping off, 404.11).
    DoubleEscape,
    /// `%u` and four hex digits: IIS's non-standard escape, which http.sys decodes.
    PercentUEscape,
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteError::NotAProxyPath => f.write_str(
                "the path must start with /CCM_PROXY_MUTUALAUTH/<endpoint id>/ or /CCM_PROXY_SERVERAUTH/<endpoint id>/",
            ),
            RouteError::BadEndpointId(seg) => write!(f, "\"{seg}\" is not an endpoint id (a decimal number)"),
            RouteError::DotSegment => f.write_str("the path holds a \".\" or \"..\" segment"),
            RouteError::EncodedDotSegment => f.write_str(
                "the path holds a \".\" or \"..\" segment written with %2e (an encoded dot segment)",
            ),
            RouteError::DotSegmentParameter => f.write_str(
                "the path holds a \".\" or \"..\" segment with \";\" parameters (\"..;\")",
            ),
            RouteError::Backslash => f.write_str("the path holds a backslash (\\)"),
            RouteError::EncodedSlash => f.write_str("the path holds an encoded slash (%2f)"),
            RouteError::EncodedBackslash => {
                f.write_str("the path holds an encoded backslash (%5c)")
            }
            RouteError::DoubleEscape => f.write_str(
                "the path holds a double escape (%25 followed by two hex digits), refused as IIS does with allowDoubleEscaping off",
            ),
            RouteError::PercentUEscape => {
                f.write_str("the path holds a %u escape (non-standard, decoded by IIS)")
            }
        }
    }
}

pub const MUTUALAUTH: &str = "/CCM_PROXY_MUTUALAUTH/";
pub const SERVERAUTH: &str = "/CCM_PROXY_SERVERAUTH/";

/// Parses a request target (path and query). Prefixes match without regard to case, as IIS
/// does; the rest is passed on exactly as sent.
pub fn parse(path_and_query: &str) -> Result<Route<'_>, RouteError> {
    let (auth, rest) = strip_prefix_ci(path_and_query, MUTUALAUTH)
        .map(|r| (Auth::MutualTls, r))
        .or_else(|| strip_prefix_ci(path_and_query, SERVERAUTH).map(|r| (Auth::Token, r)))
        .ok_or(RouteError::NotAProxyPath)?;
    // Byte searches: the separators are ASCII, and char patterns cost every request more.
    let cut = rest
        .bytes()
        .position(|b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    let (segment, tail) = rest.split_at(cut);
    if segment.eq_ignore_ascii_case("ServiceMetadata") {
        return Ok(Route::ServiceMetadata { auth });
    }
    let endpoint = segment
        .parse::<u64>()
        .ok()
        .filter(|_| !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| RouteError::BadEndpointId(segment.chars().take(40).collect()))?;
    let (path, query) = match tail.bytes().position(|b| b == b'?') {
        Some(i) => (&tail[..i], Some(&tail[i + 1..])),
        None => (tail, None),
    };
    check_path(path.as_bytes())?;
    Ok(Route::Proxy {
        auth,
        endpoint,
        path: if path.is_empty() { "/" } else { path },
        query,
        target: tail,
    })
}

/// Refuses what would let the endpoint see another path than the gateway routed: dot segments
/// (raw, `%2e`-encoded, or hidden by `;` parameters), backslashes and encoded separators,
/// double escapes and `%u` escapes. One pass over the bytes, nothing allocated; the query is
/// not looked at (it is the endpoint's business).
fn check_path(path: &[u8]) -> Result<(), RouteError> {
    // The current segment up to its first `;`: how many dots (raw or encoded) it has, whether
    // it is dots only so far, and whether a dot was encoded.
    let mut dots = 0usize;
    let mut only_dots = true;
    let mut encoded = false;
    // Past a `;` (raw or `%3b`): the rest of the segment is parameters.
    let mut parameters = false;
    let dot_segment = |dots: usize, only_dots: bool| only_dots && (dots == 1 || dots == 2);
    let mut i = 0;
    while i < path.len() {
        let byte = path[i];
        let (byte, step, escaped) = match (byte == b'%').then(|| escape_at(path, i)).flatten() {
            Some(value) => (value, 3, true),
            None => (byte, 1, false),
        };
        match (byte, escaped) {
            (b'/', false) => {
                if !parameters && dot_segment(dots, only_dots) {
                    return Err(if encoded {
                        RouteError::EncodedDotSegment
                    } else {
                        RouteError::DotSegment
                    });
                }
                (dots, only_dots, encoded, parameters) = (0, true, false, false);
            }
            (b'/', true) => return Err(RouteError::EncodedSlash),
            (b'\\', false) => return Err(RouteError::Backslash),
            (b'\\', true) => return Err(RouteError::EncodedBackslash),
            (b'.', _) => {
                dots += 1;
                encoded |= escaped;
            }
            (b';', _) => {
                if !parameters && dot_segment(dots, only_dots) {
                    return Err(if encoded {
                        RouteError::EncodedDotSegment
                    } else {
                        RouteError::DotSegmentParameter
                    });
                }
                parameters = true;
            }
            (b'%', _) => {
                // A `%` once decoded (`%25`, or a `%` that starts no escape): refused when an
                // escape follows it after decoding, as a second decoding would take that.
                if !escaped
                    && matches!(path.get(i + 1), Some(b'u' | b'U'))
                    && (i + 2..i + 6).all(|k| path.get(k).is_some_and(u8::is_ascii_hexdigit))
                {
                    return Err(RouteError::PercentUEscape);
                }
                if hex_digit_at(path, i + step)
                    .and_then(|next| hex_digit_at(path, i + step + next))
                    .is_some()
                {
                    return Err(RouteError::DoubleEscape);
                }
                only_dots = false;
            }
            _ => only_dots = false,
        }
        i += step;
    }
    if !parameters && dot_segment(dots, only_dots) {
        return Err(if encoded {
            RouteError::EncodedDotSegment
        } else {
            RouteError::DotSegment
        });
    }
    Ok(())
}

/// The byte `%XX` at `at` stands for, if it is an escape.
fn escape_at(path: &[u8], at: usize) -> Option<u8> {
    let digits = path.get(at..at + 3)?;
    if digits[0] != b'%' {
        return None;
    }
    let value = |b: u8| char::from(b).to_digit(16);
    Some((value(digits[1])? * 16 + value(digits[2])?) as u8)
}

/// Whether the byte at `at`, once decoded, is a hex digit; if so, how many bytes it took.
fn hex_digit_at(path: &[u8], at: usize) -> Option<usize> {
    match escape_at(path, at) {
        Some(value) => value.is_ascii_hexdigit().then_some(3),
        None => path.get(at)?.is_ascii_hexdigit().then_some(1),
    }
}

fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_path() {
        assert_eq!(
            parse("/CCM_PROXY_MUTUALAUTH/3456/SMS_MP/.sms_aut?SITESIGNCERT"),
            Ok(Route::Proxy {
                auth: Auth::MutualTls,
                endpoint: 3456,
                path: "/SMS_MP/.sms_aut",
                query: Some("SITESIGNCERT"),
                target: "/SMS_MP/.sms_aut?SITESIGNCERT",
            })
        );
        assert_eq!(
            parse("/ccm_proxy_serverauth/72057594037927939/SMS_MP/.sms_aut?MPLIST"),
            Ok(Route::Proxy {
                auth: Auth::Token,
                endpoint: 72057594037927939,
                path: "/SMS_MP/.sms_aut",
                query: Some("MPLIST"),
                target: "/SMS_MP/.sms_aut?MPLIST",
            })
        );
    }

    #[test]
    fn service_metadata_under_both_prefixes() {
        assert_eq!(
            parse("/CCM_PROXY_MUTUALAUTH/ServiceMetadata"),
            Ok(Route::ServiceMetadata {
                auth: Auth::MutualTls
            })
        );
        assert_eq!(
            parse("/CCM_PROXY_SERVERAUTH/ServiceMetadata?x=1"),
            Ok(Route::ServiceMetadata { auth: Auth::Token })
        );
    }

    #[test]
    fn an_endpoint_root_and_its_query() {
        assert!(matches!(
            parse("/CCM_PROXY_MUTUALAUTH/7"),
            Ok(Route::Proxy {
                path: "/",
                query: None,
                target: "",
                ..
            })
        ));
        assert!(matches!(
            parse("/CCM_PROXY_MUTUALAUTH/7?a=b"),
            Ok(Route::Proxy {
                path: "/",
                query: Some("a=b"),
                target: "?a=b",
                ..
            })
        ));
    }

    #[test]
    fn refusals() {
        assert_eq!(
            parse("/SMS_MP/.sms_aut?MPLIST"),
            Err(RouteError::NotAProxyPath)
        );
        assert_eq!(
            parse("/CCM_PROXY_MUTUALAUTH"),
            Err(RouteError::NotAProxyPath)
        );
        assert_eq!(
            parse("/CCM_PROXY_MUTUALAUTH/abc/x"),
            Err(RouteError::BadEndpointId("abc".into()))
        );
        assert_eq!(
            parse("/CCM_PROXY_MUTUALAUTH/+12/x"),
            Err(RouteError::BadEndpointId("+12".into()))
        );
        assert_eq!(
            parse("/CCM_PROXY_MUTUALAUTH//x"),
            Err(RouteError::BadEndpointId("".into()))
        );
        assert_eq!(
            parse("/CCM_PROXY_MUTUALAUTH/99999999999999999999999/x"),
            Err(RouteError::BadEndpointId("99999999999999999999999".into()))
        );
        assert_eq!(
            parse("/CCM_PROXY_MUTUALAUTH/1/a/../b"),
            Err(RouteError::DotSegment)
        );
        // Dots in the query are the endpoint's business; dots inside a name are a name.
        assert!(parse("/CCM_PROXY_MUTUALAUTH/1/a?x=../b").is_ok());
        assert!(parse("/CCM_PROXY_MUTUALAUTH/1/.sms_aut/..x/").is_ok());
        assert_eq!(
            parse("/CCM_PROXY_MUTUALAUTH/1/."),
            Err(RouteError::DotSegment)
        );
    }

    #[test]
    fn encoded_and_hidden_paths_are_refused() {
        let at = |path: &str| parse(&format!("/CCM_PROXY_MUTUALAUTH/1{path}")).map(|_| ());
        let refused = [
            ("/a/%2e%2e/b", RouteError::EncodedDotSegment),
            ("/a/%2E%2e/b", RouteError::EncodedDotSegment),
            ("/a/.%2e/b", RouteError::EncodedDotSegment),
            ("/a/%2e./b", RouteError::EncodedDotSegment),
            ("/a/%2e", RouteError::EncodedDotSegment),
            ("/a/%2e%2e;x/b", RouteError::EncodedDotSegment),
            ("/a/..%2fb", RouteError::EncodedSlash),
            ("/a%2Fb", RouteError::EncodedSlash),
            ("/a/..;/b", RouteError::DotSegmentParameter),
            ("/a/..;jsessionid=1/b", RouteError::DotSegmentParameter),
            ("/a/.;x", RouteError::DotSegmentParameter),
            ("/a/..%3b/b", RouteError::DotSegmentParameter),
            ("/a\\..\\b", RouteError::Backslash),
            ("/a/..%5cb", RouteError::EncodedBackslash),
            ("/a/%5C", RouteError::EncodedBackslash),
            ("/a/%252e%252e/b", RouteError::DoubleEscape),
            ("/a/%25%32%65", RouteError::DoubleEscape),
            ("/a/%%32%65", RouteError::DoubleEscape),
            ("/a/%2%65", RouteError::DoubleEscape),
            ("/a/%u002e%u002e/b", RouteError::PercentUEscape),
            ("/a/%U002F", RouteError::PercentUEscape),
        ];
        for (path, error) in refused {
            assert_eq!(at(path), Err(error.clone()), "{path}");
            assert!(!error.to_string().is_empty());
        }
        // Names with dots or escapes in them, parameters after a name, and anything at all in
        // the query pass on as sent.
        for path in [
            "/SMS_MP/.sms_aut",
            "/a/...",
            "/a/..x/.b/x..",
            "/a/%2e%2e%2e",
            "/a/%2ex",
            "/a/b;..",
            "/a/b;x=%2e%2e",
            "/a/%20b%41",
            "/a/%25",
            "/a/%25zz",
            "/a/100%",
            "/a/%u12",
            "/a?x=%2e%2e/..%2f%5c\\%252e",
        ] {
            assert!(at(path).is_ok(), "{path}: {:?}", at(path));
        }
    }

    /// One percent-decoding of `bytes` (invalid escapes kept as they are).
    fn decode(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match escape_at(bytes, i) {
                Some(value) => {
                    out.push(value);
                    i += 3;
                }
                None => {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
        }
        out
    }

    proptest::proptest! {
        /// Whatever the gateway passes on means, to an endpoint that decodes it once or twice,
        /// the path it routed: no dot segment (before any `;`), no backslash, no slash that was
        /// not there.
        #[test]
        fn a_path_passed_on_decodes_to_no_other_path(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "a", ".", "..", "/", "%", "2", "e", "E", "f", "5", "c", "C", "3", "b", ";",
                    "\\", "u", "0", "%2e", "%2f", "%5c", "%25", "%3b", "%u",
                ]),
                0..12,
            )
        ) {
            let path = format!("/{}", parts.concat());
            if check_path(path.as_bytes()).is_ok() {
                let once = decode(path.as_bytes());
                proptest::prop_assert_eq!(&decode(&once), &once, "{}", path);
                proptest::prop_assert!(!once.contains(&b'\\'), "{}", path);
                proptest::prop_assert_eq!(
                    once.iter().filter(|&&b| b == b'/').count(),
                    path.bytes().filter(|&b| b == b'/').count(),
                    "{}", path
                );
                for segment in once.split(|&b| b == b'/') {
                    let name = segment.split(|&b| b == b';').next().unwrap_or(b"");
                    proptest::prop_assert!(name != b"." && name != b"..", "{}", path);
                }
            }
        }
    }
}
