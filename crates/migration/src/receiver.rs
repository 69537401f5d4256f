//! The receiving side of one stream: checks the preamble, applies page batches to guest RAM,
//! keeps the device state for the restore, and insists on a clean end.

use std::io::Read;

use uuid::Uuid;

use crate::pages;
use crate::preamble::Preamble;
use crate::record::{read_record, Kind};
use crate::{MigrationError, PAGE_SIZE};

/// Where received pages go: the destination VM's RAM (or a test's buffer).
pub trait GuestRam {
    /// Bytes of RAM; every page must lie below this.
    fn size(&self) -> u64;
    fn write_page(&mut self, gpa: u64, data: &[u8]);
    fn zero_page(&mut self, gpa: u64);
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
}

impl Receiver {
    /// Reads the preamble; with `session`, a stream of another migration is refused.
    pub fn start(r: &mut impl Read, session: Option<Uuid>) -> Result<Receiver, MigrationError> {
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
        })
    }

    /// Reads and applies the next record. A stream that ends before `Done` is truncated.
    pub fn next(
        &mut self,
        r: &mut impl Read,
        ram: &mut impl GuestRam,
    ) -> Result<Event, MigrationError> {
        let record = read_record(r)?.ok_or(MigrationError::Truncated)?;
        if self.done {
            return Err(MigrationError::AfterDone("a record"));
        }
        self.stats.wire_bytes += record.wire_len as u64;
        Ok(match record.kind {
            Kind::Pages => {
                let batch = pages::decode(&record.body, ram.size())?;
                for (gpa, data) in &batch {
                    match data {
                        Some(d) => ram.write_page(*gpa, d),
                        None => {
                            ram.zero_page(*gpa);
                            self.stats.zero_pages += 1;
                        }
                    }
                }
                self.stats.pages += batch.len() as u64;
                Event::Pages(batch.len())
            }
            Kind::RoundEnd => {
                let b = &record.body;
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
                self.device_state = Some(record.body);
                Event::DeviceState
            }
            Kind::Done => {
                self.done = true;
                Event::Done
            }
            Kind::Abort => {
                return Err(MigrationError::Aborted(
                    String::from_utf8_lossy(&record.body).into_owned(),
                ))
            }
            Kind::Missing => {
                let runs = crate::postcopy::decode_missing(&record.body, ram.size())?;
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
