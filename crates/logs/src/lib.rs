//! Log formats admins already read. Today: the CMTrace line. To come (see ARCHITECTURE.md):
//! rollover writers, the W3C writer, parsers and the diagnosis rules.

pub mod cmtrace;

/// Where a component's log lines go: severity (1 info, 2 warning, 3 error, as CMTrace's
/// `type`) and the message. Components take one; the binary decides where it writes.
pub type Log = std::sync::Arc<dyn Fn(u8, &str) + Send + Sync>;
