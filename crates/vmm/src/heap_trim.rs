//! How far glibc's allocator may let freed heap pile up before it hands it back to the kernel,
//! raised for the page streams of a migration.
//!
//! Why: the TLS library encrypts each 16 KiB record into a fresh allocation and frees it once
//! the socket took it, up to 4 MiB in flight per stream. With glibc's default trim threshold
//! (128 KiB, adjusted only by freed `mmap`ed chunks) each stream thread's arena grew by
//! `mprotect` and page faults and shrank by `madvise(MADV_DONTNEED)` over and over: profiled
//! with `sched_switch` during `vireo-bench migrate`, the source's stream threads spent more
//! time waiting in those page faults, `mprotect`, `madvise` and on the `mmap` lock they take
//! than encrypting (docs/migration.md, "Where round 0 went"). Keeping up to
//! [`KEEP_FREED`] per arena makes the memory the first batches used serve all later ones.
//!
//! Process-wide and kept: a source worker ends with its migration, and a failed one keeps a
//! few MiB more of its freed heap mapped.

/// Freed heap an arena keeps before trimming: several streams' TLS buffers (4 MiB each) with
/// room to spare, well below a guest's RAM.
const KEEP_FREED: libc::c_int = 64 << 20;

/// Raises glibc's trim threshold to [`KEEP_FREED`] (once; later calls do nothing). Other C
/// libraries have no such knob and keep their behaviour.
pub(crate) fn keep_freed_heap() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(target_env = "gnu")]
        // SAFETY: mallopt only changes the allocator's tuning parameters; any value is valid.
        if unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_FREED) } != 1 {
            tracing::debug!("mallopt(M_TRIM_THRESHOLD) refused: the heap trims as before");
        }
    });
}
