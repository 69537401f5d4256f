//! Source-MAC rewrite of switch-independent teams with address-hash or dynamic distribution,
//! as Hyper-V's LBFO does: one VM's frames leave by several members at once, and a physical
//! switch that saw the VM's MAC on each of them would flap its forwarding entry (or, with port
//! security, shut a port). So:
//!
//! - frames peers learn addresses from — broadcast/multicast, ARP, IPv6 neighbour
//!   solicitations and advertisements — leave by the primary member with the VM's MAC, so
//!   the far end's table and its neighbours' caches put every VM behind the primary;
//! - every other frame sent by a non-primary member carries that member's own MAC as source.
//!
//! Inbound unicast to a VM's MAC therefore arrives on the primary. A frame that arrives for a
//! non-primary member's MAC comes from a peer that learned that member's MAC from our
//! rewritten frames (a device that answers the L2 source rather than its ARP cache): it is
//! given back to the VM that last sent to that peer through that member (destination
//! restored), or, with no such VM, is the host's own traffic on that NIC and not the
//! switch's. A copy flooded to any other member is dropped. Pure: the team owns the state
//! under its lock.

use rustc_hash::FxHashMap;

use crate::frame::Mac;

/// (member, peer MAC) → VM MAC entries kept; a full table is cleared (a forgotten entry only
/// costs the rare frame addressed to a member's MAC).
const PEERS: usize = 4096;

const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMPV6: u8 = 58;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;

/// Whether peers learn where `frame`'s source lives from it: group destinations, ARP, and
/// ND solicitations/advertisements (also unicast ones), behind at most one 802.1Q tag.
pub fn peers_learn_from(frame: &[u8]) -> bool {
    if frame.first().is_some_and(|b| b & 1 == 1) {
        return true;
    }
    let Some(mut ethertype) = be16(frame, 12) else {
        return false;
    };
    let mut l3 = 14;
    if ethertype == ETH_P_8021Q {
        let Some(inner) = be16(frame, 16) else {
            return false;
        };
        ethertype = inner;
        l3 = 18;
    }
    match ethertype {
        ETH_P_ARP => true,
        // ICMPv6 right after the fixed header: ND is never behind extension headers that
        // matter here (RFC 4861 senders put none; hop-by-hop would hide it, and then the
        // frame is simply rewritten like data).
        ETH_P_IPV6 => {
            frame.get(l3 + 6) == Some(&IPPROTO_ICMPV6)
                && matches!(
                    frame.get(l3 + 40),
                    Some(&ND_NEIGHBOR_SOLICIT | &ND_NEIGHBOR_ADVERT)
                )
        }
        _ => false,
    }
}

fn be16(f: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]))
}

fn mac_at(f: &[u8], at: usize) -> Option<Mac> {
    f.get(at..at + 6)?.try_into().ok()
}

/// What to do with a frame that arrived on a member.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// Not addressed to a non-primary member's MAC: as it is.
    Pass,
    /// Addressed to the arrival member's MAC by a peer a VM talks to through it: the
    /// destination has been set back to that VM's MAC.
    Restored,
    /// Addressed to a non-primary member's MAC and no VM is behind it (host traffic on that
    /// NIC, or a flooded copy on another member): not the switch's.
    NotOurs,
}

#[derive(Default)]
pub struct MacRewrite {
    /// (member, peer MAC) → the VM MAC whose frames to that peer last left by that member.
    peers: FxHashMap<(usize, Mac), Mac>,
}

impl MacRewrite {
    /// Records that `frame` leaves by `member` with its source rewritten (call before
    /// [`rewrite`]).
    pub fn on_rewritten_send(&mut self, member: usize, frame: &[u8]) {
        let (Some(dst), Some(src)) = (mac_at(frame, 0), mac_at(frame, 6)) else {
            return;
        };
        if self.peers.len() >= PEERS && !self.peers.contains_key(&(member, dst)) {
            self.peers.clear();
        }
        self.peers.insert((member, dst), src);
    }

    /// Checks (and restores) the destination of `frame`, which arrived on member `arrived`.
    /// `member_macs[i]`: member i's own MAC; `primary`: the member that keeps VM MACs.
    pub fn on_recv(
        &self,
        arrived: usize,
        frame: &mut [u8],
        member_macs: &[Mac],
        primary: Option<usize>,
    ) -> Inbound {
        let Some(dst) = mac_at(frame, 0) else {
            return Inbound::Pass;
        };
        let Some(owner) = member_macs.iter().position(|m| *m == dst) else {
            return Inbound::Pass;
        };
        if Some(owner) == primary {
            return Inbound::Pass;
        }
        if owner != arrived {
            return Inbound::NotOurs;
        }
        let vm = mac_at(frame, 6).and_then(|peer| self.peers.get(&(owner, peer)));
        match vm {
            Some(vm) => {
                frame[..6].copy_from_slice(vm);
                Inbound::Restored
            }
            None => Inbound::NotOurs,
        }
    }
}

