//! What a switch process is started with, and the names vireod gives VM NIC ports.
//!
//! A VM NIC's port is named `<vm-id>/<nic>`: by the VM's id, not its name, so renaming a VM
//! (even a running one) leaves its ports and their sockets alone. Its vhost-user socket is
//! `<switch-dir>/ports/<first 12 hex of the vm id>-<8 hex of the NIC name's FNV-1a>.sock`:
//! short, because a Unix socket path has at most 107 bytes and both ids are already long.

use std::path::{Path, PathBuf};

use uuid::Uuid;
use vireo_api::switch::{PortAttach, SwitchLaunch, SwitchPort, SwitchSpec, TEAM_PORT};
use vireo_api::{NicSpec, Vm};
use vireo_netconfig::{PortConfig, PortRole, SwitchConfig, TeamConfig};

pub const LAUNCH: &str = "switch.json";
pub const RECORD: &str = "switch-proc.json";
pub const SOCKET: &str = "switch.sock";
pub const LOG: &str = "switch.log";
pub const PORTS: &str = "ports";

/// The name of VM `vm_id`'s NIC `nic` on its switch.
pub fn port_name(vm_id: Uuid, nic: &str) -> String {
    format!("{vm_id}/{nic}")
}

fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The socket of VM `vm_id`'s NIC `nic` on the switch whose folder is `switch_dir`.
pub fn port_socket(switch_dir: &Path, vm_id: Uuid, nic: &str) -> PathBuf {
    let id = vm_id.simple().to_string();
    switch_dir
        .join(PORTS)
        .join(format!("{}-{:08x}.sock", &id[..12], fnv1a(nic)))
}

/// The NIC's name (stored specs always have one).
pub fn nic_name(nic: &NicSpec) -> &str {
    nic.name.as_deref().unwrap_or("nic")
}

/// The routing domain of `spec`'s overlay that holds virtual subnet `vsid`.
pub fn routing_domain_of(spec: &SwitchSpec, vsid: u32) -> Option<&str> {
    let o = spec.overlay.as_ref()?;
    o.routing_domains
        .iter()
        .find(|d| d.subnets.iter().any(|s| s.vsid == vsid))
        .map(|d| d.name.as_str())
}

/// The policy of a VM NIC's port named `name` on the switch of `spec`, its virtual-subnet
/// membership included. `Err` names what the switch lacks for it.
pub fn nic_port_config(spec: &SwitchSpec, name: &str, nic: &NicSpec) -> Result<PortConfig, String> {
    let mut config = nic.port_config(name);
    if let Some(v) = &nic.virtual_subnet {
        let Some(rd) = routing_domain_of(spec, v.vsid) else {
            return Err(match spec.overlay {
                None => format!(
                    "virtual subnet {}: switch {:?} has no overlay (network virtualization is set at `vireo switch create`)",
                    v.vsid, spec.name
                ),
                Some(_) => format!(
                    "virtual subnet {} is in none of switch {:?}'s routing domains",
                    v.vsid, spec.name
                ),
            });
        };
        config.overlay = nic.port_overlay(rd);
    }
    Ok(config)
}

/// The port a VM NIC stands for on its switch (a virtual subnet the switch does not have is
/// left out here; `nic_port_config` refused it before the NIC was stored).
pub fn nic_port(spec: &SwitchSpec, switch_dir: &Path, vm_id: Uuid, nic: &NicSpec) -> SwitchPort {
    let name = port_name(vm_id, nic_name(nic));
    let config = nic_port_config(spec, &name, nic).unwrap_or_else(|_| nic.port_config(&name));
    SwitchPort {
        config,
        attach: PortAttach::VhostUser {
            socket: port_socket(switch_dir, vm_id, nic_name(nic)),
        },
    }
}

/// A teamed switch's uplink port ([`TEAM_PORT`], access VLAN 1 like an external switch's).
pub fn team_port(team: &TeamConfig) -> SwitchPort {
    SwitchPort {
        config: PortConfig {
            role: PortRole::Uplink,
            ..PortConfig::access(TEAM_PORT, 1)
        },
        attach: PortAttach::Team { team: team.clone() },
    }
}

