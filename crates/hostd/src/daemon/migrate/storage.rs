//! Shared-nothing migration in the daemons (docs/migration.md, "Shared-nothing migration"):
//! the disks are copied over the migration channel, because the destination cannot reach the
//! source's files.
//!
//! - Source: [`describe`] tells the offer what each disk is (size, format, space it takes).
//! - Destination, at the offer: [`create_copies`] checks `dest_dir` (inside a storage root, a
//!   folder), the names (none exists) and the free space, then creates one empty copy per disk
//!   (raw stays raw; a VHDX chain becomes one dynamic VHDX: the source worker sends what the
//!   guest sees) and returns the spec pointing at the copies. Everything here happens before
//!   the source touches its VM; a refusal is one line naming the value.
//! - Destination, the disk connection (`DiskData {session}`): [`receive`] writes the source
//!   worker's records into the copies, and at `Done` flushes and closes them and answers
//!   `Done` (the destination worker opens them only after that).
//! - Destination, the end: [`keep`] once the VM runs here; [`discard`] otherwise, which removes
//!   every file the migration created (never a file that was there before). Each file is
//!   listed on disk before it is created (`arriving.rs`), so a vireod killed mid-arrival
//!   removes them at its next start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;
use vireo_api::migrate::{CopiedDisk, PeerMsg};
use vireo_api::{DiskFormat, VmSpec};
use vireo_block::{BlockBackend, RawFile};
use vireo_migration::disk::{self, Kind, HEADER_LEN};
use vireo_vhdx::{CreateOptions, DiskType, Vhdx};

use super::arriving::Manifest;
use super::peer::Peer;
use crate::daemon::Daemon;

/// Room a new dynamic VHDX takes beyond its data (headers, log, metadata, BAT).
const VHDX_OVERHEAD: u64 = 8 << 20;
/// Between two records of the disk stream at most (the source reads the disk meanwhile).
const RECORD_LIMIT: Duration = Duration::from_secs(60);

/// One arriving VM's copies.
pub struct Target {
    vm_id: Uuid,
    sizes: Vec<u64>,
    /// Open until `Done`; taken by the disk connection.
    backends: Mutex<Option<Vec<Arc<dyn BlockBackend>>>>,
    created: Vec<PathBuf>,
    /// `dest_dir` and the space the copies need at most (for the disk-full message).
    dir: PathBuf,
    need: u64,
    /// Why the disk stream failed here, for the arrival's task to tell the source (the source
    /// worker only sees its disk stream end).
    failure: Mutex<Option<String>>,
    /// Records written so far: the arrival's task tells the waiting worker while it grows.
    records: AtomicU64,
}

/// The copies of the migrations arriving here, by session.
#[derive(Default)]
pub struct Targets(Mutex<HashMap<Uuid, Arc<Target>>>);

impl Targets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Target>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Source: the offer's description of each disk (slot order).
pub fn describe(spec: &VmSpec) -> Result<Vec<CopiedDisk>, String> {
    spec.disks
        .iter()
        .map(|d| describe_disk(&d.path, d.format))
        .collect()
}

fn allocated(path: &Path) -> Result<u64, String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| format!("disk {}: {e}", path.display()))?;
    // Blocks really used: a sparse file asks only for what it holds.
    Ok((m.blocks() * 512).min(m.len()))
}

