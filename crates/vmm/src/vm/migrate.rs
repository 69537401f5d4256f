//! Live migration, source side (docs/migration.md): the pre-copy loop of `rounds.rs` with the
//! pages going out over `vireo_migration` senders, one per stream, each page on its home
//! stream (`streams::stream_of`), the streams served in parallel by one thread each. When the
//! convergence policy (`converge.rs`) says so the VM is paused, the last dirty pages and the
//! device state (the `vm.state` encoding) go out and every stream gets `Done`. The VM is then
//! left **paused** for the caller's disk handoff: it stops the VM once the destination runs
//! it, or resumes it here if the handoff fails.
//!
//! Cancellation is a flag checked between batches. Any error or a cancel before this returns
//! leaves the VM running as before (or paused, if it was) and tells the destination why
//! (`Abort` on every stream that still works).
//!
//! Locking: the lifecycle lock is held for the whole call (as for a live save); the throttle
//! thread parks only the vCPUs, through `RunControl`, and is stopped before the pause.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vireo_migration::sender::Sender;
use vireo_migration::{streams, MigrationError};

use super::converge::{self, Decision, Limits, RoundFacts};
use super::rounds::{PauseSteps, RoundSink};
use super::{lock, VmHandle};
use crate::dirty::{DirtyBitmap, LogMode};
use crate::memory::PAGE_SIZE;
use crate::state::{Identity, StateError};

/// Bytes read from guest RAM and sent as one record at most: one whole 2 MiB stream region
/// (`streams::REGION_SHIFT`), so a run never spans two streams' regions.
const CHUNK: u64 = 1 << streams::REGION_SHIFT;
/// The throttle's time slice.
const SLICE: Duration = Duration::from_millis(10);
/// The destination's answer to a `RoundEnd` (see `StreamSink::drain`).
pub(crate) const DRAINED: &[u8; 8] = b"DRAINED\n";

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("migration stream {stream}: {source}")]
    Stream {
        stream: u16,
        #[source]
        source: MigrationError,
    },
    #[error("the migration was cancelled")]
    Cancelled,
}

/// The knobs of one outgoing migration.
#[derive(Clone, Debug)]
pub struct MigrateOutOptions {
    /// Switch over once the estimated final copy fits this.
    pub max_downtime: Duration,
    /// Cap on the bytes put on the wire per second, all streams together.
    pub bandwidth: Option<u64>,
    /// Switch over after this many dirty rounds whatever the estimate.
    pub max_rounds: u32,
    /// Throttle the guest when rounds stop shrinking (auto-converge).
    pub auto_converge: bool,
    /// When to switch to post-copy instead (`postcopy/policy.rs`).
    pub postcopy: super::postcopy::PostcopyPolicy,
    /// How KVM's dirty log is cleared (`dirty.rs`; default: `VIREO_DIRTY_CLEAR`, else
    /// manual protection, `as-copied`).
    pub dirty_log: LogMode,
    /// What the caller's handoff says first on stream 0 after `Done`, made once the VM is
    /// paused: sent in the same write as the device state and `Done`.
    pub handoff_head: Option<HandoffHead>,
}

/// Makes the first bytes of the caller's own protocol on stream 0 after the migration's
/// `Done` (the worker's `DISKS` line, and `RELEASED` when there is nothing to let go of). It
/// is called in the pause, after the device state was saved, so it sees the VM as it goes;
/// its bytes go out in the one write that ends the stream, which spares the paused guest a
/// write and the destination a wait for it (~0.2 ms of the gap in `vireo-bench migrate`).
#[derive(Clone)]
pub struct HandoffHead(pub Arc<dyn Fn() -> Vec<u8> + Send + Sync>);

impl std::fmt::Debug for HandoffHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandoffHead")
    }
}

impl Default for MigrateOutOptions {
    fn default() -> Self {
        MigrateOutOptions {
            max_downtime: Duration::from_millis(300),
            bandwidth: None,
            max_rounds: 30,
            auto_converge: true,
            postcopy: Default::default(),
            dirty_log: LogMode::for_migration(),
            handoff_head: None,
        }
    }
}

/// Where a migration stands (either side), for status requests from other threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrateStats {
    /// Dirty rounds done (0: the full pass runs).
    pub round: u32,
    pub memory_bytes: u64,
    /// Bytes put on (source) or taken off (destination) the wire.
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    /// Bytes per second the guest dirtied over the last round.
    pub dirty_rate: u64,
    /// Bytes of page data per second the link took over the best round.
    pub link_rate: u64,
    pub estimated_downtime_ms: u64,
    /// Share of each 10 ms slice the vCPUs are parked (auto-converge).
    pub throttle_percent: u32,
    /// The VM is paused for the switch-over.
    pub switching: bool,
}

