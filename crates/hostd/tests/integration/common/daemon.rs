//! A vireod under test: spawned on a temporary state dir with the fake worker (or another),
//! spoken to with raw HTTP/1.1 over its Unix socket, and cleaned up with every worker it left.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vireo_api::worker::WorkerRecord;

pub const FAKE_WORKER: &str = env!("CARGO_BIN_EXE_vireo-fake-worker");
pub const VIREOD: &str = env!("CARGO_BIN_EXE_vireod");

/// Polls `cond` every 20 ms until it holds; panics with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// An error response: the `ApiError` shape with `code`.
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(
            self.status,
            status,
            "{:?}",
            String::from_utf8_lossy(&self.body)
        );
        let v = self.json();
        assert_eq!(v["code"], code, "{v}");
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 2, "only code and message: {v}");
        v["message"].as_str().unwrap().to_owned()
    }
}

pub struct Vireod {
    pub state_dir: PathBuf,
    pub sock: PathBuf,
    pub worker_bin: PathBuf,
    pub child: Option<Child>,
    /// More vireod arguments (e.g. `--migration-listen`), on every (re)start.
    pub extra_args: Vec<String>,
    /// Environment for vireod (e.g. a `VIREO_TEST_*` fault hook), on every (re)start.
    pub extra_env: Vec<(String, String)>,
}

impl Vireod {
    pub fn start(state_dir: &Path) -> Vireod {
        Self::start_with(state_dir, Path::new(FAKE_WORKER))
    }

    pub fn start_with(state_dir: &Path, worker_bin: &Path) -> Vireod {
        Self::start_args(state_dir, worker_bin, &[])
    }

    pub fn start_args(state_dir: &Path, worker_bin: &Path, args: &[&str]) -> Vireod {
        Self::start_full(state_dir, worker_bin, args, &[])
    }

    /// With the fake worker and `env` for vireod (kept for restarts): a test hook such as a
    /// `VIREOD_TEST_*` delay, for this vireod only (the tests share one process).
    pub fn start_env(state_dir: &Path, env: &[(&str, &str)]) -> Vireod {
        Self::start_full(state_dir, Path::new(FAKE_WORKER), &[], env)
    }

    fn start_full(
        state_dir: &Path,
        worker_bin: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Vireod {
        let sock = state_dir.join("vireod.sock");
        let mut d = Vireod {
            state_dir: state_dir.to_owned(),
            sock,
            worker_bin: worker_bin.to_owned(),
            child: None,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        d.spawn();
        d
    }

    pub fn command(state_dir: &Path, worker_bin: &Path) -> Command {
        let mut c = Command::new(VIREOD);
        c.arg("--state-dir")
            .arg(state_dir)
            .arg("--worker-bin")
            .arg(worker_bin)
            .env("RUST_LOG", "info");
        // The tests' kernels and disks: the probe image and files in temporary directories.
        for root in storage_roots() {
            c.arg("--storage-root").arg(root);
        }
        c
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir.with_extension("vireod.log"))
            .unwrap();
        let child = Self::command(&self.state_dir, &self.worker_bin)
            .args(&self.extra_args)
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let sock = self.sock.clone();
        wait_until(Duration::from_secs(20), "vireod's socket", || {
            UnixStream::connect(&sock).is_ok()
        });
        // The socket is bound before vireod starts its switches and re-adopts its workers, and
        // served only after: the first answer means start-up is over (a test that kills an
        // adopted worker must not race the adoption).
        assert_eq!(self.get("/v1/host").status, 200, "{}", self.log());
    }

    /// vireod's own log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.with_extension("vireod.log")).unwrap_or_default()
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM; returns the exit status (bounded wait).
    pub fn terminate(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGTERM)
    }

