//! Interoperability with QEMU's independent VHDX implementation (qemu-img / qemu-io).
//! Needs qemu-img and qemu-io (vireo-testkit: a recorded skip without them, a failure under CI).
mod common;
use std::path::Path;
use std::process::Command;

use common::*;
use vireo_vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;

fn have_qemu() -> bool {
    vireo_testkit::require_all(&[vireo_testkit::Need::QemuImg, vireo_testkit::Need::QemuIo])
}

fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{cmd} {args:?} failed: {out}");
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes the same pieces to our VHDX and to a raw file, then asks qemu to check and compare.
fn ours_then_qemu(disk_type: DiskType, block: u32, sector: u32) {
    eprintln!("case: {disk_type:?} block {block} sector {sector}");
    let dir = tmpdir();
    let size = 96 * MIB;
    let o = CreateOptions {
        size,
        disk_type,
        block_size: block,
        logical_sector: sector,
        physical_sector: 4096,
        parent: None,
    };
    let (p, d) = create(dir.path(), "ours.vhdx", &o);
    let raw = dir.path().join("raw.img");
    let rf = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&raw)
        .unwrap();
    rf.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    for (i, off) in [0, 4096, 3 * MIB + 512 * 8, 33 * MIB, 95 * MIB]
        .iter()
        .enumerate()
    {
        let data = pattern(MIB as usize - 4096, i as u8);
        let off = (*off).min(size - data.len() as u64) / sector as u64 * sector as u64;
        d.write(&data, off).unwrap();
        rf.write_all_at(&data, off).unwrap();
    }
    d.discard(33 * MIB, 4096).unwrap();
    rf.write_all_at(&[0; 4096], 33 * MIB).unwrap();
    d.flush().unwrap();
    drop(d);
    let ours = Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    let mut expect = vec![0u8; size as usize];
    rf.read_exact_at(&mut expect, 0).unwrap();
    assert_eq!(read(&ours, 0, size as usize), expect);
    if sector == 4096 {
        // QEMU refuses 4 KiB logical sectors ("Operation not supported"); nothing to compare.
        return;
    }
    run("qemu-img", &["check", "-f", "vhdx", s(&p)]);
    run(
        "qemu-img",
        &["compare", "-f", "vhdx", "-F", "raw", s(&p), s(&raw)],
    );
}

#[test]
fn our_dynamic_images_pass_qemu_check_and_compare() {
    if !have_qemu() {
        return;
    }
    ours_then_qemu(DiskType::Dynamic, MIB as u32, 512);
    ours_then_qemu(DiskType::Dynamic, 32 * MIB as u32, 512);
    ours_then_qemu(DiskType::Dynamic, MIB as u32, 4096);
    ours_then_qemu(DiskType::Dynamic, 8 * MIB as u32, 512);
}

#[test]
fn our_fixed_images_pass_qemu_check_and_compare() {
    if !have_qemu() {
        return;
    }
    ours_then_qemu(DiskType::Fixed, 2 * MIB as u32, 512);
}

#[test]
fn our_resized_image_passes_qemu_check() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "r.vhdx",
        &opts(64 * MIB, MIB as u32, DiskType::Dynamic),
    );
    d.write(&[7; 8192], 10 * MIB).unwrap();
    d.resize(200 * 1024 * MIB, false).unwrap(); // moves the BAT
    d.write(&[8; 8192], 150 * 1024 * MIB).unwrap();
    drop(d);
    run("qemu-img", &["check", "-f", "vhdx", s(&p)]);
    let out = run("qemu-img", &["info", "--output=json", s(&p)]);
    assert!(
        out.contains(&format!("\"virtual-size\": {}", 200u64 * 1024 * MIB)),
        "{out}"
    );
    run(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-c",
            "read -P 7 10M 8k",
            "-c",
            &format!("read -P 8 {} 8k", 150u64 * 1024 * MIB),
            s(&p),
        ],
    );
}

fn qemu_then_ours(subformat: &str, block: &str, log: &str) {
    let dir = tmpdir();
    let p = dir.path().join("q.vhdx");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            &format!("subformat={subformat},block_size={block},log_size={log}"),
            s(&p),
            "80M",
        ],
    );
    let out = run(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 40M 4k",
            "-c",
            "write -P 0x11 79M 1M",
            s(&p),
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    let d = Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    assert_eq!(d.virtual_size(), 80 * MIB);
    assert_eq!(read(&d, 0, MIB as usize), vec![0xab; MIB as usize]);
    assert_eq!(read(&d, 40 * MIB, 4096), vec![0xcd; 4096]);
    assert_eq!(read(&d, 40 * MIB + 4096, 4096), vec![0; 4096]);
    assert_eq!(read(&d, 79 * MIB, MIB as usize), vec![0x11; MIB as usize]);
    drop(d);
    // And the other way: we write into qemu's image, qemu reads it back.
    let d = Vhdx::open(&p, &OpenOptions::default()).unwrap();
    d.write(&vec![0x5a; 64 * 1024], 20 * MIB).unwrap();
    d.write(&vec![0x6b; 4096], 4096).unwrap();
    drop(d);
    run("qemu-img", &["check", "-f", "vhdx", s(&p)]);
    let out = run(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-c",
            "read -P 0x5a 20M 64k",
            "-c",
            "read -P 0x6b 4k 4k",
            "-c",
            "read -P 0xab 8k 1016k",
            "-c",
            "read -P 0xcd 40M 4k",
            s(&p),
        ],
    );
    assert!(!out.contains("failed"), "{out}");
}

