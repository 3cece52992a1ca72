//! Every refusal Portcullis can send, built in one place: which hop failed, why, the HTTP status
//! and status text the device sees, and what to do. The response, the log line and the doctor
//! all print from a [`Refusal`], so they cannot disagree.
//!
//! Status texts keep the original product's names (`CMGConnector_*` for what the connector
//! learned from the endpoint, `CMGService_*` for what the gateway decided itself).

use std::fmt;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hop {
    /// Device to gateway: the device's authentication or request.
    DeviceToGateway,
    /// Gateway to connector: the held channel.
    GatewayToConnector,
    /// Connector to endpoint: the internal HTTPS call.
    ConnectorToEndpoint,
}

impl Hop {
    pub fn describe(self) -> &'static str {
        match self {
            Hop::DeviceToGateway => "device -> gateway",
            Hop::GatewayToConnector => "gateway -> connector",
            Hop::ConnectorToEndpoint => "connector -> endpoint",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum Cause {
    // Device -> gateway.
    BadRoute {
        detail: String,
    },
    DeviceCertificateMissing,
    DeviceCertificateUntrusted {
        detail: String,
    },
    DeviceCertificateNotTimeValid {
        detail: String,
    },
    DeviceCertificateRevoked {
        detail: String,
    },
    DeviceRevocationUnknown {
        detail: String,
    },
    InvalidToken {
        check: String,
    },
    /// The token is from an OpenID Connect issuer whose signing keys the gateway has never
    /// been able to fetch (`[[tokens.oidc]]`).
    TokenKeysUnavailable {
        issuer: String,
        detail: String,
    },
    /// A certificate that chains but is not for client authentication (no clientAuth EKU).
    DeviceCertificateWrongUsage {
        detail: String,
    },
    /// The request's header block (names, values and the request line) exceeds the budget
    /// every hop of the path can carry.
    HeadersTooLarge {
        size: usize,
        limit: usize,
    },
    /// A method the gateway does not forward (CONNECT, TRACE, or not a token).
    MethodNotAllowed {
        method: String,
    },
    /// A transfer coding other than chunked on the request body.
    TransferCodingUnsupported {
        coding: String,
    },
    /// The device already has as many requests in flight as one device may.
    TooManyRequests {
        limit: usize,
    },
    /// The gateway holds as many connections as it may (in total or from this address).
    TooManyConnections {
        scope: String,
        limit: usize,
    },
    /// The device stopped sending its body, or stopped reading the answer, for too long.
    DeviceStalled {
        what: String,
        seconds: u64,
    },
    // Gateway -> connector.
    UnknownEndpoint {
        endpoint: u64,
    },
    NoChannel {
        endpoint: u64,
    },
    /// The gateway started moments ago and no connector has announced the endpoint yet: the
    /// connectors may still be redialling (`startup_grace_secs`).
    GatewayStarting {
        endpoint: u64,
        /// Seconds since the gateway started, and its grace period.
        since_secs: u64,
        grace_secs: u64,
    },
    ConnectorTimeout {
        endpoint: u64,
        seconds: u64,
    },
    ChannelBroken {
        detail: String,
    },
    /// Every channel for the endpoint is full and the queue of requests waiting for one is too.
    ChannelsBusy {
        endpoint: u64,
    },
    /// Every channel for the endpoint has left the gateway's keep-alive PING unanswered for
    /// longer than `channel_unresponsive_after_ms`: its connector is frozen or cut off.
    ConnectorUnresponsive {
        endpoint: u64,
        silent_ms: u64,
    },
    /// The connector's answer broke a rule of the channel (its header block too large, a
    /// pushed stream): it is not passed on.
    BadConnectorAnswer {
        detail: String,
    },
    /// The connector started its answer and then sent nothing for too long.
    ConnectorStalled {
        seconds: u64,
    },
    // Connector -> endpoint.
    EndpointNeedsClientCertificate {
        url: String,
        presented: bool,
    },
    EndpointForbidden {
        url: String,
        substatus: Option<u16>,
    },
    EndpointUnauthorized {
        url: String,
    },
    EndpointFailed {
        url: String,
        status: u16,
    },
    EndpointUnreachable {
        url: String,
        detail: String,
    },
    EndpointTlsFailed {
        url: String,
        detail: String,
    },
    EndpointTimeout {
        url: String,
        seconds: u64,
    },
}

/// A refusal: what the device sees and what the admin reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub hop: Hop,
    pub status: u16,
    pub text: &'static str,
    #[serde(flatten)]
    pub cause: Cause,
}

impl Refusal {
    pub fn new(cause: Cause) -> Refusal {
        let (hop, status, text) = match &cause {
            Cause::BadRoute { .. } => (Hop::DeviceToGateway, 404, "CMGService_BadRoute"),
            Cause::DeviceCertificateMissing => (
                Hop::DeviceToGateway,
                403,
                "CMGService_Clientcertificaterequired",
            ),
            Cause::DeviceCertificateUntrusted { .. } => (
                Hop::DeviceToGateway,
                403,
                "CMGService_Untrustedclientcertificate",
            ),
            Cause::DeviceCertificateNotTimeValid { .. } => (
                Hop::DeviceToGateway,
                403,
                "CMGService_Expiredclientcertificate",
            ),
            Cause::DeviceCertificateRevoked { .. } => (
                Hop::DeviceToGateway,
                403,
                "CMGService_Revokedclientcertificate",
            ),
            Cause::DeviceRevocationUnknown { .. } => (
                Hop::DeviceToGateway,
                403,
                "CMGService_Revocationcheckfailed",
            ),
            Cause::InvalidToken { .. } => (Hop::DeviceToGateway, 401, "CMGService_Invalid_Token"),
            Cause::TokenKeysUnavailable { .. } => {
                (Hop::DeviceToGateway, 503, "CMGService_Tokenkeysunavailable")
            }
            Cause::DeviceCertificateWrongUsage { .. } => (
                Hop::DeviceToGateway,
                403,
                "CMGService_Clientcertificatewrongusage",
            ),
            Cause::HeadersTooLarge { .. } => (
                Hop::DeviceToGateway,
                431,
                "CMGService_Requestheaderstoolarge",
            ),
            Cause::MethodNotAllowed { .. } => {
                (Hop::DeviceToGateway, 405, "CMGService_Methodnotallowed")
            }
            Cause::TransferCodingUnsupported { .. } => (
                Hop::DeviceToGateway,
                501,
                "CMGService_Transfercodingnotsupported",
            ),
            Cause::TooManyRequests { .. } => {
                (Hop::DeviceToGateway, 429, "CMGService_Toomanyrequests")
            }
            Cause::TooManyConnections { .. } => {
                (Hop::DeviceToGateway, 503, "CMGService_Toomanyconnections")
            }
            Cause::DeviceStalled { .. } => (Hop::DeviceToGateway, 408, "CMGService_Devicestalled"),
            Cause::UnknownEndpoint { .. } => {
                (Hop::GatewayToConnector, 404, "CMGService_Unknownendpoint")
            }
            Cause::NoChannel { .. } => (
                Hop::GatewayToConnector,
                503,
                "CMGService_Noconnectorchannel",
            ),
            Cause::GatewayStarting { .. } => {
                (Hop::GatewayToConnector, 503, "CMGService_Gatewaystarting")
            }
            Cause::ConnectorTimeout { .. } => {
                (Hop::GatewayToConnector, 504, "CMGService_Connectortimeout")
            }
            Cause::ChannelBroken { .. } => {
                (Hop::GatewayToConnector, 502, "CMGService_Channelbroken")
            }
            Cause::ChannelsBusy { .. } => (Hop::GatewayToConnector, 503, "CMGService_Channelbusy"),
            Cause::ConnectorUnresponsive { .. } => (
                Hop::GatewayToConnector,
                503,
                "CMGService_Connectorunresponsive",
            ),
            Cause::BadConnectorAnswer { .. } => (
                Hop::GatewayToConnector,
                502,
                "CMGService_Badconnectoranswer",
            ),
            Cause::ConnectorStalled { .. } => {
                (Hop::GatewayToConnector, 504, "CMGService_Connectorstalled")
            }
            Cause::EndpointNeedsClientCertificate { .. } => (
                Hop::ConnectorToEndpoint,
                403,
                "CMGConnector_Clientcertificaterequired",
            ),
            Cause::EndpointForbidden { .. } => {
                (Hop::ConnectorToEndpoint, 403, "CMGConnector_Forbidden")
            }
            Cause::EndpointUnauthorized { .. } => {
                (Hop::ConnectorToEndpoint, 401, "CMGConnector_Unauthorized")
            }
            Cause::EndpointFailed { .. } => (
                Hop::ConnectorToEndpoint,
                500,
                "CMGConnector_InternalServerError",
            ),
            Cause::EndpointUnreachable { .. } => (
                Hop::ConnectorToEndpoint,
                502,
                "CMGConnector_Endpointunreachable",
            ),
            Cause::EndpointTlsFailed { .. } => (
                Hop::ConnectorToEndpoint,
                502,
                "CMGConnector_Endpointtlsfailed",
            ),
            Cause::EndpointTimeout { .. } => (
                Hop::ConnectorToEndpoint,
                504,
                "CMGConnector_Endpointtimeout",
            ),
        };
        Refusal {
            hop,
            status,
            text,
            cause,
        }
    }

