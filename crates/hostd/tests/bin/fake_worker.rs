//! `vireo-fake-worker --vm-dir DIR`: a stand-in for `vireo-vm` that speaks the worker protocol
//! (`vireo_api::worker`) without KVM, so vireod's supervision, crashes and re-adoption are
//! tested quickly and deterministically. Its "guest" is a line echo on the console.
//!
//! Behaviour is chosen per VM by words in the spec's `cmdline`:
//! - `fake.boot_ms=N`: the vCPUs "run" N ms after start (default 100);
//! - `fake.never_runs`: they never do;
//! - `fake.bind_ms=N`: the sockets appear only N ms after start;
//! - `fake.restore_bind_ms=N`: the same, only for a launch that restores a saved VM (a large
//!   restore: the real worker answers once the VM is built);
//! - `fake.fail_start=WORDS_WITH_UNDERSCORES`: exit 1 at once with `StartFailed` (the message
//!   with `_` as spaces), before binding any socket;
//! - `fake.crash_start`: exit 3 at once without a record;
//! - `fake.ignore_shutdown`, `fake.ignore_turnoff`: answer `Ok` and do nothing;
//! - `fake.vcpu_fail_ms=N`: N ms after running, exit with `VcpuFailed`;
//! - `fake.wrong_id`: `Hello` answers another VM's id;
//! - `fake.refuse=OP`: `Pause`, `Resume`, `Reset` or `Save` (OP lower case) answers `Error`.
//!
//! `Checkpoint` writes the same two files into its directory and makes each child (a real
//! differencing VHDX of the spec's disk with that serial; the fake holds no disk open), then
//! answers a pause of 1 ms (`fake.refuse=checkpoint`: `Error`, nothing made).
//! `ApplyCheckpoint` checks the state is there, makes each child on its parent, and from then
//! on `Metrics` reports the disks on the children (`fake.refuse=apply`: `Error`, nothing
//! made); it dies at `VIREO_CHECKPOINT_FAULT=worker-child|worker-apply-switched`.
//!
//! `Save` writes `vm.state` (the text `fake-state`) and `memory.bin` into the save directory
//! and exits `Saved`; a launch with `restore_from` whose `vm.state` is not exactly that exits
//! `StartFailed` naming the file, and otherwise prints `fake guest NAME restored`; with
//! `fake.restored_lost_ms=N` it then exits `MigrationLost` N ms later (standing in for a later
//! post-copy migration away from that host that lost the VM).
//!
//! Live migration (the contract of `vireo_api::worker`, played over plain TCP instead of the
//! real streams): a launch with `incoming` binds its `listen` address and reports `listening`
//! with the bound `listen_addr`, not running. `MigrateOut {to}` on a running fake connects
//! there, sends `session <uuid>`, reports `precopy` rounds (one per 100 ms, each sending
//! `pages N` and `fake.round_bytes=N` bytes, default 4096) for `fake.migrate_ms=N` ms (default
//! 300), then `switching` (paused), and hands over as the real workers do: `switch` →
//! `applied` → the source lets go of its "disk" → `released` → the destination takes it
//! (after `fake.switch_ms`, default 0, in state `switching`), runs (printing `fake guest NAME
//! arrived`) → `running`; the source reports `completed` and exits `MigratedAway` (with its
//! last progress) `fake.exit_ms` later (default 100). The "disk" is `fake.lock=PATH`, an
//! exclusive flock held while the VM may run (taken at start). A stream that ends before
//! `released` resumes the source; one that ends after it without `running` resumes it only if
//! it can take the lock back (else it stays paused, `failed`), as docs/migration.md's
//! "remaining window". `MigrateCancel` before the switch-over sends `cancel` (the
//! destination exits `TurnedOff`), the source runs on (`cancelled`); on the destination it
//! shuts the stream down. Words: `fake.refuse=migrate` (`MigrateOut` answers `Error`),
//! `fake.dest_dies` (the destination exits with status 3, no record, when the source
//! connects), `fake.stream_proxy=ADDR` (the source connects there and names the real address
//! in a first line `to ADDR`: the fault tests' proxy), `fake.running_lost` (the destination
//! resumes the VM but its `running` line is lost: the stream is shut down instead),
//! `fake.postcopy_lost_ms=N` (the destination exits `MigrationLost` N ms after it resumed the
//! VM, as a post-copy whose source died), `fake.unconfirmed_ms=N` (a source whose stream ended
//! without `running` decides N ms later, as a real one that waits out its read timeout),
//! `fake.source_lost` (that source then decides it lost the VM in post-copy, as a real one
//! whose streams broke after the switch-over: it reports `lost` and exits `MigrationLost`
//! `fake.exit_ms` later, whatever the destination did).
//!
//! `Metrics` answers the `WorkerMetrics` JSON in `<vm-dir>/fake-metrics.json` when a test has
//! written one (numbers under the test's control), else zeros with the real uptime.
//! `Pause`/`Resume` set and clear `paused` in `Status`; `Reset` restarts the "guest" (the
//! running line is printed again).
//!
//! The console (one client at a time, a new one replaces the old, as in `vireo-vm`) echoes each
//! line it receives as `echo: LINE`; the spec's `shutdown_line` (from
//! `Shutdown` or typed on the console) powers the guest off (status 0).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use vireo_api::worker::{
    ApplyChild, ApplyReport, CheckpointChild, CheckpointReport, DiskMetrics, MigrateProgress,
    MigrateState, WorkerExit, WorkerExitReason, WorkerLaunch, WorkerMetrics, WorkerOp, WorkerReply,
    WorkerRequest, WorkerStatus, WORKER_PROTOCOL_VERSION,
};

