//! `worker.sock`: the JSON-lines protocol vireod drives the worker with
//! (`vireo_api::worker`). One thread accepts, one thread per connection answers its requests in
//! turn. A malformed line, an over-long line or a request of another protocol version gets
//! `Error` and the connection stays usable.

use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use base64::Engine;
use uuid::Uuid;
use vireo_api::worker::{
    WorkerOp, WorkerReply, WorkerRequest, WorkerStatus, WORKER_PROTOCOL_VERSION,
};
use vireo_vmm::VmHandle;

use crate::console::Console;

/// Longest request line accepted (requests are a few dozen bytes).
pub const MAX_REQUEST: usize = 4096;

/// What the requests read and act on.
pub struct State {
    pub vm_id: Uuid,
    /// The VM's folder (`Save` defaults to its `saved/`).
    pub vm_dir: PathBuf,
    /// The spec the VM was started with, carried in a save's state file.
    pub spec_json: String,
    pub spec_name: String,
    /// Where `Save` put the VM, once it has (the VM then stops and the worker exits `Saved`).
    pub saved_to: std::sync::Mutex<Option<PathBuf>>,
    pub console: Arc<Console>,
    pub console_socket: PathBuf,
    pub shutdown_line: Option<String>,
    pub vm: VmHandle,
    /// Unix ms the vCPUs started; 0 before.
    pub started_at: AtomicI64,
    /// Size of the console ring, the most `ConsoleLog` returns.
    pub ring_bytes: usize,
    /// What `Metrics` reads.
    pub meter: crate::metrics::Meter,
    /// Disk hot add and remove.
    pub hotplug: crate::hotplug::Hotplug,
    /// Storage live migration (`MoveStorage`).
    pub mover: crate::move_storage::Mover,
    /// Live migration, either direction (`MigrateOut`, the `incoming` launch).
    pub migration: crate::migrate::Migration,
    /// A `Checkpoint` runs (`checkpoint.rs`); `Status` shows it.
    pub checkpointing: std::sync::atomic::AtomicBool,
}

/// Serves `listener` on a thread of its own, a thread per connection.
pub fn start(listener: UnixListener, state: Arc<State>) -> std::io::Result<()> {
    vireo_linesock::start(listener, "worker", move |conn| serve(&state, conn))
}

fn serve(s: &Arc<State>, conn: UnixStream) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut input = BufReader::new(conn);
    loop {
        let (reply, then, files) = match vireo_linesock::read_line(&mut input, MAX_REQUEST) {
            Ok(None) | Err(_) => return,
            Ok(Some(Err(vireo_linesock::TooLong))) => (
                WorkerReply::Error {
                    message: format!("request longer than {MAX_REQUEST} bytes"),
                },
                None,
                Vec::new(),
            ),
            Ok(Some(Ok(line))) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(Some(Ok(line))) => match parse(&line) {
                Ok(op) => answer(s, op),
                Err(message) => (WorkerReply::Error { message }, None, Vec::new()),
            },
        };
        let mut text = serde_json::to_string(&reply).unwrap_or_else(|e| {
            format!(r#"{{"reply":"error","message":"encoding the reply: {e}"}}"#)
        });
        text.push('\n');
        let sent = if files.is_empty() {
            out.write_all(text.as_bytes())
        } else {
            vireo_block::handover::send_line_with_files(&out, text.as_bytes(), &files)
        };
        if let Err(e) = sent {
            if !files.is_empty() {
                tracing::warn!("the disks' locked files could not be handed over: {e}");
                // The state is complete: the VM still stops, its disks unlocked by the exit.
                if let Some(after) = then {
                    after(s);
                }
            }
            return;
        }
        // Ours are copies: the disks stay open here until the process ends.
        drop(files);
        if let Some(after) = then {
            after(s);
        }
    }
}

/// A request line to its operation; the error is the message for the `Error` reply.
pub fn parse(line: &[u8]) -> Result<WorkerOp, String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("malformed request (not JSON): {e}"))?;
    match value.get("version").map(|v| v.as_u64()) {
        None => return Err("malformed request: no \"version\"".into()),
        Some(Some(v)) if v == u64::from(WORKER_PROTOCOL_VERSION) => {}
        Some(v) => {
            let shown = v.map_or_else(|| value["version"].to_string(), |v| v.to_string());
            return Err(format!(
                "protocol version {shown} is not spoken here: this worker speaks version \
                 {WORKER_PROTOCOL_VERSION}"
            ));
        }
    }
    serde_json::from_value::<WorkerRequest>(value)
        .map(|r| r.op)
        .map_err(|e| format!("malformed request: {e}"))
}

