//! Fault injection for live migration between two vireods (issue 12 item 6, docs/migration.md
//! "Fault injection"), with the fake worker playing both workers (`tests/bin/fake_worker.rs`:
//! pre-copy rounds of page bytes, then the real hand-over's steps and a flock standing in for
//! the disk locks). Every run ends with `settled`, which asserts the invariants:
//! - the VM is in exactly one place: a record on one vireod only, and there (unless its worker
//!   was killed by the test) `running` with a live worker; the other side has no record, no VM
//!   directory and no worker;
//! - the job agrees: `completed` ⇔ the VM is on the destination;
//! - a migration that did not complete left the source's worker untouched (same pid, running);
//! - the "disk" lock is held by exactly the worker that runs the VM.
//!
//! The matrix: the vireods' link cut after N bytes (N swept over a whole migration), the
//! workers' stream cut after N bytes (swept, with and without the disk fence), the destination
//! worker killed (pre-copy, switch-over), the destination vireod SIGKILLed and restarted
//! (pre-copy, switch-over), the source worker killed (pre-copy, switch-over), the source vireod
//! SIGKILLed and restarted (pre-copy, switch-over), an untrusted host either way, a peer
//! speaking another protocol version; a quick migration's source vireod SIGKILLed after its
//! commit and settling the VM at its restart (the destination restores it, never got it, or
//! cannot be asked); VMs lost in post-copy (`migrate_faults/lost.rs`).

use crate::common;
mod lost;
mod proxy;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::daemon::{alive, signal, wait_until, Vireod};
use proxy::{Proxy, Target};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
/// Runs whose invariants were asserted so far in this process (printed with each run).
static RUNS: AtomicUsize = AtomicUsize::new(0);

struct Pair {
    tmp: tempfile::TempDir,
    a: Vireod,
    b: Vireod,
    b_addr: String,
}

fn trust(d: &Vireod, other: &Vireod, name: &str) {
    let fp = other.show("/v1/host/identity")["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = d.post_json(
        "/v1/host/trusted",
        &json!({"fingerprint": fp, "name": name}),
    );
    assert!(r.status == 201 || r.status == 200, "{:?}", r.json());
}

fn pair(a_trusts_b: bool, b_trusts_a: bool) -> Pair {
    pair_with(a_trusts_b, b_trusts_a, &[])
}

/// [`pair`] with more vireod arguments for A (the source).
fn pair_with(a_trusts_b: bool, b_trusts_a: bool, a_args: &[&str]) -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let fake = Path::new(env!("CARGO_BIN_EXE_vireo-fake-worker"));
    let listen = ["--migration-listen", "127.0.0.1:0"];
    let a_all: Vec<&str> = listen.iter().chain(a_args).copied().collect();
    let a = Vireod::start_args(&tmp.path().join("a"), fake, &a_all);
    let b = Vireod::start_args(&tmp.path().join("b"), fake, &listen);
    if a_trusts_b {
        trust(&a, &b, "host-b");
    }
    if b_trusts_a {
        trust(&b, &a, "host-a");
    }
    let b_addr = b.show("/v1/host/identity")["migration_listen"]
        .as_str()
        .unwrap()
        .to_owned();
    Pair { tmp, a, b, b_addr }
}

fn spec(name: &str, cmdline: &str) -> Value {
    common::daemon::spec_json(name, cmdline)
}

/// One run's VM: its name, id, lock file and the source worker's pid.
struct Run {
    name: String,
    id: String,
    lock: PathBuf,
    pid: u32,
}

fn start_vm(p: &Pair, name: &str, words: &str, fenced: bool) -> Run {
    let lock = p.tmp.path().join(format!("{name}.lock"));
    let mut cmdline = words.to_string();
    if fenced {
        cmdline = format!("{cmdline} fake.lock={}", lock.display());
    }
    let vm = p.a.create(&spec(name, &cmdline));
    p.a.start_vm(name);
    let id = vm["identity"]["id"].as_str().unwrap().to_owned();
    wait_until(T, "the source worker record", || {
        p.a.worker_record(&id).is_some()
    });
    let pid = p.a.worker_record(&id).unwrap().pid;
    Run {
        name: name.into(),
        id,
        lock,
        pid,
    }
}

fn migrate(p: &Pair, run: &Run, to: &str) -> String {
    let r = p.a.post_json(
        &format!("/v1/vms/{}/migrate", run.name),
        &json!({"to": to, "max_downtime_ms": 50}),
    );
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_owned()
}

fn job(d: &Vireod, id: &str) -> Value {
    d.show(&format!("/v1/jobs/{id}"))
}

