//! The host-side ports each switch type implies: an internal switch gets a TAP for the host, an
//! external switch an uplink bound to a host interface (AF_PACKET with offload, or a TAP), plus
//! an optional host TAP. Interfaces are opened in the calling thread's network namespace.

use std::sync::Arc;

use vireo_netport::{PortError, TapPort};

use crate::config::{PortConfig, PortRole, SwitchKind, UplinkBinding};
use crate::runtime::{lock, SwitchRuntime};
use crate::switch::SwitchError;
use crate::uplink::PacketPort;
use crate::PortId;

#[derive(Debug, thiserror::Error)]
pub enum HostPortError {
    #[error("switch: {0}")]
    Switch(#[from] SwitchError),
    #[error("TAP {name}: {source}")]
    Tap { name: String, source: PortError },
    #[error("interface {name}: {source}")]
    Interface {
        name: String,
        source: std::io::Error,
    },
}

/// Port names used for the implied ports.
pub const HOST_PORT: &str = "host";
pub const UPLINK_PORT: &str = "uplink";

/// A host TAP with checksum/TSO offloads (virtio-net headers), so a VM's TCP super-frame goes
/// to the host stack as one write (docs/datapath.md, "Offloads").
fn tap(name: &str) -> Result<TapPort, HostPortError> {
    let t = TapPort::open_offload(name).map_err(|source| HostPortError::Tap {
        name: name.into(),
        source,
    })?;
    t.set_up().map_err(|source| HostPortError::Tap {
        name: name.into(),
        source,
    })?;
    Ok(t)
}

/// Adds and attaches the ports `kind` implies (none for a private switch). Returns their ids
/// (host port first). The ports start as access ports on VLAN 1; change them like any other.
pub fn attach_host_ports(
    rt: &SwitchRuntime,
    kind: &SwitchKind,
) -> Result<Vec<PortId>, HostPortError> {
    let mut ids = Vec::new();
    let host_if = match kind {
        SwitchKind::Private => None,
        SwitchKind::Internal { host_interface } => Some(host_interface.as_str()),
        SwitchKind::External { host_interface, .. } => host_interface.as_deref(),
    };
    if let Some(name) = host_if {
        let t = tap(name)?;
        let id = lock(rt.switch()).add_port(PortConfig {
            role: PortRole::Host,
            ..PortConfig::access(HOST_PORT, 1)
        })?;
        rt.attach(id, Arc::new(t));
        ids.push(id);
    }
    if let SwitchKind::External {
        interface, binding, ..
    } = kind
    {
        let cfg = PortConfig {
            role: PortRole::Uplink,
            ..PortConfig::access(UPLINK_PORT, 1)
        };
        match binding {
            UplinkBinding::AfPacket => {
                let p = PacketPort::bind_offload(interface).map_err(|source| {
                    HostPortError::Interface {
                        name: interface.clone(),
                        source,
                    }
                })?;
                let id = lock(rt.switch()).add_port(cfg)?;
                rt.attach_packet(id, Arc::new(p));
                ids.push(id);
            }
            UplinkBinding::Tap => {
                let t = tap(interface)?;
                let id = lock(rt.switch()).add_port(cfg)?;
                rt.attach(id, Arc::new(t));
                ids.push(id);
            }
        }
    }
    Ok(ids)
}
