//! What the randomized block tests share: a seeded generator whose seed a failing run prints
//! (and `VIREO_STRESS_SEED=<n>` replays), and the check that a paused device is quiet.

use std::time::Duration;

use vireo_virtio::{GuestMemory, VirtioDevice};

use super::DriverQueue;

/// xorshift64*: small, seedable, good enough to pick test cases.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `VIREO_STRESS_SEED` if set, else a fresh one; printed (as `<what> seed N`) so a failing
/// run can be replayed.
pub fn stress_seed(what: &str) -> u64 {
    let seed = std::env::var("VIREO_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("{what} seed {seed} (VIREO_STRESS_SEED={seed} replays it)");
    seed
}

/// Whether the byte ranges `(start, len)` share a byte.
pub fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

/// A VM pause while a batch may be running: the device finishes what it took and publishes
/// it, its state can be taken, it publishes nothing more until resumed; then it resumes.
pub fn pause_quietly_then_resume(
    dev: &mut dyn VirtioDevice,
    q: &DriverQueue,
    mem: &GuestMemory,
    timeout: Duration,
) {
    dev.pause(timeout).unwrap();
    let published = q.used_idx(mem);
    dev.save_state()
        .expect("a paused disk's state can be saved");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        q.used_idx(mem),
        published,
        "a paused disk completed requests"
    );
    dev.resume();
}
