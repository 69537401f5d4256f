//! `vireo run --control PATH` and a worker's `control.sock`: a Unix socket for operating on a
//! running VM's disks, one command per line, answers as lines (protocol in [`PROTOCOL`], shown
//! by `vireo run --help`).
//!
//! A resize (`disk-resize N SIZE`) changes the disk under the running guest and tells its
//! driver through the virtio-blk device's [`BlockResizer`] (kept here beside each disk): the
//! transport raises a configuration-change interrupt and bumps ConfigGeneration, and the driver
//! re-reads `capacity`. A live merge keeps the child's size (the parent takes it before the
//! copy), so the guest sees no size change at the pivot; the driver is told anyway if the size
//! reported after the pivot differs.
//!
//! Long operations (a live merge) run in a thread of their own: the connection that started
//! one streams its progress, but closing it does not stop the merge; `disk-merge-cancel N`
//! does. When the VM stops, running merges are cancelled (both files stay valid and a later
//! merge resumes) and the control's references to the disks are dropped so they close cleanly.
//!
//! Locks: `Shared`'s three mutexes are parking_lot's, which do not poison: a connection thread
//! that panics must not turn every later command into a panic too. Each is held only to copy a
//! value out or update the map, never across socket I/O, and never two at once.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use vireo_block::BlockBackend;
use vireo_vhdx::vhd::{DiskType as VhdType, Vhd};
use vireo_vhdx::VhdxError;
use vireo_virtio::block::BlockResizer;

use vireo_vmm::{AfterSave, LiveSaveOptions, SaveReport};

use crate::error::WorkerError;
use crate::image::{vhd_chain_depth, Image};
use crate::size::parse_size;

