//! The receiving side of one stream: checks the preamble, applies page batches to guest RAM,
//! keeps the device state for the restore, and insists on a clean end.

use std::io::Read;

use uuid::Uuid;

use crate::pages;
use crate::preamble::Preamble;
use crate::record::{read_record_into, Kind, RecordBuf, Transport};
use crate::{MigrationError, PAGE_SIZE};

/// Where received pages go: the destination VM's RAM (or a test's buffer).
pub trait GuestRam {
    /// Bytes of RAM; every page must lie below this.
    fn size(&self) -> u64;
    fn write_page(&mut self, gpa: u64, data: &[u8]);
    fn zero_page(&mut self, gpa: u64);
    /// Writes consecutive pages starting at `gpa` (`data` a multiple of 4 KiB, checked to lie
    /// inside RAM). The receiver hands over whole runs so RAM can take them in one write.
    fn write_run(&mut self, gpa: u64, data: &[u8]) {
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            self.write_page(gpa + (i * PAGE_SIZE) as u64, page);
        }
    }
}

impl GuestRam for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn write_page(&mut self, gpa: u64, data: &[u8]) {
        let at = gpa as usize;
        self[at..at + PAGE_SIZE].copy_from_slice(data);
    }
    fn zero_page(&mut self, gpa: u64) {
        let at = gpa as usize;
        self[at..at + PAGE_SIZE].fill(0);
    }
    fn write_run(&mut self, gpa: u64, data: &[u8]) {
        let at = gpa as usize;
        self[at..at + data.len()].copy_from_slice(data);
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvStats {
    pub pages: u64,
    pub zero_pages: u64,
    pub wire_bytes: u64,
    pub rounds: u32,
}

/// What one record meant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Pages(usize),
    RoundEnd {
        round: u32,
        pages_sent: u64,
        dirty_remaining: u64,
    },
    DeviceState,
    /// Post-copy: this many runs of pages will come after the switch-over.
    Missing(usize),
    Done,
}

pub struct Receiver {
    pub preamble: Preamble,
    pub stats: RecvStats,
    device_state: Option<Vec<u8>>,
    /// Post-copy: the runs (gpa, pages) still to come, from `Missing` records.
    missing: Option<Vec<(u64, u64)>>,
    done: bool,
    buf: RecordBuf,
}

impl Receiver {
    /// Reads the preamble; with `session`, a stream of another migration is refused.
    /// `transport` is what `r` is on this side: page records without a CRC are accepted only
    /// on a [`Transport::Authenticated`] (TLS) stream.
    pub fn start(
        r: &mut impl Read,
        session: Option<Uuid>,
        transport: Transport,
    ) -> Result<Receiver, MigrationError> {
        let preamble = Preamble::read(r)?;
        if let Some(expected) = session {
            if preamble.session != expected {
                return Err(MigrationError::WrongSession {
                    found: preamble.session,
                    expected,
                });
            }
        }
        Ok(Receiver {
            preamble,
            stats: RecvStats::default(),
            device_state: None,
            missing: None,
            done: false,
            buf: RecordBuf::new(transport),
        })
    }

    /// Reads and applies the next record. A stream that ends before `Done` is truncated.
    pub fn next(
        &mut self,
        r: &mut impl Read,
        ram: &mut impl GuestRam,
    ) -> Result<Event, MigrationError> {
        let (kind, wire_len) =
            read_record_into(r, &mut self.buf)?.ok_or(MigrationError::Truncated)?;
        if self.done {
            return Err(MigrationError::AfterDone("a record"));
        }
        self.stats.wire_bytes += wire_len as u64;
        let body = self.buf.body();
        Ok(match kind {
            Kind::Pages => {
                let batch = pages::decode(body, ram.size())?;
                let zeros = apply_pages(body, &batch, ram);
                self.stats.zero_pages += zeros;
                self.stats.pages += batch.len() as u64;
                Event::Pages(batch.len())
            }
            Kind::RoundEnd => {
                let b = body;
                if b.len() != 20 {
                    return Err(MigrationError::Malformed("round end of the wrong size"));
                }
                self.stats.rounds += 1;
                Event::RoundEnd {
                    round: u32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
                    pages_sent: u64::from_le_bytes(b[4..12].try_into().expect("8 bytes")),
                    dirty_remaining: u64::from_le_bytes(b[12..20].try_into().expect("8 bytes")),
                }
            }
            Kind::DeviceState => {
                if self.device_state.is_some() {
                    return Err(MigrationError::Malformed("device state sent twice"));
                }
                self.device_state = Some(body.to_vec());
                Event::DeviceState
            }
            Kind::Done => {
                self.done = true;
                Event::Done
            }
            Kind::Abort => {
                return Err(MigrationError::Aborted(
                    String::from_utf8_lossy(body).into_owned(),
                ))
            }
            Kind::Missing => {
                let runs = crate::postcopy::decode_missing(body, ram.size())?;
                let n = runs.len();
                self.missing.get_or_insert_with(Vec::new).extend(runs);
                Event::Missing(n)
            }
            Kind::PageRequest | Kind::PostcopyDone => {
                return Err(MigrationError::Malformed(
                    "a post-copy record before the switch-over",
                ))
            }
        })
    }

    /// Applies records until `Done`.
    pub fn run(
        &mut self,
        r: &mut impl Read,
        ram: &mut impl GuestRam,
    ) -> Result<RecvStats, MigrationError> {
        while self.next(r, ram)? != Event::Done {}
        Ok(self.stats)
    }

    pub fn device_state(&self) -> Option<&[u8]> {
        self.device_state.as_deref()
    }

    /// Post-copy: the runs of pages the source still has to send (`None`: pre-copy only).
    pub fn take_missing(&mut self) -> Option<Vec<(u64, u64)>> {
        self.missing.take()
    }

    pub fn take_device_state(&mut self) -> Option<Vec<u8>> {
        self.device_state.take()
    }
}

/// Applies a checked batch in entry order: runs of consecutive non-zero pages (their data
/// lies back to back in `body`) go to RAM in one `write_run` each. Returns the number of zero
/// pages.
fn apply_pages(body: &[u8], batch: &[pages::Page<'_>], ram: &mut impl GuestRam) -> u64 {
    let mut zeros = 0;
    // The run being gathered: its first address, and where its data lies in `body`.
    let mut run: Option<(u64, usize, usize)> = None;
    for &(gpa, data) in batch {
        if let Some(d) = data {
            // Where `d` lies in `body` (decode hands out sub-slices of it).
            let at = d.as_ptr() as usize - body.as_ptr() as usize;
            if let Some((start, rat, len)) = &mut run {
                if *start + *len as u64 == gpa && *rat + *len == at {
                    *len += d.len();
                    continue;
                }
            }
        }
        if let Some((start, at, len)) = run.take() {
            ram.write_run(start, &body[at..at + len]);
        }
        match data {
            Some(d) => run = Some((gpa, d.as_ptr() as usize - body.as_ptr() as usize, d.len())),
            None => {
                ram.zero_page(gpa);
                zeros += 1;
            }
        }
    }
    if let Some((start, at, len)) = run {
        ram.write_run(start, &body[at..at + len]);
    }
    zeros
}
