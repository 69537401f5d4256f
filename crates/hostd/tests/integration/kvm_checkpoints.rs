//! Checkpoints of a probe VM under /dev/kvm through vireod: a running VM's checkpoint is taken
//! live (same worker) and keeps its disk data and memory (apply + start → exactly the
//! checkpoint's), also while the guest dirties memory; deleting the checkpoint the running VM
//! hangs from merges live — same worker before and after, data intact; a worker killed at each
//! step of the live capture leaves a VM whose chain checks clean and whose data is there;
//! vireod killed at each step of a live capture leaves the VM running on, and after its
//! restart the checkpoint is complete or gone, with no stray AVHDX. `apply --keep-running`
//! reverts a running VM in its own worker, also one with a NIC on a switch (frames flow through
//! the switch before and after), and a paused VM stays paused at the checkpoint's counter.

use crate::common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::daemon::{Vireod, VIREOD};
use serde_json::{json, Value};
use vireo_probe_image::console::decode_hex;
use vireo_probe_image::{probe_elf, tagged_frame, ProbeConsole};
use vireo_vhdx::{CreateOptions, Vhdx};

const T: Duration = Duration::from_secs(60);

fn worker_bin() -> Option<PathBuf> {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return None;
    }
    let bin = Path::new(VIREOD).with_file_name("vireo-vm");
    assert!(
        bin.exists(),
        "{} is missing: cargo build --release -p vireo-worker",
        bin.display()
    );
    Some(bin)
}

