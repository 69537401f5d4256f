//! The MAC learning table: (learning id, MAC) → port, with aging, a per-port limit and a
//! table-wide capacity (MAC-flood protection).
//!
//! A new MAC is refused when its port already holds its limit. When the whole table is full,
//! room is made OVS-style, fairly: the least recently seen entry of the port holding the most
//! entries goes, but only when that port holds at least two more than the learner. So a
//! flooding port only ever loses its own entries or is refused, and a port with few stations
//! (a well-behaved VM) always gets room; its learned entries are never evicted by the flood.

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
    /// The port already has its limit of MACs, or the table is full and the port already holds
    /// as many as anyone: drop the frame.
    LimitReached,
}

#[derive(Debug)]
pub struct MacTable {
    map: HashMap<u64, Entry, FxBuildHasher>,
    per_port: Vec<u32>,
    aging_ns: u64,
    /// Most entries in the whole table.
    capacity: usize,
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
    pub fn new(aging_secs: u64, capacity: usize) -> Self {
        MacTable {
            map: HashMap::with_capacity_and_hasher(capacity.min(1024), FxBuildHasher),
            per_port: Vec::new(),
            aging_ns: aging_secs.saturating_mul(1_000_000_000),
            capacity,
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

    /// The MACs learned behind `p` (in any learning domain), sorted, each once.
    pub fn macs(&self, p: PortId) -> Vec<Mac> {
        let mut macs: Vec<Mac> = self
            .map
            .iter()
            .filter(|(_, e)| e.port == p)
            .map(|(k, _)| {
                let mut m = [0u8; 6];
                m.copy_from_slice(&k.to_le_bytes()[..6]);
                m
            })
            .collect();
        macs.sort_unstable();
        macs.dedup();
        macs
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
        if port_limit.is_some_and(|l| self.count(port) >= l) {
            return Learn::LimitReached;
        }
        if self.map.len() >= self.capacity && !self.evict_for(port) {
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

    /// Makes room for one entry of `port` in a full table: removes the least recently seen
    /// entry of the port holding the most entries, if that port holds at least two more than
    /// `port` (so eviction never takes from a port smaller than the learner, and two heavy
    /// ports end up balanced rather than taking turns). Returns whether an entry went.
    fn evict_for(&mut self, port: PortId) -> bool {
        let mine = self.count(port);
        let Some((heavy, n)) = self
            .per_port
            .iter()
            .enumerate()
            .max_by_key(|(_, n)| **n)
            .map(|(i, n)| (PortId(i as u16), *n))
        else {
            return false;
        };
        if heavy == port || n < mine + 2 {
            return false;
        }
        // A linear scan, but only while ports are unbalanced on a full table: each eviction
        // narrows the gap between the learner and the heaviest port.
        let Some(victim) = self
            .map
            .iter()
            .filter(|(_, e)| e.port == heavy)
            .min_by_key(|(_, e)| e.last_seen)
            .map(|(k, _)| *k)
        else {
            return false;
        };
        self.map.remove(&victim);
        *self.count_mut(heavy) -= 1;
        self.changes += 1;
        true
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
    fn macs_lists_a_ports_stations_once_across_domains() {
        let mut t = MacTable::new(10, 100);
        let (a, b) = ([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 1]);
        t.learn(1, &a, PortId(0), None, 0);
        t.learn(2, &a, PortId(0), None, 0);
        t.learn(1, &b, PortId(0), None, 0);
        t.learn(1, &[2, 0, 0, 0, 0, 5], PortId(1), None, 0);
        assert_eq!(t.macs(PortId(0)), vec![b, a]);
        assert_eq!(t.macs(PortId(7)), Vec::<Mac>::new());
    }

    #[test]
    fn a_full_table_evicts_only_from_the_heaviest_port_and_never_below_the_learner() {
        let mut t = MacTable::new(300, 10);
        let m = |p: u8, i: u8| [2, 0, 0, 0, p, i];
        // Port 1 has two stations; port 0 floods the rest of the table, then keeps flooding.
        t.learn(1, &m(1, 0), PortId(1), None, 0);
        t.learn(1, &m(1, 1), PortId(1), None, 1);
        for i in 0..50 {
            let r = t.learn(1, &m(0, i), PortId(0), None, 10 + i as u64);
            assert_eq!(r == Learn::Ok, i < 8, "frame {i}");
        }
        assert_eq!(
            (t.len(), t.count(PortId(0)), t.count(PortId(1))),
            (10, 8, 2)
        );
        assert_eq!(t.lookup(1, &m(1, 0), 100), Some(PortId(1)), "not evicted");
        // A new station on the small port takes the flooder's oldest entry.
        assert_eq!(t.learn(1, &m(1, 2), PortId(1), None, 100), Learn::Ok);
        assert_eq!(
            (t.len(), t.count(PortId(0)), t.count(PortId(1))),
            (10, 7, 3)
        );
        assert_eq!(
            t.lookup(1, &m(0, 0), 100),
            None,
            "oldest of the flooder went"
        );
        assert_eq!(t.lookup(1, &m(0, 1), 100), Some(PortId(0)));
        // Ports never evict down past each other: at 5 and 5, both are refused.
        for i in 3..10 {
            t.learn(1, &m(1, i), PortId(1), None, 200);
        }
        assert_eq!((t.count(PortId(0)), t.count(PortId(1))), (5, 5));
        assert_eq!(
            t.learn(1, &m(0, 99), PortId(0), None, 300),
            Learn::LimitReached
        );
        assert_eq!(
            t.learn(1, &m(1, 99), PortId(1), None, 300),
            Learn::LimitReached
        );
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
