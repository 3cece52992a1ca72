//! Sets of root CA certificates: the trust roots a gateway checks devices against, and the
//! *allowed root CAs* a connector's client certificate must chain to.

use std::path::PathBuf;

use serde::Serialize;

use crate::cert::Certificate;
use crate::error::Result;
use crate::load;

#[derive(Debug, Clone, Default, Serialize)]
pub struct RootSet {
    pub certs: Vec<Certificate>,
    /// The files and directories the set was read from.
    pub sources: Vec<PathBuf>,
}

impl RootSet {
    /// Reads every certificate (PEM or DER) in the given files and directories. A path that
    /// holds no certificate is an error: an empty root set would silently refuse everything.
    pub fn load(paths: &[PathBuf]) -> Result<RootSet> {
        let mut certs: Vec<Certificate> = Vec::new();
        for cert in load::read_certificates(paths)? {
            if !certs.contains(&cert) {
                certs.push(cert);
            }
        }
        Ok(RootSet {
            certs,
            sources: paths.to_vec(),
        })
    }

    pub fn from_certs(certs: Vec<Certificate>) -> RootSet {
        RootSet {
            certs,
            sources: Vec::new(),
        }
    }

    /// Is `cert` one of these roots (same name and key, so a re-issued root still counts)?
    pub fn contains(&self, cert: &Certificate) -> bool {
        self.certs.iter().any(|root| root.same_entity(cert))
    }
}
