//! End to end, under KVM: post-copy live migration under faults with the real workers
//! (`migrate_faults_real_modes.rs` has the vireods' faults in post-copy and the source worker
//! killed; the same harness, `vireod_harness/faults.rs`): the destination worker SIGKILLed at
//! several points of the post-copy phase, and the workers' streams cut there (alone, with the
//! vireods' link for a moment, or with it for good). The VM ran on the
//! destination and dirtied memory the source never saw, so the source must not resume its
//! older copy: it is reported `lost` with its reason on one host only and nothing of it is left
//! anywhere else (after the kill, booted again from its disks, its data is whole).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::proxy;
use crate::vireod_harness;
use proxy::{Proxy, Target};
use vireod_harness::console::Console;
use vireod_harness::faults::{
    free_port, in_postcopy, kill9, nothing_there, pair, record, routed_pair, settled, settled_lost,
    start_vm, wait_until, workers_on, Run, Where, T,
};
use vireod_harness::migration::{migration_address, wait_for_end};
use vireod_harness::Daemon;

/// The destination worker SIGKILLed `after` into the post-copy phase (the guest dirties 4 MiB
/// as fast as it can, the push held to 1 MiB/s, so pages are still on the source). The VM ran
/// there and wrote memory the source never saw, so the source must not resume its older copy:
/// the VM is `lost` there with the reason, nothing of it is left on the destination, no worker
/// anywhere, the job failed; booted again from its disks (a cold boot), its data is whole.
///
/// The phase lasts ~250 ms, so under load the kill can land after it ended (the job then says
/// `completed`: the VM had moved whole before its worker died there). Such a run is said and
/// not counted (`false`); the invariants hold for every run that struck in post-copy.
fn destination_worker_killed_run(a: &Daemon, b: &Daemon, i: usize, after: Duration) -> bool {
    let run = start_vm(a, &format!("dw{i}"));
    // Its hot set is fetched on fault, so the push's cap sets only the pre-copy's length: 4M,
    // not 1M, saves ~9 s a run (the hot set is dirty at the switch-over either way).
    let job_id = in_postcopy(a, &run, &migration_address(b), BANDWIDTH);
    std::thread::sleep(after);
    let dest_worker = b.worker_pid(&run.name);
    kill9(dest_worker);
    let j = wait_for_end(a, &job_id, T);
    if j["state"] == "completed" {
        eprintln!("[{after:?} into post-copy] the kill came after post-copy ended: not counted");
        return false;
    }
    settled_lost_on_source(a, b, &run, &job_id, &format!("{after:?} into post-copy"));
    true
}

/// The invariants after the destination lost its worker in post-copy (see
/// [`destination_worker_killed_run`]); the VM is then booted from its disks, checked and
/// removed. The record's reason on the source.
fn settled_lost_on_source(a: &Daemon, b: &Daemon, run: &Run, job_id: &str, label: &str) -> String {
    let j = wait_for_end(a, job_id, T);
    assert_eq!(j["state"], "failed", "[{label}] {j}");
    // Whichever way vireod heard of the loss (its worker's `lost`, or its exit
    // `migration_lost` first), the job's migration says `lost`, not `failed`.
    assert_eq!(j["migration"]["state"], "lost", "[{label}] {j}");
    // Before the fix in the worker's `postcopy::lose`/`out.rs`: "…; it runs on here". The
    // job hears it from the worker's status ("was lost in the post-copy migration") or from
    // its exit ("ended on the source …: the VM was lost in a post-copy migration"), whichever
    // comes first.
    let error = j["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("lost in")
            && error.contains("post-copy migration")
            && !error.contains("runs on here"),
        "[{label}] {j}"
    );
    wait_until("the source's record settled", || {
        record(a, run).is_some_and(|v| v.state.name() != "running")
    });
    let vm = record(a, run).expect("the source's record");
    assert_eq!(vm.state.name(), "lost", "[{label}] {vm:?}\n{j}");
    let reason = vm.state.reason().unwrap_or_default().to_owned();
    assert!(reason.contains("post-copy"), "[{label}] {reason}");
    wait_until("no worker on the source", || workers_on(a, run).is_empty());
    wait_until("no record on the destination", || record(b, run).is_none());
    nothing_there(b, run);
    eprintln!(
        "[{label}] the source: lost ({reason}); job: {}",
        j["error"].as_str().unwrap_or_default()
    );
    a.ok(&["vm", "start", &run.name]);
    let mut c = Console::attach(a, &run.name);
    c.ok("DISK 0 VERIFY 0 512 5");
    drop(c);
    a.ok(&["vm", "turn-off", &run.name]);
    a.ok(&["vm", "rm", &run.name]);
    reason
}

