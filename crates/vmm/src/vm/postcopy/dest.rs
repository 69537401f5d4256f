//! The destination's side of post-copy. Before the VM resumes, every missing page is punched
//! out of the memfd (pre-copy may have left an older version there) and guest RAM is
//! registered with a userfaultfd, so the first touch of a missing page (by a vCPU through
//! KVM, or a device) waits. Two threads:
//!
//! - **faults**: a fault on a missing page sends a request for it and its neighbours
//!   (a [`WINDOW`]-page aligned block) on the request channel; a fault on a page that was
//!   never missing is a zero page the pre-copy left as a hole, filled with zeros here;
//! - **placement**, one thread per stream (stream 0 only from a source older than stream
//!   version 5): reads its stream and places each page that is still missing with
//!   UFFDIO_COPY (atomic, and it wakes the waiters); a duplicate (asked for, then reached by
//!   the background push) is skipped ([`Tracker::claim`]: the first copy wins, whichever
//!   thread brings it); EEXIST is not an error.
//!
//! A vhost-user back end maps guest RAM in its own process: each hands over its own
//! userfaultfd on that mapping ([`vireo_virtio::ForeignFaults`]), which the fault thread polls
//! beside ours. Its faults are served the same way; but filling the page through our mapping
//! does not wake the back end's thread (another userfaultfd), so the pages a back end waits for
//! are remembered and woken on its userfaultfd once placed.
//!
//! Once `PostcopyDone` came on every stream and nothing is missing, the last placement thread
//! to end unregisters RAM, the back ends are told (POSTCOPY_END) and our copies of their
//! userfaultfds closed, and the VM is an ordinary one.
//! **Lost**: if any stream breaks or ends early (with pages still missing), or a faulting page
//! does not come within [`FAULT_LIMIT`] (a request that cannot be sent counts from its fault,
//! as the page may still be on its way), the VM cannot go on correctly:
//! `on_end` gets `Err(reason)` and the registration stays (a waiting vCPU is never handed a
//! zero page); the caller stops the VM and reports it lost.
//!
//! Locking: none but the outcome's and the back ends' lists; the [`Tracker`] is atomics, each
//! stream has one owner thread, and the count of streams still open decides which of them
//! ends post-copy (the last: every other has placed all it claimed by then).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vireo_migration::{pages, postcopy};

use super::super::migrate::{MigrateError, MigrateShared};
use super::super::rounds::file_offset;
use super::super::Vm;
use super::tracker::{Place, Tracker};
use crate::memory::PAGE_SIZE;
use crate::state::StateError;
use crate::uffd::{self, Uffd};
use crate::virtio_mmio::MmioTransport;

/// Pages asked for around a faulting one (aligned block of 64 KiB): guests touch memory in
/// runs, and each fault is a round trip to the source.
pub const WINDOW: u64 = 16;
/// A page asked for that has not come after this means the source is hung: the VM is lost
/// rather than a vCPU blocked for ever.
pub const FAULT_LIMIT: Duration = Duration::from_secs(10);
const POLL_MS: i32 = 20;
/// After the VM is lost, how long its vCPUs get to stop before back ends are released.
const STOP_GRACE: Duration = Duration::from_millis(300);
/// How long releasing the back ends may take at most.
const RELEASE_LIMIT: Duration = Duration::from_secs(5);
/// Beyond the release's own bounds, how long a lost VM's end waits for it (a fault thread
/// still reading its last faults).
const RELEASE_SLACK: Duration = Duration::from_millis(500);

/// How post-copy ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostcopyOutcome {
    /// Every page arrived: pages placed, faults served, ms since the start, and the pages
    /// placed from each stream (in stream order).
    Complete {
        pages: u64,
        faults: u64,
        millis: u64,
        per_stream: Vec<u64>,
    },
    /// The VM cannot continue (see the module docs).
    Lost(String),
}

/// A back end's userfaultfd and where it maps each region (gpa, len, its address).
struct Foreign {
    uffd: Uffd,
    maps: vireo_virtio::ForeignMaps,
}

impl Foreign {
    fn gpa(&self, host: u64) -> Option<u64> {
        gpa_of(&self.maps.lock().unwrap_or_else(|p| p.into_inner()), host)
    }
}

