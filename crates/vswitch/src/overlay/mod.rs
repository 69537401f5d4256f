//! Network virtualization (issue 11): tenant routing domains of virtual subnets carried over
//! the provider network in VXLAN or NVGRE, switched and routed on the sending host from the
//! policy table. `docs/netvirt.md` is the overview.
//!
//! [`Overlay`] is pure, like the rest of the pipeline: the switch hands it a frame from a VM
//! port of a virtual subnet (after the port's ingress policies, so ACLs, guards and QoS act
//! on the customer frame) or from the uplink, and it rewrites the frame in place — answer,
//! encapsulate, decapsulate, route — and says where it goes ([`Verdict`]). The switch then
//! runs the destination port's egress policies on customer frames and delivers. State (the
//! policy table, the provider neighbour cache) lives here and is changed only through the
//! switch, under the switch's lock like every other policy.

pub mod encap;
pub mod gateway;
mod gateway6;
pub mod nat;
pub mod nat_icmp;
pub mod nd;
pub mod offload;
pub mod policy;
pub mod redirect;
pub mod relay;
pub mod reply;
pub mod wire;

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet, FxHasher};
use vireo_netconfig::{Encap, OverlayConfig, PolicyEntry, PortOverlay};

use crate::frame::{parse, FrameSummary, Mac, L3};
use crate::meter::DropReason;
use crate::PortId;
use encap::{decapsulate, encapsulate, mark_relayed, overhead, DecapError, Outer, Tunnel};
use policy::{Entry, Origin, PolicyError, PolicyTable};
use redirect::Redirect;
use relay::{NoRelay, RelayCounters, Relays};
use wire::{ipv4_header_checksum, u128_to_ip};

/// Provider neighbours remembered at most (learned ones; configured ones always fit).
const NEIGHBOR_LIMIT: usize = 4096;

/// Asked when a VM sends to a CA the table does not know (the cluster store later). The
/// answer is cached as a policy entry; `None` drops the frame (`overlay_unknown`). Called on
/// the data path under the switch lock, so it must answer from memory, quickly.
pub trait PolicyLookup: Send + Sync {
    fn lookup(&self, routing_domain: &str, ca: IpAddr) -> Option<PolicyEntry>;
}

/// Where a rewritten frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A customer frame for one local VM port.
    Port(PortId),
    /// A customer broadcast/multicast for every local port of this virtual subnet.
    Subnet(u32),
    /// A provider frame (tunnel packet or ARP) for the uplink.
    Uplink,
    /// An answer for the port the frame came from.
    Back,
}

/// The overlay's decision on one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not overlay traffic (uplink only): the L2 pipeline continues with the frame.
    Pass,
    Drop(DropReason),
    /// Absorbed (an ARP reply for us, a gratuitous ARP): nothing to send, nothing wrong.
    Consumed,
    /// Send the rewritten frame; `counted` is a drop to count for the original frame when
    /// the frame sent is an answer in its place (ICMP too big, ARP for the next hop).
    Send {
        to: Target,
        counted: Option<DropReason>,
    },
}

#[derive(Debug)]
struct Subnet {
    rd: u16,
    gw_mac: Mac,
    gw_ips: Vec<IpAddr>,
}

#[derive(Debug)]
struct PortInfo {
    rd: u16,
    vsid: u32,
    mac: Mac,
    cas: Vec<IpAddr>,
    /// The PA the table named for this VM before its port came here: the host it moved
    /// from, whose relayed packets (`relay.rs`) this port accepts.
    previous_pa: Option<IpAddr>,
}

/// The compiled overlay of one switch.
pub struct Overlay {
    cfg: OverlayConfig,
    /// Routing domains by index (the table's `rd`).
    domains: Vec<(String, Encap)>,
    subnets: FxHashMap<u32, Subnet>,
    table: PolicyTable,
    ports: FxHashMap<PortId, PortInfo>,
    local: FxHashMap<(u32, Mac), PortId>,
    neighbors: FxHashMap<IpAddr, Mac>,
    /// The configured `provider_neighbors`: never replaced by what the wire says.
    static_neighbors: FxHashSet<IpAddr>,
    /// Neighbour discovery for IPv6 PAs (`nd.rs`).
    nd: nd::NdState,
    lookup: Option<Arc<dyn PolicyLookup>>,
    /// Gateways to physical networks (`gateway.rs`), with their NAT tables.
    gateways: gateway::Gateways,
    /// The `now` of the last frame (for listings).
    clock: u64,
    /// Provider neighbours learned or changed (kernel encap flows carry a neighbour's MAC).
    neighbor_changes: u64,
    /// VMs that moved away: relays and redirects for their stale senders.
    relays: Relays,
    /// Provider frames the overlay sends on its own (redirects), for the runtime to put on
    /// the uplink after the frame that caused them.
    outbox: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("domains", &self.domains)
            .field("entries", &self.table.len())
            .finish()
    }
}

