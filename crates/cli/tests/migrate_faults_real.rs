//! End to end, under KVM: the fault runs of `crates/hostd/tests/migrate_faults.rs` with the
//! real workers (`vireo-vm`) and the probe guest instead of the fake worker (issue 12, "How it
//! is proved"). Two vireods on loopback sharing the disks' folder; each run migrates a fresh
//! VM whose guest keeps rewriting 4 MiB while the fault strikes:
//! - the vireods' link cut (both directions, every connection) after N bytes through a proxy,
//!   N swept over an uncut migration's bytes on that link;
//! - the destination vireod SIGKILLed in pre-copy and restarted;
//! - the source vireod SIGKILLed in pre-copy and restarted (its worker lives on and is
//!   re-adopted).
//!
//! After every run ([`settled`]): the VM's record is on exactly one vireod, `running` there
//! with a live worker (the very same one if it stayed on the source), the job `completed`
//! exactly when it is on the destination; nothing of it on the other (no record, no VM
//! directory, no worker process); the guest's memory sum and disk data intact, the guest
//! still running (its dirtying counter moved, `PING`) and not booted again.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::migration::{
    job, migration_address, trust_each_other, two_hosts, wait_for_end, wait_for_progress, Storage,
};
use vireod_harness::Daemon;

// The fake-worker suite's proxy (it cuts after N bytes, both directions counted); only its
// fixed-target mode is used here.
#[allow(dead_code)]
#[path = "../../hostd/tests/migrate_faults/proxy.rs"]
mod proxy;
use proxy::{Proxy, Target};

/// Bound on every wait for something asynchronous to settle.
const T: Duration = Duration::from_secs(60);

static RUNS: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Where {
    Source,
    Destination,
}

