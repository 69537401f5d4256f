//! Lazy restore (docs/vm-state.md, "Lazy restore"): guest RAM starts empty and registered with
//! a userfaultfd; a **fault thread** fills each page the guest (through KVM), a device thread
//! or the VMM touches first from `memory.bin`, and a **populate thread** copies every data
//! extent of the file in the background. Once the whole file is in, the ranges are
//! unregistered and both threads end: from then on the VM is an ordinary one.
//!
//! Both threads fill pages only with UFFDIO_COPY, which is atomic per page: whichever comes
//! first wins, the other gets EEXIST and (the fault thread) wakes the waiters. Neither thread
//! touches guest RAM through a Rust reference, only through the kernel.
//!
//! Every range read from the file is checked against the save's page checksums
//! ([`Source::read`], `checksums.rs`) before it is copied in, and a hole the background copy
//! skips is checked to have been zeros: a corrupt page stops the VM (`on_error`) instead of
//! reaching the guest.
//!
//! Only this process's mappings are covered: another process mapping the memfd (a vhost-user
//! back end) would see zeros where pages are not populated yet. `Vm::restore` therefore
//! restores eagerly when the VM has a vhost-user device, and anything reading RAM through the
//! memfd (a save, a reset) calls [`LazyRestore::wait`] first.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::checksums::MemorySums;
use super::readahead::Hint;
use super::working_set::WorkingSet;
use crate::memory::PAGE_SIZE;
use crate::uffd::{Copied, Uffd};

/// Bytes the populate thread reads and copies at a time.
const POPULATE_CHUNK: usize = 2 << 20;
/// The most threads copying the working set at once (fewer on a host with fewer CPUs).
const PREFETCH_THREADS: usize = 4;
/// Bytes the fault thread fills around a faulting page (aligned).
/// 1 MiB rather than less: each fault is a round trip (a VM exit, waking this thread, waking
/// the vCPU) that costs more than the copy on a busy host; measured against 256 KiB and 2 MiB
/// in docs/vm-state.md, "Restore timing".
const FAULT_BLOCK: u64 = 1 << 20;
/// How long the fault thread waits for an event before checking whether it may end.
const POLL_MS: i32 = 20;

