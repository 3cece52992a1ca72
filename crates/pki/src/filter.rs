//! The connector's client-certificate filter chain.
//!
//! Stages, in the original product's order, then one of our own:
//! 1. key usage includes digital signature;
//! 2. chains to an allowed root CA (and has a private key at all, see below);
//! 3. has a usable private key;
//! 4. extended key usage includes client authentication (1.3.6.1.5.5.7.3.2);
//! 5. valid now (not before / not after).
//!
//! The original logs `No private key cert:` lines *before* `Filtered cert count with allowed
//! root CA`, and its count after the private-key stage equals the count after the root stage.
//! So in its trail a certificate with no key at all is dropped during the root pass. We keep
//! that shape exactly (admins and `doctor logs` know it): stage 2 first lists the certificates
//! whose chain misses the allowed roots, then those with no key at all; stage 3 drops those
//! whose key is present but unusable (wrong key, unsupported type).
//!
//! The result is a typed [`Selection`]; the connector's log, `doctor certs` and its JSON all
//! print from it, so they cannot disagree.

use std::fmt;

use serde::Serialize;
use time::OffsetDateTime;

use crate::cert::Certificate;
use crate::chain::{self, Chain, ChainEnd};
use crate::roots::RootSet;
use crate::store::{CertStore, KeyState};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    DigitalSignature,
    AllowedRootCa,
    PrivateKey,
    ClientAuth,
    TimeValidity,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::DigitalSignature,
        Stage::AllowedRootCa,
        Stage::PrivateKey,
        Stage::ClientAuth,
        Stage::TimeValidity,
    ];

    /// The words after `Filtered cert count with `.
    pub fn count_words(self) -> &'static str {
        match self {
            Stage::DigitalSignature => "digital signature",
            Stage::AllowedRootCa => "allowed root CA",
            Stage::PrivateKey => "private key",
            Stage::ClientAuth => "client auth",
            Stage::TimeValidity => "time validity",
        }
    }
}

/// Why a certificate was dropped. Each kind has its own reason text and fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rejection {
    NoKeyUsage,
    NoDigitalSignature {
        key_usage: Vec<String>,
    },
    ChainIncomplete {
        missing_issuer: String,
    },
    RootNotAllowed {
        root: String,
    },
    ChainTooLong,
    NoPrivateKey,
    KeyUnusable {
        why: String,
    },
    NoExtendedKeyUsage,
    NotClientAuth {
        purposes: Vec<String>,
    },
    NotYetValid {
        #[serde(with = "time::serde::rfc3339")]
        not_before: OffsetDateTime,
    },
    Expired {
        #[serde(with = "time::serde::rfc3339")]
        not_after: OffsetDateTime,
    },
}

impl Rejection {
    pub fn stage(&self) -> Stage {
        match self {
            Rejection::NoKeyUsage | Rejection::NoDigitalSignature { .. } => Stage::DigitalSignature,
            Rejection::ChainIncomplete { .. }
            | Rejection::RootNotAllowed { .. }
            | Rejection::ChainTooLong
            | Rejection::NoPrivateKey => Stage::AllowedRootCa,
            Rejection::KeyUnusable { .. } => Stage::PrivateKey,
            Rejection::NoExtendedKeyUsage | Rejection::NotClientAuth { .. } => Stage::ClientAuth,
            Rejection::NotYetValid { .. } | Rejection::Expired { .. } => Stage::TimeValidity,
        }
    }

