//! The vireod under test: started on a fresh state directory, and on drop stopped together
//! with every worker it left, so an aborted benchmark never leaves VMs running.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub struct Daemon {
    child: Child,
    pub state_dir: TempDir,
    pub socket: PathBuf,
}

/// vireod and vireo-vm are siblings of this executable (the same cargo target directory)
/// unless given.
pub fn locate(explicit: Option<PathBuf>, name: &str) -> Result<PathBuf, String> {
    let path = match explicit {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(|e| format!("locating this executable: {e}"))?
            .with_file_name(name),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: run `cargo build --release -p vireo-hostd -p vireo-worker` (same \
             target dir) first, or pass its path",
            path.display()
        ))
    }
}

impl Daemon {
    pub fn start(vireod: &Path, worker: &Path) -> Result<Daemon, String> {
        let state_dir = tempfile::Builder::new()
            .prefix("vireo-density-")
            .tempdir()
            .map_err(|e| format!("state dir: {e}"))?;
        let socket = state_dir.path().join("vireod.sock");
        let log = File::create(state_dir.path().join("vireod.log"))
            .map_err(|e| format!("vireod log: {e}"))?;
        let child = Command::new(vireod)
            .arg("--state-dir")
            .arg(state_dir.path())
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--worker-bin")
            .arg(worker)
            // The VMs' kernel is the probe image, outside the state dir (the default root).
            .arg("--storage-root")
            .arg(state_dir.path())
            .arg("--storage-root")
            .arg(
                vireo_probe_image::probe_elf()
                    .parent()
                    .unwrap_or(Path::new("/")),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", vireod.display()))?;
        let mut daemon = Daemon {
            child,
            state_dir,
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                return Err(format!(
                    "vireod exited at start ({status}): {}",
                    daemon.log_tail()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "vireod did not listen within 15 s: {}",
                    daemon.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pids of the workers vireod recorded (`vms/<id>/worker.json`).
    pub fn worker_pids(&self) -> Vec<u32> {
        let Ok(dirs) = std::fs::read_dir(self.state_dir.path().join("vms")) else {
            return vec![];
        };
        dirs.filter_map(|d| {
            let text = std::fs::read_to_string(d.ok()?.path().join("worker.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            u32::try_from(v.get("pid")?.as_u64()?).ok()
        })
        .collect()
    }

    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.state_dir.path().join("vireod.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        unsafe { libc::kill(pid, sig) };
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Workers first: they outlive vireod by design.
        for pid in self.worker_pids() {
            signal(pid, libc::SIGKILL);
        }
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