struct Guest {
    dir: PathBuf,
    launch: WorkerLaunch,
    ring: Vec<u8>,
    total: u64,
    started_at: Option<i64>,
    paused: bool,
    /// One client at a time, as in `vireo-vm`: a new one replaces (closes) the attached one.
    console: Option<UnixStream>,
    /// Where a migration (either side) stands.
    mig: MigrateProgress,
    /// `MigrateCancel` asked (either side).
    mig_cancel: bool,
    /// Destination: the source's connection, shut down by a cancel.
    mig_conn: Option<std::net::TcpStream>,
    /// `fake.lock`: held while the VM may run here.
    disk_lock: Option<std::fs::File>,
    /// The children an `ApplyCheckpoint` put the disks on (what `Metrics` reports then).
    applied_to: Vec<(String, PathBuf)>,
}

type Shared = Arc<Mutex<Guest>>;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn word<'a>(g: &'a WorkerLaunch, key: &str) -> Option<&'a str> {
    g.spec.cmdline.split_whitespace().find_map(|w| {
        if w == key {
            Some("")
        } else {
            w.strip_prefix(key)?.strip_prefix('=')
        }
    })
}

fn exit_with(dir: &Path, reason: WorkerExitReason, code: i32) -> ! {
    let exit = WorkerExit {
        pid: std::process::id(),
        reason,
        at: now_ms(),
    };
    let tmp = dir.join("exit.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&exit).unwrap()).unwrap();
    std::fs::rename(&tmp, dir.join("exit.json")).unwrap();
    eprintln!("fake worker {}: exiting ({exit:?})", std::process::id());
    std::process::exit(code)
}

/// Guest output: into the ring and to every attached console.
fn output(g: &Shared, bytes: &[u8]) {
    let mut g = g.lock().unwrap();
    let cap = g.launch.spec.console_ring_bytes as usize;
    g.ring.extend_from_slice(bytes);
    if g.ring.len() > cap {
        let drop = g.ring.len() - cap;
        g.ring.drain(..drop);
    }
    g.total += bytes.len() as u64;
    if g.console
        .as_mut()
        .is_some_and(|c| c.write_all(bytes).is_err())
    {
        g.console = None;
    }
}

fn power_off(g: &Shared) -> ! {
    output(g, b"fake guest: powering off\n");
    let dir = g.lock().unwrap().dir.clone();
    exit_with(&dir, WorkerExitReason::PoweredOff { status: 0 }, 0)
}

fn handle_control(g: Shared, stream: UnixStream) {
    let mut writer = stream.try_clone().unwrap();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let reply = match serde_json::from_str::<WorkerRequest>(&line) {
            Err(e) => WorkerReply::Error {
                message: format!("bad request: {e}"),
            },
            Ok(r) if r.version != WORKER_PROTOCOL_VERSION => WorkerReply::Error {
                message: format!("protocol version {} not spoken", r.version),
            },
            Ok(r) => answer(&g, r.op),
        };
        let mut text = serde_json::to_vec(&reply).unwrap();
        text.push(b'\n');
        if writer.write_all(&text).is_err() {
            return;
        }
    }
}

