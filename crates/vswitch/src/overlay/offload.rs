//! Which overlay frames the kernel may carry for the rest of their connection
//! (`fastpath/tunnel.rs` builds the programs). Pure: the frame the pipeline produced (and, for
//! decap, the frame as it arrived) in, the kernel's match and rewrite out.
//!
//! The rule, as for plain flows: nothing in the overlay's decision may differ for a later frame
//! of the same TCP/IPv4 connection. The kernel match is the exact connection (MACs, addresses,
//! ports, no IP options, no fragments) plus, for decap, the outer fields the decision read
//! (our MAC and PA, the peer PA the policy table holds for the inner source, VNI); what else
//! the decision read — the policy entries, the provider neighbour, the ports — bumps the
//! switch's offload generation when it changes, which removes the kernel flows.

use std::net::IpAddr;

use vireo_netconfig::Encap;

use super::encap::decapsulate;
use super::Overlay;
use crate::fastpath::checks::{FlowMatch, L4Match};
use crate::fastpath::tunnel::{Tunnel, ENCAP_HEADER, VXLAN_OVERHEAD};
use crate::fastpath::NotOffloadable;
use crate::frame::{parse, FrameSummary, ETH_P_IPV4, IPPROTO_TCP, L3};
use crate::PortId;

/// An overlay connection the kernel may carry: its customer frames' match and the rewrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelFlow {
    pub inner: FlowMatch,
    pub tunnel: Tunnel,
}

/// The customer connection of an untagged TCP/IPv4 frame with a 20-byte header, not a
/// fragment; the fixed offsets the kernel match reads.
fn connection(frame: &[u8], s: &FrameSummary) -> Result<FlowMatch, NotOffloadable> {
    if s.tags != 0 {
        return Err(NotOffloadable::Tagged);
    }
    if s.l3 != L3::Ipv4
        || s.ethertype != ETH_P_IPV4
        || s.proto != IPPROTO_TCP
        || !s.has_l4
        || s.frag.is_some()
        || frame.get(14) != Some(&0x45)
    {
        return Err(NotOffloadable::NotTcp);
    }
    if s.is_multicast_dst() {
        return Err(NotOffloadable::NotUnicast);
    }
    Ok(FlowMatch {
        ethertype: ETH_P_IPV4,
        src: s.src,
        dst: s.dst,
        tag: None,
        l4: Some(L4Match {
            src_ip: s.src_ip,
            dst_ip: s.dst_ip,
            sport: s.sport,
            dport: s.dport,
        }),
    })
}

fn v4(ip: IpAddr) -> Option<u32> {
    match ip {
        IpAddr::V4(a) => Some(u32::from(a)),
        IpAddr::V6(_) => None,
    }
}

impl Overlay {
    /// A frame from VM port `port` that the overlay sent to the uplink as `sent` (the
    /// encapsulated frame): the kernel may encapsulate the rest of its connection when it was
    /// bridged, not routed (the inner frame left as the VM sent it), over VXLAN and IPv4, to
    /// the PA the policy table holds for the destination. `port_mtu`: the VM port's own MTU.
    pub fn encap_offload(
        &self,
        port: PortId,
        sent: &[u8],
        port_mtu: usize,
    ) -> Result<TunnelFlow, NotOffloadable> {
        let n = NotOffloadable::OverlayFlow;
        let p = self.ports.get(&port).ok_or(n)?;
        let t = decapsulate(sent).map_err(|_| n)?;
        if t.encap != Encap::Vxlan || t.inner.0 != VXLAN_OVERHEAD || !self.is_ours(t.outer_src) {
            return Err(n);
        }
        let inner = &sent[t.inner.0..t.inner.1];
        let s = parse(inner).map_err(|_| NotOffloadable::NotTcp)?;
        let m = connection(inner, &s)?;
        // Routed frames are rewritten (MACs, TTL) on the way; the kernel only adds headers.
        if s.src != p.mac || t.vsid != p.vsid {
            return Err(n);
        }
        let dst_ca = IpAddr::V4((s.dst_ip as u32).into());
        let e = self.table.get(p.rd, dst_ca).ok_or(n)?;
        if e.mac != s.dst || e.vsid != p.vsid || e.pa != t.outer_dst || v4(e.pa).is_none() {
            return Err(n);
        }
        let room = (self.cfg.provider_mtu as usize).saturating_sub(VXLAN_OVERHEAD);
        let mut header = [0u8; ENCAP_HEADER];
        header.copy_from_slice(&sent[..ENCAP_HEADER]);
        Ok(TunnelFlow {
            inner: m,
            tunnel: Tunnel::Encap {
                header,
                max_ip_len: room.min(port_mtu).min(u16::MAX as usize) as u16,
            },
        })
    }

    /// A tunnel packet from the uplink (`arrived`, as received) that the overlay delivered to
    /// a local VM port as `delivered`: the kernel may decapsulate the rest of its connection
    /// when it came over VXLAN/IPv4 from the PA the policy table holds for the inner source
    /// (never a frame from another PA: the outer source is part of the match).
    pub fn decap_offload(
        &self,
        arrived: &[u8],
        delivered: &[u8],
        to: PortId,
        port_mtu: usize,
    ) -> Result<TunnelFlow, NotOffloadable> {
        let n = NotOffloadable::OverlayFlow;
        let p = self.ports.get(&to).ok_or(n)?;
        let t = decapsulate(arrived).map_err(|_| n)?;
        if t.encap != Encap::Vxlan
            || t.inner.0 != VXLAN_OVERHEAD
            || arrived.get(14) != Some(&0x45)
            || !self.is_ours(t.outer_dst)
            || t.vsid != p.vsid
        {
            return Err(n);
        }
        let inner = &arrived[t.inner.0..t.inner.1];
        // Delivered unchanged (bridged in the subnet, not routed or forwarded on).
        if delivered.get(..inner.len()) != Some(inner) {
            return Err(n);
        }
        let s = parse(inner).map_err(|_| NotOffloadable::NotTcp)?;
        let m = connection(inner, &s)?;
        if s.dst != p.mac {
            return Err(n);
        }
        let src_ca = IpAddr::V4((s.src_ip as u32).into());
        let e = self.table.get(p.rd, src_ca).ok_or(n)?;
        if e.pa != t.outer_src || e.mac != s.src || e.vsid != t.vsid {
            return Err(NotOffloadable::OverlayFlow);
        }
        let (Some(our_pa), Some(peer_pa)) = (v4(t.outer_dst), v4(t.outer_src)) else {
            return Err(n);
        };
        Ok(TunnelFlow {
            inner: m,
            tunnel: Tunnel::Decap {
                our_mac: self.cfg.provider_mac.0,
                our_pa,
                peer_pa,
                vni: t.vsid,
                max_ip_len: port_mtu.min(u16::MAX as usize) as u16,
                provider_mtu: self.cfg.provider_mtu.min(u16::MAX as u32) as u16,
            },
        })
    }
}
