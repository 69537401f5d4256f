//! `vireo disk resize` of VHD files and `vireo disk rebase`, end to end: the real binary on real
//! files. Builds `vireo` (crates/cli) first if this test run did not.

use std::path::Path;
use std::process::Command;

use vireo_block::BlockBackend;
use vireo_vhdx::vhd::{DiskType as VhdType, Vhd, VhdCreateOptions};
use vireo_vhdx::{OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;

mod cli_common;
use cli_common::{disk, ok};

/// Fails with exit status `status` and one line of stderr containing every one of `needles`.
fn fails(dir: &Path, args: &[&str], status: i32, needles: &[&str]) {
    let out = disk(dir, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "{args:?}: {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "{args:?}: not one line: {err:?}"
    );
    for n in needles {
        assert!(err.contains(n), "{args:?}: {err:?} lacks {n:?}");
    }
}

#[test]
fn cli_vhd_shrink_refuses_only_data_past_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(d, &["create", "e.vhd", "--size", "64M"]);
    ok(d, &["resize", "e.vhd", "--size", "16M"]);
    let v = Vhd::create(
        &d.join("d.vhd"),
        &VhdCreateOptions {
            size: 64 * MIB,
            disk_type: VhdType::Dynamic,
            block_size: None,
        },
    )
    .unwrap();
    v.write_at(&[1; 4096], 39 * MIB).unwrap();
    drop(v);
    fails(
        d,
        &["resize", "d.vhd", "--size", "16M"],
        1,
        &["d.vhd", "--force"],
    );
    ok(d, &["resize", "d.vhd", "--size", "40M"]);
    ok(d, &["resize", "d.vhd", "--size", "16M", "--force"]);
    assert_eq!(Vhd::open(&d.join("d.vhd"), true).unwrap().size(), 16 * MIB);
}

fn view(p: &Path) -> Vec<u8> {
    let d = Vhdx::open(p, &OpenOptions::read_only()).unwrap();
    let mut b = vec![0u8; d.virtual_size() as usize];
    d.read(&mut b, 0).unwrap();
    b
}

#[test]
fn cli_rebase_onto_a_parent_and_to_none() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for (name, seed) in [("a.vhdx", 1u8), ("b.vhdx", 2)] {
        ok(d, &["create", name, "--size", "32M", "--block-size", "1M"]);
        let v = Vhdx::open(&d.join(name), &OpenOptions::default()).unwrap();
        v.write(&vec![seed; 3 << 20], seed as u64 * MIB).unwrap();
    }
    ok(d, &["create", "child.avhdx", "--parent", "a.vhdx"]);
    let child = d.join("child.avhdx");
    let c = Vhdx::open(&child, &OpenOptions::default()).unwrap();
    assert_eq!(
        c.block_size(),
        MIB as u32,
        "a child takes its parent's block size"
    );
    c.write(&[7; 4096], 2 * MIB + 512).unwrap();
    drop(c);
    let want = view(&child);
    ok(d, &["rebase", "child.avhdx", "--parent", "b.vhdx"]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(d, &["info", "child.avhdx", "--output", "json"])).unwrap();
    assert!(info.to_string().contains("b.vhdx"), "{info}");
    assert!(view(&child) == want, "content changed by rebase");

    // Refusals: one line naming the file, exit 2, nothing changed.
    ok(d, &["create", "c.vhdx", "--size", "40M"]);
    let bytes = std::fs::read(&child).unwrap();
    fails(
        d,
        &["rebase", "child.avhdx", "--parent", "child.avhdx"],
        2,
        &["child.avhdx", "loop"],
    );
    fails(
        d,
        &["rebase", "child.avhdx", "--parent", "c.vhdx"],
        2,
        &["c.vhdx", "virtual size"],
    );
    fails(
        d,
        &["rebase", "a.vhdx", "--no-parent"],
        2,
        &["a.vhdx", "no parent"],
    );
    assert!(std::fs::read(&child).unwrap() == bytes);
    fails(
        d,
        &["rebase", "child.avhdx", "--parent", "nothere.vhdx"],
        2,
        &["nothere.vhdx"],
    );
    let usage = disk(d, &["rebase", "child.avhdx"]);
    assert_eq!(
        usage.status.code(),
        Some(2),
        "neither --parent nor --no-parent"
    );

    ok(d, &["rebase", "child.avhdx", "--no-parent"]);
    std::fs::remove_file(d.join("b.vhdx")).unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&ok(d, &["info", "child.avhdx", "--output", "json"])).unwrap();
    assert_eq!(info["disk_type"], "dynamic", "{info}");
    assert!(view(&child) == want, "content changed by --no-parent");
    if vireo_testkit::require(vireo_testkit::Need::QemuImg) {
        std::fs::write(d.join("want.raw"), &want).unwrap();
        let q = |args: &[&str]| {
            let o = Command::new("qemu-img")
                .args(args)
                .current_dir(d)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            assert!(o.status.success(), "qemu-img {args:?}: {text}");
            text
        };
        q(&["check", "-f", "vhdx", "child.avhdx"]);
        let out = q(&[
            "compare",
            "-f",
            "vhdx",
            "-F",
            "raw",
            "child.avhdx",
            "want.raw",
        ]);
        assert!(!out.contains("mismatch"), "{out}");
    }
}
