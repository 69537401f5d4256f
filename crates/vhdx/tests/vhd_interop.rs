//! VHD (v1) against qemu-img, an independent implementation: images QEMU creates and writes read
//! back identically in ours; images we write compare equal in QEMU; differencing chains and
//! hostile files.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vireo_block::BlockBackend;
use vireo_vhdx::vhd::format::{checksum, DynamicHeader, Footer};
use vireo_vhdx::vhd::{DiskType, Vhd, VhdCreateOptions, VhdError};

fn have_qemu() -> bool {
    vireo_testkit::require_all(&[vireo_testkit::Need::QemuImg, vireo_testkit::Need::QemuIo])
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{:?} failed: {}{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn read_all(disk: &dyn BlockBackend) -> Vec<u8> {
    let mut v = vec![0u8; disk.size() as usize];
    disk.read_at(&mut v, 0).unwrap();
    v
}

fn qemu_raw(dir: &Path, image: &Path) -> Vec<u8> {
    let raw = dir.join("qemu-out.raw");
    let _ = std::fs::remove_file(&raw);
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(image)
        .arg(&raw));
    std::fs::read(raw).unwrap()
}

#[test]
fn qemu_written_images_read_back_identically() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for subformat in ["dynamic", "fixed"] {
        let img = dir.path().join(format!("q-{subformat}.vhd"));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "vpc", "-o"])
            .arg(format!("subformat={subformat}"))
            .arg(&img)
            .arg("24M"));
        for (i, (off, len)) in [
            (0u64, 4096u64),
            (3 << 20, 65536),
            (5 << 20, 1 << 20),
            (23 << 20, 512),
        ]
        .iter()
        .enumerate()
        {
            run(Command::new("qemu-io")
                .args(["-f", "vpc", "-c"])
                .arg(format!("write -P {} {off} {len}", 0x11 * (i + 1)))
                .arg(&img));
        }
        let ours = Vhd::open(&img, true).unwrap();
        let expected = qemu_raw(dir.path(), &img);
        assert_eq!(ours.size(), expected.len() as u64, "{subformat}");
        assert!(read_all(&ours) == expected, "{subformat} contents differ");
        if subformat == "dynamic" {
            // Only the blocks qemu allocated are reported as possibly holding data.
            let ranges = ours.allocated_ranges();
            assert!(ranges.len() >= 2 && ranges.len() <= 5, "{ranges:?}");
        }
    }
}

#[test]
fn our_images_compare_equal_in_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 40u64 << 20;
    for (name, disk_type, block) in [
        ("dyn.vhd", DiskType::Dynamic, None),
        ("dyn512k.vhd", DiskType::Dynamic, Some(512 << 10)),
        ("fixed.vhd", DiskType::Fixed, None),
    ] {
        let img = dir.path().join(name);
        let raw_path = dir.path().join(format!("{name}.raw"));
        let raw = std::fs::File::create(&raw_path).unwrap();
        raw.set_len(size).unwrap();
        let disk = Vhd::create(
            &img,
            &VhdCreateOptions {
                size,
                disk_type,
                block_size: block,
            },
        )
        .unwrap();
        let mut rng = Rng(0x9e3779b97f4a7c15);
        for _ in 0..60 {
            let len = (rng.next() % (300 << 10)) + 1;
            // Only the first half is written, so a dynamic disk must leave blocks unallocated.
            let off = rng.next() % (size / 2 - len);
            let mut buf = vec![0u8; len as usize];
            rng.fill(&mut buf);
            disk.write_at(&buf, off).unwrap();
            raw.write_all_at(&buf, off).unwrap();
        }
        disk.write_zeroes(1 << 20, 3 << 20).unwrap();
        raw.write_all_at(&vec![0u8; 3 << 20], 1 << 20).unwrap();
        disk.flush().unwrap();
        drop(disk);
        let out = run(Command::new("qemu-img")
            .args(["compare", "-f", "vpc", "-F", "raw"])
            .arg(&img)
            .arg(&raw_path));
        assert!(out.contains("identical"), "{name}: {out}");
        let reopened = Vhd::open(&img, true).unwrap();
        assert!(read_all(&reopened) == std::fs::read(&raw_path).unwrap());
        // Sparse: a dynamic disk with 60 small writes is far smaller than its virtual size.
        if disk_type == DiskType::Dynamic {
            let info = reopened.info().unwrap();
            assert!(info.allocated_blocks < info.total_blocks, "{info:?}");
        }
    }
}

