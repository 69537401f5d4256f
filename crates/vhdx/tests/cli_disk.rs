//! `vireo disk` end to end: the real binary on real files, checked by qemu-img where it can.
//! Builds `vireo` (crates/cli) first if this test run did not.

use std::path::Path;
use std::process::Command;

mod cli_common;
use cli_common::{disk, ok, vireo};

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
        "create", "info", "check", "convert", "compare", "map", "resize", "merge", "compact",
    ] {
        assert!(out.contains(cmd), "{out}");
    }
    let out = ok(tmp.path(), &["create", "--help"]);
    assert!(out.contains("--parent") && out.contains("--block-size") && out.contains("64G"));
    // Long-running commands say what their exit statuses mean.
    for cmd in ["convert", "compare", "merge", "compact"] {
        let out = ok(tmp.path(), &[cmd, "--help"]);
        assert!(
            out.contains("Exit status") && out.contains("130 Ctrl-C"),
            "{cmd}: {out}"
        );
    }
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
        assert_eq!(out.status.code(), Some(130), "Ctrl-C exits 130: {err}");
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

/// A file of `mib` MiB of non-zero data: long enough to convert that a signal lands mid-way.
fn busy_source(path: &Path, mib: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    for _ in 0..mib {
        f.write_all(&chunk).unwrap();
    }
}

/// Waits (at most 20 s) until `convert` has started writing: its destination or its temporary
/// file exists.
fn wait_until_writing(dir: &Path, name: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let started = std::fs::read_dir(dir)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().contains(name));
        if started {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("convert never started writing {name}");
}

/// Item 3 of issue 9: a second Ctrl-C exits at once, and a SIGKILL gives no chance to clean
/// up; neither may leave anything at the destination's name (an empty image there passed
/// `check`). A temporary file may survive a SIGKILL, but only under its temporary name.
#[test]
fn cli_convert_interrupted_twice_or_killed_leaves_nothing_at_the_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    busy_source(&d.join("big.img"), 256);
    let cases: [(&str, &[i32]); 3] = [
        ("twice.vhdx", &[libc::SIGINT, libc::SIGINT]),
        ("twice.vhd", &[libc::SIGINT, libc::SIGINT]),
        ("killed.vhdx", &[libc::SIGKILL]),
    ];
    for (dst, signals) in cases {
        let child = Command::new(vireo())
            .args(["disk", "convert", "big.img", dst])
            .current_dir(d)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_until_writing(d, dst);
        std::thread::sleep(std::time::Duration::from_millis(50));
        for &sig in signals {
            // SAFETY: kill(2) on the pid of a child we spawned and have not yet reaped.
            unsafe { libc::kill(child.id() as i32, sig) };
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{dst}: finished before the signals");
        assert!(
            !d.join(dst).exists(),
            "{dst}: left at the destination: {err}"
        );
        if signals[0] == libc::SIGINT {
            assert_eq!(out.status.code(), Some(130), "{dst}: {err}");
            let leftovers: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n.to_string_lossy().contains(dst))
                .collect();
            assert!(leftovers.is_empty(), "{dst}: {leftovers:?}");
        }
    }
}

/// The exit status of `vireo disk ARGS` in `dir`, and its stderr.
fn status(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = disk(dir, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), err)
}

