//! `MigrateOut`: the source worker's side. On a thread of its own: connect the streams
//! (mutual TLS; the destination answers `OK` to each preamble or says why not), run the VMM's
//! pre-copy (`VmHandle::migrate_out`), then hand the disks over on stream 0 (`handoff.rs`).
//! Until the destination says `RUNNING` the VM can always run here again: on any failure the
//! disks are opened again (if they had been released) and the VM resumes. Once it runs there
//! the worker records where it went and stops the VM; the worker exits `MigratedAway`.
//! With post-copy (`postcopy.rs`) the VM stays paused here after `RUNNING` while the missing
//! pages are served, and only then stops; a failure then loses the VM (`MigrationLost`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use uuid::Uuid;
use vireo_api::worker::{CompressMode, MigrateOptions, MigrateState, MigrationTls, PostcopyMode};
use vireo_block::BlockBackend;
use vireo_migration::auto::AutoCompress;
use vireo_migration::hostauth::{self, ClientStream};
use vireo_migration::preamble::{Preamble, MAX_STREAMS};
use vireo_migration::record::Transport;
use vireo_migration::sender::{Compression, Sender};
use vireo_migration::Codec;
use vireo_vmm::state::Identity;
use vireo_vmm::{HandoffHead, MigrateError, MigrateOutOptions, MigrateShared};

use super::handoff::{self, DiskGeometry, ReleasedDisk};
use super::postcopy;
use super::storage;
use super::timeline::Timeline;
use super::{load_tls, lock, IO_TIMEOUT};
use crate::hotplug::SlotDisk;
use crate::image::{self, DiskArg};
use crate::server::State;

/// Starts the migration (`Err`: refused, nothing started).
pub fn start(
    s: &Arc<State>,
    to: SocketAddr,
    session: Uuid,
    options: MigrateOptions,
    tls: MigrationTls,
) -> Result<(), String> {
    let requested = Instant::now();
    if options.streams == 0 || options.streams > MAX_STREAMS {
        return Err(format!(
            "streams {} is out of range; use 1 to {MAX_STREAMS}",
            options.streams
        ));
    }
    if s.mover.is_running() {
        return Err("a storage move of this VM is running; wait for it or cancel it".into());
    }
    if s.vm.exited() || s.started_at.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        return Err("the VM is not running".into());
    }
    if s.vm.is_paused() {
        // The destination resumes what it receives: a paused VM would wake up there.
        return Err("the VM is paused; resume it first (or save it instead)".into());
    }
    let (id, trusted) = load_tls(&tls)?;
    let cfg = hostauth::client_config(&id, &trusted).map_err(|e| e.to_string())?;
    let (shared, timeline) = s.migration.begin(MigrateState::Precopy, requested)?;
    timeline.mark("checked");
    let st = s.clone();
    std::thread::Builder::new()
        .name("migrate-out".into())
        .spawn(move || {
            let result = run(&st, to, session, &options, cfg, &shared, &timeline);
            // Lost in post-copy (`postcopy::lose`): its end is recorded. Finishing again
            // turned `Lost` into `Failed`, and vireod then failed the job saying the VM "runs
            // on here" while the worker stopped it and its record became `lost`.
            if lock(&st.migration.lost).is_some() {
                return;
            }
            if let Err(e) = &result {
                tracing::warn!("migration to {to} failed: {e}; the VM runs on here");
            }
            st.migration.finish(&result.map(|_| ()));
        })
        .map_err(|e| {
            s.migration
                .finish(&Err(format!("cannot start the thread: {e}")));
            format!("cannot start the migration thread: {e}")
        })?;
    Ok(())
}

fn compression(mode: CompressMode) -> Compression {
    match mode {
        CompressMode::Auto => Compression::Auto(AutoCompress::default()),
        CompressMode::Zstd => Compression::Fixed(Codec::Zstd),
        CompressMode::Lz4 => Compression::Fixed(Codec::Lz4),
        CompressMode::None => Compression::Fixed(Codec::None),
    }
}

