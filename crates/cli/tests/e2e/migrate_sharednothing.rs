//! End to end, under KVM: shared-nothing live migration (`vireo vm migrate --with-storage
//! --dest-dir DIR`) of a probe-guest VM between two real vireods that share no storage (each
//! its own state directory and storage roots; only the probe kernel's folder is a root of
//! both), with real `vireo-vm` workers. The VM's first disk is a VHDX chain (a differencing
//! file on a parent holding data), so the copy is flattened; its second is a child of a parent
//! another VM of the source (off) also runs on.
//!
//! Refused before any data moves: a dest-dir outside the destination's roots, and (as root) a
//! dest-dir on a 1 MiB tmpfs; a migration cancelled while the disks are being copied leaves no
//! file in the dest-dir and the VM running here. Then the migration runs while the guest keeps
//! writing its disk; on the destination the guest verifies every write that was acknowledged,
//! its dirty-memory workload continues (no second boot), and the host reads the copy with
//! vireo-vhdx: one VHDX, no parent, holding the pattern. The source deleted its files (the
//! first disk's child and parent, the second's child, each named in the job) but the parent
//! the other VM uses. The VM then migrates back with `--keep-source`: the files it leaves
//! stay, and the command says so.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_block::BlockBackend;

use crate::vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::migration::{
    create_child, files_in, migration_address, start_shared_nothing, trust_each_other, two_hosts,
    wait_for_end, wait_for_progress, Storage,
};
use vireod_harness::tmpfs::Tmpfs;

/// The probe's pattern (docs/probe-protocol.md): byte offset `o` holds splitmix64(seed ^ o).
fn pattern(offset: u64, len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for i in (0..len as u64).step_by(8) {
        let mut x = (seed ^ (offset + i)).wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(x ^ (x >> 31)).to_le_bytes());
    }
    out
}

