//! The switch and its frame pipeline. `Switch::process` is pure (no I/O): a frame and its
//! ingress port in, a [`Delivery`] (egress ports with tag operations) out. The stages are
//! separate functions — [`ingress_policies`], `run_extensions`, `forward`, [`egress_policies`]
//! — so each can be tested alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

mod tunnel_verdict;

use crate::acl::AclVerdict;
use crate::config::{Direction, MirrorRole, PortConfig, PortRole, SwitchConfig};
use crate::extension::{Extension, ExtensionKind, FilterVerdict, FrameContext, PortChange};
use crate::fastpath::{FlowKey, FlowUse, L4Match, NotOffloadable, OffloadHook, Shape, TagAction};
use crate::frame::{
    ethertype_offset, parse, FrameSummary, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_TCP, L3,
};
use crate::meter::{DropReason, MeterSnapshot};
use crate::port::Port;
use crate::table::{Learn, MacTable};
use crate::vlan::{classify, compile_domains, egress_tag, TagOp, VlanError};
use crate::PortId;

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("invalid VLAN configuration: {0}")]
    Vlan(#[from] VlanError),
    #[error("a port named {0:?} already exists")]
    DuplicatePort(String),
    #[error("no such port {0:?}")]
    NoSuchPort(PortId),
    #[error("the switch has no room for more ports")]
    TooManyPorts,
    #[error("extension {extension} vetoed the change: {reason}")]
    Vetoed { extension: String, reason: String },
    #[error("switch already has forwarding extension {0}")]
    SecondForwardingExtension(String),
    #[error("overlay: {0}")]
    Overlay(String),
}

/// Which bytes a frame copy carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Bytes {
    /// The frame as the pipeline left it (every normal delivery).
    #[default]
    Frame,
    /// The frame as it arrived ([`Delivery::received`]): a mirror copy of an overlay frame
    /// from before the overlay rewrote it.
    Received,
    /// The customer frame inside the tunnel packet the pipeline made ([`Delivery::inner`]).
    Inner,
}

/// One frame copy to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Egress {
    pub port: PortId,
    pub tag: TagOp,
    /// A mirror copy rather than normal delivery.
    pub mirror: bool,
    /// Only mirror copies on an overlay switch carry anything but [`Bytes::Frame`].
    pub bytes: Bytes,
}

/// The pipeline's output for one frame. Reused across frames to avoid allocation.
#[derive(Debug, Default)]
pub struct Delivery {
    pub egress: Vec<Egress>,
    /// Why the frame got no normal delivery: dropped at ingress, or (unicast) blocked at its
    /// only destination. `None` with no egress means a flood that reached nobody.
    pub dropped: Option<DropReason>,
    /// The frame as it arrived, kept only when an overlay frame may be mirrored.
    pub received: Vec<u8>,
    /// The customer frame of a tunnel packet sent, kept only for inner mirror copies.
    pub inner: Vec<u8>,
}

impl Delivery {
    pub fn clear(&mut self) {
        self.egress.clear();
        self.dropped = None;
        self.received.clear();
        self.inner.clear();
    }

    /// The bytes of copy `e`, `frame` being what the pipeline left.
    pub fn bytes<'a>(&'a self, frame: &'a [u8], e: &Egress) -> &'a [u8] {
        match e.bytes {
            Bytes::Frame => frame,
            Bytes::Received => &self.received,
            Bytes::Inner => &self.inner,
        }
    }
    /// Ports receiving a normal (non-mirror) copy.
    pub fn ports(&self) -> Vec<PortId> {
        self.egress
            .iter()
            .filter(|e| !e.mirror)
            .map(|e| e.port)
            .collect()
    }
}

/// Applies a tag operation, returning the bytes to send (`frame` itself when unchanged).
pub fn render<'a>(frame: &'a [u8], tag: TagOp, buf: &'a mut Vec<u8>) -> &'a [u8] {
    let tagged = frame.len() >= 18
        && matches!(
            u16::from_be_bytes([frame[12], frame[13]]),
            0x8100 | 0x88a8 | 0x9100
        );
    match tag {
        TagOp::Keep => frame,
        TagOp::Untag if tagged => {
            buf.clear();
            buf.extend_from_slice(&frame[..12]);
            buf.extend_from_slice(&frame[16..]);
            buf
        }
        TagOp::Untag => frame,
        TagOp::Tag(vid) if tagged => {
            buf.clear();
            buf.extend_from_slice(frame);
            let tci = u16::from_be_bytes([frame[14], frame[15]]) & 0xf000 | vid & 0x0fff;
            buf[14..16].copy_from_slice(&tci.to_be_bytes());
            buf
        }
        TagOp::Tag(vid) => {
            buf.clear();
            buf.extend_from_slice(&frame[..12.min(frame.len())]);
            buf.extend_from_slice(&0x8100u16.to_be_bytes());
            buf.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
            buf.extend_from_slice(frame.get(12..).unwrap_or(&[]));
            buf
        }
    }
}

/// Status of a port: its configuration, meters and learned MACs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortStatus {
    pub id: PortId,
    pub config: PortConfig,
    pub meters: MeterSnapshot,
    pub learned_macs: u32,
    pub tracked_flows: usize,
}

pub struct Switch {
    cfg: SwitchConfig,
    /// Learning-table id per VLAN (a PVLAN domain shares its primary's).
    fid: Vec<u16>,
    ports: Vec<Option<Port>>,
    active: Vec<PortId>,
    mirror_dests: Vec<PortId>,
    table: MacTable,
    extensions: Vec<Box<dyn Extension>>,
    forwarding: Option<usize>,
    candidates: Vec<PortId>,
    /// Bumped by every change that could change an offload verdict; kernel flows installed
    /// under an older generation are stale.
    generation: Arc<AtomicU64>,
    /// The kernel fast path of the runtime driving this switch, if any.
    offload_hook: Option<Arc<dyn OffloadHook>>,
    /// `MacTable::changes` when last looked at.
    table_changes: u64,
    /// Network virtualization, when the configuration has an `overlay`.
    overlay: Option<crate::overlay::Overlay>,
}

