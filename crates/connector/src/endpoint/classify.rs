//! What an endpoint's answer means for the device: passed on as it is, or a refusal the
//! connector recognises (a missing or refused client certificate, 401, 5xx).

use channel::refusal::{Cause, Refusal};

/// What the connector makes of an endpoint's answer: `None` passes it to the device as is.
/// `presented` says whether the connector had a client certificate to present.
pub fn classify_endpoint_answer(
    url: &str,
    status: u16,
    iis_substatus: Option<u16>,
    presented: bool,
) -> Option<Refusal> {
    let url = url.to_string();
    let cause = match status {
        403 if !presented || iis_substatus == Some(7) => {
            Cause::EndpointNeedsClientCertificate { url, presented }
        }
        403 => Cause::EndpointForbidden {
            url,
            substatus: iis_substatus,
        },
        401 => Cause::EndpointUnauthorized { url },
        500..=599 => Cause::EndpointFailed { url, status },
        _ => return None,
    };
    Some(Refusal::new(cause))
}

#[cfg(test)]
mod tests {
    use super::*;
    use channel::refusal::Hop;

    const URL: &str = "https://InternalMP.contoso.com/SMS_MP/.sms_aut?SITESIGNCERT";

    #[test]
    fn the_seed_403_without_a_certificate() {
        let r = classify_endpoint_answer(URL, 403, Some(7), false).unwrap();
        assert_eq!(
            (r.status, r.text, r.hop),
            (
                403,
                "CMGConnector_Clientcertificaterequired",
                Hop::ConnectorToEndpoint
            )
        );
        assert!(r.body().starts_with(
            "403 CMGConnector_Clientcertificaterequired\nhop: connector -> endpoint\n"
        ));
        assert!(r.body().contains("portcullis doctor certs"));
        // A bare 403 with no certificate presented is the same story.
        assert_eq!(
            classify_endpoint_answer(URL, 403, None, false)
                .unwrap()
                .text,
            "CMGConnector_Clientcertificaterequired"
        );
    }

    #[test]
    fn other_endpoint_answers() {
        let forbidden = classify_endpoint_answer(URL, 403, Some(16), true).unwrap();
        assert_eq!(forbidden.text, "CMGConnector_Forbidden");
        assert!(forbidden
            .reason()
            .contains("403.16 (client certificate untrusted or invalid)"));
        assert_eq!(
            classify_endpoint_answer(URL, 403, Some(13), true)
                .unwrap()
                .text,
            "CMGConnector_Forbidden"
        );
        assert_eq!(
            classify_endpoint_answer(URL, 401, None, true).unwrap().text,
            "CMGConnector_Unauthorized"
        );
        let failed = classify_endpoint_answer(URL, 503, None, true).unwrap();
        assert_eq!(
            (failed.status, failed.text),
            (500, "CMGConnector_InternalServerError")
        );
        for passed in [200, 204, 302, 404] {
            assert_eq!(
                classify_endpoint_answer(URL, passed, None, true),
                None,
                "{passed}"
            );
        }
    }
}
