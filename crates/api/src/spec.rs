//! `VmSpec`: a VM's configuration as data. The worker turns it into devices; the store keeps it
//! as JSON. Versioned by its `version` field (only [`SPEC_VERSION`] exists today); unknown fields
//! are refused so a typo never silently becomes a default.
//!
//! The stored spec is *normalized*: every NIC has its MAC and every disk its serial filled in
//! (generated once at create/update if the request left them out), so they travel with their
//! entry when other NICs or disks are added or removed. See `identity.rs`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use vireo_netconfig::{
    AclRule, GuardConfig, MirrorRole, PortConfig, PortRole, QosConfig, VlanConfig,
};

use crate::mac::MacAddr;

/// The one spec version this code reads and writes.
pub const SPEC_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub version: u32,
    pub name: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// Absolute path of the guest kernel (ELF/PVH or bzImage).
    pub kernel: PathBuf,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// Bytes of recent COM1 output kept for `vireo vm console --log`.
    #[serde(default = "default_console_ring")]
    pub console_ring_bytes: u32,
    #[serde(default)]
    pub auto_start: AutoStart,
    /// Hyper-V's automatic checkpoints: vireod checkpoints the VM before each risky operation
    /// (docs/checkpoints.md, "Automatic checkpoints"). Off unless asked for.
    #[serde(default)]
    pub auto_checkpoint: AutoCheckpoint,
    /// A line written to COM1 to ask the guest to power off (`vireo vm stop`): `POWEROFF` for
    /// the probe guest, `poweroff` for a guest with a root shell on ttyS0. Vireo has no ACPI
    /// power button yet, so without one a stop waits for the guest to power off by itself
    /// until its timeout, then turns the VM off.
    #[serde(default)]
    pub shutdown_line: Option<String>,
}

fn default_console_ring() -> u32 {
    64 * 1024
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Absolute path of the image.
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// `None`: detect from the file.
    #[serde(default)]
    pub format: Option<DiskFormat>,
    /// The virtio-blk serial (≤ 20 bytes). Generated once if left out.
    #[serde(default)]
    pub serial: Option<String>,
    /// Storage QoS (Hyper-V 2012 R2): the most IOPS the guest gets from this disk, normalized
    /// to 8 KiB ([`normalized_ios`]). Requests beyond it are delayed, never failed. `None`: no
    /// limit.
    #[serde(default)]
    pub max_iops: Option<u32>,
    /// Storage QoS: the IOPS (normalized to 8 KiB) this disk should get while the guest asks
    /// for them. Not a reservation: a disk that had requests waiting but got fewer over a
    /// measurement window raises a "minimum IOPS not met" alert (counted in the worker's
    /// metrics, logged). `None`: no alert.
    #[serde(default)]
    pub min_iops: Option<u32>,
    /// virtio-blk request queues (VIRTIO_BLK_F_MQ), each served by its own host thread.
    /// `None`: one per vCPU. A disk with storage QoS has one queue whatever this says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
}

/// Bytes one normalized IO stands for (storage QoS counts in 8 KiB IOs, as Hyper-V does).
pub const NORMALIZED_IO_BYTES: u64 = 8192;

/// The normalized IOs a data transfer of `bytes` counts as: one per started 8 KiB, at least
/// one (a 512-byte read is one IO, a 64 KiB write eight).
pub fn normalized_ios(bytes: u64) -> u64 {
    bytes.div_ceil(NORMALIZED_IO_BYTES).max(1)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Vhd,
    Vhdx,
}

/// A VM network adapter: a virtio-net NIC whose port is on a vireod switch (over vhost-user).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// The switch the NIC's port is on.
    pub switch: String,
    /// The NIC's name within its VM (`nic0`, `nic1`, ...: the lowest free one is generated once
    /// if left out). Its port on the switch is named `<vm>/<nic>`.
    #[serde(default)]
    pub name: Option<String>,
    /// Generated once (locally administered unicast) if left out.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Shortcut for an access port on this VLAN (`policy.vlan` gives trunk and private VLAN
    /// modes; setting both is refused). Neither: access port on VLAN 1.
    #[serde(default)]
    pub vlan: Option<u16>,
    /// The port's policies on the switch; changed live while the VM runs.
    #[serde(default)]
    pub policy: NicPolicy,
    /// Network virtualization: the virtual subnet the NIC belongs to and its customer
    /// addresses (the switch must have an overlay with that subnet). Its frames are then
    /// switched by the overlay, and its policy entries come from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_subnet: Option<NicVirtualSubnet>,
    /// Multiqueue: virtio-net queue pairs (1 to [`crate::validate::MAX_NIC_QUEUE_PAIRS`]); the guest
    /// turns on the ones past the first, and the switch spreads received flows over them.
    /// `None`: one pair. Hardware: changed only while the VM is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
}

/// A VM NIC's membership in a virtual subnet (`vireo_netconfig::PortOverlay` without what the
/// switch knows: the routing domain follows from the VSID, the MAC is the NIC's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicVirtualSubnet {
    /// The virtual subnet's 24-bit id (1 to 16777215).
    pub vsid: u32,
    /// The VM's customer addresses (CAs) in it, at least one.
    pub ca: Vec<std::net::IpAddr>,
}

