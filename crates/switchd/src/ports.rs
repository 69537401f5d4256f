//! The running switch and what each of its ports is attached to. Every change goes through
//! [`Ports`] one at a time (the server holds it behind a mutex); a change that is refused
//! leaves the switch, its attachments and the files as they were.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vireo_api::switch::{PortAttach, PortReport, SwitchPort, UplinkMirror, TEAM_PORT};
use vireo_vswitch::runtime::{lock, SwitchRuntime};
use vireo_vswitch::team::TeamPort;
use vireo_vswitch::uplink::PacketPort;
use vireo_vswitch::vhost_user::{VhostUserPort, VhostUserServer};
use vireo_vswitch::{MacAddr, PortConfig, PortId, Switch, SwitchConfig, SwitchKind};

use crate::error::SwitchdError;
use crate::files;
use crate::meters::port_meters;

/// What a port's frames come from and go to.
enum Link {
    /// The host TAP or uplink the switch kind implies.
    Implied,
    /// A host interface bound with AF_PACKET.
    Interface,
    /// A team of host interfaces (its status is the port report's `team`).
    Team(Arc<TeamPort>),
    /// A VM NIC served over vhost-user.
    VhostUser {
        port: Arc<VhostUserPort>,
        server: VhostUserServer,
    },
}

struct Attached {
    id: PortId,
    attach: Option<PortAttach>,
    link: Link,
}

/// The switch runtime with its ports, by name.
pub struct Ports {
    rt: SwitchRuntime,
    /// Relative vhost-user socket paths are taken from here (the switch's folder).
    dir: PathBuf,
    /// Interfaces the switch kind uses (host TAP, uplink): never bound a second time.
    implied_ifaces: Vec<String>,
    ports: BTreeMap<String, Attached>,
}

impl Ports {
    /// Starts the switch of `config` (which must list no ports) with the ports its kind
    /// implies, in the calling thread's network namespace.
    pub fn start(config: SwitchConfig, dir: &Path) -> Result<Ports, SwitchdError> {
        if !config.ports.is_empty() {
            return Err(SwitchdError::LaunchConfigPorts(config.ports.len()));
        }
        let implied_ifaces = match &config.kind {
            SwitchKind::Private => Vec::new(),
            SwitchKind::Internal { host_interface } => vec![host_interface.clone()],
            SwitchKind::External {
                interface,
                host_interface,
                ..
            } => std::iter::once(interface.clone())
                .chain(host_interface.clone())
                .collect(),
        };
        let kind = config.kind.clone();
        let switch = Arc::new(Mutex::new(Switch::new(config)?));
        let rt = SwitchRuntime::start(switch).map_err(SwitchdError::Runtime)?;
        let ids = vireo_vswitch::host::attach_host_ports(&rt, &kind)?;
        let mut ports = BTreeMap::new();
        for id in ids {
            if let Some(st) = lock(rt.switch()).status(id) {
                ports.insert(
                    st.config.name,
                    Attached {
                        id,
                        attach: None,
                        link: Link::Implied,
                    },
                );
            }
        }
        Ok(Ports {
            rt,
            dir: dir.to_path_buf(),
            implied_ifaces,
            ports,
        })
    }

    fn socket_path(&self, socket: &Path) -> PathBuf {
        self.dir.join(socket)
    }

    /// Adds the port and attaches it. The policy (and the name) is checked first; then the
    /// interface or socket is opened, and if that fails the port goes again.
    pub fn add(&mut self, port: SwitchPort) -> Result<(), SwitchdError> {
        let name = port.config.name.clone();
        let id = lock(self.rt.switch()).add_port(port.config)?;
        match self.attach(id, &name, &port.attach) {
            Ok(link) => {
                tracing::info!("port {name:?} added ({})", describe(&port.attach));
                self.ports.insert(
                    name,
                    Attached {
                        id,
                        attach: Some(port.attach),
                        link,
                    },
                );
                Ok(())
            }
            Err(e) => {
                let _ = lock(self.rt.switch()).remove_port(id);
                Err(e)
            }
        }
    }

