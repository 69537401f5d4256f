//! The sending side of one stream: batches pages, picks the codec, counts what it sent.
//!
//! The hot paths: [`Sender::send_run_from`] hands pages that lie in memory (the VMM's mapping
//! of guest RAM) to the TLS library beside a header and entries built here, so its copy into
//! the TLS record is the only one on our side; [`Sender::send_run_with`] reads guest RAM
//! straight into the record buffer, frames it in place and writes it with one call per batch
//! (up to 8 MiB): the read and the TLS library's copy.

use std::io::{IoSlice, Write};
use std::time::Instant;

use crate::auto::AutoCompress;
use crate::codec::Coder;
use crate::pages::{self, MAX_PAGES};
use crate::preamble::Preamble;
use crate::record::{encode_record, header, header_unchecked, Kind, Transport, HEADER_LEN};
use crate::{Codec, MigrationError, PAGE_SIZE};

#[derive(Clone, Debug)]
pub enum Compression {
    Fixed(Codec),
    Auto(AutoCompress),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    pub pages: u64,
    pub zero_pages: u64,
    /// Bytes of page data before compression (zero pages count nothing).
    pub raw_bytes: u64,
    /// Bytes put on the stream, headers included.
    pub wire_bytes: u64,
}

pub struct Sender<W: Write> {
    w: W,
    compression: Compression,
    pub stats: SendStats,
    /// The record being built: header, count, entries, page data. Kept from batch to batch
    /// (no allocation per batch); guest RAM is read straight into it.
    buf: Vec<u8>,
    /// Compressed payloads, likewise kept.
    zbuf: Vec<u8>,
    coder: Coder,
    /// Authenticated: page records go without a CRC (`record`'s header explains why).
    transport: Transport,
    /// Where the non-zero pages of the batch being sent lie in the caller's memory
    /// ([`Sender::send_run_from`]), kept from batch to batch.
    runs: Vec<std::ops::Range<usize>>,
}

impl<W: Write> Sender<W> {
    /// Writes the preamble. `transport` is what `w` is: [`Transport::Authenticated`] only for
    /// a TLS stream, whose cipher then stands in for the page records' CRC.
    pub fn start(
        mut w: W,
        preamble: Preamble,
        compression: Compression,
        transport: Transport,
    ) -> Result<Self, MigrationError> {
        preamble.write(&mut w)?;
        Ok(Sender {
            w,
            compression,
            stats: SendStats::default(),
            buf: Vec::new(),
            zbuf: Vec::new(),
            coder: Coder::default(),
            transport,
            runs: Vec::new(),
        })
    }

    /// The header of a page record carrying `payload`, checksummed unless the stream is
    /// authenticated.
    fn page_header(&self, codec: Codec, payload: &[u8], body_len: usize) -> [u8; HEADER_LEN] {
        match self.transport {
            Transport::Plain => header(Kind::Pages, codec, payload, body_len),
            Transport::Authenticated => {
                header_unchecked(Kind::Pages, codec, payload.len(), body_len)
            }
        }
    }

