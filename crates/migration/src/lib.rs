//! The wire format of live migration (issue 12, `docs/migration.md`): what one vireod sends
//! another to move a running VM. It knows nothing of KVM, TLS or the daemon: a sender turns
//! pages and device state into [`record`]s on any `Write`, a receiver applies them to any
//! [`GuestRam`]. That keeps the format testable (and fuzzable) without a VM, and lets the same
//! code run over one TLS stream or several.
//!
//! - [`preamble`]: the first bytes of every stream (magic, version, session, stream index).
//! - [`record`]: framing — kind, codec, length, CRC-32C (left out of page records on a TLS
//!   stream, whose AEAD covers them); bounded sizes.
//! - [`pages`]: page batches with zero-page markers, compressed per batch ([`codec`]).
//! - [`auto`]: when compression pays (Hyper-V picks it automatically, so do we).
//! - [`disk`]: disk data of a shared-nothing migration (source worker → destination vireod).
//! - [`hostauth`]: host identities and pinned mutual TLS for migration channels.
//! - [`streams`]: which stream carries which page, so a page's versions never overtake each
//!   other across streams.
//! - [`postcopy`]: the missing-page list, page requests and the end of post-copy.
//! - [`sender`] / [`receiver`]: one stream's two ends; the receiver checks every record
//!   before it applies anything of it to guest RAM.

pub mod auto;
pub mod codec;
pub mod disk;
pub mod error;
pub mod hostauth;
pub mod pages;
pub mod postcopy;
pub mod preamble;
pub mod receiver;
pub mod record;
pub mod sender;
pub mod streams;
pub mod tls_records;

pub use codec::Codec;
pub use error::MigrationError;
pub use receiver::{GuestRam, Receiver};

/// Guest pages are 4 KiB everywhere Vireo runs (x86-64).
pub const PAGE_SIZE: usize = 4096;
