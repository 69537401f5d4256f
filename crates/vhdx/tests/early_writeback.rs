//! A stream of large writes starts write-back of the file from its own thread
//! (`vhdx-writeback`) unless the disk's owner turned that off, as a guest's disk does
//! (`Vhdx::set_early_writeback`). Alone in its file: it counts this process's threads.
mod common;
use common::*;

use vireo_vhdx::{DiskType, Vhdx};

const MIB: u64 = 1 << 20;

fn writeback_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "vhdx-writeback")
        .count()
}

/// 32 MiB of 1 MiB writes: four times the stream that starts write-back.
fn stream(d: &Vhdx) {
    let data = pattern(MIB as usize, 7);
    for i in 0..32 {
        d.write(&data, i * MIB).expect("write");
    }
}

/// A thread names itself once it first runs, so on a busy machine `comm` may still show the
/// spawning thread's name for a while: wait (bounded) for `want` named threads.
fn wait_for_writeback_threads(want: usize) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let n = writeback_threads();
        if n >= want || std::time::Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn write_back_starts_under_a_stream_only_when_left_on() {
    let dir = tmpdir();
    let (_, off) = create(
        dir.path(),
        "off.vhdx",
        &opts(64 * MIB, 8 << 20, DiskType::Dynamic),
    );
    off.set_early_writeback(false);
    stream(&off);
    assert_eq!(read(&off, 5 * MIB, MIB as usize), pattern(MIB as usize, 7));

    let (_, on) = create(
        dir.path(),
        "on.vhdx",
        &opts(64 * MIB, 8 << 20, DiskType::Dynamic),
    );
    stream(&on);
    assert_eq!(
        wait_for_writeback_threads(1),
        1,
        "by default the stream starts write-back"
    );
    // By now a thread the first disk had started (before the second's) would have named
    // itself too; give it a moment more all the same.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        writeback_threads(),
        1,
        "turned off, the first disk started no write-back thread"
    );
    drop((off, on));
}
