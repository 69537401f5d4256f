//! Counters: bytes/packets per port per direction, drops per reason, per-ACL-rule meters.
//! Plain integers owned by the switch (which the runtime holds behind a mutex per batch), so
//! reading them while traffic flows is a cheap snapshot.

use serde::{Deserialize, Serialize};

/// Why the switch dropped a frame; each has its own counter per port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum DropReason {
    Malformed,
    /// Tagged frame on an access port, or a VLAN the trunk does not carry.
    VlanNotAllowed,
    /// Two or more tags on an access port (VLAN hopping).
    DoubleTagged,
    /// Destination port is outside the frame's VLAN / private-VLAN reach.
    Isolation,
    MacSpoof,
    /// Source MAC is multicast/broadcast or all zeros.
    InvalidSourceMac,
    ArpSpoof,
    NdSpoof,
    DhcpGuard,
    RouterGuard,
    AclDeny,
    RateLimit,
    StormLimit,
    MacLimit,
    ExtensionFilter,
    /// The egress port's queue was full.
    TxFull,
    /// An IP fragment a guard cannot judge: a later fragment of a datagram whose first
    /// fragment was dropped or never seen, a first fragment too short for the fields the
    /// guard reads, fragmented neighbor discovery (RFC 6980).
    FragmentGuard,
    /// Longer than the port's MTU allows (on ingress, or at the destination port), or longer
    /// than the receive buffer.
    Oversize,
    /// IPv4/IPv6 source address not among the port's allowed addresses.
    IpSourceGuard,
    /// Overlay: a tunnel packet to one of our provider addresses whose outer or tunnel
    /// header is malformed, truncated, fragmented or of the wrong encapsulation.
    OverlayMalformed,
    /// Overlay: no policy entry for the destination CA (or unknown VSID / routing domain).
    OverlayUnknown,
    /// Overlay: inner source not what the policy table says (spoofed VSID, CA, MAC or PA;
    /// an attempt to reach another tenant).
    OverlaySpoof,
    /// Overlay: the remote provider address's MAC is not resolved yet (an ARP request went
    /// out instead).
    OverlayNoNeighbor,
    /// Overlay: routed packet whose TTL / hop limit ran out.
    TtlExceeded,
    /// Overlay: the encapsulated packet would exceed the provider MTU; an ICMP "too big" /
    /// "fragmentation needed" went back to the sender instead.
    TooBig,
    /// Gateway NAT: nothing to translate — a packet to the NAT address no connection
    /// expects (or from another peer), a fragment, a protocol NAT does not carry.
    NatNoMapping,
    /// Gateway NAT: the connection table (or the outside port range) is full.
    NatTableFull,
}

impl DropReason {
    pub const COUNT: usize = 27;
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Malformed,
        DropReason::VlanNotAllowed,
        DropReason::DoubleTagged,
        DropReason::Isolation,
        DropReason::MacSpoof,
        DropReason::InvalidSourceMac,
        DropReason::ArpSpoof,
        DropReason::NdSpoof,
        DropReason::DhcpGuard,
        DropReason::RouterGuard,
        DropReason::AclDeny,
        DropReason::RateLimit,
        DropReason::StormLimit,
        DropReason::MacLimit,
        DropReason::ExtensionFilter,
        DropReason::TxFull,
        DropReason::FragmentGuard,
        DropReason::Oversize,
        DropReason::IpSourceGuard,
        DropReason::OverlayMalformed,
        DropReason::OverlayUnknown,
        DropReason::OverlaySpoof,
        DropReason::OverlayNoNeighbor,
        DropReason::TtlExceeded,
        DropReason::TooBig,
        DropReason::NatNoMapping,
        DropReason::NatTableFull,
    ];
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl Counter {
    #[inline]
    pub fn add(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }
}

/// Counters of one port. `ingress` counts frames the port sent into the switch, `egress`
/// frames the switch delivered to it (mirror copies included).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortMeters {
    pub ingress: Counter,
    pub egress: Counter,
    pub drops: [u64; DropReason::COUNT],
    /// One counter per ACL rule of the port, in configuration order (every action counts).
    pub acl: Vec<Counter>,
}

impl PortMeters {
    pub fn new(acl_rules: usize) -> Self {
        PortMeters {
            acl: vec![Counter::default(); acl_rules],
            ..Default::default()
        }
    }
    #[inline]
    pub fn drop(&mut self, r: DropReason) {
        self.drops[r as usize] += 1;
    }
    pub fn drops_for(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
    pub fn reset(&mut self) {
        let n = self.acl.len();
        *self = PortMeters::new(n);
    }
}

/// A serialisable snapshot of one port's meters, for status output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterSnapshot {
    pub ingress: Counter,
    pub egress: Counter,
    pub drops: Vec<(DropReason, u64)>,
    pub acl: Vec<(String, Counter)>,
}