/// The shortest Ethernet frame without its FCS; shorter frames are padded to it.
pub const ETH_MIN_FRAME: usize = 60;

/// Ports per switch (ids are small integers).
pub const MAX_PORTS: usize = 4096;

/// Ingress stage: VLAN classification, storm limit, guards, rate limit, ACLs.
/// Returns the frame's VLAN inside the switch.
pub fn ingress_policies(
    p: &mut Port,
    s: &FrameSummary,
    len: usize,
    now: u64,
) -> Result<u16, DropReason> {
    let vid = classify(&p.vlan, s)?;
    if let Some(st) = &mut p.storm {
        if s.is_multicast_dst() && !st.take(1, now) {
            return Err(DropReason::StormLimit);
        }
    }
    p.guard.check(s, now)?;
    crate::source_guard::check(&p.cfg.guard, s)?;
    if let Some(b) = &mut p.rate_in {
        if !b.take(len as u64, now) {
            return Err(DropReason::RateLimit);
        }
    }
    if p.acl
        .evaluate(Direction::Ingress, s, len, now, &mut p.meters.acl)
        == AclVerdict::Deny
    {
        return Err(DropReason::AclDeny);
    }
    Ok(vid)
}

/// Egress stage for one destination port: VLAN/PVLAN reach, ACLs, rate limit.
pub fn egress_policies(
    p: &mut Port,
    vid: u16,
    s: &FrameSummary,
    len: usize,
    now: u64,
) -> Result<TagOp, DropReason> {
    let tag = egress_tag(&p.vlan, vid, s).ok_or(DropReason::Isolation)?;
    if p.acl
        .evaluate(Direction::Egress, s, len, now, &mut p.meters.acl)
        == AclVerdict::Deny
    {
        return Err(DropReason::AclDeny);
    }
    if let Some(b) = &mut p.rate_out {
        if !b.take(len as u64, now) {
            return Err(DropReason::RateLimit);
        }
    }
    Ok(tag)
}

impl Switch {
    /// Builds a switch and adds `cfg.ports` in order (port ids 0, 1, ...).
    pub fn new(mut cfg: SwitchConfig) -> Result<Self, SwitchError> {
        let fid = compile_domains(&cfg.pvlan_domains)?;
        let ports_cfg = std::mem::take(&mut cfg.ports);
        let overlay = cfg
            .overlay
            .take()
            .map(crate::overlay::Overlay::new)
            .transpose()
            .map_err(SwitchError::Overlay)?;
        let mut sw = Switch {
            table: MacTable::new(cfg.mac_aging_secs, cfg.mac_table_limit),
            cfg: SwitchConfig {
                ports: Vec::new(),
                ..cfg
            },
            fid,
            ports: Vec::new(),
            active: Vec::new(),
            mirror_dests: Vec::new(),
            extensions: Vec::new(),
            forwarding: None,
            candidates: Vec::with_capacity(64),
            generation: Arc::new(AtomicU64::new(0)),
            offload_hook: None,
            table_changes: 0,
            overlay,
        };
        for p in ports_cfg {
            sw.add_port(p)?;
        }
        Ok(sw)
    }

