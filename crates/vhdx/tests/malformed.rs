//! Hostile and damaged files: every one must give a typed error (never a panic, a hang, a huge
//! allocation or a write to the file).
mod common;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use vireo_vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx, VhdxError};

const MIB: u64 = 1 << 20;
const BAT: u64 = 3 * MIB;
const META: u64 = 2 * MIB;

fn image(dir: &Path) -> PathBuf {
    let (p, d) = create(
        dir,
        "m.vhdx",
        &opts(64 * MIB, MIB as u32, DiskType::Dynamic),
    );
    d.write(&[1; 4096], 0).unwrap();
    drop(d);
    p
}

fn poke(p: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// Rewrites both region tables / header slots with a valid checksum after `edit`.
fn edit_region_tables(p: &Path, edit: impl Fn(&mut [u8])) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    for off in [192 * 1024u64, 256 * 1024] {
        let mut b = vec![0u8; 64 * 1024];
        f.read_exact_at(&mut b, off).unwrap();
        edit(&mut b);
        b[4..8].fill(0);
        let c = crc32c::crc32c(&b);
        b[4..8].copy_from_slice(&c.to_le_bytes());
        f.write_all_at(&b, off).unwrap();
    }
}

fn edit_headers(p: &Path, edit: impl Fn(&mut [u8])) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    for off in [64 * 1024u64, 128 * 1024] {
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, off).unwrap();
        edit(&mut b);
        b[4..8].fill(0);
        let c = crc32c::crc32c(&b);
        b[4..8].copy_from_slice(&c.to_le_bytes());
        f.write_all_at(&b, off).unwrap();
    }
}

fn open_err(p: &Path) -> VhdxError {
    let before = std::fs::read(p).unwrap();
    let e = Vhdx::open(p, &OpenOptions::read_only()).expect_err("hostile file opened");
    assert_eq!(
        std::fs::read(p).unwrap(),
        before,
        "read-only open wrote to the file"
    );
    // A writable open must refuse the same way.
    assert!(Vhdx::open(p, &OpenOptions::default()).is_err());
    e
}

#[test]
fn truncated_files() {
    let dir = tmpdir();
    let p = image(dir.path());
    for len in [0, 100, 64 * 1024, MIB - 1, 2 * MIB, 3 * MIB + 10] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len)
            .unwrap();
        let e = open_err(&p);
        assert!(
            matches!(
                e,
                VhdxError::Truncated { .. }
                    | VhdxError::BadFileSignature { .. }
                    | VhdxError::NoValidHeader { .. }
                    | VhdxError::BadLogLocation { .. }
                    | VhdxError::BadRegion { .. }
            ),
            "len {len}: {e}"
        );
    }
}

#[test]
fn bad_signatures_and_checksums() {
    let dir = tmpdir();
    let p = image(dir.path());
    poke(&p, 0, b"notvhdx!");
    assert!(matches!(open_err(&p), VhdxError::BadFileSignature { .. }));
    poke(&p, 0, b"vhdxfile");
    poke(&p, 64 * 1024 + 200, &[0xaa]);
    poke(&p, 128 * 1024 + 200, &[0xaa]);
    assert!(matches!(open_err(&p), VhdxError::NoValidHeader { .. }));
    let p = image(&dir.path().join("x").tap_mkdir());
    poke(&p, 192 * 1024 + 100, &[1]);
    Vhdx::open(&p, &OpenOptions::read_only()).expect("second region table must be used");
    poke(&p, 256 * 1024 + 100, &[1]);
    assert!(matches!(open_err(&p), VhdxError::NoValidRegionTable { .. }));
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}
impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn unsupported_versions() {
    let dir = tmpdir();
    let p = image(dir.path());
    edit_headers(&p, |b| b[66] = 2);
    assert!(matches!(open_err(&p), VhdxError::UnsupportedVersion(2)));
    edit_headers(&p, |b| {
        b[66] = 1;
        b[64] = 9
    });
    assert!(matches!(open_err(&p), VhdxError::UnsupportedLogVersion(9)));
}