/// A VM NIC's port policy: `vireo_netconfig::PortConfig` without what vireod derives (the
/// port's name, its role `vm`, and its MAC list — the NIC's MAC, so the MAC spoofing guard is
/// on unless `guard.mac_spoofing` allows it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicPolicy {
    #[serde(default)]
    pub vlan: Option<VlanConfig>,
    #[serde(default)]
    pub guard: GuardConfig,
    #[serde(default)]
    pub acls: Vec<AclRule>,
    #[serde(default)]
    pub qos: QosConfig,
    #[serde(default)]
    pub mirror: MirrorRole,
    #[serde(default)]
    pub storm_limit_pps: Option<u32>,
    #[serde(default)]
    pub mac_limit: Option<u32>,
    #[serde(default)]
    pub mtu: Option<u32>,
}

impl NicSpec {
    /// The switch port this NIC stands for, named `port_name`. `vlan` and `policy.vlan` both
    /// set is a validation error (`validate_spec`); here `policy.vlan` wins.
    pub fn port_config(&self, port_name: &str) -> PortConfig {
        let p = &self.policy;
        PortConfig {
            name: port_name.to_string(),
            role: PortRole::Vm,
            vlan: p.vlan.clone().unwrap_or(VlanConfig::Access {
                vid: self.vlan.unwrap_or(1),
            }),
            macs: self
                .mac
                .map(|m| vec![vireo_netconfig::MacAddr(m.0)])
                .unwrap_or_default(),
            guard: p.guard.clone(),
            acls: p.acls.clone(),
            qos: p.qos.clone(),
            mirror: p.mirror,
            // VM ports mirror their customer frames; the layer concerns uplinks.
            mirror_overlay: Default::default(),
            storm_limit_pps: p.storm_limit_pps,
            mac_limit: p.mac_limit,
            mtu: p.mtu,
            // Needs the switch's routing domains: vireod fills it in (`port_overlay`).
            overlay: None,
        }
    }
}

impl NicSpec {
    /// The port's overlay membership, given the routing domain that holds its VSID (`None`
    /// without a virtual subnet or a MAC).
    pub fn port_overlay(&self, routing_domain: &str) -> Option<vireo_netconfig::PortOverlay> {
        let v = self.virtual_subnet.as_ref()?;
        Some(vireo_netconfig::PortOverlay {
            routing_domain: routing_domain.to_owned(),
            vsid: v.vsid,
            mac: vireo_netconfig::MacAddr(self.mac?.0),
            cas: v.ca.clone(),
        })
    }
}

/// Hyper-V's automatic start action: start with the daemon, after a delay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoStart {
    pub enabled: bool,
    #[serde(default)]
    pub delay_secs: u32,
}

/// `VmSpec::auto_checkpoint`: take a checkpoint before each risky operation, keep the newest
/// `keep` of those (older automatic ones are deleted; a user's checkpoints never are).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoCheckpoint {
    pub enabled: bool,
    #[serde(default = "default_auto_checkpoint_keep")]
    pub keep: u32,
}

/// As many as a user undoing the last few risky steps needs, without a chain of differencing
/// disks growing with every `vm set`.
pub const DEFAULT_AUTO_CHECKPOINT_KEEP: u32 = 3;
/// One is the least that still protects the next operation; more than this is a long chain of
/// differencing disks under the VM's every read.
pub const MAX_AUTO_CHECKPOINT_KEEP: u32 = 64;

fn default_auto_checkpoint_keep() -> u32 {
    DEFAULT_AUTO_CHECKPOINT_KEEP
}

impl Default for AutoCheckpoint {
    fn default() -> Self {
        Self {
            enabled: false,
            keep: DEFAULT_AUTO_CHECKPOINT_KEEP,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_json_gets_defaults_and_unknown_fields_are_refused() {
        let spec: VmSpec = serde_json::from_str(
            r#"{"version":1,"name":"a","vcpus":1,"memory_bytes":33554432,"kernel":"/k"}"#,
        )
        .unwrap();
        assert_eq!(spec.console_ring_bytes, 64 * 1024);
        assert!(!spec.auto_start.enabled);
        let err = serde_json::from_str::<VmSpec>(
            r#"{"version":1,"name":"a","vcpus":1,"memory_bytes":33554432,"kernel":"/k","vcpu":2}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = serde_json::from_str::<NicSpec>(r#"{"switch":"s","vlan":3,"trunk":[1]}"#);
        assert!(err.is_err());
        let disk: DiskSpec = serde_json::from_str(r#"{"path":"/d.vhdx","format":"vhdx"}"#).unwrap();
        assert_eq!(disk.format, Some(DiskFormat::Vhdx));
        assert!(serde_json::from_str::<DiskSpec>(r#"{"path":"/d","format":"qcow2"}"#).is_err());
        assert_eq!((disk.max_iops, disk.min_iops), (None, None));
        let disk: DiskSpec =
            serde_json::from_str(r#"{"path":"/d","max_iops":500,"min_iops":100}"#).unwrap();
        assert_eq!((disk.max_iops, disk.min_iops), (Some(500), Some(100)));
        assert!(serde_json::from_str::<DiskSpec>(r#"{"path":"/d","max_iops":-1}"#).is_err());
    }

    #[test]
    fn normalized_ios_count_started_8k_blocks() {
        let cases = [
            (0, 1),
            (512, 1),
            (8192, 1),
            (8193, 2),
            (16 * 512, 1),
            (65536, 8),
        ];
        for (bytes, ios) in cases {
            assert_eq!(normalized_ios(bytes), ios, "{bytes} bytes");
        }
        assert_eq!(normalized_ios(512 << 10), 64);
    }
}