fn console(d: &Vireod, vm: &str) -> ProbeConsole {
    use std::io::{Read, Write};
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let req = format!(
        "GET /v1/vms/{vm}/console HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: vireo-console\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "closed in the head: {head:?}");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    ProbeConsole::new(s.try_clone().unwrap(), s)
}

fn wait_ready(d: &Vireod, vm: &str) {
    let start = Instant::now();
    while !String::from_utf8_lossy(&d.get(&format!("/v1/vms/{vm}/console/log")).body)
        .contains("PROBE READY")
    {
        assert!(start.elapsed() < T, "{vm}: no PROBE READY");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ok(c: &mut ProbeConsole, cmd: &str) -> String {
    let r = c.command(cmd, T).unwrap();
    assert!(r.starts_with("OK"), "{cmd}: {r}");
    r
}

fn job(d: &Vireod, r: common::daemon::Response) -> Value {
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    let j = d.wait_job(r.json()["id"].as_str().unwrap(), T);
    assert_eq!(j["state"], "completed", "{j}\n{}", d.log());
    j
}

fn pid(d: &Vireod, vm: &Value) -> u32 {
    d.worker_record(vm["identity"]["id"].as_str().unwrap())
        .unwrap()
        .pid
}

#[test]
fn checkpoint_apply_and_live_delete_of_a_running_probe_vm() {
    let Some(bin) = worker_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start_with(&tmp.path().join("state"), &bin);
    let base = tmp.path().join("kvm-base.vhdx");
    let opts = CreateOptions {
        size: 16 << 20,
        block_size: 1 << 20,
        ..CreateOptions::default()
    };
    drop(Vhdx::create(&base, &opts).unwrap());
    let vm = d.create(&json!({
        "version": 1, "name": "kcp", "vcpus": 1, "memory_bytes": 64 << 20,
        "kernel": probe_elf(), "cmdline": "console=ttyS0", "shutdown_line": "POWEROFF",
        "disks": [{ "path": base }],
    }));
    d.start_vm("kcp");
    wait_ready(&d, "kcp");
    let mut c = console(&d, "kcp");
    ok(&mut c, "DISK 0 WRITE 0 64 1");
    ok(&mut c, "MEM FILL 16 4 7");
    let sum = ok(&mut c, "MEM SUM 16 4");
    drop(c);
    let first = pid(&d, &vm);
    job(
        &d,
        d.post_json("/v1/vms/kcp/checkpoints", &json!({"name": "c1"})),
    );
    assert_eq!(d.state("kcp"), "running");
    assert_eq!(
        pid(&d, &vm),
        first,
        "taken live: the worker never restarted"
    );
    let shown = d.show("/v1/vms/kcp/checkpoints/c1");
    assert_eq!(shown["capture"]["live"], true, "{shown}");
    let mut c = console(&d, "kcp");
    ok(&mut c, "DISK 0 VERIFY 0 64 1");
    assert_eq!(
        ok(&mut c, "MEM SUM 16 4"),
        sum,
        "memory carried over the capture"
    );
    ok(&mut c, "DISK 0 WRITE 0 64 2");
    ok(&mut c, "MEM FILL 16 4 8");
    drop(c);
    // Apply (the VM is turned off first): saved at the checkpoint; start continues there.
    job(
        &d,
        d.post_json("/v1/vms/kcp/checkpoints/c1/apply", &json!({"stop": true})),
    );
    assert_eq!(d.state("kcp"), "saved");
    d.start_vm("kcp");
    let mut c = console(&d, "kcp");
    ok(&mut c, "DISK 0 VERIFY 0 64 1");
    ok(&mut c, "MEM VERIFY 16 4 7");
    ok(&mut c, "DISK 0 WRITE 128 64 3");
    // Delete c1 while the VM runs: its child merges live into the base; same worker.
    let before = pid(&d, &vm);
    job(&d, d.request("DELETE", "/v1/vms/kcp/checkpoints/c1", None));
    assert_eq!(d.state("kcp"), "running");
    assert_eq!(pid(&d, &vm), before, "the VM never stopped");
    assert_eq!(
        d.show("/v1/vms/kcp")["spec"]["disks"][0]["path"],
        json!(base),
        "the VM runs on the merged base"
    );
    ok(&mut c, "DISK 0 VERIFY 0 64 1");
    ok(&mut c, "DISK 0 VERIFY 128 64 3");
    ok(&mut c, "DISK 0 WRITE 256 64 4");
    drop(c);
    assert_eq!(d.post("/v1/vms/kcp/turn-off").status, 200);
    let r = Vhdx::check(&base, false).unwrap();
    assert!(r.is_clean(), "{r:?}");
}

/// vireod with the fault hook `VIREO_CHECKPOINT_FAULT=point` (its workers inherit it).
fn with_fault(state: &Path, bin: &Path, point: &str) -> Vireod {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.with_extension("vireod.log"))
        .unwrap();
    let child = Vireod::command(state, bin)
        .env("VIREO_CHECKPOINT_FAULT", point)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let d = Vireod {
        state_dir: state.to_owned(),
        sock: state.join("vireod.sock"),
        worker_bin: bin.to_owned(),
        child: Some(child),
        extra_args: Vec::new(),
        extra_env: Vec::new(),
    };
    common::daemon::wait_until(T, "vireod's socket", || {
        UnixStream::connect(&d.sock).is_ok()
    });
    // The first answer means start-up (re-adoption, recovery) is over.
    assert_eq!(d.get("/v1/host").status, 200, "{}", d.log());
    d
}

/// Every file of the VM's disk chain passes the VHDX check (`vireo disk check`).
fn chain_clean(d: &Vireod, vm: &str) {
    let top = PathBuf::from(
        d.show(&format!("/v1/vms/{vm}"))["spec"]["disks"][0]["path"]
            .as_str()
            .unwrap(),
    );
    let chain = Vhdx::open(&top, &vireo_vhdx::OpenOptions::read_only())
        .unwrap()
        .chain_paths();
    for f in chain {
        let r = Vhdx::check(&f, false).unwrap();
        assert!(r.is_clean(), "{}: {r:?}", f.display());
    }
}

#[test]
fn live_checkpoint_while_the_guest_dirties_and_worker_killed_at_each_step() {
    let Some(bin) = worker_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut d = Vireod::start_with(&state, &bin);
    let base = tmp.path().join("kvm-dirty.vhdx");
    let opts = CreateOptions {
        size: 16 << 20,
        block_size: 1 << 20,
        ..CreateOptions::default()
    };
    drop(Vhdx::create(&base, &opts).unwrap());
    let vm = d.create(&json!({
        "version": 1, "name": "kdirty", "vcpus": 1, "memory_bytes": 64 << 20,
        "kernel": probe_elf(), "cmdline": "console=ttyS0", "shutdown_line": "POWEROFF",
        "disks": [{ "path": base }],
    }));
    d.start_vm("kdirty");
    wait_ready(&d, "kdirty");
    let mut c = console(&d, "kdirty");
    ok(&mut c, "DISK 0 WRITE 0 64 1");
    ok(&mut c, "MEM FILL 16 4 7");
    let sum = ok(&mut c, "MEM SUM 16 4");
    // The guest rewrites 16 MiB as fast as it can while the checkpoint is taken.
    ok(&mut c, "DIRTY START 32 16 0");
    let first = pid(&d, &vm);
    let started = Instant::now();
    job(
        &d,
        d.post_json("/v1/vms/kdirty/checkpoints", &json!({"name": "hot"})),
    );
    let took = started.elapsed();
    let stop = ok(&mut c, "DIRTY STOP");
    assert_eq!(pid(&d, &vm), first, "the worker never restarted");
    let cp = d.show("/v1/vms/kdirty/checkpoints/hot");
    assert_eq!(cp["capture"]["live"], true, "{cp}");
    let pause_us = cp["capture"]["pause_us"].as_u64().unwrap();
    eprintln!(
        "live checkpoint of a dirtying probe: guest paused {:.1} ms, job {} ms, {stop}",
        pause_us as f64 / 1e3,
        took.as_millis()
    );
    assert!(
        (pause_us as u128) < took.as_micros(),
        "the pause is part of the job"
    );
    // Pages written, not whole passes: a fast capture may end before the guest finishes one
    // pass over its 16 MiB (CI saw `passes=0 pages=3584`).
    let pages: u64 = stop
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pages="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(pages > 0, "the guest kept running: {stop}");
    ok(&mut c, "DISK 0 VERIFY 0 64 1");
    assert_eq!(ok(&mut c, "MEM SUM 16 4"), sum);
    ok(&mut c, "DISK 0 WRITE 0 64 2");
    ok(&mut c, "MEM FILL 16 4 8");
    drop(c);
    // Apply (turning it off): exactly the checkpoint's memory and disk.
    job(
        &d,
        d.post_json(
            "/v1/vms/kdirty/checkpoints/hot/apply",
            &json!({"stop": true}),
        ),
    );
    d.start_vm("kdirty");
    let mut c = console(&d, "kdirty");
    ok(&mut c, "DISK 0 VERIFY 0 64 1");
    ok(&mut c, "MEM VERIFY 16 4 7");
    drop(c);
    assert_eq!(d.post("/v1/vms/kdirty/turn-off").status, 200);
    d.wait_state("kdirty", "off", T);
    // The worker killed at each step: the VM is critical, the checkpoint kept exactly when the
    // worker had passed its durable point, the chain checks clean, the data written before is
    // there.
    for (n, (point, kept)) in [
        ("worker-saved", false),
        ("worker-child", true),
        ("worker-switched", true),
        ("worker-resumed", true),
    ]
    .into_iter()
    .enumerate()
    {
        d.terminate();
        let mut f = with_fault(&state, &bin, point);
        f.start_vm("kdirty");
        wait_ready(&f, "kdirty");
        let mut c = console(&f, "kdirty");
        let seed = 10 + n;
        ok(&mut c, &format!("DISK 0 WRITE 0 64 {seed}"));
        // Durable for the guest: what a worker killed before its own flush must keep.
        ok(&mut c, "DISK 0 FLUSH");
        drop(c);
        let name = format!("f{n}");
        let r = f.post_json("/v1/vms/kdirty/checkpoints", &json!({ "name": name }));
        let j = f.wait_job(r.json()["id"].as_str().unwrap(), T);
        assert_eq!(j["state"], "failed", "{point}: {j}");
        f.wait_state("kdirty", "critical", T);
        f.terminate();
        d = Vireod::start_with(&state, &bin);
        let names: Vec<String> = d
            .show("/v1/vms/kdirty/checkpoints")
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names.contains(&name), kept, "{point}: {names:?}");
        chain_clean(&d, "kdirty");
        d.start_vm("kdirty");
        wait_ready(&d, "kdirty");
        let mut c = console(&d, "kdirty");
        ok(&mut c, &format!("DISK 0 VERIFY 0 64 {seed}"));
        drop(c);
        assert_eq!(d.post("/v1/vms/kdirty/turn-off").status, 200);
        d.wait_state("kdirty", "off", T);
    }
}

/// Every `.avhdx` in the VM's folder is in use: the disk the VM runs on or a checkpoint's
/// frozen file. Anything else is an orphan a crash left behind.
fn no_orphans(d: &Vireod, vm: &str, id: &str) {
    let mut used: Vec<PathBuf> = vec![PathBuf::from(
        d.show(&format!("/v1/vms/{vm}"))["spec"]["disks"][0]["path"]
            .as_str()
            .unwrap(),
    )];
    for c in d
        .show(&format!("/v1/vms/{vm}/checkpoints"))
        .as_array()
        .unwrap()
    {
        for disk in c["disks"].as_array().unwrap() {
            used.push(PathBuf::from(disk["frozen"].as_str().unwrap()));
        }
    }
    let folder = d.state_dir.join("vms").join(id);
    let mut stack = vec![folder];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "avhdx") {
                assert!(
                    used.contains(&p),
                    "orphan {} (in use: {used:?})",
                    p.display()
                );
            }
        }
    }
}

