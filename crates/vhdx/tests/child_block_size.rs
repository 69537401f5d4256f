//! A differencing child takes its parent's block size unless told otherwise: 32 MiB blocks over
//! a 1 MiB-block parent turned 40 MiB of small guest writes into hundreds of MiB of file.
mod common;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use vireo_vhdx::{CreateOptions, DiskType, Vhdx};

const MIB: u64 = 1 << 20;

/// 40 MiB as 4 KiB writes: each of 40 one-MiB regions, spread 100 MiB apart, written whole in
/// an order that is not sequential. Returns the child's (file length, bytes allocated on disk).
fn scattered_writes(child: &Path) -> (u64, u64) {
    let d = reopen(child);
    let page = pattern(4096, 9);
    for region in 0..40u64 {
        for i in 0..256u64 {
            let k = (i * 97) % 256; // 97 is prime to 256: every page once, out of order
            d.write(&page, region * 100 * MIB + k * 4096).unwrap();
        }
    }
    d.flush().unwrap();
    drop(d);
    let m = std::fs::metadata(child).unwrap();
    (m.len(), m.blocks() * 512)
}

#[test]
fn a_child_inherits_its_parents_block_size() {
    let dir = tmpdir();
    let (base, b) = create(
        dir.path(),
        "base.vhdx",
        &opts(4096 * MIB, MIB as u32, DiskType::Dynamic),
    );
    drop(b);
    let with_parent = |block_size| CreateOptions {
        disk_type: DiskType::Differencing,
        parent: Some(base.clone()),
        block_size,
        ..Default::default()
    };
    // What `vireo disk create --parent` passes without --block-size.
    let (child, c) = create(dir.path(), "child.avhdx", &with_parent(0));
    assert_eq!(c.block_size(), MIB as u32);
    drop(c);
    // An explicit block size still wins.
    let (big, c) = create(dir.path(), "big.avhdx", &with_parent(32 * MIB as u32));
    assert_eq!(c.block_size(), 32 * MIB as u32);
    drop(c);
    let (len, used) = scattered_writes(&child);
    let (big_len, big_used) = scattered_writes(&big);
    eprintln!("file/disk bytes: 1 MiB blocks {len}/{used}, 32 MiB blocks {big_len}/{big_used}");
    assert!(
        len < 48 * MIB && used < 48 * MIB,
        "40 MiB written took {len} bytes of file, {used} on disk"
    );
    assert!(
        big_len > 10 * len && big_used > 2 * used,
        "32 MiB blocks: {big_len}/{big_used}, inherited 1 MiB: {len}/{used}"
    );
    assert!(Vhdx::check(&child, false).unwrap().is_clean());
}
