//! `portcullis bench compare`: the same management point behind each system, the same load.
