//! The MAC learning table: (learning id, MAC) → port, with aging and a per-port limit so one
//! port flooding random source MACs cannot evict everyone else (MAC-flood protection).

use std::collections::HashMap;

use rustc_hash::FxBuildHasher;

use crate::frame::Mac;
use crate::PortId;

#[derive(Clone, Copy, Debug)]
struct Entry {
    port: PortId,
    last_seen: u64,
}

/// Outcome of learning a source address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learn {
    /// Known or newly learned (or moved) — the frame may proceed.
    Ok,
    /// The port already has its limit of MACs (or the table is full): drop the frame.
    LimitReached,
}

#[derive(Debug)]
pub struct MacTable {
    map: HashMap<u64, Entry, FxBuildHasher>,
    per_port: Vec<u32>,
    aging_ns: u64,
    limit: usize,
    /// Counts moves and removals: anything that can change where a known MAC is forwarded
    /// (the kernel fast path drops its flows when this moves).
    changes: u64,
}

#[inline]
fn key(fid: u16, mac: &Mac) -> u64 {
    let mut k = [0u8; 8];
    k[..6].copy_from_slice(mac);
    k[6..].copy_from_slice(&fid.to_le_bytes());
    u64::from_le_bytes(k)
}

impl MacTable {
    pub fn new(aging_secs: u64, limit: usize) -> Self {
        MacTable {
            map: HashMap::with_capacity_and_hasher(1024, FxBuildHasher),
            per_port: Vec::new(),
            aging_ns: aging_secs.saturating_mul(1_000_000_000),
            limit,
            changes: 0,
        }
    }

    fn count_mut(&mut self, p: PortId) -> &mut u32 {
        let i = p.0 as usize;
        if self.per_port.len() <= i {
            self.per_port.resize(i + 1, 0);
        }
        &mut self.per_port[i]
    }

    pub fn count(&self, p: PortId) -> u32 {
        self.per_port.get(p.0 as usize).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Records that `mac` lives behind `port` in learning domain `fid`.
    #[inline]
    pub fn learn(
        &mut self,
        fid: u16,
        mac: &Mac,
        port: PortId,
        port_limit: Option<u32>,
        now: u64,
    ) -> Learn {
        let k = key(fid, mac);
        if let Some(e) = self.map.get_mut(&k) {
            let expired = now.saturating_sub(e.last_seen) > self.aging_ns;
            if e.port == port {
                e.last_seen = now;
                return Learn::Ok;
            }
            if !expired
                && port_limit
                    .is_some_and(|l| self.per_port.get(port.0 as usize).copied().unwrap_or(0) >= l)
            {
                return Learn::LimitReached;
            }
            // A station moved (or its old entry expired): follow it.
            let old = e.port;
            e.port = port;
            self.changes += 1;
            e.last_seen = now;
            *self.count_mut(old) -= 1;
            *self.count_mut(port) += 1;
            return Learn::Ok;
        }
        if port_limit.is_some_and(|l| self.count(port) >= l) || self.map.len() >= self.limit {
            return Learn::LimitReached;
        }
        self.map.insert(
            k,
            Entry {
                port,
                last_seen: now,
            },
        );
        *self.count_mut(port) += 1;
        Learn::Ok
    }

    /// Marks `mac` as just seen behind `port` (traffic the kernel forwarded for the switch),
    /// only if that is where the table already has it.
    pub fn touch(&mut self, fid: u16, mac: &Mac, port: PortId, now: u64) {
        if let Some(e) = self.map.get_mut(&key(fid, mac)) {
            if e.port == port && now > e.last_seen {
                e.last_seen = now;
            }
        }
    }

    /// How many moves and removals happened so far.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The port behind `mac`, if learned and not aged out.
    #[inline]
    pub fn lookup(&self, fid: u16, mac: &Mac, now: u64) -> Option<PortId> {
        let e = self.map.get(&key(fid, mac))?;
        (now.saturating_sub(e.last_seen) <= self.aging_ns).then_some(e.port)
    }

    /// Removes entries not seen for the aging time; returns how many went.
    pub fn age(&mut self, now: u64) -> usize {
        let aging = self.aging_ns;
        let before = self.map.len();
        let counts = &mut self.per_port;
        self.map.retain(|_, e| {
            let keep = now.saturating_sub(e.last_seen) <= aging;
            if !keep {
                counts[e.port.0 as usize] -= 1;
            }
            keep
        });
        let gone = before - self.map.len();
        self.changes += gone as u64;
        gone
    }

    /// Forgets everything learned on `port` (port removed or its VLAN changed).
    pub fn flush_port(&mut self, port: PortId) {
        self.changes += 1;
        self.map.retain(|_, e| e.port != port);
        if let Some(c) = self.per_port.get_mut(port.0 as usize) {
            *c = 0;
        }
    }

    pub fn flush(&mut self) {
        self.changes += 1;
        self.map.clear();
        self.per_port.iter_mut().for_each(|c| *c = 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_moves_ages_and_limits() {
        let mut t = MacTable::new(10, 100);
        let a = [2, 0, 0, 0, 0, 1];
        assert_eq!(t.learn(1, &a, PortId(0), None, 0), Learn::Ok);
        assert_eq!(t.lookup(1, &a, 5), Some(PortId(0)));
        assert_eq!(t.lookup(2, &a, 5), None, "other learning domain");
        assert_eq!(t.learn(1, &a, PortId(1), None, 1), Learn::Ok);
        assert_eq!((t.count(PortId(0)), t.count(PortId(1))), (0, 1));
        assert_eq!(t.lookup(1, &a, 11_000_000_001), None, "aged");
        assert_eq!(t.age(11_000_000_001), 1);
        assert_eq!(t.count(PortId(1)), 0);
        for i in 0..3u8 {
            assert_eq!(
                t.learn(1, &[2, 0, 0, 0, 1, i], PortId(2), Some(2), 0),
                if i < 2 {
                    Learn::Ok
                } else {
                    Learn::LimitReached
                }
            );
        }
        assert_eq!(t.count(PortId(2)), 2);
    }

    #[test]
    fn moves_and_removals_count_as_changes_and_touch_refreshes_only_in_place() {
        let mut t = MacTable::new(10, 100);
        let a = [2, 0, 0, 0, 0, 1];
        t.learn(1, &a, PortId(0), None, 0);
        t.learn(1, &a, PortId(0), None, 1);
        assert_eq!(t.changes(), 0, "learning and refreshing are not changes");
        t.touch(1, &a, PortId(0), 9_000_000_000);
        assert_eq!(t.lookup(1, &a, 18_000_000_000), Some(PortId(0)), "touched");
        t.touch(1, &a, PortId(5), 30_000_000_000);
        assert_eq!(
            t.lookup(1, &a, 30_000_000_000),
            None,
            "touch elsewhere neither moves nor refreshes"
        );
        t.learn(1, &a, PortId(1), None, 30_000_000_000);
        assert_eq!(t.changes(), 1, "move");
        assert_eq!(t.age(50_000_000_000), 1);
        assert_eq!(t.changes(), 2, "aged out");
    }
}