pub const PROTOCOL: &str = "\
Control socket (--control PATH): a Unix stream socket; send one command per line.
  disks                  one JSON object per disk ({\"index\",\"path\",\"format\",\"virtual_size\",
                         \"read_only\",\"chain_depth\"}), then \"ok\"
  disk-merge N           merges VHDX disk N (a differencing disk) into its parent while the guest
                         keeps running: lines \"progress DONE TOTAL\" (bytes examined and copied;
                         TOTAL starts at the disk size and grows when the guest rewrites copied
                         data), then \"ok NEW-PATH\" (the parent, now in use; the child file is
                         deleted) or \"error MESSAGE\"
  disk-merge-cancel N    stops a running merge of disk N: \"ok\" here, and the merge's own
                         connection gets \"error ... cancelled\"; the guest stays on the
                         child, and a later disk-merge resumes
  disk-resize N SIZE     grows or shrinks disk N while the guest runs (SIZE in bytes or with a
                         K/M/G/T suffix, a multiple of 512): \"ok NEW-SIZE\" (bytes) and the
                         guest gets a config-change interrupt; a VHDX or dynamic VHD shrink
                         that would drop data, a fixed VHD shrink (no allocation map to prove
                         the tail empty), a dynamic VHD grown past its block table, a read-only
                         disk or a disk being merged answer \"error MESSAGE\" (a raw shrink
                         drops the file's tail)
  save DIR               saves the VM into directory DIR (an absolute path without spaces;
                         created if missing) and stops it: memory (memory.bin) is written while
                         the guest runs, then the VM is paused for the last dirty pages and its
                         complete device state (vm.state), then it stops (\"ok DIR rounds=N
                         written_mib=N pause_ms=X total_ms=N\"); `vireo run --restore DIR` with
                         the same options continues it. A failed save answers \"error MESSAGE\"
                         and the VM runs on as before
  snapshot DIR           the same, but the VM runs on afterwards (pause_ms is what the guest
                         saw)
  help                   this list, then \"ok\"
An unknown command answers \"error unknown command ...\" with the list; a known one with wrong
arguments answers \"error\" with what was wrong and its usage. A merge goes on if its connection
closes.";

/// Longest command line accepted.
const MAX_LINE: u64 = 4096;
/// Progress lines are sent at most this often (plus the last one).
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// One disk of the VM as the control socket sees it.
pub struct ControlDisk {
    /// The path given on the command line.
    pub path: PathBuf,
    pub read_only: bool,
    pub size: u64,
    /// The image the VM does its I/O through (the same object), by format.
    pub image: Image,
    /// The disk's virtio-blk device's handle for telling the guest about size changes (None
    /// only in tests without a device).
    pub resizer: Option<BlockResizer>,
}

struct Shared {
    /// Emptied at shutdown, so the disks close when the VM lets go of them.
    disks: Mutex<Vec<ControlDisk>>,
    /// Cancel flags of running merges, by disk index.
    merges: Mutex<HashMap<usize, Arc<AtomicBool>>>,
    /// A storage move runs (`move_storage`): merges are refused meanwhile. Set and read
    /// under the `merges` lock, so a move and a merge never both start.
    moving: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The VM, for `save` (absent until [`ControlServer::attach_vm`]).
    vm: Mutex<Option<vireo_vmm::VmHandle>>,
    /// Where `save` put the VM, once it has.
    saved_to: Mutex<Option<PathBuf>>,
}

impl Shared {
    fn new(disks: Vec<ControlDisk>) -> Arc<Shared> {
        Arc::new(Shared {
            disks: Mutex::new(disks),
            merges: Mutex::default(),
            moving: AtomicBool::new(false),
            threads: Mutex::default(),
            vm: Mutex::default(),
            saved_to: Mutex::default(),
        })
    }
}

/// The listening control socket; [`ControlServer::shutdown`] when the VM has stopped.
pub struct ControlServer {
    path: PathBuf,
    shared: Arc<Shared>,
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket nobody listens on) and starts serving.
    pub fn start(path: &Path, disks: Vec<ControlDisk>) -> Result<ControlServer, WorkerError> {
        let bad = |source| WorkerError::ControlSocket {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(WorkerError::ControlSocketNotSocket {
                    path: path.to_path_buf(),
                });
            }
            if UnixStream::connect(path).is_ok() {
                return Err(WorkerError::ControlSocketInUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(bad)?;
        }
        let listener = UnixListener::bind(path).map_err(bad)?;
        let shared = Shared::new(disks);
        let s = shared.clone();
        std::thread::Builder::new()
            .name("vireo-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let s = s.clone();
                    let _ = std::thread::Builder::new()
                        .name("vireo-control-conn".into())
                        .spawn(move || serve(&s, conn));
                }
            })
            .map_err(WorkerError::ControlThread)?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            shared,
        })
    }

    /// A handle on the disk list, for hot add and remove (`hotplug.rs`).
    pub fn disks(&self) -> ControlDisks {
        ControlDisks(self.shared.clone())
    }

    /// Lets `save` reach the VM.
    pub fn attach_vm(&self, vm: vireo_vmm::VmHandle) {
        *self.shared.vm.lock() = Some(vm);
    }

    /// The directory a `save` wrote the VM to (the VM then stopped), if one did.
    pub fn saved_to(&self) -> Option<PathBuf> {
        self.shared.saved_to.lock().clone()
    }

    /// Cancels running merges, waits for them, drops the control's disk references and
    /// removes the socket.
    pub fn shutdown(self) {
        for cancel in self.shared.merges.lock().values() {
            cancel.store(true, Ordering::Relaxed);
        }
        let threads = std::mem::take(&mut *self.shared.threads.lock());
        for t in threads {
            let _ = t.join();
        }
        self.shared.disks.lock().clear();
        self.shared.vm.lock().take();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The control socket's disk list as hot add and remove change it. Merges are tracked by
/// disk index, so neither may happen while one runs (the indices would shift under it).
#[derive(Clone)]
pub struct ControlDisks(Arc<Shared>);

impl ControlDisks {
    /// Refuses when a live merge is running.
    pub fn check_idle(&self) -> Result<(), String> {
        match self.0.merges.lock().keys().next() {
            Some(i) => Err(format!(
                "a live merge of disk {i} is running; wait for it or cancel it \
                 (disk-merge-cancel {i} on control.sock)"
            )),
            None => Ok(()),
        }
    }

    /// A storage move starts: refused while a live merge runs; merges are refused until
    /// [`Self::end_move`].
    pub fn begin_move(&self) -> Result<(), String> {
        let merges = self.0.merges.lock();
        if let Some(i) = merges.keys().next() {
            return Err(format!(
                "a live merge of disk {i} is running; the move is refused (wait for the merge                  or cancel it: disk-merge-cancel {i} on control.sock)"
            ));
        }
        self.0.moving.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub fn end_move(&self) {
        let _merges = self.0.merges.lock();
        self.0.moving.store(false, Ordering::SeqCst);
    }

    /// Puts `disk` at `index` (the end if past it).
    pub fn insert(&self, index: usize, disk: ControlDisk) {
        let mut disks = self.0.disks.lock();
        let at = index.min(disks.len());
        disks.insert(at, disk);
    }

    /// Points disk `index` at its new file after a storage move switched it (`move_storage`):
    /// live merge and resize then act on the image the VM now uses.
    pub fn retarget(&self, index: usize, path: PathBuf, image: Image) {
        if let Some(d) = self.0.disks.lock().get_mut(index) {
            d.path = path;
            d.image = image;
        }
    }

    /// Drops disk `index` (its image reference goes with it).
    pub fn remove(&self, index: usize) {
        let mut disks = self.0.disks.lock();
        if index < disks.len() {
            disks.remove(index);
        }
    }
}

/// Answers one connection's commands until it closes.
fn serve(s: &Arc<Shared>, conn: UnixStream) {
    let Ok(out) = conn.try_clone() else { return };
    let mut out = out;
    let mut input = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match (&mut input).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE => {
                let _ = writeln!(out, "error command longer than {MAX_LINE} bytes");
                return;
            }
            Ok(_) => {}
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let r = match parse_command(&words) {
            Ok(None) => Ok(()),
            Err(e) => writeln!(out, "error {e}"),
            Ok(Some(Command::Help)) => writeln!(out, "{PROTOCOL}\nok"),
            Ok(Some(Command::Disks)) => list_disks(s, &mut out),
            Ok(Some(Command::Merge(n))) => match disk_index(s, n) {
                Ok(i) => merge(s, i, &mut out),
                Err(e) => writeln!(out, "error {e}"),
            },
            Ok(Some(Command::Resize(n, size))) => match disk_index(s, n) {
                Ok(i) => match resize(s, i, size) {
                    Ok(new_size) => writeln!(out, "ok {new_size}"),
                    Err(e) => writeln!(out, "error {e}"),
                },
                Err(e) => writeln!(out, "error {e}"),
            },
            Ok(Some(Command::Save(dir, then))) => match save(s, dir, then) {
                Ok((dir, r)) => writeln!(
                    out,
                    "ok {} rounds={} written_mib={} pause_ms={:.1} total_ms={}",
                    dir.display(),
                    r.rounds,
                    r.bytes_written >> 20,
                    r.pause.as_secs_f64() * 1e3,
                    r.total.as_millis()
                ),
                Err(e) => writeln!(out, "error {e}"),
            },
            Ok(Some(Command::MergeCancel(n))) => match disk_index(s, n) {
                Ok(i) => match s.merges.lock().get(&i).cloned() {
                    Some(c) => {
                        c.store(true, Ordering::Relaxed);
                        writeln!(out, "ok")
                    }
                    None => writeln!(out, "error no merge of disk {i} is running"),
                },
                Err(e) => writeln!(out, "error {e}"),
            },
        };
        if r.is_err() {
            return;
        }
    }
}

/// One command line, its arguments not yet checked against the VM.
#[derive(Debug, PartialEq, Eq)]
enum Command<'a> {
    Help,
    Disks,
    Merge(&'a str),
    MergeCancel(&'a str),
    Resize(&'a str, &'a str),
    Save(&'a str, AfterSave),
}

/// Each command's usage, as the error for wrong arguments shows it.
const USAGE: &[(&str, &str)] = &[
    ("disks", "disks"),
    ("disk-merge", "disk-merge N"),
    ("disk-merge-cancel", "disk-merge-cancel N"),
    ("disk-resize", "disk-resize N SIZE"),
    ("save", "save DIR"),
    ("snapshot", "snapshot DIR"),
    ("help", "help"),
];

/// Splits a command line into a command; `None` for a blank line. A known command with the
/// wrong number of arguments says so with its usage, not "unknown command".
fn parse_command<'a>(words: &[&'a str]) -> Result<Option<Command<'a>>, String> {
    let Some((&name, args)) = words.split_first() else {
        return Ok(None);
    };
    let command = match (name, args) {
        ("help", []) => Command::Help,
        ("disks", []) => Command::Disks,
        ("disk-merge", [n]) => Command::Merge(n),
        ("disk-merge-cancel", [n]) => Command::MergeCancel(n),
        ("disk-resize", [n, size]) => Command::Resize(n, size),
        ("save", [dir]) => Command::Save(dir, AfterSave::StayPaused),
        ("snapshot", [dir]) => Command::Save(dir, AfterSave::Resume),
        _ => {
            let Some((_, usage)) = USAGE.iter().find(|(known, _)| *known == name) else {
                let all: Vec<&str> = USAGE.iter().map(|(_, u)| *u).collect();
                return Err(format!(
                    "unknown command '{name}' (commands: {})",
                    all.join(", ")
                ));
            };
            let wanted = usage.split(' ').count() - 1;
            return Err(format!(
                "{name} takes {wanted} argument{} but got {}: usage: {usage}",
                if wanted == 1 { "" } else { "s" },
                args.len()
            ));
        }
    };
    Ok(Some(command))
}