/// Source: the offer's description of the disk at `path`, copied flattened.
pub fn describe_disk(path: &Path, format: Option<DiskFormat>) -> Result<CopiedDisk, String> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("disk {} has no usable file name", path.display()))?
        .to_string();
    let format = match format {
        Some(f) => f,
        None => match vireo_vhdx::convert::Format::detect(path).map_err(|e| e.to_string())? {
            vireo_vhdx::convert::Format::Raw => DiskFormat::Raw,
            vireo_vhdx::convert::Format::Vhd => DiskFormat::Vhd,
            vireo_vhdx::convert::Format::Vhdx => DiskFormat::Vhdx,
        },
    };
    match format {
        DiskFormat::Vhd => Err(format!(
            "disk {} is a VHD; shared-nothing migration copies raw and VHDX disks: convert it \
             first (vireo disk convert)",
            path.display()
        )),
        DiskFormat::Raw => {
            let size = std::fs::metadata(path)
                .map_err(|e| format!("disk {}: {e}", path.display()))?
                .len();
            Ok(CopiedDisk {
                file_name,
                size,
                format,
                block_size: 0,
                logical_sector: 512,
                physical_sector: 512,
                allocated: allocated(path)?,
            })
        }
        DiskFormat::Vhdx => {
            // The worker has it open and locked: look without a lock (only geometry, which
            // does not change while it runs).
            let opts = vireo_vhdx::OpenOptions {
                read_only: true,
                no_lock: true,
                ..Default::default()
            };
            let v = Vhdx::open(path, &opts).map_err(|e| format!("disk {}: {e}", path.display()))?;
            let mut bytes = 0;
            for f in v.chain_paths() {
                bytes += allocated(&f)?;
            }
            Ok(CopiedDisk {
                file_name,
                size: v.virtual_size(),
                format,
                block_size: v.block_size(),
                logical_sector: v.logical_sector_size(),
                physical_sector: v.physical_sector_size(),
                allocated: bytes,
            })
        }
    }
}

