//! The fault suite's VMs lost in post-copy (docs/migration.md, "Live migration after a lost
//! answer" and the fault table): the destination's worker loses the VM after the switch-over,
//! the destination asked about a `lost` record, and the source's worker losing the VM with the
//! destination's word not in (the link gone, or its answer to the `abort` lost). Wherever the
//! VM was lost, one record says so (on the host that ran it last) and the job's migration ends
//! `lost`.

use super::*;

/// A post-copy that breaks after the switch-over (`fake.postcopy_lost_ms`: the destination
/// worker exits `migration_lost`, as when the source died with pages still there): the VM is
/// whole nowhere. The destination's record says `lost` with the worker's reason (not a crash),
/// the source has nothing left, and nobody holds the "disk".
#[test]
fn a_post_copy_lost_after_the_switch_over_is_lost_with_its_reason() {
    let p = pair(true, true);
    RUNS.fetch_add(1, Ordering::SeqCst);
    let run = start_vm(
        &p,
        "pl",
        "fake.migrate_ms=200 fake.postcopy_lost_ms=800",
        true,
    );
    let job_id = migrate(&p, &run, &p.b_addr);
    let j = ended(&p.a, &job_id);
    assert_eq!(j["state"], "completed", "{j}");
    wait_until(T, "the VM lost on the destination", || {
        record(&p.b, &run).is_some_and(|v| v["state"] == "lost")
    });
    let vm = record(&p.b, &run).unwrap();
    let reason = vm["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("lost in a post-copy migration") && reason.contains("12 pages"),
        "{vm}"
    );
    let listed = p.b.show("/v1/vms");
    assert_eq!(listed[0]["state"], "lost", "{listed}");
    assert_eq!(listed[0]["reason"], reason, "{listed}");
    // Nothing on the source, and nothing runs anywhere.
    assert!(record(&p.a, &run).is_none());
    wait_until(T, "the source worker gone", || !alive(run.pid));
    assert!(!p.a.state_dir.join("vms").join(&run.id).exists());
    wait_until(T, "nobody holds the disk lock", || !lock_held(&run));
    // Turning it off acknowledges the loss; it can then be removed.
    discard(&p.b, &run, "there");
}

/// The destination resumed the VM, its `running` was lost on the workers' stream and the
/// vireods' link was cut in the hand-over; its post-copy then lost the VM
/// (`fake.postcopy_lost_ms`) before the source's worker gave up (`fake.unconfirmed_ms`), so
/// the source asks (`where_is`) a destination whose record is `lost`. It answers `lost` with
/// the record's reason, and the source must not take that for "it runs there" (until session
/// 35 the answer was `here`: the job completed and nobody was told of the loss): the job fails
/// saying the VM was lost there and why, the source's record goes as after `lost_here` (one
/// record, `lost`, on the host that ran the VM last) and its paused worker is stopped.
#[test]
fn a_destination_whose_record_is_lost_answers_lost_when_asked() {
    let p = pair(true, true);
    let b: std::net::SocketAddr = p.b_addr.parse().unwrap();
    for i in 0..2 {
        RUNS.fetch_add(1, Ordering::SeqCst);
        let px = Proxy::start_healing(Target::Fixed(b), u64::MAX);
        let words = "fake.migrate_ms=200 fake.switch_ms=1500 fake.running_lost \
                     fake.postcopy_lost_ms=300 fake.unconfirmed_ms=2000";
        let run = start_vm(&p, &format!("wl{i}"), words, true);
        let job_id = migrate(&p, &run, &px.addr.to_string());
        at_phase(&p, &job_id, Phase::Switching);
        px.cut_now();
        let j = ended(&p.a, &job_id);
        eprintln!("lost there, asked: {}", j["error"]);
        settled_lost_there(&p, &run, &j, px.addr);
    }
}