fn answer(g: &Shared, op: WorkerOp) -> WorkerReply {
    let (launch, dir) = {
        let guard = g.lock().unwrap();
        (guard.launch.clone(), guard.dir.clone())
    };
    match op {
        WorkerOp::Hello => WorkerReply::Hello {
            version: WORKER_PROTOCOL_VERSION,
            vm_id: if word(&launch, "fake.wrong_id").is_some() {
                uuid::Uuid::new_v4()
            } else {
                launch.vm_id
            },
            pid: std::process::id(),
        },
        WorkerOp::Status => {
            let (started_at, paused) = {
                let guard = g.lock().unwrap();
                (guard.started_at, guard.paused)
            };
            WorkerReply::Status(WorkerStatus {
                running: started_at.is_some(),
                started_at,
                console_socket: dir.join("console.sock"),
                paused,
                checkpointing: false,
                disk_slots: vec![],
            })
        }
        WorkerOp::Shutdown => match &launch.spec.shutdown_line {
            None => WorkerReply::Error {
                message: "the spec has no shutdown_line".into(),
            },
            Some(_) if word(&launch, "fake.ignore_shutdown").is_some() => WorkerReply::Ok,
            Some(_) => {
                let g = g.clone();
                thread::spawn(move || {
                    thread::sleep(Duration::from_millis(100));
                    power_off(&g)
                });
                WorkerReply::Ok
            }
        },
        WorkerOp::TurnOff => {
            if word(&launch, "fake.ignore_turnoff").is_none() {
                thread::spawn(move || {
                    thread::sleep(Duration::from_millis(50));
                    exit_with(&dir, WorkerExitReason::TurnedOff, 0)
                });
            }
            WorkerReply::Ok
        }
        WorkerOp::ConsoleLog { max_bytes } => {
            let guard = g.lock().unwrap();
            let n = guard.ring.len().min(max_bytes as usize);
            let tail = &guard.ring[guard.ring.len() - n..];
            WorkerReply::ConsoleLog {
                data_base64: base64::engine::general_purpose::STANDARD.encode(tail),
                total_bytes: guard.total,
            }
        }
        WorkerOp::Metrics => metrics(g, &dir),
        // The fake has no disks to plug; the real worker is tested in crates/worker.
        WorkerOp::AddDisk { .. } | WorkerOp::RemoveDisk { .. } => WorkerReply::Error {
            message: "the fake worker does not hot-plug disks".into(),
        },
        WorkerOp::MoveStorage { .. } | WorkerOp::MoveStorageCancel => WorkerReply::Error {
            message: "the fake worker does not move storage".into(),
        },
        WorkerOp::MoveStorageStatus => {
            WorkerReply::MoveStorage(vireo_api::worker::MoveProgress::default())
        }
        WorkerOp::MigrateOut { to, session, .. } => {
            if word(&launch, "fake.refuse") == Some("migrate") {
                return WorkerReply::Error {
                    message: "fake worker refuses migrate".into(),
                };
            }
            let mut guard = g.lock().unwrap();
            if guard.started_at.is_none()
                || matches!(
                    guard.mig.state,
                    MigrateState::Precopy | MigrateState::Switching
                )
            {
                return WorkerReply::Error {
                    message: "not running, or a migration runs already".into(),
                };
            }
            guard.mig = MigrateProgress {
                state: MigrateState::Precopy,
                memory_bytes: launch.spec.memory_bytes,
                ..Default::default()
            };
            guard.mig_cancel = false;
            drop(guard);
            let g = g.clone();
            thread::spawn(move || migrate_out(g, to, session));
            WorkerReply::Ok
        }
        WorkerOp::MigrateCancel => {
            let mut guard = g.lock().unwrap();
            match guard.mig.state {
                MigrateState::Switching | MigrateState::Completed => WorkerReply::Error {
                    message: "too late: the switch-over has begun".into(),
                },
                _ => {
                    guard.mig_cancel = true;
                    // Destination: the source's stream ends here, so no hand-over follows.
                    if let Some(c) = guard.mig_conn.take() {
                        let _ = c.shutdown(std::net::Shutdown::Both);
                    }
                    WorkerReply::Ok
                }
            }
        }
        WorkerOp::MigrateStatus => WorkerReply::Migrate(g.lock().unwrap().mig.clone()),
        // The fake destination waits for its source without a limit.
        WorkerOp::MigrateSourceAlive => WorkerReply::Ok,
        WorkerOp::Save { dir: to, .. } => {
            if word(&launch, "fake.refuse") == Some("save") {
                return WorkerReply::Error {
                    message: "fake worker refuses save".into(),
                };
            }
            let to = to.unwrap_or_else(|| dir.join("saved"));
            std::fs::create_dir_all(&to).unwrap();
            write_fake_save(&to).unwrap();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(50));
                exit_with(&dir, WorkerExitReason::Saved { dir: to }, 0)
            });
            WorkerReply::Ok
        }
        WorkerOp::ApplyCheckpoint { dir: to, children } => {
            if word(&launch, "fake.refuse") == Some("apply") {
                return WorkerReply::Error {
                    message: "fake worker refuses apply".into(),
                };
            }
            fake_apply(g, &to, &children)
        }
        WorkerOp::Checkpoint { dir: to, children } => {
            if word(&launch, "fake.refuse") == Some("checkpoint") {
                return WorkerReply::Error {
                    message: "fake worker refuses checkpoint".into(),
                };
            }
            fake_checkpoint(&launch, &to, &children)
        }
        WorkerOp::Pause | WorkerOp::Resume | WorkerOp::Reset => {
            let name = match op {
                WorkerOp::Pause => "pause",
                WorkerOp::Resume => "resume",
                _ => "reset",
            };
            if word(&launch, "fake.refuse") == Some(name) {
                return WorkerReply::Error {
                    message: format!("fake worker refuses {name}"),
                };
            }
            match op {
                WorkerOp::Pause => g.lock().unwrap().paused = true,
                WorkerOp::Resume => g.lock().unwrap().paused = false,
                _ => {
                    {
                        let mut guard = g.lock().unwrap();
                        guard.paused = false;
                        guard.started_at = Some(now_ms());
                    }
                    output(
                        g,
                        format!("fake guest {} running\n", launch.spec.name).as_bytes(),
                    );
                }
            }
            WorkerReply::Ok
        }
    }
}

