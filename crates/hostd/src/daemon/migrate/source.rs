//! The source side: `POST /v1/vms/{vm}/migrate` → a `migrate` job.
//!
//! - **Live**: connect to the destination vireod (mutual TLS), offer the VM, and once it
//!   accepted (its worker listens), tell our worker `MigrateOut`; its `MigrateStatus` is the
//!   job's progress. The VM has moved when our worker exits `MigratedAway` and the
//!   destination says `Running`: then the record here is removed (the disks stay on shared
//!   storage; a shared-nothing migration's go unless `keep_source`: `source_files.rs`). Before
//!   the switch-over a cancel is `MigrateCancel` + `Abort`: the VM runs on here and the
//!   destination removes its record.
//! - **Quick**: offer, save the VM (the ordinary save), send the saved files, `Commit`; the
//!   destination restores it. `Running` → the record here goes; `Failed` → the VM is started
//!   here again from its saved state. The downtime (save start → running there) is measured.
//!   From before the save to the job's end `quick_note.rs` records the migration in the VM's
//!   folder, so a vireod that dies meanwhile settles it at its restart (`quick_recover.rs`).
//!
//! The VM's lock is held for the whole job; the host's migration slots (`--max-migrations`)
//! are taken first, so extra migrations queue (progress 0) until one ends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;
use vireo_api::migrate::{
    MigrateRequest, PeerMsg, StorageMode, SwitchProviderAddresses, VmWhereabouts,
    DEFAULT_MAX_DOWNTIME_MS, MAX_STREAMS, PEER_PROTOCOL_VERSION,
};
use vireo_api::worker::{
    MigrateOptions, MigrateProgress, MigrateState, WorkerExit, WorkerExitReason, WorkerOp,
    WorkerReply,
};
use vireo_api::{transition, Action, ApiErrorCode, Job, JobKind, JobState, Vm, VmState};

use super::peer::Peer;
use crate::daemon::http_error::HttpError;
use crate::daemon::jobs::cancelled;
use crate::daemon::supervisor::Worker;
use crate::daemon::switches::{netvirt_move, nics};
use crate::daemon::worker_client::{call_once, KeptConn, WorkerCallError};
use crate::daemon::{files, lifecycle, save, Daemon};

/// How often the job asks its worker how the migration goes. Short: the job's end (and so
/// `vireo vm migrate`'s) waits for the poll that sees the worker's `completed`, and a status
/// over the worker's socket costs well under a millisecond.
const POLL: Duration = Duration::from_millis(10);
/// The destination's answer to an offer (it may spawn a worker first).
const OFFER_LIMIT: Duration = Duration::from_secs(30);
/// From our worker's hand-over (or the last file) to the destination's `Running`.
const ARRIVAL_LIMIT: Duration = Duration::from_secs(120);
/// How long our (live) worker may leave status polls unanswered before it is given up on.
/// Counted in time, not polls: a failed poll can return at once (the socket's backlog), and
/// 50 polls of 10 ms gave a worker only half a second, which a loaded host (load 14 on 2
/// cores, a build beside the tests) took from it mid-migration.
const WORKER_SILENCE: Duration = Duration::from_secs(15);

fn invalid(message: String) -> HttpError {
    HttpError::new(ApiErrorCode::Invalid, message)
}

/// `POST /v1/vms/{vm}/migrate`: checked here, then 202 with the job.
pub async fn start(daemon: &Arc<Daemon>, vm: &Vm, req: MigrateRequest) -> Result<Job, HttpError> {
    if req.with_storage {
        if req.quick {
            return Err(invalid(
                "with_storage (--with-storage) is a live migration; leave out quick".into(),
            ));
        }
        match &req.dest_dir {
            Some(d) if d.is_absolute() => {}
            Some(d) => {
                return Err(invalid(format!(
                    "dest_dir {}: give an absolute folder on the destination",
                    d.display()
                )))
            }
            None => {
                return Err(invalid(
                    "with_storage (--with-storage) needs dest_dir (--dest-dir), the folder on \
                     the destination the disk copies are created in"
                        .into(),
                ))
            }
        }
    } else if req.dest_dir.is_some() {
        return Err(invalid(
            "dest_dir (--dest-dir) is for a shared-nothing migration; add with_storage \
             (--with-storage)"
                .into(),
        ));
    } else if req.keep_source {
        return Err(invalid(
            "keep_source (--keep-source) is for a shared-nothing migration, whose source \
             deletes its disk files once the VM runs on the destination; add with_storage \
             (--with-storage), or leave keep_source out (on shared storage nothing is deleted)"
                .into(),
        ));
    }
    let to: SocketAddr = req.to.parse().map_err(|_| {
        invalid(format!(
            "to {:?}: expected the destination's migration listener as ADDR:PORT with a \
             literal IP, e.g. 192.0.2.7:7070",
            req.to
        ))
    })?;
    let streams = req.streams.unwrap_or(1);
    if !(1..=MAX_STREAMS).contains(&streams) {
        return Err(invalid(format!("streams {streams}: 1 to {MAX_STREAMS}")));
    }
    if req.bandwidth == Some(0) {
        return Err(invalid(
            "bandwidth 0: give bytes per second, or leave it out for no cap".into(),
        ));
    }
    let guard = daemon.try_lock_vm(vm)?;
    let vm = daemon.store.get_by_id(vm.id())?;
    let name = vm.spec.name.clone();
    let movable = match req.quick {
        true => transition(&vm.state, &Action::Save).is_ok(),
        false => vm.state == VmState::Running,
    };
    if !movable {
        let want = if req.quick {
            "running or paused"
        } else {
            "running"
        };
        return Err(HttpError::conflict(format!(
            "cannot migrate VM {name:?} while it is {}; it must be {want}",
            vm.state
        )));
    }
    if daemon.sup.get(vm.id()).is_none() {
        return Err(HttpError::conflict(format!(
            "VM {name:?} has no worker now (it is ending); retry"
        )));
    }
    let tree = checkpoint_tree(daemon, &vm, &req)?;
    // Shared-nothing: what each disk is, for the destination's checks (refused here, before
    // a job, if a disk cannot be copied). With a checkpoint tree, the user's files it uses
    // instead, then the disks outside it: the tops are copied into children of the arrived
    // tree, not flattened.
    let disks = match (req.with_storage, &tree) {
        (false, _) => Vec::new(),
        (true, None) => super::storage::describe(&vm.spec).map_err(invalid)?,
        (true, Some(t)) => super::tree::describe_copied(t, &vm.spec)?,
    };
    let job = daemon.store.create_job(Some(vm.id()), JobKind::Migrate)?;
    let cancel = daemon.jobs.register(job.id);
    daemon.migrations.set_progress(
        job.id,
        MigrateProgress {
            memory_bytes: vm.spec.memory_bytes,
            ..Default::default()
        },
    );
    let d = daemon.clone();
    let job_id = job.id;
    daemon.migrations.start_phases(job_id);
    tokio::spawn(async move {
        let end = run(
            &d,
            &vm,
            to,
            req,
            (disks, tree),
            streams,
            job_id,
            cancel,
            guard,
        )
        .await;
        if let Some(line) = d.migrations.phases_line(job_id) {
            tracing::info!(vm = %vm.id(), "migration timeline (source vireod, from the job's start): {line}");
        }
        match end {
            End::Done => {
                let _ = d.store.finish_job(job_id, Ok(()));
            }
            End::Cancelled => {
                let _ = d.store.cancel_job(job_id);
            }
            End::Failed(m) => fail_job(&d, &vm, job_id, MigrateState::Failed, m),
            End::Lost(m) => fail_job(&d, &vm, job_id, MigrateState::Lost, m),
        }
        d.jobs.finished(job_id);
    });
    Ok(job)
}

