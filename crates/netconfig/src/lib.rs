//! The virtual switch's persistent, serde-typed configuration: what vireod stores, what the API
//! and the CLI carry, and what `vireo_vswitch::Switch::new` / `set_port_config` accept (they
//! validate it). A crate of its own so that the API types need no switch runtime.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod gateway;
mod overlay;
pub use gateway::*;
pub use overlay::*;

/// A MAC address's six bytes.
pub type Mac = [u8; 6];

/// A MAC address written `02:00:00:00:00:01` in configuration files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub Mac);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut m = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut m {
            let p = parts
                .next()
                .ok_or_else(|| format!("bad MAC address {s:?}"))?;
            *b = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC address {s:?}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("bad MAC address {s:?}"));
        }
        Ok(MacAddr(m))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

/// An IPv4 or IPv6 prefix written `10.0.0.0/24` or `fd00::/64` (a bare address means /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl IpPrefix {
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("prefix length {len} exceeds {max}"));
        }
        Ok(IpPrefix { addr, len })
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for IpPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("bad IP address in {s:?}"))?;
        let len = match l {
            Some(l) => l
                .parse()
                .map_err(|_| format!("bad prefix length in {s:?}"))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        IpPrefix::new(addr, len)
    }
}

impl TryFrom<String> for IpPrefix {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<IpPrefix> for String {
    fn from(p: IpPrefix) -> String {
        p.to_string()
    }
}

/// Whole-switch configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwitchConfig {
    pub name: String,
    pub kind: SwitchKind,
    /// Private VLAN domains: which secondary VLANs belong to which primary.
    #[serde(default)]
    pub pvlan_domains: Vec<PvlanDomain>,
    /// Seconds a learned MAC stays without being seen again.
    #[serde(default = "default_aging")]
    pub mac_aging_secs: u64,
    /// Capacity of the whole learning table (entries). When it is full, a port with fewer
    /// stations takes the oldest entry of the port holding the most (see `table.rs`).
    #[serde(default = "default_table_limit")]
    pub mac_table_limit: usize,
    /// MACs learned behind each VM or host port unless the port sets its own `mac_limit`;
    /// uplinks (a whole LAN behind them) are bounded only by the table. New source MACs
    /// beyond the limit drop (`mac_limit`), as port security does.
    #[serde(default = "default_port_mac_limit")]
    pub port_mac_limit: u32,
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    /// Let the kernel forward TCP flows the pipeline approved between AF_PACKET ports (tc
    /// redirect, see `fastpath`); off keeps every frame on the user-space path.
    #[serde(default = "default_fast_path")]
    pub fast_path: bool,
    /// Network virtualization (tenant overlays over VXLAN/NVGRE, `docs/netvirt.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<OverlayConfig>,
}

fn default_fast_path() -> bool {
    true
}

fn default_aging() -> u64 {
    300
}
/// Four times Open vSwitch's default of 2,048: room for an external switch on a busy LAN,
/// small enough that a full table costs well under a megabyte and a scan stays cheap.
pub const DEFAULT_MAC_TABLE_LIMIT: usize = 8192;
/// A VM with nested containers or a few virtual NICs fits; a flooding VM fills an eighth of
/// the table at most.
pub const DEFAULT_PORT_MAC_LIMIT: u32 = 1024;

fn default_table_limit() -> usize {
    DEFAULT_MAC_TABLE_LIMIT
}
fn default_port_mac_limit() -> u32 {
    DEFAULT_PORT_MAC_LIMIT
}

impl SwitchConfig {
    pub fn private(name: &str) -> Self {
        SwitchConfig {
            name: name.to_string(),
            kind: SwitchKind::Private,
            pvlan_domains: Vec::new(),
            mac_aging_secs: default_aging(),
            mac_table_limit: default_table_limit(),
            port_mac_limit: default_port_mac_limit(),
            ports: Vec::new(),
            fast_path: default_fast_path(),
            overlay: None,
        }
    }
}

