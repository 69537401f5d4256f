//! In-place apply of a save to the VM that runs (docs/vm-state.md, "In-place apply"): what
//! QEMU's `loadvm` does. Guest RAM stays the memfd it is; only the pages that differ from the
//! save are written, so no page is allocated (a fresh process pays 4–6 µs per page here).
//!
//! Which pages differ: a live save after which the VM runs on leaves the dirty log on
//! ([`LiveSaveOptions::track_changes`](super::LiveSaveOptions)); the log (KVM's, the VMM's
//! own writes, vhost-user back ends', `dirty.rs`) then holds every page written since the
//! save, and [`Tracked`] names that save. Applying that save copies exactly those pages from
//! `memory.bin`. Any other target (another save, tracking lost to a later save, a migration, a
//! reset or a stopped log) is applied by comparing every page with `memory.bin` and writing
//! the ones that differ; the log is then started for it, so applying it again is fast.
//!
//! A vhost-user NIC (a switch port) keeps its session with the back end: the pause stopped
//! its rings (GET_VRING_BASE), so the back end writes no guest RAM while the apply replaces it;
//! the transport reset stops them again and the saved state is loaded into the same device,
//! which at the resume starts every ring from the saved positions (SET_VRING_NUM/ADDR/BASE/
//! CALL/KICK/ENABLE; the back end reads `used.idx` from the reverted RAM on SET_VRING_ADDR).
//! The memory table is sent again, but it is the same memfd at the same addresses: the RAM did
//! not move. A new session would restart rings in exactly the same way and would need the
//! switch to accept a second connection for the port, so the session is kept. What the back
//! end wrote since the save (received frames, used entries) is in its share of the dirty log
//! when tracked, or found by the comparison otherwise.
//!
//! Locking: the lifecycle lock is held throughout (no pause, resume, reset or save comes in
//! between), and `tracking` only changes with it held. Every check that can refuse is made
//! before the pause; a failure after it (a page of `memory.bin` failing its checksum, KVM
//! refusing a state) ends the VM with [`VmExit::Error`], as a failed reset does, because its
//! memory is no longer any one guest's.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::state::{load_devices, load_machine};
use super::{lock, RestoreFrom, VmHandle};
use crate::dirty::DirtyBitmap;
use crate::exit::VmExit;
use crate::lifecycle::{Job, LoadJob, ParkError};
use crate::memory::PAGE_SIZE;
use crate::state::checksums::MemorySums;
use crate::state::{trace, StateError};

/// How long the parked vCPUs get to load their state.
const VCPU_LOAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read from `memory.bin` at a time (a run of changed pages, or a compared chunk).
const CHUNK: usize = 1 << 20;

/// The save whose changes the dirty log holds.
pub(super) struct Tracked {
    dir: PathBuf,
    /// The save's checksum table sum (`VmState::memory_sums`): a save written again into the
    /// same directory is another save.
    snapshot: u32,
}

/// What the VM does once the save is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterApply {
    /// Run (also a VM that was paused before).
    Resume,
    /// Stay paused.
    StayPaused,
}

/// How to apply a save in place.
#[derive(Clone, Copy, Debug)]
pub struct ApplyOptions {
    pub then: AfterApply,
    /// Keep (or start) tracking the changes since the save, so that applying it again copies
    /// only those. Costs the guest one write fault (~30 µs on KVM-PVM) on the first write to
    /// each page after the apply. Without it (the default) the log goes off and KVM's
    /// mappings are rebuilt, so the guest runs at full speed at once; a later apply of the
    /// same save compares every page.
    pub track: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            then: AfterApply::Resume,
            track: false,
        }
    }
}

/// What an in-place apply did.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    /// Only the pages written since the save were copied (the save was being tracked);
    /// `false`: every page was compared with `memory.bin`.
    pub tracked: bool,
    /// Pages of `memory.bin` written into guest RAM.
    pub pages_copied: u64,
    /// Pages compared with `memory.bin` (0 when tracked).
    pub pages_compared: u64,
    /// Changes since this save are tracked now (applying it again copies only those).
    pub tracking_now: bool,
    /// From the pause to the resume (or, staying paused, to the end).
    pub paused: Duration,
}