    /// Why, in one sentence.
    pub fn reason(&self) -> String {
        match &self.cause {
            Cause::BadRoute { detail } => format!("the request path is not a gateway route: {detail}"),
            Cause::DeviceCertificateMissing => {
                "the device presented no client certificate on a CCM_PROXY_MUTUALAUTH route".into()
            }
            Cause::DeviceCertificateUntrusted { detail } => {
                format!("the device's client certificate does not chain to a root the gateway trusts: {detail}")
            }
            Cause::DeviceCertificateNotTimeValid { detail } => {
                format!("the device's client certificate is not valid now: {detail}")
            }
            Cause::DeviceCertificateRevoked { detail } => {
                format!("the device's client certificate is revoked: {detail}")
            }
            Cause::DeviceRevocationUnknown { detail } => {
                format!("the revocation status of the device's certificate cannot be checked: {detail}")
            }
            Cause::InvalidToken { check } => format!("the device's token was refused: {check}"),
            Cause::TokenKeysUnavailable { issuer, detail } => format!("the gateway has no signing keys from token issuer {issuer}: none could be fetched yet ({detail})"),
            Cause::DeviceCertificateWrongUsage { detail } => format!("the device's certificate is not for client authentication: {detail}"),
            Cause::HeadersTooLarge { size, limit } => format!("the request's headers are {size} bytes, over the gateway's limit of {limit}"),
            Cause::MethodNotAllowed { method } => format!("the gateway does not forward {method} requests"),
            Cause::TransferCodingUnsupported { coding } => format!("the request body's transfer coding \"{coding}\" is not supported (only chunked)"),
            Cause::TooManyRequests { limit } => format!("the device already has {limit} requests in flight, as many as one device may"),
            Cause::TooManyConnections { scope, limit } => format!("the gateway already holds {limit} device connections {scope}, as many as it may"),
            Cause::DeviceStalled { what, seconds } => format!("the device {what} for {seconds} s"),
            Cause::UnknownEndpoint { endpoint } => {
                format!("no connector has ever announced endpoint {endpoint}")
            }
            Cause::NoChannel { endpoint } => {
                format!("no connector holds a channel to this gateway for endpoint {endpoint}")
            }
            Cause::GatewayStarting { endpoint, since_secs, grace_secs } => format!(
                "the gateway started {since_secs} s ago and no connector has announced endpoint {endpoint} yet; connectors may still be reconnecting (for the first {grace_secs} s after a start, startup_grace_secs)"
            ),
            Cause::ConnectorTimeout { endpoint, seconds } => {
                format!("the connector did not answer for endpoint {endpoint} within {seconds} s (the gateway's request_timeout_secs)")
            }
            Cause::ChannelBroken { detail } => format!("the channel to the connector broke: {detail}"),
            Cause::ChannelsBusy { endpoint } => format!("every channel for endpoint {endpoint} is full and so is the queue of requests waiting for one"),
            Cause::ConnectorUnresponsive { endpoint, silent_ms } => format!("every channel for endpoint {endpoint} has left the gateway's keep-alive PING unanswered, the longest silent for {}.{:03} s", silent_ms / 1000, silent_ms % 1000),
            Cause::BadConnectorAnswer { detail } => format!("the connector's answer was refused: {detail}"),
            Cause::ConnectorStalled { seconds } => format!("the connector started its answer and then sent nothing for {seconds} s"),
            Cause::EndpointNeedsClientCertificate { url, presented: false } => format!(
                "{url} requires a client certificate and the connector has none to present (IIS 403.7)"
            ),
            Cause::EndpointNeedsClientCertificate { url, presented: true } => format!(
                "{url} answered 403.7 (client certificate required) although the connector presented one"
            ),
            Cause::EndpointForbidden { url, substatus } => match substatus {
                Some(sub) => format!("{url} refused the connector: IIS 403.{sub} ({})", iis_403_meaning(*sub)),
                None => format!("{url} refused the connector with 403"),
            },
            Cause::EndpointUnauthorized { url } => {
                format!("{url} wants authentication the forwarded request does not carry (401)")
            }
            Cause::EndpointFailed { url, status } => format!("{url} failed with {status}"),
            Cause::EndpointUnreachable { url, detail } => format!("cannot reach {url}: {detail}"),
            Cause::EndpointTlsFailed { url, detail } => format!("TLS with {url} failed: {detail}"),
            Cause::EndpointTimeout { url, seconds } => format!("{url} did not answer within {seconds} s (the connector's endpoint_timeout_secs)"),
        }
    }