/// Item 9 of issue 9: every error names its file and says what to do; bad input exits 2.
#[test]
fn cli_errors_name_the_file_and_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(d, &["create", "old.vhd", "--size", "64M"]);
    std::fs::File::create(d.join("r.img"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let cases: [(&[&str], &str); 9] = [
        (
            &["create", "c.avhdx", "--parent", "missing.vhdx"],
            "missing.vhdx does not exist",
        ),
        (
            &["create", "no/such/dir/c.vhdx", "--size", "1G"],
            "directory no/such/dir does not exist; create it first",
        ),
        (&["info", "/tmp"], "/tmp is a directory, not a disk image"),
        (&["check", "/tmp"], "/tmp is a directory"),
        (&["info", "nope.vhdx"], "nope.vhdx does not exist"),
        (
            &["create", "c.avhdx", "--parent", "old.vhd"],
            "VHD parents are not supported; convert it first",
        ),
        (
            &["create", "c.avhdx", "--parent", "r.img"],
            "RAW parents are not supported",
        ),
        (
            &["convert", "gone.img", "x.vhdx"],
            "gone.img does not exist",
        ),
        (
            &["convert", "r.img", "no/dir/x.vhdx"],
            "directory no/dir does not exist",
        ),
    ];
    for (args, needle) in cases {
        let (code, err) = status(d, args);
        assert_eq!(code, 2, "{args:?}: {err}");
        fails(d, args, needle);
        assert!(!err.contains("os error"), "{args:?}: raw OS error: {err}");
    }
    assert!(!d.join("c.avhdx").exists());
}

/// Item 8 of issue 9: when only the parent is held by another process, `info` on the child
/// says the parent is in use, not the child.
#[test]
fn cli_info_names_the_locked_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(d, &["create", "base.vhdx", "--size", "64M"]);
    ok(d, &["create", "child.avhdx", "--parent", "base.vhdx"]);
    // This test process plays a VM running on the base disk directly.
    let vm = vireo_vhdx::Vhdx::open(&d.join("base.vhdx"), &Default::default()).unwrap();
    let out = disk(d, &["info", "child.avhdx", "--output", "json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let note = err.lines().find(|l| l.contains("in use")).unwrap_or("");
    assert!(
        note.contains("base.vhdx"),
        "does not name the parent: {err:?}"
    );
    assert!(
        !note.starts_with("note: child.avhdx is in use"),
        "blames the child: {err:?}"
    );
    drop(vm);
    let out = disk(d, &["info", "child.avhdx"]);
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
}

/// Item 10 of issue 9: `create --format raw` (offered by help) works, sparse or fixed, and
/// `convert --sector 4096` to VHD is refused instead of silently ignored.
#[test]
fn cli_create_raw_and_refuse_vhd_4k_sectors() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(d, &["create", "sparse.img", "--size", "1.5G"]);
    let m = std::fs::metadata(d.join("sparse.img")).unwrap();
    assert_eq!(m.len(), 3 << 29);
    assert!(m.blocks() * 512 < 1 << 20, "not sparse: {}", m.blocks());
    ok(
        d,
        &[
            "create", "full", "--format", "raw", "--size", "8M", "--type", "fixed",
        ],
    );
    let m = std::fs::metadata(d.join("full")).unwrap();
    assert_eq!(m.len(), 8 << 20);
    assert!(m.blocks() * 512 >= 8 << 20, "not allocated: {}", m.blocks());
    let info = json(d, &["info", "full", "--output", "json"]);
    assert_eq!(info["format"], "raw");
    assert_eq!(info["virtual_size"], 8 << 20);
    if vireo_testkit::require(vireo_testkit::Need::QemuImg) {
        let q = qemu(d, &["info", "--output=json", "sparse.img"]).unwrap();
        let q: serde_json::Value = serde_json::from_str(&q).unwrap();
        assert_eq!(q["format"], "raw");
        assert_eq!(q["virtual-size"], 3u64 << 29);
    }
    fails(
        d,
        &["create", "x.img", "--size", "8M", "--block-size", "2M"],
        "raw",
    );

    let (code, err) = status(d, &["convert", "full", "x.vhd", "--sector", "4096"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("512-byte sectors only"), "{err}");
    assert!(!d.join("x.vhd").exists());
    let (code, err) = status(d, &["convert", "full", "x.img", "--sector", "4096"]);
    assert_eq!(code, 2, "{err}");
    ok(d, &["convert", "full", "x.vhd", "--sector", "512"]);
}

/// Item 6 of issue 9 for `vireo disk`: one exit-status table for every subcommand — 0 done,
/// 1 the operation failed or check found problems, 2 bad input (nothing changed).
#[test]
fn cli_exit_statuses_follow_one_table() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let expect = |code: i32, args: &[&str]| {
        let (got, err) = status(d, args);
        assert_eq!(got, code, "vireo disk {args:?}: {err}");
    };
    // 0
    expect(0, &["create", "a.vhdx", "--size", "64M"]);
    expect(0, &["create", "f.vhdx", "--size", "8M", "--type", "fixed"]);
    expect(0, &["resize", "a.vhdx", "--size", "128M"]);
    expect(0, &["create", "c.avhdx", "--parent", "a.vhdx"]);
    expect(0, &["info", "a.vhdx"]);
    expect(0, &["check", "a.vhdx"]);
    expect(0, &["convert", "a.vhdx", "a.img"]);
    expect(0, &["compact", "c.avhdx"]);
    // 2: bad input, nothing changed
    expect(2, &["create", "a.vhdx", "--size", "64M"]);
    expect(2, &["create", "x.vhdx", "--size", "64Q"]);
    expect(
        2,
        &["create", "x.vhdx", "--size", "1G", "--block-size", "3M"],
    );
    expect(2, &["info", "missing.vhdx"]);
    expect(2, &["check", "a.img"]);
    expect(2, &["convert", "missing.img", "y.vhdx"]);
    expect(2, &["convert", "a.img", "a.vhdx"]);
    expect(2, &["resize", "a.img", "--size", "1G"]);
    expect(2, &["resize", "a.vhdx", "--size", "0"]);
    expect(2, &["merge", "a.vhdx"]);
    expect(2, &["compact", "f.vhdx"]);
    expect(2, &["compact", "a.img"]);
    assert!(!d.join("x.vhdx").exists() && !d.join("y.vhdx").exists());
    // 1: the operation was attempted and failed, or check found problems
    let vm = vireo_vhdx::Vhdx::open(&d.join("c.avhdx"), &Default::default()).unwrap();
    expect(1, &["resize", "c.avhdx", "--size", "256M"]);
    expect(1, &["compact", "c.avhdx"]);
    expect(1, &["merge", "c.avhdx"]);
    expect(1, &["check", "c.avhdx"]);
    drop(vm);
    std::fs::write(d.join("broken.vhdx"), b"vhdxfile but nothing else").unwrap();
    expect(1, &["info", "broken.vhdx"]);
    expect(1, &["convert", "broken.vhdx", "z.vhdx"]);
    assert!(!d.join("z.vhdx").exists());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("a.vhdx"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"XXXX", 64 * 1024 + 100).unwrap();
    drop(f);
    expect(1, &["check", "a.vhdx"]);
}

/// A single Ctrl-C stops a merge at a safe point and exits 130 (it exited 2), and running the
/// merge again finishes it.
#[test]
fn cli_ctrl_c_during_merge_exits_130_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(d, &["create", "base.vhdx", "--size", "2G"]);
    ok(
        d,
        &[
            "create",
            "snap.avhdx",
            "--parent",
            "base.vhdx",
            "--block-size",
            "1M",
        ],
    );
    let child = vireo_vhdx::Vhdx::open(&d.join("snap.avhdx"), &Default::default()).unwrap();
    let chunk: Vec<u8> = (0..4 << 20).map(|i| (i % 253) as u8 + 1).collect();
    // 1 GiB: enough that the merge is still copying when the signal comes 150 ms in, even with
    // everything in the page cache (256 MiB could finish first and exit 0).
    for i in 0..256u64 {
        vireo_block::BlockBackend::write_at(&child, &chunk, i * (4 << 20)).unwrap();
    }
    vireo_block::BlockBackend::flush(&child).unwrap();
    drop(child);
    let merge = Command::new(vireo())
        .args(["disk", "merge", "snap.avhdx"])
        .current_dir(d)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    // SAFETY: kill(2) on the pid of a child we spawned and have not yet reaped.
    unsafe { libc::kill(merge.id() as i32, libc::SIGINT) };
    let out = merge.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("`vireo disk merge snap.avhdx` again"), "{err}");
    ok(d, &["merge", "snap.avhdx"]);
    assert!(!d.join("snap.avhdx").exists());
    ok(d, &["check", "base.vhdx"]);
}

