//! The `[[tokens.oidc]]` limits and checks against a small HTTPS issuer on loopback whose
//! answers each test chooses (the happy path and rotation run against a real provider in
//! crates/integration/tests/system/oidc.rs).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::{EncodingKey, Header};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::token::{TokenPolicy, TokenSettings};

/// How the test issuer answers.
#[derive(Clone, Copy)]
enum Mode {
    Normal,
    /// Accepts, completes TLS, reads the request and never answers.
    Silent,
    /// A JWKS padded to this many bytes.
    Big(usize),
    /// A discovery document naming another issuer.
    OtherIssuer,
}

struct TestIssuer {
    issuer: String,
    requests: Arc<AtomicUsize>,
    dir: tempfile::TempDir,
    /// The P-256 key it publishes (kid "k1") and signs test tokens with.
    signing: EncodingKey,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

async fn test_issuer(mode: Mode) -> TestIssuer {
    let dir = tempfile::tempdir().unwrap();
    let root = pki::lab::LabCa::new_root("OIDC unit test root", 1).unwrap();
    let leaf = root
        .issue(&pki::lab::LeafSpec::server_auth(
            "127.0.0.1",
            &["127.0.0.1".into()],
            2,
        ))
        .unwrap();
    std::fs::write(dir.path().join("root.crt"), &root.cert().cert_pem).unwrap();
    std::fs::write(dir.path().join("leaf.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.path().join("leaf.key"), &leaf.key_pem).unwrap();
    let identity =
        pki::tls::Identity::load(&dir.path().join("leaf.crt"), &dir.path().join("leaf.key"))
            .unwrap();
    let tls =
        pki::tls::server_config(identity, &pki::RootSet::default(), false, &[b"http/1.1"]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );

    let (private, public) = pki::lab::token_key_pair(false).unwrap();
    let spki =
        rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(public.as_bytes()).unwrap();
    let point = &spki.as_ref()[spki.as_ref().len() - 64..];
    let jwks = serde_json::json!({"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
         "x": b64(&point[..32]), "y": b64(&point[32..])},
        // A shared-secret key: never used, whatever a token's header says.
        {"kty": "oct", "kid": "hmac", "k": b64(b"secret")},
    ]});
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    let said_issuer = match mode {
        Mode::OtherIssuer => "https://other.example".to_string(),
        _ => issuer.clone(),
    };
    let jwks_uri = format!("{issuer}/keys");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            let (said_issuer, jwks_uri, jwks) =
                (said_issuer.clone(), jwks_uri.clone(), jwks.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16_384 {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&request);
                let body = match mode {
                    Mode::Silent => {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    _ if text.starts_with("GET /.well-known/openid-configuration ") => {
                        serde_json::json!({"issuer": said_issuer, "jwks_uri": jwks_uri}).to_string()
                    }
                    Mode::Big(size) => {
                        let mut body = jwks.to_string();
                        body.pop();
                        body.push_str(&format!(",\"pad\":\"{}\"}}", "x".repeat(size)));
                        body
                    }
                    _ => jwks.to_string(),
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    TestIssuer {
        issuer,
        requests,
        signing: EncodingKey::from_ec_pem(private.as_bytes()).unwrap(),
        dir,
    }
}

impl TestIssuer {
    fn settings(&self) -> OidcSettings {
        let mut s = OidcSettings::new(&self.issuer, "api://gateway");
        s.ca = vec![self.dir.path().join("root.crt")];
        s.fetch_timeout_secs = 2;
        s
    }

    fn policy(&self, settings: OidcSettings) -> TokenPolicy {
        let mut tokens = TokenSettings::new(Vec::new());
        tokens.oidc = vec![settings];
        tokens.leeway_secs = 0;
        TokenPolicy::load(&tokens).unwrap()
    }

    fn token(&self, kid: &str, claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.into());
        let mut all = serde_json::json!({
            "iss": self.issuer, "aud": "api://gateway", "sub": "device-1",
            "exp": OffsetDateTime::now_utc().unix_timestamp() + 600,
        });
        for (k, v) in claims.as_object().unwrap() {
            all[k] = v.clone();
        }
        jsonwebtoken::encode(&header, &all, &self.signing).unwrap()
    }
}

async fn authorize(policy: &TokenPolicy, token: &str) -> Result<crate::token::Claims, Cause> {
    policy
        .authorize(
            Some(&format!("Bearer {token}")),
            1,
            "/SMS_MP/.sms_aut",
            OffsetDateTime::now_utc(),
        )
        .await
}

use channel::refusal::Cause;

fn refused(result: Result<crate::token::Claims, Cause>) -> String {
    match result {
        Err(Cause::InvalidToken { check }) => check,
        other => panic!("not an invalid token: {other:?}"),
    }
}

#[tokio::test]
async fn a_flood_of_unknown_keys_fetches_the_keys_at_most_once_per_min_refresh_secs() {
    let issuer = test_issuer(Mode::Normal).await;
    let policy = issuer.policy(issuer.settings());
    // The first token fetches the keys (discovery and JWKS: two requests).
    let good = issuer.token("k1", serde_json::json!({}));
    let claims = authorize(&policy, &good).await.unwrap();
    assert_eq!(claims.sub.as_deref(), Some("device-1"));
    assert_eq!(issuer.requests.load(Ordering::SeqCst), 2);
    // A flood naming keys the issuer does not publish: refused, and no more fetches within
    // min_refresh_secs (60 s by default).
    for i in 0..50 {
        let bad = issuer.token(&format!("unknown-{i}"), serde_json::json!({}));
        let check = refused(authorize(&policy, &bad).await);
        assert!(check.starts_with("unknown key: "), "{check}");
        assert!(check.contains("\"k1\""), "{check}");
    }
    assert_eq!(issuer.requests.load(Ordering::SeqCst), 2);
    // With a floor of one second, the next unknown key after it fetches again.
    let mut settings = issuer.settings();
    settings.min_refresh_secs = 1;
    let policy = issuer.policy(settings);
    assert!(authorize(&policy, &good).await.is_ok());
    assert_eq!(issuer.requests.load(Ordering::SeqCst), 4);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let bad = issuer.token("unknown", serde_json::json!({}));
    assert!(refused(authorize(&policy, &bad).await).starts_with("unknown key"));
    assert_eq!(issuer.requests.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn each_check_is_named() {
    let issuer = test_issuer(Mode::Normal).await;
    let mut settings = issuer.settings();
    settings.tenants = vec!["t1".into()];
    settings
        .required_claims
        .insert("roles".into(), "Device".into());
    settings.identity_claim = "oid".into();
    let policy = issuer.policy(settings);
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let ok = serde_json::json!({"tid": "t1", "roles": ["Other", "Device"], "oid": "object-1"});
    let with = |change: serde_json::Value| {
        let mut claims = ok.clone();
        for (k, v) in change.as_object().unwrap() {
            claims[k] = v.clone();
        }
        issuer.token("k1", claims)
    };
    let claims = authorize(&policy, &with(serde_json::json!({})))
        .await
        .unwrap();
    assert_eq!(claims.sub.as_deref(), Some("object-1"));
    for (change, start) in [
        (serde_json::json!({"aud": ["api://x", "api://y"]}), "wrong audience: the token was issued for audience \"api://x api://y\"; the gateway expects \"api://gateway\""),
        (serde_json::json!({"tid": "t2"}), "wrong tenant: the token is from tenant \"t2\""),
        (serde_json::json!({"tid": null}), "missing claim: the token has no tenant (tid)"),
        (serde_json::json!({"roles": ["Other"]}), "mismatched claim: the token's \"roles\" claim is [\"Other\"]"),
        (serde_json::json!({"roles": null}), "mismatched claim"),
        (serde_json::json!({"oid": null}), "missing claim: the token has no \"oid\" claim (identity_claim)"),
        (serde_json::json!({"exp": now - 5}), "expired: the token expired at"),
        (serde_json::json!({"exp": null}), "missing claim: the token has no expiry (exp)"),
        (serde_json::json!({"nbf": now + 60}), "not yet valid: the token is not valid before"),
    ] {
        let check = refused(authorize(&policy, &with(change.clone())).await);
        assert!(check.starts_with(start), "{change}: {check}");
    }
    // A token signed with the published HMAC key's secret, or unsigned: never accepted.
    let good = with(serde_json::json!({}));
    let payload = good.split('.').nth(1).unwrap();
    for header in [
        r#"{"alg":"HS256","kid":"hmac"}"#,
        r#"{"alg":"none"}"#,
        r#"{"alg":"EdDSA","kid":"k1"}"#,
    ] {
        let forged = format!("{}.{payload}.c2ln", b64(header.as_bytes()));
        let check = refused(authorize(&policy, &forged).await);
        assert!(
            check.starts_with("algorithm not allowed"),
            "{header}: {check}"
        );
    }
    let altered = format!(
        "{}.{}.{}",
        good.split('.').next().unwrap(),
        b64(br#"{"iss":"x"}"#),
        good.split('.').nth(2).unwrap()
    );
    assert!(refused(authorize(&policy, &altered).await).starts_with("wrong issuer"));
}

#[tokio::test]
async fn an_issuer_that_never_answers_is_given_up_on_after_fetch_timeout_secs() {
    let issuer = test_issuer(Mode::Silent).await;
    let policy = issuer.policy(issuer.settings());
    let started = Instant::now();
    let result = authorize(&policy, &issuer.token("k1", serde_json::json!({}))).await;
    // Generous: the bound is 2 s; the machine is shared.
    assert!(started.elapsed() < Duration::from_secs(30));
    match result {
        Err(Cause::TokenKeysUnavailable {
            issuer: named,
            detail,
        }) => {
            assert_eq!(named, issuer.issuer);
            assert!(
                detail.contains("within 2 s (fetch_timeout_secs)"),
                "{detail}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_jwks_over_max_document_bytes_is_not_read() {
    let issuer = test_issuer(Mode::Big(4096)).await;
    let mut settings = issuer.settings();
    settings.max_document_bytes = 2048;
    let policy = issuer.policy(settings);
    match authorize(&policy, &issuer.token("k1", serde_json::json!({}))).await {
        Err(Cause::TokenKeysUnavailable { detail, .. }) => {
            assert!(
                detail.contains("over 2048 bytes (max_document_bytes)"),
                "{detail}"
            )
        }
        other => panic!("{other:?}"),
    }
    // The same JWKS within the bound is read.
    let mut settings = issuer.settings();
    settings.max_document_bytes = 8192;
    let policy = issuer.policy(settings);
    assert!(
        authorize(&policy, &issuer.token("k1", serde_json::json!({})))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_discovery_document_for_another_issuer_gives_no_keys() {
    let issuer = test_issuer(Mode::OtherIssuer).await;
    let policy = issuer.policy(issuer.settings());
    match authorize(&policy, &issuer.token("k1", serde_json::json!({}))).await {
        Err(Cause::TokenKeysUnavailable { detail, .. }) => {
            assert!(
                detail.contains("names issuer \"https://other.example\""),
                "{detail}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn oidc_tables_are_read_and_each_problem_named_with_its_key() {
    let base = "cert = \"server.crt\"\nkey = \"server.key\"\ntrusted_roots = [\"root.crt\"]\n\
                connector_roots = [\"connectors.crt\"]\nallowed_connectors = [\"Branch\"]\n[tokens]\n";
    let path = Path::new("/etc/portcullis/gateway.toml");
    let parse = |tokens: &str| crate::GatewayConfig::parse(&format!("{base}{tokens}"), path);
    let entra = "[[tokens.oidc]]\nissuer = \"https://login.microsoftonline.com/tid-1/v2.0\"\n\
                 audience = \"api://portcullis\"\ntenants = [\"tid-1\"]\nca = [\"entra.pem\"]\n\
                 required_claims = { roles = \"Portcullis.Device\" }\n";
    let config = parse(entra).unwrap();
    let oidc = &config.tokens.unwrap().oidc[0];
    assert_eq!(oidc.audience, ["api://portcullis"]);
    assert_eq!(oidc.identity_claim, "sub");
    assert_eq!(oidc.ca, [Path::new("/etc/portcullis/entra.pem")]);
    assert_eq!((oidc.refresh_secs, oidc.min_refresh_secs), (3600, 60));
    assert_eq!(
        (oidc.fetch_timeout_secs, oidc.max_document_bytes),
        (10, 256 * 1024)
    );
    let two = "[[tokens.oidc]]\nissuer = \"https://idp.example\"\naudience = [\"a\", \"b\"]\n";
    assert_eq!(
        parse(two).unwrap().tokens.unwrap().oidc[0].audience,
        ["a", "b"]
    );
    for (table, key) in [
        ("", "tokens.keys"),
        ("[[tokens.oidc]]\nissuer = \"http://idp.example\"\naudience = \"a\"\n", "tokens.oidc.issuer"),
        ("[[tokens.oidc]]\nissuer = \"https://idp.example\"\naudience = []\n", "tokens.oidc.audience"),
        ("[[tokens.oidc]]\nissuer = \"https://idp.example\"\naudience = \"a\"\nidentity_claim = \"\"\n", "tokens.oidc.identity_claim"),
        ("[[tokens.oidc]]\nissuer = \"https://idp.example\"\naudience = \"a\"\ntenants = [\"\"]\n", "tokens.oidc.tenants"),
        ("[[tokens.oidc]]\nissuer = \"https://idp.example\"\naudience = \"a\"\nmin_refresh_secs = 0\n", "tokens.oidc.min_refresh_secs"),
        ("[[tokens.oidc]]\nissuer = \"https://idp.example\"\naudience = \"a\"\nrefresh_secs = 30\n", "tokens.oidc.min_refresh_secs"),
        ("[[tokens.oidc]]\nissuer = \"https://idp.example\"\naudience = \"a\"\nfetch_timeout_secs = 0\n", "tokens.oidc.fetch_timeout_secs"),
        ("[[tokens.oidc]]\nissuer = \"https://idp.example\"\naudience = \"a\"\nmax_document_bytes = 10\n", "tokens.oidc.max_document_bytes"),
        ("[[tokens.oidc]]\nissuer = \"https://idp.example\"\naudience = \"a\"\n[[tokens.oidc]]\nissuer = \"https://idp.example\"\naudience = \"b\"\n", "tokens.oidc.issuer"),
    ] {
        let error = parse(table).unwrap_err().to_string();
        assert!(error.contains(&format!("key `{key}`")), "{table}: {error}");
    }
    let unknown = parse("[[tokens.oidc]]\nissuer = \"https://idp.example\"\naudience = \"a\"\nalgorithms = [\"HS256\"]\n")
        .unwrap_err()
        .to_string();
    assert!(unknown.contains("algorithms"), "{unknown}");
}

#[test]
fn an_unreadable_ca_is_named_when_the_policy_loads() {
    let mut tokens = TokenSettings::new(Vec::new());
    let mut oidc = OidcSettings::new("https://idp.example", "a");
    oidc.ca = vec!["/nonexistent/idp-root.pem".into()];
    tokens.oidc = vec![oidc];
    let error = TokenPolicy::load(&tokens).err().unwrap().to_string();
    assert!(
        error.starts_with("[[tokens.oidc]] issuer https://idp.example: ca: ")
            && error.contains("/nonexistent/idp-root.pem"),
        "{error}"
    );
}

#[tokio::test]
async fn a_reload_with_the_same_table_keeps_the_issuer_and_its_keys() {
    let issuer = test_issuer(Mode::Normal).await;
    let good = issuer.token("k1", serde_json::json!({}));
    let before = issuer.policy(issuer.settings());
    assert!(authorize(&before, &good).await.is_ok());
    assert_eq!(issuer.requests.load(Ordering::SeqCst), 2);
    // The same table: the keys are not fetched again.
    let mut same = issuer.policy(issuer.settings());
    same.adopt(&before);
    assert!(authorize(&same, &good).await.is_ok());
    assert_eq!(issuer.requests.load(Ordering::SeqCst), 2);
    // A changed table is a new issuer: fetched anew.
    let mut settings = issuer.settings();
    settings.audience.push("api://more".into());
    let mut changed = issuer.policy(settings);
    changed.adopt(&before);
    assert!(authorize(&changed, &good).await.is_ok());
    assert_eq!(issuer.requests.load(Ordering::SeqCst), 4);
}