/// Pauses the VM, writes memory and state into `dir`, and stops it. On an error the VM runs
/// on as it did before (docs/vm-state.md).
/// `save DIR` (`then` = stay paused, and the VM stops) or `snapshot DIR` (`then` = resume):
/// a live save (docs/vm-state.md, "Live save"); the line answered carries the report.
fn save(s: &Shared, dir: &str, then: AfterSave) -> Result<(PathBuf, SaveReport), String> {
    let what = match then {
        AfterSave::StayPaused => "save",
        AfterSave::Resume => "snapshot",
    };
    let dir = PathBuf::from(dir);
    if !dir.is_absolute() {
        return Err(format!(
            "{what} needs an absolute directory path, not '{}'",
            dir.display()
        ));
    }
    let Some(vm) = s.vm.lock().clone() else {
        return Err(format!(
            "this VM cannot be saved from here (no VM attached) ({what})"
        ));
    };
    if let Some(i) = s.merges.lock().keys().next() {
        return Err(format!(
            "disk {i} is being merged; wait for the merge or cancel it, then {what}"
        ));
    }
    let opts = LiveSaveOptions {
        then,
        ..Default::default()
    };
    // A failed live save leaves the VM as it was (running, or paused).
    match vm.save_live(&dir, vireo_vmm::state::Identity::default(), None, &opts) {
        Ok(report) => {
            if then == AfterSave::StayPaused {
                *s.saved_to.lock() = Some(dir.clone());
                vm.request_stop();
            }
            Ok((dir, report))
        }
        Err(e) => Err(format!("{what} to {}: {e}; the VM runs on", dir.display())),
    }
}

