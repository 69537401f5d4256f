//! Executes one virtio-blk request (virtio 1.2 §5.2.6): a 16-byte header the device reads, an
//! optional data part, and a status byte the device writes last. Any request the driver gets
//! wrong ends with an error status, never with a panic or an access outside the disk.

use std::sync::atomic::Ordering;

use vireo_block::{check_range, BlockBackend, BlockError, VecOp};
use virtio_bindings::virtio_blk::*;

use super::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SECTOR_SIZE};
use super::qos;
use super::BlockCounters;
use crate::chain::{ChainBuffers, ChainError};
use crate::GuestMemory;

/// Bytes of `struct virtio_blk_outhdr`: le32 type, le32 reserved, le64 sector.
const HEADER_LEN: u64 = 16;
/// Bytes of one `struct virtio_blk_discard_write_zeroes` segment.
const SEGMENT_LEN: u64 = 16;
/// The only flag a write-zeroes segment may carry.
const WRITE_ZEROES_UNMAP: u32 = 1;

/// Virtio-blk status codes, written in the request's last byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Status {
    Ok = VIRTIO_BLK_S_OK as u8,
    IoErr = VIRTIO_BLK_S_IOERR as u8,
    Unsupported = VIRTIO_BLK_S_UNSUPP as u8,
}

impl From<BlockError> for Status {
    fn from(e: BlockError) -> Self {
        tracing::debug!("virtio-blk: request failed: {e}");
        match e {
            BlockError::Unsupported(_) => Status::Unsupported,
            _ => Status::IoErr,
        }
    }
}

impl From<ChainError> for Status {
    fn from(e: ChainError) -> Self {
        tracing::debug!("virtio-blk: bad buffer: {e}");
        Status::IoErr
    }
}

/// What a worker needs to execute requests.
pub(crate) struct RequestContext<'a> {
    pub mem: &'a GuestMemory,
    pub backend: &'a dyn BlockBackend,
    pub counters: &'a BlockCounters,
    /// Overrides the backend's id for GET_ID.
    pub serial: Option<&'a str>,
}

/// A read or write whose buffers are checked and mapped, ready to run with the rest of its
/// batch ([`vireo_block::Batcher`]); [`RequestContext::complete`] finishes it.
pub(crate) struct PendingIo<'m> {
    pub op: VecOp<'m>,
    len: u64,
    status_offset: u64,
}