    /// The start of the trail line, worded as the original product words it.
    pub fn line_prefix(&self) -> &'static str {
        match self {
            Rejection::NoKeyUsage | Rejection::NoDigitalSignature { .. } => {
                "No digital signature cert"
            }
            Rejection::ChainIncomplete { .. }
            | Rejection::RootNotAllowed { .. }
            | Rejection::ChainTooLong => "Not allowed cert",
            Rejection::NoPrivateKey | Rejection::KeyUnusable { .. } => "No private key cert",
            Rejection::NoExtendedKeyUsage | Rejection::NotClientAuth { .. } => {
                "Not client auth cert"
            }
            Rejection::NotYetValid { .. } | Rejection::Expired { .. } => "Not time valid cert",
        }
    }

    /// A few words for a table column.
    pub fn short(&self) -> &'static str {
        match self {
            Rejection::NoKeyUsage | Rejection::NoDigitalSignature { .. } => "no digital signature",
            Rejection::ChainIncomplete { .. } => "chain incomplete",
            Rejection::RootNotAllowed { .. } => "root CA not allowed",
            Rejection::ChainTooLong => "chain too long",
            Rejection::NoPrivateKey => "no private key",
            Rejection::KeyUnusable { .. } => "private key unusable",
            Rejection::NoExtendedKeyUsage | Rejection::NotClientAuth { .. } => "not client auth",
            Rejection::NotYetValid { .. } => "not yet valid",
            Rejection::Expired { .. } => "expired",
        }
    }

    pub fn reason(&self) -> String {
        match self {
            Rejection::NoKeyUsage => "has no key usage extension, so digital signature is not allowed".into(),
            Rejection::NoDigitalSignature { key_usage } => {
                format!("key usage is {} without Digital Signature", list_or_none(key_usage))
            }
            Rejection::ChainIncomplete { missing_issuer } => format!(
                "chain is incomplete: issuer \"{missing_issuer}\" is neither in the store nor an allowed root CA"
            ),
            Rejection::RootNotAllowed { root } => {
                format!("chains to root \"{root}\", which is not an allowed root CA")
            }
            Rejection::ChainTooLong => format!("chain is longer than {} certificates", chain::MAX_CHAIN_LEN),
            Rejection::NoPrivateKey => "has no private key".into(),
            Rejection::KeyUnusable { why } => why.clone(),
            Rejection::NoExtendedKeyUsage => {
                "has no enhanced key usage extension, so Client Authentication is not stated".into()
            }
            Rejection::NotClientAuth { purposes } => format!(
                "enhanced key usage is {} without Client Authentication (1.3.6.1.5.5.7.3.2)",
                list_or_none(purposes)
            ),
            Rejection::NotYetValid { not_before } => format!("not valid before {}", date_text(*not_before)),
            Rejection::Expired { not_after } => format!("expired on {}", date_text(*not_after)),
        }
    }

    /// What the admin does about it.
    pub fn fix(&self) -> &'static str {
        match self {
            Rejection::NoKeyUsage | Rejection::NoDigitalSignature { .. } => {
                "Reissue the certificate from a template whose key usage includes Digital Signature."
            }
            Rejection::ChainIncomplete { .. } => {
                "Put the missing intermediate CA certificate in the store (or in the certificate's .pem/.pfx), or add its root to the allowed root CAs."
            }
            Rejection::RootNotAllowed { .. } => {
                "Issue the client certificate from a CA under an allowed root, or add that root CA to the allowed root CAs if the endpoint trusts it."
            }
            Rejection::ChainTooLong => "Remove the extra cross-certificates so the chain reaches its root directly.",
            Rejection::NoPrivateKey => {
                "Import the certificate with its private key: a .pfx/.p12, a .pem holding both, or name.key beside name.crt."
            }
            Rejection::KeyUnusable { .. } => {
                "Pair the certificate with the key it was issued for (RSA 2048-8192, ECDSA P-256/P-384 or Ed25519), unencrypted or in a .pfx."
            }
            Rejection::NoExtendedKeyUsage | Rejection::NotClientAuth { .. } => {
                "Reissue with Client Authentication (1.3.6.1.5.5.7.3.2) in the enhanced key usage, e.g. from a Workstation Authentication template."
            }
            Rejection::NotYetValid { .. } => {
                "Check this machine's clock, or wait until the certificate's validity starts."
            }
            Rejection::Expired { .. } => "Renew the certificate and import the new one with its private key.",
        }
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".into()
    } else {
        items.join(", ")
    }
}

pub fn date_text(t: OffsetDateTime) -> String {
    let fmt =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    t.to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// One line of the trail, as the connector logs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TrailLine {
    Rejected {
        /// Index into the store's entries.
        entry: usize,
        label: String,
        rejection: Rejection,
    },
    Count {
        stage: Stage,
        count: usize,
    },
    Selected {
        entry: usize,
        label: String,
        why: String,
    },
    NoneSelected,
    SharedName {
        entry: usize,
        label: String,
        other: String,
        name: String,
    },
}

impl TrailLine {
    /// 1 info, 2 warning, 3 error: CMTrace's `type`.
    pub fn severity(&self) -> u8 {
        match self {
            TrailLine::Rejected { .. } | TrailLine::Count { .. } | TrailLine::Selected { .. } => 1,
            TrailLine::SharedName { .. } => 2,
            TrailLine::NoneSelected => 3,
        }
    }
}

