//! Shared-nothing migration, the source worker's disk copy (docs/migration.md,
//! "Shared-nothing migration"): before the memory pre-copy, every disk is sent to the
//! destination vireod (one more mutual-TLS connection to its migration listener, records of
//! `vireo_migration::disk`), which writes them into the copies it created.
//!
//! The copy uses the storage move's dirty tracking (`MovableBackend::track`): a write is
//! marked after it reached the source and a chunk's mark is cleared before the chunk is read,
//! so every write is either in what was read or marked for a later pass. Pass 0 sends what
//! the disk holds (what the guest sees: a VHDX chain or a VHD arrives flattened), passes 1..
//! what the guest wrote meanwhile; tracking goes on through the memory pre-copy, and at the
//! switch-over each disk's last dirty chunks are sent while it is parked, just before it is
//! released (`out.rs`). `Done` is answered once the destination flushed and closed every copy,
//! so the destination worker opens complete files.
//!
//! A live migration carrying a checkpoint tree (`DiskTransfer::tops`) copies only the running
//! differencing children, each into an empty child of its arrived parent: pass 0 sends what
//! the child file itself holds (its zeroed runs too: there they hide the parent's data), the
//! dirty passes the same full chunks of the guest's view as ever, which read the same through
//! the destination's chain. A shared-nothing one may also have disks in none of the
//! checkpoints (`DiskTransfer::flattened`, after the tops): they travel as any disk of a VM
//! without checkpoints, flattened whole into their own copy.

use std::io::Write;
use std::sync::Arc;

use vireo_api::migrate::PeerMsg;
use vireo_api::worker::DiskTransfer;
use vireo_block::BlockBackend;
use vireo_migration::disk::{self, DiskRecord, MAX_DATA};
use vireo_migration::hostauth::{self, ClientConfig, ClientStream};
use vireo_vmm::MigrateShared;

use super::{handoff, IO_TIMEOUT};
use crate::hotplug::SlotDisk;
use crate::image::Image;
use crate::move_storage::{MovableBackend, Parked, CHUNK, FINAL_CHUNKS, MAX_PASSES};
use crate::server::State;

// Records carry at most one copy chunk.
const _: () = assert!(CHUNK <= MAX_DATA as u64);

/// The disk connection after the pre-copy; dropping it stops the tracking.
pub struct DiskSender {
    stream: ClientStream,
    disks: Vec<Arc<MovableBackend>>,
    /// Each VM disk slot's index among `disks` (the record's disk number), if it is copied.
    record_of_slot: Vec<Option<usize>>,
    /// Per record: only the disk's top layer travels (`DiskTransfer::tops`), not what the
    /// guest sees through its whole chain.
    top_only: Vec<bool>,
    /// `--bandwidth` for the copy while the VM runs (the parked disks' last chunks at the
    /// switch-over are not held back: that time is the guest's pause).
    pace: Pace,
    /// When the last record went: a long run of zeroes the copy skips still sends one every
    /// [`KEEPALIVE`].
    last_record: std::time::Instant,
}

/// The destination gives up on a disk stream silent for 60 s, and its worker's wait for the
/// memory streams (120 s) goes on only while records come: a skipped zero chunk is sent
/// anyway (a `Zero` record, a no-op there) once this long passed without one.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(2);

/// Holds a sender to `rate` bytes per second on average since its start.
struct Pace {
    rate: Option<u64>,
    start: std::time::Instant,
    sent: u64,
}

impl Pace {
    /// Counts `n` bytes sent and sleeps until they fit the rate, in slices short enough that
    /// a cancel is seen within 50 ms.
    fn sent(&mut self, n: u64, shared: &MigrateShared) -> Result<(), String> {
        self.sent += n;
        let Some(rate) = self.rate.filter(|r| *r > 0) else {
            return Ok(());
        };
        let due = std::time::Duration::from_secs_f64(self.sent as f64 / rate as f64);
        loop {
            cancelled(shared)?;
            let Some(wait) = due.checked_sub(self.start.elapsed()) else {
                return Ok(());
            };
            std::thread::sleep(wait.min(std::time::Duration::from_millis(50)));
        }
    }
}

impl Drop for DiskSender {
    fn drop(&mut self) {
        for d in &self.disks {
            d.untrack();
        }
    }
}

