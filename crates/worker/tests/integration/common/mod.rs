//! Drives a `vireo-vm` process the way vireod does: a VM folder with `spec.json`, requests on
//! `worker.sock`, the console on `console.sock`, the outcome in `exit.json`.

pub mod migration;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use vireo_api::worker::{WorkerExit, WorkerLaunch, WorkerOp, WorkerReply, WorkerRequest};
use vireo_api::{AutoStart, VmSpec, SPEC_VERSION};
use vireo_probe_image::{probe_elf, ProbeConsole};

/// Every wait in these tests is bounded by this.
pub const T: Duration = Duration::from_secs(60);

/// /dev/kvm usable (a recorded skip without it; fails under CI).
pub fn kvm() -> bool {
    vireo_testkit::require(vireo_testkit::Need::Kvm)
}

/// The probe guest with 64 MiB and one vCPU, powered off by `POWEROFF`.
pub fn probe_spec() -> VmSpec {
    VmSpec {
        version: SPEC_VERSION,
        name: "probe".into(),
        vcpus: 1,
        memory_bytes: 64 << 20,
        kernel: probe_elf().to_path_buf(),
        cmdline: "console=ttyS0".into(),
        initrd: None,
        disks: vec![],
        nics: vec![],
        console_ring_bytes: 64 * 1024,
        auto_start: AutoStart::default(),
        auto_checkpoint: Default::default(),
        shutdown_line: Some("POWEROFF".into()),
    }
}

/// A running `vireo-vm`; killed if dropped while running.
pub struct Worker {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub vm_id: uuid::Uuid,
}

impl Worker {
    /// Writes `spec` into a fresh VM folder and starts the worker on it (stderr to
    /// `worker.log`, as vireod does).
    pub fn start(spec: VmSpec) -> Worker {
        Worker::launch(uuid::Uuid::new_v4(), spec, vec![], None)
    }

    /// `start` with the NICs' vhost-user sockets (`WorkerLaunch.nic_sockets`).
    pub fn start_with_nics(spec: VmSpec, nic_sockets: Vec<PathBuf>) -> Worker {
        Worker::launch(uuid::Uuid::new_v4(), spec, nic_sockets, None)
    }

    /// As `start`, for VM `vm_id`, with NIC sockets, restoring from a save directory when given.
    pub fn launch(
        vm_id: uuid::Uuid,
        spec: VmSpec,
        nic_sockets: Vec<PathBuf>,
        restore_from: Option<PathBuf>,
    ) -> Worker {
        Worker::launch_with(WorkerLaunch {
            vm_id,
            spec,
            nic_sockets,
            restore_from,
            inherited_disks: Vec::new(),
            incoming: None,
        })
    }

    /// Starts a worker on `launch` as given (e.g. an incoming migration).
    pub fn launch_with(launch: WorkerLaunch) -> Worker {
        let vm_id = launch.vm_id;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("spec.json"),
            serde_json::to_vec(&launch).unwrap(),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vireo-vm"))
            .arg("--vm-dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Worker { child, dir, vm_id }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("worker.log")).unwrap_or_default()
    }

    /// Connects to `name` once the worker has created it.
    pub fn connect(&self, name: &str) -> UnixStream {
        let path = self.path(name);
        let deadline = Instant::now() + T;
        loop {
            if let Ok(s) = UnixStream::connect(&path) {
                s.set_read_timeout(Some(T)).unwrap();
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} never accepted; log:\n{}",
                path.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A connection to `worker.sock`.
    pub fn control(&self) -> Conn {
        let s = self.connect("worker.sock");
        Conn {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    /// One request on a fresh connection.
    pub fn ask(&self, op: WorkerOp) -> WorkerReply {
        self.control().ask(op)
    }

    /// Polls `ConsoleLog` until the output contains `needle`.
    pub fn wait_console(&self, needle: &str) -> String {
        let mut conn = self.control();
        let deadline = Instant::now() + T;
        loop {
            let WorkerReply::ConsoleLog { data_base64, .. } =
                conn.ask(WorkerOp::ConsoleLog { max_bytes: 1 << 20 })
            else {
                panic!("ConsoleLog answered otherwise")
            };
            let text = String::from_utf8_lossy(&decode(&data_base64)).into_owned();
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} never appeared on the console; got {text:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The probe on `console.sock` (attach after `PROBE READY`, see `wait_console`).
    pub fn probe_console(&self) -> ProbeConsole {
        let s = self.connect("console.sock");
        ProbeConsole::new(s.try_clone().unwrap(), s)
    }

    /// Waits for the worker to exit: its status and `exit.json`, if any.
    pub fn wait_exit(&mut self) -> (Option<i32>, Option<WorkerExit>) {
        let deadline = Instant::now() + T;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "the worker did not exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        let exit = std::fs::read(self.path("exit.json"))
            .ok()
            .map(|b| serde_json::from_slice(&b).expect("exit.json is a WorkerExit"));
        (status.code(), exit)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) of our own child process.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn decode(b64: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

/// One connection to `worker.sock`.
pub struct Conn {
    reader: BufReader<UnixStream>,
    pub writer: UnixStream,
}

impl Conn {
    pub fn ask(&mut self, op: WorkerOp) -> WorkerReply {
        let line = serde_json::to_string(&WorkerRequest::new(op)).unwrap();
        self.raw(&line)
    }

    /// Sends `line` as it is and reads the reply.
    pub fn raw(&mut self, line: &str) -> WorkerReply {
        writeln!(self.writer, "{line}").unwrap();
        let mut answer = String::new();
        self.reader.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("reply {answer:?}: {e}"))
    }
}

/// A zero-filled raw image of `size` bytes at `dir/name`.
pub fn raw_disk(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}