#[test]
fn qemu_images_read_and_write_in_ours() {
    if !have_qemu() {
        return;
    }
    for (sub, block, log) in [
        ("dynamic", "1M", "1M"),
        ("dynamic", "8M", "4M"),
        ("dynamic", "32M", "1M"),
        ("fixed", "2M", "1M"),
        ("dynamic", "256M", "8M"),
    ] {
        qemu_then_ours(sub, block, log);
    }
}

/// QEMU writes real log entries for its BAT updates (and clears LogGuid once applied). Re-arm
/// that log (LogGuid back in the header, the BAT page it updated wiped) and both
/// implementations must replay it to the same data: proves we parse foreign log entries.
#[test]
fn we_replay_a_log_written_by_qemu() {
    use std::os::unix::fs::FileExt;
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let p = dir.path().join("q.vhdx");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            s(&p),
            "64M",
        ],
    );
    // sigraise 9 kills qemu-io itself, so no close path runs.
    let _ = Command::new("qemu-io")
        .args([
            "-f",
            "vhdx",
            "-c",
            "write -P 0x3c 0 64k",
            "-c",
            "write -P 0x4d 10M 4k",
            "-c",
            "sigraise 9",
            s(&p),
        ])
        .output()
        .unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let mut hs = vec![0u8; 1 << 20];
    f.read_exact_at(&mut hs, 0).unwrap();
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let slot = if u64_at(&hs, 64 * 1024 + 8) > u64_at(&hs, 128 * 1024 + 8) {
        64 * 1024
    } else {
        128 * 1024
    };
    let log_off = u64_at(&hs, slot + 72);
    // QEMU starts a new LogGuid for each entry; re-arm the newest one.
    let log_len = u32::from_le_bytes(hs[slot + 68..slot + 72].try_into().unwrap()) as u64;
    let mut entry = vec![0u8; 4096];
    let mut best: Option<(u64, Vec<u8>)> = None;
    for pos in (0..log_len).step_by(4096) {
        f.read_exact_at(&mut entry, log_off + pos).unwrap();
        if &entry[..4] == b"loge" && best.as_ref().is_none_or(|b| u64_at(&entry, 16) > b.0) {
            best = Some((u64_at(&entry, 16), entry.clone()));
        }
    }
    let entry = best.expect("qemu wrote no log entry").1;
    // Re-arm: current header gets the entry's LogGuid (checksum fixed).
    let mut h = hs[slot..slot + 4096].to_vec();
    h[48..64].copy_from_slice(&entry[32..48]);
    h[4..8].fill(0);
    let c = crc32c::crc32c(&h);
    h[4..8].copy_from_slice(&c.to_le_bytes());
    f.write_all_at(&h, slot as u64).unwrap();
    // Wipe the first BAT page (found through region table 1).
    let rt = 192 * 1024;
    let bat_guid = [
        0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a,
        0x08,
    ];
    let count = u32::from_le_bytes(hs[rt + 8..rt + 12].try_into().unwrap()) as usize;
    let bat = (0..count)
        .map(|i| rt + 16 + i * 32)
        .find(|&e| hs[e..e + 16] == bat_guid)
        .map(|e| u64_at(&hs, e + 16))
        .unwrap();
    f.write_all_at(&[0u8; 4096], bat).unwrap();
    drop(f);
    let copy = dir.path().join("qcopy.vhdx");
    std::fs::copy(&p, &copy).unwrap();
    // QEMU itself replays the re-armed log to the written data (sanity of the setup).
    let out = run(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-c",
            "read -P 0x3c 0 64k",
            "-c",
            "read -P 0x4d 10M 4k",
            s(&copy),
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    // Read-only: replayed in memory.
    let d = Vhdx::open(&p, &OpenOptions::read_only()).unwrap();
    assert!(d.info().log_entries_replayed_at_open >= 1);
    assert_eq!(read(&d, 0, 64 * 1024), vec![0x3c; 64 * 1024]);
    assert_eq!(read(&d, 10 * MIB, 4096), vec![0x4d; 4096]);
    drop(d);
    // Read-write: replayed into the file, which qemu then accepts as is.
    drop(Vhdx::open(&p, &OpenOptions::default()).unwrap());
    run("qemu-img", &["check", "-f", "vhdx", s(&p)]);
    let out = run(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-r",
            "-c",
            "read -P 0x3c 0 64k",
            "-c",
            "read -P 0x4d 10M 4k",
            s(&p),
        ],
    );
    assert!(!out.contains("failed"), "{out}");
}

/// The other direction: a crash right after our flush leaves a live log; with the in-place BAT
/// update undone, QEMU must replay our log entry and find the data.
#[test]
fn qemu_replays_a_log_written_by_us() {
    use std::os::unix::fs::FileExt;
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "ours.vhdx",
        &CreateOptions {
            size: 64 * MIB,
            block_size: MIB as u32,
            ..Default::default()
        },
    );
    d.write(&vec![0x77; 64 * 1024], 0).unwrap();
    d.write(&vec![0x88; 4096], 20 * MIB).unwrap();
    d.flush().unwrap();
    d.abandon(); // crash: no clean close
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&[0u8; 4096], 3 * MIB).unwrap(); // our BAT starts at 3 MiB
    drop(f);
    let out = run(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-c",
            "read -P 0x77 0 64k",
            "-c",
            "read -P 0x88 20M 4k",
            s(&p),
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    run("qemu-img", &["check", "-f", "vhdx", s(&p)]);
}
