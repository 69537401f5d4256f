//! What the probe-guest tests of this crate share: reading the counters the probe keeps in
//! guest memory (docs/probe-protocol.md, `DIRTY` and the status page) from the host.
#![allow(dead_code)] // each test binary uses its own part

use std::time::{Duration, Instant};

use vireo_vmm::VmHandle;
use vm_memory::{Bytes, GuestAddress};

/// How long a counter may stand still before a test gives up on it.
const STUCK: Duration = Duration::from_secs(60);

/// The u64 at guest-physical `at`.
pub fn read(h: &VmHandle, at: u64) -> u64 {
    h.memory().read_obj(GuestAddress(at)).unwrap()
}

/// Waits until the u64 at `at` in guest memory passes `from`; returns it.
pub fn wait_above(h: &VmHandle, at: u64, from: u64) -> u64 {
    let deadline = Instant::now() + STUCK;
    loop {
        let v = read(h, at);
        if v > from {
            return v;
        }
        assert!(Instant::now() < deadline, "value at {at:#x} stuck at {v}");
        std::thread::sleep(Duration::from_millis(2));
    }
}