/// Something to do once the reply has been sent.
type After = fn(&State);

/// A reply, what to do after it is sent, and the files that go with it (SCM_RIGHTS).
type Answer = (WorkerReply, Option<After>, Vec<std::fs::File>);

fn answer(s: &Arc<State>, op: WorkerOp) -> Answer {
    let reply = match op {
        WorkerOp::Hello => WorkerReply::Hello {
            version: WORKER_PROTOCOL_VERSION,
            vm_id: s.vm_id,
            pid: std::process::id(),
        },
        WorkerOp::Status => {
            let started = s.started_at.load(Ordering::SeqCst);
            WorkerReply::Status(WorkerStatus {
                running: started != 0 && !s.vm.exited(),
                started_at: (started != 0).then_some(started),
                console_socket: s.console_socket.clone(),
                paused: s.vm.is_paused(),
                checkpointing: s.checkpointing.load(Ordering::SeqCst),
                disk_slots: s.vm.disk_slots().iter().map(|d| d.disk.is_some()).collect(),
            })
        }
        WorkerOp::Shutdown => match &s.shutdown_line {
            None => WorkerReply::Error {
                message: "the VM's spec has no shutdown_line, so the guest cannot be asked \
                          to power off; turn it off instead"
                    .into(),
            },
            Some(line) => match s.console.send_to_guest(format!("{line}\n").as_bytes()) {
                Ok(()) => {
                    tracing::info!("asked the guest to power off ({line:?} on COM1)");
                    WorkerReply::Ok
                }
                Err(e) => WorkerReply::Error {
                    message: format!("writing the shutdown line to COM1: {e}"),
                },
            },
        },
        WorkerOp::TurnOff => {
            tracing::info!("turn off requested");
            // The reply goes out first: the worker exits soon after the stop.
            return (
                WorkerReply::Ok,
                Some(|s: &State| s.vm.request_stop()),
                Vec::new(),
            );
        }
        WorkerOp::ConsoleLog { max_bytes } => {
            let (bytes, total) = s.console.log((max_bytes as usize).min(s.ring_bytes));
            WorkerReply::ConsoleLog {
                data_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
                total_bytes: total,
            }
        }
        WorkerOp::Metrics => WorkerReply::Metrics(s.meter.read()),
        // While a migration runs, nothing may change the VM's run state or disk layout under
        // it (its lifecycle lock covers only the copy; the handoff comes after).
        WorkerOp::Pause
        | WorkerOp::Resume
        | WorkerOp::Reset
        | WorkerOp::AddDisk { .. }
        | WorkerOp::RemoveDisk { .. }
        | WorkerOp::Save { .. }
        | WorkerOp::MoveStorage { .. }
        | WorkerOp::MigrateOut { .. }
        | WorkerOp::ApplyCheckpoint { .. }
            if s.migration.is_active() =>
        {
            refused(
                "migration",
                "a live migration of this VM is running; wait for it or cancel it first".into(),
            )
        }
        WorkerOp::Pause => lifecycle("pause", s.vm.pause()),
        WorkerOp::Resume => lifecycle("resume", s.vm.resume()),
        WorkerOp::Reset => {
            tracing::info!("reset requested");
            lifecycle("reset", s.vm.reset())
        }
        WorkerOp::AddDisk { .. } | WorkerOp::RemoveDisk { .. } | WorkerOp::Save { .. }
            if s.mover.is_running() =>
        {
            refused(
                "disk layout",
                "a storage move of this VM is running; wait for it or cancel it first".into(),
            )
        }
        WorkerOp::Checkpoint { .. } | WorkerOp::ApplyCheckpoint { .. } if s.mover.is_running() => {
            refused(
                "checkpoint",
                "a storage move of this VM is running; wait for it or cancel it first".into(),
            )
        }
        WorkerOp::ApplyCheckpoint { dir, children } => {
            match crate::checkpoint_apply::apply(s, &dir, &children) {
                Ok(r) => WorkerReply::Applied(r),
                Err(message) => refused("apply checkpoint", message),
            }
        }
        WorkerOp::MoveStorage { .. } if s.checkpointing.load(Ordering::SeqCst) => refused(
            "move storage",
            "a checkpoint of this VM is being taken; move it after that".into(),
        ),
        WorkerOp::Checkpoint { dir, children } => {
            match crate::checkpoint::checkpoint(s, &dir, &children) {
                Ok(r) => {
                    tracing::info!(
                        "checkpoint into {}: paused {:.1} ms, total {} ms",
                        dir.display(),
                        r.pause_us as f64 / 1e3,
                        r.total_ms
                    );
                    WorkerReply::Checkpointed(r)
                }
                Err(message) => refused("checkpoint", message),
            }
        }
        WorkerOp::AddDisk { disk } => match s.hotplug.add(&disk, &s.meter) {
            Ok(index) => WorkerReply::DiskAdded { index },
            Err(message) => refused("add disk", message),
        },
        WorkerOp::RemoveDisk { serial } => match s.hotplug.remove(&serial, &s.meter) {
            Ok(()) => WorkerReply::Ok,
            Err(message) => refused("remove disk", message),
        },
        WorkerOp::MoveStorage {
            to,
            flatten,
            keep,
            targets,
        } => match crate::move_storage::start(s, to, flatten, keep, targets) {
            Ok(()) => WorkerReply::Ok,
            Err(message) => refused("move storage", message),
        },
        WorkerOp::MoveStorageStatus => WorkerReply::MoveStorage(s.mover.progress()),
        WorkerOp::MoveStorageCancel => {
            s.mover.cancel();
            WorkerReply::Ok
        }
        WorkerOp::MigrateStatus => WorkerReply::Migrate(s.migration.progress()),
        WorkerOp::MigrateCancel => match s.migration.cancel() {
            Ok(()) => WorkerReply::Ok,
            Err(message) => refused("cancel migration", message),
        },
        WorkerOp::MigrateSourceAlive => match s.migration.source_alive() {
            Ok(()) => WorkerReply::Ok,
            Err(message) => refused("wait for the migration source", message),
        },
        WorkerOp::MigrateOut {
            to,
            session,
            options,
            tls,
        } => match crate::migrate::out::start(s, to, session, options, tls) {
            Ok(()) => WorkerReply::Ok,
            Err(message) => refused("migrate", message),
        },
        WorkerOp::Save {
            dir,
            hand_over_disks,
        } => {
            let dir = dir.unwrap_or_else(|| s.vm_dir.join(crate::SAVED_DIR));
            match crate::save::save(s, &dir, hand_over_disks) {
                Ok(handed) => {
                    // The state is complete on disk; the disks close only as the process
                    // ends, after this reply: they unlock then unless handed over with it.
                    let stop: After = |s: &State| s.vm.request_stop();
                    if !hand_over_disks {
                        return (WorkerReply::Ok, Some(stop), Vec::new());
                    }
                    let (disks, files) = handed.into_iter().unzip();
                    return (WorkerReply::DisksHandedOver { disks }, Some(stop), files);
                }
                Err(message) => refused("save", message),
            }
        }
    };
    (reply, None, Vec::new())
}

