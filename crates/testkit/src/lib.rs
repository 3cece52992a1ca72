//! Test helpers only: what the whole-system tests (the `integration` crate) start and drive.
//! Nothing here ships in `portcullis`.
//!
//! - [`lab`]: a lab PKI in a temporary directory, and the management point alone on it.
//! - [`system`]: a lab PKI in a temporary directory, the reference management point, a gateway
//!   and a connector wired up on loopback in one process, their log lines recorded, and the
//!   calls a test makes on them (probe, curl, reload, channel ids).

pub mod lab;
pub mod system;

pub use system::*;

/// The configuration types a test changes through [`System::builder`] and
/// [`System::reload_gateway`].
pub use connector::run::{ConnectorConfig, EndpointConfig};
pub use gateway::token::TokenSettings;
pub use gateway::{AllowedConnector, BoundConnector, GatewayConfig};
pub use pki::crl::CrlPolicy;
