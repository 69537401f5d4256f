//! End to end, under KVM: faults in the two other ways a VM moves between vireods, with the
//! real workers and the probe guest (`migrate_faults_real.rs` does live pre-copy; the same
//! harness, `vireod_harness/faults.rs`, and the fake-worker suite's proxy). Two vireods on
//! loopback sharing the disks' folder; each run migrates a fresh 64 MiB VM whose guest keeps
//! rewriting 4 MiB.
//!
//! **Quick** (`--quick`: save, the files across, restore there):
//! - the vireods' link cut once after N bytes (then working again, so the source can ask
//!   where the VM is after a lost answer), N swept over an uncut quick migration's bytes,
//!   then placed inside the destination's last two answers (`running`: the VM moved;
//!   `accepted`: it stayed);
//! - the destination vireod SIGKILLed while the saved state crosses (the link held to a rate
//!   so the strike lands in the transfer), and restarted; the same for the source vireod;
//! - the source vireod SIGKILLed once its `commit` went out, the destination holding the
//!   restore (`VIREO_TEST_QUICK_RESTORE_DELAY_MS`), and restarted;
//! - the destination vireod SIGKILLed holding that restore, and restarted;
//! - the destination vireod SIGKILLed while its worker restores (held with its disks locked
//!   by `VIREO_TEST_RESTORE_HOLD_MS` longer than a restarted vireod waits for a worker's first
//!   answer), and restarted: the VM runs there;
//! - the destination's `running` lost for good (the link never back): the VM stays saved on
//!   the source and runs on the destination, and a second start on the source is refused.
//!
//! **Post-copy** (`--postcopy always`, the background push held by `--bandwidth` so the phase
//! lasts seconds), each fault struck once the source's job says `postcopy`:
//! - the vireods' link cut for good: the workers' streams are direct, so the VM completes on
//!   the destination, and both vireods must agree;
//! - the destination vireod SIGKILLed and restarted: its worker lives on and is re-adopted;
//! - the source vireod SIGKILLed and restarted: its worker keeps serving pages;
//! - the source worker SIGKILLed: the VM is lost (post-copy's inherent risk): `lost` with
//!   the reason on the destination, nothing on the source, the job's error says so.
//!
//! After every run the invariants of [`settled`] (or, for the lost VM, [`settled_lost`]).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::vireod_harness;
use vireod_harness::faults::{
    alive, check_guest, in_postcopy, kill9, migrate, pair, record, restart_on_a_fixed_port,
    settled, settled_as, settled_lost, settling_job, start_vm, start_vm_dirtying, still_postcopy,
    sweep, tail, wait_for_worker_log, wait_until, workers_on, Allow, Run, Where, HOT_SET_SLOW, T,
};
use vireod_harness::migration::{job, migration_address, wait_for_end};
use vireod_harness::slow_link::SlowLink;
use vireod_harness::Daemon;

use crate::proxy;
use proxy::{Proxy, Target};

const QUICK_ONLY: Allow = Allow {
    job_interrupted: false,
    new_source_worker: true,
};

fn to_of(b: &Daemon) -> SocketAddr {
    migration_address(b).parse().unwrap()
}

/// One quick migration through a proxy that cuts the vireods' link once after `n` bytes and
/// then lets new connections through; where the VM ended, the bytes the link carried, and
/// whether the cut came (a point past what the run carried never cuts). `down`: only the
/// destination's bytes count, for the cut and the total.
fn quick_cut_run(a: &Daemon, b: &Daemon, i: usize, n: u64, down: bool) -> (Where, u64, bool) {
    let px = match down {
        true => Proxy::start_healing_down(Target::Fixed(to_of(b)), n),
        false => Proxy::start_healing(Target::Fixed(to_of(b)), n),
    };
    // Names of one width: the name is in several messages, and the sweep's points are byte
    // counts taken from the first run.
    let run = start_vm(a, &format!("q{i:02}"));
    let job_id = migrate(a, &run, &px.addr.to_string(), &["--quick"]);
    let place = settled_as(
        a,
        b,
        &run,
        job_id.as_deref(),
        &format!(
            "quick, link cut after {n} B{}",
            if down { " back" } else { "" }
        ),
        QUICK_ONLY,
    );
    (place, px.passed(), px.fired())
}

