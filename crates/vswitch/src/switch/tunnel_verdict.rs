//! The offload verdict of overlay frames: the switch's side (ports, QoS, ACLs, mirrors) of
//! whether the kernel may carry the rest of a connection the overlay just encapsulated or
//! decapsulated; the overlay's side is `overlay/offload.rs`.

use super::{Delivery, Switch};
use crate::config::{MirrorRole, PortRole};
use crate::fastpath::{FlowKey, NotOffloadable, Shape, TagAction};
use crate::vlan::TagOp;
use crate::PortId;

impl Switch {
    /// Whether every later frame of this frame's TCP connection may go through the kernel as
    /// this one went through the overlay. `arrived`: the frame as it entered `ingress` (for
    /// decap, the outer headers); `sent`: what the pipeline made of it; `d`: its delivery.
    pub fn tunnel_offload_verdict(
        &self,
        ingress: PortId,
        arrived: &[u8],
        sent: &[u8],
        d: &Delivery,
    ) -> Result<FlowKey, NotOffloadable> {
        use NotOffloadable as N;
        if !self.cfg.fast_path {
            return Err(N::Disabled);
        }
        if !self.extensions.is_empty() {
            return Err(N::Extensions);
        }
        let o = self.overlay.as_ref().ok_or(N::OverlayFlow)?;
        let [e] = d.egress[..] else {
            return Err(N::NotOneDestination);
        };
        if e.mirror || d.dropped.is_some() {
            return Err(N::NotOneDestination);
        }
        if e.tag != TagOp::Keep {
            return Err(N::TagChange);
        }
        let (Some(a), Some(b)) = (self.port(ingress), self.port(e.port)) else {
            return Err(N::NoSuchPort);
        };
        if a.cfg.mirror != MirrorRole::None || b.cfg.mirror != MirrorRole::None {
            return Err(N::Mirror);
        }
        let encap = a.cfg.overlay.is_some() && b.cfg.role == PortRole::Uplink;
        let decap = a.cfg.role == PortRole::Uplink && b.cfg.overlay.is_some();
        let (vm, uplink) = match (encap, decap) {
            (true, false) => (a, b),
            (false, true) => (b, a),
            _ => return Err(N::OverlayFlow),
        };
        // The uplink's own policies act on provider frames in user space; none may apply.
        let weighted = self
            .ports
            .iter()
            .flatten()
            .any(|p| p.cfg.qos.min_weight != 1);
        if uplink.cfg.qos.max_ingress.is_some()
            || uplink.cfg.qos.max_egress.is_some()
            || weighted
            || (encap && vm.cfg.qos.max_ingress.is_some())
        {
            return Err(N::Qos);
        }
        if !uplink.cfg.acls.is_empty() {
            return Err(N::Acl);
        }
        if vm.cfg.guard.ip_source_guard {
            return Err(N::SourceGuard);
        }
        if uplink.cfg.mtu.is_some() {
            return Err(N::Mtu);
        }
        // The VM port's ACLs judged this connection (the match is the exact connection); its
        // egress limit becomes a tbf on its netdev, as for plain flows.
        let flow = if encap {
            o.encap_offload(ingress, sent, vm.cfg.mtu())?
        } else {
            o.decap_offload(arrived, sent, e.port, vm.cfg.mtu())?
        };
        let shape = if decap {
            vm.cfg.qos.max_egress.map(|r| Shape {
                bytes_per_sec: (r.bits_per_sec / 8).max(1),
                burst: r.burst_bytes.clamp(1514, u32::MAX as u64) as u32,
            })
        } else {
            None
        };
        Ok(FlowKey {
            ingress,
            egress: e.port,
            vid: 0,
            ethertype: flow.inner.ethertype,
            src: flow.inner.src,
            dst: flow.inner.dst,
            tag: None,
            action: TagAction::Keep,
            l4: flow.inner.l4,
            shape,
            tunnel: Some(flow.tunnel),
        })
    }
}