/// Bytes free for an unprivileged writer in `dir`'s file system.
fn free_bytes(dir: &Path) -> Result<u64, String> {
    let st = rustix::fs::statvfs(dir).map_err(|e| format!("dest_dir {}: {e}", dir.display()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Space the copy of `d` needs at most.
fn needed(d: &CopiedDisk) -> u64 {
    let data = d.allocated.min(d.size);
    match d.format {
        DiskFormat::Raw => data,
        _ => data + VHDX_OVERHEAD,
    }
}

pub(super) fn plain_file_name(name: &str) -> bool {
    let p = Path::new(name);
    let mut parts = p.components();
    matches!(parts.next(), Some(std::path::Component::Normal(_))) && parts.next().is_none()
}

/// Destination, at the offer: checks and creates the copies; `spec` with its disks pointing
/// at them. On `Err` nothing was left behind.
pub fn create_copies(
    d: &Daemon,
    vm_id: Uuid,
    spec: &VmSpec,
    dest_dir: Option<&Path>,
    disks: &[CopiedDisk],
) -> Result<(VmSpec, Target), String> {
    let dir = confined_dest_dir(d, dest_dir)?;
    if disks.len() != spec.disks.len() {
        return Err(format!(
            "the offer describes {} disks, the spec has {}",
            disks.len(),
            spec.disks.len()
        ));
    }
    if let Some(c) = disks.iter().find(|c| c.format == DiskFormat::Vhd) {
        return Err(format!("disk {}: VHD copies are not made", c.file_name));
    }
    let paths = free_names(&dir, disks)?;
    let need: u64 = disks.iter().map(needed).sum();
    check_room(&dir, need, "the disks")?;
    let mut created = Vec::new();
    let mut backends: Vec<Arc<dyn BlockBackend>> = Vec::new();
    let listed = Manifest::of(d, vm_id);
    for (c, p) in disks.iter().zip(&paths) {
        match create_one(c, p, &mut created, &listed) {
            Ok(b) => backends.push(b),
            Err(e) => {
                drop(backends);
                remove_files(&created);
                listed.drop_list();
                return Err(e);
            }
        }
    }
    let mut out = spec.clone();
    for ((disk, c), p) in out.disks.iter_mut().zip(disks).zip(&paths) {
        disk.path = p.clone();
        disk.format = Some(c.format);
    }
    Ok((
        out,
        Target {
            vm_id,
            sizes: disks.iter().map(|c| c.size).collect(),
            backends: Mutex::new(Some(backends)),
            created,
            dir,
            need,
            failure: Mutex::new(None),
            records: AtomicU64::new(0),
        },
    ))
}

/// `dest_dir` as this host sees it: absolute, inside a storage root, a folder.
pub(super) fn confined_dest_dir(d: &Daemon, dest_dir: Option<&Path>) -> Result<PathBuf, String> {
    let dir = dest_dir.ok_or("a shared-nothing migration names dest_dir")?;
    if !dir.is_absolute() {
        return Err(format!(
            "dest_dir {} is not an absolute path",
            dir.display()
        ));
    }
    let dir = d
        .storage
        .confine_path("dest_dir", dir)
        .map_err(|e| e.body.message)?;
    if !dir.is_dir() {
        return Err(format!(
            "dest_dir {} is not a folder on this host; create it first",
            dir.display()
        ));
    }
    Ok(dir)
}

/// Each file's path in `dir`: a plain name, not there yet, no two alike.
fn free_names(dir: &Path, files: &[CopiedDisk]) -> Result<Vec<PathBuf>, String> {
    let mut paths: Vec<PathBuf> = Vec::new();
    for c in files {
        if !plain_file_name(&c.file_name) {
            return Err(format!("disk file name {:?} refused", c.file_name));
        }
        let p = dir.join(&c.file_name);
        if p.exists() || paths.contains(&p) {
            return Err(format!(
                "{} exists already on this host; choose another dest_dir or remove it",
                p.display()
            ));
        }
        paths.push(p);
    }
    Ok(paths)
}

pub(super) fn check_room(dir: &Path, need: u64, what: &str) -> Result<(), String> {
    let free = free_bytes(dir)?;
    if free < need {
        return Err(format!(
            "dest_dir {} has {free} bytes free on this host and {what} need {need}; free \
             space there or choose another dest_dir",
            dir.display()
        ));
    }
    Ok(())
}

/// Source, a shared-nothing migration carrying a checkpoint tree: one of the user's files the
/// tree uses (a base disk the first checkpoint froze), which travels whole as a tree file.
/// Only VHDX: the chain's parent locators are rewritten on arrival, which a VHD's are not.
pub fn describe_user_file(path: &Path) -> Result<CopiedDisk, String> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{} has no usable file name", path.display()))?
        .to_string();
    let opts = vireo_vhdx::OpenOptions {
        read_only: true,
        no_lock: true,
        ..Default::default()
    };
    let v = Vhdx::open(path, &opts).map_err(|e| {
        format!(
            "{} (a disk of the VM's checkpoints) is not a VHDX this host reads ({e}); a \
             shared-nothing migration carries a checkpoint tree of VHDX files only: migrate on \
             shared storage, or delete the checkpoints and convert the disk (vireo disk convert)",
            path.display()
        )
    })?;
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    Ok(CopiedDisk {
        file_name,
        size: v.virtual_size(),
        format: DiskFormat::Vhdx,
        block_size: v.block_size(),
        logical_sector: v.logical_sector_size(),
        physical_sector: v.physical_sector_size(),
        // Sent whole: the file's length, not its blocks.
        allocated: len,
    })
}

/// Destination, a shared-nothing migration carrying a checkpoint tree, at the offer: where
/// the offer's `files` land (the user's files, see [`describe_user_file`], and the flattened
/// copies of the disks outside the tree): `dest_dir` checked as for copies, their names free
/// there. The room is checked once the plan tells which is which ([`check_tree_room`]).
/// Nothing created yet.
pub fn check_tree_dest_dir(
    d: &Daemon,
    dest_dir: Option<&Path>,
    files: &[CopiedDisk],
) -> Result<PathBuf, String> {
    let dir = confined_dest_dir(d, dest_dir)?;
    free_names(&dir, files)?;
    Ok(dir)
}

/// Destination, a shared-nothing migration carrying a checkpoint tree: room in `dir` for the
/// user's files (sent whole: their length) and the flattened copies (as without a tree).
pub fn check_tree_room(
    dir: &Path,
    user_files: &[&CopiedDisk],
    flattened: &[&CopiedDisk],
) -> Result<(), String> {
    let whole: u64 = user_files.iter().map(|f| f.allocated).sum();
    let need = whole + flattened.iter().map(|c| needed(c)).sum::<u64>();
    let what = match flattened.is_empty() {
        true => "the checkpoints' base disks",
        false => "the checkpoints' base disks and the disks outside the checkpoints",
    };
    check_room(dir, need, what)
}

/// Destination, after every check of the offer: the user's files are created empty at
/// `paths` (in `dir`), claimed for the tree's `File`s (`Peer::recv_claimed_file`), and the
/// copies of the disks outside the tree (`flattened`) as [`create_copies`] makes them, so that
/// [`discard`] removes them after any failure and nothing that was there before. On `Err`
/// nothing was left behind.
pub fn claim_tree_files(
    d: &Daemon,
    vm_id: Uuid,
    paths: &[PathBuf],
    flattened: &[super::tree::Flattened],
    dir: PathBuf,
) -> Result<Target, String> {
    let mut created = Vec::new();
    let listed = Manifest::of(d, vm_id);
    // The copies are reopened for the disk stream once the tree is in (`tops_target`).
    for f in flattened {
        if let Err(e) = create_one(&f.copy, &f.path, &mut created, &listed) {
            remove_files(&created);
            listed.drop_list();
            return Err(e);
        }
    }
    for p in paths {
        let made = listed.list(p).and_then(|()| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p)
                .map_err(|e| {
                    listed.unlist(p);
                    format!("creating {}: {e}", p.display())
                })
        });
        match made {
            Ok(_) => created.push(p.clone()),
            Err(e) => {
                remove_files(&created);
                listed.drop_list();
                return Err(e);
            }
        }
    }
    Ok(Target {
        vm_id,
        sizes: Vec::new(),
        backends: Mutex::new(None),
        created,
        dir,
        need: 0,
        failure: Mutex::new(None),
        records: AtomicU64::new(0),
    })
}

