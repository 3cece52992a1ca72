//! Entry points for the fuzz targets (`fuzz/`, run by `scripts/fuzz.sh`): the gateway's own
//! code for what arrives from outside, on bytes, against a lab gateway's configuration made
//! once per process. Not an API: nothing else calls it.
//!
//! What each entry point runs is the code the gateway runs, not a copy: the hello parse and
//! the connector policy's judgement of it ([`FuzzLab::hello`]), the token checks
//! ([`FuzzLab::check_token`]), and a device's request from the first check to the head as it
//! goes on the channel ([`FuzzLab::device_request`]), also behind hyper's own HTTP/1.1 server
//! as a device connection gets it ([`FuzzLab::serve_http1`]). What the gateway would log is
//! checked to stay one record ([`logged`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use channel::refusal::{Cause, Refusal};
use channel::route::{Auth, Route};
use channel::tunnel::{self, headers, Body};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response};
use jsonwebtoken::{Algorithm, EncodingKey};
use pki::lab::layout;
use time::OffsetDateTime;

use crate::config::{client_cert_header, AllowedConnector, BoundConnector, GatewayConfig};
use crate::connectors::{load_connector_roots, Connectors};
use crate::device::{base64, header_value, Identity};
use crate::device_auth::DeviceAuth;
use crate::forward::{self, Rewrite};
use crate::token::{Claims, TokenPolicy, TokenSettings};

/// The address the lab's device and connector connect from.
const PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50123);
/// The lab's Ed25519 site key, beside the lab's P-256 one.
const ED25519_PUB: &str = "site/token-ed25519.pub";
/// Endpoints only "Branch Connector" may announce, and one only the lab's connector may.
const BRANCH_ENDPOINTS: [u64; 2] = [7, 8];
const BOUND_ENDPOINT: u64 = 9;

/// A lab gateway's configuration, loaded as the gateway loads it: its connector policy (with
/// endpoints bound to connectors and CRLs checked), its token keys (P-256 and Ed25519), and a
/// judged device certificate and connector certificate.
pub struct FuzzLab {
    connectors: Connectors,
    connector: Box<pki::Certificate>,
    auth: DeviceAuth,
    /// The site's signing keys, to sign the claims a fuzz target makes up.
    p256: EncodingKey,
    ed25519: EncodingKey,
    /// The lab device's certificate, as a request's identity carries it.
    device_thumbprint: String,
    device_header: HeaderValue,
    cert_header: (HeaderName, HeaderValue),
    max_request_header_bytes: usize,
    idle: Duration,
}

/// The lab, made on first use (a few milliseconds of key generation).
pub fn lab() -> &'static FuzzLab {
    static LAB: OnceLock<FuzzLab> = OnceLock::new();
    LAB.get_or_init(|| match FuzzLab::new() {
        Ok(lab) => lab,
        Err(why) => panic!("the fuzz lab cannot be made: {why}"),
    })
}

