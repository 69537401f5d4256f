//! `vireo-vm` with the probe guest under KVM, driven as vireod drives it: the JSON-lines
//! protocol on `worker.sock`, the console on `console.sock`, the outcome in `exit.json`.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use vireo_api::worker::{WorkerExitReason, WorkerOp, WorkerReply, WORKER_PROTOCOL_VERSION};
use vireo_api::{DiskFormat, DiskSpec, NicSpec};

#[test]
fn hello_status_console_and_shutdown_power_off() {
    if !kvm() {
        return;
    }
    let mut w = Worker::start(probe_spec());
    let hello = w.ask(WorkerOp::Hello);
    assert_eq!(
        hello,
        WorkerReply::Hello {
            version: WORKER_PROTOCOL_VERSION,
            vm_id: w.vm_id,
            pid: w.child.id(),
        }
    );
    let WorkerReply::Status(status) = w.ask(WorkerOp::Status) else {
        panic!("Status answered otherwise");
    };
    assert!(status.running, "{status:?}");
    assert!(status.started_at.is_some_and(|t| t > 0), "{status:?}");
    assert_eq!(status.console_socket, w.path("console.sock"));
    w.wait_console("PROBE READY");
    for sock in ["worker.sock", "console.sock", "control.sock"] {
        let mode = std::fs::metadata(w.path(sock))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{sock}");
    }
    // The console answers; its output also lands in the ring.
    let mut console = w.probe_console();
    let info = console.command("INFO", T).unwrap();
    assert!(info.starts_with("OK mem_mib=64 disks=0"), "{info}");
    w.wait_console(&info);
    assert_eq!(w.ask(WorkerOp::Shutdown), WorkerReply::Ok);
    let (code, exit) = w.wait_exit();
    assert_eq!(code, Some(0), "log:\n{}", w.log());
    let exit = exit.expect("exit.json");
    assert_eq!(exit.reason, WorkerExitReason::PoweredOff { status: 0 });
    assert_eq!(exit.pid, w.child.id());
    for sock in ["worker.sock", "console.sock", "control.sock"] {
        assert!(!w.path(sock).exists(), "{sock} left behind");
    }
}

#[test]
fn turn_off_and_sigterm_end_as_turned_off() {
    if !kvm() {
        return;
    }
    let mut w = Worker::start(probe_spec());
    w.wait_console("PROBE READY");
    let mut conn = w.control();
    assert_eq!(conn.ask(WorkerOp::TurnOff), WorkerReply::Ok);
    let (code, exit) = w.wait_exit();
    assert_eq!(code, Some(0));
    assert_eq!(exit.unwrap().reason, WorkerExitReason::TurnedOff);
    assert!(!w.path("worker.sock").exists());

    let mut w = Worker::start(probe_spec());
    w.wait_console("PROBE READY");
    w.signal(libc::SIGTERM);
    let (code, exit) = w.wait_exit();
    assert_eq!(code, Some(0));
    assert_eq!(exit.unwrap().reason, WorkerExitReason::TurnedOff);
}

#[test]
fn sigkill_leaves_no_exit_json() {
    if !kvm() {
        return;
    }
    let mut w = Worker::start(probe_spec());
    w.wait_console("PROBE READY");
    w.signal(libc::SIGKILL);
    let (code, exit) = w.wait_exit();
    assert_eq!(code, None);
    assert!(exit.is_none());
    // The next worker of the VM takes over the stale sockets.
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.path("spec.json")).unwrap()).unwrap();
    assert!(w.path("worker.sock").exists());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vireo-vm"))
        .arg("--vm-dir")
        .arg(w.dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    w.child = child;
    w.wait_console("PROBE READY");
    assert!(matches!(w.ask(WorkerOp::Hello), WorkerReply::Hello { .. }));
    assert_eq!(w.ask(WorkerOp::TurnOff), WorkerReply::Ok);
    assert_eq!(w.wait_exit().1.unwrap().reason, WorkerExitReason::TurnedOff);
    assert_eq!(spec["vm_id"], w.vm_id.to_string());
}

