//! The `incoming` launch mode: the destination worker's side of a live migration. `launch.rs`
//! builds the VM's skeleton first (RAM, vCPUs, devices; every disk a [`PendingDisk`]) and
//! calls [`listen`]; once the worker's sockets are served, [`receive`] accepts the source's
//! streams (mutual TLS, this session only, a bounded wait), lets the VMM apply pages and then
//! the device state, and does the destination's part of the disk handoff: open the disks once
//! the source has released them, resume the VM, say `RUNNING`. Any failure before that ends
//! the worker with nothing run (the source keeps the VM).

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_api::worker::{IncomingMigration, MigrateState};
use vireo_migration::hostauth::{self, ServerConfig, ServerStream};
use vireo_migration::record::Transport;
use vireo_migration::Receiver;
use vireo_vmm::{MigrateShared, PostcopyIncoming, Vm};

use super::handoff::{self, DiskGeometry, PendingDisk};
use super::timeline::Timeline;
use super::{load_tls, postcopy, Migration};
use crate::server::State;

/// How long the destination waits for all of the source's streams, from its start or from
/// vireod's last word that the source is still copying the disks (`MigrateSourceAlive`).
pub const WAIT_FOR_SOURCE: Duration = Duration::from_secs(120);

/// [`WAIT_FOR_SOURCE`], or `VIREO_WAIT_FOR_SOURCE_SECS` (tests: a disk copy longer than the
/// wait without waiting two minutes).
fn wait_for_source() -> Duration {
    std::env::var("VIREO_WAIT_FOR_SOURCE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(WAIT_FOR_SOURCE, Duration::from_secs)
}

/// A destination ready to receive: the bound listener and what it checks.
pub struct Incoming {
    session: uuid::Uuid,
    streams: u16,
    listener: TcpListener,
    cfg: Arc<ServerConfig>,
    shared: Arc<MigrateShared>,
    timeline: Arc<Timeline>,
    /// The skeleton's disks, in slot order.
    pub pending: Vec<Arc<PendingDisk>>,
    pub disks: Vec<vireo_api::DiskSpec>,
    /// [`HANDOFF_HOLD`], read here so the switch-over does not look it up.
    handoff_hold: Option<Duration>,
}

/// Fault injection (`crates/cli/tests/e2e/migrate_faults_real.rs`): holds this side N ms once
/// the source has let go of the disks, before it takes them and resumes, so a test can strike
/// there. Unset, nothing waits.
const HANDOFF_HOLD: &str = "VIREO_TEST_HANDOFF_HOLD_MS";

/// Binds the listener and publishes its address (`MigrateStatus`: `Listening`).
pub fn listen(
    m: &IncomingMigration,
    migration: &Migration,
    pending: Vec<Arc<PendingDisk>>,
    disks: Vec<vireo_api::DiskSpec>,
    launched: Instant,
) -> Result<Incoming, String> {
    if m.streams == 0 || m.streams > vireo_migration::preamble::MAX_STREAMS {
        return Err(format!(
            "incoming streams {} is out of range (1-16)",
            m.streams
        ));
    }
    let (id, trusted) = load_tls(&m.tls)?;
    let cfg = hostauth::server_config(&id, &trusted).map_err(|e| e.to_string())?;
    let listener =
        TcpListener::bind(m.listen).map_err(|e| format!("listening on {}: {e}", m.listen))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listening on {}: {e}", m.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("listening on {}: {e}", m.listen))?;
    let (shared, timeline) = migration.begin(MigrateState::Listening, launched)?;
    timeline.mark("listening (VM built)");
    migration.update(|p| p.listen_addr = Some(addr));
    tracing::info!(
        "waiting for the migration source on {addr} (session {})",
        m.session
    );
    Ok(Incoming {
        session: m.session,
        streams: m.streams,
        listener,
        cfg,
        shared,
        timeline,
        pending,
        disks,
        handoff_hold: crate::fault_hooks::read(HANDOFF_HOLD),
    })
}

/// Receives the VM into `vm` and runs the handoff; on `Ok` the VM is resumed (its vCPU
/// threads, started parked once the state is applied, run). With post-copy the result is running, and must be kept until the
/// VM has stopped: it completes the migration (or loses the VM) on its own.
pub fn receive(
    vm: &mut Vm,
    s: &Arc<State>,
    inc: Incoming,
) -> Result<Option<PostcopyIncoming>, String> {
    let result = receive_inner(vm, s, &inc);
    match &result {
        Ok(Some(_)) => {}
        Ok(None) => s.migration.finish(&Ok(())),
        Err(e) => s.migration.finish(&Err(e.clone())),
    }
    result
}

fn receive_inner(
    vm: &mut Vm,
    s: &Arc<State>,
    inc: &Incoming,
) -> Result<Option<PostcopyIncoming>, String> {
    let (streams, requests) = accept_all(s, inc)?;
    let release = StreamRelease::start();
    // A source older than stream version 5 sends post-copy's pages on stream 0 only and
    // closes the others at `Done`.
    let postcopy_streams = if streams
        .iter()
        .all(|(rx, _)| rx.preamble.version >= vireo_migration::preamble::POSTCOPY_ON_EVERY_STREAM)
    {
        streams.len()
    } else {
        1
    };
    inc.timeline.mark("streams accepted");
    s.migration.set_state(MigrateState::Precopy);
    let started = Instant::now();
    let (mut streams, state) = vm
        .receive_migration(streams, &inc.shared)
        .map_err(|e| e.to_string())?;
    s.migration.set_state(MigrateState::Switching);
    inc.timeline.mark("streams done");
    // Timings of the switch-over from the moment every stream ended (`Done`).
    let t = Instant::now();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let ctl = &mut streams[0];
    let fail = |ctl: &mut ServerStream, why: String| {
        let _ = handoff::send(ctl, &format!("FAILED {why}"));
        why
    };
    let line = handoff::recv(ctl).map_err(|e| format!("waiting for DISKS: {e}"))?;
    let geometry: Vec<DiskGeometry> = line
        .strip_prefix("DISKS ")
        .and_then(|j| serde_json::from_str(j).ok())
        .ok_or_else(|| format!("expected DISKS, got {line:?}"))?;
    if geometry.len() != inc.pending.len() {
        return Err(fail(
            ctl,
            format!(
                "the source has {} disks, this VM's spec {}",
                geometry.len(),
                inc.pending.len()
            ),
        ));
    }
    for (p, g) in inc.pending.iter().zip(&geometry) {
        p.set_geometry(*g);
    }
    let missing = inc.shared.take_postcopy_missing();
    if let (Some(_), Some(why)) = (&missing, vm.postcopy_refusal()) {
        return Err(fail(ctl, format!("{why}; migrate with --postcopy never")));
    }
    let disks_at = ms(t);
    vm.apply_state(&state)
        .map_err(|e| fail(ctl, format!("applying the device state: {e}")))?;
    // Parked until the resume below, which then only wakes them (docs/migration-performance.md,
    // "The destination's vCPU threads"); their spawn overlaps the handoff's round trip.
    vm.start_vcpus()
        .map_err(|e| fail(ctl, format!("starting the vCPU threads: {e}")))?;
    let applied = ms(t);
    handoff::send(ctl, "APPLIED").map_err(|e| format!("sending APPLIED: {e}"))?;
    handoff::expect(ctl, "RELEASED")?;
    let released = ms(t);
    if let Some(pause) = inc.handoff_hold {
        crate::fault_hooks::hold_for("hand-over (disks released there)", HANDOFF_HOLD, pause);
    }
    attach_disks(s, inc).map_err(|e| fail(ctl, e))?;
    // Post-copy: missing pages registered before anything of the guest runs.
    let mut pc = match &missing {
        Some(runs) => Some(postcopy::start(vm, s, runs, requests).map_err(|e| fail(ctl, e))?),
        None => None,
    };
    vm.handle()
        .resume()
        .map_err(|e| fail(ctl, format!("resuming: {e}")))?;
    let resumed = ms(t);
    // The woken vCPU thread is queued on this thread's CPU; the scheduler moved it to an idle
    // one only ~0.2 ms later in a trace (this thread went on to send RUNNING and log). Let it
    // run first: RUNNING waits a few microseconds, the guest's first move does not.
    std::thread::yield_now();
    // The VM runs here now, whether or not this line arrives (see docs/migration.md).
    if let Err(e) = handoff::send(ctl, "RUNNING") {
        tracing::warn!("the VM runs here, but telling the source failed: {e}");
    }
    inc.timeline.mark("RUNNING sent");
    if let Some(pc) = &mut pc {
        s.migration.set_state(MigrateState::Postcopy);
        streams.truncate(postcopy_streams);
        if let Err(e) = pc.place_from(streams, inc.shared.clone()) {
            postcopy::lose(s, &format!("starting a post-copy placement thread: {e}"));
        }
    } else {
        release.later(streams);
    }
    tracing::info!(
        "switch-over (destination, from the streams' end): DISKS +{disks_at:.2} ms, state \
         applied +{applied:.2} ms, RELEASED +{released:.2} ms, resumed +{resumed:.2} ms, \
         RUNNING sent +{:.2} ms",
        ms(t)
    );
    tracing::info!(
        "migration timeline (destination worker, from its start): {}",
        inc.timeline.line()
    );
    tracing::info!(
        "migration received: {} MiB, {} ms from the first stream to running",
        inc.shared.stats().transferred_bytes >> 20,
        started.elapsed().as_millis()
    );
    Ok(pc)
}

/// Frees the page streams' memory (a 1 MiB read-ahead buffer each, the TLS library's
/// buffers) a while after the resume instead of at it. Freeing it unmaps memory, which takes
/// the process's mmap lock for writing, and the just-resumed vCPU needs that lock (to read)
/// for its first touch of each piece of guest memory: traced, the two unmaps right after the
/// resume (~0.13 ms each on this host) held the guest's first move back. The sockets are shut
/// down at once, so the source sees the end as before. The thread is started before the
/// pages flow, since starting one maps its stack.
struct StreamRelease(Option<std::sync::mpsc::Sender<Vec<ServerStream>>>);

/// How long the resumed guest gets before the streams' memory is freed.
const RELEASE_AFTER: Duration = Duration::from_millis(50);

impl StreamRelease {
    fn start() -> StreamRelease {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<ServerStream>>();
        let spawned = std::thread::Builder::new()
            .name("stream-release".into())
            .spawn(move || {
                if let Ok(streams) = rx.recv() {
                    std::thread::sleep(RELEASE_AFTER);
                    drop(streams);
                }
            });
        StreamRelease(spawned.is_ok().then_some(tx))
    }

    fn later(self, streams: Vec<ServerStream>) {
        for st in &streams {
            let _ = st.tcp().shutdown(std::net::Shutdown::Both);
        }
        // Without the thread (or should it be gone) they are freed here, as before.
        if let Some(tx) = &self.0 {
            let _ = tx.send(streams);
        }
    }
}

/// Opens the disks the source released and puts them under the waiting devices.
fn attach_disks(s: &State, inc: &Incoming) -> Result<(), String> {
    let slots = s.hotplug.disks();
    for (i, ((d, p), slot)) in inc.disks.iter().zip(&inc.pending).zip(slots).enumerate() {
        let opened = crate::image::open(&crate::hotplug::disk_arg(d))
            .map_err(|e| format!("opening disk {}: {e}", d.path.display()))?;
        // Requests the restored device took before this go on to the real disk first.
        p.attach(opened.backend.clone());
        slot.movable
            .park()
            .switch(opened.backend, d.path.clone(), opened.image.clone());
        s.hotplug.retarget(i, &d.path, opened.image, &s.meter);
        tracing::info!("disk {} attached after the handoff", d.path.display());
    }
    Ok(())
}

/// How often a destination waiting for its source looks at its cancel flag and deadline.
const ACCEPT_CHECK: Duration = Duration::from_millis(100);

/// Sleeps until a connection is pending on `l` (at once, not at the next tick of a timer:
/// the source's streams are waited for on the critical path) or `ACCEPT_CHECK` passed.
fn wait_for_connection(l: &TcpListener) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(l, PollFlags::IN)];
    let check = Timespec {
        tv_sec: 0,
        tv_nsec: ACCEPT_CHECK.as_nanos() as _,
    };
    // An error (EINTR) is one more turn of the caller's loop.
    let _ = poll(&mut fds, Some(&check));
}

