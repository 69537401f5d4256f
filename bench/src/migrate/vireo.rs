//! Vireo's side of the `migrate` benchmark: two `vireo-vm` worker processes (the binary beside
//! this one), driven as vireod drives them (`spec.json`, `worker.sock`), with host identities
//! made in temporary folders and trusting each other; the destination listens on 127.0.0.1.
//! The counter watchers read the guest's status page straight from each worker's RAM memfd
//! (`/proc/<pid>/fd`), so they disturb neither VMM.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use vireo_api::worker::{
    CompressMode, IncomingMigration, MigrateOptions, MigrateProgress, MigrateState, MigrationTls,
    WorkerExit, WorkerExitReason, WorkerLaunch, WorkerOp, WorkerReply, WorkerRequest,
};
use vireo_api::{AutoStart, VmSpec, SPEC_VERSION};
use vireo_migration::hostauth::{HostIdentity, TrustStore};
use vireo_probe_image::ProbeConsole;

use super::watch::{gap_ms, wall_clock, Watch, DIRTY_PAGES};
use super::{Case, Sample, MEMORY_MIB, T};

/// A worker's folder: its sockets and log.
#[derive(Clone)]
struct Control {
    dir: PathBuf,
}

/// See [`Control::status_link`].
struct StatusLink {
    w: UnixStream,
    r: BufReader<UnixStream>,
    line: String,
}

impl StatusLink {
    /// One `MigrateStatus`; an error once the worker is gone (its end closes the connection).
    fn status(&mut self) -> Result<MigrateProgress, String> {
        writeln!(self.w, "{}", self.line).map_err(|e| format!("worker.sock: {e}"))?;
        let mut answer = String::new();
        match self.r.read_line(&mut answer) {
            Ok(0) => return Err("worker.sock closed".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("worker.sock: {e}")),
        }
        match serde_json::from_str(&answer) {
            Ok(WorkerReply::Migrate(p)) => Ok(p),
            Ok(other) => Err(format!("MigrateStatus answered {other:?}")),
            Err(e) => Err(format!("worker answered {answer:?}: {e}")),
        }
    }
}

struct Worker {
    child: Child,
    ctl: Control,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn worker_bin() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = me.with_file_name("vireo-vm");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: build it first (cargo build --release -p vireo-worker)",
            bin.display()
        ))
    }
}

fn spawn(dir: &Path, launch: &WorkerLaunch) -> Result<Worker, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let spec = serde_json::to_vec(launch).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("spec.json"), spec).map_err(|e| e.to_string())?;
    let log = File::create(dir.join("worker.log")).map_err(|e| e.to_string())?;
    let child = Command::new(worker_bin()?)
        .arg("--vm-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("vireo-vm: {e}"))?;
    Ok(Worker {
        child,
        ctl: Control {
            dir: dir.to_path_buf(),
        },
    })
}