impl VmHandle {
    /// Brings this VM back to the save in `dir` in place: pauses it, makes guest RAM exactly
    /// the saved memory, loads vCPU, irqchip, PIT, clock, COM1 and device state as a restore
    /// does, then resumes or stays paused (`opts.then`). Disks are the caller's: they must hold
    /// what they held at the save (the worker swaps in new children of the checkpoint's files).
    ///
    /// Refused, with the VM running on untouched, when the save does not fit (memory size,
    /// vCPUs, devices — a disk hot-added since changes the list), has no page checksums, its
    /// memory file is short, or its vCPUs have not started. A failure after the pause ends the
    /// VM.
    pub fn apply_in_place(
        &self,
        dir: &Path,
        opts: &ApplyOptions,
    ) -> Result<ApplyReport, StateError> {
        self.apply_in_place_with(dir, opts, &mut || Ok(()))
    }

    /// [`apply_in_place`](Self::apply_in_place), with `first` run in the pause before anything
    /// of the VM is touched, the lifecycle lock held: where the worker puts the disks on new
    /// children of the checkpoint's files. If `first` fails, the VM goes on as it was (a
    /// running VM resumes, a paused one stays paused) and the error is
    /// [`StateError::Checkpoint`]; `first` must have undone its own part.
    pub fn apply_in_place_with(
        &self,
        dir: &Path,
        opts: &ApplyOptions,
        first: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<ApplyReport, StateError> {
        let from = RestoreFrom::dir(dir)?;
        let sums = from.sums.clone().ok_or_else(|| {
            StateError::Mismatch(format!(
                "{} was saved before memory checksums existed; an in-place apply needs them \
                 (restore it into a new VM instead)",
                dir.display()
            ))
        })?;
        let _op = lock(&self.0.lifecycle);
        if self.0.exit.is_set() {
            return Err(StateError::NotRunning);
        }
        self.wait_restored();
        let devices: Vec<u32> = self
            .0
            .transports
            .iter()
            .map(|t| lock(t).device_type())
            .collect();
        from.state
            .check_fits(self.0.ram.size, self.0.reload.vcpus, &devices)?;
        // What a device would refuse to load (a NIC's MAC, features) is refused here, while
        // the VM runs on: after the pause a refusal ends it.
        for (index, (t, saved)) in self.0.transports.iter().zip(&from.state.virtio).enumerate() {
            let t = lock(t);
            t.check_state(saved).map_err(|source| StateError::Device {
                index,
                kind: crate::virtio_mmio::device_name(t.device_type()),
                source,
            })?;
        }
        let io = |source| StateError::Io {
            path: from.memory.display().to_string(),
            source,
        };
        let memory = File::open(&from.memory).map_err(io)?;
        let len = memory.metadata().map_err(io)?.len();
        if len != self.0.ram.size {
            return Err(StateError::Truncated {
                path: from.memory.display().to_string(),
                what: format!("{len} bytes, the VM has {} bytes of RAM", self.0.ram.size),
            });
        }
        if self.0.control.alive() != self.0.reload.vcpus {
            return Err(StateError::Vcpus(format!(
                "{} of {} vCPUs are running; a VM that never ran cannot load a state in place",
                self.0.control.alive(),
                self.0.reload.vcpus
            )));
        }
        let was_paused = self.0.control.paused();
        let paused_at = Instant::now();
        self.pause_locked()
            .map_err(|e| StateError::Kvm(format!("pausing: {e}")))?;
        trace::mark("paused for the apply");
        if let Err(why) = first() {
            if !was_paused {
                self.resume_locked()
                    .map_err(|e| StateError::Kvm(format!("resuming: {e}")))?;
            }
            return Err(StateError::Checkpoint(why));
        }
        let mut report = match self.apply_paused(dir, &from, &sums, &memory, opts) {
            Ok(r) => r,
            Err(e) => {
                *lock(&self.0.tracking) = None;
                let why = format!("in-place apply of {} failed: {e}", dir.display());
                tracing::error!("{why}; the VM stops");
                self.0.exit.set(VmExit::Error(why));
                return Err(e);
            }
        };
        if opts.then == AfterApply::Resume {
            self.resume_locked()
                .map_err(|e| StateError::Kvm(format!("resuming: {e}")))?;
            trace::mark("resumed");
        }
        report.paused = paused_at.elapsed();
        tracing::info!(
            "applied {} in place: {} pages copied ({}), paused {:.1} ms",
            dir.display(),
            report.pages_copied,
            if report.tracked {
                "tracked since the save".to_string()
            } else {
                format!("{} compared", report.pages_compared)
            },
            report.paused.as_secs_f64() * 1e3
        );
        Ok(report)
    }

    /// The apply once paused: memory, then state, then tracking.
    fn apply_paused(
        &self,
        dir: &Path,
        from: &RestoreFrom,
        sums: &MemorySums,
        memory: &File,
        opts: &ApplyOptions,
    ) -> Result<ApplyReport, StateError> {
        let s = &self.0;
        let kvm = |e: crate::VmmError| StateError::Kvm(format!("dirty log: {e}"));
        let target = Tracked {
            dir: canonical(dir),
            snapshot: sums.table_sum(),
        };
        let tracked = lock(&s.tracking)
            .take()
            .is_some_and(|t| t.dir == target.dir && t.snapshot == target.snapshot)
            && s.dirty.is_logging();
        let path = from.memory.display().to_string();
        let mut report = ApplyReport {
            tracked,
            ..Default::default()
        };
        if tracked {
            // Everything written since the save (or the last apply of it), by anyone.
            let changed = s
                .dirty
                .fetch_and_clear(&s.vm_fd, &s.ram.memory)
                .map_err(kvm)?;
            report.pages_copied = self.copy_changed(memory, sums, &changed, &path)?;
        } else {
            let (compared, copied) = self.copy_differing(memory, sums, &path)?;
            report.pages_compared = compared;
            report.pages_copied = copied;
        }
        trace::mark("memory copied back");
        let st = &from.state;
        let down_ns = st.clock.down_ns();
        let mut vcpus = st.vcpus.clone();
        vcpus.sort_by_key(|v| v.id);
        let load = Arc::new(LoadJob { vcpus, down_ns });
        match s.control.run_job(Job::Load(load), VCPU_LOAD_TIMEOUT) {
            Ok(r) if r.errors.is_empty() => {}
            Ok(r) => return Err(StateError::Vcpus(r.errors.join("; "))),
            Err(ParkError::Released) => return Err(StateError::NotRunning),
            Err(ParkError::Timeout { parked, alive }) => {
                return Err(StateError::Vcpus(format!(
                    "only {parked} of {alive} loaded their state in time"
                )))
            }
        }
        trace::mark("vCPU state loaded");
        load_machine(s, st, down_ns)?;
        // The devices start over from the saved transports (their workers stop here).
        for t in &s.transports {
            lock(t).reset();
        }
        load_devices(s, st)?;
        // Activated devices park until the resume, as after a restore.
        self.pause_devices_locked()
            .map_err(|e| StateError::Kvm(format!("parking the loaded devices: {e}")))?;
        trace::mark("devices loaded");
        if !opts.track {
            // Off, and every mapping the log write-protected dropped: measured, a guest
            // rewriting its memory after the apply otherwise takes one ~30 µs fault per page.
            s.dirty.stop_and_remap(&s.vm_fd).map_err(kvm)?;
            trace::mark("log off, slots remapped");
        } else if tracked {
            *lock(&s.tracking) = Some(target);
        } else {
            match s.dirty.start(&s.vm_fd, &s.ram.memory) {
                Ok(()) => *lock(&s.tracking) = Some(target),
                Err(e) => tracing::warn!(
                    "not tracking changes since {}: {e}; the next apply of it compares every page",
                    dir.display()
                ),
            }
        }
        report.tracking_now = lock(&s.tracking).is_some();
        Ok(report)
    }

    /// Writes the pages in `changed` back from `memory` (checked against `sums`); contiguous
    /// runs are read and written in one call each. Returns the pages written.
    fn copy_changed(
        &self,
        memory: &File,
        sums: &MemorySums,
        changed: &DirtyBitmap,
        path: &str,
    ) -> Result<u64, StateError> {
        let mut buf = vec![0u8; CHUNK];
        let mut pages = 0u64;
        let mut flush = |start: u64, len: u64| -> Result<(), StateError> {
            let Some(off) = self.file_offset(start) else {
                return Ok(());
            };
            let b = &mut buf[..len as usize];
            self.read_checked(memory, sums, off, b, path)?;
            self.write_ram(off, b)?;
            pages += len / PAGE_SIZE;
            Ok(())
        };
        let mut run: Option<(u64, u64)> = None;
        for page in changed.pages() {
            run = match run {
                Some((start, len)) if start + len == page && len < CHUNK as u64 => {
                    Some((start, len + PAGE_SIZE))
                }
                Some((start, len)) => {
                    flush(start, len)?;
                    Some((page, PAGE_SIZE))
                }
                None => Some((page, PAGE_SIZE)),
            };
        }
        if let Some((start, len)) = run {
            flush(start, len)?;
        }
        Ok(pages)
    }

    /// Compares all of guest RAM with `memory` and writes the pages that differ. Returns
    /// (pages compared, pages written). Both are read with `pread`, so pages neither side
    /// ever held (holes) read as zeros without being allocated.
    fn copy_differing(
        &self,
        memory: &File,
        sums: &MemorySums,
        path: &str,
    ) -> Result<(u64, u64), StateError> {
        let size = self.0.ram.size;
        let (mut saved, mut now) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        let (mut compared, mut copied) = (0u64, 0u64);
        let mut off = 0u64;
        while off < size {
            let n = CHUNK.min((size - off) as usize);
            self.read_checked(memory, sums, off, &mut saved[..n], path)?;
            self.0
                .ram
                .memfd
                .read_exact_at(&mut now[..n], off)
                .map_err(|e| StateError::Kvm(format!("reading guest RAM at {off:#x}: {e}")))?;
            for (i, (a, b)) in saved[..n]
                .chunks(PAGE_SIZE as usize)
                .zip(now[..n].chunks(PAGE_SIZE as usize))
                .enumerate()
            {
                compared += 1;
                if a != b {
                    self.write_ram(off + i as u64 * PAGE_SIZE, a)?;
                    copied += 1;
                }
            }
            off += n as u64;
        }
        Ok((compared, copied))
    }

    /// Reads `buf.len()` bytes of `memory` at `off` and checks them against `sums`.
    fn read_checked(
        &self,
        memory: &File,
        sums: &MemorySums,
        off: u64,
        buf: &mut [u8],
        path: &str,
    ) -> Result<(), StateError> {
        memory
            .read_exact_at(buf, off)
            .map_err(|source| StateError::Io {
                path: path.to_string(),
                source,
            })?;
        sums.verify(off, buf).map_err(|e| StateError::Corrupt {
            path: path.to_string(),
            why: e.to_string(),
        })
    }

    /// Writes into guest RAM as a `pwrite` would: no guest write, so nothing lands in the dirty
    /// log (the page then equals the save, which is what the log must not report).
    fn write_ram(&self, off: u64, buf: &[u8]) -> Result<(), StateError> {
        self.0
            .ram
            .write_at(buf, off)
            .map_err(|e| StateError::Kvm(format!("writing guest RAM at {off:#x}: {e}")))
    }

    /// Records that the dirty log, on now, holds the changes since the save in `dir`.
    pub(super) fn track_snapshot(&self, dir: &Path, snapshot: u32) {
        *lock(&self.0.tracking) = Some(Tracked {
            dir: canonical(dir),
            snapshot,
        });
    }

    /// Forgets the tracked save and turns the log off (it costs the guest write faults).
    pub(super) fn stop_tracking(&self) {
        *lock(&self.0.tracking) = None;
        if self.0.dirty.is_logging() {
            if let Err(e) = self.0.dirty.stop(&self.0.vm_fd) {
                tracing::warn!("stopping the dirty log: {e}");
            }
        }
    }

    /// Whether the dirty log holds the changes since a save (for tests and the benchmark).
    pub fn tracking_changes(&self) -> bool {
        lock(&self.0.tracking).is_some()
    }
}

/// The same directory named two ways compares equal.
fn canonical(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}
