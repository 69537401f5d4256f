//! Helpers the namespace benchmarks (`switch`, `team`, `overlay`) share: running `ip`/`tc`
//! commands, reaping children, entering a namespace from a thread, one iperf3 TCP run and
//! medians.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs a command; its stderr in the error when it fails.
pub fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs a command whose failure does not matter (cleanup, best-effort settings).
pub fn quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Kills and reaps a child on drop.
pub struct Reap(pub Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `f` on a thread that first enters network namespace `ns` (threads it spawns stay
/// there: a switch runtime started inside binds, and programs the kernel, in `ns`).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let file =
            std::fs::File::open(format!("/var/run/netns/{ns}")).map_err(|e| e.to_string())?;
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&file);
        // SAFETY: setns on a valid namespace fd; only this thread (and what it spawns) moves.
        if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
        }
        f()
    })
    .join()
    .map_err(|_| "namespace thread panicked".to_string())?
}

/// What one iperf3 TCP run measured.
#[derive(Clone, Copy, Debug)]
pub struct Iperf {
    /// Bits per second the receiver got.
    pub bps: f64,
    pub retransmits: u64,
    /// Seconds the receiver measured.
    pub secs: f64,
    /// iperf3's own CPU, both ends, in cores.
    pub cpu: f64,
}

/// iperf3 TCP for `secs` seconds from namespace `client` to `addr` (a one-shot server in
/// namespace `server`), `extra` client options; bounded by a kill after `secs + 20` s.
pub fn iperf3(
    client: &str,
    server: &str,
    addr: &str,
    secs: u32,
    extra: &[&str],
) -> Result<Iperf, String> {
    let _srv = Reap(
        Command::new("ip")
            .args(["netns", "exec", server, "iperf3", "-s", "-1", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("iperf3 server: {e}"))?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let t = secs.to_string();
    let mut child = Reap(
        Command::new("ip")
            .args(["netns", "exec", client, "iperf3", "-J", "-c", addr])
            .args(["-p", "5201", "-t", &t])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("iperf3: {e}"))?,
    );
    let end = Instant::now() + Duration::from_secs(secs as u64 + 20);
    while !matches!(child.0.try_wait(), Ok(Some(_))) {
        if Instant::now() > end {
            return Err("iperf3 did not finish".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    if let Some(mut o) = child.0.stdout.take() {
        use std::io::Read;
        let _ = o.read_to_string(&mut out);
    }
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("iperf3 JSON: {e}"))?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| format!("iperf3 failed: {}", v["error"]))?;
    let cpu = &v["end"]["cpu_utilization_percent"];
    let pct = |k: &str| cpu[k].as_f64().unwrap_or(f64::NAN) / 100.0;
    Ok(Iperf {
        bps,
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        secs: v["end"]["sum_received"]["seconds"]
            .as_f64()
            .unwrap_or(secs as f64),
        cpu: pct("host_total") + pct("remote_total"),
    })
}

/// The median (the mean of the middle two for an even count); NaN for none.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n.is_multiple_of(2) => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        _ => v[n / 2],
    }
}
