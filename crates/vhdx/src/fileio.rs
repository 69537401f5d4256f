//! The file underneath one VHDX: positioned I/O (no shared cursor, so no lock), an in-memory
//! overlay for read-only log replay, and a fault injector that simulates a crash for tests.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use vireo_block::{
    mapped_io_enabled, read_file_vectored, write_file_vectored, BlockError, FileMap, GuestBuf,
};

use crate::writeback::WritebackThread;
use crate::VhdxError;

/// Simulates power loss: after `n` more mutating operations (write, fsync, truncate) every
/// further mutation fails and is not performed, as if the machine stopped there.
#[derive(Debug)]
pub struct FaultInjector {
    remaining: AtomicI64,
    fired: AtomicBool,
    torn: bool,
    pause: Mutex<Option<PausePoint>>,
}

/// One read or write to stop at (see [`FaultInjector::pause_io_at`]).
#[derive(Debug)]
struct PausePoint {
    offset: u64,
    arrived: Sender<()>,
    go: Receiver<()>,
    /// Panic there instead of waiting (see [`FaultInjector::panic_io_at`]).
    panic: bool,
}

impl FaultInjector {
    pub fn after(n: u64) -> Arc<FaultInjector> {
        Arc::new(FaultInjector {
            remaining: AtomicI64::new(n as i64),
            fired: AtomicBool::new(false),
            torn: false,
            pause: Mutex::default(),
        })
    }

    /// Like [`FaultInjector::after`], but the write that hits the crash lands half-way
    /// (its first half, in whole 512-byte sectors), as a torn write would.
    pub fn after_torn(n: u64) -> Arc<FaultInjector> {
        Arc::new(FaultInjector {
            remaining: AtomicI64::new(n as i64),
            fired: AtomicBool::new(false),
            torn: true,
            pause: Mutex::default(),
        })
    }

    /// Makes the next read or write of the file at exactly `offset` stop before it is issued,
    /// as an I/O still in flight would: the first receiver gets a message when it stopped, and
    /// it goes on once the returned sender sends (or is dropped).
    pub fn pause_io_at(&self, offset: u64) -> (Receiver<()>, Sender<()>) {
        let (arrived_tx, arrived_rx) = channel();
        let (go_tx, go_rx) = channel();
        *self.pause.lock() = Some(PausePoint {
            offset,
            arrived: arrived_tx,
            go: go_rx,
            panic: false,
        });
        (arrived_rx, go_tx)
    }

    /// Makes the next read or write of the file at exactly `offset` panic before it is issued,
    /// as a bug would in a thread holding the locks of that I/O path.
    pub fn panic_io_at(&self, offset: u64) {
        let (arrived, _) = channel();
        let (_, go) = channel();
        *self.pause.lock() = Some(PausePoint {
            offset,
            arrived,
            go,
            panic: true,
        });
    }

    fn maybe_pause(&self, offset: u64) {
        let mut p = self.pause.lock();
        if p.as_ref().is_some_and(|x| x.offset == offset) {
            let point = p.take().unwrap();
            drop(p);
            if point.panic {
                panic!("injected panic at file offset {offset}");
            }
            let _ = point.arrived.send(());
            let _ = point.go.recv();
        }
    }

    /// True once the simulated crash happened.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// True when an earlier operation already crashed (only the first failing write tears).
    fn fired_before_this(&self) -> bool {
        self.remaining.load(Ordering::SeqCst) < -1
    }

    fn tick(&self) -> Result<(), VhdxError> {
        if self.remaining.fetch_sub(1, Ordering::SeqCst) <= 0 {
            self.fired.store(true, Ordering::SeqCst);
            return Err(VhdxError::InjectedFault);
        }
        Ok(())
    }
}

/// Pages replayed from the log in memory only (read-only opens of a dirty file).
#[derive(Default, Debug)]
struct Overlay {
    pages: BTreeMap<u64, Vec<u8>>,
    zeroes: Vec<(u64, u64)>,
}

#[derive(Debug)]
pub struct FileIo {
    /// Declared before `file`: dropped (its thread joined) while the descriptor is still open.
    writeback: WritebackThread,
    /// Shared mapping for the vectored payload path (`vectored.rs`); declared before `file`
    /// so it is unmapped while the descriptor is still open. None under a fault injector
    /// (every write must tick it) or with `VIREO_BLK_MMAP=0`.
    map: Option<FileMap>,
    file: File,
    fault: Option<Arc<FaultInjector>>,
    overlay: RwLock<Overlay>,
    has_overlay: AtomicBool,
}

impl FileIo {
    pub fn new(file: File, fault: Option<Arc<FaultInjector>>) -> FileIo {
        let regular = file.metadata().is_ok_and(|m| m.file_type().is_file());
        let map = (fault.is_none() && regular && mapped_io_enabled()).then(|| FileMap::new(&file));
        FileIo {
            writeback: WritebackThread::default(),
            map,
            file,
            fault,
            overlay: RwLock::default(),
            has_overlay: AtomicBool::new(false),
        }
    }

    /// The open file (for locking; I/O goes through the methods here).
    pub fn file(&self) -> &File {
        &self.file
    }

    fn tick(&self) -> Result<(), VhdxError> {
        match &self.fault {
            Some(f) => f.tick(),
            None => Ok(()),
        }
    }

    pub fn len(&self) -> Result<u64, VhdxError> {
        Ok(self.file.metadata()?.len())
    }