/// Shared between the migrating thread and status/cancel requests.
#[derive(Default)]
pub struct MigrateShared {
    cancel: AtomicBool,
    transferred: AtomicU64,
    stats: Mutex<MigrateStats>,
    /// Destination: the runs (gpa, pages) the source listed for post-copy.
    postcopy_missing: Mutex<Option<Vec<(u64, u64)>>>,
}

impl MigrateShared {
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
    /// Counts bytes moved (the destination's receivers call this too).
    pub fn add_transferred(&self, n: u64) {
        self.transferred.fetch_add(n, Ordering::Relaxed);
    }
    /// Destination: the source switched to post-copy and still has these runs of pages.
    pub fn take_postcopy_missing(&self) -> Option<Vec<(u64, u64)>> {
        lock(&self.postcopy_missing).take()
    }
    pub(crate) fn add_postcopy_missing(&self, runs: Vec<(u64, u64)>) {
        lock(&self.postcopy_missing)
            .get_or_insert_with(Vec::new)
            .extend(runs);
    }
    pub fn stats(&self) -> MigrateStats {
        let mut s = *lock(&self.stats);
        s.transferred_bytes = self.transferred.load(Ordering::Relaxed);
        s
    }
    pub(crate) fn update(&self, f: impl FnOnce(&mut MigrateStats)) {
        f(&mut lock(&self.stats));
    }
}

/// The VM paused with everything sent: the caller hands the disks over, then stops the VM
/// (it runs on the destination) or resumes it (the handoff failed).
pub struct Handover<W> {
    /// The streams, in index order, after their `Done` (stream 0 carries the handoff).
    pub streams: Vec<W>,
    pub paused_at: Instant,
    /// Pages sent while paused.
    pub final_pages: u64,
    pub stats: MigrateStats,
    /// Total time from the call to the last `Done`.
    pub elapsed: Duration,
    /// Post-copy: the pages still here (listed to the destination); serve them with
    /// `VmHandle::serve_postcopy` once the destination runs the VM.
    pub postcopy: Option<DirtyBitmap>,
}