/// The bytes of the destination's `running`: one TLS record (5 bytes of header, the 18 of
/// `{"msg":"running"}\n`, its type byte, a 16-byte tag), the last the destination sends (it
/// drops the connection without `close_notify`). The record before it is `accepted`.
const RUNNING_RECORD: u64 = 40;

#[test]
fn a_quick_migration_cut_after_n_bytes() {
    let Some((a, b)) = pair() else {
        return;
    };
    let t0 = Instant::now();
    let (place, total, _) = quick_cut_run(&a, &b, 0, u64::MAX, false);
    assert_eq!(place, Where::Destination);
    assert!(total > 1 << 20, "{total}");
    eprintln!(
        "uncut quick migration: {total} B on the link in {:?}",
        t0.elapsed()
    );
    // 10 points over the whole link (the handshake, the offer, the saved state's files).
    let points: Vec<u64> = (0..10).map(|k| total * k / 10).collect();
    let seen = sweep("quick, link cut", total, &points, |k, n| {
        quick_cut_run(&a, &b, k, n, false).0
    });
    assert!(seen[0] > 0, "{seen:?}");
    // Then the destination's last words, counted in its bytes alone: their length does not
    // move with the saved state's (the two-way count placed a late point in `commit` or in
    // `running` by chance, session 37). A cut inside `running` leaves the VM running there
    // (the destination keeps what it restored; the source asks, `whereabouts.rs`); a cut
    // inside `accepted` leaves it here. Four bytes of margin either side: the handshake's
    // signature may differ in length by a byte or two from run to run.
    let (place, back, _) = quick_cut_run(&a, &b, 20, u64::MAX, true);
    assert_eq!(place, Where::Destination);
    for (j, k) in [4, 20, 36, 44, 60].into_iter().enumerate() {
        let n = back - k;
        let (place, _, cut) = quick_cut_run(&a, &b, 21 + j, n, true);
        eprintln!("quick, link cut {k} B before the destination's end ({n} of {back} B): VM on the {place:?}");
        assert!(cut, "the cut at {n} of {back} B back did not come");
        let want = match k < RUNNING_RECORD {
            true => Where::Destination,
            false => Where::Source,
        };
        assert_eq!(
            place, want,
            "a cut {k} B before the destination's last byte"
        );
    }
}

/// The source loses the destination's `running` for good (the link cut inside it and never
/// back) and cannot ask again within `--migration-answer-wait` (2 s here): the VM stays
/// **saved** on the source, never started on a guess, and the job says where it may be. The
/// destination, which had the commit, runs it with the guest intact. Starting the source's
/// copy as well, against the job's advice, is refused: the destination's worker holds the
/// disk.
#[test]
fn a_quick_migration_whose_answer_is_lost_for_good_stays_saved_at_the_source() {
    let Some((mut a, b)) = pair() else {
        return;
    };
    a.kill9();
    a.args
        .extend(["--migration-answer-wait".to_owned(), "2".to_owned()]);
    a.restart();
    // The destination's bytes of a whole quick migration, to cut inside its last answer.
    let (place, back, _) = quick_cut_run(&a, &b, 0, u64::MAX, true);
    assert_eq!(place, Where::Destination);

    let px = Proxy::start_down(Target::Fixed(to_of(&b)), back - RUNNING_RECORD / 2);
    let run = start_vm(&a, "qlost");
    let job_id = migrate(&a, &run, &px.addr.to_string(), &["--quick"]).expect("a job");
    let j = wait_for_end(&a, &job_id, T);
    assert!(px.fired(), "the cut inside `running` did not come: {j}");
    let error = j["error"].as_str().unwrap_or_default();
    eprintln!("quick, answer lost for good: {error}");
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        error.contains("could not be asked since") && error.contains("stays saved here"),
        "{error}"
    );
    assert!(error.contains("vireo vm start qlost"), "{error}");

    // Here: the record, saved, no worker. There: running, the guest as it was.
    let here = record(&a, &run).expect("the source keeps its record");
    assert_eq!(here.state.name(), "saved", "{here:?}");
    assert!(workers_on(&a, &run).is_empty(), "a worker runs it here");
    wait_until("the VM running on the destination", || {
        record(&b, &run).is_some_and(|v| v.state.name() == "running")
    });
    let ctx = || format!("--- A:\n{}\n--- B:\n{}", tail(&a), tail(&b));
    check_guest(&b, &run, &ctx);
    // Against the job's advice: a second copy must not start on the same disk.
    let (code, err) = a.fails(&["vm", "start", "qlost"]);
    eprintln!("vm start on the source too: exit {code}: {err}");
    assert!(workers_on(&a, &run).is_empty(), "a second copy runs: {err}");
    assert_eq!(
        record(&b, &run)
            .map(|v| v.state.name().to_owned())
            .as_deref(),
        Some("running")
    );
    b.ok(&["vm", "turn-off", "qlost"]);
    b.ok(&["vm", "rm", "qlost"]);
    a.ok(&["vm", "rm", "qlost"]);
}