fn set_mig(g: &Shared, f: impl FnOnce(&mut MigrateProgress)) {
    f(&mut g.lock().unwrap().mig);
}

/// The fake's stand-in for a disk's lock (`fake.lock=PATH`): an exclusive `flock` on PATH,
/// held while the VM may run, as the real worker's disks' OFD locks are.
fn take_lock(launch: &WorkerLaunch) -> Result<Option<std::fs::File>, String> {
    let Some(path) = word(launch, "fake.lock") else {
        return Ok(None);
    };
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: flock(2) on a file this process opened.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!("{path} is locked by another process"));
    }
    Ok(Some(f))
}

fn word_ms(launch: &WorkerLaunch, key: &str, default: u64) -> u64 {
    word(launch, key).map_or(default, |v| v.parse().unwrap())
}

/// Source side of the fake migration: `session`, `pages N` + N bytes per round, then the
/// hand-over `switch` → `applied` → (lock let go) `released` → `running`.
fn migrate_out(g: Shared, to: std::net::SocketAddr, session: uuid::Uuid) {
    let fail = |g: &Shared, m: String| {
        set_mig(g, |p| {
            p.state = MigrateState::Failed;
            p.message = Some(m);
        })
    };
    let launch = g.lock().unwrap().launch.clone();
    let ms = word_ms(&launch, "fake.migrate_ms", 300);
    let round_bytes = word_ms(&launch, "fake.round_bytes", 4096) as usize;
    // A test's fault-injecting proxy: told the real address in its first line.
    let proxy = word(&launch, "fake.stream_proxy").map(|a| a.parse().unwrap());
    let mut conn =
        match std::net::TcpStream::connect_timeout(&proxy.unwrap_or(to), Duration::from_secs(5)) {
            Ok(c) => c,
            Err(e) => return fail(&g, format!("connecting to {to}: {e}")),
        };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    if proxy.is_some() && writeln!(conn, "to {to}").is_err() {
        return fail(&g, "the proxy closed the connection".into());
    }
    if writeln!(conn, "session {session}").is_err() {
        return fail(&g, "the destination closed the connection".into());
    }
    let start = std::time::Instant::now();
    let mem = launch.spec.memory_bytes;
    let page = vec![b'p'; round_bytes];
    while start.elapsed() < Duration::from_millis(ms) {
        thread::sleep(Duration::from_millis(100));
        if g.lock().unwrap().mig_cancel {
            let _ = writeln!(conn, "cancel");
            return set_mig(&g, |p| {
                p.state = MigrateState::Cancelled;
                p.message = Some("cancelled".into());
            });
        }
        let sent = writeln!(conn, "pages {round_bytes}").and_then(|_| conn.write_all(&page));
        if let Err(e) = sent {
            return fail(&g, format!("stream: {e}"));
        }
        set_mig(&g, |p| {
            p.round += 1;
            p.transferred_bytes += round_bytes as u64;
            p.remaining_bytes = mem / (4 * u64::from(p.round));
            p.dirty_rate = 64 << 20;
            p.link_rate = 1 << 30;
            p.estimated_downtime_ms = 1000 / u64::from(p.round);
        });
    }
    {
        let mut guard = g.lock().unwrap();
        if guard.mig_cancel {
            drop(guard);
            let _ = writeln!(conn, "cancel");
            return set_mig(&g, |p| {
                p.state = MigrateState::Cancelled;
                p.message = Some("cancelled".into());
            });
        }
        guard.mig.state = MigrateState::Switching;
        guard.paused = true;
    }
    let mut lines = BufReader::new(conn.try_clone().unwrap());
    let line = |lines: &mut BufReader<std::net::TcpStream>| {
        let mut l = String::new();
        match lines.read_line(&mut l) {
            Ok(n) if n > 0 => Some(l.trim().to_owned()),
            _ => None,
        }
    };
    // Before `released` the source still holds everything: any failure resumes it here.
    let resume = |g: &Shared, why: &str| {
        g.lock().unwrap().paused = false;
        fail(g, format!("{why}; resumed here"))
    };
    if writeln!(conn, "switch").is_err() || line(&mut lines).as_deref() != Some("applied") {
        return resume(&g, "the destination did not apply the state");
    }
    // Let go of the "disk" (the real worker closes its disks here).
    drop(g.lock().unwrap().disk_lock.take());
    if writeln!(conn, "released").is_err() {
        // It may still have read it: decided below like a lost `running`.
    }
    if line(&mut lines).as_deref() != Some("running") {
        thread::sleep(Duration::from_millis(word_ms(
            &launch,
            "fake.unconfirmed_ms",
            0,
        )));
        if word(&launch, "fake.source_lost").is_some() {
            return source_lost(&g, &launch);
        }
        // The remaining window: take the "disk" back if nobody holds it.
        return match take_lock(&launch) {
            Ok(l) => {
                g.lock().unwrap().disk_lock = l;
                resume(&g, "the destination did not confirm")
            }
            Err(e) => fail(
                &g,
                format!("the destination did not confirm and {e}: left paused"),
            ),
        };
    }
    set_mig(&g, |p| {
        p.state = MigrateState::Completed;
        p.downtime_ms = Some(7);
    });
    let (dir, last) = {
        let guard = g.lock().unwrap();
        (guard.dir.clone(), guard.mig.clone())
    };
    let exit_ms = word_ms(&launch, "fake.exit_ms", 100);
    thread::spawn(move || {
        thread::sleep(Duration::from_millis(exit_ms));
        exit_with(
            &dir,
            WorkerExitReason::MigratedAway {
                to: to.to_string(),
                downtime_ms: 7,
                progress: Some(Box::new(last)),
            },
            0,
        )
    });
}

