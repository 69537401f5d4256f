//! Neighbour discovery (RFC 4861) on the uplink for IPv6 provider addresses: what ARP is for
//! IPv4 PAs. The switch speaks for its PAs itself (the uplink interface has no address), so it
//! solicits the MACs of the other hosts' PAs, answers solicitations for its own, and keeps
//! what it learns in the overlay's provider neighbour cache.
//!
//! This file holds the wire side (a strict parser and the solicitation builder; the
//! advertisement builder is `reply::neighbor_advert`) and [`NdState`], the bookkeeping of
//! solicitations in flight and of when each learned neighbour was last confirmed. The
//! decisions — what to learn, what to answer — are in `Overlay::uplink_nd` (`mod.rs`), under
//! the switch lock with the rest of the overlay.

use std::net::Ipv6Addr;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::wire::{fold, pseudo, sum};
use crate::frame::{Mac, ETH_P_IPV6, IPPROTO_ICMPV6};

/// ICMPv6 types of neighbour discovery.
pub const NEIGHBOR_SOLICIT: u8 = 135;
pub const NEIGHBOR_ADVERT: u8 = 136;

/// A solicitation is repeated at most this often per target (RFC 4861 RETRANS_TIMER).
const RETRANS_NS: u64 = 1_000_000_000;
/// A learned neighbour not confirmed for this long is forgotten and solicited again on the
/// next frame to it (confirmation: an NA, an NS from it, or a valid tunnel packet from it).
pub const LIFETIME_NS: u64 = 60_000_000_000;
/// Targets with a solicitation in flight, at most: the rest are dropped (counted) until one
/// resolves or times out, so unresolvable PAs cannot grow the table.
const PENDING_LIMIT: usize = 256;
/// A pending target with no answer for this long is forgotten.
const PENDING_TIMEOUT_NS: u64 = 10 * RETRANS_NS;

/// An ND message from the uplink that passed every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NdMessage {
    pub kind: u8,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub target: Ipv6Addr,
    /// Source (NS) or target (NA) link-layer address option.
    pub lladdr: Option<Mac>,
    /// NA flags.
    pub solicited: bool,
    pub override_: bool,
}

/// Why an ND frame was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NdError {
    #[error("not an untagged IPv6 ICMPv6 neighbor solicitation or advertisement")]
    NotNd,
    #[error("hop limit is not 255 (the message crossed a router)")]
    HopLimit,
    #[error("ICMPv6 checksum does not verify")]
    Checksum,
    #[error("truncated or inconsistent lengths")]
    Length,
    #[error("ICMP code is not 0")]
    Code,
    #[error("the target is a multicast address")]
    Target,
    #[error("an option has length 0 or runs past the message")]
    Option,
    #[error("a solicitation from :: carries a source link-layer address")]
    DadWithAddress,
}

/// Parses an untagged Ethernet frame as NS/NA with the checks RFC 4861 §7.1.1/§7.1.2 ask for.
/// `NotNd` means "not ours to judge" (the L2 pipeline takes it); any other error is a bad
/// ND message.
pub fn parse(frame: &[u8]) -> Result<NdMessage, NdError> {
    if frame.len() < 55 || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IPV6 {
        return Err(NdError::NotNd);
    }
    let ip = &frame[14..];
    // No extension headers: ND never carries them (a fragmented one is refused, RFC 6980).
    if ip[0] >> 4 != 6 || ip[6] != IPPROTO_ICMPV6 {
        return Err(NdError::NotNd);
    }
    let kind = ip[40];
    if kind != NEIGHBOR_SOLICIT && kind != NEIGHBOR_ADVERT {
        return Err(NdError::NotNd);
    }
    let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if plen < 24 || ip.len() < 40 + plen {
        return Err(NdError::Length);
    }
    if ip[7] != 255 {
        return Err(NdError::HopLimit);
    }
    let body = &ip[40..40 + plen];
    if fold(sum(pseudo(&ip[8..24], &ip[24..40], 58, plen), body)) != 0 {
        return Err(NdError::Checksum);
    }
    if body[1] != 0 {
        return Err(NdError::Code);
    }
    let addr = |b: &[u8]| Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes"));
    let (src, dst, target) = (addr(&ip[8..24]), addr(&ip[24..40]), addr(&body[8..24]));
    if target.is_multicast() {
        return Err(NdError::Target);
    }
    let want = if kind == NEIGHBOR_SOLICIT { 1 } else { 2 };
    let mut lladdr = None;
    let mut opts = &body[24..];
    while !opts.is_empty() {
        let len = usize::from(*opts.get(1).ok_or(NdError::Option)?) * 8;
        if len == 0 || len > opts.len() {
            return Err(NdError::Option);
        }
        if opts[0] == want && len >= 8 {
            lladdr = Some(<[u8; 6]>::try_from(&opts[2..8]).expect("6 bytes"));
        }
        opts = &opts[len..];
    }
    if kind == NEIGHBOR_SOLICIT && src.is_unspecified() && lladdr.is_some() {
        return Err(NdError::DadWithAddress);
    }
    Ok(NdMessage {
        kind,
        src,
        dst,
        target,
        lladdr,
        solicited: kind == NEIGHBOR_ADVERT && body[4] & 0x40 != 0,
        override_: kind == NEIGHBOR_ADVERT && body[4] & 0x20 != 0,
    })
}

