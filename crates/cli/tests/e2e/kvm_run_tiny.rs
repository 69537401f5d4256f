//! `vireo run` on hand-assembled guests: exit status, console both ways, reset, vCPU failure,
//! SIGTERM.

use crate::common;

use std::time::Duration;

use common::*;
use vireo_vmm::test_images;

const T: Duration = Duration::from_secs(60);

#[test]
fn kvm_run_exits_with_the_guest_power_off_status() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_kernel(dir.path(), &test_images::hello_poweroff(42));
    let out = run_with_timeout(
        &["run", "--kernel", k.to_str().unwrap(), "--memory", "64M"],
        b"",
        T,
    );
    assert_eq!(out.status.code(), Some(42), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "OK\n");
}

#[test]
fn kvm_run_passes_stdin_to_the_guest_console() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_kernel(dir.path(), &test_images::serial_echo());
    let out = run_with_timeout(
        &["run", "--kernel", k.to_str().unwrap(), "--memory", "32M"],
        b"PING\nsecond line\nq",
        T,
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PING\nsecond line\n");
}

#[test]
fn kvm_run_console_to_file() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_kernel(dir.path(), &test_images::hello_poweroff(0));
    let log = dir.path().join("console.log");
    let console = format!("file={}", log.display());
    let out = run_with_timeout(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "32M",
            "--console",
            &console,
        ],
        b"",
        T,
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "OK\n");
}

#[test]
fn kvm_run_guest_reset_stops_the_vm() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_kernel(dir.path(), &test_images::i8042_reset());
    let out = run_with_timeout(
        &["run", "--kernel", k.to_str().unwrap(), "--memory", "32M"],
        b"",
        T,
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("reset"));
}

#[test]
fn kvm_run_vcpu_failure_is_one_clear_message() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_kernel(dir.path(), &test_images::triple_fault());
    let out = run_with_timeout(
        &["run", "--kernel", k.to_str().unwrap(), "--memory", "32M"],
        b"",
        T,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vCPU 0") && err.contains("RIP"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn kvm_run_sigterm_stops_the_vm_cleanly() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Two vCPUs spinning at CPL0 forever.
    let k = tiny_kernel(dir.path(), &[0xeb, 0xfe]);
    let child = vireo()
        .args([
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "32M",
            "--vcpus",
            "2",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(T) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("vireo ignored SIGTERM");
        }
    };
    assert_eq!(out.status.code(), Some(143), "{out:?}");
}

#[test]
fn kvm_run_console_on_a_unix_socket() {
    if !kvm_usable() {
        return;
    }
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_kernel(dir.path(), &test_images::serial_echo());
    let sock = dir.path().join("console.sock");
    let console = format!("socket={}", sock.display());
    let mut child = vireo()
        .args([
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "32M",
            "--console",
            &console,
        ])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stream = None;
    for _ in 0..500 {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
            stream = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let Some(mut stream) = stream else {
        let _ = child.kill();
        panic!("console socket never appeared");
    };
    stream.set_read_timeout(Some(T)).unwrap();
    stream.write_all(b"over the socket\n").unwrap();
    let mut got = vec![0u8; 16];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"over the socket\n");
    stream.write_all(b"q").unwrap();
    let deadline = std::time::Instant::now() + T;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("vireo did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(7));
    assert!(!sock.exists(), "console socket left behind");
}

#[test]
fn kvm_run_warns_in_one_plain_line_above_the_host_cpu_count() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let host = std::thread::available_parallelism().unwrap().get();
    let dir = tempfile::tempdir().unwrap();
    for (vcpus, warned) in [(host, false), (host + 1, true)] {
        // Every application processor checks in; the boot vCPU powers off with their count.
        let k = tiny_kernel(dir.path(), &test_images::smp_count(vcpus as u32 - 1));
        let n = vcpus.to_string();
        let out = run_with_timeout(
            &[
                "run",
                "--kernel",
                k.to_str().unwrap(),
                "--memory",
                "32M",
                "--vcpus",
                &n,
            ],
            b"",
            T,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(vcpus as i32 - 1), "{err}");
        if warned {
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.starts_with("vireo: warning: --vcpus "), "{err}");
            assert!(err.contains(&format!("{host} CPU")), "{err}");
            assert!(!err.contains('\x1b'), "colour codes on a pipe: {err:?}");
        } else {
            assert_eq!(err, "", "--vcpus {vcpus} on {host} CPUs");
        }
    }
}
