//! NIC teaming of a switch's external port: which host interfaces form the team, how they
//! agree with the physical switch (mode) and how frames are spread over them (distribution).
//! Validation lives here so vireod, the CLI and the switch reject the same things.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Most members a team takes (Hyper-V/Windows LBFO allows 32).
pub const MAX_TEAM_MEMBERS: usize = 32;

/// A team of host interfaces acting as one uplink.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeamConfig {
    /// Host interface names (AF_PACKET), 1 to [`MAX_TEAM_MEMBERS`].
    pub members: Vec<String>,
    #[serde(default)]
    pub mode: TeamMode,
    #[serde(default)]
    pub distribution: Distribution,
    /// Switch-independent only: this member carries traffic only when no other is up.
    #[serde(default)]
    pub standby: Option<String>,
    /// LACP only: the rate we ask the partner to send LACPDUs at (our timeout bit).
    #[serde(default)]
    pub lacp_rate: LacpRate,
    /// LACP system priority (lower wins when the two ends disagree about aggregation).
    #[serde(default = "default_system_priority")]
    pub system_priority: u16,
    /// Dynamic distribution: a flow idle this long (µs) may move to the least-loaded member.
    /// It must exceed the delay skew between members (their queues), or a moved burst
    /// overtakes the previous one and TCP sees reordering: measured here with 1 Gbit/s tbf
    /// members, 0.5 ms gave 1.15x aggregation (thousands of moves), 5 ms 1.57x, 25 ms 2.06x.
    #[serde(default = "default_flowlet_gap_us")]
    pub flowlet_gap_us: u32,
    /// Switch-independent teams with address-hash or dynamic distribution: frames a
    /// non-primary member sends carry that member's MAC as source, and what peers learn
    /// from (ARP, ND, broadcast/multicast) leaves by the primary with the VM's MAC, so the
    /// physical switch sees each VM MAC on one port only (Hyper-V's rule). On by default;
    /// `false` sends every frame with the VM's MAC on whichever member carries it. Ignored
    /// in other modes and with `hyper_v_port` (a VM's frames use one member there).
    #[serde(default = "default_source_mac_rewrite")]
    pub source_mac_rewrite: bool,
}

fn default_source_mac_rewrite() -> bool {
    true
}

fn default_system_priority() -> u16 {
    32768
}
fn default_flowlet_gap_us() -> u32 {
    25_000
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeamMode {
    /// The physical switch knows nothing: members are separate ports to it (active/standby
    /// when `standby` is set, all-active otherwise).
    #[default]
    SwitchIndependent,
    /// A static aggregate configured on the physical switch: all up members active.
    Static,
    /// IEEE 802.1AX link aggregation negotiated per member with LACPDUs.
    Lacp,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distribution {
    /// Hash of source and destination MAC.
    AddressHashL2,
    /// Hash of source and destination IP (MACs for non-IP).
    AddressHashL3,
    /// Hash of IPs and TCP/UDP ports (falls back to L3, then L2).
    AddressHashL4,
    /// One member per source MAC, i.e. per VM network adapter (Hyper-V port).
    HyperVPort,
    /// L4 flows cut into flowlets at gaps of `flowlet_gap_us`; each flowlet goes to the
    /// least-loaded member.
    #[default]
    Dynamic,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LacpRate {
    /// LACPDUs every second, partner timed out after 3 s.
    #[default]
    Fast,
    /// Every 30 s, timeout 90 s.
    Slow,
}

/// Why a team configuration was refused; each names the offending value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TeamConfigError {
    NoMembers,
    TooManyMembers(usize),
    BadInterfaceName(String),
    DuplicateMember(String),
    StandbyNotMember(String),
    StandbyNeedsSwitchIndependent(TeamMode),
    StandbyIsOnlyMember(String),
    FlowletGap(u32),
}

impl fmt::Display for TeamConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMembers => write!(f, "a team needs at least one member interface"),
            Self::TooManyMembers(n) => {
                write!(f, "a team takes at most {MAX_TEAM_MEMBERS} members, not {n}")
            }
            Self::BadInterfaceName(n) => write!(
                f,
                "team member {n:?} is not a valid interface name (1-15 characters, no '/', ':' or spaces)"
            ),
            Self::DuplicateMember(n) => write!(f, "team member {n:?} is listed twice"),
            Self::StandbyNotMember(n) => write!(f, "standby member {n:?} is not in the team"),
            Self::StandbyNeedsSwitchIndependent(m) => write!(
                f,
                "a standby member needs mode switch_independent, not {m:?} (the partner switch decides for static and LACP teams)"
            ),
            Self::StandbyIsOnlyMember(n) => write!(
                f,
                "standby member {n:?} is the team's only member; add an active one"
            ),
            Self::FlowletGap(g) => write!(
                f,
                "flowlet gap {g} µs is out of range; use 10 to 1000000"
            ),
        }
    }
}

