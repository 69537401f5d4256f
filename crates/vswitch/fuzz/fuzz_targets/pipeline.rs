//! Arbitrary bytes through the frame parser and the full pipeline (every policy enabled):
//! nothing may panic. The first input byte picks the ingress port; the rest are frames
//! separated by their own length bytes, so one input can exercise learning and state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo_vswitch::*;

fn switch() -> Switch {
    let mut sc = SwitchConfig::private("fuzz");
    sc.pvlan_domains = vec![PvlanDomain { primary: 100, isolated: Some(101), communities: vec![102] }];
    let mut sw = Switch::new(sc).unwrap();
    let mut a = PortConfig {
        vlan: VlanConfig::Private { primary: 100, secondary: 102, mode: PvlanMode::Community },
        ..PortConfig::access("a", 1)
    };
    a.macs = vec![MacAddr([2, 0, 0, 0, 0, 1])];
    a.guard.arp_nd_guard = true;
    a.guard.allowed_ipv4 = vec![[10, 0, 0, 1].into()];
    a.storm_limit_pps = Some(10);
    a.mac_limit = Some(2);
    a.qos.max_ingress = Some(RateLimit { bits_per_sec: 1_000_000, burst_bytes: 3000 });
    a.mirror = MirrorRole::Source(Direction::Both);
    a.acls = vec![AclRule {
        name: "s".into(),
        priority: 1,
        direction: Direction::Both,
        action: AclAction::Allow,
        local_mac: None,
        remote_mac: None,
        local_ip: Some("10.0.0.0/8".parse().unwrap()),
        remote_ip: None,
        protocol: Some(6),
        local_ports: None,
        remote_ports: Some(PortRange { first: 1, last: 1000 }),
        stateful: true,
    }];
    sw.add_port(a).unwrap();
    sw.add_port(PortConfig {
        vlan: VlanConfig::Private { primary: 100, secondary: 0, mode: PvlanMode::Promiscuous },
        ..PortConfig::access("p", 1)
    })
    .unwrap();
    sw.add_port(PortConfig { vlan: VlanConfig::Trunk { allowed: vec![1, 100, 101, 102], native: Some(1) }, ..PortConfig::access("t", 1) })
        .unwrap();
    sw.add_port(PortConfig { mirror: MirrorRole::Destination, ..PortConfig::access("m", 2) }).unwrap();
    sw
}

fuzz_target!(|data: &[u8]| {
    let _ = frame::parse(data);
    let mut sw = switch();
    let ports = sw.ports().to_vec();
    let mut d = Delivery::default();
    let mut rest = data;
    let mut now = 0u64;
    while let Some((&hdr, tail)) = rest.split_first() {
        let len = (hdr as usize).min(tail.len());
        let (f, next) = tail.split_at(len);
        let mut frame = f.to_vec();
        sw.process(ports[hdr as usize % ports.len()], &mut frame, now, &mut d);
        let mut buf = Vec::new();
        for e in d.egress.clone() {
            let _ = render(&frame, e.tag, &mut buf);
        }
        now += 1_000_000;
        rest = next;
    }
});
