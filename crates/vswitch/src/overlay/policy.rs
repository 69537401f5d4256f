//! The policy table: (routing domain, customer address) → where the VM is (PA, VSID, MAC).
//! Entries come from the configuration, from this switch's own VM ports, from the API
//! (`set`), or from the lookup hook on a miss. Conflicts are refused, never resolved by
//! whichever came last — except that an explicit `set` moves a remote CA (live migration).

use std::net::IpAddr;

use rustc_hash::FxHashMap;

use crate::frame::Mac;
use crate::PortId;

/// Where an entry came from; decides what may replace it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `OverlayConfig.policies`, the API or the lookup hook: a remote (or not-yet-local) CA.
    Policy,
    /// A VM port of this switch.
    Port(PortId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub vsid: u32,
    pub mac: Mac,
    pub pa: IpAddr,
    pub origin: Origin,
}

/// Why an entry was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("CA {ca} is already on port {port:?} of this switch; remove the port first")]
    OwnedByPort { ca: IpAddr, port: PortId },
    #[error(
        "CA {ca} is already in the table with MAC {mac:02x?} at {pa}; remove that entry first"
    )]
    Conflict { ca: IpAddr, mac: Mac, pa: IpAddr },
}

#[derive(Debug, Default)]
pub struct PolicyTable {
    map: FxHashMap<(u16, IpAddr), Entry>,
}

impl PolicyTable {
    pub fn get(&self, rd: u16, ca: IpAddr) -> Option<&Entry> {
        self.map.get(&(rd, ca))
    }

    /// Adds or replaces an entry. A port's entry takes over a policy entry (the VM arrived
    /// here); a policy entry may move a policy entry (the VM moved elsewhere); nothing
    /// replaces another port's entry.
    pub fn insert(&mut self, rd: u16, ca: IpAddr, e: Entry) -> Result<(), PolicyError> {
        if let Some(old) = self.map.get(&(rd, ca)) {
            match (old.origin, e.origin) {
                (Origin::Port(p), _) if old.origin != e.origin => {
                    return Err(PolicyError::OwnedByPort { ca, port: p });
                }
                // Another VM claiming the CA (a VM that moves keeps its MAC).
                (Origin::Policy, _) if old.mac != e.mac => {
                    return Err(PolicyError::Conflict {
                        ca,
                        mac: old.mac,
                        pa: old.pa,
                    });
                }
                _ => {}
            }
        }
        self.map.insert((rd, ca), e);
        Ok(())
    }

    pub fn remove(&mut self, rd: u16, ca: IpAddr) -> Option<Entry> {
        self.map.remove(&(rd, ca))
    }

    /// Drops every entry of `port`.
    pub fn remove_port(&mut self, port: PortId) {
        self.map.retain(|_, e| e.origin != Origin::Port(port));
    }

    pub fn iter(&self) -> impl Iterator<Item = (u16, IpAddr, &Entry)> {
        self.map.iter().map(|((rd, ca), e)| (*rd, *ca, e))
    }

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

    fn e(mac: u8, pa: &str, origin: Origin) -> Entry {
        Entry {
            vsid: 1,
            mac: [2, 0, 0, 0, 0, mac],
            pa: pa.parse().unwrap(),
            origin,
        }
    }

    #[test]
    fn conflicts_are_refused_and_moves_accepted() {
        let mut t = PolicyTable::default();
        let ca: IpAddr = "10.0.0.2".parse().unwrap();
        t.insert(0, ca, e(2, "192.0.2.1", Origin::Policy)).unwrap();
        // Same VM, new host: a move.
        t.insert(0, ca, e(2, "192.0.2.9", Origin::Policy)).unwrap();
        assert_eq!(
            t.get(0, ca).unwrap().pa,
            "192.0.2.9".parse::<IpAddr>().unwrap()
        );
        // Another MAC claiming the CA: a conflict.
        assert!(matches!(
            t.insert(0, ca, e(3, "192.0.2.1", Origin::Policy)),
            Err(PolicyError::Conflict { .. })
        ));
        // The same CA in another routing domain is another tenant's: no conflict.
        t.insert(1, ca, e(3, "192.0.2.1", Origin::Policy)).unwrap();
        // The VM arrives on a local port; afterwards the API cannot move it.
        t.insert(0, ca, e(2, "192.0.2.5", Origin::Port(PortId(4))))
            .unwrap();
        assert!(matches!(
            t.insert(0, ca, e(2, "192.0.2.1", Origin::Policy)),
            Err(PolicyError::OwnedByPort { .. })
        ));
        t.remove_port(PortId(4));
        assert!(t.get(0, ca).is_none());
    }
}
