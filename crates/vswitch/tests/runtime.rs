//! The runtime thread moving frames between in-process channel ports and the pipeline.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use vireo_netport::{channel_pair, ChannelPort, FramePort};
use vireo_vswitch::runtime::{lock, SwitchRuntime};
use vireo_vswitch::*;

fn recv_within(p: &ChannelPort, d: Duration) -> Option<Vec<u8>> {
    let end = Instant::now() + d;
    let mut buf = vec![0u8; 2048];
    while Instant::now() < end {
        if let Some(n) = p.recv(&mut buf).unwrap() {
            return Some(buf[..n].to_vec());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

#[test]
fn frames_flow_between_channel_ports_and_policy_changes_apply_live() {
    let mut sw = Switch::new(SwitchConfig::private("rt")).unwrap();
    let ids: Vec<PortId> = ["a", "b", "c"]
        .iter()
        .map(|n| sw.add_port(PortConfig::access(n, 1)).unwrap())
        .collect();
    let sw = Arc::new(Mutex::new(sw));
    let rt = SwitchRuntime::start(sw.clone()).unwrap();
    let mut vm = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (switch_side, vm_side) = channel_pair(&format!("sw{i}"), &format!("vm{i}")).unwrap();
        rt.attach(*id, Arc::new(switch_side));
        vm.push(vm_side);
    }
    std::thread::sleep(Duration::from_millis(50));
    let f = plain(mac(1), BCAST);
    vm[0].send(&f).unwrap();
    assert_eq!(
        recv_within(&vm[1], Duration::from_secs(5)).as_deref(),
        Some(&f[..])
    );
    assert_eq!(
        recv_within(&vm[2], Duration::from_secs(5)).as_deref(),
        Some(&f[..])
    );
    let g = plain(mac(2), mac(1));
    vm[1].send(&g).unwrap();
    assert_eq!(
        recv_within(&vm[0], Duration::from_secs(5)).as_deref(),
        Some(&g[..])
    );
    assert_eq!(
        recv_within(&vm[2], Duration::from_millis(200)),
        None,
        "learned unicast is not flooded"
    );

    // Move c to another VLAN while the runtime runs; it stops hearing a's broadcasts.
    lock(&sw)
        .set_port_config(ids[2], PortConfig::access("c", 2))
        .unwrap();
    vm[0].send(&f).unwrap();
    assert!(recv_within(&vm[1], Duration::from_secs(5)).is_some());
    assert_eq!(recv_within(&vm[2], Duration::from_millis(200)), None);
    let st = lock(&sw).status(ids[0]).unwrap();
    assert_eq!(st.meters.ingress.packets, 2);
    rt.detach(ids[0]);
    rt.stop().unwrap();
}
