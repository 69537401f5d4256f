//! The source's side of post-copy: the VM stays paused here and its memfd is the only
//! up-to-date copy of the missing pages. Every stream of the migration carries them:
//!
//! - **stream 0**: one loop owns its writing half and sends pages the destination asked for
//!   first (a vCPU waits on them), and between requests its share of the remaining pages, a
//!   small batch at a time so a request never waits behind much. A reader thread owns the
//!   request channel and hands requests over a channel.
//! - **streams 1..N**: one pushing thread each, background pages only.
//!
//! The streams share one claim per page ([`Tracker`]) and one cursor over the address order
//! ([`Background`]), so no page is sent twice, and one `--bandwidth` budget ([`Budget`]).
//! Each stream ends with `PostcopyDone` once nothing is left for it; only when every stream
//! has ended may the caller stop the VM here. A stream that fails stops the others at their
//! next batch: the destination is gone.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vireo_migration::{postcopy, Codec, MigrationError};

use super::super::migrate::{MigrateError, MigrateShared};
use super::super::VmHandle;
use super::push::{Background, Budget};
use super::tracker::{Place, Tracker};
use crate::dirty::DirtyBitmap;
use crate::memory::PAGE_SIZE;
use crate::state::StateError;

/// Pages per background batch, on every stream: 256 KiB, about 0.1 ms of a loopback link. On
/// stream 0 a request that comes in meanwhile is answered after at most that; and a fault on a
/// page another stream has just taken waits for that stream's batch, so the same bound holds
/// there (a larger batch on streams 1..N would save records, but lengthen that wait).
const BACKGROUND_BATCH: usize = 64;
/// The longest a stream sleeps at a time under `--bandwidth` (stream 0 looks for requests
/// after each).
const BUDGET_NAP: Duration = Duration::from_millis(1);

/// What the serving did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PostcopyServed {
    pub pages: u64,
    /// Pages sent because the destination asked for them.
    pub requested: u64,
    pub requests: u64,
    pub millis: u64,
    /// Pages sent on each stream, in stream order (requested ones on stream 0).
    pub per_stream: Vec<u64>,
}

/// What every stream's thread shares.
struct Serving<'a> {
    vm: &'a VmHandle,
    unsent: Tracker,
    background: Background,
    budget: Budget,
    shared: &'a MigrateShared,
    started: Instant,
    /// Set by the first stream that fails: the others stop at their next batch.
    stop: AtomicBool,
}

impl Serving<'_> {
    /// Reads `batch` from guest RAM into `buf` and sends it on `out` (in records of at most
    /// [`postcopy::MAX_REQUEST`] pages). Returns the bytes on the wire.
    fn send<W: Write>(
        &self,
        out: &mut W,
        stream: u16,
        batch: &[u64],
        buf: &mut Vec<u8>,
    ) -> Result<u64, MigrateError> {
        let err = |source: MigrationError| MigrateError::Stream { stream, source };
        let mut wire = 0;
        for chunk in batch.chunks(postcopy::MAX_REQUEST) {
            buf.resize(chunk.len() * PAGE_SIZE as usize, 0);
            for (page, &gpa) in buf.chunks_exact_mut(PAGE_SIZE as usize).zip(chunk) {
                let off = self.vm.file_offset(gpa).ok_or_else(|| {
                    StateError::Kvm(format!("post-copy page {gpa:#x} is not RAM"))
                })?;
                self.vm
                    .0
                    .ram
                    .memfd
                    .read_exact_at(page, off)
                    .map_err(|e| StateError::Kvm(format!("reading guest RAM at {gpa:#x}: {e}")))?;
            }
            let pages = chunk
                .iter()
                .copied()
                .zip(buf.chunks_exact(PAGE_SIZE as usize));
            let w = postcopy::send_pages(out, Codec::None, pages).map_err(err)?;
            self.shared.add_transferred(w);
            wire += w;
        }
        // Read inside the lock: the streams' updates then only ever go down.
        self.shared
            .update(|s| s.remaining_bytes = self.unsent.remaining() * PAGE_SIZE);
        Ok(wire)
    }

    /// Sleeps a little if the background is ahead of `--bandwidth`; `true` if it did.
    fn nap(&self) -> bool {
        match self.budget.ahead(self.started.elapsed()) {
            Some(ahead) => {
                std::thread::sleep(ahead.min(BUDGET_NAP));
                true
            }
            None => false,
        }
    }

    /// Stream 0: requests first, its share of the background between them.
    fn serve_requests<W: Write>(
        &self,
        out: &mut W,
        requests: &mpsc::Receiver<Vec<u64>>,
        stats: &mut PostcopyServed,
    ) -> Result<u64, MigrateError> {
        let err = |source: MigrationError| MigrateError::Stream { stream: 0, source };
        let mut buf = Vec::new();
        let mut sent = 0u64;
        while !self.stop.load(Ordering::Acquire) {
            // Requests first: drain what has come in, keep only pages not sent yet.
            let mut urgent = Vec::new();
            while let Ok(pages) = requests.try_recv() {
                stats.requests += 1;
                urgent.extend(
                    pages
                        .into_iter()
                        .filter(|&g| self.unsent.claim(g) == Place::Copy),
                );
            }
            let background = urgent.is_empty();
            let batch = if !background {
                stats.requested += urgent.len() as u64;
                urgent
            } else {
                if self.nap() {
                    continue;
                }
                self.background.take(BACKGROUND_BATCH, &self.unsent)
            };
            // Nothing asked for and nothing left to take: the pages still unsent are on
            // their way on other streams.
            if batch.is_empty() {
                break;
            }
            let wire = self.send(out, 0, &batch, &mut buf)?;
            if background {
                self.budget.spend(wire);
            }
            if stats.requested > 0 {
                out.flush().map_err(|e| err(e.into()))?;
            }
            sent += batch.len() as u64;
        }
        postcopy::send_done(out).map_err(err)?;
        Ok(sent)
    }

    /// Streams 1..N: background only, until nothing is left to take.
    fn push<W: Write>(&self, out: &mut W, stream: u16) -> Result<u64, MigrateError> {
        let err = |source: MigrationError| MigrateError::Stream { stream, source };
        let mut buf = Vec::new();
        let mut sent = 0u64;
        while !self.stop.load(Ordering::Acquire) {
            if self.nap() {
                continue;
            }
            let batch = self.background.take(BACKGROUND_BATCH, &self.unsent);
            if batch.is_empty() {
                break;
            }
            self.budget.spend(self.send(out, stream, &batch, &mut buf)?);
            // A page claimed here is not sent on request: it must not wait in a buffer.
            out.flush().map_err(|e| err(e.into()))?;
            sent += batch.len() as u64;
        }
        postcopy::send_done(out).map_err(err)?;
        Ok(sent)
    }
}