    /// Sends `sig`; returns the exit status (bounded wait).
    pub fn stop_with(&mut self, sig: i32) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        signal(c.id(), sig);
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "vireod ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn request(&self, method: &str, path: &str, body: Option<(&str, &[u8])>) -> Response {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: vireod\r\nConnection: close\r\n");
        if let Some((ct, b)) = body {
            if !ct.is_empty() {
                req += &format!("Content-Type: {ct}\r\n");
            }
            req += &format!("Content-Length: {}\r\n", b.len());
        }
        req += "\r\n";
        s.write_all(req.as_bytes()).unwrap();
        if let Some((_, b)) = body {
            // The server may answer (413) before reading it all.
            let _ = s.write_all(b);
        }
        read_response(&mut s)
    }

    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    pub fn post_json(&self, path: &str, v: &Value) -> Response {
        let body = serde_json::to_vec(v).unwrap();
        self.request("POST", path, Some(("application/json", &body)))
    }

    pub fn post(&self, path: &str) -> Response {
        self.request("POST", path, None)
    }

    /// GET of a JSON resource that must succeed.
    pub fn show(&self, path: &str) -> Value {
        let r = self.get(path);
        assert_eq!(
            r.status,
            200,
            "GET {path}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()
    }

    pub fn create(&self, spec: &Value) -> Value {
        let r = self.post_json("/v1/vms", spec);
        assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
        r.json()
    }

    pub fn state(&self, vm: &str) -> String {
        self.show(&format!("/v1/vms/{vm}"))["state"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn wait_state(&self, vm: &str, state: &str, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let last = self.show(&format!("/v1/vms/{vm}"));
            if last["state"] == state {
                return last;
            }
            assert!(
                start.elapsed() < limit,
                "VM {vm} not {state} after {limit:?}: {last}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls a job until it has ended.
    pub fn wait_job(&self, id: &str, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let job = self.show(&format!("/v1/jobs/{id}"));
            if job["state"] != "running" {
                return job;
            }
            assert!(
                start.elapsed() < limit,
                "job {id} still running after {limit:?}: {job}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// POST start; waits for the job; asserts it completed.
    pub fn start_vm(&self, vm: &str) -> Value {
        let r = self.post(&format!("/v1/vms/{vm}/start"));
        assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
        let job = self.wait_job(r.json()["id"].as_str().unwrap(), Duration::from_secs(40));
        assert_eq!(job["state"], "completed", "{job}\n{}", self.log());
        job
    }

    pub fn worker_record(&self, vm_id: &str) -> Option<WorkerRecord> {
        let p = self.state_dir.join("vms").join(vm_id).join("worker.json");
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    }
}

impl Drop for Vireod {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_workers(&self.state_dir);
    }
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) of a process this test started.
    unsafe { libc::kill(pid as i32, sig) };
}

/// SIGKILL for every worker and switch process recorded under `state_dir` (they outlive
/// vireod by design).
pub fn kill_workers(state_dir: &Path) {
    for e in std::fs::read_dir(state_dir.join("switches"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = e.path().join("switch-proc.json");
        if let Some(r) = std::fs::read(&p)
            .ok()
            .and_then(|b| serde_json::from_slice::<vireo_api::switch::SwitchRecord>(&b).ok())
        {
            if alive(r.pid) {
                signal(r.pid, libc::SIGKILL);
            }
        }
    }
    let Ok(entries) = std::fs::read_dir(state_dir.join("vms")) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path().join("worker.json");
        if let Some(r) = std::fs::read(&p)
            .ok()
            .and_then(|b| serde_json::from_slice::<WorkerRecord>(&b).ok())
        {
            if alive(r.pid) {
                signal(r.pid, libc::SIGKILL);
            }
        }
    }
}

/// The process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s[s.rfind(')').unwrap() + 1..].split_whitespace().next();
            !matches!(state, Some("Z" | "X"))
        }
        Err(_) => false,
    }
}

pub fn read_response(s: &mut UnixStream) -> Response {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
        .unwrap_or_else(|| panic!("not an HTTP response: {:?}", String::from_utf8_lossy(&raw)))
}

pub fn parse_response(raw: &[u8]) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Some(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).ok()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if n == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..n)?);
        b = b.get(n + 2..)?;
    }
}

/// The storage roots the helpers give vireod: the temporary directory and the probe image's.
pub fn storage_roots() -> Vec<PathBuf> {
    let probe_dir = vireo_probe_image::probe_elf().parent().unwrap().to_owned();
    vec![std::env::temp_dir(), probe_dir]
}

/// A minimal spec as JSON (no disks or NICs: the fake worker needs none; the kernel is the
/// probe image, a file inside the storage roots the fake worker never reads).
pub fn spec_json(name: &str, cmdline: &str) -> Value {
    serde_json::json!({
        "version": 1,
        "name": name,
        "vcpus": 1,
        "memory_bytes": 32 << 20,
        "kernel": vireo_probe_image::probe_elf(),
        "cmdline": cmdline,
        "console_ring_bytes": 4096,
        "shutdown_line": "POWEROFF",
    })
}
