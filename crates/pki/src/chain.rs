//! Building a certificate's chain up to a root, from the certificates at hand.

use serde::Serialize;

use crate::cert::Certificate;

/// Chains longer than this are refused: real ones have 2 to 4 links, and a loop or a hostile
/// store must not make the builder spin.
pub const MAX_CHAIN_LEN: usize = 10;

#[derive(Debug, Clone, Serialize)]
pub struct Chain {
    /// Leaf first, then each issuer in turn.
    pub certs: Vec<Certificate>,
    pub end: ChainEnd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChainEnd {
    /// The last certificate is a self-signed root.
    Root,
    /// No certificate at hand issued the last one (by name and signature).
    IssuerNotFound { issuer: String },
    /// The chain grew past [`MAX_CHAIN_LEN`].
    TooLong,
}

impl Chain {
    pub fn top(&self) -> &Certificate {
        // `certs` always holds at least the leaf.
        &self.certs[self.certs.len() - 1]
    }

    /// One line: `CN=leaf <- CN=Issuing CA <- CN=Root` plus how it ends when not at a root.
    pub fn describe(&self) -> String {
        let mut text = self
            .certs
            .iter()
            .map(|c| c.subject.clone())
            .collect::<Vec<_>>()
            .join(" <- ");
        match &self.end {
            ChainEnd::Root => text.push_str(" (root)"),
            ChainEnd::IssuerNotFound { issuer } => {
                text.push_str(&format!(" <- ? (issuer \"{issuer}\" not found)"))
            }
            ChainEnd::TooLong => text.push_str(&format!(" ... (longer than {MAX_CHAIN_LEN})")),
        }
        text
    }
}

/// Builds `leaf`'s chain from `pool`, preferring issuers in the order the pool lists them (put
/// the roots you want the chain to reach first).
pub fn build(leaf: &Certificate, pool: &[&Certificate]) -> Chain {
    build_to_anchor(leaf, pool, |_| false)
}

/// As [`build`], but a certificate for which `is_anchor` holds ends the chain as a root
/// without its self-signature being checked: a configured trust anchor is trusted as it is,
/// and checking it again on every device connection would cost a signature verification each.
pub fn build_to_anchor(
    leaf: &Certificate,
    pool: &[&Certificate],
    is_anchor: impl Fn(&Certificate) -> bool,
) -> Chain {
    let mut certs = vec![leaf.clone()];
    loop {
        let current = &certs[certs.len() - 1];
        let at_root = if current.is_self_issued() {
            is_anchor(current) || current.is_signed_by(current)
        } else {
            false
        };
        if at_root {
            return Chain {
                certs,
                end: ChainEnd::Root,
            };
        }
        if certs.len() >= MAX_CHAIN_LEN {
            return Chain {
                certs,
                end: ChainEnd::TooLong,
            };
        }
        let issuer = pool
            .iter()
            .find(|cand| !certs.iter().any(|c| c.same_entity(cand)) && current.is_signed_by(cand));
        match issuer {
            Some(issuer) => certs.push((*issuer).clone()),
            None => {
                let issuer = current.issuer.clone();
                return Chain {
                    certs,
                    end: ChainEnd::IssuerNotFound { issuer },
                };
            }
        }
    }
}