/// The job fails with `m`, its migration ending in `state` (`failed`, or `lost`).
fn fail_job(d: &Daemon, vm: &Vm, job: Uuid, state: MigrateState, m: String) {
    tracing::warn!(vm = %vm.id(), ?state, "migration failed: {m}");
    d.migrations.update_progress(job, |p| {
        p.state = state;
        p.message = Some(m.clone());
    });
    let _ = d.store.finish_job(job, Err(m));
}

/// The VM's checkpoint tree travels with it (`tree.rs`): in a quick migration whole, in a
/// live one with its running tops copied live; in a shared-nothing one the user's files it
/// uses (the base disks) travel too, into `dest_dir`, and so do the disks in none of the
/// checkpoints, flattened there.
fn checkpoint_tree(
    daemon: &Daemon,
    vm: &Vm,
    req: &MigrateRequest,
) -> Result<Option<Box<vireo_api::migrate::CheckpointTree>>, HttpError> {
    let Some(tree) = super::tree::describe(daemon, vm, req.with_storage)? else {
        return Ok(None);
    };
    Ok(Some(Box::new(tree)))
}

pub(super) enum End {
    Done,
    Cancelled,
    Failed(String),
    /// Post-copy lost the VM (here or on the destination): the job fails with this error and
    /// its `migration.state` says `lost`, not `failed` (a failed migration leaves the VM
    /// running here; a lost one leaves it whole nowhere).
    Lost(String),
}

/// `POST /v1/jobs/{id}/cancel` of a migration: passed on to its task, which ends the job as
/// cancelled (the VM runs on here) or, past the switch-over, as completed.
pub fn cancel(daemon: &Daemon, job: &Job) -> Result<Job, HttpError> {
    if !daemon.jobs.cancel(job.id) {
        return Err(HttpError::conflict(
            "this migration is not run by this vireod (it restarted), or it settles one a \
             restart cut short, which ends by itself within --migration-answer-wait; nothing to \
             cancel",
        ));
    }
    Ok(job.clone())
}

#[allow(clippy::too_many_arguments)]
async fn run(
    d: &Arc<Daemon>,
    vm: &Vm,
    to: SocketAddr,
    req: MigrateRequest,
    (disks, tree): (
        Vec<vireo_api::migrate::CopiedDisk>,
        Option<Box<vireo_api::migrate::CheckpointTree>>,
    ),
    streams: u16,
    job: Uuid,
    cancel: tokio::sync::watch::Receiver<bool>,
    guard: OwnedMutexGuard<()>,
) -> End {
    let mut cancel_wait = Box::pin(cancelled(cancel));
    // Queued behind the host's other migrations; a cancel meanwhile ends it here.
    let slots = d.migrations.slots();
    let _permit = tokio::select! {
        p = slots.acquire_owned() => match p {
            Ok(p) => p,
            Err(_) => return End::Failed("vireod is shutting down".into()),
        },
        () = &mut cancel_wait => return End::Cancelled,
    };
    let _ = d.store.set_job_progress(job, 1);
    d.migrations.mark(job, "slot taken");
    let mut peer = match Peer::connect(&d.host, to).await {
        Ok(p) => p,
        Err(e) => return End::Failed(format!("{e}; VM {:?} runs on here", vm.spec.name)),
    };
    d.migrations.mark(job, "peer connected (TLS)");
    let session = Uuid::new_v4();
    // Shared-nothing: the kernel and initrd too, which the destination may lack.
    let boot_files = match req.with_storage {
        true => {
            let spec = vm.spec.clone();
            match tokio::task::spawn_blocking(move || super::boot_files::describe(&spec)).await {
                Ok(Ok(files)) => files,
                Ok(Err(e)) => {
                    return End::Failed(format!("{e}; VM {:?} runs on here", vm.spec.name))
                }
                Err(e) => return End::Failed(format!("reading the boot files: {e}")),
            }
        }
        false => Vec::new(),
    };
    let offer = PeerMsg::Offer {
        version: PEER_PROTOCOL_VERSION,
        vm_id: vm.id(),
        spec: Box::new(vm.spec.clone()),
        storage: match req.with_storage {
            true => StorageMode::Copied,
            false => StorageMode::Shared,
        },
        session,
        streams,
        quick: req.quick,
        dest_dir: req.dest_dir.clone(),
        disks,
        checkpoints: tree.clone(),
        postcopy: req.postcopy,
        disk_slots: if req.quick {
            Vec::new()
        } else {
            slots_with_a_gap(d, vm).await
        },
        boot_files,
    };
    // In TLS 1.3 the server checks our certificate after our side finished the handshake:
    // a destination that does not trust this host answers the first message with an alert.
    let refused_us = |e: String| {
        if e.contains("alert") {
            format!(
                "the TLS handshake with {to} failed ({e}): the destination does not trust this \
                 host; run `vireo host trust add` there with this host's fingerprint (`vireo \
                 host identity`)"
            )
        } else if e.contains("closed the connection") {
            format!(
                "{e} at the offer: the TLS handshake may have failed there (a destination that \
                 does not trust this host); run `vireo host trust add` there with this host's \
                 fingerprint (`vireo host identity`)"
            )
        } else {
            e
        }
    };
    // Nothing of the VM changed yet: whatever ends it at the offer says it still runs here.
    let runs_here = |e: String| End::Failed(format!("{e}; VM {:?} runs on here", vm.spec.name));
    if let Err(e) = peer.send(&offer).await {
        return runs_here(refused_us(e));
    }
    let (listen_addr, dest_pas, send_files) = match peer.recv(OFFER_LIMIT).await {
        Ok(PeerMsg::Accepted {
            listen_addr,
            provider_addresses,
            send_files,
        }) => (listen_addr, provider_addresses, send_files),
        Ok(PeerMsg::Refused { reason }) => {
            return runs_here(format!("the destination {to} refused the VM: {reason}"))
        }
        Ok(other) => return runs_here(format!("{to} answered the offer with {other:?}")),
        Err(e) => return runs_here(refused_us(e)),
    };
    d.migrations.mark(job, "offer accepted");
    let _ = d.store.set_job_progress(job, 5);
    if req.quick {
        let end = quick(
            d,
            (vm, tree.as_deref()),
            (&mut peer, to),
            job,
            &mut cancel_wait,
            guard,
            &dest_pas,
        )
        .await;
        // Ended, whichever way (a moved VM's folder went with its record).
        super::quick_note::remove(d, vm.id());
        return end;
    }
    // Live with a checkpoint tree, or boot files the destination lacks: those files first
    // (the tree but its running tops), then the worker's address. Nothing of the VM changed
    // here yet, so any failure leaves it as it was.
    let (listen_addr, dest_pas) = match listen_addr {
        None => {
            let first = (tree.as_deref(), &send_files[..]);
            match send_files_first(d, &mut peer, vm, first, job, &mut cancel_wait).await {
                Ok(accepted) => accepted,
                Err(end) => return end,
            }
        }
        addr => (addr, dest_pas),
    };
    let Some(listen_addr) = listen_addr else {
        return End::Failed(format!("{to} accepted without a worker address"));
    };
    // The running tops travel as the worker's disk copy, each into its new empty child there;
    // shared-nothing, the disks outside the tree after them, flattened.
    let tops = tree
        .as_ref()
        .map(|t| t.tops.iter().map(|t| t.serial.clone()).collect());
    let flattened = match (&tree, req.with_storage) {
        (Some(t), true) => match super::tree::flattened_serials(t, &vm.spec) {
            Ok(serials) => serials,
            Err(e) => {
                abort(&mut peer, &e).await;
                return End::Failed(format!("{e}; VM {:?} runs on here", vm.spec.name));
            }
        },
        _ => Vec::new(),
    };
    let outside = match &tree {
        Some(_) => super::tree::outside_vm_dir(d, vm),
        None => Vec::new(),
    };
    // Shared-nothing: the files the copy reads, listed now (the running tops' folder goes with
    // the record), deleted once the VM runs there.
    let copied = match req.with_storage {
        true => super::source_files::copied(vm, tree.as_deref()),
        false => Vec::new(),
    };
    let end = live(
        d,
        vm,
        &mut peer,
        (&req, (tops, flattened), copied),
        streams,
        session,
        (to, listen_addr),
        job,
        &mut cancel_wait,
        &dest_pas,
    )
    .await;
    if matches!(end, End::Done) {
        super::tree::remove_outside(&outside);
    }
    end
}