#[test]
fn probe_guest_migrates_with_its_disk_to_a_vireod_that_shares_no_storage() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some((a, b)) = two_hosts(Storage::Separate) else {
        return;
    };
    // A chain: the parent holds 8 MiB of pattern 3 written by the host; the VM runs on the
    // child.
    let base = a.dir.path().join("base.vhdx");
    a.ok(&["disk", "create", base.to_str().unwrap(), "--size", "64M"]);
    {
        let v = vireo_vhdx::Vhdx::open(&base, &vireo_vhdx::OpenOptions::default()).unwrap();
        v.write_at(&pattern(0, 8 << 20, 3), 0).unwrap();
        v.flush().unwrap();
    }
    let top = a.dir.path().join("m.vhdx");
    create_child(&a, &top, &base);
    // A parent two VMs share: `o` (never started) and `m`'s second disk.
    let shared = a.dir.path().join("shared.vhdx");
    a.ok(&["disk", "create", shared.to_str().unwrap(), "--size", "16M"]);
    let second = a.dir.path().join("s.vhdx");
    let other = a.dir.path().join("o.vhdx");
    for child in [&second, &other] {
        a.ok(&[
            "disk",
            "create",
            child.to_str().unwrap(),
            "--parent",
            shared.to_str().unwrap(),
        ]);
    }
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    a.ok(&[
        "vm", "create", "o", "--kernel", &kernel, "--memory", "32M", "--disk", "o.vhdx",
    ]);
    a.ok(&[
        "vm", "create", "m", "--kernel", &kernel, "--memory", "32M", "--disk", "m.vhdx", "--disk",
        "s.vhdx",
    ]);
    a.ok(&["vm", "start", "m"]);
    let id = a.vm("m").identity.id;
    let mut c = Console::attach(&a, "m");
    // 16 MiB written by the guest into the top file, over part of the parent's data.
    c.ok("DISK 0 WRITE 8192 32768 5");
    c.ok("MEM FILL 16 8 9");
    c.ok("DIRTY START 8 4 0");

    trust_each_other(&a, &b);
    let to = migration_address(&b);
    let dest = b.dir.path().join("copies");
    std::fs::create_dir(&dest).unwrap();
    let dest_s = dest.to_str().unwrap().to_owned();
    let running_here = |why: &str| {
        assert_eq!(a.vm("m").state.name(), "running", "{why}");
        let (_, line) = b.fails(&["vm", "show", "m"]);
        assert!(line.contains("no VM \"m\""), "{why}: {line}");
    };

    // Outside B's storage roots (A's folder is not one of them): refused, nothing moved.
    let outside = a.dir.path().to_str().unwrap().to_owned();
    let (code, line) = a.fails(&[
        "vm",
        "migrate",
        "m",
        "--to",
        &to,
        "--with-storage",
        "--dest-dir",
        &outside,
    ]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("outside vireod's storage roots"), "{line}");
    running_here("dest-dir outside the roots");
    assert!(!a.dir.path().join("m.vhdx.tmp").exists());

    // Too small: a 1 MiB tmpfs inside B's root (root only: mounting).
    let tiny = b.dir.path().join("tiny");
    if let Some(_mounted) = Tmpfs::mount(&tiny, "1M") {
        let (code, line) = a.fails(&[
            "vm",
            "migrate",
            "m",
            "--to",
            &to,
            "--with-storage",
            "--dest-dir",
            tiny.to_str().unwrap(),
        ]);
        assert_eq!(code, 1, "{line}");
        assert!(line.contains("bytes free"), "{line}");
        assert!(files_in(&tiny).is_empty(), "{:?}", files_in(&tiny));
        running_here("too little space");
    } else {
        vireo_testkit::skip("the dest-dir-too-small case (mounting a tmpfs needs root)");
    }

    // Cancelled while the disks are copied (held to 4 MiB/s so the copy outlasts a poll on a
    // quiet machine): no file left there, the VM runs on here.
    let job_id = start_shared_nothing(
        &a,
        "m",
        &to,
        &dest,
        &["--max-downtime", "1ms", "--bandwidth", "4M"],
    );
    wait_for_progress(&a, &job_id, "disk_bytes_total");
    a.ok(&["job", "cancel", &job_id]);
    let j = wait_for_end(&a, &job_id, Duration::from_secs(60));
    assert_eq!(j["state"], "cancelled", "{j}");
    // The destination removes its copies when the abort arrives; give it that moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !files_in(&dest).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(files_in(&dest).is_empty(), "left: {:?}", files_in(&dest));
    running_here("cancelled");
    c.ok("DISK 0 VERIFY 8192 32768 5");

    // The migration, while the guest keeps writing (each acknowledged write is checked on
    // the destination).
    let mut migrate = a
        .vireo(&[
            "vm",
            "migrate",
            "m",
            "--to",
            &to,
            "--with-storage",
            "--dest-dir",
            &dest_s,
            "--max-downtime",
            "50ms",
            "--output",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let mut lba = 65536u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    // Up to the disk's end (64 MiB = 131072 sectors), never rewriting one: each keeps its seed.
    while migrate.try_wait().unwrap().is_none() && Instant::now() < deadline && lba < 130000 {
        let seed = 100 + acked.len() as u64;
        match c.try_ask(
            &format!("DISK 0 WRITE {lba} 64 {seed}"),
            Duration::from_secs(5),
        ) {
            Some(a) if a.starts_with("OK") => acked.push((lba, seed)),
            // The VM moved under the command: its outcome is unknown; not checked.
            _ => break,
        }
        lba += 64;
    }
    let out = migrate.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(c);
    let job: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(job["state"], "completed", "{job}");
    let m = &job["migration"];
    assert!(m["disk_bytes_copied"].as_u64().unwrap() >= 24 << 20, "{m}");
    eprintln!(
        "shared-nothing migration: downtime {} ms, {} disk bytes sent, {} guest writes during it",
        m["downtime_ms"],
        m["disk_bytes_copied"],
        acked.len()
    );
    assert!(
        !acked.is_empty(),
        "no guest write happened during the migration"
    );

    let (_, line) = a.fails(&["vm", "show", "m"]);
    assert!(line.contains("no VM \"m\""), "{line}");
    // The source's files went, each named in the job, but the parent `o` runs on.
    assert!(!top.exists(), "the source's top file is deleted");
    assert!(
        !base.exists(),
        "the parent of the source's top file is deleted"
    );
    assert!(!second.exists(), "the second disk's file is deleted");
    assert!(
        shared.exists() && other.exists(),
        "another VM's files are kept"
    );
    assert_eq!(a.vm("o").state.name(), "off");
    let phases: Vec<&str> = m["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    let named = |prefix: &str, file: &str| {
        phases
            .iter()
            .any(|p| p.starts_with(prefix) && p.contains(&format!("/{file}")))
    };
    for file in ["m.vhdx", "base.vhdx", "s.vhdx"] {
        assert!(named("source file deleted: ", file), "{file}: {phases:?}");
    }
    assert!(
        named("source file kept: ", "shared.vhdx") && !named("source file deleted", "o.vhdx"),
        "{phases:?}"
    );
    let there = b.vm("m");
    assert_eq!(there.state.name(), "running");
    assert_eq!(there.identity.id, id);
    let mut c = Console::attach(&b, "m");
    let stop = c.ok("DIRTY STOP");
    assert!(stop.contains("passes="), "{stop}");
    c.ok("MEM VERIFY 16 8 9");
    c.ok("DISK 0 VERIFY 0 8192 3");
    c.ok("DISK 0 VERIFY 8192 32768 5");
    for (lba, seed) in &acked {
        c.ok(&format!("DISK 0 VERIFY {lba} 64 {seed}"));
    }
    c.ok("DISK 0 WRITE 130500 8 7");
    c.ok("DISK 0 VERIFY 130500 8 7");
    c.ok("DISK 0 FLUSH");
    drop(c);
    let log = b.ok(&["vm", "console", "m", "--log"]);
    assert!(
        !log.contains("PROBE READY"),
        "the guest booted again: {log}"
    );
    let mut copies = files_in(&dest);
    copies.sort();
    assert_eq!(copies, vec!["m.vhdx".to_string(), "s.vhdx".to_string()]);

    // `--keep-source` only goes with `--with-storage` (nothing is deleted on shared storage).
    let out = b.run(&["vm", "migrate", "m", "--to", &to, "--keep-source"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--with-storage"), "{err}");
    // Back to A with `--keep-source`: B's copies stay, and the command says so.
    let back = a.dir.path().join("back");
    std::fs::create_dir(&back).unwrap();
    let said = b.ok(&[
        "vm",
        "migrate",
        "m",
        "--to",
        &migration_address(&a),
        "--with-storage",
        "--dest-dir",
        back.to_str().unwrap(),
        "--keep-source",
    ]);
    assert!(
        said.contains("source files kept: keep_source (--keep-source) was asked"),
        "{said}"
    );
    assert_eq!(a.vm("m").state.name(), "running");
    let mut copies = files_in(&dest);
    copies.sort();
    assert_eq!(copies, vec!["m.vhdx".to_string(), "s.vhdx".to_string()]);

    // The host reads the copy: one VHDX without a parent, holding what the guest saw.
    a.ok(&["vm", "turn-off", "m"]);
    let copy = Arc::new(
        vireo_vhdx::Vhdx::open(
            &dest.join("m.vhdx"),
            &vireo_vhdx::OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    assert_eq!(copy.chain_paths().len(), 1, "flattened");
    assert_eq!(copy.virtual_size(), 64 << 20);
    let mut buf = vec![0u8; 1 << 20];
    copy.read_at(&mut buf, 0).unwrap();
    assert!(buf == pattern(0, 1 << 20, 3), "the parent's data");
    copy.read_at(&mut buf, 8192 * 512).unwrap();
    assert!(buf == pattern(8192 * 512, 1 << 20, 5), "the guest's data");
    for (lba, seed) in acked.iter().take(20) {
        let mut w = vec![0u8; 64 * 512];
        copy.read_at(&mut w, lba * 512).unwrap();
        assert!(w == pattern(lba * 512, w.len(), *seed), "write at {lba}");
    }
}
