//! Finding disks in the virtio-mmio slots, at start-up and again on `RESCAN` (the host may
//! have put a disk into an empty slot or taken one out: docs/probe-protocol.md, "Disk hot-plug").
//!
//! Disk `k` is the `k`-th slot, in command-line order, that holds a virtio-blk device at the
//! last scan. A disk still in its slot keeps its driver state (a device whose status no longer
//! shows DRIVER_OK was replaced or reset underneath and is set up afresh). Each set-up takes
//! its virtqueue from the arena, which never frees: 12-16 KiB of 2 MiB per new disk.

use core::fmt::Write;

use crate::bootinfo::MMIO_DEVICES_MAX;
use crate::commands::{Probe, MAX_DISKS};
use crate::reply::Reply;
use crate::virtio::blk::Blk;
use crate::virtio::mmio::{self, Transport};

/// The virtio-mmio windows the probe looks at (from the command line, or QEMU microvm's).
#[derive(Clone, Copy)]
pub struct Slots {
    pub bases: [u64; MMIO_DEVICES_MAX],
    pub count: usize,
}

impl Slots {
    pub const fn new() -> Self {
        Slots {
            bases: [0; MMIO_DEVICES_MAX],
            count: 0,
        }
    }

    pub fn push(&mut self, base: u64) {
        if self.count < MMIO_DEVICES_MAX {
            self.bases[self.count] = base;
            self.count += 1;
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.bases[..self.count].iter().copied()
    }
}

/// What a scan changed.
pub struct ScanResult {
    pub added: usize,
    pub removed: usize,
}

impl Probe {
    /// Renumbers the disks after the slots' current contents; diagnostics go to `msg`.
    pub fn scan_disks(&mut self, msg: &mut Reply) -> ScanResult {
        let mut old: [Option<Blk>; MAX_DISKS] = [const { None }; MAX_DISKS];
        for (o, d) in old.iter_mut().zip(self.disks.iter_mut()) {
            *o = d.take();
        }
        let mut count = 0;
        let mut added = 0;
        let slots = self.slots;
        for base in slots.iter() {
            if count == MAX_DISKS {
                break;
            }
            if !matches!(
                Transport::probe(base),
                mmio::Probe::Device(mmio::DEVICE_BLK)
            ) {
                continue;
            }
            let kept = old
                .iter_mut()
                .find(|d| d.as_ref().is_some_and(|d| d.base() == base))
                .and_then(|d| d.take())
                .filter(|d| d.still_live());
            let disk = match kept {
                Some(d) => d,
                None => match Blk::new(Transport { base }) {
                    Some(d) => {
                        added += 1;
                        d
                    }
                    None => {
                        let _ =
                            writeln!(msg, "probe: virtio-blk at {base:#x} failed to initialise");
                        continue;
                    }
                },
            };
            self.disks[count] = Some(disk);
            count += 1;
        }
        let before = self.disk_count;
        self.disk_count = count;
        ScanResult {
            added,
            removed: (before + added).saturating_sub(count),
        }
    }

    /// `RESCAN`: `OK disks=<n> added=<a> removed=<r>`.
    pub fn rescan(&mut self) -> Result<(), &'static str> {
        let mut msg = Reply::new();
        let r = self.scan_disks(&mut msg);
        if !msg.as_bytes().is_empty() {
            // Diagnostics are their own `probe:` lines, before the answer.
            self.com.write(msg.as_bytes());
        }
        let _ = write!(
            self.reply,
            "OK disks={} added={} removed={}",
            self.disk_count, r.added, r.removed
        );
        Ok(())
    }
}