/// Live, when the destination answered the offer without an address: every file of the
/// checkpoint tree but the running tops, and the boot files it asked for (`send_files`), then
/// `TreeSent`; the destination's answer (`Accepted`: its worker's address and provider
/// addresses). `Err` is the job's end, the destination told to drop what arrived.
async fn send_files_first(
    d: &Daemon,
    peer: &mut Peer,
    vm: &Vm,
    (tree, send_files): (Option<&vireo_api::migrate::CheckpointTree>, &[String]),
    job: Uuid,
    cancel_wait: &mut std::pin::Pin<Box<impl std::future::Future<Output = ()>>>,
) -> Result<(Option<SocketAddr>, Vec<SwitchProviderAddresses>), End> {
    if let Some(tree) = tree {
        d.migrations.mark(job, "checkpoint tree");
        if let Err(e) = send_tree(peer, tree, true, job, d).await {
            abort(peer, &e).await;
            return Err(End::Failed(format!(
                "sending the checkpoint tree failed: {e}; the VM runs on here"
            )));
        }
    }
    if let Err(e) = send_boot_files(peer, vm, send_files).await {
        abort(peer, &e).await;
        return Err(End::Failed(format!("{e}; the VM runs on here")));
    }
    if !send_files.is_empty() {
        d.migrations
            .mark(job, &format!("boot files sent: {}", send_files.join(", ")));
    }
    if futures_ready(cancel_wait).await {
        abort(peer, "cancelled").await;
        return Err(End::Cancelled);
    }
    let what = match (tree.is_some(), send_files.is_empty()) {
        (true, true) => "the checkpoint tree",
        (true, false) => "the checkpoint tree and the boot files",
        (false, _) => "the boot files",
    };
    let answer = match peer.send(&PeerMsg::TreeSent).await {
        Ok(()) => peer.recv(ARRIVAL_LIMIT).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(PeerMsg::Accepted {
            listen_addr,
            provider_addresses,
            ..
        }) => {
            if tree.is_some() {
                d.migrations.mark(job, "checkpoint tree in");
            }
            Ok((listen_addr, provider_addresses))
        }
        Ok(PeerMsg::Failed { reason }) => Err(End::Failed(format!(
            "the destination did not take {what}: {reason}; the VM runs on here"
        ))),
        Ok(other) => {
            abort(peer, "unexpected answer").await;
            Err(End::Failed(format!(
                "the destination answered {what} with {other:?}; the VM runs on here"
            )))
        }
        // The VM was never paused: it runs on here whatever became of the destination (whose
        // arrival, without a worker yet, is removed there when its connection ends).
        Err(e) => Err(End::Failed(format!(
            "the destination did not answer once {what} was sent ({e}); the VM runs on here"
        ))),
    }
}

/// The kernel and initrd the destination asked for, by their `File` names.
async fn send_boot_files(peer: &mut Peer, vm: &Vm, names: &[String]) -> Result<(), String> {
    use vireo_api::migrate::BootRole;
    for name in names {
        let path = match name.as_str() {
            n if n == BootRole::Kernel.file_message_name() => Some(vm.spec.kernel.as_path()),
            n if n == BootRole::Initrd.file_message_name() => vm.spec.initrd.as_deref(),
            _ => None,
        }
        .ok_or_else(|| format!("the destination asked for {name:?}, which this VM has not"))?;
        peer.send_file(std::path::Path::new(name), path)
            .await
            .map_err(|e| format!("sending the {name}: {e}"))?;
    }
    Ok(())
}

/// The destination's answer to an `abort`.
enum AbortAnswer {
    /// Its worker had resumed the VM already (ours died or lost the `RUNNING` line after
    /// releasing its disks): the VM is there.
    Running,
    /// The arrival is gone there (`aborted`, or `failed` with the destination's reason).
    Removed(Option<String>),
    /// Its worker had resumed the VM in post-copy and lost it: the record there is `lost`.
    LostThere(String),
    /// No answer came (the link went): only asking tells where the VM is.
    Lost(String),
}

/// Tells the destination to drop the VM, and what it answered.
async fn abort(peer: &mut Peer, reason: &str) -> AbortAnswer {
    if let Err(e) = peer
        .send(&PeerMsg::Abort {
            reason: reason.to_string(),
        })
        .await
    {
        return AbortAnswer::Lost(e);
    }
    match peer.recv(Duration::from_secs(90)).await {
        Ok(PeerMsg::Running) => AbortAnswer::Running,
        Ok(PeerMsg::Aborted) => AbortAnswer::Removed(None),
        Ok(PeerMsg::Failed { reason }) => AbortAnswer::Removed(Some(reason)),
        Ok(PeerMsg::LostHere { reason }) => AbortAnswer::LostThere(reason),
        Ok(other) => AbortAnswer::Lost(format!("it answered the abort with {other:?}")),
        Err(e) => AbortAnswer::Lost(e),
    }
}