/// vireod killed (the fault hook aborts it: no clean-up runs, as with SIGKILL) at each step of
/// a live checkpoint of a running VM: before the worker is asked (intent recorded), after the
/// worker answered (children in use, nothing committed), after the commit (intent not yet
/// cleared). The VM's worker runs on through it; the restarted vireod re-adopts it and
/// settles the intent: the checkpoint is complete (listed, its state there) or gone, every
/// AVHDX in the VM's folder is in use and the guest still answers and still has its data; at
/// the end (the VM off) the chain checks clean.
#[test]
fn vireod_killed_during_a_live_checkpoint_leaves_it_complete_or_gone() {
    let Some(bin) = worker_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut d = Vireod::start_with(&state, &bin);
    let base = tmp.path().join("kvm-vkill.vhdx");
    let opts = CreateOptions {
        size: 16 << 20,
        block_size: 1 << 20,
        ..CreateOptions::default()
    };
    drop(Vhdx::create(&base, &opts).unwrap());
    let vm = d.create(&json!({
        "version": 1, "name": "kvk", "vcpus": 1, "memory_bytes": 32 << 20,
        "kernel": probe_elf(), "cmdline": "console=ttyS0", "shutdown_line": "POWEROFF",
        "disks": [{ "path": base }],
    }));
    let id = vm["identity"]["id"].as_str().unwrap().to_owned();
    d.terminate();
    for (n, (point, kept)) in [
        ("create-intent", false),
        ("create-answered", true),
        ("create-commit", true),
    ]
    .into_iter()
    .enumerate()
    {
        let mut f = with_fault(&state, &bin, point);
        if n == 0 {
            f.start_vm("kvk");
            wait_ready(&f, "kvk");
        }
        assert_eq!(f.state("kvk"), "running", "{point}");
        let worker = pid(&f, &vm);
        let seed = 20 + n;
        let mut c = console(&f, "kvk");
        ok(&mut c, &format!("DISK 0 WRITE 0 64 {seed}"));
        ok(&mut c, "DISK 0 FLUSH");
        drop(c);
        let name = format!("k{n}");
        let r = f.post_json("/v1/vms/kvk/checkpoints", &json!({ "name": name }));
        assert_eq!(r.status, 202, "{point}");
        // vireod dies at the point; its worker must not.
        let mut child = f.child.take().unwrap();
        let died = Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(died.elapsed() < T, "{point}: vireod did not die");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Neither is dropped: a harness's Drop kills the VM's worker, which must live on.
        std::mem::forget(f);
        std::mem::forget(std::mem::replace(&mut d, Vireod::start_with(&state, &bin)));
        assert_eq!(d.state("kvk"), "running", "{point}: {}", d.log());
        assert_eq!(pid(&d, &vm), worker, "{point}: the same worker ran on");
        let cps = d.show("/v1/vms/kvk/checkpoints");
        let found = cps
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name.as_str())
            .cloned();
        assert_eq!(found.is_some(), kept, "{point}: {cps}");
        if let Some(cp) = found {
            let dir = d
                .state_dir
                .join("vms")
                .join(&id)
                .join("checkpoints")
                .join(cp["id"].as_str().unwrap());
            for f in ["vm.state", "memory.bin", "memory.crc"] {
                assert!(
                    dir.join(f).is_file(),
                    "{point}: {f} missing from the checkpoint"
                );
            }
        }
        no_orphans(&d, "kvk", &id);
        let mut c = console(&d, "kvk");
        ok(&mut c, &format!("DISK 0 VERIFY 0 64 {seed}"));
        drop(c);
        d.terminate();
    }
    // The kept checkpoints restore: apply the last one (stopping the VM) and start.
    std::mem::forget(std::mem::replace(&mut d, Vireod::start_with(&state, &bin)));
    job(
        &d,
        d.post_json("/v1/vms/kvk/checkpoints/k2/apply", &json!({"stop": true})),
    );
    d.start_vm("kvk");
    let mut c = console(&d, "kvk");
    ok(&mut c, "DISK 0 VERIFY 0 64 22");
    drop(c);
    assert_eq!(d.post("/v1/vms/kvk/turn-off").status, 200);
    d.wait_state("kvk", "off", T);
    // Off now (the running worker holds the chain locked): every file of it checks clean.
    chain_clean(&d, "kvk");
    no_orphans(&d, "kvk", &id);
    d.terminate();
}