impl VmHandle {
    /// Migrates the VM's memory and state out over `senders` (one per stream, in stream
    /// order, preambles sent). See the module docs.
    pub fn migrate_out<W: Read + Write + Send>(
        &self,
        senders: Vec<Sender<W>>,
        opts: &MigrateOutOptions,
        shared: &MigrateShared,
        identity: Identity,
        spec: Option<String>,
    ) -> Result<Handover<W>, MigrateError> {
        let started = Instant::now();
        let _freed_heap_kept = crate::heap_trim::keep_freed_heap();
        crate::heap_trim::warm_this_arena(PAUSE_TLS_BYTES);
        let _op = lock(&self.0.lifecycle);
        if self.0.exit.is_set() {
            return Err(StateError::NotRunning.into());
        }
        // Memory must be all in before it is read through the memfd.
        self.wait_restored();
        let was_paused = self.0.control.paused();
        shared.update(|s| s.memory_bytes = self.0.ram.size);
        let mut sink = StreamSink {
            senders,
            shared,
            opts,
            previous_dirty: None,
            stalled: 0,
            link_rate: 0.0,
            last_fetch: Instant::now(),
            last_pass: PassTimes::default(),
            throttle: None,
            postcopy_chosen: false,
            identity: identity.clone(),
            spec: spec.clone(),
            state: None,
            final_pages_at: None,
            state_saved_at: None,
            // Whether the destination can take it (RAM, back ends) it says itself.
            postcopy: (opts.postcopy != super::postcopy::PostcopyPolicy::Never).then_some(None),
        };
        let precopy = if was_paused {
            // Nothing can dirty a paused VM's memory: one pass is all.
            sink.full_pass(self)
                .map(|bytes| (Instant::now(), bytes, 0, PauseSteps::default()))
        } else {
            self.precopy_locked(&mut sink)
                .map(|d| (d.paused_at, d.bytes, d.final_pages, d.steps))
        };
        let (paused_at, _bytes, final_pages, steps) = match precopy {
            Ok(p) => {
                // `keep_dirty_log` left it on: see `Shared::log_left_on`.
                self.0.log_left_on.store(!was_paused, Ordering::SeqCst);
                p
            }
            Err(e) => {
                sink.abort(&e.to_string());
                return Err(e);
            }
        };
        shared.update(|s| {
            s.switching = true;
            s.throttle_percent = 0;
        });
        let missing = sink.postcopy.take().flatten();
        let last_sent = paused_at.elapsed();
        let since_pause = |at: Option<Instant>| at.map_or(f64::NAN, |t| ms(t - paused_at));
        let (pages_alone, save_alone) = (
            since_pause(sink.final_pages_at),
            since_pause(sink.state_saved_at),
        );
        let finish = (|| {
            if let Some(m) = &missing {
                let runs = super::postcopy::runs_of(m);
                let wire =
                    vireo_migration::postcopy::send_missing(sink.senders[0].get_mut(), &runs)
                        .map_err(|source| MigrateError::Stream { stream: 0, source })?;
                shared.add_transferred(wire);
                tracing::info!("post-copy: {} pages left on the source", m.count());
            }
            let state = match sink.state.take() {
                Some(saved) => saved?,
                None => self.save_state_locked(identity.clone(), spec.clone())?,
            };
            let bytes = crate::state::file::encode(&state);
            let state_saved = paused_at.elapsed();
            let n = bytes.len() as u64;
            // The other streams end first, so the destination's last wait is stream 0's one
            // write: the device state, `Done` and the caller's first handoff bytes.
            let mut senders = std::mem::take(&mut sink.senders).into_iter();
            let first = senders.next().ok_or(MigrateError::Stream {
                stream: 0,
                source: MigrationError::Malformed("a migration without streams"),
            })?;
            let mut out = Vec::with_capacity(senders.len() + 1);
            for (i, s) in senders.enumerate() {
                let (w, _) = s.done().map_err(|source| MigrateError::Stream {
                    stream: i as u16 + 1,
                    source,
                })?;
                out.push(w);
            }
            let head = opts
                .handoff_head
                .as_ref()
                .map(|h| (h.0)())
                .unwrap_or_default();
            let before = first.stats.wire_bytes;
            let (w, stats) = first
                .state_and_done(&bytes, &head)
                .map_err(|source| MigrateError::Stream { stream: 0, source })?;
            shared.add_transferred(stats.wire_bytes - before);
            out.insert(0, w);
            tracing::debug!("device state sent: {n} bytes");
            let state_sent = paused_at.elapsed();
            // Where the pause goes, for `vireo-bench migrate` and anyone tuning it.
            tracing::info!(
                "switch-over (source VMM, from the pause request): throttle stopped before \
                 in {:.2} ms, vCPUs parked +{:.2} ms, devices +{:.2} ms, dirty log +{:.2} ms, \
                 last {final_pages} pages sent +{:.2} ms (pages out +{pages_alone:.2} ms, \
                 the state saved beside them +{save_alone:.2} ms), state encoded +{:.2} ms \
                 ({n} bytes), sent +{:.2} ms, streams done +{:.2} ms",
                ms(steps.throttle_stop),
                ms(steps.vcpus_parked),
                ms(steps.devices_parked),
                ms(steps.dirty_fetched),
                ms(last_sent),
                ms(state_saved),
                ms(state_sent),
                ms(paused_at.elapsed())
            );
            Ok::<_, MigrateError>(out)
        })();
        match finish {
            Ok(streams) => {
                let stats = shared.stats();
                tracing::info!(
                    "migration sent: {} rounds, {} MiB on the wire, {} pages while paused, \
                     {:.1} ms paused so far, {} ms in all",
                    stats.round,
                    stats.transferred_bytes >> 20,
                    final_pages,
                    paused_at.elapsed().as_secs_f64() * 1e3,
                    started.elapsed().as_millis()
                );
                Ok(Handover {
                    streams,
                    paused_at,
                    final_pages,
                    stats,
                    elapsed: started.elapsed(),
                    postcopy: missing,
                })
            }
            Err(e) => {
                sink.abort(&e.to_string());
                if !was_paused {
                    let _ = self.resume_locked();
                }
                shared.update(|s| s.switching = false);
                Err(e)
            }
        }
    }