fn disk_index(s: &Shared, n: &str) -> Result<usize, String> {
    let count = s.disks.lock().len();
    match n.parse::<usize>() {
        Ok(i) if i < count => Ok(i),
        _ => Err(format!(
            "no disk '{n}' (the VM has {count} disk(s), numbered from 0 as on the command line)"
        )),
    }
}

fn list_disks(s: &Shared, out: &mut UnixStream) -> std::io::Result<()> {
    let mut text = String::new();
    for (i, d) in s.disks.lock().iter().enumerate() {
        let size = d.resizer.as_ref().map_or(d.size, |r| r.size());
        let (path, size, depth) = match &d.image {
            Image::Vhdx(v) => (tidy(&v.path()), v.virtual_size(), v.chain_depth()),
            Image::Vhd(v) => (d.path.clone(), size, vhd_chain_depth(v)),
            Image::Raw => (d.path.clone(), size, 1),
        };
        let line = serde_json::json!({
            "index": i,
            "path": path,
            "format": d.image.format().name(),
            "virtual_size": size,
            "read_only": d.read_only,
            "chain_depth": depth,
        });
        text.push_str(&format!("{line}\n"));
    }
    writeln!(out, "{text}ok")
}

/// Resizes disk `i` to `size` (text as typed) and tells the guest; returns the new size.
fn resize(s: &Shared, i: usize, size: &str) -> Result<u64, String> {
    let new_size = parse_size(size)?;
    if new_size == 0 || !new_size.is_multiple_of(512) {
        return Err(format!(
            "size {new_size} is not a positive multiple of 512 bytes"
        ));
    }
    let (image, resizer, shown, read_only) = {
        let disks = s.disks.lock();
        let d = &disks[i];
        (
            d.image.clone(),
            d.resizer.clone(),
            d.path.display().to_string(),
            d.read_only,
        )
    };
    let fail = |msg: String| format!("disk {i} ({shown}): {msg}");
    if read_only {
        return Err(fail("the disk is read-only".into()));
    }
    let Some(resizer) = resizer else {
        return Err(fail("this disk has no device to resize".into()));
    };
    match image {
        // Through Vhdx itself for its own error messages (a shrink over data says where the
        // data is); the device reads the new size from the same object.
        Image::Vhdx(v) => {
            v.resize(new_size, false).map_err(|e| match e {
                VhdxError::ShrinkOverData { data_at, .. } => fail(format!(
                    "shrinking to {new_size} would drop data at virtual offset {data_at}; \
                     choose a size above it"
                )),
                e => fail(e.to_string()),
            })?;
            resizer
                .size_changed()
                .map_err(|e| fail(format!("resized, but the guest was not told: {e}")))?;
        }
        Image::Vhd(v) => {
            if new_size < v.size() {
                vhd_shrink_keeps_data(&v, new_size).map_err(fail)?;
            }
            resizer.resize(new_size).map_err(|e| fail(e.to_string()))?
        }
        Image::Raw => resizer.resize(new_size).map_err(|e| fail(e.to_string()))?,
    }
    Ok(resizer.size())
}

/// The VHD reader shrinks without looking; the guest's data must not go with the tail. A
/// dynamic disk's block map says where data may be; a fixed disk has none to ask.
fn vhd_shrink_keeps_data(v: &Vhd, new_size: u64) -> Result<(), String> {
    if v.disk_type() == VhdType::Fixed {
        return Err(
            "a fixed VHD has no allocation map to show its tail is empty, so it is not \
                    shrunk online; shrink it with the VM stopped (vireo disk resize --force)"
                .into(),
        );
    }
    match v
        .allocated_ranges()
        .iter()
        .find(|(at, len)| at + len > new_size)
    {
        Some(&(at, _)) => Err(format!(
            "shrinking to {new_size} would drop data at virtual offset {}; choose a size \
             above it",
            at.max(new_size)
        )),
        None => Ok(()),
    }
}