/// `fake.source_lost`: the source reports its post-copy `lost` (the VM stopped) and exits
/// `MigrationLost` after `fake.exit_ms`.
fn source_lost(g: &Shared, launch: &WorkerLaunch) {
    let message = "the destination's page requests ended after the switch-over (fake)";
    set_mig(g, |p| {
        p.state = MigrateState::Lost;
        p.message = Some(message.into());
    });
    let dir = g.lock().unwrap().dir.clone();
    let exit_ms = word_ms(launch, "fake.exit_ms", 100);
    thread::spawn(move || {
        thread::sleep(Duration::from_millis(exit_ms));
        exit_with(
            &dir,
            WorkerExitReason::MigrationLost {
                message: message.into(),
            },
            1,
        )
    });
}

/// Destination side: one source connection; the VM runs here once the hand-over is done.
fn migrate_in(g: Shared, listener: std::net::TcpListener) {
    let launch = g.lock().unwrap().launch.clone();
    let session = launch.incoming.as_ref().unwrap().session;
    let dir = g.lock().unwrap().dir.clone();
    let Ok((conn, _)) = listener.accept() else {
        return;
    };
    if word(&launch, "fake.dest_dies").is_some() {
        eprintln!("fake worker: destination dying");
        std::process::exit(3);
    }
    let mut w = conn.try_clone().unwrap();
    g.lock().unwrap().mig_conn = conn.try_clone().ok();
    let mut lines = BufReader::new(conn);
    let fail = |g: &Shared, m: &str| -> ! {
        set_mig(g, |p| {
            p.state = MigrateState::Failed;
            p.message = Some(m.into());
        });
        thread::sleep(Duration::from_millis(500));
        exit_with(&dir, WorkerExitReason::TurnedOff, 1)
    };
    let line = |lines: &mut BufReader<std::net::TcpStream>| {
        let mut l = String::new();
        match lines.read_line(&mut l) {
            Ok(n) if n > 0 => Some(l.trim().to_owned()),
            _ => None,
        }
    };
    match line(&mut lines) {
        Some(l) if l == format!("session {session}") => {}
        _ => fail(&g, "a stream of another session"),
    }
    set_mig(&g, |p| p.state = MigrateState::Precopy);
    loop {
        match line(&mut lines) {
            Some(l) if l.starts_with("pages ") => {
                let n: usize = l[6..].parse().unwrap_or(0);
                let mut buf = vec![0; n];
                if std::io::Read::read_exact(&mut lines, &mut buf).is_err() {
                    fail(&g, "the source's stream ended in a page batch");
                }
                set_mig(&g, |p| p.transferred_bytes += n as u64);
            }
            Some(l) if l == "switch" => break,
            Some(l) if l == "cancel" => {
                set_mig(&g, |p| p.state = MigrateState::Cancelled);
                thread::sleep(Duration::from_millis(300));
                exit_with(&dir, WorkerExitReason::TurnedOff, 0)
            }
            _ => fail(&g, "the source's stream ended before the switch-over"),
        }
    }
    if writeln!(w, "applied").is_err() {
        fail(&g, "the source's stream ended at the hand-over");
    }
    // Our own `MigrateCancel` (vireod) is taken until the source released the VM.
    if line(&mut lines).as_deref() != Some("released") {
        fail(&g, "the source's stream ended before it released the VM");
    }
    {
        let mut guard = g.lock().unwrap();
        if guard.mig_cancel {
            drop(guard);
            fail(&g, "cancelled");
        }
        guard.mig.state = MigrateState::Switching;
    }
    thread::sleep(Duration::from_millis(word_ms(&launch, "fake.switch_ms", 0)));
    match take_lock(&launch) {
        Ok(l) => g.lock().unwrap().disk_lock = l,
        Err(e) => {
            let _ = writeln!(w, "failed {e}");
            fail(&g, &e)
        }
    }
    g.lock().unwrap().started_at = Some(now_ms());
    set_mig(&g, |p| {
        p.state = MigrateState::Completed;
        p.downtime_ms = Some(7);
    });
    // The VM runs here whether or not this line arrives; `fake.running_lost` loses it (the
    // stream cut in the instant the VM resumed).
    if word(&launch, "fake.running_lost").is_some() {
        let _ = w.shutdown(std::net::Shutdown::Both);
    } else {
        let _ = writeln!(w, "running");
    }
    output(
        &g,
        format!("fake guest {} arrived\n", launch.spec.name).as_bytes(),
    );
    if let Some(ms) = word(&launch, "fake.postcopy_lost_ms") {
        thread::sleep(Duration::from_millis(ms.parse().unwrap()));
        let message = "the source's stream ended with 12 pages still there (fake)".to_string();
        exit_with(&dir, WorkerExitReason::MigrationLost { message }, 1);
    }
}