/// Connects, then copies every disk and the writes made meanwhile until few are left.
/// Tracking stays on: the rest goes at the switch-over ([`DiskSender::send_parked`]).
pub fn precopy(
    s: &State,
    t: &DiskTransfer,
    cfg: Arc<ClientConfig>,
    shared: &MigrateShared,
    bandwidth: Option<u64>,
) -> Result<DiskSender, String> {
    let mut stream = hostauth::connect(t.to, cfg, IO_TIMEOUT)
        .map_err(|e| format!("disk stream to {}: {e}", t.to))?;
    s.migration.add_socket(stream.tcp());
    let hello = serde_json::to_string(&PeerMsg::DiskData { session: t.session })
        .expect("a message serializes");
    handoff::send(&mut stream, &hello).map_err(|e| format!("disk stream to {}: {e}", t.to))?;
    let answer = handoff::recv(&mut stream).map_err(|e| {
        format!(
            "disk stream to {}: no answer ({e}); the destination may not trust this host",
            t.to
        )
    })?;
    match serde_json::from_str::<PeerMsg>(&answer) {
        Ok(PeerMsg::Accepted { .. }) => {}
        Ok(PeerMsg::Refused { reason }) => {
            return Err(format!("the destination refused the disk data: {reason}"))
        }
        _ => {
            return Err(format!(
                "the destination answered the disk stream {answer:?}"
            ))
        }
    }
    let (disks, top_only, record_of_slot) = chosen(&s.hotplug.disks(), t)?;
    if disks.len() > usize::from(u8::MAX) + 1 {
        return Err("more than 256 disks cannot be copied".into());
    }
    // Tracking starts before the first read of any disk: no write is missed.
    for d in &disks {
        d.track(CHUNK);
    }
    let pace = Pace {
        rate: bandwidth,
        start: std::time::Instant::now(),
        sent: 0,
    };
    let mut out = DiskSender {
        stream,
        disks,
        record_of_slot,
        top_only,
        pace,
        last_record: std::time::Instant::now(),
    };
    out.first_pass(s, shared)?;
    out.dirty_passes(s, shared)?;
    Ok(out)
}

fn cancelled(shared: &MigrateShared) -> Result<(), String> {
    if shared.cancelled() {
        return Err("cancelled".into());
    }
    Ok(())
}

/// The disks that travel (record order), whether each travels as its top layer only, and
/// each slot's record number.
type Chosen = (Vec<Arc<MovableBackend>>, Vec<bool>, Vec<Option<usize>>);

/// The disks that travel, in record order, and each slot's record number. `t.tops`: the
/// serials of the running tops of a checkpoint tree, in the order the destination made their
/// children, then `t.flattened`'s, copied whole; `None`: every disk, whole.
fn chosen(slots: &[SlotDisk], t: &DiskTransfer) -> Result<Chosen, String> {
    let Some(tops) = t.tops.as_deref() else {
        let all: Vec<_> = slots.iter().map(|d| d.movable.clone()).collect();
        let whole = vec![false; all.len()];
        return Ok((all, whole, (0..slots.len()).map(Some).collect()));
    };
    let mut record_of_slot = vec![None; slots.len()];
    let mut disks = Vec::new();
    let mut top_only = Vec::new();
    let named = tops.iter().map(|s| (s, true));
    for (serial, top) in named.chain(t.flattened.iter().map(|s| (s, false))) {
        let slot = slots
            .iter()
            .position(|d| d.serial.as_deref() == Some(serial.as_str()))
            .ok_or_else(|| format!("no disk with serial {serial:?} in this VM to copy"))?;
        if record_of_slot[slot].replace(disks.len()).is_some() {
            return Err(format!("disk serial {serial:?} named twice"));
        }
        disks.push(slots[slot].movable.clone());
        top_only.push(top);
    }
    Ok((disks, top_only, record_of_slot))
}

/// Virtual ranges that may hold data: a VHDX's allocated runs (`top_only`: those its own file
/// holds, not its parents), anything else whole.
fn data_ranges(d: &MovableBackend, top_only: bool) -> Result<Vec<(u64, u64)>, String> {
    let (path, image) = d.image();
    match image {
        Image::Vhdx(v) => Ok(v
            .map()
            .map_err(|e| format!("mapping {}: {e}", path.display()))?
            .into_iter()
            .filter(|e| e.data && (!top_only || e.depth == Some(0)))
            .map(|e| (e.start, e.length))
            .collect()),
        _ if top_only => Err(format!(
            "{} is not a VHDX: only a differencing child can travel as its top layer",
            path.display()
        )),
        // A sparse raw file: its holes read as zeroes, which the copy has already.
        Image::Raw => std::fs::File::open(&path)
            .and_then(|f| vireo_vhdx::convert::raw_data_ranges(&f, d.size()))
            .map_err(|e| format!("mapping {}: {e}", path.display())),
        Image::Vhd(_) => Ok(vec![(0, d.size())]),
    }
}

impl DiskSender {
    fn progress(s: &State, total: u64, copied: u64) {
        s.migration.update(|p| {
            p.disk_bytes_total += total;
            p.disk_bytes_copied += copied;
        });
    }