impl<'a> RequestContext<'a> {
    /// Starts the request in `chain`: a read or write becomes a [`PendingIo`] for the batch;
    /// anything else (flush, discard, GET_ID, a bad request) is executed here and `Err` carries
    /// its used length. Requests of one batch are unordered, as virtio allows (a driver waits
    /// for a write's completion before it depends on it; a flush covers completed writes).
    pub fn prepare(&mut self, chain: &ChainBuffers) -> Result<PendingIo<'a>, u32> {
        let mut header = [0u8; HEADER_LEN as usize];
        let (Some(status_offset), Ok(())) = (
            chain.writable_len().checked_sub(1),
            chain.read_at(self.mem, 0, &mut header),
        ) else {
            return Err(self.execute(chain));
        };
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let (write, len) = match kind {
            VIRTIO_BLK_T_IN => (false, status_offset),
            VIRTIO_BLK_T_OUT if !self.backend.read_only() => {
                (true, chain.readable_len() - HEADER_LEN)
            }
            _ => return Err(self.execute(chain)),
        };
        let mapped = self.disk_offset(sector, len).and_then(|offset| {
            let bufs = if write {
                chain.readable_bufs(self.mem, HEADER_LEN, len)?
            } else {
                chain.writable_bufs(self.mem, 0, len)?
            };
            Ok(VecOp {
                write,
                bufs,
                offset,
            })
        });
        match mapped {
            Ok(op) => Ok(PendingIo {
                op,
                len,
                status_offset,
            }),
            Err(status) => Err(self.finish(chain, status_offset, Err(status))),
        }
    }

    /// Finishes a [`PendingIo`] with the backend's `result`: counters, status byte, used length.
    pub fn complete(
        &mut self,
        chain: &ChainBuffers,
        io: &PendingIo<'_>,
        result: Result<(), BlockError>,
    ) -> u32 {
        let outcome = match result {
            Ok(()) if io.op.write => {
                self.counters.writes.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .write_bytes
                    .fetch_add(io.len, Ordering::Relaxed);
                self.count_ios(VIRTIO_BLK_T_OUT, io.len);
                Ok(0)
            }
            Ok(()) => {
                self.counters.reads.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .read_bytes
                    .fetch_add(io.len, Ordering::Relaxed);
                self.count_ios(VIRTIO_BLK_T_IN, io.len);
                Ok(io.len)
            }
            Err(e) => Err(Status::from(e)),
        };
        self.finish(chain, io.status_offset, outcome)
    }

    /// The normalized IOs the request in `chain` will count as ([`qos::cost`]), read from its
    /// header before it runs; 0 for a chain without a readable header (it fails at once).
    pub fn cost(&self, chain: &ChainBuffers) -> u64 {
        let mut header = [0u8; 4];
        if chain.readable_len() < HEADER_LEN || chain.read_at(self.mem, 0, &mut header).is_err() {
            return 0;
        }
        let kind = u32::from_le_bytes(header);
        let data_len = match kind {
            VIRTIO_BLK_T_IN => chain.writable_len().saturating_sub(1),
            _ => chain.readable_len() - HEADER_LEN,
        };
        qos::cost(kind, data_len)
    }

    fn count_ios(&self, kind: u32, data_len: u64) {
        let ios = qos::cost(kind, data_len);
        self.counters
            .normalized_ios
            .fetch_add(ios, Ordering::Relaxed);
    }

    /// Executes the request in `chain` and returns the byte count for the used ring (data
    /// written plus the status byte), or 0 when the chain has no room even for a status byte.
    pub fn execute(&mut self, chain: &ChainBuffers) -> u32 {
        let Some(status_offset) = chain.writable_len().checked_sub(1) else {
            tracing::warn!("virtio-blk: request without a status byte dropped");
            return 0;
        };
        let outcome = self.dispatch(chain, status_offset);
        self.finish(chain, status_offset, outcome)
    }

    /// Writes the status byte of a request that ended with `outcome` (data bytes written, or a
    /// failure) and returns the used length.
    fn finish(
        &mut self,
        chain: &ChainBuffers,
        status_offset: u64,
        outcome: Result<u64, Status>,
    ) -> u32 {
        let (status, data_written) = match outcome {
            Ok(written) => (Status::Ok, written),
            Err(status) => (status, 0),
        };
        if status != Status::Ok {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        match chain.write_at(self.mem, status_offset, &[status as u8]) {
            // Cannot exceed u32: the data part is at most the chain length, itself < 2^32.
            Ok(()) => (data_written + 1) as u32,
            Err(e) => {
                tracing::warn!("virtio-blk: cannot write status: {e}");
                0
            }
        }
    }

    /// Runs the request; returns how many data bytes it wrote into the chain.
    fn dispatch(&mut self, chain: &ChainBuffers, data_in_len: u64) -> Result<u64, Status> {
        let mut header = [0u8; HEADER_LEN as usize];
        chain.read_at(self.mem, 0, &mut header)?;
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let data_out_len = chain.readable_len() - HEADER_LEN;
        match kind {
            VIRTIO_BLK_T_IN => self.read(chain, sector, data_in_len),
            VIRTIO_BLK_T_OUT => self.write(chain, sector, data_out_len).map(|()| 0),
            VIRTIO_BLK_T_FLUSH => {
                self.backend.flush()?;
                self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                self.count_ios(kind, 0);
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => self.get_id(chain, data_in_len),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => self
                .discard_or_zero(chain, kind == VIRTIO_BLK_T_DISCARD, data_out_len)
                .map(|()| 0),
            _ => Err(Status::Unsupported),
        }
    }

    /// Checks a sector-addressed data transfer and returns its byte offset on the disk.
    fn disk_offset(&self, sector: u64, len: u64) -> Result<u64, Status> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(Status::IoErr);
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Status::IoErr)?;
        check_range(offset, len, self.backend.size())?;
        Ok(offset)
    }

    fn read(&mut self, chain: &ChainBuffers, sector: u64, len: u64) -> Result<u64, Status> {
        let offset = self.disk_offset(sector, len)?;
        // Straight from the disk into the guest's buffers (preadv on a raw file).
        let bufs = chain.writable_bufs(self.mem, 0, len)?;
        self.backend.read_vectored_at(&bufs, offset)?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.read_bytes.fetch_add(len, Ordering::Relaxed);
        self.count_ios(VIRTIO_BLK_T_IN, len);
        Ok(len)
    }

    fn write(&mut self, chain: &ChainBuffers, sector: u64, len: u64) -> Result<(), Status> {
        if self.backend.read_only() {
            return Err(Status::IoErr);
        }
        let offset = self.disk_offset(sector, len)?;
        let bufs = chain.readable_bufs(self.mem, HEADER_LEN, len)?;
        self.backend.write_vectored_at(&bufs, offset)?;
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters.write_bytes.fetch_add(len, Ordering::Relaxed);
        self.count_ios(VIRTIO_BLK_T_OUT, len);
        Ok(())
    }

    fn get_id(&mut self, chain: &ChainBuffers, room: u64) -> Result<u64, Status> {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let src = self.serial.map_or_else(|| self.backend.id(), str::to_owned);
        let n = src.len().min(id.len());
        id[..n].copy_from_slice(&src.as_bytes()[..n]);
        // The id is NUL-padded to 20 bytes; a shorter buffer gets what fits.
        let len = room.min(id.len() as u64) as usize;
        chain.write_at(self.mem, 0, &id[..len])?;
        Ok(len as u64)
    }

    fn discard_or_zero(
        &mut self,
        chain: &ChainBuffers,
        discard: bool,
        payload: u64,
    ) -> Result<(), Status> {
        if self.backend.read_only() {
            return Err(Status::IoErr);
        }
        let count = payload / SEGMENT_LEN;
        if !payload.is_multiple_of(SEGMENT_LEN)
            || count == 0
            || count > u64::from(MAX_DISCARD_SEGMENTS)
        {
            return Err(Status::IoErr);
        }
        // Check every segment before touching the disk, so a bad request changes nothing.
        let mut ranges = Vec::with_capacity(count as usize);
        for i in 0..count {
            let mut seg = [0u8; SEGMENT_LEN as usize];
            chain.read_at(self.mem, HEADER_LEN + i * SEGMENT_LEN, &mut seg)?;
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
            let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
            // Discard defines no flags; write-zeroes only "unmap" (a hint we may ignore).
            let allowed = if discard { 0 } else { WRITE_ZEROES_UNMAP };
            if flags & !allowed != 0 {
                return Err(Status::Unsupported);
            }
            if sectors > MAX_DISCARD_SECTORS {
                return Err(Status::IoErr);
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            ranges.push((self.disk_offset(sector, len)?, len));
        }
        for (offset, len) in ranges {
            if discard {
                self.backend.discard(offset, len)?;
            } else {
                self.backend.write_zeroes(offset, len)?;
            }
        }
        let counter = if discard {
            &self.counters.discards
        } else {
            &self.counters.write_zeroes
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.count_ios(VIRTIO_BLK_T_DISCARD, 0);
        Ok(())
    }
}