/// The guest-physical address of `host` in `maps` (gpa start, len, host address of the start).
fn gpa_of(maps: &[(u64, u64, u64)], host: u64) -> Option<u64> {
    maps.iter()
        .find(|(_, l, h)| host >= *h && host < h + l)
        .map(|(s, _, h)| s + (host - h))
}

struct Inner {
    uffd: Uffd,
    /// The back ends' userfaultfds, dropped (closed) when post-copy completes.
    foreign: Mutex<Vec<Arc<Foreign>>>,
    /// Pages a back end waits for: (its index in `foreign`, gpa, its address).
    foreign_waits: Mutex<Vec<(usize, u64, u64)>>,
    /// The devices whose back ends joined, told when post-copy completes.
    joined: Vec<Arc<Mutex<MmioTransport>>>,
    tracker: Tracker,
    /// (gpa start, len, host address) of each RAM region.
    maps: Vec<(u64, u64, u64)>,
    done: AtomicBool,
    outcome: Mutex<Option<PostcopyOutcome>>,
    cv: Condvar,
    on_end: Box<dyn Fn(&PostcopyOutcome) + Send + Sync>,
    started: Instant,
    faults: AtomicU64,
    /// Streams that have not delivered their `PostcopyDone` yet.
    open: AtomicUsize,
    /// Pages placed from each stream, filled in as each ends.
    per_stream: Mutex<Vec<u64>>,
}

impl Inner {
    fn host(&self, gpa: u64) -> Option<u64> {
        self.maps
            .iter()
            .find(|(s, l, _)| gpa >= *s && gpa < s + l)
            .map(|(s, _, h)| h + (gpa - s))
    }

    fn gpa(&self, host: u64) -> Option<u64> {
        gpa_of(&self.maps, host)
    }

    /// Records the end once (the first reason wins) and tells the caller.
    fn end(&self, o: PostcopyOutcome) {
        {
            let mut g = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
            if g.is_some() {
                return;
            }
            *g = Some(o.clone());
        }
        self.done.store(true, Ordering::Release);
        match &o {
            PostcopyOutcome::Complete { .. } => tracing::info!("post-copy complete: {o:?}"),
            PostcopyOutcome::Lost(why) => tracing::error!("post-copy lost the VM: {why}"),
        }
        (self.on_end)(&o);
        self.cv.notify_all();
    }

    fn outcome(&self) -> Option<PostcopyOutcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lost(&self, why: String) {
        self.end(PostcopyOutcome::Lost(why));
    }

    /// Wakes the back-end threads waiting on pages that are no longer missing.
    fn wake_foreign(&self) {
        let mut waits = self.foreign_waits.lock().unwrap_or_else(|p| p.into_inner());
        if waits.is_empty() {
            return;
        }
        let foreign = self.foreign.lock().unwrap_or_else(|p| p.into_inner());
        waits.retain(|&(i, gpa, host)| {
            if self.tracker.is_missing(gpa) {
                return true;
            }
            if let Some(f) = foreign.get(i) {
                let _ = f.uffd.wake(host, PAGE_SIZE);
            }
            false
        });
    }

    /// Every page is here: the back ends stop catching faults and our copies of their
    /// userfaultfds go (the fault thread drops its own when it ends).
    fn end_foreign(&self) {
        // A back-end fault still queued when the fault thread stopped was never answered:
        // every page is here now, so wake every range before POSTCOPY_END, whose answer
        // that back-end thread (its request handler, say) would otherwise never give.
        for f in self
            .foreign
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            for &(_, len, base) in f.maps.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                let _ = f.uffd.wake(base, len);
            }
        }
        for t in &self.joined {
            super::super::lock(t).postcopy_end();
        }
        self.foreign
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// The running post-copy of a destination VM. Dropping it stops its threads at their next
/// poll (the placement thread once its stream ends; the caller shuts the sockets down).
pub struct PostcopyIncoming {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    end: u64,
}

