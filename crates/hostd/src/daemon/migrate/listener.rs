//! The destination side: `vireod --migration-listen ADDR:PORT`. Each connection must complete
//! a mutual-TLS handshake with a trusted host (refused before a byte of VM data otherwise),
//! then offers one VM. The offer is checked (name and id free, memory within this host's
//! limits, every NIC's switch here, every disk and kernel file reachable under a storage root:
//! shared storage) and refused with one line naming the value, or accepted: the VM's record is
//! created `incoming`, with its NIC ports on the switches, and
//! - live: a worker is spawned with `incoming` set; its `listen_addr` is the answer; when it
//!   reports the VM running, the VM becomes `running`, its ports are announced and the source
//!   is told `Running`;
//! - quick: the saved state's files are received into the VM's `saved/` folder; on `Commit`
//!   the VM becomes `saved` and is started from it (the ordinary restore); `Running` or
//!   `Failed` is the answer. Once it runs it stays, even if the answer cannot be sent
//!   (`whereabouts.rs`).
//!
//! Whatever fails before the VM runs here removes the record and its ports again (the source
//! keeps the VM). The record's lock is held throughout (a quick migration's restore takes it
//! itself), so no request changes the VM meanwhile.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use uuid::Uuid;
use vireo_api::migrate::{PeerMsg, StorageMode, MAX_STREAMS, PEER_PROTOCOL_VERSION};
use vireo_api::switch::SwitchOp;
use vireo_api::worker::{
    IncomingMigration, MigrateState, PostcopyMode, WorkerOp, WorkerReply, WORKER_DISK_SLOTS,
};
use vireo_api::{Action, JobState, Vm, VmSpec};

use super::network_owed;
use super::peer::{self, FileError, Peer};
use crate::daemon::supervisor::Worker;
use crate::daemon::switches::{netvirt_move, nics};
use crate::daemon::worker_client::{call_once, KeptConn};
use crate::daemon::{lifecycle, save, Daemon};

/// The source has this long between two messages before the destination gives up (a quick
/// migration's save of a large VM happens in between).
const SOURCE_SILENCE: Duration = Duration::from_secs(600);
/// The destination worker must be listening within this.
const LISTEN_LIMIT: Duration = Duration::from_secs(15);
/// A quick migration's restore must run within its start's limit (`lifecycle::start_limit`,
/// which grows with the VM's memory) and this (the spawn, the disks opened). It was a fixed
/// 120 s, which a large VM's eager restore from slow storage outlasts.
const RESTORE_SLACK: Duration = Duration::from_secs(30);
/// How often the worker is asked how its migration goes. Short: the VM's `running` here, and
/// so the source's job, waits for the poll that sees the worker's `completed`; a status over
/// the worker's socket costs well under a millisecond.
const POLL: Duration = Duration::from_millis(10);
/// How often a new destination worker is asked for its address: it listens within
/// milliseconds of its start, and the source waits for the answer.
const LISTEN_POLL: Duration = Duration::from_millis(2);
/// A worker caught in the switch-over has this long to run the VM or give up (opening the
/// disks and resuming take milliseconds; this only bounds a hung worker).
const SETTLE_LIMIT: Duration = Duration::from_secs(60);
/// How long a worker that lost its VM in post-copy gets to exit by itself (it ends the process
/// within 8 s of the loss).
const LOST_EXIT_WAIT: Duration = Duration::from_secs(15);
/// The arrival's announcement is repeated after each of these (see `take_over_network`).
const ANNOUNCE_AGAIN: [Duration; 2] = [Duration::from_millis(150), Duration::from_millis(500)];

/// Binds the listener and logs (and records) its address; port 0 picks a free one.
pub async fn bind(daemon: &Daemon, addr: SocketAddr) -> Result<TcpListener, String> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--migration-listen {addr}: {e}"))?;
    let bound = l.local_addr().map_err(|e| e.to_string())?;
    // The identity exists before the first peer connects.
    daemon.host.identity().map_err(|e| e.to_string())?;
    daemon.migrations.set_listen(bound);
    tracing::info!(migration_listen = %bound, "accepting migrations from trusted hosts");
    Ok(l)
}

