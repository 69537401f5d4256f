//! `vireo control SOCKET ...` against a scripted stand-in for a VM's control socket (the real
//! server and live merge under a running guest are covered by `kvm_live_merge.rs`).

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// Serves `conns` connections: for each, reads one command line, reports it, and writes the
/// answer `answer(command)` gives.
fn fake_server(
    path: &Path,
    conns: usize,
    answer: fn(&str) -> String,
) -> (JoinHandle<()>, mpsc::Receiver<String>) {
    let listener = UnixListener::bind(path).unwrap();
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        for _ in 0..conns {
            let (mut conn, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(conn.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            let cmd = line.trim_end().to_string();
            let _ = conn.write_all(answer(&cmd).as_bytes());
            tx.send(cmd).unwrap();
        }
    });
    (t, rx)
}

const DISKS: &str = "{\"index\":0,\"path\":\"child.avhdx\",\"format\":\"vhdx\",\"virtual_size\":1048576,\"read_only\":false,\"chain_depth\":2}\n\
{\"index\":1,\"path\":\"data.img\",\"format\":\"raw\",\"virtual_size\":4096,\"read_only\":true,\"chain_depth\":1}\nok\n";

#[test]
fn disks_as_a_table_and_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let (t, rx) = fake_server(&sock, 2, |_| DISKS.into());
    let table = common::vireo()
        .args(["control", sock.to_str().unwrap(), "disks"])
        .output()
        .unwrap();
    assert!(table.status.success());
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(
        text.lines().nth(1).unwrap().contains("child.avhdx"),
        "{text}"
    );
    assert!(text.lines().nth(2).unwrap().contains("yes"), "{text}");
    let json = common::vireo()
        .args([
            "control",
            sock.to_str().unwrap(),
            "disks",
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    assert!(json.status.success());
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v[1]["path"], "data.img");
    assert_eq!(v.as_array().unwrap().len(), 2);
    t.join().unwrap();
    assert_eq!(rx.iter().collect::<Vec<_>>(), ["disks", "disks"]);
}

/// Runs `vireo control SOCK ARGS` and returns (status, stdout, stderr).
fn control(sock: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = common::vireo()
        .arg("control")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn merge_prints_the_new_path_or_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let (t, rx) = fake_server(&sock, 5, |cmd| match cmd {
        "disks" => DISKS.into(),
        "disk-merge 0" => "progress 0 100\nprogress 100 100\nok /disks/base.vhdx\n".into(),
        _ => "error disk 1 (data.img) is a raw image; only VHDX disks can be merged\n".into(),
    });
    let (status, out, _) = control(&sock, &["merge", "0"]);
    assert_eq!(status, Some(0));
    assert_eq!(out, "/disks/base.vhdx\n");
    // The VM refuses: an operation failure.
    let (status, _, err) = control(&sock, &["merge", "1"]);
    assert_eq!(status, Some(1), "{err}");
    assert!(err.contains("is a raw image"), "{err}");
    // No such disk: bad input, and no merge is asked for.
    let (status, _, err) = control(&sock, &["merge", "3"]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("no disk 3 (2 disk(s)"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    t.join().unwrap();
    assert_eq!(
        rx.iter().collect::<Vec<_>>(),
        ["disks", "disk-merge 0", "disks", "disk-merge 1", "disks"]
    );
}

#[test]
fn resize_statuses_bad_input_2_refusal_1() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let (t, rx) = fake_server(&sock, 5, |cmd| match cmd {
        "disks" => DISKS.into(),
        "disk-resize 0 2097152" => "ok 2097152\n".into(),
        _ => "error disk 0 (child.avhdx): shrinking to 4096 would drop data at virtual offset 0; \
              choose a size above it\n"
            .into(),
    });
    let (status, out, _) = control(&sock, &["resize", "0", "2M"]);
    assert_eq!((status, out.as_str()), (Some(0), "2097152\n"));
    let (status, _, err) = control(&sock, &["resize", "0", "4096"]);
    assert_eq!(status, Some(1), "{err}");
    assert!(err.contains("would drop data"), "{err}");
    // Checked before the VM is asked anything: a size that is not whole sectors...
    let (status, _, err) = control(&sock, &["resize", "0", "1000"]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("multiple of 512"), "{err}");
    // ...and a disk the VM does not have (asked with `disks`, no resize sent).
    let (status, _, err) = control(&sock, &["resize", "7", "2M"]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("no disk 7"), "{err}");
    // A size clap cannot parse.
    let (status, _, _) = control(&sock, &["resize", "0", "lots"]);
    assert_eq!(status, Some(2));
    t.join().unwrap();
    assert_eq!(
        rx.iter().collect::<Vec<_>>(),
        [
            "disks",
            "disk-resize 0 2097152",
            "disks",
            "disk-resize 0 4096",
            "disks"
        ]
    );
}

#[test]
fn ctrl_c_during_a_merge_cancels_it_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let (started_tx, started) = mpsc::channel();
    let server = std::thread::spawn(move || {
        let read_cmd = |conn: &std::os::unix::net::UnixStream| {
            let mut line = String::new();
            BufReader::new(conn.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            line.trim_end().to_string()
        };
        let (mut c, _) = listener.accept().unwrap();
        assert_eq!(read_cmd(&c), "disks");
        c.write_all(DISKS.as_bytes()).unwrap();
        let (mut merging, _) = listener.accept().unwrap();
        assert_eq!(read_cmd(&merging), "disk-merge 0");
        merging.write_all(b"progress 0 100\n").unwrap();
        started_tx.send(()).unwrap();
        let (mut c, _) = listener.accept().unwrap();
        let cancel = read_cmd(&c);
        c.write_all(b"ok\n").unwrap();
        merging
            .write_all(b"error disk 0 (child.avhdx): merge cancelled\n")
            .unwrap();
        cancel
    });
    let child = common::vireo()
        .arg("control")
        .arg(&sock)
        .args(["merge", "0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    started
        .recv_timeout(std::time::Duration::from_secs(60))
        .unwrap();
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("merge cancelled"), "{err}");
    assert_eq!(server.join().unwrap(), "disk-merge-cancel 0");
}

#[test]
fn socket_problems_bad_path_2_vm_gone_1() {
    let out = common::vireo()
        .args(["control", "/nonexistent/vm.sock", "disks"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/vm.sock does not exist"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, b"x").unwrap();
    let (status, _, err) = control(&file, &["disks"]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("is not a socket"), "{err}");

    // A socket left by a VM that is gone: nobody listens, connection refused.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let (status, _, err) = control(&stale, &["disks"]);
    assert_eq!(status, Some(1), "{err}");
    assert!(err.contains(stale.to_str().unwrap()), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