    fn attach(&self, id: PortId, name: &str, attach: &PortAttach) -> Result<Link, SwitchdError> {
        match attach {
            PortAttach::Interface { name: iface } => {
                self.check_free(iface)?;
                // With virtio-net headers, as the library binds uplinks: TCP crosses as
                // super-frames and checksums need not be complete.
                let p =
                    PacketPort::bind_offload(iface).map_err(|source| SwitchdError::Interface {
                        name: iface.clone(),
                        source,
                    })?;
                self.rt.attach_packet(id, Arc::new(p));
                Ok(Link::Interface)
            }
            PortAttach::Team { team } => {
                for m in &team.members {
                    self.check_free(m)?;
                }
                let t = TeamPort::new(name, team.clone()).map_err(|source| SwitchdError::Team {
                    port: name.to_string(),
                    source,
                })?;
                let t = Arc::new(t);
                self.rt.attach(id, t.clone());
                Ok(Link::Team(t))
            }
            PortAttach::VhostUser { socket } => {
                let path = self.socket_path(socket);
                let taken = self.ports.iter().find(|(_, a)| {
                    matches!(&a.attach, Some(PortAttach::VhostUser { socket })
                        if self.socket_path(socket) == path)
                });
                if let Some((port, _)) = taken {
                    return Err(SwitchdError::SocketTaken {
                        path,
                        port: port.clone(),
                    });
                }
                let made = make_parent(&path)?;
                let served = files::clear_stale(&path).and_then(|()| {
                    let (port, server) =
                        VhostUserServer::listen(&path, name).map_err(|source| {
                            SwitchdError::Socket {
                                path: path.clone(),
                                source,
                            }
                        })?;
                    // Dropping the server on failure removes the socket again.
                    files::make_private(&path)?;
                    Ok((port, server))
                });
                let (port, server) = match served {
                    Ok(s) => s,
                    Err(e) => {
                        // A folder made for this socket goes again (only if still empty).
                        if let Some(dir) = made {
                            let _ = std::fs::remove_dir(dir);
                        }
                        return Err(e);
                    }
                };
                self.rt.attach(id, port.clone());
                Ok(Link::VhostUser { port, server })
            }
        }
    }

    /// Detaches and removes the port (its vhost-user socket goes too).
    pub fn remove(&mut self, name: &str) -> Result<(), SwitchdError> {
        let a = self
            .ports
            .get(name)
            .ok_or_else(|| SwitchdError::NoSuchPort(name.into()))?;
        if matches!(a.link, Link::Implied) {
            return Err(SwitchdError::ImpliedPort(name.into()));
        }
        lock(self.rt.switch()).remove_port(a.id)?;
        let Some(a) = self.ports.remove(name) else {
            return Ok(());
        };
        self.detach(a);
        tracing::info!("port {name:?} removed");
        Ok(())
    }

    /// Refuses a host interface another port (interface or team member) or the switch's own
    /// host/uplink port already has.
    fn check_free(&self, iface: &str) -> Result<(), SwitchdError> {
        let taken = self.ports.iter().find(|(_, a)| match &a.attach {
            Some(PortAttach::Interface { name }) => name == iface,
            Some(PortAttach::Team { team }) => team.members.iter().any(|m| m == iface),
            _ => false,
        });
        if let Some((port, _)) = taken {
            return Err(SwitchdError::InterfaceTaken {
                name: iface.to_string(),
                port: port.clone(),
            });
        }
        if self.implied_ifaces.iter().any(|i| i == iface) {
            return Err(SwitchdError::InterfaceTaken {
                name: iface.to_string(),
                port: "the switch's own host or uplink port".into(),
            });
        }
        Ok(())
    }

    fn detach(&self, a: Attached) {
        self.rt.detach(a.id);
        if let Link::VhostUser { server, .. } = a.link {
            let path = server.socket().to_path_buf();
            if let Err(e) = server.stop() {
                tracing::warn!("vhost-user socket {}: {e}", path.display());
            }
            files::remove_socket(&path);
        }
    }

    /// Replaces the policy of port `config.name`, live.
    /// The uplink's ([`TEAM_PORT`]) mirror setting, the rest of its policy as it is.
    pub fn set_uplink_mirror(&mut self, m: &UplinkMirror) -> Result<(), SwitchdError> {
        let mut config = self
            .status()
            .into_iter()
            .map(|r| r.config)
            .find(|c| c.name == TEAM_PORT)
            .ok_or_else(|| SwitchdError::NoSuchPort(TEAM_PORT.into()))?;
        m.apply(&mut config);
        self.set(config)
    }

    pub fn set(&mut self, config: PortConfig) -> Result<(), SwitchdError> {
        let a = self
            .ports
            .get(&config.name)
            .ok_or_else(|| SwitchdError::NoSuchPort(config.name.clone()))?;
        lock(self.rt.switch()).set_port_config(a.id, config)?;
        Ok(())
    }

