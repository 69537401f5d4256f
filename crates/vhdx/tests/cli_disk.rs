//! `vireo disk` end to end: the real binary on real files, checked by qemu-img where it can.
//! Builds `vireo` (crates/cli) first if this test run did not.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn vireo() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let bin = profile_dir.join("vireo");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-q", "-p", "vireo-cli"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        // Same target directory as this test binary, so an up-to-date build is a no-op.
        build.env("CARGO_TARGET_DIR", profile_dir.parent().unwrap());
        let status = build.status().unwrap();
        assert!(status.success(), "building vireo failed");
        bin
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

/// Fails, and the first line of stderr says what was wrong, naming `needle` (usage errors get
/// clap's extra "try --help" line after it; our own errors are exactly one line).
fn fails(dir: &Path, args: &[&str], needle: &str) {
    let out = disk(dir, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    let first = err.lines().next().unwrap_or("");
    assert!(first.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
    if first.starts_with("vireo: error:") {
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: not one line: {err:?}"
        );
    }
}

fn qemu(dir: &Path, args: &[&str]) -> Option<String> {
    if !vireo_testkit::require(vireo_testkit::Need::QemuImg) {
        return None;
    }
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json(dir: &Path, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(dir, args)).unwrap()
}

#[test]
fn cli_create_info_check() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(d, &["create", "big.vhdx", "--size", "64T"]);
    // Instant and small: a 64 TiB dynamic disk is metadata only.
    assert!(std::fs::metadata(d.join("big.vhdx")).unwrap().len() < 64 << 20);
    let info = json(d, &["info", "big.vhdx", "--output", "json"]);
    assert_eq!(info["virtual_size"], 64u64 << 40);
    assert_eq!(info["format"], "vhdx");
    assert_eq!(info["block_size"], 32 << 20);

    ok(
        d,
        &[
            "create",
            "f.vhdx",
            "--size",
            "40M",
            "--type",
            "fixed",
            "--block-size",
            "8M",
        ],
    );
    let info = json(d, &["info", "f.vhdx", "--output", "json"]);
    assert_eq!(info["disk_type"], "fixed");
    assert_eq!(info["block_size"], 8 << 20);
    // 4 KiB logical sectors (QEMU cannot open these; our checker must pass them).
    ok(
        d,
        &[
            "create",
            "g.vhdx",
            "--size",
            "40M",
            "--sector",
            "4096",
            "--physical-sector",
            "4096",
        ],
    );
    let info = json(d, &["info", "g.vhdx", "--output", "json"]);
    assert_eq!(info["logical_sector_size"], 4096);
    assert_eq!(
        json(d, &["check", "g.vhdx", "--output", "json"])["clean"],
        true
    );
    let check = json(d, &["check", "f.vhdx", "--output", "json"]);
    assert_eq!(check["clean"], true, "{check}");
    qemu(d, &["check", "-q", "-f", "vhdx", "f.vhdx"]);
    if let Some(out) = qemu(d, &["info", "--output=json", "f.vhdx"]) {
        let q: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(q["virtual-size"], 40 << 20);
    }

    ok(d, &["create", "child.avhdx", "--parent", "f.vhdx"]);
    let info = json(d, &["info", "child.avhdx", "--output", "json"]);
    assert_eq!(info["disk_type"], "differencing");
    assert_eq!(info["virtual_size"], 40 << 20);

    ok(d, &["create", "old.vhd", "--size", "100M"]);
    let info = json(d, &["info", "old.vhd", "--output", "json"]);
    assert_eq!(info["format"], "vhd");
    assert_eq!(info["disk_type"], "dynamic");

    let text = ok(d, &["info", "f.vhdx"]);
    assert!(text.contains("virtual_size: 41943040 (40 MiB)"), "{text}");

    fails(d, &["create", "x.vhdx", "--size", "64Q"], "64Q");
    fails(d, &["create", "f.vhdx", "--size", "1G"], "already exists");
    fails(
        d,
        &["create", "x.vhdx", "--size", "1G", "--sector", "1024"],
        "1024",
    );
    fails(
        d,
        &["create", "x.vhdx", "--size", "1G", "--block-size", "3M"],
        "3145728",
    );
    fails(d, &["info", "missing.vhdx"], "missing.vhdx");
    fails(d, &["check", "old.vhd"], "convert it first");

    // A corrupted header copy is a problem; --repair fixes it.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("f.vhdx"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"XXXX", 64 * 1024 + 100).unwrap();
    drop(f);
    let out = disk(d, &["check", "f.vhdx", "--output", "json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    ok(d, &["check", "f.vhdx", "--repair"]);
    let check = json(d, &["check", "f.vhdx", "--output", "json"]);
    assert_eq!(check["clean"], true, "{check}");
}

#[test]
fn cli_convert_resize_merge_compact() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // 24 MiB of data in a 96 MiB sparse raw file.
    let raw = d.join("src.img");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(96 << 20).unwrap();
    let mut x = 7u64;
    let data: Vec<u8> = (0..(24 << 20))
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    std::os::unix::fs::FileExt::write_all_at(&f, &data, 40 << 20).unwrap();
    drop(f);

    ok(d, &["convert", "src.img", "a.vhdx"]);
    ok(d, &["convert", "a.vhdx", "b.vhd"]);
    ok(d, &["convert", "b.vhd", "c.bin", "--format", "raw"]);
    assert!(std::fs::read(&raw).unwrap() == std::fs::read(d.join("c.bin")).unwrap());
    qemu(
        d,
        &[
            "compare", "-q", "-f", "vhdx", "-F", "raw", "a.vhdx", "src.img",
        ],
    );
    qemu(
        d,
        &[
            "compare", "-q", "-f", "vpc", "-F", "raw", "b.vhd", "src.img",
        ],
    );
    fails(d, &["convert", "src.img", "noext"], "--format");
    fails(d, &["convert", "src.img", "a.vhdx"], "already exists");

    // Resize: grow, refuse to shrink over data, force it.
    ok(d, &["resize", "a.vhdx", "--size", "128M"]);
    assert_eq!(
        json(d, &["info", "a.vhdx", "--output", "json"])["virtual_size"],
        128 << 20
    );
    fails(d, &["resize", "a.vhdx", "--size", "32M"], "--force");
    ok(d, &["resize", "a.vhdx", "--size", "32M", "--force"]);
    assert_eq!(
        json(d, &["info", "a.vhdx", "--output", "json"])["virtual_size"],
        32 << 20
    );
    qemu(d, &["check", "-q", "-f", "vhdx", "a.vhdx"]);

    // Merge a child into its parent.
    ok(d, &["convert", "src.img", "base.vhdx"]);
    ok(d, &["create", "snap.avhdx", "--parent", "base.vhdx"]);
    let child = vireo_vhdx::Vhdx::open(&d.join("snap.avhdx"), &Default::default()).unwrap();
    vireo_block::BlockBackend::write_at(&child, &[0xee; 1 << 20], 1 << 20).unwrap();
    vireo_block::BlockBackend::flush(&child).unwrap();
    drop(child);
    ok(d, &["merge", "snap.avhdx"]);
    let mut expect = std::fs::read(&raw).unwrap();
    expect[1 << 20..2 << 20].fill(0xee);
    ok(d, &["convert", "base.vhdx", "merged.img"]);
    assert!(std::fs::read(d.join("merged.img")).unwrap() == expect);
    qemu(d, &["check", "-q", "-f", "vhdx", "base.vhdx"]);
    fails(d, &["merge", "base.vhdx"], "base.vhdx");

    // Compact: trimmed blocks are given back.
    let disk = vireo_vhdx::Vhdx::open(&d.join("base.vhdx"), &Default::default()).unwrap();
    vireo_block::BlockBackend::discard(&disk, 32 << 20, 64 << 20).unwrap();
    vireo_block::BlockBackend::flush(&disk).unwrap();
    drop(disk);
    let before = std::fs::metadata(d.join("base.vhdx")).unwrap().len();
    ok(d, &["compact", "base.vhdx"]);
    let after = std::fs::metadata(d.join("base.vhdx")).unwrap().len();
    assert!(after < before, "compact: {before} -> {after}");
    qemu(d, &["check", "-q", "-f", "vhdx", "base.vhdx"]);
}

#[test]
fn cli_help_explains() {
    let tmp = tempfile::tempdir().unwrap();
    let out = ok(tmp.path(), &["--help"]);
    for cmd in [
        "create", "info", "check", "convert", "resize", "merge", "compact",
    ] {
        assert!(out.contains(cmd), "{out}");
    }
    let out = ok(tmp.path(), &["create", "--help"]);
    assert!(out.contains("--parent") && out.contains("--block-size") && out.contains("64G"));
}

#[test]
fn cli_ctrl_c_during_convert_leaves_no_partial_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let src = d.join("big.img");
    // 256 MiB of non-zero data: long enough to be interrupted on any machine.
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
        for _ in 0..256 {
            f.write_all(&chunk).unwrap();
        }
    }
    let child = Command::new(vireo())
        .args(["disk", "convert", "big.img", "out.vhdx"])
        .current_dir(d)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: kill(2) on the pid of a child we spawned and have not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        // Finished before the signal arrived: then the output must be complete.
        println!("convert finished before SIGINT; checking the result instead");
        qemu(
            d,
            &[
                "compare", "-q", "-f", "vhdx", "-F", "raw", "out.vhdx", "big.img",
            ],
        );
    } else {
        assert!(err.contains("cancelled"), "{err}");
        assert!(
            !d.join("out.vhdx").exists(),
            "partial destination left behind"
        );
    }
}

#[test]
fn cli_refuses_a_disk_in_use_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(d, &["create", "busy.vhdx", "--size", "64M"]);
    // This test process plays the running VM: it holds the disk read-write.
    let vm = vireo_vhdx::Vhdx::open(&d.join("busy.vhdx"), &Default::default()).unwrap();
    let locked = "is in use by another process (locked); stop that process or open it read-only";
    fails(d, &["resize", "busy.vhdx", "--size", "128M"], locked);
    fails(d, &["compact", "busy.vhdx"], locked);
    fails(d, &["check", "busy.vhdx", "--repair"], locked);
    fails(
        d,
        &["check", "busy.vhdx"],
        "is being written by another process (locked)",
    );
    // Looking is still allowed, and says it did not lock.
    let out = disk(d, &["info", "busy.vhdx", "--output", "json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["virtual_size"], 64 << 20);
    assert!(String::from_utf8_lossy(&out.stderr).contains("shown without a lock"));
    drop(vm);
    ok(d, &["resize", "busy.vhdx", "--size", "128M"]);
    let out = disk(d, &["info", "busy.vhdx"]);
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
}
