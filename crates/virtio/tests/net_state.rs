//! virtio-net save/restore at the device level: a frame the device took from the port but had
//! no rx buffer for is in the saved state and reaches the driver of the restored device (once
//! it is resumed: a restored device starts parked), and a state that does not fit the device
//! is refused without changing it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use vireo_netport::{channel_pair, FramePort};
use vireo_virtio::net::NET_HDR_LEN;
use vireo_virtio::state::NetState;
use vireo_virtio::{DeviceState, Net, StateError, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const QSIZE: u16 = 16;

fn frame(tag: u8) -> Vec<u8> {
    let mut f = MAC.to_vec();
    f.extend_from_slice(&[2, 0, 0, 0, 0, tag, 0x88, 0xb5]);
    f.extend(std::iter::repeat_n(tag, 70));
    f
}

#[test]
fn a_frame_held_without_rx_buffers_survives_save_and_restore() {
    let (vm_end, peer) = channel_pair("saved", "peer").unwrap();
    let mut dev = Net::new(Arc::new(vm_end), MAC);
    let mem = guest_memory();
    let features = dev.features();
    let (_queues, _irq) = activate_with(&mut dev, &mem, QSIZE, features);
    // No rx buffer is posted: the device takes the frame from the port and holds it.
    let held = frame(7);
    peer.send(&held).unwrap();
    // Not paused: no consistent state to give.
    assert_eq!(dev.save_state().unwrap_err(), StateError::NotPaused);
    // The worker takes the frame on its own time: look until a paused state shows it.
    let mut saved = None;
    assert!(wait_for(|| {
        dev.pause(Duration::from_secs(10)).unwrap();
        let s = dev.save_state().unwrap();
        if matches!(&s, DeviceState::Net(n) if n.rx_frame.is_some()) {
            saved = Some(s);
            return true;
        }
        dev.resume();
        false
    }));
    let saved = saved.unwrap();
    let DeviceState::Net(net) = &saved else {
        panic!("{saved:?}")
    };
    assert_eq!(net.rx_frame.as_deref(), Some(&held[..]));
    assert_eq!(net.mac, MAC);
    assert_eq!(net.acked_features, features);
    assert_eq!(
        net.rings.as_ref().unwrap().queues,
        vec![(0, 0), (0, 0)],
        "nothing was taken from the rings"
    );
    dev.resume();
    let _ = reset_in_time(dev);

    // A new device on a new port: the held frame goes to the first rx buffer posted.
    let (vm_end, _peer2) = channel_pair("restored", "peer").unwrap();
    let mut dev = Net::new(Arc::new(vm_end), MAC);
    // Refused without effect: another device's state, another MAC.
    let block = DeviceState::Block(Default::default());
    assert!(matches!(
        dev.restore_state(&block),
        Err(StateError::WrongDevice { .. })
    ));
    let other_mac = DeviceState::Net(NetState {
        mac: [0x52, 0, 0, 0, 0, 1],
        ..net.clone()
    });
    assert!(matches!(
        dev.restore_state(&other_mac),
        Err(StateError::Invalid(_))
    ));
    dev.restore_state(&saved).unwrap();
    let mem = guest_memory();
    let (mut queues, _irq) = activate_with(&mut dev, &mem, QSIZE, features);
    let rx = &mut queues[0];
    rx.add_chain(&mem, &[wo(DATA_BASE, 2048)]);
    rx.notify();
    // Restored means paused (the VM resumes it): the buffer stays empty until the resume.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        rx.used_idx(&mem),
        0,
        "a restored device served before its resume"
    );
    dev.pause(Duration::from_secs(10)).unwrap();
    assert!(matches!(
        dev.save_state().unwrap(),
        DeviceState::Net(n) if n.rx_frame.as_deref() == Some(&held[..])
    ));
    dev.resume();
    let used = rx.wait_used(&mem, 1);
    assert_eq!(used[0].1 as usize, NET_HDR_LEN + held.len());
    let mut got = vec![0u8; held.len()];
    mem.read_slice(&mut got, GuestAddress(DATA_BASE + NET_HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, held);
    assert_eq!(dev.counters().snapshot().rx_frames, 1);
    // What an in-place apply asks of the active NIC before it pauses a VM.
    dev.check_restore(&saved).unwrap();
    assert!(matches!(
        dev.check_restore(&other_mac),
        Err(StateError::Invalid(why)) if why.contains("MAC")
    ));
    assert!(matches!(
        dev.check_restore(&block),
        Err(StateError::WrongDevice { .. })
    ));
    // Restoring into an active device is refused.
    assert!(dev.restore_state(&saved).is_err());
    let _ = reset_in_time(dev);
}

/// A TCP/IPv4 super-frame's header from an offload port: partial checksum, TSO at 1448.
const TSO_HDR: [u8; vireo_netport::VNET_HDR_LEN] = [1, 1, 54, 0, 0xa8, 5, 34, 0, 16, 0];

#[test]
fn a_held_super_frame_keeps_its_header_across_save_and_restore() {
    use common::offload_port::OffloadPort;

    let port = Arc::new(OffloadPort::new());
    let mut dev = Net::new(port.clone(), MAC);
    let mem = guest_memory();
    let features = dev.features();
    let (_queues, _irq) = activate_with(&mut dev, &mem, QSIZE, features);
    let mut held = frame(9);
    held.resize(20_000, 9);
    port.push(TSO_HDR, &held);
    let mut saved = None;
    assert!(wait_for(|| {
        dev.pause(Duration::from_secs(10)).unwrap();
        let s = dev.save_state().unwrap();
        if matches!(&s, DeviceState::Net(n) if n.rx_frame.is_some()) {
            saved = Some(s);
            return true;
        }
        dev.resume();
        false
    }));
    let saved = saved.unwrap();
    let DeviceState::Net(net) = &saved else {
        panic!("{saved:?}")
    };
    assert_eq!(net.rx_frame_vnet_hdr, TSO_HDR);
    assert!(net.rx_frame.as_deref() == Some(&held[..]));
    dev.resume();
    let _ = reset_in_time(dev);

    // Through the saved form, as a save file carries it.
    let text = serde_json::to_string(&saved).unwrap();
    let saved: DeviceState = serde_json::from_str(&text).unwrap();
    let port = Arc::new(OffloadPort::new());
    let mut dev = Net::new(port.clone(), MAC);
    // A driver that did not accept TSO could not have been handed this frame.
    let without_tso = DeviceState::Net(NetState {
        acked_features: features & !(1 << 7 | 1 << 8),
        ..net.clone()
    });
    assert!(matches!(
        dev.restore_state(&without_tso),
        Err(StateError::Invalid(_))
    ));
    // Nor can a device on a port without offloads take the features.
    let (plain, _peer) = channel_pair("plain", "peer").unwrap();
    assert!(Net::new(Arc::new(plain), MAC)
        .restore_state(&saved)
        .is_err());
    dev.restore_state(&saved).unwrap();
    let mem = guest_memory();
    let (mut queues, _irq) = activate_with(&mut dev, &mem, QSIZE, features);
    let rx = &mut queues[0];
    rx.add_chain(&mem, &[wo(DATA_BASE, 32_768)]);
    rx.notify();
    dev.resume();
    let used = rx.wait_used(&mem, 1);
    assert_eq!(used[0].1 as usize, NET_HDR_LEN + held.len());
    let mut got = vec![0u8; NET_HDR_LEN + held.len()];
    mem.read_slice(&mut got, GuestAddress(DATA_BASE)).unwrap();
    assert_eq!(got[..10], TSO_HDR);
    assert!(got[NET_HDR_LEN..] == held[..]);
    let _ = reset_in_time(dev);
}
