//! The runtime the gateway and the connector both run on: the accept loop ([`listener`]), thread
//! per core ([`shards`]), the local admin surface ([`admin`]) with its Prometheus series
//! ([`metrics`]) and status page ([`page`], [`activity`]), and TOML configuration loading with
//! the validation both share ([`config`]). What the two ends say to each other is `channel`'s.

pub mod activity;
pub mod admin;
pub mod config;
pub mod listener;
pub mod metrics;
pub mod page;
pub mod shards;