enum MergeEvent {
    Progress(u64, u64),
    Done(Result<PathBuf, vireo_vhdx::VhdxError>),
}

/// Starts a live merge of disk `i` in its own thread and streams its progress to `out`.
fn merge(s: &Arc<Shared>, i: usize, out: &mut UnixStream) -> std::io::Result<()> {
    let (image, resizer, shown) = {
        let disks = s.disks.lock();
        let d = &disks[i];
        (
            d.image.clone(),
            d.resizer.clone(),
            d.path.display().to_string(),
        )
    };
    let vhdx = match image {
        Image::Vhdx(v) => v,
        Image::Vhd(_) => {
            return writeln!(
                out,
                "error disk {i} ({shown}) is a VHD image; only VHDX disks can be merged while \
                 the VM runs (stop it and convert the chain: vireo disk convert)"
            )
        }
        Image::Raw => {
            return writeln!(
                out,
                "error disk {i} ({shown}) is a raw image; only VHDX disks can be merged"
            )
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let mut merges = s.merges.lock();
        if s.moving.load(Ordering::SeqCst) {
            return writeln!(
                out,
                "error a storage move of this VM is running; merge disk {i} after it"
            );
        }
        if merges.contains_key(&i) {
            return writeln!(out, "error a merge of disk {i} is already running");
        }
        merges.insert(i, cancel.clone());
    }
    let (tx, rx) = mpsc::channel();
    let s2 = s.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("vireo-merge-{i}"))
        .spawn(move || {
            let progress_tx = tx.clone();
            let size_before = vhdx.virtual_size();
            let r = vhdx.merge_live(
                &move |done, total| {
                    let _ = progress_tx.send(MergeEvent::Progress(done, total));
                },
                &cancel,
            );
            // The merged disk keeps the child's size; should that ever change, the guest is told.
            if let (Ok(_), Some(resizer)) = (&r, &resizer) {
                if vhdx.virtual_size() != size_before {
                    if let Err(e) = resizer.size_changed() {
                        tracing::warn!(
                            "disk {i}: merged, but the guest was not told its new size: {e}"
                        );
                    }
                }
            }
            s2.merges.lock().remove(&i);
            let _ = tx.send(MergeEvent::Done(r));
        });
    match spawned {
        Ok(t) => s.threads.lock().push(t),
        Err(e) => {
            s.merges.lock().remove(&i);
            return writeln!(out, "error cannot start the merge thread: {e}");
        }
    }
    let mut last_sent = Instant::now() - PROGRESS_EVERY;
    loop {
        match rx.recv() {
            Ok(MergeEvent::Progress(done, total)) => {
                if last_sent.elapsed() >= PROGRESS_EVERY || done == total {
                    last_sent = Instant::now();
                    writeln!(out, "progress {done} {total}")?;
                }
            }
            Ok(MergeEvent::Done(Ok(path))) => return writeln!(out, "ok {}", tidy(&path).display()),
            Ok(MergeEvent::Done(Err(e))) => {
                let msg = e.to_string().replace('\n', " ");
                return writeln!(out, "error disk {i} ({shown}): {msg}");
            }
            Err(_) => return writeln!(out, "error the merge thread stopped unexpectedly"),
        }
    }
}

