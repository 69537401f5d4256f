//! Live migration, destination side (docs/migration.md): the VM is built with [`Vm::new`]
//! before any page arrives (so the switch-over pause never includes building it), pages are
//! copied into its RAM mapping as they come, one thread per stream, and the device state from
//! stream 0 is loaded with [`Vm::apply_state`] into the same VM. Nothing of the guest runs
//! until the caller resumes it after the disk handoff.

use std::fs::File;
use std::io::{BufRead, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use vireo_migration::receiver::Event;
use vireo_migration::{GuestRam, Receiver};

use super::migrate::{MigrateError, MigrateShared, DRAINED};
use super::rounds::file_offset;
use super::Vm;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::memory::PAGE_SIZE;
use crate::state::{StateError, VmState};
use crate::GuestMemory;

/// Received pages into guest RAM. Data is copied into the VMM's own mapping of it, not
/// `pwrite` into the RAM file: a shmem `pwrite` holds the file's inode lock exclusively for the
/// whole write, so the streams' threads (and their hole punching) queued behind one another
/// on it — 150–230 ms per stream of a 256 MiB migration's ~1.4 s, profiled with
/// `sched_switch` under load. A copy into the mapping takes a page fault per 2 MiB page and
/// no file lock. Zero pages punch holes (batched into runs), so a mostly empty guest costs
/// the destination no memory either.
struct RamWriter<'a> {
    memory: &'a GuestMemory,
    memfd: Arc<File>,
    ram_size: u64,
    /// End of the highest RAM range: the receiver refuses pages at or past it.
    end: u64,
    /// Pending zero run: (memfd offset, length).
    zeros: Option<(u64, u64)>,
    /// The first write that failed (the trait has no error path; checked after each record).
    failed: Option<String>,
}

impl<'a> RamWriter<'a> {
    fn new(memory: &'a GuestMemory, memfd: Arc<File>, size: u64) -> RamWriter<'a> {
        let end = crate::memory::ram_ranges(size)
            .last()
            .map_or(0, |(s, l)| s + l);
        RamWriter {
            memory,
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

    /// Copies `data` to guest RAM at `gpa`; the range must lie in one memory region (checked:
    /// an error, never a write elsewhere).
    fn copy_in(&mut self, gpa: u64, data: &[u8]) {
        self.flush_zeros();
        match self.memory.get_slice(GuestAddress(gpa), data.len()) {
            // vm-memory copies a slice of more than 8 bytes with one memcpy.
            Ok(to) => to.copy_from(data),
            Err(e) => {
                self.failed
                    .get_or_insert_with(|| format!("writing guest RAM at {gpa:#x}: {e}"));
            }
        }
    }
}

impl GuestRam for RamWriter<'_> {
    fn size(&self) -> u64 {
        self.end
    }

    fn write_page(&mut self, gpa: u64, data: &[u8]) {
        self.copy_in(gpa, data);
    }

    fn write_run(&mut self, gpa: u64, data: &[u8]) {
        // One copy per run of consecutive pages. A run lies inside one 2 MiB stream region,
        // so it never crosses the MMIO hole or a memory region's end; page by page otherwise.
        if self.memory.get_slice(GuestAddress(gpa), data.len()).is_ok() {
            self.copy_in(gpa, data);
        } else {
            for (i, page) in data.chunks_exact(PAGE_SIZE as usize).enumerate() {
                self.copy_in(gpa + i as u64 * PAGE_SIZE, page);
            }
        }
    }

    fn write_part(&mut self, gpa: u64, data: &[u8]) {
        // A piece of a run: inside one memory region like the run (see `write_run`); split
        // at page bounds otherwise, as the run would be.
        if self.memory.get_slice(GuestAddress(gpa), data.len()).is_ok() {
            self.copy_in(gpa, data);
            return;
        }
        let mut done = 0;
        while done < data.len() {
            let at = gpa + done as u64;
            let n = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(data.len() - done);
            self.copy_in(at, &data[done..done + n]);
            done += n;
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
    pub fn receive_migration<R: BufRead + Write + Send>(
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
                    let (size, memory) = (ram.size, &ram.memory);
                    scope.spawn(move || {
                        crate::thread_priority::raise_for_migration();
                        let stream = rx.preamble.stream;
                        let err = |source| MigrateError::Stream { stream, source };
                        let mut w = RamWriter::new(memory, memfd, size);
                        let mut seen = 0;
                        loop {
                            let ev = rx.next_buffered(&mut r, &mut w).map_err(err)?;
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