impl VmHandle {
    /// Serves the post-copy phase on `streams` (every stream of the migration, in order,
    /// after the handoff on stream 0); `requests` is the request channel (its reader thread
    /// ends when the destination closes it or the socket is shut down). `bandwidth` caps the
    /// background of all streams together (bytes/s; answers to requests are never held back).
    /// The VM must be paused. `Err`: the destination is gone, and with it the only running
    /// copy of the VM (the caller reports it lost; resuming here would fork it).
    pub fn serve_postcopy<W: Write + Send, R: Read + Send + 'static>(
        &self,
        streams: &mut [W],
        mut requests: R,
        missing: &DirtyBitmap,
        shared: &MigrateShared,
        bandwidth: Option<u64>,
    ) -> Result<PostcopyServed, MigrateError> {
        let end = crate::memory::ram_ranges(self.0.ram.size)
            .last()
            .map_or(0, |(s, l)| s + l);
        let (first, rest) = streams
            .split_first_mut()
            .ok_or_else(|| StateError::Kvm("post-copy without a stream".into()))?;
        let serving = Serving {
            vm: self,
            unsent: Tracker::new(end, &super::runs_of(missing)),
            background: Background::new(missing.pages()),
            budget: Budget::new(bandwidth),
            shared,
            started: Instant::now(),
            stop: AtomicBool::new(false),
        };
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
        let mut stats = PostcopyServed::default();
        let serving = &serving;
        let results: Vec<Result<u64, MigrateError>> = std::thread::scope(|scope| {
            let pushers: Vec<_> = rest
                .iter_mut()
                .enumerate()
                .map(|(i, out)| {
                    let stream = i as u16 + 1;
                    std::thread::Builder::new()
                        .name(format!("postcopy-push-{stream}"))
                        .spawn_scoped(scope, move || {
                            let r = serving.push(out, stream);
                            if r.is_err() {
                                serving.stop.store(true, Ordering::Release);
                            }
                            r
                        })
                })
                .collect();
            let first = serving.serve_requests(first, &rx, &mut stats);
            if first.is_err() {
                serving.stop.store(true, Ordering::Release);
            }
            let mut results = vec![first];
            for (i, p) in pushers.into_iter().enumerate() {
                let stream = i as u16 + 1;
                results.push(match p {
                    Ok(t) => t.join().unwrap_or_else(|_| {
                        Err(StateError::Kvm(format!("post-copy stream {stream} panicked")).into())
                    }),
                    Err(e) => Err(StateError::Kvm(format!(
                        "starting the post-copy thread of stream {stream}: {e}"
                    ))
                    .into()),
                });
            }
            results
        });
        stats.per_stream = Vec::with_capacity(results.len());
        for r in results {
            // The first failure in stream order (the others stopped because of it).
            stats.per_stream.push(r?);
        }
        stats.pages = stats.per_stream.iter().sum();
        stats.millis = serving.started.elapsed().as_millis() as u64;
        tracing::info!("post-copy served: {stats:?}");
        Ok(stats)
    }
}
