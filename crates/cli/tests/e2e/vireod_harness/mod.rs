//! A vireod on a temporary state directory for the CLI end-to-end tests that drive VMs through
//! it (`vm_cli_vireod.rs`, `vm_cli_save.rs`, `vm_cli_export.rs`, `migrate_cli.rs`, ...). On
//! drop every VM is turned off (workers outlive vireod by design) and vireod is stopped.

pub mod console;
pub mod faults;
pub mod live_move;
pub mod migration;
pub mod slow_link;
pub mod tmpfs;
pub mod tree;
pub mod two_checkpoints;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vireo_api::Vm;

pub const VIREO: &str = env!("CARGO_BIN_EXE_vireo");

pub fn binaries() -> Option<(PathBuf, PathBuf)> {
    let dir = Path::new(VIREO).parent().unwrap();
    let (vireod, worker) = (dir.join("vireod"), dir.join("vireo-vm"));
    if vireod.is_file() && worker.is_file() {
        return Some((vireod, worker));
    }
    vireo_testkit::skip("vireod and vireo-vm built beside vireo");
    None
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Child,
    /// More vireod arguments, on every (re)start.
    pub args: Vec<String>,
    /// Environment for vireod (e.g. a fault point), on every (re)start.
    pub env: Vec<(String, String)>,
}

impl Daemon {
    pub fn spawn_args(dir: &Path, args: &[String], env: &[(String, String)]) -> Child {
        let (vireod, worker) = binaries().unwrap();
        let socket = dir.join("state").join("vireod.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(vireod)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--worker-bin")
            .arg(worker)
            .arg("--storage-root")
            .arg(dir)
            .arg("--storage-root")
            .arg(vireo_probe_image::probe_elf().parent().unwrap())
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("vireod.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "vireod did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    pub fn start() -> Option<Daemon> {
        Self::start_args(&[])
    }

    pub fn start_args(args: &[&str]) -> Option<Daemon> {
        Self::start_args_env(args, &[])
    }

    pub fn start_args_env(args: &[&str], env: &[(&str, &str)]) -> Option<Daemon> {
        binaries()?;
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = Daemon::spawn_args(dir.path(), &args, &env);
        Some(Daemon {
            dir,
            child,
            args,
            env,
        })
    }

    pub fn kill9_and_restart(&mut self) {
        self.kill9();
        self.restart();
    }

    /// SIGKILL; vireod stays down until [`Self::restart`].
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts vireod again on the same state (after [`Self::kill9`]).
    pub fn restart(&mut self) {
        self.child = Daemon::spawn_args(self.dir.path(), &self.args, &self.env);
    }

    /// Restarts vireod (stopped) with `env` added, e.g. a fault point
    /// (`VIREO_CHECKPOINT_FAULT`) at which vireod dies as if killed, for this run only.
    pub fn restart_env(&mut self, env: &[(&str, &str)]) {
        let mut all = self.env.clone();
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self.child = Daemon::spawn_args(self.dir.path(), &self.args, &all);
    }

    pub fn vireo(&self, args: &[&str]) -> Command {
        let socket = self.dir.path().join("state").join("vireod.sock");
        let mut cmd = Command::new(VIREO);
        cmd.arg("--host")
            .arg(format!("unix:{}", socket.display()))
            .args(args)
            .env_remove("VIREO_HOST")
            .current_dir(self.dir.path());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let child = self
            .vireo(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Read both pipes while waiting (a chatty command must not block on a full pipe), and
        // give long operations (a migration on a starved 2-core CI machine) room: a real hang
        // still fails, later.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(child.wait_with_output());
        });
        match finished.recv_timeout(Duration::from_secs(180)) {
            Ok(out) => out.unwrap(),
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                panic!("vireo {args:?} hangs (killed after 180 s)");
            }
        }
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vireo {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn fails(&self, args: &[&str]) -> (i32, String) {
        let out = self.run(args);
        assert!(!out.status.success(), "vireo {args:?} succeeded");
        let err = String::from_utf8(out.stderr).unwrap();
        let last = err.lines().last().unwrap_or_default().to_string();
        assert!(last.starts_with("vireo: error: "), "{err}");
        (out.status.code().unwrap(), last)
    }

    pub fn vms(&self) -> Vec<Vm> {
        serde_json::from_str(&self.ok(&["vm", "list", "--output", "json"])).unwrap()
    }

    /// A file the daemon may use: under the state dir (its default storage root).
    pub fn state_file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join("state").join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    pub fn vm(&self, name: &str) -> Vm {
        serde_json::from_str(&self.ok(&["vm", "show", name, "--output", "json"])).unwrap()
    }

    /// The pid of the VM's worker, from vireod's record of it (`<vm-dir>/worker.json`).
    pub fn worker_pid(&self, name: &str) -> u64 {
        let id = self.vm(name).identity.id.to_string();
        let record = self
            .dir
            .path()
            .join("state/vms")
            .join(id)
            .join("worker.json");
        let text = std::fs::read(&record).unwrap_or_else(|e| {
            panic!(
                "{name} has no worker record at {} ({e}): is the VM running?",
                record.display()
            )
        });
        let rec: serde_json::Value = serde_json::from_slice(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", record.display()));
        rec["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("{} has no pid: {rec}", record.display()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed test shows what vireod said last (its folder goes with the test).
            let log =
                std::fs::read_to_string(self.dir.path().join("vireod.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "--- the last lines of {}/vireod.log ---\n{}",
                self.dir.path().display(),
                tail.join("\n")
            );
        }
        let vms: Vec<Vm> = self
            .vireo(&["vm", "list", "--output", "json"])
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default();
        for vm in vms {
            let _ = self.vireo(&["vm", "turn-off", &vm.spec.name]).output();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