/// Destination, a live migration carrying a checkpoint tree: the empty children made for
/// the running tops (`tree::Arrival::settle_live`), in the disk copy's order, wait for the
/// source worker's records of their top layers; shared-nothing, the flattened copies of the
/// disks outside the tree come after them (made at the offer, a VHDX or raw). `dir`: the
/// folder the tops are in (for the disk-full message).
pub fn tops_target(vm_id: Uuid, tops: &[PathBuf], dir: PathBuf) -> Result<Target, String> {
    let mut sizes = Vec::new();
    let mut backends: Vec<Arc<dyn BlockBackend>> = Vec::new();
    for p in tops {
        let b: Arc<dyn BlockBackend> = match crate::daemon::checkpoints::disks::is_vhdx(p) {
            true => Arc::new(
                Vhdx::open(p, &vireo_vhdx::OpenOptions::default())
                    .map_err(|e| format!("opening the new top {}: {e}", p.display()))?,
            ),
            // Only a flattened copy of a raw disk (created empty: no VHDX signature).
            false => Arc::new(
                RawFile::open(p, false)
                    .map_err(|e| format!("opening the copy {}: {e}", p.display()))?,
            ),
        };
        sizes.push(b.size());
        backends.push(b);
    }
    Ok(Target {
        vm_id,
        sizes,
        backends: Mutex::new(Some(backends)),
        created: tops.to_vec(),
        dir,
        need: 0,
        failure: Mutex::new(None),
        records: AtomicU64::new(0),
    })
}

