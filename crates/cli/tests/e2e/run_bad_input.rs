//! `vireo run` refuses bad input with one line naming the problem and a non-zero exit, never a
//! panic.

use crate::common;

use std::time::Duration;

use common::*;
use vireo_vmm::test_images;

/// Runs and checks: exit 2 (bad input), exactly one stderr line containing `needle`, no panic.
fn refuses(args: &[&str], needle: &str) {
    let out = run_with_timeout(args, b"", Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: expected {needle:?} in {err:?}"
    );
    // One line naming the problem (clap adds its usual "For more information, try '--help'.").
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("For more information"))
        .collect();
    assert_eq!(lines.len(), 1, "{args:?}: {err:?}");
}

#[test]
fn argument_errors_need_no_kvm() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_kernel(dir.path(), &test_images::hello_poweroff(0));
    let k = k.to_str().unwrap();
    refuses(
        &["run", "--kernel", k, "--memory", "lots"],
        "invalid size \"lots\"",
    );
    refuses(
        &["run", "--kernel", k, "--memory", "100000001"],
        "not a whole number of 4 KiB pages",
    );
    refuses(
        &[
            "run",
            "--kernel",
            k,
            "--net",
            "tap=vt0,mac=01:02:03:04:05:06",
        ],
        "multicast",
    );
    refuses(
        &["run", "--kernel", k, "--net", "tap=vt0,mac=52:54:00"],
        "not a MAC",
    );
    refuses(
        &["run", "--kernel", k, "--disk", "x.img,fast"],
        "unknown disk option",
    );
    refuses(
        &["run", "--kernel", k, "--console", "tcp=1"],
        "not a console",
    );
    refuses(
        &["run", "--kernel", k, "--disk", "/nonexistent/disk.img"],
        "disk /nonexistent/disk.img",
    );
    refuses(&["run", "--kernel", k, "--vcpus", "0"], "vcpus");
    refuses(&["run", "--kernel", k, "--memory", "0"], "memory");
}

/// Runs and checks: exit `status`, one stderr line containing every needle.
fn refuses_with(args: &[&str], status: i32, needles: &[&str]) {
    let out = run_with_timeout(args, b"", Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected {n:?} in {err:?}");
    }
}

#[test]
fn disks_of_unsupported_formats_are_refused_untouched() {
    // The disks are opened before KVM is, so this needs no /dev/kvm.
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_kernel(dir.path(), &test_images::hello_poweroff(0));
    let k = k.to_str().unwrap();
    for (name, magic, format) in [
        ("d.qcow2", &b"QFI\xfb\0\0\0\x03"[..], "qcow2"),
        ("d.vmdk", b"KDMV\x01\0\0\0", "VMDK"),
        (
            "d.vmdk.txt",
            b"# Disk DescriptorFile\nversion=1\n",
            "VMDK descriptor",
        ),
        ("d.luks", b"LUKS\xba\xbe\0\x02", "LUKS"),
    ] {
        let path = dir.path().join(name);
        let mut bytes = magic.to_vec();
        bytes.resize(64 << 10, 0);
        std::fs::write(&path, &bytes).unwrap();
        let p = path.to_str().unwrap();
        refuses_with(
            &["run", "--kernel", k, "--disk", p],
            2,
            &[p, &format!("is a {format} image"), "convert"],
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name} was changed");
    }
    // A format= that the content contradicts.
    let raw = dir.path().join("plain.img");
    std::fs::write(&raw, vec![0u8; 64 << 10]).unwrap();
    let arg = format!("{},format=vhd", raw.display());
    refuses_with(
        &["run", "--kernel", k, "--disk", &arg],
        2,
        &[raw.to_str().unwrap(), "format=vhd but it is a raw image"],
    );
    refuses_with(
        &["run", "--kernel", k, "--disk", "/nonexistent/disk.img"],
        2,
        &["disk /nonexistent/disk.img"],
    );
}

#[test]
fn a_disk_in_use_or_corrupt_is_a_failure_not_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_kernel(dir.path(), &test_images::hello_poweroff(0));
    let k = k.to_str().unwrap();
    let disk = dir.path().join("busy.img");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let held = vireo_block::RawFile::open(&disk, false).unwrap();
    refuses_with(
        &["run", "--kernel", k, "--disk", disk.to_str().unwrap()],
        1,
        &[disk.to_str().unwrap(), "in use"],
    );
    drop(held);
    // A VHD whose footer checksum is wrong: recognised, then refused as damaged.
    let vhd = dir.path().join("bad.vhd");
    let mut bytes = vec![0u8; 64 << 10];
    let footer = bytes.len() - 512;
    bytes[footer..footer + 8].copy_from_slice(b"conectix");
    std::fs::write(&vhd, &bytes).unwrap();
    refuses_with(
        &["run", "--kernel", k, "--disk", vhd.to_str().unwrap()],
        1,
        &[vhd.to_str().unwrap(), "VHD"],
    );
}

