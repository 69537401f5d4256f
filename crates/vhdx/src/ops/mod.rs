//! Whole-file operations built on the core: info, check/repair, merge (offline and live), compact,
//! rebase, map.

pub mod check;
pub mod compact;
pub mod info;
pub mod live_merge;
pub mod map;
pub mod merge;
pub mod rebase;