    /// Sends `len` bytes at `pos` of disk `i` read from `src`; `skip_zero`: the copy reads
    /// zeroes there already (pass 0), else zeroes are sent as a `Zero` record. The bytes that
    /// went on the wire (what `--bandwidth` counts).
    fn send_range(
        &mut self,
        i: usize,
        src: &dyn BlockBackend,
        pos: u64,
        len: u64,
        skip_zero: bool,
    ) -> Result<u64, String> {
        let mut buf = vec![0u8; len as usize];
        src.read_at(&mut buf, pos)
            .map_err(|e| format!("reading disk {i} at {pos}: {e}"))?;
        let (sent, wire) = if buf.iter().all(|&b| b == 0) {
            if skip_zero && self.last_record.elapsed() < KEEPALIVE {
                return Ok(0);
            }
            let r = disk::write_zero(&mut self.stream, i as u8, pos, len as u32);
            (r, disk::HEADER_LEN as u64)
        } else {
            let r = disk::write_data(&mut self.stream, i as u8, pos, &buf);
            (r, disk::HEADER_LEN as u64 + len)
        };
        sent.map_err(|e| format!("sending disk {i} data: {e}"))?;
        self.last_record = std::time::Instant::now();
        Ok(wire)
    }

    fn first_pass(&mut self, s: &State, shared: &MigrateShared) -> Result<(), String> {
        for i in 0..self.disks.len() {
            let d = self.disks[i].clone();
            let top_only = self.top_only[i];
            let ranges = data_ranges(&d, top_only)?;
            Self::progress(s, ranges.iter().map(|r| r.1).sum(), 0);
            for (start, len) in ranges {
                let mut pos = start;
                while pos < start + len {
                    cancelled(shared)?;
                    let n = (start + len - pos).min(CHUNK - pos % CHUNK);
                    // A top's zeroes hide its parent's data: they travel.
                    let wire = self.send_range(i, &*d, pos, n, !top_only)?;
                    Self::progress(s, 0, n);
                    self.pace.sent(wire, shared)?;
                    pos += n;
                }
            }
        }
        Ok(())
    }

    /// Chunk `c` of disk `i` from `src`, in full (the guest may have zeroed it): the bytes it
    /// covers and those that went on the wire.
    fn send_chunk(
        &mut self,
        i: usize,
        src: &dyn BlockBackend,
        c: u64,
    ) -> Result<(u64, u64), String> {
        let start = c * CHUNK;
        let size = src.size();
        if start >= size {
            return Ok((0, 0));
        }
        let n = CHUNK.min(size - start);
        Ok((n, self.send_range(i, src, start, n, false)?))
    }

    fn dirty_passes(&mut self, s: &State, shared: &MigrateShared) -> Result<(), String> {
        for _ in 0..MAX_PASSES {
            let dirty: usize = self.disks.iter().map(|d| d.dirty_count()).sum();
            if dirty <= FINAL_CHUNKS {
                break;
            }
            for i in 0..self.disks.len() {
                let d = self.disks[i].clone();
                let chunks = d.take_dirty();
                Self::progress(s, chunks.len() as u64 * CHUNK, 0);
                for c in chunks {
                    cancelled(shared)?;
                    let (n, wire) = self.send_chunk(i, &*d, c)?;
                    Self::progress(s, 0, n);
                    self.pace.sent(wire, shared)?;
                }
            }
        }
        Ok(())
    }

    /// At the switch-over, the disk in `slot` parked (no request runs): its last dirty chunks,
    /// if it is copied.
    pub fn send_parked(&mut self, s: &State, slot: usize, parked: &Parked) -> Result<(), String> {
        let Some(i) = self.record_of_slot.get(slot).copied().flatten() else {
            return Ok(());
        };
        let chunks = parked.take_dirty();
        Self::progress(s, chunks.len() as u64 * CHUNK, 0);
        for c in chunks {
            let (n, _) = self.send_chunk(i, &**parked.source(), c)?;
            Self::progress(s, 0, n);
        }
        Ok(())
    }

    /// Ends the stream; `Ok` once the destination answered that every copy is flushed and
    /// closed.
    pub fn finish(mut self) -> Result<(), String> {
        disk::write_done(&mut self.stream).map_err(|e| format!("ending the disk stream: {e}"))?;
        self.stream
            .flush()
            .map_err(|e| format!("ending the disk stream: {e}"))?;
        match disk::read_record(&mut self.stream, &[]) {
            Ok(DiskRecord::Done) => Ok(()),
            Ok(other) => Err(format!(
                "the destination answered the disk data with {other:?}"
            )),
            Err(e) => Err(format!(
                "the destination did not confirm the disk copies: {e}"
            )),
        }
    }
}
