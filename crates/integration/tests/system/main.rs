//! Whole-system tests: a real gateway, connector and reference management point on loopback,
//! with real TLS and real certificates (`testkit::System`). One module per feature; one test
//! binary, so the whole system is linked once.

mod auth;
mod channel_health;
mod connection_limits;
mod connector_trust;
mod continuous_analysis;
mod device_input;
mod device_probe;
mod drain;
mod fair_shares;
mod faults;
mod header_limits;
mod management_point;
mod metrics;
mod oidc;
mod path;
mod prometheus;
mod proxy_protocol;
mod reload;
mod shards;
mod small_pieces_and_methods;
mod status_page;
mod support;