/// Waits (bounded, cancellable) for every stream of the session, and takes the post-copy
/// request channel if the source opens one (it does so first). Connections that fail the
/// handshake (an untrusted host) or belong to another session are refused and waited past.
#[allow(clippy::type_complexity)]
fn accept_all(
    s: &State,
    inc: &Incoming,
) -> Result<(Vec<(Receiver, ServerStream)>, Option<ServerStream>), String> {
    let n = usize::from(inc.streams);
    let mut requests = None;
    let mut got: Vec<Option<(Receiver, ServerStream)>> = (0..n).map(|_| None).collect();
    let wait = wait_for_source();
    let started = Instant::now();
    while got.iter().any(Option::is_none) {
        if inc.shared.cancelled() {
            return Err("cancelled".into());
        }
        let since = s
            .migration
            .source_alive_at()
            .map_or(started, |t| t.max(started));
        if since.elapsed() > wait {
            return Err(format!(
                "the source did not connect all {n} streams within {} s (of its start or of \
                 the last disk data)",
                wait.as_secs()
            ));
        }
        let (tcp, peer) = match inc.listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_for_connection(&inc.listener);
                continue;
            }
            Err(e) => return Err(format!("accepting a migration stream: {e}")),
        };
        let _ = tcp.set_nonblocking(false);
        s.migration.add_socket(&tcp);
        let mut stream = match hostauth::accept(tcp, inc.cfg.clone(), super::IO_TIMEOUT) {
            Ok(st) => st,
            Err(e) => {
                tracing::warn!("migration connection from {peer} refused: {e}");
                continue;
            }
        };
        let rx = match Receiver::start(&mut stream, Some(inc.session), Transport::Authenticated) {
            Ok(rx) => rx,
            Err(e) => {
                tracing::warn!("migration stream from {peer} refused: {e}");
                let _ = handoff::send(&mut stream, &format!("FAILED {e}"));
                continue;
            }
        };
        if rx.preamble.is_request_channel() && rx.preamble.streams == inc.streams {
            if requests.is_some() {
                tracing::warn!("a second post-copy request channel from {peer} refused");
                let _ = handoff::send(&mut stream, "FAILED a request channel is open already");
                continue;
            }
            if let Some(why) = s.vm.postcopy_refusal() {
                // The source then migrates pre-copy only (or fails, asked for `always`).
                handoff::send(&mut stream, &format!("{}{why}", postcopy::NO_POSTCOPY))
                    .map_err(|e| format!("answering the request channel: {e}"))?;
                continue;
            }
            handoff::send(&mut stream, "OK")
                .map_err(|e| format!("answering the request channel: {e}"))?;
            requests = Some(stream);
            continue;
        }
        let i = usize::from(rx.preamble.stream);
        if rx.preamble.is_request_channel()
            || rx.preamble.streams != inc.streams
            || i >= n
            || got[i].is_some()
        {
            let why = format!(
                "stream {} of {} does not fit this migration of {} streams",
                rx.preamble.stream, rx.preamble.streams, inc.streams
            );
            tracing::warn!("migration stream from {peer} refused: {why}");
            let _ = handoff::send(&mut stream, &format!("FAILED {why}"));
            continue;
        }
        handoff::send(&mut stream, "OK").map_err(|e| format!("answering stream {i}: {e}"))?;
        inc.timeline.mark(&format!("stream {i} accepted"));
        got[i] = Some((rx, stream));
    }
    Ok((got.into_iter().flatten().collect(), requests))
}