/// Hyper-V's three switch types.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum SwitchKind {
    /// VMs only.
    Private,
    /// VMs plus the host through a TAP or veth interface named `host_interface`.
    Internal { host_interface: String },
    /// Bound to a host interface (a NIC through AF_PACKET, or a TAP/veth).
    External {
        interface: String,
        #[serde(default)]
        binding: UplinkBinding,
        /// Also give the host a port on the switch (an internal TAP/veth named here).
        #[serde(default)]
        host_interface: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UplinkBinding {
    #[default]
    AfPacket,
    Tap,
}

/// A private VLAN: one primary VLAN with at most one isolated and any number of community
/// secondary VLANs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvlanDomain {
    pub primary: u16,
    #[serde(default)]
    pub isolated: Option<u16>,
    #[serde(default)]
    pub communities: Vec<u16>,
}

/// What is on the other side of a port; guards for DHCP servers and routers apply to VM ports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortRole {
    #[default]
    Vm,
    Host,
    Uplink,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum VlanConfig {
    /// Frames on the wire are untagged; inside the switch they belong to `vid`.
    Access { vid: u16 },
    /// Tagged frames for `allowed` VLANs; untagged frames belong to `native` if set.
    Trunk {
        allowed: Vec<u16>,
        #[serde(default)]
        native: Option<u16>,
    },
    /// A private-VLAN access port of the domain whose primary is `primary`.
    Private {
        primary: u16,
        secondary: u16,
        mode: PvlanMode,
    },
}