    /// The current configuration, ports included, as the daemon would persist it.
    pub fn config(&self) -> SwitchConfig {
        SwitchConfig {
            ports: self.ports.iter().flatten().map(|p| p.cfg.clone()).collect(),
            overlay: self.overlay.as_ref().map(|o| o.config()),
            ..self.cfg.clone()
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn port_id(&self, name: &str) -> Option<PortId> {
        self.active
            .iter()
            .copied()
            .find(|id| self.port(*id).is_some_and(|p| p.cfg.name == name))
    }

    pub fn ports(&self) -> &[PortId] {
        &self.active
    }

    fn port(&self, id: PortId) -> Option<&Port> {
        self.ports.get(id.0 as usize).and_then(|p| p.as_ref())
    }

    fn port_mut(&mut self, id: PortId) -> Option<&mut Port> {
        self.ports.get_mut(id.0 as usize).and_then(|p| p.as_mut())
    }

    fn veto(&self, change: PortChange<'_>) -> Result<(), SwitchError> {
        for e in &self.extensions {
            e.check_port_change(change)
                .map_err(|reason| SwitchError::Vetoed {
                    extension: e.name().to_string(),
                    reason,
                })?;
        }
        Ok(())
    }

    fn refresh_lists(&mut self) {
        self.active = (0..self.ports.len())
            .filter(|i| self.ports[*i].is_some())
            .map(|i| PortId(i as u16))
            .collect();
        self.mirror_dests = self
            .active
            .iter()
            .copied()
            .filter(|id| self.port(*id).is_some_and(|p| p.mirror_dest))
            .collect();
    }

    pub fn add_port(&mut self, cfg: PortConfig) -> Result<PortId, SwitchError> {
        if self.port_id(&cfg.name).is_some() {
            return Err(SwitchError::DuplicatePort(cfg.name));
        }
        self.invalidate_offloads();
        self.veto(PortChange::Add(&cfg))?;
        let port = Port::compile(cfg, &self.cfg.pvlan_domains)?;
        let slot = match self.ports.iter().position(|p| p.is_none()) {
            Some(i) => i,
            None if self.ports.len() < MAX_PORTS => {
                self.ports.push(None);
                self.ports.len() - 1
            }
            None => return Err(SwitchError::TooManyPorts),
        };
        self.overlay_join(PortId(slot as u16), &port.cfg)?;
        self.ports[slot] = Some(port);
        let id = PortId(slot as u16);
        self.table.flush_port(id);
        // Already purged synchronously; no need for the data path to ask again.
        self.table_changes = self.table.changes();
        self.refresh_lists();
        Ok(id)
    }

    /// Replaces a port's policies; takes effect for the next frame. Extensions may veto.
    pub fn set_port_config(&mut self, id: PortId, cfg: PortConfig) -> Result<(), SwitchError> {
        if let Some(other) = self.port_id(&cfg.name) {
            if other != id {
                return Err(SwitchError::DuplicatePort(cfg.name));
            }
        }
        self.port(id).ok_or(SwitchError::NoSuchPort(id))?;
        // Kernel-forwarded flows go before the new policy applies: none of them may outlive
        // the verdict it was approved under (e.g. a deny ACL must cut a running transfer).
        self.invalidate_offloads();
        let old = self.port(id).ok_or(SwitchError::NoSuchPort(id))?;
        self.veto(PortChange::Update {
            old: &old.cfg,
            new: &cfg,
        })?;
        let vlan_changed = old.cfg.vlan != cfg.vlan;
        let old_cfg = (old.cfg.overlay != cfg.overlay).then(|| old.cfg.clone());
        if let Some(old_cfg) = &old_cfg {
            self.overlay_leave(id);
            if let Err(e) = self.overlay_join(id, &cfg) {
                let _ = self.overlay_join(id, old_cfg);
                return Err(e);
            }
        }
        let domains = self.cfg.pvlan_domains.clone();
        let r = self
            .port_mut(id)
            .ok_or(SwitchError::NoSuchPort(id))?
            .reconfigure(cfg, &domains);
        if let (Err(_), Some(old_cfg)) = (&r, &old_cfg) {
            self.overlay_leave(id);
            let _ = self.overlay_join(id, old_cfg);
        }
        r?;
        if vlan_changed {
            self.table.flush_port(id);
            // Already purged synchronously; no need for the data path to ask again.
            self.table_changes = self.table.changes();
        }
        self.refresh_lists();
        Ok(())
    }

    pub fn remove_port(&mut self, id: PortId) -> Result<PortConfig, SwitchError> {
        self.port(id).ok_or(SwitchError::NoSuchPort(id))?;
        self.invalidate_offloads();
        let old = self.port(id).ok_or(SwitchError::NoSuchPort(id))?;
        self.veto(PortChange::Remove(&old.cfg))?;
        let p = self.ports[id.0 as usize]
            .take()
            .ok_or(SwitchError::NoSuchPort(id))?;
        self.overlay_leave(id);
        self.table.flush_port(id);
        // Already purged synchronously; no need for the data path to ask again.
        self.table_changes = self.table.changes();
        self.refresh_lists();
        Ok(p.cfg)
    }

    /// Puts a port with an `overlay` membership into its virtual subnet.
    fn overlay_join(&mut self, id: PortId, cfg: &PortConfig) -> Result<(), SwitchError> {
        let Some(m) = &cfg.overlay else {
            return Ok(());
        };
        let o = self.overlay.as_mut().ok_or_else(|| {
            SwitchError::Overlay(format!(
                "port {:?} names virtual subnet {} but the switch has no overlay configured",
                cfg.name, m.vsid
            ))
        })?;
        o.add_port(id, m)
            .map_err(|e| SwitchError::Overlay(format!("port {:?}: {e}", cfg.name)))
    }

    fn overlay_leave(&mut self, id: PortId) {
        if let Some(o) = &mut self.overlay {
            o.remove_port(id);
        }
    }

    /// The overlay (policy table, neighbours), when configured.
    pub fn overlay(&self) -> Option<&crate::overlay::Overlay> {
        self.overlay.as_ref()
    }

    /// The overlay's stale-sender counters (relays, redirects); zero without an overlay.
    pub fn relay_counters(&self) -> crate::overlay::relay::RelayCounters {
        self.overlay
            .as_ref()
            .map(|o| o.relay_counters())
            .unwrap_or_default()
    }

    /// Provider frames the overlay made on its own (redirects to stale senders) since last
    /// asked, with the uplink to send them on (counted on its egress meter here).
    pub fn take_overlay_frames(&mut self) -> Option<(PortId, Vec<Vec<u8>>)> {
        let frames = self.overlay.as_mut()?.take_outbox();
        if frames.is_empty() {
            return None;
        }
        let up = self.active.iter().copied().find(|id| {
            self.port(*id)
                .is_some_and(|p| p.cfg.role == PortRole::Uplink)
        })?;
        if let Some(p) = self.port_mut(up) {
            for f in &frames {
                p.meters.egress.add(f.len());
            }
        }
        Some((up, frames))
    }

    /// Adds or moves a policy entry (e.g. a VM migrated: its new PA applies to the next frame).
    pub fn set_policy(&mut self, e: &vireo_netconfig::PolicyEntry) -> Result<(), SwitchError> {
        let o = self
            .overlay
            .as_mut()
            .ok_or_else(|| SwitchError::Overlay("the switch has no overlay configured".into()))?;
        o.set_policy(e).map_err(SwitchError::Overlay)?;
        // Kernel overlay flows hold PAs and MACs from the table.
        self.invalidate_offloads();
        Ok(())
    }

    pub fn remove_policy(
        &mut self,
        routing_domain: &str,
        ca: std::net::IpAddr,
    ) -> Result<(), SwitchError> {
        let o = self
            .overlay
            .as_mut()
            .ok_or_else(|| SwitchError::Overlay("the switch has no overlay configured".into()))?;
        o.remove_policy(routing_domain, ca)
            .map_err(SwitchError::Overlay)?;
        self.invalidate_offloads();
        Ok(())
    }

    /// Adds or replaces an overlay gateway (`overlay/gateway.rs`).
    pub fn set_gateway(&mut self, g: vireo_netconfig::GatewayConfig) -> Result<(), SwitchError> {
        let o = self
            .overlay
            .as_mut()
            .ok_or_else(|| SwitchError::Overlay("the switch has no overlay configured".into()))?;
        o.set_gateway(g).map_err(SwitchError::Overlay)?;
        self.invalidate_offloads();
        Ok(())
    }

    pub fn remove_gateway(&mut self, name: &str) -> Result<(), SwitchError> {
        let o = self
            .overlay
            .as_mut()
            .ok_or_else(|| SwitchError::Overlay("the switch has no overlay configured".into()))?;
        o.remove_gateway(name).map_err(SwitchError::Overlay)?;
        self.invalidate_offloads();
        Ok(())
    }

    /// Installs the hook asked on a policy-table miss.
    pub fn set_policy_lookup(&mut self, hook: Option<Arc<dyn crate::overlay::PolicyLookup>>) {
        if let Some(o) = &mut self.overlay {
            o.set_lookup(hook);
        }
        self.invalidate_offloads();
    }

    pub fn register_extension(&mut self, ext: Box<dyn Extension>) -> Result<(), SwitchError> {
        self.invalidate_offloads();
        if ext.kind() == ExtensionKind::Forwarding {
            if let Some(i) = self.forwarding {
                return Err(SwitchError::SecondForwardingExtension(
                    self.extensions[i].name().to_string(),
                ));
            }
            self.forwarding = Some(self.extensions.len());
        }
        self.extensions.push(ext);
        Ok(())
    }

    /// Whether a filter extension (the only stage that may rewrite frames) is registered.
    pub fn has_filters(&self) -> bool {
        self.extensions
            .iter()
            .any(|e| e.kind() == ExtensionKind::Filter)
    }

    pub fn extensions(&self) -> impl Iterator<Item = (&str, ExtensionKind)> {
        self.extensions.iter().map(|e| (e.name(), e.kind()))
    }

    /// Removes an extension by name and returns it (e.g. to read a sample's counters).
    pub fn unregister_extension(&mut self, name: &str) -> Option<Box<dyn Extension>> {
        let i = self.extensions.iter().position(|e| e.name() == name)?;
        self.invalidate_offloads();
        let e = self.extensions.remove(i);
        self.forwarding = self
            .extensions
            .iter()
            .position(|e| e.kind() == ExtensionKind::Forwarding);
        Some(e)
    }

    pub fn status(&self, id: PortId) -> Option<PortStatus> {
        let p = self.port(id)?;
        Some(PortStatus {
            id,
            config: p.cfg.clone(),
            meters: MeterSnapshot {
                ingress: p.meters.ingress,
                egress: p.meters.egress,
                drops: DropReason::ALL
                    .iter()
                    .map(|r| (*r, p.meters.drops_for(*r)))
                    .filter(|(_, n)| *n > 0)
                    .collect(),
                acl: p
                    .cfg
                    .acls
                    .iter()
                    .zip(&p.meters.acl)
                    .map(|(r, c)| (r.name.clone(), *c))
                    .collect(),
            },
            learned_macs: self.table.count(id),
            tracked_flows: p.acl.tracked_flows(),
        })
    }

    /// Drops counted on a port for one reason.
    pub fn drops(&self, id: PortId, r: DropReason) -> u64 {
        self.port(id).map_or(0, |p| p.meters.drops_for(r))
    }

    pub fn role(&self, id: PortId) -> Option<crate::config::PortRole> {
        self.port(id).map(|p| p.cfg.role)
    }

    /// The link rate an uplink port is shaped to (its `max_egress`), if any.
    pub fn uplink_rate(&self, id: PortId) -> Option<crate::config::RateLimit> {
        self.port(id)
            .filter(|p| p.cfg.role == crate::config::PortRole::Uplink)
            .and_then(|p| p.cfg.qos.max_egress)
    }

    pub fn min_weight(&self, id: PortId) -> u32 {
        self.port(id).map_or(1, |p| p.cfg.qos.min_weight)
    }

    /// Counts a drop that happened outside the pipeline (e.g. a full transmit queue).
    pub fn count_drop(&mut self, id: PortId, r: DropReason) {
        if let Some(p) = self.port_mut(id) {
            p.meters.drop(r);
        }
    }

    pub fn reset_meters(&mut self) {
        // Offloaded traffic is accounted up to now first, so none of it lands after the reset.
        self.invalidate_offloads();
        for p in self.ports.iter_mut().flatten() {
            p.meters.reset();
        }
    }

    pub fn learned(&self, vid: u16, mac: &crate::frame::Mac, now: u64) -> Option<PortId> {
        self.table
            .lookup(self.fid[(vid & 0xfff) as usize], mac, now)
    }

    /// The MACs learned behind port `id` (for status reports), sorted.
    pub fn learned_macs(&self, id: PortId) -> Vec<crate::frame::Mac> {
        self.table.macs(id)
    }

    pub fn mac_table_len(&self) -> usize {
        self.table.len()
    }

    /// Ages the learning table; call about once a second.
    pub fn age(&mut self, now: u64) -> usize {
        let n = self.table.age(now);
        self.note_table_changes();
        n
    }

    /// The offload generation: changes whenever an offload verdict may have changed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The shared offload generation counter (the fast path reads it without the switch lock).
    pub fn generation_counter(&self) -> Arc<AtomicU64> {
        self.generation.clone()
    }

    /// Connects the runtime's kernel fast path (or disconnects it with `None`).
    pub fn set_offload_hook(&mut self, hook: Option<Arc<dyn OffloadHook>>) {
        self.offload_hook = hook;
    }

    /// Whether flows may be offloaded to the kernel at all (`SwitchConfig::fast_path`).
    pub fn fast_path_enabled(&self) -> bool {
        self.cfg.fast_path
    }

    /// Makes every offloaded flow stale and removes them from the kernel before returning,
    /// folding their last counters into the meters.
    fn invalidate_offloads(&mut self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(h) = self.offload_hook.clone() {
            for u in h.purge() {
                self.account_offloaded(&u, None);
            }
        }
    }

    /// A MAC moved or aged out: flows towards or from it may now be wrong. The data path
    /// cannot wait for netlink, so the fast path removes them from its own thread.
    fn note_table_changes(&mut self) {
        // A provider neighbour's new MAC is as much a move as a customer MAC's.
        let c = self.table.changes() + self.overlay.as_ref().map_or(0, |o| o.neighbor_changes());
        if c != self.table_changes {
            self.table_changes = c;
            self.generation.fetch_add(1, Ordering::SeqCst);
            if let Some(h) = &self.offload_hook {
                h.purge_soon();
            }
        }
    }

    /// Adds traffic the kernel forwarded for a flow to the meters of its ports (ingress on
    /// the port it came from, egress on the port it went to) and, when `now` is given and
    /// the flow carried traffic, refreshes its source MAC's age as the frames would have.
    pub fn account_offloaded(&mut self, u: &FlowUse, now: Option<u64>) {
        if u.packets == 0 {
            return;
        }
        let k = &u.key;
        if let Some(p) = self.port_mut(k.ingress) {
            p.meters.ingress.packets += u.packets;
            p.meters.ingress.bytes += u.bytes;
        }
        if let Some(p) = self.port_mut(k.egress) {
            p.meters.egress.packets += u.packets;
            p.meters.egress.bytes += u.bytes;
        }
        if let (Some(now), None) = (now, k.tunnel) {
            let fid = self.fid[(k.vid & 0xfff) as usize];
            self.table.touch(fid, &k.src, k.ingress, now);
        }
        if let Some(l4) = k.l4 {
            // What the ACLs saw of these frames; their rule meters and stateful connections
            // follow the kernel's traffic.
            let s = FrameSummary {
                src: k.src,
                dst: k.dst,
                ethertype: k.ethertype,
                l3: if k.ethertype == ETH_P_IPV6 {
                    L3::Ipv6
                } else {
                    L3::Ipv4
                },
                src_ip: l4.src_ip,
                dst_ip: l4.dst_ip,
                proto: IPPROTO_TCP,
                has_l4: true,
                sport: l4.sport,
                dport: l4.dport,
                ..Default::default()
            };
            for (id, dir) in [
                (k.ingress, Direction::Ingress),
                (k.egress, Direction::Egress),
            ] {
                if let Some(p) = self.port_mut(id) {
                    let p = &mut *p;
                    p.acl
                        .account_offloaded(dir, &s, u.packets, u.bytes, now, &mut p.meters.acl);
                }
            }
        }
    }

    /// Whether the kernel may forward every later frame of this frame's flow the way the
    /// pipeline just did (`d` is the delivery `process` returned for it): only when the
    /// decision cannot depend on anything outside (ingress port, EtherType, source MAC,
    /// destination MAC) for untagged TCP, and the frame leaves byte-identical.
    pub fn offload_verdict(
        &self,
        ingress: PortId,
        frame: &[u8],
        d: &Delivery,
        now: u64,
    ) -> Result<FlowKey, NotOffloadable> {
        use NotOffloadable as N;
        if !self.cfg.fast_path {
            return Err(N::Disabled);
        }
        if !self.extensions.is_empty() {
            return Err(N::Extensions);
        }
        if self.overlay.is_some() {
            return Err(N::Overlay);
        }
        let [e] = d.egress[..] else {
            return Err(N::NotOneDestination);
        };
        if e.mirror || d.dropped.is_some() {
            return Err(N::NotOneDestination);
        }
        let s = parse(frame).map_err(|_| N::NotTcp)?;
        // One tag at most, and a real VID: the kernel sees it in the skb metadata, where the
        // match tests it. A second (inner) tag stays in the bytes and fails the EtherType test.
        if s.tags > 1 || (s.tags == 1 && s.vid == 0) {
            return Err(N::Tagged);
        }
        // Offsets the kernel classifier tests are those of the untagged frame (the tag is in
        // the metadata there); the pipeline sees the tag in-band.
        let at = if s.tags == 1 { 4 } else { 0 };
        let tcp = match (s.l3, s.ethertype) {
            (L3::Ipv4, ETH_P_IPV4) => frame.get(23 + at) == Some(&IPPROTO_TCP),
            (L3::Ipv6, ETH_P_IPV6) => frame.get(20 + at) == Some(&IPPROTO_TCP),
            _ => false,
        };
        if !tcp {
            return Err(N::NotTcp);
        }
        if s.is_multicast_dst() {
            return Err(N::NotUnicast);
        }
        // Tag push (access → trunk) and pop (trunk → access) are eBPF helpers in the kernel;
        // a rewrite to another VID keeps the PCP here and is left to user space.
        let (tag, action) = match (s.tags, e.tag) {
            (0, TagOp::Keep) => (None, TagAction::Keep),
            (0, TagOp::Tag(v)) => (None, TagAction::Push(v & 0x0fff)),
            (1, TagOp::Keep) => (Some(s.vid), TagAction::Keep),
            (1, TagOp::Untag) => (Some(s.vid), TagAction::Pop),
            _ => return Err(N::TagChange),
        };
        let (Some(a), Some(b)) = (self.port(ingress), self.port(e.port)) else {
            return Err(N::NoSuchPort);
        };
        if a.cfg.mirror != MirrorRole::None || b.cfg.mirror != MirrorRole::None {
            return Err(N::Mirror);
        }
        let weighted = b.cfg.role == PortRole::Uplink
            && self
                .ports
                .iter()
                .flatten()
                .any(|p| p.cfg.qos.min_weight != 1);
        // The sender's ingress limit is a policer (`act_police` is not in this kernel): user
        // space. The receiver's egress limit becomes a `tbf` on its netdev, which limits the
        // same bytes at the same long-run rate (it queues where the policer drops).
        if a.cfg.qos.max_ingress.is_some() || weighted {
            return Err(N::Qos);
        }
        let shape = b.cfg.qos.max_egress.map(|r| Shape {
            bytes_per_sec: (r.bits_per_sec / 8).max(1),
            burst: r.burst_bytes.clamp(1514, u32::MAX as u64) as u32,
        });
        // ACL verdicts are functions of MACs, addresses, protocol and ports (and, for replies
        // of stateful rules, of the connection table, kept open by the kernel's counters:
        // `account_offloaded`): a flow an ACL decided is offloaded as that one connection.
        let acl = a
            .cfg
            .acls
            .iter()
            .any(|r| r.direction.covers(Direction::Ingress))
            || b.cfg
                .acls
                .iter()
                .any(|r| r.direction.covers(Direction::Egress));
        // The kernel's connection match reads ports at fixed offsets: no IPv4 options.
        let fixed = s.ethertype != ETH_P_IPV4 || frame.get(14 + at) == Some(&0x45);
        let l4 = match (acl, s.has_l4 && !s.l4_hidden && fixed) {
            (false, _) => None,
            (true, true) => Some(L4Match {
                src_ip: s.src_ip,
                dst_ip: s.dst_ip,
                sport: s.sport,
                dport: s.dport,
            }),
            (true, false) => return Err(N::Acl),
        };
        // Every frame from a guarded port must have its source address checked; the kernel
        // classifier matches MACs only.
        if a.cfg.guard.ip_source_guard {
            return Err(N::SourceGuard);
        }
        // The kernel enforces the netdevs' own MTUs, not a port's configured one.
        if a.cfg.mtu.is_some() || b.cfg.mtu.is_some() {
            return Err(N::Mtu);
        }
        let vid = classify(&a.vlan, &s).map_err(|_| N::NotOneDestination)?;
        let fid = self.fid[(vid & 0xfff) as usize];
        if self.table.lookup(fid, &s.dst, now) != Some(e.port)
            || self.table.lookup(fid, &s.src, now) != Some(ingress)
        {
            return Err(N::NotLearned);
        }
        Ok(FlowKey {
            ingress,
            egress: e.port,
            vid,
            ethertype: s.ethertype,
            src: s.src,
            dst: s.dst,
            tag,
            action,
            l4,
            shape,
            tunnel: None,
        })
    }

    fn drop_at(&mut self, port: PortId, r: DropReason, out: &mut Delivery) {
        if let Some(p) = self.port_mut(port) {
            p.meters.drop(r);
        }
        out.dropped = Some(r);
    }

    /// Runs one frame through the pipeline. `frame` may be rewritten by filter extensions
    /// (and is padded to the Ethernet minimum).
    pub fn process(&mut self, ingress: PortId, frame: &mut Vec<u8>, now: u64, out: &mut Delivery) {
        let len = frame.len();
        self.process_sized(ingress, frame, len, now, out)
    }

    /// [`Switch::process`] for a frame that stands for several on the wire: a TCP super-frame
    /// (segmentation offload) whose largest segment is `wire_len` bytes. The MTU checks apply
    /// to `wire_len`; for an ordinary frame it is the frame's length.
    pub fn process_sized(
        &mut self,
        ingress: PortId,
        frame: &mut Vec<u8>,
        wire_len: usize,
        now: u64,
        out: &mut Delivery,
    ) {
        out.clear();
        let len = frame.len();
        let Some(p) = self
            .ports
            .get_mut(ingress.0 as usize)
            .and_then(|p| p.as_mut())
        else {
            return;
        };
        p.meters.ingress.add(len);
        let mut s = match parse(frame) {
            Ok(s) => s,
            Err(_) => return self.drop_at(ingress, DropReason::Malformed, out),
        };
        // Size checks: nothing after the header, or an IP header that cannot be read, is
        // malformed (the guards could not judge it); the IP packet must fit the port's MTU.
        let l2 = ethertype_offset(s.tags) + 2;
        if len <= l2 || (matches!(s.ethertype, ETH_P_IPV4 | ETH_P_IPV6) && s.l3 == L3::Other) {
            return self.drop_at(ingress, DropReason::Malformed, out);
        }
        let ip_len = wire_len.saturating_sub(l2);
        if ip_len > p.cfg.mtu() {
            return self.drop_at(ingress, DropReason::Oversize, out);
        }
        if len < ETH_MIN_FRAME {
            // What a NIC does on transmit: receivers' stacks ignore the padding (IP and ARP
            // carry their own lengths), and every port sees the same bytes.
            frame.resize(ETH_MIN_FRAME, 0);
        }
        let len = frame.len();
        // Stage 0: a tagged frame on the uplink in a VLAN an overlay gateway serves belongs
        // to the gateway (the physical network), whatever VLANs the uplink carries for L2.
        if p.cfg.role == PortRole::Uplink && s.tags == 1 {
            if let Some(o) = &mut self.overlay {
                if o.gateway_vlan(s.vid) {
                    let v = o.from_uplink(&s, frame, now);
                    if v != crate::overlay::Verdict::Pass {
                        return self.overlay_send(ingress, v, frame, now, out);
                    }
                }
            }
        }
        // Stage 1: ingress policies.
        let vid = match ingress_policies(p, &s, len, now) {
            Ok(v) => v,
            Err(r) => return self.drop_at(ingress, r, out),
        };
        let mirror_in = p.mirror_in;
        let layer = p.cfg.mirror_overlay;
        let (in_overlay, uplink) = (p.cfg.overlay.is_some(), p.cfg.role == PortRole::Uplink);
        let overlay_frame = self.overlay.is_some() && (in_overlay || uplink);
        if overlay_frame && !self.mirror_dests.is_empty() {
            // The overlay rewrites the frame in place; mirrors may want it as it came.
            out.received.extend_from_slice(frame);
        }
        if mirror_in && !overlay_frame {
            self.mirror(ingress, TagOp::Keep, len, Bytes::Frame, out);
        }
        // Stage 1b: network virtualization. Customer frames never reach the L2 table.
        if let Some(o) = &mut self.overlay {
            let redirected = o.relay_counters().redirects_accepted;
            let v = if in_overlay {
                o.from_vm(ingress, &s, frame, now)
            } else if uplink {
                o.from_uplink(&s, frame, now)
            } else {
                crate::overlay::Verdict::Pass
            };
            if o.relay_counters().redirects_accepted != redirected {
                // Kernel overlay flows hold the PA the redirect just moved.
                self.invalidate_offloads();
            }
            self.note_table_changes();
            if mirror_in && overlay_frame {
                self.mirror_overlay_ingress(ingress, uplink, layer, v, frame, out);
            }
            if v != crate::overlay::Verdict::Pass {
                return self.overlay_send(ingress, v, frame, now, out);
            }
        }
        // Stage 2: extensions.
        if !self.extensions.is_empty() {
            match self.run_extensions(ingress, vid, &mut s, frame, now) {
                Ok(()) => {}
                Err(r) => return self.drop_at(ingress, r, out),
            }
        }
        let len = frame.len();
        // Learning, bounded per port: the port's own limit, else the switch's default for VM
        // and host ports; uplinks (a LAN behind them) only by the table's capacity.
        let limit = self.ports[ingress.0 as usize].as_ref().and_then(|p| {
            p.cfg
                .mac_limit
                .or((p.cfg.role != PortRole::Uplink).then_some(self.cfg.port_mac_limit))
        });
        let fid = self.fid[vid as usize];
        if self.table.learn(fid, &s.src, ingress, limit, now) == Learn::LimitReached {
            return self.drop_at(ingress, DropReason::MacLimit, out);
        }
        self.note_table_changes();
        // Stage 3: forwarding.
        let mut cands = std::mem::take(&mut self.candidates);
        cands.clear();
        let unicast = self.forward(ingress, vid, &s, frame, now, &mut cands);
        let mut blocked = None;
        // Stage 4: egress policies, then delivery.
        for &dst in &cands {
            if dst == ingress {
                continue;
            }
            let Some(dp) = self.ports.get_mut(dst.0 as usize).and_then(|p| p.as_mut()) else {
                continue;
            };
            // Checked after the VLAN reach (a flood skips ports outside it silently); the IP
            // packet is the same size whatever tag it leaves with.
            let mtu = dp.cfg.mtu();
            let verdict = egress_policies(dp, vid, &s, len, now)
                .and_then(|tag| (ip_len <= mtu).then_some(tag).ok_or(DropReason::Oversize));
            match verdict {
                Ok(tag) => {
                    dp.meters.egress.add(tag_len(len, tag, &s));
                    let mirror_out = dp.mirror_out;
                    out.egress.push(Egress {
                        port: dst,
                        tag,
                        mirror: false,
                        bytes: Bytes::Frame,
                    });
                    if mirror_out {
                        self.mirror(dst, tag, tag_len(len, tag, &s), Bytes::Frame, out);
                    }
                }
                // Isolation on a flood just means "not in this domain"; on a unicast it is a
                // blocked attempt, counted against the sender.
                Err(DropReason::Isolation) if unicast => {
                    blocked = Some(DropReason::Isolation);
                    if let Some(ip) = self.port_mut(ingress) {
                        ip.meters.drop(DropReason::Isolation);
                    }
                }
                Err(DropReason::Isolation) => {}
                Err(r) => {
                    blocked = Some(r);
                    dp.meters.drop(r);
                }
            }
        }
        self.candidates = cands;
        if unicast && !out.egress.iter().any(|e| !e.mirror) {
            out.dropped = blocked;
        }
    }

    /// Processes a batch: `deliver` is called with each frame's index and delivery.
    pub fn process_batch(
        &mut self,
        ingress: PortId,
        frames: &mut [Vec<u8>],
        now: u64,
        out: &mut Delivery,
        mut deliver: impl FnMut(usize, &[u8], &Delivery),
    ) {
        for (i, f) in frames.iter_mut().enumerate() {
            self.process(ingress, f, now, out);
            deliver(i, f, out);
        }
    }

    /// Delivers what the overlay made of a frame: customer frames through the destination
    /// ports' egress policies (judged on the customer frame), provider frames and answers as
    /// they are.
    fn overlay_send(
        &mut self,
        ingress: PortId,
        v: crate::overlay::Verdict,
        frame: &[u8],
        now: u64,
        out: &mut Delivery,
    ) {
        use crate::overlay::{Target, Verdict};
        let (to, counted) = match v {
            Verdict::Pass | Verdict::Consumed => return,
            Verdict::Drop(r) => return self.drop_at(ingress, r, out),
            Verdict::Send { to, counted } => (to, counted),
        };
        if let Some(r) = counted {
            if let Some(p) = self.port_mut(ingress) {
                p.meters.drop(r);
            }
            out.dropped = Some(r);
        }
        let len = frame.len();
        let mut cands = std::mem::take(&mut self.candidates);
        cands.clear();
        let customer = match to {
            Target::Port(p) => {
                cands.push(p);
                true
            }
            Target::Subnet(vsid) => {
                if let Some(o) = &self.overlay {
                    cands.extend(o.subnet_ports(vsid).filter(|p| *p != ingress));
                }
                true
            }
            Target::Uplink => {
                cands.extend(self.active.iter().copied().filter(|id| {
                    self.port(*id)
                        .is_some_and(|p| p.cfg.role == PortRole::Uplink)
                }));
                cands.truncate(1);
                false
            }
            Target::Back => {
                cands.push(ingress);
                false
            }
        };
        let s = if customer { parse(frame).ok() } else { None };
        for &dst in &cands {
            let Some(dp) = self.ports.get_mut(dst.0 as usize).and_then(|p| p.as_mut()) else {
                continue;
            };
            let tag = match &s {
                Some(s) => {
                    let verdict = classify(&dp.vlan, s).and_then(|vid| {
                        egress_policies(dp, vid, s, len, now).and_then(|tag| {
                            (len - 14 <= dp.cfg.mtu())
                                .then_some(tag)
                                .ok_or(DropReason::Oversize)
                        })
                    });
                    match verdict {
                        Ok(t) => t,
                        Err(r) => {
                            dp.meters.drop(r);
                            if matches!(to, Target::Port(_)) {
                                out.dropped = Some(r);
                            }
                            continue;
                        }
                    }
                }
                None => TagOp::Keep,
            };
            dp.meters.egress.add(len);
            let mirror_out = dp.mirror_out;
            let inner_view =
                !customer && dp.cfg.mirror_overlay == crate::config::MirrorLayer::Inner;
            out.egress.push(Egress {
                port: dst,
                tag,
                mirror: false,
                bytes: Bytes::Frame,
            });
            if mirror_out && !inner_view {
                self.mirror(dst, tag, len, Bytes::Frame, out);
            } else if mirror_out && fill_inner(frame, &mut out.inner) {
                // Provider frames that carry no customer frame (ARP for a next hop) have
                // nothing to show on an inner mirror.
                let n = out.inner.len();
                self.mirror(dst, TagOp::Keep, n, Bytes::Inner, out);
            }
        }
        self.candidates = cands;
    }

    /// Ingress mirror copies of a frame the overlay took from a VM port or the uplink: a VM
    /// port's customer frame as it came; the uplink's tunnel packet as it came (outer), or
    /// the customer frame in it (inner: what the overlay decapsulated, or what it relayed).
    fn mirror_overlay_ingress(
        &mut self,
        ingress: PortId,
        uplink: bool,
        layer: crate::config::MirrorLayer,
        v: crate::overlay::Verdict,
        frame: &[u8],
        out: &mut Delivery,
    ) {
        use crate::overlay::{Target, Verdict};
        let bytes = match (uplink, layer, v) {
            (false, ..) | (true, crate::config::MirrorLayer::Outer, _) => Bytes::Received,
            // Not tunnel traffic: the uplink's ordinary L2 frames, the same either way.
            (true, _, Verdict::Pass) => Bytes::Frame,
            (
                true,
                _,
                Verdict::Send {
                    to: Target::Port(_) | Target::Subnet(_),
                    ..
                },
            ) => Bytes::Frame,
            // A relayed packet: the customer frame in what goes on to the VM's new host.
            (
                true,
                _,
                Verdict::Send {
                    to: Target::Uplink, ..
                },
            ) if fill_inner(frame, &mut out.inner) => Bytes::Inner,
            // Provider-only frames (ARP for our PAs, redirects) and drops: no customer frame.
            _ => return,
        };
        let len = match bytes {
            Bytes::Frame => frame.len(),
            Bytes::Received => out.received.len(),
            Bytes::Inner => out.inner.len(),
        };
        self.mirror(ingress, TagOp::Keep, len, bytes, out);
    }

    fn mirror(&mut self, source: PortId, tag: TagOp, len: usize, bytes: Bytes, out: &mut Delivery) {
        for i in 0..self.mirror_dests.len() {
            let d = self.mirror_dests[i];
            if d == source {
                continue;
            }
            if let Some(p) = self.port_mut(d) {
                p.meters.egress.add(len);
                out.egress.push(Egress {
                    port: d,
                    tag,
                    mirror: true,
                    bytes,
                });
            }
        }
    }

    /// Stage 2: capture extensions see the frame, then filters may drop or rewrite it.
    fn run_extensions(
        &mut self,
        ingress: PortId,
        vid: u16,
        s: &mut FrameSummary,
        frame: &mut Vec<u8>,
        now: u64,
    ) -> Result<(), DropReason> {
        let name = self
            .port(ingress)
            .map(|p| p.cfg.name.clone())
            .unwrap_or_default();
        for e in self
            .extensions
            .iter_mut()
            .filter(|e| e.kind() == ExtensionKind::Capture)
        {
            let ctx = FrameContext {
                ingress,
                ingress_name: &name,
                vid,
                summary: s,
                now,
            };
            e.capture(&ctx, frame);
        }
        for i in 0..self.extensions.len() {
            if self.extensions[i].kind() != ExtensionKind::Filter {
                continue;
            }
            let ctx = FrameContext {
                ingress,
                ingress_name: &name,
                vid,
                summary: s,
                now,
            };
            match self.extensions[i].filter(&ctx, frame) {
                FilterVerdict::Pass => {}
                FilterVerdict::Drop => return Err(DropReason::ExtensionFilter),
                FilterVerdict::Modified => *s = parse(frame).map_err(|_| DropReason::Malformed)?,
            }
        }
        Ok(())
    }

    /// Stage 3: destinations for a frame. Returns true when it is a known-unicast decision
    /// (as opposed to a flood).
    fn forward(
        &mut self,
        ingress: PortId,
        vid: u16,
        s: &FrameSummary,
        frame: &[u8],
        now: u64,
        out: &mut Vec<PortId>,
    ) -> bool {
        if let Some(fx) = self.forwarding {
            let name = self
                .port(ingress)
                .map(|p| p.cfg.name.clone())
                .unwrap_or_default();
            let ctx = FrameContext {
                ingress,
                ingress_name: &name,
                vid,
                summary: s,
                now,
            };
            if self.extensions[fx].forward(&ctx, frame, out) {
                return true;
            }
            out.clear();
        }
        if !s.is_multicast_dst() {
            if let Some(p) = self.table.lookup(self.fid[vid as usize], &s.dst, now) {
                out.push(p);
                return true;
            }
        }
        for &id in &self.active {
            // Virtual-subnet ports get frames from the overlay only.
            if id != ingress
                && self.ports[id.0 as usize]
                    .as_ref()
                    .is_some_and(|p| p.vlan.rx.contains(vid) && p.cfg.overlay.is_none())
            {
                out.push(id);
            }
        }
        false
    }
}

fn tag_len(len: usize, tag: TagOp, s: &FrameSummary) -> usize {
    match tag {
        TagOp::Untag if s.tags > 0 => len - 4,
        TagOp::Tag(_) if s.tags == 0 => len + 4,
        _ => len,
    }
}

/// The customer frame inside tunnel packet `frame`, into `inner`; false when `frame` is no
/// tunnel packet (an ARP request for a provider neighbour).
fn fill_inner(frame: &[u8], inner: &mut Vec<u8>) -> bool {
    match crate::overlay::encap::decapsulate(frame) {
        Ok(t) => {
            inner.clear();
            inner.extend_from_slice(&frame[t.inner.0..t.inner.1]);
            true
        }
        Err(_) => false,
    }
}
