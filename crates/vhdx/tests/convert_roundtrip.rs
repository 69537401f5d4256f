//! `convert`: raw ↔ VHDX ↔ VHD round trips keep every byte, keep sparse sources sparse, agree
//! with qemu-img, and a cancelled or failed conversion leaves no destination behind.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use vireo_vhdx::convert::{convert, AnyDisk, ConvertError, ConvertOptions, Format, OutputType};
use vireo_vhdx::newfile::NewFileError;

fn qemu_available() -> bool {
    vireo_testkit::require_all(&[vireo_testkit::Need::QemuImg, vireo_testkit::Need::QemuIo])
}

fn qemu(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 96 MiB sparse raw file with data in a few places (one run unaligned, one all-zero write).
fn sparse_source(path: &Path) -> Vec<u8> {
    let size = 96u64 << 20;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut image = vec![0u8; size as usize];
    let mut x = 0x1234_5678_9abc_def1u64;
    for (off, len) in [
        (0u64, 65536u64),
        (5 << 20, 3 << 20),
        ((40 << 20) + 777, 100_000),
        ((95 << 20) + 512, 4096),
    ] {
        let range = off as usize..(off + len) as usize;
        for b in &mut image[range.clone()] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        f.write_all_at(&image[range], off).unwrap();
    }
    // Allocated but zero: must not be copied as data.
    f.write_all_at(&vec![0u8; 2 << 20], 60 << 20).unwrap();
    f.sync_all().unwrap();
    image
}

fn read_all(path: &Path) -> Vec<u8> {
    let disk = AnyDisk::open(path, true).unwrap();
    let mut v = vec![0u8; disk.backend().size() as usize];
    disk.backend().read_at(&mut v, 0).unwrap();
    v
}

fn opts(format: Format) -> ConvertOptions {
    ConvertOptions {
        format,
        ..ConvertOptions::default()
    }
}

fn run(src: &Path, dst: &Path, o: &ConvertOptions) -> vireo_vhdx::convert::ConvertReport {
    convert(src, dst, o, &|_, _| {}, &AtomicBool::new(false)).unwrap()
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn raw_vhdx_vhd_raw_round_trip_keeps_data_and_sparseness() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.img");
    let image = sparse_source(&raw);
    let vhdx = dir.path().join("a.vhdx");
    let vhd = dir.path().join("b.vhd");
    let vhdx2 = dir.path().join("c.vhdx");
    let back = dir.path().join("d.img");

    let r = run(&raw, &vhdx, &opts(Format::Vhdx));
    assert_eq!(r.source_format, Format::Raw);
    assert_eq!(r.virtual_size, image.len() as u64);
    // The 2 MiB allocated zero run was read but not written.
    assert!(r.bytes_written < 8 << 20, "{r:?}");
    assert!(read_all(&vhdx) == image);
    run(&vhdx, &vhd, &opts(Format::Vhd));
    assert!(read_all(&vhd) == image);
    run(&vhd, &vhdx2, &opts(Format::Vhdx));
    assert!(read_all(&vhdx2) == image);
    run(&vhdx2, &back, &opts(Format::Raw));
    assert!(std::fs::read(&back).unwrap() == image);

    // Sparse in, sparse out: every output holds far less than its 96 MiB virtual size.
    for p in [&vhdx, &vhd, &vhdx2, &back] {
        let used = allocated_bytes(p);
        assert!(used < 48 << 20, "{} uses {used} bytes", p.display());
    }

    if qemu_available() {
        for (p, f) in [(&vhdx, "vhdx"), (&vhd, "vpc"), (&vhdx2, "vhdx")] {
            let out = qemu(&[
                "compare",
                "-f",
                f,
                "-F",
                "raw",
                p.to_str().unwrap(),
                raw.to_str().unwrap(),
            ]);
            assert!(out.contains("identical"), "{out}");
        }
        qemu(&["check", "-q", "-f", "vhdx", vhdx.to_str().unwrap()]);
        qemu(&["check", "-q", "-f", "vhdx", vhdx2.to_str().unwrap()]);
    }
}

#[test]
fn fixed_outputs_and_4k_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.img");
    let image = sparse_source(&raw);
    for (name, format, sector) in [
        ("f.vhdx", Format::Vhdx, Some(4096)),
        ("f.vhd", Format::Vhd, None),
        ("f.img", Format::Raw, None),
    ] {
        let dst = dir.path().join(name);
        let o = ConvertOptions {
            format,
            output_type: OutputType::Fixed,
            logical_sector: sector,
            ..ConvertOptions::default()
        };
        run(&raw, &dst, &o);
        assert!(read_all(&dst) == image, "{name}");
        assert_eq!(Format::detect(&dst).unwrap(), format, "{name}");
        if format == Format::Vhdx {
            assert_eq!(
                AnyDisk::open(&dst, true)
                    .unwrap()
                    .backend()
                    .logical_sector_size(),
                4096
            );
        }
    }
}

