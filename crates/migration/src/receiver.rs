//! The receiving side of one stream: checks the preamble, applies page batches to guest RAM,
//! keeps the device state for the restore, and insists on a clean end.

use std::io::{BufRead, Read};

use uuid::Uuid;

use crate::pages;
use crate::preamble::Preamble;
use crate::record::{
    read_exact_or_truncated, read_header, read_payload_into, Header, Kind, RecordBuf, Transport,
    HEADER_LEN,
};
use crate::Codec;
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
    /// Writes `data` (any length, even part of a page) at `gpa`, inside a run of pages the
    /// receiver checked against [`GuestRam::size`]: [`Receiver::next_buffered`] copies page
    /// data straight from the transport's buffers, whose chunks do not end on page bounds.
    fn write_part(&mut self, gpa: u64, data: &[u8]);
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
    fn write_part(&mut self, gpa: u64, data: &[u8]) {
        self.write_run(gpa, data)
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
    /// The checked entries of the batch being applied in place (kept from batch to batch).
    entries: Vec<(u64, bool)>,
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
            entries: Vec::new(),
        })
    }

    /// Reads and applies the next record. A stream that ends before `Done` is truncated.
    /// Every record is read whole into this receiver's buffer and checked before any of it is
    /// applied; [`Receiver::next_buffered`] saves that copy for page data on a TLS stream.
    pub fn next(
        &mut self,
        r: &mut impl Read,
        ram: &mut impl GuestRam,
    ) -> Result<Event, MigrationError> {
        let h = self.header(r)?;
        read_payload_into(r, &mut self.buf, &h)?;
        self.apply(h, ram)
    }

    /// [`Receiver::next`] on a buffered transport (rustls' plaintext): the page data of a raw
    /// batch without a CRC (a TLS stream's, whose AEAD has authenticated every byte rustls
    /// hands out) is copied from the transport's buffers straight into guest RAM, not first
    /// into this receiver's record buffer. The header, count and entries are read and checked
    /// first, and the data length matched against them, so a batch whose header or entries
    /// are bad applies nothing; a stream that breaks off inside the data leaves the pages
    /// before the break written, and is an error as before (the destination VM is dropped).
    /// Any other record goes through [`Receiver::next`]'s path.
    pub fn next_buffered(
        &mut self,
        r: &mut impl BufRead,
        ram: &mut impl GuestRam,
    ) -> Result<Event, MigrationError> {
        let h = self.header(r)?;
        if h.kind == Kind::Pages && h.codec == Codec::None && !h.checked {
            return self.pages_in_place(r, &h, ram);
        }
        read_payload_into(r, &mut self.buf, &h)?;
        self.apply(h, ram)
    }

    fn header(&mut self, r: &mut impl Read) -> Result<Header, MigrationError> {
        let h = read_header(r, self.buf.transport())?.ok_or(MigrationError::Truncated)?;
        if self.done {
            return Err(MigrationError::AfterDone("a record"));
        }
        Ok(h)
    }

    fn pages_in_place(
        &mut self,
        r: &mut impl BufRead,
        h: &Header,
        ram: &mut impl GuestRam,
    ) -> Result<Event, MigrationError> {
        if h.payload_len < 4 {
            return Err(MigrationError::Malformed("batch shorter than its count"));
        }
        let mut count = [0u8; 4];
        read_exact_or_truncated(r, &mut count)?;
        let count = pages::batch_count(count)?;
        let entries_end = 4 + count * 8;
        if h.payload_len < entries_end {
            return Err(MigrationError::Malformed("batch shorter than its entries"));
        }
        let raw = self.buf.scratch(entries_end - 4);
        read_exact_or_truncated(r, raw)?;
        let data_len = pages::check_entries(raw, ram.size(), &mut self.entries)?;
        pages::check_data_len(h.payload_len - entries_end, data_len)?;

        let mut zeros = 0;
        let mut at = 0;
        while at < self.entries.len() {
            let (gpa, has_data) = self.entries[at];
            if !has_data {
                ram.zero_page(gpa);
                zeros += 1;
                at += 1;
                continue;
            }
            // A run of consecutive non-zero pages: its data lies back to back on the wire.
            let mut pages = 1;
            while self
                .entries
                .get(at + pages)
                .is_some_and(|&(g, d)| d && g == gpa + (pages * PAGE_SIZE) as u64)
            {
                pages += 1;
            }
            copy_run(r, ram, gpa, pages * PAGE_SIZE)?;
            at += pages;
        }
        self.stats.wire_bytes += (HEADER_LEN + h.payload_len) as u64;
        self.stats.zero_pages += zeros;
        self.stats.pages += count as u64;
        Ok(Event::Pages(count))
    }

    /// What a record read whole into the buffer means, applied.
    fn apply(&mut self, h: Header, ram: &mut impl GuestRam) -> Result<Event, MigrationError> {
        let kind = h.kind;
        self.stats.wire_bytes += (HEADER_LEN + h.payload_len) as u64;
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

    /// [`Receiver::run`] through [`Receiver::next_buffered`].
    pub fn run_buffered(
        &mut self,
        r: &mut impl BufRead,
        ram: &mut impl GuestRam,
    ) -> Result<RecvStats, MigrationError> {
        while self.next_buffered(r, ram)? != Event::Done {}
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

/// Copies the next `len` bytes of `r` into guest RAM from `gpa` on, chunk by chunk as the
/// transport holds them.
fn copy_run(
    r: &mut impl BufRead,
    ram: &mut impl GuestRam,
    gpa: u64,
    len: usize,
) -> Result<(), MigrationError> {
    let mut done = 0;
    while done < len {
        let chunk = match r.fill_buf() {
            Ok([]) => return Err(MigrationError::Truncated),
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(MigrationError::Truncated)
            }
            Err(e) => return Err(e.into()),
        };
        let n = chunk.len().min(len - done);
        ram.write_part(gpa + done as u64, &chunk[..n]);
        r.consume(n);
        done += n;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preamble::Preamble;
    use crate::record::header_unchecked;
    use crate::sender::{Compression, Sender};
    use std::io::BufReader;

    const RAM: usize = 16 * PAGE_SIZE;

    /// A stream as an authenticated sender writes it: pages without CRCs.
    fn wire(pages: &[(u64, &[u8])]) -> Vec<u8> {
        let mut tx = Sender::start(
            Vec::new(),
            Preamble::new(uuid::Uuid::nil(), 0, 1),
            Compression::Fixed(Codec::None),
            Transport::Authenticated,
        )
        .unwrap();
        tx.send_pages(pages.iter().copied()).unwrap();
        tx.done().unwrap().0
    }

    /// Reads `wire` buffered in `chunk`-byte pieces into a RAM of 0x55 bytes.
    fn read_buffered(wire: &[u8], chunk: usize) -> (Result<RecvStats, MigrationError>, Vec<u8>) {
        let mut ram = vec![0x55u8; RAM];
        let mut r = BufReader::with_capacity(chunk, wire);
        let mut rx = Receiver::start(&mut r, None, Transport::Authenticated).unwrap();
        (rx.run_buffered(&mut r, &mut ram), ram)
    }

    #[test]
    fn pages_copied_from_the_buffer_land_as_a_whole_record_would() {
        let (a, b) = ([1u8; PAGE_SIZE], [2u8; PAGE_SIZE]);
        let mut c = [0u8; PAGE_SIZE];
        c[PAGE_SIZE - 1] = 3;
        let pages: [(u64, &[u8]); 5] = [
            (0x3000, &a),
            (0x4000, &b), // a run with the page before
            (0x1000, &[0u8; PAGE_SIZE]),
            (0x9000, &c),
            (0x2000, &b),
        ];
        let w = wire(&pages);
        let mut expected = vec![0x55u8; RAM];
        let mut r = w.as_slice();
        let mut rx = Receiver::start(&mut r, None, Transport::Authenticated).unwrap();
        let whole = rx.run(&mut r, &mut expected).unwrap();
        // Chunks that end mid-header, mid-entries and mid-page, and one that holds it all.
        for chunk in [1, 7, 1000, PAGE_SIZE + 3, 1 << 20] {
            let (stats, ram) = read_buffered(&w, chunk);
            assert_eq!(stats.unwrap(), whole, "chunk {chunk}");
            assert!(ram == expected, "chunk {chunk}: RAM differs");
        }
        assert_eq!(whole.pages, 5);
        assert_eq!(whole.zero_pages, 1);
        assert_eq!(expected[0x3000], 1);
        assert_eq!(expected[0x1000], 0);
        assert_eq!(expected[0x9000 + PAGE_SIZE - 1], 3);
    }

    /// The stream's preamble, then one raw page record without a CRC carrying `body`.
    fn one_record(body: &[u8]) -> Vec<u8> {
        let mut w = Vec::new();
        Preamble::new(uuid::Uuid::nil(), 0, 1)
            .write(&mut w)
            .unwrap();
        w.extend_from_slice(&header_unchecked(
            Kind::Pages,
            Codec::None,
            body.len(),
            body.len(),
        ));
        w.extend_from_slice(body);
        w
    }

    fn batch(entries: &[u64], data_pages: usize) -> Vec<u8> {
        let mut b = (entries.len() as u32).to_le_bytes().to_vec();
        for e in entries {
            b.extend_from_slice(&e.to_le_bytes());
        }
        b.resize(b.len() + data_pages * PAGE_SIZE, 0xEE);
        b
    }

    #[test]
    fn a_bad_batch_read_in_place_applies_nothing() {
        let cases: [(&str, Vec<u8>); 5] = [
            // The last entry lies past RAM: the first page must not be written either.
            ("past RAM", batch(&[0x1000, 0x2001, RAM as u64], 2)),
            ("unknown bits", batch(&[0x1000, 0x2002], 2)),
            ("data short", batch(&[0x1000, 0x2000], 1)),
            ("data long", batch(&[0x1000, 0x2000], 3)),
            ("entries short", {
                let mut b = batch(&[0x1000, 0x2000, 0x3000], 0);
                b.truncate(4 + 8);
                b
            }),
        ];
        for (what, body) in cases {
            for chunk in [5, 1 << 20] {
                let (res, ram) = read_buffered(&one_record(&body), chunk);
                assert!(res.is_err(), "{what}: accepted");
                assert!(
                    ram.iter().all(|&b| b == 0x55),
                    "{what}, chunk {chunk}: something was applied"
                );
            }
        }
        // More pages than a batch may hold: refused on the count, before the entries.
        let mut huge = (pages::MAX_PAGES as u32 + 1).to_le_bytes().to_vec();
        huge.resize(64, 0);
        let e = read_buffered(&one_record(&huge), 64).0.unwrap_err();
        assert!(e.to_string().contains("more pages"), "{e}");
    }

    #[test]
    fn a_stream_cut_inside_the_data_is_truncated() {
        let w = wire(&[(0x1000, &[7u8; PAGE_SIZE]), (0x2000, &[8u8; PAGE_SIZE])]);
        // Cut in the second page's data (the `Done` record is 16 bytes after it).
        let cut = &w[..w.len() - HEADER_LEN - 100];
        let (res, _) = read_buffered(cut, 3000);
        assert!(matches!(res, Err(MigrationError::Truncated)), "{res:?}");
    }
}
