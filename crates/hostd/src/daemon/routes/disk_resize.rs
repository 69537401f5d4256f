//! `POST /v1/vms/{vm}/disks/{disk}/resize`: a VM's disk to a new virtual size. Running or
//! paused: online, through the worker's control socket (`disk-resize`, docs/vmm.md; the guest
//! gets a config interrupt). Off (or critical): the file itself, with the vhdx crate (VHDX,
//! VHD) or a truncate (raw). An automatic checkpoint comes first when the VM has them on
//! (docs/checkpoints.md): a shrink drops data the checkpoint keeps.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use vireo_api::{ApiErrorCode, ResizeDiskReply, ResizeDiskRequest, VmState};
use vireo_block::BlockBackend;
use vireo_vhdx::convert::Format;
use vireo_vhdx::{OpenOptions, Vhdx, VhdxError};

use super::St;
use crate::daemon::checkpoints::auto::{self, RiskyOp};
use crate::daemon::http_error::{ApiJson, ApiPath, HttpError};

/// The worker answers a resize at once (metadata only); a silent one is stuck.
const ANSWER_LIMIT: Duration = Duration::from_secs(60);

fn invalid(message: String) -> HttpError {
    HttpError::new(ApiErrorCode::Invalid, message)
}

pub async fn resize(
    State(d): St,
    ApiPath((key, which)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<ResizeDiskRequest>,
) -> Result<Json<ResizeDiskReply>, HttpError> {
    let vm = d.find(&key)?;
    let guard = d.try_lock_vm(&vm)?;
    let vm = d.store.get_by_id(vm.id())?;
    let index = super::disks::disk_index(&vm, &which)?;
    let name = vm.spec.name.clone();
    if req.size_bytes == 0 || !req.size_bytes.is_multiple_of(512) {
        return Err(invalid(format!(
            "size {} is not a positive multiple of 512 bytes",
            req.size_bytes
        )));
    }
    if vm.spec.disks[index].read_only {
        return Err(invalid(format!(
            "disk {index} of VM {name:?} is read-only; attach it read-write to resize it"
        )));
    }
    let online = match vm.state {
        VmState::Off | VmState::Critical { .. } | VmState::Lost { .. } => false,
        VmState::Running | VmState::Paused if req.force => {
            return Err(invalid(format!(
                "force (shrinking over data) is refused while VM {name:?} is {}; stop it first",
                vm.state
            )))
        }
        VmState::Running | VmState::Paused => true,
        ref s => {
            return Err(HttpError::conflict(format!(
                "cannot resize a disk while VM {name:?} is {s}; wait until it is running or off"
            )))
        }
    };
    let taken = auto::before(&d, vm.id(), RiskyOp::DiskResize, &guard).await?;
    // The checkpoint put the disk on a new differencing child: that is the file to resize.
    let vm = d.store.get_by_id(vm.id())?;
    let disk = vm.spec.disks[index].clone();
    let size_bytes = if online {
        let sock = d.store.vm_dir(vm.id()).join("control.sock");
        resize_online(&sock, index, req.size_bytes).await
    } else {
        let path = disk.path.clone();
        tokio::task::spawn_blocking(move || resize_file(&path, req.size_bytes, req.force))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
    }
    .map_err(|m| invalid(format!("disk {index} of VM {name:?}: {m}")))?;
    tracing::info!(vm = %vm.id(), index, size_bytes, "disk resized");
    Ok(Json(ResizeDiskReply {
        index,
        serial: disk.serial,
        size_bytes,
        automatic_checkpoint: taken.as_ref().map(|t| t.checkpoint.name.clone()),
    }))
}

/// `disk-resize N SIZE` on the worker's control socket: `ok SIZE` or `error REASON`.
async fn resize_online(sock: &Path, index: usize, size: u64) -> Result<u64, String> {
    let shown = sock.display();
    let talk = async {
        let conn = tokio::net::UnixStream::connect(sock)
            .await
            .map_err(|e| format!("connecting to {shown}: {e}"))?;
        let (r, mut w) = conn.into_split();
        w.write_all(format!("disk-resize {index} {size}\n").as_bytes())
            .await
            .map_err(|e| format!("writing to {shown}: {e}"))?;
        BufReader::new(r)
            .lines()
            .next_line()
            .await
            .map_err(|e| format!("reading {shown}: {e}"))?
            .ok_or_else(|| format!("{shown} closed without an answer"))
    };
    let line = tokio::time::timeout(ANSWER_LIMIT, talk)
        .await
        .map_err(|_| format!("no answer from {shown} in {}s", ANSWER_LIMIT.as_secs()))??;
    match line.strip_prefix("ok ") {
        Some(n) => n
            .trim()
            .parse()
            .map_err(|_| format!("the worker answered {line:?}")),
        None => Err(line.trim_start_matches("error ").to_owned()),
    }
}

/// Resizes the file of a disk no worker has open; returns the new size.
fn resize_file(path: &PathBuf, size: u64, force: bool) -> Result<u64, String> {
    let shown = path.display();
    let format = Format::detect(path).map_err(|e| format!("{shown}: {e}"))?;
    match format {
        Format::Vhdx => {
            let v =
                Vhdx::open(path, &OpenOptions::default()).map_err(|e| format!("{shown}: {e}"))?;
            v.resize(size, force).map_err(|e| match e {
                VhdxError::ShrinkOverData { data_at, .. } => format!(
                    "shrinking to {size} would discard data at virtual offset {data_at}; \
                     choose a size above it, or force to discard it"
                ),
                e => format!("{shown}: {e}"),
            })?;
            v.flush().map_err(|e| format!("{shown}: {e}"))?;
            Ok(v.size())
        }
        Format::Vhd => {
            let v = vireo_vhdx::vhd::Vhd::open(path, false).map_err(|e| format!("{shown}: {e}"))?;
            v.resize_to(size, force)
                .map_err(|e| format!("{shown}: {e}"))?;
            v.flush().map_err(|e| format!("{shown}: {e}"))?;
            Ok(v.size())
        }
        Format::Raw => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| format!("{shown}: {e}"))?;
            let old = f.metadata().map_err(|e| format!("{shown}: {e}"))?.len();
            // A raw file has no map of where data is: any shrink may drop some.
            if size < old && !force {
                return Err(format!(
                    "{shown} is a raw file, which has no map of its data: shrinking it from \
                     {old} to {size} bytes may discard data; pass force to do it anyway"
                ));
            }
            f.set_len(size).map_err(|e| format!("{shown}: {e}"))?;
            f.sync_all().map_err(|e| format!("{shown}: {e}"))?;
            Ok(size)
        }
    }
}