impl fmt::Display for TrailLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrailLine::Rejected { label, rejection, .. } => {
                write!(f, "{}: {}: {}", rejection.line_prefix(), label, rejection.reason())
            }
            TrailLine::Count { stage, count } => {
                write!(f, "Filtered cert count with {}: {}", stage.count_words(), count)
            }
            TrailLine::Selected { label, why, .. } => {
                write!(f, "Selected client authentication cert: {label}: {why}")
            }
            TrailLine::NoneSelected => write!(
                f,
                "No client authentication cert selected: endpoints that require a client certificate will answer 403 CMGConnector_Clientcertificaterequired"
            ),
            TrailLine::SharedName { label, other, name, .. } => write!(
                f,
                "Cert {label} shares the name \"{name}\" with {other}: the subject name or a SAN must be unique to this machine"
            ),
        }
    }
}

/// What happened to one store entry.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "fate", rename_all = "snake_case")]
pub enum Fate {
    Rejected {
        rejection: Rejection,
    },
    /// Passed every stage but another candidate was chosen.
    Passed,
    Selected,
}

#[derive(Debug, Clone, Serialize)]
pub struct Judged {
    pub entry: usize,
    pub chain: Chain,
    pub fate: Fate,
}

/// The outcome of the filter chain: the whole trail, each certificate's fate, the choice.
#[derive(Debug, Clone, Serialize)]
pub struct Selection {
    pub trail: Vec<TrailLine>,
    pub judged: Vec<Judged>,
    /// Index into the store's entries.
    pub selected: Option<usize>,
    #[serde(with = "time::serde::rfc3339")]
    pub evaluated_at: OffsetDateTime,
}

impl Selection {
    pub fn surviving(&self, stage: Stage) -> Option<usize> {
        self.trail.iter().find_map(|l| match l {
            TrailLine::Count { stage: s, count } if *s == stage => Some(*count),
            _ => None,
        })
    }
}

/// One pass of a stage: judges the store entry at an index, `Some` when it is dropped.
type Check<'a> = &'a dyn Fn(usize) -> Option<Rejection>;

/// Runs the filter chain over `store` against the allowed roots, at time `now`.
pub fn select_client_cert(store: &CertStore, allowed: &RootSet, now: OffsetDateTime) -> Selection {
    // Allowed roots first, so a chain that can reach one does.
    let pool: Vec<&Certificate> = allowed
        .certs
        .iter()
        .chain(store.chain_certs.iter())
        .chain(store.entries.iter().map(|e| &e.cert))
        .collect();
    let chains: Vec<Chain> = store
        .entries
        .iter()
        .map(|e| chain::build(&e.cert, &pool))
        .collect();

    let mut trail = Vec::new();
    let mut fates: Vec<Option<Rejection>> = vec![None; store.entries.len()];
    let mut alive: Vec<usize> = (0..store.entries.len()).collect();

    // Each pass drops what fails its check, logging rejections before the stage's count. The
    // allowed-root stage has two passes (see the module comment).
    let passes: [(Stage, Check); 6] = [
        (Stage::DigitalSignature, &|i| {
            digital_signature(&store.entries[i].cert)
        }),
        (Stage::AllowedRootCa, &|i| allowed_root(&chains[i], allowed)),
        (Stage::AllowedRootCa, &|i| {
            (store.entries[i].key == KeyState::Absent).then_some(Rejection::NoPrivateKey)
        }),
        (Stage::PrivateKey, &|i| match &store.entries[i].key {
            KeyState::Unusable(why) => Some(Rejection::KeyUnusable { why: why.clone() }),
            _ => None,
        }),
        (Stage::ClientAuth, &|i| client_auth(&store.entries[i].cert)),
        (Stage::TimeValidity, &|i| {
            time_validity(&store.entries[i].cert, now)
        }),
    ];
    for (n, (stage, check)) in passes.iter().enumerate() {
        alive.retain(|&i| match check(i) {
            Some(rejection) => {
                trail.push(TrailLine::Rejected {
                    entry: i,
                    label: store.entries[i].cert.label(),
                    rejection: rejection.clone(),
                });
                fates[i] = Some(rejection);
                false
            }
            None => true,
        });
        let last_pass_of_stage = passes.get(n + 1).is_none_or(|(next, _)| next != stage);
        if last_pass_of_stage {
            trail.push(TrailLine::Count {
                stage: *stage,
                count: alive.len(),
            });
        }
    }

    // Latest expiry wins; the thumbprint breaks ties so the choice never depends on file order.
    alive.sort_by(|&a, &b| {
        let (ca, cb) = (&store.entries[a].cert, &store.entries[b].cert);
        cb.not_after
            .cmp(&ca.not_after)
            .then_with(|| ca.thumbprint.cmp(&cb.thumbprint))
    });
    let selected = alive.first().copied();
    match selected {
        Some(chosen) => {
            let cert = &store.entries[chosen].cert;
            let why = choice_reason(store, &alive);
            trail.push(TrailLine::Selected {
                entry: chosen,
                label: cert.label(),
                why,
            });
            for (name, other) in shared_names(store, chosen) {
                trail.push(TrailLine::SharedName {
                    entry: chosen,
                    label: cert.label(),
                    other,
                    name,
                });
            }
        }
        None => trail.push(TrailLine::NoneSelected),
    }

    let judged = chains
        .into_iter()
        .enumerate()
        .map(|(i, chain)| Judged {
            entry: i,
            chain,
            fate: match fates[i].take() {
                Some(rejection) => Fate::Rejected { rejection },
                None if Some(i) == selected => Fate::Selected,
                None => Fate::Passed,
            },
        })
        .collect();
    Selection {
        trail,
        judged,
        selected,
        evaluated_at: now,
    }
}

