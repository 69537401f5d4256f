//! Fault runs with the real workers (`migrate_faults_real.rs`, `migrate_faults_real_modes.rs`):
//! a fresh probe VM per run, its migration, and the invariants checked after every run
//! ([`settled`]): the VM's record on exactly one vireod, `running` there with a live worker,
//! the job `completed` exactly when it is on the destination; nothing of it on the other (no
//! record, no VM directory, no worker process); the guest's memory sum and disk data intact,
//! the guest still running (its dirtying counter moved, `PING`) and not booted again.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::console::Console;
use super::migration::{job, trust_each_other, two_hosts, wait_for_end, Storage};
use super::Daemon;

/// Bound on every wait for something asynchronous to settle.
pub const T: Duration = Duration::from_secs(60);

static RUNS: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Where {
    Source,
    Destination,
}

/// One fault run per cut point (`run(k, n)`, k counting from 1, after the uncut run 0):
/// how many times the VM stayed on the source and moved, printed under `what` with `total`,
/// the uncut run's bytes.
pub fn sweep(
    what: &str,
    total: u64,
    points: &[u64],
    mut run: impl FnMut(usize, u64) -> Where,
) -> [usize; 2] {
    let mut seen = [0; 2];
    for (k, &n) in points.iter().enumerate() {
        seen[run(k + 1, n) as usize] += 1;
    }
    eprintln!(
        "{what}: {} runs over {total} bytes; the VM stayed on the source {}, moved {}",
        points.len() + 1,
        seen[0],
        seen[1]
    );
    seen
}

/// Two vireods as [`pair`], the destination's workers' streams routed through a proxy of the
/// test's: `VIREO_TEST_WORKER_ROUTE` names a file the test writes before each run (`PORT
/// ADDR`: its worker listens on `PORT`, the source is told the proxy's `ADDR`).
pub fn routed_pair() -> Option<(Daemon, Daemon, tempfile::TempDir)> {
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

/// A free port on loopback for a destination worker to listen on (bound and let go: the
/// worker binds it again).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Restarts `b` with a fixed migration port, as a real host has (a restarted destination must
/// be found where the source asks again), and `env` for this run of it only.
pub fn restart_on_a_fixed_port(b: &mut Daemon, env: &[(&str, &str)]) {
    b.kill9();
    let listen = b
        .args
        .iter()
        .position(|x| x == "--migration-listen")
        .unwrap()
        + 1;
    b.args[listen] = format!("127.0.0.1:{}", free_port());
    b.restart_env(env);
}

/// A VM set up for one run: what the guest holds, to check after the fault.
pub struct Run {
    pub name: String,
    pub id: String,
    pub source_pid: u64,
    pub sum: String,
}

/// What a run's fault allows beside the plain invariants.
#[derive(Clone, Copy, Default)]
pub struct Allow {
    /// The source vireod restarted: it failed the job it had (interrupted) whatever happened,
    /// so only the place is checked against the records.
    pub job_interrupted: bool,
    /// The VM that stayed on the source may run on a new worker (a quick migration restores
    /// it from its saved state).
    pub new_source_worker: bool,
}

pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two vireods on loopback sharing the disks' folder, trusting each other; `None` without KVM.
pub fn pair() -> Option<(Daemon, Daemon)> {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return None;
    }
    let (a, b) = two_hosts(Storage::Shared)?;
    trust_each_other(&a, &b);
    Some((a, b))
}

/// A fresh VM on `a`: 64 MiB, its own 4 MiB disk in the shared folder, sectors 0..512 and
/// guest memory 16..24 MiB filled with patterns, 8..12 MiB rewritten as fast as it can.
pub fn start_vm(a: &Daemon, name: &str) -> Run {
    start_vm_dirtying(a, name, HOT_SET_FLAT_OUT)
}

/// The guest's `DIRTY START` arguments of [`start_vm`]: 8..12 MiB, unthrottled.
const HOT_SET_FLAT_OUT: &str = "8 4 0";

/// The guest's `DIRTY START` arguments for a post-copy phase that lasts seconds: 8..16 MiB at
/// 1 MiB/s. A pre-copy pass held to 1 MiB/s takes ~12 s, so all 8 MiB are dirty at the
/// switch-over; the guest then fetches them on fault at its own 1 MiB/s (a flat-out hot set
/// is fetched in ~250 ms: requests are not held to `--bandwidth`).
pub const HOT_SET_SLOW: &str = "8 8 1";