/// One guest RAM mapping: host address, length, offset in the memfd (= in memory.bin).
#[derive(Clone, Copy, Debug)]
pub struct Mapping {
    pub host: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// The memory file and, when the save has them, its page checksums.
pub struct Source {
    pub file: File,
    pub sums: Option<Arc<MemorySums>>,
}

impl Source {
    /// Reads `buf.len()` bytes at `offset` (page-aligned, whole pages) and checks them.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| format!("reading {} bytes at {offset:#x}: {e}", buf.len()))?;
        match &self.sums {
            Some(sums) => sums.verify(offset, buf).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// Checks that `[offset, offset+len)`, a hole in the file, was zeros when saved.
    fn check_hole(&self, offset: u64, len: u64) -> Result<(), String> {
        match &self.sums {
            Some(sums) => sums.verify_zeros(offset, len).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

/// How the population ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Populated {
    Done { bytes: u64, millis: u64 },
    Failed(String),
    Cancelled,
}

struct Progress {
    result: Mutex<Option<Populated>>,
    cv: Condvar,
}

/// The running lazy restore of one VM. Dropping it cancels population (pages not in yet read
/// as zeros afterwards) and joins both threads.
pub struct LazyRestore {
    cancel: Arc<AtomicBool>,
    progress: Arc<Progress>,
    threads: Vec<JoinHandle<()>>,
}

impl LazyRestore {
    /// Registers `maps` with a new userfaultfd and starts the two threads. The mappings must be
    /// empty (every page missing) and stay mapped while this lives. `on_error` is called
    /// (once) if a page cannot be read from `file` or fails its checksum (`sums`): the VM
    /// cannot continue correctly then.
    ///
    /// The populate thread copies `hot` (the save's working set) first, then everything else.
    pub fn start(
        file: File,
        maps: Vec<Mapping>,
        hot: WorkingSet,
        sums: Option<Arc<MemorySums>>,
        on_error: Box<dyn Fn(String) + Send + Sync>,
    ) -> std::io::Result<LazyRestore> {
        let uffd = Arc::new(Uffd::new()?);
        for m in &maps {
            uffd.register(m.host, m.len)?;
        }
        super::trace::mark("  userfaultfd registered");
        let file = Arc::new(Source { file, sums });
        let cancel = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress {
            result: Mutex::new(None),
            cv: Condvar::new(),
        });
        let on_error: Arc<dyn Fn(String) + Send + Sync> = Arc::from(on_error);
        let hint = Arc::new(Hint::default());
        let faults = {
            let (uffd, file, maps, hint, done, on_error) = (
                uffd.clone(),
                file.clone(),
                maps.clone(),
                hint.clone(),
                done.clone(),
                on_error.clone(),
            );
            std::thread::Builder::new()
                .name("restore-faults".into())
                .spawn(move || serve_faults(&uffd, &file, &maps, &hint, &done, &*on_error))?
        };
        let readahead = {
            let (uffd, file, maps, done, cancel) = (
                uffd.clone(),
                file.clone(),
                maps.clone(),
                done.clone(),
                cancel.clone(),
            );
            std::thread::Builder::new()
                .name("restore-readahead".into())
                .spawn(move || super::readahead::run(&uffd, &file, &maps, &hint, &done, &cancel))?
        };
        let populate = {
            let (cancel, progress) = (cancel.clone(), progress.clone());
            std::thread::Builder::new()
                .name("restore-populate".into())
                .spawn(move || {
                    background_priority();
                    let started = Instant::now();
                    let hot_result = prefetch(&uffd, &file, &maps, &hot, &cancel);
                    super::trace::mark("working set in");
                    let result = match hot_result.and_then(|hot_bytes| {
                        populate(&uffd, &file, &maps, &cancel).map(|b| b + hot_bytes)
                    }) {
                        Ok(_) if cancel.load(Ordering::Relaxed) => Populated::Cancelled,
                        Ok(bytes) => Populated::Done {
                            bytes,
                            millis: started.elapsed().as_millis() as u64,
                        },
                        Err(e) => {
                            on_error(format!("restoring guest memory: {e}"));
                            Populated::Failed(e)
                        }
                    };
                    // Unregistering wakes every thread still waiting; pages not filled by
                    // now (only after a failure or cancel) read as zeros.
                    for m in &maps {
                        let _ = uffd.unregister(m.host, m.len);
                    }
                    done.store(true, Ordering::Release);
                    super::trace::mark("background copy done");
                    tracing::info!("lazy restore: {result:?}");
                    *progress.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
                    progress.cv.notify_all();
                })?
        };
        Ok(LazyRestore {
            cancel,
            progress,
            threads: vec![faults, readahead, populate],
        })
    }

    /// Blocks until every page of the file is in guest RAM (or population failed).
    pub fn wait(&self) -> Populated {
        let mut r = self
            .progress
            .result
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = r.as_ref() {
                return r.clone();
            }
            r = self.progress.cv.wait(r).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The outcome so far (`None` while populating).
    pub fn status(&self) -> Option<Populated> {
        self.progress
            .result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for LazyRestore {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The fault thread: fill the block around each faulting page from the file until population
/// is done. A block rather than a page: guests touch memory in runs, and each fault costs a
/// round trip through this thread (and on KVM a VM exit).
fn serve_faults(
    uffd: &Uffd,
    file: &Source,
    maps: &[Mapping],
    readahead: &Hint,
    done: &AtomicBool,
    on_error: &dyn Fn(String),
) {
    let mut block = vec![0u8; FAULT_BLOCK as usize];
    let mut failed = false;
    loop {
        let addr = match uffd.next_fault(POLL_MS) {
            Ok(Some(a)) => a,
            Ok(None) if done.load(Ordering::Acquire) => return,
            Ok(None) => continue,
            Err(e) => {
                on_error(format!("lazy restore: reading faults: {e}"));
                return;
            }
        };
        let Some(m) = maps
            .iter()
            .find(|m| addr >= m.host && addr < m.host + m.len)
        else {
            continue;
        };
        let t = Instant::now();
        let start = m.host + (addr - m.host) / FAULT_BLOCK * FAULT_BLOCK;
        let len = FAULT_BLOCK.min(m.host + m.len - start) as usize;
        let offset = m.file_offset + (start - m.host);
        let buf = &mut block[..len];
        if let Err(e) = file.read(buf, offset) {
            if !failed {
                on_error(format!("restoring guest memory: {e}"));
                failed = true;
            }
            // The VM is being stopped; give the waiter zero pages (never the bad ones) so it
            // can get there.
            buf.fill(0);
        }
        // The faulting page goes in first and alone, which wakes its waiter at once (a
        // UFFDIO_COPY wakes the range it filled): the rest of the block costs ~1 ms of page
        // allocation the waiter need not sit through. Then the pages after it (a guest going
        // on in order needs those next), then those before. Pages already filled (by the
        // other threads) are skipped; an error means the range was unregistered meanwhile
        // (population done), which woke everyone.
        let page = ((addr & !(PAGE_SIZE - 1)) - start) as usize;
        let after = page + PAGE_SIZE as usize;
        let _ = copy_all(uffd, start + page as u64, &buf[page..after]);
        let _ = copy_all(uffd, start + after as u64, &buf[after..]);
        let _ = copy_all(uffd, start, &buf[..page]);
        // The faulting page may have been among the skipped ones: its waiter needs waking.
        let _ = uffd.wake(addr, PAGE_SIZE);
        if start + (len as u64) < m.host + m.len {
            readahead.post(start + len as u64);
        }
        super::trace::fault_served(t.elapsed().as_nanos() as u64);
    }
}

/// The populate thread's first part: copy the working set's runs, **last page first**, with
/// up to [`PREFETCH_THREADS`] threads taking 2 MiB pieces in turn (filling a page costs more in
/// allocating it than in copying, and allocations on several CPUs run in parallel). A guest
/// that resumes tends to go on through memory in order from where it stopped, and the fault
/// thread serves it there; starting at the far end keeps the two from filling the same pages
/// and each waiting for the other (measured: docs/vm-state.md, "Restore timing").
/// Returns the bytes copied.
fn prefetch(
    uffd: &Arc<Uffd>,
    file: &Arc<Source>,
    maps: &[Mapping],
    hot: &WorkingSet,
    cancel: &Arc<AtomicBool>,
) -> Result<u64, String> {
    // (file offset, host address, length) of each piece, each inside one mapping; last first.
    let mut pieces = Vec::new();
    for &(run, run_len) in &hot.runs {
        let mut at = run;
        let end = run + run_len;
        while at < end {
            // A run may cross from one mapping into the next (they follow each other in
            // the file); a run past them all (not this VM's) is ignored.
            let Some(m) = maps
                .iter()
                .find(|m| at >= m.file_offset && at < m.file_offset + m.len)
            else {
                break;
            };
            let n = (POPULATE_CHUNK as u64)
                .min(end - at)
                .min(m.file_offset + m.len - at);
            pieces.push((at, m.host + (at - m.file_offset), n));
            at += n;
        }
    }
    pieces.reverse();
    let pieces = Arc::new(pieces);
    let next = Arc::new(AtomicUsize::new(0));
    let work = {
        let (uffd, file, pieces, next, cancel) = (
            uffd.clone(),
            file.clone(),
            pieces.clone(),
            next.clone(),
            cancel.clone(),
        );
        move || -> Result<u64, String> {
            background_priority();
            let mut buf = vec![0u8; POPULATE_CHUNK];
            let mut copied = 0u64;
            while let Some(&(at, host, n)) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) {
                if cancel.load(Ordering::Relaxed) {
                    break;
                }
                let n = n as usize;
                file.read(&mut buf[..n], at)?;
                copy_all(&uffd, host, &buf[..n])?;
                copied += n as u64;
                super::trace::prefetched(n as u64);
            }
            Ok(copied)
        }
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, PREFETCH_THREADS);
    // Helpers are best effort: if one cannot start, the others take its pieces.
    let helpers: Vec<_> = (1..threads)
        .filter_map(|_| {
            std::thread::Builder::new()
                .name("restore-prefetch".into())
                .spawn(work.clone())
                .ok()
        })
        .collect();
    let mut result = work();
    for h in helpers {
        let r = h
            .join()
            .unwrap_or_else(|_| Err("a prefetch thread panicked".into()));
        result = match (result, r) {
            (Ok(a), Ok(b)) => Ok(a + b),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
    }
    result
}

/// The populate thread: copy every non-zero chunk of the file's data extents into place.
/// Returns the bytes copied.
fn populate(
    uffd: &Uffd,
    file: &Source,
    maps: &[Mapping],
    cancel: &AtomicBool,
) -> Result<u64, String> {
    let mut buf = vec![0u8; POPULATE_CHUNK];
    let mut copied = 0u64;
    for m in maps {
        let end = m.file_offset + m.len;
        let mut off = m.file_offset;
        while off < end {
            if cancel.load(Ordering::Relaxed) {
                return Ok(copied);
            }
            // Holes in the file are zero pages: nothing to copy (a fault there gets zeros).
            let Some((data, data_end)) = next_data(&file.file, off, end)? else {
                file.check_hole(off, end - off)?;
                break;
            };
            file.check_hole(off, data - off)?;
            let mut at = data;
            while at < data_end {
                let n = (POPULATE_CHUNK as u64).min(data_end - at) as usize;
                file.read(&mut buf[..n], at)?;
                if buf[..n].iter().any(|&b| b != 0) {
                    copy_all(uffd, m.host + (at - m.file_offset), &buf[..n])?;
                    copied += n as u64;
                    super::trace::populated(n as u64);
                }
                at += n as u64;
            }
            off = data_end;
        }
    }
    Ok(copied)
}

/// Lowers the calling thread's priority a little (nice +5): the background copy and the
/// working set are guesses, the fault and readahead threads serve what the guest waits for now,
/// and on a busy host they should get the CPU first. An idle host runs both at full speed.
fn background_priority() {
    crate::thread_priority::lower_by(5);
}

/// Copies `src` to `dst`, skipping pages already filled by another thread. Returns the bytes
/// this call filled.
pub(super) fn copy_all(uffd: &Uffd, mut dst: u64, mut src: &[u8]) -> Result<u64, String> {
    let mut copied = 0;
    while !src.is_empty() {
        match uffd
            .copy(dst, src)
            .map_err(|e| format!("UFFDIO_COPY at {dst:#x}: {e}"))?
        {
            Copied::All => return Ok(copied + src.len() as u64),
            Copied::Exists { done } => {
                // `done` bytes went in, the next page was there already: skip it.
                copied += done;
                let skip = (done + PAGE_SIZE).min(src.len() as u64);
                dst += skip;
                src = &src[skip as usize..];
            }
        }
    }
    Ok(copied)
}

/// The next data extent of `file` in `[from, end)`, page-aligned, or `None` if only holes
/// remain (SEEK_DATA / SEEK_HOLE; a file system without them reports all of it as data).
fn next_data(file: &File, from: u64, end: u64) -> Result<Option<(u64, u64)>, String> {
    let fd = file.as_raw_fd();
    // SAFETY: lseek on our own fd.
    let data = unsafe { libc::lseek(fd, from as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(format!("SEEK_DATA at {from:#x}: {e}"))
        };
    }
    let data = (data as u64) & !(PAGE_SIZE - 1);
    if data >= end {
        return Ok(None);
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(format!(
            "SEEK_HOLE at {data:#x}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let hole = (hole as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    Ok(Some((data, hole.min(end))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path that fills pages (faults in 1 MiB blocks, readahead after them, the working
    /// set from its last page, the background copy) against one file: what a reader sees
    /// through the mapping is the file, byte for byte, holes as zeros, and population ends.
    #[test]
    fn every_byte_read_through_the_mapping_is_the_files() {
        use std::os::unix::fs::FileExt;
        use vm_memory::Bytes;
        const SIZE: u64 = 24 << 20;
        let Ok(probe) = Uffd::new() else {
            vireo_testkit::skip_env("userfaultfd (CAP_SYS_PTRACE or /dev/userfaultfd)");
            return;
        };
        drop(probe);
        let ram = crate::memory::GuestRam::new(SIZE).unwrap();
        let host = crate::memory::regions(&ram.memory)[0].2;
        // Data with a page-varying pattern, and a 4 MiB hole at 10 MiB.
        let file = tempfile::tempfile().unwrap();
        file.set_len(SIZE).unwrap();
        let mut want = vec![0u8; SIZE as usize];
        for (i, chunk) in want.chunks_mut(4096).enumerate() {
            if !(10 * 256..14 * 256).contains(&i) {
                chunk.fill((i % 251) as u8 + 1);
            }
        }
        for (at, chunk) in want.chunks(1 << 20).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                file.write_all_at(chunk, (at as u64) << 20).unwrap();
            }
        }
        let hot = WorkingSet {
            runs: vec![(2 << 20, 3 << 20), (16 << 20, 1 << 20)],
        };
        let maps = vec![Mapping {
            host,
            len: SIZE,
            file_offset: 0,
        }];
        let lazy = LazyRestore::start(file, maps, hot, None, Box::new(|e| panic!("{e}"))).unwrap();
        // Read from the middle on (faults and readahead), then from the start.
        let mut got = vec![0u8; SIZE as usize];
        let order = (12u64..24).chain(0..12);
        for mib in order {
            let at = (mib << 20) as usize;
            ram.memory
                .read_slice(
                    &mut got[at..at + (1 << 20)],
                    vm_memory::GuestAddress(mib << 20),
                )
                .unwrap();
        }
        assert!(got == want, "restored memory differs from the file");
        assert!(
            matches!(lazy.wait(), Populated::Done { .. }),
            "{:?}",
            lazy.status()
        );
    }

    /// A page of the file changed after the save: the guest touching it never sees the bad
    /// bytes (it gets zeros while the VM is stopped), `on_error` names the page, and the
    /// background copy ends `Failed`. A data page punched into a hole is caught the same way.
    #[test]
    fn a_page_that_fails_its_checksum_stops_the_restore() {
        use crate::state::checksums::SumsBuilder;
        use std::os::unix::fs::FileExt;
        use vm_memory::Bytes;
        const SIZE: u64 = 16 << 20;
        let Ok(probe) = Uffd::new() else {
            vireo_testkit::skip_env("userfaultfd (CAP_SYS_PTRACE or /dev/userfaultfd)");
            return;
        };
        drop(probe);
        for (damage, at) in [("flip", 0x30_0010u64), ("punch", 0x50_0000)] {
            let ram = crate::memory::GuestRam::new(SIZE).unwrap();
            let host = crate::memory::regions(&ram.memory)[0].2;
            let file = tempfile::tempfile().unwrap();
            file.set_len(SIZE).unwrap();
            let data: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 200) as u8 + 1).collect();
            file.write_all_at(&data, 0).unwrap();
            let sums = SumsBuilder::new(SIZE);
            sums.wrote(0, &data);
            let sums = Arc::new(sums.finish());
            if damage == "flip" {
                file.write_all_at(&[data[at as usize] ^ 0x80], at).unwrap();
            } else {
                // SAFETY: fallocate on our own temporary file.
                let r = unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        at as i64,
                        1 << 20,
                    )
                };
                assert_eq!(r, 0, "punching a hole");
            }
            let errors = Arc::new(Mutex::new(Vec::<String>::new()));
            let maps = vec![Mapping {
                host,
                len: SIZE,
                file_offset: 0,
            }];
            let lazy = {
                let errors = errors.clone();
                LazyRestore::start(
                    file,
                    maps,
                    WorkingSet::default(),
                    Some(sums),
                    Box::new(move |e| errors.lock().unwrap().push(e)),
                )
                .unwrap()
            };
            let mut page = [0u8; 4096];
            ram.memory
                .read_slice(&mut page, vm_memory::GuestAddress(at & !0xfff))
                .unwrap();
            let want = &data[(at & !0xfff) as usize..][..4096];
            assert!(
                page == [0u8; 4096] || page == want,
                "{damage}: bad bytes reached RAM"
            );
            assert!(
                matches!(lazy.wait(), Populated::Failed(_)),
                "{damage}: {:?}",
                lazy.status()
            );
            let errors = errors.lock().unwrap().clone();
            let where_ = format!("{:#x}", at & !0xfff);
            assert!(
                errors
                    .iter()
                    .any(|e| e.contains("corrupt") && e.contains(&where_)),
                "{damage}: {errors:?}"
            );
        }
    }

    #[test]
    fn next_data_skips_holes() {
        use std::os::unix::fs::FileExt;
        let f = tempfile::tempfile().unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 3 << 20).unwrap();
        let (d, h) = next_data(&f, 0, 8 << 20).unwrap().unwrap();
        // File systems may round extents; the data page must be inside what is reported.
        assert!(d <= 3 << 20 && h >= (3 << 20) + 4096, "{d:#x}..{h:#x}");
        assert_eq!(next_data(&f, 4 << 20, 8 << 20), Ok(None));
    }
}
