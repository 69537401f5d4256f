//! `vireo vm console NAME` through pipes, for tests that talk to the probe guest the way a
//! user's terminal would: one command line in, lines out until the probe's `OK`/`ERR`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::Daemon;

pub struct Console {
    pub child: Child,
    pub stdin: Option<std::process::ChildStdin>,
    pub lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Console {
    pub fn attach(d: &Daemon, name: &str) -> Console {
        let mut child = d
            .vireo(&["vm", "console", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Console {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Sends `command` and returns the probe's answer line (`OK ...` or `ERR ...`).
    pub fn ask(&mut self, command: &str) -> String {
        let stdin = self.stdin.as_mut().expect("console finished");
        stdin.write_all(format!("{command}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no answer to {command}; saw {:?}", self.seen));
            self.seen.push(line.clone());
            if line.starts_with("OK") || line.starts_with("ERR") {
                return line;
            }
        }
    }

    /// As `ask`, but `None` when no answer came within `limit` or the console ended (the VM
    /// moved away under the command).
    pub fn try_ask(&mut self, command: &str, limit: Duration) -> Option<String> {
        self.send(command).ok()?;
        self.try_answer(limit)
    }

    /// Sends `command` without waiting for its answer.
    pub fn send(&mut self, command: &str) -> std::io::Result<()> {
        let stdin = self.stdin.as_mut().ok_or(std::io::ErrorKind::BrokenPipe)?;
        stdin.write_all(format!("{command}\n").as_bytes())?;
        stdin.flush()
    }

    /// The answer to a command already sent, as [`Self::try_ask`] waits for it.
    pub fn try_answer(&mut self, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if line.starts_with("OK") || line.starts_with("ERR") {
                return Some(line);
            }
        }
    }

    /// As `ask`, insisting on `OK`.
    pub fn ok(&mut self, command: &str) -> String {
        let a = self.ask(command);
        assert!(a.starts_with("OK"), "{command}: {a}");
        a
    }
}

impl Console {
    /// Closes the console's input and waits (bounded) for `vireo` to exit: its status and
    /// stderr.
    pub fn finish(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        drop(self.stdin.take());
        let deadline = Instant::now() + limit;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                self.child.kill().unwrap();
                panic!("vireo vm console did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err).unwrap();
        }
        (self.child.wait().unwrap(), err)
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
