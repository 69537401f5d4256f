//! The kernel state of the fast path: which flows are installed on which netdev, their tc
//! filters and counters, the socket filters that hide them from the switch, and the clsact
//! qdiscs we created (removed again on cleanup).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vireo_netport::FramePort;

use super::checks::Check;
use super::ebpf::{self, TagAction};
use super::netlink::{self, Classifier, FilterId, Netlink};
use super::sockfilter::{classifier, socket_filter_with, FlowMatch};
use super::tunnel::{tunnel_checks, tunnel_classifier};
use super::{current_netns, FlowKey, FlowUse};
use crate::frame::ETH_P_IPV6;
use crate::uplink::PacketPort;
use crate::PortId;

/// Flows per ingress port at most (each adds a tc filter and 9 socket-filter instructions).
pub const MAX_FLOWS_PER_PORT: usize = 256;
/// tc priorities of our filters, one per protocol (a tc priority holds one protocol).
const PRIO_IPV4: u16 = 0xc000;
const PRIO_IPV6: u16 = 0xc001;
/// Tagged flows: tc classifies a frame whose tag is in the skb metadata by the tag's TPID,
/// not by the EtherType inside (which the program tests).
const PRIO_VLAN: u16 = 0xc002;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_HLEN: u64 = 14;

#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error("netlink: {0}")]
    Netlink(#[from] io::Error),
    #[error("{0} flows already offloaded from this port")]
    TooManyFlows(usize),
    #[error("socket filter: {0}")]
    SocketFilter(io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Qdisc {
    /// Not looked at yet.
    Unknown,
    /// We created the clsact qdisc (and delete it on cleanup).
    Ours,
    /// It was there before us: only our filters are ours.
    Theirs,
}

struct Dev {
    ifindex: u32,
    packet: Arc<PacketPort>,
    qdisc: Qdisc,
}

struct Installed {
    key: FlowKey,
    generation: u64,
    ifindex: u32,
    filter: FilterId,
    packets: u64,
    bytes: u64,
}

pub struct Engine {
    nl: Option<Netlink>,
    devs: HashMap<PortId, Dev>,
    flows: Vec<Installed>,
    next_handle: u32,
    generation: Arc<AtomicU64>,
    /// The network namespace our netlink socket talks to (inode).
    netns: u64,
    /// Netdevs whose root qdisc is our `tbf`, with its rate (see [`super::Shape`]).
    shaped: HashMap<u32, super::Shape>,
}

/// The tc priority and protocol of a flow's filter.
fn prio_of(k: &FlowKey) -> (u16, u16) {
    if k.tag.is_some() {
        (PRIO_VLAN, ETH_P_8021Q)
    } else if k.ethertype == ETH_P_IPV6 {
        (PRIO_IPV6, ETH_P_IPV6)
    } else {
        (PRIO_IPV4, k.ethertype)
    }
}

fn matcher(k: &FlowKey) -> FlowMatch {
    FlowMatch {
        ethertype: k.ethertype,
        src: k.src,
        dst: k.dst,
        tag: k.tag,
        l4: k.l4,
    }
}

impl Engine {
    /// `generation` is the switch's offload generation counter.
    /// Opens the netlink socket in the calling thread's network namespace: only ports bound
    /// in that namespace are offloaded.
    pub fn new(generation: Arc<AtomicU64>) -> Engine {
        Engine {
            netns: current_netns(),
            nl: Netlink::open().ok(),
            devs: HashMap::new(),
            flows: Vec::new(),
            next_handle: 1,
            generation,
            shaped: HashMap::new(),
        }
    }

    fn nl(&mut self) -> io::Result<&mut Netlink> {
        self.nl
            .as_mut()
            .ok_or_else(|| io::Error::other("no netlink socket"))
    }

    /// A port the kernel may forward from and to. A port bound in another network namespace
    /// is refused (its ifindex means another device here): it stays on the user-space path.
    pub fn register(&mut self, id: PortId, packet: Arc<PacketPort>) -> io::Result<()> {
        if packet.netns() == 0 || packet.netns() != self.netns {
            return Err(io::Error::other(format!(
                "{} is bound in another network namespace: not offloaded",
                FramePort::name(&*packet)
            )));
        }
        let ifindex = packet.ifindex();
        self.devs.insert(
            id,
            Dev {
                ifindex,
                packet,
                qdisc: Qdisc::Unknown,
            },
        );
        Ok(())
    }

    pub fn flows(&self) -> Vec<FlowKey> {
        self.flows.iter().map(|f| f.key).collect()
    }

    /// Makes sure the port's netdev has a clsact qdisc and none of our filters left over
    /// from an earlier run that did not clean up.
    fn prepare(&mut self, id: PortId) -> io::Result<u32> {
        let dev = self.devs.get(&id).ok_or(io::ErrorKind::NotFound)?;
        let (ifindex, state) = (dev.ifindex, dev.qdisc);
        if state != Qdisc::Unknown {
            return Ok(ifindex);
        }
        let nl = self.nl()?;
        let state = match nl.request(&netlink::add_clsact(ifindex)) {
            Ok(()) => Qdisc::Ours,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                for (prio, protocol) in [
                    (PRIO_IPV4, 0x0800),
                    (PRIO_IPV6, ETH_P_IPV6),
                    (PRIO_VLAN, ETH_P_8021Q),
                ] {
                    let id = FilterId {
                        prio,
                        protocol,
                        handle: 0,
                    };
                    // Nothing there is the usual answer (ENOENT/EINVAL).
                    let _ = nl.request(&netlink::del_filter(ifindex, id));
                }
                Qdisc::Theirs
            }
            Err(e) => return Err(e),
        };
        if let Some(d) = self.devs.get_mut(&id) {
            d.qdisc = state;
        }
        Ok(ifindex)
    }

    /// Installs a flow approved under `generation`: the tc filter first, then the socket
    /// filter that hides its frames from the switch. Returns whether it was installed (a
    /// stale generation, an unknown port or an installed flow are not errors).
    pub fn install(&mut self, key: FlowKey, generation: u64) -> Result<bool, FastPathError> {
        // Checked under the engine lock, which every invalidation also takes after bumping the
        // generation: a flow is either refused here or removed by that invalidation.
        if generation != self.generation.load(Ordering::SeqCst)
            || self.flows.iter().any(|f| f.key == key)
            || !self.devs.contains_key(&key.egress)
        {
            return Ok(false);
        }
        let Some(out) = self.devs.get(&key.egress).map(|d| d.ifindex) else {
            return Ok(false);
        };
        let n = self
            .flows
            .iter()
            .filter(|f| f.key.ingress == key.ingress)
            .count();
        if n >= MAX_FLOWS_PER_PORT {
            return Err(FastPathError::TooManyFlows(n));
        }
        if !self.devs.contains_key(&key.ingress) {
            return Ok(false);
        }
        let ifindex = self.prepare(key.ingress)?;
        if let Some(shape) = key.shape {
            self.shape(out, shape)?;
        }
        let (prio, protocol) = prio_of(&key);
        let filter = FilterId {
            prio,
            protocol,
            handle: self.next_handle,
        };
        self.next_handle = self.next_handle.wrapping_add(1).max(1);
        let m = matcher(&key);
        if let Some(t) = &key.tunnel {
            let prog = ebpf::load(&tunnel_classifier(&tunnel_checks(&m, t), t), "vireo_tunnel")?;
            use std::os::fd::AsRawFd;
            self.nl()?.request(&netlink::add_redirect_filter(
                ifindex,
                filter,
                Classifier::Ebpf(prog.as_raw_fd()),
                out,
            ))?;
        } else if key.action == TagAction::Keep {
            let prog = classifier(&m);
            self.nl()?.request(&netlink::add_redirect_filter(
                ifindex,
                filter,
                Classifier::Classic(&prog),
                out,
            ))?;
        } else {
            // Tag push/pop needs eBPF helpers; the filter holds the program, our fd closes.
            let prog = ebpf::load(
                &ebpf::classifier(&super::checks::checks(&m), key.action),
                "vireo_flow",
            )?;
            use std::os::fd::AsRawFd;
            self.nl()?.request(&netlink::add_redirect_filter(
                ifindex,
                filter,
                Classifier::Ebpf(prog.as_raw_fd()),
                out,
            ))?;
        }
        self.flows.push(Installed {
            key,
            generation,
            ifindex,
            filter,
            packets: 0,
            bytes: 0,
        });
        if let Err(e) = self.refresh_socket_filter(key.ingress) {
            let _ = self.remove(|f| f.key == key);
            return Err(FastPathError::SocketFilter(e));
        }
        Ok(true)
    }

    /// Puts a `tbf` with `shape` at the root of `ifindex` unless it is there already. Its
    /// queue holds 20 ms at the rate (at least 64 KiB): TCP sees delay before drops.
    fn shape(&mut self, ifindex: u32, shape: super::Shape) -> io::Result<()> {
        if self.shaped.get(&ifindex) == Some(&shape) {
            return Ok(());
        }
        let limit = (shape.bytes_per_sec / 50).clamp(64 << 10, u32::MAX as u64) as u32;
        self.nl()?.request(&netlink::replace_tbf(
            ifindex,
            shape.bytes_per_sec,
            shape.burst,
            limit.max(shape.burst),
        ))?;
        self.shaped.insert(ifindex, shape);
        Ok(())
    }

    /// Removes our `tbf` from netdevs no installed flow is shaped on any more.
    fn unshape_unused(&mut self) {
        let unused: Vec<u32> = self
            .shaped
            .keys()
            .copied()
            .filter(|i| {
                !self.flows.iter().any(|f| {
                    f.key.shape.is_some()
                        && self.devs.get(&f.key.egress).map(|d| d.ifindex) == Some(*i)
                })
            })
            .collect();
        for i in unused {
            self.shaped.remove(&i);
            if let Ok(nl) = self.nl() {
                if let Err(e) = nl.request(&netlink::del_tbf(i)) {
                    if e.raw_os_error() != Some(libc::ENOENT) {
                        eprintln!("vswitch fast path: removing the tbf of ifindex {i}: {e}");
                    }
                }
            }
        }
    }

    /// Rebuilds the socket filter of an ingress port from its installed flows.
    fn refresh_socket_filter(&self, port: PortId) -> io::Result<()> {
        let Some(dev) = self.devs.get(&port) else {
            return Ok(());
        };
        let mine = || self.flows.iter().filter(|f| f.key.ingress == port);
        let flows: Vec<FlowMatch> = mine()
            .filter(|f| f.key.tunnel.is_none())
            .map(|f| matcher(&f.key))
            .collect();
        let lists: Vec<Vec<Check>> = mine()
            .filter_map(|f| Some(tunnel_checks(&matcher(&f.key), f.key.tunnel.as_ref()?)))
            .collect();
        if flows.is_empty() && lists.is_empty() {
            return dev.packet.clear_filter();
        }
        let prog = socket_filter_with(&flows, &lists)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "too many flows"))?;
        dev.packet.set_filter(&prog)
    }

    /// Reads the counters of every installed flow; returns what each carried since the last
    /// read (flows that carried nothing are left out).
    pub fn poll(&mut self) -> Vec<FlowUse> {
        let mut ifindexes: Vec<u32> = self.flows.iter().map(|f| f.ifindex).collect();
        ifindexes.sort_unstable();
        ifindexes.dedup();
        let mut out = Vec::new();
        for ifindex in ifindexes {
            let Ok(nl) = self.nl() else {
                return out;
            };
            let Ok(msgs) = nl.dump(&netlink::dump_filters(ifindex)) else {
                continue;
            };
            for st in msgs.iter().filter_map(|m| netlink::parse_filter(m)) {
                let Some(id) = st.id.filter(|_| st.ours && st.ifindex == ifindex as i32) else {
                    continue;
                };
                let Some(f) = self
                    .flows
                    .iter_mut()
                    .find(|f| f.ifindex == ifindex && f.filter == id)
                else {
                    continue;
                };
                let packets = st.packets.saturating_sub(f.packets);
                let bytes = st.bytes.saturating_sub(f.bytes);
                f.packets = f.packets.max(st.packets);
                f.bytes = f.bytes.max(st.bytes);
                // tc counts a tunnel flow's frames as they arrived (outer headers included
                // for decap) and a super-frame whose headers the program changed as no
                // packet at all (bpf_skb_adjust_room resets its segment count): the
                // segments are then estimated from the bytes, at least one per full frame.
                let (packets, strip) = match f.key.tunnel {
                    Some(t) => (
                        packets.max(bytes.div_ceil(t.arrived_ip_max().max(1))),
                        (-t.growth()).max(0) as u64,
                    ),
                    None => (packets, 0),
                };
                if packets > 0 {
                    // The meters count customer frames.
                    out.push(FlowUse {
                        key: f.key,
                        packets,
                        bytes: (bytes + packets * ETH_HLEN).saturating_sub(packets * strip),
                    });
                }
            }
        }
        out
    }

    /// Removes the flows `pred` selects (tc filters first, so the kernel stops forwarding
    /// them before the switch sees their frames again) and returns their last traffic.
    fn remove(&mut self, pred: impl Fn(&Installed) -> bool) -> Vec<FlowUse> {
        if !self.flows.iter().any(&pred) {
            return Vec::new();
        }
        let uses: Vec<FlowUse> = self
            .poll()
            .into_iter()
            .filter(|u| self.flows.iter().any(|f| f.key == u.key && pred(f)))
            .collect();
        let (gone, kept): (Vec<Installed>, Vec<Installed>) =
            std::mem::take(&mut self.flows).into_iter().partition(&pred);
        self.flows = kept;
        if let Ok(nl) = self.nl() {
            for f in &gone {
                if let Err(e) = nl.request(&netlink::del_filter(f.ifindex, f.filter)) {
                    if e.raw_os_error() != Some(libc::ENOENT) {
                        eprintln!("vswitch fast path: removing filter {:?}: {e}", f.filter);
                    }
                }
            }
        }
        let mut ports: Vec<PortId> = gone.iter().map(|f| f.key.ingress).collect();
        ports.sort_unstable();
        ports.dedup();
        for p in ports {
            if let Err(e) = self.refresh_socket_filter(p) {
                eprintln!("vswitch fast path: socket filter of port {}: {e}", p.0);
            }
        }
        self.unshape_unused();
        uses
    }

    pub fn purge_all(&mut self) -> Vec<FlowUse> {
        self.remove(|_| true)
    }

    /// Removes flows approved under an older generation.
    pub fn purge_stale(&mut self) -> Vec<FlowUse> {
        let g = self.generation.load(Ordering::SeqCst);
        self.remove(|f| f.generation != g)
    }

    /// Forgets a port: its flows in both directions, its socket filter, and the clsact qdisc
    /// if we created it.
    pub fn unregister(&mut self, id: PortId) -> Vec<FlowUse> {
        let uses = self.remove(|f| f.key.ingress == id || f.key.egress == id);
        if let Some(dev) = self.devs.remove(&id) {
            let _ = dev.packet.clear_filter();
            if dev.qdisc == Qdisc::Ours {
                if let Ok(nl) = self.nl() {
                    let _ = nl.request(&netlink::del_clsact(dev.ifindex));
                }
            }
        }
        uses
    }

    pub fn shutdown(&mut self) -> Vec<FlowUse> {
        let ids: Vec<PortId> = self.devs.keys().copied().collect();
        ids.into_iter().flat_map(|id| self.unregister(id)).collect()
    }
}