#[test]
fn the_destination_worker_killed_in_postcopy_loses_the_vm_on_the_source() {
    let Some((a, b)) = pair() else {
        return;
    };
    // The guest fetches its hot set on fault (requests are not held to the bandwidth), so the
    // phase lasts ~250 ms here: strikes at once and 50 ms in (at 150 ms it had completed once).
    // A CI run's load once made the 50 ms strike land after the phase: one more at once.
    let mut struck = 0;
    for (i, ms) in [0u64, 0, 50].into_iter().enumerate() {
        struck += usize::from(destination_worker_killed_run(
            &a,
            &b,
            i,
            Duration::from_millis(ms),
        ));
    }
    assert!(struck > 0, "no kill landed in post-copy");
}

/// Where the workers' streams are cut, counted from the moment the source's job says
/// `postcopy`.
#[derive(Clone, Copy, Debug)]
enum Cut {
    Never,
    /// After this many more bytes through the proxy, both directions counted.
    After(u64),
    /// At once, the destination vireod stopped (SIGSTOP) meanwhile for this long: its word
    /// (`lost_here`) comes after the source worker's own `lost`, whichever side saw the cut
    /// first.
    DestinationVireodHeld(Duration),
    /// At once, the vireods' link cut too (a blip on the one network both ride: their
    /// connections break, new ones pass): each side learns of the loss alone, and the two
    /// vireods must still agree once they reach each other again.
    WithTheVireodsLink,
}

/// What became of a post-copy migration whose workers' streams were cut.
enum Outcome {
    /// Every page was there before the cut: the VM runs on the destination.
    Completed,
    /// The VM was lost on the destination (the record's reason).
    Lost(String),
}

/// One post-copy migration whose workers' streams (every one, both directions counted) go
/// through a proxy that cuts them as `cut` says, after the source's job said `postcopy`: the guest runs on the destination by then, so the cut lands in post-copy whatever
/// the byte count of the pre-copy pass. Checked after it: completed and whole on the
/// destination ([`settled`]), or `lost` there with its reason and nothing left anywhere else
/// ([`settled_lost`]). The outcome, and the proxy's bytes at the switch-over and in all.
fn stream_cut_in_postcopy_run(
    a: &Daemon,
    b: &Daemon,
    route: &Path,
    i: usize,
    cut: Cut,
) -> (Outcome, u64, u64) {
    let port = free_port();
    let px = Proxy::start(Target::Fixed(([127, 0, 0, 1], port).into()), u64::MAX);
    std::fs::write(route.join("route"), format!("{port} {}", px.addr)).unwrap();
    let run = start_vm(a, &format!("pc{i}"));
    let link = Proxy::start_healing(
        Target::Fixed(migration_address(b).parse().unwrap()),
        u64::MAX,
    );
    let job_id = in_postcopy(a, &run, &link.addr.to_string(), BANDWIDTH);
    let at_switch = px.passed();
    match cut {
        Cut::Never => {}
        Cut::After(n) => px.cut_after_more(n),
        Cut::DestinationVireodHeld(held) => {
            let vireod = b.child.id() as i32;
            // SAFETY: kill(2) of this test's own destination vireod; nothing between the
            // two signals can panic, so it is never left stopped.
            unsafe { libc::kill(vireod, libc::SIGSTOP) };
            px.cut_now();
            std::thread::sleep(held);
            // SAFETY: as above.
            unsafe { libc::kill(vireod, libc::SIGCONT) };
        }
        Cut::WithTheVireodsLink => {
            px.cut_now();
            link.cut_now();
        }
    }
    let label = format!("{cut:?} after the switch-over's {at_switch} B");
    let j = wait_for_end(a, &job_id, T);
    let outcome = if j["state"] == "completed" {
        let place = settled(a, b, &run, Some(&job_id), &label);
        assert_eq!(place, Where::Destination, "[{label}]");
        Outcome::Completed
    } else {
        Outcome::Lost(settled_lost(a, b, &run, &job_id))
    };
    (outcome, at_switch, px.passed())
}

/// The workers' post-copy streams held to 4 MiB/s: the pre-copy pass (~13 MB) takes ~3 s
/// instead of 1 MiB/s's 13, and the phase lasts as long (the guest fetches its 4 MiB hot set
/// on fault, unmetered; 3-4 MB cross the streams after the job says `postcopy` either way).
const BANDWIDTH: &str = "4M";

