//! A minimal userfaultfd (missing-page mode) for lazy restore (`state/lazy.rs`): create the fd,
//! register guest RAM mappings, read page-fault events, answer them with UFFDIO_COPY.
//!
//! Why not the `userfaultfd` crate: its `userfaultfd-sys` runs bindgen (libclang) in its build
//! script on every build, for five ioctls whose ABI has been frozen since Linux 4.11. The
//! structs below are the kernel's `include/uapi/linux/userfaultfd.h`, byte for byte.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// Bit of `uffdio_register.ioctls` saying UFFDIO_COPY works on the range.
const UFFDIO_COPY_BIT: u64 = 1 << 0x03;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffd_msg` (32 bytes); for a page fault `arg0` is the flags, `arg1` the address.
#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    arg0: u64,
    arg1: u64,
    _arg2: u64,
}

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);

/// What one UFFDIO_COPY did.
#[derive(Debug, PartialEq, Eq)]
pub enum Copied {
    /// All bytes are in place.
    All,
    /// A page of the range was already present: `done` bytes from the start were copied.
    Exists { done: u64 },
}

/// A userfaultfd whose faults are read non-blocking (poll first).
pub struct Uffd {
    fd: File,
}

impl Uffd {
    /// A new userfaultfd that also sees faults taken inside the kernel (KVM reading guest
    /// memory on a vCPU's behalf), which needs CAP_SYS_PTRACE or /dev/userfaultfd access.
    pub fn new() -> io::Result<Uffd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: plain syscall; the result is checked.
        let mut raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as i32;
        if raw < 0 {
            // Without CAP_SYS_PTRACE the device node may still be open to us.
            let dev = File::open("/dev/userfaultfd")?;
            // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd.
            raw = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    USERFAULTFD_IOC_NEW() as _,
                    flags as libc::c_ulong,
                )
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: raw is a fresh descriptor nobody else owns.
        let fd = unsafe { File::from_raw_fd(raw) };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes a uffdio_api, which `api` is.
        if unsafe { ioctl_with_mut_ref(&fd, UFFDIO_API(), &mut api) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Uffd { fd })
    }

    /// A userfaultfd another process created and set up (UFFDIO_API done), handed to us to
    /// read its faults and wake its waiters (a vhost-user back end's, for post-copy).
    pub fn from_file(fd: File) -> Uffd {
        Uffd { fd }
    }

    /// Registers `[start, start+len)` (page-aligned, a shared memfd mapping) for missing-page
    /// faults.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a uffdio_register.
        if unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER(), &mut reg) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if reg.ioctls & UFFDIO_COPY_BIT == 0 {
            return Err(io::Error::other(
                "the kernel does not offer UFFDIO_COPY on guest RAM",
            ));
        }
        Ok(())
    }

    /// Stops catching faults in the range; threads waiting in it are woken and retry.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let range = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads a uffdio_range.
        if unsafe { ioctl_with_ref(&self.fd, UFFDIO_UNREGISTER(), &range) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wakes threads waiting for a fault in the range (after another thread filled it).
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let range = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads a uffdio_range.
        if unsafe { ioctl_with_ref(&self.fd, UFFDIO_WAKE(), &range) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Atomically fills the missing pages `[dst, dst+src.len())` with `src` and wakes
    /// whoever waits on them. `dst` and `src.len()` are page-aligned.
    pub fn copy(&self, dst: u64, src: &[u8]) -> io::Result<Copied> {
        loop {
            let mut c = UffdioCopy {
                dst,
                src: src.as_ptr() as u64,
                len: src.len() as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `src.len()` bytes from `src` (borrowed for the
            // call) and writes the `copy` field of `c`; the kernel checks `dst`.
            if unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_COPY(), &mut c) } >= 0 {
                return Ok(Copied::All);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EEXIST) => {
                    return Ok(Copied::Exists {
                        done: c.copy.max(0) as u64,
                    })
                }
                // The mapping changed under the copy; the kernel asks to try again.
                Some(libc::EAGAIN) if c.copy <= 0 => continue,
                Some(libc::EAGAIN) => {
                    return self.copy(dst + c.copy as u64, &src[c.copy as usize..]);
                }
                _ => return Err(err),
            }
        }
    }

    /// Waits up to `timeout_ms` for the next page fault; its page-aligned address, or `None`.
    pub fn next_fault(&self, timeout_ms: i32) -> io::Result<Option<u64>> {
        if wait_any(&[self], timeout_ms)? == 0 {
            return Ok(None);
        }
        self.read_fault()
    }

    /// The next queued page fault's page-aligned address, without waiting; `None` if none.
    pub fn read_fault(&self) -> io::Result<Option<u64>> {
        let mut msg = UffdMsg::default();
        // SAFETY: reads at most one uffd_msg into `msg`, which is exactly that size.
        let got = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                &mut msg as *mut UffdMsg as *mut libc::c_void,
                std::mem::size_of::<UffdMsg>(),
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if got as usize != std::mem::size_of::<UffdMsg>() || msg.event != UFFD_EVENT_PAGEFAULT {
            // Only page faults were asked for (no features); anything else is ignored.
            return Ok(None);
        }
        Ok(Some(msg.arg1 & !(crate::memory::PAGE_SIZE - 1)))
    }
}

/// Waits up to `timeout_ms` until one of `uffds` has a fault queued; how many have (0: none).
pub fn wait_any(uffds: &[&Uffd], timeout_ms: i32) -> io::Result<usize> {
    let mut pfds: Vec<libc::pollfd> = uffds
        .iter()
        .map(|u| libc::pollfd {
            fd: u.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds for the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(e)
        };
    }
    Ok(n as usize)
}