/// Creates one copy, listed in `listed` first (a vireod killed from here on leaves it to the
/// next start's clean-up, `arriving::recover_all`).
fn create_one(
    c: &CopiedDisk,
    path: &Path,
    created: &mut Vec<PathBuf>,
    listed: &Manifest,
) -> Result<Arc<dyn BlockBackend>, String> {
    let err = |e: &dyn std::fmt::Display| format!("creating {}: {e}", path.display());
    listed.list(path)?;
    match c.format {
        DiskFormat::Raw => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| {
                    listed.unlist(path);
                    err(&e)
                })?;
            created.push(path.to_path_buf());
            f.set_len(c.size).map_err(|e| err(&e))?;
            drop(f);
            Ok(Arc::new(RawFile::open(path, false).map_err(|e| err(&e))?))
        }
        _ => {
            let opts = CreateOptions {
                size: c.size,
                disk_type: DiskType::Dynamic,
                block_size: c.block_size,
                logical_sector: c.logical_sector,
                physical_sector: c.physical_sector,
                parent: None,
            };
            // Created under a temporary name and renamed complete: once it exists it is ours.
            let v = Vhdx::create(path, &opts).map_err(|e| {
                listed.unlist(path);
                err(&e)
            })?;
            created.push(path.to_path_buf());
            Ok(Arc::new(v))
        }
    }
}

