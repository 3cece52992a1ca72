//! The rules behind doctor logs: to come.
