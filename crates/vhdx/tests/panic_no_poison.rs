//! A thread that panics while holding one of a disk's locks must not turn every later call on
//! that disk into a panic (std locks poison; a VMM's other I/O threads would all die).
mod common;
use std::panic::{catch_unwind, AssertUnwindSafe};

use common::*;
use vireo_vhdx::{DiskType, FaultInjector, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
/// Where new disks keep their log: the first commit writes its entry here.
const LOG_OFFSET: u64 = MIB;

#[test]
fn a_panic_under_a_lock_does_not_poison_the_disk() {
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "a.vhdx",
        &opts(16 * MIB, MIB as u32, DiskType::Dynamic),
    );
    drop(d);
    let fault = FaultInjector::after(u64::MAX / 2);
    let d = Vhdx::open(
        &p,
        &OpenOptions {
            fault: Some(fault.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    d.write(&[1; 4096], 0).unwrap();
    // The flush panics writing its log entry, holding the file's metadata state lock.
    fault.panic_io_at(LOG_OFFSET);
    let r = std::thread::scope(|s| {
        s.spawn(|| catch_unwind(AssertUnwindSafe(|| d.flush())))
            .join()
    });
    assert!(matches!(r, Ok(Err(_))), "the flush should have panicked");
    // Every later call still works, from any thread.
    d.write(&[2; 4096], 4096).unwrap();
    d.flush().unwrap();
    assert_eq!(read(&d, 0, 8192), [[1; 4096], [2; 4096]].concat());
    std::thread::scope(|s| {
        s.spawn(|| d.write(&[3; 512], 8 * MIB).unwrap());
    });
    d.resize(32 * MIB, false).unwrap();
    drop(d);
    let d = reopen(&p);
    assert_eq!(read(&d, 0, 8192), [[1; 4096], [2; 4096]].concat());
    assert_eq!(read(&d, 8 * MIB, 512), vec![3; 512]);
    assert_eq!(d.virtual_size(), 32 * MIB);
}
