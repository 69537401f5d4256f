//! The file work of export, import and clone: a disk's chain as files, copies that keep holes,
//! report progress and stop on cancel, and parent locators rewritten to the copies.
//! Everything here blocks (called from `spawn_blocking`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vireo_vhdx::convert::Format;
use vireo_vhdx::{OpenOptions as VhdxOpen, Rebase, Vhdx};

const CHUNK: usize = 1 << 20;

/// Test hook: a delay per copied MiB, so tests can kill or cancel an export mid-copy.
pub const DELAY_ENV: &str = "VIREOD_TEST_COPY_DELAY_MS";

/// The files of the disk at `path`: itself, then each parent (VHDX differencing chains). A
/// differencing VHD is refused (convert it to VHDX first); raw and VHD are one file.
pub fn chain(path: &Path) -> Result<Vec<PathBuf>, String> {
    let format = Format::detect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match format {
        Format::Raw => Ok(vec![path.to_owned()]),
        Format::Vhd => {
            let vhd = vireo_vhdx::vhd::Vhd::open(path, true)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if vhd.disk_type() == vireo_vhdx::vhd::DiskType::Differencing {
                return Err(format!(
                    "{} is a differencing VHD, which export does not follow; convert it to VHDX \
                     first (vireo disk convert)",
                    path.display()
                ));
            }
            Ok(vec![path.to_owned()])
        }
        Format::Vhdx => {
            let mut out = vec![path.to_owned()];
            let mut at = path.to_owned();
            while out.len() <= vireo_vhdx::MAX_CHAIN_DEPTH {
                let disk = Vhdx::open(&at, &VhdxOpen::read_only())
                    .map_err(|e| format!("{}: {e}", at.display()))?;
                match disk.info().parent {
                    Some(p) => {
                        out.push(p.path.clone());
                        at = p.path;
                    }
                    None => return Ok(out),
                }
            }
            Err(format!("{}: parent chain too deep", path.display()))
        }
    }
}

/// Points each copied chain file at the copy of its parent (deepest first, so each parent
/// already resolves to its own copy). Only the locator changes: the copies hold the same data.
pub fn relink(copies: &[PathBuf]) -> Result<(), String> {
    if copies.len() < 2 {
        return Ok(());
    }
    let never = AtomicBool::new(false);
    for i in (0..copies.len() - 1).rev() {
        Vhdx::rebase(
            &copies[i],
            Rebase::Relink(&copies[i + 1]),
            &|_, _| {},
            &never,
        )
        .map_err(|e| format!("relinking {}: {e}", copies[i].display()))?;
    }
    Ok(())
}

/// Why a copy stopped.
#[derive(Debug)]
pub enum CopyError {
    Cancelled,
    Failed(String),
}

impl From<String> for CopyError {
    fn from(s: String) -> Self {
        CopyError::Failed(s)
    }
}

/// Copies `src` to the new file `dst` (refused if it exists) in 1 MiB chunks: all-zero chunks
/// become holes, `done(bytes)` is called per chunk, `cancel` stops it between chunks. The copy
/// is synced before it returns.
pub fn copy_file(
    src: &Path,
    dst: &Path,
    cancel: &AtomicBool,
    done: &mut dyn FnMut(u64),
) -> Result<(), CopyError> {
    let fail = |what: &Path, e: io::Error| CopyError::Failed(format!("{}: {e}", what.display()));
    let delay = std::env::var(DELAY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    let mut from = File::open(src).map_err(|e| fail(src, e))?;
    let len = from.metadata().map_err(|e| fail(src, e))?.len();
    if let Some(dir) = dst.parent() {
        fs::create_dir_all(dir).map_err(|e| fail(dir, e))?;
    }
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| fail(dst, e))?;
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < len {
        if cancel.load(Ordering::SeqCst) {
            return Err(CopyError::Cancelled);
        }
        let n = (len - at).min(CHUNK as u64) as usize;
        from.read_exact(&mut buf[..n]).map_err(|e| fail(src, e))?;
        if buf[..n].iter().all(|&b| b == 0) {
            to.seek(SeekFrom::Current(n as i64))
                .map_err(|e| fail(dst, e))?;
        } else {
            to.write_all(&buf[..n]).map_err(|e| fail(dst, e))?;
        }
        at += n as u64;
        done(n as u64);
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
    }
    to.set_len(len).map_err(|e| fail(dst, e))?;
    to.sync_all().map_err(|e| fail(dst, e))?;
    Ok(())
}

/// Makes the directory entries under `dir` durable (after renames into it).
pub fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Removes a partial folder; a failure is logged (the name marks it as debris anyway).
pub fn remove_partial(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a partial folder");
        }
    }
}

/// `dir/.<name>.<what>-<tag>.partial`: where a folder is built before it is renamed to
/// `dir/<name>`; the name says it is unfinished.
pub fn partial_name(dir: &Path, name: &str, what: &str, tag: &str) -> PathBuf {
    dir.join(format!(".{name}.{what}-{tag}.partial"))
}