#[test]
fn data_qemu_writes_into_our_image_reads_back() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ours.vhd");
    let disk = Vhd::create(
        &img,
        &VhdCreateOptions {
            size: 16 << 20,
            disk_type: DiskType::Dynamic,
            block_size: None,
        },
    )
    .unwrap();
    disk.write_at(&[0xab; 8192], 4096).unwrap();
    disk.flush().unwrap();
    drop(disk);
    run(Command::new("qemu-io")
        .args(["-f", "vpc", "-c", "write -P 0x5a 6291456 131072"])
        .arg(&img));
    let disk = Vhd::open(&img, false).unwrap();
    let mut buf = vec![0u8; 131072];
    disk.read_at(&mut buf, 6 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    disk.read_at(&mut buf[..8192], 4096).unwrap();
    assert!(buf[..8192].iter().all(|&b| b == 0xab));
}

/// Turns a dynamic VHD we created into a differencing child of `parent`: footer type 4, parent
/// id, a relative (W2ru) locator, and explicit sector bitmaps.
fn make_child(child: &Path, parent: &Path, locator: &str, parent_id: [u8; 16]) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(child)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut fb = [0u8; 512];
    f.read_exact_at(&mut fb, 0).unwrap();
    let mut footer = Footer::parse(&fb).unwrap();
    footer.disk_type = DiskType::Differencing;
    let mut hb = [0u8; 1024];
    f.read_exact_at(&mut hb, 512).unwrap();
    let mut header = DynamicHeader::parse(&hb).unwrap();
    header.parent_unique_id = parent_id;
    header.parent_name = parent.file_name().unwrap().to_string_lossy().into_owned();
    // Locator data goes where the footer is now; the footer moves after it.
    let data: Vec<u8> = locator
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    let at = len - 512;
    header.locators[0].platform_code = *b"W2ru";
    header.locators[0].data_space = 512;
    header.locators[0].data_length = data.len() as u32;
    header.locators[0].data_offset = at;
    let mut sector = vec![0u8; 512];
    sector[..data.len()].copy_from_slice(&data);
    f.write_all_at(&sector, at).unwrap();
    f.write_all_at(&footer.to_bytes(), at + 512).unwrap();
    f.write_all_at(&footer.to_bytes(), 0).unwrap();
    f.write_all_at(&header.to_bytes(), 512).unwrap();
}

fn footer_of(path: &Path) -> Footer {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, len - 512).unwrap();
    Footer::parse(&b).unwrap()
}

#[test]
fn differencing_reads_fall_through_to_the_parent_by_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8u64 << 20;
    let parent_path = dir.path().join("base.vhd");
    let child_path = dir.path().join("child.vhd");
    let parent = Vhd::create(
        &parent_path,
        &VhdCreateOptions {
            size,
            disk_type: DiskType::Dynamic,
            block_size: None,
        },
    )
    .unwrap();
    parent.write_at(&vec![0x11; size as usize], 0).unwrap();
    parent.flush().unwrap();
    drop(parent);
    let child = Vhd::create(
        &child_path,
        &VhdCreateOptions {
            size,
            disk_type: DiskType::Dynamic,
            block_size: None,
        },
    )
    .unwrap();
    // Child data at 2 MiB + 0..8 KiB; block 1 allocated.
    child.write_at(&[0x22; 8192], 2 << 20).unwrap();
    child.flush().unwrap();
    drop(child);
    // Bitmap of block 1: only the first 16 sectors are the child's; the rest come from the parent.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&child_path)
        .unwrap();
    let mut bat = [0u8; 8];
    f.read_exact_at(&mut bat, 1536).unwrap();
    let block1 = u32::from_be_bytes(bat[4..8].try_into().unwrap()) as u64 * 512;
    let mut bitmap = vec![0u8; 512];
    bitmap[0] = 0xff;
    bitmap[1] = 0xff;
    f.write_all_at(&bitmap, block1).unwrap();
    drop(f);
    make_child(
        &child_path,
        &parent_path,
        ".\\base.vhd",
        footer_of(&parent_path).unique_id,
    );

    let disk = Vhd::open(&child_path, true).unwrap();
    assert_eq!(disk.info().unwrap().disk_type, DiskType::Differencing);
    let all = read_all(&disk);
    assert!(all[..2 << 20].iter().all(|&b| b == 0x11));
    assert!(all[2 << 20..(2 << 20) + 8192].iter().all(|&b| b == 0x22));
    assert!(all[(2 << 20) + 8192..].iter().all(|&b| b == 0x11));
    // An unaligned read across the bitmap boundary.
    let mut buf = [0u8; 1000];
    disk.read_at(&mut buf, (2 << 20) + 8192 - 500).unwrap();
    assert!(buf[..500].iter().all(|&b| b == 0x22) && buf[500..].iter().all(|&b| b == 0x11));
    drop(disk); // a writer may not open beside a reader: let the write attempt reach the format check
    assert!(matches!(
        Vhd::open(&child_path, false),
        Err(VhdError::DifferencingWrite)
    ));

    // Parent replaced by another disk with a different id: refused, naming both.
    std::fs::remove_file(&parent_path).unwrap();
    Vhd::create(
        &parent_path,
        &VhdCreateOptions {
            size,
            disk_type: DiskType::Dynamic,
            block_size: None,
        },
    )
    .unwrap();
    assert!(matches!(
        Vhd::open(&child_path, true),
        Err(VhdError::ParentMismatch { .. })
    ));
    std::fs::remove_file(&parent_path).unwrap();
    let err = Vhd::open(&child_path, true).unwrap_err();
    assert!(matches!(err, VhdError::ParentMissing { .. }), "{err}");
}

