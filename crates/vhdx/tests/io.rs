//! Read/write/discard/resize/differencing behaviour of the public API.
mod common;
use common::*;
use vireo_vhdx::{DiskType, OpenOptions, Vhdx, VhdxError};

const MIB: u64 = 1 << 20;

#[test]
fn dynamic_write_read_reopen() {
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "a.vhdx",
        &opts(64 * MIB, MIB as u32, DiskType::Dynamic),
    );
    assert_eq!(read(&d, 0, 4096), vec![0; 4096]);
    let data = pattern(3 * MIB as usize + 512, 7);
    d.write(&data, MIB / 2).unwrap();
    d.flush().unwrap();
    assert_eq!(read(&d, MIB / 2, data.len()), data);
    drop(d);
    let d = reopen(&p);
    assert_eq!(read(&d, MIB / 2, data.len()), data);
    assert_eq!(read(&d, 0, 512), vec![0; 512]);
    assert_eq!(d.info().allocated_blocks, 4);
    assert!(d.info().log_guid.is_zero());
}

#[test]
fn fixed_disk_reads_zero_and_writes() {
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "f.vhdx",
        &opts(8 * MIB, MIB as u32, DiskType::Fixed),
    );
    assert_eq!(d.info().allocated_blocks, 8);
    let data = pattern(8192, 3);
    d.write(&data, 5 * MIB - 4096).unwrap();
    drop(d);
    let d = reopen(&p);
    assert_eq!(read(&d, 5 * MIB - 4096, 8192), data);
}

#[test]
fn unflushed_metadata_survives_via_log_after_drop() {
    // Drop flushes and closes cleanly; the data must be there without an explicit flush.
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "a.vhdx",
        &opts(16 * MIB, MIB as u32, DiskType::Dynamic),
    );
    d.write(&pattern(4096, 1), 9 * MIB).unwrap();
    drop(d);
    assert_eq!(read(&reopen(&p), 9 * MIB, 4096), pattern(4096, 1));
}