/// Connects every stream and waits for the destination's `OK` to its preamble; with post-copy
/// allowed, the request channel first (`postcopy.rs`). The page streams connect at the same
/// time, each on its own thread: their handshakes and the destination's answers overlap
/// instead of adding up.
#[allow(clippy::type_complexity)]
fn connect(
    s: &State,
    to: SocketAddr,
    session: Uuid,
    options: &MigrateOptions,
    cfg: Arc<vireo_migration::hostauth::ClientConfig>,
    timeline: &Timeline,
) -> Result<(Vec<Sender<ClientStream>>, Option<ClientStream>), String> {
    let n = options.streams;
    let requests = match options.postcopy {
        PostcopyMode::Never => None,
        mode => {
            let c = postcopy::connect_requests(to, cfg.clone(), session, n, mode)?;
            if let Some(c) = &c {
                s.migration.add_socket(c.tcp());
            }
            timeline.mark("request channel");
            c
        }
    };
    let one = |i: u16| -> Result<Sender<ClientStream>, String> {
        let stream = hostauth::connect(to, cfg.clone(), IO_TIMEOUT)
            .map_err(|e| format!("stream {i} to {to}: {e}"))?;
        s.migration.add_socket(stream.tcp());
        timeline.mark(&format!("stream {i} TLS"));
        let mut sender = Sender::start(
            stream,
            Preamble::new(session, i, n),
            compression(options.compress),
            Transport::Authenticated,
        )
        .map_err(|e| format!("stream {i} to {to}: {e}"))?;
        // TLS 1.3 reports a refused client certificate only on the first read: the answer
        // to the preamble is that read, before any page is sent.
        handoff::expect(sender.get_mut(), "OK")
            .map_err(|e| format!("stream {i} to {to}: the destination refused it: {e}"))?;
        timeline.mark(&format!("stream {i} OK"));
        Ok(sender)
    };
    let one = &one;
    let results: Vec<Result<Sender<ClientStream>, String>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (1..n)
            .map(|i| {
                std::thread::Builder::new()
                    .name(format!("migrate-connect-{i}"))
                    .spawn_scoped(scope, move || one(i))
            })
            .collect();
        let mut results = vec![one(0)];
        for t in threads {
            results.push(match t {
                Ok(t) => t
                    .join()
                    .unwrap_or_else(|_| Err("a connecting thread panicked".into())),
                Err(e) => Err(format!("cannot start a connecting thread: {e}")),
            });
        }
        results
    });
    // The first failure in stream order; the other streams close as they drop.
    let senders = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok((senders, requests))
}

fn run(
    s: &Arc<State>,
    to: SocketAddr,
    session: Uuid,
    options: &MigrateOptions,
    cfg: Arc<vireo_migration::hostauth::ClientConfig>,
    shared: &MigrateShared,
    timeline: &Timeline,
) -> Result<u64, String> {
    let started = Instant::now();
    // Shared-nothing: the disks first (the VM runs on; their writes stay tracked).
    let mut disks_out = match &options.storage {
        Some(t) => Some(storage::precopy(
            s,
            t,
            cfg.clone(),
            shared,
            options.bandwidth,
        )?),
        None => None,
    };
    if disks_out.is_some() {
        timeline.mark("disks copied");
    }
    let (senders, requests) = connect(s, to, session, options, cfg, timeline)?;
    let announced = Arc::new(Mutex::new(None));
    let opts = MigrateOutOptions {
        handoff_head: Some(handoff_head(s, disks_out.is_none(), &announced)),
        max_downtime: std::time::Duration::from_millis(options.max_downtime_ms.into()),
        bandwidth: options.bandwidth,
        postcopy: match requests {
            Some(_) => postcopy::policy(options.postcopy),
            None => vireo_vmm::PostcopyPolicy::Never,
        },
        ..Default::default()
    };
    let identity = Identity {
        id: Some(s.vm_id.to_string()),
        name: Some(s.spec_name.clone()),
    };
    timeline.mark("pre-copy");
    let handover =
        s.vm.migrate_out(senders, &opts, shared, identity, Some(s.spec_json.clone()))
            .map_err(|e| match e {
                MigrateError::Cancelled => "cancelled".to_string(),
                e => e.to_string(),
            })?;
    s.migration.set_state(MigrateState::Switching);
    timeline.mark("streams done");
    let paused_at = handover.paused_at;
    let missing = handover.postcopy;
    // Post-copy's pages go on every stream after the handoff; without it only stream 0 has
    // more to say.
    let mut streams = handover.streams;
    if missing.is_none() {
        streams.truncate(1);
    }
    let announced = lock(&announced).take();
    match hand_over(s, &mut streams[0], &mut disks_out, announced) {
        Ok(()) => {
            timeline.mark("RUNNING there");
            let downtime_ms = paused_at.elapsed().as_millis() as u64;
            tracing::info!(
                "migrated to {to}: the guest was paused {downtime_ms} ms, {} ms in all",
                started.elapsed().as_millis()
            );
            s.migration.update(|p| p.downtime_ms = Some(downtime_ms));
            if let (Some(missing), Some(requests)) = (&missing, requests) {
                // The VM runs there now; it is complete once every page is there.
                postcopy::serve(
                    s,
                    &mut streams,
                    requests,
                    missing,
                    shared,
                    options.bandwidth,
                )?;
                timeline.mark("post-copy served");
            }
            *lock(&s.migration.migrated_to) = Some((to.to_string(), downtime_ms));
            tracing::info!(
                "migration timeline (source worker, from MigrateOut): {}",
                timeline.line()
            );
            s.vm.request_stop();
            Ok(downtime_ms)
        }
        Err((why, released)) => {
            let _ = handoff::send(&mut streams[0], &format!("FAILED {why}"));
            drop(streams);
            if let Some(disks) = released {
                reopen(s, disks).map_err(|e| {
                    format!(
                        "{why}; then reopening the disks here failed: {e} (the VM stays paused)"
                    )
                })?;
            }
            s.vm.resume()
                .map_err(|e| format!("{why}; then resuming here failed: {e}"))?;
            Err(why)
        }
    }
}

