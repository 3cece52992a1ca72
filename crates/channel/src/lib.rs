//! The contract between device, gateway and connector: how a device's path names an endpoint
//! ([`route`]), and every refusal with its hop, status text and remedy ([`refusal`]). The
//! reverse-HTTP/2 channel (dial, accept, hello, registry) joins it here.

pub mod refusal;
pub mod route;
