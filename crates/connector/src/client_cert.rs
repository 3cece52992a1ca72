//! The client certificate the connector presents to its endpoints: the store is read, the
//! filter chain runs, and the endpoint client is built around what it chose.

use std::time::Duration;

use logs::cmtrace::Severity;
use pki::crl::{CrlPolicy, RevocationList};
use pki::{select_client_cert, CertStore, Pkcs12Password, RootSet};
use runtime::metrics::{roots_expiry, Expiry};
use time::OffsetDateTime;

use crate::config::ConnectorConfig;
use crate::endpoint::{EndpointClient, EndpointTrust};
use crate::run::{ConnectorError, Log};

/// The outcome of running the filter chain on the configured store.
pub(crate) struct Choice {
    pub(crate) client: EndpointClient,
    pub(crate) label: Option<String>,
    pub(crate) trail: Vec<(Severity, String)>,
    /// The chosen certificate, the allowed and endpoint roots and the endpoint CRLs, with their
    /// ends (`portcullis_certificate_expiry_timestamp_seconds`).
    pub(crate) certificates: Vec<Expiry>,
}

/// Reads the store, runs the filter chain and logs it (the whole trail when verbose, the
/// outcome always), and builds the endpoint client that presents the chosen certificate.
pub(crate) fn choose_client_certificate(
    config: &ConnectorConfig,
    log: &Log,
) -> Result<Choice, ConnectorError> {
    let store = CertStore::load(
        &config.client_cert_store,
        &Pkcs12Password::from_env(&config.pfx_password_env),
    )?;
    let allowed = RootSet::load(&config.allowed_roots)?;
    let selection = select_client_cert(&store, &allowed, OffsetDateTime::now_utc());
    let mut trail = Vec::new();
    for line in &selection.trail {
        let severity = Severity::from_number(line.severity());
        let text = line.to_string();
        let outcome = line.severity() > 1 || matches!(line, pki::TrailLine::Selected { .. });
        if outcome {
            log.write(severity, &text);
        } else {
            log.verbose(|| text.clone());
        }
        trail.push((severity, text));
    }
    let roots = RootSet::load(&config.endpoint_roots)?;
    let trust = EndpointTrust {
        crls: RevocationList::load_all(&config.endpoint_crls, &roots)?,
        roots,
        crl_policy: config.endpoint_crl_policy,
    };
    if !trust.crls.is_empty() {
        log.info(&format!(
            "Endpoint server certificates are checked against {} CRL(s); an endpoint whose issuer has no current CRL is {}",
            trust.crls.len(),
            match trust.crl_policy {
                CrlPolicy::Refuse => "refused",
                CrlPolicy::AllowAndWarn => "allowed",
            }
        ));
    }
    let mut certificates: Vec<Expiry> = selection
        .selected
        .and_then(|i| store.entries.get(i))
        .map(|entry| Expiry::of("client", &entry.cert))
        .into_iter()
        .collect();
    certificates.extend(roots_expiry("allowed_root", &allowed));
    certificates.extend(roots_expiry("endpoint_root", &trust.roots));
    certificates.extend(trust.crls.iter().filter_map(|crl| {
        crl.next_update.map(|next_update| Expiry {
            role: "crl",
            subject: crl.issuer.clone(),
            thumbprint: String::new(),
            expires: next_update,
        })
    }));
    let client = EndpointClient::new(
        &store,
        selection.selected,
        &trust,
        Duration::from_secs(config.endpoint_timeout_secs),
    )?;
    Ok(Choice {
        label: client.selected_label(),
        client,
        trail,
        certificates,
    })
}