/// Our worker failed or died with the destination's word on the VM not in (its `running` or
/// the answer to our `abort` lost with the link, docs/migration.md "Live migration after a
/// lost answer"). The destination's worker may have resumed the VM, so this is asked, never
/// guessed: `abort` while the link lives, then `where_is` on new connections
/// (`whereabouts.rs`). `Err`: no final answer came. `Ok(Here(reason))`: the VM is here, with
/// the destination's reason for its failure if it gave one. `Ok(LostThere(reason))`: its
/// record there is `lost`, whichever way it was told (`lost_here` or `where_is`).
async fn runs_there(
    d: &Daemon,
    peer: &mut Peer,
    to: SocketAddr,
    vm_id: Uuid,
    why: &str,
    link_lost: bool,
) -> Result<Place, String> {
    if !link_lost {
        match abort(peer, why).await {
            AbortAnswer::Running => return Ok(Place::There),
            AbortAnswer::Removed(reason) => return Ok(Place::Here(reason)),
            AbortAnswer::LostThere(reason) => return Ok(Place::LostThere(reason)),
            AbortAnswer::Lost(e) => {
                tracing::warn!(vm = %vm_id, "no answer to the abort ({e}); asking {to}")
            }
        }
    }
    match super::whereabouts::ask(d, to, vm_id).await? {
        VmWhereabouts::Here => Ok(Place::There),
        VmWhereabouts::Lost { reason } => Ok(Place::LostThere(reason)),
        VmWhereabouts::Absent | VmWhereabouts::Arriving => Ok(Place::Here(None)),
    }
}

/// Our worker lost the VM in post-copy with the link to the destination gone: where the
/// destination says the VM is, as an answer to an `abort` would have said it (`Lost`: it could
/// not be asked within `--migration-answer-wait`).
async fn lost_asked(d: &Daemon, to: SocketAddr, vm_id: Uuid) -> AbortAnswer {
    match super::whereabouts::ask(d, to, vm_id).await {
        // It completed there: a cut after the last page.
        Ok(VmWhereabouts::Here) => AbortAnswer::Running,
        Ok(VmWhereabouts::Lost { reason }) => AbortAnswer::LostThere(reason),
        // Never whole there: the VM ran here last, its record stays `lost` here.
        Ok(VmWhereabouts::Absent | VmWhereabouts::Arriving) => AbortAnswer::Removed(None),
        Err(e) => AbortAnswer::Lost(e),
    }
}

/// Where `runs_there` found the VM.
enum Place {
    There,
    Here(Option<String>),
    /// Resumed there in post-copy and lost: the destination's record says so with the reason.
    LostThere(String),
}

/// The VM resumed on the destination in post-copy and was lost there (our worker died or its
/// streams broke after the switch-over): the destination's record is `lost`, so ours goes as
/// after a move — one record, on the host that ran the VM last — and the job fails saying so,
/// its migration `lost` (`End::Lost`; until session 36 the job's end overwrote it `failed`).
/// Not `finish_moved`: the migration never completed, and its figures stay as they were.
async fn lost_there(
    d: &Daemon,
    vm: &Vm,
    job: Uuid,
    to: SocketAddr,
    reason: &str,
    dest_pas: &[SwitchProviderAddresses],
) -> End {
    let lost = format!(
        "VM {:?} was lost in the post-copy migration on {to}, where its record now says so: \
         {reason}",
        vm.spec.name
    );
    match forget_moved(d, vm, job, dest_pas).await {
        Ok(()) => End::Lost(lost),
        // Lost there all the same: the job says that first.
        Err(e) => End::Lost(format!("{lost}; {e}")),
    }
}

/// Our worker lost the VM in post-copy and `to` could not be asked whether it completed there:
/// the record here stays `lost`, and the job says to look there before starting it here.
fn lost_unasked(name: &str, to: SocketAddr, why: &str, asked: &str) -> End {
    End::Lost(format!(
        "the VM {name:?} was lost in the post-copy migration: {why}. {to} could not be asked \
         whether it completed there ({asked}), so its record here stays `lost`. Look on {to} \
         (`vireo vm list`) before starting it here: if it runs there, discard it here (`vireo \
         vm turn-off {name}`, then `vireo vm rm {name}`, without --delete-disks: they are the \
         disks it runs from there)"
    ))
}

/// The job's error when `runs_there` got no final answer: where the VM may run, and what to do.
fn unknown_place(name: &str, to: SocketAddr, why: &str, asked: &str) -> End {
    End::Failed(format!(
        "the migration of VM {name:?} broke in the switch-over ({why}) and {to} could not be \
         asked where the VM is ({asked}): it may be running there. Here its worker is left as \
         it is (paused if the destination held its disks). Look on {to} (`vireo vm list`): if \
         it runs there, turn it off here (`vireo vm turn-off {name}`), else resume it here \
         (`vireo vm resume {name}`)"
    ))
}

/// The worker's `exit.json`, if it wrote one for its pid.
fn exit_of(w: &Worker) -> Option<WorkerExitReason> {
    files::read_json::<WorkerExit>(&files::path(&w.dir, files::EXIT))
        .filter(|e| e.pid == w.pid)
        .map(|e| e.reason)
}

/// The worker's progress `p`, its bytes counted after the `sent_before` vireod sent itself.
fn after(sent_before: u64, mut p: MigrateProgress) -> MigrateProgress {
    p.transferred_bytes = p.transferred_bytes.saturating_add(sent_before);
    p
}

fn percent(p: &MigrateProgress) -> u8 {
    // Shared-nothing: the disks' copy is the first half.
    let (base, span) = match p.disk_bytes_total {
        0 => (5, 90),
        t => {
            let disks = 5 + p.disk_bytes_copied.min(t) * 45 / t;
            if p.round == 0 && p.transferred_bytes == 0 {
                return disks as u8;
            }
            (50, 45)
        }
    };
    if p.memory_bytes == 0 {
        return base as u8;
    }
    (base + (p.transferred_bytes.min(p.memory_bytes) * span / p.memory_bytes)) as u8
}

/// The disk copy's records: the running tops' serials (`None`: every disk, flattened), then
/// those of the disks outside the tree, flattened (`DiskTransfer`).
type Layers = (Option<Vec<String>>, Vec<String>);

