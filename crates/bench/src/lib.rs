//! `portcullis bench`: the load generator ([`load`]), the idle-connection bench
//! ([`connections`]) and the side-by-side comparison ([`compare`]).

pub mod compare;
pub mod connections;
pub mod load;
pub mod procstat;