/// A VM the destination's worker lost after the source's worker gave up on it, the source
/// told so by `where_is` (`fake.postcopy_lost_ms=300`, `fake.unconfirmed_ms=2000`): the job
/// failed naming the loss on `via` and its reason, its migration `lost` (until session 36 the
/// job's end overwrote it `failed`); the destination answered `lost` and keeps the one
/// record, `lost` with the worker's reason; nothing on the source, its worker gone, nobody
/// holding the "disk". The VM is then discarded there.
fn settled_lost_there(p: &Pair, run: &Run, j: &Value, via: std::net::SocketAddr) {
    let ctx = || format!("job {j}\n--- A:\n{}\n--- B:\n{}", tail(&p.a), tail(&p.b));
    let error = j["error"].as_str().unwrap_or_default();
    assert_eq!(j["state"], "failed", "{}", ctx());
    assert_eq!(j["migration"]["state"], "lost", "{}", ctx());
    assert!(
        error.contains(&format!("was lost in the post-copy migration on {via}"))
            && error.contains("12 pages still there"),
        "{}",
        ctx()
    );
    // Told by `where_is`, not by a `lost_here` on the link.
    let answered_lost = p.b.log().lines().any(|l| {
        l.contains("asked where a VM is") && l.contains(&run.id) && l.contains("here=Lost {")
    });
    assert!(answered_lost, "{}", ctx());
    // There: `lost`, with the worker's reason. Here: nothing, and nothing runs.
    let there = record(&p.b, run).expect("the destination keeps its lost record");
    assert_eq!(there["state"], "lost", "{there}");
    assert!(
        there["reason"]
            .as_str()
            .is_some_and(|r| r.contains("12 pages still there")),
        "{there}"
    );
    assert!(record(&p.a, run).is_none(), "{}", ctx());
    wait_until(T, "the source worker gone", || !alive(run.pid));
    let dir = p.a.state_dir.join("vms").join(&run.id);
    wait_until(T, "no VM directory on the source", || !dir.exists());
    wait_until(T, "nobody holds the disk lock", || !lock_held(run));
    discard(&p.b, run, "there");
}

/// Post-copy's source worker lost the VM (`fake.source_lost`: its streams broke after the
/// switch-over, and it cannot tell a dead destination from a cut) while the destination's
/// worker completed it (a cut after the last page; `fake.running_lost` loses its `running`),
/// with the vireods' link cut in the hand-over. The source asks on a new connection
/// (`where_is`), hears `here`, and its record goes: the VM is in one place, the job completed.
/// Before it asked, the source kept a `lost` record of a VM the destination ran.
#[test]
fn a_source_that_lost_post_copy_with_the_link_gone_asks_and_finds_the_vm_there() {
    let p = pair(true, true);
    let b: std::net::SocketAddr = p.b_addr.parse().unwrap();
    for i in 0..2 {
        let px = Proxy::start_healing(Target::Fixed(b), u64::MAX);
        let words = "fake.migrate_ms=200 fake.switch_ms=1500 fake.running_lost \
                     fake.unconfirmed_ms=200 fake.source_lost fake.exit_ms=500";
        let run = start_vm(&p, &format!("sl{i}"), words, true);
        let job_id = migrate(&p, &run, &px.addr.to_string());
        at_phase(&p, &job_id, Phase::Switching);
        px.cut_now();
        let place = settled(&p, &run, &job_id, Expect::Runs, true);
        assert_eq!(place, Where::Destination);
        assert_eq!(job(&p.a, &job_id)["migration"]["state"], "completed");
        // Told by `where_is`: the cut link carried no `running`.
        let answered = p.b.log().lines().any(|l| {
            l.contains("asked where a VM is") && l.contains(&run.id) && l.contains("here=Here")
        });
        assert!(answered, "the source did not ask\n{}", tail(&p.b));
    }
}