#[test]
fn differencing_reads_through_and_writes_partially() {
    let dir = tmpdir();
    let (base, d) = create(
        dir.path(),
        "base.vhdx",
        &opts(16 * MIB, MIB as u32, DiskType::Dynamic),
    );
    let a = pattern(2 * MIB as usize, 1);
    d.write(&a, 0).unwrap();
    drop(d);
    let child = dir.path().join("child.vhdx");
    let c = Vhdx::create(
        &child,
        &vireo_vhdx::CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(base.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.virtual_size(), 16 * MIB);
    assert_eq!(read(&c, 0, a.len()), a);
    let b = pattern(1024, 9);
    c.write(&b, 4096 + 512).unwrap();
    c.write(&[0xee; 100], 10_000).unwrap(); // unaligned
    drop(c);
    let c = reopen(&child);
    let mut expect = a.clone();
    expect[4608..4608 + 1024].copy_from_slice(&b);
    expect[10_000..10_100].fill(0xee);
    assert_eq!(read(&c, 0, a.len()), expect);
    assert_eq!(c.chain_depth(), 2);
    // Discard in the child must hide the parent.
    c.discard(0, MIB).unwrap();
    c.discard(MIB + 4096, 4096).unwrap();
    expect[..MIB as usize].fill(0);
    expect[(MIB + 4096) as usize..(MIB + 8192) as usize].fill(0);
    assert_eq!(read(&c, 0, a.len()), expect);
    drop(c);
    assert_eq!(read(&reopen(&child), 0, a.len()), expect);
    // Base unchanged.
    assert_eq!(
        read(
            &Vhdx::open(&base, &OpenOptions::read_only()).unwrap(),
            0,
            a.len()
        ),
        a
    );
}

#[test]
fn parent_modified_is_a_linkage_error() {
    let dir = tmpdir();
    let (base, d) = create(
        dir.path(),
        "base.vhdx",
        &opts(4 * MIB, MIB as u32, DiskType::Dynamic),
    );
    drop(d);
    let child = dir.path().join("child.vhdx");
    drop(
        Vhdx::create(
            &child,
            &vireo_vhdx::CreateOptions {
                disk_type: DiskType::Differencing,
                parent: Some(base.clone()),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let d = reopen(&base);
    d.write(&[1; 512], 0).unwrap();
    drop(d);
    assert!(matches!(
        Vhdx::open(&child, &OpenOptions::default()),
        Err(VhdxError::ParentLinkageMismatch { .. })
    ));
    std::fs::remove_file(&base).unwrap();
    assert!(matches!(
        Vhdx::open(&child, &OpenOptions::default()),
        Err(VhdxError::ParentNotFound { .. })
    ));
}

#[test]
fn discard_and_resize() {
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "a.vhdx",
        &opts(8 * MIB, MIB as u32, DiskType::Dynamic),
    );
    d.write(&pattern(3 * MIB as usize, 2), 0).unwrap();
    d.discard(MIB, MIB).unwrap();
    d.discard(100 * 512, 512).unwrap();
    let mut expect = pattern(3 * MIB as usize, 2);
    expect[MIB as usize..2 * MIB as usize].fill(0);
    expect[51200..51712].fill(0);
    assert_eq!(read(&d, 0, expect.len()), expect);
    assert!(matches!(
        d.resize(2 * MIB, false),
        Err(VhdxError::ShrinkOverData { .. })
    ));
    // Grow far enough that the BAT must move.
    d.resize(300 * 1024 * MIB, false).unwrap();
    d.write(&[5; 4096], 299 * 1024 * MIB).unwrap();
    drop(d);
    let d = reopen(&p);
    assert_eq!(d.virtual_size(), 300 * 1024 * MIB);
    assert_eq!(read(&d, 0, expect.len()), expect);
    assert_eq!(read(&d, 299 * 1024 * MIB, 4096), vec![5; 4096]);
    d.resize(3 * MIB, true).unwrap();
    drop(d);
    let d = reopen(&p);
    assert_eq!(d.virtual_size(), 3 * MIB);
    assert_eq!(read(&d, 0, expect.len()), expect);
}

#[test]
fn huge_dynamic_is_instant_and_small() {
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "big.vhdx",
        &opts(64 << 40, 0, DiskType::Dynamic),
    );
    d.write(&[9; 4096], (64 << 40) - 4096).unwrap();
    drop(d);
    let d = reopen(&p);
    assert_eq!(read(&d, (64 << 40) - 4096, 4096), vec![9; 4096]);
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(&p).unwrap().blocks() * 512;
    assert!(blocks < 64 * MIB, "allocated {blocks}");
}

#[test]
fn user_metadata_survives_rewrites_and_qemu() {
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "u.vhdx",
        &opts(8 * MIB, MIB as u32, DiskType::Dynamic),
    );
    let id = vireo_vhdx::Guid::random();
    d.set_user_metadata(id, Some(b"owner=vireo")).unwrap();
    d.resize(16 * MIB, false).unwrap();
    drop(d);
    let d = reopen(&p);
    assert_eq!(d.user_metadata(), vec![(id, b"owner=vireo".to_vec())]);
    assert_eq!(d.virtual_size(), 16 * MIB);
    drop(d);
    if let Some((ok, out)) = qemu_img(&["check", "-f", "vhdx", p.to_str().unwrap()]) {
        assert!(ok, "{out}");
    }
}

#[test]
fn read_only_open_of_dirty_log_replays_in_memory_or_refuses() {
    use std::os::unix::fs::FileExt;
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "l.vhdx",
        &opts(8 * MIB, MIB as u32, DiskType::Dynamic),
    );
    d.write(&[3; 4096], 2 * MIB).unwrap();
    d.flush().unwrap();
    // Simulate a crash: no clean close, so the header still names a live log.
    d.abandon();
    // Undo the in-place BAT update as if the crash came before it was applied.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&[0; 4096], 3 * MIB).unwrap();
    drop(f);
    let before = std::fs::read(&p).unwrap();
    let refuse = OpenOptions {
        read_only: true,
        replay: vireo_vhdx::ReadOnlyReplay::Refuse,
        ..Default::default()
    };
    assert!(matches!(
        Vhdx::open(&p, &refuse),
        Err(VhdxError::LogReplayRefused)
    ));
    let ro = Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    assert_eq!(read(&ro, 2 * MIB, 4096), vec![3; 4096]);
    assert_eq!(ro.info().log_entries_replayed_at_open, 1);
    drop(ro);
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "read-only replay wrote to the file"
    );
    let rw = reopen(&p);
    assert_eq!(read(&rw, 2 * MIB, 4096), vec![3; 4096]);
    drop(rw);
    let ro = Vhdx::open(&p, &refuse).unwrap();
    assert!(ro.info().log_guid.is_zero());
}

