//! Frame builders (etherparse) and switch helpers shared by the integration tests.

pub mod dhcp;
pub mod host;
pub mod netns;

use etherparse::{ArpHardwareId, ArpOperation, ArpPacket, EtherType, PacketBuilder, VlanId};
use vireo_vswitch::frame::Mac;
use vireo_vswitch::{Delivery, DropReason, PortId, Switch};

pub const BCAST: Mac = [0xff; 6];

pub fn mac(n: u8) -> Mac {
    [0x02, 0, 0, 0, 0, n]
}

pub fn ip4(n: u8) -> [u8; 4] {
    [10, 0, 0, n]
}

pub fn ip6(n: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[15] = n;
    a
}

pub fn udp4(
    src: Mac,
    dst: Mac,
    sip: [u8; 4],
    dip: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src, dst)
        .ipv4(sip, dip, 64)
        .udp(sport, dport);
    let mut f = Vec::new();
    b.write(&mut f, payload).unwrap();
    f
}

pub fn tcp4(src: Mac, dst: Mac, sip: [u8; 4], dip: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src, dst)
        .ipv4(sip, dip, 64)
        .tcp(sport, dport, 1, 65535);
    let mut f = Vec::new();
    b.write(&mut f, &[]).unwrap();
    f
}

pub fn tagged_udp4(src: Mac, dst: Mac, vid: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src, dst)
        .single_vlan(VlanId::try_new(vid).unwrap())
        .ipv4(ip4(1), ip4(2), 64)
        .udp(1000, 2000);
    let mut f = Vec::new();
    b.write(&mut f, &[0; 18]).unwrap();
    f
}

pub fn double_tagged(src: Mac, dst: Mac, outer: u16, inner: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src, dst)
        .double_vlan(
            VlanId::try_new(outer).unwrap(),
            VlanId::try_new(inner).unwrap(),
        )
        .ipv4(ip4(1), ip4(2), 64)
        .udp(1000, 2000);
    let mut f = Vec::new();
    b.write(&mut f, &[0; 18]).unwrap();
    f
}

pub fn plain(src: Mac, dst: Mac) -> Vec<u8> {
    udp4(src, dst, ip4(1), ip4(2), 1000, 2000, &[0; 18])
}

pub fn arp(op: ArpOperation, src: Mac, sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let dst = if op == ArpOperation::REQUEST {
        BCAST
    } else {
        mac(99)
    };
    let pkt = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        op,
        &src,
        &sender_ip,
        &[0; 6],
        &target_ip,
    )
    .unwrap();
    let b = PacketBuilder::ethernet2(src, dst).arp(pkt);
    let mut f = Vec::new();
    b.write(&mut f).unwrap();
    f
}

pub fn icmp6(
    src: Mac,
    dst: Mac,
    sip: [u8; 16],
    dip: [u8; 16],
    ty: u8,
    target: [u8; 16],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src, dst)
        .ipv6(sip, dip, 255)
        .icmpv6_raw(ty, 0, [0; 4]);
    let mut f = Vec::new();
    b.write(&mut f, &target).unwrap();
    f
}

pub fn dhcp4(src: Mac, op: u8, msg_type: u8) -> Vec<u8> {
    let p = dhcp::bootp(op, msg_type, 244);
    let (sp, dp) = if op == 2 { (67, 68) } else { (68, 67) };
    udp4(src, BCAST, ip4(1), [255; 4], sp, dp, &p)
}

pub fn dhcp6(src: Mac, msg_type: u8) -> Vec<u8> {
    let mut d = [0u8; 16];
    d[0] = 0xff;
    d[1] = 0x02;
    d[15] = 2;
    let b = PacketBuilder::ethernet2(src, [0x33, 0x33, 0, 1, 0, 2])
        .ipv6(ip6(1), d, 1)
        .udp(547, 546);
    let mut f = Vec::new();
    b.write(&mut f, &[msg_type, 0, 0, 1]).unwrap();
    f
}

/// Runs one frame; returns the ports that got a normal copy (sorted) and the drop reason.
pub fn send(sw: &mut Switch, port: PortId, frame: &[u8]) -> (Vec<PortId>, Option<DropReason>) {
    send_at(sw, port, frame, 1)
}

pub fn send_at(
    sw: &mut Switch,
    port: PortId,
    frame: &[u8],
    now: u64,
) -> (Vec<PortId>, Option<DropReason>) {
    let mut d = Delivery::default();
    let mut f = frame.to_vec();
    sw.process(port, &mut f, now, &mut d);
    let mut ports = d.ports();
    ports.sort();
    (ports, d.dropped)
}

/// The nice value of this process's threads named `name` (Linux keeps one per thread).
pub fn thread_nices(name: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, nice field 19.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        if let Some(n) = rest.split_whitespace().nth(16).and_then(|v| v.parse().ok()) {
            out.push(n);
        }
    }
    out
}
