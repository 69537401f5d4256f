//! The few system calls the daemon makes that std does not wrap: signals to a worker, a new
//! session for a spawned worker, and the umask around the socket's bind. The only unsafe code
//! of the crate lives here.
#![allow(unsafe_code)]

use std::io;

/// Sends `sig` to `pid`. Callers check first that `pid` is still their worker (start time).
pub fn kill(pid: u32, sig: i32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let r = unsafe { libc::kill(pid, sig) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Puts the child in a process group of its own, so a Ctrl-C or a terminal's SIGHUP aimed at
/// vireod's group never reaches it and it outlives vireod, and lowers its CPU priority by
/// `nice` steps below vireod's own (at most to 19). Relative, not absolute: a vireod started
/// under `nice 15` would otherwise have set its workers to 10, above itself.
///
/// Not a session of its own (setsid): with the kernel's autogroup scheduling every session is
/// a scheduling group that gets an equal share of the CPUs whatever its members' nice values,
/// so fifty busy VMs in fifty sessions left vireod one fifty-first of the host and API calls
/// took hundreds of milliseconds. In vireod's session the workers' nice value does its job:
/// guests share the CPUs among themselves, and the management plane still gets its turn.
///
/// `inherit` are descriptors the worker keeps across its exec (a restore's disk files, named
/// in its launch); they stay close-on-exec in vireod, so no other child ever gets them.
pub fn worker_process_group(cmd: &mut tokio::process::Command, nice: i32, inherit: Vec<i32>) {
    // SAFETY: the closure runs in the forked child before exec and calls only setpgid(2),
    // setpriority(2) and fcntl(2), which are async-signal-safe; it allocates nothing (the
    // descriptor list was built before the fork) and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setpgid(0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            // Threads inherit the value, so the vCPU and device threads the worker creates
            // run at it too. Lowering one's own priority needs no privilege. The child starts
            // with the forking thread's value (getpriority's -1 is a value too: errno tells).
            *libc::__errno_location() = 0;
            let now = libc::getpriority(libc::PRIO_PROCESS, 0);
            if now == -1 && *libc::__errno_location() != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setpriority(libc::PRIO_PROCESS, 0, (now + nice).clamp(-20, 19)) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `f` with the process umask set to `mask` (then restores it). Only called at startup,
/// before any other thread creates files, so the process-wide umask cannot leak into them.
pub fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
    // SAFETY: umask(2) only swaps an integer in the process; it cannot fail.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    let r = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    r
}

/// The name of a signal for messages ("SIGKILL"), or its number.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSYS => "SIGSYS",
        _ => return sig.to_string(),
    };
    format!("{sig} ({name})")
}