fn refused(what: &str, message: String) -> WorkerReply {
    tracing::warn!("{what}: {message}");
    WorkerReply::Error { message }
}

/// `Ok`, or `Error` saying which operation failed and why.
fn lifecycle(what: &str, result: Result<(), vireo_vmm::LifecycleError>) -> WorkerReply {
    match result {
        Ok(()) => WorkerReply::Ok,
        Err(e) => {
            tracing::warn!("{what}: {e}");
            WorkerReply::Error {
                message: format!("{what}: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_refuses_other_versions_and_malformed_lines_with_a_message() {
        assert_eq!(parse(br#"{"version":1,"op":"hello"}"#), Ok(WorkerOp::Hello));
        assert_eq!(
            parse(br#"{"version":1,"op":"metrics"}"#),
            Ok(WorkerOp::Metrics)
        );
        assert_eq!(parse(br#"{"version":1,"op":"pause"}"#), Ok(WorkerOp::Pause));
        assert_eq!(
            parse(br#"{"version":1,"op":"resume"}"#),
            Ok(WorkerOp::Resume)
        );
        assert_eq!(parse(br#"{"version":1,"op":"reset"}"#), Ok(WorkerOp::Reset));
        assert_eq!(
            parse(br#"{"version":1,"op":"console_log","max_bytes":5}"#),
            Ok(WorkerOp::ConsoleLog { max_bytes: 5 })
        );
        let e = parse(br#"{"version":2,"op":"hello"}"#).unwrap_err();
        assert!(e.contains("protocol version 2 is not spoken here"), "{e}");
        let e = parse(br#"{"version":"1","op":"hello"}"#).unwrap_err();
        assert!(e.contains("protocol version \"1\""), "{e}");
        assert!(parse(br#"{"op":"hello"}"#)
            .unwrap_err()
            .contains("no \"version\""));
        assert!(parse(b"hello").unwrap_err().contains("not JSON"));
        let e = parse(br#"{"version":1,"op":"reboot"}"#).unwrap_err();
        assert!(e.starts_with("malformed request"), "{e}");
    }
}