#[test]
fn kvm_kernel_and_size_errors() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_kernel(dir.path(), &test_images::hello_poweroff(0));
    let k = k.to_str().unwrap();
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, b"definitely not a kernel").unwrap();
    refuses(
        &["run", "--kernel", "/nonexistent/kernel"],
        "cannot read kernel",
    );
    refuses(
        &["run", "--kernel", garbage.to_str().unwrap()],
        "not a bootable image",
    );
    refuses(
        &["run", "--kernel", dir.path().to_str().unwrap()],
        "not a bootable image",
    );
    refuses(
        &["run", "--kernel", k, "--memory", "100T"],
        "more than this host can back",
    );
    refuses(
        &["run", "--kernel", k, "--vcpus", "100000"],
        "--vcpus must be between 1 and",
    );
    // KVM's own limit (KVM_CAP_MAX_VCPUS), exactly: one more is refused.
    let max = vireo_vmm::max_vcpus().unwrap();
    refuses(
        &["run", "--kernel", k, "--vcpus", &(max + 1).to_string()],
        &format!("--vcpus must be between 1 and {max}"),
    );
    refuses(
        &["run", "--kernel", k, "--control", "/nonexistent/dir/c.sock"],
        "control socket /nonexistent/dir/c.sock",
    );
    refuses(
        &["run", "--kernel", k, "--control", garbage.to_str().unwrap()],
        "not a socket is in the way",
    );
}

#[test]
fn no_permission_for_dev_kvm_is_one_clear_line() {
    // Arranges its own condition, whatever the host's /dev/kvm: in a private mount namespace a
    // root-only file shadows /dev/kvm (the host's device is never touched), and vireo runs as
    // nobody from a copy every user may execute. Needs root, setpriv and unshare.
    use std::os::unix::fs::PermissionsExt;
    if !vireo_testkit::require_all(&[vireo_testkit::Need::Root, vireo_testkit::Need::Setpriv]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("vireo");
    std::fs::copy(env!("CARGO_BIN_EXE_vireo"), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let closed = dir.path().join("kvm");
    std::fs::write(&closed, b"").unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o600)).unwrap();
    let run = || {
        std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(
                // Without any /dev/kvm the missing device is the closed one.
                "{ [ ! -e /dev/kvm ] || mount --bind \"$1\" /dev/kvm; } && exec setpriv --reuid=65534 --regid=65534 \
                 --clear-groups \"$2\" run --kernel /nonexistent",
            )
            .arg("sh")
            .args([&closed, &exe])
            .output()
            .unwrap()
    };
    // Another test thread's fork may hold the just-written copy open until its own exec, and
    // exec of a file open for writing fails with ETXTBSY: try again, bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut out = run();
    while String::from_utf8_lossy(&out.stderr).contains("Text file busy")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
        out = run();
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot open /dev/kvm"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn an_unknown_guest_ram_backing_is_bad_input() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_kernel(dir.path(), &test_images::hello_poweroff(0));
    let out = vireo()
        .env("VIREO_GUEST_RAM", "hugetlbfs")
        .args(["run", "--kernel", k.to_str().unwrap(), "--memory", "16M"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("vireo: error: VIREO_GUEST_RAM=\"hugetlbfs\" is not a guest RAM backing"),
        "{err}"
    );
    assert!(
        err.contains("`memfd`") && err.contains("`hugetlb`"),
        "{err}"
    );
}

#[test]
fn hugetlb_asked_of_a_short_pool_is_one_line_naming_the_sysctl() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let pool_pages: u64 = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    // More than the whole pool holds, however many pages other VMs use right now.
    let mib = (pool_pages + 32) * 2;
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_kernel(dir.path(), &test_images::hello_poweroff(0));
    let out = vireo()
        .env("VIREO_GUEST_RAM", "hugetlb")
        .args(["run", "--kernel", k.to_str().unwrap(), "--memory"])
        .arg(format!("{mib}M"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("more than this host can back") {
        vireo_testkit::skip_env("a host with more memory than its hugetlb pool");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("vireo: error: "), "{err}");
    assert!(err.contains("/proc/sys/vm/nr_hugepages"), "{err}");
    assert!(err.contains(&format!("{mib} MiB")), "{err}");
}