impl Control {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("worker.log")).unwrap_or_default()
    }

    /// Connects to `name`, retrying for `limit` while the worker has not created it yet.
    fn connect(&self, name: &str, limit: Duration) -> Result<UnixStream, String> {
        let path = self.dir.join(name);
        let deadline = Instant::now() + limit;
        loop {
            match UnixStream::connect(&path) {
                Ok(s) => {
                    s.set_read_timeout(Some(T)).map_err(|e| e.to_string())?;
                    return Ok(s);
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("{}: {e}; log:\n{}", path.display(), self.log()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    fn ask(&self, op: WorkerOp) -> Result<WorkerReply, String> {
        self.ask_within(op, T)
    }

    fn ask_within(&self, op: WorkerOp, limit: Duration) -> Result<WorkerReply, String> {
        let s = self.connect("worker.sock", limit)?;
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        let line = serde_json::to_string(&WorkerRequest::new(op)).map_err(|e| e.to_string())?;
        writeln!(w, "{line}").map_err(|e| format!("worker.sock: {e}"))?;
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .map_err(|e| format!("worker.sock: {e}"))?;
        serde_json::from_str(&answer).map_err(|e| format!("worker answered {answer:?}: {e}"))
    }

    /// One `MigrateStatus`; an error at once when the worker's socket is not there (polling
    /// loops must notice its exit, not wait for it: a worker removes its sockets as it ends,
    /// and retrying the connection for 200 ms here once added those to the source's end).
    fn status(&self) -> Result<MigrateProgress, String> {
        match self.ask_within(WorkerOp::MigrateStatus, Duration::ZERO)? {
            WorkerReply::Migrate(p) => Ok(p),
            other => Err(format!("MigrateStatus answered {other:?}")),
        }
    }

    /// A connection kept open for `MigrateStatus` polls during the migration, as QEMU's side
    /// polls over its one QMP connection. A connection per poll made the source worker
    /// start a thread for each (every millisecond, mid-pause: traced, those threads' starts
    /// and ends took the CPUs the guest's pause needed).
    fn status_link(&self) -> Result<StatusLink, String> {
        let s = self.connect("worker.sock", Duration::ZERO)?;
        let w = s.try_clone().map_err(|e| e.to_string())?;
        let line = serde_json::to_string(&WorkerRequest::new(WorkerOp::MigrateStatus))
            .map_err(|e| e.to_string())?;
        Ok(StatusLink {
            w,
            r: BufReader::new(s),
            line,
        })
    }

    fn wait_status(
        &self,
        what: &str,
        done: impl Fn(&MigrateProgress) -> bool,
    ) -> Result<MigrateProgress, String> {
        let deadline = Instant::now() + T;
        loop {
            let p = match self.status() {
                Ok(p) => p,
                // Its socket may not exist yet.
                Err(e) if Instant::now() > deadline => return Err(format!("{what}: {e}")),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            if done(&p) {
                return Ok(p);
            }
            if matches!(p.state, MigrateState::Failed | MigrateState::Cancelled) {
                return Err(format!("{what}: {p:?}; log:\n{}", self.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("{what}: still {p:?} after {T:?}"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The probe's console, once it said `PROBE READY`.
    fn probe(&self) -> Result<ProbeConsole, String> {
        let deadline = Instant::now() + T;
        loop {
            if let WorkerReply::ConsoleLog { data_base64, .. } =
                self.ask(WorkerOp::ConsoleLog { max_bytes: 1 << 16 })?
            {
                let text = base64::engine::general_purpose::STANDARD
                    .decode(&data_base64)
                    .unwrap_or_default();
                if String::from_utf8_lossy(&text).contains("PROBE READY") {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(format!("the probe never came up; log:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let s = self.connect("console.sock", T)?;
        Ok(ProbeConsole::new(
            s.try_clone().map_err(|e| e.to_string())?,
            s,
        ))
    }
}

impl Worker {
    /// The guest's RAM, reopened through `/proc/<pid>/fd` (the worker's memfd).
    fn ram(&self) -> Result<File, String> {
        let fds = format!("/proc/{}/fd", self.child.id());
        let deadline = Instant::now() + T;
        loop {
            for e in std::fs::read_dir(&fds).map_err(|e| format!("{fds}: {e}"))? {
                let path = e.map_err(|e| e.to_string())?.path();
                let is_ram = std::fs::read_link(&path)
                    .is_ok_and(|l| l.to_string_lossy().contains("vireo-guest-ram (deleted)"));
                if is_ram {
                    return File::open(&path).map_err(|e| format!("{}: {e}", path.display()));
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no guest RAM memfd in {fds}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn read_counter(ram: &File) -> Result<u64, String> {
    let mut b = [0u8; 8];
    ram.read_exact_at(&mut b, DIRTY_PAGES)
        .map_err(|e| format!("reading guest RAM: {e}"))?;
    Ok(u64::from_le_bytes(b))
}

struct Host {
    dir: tempfile::TempDir,
    id: HostIdentity,
}

impl Host {
    fn new(name: &str) -> Result<Host, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let id = HostIdentity::load_or_create(dir.path(), name).map_err(|e| e.to_string())?;
        Ok(Host { dir, id })
    }
    fn trust(&self, other: &Host) -> Result<(), String> {
        let mut t = TrustStore::new();
        t.trust(other.id.fingerprint(), "peer");
        t.save(&self.dir.path().join("trusted"))
            .map_err(|e| e.to_string())
    }
    fn tls(&self) -> MigrationTls {
        MigrationTls {
            cert: self.dir.path().join("host.crt"),
            key: self.dir.path().join("host.key"),
            trusted: self.dir.path().join("trusted"),
        }
    }
}

fn spec() -> VmSpec {
    VmSpec {
        version: SPEC_VERSION,
        name: "migrate-bench".into(),
        vcpus: 1,
        memory_bytes: MEMORY_MIB << 20,
        kernel: vireo_probe_image::probe_elf().to_path_buf(),
        cmdline: "console=ttyS0".into(),
        initrd: None,
        disks: vec![],
        nics: vec![],
        console_ring_bytes: 64 * 1024,
        auto_start: AutoStart::default(),
        shutdown_line: Some("POWEROFF".into()),
        auto_checkpoint: Default::default(),
    }
}

pub fn run(dir: &Path, case: &Case, seed: u64) -> Result<Sample, String> {
    let (a, b) = (Host::new("source")?, Host::new("destination")?);
    a.trust(&b)?;
    b.trust(&a)?;
    let vm_id = uuid::Uuid::new_v4();
    let session = uuid::Uuid::new_v4();
    let options = MigrateOptions {
        max_downtime_ms: case.max_downtime_ms,
        bandwidth: None,
        compress: CompressMode::Auto,
        streams: case.streams,
        postcopy: case.postcopy,
        storage: None,
    };
    let mut src = spawn(
        &dir.join("vireo-src"),
        &WorkerLaunch {
            vm_id,
            spec: spec(),
            nic_sockets: vec![],
            restore_from: None,
            inherited_disks: Vec::new(),
            incoming: None,
        },
    )?;
    let mut console = src.ctl.probe()?;
    super::prepare(&mut console, case, seed)?;
    // QEMU's destination is started (and listening) before its clock starts too; Vireo's
    // start-up is timed apart and reported beside the like-for-like total.
    let dst_spawned = Instant::now();
    let dst = spawn(
        &dir.join("vireo-dst"),
        &WorkerLaunch {
            vm_id,
            spec: spec(),
            nic_sockets: vec![],
            restore_from: None,
            inherited_disks: Vec::new(),
            incoming: Some(IncomingMigration {
                session,
                streams: options.streams,
                listen: "127.0.0.1:0".parse().expect("address"),
                tls: b.tls(),
                postcopy: options.postcopy,
                disk_slots: Vec::new(),
            }),
        },
    )?;
    let listening = dst
        .ctl
        .wait_status("destination listening", |p| p.listen_addr.is_some())?;
    let to = listening.listen_addr.expect("checked");
    let dst_start = dst_spawned.elapsed();
    let src_ram = src.ram()?;
    let dst_ram = dst.ram()?;
    let watch = Watch::start(
        Box::new(move || read_counter(&src_ram).map(Some)),
        // Read straight from the destination's RAM, whatever its state (see `watch.rs`).
        Box::new(move || read_counter(&dst_ram).map(Some)),
        T,
    );
    let t = Instant::now();
    match src.ctl.ask(WorkerOp::MigrateOut {
        to,
        session,
        options,
        tls: a.tls(),
    })? {
        WorkerReply::Ok => {}
        other => return Err(format!("MigrateOut answered {other:?}")),
    }
    eprintln!("  {} bench: MigrateOut sent", wall_clock(t));
    let mut link = src.ctl.status_link()?;
    let deadline = Instant::now() + T;
    let mut last = MigrateProgress::default();
    // When the source first said `completed` (the destination runs the VM): the moment
    // QEMU's `query-migrate` says `completed` is the one compared.
    let mut completed = None;
    let exit = loop {
        if let Ok(Some(_)) = src.child.try_wait() {
            break std::fs::read(src.ctl.dir.join("exit.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<WorkerExit>(&b).ok());
        }
        if let Ok(p) = link.status() {
            if p.state == MigrateState::Failed {
                return Err(format!(
                    "vireo migration failed: {p:?}; log:\n{}",
                    src.ctl.log()
                ));
            }
            if p.state == MigrateState::Completed && completed.is_none() {
                completed = Some(t.elapsed());
            }
            last = p;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "vireo migration did not complete in {T:?}: {last:?}; source log:\n{}",
                src.ctl.log()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let exited = t.elapsed();
    eprintln!(
        "  {} bench: the source worker exited",
        wall_clock(Instant::now())
    );
    let (own, phases) = match exit.map(|e| e.reason) {
        Some(WorkerExitReason::MigratedAway {
            downtime_ms,
            progress,
            ..
        }) => (
            downtime_ms as f64,
            progress.map(|p| p.phases).unwrap_or_default(),
        ),
        other => {
            return Err(format!(
                "the source ended with {other:?}; log:\n{}",
                src.ctl.log()
            ))
        }
    };
    // A status poll can miss the short `completed` before the process ends: then the
    // source's own mark of `RUNNING` (from its receipt of MigrateOut) stands in.
    let total = completed
        .or_else(|| {
            phases
                .iter()
                .find(|p| p.name == "RUNNING there")
                .map(|p| Duration::from_micros(p.at_us))
        })
        .unwrap_or(exited);
    // The source's counter is final now: wait until the destination's guest went past it.
    watch.dest_above(watch.source_settled(T), Duration::from_secs(10));
    // Where the pause went, as each side logged it.
    for (side, log) in [("source", src.ctl.log()), ("destination", dst.ctl.log())] {
        for line in log.lines().filter(|l| {
            l.contains("switch-over")
                || l.contains("pre-copy round")
                || l.contains("migration timeline")
        }) {
            let at = line
                .find("switch-over")
                .or_else(|| line.find("pre-copy round"))
                .or_else(|| line.find("migration timeline"))
                .unwrap_or(0);
            // The log's own timestamp (wall clock, both processes on one host) lines the
            // two sides up: the source pauses before the destination's steps begin.
            let stamp = line.get(11..26).filter(|t| t.contains(':')).unwrap_or("");
            eprintln!("  {stamp} {side}: {}", &line[at..]);
        }
    }
    let (s, d) = watch.finish()?;
    if let Some((stopped, resumed)) = super::watch::gap_ends(&s, &d) {
        eprintln!("  {stopped} guest: last move on the source");
        eprintln!("  {resumed} guest: first move on the destination");
    }
    let _ = dst.ctl.ask(WorkerOp::TurnOff);
    Ok(Sample {
        downtime_ms: own,
        guest_gap_ms: gap_ms(&s, &d).map_err(|e| format!("vireo: {e}"))?,
        total_ms: total.as_secs_f64() * 1e3,
        total_to_exit_ms: exited.as_secs_f64() * 1e3,
        destination_start_ms: dst_start.as_secs_f64() * 1e3,
        rounds: last.round as f64,
        transferred_mib: last.transferred_bytes as f64 / (1 << 20) as f64,
    })
}