    /// The stream itself, e.g. to read the receiver's answer to the preamble. Writing to it
    /// directly would corrupt the record stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    /// Sends pages in batches of at most [`MAX_PAGES`]. For pages that lie together in
    /// guest RAM, [`Sender::send_run_with`] saves a copy.
    pub fn send_pages<'a>(
        &mut self,
        pages: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), MigrationError> {
        let mut batch = Vec::with_capacity(MAX_PAGES);
        for p in pages {
            batch.push(p);
            if batch.len() == MAX_PAGES {
                self.send_batch(&batch)?;
                batch.clear();
            }
        }
        if !batch.is_empty() {
            self.send_batch(&batch)?;
        }
        Ok(())
    }

    fn send_batch(&mut self, batch: &[(u64, &[u8])]) -> Result<(), MigrationError> {
        let body = pages::encode(batch.iter().copied())?;
        let zeros = batch.iter().filter(|(_, p)| pages::is_zero_page(p)).count();
        let end = HEADER_LEN + body.len();
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.buf[HEADER_LEN..end].copy_from_slice(&body);
        self.send_framed(batch.len(), zeros, body.len())
    }

    /// Sends the `len` bytes of consecutive guest pages at `gpa` (page-aligned, a multiple
    /// of 4 KiB) in batches of at most [`MAX_PAGES`]. `fill(gpa, buf)` puts the pages at
    /// `gpa` into `buf` (e.g. a `pread` from guest RAM): they land in the record being built,
    /// are framed where they lie (zero pages become markers) and go out in one write per
    /// batch — no copy of page data on our side of the TLS library.
    pub fn send_run_with(
        &mut self,
        gpa: u64,
        len: usize,
        mut fill: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<(), MigrationError> {
        check_page_run(gpa, len)?;
        let mut done = 0;
        while done < len {
            let n = ((len - done) / PAGE_SIZE).min(MAX_PAGES);
            let g = gpa + done as u64;
            // The body starts right after the header: count, n entries, then the data.
            let data_at = HEADER_LEN + 4 + 8 * n;
            let end = data_at + n * PAGE_SIZE;
            if self.buf.len() < end {
                self.buf.resize(end, 0);
            }
            fill(g, &mut self.buf[data_at..end])?;
            let (body_len, zeros) = pages::frame_in_place(&mut self.buf, data_at, g, n);
            let raw = (n - zeros) * PAGE_SIZE;
            sample(
                &mut self.coder,
                &mut self.compression,
                &mut self.zbuf,
                &self.buf[data_at..data_at + raw],
            );
            self.send_framed(n, zeros, body_len)?;
            done += n * PAGE_SIZE;
        }
        Ok(())
    }

    /// Sends the consecutive guest pages at `gpa` held in `data` (page-aligned, a multiple of
    /// 4 KiB), e.g. the VMM's mapping of a running guest's RAM, in batches of at most
    /// [`MAX_PAGES`]. On an authenticated stream the non-zero pages go to the TLS library as
    /// they lie, beside the header and entries built here: the cipher's copy into its record
    /// is the only copy, and the bytes it encrypts are the bytes the record carries even if
    /// `data` changes meanwhile (a page the guest writes is in the dirty log and goes again).
    /// On a plain stream, or when the batch is compressed, the pages are copied into the
    /// record first, so the CRC or the compressor sees exactly what is sent.
    pub fn send_run_from(&mut self, gpa: u64, data: &[u8]) -> Result<(), MigrationError> {
        if self.transport == Transport::Plain {
            return self.send_run_with(gpa, data.len(), |g, buf| {
                let at = (g - gpa) as usize;
                buf.copy_from_slice(&data[at..at + buf.len()]);
                Ok(())
            });
        }
        check_page_run(gpa, data.len())?;
        for (i, batch) in data.chunks(MAX_PAGES * PAGE_SIZE).enumerate() {
            let g = gpa + (i * MAX_PAGES * PAGE_SIZE) as u64;
            let n = batch.len() / PAGE_SIZE;
            let head = HEADER_LEN + 4 + 8 * n;
            if self.buf.len() < head {
                self.buf.resize(head, 0);
            }
            let zeros =
                pages::frame_entries(&mut self.buf[HEADER_LEN..head], g, batch, &mut self.runs);
            let raw = (n - zeros) * PAGE_SIZE;
            let body_len = head - HEADER_LEN + raw;
            if let Some(r) = self.runs.first() {
                let (coder, zbuf) = (&mut self.coder, &mut self.zbuf);
                sample(coder, &mut self.compression, zbuf, &batch[r.clone()]);
            }
            let codec = self.count_and_choose(n, zeros);
            if codec != Codec::None {
                // The compressor wants the body in one piece: gather the pages behind the
                // entries, as `send_run_with` would have read them.
                if self.buf.len() < head + raw {
                    self.buf.resize(head + raw, 0);
                }
                let mut to = head;
                for r in &self.runs {
                    self.buf[to..to + r.len()].copy_from_slice(&batch[r.clone()]);
                    to += r.len();
                }
                self.send_body(codec, body_len)?;
                continue;
            }
            let runs = std::mem::take(&mut self.runs);
            let sent = self.send_in_place(head, body_len, runs.iter().map(|r| &batch[r.clone()]));
            self.runs = runs;
            sent?;
        }
        Ok(())
    }

    /// Sends pages that lie apart (each 4 KiB at a page-aligned `gpa`), e.g. a paused
    /// guest's last dirty pages, as one record per [`MAX_PAGES`]: one write to the TLS
    /// library instead of one per page. Sent one run at a time, ~100 scattered pages cost
    /// ~10 µs each here (a TLS record, a `writev` and a TCP segment apiece) while the guest
    /// waited for them. On an authenticated stream, uncompressed, the pages go to the cipher
    /// as they lie (as [`Sender::send_run_from`]); otherwise they are gathered first.
    pub fn send_scattered(&mut self, pages: &[(u64, &[u8])]) -> Result<(), MigrationError> {
        for batch in pages.chunks(MAX_PAGES) {
            let n = batch.len();
            let head = HEADER_LEN + 4 + 8 * n;
            if self.buf.len() < head {
                self.buf.resize(head, 0);
            }
            self.buf[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&(n as u32).to_le_bytes());
            let mut data: Vec<&[u8]> = Vec::with_capacity(n);
            for (i, &(gpa, page)) in batch.iter().enumerate() {
                check_page_run(gpa, page.len())?;
                if page.len() != PAGE_SIZE {
                    return Err(MigrationError::Malformed("a scattered page is not 4 KiB"));
                }
                let zero = pages::is_zero_page(page);
                if !zero {
                    data.push(page);
                }
                let at = HEADER_LEN + 4 + 8 * i;
                self.buf[at..at + 8].copy_from_slice(&pages::entry(gpa, zero).to_le_bytes());
            }
            let zeros = n - data.len();
            let raw = data.len() * PAGE_SIZE;
            let body_len = head - HEADER_LEN + raw;
            if let Some(first) = data.first() {
                let (coder, zbuf) = (&mut self.coder, &mut self.zbuf);
                sample(coder, &mut self.compression, zbuf, first);
            }
            let codec = self.count_and_choose(n, zeros);
            if codec != Codec::None || self.transport == Transport::Plain {
                if self.buf.len() < head + raw {
                    self.buf.resize(head + raw, 0);
                }
                for (i, page) in data.iter().enumerate() {
                    let at = head + i * PAGE_SIZE;
                    self.buf[at..at + PAGE_SIZE].copy_from_slice(page);
                }
                self.send_body(codec, body_len)?;
                continue;
            }
            self.send_in_place(head, body_len, data.iter().copied())?;
        }
        Ok(())
    }

    /// Sends an uncompressed page record on an authenticated stream: its head (header, count,
    /// entries) built in `buf[..head]`, then `data` as it lies, all in one vectored write,
    /// so the cipher's copy into its records is the only copy of the pages on this side.
    fn send_in_place<'d>(
        &mut self,
        head: usize,
        body_len: usize,
        data: impl Iterator<Item = &'d [u8]>,
    ) -> Result<(), MigrationError> {
        let h = header_unchecked(Kind::Pages, Codec::None, body_len, body_len);
        self.buf[..HEADER_LEN].copy_from_slice(&h);
        let (buf, w) = (&self.buf, &mut self.w);
        let mut parts: Vec<IoSlice<'_>> = vec![IoSlice::new(&buf[..head])];
        // A closure, not `IoSlice::new` itself: that would tie the slices to `'d`.
        #[allow(clippy::redundant_closure)]
        parts.extend(data.map(|d| IoSlice::new(d)));
        let t = Instant::now();
        write_all_vectored(w, &mut parts)?;
        let wire = HEADER_LEN + body_len;
        self.observe_link(wire, t.elapsed().as_secs_f64());
        self.stats.wire_bytes += wire as u64;
        Ok(())
    }

    /// Sends the `len` bytes of consecutive guest pages at `gpa` as zero pages, without their
    /// data: for RAM the caller knows holds none (a hole in the RAM file, never written), so
    /// it is neither read nor scanned. Same records as [`Sender::send_run_with`] would send
    /// for pages found zero.
    pub fn send_zero_run(&mut self, gpa: u64, len: usize) -> Result<(), MigrationError> {
        check_page_run(gpa, len)?;
        let mut done = 0;
        while done < len {
            let n = ((len - done) / PAGE_SIZE).min(MAX_PAGES);
            let g = gpa + done as u64;
            let body_len = pages::frame_zeros(&mut self.buf, HEADER_LEN, g, n);
            self.send_framed(n, n, body_len)?;
            done += n * PAGE_SIZE;
        }
        Ok(())
    }

    /// Sends the batch body at `buf[HEADER_LEN..HEADER_LEN + body_len]` (`pages` pages, of
    /// which `zeros` are markers), compressed if the codec says so and it pays.
    fn send_framed(
        &mut self,
        pages: usize,
        zeros: usize,
        body_len: usize,
    ) -> Result<(), MigrationError> {
        let codec = self.count_and_choose(pages, zeros);
        self.send_body(codec, body_len)
    }

    /// Counts a batch of `pages` pages (`zeros` of them markers) and picks its codec.
    fn count_and_choose(&mut self, pages: usize, zeros: usize) -> Codec {
        let raw_bytes = (pages - zeros) * PAGE_SIZE;
        self.stats.pages += pages as u64;
        self.stats.zero_pages += zeros as u64;
        self.stats.raw_bytes += raw_bytes as u64;
        match &mut self.compression {
            // A batch of zero markers only is a few bytes: nothing to gain.
            _ if raw_bytes == 0 => Codec::None,
            Compression::Fixed(c) => *c,
            Compression::Auto(a) => a.choose(),
        }
    }

    /// Sends the body at `buf[HEADER_LEN..HEADER_LEN + body_len]` with `codec` if that makes
    /// it smaller, else raw.
    fn send_body(&mut self, codec: Codec, body_len: usize) -> Result<(), MigrationError> {
        let body = &self.buf[HEADER_LEN..HEADER_LEN + body_len];
        if codec != Codec::None {
            let t = Instant::now();
            self.coder.compress_into(codec, body, &mut self.zbuf);
            let secs = t.elapsed().as_secs_f64();
            if let Compression::Auto(a) = &mut self.compression {
                a.observe_compress(body_len, self.zbuf.len(), secs);
            }
            if self.zbuf.len() < body_len {
                let h = self.page_header(codec, &self.zbuf, body_len);
                let t = Instant::now();
                write_all_vectored(
                    &mut self.w,
                    &mut [IoSlice::new(&h), IoSlice::new(&self.zbuf)],
                )?;
                let wire = HEADER_LEN + self.zbuf.len();
                self.observe_link(wire, t.elapsed().as_secs_f64());
                self.stats.wire_bytes += wire as u64;
                return Ok(());
            }
        }
        let h = self.page_header(Codec::None, body, body_len);
        self.buf[..HEADER_LEN].copy_from_slice(&h);
        let wire = HEADER_LEN + body_len;
        let t = Instant::now();
        self.w.write_all(&self.buf[..wire])?;
        self.observe_link(wire, t.elapsed().as_secs_f64());
        self.stats.wire_bytes += wire as u64;
        Ok(())
    }

    fn observe_link(&mut self, bytes: usize, secs: f64) {
        if let Compression::Auto(a) = &mut self.compression {
            a.observe_link(bytes, secs);
        }
    }

    pub fn round_end(
        &mut self,
        round: u32,
        pages_sent: u64,
        dirty_remaining: u64,
    ) -> Result<(), MigrationError> {
        let mut body = Vec::with_capacity(20);
        body.extend_from_slice(&round.to_le_bytes());
        body.extend_from_slice(&pages_sent.to_le_bytes());
        body.extend_from_slice(&dirty_remaining.to_le_bytes());
        self.record(Kind::RoundEnd, &body)
    }

    /// The device state, then [`Sender::done`], then `after` (what the caller's own protocol
    /// says next on this stream, not counted as migration bytes) — in one write, so the
    /// receiver has all of it with the last record (the switch-over's end, where every write
    /// is a wait for the paused guest).
    pub fn state_and_done(
        mut self,
        state: &[u8],
        after: &[u8],
    ) -> Result<(W, SendStats), MigrationError> {
        let codec = match self.compression {
            Compression::Fixed(Codec::None) => Codec::None,
            // Device state is JSON: it always compresses well and is sent once.
            _ => Codec::Lz4,
        };
        let mut bytes = encode_record(Kind::DeviceState, codec, state)?;
        bytes.extend_from_slice(&encode_record(Kind::Done, Codec::None, &[])?);
        self.stats.wire_bytes += bytes.len() as u64;
        bytes.extend_from_slice(after);
        self.w.write_all(&bytes)?;
        self.w.flush()?;
        Ok((self.w, self.stats))
    }

    /// Ends the stream cleanly and hands the writer back.
    pub fn done(mut self) -> Result<(W, SendStats), MigrationError> {
        self.record(Kind::Done, &[])?;
        self.w.flush()?;
        Ok((self.w, self.stats))
    }

    /// Tells the receiver why the migration stops; it discards what it has.
    pub fn abort(mut self, reason: &str) -> Result<(), MigrationError> {
        self.record(Kind::Abort, reason.as_bytes())?;
        self.w.flush()?;
        Ok(())
    }

    fn record(&mut self, kind: Kind, body: &[u8]) -> Result<(), MigrationError> {
        let bytes = encode_record(kind, Codec::None, body)?;
        self.w.write_all(&bytes)?;
        self.stats.wire_bytes += bytes.len() as u64;
        Ok(())
    }
}

