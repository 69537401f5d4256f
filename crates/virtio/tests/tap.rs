//! virtio-net over a real TAP interface, inside a network namespace this test creates: frames
//! the guest transmits appear on the interface, frames sent on the interface reach the guest.
//! Needs root, /dev/net/tun and `ip netns` (vireo-testkit: a recorded skip without them, a
//! failure under CI).

mod common;

use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::{enter_new_netns, packet_socket};
use common::*;
use vireo_netport::{FramePort, TapPort};
use vireo_virtio::net::NET_HDR_LEN;
use vireo_virtio::Net;
use vm_memory::{Bytes, GuestAddress};

const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

fn test_frame(tag: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, tag]);
    f.extend_from_slice(&ETHERTYPE);
    f.resize(len, tag);
    f
}

#[test]
fn guest_frames_cross_a_tap_both_ways() {
    use vireo_testkit::{require_all, Need};
    if !require_all(&[Need::Tap, Need::Netns]) {
        return;
    }
    let name = format!("vireo-vnet-{}", std::process::id());
    let result = std::thread::spawn(move || {
        let _ns = enter_new_netns(&name).expect("cannot create and enter a network namespace");
        let tap = Arc::new(TapPort::open("vnet%d").unwrap());
        tap.set_up().unwrap();
        let sock = packet_socket(tap.name()).unwrap();
        let mut dev = Net::new(tap.clone(), [2, 0, 0, 0, 0, 9]);
        let mem = guest_memory();
        let (mut qs, _irq) = activate_all(&mut dev, &mem, 16);
        let mut tx = qs.pop().unwrap();
        let mut rx = qs.pop().unwrap();
        let deadline = Instant::now() + DEVICE_TIMEOUT;

        // Guest -> TAP.
        let out = test_frame(1, 300);
        let at = DATA_BASE;
        mem.write_slice(&[0; NET_HDR_LEN], GuestAddress(at))
            .unwrap();
        mem.write_slice(&out, GuestAddress(at + NET_HDR_LEN as u64))
            .unwrap();
        tx.add_chain(&mem, &[ro(at, (NET_HDR_LEN + out.len()) as u32)]);
        tx.notify();
        let mut buf = vec![0u8; 2048];
        let mut seen = false;
        while !seen && Instant::now() < deadline {
            // SAFETY: reads into a live buffer of the stated length.
            let n = unsafe { libc::read(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 && buf[12..14] == ETHERTYPE {
                assert_eq!(&buf[..n as usize], &out[..]);
                seen = true;
            } else {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        assert!(seen, "guest frame never reached the TAP");

        // TAP -> guest (the kernel may also send IPv6 chatter; look for ours).
        for i in 0..8 {
            rx.add_chain(&mem, &[wo(DATA_BASE + 0x10000 + i * 0x1000, 2048)]);
        }
        rx.notify();
        let back = test_frame(2, 700);
        // SAFETY: writes a live buffer of the stated length.
        let n = unsafe { libc::write(sock.as_raw_fd(), back.as_ptr().cast(), back.len()) };
        assert_eq!(n, back.len() as isize);
        let mut found = false;
        while !found && Instant::now() < deadline {
            for (head, len) in rx.take_used(&mem) {
                let slot = u64::from(head) % 8;
                let mut got = vec![0u8; len as usize];
                mem.read_slice(&mut got, GuestAddress(DATA_BASE + 0x10000 + slot * 0x1000))
                    .unwrap();
                if got.len() > NET_HDR_LEN + 14
                    && got[NET_HDR_LEN + 12..NET_HDR_LEN + 14] == ETHERTYPE
                {
                    assert_eq!(&got[NET_HDR_LEN..], &back[..]);
                    found = true;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(found, "TAP frame never reached the guest");
        let stats = dev.counters().snapshot();
        assert!(stats.tx_frames >= 1 && stats.rx_frames >= 1);
        reset_in_time(dev);
    })
    .join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