impl PostcopyIncoming {
    /// Starts placing the pages that come on `streams` (in stream order, stream 0 after the
    /// handoff's last line): one thread each. Call once. `Err`: a thread could not start
    /// (those started run on; the caller loses the VM, as no stream may be left unread).
    pub fn place_from<R: Read + Send + 'static>(
        &mut self,
        streams: Vec<R>,
        shared: Arc<MigrateShared>,
    ) -> std::io::Result<()> {
        self.inner.open.store(streams.len(), Ordering::Release);
        *self
            .inner
            .per_stream
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = vec![0; streams.len()];
        for (i, pages_in) in streams.into_iter().enumerate() {
            let (inner, end, shared) = (self.inner.clone(), self.end, shared.clone());
            let t = std::thread::Builder::new()
                .name(format!("postcopy-place-{i}"))
                .spawn(move || place_pages(&inner, i, pages_in, &shared, end))?;
            self.threads.push(t);
        }
        Ok(())
    }

    /// The outcome, once post-copy has ended.
    pub fn outcome(&self) -> Option<PostcopyOutcome> {
        self.inner.outcome()
    }

    /// Blocks until post-copy ended, at most `timeout`.
    pub fn wait(&self, timeout: Duration) -> Option<PostcopyOutcome> {
        let g = self.inner.outcome.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .inner
            .cv
            .wait_timeout_while(g, timeout, |o| o.is_none())
            .unwrap_or_else(|p| p.into_inner());
        g.clone()
    }

    /// Pages still on the source.
    pub fn remaining(&self) -> u64 {
        self.inner.tracker.remaining()
    }
}

impl Drop for PostcopyIncoming {
    fn drop(&mut self) {
        self.inner.done.store(true, Ordering::Release);
        // A lost VM's back ends are released by the fault thread ([`release_foreign`]); the
        // process must not end before: a back end keeps its own userfaultfd open, so its
        // thread waiting on a page would wait for ever (the vCPUs stop at once, their waits
        // are interruptible, and the worker then ends within about 30 ms of the release's
        // start).
        if matches!(self.inner.outcome(), Some(PostcopyOutcome::Lost(_))) {
            let deadline = Instant::now() + STOP_GRACE + RELEASE_LIMIT + RELEASE_SLACK;
            while self.threads.first().is_some_and(|t| !t.is_finished())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(POLL_MS as u64));
            }
        }
        for t in self.threads.drain(..) {
            // A thread still blocked on its stream is left to end with it (the memory it
            // would copy into is checked by the kernel; nothing here is touched).
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

impl Vm {
    /// Starts post-copy on this VM, built and loaded but not resumed yet: `missing` are the
    /// runs (gpa, pages) the source listed, `requests` the request channel. Resume the VM
    /// only after this returns `Ok`, then hand the streams that carry pages to
    /// [`PostcopyIncoming::place_from`] once the handoff on stream 0 is over. `on_end` is called once, from one of the threads,
    /// when post-copy ends either way.
    pub fn start_postcopy<W>(
        &self,
        missing: &[(u64, u64)],
        requests: W,
        on_end: Box<dyn Fn(&PostcopyOutcome) + Send + Sync>,
    ) -> Result<PostcopyIncoming, MigrateError>
    where
        W: Write + Send + 'static,
    {
        let ram = &self.shared.ram;
        if let Some(why) = self.postcopy_refusal() {
            return Err(StateError::Mismatch(why).into());
        }
        let kvm =
            |what: &str, e: std::io::Error| StateError::Kvm(format!("post-copy: {what}: {e}"));
        // An older copy of a missing page may be in the memfd from an earlier round: punch it
        // out, so the page is truly missing and its first touch waits for the real one.
        for &(gpa, n) in missing {
            let off = file_offset(ram.size, gpa)
                .ok_or_else(|| StateError::Mismatch(format!("missing page {gpa:#x} is not RAM")))?;
            // SAFETY: plain syscall on a descriptor we own; no memory is passed.
            let r = unsafe {
                libc::fallocate(
                    ram.memfd.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    (n * PAGE_SIZE) as libc::off_t,
                )
            };
            if r != 0 {
                return Err(kvm("punching missing pages", std::io::Error::last_os_error()).into());
            }
            // A 2 MiB page (RAM on huge pages, `RamBacking::Huge`) that the kernel cannot
            // split is zeroed instead of freed: the page would stay present, its first touch
            // would not fault, and the guest would run on zeros. Checked, so that never runs.
            if !crate::memory::is_hole(&ram.memfd, off, n * PAGE_SIZE) {
                return Err(StateError::Kvm(format!(
                    "post-copy: guest RAM at {gpa:#x} (+{n} pages) could not be freed for the \
                     source's newer copy (a huge page that did not split); the VM stays on the \
                     source: migrate it again, or with --postcopy never"
                ))
                .into());
            }
        }
        let uffd = Uffd::new().map_err(|e| kvm("creating a userfaultfd", e))?;
        let maps = crate::memory::regions(&ram.memory);
        for &(_, len, host) in &maps {
            uffd.register(host, len)
                .map_err(|e| kvm("registering guest RAM", e))?;
        }
        // The back ends that map guest RAM themselves register their own mappings; their
        // rings are stopped until the VM resumes, so nothing of theirs touched RAM since the
        // punch.
        let mut foreign = Vec::new();
        let mut joined = Vec::new();
        for (index, t) in self.shared.transports.iter().enumerate() {
            let mut device = super::super::lock(t);
            let kind = crate::virtio_mmio::device_name(device.device_type());
            let faults = device
                .postcopy_listen()
                .map_err(|source| StateError::Device {
                    index,
                    kind,
                    source,
                })?;
            drop(device);
            if let Some(f) = faults {
                foreign.push(Arc::new(Foreign {
                    uffd: Uffd::from_file(f.uffd),
                    maps: f.maps,
                }));
                joined.push(t.clone());
            }
        }
        let end = maps.iter().map(|(s, l, _)| s + l).max().unwrap_or(0);
        let inner = Arc::new(Inner {
            uffd,
            foreign: Mutex::new(foreign),
            foreign_waits: Mutex::new(Vec::new()),
            joined,
            tracker: Tracker::new(end, missing),
            maps,
            done: AtomicBool::new(false),
            outcome: Mutex::new(None),
            cv: Condvar::new(),
            on_end,
            started: Instant::now(),
            faults: Default::default(),
            open: AtomicUsize::new(0),
            per_stream: Mutex::new(Vec::new()),
        });
        tracing::info!(
            "post-copy: {} pages on the source, guest RAM registered (and by {} back ends)",
            inner.tracker.remaining(),
            inner.joined.len()
        );
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| kvm("starting a thread", e))
        };
        let faults = {
            let inner = inner.clone();
            spawn(
                "postcopy-faults",
                Box::new(move || serve_faults(&inner, requests)),
            )?
        };
        Ok(PostcopyIncoming {
            inner,
            threads: vec![faults],
            end,
        })
    }
}

