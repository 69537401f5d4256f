//! `AddDisk`/`RemoveDisk` on a `vireo-vm` running the probe: a hot-added disk with `max_iops`
//! is seen by the guest after `RESCAN`, is metered and held to its limit like a boot disk, and
//! after `RemoveDisk` is gone from the guest, the metrics and control.sock, with its data in
//! the file. Bad requests (missing file, a file already attached, no free slot, an unknown
//! serial) are refused with a message naming the culprit and change nothing.

use crate::common;

use std::path::Path;
use std::time::Instant;

use common::*;
use vireo_api::worker::{WorkerMetrics, WorkerOp, WorkerReply, WORKER_DISK_SLOTS};
use vireo_api::{DiskFormat, DiskSpec};
use vireo_probe_image::{pattern, ProbeConsole};

fn disk(path: &Path, serial: &str, max_iops: Option<u32>) -> DiskSpec {
    DiskSpec {
        path: path.to_path_buf(),
        read_only: false,
        format: Some(DiskFormat::Raw),
        serial: Some(serial.into()),
        max_iops,
        min_iops: None,
        queues: None,
    }
}

fn metrics(w: &Worker) -> WorkerMetrics {
    match w.ask(WorkerOp::Metrics) {
        WorkerReply::Metrics(m) => m,
        other => panic!("Metrics answered {other:?}"),
    }
}

fn refused(w: &Worker, op: WorkerOp) -> String {
    match w.ask(op.clone()) {
        WorkerReply::Error { message } => message,
        other => panic!("{op:?} answered {other:?}"),
    }
}

fn ok(console: &mut ProbeConsole, cmd: &str) -> String {
    let answer = console
        .command(cmd, T)
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(answer.starts_with("OK"), "{cmd}: {answer}");
    answer
}

fn serials(w: &Worker) -> Vec<String> {
    metrics(w)
        .disks
        .into_iter()
        .map(|d| d.serial.unwrap_or_default())
        .collect()
}

