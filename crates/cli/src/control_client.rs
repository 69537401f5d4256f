//! `vireo control SOCKET ...`: the client side of a running VM's control socket (`vireo run
//! --control`), so nobody needs netcat to list a VM's disks, live-merge one or resize one.
//!
//! `disk-merge` draws a progress bar and turns Ctrl-C into `disk-merge-cancel` sent over a
//! second connection: the merge stops at a safe point and the VM stays on the child.
//!
//! Exit statuses (the table in `exit.rs`): a socket path that does not exist or is not a socket,
//! a disk index the VM does not have and a size that is not a positive multiple of 512 are bad
//! input (2), checked before anything is asked of the VM; a VM that is not listening (connection
//! refused), a connection that breaks and every error the VM answers (a resize over data, a
//! merge of a raw disk) are failures (1); Ctrl-C during a merge is 130 once the merge stopped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::disk::progress::{cancel_flag, Bar};
use crate::exit::CliError;
use crate::output::OutputFormat;

#[derive(Args)]
#[command(after_help = STATUSES)]
pub struct ControlArgs {
    /// The socket given to `vireo run --control`.
    socket: PathBuf,
    #[command(subcommand)]
    command: ControlCommand,
}

/// Exit statuses, shown by `vireo control --help`.
const STATUSES: &str = "\
Exit status:
  0    done
  1    the VM refused or failed the operation (e.g. a resize over data, a merge of a raw disk),
       or is not listening on SOCKET (connection refused), or the connection broke
  2    bad input, nothing asked of the VM: SOCKET does not exist or is not a socket, no disk N,
       a size that is not a positive multiple of 512
  130  Ctrl-C stopped a merge (safely; the VM stays on the child, a later merge resumes)";

#[derive(Subcommand)]
enum ControlCommand {
    /// List the VM's disks.
    Disks {
        /// text (a table, the default) for people, json for programs (an array of objects).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
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
    /// Save the VM into directory DIR (created if missing) and stop it: memory.bin and
    /// vm.state. Live: memory is written while the guest runs, the guest is paused only for
    /// the last dirty pages and the device state. `vireo run --restore DIR` with the same
    /// options continues it. Prints DIR; the copy rounds, MiB written and the pause go to stderr.
    Save {
        /// Where to save; a relative path is taken from the current directory.
        dir: PathBuf,
    },
    /// Like save, but the VM runs on afterwards (a snapshot of a running VM); pause_ms is the
    /// time the guest was paused.
    Snapshot {
        /// Where to save; a relative path is taken from the current directory.
        dir: PathBuf,
    },
}

pub fn execute(args: ControlArgs) -> Result<ExitCode, CliError> {
    let socket = &args.socket;
    match args.command {
        ControlCommand::Disks { output } => {
            let disks = list(socket)?;
            if output == OutputFormat::Json {
                println!("{}", serde_json::Value::Array(disks));
            } else {
                print_table(&disks);
            }
            Ok(ExitCode::SUCCESS)
        }
        ControlCommand::Merge { index } => {
            check_index(socket, index)?;
            merge(socket, index)
        }
        ControlCommand::Resize { index, size } => {
            if size == 0 || !size.is_multiple_of(512) {
                return Err(CliError::bad_input(format!(
                    "size {size} is not a positive multiple of 512 bytes"
                )));
            }
            check_index(socket, index)?;
            let new_size = request_answer(socket, &format!("disk-resize {index} {size}"))?;
            println!("{new_size}");
            Ok(ExitCode::SUCCESS)
        }
        ControlCommand::Save { dir } => save(socket, "save", &dir),
        ControlCommand::Snapshot { dir } => save(socket, "snapshot", &dir),
    }
}

/// `save DIR` or `snapshot DIR` on the socket; prints the answer.
fn save(socket: &Path, command: &str, dir: &Path) -> Result<ExitCode, CliError> {
    // The VM resolves paths from its own directory, so send an absolute one; the
    // protocol is words on a line, so a path with blanks cannot be sent.
    let dir = std::path::absolute(dir)
        .map_err(|e| CliError::bad_input(format!("{command} directory {}: {e}", dir.display())))?;
    let shown = dir.display().to_string();
    if shown.chars().any(char::is_whitespace) || shown.contains('\n') {
        return Err(CliError::bad_input(format!(
            "{command} directory '{shown}' contains blanks; choose a path without them"
        )));
    }
    if dir.exists() && !dir.is_dir() {
        return Err(CliError::bad_input(format!(
            "{shown} exists and is not a directory"
        )));
    }
    let saved = exchange_with_timeout(socket, &format!("{command} {shown}"), SAVE_TIMEOUT)?;
    // stdout: the directory, as scripts expect; the report (rounds=.. written_mib=..
    // pause_ms=.. total_ms=..) goes to stderr.
    let (dir_said, report) = saved.split_once(' ').unwrap_or((saved.as_str(), ""));
    println!("{dir_said}");
    if !report.is_empty() {
        eprintln!("{command}: {report}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A save writes all of guest memory; allow for a large guest on a slow disk.
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);

/// The VM's disks, as `disks` lists them.
fn list(socket: &Path) -> Result<Vec<serde_json::Value>, CliError> {
    request(socket, "disks")?
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()
        .map_err(|e| CliError::failed(format!("unexpected answer from {}: {e}", socket.display())))
}

/// A disk index the VM does not have is the caller's mistake, not the VM's failure.
fn check_index(socket: &Path, index: usize) -> Result<(), CliError> {
    let count = list(socket)?.len();
    if index >= count {
        return Err(CliError::bad_input(format!(
            "the VM at {} has no disk {index} ({count} disk(s), numbered from 0; see \
             `vireo control {} disks`)",
            socket.display(),
            socket.display()
        )));
    }
    Ok(())
}

fn merge(socket: &Path, index: usize) -> Result<ExitCode, CliError> {
    let cancel = cancel_flag();
    let bar = Bar::new("merge");
    let mut conn = connect(socket)?;
    let broken = |e: std::io::Error| CliError::failed(format!("{}: {e}", socket.display()));
    // A timeout on reads lets this thread notice Ctrl-C between progress lines.
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(broken)?;
    writeln!(conn, "disk-merge {index}").map_err(broken)?;
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
                return Err(CliError::failed(format!(
                    "{} closed before the merge ended",
                    socket.display()
                )))
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
            Err(e) => return Err(broken(e)),
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
            return Err(if cancel_sent {
                CliError::interrupted(msg)
            } else {
                CliError::failed(msg)
            });
        }
    }
}

/// A path that is not there, not a socket or not ours to open is bad input; a socket nobody
/// listens on means the VM is gone, a failure.
fn connect(socket: &Path) -> Result<UnixStream, CliError> {
    let shown = socket.display();
    UnixStream::connect(socket).map_err(|e| {
        let message = format!(
            "cannot reach the VM's control socket {shown}: {e} (is `vireo run --control \
             {shown}` running?)"
        );
        let meta = std::fs::symlink_metadata(socket);
        if meta.is_err() {
            CliError::bad_input(format!(
                "control socket {shown} does not exist (is `vireo run --control {shown}` \
                 running?)"
            ))
        } else if !meta.is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
            CliError::bad_input(format!(
                "{shown} is not a socket (give the path passed to `vireo run --control`)"
            ))
        } else if e.kind() == std::io::ErrorKind::ConnectionRefused {
            CliError::failed(message)
        } else {
            CliError::bad_input(message)
        }
    })
}