/// The fault thread (see the module docs).
fn serve_faults<W: Write>(inner: &Inner, requests: W) {
    // The back ends' userfaultfds, kept open here until this thread ends.
    let foreign: Vec<Arc<Foreign>> = inner
        .foreign
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    serve_until_end(inner, requests, &foreign);
    if matches!(inner.outcome(), Some(PostcopyOutcome::Lost(_))) {
        release_foreign(inner, &foreign);
    }
}

/// Serves faults until post-copy ends either way.
fn serve_until_end<W: Write>(inner: &Inner, mut requests: W, foreign: &[Arc<Foreign>]) {
    let zero = vec![0u8; PAGE_SIZE as usize];
    // Ours first, then the back ends'.
    let mut all: Vec<&Uffd> = vec![&inner.uffd];
    all.extend(foreign.iter().map(|f| &f.uffd));
    // Pages asked for and not arrived yet: when they were asked for.
    let mut asked: HashMap<u64, Instant> = HashMap::new();
    let mut last_check = Instant::now();
    let mut channel_ok = true;
    let mut faults: Vec<(usize, u64)> = Vec::new();
    while !inner.done.load(Ordering::Acquire) {
        // A read error ends post-copy only after the faults read before it are recorded: a
        // back end's among them would otherwise never be answered once the VM is lost.
        let mut broken = None;
        match uffd::wait_any(&all, POLL_MS) {
            Ok(0) => {}
            Ok(_) => {
                'read: for (i, u) in all.iter().enumerate() {
                    // Bounded: a queue refills while we serve it.
                    for _ in 0..256 {
                        match u.read_fault() {
                            Ok(Some(host)) => faults.push((i, host)),
                            Ok(None) => break,
                            Err(e) => {
                                broken = Some(e);
                                break 'read;
                            }
                        }
                    }
                }
            }
            Err(e) => broken = Some(e),
        }
        for (i, host) in faults.drain(..) {
            inner.faults.fetch_add(1, Ordering::Relaxed);
            let gpa = match i {
                0 => inner.gpa(host),
                _ => foreign[i - 1].gpa(host),
            };
            let Some(gpa) = gpa else {
                tracing::warn!("a post-copy fault at {host:#x} is outside guest RAM");
                continue;
            };
            if i > 0 {
                // Before the check below: placement wakes it if it lands meanwhile.
                inner
                    .foreign_waits
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((i - 1, gpa, host));
            }
            if !inner.tracker.is_missing(gpa) {
                // Never listed: a zero page the pre-copy left as a hole, filled here (through
                // our mapping: the back ends' see the same page). Listed: placed, or being
                // placed (its copy wakes our waiters); never filled locally.
                if !inner.tracker.was_listed(gpa) {
                    if let Some(h) = inner.host(gpa) {
                        let _ = inner.uffd.copy(h, &zero);
                    }
                }
                match i {
                    0 => {
                        let _ = inner.uffd.wake(host, PAGE_SIZE);
                    }
                    _ => inner.wake_foreign(),
                }
                continue;
            }
            let want: Vec<u64> = inner
                .tracker
                .window(gpa, WINDOW)
                .into_iter()
                .filter(|g| !asked.contains_key(g))
                .collect();
            if !want.is_empty() {
                // A failed request is not the end by itself: the source closes the channel
                // once it has sent everything, while the last pages are still on their way
                // on stream 0. Stream 0 (placement) or the fault limit decide.
                if channel_ok {
                    if let Err(e) = postcopy::send_request(&mut requests, &want) {
                        tracing::debug!("post-copy request channel closed: {e}");
                        channel_ok = false;
                    }
                }
                let now = Instant::now();
                for g in want {
                    asked.insert(g, now);
                }
            }
        }
        if let Some(e) = broken {
            return inner.lost(format!("reading guest page faults: {e}"));
        }
        if last_check.elapsed() >= Duration::from_millis(200) {
            last_check = Instant::now();
            asked.retain(|g, _| inner.tracker.is_missing(*g));
            if let Some((g, t)) = asked.iter().find(|(_, t)| t.elapsed() > FAULT_LIMIT) {
                return inner.lost(format!(
                    "page {g:#x} asked of the migration source {} ms ago has not come; {} \
                     pages were still on the source",
                    t.elapsed().as_millis(),
                    inner.tracker.remaining()
                ));
            }
        }
    }
    // Closing the channel tells the source's reader we are done.
    drop(requests);
}