/// Starts a quick migration over a link held to 4 MiB/s and waits until 1 MiB of the saved
/// state crossed it (the save is done, the files are on their way).
fn quick_in_transfer(a: &Daemon, b: &Daemon, run: &Run) -> (String, SlowLink) {
    let link = SlowLink::start(to_of(b), 4 << 20);
    let job_id = migrate(a, run, &link.addr.to_string(), &["--quick"]).expect("a job");
    wait_until("the saved state crossing", || link.passed() > 1 << 20);
    // The job counts the files' bytes as they cross, not once a whole file did (the 64 MiB
    // `memory.bin` takes ~16 s here): within 3 s it shows at least a MiB of them.
    let deadline = Instant::now() + Duration::from_secs(3);
    let j = loop {
        let j = job(a, &job_id);
        let counted = j["migration"]["transferred_bytes"].as_u64().unwrap_or(0);
        if counted >= 1 << 20 || Instant::now() > deadline {
            assert!(
                counted >= 1 << 20,
                "the job counts {counted} bytes sent: {j}"
            );
            break j;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(j["state"], "running", "ended before the transfer: {j}");
    (job_id, link)
}

#[test]
fn the_destination_vireod_killed_in_a_quick_migrations_transfer() {
    let Some((a, mut b)) = pair() else {
        return;
    };
    let run = start_vm(&a, "qdv");
    let (job_id, _link) = quick_in_transfer(&a, &b, &run);
    b.kill9();
    // The source decides without it: the VM is restored there from its saved state.
    let j = wait_for_end(&a, &job_id, T);
    assert_eq!(j["state"], "failed", "{j}");
    b.restart();
    let place = settled_as(
        &a,
        &b,
        &run,
        Some(&job_id),
        "quick, destination vireod killed in the transfer",
        QUICK_ONLY,
    );
    assert_eq!(place, Where::Source);
}

/// The source vireod dies with the VM saved and half its files across. The destination drops
/// the arrival (no commit came); the restarted source finds the VM `saved` with its quick
/// migration's note, asks the destination (`absent`) and restores it by itself, in a job of
/// its own.
#[test]
fn the_source_vireod_killed_in_a_quick_migrations_transfer() {
    let Some((mut a, b)) = pair() else {
        return;
    };
    let run = start_vm(&a, "qsv");
    let (job_id, _link) = quick_in_transfer(&a, &b, &run);
    a.kill9();
    wait_until("the destination dropped the arrival", || {
        record(&b, &run).is_none()
    });
    let t0 = Instant::now();
    a.restart();
    let settling = settling_job(&a, &run, &job_id);
    let j = wait_for_end(&a, &settling, T);
    let error = j["error"].as_str().unwrap_or_default();
    eprintln!("settled {:?} after the restart: {error}", t0.elapsed());
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        error.contains("does not have it; it is restored here"),
        "{error}"
    );
    let place = settled_as(
        &a,
        &b,
        &run,
        Some(&job_id),
        "quick, source vireod killed in the transfer",
        Allow {
            job_interrupted: true,
            new_source_worker: true,
        },
    );
    assert_eq!(place, Where::Source);
}

/// The source vireod dies once its `commit` went out, while the destination holds the restore
/// (`VIREO_TEST_QUICK_RESTORE_DELAY_MS`): the VM is the destination's from the commit on. The
/// restarted source asks where it is — `arriving` while the restore is held, then `here` — and
/// removes its record, ports and folder by itself; its job of its own completes.
#[test]
fn the_source_vireod_killed_after_a_quick_migrations_commit() {
    let Some((mut a, mut b)) = pair() else {
        return;
    };
    b.kill9();
    b.restart_env(&[("VIREO_TEST_QUICK_RESTORE_DELAY_MS", "4000")]);
    let run = start_vm(&a, "qsc");
    let to = migration_address(&b);
    let job_id = migrate(&a, &run, &to, &["--quick"]).expect("a job");
    wait_until("the commit sent", || {
        let j = job(&a, &job_id);
        assert_eq!(j["state"], "running", "ended before the commit: {j}");
        j["migration"]["phases"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == "commit sent"))
    });
    a.kill9();
    let t0 = Instant::now();
    a.restart();
    let settling = settling_job(&a, &run, &job_id);
    let j = wait_for_end(&a, &settling, T);
    eprintln!(
        "settled {:?} after the restart: {}",
        t0.elapsed(),
        j["state"]
    );
    assert_eq!(j["state"], "completed", "{j}");
    let log = std::fs::read_to_string(a.dir.path().join("vireod.log")).unwrap();
    assert!(
        log.contains("its restore there is still under way"),
        "the source never heard `arriving`: the fault missed the held restore"
    );
    let place = settled_as(
        &a,
        &b,
        &run,
        Some(&job_id),
        "quick, source vireod killed after the commit",
        Allow {
            job_interrupted: true,
            new_source_worker: true,
        },
    );
    assert_eq!(place, Where::Destination);
}