fn digital_signature(cert: &Certificate) -> Option<Rejection> {
    match &cert.key_usage {
        None => Some(Rejection::NoKeyUsage),
        Some(ku) if !ku.digital_signature => Some(Rejection::NoDigitalSignature {
            key_usage: ku.names.clone(),
        }),
        Some(_) => None,
    }
}

fn allowed_root(chain: &Chain, allowed: &RootSet) -> Option<Rejection> {
    if chain.certs.iter().any(|c| allowed.contains(c)) {
        return None;
    }
    Some(match &chain.end {
        ChainEnd::Root => Rejection::RootNotAllowed {
            root: chain.top().subject.clone(),
        },
        ChainEnd::IssuerNotFound { issuer } => Rejection::ChainIncomplete {
            missing_issuer: issuer.clone(),
        },
        ChainEnd::TooLong => Rejection::ChainTooLong,
    })
}

fn client_auth(cert: &Certificate) -> Option<Rejection> {
    match &cert.extended_key_usage {
        None => Some(Rejection::NoExtendedKeyUsage),
        Some(eku) if !eku.client_auth => Some(Rejection::NotClientAuth {
            purposes: eku.purposes.clone(),
        }),
        Some(_) => None,
    }
}

fn time_validity(cert: &Certificate, now: OffsetDateTime) -> Option<Rejection> {
    if now < cert.not_before {
        Some(Rejection::NotYetValid {
            not_before: cert.not_before,
        })
    } else if now > cert.not_after {
        Some(Rejection::Expired {
            not_after: cert.not_after,
        })
    } else {
        None
    }
}

fn choice_reason(store: &CertStore, ranked: &[usize]) -> String {
    let first = &store.entries[ranked[0]].cert;
    match ranked.len() {
        1 => "the only certificate that passed every stage".into(),
        n => {
            let tied = ranked
                .iter()
                .filter(|&&i| store.entries[i].cert.not_after == first.not_after)
                .count();
            if tied == 1 {
                format!(
                    "latest expiry ({}) of the {n} certificates that passed every stage",
                    date_text(first.not_after)
                )
            } else {
                format!(
                    "{tied} of the {n} certificates that passed every stage share the latest expiry ({}); the lowest thumbprint breaks the tie",
                    date_text(first.not_after)
                )
            }
        }
    }
}

/// Names (CN or SAN) of the chosen certificate that another end-entity certificate in the store
/// with a different key also carries.
fn shared_names(store: &CertStore, chosen: usize) -> Vec<(String, String)> {
    let me = &store.entries[chosen].cert;
    let my_names = me.machine_names();
    let mut found = Vec::new();
    for (i, other) in store.entries.iter().enumerate() {
        if i == chosen || other.cert.is_ca || other.cert.spki() == me.spki() {
            continue;
        }
        let theirs = other.cert.machine_names();
        if let Some(name) = my_names
            .iter()
            .find(|n| theirs.iter().any(|t| t.eq_ignore_ascii_case(n)))
        {
            found.push((name.clone(), other.cert.label()));
        }
    }
    found
}
