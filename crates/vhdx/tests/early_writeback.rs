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
    assert_eq!(
        writeback_threads(),
        0,
        "turned off, nothing starts write-back"
    );
    assert_eq!(read(&off, 5 * MIB, MIB as usize), pattern(MIB as usize, 7));

    let (_, on) = create(
        dir.path(),
        "on.vhdx",
        &opts(64 * MIB, 8 << 20, DiskType::Dynamic),
    );
    stream(&on);
    assert_eq!(
        writeback_threads(),
        1,
        "by default the stream starts write-back"
    );
}