impl FuzzLab {
    fn new() -> Result<FuzzLab, String> {
        let dir = std::env::temp_dir().join(format!("portcullis-fuzz-lab-{}", std::process::id()));
        let made = FuzzLab::in_dir(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        made
    }

    fn in_dir(dir: &Path) -> Result<FuzzLab, String> {
        let text = |e: &dyn std::fmt::Display| e.to_string();
        let options = pki::lab::LabOptions {
            hosts: vec!["gateway.portcullis.lab".into()],
            devices: 1,
        };
        pki::lab::LabPki::issue(&options)
            .and_then(|lab| lab.write(dir, true))
            .map_err(|e| text(&e))?;
        let (ed_key, ed_pub) = pki::lab::token_key_pair(true).map_err(|e| text(&e))?;
        std::fs::write(dir.join(ED25519_PUB), &ed_pub).map_err(|e| text(&e))?;
        let read = |path: &str| std::fs::read(dir.join(path)).map_err(|e| text(&e));
        let root = pki::lab::LabCa::from_pem(
            &String::from_utf8_lossy(&read(layout::ROOT_CERT)?),
            &String::from_utf8_lossy(&read(layout::ROOT_KEY)?),
        )
        .map_err(|e| text(&e))?;
        let crl = root.crl(&[], 30).map_err(|e| text(&e))?;
        std::fs::write(dir.join("ca/root.crl"), crl).map_err(|e| text(&e))?;

        let mut config = GatewayConfig::lab();
        config.allowed_connectors = vec![
            AllowedConnector::Name(pki::lab::CHANNEL_CN.into()),
            AllowedConnector::Bound(BoundConnector {
                name: "Branch Connector".into(),
                endpoints: BRANCH_ENDPOINTS.to_vec(),
            }),
            AllowedConnector::Bound(BoundConnector {
                name: pki::lab::CHANNEL_CN.into(),
                endpoints: vec![BOUND_ENDPOINT],
            }),
        ];
        config.tokens = Some(TokenSettings::new(vec![
            layout::SITE_TOKEN_PUB.into(),
            ED25519_PUB.into(),
        ]));
        config.verify_client_revocation = true;
        config.crls = vec![PathBuf::from("ca/root.crl")];
        config.client_cert_header = Some("X-ARR-ClientCert".into());
        // Through the file, as the gateway reads it.
        let file = dir.join("gateway.toml");
        config.write(&file).map_err(|e| text(&e))?;
        let config = GatewayConfig::load(&file).map_err(|e| text(&e))?;

        let connector_roots = load_connector_roots(&config).map_err(|e| text(&e))?;
        let auth = DeviceAuth::load_with_crl_issuers(
            0,
            &config.trusted_roots,
            &connector_roots,
            Some((config.crls.as_slice(), config.crl_policy)),
            config.tokens.as_ref(),
        )
        .map_err(|e| text(&e))?;
        let connectors = Connectors::load(&config, connector_roots, &auth).map_err(|e| text(&e))?;
        let first_cert = |path: &str| -> Result<pki::Certificate, String> {
            let items =
                pki::read_bytes(Path::new(path), &read(path)?, &pki::Pkcs12Password::empty())
                    .map_err(|e| text(&e))?;
            items
                .certs
                .into_iter()
                .next()
                .ok_or_else(|| format!("no certificate in {path}"))
        };
        let now = OffsetDateTime::now_utc();
        let connector = connectors
            .judge(Some(first_cert(layout::CHANNEL_CERT)?.der()), now)
            .map_err(|e| text(&e))?;
        let device = first_cert(&format!("{}/device-001.crt", layout::DEVICES))?;
        let judged = auth
            .judge(Some(device.der()), now)
            .cert
            .map_err(|cause| Refusal::new(cause).to_string())?;
        let cert_name = client_cert_header(&config).ok_or("no client_cert_header")?;
        let cert_value = HeaderValue::try_from(base64(judged.der())).map_err(|e| text(&e))?;
        let p256 =
            EncodingKey::from_ec_pem(&read(layout::SITE_TOKEN_KEY)?).map_err(|e| text(&e))?;
        let ed25519 = EncodingKey::from_ed_pem(ed_key.as_bytes()).map_err(|e| text(&e))?;
        Ok(FuzzLab {
            connectors,
            connector,
            auth,
            p256,
            ed25519,
            device_thumbprint: judged.thumbprint.clone(),
            device_header: header_value(&format!(
                "{} ({}) from {PEER}",
                judged.subject, judged.thumbprint
            )),
            cert_header: (cert_name, cert_value),
            max_request_header_bytes: config.max_request_header_bytes as usize,
            idle: Duration::from_secs(config.idle_timeout_secs),
        })
    }

    fn tokens(&self) -> &TokenPolicy {
        match &self.auth.tokens {
            Some(tokens) => tokens,
            None => unreachable!("the lab configures [tokens]"),
        }
    }

    /// A connector's answer to the hello request, as the gateway takes it: parsed, judged by
    /// the connector policy for the lab's connector, and what the log then says.
    pub fn hello(&self, body: &[u8]) {
        let Ok(hello) = crate::channels::parse_hello(body) else {
            return;
        };
        let (opened, smaller) =
            crate::accept::channel_opened(&hello, 1, PEER, self.max_request_header_bytes);
        logged(&opened);
        if let Some(warning) = smaller {
            logged(&warning);
        }
        let admitted = self.connectors.admits(&self.connector, &hello);
        if let Err(why) = &admitted {
            logged(&format!("Refused a connector channel from {PEER}: {why}"));
        }
        // An endpoint bound to another connector only is never admitted.
        let admitted = admitted.is_ok();
        let branch_only = hello
            .endpoints
            .iter()
            .any(|e| BRANCH_ENDPOINTS.contains(&e.id));
        assert!(
            !(admitted && branch_only),
            "endpoint bound to another connector admitted"
        );
    }

    /// The token checks for a request to `endpoint` at `path`; a refusal is logged.
    pub fn check_token(
        &self,
        authorization: Option<&str>,
        endpoint: u64,
        path: &str,
    ) -> Result<Claims, String> {
        let checked = self
            .tokens()
            .check(authorization, endpoint, path, OffsetDateTime::now_utc());
        if let Err(check) = &checked {
            let refusal = Refusal::new(Cause::InvalidToken {
                check: check.clone(),
            });
            logged(&format!("Refused a request from device {PEER}: {refusal}"));
        }
        checked
    }

    /// A JWT of `header` and `payload` (any bytes, as the JSON a site could sign) signed by
    /// the lab's site key: Ed25519 when `ed25519`, else P-256.
    pub fn sign(&self, header: &[u8], payload: &[u8], ed25519: bool) -> Option<String> {
        let (key, algorithm) = if ed25519 {
            (&self.ed25519, Algorithm::EdDSA)
        } else {
            (&self.p256, Algorithm::ES256)
        };
        let message = format!("{}.{}", base64url(header), base64url(payload));
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, algorithm).ok()?;
        Some(format!("{message}.{signature}"))
    }

