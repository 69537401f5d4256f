//! SIGTERM and SIGINT ask the switch to shut down as a `Shutdown` request does: the handler
//! only sets a flag, which the main thread polls. SIGHUP is ignored: the hangup of the
//! terminal vireod was started from must not take the VMs' network down.

use std::sync::atomic::{AtomicBool, Ordering};

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: one atomic store.
    TERMINATE.store(true, Ordering::SeqCst);
}

extern "C" fn on_hangup(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Routes SIGTERM and SIGINT to [`terminated`]; SIGHUP does nothing.
pub fn install() -> std::io::Result<()> {
    let errno = |e: vmm_sys_util::errno::Error| std::io::Error::from_raw_os_error(e.errno());
    for sig in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(sig, on_terminate).map_err(errno)?;
    }
    vmm_sys_util::signal::register_signal_handler(libc::SIGHUP, on_hangup).map_err(errno)
}

/// Whether SIGTERM or SIGINT arrived.
pub fn terminated() -> bool {
    TERMINATE.load(Ordering::SeqCst)
}