/// The destination vireod dies holding a quick migration's restore (the commit is in, the
/// restore not begun: `VIREO_TEST_QUICK_RESTORE_DELAY_MS`) and is restarted. The source lost
/// its answer after the commit, so it asks where the VM is until the destination answers;
/// the VM must end running in one place, the guest intact.
#[test]
fn the_destination_vireod_killed_holding_a_quick_migrations_restore() {
    let Some((a, mut b)) = pair() else {
        return;
    };
    restart_on_a_fixed_port(&mut b, &[("VIREO_TEST_QUICK_RESTORE_DELAY_MS", "4000")]);
    let run = start_vm(&a, "qdr");
    let job_id = migrate(&a, &run, &migration_address(&b), &["--quick"]).expect("a job");
    let log = b.dir.path().join("vireod.log");
    wait_until("the destination holding the restore", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("restore held"))
    });
    b.kill9();
    let t0 = Instant::now();
    b.restart();
    let place = settled_as(
        &a,
        &b,
        &run,
        Some(&job_id),
        "quick, destination vireod killed holding the restore",
        QUICK_ONLY,
    );
    eprintln!(
        "settled on the {place:?}, {:?} after the restart",
        t0.elapsed()
    );
    // The restarted destination drops an arrival it had not begun to restore, so it answers
    // `absent` and the source restores the VM from the saved state it kept.
    assert_eq!(place, Where::Source);
    let error = job(&a, &job_id)["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("it is restored here"), "{error}");
}

#[test]
fn the_destination_vireod_killed_while_its_worker_restores_a_quick_migration() {
    let Some((a, mut b)) = pair() else {
        return;
    };
    // The worker holds its restore (disks open and locked) longer than a restarted vireod
    // waits for a worker's first answer: a large VM's restore from slow storage takes that.
    restart_on_a_fixed_port(&mut b, &[("VIREO_TEST_RESTORE_HOLD_MS", "8000")]);
    let run = start_vm(&a, "qwr");
    let job_id = migrate(&a, &run, &migration_address(&b), &["--quick"]).expect("a job");
    wait_for_worker_log(&b, &run, "the destination worker restoring", "restore held");
    b.kill9();
    let t0 = Instant::now();
    b.restart();
    // Adopted once its restore is done; the saved state it restored from is then spent.
    wait_until("the VM running on the destination", || {
        record(&b, &run).is_some_and(|v| v.state.name() == "running")
    });
    let saved = b.dir.path().join("state/vms").join(&run.id).join("saved");
    wait_until("the spent saved state deleted", || !saved.exists());
    let place = settled_as(
        &a,
        &b,
        &run,
        Some(&job_id),
        "quick, destination vireod killed while its worker restores",
        QUICK_ONLY,
    );
    eprintln!(
        "settled on the {place:?}, {:?} after the restart",
        t0.elapsed()
    );
    // The restore was under way with the disks taken there: the VM runs on the destination.
    assert_eq!(place, Where::Destination);
}

