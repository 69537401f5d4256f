//! The pre-copy loop that live save (`live_save.rs`) and live migration (`migrate.rs`) share:
//! turn on the dirty log, copy all of RAM while the guest runs, copy what it dirtied meanwhile
//! in rounds for as long as the caller's policy says so, pause, copy the last dirty pages.
//! Where the pages go (a file, migration streams) and when to stop (a page count, an estimated
//! downtime) is the [`RoundSink`]'s; the order of the steps, the dirty-log bookkeeping and the
//! "running as before on any error" rule live here once.
//!
//! Locking: the caller holds the VM's lifecycle lock for the whole loop (no pause, resume or
//! reset by anyone else can come in between); the loop pauses with `pause_locked`.

use std::time::{Duration, Instant};

use super::VmHandle;
use crate::dirty::{DirtyBitmap, LogMode};
use crate::state::StateError;

/// Where a pre-copy puts pages, and when it stops copying while the guest runs.
pub(super) trait RoundSink {
    type Error: From<StateError>;
    /// Copies all of guest RAM (the first pass; the guest runs). Returns bytes copied.
    fn full_pass(&mut self, vm: &VmHandle) -> Result<u64, Self::Error>;
    /// Copies the pages in `dirty`. Returns bytes copied.
    fn dirty_pass(&mut self, vm: &VmHandle, dirty: &DirtyBitmap) -> Result<u64, Self::Error>;
    /// After a pass: `dirty` pages are pending and `rounds` dirty passes are done. Whether
    /// to copy them while the guest runs (`true`) or pause now.
    fn another_round(
        &mut self,
        vm: &VmHandle,
        dirty: u64,
        rounds: u32,
    ) -> Result<bool, Self::Error>;
    /// How KVM's dirty log is cleared during this pre-copy (`ClearAsCopied`: the sink
    /// protects each region with `DirtyTracker::clear_region` right before it copies it).
    fn log_mode(&self) -> LogMode {
        LogMode::ClearOnFetch
    }
    /// Right before the pause (a migration stops throttling the guest here).
    fn before_pause(&mut self) {}
    /// Whether the dirty log stays on after a successful pre-copy: its log then holds the
    /// pages written since the copy was complete (a snapshot tracked for an in-place apply).
    fn keep_dirty_log(&self) -> bool {
        false
    }
    /// The pages left once paused (a post-copy migration lists them instead of copying).
    fn final_pass(&mut self, vm: &VmHandle, last: &DirtyBitmap) -> Result<u64, Self::Error> {
        self.dirty_pass(vm, last)
    }
}

/// What [`VmHandle::precopy_locked`] did.
#[derive(Clone, Copy, Debug)]
pub(super) struct Precopied {
    /// When the VM was paused.
    pub paused_at: Instant,
    /// Dirty passes while the guest ran (the full pass not counted).
    pub rounds: u32,
    /// Bytes the sink copied, all passes together.
    pub bytes: u64,
    /// Pages copied while paused.
    pub final_pages: u64,
    /// Where the pause's first part went.
    pub steps: PauseSteps,
}

/// The pause's steps up to the last pages, each as the time since `paused_at` (the pause
/// request: the guest's gap starts there, give or take the vCPUs' way out of KVM_RUN).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct PauseSteps {
    /// Stopping the throttle, before the pause request (not part of the pause).
    pub throttle_stop: Duration,
    pub vcpus_parked: Duration,
    pub devices_parked: Duration,
    /// The last dirty log (KVM's, the VMM's, the back ends') fetched and cleared.
    pub dirty_fetched: Duration,
    /// The last pages handed to the streams.
    pub last_pages: Duration,
}

