//! Executes one virtio-blk request (virtio 1.2 §5.2.6): a 16-byte header the device reads, an
//! optional data part, and a status byte the device writes last. Any request the driver gets
//! wrong ends with an error status, never with a panic or an access outside the disk.

use std::sync::atomic::Ordering;

use vireo_block::{check_range, BlockBackend, BlockError};
use virtio_bindings::virtio_blk::*;

use super::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SECTOR_SIZE};
use super::BlockCounters;
use crate::chain::{ChainBuffers, ChainError};
use crate::GuestMemory;

/// Bytes of `struct virtio_blk_outhdr`: le32 type, le32 reserved, le64 sector.
const HEADER_LEN: u64 = 16;
/// Bytes of one `struct virtio_blk_discard_write_zeroes` segment.
const SEGMENT_LEN: u64 = 16;
/// The only flag a write-zeroes segment may carry.
const WRITE_ZEROES_UNMAP: u32 = 1;
/// Largest piece of a read or write staged in the worker's buffer at once.
pub(crate) const IO_CHUNK: usize = 256 * 1024;

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

/// What a worker needs to execute requests; `buf` is reused across requests.
pub(crate) struct RequestContext<'a> {
    pub mem: &'a GuestMemory,
    pub backend: &'a dyn BlockBackend,
    pub counters: &'a BlockCounters,
    /// Overrides the backend's id for GET_ID.
    pub serial: Option<&'a str>,
    pub buf: &'a mut Vec<u8>,
}

impl RequestContext<'_> {
    /// Executes the request in `chain` and returns the byte count for the used ring (data
    /// written plus the status byte), or 0 when the chain has no room even for a status byte.
    pub fn execute(&mut self, chain: &ChainBuffers) -> u32 {
        let Some(status_offset) = chain.writable_len().checked_sub(1) else {
            tracing::warn!("virtio-blk: request without a status byte dropped");
            return 0;
        };
        let (status, data_written) = match self.dispatch(chain, status_offset) {
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
        let mut done = 0;
        while done < len {
            let n = (len - done).min(IO_CHUNK as u64) as usize;
            self.buf.resize(n, 0);
            self.backend.read_at(&mut self.buf[..n], offset + done)?;
            chain.write_at(self.mem, done, &self.buf[..n])?;
            done += n as u64;
        }
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.read_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(len)
    }

    fn write(&mut self, chain: &ChainBuffers, sector: u64, len: u64) -> Result<(), Status> {
        if self.backend.read_only() {
            return Err(Status::IoErr);
        }
        let offset = self.disk_offset(sector, len)?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(IO_CHUNK as u64) as usize;
            self.buf.resize(n, 0);
            chain.read_at(self.mem, HEADER_LEN + done, &mut self.buf[..n])?;
            self.backend.write_at(&self.buf[..n], offset + done)?;
            done += n as u64;
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters.write_bytes.fetch_add(len, Ordering::Relaxed);
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
        Ok(())
    }
}