/// The "delete a checkpoint while the guest writes": the guest streams sequential
/// writes (each 4 KiB written once unless the stream wraps the 4 GiB disk) while the checkpoint its running
/// file hangs from is deleted, so its child merges live under the writes. Every write the
/// guest saw completed is on the merged disk, the rest of the disk holds what it held before,
/// the worker never changed, and the merged base checks clean.
#[test]
fn deleting_a_checkpoint_while_the_guest_writes_loses_no_write() {
    let Some(bin) = worker_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start_with(&tmp.path().join("state"), &bin);
    let base = tmp.path().join("kvm-busy.vhdx");
    let disk_bytes: u64 = 4 << 30;
    let opts = CreateOptions {
        size: disk_bytes,
        block_size: 1 << 20,
        ..CreateOptions::default()
    };
    drop(Vhdx::create(&base, &opts).unwrap());
    let vm = d.create(&json!({
        "version": 1, "name": "kbusy", "vcpus": 1, "memory_bytes": 64 << 20,
        "kernel": probe_elf(), "cmdline": "console=ttyS0", "shutdown_line": "POWEROFF",
        "disks": [{ "path": base }],
    }));
    d.start_vm("kbusy");
    wait_ready(&d, "kbusy");
    let mut c = console(&d, "kbusy");
    // 32 MiB of seed 1 in the base, then a checkpoint: the VM runs on a child from here.
    ok(&mut c, "DISK 0 WRITE 0 65536 1");
    job(
        &d,
        d.post_json("/v1/vms/kbusy/checkpoints", &json!({"name": "c1"})),
    );
    let worker = pid(&d, &vm);
    // Seed 2 over the first 16 MiB, in the child: data the merge must carry.
    ok(&mut c, "DISK 0 WRITE 0 32768 2");

    // Seed 9 streamed from sector 0 for 2 s while c1 is deleted.
    c.send_line("DISK 0 BENCH write 4K 4 2 9").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    job(
        &d,
        d.request("DELETE", "/v1/vms/kbusy/checkpoints/c1", None),
    );
    let merged_after = asked.elapsed();
    let bench = c.answer(T).unwrap();
    assert!(bench.starts_with("OK"), "{bench}");
    let ios: u64 = vireo_probe_image::console::field(&bench, "ios")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no ios in {bench}"));
    eprintln!("merged {merged_after:?} after the delete was asked; the guest wrote {ios} x 4 KiB");
    assert!(ios > 0, "{bench}");
    assert_eq!(d.state("kbusy"), "running");
    assert_eq!(pid(&d, &vm), worker, "the VM never stopped");
    assert_eq!(
        d.show("/v1/vms/kbusy")["spec"]["disks"][0]["path"],
        json!(base),
        "the VM runs on the merged base"
    );

    let written = ios * 8; // sectors
    let disk_sectors = disk_bytes / 512;
    if written >= disk_sectors {
        // A host fast enough to wrap the disk: every sector's last write was seed 9.
        ok(&mut c, &format!("DISK 0 VERIFY 0 {disk_sectors} 9"));
    } else {
        ok(&mut c, &format!("DISK 0 VERIFY 0 {written} 9"));
    }
    // What the stream did not reach: the child's seed 2, then the base's seed 1.
    if written < 32768 {
        ok(
            &mut c,
            &format!("DISK 0 VERIFY {written} {} 2", 32768 - written),
        );
    }
    if written < 65536 {
        let from = written.max(32768);
        ok(&mut c, &format!("DISK 0 VERIFY {from} {} 1", 65536 - from));
    }
    drop(c);
    assert_eq!(d.post("/v1/vms/kbusy/turn-off").status, 200);
    let r = Vhdx::check(&base, false).unwrap();
    assert!(r.is_clean(), "{r:?}");
    let files: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("vhdx"))
        .collect();
    assert_eq!(files, ["kvm-busy.vhdx"], "the merged child is gone");
}

