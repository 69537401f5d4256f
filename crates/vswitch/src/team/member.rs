//! One team member: its AF_PACKET socket, MAC, link state and counters (atomics, so the data
//! path counts without the team lock).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::frame::Mac;
use crate::uplink::PacketPort;

#[derive(Default, Debug)]
pub struct MemberCounters {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_errors: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames that arrived on a member that is not collecting (LACP not in sync, standby, or a
    /// duplicate broadcast on a non-primary switch-independent member).
    pub rx_not_collecting: AtomicU64,
    pub rx_reflected: AtomicU64,
    pub tx_mac_rewritten: AtomicU64,
    pub rx_mac_restored: AtomicU64,
    pub rx_member_mac: AtomicU64,
    /// Slow-protocol frames that did not decode as LACPDUs (truncated, bad TLVs, ...).
    pub bad_lacpdus: AtomicU64,
    pub link_downs: AtomicU64,
}

pub fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

pub struct Member {
    pub name: String,
    pub port: PacketPort,
    pub mac: Mac,
    /// Carrier as last seen by the monitor, or cleared at once by a send that failed with
    /// ENETDOWN/ENXIO (the fastest signal: no polling delay).
    pub link_up: AtomicBool,
    pub counters: MemberCounters,
}

/// `/sys/class/net/<if>/address` as bytes.
pub fn read_mac(ifname: &str) -> io::Result<Mac> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))?;
    let mut m = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in &mut m {
        *b = parts
            .next()
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad MAC in sysfs"))?;
    }
    Ok(m)
}

/// Whether the interface is administratively up and has carrier. Reading `carrier` of a down
/// interface fails (EINVAL), which also means down.
pub fn carrier(ifname: &str) -> bool {
    std::fs::read(format!("/sys/class/net/{ifname}/carrier"))
        .is_ok_and(|b| b.first() == Some(&b'1'))
}

impl Member {
    pub fn bind(name: &str) -> io::Result<Member> {
        Ok(Member {
            name: name.to_string(),
            port: PacketPort::bind(name)?,
            mac: read_mac(name)?,
            link_up: AtomicBool::new(carrier(name)),
            counters: MemberCounters::default(),
        })
    }

    pub fn up(&self) -> bool {
        self.link_up.load(Ordering::Acquire)
    }
}