    /// Sends `runs` (guest-physical start, length; page-aligned, each inside one stream
    /// region) over their streams, one thread per stream. Returns the bytes of page data.
    /// `live`: the guest runs meanwhile; otherwise (the pause) the first stream is served on
    /// this thread.
    /// `protect`: what each 2 MiB region's pages need in the dirty log before they are read.
    #[allow(clippy::too_many_arguments)]
    fn send_runs<W: Write + Send>(
        &self,
        senders: &mut [Sender<W>],
        runs: Vec<Vec<(u64, u64)>>,
        shared: &MigrateShared,
        bandwidth: Option<u64>,
        live: bool,
        protect: Protect<'_>,
        unmapped_is_hole: bool,
    ) -> Result<u64, MigrateError> {
        let per_stream = bandwidth.map(|b| (b / senders.len().max(1) as u64).max(1));
        // One stream failed: the others stop at their next batch.
        let stop = &AtomicBool::new(false);
        std::thread::scope(|scope| {
            let send = move |i: usize, sender: &mut Sender<W>, runs: Vec<(u64, u64)>| {
                let reads = Reads {
                    protect,
                    unmapped_is_hole,
                };
                let r = self.send_stream(i as u16, sender, &runs, shared, stop, per_stream, reads);
                if r.is_err() {
                    stop.store(true, Ordering::SeqCst);
                }
                r
            };
            let mut busy = senders
                .iter_mut()
                .zip(runs)
                .enumerate()
                .filter(|(_, (_, runs))| !runs.is_empty());
            // In the pause's last pass the first stream is served on this thread: a thread
            // fewer to start and to wake is a scheduling delay fewer on a busy host. A live
            // pass spawns them all, as their priority drops with the thread.
            let here = if live { None } else { busy.next() };
            let threads: Vec<_> = busy
                .map(|(i, (sender, runs))| {
                    scope.spawn(move || {
                        crate::thread_priority::raise_for_migration();
                        send(i, sender, runs)
                    })
                })
                .collect();
            let mut results: Vec<std::thread::Result<Result<u64, MigrateError>>> = here
                .map(|(i, (sender, runs))| Ok(send(i, sender, runs)))
                .into_iter()
                .collect();
            results.extend(threads.into_iter().map(|t| t.join()));
            let mut total = 0;
            let mut first_err = None;
            for r in results {
                match r {
                    Ok(Ok(n)) => total += n,
                    // The stream that failed first names the error, not those it stopped.
                    Ok(Err(MigrateError::Cancelled)) if !shared.cancelled() => {}
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Err(_) => {
                        first_err.get_or_insert(MigrateError::State(StateError::Kvm(
                            "a migration stream thread panicked".into(),
                        )));
                    }
                }
            }
            match first_err {
                Some(e) => Err(e),
                None if stop.load(Ordering::SeqCst) => Err(MigrateError::Cancelled),
                None => Ok(total),
            }
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn send_stream<W: Write>(
        &self,
        stream: u16,
        sender: &mut Sender<W>,
        runs: &[(u64, u64)],
        shared: &MigrateShared,
        stop: &AtomicBool,
        rate: Option<u64>,
        reads: Reads<'_>,
    ) -> Result<u64, MigrateError> {
        let started = Instant::now();
        let wire_at_start = sender.stats.wire_bytes;
        let mut sent = 0u64;
        let memfd = &self.0.ram.memfd;
        // Each region is protected once per pass: protecting it again after some of its
        // pages were read would drop the guest's writes to them since.
        let mut protected = std::collections::BTreeSet::new();
        for &(gpa, len) in runs {
            if shared.cancelled() || stop.load(Ordering::SeqCst) {
                return Err(MigrateError::Cancelled);
            }
            let region = gpa & !(CHUNK - 1);
            let clear = match reads.protect {
                Protect::Nothing => None,
                Protect::Pages(dirty) => Some(Some(dirty)),
                Protect::Written => Some(None),
            };
            if let Some(dirty) = clear {
                if protected.insert(region) {
                    self.0
                        .dirty
                        .clear_region(&self.0.vm_fd, dirty, region, CHUNK)
                        .map_err(|e| StateError::Kvm(format!("dirty log: {e}")))?;
                }
            }
            let Some(off) = self.file_offset(gpa) else {
                continue;
            };
            let before = sender.stats.wire_bytes;
            // A whole region the guest never wrote (most of a young guest, all of the full
            // pass's zero pages) goes out as zero markers unread. Reading and scanning it
            // cost the full pass a copy of every such byte. Checked only for whole regions:
            // the full pass's runs; a dirty run holds data.
            let sent_run =
                if len == CHUNK && self.never_written(gpa, off, len, reads.unmapped_is_hole) {
                    sender.send_zero_run(gpa, len as usize)
                } else if let Some(data) = self.mapped_run(gpa, off, len) {
                    // Pages that exist go from the mapping to the cipher; a run never crosses
                    // the MMIO hole (runs stay inside one region).
                    sender.send_run_from(gpa, data)
                } else {
                    // Some holes among them: read straight into the record being built (one
                    // copy before TLS), the holes as zeros without allocating them.
                    sender.send_run_with(gpa, len as usize, |g, buf| {
                        memfd.read_exact_at(buf, off + (g - gpa))
                    })
                };
            sent_run.map_err(|source| MigrateError::Stream { stream, source })?;
            shared.add_transferred(sender.stats.wire_bytes - before);
            sent += len;
            if let Some(rate) = rate {
                // Stay at or under the cap: sleep until the bytes sent so far are due.
                let due = Duration::from_secs_f64(
                    (sender.stats.wire_bytes - wire_at_start) as f64 / rate as f64,
                );
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        }
        Ok(sent)
    }

    /// Sends `runs` (a paused VM's last pages, few: `few_final_runs`) on one stream, every
    /// page of them gathered into as few records as a batch allows. Returns the bytes of
    /// page data.
    fn send_gathered<W: Write>(
        &self,
        stream: u16,
        sender: &mut Sender<W>,
        runs: &[(u64, u64)],
        shared: &MigrateShared,
    ) -> Result<u64, MigrateError> {
        let mut mapped: Vec<(u64, &[u8])> = Vec::with_capacity(runs.len());
        // Runs with holes in the RAM file are read (zeros for the holes, nothing allocated).
        let mut read: Vec<(u64, Vec<u8>)> = Vec::new();
        for &(gpa, len) in runs {
            let Some(off) = self.file_offset(gpa) else {
                continue;
            };
            match self.mapped_run(gpa, off, len) {
                Some(data) => mapped.push((gpa, data)),
                None => {
                    let mut buf = vec![0u8; len as usize];
                    self.0.ram.memfd.read_exact_at(&mut buf, off).map_err(|e| {
                        MigrateError::Stream {
                            stream,
                            source: MigrationError::from(e),
                        }
                    })?;
                    read.push((gpa, buf));
                }
            }
        }
        let pages: Vec<(u64, &[u8])> = mapped
            .iter()
            .map(|&(gpa, data)| (gpa, data))
            .chain(read.iter().map(|(gpa, buf)| (*gpa, buf.as_slice())))
            .flat_map(|(gpa, data)| {
                data.chunks_exact(PAGE_SIZE as usize)
                    .enumerate()
                    .map(move |(i, page)| (gpa + i as u64 * PAGE_SIZE, page))
            })
            .collect();
        let before = sender.stats.wire_bytes;
        sender
            .send_scattered(&pages)
            .map_err(|source| MigrateError::Stream { stream, source })?;
        shared.add_transferred(sender.stats.wire_bytes - before);
        Ok(pages.len() as u64 * PAGE_SIZE)
    }

    /// Kicks every running vCPU out of KVM_RUN (for the throttle's parking).
    fn kick_vcpus(&self) {
        for &t in lock(&self.0.vcpu_threads).iter() {
            // SAFETY: the list holds only threads not yet joined (it is emptied, under its
            // lock, before they are), so each pthread_t is valid.
            unsafe { libc::pthread_kill(t, crate::vcpu::kick_signal()) };
        }
    }
}

/// How a stream thread reads its runs.
#[derive(Clone, Copy)]
struct Reads<'a> {
    protect: Protect<'a>,
    /// This pass's [`VmHandle::unmapped_is_hole`].
    unmapped_is_hole: bool,
}

/// What a pass does in the dirty log (manual protection, `dirty.rs`) before it reads a
/// region: a dirty round protects the pages it copies; the full pass every page of the region
/// the guest wrote since the log started; the pause's nothing (the guest is stopped and the
/// log ends with it).
#[derive(Clone, Copy)]
enum Protect<'a> {
    Nothing,
    Pages(&'a DirtyBitmap),
    /// The full pass. Starting the log protected everything; a page the guest writes before
    /// the pass reaches its region is copied as written, so its log bit is cleared (and it
    /// is protected again) right before the copy, not left to send it a second time in the
    /// next round. Only written pages are protected again, and KVM skips a region with none.
    Written,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A live pass's steps, each from its start: in the round's log line, since a round's length
/// (not the link's best rate) decides how much the guest dirties for the next one.
#[derive(Clone, Copy, Default)]
struct PassTimes {
    /// Every page handed to the streams.
    sent: Duration,
    /// The destination's `DRAINED` on every stream.
    drained: Duration,
    ended: Option<Instant>,
}

/// Migration's side of the shared pre-copy loop.
struct StreamSink<'a, W: Read + Write + Send> {
    senders: Vec<Sender<W>>,
    shared: &'a MigrateShared,
    opts: &'a MigrateOutOptions,
    previous_dirty: Option<u64>,
    /// Rounds in a row that did not shrink the set (`RoundFacts::stalled`).
    stalled: u32,
    /// Best page-data rate the link has shown (bytes/s).
    link_rate: f64,
    /// When the dirty log was last read (the dirty rate is measured since then).
    last_fetch: Instant,
    /// Where the last pass's time went (logged with the next round's decision).
    last_pass: PassTimes,
    throttle: Option<Throttle>,
    /// `None`: post-copy not allowed; `Some(None)`: allowed, not chosen; `Some(Some(pages))`:
    /// chosen, these pages are left for post-copy.
    postcopy: Option<Option<DirtyBitmap>>,
    /// Post-copy was chosen: the final pass lists pages instead of copying them.
    postcopy_chosen: bool,
    /// What the device state is saved with, and the state the final pass saved.
    identity: Identity,
    spec: Option<String>,
    state: Option<Result<crate::state::VmState, StateError>>,
    /// When the pause's last pages were handed to the streams, and when the device state
    /// saved beside them was complete: logged apart, so the longer of the two shows.
    final_pages_at: Option<Instant>,
    state_saved_at: Option<Instant>,
}

impl<W: Read + Write + Send> StreamSink<'_, W> {
    /// Sends `runs`, waits until the destination has applied them (`drain`), and folds the
    /// pass's rate into the link estimate.
    fn pass(
        &mut self,
        vm: &VmHandle,
        runs: Vec<Vec<(u64, u64)>>,
        protect: Protect<'_>,
        unmapped_is_hole: bool,
    ) -> Result<u64, MigrateError> {
        let t = Instant::now();
        let raw_before: u64 = self.senders.iter().map(|s| s.stats.raw_bytes).sum();
        let (shared, bandwidth) = (self.shared, self.opts.bandwidth);
        let bytes = vm.send_runs(
            &mut self.senders,
            runs,
            shared,
            bandwidth,
            true,
            protect,
            unmapped_is_hole,
        )?;
        let sent = t.elapsed();
        self.drain()?;
        self.last_pass = PassTimes {
            sent,
            drained: t.elapsed(),
            ended: Some(Instant::now()),
        };
        let raw: u64 = self.senders.iter().map(|s| s.stats.raw_bytes).sum::<u64>() - raw_before;
        let secs = t.elapsed().as_secs_f64();
        // A pass of a few pages measures latency, not the link.
        if raw >= 4 << 20 && secs > 0.0 {
            self.link_rate = self.link_rate.max(raw as f64 / secs);
        }
        Ok(bytes)
    }

    /// Ends the pass on every stream with `RoundEnd` and waits for each destination thread's
    /// `DRAINED` (sent once everything before it is in guest RAM there). Without this a pass
    /// "ends" when its bytes are in the TLS and socket buffers — several MiB per stream —
    /// so the link looked faster than it is and the switch-over's last pages queued behind
    /// a backlog while the guest was paused (30–50 ms on a busy host). The wait happens
    /// while the guest runs; what it dirties meanwhile goes into the next pass.
    fn drain(&mut self) -> Result<(), MigrateError> {
        let round = self.shared.stats().round;
        for (i, s) in self.senders.iter_mut().enumerate() {
            let stream = i as u16;
            s.round_end(round, 0, 0)
                .and_then(|()| s.get_mut().flush().map_err(MigrationError::from))
                .map_err(|source| MigrateError::Stream { stream, source })?;
        }
        for (i, s) in self.senders.iter_mut().enumerate() {
            let mut ack = [0u8; DRAINED.len()];
            let got = s.get_mut().read_exact(&mut ack);
            if self.shared.cancelled() {
                return Err(MigrateError::Cancelled);
            }
            let stream = i as u16;
            got.map_err(|e| MigrateError::Stream {
                stream,
                source: MigrationError::from(e),
            })?;
            if ack != *DRAINED {
                return Err(MigrateError::Stream {
                    stream,
                    source: MigrationError::Malformed("the destination's answer to a round end"),
                });
            }
        }
        Ok(())
    }

    /// The pages of `dirty`, per stream, in runs of at most one chunk.
    fn dirty_runs(&self, dirty: &DirtyBitmap) -> Vec<Vec<(u64, u64)>> {
        let n = self.senders.len() as u16;
        let mut runs: Vec<Vec<(u64, u64)>> = vec![Vec::new(); n as usize];
        for (s, pages) in streams::split(&dirty.pages(), n).into_iter().enumerate() {
            let out = &mut runs[s];
            for gpa in pages {
                match out.last_mut() {
                    // Contiguous and inside the same chunk: one read.
                    Some((start, len))
                        if *start + *len == gpa
                            && *len < CHUNK
                            && gpa / CHUNK == *start / CHUNK =>
                    {
                        *len += PAGE_SIZE
                    }
                    _ => out.push((gpa, PAGE_SIZE)),
                }
            }
        }
        runs
    }

    fn abort(&mut self, why: &str) {
        self.throttle = None;
        for s in std::mem::take(&mut self.senders) {
            let _ = s.abort(why);
        }
    }
}

impl<W: Read + Write + Send> RoundSink for StreamSink<'_, W> {
    type Error = MigrateError;

    /// Not stopped in the pause: that registers every memory slot anew (up to ~40 ms here, in
    /// the guest's gap, before the device state went out). `migrate_out` marks it left on;
    /// a resume here stops it (`Shared::log_left_on`), a VM that runs elsewhere is stopped.
    fn keep_dirty_log(&self) -> bool {
        true
    }

    fn full_pass(&mut self, vm: &VmHandle) -> Result<u64, MigrateError> {
        let n = self.senders.len() as u16;
        let mut runs = vec![Vec::new(); n as usize];
        for (start, len) in crate::memory::ram_ranges(vm.0.ram.size) {
            let mut gpa = start;
            while gpa < start + len {
                let l = CHUNK.min(start + len - gpa);
                runs[streams::stream_of(gpa, n) as usize].push((gpa, l));
                gpa += l;
            }
        }
        self.last_fetch = Instant::now();
        // Looked at with the log on, or with the VM and its devices paused (a migration of a
        // paused VM is this pass alone): a page written after the look is sent again, or
        // none is. The full pass is the only one with whole regions to skip.
        let unmapped_is_hole = vm.unmapped_is_hole();
        tracing::info!(
            "pre-copy round 0 (the full pass) starts: never-written pool pages skipped unread: \
             {unmapped_is_hole}"
        );
        self.pass(vm, runs, Protect::Written, unmapped_is_hole)
    }

    fn dirty_pass(&mut self, vm: &VmHandle, dirty: &DirtyBitmap) -> Result<u64, MigrateError> {
        let runs = self.dirty_runs(dirty);
        self.pass(vm, runs, Protect::Pages(dirty), false)
    }

    fn log_mode(&self) -> LogMode {
        self.opts.dirty_log
    }

    fn another_round(
        &mut self,
        vm: &VmHandle,
        dirty: u64,
        rounds: u32,
    ) -> Result<bool, MigrateError> {
        if self.shared.cancelled() {
            return Err(MigrateError::Cancelled);
        }
        let dirty_bytes = dirty * PAGE_SIZE;
        let since = self.last_fetch.elapsed().as_secs_f64();
        self.last_fetch = Instant::now();
        let throttle_now = self.throttle.as_ref().map_or(0, Throttle::share);
        let dirty_rate = if since > 0.0 {
            dirty_bytes as f64 / since
        } else {
            0.0
        };
        self.stalled = if converge::shrinks(self.previous_dirty, dirty_bytes) {
            0
        } else {
            self.stalled + 1
        };
        let facts = RoundFacts {
            dirty_bytes,
            previous_dirty_bytes: self.previous_dirty,
            link_rate: self.link_rate,
            rounds,
            throttle: throttle_now,
            dirty_rate,
            stalled: self.stalled,
        };
        self.previous_dirty = Some(dirty_bytes);
        let limits = Limits {
            max_downtime_ms: self.opts.max_downtime.as_millis() as u64,
            max_rounds: self.opts.max_rounds,
            throttle: self.opts.auto_converge,
        };
        if self.postcopy.is_some()
            && super::postcopy::policy::switch_to_postcopy(&facts, &limits, self.opts.postcopy)
        {
            tracing::info!("migration: switching to post-copy after round {rounds} ({facts:?})");
            self.postcopy_chosen = true;
            return Ok(false);
        }
        let decision = converge::decide(&facts, &limits);
        let estimate = converge::estimate_ms(dirty_bytes, self.link_rate);
        self.shared.update(|s| {
            s.round = rounds;
            s.remaining_bytes = dirty_bytes;
            s.dirty_rate = dirty_rate as u64;
            s.link_rate = self.link_rate as u64;
            s.estimated_downtime_ms = estimate;
        });
        let p = self.last_pass;
        tracing::info!(
            "pre-copy round {rounds}: {:.1} MiB dirty, dirty rate {:.0} MB/s, link {:.0} MB/s, \
             throttle {throttle_now}% -> {decision:?} (the pass: pages sent +{:.2} ms, drained \
             +{:.2} ms, the log read {:.2} ms after)",
            dirty_bytes as f64 / (1 << 20) as f64,
            dirty_rate / 1e6,
            self.link_rate / 1e6,
            ms(p.sent),
            ms(p.drained),
            p.ended.map_or(0.0, |e| ms(e.elapsed())),
        );
        match decision {
            Decision::SwitchOver => Ok(false),
            Decision::Round { throttle } => {
                if throttle > 0 {
                    let t = self.throttle.get_or_insert_with(|| Throttle::start(vm));
                    t.set(throttle);
                    self.shared.update(|s| s.throttle_percent = throttle);
                }
                Ok(true)
            }
        }
    }

    fn before_pause(&mut self) {
        // Joined here: its parking must not overlap the real pause.
        self.throttle = None;
    }

    fn final_pass(&mut self, vm: &VmHandle, last: &DirtyBitmap) -> Result<u64, MigrateError> {
        if self.postcopy_chosen {
            self.postcopy = Some(Some(last.clone()));
            return Ok(0);
        }
        // No drain: the device state follows the last pages at once, and the handoff's
        // first answer comes only after the destination applied everything.
        let runs = self.dirty_runs(last);
        let few = few_final_runs(&runs);
        let (senders, shared, bandwidth) = (&mut self.senders, self.shared, self.opts.bandwidth);
        let (identity, spec) = (&self.identity, &self.spec);
        // The device state is final once paused: the vCPUs' threads save theirs while the
        // last pages go out, not after them; the rest of the state is read here after.
        let saving = vm.start_save();
        let sent = match &few {
            Some(few) => vm.send_gathered(0, &mut senders[0], few, shared),
            None => vm.send_runs(
                senders,
                runs,
                shared,
                bandwidth,
                false,
                Protect::Nothing,
                false,
            ),
        };
        self.final_pages_at = Some(Instant::now());
        let state = saving.and_then(|t| vm.finish_save(t, identity.clone(), spec.clone()));
        self.state_saved_at = Some(Instant::now());
        self.state = Some(state);
        sent
    }
}

/// The pause's last pages as one list for the first stream (served on the pausing thread,
/// gathered into one record: `VmHandle::send_gathered`), when there are few of them. Every
/// earlier pass was drained — applied on the destination — before this one, and this pass
/// holds each page once, so no older copy of a page can overtake it on another stream.
/// Traced on the 2-core host: ~50–150 pages split over two streams, a record each, kept the
/// vCPU thread (which saves its state in the same pause) waiting ~0.4 ms for a CPU behind the
/// second stream's thread and its receiver, and cost ~10 µs a page.
fn few_final_runs(runs: &[Vec<(u64, u64)>]) -> Option<Vec<(u64, u64)>> {
    let bytes: u64 = runs.iter().flatten().map(|&(_, len)| len).sum();
    if bytes > FEW_FINAL_BYTES {
        return None;
    }
    let mut all: Vec<(u64, u64)> = runs.iter().flatten().copied().collect();
    all.sort_unstable();
    Some(all)
}

/// What this thread's TLS records of the pause's few pages take at most (the data, its
/// record headers and tags, with room): warmed before the first round.
const PAUSE_TLS_BYTES: usize = FEW_FINAL_BYTES as usize * 5 / 4;

/// Up to this much page data at the pause goes on one stream (`few_final_runs`), not paced
/// by `--bandwidth`: the guest waits for it, and it is at most this burst.
const FEW_FINAL_BYTES: u64 = 1 << 20;

/// Auto-converge: a thread that parks the vCPUs for `share` % of every 10 ms slice. Its
/// sleeps are `park_timeout`s, so stopping it (right before the switch-over pause) takes
/// effect at once instead of after the rest of a slice.
struct Throttle {
    share: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Sleeps `d` or until unparked with `stop` set.
fn nap(d: Duration, stop: &AtomicBool) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) {
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            return;
        };
        std::thread::park_timeout(left);
    }
}