/// Waits until the job ended (bounded) and returns it.
fn ended(d: &Vireod, id: &str) -> Value {
    let start = Instant::now();
    loop {
        let j = job(d, id);
        if j["state"] != "running" {
            return j;
        }
        assert!(start.elapsed() < T, "job never ended: {j}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn record(d: &Vireod, run: &Run) -> Option<Value> {
    let r = d.get(&format!("/v1/vms/{}", run.id));
    (r.status == 200).then(|| r.json())
}

/// Turns the run's VM off on `d` (a `lost` one: the user acknowledges the loss) and removes
/// its record, as a user would; `where` names the host in a timeout's message.
fn discard(d: &Vireod, run: &Run, r#where: &str) {
    let r = d.post(&format!("/v1/vms/{}/turn-off", run.id));
    assert!(r.status < 300, "{}", String::from_utf8_lossy(&r.body));
    wait_until(T, &format!("the VM off {where}"), || {
        record(d, run).is_some_and(|v| v["state"] == "off")
    });
    let r = d.request("DELETE", &format!("/v1/vms/{}", run.id), None);
    assert!(r.status < 300, "{}", String::from_utf8_lossy(&r.body));
}

/// Whether some process holds the run's "disk" lock.
fn lock_held(run: &Run) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::OpenOptions::new().write(true).open(&run.lock) else {
        return false;
    };
    // SAFETY: flock(2) on a file this test opened; released at once.
    let got = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if got {
        // SAFETY: as above; the test's own lock goes again.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
    }
    !got
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Where {
    Source,
    Destination,
}

/// What a fault may leave on the side that keeps the record: normally `running`; after the
/// test killed that side's worker, a record whose worker is gone.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Runs,
    /// The source's worker was killed by the test before the hand-over: the record stays
    /// here (`critical`), nothing runs anywhere, nothing on the destination.
    SourceKilled,
    /// A quick migration: the VM was saved (its worker gone), so where it runs it runs from
    /// a restore, in a new worker.
    Restored,
}

/// The invariants after a run (see the file's header); returns where the VM is, then removes
/// it there so the pair can take the next run.
fn settled(p: &Pair, run: &Run, job_id: &str, expect: Expect, fenced: bool) -> Where {
    RUNS.fetch_add(1, Ordering::SeqCst);
    let j = ended(&p.a, job_id);
    let ctx = || format!("job {j}\n--- A:\n{}\n--- B:\n{}", tail(&p.a), tail(&p.b));
    // The destination must not stay `incoming`: it settles on its own.
    wait_until(T, "the destination settled", || {
        record(&p.b, run).is_none_or(|v| v["state"] != "incoming")
    });
    let (on_a, on_b) = (record(&p.a, run), record(&p.b, run));
    let place = match (&on_a, &on_b) {
        (Some(_), None) => Where::Source,
        (None, Some(_)) => Where::Destination,
        (a, b) => panic!(
            "the VM is in {} places: {a:?} {b:?}\n{}",
            a.is_some() as u8 + b.is_some() as u8,
            ctx()
        ),
    };
    assert_eq!(
        j["state"] == "completed",
        place == Where::Destination,
        "the job and the VM's place disagree\n{}",
        ctx()
    );
    let (here, there) = match place {
        Where::Source => (&p.a, &p.b),
        Where::Destination => (&p.b, &p.a),
    };
    if expect == Expect::Restored {
        // A quick migration that failed after the save restores the VM here: give it time.
        wait_until(T, "the restored VM running", || {
            record(here, run).is_some_and(|v| v["state"] != "starting")
        });
    }
    let vm = record(here, run).unwrap();
    match (place, expect) {
        (Where::Source, Expect::SourceKilled) => {
            assert!(!alive(run.pid));
            assert_ne!(vm["state"], "running", "{vm}\n{}", ctx());
            if fenced {
                assert!(
                    !lock_held(run),
                    "the lock is held by nobody's VM\n{}",
                    ctx()
                );
            }
        }
        _ => {
            assert_eq!(vm["state"], "running", "{vm}\n{}", ctx());
            let w = here.worker_record(&run.id).expect("a worker record");
            assert!(alive(w.pid), "the running VM's worker is gone\n{}", ctx());
            if place == Where::Source {
                // Untouched: the very same worker (a quick migration's may be a restore),
                // not paused.
                if expect != Expect::Restored {
                    assert_eq!(w.pid, run.pid, "the source worker was replaced\n{}", ctx());
                }
                let st = here.show(&format!("/v1/vms/{}", run.id));
                assert_ne!(st["state"], "paused");
            } else {
                wait_until(T, "the source worker gone", || !alive(run.pid));
            }
            if fenced {
                assert!(lock_held(run), "nobody holds the disk lock\n{}", ctx());
            }
        }
    }
    // Nothing left on the other side: no record, no directory, no worker.
    let dir = there.state_dir.join("vms").join(&run.id);
    wait_until(T, "no VM directory left on the other side", || {
        !dir.exists()
    });
    // Remove the VM where it is, for the next run.
    let _ = here.post(&format!("/v1/vms/{}/turn-off", run.id));
    wait_until(T, "the VM off", || {
        record(here, run).is_none_or(|v| v["state"] != "running" && v["state"] != "stopping")
    });
    eprintln!(
        "fault run {} ({}): the VM is on the {place:?}",
        RUNS.load(Ordering::SeqCst),
        run.name
    );
    let r = here.request("DELETE", &format!("/v1/vms/{}", run.id), None);
    assert!(
        r.status < 300,
        "delete: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    place
}

fn tail(d: &Vireod) -> String {
    let log = d.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// A migration through a proxy on the vireods' link that cuts it after `n` bytes.
fn link_cut_run(p: &Pair, i: usize, n: u64) -> (Where, u64) {
    let b: std::net::SocketAddr = p.b_addr.parse().unwrap();
    let px = Proxy::start(Target::Fixed(b), n);
    let run = start_vm(p, &format!("l{i}"), "fake.migrate_ms=300", true);
    let job = migrate(p, &run, &px.addr.to_string());
    let err = job_error_when_ended(&p.a, &job);
    let place = settled(p, &run, &job, Expect::Runs, true);
    eprintln!("link cut after {n} bytes: {place:?} {err}");
    (place, px.passed())
}

/// A quick migration through a proxy on the vireods' link that cuts it after `n` bytes once
/// and then lets new connections through (a blip): a source that lost the answer to its
/// `Commit` asks the destination where the VM is instead of guessing.
fn quick_cut_run(p: &Pair, i: usize, n: u64) -> (Where, u64) {
    let b: std::net::SocketAddr = p.b_addr.parse().unwrap();
    let px = Proxy::start_healing(Target::Fixed(b), n);
    let run = start_vm(p, &format!("q{i}"), "", true);
    let r = p.a.post_json(
        &format!("/v1/vms/{}/migrate", run.name),
        &json!({"to": px.addr.to_string(), "quick": true}),
    );
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    let job = r.json()["id"].as_str().unwrap().to_owned();
    let err = job_error_when_ended(&p.a, &job);
    eprintln!("quick, link cut after {n} bytes: {err}");
    let place = settled(p, &run, &job, Expect::Restored, true);
    eprintln!("quick, link cut after {n} bytes: the VM is on the {place:?}");
    (place, px.passed())
}

#[test]
fn a_quick_migration_cut_after_n_bytes_runs_the_vm_in_one_place() {
    let p = pair(true, true);
    let (place, total) = quick_cut_run(&p, 0, u64::MAX);
    assert_eq!(place, Where::Destination);
    let mut seen = [0; 2];
    let steps = 24;
    for k in 0..steps {
        // Half over the whole, half over the last 120 bytes: the commit and its answer
        // (one TLS record each); a cut in the answer's last bytes leaves the VM there.
        let n = if k < steps / 2 {
            total * k / steps
        } else {
            total - (steps - k) * 10
        };
        let (place, _) = quick_cut_run(&p, k as usize + 1, n);
        seen[place as usize] += 1;
    }
    eprintln!(
        "quick link cut: {} runs over {total} bytes; VM stayed on the source {}, moved {}",
        steps + 1,
        seen[0],
        seen[1]
    );
    assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
}

/// The source loses the destination's answer to its commit and cannot reach it again (the
/// link stays cut): it asks for `--migration-answer-wait` (2 s here, 150 s by default), then
/// gives up with the VM **saved** here, never started on a guess, and the job says where it
/// may be. The destination, which had the commit, runs it: one VM running, in one place.
#[test]
fn a_quick_migration_whose_answer_is_lost_for_good_leaves_the_vm_saved_at_the_source() {
    let p = pair_with(true, true, &["--migration-answer-wait", "2"]);
    // The bytes of a whole quick migration, to cut inside the destination's last answer.
    let (place, total) = quick_cut_run(&p, 100, u64::MAX);
    assert_eq!(place, Where::Destination);

    let b: std::net::SocketAddr = p.b_addr.parse().unwrap();
    let px = Proxy::start(Target::Fixed(b), total - 10);
    let run = start_vm(&p, "lost", "", true);
    let r = p.a.post_json(
        &format!("/v1/vms/{}/migrate", run.name),
        &json!({"to": px.addr.to_string(), "quick": true}),
    );
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    let job_id = r.json()["id"].as_str().unwrap().to_owned();
    let asked = Instant::now();
    let j = ended(&p.a, &job_id);
    RUNS.fetch_add(1, Ordering::SeqCst);
    let error = j["error"].as_str().unwrap_or_default();
    eprintln!("answer lost for good, after {:?}: {error}", asked.elapsed());
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        error.contains("could not be asked since") && error.contains("stays saved here"),
        "{error}"
    );
    assert!(error.contains("vireo vm start"), "{error}");
    // Here: the record, saved, no worker. There: running, in the worker that restored it.
    let here = record(&p.a, &run).expect("the source keeps its record");
    assert_eq!(here["state"], "saved", "{here}");
    assert!(
        p.a.worker_record(&run.id).is_none(),
        "a worker runs it on the source"
    );
    wait_until(T, "the VM running on the destination", || {
        record(&p.b, &run).is_some_and(|v| v["state"] == "running")
    });
    assert!(lock_held(&run), "the destination's worker holds the disk");
}

/// Every fault that can hit before or during the switch-over is tried at each, twice.
const EACH_PHASE_TWICE: [Phase; 4] = [
    Phase::Precopy,
    Phase::Switching,
    Phase::Precopy,
    Phase::Switching,
];

#[test]
fn the_vireods_link_cut_after_n_bytes() {
    let p = pair(true, true);
    // Uncut: how many bytes a whole migration puts on the vireods' link.
    let (place, total) = link_cut_run(&p, 0, u64::MAX);
    assert_eq!(place, Where::Destination);
    assert!(total > 1000, "{total}");
    let mut seen = [0; 2];
    let steps = 40;
    for k in 0..steps {
        let n = total * k / (steps - 1);
        let n = if k == steps - 1 { total - 1 } else { n };
        let (place, _) = link_cut_run(&p, k as usize + 1, n);
        seen[place as usize] += 1;
    }
    eprintln!(
        "link cut: {} runs over {total} bytes; VM stayed on the source {}, moved {}",
        steps + 1,
        seen[0],
        seen[1]
    );
    // The sweep reached both outcomes (a cut early keeps it; a cut after the last byte of
    // the hand-over's confirmation cannot stop it).
    assert!(seen[0] > 0, "{seen:?}");
}

/// The vireods' link cut at a named phase (the byte sweep above mostly lands in the TLS
/// handshake and the offer: the migration's time is spent between two short lines).
#[test]
fn the_vireods_link_cut_at_a_phase() {
    let p = pair(true, true);
    let b: std::net::SocketAddr = p.b_addr.parse().unwrap();
    for (i, phase) in EACH_PHASE_TWICE.into_iter().enumerate() {
        let px = Proxy::start(Target::Fixed(b), u64::MAX);
        let run = start_vm(&p, &format!("lp{i}"), words(phase), true);
        let job = migrate(&p, &run, &px.addr.to_string());
        at_phase(&p, &job, phase);
        px.cut_now();
        let place = settled(&p, &run, &job, Expect::Runs, true);
        let want = match phase {
            Phase::Precopy => Where::Source,
            // The workers had begun the hand-over: it completes without the vireods' link,
            // and both vireods learn it from their own worker.
            Phase::Switching => Where::Destination,
        };
        assert_eq!(place, want, "{phase:?}");
    }
}

/// A migration whose workers' stream goes through a proxy cutting it after `n` bytes.
fn stream_cut_run(p: &Pair, i: usize, n: u64, fenced: bool) -> (Where, u64) {
    let px = Proxy::start(Target::Named, n);
    let words = format!(
        "fake.migrate_ms=300 fake.round_bytes=4096 fake.stream_proxy={}",
        px.addr
    );
    let run = start_vm(p, &format!("s{}{i}", fenced as u8), &words, fenced);
    let job = migrate(p, &run, &p.b_addr);
    let place = settled(p, &run, &job, Expect::Runs, fenced);
    (place, px.passed())
}

#[test]
fn the_workers_stream_cut_after_n_bytes() {
    let p = pair(true, true);
    for fenced in [true, false] {
        let (place, total) = stream_cut_run(&p, 0, u64::MAX, fenced);
        assert_eq!(place, Where::Destination);
        // The page rounds coarsely, then every byte of the hand-over's last lines
        // (`switch`, `applied`, `released`, `running`: 34 bytes).
        let mut ns: Vec<u64> = (0..8).map(|k| total * k / 8).collect();
        ns.extend((total.saturating_sub(40)..total).step_by(3));
        ns.push(total - 1);
        let mut seen = [0; 2];
        for (i, n) in ns.iter().enumerate() {
            let (place, _) = stream_cut_run(&p, i + 1, *n, fenced);
            seen[place as usize] += 1;
        }
        eprintln!(
            "stream cut (fenced {fenced}): {} runs over {total} bytes; source {}, destination {}",
            ns.len() + 1,
            seen[0],
            seen[1]
        );
        assert!(seen[0] > 0, "{seen:?}");
    }
}

/// The destination worker's pid (once B has it).
fn dest_pid(p: &Pair, run: &Run) -> u32 {
    wait_until(T, "the destination worker", || {
        p.b.worker_record(&run.id).is_some()
    });
    p.b.worker_record(&run.id).unwrap().pid
}

fn wait_phase(p: &Pair, job_id: &str, phase: &str) {
    wait_until(T, phase, || {
        let j = job(&p.a, job_id);
        j["migration"]["state"] == phase && j["migration"]["round"].as_u64().unwrap_or(0) > 0
            || (phase == "switching" && j["state"] != "running")
    });
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    Precopy,
    /// The destination worker holds the hand-over open (`fake.switch_ms`) after the source
    /// released the VM: the window where killing the wrong process loses the VM.
    Switching,
}

fn words(phase: Phase) -> &'static str {
    match phase {
        Phase::Precopy => "fake.migrate_ms=3000",
        Phase::Switching => "fake.migrate_ms=200 fake.switch_ms=1500",
    }
}

fn at_phase(p: &Pair, job_id: &str, phase: Phase) {
    match phase {
        Phase::Precopy => wait_phase(p, job_id, "precopy"),
        Phase::Switching => {
            wait_phase(p, job_id, "switching");
            // The source released; the destination sits in its switch-over.
            std::thread::sleep(Duration::from_millis(400));
        }
    }
}

#[test]
fn the_destination_worker_killed() {
    let p = pair(true, true);
    for (i, phase) in EACH_PHASE_TWICE.into_iter().enumerate() {
        let run = start_vm(&p, &format!("dw{i}"), words(phase), true);
        let job = migrate(&p, &run, &p.b_addr);
        let pid = dest_pid(&p, &run);
        at_phase(&p, &job, phase);
        signal(pid, libc::SIGKILL);
        let place = settled(&p, &run, &job, Expect::Runs, true);
        // Killed before it took the VM: the source keeps it (its lock came back to it).
        assert_eq!(place, Where::Source, "{phase:?}");
    }
}

#[test]
fn the_destination_vireod_killed_and_restarted() {
    let mut p = pair(true, true);
    for (i, phase) in EACH_PHASE_TWICE.into_iter().enumerate() {
        let run = start_vm(&p, &format!("dv{i}"), words(phase), true);
        let job = migrate(&p, &run, &p.b_addr);
        at_phase(&p, &job, phase);
        p.b.kill9();
        // Let the workers decide between them before B is back.
        let err = job_error_when_ended(&p.a, &job);
        eprintln!("destination vireod killed at {phase:?}: {err}");
        p.b.restart();
        // Its listener's port 0 picked another port.
        p.b_addr = p.b.show("/v1/host/identity")["migration_listen"]
            .as_str()
            .unwrap()
            .to_owned();
        let place = settled(&p, &run, &job, Expect::Runs, true);
        let want = match phase {
            Phase::Precopy => Where::Source,
            Phase::Switching => Where::Destination,
        };
        assert_eq!(place, want, "{phase:?}");
    }
}

#[test]
fn the_source_worker_killed() {
    let p = pair(true, true);
    for (i, phase) in EACH_PHASE_TWICE.into_iter().enumerate() {
        let run = start_vm(&p, &format!("sw{i}"), words(phase), true);
        let job = migrate(&p, &run, &p.b_addr);
        at_phase(&p, &job, phase);
        signal(run.pid, libc::SIGKILL);
        let (expect, want) = match phase {
            // Nothing of it runs anywhere: the record stays here, critical.
            Phase::Precopy => (Expect::SourceKilled, Where::Source),
            // The destination had everything and the disk: it runs there.
            Phase::Switching => (Expect::Runs, Where::Destination),
        };
        let place = settled(&p, &run, &job, expect, true);
        assert_eq!(place, want, "{phase:?}");
    }
}

#[test]
fn the_source_vireod_killed_and_restarted() {
    let mut p = pair(true, true);
    for (i, phase) in EACH_PHASE_TWICE.into_iter().enumerate() {
        let run = start_vm(&p, &format!("sv{i}"), words(phase), true);
        let job = migrate(&p, &run, &p.b_addr);
        at_phase(&p, &job, phase);
        p.a.kill9();
        // The workers settle between them; then A comes back.
        let want = match phase {
            Phase::Precopy => Where::Source,
            Phase::Switching => Where::Destination,
        };
        if want == Where::Destination {
            wait_until(T, "the source worker handed over", || !alive(run.pid));
        } else {
            wait_until(T, "the destination gave up", || {
                record(&p.b, &run).is_none()
            });
        }
        p.a.restart();
        // The job died with its vireod: it is failed after the restart (interrupted).
        let place = settled_after_source_restart(&p, &run, &job);
        assert_eq!(place, want, "{phase:?}");
    }
}

/// `settled` for a source vireod that restarted: its job was interrupted (failed) whatever
/// happened, so only the place is checked against the records.
fn settled_after_source_restart(p: &Pair, run: &Run, job_id: &str) -> Where {
    RUNS.fetch_add(1, Ordering::SeqCst);
    let j = ended(&p.a, job_id);
    assert_ne!(j["state"], "running");
    wait_until(T, "the destination settled", || {
        record(&p.b, run).is_none_or(|v| v["state"] != "incoming")
    });
    let ctx = || format!("job {j}\n--- A:\n{}\n--- B:\n{}", tail(&p.a), tail(&p.b));
    let (on_a, on_b) = (record(&p.a, run), record(&p.b, run));
    let (place, here) = match (&on_a, &on_b) {
        (Some(_), None) => (Where::Source, &p.a),
        (None, Some(_)) => (Where::Destination, &p.b),
        (a, b) => panic!("two or no records: {a:?} {b:?}\n{}", ctx()),
    };
    let vm = record(here, run).unwrap();
    assert_eq!(vm["state"], "running", "{vm}\n{}", ctx());
    let w = here.worker_record(&run.id).unwrap();
    assert!(alive(w.pid));
    assert!(lock_held(run));
    if place == Where::Source {
        assert_eq!(w.pid, run.pid);
    }
    let _ = here.post(&format!("/v1/vms/{}/turn-off", run.id));
    place
}

/// A pair whose destination holds each quick arrival 2 s between the commit and the restore
/// (`VIREO_TEST_QUICK_RESTORE_DELAY_MS`) and listens on the same port across its restarts
/// (the source's note names it).
fn pair_holding_restores() -> Pair {
    let mut p = pair(true, true);
    p.b.kill9();
    p.b.extra_args = vec!["--migration-listen".into(), p.b_addr.clone()];
    p.b.extra_env = vec![("VIREO_TEST_QUICK_RESTORE_DELAY_MS".into(), "2000".into())];
    p.b.restart();
    p
}

/// A quick migration of a fresh VM (with the fake worker's `words`) whose source vireod is
/// SIGKILLed once its `commit` went out (the destination holds the restore); the job's id. The
/// source stays down.
fn source_killed_after_commit(p: &mut Pair, name: &str, words: &str) -> (Run, String) {
    let run = start_vm(p, name, words, true);
    let r = p.a.post_json(
        &format!("/v1/vms/{}/migrate", run.name),
        &json!({"to": p.b_addr, "quick": true}),
    );
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    let job_id = r.json()["id"].as_str().unwrap().to_owned();
    wait_until(T, "the commit sent", || {
        let j = job(&p.a, &job_id);
        assert_eq!(j["state"], "running", "ended before the commit: {j}");
        j["migration"]["phases"]
            .as_array()
            .is_some_and(|ph| ph.iter().any(|ph| ph["name"] == "commit sent"))
    });
    p.a.kill9();
    (run, job_id)
}

/// The job the restarted source settles the VM's quick migration in: its only migration job
/// but `old` (its VM may be gone already, and the job's `vm_id` with it).
fn settling_job(p: &Pair, old: &str) -> String {
    let mut found = None;
    wait_until(T, "the job settling the quick migration", || {
        let jobs = p.a.show("/v1/jobs");
        found = jobs.as_array().unwrap().iter().find_map(|j| {
            (j["kind"] == "migrate" && j["id"] != old).then(|| j["id"].as_str().unwrap().to_owned())
        });
        found.is_some()
    });
    found.unwrap()
}

/// After a settled quick migration: the VM's record on exactly one side, `running` there in a
/// live worker holding the disk, nothing of it on the other; the settling job `completed`
/// exactly when it moved. Removes the VM; where it was.
fn settled_quick(p: &Pair, run: &Run, settling: &Value) -> Where {
    RUNS.fetch_add(1, Ordering::SeqCst);
    let ctx = || format!("{settling}\n--- A:\n{}\n--- B:\n{}", tail(&p.a), tail(&p.b));
    let place = match (record(&p.a, run), record(&p.b, run)) {
        (Some(_), None) => Where::Source,
        (None, Some(_)) => Where::Destination,
        (a, b) => panic!("two or no records: {a:?} {b:?}\n{}", ctx()),
    };
    assert_eq!(
        settling["state"] == "completed",
        place == Where::Destination,
        "{}",
        ctx()
    );
    let (here, there) = match place {
        Where::Source => (&p.a, &p.b),
        Where::Destination => (&p.b, &p.a),
    };
    wait_until(T, "the VM running", || {
        record(here, run).is_some_and(|v| v["state"] == "running")
    });
    let w = here.worker_record(&run.id).expect("a worker record");
    assert!(alive(w.pid) && lock_held(run), "{}", ctx());
    let dir = there.state_dir.join("vms").join(&run.id);
    wait_until(T, "no VM directory on the other side", || !dir.exists());
    let _ = here.post(&format!("/v1/vms/{}/turn-off", run.id));
    place
}

/// The source vireod killed after the commit, restarted while the destination still holds the
/// restore: asked, the destination says `arriving`, then `here`; the source removes its record
/// by itself and its settling job completes.
#[test]
fn a_quick_migrations_source_killed_after_the_commit_learns_the_vm_moved() {
    let mut p = pair_holding_restores();
    let (run, old) = source_killed_after_commit(&mut p, "qk1", "");
    p.a.restart();
    let j = ended(&p.a, &settling_job(&p, &old));
    assert!(
        p.a.log().contains("its restore there is still under way"),
        "never answered `arriving`: the restart missed the held restore"
    );
    assert_eq!(settled_quick(&p, &run, &j), Where::Destination);
}

/// As above, but the destination vireod dies too before the restore and comes back first: it
/// dropped the arrival, so asked it says `absent` and the source restores the VM itself.
#[test]
fn a_quick_migrations_source_killed_after_the_commit_restores_what_did_not_arrive() {
    let mut p = pair_holding_restores();
    let (run, old) = source_killed_after_commit(&mut p, "qk2", "");
    p.b.kill9();
    p.b.restart();
    p.a.restart();
    let j = ended(&p.a, &settling_job(&p, &old));
    let error = j["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("does not have it; it is restored here"),
        "{error}"
    );
    assert_eq!(settled_quick(&p, &run, &j), Where::Source);
}

/// As above, but the destination stays down while the source asks (`--migration-answer-wait
/// 3`): the VM stays saved on the source and the job says where it may be and what to run. A
/// start while the question is open is refused (busy); once the destination came back (it
/// dropped the arrival) the user's start restores the VM.
#[test]
fn a_quick_migrations_source_killed_after_the_commit_with_no_answer_keeps_the_vm_saved() {
    let mut p = pair_holding_restores();
    let (run, old) = source_killed_after_commit(&mut p, "qk3", "");
    p.b.kill9();
    p.a.extra_args
        .extend(["--migration-answer-wait".to_string(), "3".to_string()]);
    p.a.restart();
    let start = format!("/v1/vms/{}/start", run.name);
    let busy = p.a.post(&start);
    assert_eq!(
        busy.status,
        409,
        "a start while the destination is asked: {}",
        String::from_utf8_lossy(&busy.body)
    );
    let settling = ended(&p.a, &settling_job(&p, &old));
    let error = settling["error"].as_str().unwrap_or_default();
    assert_eq!(settling["state"], "failed", "{settling}");
    assert!(
        error.contains("could not be asked since") && error.contains("stays saved here"),
        "{error}"
    );
    assert!(
        error.contains(&format!("vireo vm start {}", run.name)),
        "{error}"
    );
    let here = record(&p.a, &run).expect("the source keeps its record");
    assert_eq!(here["state"], "saved", "{here}");
    assert!(p.a.worker_record(&run.id).is_none());
    p.b.restart();
    wait_until(T, "the destination dropped the arrival", || {
        record(&p.b, &run).is_none()
    });
    let r = p.a.post(&start);
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let j = ended(&p.a, r.json()["id"].as_str().unwrap());
    assert_eq!(j["state"], "completed", "{j}");
    assert_eq!(settled_quick(&p, &run, &settling), Where::Source);
}

/// As above, but the destination restored the VM, ran it and lost it since
/// (`fake.restored_lost_ms`, standing in for a later post-copy away from it that lost the VM)
/// before the source came back: asked, it says `lost`. The source must neither take that for
/// "it moved" (until session 35 the answer was `here`: the record went and the job completed)
/// nor restore its saved state, older than the disks the guest wrote there: the VM stays saved
/// here, the job says why and what to run where, and the destination keeps its `lost` record.
#[test]
fn a_quick_migrations_source_killed_after_the_commit_keeps_the_vm_saved_if_it_was_lost_there() {
    let mut p = pair_holding_restores();
    let (run, old) = source_killed_after_commit(&mut p, "qk4", "fake.restored_lost_ms=200");
    wait_until(T, "the VM lost on the destination", || {
        record(&p.b, &run).is_some_and(|v| v["state"] == "lost")
    });
    p.a.restart();
    let settling = ended(&p.a, &settling_job(&p, &old));
    RUNS.fetch_add(1, Ordering::SeqCst);
    let error = settling["error"].as_str().unwrap_or_default();
    eprintln!("lost there, asked at the restart: {error}");
    assert_eq!(settling["state"], "failed", "{settling}");
    assert!(
        error.contains("was lost there: ")
            && error.contains("a later post-copy migration lost it (fake)")
            && error.contains("stays saved here, not restored"),
        "{error}"
    );
    assert!(
        error.contains(&format!("`vireo vm start {}` there", run.name)),
        "{error}"
    );
    let here = record(&p.a, &run).expect("the source keeps its record");
    assert_eq!(here["state"], "saved", "{here}");
    assert!(
        p.a.worker_record(&run.id).is_none(),
        "restored on the source"
    );
    let there = record(&p.b, &run).expect("the destination keeps its lost record");
    assert_eq!(there["state"], "lost", "{there}");
    assert!(!lock_held(&run), "a worker holds the disk");
}

#[test]
fn untrusted_either_way_changes_nothing() {
    for (a_trusts_b, b_trusts_a) in [(true, false), (false, true)] {
        let p = pair(a_trusts_b, b_trusts_a);
        let run = start_vm(&p, "t1", "", true);
        let job = migrate(&p, &run, &p.b_addr);
        let place = settled(&p, &run, &job, Expect::Runs, true);
        assert_eq!(place, Where::Source);
        let e = job_error(&p.a, &job);
        assert!(e.contains("TLS handshake") && e.contains("trust"), "{e}");
    }
}

fn job_error_when_ended(d: &Vireod, id: &str) -> String {
    ended(d, id)["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn job_error(d: &Vireod, id: &str) -> String {
    job(d, id)["error"].as_str().unwrap_or_default().to_owned()
}

/// A source speaking another peer protocol version (an older or newer vireod): refused at the
/// offer with the versions named, nothing created.
#[test]
fn another_protocol_version_is_refused_before_anything_is_made() {
    let p = pair(true, true);
    let a_host = p.a.state_dir.join("host");
    // The one before this host's (an older vireod), the next one and nonsense.
    let ours = vireo_api::migrate::PEER_PROTOCOL_VERSION;
    for version in [ours - 1, ours + 1, 99] {
        RUNS.fetch_add(1, Ordering::SeqCst);
        let answer = offer_as(&a_host, &p.b_addr, version);
        assert!(
            answer.contains("refused") && answer.contains(&format!("not {version}")),
            "{answer}"
        );
        assert_eq!(p.b.show("/v1/vms"), json!([]));
        assert!(!p
            .b
            .state_dir
            .join("vms")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()));
    }
}

/// Connects to a vireod's migration listener as the host whose identity is in `host_dir`
/// and sends an offer of `version`; returns the answer line.
fn offer_as(host_dir: &Path, to: &str, version: u32) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let id = vireo_migration::hostauth::HostIdentity::load(
            &host_dir.join("host.crt"),
            &host_dir.join("host.key"),
        )
        .unwrap();
        let trusted =
            vireo_migration::hostauth::TrustStore::load(&host_dir.join("trusted-hosts")).unwrap();
        let cfg = vireo_migration::hostauth::client_config(&id, &trusted).unwrap();
        let tcp = tokio::net::TcpStream::connect(to).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(vireo_migration::hostauth::peer_name(), tcp)
            .await
            .unwrap();
        let mut io = BufReader::new(tls);
        let offer = json!({
            "msg": "offer", "version": version, "vm_id": uuid::Uuid::new_v4(),
            "spec": spec("v1", ""), "storage": "shared", "session": uuid::Uuid::new_v4(),
            "streams": 1, "quick": false,
        });
        let mut line = serde_json::to_vec(&offer).unwrap();
        line.push(b'\n');
        io.get_mut().write_all(&line).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), io.read_line(&mut answer))
            .await
            .unwrap()
            .unwrap();
        answer
    })
}

