//! The destination side of a storage move: which files to create for one disk, creating them,
//! and which virtual ranges the first pass must copy (docs/storage-migration.md).
//!
//! - raw → a raw file of the same size (sparse: all-zero chunks are not written);
//! - VHDX without a parent, or any VHDX with `flatten` → one new dynamic VHDX;
//! - VHDX chain → the parents copied file by file (sparse), each copy's parent locator
//!   rewritten to the copied parent, and a new empty differencing file on the copied parent in
//!   which the first pass writes only what the old top file held;
//! - VHD → refused (convert it to VHDX first).
//!
//! Every file created is recorded in [`Prepared::created`] as soon as it exists, so a cancel or
//! an error removes exactly those (never a file that was there before).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vireo_block::{BlockBackend, RawFile};
use vireo_vhdx::{CreateOptions, DiskType, Rebase, Vhdx};

use vireo_api::worker::MoveTarget;

use crate::image::Image;

/// One disk's destination, ready for the copy.
pub struct Prepared {
    pub dest: Arc<dyn BlockBackend>,
    pub dest_image: Image,
    /// The top file of the copy (what the VM will use).
    pub dest_path: PathBuf,
    /// Files this move created, to delete if it does not finish.
    pub created: Vec<PathBuf>,
    /// The disk's files now (top first): deleted after the switch.
    pub old_files: Vec<PathBuf>,
    /// Virtual ranges the first pass copies.
    pub initial: Vec<(u64, u64)>,
    /// The destination reads as zeroes where nothing was written (no parent), so the first
    /// pass may skip all-zero chunks.
    pub skip_zeroes: bool,
    /// Bytes already copied file by file (parents).
    pub file_bytes: u64,
}

fn io_err(what: &str, path: &Path, e: impl std::fmt::Display) -> String {
    format!("{what} {}: {e}", path.display())
}

/// `dir/<file name of src>`, refused when it exists.
fn dest_for(src: &Path, dir: &Path) -> Result<PathBuf, String> {
    let name = src
        .file_name()
        .ok_or_else(|| format!("disk path {} has no file name", src.display()))?;
    let dest = dir.join(name);
    if dest.exists() {
        return Err(format!(
            "{} exists already; move to another folder or remove it",
            dest.display()
        ));
    }
    Ok(dest)
}

/// Copies file `src` to `dst` (created new), leaving holes where `src` has all-zero chunks.
/// `dst` is pushed to `created` before anything is written.
pub fn copy_file_sparse(
    src: &Path,
    dst: &Path,
    created: &mut Vec<PathBuf>,
    cancel: &AtomicBool,
    progress: &dyn Fn(u64),
) -> Result<u64, String> {
    let from = File::open(src).map_err(|e| io_err("opening", src, e))?;
    let len = from
        .metadata()
        .map_err(|e| io_err("reading", src, e))?
        .len();
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| io_err("creating", dst, e))?;
    created.push(dst.to_path_buf());
    let mut buf = vec![0u8; super::CHUNK as usize];
    let mut pos = 0;
    while pos < len {
        if cancel.load(Ordering::Relaxed) {
            return Err(super::CANCELLED.into());
        }
        let n = (len - pos).min(super::CHUNK) as usize;
        from.read_exact_at(&mut buf[..n], pos)
            .map_err(|e| io_err("reading", src, e))?;
        if buf[..n].iter().any(|&b| b != 0) {
            to.write_all_at(&buf[..n], pos)
                .map_err(|e| io_err("writing", dst, e))?;
        }
        pos += n as u64;
        progress(n as u64);
    }
    to.set_len(len).map_err(|e| io_err("writing", dst, e))?;
    to.sync_all().map_err(|e| io_err("syncing", dst, e))?;
    Ok(len)
}

/// Creates the destination of the disk at `src` (opened as `image`) inside `dir`, or at
/// `target` when vireod chose it.
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    src: &Path,
    image: &Image,
    size: u64,
    dir: &Path,
    flatten: bool,
    target: Option<&MoveTarget>,
    cancel: &AtomicBool,
    progress: &dyn Fn(u64),
) -> Result<Prepared, (String, Vec<PathBuf>)> {
    let mut created = Vec::new();
    if let Some(t) = target {
        return match onto_target(src, image, size, t, &mut created) {
            Ok(p) => Ok(p),
            Err(e) => Err((e, created)),
        };
    }
    match prepare_inner(
        src,
        image,
        size,
        dir,
        flatten,
        cancel,
        progress,
        &mut created,
    ) {
        Ok(p) => Ok(p),
        Err(e) => Err((e, created)),
    }
}