/// Item 11 of issue 9: `info` leads with what qemu-img users look for (format, virtual size,
/// file size, block size, parent) in text and JSON alike; `check` prints one problem per line.
#[test]
fn cli_info_order_and_check_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(
        d,
        &["create", "base.vhdx", "--size", "40M", "--block-size", "8M"],
    );
    ok(d, &["create", "child.avhdx", "--parent", "base.vhdx"]);
    ok(d, &["create", "old.vhd", "--size", "40M"]);
    std::fs::File::create(d.join("r.img"))
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    let first = [
        "format",
        "virtual_size",
        "file_size",
        "block_size",
        "parent",
    ];
    for (file, expect) in [
        ("child.avhdx", &first[..]),
        ("base.vhdx", &first[..]),
        ("old.vhd", &first[..]),
        ("r.img", &first[..3]),
    ] {
        let text = ok(d, &["info", file]);
        let keys: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with(' '))
            .filter_map(|l| l.split(':').next())
            .collect();
        assert_eq!(&keys[..expect.len()], expect, "{file}: {text}");
        // JSON in the same order (read from the text, not a map that sorts its keys).
        let js = ok(d, &["info", file, "--output", "json"]);
        let at = |k: &str| js.find(&format!("\n  \"{k}\":")).unwrap_or(usize::MAX);
        let positions: Vec<usize> = expect.iter().map(|k| at(k)).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{file}: {js}");
        assert!(positions[expect.len() - 1] < at("path"), "{file}: {js}");
    }

    // Two damaged header copies' worth of problems: one line each, naming the file.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("base.vhdx"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"XXXX", 64 * 1024 + 100).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"XXXX", 192 * 1024 + 100).unwrap();
    drop(f);
    let out = disk(d, &["check", "base.vhdx"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 2, "{text}");
    for l in &lines[..lines.len() - 1] {
        assert!(
            l.starts_with("base.vhdx: error: "),
            "not one problem per line: {text}"
        );
    }
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("base.vhdx: PROBLEMS FOUND"),
        "{text}"
    );
}