impl std::error::Error for TeamConfigError {}

/// What the kernel accepts as a network interface name (`dev_valid_name`).
pub fn valid_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() < 16
        && n != "."
        && n != ".."
        && !n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

impl TeamConfig {
    /// A switch-independent, dynamic team of `members` with defaults elsewhere.
    pub fn new(members: &[&str]) -> Self {
        TeamConfig {
            members: members.iter().map(|m| m.to_string()).collect(),
            mode: TeamMode::default(),
            distribution: Distribution::default(),
            standby: None,
            lacp_rate: LacpRate::default(),
            system_priority: default_system_priority(),
            flowlet_gap_us: default_flowlet_gap_us(),
            source_mac_rewrite: default_source_mac_rewrite(),
        }
    }

    /// Whether the team rewrites source MACs (see `source_mac_rewrite`): asked for, and a
    /// switch-independent team whose distribution spreads one VM over several members.
    pub fn rewrites_source_macs(&self) -> bool {
        self.source_mac_rewrite
            && self.mode == TeamMode::SwitchIndependent
            && self.distribution != Distribution::HyperVPort
    }

    pub fn validate(&self) -> Result<(), TeamConfigError> {
        if self.members.is_empty() {
            return Err(TeamConfigError::NoMembers);
        }
        if self.members.len() > MAX_TEAM_MEMBERS {
            return Err(TeamConfigError::TooManyMembers(self.members.len()));
        }
        let mut seen = HashSet::new();
        for m in &self.members {
            if !valid_ifname(m) {
                return Err(TeamConfigError::BadInterfaceName(m.clone()));
            }
            if !seen.insert(m.as_str()) {
                return Err(TeamConfigError::DuplicateMember(m.clone()));
            }
        }
        if let Some(s) = &self.standby {
            if !seen.contains(s.as_str()) {
                return Err(TeamConfigError::StandbyNotMember(s.clone()));
            }
            if self.mode != TeamMode::SwitchIndependent {
                return Err(TeamConfigError::StandbyNeedsSwitchIndependent(self.mode));
            }
            if self.members.len() == 1 {
                return Err(TeamConfigError::StandbyIsOnlyMember(s.clone()));
            }
        }
        if !(10..=1_000_000).contains(&self.flowlet_gap_us) {
            return Err(TeamConfigError::FlowletGap(self.flowlet_gap_us));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_with_clear_errors() {
        assert!(TeamConfig::new(&["eth1", "eth2"]).validate().is_ok());
        assert_eq!(
            TeamConfig::new(&[]).validate(),
            Err(TeamConfigError::NoMembers)
        );
        let many: Vec<String> = (0..33).map(|i| format!("e{i}")).collect();
        let many: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            TeamConfig::new(&many).validate(),
            Err(TeamConfigError::TooManyMembers(33))
        );
        assert!(matches!(
            TeamConfig::new(&["eth1", "eth1"]).validate(),
            Err(TeamConfigError::DuplicateMember(_))
        ));
        for bad in ["", "a/b", "a b", "sixteen-chars-xx", ".."] {
            assert!(matches!(
                TeamConfig::new(&[bad]).validate(),
                Err(TeamConfigError::BadInterfaceName(_))
            ));
        }
        let mut c = TeamConfig::new(&["eth1", "eth2"]);
        c.standby = Some("eth3".into());
        assert!(matches!(
            c.validate(),
            Err(TeamConfigError::StandbyNotMember(_))
        ));
        c.standby = Some("eth2".into());
        c.mode = TeamMode::Lacp;
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("switch_independent"), "{e}");
        c.mode = TeamMode::SwitchIndependent;
        c.flowlet_gap_us = 0;
        assert_eq!(c.validate(), Err(TeamConfigError::FlowletGap(0)));
    }

    #[test]
    fn json_round_trips_with_defaults() {
        let c: TeamConfig = serde_json::from_str(
            r#"{"members":["a","b"],"mode":"lacp","distribution":"address_hash_l4"}"#,
        )
        .unwrap();
        assert_eq!(c.mode, TeamMode::Lacp);
        assert_eq!(c.distribution, Distribution::AddressHashL4);
        assert_eq!(c.lacp_rate, LacpRate::Fast);
        assert_eq!(c.flowlet_gap_us, 25_000);
        let back: TeamConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(serde_json::from_str::<TeamConfig>(r#"{"members":["a"],"mode":"bond"}"#).is_err());
    }
}