impl Overlay {
    /// Compiles a validated configuration (its `policies` enter the table).
    pub fn new(cfg: OverlayConfig) -> Result<Overlay, String> {
        cfg.validate()?;
        let mut o = Overlay {
            domains: cfg
                .routing_domains
                .iter()
                .map(|d| (d.name.clone(), d.encap))
                .collect(),
            subnets: FxHashMap::default(),
            table: PolicyTable::default(),
            ports: FxHashMap::default(),
            local: FxHashMap::default(),
            neighbors: cfg
                .provider_neighbors
                .iter()
                .map(|n| (n.ip, n.mac.0))
                .collect(),
            static_neighbors: cfg.provider_neighbors.iter().map(|n| n.ip).collect(),
            nd: nd::NdState::default(),
            lookup: None,
            gateways: gateway::Gateways::default(),
            clock: 0,
            neighbor_changes: 0,
            relays: Relays::new(
                cfg.relay_expiry_secs
                    .unwrap_or(vireo_netconfig::DEFAULT_RELAY_EXPIRY_SECS),
            ),
            outbox: Vec::new(),
            cfg,
        };
        let gws = gateway::Gateways::new(&o.cfg.gateways, |n| o.rd_index(n));
        o.gateways = gws;
        for (i, d) in o.cfg.routing_domains.iter().enumerate() {
            for s in &d.subnets {
                o.subnets.insert(
                    s.vsid,
                    Subnet {
                        rd: i as u16,
                        gw_mac: s.gateway_mac().0,
                        gw_ips: s.gateway_ips.clone(),
                    },
                );
            }
        }
        for e in o.cfg.policies.clone() {
            o.set_policy(&e).map_err(|e| e.to_string())?;
        }
        o.cfg.policies.clear();
        Ok(o)
    }

    /// The configuration with the table's policy entries (not the ports') as `policies`.
    pub fn config(&self) -> OverlayConfig {
        OverlayConfig {
            policies: self
                .policies()
                .into_iter()
                .filter(|(_, local)| !local)
                .map(|(e, _)| e)
                .collect(),
            ..self.cfg.clone()
        }
    }

    pub fn set_lookup(&mut self, hook: Option<Arc<dyn PolicyLookup>>) {
        self.lookup = hook;
    }

    fn rd_index(&self, name: &str) -> Option<u16> {
        self.domains
            .iter()
            .position(|(n, _)| n == name)
            .map(|i| i as u16)
    }

    fn is_ours(&self, ip: IpAddr) -> bool {
        self.cfg.provider_addresses.contains(&ip)
    }

    /// Adds or moves a policy entry (a remote VM, or one that moved: its new PA applies to
    /// the next frame).
    pub fn set_policy(&mut self, e: &PolicyEntry) -> Result<(), String> {
        self.cfg.check_entry(e)?;
        let rd = self.rd_index(&e.routing_domain).unwrap_or_default();
        self.table
            .insert(
                rd,
                e.ca,
                Entry {
                    vsid: e.vsid,
                    mac: e.mac.0,
                    pa: e.pa,
                    origin: Origin::Policy,
                },
            )
            .map_err(|e| e.to_string())
    }

    /// Removes a policy entry; a port's own entries go only with the port.
    pub fn remove_policy(&mut self, routing_domain: &str, ca: IpAddr) -> Result<(), String> {
        let rd = self
            .rd_index(routing_domain)
            .ok_or_else(|| format!("no routing domain {routing_domain:?}"))?;
        match self.table.get(rd, ca) {
            Some(Entry {
                origin: Origin::Port(p),
                ..
            }) => Err(format!(
                "CA {ca} belongs to port {} of this switch; remove the port instead",
                p.0
            )),
            Some(_) => {
                self.table.remove(rd, ca);
                Ok(())
            }
            None => Err(format!("no policy entry for CA {ca} in {routing_domain:?}")),
        }
    }

    /// Every entry, with whether it belongs to a local port.
    pub fn policies(&self) -> Vec<(PolicyEntry, bool)> {
        let mut v: Vec<_> = self
            .table
            .iter()
            .map(|(rd, ca, e)| {
                (
                    PolicyEntry {
                        routing_domain: self.domains[rd as usize].0.clone(),
                        ca,
                        mac: vireo_netconfig::MacAddr(e.mac),
                        vsid: e.vsid,
                        pa: e.pa,
                    },
                    matches!(e.origin, Origin::Port(_)),
                )
            })
            .collect();
        v.sort_by(|a, b| (&a.0.routing_domain, a.0.ca).cmp(&(&b.0.routing_domain, b.0.ca)));
        v
    }

