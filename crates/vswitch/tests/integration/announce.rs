//! Announcing a port (`vireo_vswitch::announce`, `SwitchRuntime::inject`; docs/vswitch.md,
//! "Announce"): the RARP per MAC and the gratuitous ARP per address go out of every other port
//! of the port's VLAN and the uplink (tagged there), not into other VLANs, and the local table
//! learns the MACs, because they run through the pipeline as if the port had sent them.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vireo_netport::{channel_pair, ChannelPort, FramePort};
use vireo_vswitch::announce::{announce_frames, gratuitous_arp, rarp};
use vireo_vswitch::runtime::{lock, SwitchRuntime};
use vireo_vswitch::{MacAddr, PortConfig, PortId, PortRole, Switch, SwitchConfig, VlanConfig};

const M1: [u8; 6] = [0x52, 0x54, 0, 0x77, 0, 1];
const M2: [u8; 6] = [0x52, 0x54, 0, 0x77, 0, 2];
const PEER: [u8; 6] = [0x52, 0x54, 0, 0x77, 0, 9];
const IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 7);

/// Every frame `port` receives within `ms` of quiet.
fn drain(port: &ChannelPort, ms: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 9216];
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_millis(ms) {
        match port.recv(&mut buf) {
            Ok(Some(n)) => {
                out.push(buf[..n].to_vec());
                last = Instant::now();
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    out
}

fn tagged(f: &[u8], vid: u16) -> Vec<u8> {
    let mut out = f[..12].to_vec();
    out.extend_from_slice(&[0x81, 0x00]);
    out.extend_from_slice(&vid.to_be_bytes());
    out.extend_from_slice(&f[12..]);
    out
}

#[test]
fn announce_reaches_the_vlan_and_the_uplink_and_teaches_the_local_table() {
    let mut vm = PortConfig::access("vm", 10);
    vm.macs = vec![MacAddr(M1)];
    vm.guard.mac_spoofing = true; // so the switch can learn M2 behind it too
    vm.guard.arp_nd_guard = true;
    vm.guard.allowed_ipv4 = vec![IP];
    let up = PortConfig {
        role: PortRole::Uplink,
        vlan: VlanConfig::Trunk {
            allowed: vec![10, 20],
            native: None,
        },
        ..PortConfig::access("up", 1)
    };
    let mut sw = Switch::new(SwitchConfig::private("announce")).unwrap();
    let ids: Vec<PortId> = [
        vm.clone(),
        PortConfig::access("peer", 10),
        PortConfig::access("other", 20),
        up,
    ]
    .into_iter()
    .map(|p| sw.add_port(p).unwrap())
    .collect();
    let sw = Arc::new(Mutex::new(sw));
    let rt = SwitchRuntime::start(sw.clone()).unwrap();
    let mut ends = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (s, v) = channel_pair(&format!("ann-s{i}"), &format!("ann-v{i}")).unwrap();
        rt.attach(*id, Arc::new(s));
        ends.push(v);
    }
    let (vm_end, peer, other, uplink) = (&ends[0], &ends[1], &ends[2], &ends[3]);

    // The VM has used M2 too (e.g. a second interface): the switch learned it.
    let mut f = [PEER, M2].concat();
    f.extend_from_slice(&[0x88, 0xb5]);
    f.resize(60, 0);
    vm_end.send(&f).unwrap();
    let _ = (drain(peer, 100), drain(other, 1), drain(uplink, 1));
    let learned = lock(&sw).learned_macs(ids[0]);
    assert_eq!(learned, vec![M2]);
    assert_eq!(lock(&sw).learned(10, &M1, 0), None);

    let frames = announce_frames(&vm, &learned);
    let want = vec![rarp(M1), rarp(M2), gratuitous_arp(M1, IP)];
    assert_eq!(frames, want);
    rt.inject(ids[0], frames);

    assert_eq!(drain(peer, 200), want, "the port's VLAN gets every frame");
    assert_eq!(
        drain(uplink, 50),
        want.iter().map(|f| tagged(f, 10)).collect::<Vec<_>>(),
        "the uplink trunk gets them tagged with the port's VLAN"
    );
    assert_eq!(drain(other, 50), Vec::<Vec<u8>>::new(), "not into VLAN 20");
    assert!(
        drain(vm_end, 20).is_empty(),
        "nothing back to the port itself"
    );
    // The local table: both MACs behind the announced port.
    let sw_now = lock(&sw);
    assert_eq!(sw_now.learned_macs(ids[0]), vec![M1, M2]);
    drop(sw_now);
    rt.stop().unwrap();
}

#[test]
fn announce_frames_obey_the_ports_guards() {
    // The ARP guard lists 10.0.0.7 only; an address the guard does not allow is refused by
    // the pipeline like any ARP the VM sent (here: a frame built by hand, as `announce_frames`
    // only uses the guard's own list).
    let mut vm = PortConfig::access("vm", 1);
    vm.macs = vec![MacAddr(M1)];
    vm.guard.arp_nd_guard = true;
    vm.guard.allowed_ipv4 = vec![IP];
    let mut sw = Switch::new(SwitchConfig::private("announce-guard")).unwrap();
    let a = sw.add_port(vm).unwrap();
    let b = sw.add_port(PortConfig::access("b", 1)).unwrap();
    let sw = Arc::new(Mutex::new(sw));
    let rt = SwitchRuntime::start(sw.clone()).unwrap();
    let (sa, _va) = channel_pair("ag-sa", "ag-va").unwrap();
    let (sb, vb) = channel_pair("ag-sb", "ag-vb").unwrap();
    rt.attach(a, Arc::new(sa));
    rt.attach(b, Arc::new(sb));
    rt.inject(
        a,
        vec![
            gratuitous_arp(M1, Ipv4Addr::new(10, 0, 0, 99)),
            gratuitous_arp(M1, IP),
        ],
    );
    assert_eq!(drain(&vb, 200), vec![gratuitous_arp(M1, IP)]);
    rt.stop().unwrap();
}
