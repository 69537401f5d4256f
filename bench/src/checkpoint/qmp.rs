//! A small QMP client for the QEMU side of the checkpoint benchmark: JSON commands over the
//! `-qmp unix:` socket, events skipped, and HMP commands through `human-monitor-command`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying while QEMU creates the socket) and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("QMP socket {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().map_err(|e| e.to_string())?),
            writer: stream,
        };
        q.line()?; // greeting
        q.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<serde_json::Value, String> {
        let mut l = String::new();
        let n = self
            .reader
            .read_line(&mut l)
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP: QEMU closed the connection".into());
        }
        serde_json::from_str(&l).map_err(|e| format!("QMP: {e} in {l:?}"))
    }

    /// Runs a command; its `return` value, or its error as text.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let msg = serde_json::json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{msg}").map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {command}: {e}"));
            }
        }
    }

    /// Runs an HMP command; its output (HMP reports errors as output, so any output from
    /// savevm/loadvm is treated as an error by the callers that expect none).
    pub fn hmp(&mut self, line: &str) -> Result<String, String> {
        let r = self.execute(
            "human-monitor-command",
            serde_json::json!({"command-line": line}),
        )?;
        Ok(r.as_str().unwrap_or_default().to_string())
    }

    /// The u64 at guest-physical `addr` (HMP `xp`).
    pub fn read_u64(&mut self, addr: u64) -> Result<u64, String> {
        let out = self.hmp(&format!("xp /1gx {addr:#x}"))?;
        // "0000000000080008: 0x000000000000002a"
        out.split_whitespace()
            .last()
            .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
            .ok_or_else(|| format!("cannot parse xp output {out:?}"))
    }

    /// The VM run state (`running`, `paused`, `postmigrate`, `inmigrate`...).
    pub fn status(&mut self) -> Result<String, String> {
        let r = self.execute("query-status", serde_json::json!({}))?;
        Ok(r["status"].as_str().unwrap_or_default().to_string())
    }
}