fn metrics(g: &Shared, dir: &Path) -> WorkerReply {
    if let Ok(text) = std::fs::read(dir.join("fake-metrics.json")) {
        return match serde_json::from_slice::<WorkerMetrics>(&text) {
            Ok(m) => WorkerReply::Metrics(m),
            Err(e) => WorkerReply::Error {
                message: format!("fake-metrics.json: {e}"),
            },
        };
    }
    let guard = g.lock().unwrap();
    let uptime_ms = guard.started_at.map_or(0, |t| (now_ms() - t).max(0) as u64);
    WorkerReply::Metrics(WorkerMetrics {
        uptime_ns: uptime_ms * 1_000_000,
        vcpu_cpu_ns: 0,
        worker_cpu_ns: 0,
        memory_bytes: guard.launch.spec.memory_bytes,
        memory_resident_bytes: 0,
        worker_private_bytes: 0,
        disks: guard
            .applied_to
            .iter()
            .map(|(serial, path)| DiskMetrics {
                path: path.clone(),
                serial: Some(serial.clone()),
                read_bytes: 0,
                write_bytes: 0,
                read_ops: 0,
                write_ops: 0,
                flush_ops: 0,
                normalized_ios: 0,
                throttled_ns: 0,
                min_iops_alerts: 0,
                min_iops_alert_active: false,
            })
            .collect(),
    })
}

/// `ApplyCheckpoint`: the state must be there, then each child is made on its parent (all or
/// nothing, like the real worker). Dies where the real worker's crash points
/// (`VIREO_CHECKPOINT_FAULT=worker-child|worker-apply-switched`) are.
fn fake_apply(g: &Shared, state: &Path, children: &[ApplyChild]) -> WorkerReply {
    let fault = std::env::var("VIREO_CHECKPOINT_FAULT").unwrap_or_default();
    if !state.join("vm.state").is_file() {
        return WorkerReply::Error {
            message: format!("{}: no vm.state", state.display()),
        };
    }
    for (i, c) in children.iter().enumerate() {
        if let Some(p) = c.path.parent() {
            let _ = std::fs::create_dir_all(p);
        }
        let opts = vireo_vhdx::CreateOptions {
            disk_type: vireo_vhdx::DiskType::Differencing,
            parent: Some(c.parent.clone()),
            ..Default::default()
        };
        if let Err(e) = vireo_vhdx::Vhdx::create(&c.path, &opts) {
            for c in &children[..=i] {
                let _ = std::fs::remove_file(&c.path);
            }
            return WorkerReply::Error {
                message: e.to_string(),
            };
        }
        if i == 0 && fault == "worker-child" {
            std::process::abort();
        }
    }
    g.lock().unwrap().applied_to = children
        .iter()
        .map(|c| (c.serial.clone(), c.path.clone()))
        .collect();
    if fault == "worker-apply-switched" {
        std::process::abort();
    }
    WorkerReply::Applied(ApplyReport {
        pause_us: 2000,
        pages_copied: 3,
        pages_compared: 0,
    })
}