#[allow(clippy::too_many_arguments)]
async fn live(
    d: &Arc<Daemon>,
    vm: &Vm,
    peer: &mut Peer,
    (req, (tops, flattened), copied): (&MigrateRequest, Layers, Vec<PathBuf>),
    streams: u16,
    session: Uuid,
    (to, listen_addr): (SocketAddr, SocketAddr),
    job: Uuid,
    cancel_wait: &mut std::pin::Pin<Box<impl std::future::Future<Output = ()>>>,
    dest_pas: &[SwitchProviderAddresses],
) -> End {
    let name = &vm.spec.name;
    let Some(worker) = d.sup.get(vm.id()) else {
        abort(peer, "the VM ended on the source").await;
        return End::Failed(format!("VM {name:?} ended before the migration began"));
    };
    // What vireod sent itself before the worker began (a checkpoint tree's files): the
    // worker counts from zero, so its figures are added to this one, never put in its place
    // (the job's `transferred_bytes` only grows).
    let sent_before = d
        .migrations
        .progress(job)
        .map_or(0, |p| p.transferred_bytes);
    let tls = match d.host.worker_tls() {
        Ok(t) => t,
        Err(e) => {
            abort(peer, "source configuration").await;
            return End::Failed(e.to_string());
        }
    };
    let op = WorkerOp::MigrateOut {
        to: listen_addr,
        session,
        options: MigrateOptions {
            max_downtime_ms: req.max_downtime_ms.unwrap_or(DEFAULT_MAX_DOWNTIME_MS),
            bandwidth: req.bandwidth,
            compress: req.compress,
            streams,
            postcopy: req.postcopy,
            // Shared-nothing, or a checkpoint tree's running tops: the worker sends the disks
            // to the destination vireod first.
            storage: (req.with_storage || tops.is_some()).then_some(
                vireo_api::worker::DiskTransfer {
                    to,
                    session,
                    tops,
                    flattened,
                },
            ),
        },
        tls,
    };
    d.migrations.worker_clock_starts(job);
    match call_once(&worker.socket(), op).await {
        Ok(WorkerReply::Ok) => {}
        Ok(other) => {
            abort(peer, "the source worker did not start").await;
            return End::Failed(format!("the worker of VM {name:?} answered {other:?}"));
        }
        Err(WorkerCallError::Refused(m)) => {
            abort(peer, &m).await;
            return End::Failed(format!("the worker of VM {name:?} cannot migrate: {m}"));
        }
        Err(e) => {
            abort(peer, "the source worker did not answer").await;
            return End::Failed(format!("the worker of VM {name:?} did not answer: {e}"));
        }
    }
    let mut asked_cancel = false;
    let mut silent_since: Option<tokio::time::Instant> = None;
    let mut status = KeptConn::default();
    let mut dest_running = false;
    let mut dest_failed: Option<String> = None;
    // Only the destination's own `failed` is its word; a broken link says nothing of the VM.
    let mut dest_said_failed = false;
    let mut link_lost = false;
    // A cancel our worker took, and then reported `cancelled`, ended its migration before the
    // switch-over: the VM stays here. (A worker that had failed on its own may take a cancel
    // too, so the answer alone proves nothing; found by the fault suite.)
    let mut cancel_taken = false;
    // `true` once our worker saw its migration to the end (`completed`, or its exit
    // `migrated_away`): only then are the source's files known to be needed by nobody. A VM
    // found running there after our worker died or failed may still be in post-copy, and be
    // lost there.
    let (downtime, worker_saw_end) = loop {
        enum Ev {
            Msg(Result<PeerMsg, String>),
            Cancel,
            Tick,
        }
        let ev = tokio::select! {
            m = peer.recv(Duration::from_secs(3600)), if !dest_running && dest_failed.is_none() => Ev::Msg(m),
            () = &mut *cancel_wait, if !asked_cancel => Ev::Cancel,
            () = tokio::time::sleep(POLL) => Ev::Tick,
        };
        match ev {
            Ev::Msg(Ok(PeerMsg::Running)) => {
                d.migrations.mark(job, "destination said running");
                dest_running = true;
            }
            Ev::Msg(Ok(PeerMsg::Failed { reason })) => {
                // Our worker sees its streams fail too; make sure it stops trying.
                cancel_taken |= cancel_worker(&worker).await;
                dest_failed = Some(reason);
                dest_said_failed = true;
            }
            Ev::Msg(Ok(PeerMsg::LostHere { reason })) => {
                // Our worker's post-copy serving breaks too; it stops the VM and exits.
                return lost_there(d, vm, job, to, &reason, dest_pas).await;
            }
            Ev::Msg(Ok(other)) => {
                tracing::warn!(vm = %vm.id(), "unexpected {other:?} from the destination")
            }
            Ev::Msg(Err(e)) => {
                // The destination vireod is gone: our worker's own streams decide.
                cancel_taken |= cancel_worker(&worker).await;
                dest_failed = Some(e);
                link_lost = true;
            }
            Ev::Cancel => {
                asked_cancel = true;
                // Not taken once the switch-over has begun: the migration completes.
                cancel_taken |= cancel_worker(&worker).await;
            }
            Ev::Tick => {}
        }
        if !worker.is_alive() {
            match exit_of(&worker) {
                Some(WorkerExitReason::MigratedAway {
                    downtime_ms,
                    progress,
                    ..
                }) => {
                    // Its last figures, even if it finished between two polls.
                    if let Some(p) = progress {
                        d.migrations.set_progress(job, after(sent_before, *p));
                    }
                    break (downtime_ms, true);
                }
                exit => {
                    // Exited `migration_lost` before a poll saw its `lost`: its record here
                    // says `lost`, and so must the job's migration (below).
                    let lost_message = match exit {
                        Some(WorkerExitReason::MigrationLost { message }) => Some(message),
                        _ => None,
                    };
                    let lost_here = lost_message.is_some();
                    let o = worker.exited().await;
                    // Died during the switch-over: the destination's worker may have resumed
                    // the VM (it had everything); then the VM is there, not lost.
                    let why = "the VM ended on the source";
                    let there = match (dest_running, dest_said_failed) {
                        (true, _) => Ok(Place::There),
                        (false, true) => Ok(Place::Here(None)),
                        (false, false) => runs_there(d, peer, to, vm.id(), why, link_lost).await,
                    };
                    match there {
                        Ok(Place::There) => {
                            tracing::warn!(vm = %vm.id(), "the source worker died ({}), but the VM runs on the destination", o.message);
                            break (0, false);
                        }
                        Ok(Place::Here(_)) => {}
                        Ok(Place::LostThere(reason)) => {
                            return lost_there(d, vm, job, to, &reason, dest_pas).await
                        }
                        Err(asked) => {
                            return match lost_message {
                                // It lost the VM after the destination started it: the copy
                                // here is stale whatever the destination says, so never
                                // "resume it here" (found by `migrate_faults_postcopy.rs`, the
                                // streams and the vireods' link cut for good).
                                Some(why) => {
                                    tracing::warn!(vm = %vm.id(), "the destination could not be asked about the lost VM ({asked}); it stays `lost` here");
                                    lost_unasked(name, to, &why, &asked)
                                }
                                None => unknown_place(name, to, &o.message, &asked),
                            };
                        }
                    }
                    let ended = format!(
                        "VM {name:?} ended on the source during the migration: {}",
                        o.message
                    );
                    return if lost_here {
                        End::Lost(ended)
                    } else {
                        End::Failed(ended)
                    };
                }
            }
        }
        let p = match status.call(&worker.socket(), WorkerOp::MigrateStatus).await {
            Ok(WorkerReply::Migrate(p)) => p,
            other => {
                let since = *silent_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= WORKER_SILENCE {
                    abort(peer, "the source worker stopped answering").await;
                    let last = match other {
                        Err(e) => e.to_string(),
                        Ok(reply) => format!("{reply:?}"),
                    };
                    return End::Failed(format!(
                        "the worker of VM {name:?} stopped answering during the migration ({} s; \
                         last: {last})",
                        WORKER_SILENCE.as_secs()
                    ));
                }
                continue;
            }
        };
        silent_since = None;
        let state = p.state;
        let message = p.message.clone();
        let _ = d.store.set_job_progress(job, percent(&p));
        d.migrations
            .set_progress(job, after(sent_before, p.clone()));
        match state {
            MigrateState::Completed => {
                d.migrations.mark(job, "worker completed");
                // The worker exits MigratedAway next.
                if let Some(o) = worker.exited_within(Duration::from_secs(30)).await {
                    tracing::info!(vm = %vm.id(), "source worker: {}", o.message);
                }
                break (p.downtime_ms.unwrap_or(0), true);
            }
            // Our worker stopped the VM after the switch-over (the destination went away in
            // post-copy) and exits `migration_lost`, which makes the record `lost`.
            MigrateState::Lost => {
                let why = message.unwrap_or_else(|| "no reason given".into());
                // Our worker cannot tell a dead destination from a cut between two live
                // workers. After a cut the destination's worker lost the VM too and its record
                // says `lost`; ours must then go, or both hosts keep a `lost` VM that either
                // may boot from the same disks (found by `migrate_faults_postcopy.rs`, the
                // workers' streams cut in post-copy). A cut after the last page completes
                // there instead. Only the destination knows, so it is asked: `abort` while the
                // link lives, `where_is` on a new connection once it is gone (a cut link may
                // leave the destination reachable). Its own `failed` needs no question: its
                // arrival is undone, the VM was never whole there.
                let answer = match (dest_running, dest_said_failed, link_lost) {
                    (true, _, _) => AbortAnswer::Running,
                    (false, true, _) => AbortAnswer::Removed(None),
                    (false, false, true) => lost_asked(d, to, vm.id()).await,
                    // An answer that did not come (the abort timed out, or the link broke
                    // mid-answer) tells nothing: asked on a new connection, as with the link
                    // gone (until session 36 the record stayed `lost` here unasked).
                    (false, false, false) => match abort(peer, &why).await {
                        AbortAnswer::Lost(e) => {
                            tracing::warn!(vm = %vm.id(), "no answer to the abort for the lost VM ({e}); asking {to}");
                            lost_asked(d, to, vm.id()).await
                        }
                        answered => answered,
                    },
                };
                match answer {
                    // Our worker exits `migration_lost` by itself; the record goes after it.
                    AbortAnswer::Running => {
                        tracing::warn!(vm = %vm.id(), "our worker lost post-copy ({why}), but the VM completed on the destination");
                        dest_running = true;
                        break (0, false);
                    }
                    AbortAnswer::LostThere(reason) => {
                        return lost_there(d, vm, job, to, &reason, dest_pas).await
                    }
                    AbortAnswer::Removed(_) => {}
                    AbortAnswer::Lost(e) => {
                        tracing::warn!(vm = %vm.id(), "the destination did not answer for the lost VM ({e}); it stays `lost` here");
                        return lost_unasked(name, to, &why, &e);
                    }
                }
                return End::Lost(format!(
                    "the VM {name:?} was lost in the post-copy migration: {why}"
                ));
            }
            MigrateState::Failed | MigrateState::Cancelled => {
                let mut why = dest_failed
                    .clone()
                    .or(message)
                    .unwrap_or_else(|| "no reason given".into());
                // The destination's worker may have resumed the VM while ours lost the
                // `RUNNING` line (docs/migration.md, "The remaining window"): then the VM is
                // there, and ours (paused, or resumed without disks to fence it) must stop.
                let cancelled = cancel_taken && state == MigrateState::Cancelled;
                let there = match (dest_running, dest_said_failed || cancelled) {
                    (true, _) => true,
                    (false, true) => false,
                    (false, false) => match runs_there(d, peer, to, vm.id(), &why, link_lost).await
                    {
                        Ok(Place::There) => true,
                        Ok(Place::Here(reason)) => {
                            // The destination's reason explains our worker's broken stream.
                            if let Some(r) = reason {
                                why = r;
                            }
                            false
                        }
                        Ok(Place::LostThere(reason)) => {
                            // Ours failed the hand-over and lives on (paused, or resumed
                            // without disks to fence it), but the guest ran on there and
                            // wrote its disks: its memory here is stale, so it must not run.
                            worker.force_off().await;
                            return lost_there(d, vm, job, to, &reason, dest_pas).await;
                        }
                        Err(asked) => return unknown_place(name, to, &why, &asked),
                    },
                };
                if there {
                    tracing::warn!(vm = %vm.id(), "our worker failed the hand-over ({why}), but the VM runs on the destination; stopping ours");
                    worker.force_off().await;
                    break (0, false);
                }
                if asked_cancel && state == MigrateState::Cancelled {
                    return End::Cancelled;
                }
                return End::Failed(format!(
                    "the migration of VM {name:?} failed: {why}; it runs on here"
                ));
            }
            _ => {}
        }
    };
    // Switched over: the VM runs there. Wait for the destination's word, then forget it here.
    d.migrations.mark(job, "worker exited");
    if !dest_running && dest_failed.is_none() {
        match peer.recv(ARRIVAL_LIMIT).await {
            Ok(PeerMsg::Running) => d.migrations.mark(job, "destination said running"),
            // Our worker ends post-copy once its last page is written, not read: pages still in
            // flight when the streams were cut never arrived, and the destination lost the VM
            // (found by `migrate_faults_postcopy.rs`; the job said `completed`). Its record
            // says `lost`; ours goes as after a move.
            Ok(PeerMsg::LostHere { reason }) => {
                return lost_there(d, vm, job, to, &reason, dest_pas).await
            }
            other => tracing::warn!(vm = %vm.id(), "the destination did not confirm: {other:?}"),
        }
    }
    let end = finish_moved(d, vm, job, downtime, dest_pas).await;
    if matches!(end, End::Done) && req.with_storage {
        let why_kept = match (req.keep_source, worker_saw_end) {
            (true, _) => Some("keep_source (--keep-source) was asked"),
            (false, false) => Some(
                "the source worker did not see the migration end (it died or failed after the \
                 switch-over); delete them once the VM runs well on the destination",
            ),
            (false, true) => None,
        };
        super::source_files::after_move(d, vm.id(), job, copied, why_kept).await;
    }
    end
}