#[test]
fn the_vireods_link_cut_in_postcopy() {
    let Some((a, b)) = pair() else {
        return;
    };
    let px = Proxy::start(Target::Fixed(to_of(&b)), u64::MAX);
    let run = start_vm(&a, "pl");
    let job_id = in_postcopy(&a, &run, &px.addr.to_string(), "2M");
    px.cut_now();
    assert!(
        still_postcopy(&a, &job_id),
        "post-copy ended before the cut"
    );
    let place = settled(&a, &b, &run, Some(&job_id), "post-copy, link cut");
    assert_eq!(place, Where::Destination);
}

#[test]
fn the_destination_vireod_killed_in_postcopy_and_restarted() {
    let Some((a, mut b)) = pair() else {
        return;
    };
    // The guest's slow hot set keeps post-copy going for seconds, so the question lands in
    // it: with the flat-out one the phase lasted ~250 ms, and once (in CI) it had ended
    // before the restarted vireod was asked (the kill and restart took ~350 ms).
    let run = start_vm_dirtying(&a, "pdv", HOT_SET_SLOW);
    let job_id = in_postcopy(&a, &run, &migration_address(&b), "1M");
    let worker = b.worker_pid(&run.name);
    b.kill9();
    assert!(
        still_postcopy(&a, &job_id),
        "post-copy ended before the kill"
    );
    assert!(alive(worker));
    b.restart();
    // The restarted vireod answers while the VM is still in post-copy: it settles it in the
    // background. It used to hold its API (and migration listener) until post-copy ended.
    let asked = Instant::now();
    let list = b.run(&["vm", "list"]);
    assert!(list.status.success(), "{list:?}");
    let answered = asked.elapsed();
    eprintln!("the restarted destination vireod answered `vm list` in {answered:?}");
    assert!(
        still_postcopy(&a, &job_id),
        "post-copy ended before the restarted vireod was asked ({answered:?})"
    );
    assert!(
        answered < Duration::from_secs(2),
        "the restarted vireod answered `vm list` only after {answered:?}"
    );
    let place = settled(&a, &b, &run, Some(&job_id), "post-copy, destination vireod");
    assert_eq!(place, Where::Destination);
}

/// The restarted source vireod re-adopts a worker still serving pages. Found a vireod bug
/// (fixed in `daemon/adopt.rs`): it took the worker's stopped vCPUs for the VM's state and
/// corrected the record to `paused`, so until post-copy ended the VM was `paused` here and
/// `running` on the destination.
#[test]
fn the_source_vireod_killed_in_postcopy_and_restarted() {
    let Some((mut a, b)) = pair() else {
        return;
    };
    // Post-copy must outlast the restart (see the destination's test above).
    let run = start_vm_dirtying(&a, "psv", HOT_SET_SLOW);
    let job_id = in_postcopy(&a, &run, &migration_address(&b), "1M");
    a.kill9();
    assert!(alive(run.source_pid));
    a.restart();
    // Read while the worker still serves: it exits only once every page is there.
    let vm = record(&a, &run);
    assert!(alive(run.source_pid), "post-copy ended before the restart");
    let state = vm.map(|v| v.state.name());
    assert_eq!(state, Some("running"), "the source's record in post-copy");
    // Its worker hands the VM over and takes the record with it.
    wait_until("the source worker gone", || !alive(run.source_pid));
    let place = settled_as(
        &a,
        &b,
        &run,
        Some(&job_id),
        "post-copy, source vireod",
        Allow {
            job_interrupted: true,
            new_source_worker: false,
        },
    );
    assert_eq!(place, Where::Destination);
}

/// Post-copy's inherent risk, with the plain probe (`migrate_nic.rs` does it with a switch
/// NIC): the source worker SIGKILLed while pages are still on it.
#[test]
fn the_source_worker_killed_in_postcopy_loses_the_vm() {
    let Some((a, b)) = pair() else {
        return;
    };
    let run = start_vm(&a, "pw");
    // The flat-out hot set is fetched on fault: the cap only shortens the pre-copy.
    let job_id = in_postcopy(&a, &run, &migration_address(&b), "4M");
    kill9(run.source_pid);
    settled_lost(&a, &b, &run, &job_id);
    // The job failed, and its migration says how: `lost`, not `failed` (until session 36 the
    // job's end overwrote the `lost` that `lost_there` set).
    let j = job(&a, &job_id);
    assert_eq!(j["migration"]["state"], "lost", "{j}");
    let shown = a.ok(&["job", "show", &job_id]);
    assert!(shown.contains("state:    failed\n"), "{shown}");
    assert!(shown.contains("\nmigration: lost, "), "{shown}");
}