/// While `auto` takes its sample: lz4 on up to [`auto::PROBE_SLICE`] of `data` (a batch's
/// page data) on the side, its ratio and speed reported; the batch itself goes raw.
fn sample(coder: &mut Coder, compression: &mut Compression, zbuf: &mut Vec<u8>, data: &[u8]) {
    let Compression::Auto(a) = compression else {
        return;
    };
    if !a.sampling() || data.is_empty() {
        return;
    }
    let probe = &data[..data.len().min(crate::auto::PROBE_SLICE)];
    let t = Instant::now();
    coder.compress_into(Codec::Lz4, probe, zbuf);
    a.observe_compress(probe.len(), zbuf.len(), t.elapsed().as_secs_f64());
}

/// `write_all` over several buffers (std's is unstable): one record's header and payload go
/// to the TLS library in one call, so they share its records instead of a 16-byte record of
/// their own.
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A run of whole 4 KiB pages at a page-aligned address, or the error a caller gets.
fn check_page_run(gpa: u64, len: usize) -> Result<(), MigrationError> {
    if !gpa.is_multiple_of(PAGE_SIZE as u64) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(MigrationError::Malformed(
            "page not 4 KiB or not page-aligned",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender() -> Sender<Vec<u8>> {
        sender_with(Codec::None, Transport::Plain)
    }

    fn sender_with(codec: Codec, transport: Transport) -> Sender<Vec<u8>> {
        let pre = Preamble::new(uuid::Uuid::nil(), 0, 1);
        let mut s = Sender::start(Vec::new(), pre, Compression::Fixed(codec), transport).unwrap();
        s.get_mut().clear();
        s
    }

    #[test]
    fn pages_sent_from_memory_go_out_as_if_read_into_the_record() {
        // More than one batch; zero pages alone, in runs, first and last; text and noise.
        let n = MAX_PAGES + 7;
        let mut data = vec![0u8; n * PAGE_SIZE];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for (i, page) in data.chunks_exact_mut(PAGE_SIZE).enumerate() {
            match i % 7 {
                0 | 3 if i != 7 => {}
                1 => page.fill(b'v'),
                _ => page.iter_mut().for_each(|b| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }),
            }
        }
        data[(n - 1) * PAGE_SIZE..].fill(0);
        for transport in [Transport::Plain, Transport::Authenticated] {
            for codec in [Codec::None, Codec::Lz4] {
                let mut read = sender_with(codec, transport);
                read.send_run_with(0x10_0000, data.len(), |g, buf| {
                    let at = (g - 0x10_0000) as usize;
                    buf.copy_from_slice(&data[at..at + buf.len()]);
                    Ok(())
                })
                .unwrap();
                let mut from = sender_with(codec, transport);
                from.send_run_from(0x10_0000, &data).unwrap();
                assert!(
                    from.get_mut() == read.get_mut(),
                    "{transport:?} {}",
                    codec.name()
                );
                assert_eq!(from.stats, read.stats);
                assert!(from.send_run_from(0x10_0001, &data[..PAGE_SIZE]).is_err());
                assert!(from.send_run_from(0x10_0000, &data[..100]).is_err());
            }
        }
    }

    #[test]
    fn scattered_pages_go_out_as_send_pages_sends_them() {
        // More than one batch, zero pages among them, addresses out of order and apart.
        let n = MAX_PAGES + 5;
        let mut mem = vec![0u8; n * PAGE_SIZE];
        for (i, page) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
            if i % 3 != 0 {
                page.fill(i as u8 | 1);
            }
        }
        let pages: Vec<(u64, &[u8])> = mem
            .chunks_exact(PAGE_SIZE)
            .enumerate()
            .map(|(i, p)| (((n - i) as u64 * 7) << 12, p))
            .collect();
        for transport in [Transport::Plain, Transport::Authenticated] {
            for codec in [Codec::None, Codec::Lz4] {
                let mut one_by_one = sender_with(codec, transport);
                one_by_one.send_pages(pages.iter().copied()).unwrap();
                let mut gathered = sender_with(codec, transport);
                gathered.send_scattered(&pages).unwrap();
                assert!(
                    gathered.get_mut() == one_by_one.get_mut(),
                    "{transport:?} {}",
                    codec.name()
                );
                assert_eq!(gathered.stats, one_by_one.stats);
            }
        }
        let mut s = sender();
        assert!(s.send_scattered(&[(0x1001, &mem[..PAGE_SIZE])]).is_err());
        assert!(s
            .send_scattered(&[(0x1000, &mem[..2 * PAGE_SIZE])])
            .is_err());
    }

    #[test]
    fn a_zero_run_sends_what_reading_zeros_would() {
        let len = (MAX_PAGES + 3) * PAGE_SIZE;
        let mut read = sender();
        read.send_run_with(0x20_0000, len, |_, buf| {
            buf.fill(0);
            Ok(())
        })
        .unwrap();
        let mut skipped = sender();
        skipped.send_zero_run(0x20_0000, len).unwrap();
        assert_eq!(skipped.get_mut(), read.get_mut());
        assert_eq!(skipped.stats, read.stats);
        assert_eq!(skipped.stats.zero_pages, (MAX_PAGES + 3) as u64);
        assert!(skipped.send_zero_run(0x20_0001, PAGE_SIZE).is_err());
        assert!(skipped.send_zero_run(0x20_0000, 100).is_err());
    }

    /// `auto` on memory that compresses and on memory that does not: a sample of a few
    /// slices decides, the batches meanwhile go raw, and only the compressible memory is
    /// then sent compressed.
    #[test]
    fn auto_decides_from_small_slices_and_then_compresses_only_what_compresses() {
        let batches = 32;
        let run = 64 * PAGE_SIZE;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = vec![0u8; run];
        noise.iter_mut().for_each(|b| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        });
        let text: Vec<u8> = (0..run).map(|i| b"vireo page "[i % 11]).collect();
        /// A 100 MB/s link: lz4 on text (GB/s) clearly wins on it, whatever the load.
        struct Slow(u64);
        impl Write for Slow {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                std::thread::sleep(std::time::Duration::from_nanos(10 * b.len() as u64));
                self.0 += b.len() as u64;
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let wire = |data: &[u8]| {
            let pre = Preamble::new(uuid::Uuid::nil(), 0, 1);
            let auto = Compression::Auto(AutoCompress::default());
            let mut s = Sender::start(Slow(0), pre, auto, Transport::Authenticated).unwrap();
            let start = s.stats.wire_bytes;
            for b in 0..batches {
                s.send_run_from((b * run) as u64, data).unwrap();
            }
            (s.stats.wire_bytes - start, s.stats.raw_bytes)
        };
        let (noise_wire, noise_raw) = wire(&noise);
        assert!(
            noise_wire >= noise_raw,
            "noise went raw: {noise_wire} of {noise_raw}"
        );
        let (text_wire, text_raw) = wire(&text);
        // The sample takes SAMPLE_BYTES / PROBE_SLICE batches; all but the last (whose slice
        // completes it) go raw, the rest compress.
        let sampled = (crate::auto::SAMPLE_BYTES as usize / crate::auto::PROBE_SLICE) as u64;
        assert!(sampled < batches as u64 / 2);
        assert!(
            text_wire < text_raw / 2,
            "text compressed after the sample: {text_wire} of {text_raw}"
        );
        assert!(
            text_wire > (sampled - 1) * run as u64,
            "the sampled batches themselves went raw: {text_wire}"
        );
    }
}
