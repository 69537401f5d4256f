//! The copy engine: several threads pull fixed-size chunks of the source's allocated ranges,
//! read them, and write only the parts that are not zero, so holes stay holes in the output.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use vireo_block::{BlockBackend, BlockError};

/// Unit of work handed to a thread; big enough that per-request overhead vanishes.
pub const CHUNK: u64 = 4 << 20;
/// Granularity of zero detection: a run of zeroes at least this long is not written.
pub const ZERO_GRAIN: usize = 64 << 10;

pub struct CopyStats {
    pub bytes_read: u64,
    pub bytes_written: u64,
}

pub enum CopyError {
    Cancelled,
    Block(BlockError),
}

/// Copies `ranges` (virtual `(offset, length)` ranges, sorted) from `src` to `dst` using `threads` workers.
/// `progress(done, total)` and `tick()` are called from this thread about ten times a second
/// (`tick` lets the caller start write-back while the copy goes on).
pub fn copy_ranges(
    src: &dyn BlockBackend,
    dst: &dyn BlockBackend,
    ranges: &[(u64, u64)],
    threads: usize,
    progress: &dyn Fn(u64, u64),
    tick: &dyn Fn(),
    cancel: &AtomicBool,
) -> Result<CopyStats, CopyError> {
    let chunks: Vec<(u64, u64)> = ranges
        .iter()
        .flat_map(|&(start, len)| {
            let end = start + len;
            // Chunks aligned to CHUNK so writes line up with destination blocks.
            let mut v = Vec::new();
            let mut at = start;
            while at < end {
                let next = ((at / CHUNK) + 1) * CHUNK;
                let stop = next.min(end);
                v.push((at, stop - at));
                at = stop;
            }
            v
        })
        .collect();
    let total: u64 = chunks.iter().map(|c| c.1).sum();
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    let failed: Mutex<Option<BlockError>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let running = AtomicUsize::new(threads.max(1));

    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut buf = vec![0u8; CHUNK as usize];
                loop {
                    if stop.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(offset, len)) = chunks.get(i) else {
                        break;
                    };
                    let buf = &mut buf[..len as usize];
                    let result = src
                        .read_at(buf, offset)
                        .and_then(|_| write_nonzero(dst, buf, offset));
                    match result {
                        Ok(n) => {
                            written.fetch_add(n, Ordering::Relaxed);
                            done.fetch_add(len, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed.lock().get_or_insert(e);
                            stop.store(true, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                running.fetch_sub(1, Ordering::Release);
            });
        }
        while running.load(Ordering::Acquire) > 0 {
            progress(done.load(Ordering::Relaxed), total);
            tick();
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    if let Some(e) = failed.into_inner() {
        return Err(CopyError::Block(e));
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(CopyError::Cancelled);
    }
    progress(total, total);
    Ok(CopyStats {
        bytes_read: total,
        bytes_written: written.into_inner(),
    })
}

/// Writes the non-zero runs of `buf` (at `ZERO_GRAIN` granularity); returns bytes written.
fn write_nonzero(dst: &dyn BlockBackend, buf: &[u8], offset: u64) -> Result<u64, BlockError> {
    let mut written = 0u64;
    let mut at = 0usize;
    while at < buf.len() {
        // Skip zero grains.
        while at < buf.len() && is_zero(&buf[at..(at + ZERO_GRAIN).min(buf.len())]) {
            at += ZERO_GRAIN;
        }
        if at >= buf.len() {
            break;
        }
        let start = at;
        while at < buf.len() && !is_zero(&buf[at..(at + ZERO_GRAIN).min(buf.len())]) {
            at += ZERO_GRAIN;
        }
        let end = at.min(buf.len());
        dst.write_at(&buf[start..end], offset + start as u64)?;
        written += (end - start) as u64;
    }
    Ok(written)
}

/// Zero test that the compiler vectorises: OR-fold 16-byte lanes.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u128;
        for lane in c.chunks_exact(16) {
            acc |= u128::from_ne_bytes(lane.try_into().unwrap());
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 1000];
        assert!(is_zero(&v));
        v[999] = 1;
        assert!(!is_zero(&v));
        v[999] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
}