/// What a released disk needs to be opened again.
struct Released {
    index: usize,
    disk: SlotDisk,
    arg: DiskArg,
}

fn geometry_of(disks: &[SlotDisk]) -> Vec<DiskGeometry> {
    disks
        .iter()
        .map(|d| DiskGeometry::of(d.movable.as_ref()))
        .collect()
}

/// The handoff's first lines, made in the pause and sent by the VMM with the device state
/// and `Done` (`vireo_vmm::HandoffHead`): `DISKS`, and `RELEASED` behind it when there is no
/// disk and no disk copy to let go of. The geometry it announced goes into `announced` for
/// [`hand_over`].
fn handoff_head(
    s: &Arc<State>,
    no_disk_copy: bool,
    announced: &Arc<Mutex<Option<Vec<DiskGeometry>>>>,
) -> HandoffHead {
    let (s, announced) = (s.clone(), announced.clone());
    HandoffHead(Arc::new(move || {
        let geometry = geometry_of(&s.hotplug.disks());
        let json = serde_json::to_string(&geometry).expect("geometry serializes");
        let mut lines = format!("DISKS {json}\n");
        if geometry.is_empty() && no_disk_copy {
            lines.push_str("RELEASED\n");
        }
        *lock(&announced) = Some(geometry);
        lines.into_bytes()
    }))
}

