//! Live migration, destination side (docs/migration.md): the VM is built with [`Vm::new`]
//! before any page arrives (so the switch-over pause never includes building it), pages are
//! written into its memfd as they come, one thread per stream, and the device state from
//! stream 0 is loaded with [`Vm::apply_state`] into the same VM. Nothing of the guest runs
//! until the caller resumes it after the disk handoff.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use vireo_migration::receiver::Event;
use vireo_migration::{GuestRam, Receiver};

use super::migrate::{MigrateError, MigrateShared, DRAINED};
use super::rounds::file_offset;
use super::Vm;
use crate::memory::PAGE_SIZE;
use crate::state::{StateError, VmState};

/// Received pages into guest RAM, through the memfd. Zero pages punch holes (batched into
/// runs), so a mostly empty guest costs the destination no memory either.
struct RamWriter {
    memfd: Arc<File>,
    ram_size: u64,
    /// End of the highest RAM range: the receiver refuses pages at or past it.
    end: u64,
    /// Pending zero run: (memfd offset, length).
    zeros: Option<(u64, u64)>,
    /// The first write that failed (the trait has no error path; checked after each record).
    failed: Option<String>,
}

impl RamWriter {
    fn new(memfd: Arc<File>, size: u64) -> RamWriter {
        let end = crate::memory::ram_ranges(size)
            .last()
            .map_or(0, |(s, l)| s + l);
        RamWriter {
            memfd,
            ram_size: size,
            end,
            zeros: None,
            failed: None,
        }
    }

    fn flush_zeros(&mut self) {
        let Some((off, len)) = self.zeros.take() else {
            return;
        };
        // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.memfd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            self.failed
                .get_or_insert_with(|| format!("zeroing guest RAM at memfd offset {off:#x}: {e}"));
        }
    }
}

impl GuestRam for RamWriter {
    fn size(&self) -> u64 {
        self.end
    }

    fn write_page(&mut self, gpa: u64, data: &[u8]) {
        self.flush_zeros();
        let Some(off) = file_offset(self.ram_size, gpa) else {
            self.failed
                .get_or_insert_with(|| format!("page {gpa:#x} is in the MMIO hole"));
            return;
        };
        if let Err(e) = self.memfd.write_all_at(data, off) {
            self.failed
                .get_or_insert_with(|| format!("writing guest RAM at {gpa:#x}: {e}"));
        }
    }

    fn write_run(&mut self, gpa: u64, data: &[u8]) {
        // One pwrite per run of consecutive pages instead of one per page. A run lies inside
        // one 2 MiB stream region, so it never crosses the MMIO hole; checked anyway.
        let last = gpa + data.len() as u64 - PAGE_SIZE;
        match (
            file_offset(self.ram_size, gpa),
            file_offset(self.ram_size, last),
        ) {
            (Some(off), Some(end)) if end - off == last - gpa => {
                self.flush_zeros();
                if let Err(e) = self.memfd.write_all_at(data, off) {
                    self.failed
                        .get_or_insert_with(|| format!("writing guest RAM at {gpa:#x}: {e}"));
                }
            }
            _ => {
                for (i, page) in data.chunks_exact(PAGE_SIZE as usize).enumerate() {
                    self.write_page(gpa + i as u64 * PAGE_SIZE, page);
                }
            }
        }
    }

    fn zero_page(&mut self, gpa: u64) {
        let Some(off) = file_offset(self.ram_size, gpa) else {
            self.failed
                .get_or_insert_with(|| format!("page {gpa:#x} is in the MMIO hole"));
            return;
        };
        match &mut self.zeros {
            Some((start, len)) if *start + *len == off => *len += PAGE_SIZE,
            _ => {
                self.flush_zeros();
                self.zeros = Some((off, PAGE_SIZE));
            }
        }
    }
}

/// One stream's end: the stream back, and the device state if it carried it.
type StreamResult<R> = Result<(R, Option<Vec<u8>>), MigrateError>;

impl Vm {
    /// Receives memory and device state over `streams` (each with its receiver, preamble
    /// read and checked) into this VM, built and never run. Returns the streams (stream 0
    /// carries the handoff next) and the device state, decoded and checked. On an error the
    /// VM must be dropped: its memory is partly written.
    pub fn receive_migration<R: Read + Write + Send>(
        &self,
        streams: Vec<(Receiver, R)>,
        shared: &MigrateShared,
    ) -> Result<(Vec<R>, VmState), MigrateError> {
        let ram = &self.shared.ram;
        let results: Vec<StreamResult<R>> = std::thread::scope(|scope| {
            let threads: Vec<_> = streams
                .into_iter()
                .map(|(mut rx, mut r)| {
                    let memfd = ram.memfd.clone();
                    let size = ram.size;
                    scope.spawn(move || {
                        let stream = rx.preamble.stream;
                        let err = |source| MigrateError::Stream { stream, source };
                        let mut w = RamWriter::new(memfd, size);
                        let mut seen = 0;
                        loop {
                            let ev = rx.next(&mut r, &mut w).map_err(err)?;
                            w.flush_zeros();
                            if let Some(why) = w.failed.take() {
                                return Err(StateError::Kvm(why).into());
                            }
                            shared.add_transferred(rx.stats.wire_bytes - seen);
                            seen = rx.stats.wire_bytes;
                            if shared.cancelled() {
                                return Err(MigrateError::Cancelled);
                            }
                            match ev {
                                Event::Done => break,
                                // Everything before it is in guest RAM: the source's pass
                                // is over only now (`StreamSink::drain`).
                                Event::RoundEnd { .. } => r
                                    .write_all(DRAINED)
                                    .and_then(|()| r.flush())
                                    .map_err(|e| err(e.into()))?,
                                _ => {}
                            }
                        }
                        if let Some(runs) = rx.take_missing() {
                            shared.add_postcopy_missing(runs);
                        }
                        Ok((r, rx.take_device_state()))
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| {
                        Err(StateError::Kvm("a migration receive thread panicked".into()).into())
                    })
                })
                .collect()
        });
        let mut out = Vec::with_capacity(results.len());
        let mut state = None;
        for r in results {
            let (r, st) = r?;
            out.push(r);
            if st.is_some() {
                state = st;
            }
        }
        let bytes =
            state.ok_or_else(|| StateError::Mismatch("the source sent no device state".into()))?;
        let st = crate::state::file::decode(&bytes, Path::new("<migration stream 0>"))?;
        Ok((out, st))
    }
}