    /// The file's descriptor for vectored I/O straight into guest memory, when that is
    /// exactly what `read_at`/`write_at` would do: no fault injector to tick and no read-only
    /// log overlay to apply.
    pub fn direct_fd(&self) -> Option<std::os::unix::io::RawFd> {
        (self.fault.is_none() && !self.has_overlay.load(Ordering::Acquire))
            .then(|| self.file.as_raw_fd())
    }

    /// Reads file bytes `offset..` straight into guest memory (through the mapping when it
    /// can, else `preadv`), marking them dirty; the caller checked [`FileIo::direct_fd`].
    pub fn read_guest(&self, bufs: &[GuestBuf<'_>], offset: u64) -> Result<(), BlockError> {
        if self
            .map
            .as_ref()
            .is_some_and(|m| m.read(&self.file, bufs, offset))
        {
            return Ok(());
        }
        read_file_vectored(self.file.as_raw_fd(), bufs, offset)
    }

    /// Writes guest memory to file bytes `offset..`, the twin of [`FileIo::read_guest`].
    pub fn write_guest(&self, bufs: &[GuestBuf<'_>], offset: u64) -> Result<(), BlockError> {
        if self
            .map
            .as_ref()
            .is_some_and(|m| m.write(&self.file, bufs, offset))
        {
            return Ok(());
        }
        write_file_vectored(self.file.as_raw_fd(), bufs, offset)
    }

    /// Reads `buf.len()` bytes; bytes past the end of the file read as zero (sparse tails).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VhdxError> {
        if let Some(f) = &self.fault {
            f.maybe_pause(offset);
        }
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self.has_overlay.load(Ordering::Acquire) {
            self.apply_overlay(buf, offset);
        }
        Ok(())
    }

    fn apply_overlay(&self, buf: &mut [u8], offset: u64) {
        let ov = self.overlay.read();
        let end = offset + buf.len() as u64;
        for &(zo, zl) in &ov.zeroes {
            let (s, e) = (zo.max(offset), (zo + zl).min(end));
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize].fill(0);
            }
        }
        for (&po, page) in ov.pages.range(offset.saturating_sub(4095)..end) {
            let (s, e) = (po.max(offset), (po + page.len() as u64).min(end));
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&page[(s - po) as usize..(e - po) as usize]);
            }
        }
    }

    pub fn overlay_page(&self, offset: u64, data: Vec<u8>) {
        self.overlay.write().pages.insert(offset, data);
        self.has_overlay.store(true, Ordering::Release);
    }

    pub fn overlay_zero(&self, offset: u64, len: u64) {
        let mut ov = self.overlay.write();
        let end = offset + len;
        let doomed: Vec<u64> = ov.pages.range(offset..end).map(|(k, _)| *k).collect();
        for k in doomed {
            ov.pages.remove(&k);
        }
        ov.zeroes.push((offset, len));
        self.has_overlay.store(true, Ordering::Release);
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), VhdxError> {
        if let Some(f) = &self.fault {
            f.maybe_pause(offset);
        }
        if let Err(e) = self.tick() {
            let f = self.fault.as_ref().unwrap();
            if f.torn && !f.fired_before_this() {
                let half = buf.len() / 2 / 512 * 512;
                self.file.write_all_at(&buf[..half], offset)?;
            }
            return Err(e);
        }
        self.file.write_all_at(buf, offset)?;
        Ok(())
    }

    pub fn sync(&self) -> Result<(), VhdxError> {
        self.tick()?;
        self.file.sync_data()?;
        Ok(())
    }

    pub fn set_len(&self, len: u64) -> Result<(), VhdxError> {
        self.tick()?;
        match &self.map {
            // A shrink must not leave mapped pages past the end; growing needs nothing (the
            // mapping follows on demand).
            Some(map) if len < self.len()? => map.unmapped_while(|| self.file.set_len(len))?,
            _ => self.file.set_len(len)?,
        }
        Ok(())
    }

    /// Makes `offset..offset+len` read as zero, punching a hole where the filesystem can.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<(), VhdxError> {
        self.tick()?;
        // SAFETY: fallocate on our own open descriptor; the kernel validates the range.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let zeroes = vec![0u8; (len.min(1 << 20)) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Starts write-back of the file's dirty pages without waiting for it (not a durability
    /// point: the data is only safe after [`FileIo::sync`]), from a thread of its own so the
    /// caller does not pay for queueing it (`writeback.rs`). The kernel may write dirty pages
    /// at any time anyway, so this changes when the disk works, never what a crash can leave.
    pub fn start_writeback(&self) {
        self.writeback.request(self.file.as_raw_fd());
    }

    /// Gives the new (zero-reading) range real space, as a fixed disk promises; see
    /// [`allocate_zeroed`].
    pub fn allocate(&self, offset: u64, len: u64) -> Result<(), VhdxError> {
        self.tick()?;
        allocate_zeroed(&self.file, offset, len)?;
        Ok(())
    }

    /// Best-effort preallocation (space reservation); silently skipped where unsupported.
    pub fn preallocate(&self, offset: u64, len: u64) {
        // SAFETY: as above; failure only means the blocks stay sparse.
        unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                0,
                offset as libc::off_t,
                len as libc::off_t,
            );
        }
    }
}

/// Allocates real space for `offset..offset+len`, which must read as zero already (new space at
/// or past the end of the file): fixed disks promise that all their space is taken up front, so
/// a full filesystem shows at creation, not as a failed guest write later. Uses fallocate; where
/// the filesystem has none, writes the zeroes. Extends the file if the range ends past it.
pub(crate) fn allocate_zeroed(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on a descriptor `file` keeps open for the call; the kernel validates
    // the range.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            0,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    let zeroes = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}