#[test]
fn flush_spanning_many_log_entries_and_wrapping() {
    // 1 MiB blocks: 512 BAT entries per page; touching 600 pages needs several log entries
    // per flush (a 1 MiB log holds ~250 pages), and repeated flushes wrap the log.
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "w.vhdx",
        &opts(400 << 30, MIB as u32, DiskType::Dynamic),
    );
    let stride = 513 * MIB;
    for round in 0..3u8 {
        for i in 0..600u64 {
            d.write(&[round + 1; 512], i * stride + round as u64 * 512)
                .unwrap();
        }
        d.flush().unwrap();
    }
    // Crash (no clean close): reopening replays only the newest entry and must see everything.
    d.abandon();
    let d = reopen(&p);
    for i in (0..600u64).step_by(37) {
        for round in 0..3u8 {
            assert_eq!(
                read(&d, i * stride + round as u64 * 512, 512),
                vec![round + 1; 512],
                "block {i} round {round}"
            );
        }
    }
    drop(d);
    assert!(Vhdx::check(&p, false).unwrap().is_clean());
    if let Some((ok, out)) = qemu_img(&["check", "-f", "vhdx", p.to_str().unwrap()]) {
        assert!(ok, "{out}");
    }
}

#[test]
fn four_k_logical_sectors_dynamic_and_differencing() {
    let dir = tmpdir();
    let o = vireo_vhdx::CreateOptions {
        size: 16 * MIB,
        block_size: 2 * MIB as u32,
        logical_sector: 4096,
        physical_sector: 4096,
        ..Default::default()
    };
    let (base, d) = create(dir.path(), "b4k.vhdx", &o);
    use vireo_block::BlockBackend;
    assert_eq!(BlockBackend::logical_sector_size(&d), 4096);
    let a = pattern(5 * MIB as usize, 4);
    d.write(&a, MIB).unwrap();
    drop(d);
    let child = dir.path().join("c4k.vhdx");
    let c = Vhdx::create(
        &child,
        &vireo_vhdx::CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(base),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.logical_sector_size(), 4096);
    c.write(&[7; 100], MIB + 4000).unwrap(); // crosses a 4 KiB sector boundary, unaligned
    c.discard(3 * MIB, 8192).unwrap();
    drop(c);
    let c = reopen(&child);
    let mut expect = a.clone();
    expect[4000..4100].fill(7);
    expect[2 * MIB as usize..2 * MIB as usize + 8192].fill(0);
    assert_eq!(read(&c, MIB, expect.len()), expect);
    drop(c); // check needs the file to itself (a writer holds it exclusively)
    assert!(Vhdx::check(&child, false).unwrap().is_clean());
}

#[test]
fn info_serialises_to_json() {
    let dir = tmpdir();
    let (_p, d) = create(
        dir.path(),
        "i.vhdx",
        &opts(8 * MIB, MIB as u32, DiskType::Fixed),
    );
    let j = serde_json::to_value(d.info()).unwrap();
    assert_eq!(j["disk_type"], "fixed");
    assert_eq!(j["virtual_size"], 8 * MIB);
    assert_eq!(j["allocated_blocks"], 8);
    assert!(j["data_write_guid"].as_str().unwrap().starts_with('{'));
}
