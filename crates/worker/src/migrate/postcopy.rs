//! Post-copy in the workers (docs/migration.md, "Post-copy"): the request channel, the
//! source's serving after `RUNNING`, the destination's start before it resumes the VM, and
//! the **lost** path on both sides. Past the switch-over neither copy of the VM may run on
//! its own: the destination lacks pages, the source's copy is older than what the destination
//! already ran (its disk writes included). So a failure then stops the VM and the worker
//! exits `MigrationLost` with the reason; it is never resumed on zero-filled or stale pages.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;
use vireo_api::worker::{MigrateState, PostcopyMode, WorkerExitReason};
use vireo_migration::hostauth::{self, ClientConfig, ClientStream, ServerStream};
use vireo_migration::preamble::Preamble;
use vireo_vmm::{DirtyBitmap, MigrateShared, PostcopyIncoming, PostcopyOutcome, PostcopyPolicy};

use super::{handoff, lock, IO_TIMEOUT};
use crate::server::State;

/// After the VM is declared lost, how long the worker waits for it to stop cleanly before it
/// records the exit and ends the process anyway: a vCPU or device thread blocked on a page
/// that will never come cannot be woken without handing it a wrong page.
const LOST_EXIT_LIMIT: Duration = Duration::from_secs(8);

pub fn policy(mode: PostcopyMode) -> PostcopyPolicy {
    match mode {
        PostcopyMode::Never => PostcopyPolicy::Never,
        PostcopyMode::Auto => PostcopyPolicy::Auto,
        PostcopyMode::Always => PostcopyPolicy::Always,
    }
}

/// What a destination answers on the request channel when its VM cannot take post-copy,
/// followed by the reason (its guest RAM is on the hugetlb pool).
pub const NO_POSTCOPY: &str = "NO ";

/// Source: opens the request channel (before the page streams, so the destination meets it
/// while it accepts them). Its reads never time out: requests may be far apart. `Ok(None)`:
/// the destination cannot take post-copy and `mode` is `auto`, so the migration goes on
/// pre-copy only; with `always` that is an error.
pub fn connect_requests(
    to: SocketAddr,
    cfg: Arc<ClientConfig>,
    session: Uuid,
    streams: u16,
    mode: PostcopyMode,
) -> Result<Option<ClientStream>, String> {
    let mut c = hostauth::connect(to, cfg, IO_TIMEOUT)
        .map_err(|e| format!("post-copy request channel to {to}: {e}"))?;
    Preamble::requests(session, streams)
        .write(&mut c)
        .map_err(|e| format!("post-copy request channel to {to}: {e}"))?;
    let answer = handoff::recv(&mut c)
        .map_err(|e| format!("post-copy request channel to {to}: waiting for OK: {e}"))?;
    if let Some(why) = answer.strip_prefix(NO_POSTCOPY) {
        if mode == PostcopyMode::Always {
            return Err(format!(
                "the destination {to} cannot take post-copy ({why}); migrate with \
                 --postcopy auto or never"
            ));
        }
        tracing::info!("migrating pre-copy only: the destination {to} says {why}");
        return Ok(None);
    }
    if answer != "OK" {
        let why = answer.strip_prefix("FAILED ").unwrap_or(&answer);
        return Err(format!(
            "post-copy request channel to {to}: the destination refused it: {why}"
        ));
    }
    let _ = c.tcp().set_read_timeout(None);
    Ok(Some(c))
}

/// Source, after `RUNNING`: serves the missing pages on every stream until all are sent.
/// `Ok`: the VM may stop here (it runs there, complete). `Err`: it is lost (recorded; the VM
/// stopped).
pub fn serve(
    s: &Arc<State>,
    streams: &mut [ClientStream],
    requests: ClientStream,
    missing: &DirtyBitmap,
    shared: &MigrateShared,
    bandwidth: Option<u64>,
) -> Result<(), String> {
    s.migration.set_state(MigrateState::Postcopy);
    test_serve_hold();
    match s
        .vm
        .serve_postcopy(streams, requests, missing, shared, bandwidth)
    {
        Ok(served) => {
            tracing::info!(
                "post-copy: {} pages sent ({} asked for in {} requests) in {} ms, per stream \
                 {:?}",
                served.pages,
                served.requested,
                served.requests,
                served.millis,
                served.per_stream
            );
            Ok(())
        }
        Err(e) => {
            let why = format!(
                "the destination went away during post-copy ({e}); it had started the VM, \
                 so the copy here is out of date and is not resumed"
            );
            lose(s, &why);
            Err(why)
        }
    }
}

/// Fault injection (`crates/cli/tests/e2e/migrate_nic.rs`): `VIREO_TEST_POSTCOPY_SERVE_HOLD_MS=N`
/// holds the source N ms after `RUNNING` before it serves a page, so the destination's vCPUs
/// and back ends wait on their first missing page for certain when a test strikes (served at
/// once, a page comes in about a millisecond). Unset, nothing waits.
fn test_serve_hold() {
    crate::fault_hooks::hold("VIREO_TEST_POSTCOPY_SERVE_HOLD_MS", "post-copy: serving");
}

/// Destination, before resuming: registers the missing pages and starts the fault thread.
/// `Err` leaves the VM unresumed (the caller fails the handoff; the source keeps the VM).
pub fn start(
    vm: &vireo_vmm::Vm,
    s: &Arc<State>,
    missing: &[(u64, u64)],
    requests: Option<ServerStream>,
) -> Result<PostcopyIncoming, String> {
    let requests = requests.ok_or_else(|| {
        "the source switched to post-copy but opened no request channel".to_string()
    })?;
    let st = s.clone();
    vm.start_postcopy(
        missing,
        requests,
        Box::new(move |o: &PostcopyOutcome| match o {
            PostcopyOutcome::Complete { .. } => st.migration.finish(&Ok(())),
            PostcopyOutcome::Lost(why) => lose(&st, why),
        }),
    )
    .map_err(|e| format!("starting post-copy: {e}"))
}

/// The VM is lost: record why, stop it, and make sure the process ends in bounded time.
pub fn lose(s: &Arc<State>, why: &str) {
    tracing::error!("the VM is lost: {why}");
    *lock(&s.migration.lost) = Some(why.to_string());
    // One update, not `finish` (which says `Failed`) then `Lost`: vireod polling in between
    // took the VM for one that runs on here.
    s.migration.update(|p| {
        p.state = MigrateState::Lost;
        p.message = Some(why.to_string());
    });
    lock(&s.migration.sockets).clear();
    s.vm.request_stop();
    let (dir, why) = (s.vm_dir.clone(), why.to_string());
    let _ = std::thread::Builder::new()
        .name("lost-exit".into())
        .spawn(move || {
            std::thread::sleep(LOST_EXIT_LIMIT);
            tracing::error!("the VM did not stop within {LOST_EXIT_LIMIT:?}; exiting");
            let _ =
                crate::files::write_exit(&dir, WorkerExitReason::MigrationLost { message: why });
            std::process::exit(1);
        });
}
