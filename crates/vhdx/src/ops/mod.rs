//! Whole-file operations built on the core: info, check/repair, merge, compact.

pub mod check;
pub mod compact;
pub mod info;
pub mod merge;
