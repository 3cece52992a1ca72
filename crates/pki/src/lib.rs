//! Certificates for Portcullis: loading stores and trust roots, building chains, the connector's
//! client-certificate filter chain with a reason for every rejected certificate, and lab PKI
//! issuance.
//!
//! Everything that reads a file names that file in its error. Everything that judges a
//! certificate returns a typed value the caller prints from.

pub mod cert;
pub mod chain;
pub mod crl;
pub mod error;
pub mod filter;
pub mod lab;
mod load;
pub mod report;
pub mod roots;
pub mod store;
pub mod tls;

pub use cert::Certificate;
pub use error::PkiError;
pub use filter::{select_client_cert, Fate, Rejection, Selection, Stage, TrailLine};
pub use load::{key_spki, read_bytes, FileItems, Pkcs12Password, MAX_FILE_BYTES};
pub use roots::RootSet;
pub use store::{CertStore, KeyState, StoreEntry};
