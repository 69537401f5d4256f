//! VHDX virtual disks (MS-VHDX): format parsing, creation, the metadata log, differencing chains,
//! resize, merge, compact, convert, check; a `BlockBackend` for the VMM.
//!
//! Layout: `format/` holds pure parsers/serialisers of on-disk structures; `layer` is one open
//! file (BAT, bitmaps, log writer, session GUIDs); `disk` chains layers into a [`Vhdx`] and
//! implements I/O; `ops/` holds whole-file operations (check, merge, compact, info).

mod backend;
mod create;
mod disk;
mod error;
mod fileio;
pub mod format;
mod freespace;
mod gate;
mod guid;
mod layer;
pub mod newfile;

mod ops;
mod vectored;
mod writeback;

pub mod convert;
pub mod vhd;

pub use create::{CreateOptions, DiskType};
pub use disk::{OpenOptions, Vhdx, MAX_CHAIN_DEPTH};
pub use error::VhdxError;
pub use fileio::FaultInjector;
pub use guid::Guid;
pub use layer::ReadOnlyReplay;
pub use ops::check::{CheckReport, Problem};
pub use ops::compact::CompactReport;
pub use ops::info::Info;
pub use ops::map::Extent;
pub use ops::rebase::Rebase;
pub use vireo_block::LockKind;
