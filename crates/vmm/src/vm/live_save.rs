//! Live save (docs/vm-state.md, "Live save"): memory goes to `memory.bin` while the guest runs,
//! the dirty log (KVM's, merged with the VMM's own writes, `dirty.rs`) says which pages to copy
//! again, and the VM is paused only for the last dirty pages and the device/vCPU state. Then it
//! stays paused (a save: the caller stops it) or runs on (a snapshot, for checkpoints).
//!
//! Locking: the lifecycle lock is held from start to end, so no pause, resume or reset by
//! anyone else can come in between (they wait); the rounds run with the guest running.
//! Files: memory goes to a temporary name and is renamed, its page checksums (`memory.crc`,
//! summed from the bytes as they are written, so the pause adds only the last pages' sums)
//! beside it, then `vm.state` is written; an old `vm.state` is removed first. So a failure at any point leaves no `vm.state` beside memory it
//! does not describe, and the VM runs (or stays paused) as before.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::rounds::{union, RoundSink};
use super::state::{MEMORY_FILE, STATE_FILE, SUMS_FILE, WORKING_SET_FILE};
use super::{lock, VmHandle};
use crate::dirty::DirtyBitmap;
use crate::memory::PAGE_SIZE;
use crate::state::checksums::SumsBuilder;
use crate::state::working_set::WorkingSet;
use crate::state::{self, trace, Identity, StateError};

/// What the VM does once its state is on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterSave {
    /// Stay paused (a save: the caller stops the VM).
    StayPaused,
    /// Run on (a snapshot for a checkpoint). A VM that was paused before stays paused.
    Resume,
}

/// Limits of the copy rounds.
#[derive(Clone, Debug)]
pub struct LiveSaveOptions {
    pub then: AfterSave,
    /// Copy rounds over dirty pages while the guest runs, after the first full pass.
    pub max_rounds: u32,
    /// Pause as soon as at most this many pages are dirty.
    pub pause_at_pages: u64,
    /// A save after which the VM runs on (a snapshot, a checkpoint) keeps the dirty log on,
    /// so that [`VmHandle::apply_in_place`] of this save copies back only the pages written
    /// since (`apply.rs`). Costs the guest one write fault per page it writes afterwards.
    pub track_changes: bool,
    /// Without `track_changes`, a VM that runs on gets its memory slots registered anew in
    /// the pause (as `dirty.rs`'s `stop_and_remap`): otherwise every page the rounds'
    /// last fetch write-protected costs the guest a ~30 µs fault on its next write (measured,
    /// docs/vm-state.md "Live save"). Off only to measure that.
    pub remap_after: bool,
}

impl Default for LiveSaveOptions {
    fn default() -> Self {
        LiveSaveOptions {
            then: AfterSave::StayPaused,
            max_rounds: 8,
            pause_at_pages: 256,
            track_changes: true,
            remap_after: true,
        }
    }
}

/// What a live save did.
#[derive(Clone, Debug, Default)]
pub struct SaveReport {
    /// Copy rounds over dirty pages while the guest ran (the full pass not counted).
    pub rounds: u32,
    /// Bytes of memory written to the file, all passes together.
    pub bytes_written: u64,
    /// Pages copied while paused.
    pub final_pages: u64,
    /// Guest-visible pause: from the pause to the resume (or, when the VM stays paused, to
    /// the end of the save).
    pub pause: Duration,
    /// The whole save, from the call to the state file on disk.
    pub total: Duration,
    /// Of the pause, the memory slots' registration anew (`LiveSaveOptions::remap_after`).
    pub remap: Duration,
}

/// The convergence policy, a pure function: go on with another round while running?
/// `dirty` pages are dirty now, `previous` were dirty before the last round (`None` before
/// the first), `rounds` done.
pub fn another_round(
    dirty: u64,
    previous: Option<u64>,
    rounds: u32,
    opts: &LiveSaveOptions,
) -> bool {
    if dirty <= opts.pause_at_pages || rounds >= opts.max_rounds {
        return false;
    }
    // Not shrinking by at least a quarter: the guest dirties as fast as we copy, so further
    // rounds only add work and the pause would not get shorter.
    match previous {
        Some(prev) => dirty * 4 < prev * 3,
        None => true,
    }
}

/// Live save's side of the shared pre-copy loop: pages go into the memory file.
struct FileSink<'a> {
    out: &'a TempFile,
    opts: &'a LiveSaveOptions,
    /// Dirty pages before the last round.
    previous: Option<u64>,
    /// Every page copied again because the guest wrote it while the save ran: its working
    /// set, which a restore fetches first.
    hot: Option<DirtyBitmap>,
    /// A checkpoint syncs the file before its resume: most of it before the pause, while the
    /// guest still runs, so the sync in the pause has only the last pages.
    presync: bool,
    /// The dirty log stays on after the pause (tracking changes since this save).
    keep_log: bool,
}

