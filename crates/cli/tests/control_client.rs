//! `vireo control SOCKET ...` against a scripted stand-in for a VM's control socket (the real
//! server and live merge under a running guest are covered by `kvm_live_merge.rs`).

mod common;

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

#[test]
fn merge_prints_the_new_path_or_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let (t, rx) = fake_server(&sock, 2, |cmd| match cmd {
        "disk-merge 0" => "progress 0 100\nprogress 100 100\nok /disks/base.vhdx\n".into(),
        _ => "error disk 3 does not exist (the VM has 1 disk)\n".into(),
    });
    let ok = common::vireo()
        .args(["control", sock.to_str().unwrap(), "merge", "0"])
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert_eq!(String::from_utf8(ok.stdout).unwrap(), "/disks/base.vhdx\n");
    let bad = common::vireo()
        .args(["control", sock.to_str().unwrap(), "merge", "3"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8(bad.stderr).unwrap();
    assert!(err.contains("disk 3 does not exist"), "{err}");
    t.join().unwrap();
    assert_eq!(
        rx.iter().collect::<Vec<_>>(),
        ["disk-merge 0", "disk-merge 3"]
    );
}

#[test]
fn a_missing_socket_is_one_clear_line() {
    let out = common::vireo()
        .args(["control", "/nonexistent/vm.sock", "disks"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/vm.sock"), "{err}");
}
