//! Post-copy live migration (docs/migration.md, "Post-copy"): the VM switches over with pages
//! still on the source, runs on the destination at once, and pages it touches are fetched on
//! fault through a userfaultfd (`crate::uffd`, as lazy restore does) while the source streams
//! all the rest.
//!
//! - [`policy`]: when to switch to post-copy (`--postcopy auto|always|never`), pure.
//! - [`tracker`]: which pages the destination still lacks; each placed exactly once, pure.
//! - [`push`]: the background push shared by the source's streams (one cursor, one budget), pure.
//! - [`source`]: the source's serving: stream 0 answers requests first, every stream pushes
//!   the rest in address order.
//! - [`dest`]: the destination's fault and placement threads, and the "lost" path.

pub mod dest;
pub mod policy;
pub mod push;
pub mod source;
pub mod tracker;

pub use dest::{PostcopyIncoming, PostcopyOutcome};
pub use policy::PostcopyPolicy;
pub use source::PostcopyServed;

use crate::dirty::DirtyBitmap;
use crate::memory::PAGE_SIZE;

/// The missing pages as runs `(gpa, pages)`, in address order.
pub fn runs_of(bitmap: &DirtyBitmap) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for gpa in bitmap.pages() {
        match runs.last_mut() {
            Some((start, n)) if *start + *n * PAGE_SIZE == gpa => *n += 1,
            _ => runs.push((gpa, 1)),
        }
    }
    runs
}

impl super::VmHandle {
    /// Why this VM cannot take post-copy's page-by-page fill, if it cannot. A destination says
    /// so when the source opens the request channel, before any page moves:
    /// - RAM from the hugetlb pool takes userfaultfd fills only in whole 2 MiB pages
    ///   (`memory/hugetlb.rs`);
    /// - a vhost-user back end without `VHOST_USER_PROTOCOL_F_PAGEFAULT` maps guest RAM where
    ///   it would read a page still on the source as zeros.
    pub fn postcopy_refusal(&self) -> Option<String> {
        if self.0.ram.kind == crate::memory::RamKind::HugeTlb {
            return Some(
                "post-copy is not possible here: guest RAM is on the hugetlb pool, which \
                 userfaultfd fills only in whole 2 MiB pages"
                    .to_string(),
            );
        }
        self.0
            .transports
            .iter()
            .any(|t| !super::lock(t).can_postcopy())
            .then(|| {
                "post-copy is not possible here: a vhost-user back end maps guest RAM and does \
                 not offer VHOST_USER_PROTOCOL_F_PAGEFAULT, so it cannot wait for pages still \
                 on the source"
                    .to_string()
            })
    }
}

impl super::Vm {
    /// See [`super::VmHandle::postcopy_refusal`].
    pub fn postcopy_refusal(&self) -> Option<String> {
        self.handle().postcopy_refusal()
    }
}