impl VmHandle {
    /// Full pass, dirty rounds, pause, last pages. The VM must be running and the lifecycle
    /// lock held. On success the VM is paused; on an error it runs as before.
    pub(super) fn precopy_locked<S: RoundSink>(&self, sink: &mut S) -> Result<Precopied, S::Error> {
        let s = &self.0;
        let kvm = |e: crate::VmmError| StateError::Kvm(format!("dirty log: {e}"));
        // A new pre-copy restarts the log: changes since an earlier snapshot are lost with it.
        *super::lock(&s.tracking) = None;
        s.log_left_on
            .store(false, std::sync::atomic::Ordering::SeqCst);
        s.dirty
            .start_with(&s.vm_fd, &s.ram.memory, sink.log_mode())
            .map_err(kvm)?;
        let result = (|| {
            let mut bytes = sink.full_pass(self)?;
            let mut pending = s
                .dirty
                .fetch_and_clear(&s.vm_fd, &s.ram.memory)
                .map_err(kvm)?;
            let mut rounds = 0;
            while sink.another_round(self, pending.count() as u64, rounds)? {
                tracing::debug!(
                    "pre-copy round {}: {} dirty pages",
                    rounds + 1,
                    pending.count()
                );
                bytes += sink.dirty_pass(self, &pending)?;
                rounds += 1;
                pending = s
                    .dirty
                    .fetch_and_clear(&s.vm_fd, &s.ram.memory)
                    .map_err(kvm)?;
            }
            let mut steps = PauseSteps::default();
            let t = Instant::now();
            sink.before_pause();
            steps.throttle_stop = t.elapsed();
            let paused_at = Instant::now();
            let pausing = |e| StateError::Kvm(format!("pausing: {e}"));
            self.pause_vcpus_locked().map_err(pausing)?;
            steps.vcpus_parked = paused_at.elapsed();
            self.pause_devices_locked().map_err(pausing)?;
            steps.devices_parked = paused_at.elapsed();
            let last = (|| {
                // Pages dirtied since the last fetch, plus those fetched but not copied.
                let mut last = s
                    .dirty
                    .fetch_and_clear(&s.vm_fd, &s.ram.memory)
                    .map_err(kvm)?;
                union(&mut last, &pending);
                steps.dirty_fetched = paused_at.elapsed();
                let n = last.count() as u64;
                let b = sink.final_pass(self, &last)?;
                steps.last_pages = paused_at.elapsed();
                Ok::<_, S::Error>((n, b))
            })();
            match last {
                Ok((final_pages, b)) => Ok(Precopied {
                    paused_at,
                    rounds,
                    bytes: bytes + b,
                    final_pages,
                    steps,
                }),
                Err(e) => {
                    let _ = self.resume_locked();
                    Err(e)
                }
            }
        })();
        if result.is_err() || !sink.keep_dirty_log() {
            if let Err(e) = s.dirty.stop(&s.vm_fd) {
                tracing::warn!("stopping the dirty log after pre-copy: {e}");
            }
        }
        result
    }

    /// The memfd offset of guest-physical `gpa` (`None`: not RAM).
    pub(super) fn file_offset(&self, gpa: u64) -> Option<u64> {
        file_offset(self.0.ram.size, gpa)
    }
}

/// The memfd (and memory file) offset of guest-physical `gpa` in RAM of `size` bytes.
pub(crate) fn file_offset(size: u64, gpa: u64) -> Option<u64> {
    let mut file_off = 0;
    for (start, len) in crate::memory::ram_ranges(size) {
        if gpa >= start && gpa < start + len {
            return Some(file_off + gpa - start);
        }
        file_off += len;
    }
    None
}

/// ORs `b` into `a` (same regions, same sizes).
pub(super) fn union(a: &mut DirtyBitmap, b: &DirtyBitmap) {
    for ((_, wa), (_, wb)) in a.regions.iter_mut().zip(&b.regions) {
        for (x, y) in wa.iter_mut().zip(wb) {
            *x |= y;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_ors_bitmaps() {
        let mut a = DirtyBitmap {
            regions: vec![(0, vec![1, 0])],
        };
        let b = DirtyBitmap {
            regions: vec![(0, vec![2, 8])],
        };
        union(&mut a, &b);
        assert_eq!(a.regions[0].1, vec![3, 8]);
    }

    #[test]
    fn file_offsets_skip_the_mmio_hole() {
        use crate::memory::{MMIO_HOLE_END, MMIO_HOLE_START};
        assert_eq!(file_offset(64 << 20, 0x1000), Some(0x1000));
        assert_eq!(file_offset(64 << 20, 64 << 20), None);
        let big = MMIO_HOLE_START + (1 << 30);
        assert_eq!(file_offset(big, MMIO_HOLE_END), Some(MMIO_HOLE_START));
        assert_eq!(file_offset(big, MMIO_HOLE_START), None);
    }
}