#[test]
fn overlapping_and_out_of_file_regions() {
    let dir = tmpdir();
    let p = image(dir.path());
    // Move the BAT region on top of the metadata region (entry order: BAT then metadata).
    edit_region_tables(&p, |b| {
        b[16 + 16..16 + 24].copy_from_slice(&META.to_le_bytes())
    });
    assert!(matches!(open_err(&p), VhdxError::BadRegion { .. }));
    let p = image(&dir.path().join("b").tap_mkdir());
    edit_region_tables(&p, |b| {
        b[16 + 16..16 + 24].copy_from_slice(&(1u64 << 50).to_le_bytes())
    });
    assert!(matches!(open_err(&p), VhdxError::BadRegion { .. }));
    let p = image(&dir.path().join("c").tap_mkdir());
    edit_region_tables(&p, |b| b[16 + 28] = 1); // still required BAT: fine
    Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    edit_region_tables(&p, |b| b[16] ^= 0xff); // BAT GUID now unknown and required
    assert!(matches!(open_err(&p), VhdxError::UnknownRequiredRegion(_)));
}

#[test]
fn bat_entries_outside_file_or_on_metadata_or_duplicated() {
    let dir = tmpdir();
    type Expect = fn(&VhdxError) -> bool;
    let cases: [(u64, Expect); 4] = [
        ((1u64 << 43) | 6, |e| {
            matches!(
                e,
                VhdxError::BadBatOffset {
                    why: "outside the file",
                    ..
                }
            )
        }),
        (META | 6, |e| {
            matches!(
                e,
                VhdxError::BadBatOffset {
                    why: "inside the metadata region",
                    ..
                }
            )
        }),
        (MIB | 6, |e| {
            matches!(
                e,
                VhdxError::BadBatOffset {
                    why: "inside the log",
                    ..
                }
            )
        }),
        (4, |e| matches!(e, VhdxError::BadBatState { state: 4, .. })),
    ];
    for (i, (entry, ok)) in cases.iter().enumerate() {
        let p = image(&dir.path().join(i.to_string()).tap_mkdir());
        poke(&p, BAT + 8, &entry.to_le_bytes());
        let e = open_err(&p);
        assert!(ok(&e), "case {i}: {e}");
    }
    // Two entries sharing one block.
    let p = image(&dir.path().join("dup").tap_mkdir());
    let f = std::fs::File::open(&p).unwrap();
    let mut first = [0u8; 8];
    f.read_exact_at(&mut first, BAT).unwrap();
    poke(&p, BAT + 16, &first);
    assert!(matches!(open_err(&p), VhdxError::BatOverlap { .. }));
}

#[test]
fn huge_sizes_and_bad_metadata() {
    let dir = tmpdir();
    let p = image(dir.path());
    // Virtual size item: the second item (file params at 64 KiB, size right after).
    poke(&p, META + 64 * 1024 + 8, &(1u64 << 62).to_le_bytes());
    assert!(matches!(open_err(&p), VhdxError::BadVirtualSize(_)));
    let p = image(&dir.path().join("b").tap_mkdir());
    poke(&p, META + 64 * 1024 + 8, &(1u64 << 40).to_le_bytes()); // valid size, BAT too small
    assert!(matches!(open_err(&p), VhdxError::BatTooSmall { .. }));
    let p = image(&dir.path().join("c").tap_mkdir());
    poke(&p, META + 64 * 1024, &(3u32 << 20).to_le_bytes());
    assert!(matches!(open_err(&p), VhdxError::BadBlockSize(_)));
    let p = image(&dir.path().join("d").tap_mkdir());
    poke(&p, META + 10, &5000u16.to_le_bytes());
    assert!(matches!(open_err(&p), VhdxError::BadMetadataTable(_)));
    let p = image(&dir.path().join("e").tap_mkdir());
    poke(&p, META + 32 + 20, &u32::MAX.to_le_bytes()); // item length
    assert!(matches!(open_err(&p), VhdxError::BadMetadataTable(_)));
    let p = image(&dir.path().join("f").tap_mkdir());
    edit_headers(&p, |b| {
        b[68..72].copy_from_slice(&(4000u32 << 20).to_le_bytes())
    });
    assert!(matches!(open_err(&p), VhdxError::BadLogLocation { .. }));
}

