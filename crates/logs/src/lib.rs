//! Log formats admins already read. Today: the CMTrace line. To come (see ARCHITECTURE.md):
//! rollover writers, the W3C writer, parsers and the diagnosis rules.

pub mod cmtrace;