impl RoundSink for FileSink<'_> {
    type Error = StateError;
    fn full_pass(&mut self, vm: &VmHandle) -> Result<u64, StateError> {
        vm.copy_all(self.out)
    }
    fn dirty_pass(&mut self, vm: &VmHandle, dirty: &DirtyBitmap) -> Result<u64, StateError> {
        match &mut self.hot {
            Some(hot) => union(hot, dirty),
            None => self.hot = Some(dirty.clone()),
        }
        vm.copy_pages(self.out, dirty)
    }
    fn another_round(&mut self, _: &VmHandle, dirty: u64, rounds: u32) -> Result<bool, StateError> {
        let go = another_round(dirty, self.previous, rounds, self.opts);
        self.previous = Some(dirty);
        Ok(go)
    }
    fn keep_dirty_log(&self) -> bool {
        self.keep_log
    }
    fn before_pause(&mut self) {
        if self.presync {
            // A failure here shows again in the sync during the pause, which fails the save.
            if let Err(e) = self.out.sync() {
                tracing::warn!("syncing the memory file before the pause: {e}");
            }
        }
    }
}

impl VmHandle {
    /// Saves the VM into `dir` (created if missing) while it runs: see the module docs. A VM
    /// that is paused already is saved in one pass (nothing can dirty its memory).
    /// Hot add/remove must be held off by the caller, as for [`VmHandle::save`].
    pub fn save_live(
        &self,
        dir: &Path,
        identity: Identity,
        spec: Option<String>,
        opts: &LiveSaveOptions,
    ) -> Result<SaveReport, StateError> {
        self.save_live_with(dir, identity, spec, opts, None)
    }