#[test]
fn qemu_images_convert_like_qemu_converts_them() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (fmt, opts) in [
        ("vhdx", "subformat=dynamic,block_size=1M"),
        ("vhdx", "subformat=dynamic,block_size=8M,log_size=2M"),
        ("vhdx", "subformat=fixed"),
        ("vpc", "subformat=dynamic"),
        ("vpc", "subformat=fixed"),
    ] {
        let src = dir.path().join(format!("q.{fmt}"));
        let _ = std::fs::remove_file(&src);
        qemu(&[
            "create",
            "-q",
            "-f",
            fmt,
            "-o",
            opts,
            src.to_str().unwrap(),
            "20M",
        ]);
        for (i, off) in [0u64, 1 << 20, 9 << 20, (19 << 20) + 4096]
            .iter()
            .enumerate()
        {
            let out = Command::new("qemu-io")
                .args([
                    "-f",
                    fmt,
                    "-c",
                    &format!("write -P {} {off} 65536", 0x21 + i),
                ])
                .arg(&src)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let ours = dir
            .path()
            .join(format!("ours-{fmt}-{i}.img", i = opts.len()));
        let theirs = dir
            .path()
            .join(format!("theirs-{fmt}-{i}.img", i = opts.len()));
        run(&src, &ours, &opts_raw());
        qemu(&[
            "convert",
            "-f",
            fmt,
            "-O",
            "raw",
            src.to_str().unwrap(),
            theirs.to_str().unwrap(),
        ]);
        let (a, b) = (
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
        );
        let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
        assert!(
            a.len() == b.len() && first_diff.is_none(),
            "{fmt} {opts}: sizes {} vs {}, first difference at {first_diff:?}, ranges {:?}",
            a.len(),
            b.len(),
            AnyDisk::open(&src, true)
                .unwrap()
                .allocated_ranges()
                .unwrap()
        );
    }
}

fn opts_raw() -> ConvertOptions {
    opts(Format::Raw)
}

#[test]
fn cancelled_or_refused_conversions_leave_no_destination() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.img");
    sparse_source(&raw);
    let dst = dir.path().join("out.vhdx");

    // Cancelled from the first progress report.
    let cancel = AtomicBool::new(false);
    let err = convert(
        &raw,
        &dst,
        &opts(Format::Vhdx),
        &|_, _| cancel.store(true, Ordering::SeqCst),
        &cancel,
    )
    .unwrap_err();
    assert!(matches!(err, ConvertError::Cancelled), "{err}");
    assert!(!dst.exists(), "partial destination left behind");
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(dir.path()), ["src.img"], "temporary file left behind");

    // An existing destination is never touched.
    std::fs::write(&dst, b"precious").unwrap();
    let err = convert(
        &raw,
        &dst,
        &opts(Format::Vhd),
        &|_, _| {},
        &AtomicBool::new(false),
    )
    .unwrap_err();
    assert!(
        matches!(err, ConvertError::NewFile(NewFileError::Exists(_))),
        "{err}"
    );
    assert_eq!(std::fs::read(&dst).unwrap(), b"precious");

    // Missing source: a clear error naming it.
    let err = convert(
        &dir.path().join("nope.img"),
        &dir.path().join("x.vhdx"),
        &opts(Format::Vhdx),
        &|_, _| {},
        &AtomicBool::new(false),
    )
    .unwrap_err();
    assert!(err.to_string().contains("nope.img"), "{err}");
}

/// Until the last byte is flushed, the destination's name does not exist: a copy stopped at
/// any point (a second Ctrl-C, a kill, a power cut) cannot leave a complete-looking image.
#[test]
fn the_destination_appears_only_when_complete() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.img");
    sparse_source(&raw);
    for format in [Format::Vhdx, Format::Vhd, Format::Raw] {
        let dst = dir.path().join(format!("out.{}", format.name()));
        let seen_early = AtomicBool::new(false);
        run_with_progress(&raw, &dst, &opts(format), &|_, _| {
            seen_early.fetch_or(dst.exists(), Ordering::SeqCst);
        });
        assert!(
            !seen_early.load(Ordering::SeqCst),
            "{format:?}: visible mid-copy"
        );
        assert!(dst.exists(), "{format:?}: not put in place");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                n.contains("vireo-tmp").then_some(n)
            })
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

fn run_with_progress(src: &Path, dst: &Path, o: &ConvertOptions, progress: &dyn Fn(u64, u64)) {
    convert(src, dst, o, progress, &AtomicBool::new(false)).unwrap();
}

#[test]
fn format_detection_by_content_and_extension() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.bin");
    sparse_source(&raw);
    let vhd = dir.path().join("disguised.img");
    run(&raw, &vhd, &opts(Format::Vhd));
    assert_eq!(Format::detect(&vhd).unwrap(), Format::Vhd);
    assert_eq!(Format::detect(&raw).unwrap(), Format::Raw);
    assert_eq!(
        Format::from_extension(Path::new("a.AVHDX")),
        Some(Format::Vhdx)
    );
    assert_eq!(
        Format::from_extension(Path::new("a.vhd")),
        Some(Format::Vhd)
    );
    assert_eq!(Format::from_extension(Path::new("a.qcow2")), None);
}
