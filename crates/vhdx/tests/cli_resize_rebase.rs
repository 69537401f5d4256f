//! `vireo disk resize` of VHD files and `vireo disk rebase`, end to end: the real binary on real
//! files. Builds `vireo` (crates/cli) first if this test run did not.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use vireo_block::BlockBackend;
use vireo_vhdx::vhd::{DiskType as VhdType, Vhd, VhdCreateOptions};

const MIB: u64 = 1 << 20;

fn vireo() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-q", "-p", "vireo-cli"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        // Same target directory as this test binary, so an up-to-date build is a no-op.
        build.env("CARGO_TARGET_DIR", profile_dir.parent().unwrap());
        assert!(build.status().unwrap().success(), "building vireo failed");
        profile_dir.join("vireo")
    })
}

fn disk(dir: &Path, args: &[&str]) -> Output {
    Command::new(vireo())
        .arg("disk")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = disk(dir, args);
    assert!(
        out.status.success(),
        "vireo disk {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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