/// (a) The job shows the final figures even when the worker finished (and exited) between
/// two of vireod's 200 ms polls: they come with its exit record.
#[test]
fn a_migration_faster_than_a_poll_still_shows_its_figures() {
    let p = pair(true, true);
    let run = start_vm(&p, "f1", "fake.migrate_ms=50 fake.exit_ms=0", true);
    let job_id = migrate(&p, &run, &p.b_addr);
    let j = ended(&p.a, &job_id);
    assert_eq!(j["state"], "completed", "{j}");
    let m = &j["migration"];
    assert_eq!(m["state"], "completed", "{j}");
    assert_eq!(m["round"], 1, "{j}");
    assert_eq!(m["transferred_bytes"], 4096, "{j}");
    assert_eq!(m["downtime_ms"], 7, "{j}");
    settled(&p, &run, &job_id, Expect::Runs, true);
}

/// A live migration whose destination resumed the VM while its `running` never reached the
/// source (`fake.running_lost`: the workers' stream ends in that instant), with the vireods'
/// link through a proxy that cuts it once after `n` bytes and then heals: the source must ask
/// where the VM is (`where_is`) rather than keep a VM the destination runs.
fn running_lost_run(p: &Pair, i: usize, n: u64, fenced: bool) -> (Where, u64) {
    let b: std::net::SocketAddr = p.b_addr.parse().unwrap();
    let px = Proxy::start_healing(Target::Fixed(b), n);
    let words = "fake.migrate_ms=300 fake.running_lost";
    let run = start_vm(p, &format!("r{}{i}", fenced as u8), words, fenced);
    let job = migrate(p, &run, &px.addr.to_string());
    let err = job_error_when_ended(&p.a, &job);
    let place = settled(p, &run, &job, Expect::Runs, fenced);
    eprintln!("running lost, link cut after {n} bytes (fenced {fenced}): {place:?} {err}");
    (place, px.passed())
}

