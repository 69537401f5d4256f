//! Switches as vireod's objects, and the protocol between vireod and a switch's process.
//!
//! Process model: each switch runs in its own process, `vireo-switch`, started and supervised
//! by vireod like a VM's worker, and left running when vireod exits or dies — so VM traffic
//! keeps flowing across a vireod restart, which re-adopts the process (pid + start time in
//! `switch-proc.json`, then `Hello` on its socket). Its folder is `<state>/switches/<id>/`:
//! - `switch.json` (vireod, before spawning): the [`SwitchLaunch`] the process builds from.
//! - `switch-proc.json` (vireod, after spawning): [`SwitchRecord`].
//! - `switch.sock` (the process): control, one JSON object per line each way, requests carry
//!   `version` ([`SWITCH_PROTOCOL_VERSION`]), strictly request/response in turn.
//! - `ports/<port-id>.sock` (the process): one vhost-user-net socket per VM NIC port; the VM's
//!   worker connects its virtio-net frontend there. The socket outlives VM runs: a restarted VM
//!   reconnects to the same socket and gets a fresh backend session.
//! - `switch.log` (the process's stderr).
//!
//! The ports: those the switch kind implies (host TAP, uplink; created by the process itself),
//! one per VM NIC ([`PortAttach::VhostUser`]) and host interfaces added by name
//! ([`PortAttach::Interface`], e.g. a veth into a test namespace).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vireo_netconfig::{MirrorLayer, MirrorRole, PortConfig, PvlanDomain, SwitchKind};

pub const SWITCH_PROTOCOL_VERSION: u32 = 1;

/// A switch as vireod stores it and `POST /v1/switches` takes it. Its ports are not part of it:
/// VM NIC ports come from the VMs' `NicSpec`s, interface ports from `/switches/{sw}/ports`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchSpec {
    pub name: String,
    /// private | internal (host TAP) | external (uplink on a host interface).
    pub kind: SwitchKind,
    #[serde(default)]
    pub pvlan_domains: Vec<PvlanDomain>,
    /// `None`: the switch's defaults (`vireo_netconfig::SwitchConfig`).
    #[serde(default)]
    pub mac_aging_secs: Option<u64>,
    #[serde(default)]
    pub mac_table_limit: Option<usize>,
    #[serde(default)]
    pub port_mac_limit: Option<u32>,
    #[serde(default)]
    pub fast_path: Option<bool>,
    /// NIC teaming: a team of host interfaces as the switch's uplink (port [`TEAM_PORT`],
    /// `docs/teaming.md`). Only with kind `private` or `internal`: an `external` switch already
    /// has its uplink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<vireo_netconfig::TeamConfig>,
    /// Network virtualization (`docs/netvirt.md`): provider addresses, routing domains and
    /// their virtual subnets, fixed at creation. `overlay.policies` holds the entries of remote
    /// VMs, changed with `/v1/switches/{sw}/policies` (local VMs' entries come from their NICs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<vireo_netconfig::OverlayConfig>,
    /// The uplink's part in port mirroring (`PUT /v1/switches/{sw}/uplink/mirror`); `None`
    /// is no part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_mirror: Option<UplinkMirror>,
}

/// The uplink's mirror role, and for a switch with an overlay what its copies show: the
/// tunnel packets as on the provider wire (`outer`) or the customer frames in them
/// (`inner`). The destinations are the ports with the role `destination`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkMirror {
    #[serde(default)]
    pub role: MirrorRole,
    #[serde(default, skip_serializing_if = "MirrorLayer::is_outer")]
    pub overlay: MirrorLayer,
}

impl UplinkMirror {
    /// The uplink's port policy `config` with this mirror setting.
    pub fn apply(&self, config: &mut PortConfig) {
        config.mirror = self.role;
        config.mirror_overlay = self.overlay;
    }
}