/// [`start_vm`] with the guest rewriting `dirty` (`DIRTY START`'s start, length and MiB/s).
pub fn start_vm_dirtying(a: &Daemon, name: &str, dirty: &str) -> Run {
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
    c.ok(&format!("DIRTY START {dirty}"));
    Run {
        name: name.to_owned(),
        id: a.vm(name).identity.id.to_string(),
        source_pid: a.worker_pid(name),
        sum,
    }
}

/// `vireo vm migrate NAME --to TO ARGS.. --no-wait`: the job's id, or `None` when the
/// migration was refused before a job existed (e.g. the link cut during the first contact).
pub fn migrate(a: &Daemon, run: &Run, to: &str, args: &[&str]) -> Option<String> {
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

/// The job a restarted source vireod settles the VM's quick migration in (`migrate`, not
/// `old`, the interrupted one): its id, once it exists (it is made as vireod starts). Its
/// `vm_id` is the VM's, or none once the VM moved and its record went.
pub fn settling_job(a: &Daemon, run: &Run, old: &str) -> String {
    let mut found = None;
    wait_until("the job settling the quick migration", || {
        let jobs: Vec<serde_json::Value> =
            serde_json::from_str(&a.ok(&["job", "list", "--output", "json"])).unwrap();
        found = jobs
            .into_iter()
            .find(|j| {
                let vm = &j["vm_id"];
                j["kind"] == "migrate" && (vm.is_null() || vm == run.id.as_str()) && j["id"] != old
            })
            .and_then(|j| j["id"].as_str().map(str::to_owned));
        found.is_some()
    });
    found.unwrap()
}

/// The VM's record on `d`, if any.
pub fn record(d: &Daemon, run: &Run) -> Option<vireo_api::Vm> {
    let out = d.run(&["vm", "show", &run.name, "--output", "json"]);
    if out.status.success() {
        return Some(serde_json::from_slice(&out.stdout).unwrap());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no VM"), "vm show {}: {err}", run.name);
    None
}

/// Live processes whose `--vm-dir` is the VM's directory on `d` (its workers there).
pub fn workers_on(d: &Daemon, run: &Run) -> Vec<u32> {
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

/// Waits until the worker log of `run`'s VM on `d` holds `text` (a fault hook's line).
pub fn wait_for_worker_log(d: &Daemon, run: &Run, what: &str, text: &str) {
    let log = d
        .dir
        .path()
        .join("state/vms")
        .join(&run.id)
        .join("worker.log");
    wait_until(what, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains(text))
    });
}

pub fn alive(pid: u64) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// SIGKILL to a process this test's vireods started (a worker).
pub fn kill9(pid: u64) {
    // SAFETY: kill(2) of a worker process of this test's own vireods.
    let r = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert_eq!(r, 0, "kill {pid}: {}", std::io::Error::last_os_error());
}

pub fn tail(d: &Daemon) -> String {
    let log = std::fs::read_to_string(d.dir.path().join("vireod.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The invariants after a run (see the file's header); where the VM is. The VM is then
/// removed there so the pair can take the next run. `job_id` is `None` when no job began.
pub fn settled(a: &Daemon, b: &Daemon, run: &Run, job_id: Option<&str>, label: &str) -> Where {
    settled_as(a, b, run, job_id, label, Allow::default())
}

pub fn settled_as(
    a: &Daemon,
    b: &Daemon,
    run: &Run,
    job_id: Option<&str>,
    label: &str,
    allow: Allow,
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
    if allow.job_interrupted {
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
    if place == Where::Source && !allow.new_source_worker {
        assert_eq!(
            pid,
            run.source_pid,
            "the source worker was replaced\n{}",
            ctx()
        );
    } else if pid != run.source_pid {
        wait_until("the source worker gone", || !alive(run.source_pid));
    }
    // The same two checks find the VM here (so their "nothing" there means something).
    assert!(here.dir.path().join("state/vms").join(&run.id).is_dir());
    assert_eq!(workers_on(here, run), vec![pid as u32], "{}", ctx());
    nothing_there(there, run);
    check_guest(here, run, &ctx);
    let job_state = j.as_ref().map_or("none".into(), |j| j["state"].to_string());
    let error = j.as_ref().map_or(String::new(), |j| j["error"].to_string());
    eprintln!("fault run {n} [{label}]: on the {place:?}, job {job_state} {error}");
    here.ok(&["vm", "turn-off", &run.name]);
    here.ok(&["vm", "rm", &run.name]);
    place
}

/// No record (checked by the caller), no VM directory, no worker of the VM on `there`.
pub fn nothing_there(there: &Daemon, run: &Run) {
    let dir = there.dir.path().join("state/vms").join(&run.id);
    wait_until("no VM directory on the other side", || !dir.exists());
    wait_until("no worker on the other side", || {
        workers_on(there, run).is_empty()
    });
}

/// The guest on `here`: its memory and disk as they were, still running, not booted again.
pub fn check_guest(here: &Daemon, run: &Run, ctx: &dyn Fn() -> String) {
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
}

/// Starts a post-copy migration to `to` whose background push is held to `bandwidth`, and
/// waits until the source's job says the VM runs on the destination (`postcopy`).
pub fn in_postcopy(a: &Daemon, run: &Run, to: &str, bandwidth: &str) -> String {
    in_postcopy_with(a, run, to, &["--bandwidth", bandwidth])
}

/// [`in_postcopy`] with other `vireo vm migrate` arguments beside `--postcopy always`.
pub fn in_postcopy_with(a: &Daemon, run: &Run, to: &str, more: &[&str]) -> String {
    let mut args = vec!["--postcopy", "always"];
    args.extend_from_slice(more);
    let job_id = migrate(a, run, to, &args).expect("a migration job");
    let deadline = Instant::now() + T;
    loop {
        let j = job(a, &job_id);
        assert_eq!(j["state"], "running", "ended before post-copy: {j}");
        if j["migration"]["state"] == "postcopy" {
            eprintln!(
                "post-copy: {} bytes still on the source",
                j["migration"]["remaining_bytes"]
            );
            return job_id;
        }
        assert!(Instant::now() < deadline, "never in post-copy: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the job is still in post-copy (the strike landed in it).
pub fn still_postcopy(a: &Daemon, job_id: &str) -> bool {
    let j = job(a, job_id);
    j["state"] == "running" && j["migration"]["state"] == "postcopy"
}

/// The invariants after a VM lost in post-copy: one record, on the destination, `lost` with
/// the reason and no worker; nothing of it on the source; the job failed saying it was lost.
/// The lost VM is then acknowledged (`turn-off` → `off`) and removed. The record's reason.
pub fn settled_lost(a: &Daemon, b: &Daemon, run: &Run, job_id: &str) -> String {
    let j = wait_for_end(a, job_id, T);
    assert_eq!(j["state"], "failed", "{j}");
    let error = j["error"].as_str().unwrap_or_default();
    // From the worker's status ("was lost in the post-copy migration") or its exit ("ended on
    // the source …: the VM was lost in a post-copy migration"), whichever vireod heard first.
    assert!(
        error.contains("lost in") && error.contains("post-copy migration"),
        "{j}"
    );
    // Said in full if it never comes: whether the record is gone or still `incoming`, and
    // what each vireod logged (one run of 30+ failed here once, under a CI run's load).
    let deadline = Instant::now() + T;
    let vm = loop {
        match record(b, run) {
            Some(v) if v.state.name() != "incoming" => break v,
            other => assert!(
                Instant::now() < deadline,
                "never: the destination's record lost; it is {other:?}\njob: {j}\n\
                 destination vireod:\n{}\nsource vireod:\n{}",
                tail(b),
                tail(a)
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(vm.state.name(), "lost", "{vm:?}");
    let reason = vm.state.reason().unwrap_or_default();
    assert!(reason.contains("post-copy"), "{reason}");
    assert!(record(a, run).is_none(), "the source kept a record");
    nothing_there(a, run);
    wait_until("no worker on the destination", || {
        workers_on(b, run).is_empty()
    });
    eprintln!("post-copy, {}: lost ({reason}); job: {error}", run.name);
    b.ok(&["vm", "turn-off", &run.name]);
    assert_eq!(record(b, run).unwrap().state.name(), "off");
    b.ok(&["vm", "rm", &run.name]);
    reason.to_owned()
}