#[test]
fn hot_add_meter_throttle_and_remove_a_disk() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut spec = probe_spec();
    let boot = raw_disk(dir.path(), "boot.img", 4 << 20);
    spec.disks.push(disk(&boot, "BOOT", None));
    let w = Worker::start(spec);
    w.wait_console("PROBE READY");
    let mut console = w.probe_console();
    assert!(ok(&mut console, "INFO").contains(" disks=1 "));

    // Refused, nothing changes: a missing file, the boot disk again (by another name too).
    let missing = dir.path().join("missing.img");
    let e = refused(
        &w,
        WorkerOp::AddDisk {
            disk: disk(&missing, "M", None),
        },
    );
    assert!(e.contains(&missing.display().to_string()), "{e}");
    let e = refused(
        &w,
        WorkerOp::AddDisk {
            disk: disk(&dir.path().join(".").join("boot.img"), "B2", None),
        },
    );
    assert!(
        e.contains("is already attached to this VM (serial BOOT)"),
        "{e}"
    );
    assert_eq!(serials(&w), ["BOOT"]);

    // Hot add with a 100 IOPS limit: disk 1 after RESCAN.
    let hot = raw_disk(dir.path(), "hot.img", 4 << 20);
    let reply = w.ask(WorkerOp::AddDisk {
        disk: disk(&hot, "HOT", Some(100)),
    });
    assert_eq!(reply, WorkerReply::DiskAdded { index: 1 });
    assert_eq!(serials(&w), ["BOOT", "HOT"]);
    assert_eq!(ok(&mut console, "RESCAN"), "OK disks=2 added=1 removed=0");
    assert_eq!(ok(&mut console, "DISK 1 ID"), "OK id=HOT");
    let before = metrics(&w);
    // 1 MiB = 128 normalized IOs at 100 IOPS: held back, then done whole.
    let t0 = Instant::now();
    ok(&mut console, "DISK 1 WRITE 0 2048 31");
    let took = t0.elapsed();
    ok(&mut console, "DISK 1 VERIFY 0 2048 31");
    let after = metrics(&w);
    let (b, a) = (&before.disks[1], &after.disks[1]);
    assert_eq!(a.write_bytes - b.write_bytes, 1 << 20, "{a:?}");
    assert_eq!(a.read_bytes - b.read_bytes, 1 << 20, "{a:?}");
    assert_eq!(a.normalized_ios - b.normalized_ios, 256, "{a:?}");
    assert!(
        a.throttled_ns > 0,
        "the limit held nothing back: {a:?} in {took:?}"
    );
    assert_eq!(after.disks[0].throttled_ns, 0);

    // control.sock lists it as disk 1 too.
    let mut control = std::io::BufReader::new(w.connect("control.sock"));
    let listed = control_disks(&mut control);
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed[1].contains("hot.img"), "{listed:?}");

    // Fill every slot, then one more is refused.
    let extra: Vec<_> = (2..WORKER_DISK_SLOTS)
        .map(|i| raw_disk(dir.path(), &format!("x{i}.img"), 1 << 20))
        .collect();
    for (i, p) in extra.iter().enumerate() {
        let r = w.ask(WorkerOp::AddDisk {
            disk: disk(p, &format!("X{}", i + 2), None),
        });
        assert_eq!(
            r,
            WorkerReply::DiskAdded {
                index: i as u32 + 2
            }
        );
    }
    let one_more = raw_disk(dir.path(), "one-more.img", 1 << 20);
    let e = refused(
        &w,
        WorkerOp::AddDisk {
            disk: disk(&one_more, "MORE", None),
        },
    );
    assert!(
        e.contains(&format!("all {WORKER_DISK_SLOTS} disk slots")),
        "{e}"
    );
    assert_eq!(metrics(&w).disks.len(), WORKER_DISK_SLOTS);
    for i in 2..WORKER_DISK_SLOTS {
        let r = w.ask(WorkerOp::RemoveDisk {
            serial: format!("X{i}"),
        });
        assert_eq!(r, WorkerReply::Ok);
    }

    // Hot remove: gone from the guest, the metrics and control.sock; the data is in the file.
    let e = refused(
        &w,
        WorkerOp::RemoveDisk {
            serial: "NOPE".into(),
        },
    );
    assert!(e.contains("no disk with serial NOPE"), "{e}");
    assert_eq!(
        w.ask(WorkerOp::RemoveDisk {
            serial: "HOT".into()
        }),
        WorkerReply::Ok
    );
    assert_eq!(serials(&w), ["BOOT"]);
    assert_eq!(control_disks(&mut control).len(), 1);
    assert_eq!(ok(&mut console, "RESCAN"), "OK disks=1 added=0 removed=1");
    assert!(ok(&mut console, "INFO").contains(" disks=1 "));
    let bytes = std::fs::read(&hot).unwrap();
    assert_eq!(pattern::verify(&bytes[..1 << 20], 31, 0), None);
    // The file was let go: it can be attached again (its OFD lock is gone).
    assert_eq!(
        w.ask(WorkerOp::AddDisk {
            disk: disk(&hot, "HOT", None),
        }),
        WorkerReply::DiskAdded { index: 1 }
    );
    ok(&mut console, "RESCAN");
    ok(&mut console, "DISK 1 VERIFY 0 2048 31");
}

/// The `disks` lines of control.sock.
fn control_disks(conn: &mut std::io::BufReader<std::os::unix::net::UnixStream>) -> Vec<String> {
    use std::io::{BufRead, Write};
    conn.get_mut().write_all(b"disks\n").unwrap();
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        assert!(
            conn.read_line(&mut line).unwrap() > 0,
            "control.sock closed"
        );
        let line = line.trim_end().to_string();
        if line == "ok" {
            return lines;
        }
        assert!(!line.starts_with("error"), "{line}");
        lines.push(line);
    }
}