/// Sends one command and returns the lines before its final `ok`; `error MSG` becomes Err.
fn request(socket: &Path, command: &str) -> Result<Vec<String>, CliError> {
    exchange(socket, command).map(|(lines, _)| lines)
}

/// Sends one command answered by a single `ok VALUE` line and returns VALUE.
fn request_answer(socket: &Path, command: &str) -> Result<String, CliError> {
    exchange(socket, command).map(|(_, value)| value)
}

/// Sends one command; returns the lines before its final `ok` and what followed `ok `. The VM's
/// `error MSG` is a failed operation: what the VM can refuse, the caller checked already.
fn exchange(socket: &Path, command: &str) -> Result<(Vec<String>, String), CliError> {
    exchange_timed(socket, command, Duration::from_secs(30))
}

/// [`exchange`] for a command answered by one `ok VALUE` that may take up to `timeout`.
fn exchange_with_timeout(
    socket: &Path,
    command: &str,
    timeout: Duration,
) -> Result<String, CliError> {
    exchange_timed(socket, command, timeout).map(|(_, value)| value)
}

fn exchange_timed(
    socket: &Path,
    command: &str,
    timeout: Duration,
) -> Result<(Vec<String>, String), CliError> {
    let mut conn = connect(socket)?;
    let broken = |e: std::io::Error| CliError::failed(format!("{}: {e}", socket.display()));
    conn.set_read_timeout(Some(timeout)).map_err(broken)?;
    writeln!(conn, "{command}").map_err(broken)?;
    let mut out = vec![];
    for line in BufReader::new(conn).lines() {
        let line = line.map_err(broken)?;
        if line == "ok" {
            return Ok((out, String::new()));
        }
        if let Some(value) = line.strip_prefix("ok ") {
            return Ok((out, value.to_string()));
        }
        if let Some(msg) = line.strip_prefix("error ") {
            return Err(CliError::failed(msg));
        }
        out.push(line);
    }
    Err(CliError::failed(format!(
        "{} closed before answering '{command}'",
        socket.display()
    )))
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