    /// A device's request as the gateway handles it from its first check to its head as it
    /// goes on a channel (the request is not sent: the channel is the connector's). Checks
    /// what the connector gets: no header the device may not send, the metadata the gateway
    /// set, the path after the endpoint id, within the header budget.
    pub fn device_request<B>(&self, request: Request<B>) -> Response<Body> {
        match self.route_request(request) {
            Ok(response) => response,
            Err(refusal) => {
                logged(&format!("Refused a request from device {PEER}: {refusal}"));
                tunnel::refusal_response(&refusal)
            }
        }
    }

    fn route_request<B>(&self, request: Request<B>) -> Result<Response<Body>, Refusal> {
        let target = forward::checked_target(&request)?;
        let (auth, endpoint, path, forward_target) = match forward::parse_route(&target)? {
            Route::ServiceMetadata { .. } => return Ok(Response::new(tunnel::empty())),
            Route::Proxy {
                auth,
                endpoint,
                path,
                target,
                ..
            } => (auth, endpoint, path, target),
        };
        let identity = match auth {
            Auth::MutualTls => Identity::Certificate {
                thumbprint: &self.device_thumbprint,
                header: &self.device_header,
                cert_header: Some(&self.cert_header),
            },
            Auth::Token => {
                let authorization = request
                    .headers()
                    .get(hyper::header::AUTHORIZATION)
                    .map(|v| v.to_str().unwrap_or("(not text)"));
                let claims = self
                    .check_token(authorization, endpoint, path)
                    .map_err(|check| Refusal::new(Cause::InvalidToken { check }))?;
                Identity::Token {
                    subject: claims.sub.unwrap_or_default(),
                    id: claims.jti.unwrap_or_default(),
                }
            }
        };
        let (mut parts, _) = request.into_parts();
        let message_id = "0123456789abcdef";
        let limit = self.max_request_header_bytes;
        forward::rewrite_head(
            &mut parts,
            &Rewrite {
                forward_target,
                endpoint,
                message_id,
                identity: &identity,
                device: PEER,
                cert_header: Some(&self.cert_header.0),
                limit,
            },
        )?;
        // What the connector gets.
        let expected_path = if forward_target.starts_with('/') {
            forward_target.to_string()
        } else {
            format!("/{forward_target}")
        };
        assert_eq!(
            parts.uri.path_and_query().map(|p| p.as_str()),
            Some(expected_path.as_str()),
            "the path on the channel is the one after the endpoint id"
        );
        for (name, value) in &parts.headers {
            let name = name.as_str();
            assert!(!headers::is_hop_by_hop_lower(name), "{name} crossed a hop");
            if name.starts_with(headers::PREFIX) {
                assert!(
                    [&headers::MESSAGE_ID, &headers::ENDPOINT, &headers::DEVICE]
                        .iter()
                        .any(|ours| ours.as_str() == name),
                    "the device's {name} went on"
                );
            }
            if name == self.cert_header.0.as_str() {
                assert!(
                    matches!(identity, Identity::Certificate { .. }) && value == self.cert_header.1,
                    "a device's own {name} went on"
                );
            } else {
                assert!(
                    !headers::is_forwarding_lower(name),
                    "the device's {name} went on"
                );
            }
        }
        for (name, value) in [
            (&headers::MESSAGE_ID, message_id.to_string()),
            (&headers::ENDPOINT, endpoint.to_string()),
        ] {
            let all: Vec<&HeaderValue> = parts.headers.get_all(name).iter().collect();
            assert_eq!(all.len(), 1, "{name}");
            assert_eq!(all[0].as_bytes(), value.as_bytes(), "{name}");
        }
        assert_eq!(parts.headers.get_all(&headers::DEVICE).iter().count(), 1);
        Ok(Response::new(tunnel::empty()))
    }