#[test]
fn a_missing_disk_or_a_nic_is_start_failed_naming_it() {
    if !kvm() {
        return;
    }
    let mut spec = probe_spec();
    let missing = std::env::temp_dir().join("vireo-worker-test-no-such-disk.vhdx");
    spec.disks.push(DiskSpec {
        path: missing.clone(),
        read_only: false,
        format: None,
        serial: None,
        max_iops: None,
        min_iops: None,
        queues: None,
    });
    let mut w = Worker::start(spec);
    let (code, exit) = w.wait_exit();
    assert_eq!(code, Some(1));
    let WorkerExitReason::StartFailed { message } = exit.unwrap().reason else {
        panic!("not StartFailed");
    };
    assert!(
        message.contains(&format!("disk {}", missing.display())),
        "{message}"
    );
    assert!(w.log().contains(&message), "the log says why too");
    for sock in ["worker.sock", "console.sock", "control.sock"] {
        assert!(!w.path(sock).exists(), "{sock} left behind");
    }

    let mut spec = probe_spec();
    spec.nics.push(NicSpec {
        name: None,
        policy: Default::default(),
        virtual_subnet: None,
        queues: None,
        switch: "sw0".into(),
        mac: None,
        vlan: None,
    });
    let mut w = Worker::start(spec.clone());
    let (code, exit) = w.wait_exit();
    assert_eq!(code, Some(1));
    let WorkerExitReason::StartFailed { message } = exit.unwrap().reason else {
        panic!("not StartFailed");
    };
    assert!(message.contains("1 NICs but 0 NIC sockets"), "{message}");
    // A NIC whose port socket nobody serves: the start fails naming the NIC and the socket.
    let nowhere = std::path::PathBuf::from("/nonexistent/ports/p.sock");
    let mut w = Worker::start_with_nics(spec, vec![nowhere]);
    let (code, exit) = w.wait_exit();
    assert_eq!(code, Some(1));
    let WorkerExitReason::StartFailed { message } = exit.unwrap().reason else {
        panic!("not StartFailed");
    };
    assert!(
        message.contains("NIC nics[0]") && message.contains("/nonexistent/ports/p.sock"),
        "{message}"
    );

    let mut spec = probe_spec();
    spec.kernel = "/nonexistent/vmlinux".into();
    let mut w = Worker::start(spec);
    let (code, exit) = w.wait_exit();
    assert_eq!(code, Some(1));
    let WorkerExitReason::StartFailed { message } = exit.unwrap().reason else {
        panic!("not StartFailed");
    };
    assert!(message.contains("/nonexistent/vmlinux"), "{message}");
}