/// The workers' streams cut while the destination runs the VM on pages still coming from the
/// source. Neither copy is whole, so the VM is lost, on the destination where it ran last:
/// one `lost` record there, none on the source, no worker anywhere, the job failed saying so.
///
/// Found a vireod bug (fixed in `daemon/migrate/source.rs`, `MigrateState::Lost`): both
/// workers see the cut; when the source's worker reported `lost` before the destination's
/// `lost_here` arrived, the source failed the job with its worker's "the destination went
/// away" and its record became `lost` too, so both hosts held a `lost` VM that either could
/// boot from the same disks. A race (our vireod must poll the worker's `lost` in the few ms
/// before it exits; after its exit vireod asked the destination already): the test failed 2
/// times of 6 before the fix, 2 of 31 lost runs in all.
///
/// And a second one (the same file, after the worker's exit): the source worker ends
/// post-copy once its last page is written into the socket, so a cut with pages in flight
/// let it exit `MigratedAway` while the destination lost the VM (835 pages missing), and the
/// job said `completed` (1 run of 4 at a 64 KiB cut on a loaded host).
#[test]
fn the_workers_streams_cut_in_postcopy_lose_the_vm_on_the_destination() {
    let Some((a, b, route)) = routed_pair() else {
        return;
    };
    let (outcome, at_switch, total) =
        stream_cut_in_postcopy_run(&a, &b, route.path(), 0, Cut::Never);
    assert!(
        matches!(outcome, Outcome::Completed),
        "uncut, through the proxy"
    );
    let post = total - at_switch;
    eprintln!("uncut: {at_switch} B at the switch-over, {post} B after it");
    // Megabytes are still on the source when the job says `postcopy` on an idle host, so
    // every cut loses the VM there; on a loaded one the test's poll may notice the phase late
    // and a cut come after the last page (then it completes, whole). Either outcome is
    // checked; at least one cut must land in the phase.
    let mut cuts: Vec<Cut> = [0, 4096, 65536, post / 2]
        .into_iter()
        .map(Cut::After)
        .collect();
    cuts.push(Cut::DestinationVireodHeld(Duration::from_millis(1500)));
    cuts.push(Cut::WithTheVireodsLink);
    let mut lost = 0;
    for (k, &cut) in cuts.iter().enumerate() {
        let t = Instant::now();
        let (o, at, all) = stream_cut_in_postcopy_run(&a, &b, route.path(), k + 1, cut);
        let what = match o {
            Outcome::Completed => "completed".to_owned(),
            Outcome::Lost(reason) => {
                lost += 1;
                assert!(reason.contains("went away during post-copy"), "{reason}");
                format!("lost ({reason})")
            }
        };
        eprintln!(
            "{cut:?} after {at} B ({all} B in all): {what}, {:?}",
            t.elapsed()
        );
    }
    assert!(lost > 0, "no cut landed in post-copy");
    eprintln!(
        "streams cut in post-copy: {} runs, lost {lost}",
        cuts.len() + 1
    );
}

/// The workers' streams and the vireods' link cut **for good** together in post-copy (the
/// network between the hosts gone; the source with `--migration-answer-wait 2`). Neither side
/// can learn what the other knows: the destination loses the VM (pages still on the source)
/// and keeps a `lost` record with its reason; the source's worker loses it too, its vireod
/// cannot ask the destination, so its record stays `lost` and the job says to look there
/// before starting it here. No worker anywhere; each `lost` record can be turned off and
/// removed. (The fake-worker suite's `a_source_that_lost_post_copy_*`, with the real workers.)
/// On a loaded host the cut may come after the last page: the VM then completes there.
#[test]
fn the_workers_streams_and_the_vireods_link_cut_for_good_in_postcopy() {
    let Some((mut a, b, route)) = routed_pair() else {
        return;
    };
    a.kill9();
    a.args
        .extend(["--migration-answer-wait".to_owned(), "2".to_owned()]);
    a.restart();
    let port = free_port();
    let streams = Proxy::start(Target::Fixed(([127, 0, 0, 1], port).into()), u64::MAX);
    std::fs::write(
        route.path().join("route"),
        format!("{port} {}", streams.addr),
    )
    .unwrap();
    let run = start_vm(&a, "pgood");
    let link = Proxy::start(
        Target::Fixed(migration_address(&b).parse().unwrap()),
        u64::MAX,
    );
    let job_id = in_postcopy(&a, &run, &link.addr.to_string(), BANDWIDTH);
    streams.cut_now();
    link.cut_now();
    let j = wait_for_end(&a, &job_id, T);
    if j["state"] == "completed" {
        let place = settled(&a, &b, &run, Some(&job_id), "streams and link cut for good");
        assert_eq!(place, Where::Destination);
        eprintln!("the cut came after the last page: the VM completed on the destination");
        return;
    }
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["migration"]["state"], "lost", "{j}");
    let error = j["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("was lost in the post-copy migration")
            && error.contains(&format!("{} could not be asked", link.addr))
            && error.contains("stays `lost`"),
        "{error}"
    );
    // Each side's record says `lost`, with its own reason.
    let lost_on = |d: &Daemon| {
        wait_until("a settled record", || {
            record(d, &run).is_some_and(|v| !matches!(v.state.name(), "incoming" | "running"))
        });
        let vm = record(d, &run).unwrap();
        assert_eq!(vm.state.name(), "lost", "{vm:?}");
        vm.state.reason().unwrap_or_default().to_owned()
    };
    let there = lost_on(&b);
    let here = lost_on(&a);
    assert!(there.contains("post-copy"), "{there}");
    assert!(here.contains("post-copy"), "{here}");
    wait_until("no worker anywhere", || {
        workers_on(&a, &run).is_empty() && workers_on(&b, &run).is_empty()
    });
    eprintln!("streams and link cut for good: lost there ({there}); here ({here}); job: {error}");
    for d in [&a, &b] {
        d.ok(&["vm", "turn-off", &run.name]);
        d.ok(&["vm", "rm", &run.name]);
        nothing_there(d, &run);
    }
}
