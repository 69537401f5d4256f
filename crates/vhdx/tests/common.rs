#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use vireo_vhdx::{CreateOptions, DiskType, FaultInjector, OpenOptions, Vhdx, VhdxError};

pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vireo-vhdx-test")
        .tempdir()
        .unwrap()
}

pub fn opts(size: u64, block_size: u32, disk_type: DiskType) -> CreateOptions {
    CreateOptions {
        size,
        disk_type,
        block_size,
        ..Default::default()
    }
}

pub fn create(dir: &Path, name: &str, o: &CreateOptions) -> (PathBuf, Vhdx) {
    let p = dir.join(name);
    let d = Vhdx::create(&p, o).unwrap();
    (p, d)
}

pub fn reopen(p: &Path) -> Vhdx {
    Vhdx::open(p, &OpenOptions::default()).unwrap()
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

pub fn read(d: &Vhdx, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read(&mut b, off).unwrap();
    b
}

/// Runs `qemu-img`; `None` when it is absent (a recorded skip of the step; fails under CI).
pub fn qemu_img(args: &[&str]) -> Option<(bool, String)> {
    if !vireo_testkit::require(vireo_testkit::Need::QemuImg) {
        return None;
    }
    match std::process::Command::new("qemu-img").args(args).output() {
        Ok(o) => Some((
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )),
        Err(e) => panic!("qemu-img {args:?}: {e}"),
    }
}

/// Runs `op` against a fresh copy of `pristine` with a crash after every possible number of
/// mutating file operations; `verify` gets the reopened disk and the last stage `op` completed.
/// Returns how many crash points were exercised.
pub fn crash_matrix(
    pristine: &Path,
    torn: bool,
    op: &dyn Fn(&Vhdx, &AtomicU8) -> Result<(), VhdxError>,
    verify: &dyn Fn(&Vhdx, u8),
) -> u64 {
    let work = pristine.with_extension("work.vhdx");
    for n in 0..5000u64 {
        std::fs::copy(pristine, &work).unwrap();
        let fault = if torn {
            FaultInjector::after_torn(n)
        } else {
            FaultInjector::after(n)
        };
        let stage = AtomicU8::new(0);
        {
            let d = Vhdx::open(
                &work,
                &OpenOptions {
                    fault: Some(fault.clone()),
                    ..Default::default()
                },
            )
            .unwrap();
            let r = op(&d, &stage);
            assert!(
                r.is_ok() || fault.fired(),
                "op failed without a crash: {r:?}"
            );
        }
        let d = Vhdx::open(&work, &OpenOptions::default())
            .unwrap_or_else(|e| panic!("crash point {n}: reopen failed: {e}"));
        verify(&d, stage.load(Ordering::SeqCst));
        drop(d);
        let report = Vhdx::check(&work, false).unwrap();
        assert!(report.is_clean(), "crash point {n}: {report:?}");
        if n % 7 == 0 {
            if let Some((ok, out)) = qemu_img(&["check", "-f", "vhdx", work.to_str().unwrap()]) {
                // QEMU cannot open differencing disks at all; only judge the others.
                assert!(
                    ok || out.contains("not supported"),
                    "crash point {n}: qemu-img check: {out}"
                );
            }
        }
        if !fault.fired() {
            return n + 1;
        }
    }
    panic!("operation never completed");
}

/// Options for a differencing disk over `parent` with `block_size` blocks.
pub fn diff_opts(parent: &Path, block_size: u32) -> CreateOptions {
    CreateOptions {
        disk_type: DiskType::Differencing,
        parent: Some(parent.to_path_buf()),
        block_size,
        ..Default::default()
    }
}
