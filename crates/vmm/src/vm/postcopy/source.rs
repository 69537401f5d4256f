//! The source's side of post-copy: the VM stays paused here and its memfd is the only
//! up-to-date copy of the missing pages. One loop owns stream 0's writing half: it sends
//! pages the destination asked for first (a vCPU waits on them), and between requests the
//! remaining missing pages in address order, a small batch at a time so a request never
//! waits behind much. A reader thread owns the request channel and hands requests over a
//! channel. When every missing page has been sent, `PostcopyDone` ends it; only then may the
//! caller stop the VM here.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vireo_migration::{postcopy, Codec, MigrationError};

use super::super::migrate::{MigrateError, MigrateShared};
use super::super::VmHandle;
use super::tracker::{Place, Tracker};
use crate::dirty::DirtyBitmap;
use crate::memory::PAGE_SIZE;
use crate::state::StateError;

/// Pages per background batch: 256 KiB, about 0.1 ms of a loopback link, so a request that
/// comes in meanwhile is answered after at most that.
const BACKGROUND_BATCH: usize = 64;

/// What the serving did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostcopyServed {
    pub pages: u64,
    /// Pages sent because the destination asked for them.
    pub requested: u64,
    pub requests: u64,
    pub millis: u64,
}

impl VmHandle {
    /// Serves the post-copy phase: `out` is stream 0 (after the handoff), `requests` the
    /// request channel (its reader thread ends when the destination closes it or the socket
    /// is shut down). `bandwidth` caps the background stream (bytes/s; answers to requests
    /// are never held back). The VM must be paused. `Err`: the destination is gone, and with it the
    /// only running copy of the VM (the caller reports it lost; resuming here would fork it).
    pub fn serve_postcopy<W: Write, R: Read + Send + 'static>(
        &self,
        out: &mut W,
        mut requests: R,
        missing: &DirtyBitmap,
        shared: &MigrateShared,
        bandwidth: Option<u64>,
    ) -> Result<PostcopyServed, MigrateError> {
        let started = Instant::now();
        let end = crate::memory::ram_ranges(self.0.ram.size)
            .last()
            .map_or(0, |(s, l)| s + l);
        let order = missing.pages();
        let unsent = Tracker::new(end, &super::runs_of(missing));
        let (tx, rx) = mpsc::channel::<Vec<u64>>();
        std::thread::Builder::new()
            .name("postcopy-requests".into())
            .spawn(move || loop {
                match postcopy::read_request(&mut requests, end) {
                    Ok(Some(pages)) => {
                        if tx.send(pages).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!("post-copy request channel ended: {e}");
                        return;
                    }
                }
            })
            .map_err(|e| StateError::Kvm(format!("starting the post-copy request thread: {e}")))?;
        let err = |source: MigrationError| MigrateError::Stream { stream: 0, source };
        let mut stats = PostcopyServed::default();
        let mut cursor = 0;
        let mut buf = vec![0u8; postcopy::MAX_REQUEST * PAGE_SIZE as usize];
        let mut background_bytes = 0u64;
        loop {
            // Requests first: drain what has come in, keep only pages not sent yet.
            let mut urgent = Vec::new();
            while let Ok(pages) = rx.try_recv() {
                stats.requests += 1;
                urgent.extend(
                    pages
                        .into_iter()
                        .filter(|&g| unsent.claim(g) == Place::Copy),
                );
            }
            let background = urgent.is_empty();
            let batch = if !background {
                stats.requested += urgent.len() as u64;
                urgent
            } else {
                if let Some(rate) = bandwidth {
                    // Sleep until the background bytes sent so far are due, a little at a
                    // time so a request is not kept waiting behind the cap.
                    let due = Duration::from_secs_f64(background_bytes as f64 / rate.max(1) as f64);
                    if let Some(ahead) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(ahead.min(Duration::from_millis(1)));
                        continue;
                    }
                }
                let mut b = Vec::with_capacity(BACKGROUND_BATCH);
                while b.len() < BACKGROUND_BATCH && cursor < order.len() {
                    if unsent.claim(order[cursor]) == Place::Copy {
                        b.push(order[cursor]);
                    }
                    cursor += 1;
                }
                b
            };
            if batch.is_empty() {
                break;
            }
            for chunk in batch.chunks(postcopy::MAX_REQUEST) {
                for (i, &gpa) in chunk.iter().enumerate() {
                    let page = &mut buf[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize];
                    let off = self.file_offset(gpa).ok_or_else(|| {
                        StateError::Kvm(format!("post-copy page {gpa:#x} is not RAM"))
                    })?;
                    self.0.ram.memfd.read_exact_at(page, off).map_err(|e| {
                        StateError::Kvm(format!("reading guest RAM at {gpa:#x}: {e}"))
                    })?;
                }
                let pages = chunk.iter().enumerate().map(|(i, &g)| {
                    (
                        g,
                        &buf[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize],
                    )
                });
                let wire = postcopy::send_pages(out, Codec::None, pages).map_err(err)?;
                shared.add_transferred(wire);
                if background {
                    background_bytes += wire;
                }
            }
            if stats.requested > 0 {
                out.flush().map_err(|e| err(e.into()))?;
            }
            stats.pages += batch.len() as u64;
            let left = unsent.remaining() * PAGE_SIZE;
            shared.update(|s| s.remaining_bytes = left);
        }
        postcopy::send_done(out).map_err(err)?;
        stats.millis = started.elapsed().as_millis() as u64;
        tracing::info!("post-copy served: {stats:?}");
        Ok(stats)
    }
}
