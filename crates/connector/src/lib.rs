//! The connector: inside the private network, it holds channels to the gateway (to come) and
//! forwards each proxied request to its endpoint over HTTPS with the client-authentication
//! certificate its filter chain selected.

pub mod endpoint;
pub mod run;