/// Writes `data` at `offset` into the VHDX at `path` (this process plays the guest).
fn write_vhdx(path: &Path, offset: u64, data: &[u8]) {
    let disk = vireo_vhdx::Vhdx::open(path, &Default::default()).unwrap();
    vireo_block::BlockBackend::write_at(&disk, data, offset).unwrap();
    vireo_block::BlockBackend::flush(&disk).unwrap();
}

/// qemu-img's exit status and output, for comparing our answer with its.
fn qemu_status(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// Item 12 of issue 9: `vireo disk compare` answers as `qemu-img compare` does (0 identical,
/// 1 different with the first differing offset, 2 error) across formats, sizes and chains.
#[test]
fn cli_compare_agrees_with_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let f = std::fs::File::create(d.join("src.img")).unwrap();
    f.set_len(48 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 3 << 20], 5 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"tail", (47 << 20) + 3).unwrap();
    drop(f);
    ok(d, &["convert", "src.img", "a.vhdx", "--block-size", "1M"]);
    ok(d, &["convert", "src.img", "b.vhd"]);
    ok(d, &["convert", "a.vhdx", "c.img"]);
    // One byte off, in the middle of the data.
    let changed = (6 << 20) + 12345u64;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("c.img"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5b], changed).unwrap();
    drop(f);
    // Longer, with a zero tail; and longer with data in the tail.
    std::fs::copy(d.join("src.img"), d.join("long0.img")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(d.join("long0.img"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    std::fs::copy(d.join("long0.img"), d.join("long1.img")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("long1.img"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"x", 60 << 20).unwrap();
    drop(f);

    let qfmt = |name: &str| match name.rsplit('.').next() {
        Some("vhdx") => "vhdx",
        Some("vhd") => "vpc",
        _ => "raw",
    };
    let cases: [(&str, &str, bool, i32); 9] = [
        ("a.vhdx", "src.img", false, 0),
        ("b.vhd", "a.vhdx", false, 0),
        ("src.img", "b.vhd", false, 0),
        ("a.vhdx", "c.img", false, 1),
        ("c.img", "b.vhd", false, 1),
        ("src.img", "long0.img", false, 0),
        ("a.vhdx", "long0.img", true, 1),
        ("long1.img", "b.vhd", false, 1),
        ("src.img", "missing.img", false, 2),
    ];
    let qemu_ok = vireo_testkit::require(vireo_testkit::Need::QemuImg);
    for (x, y, strict, want) in cases {
        let mut args = vec!["compare", x, y];
        if strict {
            args.push("--strict");
        }
        let out = disk(d, &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let code = out.status.code().unwrap_or(-1);
        assert_eq!(
            code,
            want,
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ours = text
            .split("first difference at offset ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok());
        if (x, y) == ("a.vhdx", "c.img") {
            assert_eq!(ours, Some(changed), "{text}");
        }
        if !qemu_ok || want == 2 {
            continue;
        }
        let mut q = vec!["compare", "-f", qfmt(x), "-F", qfmt(y)];
        if strict {
            q.push("-s");
        }
        q.extend([x, y]);
        let (qcode, qtext) = qemu_status(d, &q);
        assert_eq!(code, qcode, "{args:?}: qemu-img says {qtext}");
        // qemu-img reports the differing sector's start.
        if let Some(at) = ours.filter(|_| !strict) {
            assert!(
                qtext.contains(&format!("offset {}!", at / 512 * 512)),
                "{args:?}: ours {at}, qemu-img {qtext}"
            );
        }
    }

    // A differencing chain reads like its flattened copy.
    ok(
        d,
        &[
            "create",
            "snap.avhdx",
            "--parent",
            "a.vhdx",
            "--block-size",
            "1M",
        ],
    );
    write_vhdx(&d.join("snap.avhdx"), 20 << 20, &[7; 4096]);
    ok(d, &["convert", "snap.avhdx", "flat.img"]);
    ok(d, &["compare", "snap.avhdx", "flat.img"]);
    let (code, _) = status(d, &["compare", "snap.avhdx", "a.vhdx"]);
    assert_eq!(code, 1);
}

/// One run of `vireo disk map --output json`: start, length, data, depth, file name.
type Run = (u64, u64, bool, Option<u64>, Option<String>);

/// Item 12 of issue 9: `vireo disk map` lists allocated runs, merged, naming the file of a
/// VHDX chain that holds each; on raw files it agrees with `qemu-img map`.
#[test]
fn cli_map_names_the_file_holding_each_run() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let m = 1u64 << 20;
    ok(
        d,
        &["create", "base.vhdx", "--size", "32M", "--block-size", "1M"],
    );
    write_vhdx(&d.join("base.vhdx"), 3 * m, &vec![1; 2 * m as usize]);
    ok(
        d,
        &[
            "create",
            "snap.avhdx",
            "--parent",
            "base.vhdx",
            "--block-size",
            "1M",
        ],
    );
    write_vhdx(&d.join("snap.avhdx"), 4 * m, &vec![2; m as usize]);
    write_vhdx(&d.join("snap.avhdx"), 20 * m, &vec![3; 2 * m as usize]);
    // 8 KiB inside the parent's data: the rest of that block still reads from the parent.
    let k = 1024;
    write_vhdx(&d.join("snap.avhdx"), 3 * m + 64 * k, &[4; 8192]);
    let runs = json(d, &["map", "snap.avhdx", "--output", "json"]);
    let got: Vec<Run> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["start"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
                r["data"].as_bool().unwrap(),
                r["depth"].as_u64(),
                r["file"].as_str().map(|f| {
                    Path::new(f)
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                }),
            )
        })
        .collect();
    let base = || Some("base.vhdx".to_string());
    let snap = || Some("snap.avhdx".to_string());
    assert_eq!(
        got,
        [
            (0, 3 * m, false, None, None),
            (3 * m, 64 * k, true, Some(1), base()),
            (3 * m + 64 * k, 8 * k, true, Some(0), snap()),
            (3 * m + 72 * k, m - 72 * k, true, Some(1), base()),
            (4 * m, m, true, Some(0), snap()),
            (5 * m, 15 * m, false, None, None),
            (20 * m, 2 * m, true, Some(0), snap()),
            (22 * m, 10 * m, false, None, None),
        ]
    );
    let text = ok(d, &["map", "snap.avhdx"]);
    assert_eq!(text.lines().count(), 6, "header + 5 data runs: {text}");
    assert!(text.lines().nth(1).unwrap().contains("base.vhdx"), "{text}");

    // Raw: the same runs qemu-img finds.
    ok(d, &["convert", "snap.avhdx", "flat.img"]);
    let ours: Vec<(u64, u64)> = json(d, &["map", "flat.img", "--output", "json"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["data"] == true)
        .map(|r| (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(ours, [(3 * m, 2 * m), (20 * m, 2 * m)]);
    if vireo_testkit::require(vireo_testkit::Need::QemuImg) {
        let q = qemu(d, &["map", "--output=json", "-f", "raw", "flat.img"]).unwrap();
        let q: serde_json::Value = serde_json::from_str(&q).unwrap();
        let mut theirs: Vec<(u64, u64)> = vec![];
        for r in q.as_array().unwrap().iter().filter(|r| r["data"] == true) {
            let (s, l) = (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap());
            match theirs.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += l,
                _ => theirs.push((s, l)),
            }
        }
        assert_eq!(ours, theirs);
    }
}
