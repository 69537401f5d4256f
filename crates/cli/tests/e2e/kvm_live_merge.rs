//! `vireo run --control`: merging the running probe guest's differencing VHDX into its parent
//! (`disk-merge 0`) while the guest keeps writing, then checking every byte on both sides.

use crate::common;

use std::io::Write;

use std::sync::mpsc;
use std::time::Instant;

use common::*;
use vireo_probe_image::pattern;
use vireo_vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

fn next_line(rx: &mpsc::Receiver<String>) -> String {
    rx.recv_timeout(T).expect("no answer on the control socket")
}

/// Has the guest write `count` sectors of pattern `seed` at `lba`, and records it.
fn guest_write(
    vm: &mut ProbeVm,
    guest: &mut Vec<(u64, u64, u64)>,
    lba: u64,
    count: u64,
    seed: u64,
) {
    vm.ok(&format!("DISK 0 WRITE {lba} {count} {seed}"));
    guest.push((lba, count, seed));
}

/// Writes the probe pattern `seed` over `start..start+len` of `d` and of `model`.
fn host_fill(d: &Vhdx, model: &mut [u8], start: u64, len: u64, seed: u64) {
    let range = &mut model[start as usize..(start + len) as usize];
    pattern::fill(range, seed, start);
    d.write(range, start).unwrap();
}

#[test]
fn kvm_live_merge_while_the_guest_writes() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    let sock = dir.path().join("control.sock");
    let mut model = vec![0u8; SIZE as usize];
    {
        let o = CreateOptions {
            size: SIZE,
            block_size: MIB as u32,
            ..Default::default()
        };
        let b = Vhdx::create(&base, &o).unwrap();
        host_fill(&b, &mut model, 0, 24 * MIB, 5);
        drop(b);
        let o = CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(base.clone()),
            block_size: 2 * MIB as u32,
            ..Default::default()
        };
        let c = Vhdx::create(&child, &o).unwrap();
        host_fill(&c, &mut model, 8 * MIB, 12 * MIB, 6);
        drop(c);
    }
    let disk = child.to_str().unwrap().to_string();
    let ctl = sock.to_str().unwrap().to_string();
    let mut vm = ProbeVm::start(
        &[],
        &["--memory", "64M", "--disk", &disk, "--control", &ctl],
    );
    assert_eq!(vm.ok("DISK 0 INFO"), "OK sectors=65536 ro=0 blk_size=512");
    // (lba, sectors, seed) the guest wrote; never overlapping each other.
    let mut guest: Vec<(u64, u64, u64)> = vec![];
    guest_write(&mut vm, &mut guest, 100, 64, 11); // over base data
    guest_write(&mut vm, &mut guest, 20_000, 64, 12); // over child data
    guest_write(&mut vm, &mut guest, 60_000, 64, 13); // where neither file has data
    vm.ok("DISK 0 FLUSH");

    let (mut conn, lines) = control_socket(&sock);
    writeln!(conn, "disks").unwrap();
    let listed = next_line(&lines);
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(v["index"], 0, "{listed}");
    assert_eq!(v["format"], "vhdx", "{listed}");
    assert_eq!(v["path"], disk.as_str(), "{listed}");
    assert_eq!(v["virtual_size"], SIZE, "{listed}");
    assert_eq!(v["chain_depth"], 2, "{listed}");
    assert_eq!(next_line(&lines), "ok");
    writeln!(conn, "disk-merge 7").unwrap();
    assert!(next_line(&lines).starts_with("error no disk '7'"));

    writeln!(conn, "disk-merge 0").unwrap();
    let started = Instant::now();
    let (mut progress, mut merged, mut during) = (0, None, 0);
    // The guest keeps writing (fresh 8 KiB pieces across the child's and the base's data)
    // until the merge answers, and a little longer.
    for k in 0..2000u64 {
        let lba = 30_000 + k * 16;
        if lba + 16 > 59_000 {
            break;
        }
        guest_write(&mut vm, &mut guest, lba, 16, 100 + k % 50);
        if merged.is_none() {
            during += 1;
        }
        while let Ok(line) = lines.try_recv() {
            if line.starts_with("progress ") {
                progress += 1;
            } else {
                merged = Some(line);
            }
        }
        if let Some(m) = &merged {
            assert!(m.starts_with("ok "), "merge failed: {m}");
            if guest.len() > during + 8 {
                break;
            }
        }
        assert!(started.elapsed() < T * 2, "merge did not finish");
    }
    while merged.is_none() {
        let line = next_line(&lines);
        if line.starts_with("progress ") {
            progress += 1;
        } else {
            merged = Some(line);
        }
    }
    let merged = merged.unwrap();
    assert_eq!(merged, format!("ok {}", base.display()));
    eprintln!(
        "merge took {:.2} s, {progress} progress lines, {during} guest writes while it ran, \
         {} in all",
        started.elapsed().as_secs_f64(),
        guest.len()
    );
    assert!(progress > 0, "no progress lines");
    assert!(!child.exists(), "child file still exists");
    writeln!(conn, "disks").unwrap();
    let v: serde_json::Value = serde_json::from_str(&next_line(&lines)).unwrap();
    assert_eq!(v["path"], base.to_str().unwrap());
    assert_eq!(v["chain_depth"], 1);
    assert_eq!(next_line(&lines), "ok");
    writeln!(conn, "disk-merge-cancel 0").unwrap();
    assert_eq!(next_line(&lines), "error no merge of disk 0 is running");
    writeln!(conn, "disk-merge 0").unwrap();
    let again = next_line(&lines);
    assert!(again.contains("is not a differencing disk"), "{again}");

    // Everything the guest wrote reads back through the merged disk, and so does a sample
    // of the data each file held before.
    guest_write(&mut vm, &mut guest, 61_000, 64, 14); // after the pivot: lands in base.vhdx
    for &(lba, count, seed) in &guest {
        vm.ok(&format!("DISK 0 VERIFY {lba} {count} {seed}"));
    }
    vm.ok("DISK 0 VERIFY 0 100 5");
    vm.ok("DISK 0 VERIFY 16384 256 6");
    vm.ok("DISK 0 VERIFY 45000 512 5");
    vm.ok("DISK 0 FLUSH");
    drop(conn);
    assert_eq!(vm.poweroff(0), Some(0));
    assert!(!sock.exists(), "control socket left behind");

    for &(lba, count, seed) in &guest {
        let (s, e) = ((lba * 512) as usize, ((lba + count) * 512) as usize);
        pattern::fill(&mut model[s..e], seed, lba * 512);
    }
    let b = Vhdx::open(&base, &OpenOptions::read_only()).unwrap();
    assert_eq!(b.chain_depth(), 1);
    let mut got = vec![0u8; SIZE as usize];
    b.read(&mut got, 0).unwrap();
    if let Some(i) = (0..got.len()).find(|&i| got[i] != model[i]) {
        panic!("base.vhdx differs from the model first at byte {i}");
    }
    drop(b);
    if !vireo_testkit::require(vireo_testkit::Need::QemuImg) {
        return;
    }
    let o = std::process::Command::new("qemu-img")
        .args(["check", "-f", "vhdx", base.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