    /// A checkpoint of the running (or paused) VM (docs/checkpoints.md, "Live capture"): as
    /// [`Self::save_live`], but `memory.bin` and `vm.state` are made durable while the VM is
    /// still paused, then `between` runs with the VM paused and the lifecycle lock still held
    /// (the worker swaps its disks onto new differencing children there), then a VM that was
    /// running resumes (`opts.then` is ignored). If `between` fails, both files are removed
    /// before the VM resumes, so no `vm.state` is left that no disk matches. The report's
    /// `pause` covers the whole stop, `between` included.
    pub fn checkpoint_live(
        &self,
        dir: &Path,
        identity: Identity,
        spec: Option<String>,
        opts: &LiveSaveOptions,
        between: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<SaveReport, StateError> {
        self.save_live_with(dir, identity, spec, opts, Some(between))
    }

    fn save_live_with(
        &self,
        dir: &Path,
        identity: Identity,
        spec: Option<String>,
        opts: &LiveSaveOptions,
        between: Option<&mut dyn FnMut() -> Result<(), String>>,
    ) -> Result<SaveReport, StateError> {
        let _op = lock(&self.0.lifecycle);
        if self.0.exit.is_set() {
            return Err(StateError::NotRunning);
        }
        // Memory must be all in before it is read through the memfd.
        self.wait_restored();
        let was_paused = self.0.control.paused();
        let runs_on = !was_paused && (between.is_some() || opts.then == AfterSave::Resume);
        let track = opts.track_changes && runs_on;
        let result = self.save_live_locked(dir, identity, spec, opts, between, track);
        match &result {
            Ok((_, snapshot)) if track => self.track_snapshot(dir, *snapshot),
            Err(_) if track => self.stop_tracking(),
            _ => {}
        }
        result.map(|(report, _)| report)
    }

    /// Before a live save's resume: an untracked VM's slots registered anew (see
    /// `LiveSaveOptions::remap_after`). A failure only costs the guest speed, so it is logged.
    fn remap_unless_tracked(&self, track: bool, opts: &LiveSaveOptions) -> Duration {
        if track || !opts.remap_after {
            return Duration::ZERO;
        }
        let started = Instant::now();
        if let Err(e) = self.0.dirty.stop_and_remap(&self.0.vm_fd) {
            tracing::warn!("registering the memory slots anew after the save: {e}");
        }
        trace::mark("slots remapped");
        started.elapsed()
    }

    /// The save, with the lifecycle lock held; also returns the save's memory identity (its
    /// checksum table's sum). With `track`, the dirty log is left on once the VM runs on.
    fn save_live_locked(
        &self,
        dir: &Path,
        identity: Identity,
        spec: Option<String>,
        opts: &LiveSaveOptions,
        between: Option<&mut dyn FnMut() -> Result<(), String>>,
        track: bool,
    ) -> Result<(SaveReport, u32), StateError> {
        let started = Instant::now();
        let was_paused = self.0.control.paused();
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| StateError::Io {
                path: path.clone(),
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        // Saving over an older save: its state file goes first (see the module docs).
        // The working set goes with it: a stale one would only be a wrong hint, but a save
        // of a paused VM writes none.
        for name in [STATE_FILE, WORKING_SET_FILE] {
            match std::fs::remove_file(dir.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(dir)(e)),
                _ => {}
            }
        }
        let tmp = dir.join(format!(".{MEMORY_FILE}.tmp-{}", std::process::id()));
        let out = TempFile::create(&tmp, self.0.ram.size)?;
        let mut report = SaveReport::default();
        let mut hot = None;
        let paused_at = if was_paused {
            report.bytes_written = self.copy_all(&out)?;
            None
        } else {
            let mut sink = FileSink {
                out: &out,
                opts,
                previous: None,
                hot: None,
                presync: between.is_some(),
                keep_log: track,
            };
            let done = self.precopy_locked(&mut sink)?;
            report.rounds = done.rounds;
            report.bytes_written = done.bytes;
            report.final_pages = done.final_pages;
            hot = sink.hot.take();
            Some(done.paused_at)
        };
        // Paused from here on; any error below resumes a VM that was running.
        let undo = |e: StateError| {
            if !was_paused {
                let _ = self.resume_locked();
            }
            e
        };
        let mut state = self.save_state_locked(identity, spec).map_err(undo)?;
        // Memory is final now (paused); its table binds it to this state.
        let sums = out.sums.finish();
        state.memory_sums = Some(sums.table_sum());
        if let Some(between) = between {
            // A checkpoint: durable files, then the caller's step, all before the resume.
            let done = (|| {
                state::file::write_sums(&dir.join(SUMS_FILE), &sums)?;
                out.commit(&dir.join(MEMORY_FILE))?;
                state::write_state(&dir.join(STATE_FILE), &state)?;
                between().map_err(StateError::Checkpoint)
            })();
            if let Err(e) = done {
                let _ = std::fs::remove_file(dir.join(STATE_FILE));
                let _ = std::fs::remove_file(dir.join(MEMORY_FILE));
                return Err(undo(e));
            }
            if !was_paused {
                report.remap = self.remap_unless_tracked(track, opts);
                self.resume_locked()
                    .map_err(|e| StateError::Kvm(format!("resuming: {e}")))?;
            }
            report.pause = paused_at.map_or(Duration::ZERO, |at| at.elapsed());
            // The working set is only a hint for a restore: written after the resume (outside
            // the guest's pause); a checkpoint without one (a crash here) restores the same.
            if let Some(hot) = &hot {
                let ranges = crate::memory::ram_ranges(self.0.ram.size);
                let path = dir.join(WORKING_SET_FILE);
                if let Err(e) = WorkingSet::from_dirty(hot, &ranges).write(&path, self.0.ram.size) {
                    tracing::warn!(
                        "writing {}: {e}; restores from it fault those pages in",
                        path.display()
                    );
                }
            }
            report.total = started.elapsed();
            tracing::info!(
                "VM checkpointed live to {}: {} rounds, {} MiB written, {} pages while paused, paused {:.1} ms, total {} ms",
                dir.display(),
                report.rounds,
                report.bytes_written >> 20,
                report.final_pages,
                report.pause.as_secs_f64() * 1e3,
                report.total.as_millis()
            );
            return Ok((report, sums.table_sum()));
        }
        if !was_paused && opts.then == AfterSave::Resume {
            report.remap = self.remap_unless_tracked(track, opts);
            self.resume_locked()
                .map_err(|e| StateError::Kvm(format!("resuming: {e}")))?;
        }
        let pause_end = Instant::now();
        // The bytes are in the page cache already; making them durable needs no pause.
        let finish = || -> Result<(), StateError> {
            if let Some(hot) = &hot {
                // What the guest wrote while the save ran: a restore fetches it first.
                let ranges = crate::memory::ram_ranges(self.0.ram.size);
                let path = dir.join(WORKING_SET_FILE);
                WorkingSet::from_dirty(hot, &ranges)
                    .write(&path, self.0.ram.size)
                    .map_err(io(&path))?;
            }
            state::file::write_sums(&dir.join(SUMS_FILE), &sums)?;
            out.commit(&dir.join(MEMORY_FILE))?;
            state::write_state(&dir.join(STATE_FILE), &state)
        };
        let result = finish();
        let resumed = !was_paused && opts.then == AfterSave::Resume;
        if let Err(e) = result {
            return Err(if resumed { e } else { undo(e) });
        }
        report.pause = match paused_at {
            Some(at) if resumed => pause_end - at,
            Some(at) => at.elapsed(),
            None => Duration::ZERO,
        };
        report.total = started.elapsed();
        tracing::info!(
            "VM saved live to {}: {} rounds, {} MiB written, {} pages while paused, paused {:.1} ms, total {} ms",
            dir.display(),
            report.rounds,
            report.bytes_written >> 20,
            report.final_pages,
            report.pause.as_secs_f64() * 1e3,
            report.total.as_millis()
        );
        Ok((report, sums.table_sum()))
    }

    /// Copies all of guest RAM that is not zero (first pass; the guest may be running).
    fn copy_all(&self, out: &TempFile) -> Result<u64, StateError> {
        const CHUNK: usize = 1 << 20;
        let ram = &self.0.ram;
        let mut buf = vec![0u8; CHUNK];
        let mut written = 0u64;
        let mut off = 0u64;
        while off < ram.size {
            let n = CHUNK.min((ram.size - off) as usize);
            // pread on the memfd: pages never touched read as zeros without being allocated.
            ram.memfd
                .read_exact_at(&mut buf[..n], off)
                .map_err(|e| StateError::Kvm(format!("reading guest RAM at {off:#x}: {e}")))?;
            if buf[..n].iter().any(|&b| b != 0) {
                out.write(&buf[..n], off)?;
                written += n as u64;
            }
            off += n as u64;
        }
        Ok(written)
    }

    /// Copies the pages in `dirty`, contiguous runs in one write each.
    fn copy_pages(&self, out: &TempFile, dirty: &DirtyBitmap) -> Result<u64, StateError> {
        const MAX_RUN: u64 = 1 << 20;
        let mut buf = vec![0u8; MAX_RUN as usize];
        let mut written = 0u64;
        let mut flush =
            |start: u64, len: u64| -> Result<(), StateError> {
                let Some(file_off) = self.file_offset(start) else {
                    return Ok(());
                };
                let b = &mut buf[..len as usize];
                self.0.ram.memfd.read_exact_at(b, file_off).map_err(|e| {
                    StateError::Kvm(format!("reading guest RAM at {start:#x}: {e}"))
                })?;
                out.write(b, file_off)?;
                written += len;
                Ok(())
            };
        let mut run: Option<(u64, u64)> = None;
        for page in dirty.pages() {
            run = match run {
                Some((start, len)) if start + len == page && len < MAX_RUN => {
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
        Ok(written)
    }

    /// Waits until a lazy restore has all of memory in (at once if there is none).
    pub(super) fn wait_restored(&self) {
        if let Some(lazy) = lock(&self.0.lazy).as_ref() {
            lazy.wait();
        }
    }

    /// Whether a lazy restore is still filling guest RAM.
    pub fn restoring_memory(&self) -> bool {
        lock(&self.0.lazy)
            .as_ref()
            .is_some_and(|l| l.status().is_none())
    }
}

/// The memory file being written, with the checksums of every page written to it; removed
/// on drop unless committed.
struct TempFile {
    file: File,
    path: PathBuf,
    committed: std::cell::Cell<bool>,
    sums: SumsBuilder,
}

impl TempFile {
    fn create(path: &Path, size: u64) -> Result<TempFile, StateError> {
        let err = |source| StateError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::create(path).map_err(err)?;
        let t = TempFile {
            file,
            path: path.to_path_buf(),
            committed: false.into(),
            sums: SumsBuilder::new(size),
        };
        t.file.set_len(size).map_err(err)?;
        Ok(t)
    }

    /// Writes whole pages at `off` (page-aligned) and records their sums.
    fn write(&self, buf: &[u8], off: u64) -> Result<(), StateError> {
        self.file
            .write_all_at(buf, off)
            .map_err(|source| StateError::Io {
                path: self.path.display().to_string(),
                source,
            })?;
        self.sums.wrote(off, buf);
        Ok(())
    }

    fn sync(&self) -> Result<(), StateError> {
        self.file.sync_data().map_err(|source| StateError::Io {
            path: self.path.display().to_string(),
            source,
        })
    }

    /// Syncs and renames to `to` (and syncs the directory).
    fn commit(&self, to: &Path) -> Result<(), StateError> {
        let err = |source| StateError::Io {
            path: to.display().to_string(),
            source,
        };
        self.file.sync_all().map_err(err)?;
        std::fs::rename(&self.path, to).map_err(err)?;
        self.committed.set(true);
        if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed.get() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_stop_when_small_capped_or_not_shrinking() {
        let o = LiveSaveOptions::default();
        assert!(another_round(10_000, None, 0, &o));
        assert!(
            !another_round(o.pause_at_pages, None, 0, &o),
            "small enough"
        );
        assert!(!another_round(10_000, None, o.max_rounds, &o), "capped");
        assert!(another_round(5_000, Some(10_000), 1, &o), "halved");
        assert!(!another_round(9_000, Some(10_000), 1, &o), "not shrinking");
        assert!(
            !another_round(16_384, Some(16_384), 1, &o),
            "hot set rewritten"
        );
    }
}
