//! The destination's side of post-copy. Before the VM resumes, every missing page is punched
//! out of the memfd (pre-copy may have left an older version there) and guest RAM is
//! registered with a userfaultfd, so the first touch of a missing page (by a vCPU through
//! KVM, or a device) waits. Two threads:
//!
//! - **faults**: a fault on a missing page sends a request for it and its neighbours
//!   (a [`WINDOW`]-page aligned block) on the request channel; a fault on a page that was
//!   never missing is a zero page the pre-copy left as a hole, filled with zeros here;
//! - **placement**: reads stream 0 and places each page that is still missing with
//!   UFFDIO_COPY (atomic, and it wakes the waiters); a duplicate (asked for, then reached by
//!   the background stream) is skipped ([`Tracker::claim`]); EEXIST is not an error.
//!
//! Once `PostcopyDone` came and nothing is missing, RAM is unregistered and the VM is an
//! ordinary one. **Lost**: if stream 0 breaks or ends early, or a
//! faulting page does not come within [`FAULT_LIMIT`] (a request that cannot be sent counts
//! from its fault, as the page may still be on its way), the VM cannot go on correctly:
//! `on_end` gets `Err(reason)` and the registration stays (a waiting vCPU is never handed a
//! zero page); the caller stops the VM and reports it lost.
//!
//! Locking: none; the [`Tracker`] is atomics, each stream has one owner thread.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::uffd::Uffd;

/// Pages asked for around a faulting one (aligned block of 64 KiB): guests touch memory in
/// runs, and each fault is a round trip to the source.
pub const WINDOW: u64 = 16;
/// A page asked for that has not come after this means the source is hung: the VM is lost
/// rather than a vCPU blocked for ever.
pub const FAULT_LIMIT: Duration = Duration::from_secs(10);
const POLL_MS: i32 = 20;

/// How post-copy ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostcopyOutcome {
    /// Every page arrived: (pages placed, faults served, ms since the start).
    Complete {
        pages: u64,
        faults: u64,
        millis: u64,
    },
    /// The VM cannot continue (see the module docs).
    Lost(String),
}

struct Inner {
    uffd: Uffd,
    tracker: Tracker,
    /// (gpa start, len, host address) of each RAM region.
    maps: Vec<(u64, u64, u64)>,
    done: AtomicBool,
    outcome: Mutex<Option<PostcopyOutcome>>,
    cv: Condvar,
    on_end: Box<dyn Fn(&PostcopyOutcome) + Send + Sync>,
    started: Instant,
    faults: std::sync::atomic::AtomicU64,
}

impl Inner {
    fn host(&self, gpa: u64) -> Option<u64> {
        self.maps
            .iter()
            .find(|(s, l, _)| gpa >= *s && gpa < s + l)
            .map(|(s, _, h)| h + (gpa - s))
    }

    fn gpa(&self, host: u64) -> Option<u64> {
        self.maps
            .iter()
            .find(|(_, l, h)| host >= *h && host < h + l)
            .map(|(s, _, h)| s + (host - h))
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

    fn lost(&self, why: String) {
        self.end(PostcopyOutcome::Lost(why));
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
    /// Starts placing the pages that come on stream 0 (after the handoff's last line).
    pub fn place_from<R: Read + Send + 'static>(
        &mut self,
        pages_in: R,
        shared: Arc<MigrateShared>,
    ) -> std::io::Result<()> {
        let (inner, end) = (self.inner.clone(), self.end);
        let t = std::thread::Builder::new()
            .name("postcopy-place".into())
            .spawn(move || place_pages(&inner, pages_in, &shared, end))?;
        self.threads.push(t);
        Ok(())
    }

    /// The outcome, once post-copy has ended.
    pub fn outcome(&self) -> Option<PostcopyOutcome> {
        self.inner
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
    /// only after this returns `Ok`, then hand stream 0 to [`PostcopyIncoming::place_from`]
    /// once the handoff on it is over. `on_end` is called once, from one of the threads,
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
        if self.devices_map_memory() {
            return Err(StateError::Mismatch(
                "post-copy needs every device inside this process; a vhost-user device maps guest \
                 RAM itself and would read pages not yet here"
                    .into(),
            )
            .into());
        }
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
        let end = maps.iter().map(|(s, l, _)| s + l).max().unwrap_or(0);
        let inner = Arc::new(Inner {
            uffd,
            tracker: Tracker::new(end, missing),
            maps,
            done: AtomicBool::new(false),
            outcome: Mutex::new(None),
            cv: Condvar::new(),
            on_end,
            started: Instant::now(),
            faults: Default::default(),
        });
        tracing::info!(
            "post-copy: {} pages on the source, guest RAM registered",
            inner.tracker.remaining()
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
fn serve_faults<W: Write>(inner: &Inner, mut requests: W) {
    let zero = vec![0u8; PAGE_SIZE as usize];
    // Pages asked for and not arrived yet: when they were asked for.
    let mut asked: HashMap<u64, Instant> = HashMap::new();
    let mut last_check = Instant::now();
    let mut channel_ok = true;
    while !inner.done.load(Ordering::Acquire) {
        let host = match inner.uffd.next_fault(POLL_MS) {
            Ok(Some(h)) => Some(h),
            Ok(None) => None,
            Err(e) => return inner.lost(format!("reading guest page faults: {e}")),
        };
        if let Some(host) = host {
            inner.faults.fetch_add(1, Ordering::Relaxed);
            let Some(gpa) = inner.gpa(host) else { continue };
            if !inner.tracker.is_missing(gpa) {
                // Never missing (a zero page left as a hole) or placed meanwhile: in the
                // latter case the copy fails with EEXIST and the wake releases the waiter.
                let _ = inner.uffd.copy(host, &zero);
                let _ = inner.uffd.wake(host, PAGE_SIZE);
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

/// The placement thread (see the module docs).
fn place_pages<R: Read>(inner: &Inner, mut r: R, shared: &MigrateShared, end: u64) {
    let zero = vec![0u8; PAGE_SIZE as usize];
    let mut placed = 0u64;
    loop {
        if inner.done.load(Ordering::Acquire) {
            return;
        }
        let (arrived, wire) = match postcopy::read_arrival(&mut r) {
            Ok(a) => a,
            Err(e) => {
                return inner.lost(format!(
                    "the migration source went away during post-copy ({e}) with {} pages \
                     still on it",
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
            Err(e) => return inner.lost(format!("a post-copy page batch is bad: {e}")),
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
        let left = inner.tracker.remaining() * PAGE_SIZE;
        shared.update(|s| s.remaining_bytes = left);
    }
    let left = inner.tracker.remaining();
    if left != 0 {
        return inner.lost(format!(
            "the migration source said post-copy is done with {left} pages never sent"
        ));
    }
    for &(_, len, host) in &inner.maps {
        let _ = inner.uffd.unregister(host, len);
    }
    inner.end(PostcopyOutcome::Complete {
        pages: placed,
        faults: inner.faults.load(Ordering::Relaxed),
        millis: inner.started.elapsed().as_millis() as u64,
    });
}