/// `frame` with its source MAC replaced by `member_mac`, into `out`.
pub fn rewrite(frame: &[u8], member_mac: &Mac, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(frame);
    if out.len() >= 12 {
        out[6..12].copy_from_slice(member_mac);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: Mac = [2, 0, 0, 0, 0, 1];
    const PEER: Mac = [2, 0, 0, 0, 0, 9];
    const M0: Mac = [2, 0xee, 0, 0, 0, 0];
    const M1: Mac = [2, 0xee, 0, 0, 0, 1];

    fn frame(dst: Mac, src: Mac, ethertype: u16, rest: &[u8]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(rest);
        f
    }

    fn icmpv6(kind: u8) -> Vec<u8> {
        let mut ip = vec![0u8; 48];
        ip[0] = 0x60;
        ip[6] = IPPROTO_ICMPV6;
        ip[40] = kind;
        ip
    }

    #[test]
    fn what_peers_learn_from_stays_on_the_primary() {
        let ipv4 = [0x45u8; 40];
        assert!(peers_learn_from(&frame([0xff; 6], VM, 0x0800, &ipv4)));
        assert!(peers_learn_from(&frame(
            [0x33, 0x33, 0, 0, 0, 1],
            VM,
            ETH_P_IPV6,
            &icmpv6(1)
        )));
        assert!(peers_learn_from(&frame(PEER, VM, ETH_P_ARP, &[0; 28])));
        assert!(peers_learn_from(&frame(PEER, VM, ETH_P_IPV6, &icmpv6(135))));
        assert!(peers_learn_from(&frame(PEER, VM, ETH_P_IPV6, &icmpv6(136))));
        let mut tagged = frame(PEER, VM, ETH_P_8021Q, &[0, 10]);
        tagged.extend_from_slice(&ETH_P_ARP.to_be_bytes());
        tagged.extend_from_slice(&[0; 28]);
        assert!(peers_learn_from(&tagged));
        // Unicast data, ICMPv6 echo, truncated frames: rewritten like data.
        assert!(!peers_learn_from(&frame(PEER, VM, 0x0800, &ipv4)));
        assert!(!peers_learn_from(&frame(
            PEER,
            VM,
            ETH_P_IPV6,
            &icmpv6(128)
        )));
        assert!(!peers_learn_from(&frame(
            PEER,
            VM,
            ETH_P_IPV6,
            &[0x60, 0, 0]
        )));
        assert!(!peers_learn_from(&[2, 0, 0]));
    }

    #[test]
    fn replies_to_a_member_mac_go_back_to_the_vm_behind_it() {
        let macs = [M0, M1];
        let mut r = MacRewrite::default();
        let out_frame = frame(PEER, VM, 0x0800, &[0x45; 40]);
        r.on_rewritten_send(1, &out_frame);
        let mut wire = Vec::new();
        rewrite(&out_frame, &M1, &mut wire);
        assert_eq!(&wire[6..12], &M1);
        assert_eq!(&wire[12..], &out_frame[12..]);

        let mut reply = frame(M1, PEER, 0x0800, &[0x45; 40]);
        assert_eq!(r.on_recv(1, &mut reply, &macs, Some(0)), Inbound::Restored);
        assert_eq!(&reply[..6], &VM);
        // The same reply flooded onto the primary is a duplicate.
        let mut flooded = frame(M1, PEER, 0x0800, &[0x45; 40]);
        assert_eq!(r.on_recv(0, &mut flooded, &macs, Some(0)), Inbound::NotOurs);
        // Another peer never talked to through member 1: the host's, not the switch's.
        let mut other = frame(M1, [2, 0, 0, 0, 0, 8], 0x0800, &[0x45; 40]);
        assert_eq!(r.on_recv(1, &mut other, &macs, Some(0)), Inbound::NotOurs);
        // To the VM, or to the primary's MAC: untouched.
        let mut to_vm = frame(VM, PEER, 0x0800, &[0x45; 40]);
        assert_eq!(r.on_recv(0, &mut to_vm, &macs, Some(0)), Inbound::Pass);
        let mut to_primary = frame(M0, PEER, 0x0800, &[0x45; 40]);
        assert_eq!(r.on_recv(0, &mut to_primary, &macs, Some(0)), Inbound::Pass);
        // Truncated frames pass (the switch's parser refuses them).
        assert_eq!(r.on_recv(1, &mut [2, 0xee], &macs, Some(0)), Inbound::Pass);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut r = MacRewrite::default();
        for i in 0..(PEERS as u32 * 3) {
            let b = i.to_be_bytes();
            let f = frame([2, 0, b[0], b[1], b[2], b[3]], VM, 0x0800, &[]);
            r.on_rewritten_send(1, &f);
            assert!(r.peers.len() <= PEERS);
        }
    }
}