pub async fn serve(daemon: Arc<Daemon>, listener: TcpListener) {
    loop {
        let Ok((tcp, from)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let d = daemon.clone();
        tokio::spawn(async move {
            // Read per connection: a host trusted or revoked a moment ago counts at once.
            let cfg = match peer::server_config(&d.host) {
                Ok(c) => c,
                Err(e) => return tracing::error!("migration listener: {e}"),
            };
            match Peer::accept(cfg, tcp).await {
                Ok(p) => incoming(&d, p).await,
                Err(e) => tracing::warn!(%from, "migration connection refused: {e}"),
            }
        });
    }
}

/// The offer's checks; `Err` is the one-line reason sent back.
/// `arriving`: the disks that come with the checkpoint tree (`tree.rs`) into this vireod's
/// folder for the VM, which is no storage root.
fn check_offer(
    d: &Daemon,
    vm_id: Uuid,
    spec: &VmSpec,
    storage: StorageMode,
    arriving: &BTreeSet<PathBuf>,
) -> Result<VmSpec, String> {
    if d.store.get_by_id(vm_id).is_ok() {
        return Err(format!("a VM with id {vm_id} exists on this host already"));
    }
    if d.store.get_by_name(&spec.name).is_ok() {
        return Err(format!(
            "a VM named {:?} exists on this host already; rename one of them",
            spec.name
        ));
    }
    vireo_api::validate_spec(spec, &d.limits).map_err(|e| format!("on this host: {e}"))?;
    nics::check(d, spec).map_err(|e| e.body.message)?;
    if storage == StorageMode::Copied {
        // The disks are copied (`storage::create_copies` checks where); the kernel and initrd
        // are found here or travel (`boot_files::plan`).
        return Ok(spec.clone());
    }
    // Shared storage: the same files, inside this host's storage roots.
    let mut rest = spec.clone();
    rest.disks.retain(|k| !arriving.contains(&k.path));
    let rest = d.storage.confine(&rest).map_err(|e| e.body.message)?;
    if rest.disks.iter().any(|disk| !disk.path.is_file()) {
        return Err("a disk is not a file on this host".into());
    }
    let mut out = spec.clone();
    out.kernel = rest.kernel;
    out.initrd = rest.initrd;
    let mut confined = rest.disks.into_iter();
    for disk in out.disks.iter_mut().filter(|k| !arriving.contains(&k.path)) {
        if let Some(c) = confined.next() {
            disk.path = c.path;
        }
    }
    Ok(out)
}

async fn incoming(d: &Arc<Daemon>, mut peer: Peer) {
    let offer = match peer.recv(peer::CONNECT_LIMIT).await {
        Ok(m) => m,
        Err(e) => return tracing::warn!("migration: {e}"),
    };
    if let PeerMsg::DiskData { session } = offer {
        return super::storage::receive(d, peer, session).await;
    }
    if let PeerMsg::WhereIs { vm_id } = offer {
        return super::whereabouts::answer(d, peer, vm_id).await;
    }
    if let PeerMsg::PolicyMoved { version, entries } = offer {
        return super::netvirt_peers::receive(d, peer, version, entries).await;
    }
    let PeerMsg::Offer {
        version,
        vm_id,
        spec,
        storage,
        session,
        streams,
        quick,
        dest_dir,
        disks,
        checkpoints,
        postcopy,
        disk_slots,
        boot_files,
    } = offer
    else {
        let _ = peer
            .send(&PeerMsg::Refused {
                reason: "expected an offer".into(),
            })
            .await;
        return;
    };
    let refuse = |reason: String| PeerMsg::Refused { reason };
    if version != PEER_PROTOCOL_VERSION {
        let _ = peer
            .send(&refuse(format!(
                "this host speaks migration protocol {PEER_PROTOCOL_VERSION}, not {version}; \
                 upgrade the older host"
            )))
            .await;
        return;
    }
    if !(1..=MAX_STREAMS).contains(&streams) {
        let _ = peer
            .send(&refuse(format!("streams {streams}: 1 to {MAX_STREAMS}")))
            .await;
        return;
    }
    if let Some(why) = bad_disk_slots(&disk_slots, spec.disks.len()) {
        let _ = peer.send(&refuse(why)).await;
        return;
    }
    let Ok(permit) = d.migrations.slots().try_acquire_owned() else {
        let _ = peer
            .send(&refuse(
                "this host runs as many migrations as --max-migrations allows; retry later".into(),
            ))
            .await;
        return;
    };
    let _permit = permit;
    let mut spec = *spec;
    let arrival = match (checkpoints, storage) {
        (None, _) => Ok(None),
        (Some(_), StorageMode::Copied) if quick => {
            Err("a shared-nothing migration is live only (not --quick)".into())
        }
        // Shared-nothing: the user's files the tree uses land in dest_dir.
        (Some(t), StorageMode::Copied) => {
            super::storage::check_tree_dest_dir(d, dest_dir.as_deref(), &disks)
                .and_then(|dir| {
                    super::tree::plan_arrival(d, vm_id, *t, &mut spec, true, Some((&dir, &disks)))
                })
                .map(Some)
        }
        (Some(t), StorageMode::Shared) => {
            super::tree::plan_arrival(d, vm_id, *t, &mut spec, !quick, None).map(Some)
        }
    };
    let arrival = match arrival {
        Ok(a) => a,
        Err(reason) => {
            tracing::info!(from = %peer.who, vm = %vm_id, "migration refused: {reason}");
            let _ = peer.send(&refuse(reason)).await;
            return;
        }
    };
    let arriving: BTreeSet<PathBuf> = arrival
        .as_ref()
        .map(|a| a.dest_of.values().cloned().collect())
        .unwrap_or_default();
    let checked = check_offer(d, vm_id, &spec, storage, &arriving).and_then(|spec| match storage {
        StorageMode::Shared => Ok((spec, None)),
        StorageMode::Copied if quick => {
            Err("a shared-nothing migration is live only (not --quick)".into())
        }
        // The copies exist (empty) from here on; every failure below removes them.
        StorageMode::Copied => match &arrival {
            None => super::storage::create_copies(d, vm_id, &spec, dest_dir.as_deref(), &disks)
                .map(|(spec, target)| (spec, Some((session, target)))),
            // The tree's user files, claimed empty in dest_dir, and the copies of the disks
            // outside the tree. Not under the session's key: that one is the running tops'
            // (and those copies') disk copy, registered once the tree is in.
            Some(a) => {
                let dir = a.dest_dir.clone().unwrap_or_default();
                let user = a.user_file_paths();
                super::storage::claim_tree_files(d, vm_id, &user, &a.flattened, dir)
                    .map(|target| (spec, Some((Uuid::new_v4(), target))))
            }
        },
    });
    let (spec, copies) = match checked {
        Ok(s) => s,
        Err(reason) => {
            tracing::info!(from = %peer.who, vm = %vm_id, "migration refused: {reason}");
            let _ = peer.send(&refuse(reason)).await;
            return;
        }
    };
    if let Some((key, t)) = copies {
        super::storage::register(d, key, t);
    }
    let (spec, boot) = match storage {
        StorageMode::Copied => match plan_boot_files(d, vm_id, spec, dest_dir, boot_files).await {
            Ok(planned) => planned,
            Err(reason) => {
                tracing::info!(from = %peer.who, vm = %vm_id, "migration refused: {reason}");
                super::storage::discard(d, vm_id);
                let _ = peer.send(&refuse(reason)).await;
                return;
            }
        },
        StorageMode::Shared => (spec, super::boot_files::Plan::default()),
    };
    let vm = match create_record(d, vm_id, &spec).await {
        Ok(vm) => vm,
        Err(reason) => {
            super::storage::discard(d, vm_id);
            let _ = peer.send(&refuse(reason)).await;
            return;
        }
    };
    tracing::info!(from = %peer.who, vm = %vm_id, name = %spec.name, quick, "VM incoming");
    let guard = d.lock_vm(vm_id).await;
    let result = if quick {
        receive_quick(d, &mut peer, &vm, arrival, guard).await
    } else {
        let how = (session, streams, postcopy, disk_slots);
        receive_live(d, &mut peer, &vm, how, (arrival, boot)).await
    };
    match result {
        Ok(()) => tracing::info!(vm = %vm_id, "VM arrived and runs here"),
        Err(reason) => {
            tracing::warn!(vm = %vm_id, "incoming migration failed: {reason}");
            if remove_incoming(d, vm_id).await == Settled::RunsHere {
                tracing::warn!(vm = %vm_id, "but the worker here had already resumed the VM: it stays");
                let _ = arrived(d, &vm, &mut peer).await;
                return;
            }
            let answer = match lost_here(d, vm_id) {
                Some(reason) => PeerMsg::LostHere { reason },
                None => PeerMsg::Failed { reason },
            };
            let _ = peer.send(&answer).await;
        }
    }
}

/// Fault injection (`crates/cli/tests/e2e/migrate_faults_real_modes.rs`,
/// `crates/hostd/tests/integration/migrate_faults.rs`): `VIREO_TEST_QUICK_RESTORE_DELAY_MS=N` holds a quick
/// arrival N ms between the source's `Commit` and the restore, so a test can strike the source
/// once the commit went out and before the answer. Unset, nothing waits.
async fn test_restore_delay(vm: &Vm) {
    let Some(text) = std::env::var_os("VIREO_TEST_QUICK_RESTORE_DELAY_MS") else {
        return;
    };
    match text.to_str().and_then(|t| t.parse::<u64>().ok()) {
        Some(ms) => {
            tracing::info!(vm = %vm.id(), ms, "commit received; restore held (VIREO_TEST_QUICK_RESTORE_DELAY_MS)");
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        None => tracing::warn!(
            "VIREO_TEST_QUICK_RESTORE_DELAY_MS={text:?} ignored: expected milliseconds"
        ),
    }
}

/// Fault injection with the real workers (`crates/cli/tests/e2e/migrate_faults_real.rs`): when
/// `VIREO_TEST_WORKER_ROUTE` names a file holding `PORT ADDR`, the destination worker listens
/// on `PORT` and the source is told `ADDR` (the test's proxy, which cuts the workers' streams).
/// Read at each arrival; no file, no change.
fn test_worker_route() -> Option<(u16, SocketAddr)> {
    let file = std::env::var_os("VIREO_TEST_WORKER_ROUTE")?;
    let text = std::fs::read_to_string(file).ok()?;
    let (port, via) = text.trim().split_once(' ')?;
    Some((port.parse().ok()?, via.parse().ok()?))
}

/// Shared-nothing: the kernel and initrd this host boots the VM from (`boot_files.rs`), the
/// ones that must travel claimed. On `Err` the caller discards the arrival.
async fn plan_boot_files(
    d: &Arc<Daemon>,
    vm_id: Uuid,
    mut spec: VmSpec,
    dest_dir: Option<PathBuf>,
    files: Vec<vireo_api::migrate::BootFile>,
) -> Result<(VmSpec, super::boot_files::Plan), String> {
    let d = d.clone();
    tokio::task::spawn_blocking(move || {
        let plan = super::boot_files::plan(&d, vm_id, &mut spec, dest_dir.as_deref(), &files)?;
        plan.claim(&d, vm_id)?;
        Ok((spec, plan))
    })
    .await
    .map_err(|e| format!("planning the boot files: {e}"))?
}

/// Why an offer's disk slot layout cannot be built here, if it cannot: more slots than a
/// worker has, or not one full slot per disk of the spec.
fn bad_disk_slots(slots: &[bool], disks: usize) -> Option<String> {
    let full = slots.iter().filter(|&&d| d).count();
    if slots.is_empty() || (slots.len() <= WORKER_DISK_SLOTS && full == disks) {
        return None;
    }
    Some(format!(
        "the offer's disk slot layout ({} slots, {full} full) does not fit its {disks} disk(s) \
         in this host's {WORKER_DISK_SLOTS} slots",
        slots.len()
    ))
}

/// The record, `incoming`, and its NIC ports (as a create does).
async fn create_record(d: &Daemon, id: Uuid, spec: &VmSpec) -> Result<Vm, String> {
    let _guards = nics::lock_switches(d, &[Some(spec)]).await;
    let vm = d
        .store
        .create_incoming(id, spec)
        .map_err(|e| e.to_string())?;
    if let Err(reason) = nics::apply(d, id, None, Some(&vm.spec)).await {
        let _ = nics::apply(d, id, Some(&vm.spec), None).await;
        let _ = d.store.remove(id);
        return Err(format!("a switch here refused the VM's NIC: {reason}"));
    }
    Ok(vm)
}

/// What the destination worker's migration came to, once it can no longer change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// It resumed the VM: the VM runs here (the source's worker may have exited
    /// `MigratedAway` already, so this worker must not be killed).
    RunsHere,
    /// It never will: cancelled before the switch-over, failed, or gone.
    NotHere,
    /// It resumed the VM in post-copy and lost it: the worker stops it and exits
    /// `migration_lost` by itself, which makes the record `lost` (killing it first could
    /// take that exit record with it).
    Lost,
}

/// The reason, if the arrival's worker resumed the VM in post-copy and lost it (its record
/// says `lost`: `remove_incoming` leaves it).
fn lost_here(d: &Daemon, id: Uuid) -> Option<String> {
    match d.store.get_by_id(id).ok()?.state {
        vireo_api::VmState::Lost { reason } => Some(reason),
        _ => None,
    }
}

/// The switch-over may be under way between the two workers (the source released its disks,
/// this worker is opening them, `RUNNING` may be on the wire) while the daemons' own
/// connection is lost, or the source aborts, or vireod restarts. Killing the worker in that
/// window loses the VM in both places (found by `tests/migrate_faults.rs`: a cut of the
/// daemons' link during the switch-over). So the worker is asked to cancel, which it takes
/// only before the switch-over (atomically with its state: after an accepted cancel it can no
/// longer resume the VM), and is otherwise waited for until it either runs the VM or failed.
pub async fn settle(w: &Worker) -> Settled {
    settle_at(&w.socket(), w.pid, || w.is_alive()).await
}

/// `settle` for a worker known by its socket (at start-up, before it is adopted).
pub async fn settle_at(sock: &Path, pid: u32, alive: impl Fn() -> bool) -> Settled {
    let mut deadline = tokio::time::Instant::now() + SETTLE_LIMIT;
    loop {
        if !alive() {
            return Settled::NotHere;
        }
        // Refused once switching: then the status below decides, or we wait.
        let cancel = call_once(sock, WorkerOp::MigrateCancel).await;
        let status = call_once(sock, WorkerOp::MigrateStatus).await;
        match (status, cancel) {
            (Ok(WorkerReply::Migrate(p)), _) if p.state == MigrateState::Completed => {
                return Settled::RunsHere
            }
            // Post-copy: the VM runs here and its pages are still coming. It ends by itself
            // (every page here, or lost at the latest at the fault limit), so it is waited
            // for without the limit: stopping it would lose a VM that may still complete.
            (Ok(WorkerReply::Migrate(p)), _) if p.state == MigrateState::Postcopy => {
                deadline = tokio::time::Instant::now() + SETTLE_LIMIT;
            }
            // Lost in post-copy: not here, but its worker exits `migration_lost`, which makes
            // the record `lost` (`remove_incoming` keeps it; the source hears `lost_here`).
            (Ok(WorkerReply::Migrate(p)), _) if p.state == MigrateState::Lost => {
                return Settled::Lost
            }
            (Ok(WorkerReply::Migrate(p)), _) if p.state == MigrateState::Switching => {}
            // Listening or pre-copy with the cancel taken, failed, cancelled.
            (Ok(WorkerReply::Migrate(_)), Ok(WorkerReply::Ok)) => return Settled::NotHere,
            (Ok(WorkerReply::Migrate(p)), _)
                if matches!(p.state, MigrateState::Failed | MigrateState::Cancelled) =>
            {
                return Settled::NotHere
            }
            // Not answering (ending, or busy): ask again until the limit.
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::error!(
                pid,
                "the destination worker neither ran the VM nor gave up within {}s; stopping it",
                SETTLE_LIMIT.as_secs()
            );
            return Settled::NotHere;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Removes an arrival that did not make it: its worker (if any) is turned off, the record
/// and its ports go. A VM that runs here by now is left alone: `RunsHere` (then it is made
/// `running`, announced, and the caller tells the source).
pub async fn remove_incoming(d: &Daemon, id: Uuid) -> Settled {
    if let Some(w) = d.sup.get(id) {
        if w.is_alive() {
            match settle(&w).await {
                Settled::RunsHere => return Settled::RunsHere,
                // Its own exit (at most the worker's 8 s) records the loss.
                Settled::Lost => {
                    let _ = w.exited_within(LOST_EXIT_WAIT).await;
                }
                Settled::NotHere => {}
            }
        }
        w.force_off().await;
    }
    let Ok(vm) = d.store.get_by_id(id) else {
        super::storage::discard(d, id);
        return Settled::NotHere;
    };
    if !matches!(
        vm.state,
        vireo_api::VmState::Incoming | vireo_api::VmState::Saved
    ) {
        return Settled::NotHere;
    }
    // Shared-nothing: the copies made for it (after its worker, which may have them open).
    super::storage::discard(d, id);
    if let Err(e) = nics::remove_vm(d, &vm).await {
        tracing::error!(vm = %id, "removing a failed arrival: {}", e.body.message);
    }
    d.forget_vm_lock(id);
    Settled::NotHere
}

async fn receive_live(
    d: &Arc<Daemon>,
    peer: &mut Peer,
    vm: &Vm,
    (session, streams, postcopy, disk_slots): (Uuid, u16, PostcopyMode, Vec<bool>),
    (arrival, boot): (Option<super::tree::Arrival>, super::boot_files::Plan),
) -> Result<(), String> {
    let files_first = arrival.is_some() || !boot.is_empty();
    if files_first && !receive_files_first(d, peer, vm, session, arrival, boot).await? {
        return Ok(());
    }
    let listen_ip = d
        .migrations
        .listen_addr()
        .map_or([127, 0, 0, 1].into(), |a| a.ip());
    let tls = d.host.worker_tls().map_err(|e| e.to_string())?;
    let route = test_worker_route();
    let incoming = IncomingMigration {
        session,
        streams,
        listen: SocketAddr::new(listen_ip, route.map_or(0, |(port, _)| port)),
        tls,
        // Unless the source promised `never`, post-copy may come: the RAM stays off the pool.
        postcopy,
        disk_slots,
    };
    let t = std::time::Instant::now();
    let worker = d.sup.spawn_with(d, vm, None, Some(incoming))?;
    let spawned = t.elapsed();
    let addr = wait_listening(&worker).await?;
    tracing::info!(
        vm = %vm.id(),
        "migration timeline (destination vireod): worker spawned +{:.1} ms, listening +{:.1} ms",
        spawned.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3
    );
    peer.send(&PeerMsg::Accepted {
        listen_addr: Some(route.map_or(addr, |(_, via)| via)),
        provider_addresses: netvirt_move::provider_addresses(d, &vm.spec),
        send_files: Vec::new(),
    })
    .await?;
    let mut disks = DiskCopyWatch::default();
    let mut status = KeptConn::default();
    loop {
        enum Ev {
            Msg(Result<PeerMsg, String>),
            Tick,
        }
        let ev = tokio::select! {
            m = peer.recv(SOURCE_SILENCE) => Ev::Msg(m),
            () = tokio::time::sleep(POLL) => Ev::Tick,
        };
        match ev {
            // Too late if the worker here resumed the VM already (the source's worker died
            // after releasing its disks): then the answer is `Running`, not `Aborted`.
            Ev::Msg(Ok(PeerMsg::Abort { reason })) => {
                tracing::info!(vm = %vm.id(), "the source aborted: {reason}");
                // A failure here (a full dest_dir) is why the source's worker gave up: say so.
                let failure = super::storage::failure(d, vm.id());
                if remove_incoming(d, vm.id()).await == Settled::RunsHere {
                    tracing::warn!(vm = %vm.id(), "the abort came after the VM resumed here: it stays");
                    return arrived(d, vm, peer).await;
                }
                let answer = match (lost_here(d, vm.id()), failure) {
                    (Some(reason), _) => PeerMsg::LostHere { reason },
                    (None, Some(reason)) => PeerMsg::Failed { reason },
                    (None, None) => PeerMsg::Aborted,
                };
                let _ = peer.send(&answer).await;
                return Ok(());
            }
            Ev::Msg(Ok(other)) => {
                return Err(format!("unexpected {other:?} from the source"));
            }
            // The source vireod is gone or the link cut: the workers decide between them. A
            // VM running here stays; one mid-switch-over is waited for; otherwise nothing runs
            // here.
            Ev::Msg(Err(e)) => {
                return match settle(&worker).await {
                    Settled::RunsHere => arrived(d, vm, peer).await,
                    Settled::NotHere | Settled::Lost => Err(format!("the source went away: {e}")),
                }
            }
            Ev::Tick => {}
        }
        if !worker.is_alive() {
            // A worker that resumed the VM in post-copy and lost it leaves the record `lost`
            // (its exit is applied before `exited` returns); `remove_incoming` keeps it.
            let o = worker.exited().await;
            return Err(format!("the destination worker ended: {}", o.message));
        }
        // Shared-nothing: a disk copy that failed here (a full dest_dir) is the reason the
        // source hears, not its worker's broken disk stream.
        if let Some(why) = super::storage::failure(d, vm.id()) {
            return Err(why);
        }
        disks.tell_worker_while_copying(d, vm.id(), &worker).await;
        match migrate_state(&worker, &mut status).await {
            Some(MigrateState::Completed) => return arrived(d, vm, peer).await,
            Some(MigrateState::Failed | MigrateState::Cancelled) => {
                let mut msg = match call_once(&worker.socket(), WorkerOp::MigrateStatus).await {
                    Ok(WorkerReply::Migrate(p)) => p.message.unwrap_or_default(),
                    _ => String::new(),
                };
                // Not answering any more: it is ending, and its exit record says why.
                if msg.is_empty() {
                    msg = match worker.exited_within(Duration::from_secs(2)).await {
                        Some(o) => o.message,
                        None => "it gave no reason".into(),
                    };
                }
                return Err(format!("the destination worker gave up: {msg}"));
            }
            _ => {}
        }
    }
}

/// Shared-nothing: the disks are copied before the source's memory streams connect, and a
/// large disk takes longer than the worker's wait for them. While disk records keep coming,
/// the worker hears so (`MigrateSourceAlive`) every [`SOURCE_ALIVE_EVERY`]; a stalled copy
/// is bounded by the disk stream's own record limit, and the worker's wait counts from the
/// last records once they stop.
#[derive(Default)]
struct DiskCopyWatch {
    told: Option<(tokio::time::Instant, u64)>,
}

/// How often the waiting worker hears that the disk copy goes on: well inside its wait (120
/// s; tests cut it to a few seconds), and one call over a local socket costs well under a ms.
const SOURCE_ALIVE_EVERY: Duration = Duration::from_secs(1);

impl DiskCopyWatch {
    async fn tell_worker_while_copying(&mut self, d: &Daemon, vm: Uuid, worker: &Worker) {
        let Some(records) = super::storage::records_received(d, vm) else {
            return;
        };
        let now = tokio::time::Instant::now();
        let (at, before) = *self.told.get_or_insert((now, records));
        if now - at < SOURCE_ALIVE_EVERY {
            return;
        }
        self.told = Some((now, records));
        if records == before {
            return;
        }
        if let Err(e) = call_once(&worker.socket(), WorkerOp::MigrateSourceAlive).await {
            tracing::warn!(%vm, "telling the worker the disk copy goes on: {e}");
        }
    }
}

/// Live, before the worker, when files must come first: `Accepted` (no address yet, the boot
/// files this host lacks named), the checkpoint tree's files but the running tops and those
/// boot files, `TreeSent`; then the boot files put in place, the tree's files relinked, the
/// tops' empty children made and registered for the disk copy. `Ok(false)`: the source
/// aborted (answered).
async fn receive_files_first(
    d: &Arc<Daemon>,
    peer: &mut Peer,
    vm: &Vm,
    session: Uuid,
    mut arrival: Option<super::tree::Arrival>,
    mut boot: super::boot_files::Plan,
) -> Result<bool, String> {
    peer.send(&PeerMsg::Accepted {
        listen_addr: None,
        provider_addresses: Vec::new(),
        send_files: boot.names(),
    })
    .await?;
    let mut not_stored: Option<String> = None;
    loop {
        match peer.recv(SOURCE_SILENCE).await? {
            PeerMsg::File { name, len } => {
                let text = name.to_string_lossy().into_owned();
                let boot_file = boot
                    .receive(peer, &text, len, SOURCE_SILENCE, &mut not_stored)
                    .await?;
                let known = match (boot_file, arrival.as_mut()) {
                    (Some(()), _) => Some(()),
                    (None, Some(a)) => {
                        receive_tree_file(peer, a, &name, len, &mut not_stored).await?
                    }
                    (None, None) => None,
                };
                known.ok_or_else(|| format!("{text} is no file this host asked for"))?;
            }
            PeerMsg::TreeSent => match not_stored {
                Some(e) => return Err(e),
                None => break,
            },
            PeerMsg::Abort { reason } => {
                tracing::info!(vm = %vm.id(), "the source aborted: {reason}");
                remove_incoming(d, vm.id()).await;
                let _ = peer.send(&PeerMsg::Aborted).await;
                return Ok(false);
            }
            other => return Err(format!("unexpected {other:?} from the source")),
        }
    }
    let (d2, id) = (d.clone(), vm.id());
    tokio::task::spawn_blocking(move || boot.finish(&d2, id))
        .await
        .map_err(|e| format!("placing the boot files: {e}"))??;
    let Some(arrival) = arrival else {
        return Ok(true);
    };
    crate::daemon::checkpoints::fault_point("migrate-live-tree-arrived");
    let (d2, id) = (d.clone(), vm.id());
    let tops = tokio::task::spawn_blocking(move || arrival.settle_live(&d2, id))
        .await
        .map_err(|e| format!("storing the checkpoint tree: {e}"))??;
    let paths: Vec<PathBuf> = tops.into_iter().map(|(_, p)| p).collect();
    let dir = crate::daemon::checkpoints::root(d, vm.id()).join("disks");
    let target = super::storage::tops_target(vm.id(), &paths, dir)?;
    super::storage::register(d, session, target);
    Ok(true)
}

/// A `File` of the checkpoint tree into its place here; `Ok(None)` when `name` is none of the
/// tree's. A file this host cannot store (a full disk) fails the arrival only at the end
/// (`not_stored`): the rest is read and dropped so the source hears why instead of a reset.
async fn receive_tree_file(
    peer: &mut Peer,
    arrival: &mut super::tree::Arrival,
    name: &Path,
    len: u64,
    not_stored: &mut Option<String>,
) -> Result<Option<()>, String> {
    let Some(path) = arrival.path_for(name) else {
        return Ok(None);
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let into = not_stored.is_none().then_some(path.as_path());
    let stored = match into {
        Some(p) if arrival.is_claimed(name) => peer.recv_claimed_file(p, len, SOURCE_SILENCE).await,
        into => peer.recv_file(into, len, SOURCE_SILENCE).await,
    };
    match stored {
        Ok(()) => {
            arrival.received.insert(name.to_string_lossy().into_owned());
        }
        Err(FileError::Store(e)) => *not_stored = Some(e),
        Err(FileError::Link(e)) => return Err(e),
    }
    Ok(Some(()))
}

async fn migrate_state(w: &Worker, conn: &mut KeptConn) -> Option<MigrateState> {
    match conn.call(&w.socket(), WorkerOp::MigrateStatus).await {
        Ok(WorkerReply::Migrate(p)) => Some(p.state),
        _ => None,
    }
}

async fn wait_listening(worker: &Worker) -> Result<SocketAddr, String> {
    let deadline = tokio::time::Instant::now() + LISTEN_LIMIT;
    while tokio::time::Instant::now() < deadline {
        if !worker.is_alive() {
            let o = worker.exited().await;
            return Err(format!("the destination worker ended: {}", o.message));
        }
        if let Ok(WorkerReply::Migrate(p)) =
            call_once(&worker.socket(), WorkerOp::MigrateStatus).await
        {
            if let Some(a) = p.listen_addr {
                return Ok(a);
            }
        }
        tokio::time::sleep(LISTEN_POLL).await;
    }
    Err(format!(
        "the destination worker was not listening within {}s",
        LISTEN_LIMIT.as_secs()
    ))
}

/// The VM runs here: `running`, the network told, the source told.
async fn arrived(d: &Arc<Daemon>, vm: &Vm, peer: &mut Peer) -> Result<(), String> {
    network_owed::owe(d, vm.id());
    d.store
        .set_state(vm.id(), &Action::Started)
        .map_err(|e| e.to_string())?;
    super::storage::keep(d, vm.id());
    network_owed::take_over(d, vm).await;
    if let Err(e) = peer.send(&PeerMsg::Running).await {
        tracing::warn!(vm = %vm.id(), "telling the source the VM runs here: {e}");
    }
    Ok(())
}

/// The network learns that the VM runs here, before the source hears `Running` (and forgets
/// it): stale stored entries for its CAs go, the peer hosts (`--netvirt-peer`) move theirs
/// to this host's PAs, and only then are its ports announced — a peer drops an overlay
/// announcement from a PA its table does not name for the CA (docs/netvirt.md).
pub async fn take_over_network(d: &Arc<Daemon>, vm: &Vm) {
    netvirt_move::vm_arrived(d, &vm.spec).await;
    let moved = netvirt_move::arrival_entries(d, &vm.spec);
    super::netvirt_peers::push(d, &moved).await;
    announce(d, vm).await;
    // Again a little later, as QEMU's announce repeats: a first round may have been spent
    // resolving provider neighbours (an overlay frame to a PA whose MAC the switch lacks
    // becomes an ARP request for it), and a frame lost on the wire costs a peer its update.
    let (d, vm) = (d.clone(), vm.clone());
    tokio::spawn(async move {
        for wait in ANNOUNCE_AGAIN {
            tokio::time::sleep(wait).await;
            announce(&d, &vm).await;
        }
    });
}

/// `Announce` for each NIC port, so the network learns where the VM is now. A switch that
/// cannot is logged: frames find the VM once it sends.
pub async fn announce(d: &Daemon, vm: &Vm) {
    for nic in &vm.spec.nics {
        let Ok(row) = d.store.find_switch(&nic.switch) else {
            continue;
        };
        let name = crate::daemon::switches::launch::port_name(
            vm.id(),
            crate::daemon::switches::launch::nic_name(nic),
        );
        if let Err(e) = d
            .switches
            .call(row.id, SwitchOp::Announce { name: name.clone() })
            .await
        {
            tracing::info!(vm = %vm.id(), port = %name, "announce not sent: {e}");
        }
    }
}

/// A plain file name (no folders, no `..`): what a quick migration may write.
fn plain_name(name: &Path) -> bool {
    let mut parts = name.components();
    matches!(parts.next(), Some(Component::Normal(_))) && parts.next().is_none()
}

async fn receive_quick(
    d: &Arc<Daemon>,
    peer: &mut Peer,
    vm: &Vm,
    mut arrival: Option<super::tree::Arrival>,
    guard: tokio::sync::OwnedMutexGuard<()>,
) -> Result<(), String> {
    peer.send(&PeerMsg::Accepted {
        listen_addr: None,
        provider_addresses: netvirt_move::provider_addresses(d, &vm.spec),
        send_files: Vec::new(),
    })
    .await?;
    let dir = save::saved_dir(d, vm.id());
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // A file this host cannot store (a full disk) fails the arrival, but only at the commit:
    // the rest is read and dropped so the source hears why instead of a reset connection.
    let mut not_stored: Option<String> = None;
    loop {
        match peer.recv(SOURCE_SILENCE).await? {
            PeerMsg::File { name, len } => {
                if let Some(a) = arrival.as_mut() {
                    if receive_tree_file(peer, a, &name, len, &mut not_stored)
                        .await?
                        .is_some()
                    {
                        continue;
                    }
                }
                if !plain_name(&name) {
                    return Err(format!("file name {} refused", name.display()));
                }
                let path = dir.join(&name);
                let into = not_stored.is_none().then_some(path.as_path());
                match peer.recv_file(into, len, SOURCE_SILENCE).await {
                    Ok(()) => {}
                    Err(FileError::Store(e)) => {
                        tracing::warn!(vm = %vm.id(), "the saved state cannot be stored here: {e}");
                        not_stored = Some(e);
                    }
                    Err(FileError::Link(e)) => return Err(e),
                }
            }
            PeerMsg::Commit => match not_stored {
                Some(e) => return Err(e),
                None => break,
            },
            PeerMsg::Abort { reason } => {
                tracing::info!(vm = %vm.id(), "the source aborted: {reason}");
                remove_incoming(d, vm.id()).await;
                let _ = peer.send(&PeerMsg::Aborted).await;
                return Ok(());
            }
            other => return Err(format!("unexpected {other:?} from the source")),
        }
    }
    test_restore_delay(vm).await;
    if !save::has_saved_state(d, vm.id()) {
        return Err("the saved state arrived without its vm.state".into());
    }
    if let Some(a) = arrival {
        crate::daemon::checkpoints::fault_point("migrate-tree-arrived");
        let (d2, id) = (d.clone(), vm.id());
        tokio::task::spawn_blocking(move || a.settle(&d2, id))
            .await
            .map_err(|e| format!("storing the checkpoint tree: {e}"))??;
    }
    let vm = d
        .store
        .set_state(vm.id(), &Action::Arrived)
        .map_err(|e| e.to_string())?;
    // Owed from here: a vireod that dies while the worker restores finds the VM `starting`
    // at its restart, and the takeover follows the adopted start (`network_owed`).
    network_owed::owe(d, vm.id());
    // The ordinary start of a saved VM: it restores from the files and deletes them.
    drop(guard);
    let job = lifecycle::start(d, &vm).await.map_err(|e| e.body.message)?;
    let limit = lifecycle::start_limit(&vm.spec, true) + RESTORE_SLACK;
    let deadline = tokio::time::Instant::now() + limit;
    let job = loop {
        let j = d.store.get_job(job.id).map_err(|e| e.to_string())?;
        if j.state != JobState::Running {
            break j;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "the restore did not run within {}s",
                limit.as_secs()
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    if job.state != JobState::Completed {
        return Err(format!(
            "the restore failed: {}",
            job.error.unwrap_or_default()
        ));
    }
    network_owed::take_over(d, &vm).await;
    // The VM is ours now, told or not: a source that misses this asks (`whereabouts`).
    if let Err(e) = peer.send(&PeerMsg::Running).await {
        tracing::warn!(vm = %vm.id(), "the VM runs here, but the source was not told: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::bad_disk_slots;

    #[test]
    fn an_offers_slot_layout_must_hold_each_disk_in_a_workers_slots() {
        assert_eq!(bad_disk_slots(&[], 3), None);
        assert_eq!(bad_disk_slots(&[true, false, true], 2), None);
        let why = bad_disk_slots(&[true, false, true], 3).unwrap();
        assert!(
            why.contains("3 slots, 2 full") && why.contains("3 disk(s)"),
            "{why}"
        );
        assert!(bad_disk_slots(&[true; 9], 9).is_some());
    }
}