    /// Puts a VM port into its virtual subnet: its CAs enter the table at our first PA.
    pub fn add_port(&mut self, id: PortId, p: &PortOverlay) -> Result<(), String> {
        self.cfg.check_port(p)?;
        let rd = self.rd_index(&p.routing_domain).unwrap_or_default();
        if let Some(o) = self.local.get(&(p.vsid, p.mac.0)) {
            return Err(format!(
                "MAC {} is already on port {} in VSID {}",
                p.mac, o.0, p.vsid
            ));
        }
        let previous_pa = p.cas.iter().find_map(|ca| match self.table.get(rd, *ca) {
            Some(e) if e.origin == Origin::Policy && e.mac == p.mac.0 => Some(e.pa),
            _ => None,
        });
        for (i, ca) in p.cas.iter().enumerate() {
            let pa = self
                .cfg
                .provider_addresses
                .iter()
                .find(|a| a.is_ipv4() == ca.is_ipv4())
                .unwrap_or(&self.cfg.provider_addresses[0]);
            let r = self.table.insert(
                rd,
                *ca,
                Entry {
                    vsid: p.vsid,
                    mac: p.mac.0,
                    pa: *pa,
                    origin: Origin::Port(id),
                },
            );
            if let Err(e) = r {
                // Undo this port's earlier CAs: nothing half-applied.
                for ca in &p.cas[..i] {
                    self.table.remove(rd, *ca);
                }
                return Err(match e {
                    PolicyError::OwnedByPort { ca, port } => {
                        format!(
                            "CA {ca} is already on port {} in this routing domain",
                            port.0
                        )
                    }
                    e => e.to_string(),
                });
            }
        }
        for ca in &p.cas {
            self.relays.arrived(rd, *ca);
        }
        self.local.insert((p.vsid, p.mac.0), id);
        self.ports.insert(
            id,
            PortInfo {
                rd,
                vsid: p.vsid,
                mac: p.mac.0,
                cas: p.cas.clone(),
                previous_pa,
            },
        );
        Ok(())
    }

    /// Takes a VM port out; its CAs become departures, relayed for their stale senders
    /// once the table says where they went.
    pub fn remove_port(&mut self, id: PortId) {
        if let Some(p) = self.ports.remove(&id) {
            self.local.remove(&(p.vsid, p.mac));
            self.table.remove_port(id);
            for ca in &p.cas {
                self.relays.departed(p.rd, *ca, self.clock);
            }
        }
    }

    /// The stale-sender counters (relays, redirects).
    pub fn relay_counters(&self) -> RelayCounters {
        self.relays.counters
    }