    /// What to do about it.
    pub fn remedy(&self) -> &'static str {
        match &self.cause {
            Cause::BadRoute { .. } => "Use https://<gateway>/CCM_PROXY_MUTUALAUTH/<endpoint id>/<path> (or CCM_PROXY_SERVERAUTH with a token), the path with no dot segments, backslashes, encoded slashes or dots, or double escapes.",
            Cause::DeviceCertificateMissing => "Give the device a client authentication certificate from a CA the gateway trusts, or use a CCM_PROXY_SERVERAUTH route with a token.",
            Cause::DeviceCertificateUntrusted { .. } => "Add the device certificate's root CA to the gateway's trusted roots, or reissue the certificate from a trusted CA.",
            Cause::DeviceCertificateNotTimeValid { .. } => "Renew the device's certificate (or check the device's and the gateway's clocks).",
            Cause::DeviceCertificateRevoked { .. } => "Issue the device a new certificate; the revoked one stays refused.",
            Cause::DeviceRevocationUnknown { .. } => "Publish a current CRL from the device certificate's issuer and list it in the gateway's crls (reload with SIGHUP), or set crl_policy = \"allow-and-warn\".",
            Cause::InvalidToken { .. } => "Get the device a new token from the site; check the gateway's token keys, issuer and audience.",
            Cause::TokenKeysUnavailable { .. } => "Let the gateway reach the issuer's discovery document and JWKS over HTTPS (its log names the error: name resolution, firewall, proxy, or a [[tokens.oidc]] ca without the issuer's root); it retries every min_refresh_secs and accepts the tokens as soon as it has the keys.",
            Cause::DeviceCertificateWrongUsage { .. } => "Give the device a certificate whose extended key usage includes Client Authentication (1.3.6.1.5.5.7.3.2).",
            Cause::HeadersTooLarge { .. } => "Send fewer or smaller headers (cookies, tokens), or raise the gateway's max_request_header_bytes and the connector's to match.",
            Cause::MethodNotAllowed { .. } => "Use GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS or Configuration Manager's CCM_POST, BITS_POST and PROPFIND (the response's Allow header lists them); the gateway forwards no tunnels (CONNECT), TRACE or other methods.",
            Cause::TransferCodingUnsupported { .. } => "Send the body with Content-Length or chunked only; put content codings in Content-Encoding.",
            Cause::TooManyRequests { .. } => "Wait for the device's requests under way to be answered; raise the gateway's max_streams_per_device if devices need more at once.",
            Cause::TooManyConnections { .. } => "Retry later; if the load is legitimate raise the gateway's max_connections or max_connections_per_address, or add gateway instances.",
            Cause::DeviceStalled { .. } => "Check the device's network; the gateway gives up on a stream whose device neither sends nor reads within device_idle_timeout_secs.",
            Cause::UnknownEndpoint { .. } => "Check the endpoint id in the URL against the connector's endpoint table (see ServiceMetadata).",
            Cause::NoChannel { .. } => "Start the connector serving this endpoint and check it can reach this gateway (its log says \"Maintaining connections...\").",
            Cause::GatewayStarting { .. } => "Retry in a few seconds (the answer's Retry-After says when the grace period ends); if the endpoint is still unknown after it, check the endpoint id against the connector's endpoint table and that the connector reaches this gateway.",
            Cause::ConnectorTimeout { .. } => "Check the connector's log for the message and its network path to the gateway; keep the gateway's request_timeout_secs above the connector's endpoint_timeout_secs, so that a slow endpoint is named by the connector (504 CMGConnector_Endpointtimeout).",
            Cause::ChannelBroken { .. } => "Check the connector's log and its network path to the gateway.",
            Cause::ChannelsBusy { .. } => "Retry later; if the load is legitimate raise the connector's channels_per_gateway or the gateway's max_queued_requests.",
            Cause::ConnectorUnresponsive { .. } => "Check the connector's host (a hung or overloaded process, a paused machine) and the network between it and the gateway; the gateway's log names the connector and drops its channels if the silence lasts (channel_keepalive_timeout_secs).",
            Cause::BadConnectorAnswer { .. } => "Check the connector's version and the endpoint's answer (its headers must fit max_response_header_bytes).",
            Cause::ConnectorStalled { .. } => "Check the endpoint behind the connector: it started an answer and stopped sending it.",
            Cause::EndpointNeedsClientCertificate { .. } => "Give the connector a client authentication certificate: run `portcullis doctor certs` on its store and apply the fix it names.",
            Cause::EndpointForbidden { .. } => "Make the endpoint trust the connector's client certificate (its root in the endpoint's trusted roots, not expired or revoked), and check the endpoint's HTTPS binding.",
            Cause::EndpointUnauthorized { .. } => "Check the endpoint's authentication settings for requests from the connector.",
            Cause::EndpointFailed { .. } => "Check the endpoint's own logs (IIS W3C and the role's log).",
            Cause::EndpointUnreachable { .. } => "Check the endpoint URL in the connector's configuration, name resolution and the firewall from the connector to the endpoint.",
            Cause::EndpointTlsFailed { .. } => "Make the connector trust the endpoint's server certificate and check that its name matches the URL.",
            Cause::EndpointTimeout { .. } => "Check the endpoint's load and health; the connector waits endpoint_timeout_secs for its answer.",
        }
    }