/// The solicited-node multicast address of `a` (RFC 4291 §2.7.1).
pub fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// Overwrites `frame` with a neighbour solicitation for `target` from `src` (our PA) at
/// `src_mac`, to the target's solicited-node group, with the source link-layer option so the
/// target learns us from it.
pub fn solicit(frame: &mut Vec<u8>, src_mac: Mac, src: Ipv6Addr, target: Ipv6Addr) {
    let group = solicited_node(target);
    let g = group.octets();
    frame.clear();
    frame.extend_from_slice(&[0x33, 0x33, g[12], g[13], g[14], g[15]]);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    let body_len = 32usize;
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(body_len as u16).to_be_bytes());
    frame.extend_from_slice(&[IPPROTO_ICMPV6, 255]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&g);
    let at = frame.len();
    frame.extend_from_slice(&[NEIGHBOR_SOLICIT, 0, 0, 0, 0, 0, 0, 0]);
    frame.extend_from_slice(&target.octets());
    frame.extend_from_slice(&[1, 1]);
    frame.extend_from_slice(&src_mac);
    let c = fold(sum(pseudo(&src.octets(), &g, 58, body_len), &frame[at..]));
    frame[at + 2..at + 4].copy_from_slice(&c.to_be_bytes());
}

/// What ND on the uplink did so far (`Overlay::nd_counters`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NdCounters {
    /// Solicitations we sent for other hosts' PAs.
    pub solicits_sent: u64,
    /// Solicitations for our PAs we received (and answered).
    pub solicits_received: u64,
    /// Advertisements we sent (answers for our PAs).
    pub adverts_sent: u64,
    /// Advertisements that resolved or confirmed a neighbour.
    pub adverts_received: u64,
    /// ND messages that failed a check (hop limit, checksum, lengths, options, a
    /// unicast advertisement for a target we never asked about).
    pub bad: u64,
    /// Frames dropped because their PA was still being resolved.
    pub pending_drops: u64,
    /// Learned neighbours forgotten after [`LIFETIME_NS`] without confirmation.
    pub expired: u64,
}

/// Solicitations in flight and the last confirmation of each learned IPv6 neighbour.
#[derive(Debug, Default)]
pub struct NdState {
    /// Target → (time of the last solicitation, time of the first).
    pending: FxHashMap<Ipv6Addr, (u64, u64)>,
    /// Learned neighbour → time of its last confirmation.
    confirmed: FxHashMap<Ipv6Addr, u64>,
    pub counters: NdCounters,
}

/// What to do with a frame whose next hop is unresolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolve {
    /// Send a solicitation in its place.
    Solicit,
    /// One is in flight (or too many are): drop it, counted.
    Wait,
}

impl NdState {
    /// A frame needs `target`'s MAC, which is unknown.
    pub fn need(&mut self, target: Ipv6Addr, now: u64) -> Resolve {
        self.pending
            .retain(|_, (_, first)| now.saturating_sub(*first) < PENDING_TIMEOUT_NS);
        let full = self.pending.len() >= PENDING_LIMIT;
        match self.pending.get_mut(&target) {
            Some((last, _)) if now.saturating_sub(*last) < RETRANS_NS => Resolve::Wait,
            Some((last, _)) => {
                *last = now;
                Resolve::Solicit
            }
            None if full => Resolve::Wait,
            None => {
                self.pending.insert(target, (now, now));
                Resolve::Solicit
            }
        }
    }

    pub fn is_pending(&self, target: Ipv6Addr) -> bool {
        self.pending.contains_key(&target)
    }

    /// `target` was learned or confirmed at `now`.
    pub fn confirm(&mut self, target: Ipv6Addr, now: u64) {
        self.pending.remove(&target);
        self.confirmed.insert(target, now);
    }

    pub fn is_known(&self, target: Ipv6Addr) -> bool {
        self.confirmed.contains_key(&target)
    }

