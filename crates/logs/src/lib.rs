//! Log formats admins already read, and reading them back:
//!
//! - [`cmtrace`]: the CMTrace line, and stamping one for now;
//! - [`rolling`]: the file every writer appends to, with rollover to `.lo_` and a full disk
//!   survived;
//! - [`w3c`]: IIS W3C extended lines, as the reference management point writes them;
//! - [`console`]: plain or JSON lines on standard output, for containers;
//! - [`escape`]: what every writer does to a message so that outside text in it cannot
//!   start, end or forge a line;
//! - [`logger`]: what components log through, with verbose switchable while running;
//! - [`parse`]: CMTrace, W3C and console lines read back, hostile files included;
//! - [`diagnose`]: the rules behind `portcullis doctor logs`.

pub mod cmtrace;
pub mod console;
pub mod diagnose;
pub mod escape;
pub mod logger;
pub mod parse;
pub mod rolling;
pub mod w3c;

pub use logger::{Log, Logger};
