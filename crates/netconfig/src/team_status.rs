//! A team's state and counters as the switch reports them (`TeamPort::status` in the switch,
//! the switch process's port report in the API). Plain data, here so the API needs no switch.

use serde::{Deserialize, Serialize};

use crate::{Distribution, MacAddr, TeamMode};

/// The LACP receive machine's state of one member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LacpRxState {
    /// No LACPDU yet, or the partner timed out twice: no partner.
    Defaulted,
    /// Partner information is fresh.
    Current,
    /// One timeout passed without a LACPDU; one short timeout more and it is defaulted.
    Expired,
}

/// One side's LACP information (actor or partner).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LacpPeer {
    pub system_priority: u16,
    pub system: MacAddr,
    pub key: u16,
    pub port_priority: u16,
    pub port: u16,
    /// 802.1AX state bits: 0x01 activity, 0x02 short timeout, 0x04 aggregation, 0x08 sync,
    /// 0x10 collecting, 0x20 distributing, 0x40 defaulted, 0x80 expired.
    pub state: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LacpStatus {
    pub rx_state: LacpRxState,
    pub actor: LacpPeer,
    pub partner: LacpPeer,
    pub selected: bool,
    pub pdus_rx: u64,
    pub pdus_tx: u64,
    /// Slow-protocol frames that did not decode as LACPDUs.
    pub bad_pdus: u64,
    pub partner_changes: u64,
    pub timeouts: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub link_up: bool,
    /// Carries transmit traffic now.
    pub distributing: bool,
    /// Frames received on it go into the switch.
    pub collecting: bool,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Dropped: the member is not collecting (standby, LACP not in sync) or a broadcast
    /// arrived on a switch-independent member other than the primary.
    pub rx_not_collecting: u64,
    /// Dropped: our own frames reflected back by a far end that is not an aggregate.
    pub rx_reflected: u64,
    /// Frames sent with this member's MAC as source instead of the VM's (source-MAC
    /// rewrite, non-primary members).
    #[serde(default)]
    pub tx_mac_rewritten: u64,
    /// Frames addressed to this member's MAC given back to the VM behind that peer.
    #[serde(default)]
    pub rx_mac_restored: u64,
    /// Frames addressed to a non-primary member's MAC that no VM is behind (host traffic,
    /// or a copy flooded onto another member): not passed to the switch.
    #[serde(default)]
    pub rx_member_mac: u64,
    pub link_downs: u64,
    pub lacp: Option<LacpStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamStatus {
    pub name: String,
    pub mode: TeamMode,
    pub distribution: Distribution,
    /// Source-MAC rewrite in force (`TeamConfig::rewrites_source_macs`).
    #[serde(default)]
    pub source_mac_rewrite: bool,
    pub members: Vec<MemberStatus>,
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// Frames the team could not send: no member distributing.
    pub tx_no_member: u64,
    /// Times the set of distributing members shrank.
    pub failovers: u64,
    pub flowlets: u64,
    /// Flowlets that went to another member than their flow's previous one.
    pub flowlet_moves: u64,
}