    /// Provider frames the overlay made on its own since last asked (redirects to stale
    /// senders), each for the uplink.
    pub fn take_outbox(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.outbox)
    }

    /// Local ports of virtual subnet `vsid`.
    pub fn subnet_ports(&self, vsid: u32) -> impl Iterator<Item = PortId> + '_ {
        self.ports
            .iter()
            .filter(move |(_, p)| p.vsid == vsid)
            .map(|(id, _)| *id)
    }

    /// The other VMs of virtual subnet `vsid` the table knows (here or on other hosts), as
    /// (CA, MAC), at most `limit`, in address order: whom a port that arrived announces
    /// itself to (`announce::overlay_frames`).
    pub fn subnet_peers(&self, vsid: u32, except: Mac, limit: usize) -> Vec<(IpAddr, Mac)> {
        let mut v: Vec<_> = self
            .table
            .iter()
            .filter(|(_, _, e)| e.vsid == vsid && e.mac != except)
            .map(|(_, ca, e)| (ca, e.mac))
            .collect();
        v.sort();
        v.truncate(limit);
        v
    }

    /// The provider MAC of `ip`, if known.
    pub fn neighbor(&self, ip: IpAddr) -> Option<Mac> {
        self.neighbors.get(&ip).copied()
    }

    fn learn_neighbor(&mut self, ip: IpAddr, mac: Mac) {
        if self.static_neighbors.contains(&ip)
            || mac[0] & 1 == 1
            || (self.neighbors.len() >= NEIGHBOR_LIMIT && !self.neighbors.contains_key(&ip))
        {
            return;
        }
        // A new neighbour counts too: a connection refused while it was unresolved may be
        // judged again.
        if self.neighbors.insert(ip, mac) != Some(mac) {
            self.neighbor_changes += 1;
        }
        if let IpAddr::V6(a) = ip {
            self.nd.confirm(a, self.clock);
        }
    }

    /// What neighbour discovery on the uplink did so far.
    pub fn nd_counters(&self) -> nd::NdCounters {
        self.nd.counters
    }

    /// The MAC of provider next hop `pa` for sending now: a learned IPv6 neighbour not
    /// confirmed for [`nd::LIFETIME_NS`] is forgotten (and so solicited again).
    fn next_hop(&mut self, pa: IpAddr) -> Option<Mac> {
        if let IpAddr::V6(a) = pa {
            if !self.static_neighbors.contains(&pa) && self.nd.expire(a, self.clock) {
                self.neighbors.remove(&pa);
                self.neighbor_changes += 1;
            }
        }
        self.neighbor(pa)
    }

    /// How many times a provider neighbour was learned or its MAC changed so far.
    pub fn neighbor_changes(&self) -> u64 {
        self.neighbor_changes
    }

    /// A frame from VM port `port` (its ingress policies passed).
    pub fn from_vm(
        &mut self,
        port: PortId,
        s: &FrameSummary,
        frame: &mut Vec<u8>,
        now: u64,
    ) -> Verdict {
        self.clock = now;
        let Some(p) = self.ports.get(&port) else {
            return Verdict::Drop(DropReason::OverlayUnknown);
        };
        let (rd, vsid, my_mac) = (p.rd, p.vsid, p.mac);
        if s.tags != 0 {
            return Verdict::Drop(DropReason::VlanNotAllowed);
        }
        // A VM speaks only as itself: its MAC, and (for IP) one of its CAs.
        if s.src != my_mac {
            return Verdict::Drop(DropReason::OverlaySpoof);
        }
        let Some(subnet) = self.subnets.get(&vsid) else {
            return Verdict::Drop(DropReason::OverlayUnknown);
        };
        let gw_mac = subnet.gw_mac;
        match s.l3 {
            L3::Arp => {
                let claims = s.arp.map(|a| IpAddr::V4(Ipv4Addr::from(a.sender_ip)));
                if claims
                    .is_some_and(|c| !c.is_unspecified() && !self.ports[&port].cas.contains(&c))
                {
                    return Verdict::Drop(DropReason::OverlaySpoof);
                }
                return self.answer_arp(rd, vsid, s, frame);
            }
            L3::Ipv6 if s.proto == 58 && s.icmp_type == 135 && s.has_l4 => {
                return self.answer_nd(rd, vsid, s, frame);
            }
            L3::Ipv4 | L3::Ipv6 => {}
            _ => {
                // Other protocols stay inside the subnet on this host.
                return if s.is_multicast_dst() {
                    Verdict::Send {
                        to: Target::Subnet(vsid),
                        counted: None,
                    }
                } else {
                    match self.local.get(&(vsid, s.dst)) {
                        Some(d) => Verdict::Send {
                            to: Target::Port(*d),
                            counted: None,
                        },
                        None => Verdict::Drop(DropReason::OverlayUnknown),
                    }
                };
            }
        }
        let v6 = s.l3 == L3::Ipv6;
        if s.is_multicast_dst() {
            // Broadcast/multicast never cross the provider network.
            return Verdict::Send {
                to: Target::Subnet(vsid),
                counted: None,
            };
        }
        let src_ip = u128_to_ip(s.src_ip, v6);
        let link_local = matches!(src_ip, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80);
        if !link_local && !self.ports[&port].cas.contains(&src_ip) {
            return Verdict::Drop(DropReason::OverlaySpoof);
        }
        let dst_ip = u128_to_ip(s.dst_ip, v6);
        let routed = s.dst == gw_mac;
        let Some(dst) = self.resolve(rd, dst_ip) else {
            // Outside the domain: its gateway, if it has one here.
            if routed && v6 && !self.in_domain(rd, dst_ip) && self.has_gateway6(rd) {
                return self.gateway_out6(rd, vsid, s, frame);
            }
            if routed && !v6 && !self.in_domain(rd, dst_ip) {
                if self.has_gateway(rd) {
                    return self.gateway_out(rd, vsid, s, frame, now);
                }
                if let Some(pa) = self.remote_gateway(rd) {
                    // The gateway host routes it: tunnelled there as sent, to the
                    // subnet's gateway MAC.
                    let e = Entry {
                        vsid,
                        mac: gw_mac,
                        pa,
                        origin: Origin::Policy,
                    };
                    return self.deliver(rd, e, frame, s, gw_mac);
                }
            }
            return Verdict::Drop(DropReason::OverlayUnknown);
        };
        if routed {
            // Distributed routing: rewrite as the router on the far subnet would.
            let Some(to_subnet) = self.subnets.get(&dst.vsid) else {
                return Verdict::Drop(DropReason::OverlayUnknown);
            };
            if to_subnet.rd != rd {
                return Verdict::Drop(DropReason::OverlaySpoof);
            }
            if !decrement_ttl(frame, v6) {
                // The router says so, from its address on the sender's subnet.
                let from = self.subnets[&vsid]
                    .gw_ips
                    .iter()
                    .find(|a| a.is_ipv6() == v6)
                    .copied();
                return if reply::icmp_error(frame, gw_mac, from, reply::IcmpError::TimeExceeded) {
                    Verdict::Send {
                        to: Target::Back,
                        counted: Some(DropReason::TtlExceeded),
                    }
                } else {
                    Verdict::Drop(DropReason::TtlExceeded)
                };
            }
            let gw = to_subnet.gw_mac;
            frame[0..6].copy_from_slice(&dst.mac);
            frame[6..12].copy_from_slice(&gw);
        } else if dst.vsid != vsid || dst.mac != s.dst {
            // Same-subnet delivery only to the MAC the table names (another subnet's VM
            // is reached through the gateway).
            return Verdict::Drop(DropReason::OverlayUnknown);
        }
        self.deliver(rd, dst, frame, s, gw_mac)
    }

    /// Where a (possibly rewritten) customer frame for `dst` goes: a local port, or the
    /// uplink in a tunnel.
    fn deliver(
        &mut self,
        rd: u16,
        dst: Entry,
        frame: &mut Vec<u8>,
        s: &FrameSummary,
        gw_mac: Mac,
    ) -> Verdict {
        if self.is_ours(dst.pa) {
            return match self.local.get(&(dst.vsid, dst.mac)) {
                Some(p) => Verdict::Send {
                    to: Target::Port(*p),
                    counted: None,
                },
                None => Verdict::Drop(DropReason::OverlayUnknown),
            };
        }
        let encap = self.domains[rd as usize].1;
        let v6_pa = dst.pa.is_ipv6();
        let Some(&src_pa) = self
            .cfg
            .provider_addresses
            .iter()
            .find(|a| a.is_ipv6() == v6_pa)
        else {
            return Verdict::Drop(DropReason::OverlayUnknown);
        };
        let hdr = overhead(encap, v6_pa);
        let ip_len = frame.len() - 14;
        let room = (self.cfg.provider_mtu as usize).saturating_sub(hdr);
        if ip_len > room {
            // Never a silent drop: the sender learns the path MTU.
            let from = self.subnets.get(&dst.vsid).and_then(|sn| {
                sn.gw_ips
                    .iter()
                    .find(|a| a.is_ipv6() == (s.l3 == L3::Ipv6))
                    .copied()
            });
            return if reply::too_big(frame, gw_mac, from, room as u16) {
                Verdict::Send {
                    to: Target::Back,
                    counted: Some(DropReason::TooBig),
                }
            } else {
                Verdict::Drop(DropReason::TooBig)
            };
        }
        let Some(next) = self.next_hop(dst.pa) else {
            return self.ask_neighbor(dst.pa, src_pa, frame);
        };
        let entropy = flow_hash(s);
        encapsulate(
            frame,
            encap,
            dst.vsid,
            entropy,
            &Outer {
                src_mac: self.cfg.provider_mac.0,
                dst_mac: next,
                src_ip: src_pa,
                dst_ip: dst.pa,
            },
        );
        Verdict::Send {
            to: Target::Uplink,
            counted: None,
        }
    }

    /// The frame becomes an ARP request (IPv4) or a neighbour solicitation (IPv6) for a
    /// provider address whose MAC we lack. IPv6 solicitations are paced: while one is in
    /// flight the frames are dropped (counted), not queued — the sender's retransmission
    /// goes through once the advertisement is in, as with ARP.
    fn ask_neighbor(&mut self, pa: IpAddr, src_pa: IpAddr, frame: &mut Vec<u8>) -> Verdict {
        let m = self.cfg.provider_mac.0;
        if let (IpAddr::V6(t), IpAddr::V6(me)) = (pa, src_pa) {
            return match self.nd.need(t, self.clock) {
                nd::Resolve::Solicit => {
                    nd::solicit(frame, m, me, t);
                    self.nd.counters.solicits_sent += 1;
                    Verdict::Send {
                        to: Target::Uplink,
                        counted: Some(DropReason::OverlayNoNeighbor),
                    }
                }
                nd::Resolve::Wait => {
                    self.nd.counters.pending_drops += 1;
                    Verdict::Drop(DropReason::OverlayNoNeighbor)
                }
            };
        }
        let (IpAddr::V4(t), IpAddr::V4(me)) = (pa, src_pa) else {
            return Verdict::Drop(DropReason::OverlayNoNeighbor);
        };
        reply::arp(frame, [0xff; 6], m, 1, m, me, [0; 6], t);
        Verdict::Send {
            to: Target::Uplink,
            counted: Some(DropReason::OverlayNoNeighbor),
        }
    }

    /// The table's entry for a CA, asking the lookup hook (and caching) on a miss.
    fn resolve(&mut self, rd: u16, ca: IpAddr) -> Option<Entry> {
        if let Some(e) = self.table.get(rd, ca) {
            return Some(*e);
        }
        let hook = self.lookup.clone()?;
        let name = self.domains[rd as usize].0.clone();
        let e = hook.lookup(&name, ca)?;
        if e.routing_domain != name || e.ca != ca {
            return None;
        }
        self.set_policy(&e).ok()?;
        self.table.get(rd, ca).copied()
    }

    /// ARP from a VM: requests for the gateway or a CA of its own subnet are answered from
    /// the table; nothing is flooded. Replies and gratuitous ARP are absorbed.
    fn answer_arp(&mut self, rd: u16, vsid: u32, s: &FrameSummary, frame: &mut Vec<u8>) -> Verdict {
        let Some(a) = s.arp else {
            return Verdict::Drop(DropReason::Malformed);
        };
        let target = IpAddr::V4(Ipv4Addr::from(a.target_ip));
        if a.op != 1 {
            // A reply to a peer that asked across the tunnel (a Linux VTEP floods its ARP
            // requests) goes to that peer; gratuitous ARP stays here.
            return match self.resolve(rd, target) {
                Some(e)
                    if !s.is_multicast_dst()
                        && a.target_ip != a.sender_ip
                        && e.vsid == vsid
                        && e.mac == s.dst =>
                {
                    let gw = self.subnets[&vsid].gw_mac;
                    self.deliver(rd, e, frame, s, gw)
                }
                _ => Verdict::Consumed,
            };
        }
        let subnet = &self.subnets[&vsid];
        let mac = if subnet.gw_ips.contains(&target) {
            subnet.gw_mac
        } else if a.target_ip == a.sender_ip {
            return Verdict::Consumed;
        } else {
            match self.resolve(rd, target) {
                Some(e) if e.vsid == vsid => e.mac,
                _ => return Verdict::Drop(DropReason::OverlayUnknown),
            }
        };
        reply::arp(
            frame,
            s.src,
            mac,
            2,
            mac,
            Ipv4Addr::from(a.target_ip),
            a.sender_mac,
            Ipv4Addr::from(a.sender_ip),
        );
        Verdict::Send {
            to: Target::Back,
            counted: None,
        }
    }

    /// Neighbor solicitation from a VM: answered like ARP.
    fn answer_nd(&mut self, rd: u16, vsid: u32, s: &FrameSummary, frame: &mut Vec<u8>) -> Verdict {
        let target = Ipv6Addr::from(s.nd_target);
        let subnet = &self.subnets[&vsid];
        let (mac, router) = if subnet.gw_ips.contains(&IpAddr::V6(target)) {
            (subnet.gw_mac, true)
        } else {
            match self.resolve(rd, IpAddr::V6(target)) {
                Some(e) if e.vsid == vsid => (e.mac, false),
                // DAD for its own address, or an unknown CA.
                _ if s.src_ip == 0 => return Verdict::Consumed,
                _ => return Verdict::Drop(DropReason::OverlayUnknown),
            }
        };
        reply::neighbor_advert(frame, s.src, Ipv6Addr::from(s.src_ip), target, mac, router);
        Verdict::Send {
            to: Target::Back,
            counted: None,
        }
    }

    /// A frame from the uplink: ARP for our provider addresses, tunnel packets to them.
    /// Everything else passes to the L2 pipeline.
    pub fn from_uplink(&mut self, s: &FrameSummary, frame: &mut Vec<u8>, now: u64) -> Verdict {
        self.clock = now;
        if !self.gateways.list.is_empty() {
            if let Some(v) = self.gateway_in(s, frame, now) {
                return v;
            }
        }
        if s.tags != 0 {
            return Verdict::Pass;
        }
        if s.l3 == L3::Ipv6
            && s.proto == crate::frame::IPPROTO_ICMPV6
            && matches!(s.icmp_type, nd::NEIGHBOR_SOLICIT | nd::NEIGHBOR_ADVERT)
        {
            if let Some(v) = self.uplink_nd(s, frame) {
                return v;
            }
        }
        if let (L3::Arp, Some(a)) = (s.l3, s.arp) {
            let target = IpAddr::V4(Ipv4Addr::from(a.target_ip));
            if !self.is_ours(target) {
                return Verdict::Pass;
            }
            self.learn_neighbor(IpAddr::V4(Ipv4Addr::from(a.sender_ip)), a.sender_mac);
            if a.op != 1 {
                return Verdict::Consumed;
            }
            let m = self.cfg.provider_mac.0;
            reply::arp(
                frame,
                s.src,
                m,
                2,
                m,
                Ipv4Addr::from(a.target_ip),
                a.sender_mac,
                Ipv4Addr::from(a.sender_ip),
            );
            return Verdict::Send {
                to: Target::Back,
                counted: None,
            };
        }
        if !matches!(s.l3, L3::Ipv4 | L3::Ipv6) || s.dst != self.cfg.provider_mac.0 {
            return Verdict::Pass;
        }
        let dst_ip = u128_to_ip(s.dst_ip, s.l3 == L3::Ipv6);
        if !self.is_ours(dst_ip) {
            return Verdict::Pass;
        }
        let t = match decapsulate(frame) {
            Ok(t) => t,
            Err(DecapError::NotTunnel) => return Verdict::Pass,
            Err(DecapError::Malformed) => return Verdict::Drop(DropReason::OverlayMalformed),
        };
        let Some(subnet) = self.subnets.get(&t.vsid) else {
            return Verdict::Drop(DropReason::OverlayUnknown);
        };
        let (rd, gw_mac) = (subnet.rd, subnet.gw_mac);
        if self.domains[rd as usize].1 != t.encap {
            return Verdict::Drop(DropReason::OverlayMalformed);
        }
        let inner = &frame[t.inner.0..t.inner.1];
        if redirect::is_redirect(inner) {
            return self.redirect_in(rd, &t, inner, gw_mac);
        }
        let Ok(is) = parse(inner) else {
            return Verdict::Drop(DropReason::OverlayMalformed);
        };
        if t.relayed {
            return self.relayed_in(rd, gw_mac, &t, &is, frame);
        }
        // The inner source must be what the table says is behind that PA in that subnet
        // (or the sender host's distributed router on this subnet's behalf).
        let src_ca = match (is.l3, is.arp) {
            (L3::Arp, Some(a)) => IpAddr::V4(Ipv4Addr::from(a.sender_ip)),
            (L3::Ipv4, _) => u128_to_ip(is.src_ip, false),
            (L3::Ipv6, _) => u128_to_ip(is.src_ip, true),
            _ => return Verdict::Drop(DropReason::OverlaySpoof),
        };
        let ok = match self.table.get(rd, src_ca) {
            Some(e) => {
                e.pa == t.outer_src
                    && ((e.vsid == t.vsid && e.mac == is.src)
                        || (is.src == gw_mac && is.l3 != L3::Arp))
            }
            // A routed packet from outside, through the domain's gateway on that host.
            None => {
                is.src == gw_mac
                    && is.l3 == L3::Ipv4
                    && self.remote_gateway(rd) == Some(t.outer_src)
                    && !self.in_domain(rd, src_ca)
            }
        };
        if !ok || is.tags != 0 {
            return Verdict::Drop(DropReason::OverlaySpoof);
        }
        self.learn_neighbor(t.outer_src, t.outer_src_mac);
        let vsid = t.vsid;
        frame.truncate(t.inner.1);
        frame.drain(..t.inner.0);
        if frame.len() < crate::switch::ETH_MIN_FRAME {
            frame.resize(crate::switch::ETH_MIN_FRAME, 0);
        }
        if is.is_multicast_dst() {
            return Verdict::Send {
                to: Target::Subnet(vsid),
                counted: None,
            };
        }
        if let Some(p) = self.local.get(&(vsid, is.dst)) {
            return Verdict::Send {
                to: Target::Port(*p),
                counted: None,
            };
        }
        // A VM on another host going outside through our gateway.
        let dst_ca = u128_to_ip(is.dst_ip, is.l3 == L3::Ipv6);
        if is.dst == gw_mac
            && is.l3 == L3::Ipv4
            && self.has_gateway(rd)
            && self.table.get(rd, dst_ca).is_none()
            && !self.in_domain(rd, dst_ca)
        {
            return match self.gateway_out(rd, vsid, &is, frame, now) {
                // An ICMP answer cannot go "back" over the provider network: count it.
                Verdict::Send {
                    to: Target::Back,
                    counted: Some(r),
                } => Verdict::Drop(r),
                v => v,
            };
        }
        // Not here (any more): a VM that moved away. Forward to where the table says it
        // is now, so the sender's stale entry costs a detour, not the connection.
        match (is.l3, self.table.get(rd, dst_ca).copied()) {
            (L3::Ipv4 | L3::Ipv6, Some(e))
                if e.vsid == vsid && e.mac == is.dst && !self.is_ours(e.pa) =>
            {
                self.relay(rd, e, dst_ca, &t, &is, frame, now)
            }
            _ => Verdict::Drop(DropReason::OverlayUnknown),
        }
    }

    /// A stale sender's packet for VM `dst_ca`, which left for `e.pa`: relayed there once
    /// (marked, so the next host never relays it again) while the relay has not expired,
    /// and the sender told where the VM is now.
    #[allow(clippy::too_many_arguments)]
    fn relay(
        &mut self,
        rd: u16,
        e: Entry,
        dst_ca: IpAddr,
        t: &Tunnel,
        is: &FrameSummary,
        frame: &mut Vec<u8>,
        now: u64,
    ) -> Verdict {
        match self.relays.may_relay(rd, dst_ca, now) {
            Ok(()) => {}
            Err(NoRelay::Expired) => {
                self.relays.counters.relay_expired += 1;
                return Verdict::Drop(DropReason::OverlayUnknown);
            }
            Err(NoRelay::NeverHere) => return Verdict::Drop(DropReason::OverlayUnknown),
        }
        if e.pa != t.outer_src && self.relays.should_redirect(t.outer_src, rd, dst_ca, now) {
            let gw_mac = self.subnets[&e.vsid].gw_mac;
            let mut msg = redirect::build(
                gw_mac,
                &Redirect {
                    ca: dst_ca,
                    mac: e.mac,
                    pa: e.pa,
                },
            );
            let encap = self.domains[rd as usize].1;
            encapsulate(
                &mut msg,
                encap,
                e.vsid,
                0,
                &Outer {
                    src_mac: self.cfg.provider_mac.0,
                    dst_mac: self.neighbor(t.outer_src).unwrap_or(t.outer_src_mac),
                    src_ip: t.outer_dst,
                    dst_ip: t.outer_src,
                },
            );
            self.outbox.push(msg);
            self.relays.counters.redirects_sent += 1;
        }
        let gw_mac = self.subnets[&e.vsid].gw_mac;
        let v = self.deliver(rd, e, frame, is, gw_mac);
        if v == (Verdict::Send {
            to: Target::Uplink,
            counted: None,
        }) {
            mark_relayed(frame, self.domains[rd as usize].1);
            self.relays.counters.relayed += 1;
        }
        v
    }

    /// A packet relayed by the host a VM moved from: delivered only to that VM, here, and
    /// only if it came from the host the VM left (a relay is never relayed again).
    fn relayed_in(
        &mut self,
        rd: u16,
        gw_mac: Mac,
        t: &Tunnel,
        is: &FrameSummary,
        frame: &mut Vec<u8>,
    ) -> Verdict {
        let Some(&p) = self.local.get(&(t.vsid, is.dst)) else {
            self.relays.counters.chain_dropped += 1;
            return Verdict::Drop(DropReason::OverlayUnknown);
        };
        if is.is_multicast_dst() || is.tags != 0 || !matches!(is.l3, L3::Ipv4 | L3::Ipv6) {
            return Verdict::Drop(DropReason::OverlaySpoof);
        }
        // The relay vouches for the outer source it checked; we check that the relay is the
        // VM's previous host and that the inner source is a VM the table knows there.
        let src_ca = u128_to_ip(is.src_ip, is.l3 == L3::Ipv6);
        let known_source = match self.table.get(rd, src_ca) {
            Some(e) => {
                !self.is_ours(e.pa) && ((e.vsid == t.vsid && e.mac == is.src) || is.src == gw_mac)
            }
            None => false,
        };
        if !known_source || self.ports[&p].previous_pa != Some(t.outer_src) {
            return Verdict::Drop(DropReason::OverlaySpoof);
        }
        frame.truncate(t.inner.1);
        frame.drain(..t.inner.0);
        if frame.len() < crate::switch::ETH_MIN_FRAME {
            frame.resize(crate::switch::ETH_MIN_FRAME, 0);
        }
        Verdict::Send {
            to: Target::Port(p),
            counted: None,
        }
    }

    /// A redirect from the host our entry names: the entry moves to the PA it gives.
    fn redirect_in(&mut self, rd: u16, t: &Tunnel, inner: &[u8], gw_mac: Mac) -> Verdict {
        let ok = inner.get(6..12) == Some(&gw_mac[..])
            && redirect::parse(inner).is_some_and(|r| {
                let entry = self.table.get(rd, r.ca);
                redirect::judge(entry, t.vsid, t.outer_src, &r, |a| self.is_ours(a))
                    .is_ok_and(|moved| self.table.insert(rd, r.ca, moved).is_ok())
            });
        if ok {
            self.relays.counters.redirects_accepted += 1;
            Verdict::Consumed
        } else {
            self.relays.counters.redirects_refused += 1;
            Verdict::Drop(DropReason::OverlaySpoof)
        }
    }
}

