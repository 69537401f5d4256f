//! Property: whatever the cut points, order, repetitions and omissions, the fragments of a
//! guarded message (DHCP offer, DHCPv6 reply, RA, ICMP redirect, NA) sent from a guarded port
//! never let a receiver reassemble it. Precisely, for every fragment of the datagram's id:
//! - the guarded first fragment is never delivered;
//! - a later fragment processed after the guarded first fragment is never delivered;
//! - a later fragment is delivered only after a harmless first fragment of the same
//!   datagram (the attacker's decoy, which the receiver would then reassemble with: its
//!   header, not the guarded one, is what the receiver sees) was delivered, and never when it
//!   overlaps that first fragment's judged headers (the first 16 bytes of the upper layer).
//!
//! So without a decoy nothing of the datagram is delivered at all. Interleaved, an ordinary
//! datagram's fragments from the same port (in order) are all delivered: the guard does not
//! meet the property by dropping everything.

use crate::fragbuild;

use fragbuild::guest::*;
use fragbuild::*;
use proptest::prelude::*;
use vireo_vswitch::*;

/// (guarded message, a harmless message with the same addresses and protocol, IPv6?)
fn messages(kind: u8, size: usize) -> (Vec<u8>, Vec<u8>, bool) {
    let (v4, v6) = (VM4, vm6());
    match kind {
        0 => (
            udp4(VM, BCAST, v4, [255; 4], (67, 68), &bootp(2, 2, size)),
            udp4(VM, BCAST, v4, [255; 4], (68, 67), &bootp(1, 3, size)),
            false,
        ),
        1 => {
            let mut reply = vec![0u8; size];
            reply[0] = 7;
            let mut solicit = vec![0u8; size];
            solicit[0] = 1;
            (
                udp6(VM, ALL_NODES_MAC, v6, all_nodes(), (547, 546), &reply),
                udp6(VM, ALL_NODES_MAC, v6, all_nodes(), (546, 547), &solicit),
                true,
            )
        }
        2 => (
            icmp6(VM, ALL_NODES_MAC, v6, all_nodes(), 134, &vec![0; size]),
            icmp6(VM, ALL_NODES_MAC, v6, all_nodes(), 128, &vec![0; size]),
            true,
        ),
        3 => (
            icmp4(VM, BCAST, v4, PEER4, 5, &vec![0; size]),
            icmp4(VM, BCAST, v4, PEER4, 8, &vec![0; size]),
            false,
        ),
        _ => {
            // An NA for the port's own address: fine whole, never as fragments.
            let mut body = vm6().to_vec();
            body.resize(size, 0);
            (
                icmp6(VM, ALL_NODES_MAC, v6, all_nodes(), 136, &body),
                icmp6(VM, ALL_NODES_MAC, v6, all_nodes(), 128, &body),
                true,
            )
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Piece {
    /// Fragment `i` of the guarded datagram (0 is its first fragment).
    Guarded(usize),
    Decoy,
    /// Fragment `i` of the ordinary datagram.
    Ordinary(usize),
}

fn switch() -> (Switch, PortId) {
    let mut sw = Switch::new(SwitchConfig::private("p")).unwrap();
    let vm = guarded_vm("vm");
    let id = sw.add_port(vm).unwrap();
    sw.add_port(PortConfig::access("b", 1)).unwrap();
    (sw, id)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_fragment_sequence_delivers_a_guarded_message(
        kind in 0u8..5,
        size in 40usize..400,
        cut_units in prop::collection::vec(1usize..60, 1..12),
        hop_by_hop in any::<bool>(),
        picks in prop::collection::vec(any::<prop::sample::Index>(), 1..40),
        decoy_at in prop::option::of(any::<prop::sample::Index>()),
        ordinary_every in 2usize..6,
    ) {
        let (guarded, decoy, v6) = messages(kind, size);
        let id = 0x1234;
        let cuts: Vec<usize> = cut_units.iter().map(|u| u * 8).collect();
        let frag = |m: &[u8], id: u32, cuts: &[usize]| {
            if v6 {
                fragment6(m, id, cuts, hop_by_hop)
            } else {
                fragment4(m, id as u16, cuts)
            }
        };
        let g = frag(&guarded, id, &cuts);
        prop_assume!(g.len() > 1);
        // The decoy is a first fragment only (a later one would carry its own payload), with
        // the UDP header and DHCP type, or the ICMP header, in it.
        let d = frag(&decoy, id, &[16]).remove(0);
        let ordinary = if v6 {
            udp6(VM, ALL_NODES_MAC, vm6(), all_nodes(), (5000, 6000), &[7; 300])
        } else {
            udp4(VM, BCAST, VM4, PEER4, (5000, 6000), &[7; 300])
        };
        let ordinary = frag(&ordinary, 99, &[96, 200]);

        // The sequence: picked guarded fragments (any order, repeats, omissions), the
        // decoy at a random place, the ordinary datagram's fragments in order in between.
        let mut seq: Vec<Piece> = picks.iter().map(|i| Piece::Guarded(i.index(g.len()))).collect();
        if let Some(at) = decoy_at {
            seq.insert(at.index(seq.len() + 1), Piece::Decoy);
        }
        let mut with_ordinary = Vec::new();
        let mut next_ordinary = 0;
        for (i, p) in seq.into_iter().enumerate() {
            if i % ordinary_every == 0 && next_ordinary < ordinary.len() {
                with_ordinary.push(Piece::Ordinary(next_ordinary));
                next_ordinary += 1;
            }
            with_ordinary.push(p);
        }
        with_ordinary.extend((next_ordinary..ordinary.len()).map(Piece::Ordinary));

        let (mut sw, port) = switch();
        let mut d_out = Delivery::default();
        let (mut guarded_first_seen, mut decoy_delivered) = (false, false);
        for (step, p) in with_ordinary.iter().enumerate() {
            let mut f = match p {
                Piece::Guarded(i) => g[*i].clone(),
                Piece::Decoy => d.clone(),
                Piece::Ordinary(i) => ordinary[*i].clone(),
            };
            sw.process(port, &mut f, step as u64 * 1_000_000, &mut d_out);
            let delivered = !d_out.ports().is_empty();
            match p {
                Piece::Guarded(0) => {
                    prop_assert!(!delivered, "guarded first fragment delivered");
                    guarded_first_seen = true;
                }
                Piece::Guarded(i) => {
                    if delivered {
                        let offset = data_offset(&g[*i], v6, hop_by_hop);
                        prop_assert!(!guarded_first_seen, "fragment {i} after the first");
                        prop_assert!(decoy_delivered, "fragment {i} with no first fragment");
                        prop_assert!(offset >= JUDGED, "fragment {i} overlaps the headers");
                    }
                }
                Piece::Decoy => {
                    if guarded_first_seen {
                        prop_assert!(!delivered, "decoy reopened a blocked datagram");
                    }
                    decoy_delivered |= delivered;
                }
                Piece::Ordinary(i) => prop_assert!(delivered, "ordinary fragment {i} dropped"),
            }
        }
    }
}

/// Bytes of the upper-layer header the guards judge (no extension headers in the
/// fragmentable part here): a later fragment must not overlap them.
const JUDGED: usize = 16;

/// Where a fragment's data goes in its datagram, read back from its header.
fn data_offset(f: &[u8], v6: bool, hop_by_hop: bool) -> usize {
    let at = if !v6 {
        14 + 6
    } else if hop_by_hop {
        14 + 40 + 8 + 2
    } else {
        14 + 40 + 2
    };
    usize::from(u16::from_be_bytes([f[at], f[at + 1]]) & if v6 { 0xfff8 } else { 0x1fff })
        * if v6 { 1 } else { 8 }
}