    /// `bytes` as a device's HTTP/1.1 connection sends them, through hyper's server as the
    /// gateway builds it, to [`FuzzLab::device_request`]; what the device reads back.
    pub fn serve_http1(&self, bytes: &[u8]) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        thread_local! {
            static RUNTIME: Option<tokio::runtime::Runtime> =
                tokio::runtime::Builder::new_current_thread().enable_all().build().ok();
        }
        RUNTIME.with(|runtime| {
            let Some(runtime) = runtime else {
                panic!("no tokio runtime for the fuzz lab");
            };
            runtime.block_on(async {
                let (device, gateway) = tokio::io::duplex(64 * 1024);
                let service = hyper::service::service_fn(|request| async move {
                    Ok::<_, std::convert::Infallible>(self.device_request(request))
                });
                // Half-closes taken: the device shuts its side once it has sent the bytes,
                // and still reads every answer (a device's connection stays open instead).
                let served = crate::accept::device_http1(self.max_request_header_bytes, self.idle)
                    .half_close(true)
                    .serve_connection(hyper_util::rt::TokioIo::new(gateway), service);
                let (mut reading, mut writing) = tokio::io::split(device);
                let sent = async move {
                    let _ = writing.write_all(bytes).await;
                    let _ = writing.shutdown().await;
                    // Held until the answers are read: dropped, it would close both halves.
                    writing
                };
                let mut answer = Vec::new();
                let read = reading.read_to_end(&mut answer);
                let (_, _, _) = tokio::join!(served, sent, read);
                answer
            })
        })
    }
}

/// What the gateway logs of `message` reads back as one CMTrace record with that message, as
/// the log writes it: outside text in it opens no line or record of its own.
pub fn logged(message: &str) {
    let line = logs::cmtrace::stamped("gateway", logs::cmtrace::Severity::Warning, message);
    let mut records = Vec::new();
    let read = logs::parse::read_from(line.as_bytes(), Path::new("fuzz.log"), |r| records.push(r));
    assert!(read.is_ok(), "{read:?}");
    assert_eq!(records.len(), 1, "{line:?}");
    assert_eq!(
        records[0].message,
        logs::escape::message(message),
        "{line:?}"
    );
}

/// Base64url without padding (RFC 7515 2), as a JWT's parts are written.
fn base64url(bytes: &[u8]) -> String {
    base64(bytes)
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lab loads, and its entry points take what the gateway takes every day.
    #[test]
    fn the_fuzz_lab_takes_what_the_gateway_takes() {
        let lab = lab();
        lab.hello(
            br#"{"connector_id":"c","version":"1","endpoints":[{"id":3456,"name":"SMS_MP"}]}"#,
        );
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = format!(
            r#"{{"iss":"portcullis-site","aud":"portcullis-gateway","sub":"DEVICE-001","exp":{},"jti":"1"}}"#,
            now + 600
        );
        for ed25519 in [false, true] {
            let alg = if ed25519 { "EdDSA" } else { "ES256" };
            let header = format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#);
            let token = lab
                .sign(header.as_bytes(), claims.as_bytes(), ed25519)
                .unwrap();
            let claims = lab
                .check_token(Some(&format!("Bearer {token}")), 3456, "/SMS_MP/.sms_aut")
                .unwrap();
            assert_eq!(claims.sub.as_deref(), Some("DEVICE-001"));
        }
        let answer = lab.serve_http1(
            b"GET /CCM_PROXY_MUTUALAUTH/3456/SMS_MP/.sms_aut?MPLIST HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
        );
        assert!(
            answer.starts_with(b"HTTP/1.1 200 OK\r\n"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        let answer = lab.serve_http1(b"GET /CCM_PROXY_MUTUALAUTH/x/ HTTP/1.1\r\nHost: gw\r\n\r\n");
        assert!(
            answer.starts_with(b"HTTP/1.1 404 CMGService_BadRoute\r\n"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
}
