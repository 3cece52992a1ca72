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
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteError::NotAProxyPath => f.write_str(
                "the path must start with /CCM_PROXY_MUTUALAUTH/<endpoint id>/ or /CCM_PROXY_SERVERAUTH/<endpoint id>/",
            ),
            RouteError::BadEndpointId(seg) => write!(f, "\"{seg}\" is not an endpoint id (a decimal number)"),
            RouteError::DotSegment => f.write_str("the path holds a \".\" or \"..\" segment"),
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
    if path
        .as_bytes()
        .split(|&b| b == b'/')
        .any(|s| s == b"." || s == b"..")
    {
        return Err(RouteError::DotSegment);
    }
    Ok(Route::Proxy {
        auth,
        endpoint,
        path: if path.is_empty() { "/" } else { path },
        query,
        target: tail,
    })
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
}