/// A VM set up for one run: what the guest holds, to check after the fault.
struct Run {
    name: String,
    id: String,
    source_pid: u64,
    sum: String,
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh VM on `a`: 64 MiB, its own 4 MiB disk in the shared folder, sectors 0..512 and
/// guest memory 16..24 MiB filled with patterns, 8..12 MiB rewritten as fast as it can.
fn start_vm(a: &Daemon, name: &str) -> Run {
    let disk = format!("{name}.img");
    std::fs::write(a.dir.path().join(&disk), vec![0u8; 4 << 20]).unwrap();
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    a.ok(&[
        "vm", "create", name, "--kernel", &kernel, "--memory", "64M", "--disk", &disk,
    ]);
    a.ok(&["vm", "start", name]);
    let mut c = Console::attach(a, name);
    c.ok("DISK 0 WRITE 0 512 5");
    c.ok("MEM FILL 16 8 9");
    let sum = c.ok("MEM SUM 16 8");
    c.ok("DIRTY START 8 4 0");
    Run {
        name: name.to_owned(),
        id: a.vm(name).identity.id.to_string(),
        source_pid: a.worker_pid(name),
        sum,
    }
}

/// `vireo vm migrate NAME --to TO ARGS.. --no-wait`: the job's id, or `None` when the
/// migration was refused before a job existed (e.g. the link cut during the first contact).
fn migrate(a: &Daemon, run: &Run, to: &str, args: &[&str]) -> Option<String> {
    let mut all = vec!["vm", "migrate", &run.name, "--to", to];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--no-wait", "--output", "json"]);
    let out = a.run(&all);
    if !out.status.success() {
        eprintln!("migrate refused: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let started: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Some(started["id"].as_str().unwrap().to_owned())
}

/// The VM's record on `d`, if any.
fn record(d: &Daemon, run: &Run) -> Option<vireo_api::Vm> {
    let out = d.run(&["vm", "show", &run.name, "--output", "json"]);
    if out.status.success() {
        return Some(serde_json::from_slice(&out.stdout).unwrap());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no VM"), "vm show {}: {err}", run.name);
    None
}

/// Live processes whose `--vm-dir` is the VM's directory on `d` (its workers there).
fn workers_on(d: &Daemon, run: &Run) -> Vec<u32> {
    let dir = d.dir.path().join("state/vms").join(&run.id);
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_its_worker = args.windows(2).any(|w| {
            w[0] == b"--vm-dir" && Path::new(std::str::from_utf8(w[1]).unwrap_or("")) == dir
        });
        if is_its_worker {
            pids.push(pid);
        }
    }
    pids
}

fn alive(pid: u64) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

fn tail(d: &Daemon) -> String {
    let log = std::fs::read_to_string(d.dir.path().join("vireod.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The invariants after a run (see the file's header); where the VM is. The VM is then
/// removed there so the pair can take the next run. `job_id` is `None` when no job began.
/// A source vireod that restarted failed the job it had (interrupted) whatever happened:
/// then (`job_interrupted`) only the place is checked against the records.
fn settled(a: &Daemon, b: &Daemon, run: &Run, job_id: Option<&str>, label: &str) -> Where {
    settled_as(a, b, run, job_id, label, false)
}

fn settled_as(
    a: &Daemon,
    b: &Daemon,
    run: &Run,
    job_id: Option<&str>,
    label: &str,
    job_interrupted: bool,
) -> Where {
    let n = RUNS.fetch_add(1, Ordering::SeqCst) + 1;
    let j = job_id.map(|id| wait_for_end(a, id, T));
    let ctx = || {
        format!(
            "[{label}] job {j:?}\n--- A:\n{}\n--- B:\n{}",
            tail(a),
            tail(b)
        )
    };
    // The destination must not stay `incoming`: it settles on its own.
    wait_until("the destination settled", || {
        record(b, run).is_none_or(|v| v.state.name() != "incoming")
    });
    let place = match (record(a, run), record(b, run)) {
        (Some(_), None) => Where::Source,
        (None, Some(_)) => Where::Destination,
        (x, y) => panic!(
            "the VM is in {} places: {x:?} {y:?}\n{}",
            x.is_some() as u8 + y.is_some() as u8,
            ctx()
        ),
    };
    let completed = j.as_ref().is_some_and(|j| j["state"] == "completed");
    if job_interrupted {
        assert!(!completed, "{}", ctx());
    } else {
        assert_eq!(
            completed,
            place == Where::Destination,
            "the job and the VM's place disagree\n{}",
            ctx()
        );
    }
    let (here, there) = match place {
        Where::Source => (a, b),
        Where::Destination => (b, a),
    };
    let vm = record(here, run).unwrap();
    assert_eq!(vm.state.name(), "running", "{vm:?}\n{}", ctx());
    let pid = here.worker_pid(&run.name);
    assert!(alive(pid), "the running VM's worker is gone\n{}", ctx());
    if place == Where::Source {
        assert_eq!(
            pid,
            run.source_pid,
            "the source worker was replaced\n{}",
            ctx()
        );
    } else {
        wait_until("the source worker gone", || !alive(run.source_pid));
    }
    // The same two checks find the VM here (so their "nothing" there means something).
    assert!(here.dir.path().join("state/vms").join(&run.id).is_dir());
    assert_eq!(workers_on(here, run), vec![pid as u32], "{}", ctx());
    // Nothing left on the other side: no record (above), no directory, no worker.
    let dir = there.dir.path().join("state/vms").join(&run.id);
    wait_until("no VM directory on the other side", || !dir.exists());
    wait_until("no worker on the other side", || {
        workers_on(there, run).is_empty()
    });
    // The guest: its memory and disk as they were, still running, not booted again.
    let mut c = Console::attach(here, &run.name);
    assert_eq!(c.ok("MEM SUM 16 8"), run.sum, "{}", ctx());
    c.ok("DISK 0 VERIFY 0 512 5");
    let stop = c.ok("DIRTY STOP");
    assert!(!stop.ends_with(" pages=0"), "{stop}");
    c.ok("PING");
    c.ok("DISK 0 WRITE 1024 64 6");
    c.ok("DISK 0 FLUSH");
    c.ok("DISK 0 VERIFY 1024 64 6");
    drop(c);
    let log = here.ok(&["vm", "console", &run.name, "--log"]);
    assert!(
        log.matches("PROBE READY").count() <= 1,
        "the guest booted again: {log}"
    );
    let job_state = j.as_ref().map_or("none".into(), |j| j["state"].to_string());
    let error = j.as_ref().map_or(String::new(), |j| j["error"].to_string());
    eprintln!("fault run {n} [{label}]: on the {place:?}, job {job_state} {error}");
    here.ok(&["vm", "turn-off", &run.name]);
    here.ok(&["vm", "rm", &run.name]);
    place
}

fn pair() -> Option<(Daemon, Daemon)> {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return None;
    }
    let (a, b) = two_hosts(Storage::Shared)?;
    trust_each_other(&a, &b);
    Some((a, b))
}

/// One migration through a proxy on the vireods' link that cuts it after `n` bytes; where the
/// VM ended and the bytes the link carried.
fn link_cut_run(a: &Daemon, b: &Daemon, i: usize, n: u64) -> (Where, u64) {
    let to: std::net::SocketAddr = migration_address(b).parse().unwrap();
    let px = Proxy::start(Target::Fixed(to), n);
    let run = start_vm(a, &format!("l{i}"));
    let job_id = migrate(a, &run, &px.addr.to_string(), &[]);
    let place = settled(
        a,
        b,
        &run,
        job_id.as_deref(),
        &format!("link cut after {n} B"),
    );
    (place, px.passed())
}

#[test]
fn the_vireods_link_cut_after_n_bytes() {
    let Some((a, b)) = pair() else {
        return;
    };
    // Uncut: how many bytes a whole migration puts on the vireods' link.
    let (place, total) = link_cut_run(&a, &b, 0, u64::MAX);
    assert_eq!(place, Where::Destination);
    assert!(total > 1000, "{total}");
    // 16 points over the whole link (the TLS handshake, the offer and its answer), then
    // every 8th byte of the last 64 and the last byte: the destination's `running` after the
    // hand-over. (No byte crosses the link during pre-copy: see the run by time below.)
    let mut points: Vec<u64> = (0..16).map(|k| total * k / 16).collect();
    points.extend((1..=8).map(|k| total - 8 * k).rev());
    points.push(total - 1);
    let mut seen = [0; 2];
    for (k, &n) in points.iter().enumerate() {
        let (place, _) = link_cut_run(&a, &b, k + 1, n);
        seen[place as usize] += 1;
    }
    eprintln!(
        "link cut: {} runs over {total} bytes; the VM stayed on the source {}, moved {}",
        points.len() + 1,
        seen[0],
        seen[1]
    );
    assert!(seen[0] > 0, "{seen:?}");
}

/// The vireods' link cut by time while the workers copy the first pass (held to 1 MiB/s).
#[test]
fn the_vireods_link_cut_in_precopy() {
    let Some((a, b)) = pair() else {
        return;
    };
    for i in 0..2 {
        let to: std::net::SocketAddr = migration_address(&b).parse().unwrap();
        let px = Proxy::start(Target::Fixed(to), u64::MAX);
        let run = start_vm(&a, &format!("lp{i}"));
        let job_id = migrate(&a, &run, &px.addr.to_string(), &["--bandwidth", "1M"])
            .expect("a migration job");
        wait_for_progress(&a, &job_id, "transferred_bytes");
        px.cut_now();
        let place = settled(&a, &b, &run, Some(&job_id), "link cut in pre-copy");
        assert_eq!(place, Where::Source);
    }
}

/// Starts a migration held to 1 MiB/s and waits until its first pass moves.
fn in_precopy(a: &Daemon, b: &Daemon, run: &Run) -> String {
    let to = migration_address(b);
    let job_id = migrate(a, run, &to, &["--bandwidth", "1M"]).expect("a migration job");
    wait_for_progress(a, &job_id, "transferred_bytes");
    job_id
}

#[test]
fn the_destination_vireod_killed_in_precopy_and_restarted() {
    let Some((a, mut b)) = pair() else {
        return;
    };
    for i in 0..2 {
        let run = start_vm(&a, &format!("dv{i}"));
        let job_id = in_precopy(&a, &b, &run);
        b.kill9();
        if i == 0 {
            // The source decides without it; then B comes back to its state.
            let j = wait_for_end(&a, &job_id, T);
            assert_eq!(j["state"], "failed", "{j}");
        }
        // Else back at once, its worker (which outlives it) perhaps still receiving.
        b.restart();
        let place = settled(&a, &b, &run, Some(&job_id), "destination vireod killed");
        assert_eq!(place, Where::Source);
    }
}

#[test]
fn the_source_vireod_killed_in_precopy_and_restarted() {
    let Some((mut a, b)) = pair() else {
        return;
    };
    for i in 0..2 {
        let run = start_vm(&a, &format!("sv{i}"));
        let job_id = in_precopy(&a, &b, &run);
        a.kill9();
        if i == 0 {
            // The destination gives up without its peer; the source worker runs on.
            wait_until("the destination gave up", || record(&b, &run).is_none());
            assert!(alive(run.source_pid));
        }
        // Else back at once: it re-adopts a worker that may still be migrating.
        a.restart();
        let j = job(&a, &job_id);
        assert_ne!(j["state"], "completed", "{j}");
        let place = settled(&a, &b, &run, Some(&job_id), "source vireod killed");
        assert_eq!(place, Where::Source);
    }
}

/// Starts a migration that pauses the guest after its first pass and sends the hot set at
/// 4 MiB/s uncompressed (about 1 s of switch-over), and waits until the guest is paused.
fn in_switchover(a: &Daemon, b: &Daemon, run: &Run) -> String {
    let to = migration_address(b);
    let args = [
        "--bandwidth",
        "2M",
        "--max-downtime",
        "10s",
        "--compress",
        "none",
    ];
    let job_id = migrate(a, run, &to, &args).expect("a migration job");
    let deadline = Instant::now() + T;
    loop {
        let j = job(a, &job_id);
        assert_eq!(j["state"], "running", "ended before the switch-over: {j}");
        // The worker reports `switching` only once the paused guest's last pages are sent;
        // the pause itself is the round after the first pass (the estimate fits at once).
        let m = &j["migration"];
        if m["state"] == "switching" || m["round"].as_u64().unwrap_or(0) >= 1 {
            return job_id;
        }
        assert!(Instant::now() < deadline, "never switching: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The destination's worker SIGKILLed while the source sends the paused guest's last pages:
/// the source must resume it.
#[test]
fn the_destination_worker_killed_in_the_switch_over() {
    let Some((a, b)) = pair() else {
        return;
    };
    let run = start_vm(&a, "dw");
    let job_id = in_switchover(&a, &b, &run);
    let pid = b.worker_pid(&run.name);
    // SAFETY: kill(2) of the destination's worker, a process this test's vireod started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let place = settled(
        &a,
        &b,
        &run,
        Some(&job_id),
        "destination worker killed, switching",
    );
    assert_eq!(place, Where::Source);
}

/// The destination vireod SIGKILLed in the switch-over (the guest paused): the source
/// decides without it, and the restarted vireod keeps nothing it does not run.
#[test]
fn the_destination_vireod_killed_in_the_switch_over() {
    let Some((a, mut b)) = pair() else {
        return;
    };
    let run = start_vm(&a, "dvs");
    let job_id = in_switchover(&a, &b, &run);
    b.kill9();
    let j = wait_for_end(&a, &job_id, T);
    eprintln!("the job, the destination vireod down: {j}");
    b.restart();
    settled(
        &a,
        &b,
        &run,
        Some(&job_id),
        "destination vireod killed, switching",
    );
}

/// The source vireod SIGKILLed in the switch-over (the guest paused): the workers and the
/// destination settle without it; the restarted vireod re-adopts its worker or lets the VM go.
///
/// Found a vireod bug (fixed in `daemon/adopt.rs`): vireod came back while its worker still
/// had the guest paused for the last pages, took that pause for the VM's and corrected the
/// record to `paused`; the worker's migration then failed and it resumed the guest, but the
/// record stayed `paused` for good.
#[test]
fn the_source_vireod_killed_in_the_switch_over() {
    let Some((mut a, b)) = pair() else {
        return;
    };
    let run = start_vm(&a, "svs");
    let job_id = in_switchover(&a, &b, &run);
    a.kill9();
    // The destination decides alone: its worker cancelled (the VM resumes here) or, once
    // the hand-over began, the VM runs there and ours exits.
    wait_until("the destination decided", || {
        record(&b, &run).is_none_or(|v| v.state.name() == "running")
    });
    a.restart();
    settled_as(
        &a,
        &b,
        &run,
        Some(&job_id),
        "source vireod killed, switching",
        true,
    );
}

/// Two vireods as [`pair`], the destination's workers' streams routed through a proxy of the
/// test's: `VIREO_TEST_WORKER_ROUTE` names a file the test writes before each run (`PORT
/// ADDR`: its worker listens on `PORT`, the source is told the proxy's `ADDR`).
fn routed_pair() -> Option<(Daemon, Daemon, tempfile::TempDir)> {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return None;
    }
    let route = tempfile::tempdir().unwrap();
    let file = route.path().join("route");
    let listen = ["--migration-listen", "127.0.0.1:0"];
    let a = Daemon::start_args(&listen)?;
    let a_dir = a.dir.path().to_str().unwrap().to_owned();
    let b = Daemon::start_args_env(
        &[listen[0], listen[1], "--storage-root", &a_dir],
        &[("VIREO_TEST_WORKER_ROUTE", file.to_str().unwrap())],
    )?;
    trust_each_other(&a, &b);
    Some((a, b, route))
}

/// One migration whose workers' streams (every one, both directions counted) are cut after
/// `n` bytes; where the VM ended and the bytes the streams carried.
fn stream_cut_run(a: &Daemon, b: &Daemon, route: &Path, i: usize, n: u64) -> (Where, u64) {
    // A free port for the destination worker (bound and let go: the worker binds it again).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let px = Proxy::start(Target::Fixed(([127, 0, 0, 1], port).into()), n);
    std::fs::write(route.join("route"), format!("{port} {}", px.addr)).unwrap();
    let run = start_vm(a, &format!("w{i}"));
    let to = migration_address(b);
    // Pre-copy only: a cut after a post-copy switch-over loses the VM by design (the
    // post-copy fault runs check that case).
    let job_id = migrate(a, &run, &to, &["--postcopy", "never"]);
    let label = format!("workers' streams cut after {n} B");
    (settled(a, b, &run, job_id.as_deref(), &label), px.passed())
}

/// The workers' own link cut: the memory streams and the hand-over's lines on stream 0. A
/// real migration's byte count varies from run to run (the guest dirties memory as it likes),
/// so the points are spread over an uncut run's bytes and packed towards its end, where the
/// last pages, the device state and the hand-over go; whichever step each one hits, the VM
/// must end in exactly one place, whole.
#[test]
fn the_workers_streams_cut_after_n_bytes() {
    let Some((a, b, route)) = routed_pair() else {
        return;
    };
    let (place, total) = stream_cut_run(&a, &b, route.path(), 0, u64::MAX);
    assert_eq!(place, Where::Destination, "uncut, through the proxy");
    assert!(total > 4 << 20, "the streams carried only {total} bytes");
    let mut points: Vec<u64> = (0..8).map(|k| total * k / 8).collect();
    points.extend((1..=8).map(|k| total - (total / 200) * k).rev());
    points.extend([
        total - 4096,
        total - 1024,
        total - 256,
        total - 64,
        total - 1,
    ]);
    let mut seen = [0; 2];
    for (k, &n) in points.iter().enumerate() {
        let (place, _) = stream_cut_run(&a, &b, route.path(), k + 1, n);
        seen[place as usize] += 1;
    }
    eprintln!(
        "workers' streams cut: {} runs over ~{total} bytes; the VM stayed on the source {}, \
         moved {}",
        points.len() + 1,
        seen[0],
        seen[1]
    );
    assert!(seen[0] > 0, "{seen:?}");
}