/// `path` without `.` components (parents found through a relative locator look like
/// `dir/./base.vhdx`).
fn tidy(path: &Path) -> PathBuf {
    path.components().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_vhdx::vhd::VhdCreateOptions;
    use vireo_vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

    /// base.vhdx with data under child.avhdx with data of its own, the child opened.
    fn chain(dir: &Path) -> (PathBuf, PathBuf, Arc<Vhdx>) {
        let base = dir.join("base.vhdx");
        let child = dir.join("child.avhdx");
        let o = CreateOptions {
            size: 16 << 20,
            block_size: 1 << 20,
            ..Default::default()
        };
        let b = Vhdx::create(&base, &o).unwrap();
        b.write(&[1; 1 << 20], 0).unwrap();
        drop(b);
        let o = CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(base.clone()),
            ..Default::default()
        };
        let c = Vhdx::create(&child, &o).unwrap();
        c.write(&[2; 4096], 8192).unwrap();
        drop(c);
        let d = Arc::new(Vhdx::open(&child, &OpenOptions::default()).unwrap());
        (base, child, d)
    }

    fn disk(path: &Path, vhdx: &Arc<Vhdx>) -> ControlDisk {
        ControlDisk {
            path: path.to_path_buf(),
            read_only: false,
            size: vhdx.virtual_size(),
            image: Image::Vhdx(vhdx.clone()),
            resizer: None,
        }
    }

    fn next(lines: &mut impl BufRead) -> String {
        let mut l = String::new();
        lines.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    }

    /// A connection served by `serve` on its own thread, and a line reader for its answers.
    fn connected(
        shared: &Arc<Shared>,
    ) -> (
        UnixStream,
        BufReader<UnixStream>,
        std::thread::JoinHandle<()>,
    ) {
        let (conn, server) = UnixStream::pair().unwrap();
        let s = shared.clone();
        let serving = std::thread::spawn(move || serve(&s, server));
        let lines = BufReader::new(conn.try_clone().unwrap());
        (conn, lines, serving)
    }

    fn ask(conn: &mut UnixStream, lines: &mut impl BufRead, cmd: &str) -> String {
        writeln!(conn, "{cmd}").unwrap();
        next(lines)
    }

    #[test]
    fn lists_merges_and_refuses_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let (base, child, d) = chain(dir.path());
        let shared = Shared::new(vec![disk(&child, &d)]);
        let (mut conn, mut lines, serving) = connected(&shared);
        let listed = ask(&mut conn, &mut lines, "disks");
        let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
        assert_eq!(v["chain_depth"], 2, "{listed}");
        assert_eq!(v["format"], "vhdx", "{listed}");
        assert_eq!(next(&mut lines), "ok");
        assert!(ask(&mut conn, &mut lines, "frobnicate 3").starts_with("error unknown command"));
        assert!(ask(&mut conn, &mut lines, "disk-merge x").starts_with("error no disk 'x'"));
        assert!(ask(&mut conn, &mut lines, "disk-merge 1").starts_with("error no disk '1'"));
        // A writer keeps going during the merge, as a guest would.
        let stop = Arc::new(AtomicBool::new(false));
        let (d2, stop2) = (d.clone(), stop.clone());
        let writer = std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop2.load(Ordering::Relaxed) && i < 100_000 {
                d2.write(&[3; 512], (i % 64) * 512 + (4 << 20)).unwrap();
                i += 1;
            }
        });
        writeln!(conn, "disk-merge 0").unwrap();
        let end = loop {
            let l = next(&mut lines);
            if !l.starts_with("progress ") {
                break l;
            }
        };
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert_eq!(end, format!("ok {}", base.display()));
        assert!(!child.exists());
        let again = ask(&mut conn, &mut lines, "disk-merge 0");
        assert!(again.contains("is not a differencing disk"), "{again}");
        assert_eq!(
            ask(&mut conn, &mut lines, "disk-merge-cancel 0"),
            "error no merge of disk 0 is running"
        );
        // The server answers and hangs up mid-line, so the end of this write may fail.
        let _ = writeln!(conn, "{}", "x".repeat(MAX_LINE as usize + 10));
        assert!(next(&mut lines).starts_with("error command longer"));
        drop(conn);
        serving.join().unwrap();
        let mut got = vec![0u8; 4096];
        d.read(&mut got, 8192).unwrap();
        assert_eq!(got, vec![2; 4096]);
        d.read(&mut got, 4 << 20).unwrap();
        assert_eq!(got, vec![3; 4096]);
    }

    #[test]
    fn resizes_vhdx_and_raw_disks_and_refuses_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let vpath = dir.path().join("d.vhdx");
        let o = CreateOptions {
            size: 16 << 20,
            block_size: 1 << 20,
            ..Default::default()
        };
        let v = Arc::new(Vhdx::create(&vpath, &o).unwrap());
        v.write(&[7; 4096], 10 << 20).unwrap();
        let rpath = dir.path().join("d.raw");
        std::fs::File::create(&rpath)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let raw: Arc<dyn vireo_block::BlockBackend> =
            Arc::new(vireo_block::RawFile::open(&rpath, false).unwrap());
        let vblock = vireo_virtio::Block::new(v.clone());
        let rblock = vireo_virtio::Block::new(raw.clone());
        let mut vdisk = disk(&vpath, &v);
        vdisk.resizer = Some(vblock.resizer());
        let rdisk = ControlDisk {
            path: rpath.clone(),
            read_only: false,
            size: raw.size(),
            image: Image::Raw,
            resizer: Some(rblock.resizer()),
        };
        let shared = Shared::new(vec![vdisk, rdisk]);
        let (mut conn, mut lines, serving) = connected(&shared);
        assert_eq!(
            ask(&mut conn, &mut lines, "disk-resize 0 32M"),
            "ok 33554432"
        );
        assert_eq!(v.virtual_size(), 32 << 20);
        let refused = ask(&mut conn, &mut lines, "disk-resize 0 8M");
        assert!(
            refused.contains("would drop data at virtual offset"),
            "{refused}"
        );
        assert_eq!(v.virtual_size(), 32 << 20);
        assert_eq!(
            ask(&mut conn, &mut lines, "disk-resize 0 11M"),
            "ok 11534336"
        );
        assert_eq!(ask(&mut conn, &mut lines, "disk-resize 1 3m"), "ok 3145728");
        assert_eq!(std::fs::metadata(&rpath).unwrap().len(), 3 << 20);
        let listed = ask(&mut conn, &mut lines, "disks");
        assert!(listed.contains("\"virtual_size\":11534336"), "{listed}");
        let listed = next(&mut lines);
        assert!(listed.contains("\"virtual_size\":3145728"), "{listed}");
        assert_eq!(next(&mut lines), "ok");
        for (cmd, want) in [
            ("disk-resize 1 0", "multiple of 512"),
            ("disk-resize 1 513", "multiple of 512"),
            ("disk-resize 1 huge", "error invalid size"),
            ("disk-resize 2 1M", "error no disk '2'"),
            ("disk-resize 1", "usage: disk-resize N SIZE"),
        ] {
            let got = ask(&mut conn, &mut lines, cmd);
            assert!(
                got.starts_with("error") && got.contains(want),
                "{cmd}: {got}"
            );
        }
        shared.disks.lock()[1].read_only = true;
        let got = ask(&mut conn, &mut lines, "disk-resize 1 4M");
        assert!(got.contains("read-only"), "{got}");
        // Both ends of the client's socket must close for the server to see the end.
        drop(lines);
        drop(conn);
        serving.join().unwrap();
        let mut got = vec![0u8; 4096];
        v.read(&mut got, 10 << 20).unwrap();
        assert_eq!(got, vec![7; 4096]);
    }

    #[test]
    fn wrong_arguments_to_a_known_command_say_what_is_wrong() {
        assert_eq!(parse_command(&[]), Ok(None));
        assert_eq!(parse_command(&["disks"]), Ok(Some(Command::Disks)));
        assert_eq!(
            parse_command(&["disk-resize", "0", "1G"]),
            Ok(Some(Command::Resize("0", "1G")))
        );
        for (words, want) in [
            (
                &["disk-resize", "0"][..],
                "disk-resize takes 2 arguments but got 1: usage: disk-resize N SIZE",
            ),
            (
                &["disks", "extra"][..],
                "disks takes 0 arguments but got 1: usage: disks",
            ),
            (
                &["disk-merge"][..],
                "disk-merge takes 1 argument but got 0: usage: disk-merge N",
            ),
            (
                &["disk-merge-cancel", "0", "1"][..],
                "disk-merge-cancel takes 1 argument but got 2: usage: disk-merge-cancel N",
            ),
            (
                &["help", "me"][..],
                "help takes 0 arguments but got 1: usage: help",
            ),
        ] {
            assert_eq!(parse_command(words), Err(want.to_string()), "{words:?}");
        }
        let unknown = parse_command(&["frobnicate", "3"]).unwrap_err();
        assert!(
            unknown.starts_with("unknown command 'frobnicate'"),
            "{unknown}"
        );
        assert!(unknown.contains("disk-resize N SIZE"), "{unknown}");
        // Through a connection, the same words.
        let shared = Shared::new(vec![]);
        let (mut conn, mut lines, serving) = connected(&shared);
        assert_eq!(
            ask(&mut conn, &mut lines, "disks extra"),
            "error disks takes 0 arguments but got 1: usage: disks"
        );
        assert!(ask(&mut conn, &mut lines, "disk-resize 0").ends_with("usage: disk-resize N SIZE"));
        assert_eq!(
            parse_command(&["save", "/srv/vm1"]),
            Ok(Some(Command::Save("/srv/vm1", AfterSave::StayPaused)))
        );
        assert!(ask(&mut conn, &mut lines, "save").ends_with("usage: save DIR"));
        // Refused before any VM is touched: a relative path, and a control without a VM.
        assert_eq!(
            ask(&mut conn, &mut lines, "save rel/dir"),
            "error save needs an absolute directory path, not 'rel/dir'"
        );
        assert!(ask(&mut conn, &mut lines, "save /tmp/x").contains("no VM attached"));
        drop(lines);
        drop(conn);
        serving.join().unwrap();
    }

    #[test]
    fn a_thread_that_panics_holding_a_lock_does_not_break_later_commands() {
        let dir = tempfile::tempdir().unwrap();
        let (_base, child, d) = chain(dir.path());
        let shared = Shared::new(vec![disk(&child, &d)]);
        let s = shared.clone();
        let panicked = std::thread::spawn(move || {
            let _disks = s.disks.lock();
            let _merges = s.merges.lock();
            panic!("a connection thread fails while holding the locks");
        })
        .join();
        assert!(panicked.is_err());
        // Both locks are taken again by the commands below.
        let (mut conn, mut lines, serving) = connected(&shared);
        let listed = ask(&mut conn, &mut lines, "disks");
        assert!(listed.contains("\"chain_depth\":2"), "{listed}");
        assert_eq!(next(&mut lines), "ok");
        assert_eq!(
            ask(&mut conn, &mut lines, "disk-merge-cancel 0"),
            "error no merge of disk 0 is running"
        );
        drop(lines);
        drop(conn);
        serving.join().unwrap();
    }

    #[test]
    fn vhd_disks_list_as_vhd_resize_within_their_data_and_refuse_merge() {
        let dir = tempfile::tempdir().unwrap();
        let mut disks = vec![];
        let mut devices = vec![];
        for (name, disk_type) in [("dyn.vhd", VhdType::Dynamic), ("fixed.vhd", VhdType::Fixed)] {
            let path = dir.path().join(name);
            let opts = VhdCreateOptions {
                size: 8 << 20,
                disk_type,
                block_size: Some(1 << 20),
            };
            let v = Arc::new(Vhd::create(&path, &opts).unwrap());
            v.write_at(&[5; 4096], 3 << 20).unwrap();
            let block = vireo_virtio::Block::new(v.clone());
            disks.push(ControlDisk {
                path,
                read_only: false,
                size: v.size(),
                image: Image::Vhd(v.clone()),
                resizer: Some(block.resizer()),
            });
            devices.push((v, block));
        }
        let shared = Shared::new(disks);
        let (mut conn, mut lines, serving) = connected(&shared);
        let listed = ask(&mut conn, &mut lines, "disks");
        let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
        assert_eq!(v["format"], "vhd", "{listed}");
        assert_eq!(v["virtual_size"], 8 << 20, "{listed}");
        assert_eq!(v["chain_depth"], 1, "{listed}");
        next(&mut lines);
        assert_eq!(next(&mut lines), "ok");
        let merged = ask(&mut conn, &mut lines, "disk-merge 0");
        assert!(
            merged.starts_with("error disk 0") && merged.contains("VHD"),
            "{merged}"
        );
        // Dynamic: shrinks over empty blocks, grows back within its block table, refuses to
        // drop the block holding data or to outgrow the table.
        assert_eq!(ask(&mut conn, &mut lines, "disk-resize 0 4M"), "ok 4194304");
        assert_eq!(ask(&mut conn, &mut lines, "disk-resize 0 6M"), "ok 6291456");
        let refused = ask(&mut conn, &mut lines, "disk-resize 0 2M");
        assert!(
            refused.contains("would drop data at virtual offset 3145728"),
            "{refused}"
        );
        let refused = ask(&mut conn, &mut lines, "disk-resize 0 16M");
        assert!(refused.contains("convert it to VHDX"), "{refused}");
        // Fixed: grows; a shrink cannot be proven safe online.
        assert_eq!(
            ask(&mut conn, &mut lines, "disk-resize 1 12M"),
            "ok 12582912"
        );
        let refused = ask(&mut conn, &mut lines, "disk-resize 1 10M");
        assert!(refused.contains("fixed VHD"), "{refused}");
        drop(lines);
        drop(conn);
        serving.join().unwrap();
        for (v, _) in &devices {
            let mut got = vec![0u8; 4096];
            v.read_at(&mut got, 3 << 20).unwrap();
            assert_eq!(got, vec![5; 4096]);
        }
        assert_eq!(devices[0].0.size(), 6 << 20);
        assert_eq!(devices[1].0.size(), 12 << 20);
    }

    #[test]
    fn shutdown_cancels_and_lets_go_of_the_disks() {
        let dir = tempfile::tempdir().unwrap();
        let (_base, child, d) = chain(dir.path());
        let sock = dir.path().join("c.sock");
        std::fs::write(&sock, b"not a socket").unwrap();
        let Err(e) = ControlServer::start(&sock, vec![]) else {
            panic!("started over a regular file");
        };
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert!(e.is_bad_input());
        std::fs::remove_file(&sock).unwrap();
        let server = ControlServer::start(&sock, vec![disk(&child, &d)]).unwrap();
        let Err(e) = ControlServer::start(&sock, vec![]) else {
            panic!("two servers on one socket");
        };
        assert!(e.to_string().contains("in use"), "{e}");
        assert!(!e.is_bad_input());
        let mut conn = UnixStream::connect(&sock).unwrap();
        writeln!(conn, "disk-merge 0").unwrap();
        let mut first = String::new();
        BufReader::new(conn.try_clone().unwrap())
            .read_line(&mut first)
            .unwrap();
        // The merge is running or already done; either way shutdown ends it cleanly.
        server.shutdown();
        assert!(!sock.exists());
        assert_eq!(Arc::strong_count(&d), 1, "the control still holds the disk");
        let mut got = vec![0u8; 4096];
        d.read(&mut got, 8192).unwrap();
        assert_eq!(got, vec![2; 4096]);
    }
}
