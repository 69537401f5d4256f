//! Address-range dispatch for port I/O and MMIO exits. Built once before the vCPUs start and
//! then shared read-only; each device has its own lock so vCPUs touching different devices
//! never wait for each other.

use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Sorted, non-overlapping device ranges.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

/// Two devices claimed overlapping ranges.
#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

impl Bus {
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), Overlap> {
        if len == 0
            || self
                .entries
                .iter()
                .any(|e| base < e.base + e.len && e.base < base + len)
        {
            return Err(Overlap { base, len });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let i = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(i.checked_sub(1)?)?;
        let offset = addr - e.base;
        (offset + size as u64 <= e.len).then_some((e, offset))
    }

    /// Reads from the device at `addr`; returns false (and fills 0xff) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                lock(&e.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                lock(&e.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a panicked holder (the device state is still the best we
/// have, and one vCPU's panic must not wedge the others).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let a = Arc::new(Mutex::new(Recorder(vec![])));
        let b = Arc::new(Mutex::new(Recorder(vec![])));
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 5, b.clone()).unwrap();
        assert!(bus.insert(0x3fc, 8, b.clone()).is_err());
        assert!(bus.write(0x3fa, &[1]));
        assert!(bus.write(0x64, &[2]));
        assert!(!bus.write(0x400, &[3]));
        assert!(!bus.write(0x3ff, &[1, 2])); // straddles the end
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d[0], 5);
        assert!(!bus.read(0x10, &mut d));
        assert_eq!(d[0], 0xff);
        assert_eq!(a.lock().unwrap().0, vec![(2, vec![1])]);
        assert_eq!(b.lock().unwrap().0, vec![(4, vec![2])]);
    }
}
