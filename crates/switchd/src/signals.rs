//! SIGTERM and SIGINT ask the switch to shut down as a `Shutdown` request does: the handler
//! only sets a flag, which the main thread polls.

use std::sync::atomic::{AtomicBool, Ordering};

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: one atomic store.
    TERMINATE.store(true, Ordering::SeqCst);
}

/// Routes SIGTERM and SIGINT to [`terminated`].
pub fn install() -> std::io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(sig, on_terminate)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

/// Whether SIGTERM or SIGINT arrived.
pub fn terminated() -> bool {
    TERMINATE.load(Ordering::SeqCst)
}
