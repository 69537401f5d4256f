//! Read-write use of a patched image (see `common`): the first input byte `n` says how many
//! 4-byte operations follow (write, discard, flush, resize; at most 24), the rest patches the
//! base image. The disk is opened read-write (log replay, region-table repair and the free-space
//! scan run for real), the operations run, the disk closes cleanly. Errors are fine; panics and
//! hangs are not. And when the patched file was clean by our own checker before, our own writes
//! must leave it clean: after them `check` must find nothing and the file must reopen.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use vireo_vhdx::{OpenOptions, Vhdx};

const UNIT: u64 = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n as usize % 25).min(rest.len() / 4);
    let (ops, patches) = rest.split_at(n * 4);
    let image = common::patched(patches);
    let path = common::scratch(&image);
    let clean_before = Vhdx::check(&path, false).is_ok_and(|r| r.is_clean());
    let Ok(disk) = Vhdx::open(&path, &OpenOptions::default()) else {
        return;
    };
    for op in ops.chunks_exact(4) {
        let size = disk.virtual_size();
        let units = (size / UNIT).max(1);
        let off = (op[1] as u64 * 7 + op[2] as u64) % units * UNIT;
        let len = ((op[3] as u64 % 24) + 1) * UNIT;
        let len = len.min(size.saturating_sub(off));
        let _ = match op[0] % 5 {
            0 | 1 if len > 0 => disk.write(&vec![op[3] | 1; len as usize], off),
            2 if len > 0 => disk.discard(off, len),
            3 => disk.flush(),
            4 => disk.resize(((op[1] as u64 % 16) + 1) * (1 << 20), op[2] & 1 == 1),
            _ => Ok(()),
        };
    }
    drop(disk);
    if clean_before {
        let report = Vhdx::check(&path, false).expect("our own writes made the file unreadable");
        assert!(
            report.is_clean(),
            "our own writes left problems: {report:?}"
        );
        Vhdx::open(&path, &OpenOptions::read_only()).expect("our own writes broke the file");
    }
});
