//! `vireo control SOCKET ...`: the client side of a running VM's control socket (`vireo run
//! --control`), so nobody needs netcat to list a VM's disks, live-merge one or resize one.
//!
//! `disk-merge` draws a progress bar and turns Ctrl-C into `disk-merge-cancel` sent over a
//! second connection: the merge stops at a safe point and the VM stays on the child.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::disk::progress::{cancel_flag, Bar};

#[derive(Args)]
pub struct ControlArgs {
    /// The socket given to `vireo run --control`.
    socket: PathBuf,
    #[command(subcommand)]
    command: ControlCommand,
}

#[derive(Subcommand)]
enum ControlCommand {
    /// List the VM's disks.
    Disks {
        /// "table" for people, "json" for programs (an array of objects).
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Merge differencing VHDX disk N into its parent while the guest runs (live merge);
    /// prints the parent's path, which the VM uses from then on. Ctrl-C cancels safely.
    Merge {
        /// Disk index, as `disks` lists it.
        index: usize,
    },
    /// Grow or shrink disk N while the guest runs; the guest is told the new capacity. A VHDX
    /// shrink that would drop data is refused; a raw shrink drops the file's tail. Prints the
    /// new size in bytes.
    Resize {
        /// Disk index, as `disks` lists it.
        index: usize,
        /// New size: bytes or with a K, M, G or T suffix (powers of 1024), a multiple of 512.
        #[arg(value_parser = crate::disk::parse_size)]
        size: u64,
    },
}

pub fn execute(args: ControlArgs) -> Result<ExitCode, String> {
    match args.command {
        ControlCommand::Disks { output } => {
            let lines = request(&args.socket, "disks")?;
            let disks: Vec<serde_json::Value> = lines
                .iter()
                .map(|l| serde_json::from_str(l))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("unexpected answer from {}: {e}", args.socket.display()))?;
            if output == "json" {
                println!("{}", serde_json::Value::Array(disks));
            } else {
                print_table(&disks);
            }
            Ok(ExitCode::SUCCESS)
        }
        ControlCommand::Merge { index } => merge(&args.socket, index),
        ControlCommand::Resize { index, size } => {
            let new_size = request_answer(&args.socket, &format!("disk-resize {index} {size}"))?;
            println!("{new_size}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn merge(socket: &Path, index: usize) -> Result<ExitCode, String> {
    let cancel = cancel_flag();
    let bar = Bar::new("merge");
    let mut conn = connect(socket)?;
    // A timeout on reads lets this thread notice Ctrl-C between progress lines.
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    writeln!(conn, "disk-merge {index}").map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(conn);
    let mut cancel_sent = false;
    let mut line = String::new();
    loop {
        if cancel.load(Ordering::SeqCst) && !cancel_sent {
            request(socket, &format!("disk-merge-cancel {index}"))?;
            cancel_sent = true;
        }
        match reader.read_line(&mut line) {
            Ok(0) => {
                return Err(format!(
                    "{} closed before the merge ended",
                    socket.display()
                ))
            }
            Ok(_) if line.ends_with('\n') => {}
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(format!("{}: {e}", socket.display())),
        }
        let text = std::mem::take(&mut line);
        let text = text.trim_end();
        if let Some(rest) = text.strip_prefix("progress ") {
            let mut nums = rest.split(' ').filter_map(|n| n.parse::<u64>().ok());
            if let (Some(done), Some(total)) = (nums.next(), nums.next()) {
                bar.update(done, total);
            }
        } else if let Some(path) = text.strip_prefix("ok ") {
            bar.finish();
            println!("{path}");
            return Ok(ExitCode::SUCCESS);
        } else if let Some(msg) = text.strip_prefix("error ") {
            bar.finish();
            eprintln!("vireo: error: {msg}");
            return Ok(ExitCode::from(if cancel_sent { 130 } else { 1 }));
        }
    }
}

fn connect(socket: &Path) -> Result<UnixStream, String> {
    UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the VM's control socket {}: {e} (is `vireo run --control {}` running?)",
            socket.display(),
            socket.display()
        )
    })
}

/// Sends one command and returns the lines before its final `ok`; `error MSG` becomes Err.
fn request(socket: &Path, command: &str) -> Result<Vec<String>, String> {
    exchange(socket, command).map(|(lines, _)| lines)
}

/// Sends one command answered by a single `ok VALUE` line and returns VALUE.
fn request_answer(socket: &Path, command: &str) -> Result<String, String> {
    exchange(socket, command).map(|(_, value)| value)
}

/// Sends one command; returns the lines before its final `ok` and what followed `ok `.
fn exchange(socket: &Path, command: &str) -> Result<(Vec<String>, String), String> {
    let mut conn = connect(socket)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    writeln!(conn, "{command}").map_err(|e| e.to_string())?;
    let mut out = vec![];
    for line in BufReader::new(conn).lines() {
        let line = line.map_err(|e| format!("{}: {e}", socket.display()))?;
        if line == "ok" {
            return Ok((out, String::new()));
        }
        if let Some(value) = line.strip_prefix("ok ") {
            return Ok((out, value.to_string()));
        }
        if let Some(msg) = line.strip_prefix("error ") {
            return Err(msg.to_string());
        }
        out.push(line);
    }
    Err(format!(
        "{} closed before answering '{command}'",
        socket.display()
    ))
}

fn print_table(disks: &[serde_json::Value]) {
    println!(
        "{:>5}  {:<6} {:>14}  {:<3} {:>5}  PATH",
        "INDEX", "FORMAT", "SIZE", "RO", "CHAIN"
    );
    for d in disks {
        println!(
            "{:>5}  {:<6} {:>14}  {:<3} {:>5}  {}",
            d["index"].as_u64().unwrap_or_default(),
            d["format"].as_str().unwrap_or("?"),
            d["virtual_size"].as_u64().unwrap_or_default(),
            if d["read_only"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            d["chain_depth"].as_u64().unwrap_or_default(),
            d["path"].as_str().unwrap_or("?"),
        );
    }
}