    /// Announces the port (`SwitchOp::Announce`, `vireo_vswitch::announce`): a RARP per MAC
    /// and a gratuitous ARP per address of its ARP guard's list, run through the pipeline as
    /// if the port had sent them, so they go out of every other port and the uplink in its
    /// VLAN, under its guards and ACLs, and the local table learns its MACs. A port in a
    /// virtual subnet instead tells each peer VM of its subnet its CAs (unicast ARP replies /
    /// NAs the overlay tunnels to the peers' hosts). Returns how many frames were sent (0 for
    /// a port with no MAC configured or learned yet, or an overlay port without peers).
    pub fn announce(&self, name: &str) -> Result<usize, SwitchdError> {
        let a = self
            .ports
            .get(name)
            .ok_or_else(|| SwitchdError::NoSuchPort(name.into()))?;
        let frames = {
            let sw = lock(self.rt.switch());
            let cfg = sw
                .status(a.id)
                .map(|st| st.config)
                .ok_or_else(|| SwitchdError::NoSuchPort(name.into()))?;
            match (&cfg.overlay, sw.overlay()) {
                (Some(p), Some(o)) => {
                    let peers =
                        o.subnet_peers(p.vsid, p.mac.0, vireo_vswitch::announce::MAX_OVERLAY_PEERS);
                    vireo_vswitch::announce::overlay_frames(p, &peers)
                }
                _ => vireo_vswitch::announce::announce_frames(&cfg, &sw.learned_macs(a.id)),
            }
        };
        let n = frames.len();
        if n > 0 {
            self.rt.inject(a.id, frames);
        }
        Ok(n)
    }

    /// Every port with its meters, in port-id order.
    pub fn status(&self) -> Vec<PortReport> {
        let sw = lock(self.rt.switch());
        let mut out = Vec::new();
        for &id in sw.ports() {
            let Some(st) = sw.status(id) else { continue };
            let a = self.ports.get(&st.config.name);
            let connected = match a.map(|a| &a.link) {
                Some(Link::VhostUser { port, .. }) => port.connected(),
                _ => true,
            };
            let team = match a.map(|a| &a.link) {
                Some(Link::Team(t)) => Some(t.status()),
                _ => None,
            };
            out.push(PortReport {
                team,
                meters: port_meters(&st.meters),
                attach: a.and_then(|a| a.attach.clone()),
                connected,
                learned_macs: sw.learned_macs(id).into_iter().map(MacAddr).collect(),
                config: st.config,
            });
        }
        out
    }

    pub fn reset_meters(&self) {
        lock(self.rt.switch()).reset_meters();
    }

    /// Overlay policy table: add or move an entry (applies to the next frame).
    pub fn set_policy(&self, e: &vireo_vswitch::PolicyEntry) -> Result<(), SwitchdError> {
        Ok(lock(self.rt.switch()).set_policy(e)?)
    }

    pub fn remove_policy(&self, rd: &str, ca: std::net::IpAddr) -> Result<(), SwitchdError> {
        Ok(lock(self.rt.switch()).remove_policy(rd, ca)?)
    }

    /// Every policy entry (empty without an overlay).
    pub fn policies(&self) -> Vec<vireo_vswitch::PolicyEntry> {
        lock(self.rt.switch())
            .overlay()
            .map(|o| o.policies().into_iter().map(|(e, _)| e).collect())
            .unwrap_or_default()
    }

    /// Overlay gateway: add or replace (by name).
    pub fn set_gateway(&self, g: vireo_vswitch::GatewayConfig) -> Result<(), SwitchdError> {
        Ok(lock(self.rt.switch()).set_gateway(g)?)
    }

    pub fn remove_gateway(&self, name: &str) -> Result<(), SwitchdError> {
        Ok(lock(self.rt.switch()).remove_gateway(name)?)
    }

    /// The gateways with their NAT connections (empty without an overlay).
    pub fn gateways(&self) -> Vec<vireo_vswitch::GatewayStatus> {
        lock(self.rt.switch())
            .overlay()
            .map(|o| o.gateways())
            .unwrap_or_default()
    }

    /// Detaches every port, removes the vhost-user sockets and stops the switch thread.
    pub fn shutdown(mut self) {
        for (_, a) in std::mem::take(&mut self.ports) {
            self.detach(a);
        }
        if let Err(e) = self.rt.stop() {
            tracing::warn!("the switch thread ended with an error: {e}");
        }
    }
}

/// Creates the socket's folder (owner-only, like the sockets it will hold) when it is missing;
/// returns it if it was made here.
fn make_parent(socket: &Path) -> Result<Option<PathBuf>, SwitchdError> {
    let Some(parent) = socket.parent() else {
        return Ok(None);
    };
    if parent.as_os_str().is_empty() || parent.exists() {
        return Ok(None);
    }
    let mut d = std::fs::DirBuilder::new();
    std::os::unix::fs::DirBuilderExt::mode(&mut d, 0o700);
    d.create(parent).map_err(|source| SwitchdError::Socket {
        path: socket.to_path_buf(),
        source,
    })?;
    Ok(Some(parent.to_path_buf()))
}

fn describe(a: &PortAttach) -> String {
    match a {
        PortAttach::VhostUser { socket } => format!("vhost-user on {}", socket.display()),
        PortAttach::Interface { name } => format!("interface {name}"),
        PortAttach::Team { team } => {
            format!("team of {} ({:?})", team.members.join(","), team.mode)
        }
    }
}
