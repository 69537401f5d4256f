//! The sending side of one stream: batches pages, picks the codec, counts what it sent.

use std::io::Write;
use std::time::Instant;

use crate::auto::AutoCompress;
use crate::pages::{self, MAX_PAGES};
use crate::preamble::Preamble;
use crate::record::{encode_record, Kind};
use crate::{Codec, MigrationError};

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
}

impl<W: Write> Sender<W> {
    pub fn start(
        mut w: W,
        preamble: Preamble,
        compression: Compression,
    ) -> Result<Self, MigrationError> {
        preamble.write(&mut w)?;
        Ok(Sender {
            w,
            compression,
            stats: SendStats::default(),
        })
    }

    /// The stream itself, e.g. to read the receiver's answer to the preamble. Writing to it
    /// directly would corrupt the record stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    /// Sends pages in batches of at most [`MAX_PAGES`].
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
        let zero = batch.iter().filter(|(_, p)| pages::is_zero_page(p)).count() as u64;
        self.stats.pages += batch.len() as u64;
        self.stats.zero_pages += zero;
        self.stats.raw_bytes += (batch.len() as u64 - zero) * crate::PAGE_SIZE as u64;
        let codec = match &mut self.compression {
            Compression::Fixed(c) => *c,
            Compression::Auto(a) => a.choose(),
        };
        let t = Instant::now();
        let bytes = encode_record(Kind::Pages, codec, &body)?;
        let encode_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        self.w.write_all(&bytes)?;
        let write_secs = t.elapsed().as_secs_f64();
        if let Compression::Auto(a) = &mut self.compression {
            if codec != Codec::None {
                a.observe_compress(body.len(), bytes.len(), encode_secs);
            }
            a.observe_link(bytes.len(), write_secs);
        }
        self.stats.wire_bytes += bytes.len() as u64;
        Ok(())
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

    pub fn device_state(&mut self, state: &[u8]) -> Result<(), MigrationError> {
        let codec = match self.compression {
            Compression::Fixed(Codec::None) => Codec::None,
            // Device state is JSON: it always compresses well and is sent once.
            _ => Codec::Lz4,
        };
        let bytes = encode_record(Kind::DeviceState, codec, state)?;
        self.w.write_all(&bytes)?;
        self.stats.wire_bytes += bytes.len() as u64;
        Ok(())
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
