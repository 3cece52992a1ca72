//! Whole-system tests only: see tests/system/, one module per feature, and README.md.
