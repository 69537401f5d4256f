//! The runtime thread moving frames between in-process channel ports and the pipeline.

use crate::common;

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

#[test]
fn minimum_bandwidth_weights_share_a_shaped_uplink() {
    let mut sw = Switch::new(SwitchConfig::private("wfq")).unwrap();
    let mut heavy = PortConfig::access("heavy", 1);
    heavy.qos.min_weight = 3;
    let mut light = PortConfig::access("light", 1);
    light.qos.min_weight = 1;
    let mut up = PortConfig {
        role: PortRole::Uplink,
        ..PortConfig::access("up", 1)
    };
    // A 4 Mbit/s link: two senders pushing as fast as they can congest it.
    up.qos.max_egress = Some(RateLimit {
        bits_per_sec: 4_000_000,
        burst_bytes: 3000,
    });
    let ids: Vec<PortId> = [heavy, light, up]
        .into_iter()
        .map(|p| sw.add_port(p).unwrap())
        .collect();
    let sw = Arc::new(Mutex::new(sw));
    let rt = SwitchRuntime::start(sw.clone()).unwrap();
    let mut ends = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (s, v) = channel_pair(&format!("s{i}"), &format!("v{i}")).unwrap();
        rt.attach(*id, Arc::new(s));
        ends.push(Arc::new(v));
    }
    std::thread::sleep(Duration::from_millis(50));
    // The uplink's far side speaks first so both senders' frames are known unicast.
    ends[2].send(&plain(mac(9), BCAST)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = [0usize, 1]
        .into_iter()
        .map(|k| {
            let (port, stop) = (ends[k].clone(), stop.clone());
            std::thread::spawn(move || {
                let f = udp4(
                    mac(k as u8 + 1),
                    mac(9),
                    ip4(k as u8 + 1),
                    ip4(9),
                    1,
                    2,
                    &[0; 958],
                );
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if port.send(&f).is_err() {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            })
        })
        .collect();
    let mut bytes = [0u64; 2];
    let mut buf = vec![0u8; 2048];
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        match ends[2].recv(&mut buf).unwrap() {
            Some(n) => {
                if buf[6..12] == mac(1) {
                    bytes[0] += n as u64;
                } else if buf[6..12] == mac(2) {
                    bytes[1] += n as u64;
                }
            }
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
    rt.stop().unwrap();
    assert!(
        bytes[0] > 100_000 && bytes[1] > 30_000,
        "both senders got through: {bytes:?}"
    );
    let ratio = bytes[0] as f64 / bytes[1] as f64;
    assert!(
        (2.0..=4.5).contains(&ratio),
        "weights 3:1 gave {bytes:?} ({ratio:.2})"
    );
    // Congestion shows as queue drops, not as policing.
    let st = lock(&sw).status(ids[2]).unwrap();
    assert!(
        st.meters
            .drops
            .iter()
            .all(|(r, _)| *r == DropReason::TxFull),
        "{st:?}"
    );
}

#[test]
fn frames_too_long_for_the_buffer_or_the_mtu_are_dropped_whole_and_counted() {
    let mut sw = Switch::new(SwitchConfig::private("big")).unwrap();
    let a = sw.add_port(PortConfig::access("a", 1)).unwrap();
    let b = sw.add_port(PortConfig::access("b", 1)).unwrap();
    let sw = Arc::new(Mutex::new(sw));
    let rt = SwitchRuntime::start(sw.clone()).unwrap();
    let (sa, va) = channel_pair("swa", "vma").unwrap();
    let (sb, vb) = channel_pair("swb", "vmb").unwrap();
    rt.attach(a, Arc::new(sa));
    rt.attach(b, Arc::new(sb));
    std::thread::sleep(Duration::from_millis(50));
    // Longer than the runtime's 64 KiB receive buffer, then longer than the default MTU.
    for len in [70_000, 9_300] {
        let mut f = plain(mac(1), BCAST);
        f.resize(len, 0);
        va.send(&f).unwrap();
    }
    let ok = plain(mac(1), BCAST);
    va.send(&ok).unwrap();
    let mut big = vec![0u8; 80_000];
    let end = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while Instant::now() < end && got.is_empty() {
        if let Some(n) = vb.recv(&mut big).unwrap() {
            got = big[..n].to_vec();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(got, ok, "only the frame that fits, whole");
    assert_eq!(recv_within(&vb, Duration::from_millis(200)), None);
    assert_eq!(lock(&sw).drops(a, DropReason::Oversize), 2);
    rt.stop().unwrap();
}

#[test]
fn the_switch_thread_runs_at_the_frame_threads_priority() {
    // Lowering a nice value below 0 needs CAP_SYS_NICE.
    if !vireo_testkit::require(vireo_testkit::Need::Root) {
        return;
    }
    let want = vireo_vswitch::priority::nice();
    assert_ne!(want, 0, "the default raises the switch thread's priority");
    let sw = Arc::new(Mutex::new(
        Switch::new(SwitchConfig::private("prio")).unwrap(),
    ));
    let rt = SwitchRuntime::start(sw).unwrap();
    // The thread sets its own priority as it starts: poll, bounded.
    let mut nices = Vec::new();
    for _ in 0..500 {
        nices = thread_nices("vswitch");
        if nices.contains(&want) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        nices.contains(&want),
        "vswitch threads' nice values: {nices:?}, want {want}"
    );
    rt.stop().unwrap();
}
