//! What a port's guards decided about the IP datagrams it is sending in fragments. Only a
//! first fragment shows the UDP ports or ICMP type a guard judges by, so the verdict on it
//! is remembered per datagram (source, destination, protocol, identification) and applied
//! to the fragments that follow. Bounded (oldest entry evicted first) and aged, so a flood of
//! fragment ids costs a fixed amount of memory and only evicts the flooding port's entries;
//! a later fragment whose datagram is not (or no longer) known is treated as unseen.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::frame::{Fragment, FrameSummary, L3};

/// Datagrams remembered per port.
pub const FRAGMENT_CAPACITY: usize = 256;
/// How long a verdict holds after the first fragment: as long as Linux keeps an IPv4
/// reassembly queue (`ipfrag_time`). A fragment arriving later counts as unseen, which a
/// guarded port drops anyway, so expiry never lets a blocked datagram through.
pub const FRAGMENT_TIMEOUT_NS: u64 = 30_000_000_000;

/// Identifies one datagram, as a receiver reassembling it would.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DatagramKey {
    src: u128,
    dst: u128,
    id: u32,
    proto: u8,
    v6: bool,
}

impl DatagramKey {
    pub fn new(s: &FrameSummary, f: &Fragment) -> Self {
        DatagramKey {
            src: s.src_ip,
            dst: s.dst_ip,
            id: f.id,
            proto: f.proto,
            v6: s.l3 == L3::Ipv6,
        }
    }
}

/// The guards' verdict on a datagram's first fragment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Later fragments pass, except those overlapping the first `headers` bytes of the
    /// datagram (the headers the guard judged: rewriting them after the fact is an attack).
    Allowed {
        headers: u16,
    },
    Blocked,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    verdict: Verdict,
    since: u64,
}

#[derive(Clone, Debug, Default)]
pub struct FragmentTable {
    map: FxHashMap<DatagramKey, Entry>,
    /// Keys in insertion order with their insertion time; an element whose time differs from
    /// the map entry's (or whose key is gone) is stale and skipped when it reaches the front.
    order: VecDeque<(DatagramKey, u64)>,
}

impl FragmentTable {
    /// The live verdict on a datagram, if its first fragment was seen within the timeout.
    pub fn get(&mut self, key: &DatagramKey, now: u64) -> Option<Verdict> {
        let e = *self.map.get(key)?;
        if now.saturating_sub(e.since) > FRAGMENT_TIMEOUT_NS {
            self.map.remove(key);
            return None;
        }
        Some(e.verdict)
    }

    /// Records a verdict and returns the one that now holds: `Blocked` is final for the
    /// datagram's lifetime, so a harmless-looking duplicate first fragment cannot reopen it.
    pub fn record(&mut self, key: DatagramKey, verdict: Verdict, now: u64) -> Verdict {
        if let Some(old) = self.get(&key, now) {
            let v = if old == Verdict::Blocked {
                old
            } else {
                verdict
            };
            if let Some(e) = self.map.get_mut(&key) {
                e.verdict = v;
            }
            return v;
        }
        // Make room: drop stale and expired heads, and the oldest live entry when full.
        while let Some(&(k, t)) = self.order.front() {
            let live = self.map.get(&k).is_some_and(|e| e.since == t);
            let expired = now.saturating_sub(t) > FRAGMENT_TIMEOUT_NS;
            if live && !expired && self.order.len() < FRAGMENT_CAPACITY {
                break;
            }
            self.order.pop_front();
            if live {
                self.map.remove(&k);
            }
        }
        self.map.insert(
            key,
            Entry {
                verdict,
                since: now,
            },
        );
        self.order.push_back((key, now));
        verdict
    }

    /// Datagrams remembered (live or not yet swept).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u32) -> DatagramKey {
        DatagramKey {
            src: 1,
            dst: 2,
            id,
            proto: 17,
            v6: false,
        }
    }

    const OK: Verdict = Verdict::Allowed { headers: 16 };

    #[test]
    fn blocked_is_final_and_allowed_can_be_blocked() {
        let mut t = FragmentTable::default();
        assert_eq!(t.record(key(1), Verdict::Blocked, 0), Verdict::Blocked);
        assert_eq!(t.record(key(1), OK, 1), Verdict::Blocked);
        assert_eq!(t.record(key(2), OK, 1), OK);
        assert_eq!(t.record(key(2), Verdict::Blocked, 2), Verdict::Blocked);
        assert_eq!(t.get(&key(2), 3), Some(Verdict::Blocked));
        assert_eq!(t.get(&key(3), 3), None);
    }

    #[test]
    fn verdicts_age_out() {
        let mut t = FragmentTable::default();
        t.record(key(1), OK, 10);
        assert_eq!(t.get(&key(1), 10 + FRAGMENT_TIMEOUT_NS), Some(OK));
        assert_eq!(t.get(&key(1), 11 + FRAGMENT_TIMEOUT_NS), None);
        assert!(t.is_empty());
        // Re-learned after expiry, it is a new datagram.
        assert_eq!(
            t.record(key(1), Verdict::Blocked, 12 + FRAGMENT_TIMEOUT_NS),
            Verdict::Blocked
        );
    }

    #[test]
    fn a_flood_of_ids_stays_within_capacity_and_evicts_the_oldest() {
        let mut t = FragmentTable::default();
        for id in 0..100_000u32 {
            t.record(key(id), OK, id as u64);
            assert!(t.len() <= FRAGMENT_CAPACITY && t.order.len() <= FRAGMENT_CAPACITY);
        }
        assert_eq!(t.len(), FRAGMENT_CAPACITY);
        assert_eq!(t.get(&key(99_999), 100_000), Some(OK));
        assert_eq!(t.get(&key(0), 100_000), None);
        // Expiring and re-recording keys (no new ones) never grows the queue either.
        for round in 1..50u64 {
            let now = round * 2 * FRAGMENT_TIMEOUT_NS;
            for id in 0..10 {
                t.record(key(id), OK, now);
            }
            assert!(t.order.len() <= FRAGMENT_CAPACITY);
        }
    }
}
