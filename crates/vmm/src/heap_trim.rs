//! How far glibc's allocator may let freed heap pile up before it hands it back to the kernel,
//! raised for the page streams of a migration.
//!
//! Why: the TLS library encrypts each 16 KiB record into a fresh allocation and frees it once
//! the socket took it, up to 4 MiB in flight per stream. With glibc's default trim threshold
//! (128 KiB, adjusted only by freed `mmap`ed chunks) each stream thread's arena grew by
//! `mprotect` and page faults and shrank by `madvise(MADV_DONTNEED)` over and over: profiled
//! with `sched_switch` during `vireo-bench migrate`, the source's stream threads spent more
//! time waiting in those page faults, `mprotect`, `madvise` and on the `mmap` lock they take
//! than encrypting (docs/migration-performance.md, "Where round 0 went"). Keeping up to
//! [`KEEP_FREED`] per arena makes the memory the first batches used serve all later ones.
//!
//! Raised only while a migration's pages flow ([`FreedHeapKept`]): a migration that fails or
//! is cancelled leaves a VM running on here, whose VMM must not keep tens of MiB of freed heap
//! mapped for the rest of its life (its memory overhead is a promise, docs/SPECIFICATION.md).

use std::sync::Mutex;

/// Freed heap an arena keeps before trimming: several streams' TLS buffers (4 MiB each) with
/// room to spare, well below a guest's RAM.
const KEEP_FREED: libc::c_int = 64 << 20;

/// glibc's default trim threshold, set back when the last holder ends. (Setting any value
/// turns off glibc's own adjustment of it, which only ever raised it.)
const DEFAULT_TRIM: libc::c_int = 128 << 10;

/// How many [`FreedHeapKept`] are alive (migrations in flight in this process).
static HOLDERS: Mutex<usize> = Mutex::new(0);

/// While alive, glibc keeps up to [`KEEP_FREED`] of freed heap per arena; when the last one
/// drops, the default threshold is back and the freed heap is returned to the kernel.
#[must_use = "the threshold falls back as soon as this is dropped"]
pub(crate) struct FreedHeapKept(());

/// Raises glibc's trim threshold until the returned value drops. Other C libraries have no
/// such knob and keep their behaviour.
pub(crate) fn keep_freed_heap() -> FreedHeapKept {
    let mut n = HOLDERS.lock().unwrap_or_else(|e| e.into_inner());
    if *n == 0 {
        set_trim_threshold(KEEP_FREED);
    }
    *n += 1;
    FreedHeapKept(())
}

impl Drop for FreedHeapKept {
    fn drop(&mut self) {
        let mut n = HOLDERS.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            set_trim_threshold(DEFAULT_TRIM);
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only returns free memory at the top of each arena to the
            // kernel; it touches no allocation in use.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

fn set_trim_threshold(bytes: libc::c_int) {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes the allocator's tuning parameters; any value is valid.
    if unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, bytes) } != 1 {
        tracing::debug!(
            bytes,
            "mallopt(M_TRIM_THRESHOLD) refused: the heap trims as before"
        );
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = bytes;
}

/// Grows the calling thread's malloc arena by about `bytes`, in TLS-record-sized pieces
/// touched once, and frees them, so the arena keeps them (while a [`FreedHeapKept`] is alive).
/// For a thread that will encrypt at a moment that counts: rustls takes a fresh allocation
/// per 16 KiB record, and in an arena that never held that much each one grew it by an
/// `mprotect` and page faults. Traced: the migration thread that sends the pause's last
/// pages, whose arena had served no stream before, spent ~0.5 ms of the guest's pause so.
pub(crate) fn warm_this_arena(bytes: usize) {
    // Below glibc's mmap threshold, so the pieces come from the arena, not their own maps.
    const PIECE: usize = 16 << 10;
    let pieces: Vec<Vec<u8>> = (0..bytes.div_ceil(PIECE))
        .map(|_| vec![0xa5u8; PIECE])
        .collect();
    std::hint::black_box(&pieces);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holders() -> usize {
        *HOLDERS.lock().unwrap()
    }

    #[test]
    fn the_threshold_is_raised_only_while_a_migration_holds_it() {
        let before = holders();
        let a = keep_freed_heap();
        let b = keep_freed_heap();
        assert_eq!(holders(), before + 2);
        drop(a);
        assert_eq!(holders(), before + 1, "one migration still runs");
        drop(b);
        assert_eq!(holders(), before, "the last one ended: back to the default");
    }
}