#[test]
fn parent_loops_and_missing_parents() {
    let dir = tmpdir();
    let (a, d) = create(
        dir.path(),
        "a.vhdx",
        &opts(8 * MIB, MIB as u32, DiskType::Dynamic),
    );
    drop(d);
    let b = dir.path().join("b.vhdx");
    drop(
        Vhdx::create(
            &b,
            &CreateOptions {
                disk_type: DiskType::Differencing,
                parent: Some(a.clone()),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let c = dir.path().join("c.vhdx");
    drop(
        Vhdx::create(
            &c,
            &CreateOptions {
                disk_type: DiskType::Differencing,
                parent: Some(b.clone()),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    // Replace a with a copy of c's parent pointer shape: make b's parent be c by swapping files.
    // Simplest loop: rename c over a, so b -> "a.vhdx" (= old c) -> b.
    std::fs::copy(&c, &a).unwrap();
    let e = Vhdx::open(&b, &OpenOptions::read_only()).unwrap_err();
    assert!(
        matches!(
            e,
            VhdxError::ParentLoop(_) | VhdxError::ParentLinkageMismatch { .. }
        ),
        "{e}"
    );
    std::fs::remove_file(&b).unwrap();
    let e = Vhdx::open(&c, &OpenOptions::read_only()).unwrap_err();
    assert!(matches!(e, VhdxError::ParentNotFound { .. }), "{e}");
}

#[test]
fn random_corruption_never_panics() {
    let dir = tmpdir();
    let p = image(dir.path());
    let pristine = std::fs::read(&p).unwrap();
    let mut seed = 0x12345678u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..300 {
        let mut b = pristine.clone();
        for _ in 0..1 + next() % 8 {
            // Bias towards the structures: header section, metadata table, BAT.
            let region =
                [0u64, 64 * 1024, 192 * 1024, META, META + 64 * 1024, BAT][(next() % 6) as usize];
            let off = (region + next() % 4096) as usize;
            b[off] = next() as u8;
        }
        std::fs::write(&p, &b).unwrap();
        if let Ok(d) = Vhdx::open(&p, &OpenOptions::read_only()) {
            let mut buf = vec![0u8; 65536];
            let _ = d.read(&mut buf, 0);
            let _ = d.info();
        }
        let _ = Vhdx::check(&p, false);
    }
}

mod parsers {
    use proptest::prelude::*;
    use vireo_vhdx::format::{header, locator, log, metadata, region};
    use vireo_vhdx::Guid;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// Every pure parser takes arbitrary bytes without panicking.
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..70_000), which in 0u8..6) {
            match which {
                0 => { let _ = header::parse_file_identifier(&bytes); }
                1 => { let _ = header::Header::parse(&bytes); }
                2 => {
                    if let Ok(t) = region::RegionTable::parse(&bytes) {
                        let _ = t.validate(1 << 30, (1 << 20, 1 << 20));
                    }
                }
                3 => {
                    if let Ok(m) = metadata::Metadata::parse(bytes.clone()) {
                        let _ = m.params();
                    }
                }
                4 => { let _ = locator::ParentLocator::parse(&bytes); }
                _ => {
                    let mut log = bytes.clone();
                    log.resize(log.len().div_ceil(4096).max(1) * 4096, 0);
                    let _ = log::active_sequence(&log, Guid::from_slice(&log[..16]));
                }
            }
        }

        /// Valid-looking log entries with mutated fields: parsing never panics and a corrupted
        /// entry is never returned as valid.
        #[test]
        fn mutated_log_entries(pos in 0usize..8192, val in any::<u8>()) {
            let g = Guid::random();
            let page = vec![0x5au8; 4096];
            let e = log::build_entry(&log::EntryFields { sequence: 3, tail: 0, log_guid: g, flushed_file_offset: 1 << 22, last_file_offset: 1 << 22 }, &[(2 << 20, &page)]);
            let mut buf = vec![0u8; 1 << 20];
            buf[..e.len()].copy_from_slice(&e);
            let pos = pos % e.len();
            let changed = buf[pos] != val;
            buf[pos] = val;
            let seq = log::active_sequence(&buf, g);
            if changed {
                prop_assert!(seq.is_empty());
            } else {
                prop_assert_eq!(seq.len(), 1);
            }
        }
    }
}
