//! What labs and tests run beside the gateway and connector: the reference management point
//! (`portcullis mp`), its IIS-style W3C log, and the device-side probe.

pub mod analyze;
pub mod mp;
pub mod probe;