/// The worker's disk slot layout if a hot removal left a gap in it (else empty: the
/// destination fills the first slots, as a boot does).
async fn slots_with_a_gap(d: &Daemon, vm: &Vm) -> Vec<bool> {
    let Some(w) = d.sup.get(vm.id()) else {
        return Vec::new();
    };
    match call_once(&w.socket(), WorkerOp::Status).await {
        Ok(WorkerReply::Status(st)) if has_gap(&st.disk_slots) => st.disk_slots,
        _ => Vec::new(),
    }
}

/// Whether an empty slot comes before a full one.
fn has_gap(slots: &[bool]) -> bool {
    slots.iter().skip_while(|&&d| d).any(|&d| d)
}

/// `MigrateCancel` to our worker; whether it took it (it refuses once switching).
async fn cancel_worker(worker: &Worker) -> bool {
    match call_once(&worker.socket(), WorkerOp::MigrateCancel).await {
        Ok(WorkerReply::Ok) => true,
        r => {
            tracing::info!(vm = %worker.vm_id, "cancel not taken by the worker: {r:?}");
            false
        }
    }
}

/// The VM runs on the destination: its record (and ports) go here (`forget_moved`, as for a
/// VM lost there: `lost_there`); the disks stay (a shared-nothing migration's are deleted
/// after this by `live`, only once it completed). Its CAs then point at the destination's PAs
/// here, so frames from hosts not yet updated are forwarded there.
async fn finish_moved(
    d: &Daemon,
    vm: &Vm,
    job: Uuid,
    downtime_ms: u64,
    dest_pas: &[SwitchProviderAddresses],
) -> End {
    d.migrations.update_progress(job, |p| {
        p.state = MigrateState::Completed;
        p.downtime_ms = Some(downtime_ms);
    });
    match forget_moved(d, vm, job, dest_pas).await {
        Ok(()) => {
            tracing::info!(vm = %vm.id(), downtime_ms, "VM migrated away; record removed");
            End::Done
        }
        Err(e) => End::Failed(format!(
            "VM {:?} runs on the destination, but {e}",
            vm.spec.name
        )),
    }
}