    /// The explaining body the device receives.
    pub fn body(&self) -> String {
        format!(
            "{} {}\nhop: {}\nreason: {}\nremedy: {}\n",
            self.status,
            self.text,
            self.hop.describe(),
            self.reason(),
            self.remedy()
        )
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} ({}): {}",
            self.status,
            self.text,
            self.hop.describe(),
            self.reason()
        )
    }
}

fn iis_403_meaning(substatus: u16) -> &'static str {
    match substatus {
        4 => "SSL required",
        7 => "client certificate required",
        12 => "mapper denied access",
        13 => "client certificate revoked",
        16 => "client certificate untrusted or invalid",
        17 => "client certificate expired or not yet valid",
        _ => "forbidden",
    }
}

/// The table of every status text, for README's "Status texts" section: markdown, one row
/// per [`Cause::examples`] entry in that order, from [`Refusal::new`] (status, status text,
/// hop), [`Cause::summary`] (when) and [`Refusal::remedy`] (what to do). README's copy is
/// checked against it by `crates/portcullis/tests/readme.rs`.
pub fn status_text_table() -> String {
    // A `|` in a cell would end it early, and a `<word>` would be taken for an HTML tag and
    // not shown (`https://<gateway>/...`).
    let cell = |text: &str| text.replace('|', "\\|").replace('<', "&lt;");
    let mut table =
        String::from("| status | status text | hop | when | what to do |\n|---|---|---|---|---|\n");
    for cause in Cause::examples() {
        let refusal = Refusal::new(cause);
        table.push_str(&format!(
            "| {} | `{}` | {} | {} | {} |\n",
            refusal.status,
            cell(refusal.text),
            cell(refusal.hop.describe()),
            cell(refusal.cause.summary()),
            cell(refusal.remedy()),
        ));
    }
    table
}

