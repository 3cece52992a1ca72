//! The contract between device, gateway and connector: how a device's path names an endpoint
//! ([`route`]), every refusal with its hop, status text and remedy ([`refusal`]), and the
//! reverse-HTTP/2 channel the connector dials and the gateway drives ([`tunnel`]), and why one
//! ended, in words ([`ended`]).

pub mod ended;
pub mod refusal;
pub mod route;
pub mod tunnel;
