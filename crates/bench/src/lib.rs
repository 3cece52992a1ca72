//! `portcullis bench`: the load generator ([`load`]), the idle-connection bench
//! ([`connections`]), the side-by-side comparison ([`compare`]) and the fault drill
//! ([`faults`]).

pub mod compare;
pub mod connections;
pub mod devices;
pub mod faults;
pub mod load;
pub mod procstat;