fn remove_files(files: &[PathBuf]) {
    for f in files.iter().rev() {
        match std::fs::remove_file(f) {
            Ok(()) => tracing::info!("migration: removed partial copy {}", f.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("migration: cannot remove {}: {e}", f.display()),
        }
    }
}

/// Destination: the copies of `session` wait for their data.
pub fn register(d: &Daemon, session: Uuid, t: Target) {
    d.migrations
        .disk_targets
        .lock()
        .insert(session, Arc::new(t));
}

/// Destination: the VM runs here on its copies; they are no longer the migration's.
pub fn keep(d: &Daemon, vm_id: Uuid) {
    d.migrations
        .disk_targets
        .lock()
        .retain(|_, t| t.vm_id != vm_id);
    Manifest::of(d, vm_id).drop_list();
}

/// Destination: the arrival failed or was aborted; every copy it created goes.
pub fn discard(d: &Daemon, vm_id: Uuid) {
    let gone: Vec<Arc<Target>> = {
        let mut m = d.migrations.disk_targets.lock();
        let ids: Vec<Uuid> = m
            .iter()
            .filter(|(_, t)| t.vm_id == vm_id)
            .map(|(k, _)| *k)
            .collect();
        ids.iter().filter_map(|k| m.remove(k)).collect()
    };
    for t in gone {
        // Closing first: a disk stream still writing fails at its next record.
        t.backends.lock().unwrap_or_else(|p| p.into_inner()).take();
        remove_files(&t.created);
    }
    Manifest::of(d, vm_id).remove_files(|f| super::boot_files::in_use(d, f, vm_id));
}

/// Destination: a `DiskData` connection; its records go into the copies of `session`.
pub async fn receive(d: &Daemon, mut peer: Peer, session: Uuid) {
    let target = d.migrations.disk_targets.lock().get(&session).cloned();
    let backends = target
        .as_ref()
        .and_then(|t| t.backends.lock().unwrap_or_else(|p| p.into_inner()).take());
    let (Some(target), Some(backends)) = (target, backends) else {
        let _ = peer
            .send(&PeerMsg::Refused {
                reason: format!("no shared-nothing migration {session} waits for disk data here"),
            })
            .await;
        return;
    };
    if peer
        .send(&PeerMsg::Accepted {
            listen_addr: None,
            provider_addresses: Vec::new(),
            send_files: Vec::new(),
        })
        .await
        .is_err()
    {
        return;
    }
    let why = match write_records(&mut peer, &target, backends).await {
        Ok(()) => return tracing::info!(vm = %target.vm_id, "disk copies complete"),
        Err(CopyFailure::NoSpace) => {
            let free = free_bytes(&target.dir).map_or_else(|e| e, |f| format!("{f} bytes"));
            if target.need == 0 {
                // The tops of a checkpoint tree, in this vireod's folder for the VM.
                format!(
                    "{} ran out of space on the destination while the VM's running \
                     differencing disks were copied ({free} free now); free space there",
                    target.dir.display()
                )
            } else {
                format!(
                    "dest_dir {} ran out of space on the destination while the disks were copied: \
                 they need up to {} bytes (the guest's writes during the copy included), {free} \
                 free now; free space there or choose another dest_dir",
                    target.dir.display(),
                    target.need
                )
            }
        }
        Err(CopyFailure::Other(e)) => format!("the disk copy failed on the destination: {e}"),
    };
    // The source's worker fails too (no `Done` answer); the arrival's task tells the source
    // why, and `discard` removes the copies.
    tracing::warn!(vm = %target.vm_id, "disk data: {why}");
    *target.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
}

/// Destination: how many disk records of an arriving VM were received so far (`None`: its
/// disks are not being copied here).
pub fn records_received(d: &Daemon, vm_id: Uuid) -> Option<u64> {
    let m = d.migrations.disk_targets.lock();
    let counts: Vec<u64> = m
        .values()
        .filter(|t| t.vm_id == vm_id)
        .map(|t| t.records.load(Ordering::Relaxed))
        .collect();
    (!counts.is_empty()).then(|| counts.iter().sum())
}

/// Destination: why the disk copy of an arriving VM failed, once it did.
pub fn failure(d: &Daemon, vm_id: Uuid) -> Option<String> {
    let m = d.migrations.disk_targets.lock();
    m.values()
        .filter(|t| t.vm_id == vm_id)
        .find_map(|t| t.failure.lock().unwrap_or_else(|p| p.into_inner()).clone())
}

/// How writing the copies failed: a full file system gets its own message.
enum CopyFailure {
    NoSpace,
    Other(String),
}

impl From<String> for CopyFailure {
    fn from(e: String) -> Self {
        CopyFailure::Other(e)
    }
}

async fn write_records(
    peer: &mut Peer,
    target: &Target,
    backends: Vec<Arc<dyn BlockBackend>>,
) -> Result<(), CopyFailure> {
    loop {
        let mut h = [0u8; HEADER_LEN];
        peer.read_exact(&mut h, RECORD_LIMIT).await?;
        let h = disk::parse_header(&h, &target.sizes).map_err(|e| e.to_string())?;
        target.records.fetch_add(1, Ordering::Relaxed);
        match h.kind {
            Kind::Data => {
                let mut data = vec![0u8; h.len as usize];
                peer.read_exact(&mut data, RECORD_LIMIT).await?;
                disk::check_payload(&h, &data).map_err(|e| e.to_string())?;
                let b = backends[h.disk as usize].clone();
                blocking(move || b.write_at(&data, h.offset)).await?;
            }
            Kind::Zero => {
                let b = backends[h.disk as usize].clone();
                blocking(move || b.write_zeroes(h.offset, h.len.into())).await?;
            }
            Kind::Abort => {
                let mut reason = vec![0u8; h.len as usize];
                peer.read_exact(&mut reason, RECORD_LIMIT).await?;
                return Err(CopyFailure::Other(format!(
                    "the source gave up: {}",
                    String::from_utf8_lossy(&reason)
                )));
            }
            Kind::Done => {
                // Durable and closed (locks gone) before the source hears `Done`.
                let bs = backends;
                blocking(move || {
                    for b in &bs {
                        b.flush()?;
                    }
                    Ok(())
                })
                .await?;
                let mut done = Vec::new();
                disk::write_done(&mut done).map_err(|e| e.to_string())?;
                return Ok(peer.write_all(&done).await?);
            }
        }
    }
}

async fn blocking(
    f: impl FnOnce() -> Result<(), vireo_block::BlockError> + Send + 'static,
) -> Result<(), CopyFailure> {
    match tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
    {
        Ok(()) => Ok(()),
        Err(vireo_block::BlockError::Io(e))
            if e.raw_os_error() == Some(libc::ENOSPC)
                || e.kind() == std::io::ErrorKind::StorageFull =>
        {
            Err(CopyFailure::NoSpace)
        }
        Err(e) => Err(CopyFailure::Other(format!("writing a disk copy: {e}"))),
    }
}