/// [`finish_moved`] but the job's figures and its end (a restarted vireod settling a quick
/// migration has none; a VM lost there did not complete): the record, ports and meters go,
/// its CAs point at the destination. `Err`: the record could not be removed, and why.
pub(super) async fn forget_moved(
    d: &Daemon,
    vm: &Vm,
    job: Uuid,
    dest_pas: &[SwitchProviderAddresses],
) -> Result<(), String> {
    if let Some(w) = d.sup.get(vm.id()) {
        let _ = w.exited_within(Duration::from_secs(30)).await;
    }
    let current = d.store.get_by_id(vm.id()).unwrap_or_else(|_| vm.clone());
    if let Err(e) = nics::remove_vm(d, &current).await {
        return Err(format!(
            "its record here could not be removed: {}",
            e.body.message
        ));
    }
    d.meters.forget(vm.id());
    // The VM has moved whatever happens here: a failure costs stale senders' frames, not
    // the migration.
    match netvirt_move::vm_moved_away(d, &current.spec, dest_pas).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(vm = %vm.id(), entries = n, "its CAs point at the destination"),
        Err(e) => tracing::warn!(vm = %vm.id(), "pointing its CAs at the destination: {e}"),
    }
    d.migrations.mark(job, "record removed");
    Ok(())
}

async fn quick(
    d: &Arc<Daemon>,
    (vm, tree): (&Vm, Option<&vireo_api::migrate::CheckpointTree>),
    (peer, to): (&mut Peer, SocketAddr),
    job: Uuid,
    cancel_wait: &mut std::pin::Pin<Box<impl std::future::Future<Output = ()>>>,
    guard: OwnedMutexGuard<()>,
    dest_pas: &[SwitchProviderAddresses],
) -> End {
    let name = &vm.spec.name;
    // Last moment a cancel is taken: after this the VM is being saved.
    if futures_ready(cancel_wait).await {
        abort(peer, "cancelled").await;
        return End::Cancelled;
    }
    let current = match d.store.get_by_id(vm.id()) {
        Ok(v) => v,
        Err(e) => {
            abort(peer, "the VM is gone on the source").await;
            return End::Failed(e.to_string());
        }
    };
    let paused = current.state == VmState::Paused;
    let Some(worker) = d.sup.get(vm.id()) else {
        abort(peer, "the VM ended on the source").await;
        return End::Failed(format!("VM {name:?} has no worker now"));
    };
    // Before the save: a vireod that dies from here on finds the note at its restart and asks
    // the destination where the VM is (`quick_recover.rs`).
    let note = super::quick_note::QuickNote {
        to,
        job,
        dest_pas: dest_pas.to_vec(),
    };
    if let Err(e) = super::quick_note::write(d, vm.id(), &note) {
        abort(peer, "the source cannot record the migration").await;
        return End::Failed(format!("{e}; VM {name:?} runs on here"));
    }
    let t0 = Instant::now();
    if let Err(e) = d.store.set_state(vm.id(), &Action::Save) {
        abort(peer, "the VM cannot be saved").await;
        return End::Failed(format!("VM {name:?}: {e}"));
    }
    d.migrations
        .update_progress(job, |p| p.state = MigrateState::Switching);
    let _ = d.store.set_job_progress(job, 10);
    if let Err(e) = save::run_save(d, &worker, job, paused).await {
        abort(peer, "the save failed").await;
        return End::Failed(format!("saving VM {name:?} failed: {e}"));
    }
    let _ = d.store.set_job_progress(job, 50);
    let dir = save::saved_dir(d, vm.id());
    let sent = match tree {
        Some(t) => send_tree(peer, t, false, job, d).await,
        None => Ok(0),
    };
    let sent = match sent {
        Ok(tree_bytes) => send_saved(peer, &dir, tree_bytes, job, d).await,
        Err(e) => Err(e),
    };
    // The destination opens the disks (shared storage) as it restores: the locks this host
    // kept since the save cannot travel there. A restore here takes them again.
    d.disk_locks.release(vm.id());
    let answer = match sent {
        Err(e) => {
            abort(peer, &e).await;
            Err(e)
        }
        Ok(()) => match commit(d, peer, job).await {
            Ok(answer) => Ok(answer),
            // From the commit on the VM may run there: an answer that did not come is asked
            // for, never guessed (`whereabouts.rs`).
            Err(lost) => {
                tracing::warn!(vm = %vm.id(), "no answer to the commit ({lost}); asking {to}");
                match super::whereabouts::ask(d, to, vm.id()).await {
                    Ok(VmWhereabouts::Here) => Ok(PeerMsg::Running),
                    // It ran there, so the saved state here is older than its disks: it stays
                    // saved here, never restored on its own.
                    Ok(VmWhereabouts::Lost { reason }) => {
                        let lead = format!("the answer of {to} to the commit was lost ({lost})");
                        return End::Failed(lost_after_commit(&lead, to, &reason, name));
                    }
                    Ok(_) => Err(format!("{lost}; it is not there")),
                    Err(e) => {
                        let lead = format!("the answer of {to} to the commit was lost ({lost})");
                        return End::Failed(may_be_there(&lead, to, &e, name));
                    }
                }
            }
        },
    };
    let downtime_ms = t0.elapsed().as_millis() as u64;
    match answer {
        Ok(PeerMsg::Running) => {
            let _ = d.store.set_job_progress(job, 95);
            drop(guard);
            // The tree runs there now: what a storage move put outside the VM's folder goes
            // here too (the folder goes with the record).
            let outside = match tree {
                Some(_) => super::tree::outside_vm_dir(d, vm),
                None => Vec::new(),
            };
            let end = finish_moved(d, vm, job, downtime_ms, dest_pas).await;
            if matches!(end, End::Done) {
                super::tree::remove_outside(&outside);
            }
            end
        }
        other => {
            let why = match other {
                Ok(PeerMsg::Failed { reason }) => reason,
                Ok(m) => format!("unexpected {m:?}"),
                Err(e) => e,
            };
            // Not there: continue it here from its saved state.
            let restarted = restore_here(d, vm).await;
            End::Failed(format!(
                "the destination did not take VM {name:?}: {why}; {restarted}"
            ))
        }
    }
}

