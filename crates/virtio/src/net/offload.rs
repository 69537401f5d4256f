//! Checksum and TSO offloads between the driver and the port: which feature bits the device
//! offers (only what its port can carry), what the driver's choice allows in each direction,
//! and whether one frame's virtio-net header stays within that. The header itself is passed
//! through unchanged; nothing here computes a checksum or cuts a segment.

use vireo_netport::{Offloads, VNET_HDR_LEN};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

/// Feature bits for what `port` carries. TSO without checksum offload means nothing (a
/// segment's checksum is always left to whoever cuts it), so it is offered only beside it.
pub(crate) fn offered(port: Offloads) -> u64 {
    if !port.csum {
        return 0;
    }
    let mut f = 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_GUEST_CSUM;
    if port.tso4 {
        f |= 1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO4;
    }
    if port.tso6 {
        f |= 1 << VIRTIO_NET_F_HOST_TSO6 | 1 << VIRTIO_NET_F_GUEST_TSO6;
    }
    f
}

/// What the driver may send (`tx`: CSUM, HOST_TSO*) and take (`rx`: GUEST_CSUM, GUEST_TSO*).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub tx: Offloads,
    pub rx: Offloads,
}

impl Negotiated {
    pub fn from_acked(acked: u64) -> Self {
        let has = |bit: u32| acked & (1 << bit) != 0;
        let side = |csum: u32, tso4: u32, tso6: u32| {
            // The spec makes the TSO bits depend on the checksum bit; a driver that accepts
            // them alone gets no TSO rather than frames it said it cannot finish.
            let csum = has(csum);
            Offloads {
                csum,
                tso4: csum && has(tso4),
                tso6: csum && has(tso6),
            }
        };
        Negotiated {
            tx: side(
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
            ),
            rx: side(
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
            ),
        }
    }

    pub fn any(o: Offloads) -> bool {
        o.csum || o.tso4 || o.tso6
    }
}

/// Whether `allowed` covers the work `hdr` asks for. Unknown GSO types (UDP, ECN) never are:
/// they are not offered.
pub(crate) fn covers(allowed: Offloads, hdr: &[u8; VNET_HDR_LEN]) -> bool {
    if hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 && !allowed.csum {
        return false;
    }
    match u32::from(hdr[1]) {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => allowed.tso4,
        VIRTIO_NET_HDR_GSO_TCPV6 => allowed.tso6,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Offloads = Offloads {
        csum: true,
        tso4: true,
        tso6: true,
    };

    #[test]
    fn offers_only_what_the_port_carries_and_reads_the_choice_back() {
        assert_eq!(offered(Offloads::default()), 0);
        let tso_without_csum = Offloads { csum: false, ..ALL };
        assert_eq!(offered(tso_without_csum), 0);
        let all = offered(ALL);
        assert_eq!(Negotiated::from_acked(all), Negotiated { tx: ALL, rx: ALL });
        let rx_tso_only = 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_CSUM;
        let n = Negotiated::from_acked(rx_tso_only);
        assert_eq!(n.rx, Offloads::default(), "TSO without GUEST_CSUM");
        assert!(n.tx.csum && !n.tx.tso4);
    }

    #[test]
    fn a_header_is_covered_only_by_the_offloads_it_uses() {
        let plain = [0u8; VNET_HDR_LEN];
        let mut csum = plain;
        csum[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        let mut tso4 = csum;
        tso4[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
        let mut udp = csum;
        udp[1] = 3;
        let mut ecn = tso4;
        ecn[1] |= 0x80;
        let csum_only = Offloads {
            csum: true,
            ..Offloads::default()
        };
        assert!(covers(Offloads::default(), &plain));
        assert!(!covers(Offloads::default(), &csum));
        assert!(covers(csum_only, &csum) && !covers(csum_only, &tso4));
        assert!(covers(ALL, &tso4));
        assert!(!covers(ALL, &udp) && !covers(ALL, &ecn));
    }
}