impl Default for VlanConfig {
    fn default() -> Self {
        VlanConfig::Access { vid: 1 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PvlanMode {
    Isolated,
    Community,
    /// `secondary` is ignored: a promiscuous port talks to every secondary of its primary.
    Promiscuous,
}

/// Direction of traffic as the switch sees it: `Ingress` enters the switch from the port
/// (a VM sending), `Egress` leaves the switch to the port (a VM receiving).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Ingress,
    Egress,
    Both,
}

impl Direction {
    pub fn covers(self, d: Direction) -> bool {
        self == Direction::Both || self == d
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardConfig {
    /// Allow frames whose source MAC is not one of the port's `macs`.
    #[serde(default)]
    pub mac_spoofing: bool,
    /// Enforce `allowed_ipv4`/`allowed_ipv6` on ARP and neighbor discovery.
    #[serde(default)]
    pub arp_nd_guard: bool,
    #[serde(default)]
    pub allowed_ipv4: Vec<Ipv4Addr>,
    #[serde(default)]
    pub allowed_ipv6: Vec<Ipv6Addr>,
    /// This VM port may send DHCP server messages.
    #[serde(default)]
    pub dhcp_server_allowed: bool,
    /// This VM port may send router advertisements and redirects.
    #[serde(default)]
    pub router_allowed: bool,
    /// Drop IPv4/IPv6 packets whose source address is not in `allowed_ipv4`/`allowed_ipv6`
    /// (see `source_guard.rs` for the sources a host needs before it has an address).
    #[serde(default)]
    pub ip_source_guard: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AclAction {
    Allow,
    Deny,
    /// Count matching traffic (in the rule's meter) and keep evaluating.
    Meter,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// One ACL entry. "Local" is the port's side of the conversation, "remote" the other side.
/// Rules are evaluated by ascending `priority`; the first allow/deny match decides; when none
/// matches the frame is allowed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclRule {
    pub name: String,
    #[serde(default)]
    pub priority: u16,
    pub direction: Direction,
    pub action: AclAction,
    #[serde(default)]
    pub local_mac: Option<MacAddr>,
    #[serde(default)]
    pub remote_mac: Option<MacAddr>,
    #[serde(default)]
    pub local_ip: Option<IpPrefix>,
    #[serde(default)]
    pub remote_ip: Option<IpPrefix>,
    #[serde(default)]
    pub protocol: Option<u8>,
    #[serde(default)]
    pub local_ports: Option<PortRange>,
    #[serde(default)]
    pub remote_ports: Option<PortRange>,
    /// For an ingress allow rule: also allow the replies of flows it lets out.
    #[serde(default)]
    pub stateful: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    pub bits_per_sec: u64,
    pub burst_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosConfig {
    #[serde(default)]
    pub max_ingress: Option<RateLimit>,
    #[serde(default)]
    pub max_egress: Option<RateLimit>,
    /// Relative share of a congested uplink (Hyper-V's minimum bandwidth weight).
    #[serde(default = "default_weight")]
    pub min_weight: u32,
}

fn default_weight() -> u32 {
    1
}

impl Default for QosConfig {
    fn default() -> Self {
        QosConfig {
            max_ingress: None,
            max_egress: None,
            min_weight: 1,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MirrorRole {
    #[default]
    None,
    /// Copies of this port's traffic in the given direction go to every destination port.
    Source(Direction),
    Destination,
}

/// What a mirror copy of an overlay switch's uplink traffic shows (`docs/vswitch.md`,
/// "Mirroring"): the packet as it is on the provider wire, or the customer frame inside it.
/// VM ports of a virtual subnet always mirror their customer frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MirrorLayer {
    /// The tunnel packet (outer Ethernet, IP, VXLAN/NVGRE headers) as sent or received.
    #[default]
    Outer,
    /// The customer frame carried in the tunnel, as the VM ports' policies see it.
    Inner,
}

impl MirrorLayer {
    pub fn is_outer(&self) -> bool {
        *self == MirrorLayer::Outer
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortConfig {
    pub name: String,
    #[serde(default)]
    pub role: PortRole,
    #[serde(default)]
    pub vlan: VlanConfig,
    /// The port's own MAC(s); the spoofing guard applies only when this is non-empty.
    #[serde(default)]
    pub macs: Vec<MacAddr>,
    #[serde(default)]
    pub guard: GuardConfig,
    #[serde(default)]
    pub acls: Vec<AclRule>,
    #[serde(default)]
    pub qos: QosConfig,
    #[serde(default)]
    pub mirror: MirrorRole,
    /// For the uplink of a switch with an overlay: whether its mirror copies show the tunnel
    /// packets or the customer frames in them.
    #[serde(default, skip_serializing_if = "MirrorLayer::is_outer")]
    pub mirror_overlay: MirrorLayer,
    /// Broadcast + multicast frames per second accepted from this port.
    #[serde(default)]
    pub storm_limit_pps: Option<u32>,
    /// Most MACs the switch learns behind this port (MAC-flood protection); overrides
    /// `SwitchConfig::port_mac_limit`.
    #[serde(default)]
    pub mac_limit: Option<u32>,
    /// Largest IP packet (bytes after the Ethernet header and its VLAN tags) the port takes
    /// in or gets delivered; larger frames drop (`oversize`). Default [`DEFAULT_MTU`].
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Membership of a VM port in a virtual subnet (the switch's `overlay` must define it):
    /// its frames are switched by the overlay, never by the L2 table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<PortOverlay>,
}

/// The largest frame a port moves, bytes (`vireo_netport::MAX_FRAME`; the switch's tests check
/// the two agree).
pub const MAX_FRAME: u32 = 9216;

/// The default MTU: a jumbo frame of [`MAX_FRAME`] bytes with one VLAN tag.
pub const DEFAULT_MTU: u32 = MAX_FRAME - 18;

impl PortConfig {
    /// The MTU in force (`mtu` or [`DEFAULT_MTU`]).
    pub fn mtu(&self) -> usize {
        self.mtu.unwrap_or(DEFAULT_MTU) as usize
    }
}

impl PortConfig {
    pub fn access(name: &str, vid: u16) -> Self {
        PortConfig {
            name: name.to_string(),
            vlan: VlanConfig::Access { vid },
            ..Default::default()
        }
    }
}

mod team;
pub use team::{
    valid_ifname, Distribution, LacpRate, TeamConfig, TeamConfigError, TeamMode, MAX_TEAM_MEMBERS,
};

mod team_status;
pub use team_status::{LacpPeer, LacpRxState, LacpStatus, MemberStatus, TeamStatus};