#[test]
fn a_child_that_is_its_own_parent_is_a_loop_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loop.vhd");
    Vhd::create(
        &path,
        &VhdCreateOptions {
            size: 4 << 20,
            disk_type: DiskType::Dynamic,
            block_size: None,
        },
    )
    .unwrap();
    let id = footer_of(&path).unique_id;
    make_child(&path, &path, ".\\loop.vhd", id);
    let err = Vhd::open(&path, true).unwrap_err();
    assert!(matches!(err, VhdError::ChainTooDeep(..)), "{err}");
}

fn corrupt(path: &Path, at: u64, bytes: &[u8]) -> PathBuf {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
    path.to_path_buf()
}

#[test]
fn hostile_files_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = |name: &str| {
        let p = dir.path().join(name);
        Vhd::create(
            &p,
            &VhdCreateOptions {
                size: 4 << 20,
                disk_type: DiskType::Dynamic,
                block_size: None,
            },
        )
        .unwrap();
        p
    };
    let tiny = dir.path().join("tiny.vhd");
    std::fs::write(&tiny, b"conectix").unwrap();
    assert!(matches!(
        Vhd::open(&tiny, true),
        Err(VhdError::TooSmall { .. })
    ));

    let p = fresh("nofooter.vhd");
    corrupt(&p, 0, b"XXXXXXXX");
    let len = std::fs::metadata(&p).unwrap().len();
    corrupt(&p, len - 512, b"XXXXXXXX");
    assert!(matches!(Vhd::open(&p, true), Err(VhdError::NoFooter)));

    let p = fresh("sum.vhd");
    let len = std::fs::metadata(&p).unwrap().len();
    corrupt(&p, len - 512 + 100, &[1]);
    corrupt(&p, 100, &[1]);
    assert!(matches!(
        Vhd::open(&p, true),
        Err(VhdError::FooterChecksum { .. })
    ));

    // BAT entry pointing past the end of the file.
    let p = fresh("bat.vhd");
    corrupt(&p, 1536, &0x00ff_0000u32.to_be_bytes());
    assert!(matches!(
        Vhd::open(&p, true),
        Err(VhdError::BlockOutside { .. })
    ));

    // BAT entry pointing at the dynamic header.
    let p = fresh("bat2.vhd");
    corrupt(&p, 1536, &1u32.to_be_bytes());
    assert!(matches!(
        Vhd::open(&p, true),
        Err(VhdError::BlockOutside { .. })
    ));

    // Header checksum.
    let p = fresh("hdr.vhd");
    corrupt(&p, 512 + 200, &[9]);
    assert!(matches!(
        Vhd::open(&p, true),
        Err(VhdError::HeaderChecksum { .. })
    ));

    // Huge virtual size with a tiny BAT: refused, no allocation.
    let p = fresh("huge.vhd");
    let mut footer = footer_of(&p);
    footer.current_size = 2000 << 30;
    let bytes = footer.to_bytes();
    let len = std::fs::metadata(&p).unwrap().len();
    corrupt(&p, len - 512, &bytes);
    corrupt(&p, 0, &bytes);
    assert!(matches!(
        Vhd::open(&p, true),
        Err(VhdError::BatTooSmall { .. })
    ));
    assert_eq!(
        checksum(&bytes, 64),
        u32::from_be_bytes(bytes[64..68].try_into().unwrap())
    );
}

#[test]
fn fixed_and_dynamic_resize() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fixed.vhd");
    let d = Vhd::create(
        &p,
        &VhdCreateOptions {
            size: 1 << 20,
            disk_type: DiskType::Fixed,
            block_size: None,
        },
    )
    .unwrap();
    d.write_at(&[7; 512], (1 << 20) - 512).unwrap();
    d.resize(2 << 20).unwrap();
    let mut b = vec![0u8; 1024];
    d.read_at(&mut b, (1 << 20) - 512).unwrap();
    assert!(b[..512].iter().all(|&x| x == 7) && b[512..].iter().all(|&x| x == 0));
    drop(d);
    assert_eq!(Vhd::open(&p, true).unwrap().size(), 2 << 20);
}