impl Cause {
    /// When this refusal is sent, in one sentence that holds for every case of it (no detail
    /// of one case): README's status-text table.
    pub fn summary(&self) -> &'static str {
        match self {
            Cause::BadRoute { .. } => "The request path is not a gateway route: not under /CCM_PROXY_MUTUALAUTH/ or /CCM_PROXY_SERVERAUTH/ with a numeric endpoint id, or it holds a dot segment.",
            Cause::DeviceCertificateMissing => "The device presented no client certificate on a CCM_PROXY_MUTUALAUTH route.",
            Cause::DeviceCertificateUntrusted { .. } => "The device's client certificate does not chain to a root the gateway trusts.",
            Cause::DeviceCertificateNotTimeValid { .. } => "The device's client certificate, or a CA certificate in its chain, is expired or not yet valid.",
            Cause::DeviceCertificateRevoked { .. } => "The device's client certificate is revoked by a CRL the gateway holds.",
            Cause::DeviceRevocationUnknown { .. } => "The gateway checks revocation and has no current CRL from the device certificate's issuer.",
            Cause::InvalidToken { .. } => "The device's token on a CCM_PROXY_SERVERAUTH route was refused: missing, not a JWT, a bad signature, expired, or for another issuer, audience or endpoint.",
            Cause::TokenKeysUnavailable { .. } => "The device's token is from an OpenID Connect issuer ([[tokens.oidc]]) whose signing keys the gateway has not been able to fetch since it started.",
            Cause::DeviceCertificateWrongUsage { .. } => "The device's certificate chains to a trusted root but is not for client authentication (no Client Authentication extended key usage).",
            Cause::HeadersTooLarge { .. } => "The request's header block is larger than every hop of the path can carry.",
            Cause::MethodNotAllowed { .. } => "The request's method is one the gateway does not forward (CONNECT, TRACE, or not a valid method).",
            Cause::TransferCodingUnsupported { .. } => "The request body is sent with a transfer coding other than chunked.",
            Cause::TooManyRequests { .. } => "The device already has as many requests in flight as one device may.",
            Cause::TooManyConnections { .. } => "The gateway already holds as many device connections as it may, in total or from the device's address.",
            Cause::DeviceStalled { .. } => "The device stopped sending its request body, or stopped reading the answer, for too long.",
            Cause::UnknownEndpoint { .. } => "No connector has announced the endpoint id in the URL.",
            Cause::NoChannel { .. } => "The endpoint is known, but no connector serving it holds a channel to this gateway now.",
            Cause::GatewayStarting { .. } => "The gateway has just started (within startup_grace_secs) and no connector has announced the endpoint yet: the connectors may still be reconnecting.",
            Cause::ConnectorTimeout { .. } => "The connector did not answer within the gateway's request timeout.",
            Cause::ChannelBroken { .. } => "The channel to the connector broke while the request was on it.",
            Cause::ChannelsBusy { .. } => "Every channel for the endpoint is full, and so is the queue of requests waiting for one.",
            Cause::ConnectorUnresponsive { .. } => "Every channel for the endpoint belongs to a connector that has stopped answering the gateway's keep-alive PINGs (frozen, overloaded or cut off), so no request is sent to wait on it.",
            Cause::BadConnectorAnswer { .. } => "The connector's answer broke a rule of the channel (a header block too large, a pushed stream), so it is not passed on.",
            Cause::ConnectorStalled { .. } => "The connector started its answer and then sent nothing for too long.",
            Cause::EndpointNeedsClientCertificate { .. } => "The endpoint demanded a client certificate (IIS 403.7) that the connector did not have or could not present.",
            Cause::EndpointForbidden { .. } => "The endpoint refused the connector for another reason: its client certificate untrusted, expired or revoked, or the wrong HTTPS binding (IIS 403.16, 403.17, 403.13 ...).",
            Cause::EndpointUnauthorized { .. } => "The endpoint wants authentication the forwarded request does not carry (401).",
            Cause::EndpointFailed { .. } => "The endpoint failed: it answered with a 5xx status.",
            Cause::EndpointUnreachable { .. } => "The connector cannot reach the endpoint: name resolution, a refused connection or the network.",
            Cause::EndpointTlsFailed { .. } => "TLS between the connector and the endpoint failed: the endpoint's certificate is not trusted, or its name does not match the URL.",
            Cause::EndpointTimeout { .. } => "The endpoint did not answer the connector in time.",
        }
    }

    /// One of each cause, with details as they might read, for tests and documentation. The
    /// match below names every variant, so adding one does not compile until someone comes
    /// here (and adds an example to the list beside it).
    pub fn examples() -> Vec<Cause> {
        let url = || "https://InternalMP.contoso.com/SMS_MP/.sms_aut?SITESIGNCERT".to_string();
        let all = vec![
            Cause::BadRoute {
                detail: "no CCM_PROXY_ prefix".into(),
            },
            Cause::DeviceCertificateMissing,
            Cause::DeviceCertificateUntrusted {
                detail: "issuer CN=Fabrikam Root is not trusted".into(),
            },
            Cause::DeviceCertificateNotTimeValid {
                detail: "expired 2026-01-01".into(),
            },
            Cause::DeviceCertificateRevoked {
                detail: "serial 01".into(),
            },
            Cause::DeviceRevocationUnknown {
                detail: "no CRL from CN=Contoso Issuing CA".into(),
            },
            Cause::InvalidToken {
                check: "expired".into(),
            },
            Cause::TokenKeysUnavailable {
                issuer: "https://login.microsoftonline.com/contoso.onmicrosoft.com/v2.0".into(),
                detail: "connection refused".into(),
            },
            Cause::DeviceCertificateWrongUsage {
                detail: "its extended key usage is Server Authentication only".into(),
            },
            Cause::HeadersTooLarge {
                size: 70_000,
                limit: 16_384,
            },
            Cause::MethodNotAllowed {
                method: "CONNECT".into(),
            },
            Cause::TransferCodingUnsupported {
                coding: "gzip".into(),
            },
            Cause::TooManyRequests { limit: 100 },
            Cause::TooManyConnections {
                scope: "from 203.0.113.7".into(),
                limit: 256,
            },
            Cause::DeviceStalled {
                what: "stopped reading the answer".into(),
                seconds: 30,
            },
            Cause::UnknownEndpoint { endpoint: 3456 },
            Cause::NoChannel { endpoint: 3456 },
            Cause::GatewayStarting {
                endpoint: 3456,
                since_secs: 1,
                grace_secs: 35,
            },
            Cause::ConnectorTimeout {
                endpoint: 3456,
                seconds: 30,
            },
            Cause::ChannelBroken {
                detail: "stream reset".into(),
            },
            Cause::ChannelsBusy { endpoint: 3456 },
            Cause::ConnectorUnresponsive {
                endpoint: 3456,
                silent_ms: 1250,
            },
            Cause::BadConnectorAnswer {
                detail: "its header block is over 65536 bytes".into(),
            },
            Cause::ConnectorStalled { seconds: 30 },
            Cause::EndpointNeedsClientCertificate {
                url: url(),
                presented: false,
            },
            Cause::EndpointForbidden {
                url: url(),
                substatus: None,
            },
            Cause::EndpointUnauthorized { url: url() },
            Cause::EndpointFailed {
                url: url(),
                status: 500,
            },
            Cause::EndpointUnreachable {
                url: url(),
                detail: "connection refused".into(),
            },
            Cause::EndpointTlsFailed {
                url: url(),
                detail: "invalid peer certificate: UnknownIssuer".into(),
            },
            Cause::EndpointTimeout {
                url: url(),
                seconds: 30,
            },
        ];
        for cause in &all {
            match cause {
                Cause::BadRoute { .. }
                | Cause::DeviceCertificateMissing
                | Cause::DeviceCertificateUntrusted { .. }
                | Cause::DeviceCertificateNotTimeValid { .. }
                | Cause::DeviceCertificateRevoked { .. }
                | Cause::DeviceRevocationUnknown { .. }
                | Cause::InvalidToken { .. }
                | Cause::TokenKeysUnavailable { .. }
                | Cause::DeviceCertificateWrongUsage { .. }
                | Cause::HeadersTooLarge { .. }
                | Cause::MethodNotAllowed { .. }
                | Cause::TransferCodingUnsupported { .. }
                | Cause::TooManyRequests { .. }
                | Cause::TooManyConnections { .. }
                | Cause::DeviceStalled { .. }
                | Cause::UnknownEndpoint { .. }
                | Cause::NoChannel { .. }
                | Cause::GatewayStarting { .. }
                | Cause::ConnectorTimeout { .. }
                | Cause::ChannelBroken { .. }
                | Cause::ChannelsBusy { .. }
                | Cause::ConnectorUnresponsive { .. }
                | Cause::BadConnectorAnswer { .. }
                | Cause::ConnectorStalled { .. }
                | Cause::EndpointNeedsClientCertificate { .. }
                | Cause::EndpointForbidden { .. }
                | Cause::EndpointUnauthorized { .. }
                | Cause::EndpointFailed { .. }
                | Cause::EndpointUnreachable { .. }
                | Cause::EndpointTlsFailed { .. }
                | Cause::EndpointTimeout { .. } => {}
            }
        }
        all
    }
}

#[cfg(test)]
#[path = "refusal_tests.rs"]
mod tests;