fn handle_console(g: Shared, stream: UnixStream) {
    let old = g
        .lock()
        .unwrap()
        .console
        .replace(stream.try_clone().unwrap());
    if let Some(old) = old {
        let _ = old.shutdown(std::net::Shutdown::Both);
    }
    let shutdown_line = g.lock().unwrap().launch.spec.shutdown_line.clone();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if shutdown_line.as_deref() == Some(line.trim()) {
            power_off(&g);
        }
        output(&g, format!("echo: {line}\n").as_bytes());
    }
}

fn bind(path: &Path) -> UnixListener {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).unwrap()
}

/// What the fake writes as a saved state.
const FAKE_STATE: &[u8] = b"fake-state";
/// The rest of a save, as a real live save writes it: the working set and the memory
/// checksum table. A restore refuses a save that lost either, so every path that carries a
/// save (checkpoints, export, import, migration) is checked to carry them too.
const FAKE_EXTRAS: [(&str, &[u8]); 2] = [
    ("working-set.bin", b"fake-working-set"),
    ("memory.crc", b"fake-sums"),
];

/// A save into `to`, in a real save's order: extras, memory, the state file last.
fn write_fake_save(to: &Path) -> std::io::Result<()> {
    for (name, bytes) in FAKE_EXTRAS {
        std::fs::write(to.join(name), bytes)?;
    }
    std::fs::write(to.join("memory.bin"), b"fake-memory")?;
    std::fs::write(to.join("vm.state"), FAKE_STATE)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = match args.as_slice() {
        [_, flag, dir] if flag == "--vm-dir" => PathBuf::from(dir),
        _ => {
            eprintln!("usage: vireo-fake-worker --vm-dir DIR");
            std::process::exit(2);
        }
    };
    let launch: WorkerLaunch =
        serde_json::from_slice(&std::fs::read(dir.join("spec.json")).unwrap()).unwrap();
    eprintln!("fake worker {} for {}", std::process::id(), launch.vm_id);
    // A test that ended without turning its VMs off (a failed one, or a vireod killed on
    // purpose) removed the folder: nothing is left to serve, so this process goes too rather
    // than idle for ever.
    let watched = dir.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        if !watched.exists() {
            std::process::exit(0);
        }
    });
    // It opens no disks: the locked files vireod hands a restore are let go at once, as a
    // real worker's would be when its VM ends (tests then read the disks of a running VM).
    for d in &launch.inherited_disks {
        // SAFETY: vireod passed this descriptor to this process for this disk alone; nothing
        // here uses or owns it.
        unsafe { libc::close(d.fd) };
    }
    if let Some(msg) = word(&launch, "fake.fail_start") {
        let message = msg.replace('_', " ");
        exit_with(&dir, WorkerExitReason::StartFailed { message }, 1);
    }
    if let Some(from) = &launch.restore_from {
        let state = from.join("vm.state");
        if std::fs::read(&state).ok().as_deref() != Some(FAKE_STATE) {
            let message = format!("restoring the saved VM: {} is damaged", state.display());
            exit_with(&dir, WorkerExitReason::StartFailed { message }, 1);
        }
        for (name, bytes) in FAKE_EXTRAS {
            let p = from.join(name);
            if std::fs::read(&p).ok().as_deref() != Some(bytes) {
                let message = format!("restoring the saved VM: {} is missing", p.display());
                exit_with(&dir, WorkerExitReason::StartFailed { message }, 1);
            }
        }
    }
    if word(&launch, "fake.crash_start").is_some() {
        eprintln!("fake worker: crashing at start");
        std::process::exit(3);
    }
    let boot_ms: u64 = word(&launch, "fake.boot_ms").map_or(100, |v| v.parse().unwrap());
    let never_runs = word(&launch, "fake.never_runs").is_some();
    let vcpu_fail_ms: Option<u64> = word(&launch, "fake.vcpu_fail_ms").map(|v| v.parse().unwrap());
    let restored_lost_ms = word(&launch, "fake.restored_lost_ms").map(|v| v.parse().unwrap());
    let name = launch.spec.name.clone();
    let restored = launch.restore_from.is_some();
    let g: Shared = Arc::new(Mutex::new(Guest {
        dir: dir.clone(),
        launch,
        ring: Vec::new(),
        total: 0,
        started_at: None,
        paused: false,
        console: None,
        mig: MigrateProgress::default(),
        mig_cancel: false,
        mig_conn: None,
        disk_lock: None,
        applied_to: Vec::new(),
    }));
    if let Some(ms) = word(&g.lock().unwrap().launch, "fake.bind_ms") {
        thread::sleep(Duration::from_millis(ms.parse().unwrap()));
    }
    if let (true, Some(ms)) = (
        restored,
        word(&g.lock().unwrap().launch, "fake.restore_bind_ms"),
    ) {
        thread::sleep(Duration::from_millis(ms.parse().unwrap()));
    }
    let console = bind(&dir.join("console.sock"));
    let control = bind(&dir.join("worker.sock"));
    let gc = g.clone();
    thread::spawn(move || {
        for s in console.incoming().flatten() {
            let g = gc.clone();
            thread::spawn(move || handle_console(g, s));
        }
    });
    let incoming = g.lock().unwrap().launch.incoming.clone();
    if let Some(inc) = incoming {
        let listener = std::net::TcpListener::bind(inc.listen).unwrap();
        let addr = listener.local_addr().unwrap();
        set_mig(&g, |p| {
            p.state = MigrateState::Listening;
            p.listen_addr = Some(addr);
        });
        let gm = g.clone();
        thread::spawn(move || migrate_in(gm, listener));
    } else if !never_runs {
        let gb = g.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(boot_ms));
            let lock = take_lock(&gb.lock().unwrap().launch);
            match lock {
                Ok(l) => gb.lock().unwrap().disk_lock = l,
                Err(message) => {
                    let dir = gb.lock().unwrap().dir.clone();
                    exit_with(&dir, WorkerExitReason::StartFailed { message }, 1)
                }
            }
            gb.lock().unwrap().started_at = Some(now_ms());
            let how = if restored { "restored" } else { "running" };
            output(&gb, format!("fake guest {name} {how}\n").as_bytes());
            if let (true, Some(ms)) = (restored, restored_lost_ms) {
                thread::sleep(Duration::from_millis(ms));
                let dir = gb.lock().unwrap().dir.clone();
                let message = "a later post-copy migration lost it (fake)".to_string();
                exit_with(&dir, WorkerExitReason::MigrationLost { message }, 1);
            }
            if let Some(ms) = vcpu_fail_ms {
                thread::sleep(Duration::from_millis(ms));
                let dir = gb.lock().unwrap().dir.clone();
                let message = "triple fault (fake)".to_string();
                exit_with(&dir, WorkerExitReason::VcpuFailed { message }, 1);
            }
        });
    }
    for s in control.incoming().flatten() {
        let g = g.clone();
        thread::spawn(move || handle_control(g, s));
    }
}