#[test]
fn bad_requests_get_errors_and_the_connection_stays_usable() {
    if !kvm() {
        return;
    }
    let mut spec = probe_spec();
    spec.shutdown_line = None;
    let w = Worker::start(spec);
    let mut conn = w.control();
    let error = |r: WorkerReply| match r {
        WorkerReply::Error { message } => message,
        other => panic!("expected Error, got {other:?}"),
    };
    let m = error(conn.raw(r#"{"version":99,"op":"hello"}"#));
    assert!(m.contains("protocol version 99"), "{m}");
    let m = error(conn.raw("this is not json"));
    assert!(m.contains("malformed"), "{m}");
    let m = error(conn.raw(r#"{"version":1,"op":"reboot"}"#));
    assert!(m.contains("malformed"), "{m}");
    let m = error(conn.raw(&"x".repeat(100_000)));
    assert!(m.contains("longer than"), "{m}");
    let m = error(conn.ask(WorkerOp::Shutdown));
    assert!(m.contains("no shutdown_line"), "{m}");
    // Still the same connection.
    assert!(matches!(
        conn.ask(WorkerOp::Hello),
        WorkerReply::Hello { .. }
    ));
}

#[test]
fn a_new_console_client_replaces_the_attached_one() {
    if !kvm() {
        return;
    }
    let w = Worker::start(probe_spec());
    w.wait_console("PROBE READY");
    let mut first = w.probe_console();
    assert!(first.command("PING", T).unwrap().starts_with("OK PONG"));
    let mut second = w.probe_console();
    // The first connection is closed by the worker.
    let mut old = first;
    let ended = old.read_line(T);
    assert!(ended.is_err(), "the old client still reads {ended:?}");
    assert!(second.command("PING", T).unwrap().starts_with("OK PONG"));
}

#[test]
fn console_log_is_bounded_by_the_ring() {
    if !kvm() {
        return;
    }
    let mut spec = probe_spec();
    spec.console_ring_bytes = 64;
    let w = Worker::start(spec);
    w.wait_console("PROBE READY");
    let mut console = w.probe_console();
    let mut last = String::new();
    for _ in 0..5 {
        last = console.command("INFO", T).unwrap();
    }
    let last = format!("{last}\n");
    let deadline = std::time::Instant::now() + T;
    loop {
        let WorkerReply::ConsoleLog {
            data_base64,
            total_bytes,
        } = w.ask(WorkerOp::ConsoleLog { max_bytes: 1000 })
        else {
            panic!("ConsoleLog answered otherwise");
        };
        let data = decode(&data_base64);
        assert!(data.len() <= 64, "{}", data.len());
        if data.ends_with(last.as_bytes()) {
            assert_eq!(data.len(), 64);
            assert!(total_bytes >= 5 * last.len() as u64, "{total_bytes}");
            let WorkerReply::ConsoleLog { data_base64, .. } =
                w.ask(WorkerOp::ConsoleLog { max_bytes: 5 })
            else {
                panic!("ConsoleLog answered otherwise");
            };
            assert_eq!(decode(&data_base64), &data[data.len() - 5..]);
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {last:?} in {data:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn disks_get_their_serial_and_the_control_socket_lists_them() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path(), "data.img", 4 << 20);
    let ro = raw_disk(dir.path(), "ro.img", 1 << 20);
    let mut spec = probe_spec();
    spec.disks.push(DiskSpec {
        path: raw.clone(),
        read_only: false,
        format: Some(DiskFormat::Raw),
        serial: Some("vireo-serial-0".into()),
        max_iops: None,
        min_iops: None,
        queues: None,
    });
    spec.disks.push(DiskSpec {
        path: ro.clone(),
        read_only: true,
        format: None,
        serial: Some("vireo-serial-1".into()),
        max_iops: None,
        min_iops: None,
        queues: None,
    });
    let mut w = Worker::start(spec);
    w.wait_console("PROBE READY");
    let mut console = w.probe_console();
    assert_eq!(
        console.command("DISK 0 ID", T).unwrap(),
        "OK id=vireo-serial-0"
    );
    assert_eq!(
        console.command("DISK 1 ID", T).unwrap(),
        "OK id=vireo-serial-1"
    );
    let info = console.command("DISK 1 INFO", T).unwrap();
    assert!(info.contains("sectors=2048 ro=1"), "{info}");
    console.command("DISK 0 WRITE 8 16 7", T).unwrap();
    // The text control protocol of `vireo run --control`, on control.sock.
    let mut control = w.connect("control.sock");
    writeln!(control, "disks").unwrap();
    let mut lines = BufReader::new(control.try_clone().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["path"], raw.to_str().unwrap());
    assert_eq!(first["format"], "raw");
    let second: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(second["read_only"], true);
    assert_eq!(lines.next().unwrap().unwrap(), "ok");
    writeln!(control, "disk-resize 0 8M").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "ok 8388608");
    let info = console.command("DISK 0 INFO", T).unwrap();
    assert!(info.contains("sectors=16384"), "{info}");
    assert_eq!(w.ask(WorkerOp::TurnOff), WorkerReply::Ok);
    assert_eq!(w.wait_exit().1.unwrap().reason, WorkerExitReason::TurnedOff);
    // Flushed and closed: the data is in the file.
    let bytes = std::fs::read(&raw).unwrap();
    assert_eq!(bytes.len(), 8 << 20);
    let mut want = vec![0u8; 16 * 512];
    vireo_probe_image::pattern::fill(&mut want, 7, 8 * 512);
    assert_eq!(&bytes[8 * 512..24 * 512], &want[..]);
}

#[test]
fn a_disk_given_the_wrong_format_is_start_failed() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path(), "plain.img", 1 << 20);
    let mut spec = probe_spec();
    spec.disks.push(DiskSpec {
        path: raw.clone(),
        read_only: false,
        format: Some(DiskFormat::Vhdx),
        serial: None,
        max_iops: None,
        min_iops: None,
        queues: None,
    });
    let mut w = Worker::start(spec);
    let (code, exit) = w.wait_exit();
    assert_eq!(code, Some(1));
    let WorkerExitReason::StartFailed { message } = exit.unwrap().reason else {
        panic!("not StartFailed");
    };
    assert!(
        message.contains(&format!(
            "disk {} was given as format=vhdx but it is a raw image",
            raw.display()
        )),
        "{message}"
    );
    assert_eq!(std::fs::read(&raw).unwrap(), vec![0; 1 << 20]);
}

#[test]
fn tiny_guests_end_powered_off_reset_and_vcpu_failed() {
    if !kvm() {
        return;
    }
    use vireo_vmm::test_images;
    let dir = tempfile::tempdir().unwrap();
    for (name, code, want, status) in [
        (
            "poweroff",
            test_images::hello_poweroff(7),
            WorkerExitReason::PoweredOff { status: 7 },
            0,
        ),
        (
            "reset",
            test_images::i8042_reset(),
            WorkerExitReason::Reset,
            0,
        ),
    ] {
        let kernel = dir.path().join(name);
        std::fs::write(&kernel, test_images::pvh_elf(&code)).unwrap();
        let mut spec = probe_spec();
        spec.kernel = kernel;
        let mut w = Worker::start(spec);
        let (code, exit) = w.wait_exit();
        assert_eq!(code, Some(status), "{name}: log:\n{}", w.log());
        assert_eq!(exit.unwrap().reason, want, "{name}");
    }
    let kernel = dir.path().join("triple");
    std::fs::write(&kernel, test_images::pvh_elf(&test_images::triple_fault())).unwrap();
    let mut spec = probe_spec();
    spec.kernel = kernel;
    let mut w = Worker::start(spec);
    let (code, exit) = w.wait_exit();
    assert_eq!(code, Some(1));
    let WorkerExitReason::VcpuFailed { message } = exit.unwrap().reason else {
        panic!("not VcpuFailed: log:\n{}", w.log());
    };
    assert!(message.contains("vCPU 0"), "{message}");
}

/// Needs no KVM: the spec is refused before the VM is built.
#[test]
fn a_bad_launch_spec_is_start_failed() {
    let mut spec = probe_spec();
    spec.version = 2;
    let mut w = Worker::start(spec);
    let (code, exit) = w.wait_exit();
    assert_eq!(code, Some(1));
    let WorkerExitReason::StartFailed { message } = exit.unwrap().reason else {
        panic!("not StartFailed");
    };
    assert!(message.contains("VM spec version 2"), "{message}");

    // Not a WorkerLaunch at all: the worker says which file and why.
    std::fs::write(w.path("spec.json"), b"{\"vm_id\": 3}").unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vireo-vm"))
        .arg("--vm-dir")
        .arg(w.dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    w.child = child;
    let (code, exit) = w.wait_exit();
    assert_eq!(code, Some(1));
    let WorkerExitReason::StartFailed { message } = exit.unwrap().reason else {
        panic!("not StartFailed");
    };
    assert!(
        message.contains("spec.json is not a valid WorkerLaunch"),
        "{message}"
    );
}