impl Overlay {
    /// Neighbour discovery from the uplink: solicitations for our PAs are answered (and the
    /// asker learned), advertisements for targets we asked about resolve them. `None`: not
    /// about our PAs or our questions (the L2 pipeline takes it).
    fn uplink_nd(&mut self, s: &FrameSummary, frame: &mut Vec<u8>) -> Option<Verdict> {
        let me = self.cfg.provider_mac.0;
        let m = match nd::parse(frame) {
            Ok(m) => m,
            Err(nd::NdError::NotNd) => return None,
            Err(_) => {
                // Only what was meant for us is ours to count.
                let target = IpAddr::V6(Ipv6Addr::from(s.nd_target));
                if s.dst == me || self.is_ours(target) {
                    self.nd.counters.bad += 1;
                    return Some(Verdict::Drop(DropReason::Malformed));
                }
                return None;
            }
        };
        if m.kind == nd::NEIGHBOR_SOLICIT {
            if !self.is_ours(IpAddr::V6(m.target)) {
                return None;
            }
            if m.src.is_unspecified() {
                // Someone's duplicate address detection for our PA: the PA stays ours.
                return Some(Verdict::Consumed);
            }
            self.nd.counters.solicits_received += 1;
            if let Some(mac) = m.lladdr {
                self.learn_neighbor(IpAddr::V6(m.src), mac);
            }
            reply::neighbor_advert(frame, s.src, m.src, m.target, me, false);
            self.nd.counters.adverts_sent += 1;
            return Some(Verdict::Send {
                to: Target::Back,
                counted: None,
            });
        }
        let asked = self.nd.is_pending(m.target) || self.nd.is_known(m.target);
        let (true, Some(mac)) = (asked, m.lladdr) else {
            // An advertisement to us about a target we never asked for is forged or
            // confused; one to a group is someone else's business.
            if s.dst == me {
                self.nd.counters.bad += 1;
                return Some(Verdict::Drop(DropReason::Malformed));
            }
            return None;
        };
        let target = IpAddr::V6(m.target);
        let differs = self.neighbor(target).is_some_and(|old| old != mac);
        if differs && !m.override_ && !self.nd.is_pending(m.target) {
            // RFC 4861 §7.2.5: without override a known entry keeps its MAC.
            return Some(Verdict::Consumed);
        }
        self.learn_neighbor(target, mac);
        self.nd.counters.adverts_received += 1;
        Some(Verdict::Consumed)
    }
}

/// Decrements the IPv4 TTL (fixing the header checksum) or the IPv6 hop limit of an
/// untagged frame; false when it would reach zero.
fn decrement_ttl(frame: &mut [u8], v6: bool) -> bool {
    if v6 {
        match frame.get_mut(21) {
            Some(h) if *h > 1 => {
                *h -= 1;
                true
            }
            _ => false,
        }
    } else {
        let ihl = frame.get(14).map_or(0, |b| usize::from(b & 0x0f) * 4);
        if ihl < 20 || frame.len() < 14 + ihl || frame[22] <= 1 {
            return false;
        }
        frame[22] -= 1;
        let c = ipv4_header_checksum(&frame[14..14 + ihl]);
        frame[24..26].copy_from_slice(&c.to_be_bytes());
        true
    }
}

/// A hash of the inner flow (addresses, protocol, ports) for the outer entropy fields.
fn flow_hash(s: &FrameSummary) -> u16 {
    let mut h = FxHasher::default();
    (s.src_ip, s.dst_ip, s.proto, s.sport, s.dport).hash(&mut h);
    let v = h.finish();
    (v ^ (v >> 16) ^ (v >> 32) ^ (v >> 48)) as u16
}