/// `Checkpoint`: state files, then the children on top of the spec's disks (all or nothing).
fn fake_checkpoint(launch: &WorkerLaunch, to: &Path, children: &[CheckpointChild]) -> WorkerReply {
    let made = (|| -> Result<(), String> {
        std::fs::create_dir_all(to).map_err(|e| e.to_string())?;
        write_fake_save(to).map_err(|e| e.to_string())?;
        for c in children {
            let Some(d) = launch
                .spec
                .disks
                .iter()
                .find(|d| d.serial.as_deref() == Some(c.serial.as_str()))
            else {
                return Err(format!("no disk with serial {}", c.serial));
            };
            if let Some(p) = c.path.parent() {
                std::fs::create_dir_all(p).map_err(|e| e.to_string())?;
            }
            let opts = vireo_vhdx::CreateOptions {
                disk_type: vireo_vhdx::DiskType::Differencing,
                parent: Some(d.path.clone()),
                ..Default::default()
            };
            vireo_vhdx::Vhdx::create(&c.path, &opts).map_err(|e| e.to_string())?;
        }
        Ok(())
    })();
    match made {
        Ok(()) => WorkerReply::Checkpointed(CheckpointReport {
            pause_us: 1000,
            total_ms: 1,
            rounds: 0,
            memory_written_bytes: 11,
        }),
        Err(message) => {
            for c in children {
                let _ = std::fs::remove_file(&c.path);
            }
            let _ = std::fs::remove_file(to.join("vm.state"));
            WorkerReply::Error { message }
        }
    }
}