/// The handoff on stream 0, after its head (`announced`: the geometry it sent, `None` if the
/// VMM never made it). `Err((why, Some(disks)))` when the disks had been released.
#[allow(clippy::type_complexity)]
fn hand_over(
    s: &State,
    ctl: &mut ClientStream,
    disks_out: &mut Option<storage::DiskSender>,
    announced: Option<Vec<DiskGeometry>>,
) -> Result<(), (String, Option<Vec<Released>>)> {
    let t = Instant::now();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let disks = s.hotplug.disks();
    let geometry = geometry_of(&disks);
    let nothing_to_release = disks.is_empty() && disks_out.is_none();
    let Some(announced) = announced else {
        return Err(("the VMM sent no DISKS line".into(), None));
    };
    if announced != geometry {
        // A guard: `AddDisk`/`RemoveDisk` are refused while a migration runs. After a
        // `RELEASED` the destination may resume at once, so the failure is one after it.
        let why = format!(
            "the VM's disks changed during the switch-over ({} announced, {} now)",
            announced.len(),
            geometry.len()
        );
        let released = announced.is_empty() && disks_out.is_none();
        return Err((why, released.then(Vec::new)));
    }
    if nothing_to_release {
        // Nothing to let go of: RELEASED went with DISKS in the head, so the destination
        // resumes right after applying the state instead of waiting a round trip for it. A
        // `FAILED` instead of APPLIED still leaves the VM here (no disk to reopen).
        handoff::expect(ctl, "APPLIED").map_err(|e| (e, None))?;
        let applied = ms(t);
        handoff::expect(ctl, "RUNNING").map_err(|e| (e, Some(Vec::new())))?;
        tracing::info!(
            "switch-over (source handoff, from DISKS; no disks: RELEASED sent with it): \
             APPLIED +{applied:.2} ms, RUNNING +{:.2} ms",
            ms(t)
        );
        return Ok(());
    }
    // The VM is paused and its devices parked: flushing now overlaps the destination's
    // restore instead of following it (the flush in `release` then finds little to do).
    for d in &disks {
        if let Err(e) = d.movable.flush() {
            tracing::warn!("flushing {} before the handoff: {e}", d.path.display());
        }
    }
    handoff::expect(ctl, "APPLIED").map_err(|e| (e, None))?;
    let applied = ms(t);
    let (released, last_copy) = release(s, disks, &geometry, disks_out);
    // Shared-nothing: the copies must be complete and closed before the destination opens
    // them; a failure here keeps the VM (its disks are opened again here).
    let last_copy = last_copy.and_then(|()| disks_out.take().map_or(Ok(()), |o| o.finish()));
    if let Err(e) = last_copy {
        return Err((e, Some(released)));
    }
    if let Err(e) = handoff::send(ctl, "RELEASED") {
        return Err((e.to_string(), Some(released)));
    }
    let released_at = ms(t);
    // Released: from here on a failure means opening the disks again. A destination that ran
    // the VM and died before its line arrived holds the disk locks until it is gone, so that
    // reopen then fails and the VM stays paused here rather than running twice.
    match handoff::expect(ctl, "RUNNING") {
        Ok(()) => {
            tracing::info!(
                "switch-over (source handoff, from DISKS): APPLIED +{applied:.2} ms, \
                 RELEASED +{released_at:.2} ms, RUNNING +{:.2} ms",
                ms(t)
            );
            Ok(())
        }
        Err(e) => Err((e, Some(released))),
    }
}

/// Flushes and closes every disk (its lock goes with the last handle), leaving a placeholder.
/// Shared-nothing: each disk's last dirty chunks go to the destination while it is parked
/// (the second value: the first error of that).
fn release(
    s: &State,
    disks: Vec<SlotDisk>,
    geometry: &[DiskGeometry],
    disks_out: &mut Option<storage::DiskSender>,
) -> (Vec<Released>, Result<(), String>) {
    let mut out = Vec::new();
    let mut last_copy = Ok(());
    for (index, (d, g)) in disks.into_iter().zip(geometry).enumerate() {
        let (path, img) = d.movable.image();
        let arg = DiskArg {
            path: path.clone(),
            read_only: g.read_only,
            format: Some(img.format()),
            queues: None,
        };
        let parked = d.movable.park();
        if let Err(e) = parked.source().flush() {
            tracing::warn!("flushing {} before the handoff: {e}", path.display());
        }
        if let (Some(o), Ok(())) = (disks_out.as_mut(), &last_copy) {
            last_copy = o.send_parked(s, index, &parked);
        }
        let old = parked.switch(Arc::new(ReleasedDisk(*g)), path.clone(), image::Image::Raw);
        // The control socket's handle on the image goes too, so nothing keeps it open.
        s.hotplug
            .retarget(index, &path, image::Image::Raw, &s.meter);
        drop(img);
        drop(old);
        tracing::info!("disk {} released for the migration", path.display());
        out.push(Released {
            index,
            disk: d,
            arg,
        });
    }
    (out, last_copy)
}

/// Opens the released disks again and puts them back under the VM.
fn reopen(s: &State, disks: Vec<Released>) -> Result<(), String> {
    for r in disks {
        let opened = image::open(&r.arg).map_err(|e| e.to_string())?;
        let path: PathBuf = r.arg.path.clone();
        r.disk
            .movable
            .park()
            .switch(opened.backend, path.clone(), opened.image.clone());
        s.hotplug.retarget(r.index, &path, opened.image, &s.meter);
        tracing::info!(
            "disk {} opened again after the failed handoff",
            path.display()
        );
    }
    Ok(())
}
