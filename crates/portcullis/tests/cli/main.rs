//! The `portcullis` binary driven as SPEC.md's interface table says, as a real process. One
//! module per group of commands; one test binary.

#[path = "../common/mod.rs"]
mod common;

mod analyze_token;
mod commands;
mod deploy;
mod dev;
mod diagnosis;
mod instance_sets;
mod metrics_listen;
mod pki_and_certs;
mod processes;
mod support;