impl Throttle {
    fn start(vm: &VmHandle) -> Throttle {
        let share = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (vm, sh, st) = (vm.clone(), share.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("mig-throttle".into())
            .spawn(move || {
                while !st.load(Ordering::SeqCst) {
                    let p = sh.load(Ordering::Relaxed).min(converge::THROTTLE_MAX);
                    let parked = SLICE * p / 100;
                    if p == 0 {
                        nap(SLICE, &st);
                        continue;
                    }
                    let control = &vm.0.control;
                    if control
                        .pause_vcpus(Duration::from_secs(1), || vm.kick_vcpus())
                        .is_err()
                    {
                        // The VM is ending (or a vCPU would not park): stop throttling.
                        control.resume_vcpus();
                        return;
                    }
                    nap(parked, &st);
                    control.resume_vcpus();
                    nap(SLICE - parked, &st);
                }
            })
            .ok();
        Throttle {
            share,
            stop,
            thread,
        }
    }

    fn set(&self, percent: u32) {
        self.share.store(percent, Ordering::Relaxed);
    }

    fn share(&self) -> u32 {
        self.share.load(Ordering::Relaxed)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_final_pages_go_on_the_first_stream_in_order() {
        let page = PAGE_SIZE;
        let split = vec![
            vec![(0x40_0000, page)],
            vec![(0x20_0000, 2 * page), (0x60_0000, page)],
        ];
        assert_eq!(
            few_final_runs(&split),
            Some(vec![
                (0x20_0000, 2 * page),
                (0x40_0000, page),
                (0x60_0000, page)
            ])
        );
        // More than FEW_FINAL_BYTES keeps each page on its home stream.
        assert_eq!(
            few_final_runs(&[vec![(0, CHUNK)], vec![(CHUNK, page)]]),
            None
        );
    }
}