/// The name of a teamed switch's uplink port (the name an external switch's uplink has too).
pub const TEAM_PORT: &str = "uplink";

/// What the switch process is started with (`switch.json`). `config.ports` is empty; the
/// ports to create are `ports`, in order, after the implied ones.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchLaunch {
    pub switch_id: Uuid,
    pub config: vireo_netconfig::SwitchConfig,
    pub ports: Vec<SwitchPort>,
    /// Applied to the uplink port ([`TEAM_PORT`]) once the ports are up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_mirror: Option<UplinkMirror>,
}

/// One port to create: its policy and what it is attached to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchPort {
    pub config: PortConfig,
    pub attach: PortAttach,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PortAttach {
    /// A VM NIC: the process serves vhost-user-net on `socket` (created by the process,
    /// replacing a stale socket file, never another kind of file).
    VhostUser { socket: PathBuf },
    /// An existing host interface (veth, TAP netdev, NIC) bound by name with AF_PACKET, in
    /// the process's network namespace.
    Interface { name: String },
    /// A team of existing host interfaces bound with AF_PACKET as one port (NIC teaming:
    /// failover, load distribution, LACP; docs/teaming.md).
    Team { team: vireo_netconfig::TeamConfig },
}

/// vireod's record of a switch process it spawned (`switch-proc.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchRecord {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`, so a reused pid is not taken for the process.
    pub start_time_ticks: u64,
    pub switch_id: Uuid,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchRequest {
    pub version: u32,
    #[serde(flatten)]
    pub op: SwitchOp,
}