    /// Whether a learned neighbour's confirmation is too old to trust (it is then
    /// forgotten here; the caller drops its MAC).
    pub fn expire(&mut self, target: Ipv6Addr, now: u64) -> bool {
        match self.confirmed.get(&target) {
            Some(t) if now.saturating_sub(*t) > LIFETIME_NS => {
                self.confirmed.remove(&target);
                self.counters.expired += 1;
                true
            }
            _ => false,
        }
    }

    pub fn forget(&mut self, target: Ipv6Addr) {
        self.confirmed.remove(&target);
        self.pending.remove(&target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::reply::neighbor_advert;

    fn a(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn solicitation_round_trips_and_goes_to_the_solicited_node_group() {
        let mut f = Vec::new();
        solicit(
            &mut f,
            [2, 0xaa, 0, 0, 0, 1],
            a("fd00::1"),
            a("fd00::12:3456"),
        );
        assert_eq!(&f[0..6], &[0x33, 0x33, 0xff, 0x12, 0x34, 0x56]);
        let m = parse(&f).unwrap();
        assert_eq!(m.kind, NEIGHBOR_SOLICIT);
        assert_eq!(m.dst, a("ff02::1:ff12:3456"));
        assert_eq!(m.target, a("fd00::12:3456"));
        assert_eq!(m.lladdr, Some([2, 0xaa, 0, 0, 0, 1]));
    }

    #[test]
    fn advert_parses_with_its_flags() {
        let mut f = Vec::new();
        neighbor_advert(&mut f, [2; 6], a("fd00::2"), a("fd00::1"), [4; 6], false);
        let m = parse(&f).unwrap();
        assert_eq!(
            (m.kind, m.solicited, m.override_),
            (NEIGHBOR_ADVERT, true, true)
        );
        assert_eq!((m.target, m.lladdr), (a("fd00::1"), Some([4; 6])));
    }

    #[test]
    fn bad_messages_are_refused_for_their_reason() {
        let mut good = Vec::new();
        solicit(&mut good, [2; 6], a("fd00::1"), a("fd00::2"));
        let mut f = good.clone();
        f[21] = 254;
        assert_eq!(parse(&f), Err(NdError::HopLimit));
        let mut f = good.clone();
        f[70] ^= 1; // a byte of the target
        assert_eq!(parse(&f), Err(NdError::Checksum));
        let mut f = good.clone();
        f.truncate(f.len() - 1);
        assert_eq!(parse(&f), Err(NdError::Length));
        // Option length 0 (checksum fixed so only the option is wrong).
        let mut f = good.clone();
        f[79] = 0;
        fix(&mut f);
        assert_eq!(parse(&f), Err(NdError::Option));
        let mut f = good.clone();
        f[55] = 1;
        fix(&mut f);
        assert_eq!(parse(&f), Err(NdError::Code));
        let mut f = good.clone();
        f[62] = 0xff; // target ff..
        fix(&mut f);
        assert_eq!(parse(&f), Err(NdError::Target));
        let mut f = good.clone();
        f[22..38].fill(0); // from ::, with a source link-layer option
        fix(&mut f);
        assert_eq!(parse(&f), Err(NdError::DadWithAddress));
        // Every truncation is refused, never a panic.
        for n in 0..good.len() {
            assert!(parse(&good[..n]).is_err(), "{n}");
        }
        // Echo requests and other protocols are not ND at all.
        let mut f = good.clone();
        f[54] = 128;
        assert_eq!(parse(&f), Err(NdError::NotNd));
    }

    fn fix(f: &mut [u8]) {
        f[56..58].fill(0);
        let plen = usize::from(u16::from_be_bytes([f[18], f[19]]));
        let c = fold(sum(
            pseudo(&f[22..38], &f[38..54], 58, plen),
            &f[54..54 + plen],
        ));
        f[56..58].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn solicitations_are_paced_bounded_and_expire() {
        let mut s = NdState::default();
        let t = a("fd00::2");
        assert_eq!(s.need(t, 0), Resolve::Solicit);
        assert_eq!(s.need(t, RETRANS_NS / 2), Resolve::Wait);
        assert_eq!(s.need(t, RETRANS_NS + 1), Resolve::Solicit);
        for i in 0..PENDING_LIMIT as u128 {
            s.need(Ipv6Addr::from(0xfd01_u128 << 112 | i), 2 * RETRANS_NS);
        }
        assert_eq!(s.need(a("fd02::9"), 2 * RETRANS_NS), Resolve::Wait);
        // After the timeout the table empties again.
        assert_eq!(s.need(a("fd02::9"), 20 * RETRANS_NS), Resolve::Solicit);
        s.confirm(t, 0);
        assert!(!s.expire(t, LIFETIME_NS));
        assert!(s.expire(t, LIFETIME_NS + 1));
        assert_eq!(s.counters.expired, 1);
    }
}
