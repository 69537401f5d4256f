//! `vireo run --control`: resizing the running probe guest's disks (`disk-resize N SIZE`, and
//! `vireo control PATH resize N SIZE`), the guest seeing each new capacity at once; and a live
//! merge onto a larger parent telling the guest the disk grew.

use crate::common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;

use common::*;
use vireo_probe_image::pattern;
use vireo_vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;

/// Sends `cmd` and returns its one-line answer.
fn ask(conn: &mut UnixStream, rx: &mpsc::Receiver<String>, cmd: &str) -> String {
    writeln!(conn, "{cmd}").unwrap();
    rx.recv_timeout(T).expect("no answer on the control socket")
}

fn info(vm: &mut ProbeVm, disk: usize) -> String {
    vm.ok(&format!("DISK {disk} INFO"))
}

#[test]
fn kvm_online_resize_grows_and_shrinks_under_the_guest() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vhdx = dir.path().join("disk.vhdx");
    let raw = dir.path().join("disk.raw");
    let ro = dir.path().join("ro.raw");
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.avhdx");
    let sock = dir.path().join("control.sock");
    let opts = |size| CreateOptions {
        size,
        block_size: MIB as u32,
        ..Default::default()
    };
    drop(Vhdx::create(&vhdx, &opts(16 * MIB)).unwrap());
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    std::fs::File::create(&ro).unwrap().set_len(MIB).unwrap();
    // A child smaller than its parent: the merged disk keeps the child's size (the parent
    // shrinks to it), so the guest sees no change at the pivot.
    let b = Vhdx::create(&base, &opts(8 * MIB)).unwrap();
    b.write(&[5; 4096], 3 * MIB).unwrap();
    drop(b);
    let c = Vhdx::create(
        &child,
        &CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(base.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    c.resize(4 * MIB, false).unwrap();
    drop(c);

    let path = |p: &Path| p.to_str().unwrap().to_string();
    let ro_arg = format!("{},ro", path(&ro));
    let (ctl, vhdx_arg, raw_arg, child_arg) = (path(&sock), path(&vhdx), path(&raw), path(&child));
    let mut vm = ProbeVm::start(
        &[],
        &[
            "--memory",
            "64M",
            "--disk",
            &vhdx_arg,
            "--disk",
            &raw_arg,
            "--disk",
            &ro_arg,
            "--disk",
            &child_arg,
            "--control",
            &ctl,
        ],
    );
    let (mut conn, rx) = control_socket(&sock);

    // VHDX grow: the guest sees the new capacity and can use the new area.
    assert_eq!(info(&mut vm, 0), "OK sectors=32768 ro=0 blk_size=512");
    assert_eq!(ask(&mut conn, &rx, "disk-resize 0 48M"), "ok 50331648");
    assert_eq!(info(&mut vm, 0), "OK sectors=98304 ro=0 blk_size=512");
    vm.ok("DISK 0 WRITE 90000 64 21");
    vm.ok("DISK 0 VERIFY 90000 64 21");
    vm.ok("DISK 0 FLUSH");

    // VHDX shrink: refused over the data, allowed down to the block that holds it.
    let refused = ask(&mut conn, &rx, "disk-resize 0 16M");
    assert!(
        refused.starts_with("error disk 0") && refused.contains("would drop data"),
        "{refused}"
    );
    assert_eq!(info(&mut vm, 0), "OK sectors=98304 ro=0 blk_size=512");
    assert_eq!(ask(&mut conn, &rx, "disk-resize 0 44M"), "ok 46137344");
    assert_eq!(info(&mut vm, 0), "OK sectors=90112 ro=0 blk_size=512");
    vm.ok("DISK 0 VERIFY 90000 64 21");
    assert!(
        vm.console.command("DISK 0 WRITE 90100 64 1", T).is_err(),
        "a write past the new end succeeded"
    );

    // Raw grow, through the client command this time, then bad requests.
    let out = vireo()
        .args(["control", &ctl, "resize", "1", "8M"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "8388608");
    assert_eq!(info(&mut vm, 1), "OK sectors=16384 ro=0 blk_size=512");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 8 * MIB);
    vm.ok("DISK 1 WRITE 12000 64 22");
    vm.ok("DISK 1 VERIFY 12000 64 22");
    writeln!(conn, "disks").unwrap();
    let listed: Vec<String> = (0..5).map(|_| rx.recv_timeout(T).unwrap()).collect();
    let v: serde_json::Value = serde_json::from_str(&listed[1]).unwrap();
    assert_eq!(v["virtual_size"], 8 * MIB, "{listed:?}");
    assert_eq!(listed[4], "ok");
    let bad = ask(&mut conn, &rx, "disk-resize 1 lots");
    assert!(bad.starts_with("error invalid size"), "{bad}");
    let bad = ask(&mut conn, &rx, "disk-resize 1 1000");
    assert!(bad.contains("multiple of 512"), "{bad}");
    let bad = ask(&mut conn, &rx, "disk-resize 2 2M");
    assert!(bad.contains("read-only"), "{bad}");
    assert_eq!(info(&mut vm, 2), "OK sectors=2048 ro=1 blk_size=512");
    let bad = ask(&mut conn, &rx, "disk-resize 9 2M");
    assert!(bad.starts_with("error no disk '9'"), "{bad}");

    // The child holds nothing; its parent's data counts all the same.
    let refused = ask(&mut conn, &rx, "disk-resize 3 2M");
    assert!(refused.contains("would drop data"), "{refused}");

    // Live merge onto the larger parent: the disk keeps the child's size.
    assert_eq!(info(&mut vm, 3), "OK sectors=8192 ro=0 blk_size=512");
    writeln!(conn, "disk-merge 3").unwrap();
    let merged = loop {
        let line = rx.recv_timeout(T).expect("merge did not answer");
        if !line.starts_with("progress ") {
            break line;
        }
    };
    assert_eq!(merged, format!("ok {}", base.display()));
    assert_eq!(info(&mut vm, 3), "OK sectors=8192 ro=0 blk_size=512");
    vm.ok("DISK 3 WRITE 6000 64 23");
    vm.ok("DISK 3 VERIFY 6000 64 23");
    vm.ok("DISK 0 FLUSH");
    vm.ok("DISK 1 FLUSH");
    vm.ok("DISK 3 FLUSH");
    drop(conn);
    assert_eq!(vm.poweroff(0), Some(0));

    // The files hold what the guest wrote, at their new sizes.
    let d = Vhdx::open(&vhdx, &OpenOptions::read_only()).unwrap();
    assert_eq!(d.virtual_size(), 44 * MIB);
    let mut got = vec![0u8; 64 * 512];
    let mut want = vec![0u8; 64 * 512];
    d.read(&mut got, 90000 * 512).unwrap();
    pattern::fill(&mut want, 21, 90000 * 512);
    assert!(got == want, "disk.vhdx lost the guest's data");
    let b = Vhdx::open(&base, &OpenOptions::read_only()).unwrap();
    assert_eq!(b.virtual_size(), 4 * MIB);
    b.read(&mut got, 6000 * 512).unwrap();
    pattern::fill(&mut want, 23, 6000 * 512);
    assert!(got == want, "base.vhdx lost the guest's data");
    assert_eq!(
        read_at(&b, 3 * MIB, 4096),
        vec![5; 4096],
        "base.vhdx lost its own data"
    );
    let bytes = std::fs::read(&raw).unwrap();
    pattern::fill(&mut want, 22, 12000 * 512);
    assert!(
        bytes[12000 * 512..12064 * 512] == want[..],
        "disk.raw lost the guest's data"
    );
}

fn read_at(d: &Vhdx, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read(&mut b, off).unwrap();
    b
}