impl SwitchRequest {
    pub fn new(op: SwitchOp) -> Self {
        SwitchRequest {
            version: SWITCH_PROTOCOL_VERSION,
            op,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SwitchOp {
    /// Answered with `Hello`.
    Hello,
    /// Add and attach a port (`Ok`; `Error` when the name is taken, the policy is invalid or
    /// the interface/socket cannot be opened — nothing changes then).
    AddPort { port: SwitchPort },
    /// Detach and remove the port named `name` (its socket file is removed): `Ok` or `Error`.
    RemovePort { name: String },
    /// Replace the policy of the port named `config.name`, live: the next frame sees it.
    /// `Error` (port untouched) when the switch refuses the policy.
    SetPort { config: PortConfig },
    /// The uplink's mirror setting, the rest of its policy as it is: `Ok`, or `Error` for a
    /// switch without an uplink or a setting the switch refuses.
    SetUplinkMirror { mirror: UplinkMirror },
    /// Every port with its meters: `Status`.
    Status,
    /// Zero every port's meters (`Ok`).
    ResetMeters,
    /// Detach every port, remove the sockets, exit (`Ok`, then the process exits).
    Shutdown,
    /// Network virtualization (`docs/netvirt.md`): add or move a policy-table entry — a
    /// remote VM, or one that migrated (new PA). `Ok`; `Error` on a conflict (another MAC for
    /// the CA, a CA of a local port) or when the switch has no overlay.
    SetPolicy { entry: vireo_netconfig::PolicyEntry },
    /// Remove a policy entry (`Ok` or `Error`; a local port's CAs go with the port).
    RemovePolicy {
        routing_domain: String,
        ca: std::net::IpAddr,
    },
    /// The policy table, local ports' entries included: `Policies`.
    ListPolicies,
    /// Overlay gateway (`docs/netvirt.md`, "Gateway"): add one, or replace the one of that
    /// name (a changed gateway's NAT connections end). `Ok`; `Error` when the switch refuses
    /// it (no overlay, unknown domain, a domain served twice, ...).
    SetGateway {
        gateway: vireo_netconfig::GatewayConfig,
    },
    /// Remove a gateway by name (`Ok`, or `Error` when there is none).
    RemoveGateway { name: String },
    /// The gateways with their NAT connections: `Gateways`.
    ListGateways,
    /// A VM just arrived on port `name` (live migration): send one gratuitous frame per MAC
    /// of the port (a RARP broadcast, as QEMU's announce, plus a gratuitous ARP per address
    /// the switch has seen it use) out of every other port and the uplink, so learning
    /// tables elsewhere move to this host at once. `Ok`, or `Error` for an unknown port.
    Announce { name: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum SwitchReply {
    Hello {
        version: u32,
        switch_id: Uuid,
        pid: u32,
    },
    Ok,
    Status {
        ports: Vec<PortReport>,
    },
    Policies {
        entries: Vec<vireo_netconfig::PolicyEntry>,
    },
    Gateways {
        gateways: Vec<vireo_netconfig::GatewayStatus>,
    },
    Error {
        message: String,
    },
}

/// One port as the switch sees it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortReport {
    pub config: PortConfig,
    /// `None` for the implied host/uplink ports.
    pub attach: Option<PortAttach>,
    /// A vhost-user port has a VM connected (always true for interface and implied ports).
    pub connected: bool,
    pub meters: PortMeters,
    /// MACs learned behind the port.
    pub learned_macs: Vec<vireo_netconfig::MacAddr>,
    /// A team port's members, LACP state and counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<vireo_netconfig::TeamStatus>,
}

/// A port's counters since the process started or the last `ResetMeters`. "In" is what the
/// port sent into the switch (a VM transmitting), "out" what the switch delivered to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortMeters {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Drops by reason (`vireo_vswitch::DropReason` in snake_case), only non-zero ones.
    pub drops: BTreeMap<String, u64>,
    /// Per ACL rule name: what matched it.
    pub acl: BTreeMap<String, AclMeter>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclMeter {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shapes() {
        let r = SwitchRequest::new(SwitchOp::RemovePort {
            name: "a/nic0".into(),
        });
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(line, r#"{"version":1,"op":"remove_port","name":"a/nic0"}"#);
        assert_eq!(serde_json::from_str::<SwitchRequest>(&line).unwrap(), r);
        let port = SwitchPort {
            config: PortConfig::access("veth0", 5),
            attach: PortAttach::Interface {
                name: "veth0".into(),
            },
        };
        let text = serde_json::to_string(&port.attach).unwrap();
        assert_eq!(text, r#"{"type":"interface","name":"veth0"}"#);
        assert!(serde_json::from_str::<SwitchRequest>(r#"{"version":1,"op":"explode"}"#).is_err());
        let line = r#"{"version":1,"op":"set_policy","entry":{"routing_domain":"red","ca":"10.0.0.2","mac":"02:00:00:00:00:02","vsid":5001,"pa":"192.0.2.7"}}"#;
        let SwitchOp::SetPolicy { entry } = serde_json::from_str::<SwitchRequest>(line).unwrap().op
        else {
            panic!("not set_policy")
        };
        assert_eq!(
            (entry.vsid, entry.pa.to_string()),
            (5001, "192.0.2.7".into())
        );
        let line = r#"{"version":1,"op":"remove_policy","routing_domain":"red","ca":"fd00::2"}"#;
        assert!(matches!(
            serde_json::from_str::<SwitchRequest>(line).unwrap().op,
            SwitchOp::RemovePolicy { .. }
        ));
        let spec: SwitchSpec =
            serde_json::from_str(r#"{"name":"sw","kind":{"type":"private"}}"#).unwrap();
        assert_eq!(spec.fast_path, None);
        assert_eq!(
            serde_json::to_string(&spec).unwrap(),
            r#"{"name":"sw","kind":{"type":"private"},"pvlan_domains":[],"mac_aging_secs":null,"mac_table_limit":null,"port_mac_limit":null,"fast_path":null}"#,
            "a switch without team or overlay is stored as before"
        );
        assert!(serde_json::from_str::<SwitchSpec>(
            r#"{"name":"sw","kind":{"type":"private"},"ports":[]}"#
        )
        .is_err());
    }
}
