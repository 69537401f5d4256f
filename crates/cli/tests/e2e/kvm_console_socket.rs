//! `vireo run --console socket=PATH[,nowait]`: vireo listens at PATH and, by default, holds the
//! guest until the first client connects (so `PROBE READY` reaches a client that connects late);
//! `nowait` starts at once; a file that is not a socket is refused untouched; the socket goes
//! away at exit.

use crate::common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vireo_probe_image::{probe_elf, ProbeConsole};
use vireo_testkit::{require, Need};
use vireo_vmm::test_images;

/// Starts `vireo run ARGS` with stdio closed (the console is the socket).
fn spawn(args: &[&str]) -> Child {
    vireo()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Starts a tiny guest that powers off with `status`, its console on `DIR/console.sock` (plus
/// `options`, e.g. ",nowait"); returns the process and the socket's path.
fn tiny_on_console_socket(dir: &Path, status: u8, options: &str) -> (Child, PathBuf) {
    let k = tiny_kernel(dir, &test_images::hello_poweroff(status));
    let sock = dir.join("console.sock");
    let console = format!("socket={}{options}", sock.display());
    let child = spawn(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--console",
        &console,
    ]);
    (child, sock)
}

fn wait_for_path(path: &Path) {
    let deadline = Instant::now() + T;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The exit code, waiting at most `T`; kills the child past that.
fn exit_code(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + T;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vireo did not exit");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn kvm_console_socket_holds_the_guest_until_a_client_connects() {
    if !require(Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("console.sock");
    let console = format!("socket={}", sock.display());
    let probe = probe_elf();
    let mut child = spawn(&[
        "run",
        "--kernel",
        probe.to_str().unwrap(),
        "--memory",
        "64M",
        "--console",
        &console,
    ]);
    wait_for_path(&sock);
    // The probe is READY within ~50 ms of starting; a client this late sees READY only if the
    // guest was held.
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "vireo exited early");
    let conn = UnixStream::connect(&sock).unwrap();
    let mut probe = ProbeConsole::new(conn.try_clone().unwrap(), conn);
    if let Err(e) = probe.wait_ready(T) {
        let _ = child.kill();
        panic!("no PROBE READY for a late client: {e}");
    }
    assert_eq!(probe.command("PING", T).unwrap(), "OK PONG");
    let _ = probe.command("POWEROFF 5", T);
    assert_eq!(exit_code(&mut child), Some(5));
    assert!(!sock.exists(), "the console socket was left behind");
}

#[test]
fn kvm_console_socket_nowait_starts_without_a_client() {
    if !require(Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut child, sock) = tiny_on_console_socket(dir.path(), 9, ",nowait");
    assert_eq!(exit_code(&mut child), Some(9));
    assert!(!sock.exists(), "the console socket was left behind");
}

#[test]
fn kvm_console_socket_ctrl_c_while_waiting_exits_130() {
    if !require(Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut child, sock) = tiny_on_console_socket(dir.path(), 0, "");
    wait_for_path(&sock);
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(exit_code(&mut child), Some(130));
    assert!(!sock.exists(), "the console socket was left behind");
}

#[test]
fn kvm_console_socket_refuses_a_file_in_the_way_and_leaves_it() {
    if !require(Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_kernel(dir.path(), &test_images::hello_poweroff(0));
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, b"precious").unwrap();
    let console = format!("socket={}", path.display());
    let out = run_with_timeout(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--console",
            &console,
        ],
        b"",
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(path.to_str().unwrap()), "{err}");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}
