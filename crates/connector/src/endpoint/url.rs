//! Where one request goes: an endpoint's base URL joined with the device's path and query.

use hyper::Uri;

/// Where one request goes: the endpoint's URL for the call and as text for the log lines.
pub struct EndpointUrl {
    pub uri: Uri,
    pub text: String,
}

/// Joins an endpoint's base URL with the device's path and query. The text is made by
/// appending, not by formatting the URI, which costs every request more.
pub fn endpoint_url(
    base: &Uri,
    path: &str,
    query: Option<&str>,
) -> Result<EndpointUrl, hyper::http::Error> {
    let base_path = base.path().trim_end_matches('/');
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or("");
    let mut text = String::with_capacity(
        scheme.len()
            + authority.len()
            + base_path.len()
            + path.len()
            + 8
            + query.map_or(0, str::len),
    );
    text.push_str(scheme);
    text.push_str("://");
    text.push_str(authority);
    let origin = text.len();
    text.push_str(base_path);
    if !path.starts_with('/') {
        text.push('/');
    }
    text.push_str(path);
    if let Some(query) = query {
        text.push('?');
        text.push_str(query);
    }
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(hyper::http::uri::PathAndQuery::from_maybe_shared(
        bytes::Bytes::copy_from_slice(&text.as_bytes()[origin..]),
    )?);
    Ok(EndpointUrl {
        uri: Uri::from_parts(parts)?,
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_join_without_double_slashes() {
        let base: Uri = "https://InternalMP.contoso.com".parse().unwrap();
        // The text is what the URI says.
        let both = |base: &Uri, path, query| {
            let url = endpoint_url(base, path, query).unwrap();
            assert_eq!(url.uri.to_string(), url.text);
            url.text
        };
        assert_eq!(
            both(&base, "/SMS_MP/.sms_aut", Some("SITESIGNCERT")),
            "https://InternalMP.contoso.com/SMS_MP/.sms_aut?SITESIGNCERT"
        );
        let base: Uri = "https://mp:8443/prefix/".parse().unwrap();
        assert_eq!(both(&base, "/x", None), "https://mp:8443/prefix/x");
        assert_eq!(both(&base, "", None), "https://mp:8443/prefix/");
        assert_eq!(both(&base, "y", Some("")), "https://mp:8443/prefix/y?");
        // A character no URL may hold is refused, not passed on.
        assert!(endpoint_url(&base, "/a b", None).is_err());
    }
}
