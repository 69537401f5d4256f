//! What a host owes the stale senders of a VM that moved away from it: one relay of each
//! packet (never a second hop), a redirect to its sender, and an end to both once the relay
//! has been idle for the configured expiry. The decisions are pure functions of the state
//! here and the frame's time; `mod.rs` applies them. `docs/netvirt.md`, "Stale senders".

use std::net::IpAddr;

use rustc_hash::FxHashMap;

/// Departures remembered at most; the idlest go first when full.
const DEPARTURE_LIMIT: usize = 16_384;
/// (sender, CA) pairs whose last redirect is remembered at most.
const REDIRECT_MEMORY: usize = 4_096;
/// A sender is redirected again for the same CA after this long without effect (the
/// redirect was lost, or the sender cannot take it): once per second, not once per packet.
const REDIRECT_INTERVAL_NS: u64 = 1_000_000_000;

/// Counters of the stale-sender machinery, for `Switch::relay_counters`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RelayCounters {
    /// Packets for a VM that moved away relayed to its new host.
    pub relayed: u64,
    /// Packets for a VM that moved away dropped because the relay had expired.
    pub relay_expired: u64,
    /// Relayed packets dropped because the VM is not here either (no second hop).
    pub chain_dropped: u64,
    /// Redirects sent to stale senders.
    pub redirects_sent: u64,
    /// Redirects received that moved one of our entries.
    pub redirects_accepted: u64,
    /// Redirects received and refused (forged, wrong VSID or MAC, not from the entry's host).
    pub redirects_refused: u64,
}

/// Why a packet for a departed VM is not relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRelay {
    /// The VM never lived here (the sender's table is wrong, not stale).
    NeverHere,
    /// It left, and the relay has been idle for longer than the expiry.
    Expired,
}

#[derive(Debug)]
pub struct Relays {
    expiry_ns: u64,
    /// (routing domain, CA) of VMs that left → when the relay was last used (or the VM
    /// left); `None` when it left before this switch saw any frame (no clock yet).
    departed: FxHashMap<(u16, IpAddr), Option<u64>>,
    /// (sender PA, routing domain, CA) → when it was last redirected.
    redirected: FxHashMap<(IpAddr, u16, IpAddr), u64>,
    pub counters: RelayCounters,
}

impl Relays {
    pub fn new(expiry_secs: u32) -> Relays {
        Relays {
            expiry_ns: u64::from(expiry_secs) * 1_000_000_000,
            departed: FxHashMap::default(),
            redirected: FxHashMap::default(),
            counters: RelayCounters::default(),
        }
    }

    /// A local port with this CA went away (`now`: the switch's latest frame time, 0 if
    /// none yet).
    pub fn departed(&mut self, rd: u16, ca: IpAddr, now: u64) {
        if self.departed.len() >= DEPARTURE_LIMIT {
            let expiry = self.expiry_ns;
            self.departed
                .retain(|_, t| t.is_none_or(|t| now.saturating_sub(t) <= expiry));
            if self.departed.len() >= DEPARTURE_LIMIT {
                return;
            }
        }
        self.departed.insert((rd, ca), (now != 0).then_some(now));
    }

    /// The CA is on a local port again: nothing to relay.
    pub fn arrived(&mut self, rd: u16, ca: IpAddr) {
        self.departed.remove(&(rd, ca));
    }

    /// Whether a packet for CA `ca` that left this host may be relayed at `now`; a relay
    /// keeps the window open.
    pub fn may_relay(&mut self, rd: u16, ca: IpAddr, now: u64) -> Result<(), NoRelay> {
        let last = self.departed.get_mut(&(rd, ca)).ok_or(NoRelay::NeverHere)?;
        if last.is_some_and(|t| now.saturating_sub(t) > self.expiry_ns) {
            return Err(NoRelay::Expired);
        }
        *last = Some(now);
        Ok(())
    }

    /// Whether `sender` is due a redirect for `ca` now (and remember that it got one).
    pub fn should_redirect(&mut self, sender: IpAddr, rd: u16, ca: IpAddr, now: u64) -> bool {
        let key = (sender, rd, ca);
        if let Some(t) = self.redirected.get(&key) {
            if now.saturating_sub(*t) < REDIRECT_INTERVAL_NS {
                return false;
            }
        }
        if self.redirected.len() >= REDIRECT_MEMORY && !self.redirected.contains_key(&key) {
            self.redirected
                .retain(|_, t| now.saturating_sub(*t) < REDIRECT_INTERVAL_NS);
        }
        self.redirected.insert(key, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn ca() -> IpAddr {
        "10.0.0.7".parse().unwrap()
    }

    #[test]
    fn relays_until_idle_for_the_expiry_then_drops() {
        let mut r = Relays::new(60);
        assert_eq!(r.may_relay(0, ca(), S), Err(NoRelay::NeverHere));
        r.departed(0, ca(), 10 * S);
        // Each relay keeps it open: 50 s, then 50 s more, both inside 60 s of the last.
        assert_eq!(r.may_relay(0, ca(), 60 * S), Ok(()));
        assert_eq!(r.may_relay(0, ca(), 110 * S), Ok(()));
        assert_eq!(r.may_relay(0, ca(), 171 * S), Err(NoRelay::Expired));
        // Another tenant's same CA never left.
        assert_eq!(r.may_relay(1, ca(), 110 * S), Err(NoRelay::NeverHere));
    }

    #[test]
    fn a_vm_that_comes_back_is_not_relayed() {
        let mut r = Relays::new(60);
        r.departed(0, ca(), S);
        r.arrived(0, ca());
        assert_eq!(r.may_relay(0, ca(), 2 * S), Err(NoRelay::NeverHere));
    }

    #[test]
    fn a_departure_before_any_frame_counts_from_its_first_relay() {
        let mut r = Relays::new(60);
        r.departed(0, ca(), 0);
        assert_eq!(r.may_relay(0, ca(), 1000 * S), Ok(()));
        assert_eq!(r.may_relay(0, ca(), 1061 * S), Err(NoRelay::Expired));
    }

    #[test]
    fn redirects_are_paced_per_sender_and_ca() {
        let mut r = Relays::new(60);
        let (c, d): (IpAddr, IpAddr) = ("192.0.2.3".parse().unwrap(), "192.0.2.4".parse().unwrap());
        assert!(r.should_redirect(c, 0, ca(), S));
        assert!(!r.should_redirect(c, 0, ca(), S + S / 2));
        assert!(r.should_redirect(d, 0, ca(), S + S / 2));
        assert!(r.should_redirect(c, 0, ca(), 2 * S));
    }
}