/// As above, but the vireods' link stays up: the proxy swallows what the destination says on
/// it (`Proxy::swallow_answers`: its `running` is lost) and breaks it as the source's `abort`
/// goes out, so the abort is never answered. The source then asks on a new connection
/// (`where_is`) and acts on that answer as with the link gone: `here` (the destination
/// completed the VM) → its record goes and the job completes; `lost` (the destination's
/// worker lost the VM too, `fake.postcopy_lost_ms`, before the source's gave up,
/// `fake.unconfirmed_ms=2000`) → as `lost_there`: one record, `lost`, on the destination, the
/// job failed with its migration `lost`. Until session 36 an unanswered abort was not followed
/// by a question: the source's record stayed `lost` and the job said the destination could not
/// be asked, while it ran the VM (or held the one `lost` record that should have been).
#[test]
fn a_source_that_lost_post_copy_with_its_abort_unanswered_asks_where_is() {
    let p = pair(true, true);
    let b: std::net::SocketAddr = p.b_addr.parse().unwrap();
    let common = "fake.migrate_ms=200 fake.switch_ms=1500 fake.running_lost fake.source_lost \
                  fake.exit_ms=500";
    for (i, lost_there) in [false, false, true, true].into_iter().enumerate() {
        let px = Proxy::start_healing(Target::Fixed(b), u64::MAX);
        let words = match lost_there {
            false => format!("{common} fake.unconfirmed_ms=200"),
            true => format!("{common} fake.unconfirmed_ms=2000 fake.postcopy_lost_ms=300"),
        };
        let run = start_vm(&p, &format!("sa{i}"), &words, true);
        let job_id = migrate(&p, &run, &px.addr.to_string());
        at_phase(&p, &job_id, Phase::Switching);
        px.swallow_answers();
        let j = ended(&p.a, &job_id);
        eprintln!(
            "abort unanswered (lost there: {lost_there}): {}",
            j["error"]
        );
        // The abort went out on the live link and its answer never came; then `where_is`
        // (checked once the outcome was).
        let unanswered = || {
            let said = p.a.log().lines().any(|l| {
                l.contains("no answer to the abort for the lost VM") && l.contains(&run.id)
            });
            assert!(said, "no unanswered abort\n{}", tail(&p.a));
        };
        if lost_there {
            RUNS.fetch_add(1, Ordering::SeqCst);
            settled_lost_there(&p, &run, &j, px.addr);
            unanswered();
            continue;
        }
        assert_eq!(j["migration"]["state"], "completed", "{j}");
        let place = settled(&p, &run, &job_id, Expect::Runs, true);
        assert_eq!(place, Where::Destination);
        unanswered();
        let answered = p.b.log().lines().any(|l| {
            l.contains("asked where a VM is") && l.contains(&run.id) && l.contains("here=Here")
        });
        assert!(answered, "the source did not ask\n{}", tail(&p.b));
    }
}

/// As above, but the link stays cut (new connections too) past `--migration-answer-wait`: the
/// source cannot tell, so its record stays `lost` (never started on a guess) and the job says
/// the destination could not be asked, why, and what to look at; the destination runs the VM.
#[test]
fn a_source_that_lost_post_copy_and_cannot_ask_keeps_its_lost_record_and_says_why() {
    let p = pair_with(true, true, &["--migration-answer-wait", "2"]);
    let b: std::net::SocketAddr = p.b_addr.parse().unwrap();
    for i in 0..2 {
        RUNS.fetch_add(1, Ordering::SeqCst);
        let px = Proxy::start(Target::Fixed(b), u64::MAX);
        let words = "fake.migrate_ms=200 fake.switch_ms=1500 fake.running_lost \
                     fake.unconfirmed_ms=200 fake.source_lost fake.exit_ms=500";
        let run = start_vm(&p, &format!("sn{i}"), words, true);
        let job_id = migrate(&p, &run, &px.addr.to_string());
        at_phase(&p, &job_id, Phase::Switching);
        px.cut_now();
        let j = ended(&p.a, &job_id);
        let error = j["error"].as_str().unwrap_or_default();
        eprintln!("lost here, not asked: {error}");
        let ctx = || format!("job {j}\n--- A:\n{}\n--- B:\n{}", tail(&p.a), tail(&p.b));
        assert_eq!(j["state"], "failed", "{}", ctx());
        assert_eq!(j["migration"]["state"], "lost", "{}", ctx());
        assert!(
            error.contains("was lost in the post-copy migration")
                && error.contains(&format!("{} could not be asked", px.addr))
                && error.contains("stays `lost`"),
            "{}",
            ctx()
        );
        wait_until(T, "the source's record lost", || {
            record(&p.a, &run).is_some_and(|v| v["state"] == "lost")
        });
        wait_until(T, "the source worker gone", || !alive(run.pid));
        wait_until(T, "the VM running on the destination", || {
            record(&p.b, &run).is_some_and(|v| v["state"] == "running")
        });
        assert!(lock_held(&run), "the destination's worker holds the disk");
        // The user's way out, as the job says: discard it here, keep it there.
        discard(&p.a, &run, "here");
        let _ = p.b.post(&format!("/v1/vms/{}/turn-off", run.id));
        wait_until(T, "the VM off there", || {
            record(&p.b, &run).is_some_and(|v| v["state"] == "off")
        });
        let r = p.b.request("DELETE", &format!("/v1/vms/{}", run.id), None);
        assert!(r.status < 300, "{}", String::from_utf8_lossy(&r.body));
    }
}