/// A quick migration that did not happen: the VM is started here again from its saved state,
/// and the job ends once the restore did (its words then true: until session 33 it said
/// "it is restored here" while the record was still `starting`, and a restore that failed
/// after that was never told; found by `crates/cli/tests/e2e/migrate_faults_real_modes.rs`).
pub(super) async fn restore_here(d: &Arc<Daemon>, vm: &Vm) -> String {
    let current = match d.store.get_by_id(vm.id()) {
        Ok(v) => v,
        Err(e) => return format!("its record here: {e}"),
    };
    let start = match lifecycle::start_locked(d, &current).await {
        Ok(job) => job,
        Err(e) => return format!("restoring it here failed too: {}", e.body.message),
    };
    let deadline = tokio::time::Instant::now() + ARRIVAL_LIMIT;
    loop {
        match d.store.get_job(start.id) {
            Ok(j) if j.state == JobState::Running => {}
            Ok(j) if j.state == JobState::Completed => return "it is restored here".into(),
            Ok(j) => {
                return format!(
                    "restoring it here failed too: {}",
                    j.error
                        .unwrap_or_else(|| format!("the restore ended {:?}", j.state))
                )
            }
            Err(e) => return format!("its restore here (job {}): {e}", start.id),
        }
        if tokio::time::Instant::now() >= deadline {
            return format!(
                "its restore here did not end within {} s (job {})",
                ARRIVAL_LIMIT.as_secs(),
                start.id
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A quick migration's VM whose record on `to` is `lost` (asked after its word was lost): the
/// destination took the committed files, ran the VM and lost it in a later post-copy. The
/// saved state here is older than the disks it wrote there, so restoring it here would hand
/// the guest disks that moved on under it; nor may it run here and there. It stays saved here
/// for the user to decide, and the user is told what to run where.
pub(super) fn lost_after_commit(lead: &str, to: SocketAddr, reason: &str, name: &str) -> String {
    format!(
        "{lead}; asked, {to} says VM {name:?} ran there and was lost there: {reason}. Its saved \
         state here is older than its disks, so it stays saved here, not restored. Start it on \
         {to} (`vireo vm start {name}` there: a cold boot from its disks), then discard it here \
         (`vireo vm turn-off {name}`, then `vireo vm rm {name}`, without --delete-disks: they \
         are the disks it boots from there)"
    )
}

/// Tells the destination to restore the VM; its answer.
async fn commit(d: &Daemon, peer: &mut Peer, job: Uuid) -> Result<PeerMsg, String> {
    peer.send(&PeerMsg::Commit).await?;
    d.migrations.mark(job, "commit sent");
    peer.recv(ARRIVAL_LIMIT).await
}

/// A quick migration's VM that may run on `to` (its word was lost and `to` could not be asked
/// since, for `why`): it stays saved here, and the user is told where to look and what to run.
pub(super) fn may_be_there(lead: &str, to: SocketAddr, why: &str, name: &str) -> String {
    format!(
        "{lead} and it could not be asked since ({why}): VM {name:?} may be running there, so \
         it stays saved here. Look on {to} (`vireo vm list`) and run `vireo vm start {name}` \
         here only if it is not there"
    )
}

/// Every file of the checkpoint tree (before the saved state: its `vm.state` stays the last
/// file). The bytes sent.
/// `live`: the running tops stay (the worker copies them while the guest writes).
async fn send_tree(
    peer: &mut Peer,
    tree: &vireo_api::migrate::CheckpointTree,
    live: bool,
    job: Uuid,
    d: &Daemon,
) -> Result<u64, String> {
    let mut total = 0;
    let files = tree
        .files
        .iter()
        .filter(|f| !(live && super::tree::is_running_top(tree, f)));
    for f in files {
        let name = std::path::PathBuf::from(&f.name);
        let before = total;
        total += peer
            .send_file_counted(&name, super::tree::source_path(f), |n| {
                d.migrations
                    .update_progress(job, |p| p.transferred_bytes = before + n)
            })
            .await?;
    }
    Ok(total)
}

async fn send_saved(
    peer: &mut Peer,
    dir: &std::path::Path,
    mut total: u64,
    job: Uuid,
    d: &Daemon,
) -> Result<(), String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name())
        .collect();
    // vm.state last: the destination's "complete" marker, as in a local save.
    names.sort_by_key(|n| (n == "vm.state", n.clone()));
    for n in names {
        let name = std::path::PathBuf::from(&n);
        let before = total;
        total += peer
            .send_file_counted(&name, &dir.join(&name), |n| {
                d.migrations
                    .update_progress(job, |p| p.transferred_bytes = before + n)
            })
            .await?;
    }
    Ok(())
}

/// Whether the cancel has fired, without waiting.
async fn futures_ready(f: &mut std::pin::Pin<Box<impl std::future::Future<Output = ()>>>) -> bool {
    tokio::select! {
        biased;
        () = f.as_mut() => true,
        () = std::future::ready(()) => false,
    }
}

/// The route: 202 with the job.
pub async fn route(
    axum::extract::State(d): axum::extract::State<Arc<Daemon>>,
    crate::daemon::http_error::ApiPath(key): crate::daemon::http_error::ApiPath<String>,
    crate::daemon::http_error::ApiJson(req): crate::daemon::http_error::ApiJson<MigrateRequest>,
) -> Result<(axum::http::StatusCode, axum::Json<Job>), HttpError> {
    let vm = d.find(&key)?;
    let job = start(&d, &vm, req).await?;
    Ok((axum::http::StatusCode::ACCEPTED, axum::Json(job)))
}

#[cfg(test)]
mod tests {
    use super::has_gap;

    #[test]
    fn a_gap_is_an_empty_slot_before_a_full_one() {
        assert!(!has_gap(&[]));
        assert!(!has_gap(&[true, true, false, false]));
        assert!(!has_gap(&[false, false]));
        assert!(has_gap(&[true, false, true, false]));
        assert!(has_gap(&[false, true]));
    }
}