/// An interface port as the switch creates it.
pub fn interface_port(config: &PortConfig) -> SwitchPort {
    SwitchPort {
        config: config.clone(),
        attach: PortAttach::Interface {
            name: config.name.clone(),
        },
    }
}

/// The whole-switch configuration of `spec`, without ports (the switch's defaults for what
/// the spec leaves out).
pub fn switch_config(spec: &SwitchSpec) -> SwitchConfig {
    let mut c = SwitchConfig::private(&spec.name);
    c.kind = spec.kind.clone();
    c.pvlan_domains = spec.pvlan_domains.clone();
    if let Some(v) = spec.mac_aging_secs {
        c.mac_aging_secs = v;
    }
    if let Some(v) = spec.mac_table_limit {
        c.mac_table_limit = v;
    }
    if let Some(v) = spec.port_mac_limit {
        c.port_mac_limit = v;
    }
    if let Some(v) = spec.fast_path {
        c.fast_path = v;
    }
    c.overlay = spec.overlay.clone();
    c
}

/// `switch.json`: the switch, its team uplink if it has one, one port per NIC of every VM on
/// it (in VM-name order), then the interface ports.
pub fn launch(
    id: Uuid,
    spec: &SwitchSpec,
    dir: &Path,
    vms: &[Vm],
    interfaces: &[PortConfig],
) -> SwitchLaunch {
    let mut ports: Vec<SwitchPort> = spec.team.iter().map(team_port).collect();
    for vm in vms {
        for nic in vm.spec.nics.iter().filter(|n| n.switch == spec.name) {
            ports.push(nic_port(spec, dir, vm.id(), nic));
        }
    }
    ports.extend(interfaces.iter().map(interface_port));
    SwitchLaunch {
        switch_id: id,
        config: switch_config(spec),
        ports,
        uplink_mirror: spec.uplink_mirror,
    }
}

/// Whether the switch takes `port`'s policy: compiled by `vireo_vswitch` on a throwaway
/// switch with `spec`'s private VLAN domains. `Err` is the switch's reason.
pub fn check_port(spec: &SwitchSpec, port: &PortConfig) -> Result<(), String> {
    let mut c = switch_config(spec);
    c.kind = vireo_netconfig::SwitchKind::Private;
    c.ports = vec![port.clone()];
    vireo_vswitch::Switch::new(c)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Whether the switch can be built from `spec` at all (private VLAN domains, limits).
pub fn check_switch(spec: &SwitchSpec) -> Result<(), String> {
    let mut c = switch_config(spec);
    c.kind = vireo_netconfig::SwitchKind::Private;
    vireo_vswitch::Switch::new(c)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A host interface name as Linux takes it (IFNAMSIZ): 1-15 bytes, no '/', ':' or
/// whitespace, not `.` or `..`.
pub fn check_ifname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a host interface name (1-15 bytes, no '/', ':' or spaces)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_short_and_distinct() {
        let id = Uuid::new_v4();
        let dir = Path::new("/tmp/.tmpABCDEF/switches").join(Uuid::new_v4().to_string());
        let a = port_socket(&dir, id, "nic0");
        let b = port_socket(&dir, id, "nic1");
        assert_ne!(a, b);
        assert!(a.as_os_str().len() < 100, "{}", a.display());
        assert_eq!(port_name(id, "nic0"), format!("{id}/nic0"));
    }

    #[test]
    fn policies_are_checked_by_the_switch() {
        let spec: SwitchSpec =
            serde_json::from_str(r#"{"name":"sw","kind":{"type":"private"}}"#).unwrap();
        assert!(check_port(&spec, &PortConfig::access("p", 5)).is_ok());
        let bad = check_port(&spec, &PortConfig::access("p", 4095)).unwrap_err();
        assert!(!bad.is_empty());
        assert!(check_ifname("veth0").is_ok());
        for bad in ["", "a/b", "0123456789abcdef", "a b", ".."] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
    }
}
