//! Readahead for a lazy restore (`lazy.rs`): after the fault thread has served a block, a
//! readahead thread goes on copying the memory that follows it, so a guest working through
//! memory in order finds the next blocks already there instead of faulting on each. The
//! working set (`working_set.rs`) holds what the guest wrote *during* the save; where it goes
//! next after the restore is often memory it last wrote before the save began, which only the
//! faults can point at (measured: docs/vm-state.md, "Restore timing").
//!
//! One stream at a time: a newer fault replaces the stream (the guest moved on). A stream ends
//! after [`READAHEAD`] bytes, at the end of its mapping, or where it finds memory already filled
//! (it caught up with the populate thread or an earlier stream).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::lazy::{copy_all, Mapping, Source};
use crate::uffd::Uffd;

/// How far one stream reads ahead of the fault that started it.
const READAHEAD: u64 = 64 << 20;
/// Bytes copied at a time.
const CHUNK: usize = 2 << 20;
/// How long the thread waits for a hint before checking whether it may end.
const POLL: Duration = Duration::from_millis(20);

/// Where the next stream starts (a host address inside a mapping), set by the fault thread.
#[derive(Default)]
pub struct Hint {
    at: Mutex<Option<u64>>,
    cv: Condvar,
}

impl Hint {
    /// Starts a new stream at `host` (replacing any stream not yet taken).
    pub fn post(&self, host: u64) {
        *self.at.lock().unwrap_or_else(|p| p.into_inner()) = Some(host);
        self.cv.notify_one();
    }

    fn take(&self, timeout: Duration) -> Option<u64> {
        let at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        let (mut at, _) = self
            .cv
            .wait_timeout_while(at, timeout, |a| a.is_none())
            .unwrap_or_else(|p| p.into_inner());
        at.take()
    }

    fn pending(&self) -> bool {
        self.at.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

/// The readahead thread: follow hints until population is `done` or `cancel`led. Read errors
/// and checksum mismatches end a stream quietly, with nothing copied: the fault thread (or
/// the background copy) reports them when it gets there.
pub fn run(
    uffd: &Uffd,
    file: &Source,
    maps: &[Mapping],
    hint: &Hint,
    done: &AtomicBool,
    cancel: &AtomicBool,
) {
    let mut buf = vec![0u8; CHUNK];
    while !done.load(Ordering::Acquire) && !cancel.load(Ordering::Relaxed) {
        let Some(mut at) = hint.take(POLL) else {
            continue;
        };
        let Some(m) = maps.iter().find(|m| at >= m.host && at < m.host + m.len) else {
            continue;
        };
        let end = (at + READAHEAD).min(m.host + m.len);
        while at < end && !hint.pending() && !cancel.load(Ordering::Relaxed) {
            let n = (CHUNK as u64).min(end - at) as usize;
            let b = &mut buf[..n];
            if file.read(b, m.file_offset + (at - m.host)).is_err() {
                break;
            }
            // A hole in the file: those pages are zeros, whoever touches them gets zeros.
            if b.iter().any(|&x| x != 0) {
                match copy_all(uffd, at, b) {
                    Ok(0) => break, // all there already: caught up
                    Ok(copied) => super::trace::prefetched(copied),
                    Err(_) => return, // unregistered: population is over
                }
            }
            at += n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    /// A stream posted at 4 MiB fills from there to the end of the mapping with the file's
    /// bytes (read back through the memfd, which no fault path serves) and nothing before it.
    #[test]
    fn a_stream_fills_what_follows_the_hint_from_the_file() {
        const SIZE: u64 = 16 << 20;
        let Ok(uffd) = Uffd::new() else {
            vireo_testkit::skip_env("userfaultfd (CAP_SYS_PTRACE or /dev/userfaultfd)");
            return;
        };
        let ram = crate::memory::GuestRam::new(SIZE).unwrap();
        let host = crate::memory::regions(&ram.memory)[0].2;
        uffd.register(host, SIZE).unwrap();
        let file = tempfile::tempfile().unwrap();
        let want: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 251) as u8 + 1).collect();
        file.write_all_at(&want, 0).unwrap();
        let file = Source { file, sums: None };
        let maps = vec![Mapping {
            host,
            len: SIZE,
            file_offset: 0,
        }];
        let (hint, done, cancel) = (
            Arc::new(Hint::default()),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let t = {
            let (hint, cancel) = (hint.clone(), cancel.clone());
            std::thread::spawn(move || run(&uffd, &file, &maps, &hint, &done, &cancel))
        };
        hint.post(host + (4 << 20));
        let mut got = vec![0u8; SIZE as usize];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            ram.memfd.read_exact_at(&mut got, 0).unwrap();
            if got[4 << 20..] == want[4 << 20..] || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        cancel.store(true, Ordering::Relaxed);
        t.join().unwrap();
        assert!(
            got[4 << 20..] == want[4 << 20..],
            "the stream did not fill 4..16 MiB"
        );
        assert!(
            got[..4 << 20].iter().all(|&b| b == 0),
            "filled before the hint"
        );
    }
}
