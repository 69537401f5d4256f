//! Runs the real `vireo-switch` binary on a folder and talks to it over `switch.sock`, as
//! vireod does. A `Switchd` kills its process (by pid) on drop if a test failed before
//! shutting it down.

pub mod host;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;
use vireo_api::switch::{
    PortAttach, PortReport, SwitchLaunch, SwitchOp, SwitchPort, SwitchReply, SwitchRequest,
};
use vireo_vswitch::{PortConfig, SwitchConfig};

pub const BIN: &str = env!("CARGO_BIN_EXE_vireo-switch");

/// Waits up to `limit` for `cond`.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `DIR/switch.json`.
pub fn write_launch(dir: &Path, config: SwitchConfig, ports: Vec<SwitchPort>) -> Uuid {
    let launch = SwitchLaunch {
        switch_id: Uuid::new_v4(),
        config,
        ports,
        uplink_mirror: None,
    };
    std::fs::write(
        dir.join("switch.json"),
        serde_json::to_vec_pretty(&launch).unwrap(),
    )
    .unwrap();
    launch.switch_id
}

pub fn vhost(name: &str, socket: impl Into<PathBuf>, vid: u16) -> SwitchPort {
    SwitchPort {
        config: PortConfig::access(name, vid),
        attach: PortAttach::VhostUser {
            socket: socket.into(),
        },
    }
}

pub fn iface(name: &str, vid: u16) -> SwitchPort {
    SwitchPort {
        config: PortConfig::access(name, vid),
        attach: PortAttach::Interface { name: name.into() },
    }
}

/// The `vireo-switch` command for `dir`, its stderr in `dir/switch.log`.
pub fn command(dir: &Path) -> Command {
    let log = std::fs::File::create(dir.join("switch.log")).unwrap();
    let mut c = Command::new(BIN);
    c.arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    c
}

pub struct Switchd {
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub pid: u32,
}

impl Switchd {
    /// Starts the switch of `dir` (switch.json written) and waits until it answers.
    pub fn start(dir: &Path) -> Switchd {
        let child = command(dir).spawn().unwrap();
        let pid = child.id();
        let s = Switchd {
            dir: dir.to_path_buf(),
            child: Some(child),
            pid,
        };
        s.wait_serving();
        s
    }

    /// Adopts a switch process this test did not spawn (its parent is another process).
    pub fn adopt(dir: &Path, pid: u32) -> Switchd {
        let s = Switchd {
            dir: dir.to_path_buf(),
            child: None,
            pid,
        };
        s.wait_serving();
        s
    }

    fn wait_serving(&self) {
        let ok = wait_until(Duration::from_secs(20), || {
            UnixStream::connect(self.socket()).is_ok()
        });
        assert!(ok, "switch.sock never answered; log:\n{}", self.log());
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("switch.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("switch.log")).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket())
    }

    pub fn alive(&self) -> bool {
        alive(self.pid)
    }

    /// Waits for the process to end (bounded); its exit status when it was our child.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        if let Some(c) = self.child.as_mut() {
            let end = Instant::now() + limit;
            loop {
                if let Some(st) = c.try_wait().unwrap() {
                    self.child = None;
                    return Some(st);
                }
                assert!(
                    Instant::now() < end,
                    "vireo-switch did not exit; log:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        assert!(
            wait_until(limit, || !alive(self.pid)),
            "vireo-switch {} did not exit; log:\n{}",
            self.pid,
            self.log()
        );
        None
    }

    pub fn status(&self) -> Vec<PortReport> {
        match self.client().op(SwitchOp::Status) {
            SwitchReply::Status { ports } => ports,
            r => panic!("status: {r:?}"),
        }
    }

    pub fn port(&self, name: &str) -> PortReport {
        self.status()
            .into_iter()
            .find(|p| p.config.name == name)
            .unwrap_or_else(|| panic!("no port {name}"))
    }
}

impl Drop for Switchd {
    fn drop(&mut self) {
        if alive(self.pid) {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

/// Whether process `pid` exists and has not ended (a zombie has ended).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// One connection to `switch.sock`.
pub struct Client {
    out: UnixStream,
    input: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client {
            out: s.try_clone().unwrap(),
            input: BufReader::new(s),
        }
    }

    /// Sends one raw line (a newline is added) and reads the reply.
    pub fn raw(&mut self, line: &[u8]) -> SwitchReply {
        let mut l = line.to_vec();
        l.push(b'\n');
        self.out.write_all(&l).unwrap();
        self.reply()
    }

    pub fn reply(&mut self) -> SwitchReply {
        let mut text = String::new();
        self.input.read_line(&mut text).unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("reply {text:?}: {e}"))
    }

    pub fn op(&mut self, op: SwitchOp) -> SwitchReply {
        let line = serde_json::to_vec(&SwitchRequest::new(op)).unwrap();
        self.raw(&line)
    }

    /// `Ok`, or the test fails with the error.
    pub fn ok(&mut self, op: SwitchOp) {
        match self.op(op.clone()) {
            SwitchReply::Ok => {}
            r => panic!("{op:?}: {r:?}"),
        }
    }

    /// The `Error` message, or the test fails.
    pub fn error(&mut self, op: SwitchOp) -> String {
        match self.op(op.clone()) {
            SwitchReply::Error { message } => message,
            r => panic!("{op:?} should fail: {r:?}"),
        }
    }
}