#[allow(clippy::too_many_arguments)]
fn prepare_inner(
    src: &Path,
    image: &Image,
    size: u64,
    dir: &Path,
    flatten: bool,
    cancel: &AtomicBool,
    progress: &dyn Fn(u64),
    created: &mut Vec<PathBuf>,
) -> Result<Prepared, String> {
    match image {
        Image::Vhd(_) => Err(format!(
            "disk {} is a VHD, which cannot be moved live; convert it to VHDX first \
             (vireo disk convert)",
            src.display()
        )),
        Image::Raw => {
            let dest = dest_for(src, dir)?;
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&dest)
                .map_err(|e| io_err("creating", &dest, e))?;
            created.push(dest.clone());
            f.set_len(size).map_err(|e| io_err("sizing", &dest, e))?;
            drop(f);
            let raw = RawFile::open(&dest, false).map_err(|e| io_err("opening", &dest, e))?;
            Ok(Prepared {
                dest: Arc::new(raw),
                dest_image: Image::Raw,
                dest_path: dest,
                created: created.clone(),
                old_files: vec![src.to_path_buf()],
                initial: vec![(0, size)],
                skip_zeroes: true,
                file_bytes: 0,
            })
        }
        Image::Vhdx(v) => {
            let chain = v.chain_paths();
            let extents = v.map().map_err(|e| io_err("mapping", src, e))?;
            if flatten || chain.len() == 1 {
                let dest = dest_for(src, dir)?;
                let opts = CreateOptions {
                    size,
                    disk_type: DiskType::Dynamic,
                    block_size: v.block_size(),
                    logical_sector: v.logical_sector_size(),
                    physical_sector: v.physical_sector_size(),
                    parent: None,
                };
                // Created under a temporary name and renamed complete: on an error nothing
                // is left at `dest`; once it exists, it is ours.
                let new = Vhdx::create(&dest, &opts).map_err(|e| io_err("creating", &dest, e))?;
                created.push(dest.clone());
                let new = Arc::new(new);
                let initial = extents
                    .iter()
                    .filter(|e| e.data)
                    .map(|e| (e.start, e.length))
                    .collect();
                return Ok(Prepared {
                    dest: new.clone(),
                    dest_image: Image::Vhdx(new),
                    dest_path: dest,
                    created: created.clone(),
                    old_files: chain,
                    initial,
                    skip_zeroes: true,
                    file_bytes: 0,
                });
            }
            // The whole chain, file by file; names must not collide in one folder.
            let dests: Vec<PathBuf> = chain
                .iter()
                .map(|p| dest_for(p, dir))
                .collect::<Result<_, _>>()?;
            for (i, d) in dests.iter().enumerate() {
                if dests[..i].contains(d) {
                    return Err(format!(
                        "two files of the chain of {} are named {}; use --flatten",
                        src.display(),
                        d.file_name().unwrap_or_default().to_string_lossy()
                    ));
                }
            }
            let mut file_bytes = 0;
            // Parents are read-only while the VM runs on the chain (a live merge is refused
            // before a move starts), so a plain file copy is consistent.
            for i in (1..chain.len()).rev() {
                file_bytes += copy_file_sparse(&chain[i], &dests[i], created, cancel, progress)?;
            }
            let never = AtomicBool::new(false);
            for i in 1..chain.len() - 1 {
                Vhdx::rebase(&dests[i], Rebase::Relink(&dests[i + 1]), &|_, _| {}, &never)
                    .map_err(|e| io_err("relinking", &dests[i], e))?;
            }
            let mut p = new_top(v, &extents, &dests[0], &dests[1], created)?;
            p.old_files = chain;
            p.file_bytes = file_bytes;
            Ok(p)
        }
    }
}

/// A disk of a VM with checkpoints, onto the target vireod chose. Its parents are frozen
/// files vireod copied and relinked already, so only the running top is made here: a new
/// differencing file on the copied parent, into which the first pass writes what the old top
/// held. No old file is listed: vireod deletes them after recording the move.
fn onto_target(
    src: &Path,
    image: &Image,
    size: u64,
    t: &MoveTarget,
    created: &mut Vec<PathBuf>,
) -> Result<Prepared, String> {
    if t.to.exists() {
        return Err(format!(
            "{} exists already; move to another folder or remove it",
            t.to.display()
        ));
    }
    let (v, parent) = match (image, &t.parent) {
        (Image::Vhdx(v), Some(parent)) if v.chain_paths().len() > 1 => (v, parent),
        (_, Some(_)) => {
            return Err(format!(
                "disk {} has no parent, but the move names one for it; the VM's disks \
                 changed since the move was planned: retry",
                src.display()
            ))
        }
        // No parent: the ordinary copy, at the target's path.
        (_, None) => {
            let dir = t.to.parent().unwrap_or(Path::new("/"));
            let mut p = prepare_inner(
                src,
                image,
                size,
                dir,
                false,
                &AtomicBool::new(false),
                &|_| {},
                created,
            )?;
            if p.dest_path != t.to {
                return Err(format!(
                    "disk {} would be copied to {}, not {}",
                    src.display(),
                    p.dest_path.display(),
                    t.to.display()
                ));
            }
            p.old_files.clear();
            return Ok(p);
        }
    };
    let extents = v.map().map_err(|e| io_err("mapping", src, e))?;
    new_top(v, &extents, &t.to, parent, created)
}

/// The copy's running top: an empty differencing file at `to` over `parent` (a copy of the
/// source's parent), whose first pass copies what the source's own top holds (depth 0).
fn new_top(
    v: &Vhdx,
    extents: &[vireo_vhdx::Extent],
    to: &Path,
    parent: &Path,
    created: &mut Vec<PathBuf>,
) -> Result<Prepared, String> {
    let opts = CreateOptions {
        disk_type: DiskType::Differencing,
        block_size: v.block_size(),
        parent: Some(parent.to_path_buf()),
        ..Default::default()
    };
    let new = Arc::new(Vhdx::create(to, &opts).map_err(|e| io_err("creating", to, e))?);
    created.push(to.to_path_buf());
    let initial = extents
        .iter()
        .filter(|e| e.depth == Some(0))
        .map(|e| (e.start, e.length))
        .collect();
    Ok(Prepared {
        dest: new.clone(),
        dest_image: Image::Vhdx(new),
        dest_path: to.to_path_buf(),
        created: created.clone(),
        old_files: Vec::new(),
        initial,
        skip_zeroes: false,
        file_bytes: 0,
    })
}

/// Deletes files a move created (best effort, each named in the log).
pub fn remove_created(files: &[PathBuf]) {
    for f in files.iter().rev() {
        match std::fs::remove_file(f) {
            Ok(()) => tracing::info!("move storage: removed partial {}", f.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("move storage: cannot remove {}: {e}", f.display()),
        }
    }
}