#[test]
fn a_live_migration_whose_running_is_lost_runs_the_vm_in_one_place() {
    let p = pair(true, true);
    for fenced in [true, false] {
        // Uncut link: the source's `abort` is answered `running` (the destination's worker
        // had resumed the VM), so the VM is there even without a disk lock to fence it.
        let (place, total) = running_lost_run(&p, 0, u64::MAX, fenced);
        assert_eq!(place, Where::Destination);
        // The link's last bytes: the `accepted`, the source's `abort` and the answer (one TLS
        // record each), every 15th byte of the last 240, and the last byte.
        let mut ns: Vec<u64> = (1..=16).map(|k| total.saturating_sub(k * 15)).collect();
        ns.push(total - 1);
        let mut seen = [0; 2];
        for (i, n) in ns.iter().enumerate() {
            let (place, _) = running_lost_run(&p, i + 1, *n, fenced);
            seen[place as usize] += 1;
        }
        eprintln!(
            "running lost (fenced {fenced}): {} runs over the last bytes of {total}; source {}, \
             destination {}",
            ns.len() + 1,
            seen[0],
            seen[1]
        );
        assert!(seen[1] > 0, "{seen:?}");
    }
}

/// The vireods' link cut in the hand-over (after the source released the VM) and the
/// destination's `running` lost on the workers' stream: the source's worker fails the
/// hand-over (left paused: the destination holds the "disk"), its vireod has no link to ask
/// on, so it asks on a new connection and finds the VM there. Before `where_is` was asked here
/// the job failed and the VM had a record on both hosts.
#[test]
fn the_link_cut_in_the_hand_over_and_running_lost_finds_the_vm_there() {
    let p = pair(true, true);
    let b: std::net::SocketAddr = p.b_addr.parse().unwrap();
    for i in 0..2 {
        let px = Proxy::start_healing(Target::Fixed(b), u64::MAX);
        let words = "fake.migrate_ms=200 fake.switch_ms=1500 fake.running_lost";
        let run = start_vm(&p, &format!("rl{i}"), words, true);
        let job = migrate(&p, &run, &px.addr.to_string());
        at_phase(&p, &job, Phase::Switching);
        px.cut_now();
        let place = settled(&p, &run, &job, Expect::Runs, true);
        assert_eq!(place, Where::Destination);
    }
}

/// The source vireod SIGKILLed in the hand-over and back before its worker finished it: the
/// re-adopted worker exits `MigratedAway` while this vireod has no job for it, and the record
/// here must go then (not stay `off` until the next start).
#[test]
fn a_re_adopted_source_worker_that_hands_over_takes_the_record_with_it() {
    let mut p = pair(true, true);
    for i in 0..2 {
        let words = "fake.migrate_ms=200 fake.switch_ms=1500 fake.exit_ms=3000";
        let run = start_vm(&p, &format!("ra{i}"), words, true);
        let job = migrate(&p, &run, &p.b_addr);
        at_phase(&p, &job, Phase::Switching);
        p.a.kill9();
        p.a.restart();
        assert!(
            alive(run.pid),
            "the worker exited before vireod was back: this run shows nothing"
        );
        wait_until(T, "the source worker handed over", || !alive(run.pid));
        wait_until(T, "the source's record removed", || {
            record(&p.a, &run).is_none()
        });
        let place = settled_after_source_restart(&p, &run, &job);
        assert_eq!(place, Where::Destination);
        let dir = p.a.state_dir.join("vms").join(&run.id);
        assert!(!dir.exists(), "{}", dir.display());
    }
}