/// After the VM is lost, a back end must not wait for ever on pages that will never come: a
/// switch thread serves every port of its switch. Once the vCPUs have had time to stop (the
/// lost path stops them), each back-end fault is answered with a zero page through the back
/// end's own userfaultfd, which wakes only its threads (a vCPU waiting on ours stays blocked
/// until the process ends: the guest never runs on such a page), while another thread tells
/// the back ends POSTCOPY_END so they close theirs. The faults the fault thread read before
/// the loss (`foreign_waits`) are answered first: a userfaultfd delivers a fault once, so
/// they would never be read again. Bounded by [`RELEASE_LIMIT`]; the worker ends the process
/// by then anyway.
fn release_foreign(inner: &Inner, foreign: &[Arc<Foreign>]) {
    if foreign.is_empty() {
        return;
    }
    std::thread::sleep(STOP_GRACE);
    let zero = vec![0u8; PAGE_SIZE as usize];
    let answer = |u: &Uffd, host: u64| {
        // EEXIST (the page came meanwhile) is as good: the wake is what the thread needs.
        let _ = u.copy(host, &zero);
        let _ = u.wake(host, PAGE_SIZE);
    };
    let waiting = std::mem::take(
        &mut *inner
            .foreign_waits
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    let mut read_before = 0u64;
    for (i, _, host) in waiting {
        if let Some(f) = foreign.get(i) {
            answer(&f.uffd, host);
            read_before += 1;
        }
    }
    tracing::warn!(
        "post-copy lost: {read_before} back-end faults read before the loss answered with zero \
         pages"
    );
    let ended = Arc::new(AtomicBool::new(false));
    let joined = inner.joined.clone();
    let done = ended.clone();
    let ender = std::thread::Builder::new()
        .name("postcopy-release".into())
        .spawn(move || {
            for t in &joined {
                super::super::lock(t).postcopy_end();
            }
            done.store(true, Ordering::Release);
        });
    let mut read_after = 0u64;
    if ender.is_ok() {
        let all: Vec<&Uffd> = foreign.iter().map(|f| &f.uffd).collect();
        let started = Instant::now();
        while !ended.load(Ordering::Acquire) && started.elapsed() < RELEASE_LIMIT {
            if !matches!(uffd::wait_any(&all, POLL_MS), Ok(n) if n > 0) {
                continue;
            }
            for u in &all {
                // Bounded: a back end has few threads, each waits on one fault at a time.
                for _ in 0..256 {
                    let Ok(Some(host)) = u.read_fault() else {
                        break;
                    };
                    answer(u, host);
                    read_after += 1;
                }
            }
        }
    }
    inner
        .foreign
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    tracing::warn!(
        "post-copy lost: the vhost-user back ends were released ({} of their faults answered \
         with zero pages of the lost VM, {read_before} of them read before the loss)",
        read_before + read_after
    );
}

/// The placement thread of stream `index` (see the module docs).
fn place_pages<R: Read>(inner: &Inner, index: usize, mut r: R, shared: &MigrateShared, end: u64) {
    let zero = vec![0u8; PAGE_SIZE as usize];
    let mut placed = 0u64;
    loop {
        if inner.done.load(Ordering::Acquire) {
            return;
        }
        let (arrived, wire) = match postcopy::read_arrival(&mut r) {
            Ok(a) => a,
            // Every page is here (claimed, and placed by the thread that claimed it before it
            // ends): only the source's last word is missing, the VM is whole.
            Err(e) if inner.tracker.remaining() == 0 => {
                tracing::warn!(
                    "the migration source went away after its last page (stream {index}: {e})"
                );
                (postcopy::Arrived::Done, 0)
            }
            Err(e) => {
                return inner.lost(format!(
                    "the migration source went away during post-copy (stream {index}: {e}) \
                     with {} pages still on it",
                    inner.tracker.remaining()
                ))
            }
        };
        shared.add_transferred(wire);
        let body = match arrived {
            postcopy::Arrived::Done => break,
            postcopy::Arrived::Pages(b) => b,
        };
        let batch = match pages::decode(&body, end) {
            Ok(b) => b,
            Err(e) => {
                return inner.lost(format!(
                    "a post-copy page batch on stream {index} is bad: {e}"
                ))
            }
        };
        for (gpa, data) in batch {
            if inner.tracker.claim(gpa) == Place::Skip {
                continue; // a duplicate, or a page that was never missing
            }
            let Some(host) = inner.host(gpa) else {
                return inner.lost(format!("post-copy page {gpa:#x} is not RAM"));
            };
            // EEXIST (`Copied::Exists`) cannot hurt: the page is there either way.
            if let Err(e) = inner.uffd.copy(host, data.unwrap_or(&zero)) {
                return inner.lost(format!("placing page {gpa:#x}: {e}"));
            }
            placed += 1;
        }
        inner.wake_foreign();
        // Read inside the lock: the streams' updates then only ever go down.
        shared.update(|s| s.remaining_bytes = inner.tracker.remaining() * PAGE_SIZE);
    }
    if let Some(n) = inner
        .per_stream
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(index)
    {
        *n = placed;
    }
    // The last stream to end ends post-copy: every other one has placed what it claimed.
    if inner.open.fetch_sub(1, Ordering::AcqRel) != 1 {
        return;
    }
    let left = inner.tracker.remaining();
    if left != 0 {
        return inner.lost(format!(
            "the migration source said post-copy is done on every stream with {left} pages \
             never sent"
        ));
    }
    for &(_, len, host) in &inner.maps {
        let _ = inner.uffd.unregister(host, len);
    }
    inner.end_foreign();
    let per_stream = inner
        .per_stream
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    inner.end(PostcopyOutcome::Complete {
        pages: per_stream.iter().sum(),
        faults: inner.faults.load(Ordering::Relaxed),
        millis: inner.started.elapsed().as_millis() as u64,
        per_stream,
    });
}