/// The pass counter of the probe's dirty workload (status page, docs/probe-protocol.md) in a
/// checkpoint's saved memory.
fn saved_passes(d: &Vireod, vm: &Value, cp: &str) -> u64 {
    use std::os::unix::fs::FileExt;
    let id = vm["identity"]["id"].as_str().unwrap();
    let cp_id = d.show(&format!(
        "/v1/vms/{}/checkpoints/{cp}",
        vm["spec"]["name"].as_str().unwrap()
    ))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mem = d
        .state_dir
        .join("vms")
        .join(id)
        .join("checkpoints")
        .join(cp_id)
        .join("memory.bin");
    let mut b = [0u8; 8];
    std::fs::File::open(&mem)
        .unwrap()
        .read_exact_at(&mut b, 0x80000 + 8)
        .unwrap();
    u64::from_le_bytes(b)
}

fn passes(stop_answer: &str) -> u64 {
    stop_answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("passes="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no passes in {stop_answer:?}"))
}

/// `checkpoint apply --keep-running` of a running probe VM: the same worker goes on from the
/// checkpoint — memory verifies as then, the disk reads the pattern of then, the dirty
/// workload that ran then runs again and its counter continues from the saved value — new
/// writes work, and it can be applied again. A checkpoint of other hardware (a disk
/// hot-added since) is refused with the VM running on untouched.
#[test]
fn keep_running_reverts_a_running_probe_vm_in_its_own_worker() {
    let Some(bin) = worker_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start_with(&tmp.path().join("state"), &bin);
    let base = tmp.path().join("kip-base.vhdx");
    let opts = CreateOptions {
        size: 16 << 20,
        block_size: 1 << 20,
        ..CreateOptions::default()
    };
    drop(Vhdx::create(&base, &opts).unwrap());
    let vm = d.create(&json!({
        "version": 1, "name": "kip", "vcpus": 1, "memory_bytes": 64 << 20,
        "kernel": probe_elf(), "cmdline": "console=ttyS0", "shutdown_line": "POWEROFF",
        "disks": [{ "path": base }],
    }));
    d.start_vm("kip");
    wait_ready(&d, "kip");
    let first = pid(&d, &vm);
    let mut c = console(&d, "kip");
    ok(&mut c, "DISK 0 WRITE 0 64 1");
    ok(&mut c, "DISK 0 FLUSH");
    ok(&mut c, "MEM FILL 16 8 1");
    ok(&mut c, "DIRTY START 40 1 0");
    drop(c);
    job(
        &d,
        d.post_json("/v1/vms/kip/checkpoints", &json!({"name": "c1"})),
    );
    let at_checkpoint = saved_passes(&d, &vm, "c1");
    assert!(at_checkpoint > 0, "the workload ran before the checkpoint");

    // After it: pattern B on disk and in memory, the workload stopped.
    let mut c = console(&d, "kip");
    ok(&mut c, "DISK 0 WRITE 0 64 2");
    ok(&mut c, "DISK 0 FLUSH");
    ok(&mut c, "MEM FILL 16 8 2");
    ok(&mut c, "DIRTY STOP");
    drop(c);

    let mut prev = PathBuf::from(
        d.show("/v1/vms/kip")["spec"]["disks"][0]["path"]
            .as_str()
            .unwrap(),
    );
    for round in 0..2 {
        job(
            &d,
            d.post_json(
                "/v1/vms/kip/checkpoints/c1/apply",
                &json!({"keep_running": true}),
            ),
        );
        assert_eq!(d.state("kip"), "running", "{round}");
        assert_eq!(pid(&d, &vm), first, "{round}: the same worker");
        let mut c = console(&d, "kip");
        ok(&mut c, "MEM VERIFY 16 8 1");
        ok(&mut c, "DISK 0 VERIFY 0 64 1");
        if round == 1 {
            let r = c.command("DISK 0 VERIFY 128 64 3", T);
            assert!(
                format!("{r:?}").contains("mismatch"),
                "written after the checkpoint: {r:?}"
            );
        }
        // The workload of then runs again (it was stopped before the apply), counting on
        // from the checkpoint's passes.
        let again = passes(&ok(&mut c, "DIRTY STOP"));
        assert!(again >= at_checkpoint, "{round}: {again} < {at_checkpoint}");
        ok(&mut c, "DISK 0 WRITE 128 64 3");
        ok(&mut c, "DISK 0 VERIFY 128 64 3");
        ok(&mut c, "MEM FILL 16 8 3");
        drop(c);
        let shown = d.show("/v1/vms/kip/checkpoints/c1");
        assert_eq!(shown["current"], true, "{shown}");
        let top = PathBuf::from(
            d.show("/v1/vms/kip")["spec"]["disks"][0]["path"]
                .as_str()
                .unwrap(),
        );
        assert_ne!(top, prev, "{round}: a new child");
        assert!(!prev.exists(), "{round}: the discarded child went");
        prev = top;
    }

    // Other hardware since (a disk hot-added): refused, the VM runs on untouched.
    let data = tmp.path().join("kip-data.img");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let r = d.post_json(
        "/v1/vms/kip/disks",
        &json!({"path": data, "read_only": true}),
    );
    assert!(
        r.status == 201 || r.status == 200,
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    let r = d.post_json(
        "/v1/vms/kip/checkpoints/c1/apply",
        &json!({"keep_running": true}),
    );
    let why = r.assert_error(409, "conflict");
    assert!(why.contains("disks") && why.contains("--stop"), "{why}");
    assert_eq!(pid(&d, &vm), first);
    let mut c = console(&d, "kip");
    ok(&mut c, "MEM VERIFY 16 8 3");
    ok(&mut c, "DISK 0 VERIFY 128 64 3");
    drop(c);
    assert_eq!(d.post("/v1/vms/kip/turn-off").status, 200);
    let info = Vhdx::open(&prev, &vireo_vhdx::OpenOptions::read_only())
        .unwrap()
        .info();
    assert_eq!(
        info.parent.unwrap().path.canonicalize().unwrap(),
        base.canonicalize().unwrap(),
        "a child of the frozen file"
    );
    chain_clean(&d, "kip");
}

/// The switch process vireod runs for each switch, beside it (a recorded skip if not built).
fn switch_bin() -> Option<PathBuf> {
    let bin = Path::new(VIREOD).with_file_name("vireo-switch");
    (bin.is_file()
        || vireo_testkit::skip(&format!(
            "{} (cargo build --release -p vireo-switchd)",
            bin.display()
        )))
    .then_some(bin)
}

const MAC_VM: [u8; 6] = [0x52, 0x54, 0x00, 0xa1, 0x00, 0x01];
const MAC_PEER: [u8; 6] = [0x52, 0x54, 0x00, 0xa1, 0x00, 0x02];

fn mac_text(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// `vm` echoes `n` frames that `peer` sends it through the switch; `peer` gets every one back,
/// MACs swapped, in order. Neither may have another frame waiting.
fn echo_through_switch(vm: &mut ProbeConsole, peer: &mut ProbeConsole, round: u8, n: u8) {
    vm.send_line(&format!("NET 0 ECHO {n} 20000")).unwrap();
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| tagged_frame(MAC_VM, MAC_PEER, round * 16 + i))
        .collect();
    for f in &frames {
        peer.net_send(0, f).unwrap();
    }
    for (i, f) in frames.iter().enumerate() {
        let want = [&f[6..12], &f[..6], &f[12..]].concat();
        let got = ok(peer, "NET 0 RECV 10000");
        let got = decode_hex(got.trim_start_matches("OK").trim()).unwrap();
        assert_eq!(got[..want.len()], want[..], "round {round}, frame {i}");
    }
    assert_eq!(
        vm.answer(T).unwrap(),
        format!("OK echoed={n}"),
        "round {round}"
    );
}

/// `checkpoint apply --keep-running` of a VM whose NIC is on a switch (vhost-user, as every
/// vireod NIC): frames flow through the switch before the checkpoint, after it and after the
/// apply; the same worker runs on from the checkpoint (memory and the workload's counter as
/// then). Then, paused: the apply leaves it paused, and a checkpoint taken a second later holds
/// exactly the first checkpoint's counter (the guest did not run); resumed, the counter moves
/// on from there and the NIC still works.
#[test]
fn keep_running_reverts_a_vm_on_a_switch_and_a_paused_one_stays_paused() {
    let Some(bin) = worker_bin() else { return };
    if switch_bin().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start_with(&tmp.path().join("state"), &bin);
    let r = d.post_json(
        "/v1/switches",
        &json!({"name": "lan", "kind": {"type": "private"}}),
    );
    assert!(
        r.status == 201 || r.status == 200,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let spec = |name: &str, mac: [u8; 6]| {
        json!({
            "version": 1, "name": name, "vcpus": 1, "memory_bytes": 64 << 20,
            "kernel": probe_elf(), "cmdline": "console=ttyS0", "shutdown_line": "POWEROFF",
            "nics": [{"switch": "lan", "mac": mac_text(mac)}],
        })
    };
    let vm = d.create(&spec("kn", MAC_VM));
    d.create(&spec("peer", MAC_PEER));
    d.start_vm("kn");
    d.start_vm("peer");
    wait_ready(&d, "kn");
    wait_ready(&d, "peer");
    let first = pid(&d, &vm);
    let mut peer = console(&d, "peer");
    let mut c = console(&d, "kn");
    echo_through_switch(&mut c, &mut peer, 1, 4);
    ok(&mut c, "MEM FILL 16 8 1");
    ok(&mut c, "DIRTY START 40 1 0");
    drop(c);
    job(
        &d,
        d.post_json("/v1/vms/kn/checkpoints", &json!({"name": "c1"})),
    );
    let at_checkpoint = saved_passes(&d, &vm, "c1");
    assert!(at_checkpoint > 0, "the workload ran before the checkpoint");

    // After it: frames through the switch, memory rewritten, the workload stopped.
    let mut c = console(&d, "kn");
    echo_through_switch(&mut c, &mut peer, 2, 4);
    ok(&mut c, "MEM FILL 16 8 2");
    ok(&mut c, "DIRTY STOP");
    drop(c);
    job(
        &d,
        d.post_json(
            "/v1/vms/kn/checkpoints/c1/apply",
            &json!({"keep_running": true}),
        ),
    );
    assert_eq!(d.state("kn"), "running");
    assert_eq!(pid(&d, &vm), first, "the same worker");
    let mut c = console(&d, "kn");
    ok(&mut c, "MEM VERIFY 16 8 1");
    // The workload of then runs again, counting on from the checkpoint's passes.
    let again = passes(&ok(&mut c, "DIRTY STOP"));
    assert!(again >= at_checkpoint, "{again} < {at_checkpoint}");
    echo_through_switch(&mut c, &mut peer, 3, 4);
    ok(&mut c, "MEM FILL 16 8 3");
    drop(c);

    // Paused: the apply leaves it paused; the guest does not run until the resume.
    assert_eq!(d.post("/v1/vms/kn/pause").status, 200);
    job(
        &d,
        d.post_json(
            "/v1/vms/kn/checkpoints/c1/apply",
            &json!({"keep_running": true}),
        ),
    );
    assert_eq!(d.state("kn"), "paused");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(d.state("kn"), "paused");
    job(
        &d,
        d.post_json("/v1/vms/kn/checkpoints", &json!({"name": "c2"})),
    );
    assert_eq!(d.state("kn"), "paused", "a checkpoint keeps it paused");
    assert_eq!(
        saved_passes(&d, &vm, "c2"),
        at_checkpoint,
        "a second after the apply, the paused guest is where the checkpoint was"
    );
    assert_eq!(pid(&d, &vm), first, "the same worker");
    assert_eq!(d.post("/v1/vms/kn/resume").status, 200);
    let mut c = console(&d, "kn");
    ok(&mut c, "MEM VERIFY 16 8 1");
    std::thread::sleep(Duration::from_millis(200));
    let resumed = passes(&ok(&mut c, "DIRTY STOP"));
    assert!(
        resumed > at_checkpoint,
        "the counter moves on from the checkpoint's {at_checkpoint}: {resumed}"
    );
    echo_through_switch(&mut c, &mut peer, 4, 4);
    drop((c, peer));
    assert_eq!(d.post("/v1/vms/kn/turn-off").status, 200);
    assert_eq!(d.post("/v1/vms/peer/turn-off").status, 200);
}
